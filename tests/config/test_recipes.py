"""Recipes build typed configurations; overrides are typed and checked; a resumed run with
other settings is detected key by key."""
import pytest

from recipes import RECIPES, get_recipe
from tropd_megatron.losses import TrOPDConfig
from tropd_megatron.run_config import apply_overrides, flatten, leaf_keys, resume_conflicts, to_yaml
from support import REPO


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds_a_consistent_configuration(name):
    cfg = get_recipe(name)
    assert cfg.name == name
    assert cfg.teacher.model.vocab_size == cfg.student.model.vocab_size  # one tokenizer
    for model in (cfg.teacher.model, cfg.student.model):
        cfg.parallel.check(cfg.parallel.tensor * cfg.parallel.pipeline, model)  # the layout divides both models
    assert isinstance(cfg.objective.selected(), TrOPDConfig)
    assert get_recipe(name, [f"{k}={v}" for k, v in flatten(cfg).items() if isinstance(v, int)
                             and not isinstance(v, bool)]) == cfg  # re-applying its own values changes nothing


def test_overrides_are_typed_and_reach_nested_settings():
    cfg = get_recipe("llama3_70b_to_8b", ["schedule.steps=3", "objective.name=eopd", "objective.eopd.alpha=0.5",
                                          "rollout.sampling.temperature=0.7", "student.checkpoint=null"])
    assert cfg.schedule.steps == 3 and cfg.objective.selected().alpha == 0.5
    assert cfg.rollout.sampling.temperature == 0.7 and cfg.student.checkpoint is None
    assert get_recipe("llama3_70b_to_8b").schedule.steps == 200  # the recipe itself is untouched


