"""The pairwise strategy: a binary-counter cascade of partial sums in the format.

Slot k holds the round-to-nearest sum of 2^k consecutive addends.  An add carries the addend up
through the occupied slots (merging with RN and emptying them) into the first empty one, exactly as
a binary counter increments, so a sum of N addends is a balanced tree of depth ceil(log2 N)
(Higham 2002, §4.2): its error bound grows with log2 N instead of N.  The read-out merges the occupied
slots from the smallest up.

Memory: after n adds ``floor(log2 n) + 1`` slot positions are allocated (the ``arrays`` count); the
number of partial sums alive at once is the number of one bits of n, at most ``floor(log2(n + 1))``.
A lost update is an element-add whose cascade, in some merge, returned one operand unchanged
although the other was finite and nonzero (counted once per element-add, whichever operand
vanished).
"""

from __future__ import annotations

import torch

from precision_lab.formats import Format
from precision_lab.strategies import Strategy, absorbed
from precision_lab.strategies.arithmetic import rounded_add

__all__ = ["Pairwise", "pairwise_step", "pairwise_total"]


def pairwise_step(slots: list[torch.Tensor | None], t: torch.Tensor, f: Format, count_lost: bool) -> int:
    """Binary-counter insertion: carry t up through occupied slots, merging with RN."""
    carry = t.clone()
    # An element-add is lost when some merge of its cascade returned one operand unchanged although
    # the other was finite and nonzero (counted once per element-add, whichever operand vanished).
    lost_mask = torch.zeros_like(t, dtype=torch.bool) if count_lost else None
    for k in range(len(slots) + 1):
        if k == len(slots):
            slots.append(None)
        slot = slots[k]
        if slot is None:
            slots[k] = carry
            return int(lost_mask.sum()) if count_lost else 0
        merged = rounded_add(slot, carry, f)
        if count_lost:
            lost_mask |= absorbed(merged, slot, carry) | absorbed(merged, carry, slot)
        slots[k] = None
        carry = merged
    raise AssertionError("unreachable")


def pairwise_total(slots: list[torch.Tensor | None], f: Format) -> torch.Tensor | None:
    """The cascade's read-out: occupied slots merged from the smallest up, with RN."""
    total = None
    for slot in slots:
        if slot is None:
            continue
        total = slot.clone() if total is None else rounded_add(slot, total, f)
    return total


class Pairwise(Strategy):
    """A pairwise buffer: the cascade's ``slots`` (slot k: a sum of 2^k addends, or None)."""

    name = "pairwise"

    def __init__(self, fmt: Format, shape: torch.Size, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(fmt, shape, dtype=dtype, device=device)
        self.slots: list[torch.Tensor | None] = []

    @property
    def arrays(self) -> int:
        """The slot positions allocated so far, floor(log2 n) + 1 after n adds (1 before any).

        The peak number of partial sums alive at once is floor(log2(n + 1)), one less whenever
        n + 1 is not a power of two (n = 5: 3 positions, at most 2 alive).
        """
        return max(1, len(self.slots))

    def add(self, t: torch.Tensor, *, generator: torch.Generator | None, count_lost: bool) -> int:
        """Carry ``t`` through the cascade; returns the lost element-adds."""
        return pairwise_step(self.slots, t, self.format, count_lost)

    def value(self) -> torch.Tensor:
        """The occupied slots merged in the format (smallest first), as float64."""
        total = pairwise_total(self.slots, self.format)
        if total is None:
            return torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        return total.double()
