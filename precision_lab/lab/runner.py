"""Resumable, shardable execution of an experiment's grid of tasks, safe to run twice at once.

A grid is a list of *tasks*, each a frozen dataclass of the experiment (typed fields, not string
keys), which the experiment computes into rows.  Each finished task is written atomically to its
own part file under ``OUT/.parts/<fingerprint>/``; a run killed at any moment (SIGKILL included)
leaves only complete files, and running again skips the finished tasks.  ``shard=(i, k)`` computes
the i-th of k interleaved parts of the task list, so a sweep spreads over processes or array jobs.
When every task has a part, ``results.csv`` is the concatenation of the parts in task order, so it
is the same bytes however the work was split.

Every part ends with its row count and sha256, and ``metadata.json`` records those of
``results.csv`` (:mod:`precision_lab.lab.results`); the merge checks every part first and writes
nothing if one is cut short or edited (the error names it: delete it and run again).

**Locks.**  Each task is computed under an exclusive :func:`fcntl.flock` on ``NNNNNN.lock`` beside
its part: two runs on one folder, or array-job shards that overlap, take tasks one at a time and
never compute one twice (a run waits for the tasks another holds, and computes any whose holder
died).  A run holds a shared lock on ``sweep.lock`` of its fingerprint folder throughout, which
:func:`clean_sweeps` tests before deleting the folder; writing ``results.csv`` and
``metadata.json`` (and removing another fingerprint's) happens under ``.parts/results.lock``.
On Linux NFS, flock is emulated with byte-range locks and holds across machines (NFSv4, or v3
with lockd); Lustre and GPFS honour it when mounted with ``flock`` (``localflock`` locks per node
only).  Where the file system refuses locks (ENOLCK, EOPNOTSUPP) the run warns once and goes on
unlocked, as before: disjoint shards are still safe, overlapping runs may compute a task twice.

The fingerprint hashes the experiment, config, seed, device, columns, torch and Python versions and
the code that computes the results (:func:`precision_lab.lab.fingerprint.code_digest`: the library
and the experiment's compute modules, by syntax).  A changed config or changed code (committed or
not) never reuses stale parts, and a ``results.csv`` of another fingerprint is removed when a run
starts, so ``plot`` never reads a stale one.  Editing a figure, the lab, a comment or a docstring
keeps finished parts.  Each fingerprint folder holds ``key.json`` (what was hashed), which
:func:`clean_sweeps` reads to tell folders the current code can still use from stale ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import platform
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from precision_lab.lab.fingerprint import code_digest
from precision_lab.lab.results import (
    BadFile,
    atomic_write_text,
    checksum,
    load_metadata,
    make_folder,
    read_part,
    remove_stale_temporaries,
    write_metadata,
    write_part,
)

try:
    import fcntl
except ImportError:  # not a POSIX system: no locks (see the module docstring)
    fcntl = None

__all__ = ["SweepFolder", "clean_sweeps", "fingerprint", "parse_shard", "run_tasks", "sweep_lock"]

Task = TypeVar("Task")
Row = dict[str, Any]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/K"`` -> (I, K) with 1 <= I <= K; None passes through; ValueError names the bad value."""
    if text is None:
        return None
    try:
        i, k = (int(p) for p in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/K (e.g. 2/8), got {text!r}") from None
    if not 1 <= i <= k:
        raise ValueError(f"--shard {text!r}: need 1 <= I <= K")
    return i, k


def _as_dict(record: Any, what: str) -> dict[str, Any]:
    if not dataclasses.is_dataclass(record) or isinstance(record, type):
        raise ValueError(f"{what} must be a dataclass instance, got {type(record).__name__}: {record!r}")
    return dataclasses.asdict(record)


def _key(
    experiment: str, config: Mapping[str, Any], seed: int, device: str, columns: Sequence[str], module: str
) -> dict[str, Any]:
    return {
        "experiment": experiment,
        "config": config,
        "seed": seed,
        "device": device,
        "columns": list(columns),
        "code": code_digest(module),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(
    experiment: str, config: Mapping[str, Any], seed: int, device: str, columns: Sequence[str], module: str
) -> str:
    """The 16-hex-digit key of a sweep's parts: what was asked for, and which code computes it."""
    return _digest(_key(experiment, config, seed, device, columns, module))


# --------------------------------------------------------------------------------------------------
# locks
# --------------------------------------------------------------------------------------------------
_warned = False


def _flock(fd: int, shared: bool, blocking: bool) -> bool:
    """Lock ``fd``; False if ``blocking`` is off and another holds it.  True without locking where none exist."""
    global _warned
    if fcntl is None:
        return True
    op = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
    try:
        fcntl.flock(fd, op)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
            raise
        if not _warned:
            _warned = True
            print(
                f"precision-lab: warning: this file system refuses locks ({exc.strerror}); running unlocked",
                file=sys.stderr,
            )
    return True


@contextlib.contextmanager
def _lock(path: Path, *, shared: bool = False, blocking: bool = True) -> Iterator[bool]:
    """Hold a flock on ``path`` (created if missing) for the block; yields whether it was taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        yield _flock(fd, shared, blocking)
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def sweep_lock(parts: str | Path, *, shared: bool = True, blocking: bool = True) -> Iterator[bool]:
    """Hold ``parts/sweep.lock``: shared while a sweep runs, exclusive while :func:`clean_sweeps` deletes.

    A shared taker that finds the folder deleted under it (by ``clean`` between its ``mkdir`` and its
    lock) makes the folder again and retries, so a running sweep never works in a deleted folder.
    Yields whether the lock was taken (always True when ``blocking``).
    """
    parts = Path(parts)
    while True:
        make_folder(parts)
        path = parts / "sweep.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileNotFoundError:
            continue  # the folder went away between mkdir and open
        try:
            got = _flock(fd, shared, blocking)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if got and not same:
                continue  # locked a deleted file: start over (the finally closes it)
            yield got
            return
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------------
# the stored state a run starts from, checked before anything is written
# --------------------------------------------------------------------------------------------------
def _read_started(path: Path) -> datetime | None:
    """The start time recorded in ``parts/started`` (None if absent); BadFile naming it if unreadable."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadFile(f"{path}: cannot read it ({exc}); delete it and run again (finished parts are kept)") from None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise BadFile(
            f"{path} holds {text[:40]!r}, not an ISO start time; delete it and run again (finished parts are kept)"
        ) from None


def _stored_fingerprint(out: Path) -> str | None:
    """The fingerprint of the stored ``metadata.json`` (None if there is none); BadFile if it is unreadable."""
    meta = out / "metadata.json"
    if not meta.exists():
        return None
    fp = load_metadata(meta).get("fingerprint")
    return fp if isinstance(fp, str) else None


def _drop_stale_results(out: Path, key: str) -> None:
    """Remove ``results.csv``/``metadata.json`` written for another fingerprint (config, code, seed...).

    Until this grid completes, ``plot`` then finds no results instead of silently reading another
    configuration's.  results.csv goes first: it never exists without the metadata that checks it.
    """
    if _stored_fingerprint(out) != key:
        (out / "results.csv").unlink(missing_ok=True)
        (out / "metadata.json").unlink(missing_ok=True)


def run_tasks(
    experiment: str,
    out_dir: str | Path,
    tasks: Sequence[Task],
    work: Callable[[Task], list[Row]],
    *,
    columns: Sequence[str],
    config: Any,
    seed: int,
    device: str = "cpu",
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> Path | None:
    """Compute every unfinished task of this shard, then merge if the whole grid is done.

    Args:
        experiment: Name written to metadata and hashed into the fingerprint.
        out_dir: ``DIR/EXPERIMENT``; gets ``results.csv``, ``metadata.json`` and ``.parts/``.
        tasks: The grid, in its canonical order: frozen dataclass instances.
        work: ``work(task)`` -> the task's rows (dicts with every column of ``columns``).
        columns: The CSV columns.
        config: The experiment's config, a dataclass instance (hashed; written to metadata).  The
            module that defines its class is the experiment's compute module, whose code (and the
            ``experiments`` modules it imports) the fingerprint covers.
        seed: Base seed (hashed; written to metadata).
        device: Device the work runs on.
        shard: ``(i, k)``: compute only tasks ``j`` with ``j % k == i - 1``.
        progress: Show a progress bar (counts and ETA) on stderr.

    Returns:
        The path of ``results.csv`` once every task of the grid is finished, else None.

    Raises:
        ValueError: ``config`` or a task is not a dataclass instance, the compute module imports
            figure code, ``out_dir`` cannot be a folder, or (:class:`BadFile`, before anything is
            written) the stored ``metadata.json`` or start time is unreadable, or a part is cut
            short, edited or has other columns.
    """
    out = Path(out_dir)
    config_dict = _as_dict(config, "config")
    task_dicts = [_as_dict(t, "a task") for t in tasks]
    module = type(config).__module__
    key_record = _key(experiment, config_dict, seed, device, columns, module)
    key = _digest(key_record)
    root = out / ".parts"
    parts = root / key
    # checks first: a bad stored file stops the run before anything is written
    _stored_fingerprint(out)
    _read_started(parts / "started")
    make_folder(root, "results folder")
    with _lock(root / "results.lock"):
        _drop_stale_results(out, key)
    remove_stale_temporaries(out)
    with sweep_lock(parts):
        remove_stale_temporaries(parts)  # half-written parts of a killed run (never a finished one)
        if not (parts / "key.json").exists():
            atomic_write_text(parts / "key.json", json.dumps({**key_record, "module": module}, default=str) + "\n")
        if not (parts / "started").exists():
            atomic_write_text(parts / "started", datetime.now(timezone.utc).isoformat() + "\n")
        done = _compute(experiment, parts, tasks, task_dicts, work, columns, shard, progress)
        if not done:
            return None
        return _merge(experiment, out, parts, len(tasks), columns, config_dict, seed, device, key, module)


def _part(parts: Path, j: int) -> Path:
    return parts / f"{j:06d}.csv"


def _compute(
    experiment: str,
    parts: Path,
    tasks: Sequence[Task],
    task_dicts: list[dict[str, Any]],
    work: Callable[[Task], list[Row]],
    columns: Sequence[str],
    shard: tuple[int, int] | None,
    progress: bool,
) -> bool:
    """Compute this shard's unfinished tasks, each under its lock; True when the whole grid has parts."""
    mine = [j for j in range(len(tasks)) if shard is None or j % shard[1] == shard[0] - 1]
    todo = [j for j in mine if not _part(parts, j).exists()]
    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(todo),
        desc=experiment,
        unit="task",
        disable=not progress,
        dynamic_ncols=True,
    )

    def attempt(j: int, blocking: bool) -> bool:
        with _lock(parts / f"{j:06d}.lock", blocking=blocking) as got:
            if not got:
                return False  # another run computes it now
            if not _part(parts, j).exists():  # finished by another run while we waited?
                bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in task_dicts[j].items()), refresh=False)
                write_part(_part(parts, j), work(tasks[j]), columns)  # atomic: a kill leaves no half part
        bar.update(1)
        return True

    with bar:
        held = [j for j in todo if not attempt(j, blocking=False)]
        for j in held:  # wait for the other run; compute the task if it died without finishing it
            attempt(j, blocking=True)
    return all(_part(parts, j).exists() for j in range(len(tasks)))


