"""The training experiment at tiny sizes: bytes, the reference trajectory, and what the buffers do."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments import training
from precision_lab.lab.results import read_csv

TINY = training.Config(
    workloads=("mlp",), micro_batch=(4,), size="quick", n_values=(1, 32), steps=6, eval_every=3, eval_size=128, trials=1
)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return training.run(TINY, tmp_path_factory.mktemp("tr") / "a", seed=0, progress=False)


def _final(rows: list[dict[str, str]], run: str, n: int) -> dict[str, str]:
    return next(r for r in rows if r["run"] == run and int(r["n_accum"]) == n and int(r["step"]) == TINY.steps)


def test_same_seed_same_bytes(result: Path, tmp_path: Path) -> None:
    assert training.run(TINY, tmp_path, seed=0, progress=False).read_bytes() == result.read_bytes()


def test_rows_and_reference_trajectory(result: Path) -> None:
    rows = read_csv(result)
    assert len(rows) == len(TINY.n_values) * len(training.RUNS) * 2  # evaluations at steps 3 and 6
    for r in rows:
        if r["run"] == "fp64":
            assert float(r["weight_distance"]) == 0.0  # the reference is its own trajectory
        else:
            assert float(r["weight_distance"]) > 0.0  # every lower-precision run leaves it
    first = next(r for r in rows if r["run"] == "fp64" and r["step"] == "3" and r["n_accum"] == "32")
    assert float(_final(rows, "fp64", 32)["eval_loss"]) < float(first["eval_loss"])  # it learns


def test_buffers_order_as_numerics_predict(result: Path) -> None:
    rows = read_csv(result)
    # fp32 parameters stay within fp32-like distance of the fp64 run; bf16 parameters do not
    assert float(_final(rows, "fp32", 32)["weight_distance"]) < 1e-4
    assert float(_final(rows, "bf16 naive", 32)["weight_distance"]) > 1e-3
    # with N = 32 micro-gradients of loss/N, a bf16 buffer loses updates; an fp32 buffer does not
    assert float(_final(rows, "bf16 naive", 32)["lost_update_fraction"]) > 0.0
    assert float(_final(rows, "bf16 params, fp32 buffer", 32)["lost_update_fraction"]) == 0.0
    # N = 1: one add into an empty buffer is exact, so every bf16 buffer gives the same training
    base = _final(rows, "bf16 naive", 1)
    for run in ("bf16 kahan", "bf16 neumaier", "bf16 pairwise", "bf16 params, fp32 buffer", "bf16 stochastic"):
        assert _final(rows, run, 1)["weight_distance"] == base["weight_distance"], run


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="one entry per workload"):
        training.Config(micro_batch=(4,)).tasks()
    with pytest.raises(ValueError, match="must include 'fp64'"):
        training.Config(runs=("fp32",)).tasks()
