"""The neumaier strategy (Kahan-Babuška summation, sum and compensation in the format), bit for bit.

Three independent checks of :mod:`precision_lab.strategies.neumaier`:

* hand-computed cases (bf16, fp16, fp8, fp64): every intermediate written out in the comments;
* a scalar reference written from the definition with an exact rounding oracle (``fractions.Fraction``
  arithmetic, ties to even, formats written down from their parameters here, not from
  :mod:`precision_lab.formats`), compared on bit patterns for random streams of every format; and a
  plain Python-float version of the same steps for fp64 (Python's ``+`` is IEEE round-to-nearest);
* lost updates counted by hand.

Comparisons are exact (bit patterns or ``==`` on floats and Fractions); no tolerance is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import available_devices

import precision_lab as pl
from precision_lab.strategies import BUILTIN_STRATEGIES, get_strategy
from precision_lab.strategies.neumaier import Neumaier, neumaier_step
from precision_lab.training import GradientAccumulator

# --------------------------------------------------------------------------------------------------
# the oracle: formats written down here, exact rational arithmetic
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A binary format: precision p (implicit bit counted), smallest normal exponent, largest number."""

    p: int
    emin: int
    max: float
    has_inf: bool  # overflow gives ±Inf; otherwise NaN (fp8_e4m3)


SPECS: dict[str, Spec] = {
    "bf16": Spec(8, -126, float.fromhex("0x1.fep+127"), True),
    "fp16": Spec(11, -14, 65504.0, True),
    "fp8_e4m3": Spec(4, -6, 448.0, False),
    "fp8_e5m2": Spec(3, -14, 57344.0, True),
    "tf32": Spec(11, -126, float.fromhex("0x1.ffcp+127"), True),
    "e5m7": Spec(8, -14, 65280.0, True),
    "fp32": Spec(24, -126, float.fromhex("0x1.fffffep+127"), True),
    "fp64": Spec(53, -1022, float.fromhex("0x1.fffffffffffffp+1023"), True),
}


def round_to(x: Fraction, spec: Spec) -> float:
    """RN (ties to even) of an exact nonzero-or-zero rational into ``spec``; IEEE overflow."""
    if x == 0:
        return 0.0
    a = abs(x)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    e = e if a >= Fraction(2) ** e else e - 1  # floor(log2 a), exactly
    q = Fraction(2) ** (max(e, spec.emin) - spec.p + 1)  # the spacing in a's binade (subnormal quantum below)
    mag = round(a / q) * q  # Fraction.__round__: half to even
    overflow = math.inf if spec.has_inf else math.nan
    mag_f = overflow if mag > Fraction(spec.max) else float(mag)  # float: exact (<= 53 bits, in range)
    return -mag_f if x < 0 else mag_f


def rn_add(a: float, b: float, spec: Spec) -> float:
    """RN_spec(a + b); a non-finite operand follows IEEE (Python's float + on ±Inf/NaN)."""
    if not (math.isfinite(a) and math.isfinite(b)):
        r = a + b
        return r if spec.has_inf or math.isnan(r) else math.nan
    exact = Fraction(a) + Fraction(b)
    if exact == 0:  # an exact zero sum is +0 unless both operands are -0
        return -0.0 if math.copysign(1.0, a) < 0 and math.copysign(1.0, b) < 0 else 0.0
    return round_to(exact, spec)


@dataclass
class Ref:
    """The reference's final state and counts."""

    s: float
    c: float
    lost: int
    branches: tuple[int, int]  # steps with |s| >= |t|, steps with |s| < |t|

    @property
    def value(self) -> float:
        return self.s + self.c  # Python's float + is the fp64 RN read-out


def ref_neumaier(ts: list[float], spec: Spec) -> Ref:
    """The definition, step by step: ``ts`` are numbers of the format already (no input rounding).

    Also checks Fast2Sum's claim on every finite step: the correction d is exactly (s + t) - u.
    """
    s = c = 0.0
    lost, first, second = 0, 0, 0
    for t in ts:
        u = rn_add(s, t, spec)
        if abs(s) >= abs(t):
            d = rn_add(rn_add(s, -u, spec), t, spec)
            first += 1
        else:
            d = rn_add(rn_add(t, -u, spec), s, spec)
            second += 1
        if math.isfinite(u):
            assert Fraction(d) == Fraction(s) + Fraction(t) - Fraction(u)  # Fast2Sum: the error, exactly
        new_c = rn_add(c, d, spec)
        lost += u == s and new_c == c and t != 0 and math.isfinite(t) and math.isfinite(s)
        s, c = u, new_c
    return Ref(s, c, lost, (first, second))


