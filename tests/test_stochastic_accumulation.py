"""Stochastic accumulation rounds the EXACT sum ``s + t``, however far ``t`` lies below the buffer's spacing.

``s <- SR(s + t)`` must move the buffer to its upper neighbour with probability exactly
(s + t - down) / (up - down).  Forming ``s + t`` in a wide format first and rounding that to nearest
(fp32 for bf16/fp16/fp8, the old implementation) throws away every addend below about 2^-25 |s|
before the random decision sees it: the buffer then never moves.

Statistical tests: the buffer starts at ``start`` in every one of ``elements`` elements and takes
``adds`` adds of the same tiny addend; every add moves an element one step (one gap, the same gap
for all the steps the test allows, see ``Case``) with the exact probability ``p``, independently
(each add draws its own key), so the total number of steps is Binomial(elements * adds, p).  Each
case is an exact two-sided binomial test (``scipy.stats.binomtest``) with a fixed seed and a
false-positive rate of ``ALPHA = 1e-6``; ``elements * adds * p >= 20`` wherever the old behaviour
loses the addend, so the NEGATIVE CONTROL (the same test on the old rule, rounding the fp32 sum,
which sees 0 steps) fails it: P(0 steps) = exp(-20) < 2e-9 < ALPHA.

Bit tests: the compiled bf16 kernel and the torch code give the same bits (and lost counts) on tiny
addends, including the rare elements where the second random decision runs; both match an exact
(``fractions.Fraction``) reference of the documented rule.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import available_devices
from scipy import stats

import precision_lab as pl
from precision_lab import _native, _random, rounding
from precision_lab.formats import get_format
from precision_lab.strategies.stochastic import stochastic_step

ALPHA = 1e-6  # two-sided false-positive rate of every binomial test here
BF16 = get_format("bf16")
DBL_MAX = float.fromhex("0x1.fffffffffffffp+1023")


# --------------------------------------------------------------------------------------------------
# the binomial tests
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """``adds`` adds of ``addend`` to a buffer of ``elements`` copies of ``start``.

    One add moves an element by ``step`` (signed) with probability ``p``, exactly; ``max_steps``
    bounds the steps an element may take while the gap stays the same (the test asserts it).
    """

    fmt: str
    start: float
    addend: float
    step: float
    p: Fraction
    adds: int
    elements: int = 1 << 24
    max_steps: int = 100
    lost_in_fp32: bool = True  # the old rule (RN to fp32 first) loses this addend entirely

    @property
    def expected(self) -> float:
        return float(self.elements * self.adds * self.p)


CASES = {
    # bf16: 8 bits, gap 2 on [256, 512), 1 on [128, 256); the compiled kernel (>= MIN_NUMEL elements)
    "bf16 t=2^-30 s": Case("bf16", 256.0, 2.0**-22, 2.0, Fraction(1, 2**23), adds=12),
    "bf16 t=-2^-33 s, from a binade edge down": Case("bf16", 256.0, -(2.0**-25), -1.0, Fraction(1, 2**25), adds=64),
    "bf16 negative buffer, away from zero": Case("bf16", -256.0, -(2.0**-22), -2.0, Fraction(1, 2**23), adds=12),
    "bf16 negative buffer, toward zero over a binade edge": Case(
        "bf16", -256.0, 2.0**-22, 1.0, Fraction(1, 2**22), adds=6
    ),
    "bf16 top of a binade, up across its edge": Case(
        "bf16", 510.0, 2.0**-17, 2.0, Fraction(1, 2**18), adds=1, max_steps=1
    ),
    "bf16 subnormal addend": Case("bf16", 2.0**-105, 2.0**-133, 2.0**-112, Fraction(1, 2**21), adds=4),
    # fp16: 11 bits, gap 32 on [2^15, 2^16), 16 below 2^15; the sum is exact in fp64
    "fp16 t=2^-30 s": Case("fp16", 32768.0, 2.0**-15, 32.0, Fraction(1, 2**20), adds=2),
    "fp16 t=-2^-30 s, from a binade edge down": Case("fp16", 32768.0, -(2.0**-15), -16.0, Fraction(1, 2**19), adds=1),
    "fp16 negative buffer, t=-2^-32 s": Case("fp16", -32768.0, -(2.0**-17), -32.0, Fraction(1, 2**22), adds=5),
    # fp8_e5m2: 3 bits, gap 64 on [256, 512); 2^-16 is its smallest subnormal.  256 + 2^-16 is an fp32
    # tie that rounds back to 256 (2^-24 s, the largest ratio that fp32 loses).
    "fp8_e5m2 t=2^-24 s": Case("fp8_e5m2", 256.0, 2.0**-16, 64.0, Fraction(1, 2**22), adds=5),
    "fp8_e5m2 negative buffer, toward zero": Case(
        "fp8_e5m2", -384.0, 2.0**-16, 64.0, Fraction(1, 2**22), adds=5, max_steps=2
    ),
    # fp8_e4m3: every sum of two e4m3 numbers spans at most 19 bits, so fp32 held it exactly and the
    # old rule was right; the smallest addend relative to s is 2^-9 / 448.
    "fp8_e4m3 t=2^-17 s": Case(
        "fp8_e4m3", 256.0, 2.0**-9, 32.0, Fraction(1, 2**14), adds=1, elements=1 << 20, lost_in_fp32=False
    ),
    # tf32: 11 bits with fp32's range (the sum goes through TwoSum in fp64)
    "tf32 t=2^-30 s": Case("tf32", 1024.0, 2.0**-20, 1.0, Fraction(1, 2**20), adds=2),
    # fp64: fp64 itself loses 2^-60 next to 1; TwoSum keeps it
    "fp64 t=2^-60 s": Case(
        "fp64", 1.0, 2.0**-60, 2.0**-52, Fraction(1, 2**8), adds=1, elements=1 << 16, lost_in_fp32=False
    ),
}


def _steps(v: torch.Tensor, case: Case) -> int:
    """Total steps taken; asserts each element took a whole number of steps within its gap's range."""
    steps = (v - case.start) / case.step  # exact: format numbers, a power-of-two step
    assert bool((steps == torch.round(steps)).all()), "an element left the lattice start + k * step"
    assert bool((steps >= 0).all())
    assert int(steps.max()) <= case.max_steps
    return int(steps.sum())


