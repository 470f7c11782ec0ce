"""A shortened `make compare`: two objectives, a two-rate sweep, two seeds at the chosen rate,
on tiny budgets: the tables (sweep with the choice marked, test mean ± sd with a 95% interval,
response length and stopped fraction, the ablation chain), the curves and every record; a
second call trains nothing again."""
import json
import os
import subprocess
import sys

import pytest

from support.distributed import free_port
from support import REPO

pytest.importorskip("megatron.core")
ROOT = REPO


def run_compare(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "launch.compare", "--root", str(tmp_path / "demo"), "--out", str(tmp_path / "compare"),
           "--state", str(tmp_path / "compare.json"), "--lrs", "1e-3,3e-3", "--seeds", "0,1", "--variants",
           "OPD,TrOPD mask", "task.teacher_sft_steps=4",
           "task.student_sft_steps=2", "task.train_problems=300", "task.eval_problems=8",
           "task.validation_problems=6", "schedule.steps=3", "eval.every=1", "rollout.sampling.max_new_tokens=12",
           "eval.max_new_tokens=12"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=500,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.timeout(900)
def test_shortened_compare_follows_the_protocol_and_resumes(tmp_path):
    first = run_compare(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    data = json.loads((tmp_path / "compare.json").read_text())
    runs = data["runs"]
    # the sweep (2 rates x seed 0) and the second seed at each objective's chosen rate
    assert sorted((r["variant"], r["seed"]) for r in runs.values()) == [("OPD", 0), ("OPD", 0), ("OPD", 1),
                                                                       ("TrOPD mask", 0), ("TrOPD mask", 0),
                                                                       ("TrOPD mask", 1)]
    from launch.compare import chosen_lr, selection_score

    for variant in ("OPD", "TrOPD mask"):
        sweep = {r["lr"]: r for r in runs.values() if r["variant"] == variant and r["seed"] == 0}
        best = chosen_lr(runs, variant, (1e-3, 3e-3))
        assert selection_score(sweep[best]) == max(selection_score(r) for r in sweep.values())
        assert [r["lr"] for r in runs.values() if r["variant"] == variant and r["seed"] == 1] == [best]
    for r in runs.values():
        assert [s for s, _ in r["validation"]] == [0, 1, 2, 3] and r["validation_problems"] == 6
        assert r["test_problems"] == 8 and 0 <= r["test"] <= 1 and r["response_length"] > 0
        assert r["teacher_entropy"] > 0  # the room the teacher leaves, a report line of its own
    assert data["protocol"]["validation_problems"] == 6 and data["protocol"]["test_problems"] == 8
    assert data["protocol"]["teacher"].endswith(", 4 SFT steps") and data["protocol"]["student"].endswith(", 2 SFT steps")
    from launch.compare import machine

    assert data["protocol"]["machine"] == machine() and "family" in machine()  # the CPU and kernel pins
    assert all(r["seconds"] > 0 for r in runs.values())
    # the settings are recorded, not which rows or phases a sitting chose
    command = data["protocol"]["command"]
    assert command.startswith('make compare ARGS="--root ') and "--variants" not in command
    assert "--lrs 1e-3,3e-3 --seeds 0,1 task.teacher_sft_steps=4" in command and f"--out {tmp_path / 'compare'} " in command
    table = (tmp_path / "compare.md").read_text()
    assert "| objective | lr 0.001 | lr 0.003 |" in table and table.count(" * |") == 2  # one choice a row
    rows = [line for line in table.splitlines() if line.startswith(("| OPD | 0", "| TrOPD mask | 0")) and "±" in line]
    assert len(rows) == 2 and all("[" in row for row in rows)  # mean ± sd and the 95% interval
    assert "| + trust-region mask | TrOPD mask |" in table and "47.72" in table
    assert "Teacher-prefix guidance:" not in table  # described only where its row is
    assert "Chosen at an end of the sweep, so a rate beyond it was not tried: OPD (" in table  # 2 rates: both ends
    assert "The teacher's mean entropy on the SFT student's samples (each run's first step, before any update): " in table
    assert "- Highest mean: " in table and "Intervals entirely above OPD's:" in table and "Compute: 6 runs" in table
    assert (tmp_path / "compare.png").stat().st_size > 1000
    second = run_compare(tmp_path)  # every run is on record: none is trained or even resumed
    assert second.returncode == 0, second.stderr[-3000:]
    assert "== " not in second.stderr and json.loads((tmp_path / "compare.json").read_text()) == data
    # the report of the recorded rows alone, from the state: no model, no process group
    from launch.compare import main

    main(["--phase", "report", "--variants", "OPD,TrOPD clip", "--lrs", "1e-3,3e-3", "--seeds", "0,1",
          "--state", str(tmp_path / "compare.json"), "--out", str(tmp_path / "opd")])
    alone = (tmp_path / "opd.md").read_text()
    assert not any(line.startswith(("| TrOPD clip |", "| TrOPD mask |")) for line in alone.splitlines())
    opd_rows = [[line for line in text.splitlines() if line.startswith("| OPD |")] for text in (alone, table)]
    assert opd_rows[0] == opd_rows[1] and len(opd_rows[0]) == 3  # sweep, test and ablation rows, as in the full report
    # a protocol change written into the state by hand is said in the protocol
    data["protocol"]["changes"] = ["3e-3 added once 1e-3 was seen"]
    (tmp_path / "compare.json").write_text(json.dumps(data))
    main(["--phase", "report", "--variants", "OPD", "--lrs", "1e-3,3e-3", "--seeds", "0,1",
          "--state", str(tmp_path / "compare.json"), "--out", str(tmp_path / "opd")])
    assert "- Changed after results were seen: 3e-3 added once 1e-3 was seen" in (tmp_path / "opd.md").read_text()


NEW_ROWS = ("exact reverse KL", "dense forward KL", "top-k forward KL", "OPD + top-k forward KL",
            "TrOPD fkl (random mask)")


@pytest.mark.timeout(900)
def test_the_rows_of_what_other_frameworks_ship_and_the_control_run_through_the_protocol(tmp_path):
    """One sweep run of each added row on tiny budgets: each trains its own objective (the
    trust fraction tells them apart: 1 for the dense rows; 0 when every token takes the
    forward-KL term, where OPD's policy gradient on top changes the first step's loss on the
    same rollouts; strictly between for the random mask)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "launch.compare", "--root", str(tmp_path / "demo"), "--out", str(tmp_path / "compare"),
           "--state", str(tmp_path / "compare.json"), "--lrs", "1e-3", "--seeds", "0", "--phase", "sweep",
           "--variants", ",".join(NEW_ROWS),
           "task.teacher_sft_steps=4", "task.student_sft_steps=2", "task.train_problems=300", "task.eval_problems=8",
           "task.validation_problems=6", "schedule.steps=2", "eval.every=1", "rollout.sampling.max_new_tokens=12",
           "eval.max_new_tokens=12"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=800,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads((tmp_path / "compare.json").read_text())["runs"]
    assert sorted(r["variant"] for r in runs.values()) == sorted(NEW_ROWS)
    from tropd_megatron.logs import read_metrics

    trust, loss = {}, {}
    for r in runs.values():
        assert [s for s, _ in r["validation"]] == [0, 1, 2]
        steps = list(read_metrics(str(tmp_path / "demo" / "compare" / r["key"])).values())
        trust[r["variant"]] = [m["trust_fraction"] for m in steps]
        loss[r["variant"]] = steps[0]["loss"]
    assert trust["exact reverse KL"] == trust["dense forward KL"] == [1.0, 1.0]
    assert trust["top-k forward KL"] == trust["OPD + top-k forward KL"] == [0.0, 0.0]
    assert abs(loss["top-k forward KL"] - loss["OPD + top-k forward KL"]) > 1e-3
    assert all(0 < t < 1 for t in trust["TrOPD fkl (random mask)"])


def test_paired_differences_and_the_rule_outcome():
    from launch.compare import PAIRED, paired_lines, run_key

    row, other = PAIRED[0]
    tests = {row: [0.40, 0.38, 0.41], other: [0.30, 0.31, 0.29]}
    runs = {run_key(v, 1e-3, s): {"variant": v, "lr": 1e-3, "seed": s, "test": x}
            for v, xs in tests.items() for s, x in enumerate(xs)}
    lines = paired_lines(runs, {row: 1e-3, other: 1e-3}, [row, other])
    assert any(f"| {row} − {other} | 0, 1, 2 | +0.100, +0.070, +0.120 | +0.097 |" in line and f"{row} ahead" in line
               for line in lines)
    runs[run_key(other, 1e-3, 1)]["test"] = 0.45  # one seed the other way: the interval spans 0
    assert any("no difference shown" in line for line in paired_lines(runs, {row: 1e-3, other: 1e-3}, [row, other]))
    assert paired_lines(runs, {row: 1e-3, other: None}, [row, other]) == []  # a sweep not finished


def test_a_state_from_another_machine_is_refused_before_anything_is_built(tmp_path):
    """Float rounding differs by CPU model and kernel pin (docs/results.md): runs made elsewhere
    must not be resumed, paired or tabled with this machine's."""
    from launch.compare import main

    state = tmp_path / "compare.json"
    state.write_text(json.dumps({"runs": {}, "protocol": {"machine": "Some other CPU (family 1 model 2), kernels x"}}))
    with pytest.raises(SystemExit) as exit_:
        main(["--root", str(tmp_path / "demo"), "--state", str(state), "--out", str(tmp_path / "compare")])
    assert exit_.value.code == 2 and not (tmp_path / "demo").exists()


def test_the_rule_is_stated_with_the_extra_seeds_on_record():
    from launch.compare import DECISION_RULE, rule_lines, run_key

    runs = {run_key("TrOPD fkl", 1e-3, s): {} for s in (0, 1, 2, 3, 4)}
    chosen = {"TrOPD fkl": 1e-3, "top-k forward KL": 1e-3, "OPD": 1e-3}
    lines = rule_lines(runs, chosen, ["TrOPD fkl", "top-k forward KL"])
    assert lines == ["- Extra seeds at the chosen rate for the rows the decision rule compares most closely: "
                     "3, 4 also for TrOPD fkl. " + DECISION_RULE]
    assert rule_lines({}, chosen, ["TrOPD fkl", "top-k forward KL"]) == ["- " + DECISION_RULE]  # none run (yet)
    assert rule_lines(runs, chosen, ["TrOPD fkl", "OPD"]) == []  # no pair of the rule among the rows
    assert rule_lines(runs, chosen, ["exact reverse KL", "OPD"]) == []  # a pair reported, not one of the rule's
