"""Tests of precision_lab.metrics: hand-computed examples (exact), invariances, the non-finite policy, statistics.

Hand examples use small integers and dyadic fractions, for which every float64 operation the metrics
perform is exact (or a single correctly rounded sqrt/division reproduced by the same expression
here), so they are compared with ``==``.  Statistics are checked against numpy/scipy/``statistics``
computed independently; their tolerances are justified where they appear.
"""

from __future__ import annotations

import math
import statistics

import ml_dtypes
import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given
from hypothesis import strategies as st

from precision_lab import metrics as m
from precision_lab.formats import get_format

H = float.fromhex
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
F64 = torch.float64


def t64(values: list[float], device: str = "cpu") -> torch.Tensor:
    return torch.tensor(values, dtype=F64, device=device)


# --- hand-computed examples ------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("acc_dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_compare_hand_example(device: str, acc_dtype: torch.dtype) -> None:
    acc = torch.tensor([4.0, 3.0], dtype=acc_dtype, device=device)  # exact in every dtype here
    ref = t64([3.0, 4.0], device)
    out = m.compare(acc, ref, "bf16", lost_updates=3, element_adds=12)
    assert list(out) == list(m.METRIC_NAMES)
    assert all(type(v) is float for v in out.values())
    assert out == {
        "rel_l2_error": math.sqrt(2.0) / 5.0,  # ||(1, -1)|| / 5: both sides round sqrt(2) then /5 once
        "norm_ratio": 1.0,
        "projection_bias": -1.0 / 25.0,  # <(1, -1), (3, 4)> / 25
        "cosine": 24.0 / 25.0,  # 24 / (5 * 5)
        "max_ulp_error": 64.0,  # |4 - 3| / ulp_bf16(3) = 1 / 2**-6; the other entry gives 32
        "lost_update_fraction": 0.25,
        "nonfinite": 0.0,
    }
    assert m.max_ulp_error(acc, ref, "fp16") == 512.0  # ulp_fp16(3) = 2**-9


def test_parallel_example_pythagorean() -> None:
    ref = t64([1.0, 2.0, 2.0])  # ||ref|| = 3 exactly
    acc = torch.tensor([0.5, 1.0, 1.0])  # ref / 2
    assert m.rel_l2_error(acc, ref) == 0.5
    assert m.norm_ratio(acc, ref) == 0.5
    assert m.projection_bias(acc, ref) == -0.5
    assert m.cosine(acc, ref) == 1.0


@pytest.mark.parametrize("ref", [[3.0, 4.0], [1.0, 2.0, 2.0], [2.0, 3.0, 6.0], [1.0, 4.0, 8.0], [2.0, 6.0, 9.0]])
@pytest.mark.parametrize("c", [0.5, 0.75, 0.875, 1.0, 1.25, 2.0, -0.5, -1.0])
def test_projection_bias_equals_norm_shrinkage_for_scaled_reference(ref: list[float], c: float) -> None:
    # ||ref|| is an integer for these vectors and c is dyadic, so every operation is exact:
    # acc = c ref has projection bias c - 1, norm ratio |c| (shrinkage 1 - c for 0 < c < 1).
    r = t64(ref)
    acc = c * r
    assert m.projection_bias(acc, r) == c - 1.0
    assert m.norm_ratio(acc, r) == abs(c)
    assert m.rel_l2_error(acc, r) == abs(c - 1.0)
    assert m.cosine(acc, r) == math.copysign(1.0, c)
    if c > 0:
        assert m.projection_bias(acc, r) == m.norm_ratio(acc, r) - 1.0


seeds = st.integers(0, 2**32 - 1)


