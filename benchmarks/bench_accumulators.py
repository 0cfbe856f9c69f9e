"""Speed of one ``Accumulator.add`` on CPU, against a plain bf16 ``s.add_(t)`` in the same process.

Usage::

    python benchmarks/bench_accumulators.py [--n 16777216] [--threads 2] [--repeat 10]

Prints a markdown table: median wall time of ``--repeat`` adds (after two warm-up adds) into a
buffer of ``--n`` elements, giga element-adds per second, and the ratio to the baseline
``s.add_(t)`` (bf16 buffer, bf16 addend: what ``p.grad += g`` costs; timed first and again last,
the faster median is the reference).  Every accumulator counts
lost updates (the default), and the addend is already in the buffer's format except where said.
The bf16 strategies run the compiled kernels of ``precision_lab/_native.py`` and, for comparison,
the pure-torch fallback (``PRECISION_LAB_NATIVE=0``).  Targets: bf16 naive <= 1.5x the baseline,
bf16 kahan <= 3x.  The last rows time the strategy step alone (with a compiled count of non-finite
addends), to separate the kernels from the bookkeeping ``Accumulator.add`` does around them.

A second table times the ``exact`` reference (the superaccumulator of
``precision_lab/strategies/exact.py``) at 2^10, 2^16 and 2^20 fp64 elements against the
double-double it replaced (TwoSum + Fast2Sum, inlined below as a registered benchmark-only
strategy) and a plain fp64 ``s.add_(t)``: microseconds per add, amortised over a run of adds that
spans whole batches of the exact unit (it folds up to ``batch`` pending addends at once), and the
ratio to the double-double; then the cost of one ``value()`` read-out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from _common import parse_args, ratio_table, timeit, torch_path

import precision_lab as pl
from precision_lab import _native
from precision_lab.accumulators import kahan_step, naive_step, stochastic_step
from precision_lab.formats import Format, get_format
from precision_lab.strategies import Strategy, register_strategy, unregister_strategy
from precision_lab.strategies.arithmetic import two_sum
from precision_lab.strategies.exact import Exact

BF16 = get_format("bf16")

TARGETS = {"naive": 1.5, "kahan": 3.0}
EXACT_SIZES = (2**10, 2**16, 2**20)


def double_double_step(s: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> None:
    """The previous ``exact_step``: (s, c) <- (s, c) + t, a renormalised double-double (not exact)."""
    h, e = two_sum(s, t)
    lo = c + e
    hi = h + lo  # Fast2Sum(h, lo)
    c.copy_(torch.where(torch.isfinite(hi), lo - (hi - h), torch.zeros_like(lo)))
    s.copy_(hi)


class _DoubleDouble(Strategy):
    """The previous ``exact`` unit, registered for this benchmark only (as ``_bench_double_double``)."""

    name = "_bench_double_double"

    def __init__(self, fmt: Format, shape: torch.Size, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(fmt, shape, dtype=dtype, device=device)
        self.hi, self.lo = self.zeros(), self.zeros()

    @classmethod
    def storage_dtype(cls, fmt: Format) -> torch.dtype:
        return torch.float64

    def add(self, t: torch.Tensor, *, generator: torch.Generator | None, count_lost: bool) -> int:
        double_double_step(self.hi, self.lo, t)
        return 0

    def value(self) -> torch.Tensor:
        return self.hi + self.lo


def _repeated(step: Callable[[torch.Tensor], object], addends: list[torch.Tensor], adds: int) -> Callable[[], None]:
    """``adds`` calls of ``step`` on the addends in turn."""

    def go() -> None:
        for i in range(adds):
            step(addends[i % len(addends)])

    return go


def _exact_rows(n: int, repeat: int) -> tuple[float, float]:
    """Print the exact-reference rows for ``n`` fp64 elements; return the exact / double-double ratios.

    The ratios are those of the unit's add and of ``Accumulator.add`` (what the experiments pay).
    """
    fp64, cpu = get_format("fp64"), torch.device("cpu")
    g = torch.Generator().manual_seed(n)
    addends = [torch.randn(n, generator=g, dtype=torch.float64) * 1e-3 for _ in range(4)]
    unit = Exact(fp64, torch.Size((n,)), dtype=torch.float64, device=cpu)
    adds = 2 * max(unit.batch, 4)  # whole batches: every fold of the exact unit is inside the timed run
    s, c, plain = (torch.zeros(n, dtype=torch.float64) for _ in range(3))
    accs = {k: pl.Accumulator(k, "fp64", n, count_lost=False) for k in ("exact", _DoubleDouble.name)}
    rows: dict[str, Callable[[torch.Tensor], object]] = {
        "double-double step (the old exact_step)": lambda t: double_double_step(s, c, t),
        "`s.add_(t)` fp64": plain.add_,
        "exact unit add (superaccumulator, batched)": lambda t: unit.add(t, generator=None, count_lost=False),
        "double-double Accumulator.add": accs[_DoubleDouble.name].add,
        "exact Accumulator.add": accs["exact"].add,
    }
    times = {name: timeit(_repeated(step, addends, adds), repeat) / adds for name, step in rows.items()}
    base = times["double-double step (the old exact_step)"]
    for name, sec in times.items():
        print(f"| {n:,} | {name} | {sec * 1e6:.1f} | {sec / base:.2f} |")
    for name, acc in (("double-double", accs[_DoubleDouble.name]), ("exact", accs["exact"])):
        sec = timeit(acc.value, repeat)
        print(f"| {n:,} | {name} value() (one read, not per add) | {sec * 1e6:.1f} | {sec / base:.2f} |")
    print(
        f"| {n:,} | (exact: batches of {unit.batch} addends; {unit.arrays} digits, {unit.bytes_per_element:g} B/element) | | |"
    )
    return (
        times["exact unit add (superaccumulator, batched)"] / base,
        times["exact Accumulator.add"] / times["double-double Accumulator.add"],
    )


def exact_table(repeat: int) -> None:
    """The exact reference against the double-double and a plain fp64 add, per element count."""
    print("\n# exact (superaccumulator) vs the double-double it replaced, fp64 addends ~ N(0, 1e-6)")
    print("| elements | case | us per add | x double-double step |")
    print("| ---: | --- | ---: | ---: |")
    register_strategy(_DoubleDouble)
    try:
        ratios = {n: _exact_rows(n, repeat) for n in EXACT_SIZES}
    finally:
        unregister_strategy(_DoubleDouble.name)
    print("\nexact / double-double, per add (the unit's step; Accumulator.add, what the experiments pay):")
    for n, (step, acc) in ratios.items():
        print(f"- {n:,} elements: {step:.2f}x; {acc:.2f}x")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeat=10, n_help="buffer elements (default 16M)")
    torch.set_num_threads(args.threads)
    n = args.n

    g = torch.Generator().manual_seed(0)
    t32 = torch.randn(n, generator=g) * 1e-3
    t = t32.bfloat16()
    t16 = t32.half()
    s = torch.randn(n, generator=g).bfloat16()

    sn, sk, ss = s.clone(), s.clone(), s.clone()
    ck = torch.zeros_like(s)

    def step(fn: Callable[..., int], *args: object) -> Callable[[], None]:
        def run() -> None:
            _native.count_nonfinite_bf16(t)
            fn(*args)

        return run

    def add(strategy: str, fmt: str, addend: torch.Tensor, *, fallback: bool = False) -> Callable[[], None]:
        acc = pl.Accumulator(strategy, fmt, n, generator=torch.Generator().manual_seed(1))
        if fallback:

            def step() -> None:
                with torch_path():
                    acc.add(addend)

            return step
        return lambda: acc.add(addend)

    rows: list[tuple[str, Callable[[], object]]] = [
        ("`s.add_(t)` bf16 (baseline)", lambda: s.add_(t)),
        ("naive bf16 (compiled)", add("naive", "bf16", t)),
        ("kahan bf16 (compiled)", add("kahan", "bf16", t)),
        ("stochastic bf16 (compiled)", add("stochastic", "bf16", t)),
        ("naive bf16 (torch fallback)", add("naive", "bf16", t, fallback=True)),
        ("kahan bf16 (torch fallback)", add("kahan", "bf16", t, fallback=True)),
        ("stochastic bf16 (torch fallback)", add("stochastic", "bf16", t, fallback=True)),
        ("pairwise bf16", add("pairwise", "bf16", t)),
        ("exact (superaccumulator), bf16 addend", add("exact", "bf16", t)),
        ("naive fp32", add("naive", "fp32", t32)),
        ("kahan fp16 (torch)", add("kahan", "fp16", t16)),
        # What Accumulator.add costs without its torch count of non-finite addends (see below)
        ("`int((~torch.isfinite(t)).sum())` alone", lambda: int((~torch.isfinite(t)).sum())),
        ("`_native.count_nonfinite_bf16(t)` alone", lambda: _native.count_nonfinite_bf16(t)),
        ("naive bf16 step (compiled) + kernel count", step(naive_step, sn, t, BF16, True)),
        ("kahan bf16 step (compiled) + kernel count", step(kahan_step, sk, ck, t, BF16, True)),
        ("stochastic bf16 step (compiled) + kernel count", step(stochastic_step, ss, t, BF16, 7, True)),
    ]

    times, base = ratio_table("bench_accumulators", rows, n, args.repeat, args.threads)

    print("\nTargets (compiled bf16 strategies, ratio to the baseline):")
    for strategy, target in TARGETS.items():
        for what, name in (
            ("Accumulator.add", f"{strategy} bf16 (compiled)"),
            ("step + kernel count", f"{strategy} bf16 step (compiled) + kernel count"),
        ):
            ratio = times[name] / base
            print(f"- {strategy} <= {target}x, {what}: {ratio:.2f}x -> {'met' if ratio <= target else 'NOT met'}")
    print(
        "\n'step + kernel count' is the strategy step that Accumulator.add calls plus the compiled count of\n"
        "non-finite addends, which Accumulator.add uses for bf16 on CPU (the torch count, the 'alone' row,\n"
        "costs far more than the add)."
    )
    exact_table(args.repeat)


if __name__ == "__main__":
    main()
