"""Helpers shared by the benchmark scripts: timing, the pure-torch switch, the common options."""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

from precision_lab import _native


def timeit(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    """Median seconds of ``repeat`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def torch_path() -> contextlib.AbstractContextManager[None]:
    """Switch the compiled kernels off (the pure-torch fallback) inside the block."""
    return _native.disabled()


def ratio_table(
    title: str, rows: list[tuple[str, Callable[[], object]]], n: int, repeat: int, threads: int
) -> tuple[dict[str, float], float]:
    """Time every row, print the markdown table of ratios to the first row; return (times, baseline).

    The baseline (first row) is timed again after all others; the faster of its two medians is the
    reference, so a machine that warms up or slows down during the run does not flatter the others.
    """
    import platform

    import torch

    print(f"# {title}: n = {n:,}, threads = {threads}, median of {repeat} (2 warm-up)")
    print(
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {platform.processor() or platform.machine()}, "
        f"compiled kernels: {'on' if _native.enabled() else 'OFF'}\n"
    )
    print("| case | ms | G elem/s | x baseline |")
    print("| --- | ---: | ---: | ---: |")
    times = {name: timeit(fn, repeat) for name, fn in rows}
    again = timeit(rows[0][1], repeat)
    base = min(times[rows[0][0]], again)
    for name, sec in [*times.items(), ("(baseline again, after the other rows)", again)]:
        print(f"| {name} | {sec * 1e3:.2f} | {n / sec / 1e9:.2f} | {sec / base:.2f} |")
    return times, base


def parse_args(description: str, *, repeat: int, n_help: str = "elements (default 16M)") -> argparse.Namespace:
    """The options every benchmark takes: --n, --threads, --repeat."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--n", type=int, default=16 * 2**20, help=n_help)
    parser.add_argument("--threads", type=int, default=2, help="torch (and kernel) threads")
    parser.add_argument("--repeat", type=int, default=repeat, help="timed calls per row (median)")
    return parser.parse_args()
