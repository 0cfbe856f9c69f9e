"""Measured accumulation errors against the bounds of :mod:`precision_lab.theory`.

Every addend is generated *in* the buffer format (so input rounding plays no part) and the exact sum
is an integer count of the format's smallest quantum 2^(emin - p + 1), so the measured error
``|value() - sum|`` is an exact ``Fraction``.  The bounds are floats evaluated by theory.py in fp64
from a handful of operations on ``n``, ``u`` and ``sum|x|`` (itself passed correctly rounded); each
of those roundings is relative 2^-53, so the float bound is within a relative 2^-45 of the exact
formula and the comparisons allow a factor ``1 + 2^-40`` (``_MARGIN``), nothing more.

Which bound, and why it is rigorous for the generated (n, u):

* naive = recursive summation: ``recursive_sum_bound`` = gamma_{n-1} sum|x| (Higham (4.4)); needs RN
  with relative error <= u per addition (correctly rounded + and -, gradual underflow: all formats
  here have subnormals), no overflow (the generated magnitudes keep every partial sum below max/4)
  and (n-1)u < 1, so n <= 2^p is generated.
* pairwise: ``pairwise_sum_bound`` = gamma_{ceil(log2 n)} sum|x| (Higham (4.6)); the cascade's
  read-out merges the slots smallest first, which keeps every summand within ceil(log2 n) roundings
  (theory.py's docstring); needs ceil(log2 n) u < 1.
* Kahan: ``kahan_sum_bound`` (= (3u + ~6nu^2 + ...) sum|x|), derived in theory.py from the standard
  model applied to all four operations, valid to all orders while n u^2 (c1 + c2) < 1 (about
  n < 1/(4u^2): 16,000 for bf16, 55 for fp8_e4m3).  It bounds the raw sum s; value() = fl64(s - c)
  = fl64(s + e) with |s + e - sum| <= D (theory's D: V_n - sum = sum (a_i + b_i)) and the fp64
  rounding adds at most 2^-53 (T + D) <= u T + u D, so value() is within the same bound.  The
  textbook ``kahan_leading_bound`` (2u sum|x|) drops the O(n u^2) term, which in bf16 dominates once
  n >~ 1/u; it is *not* asserted as a bound (see test_kahan_leading_term_is_not_a_bound_claim).
* Neumaier: ``neumaier_sum_bound`` (= u|S| + (1 + u) min(1, gamma_{n-2}) min(1, gamma_{n-1}) sum|x|),
  derived in theory.py (Fast2Sum makes each correction exact; the compensation is a recursive sum of
  the rounding errors; the read-out adds u|S + e|, here in fp64 with 2^-53 <= u).  Never void, so n
  runs to the tests' caps; the exact |S| is passed as ``abs_total``.  It bounds value() = fl64(s + c)
  only: s alone is a naive sum.
* probabilistic bounds: Higham-Mary (RN, a model of random errors: checked with random data and a
  negative control where the model fails) and Connolly-Higham-Mary (SR, a theorem given ideal random
  bits): the fraction of trials within the bound is tested against the stated probability with a
  one-sided exact binomial test at alpha = 1e-6 (the false-positive rate).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats

import precision_lab as pl
from precision_lab import theory

_MARGIN = 1 + Fraction(1, 2**40)  # the float bound's own evaluation error (module docstring)
ALPHA = 1e-6  # false-positive rate of every statistical test in this file

# precision p (implicit bit counted), emin, emax: written down here, independent of formats.py
LAYOUT = {
    "bf16": (8, -126, 127),
    "fp16": (11, -14, 15),
    "fp8_e4m3": (4, -6, 8),
    "fp8_e5m2": (3, -14, 15),
    "tf32": (11, -126, 127),
    "e5m7": (8, -14, 15),
    "fp32": (24, -126, 127),
}
FORMATS = tuple(LAYOUT)


def unit_roundoff(fmt: str) -> float:
    """Unit roundoff u = 2^-p."""
    return 2.0 ** -LAYOUT[fmt][0]


# --------------------------------------------------------------------------------------------------
# streams generated in the format, exact sums
# --------------------------------------------------------------------------------------------------


def format_values(
    rng: np.random.Generator, fmt: str, shape: tuple[int, int], exponents: np.ndarray, signs: np.ndarray
) -> np.ndarray:
    """Numbers of ``fmt``: a random p-bit significand at each exponent (subnormal below emin), exactly."""
    p, emin, emax = LAYOUT[fmt]
    e = np.clip(exponents, emin - p + 1, emax)
    m = rng.integers(1 << (p - 1), 1 << p, size=shape)  # normal significands, p bits
    m = m >> np.maximum(emin - e, 0)  # below 2^emin the quantum stays 2^(emin-p+1): drop low bits
    x = np.ldexp(m.astype(np.float64), np.maximum(e, emin) - p + 1)  # exact: < 2^53, in fp64's range
    top = 448.0 if fmt == "fp8_e4m3" else math.ldexp(2 - 2.0 ** (1 - p), emax)  # e4m3: 480 is the NaN pattern
    return signs * np.minimum(x, top)


def regime_stream(
    fmt: str,
    n: int,
    width: int,
    seed: int,
    *,
    center: int = 0,
    spread: int = 0,
    kind: str = "adversarial",
    e_top: int | None = None,
) -> np.ndarray:
    """An (n, width) array of format numbers for one regime, exponents capped at ``e_top``.

    kinds: "positive"/"mixed" (exponents center +- spread), "big-first" (the first addend 2^(p+2)
    times larger: absorption), "constant" (one value per column: stagnation), "adversarial" (1 then
    addends just below half an ulp of 1: every rounding error has the same sign).
    """
    p, emin, emax = LAYOUT[fmt]
    rng = np.random.default_rng(seed)
    if kind == "adversarial":
        x = np.full((n, width), math.ldexp(1 - 2.0**-p, -p))  # 2^-p - 2^-2p: the largest number below u
        x[0] = 1.0
        return x
    exps = center + rng.integers(-spread, spread + 1, size=(n, width))
    signs = np.ones((n, width)) if kind in ("positive", "constant") else rng.choice([-1.0, 1.0], size=(n, width))
    if kind == "big-first":
        exps[0] += p + 2
    x = format_values(rng, fmt, (n, width), np.minimum(exps, emax if e_top is None else e_top), signs)
    if kind == "constant":
        x = np.broadcast_to(x[0], (n, width)).copy()
    return x


def exact_sums(x: np.ndarray, fmt: str) -> list[Fraction]:
    """Exact column sums: every number of fmt is an integer multiple of 2^(emin-p+1)."""
    p, emin, _ = LAYOUT[fmt]
    q = emin - p + 1
    units = np.ldexp(x, -q)  # exact: integers below 2^(emax - q + 1) <= 2^277, of at most p bits
    return [Fraction(sum(int(v) for v in col)) * Fraction(2) ** q for col in units.T]


def abs_sums(x: np.ndarray, fmt: str) -> list[Fraction]:
    """Exact column sums of |x|."""
    return exact_sums(np.abs(x), fmt)


def run(strategy: str, fmt: str, x: np.ndarray, *, seed: int = 0) -> pl.Accumulator:
    """Accumulate the rows of x (format numbers, passed as fp64 tensors: input rounding is exact)."""
    acc = pl.Accumulator(strategy, fmt, (x.shape[1],), generator=torch.Generator().manual_seed(seed))
    for row in torch.from_numpy(x):
        acc.add(row)
    return acc


def errors(values: torch.Tensor, exact: list[Fraction]) -> list[Fraction]:
    """|value - exact| per column, exactly."""
    return [abs(Fraction(v) - e) for v, e in zip(values.tolist(), exact, strict=True)]


def top_exponent(fmt: str, n: int) -> int:
    """Largest addend exponent that keeps every partial sum below max/4 (no overflow).

    n addends below 2^(E+1) give sum|x| < 2^(emax - 3); the computed partial sums satisfy
    |s_k| <= (1 + gamma_{k-1}) sum|x| <= e sum|x| < 2^(emax - 1) while (k-1) u <= 1 (and far less
    for Kahan and pairwise); every format's max is >= 2^emax.
    """
    _, _, emax = LAYOUT[fmt]
    return emax - 4 - math.ceil(math.log2(n))


# --------------------------------------------------------------------------------------------------
# deterministic bounds: every generated stream, every column
# --------------------------------------------------------------------------------------------------
BOUNDS = {
    "naive": theory.recursive_sum_bound,
    "pairwise": theory.pairwise_sum_bound,
    "kahan": theory.kahan_sum_bound,
    "neumaier": theory.neumaier_sum_bound,  # with abs_total = |S| in check_stream
}


def max_valid_n(strategy: str, fmt: str) -> int:
    """Largest n (capped at 2^20) for which the strategy's bound is finite (its validity condition)."""
    u = unit_roundoff(fmt)
    lo, hi = 1, 1 << 20
    if math.isfinite(BOUNDS[strategy](hi, u, 1.0)):
        return hi
    while hi - lo > 1:  # every bound here is monotone in n: bisect its validity edge
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if math.isfinite(BOUNDS[strategy](mid, u, 1.0)) else (lo, mid)
    return lo


