"""Replacing attributes of megatron-core (and torch) modules: the one way this package does it.

``patch`` checks that the attribute exists before replacing it (assigning an attribute never
fails, so a rename upstream would otherwise turn the patch into a silent no-op) and records it
with its reason in ``PATCHES``, which the tests walk (tests/config/test_architecture.py). The CPU
stand-ins (``cpu.py``) and the static engine's progress bar (``engines.py``) go through it; a
patch scoped to one call keeps the original in hand and puts it back (checkpoint.py's
``_steps_kept_while_loading``, which fails at once if the method is renamed).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

WRITTEN_FOR = "megatron-core 0.16.1 (the names checked in 0.19.0's source) and torch 2.13"


@dataclass(frozen=True)
class Patch:
    """One replaced attribute: ``owner`` (a module or class), the attribute's name, the value
    put there and why."""
    owner: object
    name: str
    value: object
    why: str


PATCHES: dict[tuple[int, str], Patch] = {}  # (id(owner), name) -> the patch in place


def patch(owner, name: str, value, why: str, leading_parameters: tuple[str, ...] = ()) -> None:
    """``owner.name = value``, after checking that ``owner.name`` exists and, for a function
    replaced by one that relies on how it is called, that its signature still begins with
    ``leading_parameters`` (a reordered or renamed argument upstream would otherwise reach
    the replacement in the wrong place)."""
    label = getattr(owner, "__name__", type(owner).__name__)
    if not hasattr(owner, name):
        raise RuntimeError(f"patch of {label}.{name} ({why}): it does not exist in the installed version; the "
                           f"patches were written for {WRITTEN_FOR}")
    if leading_parameters:
        found = tuple(inspect.signature(getattr(owner, name)).parameters)[:len(leading_parameters)]
        if found != tuple(leading_parameters):
            raise RuntimeError(f"patch of {label}.{name} ({why}): its parameters begin {found}, not "
                               f"{tuple(leading_parameters)}; the patches were written for {WRITTEN_FOR}")
    setattr(owner, name, value)
    PATCHES[id(owner), name] = Patch(owner, name, value, why)
