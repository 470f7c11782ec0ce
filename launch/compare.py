"""`make compare`: every objective at its own tuned learning rate, the paper's ablation chain,
three seeds each, on the built-in tiny task (TP = 2 on CPU, one torchrun job).

    torchrun --nproc-per-node 2 -m launch.compare [--variants "OPD,TrOPD fkl"] [--phase sweep] [key=value ...]

The protocol (fixed before any result was seen; docs/compare.md states it):
1. Three disjoint splits of the task: training prompts, a validation set that every choice
   reads, and the held-out test set that only the final report reads.
2. For each objective, one run (seed 0) at each learning rate of ``LEARNING_RATES``; the
   chosen rate is the one with the highest mean validation avg@1 over the last three
   evaluations (steps 150, 175, 200 of 200); a tie goes to the smaller rate.
3. At the chosen rate, seeds 0, 1 and 2 (seed 0 is the sweep's run). Reported: test avg@1
   mean, standard deviation and 95% interval (Student's t, n - 1 degrees of freedom), the final
   mean response length and stopped fraction (the last 10 steps), and the validation curves.
A seed sets the data order, the rollouts' sampling and the trust mask.

Each run keeps its checkpoints under ROOT/compare/<run>, and every finished run's results go
into the state file (results/compare.json) at once, so the comparison resumes where it
stopped, across sittings, and a finished run is never repeated. A state holds one machine
(CPU model and kernel pins, recorded): resuming it elsewhere is refused, since float rounding
differs by CPU model. Writes OUT.md (tables) and OUT.png (curves); ``--phase report`` writes
them from the state alone.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace

import torch.distributed as dist

from launch import run_main
from launch.demo import TASK_HELP, tiny_configs
from tropd_megatron.evaluation.avg_at_n import evaluate, load_problems
from tropd_megatron.megatron import initialize
from tropd_megatron.tasks.tiny_task import prepare
from tropd_megatron.logs import logger, logging_rank, read_metrics
from tropd_megatron.train import Trainer

# rows, each an objective's overrides of the tiny recipe
VARIANTS = {
    "OPD": ["objective.name=opd"],
    "EOPD": ["objective.name=eopd"],
    "REOPOLD": ["objective.name=reopold"],
    "TrOPD clip": ["objective.name=tropd", "objective.tropd.outlier=clip"],
    "TrOPD mask": ["objective.name=tropd", "objective.tropd.outlier=mask"],
    "TrOPD fkl": ["objective.name=tropd", "objective.tropd.outlier=fkl"],
    "TrOPD fkl (deterministic trust)": ["objective.name=tropd", "objective.tropd.outlier=fkl",
                                       "objective.tropd.trust=deterministic"],
    # teacher-prefix guidance: half of the rollouts start with 6 teacher tokens at step 0,
    # decaying linearly to none with 2 tokens at the last step (responses are ~18 tokens)
    "TrOPD fkl + prefix guidance": ["objective.name=tropd", "objective.tropd.outlier=fkl",
                                    "rollout.prefix_share_start=0.5", "rollout.prefix_share_end=0.0",
                                    "rollout.prefix_tokens_start=6", "rollout.prefix_tokens_end=2"],
    # what the distillation frameworks ship, and a control (issue 26; the decision rule below)
    "exact reverse KL": ["objective.name=dense_kl", "objective.dense_kl.direction=reverse"],
    "dense forward KL": ["objective.name=dense_kl", "objective.dense_kl.direction=forward"],
    # no token trusted: the forward KL over the teacher's top 16 on every token (NeMo-RL's loss)
    "top-k forward KL": ["objective.name=tropd", "objective.tropd.outlier=fkl", "objective.tropd.trust=deterministic",
                         "objective.tropd.trust_threshold=1e9"],
    # EOPD's extra term on every token (every entropy exceeds -1): OPD + top-16 forward KL
    "OPD + top-k forward KL": ["objective.name=eopd", "objective.eopd.entropy_threshold=-1", "objective.eopd.alpha=1"],
    "TrOPD fkl (random mask)": ["objective.name=tropd", "objective.tropd.outlier=fkl", "objective.tropd.trust=random"],
}
# more seeds at the chosen rate for the rows the decision rule compares most closely
EXTRA_SEEDS = {"TrOPD fkl": (3, 4), "top-k forward KL": (3, 4)}
# (row, against), paired by seed: the decision rule's pairs, then forward KL over the top k
# against the whole vocabulary, and the exact reverse KL against OPD's single-sample estimate of it
RULE_PAIRS = [("TrOPD fkl", "top-k forward KL"), ("TrOPD fkl", "OPD + top-k forward KL"),
              ("TrOPD fkl", "TrOPD fkl (random mask)")]
PAIRED = RULE_PAIRS + [("top-k forward KL", "dense forward KL"), ("exact reverse KL", "OPD")]
DECISION_RULE = (
    "Stated before the runs of these rows: TrOPD's advantage counts as beyond forward KL only if TrOPD fkl beats "
    "both top-k forward KL on every token and OPD + top-k forward KL, each with the 95% interval of the paired "
    "per-seed differences excluding 0; the trust mask counts as doing something only if TrOPD fkl beats the "
    "random-mask control the same way. Any other outcome is reported as no difference shown.")
LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3)  # 30x; min_lr is lr / 10 (cosine decay)
SEEDS = (0, 1, 2)
SELECTION_EVALS = 3  # validation evaluations averaged by the selection rule
# the paper's ablation (Qwen3 1.7B student, math average) and the rows that correspond
PAPER_ABLATION = [("OPD", "OPD", 46.79), ("+ trust-region mask", "TrOPD mask", 47.72),
                  ("+ forward-KL outliers", "TrOPD fkl", 49.00),
                  ("+ teacher-prefix guidance", "TrOPD fkl + prefix guidance", 49.85)]
# the kernel pins of the Makefile's PINNED_ISA: with the CPU model, what a run's float rounding depends on
KERNEL_PINS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}  # two-sided 95% Student's t by degrees of freedom


def run_key(variant: str, lr: float, seed: int) -> str:
    name = variant.lower().replace(' ', '_').replace('+', 'plus').replace('(', '').replace(')', '')
    return f"{name}_lr{lr:g}_seed{seed}"


def run_one(root: str, variant: str, lr: float, seed: int, overrides: list) -> dict:
    """Train one run (resuming its checkpoints), evaluate it on the test set; its record."""
    key = run_key(variant, lr, seed)
    folder = os.path.join(root, "compare", key)
    cfg, _ = tiny_configs(root, [*VARIANTS[variant], f"optim.lr={lr}", f"optim.min_lr={lr / 10}",
                                 f"schedule.seed={seed}",  # the data order and the trust mask follow it
                                 f"eval.path={root}/validation.jsonl", f"checkpoint.dir={folder}",
                                 f"logging.tensorboard_dir={folder}/tensorboard", "logging.log_every=50", *overrides])
    start = time.monotonic()
    trainer = Trainer(cfg)
    history = trainer.run().eval
    test = load_problems(replace(cfg.data, path=f"{root}/held_out.jsonl"), trainer.encode)
    result = evaluate(trainer.student_generator, test, trainer.tokenizer.decode, max_new_tokens=cfg.eval_max_new_tokens(),
                      seed=seed, progress=False, results_path=os.path.join(folder, "test.jsonl"))
    metrics = list(read_metrics(folder).values()) if logging_rank() else []
    last = metrics[-10:]
    return {"key": key, "variant": variant, "lr": lr, "seed": seed, "steps": cfg.schedule.steps,
            "validation": [(e["step"], e["avg_at_n"]) for e in history], "test": result.avg_at_n,
            "test_problems": result.problems, "validation_problems": history[-1]["problems"],
            "response_length": statistics.fmean(m["response_length"] for m in last) if last else None,
            "stopped_fraction": statistics.fmean(m["stopped_fraction"] for m in last) if last else None,
            # how much the teacher leaves open on the SFT student's samples (the first step's, before
            # any update, so that no objective's instability enters it): the room between objectives
            "teacher_entropy": metrics[0]["teacher_entropy"] if metrics else None,
            "seconds": round(time.monotonic() - start)}  # this sitting's share, when the run resumed


def selection_score(record: dict, evals: int = SELECTION_EVALS) -> float:
    """The mean validation avg@1 of the last ``evals`` evaluations, rounded to what the
    problem count resolves (a count of right answers over evals x problems), so that two
    sweeps with the same number of right answers tie instead of differing in a float's last bit."""
    mean = statistics.fmean(acc for _, acc in record["validation"][-evals:])
    answers = record["validation_problems"] * min(evals, len(record["validation"]))
    return round(mean * answers) / answers


