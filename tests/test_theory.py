"""Tests of precision_lab.theory: exact stagnation counts, bound edge cases, orderings, and bounds vs simulation.

Oracle: ``ml_dtypes``/numpy casts (written independently of this package).  A sum of two numbers of
a format with precision p <= 11 is formed in float64, cast to float32, then to the format; this is the
correctly rounded sum: float32 has 24 >= 2p + 2 bits, so the double rounding is innocuous (Figueroa,
1995), and when the float64 sum is itself inexact the smaller operand lies below 2**-40 of the larger,
nowhere near a midpoint of the format.  Exact sums use :class:`fractions.Fraction`.

Deterministic results are compared with ``==``; the few tolerances carry their reason.
"""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from precision_lab import theory as th
from precision_lab.formats import FORMAT_NAMES, get_format

H = float.fromhex

# Formats with an ml_dtypes/numpy oracle: dtype, and the unsigned integer type of its bit pattern.
ORACLE = {
    "bf16": (ml_dtypes.bfloat16, np.uint16),
    "fp16": (np.float16, np.uint16),
    "fp8_e4m3": (ml_dtypes.float8_e4m3fn, np.uint8),
    "fp8_e5m2": (ml_dtypes.float8_e5m2, np.uint8),
}


def rn(x: float, name: str) -> float:
    """Round a float64 that is a sum of two numbers of the format (see the module docstring)."""
    with np.errstate(over="ignore"):  # a sum past float32's range becomes inf, as it must
        return float(np.float32(x).astype(ORACLE[name][0]))


def from_bits(bits: int, name: str) -> float:
    dtype, utype = ORACLE[name]
    return float(np.array([bits], dtype=utype).view(dtype)[0])


def simulate_stagnation(name: str, addend: float, start: float, limit: int = 1 << 17) -> int:
    """Brute force: add until the buffer stops changing (NaN counts as unchanged once reached)."""
    s, a = rn(start, name), rn(addend, name)
    for count in range(limit):
        nxt = rn(s + a, name)
        if nxt == s or (math.isnan(nxt) and math.isnan(s)):
            return count
        s = nxt
    raise AssertionError(f"no stagnation within {limit} additions")


def exact_error(computed: float, xs: list[float]) -> tuple[Fraction, Fraction]:
    """(|computed - sum xs|, sum |xs|), exactly."""
    exact = sum((Fraction(x) for x in xs), Fraction(0))
    return abs(Fraction(computed) - exact), sum((abs(Fraction(x)) for x in xs), Fraction(0))


def naive_sum(xs: list[float], name: str) -> float:
    s = 0.0
    for x in xs:
        s = rn(s + x, name)
    return s


def pairwise_sum(xs: list[float], name: str) -> float:
    if len(xs) == 1:
        return xs[0]
    mid = (len(xs) + 1) // 2  # recursive halving: depth ceil(log2 n)
    return rn(pairwise_sum(xs[:mid], name) + pairwise_sum(xs[mid:], name), name)


def kahan_sum(xs: list[float], name: str) -> float:
    """Higham's Algorithm 4.2 with every operation rounded to the format."""
    s = e = 0.0
    for x in xs:
        y = rn(x + e, name)
        t = rn(s + y, name)
        e = rn(rn(s - t, name) + y, name)
        s = t
    return s


def neumaier_sum(xs: list[float], name: str, readout: str = "fp64") -> float:
    """Neumaier's (Kahan-Babuška) summation with every operation rounded to the format.

    ``readout``: ``"fp64"`` forms ``s + c`` in fp64 (what the library's buffer does), ``"format"``
    rounds it to the format (the textbook algorithm); the bound covers both.
    """
    s = c = 0.0
    for x in xs:
        t = rn(s + x, name)
        d = rn(rn(s - t, name) + x, name) if abs(s) >= abs(x) else rn(rn(x - t, name) + s, name)
        c = rn(c + d, name)
        s = t
    return s + c if readout == "fp64" else rn(s + c, name)