def _accumulate(case: Case, seed: int) -> torch.Tensor:
    """The values after ``case.adds`` adds through ``Accumulator("stochastic", ...)``."""
    g = torch.Generator().manual_seed(seed)
    acc = pl.Accumulator("stochastic", case.fmt, (case.elements,), generator=g, count_lost=False)
    acc.add(torch.full((case.elements,), case.start, dtype=acc.dtype))  # exact: 0 + start
    t = torch.full((case.elements,), case.addend, dtype=acc.dtype)  # a number of the format
    for _ in range(case.adds):
        acc.add(t)
    return acc.value()


def _old_rule(case: Case, seed: int) -> torch.Tensor:
    """NEGATIVE CONTROL: the old behaviour, SR of the fp32 sum (rounded to nearest first).

    One key is drawn first, as the Accumulator's first add (0 + start) does, so both use the same keys.
    """
    g = torch.Generator().manual_seed(seed)
    _random.derive_key(g)
    s = torch.full((case.elements,), case.start, dtype=torch.float32)
    t = torch.full((case.elements,), case.addend, dtype=torch.float32)
    for _ in range(case.adds):
        s = pl.round_stochastic(s.float() + t.float(), case.fmt, generator=g)  # the old one-liner
    return s.double()


def _pvalue(k: int, case: Case) -> float:
    return stats.binomtest(k, case.elements * case.adds, float(case.p)).pvalue