def chosen_lr(runs: dict, variant: str, lrs=LEARNING_RATES, seed: int = SEEDS[0],
              evals: int = SELECTION_EVALS) -> float | None:
    """The protocol's rate for ``variant``, once its whole sweep has run at ``seed`` (else None):
    the highest ``selection_score``, a tie going to the smaller rate."""
    sweep = [runs.get(run_key(variant, lr, seed)) for lr in lrs]
    if any(r is None for r in sweep):
        return None
    best = max(selection_score(r, evals) for r in sweep)
    return min(r["lr"] for r in sweep if selection_score(r, evals) == best)


def interval(values: list) -> tuple:
    """(mean, sd, half-width of the 95% interval); sd and interval need two values."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    sd = statistics.stdev(values)
    return mean, sd, T_95.get(len(values) - 1, 1.96) * sd / math.sqrt(len(values))


def machine() -> str:
    """This CPU (model name, family and model from /proc/cpuinfo) and the kernel pins in effect:
    runs from different machines do not pair (docs/results.md), so a state file holds one."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = f"{info.get('model name', 'unknown CPU')} (family {info.get('cpu family', '?')} model {info.get('model', '?')})"
    return cpu + ", kernels " + " ".join(f"{k}={os.environ.get(k, 'unset')}" for k in KERNEL_PINS)


