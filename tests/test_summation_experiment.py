"""The summation experiment end to end, at tiny sizes: grid, bytes, stagnation, bounds, lost updates, figures.

Tolerance of the bound checks (``within``): the bounds are rigorous for the exact quantities, and the
stored numbers carry fp64 rounding only.  The reference is the exact sum rounded once to fp64
(relative 2^-53 per entry, so at most 2^-53 of ``||S||`` on the error), the norms are fsums of rounded
squares (relative ~2^-52) and the bound is a product of a few fp64 numbers (relative ~2^-50).  Hence
``measured <= bound * (1 + 2^-40) + 2^-50``: 2^10 times the evaluation error, far below any rounding
error of the formats measured (u >= 2^-24).
"""

from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from experiments import summation
from experiments.figures.summation import plot
from precision_lab import Accumulator, get_format, metrics, round_nearest, theory
from precision_lab.lab.results import read_csv
from precision_lab.measure import power_grid, stable_seed

TINY = summation.Config(
    formats=("bf16", "fp16", "fp8_e5m2"), streams=tuple(summation.STREAMS), n_max=64, elements=8, trials=2
)
SLACK_REL, SLACK_ABS = 2.0**-40, 2.0**-50  # fp64 evaluation of the stored numbers (module docstring)


def within(measured: float, bound: float) -> bool:
    return measured <= bound * (1 + SLACK_REL) + SLACK_ABS


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return summation.run(TINY, tmp_path_factory.mktemp("sum") / "a", seed=5, progress=False)


@pytest.fixture(scope="module")
def tiny_rows(tiny_run: Path) -> list[dict[str, str]]:
    return read_csv(tiny_run)


@pytest.fixture(scope="module")
def stall_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    """Constant addends in bf16 (stall 256) and fp16 (stall 2048), N up to 4096; positive in fp8_e4m3 (overflow).

    The deterministic strategies only: 4096 adds of stochastic rounding would double the cost.
    """
    cfg = summation.Config(
        formats=("bf16", "fp16", "fp8_e4m3"),
        strategies=("naive", "kahan", "neumaier", "pairwise"),
        streams=("constant", "positive"),
        n_max=4096,
        elements=4,
        trials=1,
    )
    return read_csv(summation.run(cfg, tmp_path_factory.mktemp("stall"), seed=0, progress=False))


# --------------------------------------------------------------------------------------------------
# the grid, the bytes, the configuration
# --------------------------------------------------------------------------------------------------
def test_rows_cover_the_grid_with_every_column(tiny_rows: list[dict[str, str]]) -> None:
    assert list(tiny_rows[0]) == list(summation.COLUMNS)
    grid = power_grid(TINY.n_max)
    assert grid == [1, 2, 4, 8, 16, 32, 64]
    keys = {(r["stream"], r["buffer_format"], r["strategy"], int(r["n_accum"]), int(r["trial"])) for r in tiny_rows}
    expected = {
        (s, f, g, n, t)
        for s in TINY.streams
        for f in TINY.formats
        for g in TINY.strategies
        for n in grid
        for t in range(TINY.trials)
    }
    assert keys == expected
    assert len(tiny_rows) == len(expected)  # no duplicates
    stagnation_columns = {
        "experiment",
        "stream",
        "buffer_format",
        "strategy",
        "n_accum",
        "elements",
        "trial",
        "seed",
        "rel_l2_error",
        "norm_ratio",
        "projection_bias",
        "lost_update_fraction",
        "nonfinite",
        "predicted_stall",
    }
    assert stagnation_columns <= set(summation.COLUMNS)  # a superset of the experiment it replaces
    for r in tiny_rows:
        assert r["experiment"] == "summation"
        assert int(r["elements"]) == TINY.elements
        assert int(r["seed"]) == summation.data_seed(5, r["stream"], int(r["trial"]))
        assert r["predicted_stall"] == (
            str(theory.stagnation_count(r["buffer_format"], 1.0)) if r["stream"] == "constant" else ""
        )
        assert float(r["lam"]) == TINY.lam
        assert float(r["sum_condition"]) >= 1.0 - 1e-15  # ||sum |x| || >= ||sum x||
        # the bounds are the theory's coefficients times kappa, the confidences 1 - m (1 - Q)
        n, u, kappa, lam = (
            int(r["n_accum"]),
            get_format(r["buffer_format"]).unit_roundoff,
            float(r["sum_condition"]),
            TINY.lam,
        )
        for column, c in (
            ("bound_worst_case", theory.recursive_sum_bound(n, u, 1.0)),
            ("bound_probabilistic", theory.probabilistic_sum_bound(n, u, 1.0, lam)),
        ):
            assert float(r[column]) in ({c * kappa, 0.0} if n == 1 else {c * kappa, math.inf}), (column, r)
        q = theory.probabilistic_bound_probability(n, u, lam)
        assert float(r["bound_probabilistic_confidence"]) == max(0.0, 1 - TINY.elements * (1 - q))
        if r["n_accum"] == "1":  # one addend: nothing is rounded, every strategy is exact and every bound 0
            assert float(r["rel_l2_error"]) == 0.0
            assert {float(r[c]) for c in ("bound_worst_case", "bound_probabilistic", "bound_strategy")} == {0.0}


