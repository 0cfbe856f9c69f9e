"""The command line, the results store and the summation experiment end to end (tiny sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import get_figures, summation
from precision_lab.lab import cli
from precision_lab.lab.results import atomic_write_text, read_csv, write_csv

TINY = summation.Config(formats=("bf16", "fp8_e5m2"), streams=("constant", "low_snr"), n_max=32, elements=8, trials=2)


def test_list_names_every_registered_experiment(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    assert "summation" in capsys.readouterr().out.split()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (
            ["run", "no-such-experiment"],
            "unknown experiment 'no-such-experiment'; known: ddp, equivalence, memory-pareto, model-gradients, overhead, summation, training, underflow",
        ),
        (["run", "summation", "--device", "tpu"], "invalid choice: 'tpu'"),
        (["run", "summation", "--seed", "x"], "invalid int value: 'x'"),
        (["run", "summation", "--seed", "-1"], "--seed must be in [0, 2**63), got -1"),
        (["run", "summation", "--seed", str(2**64)], "--seed must be in [0, 2**63)"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["reproduce", "--jobs", "0"], "--jobs must be >= 1, got 0"),
        (["reproduce", "--jobs", "two"], "invalid int value: 'two'"),
    ],
    ids=[
        "unknown-experiment",
        "bad-device",
        "bad-seed",
        "negative-seed",
        "huge-seed",
        "bad-command",
        "zero-jobs",
        "bad-jobs",
    ],
)
def test_bad_input_exits_2_with_one_line(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:  # argparse's own errors raise SystemExit(2); ours return 2
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert needle in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA present: the error cannot occur")
def test_cuda_without_gpu_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "summation", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_console_script_entry_point_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "precision_lab.lab.cli", "list"], capture_output=True, text=True, check=True
    )
    assert "summation" in out.stdout


def test_same_seed_same_bytes_and_metadata(tmp_path: Path) -> None:
    a = summation.run(TINY, tmp_path / "a", seed=3)
    b = summation.run(TINY, tmp_path / "b", seed=3)
    c = summation.run(TINY, tmp_path / "c", seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()  # the seed reaches the low-SNR stream and the SR strategy
    meta = json.loads((tmp_path / "a" / "metadata.json").read_text())
    assert meta["seed"] == 3
    assert meta["config"]["n_max"] == 32
    for key in ("torch", "numpy", "python", "device", "threads", "git_commit"):
        assert key in meta["environment"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_summation_results_match_theory(tmp_path: Path) -> None:
    cfg = summation.Config(formats=("fp8_e5m2", "fp8_e4m3"), streams=("constant",), n_max=64, elements=4, trials=1)
    rows = read_csv(summation.run(cfg, tmp_path, seed=0))
    by = {(r["buffer_format"], r["strategy"], int(r["n_accum"])): r for r in rows}
    # Adding 1.0 stalls a naive buffer at 2^t: 8 in fp8_e5m2, 16 in fp8_e4m3 (exact, so exact equality).
    for fmt, stall in (("fp8_e5m2", 8), ("fp8_e4m3", 16)):
        assert int(by[(fmt, "naive", 64)]["predicted_stall"]) == stall
        assert float(by[(fmt, "naive", stall)]["rel_l2_error"]) == 0.0
        assert float(by[(fmt, "naive", 64)]["rel_l2_error"]) == 1 - stall / 64
        assert float(by[(fmt, "naive", 64)]["lost_update_fraction"]) == (64 - stall) / 64
        # pairwise adds ones as a tree of powers of two, Kahan carries the lost ones: both exact
        assert float(by[(fmt, "pairwise", 64)]["rel_l2_error"]) == 0.0
        assert float(by[(fmt, "kahan", 64)]["rel_l2_error"]) == 0.0


def test_plot_reads_stored_results(tmp_path: Path) -> None:
    summation.run(TINY, tmp_path / "summation", seed=0)
    paths = get_figures("summation").plot(tmp_path / "summation", tmp_path / "figures")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)


def test_jobs_shards_give_the_single_process_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``reproduce --jobs 2``: one shard command per job with the cores split, then a merge; same bytes."""
    single = summation.run(TINY, tmp_path / "one" / "summation", seed=5, progress=False).read_bytes()
    monkeypatch.setattr(summation.Config, "quick", classmethod(lambda cls: TINY))
    launched = []
    real_popen = subprocess.Popen

    class InProcess:  # runs a shard command here, so that it sees the patched quick config
        def __init__(self, argv: list[str], stdout: object, env: dict[str, str]) -> None:
            launched.append((argv[argv.index("--shard") + 1], env["OMP_NUM_THREADS"], env["NUMBA_NUM_THREADS"]))
            self.rc = cli.main(argv[3:])

        def wait(self) -> int:
            return self.rc

    def popen(argv: list[str], **kw: object) -> object:  # other commands (git) run for real
        return InProcess(argv, **kw) if "--shard" in argv else real_popen(argv, **kw)

    monkeypatch.setattr(cli.subprocess, "Popen", popen)
    cli._run_parallel("summation", jobs=2, quick=True, out=tmp_path / "two", device="cpu", seed=5)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per = str(max(1, cores // 2))
    assert launched == [("1/2", per, per), ("2/2", per, per)]
    assert (tmp_path / "two" / "summation" / "results.csv").read_bytes() == single


def test_plot_without_results_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plot", "summation", "--out", str(tmp_path)]) == 2
    assert "results.csv" in capsys.readouterr().err


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    write_csv(path, [{"a": 1, "b": 0.1}], ["a", "b"])
    before = path.read_bytes()
    with pytest.raises(ValueError, match="missing columns"):
        write_csv(path, [{"a": 2}], ["a", "b"])
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_crash_during_write_leaves_previous_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "results.csv"
    atomic_write_text(path, "complete,old\n")

    def killed(*args: object) -> None:  # the process dies between writing the temporary and the rename
        raise KeyboardInterrupt

    monkeypatch.setattr("precision_lab.lab.results.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "half")
    assert path.read_text() == "complete,old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_floats_round_trip_exactly(tmp_path: Path) -> None:
    v = 0.1 + 0.2
    write_csv(tmp_path / "r.csv", [{"v": v}], ["v"])
    assert float(read_csv(tmp_path / "r.csv")[0]["v"]) == v


def test_clean_lists_nothing_where_there_are_no_parts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["clean", "--out", str(tmp_path)]) == 0
    assert f"no stale part folders under {tmp_path}" in capsys.readouterr().out
    assert cli.main(["clean", "--out", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"--out {tmp_path / 'nowhere'} does not exist" in err
