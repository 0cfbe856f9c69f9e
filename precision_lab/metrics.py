"""Error of an accumulated gradient against its fp64 reference, and statistics over trials.

Every metric is computed in float64, on the device of ``acc`` (MPS, which has no float64, falls back
to the CPU); inputs may have any float dtype, including float8.  Relative metrics are computed on
copies of ``acc`` and ``ref`` scaled by one common power of two (exact, and it keeps squares away
from overflow), so they are exactly invariant under a common power-of-two scaling of both inputs.

Non-finite policy (``acc`` holds NaN or +-Inf; the DESIGN asks that they be reported, never averaged
away).  ``nonfinite`` counts the entries of ``acc`` that are NaN or +-Inf, and:

* ``rel_l2_error`` and ``max_ulp_error`` are ``inf`` (an unusable gradient is infinitely wrong;
  ``inf`` also survives a ``mean`` over trials, where pandas would silently skip a NaN);
* ``norm_ratio`` is ``inf`` when the non-finite entries are all infinities and ``nan`` when any is
  NaN (the norm of a vector holding a NaN is undefined);
* ``projection_bias`` and ``cosine`` are ``nan`` (a direction with an infinite or undefined component
  has no meaningful angle or projection);
* ``lost_update_fraction`` is unaffected.

A non-finite *reference* is a ``ValueError``: the fp64 truth must be finite.

Degenerate references: when ``ref`` is zero everywhere (or empty) the relative metrics have no
scale.  If ``acc`` is zero too, it is exact and every metric takes its ideal value
(``rel_l2_error = 0``, ``norm_ratio = 1``, ``projection_bias = 0``, ``cosine = 1``).  Otherwise
``rel_l2_error = norm_ratio = inf`` and ``projection_bias = nan`` (no direction to project on);
``cosine`` is ``0`` when exactly one of ``acc``, ``ref`` is the zero vector (no alignment: a fully
underflowed gradient scores 0, not NaN) and ``1`` when both are.

Accuracy: each metric carries float64 rounding only (relative ``~1e-16``), negligible against the
low-precision errors measured; hand-checked dyadic examples are reproduced exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats
import torch

from precision_lab._threads import intra_op_threads
from precision_lab.checks import check_int, check_probability
from precision_lab.formats import Format, get_format

__all__ = [
    "METRIC_NAMES",
    "BiasVariance",
    "Summary",
    "bias_variance",
    "compare",
    "cosine",
    "max_ulp_error",
    "norm_ratio",
    "projection_bias",
    "rel_l2_error",
    "summarize",
    "ulp",
    "ulp_error",
]

#: The keys of :func:`compare`, in order (they become CSV columns).
METRIC_NAMES: tuple[str, ...] = (
    "rel_l2_error",
    "norm_ratio",
    "projection_bias",
    "cosine",
    "max_ulp_error",
    "lost_update_fraction",
    "nonfinite",
)


# --- preparation -------------------------------------------------------------------------------
def _f64(x: torch.Tensor | np.ndarray | Sequence[float] | float, name: str) -> torch.Tensor:
    """``x`` as a float64 tensor (detached; on the CPU if it lived on MPS)."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x, dtype=np.float64))
    x = x.detach()
    if x.is_complex():
        raise ValueError(f"{name} must be real, got dtype {x.dtype}")
    if x.device.type == "mps":  # MPS has no float64
        x = x.cpu()
    return x.to(torch.float64)


