"""The exact strategy: a renormalised double-double (TwoSum + Fast2Sum, ~106 bits) of the inputs.

The reference for every other strategy: it sums the addends *as rounded to the buffer format*
(every strategy rounds its input first), in two fp64 arrays ``hi`` and ``lo`` whatever the format.
It is exact while the partial sums fit in 106 bits; otherwise within 2^-104 of the sum of their
magnitudes (see :func:`exact_step`).  Its nominal memory is that of the emulation, two fp64 numbers
(16 bytes) per element, and it never loses an update.
"""

from __future__ import annotations

import torch

from precision_lab.formats import Format
from precision_lab.strategies import Strategy
from precision_lab.strategies.arithmetic import two_sum

__all__ = ["Exact", "exact_step"]


def exact_step(s: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> None:
    """Double-double accumulation (s, c) <- (s, c) + t, renormalised so that |c| <= ulp(s)/2.

    TwoSum makes s + t = h + e exactly; only the fp64 add c + e rounds, so each step's error is at
    most 2^-53 |c + e| <= 2^-105 |h| (Joldes, Muller & Popescu 2017, DWPlusFP: relative error <=
    2u^2 of the step's result).  The sum is exact whenever every partial sum fits in 106 bits,
    e.g. addends spanning fewer than ~106 - log2(N) binades; in general
    |value - exact| <= 2^-104 * sum_k |partial sum_k|.
    """
    h, e = two_sum(s, t)
    lo = c + e
    hi = h + lo  # Fast2Sum(h, lo): |lo| is far below |h|, so the error term below is exact
    c.copy_(torch.where(torch.isfinite(hi), lo - (hi - h), torch.zeros_like(lo)))
    s.copy_(hi)


class Exact(Strategy):
    """The exact reference: the double-double ``hi + lo`` in fp64, whatever the format."""

    name = "exact"

    def __init__(self, fmt: Format, shape: torch.Size, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(fmt, shape, dtype=dtype, device=device)
        self.hi = self.zeros()
        self.lo = self.zeros()

    @classmethod
    def storage_dtype(cls, fmt: Format) -> torch.dtype:
        """fp64 for every format (the addends are format numbers, exact in fp64)."""
        return torch.float64

    @property
    def bytes_per_element(self) -> float:
        """Two fp64 numbers: 16 bytes, whatever the format."""
        return 16.0

    @property
    def storage_arrays(self) -> int:
        """Two fp64 arrays, ``hi`` and ``lo``."""
        return 2

    def add(self, t: torch.Tensor, *, generator: torch.Generator | None, count_lost: bool) -> int:
        """``(hi, lo) <- (hi, lo) + t``; never loses an update (returns 0)."""
        exact_step(self.hi, self.lo, t)
        return 0

    def value(self) -> torch.Tensor:
        """``hi + lo`` rounded once to fp64."""
        return self.hi + self.lo

    def raw_sum(self) -> torch.Tensor:
        """``hi`` alone, as float64."""
        return self.hi.to(torch.float64, copy=True)

    def scaled_value(self, factor: float) -> torch.Tensor:
        """``hi`` and ``lo`` each multiplied by ``factor`` in fp64, then added."""
        return self.hi.to(torch.float64) * factor + self.lo.to(torch.float64) * factor