def _merge(
    experiment: str,
    out: Path,
    parts: Path,
    n_tasks: int,
    columns: Sequence[str],
    config_dict: dict[str, Any],
    seed: int,
    device: str,
    key: str,
    module: str,
) -> Path:
    """Check every part, then write ``metadata.json`` (with the checksum) and ``results.csv``."""
    header = ",".join(columns) + "\n"
    text = header + "".join(read_part(_part(parts, j), columns) for j in range(n_tasks))
    started = _read_started(parts / "started") or datetime.now(timezone.utc)
    record = checksum(text.encode("utf-8"))
    with _lock(out / ".parts" / "results.lock"):
        write_metadata(  # first: results.csv never exists without the record that checks it
            out / "metadata.json",
            config={**config_dict, "tasks": n_tasks, "parts": str(parts.relative_to(out))},
            seed=seed,
            device=device,
            started=started,
            extra={"experiment": experiment, "fingerprint": key, "code": code_digest(module)},
            files={"results.csv": record},
        )
        atomic_write_text(out / "results.csv", text)
    return out / "results.csv"


# --------------------------------------------------------------------------------------------------
# clean: fingerprint folders the current code can no longer use
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SweepFolder:
    """One fingerprint folder ``OUT/EXPERIMENT/.parts/<fingerprint>`` and what :func:`clean_sweeps` makes of it.

    ``status``: ``in use`` (a running sweep holds it), ``results`` (``results.csv`` was merged from it),
    ``resumable`` (the current code and versions would reuse it, for another config, seed or
    device), ``stale`` (other code, torch or Python: never reused).
    """

    path: Path
    status: str
    reason: str
    parts: int
    size: int


