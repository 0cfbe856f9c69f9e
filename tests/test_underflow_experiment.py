"""The underflow experiment end to end at tiny sizes: the grid, the bytes, and what the rows say."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from experiments import underflow as uf
from experiments.figures.underflow import plot
from precision_lab.lab.results import read_csv

ISSUE_COLUMNS = (
    "experiment",
    "workload",
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
    "flushed_fraction",
    "subnormal_fraction",
    "rel_l2_error",
    "norm_ratio",
    "nonfinite",
)
N_GRID = (1, 4, 32)


def tiny(**kw) -> uf.Config:
    """The small transformer (quick size, its default 20 warm-up steps) on E = 32 windows.

    The warm-up matters: at initialisation the gradients are less spread out and pre's and post's
    flush counts lie closer together.
    """
    base = {"workloads": ("transformer",), "effective_batch": (32,), "size": "quick", "n_accum": N_GRID, "trials": 1}
    return uf.Config(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return uf.run(tiny(), tmp_path_factory.mktemp("uf") / "a", seed=3, progress=False)


@pytest.fixture(scope="module")
def rows(tiny_run: Path) -> list[dict[str, str]]:
    return read_csv(tiny_run)


def pick(rows: list[dict[str, str]], **where: object) -> list[dict[str, str]]:
    return [r for r in rows if all(r[k] == str(v) for k, v in where.items())]


def one(rows: list[dict[str, str]], **where: object) -> dict[str, str]:
    (row,) = pick(rows, **where)
    return row


def test_rows_cover_the_grid_with_the_issue_columns(rows: list[dict[str, str]]) -> None:
    assert set(ISSUE_COLUMNS) <= set(rows[0])
    assert tuple(rows[0]) == uf.COLUMNS
    cfg = tiny()
    keys = {
        (
            r["compute_format"],
            r["buffer_format"],
            r["strategy"],
            r["scaling"],
            float(r["loss_scale"]),
            int(r["n_accum"]),
            r["trial"],
        )
        for r in rows
    }
    want = {
        (c, b, "naive", sc, s, n, "0")
        for c, b in cfg.pairs
        for sc in ("pre", "post")
        for s in cfg.loss_scales
        for n in N_GRID
    }
    assert keys == want
    assert len(rows) == len(want)  # each exactly once
    for r in rows:
        assert int(r["micro_batch"]) * int(r["n_accum"]) == int(r["effective_batch"]) == 32
        assert 0.0 <= float(r["flushed_fraction"]) <= 1.0
        assert 0.0 <= float(r["subnormal_fraction"]) <= 1.0 - float(r["flushed_fraction"])
        assert r["experiment"] == "underflow"


def test_same_seed_same_bytes_and_the_seed_draws_the_data(tiny_run: Path, tmp_path: Path) -> None:
    assert uf.run(tiny(), tmp_path / "b", seed=3, progress=False).read_bytes() == tiny_run.read_bytes()
    other = read_csv(uf.run(tiny(n_accum=(4,)), tmp_path / "c", seed=4, progress=False))
    mine = pick(read_csv(tiny_run), n_accum=4)
    assert other[0]["seed"] != mine[0]["seed"]
    assert [r["rel_l2_error"] for r in other] != [r["rel_l2_error"] for r in mine]


def test_n1_pre_and_post_rows_are_identical(rows: list[dict[str, str]]) -> None:
    """N = 1: pre divides by 1 (not at all) and post by 1: the same computation, to the bit."""
    checked = 0
    for r in pick(rows, n_accum=1, scaling="pre"):
        twin = one(
            rows,
            n_accum=1,
            scaling="post",
            compute_format=r["compute_format"],
            buffer_format=r["buffer_format"],
            loss_scale=r["loss_scale"],
        )
        assert {**r, "scaling": "post"} == twin
        checked += 1
    assert checked == 3 * 3  # regimes x loss scales


def test_pre_flushes_more_than_post_and_grows_with_n(rows: list[dict[str, str]]) -> None:
    """Loss scale 1, fp16 values: pre shifts every g_i down log2 N binades, so more fall below 2^-25.

    post's micro-gradients (of micro-batches of E/N) keep their magnitude: their flushed fraction
    does not grow with N (here it even falls), while pre's grows more than fourfold from N = 1 to
    N = 32 = 2^5.
    """
    for compute, buffer in (("fp16", "fp16"), ("fp32", "fp16")):
        mine = pick(rows, compute_format=compute, buffer_format=buffer, loss_scale=1.0)
        f = {(r["scaling"], int(r["n_accum"])): float(r["flushed_fraction"]) for r in mine}
        assert f["post", 1] > 0  # something to compare with: the transformer has tiny gradients even at N = 1
        assert f["pre", 32] > 4 * f["post", 32]
        assert f["pre", 1] < f["pre", 4] < f["pre", 32]
        assert f["pre", 32] > 4 * f["pre", 1]
        assert f["post", 32] <= 2 * f["post", 1]


def test_a_loss_scale_cures_pre_underflow(rows: list[dict[str, str]]) -> None:
    """S = 2^10 lifts every value 10 binades: pre's flushed fraction at N = 32 drops more than tenfold."""
    for compute, buffer in (("fp16", "fp16"), ("fp32", "fp16")):
        mine = pick(rows, compute_format=compute, buffer_format=buffer, scaling="pre", n_accum=32)
        flushed = {float(r["loss_scale"]): float(r["flushed_fraction"]) for r in mine}
        assert flushed[2.0**10] < flushed[1.0] / 10
        assert flushed[2.0**15] <= flushed[2.0**10]


