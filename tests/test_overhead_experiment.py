"""The overhead experiment at tiny sizes: the grid, the memory tracker against hand counts, determinism.

Speed is never asserted (timings depend on the machine and its load); only that the timing columns
are positive, finite and consistent with each other.  Every byte count is asserted exactly.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch

from experiments import overhead
from experiments.figures.overhead import plot
from experiments.overhead import TensorMemoryTracker, train_step
from precision_lab._threads import intra_op_threads
from precision_lab.lab.results import read_csv
from precision_lab.workloads import make_workload

_NATIVE_ENV = os.environ.get("PRECISION_LAB_NATIVE")  # as the session started, before any run
TINY = overhead.Config(
    workloads=("mlp", "transformer"),
    effective_batch=(16, 4),
    n_max=(16, 4),
    size="quick",
    warmup=0,
    repeats=1,
    rounds=2,
)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return overhead.run(TINY, tmp_path_factory.mktemp("ov") / "a", seed=0, progress=False)


def _rows(path: Path) -> list[dict[str, str]]:
    return read_csv(path)


def _row(rows: list[dict[str, str]], workload: str, mode: str, n: int) -> dict[str, str]:
    return next(r for r in rows if r["workload"] == workload and r["mode"] == mode and int(r["n_accum"]) == n)


# --------------------------------------------------------------------------------------------------
# the grid and its columns
# --------------------------------------------------------------------------------------------------
def test_complete_grid_and_columns(result: Path) -> None:
    rows = _rows(result)
    assert list(rows[0]) == list(overhead.COLUMNS)
    want = {
        (w, m, n)
        for w, e in zip(TINY.workloads, TINY.effective_batch, strict=True)
        for m in TINY.modes
        for n in (1, 2, 4, 8, 16)
        if n <= e
    }
    assert [(r["workload"], r["mode"], int(r["n_accum"])) for r in rows] == sorted(
        want, key=lambda k: (TINY.workloads.index(k[0]), TINY.modes.index(k[1]), k[2])
    )
    for r in rows:
        e, n = int(r["effective_batch"]), int(r["n_accum"])
        assert int(r["micro_batch"]) * n == e
        assert (r["device"], r["threads"], r["repeats"]) == ("cpu", "1", str(TINY.repeats * TINY.rounds))
        t = {c: float(r[c]) for c in overhead.TIMING_COLUMNS}
        assert all(math.isfinite(v) and v > 0 for k, v in t.items() if k != "time_iqr_s"), r
        assert t["time_min_s"] <= t["time_q1_s"] <= t["time_median_s"] <= t["time_q3_s"]
        assert t["time_iqr_s"] == t["time_q3_s"] - t["time_q1_s"] >= 0
        base = _row(rows, r["workload"], r["mode"], 1)
        assert t["time_ratio"] == t["time_median_s"] / float(base["time_median_s"])
        pt = _row(rows, r["workload"], "pytorch", n)
        assert t["time_vs_pytorch"] == t["time_median_s"] / float(pt["time_median_s"])
        assert r["peak_bytes"] == r["tensor_peak_bytes"]  # on the CPU the tracker is the measure
        assert 0 < int(r["static_bytes"]) < int(r["peak_bytes"])
        assert float(r["peak_ratio"]) == int(r["peak_bytes"]) / int(base["peak_bytes"])
    # the environment variable that switches the numba kernels off during the run is restored
    assert os.environ.get("PRECISION_LAB_NATIVE") == _NATIVE_ENV


def test_static_bytes_counted_by_hand(result: Path) -> None:
    """Between steps a run holds parameters, gradients, Adam's two moments and step counters, buffers."""
    rows = _rows(result)
    for w in TINY.workloads:
        model = make_workload(w, seed=0, size="quick", warmup_steps=0).model
        p = sum(q.numel() for q in model.parameters())
        tensors = len(list(model.parameters()))
        model_buffers = sum(b.nbytes for b in model.buffers())  # the transformer's causal masks and positions
        pytorch = 4 * p + 4 * p + 8 * p + 4 * tensors + model_buffers  # fp32 params, grads, exp_avg(_sq), step
        extra = {"pytorch": 0, "fp32-naive": 4 * p, "bf16-kahan": 2 * 2 * p, "bf16-stochastic": 2 * p}
        for mode, more in extra.items():
            for n in (1, TINY.n_max[TINY.workloads.index(w)]):
                assert int(_row(rows, w, mode, n)["static_bytes"]) == pytorch + more, (w, mode, n)


