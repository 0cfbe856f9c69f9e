"""Counter-based random bits: a splitmix64 hash of (key, counter).

Stochastic rounding needs one independent random word per element.  ``torch.randint`` is a
sequential generator and costs more than the rounding itself (see ``benchmarks/bench_rounding.py``),
so precision_lab draws a single 63-bit *key* from the user's ``torch.Generator`` and hashes the
element index with it::

    z  = key + (counter + 1) * 0x9E3779B97F4A7C15        (mod 2^64, the golden-ratio increment)
    z  = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9             (mod 2^64)
    z  = (z ^ (z >> 27)) * 0x94D049BB133111EB             (mod 2^64)
    w  = z ^ (z >> 31)                                     (64 random bits)

This is Steele, Lea & Flood's SplitMix64 (OOPSLA 2014) evaluated at an arbitrary position, i.e. a
counter-based generator in the sense of Salmon et al. (SC 2011): any element's word is computable
independently, so the same bits come out of the torch fallback, the compiled CPU kernel and CUDA.
Its sequential output passes BigCrush; ``tests/test_random.py`` checks the properties we rely on.

Torch has no uint64 arithmetic, so the torch version works on int64 with wrapping multiplication
(two's complement, as every torch backend implements it) and emulates the logical shift with a mask.
"""

from __future__ import annotations

import torch

__all__ = ["derive_key", "pair_key", "splitmix64", "splitmix64_int"]

_MASK64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB


def _signed(v: int) -> int:
    """Reinterpret a 64-bit unsigned integer as two's-complement int64."""
    return v - (1 << 64) if v >= 1 << 63 else v


def splitmix64_int(key: int, counter: int) -> int:
    """Reference SplitMix64 word for (key, counter) with Python integers (unsigned 64-bit result)."""
    z = (key + (counter + 1) * GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * MUL1) & _MASK64
    z = ((z ^ (z >> 27)) * MUL2) & _MASK64
    return z ^ (z >> 31)


def _lsr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def splitmix64(key: int, counter: torch.Tensor) -> torch.Tensor:
    """SplitMix64 words (as int64 bit patterns) for every entry of the int64 tensor ``counter``."""
    z = (counter + 1) * _signed(GAMMA) + _signed(key & _MASK64)
    z = (z ^ _lsr(z, 30)) * _signed(MUL1)
    z = (z ^ _lsr(z, 27)) * _signed(MUL2)
    return z ^ _lsr(z, 31)


def derive_key(generator: torch.Generator | None) -> int:
    """Draw a 63-bit key from ``generator`` (torch's default generator when ``None``).

    Each call advances the generator, so successive roundings use independent streams and the whole
    sequence is reproducible from the generator's seed.
    """
    if generator is None:
        return int(torch.randint(0, 2**63 - 1, (1,)).item())
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device).item())


def mix_key(key: int, salt: int) -> int:
    """A new key derived from ``key`` for a secondary stream (e.g. refinement draws)."""
    return splitmix64_int(key, (1 << 62) + salt) >> 1


#: Salt of :func:`pair_key`'s stream; far above the refinement levels that :func:`mix_key` also salts.
PAIR_SALT = 1 << 40


def pair_key(key: int) -> int:
    """The key of the second decision of an exact-sum stochastic rounding (``s + t = hi + lo``).

    Stochastic accumulation rounds the exact ``hi + lo``: the stream ``key`` decides as for ``hi``
    alone, and where ``lo`` can still tip the result (probability at most one fine spacing of the
    wide format over the target's gap) the independent stream ``pair_key(key)`` decides on ``lo``
    (see :mod:`precision_lab.strategies.stochastic`).  One definition for the torch code and the
    compiled kernels, so both give the same bits.
    """
    return mix_key(key, PAIR_SALT)
