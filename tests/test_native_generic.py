"""The compiled generic rounding kernels give exactly the bits of ``rounding._generic``.

Every comparison is on the integer views (NaN payloads and signed zeros included): the kernels must
be a drop-in replacement for ``_generic(x, f, mode, ...).to(x.dtype)``.  ``_generic`` itself is
checked against an independent oracle written with :class:`fractions.Fraction` from the definitions.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

pytest.importorskip("numba", reason="the compiled kernels need numba")

from precision_lab import _native_generic, _random  # noqa: E402
from precision_lab.formats import Format, get_format  # noqa: E402
from precision_lab.rounding import _generic  # noqa: E402

FORMATS = {
    name: get_format(name)
    for name in (
        "fp32",
        "tf32",
        "bf16",
        "fp16",
        "fp8_e4m3",
        "fp8_e5m2",
        "e5m7",
        "e3m2",
        "e11m10",
        "e8m23_ftz",
        "fp16_ftz",
        "fp8_e4m3_ftz",
        "e2m1",
        "fp64",
        "e11m52_ftz",
    )
}
# An "fn" layout whose max is 2**128: fp32's max rounds to it, which is no overflow but Inf in fp32.
FORMATS["e8m1fn"] = Format("e8m1fn", 8, 1, encoding="fn")
MODES = [("nearest", None), ("zero", None), ("stochastic", None), ("stochastic", 8), ("stochastic", 1)]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
INT = {torch.float32: torch.int32, torch.float64: torch.int64}
KEY = 0x2545F4914F6CDD1D


def _mode_id(m: tuple[str, int | None]) -> str:
    return m[0] if m[1] is None else f"{m[0]}{m[1]}"


def _run(x: torch.Tensor, f: Format, mode: str, rb: int | None, saturate: bool, key: int) -> torch.Tensor:
    out = torch.full_like(x, 12345.0)  # a value no element rounds to: unwritten elements show up
    _native_generic.round_into(x, out, f, mode, saturate=saturate, key=key, random_bits=rb)
    return out


def _assert_same_bits(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor) -> None:
    gi, wi = got.view(INT[got.dtype]), want.view(INT[want.dtype])
    bad = (gi != wi).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise AssertionError(
            f"{len(bad)} of {x.numel()} differ; first at {i}: x={x.reshape(-1)[i].item()!r} "
            f"(bits {int(x.view(INT[x.dtype]).reshape(-1)[i]):#x}) got {got.reshape(-1)[i].item()!r} "
            f"(bits {int(gi.reshape(-1)[i]):#x}) want {want.reshape(-1)[i].item()!r} (bits {int(wi.reshape(-1)[i]):#x})"
        )


def _check(x: torch.Tensor, f: Format, mode: str, rb: int | None, saturate: bool, key: int = KEY) -> None:
    want = _generic(x, f, mode, saturate=saturate, key=key, random_bits=rb).to(x.dtype)
    _assert_same_bits(_run(x, f, mode, rb, saturate, key), want, x)


def _nan_bits(dtype: torch.dtype) -> list[int]:
    """Quiet, signalling, negative and payload-carrying NaNs as signed integer bit patterns."""
    if dtype == torch.float32:
        return [0x7FC00000, 0x7F800001, 0x7FA00001, -0x3EDCBA9, 0x7FFFFFFF]  # -0x3EDCBA9: 0xFC123457
    return [0x7FF8000000000000, 0x7FF0000000000001, 0x7FF4000000000123, -0x7EDCBA987654321, 0x7FFFFFFFFFFFFFFF]


def edge_values(f: Format, dtype: torch.dtype) -> torch.Tensor:
    """Curated values around f's and the input dtype's boundaries, each with its neighbours ±1 ulp."""
    fi = torch.finfo(dtype)
    qs, sn, top = f.smallest_subnormal, f.smallest_normal, f.ulp(f.max)
    base = [
        0.0,
        1.0,
        1.5,
        3.0,
        1.0 + f.eps / 2,
        1.0 + 1.5 * f.eps,
        2.0 - f.eps / 4,
        0.1,
        fi.smallest_normal,
        fi.tiny * fi.eps,
        fi.max,
        2.0**-1074,
        2.0**-149,
        2.0**-140,
        2.0**-126,
        f.max,
        f.max + top / 2,
        f.max + top,
        f.max - top / 2,
        f.max * 4,
        2.0**f.emax,
        2.0 ** min(f.emax + 1, 1023),
        sn,
        sn / 2,
        sn - qs / 2,
        sn - qs,
        sn + qs / 2,
        qs,
        qs / 2,
        1.5 * qs,
        2.5 * qs,
        qs / 4,
        0.75 * qs,
        qs * 2.0**-30,
        1e30,
        1e300,
        3.4028235677973366e38,
        2.0**127 * 1.9999999,
        65520.0,
        464.0,
        57344.0,
        61440.0,
    ]
    t = torch.tensor([v for v in base if math.isfinite(v)], dtype=torch.float64).to(dtype)
    t = torch.cat([t, torch.nextafter(t, torch.full_like(t, math.inf)), torch.nextafter(t, torch.zeros_like(t))])
    t = torch.cat([t, -t, torch.tensor([math.inf, -math.inf], dtype=dtype)])
    return torch.cat([t, torch.tensor(_nan_bits(dtype), dtype=INT[dtype]).view(dtype)])


def random_bits_tensor(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """Uniformly random bit patterns (n of them) viewed as dtype (all classes: NaN, Inf, subnormal, normal)."""
    g = torch.Generator().manual_seed(seed)
    info = torch.iinfo(INT[dtype])
    return torch.randint(info.min, info.max, (n,), dtype=INT[dtype], generator=g).view(dtype)


def random_values_tensor(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    """Values (n) log-uniform over the dtype's finite range, random signs: most are finite."""
    g = torch.Generator().manual_seed(seed)
    lo = -1074 if dtype == torch.float64 else -149
    hi = 1023 if dtype == torch.float64 else 127
    e = torch.randint(lo, hi + 1, (n,), generator=g)
    m = torch.rand(n, generator=g, dtype=torch.float64) + 1.0
    s = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return (s * torch.ldexp(m, e)).to(dtype)


