"""Every random stream's seed, derived from the run's seed and the stream's named parts.

Seeds made by arithmetic collide (``seed * 7 + rank``: run seed 1 on rank 0 is run seed 0 on
rank 7); a hash of the parts' names and values does not, short of a 64-bit collision.
"""
from __future__ import annotations

import hashlib
import json


def stream_seed(seed: int, purpose: str, **parts: int) -> int:
    """A 63-bit seed for the stream ``purpose`` of run ``seed`` at ``parts`` (e.g. step=3,
    rank=1): the same arguments give the same seed; any difference gives another."""
    key = json.dumps([int(seed), purpose, sorted((name, int(value)) for name, value in parts.items())])
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1
