"""launch.nemo: the NeMo-Run launcher, run as a subprocess with NeMo-Run's folders under tmp_path, and the
recipe as an editable NeMo-Run configuration (run.Config / run.Partial), built in this process.

Local runs start torchrun with 2 processes (about a minute each on a busy 2-core machine); the Slurm
tests are dry runs (no Slurm installation needed)."""
import os
import subprocess
import sys

import pytest

from support.tiny_files import make_tiny_files
from support import REPO

pytest.importorskip("nemo_run")

REPO = REPO


def launch_nemo(tmp_path, *argv, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1", NEMORUN_HOME=str(tmp_path / "nemo_run"))
    return subprocess.run([sys.executable, "-m", "launch.nemo", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def local_tiny(tmp_path, *extra):
    overrides = make_tiny_files(tmp_path / "task")
    return launch_nemo(tmp_path, "--recipe", "tiny", "--executor", "local", "--nproc-per-node", "2", *overrides,
                       "schedule.steps=2", *extra, timeout=420)


@pytest.mark.timeout(480)
def test_local_executor_runs_tiny_recipe(tmp_path):
    result = local_tiny(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "task" / "run" / "latest").read_text() == "step_00000002"
    assert "succeeded" in result.stdout


@pytest.mark.timeout(480)
def test_failed_job_is_reported(tmp_path):
    # passes validation (any path is a valid string), fails inside the job
    result = local_tiny(tmp_path, "tokenizer=/nonexistent/tok.model")
    assert result.returncode != 0, result.stdout[-3000:]
    assert "ended FAILED" in result.stderr
    assert str(tmp_path / "nemo_run") in result.stderr  # where its logs are


@pytest.mark.timeout(180)
def test_slurm_dryrun_writes_sbatch_script(tmp_path):
    result = launch_nemo(tmp_path, "--recipe", "llama3_70b_to_8b", "--executor", "slurm", "--nodes", "2",
                         "--account", "acct", "--partition", "batch", "--dryrun", "schedule.steps=50",
                         "optim.lr=1e-6", timeout=150)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    path = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("sbatch script: ")][0]
    assert path.startswith(str(tmp_path))
    script = open(path).read()
    for expected in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                     "#SBATCH --account=acct", "#SBATCH --partition=batch", "torchrun", "--nnodes 2",
                     "--nproc-per-node 8", "-m launch.train", "--recipe llama3_70b_to_8b", "schedule.steps=50",
                     "optim.lr=1e-6"):
        assert expected in script, f"{expected!r} not in\n{script}"


@pytest.mark.timeout(120)
def test_bad_override_key_exits_2_before_launching(tmp_path):
    result = launch_nemo(tmp_path, "--recipe", "tiny", "--executor", "local", "schedule.stepz=2", timeout=100)
    assert result.returncode == 2
    assert "schedule.stepz" in result.stderr
    assert not (tmp_path / "nemo_run").exists()  # no experiment was created


# ---- the recipe as an editable NeMo-Run configuration (--task partial, launch.nemo.recipe_partial) ----------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("recipe", ["tiny", "llama3_70b_to_8b", "qwen3_8b_to_1p7b"])
def test_recipe_as_run_config_builds_back_to_the_same_run_config(recipe):
    import fiddle as fdl
    import nemo_run as run
    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

    from launch.nemo import recipe_config, recipe_partial, train
    from recipes import get_recipe
    from tropd_megatron.run_config import RunConfig, TeacherSpec, flatten

    original = get_recipe(recipe)
    config = recipe_config(recipe)
    assert isinstance(config, run.Config) and config.__fn_or_cls__ is RunConfig
    assert isinstance(config.teacher, run.Config) and isinstance(config.teacher.parallel, run.Config)  # nested
    built = fdl.build(config)
    assert isinstance(built, RunConfig) and isinstance(built.teacher, TeacherSpec)
    assert flatten(built) == flatten(original)

    task = recipe_partial(recipe)
    assert isinstance(task, run.Partial) and task.__fn_or_cls__ is train
    # what the job receives: the serialized Partial, deserialized and built by NeMo-Run's runner
    received = fdl.build(ZlibJSONSerializer().deserialize(ZlibJSONSerializer().serialize(task)))
    assert received.func is train and flatten(received.keywords["cfg"]) == flatten(original)


@pytest.mark.timeout(120)
def test_a_plain_model_spec_teacher_builds_to_a_teacher_spec():
    import fiddle as fdl
    import nemo_run as run

    from launch.nemo import recipe_config
    from recipes import get_recipe
    from tropd_megatron.run_config import ModelSpec, TeacherSpec, flatten

    config = recipe_config("tiny")
    config.teacher = run.Config(ModelSpec, model=config.teacher.model, checkpoint=config.teacher.checkpoint)
    built = fdl.build(config)  # RunConfig.__post_init__ turns it into a TeacherSpec on the student's layout
    assert type(built.teacher) is TeacherSpec
    assert flatten(built) == flatten(get_recipe("tiny"))


@pytest.mark.timeout(120)
def test_nemo_run_overrides_and_edits_change_the_keys(tmp_path):
    import fiddle as fdl

    from launch.nemo import check, recipe_partial
    from recipes import get_recipe
    from tropd_megatron.run_config import flatten

    files = make_tiny_files(tmp_path)  # OmegaConf overrides, also NeMo-Run's syntax (null, paths)
    task = recipe_partial("tiny", [*files, "schedule.steps=3", "cfg.optim.lr*=2", "rollout.rollouts_per_prompt+=1"])
    expected = get_recipe("tiny", [*files, "schedule.steps=3"])
    built = fdl.build(task.cfg)
    assert built.schedule.steps == 3 and built.optim.lr == 2 * expected.optim.lr
    assert built.rollout.rollouts_per_prompt == expected.rollout.rollouts_per_prompt + 1
    assert built.teacher.checkpoint is None and built.tokenizer == f"{tmp_path}/tokenizer.model"
    changed = {k for k, v in flatten(built).items() if v != flatten(expected)[k]}
    assert changed == {"optim.lr", "rollout.rollouts_per_prompt"}

    sweep = task.clone()  # edited like any run.Config; the original is untouched
    sweep.cfg.schedule.steps = 5
    sweep.cfg.objective.name = "opd"
    assert fdl.build(sweep.cfg).schedule.steps == 5 and fdl.build(task.cfg).schedule.steps == 3
    assert check(sweep, world=2).objective.name == "opd"

    with pytest.raises(ValueError, match="unknown override key 'schedule.stepz'; valid keys under schedule: "
                                         "schedule.steps, "):
        recipe_partial("tiny", ["schedule.stepz=2"])
    with pytest.raises(ValueError, match="override 'schedule.steps=abc'"):
        recipe_partial("tiny", ["schedule.steps=abc"])
    sweep.cfg.parallel.tensor = 3  # built fine, refused by the layout check the job and the launcher run
    with pytest.raises(ValueError):
        check(sweep, world=2)


@pytest.mark.timeout(480)
def test_local_executor_runs_tiny_recipe_as_a_partial(tmp_path):
    # schedule.steps=1 then NeMo-Run's += : 2 steps, through NeMo-Run's runner (a serialized run.Partial)
    result = local_tiny(tmp_path, "--task", "partial", "schedule.steps=1", "cfg.schedule.steps+=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "task" / "run" / "latest").read_text() == "step_00000002"
    assert "succeeded" in result.stdout
    [config] = (tmp_path / "nemo_run").glob("experiments/tropd-tiny/*/train/configs/train_config.yaml")
    text = config.read_text()
    assert "_target_: launch.nemo.train" in text and "_target_: tropd_megatron.run_config.RunConfig" in text


@pytest.mark.timeout(480)
def test_failed_partial_job_is_reported(tmp_path):
    # the entry point's exit code comes back through NeMo-Run's runner and torchrun
    result = local_tiny(tmp_path, "--task", "partial", "tokenizer=/nonexistent/tok.model")
    assert result.returncode != 0, result.stdout[-3000:]
    assert "ended FAILED" in result.stderr
    assert str(tmp_path / "nemo_run") in result.stderr


@pytest.mark.timeout(180)
def test_slurm_dryrun_of_a_partial_ships_the_resolved_config(tmp_path):
    import fiddle as fdl
    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

    from launch.nemo import train

    result = launch_nemo(tmp_path, "--recipe", "llama3_70b_to_8b", "--executor", "slurm", "--nodes", "2",
                         "--account", "acct", "--partition", "batch", "--dryrun", "--task", "partial",
                         "schedule.steps=50", "optim.lr=1e-6", timeout=150)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    path = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("sbatch script: ")][0]
    script = open(path).read()
    for expected in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "torchrun", "--nnodes 2",
                     "--nproc-per-node 8", "-m nemo_run.core.runners.fdl_runner"):
        assert expected in script, f"{expected!r} not in\n{script}"
    serialized = script.split("fdl_runner -n train ", 1)[1].split()[0]  # the config file the job reads
    assert serialized.startswith(str(tmp_path))
    task = fdl.build(ZlibJSONSerializer().deserialize(open(serialized).read()))
    assert task.func is train
    assert task.keywords["cfg"].schedule.steps == 50 and task.keywords["cfg"].optim.lr == 1e-6


@pytest.mark.timeout(120)
def test_bad_nemo_run_override_exits_2_before_launching(tmp_path):
    result = launch_nemo(tmp_path, "--recipe", "tiny", "--executor", "local", "--task", "partial",
                         "cfg.schedule.stepz=2", timeout=100)
    assert result.returncode == 2
    assert "unknown override key 'schedule.stepz'" in result.stderr
    assert not (tmp_path / "nemo_run").exists()  # no experiment was created
