"""The equivalence experiment: every comparison comes out as the maths predicts, with the fixes shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments import equivalence
from precision_lab.lab.results import read_csv


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    cfg = equivalence.Config(n_values=(2, 3), steps=2)
    return read_csv(equivalence.run(cfg, tmp_path_factory.mktemp("eq"), seed=0, progress=False))


def test_every_claim_is_covered_and_as_predicted(rows: list[dict[str, str]]) -> None:
    assert {r["claim"] for r in rows} == {"C1", "C2", "C3", "C4", "C6", "C7"}
    bad = [r for r in rows if r["as_predicted"] != "1"]
    assert not bad, bad


def test_differences_are_far_from_the_tolerance(rows: list[dict[str, str]]) -> None:
    """A 'differs' row differs by far more than 2^-40; an 'equal' row is within a few hundred fp64 ulps."""
    for r in rows:
        rel = float(r["rel_difference"])
        if r["predicted"] == "differs":
            assert rel > 1e-3, r
        else:
            assert rel < 2.0**-44, r


def test_power_of_two_identities_are_bit_exact(rows: list[dict[str, str]]) -> None:
    for r in rows:
        if r["claim"] == "C6" and r["predicted"] == "equal" and r["n_accum"] == "2":
            assert r["bit_identical"] == "1", r


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    cfg = equivalence.Config(n_values=(2,), steps=1)
    a = equivalence.run(cfg, tmp_path / "a", seed=5, progress=False).read_bytes()
    assert equivalence.run(cfg, tmp_path / "b", seed=5, progress=False).read_bytes() == a
