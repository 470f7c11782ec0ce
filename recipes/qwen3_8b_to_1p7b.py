"""The TrOPD paper's setting: a Qwen3 8B-class teacher -> a Qwen3 1.7B student, the paper's
schedule (200 steps, lr 5e-6, 128 prompts x 4 rollouts, up to 8k generated tokens, top-k 64,
teacher-prefix guidance decaying over training; ``templates.paper_schedule``). One 8-GPU node,
both models at TP = 2 (DP = 4): the smallest student tensor-parallel size whose memory plan
fits an H100 (``launch.plan``: TP 1 x DP 8 85.9 GiB a GPU, over its 74.5, mostly the 24 GiB
KV buffer and the 152k-row logits; TP 2 67.3 GiB), which is the teacher's layout too:
``teacher.parallel`` is left null (the student's). Both models load from their Hugging Face folders (Qwen/Qwen3-8B,
Qwen/Qwen3-1.7B; the paper's student is an SFT model: ``student.checkpoint=...``); prompts get
the tokenizer's chat template. Paths are placeholders."""
from dataclasses import replace

from tropd_megatron.run_config import RunConfig

from .models import qwen3_1p7b, qwen3_8b
from .templates import paper_schedule


def qwen3_8b_to_1p7b(root: str = "/checkpoints/tropd") -> RunConfig:
    return paper_schedule(
        name="qwen3_8b_to_1p7b", root=root, prompts="math_prompts.jsonl", tensor=2, teacher_tensor=None,
        max_new_tokens=8192,
        teacher=qwen3_8b(), teacher_folder="Qwen3-8B",
        student=replace(qwen3_1p7b(), recompute="selective"), student_folder="Qwen3-1.7B",
        # 24 GiB of KV blocks hold ~449k tokens: 128 rollouts of 3.5k on average, or 48 of the
        # full 9216 (the rest wait); what fits beside the rest (launch.plan: 67.3 GiB a GPU on 8)
        kv_cache_gib=24,
    )