def check_stream(strategy: str, fmt: str, x: np.ndarray) -> list[Fraction]:
    """Assert the strategy's error <= its bound on every column; returns error / bound ratios."""
    n = x.shape[0]
    u = unit_roundoff(fmt)
    acc = run(strategy, fmt, x)
    exact, absolute = exact_sums(x, fmt), abs_sums(x, fmt)
    assert acc.nonfinite == 0  # no overflow: the bounds' hypothesis
    ratios = []
    reads = [acc.value()] + ([acc.raw_sum()] if strategy == "kahan" else [])
    for values in reads:
        for err, t, e in zip(errors(values, exact), absolute, exact, strict=True):
            bound = BOUNDS[strategy](n, u, float(t), *([float(abs(e))] if strategy == "neumaier" else []))
            assert math.isfinite(bound), (n, u)
            assert err <= Fraction(bound) * _MARGIN, f"{strategy} {fmt} n={n}: error {float(err)!r} > bound {bound!r}"
            ratios.append(err / Fraction(bound) if bound else Fraction(0))
    return ratios


_KINDS = ("positive", "mixed", "big-first", "constant", "adversarial")


@pytest.mark.parametrize("strategy", list(BOUNDS))
@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=max(5, settings.default.max_examples // 10))
@given(
    n_frac=st.floats(0, 1),
    center_frac=st.floats(0, 1),
    spread=st.sampled_from([0, 1, 3, 10, 30]),
    kind=st.sampled_from(_KINDS),
    seed=st.integers(0, 2**32 - 1),
)
@example(n_frac=1.0, center_frac=0.5, spread=0, kind="adversarial", seed=0)  # the worst case, longest n
@example(n_frac=1.0, center_frac=0.5, spread=0, kind="constant", seed=0)  # stagnation
@example(n_frac=0.5, center_frac=0.0, spread=3, kind="mixed", seed=1)  # in the subnormals
def test_error_within_worst_case_bound(
    fmt: str, strategy: str, n_frac: float, center_frac: float, spread: int, kind: str, seed: int
) -> None:
    """|value() - sum| <= bound for 16 columns of one regime; n up to the bound's validity (cap 300)."""
    p, emin, _ = LAYOUT[fmt]
    n = 1 + round(n_frac * (min(300, max_valid_n(strategy, fmt)) - 1))
    top = top_exponent(fmt, n)
    center = emin - p + round(center_frac * (top - emin + p))  # from below the subnormals to the top
    x = regime_stream(fmt, n, 16, seed, center=center, spread=spread, kind=kind, e_top=top)
    check_stream(strategy, fmt, x)


@pytest.mark.slow
@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("strategy", ["kahan", "neumaier", "pairwise"])
@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp8_e4m3", "e5m7"])
def test_error_within_bound_long_streams(fmt: str, strategy: str, kind: str) -> None:
    """Streams of n well beyond 1/u (where Kahan's O(n u^2) and Neumaier's O(n^2 u^2) terms dominate), up to 4096."""
    n = min(4096, max_valid_n(strategy, fmt))
    top = top_exponent(fmt, n)
    check_stream(strategy, fmt, regime_stream(fmt, n, 32, n, center=top - 4, spread=3, kind=kind, e_top=top))


@pytest.mark.parametrize("fmt", FORMATS)
def test_kahan_bound_rigorous_beyond_one_over_u(fmt: str) -> None:
    """Kahan at n = min(1000, validity edge): for bf16 that is n u ~ 4, where the O(n u^2) term dominates."""
    n = min(1000, max_valid_n("kahan", fmt))
    u = unit_roundoff(fmt)
    if fmt == "bf16":  # the regime the bound is built for: 3u is no longer the leading term
        assert theory.kahan_sum_bound(n, u, 1.0) > 3 * theory.kahan_leading_bound(n, u, 1.0)
    top = top_exponent(fmt, n)
    for kind in ("positive", "mixed", "constant", "big-first"):
        check_stream("kahan", fmt, regime_stream(fmt, n, 16, 7, center=top - 6, spread=2, kind=kind, e_top=top))


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "tf32", "fp32"])
def test_neumaier_where_kahan_loses_the_small_operand(fmt: str) -> None:
    """Kahan loses small addends met by a larger one (|t| > |s|); Neumaier keeps them.

    Kahan's step forms RN(u - s), inexact when |t| > |s|; Neumaier's puts the larger operand first.

    Column 0 is the classic [1, B, 1, -B] (B = 2^(p+2)): Neumaier 2, exactly; Kahan 0.  Column 1 is
    [0.75, 2^p, -2^p, 0]: Kahan reads 1 (its compensation catches a wrong low part), Neumaier 0.75.
    Both within their bounds; in bf16, fp16, tf32 and fp32 Kahan's error 1/4 exceeds Neumaier's whole
    bound (about (4 + 0.75) u there), which fp8's u = 1/16, 1/8 make too coarse to do.
    """
    p = LAYOUT[fmt][0]
    x = np.array([[1.0, 0.75], [2.0 ** (p + 2), 2.0**p], [1.0, -(2.0**p)], [-(2.0 ** (p + 2)), 0.0]])
    exact = exact_sums(x, fmt)
    assert exact == [2, Fraction(3, 4)]
    for strategy in ("kahan", "neumaier"):
        check_stream(strategy, fmt, x)
    neumaier = run("neumaier", fmt, x)
    assert neumaier.value().tolist() == [2.0, 0.75]
    kahan = run("kahan", fmt, x)
    assert kahan.value().tolist() == [0.0, 1.0]
    u = unit_roundoff(fmt)
    kahan_err = errors(kahan.value(), exact)
    assert kahan_err == [2, Fraction(1, 4)]
    if p >= 8:
        t = float(abs_sums(x, fmt)[1])
        assert kahan_err[1] > Fraction(theory.neumaier_sum_bound(4, u, t, 0.75)) * _MARGIN