@given(seeds, st.integers(-300, 300), st.integers(1, 50))
def test_relative_metrics_are_exactly_invariant_under_power_of_two_scaling(seed: int, k: int, d: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(d, generator=g, dtype=F64)
    acc = ref + 0.01 * torch.randn(d, generator=g, dtype=F64)
    c = math.ldexp(1.0, k)  # |values| * 2**+-300 stays normal in float64: the scaling is exact
    for fn in (m.rel_l2_error, m.norm_ratio, m.projection_bias, m.cosine):
        assert fn(c * acc, c * ref) == fn(acc, ref), fn.__name__


def test_metrics_survive_extreme_magnitudes() -> None:
    big = t64([1e300, -1e300])  # squares overflow float64 without the power-of-two rescaling
    assert m.rel_l2_error(big, big) == 0.0
    assert m.norm_ratio(big, big) == 1.0
    assert m.cosine(big, big) == 1.0
    tiny = t64([H("0x1p-1074"), H("0x1p-1073")])  # subnormal: squares underflow without it
    assert m.norm_ratio(tiny, tiny) == 1.0
    assert m.projection_bias(2.0 * tiny, tiny) == 1.0


# --- ulp error -----------------------------------------------------------------------------------
ULP_FORMATS = {
    "bf16": (torch.bfloat16, np.uint16, ml_dtypes.bfloat16),
    "fp16": (torch.float16, np.uint16, np.float16),
    "fp8_e4m3": (torch.float8_e4m3fn, np.uint8, ml_dtypes.float8_e4m3fn),
    "fp8_e5m2": (torch.float8_e5m2, np.uint8, ml_dtypes.float8_e5m2),
}


@pytest.mark.parametrize("name", sorted(ULP_FORMATS))
def test_ulp_error_of_the_next_number_up_is_one_for_every_number(name: str) -> None:
    # Exhaustive over the non-negative finite bit patterns (0, subnormals, normals), except the
    # largest finite number, which has no finite successor: the successor (pattern + 1) of a
    # non-negative number is exactly one spacing above it.
    torch_dtype, utype, np_dtype = ULP_FORMATS[name]
    nbits = 8 * np.dtype(utype).itemsize
    patterns = np.arange(0, 2 ** (nbits - 1), dtype=np.int64).astype(utype)
    with np.errstate(invalid="ignore"):  # NaN patterns warn when cast; they are dropped below
        values = patterns.view(np_dtype).astype(np.float64)
        successors = (patterns + utype(1)).view(np_dtype).astype(np.float64)
    keep = np.isfinite(values) & np.isfinite(successors)
    ref = torch.from_numpy(values[keep])
    acc = torch.from_numpy(successors[keep]).to(torch_dtype)  # the successor in the native dtype
    err = m.ulp_error(acc, ref, name)
    assert err.dtype == F64
    assert bool((err == 1.0).all())
    negative = torch.from_numpy(-successors[keep]).to(torch_dtype)  # float8 has no neg kernel
    assert bool((m.ulp_error(negative, -ref, name) == 1.0).all())  # odd symmetry


@pytest.mark.parametrize("name", ["bf16", "fp16", "fp32"])
def test_ulp_error_convention_below_a_power_of_two(name: str) -> None:
    fmt = get_format(name)
    ref = t64([1.0, 2.0**10, fmt.smallest_normal])
    below = t64(
        [1.0 - fmt.unit_roundoff, 2.0**10 * (1 - fmt.unit_roundoff), fmt.smallest_normal - fmt.smallest_subnormal]
    )
    # The spacing is the one *above* |ref|: the neighbour below a normal power of two is half of it
    # away, except at 2**emin, below which the subnormal spacing is the same.
    assert m.ulp_error(below, ref, name).tolist() == [0.5, 0.5, 1.0]


def test_ulp_values() -> None:
    ulp = m.ulp(t64([0.0, 1.0, -3.0, 2.0**-130, 2.0**-126, 3e38]), "bf16")
    assert ulp.tolist() == [2.0**-133, 2.0**-7, 2.0**-6, 2.0**-133, 2.0**-133, 2.0**120]
    assert m.ulp(t64([0.0, 1.0, H("0x1p-1074"), 1e308]), "fp64").tolist() == [
        H("0x1p-1074"),
        2.0**-52,
        H("0x1p-1074"),
        2.0**971,
    ]
    assert m.ulp(t64([1e6]), "fp16").tolist() == [2.0**9]  # beyond fp16's max: extrapolated spacing


# --- non-finite, degenerate and bad inputs --------------------------------------------------------
@pytest.mark.parametrize(
    ("acc", "expected_norm_ratio"),
    [
        ([1.0, math.inf, 2.0], math.inf),
        ([1.0, -math.inf, math.inf], math.inf),
        ([math.nan, 1.0, 2.0], math.nan),
        ([math.nan, math.inf, 2.0], math.nan),
    ],
)
def test_nonfinite_policy(acc: list[float], expected_norm_ratio: float) -> None:
    a, ref = torch.tensor(acc), t64([1.0, 2.0, 3.0])
    out = m.compare(a, ref, "fp32", lost_updates=1, element_adds=3)
    assert out["nonfinite"] == float(sum(not math.isfinite(v) for v in acc))
    assert out["rel_l2_error"] == math.inf
    assert out["max_ulp_error"] == math.inf
    np.testing.assert_equal(out["norm_ratio"], expected_norm_ratio)  # nan == nan for assert_equal
    assert math.isnan(out["projection_bias"])
    assert math.isnan(out["cosine"])
    assert out["lost_update_fraction"] == 1.0 / 3.0
    np.testing.assert_equal(m.ulp_error(a, ref, "fp32").isfinite().tolist(), [math.isfinite(v) for v in acc])


def test_nonfinite_reference_is_rejected() -> None:
    with pytest.raises(ValueError, match="ref has 1 non-finite"):
        m.compare(t64([1.0, 2.0]), t64([1.0, math.nan]), "bf16")


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"acc has shape \(3,\), ref has shape \(2,\)"):
        m.compare(t64([1.0, 2.0, 3.0]), t64([1.0, 2.0]), "bf16")
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(4,\)"):
        m.rel_l2_error(torch.zeros(2, 2), torch.zeros(4))