def test_pre_with_scale_s_is_post_with_scale_s_over_n(rows: list[dict[str, str]]) -> None:
    """Powers of two are exact: two routes to the same bits.

    pre at N = 32 with S = 2^15 backpropagates loss / 2^5 * 2^15 and reads the sum out times 2^-15;
    post with S = 2^10 backpropagates loss * 2^10 and reads the sum out times 2^-10 / 32.  The
    micro-gradients, the sums and the read-out factors are identical, so is every measured column.
    """
    same = (
        "flushed_fraction",
        "subnormal_fraction",
        "nonfinite_inputs",
        "rel_l2_error",
        "norm_ratio",
        "projection_bias",
        "max_ulp_error",
        "lost_update_fraction",
        "nonfinite",
    )
    for compute, buffer in (("fp16", "fp16"), ("fp16", "fp32"), ("fp32", "fp16")):
        pre = one(rows, compute_format=compute, buffer_format=buffer, scaling="pre", loss_scale=2.0**15, n_accum=32)
        post = one(rows, compute_format=compute, buffer_format=buffer, scaling="post", loss_scale=2.0**10, n_accum=32)
        assert [pre[c] for c in same] == [post[c] for c in same], (compute, buffer)


def test_too_large_a_loss_scale_overflows_posts_fp16_sum(rows: list[dict[str, str]]) -> None:
    """S = 2^15: post's fp16 buffer sums N scaled gradients and overflows; pre's sum stays ~S |g|.

    The overflow is reported (``nonfinite`` > 0 and an infinite error), never averaged away; the
    fp32 buffer holds the same fp16 micro-gradients' sum without overflow.
    """
    bad = one(rows, compute_format="fp16", buffer_format="fp16", scaling="post", loss_scale=2.0**15, n_accum=32)
    assert float(bad["nonfinite"]) > 0
    assert float(bad["rel_l2_error"]) == math.inf
    for r in pick(rows, scaling="pre") + pick(rows, buffer_format="fp32"):
        assert float(r["nonfinite"]) == 0.0, r
        assert math.isfinite(float(r["rel_l2_error"])), r
    for r in pick(rows, loss_scale=1.0):
        assert float(r["nonfinite"]) == 0.0, r
        assert r["nonfinite_inputs"] == "0", r


def test_fp64_compute_flushes_nothing(tmp_path: Path) -> None:
    cfg = uf.Config(
        workloads=("mlp",),
        effective_batch=(16,),
        size="quick",
        pairs=(("fp64", "fp64"), ("fp64", "fp32")),
        loss_scales=(1.0, 2.0**10),
        n_accum=(1, 16),
        trials=1,
        warmup_steps=0,
    )
    rows = read_csv(uf.run(cfg, tmp_path, seed=0, progress=False))
    assert len(rows) == 2 * 2 * 2 * 2
    for r in rows:
        assert float(r["flushed_fraction"]) == 0.0, r
        assert float(r["subnormal_fraction"]) == 0.0, r
        if r["buffer_format"] == "fp64":  # the same fp64 numbers summed in another order: ~1e-16 per add
            assert float(r["rel_l2_error"]) <= 2.0**-40, r


