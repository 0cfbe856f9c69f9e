"""Experiments: one readable compute module per experiment, and its figures apart, registered by name.

Experiment ``a-b`` lives in two modules:

* ``experiments/a_b.py`` (compute): ``NAME``, a ``Config`` dataclass (with a ``quick()``
  classmethod), a frozen ``Task`` dataclass, and ``run(config, out_dir, *, seed, device, shard,
  progress)``, which computes the grid of tasks through :func:`precision_lab.lab.runner.run_tasks`
  (resumable, shardable) and returns ``results.csv`` once the grid is complete (None while shards
  remain);
* ``experiments/figures/a_b.py``: ``plot(out_dir, fig_dir)``, which only reads stored results.

A compute module never imports figure code (the sweep fingerprint covers compute modules by their
location; :mod:`precision_lab.lab.fingerprint` refuses one that does).  ``claims.py`` decides the
article's claims from stored results; ``trials.py`` is compute code shared by three experiments.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["REGISTRY", "get_experiment", "get_figures"]

# name -> compute module; its figures are experiments.figures.<the same module name>
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


def _module_of(name: str) -> str:
    if name not in REGISTRY:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def get_experiment(name: str) -> ModuleType:
    """Import the compute module of the experiment ``name``; ValueError lists the known names."""
    return importlib.import_module(_module_of(name))


def get_figures(name: str) -> ModuleType:
    """Import the figure module of the experiment ``name``; ValueError lists the known names."""
    return importlib.import_module("experiments.figures." + _module_of(name).rsplit(".", 1)[1])