def test_zero_reference_and_empty_inputs() -> None:
    zero = t64([0.0, 0.0])
    exact = m.compare(zero, zero, "bf16")
    assert exact == {
        **exact,
        "rel_l2_error": 0.0,
        "norm_ratio": 1.0,
        "projection_bias": 0.0,
        "cosine": 1.0,
        "max_ulp_error": 0.0,
    }
    wrong = m.compare(t64([0.0, 1.0]), zero, "bf16")
    assert wrong["rel_l2_error"] == math.inf
    assert wrong["norm_ratio"] == math.inf
    assert math.isnan(wrong["projection_bias"])
    assert wrong["cosine"] == 0.0
    assert m.cosine(zero, t64([1.0, 2.0])) == 0.0  # a fully underflowed gradient: no alignment
    empty = m.compare(torch.zeros(0), torch.zeros(0, dtype=F64), "fp16")
    assert empty["rel_l2_error"] == 0.0
    assert empty["max_ulp_error"] == 0.0
    assert empty["nonfinite"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lost_updates": 5, "element_adds": 4}, "exceeds"),
        ({"lost_updates": -1, "element_adds": 4}, "-1"),
        ({"lost_updates": 1.5, "element_adds": 4}, "1.5"),
        ({"lost_updates": 0, "element_adds": True}, "True"),
    ],
)
def test_compare_rejects_bad_counts(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        m.compare(t64([1.0]), t64([1.0]), "bf16", **kwargs)  # type: ignore[arg-type]


def test_compare_zero_element_adds_and_bad_format() -> None:
    assert m.compare(t64([1.0]), t64([1.0]), "bf16")["lost_update_fraction"] == 0.0
    with pytest.raises(ValueError, match="unknown format"):
        m.compare(t64([1.0]), t64([1.0]), "fp7")


# --- summarize -------------------------------------------------------------------------------------
def test_summarize_small_exact_example() -> None:
    s = m.summarize([1.0, 2.0, 3.0, 4.0])
    assert (s.n, s.mean) == (4, 2.5)
    assert s.std == math.sqrt(5.0 / 3.0)  # sum of squared deviations is exactly 5
    assert s.sem == s.std / 2.0
    half = scipy.stats.t.ppf(0.975, 3) * s.sem
    assert (s.ci_low, s.ci_high) == (2.5 - half, 2.5 + half)


@given(seeds, st.integers(2, 200), st.sampled_from([0.5, 0.9, 0.95, 0.999]))
def test_summarize_matches_statistics_and_scipy(seed: int, n: int, confidence: float) -> None:
    values = np.random.default_rng(seed).normal(3.0, 2.0, n)
    s = m.summarize(torch.from_numpy(values), confidence)
    # statistics uses exact rational arithmetic, numpy pairwise float64 sums: they agree to a few
    # units of 2**-53 relative times log2(n); 1e-12 leaves a wide margin.
    assert s.mean == pytest.approx(statistics.fmean(values), rel=1e-12, abs=1e-12)
    assert s.std == pytest.approx(statistics.stdev(values), rel=1e-12)
    low, high = scipy.stats.t.interval(confidence, n - 1, loc=s.mean, scale=s.sem)
    # Same quantile, same formula up to operation order: equal to a few ulps of the interval end.
    assert s.ci_low == pytest.approx(low, rel=1e-12, abs=1e-12)
    assert s.ci_high == pytest.approx(high, rel=1e-12, abs=1e-12)
    assert s.ci_low <= s.mean <= s.ci_high


def test_summarize_edge_cases() -> None:
    one = m.summarize([7.0])
    assert one.n == 1
    assert one.mean == 7.0
    assert all(math.isnan(v) for v in (one.std, one.sem, one.ci_low, one.ci_high))
    constant = m.summarize([2.0, 2.0, 2.0])
    assert (constant.std, constant.ci_low, constant.ci_high) == (0.0, 2.0, 2.0)
    # Non-finite values propagate (never dropped), without warnings (pytest turns them into errors).
    assert m.summarize([1.0, math.inf]).mean == math.inf
    assert math.isnan(m.summarize([1.0, math.inf]).std)
    assert math.isnan(m.summarize([1.0, math.nan, 3.0]).mean)
    with pytest.raises(ValueError, match="empty"):
        m.summarize([])
    for bad in (0.0, 1.0, 1.5, True):
        with pytest.raises(ValueError, match="confidence"):
            m.summarize([1.0, 2.0], bad)  # type: ignore[arg-type]


# --- bias_variance ----------------------------------------------------------------------------------
def test_bias_variance_hand_example() -> None:
    ref = t64([1.0, 1.0, 1.0, 1.0])  # ||ref||**2 = 4
    trials = t64([[1.5, 1.0, 1.0, 1.0], [0.5, 1.0, 1.0, 1.0]])
    bv = m.bias_variance(trials, ref)
    assert bv.n_trials == 2
    assert bv.nonfinite_trials == 0
    assert bv.bias.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert bv.rel_sq_bias == 0.0
    assert bv.rel_variance == 0.125  # element 0: ((0.5)**2 + (0.5)**2) / 1 = 0.5; / 4
    assert bv.rel_mse == 0.0625  # mean(0.25, 0.25) / 4 = rel_sq_bias + (T-1)/T rel_variance
    assert (bv.projection.mean, bv.projection.n) == (0.0, 2)  # projections +-0.125
    assert bv.p_value == 1.0  # t = 0


@given(seeds, st.integers(2, 30), st.integers(1, 40))
def test_bias_variance_matches_numpy(seed: int, n_trials: int, d: int) -> None:
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=d)
    ref[0] = 1.0  # never identically zero
    trials = ref * rng.uniform(0.9, 1.0) + 0.1 * rng.normal(size=(n_trials, d))
    bv = m.bias_variance(torch.from_numpy(trials), torch.from_numpy(ref))
    rr = float(ref @ ref)
    mean = trials.mean(axis=0)
    # Same quantities by hand in numpy: float64 reductions in a different order agree to ~n eps
    # relative; 1e-10 is generous and still far below any statistical effect.
    tol = {"rel": 1e-10, "abs": 1e-13}
    np.testing.assert_allclose(bv.bias.numpy(), mean - ref, rtol=1e-10, atol=1e-13)
    assert bv.rel_sq_bias == pytest.approx(float((mean - ref) @ (mean - ref)) / rr, **tol)
    assert bv.rel_variance == pytest.approx(float(trials.var(axis=0, ddof=1).sum()) / rr, **tol)
    assert bv.rel_mse == pytest.approx(float(((trials - ref) ** 2).sum(axis=1).mean()) / rr, **tol)
    assert bv.rel_mse == pytest.approx(bv.rel_sq_bias + (n_trials - 1) / n_trials * bv.rel_variance, **tol)
    projections = (trials - ref) @ ref / rr
    assert bv.projection.mean == pytest.approx(projections.mean(), **tol)
    expected_p = scipy.stats.ttest_1samp(projections, 0.0).pvalue if projections.std() > 0 else 1.0
    assert bv.p_value == pytest.approx(expected_p, **tol)


