"""Compiled CPU kernels (numba); placeholder until the kernels land: everything uses torch."""

from __future__ import annotations

import torch


def enabled() -> bool:
    """Whether the compiled kernels are available and not disabled."""
    return False


def sr_bf16(x: torch.Tensor, out: torch.Tensor, key: int, random_bits: int) -> None:
    """fp32 -> bf16 stochastic rounding into ``out`` (fp32 or bf16, contiguous)."""
    raise NotImplementedError