def neumaier_floats(xs: list[float]) -> tuple[float, float]:
    """fp64 Neumaier with Python floats (IEEE RN): (s, c); read-out s + c."""
    s = c = 0.0
    for x in xs:
        u = s + x
        c += (s - u) + x if abs(s) >= abs(x) else (x - u) + s
        s = u
    return s, c


def bits(t: torch.Tensor) -> list[int]:
    """fp64 bit patterns (-0 != +0), every NaN mapped to one pattern (payloads are unspecified)."""
    t = t.detach().to("cpu", torch.float64)
    return torch.where(torch.isnan(t), torch.full_like(t, math.nan), t).view(torch.int64).tolist()


def as_bits(values: list[float]) -> list[int]:
    return bits(torch.tensor(values, dtype=torch.float64))


def feed(fmt: str, rows: list[list[float]], device: str = "cpu") -> pl.Accumulator:
    """An Accumulator('neumaier', fmt) fed the rows (fp64 tensors) in order."""
    acc = pl.Accumulator("neumaier", fmt, (len(rows[0]),), device=device)
    for row in rows:
        acc.add(torch.tensor(row, dtype=torch.float64, device=device))
    return acc


def state(acc: pl.Accumulator) -> tuple[list[float], list[float]]:
    """(s, c) of a neumaier buffer as fp64 lists."""
    return acc.raw_sum().tolist(), acc._unit.compensation.double().tolist()


# --------------------------------------------------------------------------------------------------
# registration, memory
# --------------------------------------------------------------------------------------------------


def test_registered_after_kahan() -> None:
    assert get_strategy("neumaier") is Neumaier
    assert BUILTIN_STRATEGIES == pl.STRATEGIES == ("naive", "kahan", "neumaier", "stochastic", "pairwise", "exact")


@pytest.mark.parametrize(
    ("fmt", "nominal", "storage"),
    [
        ("bf16", 4.0, 4),
        ("fp16", 4.0, 4),
        ("fp8_e4m3", 2.0, 8),
        ("fp8_e5m2", 2.0, 8),
        ("e5m7", 26 / 8, 8),
        ("fp64", 16.0, 16),
    ],
)
def test_two_arrays_of_the_format(fmt: str, nominal: float, storage: int) -> None:
    acc = pl.Accumulator("neumaier", fmt, (3,))
    acc.add(torch.ones(3))
    assert acc.arrays == 2
    assert acc.bytes_per_element == nominal  # two numbers of the format per element
    assert acc.storage_bytes_per_element == storage  # fp8 and e5m7 live in fp32 work arrays
    assert acc.bytes_per_element == pl.Accumulator("kahan", fmt, (3,)).bytes_per_element


# --------------------------------------------------------------------------------------------------
# hand-computed cases
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "big"),
    [("fp64", 1e100), ("bf16", 1024.0), ("fp16", 4096.0), ("fp8_e4m3", 256.0), ("fp8_e5m2", 1024.0)],
)
def test_one_big_one_minus_big_sums_to_two(fmt: str, big: float) -> None:
    """[1, B, 1, -B] with 1 below half an ulp of B: exactly 2; Kahan's compensation loses both ones.

    Neumaier: t = B: u = RN(1 + B) = B, |s| = 1 < B: d = RN(RN(B - B) + 1) = 1, c = 1.  t = 1:
    u = B, |s| = B >= 1: d = RN(RN(B - B) + 1) = 1, c = 2.  t = -B: u = 0, d = RN(RN(B - 0) - B) = 0.
    Read-out 0 + 2 = 2.  Kahan: y = B, u = B, c = RN(RN(B - 1) - B) = RN(B - B) = 0 (the 1 is gone,
    as RN(u - s) is not exact when |t| > |s|); then y = 1, u = B, c = RN(RN(B - B) - 1) = -1; then
    y = RN(-B + 1) = -B, u = 0, c = RN(RN(0 - B) + B) = 0: the read-out is 0.
    """
    xs = [1.0, big, 1.0, -big]
    acc = feed(fmt, [[x] for x in xs])
    assert bits(acc.value()) == as_bits([2.0])
    assert state(acc) == ([0.0], [2.0])
    assert acc.lost_updates == 0  # each add moved s or c
    kahan = pl.Accumulator("kahan", fmt, (1,))
    for x in xs:
        kahan.add(torch.tensor([x], dtype=torch.float64))
    assert kahan.value().tolist() == [0.0]
    if fmt == "fp64":
        assert neumaier_floats(xs) == (0.0, 2.0)
        assert sum(xs) == 0.0
        assert math.fsum(xs) == 2.0


