"""Error bounds and predictions for summation in a low-precision buffer.

Every function here is a pure function of numbers (no tensors): the worst-case and probabilistic
bounds of the summation literature, and exact predictions of when a round-to-nearest buffer stops
absorbing updates.  Each docstring names its source and the condition under which it holds.

Notation (Higham 2002, ch. 3-4): ``n`` summands ``x_1..x_n`` (so ``n - 1`` additions), unit roundoff
``u = 2**-t`` of the buffer format, ``abs_sum = sum |x_i|``, and the forward error
``E_n = computed_sum - exact_sum``.  A bound returned as ``math.inf`` means the bound is *void*
(its validity condition fails), never that the error is infinite.  ``abs_sum == 0`` always gives
``0.0``: a sum of zeros is computed exactly by every algorithm here.

References:
    [Higham] N. J. Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., SIAM, 2002.
    [HM19] N. J. Higham and T. Mary, "A new approach to probabilistic rounding error analysis",
        SIAM J. Sci. Comput. 41(5), A2815-A2835, 2019.
    [CHM21] M. P. Connolly, N. J. Higham and T. Mary, "Stochastic rounding and its probabilistic
        backward error analysis", SIAM J. Sci. Comput. 43(1), A566-A585, 2021.
    [Goldberg] D. Goldberg, "What every computer scientist should know about floating-point
        arithmetic", ACM Computing Surveys 23(1), 5-48, 1991.
    [Knuth] D. E. Knuth, *The Art of Computer Programming*, vol. 2, 3rd ed., 1998, section 4.2.2.
    [Muller] J.-M. Muller et al., *Handbook of Floating-Point Arithmetic*, 2nd ed., 2018
        (Sterbenz's lemma, Fast2Sum).
    [Neumaier] A. Neumaier, "Rundungsfehleranalyse einiger Verfahren zur Summation endlicher
        Summen", Z. Angew. Math. Mech. 54(1), 39-51, 1974.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from precision_lab.checks import check_int, check_probability, check_real
from precision_lab.formats import Format, get_format

__all__ = [
    "LossOnset",
    "gamma",
    "gamma_tilde",
    "kahan_leading_bound",
    "kahan_sum_bound",
    "loss_onset",
    "neumaier_sum_bound",
    "pairwise_sum_bound",
    "probabilistic_bound_probability",
    "probabilistic_sum_bound",
    "recursive_sum_bound",
    "stagnation_count",
    "stochastic_rounding_bound_probability",
    "stochastic_rounding_sum_bound",
]


# --- argument checks ----------------------------------------------------------------------------
def _check_int(value: object, name: str, minimum: int) -> int:
    return check_int(value, name, minimum=minimum)


def _check_u(u: object) -> float:
    return check_probability(u, "unit roundoff u")


def _check_nonneg(value: object, name: str) -> float:
    return check_real(value, name, low=0.0, high=math.inf, high_open=True)


def _check_positive(value: object, name: str) -> float:
    return check_real(value, name, low=0.0, low_open=True, high=math.inf, high_open=True)


def _times(coefficient: float, abs_sum: float) -> float:
    """``coefficient * abs_sum`` with a zero sum giving 0 even when the coefficient is void (inf)."""
    return 0.0 if abs_sum == 0.0 else coefficient * abs_sum


# --- deterministic bounds -----------------------------------------------------------------------
def gamma(n: int, u: float) -> float:
    """The constant ``gamma_n = n u / (1 - n u)`` of rounding error analysis.

    Source: [Higham] Lemma 3.1: if ``|delta_i| <= u`` and ``rho_i = +-1`` then
    ``prod_{i=1..n} (1 + delta_i)**rho_i = 1 + theta_n`` with ``|theta_n| <= gamma_n``, provided
    ``n u < 1``.

    Args:
        n: Number of rounding errors, an integer ``>= 0`` (``gamma_0 = 0``: no rounding, no error).
        u: Unit roundoff, in ``(0, 1)``.

    Returns:
        ``gamma_n``; ``math.inf`` when ``n u >= 1``, where Lemma 3.1 does not apply and the bound is
        void (it is not a claim that the error is infinite).

    Raises:
        ValueError: ``n`` is not an integer ``>= 0`` or ``u`` is not in ``(0, 1)``.
    """
    n = _check_int(n, "n", 0)
    u = _check_u(u)
    nu = n * u
    if nu >= 1.0:
        return math.inf
    return nu / (1.0 - nu)


def recursive_sum_bound(n: int, u: float, abs_sum: float) -> float:
    """Worst-case forward error of recursive (left-to-right) summation, ``gamma_{n-1} sum|x_i|``.

    Source: [Higham] section 4.2, eq. (4.4) (``|E_n| <= gamma_{n-1} sum |x_i|``), whose first-order
    form is eq. (4.5), ``(n - 1) u sum|x_i| + O(u**2)``.  Each ``x_i`` passes through at most
    ``n - 1`` roundings, and Lemma 3.1 bounds the product of their ``1 + delta``.

    Validity: round-to-nearest (any rounding with relative error ``<= u``), no overflow, gradual
    underflow (additions whose result is subnormal are exact), and ``(n - 1) u < 1``.

    Args:
        n: Number of summands, ``>= 1`` (``n = 1`` gives 0: nothing is rounded).
        u: Unit roundoff of the accumulation format, in ``(0, 1)``.
        abs_sum: ``sum |x_i|``, finite and ``>= 0``.

    Returns:
        The bound on ``|E_n|``; ``math.inf`` (void) when ``(n - 1) u >= 1``.

    Raises:
        ValueError: A bad ``n``, ``u`` or ``abs_sum`` (the message shows the value).
    """
    n = _check_int(n, "n", 1)
    return _times(gamma(n - 1, u), _check_nonneg(abs_sum, "abs_sum"))


def pairwise_sum_bound(n: int, u: float, abs_sum: float) -> float:
    """Worst-case forward error of pairwise summation, ``gamma_{ceil(log2 n)} sum|x_i|``.

    Source: [Higham] section 4.2, eq. (4.6).  Each summand passes through at most
    ``h = ceil(log2 n)`` additions of the summation tree, hence ``|E_n| <= gamma_h sum|x_i|``.

    Validity: as :func:`recursive_sum_bound`, with ``h u < 1``, for any summation tree of depth
    ``h = ceil(log2 n)``: recursive halving, or a binary-counter cascade whose partial sums (of sizes
    the powers of two in ``n``) are merged smallest first.  (Merging them largest first can put
    ``floor(log2 n) + popcount(n) - 1`` roundings on a summand, which exceeds ``h`` when ``n`` has
    three or more bits set; the bound then needs that depth instead.)

    Args:
        n: Number of summands, ``>= 1``.
        u: Unit roundoff, in ``(0, 1)``.
        abs_sum: ``sum |x_i|``, finite and ``>= 0``.

    Returns:
        The bound; ``math.inf`` (void) when ``ceil(log2 n) u >= 1``.

    Raises:
        ValueError: A bad ``n``, ``u`` or ``abs_sum``.
    """
    n = _check_int(n, "n", 1)
    depth = (n - 1).bit_length()  # ceil(log2 n), exactly, for every integer n >= 1
    return _times(gamma(depth, u), _check_nonneg(abs_sum, "abs_sum"))


def kahan_leading_bound(n: int, u: float, abs_sum: float) -> float:
    """First-order error bound of Kahan's compensated summation, ``2 u sum|x_i|``.

    Source: [Higham] section 4.3, eq. (4.8): ``|E_n| <= [2u + O(n u**2)] sum|x_i|``, from Knuth's
    analysis ([Knuth] section 4.2.2: the computed sum is ``sum (1 + mu_i) x_i`` with
    ``|mu_i| <= 2u + O(n u**2)``) and [Goldberg] Theorem 8.

    This is the *leading term only*: the ``O(n u**2)`` remainder is dropped, so this is not a
    rigorous bound and must not be asserted as one.  It describes Kahan summation while
    ``n u << 1``; with a compensation stored in a low precision (bf16, ``u = 2**-8``) the dropped
    ``n u**2`` term overtakes ``2u`` once ``n`` is of order ``1/u`` (a few hundred).  Use
    :func:`kahan_sum_bound` for a bound that holds to all orders.

    Args:
        n: Number of summands, ``>= 1`` (``n = 1`` gives 0: the single summand is returned exactly).
        u: Unit roundoff of the format of the sum *and* compensation, in ``(0, 1)``.
        abs_sum: ``sum |x_i|``, finite and ``>= 0``.

    Returns:
        ``2 u abs_sum`` (0 for ``n = 1``).

    Raises:
        ValueError: A bad ``n``, ``u`` or ``abs_sum``.
    """
    n = _check_int(n, "n", 1)
    u = _check_u(u)
    abs_sum = _check_nonneg(abs_sum, "abs_sum")
    return 0.0 if n == 1 else 2.0 * u * abs_sum


def kahan_sum_bound(n: int, u: float, abs_sum: float) -> float:
    """A rigorous, fully explicit error bound for Kahan's compensated summation, ``(3u + O(n u**2)) sum|x_i|``.

    The algorithm is [Higham] Algorithm 4.2, sum and compensation both in the buffer format::

        s = 0; e = 0
        for x in xs: y = fl(x + e); t = fl(s + y); e = fl(fl(s - t) + y); s = t
        return s

    (the form ``c = fl(fl(t - s) - y); y = fl(x - c)`` is the same algorithm with ``c = -e``).
    The literature states ``|E_n| <= [2u + O(n u**2)] sum|x_i|`` ([Higham] eq. (4.8); [Knuth]
    section 4.2.2; [Goldberg] Theorem 8) without an explicit second-order constant, so that bound
    (see :func:`kahan_leading_bound`) cannot be tested as an upper bound.  This function instead
    returns a bound derived here from the standard model ``fl(a +- b) = (a +- b)(1 + delta)``,
    ``|delta| <= u`` ([Higham] eq. (2.4)), applied to each of the four operations, which holds to
    all orders.  Its price is a looser leading constant, ``3u`` instead of ``2u``.

    Derivation.  With ``T = sum |x_i|``, write for step ``i``: ``a_i = y_i - (x_i + e_{i-1})``
    (rounding of ``y``), ``r_i = s_{i-1} + y_i - s_i`` (rounding of the sum, which the compensation
    tries to capture) and ``b_i = e_i - r_i`` (the compensation's own error).  Then
    ``V_i = s_i + e_i`` satisfies ``V_i = V_{i-1} + x_i + a_i + b_i`` exactly, so
    ``s_n - sum x = sum_{i<n} (a_i + b_i) + a_n - r_n``.  The standard model gives
    ``|a_i| <= u(|x_i| + |e_{i-1}|)``, ``|r_i| <= u |s_{i-1} + y_i| <= u (T + D)`` with
    ``D = sum_i (|a_i| + |b_i|)`` (as ``s_{i-1} + y_i = x_1 + .. + x_i + sum_{j<i} (a_j + b_j) + a_i``), ``|b_i| <= u(1+u)|y_i| + u(2+u)|r_i|`` and
    ``|e_i| <= u(1+u)|y_i| + (1+u)**2 |r_i|``.  With ``A = (1+u)**2``, ``B = 1 + A`` and
    ``E = max_{i<n} |e_i|`` these give ``E (1 - uA) <= uA (2T + D)`` and
    ``D <= uB T + n u B E + n u**2 (2+u)(T + D)``; eliminating ``E`` and solving for ``D``::

        c1 = A B / (1 - u A),  c2 = 2 + u
        D <= [u B + n u**2 (2 c1 + c2)] T / (1 - n u**2 (c1 + c2))
        |E_n| <= u T + (1 + u) D  =  (3u + ~6 n u**2 + O(u**2 + n**2 u**4)) T

    Validity: any rounding obeying the standard model with this ``u`` (round-to-nearest; not
    stochastic rounding, whose per-operation bound is ``2u``), no overflow, gradual underflow
    (additions whose result is subnormal are exact; a flush-to-zero format breaks the model), and
    ``n u**2 (c1 + c2) < 1`` (about ``n < 1 / (4 u**2)``: 16,000 summands for bf16, 1.0e6 for fp16).

    Low precision: for bf16 (``u = 2**-8``) the second-order term ``~6 n u**2`` exceeds the
    first-order ``3u`` once ``n >~ 1 / (2u) = 128``; at ``n = 1000`` the bound is about ``29 u T``.
    The leading ``2u`` of the literature is essentially attained: an adversarial bf16 input of five
    summands has error ``1.98 u T`` (``tests/test_theory.py``).

    Args:
        n: Number of summands, ``>= 1`` (``n = 1`` gives 0: ``y = x_1`` and ``s = y`` are exact).
        u: Unit roundoff of the format of the sum and the compensation, in ``(0, 1)``.
        abs_sum: ``sum |x_i|``, finite and ``>= 0``.

    Returns:
        The bound on ``|E_n|``; ``math.inf`` (void) when the validity condition fails.

    Raises:
        ValueError: A bad ``n``, ``u`` or ``abs_sum``.
    """
    n = _check_int(n, "n", 1)
    u = _check_u(u)
    abs_sum = _check_nonneg(abs_sum, "abs_sum")
    if n == 1:
        return 0.0
    a = (1.0 + u) ** 2
    b = 1.0 + a
    if u * a >= 1.0:
        return _times(math.inf, abs_sum)
    c1 = a * b / (1.0 - u * a)
    c2 = 2.0 + u
    nu2 = n * u * u
    denominator = 1.0 - nu2 * (c1 + c2)
    if denominator <= 0.0:
        return _times(math.inf, abs_sum)
    d = (u * b + nu2 * (2.0 * c1 + c2)) / denominator
    return _times(u + (1.0 + u) * d, abs_sum)


def neumaier_sum_bound(n: int, u: float, abs_sum: float, abs_total: float | None = None) -> float:
    """A rigorous error bound for Neumaier's (Kahan-Babuška) summation, ``u|S| + O(n**2 u**2) sum|x_i|``.

    The algorithm ([Neumaier]; [Higham] section 4.3), sum and compensation both in the buffer
    format, every operation rounded to nearest::

        s = 0; c = 0
        for x in xs:
            t = fl(s + x)
            d = fl(fl(s - t) + x) if |s| >= |x| else fl(fl(x - t) + s)
            c = fl(c + d); s = t
        return fl(s + c)

    ([Higham] states ``|E_n| <= 2u|S| + O(n u**2) sum|x_i|`` for it, ``S = sum x_i``, without an
    explicit second-order term.)  This function returns a bound derived here that holds to all
    orders, for any ``n``:

        |E_n| <= u |S| + (1 + u) min(1, gamma_{n-2}) min(1, gamma_{n-1}) sum|x_i|

    Derivation.  Write ``sigma_i = s_{i-1} + x_i`` (exact), ``s_i = fl(sigma_i)``,
    ``r_i = sigma_i - s_i`` and ``T = sum |x_i|``.  (1) The branch puts the larger operand first,
    so Fast2Sum (Dekker 1971; [Muller]: radix 2, round to nearest, no overflow; it stays exact
    with gradual underflow) gives ``d_i = r_i`` exactly, and telescoping ``s_i = s_{i-1} + x_i - r_i``
    gives ``S = s_n + sum r_i`` exactly: the only error left is that of the compensation.
    (2) ``r_1 = 0`` (``s_0 = 0``) and ``c_2 = r_2`` exactly, so ``c_n`` is recursive summation of
    ``r_2..r_n`` with ``n - 2`` roundings: ``|c_n - sum r_i| <= gamma_{n-2} R`` with
    ``R = sum |r_i|`` ([Higham] eq. (4.4)); also ``<= R``, since rounding ``c_{k-1} + r_k`` to
    nearest moves it by at most ``|r_k|`` (``c_{k-1}`` is itself a candidate).  (3) Likewise
    ``|r_i| <= |x_i|`` (``s_{i-1}`` is a candidate for ``fl(sigma_i)``), so ``R <= T``; and
    ``|r_i| <= u |sigma_i|`` with ``sigma_i = x_1 + .. + x_i - (r_1 + .. + r_{i-1})``, so
    ``T + R_i <= (1 + u)(T + R_{i-1})`` and ``R <= ((1 + u)**(n-1) - 1) T <= gamma_{n-1} T``
    ([Higham] Lemma 3.1).  (4) The read-out ``fl(s_n + c_n)`` adds at most ``u |s_n + c_n|``
    ``<= u (|S| + e)`` with ``e = |s_n + c_n - S|`` from (2) and (3).  The same holds for the
    read-out in fp64 (:class:`~precision_lab.strategies.neumaier.Neumaier`), whose unit roundoff
    ``2**-53`` is at most ``u``.

    Unlike Kahan's (:func:`kahan_sum_bound`), the second-order term is ``~ n**2 u**2``, not
    ``n u**2``: ``c`` is never fed back into ``s``, so it is itself a naive sum of up to ``n u T``
    of rounding errors, with ``n`` roundings of its own.  That order is attained: in bf16
    (``u = 2**-8``) the stream 1, then ``n - 1`` addends ``3 * 2**-10``, has error ``0.028 T`` at
    ``n = 128`` and ``0.093 T`` at ``n = 256`` (about ``0.1 n**2 u**2 T``; 14 and 24 times
    ``n u**2 T``: ``tests/test_theory.py``), and once ``n u > 1`` the compensation stagnates as a
    naive sum does (``0.49 T`` at ``n = 1000``), where the bound is ``~ T``.  With ``n u << 1`` and
    cancelling data (``|S| << T``) it is far below Kahan's ``3u T``: Neumaier's ``|S|`` term is the
    point of the algorithm (``[1, 1e100, 1, -1e100]`` sums to 2 exactly in fp64; Kahan's gives 0).

    Validity: round-to-nearest in radix 2 (Fast2Sum's exactness needs it; not stochastic rounding),
    no overflow (a partial sum ``s_i``, ``c_i`` or ``sigma_i`` is at most ``2 T`` in magnitude),
    gradual underflow (a flush-to-zero format breaks Fast2Sum).  No condition on ``n``: where
    ``gamma`` is void the factors are capped at 1 by (2) and (3).

    Args:
        n: Number of summands, ``>= 1`` (``n = 1`` gives 0: ``s = x_1``, ``c = 0``).
        u: Unit roundoff of the format of the sum and the compensation, in ``(0, 1)``.
        abs_sum: ``T = sum |x_i|``, finite and ``>= 0``.
        abs_total: ``|S| = |sum x_i|``, finite, in ``[0, abs_sum]``; ``None`` uses its upper bound
            ``abs_sum`` (a bound in terms of ``sum|x_i|`` alone, like the other bounds here).

    Returns:
        The bound on ``|E_n|`` (always finite for finite arguments).

    Raises:
        ValueError: A bad ``n``, ``u``, ``abs_sum`` or ``abs_total`` (also ``abs_total > abs_sum``).
    """
    n = _check_int(n, "n", 1)
    u = _check_u(u)
    abs_sum = _check_nonneg(abs_sum, "abs_sum")
    if abs_total is None:
        abs_total = abs_sum
    abs_total = _check_nonneg(abs_total, "abs_total")
    if abs_total > abs_sum:
        raise ValueError(f"abs_total = |sum x_i| = {abs_total!r} exceeds abs_sum = sum |x_i| = {abs_sum!r}")
    if n == 1:
        return 0.0
    second = min(1.0, gamma(n - 2, u)) * min(1.0, gamma(n - 1, u))
    return u * abs_total + (1.0 + u) * second * abs_sum


# --- probabilistic bounds -----------------------------------------------------------------------
def gamma_tilde(n: int, u: float, lam: float) -> float:
    """The probabilistic constant ``gamma~_n(lam) = exp(lam sqrt(n) u + n u**2 / (1 - u)) - 1``.

    Source: [HM19] Theorem 2.4: if ``delta_1..delta_n`` are independent random variables of mean
    zero with ``|delta_k| <= u`` and ``rho_k = +-1``, then for any ``lam > 0``
    ``prod (1 + delta_k)**rho_k = 1 + theta_n`` with ``|theta_n| <= gamma~_n(lam)``
    (``= lam sqrt(n) u + O(u**2)``) with probability at least ``P(lam) = 1 - 2 exp(-lam**2 (1-u)**2 / 2)``.
    The proof applies Hoeffding's inequality to ``sum log(1 + delta_k)``; [CHM21] reproves it with the
    Azuma-Hoeffding inequality assuming only *mean independence*
    (``E[delta_k | delta_1..delta_{k-1}] = 0``).  No condition on ``n u`` is needed.

    Args:
        n: Number of rounding errors, an integer ``>= 0`` (``gamma~_0 = 0``).
        u: Bound on each ``|delta_k|``, in ``(0, 1)``.
        lam: The confidence parameter ``lambda > 0``.

    Returns:
        ``gamma~_n(lam)`` (``math.inf`` only if the exponential overflows).

    Raises:
        ValueError: A bad ``n``, ``u`` or ``lam``.
    """
    n = _check_int(n, "n", 0)
    u = _check_u(u)
    lam = _check_positive(lam, "lam")
    exponent = lam * math.sqrt(n) * u + n * u * u / (1.0 - u)
    try:
        return math.expm1(exponent)
    except OverflowError:
        return math.inf


def _union_probability(n: int, u: float, lam: float) -> float:
    """``1 - n (1 - P(lam))`` clipped at 0, with ``P(lam) = 1 - 2 exp(-lam**2 (1-u)**2 / 2)``."""
    if n == 1:
        return 1.0  # a single summand is returned exactly: the bound 0 holds surely
    failure = 2.0 * math.exp(-0.5 * (lam * (1.0 - u)) ** 2)
    return max(0.0, 1.0 - n * failure)


def probabilistic_sum_bound(n: int, u: float, abs_sum: float, lam: float) -> float:
    """Probabilistic forward-error bound of recursive summation, ``gamma~_{n-1}(lam) sum|x_i|``.

    Source: [HM19] Theorem 3.1 (inner products ``a^T b``; summation is ``b = (1, ..., 1)``, whose
    multiplications are exact) built on Theorem 2.4 (see :func:`gamma_tilde`).  The computed sum is
    ``sum x_i (1 + theta^(i))`` with ``theta^(i)`` a product of at most ``n - 1`` factors
    ``1 + delta``, so ``|E_n| <= gamma~_{n-1}(lam) sum|x_i|`` with probability at least
    :func:`probabilistic_bound_probability` ``= Q(lam, n) = 1 - n (1 - P(lam))``.

    Validity: [HM19] Model 2.1 (the rounding errors are independent random variables of mean zero,
    ``|delta| <= u``).  Round-to-nearest errors are *not* random in this sense: the model is a
    hypothesis about typical data, and it fails, for instance, in stagnation (constant addends, where
    every ``delta`` has the same sign).  For a bound that provably holds, use stochastic rounding and
    :func:`stochastic_rounding_sum_bound`.  No condition on ``n u``.

    Args:
        n: Number of summands, ``>= 1``.
        u: Unit roundoff, in ``(0, 1)``.
        abs_sum: ``sum |x_i|``, finite and ``>= 0``.
        lam: ``lambda > 0``; the bound grows like ``lam sqrt(n-1) u``.

    Returns:
        The bound (0 for ``n = 1``).

    Raises:
        ValueError: A bad ``n``, ``u``, ``abs_sum`` or ``lam``.
    """
    n = _check_int(n, "n", 1)
    return _times(gamma_tilde(n - 1, u, lam), _check_nonneg(abs_sum, "abs_sum"))


def probabilistic_bound_probability(n: int, u: float, lam: float) -> float:
    """Probability with which :func:`probabilistic_sum_bound` holds, ``Q(lam, n) = 1 - n (1 - P(lam))``.

    Source: [HM19] Theorem 3.1: ``Q(lam, n) = 1 - n (1 - P(lam))`` with
    ``P(lam) = 1 - 2 exp(-lam**2 (1 - u)**2 / 2)`` from Theorem 2.4, i.e.
    ``Q = 1 - 2 n exp(-lam**2 (1 - u)**2 / 2)``: a union bound over the ``n`` per-summand products.
    (Summands 1 and 2 share one product, so ``n - 1`` events would do; the paper's ``n`` is kept so
    the numbers match it.  Either is a valid lower bound.)

    Validity: [HM19] Model 2.1, as in :func:`probabilistic_sum_bound`.

    Args:
        n: Number of summands, ``>= 1``.
        u: Unit roundoff, in ``(0, 1)``.
        lam: ``lambda > 0``.

    Returns:
        A lower bound on the probability, in ``[0, 1]``: ``1.0`` for ``n = 1`` (no rounding), and
        clipped at ``0.0`` where the union bound is vacuous (small ``lam``).  Non-decreasing in
        ``lam``; e.g. ``lam = 6``, ``n = 1000`` gives about ``1 - 3e-5``.

    Raises:
        ValueError: A bad ``n``, ``u`` or ``lam``.
    """
    n = _check_int(n, "n", 1)
    return _union_probability(n, _check_u(u), _check_positive(lam, "lam"))


def _check_sr_u(u: float) -> float:
    u = _check_u(u)
    if 2.0 * u >= 1.0:
        raise ValueError(f"stochastic rounding needs 2u < 1 (its error bound is 2u), got u={u!r}")
    return u


def stochastic_rounding_sum_bound(n: int, u: float, abs_sum: float, lam: float) -> float:
    """Probabilistic error bound of recursive summation with stochastic rounding, no independence assumed.

    Source: [CHM21].  Stochastic rounding ("mode 1": round up with probability equal to the distance
    to the lower neighbour divided by the gap) produces ``fl(x) = x (1 + delta)`` with
    ``|delta| < 2u``, not ``u``: SR may round to the farther neighbour, up to one gap
    ``<= 2u |x|`` away.  [CHM21] prove that these errors have mean zero and are *mean independent*,
    ``E[delta_k | delta_1..delta_{k-1}] = 0`` (they are not independent: the next addition depends on
    the previous result), and prove [HM19] Theorem 2.4 under mean independence alone, via a
    martingale and the Azuma-Hoeffding inequality.  Their bounds therefore hold unconditionally for
    SR, with ``u`` replaced by the SR per-operation bound ``2u``.  For recursive summation (as in
    :func:`probabilistic_sum_bound`)::

        |E_n| <= gamma~_{n-1}(lam; 2u) sum|x_i|,
        gamma~_m(lam; 2u) = exp(2 lam sqrt(m) u + 4 m u**2 / (1 - 2u)) - 1 = 2 lam sqrt(m) u + O(u**2)

    with probability at least :func:`stochastic_rounding_bound_probability`.

    Validity: each addition ``s + x`` is formed exactly (or in a format at least ``2t + 2`` bits wide)
    and then stochastically rounded once, with fresh, exact uniform randomness; no overflow; ``2u < 1``.
    No independence assumption on the data or the errors.

    Args:
        n: Number of summands, ``>= 1``.
        u: Unit roundoff ``2**-t`` of the buffer format (the *round-to-nearest* unit roundoff; the
            factor 2 is applied here), in ``(0, 1/2)``.
        abs_sum: ``sum |x_i|``, finite and ``>= 0``.
        lam: ``lambda > 0``.

    Returns:
        The bound (0 for ``n = 1``).

    Raises:
        ValueError: A bad ``n``, ``u`` (including ``u >= 1/2``), ``abs_sum`` or ``lam``.
    """
    n = _check_int(n, "n", 1)
    u = _check_sr_u(u)
    return _times(gamma_tilde(n - 1, 2.0 * u, lam), _check_nonneg(abs_sum, "abs_sum"))


def stochastic_rounding_bound_probability(n: int, u: float, lam: float) -> float:
    """Probability with which :func:`stochastic_rounding_sum_bound` holds: ``1 - 2 n exp(-lam**2 (1 - 2u)**2 / 2)``.

    Source: [CHM21] (mean-independent version of [HM19] Theorem 2.4, with the SR per-operation bound
    ``2u`` in place of ``u``) and the union bound of [HM19] Theorem 3.1 over the ``n`` per-summand
    products: ``Q = 1 - n (1 - P)``, ``P = 1 - 2 exp(-lam**2 (1 - 2u)**2 / 2)``.

    Validity: as :func:`stochastic_rounding_sum_bound` (unconditional for SR).

    Args:
        n: Number of summands, ``>= 1``.
        u: Unit roundoff ``2**-t`` of the buffer format, in ``(0, 1/2)``.
        lam: ``lambda > 0``.

    Returns:
        A lower bound on the probability, in ``[0, 1]`` (``1.0`` for ``n = 1``; clipped at 0).

    Raises:
        ValueError: A bad ``n``, ``u`` or ``lam``.
    """
    n = _check_int(n, "n", 1)
    u = _check_sr_u(u)
    return _union_probability(n, 2.0 * u, _check_positive(lam, "lam"))


# --- stagnation ----------------------------------------------------------------------------------
# Exact arithmetic on the format's grid: every number of a format is an integer multiple of its
# smallest quantum 2**(emin - mantissa_bits) (the smallest subnormal spacing), so values are held as
# Python integers in that unit ("units") and every sum is exact.


def _units_exponent(fmt: Format) -> int:
    return fmt.emin - fmt.mantissa_bits


def _round_scaled(mant: int, exp2: int, fmt: Format) -> int:
    """Round ``mant * 2**exp2`` to ``fmt`` (nearest, ties to even, unbounded exponent); result in units."""
    if mant == 0:
        return 0
    sign = -1 if mant < 0 else 1
    mag = abs(mant)
    qe = _units_exponent(fmt)
    binade = mag.bit_length() - 1 + exp2  # floor(log2 |x|)
    quantum = max(binade, fmt.emin) - fmt.mantissa_bits  # exponent of the spacing at |x|
    if exp2 >= quantum:  # already on the grid
        return sign * (mag << (exp2 - qe))
    shift = quantum - exp2
    kept, rest = mag >> shift, mag & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if rest > half or (rest == half and kept & 1):
        kept += 1  # a carry to 2**(mantissa_bits + 1) is still the right (power-of-two) value
    return sign * (kept << (quantum - qe))


def _float_to_units(x: float, fmt: Format, name: str) -> int:
    """Round a finite float to ``fmt`` (RN-even) and return it in units; overflow is an error."""
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x!r}")
    num, den = float(x).as_integer_ratio()  # den is a power of two
    units = _round_scaled(num, 1 - den.bit_length(), fmt)
    if abs(units) > _max_units(fmt):
        raise ValueError(f"{name}={x!r} overflows {fmt.name} (max {fmt.max!r})")
    return units


def _max_units(fmt: Format) -> int:
    units = Fraction(fmt.max) / Fraction(2) ** _units_exponent(fmt)
    return units.numerator  # an integer: every number of the format is a whole number of units


def _uniform_interval(s: int, fmt: Format, max_units: int) -> tuple[int, int]:
    """The closed interval around ``s`` (units) on which the format's numbers are the multiples of one quantum.

    Rounding any real in it to the nearest multiple of that quantum (ties to the even multiple) is
    exactly round-to-nearest-even in the format: the interval's ends are on the grid, and numbers
    beyond them are farther away than the end itself.
    """
    low_binade = 1 << (fmt.mantissa_bits + 1)  # 2**(emin + 1) in units: subnormals + first binade
    mag = abs(s)
    if mag < low_binade:
        lo, hi = -low_binade, low_binade
    else:
        top = 1 << mag.bit_length()
        lo, hi = (top >> 1, top) if s > 0 else (-top, -(top >> 1))
    return max(lo, -max_units), min(hi, max_units)


def stagnation_count(fmt: str | Format, addend: float, start: float = 0.0, *, saturate: bool = False) -> int:
    """Exact number of round-to-nearest additions of a constant that change the buffer before it stagnates.

    The buffer evolves as ``s_0 = RN(start)``, ``s_k = RN(s_{k-1} + a)`` with ``a = RN(addend)``
    (both rounded to ``fmt`` first, as an accumulator rounds its inputs), round-to-nearest with ties
    to even, each sum formed exactly.  Let ``K`` be the first ``k`` with ``s_{k+1} == s_k``; then the
    buffer never changes again, and ``K`` is returned: additions ``1..K`` changed it, addition
    ``K + 1`` and all later ones are lost.  Adding ``1.0`` from 0 gives ``K = 2**t`` (256 for bf16,
    2048 for fp16, 16 for fp8_e4m3, 8 for fp8_e5m2): at ``s = 2**t`` the spacing is 2 and
    ``2**t + 1`` is a tie that goes back to the even ``2**t``.

    Computed analytically, not by simulation: on each interval where the format's spacing is
    constant the increment ``RN(s + a) - s`` is constant once two consecutive increments agree (with
    a tie, the first step may differ by one quantum to reach an even multiple, after which the
    increment is even and stays so), so the whole interval is crossed in one jump.  The cost is a few
    steps per binade visited, all in exact integer arithmetic.

    Overflow: if an addition overflows before the buffer stagnates, that addition is counted (the
    buffer changed) and the buffer then stays at ``+-inf`` (IEEE formats) or NaN (``"fn"`` formats
    such as fp8_e4m3, non-saturating as in ``ml_dtypes``); with ``saturate=True`` an overflowing
    result is ``+-max`` instead (torch's float8 casts), so the count stops when the buffer sits at
    ``max``.

    Flush-to-zero formats are treated as if they had subnormals; that matters only when the addend or
    the buffer falls below ``smallest_normal``.

    Source: the stagnation phenomenon of [CHM21] (round-to-nearest ignores addends below half the
    spacing); the exact arithmetic is [Muller] ch. 2 (round-to-nearest-even on a binade grid).

    Args:
        fmt: Buffer format (name, dtype or :class:`Format`).
        addend: The constant added each time (finite; rounded to ``fmt``).  Zero, or an addend that
            rounds to zero, gives 0.
        start: Initial buffer value (finite; rounded to ``fmt``).
        saturate: Overflow saturates to ``+-max`` instead of giving inf/NaN.

    Returns:
        ``K``, the number of additions that changed the buffer.

    Raises:
        ValueError: Unknown format, a non-finite ``addend``/``start``, or one that overflows ``fmt``.
    """
    fmt = get_format(fmt)
    max_units = _max_units(fmt)
    a = _float_to_units(addend, fmt, "addend")
    s = _float_to_units(start, fmt, "start")
    if a == 0:
        return 0
    if a < 0:  # RN is odd-symmetric: RN(-x) = -RN(x)
        a, s = -a, -s
    qe = _units_exponent(fmt)

    def step(value: int) -> int | None:
        """RN(value + a) in units, or None on overflow (after saturation, if asked)."""
        r = _round_scaled(value + a, qe, fmt)
        if abs(r) <= max_units:
            return r
        return (max_units if r > 0 else -max_units) if saturate else None

    count = 0
    while True:
        s1 = step(s)
        if s1 is None:
            return count + 1  # the overflowing addition changed the buffer, to inf/NaN for good
        if s1 == s:
            return count
        lo, hi = _uniform_interval(s, fmt, max_units)
        if lo <= s + a <= hi and s1 + a <= hi:
            s2 = step(s1)
            d = s1 - s
            if s2 is not None and s2 - s1 == d:
                jumps = (hi - a - s) // d + 1  # all j >= 0 with s + j d + a still inside [lo, hi]
                s += jumps * d
                count += jumps
                continue
        s = s1
        count += 1


@dataclass(frozen=True)
class LossOnset:
    """Predicted accumulation counts at which pre-scaled micro-gradients ``g_i / N`` start to be lost.

    Attributes:
        absorption: Smallest ``N`` with ``|g| / N <= ulp(sum) / 2``: adding ``g / N`` to a running
            sum of that magnitude can leave it unchanged.
        underflow: Smallest ``N`` at which ``g / N`` itself rounds to zero in the format.
    """

    absorption: int
    underflow: int

    @property
    def onset(self) -> int:
        """The earlier of the two counts: from this ``N`` on, updates are lost."""
        return min(self.absorption, self.underflow)

    @property
    def cause(self) -> str:
        """``"absorption"`` or ``"underflow"``, whichever happens first (absorption on a tie)."""
        return "absorption" if self.absorption <= self.underflow else "underflow"


def _ceil_fraction(x: Fraction) -> int:
    return -((-x.numerator) // x.denominator)


def loss_onset(fmt: str | Format, addend_magnitude: float, sum_magnitude: float) -> LossOnset:
    """Predict at which accumulation count ``N`` pre-scaled micro-gradients start to be lost.

    Model: with the 1/N loss scaling placed *before* backward, each micro-gradient arrives as
    ``g_i / N`` with ``|g_i| = addend_magnitude`` and is added to a running sum of magnitude about
    ``sum_magnitude`` (for gradients of consistent sign, the sum approaches ``mean g``).  Two
    mechanisms lose it:

    * absorption: round-to-nearest returns ``s`` unchanged when the addend is at most half the
      spacing at ``s``: ``RN(s + a) = s`` for ``|a| < ulp(s)/2``, and for ``|a| = ulp(s)/2`` when
      ``s`` is even (a tie).  Predicted ``N_abs = min{N >= 1 : g / N <= ulp(s)/2}
      = ceil(2 g / ulp(s))``, with ``ulp(s) = fmt.ulp(sum_magnitude)``, the spacing *above* ``|s|``.
    * underflow: ``g / N`` rounds to zero when ``g / N <= smallest_subnormal / 2`` (the tie goes to the
      even zero), ``N_und = ceil(2 g / smallest_subnormal)``; in a flush-to-zero format when
      ``g / N < smallest_normal`` (flush decided on the exact value),
      ``N_und = floor(g / smallest_normal) + 1``.

    Assumptions and limits: ``g / N`` is taken exactly (its own rounding to the format, which can
    move it across the threshold, is ignored); the sum's magnitude is fixed (it grows or shrinks in
    practice, moving ``ulp(s)``); an addend of the opposite sign to a power-of-two ``s`` sees the
    finer spacing below ``|s|`` and is absorbed from ``2 N_abs`` on; non-constant ``|g_i|`` needs
    ``addend_magnitude`` read as a typical magnitude.  The counts are exact integers (exact rational
    arithmetic), possibly astronomically large (``2**134`` for bf16 underflow of ``g = 1``).

    Args:
        fmt: The accumulation buffer's format.
        addend_magnitude: ``|g_i|`` before the 1/N scaling, finite and ``> 0``.
        sum_magnitude: Typical ``|s|`` of the running sum, finite, ``>= 0`` and at most ``fmt.max``.

    Returns:
        :class:`LossOnset` with both counts; ``.onset`` is their minimum.

    Raises:
        ValueError: Unknown format, or a value outside the ranges above (the message shows it).
    """
    fmt = get_format(fmt)
    g = _check_positive(addend_magnitude, "addend_magnitude")
    s = _check_nonneg(sum_magnitude, "sum_magnitude")
    if s > fmt.max:
        raise ValueError(f"sum_magnitude={sum_magnitude!r} exceeds the largest {fmt.name} number {fmt.max!r}")
    absorption = max(1, _ceil_fraction(2 * Fraction(g) / Fraction(fmt.ulp(s))))
    if fmt.subnormals:
        underflow = max(1, _ceil_fraction(2 * Fraction(g) / Fraction(fmt.smallest_subnormal)))
    else:
        ratio = Fraction(g) / Fraction(fmt.smallest_normal)
        underflow = ratio.numerator // ratio.denominator + 1
    return LossOnset(absorption=absorption, underflow=underflow)