def test_bias_test_detects_bias_and_not_its_absence() -> None:
    # Synthetic trials, seeded: ref plus Gaussian noise (unbiased) or 2 % shrinkage plus the same noise
    # (biased, like lost updates).  Each trial's projection bias is then exactly normal, so the
    # t-test is exact: for the unbiased set, p < 1e-3 has probability 1e-3 (the false-positive rate
    # of this assertion over seeds); the biased set has t ~ 0.02 / (0.01 / sqrt(8 * 30)) ~ 30.
    g = torch.Generator().manual_seed(2024)
    d, n_trials = 64, 30
    ref = torch.randn(d, generator=g, dtype=F64)
    noise = 0.01 * ref.norm() / math.sqrt(d) * torch.randn(n_trials, d, generator=g, dtype=F64)
    unbiased = m.bias_variance(ref + noise, ref)
    biased = m.bias_variance(0.98 * ref + noise, ref)
    assert unbiased.p_value > 1e-3
    assert unbiased.projection.ci_low < 0.0 < unbiased.projection.ci_high
    assert biased.p_value < 1e-3
    assert biased.projection.ci_high < 0.0
    assert biased.rel_sq_bias == pytest.approx(4e-4, rel=0.05)  # 0.02**2; noise adds ~1e-5/30 (5 % is ample)


def test_bias_variance_edge_cases() -> None:
    ref = t64([1.0, 2.0])
    single = m.bias_variance(t64([[1.0, 2.5]]), ref)
    assert math.isnan(single.rel_variance)
    assert math.isnan(single.p_value)
    assert single.rel_sq_bias == 0.25 / 5.0
    same = m.bias_variance(t64([[1.0, 2.5], [1.0, 2.5]]), ref)
    assert same.p_value == 0.0  # identical nonzero projection biases: the bias is certain
    broken = m.bias_variance(t64([[1.0, math.inf], [1.0, 2.0], [1.0, 2.0]]), ref)
    assert broken.nonfinite_trials == 1
    assert broken.projection.mean == math.inf
    assert math.isnan(broken.p_value)
    with pytest.raises(ValueError, match=r"trials has shape \(2, 3\), ref has shape \(2,\)"):
        m.bias_variance(torch.zeros(2, 3), ref)
    with pytest.raises(ValueError, match="zero everywhere"):
        m.bias_variance(torch.ones(3, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="finite"):
        m.bias_variance(torch.ones(3, 2), t64([1.0, math.nan]))
