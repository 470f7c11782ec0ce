import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

# One thread: forking workers after a multi-threaded op has hung on these machines.
torch.set_num_threads(1)
