"""The stochastic strategy: ``s <- SR(s + t)``, the sum formed in at least 2p + 2 bits.

One array ``s`` in the format.  Each add forms ``s + t`` wide enough that stochastic rounding sees
its exact value: in fp32 for formats of p <= 11 bits (fp8, tf32, small customs; bf16 through the
16-random-bit fast path), in fp64 up to p = 26 (fp32 buffers included), and for an fp64 buffer as an
exact TwoSum pair ``hi + lo`` whose stochastic rounding is decided by ``lo`` alone
(:func:`_sr_pair`).  It rounds up with probability (x - down) / (up - down), so the expected sum is
exact and small addends are not all lost: where naive accumulation stagnates, stochastic rounding
keeps the running sum unbiased.

Randomness: each add draws one key from the buffer's generator
(:func:`precision_lab._random.derive_key`) and element i takes its bits from the counter-based
stream of that key, so a buffer is reproducible from its generator's seed on every path.  On CPU a
bf16 buffer of at least ``_native.MIN_NUMEL`` elements uses the compiled kernel (same bits, same
lost count).
"""

from __future__ import annotations

import math

import torch

from precision_lab import _native, _random
from precision_lab.formats import Format
from precision_lab.rounding import bernoulli, round_stochastic_keyed
from precision_lab.strategies import Strategy, count_absorbed
from precision_lab.strategies.arithmetic import fp32_is_wide_enough, two_sum

__all__ = ["Stochastic", "stochastic_step"]


def stochastic_step(s: torch.Tensor, t: torch.Tensor, f: Format, key: int, count_lost: bool) -> int:
    """Stochastic step ``s <- SR_f(s + t)``, s + t formed in >= 2p + 2 bits; returns lost element-adds."""
    if s.device.type == "cpu" and s.dtype == torch.bfloat16 and _native.enabled(s.numel()):
        return _native.sr_add_bf16(s, t, key, count_lost)
    old = s.clone() if count_lost else None
    if fp32_is_wide_enough(f):
        new = round_stochastic_keyed(s.float() + t.float(), f, key)  # 24 >= 2p + 2 bits
    elif f.precision <= 26:
        new = round_stochastic_keyed(s.double() + t.double(), f, key)
    else:  # fp64 buffer: s + t = hi + lo exactly, then round the pair stochastically
        hi, lo = two_sum(s, t)
        new = _sr_pair(hi, lo, key)
    s.copy_(new)
    return count_absorbed(s, old, t) if count_lost else 0


def _sr_pair(hi: torch.Tensor, lo: torch.Tensor, key: int) -> torch.Tensor:
    """Stochastically round the exact value hi + lo (fp64, |lo| <= ulp(hi)/2) to fp64."""
    # fp64 buffer: the neighbours of hi + lo are hi and the next fp64 number in lo's direction.
    toward = torch.where(lo > 0, torch.full_like(hi, math.inf), torch.full_like(hi, -math.inf))
    nxt = torch.nextafter(hi, toward)
    gap = nxt - hi  # a power of two (up to sign): lo / gap is exact
    p = torch.where(lo == 0, torch.zeros_like(lo), (lo / gap).abs())
    out = torch.where(bernoulli(p, key) > 0, nxt, hi)
    return torch.where(torch.isfinite(hi), out, hi)


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
