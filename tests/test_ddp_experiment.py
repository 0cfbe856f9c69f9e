"""The ddp experiment: real gloo processes; no_sync gives the single-process gradient with N times fewer all-reduces."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments import ddp
from precision_lab.lab.results import read_csv


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    cfg = ddp.Config(size="quick", n_values=(1, 4), micro_batch=4, warmup_steps=0)
    return read_csv(ddp.run(cfg, tmp_path_factory.mktemp("ddp"), seed=0, progress=False))


def test_no_sync_all_reduces_once_per_step_every_step_n_times(rows: list[dict[str, str]]) -> None:
    for r in rows:
        expect = int(r["n_accum"]) if r["mode"] == "every_step" else 1
        assert int(r["allreduces"]) == expect, r  # one gradient bucket for this small model


def test_fp64_ddp_equals_the_large_batch_and_one_process(rows: list[dict[str, str]]) -> None:
    for r in rows:
        if (r["model_format"], r["allreduce_format"]) != ("fp64", "native") or "bf16 kahan" in r["mode"]:
            continue
        # fp64 model, fp64 gradients all-reduced in their own dtype:
        # the same quantity by other summation orders; 2^-40 leaves 2^13 fp64 ulps, as in test_gradients
        assert float(r["rel_l2_error"]) <= 2.0**-40, r
        assert float(r["max_abs_diff_vs_single_process"]) <= 2.0**-40, r


def test_bf16_all_reduce_is_visible_and_native_fp32_is_not(rows: list[dict[str, str]]) -> None:
    """Negative control: the metric sees a bf16 all-reduce (u = 2^-8) but not an fp32 one (u = 2^-24)."""
    for r in rows:
        err = float(r["rel_l2_error"])
        if "bf16 kahan" in r["mode"]:
            continue  # its bf16 buffer has its own test below
        if r["allreduce_format"] == "bf16":
            assert 2.0**-14 < err < 2.0**-6, r  # of the order of bf16's unit roundoff 2^-8
        elif r["model_format"] == "fp32":
            assert err < 2.0**-20, r


def test_gradient_accumulator_under_ddp(rows: list[dict[str, str]]) -> None:
    """The drop-in buffer in the parameter's own format is plain no_sync DDP, bit for bit."""
    key = ("model_format", "allreduce_format", "n_accum")
    plain = {tuple(r[k] for k in key): r for r in rows if r["mode"] == "no_sync"}
    for r in rows:
        if r["mode"] == "no_sync, GradientAccumulator naive":
            p = plain[tuple(r[k] for k in key)]
            assert (r["rel_l2_error"], r["max_abs_diff_vs_single_process"]) == (
                p["rel_l2_error"],
                p["max_abs_diff_vs_single_process"],
            )
        if r["mode"] == "no_sync, GradientAccumulator bf16 kahan" and r["allreduce_format"] == "native":
            # micro-gradients rounded to bf16 on entry: an error of the order of bf16's u = 2^-8
            assert 2.0**-16 < float(r["rel_l2_error"]) < 2.0**-6, r


def test_bad_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="world_size must be >= 2, got 1"):
        ddp.run(ddp.Config(world_size=1), tmp_path)
    with pytest.raises(ValueError, match="--device 'cuda' is not supported"):
        ddp.run(ddp.Config(), tmp_path, device="cuda")