# --------------------------------------------------------------------------------------------------
# bit identity with _generic
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("saturate", [False, True], ids=["inf", "sat"])
@pytest.mark.parametrize("mode", MODES, ids=_mode_id)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("fname", FORMATS)
def test_matches_generic(fname: str, dtype: torch.dtype, mode: tuple[str, int | None], saturate: bool) -> None:
    f = FORMATS[fname]
    edges = edge_values(f, dtype)
    _check(edges, f, *mode, saturate)
    for n in (1, 3):
        _check(edges[5 : 5 + n].clone(), f, *mode, saturate)
    _check(random_bits_tensor(dtype, 1023, seed=1), f, *mode, saturate)
    _check(random_values_tensor(dtype, 1023, seed=2).reshape(31, 33), f, *mode, saturate)


@pytest.mark.parametrize(
    ("dtype", "key", "saturate"), [(torch.float32, KEY, False), (torch.float64, 2**64 - 1, True)], ids=DTYPES.keys()
)
def test_matches_generic_large(dtype: torch.dtype, key: int, saturate: bool) -> None:
    x = torch.cat([random_bits_tensor(dtype, 1 << 15, seed=3), random_values_tensor(dtype, 1 << 15, seed=4)])
    for f in FORMATS.values():
        for mode, rb in MODES:
            _check(x, f, mode, rb, saturate, key)


@given(
    words=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=8),
    fp32=st.booleans(),
    fname=st.sampled_from(sorted(FORMATS)),
    mode=st.sampled_from(MODES),
    saturate=st.booleans(),
    key=st.integers(0, 2**64 - 1),
)
@example(words=[0x477FF000], fp32=True, fname="fp16", mode=("nearest", None), saturate=False, key=0)  # 65520
@example(words=[0x43E80000], fp32=True, fname="fp8_e4m3", mode=("nearest", None), saturate=False, key=0)  # 464
@example(words=[0x43E80001], fp32=True, fname="fp8_e4m3", mode=("nearest", None), saturate=False, key=0)
@example(words=[0x3F801000], fp32=True, fname="tf32", mode=("nearest", None), saturate=False, key=0)  # 1+2^-11
@example(words=[0x7F7FFFFF], fp32=True, fname="e11m10", mode=("nearest", None), saturate=False, key=0)
@example(words=[0x7F7FFFFF], fp32=True, fname="e8m1fn", mode=("nearest", None), saturate=True, key=0)
@example(words=[0x0000000000000001], fp32=False, fname="e2m1", mode=("stochastic", None), saturate=False, key=7)
@example(words=[0x7FEFFFFFFFFFFFFF], fp32=False, fname="e11m10", mode=("nearest", None), saturate=False, key=0)
def test_hypothesis_bit_patterns(
    words: list[int], fp32: bool, fname: str, mode: tuple[str, int | None], saturate: bool, key: int
) -> None:
    if fp32:
        x = torch.from_numpy(np.array([w & 0xFFFFFFFF for w in words], dtype=np.uint32).view(np.float32))
    else:
        x = torch.from_numpy(np.array(words, dtype=np.uint64).view(np.float64))
    f = FORMATS[fname]
    _check(x, f, *mode, saturate, key)
    want = [_oracle(v, f, mode[0], saturate, key, mode[1], i) for i, v in enumerate(x.tolist())]
    _assert_equal_values(_run(x, f, *mode, saturate, key), torch.tensor(want, dtype=torch.float64).to(x.dtype), x)