def test_same_seed_same_bytes_other_seed_other_bytes_and_shards(tiny_run: Path, tmp_path: Path) -> None:
    assert summation.run(TINY, tmp_path / "b", seed=5, progress=False).read_bytes() == tiny_run.read_bytes()
    assert summation.run(TINY, tmp_path / "c", seed=6, progress=False).read_bytes() != tiny_run.read_bytes()
    # two shards (interleaved tasks) merge to the same bytes
    assert summation.run(TINY, tmp_path / "d", seed=5, shard=(1, 2), progress=False) is None
    assert (
        summation.run(TINY, tmp_path / "d", seed=5, shard=(2, 2), progress=False).read_bytes() == tiny_run.read_bytes()
    )


def test_thread_count_does_not_change_the_bytes(tmp_path: Path) -> None:
    """Every reduction is exact or single-threaded (fsum norms, integer counts, metrics on one thread)."""
    cfg = summation.Config(formats=("bf16", "fp8_e5m2"), streams=("low_snr", "student_t"), n_max=32, elements=512)
    before = torch.get_num_threads()
    try:
        outs = []
        for k, threads in enumerate((1, 2)):
            torch.set_num_threads(threads)
            outs.append(summation.run(cfg, tmp_path / str(k), seed=2, progress=False).read_bytes())
    finally:
        torch.set_num_threads(before)
    assert outs[0] == outs[1]


