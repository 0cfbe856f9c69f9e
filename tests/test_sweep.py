"""Sweeps: one pass records every N; resume after a kill; shards merge into the same bytes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from experiments import summation
from precision_lab import metrics, sweep
from precision_lab.gradients import GradientEngine, reference_gradient
from precision_lab.sweep import accumulate, fixed_micro, parse_shard, power_grid, run_tasks, stable_seed, stream

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
    assert set(whole[0]) == set(sweep.MEASURE_COLUMNS)


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
    rows = {s: stream(draws(3), "fp64", [1, 2, 8, 32], [("fp64", "exact")], scaling=s, seed=0) for s in sweep.SCALINGS}
    for r in rows["post"]:
        # the same double-double sum divided by a power of two on both sides: exactly equal
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
        (lambda: parse_shard("3/2"), "need 1 <= I <= K"),
        (
            lambda: stream(draws(0), "fp32", [4], BUFFERS, scaling="post", seed=0, chunk_size=0),
            "chunk_size must be an integer >= 1, got 0",
        ),
        (lambda: parse_shard("a/b"), "I/K (e.g. 2/8), got 'a/b'"),
    ],
    ids=[
        "n0",
        "scaling",
        "format",
        "strategy",
        "short-stream",
        "grid0",
        "grid-split",
        "shard-range",
        "chunk0",
        "shard-text",
    ],
)
def test_bad_input_names_the_value(call, needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        call()


# --------------------------------------------------------------------------------------------------
# execution: resume, shards, kill
# --------------------------------------------------------------------------------------------------
def _tasks(k: int) -> list[dict]:
    return [{"i": i} for i in range(k)]


def _work(calls: list):
    def work(task: dict) -> list[dict]:
        calls.append(task["i"])
        g = torch.Generator().manual_seed(stable_seed("t", task["i"]))
        return [
            {"i": task["i"], "j": j, "x": torch.rand((), generator=g, dtype=torch.float64).item()} for j in range(3)
        ]

    return work


def test_shards_merge_into_the_single_process_bytes(tmp_path: Path) -> None:
    cfg = {"k": 7}
    single = run_tasks(
        "t", tmp_path / "one", _tasks(7), _work([]), columns=("i", "j", "x"), config=cfg, seed=0, progress=False
    )
    calls: list = []
    for i in (2, 3, 1):  # any order
        out = run_tasks(
            "t",
            tmp_path / "sharded",
            _tasks(7),
            _work(calls),
            columns=("i", "j", "x"),
            config=cfg,
            seed=0,
            shard=(i, 3),
            progress=False,
        )
        assert (out is None) == (i != 1)  # only the run that completes the grid merges
    assert sorted(calls) == list(range(7))  # disjoint shards cover the grid once
    assert out.read_bytes() == single.read_bytes()


def test_rerun_skips_finished_tasks_and_a_new_config_does_not_reuse_them(tmp_path: Path) -> None:
    calls: list = []
    kw = {"columns": ("i", "j", "x"), "seed": 0, "progress": False}
    first = run_tasks("t", tmp_path, _tasks(4), _work(calls), config={"k": 4}, **kw).read_bytes()
    run_tasks("t", tmp_path, _tasks(4), _work(calls), config={"k": 4}, **kw)
    assert calls == [0, 1, 2, 3]  # the second run computed nothing
    assert (tmp_path / "results.csv").read_bytes() == first
    run_tasks("t", tmp_path, _tasks(4), _work(calls), config={"k": 4, "other": 1}, **kw)
    assert calls == [0, 1, 2, 3] * 2


def test_results_of_another_config_are_removed_until_the_new_grid_is_done(tmp_path: Path) -> None:
    kw = {"columns": ("i", "j", "x"), "seed": 0, "progress": False}
    run_tasks("t", tmp_path, _tasks(4), _work([]), config={"k": 4}, **kw)
    assert (tmp_path / "results.csv").exists()
    assert run_tasks("t", tmp_path, _tasks(4), _work([]), config={"k": 5}, shard=(1, 2), **kw) is None
    assert not (tmp_path / "results.csv").exists()  # stale: another config's rows
    assert not (tmp_path / "metadata.json").exists()
    run_tasks("t", tmp_path, _tasks(4), _work([]), config={"k": 5}, **kw)
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["config"]["k"] == 5
    assert meta["fingerprint"] in meta["config"]["parts"]
    assert meta["code"] == sweep.code_digest()


def test_a_part_with_other_columns_is_refused(tmp_path: Path) -> None:
    kw = {"config": {}, "seed": 0, "progress": False}
    run_tasks("t", tmp_path, _tasks(2), _work([]), columns=("i", "j", "x"), **kw)
    part = next((tmp_path / ".parts").rglob("000000.csv"))
    part.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="other columns"):
        run_tasks("t", tmp_path, _tasks(2), _work([]), columns=("i", "j", "x"), **kw)


KILL_CONFIG = "summation.Config(formats=('bf16', 'fp16'), streams=('low_snr',), n_max=512, elements=256, trials=3)"
KILL_TASKS = 6


def test_sigkill_then_rerun_gives_the_uninterrupted_bytes(tmp_path: Path) -> None:
    cfg = eval(KILL_CONFIG)  # noqa: S307 - one literal shared with the child process below
    reference = summation.run(cfg, tmp_path / "ref", seed=1, progress=False).read_bytes()
    victim = tmp_path / "victim"
    code = f"from experiments import summation\nsummation.run({KILL_CONFIG}, {str(victim)!r}, seed=1, progress=False)\n"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        done = list((victim / ".parts").rglob("0*.csv")) if (victim / ".parts").exists() else []
        if len(done) >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the child finished before it could be killed; make KILL_CONFIG larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list((victim / ".parts").rglob("0*.csv")))
    assert 2 <= finished < KILL_TASKS
    assert not (victim / "results.csv").exists()
    calls = []
    original = summation.run_tasks

    def counting(*args, **kwargs):
        work = args[3]
        return original(*args[:3], lambda t: calls.append(t) or work(t), *args[4:], **kwargs)

    summation.run_tasks = counting
    try:
        out = summation.run(cfg, victim, seed=1, progress=False)
    finally:
        summation.run_tasks = original
    assert len(calls) == KILL_TASKS - finished  # only the unfinished tasks were computed
    assert out.read_bytes() == reference
    assert not list(victim.rglob("*.tmp"))  # the killed writer's temporary is gone


def test_code_digest_covers_the_computing_code_only(tmp_path: Path) -> None:
    """Editing a figure, the CLI or another experiment keeps an experiment's digest; editing numerics does not."""
    import shutil
    import subprocess
    import sys

    root = Path(sweep.__file__).resolve().parents[1]
    for pkg in ("precision_lab", "experiments"):
        shutil.copytree(root / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    probe = "from precision_lab.sweep import code_digest; print(code_digest('experiments.training'))"

    def digest() -> str:
        out = subprocess.run(
            [sys.executable, "-c", probe],
            cwd=tmp_path,
            env={"PYTHONPATH": str(tmp_path)},
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    first = digest()
    for f in ("precision_lab/plotting.py", "precision_lab/cli.py", "experiments/ddp.py", "experiments/training.py"):
        with open(tmp_path / f, "a") as fh:
            fh.write("# edited\n")  # a comment: not in the syntax tree of the experiment
    training = tmp_path / "experiments/training.py"
    training.write_text(training.read_text().replace("def plot(", "def plot(  # a figure edit\n"))
    text = training.read_text()
    i = text.index("def plot(")
    training.write_text(text[:i] + text[i:].replace("plt = pyplot()", "plt = pyplot()\n    _ = 1", 1))
    assert digest() == first
    with open(tmp_path / "precision_lab/rounding.py", "a") as fh:
        fh.write("# edited\n")
    second = digest()
    assert second != first
    with open(tmp_path / "experiments/training.py", "a") as fh:
        fh.write("EDITED = 1\n")  # a change outside plot()
    assert digest() != second
