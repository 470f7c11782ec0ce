"""What only a GPU shows: TransformerEngine's layers (and the Hugging Face names of its fused
layer norms), a bf16 step with the distributed optimizer, flash-attn in the dynamic engine,
packed rows as THD sequences. Marked ``gpu``: skipped without CUDA (each test also names the
library it needs when that is missing); ``make test-gpu`` runs them with the benchmarks."""
import numpy as np
import pytest
import torch

from support.distributed import run_workers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("megatron.core")

from tropd_megatron.megatron import MicroBatch, ModelConfig, OptimConfig, ParallelConfig  # noqa: E402
from tropd_megatron.megatron import build_gpt, build_student, initialize, train_step  # noqa: E402
from tropd_megatron.megatron.compat import HAVE_TE  # noqa: E402

needs_te = pytest.mark.skipif(not HAVE_TE, reason="needs TransformerEngine (transformer_engine did not import)")
VOCAB = 60
CONFIG = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                     vocab_size=VOCAB, padded_vocab_size=64, max_sequence_length=64, init_method_std=0.3)


def gpu(fn, *args, world=1, timeout=240):
    """fn on ``world`` NCCL ranks (one GPU each)."""
    return run_workers(fn, world, *args, backend="nccl", timeout=timeout)


def _te_worker(rank, world):
    initialize(ParallelConfig(), seed=0)
    model = build_gpt(CONFIG, ParallelConfig())
    return sorted({type(m).__module__.split(".")[0] for m in model.decoder.layers[0].modules()})


@needs_te
def test_transformer_engine_layers_are_used_when_it_imports():
    assert "transformer_engine" in gpu(_te_worker)[0]


def _hf_worker(rank, world, folder):
    from support.hf_models import VOCAB as HF_VOCAB

    from tropd_megatron.megatron.hf_checkpoint import load_hf_weights, model_config_from_hf

    torch.backends.cuda.matmul.allow_tf32 = False
    initialize(ParallelConfig(), seed=0)
    config = model_config_from_hf(folder, vocab_size=HF_VOCAB)
    model = build_gpt(config, ParallelConfig(), frozen=True)
    load_hf_weights(model, config, folder, "teacher")  # TE's fused layer norms: layer_norm_weight names
    tokens = torch.randint(0, HF_VOCAB, (2, 48), generator=torch.Generator().manual_seed(7)).cuda()
    with torch.no_grad():
        logits = model(*MicroBatch(tokens, tokens, torch.ones_like(tokens)).model_inputs())
    return logits[..., :HF_VOCAB].float().cpu()


@needs_te
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_hugging_face_weights_in_transformer_engine_layers(tmp_path, family):
    """A Hugging Face folder loaded into TE's layers gives transformers' logits."""
    from support.hf_models import hf_logits, hf_model

    reference = hf_model(family, tmp_path)
    tokens = torch.randint(0, 60, (2, 48), generator=torch.Generator().manual_seed(7))
    got = gpu(_hf_worker, str(tmp_path))[0]
    np.testing.assert_allclose(got, hf_logits(reference, tokens).numpy(), atol=5e-4, rtol=0)


def _bf16_worker(rank, world):
    """Five bf16 SFT steps on one batch at TP = 1 (sequence parallelism asked for, off at TP = 1),
    Megatron's distributed optimizer on NCCL."""
    from tropd_megatron.losses import SFTConfig

    parallel = ParallelConfig(sequence_parallel=True)
    initialize(parallel, seed=0)
    student = build_student(ModelConfig(**{**CONFIG.__dict__, "dtype": "bf16"}), parallel, OptimConfig(lr=1e-3),
                            total_steps=5)
    tokens = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(3))  # train_step moves them
    batch = [MicroBatch(tokens, torch.roll(tokens, -1, 1), torch.ones(4, 32))]
    losses = [train_step(student, None, batch, SFTConfig(), vocab_size=VOCAB, step=s, total_steps=5).metrics["loss"]
              for s in range(5)]
    kind = type(student.optimizer.chained_optimizers[0]).__name__
    finite = all(bool(torch.isfinite(p).all()) for p in student.model.module.parameters())
    return losses, kind, finite


def test_a_bf16_step_with_the_distributed_optimizer():
    losses, kind, finite = gpu(_bf16_worker)[0]
    assert kind == "DistributedOptimizer" and finite
    assert losses[-1] < losses[0], losses


