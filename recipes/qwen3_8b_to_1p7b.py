"""The TrOPD paper's setting: a Qwen3 8B-class teacher -> a Qwen3 1.7B student, 200 steps,
lr 5e-6, 128 prompts x 4 rollouts, up to 8k generated tokens, top-k 64, teacher-prefix
guidance decaying over training. One 8-GPU node at TP = 2 (DP = 4). Both models load from
their Hugging Face folders (Qwen/Qwen3-8B, Qwen/Qwen3-1.7B; the paper's student is an SFT
model: ``student.checkpoint=...``); prompts get the tokenizer's chat template. Paths are
placeholders."""
from dataclasses import replace

from tropd_megatron.data import PromptDataConfig
from tropd_megatron.megatron.config import OptimConfig, ParallelConfig
from tropd_megatron.megatron.inference import EngineConfig, SamplingConfig
from tropd_megatron.megatron.rollout import RolloutConfig
from tropd_megatron.run_config import (CheckpointConfig, EvalConfig, LoggingConfig, ModelSpec, RunConfig,
                                       ScheduleConfig)

from .models import qwen3_1p7b, qwen3_8b


def qwen3_8b_to_1p7b(root: str = "/checkpoints/tropd") -> RunConfig:
    return RunConfig(
        name="qwen3_8b_to_1p7b",
        tokenizer=f"{root}/Qwen3-1.7B",
        teacher=ModelSpec(qwen3_8b(), checkpoint=f"{root}/Qwen3-8B"),
        student=ModelSpec(replace(qwen3_1p7b(), recompute="selective"), checkpoint=f"{root}/Qwen3-1.7B"),
        data=PromptDataConfig(f"{root}/data/math_prompts.jsonl", chat_template="tokenizer", max_prompt_tokens=1024),
        parallel=ParallelConfig(tensor=2, sequence_parallel=True),
        rollout=RolloutConfig(SamplingConfig(max_new_tokens=8192), rollouts_per_prompt=4, micro_batch_size=1,
                              # up to a rank's 128 rollouts at once: 24 GiB of KV blocks hold ~449k
                              # tokens (128 of 3.5k, or 48 of the full 9216; the rest wait), what fits
                              # beside the rest (launch.plan: 67.3 GiB a GPU on 8)
                              engine=EngineConfig(max_requests=128, kv_cache_gib=24),
                              prefix_share_start=0.5, prefix_tokens_start=256),
        optim=OptimConfig(lr=5e-6, min_lr=5e-7, warmup_steps=10, weight_decay=0.01, spike_factor=10.0),
        schedule=ScheduleConfig(steps=200, prompts_per_step=128),
        checkpoint=CheckpointConfig(dir=f"{root}/runs/qwen3_8b_to_1p7b", save_every=10),
        logging=LoggingConfig(tensorboard_dir=f"{root}/runs/qwen3_8b_to_1p7b/tensorboard"),
        eval=EvalConfig(path=None, samples=4, temperature=0.6, max_new_tokens=8192),
        gpu="H100-80GB",
    )
