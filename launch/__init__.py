"""Entry points: ``python -m launch.NAME`` from the repository root."""
import os
import threading
import time

from tropd_megatron import ConfigError, RunError
from tropd_megatron.logs import configure, logger

# before any launcher imports megatron-core, whose modules warn at import
configure()

BAD_INPUT_EXIT = 2
RUN_ERROR_EXIT = 1


def exit_with_launcher(poll_seconds: float = 1.0) -> None:
    """Under torchrun, exit when torchrun is gone: its workers run in sessions of their own, so
    after a ``kill -9`` of torchrun they would train on and write checkpoints beside the next
    launch. (Not outside torchrun: a ``nohup`` run outlives its shell on purpose.)"""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(poll_seconds)
        logger.error(f"rank {os.environ.get('RANK', '?')}: torchrun (pid {launcher}) is gone; exiting")
        os._exit(RUN_ERROR_EXIT)  # checkpoints are written atomically: a save cut short is never read

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


def run_main(main, argv=None) -> int:
    """The exit code of ``main(argv)``: 0, or 2 after printing ``error: ...`` once when it
    raises on bad configuration or input (ConfigError, FileNotFoundError: the message names the
    key or file), or 1 after a RunError (a run that cannot go on). Anything else, a bug, keeps
    its traceback (exit 1)."""
    exit_with_launcher()
    try:
        main(argv)
        return 0
    except (ConfigError, FileNotFoundError, RunError) as e:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0 or (isinstance(e, RunError) and not e.all_ranks):
            logger.error(f"{f'rank {rank}: ' if rank else ''}{e}")
        return RUN_ERROR_EXIT if isinstance(e, RunError) else BAD_INPUT_EXIT
