"""Measurement: one pass records every N, against the fp64 reference; bad input names the value."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from precision_lab import measure, metrics
from precision_lab.gradients import GradientEngine, reference_gradient
from precision_lab.measure import accumulate, fixed_micro, power_grid, stream

BUFFERS = [("bf16", "naive"), ("bf16", "kahan"), ("bf16", "stochastic"), ("fp16", "pairwise"), ("fp64", "exact")]


def draws(seed: int, p: int = 64, mean: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    return lambda k: mean + torch.randn(k, p, generator=g, dtype=torch.float64)


def test_one_pass_records_what_separate_passes_measure() -> None:
    """The N=k rows of one pass to N_max equal a pass that stops at k (stochastic rounding included)."""
    whole = stream(draws(0), "fp32", [1, 4, 16, 64], BUFFERS, scaling="post", seed=1, chunk_size=7)
    for k in (1, 4, 16):
        alone = stream(draws(0), "fp32", [k], BUFFERS, scaling="post", seed=1, chunk_size=7)
        assert [r for r in whole if r["n_accum"] == k] == alone
    assert {r["n_accum"] for r in whole} == {1, 4, 16, 64}
    assert set(whole[0]) == set(measure.MEASURE_COLUMNS)


def test_adding_a_buffer_does_not_change_the_others() -> None:
    few = stream(draws(2), "fp32", [8, 32], BUFFERS[:3], scaling="post", seed=5)
    more = stream(draws(2), "fp32", [8, 32], BUFFERS, scaling="post", seed=5)
    assert few == [r for r in more if (r["buffer_format"], r["strategy"]) in BUFFERS[:3]]


def test_naive_bf16_stalls_at_256_as_theory_says() -> None:
    """Adding 1.0: a naive bf16 buffer stalls at 2^8, so at N = 1024 it holds 256 and the mean is 1/4.

    One element, so the norms are exact and the metrics are exact binary fractions.
    """
    rows = stream(
        lambda k: torch.ones(k, 1, dtype=torch.float64),
        "bf16",
        [256, 1024],
        [("bf16", "naive"), ("bf16", "kahan"), ("fp64", "exact")],
        scaling="post",
        seed=0,
    )
    by = {(r["strategy"], r["n_accum"]): r for r in rows}
    assert by[("naive", 256)]["rel_l2_error"] == 0.0
    assert by[("naive", 1024)]["rel_l2_error"] == 0.75
    assert by[("naive", 1024)]["norm_ratio"] == 0.25
    assert by[("naive", 1024)]["lost_update_fraction"] == (1024 - 256) / 1024
    assert by[("kahan", 1024)]["rel_l2_error"] == 0.0
    assert by[("exact", 1024)]["rel_l2_error"] == 0.0


def test_exact_buffer_on_fp64_inputs_matches_the_truth_and_pre_equals_post_for_powers_of_two() -> None:
    rows = {
        s: stream(draws(3), "fp64", [1, 2, 8, 32], [("fp64", "exact")], scaling=s, seed=0) for s in measure.SCALINGS
    }
    for r in rows["post"]:
        # the same exact sum divided by a power of two on both sides: exactly equal
        assert r["rel_l2_error"] == 0.0
        assert r["quantisation_floor"] == 0.0
    # pre: each g/N is exact for N = 2^k, so the exact sum of g/N equals the exact sum / N
    assert [r["rel_l2_error"] for r in rows["pre"]] == [0.0] * 4


def test_quantisation_floor_bounds_every_single_format_read_out() -> None:
    """No vector of format numbers is closer to ref in L2 than RN(ref), the elementwise nearest one.

    So naive, stochastic and pairwise read-outs are >= the floor exactly.  Kahan's s - c carries more
    bits than one format number and may go below it (the constructed case below).
    """
    buffers = [("bf16", "naive"), ("fp16", "naive"), ("bf16", "stochastic"), ("fp16", "pairwise")]
    for r in stream(draws(0), "fp32", [16, 256], buffers, scaling="post", seed=0):
        assert 0 < r["quantisation_floor"] <= 2.0 ** -{"bf16": 8, "fp16": 11}[r["buffer_format"]]
        assert r["rel_l2_error"] >= r["quantisation_floor"], r
    # 1 + 2^-9 is not a bf16 number (ulp(1) = 2^-7): naive loses the 2^-9, Kahan keeps it in c
    values = iter([1.0, 2.0**-9])
    rows = stream(
        lambda k: torch.tensor([[next(values)] for _ in range(k)], dtype=torch.float64),
        "fp32",
        [2],
        [("bf16", "kahan"), ("bf16", "naive")],
        scaling="post",
        seed=0,
        chunk_size=1,
    )
    kahan, naive = rows
    assert kahan["rel_l2_error"] == 0.0 < kahan["quantisation_floor"] == naive["rel_l2_error"]


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight.t()) + self.bias


def tiny_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(Linear(6, 16), nn.Tanh(), Linear(16, 3))


def test_fixed_micro_post_pass_equals_per_n_passes_and_reference_grows() -> None:
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4 * 32, 6, generator=g), torch.randint(0, 3, (4 * 32,), generator=g)
    eng = GradientEngine(model, F.cross_entropy, "bf16")
    buffers = [("fp32", "naive"), ("bf16", "stochastic"), ("fp64", "exact")]
    whole = fixed_micro(eng, x, y, 4, [1, 8, 32], buffers, scaling="post", seed=3)
    for n in (1, 8):
        assert [r for r in whole if r["n_accum"] == n] == fixed_micro(
            eng, x, y, 4, [n], buffers, scaling="post", seed=3
        )
    # the truth at N is the gradient of the first N*B samples: check it against a direct fp64 pass
    exact32 = next(r for r in whole if r["n_accum"] == 32 and r["strategy"] == "exact")
    ref = reference_gradient(model, F.cross_entropy, x, y)
    assert exact32["rel_l2_error"] == pytest.approx(
        metrics.rel_l2_error(torch.cat(list(eng.micro_gradients(x, y, 32))).double().mean(0), ref), rel=1e-6
    )  # both are the bf16 input quantisation; 1e-6 covers the fp64 rounding of two mean orders
    pre = fixed_micro(eng, x, y, 4, [1, 8, 32], buffers, scaling="pre", seed=3)
    assert [r["n_accum"] for r in pre] == [r["n_accum"] for r in whole]
    with pytest.raises(ValueError, match="need 132 samples, got 128"):
        fixed_micro(eng, x, y, 4, [33], buffers, scaling="post", seed=0)


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: stream(draws(0), "fp32", [0, 4], BUFFERS, scaling="post", seed=0), "integers >= 1"),
        (lambda: stream(draws(0), "fp32", [4], BUFFERS, scaling="middle", seed=0), "unknown scaling 'middle'"),
        (lambda: stream(draws(0), "fp12", [4], BUFFERS, scaling="post", seed=0), "fp12"),
        (lambda: stream(draws(0), "fp32", [4], [("bf16", "lazy")], scaling="post", seed=0), "unknown strategy 'lazy'"),
        (
            lambda: accumulate(iter([torch.zeros(2, 3)]), BUFFERS, record=[5], reference=None, factor=None, seed=0),
            "ended after 2 micro-gradients; N=5",
        ),
        (lambda: power_grid(0), "N_max must be an integer >= 1, got 0"),
        (lambda: power_grid(8, divides=12), "does not split into N=8"),
        (
            lambda: stream(draws(0), "fp32", [4], BUFFERS, scaling="post", seed=0, chunk_size=0),
            "chunk_size must be an integer >= 1, got 0",
        ),
    ],
    ids=[
        "n0",
        "scaling",
        "format",
        "strategy",
        "short-stream",
        "grid0",
        "grid-split",
        "chunk0",
    ],
)
def test_bad_input_names_the_value(call, needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        call()
