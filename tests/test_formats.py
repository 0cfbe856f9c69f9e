"""Tests of precision_lab.formats: every constant pinned exactly, custom eXmY, flush-to-zero, bad names.

All comparisons are exact (``==`` on Python floats that are powers of two or short dyadic rationals);
the expected constants are hexadecimal literals written here from the format definitions (IEEE 754,
the OCP 8-bit floating-point spec, NVIDIA's tf32), cross-checked against ``torch.finfo`` and
``ml_dtypes.finfo`` and against a brute-force enumeration of every bit pattern of the small formats.
"""

from __future__ import annotations

import dataclasses
import math
import re

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import precision_lab as pl
from precision_lab.formats import FORMAT_NAMES, Format, get_format

H = float.fromhex

# name: (bits, exponent bits, mantissa bits, precision, unit roundoff, max, smallest normal, smallest subnormal)
NAMED = {
    "fp64": (64, 11, 52, 53, H("0x1p-53"), H("0x1.fffffffffffffp+1023"), H("0x1p-1022"), H("0x1p-1074")),
    "fp32": (32, 8, 23, 24, H("0x1p-24"), H("0x1.fffffep+127"), H("0x1p-126"), H("0x1p-149")),
    "tf32": (19, 8, 10, 11, H("0x1p-11"), H("0x1.ffcp+127"), H("0x1p-126"), H("0x1p-136")),
    "bf16": (16, 8, 7, 8, H("0x1p-8"), H("0x1.fep+127"), H("0x1p-126"), H("0x1p-133")),
    "fp16": (16, 5, 10, 11, H("0x1p-11"), H("0x1.ffcp+15"), H("0x1p-14"), H("0x1p-24")),
    "fp8_e4m3": (8, 4, 3, 4, H("0x1p-4"), H("0x1.cp+8"), H("0x1p-6"), H("0x1p-9")),  # max 448 (OCP E4M3FN)
    "fp8_e5m2": (8, 5, 2, 3, H("0x1p-3"), H("0x1.cp+15"), H("0x1p-14"), H("0x1p-16")),  # max 57344
}
NATIVE = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "tf32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
ML_DTYPES = {
    "fp64": np.float64,
    "fp32": np.float32,
    "bf16": ml_dtypes.bfloat16,
    "fp16": np.float16,
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
}

# Custom IEEE-like eXmY (Inf/NaN in the all-ones exponent, subnormals): same columns + native dtype.
# fmt: off
CUSTOM = {
    "e5m7": (13, 5, 7, 8, H("0x1p-8"), H("0x1.fep+15"), H("0x1p-14"), H("0x1p-21"), None),  # max 65280
    "e8m7": (16, 8, 7, 8, H("0x1p-8"), H("0x1.fep+127"), H("0x1p-126"), H("0x1p-133"), torch.bfloat16),
    "e4m3": (8, 4, 3, 4, H("0x1p-4"), H("0x1.ep+7"), H("0x1p-6"), H("0x1p-9"), None),  # IEEE-like: max 240
    "e3m2": (6, 3, 2, 3, H("0x1p-3"), H("0x1.cp+3"), H("0x1p-2"), H("0x1p-4"), None),  # max 14
    "e2m1": (4, 2, 1, 2, H("0x1p-2"), H("0x1.8p+1"), H("0x1p+0"), H("0x1p-1"), None),  # max 3, smallest layout
    "e3m4": (8, 3, 4, 5, H("0x1p-5"), H("0x1.fp+3"), H("0x1p-2"), H("0x1p-6"), None),  # max 15.5
    "e5m2": (8, 5, 2, 3, H("0x1p-3"), H("0x1.cp+15"), H("0x1p-14"), H("0x1p-16"), torch.float8_e5m2),
    "e5m10": (16, 5, 10, 11, H("0x1p-11"), H("0x1.ffcp+15"), H("0x1p-14"), H("0x1p-24"), torch.float16),
    "e8m23": (32, 8, 23, 24, H("0x1p-24"), H("0x1.fffffep+127"), H("0x1p-126"), H("0x1p-149"), torch.float32),
    "e11m52": (64, 11, 52, 53, H("0x1p-53"), H("0x1.fffffffffffffp+1023"), H("0x1p-1022"), H("0x1p-1074"), torch.float64),
    "e11m1": (13, 11, 1, 2, H("0x1p-2"), H("0x1.8p+1023"), H("0x1p-1022"), H("0x1p-1023"), None),
}
# fmt: on