@pytest.mark.parametrize(("fmt", "stall"), [("bf16", 512), ("e5m7", 512), ("fp8_e4m3", 32), ("fp8_e5m2", 16)])
def test_neumaier_compensation_stagnates_where_kahan_does_not(fmt: str, stall: int) -> None:
    """The constant stream of ones: Neumaier's read-out stops at 2^(p+1), within its bound.

    s stops at 2^p, c (a naive sum of the lost ones) at 2^p too; the bound (about u S + T past
    n u = 1) still holds.  Kahan feeds its compensation back into s and sums the same ones exactly
    in bf16 and fp16.
    """
    n = 2 * stall
    x = np.ones((n, 1))
    # error n/2 against u n + (1 + u) n (both gammas past 1): the bound is attained within a factor 2.5
    assert check_stream("neumaier", fmt, x)[0] >= Fraction(2, 5)
    acc = run("neumaier", fmt, x)
    assert acc.value().item() == stall
    assert acc.lost_updates == n - stall
    if fmt in ("bf16", "e5m7"):
        assert run("kahan", fmt, x).value().item() == n


# --------------------------------------------------------------------------------------------------
# the bounds are not vacuous: the adversarial stream comes close to the worst case
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_adversarial_stream_nearly_attains_recursive_bound(fmt: str) -> None:
    """1, then n-1 addends d = u (1 - u) just below u: each rounds back to 1 (below half an ulp).

    The error is (n-1) d against gamma_{n-1} (1 + (n-1) d).  With (n-1) u = 1/4 (n = 2^(p-2) + 1)
    the ratio is 0.75 (1 - u) / (1 + 0.25 (1 - u)) >= 0.53 for u <= 1/8; with n capped at 1025
    (fp32) (n-1) u is tiny and the ratio is ~1.  So the bound is attained within a factor 2.
    """
    p = LAYOUT[fmt][0]
    n = min(1 << (p - 2), 1024) + 1
    x = regime_stream(fmt, n, 1, 0)
    ratios = check_stream("naive", fmt, x)
    assert ratios[0] >= Fraction(1, 2)
    acc = run("naive", fmt, x)
    assert acc.value().item() == 1.0  # every small addend was absorbed
    assert acc.lost_updates == n - 1
    if p >= 8:  # the cascade sums the small addends among themselves first: a tiny fraction of naive's error
        exact = exact_sums(x, fmt)
        assert errors(run("pairwise", fmt, x).value(), exact)[0] < errors(acc.value(), exact)[0] / 16