def test_bf16_inexact_correction_branch_by_hand() -> None:
    """|s| < |t| with an error that is not the small operand: s = 1 + 2^-7, t = 256 (bf16, p = 8).

    u = RN(257.0078125) = 258 (spacing 2 at 256; 257.0078125 is nearer 258).  Branch |s| < |t|:
    d = RN(RN(256 - 258) + 1.0078125) = RN(-0.9921875) = -0.9921875 = -127/128, exact (7 bits), and
    indeed (s + t) - u = -0.9921875.  Read-out 258 - 0.9921875 = 257.0078125, the exact sum.
    Kahan: y = 256, u = 258, c = RN(RN(258 - 1.0078125) - 256) = RN(256 - 256) = 0: read-out 258.
    """
    acc = feed("bf16", [[1.0078125], [256.0]])
    assert state(acc) == ([258.0], [-0.9921875])
    assert bits(acc.value()) == as_bits([257.0078125])
    kahan = pl.Accumulator("kahan", "bf16", (1,))
    for x in (1.0078125, 256.0):
        kahan.add(torch.tensor([x], dtype=torch.float64))
    assert kahan.value().tolist() == [258.0]


def test_fp16_subnormal_correction_by_hand() -> None:
    """fp16: 2^-24 (the smallest subnormal), then 1: u = 1, d = RN(RN(1 - 1) + 2^-24) = 2^-24."""
    acc = feed("fp16", [[2.0**-24, -(2.0**-24)], [1.0, 1.0]])
    assert state(acc) == ([1.0, 1.0], [2.0**-24, -(2.0**-24)])
    assert bits(acc.value()) == as_bits([1.0 + 2.0**-24, 1.0 - 2.0**-24])  # exact in fp64


@pytest.mark.parametrize(("fmt", "p"), [("bf16", 8), ("fp16", 11), ("fp8_e4m3", 4), ("fp8_e5m2", 3)])
def test_ones_stall_at_twice_two_to_the_precision(fmt: str, p: int) -> None:
    """Adding 1 N times: the read-out is min(N, 2^(p+1)), the lost updates max(0, N - 2^(p+1)).

    s stops at 2^p (2^p + 1 ties to the even 2^p), then every 1 goes to c exactly
    (d = RN(RN(2^p - 2^p) + 1) = 1), until c stops at 2^p too; after that s and c are both unchanged.

    Kahan, in contrast, feeds c back into s and sums 2^(p+1) + 3 ones exactly in bf16 and fp16.
    """
    stall = 2 ** (p + 1)
    n = stall + 3
    acc = pl.Accumulator("neumaier", fmt, (1,))
    for k in range(1, n + 1):
        acc.add(torch.ones(1))
        assert acc.value().item() == min(k, stall), k
        assert acc.lost_updates == max(0, k - stall), k
    assert state(acc) == ([2.0**p], [2.0**p])
    if p >= 8:
        kahan = pl.Accumulator("kahan", fmt, (1,))
        for _ in range(n):
            kahan.add(torch.ones(1))
        assert kahan.value().item() == n


def test_lost_updates_by_hand_mixed() -> None:
    """bf16, three elements, counted by hand.

    Element 0: 256 then 2^-20: u = 256, d = RN(RN(256 - 256) + 2^-20) = 2^-20, c moves: not lost.
    Element 1: 256 then 0: adding 0 is never counted.
    Element 2: 1 then 1: u = 2: not lost.
    Then element 0 gets 2^-40: u = 256, d = 2^-40, c = RN(2^-20 + 2^-40) = 2^-20: s and c unchanged, lost.
    """
    acc = pl.Accumulator("neumaier", "bf16", (3,))
    acc.add(torch.tensor([256.0, 256.0, 1.0]))
    acc.add(torch.tensor([2.0**-20, 0.0, 1.0]))
    assert acc.lost_updates == 0
    acc.add(torch.tensor([2.0**-40, 0.0, 0.0]))
    assert acc.lost_updates == 1
    assert state(acc) == ([256.0, 256.0, 2.0], [2.0**-20, 0.0, 0.0])
    assert acc.lost_update_fraction == 1 / 9