def decode(pattern: int, ebits: int, mbits: int, encoding: str) -> float:
    """Value of a non-negative bit pattern (sign bit 0) of an eXmY layout, computed independently."""
    e_field, m_field = pattern >> mbits, pattern & ((1 << mbits) - 1)
    bias = (1 << (ebits - 1)) - 1
    if e_field == (1 << ebits) - 1:
        if encoding == "ieee":
            return math.inf if m_field == 0 else math.nan
        if m_field == (1 << mbits) - 1:
            return math.nan
    if e_field == 0:
        return math.ldexp(m_field, 1 - bias - mbits)  # exact: an integer below 2^53 times a power of two
    return math.ldexp((1 << mbits) | m_field, e_field - bias - mbits)


def _constants(f: Format) -> tuple:
    return (
        f.bits,
        f.exponent_bits,
        f.mantissa_bits,
        f.precision,
        f.unit_roundoff,
        f.max,
        f.smallest_normal,
        f.smallest_subnormal,
    )


# --------------------------------------------------------------------------------------------------
# named formats
# --------------------------------------------------------------------------------------------------
def test_format_names_are_the_documented_ones():
    assert FORMAT_NAMES == ("fp64", "fp32", "tf32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2")
    assert pl.FORMAT_NAMES is FORMAT_NAMES


@pytest.mark.parametrize("name", list(NAMED))
def test_named_constants_equal_hex_literals(name):
    f = get_format(name)
    assert f.name == name
    assert _constants(f) == NAMED[name]
    assert f.eps == 2 * f.unit_roundoff
    assert f.torch_dtype == NATIVE[name]
    assert f.subnormals
    assert f.encoding == ("fn" if name == "fp8_e4m3" else "ieee")
    assert f.has_inf == (name != "fp8_e4m3")
    assert f.min_positive == f.smallest_subnormal
    assert f.quantum_exponent_min == math.frexp(f.smallest_subnormal)[1] - 1


@pytest.mark.parametrize("name", [n for n in NAMED if NATIVE[n] is not None])
def test_named_constants_agree_with_torch_finfo(name):
    f, fi = get_format(name), torch.finfo(NATIVE[name])
    assert (f.max, f.smallest_normal, f.eps, f.bits) == (fi.max, fi.smallest_normal, fi.eps, fi.bits)
    assert -f.max == fi.min


