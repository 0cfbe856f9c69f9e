"""The stochastic strategy: ``s <- SR(s + t)`` of the EXACT sum ``s + t``.

One array ``s`` in the format.  Each add rounds the exact value ``x = s + t`` up to its upper
neighbour in the format with probability (x - down) / (up - down), else down, so the expected sum
is exact and small addends are not all lost: where naive accumulation stagnates, stochastic
rounding keeps the running sum unbiased.  That holds for EVERY addend, also one far below the
buffer's spacing: adding 2^-16 to 256 in bf16 moves the buffer with probability 2^-17.

Why the sum must be exact: a "wide enough" intermediate is not enough.  The round-to-nearest
criterion "form s + t in >= 2p + 2 bits, then round" (innocuous double rounding) does not carry over
to stochastic rounding: a wide sum rounded to nearest first loses every addend below half its own
spacing before the random decision sees it (in fp32 that is 2^-25 to 2^-24 of |s|), so the
buffer then never moves instead of moving with probability |t| / gap; and a partly kept addend
moves it with the wrong probability.  So each add uses:

* a wide dtype that holds every sum of two numbers of the format exactly -- fp32 where the format's
  numbers span at most 24 bits (``emax + 2 - quantum_exponent_min <= 24``: fp8_e4m3), fp64 where they
  span at most 53 (fp16, fp8_e5m2) -- and rounds that sum (:func:`~precision_lab.rounding.round_stochastic_keyed`);
* otherwise the error-free transformation ``s + t = hi + lo`` (TwoSum, exact barring overflow, which
  is handled) and a random decision on both: bf16 buffers through the 16-random-bit fast path
  extended to the pair (:func:`~precision_lab.rounding.sr_bf16_sum_keyed`, or on CPU from
  ``_native.MIN_NUMEL`` elements the compiled kernel ``_native.sr_add_bf16``, the same bits), every
  other format (tf32, fp32, fp64, wide customs) in fp64
  (:func:`~precision_lab.rounding.round_stochastic_sum_keyed`).  Where ``lo == 0`` the bits are
  those of rounding ``hi``; where ``lo != 0`` a second, independent stream decides on ``lo`` in the
  rare case that ``lo`` can still change the outcome, so P(up) is the exact distance ratio.

Randomness: each add draws one key from the buffer's generator
(:func:`precision_lab._random.derive_key`) and element i takes its bits from the counter-based
streams of that key (``key`` and ``_random.pair_key(key)``), so a buffer is reproducible from its
generator's seed on every path and device.
"""

from __future__ import annotations

import torch

from precision_lab import _native, _random
from precision_lab.formats import Format
from precision_lab.rounding import round_stochastic_keyed, round_stochastic_sum_keyed, sr_bf16_sum_keyed
from precision_lab.strategies import Strategy, count_absorbed

__all__ = ["Stochastic", "stochastic_step"]


def _sum_bits(f: Format) -> int:
    """Bits that every sum of two finite numbers of ``f`` needs: multiples of 2^qmin below 2^(emax+2)."""
    return f.emax + 2 - f.quantum_exponent_min


def stochastic_step(s: torch.Tensor, t: torch.Tensor, f: Format, key: int, count_lost: bool) -> int:
    """Stochastic step ``s <- SR_f(s + t)`` of the exact sum, in place; returns the lost element-adds.

    Args:
        s: Buffer in the format's work dtype, updated in place.
        t: Addend of s's shape, dtype and device, holding numbers of ``f``.
        f: The buffer's format.
        key: Key of this add's random streams (``_random.derive_key``).
        count_lost: Whether to count the lost element-adds (else 0 is returned).
    """
    if s.device.type == "cpu" and s.dtype == torch.bfloat16 and _native.enabled(s.numel()):
        return _native.sr_add_bf16(s, t, key, count_lost)
    old = s.clone() if count_lost else None
    if s.dtype == torch.bfloat16:  # bf16 layout (with subnormals): the fast path on the exact pair
        new = sr_bf16_sum_keyed(s.float(), t.float(), key)
    elif _sum_bits(f) <= 24:
        new = round_stochastic_keyed(s.float() + t.float(), f, key)  # exact in fp32
    elif _sum_bits(f) <= 53:
        new = round_stochastic_keyed(s.double() + t.double(), f, key)  # exact in fp64
    else:
        new = round_stochastic_sum_keyed(s.double(), t.double(), f, key)
    s.copy_(new)
    return count_absorbed(s, old, t) if count_lost else 0


class Stochastic(Strategy):
    """A stochastic-rounding buffer: the running ``sum`` in the format."""

    name = "stochastic"
    needs_generator = True

    def __init__(self, fmt: Format, shape: torch.Size, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(fmt, shape, dtype=dtype, device=device)
        self.sum = self.zeros()

    def add(self, t: torch.Tensor, *, generator: torch.Generator | None, count_lost: bool) -> int:
        """``sum <- SR(sum + t)`` with one key drawn from ``generator``; returns the lost element-adds."""
        return stochastic_step(self.sum, t, self.format, _random.derive_key(generator), count_lost)

    def value(self) -> torch.Tensor:
        """``sum`` as float64."""
        return self.sum.to(torch.float64, copy=True)
