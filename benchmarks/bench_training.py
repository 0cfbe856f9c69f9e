"""Speed of a training window through ``GradientAccumulator``, against plain PyTorch accumulation in the same process.

Usage::

    python benchmarks/bench_training.py [--threads 2] [--repeat 7] [--n-micro 8] [--micro-batch 4]
                                        [--models deep,wide,transformer] [--clock wall|cpu]

A *window* is what one optimizer step costs in accumulation: ``--n-micro`` micro-steps (forward on
``--micro-batch`` samples, ``(loss / N).backward()``), then ``write_grads()`` (buffer cases), then
``zero_grad(set_to_none=True)``.  The baseline is the same window with plain autograd accumulation
into ``p.grad``.  Every case trains its own copy of the model on the same data.  The cases of one
model and dtype are *interleaved*: each repeat times one window of the baseline and of every case
in turn (after two untimed windows each), so a machine whose load drifts slows them all alike; the
table gives the median window time and its ratio to the baseline's median.  Counting is off (the
``GradientAccumulator`` defaults).

Models (``--models``):

* ``deep``: 24 x (Linear 128 x 128, LayerNorm, GELU), 0.4M parameters in 96 tensors, most of them
  small (biases and norms);
* ``wide``: Linear 1024 -> 2048, 2048 -> 2048 twice, 2048 -> 1024 with GELUs, 12.6M parameters;
* ``transformer``: ``precision_lab.workloads.make_workload("transformer")`` (the character GPT), its
  own loss and data.

each as fp32 and as bf16 parameters.  Cases: ``naive`` in the parameter's own format (the default
buffer); a bf16 model's fp32 buffer (Megatron's ``main_grad`` recipe); bf16 ``kahan`` and bf16
``stochastic`` buffers.  Targets (ratio to plain PyTorch): naive own format <= 1.10x; fp32 buffer
for a bf16 model <= 1.25x; bf16 kahan and bf16 stochastic on a bf16 model <= 1.5x (on an fp32
model, whose gradients they round first, they are shown without a target).

The compiled kernels (``precision_lab/_native_training.py``, numba) are on when numba is installed;
``PRECISION_LAB_NATIVE=0`` runs the pure-torch paths (same bits).  The first run compiles them
(about 10 s, cached in ``precision_lab/__pycache__``).  On a shared machine check the load
(``uptime``) before trusting a table; the ratios, measured side by side, are what to compare.
``--clock cpu`` times the process's CPU time (``time.process_time``) instead of the wall clock:
with ``--threads 1`` that is the work done, which other processes' load does not stretch (they
take turns on the cores, and the wall clock counts their turns too); with more threads it also
counts workers spinning between parallel regions.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from precision_lab import _native
from precision_lab.training import GradientAccumulator
from precision_lab.workloads import make_workload

TARGETS = {"naive, own format": 1.10, "fp32 buffer": 1.25, "kahan bf16": 1.5, "stochastic bf16": 1.5}
BF16_MODEL_ONLY = ("kahan bf16", "stochastic bf16")  # the targets for these are on bf16 models
MODELS = ("deep", "wide", "transformer")


@dataclass
class Workload:
    """A model with its loss and a fixed list of micro-batches."""

    model: nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batches: list[tuple[torch.Tensor, torch.Tensor]]


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.float(), y)


def make(name: str, dtype: torch.dtype, n_micro: int, micro_batch: int) -> Workload:
    """The model of ``name`` in ``dtype`` and ``n_micro`` seeded micro-batches."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # nn.Linear's initialisation: the same weights in every run of the benchmark
    if name == "deep":
        layers: list[nn.Module] = []
        for _ in range(24):
            layers += [nn.Linear(128, 128), nn.LayerNorm(128), nn.GELU()]
        model, d_in, d_out = nn.Sequential(*layers), 128, 128
    elif name == "wide":
        widths = (1024, 2048, 2048, 2048, 1024)
        layers = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.GELU()]
        model, d_in, d_out = nn.Sequential(*layers[:-1]), widths[0], widths[-1]
    else:
        wl = make_workload(name, seed=0, warmup_steps=0)
        batches = [wl.sample(micro_batch, g) for _ in range(n_micro)]
        return Workload(wl.model.to(dtype), wl.loss_fn, batches)
    batches = [
        (torch.randn(micro_batch, d_in, generator=g).to(dtype), torch.randn(micro_batch, d_out, generator=g))
        for _ in range(n_micro)
    ]
    return Workload(model.to(dtype), _mse, batches)


