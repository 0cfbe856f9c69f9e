"""Speed of the compiled generic rounding against ``rounding._generic``, with a copy as the baseline.

Usage::

    python benchmarks/bench_generic.py [--n 16777216] [--threads 2] [--repeat 7]

For each case (a target format, a mode and an input dtype) it times, in the same process:

* ``buf.copy_(x)``: a plain copy into a preallocated buffer of x's dtype (the memory traffic floor
  of any elementwise pass that reads x and writes a result of the same size);
* ``out.copy_(_generic(x, f, mode, ...))``: the pure-torch exact rounding (float64, ~25 ops), as
  ``rounding._finish`` hands it to the caller;
* ``round_into(x, out, f, mode, ...)``: the numba kernels of ``precision_lab._native_generic``.

and prints a markdown table: median wall time (of ``--repeat`` calls after a warm-up; the torch
rows use at most 3), giga elements per second, the ratio to the copy, and whether the kernel's bits
equal ``_generic``'s on the benchmark data.
"""

from __future__ import annotations

import os
import platform

import torch
from _common import parse_args, timeit

from precision_lab import _native_generic
from precision_lab.formats import Format, get_format
from precision_lab.rounding import _generic

CASES = [  # (label, target format, mode, input dtype)
    ("tf32 RN from fp32", "tf32", "nearest", torch.float32),
    ("fp16 SR from fp32", "fp16", "stochastic", torch.float32),
    ("bf16 RN from fp64", "bf16", "nearest", torch.float64),
    ("fp8_e4m3 SR from fp32", "fp8_e4m3", "stochastic", torch.float32),
]
KEY = 0x2545F4914F6CDD1D  # a fixed stream key: the timed work does not depend on it


def make_input(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal values spread over 2^-20 .. 2^20 (full-width mantissas in the input dtype)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp2(torch.randint(-20, 20, (n,), generator=g))
    return x.to(dtype)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeat=7)
    if not _native_generic.enabled():
        raise SystemExit("the compiled kernels are off (numba missing or PRECISION_LAB_NATIVE=0)")
    torch.set_num_threads(args.threads)
    n = args.n

    print(
        f"# bench_generic: n = {n:,}, threads = {args.threads}, median of {args.repeat} (torch rows: "
        f"{min(args.repeat, 3)}), 1 warm-up"
    )
    print(
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f} at the start (other processes skew the times)\n"
    )
    print("| case | implementation | ms | G elem/s | x copy_ | bits equal |")
    print("| --- | --- | ---: | ---: | ---: | :---: |")
    for seed, (label, fname, mode, dtype) in enumerate(CASES):
        f = get_format(fname)
        x = make_input(n, dtype, seed)
        buf, out_torch, out_native = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)

        def copy(x: torch.Tensor = x, buf: torch.Tensor = buf) -> None:
            buf.copy_(x)

        def torch_path(x: torch.Tensor = x, out: torch.Tensor = out_torch, f: Format = f, mode: str = mode) -> None:
            out.copy_(_generic(x, f, mode, key=KEY))

        def native(x: torch.Tensor = x, out: torch.Tensor = out_native, f: Format = f, mode: str = mode) -> None:
            _native_generic.round_into(x, out, f, mode, saturate=False, key=KEY, random_bits=None)

        base = timeit(copy, args.repeat, warmup=1)
        t_torch = timeit(torch_path, min(args.repeat, 3), warmup=1)
        t_native = timeit(native, args.repeat, warmup=1)
        same = torch.equal(
            out_torch.view(torch.int64 if dtype == torch.float64 else torch.int32),
            out_native.view(torch.int64 if dtype == torch.float64 else torch.int32),
        )
        dt = str(dtype).removeprefix("torch.")
        for impl, t, eq in [
            (f"`buf.copy_(x)` {dt} (baseline)", base, ""),
            ("`_generic` (torch, float64)", t_torch, ""),
            ("`round_into` (numba)", t_native, "yes" if same else "NO"),
        ]:
            print(f"| {label} | {impl} | {t * 1e3:.1f} | {n / t / 1e9:.3f} | {t / base:.2f} | {eq} |", flush=True)
        print(f"| {label} | speedup of the kernel over `_generic` | | {t_torch / t_native:.0f}x | | |", flush=True)


if __name__ == "__main__":
    main()
