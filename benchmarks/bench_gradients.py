"""Micro-gradient throughput (vmap vs loop) and the cost of a whole N-curve, in one process.

Usage::

    python benchmarks/bench_gradients.py [--threads 2] [--repeat 3] [--n-max 4096]

Table 1: micro-gradients per second of :class:`~precision_lab.gradients.GradientEngine` for the
MLP (digits) and the character transformer, fp32 and pure bf16, micro-batch sizes 1, 8 and 32,
``loop`` (the baseline: one ``torch.func.grad`` per micro-batch, what a training loop does) against
``vmap`` (chunks of at most 64 micro-batches and 256 samples), with the speed-up.  Both compute
with one intra-op thread (the engine's default, which makes them bit-identical).

Table 2: the cost of an error-vs-N curve at a fixed micro-batch (regime ``fixed_micro``, ``post``
scaling, 4 buffers: fp32 naive, bf16 naive/kahan/stochastic) recording every power of two up to
``--n-max``, relative to one accumulation of ``--n-max`` micro-gradients recorded only at the end
(the baseline), and relative to the naive alternative of one pass per N.  The issue's target: the
whole curve costs about one accumulation.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from _common import timeit

from precision_lab.gradients import GradientEngine
from precision_lab.measure import fixed_micro, power_grid
from precision_lab.workloads import make_workload

BUFFERS = [("fp32", "naive"), ("bf16", "naive"), ("bf16", "kahan"), ("bf16", "stochastic")]


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per row (median)")
    p.add_argument("--n-max", type=int, default=4096, help="N_max of the curve (table 2)")
    p.add_argument("--size", default="full", choices=["full", "quick"], help="workload size preset")
    return p.parse_args()


def throughput(args: argparse.Namespace) -> None:
    print("| workload | compute | micro-batch | loop (grads/s) | vmap (grads/s) | vmap speed-up |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in ("mlp", "transformer"):
        wl = make_workload(name, size=args.size)
        for compute in ("fp32", "bf16"):
            for micro in (1, 8, 32):
                n = 256 if name == "mlp" else 64
                x, y = wl.sample(n * micro, torch.Generator().manual_seed(0))
                rate = {}
                for method in ("loop", "vmap"):
                    eng = GradientEngine(wl.model, wl.loss_fn, compute, method=method, chunk_size=64)
                    t = timeit(
                        lambda eng=eng, x=x, y=y, n=n: sum(c.shape[0] for c in eng.micro_gradients(x, y, n)),
                        args.repeat,
                        1,
                    )
                    rate[method] = n / t
                print(
                    f"| {name} | {compute} | {micro} | {rate['loop']:,.0f} | {rate['vmap']:,.0f} | "
                    f"{rate['vmap'] / rate['loop']:.2f}x |"
                )


def curve_cost(args: argparse.Namespace) -> None:
    print(
        f"\n| workload | params | one accumulation to N={args.n_max} (baseline) | whole curve "
        f"({len(power_grid(args.n_max))} points) | ratio | one pass per N | ratio |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, micro in (("mlp", 1), ("transformer", 1)):
        wl = make_workload(name, size=args.size)
        x, y = wl.sample(args.n_max * micro, torch.Generator().manual_seed(0))
        eng = GradientEngine(wl.model, wl.loss_fn, "fp32", chunk_size=64)
        grid = power_grid(args.n_max)

        def run(
            record: list[int], eng: GradientEngine = eng, x: torch.Tensor = x, y: torch.Tensor = y, micro: int = micro
        ) -> None:
            fixed_micro(eng, x, y, micro, record, BUFFERS, scaling="post", seed=0)

        run([2])  # warm-up: first-call costs (kernel compilation, allocator) stay out of the timings
        t0 = time.perf_counter()
        run([args.n_max])
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        run(grid)
        whole = time.perf_counter() - t0
        t0 = time.perf_counter()
        for n in grid:
            run([n])
        separate = time.perf_counter() - t0
        print(
            f"| {name} | {eng.num_params:,} | {one:.2f} s | {whole:.2f} s | {whole / one:.2f} | "
            f"{separate:.2f} s | {separate / one:.2f} |"
        )


def main() -> None:
    args = _args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads\n")
    throughput(args)
    curve_cost(args)


if __name__ == "__main__":
    main()
