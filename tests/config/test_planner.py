"""The memory planner: exact parameter counts against the published models, sharding
arithmetic, recompute ordering, fits / does not fit, and the ``launch.plan`` command."""
import dataclasses
import subprocess
import sys

import pytest

from launch.plan import check_fits, main
from recipes import get_recipe
from recipes.models import QWEN3_VOCAB, llama3_8b, llama3_70b, qwen3_1p7b, qwen3_8b
from tropd_megatron.planner import GIB, GPU_MEMORY, activation_bytes, parameter_count, plan, stage_parameters
from support import REPO

REPO = REPO


# Published sizes: the safetensors parameter totals of meta-llama/Meta-Llama-3-{8B,70B} and
# Qwen/Qwen3-8B on Hugging Face (8.03B, 70.6B, 8.19B), which the shapes in recipes/models.py
# (each model's config.json; vocab 128256 / 151936) reproduce exactly. For example Llama-3 8B:
# 2 x 128256 x 4096 (embedding + untied output) + 32 x (4096 x (4096 + 2 x 1024) + 4096^2
# + 3 x 14336 x 4096 + 2 x 4096) + 4096 = 8,030,261,248.
@pytest.mark.parametrize("model, published", [
    (llama3_70b(), 70_553_706_496),
    (llama3_8b(), 8_030_261_248),
    (qwen3_8b(), 8_190_735_360),
])
def test_parameter_count_matches_published_sizes(model, published):
    assert parameter_count(model) == published
    assert stage_parameters(model, 1, 1) == published  # one GPU holds everything


def test_tied_qwen3_1p7b_counts_its_embedding_once():
    # Qwen3-1.7B's model card: 1.7B parameters, 1.4B without embedding, tied embeddings.
    # Hugging Face lists 2,031,739,904 because its checkpoint also stores lm_head.weight, the
    # same 151936 x 2048 matrix; Megatron builds it once (share_embeddings_and_output_weights).
    model = qwen3_1p7b()
    embedding = QWEN3_VOCAB * 2048
    assert parameter_count(model) == 1_720_574_976
    assert parameter_count(model) + embedding == 2_031_739_904
    assert round((parameter_count(model) - embedding) / 1e9, 1) == 1.4
    assert parameter_count(dataclasses.replace(model, untie_embeddings=True)) == 2_031_739_904


def test_tensor_parallel_halves_weights_and_pipeline_splits_layers():
    model = llama3_8b()
    norms = (2 * 32 + 1) * 4096  # two per layer and the final one: replicated, not halved
    assert stage_parameters(model, 2, 1) == (parameter_count(model) - norms) / 2 + norms
    # two stages: half the layers each, the embedding on the first, the output layer on the last
    assert stage_parameters(model, 1, 2) == pytest.approx(parameter_count(model) / 2, rel=1e-5)
    # tied embeddings: the last stage keeps its own copy of the embedding as output layer
    tied = qwen3_1p7b()
    assert stage_parameters(tied, 1, 2) == pytest.approx((parameter_count(tied) + QWEN3_VOCAB * 2048) / 2, rel=1e-5)


def items(config, gpus):
    memory = plan(config, gpus)
    return {name.split(" (")[0]: value for name, value in memory.items.items()}


def test_tensor_parallel_halves_every_model_shard():
    # the dynamic engine's buffer is a size per GPU, whatever the layout (the static one takes no SP)
    static = ["rollout.engine.name=static", "parallel.sequence_parallel=false"]
    tp1 = items(get_recipe("qwen3_8b_to_1p7b", ["parallel.tensor=1", "teacher.parallel.tensor=1", *static]), 4)
    # the same data parallel 4
    tp2 = items(get_recipe("qwen3_8b_to_1p7b", ["parallel.tensor=2", "teacher.parallel.tensor=2", *static]), 8)
    for name in ("student weights", "student gradients", "student optimizer", "teacher weights", "student logits",
                 "student KV cache", "teacher KV cache"):
        assert tp2[name] == pytest.approx(tp1[name] / 2, rel=1e-4), name