def neumaier_sum_fp64(xs: list[float]) -> float:
    """The same in fp64 with Python floats (IEEE round to nearest)."""
    s = c = 0.0
    for x in xs:
        t = s + x
        c += (s - t) + x if abs(s) >= abs(x) else (x - t) + s
        s = t
    return s + c


def kahan_readout_fp64(xs: list[float]) -> float:
    """Kahan's algorithm in fp64 with Python floats, read out as s + e (Higham's Algorithm 4.2)."""
    s = e = 0.0
    for x in xs:
        y = x + e
        t = s + y
        e = (s - t) + y
        s = t
    return s + e


# --- stagnation -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [("bf16", 256), ("fp16", 2048), ("fp8_e4m3", 16), ("fp8_e5m2", 8)],
)
def test_stagnation_of_adding_one_is_two_to_the_precision(name: str, expected: int) -> None:
    assert th.stagnation_count(name, 1.0) == expected
    assert simulate_stagnation(name, 1.0, 0.0) == expected


@pytest.mark.parametrize("name", [*FORMAT_NAMES, "e5m7", "e3m2", "fp16_ftz"])
def test_stagnation_of_adding_one_all_formats(name: str) -> None:
    fmt = get_format(name)
    assert th.stagnation_count(fmt, 1.0) == 2**fmt.precision  # fp64: 2**53, computed in ~50 steps


@pytest.mark.parametrize("name", ["bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp32", "fp64"])
def test_stagnation_of_power_of_two_addends_is_scale_invariant(name: str) -> None:
    # Adding 2**j from 0 is adding 1 in units of 2**j, including subnormal addends (the subnormal
    # range is a fixed-point grid), as long as the stall value 2**(j + t) does not overflow.
    fmt = get_format(name)
    lowest = fmt.emin - fmt.mantissa_bits
    highest = math.frexp(fmt.max)[1] - 1 - fmt.precision
    for j in range(lowest, highest + 1, 1 if fmt.exponent_bits < 11 else 7):
        assert th.stagnation_count(fmt, math.ldexp(1.0, j)) == 2**fmt.precision, j


def test_stagnation_examples_against_simulation() -> None:
    cases = [
        ("bf16", 1.0, -256.0),  # crosses zero: 256 steps up to 0, then 256 more
        ("bf16", 3.0, 0.0),  # non-power-of-two addend: stalls when the spacing reaches 8
        ("bf16", 1.5, 1.0),  # a tie on the way (1.5 = 3/2 spacing): first step may differ
        ("fp16", -0.375, 5.0),  # negative addend, positive start
        ("fp16", H("0x1p-24"), 0.0),  # smallest subnormal addend
        ("fp8_e4m3", 448.0, 0.0),  # 448, then 896 overflows: NaN (fn, non-saturating) -> 2
        ("fp8_e5m2", 57344.0, 0.0),  # 57344, then inf -> 2
        ("fp8_e4m3", 0.875, -3.0),
    ]
    for case in cases:
        assert th.stagnation_count(*case) == simulate_stagnation(*case), case
    assert th.stagnation_count("bf16", 1.0, -256.0) == 512
    assert th.stagnation_count("fp8_e4m3", 448.0) == 2


def test_stagnation_saturating_overflow_matches_torch_cast() -> None:
    # torch's float8_e4m3fn cast saturates: 448 + 448 -> 448, so only the first addition counts.
    assert th.stagnation_count("fp8_e4m3", 448.0, saturate=True) == 1
    s, count = torch.zeros((), dtype=torch.float8_e4m3fn), 0
    while True:
        nxt = (s.double() + 448.0).to(torch.float8_e4m3fn)
        if nxt.double() == s.double():
            break
        s, count = nxt, count + 1
    assert count == 1