@pytest.mark.parametrize("name", list(CASES))
def test_tiny_addends_move_the_buffer_with_the_exact_probability(name: str) -> None:
    """Exact binomial test of the steps, alpha = 1e-6 two-sided, fixed seed."""
    case = CASES[name]
    if case.lost_in_fp32:
        assert case.expected >= 20  # the test has the power to reject "never moves" (the old rule)
    k = _steps(_accumulate(case, seed=zlib.crc32(name.encode())), case)
    assert _pvalue(k, case) >= ALPHA, (k, case.expected)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.fmt != "fp64"])
def test_negative_control_the_fp32_sum_fails_the_same_test(name: str) -> None:
    """The old rule loses each addend below fp32's half-spacing: 0 steps, far below the expected >= 20.

    fp8_e4m3 is the exception that proves the rule: fp32 holds all its sums, so the old rule
    passes there (and gives the same bits: both round the same exact value with the same key).
    """
    case = CASES[name]
    k = _steps(_old_rule(case, seed=zlib.crc32(name.encode())), case)
    if case.lost_in_fp32:
        assert k == 0
        assert _pvalue(k, case) < ALPHA
    else:
        assert _pvalue(k, case) >= ALPHA
        assert torch.equal(_old_rule(case, seed=5), _accumulate(case, seed=5))


def test_bf16_torch_path_tiny_addend() -> None:
    """The torch code (kernels off: the CPU fallback, and what CUDA runs) on t = -2^-30 s.

    256 - 2^-22 lies 2^-22 below a binade edge where bf16's gap is 1: p = 2^-22, 5 adds of 2^24
    elements, expected 20 steps (down by 1 each); alpha = 1e-6 two-sided.
    """
    case = Case("bf16", 256.0, -(2.0**-22), -1.0, Fraction(1, 2**22), adds=5)
    with _native.disabled():
        k = _steps(_accumulate(case, seed=11), case)
    assert _pvalue(k, case) >= ALPHA, (k, case.expected)
    assert _pvalue(_steps(_old_rule(case, seed=11), case), case) < ALPHA  # negative control


@pytest.mark.parametrize(("addend", "p_inf"), [(2.0**970, Fraction(1, 2)), (2.0**969, Fraction(1, 4))])
def test_fp64_sum_past_the_largest_number(addend: float, p_inf: Fraction) -> None:
    """DBL_MAX + t lies between DBL_MAX and 2^1024 (Inf): P(Inf) = t / 2^971.

    DBL_MAX + 2^970 overflows fp64 (the tie rounds to even, i.e. to Inf), so the exact sum is taken
    at half scale.  alpha = 1e-6 two-sided; negative control: SR of the fp64 sum (Inf, or DBL_MAX)
    fails the same test.
    """
    m = 1 << 16
    acc = pl.Accumulator("stochastic", "fp64", (m,), generator=torch.Generator().manual_seed(3))
    acc.add(torch.full((m,), DBL_MAX, dtype=torch.float64))
    acc.add(torch.full((m,), addend, dtype=torch.float64))
    v = acc.value()
    assert bool(((v == DBL_MAX) | (v == math.inf)).all())
    k = int((v == math.inf).sum())
    assert stats.binomtest(k, m, float(p_inf)).pvalue >= ALPHA
    assert acc.nonfinite == k
    old = pl.round_stochastic(torch.full((m,), DBL_MAX, dtype=torch.float64) + addend, "fp64")
    assert stats.binomtest(int((old == math.inf).sum()), m, float(p_inf)).pvalue < ALPHA


# --------------------------------------------------------------------------------------------------
# bits: the compiled kernel, the torch code and the documented rule
# --------------------------------------------------------------------------------------------------
def _bf16(values: np.ndarray) -> torch.Tensor:
    """float64 values that are bf16 numbers, as a bf16 tensor (checked exact)."""
    t = torch.from_numpy(values).to(torch.bfloat16)
    assert torch.equal(t.double(), torch.from_numpy(values))
    return t


