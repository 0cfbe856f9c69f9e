"""The memory-pareto experiment: bytes per parameter by hand, the Pareto front, and a tiny run end to end."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
import torch

from experiments import memory_pareto as mp
from experiments.figures.memory_pareto import pareto_front, plot, summarise
from precision_lab.accumulators import Accumulator
from precision_lab.lab.results import read_csv

ISSUE_COLUMNS = (
    "experiment",
    "workload",
    "compute_format",
    "buffer_format",
    "strategy",
    "n_accum",
    "micro_batch",
    "effective_batch",
    "trial",
    "seed",
    "bytes_per_param",
    "rel_l2_error",
    "norm_ratio",
    "projection_bias",
    "lost_update_fraction",
    "quantisation_floor",
)
METRICS = (
    "rel_l2_error",
    "norm_ratio",
    "projection_bias",
    "cosine",
    "max_ulp_error",
    "lost_update_fraction",
    "quantisation_floor",
    "input_floor",
)
TINY_BUFFERS = (
    ("fp32", "naive"),
    ("fp32", "kahan"),
    ("bf16", "naive"),
    ("bf16", "kahan"),
    ("bf16", "neumaier"),
    ("bf16", "stochastic"),
    ("bf16", "pairwise"),
    ("fp16", "naive"),
    ("fp16", "kahan"),
    ("e5m10", "naive"),
    ("e5m10", "kahan"),
    ("fp8_e4m3", "naive"),
)


def tiny(**kw) -> mp.Config:
    # E = 256 digits down to micro-batches of one sample: the largest N = 256 is where naive bf16 rounding
    # has piled up (see test_bf16_kahan_beats_bf16_naive_at_the_largest_n)
    base = {
        "workloads": ("mlp",),
        "effective_batch": (256,),
        "n_accum": ((16, 256),),
        "size": "quick",
        "buffers": TINY_BUFFERS,
        "trials": 2,
        "warmup_steps": 0,
        "chunk_size": 64,
    }
    return mp.Config(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mp.run(tiny(), tmp_path_factory.mktemp("mp") / "a", seed=5, progress=False)


# --------------------------------------------------------------------------------------------------
# bytes per parameter
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "strategy", "n", "expected"),
    [
        ("bf16", "naive", 16, 2),
        ("bf16", "stochastic", 4096, 2),  # the RNG key is per buffer, not per parameter
        ("bf16", "kahan", 16, 4),
        ("fp32", "naive", 4096, 4),
        ("fp32", "kahan", 16, 8),
        ("fp64", "naive", 16, 8),
        ("fp64", "exact", 16, 344),  # the superaccumulator at capacity: 43 int64 digits
        ("bf16", "exact", 16, 344),  # whatever the format's name
        ("fp16", "kahan", 256, 4),
        ("fp8_e4m3", "naive", 16, 1),
        ("fp8_e5m2", "stochastic", 16, 1),
        ("fp8_e4m3", "kahan", 16, 2),
        ("bf16", "neumaier", 16, 4),  # sum and compensation, like Kahan
        ("fp8_e5m2", "neumaier", 4096, 2),
        # pairwise: floor(log2(N+1)) partial sums live at most (4, 8, 12 at N = 16, 256, 4096)
        ("bf16", "pairwise", 1, 2),
        ("bf16", "pairwise", 16, 8),
        ("bf16", "pairwise", 256, 16),
        ("bf16", "pairwise", 4096, 24),
        ("fp32", "pairwise", 4096, 48),
        ("fp8_e5m2", "pairwise", 256, 8),
        ("bf16", "pairwise", 15, 8),  # 15 = 0b1111: four sums at once
        ("bf16", "pairwise", 14, 6),  # never more than three below 15
        # custom formats: byte-aligned storage of 1 + e + m bits, or the native dtype's itemsize
        ("e8m7", "naive", 16, 2),  # the bf16 layout
        ("e5m10", "kahan", 16, 4),  # the fp16 layout
        ("e5m7", "naive", 16, 2),  # 13 bits -> 2 bytes
        ("e8m11", "kahan", 16, 6),  # 20 bits -> 3 bytes, twice
        ("e2m1", "naive", 16, 1),  # 4 bits -> 1 byte (no packing of two numbers in a byte)
        ("e4m3", "naive", 16, 1),  # the IEEE-like e4m3 (with Inf), 8 bits
    ],
)
def test_bytes_per_param_by_hand(fmt: str, strategy: str, n: int, expected: int) -> None:
    assert mp.bytes_per_param(fmt, strategy, n) == expected


def test_a_bf16_kahan_buffer_costs_what_an_fp32_buffer_costs() -> None:
    for n in (16, 256, 4096):
        assert mp.bytes_per_param("bf16", "kahan", n) == mp.bytes_per_param("fp32", "naive", n) == 4


@pytest.mark.parametrize(
    ("fmt", "strategy", "n", "expected"),
    [
        ("fp8_e4m3", "naive", 16, 4),  # fp8 lives in an fp32 work array
        ("fp8_e5m2", "kahan", 16, 8),
        ("fp8_e5m2", "neumaier", 16, 8),
        ("bf16", "kahan", 16, 4),
        ("e5m7", "naive", 16, 4),  # no native dtype: fp32 work array
        ("e5m10", "naive", 16, 2),  # native fp16
        ("bf16", "exact", 16, 344),
        ("bf16", "pairwise", 4096, 24),
    ],
)
def test_emulated_bytes_per_param(fmt: str, strategy: str, n: int, expected: int) -> None:
    assert mp.emulated_bytes_per_param(fmt, strategy, n) == expected
    assert Accumulator(strategy, fmt, (3,)).dtype.itemsize * mp.buffer_arrays(strategy, n) == expected


@pytest.mark.parametrize(
    ("fmt", "strategy"),
    list(itertools.product(("fp64", "fp32", "bf16", "fp16", "fp8_e4m3"), ("naive", "kahan", "neumaier", "stochastic"))),
)
def test_native_formats_agree_with_the_accumulators_own_count(fmt: str, strategy: str) -> None:
    acc = Accumulator(strategy, fmt, (3,))
    assert mp.bytes_per_param(fmt, strategy, 7) == acc.bytes_per_element
    assert mp.emulated_bytes_per_param(fmt, strategy, 7) == acc.storage_bytes_per_element


def test_exact_is_counted_at_the_capacity_the_widest_data_reaches() -> None:
    """The superaccumulator grows with the data; the experiment counts the most any fp64 stream needs."""
    acc = Accumulator("exact", "fp64", (3,))
    small = acc.bytes_per_element
    for x in (1.0, torch.finfo(torch.float64).max, 5e-324, -1.0):  # the whole exponent range
        acc.add(torch.full((3,), x, dtype=torch.float64))
    assert small < acc.bytes_per_element == mp.bytes_per_param("fp64", "exact", 7)


def test_pairwise_count_is_the_implementations_live_peak() -> None:
    """Drive the real cascade 4096 times and count its occupied slots after every add.

    After k adds the occupied slots are the set bits of k; the running maximum is the live peak,
    which must equal pairwise_partial_sums(k) at every k.  ``Accumulator.arrays`` counts slot
    positions (bit length of k): one more than the live peak at a power of two.
    """
    acc = Accumulator("pairwise", "fp32", (1,), count_lost=False)
    one = torch.ones(1)
    peak = 0
    for k in range(1, 4097):
        acc.add(one)
        live = sum(s is not None for s in acc._slots)
        assert live == bin(k).count("1")
        peak = max(peak, live)
        assert mp.pairwise_partial_sums(k) == peak, k
        assert acc.arrays == k.bit_length()
    assert acc.value().item() == 4096.0
    assert [mp.pairwise_partial_sums(n) for n in (16, 256, 4096)] == [4, 8, 12]
    assert [mp.buffer_arrays("pairwise", n) + 1 for n in (16, 256, 4096)] == [5, 9, 13]  # the slot positions


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: mp.bytes_per_param("bf17", "naive", 16), "'bf17'"),
        (lambda: mp.bytes_per_param("bf16", "kahn", 16), "'kahn'"),
        (lambda: mp.bytes_per_param("bf16", "naive", 0), "got 0"),
        (lambda: mp.pairwise_partial_sums(-3), "got -3"),
        (lambda: mp.bytes_per_param("bf16", "pairwise", 2.0), "got 2.0"),
        (lambda: mp.emulated_bytes_per_param("e11m40", "naive", 4), "e11m40"),  # too wide to emulate
    ],
)
def test_bytes_bad_input(call, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        call()


# --------------------------------------------------------------------------------------------------
# Pareto front
# --------------------------------------------------------------------------------------------------
def keys(front: list) -> list:
    return [k for k, _, _ in front]


def test_pareto_front_drops_dominated_points() -> None:
    pts = [("a", 1, 1.0), ("b", 2, 0.5), ("c", 2, 0.8), ("d", 4, 0.5), ("e", 8, 0.1), ("f", 4, 0.9)]
    # c: same bytes as b, more error; d: same error as b, more bytes; f: worse than b on both
    assert keys(pareto_front(pts)) == ["a", "b", "e"]
    for perm in itertools.permutations(pts):
        assert pareto_front(perm) == pareto_front(pts)


def test_pareto_front_keeps_duplicates_and_breaks_ties_by_key() -> None:
    assert keys(pareto_front([("z", 2, 0.5), ("y", 2, 0.5), ("x", 4, 0.1)])) == ["y", "z", "x"]
    assert keys(pareto_front([("a", 4, 0.5), ("b", 4, 0.5), ("c", 2, 0.5)])) == ["c"]  # c beats both on bytes


def test_pareto_front_with_a_tolerance_counts_near_ties_as_ties() -> None:
    # 8 bytes buy 4% over 4 bytes: not enough at rtol 5%, enough at 0
    pts = [("four", 4, 1.00), ("eight", 8, 0.96), ("sixteen", 16, 0.5)]
    assert keys(pareto_front(pts)) == ["four", "eight", "sixteen"]
    assert keys(pareto_front(pts, rtol=0.05)) == ["four", "sixteen"]
    # equal bytes, errors within the tolerance: neither dominates, both kept; beyond it, the worse goes
    assert keys(pareto_front([("a", 4, 1.00), ("b", 4, 1.04)], rtol=0.05)) == ["a", "b"]
    assert keys(pareto_front([("a", 4, 1.00), ("b", 4, 1.06)], rtol=0.05)) == ["a"]
    # a cheaper point slightly worse (within 5%) still dominates the dearer one
    assert keys(pareto_front([("cheap", 2, 1.04), ("dear", 4, 1.00)], rtol=0.05)) == ["cheap"]
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match=re.escape("rtol must be a real number in [0, inf)")):
            pareto_front(pts, rtol=bad)


def test_pareto_front_edge_values() -> None:
    assert pareto_front([]) == []
    assert keys(pareto_front([("only", 3, 0.2)])) == ["only"]
    # an infinite error is on the front only as the cheapest point; NaN is incomparable and left out
    assert keys(pareto_front([("inf", 1, math.inf), ("one", 2, 1.0)])) == ["inf", "one"]
    assert keys(pareto_front([("inf", 2, math.inf), ("one", 2, 1.0)])) == ["one"]
    assert keys(pareto_front([("nan", 1, math.nan), ("one", 2, 1.0)])) == ["one"]
    assert keys(pareto_front([("zero", 16, 0.0), ("one", 2, 1.0)])) == ["one", "zero"]
    with pytest.raises(ValueError, match="bytes of 'neg'"):
        pareto_front([("neg", -1, 0.1)])
    with pytest.raises(ValueError, match="bytes of 'nan'"):
        pareto_front([("nan", math.nan, 0.1)])


# --------------------------------------------------------------------------------------------------
# the experiment end to end
# --------------------------------------------------------------------------------------------------
def test_rows_cover_the_grid_with_the_issue_columns(tiny_run: Path) -> None:
    rows = read_csv(tiny_run)
    assert tiny_run.read_text().splitlines()[0] == ",".join(mp.COLUMNS)
    assert set(ISSUE_COLUMNS) <= set(mp.COLUMNS)
    cfg = tiny()
    got = sorted((int(r["n_accum"]), int(r["trial"]), r["buffer_format"], r["strategy"]) for r in rows)
    assert got == sorted((n, t, f, s) for n in (16, 256) for t in range(2) for f, s in TINY_BUFFERS)
    assert len(rows) == len(cfg.tasks()) * len(cfg.buffers)
    for r in rows:
        n = int(r["n_accum"])
        assert (r["experiment"], r["workload"], r["compute_format"], r["scaling"]) == (mp.NAME, "mlp", "fp32", "post")
        assert int(r["micro_batch"]) * n == int(r["effective_batch"]) == 256
        assert int(r["bytes_per_param"]) == mp.bytes_per_param(r["buffer_format"], r["strategy"], n)
        assert int(r["emulated_bytes_per_param"]) == mp.emulated_bytes_per_param(r["buffer_format"], r["strategy"], n)
        assert int(r["arrays"]) == mp.buffer_arrays(r["strategy"], n)
        assert float(r["nonfinite"]) == 0.0
        assert float(r["input_floor"]) > 0.0  # fp32 micro-gradients differ from the fp64 truth
    # one input floor per (N, trial, format); fp32's (the compute floor: rounding fp32 to fp32 is exact)
    # is below bf16's by far more than 1000x (2^-24 vs 2^-8 relative rounding of each addend)
    floors = {(r["n_accum"], r["trial"], r["buffer_format"]): float(r["input_floor"]) for r in rows}
    assert len(floors) == len({(r["n_accum"], r["trial"], r["buffer_format"], r["input_floor"]) for r in rows})
    for (n, t, f), floor in floors.items():
        if f == "fp32":
            assert floor * 1000 < floors[(n, t, "bf16")]


def test_a_custom_layout_of_a_native_format_measures_the_same(tiny_run: Path) -> None:
    """``e5m10`` is fp16's layout: every deterministic row matches fp16's to the last digit."""
    rows = read_csv(tiny_run)
    by = {(r["buffer_format"], r["strategy"], r["n_accum"], r["trial"]): r for r in rows}
    checked = 0
    for (fmt, strategy, n, trial), r in by.items():
        if fmt == "e5m10":
            assert [r[c] for c in METRICS] == [by[("fp16", strategy, n, trial)][c] for c in METRICS]
            checked += 1
    assert checked == 2 * 2 * 2


def test_bf16_kahan_beats_bf16_naive_at_the_largest_n(tiny_run: Path) -> None:
    """N = 256 single-sample micro-gradients: naive bf16 piles up rounding, Kahan sits near its input floor.

    Each naive add rounds a partial sum whose magnitude keeps the whole history's cancellation
    (sum |g_i| >> |sum g_i| elementwise for per-sample gradients), so its error grows like
    sqrt(N) u sum|g_i|; the compensated sum keeps only each addend's own bf16 rounding, u (sum g_i^2)^1/2,
    about sqrt(N) = 16 times smaller.  Measured over seeds 0, 1, 2, 5 x 2 trials: naive / Kahan 12-28x
    (asserted > 4x), Kahan / its input floor 1.10-1.42 (asserted within 2x).
    """
    rows = read_csv(tiny_run)
    for trial in ("0", "1"):
        err = {
            r["strategy"]: float(r["rel_l2_error"])
            for r in rows
            if (r["buffer_format"], r["n_accum"], r["trial"]) == ("bf16", "256", trial)
        }
        floor = next(
            float(r["input_floor"])
            for r in rows
            if (r["buffer_format"], r["n_accum"], r["trial"]) == ("bf16", "256", trial)
        )
        assert err["kahan"] < err["naive"] / 4, err
        assert floor / 2 < err["kahan"] < 2 * floor, (err, floor)


def test_at_equal_bytes_fp32_naive_beats_bf16_kahan(tiny_run: Path) -> None:
    """4 bytes each: bf16 Kahan cannot undo the rounding of each fp32 addend to bf16 (u = 2^-8 vs 2^-24).

    Its error is at least its input floor, ~2^16 times fp32's rounding; 100x is a margin of ~600x.
    """
    table = summarise(read_csv(tiny_run))
    for n in (16, 256):
        e = {(x.buffer_format, x.strategy): x for x in table[("mlp", n)]}
        assert e[("fp32", "naive")].bytes == e[("bf16", "kahan")].bytes == 4
        assert e[("fp32", "naive")].error * 100 < e[("bf16", "kahan")].error
        front = [k for k, x in e.items() if x.on_front]
        assert ("fp32", "naive") in front
        assert ("bf16", "kahan") not in front


def test_same_seed_same_bytes_other_seed_other_bytes(tiny_run: Path, tmp_path: Path) -> None:
    assert mp.run(tiny(), tmp_path / "b", seed=5, progress=False).read_bytes() == tiny_run.read_bytes()
    small = tiny(n_accum=((16,),), trials=1)  # the seed changes the batch and the stochastic rounding
    assert (
        mp.run(small, tmp_path / "c", seed=6, progress=False).read_bytes()
        != mp.run(small, tmp_path / "d", seed=7, progress=False).read_bytes()
    )


def test_plot_writes_png_and_svg(tiny_run: Path, tmp_path: Path) -> None:
    [png] = plot(tiny_run.parent, tmp_path / "fig")
    assert png == tmp_path / "fig" / "memory_pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = png.with_suffix(".svg").read_text()
    assert "<svg" in svg
    assert "fp32 naive" in svg  # the equal-bytes answer is written on the figure


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"buffers": (("bf17", "naive"),)}, "unknown format 'bf17'"),
        ({"buffers": (("bf16", "kahn"),)}, "unknown strategy 'kahn'"),
        ({"buffers": (("bf16", "naive"), ("bfloat16", "naive"))}, "twice"),
        ({"buffers": ()}, "buffers is empty"),
        ({"n_accum": ((16, 24),)}, "does not split into N=24"),
        ({"n_accum": ((0,),)}, "got 0"),
        ({"n_accum": ((),)}, "n_accum for effective batch 256 is empty"),
        ({"n_accum": ((16,), (16,))}, "one entry per workload"),
        ({"trials": 0}, "trials must be an integer >= 1, got 0"),
    ],
)
def test_bad_config_is_a_value_error_naming_the_value(kw: dict, needle: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=needle):
        tiny(**kw).tasks()
    with pytest.raises(ValueError, match=needle):
        mp.run(tiny(**kw), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # validated before anything is written


@pytest.mark.slow
def test_quick_config_end_to_end(tmp_path: Path) -> None:
    """The quick preset, both workloads: complete, and pairwise's bytes grow with N."""
    cfg = mp.Config.quick()
    rows = read_csv(mp.run(cfg, tmp_path, progress=False))
    assert len(rows) == len(cfg.tasks()) * len(cfg.buffers)
    table = summarise(rows)
    assert set(table) == {("mlp", 16), ("mlp", 256), ("transformer", 4), ("transformer", 32)}
    for w, small, large in (("mlp", 16, 256), ("transformer", 4, 32)):
        pw = {
            n: next(e.bytes for e in table[(w, n)] if (e.buffer_format, e.strategy) == ("bf16", "pairwise"))
            for n in (small, large)
        }
        assert pw[large] > pw[small]
        assert any(e.on_front and e.buffer_format == "fp32" for e in table[(w, large)])
    assert plot(tmp_path, tmp_path / "fig")[0].exists()