@st.composite
def addend_and_start(draw: st.DrawFn) -> tuple[str, float, float]:
    """A format with an oracle, a finite nonzero addend from its bit patterns, and a start of up to 2**(t+2) addends."""
    name = draw(st.sampled_from(sorted(ORACLE)))
    nbits = 8 * np.dtype(ORACLE[name][1]).itemsize
    addend = from_bits(draw(st.integers(0, 2**nbits - 1)), name)
    assume(math.isfinite(addend) and addend != 0.0)
    limit = 2.0 ** (get_format(name).precision + 2)
    ratio = draw(st.floats(-limit, limit))
    start = rn(addend * ratio, name)
    assume(math.isfinite(start))
    return name, addend, start


@given(addend_and_start())
@example(("bf16", 1.0, 0.0))
@example(("fp16", H("0x1p-24"), -H("0x1p-20")))
@example(("fp8_e5m2", 0.75, 7.0))
def test_stagnation_count_matches_simulation(case: tuple[str, float, float]) -> None:
    name, addend, start = case
    assert th.stagnation_count(name, addend, start) == simulate_stagnation(name, addend, start)


@given(
    st.sampled_from(["bf16", "fp16", "fp32", "fp64", "tf32", "fp8_e4m3", "e5m7"]),
    st.floats(-1.0, 1.0),
    st.floats(-1.0, 1.0),
    st.integers(0, 60),
)
def test_stagnation_count_is_odd_symmetric(name: str, f_addend: float, f_start: float, shift: int) -> None:
    # Any addend and start in range, including starts far below zero: the count is analytic, so
    # even counts near 2**60 cost a few steps per binade.
    fmt = get_format(name)
    addend, start = math.ldexp(f_addend * fmt.max, -shift), f_start * fmt.max
    assert th.stagnation_count(fmt, addend, start) == th.stagnation_count(fmt, -addend, -start)


def test_stagnation_rounds_its_inputs_and_rejects_bad_ones() -> None:
    assert th.stagnation_count("bf16", 0.0) == 0
    assert th.stagnation_count("bf16", 0.1) == th.stagnation_count("bf16", rn(0.1, "bf16"))
    assert th.stagnation_count("bf16", H("0x1p-140")) == 0  # rounds to zero in bf16
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="addend"):
            th.stagnation_count("bf16", bad)
    with pytest.raises(ValueError, match=r"start=1000000\.0 overflows fp16"):
        th.stagnation_count("fp16", 1.0, 1e6)
    with pytest.raises(ValueError, match="unknown format"):
        th.stagnation_count("fp12", 1.0)


# --- loss onset -----------------------------------------------------------------------------------
def test_loss_onset_absorption_against_oracle() -> None:
    onset = th.loss_onset("bf16", 1.0, 1.0)
    assert onset.absorption == 256  # 1/256 = ulp(1)/2: the tie goes back to the even 1.0
    assert rn(1.0 + 1.0 / 256, "bf16") == 1.0
    assert rn(1.0 + 1.0 / 255, "bf16") > 1.0
    assert th.loss_onset("fp16", 1.0, 1.0).absorption == 2048
    assert th.loss_onset("bf16", 1.0, 3.0).absorption == 128  # ulp(3) = 2**-6
    assert th.loss_onset("bf16", 1.0, 256.0).absorption == 1  # 256 + 1 is already a tie to 256
    assert th.loss_onset("bf16", 3.0, 1.0).absorption == 768


def test_loss_onset_underflow_against_oracle() -> None:
    onset = th.loss_onset("fp16", 1.0, 0.0)
    assert onset.underflow == 2**25  # 2**-25 = smallest_subnormal / 2 ties to zero
    assert float(np.float16(2.0**-25)) == 0.0
    assert float(np.float16(1.0 / (2**25 - 1))) > 0.0  # numpy rounds float64 -> float16 directly
    assert th.loss_onset("bf16", 1.0, 1.0).underflow == 2**134
    assert th.loss_onset("fp16_ftz", 1.0, 1.0).underflow == 2**14 + 1  # 2**-14 is the smallest normal


