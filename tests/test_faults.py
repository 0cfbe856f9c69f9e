"""Faults found by injection: every command leaves whole files or none, and names a bad file in one line.

Each test reproduces one fault as it was found (a kill mid-write, a truncated part or results file,
a bad metadata file, a read-only or wrong ``--out``, concurrent runs, the umask, numba's threads,
empty batches, gloo's threads at exit) and checks the behaviour the lab promises instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import experiments
from experiments import equivalence, summation
from precision_lab.gradients import GradientEngine, reference_gradient
from precision_lab.lab import cli
from precision_lab.lab.results import read_csv

ROOT = Path(__file__).resolve().parents[1]
# 4 tasks (2 trials x 2 formats), a second or two
TINY = summation.Config(formats=("bf16", "fp16"), streams=("constant", "low_snr"), n_max=16, elements=8, trials=2)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture
def tiny_quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--quick`` means TINY for summation and the quick config for equivalence (seconds)."""
    monkeypatch.setattr(summation.Config, "quick", classmethod(lambda cls: TINY))


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and stderr of ``precision-lab ARGV`` run in this process (argparse exits included)."""
    capsys.readouterr()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip()


def _one_line_naming(err: str, path: Path, *needles: str) -> None:
    """One error line on stderr (besides progress bars), no traceback, naming ``path`` and the needles."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("precision-lab")]
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("precision-lab: error: "), err
    assert str(path) in line, err
    for needle in needles:
        assert needle in line, err


