"""Helpers shared by the benchmark scripts: timing, the pure-torch switch, the common options."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator

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


@contextlib.contextmanager
def torch_path() -> Iterator[None]:
    """Switch the compiled kernels off (the pure-torch fallback) inside the block."""
    before = os.environ.get(_native.ENV_VAR)
    os.environ[_native.ENV_VAR] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[_native.ENV_VAR]
        else:
            os.environ[_native.ENV_VAR] = before


def parse_args(description: str, *, repeat: int, n_help: str = "elements (default 16M)") -> argparse.Namespace:
    """The options every benchmark takes: --n, --threads, --repeat."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--n", type=int, default=16 * 2**20, help=n_help)
    parser.add_argument("--threads", type=int, default=2, help="torch (and kernel) threads")
    parser.add_argument("--repeat", type=int, default=repeat, help="timed calls per row (median)")
    return parser.parse_args()
