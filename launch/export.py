"""A run's student as a Hugging Face folder (config.json, safetensors, tokenizer files).

    torchrun --nproc-per-node 2 -m launch.export --recipe tiny --out runs/demo/student_hf [key=value ...]

The weights are the run's latest checkpoint (``checkpoint.dir``) when it has one, else the
recipe's ``student.checkpoint``; ``--weights DIR`` names another. When the student came from a
Hugging Face folder (``student.checkpoint``, or ``--source``), its config.json, generation
config and tokenizer files are kept and its embedding row count is written back; otherwise
config.json is written from ``student.model`` and the tokenizer files are copied when
``tokenizer`` is a Hugging Face folder. Run it at any TP / PP layout (the recipe's, or
``parallel.tensor=1`` on one process); the folder appears complete or not at all.
"""
import os
import sys
from pathlib import Path

import torch.distributed as dist

from launch import run_main
from recipes import parse_recipe_args, recipe_parser


def main(argv=None) -> None:
    parser = recipe_parser(__doc__)
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write (replaced when it exists)")
    parser.add_argument("--weights", help="a checkpoint folder (a run's root or one step_* folder)")
    parser.add_argument("--source", help="the student's original Hugging Face folder (default: student.checkpoint "
                                         "when it is one)")
    args, cfg = parse_recipe_args(parser, argv)

    from tropd_megatron.megatron import build_gpt, initialize
    from tropd_megatron.validate import validate
    from tropd_megatron.megatron.hf_checkpoint import export_hf, is_hf_folder
    from tropd_megatron.train import load_weights, run_model_configs, trained_student

    validate(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    initialize(cfg.parallel, seed=cfg.schedule.seed)
    student_model, _ = run_model_configs(cfg)
    weights = trained_student(cfg, args.weights)  # before the model: a run without weights stops here
    model = build_gpt(student_model, cfg.parallel, frozen=True)
    path = load_weights(weights, model, student_model, "student")
    source = args.source
    if source is None and cfg.student.checkpoint and is_hf_folder(cfg.student.checkpoint):
        source = cfg.student.checkpoint
    if source is not None and not is_hf_folder(source):
        raise FileNotFoundError(f"--source {source}: not a Hugging Face folder (config.json + *.safetensors)")
    out = export_hf(model, cfg.student.model, args.out, source=source, tokenizer=cfg.tokenizer)
    if dist.get_rank() == 0:
        tokenizer_note = "" if any(Path(out).glob("tokenizer*")) else " (no tokenizer files: the tokenizer is not " \
                                                                      "a Hugging Face folder)"
        print(f"exported {path} -> {out}{tokenizer_note}", flush=True)


if __name__ == "__main__":
    sys.exit(run_main(main))
