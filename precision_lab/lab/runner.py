"""Resumable, shardable execution of an experiment's grid of tasks.

A grid is a list of *tasks*, each a frozen dataclass of the experiment (typed fields, not string
keys), which the experiment computes into rows.  Each finished task is written atomically to its
own part file under ``OUT/.parts/<fingerprint>/``; a run killed at any moment (SIGKILL included)
leaves only complete files, and running again skips the finished tasks.  ``shard=(i, k)`` computes
the i-th of k interleaved parts of the task list, so a sweep spreads over processes or array jobs.
When every task has a part, ``results.csv`` is the concatenation of the parts in task order, so it
is the same bytes however the work was split.

The fingerprint hashes the experiment, config, seed, device, columns, torch and Python versions and
the code that computes the results (:func:`precision_lab.lab.fingerprint.code_digest`: the library
and the experiment's compute modules, by syntax).  A changed config or changed code (committed or
not) never reuses stale parts, and a ``results.csv`` of another fingerprint is removed when a run
starts, so ``plot`` never reads a stale one.  Editing a figure, the lab, a comment or a docstring
keeps finished parts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from precision_lab.lab.fingerprint import code_digest
from precision_lab.lab.results import atomic_write_text, remove_stale_temporaries, write_csv, write_metadata

__all__ = ["fingerprint", "parse_shard", "run_tasks"]

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


def fingerprint(
    experiment: str, config: Mapping[str, Any], seed: int, device: str, columns: Sequence[str], module: str
) -> str:
    """The 16-hex-digit key of a sweep's parts: what was asked for, and which code computes it."""
    key = {
        "experiment": experiment,
        "config": config,
        "seed": seed,
        "device": device,
        "columns": list(columns),
        "code": code_digest(module),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _drop_stale_results(out: Path, key: str) -> None:
    """Remove ``results.csv``/``metadata.json`` written for another fingerprint (config, code, seed...).

    Until this grid completes, ``plot`` then finds no results instead of silently reading another
    configuration's.
    """
    meta = out / "metadata.json"
    try:
        old = json.loads(meta.read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError):
        old = None
    if old != key:
        (out / "results.csv").unlink(missing_ok=True)
        meta.unlink(missing_ok=True)


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
            figure code, or a part file has other columns.
    """
    out = Path(out_dir)
    config_dict = _as_dict(config, "config")
    task_dicts = [_as_dict(t, "a task") for t in tasks]
    module = type(config).__module__
    key = fingerprint(experiment, config_dict, seed, device, columns, module)
    parts = out / ".parts" / key
    parts.mkdir(parents=True, exist_ok=True)
    _drop_stale_results(out, key)
    remove_stale_temporaries(parts)  # half-written parts of a killed run (never a finished one)
    remove_stale_temporaries(out)
    started_file = parts / "started"
    if not started_file.exists():
        atomic_write_text(started_file, datetime.now(timezone.utc).isoformat() + "\n")

    def part(j: int) -> Path:
        return parts / f"{j:06d}.csv"

    mine = [j for j in range(len(tasks)) if shard is None or j % shard[1] == shard[0] - 1]
    todo = [j for j in mine if not part(j).exists()]
    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(todo),
        desc=experiment,
        unit="task",
        disable=not progress,
        dynamic_ncols=True,
    )
    with bar:
        for j in todo:
            bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in task_dicts[j].items()), refresh=False)
            write_csv(part(j), work(tasks[j]), columns)  # atomic: a kill leaves no half part
            bar.update(1)
    if not all(part(j).exists() for j in range(len(tasks))):
        return None
    header = ",".join(columns) + "\n"
    body = []
    for j in range(len(tasks)):
        text = part(j).read_text(encoding="utf-8")
        if not text.startswith(header):
            raise ValueError(f"part {part(j)} has other columns than {list(columns)}; delete {parts} and rerun")
        body.append(text[len(header) :])
    atomic_write_text(out / "results.csv", header + "".join(body))
    started = datetime.fromisoformat(started_file.read_text().strip())
    write_metadata(
        out / "metadata.json",
        config={**config_dict, "tasks": len(tasks), "parts": str(parts.relative_to(out))},
        seed=seed,
        device=device,
        started=started,
        extra={"experiment": experiment, "fingerprint": key, "code": code_digest(module)},
    )
    return out / "results.csv"