def test_thread_count_independent() -> None:
    x = torch.cat([random_bits_tensor(torch.float32, 1 << 18, seed=5), random_values_tensor(torch.float32, 1 << 18, 6)])
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(
                [
                    _run(x, get_format(n), m, None, False, KEY)
                    for n in ("fp16", "tf32")
                    for m in ("nearest", "stochastic")
                ]
            )
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results, strict=True):
        _assert_same_bits(two, one, x)


# --------------------------------------------------------------------------------------------------
# the refinement path: an element whose first 63 random bits tie with floor(frac * 2^63)
# --------------------------------------------------------------------------------------------------
def _crafted_ties(key: int, count: int) -> tuple[torch.Tensor, list[int], list[float]]:
    """fp64 tensor with elements that reach refinement level 1 in fp16 stochastic rounding.

    x = (w0 * 32 + t) * 2^-92 is below fp16's quantum q = 2^-24, so frac = x / q = (w0 + t/32) * 2^-63:
    the first word F = w0 ties with the element's own word w0, and level 1 compares t * 2^58 with the
    next word w1.  Choosing t from w1's top 5 bits makes the outcome down (t) or up (t + 1).
    """
    idx = torch.arange(1 << 20, dtype=torch.int64)
    w = _random._lsr(_random.splitmix64(key, idx), 1)
    hits = idx[(w >= 2**47) & (w < 2**48)][:count].tolist()  # w0 fits 48 bits: 48 + 5 <= 53
    assert len(hits) == count
    x = random_values_tensor(torch.float64, hits[-1] + 1, seed=8)
    expected = []
    for j, i in enumerate(hits):
        w0 = _random.splitmix64_int(key, i) >> 1
        w1 = _random.splitmix64_int(_random.mix_key(key, 1), i) >> 1
        t = max(w1 >> 58, 1) if j % 2 == 0 else min((w1 >> 58) + 1, 31)  # t * 2^58 <= w1 (down) or > w1 (up)
        sign = -1.0 if j % 3 == 0 else 1.0
        x[i] = sign * math.ldexp(w0 * 32 + t, -92)  # 53 significant bits at most: exact
        assert math.floor(Fraction(abs(x[i].item())) / Fraction(2) ** -24 * 2**63) == w0
        expected.append(sign * 2.0**-24 if w1 < t << 58 else sign * 0.0)
    return x, hits, expected


def test_refinement_matches_generic_and_oracle() -> None:
    f = get_format("fp16")
    x, hits, expected = _crafted_ties(KEY, 8)
    assert {e != 0 for e in expected} == {True, False}  # both outcomes of the level-1 comparison
    k = _native_generic._kernels()
    scratch = torch.empty_like(x)
    # The premise: the parallel pass leaves exactly the crafted elements undecided.
    fin = _native_generic._params(f, "stochastic", False)
    assert k.stochastic(x.numpy(), scratch.numpy(), *fin, np.uint64(KEY)) == len(hits)
    _check(x, f, "stochastic", None, False)
    got = _run(x, f, "stochastic", None, False, KEY)
    _assert_same_bits(got[hits], torch.tensor(expected, dtype=torch.float64), x[hits])
    inplace = x.clone()  # out is x: undecided elements must still read their original value
    _native_generic.round_into(inplace, inplace, f, "stochastic", saturate=False, key=KEY, random_bits=None)
    _assert_same_bits(inplace, got, x)


# --------------------------------------------------------------------------------------------------
# _generic against an independent exact oracle (Fractions, from the definitions)
# --------------------------------------------------------------------------------------------------
def _oracle_up(frac: Fraction, key: int, random_bits: int | None, index: int) -> bool:
    """Bernoulli(frac) with the counter-based words: U = 0.w0 w1 w2 ... (63 bits each) < frac."""
    if random_bits is not None:
        return _random.splitmix64_int(key, index) >> (64 - random_bits) < math.floor(frac * 2**random_bits)
    level = 0
    while True:
        scaled = frac * 2**63
        big_f = math.floor(scaled)
        w = _random.splitmix64_int(_random.mix_key(key, level) if level else key, index) >> 1
        if w != big_f or scaled == big_f:  # decided; a zero residual can never go up
            return w < big_f
        frac, level = scaled - big_f, level + 1


