"""Recipes build typed configurations; overrides are typed and checked; a resumed run with
other settings is detected key by key."""
import pytest

from recipes import RECIPES, get_recipe
from tropd_megatron.losses import TrOPDConfig
from tropd_megatron.run_config import apply_overrides, flatten, leaf_keys, resume_conflicts, to_yaml


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
    with pytest.raises(ValueError, match="unknown recipe 'x'; available: llama3_70b_to_8b, qwen3_8b_to_1p7b, tiny"):
        get_recipe("x")


def test_resume_conflicts_ignore_logging_and_eval_but_not_training_settings():
    saved = flatten(get_recipe("tiny"))
    assert resume_conflicts(saved, get_recipe("tiny", ["eval.every=5", "logging.log_every=3",
                                                       "checkpoint.save_every=7", "parallel.tensor=1",
                                                       "teacher.checkpoint=/moved/teacher"])) == []
    older = {k: v for k, v in saved.items() if k != "rollout.generation_batch_size"}  # a key added since
    assert resume_conflicts(older, get_recipe("tiny")) == []
    conflicts = resume_conflicts(saved, get_recipe("tiny", ["optim.lr=0.1", "objective.tropd.topk=8"]))
    assert conflicts == ["objective.tropd.topk: checkpoint 16, now 8", "optim.lr: checkpoint 0.001, now 0.1"]


def test_yaml_lists_every_key():
    cfg = get_recipe("qwen3_8b_to_1p7b")
    text = to_yaml(cfg)
    assert all(key.split(".")[-1] + ":" in text for key in leaf_keys(cfg))
    assert apply_overrides(cfg, []) == cfg
