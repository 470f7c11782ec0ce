"""The Megatron side: student and co-located frozen teacher, the training step, checkpoints.

Importing it needs megatron-core (the ``megatron`` extra); ``tropd_megatron.losses`` does not.
"""
from ..config.model import ModelConfig, OptimConfig, ParallelConfig
from .models import build_gpt, shared_vocabulary_rows, initialize
from .step import MicroBatch, Student, StepResult, build_student, teacher_outputs, train_step

__all__ = [
    "MicroBatch", "ModelConfig", "OptimConfig", "ParallelConfig", "StepResult", "Student",
    "build_gpt", "build_student", "shared_vocabulary_rows", "initialize", "teacher_outputs", "train_step",
]
