"""Files for short runs of the ``tiny`` recipe: the task's prompts, held-out problems and
tokenizer under a folder, with random-weight models (no SFT: tests check plumbing)."""
from dataclasses import replace

from recipes.tiny import TEMPLATE
from tropd_megatron.tasks.tiny_task import TinyTaskConfig, training_split, write_task_files

SMALL = replace(TinyTaskConfig(), train_problems=300, eval_problems=8, validation_problems=8)


def make_tiny_files(root) -> list[str]:
    """Write the files under ``root``; the overrides that point the tiny recipe at them."""
    root = str(root)
    write_task_files(root, SMALL, TEMPLATE, training_split(SMALL))
    return [f"tokenizer={root}/tokenizer.model", f"data.path={root}/prompts.jsonl", f"eval.path={root}/held_out.jsonl",
            "teacher.checkpoint=null", "student.checkpoint=null", f"checkpoint.dir={root}/run",
            f"logging.tensorboard_dir={root}/tensorboard", "schedule.prompts_per_step=4", "rollout.rollouts_per_prompt=2",
            "rollout.micro_batch_size=4", "rollout.sampling.max_new_tokens=12", "eval.max_new_tokens=12",
            "logging.log_every=1"]
