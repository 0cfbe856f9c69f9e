"""Experiments: one readable module per experiment, registered by name for the CLI.

Each module defines ``NAME``, a ``Config`` dataclass (with a ``quick()`` classmethod), ``run(config,
out_dir, *, seed, device, shard, progress)`` that computes its grid through
:func:`precision_lab.sweep.run_tasks` (resumable, shardable) and returns ``results.csv`` once the
grid is complete (None while shards remain), and ``plot(out_dir, fig_dir)`` that only reads stored
results.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["REGISTRY", "get_experiment"]

# name -> module (experiment "a-b" lives in experiments/a_b.py: the sweep fingerprint relies on it)
REGISTRY: dict[str, str] = {
    "ddp": "experiments.ddp",
    "equivalence": "experiments.equivalence",
    "memory-pareto": "experiments.memory_pareto",
    "model-gradients": "experiments.model_gradients",
    "overhead": "experiments.overhead",
    "summation": "experiments.summation",
    "training": "experiments.training",
    "underflow": "experiments.underflow",
}


def get_experiment(name: str) -> ModuleType:
    """Import the experiment module registered as ``name``; ValueError lists the known names."""
    if name not in REGISTRY:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return importlib.import_module(REGISTRY[name])