def test_loss_onset_picks_the_earlier_mechanism() -> None:
    big_sum = th.loss_onset("fp16", 1.0, 1024.0)
    assert big_sum.onset == big_sum.absorption == 2
    assert big_sum.cause == "absorption"
    tiny = th.loss_onset("fp16", H("0x1p-20"), 0.0)  # sum 0: absorption and underflow coincide
    assert tiny.absorption == tiny.underflow == tiny.onset == 32
    ftz = th.loss_onset("fp16_ftz", 1.0, 0.0)
    assert ftz.cause == "underflow"
    assert ftz.onset == 2**14 + 1


@pytest.mark.parametrize(
    ("g", "s"), [(0.0, 1.0), (-1.0, 1.0), (math.nan, 1.0), (1.0, -1.0), (1.0, math.inf), (1.0, 7e4)]
)
def test_loss_onset_rejects_bad_values(g: float, s: float) -> None:
    with pytest.raises(ValueError, match="magnitude"):
        th.loss_onset("fp16", g, s)


# --- gamma and the deterministic bounds ---------------------------------------------------------
def test_gamma_exact_values_and_edges() -> None:
    u = H("0x1p-8")
    assert th.gamma(0, u) == 0.0
    assert th.gamma(1, u) == 1.0 / 255.0  # both sides: the single rounding of the exact 1/255
    assert th.gamma(255, u) == 255.0  # n u = 255/256: exactly 255
    assert th.gamma(256, u) == math.inf  # n u = 1: Lemma 3.1 does not apply, bound void
    assert th.gamma(10**6, u) == math.inf