def test_tasks_are_one_per_trial_and_format() -> None:
    assert TINY.tasks() == [summation.Task(trial=t, buffer_format=f) for t in range(2) for f in TINY.formats]


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("formats", ("bf16", "bf17"), "'bf17'"),
        ("formats", ("bf16", "bf16"), "repeats"),
        ("strategies", ("naive", "exact"), "'exact'"),
        ("streams", ("constant", "pink_noise"), "'pink_noise'"),
        ("streams", (), "stream"),
        ("n_max", 0, "n_max must be an integer >= 1, got 0"),
        ("n_max", 2.5, "n_max must be an integer >= 1, got 2.5"),
        ("elements", -3, "elements must be an integer >= 1, got -3"),
        ("trials", True, "trials must be an integer >= 1, got True"),
        ("lam", 0.0, "lam must be a real number in (0, inf), got 0.0"),
        ("lam", math.inf, "got inf"),
    ],
)
def test_bad_config_is_a_value_error_naming_the_value(field: str, value: object, needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        dataclasses.replace(TINY, **{field: value})


# --------------------------------------------------------------------------------------------------
# what the rows say
# --------------------------------------------------------------------------------------------------
def test_constant_stream_stalls_exactly_where_theory_says(stall_rows: list[dict[str, str]]) -> None:
    """Adding 1 in RN: exact up to N = 2^t, then stuck at 2^t (by hand: error 1 - 2^t / N, lost (N - 2^t) / N)."""
    for fmt, stall in (("bf16", 256), ("fp16", 2048)):
        naive = {
            int(r["n_accum"]): r
            for r in stall_rows
            if (r["stream"], r["buffer_format"], r["strategy"]) == ("constant", fmt, "naive")
        }
        assert {r["predicted_stall"] for r in naive.values()} == {str(stall)}
        for n, r in naive.items():
            expected = 0.0 if n <= stall else 1 - stall / n  # exact dyadic numbers: compared exactly
            assert float(r["rel_l2_error"]) == expected, (fmt, n)
            assert float(r["norm_ratio"]) == 1 - expected
            assert float(r["projection_bias"]) == -expected
            assert float(r["lost_update_fraction"]) == (0.0 if n <= stall else (n - stall) / n)
        assert float(naive[2 * stall]["rel_l2_error"]) == 0.5
        # Kahan and pairwise sums of 1s stay exact through both stalls
        for strategy in ("kahan", "pairwise"):
            errs = [
                float(r["rel_l2_error"])
                for r in stall_rows
                if (r["stream"], r["buffer_format"], r["strategy"]) == ("constant", fmt, strategy)
            ]
            assert errs == [0.0] * len(power_grid(4096)), (fmt, strategy)
        # Neumaier's compensation is a naive sum of the lost ones: it stalls at 2^t too, the read-out at 2 * 2^t
        neumaier = {
            int(r["n_accum"]): float(r["rel_l2_error"])
            for r in stall_rows
            if (r["stream"], r["buffer_format"], r["strategy"]) == ("constant", fmt, "neumaier")
        }
        assert neumaier == {n: 0.0 if n <= 2 * stall else 1 - 2 * stall / n for n in power_grid(4096)}, fmt


def test_kahan_and_pairwise_beat_naive_on_a_positive_stream(tmp_path: Path) -> None:
    cfg = summation.Config(
        formats=("bf16",), strategies=("naive", "kahan", "pairwise"), streams=("positive",), n_max=1024, elements=64
    )
    rows = read_csv(summation.run(cfg, tmp_path, seed=1, progress=False))
    err = {(r["strategy"], int(r["n_accum"])): float(r["rel_l2_error"]) for r in rows}
    for n in (128, 256, 512, 1024):
        assert err["kahan", n] < err["naive", n] / 30, n
        assert err["pairwise", n] < err["naive", n] / 3, n
    assert err["naive", 1024] > 0.2  # past bf16's stall for addends ~1: most updates are lost
    assert err["pairwise", 1024] < 0.01


def test_experiment_matches_an_independent_oracle() -> None:
    """Naive/Kahan/Neumaier values, lost counts and the reference against one Accumulator per stream and math.fsum.

    The wide buffers share one Accumulator per strategy across the streams and count lost updates per
    stream from the public state; here every stream gets its own buffers with the library's counters,
    and the reference is ``math.fsum`` of the rounded addends (correctly rounded, like the superaccumulator).
    Stochastic rounding draws its bits by position in the wide buffer, so it is checked against a wide
    Accumulator with ``count_lost=True``: the per-stream counts must add up to its total.
    """
    cfg = summation.Config(
        formats=("fp8_e5m2",), streams=("positive", "low_snr", "sparse"), n_max=128, elements=16, trials=1
    )
    seed, fmt, m = 3, "fp8_e5m2", cfg.elements
    rows = summation.measure_task(cfg, fmt, 0, seed)
    x = round_nearest(torch.cat(summation.draw(cfg, seed, 0)), fmt)  # (n_max, streams x elements)
    at = {(r["stream"], r["strategy"], int(r["n_accum"])): r for r in rows}
    for b, stream in enumerate(cfg.streams):
        cols = x[:, b * m : (b + 1) * m]
        accs = {s: Accumulator(s, fmt, (m,)) for s in ("naive", "kahan", "neumaier", "pairwise")}
        for n in range(1, cfg.n_max + 1):
            for acc in accs.values():
                acc.add(cols[n - 1])
            if n not in (1, 8, 64, 128):
                continue
            ref = torch.tensor([math.fsum(c.tolist()) for c in cols[:n].T], dtype=torch.float64)
            for s, acc in accs.items():
                r = at[stream, s, n]
                assert float(r["rel_l2_error"]) == metrics.rel_l2_error(acc.value(), ref), (stream, s, n)
                assert float(r["lost_update_fraction"]) == acc.lost_updates / (n * m), (stream, s, n)
            assert float(r["sum_condition"]) == pytest.approx(
                math.sqrt(sum(math.fsum(abs(v) for v in c.tolist()) ** 2 for c in cols[:n].T)) / float(ref.norm()),
                rel=1e-14,
            )
    for g in summation.SWEPT_STRATEGIES:  # the counts compared are not trivially 0 (fp8_e5m2 loses many updates)
        assert any(float(at[s, g, 128]["lost_update_fraction"]) > 0.01 for s in cfg.streams), g
    sr = Accumulator(
        "stochastic",
        fmt,
        (x.shape[1],),
        count_lost=True,
        generator=torch.Generator().manual_seed(stable_seed(seed, summation.NAME, fmt, "stochastic", 0)),
    )
    for n in range(1, cfg.n_max + 1):
        sr.add(x[n - 1])
        if n in (8, 128):
            per_stream = [float(at[s, "stochastic", n]["lost_update_fraction"]) * n * m for s in cfg.streams]
            assert sum(round(v) for v in per_stream) == sr.lost_updates > 0
            for b, s in enumerate(cfg.streams):
                ref = torch.tensor([math.fsum(c.tolist()) for c in x[:n, b * m : (b + 1) * m].T], dtype=torch.float64)
                assert float(at[s, "stochastic", n]["rel_l2_error"]) == metrics.rel_l2_error(
                    sr.value()[b * m : (b + 1) * m], ref
                )


def test_hand_made_stream_exact_error_and_a_nonfinite_input() -> None:
    """A stream given as chunks: 1 then addends of 1/512 in bf16 (all absorbed), and an fp8_e4m3 NaN input.

    bf16: 1 + 2^-9 is a tie that goes back to 1 (even), so naive keeps 1 while the exact sum is
    1 + (N-1)/512: rel error (N-1)/(512 + N - 1), exactly; Kahan carries the lost part.
    """
    cfg = summation.Config(formats=("bf16",), streams=("constant",), n_max=64, elements=1, trials=1)
    chunk = torch.full((64, 1), 2.0**-9, dtype=torch.float64)
    chunk[0] = 1.0
    rows = summation.measure_task(cfg, "bf16", 0, 0, chunks=[chunk])
    for r in rows:
        n = int(r["n_accum"])
        if r["strategy"] == "naive":
            exact = Fraction(n - 1, 512) / (1 + Fraction(n - 1, 512))
            assert float(r["rel_l2_error"]) == float(exact)
            assert float(r["lost_update_fraction"]) == (n - 1) / n
    assert not [(e, b) for e, b in deterministic_checks(rows) if not within(e, b)]
    # SR may round to the farther neighbour: here (seed 0) it exceeds RN's worst case, not its own gamma(2u)
    assert any(r["rel_l2_error"] > r["bound_worst_case"] for r in rows if r["strategy"] == "stochastic")
    # fp8_e4m3 has no Inf: 1000 rounds to NaN.  The buffers report it; the reference skips it; bounds are void.
    chunk = torch.ones(8, 2, dtype=torch.float64)
    chunk[3, 1] = 1000.0
    cfg = dataclasses.replace(cfg, formats=("fp8_e4m3",), n_max=8, elements=2)
    for r in summation.measure_task(cfg, "fp8_e4m3", 0, 0, chunks=[chunk]):
        n = int(r["n_accum"])
        assert int(r["nonfinite_inputs"]) == (n >= 4)
        if n >= 4:
            assert float(r["nonfinite"]) == 1.0
            assert float(r["rel_l2_error"]) == math.inf
            assert {float(r[c]) for c in ("bound_worst_case", "bound_probabilistic", "bound_strategy")} == {math.inf}


# --------------------------------------------------------------------------------------------------
# the bounds
# --------------------------------------------------------------------------------------------------
def deterministic_checks(rows: list[dict[str, str]]) -> list[tuple[float, float]]:
    """(measured, bound) for every rigorous bound of every row where it is finite.

    The stored ones (``bound_worst_case`` for naive and pairwise, ``bound_strategy`` where its
    confidence is 1), plus SR's own worst case, ``gamma_{n-1}(2u) kappa`` (each SR step errs by less
    than 2u), where the buffer did not overflow.
    """
    pairs = []
    for r in rows:
        err = float(r["rel_l2_error"])
        if r["strategy"] in ("naive", "pairwise") and math.isfinite(float(r["bound_worst_case"])):
            pairs.append((err, float(r["bound_worst_case"])))
        if float(r["bound_strategy_confidence"]) == 1.0 and math.isfinite(float(r["bound_strategy"])):
            pairs.append((err, float(r["bound_strategy"])))
        if r["strategy"] == "stochastic" and float(r["nonfinite"]) == 0 and int(r["nonfinite_inputs"]) == 0:
            u = get_format(r["buffer_format"]).unit_roundoff
            c = theory.gamma(int(r["n_accum"]) - 1, min(2 * u, 0.5))
            if math.isfinite(c):
                pairs.append((err, c * float(r["sum_condition"]) if c else 0.0))
    return pairs


def test_measured_errors_never_exceed_the_rigorous_bounds(
    tiny_rows: list[dict[str, str]], stall_rows: list[dict[str, str]]
) -> None:
    rows = tiny_rows + stall_rows
    pairs = deterministic_checks(rows)
    assert len(pairs) > 1000
    bad = [(e, b) for e, b in pairs if not within(e, b)]
    assert not bad, bad[:5]
    assert sum(e > 0 for e, _ in pairs) > 500  # the check is not empty: most are real rounding errors
    # the overflow rule voids bounds before the buffer overflows: fp8_e4m3 positive runs past 448
    overflowed = [r for r in stall_rows if float(r["nonfinite"]) > 0]
    assert overflowed
    assert all(float(r["bound_worst_case"]) == float(r["bound_strategy"]) == math.inf for r in overflowed)


def test_the_bound_check_has_teeth(tiny_rows: list[dict[str, str]]) -> None:
    """Negative controls: the naive bound with u/4 fails, and so does the right bound against the wrong reference.

    At N = 2 each entry is one rounding, |delta| <= u and about u/2 on average: with u/4 the bound
    gamma_1 kappa is below the measured error of most random streams (8 entries each, so not all).
    """
    naive = [r for r in tiny_rows if r["strategy"] == "naive" and r["buffer_format"] == "bf16"]
    u4 = 2.0**-10
    violated = [
        r
        for r in naive
        if int(r["n_accum"]) > 1
        and not within(float(r["rel_l2_error"]), theory.gamma(int(r["n_accum"]) - 1, u4) * float(r["sum_condition"]))
    ]
    hit = {(r["stream"], r["trial"]) for r in violated if r["n_accum"] == "2"}
    assert len(hit) >= 4, hit  # of the 8 (random stream, trial) pairs
    # wrong reference: the fp64 sum of the *unrounded* addends mixes input quantisation into the error,
    # which the accumulation bound does not cover: at N = 1 the bound is 0 but the error is not.
    g = summation.draw(TINY, 5, 0)[0][:1, TINY.elements : 2 * TINY.elements]  # first "positive" micro-gradient
    err = metrics.rel_l2_error(round_nearest(g[0], "bf16"), g[0])
    row = next(r for r in naive if (r["stream"], r["n_accum"], r["trial"]) == ("positive", "1", "0"))
    assert float(row["bound_worst_case"]) == 0.0 < err


def test_probabilistic_bounds_hold_at_their_stated_probability(
    tiny_rows: list[dict[str, str]], stall_rows: list[dict[str, str]]
) -> None:
    """SR (a theorem) and HM19 on random streams (a model): no violation where confidence >= 0.9.

    Union bound over rows (no independence needed): P(any violation) <= sum(1 - confidence), which is
    below 1e-3 here, so a single violation rejects the bound at level 1e-3.  Negative controls: the SR
    bound at lam = 0.1 fails, and HM19 fails for stagnation (fp16, N >= 4096: one-signed errors).
    """
    rows = tiny_rows + stall_rows
    sr = [
        r
        for r in rows
        if r["strategy"] == "stochastic" and float(r["bound_strategy_confidence"]) >= 0.9 and int(r["n_accum"]) > 1
    ]
    hm = [
        r
        for r in rows
        if r["strategy"] == "naive"
        and r["stream"] not in ("constant",)
        and float(r["bound_probabilistic_confidence"]) >= 0.9
        and int(r["n_accum"]) > 1
    ]
    assert len(sr) > 100
    assert len(hm) > 100
    risk = sum(1 - float(r["bound_strategy_confidence"]) for r in sr)
    risk += sum(1 - float(r["bound_probabilistic_confidence"]) for r in hm)
    assert risk < 1e-3
    assert all(within(float(r["rel_l2_error"]), float(r["bound_strategy"])) for r in sr)
    assert all(within(float(r["rel_l2_error"]), float(r["bound_probabilistic"])) for r in hm)
    # negative control 1: lam = 0.1 makes the SR bound too small to hold
    low = [
        r
        for r in sr
        if math.isfinite(float(r["bound_strategy"]))
        and float(r["rel_l2_error"]) > 0
        and not within(
            float(r["rel_l2_error"]),
            theory.stochastic_rounding_sum_bound(
                int(r["n_accum"]), get_format(r["buffer_format"]).unit_roundoff, 1.0, 0.1
            )
            * float(r["sum_condition"]),
        )
    ]
    assert len(low) > 10
    # negative control 2: the HM19 model fails for stagnation (all rounding errors of one sign)
    stuck = [
        r
        for r in stall_rows
        if (r["stream"], r["buffer_format"], r["strategy"], r["n_accum"]) == ("constant", "fp16", "naive", "4096")
    ]
    assert float(stuck[0]["bound_probabilistic_confidence"]) > 0.999
    assert float(stuck[0]["rel_l2_error"]) == 0.5 > float(stuck[0]["bound_probabilistic"])


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------
def test_plot_writes_png_and_svg_from_stored_results(tiny_run: Path, tmp_path: Path) -> None:
    paths = plot(tiny_run.parent, tmp_path)
    assert [p.name for p in paths] == ["summation.png", "summation_formats.png"]
    for p in paths:
        assert p.read_bytes().startswith(b"\x89PNG")
        assert p.with_suffix(".svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.slow
def test_quick_config_end_to_end(tmp_path: Path) -> None:
    """The quick config (every format but fp32, N up to 2^12) runs and plots; key facts hold."""
    cfg = summation.Config.quick()
    rows = read_csv(summation.run(cfg, tmp_path / "summation", seed=0, progress=False))
    assert len(rows) == len(cfg.formats) * cfg.trials * len(cfg.streams) * len(cfg.strategies) * 13
    assert not [(e, b) for e, b in deterministic_checks(rows) if not within(e, b)]
    naive = {
        (r["buffer_format"], int(r["n_accum"])): float(r["rel_l2_error"])
        for r in rows
        if (r["stream"], r["strategy"]) == ("constant", "naive")
    }
    assert [naive["bf16", 256], naive["bf16", 512], naive["fp16", 2048], naive["fp16", 4096]] == [0.0, 0.5, 0.0, 0.5]
    assert len(plot(tmp_path / "summation", tmp_path / "figures")) == 2
