"""Tests of precision_lab.rounding against two independent oracles, asserted bit for bit.

* ml_dtypes' casts (fp32 -> bf16/fp16/fp8, correctly rounded to nearest even): exhaustive over every
  upper half of an fp32 pattern combined with the low halves that matter for a 16-bit cut, every
  fp8 tie and its fp32 neighbours, and a million random fp32 patterns.
* ``ref_round`` below, written from the definition of rounding with ``fractions.Fraction``: it brackets
  |x| between its two neighbours exactly and picks one.  It checks fp64 inputs (where a detour
  through fp32 would round twice), every custom format and the flush-to-zero variants.

Deterministic results are compared on their bit patterns (``assert_bits_equal``: NaN-ness only for
NaN, bits otherwise, so -0.0 != +0.0).  Statistical tests of stochastic rounding fix their seeds,
state their false-positive rate, and each has a negative control that the same test rejects.
"""

from __future__ import annotations

import functools
import math
import struct
from dataclasses import dataclass
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import available_devices
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import precision_lab as pl
from precision_lab import _random
from precision_lab.formats import get_format
from precision_lab.rounding import _generic, sr_bf16_random16

ALPHA = 1e-6  # per-case false-positive rate of every statistical test in this file
Z_CRIT = float(stats.norm.isf(ALPHA / 2))  # two-sided normal critical value at ALPHA (about 4.89)