@pytest.mark.parametrize("override, message", [
    ("schedule.stepz=3", "unknown override key 'schedule.stepz'; valid keys under schedule: schedule.steps, "
                         "schedule.prompts_per_step, schedule.seed"),
    ("objective.tropd.outlier=bogus", "TrOPDConfig.outlier='bogus'; expected one of ('clip', 'mask', 'fkl')"),
    ("objective.name=ppo", "objective.name='ppo'"),
    ("schedule.steps=abc", "override rejected: schedule.steps"),
    ("teacher.model.dtype=fp8", "ModelConfig.dtype='fp8'"),
    ("rollout.sampling.top_p=0", "SamplingConfig.top_p=0.0"),
    ("schedule.steps", "is not key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError) as e:
        get_recipe("tiny", [override])
    assert message in str(e.value)


def test_unknown_recipe():
    available = "llama3_70b_to_8b, qwen3_8b_to_1p7b, smollm2_prune_distill, tiny"
    with pytest.raises(ValueError, match=f"unknown recipe 'x'; available: {available}"):
        get_recipe("x")


MY_RECIPES = """
from dataclasses import replace

from recipes.tiny import tiny


def short_tiny():
    return replace(tiny(), name="short_tiny", schedule=replace(tiny().schedule, steps=7))


def not_a_recipe():
    return {"name": "x"}
"""


@pytest.fixture
def my_recipes(tmp_path, monkeypatch):
    """A user's recipe module, as a file and importable as my_pkg.my_recipes."""
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "my_recipes.py").write_text(MY_RECIPES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_recipe_of_your_own_from_a_module_or_a_file(my_recipes):
    for spec in ("my_pkg.my_recipes:short_tiny", f"{my_recipes}/my_pkg/my_recipes.py:short_tiny"):
        cfg = get_recipe(spec, ["optim.lr=0.5"])
        assert cfg.name == "short_tiny" and cfg.schedule.steps == 7 and cfg.optim.lr == 0.5


@pytest.mark.parametrize("spec, message", [
    ("my_pkg.my_recipes:nope", "recipe 'my_pkg.my_recipes:nope': my_pkg.my_recipes has no function 'nope' "
                               "(its functions: not_a_recipe, short_tiny)"),
    ("my_pkg.missing:run", "recipe 'my_pkg.missing:run': cannot import 'my_pkg.missing' (is its folder on PYTHONPATH?"),
    ("/nonexistent/r.py:run", "recipe '/nonexistent/r.py:run': no such file /nonexistent/r.py"),
    ("my_pkg.my_recipes:not_a_recipe", "recipe 'my_pkg.my_recipes:not_a_recipe' returned dict, not a RunConfig"),
])
def test_a_bad_recipe_of_your_own_is_named(my_recipes, spec, message):
    with pytest.raises(ValueError) as e:
        get_recipe(spec)
    assert message in str(e.value)


@pytest.mark.timeout(120)
def test_every_launcher_takes_a_recipe_of_your_own(my_recipes, tmp_path):
    """launch.train and launch.plan (a module on PYTHONPATH, a file), launch.nemo's Slurm job
    script (the file's path made absolute, for a job that starts elsewhere); launch.export and
    launch.evaluate run one in test_hf_train, slurm/tropd_70b.sh in test_slurm."""
    import os
    import subprocess
    import sys

    repo = REPO
    env = {**os.environ, "PYTHONPATH": str(my_recipes), "NEMORUN_HOME": str(tmp_path / "nemo")}
    file_spec = os.path.relpath(my_recipes / "my_pkg" / "my_recipes.py", repo) + ":short_tiny"
    for argv in (["launch.train", "--recipe", "my_pkg.my_recipes:short_tiny", "--print-config"],
                 ["launch.train", "--recipe", file_spec, "--print-config"],
                 ["launch.plan", "--recipe", file_spec]):
        out = subprocess.run([sys.executable, "-m", *argv], cwd=repo, env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "short_tiny" in out.stdout, out.stdout[-2000:]
    pytest.importorskip("nemo_run")
    out = subprocess.run([sys.executable, "-m", "launch.nemo", "--recipe", file_spec, "--executor", "slurm",
                          "--dryrun"], cwd=repo, env=env, capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr[-2000:]
    script = next(line.split(": ", 1)[1] for line in out.stdout.splitlines() if line.startswith("sbatch script: "))
    assert f"--recipe {my_recipes}/my_pkg/my_recipes.py:short_tiny" in open(script).read()


def test_resume_conflicts_ignore_logging_and_eval_but_not_training_settings():
    saved = flatten(get_recipe("tiny"))
    assert resume_conflicts(saved, get_recipe("tiny", ["eval.every=5", "logging.log_every=3",
                                                       "checkpoint.save_every=7", "parallel.tensor=1",
                                                       "teacher.checkpoint=/moved/teacher"])) == []
    older = {k: v for k, v in saved.items() if k != "rollout.engine.block_size_tokens"}  # a key added since
    assert resume_conflicts(older, get_recipe("tiny")) == []
    conflicts = resume_conflicts(saved, get_recipe("tiny", ["optim.lr=0.1", "objective.tropd.topk=8"]))
    assert conflicts == ["objective.tropd.topk: checkpoint 16, now 8", "optim.lr: checkpoint 0.001, now 0.1"]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_yaml_written_beside_a_run_is_the_configuration(name):
    """config.yaml (what --print-config prints) read back gives the same RunConfig, every key."""
    from omegaconf import OmegaConf

    from tropd_megatron.run_config import RunConfig

    cfg = get_recipe(name)
    back = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(to_yaml(cfg))))
    assert back == cfg and flatten(back) == flatten(cfg) and len(flatten(cfg)) == len(leaf_keys(cfg))
    assert apply_overrides(cfg, []) == cfg


@pytest.mark.timeout(120)
def test_the_installed_launchers_run_from_any_directory(tmp_path):
    """setup.py installs launch and recipes beside the library: `python -m launch.plan` runs
    from a folder outside the checkout, with nothing on PYTHONPATH."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-m", "launch.plan", "--recipe", "llama3_70b_to_8b", "--gpus", "32"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fits:" in out.stdout


def test_one_run_seed_sets_every_stream_unless_overridden():
    """schedule.seed is the run's seed: the data order and the trust mask follow it, and an
    explicit data.seed / objective.tropd.seed overrides it for that stream only."""
    seeded = get_recipe("tiny", ["schedule.seed=5"]).seeded()
    assert (seeded.data.seed, seeded.objective.tropd.seed) == (5, 5)
    own = get_recipe("tiny", ["schedule.seed=5", "data.seed=2"]).seeded()
    assert (own.data.seed, own.objective.tropd.seed, own.schedule.seed) == (2, 5, 5)
    assert get_recipe("tiny").seeded().data.seed == 0  # the default run: every seed 0, as before


def test_the_checkpointer_and_the_evaluator_own_their_cadence():
    from tropd_megatron.run_config import CheckpointConfig, EvalConfig

    assert [s for s in range(1, 11) if CheckpointConfig(save_every=4).due(s, 10)] == [4, 8, 10]
    assert [s for s in range(0, 11) if EvalConfig(path="x", every=3).due(s, 10)] == [0, 3, 6, 9, 10]
    assert [s for s in range(0, 11) if EvalConfig(path="x").due(s, 10)] == [0, 10]
    assert not any(EvalConfig().due(s, 10) for s in range(11))  # no problems file: never
