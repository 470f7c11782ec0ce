"""tropd_megatron: Trust Region On-Policy Distillation at Megatron scale."""

__version__ = "0.1.0"