def _lanes(key: int, n: int) -> np.ndarray:
    return rounding.sr_bf16_random16(key, n, "cpu").numpy().astype(np.int64)


def _tip_inputs(n: int, key: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 (s, t) with t tiny next to s, crafted so that many elements reach the second decision.

    s = ±m 2^(e-7) (m: 8 bits) lies in [2^e, 2^(e+1)), its fp32 ulp is 2^(e-23).  The second
    decision runs where lo != 0 and L + r == 0xFFFF (L: the low 16 bits of the fp32 sum rounded
    down, r: the element's random lane).  Where r > 0xFF80, t = ±(L 2^sig + j) 2^(e-23-sig) with
    L = 0xFFFF - r puts L there: j < 2^(sig-1) rounds the fp32 sum down (lo > 0), j > 2^(sig-1) up
    (lo points toward zero, L comes from the sum's predecessor), j = 2^(sig-1) is a tie.  Where
    r == 0xFFFF a tiny t of s's sign gives L = 0, where r == 0 a tiny t of the other sign gives L =
    0xFFFF (and s is a power of two half of the time: a binade edge below it).  Other elements get
    a tiny t of either sign.  Tiny: 8 bits at 2^-17..2^-40 |s|, so every sum is exact in float64.
    """
    rng = np.random.default_rng(seed)
    r = _lanes(key, n)
    e = rng.integers(-40, 40, n)
    sign = rng.choice([-1.0, 1.0], n)
    m = rng.integers(128, 256, n)
    m[(r == 0) & (rng.random(n) < 0.5)] = 128
    s = sign * np.ldexp(m.astype(np.float64), e - 7)
    tiny = np.ldexp(rng.integers(128, 256, n).astype(np.float64), e - 7 - rng.integers(17, 41, n))
    t = sign * rng.choice([-1.0, 1.0], n) * tiny
    t = np.where(r == 0xFFFF, sign * tiny, t)
    t = np.where(r == 0, -sign * tiny, t)
    low = 0xFFFF - r
    crafted = (low >= 1) & (low < 127)
    safe_low = np.where(crafted, low, 1)
    sig_max = 7 - np.floor(np.log2(safe_low + 1)).astype(np.int64)  # (L + 1) 2^sig <= 2^8
    sig = 1 + (rng.integers(0, 1 << 20, n) % sig_max)
    j = 1 + (rng.integers(0, 1 << 20, n) % ((1 << sig) - 1))
    tc = sign * np.ldexp((safe_low * (1 << sig) + j).astype(np.float64), e - 23 - sig)
    t = np.where(crafted, tc, t)
    return _bf16(s), _bf16(t)


def _reference(s: torch.Tensor, t: torch.Tensor, key: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The documented rule in exact arithmetic: (bf16 bits of SR(s + t), tip mask, stepped mask).

    Alo = |s + t| rounded down to fp32, L its low 16 bits, r the lane: the result is the bf16
    truncation of Alo + r, one step higher where L + r == 0xFFFF, s + t is not an fp32 number and
    C holds: C = [U' < theta] xor [RN32(|s + t|) > |s + t|], theta = |s + t - RN32(s + t)| /
    ulp32(Alo), U' the 63-bit word of ``_random.pair_key(key)`` at the element's index.  Written
    with numpy casts and Fractions, not with the library's TwoSum.
    """
    x = s.double().numpy() + t.double().numpy()  # exact (see _tip_inputs)
    mag = np.abs(x)
    rn = mag.astype(np.float32)  # RN32
    alo = np.where(rn.astype(np.float64) > mag, np.nextafter(rn, np.float32(0)), rn)
    abits = alo.view(np.uint32).astype(np.int64)
    v = abits + _lanes(key, x.size)
    tip = ((v & 0xFFFF) == 0xFFFF) & (alo.astype(np.float64) != mag)
    stepped = np.zeros_like(tip)
    pkey = _random.pair_key(key)
    for i in np.nonzero(tip)[0]:
        exact = abs(Fraction(float(s[i])) + Fraction(float(t[i])))
        nearest = Fraction(float(rn[i]))
        theta = abs(exact - nearest) / Fraction(2) ** (max(int(abits[i] >> 23), 1) - 150)
        w = _random.splitmix64_int(pkey, int(i)) >> 1
        assert w != theta * 2**63  # a tie of the first word (probability 2^-63) would need the next one
        stepped[i] = (w < theta * 2**63) != (nearest > exact)
    bits = ((v + stepped) >> 16) | np.where(x < 0, 0x8000, 0)
    return bits.astype(np.uint16), tip, stepped


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1).view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("n", [5, 1023, 3 * _native._CHUNK + 7, 1 << 20])
def test_kernel_and_torch_code_give_the_same_bits_on_tiny_addends(n: int) -> None:
    """The compiled kernel and the torch code: the documented rule's bits, the same lost counts."""
    key = 2**61 + n
    s, t = _tip_inputs(n, key, seed=n)
    expected, tip, stepped = _reference(s, t, key)
    with _native.disabled():
        torch_path = s.clone()
        lost_torch = stochastic_step(torch_path, t, BF16, key, True)
    np.testing.assert_array_equal(_bits(torch_path), expected)
    if n >= _native.MIN_NUMEL:
        assert _native.enabled()  # the default path for this size is the kernel
        kernel = s.clone()
        assert stochastic_step(kernel, t, BF16, key, True) == lost_torch
        np.testing.assert_array_equal(_bits(kernel), expected)
    direct = s.clone()  # the kernel called directly, also below MIN_NUMEL
    assert _native.sr_add_bf16(direct, t, key, True) == lost_torch
    np.testing.assert_array_equal(_bits(direct), expected)
    assert lost_torch == int((torch.from_numpy(expected.view(np.int16)) == s.view(torch.int16)).sum())
    if n == 1 << 20:  # the crafted inputs reach the second decision, and it goes both ways
        assert int((tip & stepped).sum()) > 100
        assert int((tip & ~stepped).sum()) > 100


@pytest.mark.parametrize("device", available_devices())
def test_same_bits_on_every_device(device: str) -> None:
    """The torch code on ``device`` gives the CPU bits on tiny addends (CUDA: the same rule)."""
    n, key = 3 * _native._CHUNK + 7, 12345
    s, t = _tip_inputs(n, key, seed=7)
    cpu = s.clone()
    stochastic_step(cpu, t, BF16, key, False)
    dev = s.to(device)
    stochastic_step(dev, t.to(device), BF16, key, False)
    np.testing.assert_array_equal(_bits(dev.cpu()), _bits(cpu))


# --------------------------------------------------------------------------------------------------
# the fp64 pair path (tf32, fp32, fp64 and wide custom formats)
# --------------------------------------------------------------------------------------------------
def _neighbours(x: Fraction, fmt: str) -> tuple[Fraction, Fraction]:
    """The numbers of ``fmt`` at or below and at or above |x| (x != 0, below 2^(emax+1)), exactly."""
    f = get_format(fmt)
    a = abs(x)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1  # now 2^e <= a < 2^(e+1)
    q = Fraction(2) ** (max(e, f.emin) - f.mantissa_bits)
    down = math.floor(a / q) * q
    return down, down + q if down != a else down


@pytest.mark.parametrize("fmt", ["tf32", "fp32", "fp64", "e11m10"])
def test_pair_path_rounds_hi_where_the_sum_is_exact_and_to_a_neighbour_elsewhere(fmt: str) -> None:
    """Where TwoSum's lo is 0, the bits of rounding hi; elsewhere a neighbour of the exact sum; compiled or not."""
    f = get_format(fmt)
    n = 5000  # above the size where rounding uses its compiled generic kernel
    g = torch.Generator().manual_seed(1)
    a = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-8, 8, (n,), generator=g).double())
    a = pl.round_nearest(a, f)
    b = a * torch.exp2(-torch.randint(10, 90, (n,), generator=g).double())
    b = pl.round_nearest(pl.round_nearest(b, "e11m7"), f)  # 8 bits: some sums are exact, some not
    b = torch.where(torch.rand(n, generator=g) < 0.5, b, -b)
    got = rounding.round_stochastic_sum_keyed(a, b, f, 99)
    with _native.disabled():
        assert torch.equal(rounding.round_stochastic_sum_keyed(a, b, f, 99).view(torch.int64), got.view(torch.int64))
    hi = a + b
    exact = torch.tensor(
        [Fraction(x) + Fraction(y) == Fraction(h) for x, y, h in zip(a.tolist(), b.tolist(), hi.tolist(), strict=True)]
    )
    assert 100 < int(exact.sum()) < n - 100
    want = rounding.round_stochastic_keyed(hi, f, 99)
    assert torch.equal(got[exact].view(torch.int64), want[exact].view(torch.int64))
    for i in torch.nonzero(~exact).squeeze(1).tolist():
        x = Fraction(float(a[i])) + Fraction(float(b[i]))
        assert abs(Fraction(float(got[i]))) in _neighbours(x, fmt)
        assert (got[i] < 0) == (x < 0)


