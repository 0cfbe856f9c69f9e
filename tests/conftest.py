"""Shared test configuration: hypothesis profiles, device parametrisation, the gpu marker."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Profiles: "ci" (default, deterministic: derandomized so a CI run is reproducible), "dev" (more
# examples, random), "speedy" (a quick smoke run). Select with HYPOTHESIS_PROFILE=dev.
settings.register_profile(
    "ci", max_examples=200, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=1000, deadline=None)
settings.register_profile("speedy", max_examples=20, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()


def available_devices() -> list:
    """CPU always; CUDA as a gpu-marked parameter (skipped when no GPU is present)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip gpu-marked tests when CUDA is absent."""
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
