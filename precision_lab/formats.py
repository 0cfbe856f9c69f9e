"""Floating-point formats: bit layouts and the constants derived from them.

A :class:`Format` is an IEEE-754-like binary format described by its exponent and stored mantissa
bits.  Everything else (precision, unit roundoff, range) is derived exactly from the layout, so a
custom ``eXmY`` format needs no table entry.  Two families of encodings exist:

* ``"ieee"``: the all-ones exponent field is reserved for ±Inf and NaN (fp16, bf16, fp32, fp64,
  fp8_e5m2 and every custom ``eXmY``).
* ``"fn"`` (finite, NaN): no Inf; only the all-ones exponent *and* all-ones mantissa pattern is NaN,
  so the top binade holds ordinary numbers (fp8_e4m3, the OCP "E4M3FN" format: max 448).

Exactness: every derived constant is a power of two or a short dyadic rational computed with
:func:`math.ldexp`, which is exact; the named formats' constants are pinned against hexadecimal
literals, ``torch.finfo`` and ``ml_dtypes.finfo`` in the tests.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

__all__ = ["FORMAT_NAMES", "Format", "get_format"]

# Hexadecimal literals of the named formats' ranges, written exactly (ml_dtypes ``_finfo.py`` style).
_PINNED = {
    "fp64": (float.fromhex("0x1.fffffffffffffp+1023"), float.fromhex("0x1p-1022"), float.fromhex("0x1p-1074")),
    "fp32": (float.fromhex("0x1.fffffep+127"), float.fromhex("0x1p-126"), float.fromhex("0x1p-149")),
    "tf32": (float.fromhex("0x1.ffcp+127"), float.fromhex("0x1p-126"), float.fromhex("0x1p-136")),
    "bf16": (float.fromhex("0x1.fep+127"), float.fromhex("0x1p-126"), float.fromhex("0x1p-133")),
    "fp16": (float.fromhex("0x1.ffcp+15"), float.fromhex("0x1p-14"), float.fromhex("0x1p-24")),
    "fp8_e4m3": (float.fromhex("0x1.cp+8"), float.fromhex("0x1p-6"), float.fromhex("0x1p-9")),
    "fp8_e5m2": (float.fromhex("0x1.cp+15"), float.fromhex("0x1p-14"), float.fromhex("0x1p-16")),
}


@dataclass(frozen=True)
class Format:
    """A binary floating-point format.

    Attributes:
        name: Canonical name (``"bf16"``, ``"e5m7"``, ...).
        exponent_bits: Width of the exponent field.
        mantissa_bits: Stored (explicit) mantissa bits; the implicit leading bit is not counted.
        subnormals: Whether gradual underflow is supported. When ``False`` results below
            :attr:`smallest_normal` in magnitude are flushed to a signed zero.
        encoding: ``"ieee"`` (Inf and NaN in the all-ones exponent) or ``"fn"`` (finite only; NaN is
            the all-ones pattern; the rest of the top binade holds numbers).
        torch_dtype: The native torch dtype with exactly this layout, or ``None``.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    subnormals: bool = True
    encoding: str = "ieee"
    torch_dtype: torch.dtype | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not 2 <= self.exponent_bits <= 11:
            raise ValueError(f"exponent_bits={self.exponent_bits!r} for {self.name!r}: must be in 2..11")
        if not 1 <= self.mantissa_bits <= 52:
            raise ValueError(f"mantissa_bits={self.mantissa_bits!r} for {self.name!r}: must be in 1..52")
        if self.encoding not in ("ieee", "fn"):
            raise ValueError(f"encoding={self.encoding!r} for {self.name!r}; known: 'ieee', 'fn'")

    # --- layout -------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        """Storage width in bits (sign + exponent + mantissa)."""
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        """Exponent bias, ``2**(exponent_bits-1) - 1``."""
        return (1 << (self.exponent_bits - 1)) - 1

    @property
    def has_inf(self) -> bool:
        """Whether the format encodes ±Inf (``"fn"`` formats do not)."""
        return self.encoding == "ieee"

    @property
    def emax(self) -> int:
        """Largest unbiased exponent of a finite number."""
        return self.bias if self.encoding == "ieee" else self.bias + 1

    @property
    def emin(self) -> int:
        """Smallest unbiased exponent of a normal number, ``1 - bias``."""
        return 1 - self.bias

    # --- derived constants (all exact) -------------------------------------------------------
    @property
    def precision(self) -> int:
        """Precision t in bits, the implicit leading bit counted (8 for bf16)."""
        return self.mantissa_bits + 1

    @property
    def unit_roundoff(self) -> float:
        """Unit roundoff u = 2**-t: the relative error bound of round-to-nearest."""
        return math.ldexp(1.0, -self.precision)

    @property
    def eps(self) -> float:
        """Machine epsilon, the gap between 1 and the next number: 2**(1-t) = 2u."""
        return math.ldexp(1.0, 1 - self.precision)

    @property
    def max(self) -> float:
        """Largest finite number."""
        m = self.mantissa_bits
        # "ieee": 1.11...1 x 2^emax.  "fn": the all-ones mantissa in the top binade is NaN, so 1.11...10.
        top = (1 << (m + 1)) - 1 if self.encoding == "ieee" else (1 << (m + 1)) - 2
        return math.ldexp(float(top), self.emax - m)

    @property
    def smallest_normal(self) -> float:
        """Smallest positive normal number, 2**emin."""
        return math.ldexp(1.0, self.emin)

    @property
    def smallest_subnormal(self) -> float:
        """Smallest positive subnormal of the layout, 2**(emin - mantissa_bits).

        This is a property of the bit layout; when :attr:`subnormals` is ``False`` the smallest
        positive value the format produces is :attr:`min_positive` (= :attr:`smallest_normal`).
        """
        return math.ldexp(1.0, self.emin - self.mantissa_bits)

    @property
    def min_positive(self) -> float:
        """Smallest positive value that rounding into this format can produce."""
        return self.smallest_subnormal if self.subnormals else self.smallest_normal

    @property
    def quantum_exponent_min(self) -> int:
        """Exponent of the spacing of the subnormal (or lowest normal) binade: emin - mantissa_bits."""
        return self.emin - self.mantissa_bits

    def ulp(self, x: float) -> float:
        """Spacing of the format's numbers at magnitude ``|x|`` (the gap above ``|x|`` in its binade)."""
        if not math.isfinite(x):
            raise ValueError(f"ulp of a non-finite value {x!r}")
        e = math.frexp(abs(x))[1] - 1 if x != 0 else self.emin
        return math.ldexp(1.0, max(e, self.emin) - self.mantissa_bits)

    def fits_in(self, other: Format) -> bool:
        """Whether every number of ``self`` is exactly representable in ``other``."""
        return (
            self.precision <= other.precision
            and self.emax <= other.emax
            and self.min_positive >= other.min_positive
            and (self.quantum_exponent_min >= other.quantum_exponent_min)
        )

    def __repr__(self) -> str:
        extra = "" if self.subnormals else ", subnormals=False"
        return f"Format({self.name!r}, e{self.exponent_bits}m{self.mantissa_bits}{extra})"


