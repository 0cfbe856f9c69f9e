"""Trial data shared by the experiments that split a fixed effective batch of a real model.

model-gradients, underflow and memory-pareto measure the same thing on different grids: a trial's
batch of E samples of a warmed-up workload, its fp64 large-batch gradient, and gradient engines of
each compute precision.  :class:`TrialData` builds each of them once and caches it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Protocol

import torch

from precision_lab.gradients import GradientEngine, reference_gradient
from precision_lab.measure import stable_seed
from precision_lab.workloads import ModelWorkload, make_workload

__all__ = ["Trial", "TrialConfig", "TrialData"]


class Trial(NamedTuple):
    """One trial's batch and its truth."""

    x: torch.Tensor  # inputs of the E samples
    y: torch.Tensor  # their targets
    reference: torch.Tensor  # the fp64 large-batch gradient of all E samples (flat)
    data_seed: int  # the seed the batch was drawn with


class TrialConfig(Protocol):
    """What :meth:`TrialData.for_config` reads from an experiment's config."""

    workloads: tuple[str, ...]  # workload names
    effective_batch: tuple[int, ...]  # E of each workload, in the same order
    size: str  # workload size preset
    warmup_steps: int | None  # fp32 Adam steps before measuring (None: the workload's default)
    method: str  # GradientEngine method
    chunk_size: int  # GradientEngine micro-batches per vmap chunk
    chunk_samples: int  # GradientEngine samples per chunk


class TrialData:
    """Workloads, each trial's batch with its fp64 gradient, and gradient engines, built once and cached.

    The experiments that split a fixed effective batch of a real model (model-gradients, underflow,
    memory-pareto) share this: a trial's batch is the same for every N, precision and buffer, and
    drawn from ``stable_seed(seed, workload, trial, "data")``.

    Args:
        effective_batch: ``{workload name: E}``.
        seed: The experiment's base seed (workload initialisation and warm-up, data draws).
        size: Workload size preset ("full" or "quick").
        warmup_steps: fp32 Adam steps before measuring (None: the workload's default).
        device: Where gradients are computed.
        method, chunk_size, chunk_samples: passed to :class:`GradientEngine`.
    """

    def __init__(
        self,
        effective_batch: Mapping[str, int],
        *,
        seed: int,
        size: str,
        warmup_steps: int | None,
        device: str = "cpu",
        method: str = "vmap",
        chunk_size: int = 64,
        chunk_samples: int = 256,
    ) -> None:
        self.effective_batch = dict(effective_batch)
        self.seed, self.size, self.warmup_steps, self.device = seed, size, warmup_steps, device
        self.engine_options = {"method": method, "chunk_size": chunk_size, "chunk_samples": chunk_samples}
        self._workloads: dict[str, ModelWorkload] = {}
        self._data: dict[tuple[str, int], Trial] = {}
        self._engines: dict[tuple[str, str], GradientEngine] = {}

    @classmethod
    def for_config(cls, config: TrialConfig, *, seed: int, device: str) -> TrialData:
        """The trial data of an experiment config (model-gradients, underflow, memory-pareto).

        Reads ``workloads``, ``effective_batch``, ``size``, ``warmup_steps``, ``method``, ``chunk_size``
        and ``chunk_samples``.
        """
        return cls(
            dict(zip(config.workloads, config.effective_batch, strict=True)),
            seed=seed,
            size=config.size,
            warmup_steps=config.warmup_steps,
            device=device,
            method=config.method,
            chunk_size=config.chunk_size,
            chunk_samples=config.chunk_samples,
        )

    def workload(self, name: str) -> ModelWorkload:
        """The warmed-up workload ``name``."""
        if name not in self._workloads:
            self._workloads[name] = make_workload(name, seed=self.seed, size=self.size, warmup_steps=self.warmup_steps)
        return self._workloads[name]

    def data(self, name: str, trial: int) -> Trial:
        """The trial's batch ``(x, y)``, its fp64 large-batch gradient and its data seed."""
        if (name, trial) not in self._data:
            wl = self.workload(name)
            data_seed = stable_seed(self.seed, name, trial, "data")
            x, y = wl.sample(self.effective_batch[name], torch.Generator().manual_seed(data_seed))
            ref = reference_gradient(wl.model, wl.loss_fn, x, y, device=self.device)
            self._data[(name, trial)] = Trial(x, y, ref, data_seed)
        return self._data[(name, trial)]

    def engine(self, name: str, compute: str) -> GradientEngine:
        """The gradient engine of workload ``name`` in precision ``compute``."""
        if (name, compute) not in self._engines:
            wl = self.workload(name)
            self._engines[(name, compute)] = GradientEngine(
                wl.model, wl.loss_fn, compute, device=self.device, **self.engine_options
            )
        return self._engines[(name, compute)]
