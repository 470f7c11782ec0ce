"""The built-in tiny task on CPU (what `make demo` runs): a 4-layer teacher distilled into a
2-layer student on multi-step arithmetic at TP = 2. `python -m launch.demo` prepares the
files it names (prompts, tokenizer, SFT teacher and student) under ``root``."""
from tropd_megatron.data import PromptDataConfig
from tropd_megatron.losses import TrOPDConfig
from tropd_megatron.config.model import ModelConfig, OptimConfig, ParallelConfig
from tropd_megatron.config.rollout import EngineConfig, RolloutConfig, SamplingConfig
from tropd_megatron.run_config import (CheckpointConfig, EvalConfig, LoggingConfig, ModelSpec, ObjectiveChoice,
                                       RunConfig, ScheduleConfig, TeacherSpec)

TEMPLATE = "Q: {prompt} A:"
VOCAB = 40  # what the demo's sentencepiece training yields on the default task (the trainer checks)


def tiny_model(layers: int, hidden: int) -> ModelConfig:
    return ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=4, ffn_hidden_size=4 * hidden,
                       vocab_size=VOCAB, padded_vocab_size=64, max_sequence_length=64)


def tiny(root: str = "runs/demo") -> RunConfig:
    return RunConfig(
        name="tiny",
        tokenizer=f"{root}/tokenizer.model",
        teacher=TeacherSpec(tiny_model(4, 128), checkpoint=f"{root}/teacher"),
        student=ModelSpec(tiny_model(2, 64), checkpoint=f"{root}/student_init"),
        data=PromptDataConfig(f"{root}/prompts.jsonl", chat_template=TEMPLATE, max_prompt_tokens=24),  # + 40 new: 64
        parallel=ParallelConfig(tensor=2),
        rollout=RolloutConfig(SamplingConfig(max_new_tokens=40), engine=EngineConfig(kv_cache_gib=0.125),
                              rollouts_per_prompt=4, micro_batch_size=32),
        objective=ObjectiveChoice("tropd", tropd=TrOPDConfig(topk=16)),
        optim=OptimConfig(lr=1e-3, min_lr=1e-4),
        schedule=ScheduleConfig(steps=200, prompts_per_step=16),
        checkpoint=CheckpointConfig(dir=f"{root}/tropd", save_every=50),
        logging=LoggingConfig(tensorboard_dir=f"{root}/tensorboard", log_every=10),
        eval=EvalConfig(path=f"{root}/held_out.jsonl", every=25),
        gpu="cpu",
    )