@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_named_constants_agree_with_ml_dtypes_finfo(name):
    f, fi = get_format(name), ml_dtypes.finfo(ML_DTYPES[name])
    assert float(fi.max) == f.max
    assert float(fi.smallest_normal) == f.smallest_normal
    assert float(fi.smallest_subnormal) == f.smallest_subnormal
    assert float(fi.eps) == f.eps
    assert (fi.bits, fi.nexp, fi.nmant) == (f.bits, f.exponent_bits, f.mantissa_bits)
    assert (fi.maxexp - 1, fi.minexp) == (f.emax, f.emin)


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp16", "bf16"])
def test_constants_agree_with_enumeration_of_every_bit_pattern(name):
    f = get_format(name)
    values = np.array([decode(p, f.exponent_bits, f.mantissa_bits, f.encoding) for p in range(1 << (f.bits - 1))])
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    normal = positive[positive >= 2.0**f.emin]
    assert (finite.max(), positive.min(), normal.min()) == (f.max, f.smallest_subnormal, f.smallest_normal)
    assert np.isinf(values).any() == f.has_inf
    # the decoder agrees bit for bit with ml_dtypes' own decoding
    patterns = np.arange(1 << (f.bits - 1), dtype=np.uint8 if f.bits == 8 else np.uint16)
    with np.errstate(invalid="ignore"):  # signalling-NaN patterns warn when widened
        theirs = patterns.view(ML_DTYPES[name]).astype(np.float64)
    np.testing.assert_array_equal(theirs, values)  # NaN-aware, exact


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("float64", "fp64"),
        ("double", "fp64"),
        ("float32", "fp32"),
        ("float", "fp32"),
        ("bfloat16", "bf16"),
        ("float16", "fp16"),
        ("half", "fp16"),
        ("float8_e4m3fn", "fp8_e4m3"),
        ("e4m3fn", "fp8_e4m3"),
        ("float8_e5m2", "fp8_e5m2"),
        ("BF16", "bf16"),
        (" fp16 ", "fp16"),
    ],
)
def test_aliases(alias, name):
    assert get_format(alias) is get_format(name)


@pytest.mark.parametrize("name", [n for n in NAMED if NATIVE[n] is not None])
def test_lookup_by_torch_dtype(name):
    assert get_format(NATIVE[name]) is get_format(name)


def test_format_instance_is_returned_as_is():
    f = get_format("bf16")
    assert get_format(f) is f
    custom = Format("mine", 6, 9)
    assert get_format(custom) is custom


def test_format_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_format("bf16").mantissa_bits = 8  # type: ignore[misc]


def test_layout_properties():
    bf16, e4m3, e5m2 = get_format("bf16"), get_format("fp8_e4m3"), get_format("fp8_e5m2")
    assert (bf16.bias, bf16.emin, bf16.emax) == (127, -126, 127)
    # fn encoding: the top binade holds numbers, so emax is one more than the bias
    assert (e4m3.bias, e4m3.emin, e4m3.emax) == (7, -6, 8)
    assert (e5m2.bias, e5m2.emin, e5m2.emax) == (15, -14, 15)


# --------------------------------------------------------------------------------------------------
# custom eXmY
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", list(CUSTOM))
def test_custom_constants_equal_hex_literals(spec):
    f = get_format(spec)
    *constants, dtype = CUSTOM[spec]
    assert f.name == spec
    assert _constants(f) == tuple(constants)
    assert f.torch_dtype == dtype
    assert f.encoding == "ieee"
    assert f.has_inf
    assert f.subnormals


def test_custom_e4m3_is_ieee_like_not_the_fn_format():
    custom, fn = get_format("e4m3"), get_format("fp8_e4m3")
    assert custom.max == 240.0
    assert fn.max == 448.0
    assert custom != fn
    assert custom.torch_dtype is None  # torch's float8_e4m3fn is the fn layout, not this one
    assert float(ml_dtypes.finfo(ml_dtypes.float8_e4m3).max) == custom.max  # ml_dtypes' IEEE-like e4m3


def test_custom_e3m4_agrees_with_ml_dtypes():
    f, fi = get_format("e3m4"), ml_dtypes.finfo(ml_dtypes.float8_e3m4)
    assert (f.max, f.smallest_normal, f.smallest_subnormal, f.eps) == tuple(
        float(v) for v in (fi.max, fi.smallest_normal, fi.smallest_subnormal, fi.eps)
    )


def test_e8m7_gets_bfloat16_but_stays_a_distinct_name():
    f = get_format("e8m7")
    assert f.torch_dtype is torch.bfloat16
    assert _constants(f) == _constants(get_format("bf16"))
    assert f != get_format("bf16")  # the name is part of the identity