# --------------------------------------------------------------------------------------------------
# probabilistic bounds
# --------------------------------------------------------------------------------------------------


def lam_for(probability_fn: object, n: int, u: float, target: float = 0.9) -> float:
    """Smallest lambda (to 1e-6) with stated probability >= target."""
    lo, hi = 0.1, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if probability_fn(n, u, mid) >= target else (mid, hi)
    return hi


def binomial_consistent(successes: int, trials: int, probability: float) -> bool:
    """One-sided exact binomial test of H0 'P(within bound) >= probability' at level ALPHA."""
    return stats.binomtest(successes, trials, probability, alternative="less").pvalue >= ALPHA


def within_fraction(
    strategy: str, fmt: str, x: np.ndarray, bound_fn: object, lam: float, seed: int = 0
) -> tuple[int, int]:
    """(trials within the probabilistic bound, trials): one column is one trial."""
    n = x.shape[0]
    acc = run(strategy, fmt, x, seed=seed)
    assert acc.nonfinite == 0
    u = unit_roundoff(fmt)
    errs = errors(acc.value(), exact_sums(x, fmt))
    ok = sum(
        e <= Fraction(bound_fn(n, u, float(t), lam)) * _MARGIN for e, t in zip(errs, abs_sums(x, fmt), strict=True)
    )
    return ok, x.shape[1]