# The property tests run once per format (a dozen formats) and each example checks a batch of up to
# 24 values, so they take a fraction of the active profile's max_examples (ci: 200 -> 100 and 50)
# to keep the default run near a minute; HYPOTHESIS_PROFILE=dev scales them up with the profile.
_PROFILE_EXAMPLES = settings.default.max_examples
HALF = settings(max_examples=max(10, _PROFILE_EXAMPLES // 2))
QUARTER = settings(max_examples=max(10, _PROFILE_EXAMPLES // 4))


# ==================================================================================================
# bit-exact comparison
# ==================================================================================================
_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
_UINT = {8: np.uint64, 4: np.uint32, 2: np.uint16, 1: np.uint8}
_NP_OF = {
    torch.float64: np.float64,
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.bfloat16: ml_dtypes.bfloat16,
    torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
    torch.float8_e5m2: ml_dtypes.float8_e5m2,
}


def as_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """A numpy array with the same bits (bf16/fp8 through ml_dtypes)."""
    if isinstance(t, np.ndarray):
        return t
    t = t.detach().cpu().contiguous()
    return t.view(_INT_VIEW[t.element_size()]).numpy().view(_NP_OF[t.dtype])


def _isnan(a: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # widening signalling NaNs warns
        return np.isnan(a.astype(np.float64))


def assert_bits_equal(actual, expected, inputs=None) -> None:
    """Same dtype, same shape, same bits; where ``expected`` is NaN, ``actual`` need only be NaN."""
    a, e = as_numpy(actual), as_numpy(expected)
    assert a.dtype == e.dtype, f"dtype {a.dtype} != {e.dtype}"
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape}"
    an, en = _isnan(a), _isnan(e)
    u = _UINT[a.itemsize]
    bad = (an != en) | (~en & (a.view(u) != e.view(u)))
    if bad.any():
        xs = None if inputs is None else as_numpy(inputs).reshape(-1)
        lines = []
        for i in np.flatnonzero(bad.reshape(-1))[:8]:
            where = "" if xs is None else f"x={float(xs[i])!r} ({float(xs[i]).hex()}): "
            lines.append(
                f"  {where}got {float(a.flat[i])!r} ({int(a.view(u).flat[i]):#x}), "
                f"want {float(e.flat[i])!r} ({int(e.view(u).flat[i]):#x})"
            )
        pytest.fail(f"{int(bad.sum())} of {a.size} elements differ:\n" + "\n".join(lines))


def f64_bits(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def bits_to_f64(b: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", b))[0]


# ==================================================================================================
# the independent reference: exact rounding with Fractions
# ==================================================================================================
def _pow2(e: int) -> Fraction:
    return Fraction(1 << e) if e >= 0 else Fraction(1, 1 << -e)


def _floor_log2(a: Fraction) -> int:
    """floor(log2 a) for a > 0, exactly."""
    e = a.numerator.bit_length() - a.denominator.bit_length()  # floor(log2 a) is e or e - 1
    return e if a >= _pow2(e) else e - 1


def _layout(ebits: int, mbits: int, encoding: str) -> tuple[int, Fraction]:
    """(emin, max) of an eXmY layout: IEEE keeps the all-ones exponent for Inf/NaN, "fn" only 1.11..1."""
    bias = 2 ** (ebits - 1) - 1
    emax = bias if encoding == "ieee" else bias + 1
    top = 2 ** (mbits + 1) - (1 if encoding == "ieee" else 2)
    return 1 - bias, top * _pow2(emax - mbits)


def _bracket(a: Fraction, ebits: int, mbits: int, encoding: str) -> tuple[Fraction, Fraction, int]:
    """Bracket a: lo = k*q <= a < hi = (k+1)*q with q the spacing of the binade of a (gradual underflow below 2^emin)."""
    emin, _ = _layout(ebits, mbits, encoding)
    q = _pow2(max(_floor_log2(a), emin) - mbits)
    k = math.floor(a / q)
    return k * q, (k + 1) * q, k


def _overflowed(x: float, encoding: str, saturate: bool, fmax: Fraction) -> float:
    if saturate:
        return math.copysign(float(fmax), x)
    return math.copysign(math.inf, x) if encoding == "ieee" else math.nan


def ref_round(
    x: float,
    ebits: int,
    mbits: int,
    mode: str,
    encoding: str = "ieee",
    *,
    subnormals: bool = True,
    saturate: bool = False,
) -> float:
    """Round the float ``x`` (exactly, as a Fraction) into eXmY: ``mode`` "nearest" (ties to even) or "zero".

    Overflow: ±Inf ("ieee"), NaN ("fn"), ±max with ``saturate`` or in mode "zero".  Inf inputs stay
    Inf in "ieee" formats and become NaN in "fn" formats (±max with ``saturate``).  Without subnormals
    the result is computed with gradual underflow and then flushed to a signed zero when it is below
    2^emin (the semantics documented in ``Format.subnormals``).
    """
    if math.isnan(x):
        return math.nan
    emin, fmax = _layout(ebits, mbits, encoding)
    if math.isinf(x):
        if encoding == "ieee":
            return x
        return math.copysign(float(fmax), x) if saturate else math.nan
    a = abs(Fraction(x))
    if a == 0:
        return x
    lo, hi, k = _bracket(a, ebits, mbits, encoding)
    if mode == "zero" or a == lo:
        r = lo
    elif mode == "nearest":
        r = hi if (a - lo > hi - a or (a - lo == hi - a and k % 2 == 1)) else lo
    else:
        raise AssertionError(mode)
    if r > fmax:
        if mode == "zero":
            r = fmax
        else:
            return _overflowed(x, encoding, saturate, fmax)
    if not subnormals and r < _pow2(emin):
        r = Fraction(0)
    return math.copysign(float(r), x)  # float(Fraction) is correctly rounded, and r is an fp64 number


def ref_neighbours(
    x: float, ebits: int, mbits: int, encoding: str = "ieee", *, subnormals: bool = True, saturate: bool = False
) -> tuple[float, float, Fraction]:
    """The two stochastic-rounding outcomes of x and the probability of the upper one.

    (down, up, p): the two possible stochastic-rounding results (toward / away from zero, after the
    overflow and flush rules) and the exact probability p = (|x| - lo) / (hi - lo) of ``up``.
    """
    if not math.isfinite(x):
        r = ref_round(x, ebits, mbits, "nearest", encoding, subnormals=subnormals, saturate=saturate)
        return r, r, Fraction(0)
    emin, fmax = _layout(ebits, mbits, encoding)
    a = abs(Fraction(x))
    if a == 0:
        return x, x, Fraction(0)
    lo, hi, _ = _bracket(a, ebits, mbits, encoding)
    if a == lo:
        hi = lo
    p = Fraction(0) if hi == lo else (a - lo) / (hi - lo)

    def finish(r: Fraction) -> float:
        if r > fmax:
            return _overflowed(x, encoding, saturate, fmax)
        if not subnormals and r < _pow2(emin):
            r = Fraction(0)
        return math.copysign(float(r), x)

    return finish(lo), finish(hi), p


@dataclass(frozen=True)
class Spec:
    """An eXmY layout, written down here independently of precision_lab.formats."""

    name: str
    ebits: int
    mbits: int
    encoding: str = "ieee"
    subnormals: bool = True

    @property
    def emin(self) -> int:
        return _layout(self.ebits, self.mbits, self.encoding)[0]

    @property
    def max(self) -> float:
        return float(_layout(self.ebits, self.mbits, self.encoding)[1])

    @property
    def smallest_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def quantum(self) -> float:
        """Spacing of the subnormal binade (the smallest subnormal)."""
        return math.ldexp(1.0, self.emin - self.mbits)

    @property
    def fits_fp32(self) -> bool:
        """Every value of the format, and the results of rounding into it, are fp32 numbers."""
        return self.mbits <= 23 and self.ebits <= 8

    def rn(self, x: float, *, saturate: bool = False) -> float:
        return ref_round(
            x, self.ebits, self.mbits, "nearest", self.encoding, subnormals=self.subnormals, saturate=saturate
        )

    def rz(self, x: float) -> float:
        return ref_round(x, self.ebits, self.mbits, "zero", self.encoding, subnormals=self.subnormals)

    def neighbours(self, x: float) -> tuple[float, float, Fraction]:
        return ref_neighbours(x, self.ebits, self.mbits, self.encoding, subnormals=self.subnormals)

    def decode(self, pattern: int) -> float:
        """Value of a bit pattern of the layout (sign bit at position ebits + mbits)."""
        sign = -1.0 if pattern >> (self.ebits + self.mbits) & 1 else 1.0
        e_field = pattern >> self.mbits & ((1 << self.ebits) - 1)
        m_field = pattern & ((1 << self.mbits) - 1)
        bias = 2 ** (self.ebits - 1) - 1
        if e_field == (1 << self.ebits) - 1 and (self.encoding == "ieee" or m_field == (1 << self.mbits) - 1):
            return math.nan if m_field or self.encoding == "fn" else sign * math.inf
        if e_field == 0:
            return sign * math.ldexp(m_field, 1 - bias - self.mbits)
        return sign * math.ldexp((1 << self.mbits) | m_field, e_field - bias - self.mbits)

    def spacing_above(self, v: float) -> float:
        """Gap between the format's number v >= 0 and the next one."""
        if v == 0:
            return self.quantum
        return math.ldexp(1.0, max(math.frexp(v)[1] - 1, self.emin) - self.mbits)


SPECS = {
    s.name: s
    for s in [
        Spec("bf16", 8, 7),
        Spec("fp16", 5, 10),
        Spec("fp8_e4m3", 4, 3, "fn"),  # OCP E4M3FN: no Inf, NaN = S.1111.111, max 448
        Spec("fp8_e5m2", 5, 2),
        Spec("tf32", 8, 10),
        Spec("fp32", 8, 23),
        Spec("e5m7", 5, 7),
        Spec("e3m2", 3, 2),
        Spec("e4m3", 4, 3),  # the IEEE-like custom e4m3: max 240, has Inf
        Spec("bf16_ftz", 8, 7, subnormals=False),
        Spec("fp16_ftz", 5, 10, subnormals=False),
        Spec("e11m52", 11, 52),  # fp64's layout through the generic path: spacing down to 2^-1074
    ]
}
SPEC_NAMES = list(SPECS)
FP32_SPEC_NAMES = [n for n in SPEC_NAMES if SPECS[n].fits_fp32]


def test_reference_agrees_with_hand_computed_values():
    """The oracle itself, on values worked out by hand."""
    bf16, e4m3, e5m2 = SPECS["bf16"], SPECS["fp8_e4m3"], SPECS["fp8_e5m2"]
    assert bf16.rn(1 + 2**-8) == 1.0  # tie, 1.0000000 is even
    assert bf16.rn(1 + 3 * 2**-8) == 1 + 2**-6  # tie, 1.0000001 is odd: up to 1.0000010
    assert bf16.rn(1 + 2**-8 + 2**-40) == 1 + 2**-7
    assert bf16.rz(-(1 + 2**-7 - 2**-40)) == -1.0
    assert bf16.rn(2.0**-134) == 0.0  # half the smallest subnormal: tie to even zero
    assert math.copysign(1, bf16.rn(-(2.0**-134))) == -1.0
    assert bf16.rn(2.0**-134 + 2.0**-180) == 2.0**-133
    assert e4m3.rn(464.0) == 448.0  # tie between 448 (1.110) and 480 (1.111, the NaN pattern): even
    assert math.isnan(e4m3.rn(464.0 + 2**-40))
    assert e4m3.rn(1e9, saturate=True) == 448.0
    assert e4m3.rz(1e9) == 448.0
    assert e5m2.rn(61440.0) == math.inf  # 57344 + 4096: tie, 1.11 is odd, up to 2^16 = overflow
    assert e5m2.rn(61439.0) == 57344.0
    assert SPECS["bf16_ftz"].rn(2.0**-127) == 0.0
    assert SPECS["bf16_ftz"].rn(2.0**-126 - 2.0**-134) == 2.0**-126  # rounds up to the smallest normal
    assert bf16.neighbours(1 + 2**-9) == (1.0, 1 + 2**-7, Fraction(1, 4))
    assert bf16.neighbours(-3.0) == (-3.0, -3.0, Fraction(0))
    assert (bf16.max, e4m3.max, e5m2.max, SPECS["fp16"].max) == (float.fromhex("0x1.fep+127"), 448.0, 57344.0, 65504.0)


def test_reference_decoder_agrees_with_ml_dtypes():
    """Spec.decode (used to generate representable values) against ml_dtypes' decoding, every pattern."""
    for name, np_dtype in [
        ("fp8_e4m3", ml_dtypes.float8_e4m3fn),
        ("fp8_e5m2", ml_dtypes.float8_e5m2),
        ("e4m3", ml_dtypes.float8_e4m3),
        ("bf16", ml_dtypes.bfloat16),
        ("fp16", np.float16),
    ]:
        spec = SPECS[name]
        n = 1 << (1 + spec.ebits + spec.mbits)
        ours = np.array([spec.decode(p) for p in range(n)])
        with np.errstate(invalid="ignore"):
            theirs = np.arange(n, dtype=_UINT[n.bit_length() // 8]).view(np_dtype).astype(np.float64)
        np.testing.assert_array_equal(ours, theirs)  # exact, NaN-aware


# ==================================================================================================
# strategies
# ==================================================================================================
@st.composite
def near_ties(draw, spec: Spec) -> float:
    """Values at and around the format's ties.

    A representable value v or the midpoint above it, moved by -3..3 fp64 ulps: the ties, and the
    values just off them where an fp64 -> fp32 -> format detour rounds twice.
    """
    nbits = spec.ebits + spec.mbits
    v = spec.decode(draw(st.integers(0, (1 << nbits) - 1)))
    if not math.isfinite(v):
        v = spec.max
    point = v + spec.spacing_above(v) / 2 if draw(st.booleans()) else v
    for _ in range(abs(steps := draw(st.integers(-3, 3)))):
        point = math.nextafter(point, math.copysign(math.inf, steps))
    return -point if draw(st.booleans()) else point


def fp64_values(spec: Spec) -> st.SearchStrategy[float]:
    big = min(4 * spec.max, float.fromhex("0x1.fffffffffffffp+1023"))
    small = 4 * spec.smallest_normal
    return st.one_of(
        st.floats(allow_nan=False),  # anywhere in fp64, ±Inf included
        st.integers(0, 2**64 - 1).map(bits_to_f64),  # raw patterns: NaNs, fp64 subnormals
        st.floats(-big, big),  # the format's range and its overflow boundary
        st.floats(-small, small),  # the format's subnormal range
        near_ties(spec),
    )


def fp64_lists(spec: Spec) -> st.SearchStrategy[list[float]]:
    return st.lists(fp64_values(spec), min_size=1, max_size=24)


def fp32_lists() -> st.SearchStrategy[list[int]]:
    """Raw fp32 bit patterns (every value, NaNs and subnormals included)."""
    return st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=24)


def fp32_from_bits(bits: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.array(bits, dtype=np.uint32).view(np.float32).copy())


def expected_tensor(values: list[float], dtype: torch.dtype) -> np.ndarray:
    return np.array(values, dtype=np.float64).astype(_NP_OF[dtype])  # exact: the values are representable


RN = pl.round_nearest
RZ = pl.round_toward_zero


# ==================================================================================================
# 1. round_nearest from fp32 vs ml_dtypes, exhaustive
# ==================================================================================================
ML_NATIVE = {
    "bf16": ml_dtypes.bfloat16,
    "fp16": np.float16,
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
}
ML_CUSTOM = {"e4m3": ml_dtypes.float8_e4m3, "e3m4": ml_dtypes.float8_e3m4}  # IEEE-like eXmY ml_dtypes also has
TORCH_NATIVE = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


@functools.cache
def fp32_grid() -> np.ndarray:
    """Every upper half of an fp32 pattern with the low halves at and around a 16-bit cut's ties."""
    hi = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    lows = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFE, 0xFFFF], dtype=np.uint32)
    return (hi[:, None] | lows[None, :]).reshape(-1).view(np.float32)


@functools.cache
def fp32_random() -> np.ndarray:
    """One million uniformly random fp32 bit patterns (fixed seed)."""
    return np.random.default_rng(20240611).integers(0, 2**32, size=1_000_000, dtype=np.uint32).view(np.float32)


@functools.cache
def fp8_ties(np_dtype: type) -> np.ndarray:
    """Every fp8 value, every midpoint between neighbours (and above max), each ±1 and ±2 fp32 ulps, both signs."""
    with np.errstate(invalid="ignore"):
        values = np.arange(256, dtype=np.uint8).view(np_dtype).astype(np.float64)
    pos = np.unique(np.abs(values[np.isfinite(values)]))  # 0 .. max
    above = np.append(pos[1:], 2 * pos[-1] - pos[-2])  # the next value, continuing the top binade past max
    points = np.concatenate([pos, (pos + above) / 2]).astype(np.float32)  # exact
    out = [points]
    for direction in (np.float32(np.inf), np.float32(-np.inf)):
        p = points
        for _ in range(2):
            p = np.nextafter(p, direction)
            out.append(p)
    every = np.concatenate(out)
    return np.concatenate([every, -every])


INPUT_SETS = {"grid": fp32_grid, "random1m": fp32_random}


def _rn_paths(x: torch.Tensor, name: str, path: str) -> torch.Tensor:
    if path == "public":
        return RN(x, name)
    if path == "generic":
        return _generic(x, get_format(name), "nearest")  # float64
    if path == "out-fp32":
        out = torch.full_like(x, 7.0)
        assert RN(x, name, out=out) is out
        return out
    if path == "out-native":
        out = torch.zeros(x.shape, dtype=TORCH_NATIVE[name], device=x.device)
        assert RN(x, name, out=out) is out
        return out
    raise AssertionError(path)


def _ml_expected(x: np.ndarray, np_dtype: type, result: torch.Tensor) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        ref = x.astype(np_dtype)  # ml_dtypes / numpy: correctly rounded, ties to even; NaN on e4m3fn overflow
        return ref.astype(_NP_OF[result.dtype]) if result.dtype not in TORCH_NATIVE.values() else ref


PATHS = ["public", "generic", "out-fp32", "out-native"]


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("inputs", list(INPUT_SETS))
@pytest.mark.parametrize("name", list(ML_NATIVE))
def test_rn_fp32_matches_ml_dtypes(name, inputs, path, device):
    x_np = INPUT_SETS[inputs]()
    x = torch.from_numpy(x_np.copy()).to(device)
    got = _rn_paths(x, name, path)
    assert_bits_equal(got, _ml_expected(x_np, ML_NATIVE[name], got), inputs=x_np)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_rn_fp32_matches_ml_dtypes_around_every_fp8_tie(name, path, device):
    x_np = fp8_ties(ML_NATIVE[name])
    x = torch.from_numpy(x_np.copy()).to(device)
    got = _rn_paths(x, name, path)
    assert_bits_equal(got, _ml_expected(x_np, ML_NATIVE[name], got), inputs=x_np)


@pytest.mark.parametrize("inputs", ["grid", "random1m", "ties"])
@pytest.mark.parametrize("name", list(ML_CUSTOM))
def test_rn_custom_exmy_matches_ml_dtypes(name, inputs):
    """The generic path on IEEE-like custom formats that ml_dtypes happens to implement (e4m3: max 240)."""
    x_np = fp8_ties(ML_CUSTOM[name]) if inputs == "ties" else INPUT_SETS[inputs]()
    x = torch.from_numpy(x_np.copy())
    got = RN(x, name)
    assert_bits_equal(got, _ml_expected(x_np, ML_CUSTOM[name], got), inputs=x_np)


@pytest.mark.parametrize("src", ["fp16", "bf16"])
@pytest.mark.parametrize("name", list(ML_NATIVE))
def test_rn_every_16bit_input_matches_ml_dtypes(src, name):
    """All 2^16 fp16 / bf16 patterns (the exact widening to fp32, then the fast path); result in x's dtype."""
    src_np, src_t = {"fp16": (np.float16, torch.float16), "bf16": (ml_dtypes.bfloat16, torch.bfloat16)}[src]
    x_np = np.arange(1 << 16, dtype=np.uint16).view(src_np)
    x = torch.from_numpy(x_np.view(np.int16).copy()).view(src_t)
    with np.errstate(invalid="ignore", over="ignore"):
        in_fmt = x_np.astype(np.float32).astype(ML_NATIVE[name])
        want = in_fmt.astype(src_np)
        # The correctly rounded result must be a number of x's dtype to be returned in it.  The only
        # exception here: fp16 inputs >= 65520 round to bf16 65536, beyond fp16's max; those raise
        # ValueError (see test_result_not_representable_in_input_dtype).
        representable = (want.astype(np.float64) == in_fmt.astype(np.float64)) | _isnan(want)
    if (src, name) == ("fp16", "bf16"):
        # exactly the fp16 numbers 65408 (a tie; 65280 = 1.1111111b x 2^15 is odd) .. 65504, both signs
        assert np.array_equal(~representable, np.abs(in_fmt.astype(np.float64)) == 65536.0)
        assert int((~representable).sum()) == 8
        with pytest.raises(ValueError, match="65536.0 is not representable in the input dtype torch.float16"):
            RN(x, name)
    else:
        assert representable.all()
    keep = torch.from_numpy(representable)
    got = RN(x[keep], name)
    assert got.dtype == src_t
    assert_bits_equal(as_numpy(got), want[representable])


def test_fp8_e4m3_overflow_is_nan_like_ml_dtypes_and_max_when_saturating():
    x = torch.tensor([464.0, 464.25, 479.0, 480.0, 1e30, math.inf, -464.25, -math.inf, math.nan])  # fp16-exact
    want_default = np.array([448, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan], np.float32)
    want_saturate = np.array([448, 448, 448, 448, 448, 448, -448, -448, np.nan], np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        ml = x.numpy().astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert_bits_equal(ml, want_default)  # the oracle's convention
    for dtype in (torch.float32, torch.float64, torch.float16):
        xi = x.to(dtype)
        assert_bits_equal(RN(xi, "fp8_e4m3"), want_default.astype(_NP_OF[dtype]), inputs=xi)
        assert_bits_equal(RN(xi, "fp8_e4m3", saturate=True), want_saturate.astype(_NP_OF[dtype]), inputs=xi)
        out = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
        RN(xi, "fp8_e4m3", out=out)
        assert_bits_equal(out, want_default.astype(ml_dtypes.float8_e4m3fn))
        RN(xi, "fp8_e4m3", saturate=True, out=out)
        assert_bits_equal(out, want_saturate.astype(ml_dtypes.float8_e4m3fn))


# ==================================================================================================
# 2. from fp64 (and fp32) against the Fraction reference
# ==================================================================================================
def curated_values(spec: Spec) -> list[float]:
    """Binade edges, every kind of tie ± a few fp64 ulps, the subnormal range, the overflow boundary."""
    m, q_sub = spec.mbits, spec.quantum
    reps = {0.0, q_sub, 2 * q_sub, 3 * q_sub, (2**m - 2) * q_sub, (2**m - 1) * q_sub, spec.max}
    emax = math.frexp(spec.max)[1] - 1
    for e in {spec.emin, spec.emin + 1, -1, 0, 1, 7, emax - 1, emax}:
        if spec.emin <= e <= emax:
            for k in (2**m, 2**m + 1, 2**m + 2, 2 ** (m + 1) - 2, 2 ** (m + 1) - 1):
                if (v := math.ldexp(k, e - m)) <= spec.max:
                    reps.add(v)
    out = [q_sub / 4, 0.75 * q_sub, 2 * spec.max, float.fromhex("0x1.fffffffffffffp+1023"), 5e-324, math.inf, math.nan]
    for v in sorted(reps):
        for point in (v, v + spec.spacing_above(v) / 2):  # the value and the tie above it
            p_up = p_down = point
            out.append(point)
            for _ in range(2):
                p_up, p_down = math.nextafter(p_up, math.inf), math.nextafter(p_down, -math.inf)
                out += [p_up, p_down]
    return out + [-v for v in out]


@pytest.mark.parametrize("mode", ["nearest", "zero"])
@pytest.mark.parametrize("name", SPEC_NAMES)
def test_curated_fp64_values_match_reference(name, mode):
    spec = SPECS[name]
    xs = curated_values(spec)
    x = torch.tensor(xs, dtype=torch.float64)
    fn, ref = (RN, spec.rn) if mode == "nearest" else (RZ, spec.rz)
    assert_bits_equal(fn(x, name), np.array([ref(v) for v in xs]), inputs=x)


@pytest.mark.parametrize("name", FP32_SPEC_NAMES)
def test_curated_fp32_values_match_reference(name):
    spec = SPECS[name]
    xs32 = np.array(curated_values(spec), dtype=np.float64)
    with np.errstate(over="ignore"):
        x = torch.from_numpy(xs32.astype(np.float32))  # fp32 versions of the same points (ties stay ties)
    for fn, ref in ((RN, spec.rn), (RZ, spec.rz)):
        want = expected_tensor([ref(v) for v in x.double().tolist()], torch.float32)
        assert_bits_equal(fn(x, name), want, inputs=x)


def test_issue_case_fp64_to_bf16_is_correctly_rounded():
    """The issue's fp64 -> bf16 case is rounded once, correctly.

    x = -3.261076958324163e-19 lies just above the midpoint of -192 and -193 x 2^-69 in magnitude;
    through fp32 it lands on that midpoint and ties to even -192 x 2^-69 (a double-rounding error).
    """
    xv = -3.261076958324163e-19
    x = torch.tensor([xv], dtype=torch.float64)
    want = -193 * 2.0**-69
    assert SPECS["bf16"].rn(xv) == want
    assert RN(x, "bf16").item() == want
    assert RN(x, "bf16").dtype == torch.float64
    out = torch.empty(1, dtype=torch.bfloat16)
    RN(x, "bf16", out=out)
    assert out.double().item() == want
    # the detour through fp32 (an IEEE cast) really does land on the tie and give the wrong answer
    assert abs(Fraction(float(np.float32(xv)))) == Fraction(385, 2) * Fraction(1, 2**69)
    assert RN(x.float(), "bf16").item() == -192 * 2.0**-69


@pytest.mark.parametrize("name", [n for n in SPEC_NAMES if SPECS[n].mbits <= 21 and SPECS[n].ebits <= 8])
def test_double_rounding_traps(name):
    """Values one fp64 ulp off a tie are rounded once, correctly.

    x = tie ± 1 fp64 ulp: fp64 -> fp32 rounds x onto the tie (checked), and the tie then goes to the
    even neighbour, which is the wrong one; round_nearest must see the fp64 bits and round once.
    """
    spec = SPECS[name]
    xs, want, naive_results = [], [], []
    for e in (spec.emin, 0, 3):
        q = math.ldexp(1.0, e - spec.mbits)
        for k in (2**spec.mbits, 2**spec.mbits + 1, 2 ** (spec.mbits + 1) - 2):
            v = k * q
            tie = v + q / 2
            # above the tie the answer is up, below it down; fp32 erases the difference
            above, below = math.nextafter(tie, math.inf), math.nextafter(tie, -math.inf)
            for x, correct in ((above, v + q), (below, v)):
                assert float(np.float32(x)) == tie  # the trap is armed
                xs += [x, -x]
                want += [correct, -correct]
                naive_results.append(v + q if k % 2 else v)  # what RN(tie) gives: the even one
    x = torch.tensor(xs, dtype=torch.float64)
    assert_bits_equal(RN(x, name), np.array(want), inputs=x)
    assert_bits_equal(RN(x, name), np.array([spec.rn(v) for v in xs]), inputs=x)
    naive = RN(x.float(), name).double()
    assert (naive != torch.tensor(want, dtype=torch.float64)).sum().item() == len(xs) // 2  # half are wrong


@pytest.mark.parametrize("mode", ["nearest", "zero"])
@pytest.mark.parametrize("name", SPEC_NAMES)
@HALF
@given(data=st.data())
def test_fp64_inputs_match_reference(name, mode, data):
    spec = SPECS[name]
    xs = data.draw(fp64_lists(spec), label="xs")
    x = torch.tensor(xs, dtype=torch.float64)
    fn, ref = (RN, spec.rn) if mode == "nearest" else (RZ, spec.rz)
    assert_bits_equal(fn(x, name), np.array([ref(v) for v in xs]), inputs=x)


@pytest.mark.parametrize("mode", ["nearest", "zero"])
@pytest.mark.parametrize("name", FP32_SPEC_NAMES)
@QUARTER
@given(bits=fp32_lists())
def test_fp32_inputs_match_reference(name, mode, bits):
    spec = SPECS[name]
    x = fp32_from_bits(bits)
    fn, ref = (RN, spec.rn) if mode == "nearest" else (RZ, spec.rz)
    want = expected_tensor([ref(v) for v in x.double().tolist()], torch.float32)
    assert_bits_equal(fn(x, name), want, inputs=x)


@pytest.mark.parametrize("src", ["fp16", "bf16"])
@pytest.mark.parametrize("name", FP32_SPEC_NAMES)
@QUARTER
@given(bits=st.lists(st.integers(0, 2**16 - 1), min_size=1, max_size=24))
def test_16bit_inputs_match_reference(name, src, bits):
    spec = SPECS[name]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[src]
    x = torch.tensor(np.array(bits, dtype=np.uint16).view(np.int16)).view(dtype)
    for fn, ref in ((RN, spec.rn), (RZ, spec.rz)):
        want64 = np.array([ref(v) for v in x.double().tolist()])
        want = want64.astype(_NP_OF[dtype])
        # only where the correct result is a number of x's dtype (see test_result_not_representable_in_input_dtype)
        keep = (want.astype(np.float64) == want64) | np.isnan(want64)
        if not keep.all():  # a result outside x's dtype is refused, never re-rounded
            with pytest.raises(ValueError, match="not representable in the input dtype"):
                fn(x, name)
        assert_bits_equal(as_numpy(fn(x[torch.from_numpy(keep)], name)), want[keep])


# --------------------------------------------------------------------------------------------------
# overflow with saturate=True, Inf with saturate=True
# --------------------------------------------------------------------------------------------------
def _saturate_params():
    for name in ["bf16", "fp16", "fp8_e5m2", "fp8_e4m3", "tf32", "e5m7", "e3m2"]:
        for src, dtype in (("fp64in", torch.float64), ("fp32in", torch.float32), ("fp16in", torch.float16)):
            if dtype == torch.float16 and SPECS[name].max >= 65504:
                continue  # fp16 cannot overflow these
            yield pytest.param(name, dtype, id=f"{name}-{src}")


@pytest.mark.parametrize(("name", "dtype"), list(_saturate_params()))
def test_saturate_maps_overflow_to_max(name, dtype):
    spec = SPECS[name]
    top_q = spec.spacing_above(spec.max)
    dmax = torch.finfo(dtype).max
    candidates = [spec.max + top_q / 2, math.nextafter(spec.max + top_q / 2, math.inf), 2 * spec.max, dmax, 1e300]
    xs = [v for v in candidates if v <= dmax and float(torch.tensor(v, dtype=dtype).item()) == v]
    xs += [-v for v in xs]
    x = torch.tensor(xs, dtype=dtype)
    assert len(xs) >= 4
    want = expected_tensor([spec.rn(v, saturate=True) for v in xs], dtype)
    assert set(np.abs(want.astype(np.float64)).tolist()) == {spec.max}
    assert_bits_equal(RN(x, name, saturate=True), want, inputs=x)
    # without saturate the same values overflow (to NaN in fp8_e4m3, whose 464 tie goes to 448)
    assert_bits_equal(RN(x, name), expected_tensor([spec.rn(v) for v in xs], dtype), inputs=x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32in", "fp64in"])
@pytest.mark.parametrize("name", ["bf16", "fp16", "fp8_e5m2", "fp8_e4m3", "tf32", "e5m7", "e3m2"])
def test_sr_saturate_maps_overflow_to_max(name, dtype):
    """Stochastic rounding saturates overflow.

    SR beyond max: down is max and up overflows, so with saturate=True every draw gives ±max;
    without it each draw is ±max or the overflow value (±Inf, NaN in fp8_e4m3).
    """
    spec = SPECS[name]
    top_q = spec.spacing_above(spec.max)
    xs = [
        v
        for v in (spec.max + top_q / 4, spec.max + top_q / 2, spec.max + top_q, 3 * spec.max)
        if float(torch.tensor(v, dtype=dtype).item()) == v
    ]
    x = torch.tensor(xs + [-v for v in xs], dtype=dtype).repeat(64)
    g = torch.Generator().manual_seed(6)
    got = pl.round_stochastic(x, name, generator=g, saturate=True)
    assert_bits_equal(got, torch.copysign(torch.full_like(x, spec.max), x))
    _assert_neighbours(pl.round_stochastic(x, name, generator=g), x, spec)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32in", "fp64in"])
@pytest.mark.parametrize("name", ["bf16", "fp16", "tf32", "fp8_e5m2", "fp32"])
def test_saturate_maps_inf_to_max_as_documented(name, dtype):
    x = torch.tensor([math.inf, -math.inf], dtype=dtype)
    fmax = SPECS[name].max
    assert RN(x, name, saturate=True).tolist() == [fmax, -fmax]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=["fp32in", "fp64in", "fp16in"])
def test_saturate_maps_inf_to_max_in_fp8_e4m3(dtype):
    x = torch.tensor([math.inf, -math.inf, math.nan], dtype=dtype)
    got = RN(x, "fp8_e4m3", saturate=True)
    assert_bits_equal(got, np.array([448.0, -448.0, np.nan]).astype(_NP_OF[dtype]))
    g = torch.Generator().manual_seed(0)
    assert_bits_equal(
        pl.round_stochastic(x, "fp8_e4m3", saturate=True, generator=g),
        np.array([448.0, -448.0, np.nan]).astype(_NP_OF[dtype]),
    )


@pytest.mark.parametrize(
    ("fn", "x", "dtype", "name", "exact"),
    [
        pytest.param(RZ, 70144.0, torch.bfloat16, "fp16", 65504.0, id="rz-bf16in-fp16"),
        pytest.param(
            functools.partial(RN, saturate=True), 70144.0, torch.bfloat16, "fp16", 65504.0, id="rn-saturate-bf16in-fp16"
        ),
        pytest.param(RN, 65504.0, torch.float16, "bf16", 65536.0, id="rn-fp16in-bf16"),
    ],
)
def test_result_not_representable_in_input_dtype(fn, x, dtype, name, exact):
    """The contract says the result holds a value representable in fmt; refusing (ValueError) is also fine."""
    t = torch.tensor([x, -x], dtype=dtype)
    try:
        got = fn(t, name)
    except ValueError:
        return
    assert got.double().tolist() == [exact, -exact]


# ==================================================================================================
# 3. properties
# ==================================================================================================
@pytest.mark.parametrize("name", SPEC_NAMES)
@QUARTER
@given(data=st.data())
def test_rn_relative_error_at_most_unit_roundoff(name, data):
    """|RN(x) - x| <= u |x|, u = 2^-(m+1), for x in the normal range (checked exactly)."""
    spec = SPECS[name]
    mags = data.draw(st.lists(st.floats(spec.smallest_normal, spec.max), min_size=1, max_size=24), label="mags")
    signs = data.draw(st.lists(st.booleans(), min_size=len(mags), max_size=len(mags)), label="signs")
    xs = [-v if s else v for v, s in zip(mags, signs, strict=True)]
    got = RN(torch.tensor(xs, dtype=torch.float64), name).tolist()
    u = Fraction(1, 2 ** (spec.mbits + 1))
    for x, r in zip(xs, got, strict=True):
        assert abs(Fraction(r) - Fraction(x)) <= u * abs(Fraction(x)), (x, r)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64in", "fp32in"])
@pytest.mark.parametrize("name", SPEC_NAMES)
@QUARTER
@given(data=st.data())
def test_monotone(name, dtype, data):
    """Monotone: x <= y  =>  RN(x) <= RN(y) and RZ(x) <= RZ(y) (NaN from fp8_e4m3's overflow excluded)."""
    spec = SPECS[name]
    if dtype == torch.float32 and not spec.fits_fp32:
        return
    xs = data.draw(fp64_lists(spec), label="xs")
    x = torch.tensor(xs, dtype=torch.float64).to(dtype)
    x = x[~torch.isnan(x)].sort().values
    for fn in (RN, RZ):
        r = fn(x, name)
        r = r[~torch.isnan(r)]
        assert bool((r[1:] >= r[:-1]).all()), (fn.__name__, x.tolist(), r.tolist())


@pytest.mark.parametrize("name", SPEC_NAMES)
@QUARTER
@given(data=st.data())
def test_idempotent_and_results_are_fixed_points(name, data):
    """RN(RN(x)) == RN(x), RZ(RZ(x)) == RZ(x), and each result is a fixed point of the other modes."""
    spec = SPECS[name]
    x = torch.tensor(data.draw(fp64_lists(spec), label="xs"), dtype=torch.float64)
    rn, rz = RN(x, name), RZ(x, name)
    assert_bits_equal(RN(rn, name), rn, inputs=x)
    assert_bits_equal(RZ(rz, name), rz, inputs=x)
    assert_bits_equal(RZ(rn, name), rn, inputs=x)
    assert_bits_equal(RN(rz, name), rz, inputs=x)
    g = torch.Generator().manual_seed(1)
    assert_bits_equal(pl.round_stochastic(rn, name, generator=g), rn, inputs=x)


@pytest.mark.parametrize("name", SPEC_NAMES)
@QUARTER
@given(data=st.data())
def test_odd_symmetry(name, data):
    """RN(-x) == -RN(x), RZ(-x) == -RZ(x) bitwise; SR too, given the same random bits (same seed)."""
    spec = SPECS[name]
    x = torch.tensor(data.draw(fp64_lists(spec), label="xs"), dtype=torch.float64)
    for fn in (RN, RZ):
        assert_bits_equal(fn(-x, name), -fn(x, name), inputs=x)
    sr = pl.round_stochastic
    seed = data.draw(st.integers(0, 2**32), label="seed")
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    assert_bits_equal(sr(-x, name, generator=g1), -sr(x, name, generator=g2), inputs=x)


@pytest.mark.parametrize("name", SPEC_NAMES)
@QUARTER
@given(data=st.data())
def test_representable_values_are_fixed_points(name, data):
    """Every number of the format comes back unchanged from RN, RZ and SR (fp64 input, and fp32 input)."""
    spec = SPECS[name]
    nbits = 1 + spec.ebits + spec.mbits
    patterns = data.draw(st.lists(st.integers(0, 2**nbits - 1), min_size=1, max_size=24), label="patterns")
    values = [spec.decode(p) for p in patterns]
    # numbers only (no NaN); without subnormals the subnormal patterns are not numbers of the format
    values = [v for v in values if not math.isnan(v) and (spec.subnormals or v == 0 or abs(v) >= spec.smallest_normal)]
    if not spec.subnormals:
        values += [0.0, -0.0]
    dtypes = [torch.float64, torch.float32] if spec.fits_fp32 else [torch.float64]
    g = torch.Generator().manual_seed(2)
    for dtype in dtypes:
        x = torch.tensor(values, dtype=dtype)
        for fn in (RN, RZ, functools.partial(pl.round_stochastic, generator=g)):
            assert_bits_equal(fn(x, name), x, inputs=x)


@pytest.mark.parametrize("name", SPEC_NAMES)
@QUARTER
@given(data=st.data())
def test_rz_never_increases_magnitude(name, data):
    spec = SPECS[name]
    x = torch.tensor(data.draw(fp64_lists(spec), label="xs"), dtype=torch.float64)
    x = x[~torch.isnan(x)]
    r = RZ(x, name)
    ok = (r.abs() <= x.abs()) | (torch.isnan(r) & torch.isinf(x))  # fn formats: Inf -> NaN
    assert bool(ok.all()), (x.tolist(), r.tolist())
    assert bool(((torch.signbit(r) == torch.signbit(x)) | torch.isnan(r)).all())


_DTYPES = {"fp16in": torch.float16, "bf16in": torch.bfloat16, "fp32in": torch.float32, "fp64in": torch.float64}
_FUNCS = {
    "rn": RN,
    "rz": RZ,
    "sr": lambda x, name, **kw: pl.round_stochastic(x, name, generator=torch.Generator().manual_seed(3), **kw),
}


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("src", list(_DTYPES))
@pytest.mark.parametrize("func", list(_FUNCS))
@pytest.mark.parametrize("name", ["fp64", "fp32", "tf32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "e5m7", "bf16_ftz"])
def test_output_dtype_is_input_dtype(name, func, src, device):
    x = torch.linspace(-3, 3, 17, dtype=torch.float64).to(_DTYPES[src]).to(device)
    r = _FUNCS[func](x, name)
    assert r.dtype == x.dtype
    assert r.shape == x.shape
    assert r.device == x.device
    assert r.data_ptr() != x.data_ptr()  # a new tensor, x untouched


@pytest.mark.parametrize("func", list(_FUNCS))
@pytest.mark.parametrize("name", ["fp64", "fp32", "bf16", "fp16", "tf32"])
def test_does_not_modify_input_and_handles_in_place_out(name, func):
    x = torch.tensor([1 + 2**-9, -(2**-140), 3.3, math.inf], dtype=torch.float32)
    keep = x.clone()
    want = _FUNCS[func](x, name)
    assert_bits_equal(x, keep)
    y = x.clone()
    assert _FUNCS[func](y, name, out=y) is y  # out may alias x
    assert_bits_equal(y, want)


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16", "fp8_e5m2", "tf32", "e5m7"])
def test_empty_and_multidimensional_and_noncontiguous(name):
    spec = SPECS[name]
    g = torch.Generator().manual_seed(4)
    assert RN(torch.empty(0), name).shape == (0,)
    assert pl.round_stochastic(torch.empty(0, 3), name, generator=g).shape == (0, 3)
    x = torch.randn(6, 5, 4, generator=g, dtype=torch.float64).transpose(0, 2)  # non-contiguous
    for fn, ref in ((RN, spec.rn), (RZ, spec.rz)):
        got = fn(x, name)
        assert got.shape == x.shape
        want = np.array([ref(v) for v in x.reshape(-1).tolist()]).reshape(tuple(x.shape))
        assert_bits_equal(got, want)
    x32 = x.float()
    down = RZ(x32, name)
    sr = pl.round_stochastic(x32, name, generator=g)
    assert sr.shape == x32.shape
    assert bool(((sr == down) | (sr.abs() > down.abs())).all())


# --------------------------------------------------------------------------------------------------
# curated edge values, per format, Inf/NaN as documented in rounding.py's docstring
# --------------------------------------------------------------------------------------------------
def _edge_params():
    for name in SPEC_NAMES:
        for src, dtype in (("fp64in", torch.float64), ("fp32in", torch.float32)):
            if dtype == torch.float32 and not SPECS[name].fits_fp32:
                continue
            yield pytest.param(name, dtype, id=f"{name}-{src}")


@pytest.mark.parametrize(("name", "dtype"), list(_edge_params()))
def test_edge_values(name, dtype):
    spec = SPECS[name]
    ss, fmax, ieee = spec.quantum, spec.max, spec.encoding == "ieee"
    ftz = not spec.subnormals
    dmin = 2.0**-149 if dtype == torch.float32 else 5e-324
    nan, inf = math.nan, math.inf
    g = torch.Generator().manual_seed(5)

    def sr(t):
        return pl.round_stochastic(t, name, generator=g)

    # (x, RN, RZ, SR outcomes)
    rows = [
        (0.0, 0.0, 0.0, {0.0}),
        (-0.0, -0.0, -0.0, {-0.0}),
        (ss, 0.0 if ftz else ss, 0.0 if ftz else ss, {0.0 if ftz else ss}),
        (-ss, -0.0 if ftz else -ss, -0.0 if ftz else -ss, {-0.0 if ftz else -ss}),
        (fmax, fmax, fmax, {fmax}),
        (-fmax, -fmax, -fmax, {-fmax}),
        (1.0, 1.0, 1.0, {1.0}),
        (-1.0, -1.0, -1.0, {-1.0}),
        (inf, inf if ieee else nan, inf if ieee else nan, {inf} if ieee else {nan}),
        (-inf, -inf if ieee else nan, -inf if ieee else nan, {-inf} if ieee else {nan}),
        (nan, nan, nan, {nan}),
    ]
    if ss / 2 >= dmin:  # half the smallest subnormal: a tie between 0 (even) and ss
        rows.append((ss / 2, 0.0, 0.0, {0.0} if ftz else {0.0, ss}))
        rows.append((-ss / 2, -0.0, -0.0, {-0.0} if ftz else {-0.0, -ss}))
    if dmin < ss:
        rows.append((dmin, 0.0, 0.0, {0.0} if ftz else {0.0, ss}))
    x = torch.tensor([r[0] for r in rows], dtype=dtype)
    assert_bits_equal(RN(x, name), expected_tensor([r[1] for r in rows], dtype), inputs=x)
    assert_bits_equal(RZ(x, name), expected_tensor([r[2] for r in rows], dtype), inputs=x)
    # the reference agrees on every row
    assert_bits_equal(
        expected_tensor([spec.rn(r[0]) for r in rows], dtype), expected_tensor([r[1] for r in rows], dtype)
    )
    for _ in range(8):
        got = sr(x).tolist()
        for (xv, *_, outcomes), r in zip(rows, got, strict=True):
            assert any(f64_bits(r) == f64_bits(o) or (math.isnan(r) and math.isnan(o)) for o in outcomes), (xv, r)


# ==================================================================================================
# 4. round_stochastic: the outcome set, reproducibility, paths
# ==================================================================================================
def _assert_neighbours(got: torch.Tensor, x: torch.Tensor, spec: Spec) -> None:
    """Every element of ``got`` is bitwise one of the two SR outcomes of the matching element of ``x``."""
    pairs = [spec.neighbours(v)[:2] for v in x.double().reshape(-1).tolist()]
    down = expected_tensor([d for d, _ in pairs], got.dtype)
    up = expected_tensor([u for _, u in pairs], got.dtype)
    g = as_numpy(got).reshape(-1)
    u = _UINT[g.itemsize]
    hit = (g.view(u) == down.view(u)) | (g.view(u) == up.view(u)) | (_isnan(g) & (_isnan(down) | _isnan(up)))
    if not hit.all():
        i = int(np.flatnonzero(~hit)[0])
        pytest.fail(
            f"x={x.reshape(-1)[i].item()!r}: got {float(g[i])!r}, neighbours {float(down[i])!r}, {float(up[i])!r}"
        )


_SR_REPEAT = 4  # each drawn value is rounded this many times in one call (independent bits per element)


@pytest.mark.parametrize("name", SPEC_NAMES)
@QUARTER
@given(data=st.data())
def test_sr_fp64_result_is_a_neighbour(name, data):
    spec = SPECS[name]
    x = torch.tensor(data.draw(fp64_lists(spec), label="xs"), dtype=torch.float64).repeat(_SR_REPEAT)
    seed = data.draw(st.integers(0, 2**63 - 1), label="seed")
    bits = data.draw(st.sampled_from([None, None, 1, 4, 16, 62]), label="random_bits")
    got = pl.round_stochastic(x, name, generator=torch.Generator().manual_seed(seed), random_bits=bits)
    _assert_neighbours(got, x, spec)


@pytest.mark.parametrize("name", FP32_SPEC_NAMES)
@QUARTER
@given(data=st.data())
def test_sr_fp32_result_is_a_neighbour(name, data):
    """fp32 inputs: the fp32 -> bf16 fast path (random_bits None/<=16) and the generic path for the rest."""
    spec = SPECS[name]
    x = fp32_from_bits(data.draw(fp32_lists(), label="bits")).repeat(_SR_REPEAT)
    seed = data.draw(st.integers(0, 2**63 - 1), label="seed")
    bits = data.draw(st.sampled_from([None, None, 1, 4, 16, 17, 62]), label="random_bits")
    got = pl.round_stochastic(x, name, generator=torch.Generator().manual_seed(seed), random_bits=bits)
    _assert_neighbours(got, x, spec)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64in", "fp32in"])
@pytest.mark.parametrize("name", SPEC_NAMES)
@QUARTER
@given(data=st.data())
def test_sr_is_monotone_given_the_same_random_bits(name, dtype, data):
    """Coupled monotonicity: lo <= hi elementwise  =>  SR(lo) <= SR(hi) with the same generator seed.

    Element i draws the same uniform U_i for both calls (the bits depend on the key and the index
    only), and rounding up iff U_i < frac is monotone in x; across a binade edge the upper neighbour
    of lo is at most the lower neighbour of hi.  Holds on the fp32 -> bf16 fast path too.
    """
    spec = SPECS[name]
    if dtype == torch.float32 and not spec.fits_fp32:
        return
    a = data.draw(fp64_lists(spec), label="a")
    b = data.draw(st.lists(fp64_values(spec), min_size=len(a), max_size=len(a)), label="b")
    x, y = torch.tensor(a, dtype=torch.float64).to(dtype), torch.tensor(b, dtype=torch.float64).to(dtype)
    keep = ~(torch.isnan(x) | torch.isnan(y))
    lo, hi = torch.minimum(x, y)[keep], torch.maximum(x, y)[keep]
    seed = data.draw(st.integers(0, 2**63 - 1), label="seed")
    bits = data.draw(st.sampled_from([None, 4]), label="random_bits")
    r_lo = pl.round_stochastic(lo, name, generator=torch.Generator().manual_seed(seed), random_bits=bits)
    r_hi = pl.round_stochastic(hi, name, generator=torch.Generator().manual_seed(seed), random_bits=bits)
    finite = ~(torch.isnan(r_lo) | torch.isnan(r_hi))  # fp8_e4m3's overflow is NaN
    assert bool((r_lo[finite] <= r_hi[finite]).all()), (lo.tolist(), hi.tolist(), r_lo.tolist(), r_hi.tolist())


# (id, dtype, format): the fp32 -> bf16 fast path and a few generic paths
SR_PATHS = {
    "bf16-fp32in-fast": (torch.float32, "bf16"),
    "bf16-fp64in-generic": (torch.float64, "bf16"),
    "fp16-fp32in-generic": (torch.float32, "fp16"),
    "fp8_e4m3-fp32in-generic": (torch.float32, "fp8_e4m3"),
    "e3m2-fp64in-generic": (torch.float64, "e3m2"),
    "bf16_ftz-fp32in-generic": (torch.float32, "bf16_ftz"),
}


def _sr_inputs(dtype: torch.dtype, n: int = 4096) -> torch.Tensor:
    """Values in [-4, 4] spread over many binades, mostly not representable in any tested format."""
    g = torch.Generator().manual_seed(11)
    return (torch.rand(n, generator=g, dtype=torch.float64) * 8 - 4).to(dtype) * 2.0 ** torch.randint(
        -8, 8, (n,), generator=g
    ).to(dtype)


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("path", list(SR_PATHS))
def test_sr_same_seed_same_bits_different_seed_different_bits(path, device):
    dtype, name = SR_PATHS[path]
    x = _sr_inputs(dtype).to(device)
    a = pl.round_stochastic(x, name, generator=torch.Generator().manual_seed(123))
    b = pl.round_stochastic(x, name, generator=torch.Generator().manual_seed(123))
    c = pl.round_stochastic(x, name, generator=torch.Generator().manual_seed(124))
    assert_bits_equal(a, b)
    _assert_neighbours(a.cpu(), x.cpu(), SPECS[name])
    _assert_neighbours(c.cpu(), x.cpu(), SPECS[name])
    # with ~4096 values whose P(up) is far from 0 and 1, two independent draws agree everywhere with
    # probability < 2^-1000; demand that at least 10% of the elements differ (expected: ~1/3)
    assert (a != c).sum().item() > 0.1 * x.numel()
    # successive calls on one generator advance it: independent draws as well
    g = torch.Generator().manual_seed(123)
    first, second = pl.round_stochastic(x, name, generator=g), pl.round_stochastic(x, name, generator=g)
    assert_bits_equal(first, a)
    assert (first != second).sum().item() > 0.1 * x.numel()


@pytest.mark.parametrize("path", list(SR_PATHS))
def test_sr_out_gives_the_same_bits(path):
    """out= of x's dtype and of the native dtype (when there is one) hold the same values as no out=."""
    dtype, name = SR_PATHS[path]
    x = _sr_inputs(dtype)
    want = pl.round_stochastic(x, name, generator=torch.Generator().manual_seed(9))
    out = torch.empty_like(x)
    assert pl.round_stochastic(x, name, generator=torch.Generator().manual_seed(9), out=out) is out
    assert_bits_equal(out, want)
    native = get_format(name).torch_dtype
    if native is not None:
        out_n = torch.empty(x.shape, dtype=native)
        assert pl.round_stochastic(x, name, generator=torch.Generator().manual_seed(9), out=out_n) is out_n
        assert_bits_equal(out_n.to(dtype), want)  # exact widening of a native value
        assert_bits_equal(out_n, as_numpy(want).astype(_NP_OF[native]))


@pytest.mark.parametrize("random_bits", [None, 16, 8, 4, 1])
def test_sr_bf16_fast_path_bits_are_the_documented_ones(random_bits):
    """The fp32 -> bf16 fast path gives the documented bits.

    fp32 -> bf16: ((bits(x) + r) & 0xFFFF0000) with r the 16-bit lanes of sr_bf16_random16(key), its top
    ``random_bits`` kept; key = derive_key(generator).  Pins the bits any kernel (numba, CUDA) must give.
    """
    x = torch.cat([_sr_inputs(torch.float32, 1001), torch.tensor([math.inf, -math.inf, 3.0e38, -3.0e38, 0.0, -0.0])])
    key = _random.derive_key(torch.Generator().manual_seed(77))
    r = sr_bf16_random16(key, x.numel(), "cpu").to(torch.int64)
    keep = 16 if random_bits is None else random_bits
    r = r >> (16 - keep) << (16 - keep)
    want = ((x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF) + r) & 0xFFFF0000  # unsigned 32-bit arithmetic
    want = torch.where(want >= 2**31, want - 2**32, want).to(torch.int32).view(torch.float32)
    got = pl.round_stochastic(x, "bf16", generator=torch.Generator().manual_seed(77), random_bits=random_bits)
    assert_bits_equal(got, want, inputs=x)


def test_sr_bf16_fast_path_nan_stays_nan():
    """A NaN payload near the top must not carry into the sign or become Inf."""
    bits = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0xFF800001, 0x7FC00000, 0x7FBFFFFF], dtype=np.uint32)
    x = torch.from_numpy(bits.view(np.float32).copy()).repeat(64)
    got = pl.round_stochastic(x, "bf16", generator=torch.Generator().manual_seed(1))
    assert bool(torch.isnan(got).all())


def test_sr_fp64_fixed_points_with_bits_beyond_fp32():
    """fp64 numbers of fp32 / tf32 / e11m52 never move, whatever the random bits."""
    x = torch.tensor([1 + 2**-23, 2.0**-149, -(2.0**127) * (2 - 2**-23), 1 + 2**-10], dtype=torch.float64).repeat(256)
    for name in ("fp32", "e11m52"):
        got = pl.round_stochastic(x, name, generator=torch.Generator().manual_seed(2))
        assert_bits_equal(got, x)
    y = torch.tensor([1 + 2**-10, -(2.0**-136)], dtype=torch.float64).repeat(256)
    assert_bits_equal(pl.round_stochastic(y, "tf32", generator=torch.Generator().manual_seed(2)), y)


# ==================================================================================================
# 5. round_stochastic is unbiased: exact binomial tests with negative controls
# ==================================================================================================
@dataclass(frozen=True)
class SRCase:
    x: float
    dtype: torch.dtype
    name: str
    n: int

    def p(self) -> Fraction:
        """Exact P(round up) = (|x| - lo) / (hi - lo), from the Fraction reference."""
        return SPECS[self.name].neighbours(self.x)[2]

    def count_up(self, **kwargs) -> int:
        """Round n copies of x in one call (independent bits per element); count results equal to `up`."""
        spec = SPECS[self.name]
        down, up, _ = spec.neighbours(self.x)
        t = torch.full((self.n,), self.x, dtype=self.dtype)
        assert t[0].item() == self.x  # the case is exact in its dtype
        fn = kwargs.pop("fn", pl.round_stochastic)
        got = fn(t, self.name, **kwargs).double()
        n_up, n_down = int((got == up).sum()), int((got == down).sum())
        assert n_up + n_down == self.n  # every result is a neighbour
        return n_up


def _pvalue(k: int, n: int, p: float) -> float:
    return stats.binomtest(k, n, p).pvalue  # exact two-sided binomial test


SR_CASES = {
    # fp64 x = 1 + 2^-8/3: P(up) = 1/6 - 2^-47/3... bits far beyond the 16th below the bf16 cut
    "bf16-fp64in-third": SRCase(1 + 2**-8 / 3, torch.float64, "bf16", 2**18),
    # P(up) = 3 x 2^-18 < 2^-16: an implementation drawing only 16 random bits never rounds up; n = 2^21
    # expects 24 ups, and P(0 ups) = (1 - p)^n ~ e^-24 ~ 4e-11 < ALPHA, so such an implementation is rejected
    "bf16-fp64in-below-2^-16": SRCase(1 + 3 * 2**-25, torch.float64, "bf16", 2**21),
    "bf16-fp64in-negative-tiny": SRCase(-(1 + 2**-8 / 3) * 2.0**-100, torch.float64, "bf16", 2**18),
    "bf16-fp64in-subnormal": SRCase(0.3 * 2.0**-133, torch.float64, "bf16", 2**18),
    "fp16-fp32in-generic": SRCase(float(np.float32(1 + 0.3 * 2**-10)), torch.float32, "fp16", 2**18),
    "fp8_e4m3-fp64in-subnormal": SRCase(0.7 * 2.0**-9, torch.float64, "fp8_e4m3", 2**18),
    "e3m2-fp64in": SRCase(1 / 3, torch.float64, "e3m2", 2**18),
    "tf32-fp32in-binade-edge": SRCase(float(np.nextafter(np.float32(2), np.float32(0))), torch.float32, "tf32", 2**18),
    "bf16-fp32in-fast": SRCase(float(np.float32(1 + 2**-8 / 3)), torch.float32, "bf16", 2**18),
}


@pytest.mark.parametrize("case", list(SR_CASES))
def test_sr_is_unbiased_binomial(case):
    """Stochastic rounding is unbiased: exact binomial test.

    k ups in n draws vs Binomial(n, p) with the exact p: rejecting a correct implementation has
    probability ALPHA = 1e-6 per case (fixed seed, so the outcome is deterministic).
    """
    c = SR_CASES[case]
    p = c.p()
    assert 0 < p < 1
    k = c.count_up(generator=torch.Generator().manual_seed(1000))
    assert _pvalue(k, c.n, float(p)) >= ALPHA, (k, c.n * float(p))


@pytest.mark.parametrize("case", list(SR_CASES))
def test_sr_binomial_test_rejects_round_nearest(case):
    """Negative control: the same test, fed round_nearest, rejects (RN always picks the same side)."""
    c = SR_CASES[case]
    k = c.count_up(fn=RN)
    assert k in (0, c.n)
    assert _pvalue(k, c.n, float(c.p())) < ALPHA


@pytest.mark.parametrize("case", list(SR_CASES))
def test_sr_with_4_random_bits_is_biased_as_predicted(case):
    """Negative control: 4 random bits are biased as predicted.

    Negative control: random_bits=4 rounds up with P = floor(p 2^4) / 2^4 (biased toward zero).  The
    unbiasedness test rejects it, and the same test at the predicted biased probability accepts it.
    """
    c = SR_CASES[case]
    p = c.p()
    biased = Fraction(math.floor(p * 16), 16)
    assert biased != p  # every case is chosen so that 4 bits are not enough
    k = c.count_up(generator=torch.Generator().manual_seed(1001), random_bits=4)
    assert _pvalue(k, c.n, float(p)) < ALPHA
    assert _pvalue(k, c.n, float(biased)) >= ALPHA


def test_sr_16_random_bits_miss_probabilities_below_2_to_the_minus_16():
    """Why the generic path draws 63-bit words: with 16 bits, P(up) = floor(3 x 2^-18 x 2^16) / 2^16 = 0."""
    c = SR_CASES["bf16-fp64in-below-2^-16"]
    k16 = c.count_up(generator=torch.Generator().manual_seed(1002), random_bits=16)
    assert k16 == 0
    assert _pvalue(k16, c.n, float(c.p())) < ALPHA  # expected 24 ups; P(0) = (1 - p)^n ~ e^-24
    k = c.count_up(generator=torch.Generator().manual_seed(1002))
    assert _pvalue(k, c.n, float(c.p())) >= ALPHA


# fp32 bit patterns whose rounding to bf16 has P(up) = low16 / 2^16: normal, negative, binade edge
# (the carry goes into the exponent), subnormal, and just below max (up is Inf)
FAST_CASES = {
    f"{label}-low{low:04x}": (hi << 16) | low
    for label, hi in (("one", 0x3F80), ("neg", 0xBF80), ("edge", 0x3FFF), ("sub", 0x0001), ("top", 0x7F7F))
    for low in (0x0001, 0x00FF, 0x5555, 0x8000, 0xC001, 0xFFFF)
}
_FAST_N = 2**18


def _fast_counts(pattern: int, **kwargs) -> tuple[int, float]:
    x = torch.full((_FAST_N,), pattern, dtype=torch.int64).to(torch.int32).view(torch.float32)
    down = (pattern & 0xFFFF0000) >> 16
    got = (RN if kwargs.pop("nearest", False) else pl.round_stochastic)(x, "bf16", **kwargs)
    hi_bits = (got.view(torch.int32).to(torch.int64) & 0xFFFFFFFF) >> 16
    low = got.view(torch.int32) & 0xFFFF
    assert bool((low == 0).all())
    assert bool(((hi_bits == down) | (hi_bits == down + 1)).all())  # the two neighbours (+1: carry)
    return int((hi_bits == down + 1).sum()), (pattern & 0xFFFF) / 2**16


@pytest.mark.parametrize("case", list(FAST_CASES))
def test_sr_bf16_fast_path_probability_is_low16_over_2_16(case):
    """The fast path rounds up with probability low16 / 2^16.

    Binomial test (ALPHA per case) that P(up) = low16 / 2^16 exactly, with negative controls:
    round_nearest and random_bits=4 are rejected wherever their bias is visible at n = 2^18.
    """
    pattern = FAST_CASES[case]
    low = pattern & 0xFFFF
    k, p = _fast_counts(pattern, generator=torch.Generator().manual_seed(pattern))
    assert _pvalue(k, _FAST_N, p) >= ALPHA, (k, _FAST_N * p)
    # RN gives 0 or n ups.  Exempt: p = 2^-16 and 1 - 2^-16, where n p = 4 and P(0 ups) = e^-4 is
    # not rare.  Everywhere else (0x8000 too: RN sends the tie to the even side) the shift is >= 30 sd.
    k_rn, _ = _fast_counts(pattern, nearest=True)
    if low not in (0x0001, 0xFFFF):
        assert _pvalue(k_rn, _FAST_N, p) < ALPHA
    # 4 random bits: P = floor(16 p) / 16, which the same test accepts.  Its bias p - floor(16 p)/16 is
    # 0 at 0x8000 and 2^-16 (4 counts, < 1 sd) at 0x0001 and 0xC001: exempt; elsewhere it is >= 20 sd.
    k4, _ = _fast_counts(pattern, generator=torch.Generator().manual_seed(pattern), random_bits=4)
    biased = math.floor(p * 16) / 16
    assert _pvalue(k4, _FAST_N, biased) >= ALPHA
    if low not in (0x0001, 0x8000, 0xC001):
        assert _pvalue(k4, _FAST_N, p) < ALPHA


def _calibration(up: torch.Tensor, p: torch.Tensor, bins: int = 16) -> tuple[float, float]:
    """Chi-square over `bins` classes of p of (observed - expected ups)^2 / variance, and the overall z.

    Under unbiasedness, in class b the ups are a sum of independent Bernoulli(p_i): mean sum p_i,
    variance sum p_i (1 - p_i), normal to within 1e-3 at >= 10^4 elements per class, so the statistic
    is chi-square with `bins` degrees of freedom and z is standard normal.
    """
    cls = torch.clamp((p * bins).long(), max=bins - 1)
    up, p = up.double(), p.double()
    obs = torch.zeros(bins, dtype=torch.float64).index_add_(0, cls, up)
    exp = torch.zeros(bins, dtype=torch.float64).index_add_(0, cls, p)
    var = torch.zeros(bins, dtype=torch.float64).index_add_(0, cls, p * (1 - p))
    chi2 = float(((obs - exp) ** 2 / var).sum())
    z = float((up - p).sum() / torch.sqrt((p * (1 - p)).sum()))
    return chi2, z


def _calibration_inputs(path: str, n: int = 2**20) -> tuple[torch.Tensor, str, torch.Tensor, torch.Tensor]:
    """Random x (n of them) in [1, 2) (fixed seed), the format, and the exact down/up neighbours and P(up) per x."""
    dtype, name = {
        "bf16-fp32in-fast": (torch.float32, "bf16"),
        "bf16-fp64in-generic": (torch.float64, "bf16"),
        "fp16-fp64in-generic": (torch.float64, "fp16"),
    }[path]
    g = torch.Generator().manual_seed(31)
    x = (1 + torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)
    m = get_format(name).mantissa_bits
    down = torch.ldexp(torch.floor(torch.ldexp(x.double(), torch.tensor(m))), torch.tensor(-m))  # exact in [1, 2)
    p = torch.ldexp(x.double() - down, torch.tensor(m))  # (x - down) / 2^-m, exact
    return x, name, down, p


_CALIB_PATHS = ["bf16-fp32in-fast", "bf16-fp64in-generic", "fp16-fp64in-generic"]


@pytest.mark.parametrize("path", _CALIB_PATHS)
def test_sr_mean_error_is_zero_over_many_x(path):
    """The mean error of stochastic rounding is zero over many x.

    2^20 random x, one SR each: the per-class counts of ups match sum p (chi-square, 16 dof) and
    the total error sum (result - x) / ulp is zero (z test), each at ALPHA.
    """
    x, name, down, p = _calibration_inputs(path)
    up = pl.round_stochastic(x, name, generator=torch.Generator().manual_seed(32)).double() > down
    chi2, z = _calibration(up, p)
    assert stats.chi2.sf(chi2, 16) >= ALPHA, chi2
    assert abs(z) < Z_CRIT, z


@pytest.mark.parametrize("path", _CALIB_PATHS)
def test_sr_mean_error_test_rejects_biased_roundings(path):
    """The mean-error test rejects biased roundings.

    Negative controls: random_bits=4 fails both statistics; round_nearest fails the chi-square
    (its mean error over uniform p is ~0, so the z test alone would not catch it: hence the classes).
    """
    x, name, down, p = _calibration_inputs(path)
    up4 = pl.round_stochastic(x, name, generator=torch.Generator().manual_seed(32), random_bits=4).double() > down
    chi2, z = _calibration(up4, p)
    assert stats.chi2.sf(chi2, 16) < ALPHA
    assert abs(z) >= Z_CRIT
    chi2_rn, _ = _calibration(RN(x, name).double() > down, p)
    assert stats.chi2.sf(chi2_rn, 16) < ALPHA


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bf16-fp64in-third", "bf16-fp32in-fast", "fp16-fp32in-generic", "e3m2-fp64in"])
def test_sr_is_unbiased_binomial_16m(case):
    """The binomial test with 2^24 draws (resolves |P - p| down to ~6e-4 p(1-p)^(1/2) at ALPHA)."""
    c = SR_CASES[case]
    big = SRCase(c.x, c.dtype, c.name, 2**22)
    g = torch.Generator().manual_seed(2000)
    k = sum(big.count_up(generator=g) for _ in range(4))
    assert _pvalue(k, 4 * big.n, float(big.p())) >= ALPHA


@pytest.mark.slow
def test_sr_resolves_probability_2_to_the_minus_20():
    """Resolves P(up) = 2^-20 (fp64 1 + 2^-27 to bf16): 2^26 draws expect 64 ups; 16-bit SR would give none."""
    c = SRCase(1 + 2**-27, torch.float64, "bf16", 2**22)
    assert c.p() == Fraction(1, 2**20)
    g = torch.Generator().manual_seed(2001)
    k = sum(c.count_up(generator=g) for _ in range(16))
    assert _pvalue(k, 16 * c.n, 2**-20) >= ALPHA
    k16 = sum(c.count_up(generator=g, random_bits=16) for _ in range(16))
    assert _pvalue(k16, 16 * c.n, 2**-20) < ALPHA


# ==================================================================================================
# 6. bad input
# ==================================================================================================
_ALL_FUNCS = {"rn": RN, "rz": RZ, "sr": pl.round_stochastic}


@pytest.mark.parametrize("func", list(_ALL_FUNCS))
def test_unknown_format_lists_known_ones(func):
    with pytest.raises(ValueError, match="unknown format") as info:
        _ALL_FUNCS[func](torch.zeros(3), "fp12")
    assert "'fp12'" in str(info.value)
    assert "bf16" in str(info.value)
    assert "fp8_e4m3" in str(info.value)


@pytest.mark.parametrize(
    "dtype", [torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8, torch.float8_e5m2]
)
@pytest.mark.parametrize("func", list(_ALL_FUNCS))
def test_non_float_input_raises(func, dtype):
    with pytest.raises(ValueError, match="dtype") as info:
        _ALL_FUNCS[func](torch.zeros(3, dtype=dtype), "bf16")
    assert str(dtype) in str(info.value)


@pytest.mark.parametrize("func", list(_ALL_FUNCS))
def test_non_tensor_input_raises(func):
    with pytest.raises(ValueError, match="list"):
        _ALL_FUNCS[func]([1.0, 2.0], "bf16")


@pytest.mark.parametrize("func", list(_ALL_FUNCS))
def test_out_with_wrong_dtype_or_shape_raises(func):
    fn = _ALL_FUNCS[func]
    x = torch.zeros(4, dtype=torch.float32)
    with pytest.raises(ValueError, match="torch.float16") as info:
        fn(x, "bf16", out=torch.empty(4, dtype=torch.float16))
    assert "torch.bfloat16" in str(info.value)  # and the allowed ones
    with pytest.raises(ValueError, match="torch.float64"):
        fn(x, "tf32", out=torch.empty(4, dtype=torch.float64))  # tf32 has no native dtype: only x's
    with pytest.raises(ValueError, match=r"\(5,\)"):
        fn(x, "bf16", out=torch.empty(5, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        fn(x, "bf16", out=torch.empty(2, 2, dtype=torch.bfloat16))


@pytest.mark.parametrize("bad", [0, 63, -1, 100, 2.5, "4"])
def test_random_bits_out_of_range(bad):
    with pytest.raises(ValueError, match="random_bits") as info:
        pl.round_stochastic(torch.ones(2), "bf16", random_bits=bad, generator=torch.Generator())
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("good", [1, 16, 17, 62])
def test_random_bits_in_range(good):
    x = torch.tensor([1 + 2**-9] * 8, dtype=torch.float64)
    got = pl.round_stochastic(x, "bf16", random_bits=good, generator=torch.Generator().manual_seed(0))
    _assert_neighbours(got, x, SPECS["bf16"])


def test_generator_of_wrong_type_raises():
    with pytest.raises(ValueError, match="int"):
        pl.round_stochastic(torch.ones(2), "bf16", generator=42)


def test_out_on_another_device_raises():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="meta"):
        RN(x, "bf16", out=torch.empty(4, device="meta"))


@pytest.mark.parametrize("fmt", ["bf16", torch.bfloat16, "bfloat16", "e8m7"], ids=["name", "dtype", "alias", "exmy"])
def test_format_may_be_given_as_dtype_alias_or_format(fmt):
    """A dtype, an alias, the same layout as eXmY (generic path) and a Format give the same bits."""
    x = _sr_inputs(torch.float32)
    want = RN(x, "bf16")
    assert_bits_equal(RN(x, fmt), want)
    assert_bits_equal(RN(x, get_format(fmt)), want)
    assert_bits_equal(RZ(x, fmt), RZ(x, "bf16"))


def test_sr_without_generator_uses_torch_default_generator():
    x = _sr_inputs(torch.float64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        a = pl.round_stochastic(x, "bf16")
        torch.manual_seed(5)
        b = pl.round_stochastic(x, "bf16")
    assert_bits_equal(a, b)
    assert_bits_equal(a, pl.round_stochastic(x, "bf16", generator=torch.Generator().manual_seed(5)))
