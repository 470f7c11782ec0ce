"""Llama 3.3 70B Instruct teacher -> Llama 3.1 8B Instruct student on 8-GPU nodes (H100 80GB).

Teacher and student are co-located on the same TP = 8 groups (the 70B teacher takes 17.6 GB
of bf16 weights per GPU); data parallelism spans the nodes, and the distributed optimizer
shards the student's fp32 state over it. The paper's schedule (``templates.paper_schedule``).
Both models load straight from their Hugging Face folders
(``huggingface-cli download meta-llama/Llama-3.3-70B-Instruct --local-dir ROOT/...``); prompts
get the tokenizer's chat template. Paths are placeholders for the cluster's files (override
them, e.g. ``data.path=/lustre/prompts.jsonl``; a fine-tuned student:
``student.checkpoint=/lustre/my-sft-llama``).
"""
from dataclasses import replace

from tropd_megatron.run_config import RunConfig

from .models import llama3_8b, llama3_70b
from .templates import paper_schedule


def llama3_70b_to_8b(root: str = "/checkpoints/tropd") -> RunConfig:
    return paper_schedule(
        name="llama3_70b_to_8b", root=root, prompts="prompts.jsonl", tensor=8, max_new_tokens=7168,
        teacher=llama3_70b(), teacher_folder="Llama-3.3-70B-Instruct",
        student=replace(llama3_8b(), recompute="selective"), student_folder="Llama-3.1-8B-Instruct",
        # 16 GiB of KV blocks hold all 128 of a rank's rollouts at the full 8192 tokens
        # (launch.plan: 55.9 GiB a GPU on 32 H100s)
        kv_cache_gib=16,
    )
