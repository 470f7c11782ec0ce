"""The training entry point (`launch.train`) on the tiny recipe: a short run leaves its
checkpoint, evaluation results, TensorBoard events and configuration; a signal mid-run
writes a checkpoint and exits 75; the next launch resumes from it and finishes; a resume
with other settings and bad overrides are refused with the key named."""
import json
import os
import signal
import subprocess
import sys

import pytest

from support.distributed import free_port
from support.runs import ENV, single_process
from support.tiny_files import make_tiny_files
from tropd_megatron.logs import read_metrics
from support.wandb_records import wandb_history
from support import REPO

pytest.importorskip("megatron.core")
ROOT = REPO


def torchrun(args, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "launch.train", "--recipe", "tiny", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=ENV, **kw)



@pytest.mark.timeout(300)
def test_two_steps_at_tp2_leave_checkpoint_eval_and_logs(tmp_path):
    overrides = make_tiny_files(tmp_path)
    out = torchrun([*overrides, "schedule.steps=2", "optim.spike_factor=10", "logging.wandb.project=tropd-test",
                    "logging.wandb.mode=offline"])
    assert out.returncode == 0, out.stderr[-3000:]
    # Weights & Biases, offline: one run (from the logging rank) holding every step's metrics
    # the train / rollout log-prob mismatch is logged (CPU: the engine's log-probs are the training forward's)
    first = read_metrics(tmp_path / "run")[1]
    assert first["rollout_log_ratio_abs"] < 1e-4 and first["rollout_clip_fraction"] == 0
    assert 0 < first["rollout_log_ratio_p99"] <= 1e-4
    assert first["kv_bytes"] > 0 and "memory_peak_gib" not in first  # the allocator's peak: GPU only
    wandb = wandb_history(tmp_path / "run")
    for step, record in read_metrics(tmp_path / "run").items():
        assert wandb[step]["train/loss"] == record["loss"] and wandb[step]["time/total"] == record["seconds"]["total"]
    assert "eval/avg@1" in wandb[0] and "eval/avg@1" in wandb[2]
    assert (tmp_path / "run" / "latest").read_text() == "step_00000002"
    trainer_state = json.loads((tmp_path / "run" / "step_00000002" / "checkpoint.json").read_text())["trainer"]
    assert len(trainer_state["spike_norms"]) == 2  # the spike guard's history resumes with the run
    assert list(read_metrics(tmp_path / "run")) == [1, 2]
    for step in (0, 2):
        lines = (tmp_path / "run" / "eval" / f"step_{step:08d}.jsonl").read_text().splitlines()
        assert len(lines) == 8  # every held-out problem, gathered (both TP ranks generate them; rank 0 writes)
    assert "objective:\n  name: tropd" in (tmp_path / "run" / "config.yaml").read_text()
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tensorboard"))
    # avg@n of the trained student from the run's latest checkpoint (saved at TP = 2, read at TP = 1)
    env = {**ENV, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    ev = subprocess.run([sys.executable, "-m", "launch.evaluate", "--recipe", "tiny", "--problems",
                         str(tmp_path / "held_out.jsonl"), "--samples", "2", "--results", str(tmp_path / "avg2.jsonl"),
                         *overrides, "parallel.tensor=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert ev.returncode == 0, ev.stderr[-3000:]
    summary = json.loads(ev.stdout.strip().splitlines()[-1])
    assert summary["weights"].endswith("run/step_00000002") and summary["problems"] == 8 and summary["n"] == 2
    rows = [json.loads(line) for line in (tmp_path / "avg2.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(len(r["samples"]) == 2 for r in rows)
    assert summary["avg_at_n"] == sum(r["score"] for r in rows) / 8
    # the same directory with another objective: refused, naming the differing key, nothing written
    again = torchrun([*overrides, "schedule.steps=2", "objective.name=opd"])
    assert again.returncode != 0 and "objective.name: checkpoint 'tropd', now 'opd'" in again.stderr
    assert (tmp_path / "run" / "latest").read_text() == "step_00000002"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_exits_75_and_the_next_launch_resumes(tmp_path, signum):
    overrides = make_tiny_files(tmp_path) + ["schedule.steps=40", "checkpoint.save_every=1000", "eval.path=null"]
    proc = single_process(overrides)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 2/40"):
            proc.send_signal(signum)
            break
    rest, _ = proc.communicate(timeout=120)
    log = "".join(seen) + rest
    assert proc.returncode == 75, log[-3000:]
    saved = (tmp_path / "run" / "latest").read_text()
    step = int(saved.split("_")[1])
    # the bound: step 2 when the signal beat the ranks' check after it, else the step under way (3)
    assert step in (2, 3) and f"checkpoint at step {step} written" in log
    resumed = single_process(overrides)
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out[-3000:]
    # the first launch recorded steps 1..step, the second step + 1..40: nothing trained twice
    steps = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert steps == list(range(1, 41))
    assert (tmp_path / "run" / "latest").read_text() == "step_00000040"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("override, message", [
    ("schedule.stepz=2", "unknown override key 'schedule.stepz'; valid keys under schedule: schedule.steps"),
    ("objective.tropd.outlier=bogus", "TrOPDConfig.outlier='bogus'"),
    ("schedule.steps=two", "schedule.steps"),
    ("steps", "is not key=value"),
])
def test_bad_overrides_are_refused_before_anything_runs(override, message):
    out = subprocess.run([sys.executable, "-m", "launch.train", "--recipe", "tiny", override, "--print-config"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, env=ENV)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]


def test_unknown_recipe_lists_the_known_ones():
    out = subprocess.run([sys.executable, "-m", "launch.train", "--recipe", "nope", "--print-config"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, env=ENV)
    available = "llama3_70b_to_8b, qwen3_8b_to_1p7b, smollm2_prune_distill, tiny"
    assert out.returncode == 2 and f"unknown recipe 'nope'; available: {available}" in out.stderr


@pytest.mark.timeout(120)
def test_missing_files_exit_2_naming_them(tmp_path):
    overrides = make_tiny_files(tmp_path)
    for bad, message in (("tokenizer=/nonexistent/tok.model", "tokenizer /nonexistent/tok.model: no such file"),
                         ("teacher.checkpoint=/nonexistent/ckpt", "teacher.checkpoint=/nonexistent/ckpt: no such")):
        proc = single_process([*overrides, bad])
        out, _ = proc.communicate(timeout=100)
        assert proc.returncode == 2 and message in out, out[-2000:]


@pytest.mark.timeout(200)
def test_a_corrupt_checkpoint_is_named_not_loaded(tmp_path):
    overrides = make_tiny_files(tmp_path) + ["schedule.steps=1", "eval.path=null"]
    first = single_process(overrides)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out[-2000:]
    shard = sorted((tmp_path / "run" / "step_00000001").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a full disk or a bad copy
    again = single_process(overrides)
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 2, out[-2000:]
    assert f"{tmp_path}/run/step_00000001: unreadable checkpoint (EOFError" in out
    assert f"point {tmp_path}/run/latest at an earlier step_* folder" in out


def test_a_bug_keeps_its_traceback():
    """The entry points exit 2 on bad configuration or input (ConfigError, a missing file), 1
    on a RunError; any other error, such as a ValueError from a broken invariant, propagates
    with its traceback instead of reading as bad input."""
    import pytest

    from launch import run_main
    from tropd_megatron import ConfigError, RunError

    def raising(error):
        def main(argv):
            raise error
        return main

    assert run_main(raising(ConfigError("schedule.steps=0 must be >= 1"))) == 2
    assert run_main(raising(FileNotFoundError("data.path=x.jsonl: no such file"))) == 2
    assert run_main(raising(RunError("the loss is NaN"))) == 1
    assert run_main(lambda argv: None) == 0
    with pytest.raises(ValueError, match="an internal invariant"):
        run_main(raising(ValueError("an internal invariant")))


def test_the_trainer_state_and_the_checkpoint_are_one_schema():
    """What ``Trainer.save`` writes is what a resume reads, the step included (kept once, in
    the checkpoint's own field); a checkpoint from before the schema (eval and skipped steps
    under "history", no step in the trainer entry) reads too."""
    from tropd_megatron.train import TrainerState

    state = TrainerState(step=7, data={"epoch": 1, "position": 3}, eval=[{"step": 0, "avg_at_n": 0.5}],
                         skipped_steps=[4], spike_norms=[1.0, 2.0], config={"schedule.steps": 9})
    entry = state.to_checkpoint()
    assert "step" not in entry
    assert TrainerState.from_checkpoint({"step": 7, "trainer": json.loads(json.dumps(entry))}) == state
    old = {"step": 3, "trainer": {"data": {}, "history": {"eval": [{"step": 0}], "skipped_steps": [2]}}}
    assert TrainerState.from_checkpoint(old) == TrainerState(step=3, eval=[{"step": 0}], skipped_steps=[2])
