"""Tidy results on disk: one CSV row per measurement plus a ``metadata.json``, written atomically.

Every file is written to a temporary sibling and moved into place with :func:`os.replace`, so a
killed run leaves either the previous complete file or the new complete file, never half of one.
Rows are sorted and formatted deterministically (``repr`` of floats round-trips exactly), so the
same command with the same seed writes the same bytes; timings never go into ``results.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_write_text",
    "environment",
    "read_csv",
    "remove_stale_temporaries",
    "write_csv",
    "write_metadata",
]


def _tmp_prefix(name: str) -> str:
    host = socket.gethostname().replace(".", "_")
    return f".{name}.{host}.{os.getpid()}."


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, fsync, rename).

    The temporary file is named ``.NAME.HOST.PID.*.tmp``, so that :func:`remove_stale_temporaries`
    can tell a write killed mid-way (dead process) from one in progress (live process).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path.name), suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporary files left in ``folder`` by killed writers on this host; returns how many.

    Temporaries of live processes and of other hosts (a shared file system) are left alone.
    """
    host = socket.gethostname().replace(".", "_")
    removed = 0
    for tmp in Path(folder).glob(".*.tmp"):
        parts = tmp.name.split(".")  # "", name..., host, pid, random, "tmp"
        try:
            pid = int(parts[-3])
        except (IndexError, ValueError):
            continue
        if parts[-4] == host and not _alive(pid):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)  # shortest round-trip form: exact and deterministic
    return str(v)


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write ``rows`` (dicts) with the given column order, atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(f"row is missing columns {missing}: {dict(row)}")
        w.writerow([_cell(row[c]) for c in columns])
    atomic_write_text(path, buf.getvalue())


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """Read a results CSV as a list of string dicts."""
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions, device and threads of this process, for ``metadata.json``."""
    import numpy
    import scipy

    from precision_lab import __version__

    env = {
        "precision_lab": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "device": device,
        "threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
    return env


def write_metadata(
    path: str | Path,
    *,
    config: Mapping[str, Any],
    seed: int,
    device: str,
    started: datetime,
    finished: datetime | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write ``metadata.json``: environment, seed, full config, start and end time (UTC), ``extra`` keys."""
    meta = {
        **dict(extra or {}),
        "environment": environment(device),
        "seed": seed,
        "config": dict(config),
        "started": started.astimezone(timezone.utc).isoformat(),
        "finished": (finished or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat(),
    }
    atomic_write_text(path, json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