def _run_tiny(out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> None:
    code, err = _cli(["run", "summation", "--quick", "--out", out, *extra], capsys)
    assert code == 0, err


def _stamp(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def _parts(exp_dir: Path) -> list[Path]:
    return sorted((exp_dir / ".parts").rglob("0*.csv"))


# --------------------------------------------------------------------------------------------------
# figures: never half-written, and reproduce swaps the whole set at once
# --------------------------------------------------------------------------------------------------
_BIG_FIGURE = """
import sys
import numpy as np
from precision_lab.lab.plotting import pyplot, save_figure

plt = pyplot()
rng = np.random.default_rng(0)
fig, ax = plt.subplots(figsize=(6, 6))
ax.imshow(rng.random((200, 200)))  # noise: a PNG that takes a while to encode
ax.scatter(rng.random(2000), rng.random(2000), s=1)  # 2000 SVG paths
save_figure(fig, sys.argv[1], "big")
"""


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    out = {}
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as it:
        for e in it:
            with contextlib.suppress(FileNotFoundError):
                s = e.stat()
                out[e.name] = (s.st_size, s.st_mtime_ns, s.st_ino)
    return out


def _complete(path: Path) -> bool:
    data = path.read_bytes()
    if path.suffix == ".png":
        return data.endswith(b"IEND\xaeB`\x82")
    return data.rstrip().endswith(b"</svg>")


def test_a_figure_write_killed_midway_leaves_the_previous_figure(tmp_path: Path) -> None:
    """SIGKILL at the first change in the figure folder: the old PNG and SVG stay whole.

    Writing in place, the first change is the PNG truncated to 0 bytes by ``open``: the kill left an
    empty ``big.png`` every time (3 of 3 tries).
    """
    script = tmp_path / "big.py"
    script.write_text(_BIG_FIGURE)
    figs = tmp_path / "figs"
    subprocess.run([sys.executable, str(script), str(figs)], env=ENV, check=True)
    before = {p.name: p.read_bytes() for p in figs.iterdir()}
    assert sorted(before) == ["big.png", "big.svg"]
    assert all(_complete(figs / n) for n in before)
    for _ in range(5):  # a loaded machine may let the writer finish before the kill: then again
        snap = _snapshot(figs)
        proc = subprocess.Popen([sys.executable, str(script), str(figs)], env=ENV)
        deadline = time.monotonic() + 120
        while proc.poll() is None and _snapshot(figs) == snap and time.monotonic() < deadline:
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            break
    assert proc.returncode == -signal.SIGKILL, "the writer always finished before the kill: the test proves nothing"
    visible = sorted(p.name for p in figs.iterdir() if not p.name.startswith("."))
    assert visible == ["big.png", "big.svg"]
    for name in visible:  # the same figure, so the same bytes: the old file or the new one, whole
        assert (figs / name).read_bytes() == before[name], f"{name} was left half-written"
    hidden = [p.name for p in figs.iterdir() if p.name.startswith(".")]
    assert all(n.endswith(".tmp") for n in hidden), hidden  # at most a killed writer's temporary


def _figure_set(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_reproduce_replaces_the_figures_only_when_all_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny_quick: None
) -> None:
    """A reproduce that dies while writing the claims report leaves the previous figures, not a mix."""
    monkeypatch.setattr(experiments, "REGISTRY", {"summation": "experiments.summation"})
    figs, out = tmp_path / "figs", tmp_path / "out"
    args = ["reproduce", "--quick", "--out", out, "--figures", figs]
    assert _cli([*args, "--seed", "0"], capsys)[0] == 0
    first = _figure_set(figs)
    assert set(first) == {
        "CLAIMS.md",
        "summation.png",
        "summation.svg",
        "summation_formats.png",
        "summation_formats.svg",
    }

    import experiments.claims as claims

    real = claims.render

    def dies(*a: object, **k: object) -> str:  # the process dies writing the last file of the set
        raise KeyboardInterrupt

    monkeypatch.setattr(claims, "render", dies)
    with pytest.raises(KeyboardInterrupt):
        _cli([*args, "--seed", "1"], capsys)
    assert _figure_set(figs) == first  # nothing of the seed-1 figures got in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figs", "out"]  # no staging folder left behind

    monkeypatch.setattr(claims, "render", real)
    assert _cli([*args, "--seed", "1"], capsys)[0] == 0
    second = _figure_set(figs)
    assert set(second) == set(first)
    assert second["summation.png"] != first["summation.png"]  # the seed shows: the whole set was replaced
    assert second["CLAIMS.md"] != first["CLAIMS.md"]


def test_staged_folder_carries_other_files_and_refuses_subfolders(tmp_path: Path) -> None:
    from precision_lab.lab.results import staged_folder

    target = tmp_path / "figs"
    target.mkdir()
    (target / "a.png").write_bytes(b"old a")
    (target / "notes.txt").write_bytes(b"mine")
    with staged_folder(target) as stage:
        (stage / "a.png").write_bytes(b"new a")
        (stage / "b.png").write_bytes(b"new b")
        assert (target / "a.png").read_bytes() == b"old a"  # nothing visible before the end
    assert _figure_set(target) == {"a.png": b"new a", "b.png": b"new b", "notes.txt": b"mine"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figs"]
    (target / "sub").mkdir()
    with pytest.raises(ValueError, match=r"holds 'sub', which is not a plain file"), staged_folder(target):
        pass


_SWAP_KILLED = """
import os, signal, sys
from pathlib import Path
import precision_lab.lab.results as results

results._exchange = lambda a, b: False  # a file system without RENAME_EXCHANGE: two renames
real, calls = os.rename, []

def rename(a, b):
    calls.append(1)
    if len(calls) == 2:  # killed between moving the old set aside and moving the new one in
        os.kill(os.getpid(), signal.SIGKILL)
    real(a, b)

os.rename = rename
with results.staged_folder(sys.argv[1]) as stage:
    (stage / "a.png").write_bytes(b"new a")
    (stage / "CLAIMS.md").write_bytes(b"new claims")
"""


def test_a_kill_between_the_fallback_renames_leaves_one_whole_set_and_is_undone(tmp_path: Path) -> None:
    from precision_lab.lab.results import staged_folder

    target = tmp_path / "figs"
    target.mkdir()
    (target / "a.png").write_bytes(b"old a")
    (target / "CLAIMS.md").write_bytes(b"old claims")
    old = _figure_set(target)
    proc = subprocess.run([sys.executable, "-c", _SWAP_KILLED, str(target)], env=ENV, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert not target.exists()  # never a mix: the folder is absent...
    aside = [p for p in tmp_path.iterdir() if p.name.endswith(".old.tmp")]
    assert len(aside) == 1
    assert _figure_set(aside[0]) == old  # ...and the old set is whole beside it
    with staged_folder(target) as stage:  # the next reproduce puts it back first, then swaps as usual
        assert _figure_set(target) == old
        (stage / "a.png").write_bytes(b"newer a")
    assert _figure_set(target) == {"a.png": b"newer a", "CLAIMS.md": b"old claims"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figs"]  # the killed run's staging is gone too


# --------------------------------------------------------------------------------------------------
# parts and results.csv carry a row count and a checksum, checked before use
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cut", ["line", "mid-line"])
def test_a_cut_part_is_named_and_never_merged(
    cut: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_quick: None
) -> None:
    _run_tiny(tmp_path, capsys, "--shard", "1/2")
    _run_tiny(tmp_path, capsys, "--shard", "2/2")
    exp = tmp_path / "summation"
    results = exp / "results.csv"
    good = results.read_bytes()
    results.unlink()
    (exp / "metadata.json").unlink()
    part = _parts(exp)[1]
    lines = part.read_bytes().splitlines(keepends=True)
    data_lines = [ln for ln in lines if not ln.startswith(b"#")]
    keep = data_lines[:-1] if cut == "line" else [*data_lines[:-1], data_lines[-1][: len(data_lines[-1]) // 2]]
    part.write_bytes(b"".join(keep))
    code, err = _cli(["run", "summation", "--quick", "--out", tmp_path], capsys)
    assert code == 2
    _one_line_naming(err, part, "delete it")
    assert not results.exists()  # nothing merged
    part.unlink()  # what the message says: delete it and run again (that task is recomputed)
    _run_tiny(tmp_path, capsys)
    assert results.read_bytes() == good


@pytest.mark.parametrize("command", ["plot", "report"])
@pytest.mark.parametrize("damage", ["truncated", "one-digit", "blank-cell"])
def test_a_damaged_results_csv_is_named_and_not_used(
    command: str, damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_quick: None
) -> None:
    name = "summation" if command == "plot" else "equivalence"  # the report's claims read equivalence
    code, err = _cli(["run", name, "--quick", "--out", tmp_path], capsys)
    assert code == 0, err
    results = tmp_path / name / "results.csv"
    text = results.read_text()
    head, *rows = text.splitlines(keepends=True)
    if damage == "truncated":  # cut at a line boundary: fewer rows, every one well formed
        bad = head + "".join(rows[: len(rows) // 2])
    elif damage == "one-digit":
        i = text.rindex("e-")  # an exponent of a float near the end: 1e-17 -> 1e-18 changes a value
        bad = text[: i + 3] + str((int(text[i + 3]) + 1) % 10) + text[i + 4 :]
    else:  # a numeric cell blanked: float('') in the figure or claims code
        cells = rows[-1].split(",")
        column = 6 if name == "equivalence" else 8  # rel_difference / rel_l2_error
        cells[column] = ""
        bad = head + "".join(rows[:-1]) + ",".join(cells)
    results.write_text(bad)
    argv = ["plot", name, "--out", tmp_path] if command == "plot" else ["report", "--out", tmp_path]
    code, err = _cli(argv, capsys)
    assert code == 2
    _one_line_naming(err, results)
    assert not (tmp_path / "figures").exists() or not list((tmp_path / "figures").iterdir())  # nothing drawn


@pytest.mark.parametrize("command", ["plot", "report"])
def test_a_bad_cell_without_metadata_still_names_the_file(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_quick: None
) -> None:
    """Results without metadata.json (nothing to check them against): the figure/claims error names the file."""
    name = "summation" if command == "plot" else "equivalence"
    assert _cli(["run", name, "--quick", "--out", tmp_path], capsys)[0] == 0
    (tmp_path / name / "metadata.json").unlink()
    results = tmp_path / name / "results.csv"
    head, *rows = results.read_text().splitlines(keepends=True)
    column = 6 if name == "equivalence" else 8
    for i, row in enumerate(rows):  # blank that column everywhere
        cells = row.rstrip("\n").split(",")
        if len(cells) == len(head.split(",")):
            cells[column] = ""
        rows[i] = ",".join(cells) + "\n"
    results.write_text(head + "".join(rows))
    argv = ["plot", name, "--out", tmp_path] if command == "plot" else ["report", "--out", tmp_path]
    code, err = _cli(argv, capsys)
    assert code == 2
    _one_line_naming(err, results)


def test_results_csv_is_checked_against_metadata_on_read(tmp_path: Path) -> None:
    path = summation.run(TINY, tmp_path, seed=0, progress=False)
    rows = read_csv(path)
    meta = json.loads((tmp_path / "metadata.json").read_text())
    data = path.read_bytes()
    record = meta["files"]["results.csv"]
    assert record == {"rows": len(rows), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path.write_bytes(data.replace(b"bf16", b"bf17", 1))  # same length, other bytes
    with pytest.raises(ValueError, match=str(path).replace("\\", "\\\\") + ".*metadata.json"):
        read_csv(path)


def test_results_csv_bytes_are_the_header_and_the_rows(tmp_path: Path) -> None:
    """The checksums live beside results.csv, never in it: its bytes are the CSV of the parts' rows."""
    path = summation.run(TINY, tmp_path, seed=0, progress=False)
    rows = read_csv(path)
    header = ",".join(rows[0]) + "\n"
    text = path.read_text()
    assert text.startswith(header)
    assert text.count("\n") == len(rows) + 1
    assert "#" not in text
    assert "sha256" not in text


# --------------------------------------------------------------------------------------------------
# one line naming the file, exit 2, nothing rewritten before the check
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """A folder nobody may write into: mode 0555, or the immutable attribute for root (who ignores modes)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], check=False).returncode:
        pytest.skip("running as root without chattr +i: no way to make a folder read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("command", ["run", "plot", "reproduce"])
def test_read_only_out_is_one_line(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_quick: None
) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    if command == "plot":
        _run_tiny(out, capsys)
    argv = {
        "run": ["run", "summation", "--quick", "--out", out],
        "plot": ["plot", "summation", "--out", out],
        "reproduce": ["reproduce", "--quick", "--out", out],
    }[command]
    with _read_only(out):  # plot: out/figures cannot be made
        code, err = _cli(argv, capsys)
    assert code == 2
    _one_line_naming(err, out)


@pytest.mark.parametrize("command", ["run", "plot", "report", "reproduce", "clean"])
def test_out_that_is_a_file_is_one_line(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a-file"
    out.write_text("not a folder\n")
    argv = {
        "run": ["run", "summation", "--quick", "--out", out],
        "plot": ["plot", "summation", "--out", out],
        "report": ["report", "--out", out],
        "reproduce": ["reproduce", "--quick", "--out", out],
        "clean": ["clean", "--out", out],
    }[command]
    code, err = _cli(argv, capsys)
    assert code == 2
    _one_line_naming(err, out, "not a folder")
    assert out.read_text() == "not a folder\n"


@pytest.mark.parametrize("command", ["run", "plot", "report"])
@pytest.mark.parametrize("content", ["[1, 2]\n", '{"fingerprint": \n', "\xff\xfe"])
def test_bad_metadata_is_one_line_and_nothing_is_rewritten(
    command: str, content: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_quick: None
) -> None:
    _run_tiny(tmp_path, capsys)
    exp = tmp_path / "summation"
    meta = exp / "metadata.json"
    meta.write_text(content, encoding="latin-1")
    before = _stamp(exp / "results.csv"), _stamp(meta)
    argv = {
        "run": ["run", "summation", "--quick", "--out", tmp_path],
        "plot": ["plot", "summation", "--out", tmp_path],
        "report": ["report", "--out", tmp_path],
    }[command]
    code, err = _cli(argv, capsys)
    assert code == 2
    _one_line_naming(err, meta)
    assert (_stamp(exp / "results.csv"), _stamp(meta)) == before


def test_bad_started_time_is_one_line_and_results_are_not_rewritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_quick: None
) -> None:
    _run_tiny(tmp_path, capsys)
    exp = tmp_path / "summation"
    started = next((exp / ".parts").glob("*/started"))
    started.write_text("yesterday\n")
    before = _stamp(exp / "results.csv"), _stamp(exp / "metadata.json")
    code, err = _cli(["run", "summation", "--quick", "--out", tmp_path], capsys)
    assert code == 2
    _one_line_naming(err, started, "yesterday")
    assert (_stamp(exp / "results.csv"), _stamp(exp / "metadata.json")) == before


# --------------------------------------------------------------------------------------------------
# permissions: every file as open() would make it (the umask decides)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_honour_the_umask(umask: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        equivalence.run(equivalence.Config.quick(), out / "equivalence", seed=0, progress=False)
        assert _cli(["plot", "equivalence", "--out", out], capsys)[0] == 0
        assert _cli(["report", "--out", out], capsys)[0] == 0
    finally:
        os.umask(old)
    exp = out / "equivalence"
    files = [exp / "results.csv", exp / "metadata.json", *_parts(exp), out / "figures" / "CLAIMS.md"]
    files += [out / "figures" / "equivalence.png", out / "figures" / "equivalence.svg"]
    modes = {str(f.relative_to(out)): oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
    assert modes == {k: oct(0o666 & ~umask) for k in modes}


# --------------------------------------------------------------------------------------------------
# two runs on one folder: every task computed once
# --------------------------------------------------------------------------------------------------
_TOY = '''
"""A toy sweep whose tasks take a while and log who computed them."""
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from precision_lab.lab.runner import run_tasks


@dataclass(frozen=True)
class Config:
    tasks: int = 8


@dataclass(frozen=True)
class Task:
    i: int


def main(out, log, gate, me, world, shard=None):
    Path(gate, me).touch()
    while len(os.listdir(gate)) < world:  # start together
        time.sleep(0.01)

    def work(task):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"{me} {task.i}\\n".encode())
        os.close(fd)
        time.sleep(0.3)
        return [{"i": task.i, "square": task.i**2}]

    cfg = Config()
    path = run_tasks("toy", out, [Task(i) for i in range(cfg.tasks)], work, columns=("i", "square"),
                     config=cfg, seed=0, shard=shard, progress=False)
    print(path)


if __name__ == "__main__":
    out, log, gate, me, world, shard = sys.argv[1:7]
    main(out, log, gate, me, int(world), None if shard == "-" else tuple(int(p) for p in shard.split("/")))
'''


@pytest.mark.parametrize("shards", [("-", "-"), ("-", "1/2"), ("1/2", "1/2")], ids=["two-runs", "run+shard", "same"])
def test_concurrent_runs_compute_every_task_once(shards: tuple[str, str], tmp_path: Path) -> None:
    (tmp_path / "toy_sweep.py").write_text(_TOY)
    out, log, gate = tmp_path / "out", tmp_path / "log", tmp_path / "gate"
    gate.mkdir()
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV["PYTHONPATH"]])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "toy_sweep", str(out), str(log), str(gate), f"p{k}", "2", s],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k, s in enumerate(shards)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    computed = [int(line.split()[1]) for line in log.read_text().splitlines()]
    expected = [i for i in range(8) if "-" in shards or i % 2 == 0]
    assert sorted(computed) == expected  # each task once, whoever computed it
    if "-" in shards:
        assert (out / "results.csv").read_text() == "i,square\n" + "".join(f"{i},{i * i}\n" for i in range(8))


# --------------------------------------------------------------------------------------------------
# clean: stale fingerprint folders listed, deleted on request; a running sweep's never
# --------------------------------------------------------------------------------------------------
def test_clean_lists_then_deletes_stale_parts_but_not_current_or_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_quick: None
) -> None:
    from precision_lab.lab import runner

    _run_tiny(tmp_path, capsys)
    exp = tmp_path / "summation"
    current = {p.parent for p in _parts(exp)}
    assert len(current) == 1
    stale = exp / ".parts" / "0123456789abcdef"  # another fingerprint: older code
    shutil.copytree(next(iter(current)), stale)
    key = json.loads((stale / "key.json").read_text())
    (stale / "key.json").write_text(json.dumps({**key, "code": "0" * 16}))
    running = exp / ".parts" / "fedcba9876543210"  # a sweep of older code that is still running
    shutil.copytree(stale, running)
    code, err = _cli(["clean", "--out", tmp_path], capsys)
    assert code == 0, err
    assert stale.exists()  # listing deletes nothing
    assert running.exists()
    with runner.sweep_lock(running):
        capsys.readouterr()
        assert cli.main(["clean", "--out", str(tmp_path)]) == 0
        listing = capsys.readouterr().out
        assert f"stale  {stale}" in listing
        assert f"in use  {running}" in listing
        assert f"results  {next(iter(current))}" in listing
        assert cli.main(["clean", "--out", str(tmp_path), "--delete"]) == 0
    assert not stale.exists()
    assert running.exists()  # a running sweep's parts are never deleted
    assert {p.parent for p in _parts(exp)} >= current
    code, err = _cli(["run", "summation", "--quick", "--out", tmp_path], capsys)
    assert code == 0, err  # the current sweep is untouched: its results are rebuilt from its parts


# --------------------------------------------------------------------------------------------------
# threads: numba's OpenMP pool leaves torch's thread count alone
# --------------------------------------------------------------------------------------------------
_THREADS = """
import json, torch
import precision_lab as pl
from precision_lab.lab.results import environment
seen = [torch.get_num_threads()]
acc = pl.Accumulator("naive", "bf16", (1 << 16,))
acc.add(torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)))  # the compiled bf16 kernel
seen.append(torch.get_num_threads())
pl.round_stochastic(torch.randn(1 << 16), "e5m6", generator=torch.Generator().manual_seed(0))  # generic kernel
seen.append(torch.get_num_threads())
import numba
print(json.dumps({"torch": seen, "numba": numba.get_num_threads(), "metadata": environment()["threads"]}))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: numba's pool has one thread too")
def test_kernels_keep_the_callers_thread_count() -> None:
    env = {**ENV, "OMP_NUM_THREADS": "1", "PRECISION_LAB_NATIVE": "1"}
    env.pop("NUMBA_NUM_THREADS", None)
    out = subprocess.run([sys.executable, "-c", _THREADS], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.splitlines()[-1])
    assert got == {"torch": [1, 1, 1], "numba": 1, "metadata": 1}


# --------------------------------------------------------------------------------------------------
# empty batches
# --------------------------------------------------------------------------------------------------
def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 2))


def test_micro_gradients_of_an_empty_batch_is_a_value_error() -> None:
    eng = GradientEngine(_mlp(), nn.functional.mse_loss, "fp32")
    with pytest.raises(ValueError, match=r"empty batch: inputs of shape \(0, 4\)"):
        list(eng.micro_gradients(torch.empty(0, 4), torch.empty(0, 2), 1))


def test_reference_gradient_of_an_empty_batch_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"empty batch: inputs of shape \(0, 4\)"):
        reference_gradient(_mlp(), nn.functional.mse_loss, torch.empty(0, 4), torch.empty(0, 2))


# --------------------------------------------------------------------------------------------------
# DDP workers end without interpreter finalisation (gloo's threads outlive destroy_process_group)
# --------------------------------------------------------------------------------------------------
_GLOO = """
import atexit, os, sys, tempfile
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from experiments.ddp import leave_process_group

folder = sys.argv[1]
dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=0, world_size=1)
model = DDP(torch.nn.Linear(3, 2))  # keeps the process group (and its threads) alive
model(torch.ones(4, 3)).sum().backward()
atexit.register(lambda: open(os.path.join(folder, "finalised"), "w").close())
print("rows written", flush=False)
if sys.argv[2] == "leave":
    leave_process_group(0, 1, f"{folder}/rendezvous")
dist.destroy_process_group()
names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
print("alive after destroy:", " ".join(n for n in names if "gloo" in n))
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads thread names from /proc")
def test_a_rank_leaves_without_finalising_the_interpreter(tmp_path: Path) -> None:
    """The gloo threads outlive destroy_process_group (control); leave_process_group exits before finalisation."""
    control = subprocess.run(
        [sys.executable, "-c", _GLOO, str(tmp_path), "stay"], env=ENV, capture_output=True, text=True, check=True
    )
    assert "gloo" in control.stdout.split("alive after destroy:")[1]  # the threads the abort comes from
    assert (tmp_path / "finalised").exists()  # ...still running while the interpreter finalises
    (tmp_path / "finalised").unlink()
    (tmp_path / "rendezvous").unlink(missing_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", _GLOO, str(tmp_path), "leave"], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "rows written\n"  # flushed before leaving
    assert not (tmp_path / "finalised").exists()  # no interpreter finalisation with gloo threads alive
