"""tropd_megatron: Trust Region On-Policy Distillation at Megatron scale."""

__version__ = "0.1.0"


class RunError(RuntimeError):
    """A run that cannot go on (not bad input): the entry points print its message and exit 1.
    ``all_ranks``: every rank raises it together (rank 0 prints it), else the ranks that raise
    it print it."""

    all_ranks = True
