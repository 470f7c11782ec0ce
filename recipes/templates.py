"""What the GPU recipes share: the TrOPD paper's schedule on Hugging Face checkpoints.

A recipe calls ``paper_run_config`` with what differs (models, folders, layout, budgets) and
gets the rest: 200 steps of 128 prompts x 4 rollouts, lr 5e-6 with 10 warmup steps, the
tokenizer's chat template, teacher-prefix guidance on half the rollouts at first (256 tokens,
decaying linearly to none), the dynamic engine with every rollout of a rank in flight, packed
micro-batches of one row, sequence parallelism, the distributed optimizer, a gradient-norm
spike guard, a checkpoint every 10 steps (the last 3 kept), avg@4 evaluation at temperature 0.6,
and the truncated importance weight for the rollouts' log-probs (``importance="tis"``: the
rollouts are fresh, one update each, and only the inference kernels differ from training's).
"""
from tropd_megatron.data import PromptDataConfig
from tropd_megatron.losses import EOPDConfig, OPDConfig, REOPOLDConfig, TrOPDConfig
from tropd_megatron.config.model import ModelConfig, OptimConfig, ParallelConfig, TeacherParallelConfig
from tropd_megatron.config.rollout import EngineConfig, RolloutConfig, SamplingConfig
from tropd_megatron.run_config import (CheckpointConfig, EvalConfig, LoggingConfig, ModelSpec, ObjectiveChoice,
                                       RunConfig, ScheduleConfig, TeacherSpec)


def paper_run_config(*, name: str, root: str, teacher: ModelConfig, teacher_folder: str, student: ModelConfig,
                   student_folder: str, prompts: str, tensor: int, teacher_tensor: int | None, max_new_tokens: int,
                   kv_cache_gib: float, gpu: str = "H100-80GB") -> RunConfig:
    """The run ``name`` with its files under ``root`` (the student's folder holds its
    tokenizer): the student at ``tensor`` (x data parallel), the teacher at ``teacher_tensor``
    (None: the student's)."""
    return RunConfig(
        name=name,
        tokenizer=f"{root}/{student_folder}",
        teacher=TeacherSpec(teacher, checkpoint=f"{root}/{teacher_folder}",
                            parallel=TeacherParallelConfig(tensor=teacher_tensor)),
        student=ModelSpec(student, checkpoint=f"{root}/{student_folder}"),
        data=PromptDataConfig(f"{root}/data/{prompts}", chat_template="tokenizer", max_prompt_tokens=1024),
        parallel=ParallelConfig(tensor=tensor, sequence_parallel=True),
        rollout=RolloutConfig(SamplingConfig(max_new_tokens=max_new_tokens), rollouts_per_prompt=4,
                              micro_batch_size=1, engine=EngineConfig(max_requests=128, kv_cache_gib=kv_cache_gib),
                              prefix_share_start=0.5, prefix_tokens_start=256),
        objective=ObjectiveChoice(opd=OPDConfig(importance="tis"), eopd=EOPDConfig(importance="tis"),
                                  reopold=REOPOLDConfig(importance="tis"), tropd=TrOPDConfig(importance="tis")),
        optim=OptimConfig(lr=5e-6, min_lr=5e-7, warmup_steps=10, weight_decay=0.01, spike_factor=10.0),
        schedule=ScheduleConfig(steps=200, prompts_per_step=128),
        checkpoint=CheckpointConfig(dir=f"{root}/runs/{name}", save_every=10),
        logging=LoggingConfig(tensorboard_dir=f"{root}/runs/{name}/tensorboard"),
        eval=EvalConfig(path=None, samples=4, temperature=0.6),
        gpu=gpu,
    )
