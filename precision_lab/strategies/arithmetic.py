"""Arithmetic in a format: one correctly rounded add or subtract, the work dtype, TwoSum.

Every strategy computes with these.  An operation of format ``f`` runs natively where torch has the
dtype (bf16/fp16 ops round once from fp32, which is correct rounding for + and - because
24 >= 2p + 1 (Figueroa 1995, "When is double rounding innocuous?")); otherwise in a *work* dtype of
at least 2p + 1 bits covering the format's range (fp32 for fp8, tf32 and custom formats up to 11
bits of precision, fp64 up to 26), followed by :func:`~precision_lab.rounding.round_nearest` --
again innocuous double rounding.  The buffers of a format are stored in its work dtype
(:func:`work_dtype`), so a stored number is always a number of the format.
"""

from __future__ import annotations

import torch

from precision_lab.formats import Format
from precision_lab.rounding import round_nearest

__all__ = ["fp32_is_wide_enough", "rounded_add", "rounded_sub", "two_sum", "work_dtype"]

#: dtypes whose + and - torch computes in the format itself (one rounding, see the module docstring)
NATIVE_ARITH = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def fp32_is_wide_enough(f: Format) -> bool:
    """fp32 holds 2p + 2 bits of f and its whole range (p <= 11: fp8, tf32, small customs)."""
    return 2 * f.precision + 2 <= 24 and f.emax <= 127 and f.quantum_exponent_min >= -149


def work_dtype(f: Format) -> torch.dtype:
    """Dtype in which one op of format ``f`` is computed before rounding (see the module docstring).

    Raises:
        ValueError: For a custom format of more than 26 bits of precision without a torch dtype.
    """
    if f.torch_dtype in NATIVE_ARITH:
        return f.torch_dtype
    if fp32_is_wide_enough(f):
        return torch.float32
    if 2 * f.precision + 1 <= 53 and f.quantum_exponent_min >= -1074:
        return torch.float64
    raise ValueError(
        f"format {f.name!r} (precision {f.precision}) cannot be accumulated exactly-rounded here: "
        "custom formats need precision <= 26 bits or a native torch dtype"
    )


def _rounded(r: torch.Tensor, f: Format) -> torch.Tensor:
    """RN_f of one sum or difference ``r`` formed in the work dtype (already rounded where native)."""
    if r.dtype in NATIVE_ARITH and f.torch_dtype == r.dtype:
        return r
    return round_nearest(r, f)


def rounded_add(a: torch.Tensor, b: torch.Tensor, f: Format) -> torch.Tensor:
    """``RN_f(a + b)`` for tensors of the work dtype: one correctly rounded addition."""
    return _rounded(a + b, f)


def rounded_sub(a: torch.Tensor, b: torch.Tensor, f: Format) -> torch.Tensor:
    """``RN_f(a - b)`` for tensors of the work dtype: one correctly rounded subtraction."""
    return _rounded(a - b, f)


def two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Knuth's TwoSum: hi = fl(a + b) and lo with hi + lo == a + b exactly (no overflow)."""
    hi = a + b
    bb = hi - a
    lo = (a - (hi - bb)) + (b - bb)
    # Inf/NaN: the error term would be Inf - Inf = NaN; the sum itself already says it all.
    return hi, torch.where(torch.isfinite(hi), lo, torch.zeros_like(lo))