_NAMED: dict[str, Format] = {
    "fp64": Format("fp64", 11, 52, torch_dtype=torch.float64),
    "fp32": Format("fp32", 8, 23, torch_dtype=torch.float32),
    "tf32": Format("tf32", 8, 10),
    "bf16": Format("bf16", 8, 7, torch_dtype=torch.bfloat16),
    "fp16": Format("fp16", 5, 10, torch_dtype=torch.float16),
    "fp8_e4m3": Format("fp8_e4m3", 4, 3, encoding="fn", torch_dtype=torch.float8_e4m3fn),
    "fp8_e5m2": Format("fp8_e5m2", 5, 2, torch_dtype=torch.float8_e5m2),
}
_ALIASES = {
    "float64": "fp64",
    "double": "fp64",
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "float8_e4m3fn": "fp8_e4m3",
    "e4m3fn": "fp8_e4m3",
    "float8_e5m2": "fp8_e5m2",
}
# IEEE layouts that torch stores natively: a custom "eXmY" with one of these layouts gets the dtype.
_NATIVE_LAYOUTS = {
    (11, 52): torch.float64,
    (8, 23): torch.float32,
    (8, 7): torch.bfloat16,
    (5, 10): torch.float16,
    (5, 2): torch.float8_e5m2,
}
_CUSTOM = re.compile(r"e(\d+)m(\d+)")
FORMAT_NAMES: tuple[str, ...] = tuple(_NAMED)


def get_format(fmt: str | Format | torch.dtype, *, subnormals: bool | None = None) -> Format:
    """Look a format up by name, dtype or ``eXmY`` spec.

    Args:
        fmt: ``"fp64" "fp32" "tf32" "bf16" "fp16" "fp8_e4m3" "fp8_e5m2"``, a custom IEEE-like
            ``"eXmY"`` (X exponent bits in 2..11, Y stored mantissa bits in 1..52, with Inf/NaN and
            subnormals), a native torch dtype, or a :class:`Format` (returned as is).
        subnormals: Override subnormal support; ``False`` gives a flush-to-zero variant whose name
            carries the suffix ``"_ftz"``.

    Raises:
        ValueError: Unknown name or malformed ``eXmY``; the message lists the known names.
    """
    if isinstance(fmt, Format):
        f = fmt
    elif isinstance(fmt, torch.dtype):
        matches = [f for f in _NAMED.values() if f.torch_dtype == fmt]
        if not matches:
            raise ValueError(
                f"unknown format dtype {fmt!r}; known: {[str(f.torch_dtype) for f in _NAMED.values() if f.torch_dtype]}"
            )
        f = matches[0]
    elif isinstance(fmt, str):
        key = fmt.strip().lower()
        ftz = key.endswith("_ftz")
        key = key.removesuffix("_ftz")
        key = _ALIASES.get(key, key)
        if key in _NAMED:
            f = _NAMED[key]
        elif (m := _CUSTOM.fullmatch(key)) is not None:
            e, mb = int(m.group(1)), int(m.group(2))
            if not (2 <= e <= 11 and 1 <= mb <= 52):
                raise ValueError(
                    f"format {fmt!r}: eXmY needs X (exponent bits) in 2..11 and Y (mantissa bits) in 1..52"
                )
            f = Format(key, e, mb, torch_dtype=_NATIVE_LAYOUTS.get((e, mb)))
        else:
            raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMAT_NAMES)} or 'eXmY' (e.g. 'e5m7')")
        if ftz:
            subnormals = False if subnormals is None else subnormals
    else:
        raise ValueError(f"unknown format {fmt!r}; expected a name, a torch dtype or a Format")
    if subnormals is not None and subnormals != f.subnormals:
        base = f.name.removesuffix("_ftz")
        f = Format(
            base if subnormals else base + "_ftz",
            f.exponent_bits,
            f.mantissa_bits,
            subnormals,
            f.encoding,
            None if not subnormals else f.torch_dtype,
        )
    return f
