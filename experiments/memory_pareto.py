"""Memory Pareto: buffer bytes per parameter vs accumulated-gradient error, at N = 16, 256 and 4096.

Which accumulation buffer buys the most accuracy per byte?  A bf16 Kahan buffer (sum and
compensation, 2 + 2 bytes) costs what an fp32 buffer costs: which wins?

**Errors.**  A fixed effective batch of E samples is split into N micro-batches of E/N; the
micro-gradients are computed in fp32 (``compute_format``) and fed to every buffer of the grid in
one pass (:func:`precision_lab.measure.fixed_effective`), with ``post`` scaling (sum, then one
division by N, a power of two, in the buffer format).  The error is the relative L2 distance to the
gradient of all E samples computed once in fp64.  The MLP runs at E = 4096 digits (N = 16, 256,
4096, so micro-batches of 256, 16 and 1 sample); the transformer at E = 256 text windows, its
effective batch in the model-gradients experiment (N = 16, 256).  Errors are means over ``trials``
independent batches (each with its own stochastic-rounding seed).

**Two floors per format** (columns): ``quantisation_floor`` is the fp64 truth rounded once to the
buffer format; ``input_floor`` is the exact (superaccumulator) sum of the micro-gradients *after*
each is rounded to the buffer format, which every strategy does first (``Accumulator.add``), then
scaled by 1/N.  No strategy in a format removes the rounding of its own addends, so
``input_floor`` is what Kahan summation approaches (pairwise, read out as one format number per
parameter, stays above ``quantisation_floor``), and it is why a bf16 Kahan buffer fed
fp32 micro-gradients stays orders of magnitude behind an fp32 buffer of the same size: Kahan cancels
the accumulation rounding, not the input quantisation.  (With micro-gradients computed in bf16 the
addends are already bf16 numbers; both buffers then sit at the compute floor.  Not in the default
grid.)

**Bytes per parameter** (:func:`bytes_per_param`) = storage bytes of one number of the format x
the number of format-sized arrays the strategy keeps per parameter:

* storage: a native dtype's itemsize (fp64 8, fp32 4, bf16 and fp16 2, both fp8 formats 1); a
  custom ``eXmY`` format without a native dtype is assumed stored byte-aligned, in
  ceil((1 + X + Y) / 8) bytes per number (no bit packing across numbers; ``Accumulator``'s
  ``bytes_per_element`` uses the unrounded (1 + X + Y) / 8 instead).  tf32 would count 3 bytes
  under this rule; hardware keeps it in 32-bit registers (not in the default grid).
* arrays: ``naive`` 1; ``stochastic`` 1 (plus one RNG key per *buffer*, not per parameter:
  negligible); ``kahan`` and ``neumaier`` 2 (sum and compensation, both in the format); ``exact`` the reference,
  counted at its capacity (43 int64 digits, 344 bytes, whatever the format; real data need fewer); ``pairwise`` the most partial sums its binary-counter cascade
  holds at once, which grows with N (:func:`pairwise_partial_sums`).
* the micro-gradient being added (in the compute format) exists for every strategy and is not
  counted.

Pairwise, precisely: after k adds the cascade's occupied slots are the set bits of k (slot j holds
the sum of 2^j addends), so it holds popcount(k) partial sums between adds, and at most
max_{k <= N} popcount(k) = floor(log2(N + 1)) during N adds: 4, 8 and 12 at N = 16, 256, 4096
(reached at k = 15, 255, 4095; only one sum remains at k = N).  That count assumes each merge is
done in place (the incoming addend is merged into slot 0, the carry into the next slot, freeing
the lower one).  The emulation in :mod:`precision_lab.accumulators` merges out of place and keeps a
list of floor(log2 N) + 1 slot positions, one more than the live sums at a power-of-two N; its
``Accumulator.arrays`` reports those positions (5, 9, 13).  ``arrays`` here is the live peak.

``emulated_bytes_per_param`` is what this emulation stores for the same arrays: the fp8 formats
and custom formats without a native dtype live in a wider work dtype (fp32 for fp8), and
``exact`` in fp64 (transient temporaries not counted).

**Pareto front** (:func:`experiments.figures.memory_pareto.pareto_front`, drawn from the stored
results): for one (workload, N), the buffers that no other buffer beats on both bytes and trial-mean
error; on the figure, errors within 5% (``FRONT_RTOL``) are ties, so a buffer that costs more must be
more than 5% more accurate to be on the front.

**Read-outs.**  Kahan's error is that of its compensated read-out ``s - c`` (Neumaier's: ``s + c``),
formed in fp64 as ``Accumulator.value`` does, which can go below the format's ``quantisation_floor``;
an optimizer that reads only the bf16 sum ``s`` sees at least that floor (about 1.7e-3 for bf16 here).
Pairwise, naive and stochastic read out one format number per parameter.

``run`` writes ``results.csv`` + ``metadata.json`` (resumable, shardable);
:mod:`experiments.figures.memory_pareto` only reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from experiments.trials import TrialData
from precision_lab import metrics
from precision_lab.accumulators import STRATEGIES, work_dtype
from precision_lab.checks import check_choice, check_int
from precision_lab.formats import get_format
from precision_lab.gradients import split
from precision_lab.lab.runner import run_tasks
from precision_lab.measure import fixed_effective, stable_seed
from precision_lab.strategies.exact import MAX_DIGITS

NAME = "memory-pareto"
COLUMNS = (
    "experiment",
    "workload",
    "compute_format",
    "buffer_format",
    "strategy",
    "scaling",
    "n_accum",
    "micro_batch",
    "effective_batch",
    "trial",
    "seed",
    "arrays",
    "bytes_per_param",
    "emulated_bytes_per_param",
    *metrics.METRIC_NAMES,
    "quantisation_floor",
    "input_floor",
)

# Every buffer a reader would consider at 1 to 16 bytes per parameter.
DEFAULT_BUFFERS: tuple[tuple[str, str], ...] = (
    ("fp64", "naive"),
    ("fp64", "exact"),
    ("fp32", "naive"),
    ("fp32", "kahan"),
    ("fp32", "neumaier"),
    ("fp32", "stochastic"),
    ("fp32", "pairwise"),
    ("bf16", "naive"),
    ("bf16", "kahan"),
    ("bf16", "neumaier"),
    ("bf16", "stochastic"),
    ("bf16", "pairwise"),
    ("fp16", "naive"),
    ("fp16", "kahan"),
    ("fp16", "neumaier"),
    ("fp16", "stochastic"),
    ("fp16", "pairwise"),
    ("fp8_e4m3", "naive"),
    ("fp8_e4m3", "kahan"),
    ("fp8_e4m3", "neumaier"),
    ("fp8_e4m3", "stochastic"),
    ("fp8_e4m3", "pairwise"),
    ("fp8_e5m2", "naive"),
    ("fp8_e5m2", "kahan"),
    ("fp8_e5m2", "neumaier"),
    ("fp8_e5m2", "stochastic"),
    ("fp8_e5m2", "pairwise"),
)


# --------------------------------------------------------------------------------------------------
# bytes per parameter
# --------------------------------------------------------------------------------------------------
def storage_bytes(fmt: str) -> int:
    """Bytes of one stored number: the native dtype's itemsize, else ceil(bits / 8) (byte-aligned)."""
    f = get_format(fmt)
    if f.torch_dtype is not None:
        return torch.empty((), dtype=f.torch_dtype).element_size()
    return math.ceil(f.bits / 8)


