"""The Megatron side: student and co-located frozen teacher, the training step, checkpoints.

Importing it needs megatron-core (the ``megatron`` extra); ``tropd_megatron.losses`` does not.
"""
from ..logs import quiet_known_warnings

quiet_known_warnings()  # before megatron-core's modules load: they warn at import

from ..config.model import ModelConfig, OptimConfig, ParallelConfig  # noqa: E402
from .models import build_gpt, shared_vocabulary_rows, initialize  # noqa: E402
from .step import MicroBatch, Student, StepResult, build_student, teacher_outputs, train_step  # noqa: E402

__all__ = [
    "MicroBatch", "ModelConfig", "OptimConfig", "ParallelConfig", "StepResult", "Student",
    "build_gpt", "build_student", "shared_vocabulary_rows", "initialize", "teacher_outputs", "train_step",
]
