"""The strategy units and their registry: adding a strategy is one new unit, nothing else.

* a toy strategy defined here only (round toward zero) works through ``Accumulator`` and
  ``GradientAccumulator`` by name, with bits checked against a hand computation;
* the registry refuses duplicates and unknown names (naming them), and holds exactly the built-ins;
* every built-in unit keeps its arrays, nominal and stored bytes, storage dtype and randomness;
* the lost-update test :func:`absorbed` on hand-picked elements;
* the pure kernels stay importable from ``precision_lab.accumulators``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from precision_lab import accumulators, get_format
from precision_lab.accumulators import STRATEGIES, Accumulator
from precision_lab.rounding import round_toward_zero
from precision_lab.strategies import (
    BUILTIN_STRATEGIES,
    Strategy,
    absorbed,
    count_absorbed,
    exact,
    get_strategy,
    kahan,
    naive,
    pairwise,
    register_strategy,
    stochastic,
    strategy_names,
    unregister_strategy,
)
from precision_lab.training import GradientAccumulator


# --------------------------------------------------------------------------------------------------
# a toy strategy, defined in this file only
# --------------------------------------------------------------------------------------------------
class TowardZero(Strategy):
    """``s <- RZ(s + t)``: the sum formed in fp64 (exact for the values below), truncated to the format."""

    name = "toy"

    def __init__(self, fmt, shape, *, dtype, device) -> None:
        super().__init__(fmt, shape, dtype=dtype, device=device)
        self.sum = self.zeros()

    def add(self, t: torch.Tensor, *, generator: torch.Generator | None, count_lost: bool) -> int:
        old = self.sum.clone()
        self.sum.copy_(round_toward_zero(self.sum.double() + t.double(), self.format))
        return count_absorbed(self.sum, old, t) if count_lost else 0

    def value(self) -> torch.Tensor:
        return self.sum.to(torch.float64, copy=True)


class RandomToy(TowardZero):
    """The toy again, declaring that it draws random bits (GradientAccumulator must then insist on a generator)."""

    name = "toy_random"
    needs_generator = True


@pytest.fixture
def toy() -> Iterator[type[Strategy]]:
    """The toy registered for one test, unregistered afterwards (other tests see the built-ins only)."""
    register_strategy(TowardZero)
    yield TowardZero
    unregister_strategy(TowardZero.name)


@pytest.fixture
def random_toy() -> Iterator[type[Strategy]]:
    register_strategy(RandomToy)
    yield RandomToy
    unregister_strategy(RandomToy.name)


# Four micro-gradients of two elements, all bf16 numbers.  By hand in bf16 (8 bits: spacing 2^-7 on
# [1, 2), 2^-6 on [2, 4)), rounding toward zero:
#   element 0:  1  ->  RZ(1 + 3*2^-8) = 1 + 2^-7  ->  RZ(1 + 2^-7 + 2^-9) = 1 + 2^-7 (lost)
#               ->  RZ(2 + 2^-7) = 2
#   element 1: -1  ->  RZ(-1 - 3*2^-8) = -(1 + 2^-7)  ->  RZ(-(1 + 2^-7) + 2^-9) = -1  ->  -1 + 0 (not counted)
# Round to nearest (naive; ties to even) would end at 2 + 2^-6 and -(1 + 2^-6).
ADDENDS = [[1.0, -1.0], [3 * 2.0**-8, -3 * 2.0**-8], [2.0**-9, 2.0**-9], [1.0, 0.0]]
EXPECTED = [2.0, -1.0]
EXPECTED_PARTIAL = [[1.0, -1.0], [1 + 2.0**-7, -(1 + 2.0**-7)], [1 + 2.0**-7, -1.0], [2.0, -1.0]]


def test_toy_strategy_through_the_accumulator(toy: type[Strategy]) -> None:
    acc = Accumulator("toy", "bf16", (2,))
    assert acc.dtype == torch.bfloat16
    for t, partial in zip(ADDENDS, EXPECTED_PARTIAL, strict=True):
        acc.add(torch.tensor(t))  # fp32 in, rounded to bf16 by the Accumulator (exact here)
        assert acc.value().tolist() == partial
    assert acc.value().dtype == torch.float64
    assert acc.raw_sum().tolist() == EXPECTED
    assert acc.scaled_value(0.125).tolist() == [0.25, -0.125]  # the default: RN of the read-out times 1/8
    assert (acc.count, acc.element_adds, acc.lost_updates, acc.nonfinite_inputs) == (4, 8, 1, 0)
    assert (acc.arrays, acc.bytes_per_element, acc.storage_bytes_per_element) == (1, 2.0, 2)
    assert repr(acc) == "Accumulator('toy', 'bf16', shape=(2,), count=4, lost_updates=1)"
    naive_acc = Accumulator("naive", "bf16", (2,))
    for t in ADDENDS:
        naive_acc.add(torch.tensor(t))
    assert naive_acc.value().tolist() == [2 + 2.0**-6, -(1 + 2.0**-6)]  # the toy really rounds differently
    acc.reset()
    assert (acc.count, acc.lost_updates, acc.value().tolist()) == (0, 0, [0.0, 0.0])


def test_toy_strategy_through_the_gradient_accumulator(toy: type[Strategy]) -> None:
    p = nn.Parameter(torch.zeros(2))
    with GradientAccumulator([("w", p)], strategy="toy", fmt="bf16", count_lost=True, count_nonfinite=True) as ga:
        for c in ADDENDS:
            (p * torch.tensor(c)).sum().backward()  # d/dp = c exactly
            assert p.grad is None  # taken by the hook
        (acc,) = ga.accumulators
        assert acc.strategy == "toy"
        stats = ga.write_grads()
    assert p.grad.dtype == torch.float32
    assert p.grad.tolist() == EXPECTED
    assert stats == {"micro_steps": 4, "element_adds": 8, "lost_updates": 1, "nonfinite_inputs": 0}


def test_registered_strategy_needing_randomness_needs_a_generator(random_toy: type[Strategy]) -> None:
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="strategy 'toy_random' needs generator=.*got generator=None"):
        GradientAccumulator([p], strategy="toy_random", fmt="bf16")
    with GradientAccumulator([p], strategy="toy_random", fmt="bf16", generator=torch.Generator()) as ga:
        assert ga.strategy == "toy_random"


def test_registered_names_appear_in_the_unknown_strategy_error(toy: type[Strategy]) -> None:
    with pytest.raises(
        ValueError, match="unknown strategy 'toy2'; known: naive, kahan, neumaier, stochastic, pairwise, exact, toy"
    ):
        Accumulator("toy2", "bf16", (2,))
    assert strategy_names() == (*STRATEGIES, "toy")


# --------------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------------
def test_builtin_names_are_the_strategies() -> None:
    assert (
        strategy_names()
        == BUILTIN_STRATEGIES
        == STRATEGIES
        == ("naive", "kahan", "neumaier", "stochastic", "pairwise", "exact")
    )
    assert [get_strategy(name).name for name in STRATEGIES] == list(STRATEGIES)


def test_duplicate_name_is_refused_naming_it(toy: type[Strategy]) -> None:
    class Again(TowardZero):
        pass  # inherits the name "toy"

    with pytest.raises(ValueError, match="strategy 'toy' is already registered"):
        register_strategy(Again)

    class Shadow(TowardZero):
        name = "kahan"

    with pytest.raises(ValueError, match="strategy 'kahan' is already registered"):
        register_strategy(Shadow)
    assert get_strategy("toy") is TowardZero
    assert get_strategy("kahan") is kahan.Kahan


def test_registration_needs_a_named_strategy_class() -> None:
    class Nameless(TowardZero):
        name = ""

    with pytest.raises(ValueError, match="nonempty string 'name'"):
        register_strategy(Nameless)
    with pytest.raises(ValueError, match="Strategy subclass"):
        register_strategy(int)  # type: ignore[type-var]


def test_unregister_refuses_builtins_and_unknown_names() -> None:
    with pytest.raises(ValueError, match="'naive' is built in"):
        unregister_strategy("naive")
    with pytest.raises(ValueError, match="'toy' is not registered"):
        unregister_strategy("toy")


@pytest.mark.parametrize("bad", ["Kahan", "", None, ["naive"]])
def test_unknown_names_are_value_errors(bad: object) -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        get_strategy(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown strategy"):
        GradientAccumulator([nn.Parameter(torch.zeros(1))], strategy=bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# the built-in units
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "fmt", "arrays", "nominal", "storage", "dtype", "needs_generator"),
    [
        ("naive", "bf16", 1, 2.0, 2, torch.bfloat16, False),
        ("naive", "fp8_e4m3", 1, 1.0, 4, torch.float32, False),
        ("naive", "e5m7", 1, 13 / 8, 4, torch.float32, False),
        ("kahan", "bf16", 2, 4.0, 4, torch.bfloat16, False),
        ("kahan", "fp8_e5m2", 2, 2.0, 8, torch.float32, False),
        ("kahan", "fp64", 2, 16.0, 16, torch.float64, False),
        ("stochastic", "bf16", 1, 2.0, 2, torch.bfloat16, True),
        ("stochastic", "tf32", 1, 19 / 8, 4, torch.float32, True),
        ("pairwise", "bf16", 1, 2.0, 2, torch.bfloat16, False),  # before any add: one array
        # exact: a superaccumulator whose digit window grows with the data: no digit before any add
        ("exact", "bf16", 0, 0.0, 0.0, torch.float64, False),
        ("exact", "fp8_e4m3", 0, 0.0, 0.0, torch.float64, False),
    ],
)
def test_builtin_unit_sizes(
    name: str, fmt: str, arrays: int, nominal: float, storage: int, dtype: torch.dtype, needs_generator: bool
) -> None:
    cls = get_strategy(name)
    f = get_format(fmt)
    assert cls.storage_dtype(f) == dtype
    assert cls.needs_generator is needs_generator
    unit = cls(f, torch.Size((3,)), dtype=dtype, device=torch.device("cpu"))
    assert (unit.arrays, unit.bytes_per_element, unit.storage_bytes_per_element) == (arrays, nominal, storage)
    acc = Accumulator(name, fmt, (3,))  # the Accumulator reports the unit's numbers
    assert (acc.dtype, acc.arrays, acc.bytes_per_element, acc.storage_bytes_per_element) == (
        dtype,
        arrays,
        nominal,
        storage,
    )


def test_pairwise_unit_grows_a_slot_per_binary_digit() -> None:
    f = get_format("bf16")
    unit = pairwise.Pairwise(f, torch.Size((2,)), dtype=torch.bfloat16, device=torch.device("cpu"))
    for n in range(1, 6):
        unit.add(torch.ones(2, dtype=torch.bfloat16), generator=None, count_lost=True)
        assert unit.arrays == n.bit_length()
        assert sum(s is not None for s in unit.slots) == bin(n).count("1")
    assert (unit.arrays, unit.bytes_per_element, unit.storage_bytes_per_element) == (3, 6.0, 6)
    assert unit.value().tolist() == [5.0, 5.0]


def test_units_hold_named_state() -> None:
    cpu, shape, f = torch.device("cpu"), torch.Size((2,)), get_format("bf16")
    assert isinstance(naive.Naive(f, shape, dtype=torch.bfloat16, device=cpu).sum, torch.Tensor)
    k = kahan.Kahan(f, shape, dtype=torch.bfloat16, device=cpu)
    k.add(torch.tensor([1.0, 1.0], dtype=torch.bfloat16), generator=None, count_lost=False)
    k.add(torch.tensor([2.0**-9, 0.0], dtype=torch.bfloat16), generator=None, count_lost=False)
    assert k.sum.tolist() == [1.0, 1.0]
    assert k.compensation.tolist() == [-(2.0**-9), 0.0]  # the lost low part, negated
    assert k.value().tolist() == [1 + 2.0**-9, 1.0]
    e = exact.Exact(f, shape, dtype=torch.float64, device=cpu)
    for x in (1.0, 2.0**-80, -1.0):
        e.add(torch.full((2,), x, dtype=torch.float64), generator=None, count_lost=True)
    assert e.value().tolist() == [2.0**-80, 2.0**-80]
    digits = e.superaccumulator.digits  # int64 digits of 52 bits, spanning 2^-80 .. 2^0 and carries
    assert digits.dtype == torch.int64
    assert digits.shape[1:] == shape
    assert e.arrays == digits.shape[0] >= 2


def test_stochastic_unit_draws_one_key_per_add_from_its_generator() -> None:
    f, cpu = get_format("bf16"), torch.device("cpu")
    t = torch.full((64,), 2.0**-9, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        unit = stochastic.Stochastic(f, torch.Size((64,)), dtype=torch.bfloat16, device=cpu)
        g = torch.Generator().manual_seed(5)
        unit.add(torch.ones(64, dtype=torch.bfloat16), generator=g, count_lost=True)
        unit.add(t, generator=g, count_lost=True)
        runs.append(unit.sum.clone())
    assert torch.equal(runs[0].view(torch.int16), runs[1].view(torch.int16))  # reproducible from the seed
    assert set(runs[0].tolist()) <= {1.0, 1 + 2.0**-7}  # each element on a neighbour of 1 + 2^-9


# --------------------------------------------------------------------------------------------------
# lost updates and the kernels
# --------------------------------------------------------------------------------------------------
def test_absorbed_by_hand() -> None:
    inf, nan = math.inf, math.nan
    old = torch.tensor([1.0, 1.0, 1.0, 1.0, inf, 0.0, -0.0, 1.0, 1.0])
    new = torch.tensor([1.0, 2.0, 1.0, 1.0, inf, -0.0, 0.0, nan, 1.0])
    add = torch.tensor([1e-9, 1.0, 0.0, inf, 1.0, 1e-9, -1e-9, 1.0, nan])
    #                   lost   moved  zero  inf    inf s  -0==+0 +0==-0 NaN    NaN addend
    expected = [True, False, False, False, False, True, True, False, False]
    assert absorbed(new, old, add).tolist() == expected
    assert count_absorbed(new, old, add) == 3


def test_kernels_are_reexported_from_accumulators() -> None:
    assert accumulators.naive_step is naive.naive_step
    assert accumulators.kahan_step is kahan.kahan_step
    assert accumulators.stochastic_step is stochastic.stochastic_step
    assert accumulators.pairwise_step is pairwise.pairwise_step
    assert accumulators.pairwise_total is pairwise.pairwise_total
    assert accumulators.exact_step is exact.exact_step
    assert accumulators.work_dtype(get_format("fp8_e4m3")) == torch.float32
