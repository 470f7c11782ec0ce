import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

# One thread: forking workers after a multi-threaded op has hung on these machines.
torch.set_num_threads(1)

# The layer each test file checks, as a marker: `make test-fast` runs losses and config (pure
# torch and configuration, no Megatron model), `make test-mcore019` the megatron layer. A new
# test file must be placed here (collection fails otherwise).
LAYERS = {
    "losses": ("test_objectives", "test_primitives", "test_robustness", "test_trust_mask", "test_modelopt"),
    "config": ("test_validate", "test_planner", "test_recipes", "test_architecture", "test_data_formats",
               "test_tokenizer", "test_answers", "test_task", "test_logs", "test_pruning"),
    "megatron": ("test_megatron_step", "test_distributed_optimizer", "test_packing", "test_generation", "test_rollout",
                 "test_evaluation", "test_hf_checkpoint", "test_teacher_layout", "test_distributed_helpers", "test_gpu"),
    "run": ("test_train", "test_reliability", "test_hf_train", "test_demo", "test_compare", "test_bench",
            "test_gpu_check", "test_nemo", "test_slurm", "test_smollm2"),
}


def pytest_collection_modifyitems(config, items):
    import pytest

    layer_of = {module: layer for layer, modules in LAYERS.items() for module in modules}
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        if module not in layer_of:
            raise pytest.UsageError(f"{item.fspath}: add {module} to LAYERS in tests/conftest.py")
        item.add_marker(layer_of[module])