def test_count_lost_false_same_bits() -> None:
    rows = [[1.0, 1024.0, 3.0], [1024.0, 1.0, 2.0**-12], [1.0, -1024.0, 5.0]]
    counted, uncounted = feed("bf16", rows), pl.Accumulator("neumaier", "bf16", (3,), count_lost=False)
    for row in rows:
        uncounted.add(torch.tensor(row, dtype=torch.float64))
    assert bits(uncounted.value()) == bits(counted.value())
    assert uncounted.lost_updates == 0


def test_scaled_value_scales_sum_and_compensation_separately() -> None:
    """bf16 s = 258, c = -0.9921875 (the hand case above): x 1/2 gives 129 + -0.49609375 (both exact).

    x 2^-133: s becomes 258 * 2^-133 = (129/128) * 2^-125, a normal bf16 number (8 bits), while
    c * 2^-133 = -(127/128) * 2^-133 lies just above the smallest subnormal 2^-133 in magnitude and
    rounds to -2^-133; the fp64 sum 257 * 2^-133 is exact.
    """
    acc = feed("bf16", [[1.0078125], [256.0]])
    assert acc.scaled_value(0.5).tolist() == [129.0 - 0.49609375]
    tiny = acc.scaled_value(2.0**-133)
    assert tiny.tolist() == [258.0 * 2.0**-133 - 2.0**-133]
    assert acc.value().tolist() == [257.0078125]  # the buffer itself is unchanged


def test_neumaier_step_is_the_kernel() -> None:
    """The pure kernel on bare tensors gives the Accumulator's state and count."""
    f = pl.get_format("bf16")
    s = torch.tensor([1.0078125, 256.0], dtype=torch.bfloat16)
    c = torch.zeros(2, dtype=torch.bfloat16)
    lost = neumaier_step(s, c, torch.tensor([256.0, 2.0**-20], dtype=torch.bfloat16), f, True)
    assert (s.tolist(), c.tolist(), lost) == ([258.0, 256.0], [-0.9921875, 2.0**-20], 0)


# --------------------------------------------------------------------------------------------------
# against the oracle: random streams of every format, both branches
# --------------------------------------------------------------------------------------------------


def format_stream(fmt: str, steps: int, width: int, seed: int) -> np.ndarray:
    """(steps, width) numbers of the format, rounded with the oracle.

    Random signs and exponents over 2p + 6 binades: both branches, cancellation, and subnormals for
    the formats whose normal range starts near the top exponent used.
    """
    spec = SPECS[fmt]
    rng = np.random.default_rng(seed)
    top = min(spec.emin + 4 * spec.p, 10)  # keeps every partial sum far from overflow
    exps = rng.integers(top - 2 * spec.p - 6, top + 1, size=(steps, width))
    mant = rng.random((steps, width)) + 1.0
    signs = rng.choice([-1.0, 1.0], size=(steps, width))
    raw = signs * np.ldexp(mant, exps)
    return np.vectorize(lambda v: round_to(Fraction(float(v)), spec))(raw)


@pytest.mark.parametrize("fmt", list(SPECS))
@pytest.mark.parametrize("device", available_devices())
def test_random_streams_match_the_oracle_bit_for_bit(fmt: str, device: str) -> None:
    steps, width = 60, 8
    x = format_stream(fmt, steps, width, seed=sum(map(ord, fmt)))
    acc = feed(fmt, x.tolist(), device=device)
    refs = [ref_neumaier(x[:, j].tolist(), SPECS[fmt]) for j in range(width)]
    s, c = state(acc)
    assert as_bits(s) == as_bits([r.s for r in refs])
    assert as_bits(c) == as_bits([r.c for r in refs])
    assert bits(acc.value()) == as_bits([r.value for r in refs])
    assert acc.lost_updates == sum(r.lost for r in refs)
    first, second = (sum(r.branches[k] for r in refs) for k in (0, 1))
    assert first > width  # both branches taken, not only at the first step
    assert second > width
    if fmt == "fp64":  # a second, float-only reference: Python's + is IEEE RN in fp64
        for j, r in enumerate(refs):
            assert neumaier_floats(x[:, j].tolist()) == (r.s, r.c)