def _uniform(fmt: str, n: int, width: int, seed: int, *, signed: bool) -> np.ndarray:
    """Uniform [0, 1) (or [-1, 1)) data rounded to fmt: the data of Higham & Mary's experiments."""
    rng = np.random.default_rng(seed)
    v = rng.random((n, width)) * (2 if signed else 1) - (1 if signed else 0)
    return pl.round_nearest(torch.from_numpy(v), fmt).numpy()


def _adversarial_control(fmt: str, n: int, width: int) -> np.ndarray:
    return regime_stream(fmt, n, width, 0)


@pytest.mark.parametrize(
    ("fmt", "n", "signed"),
    [
        ("bf16", 64, False),
        ("bf16", 256, True),
        ("fp16", 1024, False),
        ("fp8_e4m3", 16, True),
    ],
    ids=["bf16-n64-uniform01", "bf16-n256-uniform11", "fp16-n1024-uniform01", "fp8_e4m3-n16-uniform11"],
)
def test_higham_mary_bound_holds_for_random_data(fmt: str, n: int, signed: bool) -> None:
    """RN with random data: within gamma~_{n-1}(lam) sum|x| in at least Q(lam, n) = 0.9 of the trials.

    Higham & Mary's bound is a theorem about a model (independent mean-zero errors), not about RN;
    for random data it is expected to hold.  The binomial test (one-sided, alpha = 1e-6) rejects
    only if the observed fraction is significantly below Q.  Negative control: the adversarial
    stream, whose errors all have one sign, violates the bound in every trial and fails the test.
    """
    u = unit_roundoff(fmt)
    lam = lam_for(theory.probabilistic_bound_probability, n, u)
    q = theory.probabilistic_bound_probability(n, u, lam)
    assert q >= 0.9
    ok, m = within_fraction("naive", fmt, _uniform(fmt, n, 128, n, signed=signed), theory.probabilistic_sum_bound, lam)
    assert binomial_consistent(ok, m, q), (ok, m, q)


def test_higham_mary_negative_control() -> None:
    fmt, n = "bf16", 256
    u = unit_roundoff(fmt)
    lam = lam_for(theory.probabilistic_bound_probability, n, u)
    ok, m = within_fraction("naive", fmt, _adversarial_control(fmt, n, 16), theory.probabilistic_sum_bound, lam)
    assert ok == 0  # error ~ (n-1)u/(1+(n-1)u) sum|x| ~ 0.5 sum|x|, bound ~ lam sqrt(n) u ~ 0.3 sum|x|
    assert not binomial_consistent(ok, m, theory.probabilistic_bound_probability(n, u, lam))