def _adam_round_trip_worker(rank, world, path):
    """A bf16 student with the optimizer megatron picks here (TE's FusedAdam when TE imports)
    saved before its first update and after two, then two more steps from the run itself and
    from a fresh student loaded from step 2: the losses of steps 3 and 4."""
    from tropd_megatron.losses import SFTConfig
    from tropd_megatron.megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    parallel = ParallelConfig()
    initialize(parallel, seed=0)
    config = ModelConfig(**{**CONFIG.__dict__, "dtype": "bf16"})
    tokens = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(3))
    batch = [MicroBatch(tokens, torch.roll(tokens, -1, 1), torch.ones(4, 32))]

    def steps(student, start, stop):
        return [train_step(student, None, batch, SFTConfig(), vocab_size=VOCAB, step=s, total_steps=6).metrics["loss"]
                for s in range(start, stop)]

    student = build_student(config, parallel, OptimConfig(lr=1e-3), total_steps=6)
    save_checkpoint(path + "/before", 0, student.model.module, student.optimizer, student.scheduler)
    steps(student, 0, 2)
    save_checkpoint(path + "/after", 2, student.model.module, student.optimizer, student.scheduler)
    straight = steps(student, 2, 4)
    loaded = build_student(config, parallel, OptimConfig(lr=1e-3), total_steps=6)
    load_checkpoint(latest_checkpoint(path + "/before"), loaded.model.module, loaded.optimizer, loaded.scheduler)
    load_checkpoint(latest_checkpoint(path + "/after"), loaded.model.module, loaded.optimizer, loaded.scheduler)
    inner = type(student.optimizer.chained_optimizers[0].optimizer)
    return straight, steps(loaded, 2, 4), f"{inner.__module__}.{inner.__name__}"


def test_an_adam_checkpoint_round_trip_before_and_after_the_first_update(tmp_path):
    """TE's FusedAdam keeps its step in param_groups and creates its moments lazily (the
    checkpoint code was written for torch Adam): a save before any update loads, and a resume
    from step 2 continues the run's losses exactly."""
    straight, resumed, optimizer = gpu(_adam_round_trip_worker, str(tmp_path))[0]
    assert resumed == straight, (optimizer, straight, resumed)
    if HAVE_TE:
        assert "transformer_engine" in optimizer or "apex" in optimizer, optimizer


def _generation_worker(rank, world):
    from tropd_megatron.megatron.inference import EngineConfig, Generator, SamplingConfig

    initialize(ParallelConfig(), seed=0)
    model = build_gpt(CONFIG, ParallelConfig())
    gen = Generator(model, CONFIG, eos_id=63, engine=EngineConfig(max_requests=4, kv_cache_gib=0.05))
    prompts = [[5, 7, 9], [11, 3, 4, 8, 2], [1, 2]]
    outs = gen.generate(prompts, SamplingConfig(top_k=1), max_new_tokens=[6, 3, 8])
    checks = []
    for prompt, out in zip(prompts, outs):
        full = torch.tensor([prompt + out.tokens]).cuda()
        with torch.no_grad():
            logits = model(*MicroBatch(full[:, :-1], full[:, 1:], torch.ones_like(full[:, 1:])).model_inputs())
        lp = torch.log_softmax(logits[0, len(prompt) - 1 :, :VOCAB].float(), -1)
        checks.append((out.tokens == lp.argmax(-1).tolist(),
                       float((lp.gather(-1, full[0, len(prompt):, None])[:, 0].cpu() - torch.tensor(out.logprobs))
                             .abs().max())))
    return checks


def test_the_dynamic_engine_with_flash_attention():
    """Megatron's dynamic engine on its own kernels (flash-attn >= 2.7.3 or FA3): greedy tokens
    are the argmax of a plain forward, log-probs the forward's."""
    pytest.importorskip("flash_attn", reason="needs flash-attn (the dynamic engine's kernels on GPU)")
    for same, worst in gpu(_generation_worker)[0]:
        assert same and worst < 1e-3, (same, worst)


def _packed_worker(rank, world):
    from tropd_megatron.losses import TrOPDConfig
    from tropd_megatron.megatron.rollout import Rollout, to_microbatches

    torch.backends.cuda.matmul.allow_tf32 = False
    initialize(ParallelConfig(), seed=0)
    teacher = build_gpt(CONFIG, ParallelConfig(), frozen=True)
    # lr 0: both layouts see the same weights
    student = build_student(CONFIG, ParallelConfig(), OptimConfig(optimizer="sgd", lr=0.0), total_steps=2)
    g = torch.Generator().manual_seed(1)
    rollouts = [Rollout(torch.randint(1, VOCAB, (3,), generator=g).tolist(), [],
                        torch.randint(1, VOCAB, (n,), generator=g).tolist(), [-1.0] * n, False) for n in (3, 20, 7, 30)]
    return {pack: train_step(student, teacher, to_microbatches(rollouts, 2, 0, pack=pack, row_tokens=40,
                                                               same_shape=False),
                             TrOPDConfig(topk=8), vocab_size=VOCAB, step=1, total_steps=2).metrics
            for pack in (False, True)}


@needs_te
def test_packed_rows_as_thd_sequences():
    """With TransformerEngine, packed rows run as THD sequences (PackedSeqParams): the teacher
    signal and the loss metrics of the padded layout."""
    results = gpu(_packed_worker)[0]
    for key in ("loss", "tokens", "teacher_entropy", "kl_k1"):
        np.testing.assert_allclose(results[True][key], results[False][key], rtol=2e-3, err_msg=key)
