"""A depth-pruned student from a Hugging Face folder: some of its decoder layers, renumbered.

    python -m launch.prune SOURCE OUT --every 3            # layers 0, 3, 6, ...
    python -m launch.prune SOURCE OUT --keep 0,1,5,29
    python -m launch.prune SOURCE OUT --first 4 --last 4

OUT is an HF folder that transformers loads (config.json's layer count updated, tensors
renamed, tokenizer and chat template copied) and that recipes load with ``from_hf``;
``OUT/pruning.json`` records the source and the kept layers. No torch model is built.
"""
import argparse
import json
import sys
from pathlib import Path

from launch import run_main
from tropd_megatron import ConfigError
from tropd_megatron.pruning import layers_to_keep, prune_hf_layers


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a Hugging Face model folder (config.json + *.safetensors)")
    parser.add_argument("out", help="the folder to write (must not exist)")
    parser.add_argument("--keep", help="comma-separated layer numbers, counted from 0")
    parser.add_argument("--every", type=int, help="keep every n-th layer from layer 0")
    parser.add_argument("--first", type=int, default=0, help="keep the first k layers (with --last)")
    parser.add_argument("--last", type=int, default=0, help="keep the last k layers (with --first)")
    args = parser.parse_args(argv)
    config_file = Path(args.source) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: no such file (a Hugging Face model folder has config.json)")
    try:
        keep = None if args.keep is None else [int(x) for x in args.keep.split(",")]
    except ValueError:
        raise ConfigError(f"--keep {args.keep!r}: expected comma-separated integers") from None
    layers = layers_to_keep(json.loads(config_file.read_text())["num_hidden_layers"], keep=keep, every=args.every,
                            first=args.first, last=args.last)
    out = prune_hf_layers(args.source, args.out, layers)
    print(f"{args.source} -> {out}: kept {len(layers)} layers {layers}", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
