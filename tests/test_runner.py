"""The lab's runner: resume after a kill, shards merge into the same bytes, fingerprints by location."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from experiments import summation
from precision_lab.lab import fingerprint
from precision_lab.lab.results import write_part
from precision_lab.lab.runner import parse_shard, run_tasks
from precision_lab.measure import stable_seed

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ToyConfig:
    k: int
    other: int = 0


@dataclass(frozen=True)
class ToyTask:
    i: int


def _tasks(k: int) -> list[ToyTask]:
    return [ToyTask(i) for i in range(k)]


def _work(calls: list):
    def work(task: ToyTask) -> list[dict]:
        calls.append(task.i)
        g = torch.Generator().manual_seed(stable_seed("t", task.i))
        return [{"i": task.i, "j": j, "x": torch.rand((), generator=g, dtype=torch.float64).item()} for j in range(3)]

    return work


@pytest.mark.parametrize(
    ("text", "needle"),
    [("3/2", "need 1 <= I <= K"), ("a/b", "I/K (e.g. 2/8), got 'a/b'")],
    ids=["shard-range", "shard-text"],
)
def test_bad_shard_names_the_value(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        parse_shard(text)


def test_tasks_and_config_must_be_typed_records(tmp_path: Path) -> None:
    kw = {"columns": ("i", "j", "x"), "seed": 0, "progress": False}
    with pytest.raises(ValueError, match=r"a task must be a dataclass instance, got dict: \{'i': 0\}"):
        run_tasks("t", tmp_path, [{"i": 0}], _work([]), config=ToyConfig(1), **kw)
    with pytest.raises(ValueError, match="config must be a dataclass instance, got dict"):
        run_tasks("t", tmp_path, _tasks(1), _work([]), config={"k": 1}, **kw)


def test_shards_merge_into_the_single_process_bytes(tmp_path: Path) -> None:
    cfg = ToyConfig(7)
    kw = {"columns": ("i", "j", "x"), "config": cfg, "seed": 0, "progress": False}
    single = run_tasks("t", tmp_path / "one", _tasks(7), _work([]), **kw)
    calls: list = []
    for i in (2, 3, 1):  # any order
        out = run_tasks("t", tmp_path / "sharded", _tasks(7), _work(calls), shard=(i, 3), **kw)
        assert (out is None) == (i != 1)  # only the run that completes the grid merges
    assert sorted(calls) == list(range(7))  # disjoint shards cover the grid once
    assert out.read_bytes() == single.read_bytes()


def test_rerun_skips_finished_tasks_and_a_new_config_does_not_reuse_them(tmp_path: Path) -> None:
    calls: list = []
    kw = {"columns": ("i", "j", "x"), "seed": 0, "progress": False}
    first = run_tasks("t", tmp_path, _tasks(4), _work(calls), config=ToyConfig(4), **kw).read_bytes()
    run_tasks("t", tmp_path, _tasks(4), _work(calls), config=ToyConfig(4), **kw)
    assert calls == [0, 1, 2, 3]  # the second run computed nothing
    assert (tmp_path / "results.csv").read_bytes() == first
    run_tasks("t", tmp_path, _tasks(4), _work(calls), config=ToyConfig(4, other=1), **kw)
    assert calls == [0, 1, 2, 3] * 2


def test_results_of_another_config_are_removed_until_the_new_grid_is_done(tmp_path: Path) -> None:
    kw = {"columns": ("i", "j", "x"), "seed": 0, "progress": False}
    run_tasks("t", tmp_path, _tasks(4), _work([]), config=ToyConfig(4), **kw)
    assert (tmp_path / "results.csv").exists()
    assert run_tasks("t", tmp_path, _tasks(4), _work([]), config=ToyConfig(5), shard=(1, 2), **kw) is None
    assert not (tmp_path / "results.csv").exists()  # stale: another config's rows
    assert not (tmp_path / "metadata.json").exists()
    run_tasks("t", tmp_path, _tasks(4), _work([]), config=ToyConfig(5), **kw)
    meta = json.loads((tmp_path / "metadata.json").read_text())
    assert meta["config"]["k"] == 5
    assert meta["fingerprint"] in meta["config"]["parts"]
    assert meta["code"] == fingerprint.code_digest(ToyConfig.__module__)


def test_a_part_with_other_columns_is_refused(tmp_path: Path) -> None:
    kw = {"config": ToyConfig(2), "seed": 0, "progress": False}
    run_tasks("t", tmp_path, _tasks(2), _work([]), columns=("i", "j", "x"), **kw)
    part = next((tmp_path / ".parts").rglob("000000.csv"))
    write_part(part, [{"a": 1, "b": 2}], ["a", "b"])  # a whole part, checksum and all, of other columns
    with pytest.raises(ValueError, match="other columns"):
        run_tasks("t", tmp_path, _tasks(2), _work([]), columns=("i", "j", "x"), **kw)
    part.write_text("a,b\n1,2\n")  # a part without its checksum line: refused before its columns are read
    with pytest.raises(ValueError, match="000000.csv has no checksum line"):
        run_tasks("t", tmp_path, _tasks(2), _work([]), columns=("i", "j", "x"), **kw)


KILL_CONFIG = "summation.Config(formats=('bf16', 'fp16'), streams=('low_snr',), n_max=512, elements=256, trials=3)"
KILL_TASKS = 6


def test_sigkill_then_rerun_gives_the_uninterrupted_bytes(tmp_path: Path) -> None:
    cfg = eval(KILL_CONFIG)  # noqa: S307 - one literal shared with the child process below
    reference = summation.run(cfg, tmp_path / "ref", seed=1, progress=False).read_bytes()
    victim = tmp_path / "victim"
    code = f"from experiments import summation\nsummation.run({KILL_CONFIG}, {str(victim)!r}, seed=1, progress=False)\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
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


# --------------------------------------------------------------------------------------------------
# fingerprints: the library and the experiment's compute modules, by location and by syntax
# --------------------------------------------------------------------------------------------------
def _copy_tree(dest: Path) -> Path:
    for pkg in ("precision_lab", "experiments"):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _python(tree: Path, code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    if out.returncode:
        raise AssertionError(out.stderr)
    return out.stdout.strip()


def _append(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


def test_code_digest_covers_the_library_and_the_compute_modules_only(tmp_path: Path) -> None:
    """Figures, the lab, another experiment, comments and docstrings keep a digest; code edits change it."""
    tree = _copy_tree(tmp_path)
    probe = (
        "from precision_lab.lab.fingerprint import code_digest\n"
        "print(code_digest('experiments.training'), code_digest('experiments.model_gradients'))"
    )
    first = _python(tree, probe).split()
    for f in ("lab/plotting.py", "lab/cli.py", "lab/runner.py", "lab/results.py"):  # the lab
        _append(tree / "precision_lab" / f, "EDITED = 1\n")
    for f in ("figures/training.py", "figures/model_gradients.py", "ddp.py", "claims.py"):  # figures, others
        _append(tree / "experiments" / f, "EDITED = 1\n")
    rounding = tree / "precision_lab/rounding.py"
    text = rounding.read_text()  # a comment and a docstring edited in the library
    rounding.write_text(text.replace('"""Rounding into', '"""Rounding (edited docstring) into', 1) + "# edited\n")
    assert "edited docstring" in rounding.read_text()
    assert _python(tree, probe).split() == first

    _append(tree / "experiments/trials.py", "EDITED = 1\n")  # compute code model-gradients imports
    second = _python(tree, probe).split()
    assert second[0] == first[0]  # training does not import trials.py
    assert second[1] != first[1]
    _append(tree / "experiments/training.py", "EDITED = 1\n")  # the experiment's own compute code
    third = _python(tree, probe).split()
    assert third[0] != second[0]
    assert third[1] == second[1]
    _append(rounding, "EDITED = 1\n")  # library code: every experiment
    fourth = _python(tree, probe).split()
    assert fourth[0] != third[0]
    assert fourth[1] != third[1]


def test_a_compute_module_that_imports_figure_code_is_refused(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    _append(tree / "experiments/trials.py", "from experiments.figures import ddp as _figure\n")
    code = "from precision_lab.lab.fingerprint import code_digest\ncode_digest('experiments.underflow')"
    with pytest.raises(AssertionError, match="compute module 'experiments.trials' imports figure code"):
        _python(tree, code)


def test_figure_and_comment_edits_keep_finished_parts(tmp_path: Path) -> None:
    """A run after a figure-only edit and a library comment edit computes nothing; a code edit recomputes."""
    tree = _copy_tree(tmp_path / "tree")
    out = tmp_path / "out"
    run = (
        "from experiments import summation\n"
        "cfg = summation.Config(formats=('bf16',), streams=('low_snr',), n_max=16, elements=8, trials=2)\n"
        f"summation.run(cfg, {str(out)!r}, seed=3, progress=False)\n"
    )
    _python(tree, run)

    def parts() -> dict[str, int]:
        return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / ".parts").rglob("0*.csv")}

    before = parts()
    assert len(before) == 2
    figure = tree / "experiments/figures/summation.py"
    figure.write_text(figure.read_text().replace("#000000", "#111111"))  # recolour a bound line
    _append(tree / "precision_lab/accumulators.py", "# a comment\n")
    _python(tree, run)
    assert parts() == before  # same fingerprint, same files, none rewritten
    _append(tree / "precision_lab/accumulators.py", "EDITED = 1\n")
    _python(tree, run)
    assert len(parts()) == 4  # a new fingerprint: both tasks computed again


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_library_never_imports_the_lab() -> None:
    """The import graph: library -> nothing of the lab or the experiments (no arrow back)."""
    library = fingerprint.library_files()
    assert library, "no library files found"
    assert all("lab" not in f.relative_to(ROOT / "precision_lab").parts[:-1] for f in library)
    for f in library:
        bad = {m for m in _imports(f) if m.split(".")[0] == "experiments" or m.startswith("precision_lab.lab")}
        assert not bad, f"{f.relative_to(ROOT)} imports the lab: {sorted(bad)}"