def test_flush_counts_by_hand() -> None:
    """fp16: smallest subnormal 2^-24, smallest normal 2^-14; below 2^-25 (half the subnormal) flushes."""
    values = [2.0**-26, 2.0**-25, 1.5 * 2.0**-25, 2.0**-24, 2.0**-15, 2.0**-14, 1.0, 0.0, 70000.0, -(2.0**-26)]
    # 2^-26: flushed; 2^-25: a tie between 0 and 2^-24, to even: flushed; 1.5 * 2^-25 -> 2^-24 (subnormal);
    # 2^-24, 2^-15: subnormal; 2^-14, 1: normal; 0: not counted; 70000 > fp16 max: inf; -2^-26: flushed (-0)
    g = torch.tensor(values, dtype=torch.float32)
    got = uf.flush_counts(g.double(), g, "fp16")
    assert got == {"nonzero": 9, "flushed": 3, "zeroed": 0, "subnormal": 3, "nonfinite": 1}
    # the same fp32 values into an fp32 buffer: nothing flushes, 70000 is finite, none is subnormal in fp32
    assert uf.flush_counts(g.double(), g, "fp32") == {
        "nonzero": 9,
        "flushed": 0,
        "zeroed": 0,
        "subnormal": 0,
        "nonfinite": 0,
    }
    # ... but counted against fp16's subnormal range: every nonzero value below 2^-14 (6 of them)
    assert uf.flush_counts(g.double(), g, "fp32", "fp16")["subnormal"] == 6
    # an element that is 0 in exact arithmetic is never "flushed", whatever arrives; nor is fp64 residue
    # at most 2^-50 of the micro-gradient's largest element (per row of a chunk)
    assert uf.flush_counts(torch.zeros(3, dtype=torch.float64), torch.zeros(3), "fp16")["flushed"] == 0
    exact = torch.tensor([[1.0, 2.0**-50, 2.0**-49, 0.0], [2.0**-40, 2.0**-90, 0.0, 0.0]], dtype=torch.float64)
    got = uf.flush_counts(exact, torch.zeros(2, 4), "fp16")
    # counted: 1 and 2^-49 (above 2^-50 of 1), 2^-40; not: 2^-50, and 2^-90 (2^-50 of its row's 2^-40).
    # 2^-49 and 2^-40 are below fp16's range: flushed; 1 is representable, so its 0 was made in the
    # computation: zeroed, not flushed
    assert got == {"nonzero": 3, "flushed": 2, "zeroed": 1, "subnormal": 0, "nonfinite": 0}
    # the scale the value reaches the buffer at decides: 2^-20 x 2^-10 (pre, N = 1024) is below fp16's
    # range (flushed); 2^-20 x 2^5 (a loss scale) is representable, so an arriving 0 is "zeroed"
    exact, zero = torch.tensor([2.0**-20], dtype=torch.float64), torch.zeros(1)
    assert uf.flush_counts(exact, zero, "fp16", scale=2.0**-10)["flushed"] == 1
    assert uf.flush_counts(exact, zero, "fp16", scale=2.0**5)["zeroed"] == 1
    with pytest.raises(ValueError, match=r"shape mismatch: exact has shape \(2,\)"):
        uf.flush_counts(torch.zeros(2, dtype=torch.float64), torch.zeros(3), "fp16")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"pairs": (("fp12", "fp16"),)}, "unknown compute format 'fp12'"),
        ({"pairs": (("fp16", "fp7"),)}, "'fp7'"),
        ({"pairs": ()}, "pairs is empty"),
        ({"loss_scales": (1.0, 0.0)}, r"loss scale must be a real number in \(0, inf\), got 0.0"),
        ({"loss_scales": (-4.0,)}, "loss scale must be .*, got -4.0"),
        ({"loss_scales": (math.inf,)}, "loss scale must be .*, got inf"),
        ({"loss_scales": (math.nan,)}, "loss scale must be .*, got nan"),
        ({"n_accum": (0, 4)}, r"n_accum must be integers >= 1, got \(0, 4\)"),
        ({"n_accum": (3,)}, "N=3 does not divide the effective batch 32"),
        ({"effective_batch": (0,), "n_accum": None}, "N_max must be an integer >= 1, got 0"),
        ({"effective_batch": (32, 32)}, "one entry per workload"),
        ({"strategies": ("fancy",)}, "unknown strategy 'fancy'"),
        ({"scalings": ("middle",)}, "unknown scaling 'middle'"),
        ({"workloads": ("resnet",)}, "unknown workload 'resnet'"),
        ({"trials": 0}, "trials must be an integer >= 1, got 0"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_config_names_the_value(change: dict, needle: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=needle):
        uf.run(tiny(**change), tmp_path, progress=False)
    assert not (tmp_path / "results.csv").exists()


def test_plot_writes_png_and_svg_and_marks_the_overflow(tiny_run: Path, tmp_path: Path) -> None:
    (png,) = plot(tiny_run.parent, tmp_path)
    assert png == tmp_path / "underflow.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (tmp_path / "underflow.svg").read_text()
    assert "inf/NaN" in svg  # the overflow band's label and its legend entry
    assert "post, S=2^15" in svg
    assert "pre, S=1 (none)" in svg
