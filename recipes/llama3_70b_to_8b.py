"""Llama 3.3 70B Instruct teacher -> Llama 3.1 8B Instruct student on 8-GPU nodes (H100 80GB).

Teacher and student are co-located on the same GPUs, each on its own layout: the 70B teacher at
TP = 8 (16.4 GiB of bf16 weights a GPU, data parallel across nodes), the 8B student at TP = 2,
the smallest tensor-parallel size whose memory plan fits an H100 (``launch.plan`` on 32 GPUs:
TP 2 x DP 16 66.9 GiB a GPU at its peak, while generating, 66.2 while training, the KV caches
being released between the two; TP 1 x DP 32 109.5 GiB, over its 74.5): generation, most of a
step, then all-reduces across 2 GPUs per layer and token instead of 8, and four times as many
data-parallel ranks decode at once. The teacher scores every student rank's rollouts through
collectives of its compact signal (``teacher.parallel``; docs/training.md). The distributed
optimizer shards the student's fp32 state over data parallelism. The paper's schedule (``templates.paper_run_config``).
Both models load straight from their Hugging Face folders
(``huggingface-cli download meta-llama/Llama-3.3-70B-Instruct --local-dir ROOT/...``); prompts
get the tokenizer's chat template. Paths are placeholders for the cluster's files (override
them, e.g. ``data.path=/lustre/prompts.jsonl``; a fine-tuned student:
``student.checkpoint=/lustre/my-sft-llama``).
"""
from dataclasses import replace

from tropd_megatron.run_config import RunConfig

from .models import llama3_8b, llama3_70b
from .templates import paper_run_config


def llama3_70b_to_8b(root: str = "/checkpoints/tropd") -> RunConfig:
    return paper_run_config(
        name="llama3_70b_to_8b", root=root, prompts="prompts.jsonl", tensor=2, teacher_tensor=8, max_new_tokens=7168,
        teacher=llama3_70b(), teacher_folder="Llama-3.3-70B-Instruct",
        student=replace(llama3_8b(), recompute="selective"), student_folder="Llama-3.1-8B-Instruct",
        # 16 GiB of KV blocks hold all 32 of a student rank's rollouts at the full 8192 tokens
        # at TP 2 (launch.plan: 66.9 GiB a GPU on 32 H100s)
        kv_cache_gib=16,
    )
