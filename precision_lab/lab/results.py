"""Tidy results on disk: one CSV row per measurement plus a ``metadata.json``, written atomically and checked.

Every file is written to a temporary sibling and moved into place with :func:`os.replace`, so a
killed run leaves either the previous complete file or the new complete file, never half of one.
Files are created as :func:`open` creates them: mode ``0666`` less the process's umask.  Rows are
sorted and formatted deterministically (``repr`` of floats round-trips exactly), so the same command
with the same seed writes the same bytes; timings never go into ``results.csv``.

**Checksums.**  A file that exists is whole, but it can still be cut short or edited later (a full
disk, a copy that stopped, a hand edit).  So every stored table carries its row count, byte count
and sha256, and is checked before use:

* a part file ends with one line ``#precision-lab part rows=R bytes=B sha256=H`` covering the bytes
  before it (one atomic write holds the rows and their checksum: never one without the other);
* ``results.csv`` keeps exactly its CSV bytes (header and rows; reproducibility is its sha256) and
  its record goes into ``metadata.json`` under ``files``; :func:`read_csv` checks it whenever a
  ``metadata.json`` lies beside the file.

A file that fails a check raises :class:`BadFile`, a :class:`ValueError` whose one-line message names
the file and says what to do.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import platform
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BadFile",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_file_folder",
    "checksum",
    "csv_text",
    "environment",
    "load_metadata",
    "make_folder",
    "read_csv",
    "read_part",
    "remove_stale_temporaries",
    "staged_folder",
    "write_csv",
    "write_metadata",
    "write_part",
]


class BadFile(ValueError):
    """A stored file that is unreadable, cut short or edited; the message names it and what to do."""


def _host() -> str:
    return socket.gethostname().replace(".", "_")


def _tmp_prefix(name: str) -> str:
    return f".{name}.{_host()}.{os.getpid()}."


def make_folder(path: str | Path, what: str = "folder") -> Path:
    """Create ``path`` and its parents; a ValueError naming it when it is a file or cannot be created."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise ValueError(f"{what} {path}: {blocker} is a file, not a folder; choose another folder") from None
    except OSError as exc:
        raise ValueError(f"{what} {path}: cannot create it ({exc.strerror})") from None
    return path


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new empty file ``.NAME.HOST.PID.RANDOM.tmp`` beside ``path``, opened for writing.

    Mode 0666 less the umask (what :func:`open` gives), where :func:`tempfile.mkstemp` would give 0600.
    """
    for _ in range(100):
        tmp = path.parent / f"{_tmp_prefix(path.name)}{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write {path} ({exc.strerror})") from None
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {path}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename).

    The temporary file is named ``.NAME.HOST.PID.*.tmp``, so that :func:`remove_stale_temporaries`
    can tell a write killed mid-way (dead process) from one in progress (live process).
    """
    path = Path(path)
    make_folder(path.parent)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically, as :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _stale(name: str, prefix: str = ".") -> bool:
    """Whether ``name`` (``PREFIX...HOST.PID.RANDOM[.old].tmp``) is a temporary of a dead process on this host."""
    m = re.fullmatch(re.escape(prefix) + r"(?:.*\.)?([^.]+)\.(\d+)\.[0-9a-f]+(?:\.old)?\.tmp", name)
    return m is not None and m.group(1) == _host() and not _alive(int(m.group(2)))


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete temporary files left in ``folder`` by killed writers on this host; returns how many.

    Temporaries of live processes and of other hosts (a shared file system) are left alone.
    """
    removed = 0
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file() and _stale(tmp.name):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


# --------------------------------------------------------------------------------------------------
# tables and their checksums
# --------------------------------------------------------------------------------------------------
def _cell(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)  # shortest round-trip form: exact and deterministic
    return str(v)


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """The CSV text of ``rows`` (dicts) with the given column order: header line, one line per row."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        missing = [c for c in columns if c not in row]
        if missing:
            raise ValueError(f"row is missing columns {missing}: {dict(row)}")
        w.writerow([_cell(row[c]) for c in columns])
    return buf.getvalue()


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write ``rows`` (dicts) with the given column order, atomically."""
    atomic_write_text(path, csv_text(rows, columns))


def _records(text: str) -> int:
    """CSV records in ``text`` after the header (a quoted cell may hold a newline)."""
    return max(0, sum(1 for _ in csv.reader(io.StringIO(text, newline=""))) - 1)


def checksum(data: bytes) -> dict[str, Any]:
    """``{"rows", "bytes", "sha256"}`` of a CSV file's bytes (rows: records after the header)."""
    return {
        "rows": _records(data.decode("utf-8", errors="replace")),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


_TRAILER = re.compile(r"#precision-lab part rows=(\d+) bytes=(\d+) sha256=([0-9a-f]{64})\n")


def write_part(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write one task's rows as CSV plus the checksum line (module docstring), in one atomic write."""
    data = csv_text(rows, columns).encode("utf-8")
    c = checksum(data)
    atomic_write_bytes(
        path, data + f"#precision-lab part rows={c['rows']} bytes={c['bytes']} sha256={c['sha256']}\n".encode()
    )


def read_part(path: str | Path, columns: Sequence[str]) -> str:
    """The rows of a part file (CSV text without the header), after checking its checksum line and columns.

    Raises:
        BadFile: the file is cut short (no checksum line, or fewer bytes or rows than it records),
            was edited, or has other columns.
    """
    path = Path(path)
    data = path.read_bytes()
    body, _, last = data.rstrip(b"\n").rpartition(b"\n")
    m = _TRAILER.fullmatch(last.decode("utf-8", errors="replace") + "\n")
    todo = "delete it and run again (that task is recomputed)"
    if m is None:
        got = checksum(data)
        raise BadFile(
            f"part {path} has no checksum line: cut short (holds {got['rows']} rows, {got['bytes']} bytes) "
            f"or written by an older precision-lab; {todo}"
        )
    body += b"\n"
    rows, size, digest = int(m.group(1)), int(m.group(2)), m.group(3)
    got = checksum(body)
    if (got["bytes"], got["sha256"]) != (size, digest):
        raise BadFile(
            f"part {path} holds {got['rows']} rows ({got['bytes']} bytes) but its checksum line records {rows} rows "
            f"({size} bytes, sha256 {digest[:12]}...): cut short or edited; {todo}"
        )
    text = body.decode("utf-8")
    header = ",".join(columns) + "\n"
    if not text.startswith(header):
        raise BadFile(f"part {path} has other columns than {list(columns)}; {todo}")
    return text[len(header) :]


def load_metadata(path: str | Path) -> dict[str, Any]:
    """``metadata.json`` as a dict; BadFile naming it when it is not a JSON object."""
    path = Path(path)
    todo = "delete it and results.csv beside it, then run the experiment again (finished parts are reused)"
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise BadFile(f"{path} is not UTF-8 text; {todo}") from None
    except json.JSONDecodeError as exc:
        raise BadFile(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); {todo}") from None
    if not isinstance(meta, dict):
        raise BadFile(f"{path} holds a JSON {type(meta).__name__}, not an object of precision-lab metadata; {todo}")
    return meta


def _verify(path: Path, data: bytes) -> None:
    """Check ``data`` (the bytes of ``path``) against the record in ``metadata.json`` beside it, if any."""
    meta_path = path.parent / "metadata.json"
    if not meta_path.exists():
        return
    meta = load_metadata(meta_path)
    todo = (
        f"run the same `precision-lab run {meta.get('experiment', 'EXPERIMENT')}` command again "
        f"(it rebuilds {path.name} from the finished parts)"
    )
    files = meta.get("files")
    record = files.get(path.name) if isinstance(files, dict) else None
    if not isinstance(record, dict) or not {"rows", "bytes", "sha256"} <= set(record):
        raise BadFile(
            f"{meta_path} records no checksum of {path} (written by an older precision-lab, or edited); {todo}"
        )
    got = checksum(data)
    if (got["bytes"], got["sha256"]) != (record["bytes"], record["sha256"]):
        raise BadFile(
            f"{path} holds {got['rows']} rows ({got['bytes']} bytes) but {meta_path} records {record['rows']} rows "
            f"({record['bytes']} bytes, sha256 {str(record['sha256'])[:12]}...): cut short or edited; {todo}"
        )


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """Read a results CSV as a list of string dicts, checked first.

    Where a ``metadata.json`` lies beside the file, its checksum record of the file must match; the
    CSV must be UTF-8 and every row must have the header's number of cells.

    Raises:
        BadFile: the file (or its ``metadata.json``) fails a check; the message names it.
        FileNotFoundError: there is no such file.
    """
    path = Path(path)
    data = path.read_bytes()
    _verify(path, data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadFile(f"{path} is not UTF-8 text (byte {exc.start}); run its experiment again") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise BadFile(f"{path} has no header line; run its experiment again")
    rows = []
    for row in reader:
        if len(row) != len(header):
            raise BadFile(
                f"{path} line {reader.line_num} has {len(row)} cells where the header has {len(header)}: "
                "cut short or edited; run its experiment again"
            )
        rows.append(dict(zip(header, row, strict=True)))
    return rows


# --------------------------------------------------------------------------------------------------
# a folder of files replaced as one (the figure set of ``reproduce``)
# --------------------------------------------------------------------------------------------------
def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one system call (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False  # a libc without it (glibc < 2.28, musl)
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # the kernel or this file system (NFS, ...) cannot: two renames instead
    raise OSError(err, f"cannot swap {b} with {a} ({os.strerror(err)})")


def _fsync_path(path: Path) -> None:
    """Flush a file or folder to disk where the system allows it (best effort: durability, not correctness)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _recover(target: Path) -> None:
    """Undo what a killed :func:`staged_folder` left: restore a moved-away ``target``, delete dead staging."""
    prefix = f".{target.name}."
    for entry in sorted(target.parent.glob(f"{_glob_escape(prefix)}*.tmp")):
        if not entry.is_dir() or not _stale(entry.name, prefix):
            continue
        if entry.name.endswith(".old.tmp") and not target.exists():
            os.rename(entry, target)  # killed between the two renames: the previous set comes back whole
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _glob_escape(text: str) -> str:
    """``text`` with glob's special characters escaped (a literal in a :meth:`Path.glob` pattern)."""
    return re.sub(r"([*?[])", r"[\1]", text)


def check_file_folder(target: str | Path, what: str) -> Path:
    """``target`` must be a folder of plain files (or not exist yet): what :func:`staged_folder` can swap."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{what} {target} is a file, not a folder; choose another folder")
    if target.is_dir():
        odd = sorted(p.name for p in target.iterdir() if p.is_symlink() or not p.is_file())
        if odd:
            raise ValueError(
                f"{what} {target} holds {odd[0]!r}, which is not a plain file: the figure set is replaced as one "
                "folder, so it may hold only files; choose a folder of its own"
            )
    return target


@contextlib.contextmanager
def staged_folder(target: str | Path, what: str = "--figures") -> Iterator[Path]:
    """Yield an empty folder beside ``target``; when the block ends normally it replaces ``target`` as one.

    Files of ``target`` that the block did not write are carried over (hard links, or copies where
    the file system has none), so only the files written are replaced.  If the block raises, or the
    process is killed before the end, ``target`` is left exactly as it was.

    The swap: on Linux one ``renameat2(RENAME_EXCHANGE)`` call (ext4, xfs, btrfs, tmpfs...), so a
    reader or a kill sees the whole old set or the whole new set.  Where the kernel or the file
    system cannot (NFS, other systems), two renames: ``target`` moves aside to ``.NAME.*.old.tmp``,
    the staged folder takes its place; a kill between the two leaves no ``target`` and the old set
    whole beside it, which the next call puts back (never a mix of the two sets).  Files written into
    ``target`` by another process while the block runs are lost at the swap.

    Raises:
        ValueError: ``target`` is a file, or holds something other than plain files (a subfolder).
    """
    target = check_file_folder(target, what)
    parent = make_folder(target.parent, what)
    _recover(target)
    stage = parent / f"{_tmp_prefix(target.name)}{secrets.token_hex(4)}.tmp"
    os.mkdir(stage, 0o777)  # less the umask, as mkdir makes any folder
    try:
        if target.is_dir():
            os.chmod(stage, stat.S_IMODE(target.stat().st_mode))
        yield stage
        check_file_folder(target, what)
        if target.is_dir():
            for old in target.iterdir():
                if not (stage / old.name).exists():
                    try:
                        os.link(old, stage / old.name)
                    except OSError:
                        shutil.copy2(old, stage / old.name)
        for f in stage.iterdir():  # the carried files too: the new set is on disk before it is swapped in
            _fsync_path(f)
        if not target.exists():
            os.rename(stage, target)
        elif not _exchange(stage, target):
            aside = parent / f"{_tmp_prefix(target.name)}{secrets.token_hex(4)}.old.tmp"
            os.rename(target, aside)
            os.rename(stage, target)
            os.rename(aside, stage)  # deleted below with the rest of the old set
        _fsync_path(parent)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # the staged files, or the old set after the swap


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
    files: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Write ``metadata.json``: environment, seed, full config, start and end time (UTC), ``extra`` keys.

    ``files`` maps a file name beside it to its :func:`checksum` record, which :func:`read_csv` checks.
    """
    meta = {
        **dict(extra or {}),
        **({"files": {k: dict(v) for k, v in files.items()}} if files else {}),
        "environment": environment(device),
        "seed": seed,
        "config": dict(config),
        "started": started.astimezone(timezone.utc).isoformat(),
        "finished": (finished or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat(),
    }
    atomic_write_text(path, json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
