"""The exact strategy: the superaccumulator against ``fractions.Fraction``, bit for bit.

The reference (:func:`reference`) sums the addends as Fractions, multiplies by the factor exactly,
and rounds once with Python's ``float(Fraction)``, which is correctly rounded (to nearest, ties to
even) and raises OverflowError exactly where IEEE rounding gives ±inf.  On top of that it applies
the rules the accumulator documents: any NaN addend, or +inf and -inf both, give NaN; one infinity
gives itself; an exactly zero sum is +0.0 unless every addend was -0.0; a nonzero product that
rounds to zero keeps its sign.  Every comparison is on the bit pattern (a NaN matches any NaN).

Run ``HYPOTHESIS_PROFILE=dev`` for more examples; ``-m slow`` for the 2^20-term stream through
``Accumulator.add``.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch
from conftest import available_devices
from hypothesis import given, settings
from hypothesis import strategies as st

import precision_lab as pl
from precision_lab.formats import get_format
from precision_lab.strategies import exact
from precision_lab.strategies.exact import MAX_DIGITS, Exact, SuperAccumulator, exact_step, round_magnitude

MAX = float.fromhex("0x1.fffffffffffffp+1023")
TINY = math.ldexp(1.0, -1074)  # the smallest subnormal
SMALLEST_NORMAL = math.ldexp(1.0, -1022)
CPU = torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------------------------------
def _is_negative_zero(x: float) -> bool:
    return x == 0 and math.copysign(1.0, x) < 0


def reference(xs: list[float], factor: float = 1.0) -> float:
    """The correctly rounded ``factor * sum(xs)`` under the rules of the module docstring."""
    if any(math.isnan(x) for x in xs) or (math.inf in xs and -math.inf in xs):
        return math.nan
    if math.inf in xs or -math.inf in xs:
        return (math.inf if math.inf in xs else -math.inf) * factor  # inf * 0 = NaN
    total = sum(map(Fraction, xs), Fraction(0))
    if total == 0:
        zero = -0.0 if xs and all(map(_is_negative_zero, xs)) else 0.0
        return zero * factor
    if factor == 0:
        return (0.0 if total > 0 else -0.0) * factor
    product = total * Fraction(factor)
    try:
        rounded = float(product)
    except OverflowError:
        return math.inf if product > 0 else -math.inf
    return rounded if rounded != 0 else (0.0 if product > 0 else -0.0)


def same_bits(got: list[float], want: list[float]) -> bool:
    """Bit-pattern equality, element by element; a NaN matches any NaN."""
    if len(got) != len(want):
        return False
    for g, w in zip(got, want, strict=True):
        if math.isnan(w):
            if not math.isnan(g):
                return False
        elif g != w or math.copysign(1.0, g) != math.copysign(1.0, w):
            return False
    return True


def assert_exact(got: torch.Tensor, columns: list[list[float]], factor: float = 1.0) -> None:
    want = [reference(col, factor) for col in columns]
    values = got.double().cpu().reshape(-1).tolist()
    assert same_bits(values, want), [(g, w) for g, w in zip(values, want, strict=True) if not same_bits([g], [w])]


def accumulate(rows: list[list[float]], *, device: str = "cpu", fmt: str = "fp64") -> pl.Accumulator:
    acc = pl.Accumulator("exact", fmt, (len(rows[0]) if rows else 1,), device=device)
    for row in rows:
        acc.add(torch.tensor(row, dtype=torch.float64, device=device))
    return acc


def columns(rows: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*rows, strict=True)]


# --------------------------------------------------------------------------------------------------
# hypothesis strategies: fp64 numbers over the whole range, and streams that cancel
# --------------------------------------------------------------------------------------------------
finite = st.floats(allow_nan=False, allow_infinity=False)  # every finite fp64: subnormals, ±0, max
subnormal = st.integers(-(2**52) + 1, 2**52 - 1).map(lambda m: math.ldexp(float(m), -1074))


@st.composite
def spread(draw: st.DrawFn) -> float:
    """A number of uniformly drawn binade, 2^1023 down to the subnormals, any sign and significand."""
    e = draw(st.integers(-1074, 1023))
    m = draw(st.integers(2**52, 2**53 - 1))
    x = math.ldexp(float(m), e - 52)  # rounds (correctly) into the subnormals where e is small
    return -x if draw(st.booleans()) else x


number = st.one_of(finite, spread(), subnormal, st.sampled_from([0.0, -0.0, TINY, -TINY, MAX, -MAX, 1.0]))


@st.composite
def near(draw: st.DrawFn, centre: int) -> float:
    """A number within 2^60 of 2^centre (a narrow window anywhere in the range), any sign, or zero."""
    e = draw(st.integers(max(centre - 60, -1074), min(centre + 60, 1023)))
    m = draw(st.integers(2**52, 2**53 - 1))
    x = math.ldexp(float(m), e - 52) if draw(st.integers(0, 9)) else 0.0
    return -x if draw(st.booleans()) else x


@st.composite
def cancelling(draw: st.DrawFn, width: int) -> list[list[float]]:
    """Rows of ``width`` numbers; most also appear negated, in a random order: the sum is the rest.

    The numbers come from the whole range, or (half the time) from a narrow window around a random
    binade, so that every digit the accumulator holds can be the top or the bottom one.
    """
    n = draw(st.integers(1, 12))
    source = draw(st.one_of(st.just(number), st.integers(-1074, 1023).map(near)))
    rows = [[draw(source) for _ in range(width)] for _ in range(n)]
    twins = [[-x for x in row] for row in rows if draw(st.booleans())]
    leftover = st.one_of(spread(), subnormal) if source is number else source
    rest = [[draw(leftover) for _ in range(width)] for _ in range(draw(st.integers(0, 3)))]
    every = rows + twins + rest
    order = draw(st.permutations(range(len(every))))
    return [every[i] for i in order]


# --------------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------------
@given(
    rows=st.integers(1, 4).flatmap(
        lambda w: st.lists(st.lists(number, min_size=w, max_size=w), min_size=1, max_size=20)
    )
)
def test_any_finite_stream_is_summed_exactly(rows: list[list[float]]) -> None:
    assert_exact(accumulate(rows).value(), columns(rows))


@given(rows=st.integers(1, 4).flatmap(cancelling))
def test_cancellation_across_the_whole_exponent_range(rows: list[list[float]]) -> None:
    assert_exact(accumulate(rows).value(), columns(rows))


@given(rows=st.lists(st.lists(subnormal, min_size=3, max_size=3), min_size=1, max_size=30))
def test_subnormal_sums_are_exact(rows: list[list[float]]) -> None:
    """Sums of subnormals are multiples of 2^-1074: exact (and subnormal) unless they reach 2^-1022."""
    assert_exact(accumulate(rows).value(), columns(rows))


@given(rows=st.integers(1, 3).flatmap(cancelling), seed=st.integers(0, 2**32 - 1))
def test_the_order_does_not_matter(rows: list[list[float]], seed: int) -> None:
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    a, b = accumulate(rows).value(), accumulate(shuffled).value()
    assert torch.equal(a.view(torch.int64), b.view(torch.int64))


@given(
    rows=st.integers(1, 3).flatmap(cancelling),
    factor=st.one_of(
        st.sampled_from([0.5, 2.0**-1074, 2.0**1000, -(2.0**-600), 3.0, -7.0, 0.1, 1 / 3, 0.0, -0.0, MAX]),
        st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != 1),
    ),
)
def test_scaled_value_is_the_correctly_rounded_product(rows: list[list[float]], factor: float) -> None:
    """Power-of-two and any other finite factors: the exact sum times the factor, rounded once.

    One more column sums to exactly zero (its first column's numbers, then their negations), so a
    zero sum meets every factor, huge ones included, in a window anywhere in the range.
    """
    rows = [[*row, row[0]] for row in rows] + [[0.0] * len(row) + [-row[0]] for row in rows]
    acc = accumulate(rows)
    assert_exact(acc.scaled_value(factor), columns(rows), factor)
    assert_exact(acc.value(), columns(rows))  # the buffer itself is unchanged


@given(rows=st.integers(1, 3).flatmap(cancelling), chunks=st.lists(st.integers(1, 7), min_size=1, max_size=8))
def test_the_kernel_gives_the_same_digits_in_any_batching(rows: list[list[float]], chunks: list[int]) -> None:
    """exact_step one addend at a time and in batches of any size: the same normalised digits."""
    x = torch.tensor(rows, dtype=torch.float64)
    one, batched = SuperAccumulator(x.shape[1], CPU), SuperAccumulator(x.shape[1], CPU)
    for row in x:
        exact_step(one, row)
    start, k = 0, 0
    while start < x.shape[0]:
        exact_step(batched, x[start : start + chunks[k % len(chunks)]])
        start, k = start + chunks[k % len(chunks)], k + 1
    one.normalize()
    batched.normalize()
    assert one.adds == batched.adds == x.shape[0]
    # the same window (the nonzero addends' digits) and, normalised, the same digits
    assert (one.lo, one.digits.shape) == (batched.lo, batched.digits.shape)
    assert torch.equal(one.digits, batched.digits)
    assert_exact(one.value(), columns(rows))


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp8_e4m3", "fp32"])
@settings(max_examples=50)
@given(data=st.data())
def test_sums_the_addends_rounded_to_the_format(fmt: str, data: st.DataObject) -> None:
    """Every strategy rounds its addends to the buffer format first; exact sums those exactly."""
    rows = data.draw(st.lists(st.lists(spread(), min_size=3, max_size=3), min_size=1, max_size=10))
    acc = accumulate(rows, fmt=fmt)
    f = get_format(fmt)
    rounded = [pl.round_nearest(torch.tensor(row, dtype=torch.float64), f).tolist() for row in rows]
    assert_exact(acc.value(), columns(rounded))


# --------------------------------------------------------------------------------------------------
# edge cases by hand
# --------------------------------------------------------------------------------------------------
ULP_MAX = math.ldexp(1.0, 971)  # the spacing of the top binade


@pytest.mark.parametrize(
    ("xs", "want"),
    [
        ([2.0**100, 1.0, 2.0**-100, -(2.0**100), -1.0], 2.0**-100),  # the issue's example (a double-double gave 0)
        ([2.0**1023, TINY, -(2.0**1023)], TINY),  # the whole range: 2^1023 down to 2^-1074
        ([MAX, MAX], math.inf),
        ([-MAX, -MAX], -math.inf),
        ([MAX, MAX, -MAX], MAX),  # the partial sum overflows fp64, the sum does not
        ([MAX, ULP_MAX / 2], math.inf),  # the tie above MAX rounds to even: 2^1024, past the range
        ([MAX, ULP_MAX / 2, -TINY], MAX),  # just below the tie
        ([MAX, ULP_MAX / 4], MAX),
        ([-MAX, -ULP_MAX / 2], -math.inf),
        ([1.0, 2.0**-53], 1.0),  # a tie at 1: to even (down)
        ([1.0, 2.0**-53, TINY], 1.0 + 2.0**-52),  # just above the tie: up (the sticky bit)
        ([1.0 + 2.0**-52, 2.0**-53], 1.0 + 2.0**-51),  # a tie: to even (up)
        ([-1.0 - 2.0**-52, -(2.0**-53)], -1.0 - 2.0**-51),
        ([TINY, TINY], 2 * TINY),  # subnormals add exactly
        ([SMALLEST_NORMAL, -TINY], SMALLEST_NORMAL - TINY),  # the largest subnormal
        ([SMALLEST_NORMAL - TINY, TINY], SMALLEST_NORMAL),  # up into the normals
        ([-TINY, 3 * TINY, -5 * TINY], -3 * TINY),
        ([1e308, 1e308, -1e308, -1e308, 1e-308], 1e-308),
        ([0.1, 0.2, -0.3], float(Fraction(0.1) + Fraction(0.2) - Fraction(0.3))),
    ],
)
def test_by_hand(xs: list[float], want: float) -> None:
    assert reference(xs) == want or (math.isnan(want) and math.isnan(reference(xs)))  # the oracle agrees
    acc = accumulate([[x] for x in xs])
    assert same_bits(acc.value().tolist(), [want])


def test_a_double_double_fails_the_issues_example() -> None:
    """Negative control: the previous implementation's arithmetic (TwoSum + Fast2Sum) loses 2^-100."""
    from precision_lab.strategies.arithmetic import two_sum

    s, c = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    for x in (2.0**100, 1.0, 2.0**-100, -(2.0**100), -1.0):
        h, e = two_sum(s, torch.tensor([x], dtype=torch.float64))
        lo = c + e
        s, c = h + lo, lo - ((h + lo) - h)
    assert (s + c).item() == 0.0 != 2.0**-100


@pytest.mark.parametrize(
    ("xs", "want"),
    [
        ([-0.0, -0.0], -0.0),  # IEEE: -0 + -0 = -0
        ([-0.0], -0.0),
        ([-0.0, 0.0], 0.0),
        ([0.0, -0.0], 0.0),
        ([1.0, -1.0], 0.0),  # an exact cancellation is +0 (IEEE round to nearest)
        ([-1.0, 1.0], 0.0),
        ([-0.0, 1.0, -1.0], 0.0),
        ([-0.0, -TINY, TINY], 0.0),
    ],
)
def test_signed_zero(xs: list[float], want: float) -> None:
    """An exactly zero sum is +0.0 unless every addend was -0.0."""
    assert same_bits(accumulate([[x] for x in xs]).value().tolist(), [want])


def test_no_adds_is_positive_zero() -> None:
    acc = pl.Accumulator("exact", "fp64", (3,))
    assert same_bits(acc.value().tolist(), [0.0, 0.0, 0.0])
    assert acc.arrays == 0  # no digit held before the first nonzero addend


def test_a_zero_sum_scaled_up_is_zero() -> None:
    """A zero column next to huge ones, times a huge factor: still a zero (not inf)."""
    rows = [[2.0**1000, 2.0**1000, -(2.0**1000)], [-(2.0**1000), 2.0**1000, 2.0**1000]]
    acc = accumulate(rows)
    for factor in (2.0**1000, 3.0**300, -(2.0**1000), MAX):
        assert_exact(acc.scaled_value(factor), columns(rows), factor)


def test_negative_zero_is_tracked_per_element() -> None:
    rows = [[-0.0, -0.0, 0.0], [-0.0, 1.0, -0.0], [-0.0, -1.0, -0.0]]
    assert same_bits(accumulate(rows).value().tolist(), [-0.0, 0.0, 0.0])
    assert same_bits(accumulate(rows).scaled_value(-2.0).tolist(), [0.0, -0.0, -0.0])
    zeros = accumulate([[0.0, -0.0], [0.0, 0.0]])  # no nonzero addend at all: no digit held
    assert same_bits(zeros.scaled_value(-3.0).tolist(), [-0.0, -0.0])
    assert same_bits(zeros.scaled_value(0.5).tolist(), [0.0, 0.0])
    assert same_bits(pl.Accumulator("exact", "fp64", (1,)).scaled_value(-0.5).tolist(), [-0.0])


@pytest.mark.parametrize(
    ("xs", "want"),
    [
        ([1.0, math.nan, 2.0], math.nan),
        ([math.inf, 1.0], math.inf),
        ([-math.inf, -MAX, -MAX], -math.inf),
        ([math.inf, -math.inf], math.nan),
        ([math.inf, math.inf], math.inf),
        ([-math.inf, 5.0, math.inf], math.nan),
        ([math.nan, math.inf], math.nan),
        ([MAX, MAX, math.inf], math.inf),
        ([-0.0, -math.inf], -math.inf),
    ],
)
def test_inf_and_nan_follow_ieee(xs: list[float], want: float) -> None:
    acc = accumulate([[x, 1.0] for x in xs])
    assert same_bits(acc.value().tolist(), [want, float(len(xs))])  # the other element is untouched
    assert acc.nonfinite_inputs == sum(not math.isfinite(x) for x in xs)
    for factor in (-2.0, 0.0, 0.1):
        assert same_bits(acc.scaled_value(factor)[:1].tolist(), [reference(xs, factor)])


def test_shapes_and_reads() -> None:
    acc = pl.Accumulator("exact", "fp64", (2, 3))
    x = torch.arange(6, dtype=torch.float64).reshape(2, 3) * 2.0**-60
    for _ in range(5):
        acc.add(x)
    assert torch.equal(acc.value(), 5 * x)
    assert torch.equal(acc.raw_sum(), 5 * x)
    assert torch.equal(acc.scaled_value(0.25), 5 * x / 4)
    assert acc.lost_updates == 0
    empty = pl.Accumulator("exact", "fp64", (0,))
    empty.add(torch.zeros(0))
    assert empty.value().shape == (0,)


def test_kernel_rejects_a_wrong_shape() -> None:
    acc = SuperAccumulator(3, CPU)
    with pytest.raises(ValueError, match=r"\(4,\).*\(3,\) or \(n, 3\)"):
        exact_step(acc, torch.zeros(4))
    with pytest.raises(ValueError, match="factor must be finite"):
        acc.value(math.inf)


# --------------------------------------------------------------------------------------------------
# the pieces: digit positions, the rounding, the memory
# --------------------------------------------------------------------------------------------------
def test_digit_index_by_multiplication_is_floor_division() -> None:
    k = torch.arange(2**12)
    assert torch.equal((k * exact._DIV_MAGIC) >> exact._DIV_SHIFT, k // exact.DIGIT_BITS)


@pytest.mark.parametrize("bits", [26, 52])
@settings(max_examples=100)
@given(data=st.data())
def test_round_magnitude_against_fractions(bits: int, data: st.DataObject) -> None:
    """Random digit rows of every density, at every exponent: the integer they spell, rounded once."""
    rows = data.draw(st.integers(1, 6))
    digit = st.one_of(st.just(0), st.just(2**bits - 1), st.just(1), st.integers(0, 2**bits - 1))
    cols = [[data.draw(digit) for _ in range(rows)] for _ in range(4)]
    exponent = data.draw(st.one_of(st.integers(-1074 - bits * rows - 70, 1100), st.sampled_from([-1074, 971, 1024])))
    got = round_magnitude(torch.tensor(cols, dtype=torch.int64).T.contiguous(), bits, exponent).tolist()
    want = []
    for col in cols:
        value = sum(Fraction(d) * Fraction(2) ** (bits * i + exponent) for i, d in enumerate(col))
        try:
            want.append(float(value))
        except OverflowError:
            want.append(math.inf)
    assert same_bits(got, want)


def test_memory_grows_with_the_exponent_window() -> None:
    """8 bytes per digit of the window seen (plus a flag byte while tracked): honest and data-dependent."""
    acc = pl.Accumulator("exact", "fp64", (4,))
    acc.add(torch.ones(4, dtype=torch.float64))
    assert acc.arrays == 3  # 1.0's digit, its high part's, the carry digit
    assert acc.bytes_per_element == 8 * 3
    acc.add(torch.full((4,), 2.0**-200, dtype=torch.float64))
    assert acc.arrays == 7  # 4 more digits below: 2^-200 is 200 bits below 1, digits are 52 bits
    assert acc.bytes_per_element == 8 * 7
    acc.add(torch.tensor([MAX, TINY, 0.0, -0.0], dtype=torch.float64))
    assert acc.arrays == MAX_DIGITS == 43
    assert acc.bytes_per_element == 8 * 43
    unit = acc._unit
    assert isinstance(unit, Exact)
    assert acc.storage_bytes_per_element == 8 * 43 + 8 * unit.batch  # and the pending batch
    assert_exact(acc.value(), [[1.0, 2.0**-200, x] for x in (MAX, TINY, 0.0, -0.0)])


def test_batched_and_unbatched_units_agree() -> None:
    """A unit folding each add at once (batch 1) and one batching 256: the same bits."""
    g = torch.Generator().manual_seed(3)
    stream = torch.randn(300, 8, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(-80, 80, (300, 8), generator=g).double()
    )
    f, shape = get_format("fp64"), torch.Size((8,))
    units = [Exact(f, shape, dtype=torch.float64, device=CPU) for _ in range(2)]
    units[0].batch = 1
    assert units[1].batch == 256
    for row in stream:
        for u in units:
            u.add(row, generator=None, count_lost=False)
    a, b = units[0].value(), units[1].value()
    assert torch.equal(a.view(torch.int64), b.view(torch.int64))
    assert_exact(a, stream.T.tolist())


# --------------------------------------------------------------------------------------------------
# long streams: the carries between normalisations
# --------------------------------------------------------------------------------------------------
def _integer_reference(x: torch.Tensor) -> list[float]:
    """Column sums of a long fp64 stream in Python integers (every fp64 is a multiple of 2^-1074)."""
    out = []
    for col in x.T.tolist():
        total = sum(num * (2**1074 // den) for num, den in map(float.as_integer_ratio, col))
        try:
            out.append(float(Fraction(total, 2**1074)))
        except OverflowError:
            out.append(math.inf if total > 0 else -math.inf)
    return out


def test_a_stream_of_2_20_terms_through_the_kernel() -> None:
    """2^20 addends per element in one exact_step: 513 carry normalisations on the way."""
    g = torch.Generator().manual_seed(0)
    n = 2**20
    big = torch.full((n, 1), MAX, dtype=torch.float64)
    big[n // 2 :] = -MAX  # 2^19 times MAX up (far past fp64), then back down
    mixed = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(-1000, 1000, (n, 2), generator=g).double()
    )
    x = torch.cat([big, mixed], dim=1)
    x[n // 3, 0], x[n // 2 + n // 3, 0] = TINY, -0.0  # the one term that survives in the first column
    acc = SuperAccumulator(3, CPU)
    exact_step(acc, x)
    assert acc.adds == n
    assert acc.value().tolist() == _integer_reference(x)
    assert same_bits(acc.value().tolist()[:1], [TINY])


@pytest.mark.slow
def test_a_stream_of_2_20_terms_through_the_accumulator() -> None:
    """2^20 adds through Accumulator.add (batched by the unit): 4096 folds of 256 addends."""
    g = torch.Generator().manual_seed(1)
    n = 2**20
    x = torch.randn(n, 4, generator=g, dtype=torch.float64) * torch.exp2(
        torch.randint(-60, 60, (n, 4), generator=g).double()
    )
    x[:, 3] = 2.0**900
    x[1::2, 3] = -(2.0**900)
    x[7, 3] += 2.0**848  # one ulp of 2^900: survives the cancellation
    acc = pl.Accumulator("exact", "fp64", (4,))
    for row in x:
        acc.add(row)
    assert acc.value().tolist() == _integer_reference(x)


# --------------------------------------------------------------------------------------------------
# CUDA: the same code on the device, the same bits as on the CPU
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", available_devices())
def test_devices_agree_bit_for_bit(device: str) -> None:
    """The reference bits on every device, so CPU and CUDA agree bit for bit.

    535 adds (two full folds of the 256-addend batch, then a partial one) over the whole range, the
    reads (scaled too) and the non-finite flags.
    """
    rng = random.Random(5)
    rows = []
    for _ in range(400):
        row = [math.ldexp(rng.random(), rng.randint(-1074, 1023)) * rng.choice((1, -1)) for _ in range(16)]
        rows.append(row)
    rows += [[-x for x in row] for row in rows[::3]]
    rows += [[TINY, -0.0, MAX, 2.0**-1022, 1.0, 0.5, -TINY, 3.0] * 2]
    rng.shuffle(rows)
    acc = accumulate(rows, device=device)
    assert acc.value().device.type == device
    assert_exact(acc.value(), columns(rows))
    assert_exact(acc.scaled_value(0.1), columns(rows), 0.1)
    assert_exact(acc.scaled_value(2.0**-60), columns(rows), 2.0**-60)
    special = accumulate([[math.inf, math.nan, 1.0], [-math.inf, 2.0, -0.0]], device=device)
    assert same_bits(special.value().tolist(), [math.nan, math.nan, 1.0])