def save(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def report(data: dict, out: str, variants: list, lrs, seeds, root: str) -> str:
    runs = data["runs"]
    protocol = data["protocol"]
    chosen = {v: chosen_lr(runs, v, lrs) for v in variants}  # None until a sweep is complete
    lines = ["# Objectives compared on the built-in tiny task", "",
             f"Made by `{protocol['command']}` ({protocol['compute']}: {protocol['machine']}).", "",
             "## Protocol (fixed before any result was seen)", "",
             f"- Task: multi-step arithmetic; three disjoint splits: {protocol['train_problems']} training prompts, "
             f"{protocol['validation_problems']} validation problems (every choice reads them), "
             f"{protocol['test_problems']} test problems (only this report reads them).",
             f"- Every run: the same SFT teacher ({protocol['teacher']}) and student ({protocol['student']}), "
             f"{protocol['steps']} steps of {protocol['prompts_per_step']} prompts x {protocol['rollouts']} rollouts, "
             "cosine decay from lr to lr / 10, each objective at its defaults (TrOPD top-k "
             f"{protocol['topk']}), greedy avg@1 on validation every {protocol['eval_every']} steps.",
             (f"- Learning rate: a sweep over {', '.join(f'{lr:g}' for lr in lrs)} at seed 0; chosen: the highest mean "
              f"validation avg@1 over the last {SELECTION_EVALS} evaluations, rounded to a count of right answers (a "
              "tie is a tie and goes to the smaller rate)." if len(lrs) > 1 else
              f"- Learning rate: {lrs[0]:g} for every row, given (--lrs), not swept here."),
             f"- At the chosen rate: seeds {', '.join(map(str, seeds))} (seed 0 is the sweep's run); reported: test "
             "avg@1 mean, sd and 95% interval (Student's t), the final response length and stopped fraction "
             "(means over the last 10 steps).",
             *(["- Teacher-prefix guidance: half of the rollouts start with 6 teacher tokens at step 0, decaying "
                "linearly to none (2 tokens) at the last step."] if "TrOPD fkl + prefix guidance" in variants else []),
             "- What the protocol does not cover. The tiny recipe's shared settings (top-k 16, 200 steps, the "
             "schedule) were set by hand earlier, reading the demo's held-out file, which is this protocol's test "
             "split. No row has lr warmup, and every row at lr >= 1e-3 dips at its first evaluation (step 25): "
             "adding warmup once results were seen would change the protocol for every row, so it is left as "
             "fixed and the dip shows in the curves. The intervals cover seed-to-seed variation on one machine, "
             "not machine-to-machine: float rounding differs by CPU model, and the demo's student (same code, "
             "seed and kernel pins) ended at 0.270 on an AMD EPYC and 0.347 on an Intel Xeon (docs/results.md).",
             *rule_lines(runs, chosen, variants),
             # a change made once results were seen, written into the state by hand: said, not hidden
             *(f"- Changed after results were seen: {change}" for change in protocol.get("changes", ())), "",
             "## Learning-rate sweep (seed 0, validation avg@1, mean of the last evaluations; * chosen)", "",
             *sweep_table(runs, variants, lrs, seeds[0], chosen, "objective")]
    edge = [f"{v} ({chosen[v]:g})" for v in variants if len(lrs) > 1 and chosen[v] in (min(lrs), max(lrs))]
    if edge:
        lines += ["", "Chosen at an end of the sweep, so a rate beyond it was not tried: " + ", ".join(edge) + "."]
    lines += ["", "## Test avg@1 at each objective's chosen rate", "",
              f"Before training the student scores {protocol['student_before_test']:.3f} on the test set and the "
              f"teacher {protocol['teacher_test']:.3f}.{teacher_entropy_line(runs)}", "",
              "| objective | lr | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | 95% interval | "
              "response length | stopped fraction |", "|---|---:|" + "---:|" * (len(seeds) + 4)]
    summary = {}
    for v in variants:
        lr = chosen[v]
        done = [runs.get(run_key(v, lr, s)) for s in seeds] if lr is not None else []
        if not done or any(r is None for r in done):
            lines.append(f"| {v} | {'—' if lr is None else f'{lr:g}'} | " + " | ".join(
                "—" if r is None else f"{r['test']:.3f}" for r in (done or [None] * len(seeds))) + " | (incomplete) | | | |")
            continue
        mean, sd, half = interval([r["test"] for r in done])
        summary[v] = (mean, sd, half)
        lines.append(f"| {v} | {lr:g} | " + " | ".join(f"{r['test']:.3f}" for r in done)
                     + f" | {mean:.3f} ± {sd:.3f} | [{mean - half:.3f}, {mean + half:.3f}] | "
                     f"{statistics.fmean(r['response_length'] for r in done):.1f} | "
                     f"{statistics.fmean(r['stopped_fraction'] for r in done):.2f} |")
    if summary:
        lines += ["", "Reading the intervals:"]
        ranked = sorted(summary, key=lambda v: -summary[v][0])
        best = ranked[0]

        def overlaps(a, b):  # the two 95% intervals share a point
            (ma, _, ha), (mb, _, hb) = summary[a], summary[b]
            return ma - ha <= mb + hb and mb - hb <= ma + ha

        tied = [v for v in ranked[1:] if overlaps(best, v)]
        lines.append(f"- Highest mean: {best}; its 95% interval overlaps "
                     + (", ".join(tied) if tied else "no other row's") + ".")
        if "OPD" in summary:
            above = [v for v in ranked if v != "OPD" and summary[v][0] - summary[v][2] > summary["OPD"][0]
                     + summary["OPD"][2]]
            below = [v for v in ranked if v != "OPD" and summary[v][0] + summary[v][2] < summary["OPD"][0]
                     - summary["OPD"][2]]
            lines.append("- Intervals entirely above OPD's: " + (", ".join(above) or "none")
                         + "; entirely below: " + (", ".join(below) or "none")
                         + "; every other row overlaps OPD's, so no ordering against OPD is claimed for it.")
    lines += paired_lines(runs, chosen, variants)
    seconds = run_seconds(root, runs)
    if seconds:
        lines += ["", f"Compute: {len(runs)} runs, {seconds / 3600:.1f} hours of wall time on this machine (each "
                      "run's training and test evaluation)."]
    lines += ["", "## The paper's ablation chain", "",
              "| step | row | here: test avg@1 (mean ± sd) | paper: math average |", "|---|---|---:|---:|"]
    for step, row, paper in PAPER_ABLATION:
        here = f"{summary[row][0]:.3f} ± {summary[row][1]:.3f}" if row in summary else "—"
        lines.append(f"| {step} | {row} | {here} | {paper:.2f} |")
    text = "\n".join(lines) + "\n"
    with open(out + ".md.tmp", "w") as f:
        f.write(text)
    os.replace(out + ".md.tmp", out + ".md")
    plot(runs, chosen, seeds, out + ".png")
    return text


def rule_lines(runs: dict, chosen: dict, variants: list) -> list[str]:
    """The decision rule, where one of its pairs is among the rows, with the extra seeds on record."""
    if not any(row in variants and other in variants for row, other in RULE_PAIRS):
        return []
    extra = {v: [s for s in seeds if chosen[v] is not None and run_key(v, chosen[v], s) in runs]
             for v, seeds in EXTRA_SEEDS.items() if v in variants}
    told = "; ".join(f"{', '.join(map(str, s))} also for {v}" for v, s in extra.items() if s)
    return [("- Extra seeds at the chosen rate for the rows the decision rule compares most closely: " + told + ". "
             if told else "- ") + DECISION_RULE]


def sweep_table(runs: dict, variants: list, lrs, seed: int, chosen: dict, first_column: str,
                evals: int = SELECTION_EVALS) -> list[str]:
    """The sweep's markdown table: a row per variant, its selection score at each rate, * on the chosen one."""
    lines = [f"| {first_column} | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
    for v in variants:
        cells = []
        for lr in lrs:
            r = runs.get(run_key(v, lr, seed))
            cells.append("—" if r is None else f"{selection_score(r, evals):.3f}{' *' if lr == chosen[v] else ''}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def paired_lines(runs: dict, chosen: dict, variants: list) -> list[str]:
    """The pairs of ``PAIRED``: per-seed differences of test avg@1 at each row's chosen rate,
    over the seeds both rows have, with the mean and its 95% interval (Student's t)."""
    lines = []
    for row, other in PAIRED:
        if row not in variants or other not in variants or chosen[row] is None or chosen[other] is None:
            continue
        by_seed = [{r["seed"]: r["test"] for r in runs.values() if r["variant"] == v and r["lr"] == chosen[v]}
                   for v in (row, other)]
        common = sorted(set(by_seed[0]) & set(by_seed[1]))
        if len(common) < 2:
            continue
        diffs = [by_seed[0][s] - by_seed[1][s] for s in common]
        mean, _, half = interval(diffs)
        verdict = (f"{row} ahead" if mean - half > 0 else f"{other} ahead" if mean + half < 0
                   else "the interval contains 0: no difference shown")
        lines.append(f"| {row} − {other} | {', '.join(map(str, common))} | "
                     + ", ".join(f"{d:+.3f}" for d in diffs) + f" | {mean:+.3f} | [{mean - half:+.3f}, {mean + half:+.3f}] | "
                     f"{verdict} |")
    if not lines:
        return []
    return ["", "## Paired differences (test avg@1, paired by seed)", "",
            "| difference | seeds | per seed | mean | 95% interval | outcome |", "|---|---|---|---:|---:|---|", *lines]


def teacher_entropy_line(runs: dict) -> str:
    """The teacher's mean entropy on the SFT student's samples (each run's first step), over the
    runs that recorded it ('' when none did)."""
    values = [r["teacher_entropy"] for r in runs.values() if r.get("teacher_entropy") is not None]
    if not values:
        return ""
    return (f" The teacher's mean entropy on the SFT student's samples (each run's first step, before any update): "
            f"{statistics.fmean(values):.3f} nats (mean of {len(values)} runs; range {min(values):.3f}-{max(values):.3f}).")


def run_seconds(root: str, runs: dict) -> float:
    """Wall time of the recorded runs: their own record, else (older records) each run folder's
    config.yaml to its test results."""
    total = 0.0
    for key in runs:
        if "seconds" in runs[key]:
            total += runs[key]["seconds"]
            continue
        folder = os.path.join(root, "compare", key)
        try:
            total += os.path.getmtime(os.path.join(folder, "test.jsonl")) - os.path.getmtime(
                os.path.join(folder, "config.yaml"))
        except OSError:
            continue
    return total


def plot(runs: dict, chosen: dict, seeds, path: str) -> None:
    """Validation curves (mean of the seeds run) of each objective at its chosen rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for v, lr in chosen.items():
        done = [runs[run_key(v, lr, s)] for s in seeds if lr is not None and run_key(v, lr, s) in runs]
        if not done:
            continue
        steps = [s for s, _ in done[0]["validation"]]
        mean = [statistics.fmean(r["validation"][i][1] for r in done) for i in range(len(steps))]
        ax.plot(steps, mean, marker="o", markersize=3, label=f"{v} (lr {lr:g}, {len(done)} seeds)")
    ax.set_xlabel("step")
    ax.set_ylabel("validation avg@1 (mean of seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def before_training(root: str, base) -> dict:
    """The SFT student's and the teacher's test avg@1 (the report's reference points)."""
    from tropd_megatron.megatron import build_gpt
    from tropd_megatron.megatron.inference import Generator
    from tropd_megatron.tokenizer import load_tokenizer, prompt_encoder
    from tropd_megatron.train import load_weights, run_model_configs

    tokenizer = load_tokenizer(base.tokenizer)
    test = load_problems(replace(base.data, path=f"{root}/held_out.jsonl"),
                         prompt_encoder(tokenizer, base.data.chat_template))
    budget = base.eval_max_new_tokens()
    scores = {}
    for what, model_config in zip(("student_before_test", "teacher_test"), run_model_configs(base)):
        spec = base.student if what.startswith("student") else base.teacher
        model = build_gpt(model_config, base.parallel, frozen=True)
        load_weights(spec.checkpoint, model, model_config, what.split("_")[0])
        generator = Generator(model, model_config, eos_id=tokenizer.eos_id, engine=base.rollout.engine,
                              max_request_tokens=base.data.max_prompt_tokens + budget)
        scores[what] = evaluate(generator, test, tokenizer.decode, max_new_tokens=budget, progress=False).avg_at_n
    return scores


def protocol_facts(root: str, base, task, command: str, trainer_eval: dict) -> dict:
    t, s = base.teacher.model, base.student.model
    count = lambda name: sum(1 for line in open(os.path.join(root, name)) if line.strip())  # noqa: E731
    return {"command": command, "compute": "2-process torchrun, TP = 2, on this project's 2-core CPU machine",
            "machine": machine(),
            "train_problems": count("prompts.jsonl"), "validation_problems": count("validation.jsonl"),
            "test_problems": count("held_out.jsonl"),
            "teacher": f"{t.num_layers} layers x {t.hidden_size}, {task.teacher_sft_steps} SFT steps",
            "student": f"{s.num_layers} layers x {s.hidden_size}, {task.student_sft_steps} SFT steps",
            "steps": base.schedule.steps,
            "prompts_per_step": base.schedule.prompts_per_step, "rollouts": base.rollout.rollouts_per_prompt,
            "topk": base.objective.tropd.topk, "eval_every": base.eval.every, **trainer_eval}


def add_study_arguments(parser: argparse.ArgumentParser, variants: dict, lrs, seeds) -> None:
    """--variants, --lrs, --seeds: which rows, the sweep, the seeds (shared with launch.smollm2)."""
    parser.add_argument("--variants", default=",".join(variants), help="comma-separated, of: %(default)s")
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in lrs), help="the sweep")
    parser.add_argument("--seeds", default=",".join(map(str, seeds)), help="at the chosen rate (first: the sweep's)")


def study_choices(parser: argparse.ArgumentParser, args, variants: dict) -> tuple[list, tuple, tuple]:
    """(rows, rates, seeds) from ``add_study_arguments``' options; exit 2 naming a bad one."""
    rows = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in rows if v not in variants]
    if unknown:
        parser.exit(2, f"error: unknown variants {unknown}; choose from {', '.join(variants)}\n")
    try:
        return rows, tuple(float(x) for x in args.lrs.split(",")), tuple(int(x) for x in args.seeds.split(","))
    except ValueError as e:
        parser.exit(2, f"error: --lrs / --seeds: {e}\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/demo", help="the demo's task files and models")
    add_study_arguments(parser, VARIANTS, LEARNING_RATES, SEEDS)
    parser.add_argument("--phase", choices=("all", "sweep", "report"), default="all",
                        help="sweep: only the learning-rate runs; report: no runs, the report of the recorded rows")
    parser.add_argument("--no-extra-seeds", action="store_true",
                        help=f"skip the decision rule's extra seeds ({EXTRA_SEEDS})")
    parser.add_argument("--out", default="docs/compare", help="writes the report OUT.md and its curves OUT.png")
    parser.add_argument("--state", help="every finished run's record, read to resume (default: "
                                        "results/<the --out file name>.json)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=TASK_HELP + "; for every run")
    args = parser.parse_args(argv)
    variants, lrs, seeds = study_choices(parser, args, VARIANTS)
    try:
        base, task = tiny_configs(args.root, args.overrides)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    path = args.state or os.path.join("results", os.path.basename(args.out) + ".json")
    data = json.load(open(path)) if os.path.exists(path) else {}
    data.setdefault("runs", {})
    if args.phase == "report":  # every recorded row of the chosen ones, from the state alone
        recorded = [v for v in variants if any(r["variant"] == v for r in data["runs"].values())]
        if not recorded:
            parser.exit(2, f"error: {path} holds no run of {', '.join(variants)}\n" if os.path.exists(path)
                        else f"error: no state file {path} (--state)\n")
        print(report(data, args.out, recorded, lrs, seeds, args.root), flush=True)
        return
    if "protocol" in data and data["protocol"].get("machine") != machine():
        parser.exit(2, f"error: {path} holds runs made on {data['protocol'].get('machine', 'an unrecorded machine')}, "
                       f"this is {machine()}: runs from two machines (or kernel pins: `make compare` sets them) do not "
                       "compare; pass --state and --out for this machine's own comparison\n")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    initialize(base.parallel, seed=0)
    prepare(base, task)
    if "protocol" not in data:  # the models before training, on the test set (read by the report only)
        # the settings that make the runs, not which of them one sitting did (--variants, --phase ...)
        given = [f"--{name} {getattr(args, name)}" for name in ("root", "out", "state", "lrs", "seeds")
                 if getattr(args, name) != parser.get_default(name)] + args.overrides
        command = "make compare" + (f' ARGS="{" ".join(given)}"' if given else "")
        data["protocol"] = protocol_facts(args.root, base, task, command, before_training(args.root, base))
    todo = [(v, lr, seeds[0]) for v in variants for lr in lrs]
    while True:
        for v, lr, seed in todo:
            if run_key(v, lr, seed) in data["runs"]:
                continue
            logger.info(f"== {v}, lr {lr:g}, seed {seed} ({len(data['runs'])} runs done)")
            record = run_one(args.root, v, lr, seed, args.overrides)
            data["runs"][record["key"]] = record
            if logging_rank():
                save(path, data)
        if args.phase == "sweep":
            break
        more = [(v, chosen_lr(data["runs"], v, lrs), s) for v in variants
                for s in seeds[1:] + (() if args.no_extra_seeds else EXTRA_SEEDS.get(v, ()))]
        more = [t for t in more if t[1] is not None and run_key(*t) not in data["runs"]]
        if not more:
            break
        todo = more
    if logging_rank():
        save(path, data)
        print(report(data, args.out, variants, lrs, seeds, args.root), flush=True)
    dist.barrier()


if __name__ == "__main__":
    sys.exit(run_main(main))
