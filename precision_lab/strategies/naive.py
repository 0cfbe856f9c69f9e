"""The naive strategy: ``s <- RN(s + t)``, what ``p.grad += g`` does in the buffer's dtype.

One array ``s`` in the format; every add rounds once to nearest.  It stagnates: once
``|t| < ulp(s) / 2`` an addend is absorbed entirely (a lost update), so summing N equal addends in
a format of p bits stops growing near ``2^p`` of them.  Without lost-update counting a buffer whose
format has a torch dtype is exactly ``s.add_(t)``; on CPU a bf16 buffer of at least
``_native.MIN_NUMEL`` elements uses the compiled kernel, which gives the same bits and count.
"""

from __future__ import annotations

import torch

from precision_lab import _native
from precision_lab.formats import Format
from precision_lab.strategies import Strategy, count_absorbed
from precision_lab.strategies.arithmetic import rounded_add

__all__ = ["Naive", "naive_step"]


def naive_step(s: torch.Tensor, t: torch.Tensor, f: Format, count_lost: bool) -> int:
    """Naive step ``s <- RN(s + t)`` in place; returns the lost element-adds (0 when not counted)."""
    if count_lost:
        if s.device.type == "cpu" and s.dtype == torch.bfloat16 and _native.enabled(s.numel()):
            return _native.naive_add_bf16(s, t)
        old = s.clone()
        s.copy_(rounded_add(s, t, f))
        return count_absorbed(s, old, t)
    if f.torch_dtype == s.dtype:
        s.add_(t)
    else:
        s.copy_(rounded_add(s, t, f))
    return 0


class Naive(Strategy):
    """A naive buffer: the running sum ``sum`` in the format."""

    name = "naive"

    def __init__(self, fmt: Format, shape: torch.Size, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(fmt, shape, dtype=dtype, device=device)
        self.sum = self.zeros()

    def add(self, t: torch.Tensor, *, generator: torch.Generator | None, count_lost: bool) -> int:
        """``sum <- RN(sum + t)``; returns the lost element-adds."""
        return naive_step(self.sum, t, self.format, count_lost)

    def value(self) -> torch.Tensor:
        """``sum`` as float64."""
        return self.sum.to(torch.float64, copy=True)
