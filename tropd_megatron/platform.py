"""What this machine offers the GPU path: CUDA, flash-attn and TransformerEngine versions.

``validate`` checks a run against a Platform (the launchers pass ``Platform.detect()``), so
that what megatron-core would assert deep inside the first generation step is refused with
the keys to change before 100 GB of weights load; tests pass made-up platforms to force each
decision on a CPU machine.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Optional

# megatron-core's dynamic engine asserts flash-attn >= 2.7.3 or FA3 (transformer/attention.py)
FLASH_ATTN_MIN = (2, 7, 3)
# TransformerEngine's first version with an fp32 attention backend for THD (packed) rows
TE_THD_FP32_MIN = (2, 11)


def _version(*distributions: str) -> Optional[tuple]:
    for name in distributions:
        try:
            text = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return tuple(int(p) for p in text.split("+")[0].split(".")[:3] if p.isdigit())
    return None


@dataclass(frozen=True)
class Platform:
    cuda: bool
    flash_attn: Optional[tuple] = None  # flash-attn 2's version
    flash_attn_3: bool = False  # FA3 (flash_attn_3 / flashattn_hopper) importable
    transformer_engine: Optional[tuple] = None  # its version; None: not installed

    @classmethod
    def detect(cls) -> "Platform":
        import torch

        return cls(
            cuda=torch.cuda.is_available(),
            flash_attn=_version("flash-attn", "flash_attn"),
            flash_attn_3=any(importlib.util.find_spec(m) is not None for m in ("flash_attn_3", "flashattn_hopper")),
            transformer_engine=_version("transformer-engine", "transformer_engine", "transformer-engine-cu12"),
        )

    def dynamic_engine_problem(self) -> Optional[str]:
        """Why megatron-core's dynamic engine cannot run here (None: it can)."""
        if not self.cuda or self.flash_attn_3 or (self.flash_attn or ()) >= FLASH_ATTN_MIN:
            return None
        found = ".".join(map(str, self.flash_attn)) if self.flash_attn else "not installed"
        return (f"rollout.engine.name=dynamic needs flash-attn >= {'.'.join(map(str, FLASH_ATTN_MIN))} or FA3 on a "
                f"GPU (megatron-core asserts it in the first generation step); flash-attn: {found}. Install it "
                "(the pinned GPU stack, docs/tests.md) or set rollout.engine.name=static")


GPU_REQUIREMENTS = "gpu-requirements.txt"  # at the repository root


def gpu_stack_problems(requirements: str, platform: Platform | None = None) -> list[str]:
    """What this machine lacks of the pinned GPU stack (``requirements``: the path of
    gpu-requirements.txt; each ``name[extra]==version`` line is checked against the installed
    distribution): CUDA itself, then every missing or other-version package, by name."""
    platform = platform or Platform.detect()
    out = [] if platform.cuda else ["no CUDA GPU (torch.cuda.is_available() is False)"]
    with open(requirements) as f:
        pins = [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]
    for pin in pins:
        name, _, wanted = pin.partition("==")
        name = name.split("[")[0]
        have = _version(name, name.replace("-", "_"))
        if have is None:
            out.append(f"{name}=={wanted} is not installed")
        elif have[: len(wanted.split("."))] != tuple(int(p) for p in wanted.split(".")):
            out.append(f"{name} {'.'.join(map(str, have))} is installed; the pinned stack has {wanted}")
    return out


if __name__ == "__main__":  # make test-gpu's first step: name what is missing, exit 1
    import sys

    found = gpu_stack_problems(sys.argv[1] if len(sys.argv) > 1 else GPU_REQUIREMENTS)
    for problem in found:
        print(f"make test-gpu: {problem}", file=sys.stderr)
    print("the pinned GPU stack is present" if not found else f"see {GPU_REQUIREMENTS} (docs/tests.md)")
    sys.exit(1 if found else 0)