def cases_for(dtype: torch.dtype) -> list[tuple[str, dict]]:
    """(name, GradientAccumulator keyword arguments) of the buffer cases for a model of ``dtype``."""
    cases = [("naive, own format", {})]
    if dtype == torch.bfloat16:
        cases.append(("fp32 buffer", {"strategy": "naive", "fmt": "fp32"}))
    cases += [
        ("kahan bf16", {"strategy": "kahan", "fmt": "bf16"}),
        ("stochastic bf16", {"strategy": "stochastic", "fmt": "bf16", "generator": torch.Generator().manual_seed(1)}),
    ]
    return cases


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def window(model: nn.Module, wl: Workload, acc: GradientAccumulator | None, clock: Callable[[], float]) -> float:
    """Seconds of one window: the micro-steps, write_grads (with a buffer), zero_grad."""
    n = len(wl.batches)
    t0 = clock()
    for x, y in wl.batches:
        (wl.loss(model(x), y) / n).backward()
    if acc is not None:
        acc.write_grads()
    model.zero_grad(set_to_none=True)
    return clock() - t0


def bench(name: str, dtype: torch.dtype, args: argparse.Namespace) -> list[tuple[str, float, float]]:
    """Rows (case, median ms, ratio to plain) for one model and dtype, timed interleaved."""
    wl = make(name, dtype, args.n_micro, args.micro_batch)
    runs: list[tuple[str, nn.Module, GradientAccumulator | None]] = [("plain PyTorch (baseline)", wl.model, None)]
    for case, kwargs in cases_for(dtype):
        model = copy.deepcopy(wl.model)
        runs.append((case, model, GradientAccumulator(model.parameters(), **kwargs)))
    times: dict[str, list[float]] = {case: [] for case, _, _ in runs}
    clock = CLOCKS[args.clock]
    for _, model, acc in runs:  # warm-up (and the kernels' first compilation)
        for _ in range(2):
            window(model, wl, acc, clock)
    for _ in range(args.repeat):
        for case, model, acc in runs:
            times[case].append(window(model, wl, acc, clock))
    for _, _, acc in runs:
        if acc is not None:
            acc.remove()
    base = statistics.median(times[runs[0][0]])
    return [(case, statistics.median(t), statistics.median(t) / base) for case, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeat", type=int, default=7, help="timed windows per case (median)")
    parser.add_argument("--n-micro", type=int, default=8, help="micro-steps per window (N)")
    parser.add_argument("--micro-batch", type=int, default=4, help="samples per micro-step")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or the process's CPU time")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)
    print(
        f"# bench_training: N = {args.n_micro} micro-steps of {args.micro_batch} samples, threads = {args.threads}, "
        f"median of {args.repeat} interleaved windows (2 warm-up), {args.clock} clock"
    )
    print(
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
        f"{platform.processor() or platform.machine()}, compiled kernels: {'on' if _native.enabled() else 'OFF'}\n"
    )
    print("| model | params | case | window ms | x plain PyTorch | target |")
    print("| --- | ---: | --- | ---: | ---: | --- |")
    verdicts = []
    for name in models:
        for dtype in (torch.float32, torch.bfloat16):
            label = f"{name} {str(dtype).removeprefix('torch.')}"
            rows = bench(name, dtype, args)
            params = sum(p.numel() for p in make(name, dtype, 1, 1).model.parameters())
            for case, sec, ratio in rows:
                target = TARGETS.get(case)
                if case in BF16_MODEL_ONLY and dtype != torch.bfloat16:
                    target = None
                verdict = "" if target is None else f"<= {target:.2f}: {'met' if ratio <= target else 'NOT met'}"
                if target is not None:
                    verdicts.append(ratio <= target)
                print(f"| {label} | {params / 1e6:.2f}M | {case} | {sec * 1e3:.1f} | {ratio:.2f} | {verdict} |")
    print(f"\n{sum(verdicts)} of {len(verdicts)} targets met.")


if __name__ == "__main__":
    main()