def _oracle(v: float, f: Format, mode: str, saturate: bool, key: int, random_bits: int | None, index: int) -> float:
    """Round the float v into f exactly (Fractions), applying the documented overflow/Inf/NaN rules."""
    if math.isnan(v):
        return math.nan
    if math.isinf(v):
        return math.copysign(f.max, v) if saturate else (v if f.has_inf else math.nan)
    mag = Fraction(0)
    if v != 0:
        q = Fraction(2) ** (max(math.frexp(abs(v))[1] - 1, f.emin) - f.mantissa_bits)  # spacing at |v|
        y = Fraction(abs(v)) / q
        fl = math.floor(y)
        frac = y - fl
        if mode == "nearest":
            up = frac > Fraction(1, 2) or (frac == Fraction(1, 2) and fl % 2 == 1)
        elif mode == "zero":
            up = False
        else:
            up = _oracle_up(frac, key, random_bits, index)
        mag = (fl + up) * q
    if mag > Fraction(f.max):
        if mode == "zero" or saturate:
            res = f.max
        elif f.has_inf:
            res = math.inf
        else:
            return math.nan
    else:
        res = float(mag)  # exact: mag is a number of f, and f fits in float64's range
    if not f.subnormals and res < f.smallest_normal:
        res = 0.0
    return math.copysign(res, v)


def _assert_equal_values(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor) -> None:
    """Bit equality except NaN payloads and signs, which the oracle does not model."""
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"NaN positions differ for x={x[nan ^ torch.isnan(got)].tolist()}"
    _assert_same_bits(got[~nan], want[~nan], x[~nan])


@pytest.mark.parametrize("mode", MODES[:4], ids=_mode_id)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("fname", FORMATS)
def test_generic_matches_oracle(fname: str, dtype: torch.dtype, mode: tuple[str, int | None]) -> None:
    f = FORMATS[fname]
    x = torch.cat([edge_values(f, dtype), random_values_tensor(dtype, 200, seed=9)])
    for saturate in (False, True):
        got = _generic(x, f, mode[0], saturate=saturate, key=KEY, random_bits=mode[1]).to(dtype)
        want = [_oracle(v, f, mode[0], saturate, KEY, mode[1], i) for i, v in enumerate(x.tolist())]
        _assert_equal_values(got, torch.tensor(want, dtype=torch.float64).to(dtype), x)


# --------------------------------------------------------------------------------------------------
# the entry point's contract
# --------------------------------------------------------------------------------------------------
def test_enabled_follows_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRECISION_LAB_NATIVE", "0")
    assert not _native_generic.enabled()
    monkeypatch.setenv("PRECISION_LAB_NATIVE", "1")
    assert _native_generic.enabled()


def test_empty_and_inplace() -> None:
    f = get_format("bf16")
    empty = torch.empty(0)
    _native_generic.round_into(empty, empty.clone(), f, "nearest", saturate=False, key=0, random_bits=None)
    x = random_values_tensor(torch.float32, 4097, seed=10)
    want = _generic(x, f, "stochastic", key=KEY).to(x.dtype)
    _native_generic.round_into(x, x, f, "stochastic", saturate=False, key=KEY, random_bits=None)
    _assert_same_bits(x, want, x)


@pytest.mark.parametrize(
    ("x", "out", "kwargs", "match"),
    [
        (torch.zeros(4, dtype=torch.float16), torch.zeros(4, dtype=torch.float16), {}, "dtype torch.float16"),
        (torch.zeros(4), torch.zeros(4, dtype=torch.float64), {}, "out is torch.float64"),
        (torch.zeros(4), torch.zeros(5), {}, r"out is torch.float32 \(5,\)"),
        (torch.zeros(4, 4).t(), torch.zeros(4, 4), {}, "contiguous"),
        (torch.zeros(4), torch.zeros(4), {"mode": "up"}, "mode='up'"),
        (torch.zeros(4), torch.zeros(4), {"random_bits": 63}, "random_bits=63"),
    ],
)
def test_rejects_bad_arguments(x: torch.Tensor, out: torch.Tensor, kwargs: dict, match: str) -> None:
    args = {"mode": "nearest", "saturate": False, "key": 0, "random_bits": None} | kwargs
    with pytest.raises(ValueError, match=match):
        _native_generic.round_into(x, out, get_format("fp16"), args.pop("mode"), **args)


def test_rejects_partial_overlap() -> None:
    buf = torch.zeros(8)
    with pytest.raises(ValueError, match="overlaps"):
        _native_generic.round_into(
            buf[:4], buf[2:6], get_format("fp16"), "nearest", saturate=False, key=0, random_bits=None
        )