def _pair(acc: torch.Tensor, ref: torch.Tensor, *, flatten: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 copies of ``acc`` and ``ref`` on ``acc``'s device (flattened), after shape and finiteness checks."""
    a = _f64(acc, "acc")
    r = _f64(ref, "ref")
    if a.shape != r.shape:
        raise ValueError(f"shape mismatch: acc has shape {tuple(a.shape)}, ref has shape {tuple(r.shape)}")
    r = r.to(a.device)
    bad = int((~torch.isfinite(r)).sum())
    if bad:
        raise ValueError(f"ref has {bad} non-finite entries; the fp64 reference must be finite")
    return (a.reshape(-1), r.reshape(-1)) if flatten else (a, r)


def _scale_together(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Divide finite tensors by one power of two so that their largest magnitude lies in [0.5, 1).

    Power-of-two scaling is exact (barring underflow of entries ``2**-1000`` below the largest, whose
    squares are negligible anyway), so ratios of norms and inner products do not change; the scaled
    squares cannot overflow.
    """
    peak = max((float(x.abs().max()) for x in xs if x.numel()), default=0.0)
    if peak == 0.0:
        return xs
    f1, f2 = _inverse_power_factors(peak)
    return tuple(x * f1 * f2 for x in xs)


def _inverse_power_factors(peak: float) -> tuple[float, float]:
    """Two powers of two whose product is ``2**-e`` with ``peak = f * 2**e``, ``0.5 <= f < 1``.

    Two factors because ``2**-e`` alone overflows for subnormal ``peak`` (``e < -1023``).
    """
    exponent = math.frexp(peak)[1]
    half = -exponent // 2
    return math.ldexp(1.0, half), math.ldexp(1.0, -exponent - half)


def _dot(x: torch.Tensor, y: torch.Tensor) -> float:
    # one thread: a multi-threaded reduction sums in another order, so the last bit of every metric
    # would depend on the machine's core count (and results.csv with it)
    with intra_op_threads(1):
        return float(torch.dot(x, y))


def _norm(x: torch.Tensor) -> float:
    return math.sqrt(_dot(x, x))


def _nonfinite(a: torch.Tensor) -> tuple[int, bool]:
    """(number of non-finite entries, whether any is NaN)."""
    bad = ~torch.isfinite(a)
    count = int(bad.sum())
    return count, bool(torch.isnan(a).any()) if count else False


# --- kernels on prepared (flat, float64, finite-reference) tensors ----------------------------
def _rel_l2(a: torch.Tensor, r: torch.Tensor) -> float:
    if _nonfinite(a)[0]:
        return math.inf
    a, r = _scale_together(a, r)
    num, den = _norm(a - r), _norm(r)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _norm_ratio(a: torch.Tensor, r: torch.Tensor) -> float:
    count, has_nan = _nonfinite(a)
    if count:
        return math.nan if has_nan else math.inf
    a, r = _scale_together(a, r)
    num, den = _norm(a), _norm(r)
    if den == 0.0:
        return 1.0 if num == 0.0 else math.inf
    return num / den


def _projection_bias(a: torch.Tensor, r: torch.Tensor) -> float:
    if _nonfinite(a)[0]:
        return math.nan
    a, r = _scale_together(a, r)
    rr = _dot(r, r)
    if rr == 0.0:
        return 0.0 if not bool((a != 0).any()) else math.nan
    return _dot(a - r, r) / rr  # the difference form is accurate when acc ~ ref


def _cosine(a: torch.Tensor, r: torch.Tensor) -> float:
    if _nonfinite(a)[0]:
        return math.nan
    a, r = _scale_together(a, r)
    na, nr = _norm(a), _norm(r)
    if na == 0.0 or nr == 0.0:
        return 1.0 if na == nr else 0.0
    return min(1.0, max(-1.0, _dot(a, r) / (na * nr)))  # rounding may step just outside [-1, 1]


def _ulp(r: torch.Tensor, fmt: Format) -> torch.Tensor:
    exponent = torch.frexp(r.abs()).exponent.to(torch.int64) - 1  # floor(log2 |r|) for r != 0
    exponent = torch.where(r == 0, fmt.emin, exponent).clamp_min(fmt.emin)  # subnormal range: fixed spacing
    return _exact_power_of_two(exponent - fmt.mantissa_bits)


def _exact_power_of_two(e: torch.Tensor) -> torch.Tensor:
    """``2.0**e`` as float64, built from its bit pattern (exact; pow/ldexp kernels need not be).

    Bit diagram of a float64 power of two::

        normal    (e >= -1022):  0 | e + 1023 (11 bits) | 0...0 (52 bits)
        subnormal (e <  -1022):  0 | 00000000000        | bit (e + 1074) set
    """
    e = e.clamp(-1074, 1023)  # the float64 range; ulps of real formats stay inside it
    normal = (e + 1023) << 52
    subnormal = torch.ones_like(e) << (e + 1074).clamp_min(0)
    return torch.where(e >= -1022, normal, subnormal).view(torch.float64)


def _ulp_error(a: torch.Tensor, r: torch.Tensor, fmt: Format) -> torch.Tensor:
    return (a - r).abs() / _ulp(r, fmt)


def _max_ulp(a: torch.Tensor, r: torch.Tensor, fmt: Format) -> float:
    if _nonfinite(a)[0]:
        return math.inf
    if a.numel() == 0:
        return 0.0
    return float(_ulp_error(a, r, fmt).max())


# --- public metrics ------------------------------------------------------------------------------
def rel_l2_error(acc: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error ``||acc - ref|| / ||ref||``.

    Non-finite ``acc`` gives ``inf``; a zero ``ref`` gives 0 if ``acc`` is zero too, else ``inf``
    (see the module docstring).

    Raises:
        ValueError: Shapes differ (both are named) or ``ref`` is not finite.
    """
    return _rel_l2(*_pair(acc, ref))


def norm_ratio(acc: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm ratio ``||acc|| / ||ref||``: below 1 the accumulated gradient has shrunk (lost updates).

    Non-finite ``acc`` gives ``inf`` (infinities only) or ``nan`` (any NaN); a zero ``ref`` gives 1
    if ``acc`` is zero too, else ``inf``.

    Raises:
        ValueError: Shapes differ or ``ref`` is not finite.
    """
    return _norm_ratio(*_pair(acc, ref))


def projection_bias(acc: torch.Tensor, ref: torch.Tensor) -> float:
    """Projection bias ``<acc - ref, ref> / ||ref||**2``: the signed error along the true gradient.

    For ``acc = c * ref`` it is ``c - 1`` (equal to ``norm_ratio - 1`` for ``c > 0``); a systematic
    negative value is the signature of stagnation (updates lost in one direction).  Non-finite
    ``acc`` gives ``nan``; a zero ``ref`` gives 0 if ``acc`` is zero too, else ``nan``.

    Raises:
        ValueError: Shapes differ or ``ref`` is not finite.
    """
    return _projection_bias(*_pair(acc, ref))


def cosine(acc: torch.Tensor, ref: torch.Tensor) -> float:
    """Cosine similarity ``<acc, ref> / (||acc|| ||ref||)``, clipped to ``[-1, 1]``.

    Non-finite ``acc`` gives ``nan``; exactly one zero vector gives 0, two give 1.

    Raises:
        ValueError: Shapes differ or ``ref`` is not finite.
    """
    return _cosine(*_pair(acc, ref))


def ulp(ref: torch.Tensor, fmt: str | Format) -> torch.Tensor:
    """Spacing of ``fmt``'s numbers at the magnitude of each entry of ``ref`` (float64 tensor).

    ``2**(max(floor(log2 |x|), emin) - mantissa_bits)``: the gap *above* ``|x|`` in its binade (so
    at a power of two it is the larger of the two neighbouring gaps), the fixed subnormal spacing
    below ``2**emin`` (and at 0), as :meth:`Format.ulp`.  Magnitudes beyond ``fmt.max`` get the
    spacing extrapolated with an unbounded exponent.

    Raises:
        ValueError: Unknown format, or ``ref`` not finite.
    """
    fmt = get_format(fmt)
    r = _f64(ref, "ref")
    if not bool(torch.isfinite(r).all()):
        raise ValueError("ulp of a non-finite value; ref must be finite")
    return _ulp(r, fmt)


def ulp_error(acc: torch.Tensor, ref: torch.Tensor, fmt: str | Format) -> torch.Tensor:
    """Elementwise error in units of the buffer format's spacing at the reference: ``|acc - ref| / ulp_fmt(ref)``.

    Returns a float64 tensor of ``acc``'s shape.  Entries where ``acc`` is ``+-inf`` give ``inf``
    and NaN gives NaN (IEEE).  The neighbouring number of ``fmt`` above a representable ``ref`` is
    exactly 1 ulp away (the one below is 1/2 ulp away when ``ref`` is a power of two).

    Raises:
        ValueError: Shapes differ, unknown format, or ``ref`` not finite.
    """
    a, r = _pair(acc, ref, flatten=False)
    return _ulp_error(a, r, get_format(fmt))


def max_ulp_error(acc: torch.Tensor, ref: torch.Tensor, fmt: str | Format) -> float:
    """``max_i |acc_i - ref_i| / ulp_fmt(ref_i)``: ``inf`` if ``acc`` has a non-finite entry, 0 if empty.

    Raises:
        ValueError: Shapes differ, unknown format, or ``ref`` not finite.
    """
    return _max_ulp(*_pair(acc, ref), get_format(fmt))


def compare(
    acc: torch.Tensor,
    ref: torch.Tensor,
    fmt: str | Format,
    *,
    lost_updates: int = 0,
    element_adds: int = 0,
) -> dict[str, float]:
    """All metrics of one accumulated gradient against its fp64 reference.

    Args:
        acc: The accumulated gradient (any float dtype and device).
        ref: The fp64 reference (any float dtype; must be finite), same shape as ``acc``.
        fmt: The accumulation buffer's format, for ``max_ulp_error``.
        lost_updates: Element-adds that left the buffer unchanged although the addend was nonzero
            (``Accumulator.lost_updates``).
        element_adds: Element-adds performed (number of adds times elements).

    Returns:
        A dict with exactly the keys :data:`METRIC_NAMES`, all floats: ``rel_l2_error``,
        ``norm_ratio``, ``projection_bias``, ``cosine``, ``max_ulp_error`` (see the functions of the
        same names), ``lost_update_fraction`` (``lost_updates / element_adds``, 0.0 when
        ``element_adds == 0``) and ``nonfinite`` (the number of NaN/Inf entries of ``acc``).  The
        non-finite policy is in the module docstring.

    Raises:
        ValueError: Shapes differ (both shapes are named), ``ref`` not finite, unknown format, or
            counts that are negative, non-integer or with ``lost_updates > element_adds``.
    """
    fmt = get_format(fmt)
    for name, value in (("lost_updates", lost_updates), ("element_adds", element_adds)):
        check_int(value, name, minimum=0)
    if lost_updates > element_adds:
        raise ValueError(f"lost_updates={lost_updates!r} exceeds element_adds={element_adds!r}")
    a, r = _pair(acc, ref)
    return {
        "rel_l2_error": _rel_l2(a, r),
        "norm_ratio": _norm_ratio(a, r),
        "projection_bias": _projection_bias(a, r),
        "cosine": _cosine(a, r),
        "max_ulp_error": _max_ulp(a, r, fmt),
        "lost_update_fraction": lost_updates / element_adds if element_adds else 0.0,
        "nonfinite": float(_nonfinite(a)[0]),
    }


# --- statistics over trials ----------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    """Mean of a sample with its Student-t confidence interval.

    Attributes:
        n: Sample size.
        mean: Sample mean.
        std: Sample standard deviation (``ddof=1``); NaN for ``n = 1``.
        sem: Standard error of the mean, ``std / sqrt(n)``; NaN for ``n = 1``.
        ci_low: Lower end of the two-sided Student-t interval ``mean -+ t_{(1+c)/2, n-1} sem``.
        ci_high: Upper end; both NaN for ``n = 1``.
    """

    n: int
    mean: float
    std: float
    sem: float
    ci_low: float
    ci_high: float


def _as_numpy(values: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().to(torch.float64).numpy().ravel()
    return np.asarray(values, dtype=np.float64).ravel()


def summarize(values: torch.Tensor | np.ndarray | Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean, standard deviation, standard error and Student-t confidence interval of a sample.

    The interval is ``mean -+ q sem`` with ``q = scipy.stats.t.ppf((1 + confidence) / 2, n - 1)``,
    exact for normally distributed values and asymptotically right otherwise (central limit).
    Non-finite values are *not* dropped: they propagate to the mean (and the rest), so a diverged
    trial shows up as ``inf``/``nan`` instead of vanishing from the average.

    Args:
        values: The sample (any shape; flattened).
        confidence: Coverage of the interval, in ``(0, 1)``.

    Returns:
        A :class:`Summary`; with ``n = 1`` the spread and interval are NaN.

    Raises:
        ValueError: An empty sample or ``confidence`` outside ``(0, 1)``.
    """
    check_probability(confidence, "confidence")
    x = _as_numpy(values)
    n = int(x.size)
    if n == 0:
        raise ValueError("summarize needs at least one value, got an empty sample")
    with np.errstate(all="ignore"):  # inf - inf in the spread is reported as nan, without a warning
        mean = float(np.mean(x))
        if n == 1:
            return Summary(n=1, mean=mean, std=math.nan, sem=math.nan, ci_low=math.nan, ci_high=math.nan)
        std = float(np.std(x, ddof=1))
        sem = std / math.sqrt(n)
        half = float(scipy.stats.t.ppf(0.5 + 0.5 * confidence, n - 1)) * sem
    return Summary(n=n, mean=mean, std=std, sem=sem, ci_low=mean - half, ci_high=mean + half)


def _t_test_p_value(summary: Summary) -> float:
    """Two-sided one-sample t-test of ``H0: mean = 0`` from a :class:`Summary`."""
    if summary.n < 2 or not (math.isfinite(summary.mean) and math.isfinite(summary.sem)):
        return math.nan
    if summary.sem == 0.0:  # identical values: certain (p = 0) unless they are all exactly zero
        return 1.0 if summary.mean == 0.0 else 0.0
    t = summary.mean / summary.sem
    return float(2.0 * scipy.stats.t.sf(abs(t), summary.n - 1))


@dataclass(frozen=True)
class BiasVariance:
    """Bias and variance of ``T`` independent accumulated results against one reference.

    With ``m = mean_k acc_k`` (per element), ``R = ||ref||**2`` and ``d`` elements:

    Attributes:
        n_trials: ``T``.
        bias: Per-element mean error ``m - ref`` (float64 tensor of ``ref``'s shape).
        rel_sq_bias: Relative squared bias ``||m - ref||**2 / R``.
        rel_variance: Mean per-element variance across trials (``ddof=1``) relative to ``R / d``,
            i.e. ``sum_j var_j / R``; NaN for ``T = 1``.
        rel_mse: ``mean_k ||acc_k - ref||**2 / R``.  Exact identity (up to float64 rounding):
            ``rel_mse = rel_sq_bias + (T - 1) / T * rel_variance``.
        projection: :class:`Summary` of the per-trial projection biases
            ``<acc_k - ref, ref> / R`` (mean and Student-t confidence interval).
        p_value: Two-sided p-value of the one-sample t-test of ``H0: E[projection bias] = 0``
            (exact if the per-trial projection biases are normal, asymptotic otherwise); NaN for
            ``T = 1`` or non-finite trials; with zero spread, 1 if all are exactly 0, else 0.
        nonfinite_trials: Trials with at least one NaN/Inf entry; they propagate NaN/Inf into the
            statistics rather than being dropped.
    """

    n_trials: int
    bias: torch.Tensor
    rel_sq_bias: float
    rel_variance: float
    rel_mse: float
    projection: Summary
    p_value: float
    nonfinite_trials: int


def bias_variance(trials: torch.Tensor, ref: torch.Tensor, *, confidence: float = 0.95) -> BiasVariance:
    """Bias/variance decomposition and a bias test over independent trials.

    Args:
        trials: ``(T, *shape)`` tensor: ``T`` independent accumulated results (e.g. stochastic
            rounding with different seeds, or different data orders).
        ref: The fp64 reference, of shape ``shape``; finite and not identically zero.
        confidence: Coverage of the projection-bias confidence interval.

    Returns:
        A :class:`BiasVariance`.  A small ``p_value`` (say ``< 1e-3``) rejects "unbiased along the
        gradient": round-to-nearest stagnation gives a negative projection bias, stochastic rounding
        should not.

    Raises:
        ValueError: ``trials`` has no trial axis, its trailing shape differs from ``ref``'s (both are
            named), ``ref`` is not finite or is zero, or a bad ``confidence``.
    """
    tr = _f64(trials, "trials")
    r = _f64(ref, "ref")
    if tr.ndim < 1 or tr.shape[0] < 1 or tuple(tr.shape[1:]) != tuple(r.shape):
        raise ValueError(
            f"trials must have shape (T, *ref.shape) with T >= 1: trials has shape {tuple(tr.shape)}, "
            f"ref has shape {tuple(r.shape)}"
        )
    r = r.to(tr.device)
    if not bool(torch.isfinite(r).all()):
        raise ValueError("ref must be finite")
    if not bool((r != 0).any()):
        raise ValueError("ref is zero everywhere: relative bias and variance are undefined")
    n_trials = int(tr.shape[0])
    flat, rf = tr.reshape(n_trials, -1), r.reshape(-1)
    bias = (flat.mean(dim=0) - rf).reshape(r.shape)

    # Relative quantities on a power-of-two rescaled copy (exact; squares stay in range).
    f1, f2 = _inverse_power_factors(float(rf.abs().max()))
    xs, rs = flat * f1 * f2, rf * f1 * f2
    rr = _dot(rs, rs)
    errors = xs - rs
    mean_error = errors.mean(dim=0)
    rel_sq_bias = _dot(mean_error, mean_error) / rr
    with intra_op_threads(1):  # reductions in one fixed order: bytes independent of the core count
        rel_variance = float(xs.var(dim=0, correction=1).sum()) / rr if n_trials > 1 else math.nan
        rel_mse = float((errors * errors).sum(dim=1).mean()) / rr
        projections = (errors @ rs) / rr
    projection = summarize(projections, confidence)
    nonfinite_trials = int((~torch.isfinite(flat)).any(dim=1).sum())
    return BiasVariance(
        n_trials=n_trials,
        bias=bias,
        rel_sq_bias=rel_sq_bias,
        rel_variance=rel_variance,
        rel_mse=rel_mse,
        projection=projection,
        p_value=_t_test_p_value(projection),
        nonfinite_trials=nonfinite_trials,
    )
