"""One logging setup for a run: messages through Python's ``logging`` on the rank that holds
the reduced metrics, written above the progress bar; every numeric metric to
``metrics.jsonl`` and TensorBoard; megatron-core's known-harmless warnings quieted.

    from tropd_megatron.logs import logger
    logger.info("resumed from %s", path)

Results a command prints for the user (``launch.evaluate``'s JSON line, ``launch.plan``'s
table, the demo's summary) go to stdout with ``print``; everything else is logged.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings

from tqdm import tqdm

logger = logging.getLogger("tropd_megatron")

# megatron-core's notices on every rank, harmless here: the local layers and torch's
# optimizers are the intended fallback without TransformerEngine / apex;
# CUDA_DEVICE_MAX_CONNECTIONS matters only on GPUs (the Slurm script sets it); the deprecated
# default cuda_graph_scope is never used (no CUDA graphs); its distributed optimizer calls
# torch's older collective names and reads .grad of its main-parameter shards (views, so
# torch warns they are not leaves; it sets them itself)
KNOWN_HARMLESS = (r"Apex is not installed", r"Transformer Engine and Apex are not installed",
                  r"CUDA_DEVICE_MAX_CONNECTIONS", r"full scope is deprecated",
                  r"`torch.distributed.reduce_scatter_tensor` is deprecated",
                  r"`torch.distributed.all_gather_into_tensor` is deprecated",
                  r"The .grad attribute of a Tensor that is not a leaf Tensor is being accessed")


def quiet_known_warnings() -> None:
    """Hide exactly the warnings in KNOWN_HARMLESS; every other warning still shows."""
    for message in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=f".*({message})")


def logging_rank() -> bool:
    """Whether this process logs: the rank that holds the reduced metrics (last pipeline
    stage, first tensor- and data-parallel rank) once Megatron's groups exist, global rank 0
    before."""
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            return (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
                    and parallel_state.get_data_parallel_rank() == 0)
    except ImportError:
        pass
    import torch.distributed as dist

    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))) == 0


class _AboveProgressBar(logging.Handler):
    """Writes records to stderr through tqdm, so that a progress bar stays below them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
            sys.stderr.flush()
        except Exception:  # a logging call must never end a run
            self.handleError(record)


class _RankFilter(logging.Filter):
    """Info from the logging rank only; warnings and errors from every rank that has them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or logging_rank()


class _Prefixed(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def configure() -> None:
    """What an entry point sets up (idempotent; the launchers call it, a library import does
    not): the known-harmless warnings quiet, and the package's logger writing above progress
    bars from the logging rank, plain messages, ``error:`` / ``warning:`` prefixed."""
    quiet_known_warnings()
    if any(isinstance(h, _AboveProgressBar) for h in logger.handlers):
        return
    handler = _AboveProgressBar()
    handler.setFormatter(_Prefixed())
    handler.addFilter(_RankFilter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Every step's numeric metrics, at full precision, to ``DIR/metrics.jsonl`` and (when
    configured) TensorBoard and Weights & Biases, from the logging rank; a no-op on the others.
    ``wandb``: a run_config.WandbConfig (its ``project`` None: off); ``config``: the run's
    flattened settings, recorded as the W&B run's config."""

    def __init__(self, checkpoint_dir: str, tensorboard_dir: str | None, wandb=None, run_name: str = "run",
                 config: dict | None = None):
        self.path = os.path.join(checkpoint_dir, METRICS_FILE)
        self.active = logging_rank()
        self.tensorboard = self.wandb = None
        if self.active and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(tensorboard_dir)
        if self.active and wandb is not None and wandb.project and wandb.mode != "disabled":
            self.wandb = _wandb_run(wandb, checkpoint_dir, run_name, config or {})

    def step(self, step: int, metrics: dict, seconds: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics, "seconds": seconds}) + "\n")
        # every numeric metric (bools as 0 / 1); not reasons, not None
        scalars = {f"train/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        scalars.update({f"time/{k}": float(v) for k, v in seconds.items()})
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log({tag: value}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(settings, checkpoint_dir: str, run_name: str, config: dict):
    """A W&B run whose id follows from the checkpoint directory, so that a resumed run
    continues it (steps W&B already holds are not logged again: it keeps the first record)."""
    import hashlib

    import wandb

    mode = settings.mode if settings.mode != "auto" else ("online" if _wandb_reachable() else "offline")
    run_id = hashlib.blake2b(os.path.abspath(checkpoint_dir).encode(), digest_size=8).hexdigest()
    logger.info(f"W&B: project {settings.project}, run {run_id} ({mode}"
                + (f"; `wandb sync {settings.dir or checkpoint_dir}/wandb/offline-run-*` uploads it)"
                   if mode == "offline" else ")"))
    return wandb.init(project=settings.project, entity=settings.entity, name=settings.name or run_name, id=run_id,
                      resume="allow", mode=mode, dir=settings.dir or checkpoint_dir, config=config)


def _wandb_reachable(timeout: float = 3.0) -> bool:
    """Whether an API key is configured and the W&B server accepts a connection."""
    import socket
    from urllib.parse import urlparse

    import wandb

    if not (os.environ.get("WANDB_API_KEY") or wandb.api.api_key):
        return False
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_metrics(checkpoint_dir) -> dict:
    """{step: metrics} from a run's ``metrics.jsonl``; after a resume the steps past the last
    checkpoint appear twice, and the later record (the one the run kept) wins."""
    by_step = {}
    with open(os.path.join(checkpoint_dir, METRICS_FILE)) as f:
        for line in f:
            record = json.loads(line)
            by_step[record["step"]] = record
    return dict(sorted(by_step.items()))
