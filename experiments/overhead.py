"""Overhead: what does gradient accumulation cost in wall time, and what does it save in peak memory?

Claim C8 says that accumulation makes training slower (about 17% more time is quoted) while it
saves memory.  Here one optimizer step at a fixed effective batch of E samples is timed and its
peak memory measured for N = 1, 2, 4, ... micro-batches of E/N samples, for the MLP (digits) and
the character transformer, in several accumulation *modes*.

**The step** (:func:`train_step`): ``optimizer.zero_grad(set_to_none=True)``; for each of the N
micro-batches: the micro-batch is copied out of the (host) batch, as a data loader hands a step a
fresh tensor (``.to(device, copy=True)``), forward, ``loss / N``, backward; then (buffer modes)
``GradientAccumulator.write_grads()``; then ``Adam.step()`` (torch's default implementation for
the device, lr ``Config.lr``).  The models train from initialisation (``warmup_steps=0``): dense
kernels cost the same whatever the values, so how far training has gone does not matter.

**Modes** (column ``mode``, see :data:`MODES`): ``pytorch`` is plain autograd accumulation into
fp32 ``p.grad`` (the baseline); the others route every micro-gradient through
:class:`precision_lab.training.GradientAccumulator` with an fp32 naive, a bf16 Kahan, a bf16
Neumaier or a bf16 stochastic-rounding buffer (fp32 parameters throughout), i.e. what a user of our
drop-in buffer pays on top of PyTorch (Neumaier has no compiled kernel: it always runs its torch
code path).  ``count_lost=False`` by default: the overhead of the buffer, not of its
stagnation diagnostics.  ``native=False`` by default: the bf16 buffers run their torch code path
(``PRECISION_LAB_NATIVE=0`` during the run; the same bits as the numba kernels).  Once the numba
kernels have run, their OpenMP workers spin between calls, and on the busy development machine
that made every later torch op of the process slower -- plain PyTorch MLP steps measured beside
them up to 3x slower -- which would charge the kernels' cost to the baseline too.  ``native=True``
times the kernels as shipped.

**Timing** (per workload, in one process, so that every ratio compares measurements taken side by
side): ``rounds`` interleaved passes over every (mode, N); in each pass a (mode, N) takes
``warmup`` untimed steps and then ``repeats`` timed steps back to back (warm caches, as in
training).  Interleaving spreads slow drifts of a shared machine's load over every configuration
instead of charging them to whichever ran last.  Each step is timed with ``time.perf_counter``
(after ``torch.cuda.synchronize()`` on CUDA).  Recorded: median, min, quartiles and interquartile
range of the ``repeats * rounds`` times per step (= per effective batch of E samples),
``time_ratio`` = median(N) / median(N = 1) of the same mode (the C8 number) and
``time_vs_pytorch`` = median(mode, N) / median(pytorch, N) (the buffer's overhead).

**Threads**: the steps run under ``intra_op_threads(Config.threads)``, default 1, recorded in the
column ``threads``.  One thread makes timings independent of the core count and of other processes
competing for cores, and it is the setting of every other experiment.  It is also the setting most
favourable to small micro-batches: with more threads the large GEMMs of N = 1 parallelise while the
tiny ones of large N hardly do, so time ratios measured with more threads are expected to be larger
(not measured here: the development machine's 2 cores are shared).  ``None`` uses
whatever torch is set to (all cores by default).

**Peak memory** (a separate, untimed step: tracking slows it down).  A fresh copy of the run
(model, optimizer, buffer) is built, one step at N = 1 creates the persistent state (Adam's moments,
gradients, buffers), the peak is reset, and one step at N is measured:

* ``tensor_peak_bytes`` (every device): :class:`TensorMemoryTracker`, a ``TorchDispatchMode`` that
  sees every aten op and keeps the bytes of the live tensor storages created since it started --
  model, optimizer state, buffers, gradients, micro-batch copies, activations saved for backward
  and the temporaries of backward and of the optimizer.  It does not see memory allocated inside
  kernels (workspaces) or outside torch (numba's per-thread chunk buffers), and not the host batch
  (the data pipeline's, not the step's).
* ``peak_bytes``: on CUDA, ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``,
  minus what was allocated before the run was built (the allocator's view: blocks rounded up to
  512 bytes, workspaces included); on the CPU, ``tensor_peak_bytes``.
* ``static_bytes``: what the run holds between steps (live bytes after the measured step:
  parameters, buffers of the model, gradients, Adam's state, accumulation buffers); on CUDA from
  ``memory_allocated()``, on the CPU from the tracker.  ``peak_ratio`` = peak(N) / peak(N = 1).

**Determinism**: every column except the timing columns (``time_*``, including the two ratios) is
a deterministic function of the config and seed (and of the torch build; on CUDA of the CUDA
libraries).  The timings are measurements of this machine at this moment and differ from run to
run; they are the one exception to ``results.csv`` holding reproducible bytes.

``run`` writes ``results.csv`` + ``metadata.json`` (resumable per workload, shardable);
:mod:`experiments.figures.overhead` only reads them.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import math
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from precision_lab import _native
from precision_lab._threads import intra_op_threads
from precision_lab.checks import check_choice, check_choices, check_int, check_real
from precision_lab.lab.runner import run_tasks
from precision_lab.measure import power_grid, stable_seed
from precision_lab.training import GradientAccumulator
from precision_lab.workloads import MODEL_WORKLOADS, ModelWorkload, make_workload

NAME = "overhead"
SERIAL = True  # `reproduce --jobs K` runs it alone: its wall times must not compete with other processes
TIMING_COLUMNS = (
    "time_median_s",
    "time_min_s",
    "time_q1_s",
    "time_q3_s",
    "time_iqr_s",
    "time_ratio",
    "time_vs_pytorch",
)
COLUMNS = (
    "experiment",
    "workload",
    "mode",
    "buffer_format",
    "strategy",
    "device",
    "threads",
    "n_accum",
    "micro_batch",
    "effective_batch",
    "seed",
    "repeats",
    *TIMING_COLUMNS,
    "peak_bytes",
    "tensor_peak_bytes",
    "static_bytes",
    "peak_ratio",
)


class Mode(NamedTuple):
    """An accumulation mode: plain PyTorch, or a GradientAccumulator buffer."""

    name: str  # the value of the column "mode"
    buffer_format: str | None  # the buffer's format; None: plain autograd accumulation into fp32 p.grad
    strategy: str | None  # the buffer's strategy; None with buffer_format None


# None = plain autograd accumulation into fp32 p.grad, which gives the same bits as an fp32 naive
# buffer (precision_lab.training) -- the two differ only in cost.
MODES: tuple[Mode, ...] = (
    Mode("pytorch", None, None),
    Mode("fp32-naive", "fp32", "naive"),
    Mode("bf16-kahan", "bf16", "kahan"),
    Mode("bf16-neumaier", "bf16", "neumaier"),
    Mode("bf16-stochastic", "bf16", "stochastic"),
)
MODE_BY_NAME: dict[str, Mode] = {m.name: m for m in MODES}


@dataclass(frozen=True)
class Config:
    """What to time and measure.

    Cost: ``rounds * (warmup + repeats)`` steps per (mode, N), plus one memory step per (mode, N),
    which runs N micro-batches under the tracker (5-20x slower than untimed ones); the README has
    measured times.
    """

    workloads: tuple[str, ...] = ("mlp", "transformer")  # see precision_lab.workloads
    effective_batch: tuple[int, ...] = (1024, 64)  # E per workload (digits; text windows of 64 characters)
    n_max: tuple[int, ...] = (1024, 64)  # largest N per workload (powers of two up to it; E/N >= 1 sample)
    size: str = "full"  # workload size preset ("full" or "quick")
    modes: tuple[str, ...] = tuple(m.name for m in MODES)  # which of MODES ("pytorch" is the baseline)
    threads: int | None = 1  # torch intra-op threads for every step (None: leave torch's setting)
    warmup: int = 1  # untimed steps before each timed block
    repeats: int = 3  # timed steps per block (back to back)
    rounds: int = 4  # interleaved passes over every (mode, N); repeats * rounds times per row
    lr: float = 1e-3  # Adam learning rate
    count_lost: bool = False  # let the buffers count lost updates (extra work per add)
    native: bool = False  # let bf16 buffers use the numba kernels (see the module docstring)

    @classmethod
    def quick(cls) -> Config:
        """Seconds: small models, E = 256 digits / 16 windows, N up to 64 / 16."""
        return cls(effective_batch=(256, 16), n_max=(64, 16), size="quick", repeats=2, rounds=2)

    def n_values(self, effective_batch: int, n_max: int) -> list[int]:
        """1, 2, 4, ... up to ``n_max``: the powers of two that divide ``effective_batch``."""
        return [n for n in power_grid(n_max) if effective_batch % n == 0]

    def tasks(self) -> list[Task]:
        """One task per workload: its modes and N are timed side by side in one process.

        Validates the config.  Messages name the field and its value (``"threads 0 must be ..."``).
        """
        if not (len(self.workloads) == len(self.effective_batch) == len(self.n_max)):
            raise ValueError(
                f"effective_batch {self.effective_batch} and n_max {self.n_max} need one entry per "
                f"workload {self.workloads}"
            )
        for w in self.workloads:
            check_choice(w, "workload", MODEL_WORKLOADS)
        for e, n in zip(self.effective_batch, self.n_max, strict=True):
            check_int(e, f"effective_batch {e!r}")
            if not _divides_as_power_of_two(n, e):
                raise ValueError(f"n_max {n!r} must be a power of two that divides the effective batch {e}")
        check_choices(self.modes, "modes", MODE_BY_NAME)
        if "pytorch" not in self.modes:
            raise ValueError(f"modes must include 'pytorch' (the baseline), got {self.modes!r}")
        if self.threads is not None:
            check_int(self.threads, f"threads {self.threads!r}")
        for name, low in (("warmup", 0), ("repeats", 1), ("rounds", 1)):
            v = getattr(self, name)
            check_int(v, f"{name} {v!r}", minimum=low)
        check_real(self.lr, f"lr {self.lr!r}", low=0.0, high=math.inf, low_open=True, high_open=True)
        return [
            Task(workload=w, effective_batch=e, n_max=n)
            for w, e, n in zip(self.workloads, self.effective_batch, self.n_max, strict=True)
        ]


@dataclass(frozen=True)
class Task:
    """One workload: every mode and N of it timed side by side in one process."""

    workload: str  # the workload's name (a model workload of precision_lab.workloads)
    effective_batch: int  # E: samples per optimizer step
    n_max: int  # the largest N (a power of two dividing E)


def _divides_as_power_of_two(n: object, e: int) -> bool:
    """Whether ``n`` is an integer power of two, at most ``e``, that divides ``e``."""
    try:
        n = check_int(n, "n_max", maximum=e)
    except ValueError:
        return False
    return not n & (n - 1) and e % n == 0


# --------------------------------------------------------------------------------------------------
# peak memory of tensors (the CPU has no max_memory_allocated)
# --------------------------------------------------------------------------------------------------
class TensorMemoryTracker(TorchDispatchMode):
    """Bytes of the live tensor storages allocated while active, and their peak.

    Every aten op dispatched while the mode is active passes through :meth:`__torch_dispatch__`
    (backward's too: autograd carries the mode into its engine).  An output whose storage is not
    the storage of one of the op's tensor inputs is a new allocation: its ``nbytes`` are added to
    :attr:`current`, and a finalizer on the storage subtracts them when the storage is freed.  That
    works because PyTorch keeps a storage's Python object alive exactly as long as the storage
    itself (PyObject preservation), so the finalizer runs when the memory is released, not when
    our handle goes away.  Views and in-place results share an input's storage and are not counted
    again; a tracked storage whose size changed (``out=`` ops resize) is re-measured; tensors built
    from Python or numpy data (``torch.tensor``, ``from_numpy``) are counted at their ``lift_fresh``.
    Storages copied below the dispatcher (``copy.deepcopy`` of a plain tensor copies its storage and
    hands it to ``set_``) are not seen: register them with :meth:`track`.  Storages
    created before the mode started are ignored unless registered with :meth:`track`.  With
    ``device``, only storages on that device type count (a CUDA run's step counters live on the CPU).

    Not seen: memory allocated inside kernels (workspaces, temporaries of fused kernels) or outside
    torch's dispatcher (numba's and oneDNN's buffers).  Where a device allocator counts bytes
    (``torch.cuda.max_memory_allocated``) prefer it; this is the CPU stand-in, exact for what it sees.

    Example::

        with TensorMemoryTracker() as tracker:
            a = torch.empty(1000)     # 4000 bytes
            del a
            b = torch.empty(10, dtype=torch.float64)
        tracker.peak, tracker.current  # (4000, 80)
    """

    def __init__(self, device: str | torch.device | None = None) -> None:
        super().__init__()
        self.device_type = None if device is None else torch.device(device).type  # count only this device's
        self._live: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> [nbytes] (shared with its finalizer)
        self.current = 0  # bytes of tracked storages alive now
        self.peak = 0  # most bytes alive at once since creation or the last reset_peak()
        self.allocations = 0  # storages tracked so far

    def _add(self, storage: torch.UntypedStorage) -> None:
        if self.device_type is not None and storage.device.type != self.device_type:
            return
        n = storage.nbytes()
        record = self._live.get(storage)
        if record is None:
            record = [n]
            self._live[storage] = record
            finalizer = weakref.finalize(storage, self._release, record)
            finalizer.atexit = False
            self.current += n
            self.allocations += 1
        elif record[0] != n:  # resized in place
            self.current += n - record[0]
            record[0] = n
        self.peak = max(self.peak, self.current)

    def _release(self, record: list[int]) -> None:
        self.current -= record[0]

    def track(self, *tensors: torch.Tensor) -> None:
        """Count the storages of tensors created before the mode started (each storage once)."""
        for t in tensors:
            self._add(t.untyped_storage())

    def reset_peak(self) -> None:
        """Start a new peak from the bytes alive now (as ``torch.cuda.reset_peak_memory_stats``)."""
        self.peak = self.current

    def __torch_dispatch__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        """Run the op; count the storages of its outputs that none of its inputs already had."""
        # the inputs' storages before the op runs (set_ swaps a tensor's storage for another input).
        # torch.tensor / as_tensor / from_numpy build their tensor below the dispatcher and hand it
        # to lift_fresh, which returns it: its storage is new although it is the op's input.
        inputs = set()
        if func is not torch.ops.aten.lift_fresh.default:
            for t in tree_leaves((args, kwargs)):
                if _strided(t):
                    inputs.add(id(t.untyped_storage()))
                elif isinstance(t, torch.UntypedStorage):
                    inputs.add(id(t))
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if _strided(t):
                st = t.untyped_storage()
                if id(st) not in inputs or st in self._live:
                    self._add(st)
        return out


def _strided(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided


# --------------------------------------------------------------------------------------------------
# one training run and its step
# --------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Run:
    """A model copy, its Adam optimizer and (buffer modes) its GradientAccumulator."""

    model: torch.nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    accumulator: GradientAccumulator | None
    device: torch.device

    @classmethod
    def build(
        cls, wl: ModelWorkload, mode: str, device: torch.device, *, lr: float, seed: int, count_lost: bool
    ) -> _Run:
        spec = MODE_BY_NAME[mode]
        model = _copy_model(wl.model, device)
        acc = None
        if spec.strategy is not None:
            gen = torch.Generator(device=device).manual_seed(seed) if spec.strategy == "stochastic" else None
            acc = GradientAccumulator(
                model.parameters(), strategy=spec.strategy, fmt=spec.buffer_format, generator=gen, count_lost=count_lost
            )
        return cls(model, wl.loss_fn, torch.optim.Adam(model.parameters(), lr=lr), acc, device)

    def step(self, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
        train_step(self.model, self.loss_fn, self.optimizer, x, y, n, accumulator=self.accumulator, device=self.device)

    def close(self) -> None:
        if self.accumulator is not None:
            self.accumulator.remove()


def _copy_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A copy whose tensors are created by dispatched ops (clone), so a running tracker sees them."""
    return copy.deepcopy(model).to(device)


def _native_kernels(on: bool) -> contextlib.AbstractContextManager[None]:
    """Leave precision_lab's numba kernels on, or switch them off for the block (read at every call)."""
    return contextlib.nullcontext() if on else _native.disabled()


def train_step(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    n: int,
    *,
    accumulator: GradientAccumulator | None = None,
    device: str | torch.device = "cpu",
) -> None:
    """One optimizer step on the batch ``(x, y)`` of E samples split into ``n`` micro-batches of E/n."""
    b = x.shape[0] // n
    optimizer.zero_grad(set_to_none=True)
    for i in range(n):
        # a data loader hands the step a fresh micro-batch: a copy, on the CPU as on a GPU
        xb = x[i * b : (i + 1) * b].to(device, copy=True)
        yb = y[i * b : (i + 1) * b].to(device, copy=True)
        loss = loss_fn(model(xb), yb)
        (loss / n).backward()  # scale the loss to account for gradient accumulation
    if accumulator is not None:
        accumulator.write_grads()  # p.grad <- the buffer's sum
    optimizer.step()


def _timed_step(run: _Run, x: torch.Tensor, y: torch.Tensor, n: int) -> float:
    cuda = run.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(run.device)
    start = time.perf_counter()
    run.step(x, y, n)
    if cuda:
        torch.cuda.synchronize(run.device)  # the step is over when the device is done
    return time.perf_counter() - start


def measure_memory(
    wl: ModelWorkload,
    mode: str,
    x: torch.Tensor,
    y: torch.Tensor,
    n: int,
    *,
    device: str | torch.device = "cpu",
    lr: float = 1e-3,
    seed: int = 0,
    count_lost: bool = False,
) -> dict[str, int]:
    """Peak memory of one step at ``n`` with a fresh run of ``mode`` (see the module docstring).

    Returns ``peak_bytes``, ``tensor_peak_bytes`` and ``static_bytes``.
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    base = 0
    if cuda:
        gc.collect()  # garbage freed during the step would lower the allocator's count below base
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
    with TensorMemoryTracker(dev) as tracker:
        run = _Run.build(wl, mode, dev, lr=lr, seed=seed, count_lost=count_lost)
        # deepcopy clones parameters through the dispatcher but copies plain buffers' storages below it
        tracker.track(*run.model.parameters(), *run.model.buffers())
        run.step(x, y, 1)  # Adam's moments, gradients, buffers: the state every later step starts from
        tracker.reset_peak()
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        run.step(x, y, n)
        if cuda:
            torch.cuda.synchronize(dev)
        out = {"tensor_peak_bytes": tracker.peak, "peak_bytes": tracker.peak, "static_bytes": tracker.current}
        if cuda:
            out["peak_bytes"] = torch.cuda.max_memory_allocated(dev) - base
            out["static_bytes"] = torch.cuda.memory_allocated(dev) - base
    run.close()
    return out


def _quartiles(times: list[float]) -> tuple[float, float, float]:
    if len(times) == 1:
        return times[0], times[0], times[0]
    q1, q2, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, q2, q3


# --------------------------------------------------------------------------------------------------
# the experiment
# --------------------------------------------------------------------------------------------------
def run(
    config: Config,
    out_dir: str | Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> Path | None:
    """Time and measure every (workload, mode, N); returns ``results.csv`` once every workload is done."""
    tasks = config.tasks()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}; known: 'cpu', 'cuda'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu'")

    def work(task: Task) -> list[dict[str, Any]]:
        with intra_op_threads(config.threads), _native_kernels(config.native):
            return measure(task)

    def measure(task: Task) -> list[dict[str, Any]]:
        w, e = task.workload, task.effective_batch
        grid = config.n_values(e, task.n_max)
        cells = list(itertools.product(config.modes, grid))  # every (mode, N), mode-major
        wl = make_workload(w, seed=seed, size=config.size, warmup_steps=0)
        data_seed = stable_seed(seed, w, "data")
        x, y = wl.sample(e, torch.Generator().manual_seed(data_seed))  # the host batch, the same for every step
        runs = {
            m: _Run.build(wl, m, dev, lr=config.lr, seed=stable_seed(seed, w, m), count_lost=config.count_lost)
            for m in config.modes
        }
        times: dict[tuple[str, int], list[float]] = {cell: [] for cell in cells}
        for _ in range(config.rounds):
            for m, n in cells:
                for _ in range(config.warmup):
                    runs[m].step(x, y, n)
                times[m, n] += [_timed_step(runs[m], x, y, n) for _ in range(config.repeats)]
        for r in runs.values():
            r.close()
        del runs
        gc.collect()
        memory: dict[tuple[str, int], dict[str, int]] = {}
        for m, n in cells:
            run_seed = stable_seed(seed, w, m)
            memory[m, n] = measure_memory(
                wl, m, x, y, n, device=dev, lr=config.lr, seed=run_seed, count_lost=config.count_lost
            )
        median = {k: statistics.median(v) for k, v in times.items()}
        rows = []
        for m, n in cells:
            spec = MODE_BY_NAME[m]
            q1, _, q3 = _quartiles(times[m, n])
            mem = memory[m, n]
            rows.append(
                {
                    "experiment": NAME,
                    "workload": w,
                    "mode": m,
                    "buffer_format": spec.buffer_format or "fp32",
                    "strategy": spec.strategy or "naive",
                    "device": str(dev),
                    "threads": torch.get_num_threads(),
                    "n_accum": n,
                    "micro_batch": e // n,
                    "effective_batch": e,
                    "seed": data_seed,
                    "repeats": len(times[m, n]),
                    "time_median_s": median[m, n],
                    "time_min_s": min(times[m, n]),
                    "time_q1_s": q1,
                    "time_q3_s": q3,
                    "time_iqr_s": q3 - q1,
                    "time_ratio": median[m, n] / median[m, 1],
                    "time_vs_pytorch": median[m, n] / median["pytorch", n],
                    **mem,
                    "peak_ratio": mem["peak_bytes"] / memory[m, 1]["peak_bytes"],
                }
            )
        return rows

    return run_tasks(
        NAME,
        out_dir,
        tasks,
        work,
        columns=COLUMNS,
        config=config,
        seed=seed,
        device=device,
        shard=shard,
        progress=progress,
    )
