"""Kahan's compensated summation with the sum *and* the compensation stored in the format.

Two arrays, ``s`` and ``c``, every operation rounded to nearest in the format::

    y = RN(t - c)          # subtract the previous step's lost low part
    u = RN(s + y)
    c = RN(RN(u - s) - y)  # (u - s) - y: what this addition just lost, negated
    s = u

The read-out is ``s - c`` (evaluated in fp64); ``s`` alone is what an optimizer reading the buffer
would see.  The nominal memory is two arrays of the format: a bf16 Kahan buffer costs 4 bytes per
element, like fp32.  A lost update is an element-add that changed neither ``s`` nor ``c`` (with
``t`` finite and nonzero and ``s`` finite).  On CPU a bf16 buffer of at least
``_native.MIN_NUMEL`` elements uses the compiled kernel, which gives the same bits and count.
"""

from __future__ import annotations

import torch

from precision_lab import _native
from precision_lab.formats import Format
from precision_lab.strategies import Strategy, absorbed
from precision_lab.strategies.arithmetic import rounded_add, rounded_sub

__all__ = ["Kahan", "kahan_step"]


def kahan_step(s: torch.Tensor, c: torch.Tensor, t: torch.Tensor, f: Format, count_lost: bool) -> int:
    """One Kahan step in format f, in place on (s, c); returns lost element-adds."""
    if s.device.type == "cpu" and s.dtype == torch.bfloat16 and _native.enabled(s.numel()):
        return _native.kahan_add_bf16(s, c, t)
    y = rounded_sub(t, c, f)  # subtract the previous step's lost low part
    u = rounded_add(s, y, f)
    new_c = rounded_sub(rounded_sub(u, s, f), y, f)  # (u - s) - y: what this addition just lost, negated
    lost = 0
    if count_lost:  # unchanged means neither the sum nor the compensation moved
        lost = int((absorbed(u, s, t) & (new_c == c)).sum())
    c.copy_(new_c)
    s.copy_(u)
    return lost


class Kahan(Strategy):
    """A Kahan buffer: the running ``sum`` and its ``compensation``, both in the format."""

    name = "kahan"

    def __init__(self, fmt: Format, shape: torch.Size, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(fmt, shape, dtype=dtype, device=device)
        self.sum = self.zeros()
        self.compensation = self.zeros()

    @property
    def arrays(self) -> int:
        """Two arrays: the sum and the compensation."""
        return 2

    def add(self, t: torch.Tensor, *, generator: torch.Generator | None, count_lost: bool) -> int:
        """One Kahan step; returns the lost element-adds."""
        return kahan_step(self.sum, self.compensation, t, self.format, count_lost)

    def value(self) -> torch.Tensor:
        """The compensated read-out ``sum - compensation``, evaluated in fp64."""
        return self.sum.double() - self.compensation.double()

    def raw_sum(self) -> torch.Tensor:
        """``sum`` alone, as float64: what an optimizer reading the buffer sees."""
        return self.sum.to(torch.float64, copy=True)

    def scaled_value(self, factor: float) -> torch.Tensor:
        """``sum`` and ``compensation`` each scaled and rounded to the format, then subtracted in fp64."""
        return self.round_to_format(self.sum.to(torch.float64) * factor) - self.round_to_format(
            self.compensation.to(torch.float64) * factor
        )