@pytest.mark.parametrize("spec", ["E5M7", " e5m7 "])
def test_custom_spec_is_case_and_space_insensitive(spec):
    assert get_format(spec) == get_format("e5m7")


@pytest.mark.parametrize(("ebits", "mbits"), [(e, m) for e in range(2, 12) for m in (1, 2, 7, 10, 23, 52)])
def test_custom_derived_constants_for_every_exponent_width(ebits, mbits):
    f = get_format(f"e{ebits}m{mbits}")
    bias = 2 ** (ebits - 1) - 1
    assert f.bits == 1 + ebits + mbits
    assert f.precision == mbits + 1
    assert f.unit_roundoff == 2.0 ** -(mbits + 1)
    assert f.smallest_normal == 2.0 ** (1 - bias)
    assert f.smallest_subnormal == 2.0 ** (1 - bias - mbits)
    # max = (2 - 2^-m) * 2^bias, written as an exact integer times a power of two
    assert f.max == math.ldexp(2 ** (mbits + 1) - 1, bias - mbits)


# --------------------------------------------------------------------------------------------------
# flush-to-zero variants
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "tf32", "fp32", "e5m7"])
def test_ftz_variant(name):
    base = get_format(name)
    ftz = get_format(name + "_ftz")
    assert ftz.name == name + "_ftz"
    assert not ftz.subnormals
    assert ftz.torch_dtype is None  # no torch dtype flushes subnormals
    assert (ftz.exponent_bits, ftz.mantissa_bits, ftz.encoding) == (
        base.exponent_bits,
        base.mantissa_bits,
        base.encoding,
    )
    # constants of the layout are unchanged; the smallest value rounding can produce is the normal one
    assert _constants(ftz) == _constants(base)
    assert ftz.min_positive == base.smallest_normal
    assert base.min_positive == base.smallest_subnormal
    assert get_format(name, subnormals=False) == ftz
    assert get_format(name + "_FTZ") == ftz
    # asking for subnormals again gives the base format back
    assert get_format(ftz, subnormals=True) == base
    assert get_format(name + "_ftz", subnormals=True) == base
    assert get_format(name, subnormals=True) == base
    assert "subnormals=False" in repr(ftz)


def test_fits_in():
    g = get_format
    assert g("bf16").fits_in(g("fp32"))
    assert g("fp16").fits_in(g("fp32"))
    assert g("tf32").fits_in(g("fp32"))
    assert g("fp8_e4m3").fits_in(g("fp16"))
    assert g("fp8_e5m2").fits_in(g("fp16"))
    assert g("fp32").fits_in(g("fp64"))
    assert not g("fp32").fits_in(g("tf32"))
    assert not g("fp16").fits_in(g("bf16"))  # more precision
    assert not g("bf16").fits_in(g("fp16"))  # more range
    assert not g("fp8_e4m3").fits_in(g("fp8_e5m2"))  # 3 mantissa bits do not fit in 2
    assert not g("fp8_e5m2").fits_in(g("fp8_e4m3"))  # range
    assert g("bf16_ftz").fits_in(g("bf16"))
    assert not g("bf16").fits_in(g("bf16_ftz"))  # its subnormals would be flushed


