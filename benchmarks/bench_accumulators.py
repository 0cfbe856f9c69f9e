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
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from _common import parse_args, ratio_table, torch_path

import precision_lab as pl
from precision_lab import _native
from precision_lab.accumulators import kahan_step, naive_step, stochastic_step
from precision_lab.formats import get_format

BF16 = get_format("bf16")

TARGETS = {"naive": 1.5, "kahan": 3.0}


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
        ("exact (fp64 + fp64 error term), bf16 addend", add("exact", "bf16", t)),
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


if __name__ == "__main__":
    main()