def _classify(folder: Path, results_fp: str | None) -> tuple[str, str]:
    if folder.name == results_fp:
        return "results", "results.csv was merged from these parts"
    try:
        key = json.loads((folder / "key.json").read_text(encoding="utf-8"))
        if not isinstance(key, dict):
            raise ValueError
    except (OSError, ValueError):
        return "stale", "no key.json: written by an older precision-lab"
    if key.get("torch") != torch.__version__ or key.get("python") != platform.python_version():
        return "stale", f"torch {key.get('torch')}, Python {key.get('python')}"
    try:
        current = code_digest(str(key.get("module")))
    except ValueError:
        return "stale", f"its compute module {key.get('module')!r} is gone"
    if current != key.get("code"):
        return "stale", "the code changed since"
    config = ", ".join(f"{k}={v}" for k, v in sorted(dict(key.get("config") or {}).items()))
    return "resumable", f"seed {key.get('seed')}, device {key.get('device')}, {config}"[:200]


def clean_sweeps(out_dir: str | Path, *, delete: bool = False) -> list[SweepFolder]:
    """List the fingerprint folders under ``out_dir`` (``DIR`` or ``DIR/EXPERIMENT``); delete stale ones if asked.

    Only ``stale`` folders are deleted, each while holding its ``sweep.lock`` exclusively, so a folder
    a sweep is running in (even a stale one) is never deleted.

    Raises:
        ValueError: ``out_dir`` is not a folder.
    """
    out = Path(out_dir)
    if not out.is_dir():
        what = "is a file, not a folder" if out.exists() else "does not exist"
        raise ValueError(f"--out {out} {what}; give the results folder (default: results/)")
    roots = sorted({p.parent for p in [*out.glob("*/.parts"), *out.glob(".parts")] if p.is_dir()})
    found = []
    for exp in roots:
        try:
            results_fp = _stored_fingerprint(exp)
        except BadFile:
            results_fp = None  # unreadable metadata: nothing is "results"; stale ones are still stale
        for folder in sorted(p for p in (exp / ".parts").iterdir() if p.is_dir()):
            files = [f for f in folder.iterdir() if f.is_file()]
            n_parts = sum(1 for f in files if f.suffix == ".csv")
            size = sum(f.stat().st_size for f in files)
            with sweep_lock(folder, shared=False, blocking=False) as free:
                if not free:
                    found.append(SweepFolder(folder, "in use", "a running sweep holds it", n_parts, size))
                    continue
                status, reason = _classify(folder, results_fp)
                if status == "stale" and delete:
                    shutil.rmtree(folder)
                    status = "deleted"
                found.append(SweepFolder(folder, status, reason, n_parts, size))
    return found