def test_peak_memory_falls_with_n(result: Path) -> None:
    """Activations scale with the micro-batch: the peak falls with N towards the state held between steps."""
    rows = _rows(result)
    for w, n_max in zip(TINY.workloads, TINY.n_max, strict=True):
        for mode in TINY.modes:
            peaks = [int(r["peak_bytes"]) for r in rows if r["workload"] == w and r["mode"] == mode]
            assert all(a > b for a, b in zip(peaks[:-1], peaks[1:], strict=True)), (w, mode, peaks)  # strictly falling
            assert int(_row(rows, w, mode, n_max)["peak_bytes"]) < int(_row(rows, w, mode, 1)["peak_bytes"])


def test_peak_memory_depends_on_the_micro_batch_only(result: Path) -> None:
    """For N >= 2 the transformer's peak is the state held between steps plus c + k * (micro-batch).

    Whatever E is: the same micro-batch gives the same peak (E = 8 here, E = 4 in the grid), and
    the part above the held state is affine in the micro-batch b (activations saved for backward).
    """
    rows = _rows(result)
    wl = make_workload("transformer", seed=0, size="quick", warmup_steps=0)
    x, y = wl.sample(8, torch.Generator().manual_seed(0))
    with intra_op_threads(1):
        peak = {8 // n: overhead.measure_memory(wl, "pytorch", x, y, n)["peak_bytes"] for n in (2, 4, 8)}
    for b in (1, 2):
        assert peak[b] == int(_row(rows, "transformer", "pytorch", 4 // b)["peak_bytes"])
    assert peak[4] - peak[2] == 2 * (peak[2] - peak[1]) > 0


def test_same_seed_same_non_timing_columns(result: Path, tmp_path: Path) -> None:
    again = _rows(overhead.run(TINY, tmp_path, seed=0, progress=False))
    keep = [c for c in overhead.COLUMNS if c not in overhead.TIMING_COLUMNS]
    assert [[r[c] for c in keep] for r in again] == [[r[c] for c in keep] for r in _rows(result)]


def test_plot_writes_png_and_svg(result: Path, tmp_path: Path) -> None:
    (png,) = plot(result.parent, tmp_path / "figures")
    assert png == tmp_path / "figures" / "overhead.png"
    assert png.stat().st_size > 10_000
    assert png.with_suffix(".svg").stat().st_size > 10_000


# --------------------------------------------------------------------------------------------------
# the memory tracker
# --------------------------------------------------------------------------------------------------
def test_tracker_exact_on_known_allocations() -> None:
    before = torch.ones(10)  # created outside: not counted unless registered
    with TensorMemoryTracker() as tracker:
        a = torch.empty(1000)  # 4000 bytes
        v = a[10:20].view(2, 5)  # a view: no new storage
        a.add_(1.0)  # in place: nothing new
        b = torch.zeros(3, 5, dtype=torch.float64)  # 120
        assert (tracker.current, tracker.peak) == (4120, 4120)
        c = before + 1  # 40: a new result of an old tensor
        d = before.view(2, 5)  # a view of an old tensor: not counted
        e = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)  # 6, built below the dispatcher (lift_fresh)
        assert (tracker.current, tracker.peak) == (4166, 4166)
        del a
        assert tracker.current == 4166  # the view keeps the storage alive
        del v
        assert tracker.current == 166
        out = torch.empty(0, dtype=torch.float64)
        torch.mul(b, 2.0, out=out)  # out= resizes its storage from 0 to 120 bytes
        assert (tracker.current, tracker.peak) == (286, 4166)
        tracker.reset_peak()
        tracker.track(before, d)  # register the old storage (once, though two tensors share it)
        assert (tracker.current, tracker.peak) == (326, 326)
        del b, c, e, out
        assert tracker.current == 40
    assert tracker.allocations == 6


def test_tracker_counts_only_its_device() -> None:
    with TensorMemoryTracker("cuda") as tracker:
        a = torch.empty(1000)  # a CPU storage: not counted by a CUDA tracker
        tracker.track(a)
    assert (tracker.current, tracker.peak, tracker.allocations) == (0, 0, 0)


def _linear_peak(d: int, e: int, n: int) -> tuple[int, int]:
    """Measured (peak, bytes at the start) of a train_step of ``x @ w`` (w of d floats) at N = n, SGD."""

    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(d))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.w

    x, y = torch.randn(e, d, generator=torch.Generator().manual_seed(0)), torch.zeros(e)
    with TensorMemoryTracker() as tracker:
        model = Linear()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no state, updates in place

        def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return out.sum()

        train_step(model, loss_fn, opt, x, y, 1)  # leaves p.grad behind, as every step does
        start = tracker.current
        tracker.reset_peak()
        train_step(model, loss_fn, opt, x, y, n)
    return tracker.peak, start


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 64])
def test_tracker_linear_model_counted_by_hand(n: int) -> None:
    """Peak of one step of a linear model, counted tensor by tensor (fp32: 4 bytes; micro-batch b = E/N).

    Held throughout: w (4d); at the start also last step's p.grad (4d), freed by zero_grad.
    * N = 1: during backward w, the new gradient (4d), the micro-batch copies x (4bd) and y (4b) and
      four scalars (loss, loss / N, backward's seed gradient and its quotient by N): 8d + 4bd + 4b + 16.
    * N >= 2, either (a) the next micro-batch's x copy is made while the previous x and y copies and
      the previous loss are still referenced by the loop's variables: w, p.grad, 2 x 4bd, 4b, 4; or
      (b) in backward, the new gradient exists beside p.grad before it is added in place: w,
      p.grad, new gradient, 4bd, 4b, four scalars.
    """
    d, e = 1000, 64
    b = e // n
    peak, start = _linear_peak(d, e, n)
    assert start == 8 * d  # w and p.grad
    if n == 1:
        expected = 8 * d + 4 * b * d + 4 * b + 16
    else:
        expected = max(8 * d + 8 * b * d + 4 * b + 4, 12 * d + 4 * b * d + 4 * b + 16)
    assert peak == expected


