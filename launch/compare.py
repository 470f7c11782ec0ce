"""`make compare`: OPD, EOPD, REOPOLD and TrOPD (each outlier strategy) on the tiny task,
same seeds and budget, in one torchrun job at TP = 2 on CPU.

    torchrun --nproc-per-node 2 -m launch.compare [--seeds 0,1] [--variants "OPD,TrOPD fkl"] [key=value ...]

Uses the demo's prepared task and models (prepared here when missing). Each run is a
Trainer on the tiny recipe with its own checkpoint folder under ROOT/compare, so an
interrupted comparison resumes where it stopped and a finished run is not repeated.
Writes OUT.md (a table of held-out avg@1 before and after, per seed, mean and spread) and
OUT.png (accuracy over steps, mean over seeds).
"""
import argparse
import json
import os
import statistics
import sys

import torch.distributed as dist

from launch import run_main
from launch.demo import TASK_HELP, tiny_configs
from tropd_megatron.megatron import initialize
from tropd_megatron.tasks.tiny import prepare
from tropd_megatron.train import Trainer

VARIANTS = {
    "OPD": ["objective.name=opd"],
    "EOPD": ["objective.name=eopd"],
    "REOPOLD": ["objective.name=reopold"],
    "TrOPD clip": ["objective.name=tropd", "objective.tropd.outlier=clip"],
    "TrOPD mask": ["objective.name=tropd", "objective.tropd.outlier=mask"],
    "TrOPD fkl": ["objective.name=tropd", "objective.tropd.outlier=fkl"],
}


def run_one(root: str, name: str, seed: int, overrides: list) -> dict:
    folder = os.path.join(root, "compare", f"{name.lower().replace(' ', '_')}_seed{seed}")
    cfg, _ = tiny_configs(root, [*VARIANTS[name], f"schedule.seed={seed}", f"data.seed={seed}",
                                       f"objective.tropd.seed={seed}", f"checkpoint.dir={folder}",
                                       f"logging.tensorboard_dir={folder}/tensorboard", "logging.log_every=50",
                                       *overrides])
    history = Trainer(cfg).run()["history"]["eval"]
    return {"variant": name, "seed": seed, "steps": cfg.schedule.steps,
            "problems": history[-1]["problems"], "curve": [(e["step"], e["avg_at_n"]) for e in history]}


def spread(values: list) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def report(results: list, out: str, command: str, cfg) -> None:
    seeds = sorted({r["seed"] for r in results})
    t, s = cfg.teacher.model, cfg.student.model
    lines = ["# Objectives compared on the built-in tiny task", "",
             f"Made by `{command}` (2-process torchrun, TP = 2, CPU). Every run: the same SFT teacher "
             f"({t.num_layers} layers x {t.hidden_size}) and student ({s.num_layers} layers x {s.hidden_size}), "
             f"{cfg.schedule.steps} steps of {cfg.schedule.prompts_per_step} prompts x "
             f"{cfg.rollout.rollouts_per_prompt} rollouts, lr {cfg.optim.lr:g} decaying to {cfg.optim.min_lr:g}, "
             f"each objective at its defaults (TrOPD top-k {cfg.objective.tropd.topk}). Seeds set the data order, "
             "sampling and the trust mask. Metric: held-out avg@1 (greedy) on "
             f"{results[0]['problems']} held-out problems; per-run curves in {os.path.basename(out)}.png "
             f"and {os.path.basename(out)}.json.", "",
             "| objective | before | " + " | ".join(f"after, seed {s}" for s in seeds) + " | after, mean ± sd |",
             "|---|---:|" + "---:|" * (len(seeds) + 1)]
    variants = list(dict.fromkeys(r["variant"] for r in results))  # run order
    for name in variants:
        runs = [r for r in results if r["variant"] == name]
        after = {r["seed"]: r["curve"][-1][1] for r in runs}
        lines.append(f"| {name} | {spread([r['curve'][0][1] for r in runs])} | "
                     + " | ".join(f"{after[s]:.3f}" for s in seeds) + f" | {spread(list(after.values()))} |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in variants:
        curves = [r["curve"] for r in results if r["variant"] == name]
        steps = [s for s, _ in curves[0]]
        ax.plot(steps, [statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))], marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out avg@1 (mean of {len(seeds)} seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=100)
    plt.close(fig)
    print("\n".join(lines), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/demo", help="the demo's task files and models")
    parser.add_argument("--seeds", default="0,1", help="comma-separated (default %(default)s)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: %(default)s")
    parser.add_argument("--out", default="docs/compare", help="writes OUT.md, OUT.json, OUT.png")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=TASK_HELP + "; for every run")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.exit(2, f"error: unknown variants {unknown}; choose from {', '.join(VARIANTS)}\n")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        base, task = tiny_configs(args.root, args.overrides)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    initialize(base.parallel, seed=0)
    prepare(base, task)
    results = []
    for seed in seeds:
        for name in variants:
            if dist.get_rank() == 0:
                print(f"== {name}, seed {seed}", file=sys.stderr, flush=True)
            results.append(run_one(args.root, name, seed, args.overrides))
    if dist.get_rank() == 0:
        given = sys.argv[1:] if argv is None else argv
        command = "make compare" + (f' ARGS="{" ".join(given)}"' if given else "")
        report(results, args.out, command, base)
    dist.barrier()


if __name__ == "__main__":
    sys.exit(run_main(main))