@pytest.mark.parametrize(
    ("n", "u", "match"),
    [(-1, 0.5, "-1"), (1.5, 0.5, "1.5"), (True, 0.5, "True"), (1, 0.0, "0.0"), (1, 1.0, "1.0"), (1, math.nan, "nan")],
)
def test_gamma_rejects_bad_arguments(n: object, u: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        th.gamma(n, u)  # type: ignore[arg-type]


def test_sum_bounds_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        th.recursive_sum_bound(0, 0.1, 1.0)
    with pytest.raises(ValueError, match="abs_sum"):
        th.pairwise_sum_bound(4, 0.1, -1.0)
    with pytest.raises(ValueError, match="lam"):
        th.probabilistic_sum_bound(4, 0.1, 1.0, 0.0)
    with pytest.raises(ValueError, match="2u < 1"):
        th.stochastic_rounding_sum_bound(4, 0.5, 1.0, 1.0)
    for fn in (
        th.recursive_sum_bound,
        th.pairwise_sum_bound,
        th.kahan_sum_bound,
        th.kahan_leading_bound,
        th.neumaier_sum_bound,
    ):
        with pytest.raises(ValueError, match="u must be"):
            fn(4, 2.0, 1.0)
    with pytest.raises(ValueError, match="abs_total"):
        th.neumaier_sum_bound(4, 0.1, 1.0, -1.0)
    with pytest.raises(ValueError, match=r"abs_total = \|sum x_i\| = 2.0 exceeds abs_sum = sum \|x_i\| = 1.0"):
        th.neumaier_sum_bound(4, 0.1, 1.0, 2.0)


def test_bound_values() -> None:
    u = H("0x1p-11")
    assert th.recursive_sum_bound(1, u, 5.0) == 0.0  # one summand: nothing rounded
    assert th.recursive_sum_bound(3, u, 4.0) == 4.0 * th.gamma(2, u)
    assert th.pairwise_sum_bound(1024, u, 1.0) == th.gamma(10, u)
    assert th.pairwise_sum_bound(1025, u, 1.0) == th.gamma(11, u)
    assert th.kahan_leading_bound(1000, u, 3.0) == 6.0 * u
    assert th.recursive_sum_bound(10**6, u, 0.0) == 0.0  # void bound, zero sum: still exactly 0
    assert th.recursive_sum_bound(10**6, u, 1.0) == math.inf
    for fn in (th.kahan_sum_bound, th.kahan_leading_bound, th.pairwise_sum_bound, th.neumaier_sum_bound):
        assert fn(1, u, 1.0) == 0.0


def test_neumaier_bound_values() -> None:
    u = H("0x1p-11")
    # n = 2: c = r_2 exactly, s + c = S; only the read-out rounds (gamma_0 = 0)
    assert th.neumaier_sum_bound(2, u, 5.0, 3.0) == 3.0 * u
    assert th.neumaier_sum_bound(2, u, 5.0) == 5.0 * u  # abs_total defaults to abs_sum
    # n = 3, by hand: u |S| + (1 + u) gamma_1 gamma_2 T
    assert th.neumaier_sum_bound(3, u, 4.0, 1.0) == u * 1.0 + (1 + u) * (th.gamma(1, u) * th.gamma(2, u)) * 4.0
    # never void: past gamma's validity both factors are capped at 1, u |S| + (1 + u) T
    assert th.neumaier_sum_bound(10**6, u, 4.0, 1.0) == u + (1 + u) * 4.0
    assert th.neumaier_sum_bound(10**6, u, 0.0, 0.0) == 0.0
    # the second-order term is ~ n**2 u**2: doubling n about quadruples it while n u << 1
    ratio = th.neumaier_sum_bound(2000, H("0x1p-24"), 1.0, 0.0) / th.neumaier_sum_bound(1000, H("0x1p-24"), 1.0, 0.0)
    assert 3.99 < ratio < 4.01  # (1999 * 1998) / (999 * 998) = 4.006, times (1 - ~1e-4) from the gammas' denominators


def test_kahan_bound_leading_term_and_validity_limit() -> None:
    for u in (H("0x1p-24"), H("0x1p-53")):
        # The bound is 3u + O(n u**2): its ratio to u at n = 2 is 3 up to terms of order u.
        assert th.kahan_sum_bound(2, u, 1.0) / u == pytest.approx(3.0, rel=1e-5)  # O(u) <= 2**-24 * 10
    u = H("0x1p-8")  # bf16: valid while n u**2 (c1 + c2) < 1, about n < 2**16 / 4
    assert math.isfinite(th.kahan_sum_bound(16_000, u, 1.0))
    assert th.kahan_sum_bound(17_000, u, 1.0) == math.inf
    # bf16, n = 1000: the second-order term dominates (about 29 u in all).
    assert 25 * u < th.kahan_sum_bound(1000, u, 1.0) < 32 * u


@given(
    st.integers(1, 10**6),
    st.integers(1, 10**6),
    st.sampled_from([H("0x1p-4"), H("0x1p-8"), H("0x1p-11"), H("0x1p-24")]),
)
def test_bounds_are_monotone_in_n(n1: int, n2: int, u: float) -> None:
    lo, hi = sorted((n1, n2))
    lam = 3.0
    assert th.gamma(lo, u) <= th.gamma(hi, u)
    assert th.recursive_sum_bound(lo, u, 1.0) <= th.recursive_sum_bound(hi, u, 1.0)
    assert th.pairwise_sum_bound(lo, u, 1.0) <= th.pairwise_sum_bound(hi, u, 1.0)
    assert th.kahan_sum_bound(lo, u, 1.0) <= th.kahan_sum_bound(hi, u, 1.0)
    assert th.neumaier_sum_bound(lo, u, 1.0, 0.5) <= th.neumaier_sum_bound(hi, u, 1.0, 0.5)
    assert th.probabilistic_sum_bound(lo, u, 1.0, lam) <= th.probabilistic_sum_bound(hi, u, 1.0, lam)
    assert th.stochastic_rounding_sum_bound(lo, u, 1.0, lam) <= th.stochastic_rounding_sum_bound(hi, u, 1.0, lam)
    assert th.probabilistic_bound_probability(lo, u, lam) >= th.probabilistic_bound_probability(hi, u, lam)


@given(st.integers(1, 10**5), st.sampled_from([H("0x1p-8"), H("0x1p-11"), H("0x1p-24"), H("0x1p-53")]))
def test_bound_ordering(n: int, u: float) -> None:
    recursive = th.recursive_sum_bound(n, u, 1.0)
    assert th.pairwise_sum_bound(n, u, 1.0) <= recursive  # ceil(log2 n) <= n - 1
    if n >= 4:
        assert th.pairwise_sum_bound(n, u, 1.0) < recursive  # strictly fewer levels from n = 4 on
    assert th.kahan_leading_bound(n, u, 1.0) <= th.kahan_sum_bound(n, u, 1.0)
    if n >= 5 and n * u < 0.1:
        assert th.kahan_sum_bound(n, u, 1.0) < recursive  # 3u + O(n u**2) < (n - 1) u / (1 - (n - 1) u)
    lam = 3.0
    if n - 1 >= 4 * lam**2 and n * u < 0.1:
        assert th.probabilistic_sum_bound(n, u, 1.0, lam) < recursive  # lam sqrt(n) u << n u
    assert th.stochastic_rounding_sum_bound(n, u, 1.0, lam) >= th.probabilistic_sum_bound(n, u, 1.0, lam)  # 2u > u


def test_gamma_tilde_first_order_and_probability_values() -> None:
    u, lam, n = H("0x1p-24"), 2.5, 10**4
    # gamma~_n = expm1(x + n u**2/(1-u)), x = lam sqrt(n) u = 1.5e-5: its relative excess over x is
    # x/2 + sqrt(n) u / lam = 7.5e-6 + 2.4e-6 ~ 1.0e-5, hence rel=2e-5.
    assert th.gamma_tilde(n, u, lam) == pytest.approx(lam * math.sqrt(n) * u, rel=2e-5)
    assert th.gamma_tilde(0, u, lam) == 0.0
    # SR doubles u: 2 lam sqrt(n) u to first order; excess x/2 + 2 sqrt(n) u / lam ~ 2.0e-5 (x = 3e-5).
    assert th.stochastic_rounding_sum_bound(n + 1, u, 1.0, lam) == pytest.approx(2 * lam * math.sqrt(n) * u, rel=4e-5)
    # Q(lam, n) = 1 - 2 n exp(-lam**2 (1-u)**2 / 2) by hand; rel 1e-12 covers exp/multiply rounding.
    assert th.probabilistic_bound_probability(100, H("0x1p-11"), 5.0) == pytest.approx(
        1 - 200 * math.exp(-12.5 * (1 - 2.0**-11) ** 2), rel=1e-12
    )
    assert th.stochastic_rounding_bound_probability(100, H("0x1p-11"), 5.0) == pytest.approx(
        1 - 200 * math.exp(-12.5 * (1 - 2.0**-10) ** 2), rel=1e-12
    )


@given(
    st.integers(1, 10**6),
    st.sampled_from([H("0x1p-4"), H("0x1p-8"), H("0x1p-11"), H("0x1p-24")]),
    st.floats(0.01, 20.0),
    st.floats(0.01, 20.0),
)
def test_probabilities_lie_in_unit_interval_and_grow_with_lambda(n: int, u: float, lam1: float, lam2: float) -> None:
    lo, hi = sorted((lam1, lam2))
    for prob in (th.probabilistic_bound_probability, th.stochastic_rounding_bound_probability):
        p_lo, p_hi = prob(n, u, lo), prob(n, u, hi)
        assert 0.0 <= p_lo <= p_hi <= 1.0
        if n == 1:
            assert p_lo == 1.0  # no rounding at all
        if 0.0 < p_lo < 1.0 and lo < hi:
            assert p_lo < p_hi
    assert th.stochastic_rounding_bound_probability(n, u, lo) <= th.probabilistic_bound_probability(n, u, lo)


def test_probability_is_positive_for_large_lambda() -> None:
    for n in (2, 100, 10**6):
        lam = math.sqrt(2 * math.log(4 * n)) / (1 - 2 * H("0x1p-8"))  # 2 n exp(-lam**2 (1-2u)**2 / 2) = 1/2
        assert 0.0 < th.probabilistic_bound_probability(n, H("0x1p-8"), lam) <= 1.0
        assert th.stochastic_rounding_bound_probability(n, H("0x1p-8"), lam) == pytest.approx(0.5, rel=1e-12)


# --- bounds against simulated sums (rigorous bounds must hold for every input) ------------------
@st.composite
def summands(draw: st.DrawFn) -> tuple[str, list[float]]:
    """Up to 40 numbers of a format, magnitudes spread over many binades, sums far from overflow."""
    name = draw(st.sampled_from(["bf16", "fp16", "fp8_e4m3", "fp8_e5m2"]))
    low, high = (-4, 2) if name == "fp8_e4m3" else (-6, 6)  # e4m3: 40 * 2**3 = 320 < max 448
    value = st.builds(
        lambda sign, mant, exp: sign * math.ldexp(mant, exp),
        st.sampled_from([-1.0, 1.0]),
        st.floats(1.0, 2.0, exclude_max=True),
        st.integers(low, high),
    )
    return name, [rn(v, name) for v in draw(st.lists(value, min_size=1, max_size=40))]


@given(summands())
@example(("bf16", [-129 / 4096, -3 / 64, -237 / 256, 258.0, 127 / 128]))  # Kahan error 1.98 u sum|x|
@settings(max_examples=150)
def test_rigorous_bounds_hold_for_simulated_sums(case: tuple[str, list[float]]) -> None:
    name, xs = case
    n, u = len(xs), get_format(name).unit_roundoff
    err, abs_sum = exact_error(naive_sum(xs, name), xs)
    bound = th.recursive_sum_bound(n, u, float(abs_sum))
    assert bound == math.inf or err <= Fraction(bound)  # inf: (n - 1) u >= 1, the bound is void
    err, _ = exact_error(pairwise_sum(xs, name), xs)
    bound = th.pairwise_sum_bound(n, u, float(abs_sum))
    assert bound == math.inf or err <= Fraction(bound)
    err, _ = exact_error(kahan_sum(xs, name), xs)
    bound = th.kahan_sum_bound(n, u, float(abs_sum))
    assert bound == math.inf or err <= Fraction(bound)
    total = abs(sum((Fraction(x) for x in xs), Fraction(0)))
    bound = th.neumaier_sum_bound(n, u, float(abs_sum), float(total))  # never void
    for readout in ("fp64", "format"):
        err, _ = exact_error(neumaier_sum(xs, name, readout), xs)
        # 2^-40: the float bound is a few fp64 operations on correctly rounded inputs (see test_bounds.py)
        assert err <= Fraction(bound) * (1 + Fraction(1, 2**40)), readout


def test_kahan_first_order_constant_is_nearly_attained() -> None:
    # An adversarial bf16 input (found by a hill-climbing search): the error is 1.98 u sum|x|, so
    # the literature's leading 2u cannot be lowered, while the rigorous 3u + O(n u**2) bound holds.
    xs = [-129 / 4096, -3 / 64, -237 / 256, 258.0, 127 / 128]
    err, abs_sum = exact_error(kahan_sum(xs, "bf16"), xs)
    u = get_format("bf16").unit_roundoff
    assert 1.9 * u * abs_sum < err <= Fraction(th.kahan_sum_bound(5, u, float(abs_sum)))


def test_kahan_bound_holds_where_the_recursive_bound_is_void() -> None:
    # 1000 bf16 summands: (n - 1) u ~ 3.9 >= 1 voids gamma_{n-1}; the Kahan bound still applies.
    rng = np.random.default_rng(12345)
    xs = [rn(v, "bf16") for v in rng.uniform(0.5, 1.0, 1000)]
    u = get_format("bf16").unit_roundoff
    err, abs_sum = exact_error(kahan_sum(xs, "bf16"), xs)
    assert th.recursive_sum_bound(1000, u, float(abs_sum)) == math.inf
    assert err <= Fraction(th.kahan_sum_bound(1000, u, float(abs_sum)))
    naive_err, _ = exact_error(naive_sum(xs, "bf16"), xs)
    assert err < naive_err  # and compensation helps: bf16 naive summation stagnates here


def test_neumaier_exact_where_kahan_loses_the_small_operand() -> None:
    """[1, 1e100, 1, -1e100] (fp64): Neumaier gives the exact 2; Kahan gives 0 (|t| > |s|: RN(t - s) is inexact).

    [0.75, 2^53, -2^53]: Kahan's read-out is 1 (c = RN(RN(2^53 - 0.75) - 2^53) = -1 catches a wrong
    low part), an error of 0.25 that exceeds Neumaier's whole bound u |S| + (1 + u) gamma_1 gamma_2 T
    ~ 2^-51 -- where Neumaier's error is 0.
    """
    assert kahan_readout_fp64([1.0, 1e100, 1.0, -1e100]) == 0.0
    assert neumaier_sum_fp64([1.0, 1e100, 1.0, -1e100]) == 2.0
    xs = [0.75, 2.0**53, -(2.0**53)]
    u = get_format("fp64").unit_roundoff
    kahan_err, abs_sum = exact_error(kahan_readout_fp64(xs), xs)
    assert kahan_err == Fraction(1, 4)
    assert exact_error(neumaier_sum_fp64(xs), xs)[0] == 0
    assert kahan_err > Fraction(th.neumaier_sum_bound(3, u, float(abs_sum), 0.75))
    for name in ("bf16", "fp16"):  # the same with 2^p: Kahan 1, Neumaier 0.75, bound ~ 4u + 0.75 u
        p = get_format(name).precision
        xs = [0.75, 2.0**p, -(2.0**p)]
        assert exact_error(neumaier_sum(xs, name), xs)[0] == 0
        err, abs_sum = exact_error(kahan_sum(xs, name), xs)  # Kahan's s; its read-out s + e is the same here
        assert err == Fraction(1, 4)
        assert err > Fraction(th.neumaier_sum_bound(3, get_format(name).unit_roundoff, float(abs_sum), 0.75))


def test_neumaier_second_order_term_is_n_squared_u_squared() -> None:
    """bf16, 1 then n - 1 addends 3 * 2^-10 (3u/4): every addend is lost to s = 1 and summed in c.

    c sums them exactly up to 1/4, then each add rounds (1.5 ulps of c to 2) by u/4: the error grows
    like n**2 u**2 (about 0.1 n**2 u**2 T), so an ``O(n u**2) T`` remainder would need a constant over
    20 at n = 256 -- while the rigorous bound (~ T there) holds.  Numbers exact (Fractions).
    """
    u = get_format("bf16").unit_roundoff
    errors = {}
    for n in (128, 256):
        xs = [1.0] + [3 * 2.0**-10] * (n - 1)
        err, abs_sum = exact_error(neumaier_sum(xs, "bf16"), xs)
        assert err <= Fraction(th.neumaier_sum_bound(n, u, float(abs_sum), float(abs_sum)))
        errors[n] = err / abs_sum
    assert Fraction(27, 1000) < errors[128] < Fraction(29, 1000)  # 0.0278 T
    assert Fraction(92, 1000) < errors[256] < Fraction(94, 1000)  # 0.0933 T
    assert errors[256] > 2 * u + 20 * 256 * u**2  # 2u|S| + 20 n u^2 T is exceeded (S = T here)
    xs = [1.0] + [3 * 2.0**-10] * 255
    kahan_err, abs_sum = exact_error(kahan_sum(xs, "bf16"), xs)  # Kahan feeds its compensation back into s
    assert kahan_err <= Fraction(3, 1024) < errors[256] * abs_sum / 50  # within one addend: 3 * 2^-10
