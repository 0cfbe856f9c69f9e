"""The model-gradients experiment end to end, at tiny sizes: bytes, columns, and what the rows say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import model_gradients as mg
from precision_lab.lab import cli
from precision_lab.lab.results import read_csv

ISSUE_COLUMNS = (
    "experiment",
    "workload",
    "compute_format",
    "buffer_format",
    "strategy",
    "scaling",
    "n_accum",
    "micro_batch",
    "trial",
    "seed",
    "rel_l2_error",
    "norm_ratio",
    "projection_bias",
    "cosine",
    "max_ulp_error",
    "lost_update_fraction",
    "nonfinite",
)


def tiny(**kw) -> mg.Config:
    base = {
        "workloads": ("mlp",),
        "effective_batch": (16,),
        "size": "quick",
        "compute_formats": ("fp32", "bf16"),
        "buffer_formats": ("bf16",),
        "strategies": ("naive", "kahan", "neumaier", "stochastic"),
        "trials": 2,
        "warmup_steps": 0,
        "chunk_size": 4,
    }
    return mg.Config(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mg.run(tiny(), tmp_path_factory.mktemp("mg") / "a", seed=3, progress=False)


def test_same_seed_same_bytes_other_seed_other_bytes(tiny_run: Path, tmp_path: Path) -> None:
    assert mg.run(tiny(), tmp_path / "b", seed=3, progress=False).read_bytes() == tiny_run.read_bytes()
    assert mg.run(tiny(), tmp_path / "c", seed=4, progress=False).read_bytes() != tiny_run.read_bytes()
    meta = json.loads((tiny_run.parent / "metadata.json").read_text())
    assert meta["seed"] == 3
    assert meta["config"]["effective_batch"] == [16]
    assert {"torch", "threads", "git_commit", "device"} <= set(meta["environment"])
    assert meta["started"] <= meta["finished"]


def test_rows_cover_the_grid_with_the_issue_columns(tiny_run: Path) -> None:
    rows = read_csv(tiny_run)
    assert set(ISSUE_COLUMNS) <= set(rows[0])
    cfg = tiny()
    assert len(rows) == len(cfg.tasks()) * len(cfg.scalings) * len(cfg.buffers())
    assert {int(r["n_accum"]) for r in rows} == {1, 2, 4, 8, 16}
    for r in rows:
        assert int(r["micro_batch"]) * int(r["n_accum"]) == 16
        assert float(r["nonfinite"]) == 0.0


def test_pre_equals_post_for_deterministic_buffers(tiny_run: Path) -> None:
    """N = 2^k: pre and post scaling agree to the bit for every deterministic strategy.

    Each g/N is exact and RN(a/N + b/N) = RN(a + b)/N; stochastic rounding draws other bits for
    each placement, so it is left out.
    """
    rows = read_csv(tiny_run)
    metric_cols = ("rel_l2_error", "norm_ratio", "projection_bias", "max_ulp_error")
    key = ("workload", "compute_format", "buffer_format", "strategy", "n_accum", "trial")
    post = {tuple(r[k] for k in key): r for r in rows if r["scaling"] == "post"}
    checked = 0
    for r in rows:
        if r["scaling"] == "pre" and r["strategy"] != "stochastic":
            assert [r[c] for c in metric_cols] == [post[tuple(r[k] for k in key)][c] for c in metric_cols]
            checked += 1
    assert checked == len(rows) // 2 * 4 // 5  # naive, kahan, neumaier and exact of the 5 buffers


def test_fp64_compute_reproduces_the_large_batch_gradient_and_batchnorm_does_not(tmp_path: Path) -> None:
    cfg = tiny(
        workloads=("mlp", "cnn"),
        effective_batch=(16, 16),
        compute_formats=("fp64",),
        buffer_formats=(),
        strategies=(),
        trials=1,
        scalings=("post",),
    )
    rows = read_csv(mg.run(cfg, tmp_path, seed=0, progress=False))
    for r in rows:
        err = float(r["rel_l2_error"])
        if r["workload"] == "mlp" or r["n_accum"] == "1":
            # the same fp64 quantity by two summation orders: ~1e-16 per op, 2^-40 leaves 2^13 ulps of room
            assert err <= 2.0**-40, r
        else:  # BatchNorm: each micro-batch normalises with its own statistics
            assert err > 1e-3, r


def test_shards_merge_to_the_single_run(tiny_run: Path, tmp_path: Path) -> None:
    assert mg.run(tiny(), tmp_path, seed=3, shard=(2, 2), progress=False) is None
    assert mg.run(tiny(), tmp_path, seed=3, shard=(1, 2), progress=False).read_bytes() == tiny_run.read_bytes()


def test_fixed_micro_regime_grows_n_and_meets_the_fixed_effective_rows(tmp_path: Path) -> None:
    """Growing N at B = 2 over the trial's 16 samples meets the fixed effective batch at N = 8.

    There it is the same split, so every deterministic buffer's post-scaled row is identical.
    """
    cfg = tiny(fixed_micro_batch=2, scalings=("post",), trials=1)
    rows = read_csv(mg.run(cfg, tmp_path, seed=3, progress=False))
    micro = [r for r in rows if r["regime"] == "fixed_micro"]
    assert {int(r["n_accum"]) for r in micro} == {1, 2, 4, 8}
    assert all(int(r["effective_batch"]) == 2 * int(r["n_accum"]) and r["micro_batch"] == "2" for r in micro)
    key = ("compute_format", "buffer_format", "strategy")
    fixed = {tuple(r[k] for k in key): r for r in rows if r["regime"] == "fixed_effective" and r["n_accum"] == "8"}
    metric = ("rel_l2_error", "norm_ratio", "projection_bias", "lost_update_fraction", "quantisation_floor")
    for r in micro:
        if r["n_accum"] == "8" and r["strategy"] != "stochastic":
            assert [r[c] for c in metric] == [fixed[tuple(r[k] for k in key)][c] for c in metric]


def test_bad_config_and_cli_shard_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="does not split into N=16"):
        tiny(effective_batch=(24,)).tasks()
    with pytest.raises(ValueError, match="one entry per workload"):
        tiny(effective_batch=(16, 16)).tasks()
    with pytest.raises(ValueError, match="fixed_micro_batch 3 must be an integer >= 1 that divides"):
        tiny(fixed_micro_batch=3).tasks()
    for shard, needle in (("0/2", "need 1 <= I <= K"), ("1-2", "I/K (e.g. 2/8), got '1-2'")):
        assert cli.main(["run", "model-gradients", "--quick", "--shard", shard]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert needle in err


def test_bytes_do_not_depend_on_the_thread_count(tmp_path: Path) -> None:
    """Warm-up, micro-gradients and reference pin one intra-op thread: 1 or 2 threads, same bytes."""
    import torch

    cfg = tiny(warmup_steps=None, compute_formats=("fp32",), trials=1)  # the default warm-up (Adam steps)
    before = torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = mg.run(cfg, tmp_path / str(threads), seed=0, progress=False).read_bytes()
    finally:
        torch.set_num_threads(before)
    assert out[1] == out[2]
