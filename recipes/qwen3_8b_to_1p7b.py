"""The TrOPD paper's setting: a Qwen3 8B-class teacher -> a Qwen3 1.7B student, the paper's
schedule (200 steps, lr 5e-6, 128 prompts x 4 rollouts, up to 8k generated tokens, top-k 64,
teacher-prefix guidance decaying over training; ``templates.paper_run_config``). One 8-GPU node,
the teacher at TP = 2 (DP = 4), the student at TP = 1 (DP = 8) on its own layout: the smallest
student tensor-parallel size whose memory plan fits an H100 (``launch.plan``: 57.9 GiB a GPU
at its peak, while generating, 50.7 while training, the KV caches being released between the
two), so every GPU decodes its own rollouts. Both models load from their Hugging Face folders (Qwen/Qwen3-8B,
Qwen/Qwen3-1.7B; the paper's student is an SFT model: ``student.checkpoint=...``); prompts get
the tokenizer's chat template. Paths are placeholders."""
from dataclasses import replace

from tropd_megatron.run_config import RunConfig

from .models import qwen3_1p7b, qwen3_8b
from .templates import paper_run_config


def qwen3_8b_to_1p7b(root: str = "/checkpoints/tropd") -> RunConfig:
    return paper_run_config(
        name="qwen3_8b_to_1p7b", root=root, prompts="math_prompts.jsonl", tensor=1, teacher_tensor=2,
        max_new_tokens=8192,
        teacher=qwen3_8b(), teacher_folder="Qwen3-8B",
        student=replace(qwen3_1p7b(), recompute="selective"), student_folder="Qwen3-1.7B",
        # 24 GiB of KV blocks hold ~449k tokens: 128 rollouts of 3.5k on average, or 48 of the
        # full 9216 (the rest wait); what fits beside the rest (launch.plan: 57.9 GiB a GPU on 8)
        kv_cache_gib=24,
    )