def test_kv_caches_of_both_engines():
    """Static: max_requests x the longest request. Dynamic: the kv_cache_gib buffer in whole
    blocks, never more than max_requests longest requests (plus a dummy block): the teacher,
    which only writes prefixes, is capped far below the student."""
    from tropd_megatron.planner import kv_cache_bytes, kv_token_bytes, request_lengths

    cfg = get_recipe("qwen3_8b_to_1p7b", ["rollout.engine.kv_cache_gib=1000"])
    engine, lengths = cfg.rollout.engine, request_lengths(cfg)
    assert lengths == {"student": 1024 + 8192, "teacher": 1024 + 256}
    token = kv_token_bytes(cfg.teacher.model, tensor=2, pipeline=1)
    assert token == 2 * 36 * (8 // 2) * 128 * 2  # K and V, layers, KV heads per rank, head_dim, bf16
    blocks = engine.max_requests * (-(-lengths["teacher"] // engine.block_size_tokens)) + 1
    assert kv_cache_bytes(cfg.teacher.model, engine, tensor=2, pipeline=1, request_tokens=lengths["teacher"]) \
        == blocks * engine.block_size_tokens * token
    small = dataclasses.replace(engine, kv_cache_gib=0.5)
    got = kv_cache_bytes(cfg.student.model, small, tensor=2, pipeline=1, request_tokens=lengths["student"])
    block = engine.block_size_tokens * kv_token_bytes(cfg.student.model, tensor=2, pipeline=1)
    assert got == GIB // 2 // block * block
    static = dataclasses.replace(engine, name="static", max_requests=16)
    assert kv_cache_bytes(cfg.student.model, static, tensor=2, pipeline=1, request_tokens=9216) \
        == 16 * 9216 * kv_token_bytes(cfg.student.model, tensor=2, pipeline=1)


def test_data_parallel_shards_the_optimizer_and_the_rollout_batch_only():
    dp1 = items(get_recipe("qwen3_8b_to_1p7b"), 2)
    dp2 = items(get_recipe("qwen3_8b_to_1p7b"), 4)
    assert dp2["student optimizer"] == dp1["student optimizer"] / 2
    # fewer rollouts per rank: fewer micro-batches of teacher signal; the KV caches are sized by
    # rollout.engine, not by the rollouts
    assert dp2["teacher signal"] == dp1["teacher signal"] / 2
    for name in ("student weights", "student gradients", "teacher weights", "student activations",
                 "student logits", "student KV cache", "teacher KV cache", "CUDA context, NCCL, workspaces"):
        assert dp2[name] == dp1[name], name


def test_optimizer_bytes_per_parameter():
    tp2 = ["parallel.tensor=2"]
    bf16 = plan(get_recipe("qwen3_8b_to_1p7b", tp2), 2)  # data parallel 1
    params = stage_parameters(qwen3_1p7b(), 2, 1)
    assert bf16.items["student optimizer (adam, 1/1 shard)"] == 12 * params  # fp32 main params + m + v
    fp32 = plan(get_recipe("qwen3_8b_to_1p7b", [*tp2, "student.model.dtype=fp32"]), 2)
    assert fp32.items["student optimizer (adam, 1/1 shard)"] == 8 * params  # no separate main params


def test_recompute_orders_activations():
    sizes = {r: activation_bytes(dataclasses.replace(llama3_8b(), recompute=r), sequence=8192, micro_batch=1,
                                 tensor=8, pipeline=1, microbatches=4) for r in ("none", "selective", "full")}
    assert sizes["full"] < sizes["selective"] < sizes["none"]
    sbh = 8192 * 4096
    assert sizes["selective"] == 32 * sbh * (10 + 24 / 8) * 1  # bf16: the paper's constants as bytes


def test_sequence_parallelism_splits_the_replicated_activations():
    """Korthikanti et al. Table 2: with SP the 10sbh kept per layer outside the TP matmuls is
    split over t as well (selective recompute: 34 sbh / t; full: 2 sbh / t per layer plus one
    layer rebuilt at "none", whose 10 sbh is split too)."""
    sbh, layers = 8192 * 4096, 32
    scores = 5 * 32 * 8192 / (4096 * 8)  # 5as / (ht) = 40
    kw = dict(sequence=8192, micro_batch=1, tensor=8, pipeline=1, microbatches=4)
    expected = {("selective", False): layers * (10 + 3), ("selective", True): layers * 34 / 8,
                ("full", False): layers * 2 + (10 + 3 + scores), ("full", True): layers * 2 / 8 + (10 / 8 + 3 + scores)}
    for (recompute, sp), per_sbh in expected.items():
        model = dataclasses.replace(llama3_8b(), recompute=recompute)
        assert activation_bytes(model, **kw, sequence_parallel=sp) == int(sbh * per_sbh), (recompute, sp)
    plans = {sp: plan(get_recipe("llama3_70b_to_8b", [f"parallel.sequence_parallel={sp}", "parallel.tensor=8"]), 32)
             for sp in (False, True)}
    act = {sp: next(v for k, v in p.items.items() if k.startswith("student activations")) for sp, p in plans.items()}
    assert act[True] < act[False] / 2


def test_teacher_kv_cache_only_with_prefix_guidance():
    guided = plan(get_recipe("qwen3_8b_to_1p7b"), 8)
    unguided = plan(get_recipe("qwen3_8b_to_1p7b", ["rollout.prefix_share_start=0"]), 8)
    assert any(k.startswith("teacher KV cache") for k in guided.items)
    assert not any(k.startswith("teacher KV cache") for k in unguided.items)
    assert guided.total > unguided.total


def test_llama3_70b_recipe_layouts():
    # the recipe as written (selective recompute, the dynamic engine's buffer) fits 2 and 4 nodes
    for gpus in (16, 32):
        memory = plan(get_recipe("llama3_70b_to_8b"), gpus)
        assert memory.fits and 40 * GIB < memory.total < GPU_MEMORY["H100-80GB"]
        check_fits(get_recipe("llama3_70b_to_8b"), gpus)
    tp1 = plan(get_recipe("llama3_70b_to_8b", ["parallel.tensor=1", "teacher.parallel.tensor=1"]), 16)
    assert not tp1.fits
    assert tp1.items["teacher weights (bf16)"] > GPU_MEMORY["H100-80GB"]  # 141 GB of teacher alone
    # without recompute the s x s attention scores alone overflow; a static 256-sequence KV cache
    # too, and a dynamic buffer of 60 GiB
    for overrides in (["student.model.recompute=none", "rollout.micro_batch_size=4"],
                      ["rollout.engine.name=static", "parallel.sequence_parallel=false", "rollout.engine.max_requests=256"],
                      ["rollout.engine.kv_cache_gib=60", "rollout.engine.max_requests=512"]):
        assert not plan(get_recipe("llama3_70b_to_8b", overrides), 16).fits, overrides
        with pytest.raises(ValueError, match="does not fit"):
            check_fits(get_recipe("llama3_70b_to_8b", overrides), 16)


def test_cpu_has_no_limit():
    memory = plan(get_recipe("tiny"))
    assert memory.capacity is None and memory.fits and memory.gpus == 2 and memory.data_parallel == 1
    assert "CUDA context, NCCL, workspaces" not in memory.items
    assert "no limit" in memory.format()
    # the distributed optimizer shards over data parallel on CPU too; SGD's plain one does not
    assert "student optimizer (adam, 1/2 shard)" in plan(get_recipe("tiny", ["parallel.tensor=1"]), 2).items
    assert "student optimizer (sgd, 1/1 shard)" in plan(get_recipe("tiny", ["parallel.tensor=1", "optim.optimizer=sgd"]),
                                                          2).items


@pytest.mark.parametrize("overrides, gpus, message", [
    (["gpu=V100"], None, "unknown gpu 'V100'; known: H100-80GB, H200-141GB, A100-80GB, A100-40GB, cpu"),
    ([], 12, "world size 12 is not divisible by the teacher's tensor x pipeline = 8 x 1"),
    (["schedule.prompts_per_step=6"], 32, "schedule.prompts_per_step=6 is not divisible by the data-parallel size 16"),
])
def test_impossible_layouts_are_refused(overrides, gpus, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(get_recipe("llama3_70b_to_8b", overrides), gpus)


def test_format_shows_layout_counts_and_verdict():
    text = plan(get_recipe("llama3_70b_to_8b", ["rollout.engine.name=static", "parallel.sequence_parallel=false",
                                                 "rollout.engine.max_requests=256"]), 16).format()
    assert "16 x H100-80GB: student tensor 2 x pipeline 1 x data 8; teacher tensor 8 x pipeline 1 x data 2" in text
    same = plan(get_recipe("llama3_70b_to_8b", ["parallel.tensor=8"]), 16).format()
    assert "16 x H100-80GB: tensor 8 x pipeline 1 x data 2\n" in same
    assert "teacher 70.55B parameters, student 8.03B" in text
    assert "teacher KV cache (static, 256 requests)" in text and "does not fit:" in text


def test_main_exit_codes(capsys):
    assert main(["--recipe", "llama3_70b_to_8b", "--gpus", "32"]) == 0
    assert "fits:" in capsys.readouterr().out
    assert main(["--recipe", "llama3_70b_to_8b", "--gpus", "16", "rollout.engine.kv_cache_gib=60",
                 "rollout.engine.max_requests=512"]) == 1
    assert "does not fit H100-80GB" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--recipe", "llama3_70b_to_8b", "--gpus", "12"])
    assert e.value.code == 2


def test_cli_subprocess():
    # both commands at once: each spends most of its time importing megatron.core
    commands = [["--gpus", "32"], ["--gpus", "16", "parallel.tensor=1"]]
    procs = [subprocess.Popen([sys.executable, "-m", "launch.plan", "--recipe", "llama3_70b_to_8b", *args], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for args in commands]
    (fit_out, _), (_, tp1_err) = (p.communicate(timeout=120) for p in procs)
    assert [p.returncode for p in procs] == [0, 1]
    assert "fits:" in fit_out
    assert "error: llama3_70b_to_8b does not fit H100-80GB" in tp1_err


def test_teacher_on_its_own_layout():
    """The teacher's weights and KV cache at its layout, the student's parts at the student's,
    and the teacher group's share of the signals on top of the rank's own."""
    own = plan(get_recipe("llama3_70b_to_8b", ["parallel.tensor=4"]), 32)  # student TP 4 x DP 8, teacher TP 8 x DP 4
    same = plan(get_recipe("llama3_70b_to_8b", ["parallel.tensor=8"]), 32)
    assert (own.tensor, own.data_parallel, own.teacher_tensor, own.teacher_data_parallel) == (4, 8, 8, 4)
    assert own.items["teacher weights (bf16)"] == same.items["teacher weights (bf16)"]
    teacher_kv = next(k for k in own.items if k.startswith("teacher KV"))
    assert own.items[teacher_kv] == same.items[teacher_kv]
    assert own.items["student weights (bf16)"] == pytest.approx(2 * same.items["student weights (bf16)"], rel=1e-3)
    signal = own.items["teacher signal (top-64)"]  # this rank's: half the rollouts of a TP 8 rank
    assert signal == pytest.approx(same.items["teacher signal (top-64)"] / 2)
    assert own.items["teacher signal, the teacher group's share"] == pytest.approx(2 * signal)
    assert "teacher signal, the teacher group's share" not in same.items


def test_the_recipes_student_layout_is_the_smallest_that_fits():
    """What the GPU recipes' docstrings say: the student at the smallest tensor-parallel size
    whose plan fits (llama3_70b_to_8b on 32 GPUs: 2, below the teacher's 8)."""
    from tropd_megatron.planner import smallest_fitting_student_tensor, student_tensor_choices

    for name, gpus in (("llama3_70b_to_8b", 32), ("qwen3_8b_to_1p7b", 8)):
        config = get_recipe(name)
        assert smallest_fitting_student_tensor(config, gpus) == config.parallel.tensor, name
    choices = student_tensor_choices(get_recipe("llama3_70b_to_8b"), 32)
    assert not choices[1].fits and choices[2].fits and "does not divide num_query_groups=8" in choices[16]


def test_kv_caches_and_training_never_hold_memory_at_once():
    """The generators are released before the training step: the peak is the larger phase,
    what is held throughout plus either the KV caches or the step's activations and signals."""
    memory = plan(get_recipe("llama3_70b_to_8b"), 32)
    kv = [k for k in memory.items if "KV cache" in k]
    training = [k for k in memory.items if k.startswith(("student activations", "student logits", "teacher signal"))]
    assert len(kv) == 2 and len(training) == 4
    throughout = sum(v for k, v in memory.items.items() if k not in kv + training)
    assert memory.phase_total("rollouts") == throughout + sum(memory.items[k] for k in kv)
    assert memory.phase_total("training") == throughout + sum(memory.items[k] for k in training)
    assert memory.total == max(memory.phase_total("rollouts"), memory.phase_total("training")) < sum(
        memory.items.values())
    assert "rollouts / training" in memory.format() and "(rollouts only)" in memory.format()


def test_the_free_fraction_is_split_between_the_generators_from_one_reading():
    """kv_cache_free_fraction: one reading, split by what each generator can use; the plan
    sizes the buffers as the trainer does, from what the rest leaves of the GPU."""
    from tropd_megatron.planner import GIB, kv_cache_shares

    shares = kv_cache_shares(40 * GIB, 0.5, {"student": 3, "teacher": 1})
    assert shares == pytest.approx({"student": 15.0, "teacher": 5.0})  # together half of the 40 GiB
    with pytest.raises(ValueError, match="no KV cache to size"):
        kv_cache_shares(0, 0.5, {"student": 1})
    memory = plan(get_recipe("llama3_70b_to_8b", ["rollout.engine.kv_cache_free_fraction=0.5",
                                                  "rollout.engine.max_requests=1024"]), 32)
    kv = [k for k in memory.items if "KV cache" in k]
    free = memory.capacity - sum(v for k, v in memory.items.items() if k not in memory.phases)
    assert 0.5 * free - 2 * 2**26 < sum(memory.items[k] for k in kv) <= 0.5 * free  # whole blocks of < 64 MiB
    assert memory.items[kv[0]] > memory.items[kv[1]]  # the student's longer requests get more
