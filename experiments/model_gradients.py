"""Model gradients: how far is the accumulated gradient of a real model from the large-batch one?

A fixed effective batch of E samples is split into N micro-batches of E/N; each micro-gradient is
computed in a compute precision (fp32, pure bf16, ...) and accumulated in every buffer format x
strategy; the result is compared with the gradient of all E samples computed once in fp64.  The
buffer ``fp64 exact`` sums the micro-gradients as they arrive without rounding, so its error is the
input quantisation alone; every other buffer adds its accumulation rounding on top.  ``pre``
divides each micro-batch loss by N before backward (``loss / N``), ``post`` divides the sum once.
The ``quantisation_floor`` column is the error of the fp64 truth rounded once to the buffer format.

``run`` writes ``results.csv`` + ``metadata.json`` (resumable, shardable);
:mod:`experiments.figures.model_gradients` only reads them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments.trials import TrialData
from precision_lab import metrics
from precision_lab.checks import check_int
from precision_lab.lab.runner import run_tasks
from precision_lab.measure import fixed_effective, fixed_micro, power_grid, stable_seed

NAME = "model-gradients"
COLUMNS = (
    "experiment",
    "workload",
    "regime",
    "compute_format",
    "buffer_format",
    "strategy",
    "scaling",
    "loss_scale",
    "n_accum",
    "micro_batch",
    "effective_batch",
    "trial",
    "seed",
    *metrics.METRIC_NAMES,
    "quantisation_floor",
)


@dataclass(frozen=True)
class Config:
    """What to sweep (fixed effective batch, N on a power-of-two grid up to E)."""

    workloads: tuple[str, ...] = ("mlp", "transformer")  # see precision_lab.workloads
    effective_batch: tuple[int, ...] = (4096, 256)  # E per workload (samples; sequences for text)
    size: str = "full"  # workload size preset ("full" or "quick")
    compute_formats: tuple[str, ...] = ("fp32", "bf16")  # precision of the micro-gradients
    buffer_formats: tuple[str, ...] = ("fp32", "bf16", "fp16")  # accumulation buffer formats
    strategies: tuple[str, ...] = ("naive", "kahan", "neumaier", "stochastic", "pairwise")
    scalings: tuple[str, ...] = ("pre", "post")  # where 1/N is applied
    fp16_loss_scale: float = 1.0  # static loss scale for fp16 compute (1 = none)
    trials: int = 3  # independent batches (and stochastic-rounding seeds)
    method: str = "vmap"  # micro-gradients by "vmap" or "loop" (bit-identical for these workloads)
    chunk_size: int = 64  # most micro-batches per vmap call (fixed, so the bytes never vary)
    chunk_samples: int = 256  # most samples per vmap call (bounds memory for large micro-batches)
    warmup_steps: int | None = None  # fp32 Adam steps before measuring (None: workload default)
    fixed_micro_batch: int | None = None  # also run the growing-N regime at this micro-batch B (one pass per trial)

    @classmethod
    def quick(cls) -> Config:
        """Seconds: small models, E = 256 digits / 32 text windows, 2 trials."""
        return cls(effective_batch=(256, 32), size="quick", buffer_formats=("fp32", "bf16", "fp16"), trials=2)

    def buffers(self) -> list[tuple[str, str]]:
        """Every (format, strategy), plus ``fp64 exact``: the input quantisation alone."""
        return [*itertools.product(self.buffer_formats, self.strategies), ("fp64", "exact")]

    def tasks(self) -> list[Task]:
        """One task per (workload, compute, N, trial); scalings and buffers share its pass.

        With ``fixed_micro_batch`` B, one more task per (workload, compute, trial) grows N over the
        power-of-two grid up to E/B on the same samples, recording every N in one pass (``post``).
        """
        if len(self.effective_batch) != len(self.workloads):
            raise ValueError(f"effective_batch {self.effective_batch} needs one entry per workload {self.workloads}")
        batches = list(zip(self.workloads, self.effective_batch, strict=True))
        tasks: list[Task] = []
        for w, e in batches:
            for c in self.compute_formats:
                for n in power_grid(e, divides=e):
                    for t in range(self.trials):
                        tasks.append(Task(workload=w, compute_format=c, regime="fixed_effective", n_accum=n, trial=t))
        if self.fixed_micro_batch is not None:
            b = check_int(self.fixed_micro_batch, "fixed_micro_batch")
            if any(e % b for e in self.effective_batch):
                raise ValueError(
                    f"fixed_micro_batch {b!r} must be an integer >= 1 that divides every effective batch "
                    f"{self.effective_batch}"
                )
            for w, e in batches:
                for c in self.compute_formats:
                    for t in range(self.trials):
                        tasks.append(Task(workload=w, compute_format=c, regime="fixed_micro", n_accum=e // b, trial=t))
        return tasks


@dataclass(frozen=True)
class Task:
    """One pass of micro-gradients: every scaling and buffer of it."""

    workload: str  # a model workload of precision_lab.workloads
    compute_format: str  # precision of the micro-gradients
    regime: str  # "fixed_effective" (E split into N) or "fixed_micro" (N grows at micro-batch B)
    n_accum: int  # N (fixed_micro: the largest N of the pass)
    trial: int  # which trial's batch


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
    trials = TrialData.for_config(config, seed=seed, device=device)
    batch = trials.effective_batch

    def work(task: Task) -> list[dict[str, Any]]:
        w, compute, n, trial, regime = task.workload, task.compute_format, task.n_accum, task.trial, task.regime
        data = trials.data(w, trial)
        s = config.fp16_loss_scale if compute == "fp16" else 1.0  # GradScaler-style static scale
        rows = []
        for scaling in config.scalings:
            sr_seed = stable_seed(seed, w, compute, n, trial, scaling, regime)  # the buffers' stochastic rounding
            if regime == "fixed_effective":
                measured = fixed_effective(
                    trials.engine(w, compute),
                    data.x,
                    data.y,
                    data.reference,
                    n,
                    config.buffers(),
                    scaling=scaling,
                    seed=sr_seed,
                    loss_scale=s,
                )
            else:  # growing N at micro-batch B over the same samples; the truth at N: the first N*B of them
                measured = fixed_micro(
                    trials.engine(w, compute),
                    data.x,
                    data.y,
                    config.fixed_micro_batch,
                    power_grid(n),
                    config.buffers(),
                    scaling=scaling,
                    seed=sr_seed,
                    loss_scale=s,
                )
            for r in measured:
                b = batch[w] // r["n_accum"] if regime == "fixed_effective" else config.fixed_micro_batch
                rows.append(
                    {
                        "experiment": NAME,
                        "workload": w,
                        "regime": regime,
                        "compute_format": compute,
                        "scaling": scaling,
                        "loss_scale": s,
                        "micro_batch": b,
                        "effective_batch": b * r["n_accum"],
                        "trial": trial,
                        "seed": data.data_seed,
                        **r,
                    }
                )
        return rows

    return run_tasks(
        NAME,
        out_dir,
        config.tasks(),
        work,
        columns=COLUMNS,
        config=config,
        seed=seed,
        device=device,
        shard=shard,
        progress=progress,
    )
