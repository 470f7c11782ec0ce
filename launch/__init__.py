"""Entry points: ``python -m launch.NAME`` from the repository root."""
import sys

BAD_INPUT_EXIT = 2


def run_main(main, argv=None) -> int:
    """The exit code of ``main(argv)``: 0, or 2 after printing ``error: ...`` once when it
    raises on bad configuration or input (ValueError, FileNotFoundError: the message names the
    key or file)."""
    try:
        main(argv)
        return 0
    except (ValueError, FileNotFoundError) as e:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return BAD_INPUT_EXIT
