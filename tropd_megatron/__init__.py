"""tropd_megatron: Trust Region On-Policy Distillation at Megatron scale."""

__version__ = "0.1.0"


class ConfigError(ValueError):
    """Bad configuration or input, the message naming the key, file or line: the entry points
    print it and exit 2, without a traceback. Anything else that escapes them is a bug and
    keeps its traceback. A ValueError, so that callers catching ValueError keep working."""


class RunError(RuntimeError):
    """A run that cannot go on (not bad input): the entry points print its message and exit 1.
    ``all_ranks``: every rank raises it together (rank 0 prints it), else the ranks that raise
    it print it."""

    all_ranks = True