@pytest.mark.parametrize(
    ("fmt", "n", "data"),
    [
        ("bf16", 256, "uniform01"),
        ("fp16", 1024, "uniform11"),
        ("fp16", 2048, "adversarial"),
        ("fp8_e4m3", 16, "uniform01"),
        ("e5m7", 256, "uniform01"),
    ],
)
def test_stochastic_rounding_bound_holds(fmt: str, n: int, data: str) -> None:
    """SR: within gamma~_{n-1}(lam; 2u) sum|x| in at least Q = 0.9 of the trials (a theorem, [CHM21]).

    One-sided exact binomial test at alpha = 1e-6, 64 trials, fixed seeds.  On the adversarial data
    (fp16, n = 2048) the negative control, naive RN, is outside the bound in every trial (error
    ~ 0.5 sum|x| against a bound ~ 0.23 sum|x|) and fails the same test.
    """
    u = unit_roundoff(fmt)
    lam = lam_for(theory.stochastic_rounding_bound_probability, n, u)
    q = theory.stochastic_rounding_bound_probability(n, u, lam)
    assert q >= 0.9
    if data == "adversarial":
        x = _adversarial_control(fmt, n, 64)
    else:
        x = _uniform(fmt, n, 64, n, signed=data == "uniform11")
    ok, m = within_fraction("stochastic", fmt, x, theory.stochastic_rounding_sum_bound, lam, seed=n)
    assert binomial_consistent(ok, m, q), (ok, m, q)
    if data == "adversarial":
        ok_rn, _ = within_fraction("naive", fmt, x, theory.stochastic_rounding_sum_bound, lam)
        assert ok_rn == 0
        assert not binomial_consistent(ok_rn, m, q)


# --------------------------------------------------------------------------------------------------
# stagnation: the naive buffer stops exactly where theory.stagnation_count says
# --------------------------------------------------------------------------------------------------


def _stagnation_cases(fmt: str, width: int, seed: int, cap: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(addends, starts, counts): random nonzero addends, starts within p+3 binades, K <= cap."""
    p, emin, emax = LAYOUT[fmt]
    rng = np.random.default_rng(seed)
    adds, starts, counts = [], [], []
    while len(adds) < width:
        ea = int(rng.integers(emin - p + 1, emax - p - 2))
        a = format_values(rng, fmt, (1, 1), np.array([[ea]]), rng.choice([-1.0, 1.0], (1, 1)))[0, 0]
        if rng.random() < 0.15:  # near the top: overflow before (or instead of) stagnating
            s = format_values(rng, fmt, (1, 1), np.array([[emax]]), np.ones((1, 1)))[0, 0]
            a = abs(a) if a != 0 else 1.0
            a = max(a, 2.0 ** (emax - p + 1))
        else:
            es = ea + int(rng.integers(-3, p + 4))
            s = format_values(rng, fmt, (1, 1), np.array([[es]]), rng.choice([-1.0, 1.0], (1, 1)))[0, 0]
        if a == 0:
            continue
        k = theory.stagnation_count(fmt, float(a), float(s))
        if k <= cap:
            adds.append(a)
            starts.append(s)
            counts.append(k)
    return np.array(adds), np.array(starts), counts


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "tf32", "e5m7"])
def test_recorded_stagnation_matches_theory(fmt: str) -> None:
    """Per column: the adds that changed the buffer are exactly adds 1..K, K = stagnation_count."""
    width = 64
    adds, starts, counts = _stagnation_cases(fmt, width, seed=len(fmt) * 7919, cap=600)
    total = max(counts) + 5
    acc = pl.Accumulator("naive", fmt, (width,))
    acc.add(torch.from_numpy(starts))  # 0 + start: exact
    lost_before = acc.lost_updates
    changed = torch.zeros(width, dtype=torch.int64)
    last_change = torch.zeros(width, dtype=torch.int64)
    step = torch.from_numpy(adds)
    for i in range(1, total + 1):
        old = acc.value()
        acc.add(step)
        new = acc.value()
        moved = ~((old == new) & (torch.signbit(old) == torch.signbit(new)) | (old.isnan() & new.isnan()))
        changed += moved
        last_change = torch.where(moved, torch.full_like(last_change, i), last_change)
    assert changed.tolist() == counts
    assert last_change.tolist() == counts  # the changes are adds 1..K, none later
    finite = torch.isfinite(acc.value())
    # lost_updates counts the unchanged adds into a finite buffer: total - K per finite column
    expected_lost = sum(total - k for k, f in zip(counts, finite.tolist(), strict=True) if f)
    assert acc.lost_updates - lost_before == expected_lost
    assert not bool(finite.all())  # the overflow branch of stagnation_count was exercised


@pytest.mark.parametrize(("fmt", "stall"), [("bf16", 256), ("fp16", 2048), ("fp8_e4m3", 16), ("fp8_e5m2", 8)])
def test_stagnation_count_of_ones_is_two_to_the_precision(fmt: str, stall: int) -> None:
    assert theory.stagnation_count(fmt, 1.0) == stall
    acc = pl.Accumulator("naive", fmt, (1,))
    for _ in range(stall + 10):
        acc.add(torch.ones(1))
    assert acc.lost_updates == 10