def pairwise_partial_sums(n_accum: int) -> int:
    """Most partial sums the pairwise cascade holds during N adds: max_{k<=N} popcount(k) = floor(log2(N+1))."""
    return (check_int(n_accum, "the accumulation count N") + 1).bit_length() - 1


def buffer_arrays(strategy: str, n_accum: int) -> int:
    """Format-sized arrays per parameter the strategy keeps (pairwise: its live peak over N adds).

    ``exact`` is the reference, a superaccumulator whose int64 digits grow with the exponent range
    of the data; it is counted at its capacity, ``MAX_DIGITS`` digits (the most any data can need).
    """
    check_int(n_accum, "the accumulation count N")
    if check_choice(strategy, "strategy", STRATEGIES) == "pairwise":
        return pairwise_partial_sums(n_accum)
    if strategy == "exact":
        return MAX_DIGITS
    return 2 if strategy in ("kahan", "neumaier") else 1


def bytes_per_param(fmt: str, strategy: str, n_accum: int) -> int:
    """Nominal buffer bytes per parameter: ``buffer_arrays`` x ``storage_bytes`` (exact: int64 digits)."""
    arrays = buffer_arrays(strategy, n_accum)
    return arrays * (8 if strategy == "exact" else storage_bytes(fmt))


def emulated_bytes_per_param(fmt: str, strategy: str, n_accum: int) -> int:
    """Bytes per parameter this emulation stores for the same arrays (fp8 lives in fp32, exact in int64)."""
    arrays = buffer_arrays(strategy, n_accum)
    dtype = torch.int64 if strategy == "exact" else work_dtype(get_format(fmt))
    return arrays * torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """What to sweep: every buffer at each (workload, N) of a fixed effective batch.

    Cost: the MLP at N = 4096 (27 buffers plus 5 floor accumulators on 26k parameters, 4096 adds per
    trial) takes most of the full config's time; the README has measured times (of the 22 buffers
    before the five Neumaier ones joined).
    """

    workloads: tuple[str, ...] = ("mlp", "transformer")  # see precision_lab.workloads
    effective_batch: tuple[int, ...] = (4096, 256)  # E per workload (samples; text windows)
    n_accum: tuple[tuple[int, ...], ...] = ((16, 256, 4096), (16, 256))  # N per workload; each divides E
    size: str = "full"  # workload size preset ("full" or "quick")
    compute_format: str = "fp32"  # precision of the micro-gradients (see precision_lab.gradients)
    buffers: tuple[tuple[str, str], ...] = DEFAULT_BUFFERS  # (buffer format, strategy)
    trials: int = 3  # independent batches (and stochastic-rounding seeds)
    method: str = "vmap"  # micro-gradients by "vmap" or "loop" (bit-identical for these workloads)
    chunk_size: int = 64  # most micro-batches per vmap call (fixed, so the bytes never vary)
    chunk_samples: int = 256  # most samples per vmap call (bounds memory for large micro-batches)
    warmup_steps: int | None = None  # fp32 Adam steps before measuring (None: workload default)

    @classmethod
    def quick(cls) -> Config:
        """Seconds on one core: small models, E = 256 digits (N = 16, 256), 32 text windows (N = 4, 32)."""
        return cls(effective_batch=(256, 32), n_accum=((16, 256), (4, 32)), size="quick", trials=2)

    def floor_buffers(self) -> list[tuple[str, str]]:
        """``(format, "exact")`` per buffer format: the exact sum of the addends rounded to that format."""
        formats = dict.fromkeys(get_format(f).name for f, _ in self.buffers)
        return [(f, "exact") for f in formats if (f, "exact") not in self.buffers]

    def tasks(self) -> list[Task]:
        """One task per (workload, N, trial); every buffer shares its pass.  Validates the config."""
        if not len(self.workloads) == len(self.effective_batch) == len(self.n_accum):
            raise ValueError(
                f"effective_batch {self.effective_batch} and n_accum {self.n_accum} need one entry "
                f"per workload {self.workloads}"
            )
        check_int(self.trials, "trials")
        if not self.buffers:
            raise ValueError("buffers is empty: give at least one (format, strategy)")
        for fmt, strategy in self.buffers:
            emulated_bytes_per_param(fmt, strategy, 1)  # unknown format or strategy: ValueError naming it
        names = [(get_format(f).name, s) for f, s in self.buffers]
        if len(set(names)) != len(names):
            raise ValueError(f"buffers {self.buffers} name a (format, strategy) twice")
        for e, ns in zip(self.effective_batch, self.n_accum, strict=True):
            if not ns:
                raise ValueError(f"n_accum for effective batch {e} is empty")
            for n in ns:
                split(e, n)  # N < 1 or N not dividing E: ValueError naming both
        tasks = []
        for w, ns in zip(self.workloads, self.n_accum, strict=True):
            for n in ns:
                tasks += [Task(workload=w, n_accum=n, trial=t) for t in range(self.trials)]
        return tasks