def test_the_comparison_would_catch_a_missing_branch() -> None:
    """Negative control: the step without the branch differs from the library on the same stream.

    Always ``d = RN(RN(s - u) + t)`` (Fast2Sum without putting the larger operand first): the bit
    comparison of the oracle test would fail on it.
    """
    spec = SPECS["bf16"]
    x = format_stream("bf16", 60, 8, seed=sum(map(ord, "bf16")))
    acc = feed("bf16", x.tolist())
    wrong = []
    for j in range(x.shape[1]):
        s = c = 0.0
        for t in x[:, j].tolist():
            u = rn_add(s, t, spec)
            c = rn_add(c, rn_add(rn_add(s, -u, spec), t, spec), spec)
            s = u
        wrong.append(s + c)
    assert as_bits(wrong) != bits(acc.value())


def test_stagnating_stream_matches_the_oracle() -> None:
    """2^(p+1), then 2^p + 10 ones, then -2^(p+1) and 40 x 0.75: state and lost updates of the oracle.

    Every 1 is absorbed by s = 2^(p+1) and goes to c exactly; c reaches 2^p after 2^p of them, and
    the last 10 leave s and c unchanged (10 lost updates); the 0.75s then round in s.
    """
    for fmt, p in (("fp8_e5m2", 3), ("fp8_e4m3", 4), ("bf16", 8)):
        ts = [2.0 ** (p + 1)] + [1.0] * (2**p + 10) + [-(2.0 ** (p + 1))] + [0.75] * 40
        acc = feed(fmt, [[t] for t in ts])
        ref = ref_neumaier(ts, SPECS[fmt])
        assert (acc.raw_sum().item(), acc._unit.compensation.item(), acc.lost_updates) == (ref.s, ref.c, ref.lost)
        assert ref.lost >= 10


def test_nonfinite_follow_the_definition() -> None:
    """bf16: NaN, +Inf, -Inf then 1; and an overflow.  Inf: u = Inf, |s| < |t| (0 < Inf), d = RN(Inf - Inf) = NaN."""
    acc = feed("bf16", [[math.nan, math.inf, -math.inf, 1.0], [1.0, 1.0, 1.0, 1.0]])
    refs = [ref_neumaier([t, 1.0], SPECS["bf16"]) for t in (math.nan, math.inf, -math.inf, 1.0)]
    assert bits(acc.value()) == as_bits([r.value for r in refs])
    assert acc.value()[3].item() == 2.0
    assert (acc.nonfinite_inputs, acc.nonfinite) == (3, 3)
    over = feed("fp16", [[60000.0], [60000.0]])  # 120000 > 65504 + 16: u = Inf, c = RN(RN(60000 - Inf) + 60000) = -Inf
    assert (over.nonfinite, over.lost_updates) == (1, 0)
    assert state(over) == ([math.inf], [-math.inf])


# --------------------------------------------------------------------------------------------------
# GradientAccumulator
# --------------------------------------------------------------------------------------------------


def test_gradient_accumulator_with_neumaier_equals_a_standalone_accumulator() -> None:
    """fp32 parameters, bf16 Neumaier buffer: p.grad == RN_fp32(Accumulator fed the same micro-gradients)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 4, generator=gen) * 100 for _ in range(8)]
    grads = []
    for x in xs:  # the micro-gradients, by separate autograd.grad calls
        grads.append(torch.autograd.grad((model(x) ** 2).sum(), list(model.parameters())))
    refs = [pl.Accumulator("neumaier", "bf16", p.shape) for p in model.parameters()]
    for g in grads:
        for ref, gi in zip(refs, g, strict=True):
            ref.add(gi)
    with GradientAccumulator(model.parameters(), strategy="neumaier", fmt="bf16", count_lost=True) as acc:
        for x in xs:
            (model(x) ** 2).sum().backward()
        assert acc.bytes_per_element == 4.0
        stats = acc.write_grads()
    assert stats["micro_steps"] == 8
    assert stats["lost_updates"] == sum(r.lost_updates for r in refs)
    for p, ref in zip(model.parameters(), refs, strict=True):
        expected = pl.round_nearest(ref.value(), "fp32").to(torch.float32)
        assert torch.equal(p.grad.view(torch.int32), expected.view(torch.int32))
    assert any(bool((r._unit.compensation != 0).any()) for r in refs)  # the compensation did something
