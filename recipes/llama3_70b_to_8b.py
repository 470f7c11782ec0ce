"""Llama 3.3 70B Instruct teacher -> Llama 3.1 8B Instruct student on 8-GPU nodes (H100 80GB).

Teacher and student are co-located on the same TP = 8 groups (the 70B teacher takes 17.6 GB
of bf16 weights per GPU); data parallelism spans the nodes, and the distributed optimizer
shards the student's fp32 state over it. Paper-like schedule: 200 steps, lr 5e-6,
128 prompts x 4 rollouts a step. Both models load straight from their Hugging Face folders
(``huggingface-cli download meta-llama/Llama-3.3-70B-Instruct --local-dir ROOT/...``); prompts
get the tokenizer's chat template. Paths are placeholders for the cluster's files (override
them, e.g. ``data.path=/lustre/prompts.jsonl``; a fine-tuned student:
``student.checkpoint=/lustre/my-sft-llama``).
"""
from dataclasses import replace

from tropd_megatron.data import PromptDataConfig
from tropd_megatron.megatron.config import OptimConfig, ParallelConfig
from tropd_megatron.megatron.inference import EngineConfig, SamplingConfig
from tropd_megatron.megatron.rollout import RolloutConfig
from tropd_megatron.run_config import (CheckpointConfig, EvalConfig, LoggingConfig, ModelSpec, RunConfig,
                                       ScheduleConfig)

from .models import llama3_8b, llama3_70b


def llama3_70b_to_8b(root: str = "/checkpoints/tropd") -> RunConfig:
    return RunConfig(
        name="llama3_70b_to_8b",
        tokenizer=f"{root}/Llama-3.1-8B-Instruct",
        teacher=ModelSpec(llama3_70b(), checkpoint=f"{root}/Llama-3.3-70B-Instruct"),
        student=ModelSpec(replace(llama3_8b(), recompute="selective"), checkpoint=f"{root}/Llama-3.1-8B-Instruct"),
        data=PromptDataConfig(f"{root}/data/prompts.jsonl", chat_template="tokenizer", max_prompt_tokens=1024),
        parallel=ParallelConfig(tensor=8, sequence_parallel=True),
        rollout=RolloutConfig(SamplingConfig(max_new_tokens=7168), rollouts_per_prompt=4, micro_batch_size=1,
                              # a rank's 128 rollouts in flight at once: 16 GiB of KV blocks hold all
                              # of them at the full 8192 tokens (launch.plan: 55.9 GiB a GPU on 32)
                              engine=EngineConfig(max_requests=128, kv_cache_gib=16),
                              prefix_share_start=0.5, prefix_tokens_start=256),
        optim=OptimConfig(lr=5e-6, min_lr=5e-7, warmup_steps=10, weight_decay=0.01, spike_factor=10.0),
        schedule=ScheduleConfig(steps=200, prompts_per_step=128),
        checkpoint=CheckpointConfig(dir=f"{root}/runs/llama3_70b_to_8b", save_every=10),
        logging=LoggingConfig(tensorboard_dir=f"{root}/runs/llama3_70b_to_8b/tensorboard"),
        eval=EvalConfig(path=None, samples=4, temperature=0.6, max_new_tokens=7168),
        gpu="H100-80GB",
    )
