"""Entry points: ``python -m launch.NAME`` from the repository root."""
import sys

from tropd_megatron import RunError

BAD_INPUT_EXIT = 2
RUN_ERROR_EXIT = 1


def run_main(main, argv=None) -> int:
    """The exit code of ``main(argv)``: 0, or 2 after printing ``error: ...`` once when it
    raises on bad configuration or input (ValueError, FileNotFoundError: the message names the
    key or file), or 1 after a RunError (a run that cannot go on)."""
    try:
        main(argv)
        return 0
    except (ValueError, FileNotFoundError, RunError) as e:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0 or (isinstance(e, RunError) and not e.all_ranks):
            print(f"error{f' on rank {rank}' if rank else ''}: {e}", file=sys.stderr, flush=True)
        return RUN_ERROR_EXIT if isinstance(e, RunError) else BAD_INPUT_EXIT