def test_native_kernels_switch_restores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRECISION_LAB_NATIVE", "1")
    with overhead._native_kernels(False):
        assert os.environ["PRECISION_LAB_NATIVE"] == "0"
    assert os.environ["PRECISION_LAB_NATIVE"] == "1"
    monkeypatch.delenv("PRECISION_LAB_NATIVE")
    with overhead._native_kernels(False):
        assert os.environ["PRECISION_LAB_NATIVE"] == "0"
    assert "PRECISION_LAB_NATIVE" not in os.environ
    with overhead._native_kernels(True):
        assert "PRECISION_LAB_NATIVE" not in os.environ


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"effective_batch": (16,)}, "one entry per workload"),
        ({"workloads": ("mlp", "resnet")}, "unknown workload 'resnet'"),
        ({"effective_batch": (0, 4)}, "effective_batch 0 must be"),
        ({"n_max": (3, 4)}, "n_max 3 must be a power of two"),
        ({"n_max": (32, 4)}, "n_max 32 must be a power of two that divides the effective batch 16"),
        ({"modes": ("fp32-naive",)}, "must include 'pytorch'"),
        ({"modes": ("pytorch", "bf16-pairwise")}, "'bf16-pairwise'"),
        ({"threads": 0}, "threads 0 must be"),
        ({"repeats": 0}, "repeats 0 must be"),
        ({"rounds": 1.5}, "rounds 1.5 must be"),
        ({"warmup": -1}, "warmup -1 must be"),
        ({"lr": math.nan}, "lr nan must be"),
    ],
)
def test_bad_config_names_the_value(changes: dict, message: str) -> None:
    config = overhead.Config(**{**{f: getattr(TINY, f) for f in ("workloads", "effective_batch", "n_max")}, **changes})
    with pytest.raises(ValueError, match=re.escape(message)):
        overhead.run(config, "unused", progress=False)


def test_bad_device_names_the_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="device 'tpu'"):
        overhead.run(TINY, tmp_path, device="tpu", progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_cuda_without_gpu_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="device 'cuda' requested but CUDA is not available"):
        overhead.run(TINY, tmp_path, device="cuda", progress=False)


# --------------------------------------------------------------------------------------------------
# CUDA: the allocator's peak next to the tracker's
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_allocator_and_tracker_agree(tmp_path: Path) -> None:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with TensorMemoryTracker() as tracker:
        a = torch.empty(1024, device="cuda")  # 4096 bytes: a multiple of the allocator's 512-byte blocks
        b = torch.empty(2048, device="cuda", dtype=torch.float64)  # 16384
        del a
        c = torch.empty(128, device="cuda")  # 512
        torch.cuda.synchronize()
    assert tracker.peak == 4096 + 16384 == torch.cuda.max_memory_allocated() - base
    assert tracker.current == 16384 + 512 == torch.cuda.memory_allocated() - base
    del b, c

    rows = _rows(overhead.run(TINY, tmp_path, device="cuda", progress=False))
    assert len(rows) == len(_rows_cpu_grid())
    for r in rows:
        assert r["device"] == "cuda"
        assert all(math.isfinite(float(r[c])) and float(r[c]) >= 0 for c in overhead.TIMING_COLUMNS)
        # the allocator sees every tensor the tracker sees, rounded up to 512-byte blocks, and workspaces
        assert 0 < int(r["tensor_peak_bytes"]) <= int(r["peak_bytes"])
        assert 0 < int(r["static_bytes"]) < int(r["peak_bytes"])
    assert int(_row(rows, "transformer", "pytorch", 4)["peak_bytes"]) < int(
        _row(rows, "transformer", "pytorch", 1)["peak_bytes"]
    )


def _rows_cpu_grid() -> list[tuple[str, str, int]]:
    return [
        (w, m, n)
        for w, e in zip(TINY.workloads, TINY.effective_batch, strict=True)
        for m in TINY.modes
        for n in TINY.n_values(e, e)
    ]