@pytest.mark.parametrize(("lo", "p_up"), [(2.0**-54, Fraction(5, 8)), (-(2.0**-54), Fraction(3, 8))])
def test_pair_path_both_decisions_together(lo: float, p_up: Fraction) -> None:
    """Both stages matter where the format is one bit short of fp64 (e11m51: gap 2^-51 at 1).

    hi = 1 + 2^-52 sits half-way between 1 and 1 + 2^-51 (f0 = 1/2, g = 1/2), and lo = ±2^-54 moves
    the exact sum by a quarter of g: P(up) = 1/2 ± 1/8.  Exact binomial test, alpha = 1e-6
    two-sided, 2^18 elements; negative control: rounding hi alone (the fp64 sum) gives 1/2 and fails.
    """
    f, n = get_format("e11m51"), 1 << 18
    a = torch.full((n,), 1 + 2.0**-52, dtype=torch.float64)
    b = torch.full((n,), lo, dtype=torch.float64)
    got = rounding.round_stochastic_sum_keyed(a, b, f, 4321)
    assert bool(((got == 1.0) | (got == 1 + 2.0**-51)).all())
    assert stats.binomtest(int((got > 1).sum()), n, float(p_up)).pvalue >= ALPHA
    old = rounding.round_stochastic_keyed(a + b, f, 4321)
    assert stats.binomtest(int((old > 1).sum()), n, float(p_up)).pvalue < ALPHA


@pytest.mark.parametrize("fmt", ["fp32", "fp64"])
def test_nonfinite_and_overflow_through_the_pair_path(fmt: str) -> None:
    """IEEE's Inf/NaN rules; sums at or past 2^(emax+1) (also where fp64 overflows) become ±Inf."""
    f = get_format(fmt)
    big, top = f.max, math.ldexp(1.0, f.emax - f.mantissa_bits)  # max + top = 2^(emax+1)
    inf, nan = math.inf, math.nan
    a = torch.tensor([inf, -inf, inf, nan, 1.0, big, -big, big, -big], dtype=torch.float64)
    b = torch.tensor([1.0, -(2.0**-100), -inf, 1.0, nan, big, -big, top, -top], dtype=torch.float64)
    got = rounding.round_stochastic_sum_keyed(a, b, f, 5).tolist()
    want = [inf, -inf, nan, nan, nan, inf, -inf, inf, -inf]
    assert all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(got, want, strict=True)), got
