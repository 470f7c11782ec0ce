import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))  # the shared helpers: `from support.distributed import ...`

import torch  # noqa: E402

# One thread: forking workers after a multi-threaded op has hung on these machines.
torch.set_num_threads(1)

# Each test file sits in the folder of the layer it checks, and the folder is its marker:
# `make test-fast` runs losses and config (pure torch and configuration, no Megatron model),
# `make test-mcore019` the megatron layer (pytest.ini describes each).
LAYERS = ("losses", "config", "megatron", "run")


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        layer = item.path.parent.name
        if layer not in LAYERS:
            raise pytest.UsageError(f"{item.path}: a test file belongs in one of the layer folders tests/{{{','.join(LAYERS)}}}")
        item.add_marker(layer)
