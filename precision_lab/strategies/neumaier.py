"""Neumaier's (Kahan-Babuška) compensated summation with the sum *and* the compensation in the format.

Two arrays, ``s`` and ``c``, every operation rounded to nearest in the format::

    u = RN(s + t)
    if |s| >= |t|:  d = RN(RN(s - u) + t)   # Fast2Sum with the larger operand first:
    else:           d = RN(RN(t - u) + s)   # d == (s + t) - u exactly (no overflow)
    c = RN(c + d)                           # the lost low parts, summed in the format
    s = u

The read-out is ``s + c`` (evaluated in fp64); ``s`` alone is what an optimizer reading the buffer
would see.  Sign convention: ``c`` holds the lost low parts themselves, so the read-out *adds* it,
where Kahan's ``c`` holds them negated and its read-out is ``s - c``.

Unlike Kahan's step, which subtracts the compensation from the next addend before adding (and so
loses it whenever ``|t| > |s|``, where ``RN(u - s)`` is not exact), the branch puts the larger of
``s`` and ``t`` first, so each step's rounding error ``d`` is captured exactly (Dekker's Fast2Sum,
radix 2, round to nearest, gradual underflow) whatever the order of magnitudes: the classic
``[1, 1e100, 1, -1e100]`` sums to 2 in fp64 where Kahan's gives 0.  The price: ``c`` is never fed
back into ``s``, so it is itself a naive sum of all the errors and stagnates like one once it grows
to ``2**p`` times the errors added to it (see :func:`~precision_lab.theory.neumaier_sum_bound`).

The nominal memory is two arrays of the format: a bf16 Neumaier buffer costs 4 bytes per element,
like fp32.  A lost update is an element-add that changed neither ``s`` nor ``c`` (with ``t`` finite
and nonzero and ``s`` finite), as for Kahan.  There is no compiled bf16 kernel for this strategy
yet: every format runs the torch path below.
"""

from __future__ import annotations

import torch

from precision_lab.formats import Format
from precision_lab.strategies import Strategy, absorbed
from precision_lab.strategies.arithmetic import rounded_add, rounded_sub

__all__ = ["Neumaier", "neumaier_step"]


def neumaier_step(s: torch.Tensor, c: torch.Tensor, t: torch.Tensor, f: Format, count_lost: bool) -> int:
    """One Neumaier step in format f, in place on (s, c); returns lost element-adds."""
    u = rounded_add(s, t, f)
    s_first = s.abs() >= t.abs()  # the larger operand first: then (big - u) + small is exact
    big = torch.where(s_first, s, t)
    small = torch.where(s_first, t, s)
    d = rounded_add(rounded_sub(big, u, f), small, f)  # (s + t) - u: what this addition just lost
    new_c = rounded_add(c, d, f)
    lost = 0
    if count_lost:  # unchanged means neither the sum nor the compensation moved
        lost = int((absorbed(u, s, t) & (new_c == c)).sum())
    c.copy_(new_c)
    s.copy_(u)
    return lost


class Neumaier(Strategy):
    """A Neumaier buffer: the running ``sum`` and its ``compensation``, both in the format."""

    name = "neumaier"

    def __init__(self, fmt: Format, shape: torch.Size, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(fmt, shape, dtype=dtype, device=device)
        self.sum = self.zeros()
        self.compensation = self.zeros()

    @property
    def arrays(self) -> int:
        """Two arrays: the sum and the compensation."""
        return 2

    def add(self, t: torch.Tensor, *, generator: torch.Generator | None, count_lost: bool) -> int:
        """One Neumaier step; returns the lost element-adds."""
        return neumaier_step(self.sum, self.compensation, t, self.format, count_lost)

    def value(self) -> torch.Tensor:
        """The compensated read-out ``sum + compensation``, evaluated in fp64."""
        return self.sum.double() + self.compensation.double()

    def raw_sum(self) -> torch.Tensor:
        """``sum`` alone, as float64: what an optimizer reading the buffer sees."""
        return self.sum.to(torch.float64, copy=True)

    def scaled_value(self, factor: float) -> torch.Tensor:
        """``sum`` and ``compensation`` each scaled and rounded to the format, then added in fp64."""
        return self.round_to_format(self.sum.to(torch.float64) * factor) + self.round_to_format(
            self.compensation.to(torch.float64) * factor
        )
