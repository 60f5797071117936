"""RNG streams are named, not numbered: `stream_key(seed, stage_name, purpose)`.

A stream's key depends on the run seed and its names only, so adding a stage or a purpose never
shifts another stream's randomness (and a resumed stage draws what the uninterrupted one did).
"""

from __future__ import annotations

import zlib

import jax


def stream_seed(seed: int, *names: str) -> int:
    """A 31-bit integer seed for the stream `names` of run seed `seed` (stable across runs)."""
    for name in names:
        seed = zlib.crc32(name.encode(), seed & 0xFFFFFFFF) & 0x7FFFFFFF
    return seed


def stream_key(seed: int, *names: str) -> jax.Array:
    """The PRNG key of a named stream, e.g. `stream_key(seed, "round2/ppo", "sample")`."""
    return jax.random.key(stream_seed(seed, *names))