@dataclass(frozen=True)
class Task:
    """One (workload, N, trial): every buffer of the grid in one pass over the trial's micro-gradients."""

    workload: str  # the workload's name
    n_accum: int  # N: micro-batches of the effective batch E (N divides E)
    trial: int  # index of the batch (and of the stochastic-rounding seed)


def run(
    config: Config,
    out_dir: str | Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> Path | None:
    """Run (or resume) the sweep; returns ``results.csv`` once the whole grid is done."""
    tasks = config.tasks()  # validate before building anything
    trials = TrialData.for_config(config, seed=seed, device=device)
    batch = trials.effective_batch

    buffers = [(get_format(f).name, s) for f, s in config.buffers]
    measured_buffers = [*buffers, *config.floor_buffers()]

    def work(task: Task) -> list[dict[str, Any]]:
        w, n, trial = task.workload, task.n_accum, task.trial
        data = trials.data(w, trial)
        sr_seed = stable_seed(seed, w, config.compute_format, n, trial, "post")  # the buffers' stochastic rounding
        # post scaling: sum the undivided micro-gradients, divide the buffer by N (a power of two: exact
        # unless it underflows) once, in the buffer format
        engine = trials.engine(w, config.compute_format)
        measured = fixed_effective(
            engine, data.x, data.y, data.reference, n, measured_buffers, scaling="post", seed=sr_seed
        )
        # input floor: the exact sum of the addends rounded to the format (what add() rounds them to first)
        floor = {r["buffer_format"]: r["rel_l2_error"] for r in measured if r["strategy"] == "exact"}
        rows = []
        for r in measured:
            fmt, strategy = r["buffer_format"], r["strategy"]
            if (fmt, strategy) not in buffers:
                continue  # a floor-only accumulator
            rows.append(
                {
                    "experiment": NAME,
                    "workload": w,
                    "compute_format": config.compute_format,
                    "scaling": "post",
                    "micro_batch": batch[w] // n,
                    "effective_batch": batch[w],
                    "trial": trial,
                    "seed": data.data_seed,
                    "arrays": buffer_arrays(strategy, n),
                    "bytes_per_param": bytes_per_param(fmt, strategy, n),
                    "emulated_bytes_per_param": emulated_bytes_per_param(fmt, strategy, n),
                    **r,
                    "input_floor": floor[fmt],
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