# --------------------------------------------------------------------------------------------------
# ulp
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "x", "ulp"),
    [
        ("bf16", 1.0, H("0x1p-7")),
        ("bf16", -1.5, H("0x1p-7")),
        ("bf16", 2.0, H("0x1p-6")),
        ("bf16", H("0x1.fep-1"), H("0x1p-8")),  # the largest bf16 below 1
        ("bf16", 0.0, H("0x1p-133")),
        ("bf16", -0.0, H("0x1p-133")),
        ("bf16", H("0x1p-133"), H("0x1p-133")),  # subnormal range: spacing stays at the quantum
        ("bf16", H("0x1p-126"), H("0x1p-133")),
        ("bf16", H("0x1.fep+127"), H("0x1p+120")),
        ("fp16", 65504.0, 32.0),
        ("fp16", H("0x1p-24"), H("0x1p-24")),
        ("fp8_e4m3", 448.0, 32.0),
        ("fp8_e4m3", 256.0, 32.0),
        ("fp8_e4m3", 1.0, 0.125),
        ("fp8_e5m2", 57344.0, 8192.0),
        ("fp32", 1.0, H("0x1p-23")),
        ("fp64", 1.0, H("0x1p-52")),
        ("fp64", H("0x1p-1074"), H("0x1p-1074")),
        ("e3m2", 14.0, 2.0),
    ],
)
def test_ulp_values(name, x, ulp):
    assert get_format(name).ulp(x) == ulp


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_ulp_of_non_finite_raises(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        get_format("bf16").ulp(bad)


@pytest.mark.parametrize(
    ("name", "np_dtype", "bits"),
    [
        ("fp16", np.float16, 16),
        ("bf16", ml_dtypes.bfloat16, 16),
        ("fp8_e4m3", ml_dtypes.float8_e4m3fn, 8),
        ("fp8_e5m2", ml_dtypes.float8_e5m2, 8),
        ("fp32", np.float32, 32),
    ],
)
@given(data=st.data())
def test_ulp_is_the_gap_to_the_next_number(name, np_dtype, bits, data):
    """For every positive representable x below max, ulp(x) = nextafter(x, +inf) - x (exact)."""
    f = get_format(name)
    pattern = data.draw(st.integers(0, (1 << (bits - 1)) - 1), label="pattern")
    uint = {8: np.uint8, 16: np.uint16, 32: np.uint32}[bits]
    x = np.array([pattern], dtype=uint).view(np_dtype)
    xf = float(x[0])
    if not math.isfinite(xf) or xf >= f.max:
        return
    nxt = float(np.array([pattern + 1], dtype=uint).view(np_dtype)[0])  # the next pattern is the next number
    assert f.ulp(xf) == nxt - xf  # exact: both are dyadic with few bits
    assert f.ulp(-xf) == nxt - xf


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["fp12", "bf8", "", "fp8", "float128", "x5m2", "e5m", "em2", "e5m2x", "5m2"])
def test_unknown_name_raises_and_lists_known(bad):
    with pytest.raises(ValueError, match="unknown format") as info:
        get_format(bad)
    msg = str(info.value)
    assert repr(bad) in msg
    for known in FORMAT_NAMES:
        assert known in msg


@pytest.mark.parametrize("bad", ["e1m3", "e12m3", "e5m0", "e5m53", "e0m0", "e99m7", "e1m3_ftz"])
def test_malformed_exmy_raises_naming_the_value(bad):
    with pytest.raises(ValueError, match="eXmY") as info:
        get_format(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", [5, 3.0, None, b"bf16", ["bf16"], np.float32], ids=lambda v: type(v).__name__)
def test_wrong_type_raises_naming_the_value(bad):
    with pytest.raises(ValueError, match="unknown format") as info:
        get_format(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64, torch.bool, torch.float8_e4m3fnuz])
def test_unknown_torch_dtype_raises(dtype):
    with pytest.raises(ValueError, match="unknown format dtype") as info:
        get_format(dtype)
    assert str(dtype) in str(info.value)
    assert "torch.bfloat16" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"exponent_bits": 1, "mantissa_bits": 3}, "exponent_bits=1"),
        ({"exponent_bits": 12, "mantissa_bits": 3}, "exponent_bits=12"),
        ({"exponent_bits": 5, "mantissa_bits": 0}, "mantissa_bits=0"),
        ({"exponent_bits": 5, "mantissa_bits": 53}, "mantissa_bits=53"),
        ({"exponent_bits": 5, "mantissa_bits": 2, "encoding": "fnuz"}, "encoding='fnuz'"),
    ],
)
def test_format_constructor_validates(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        Format("bad", **kwargs)
