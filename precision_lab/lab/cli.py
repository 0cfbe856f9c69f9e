"""The ``precision-lab`` command: list, run, plot and reproduce experiments, and clean old parts.

Bad input (unknown experiment, bad option value, CUDA asked for where there is none) exits with
code 2 and one line naming the valid choices.  So does a bad stored file (a part or ``results.csv``
cut short or edited, an unreadable ``metadata.json``) and a folder that cannot be written: one line
that names the file and says what to do, checked before anything is rewritten.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"precision-lab: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="precision-lab", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("list", help="list the experiments")
    r = sub.add_parser("run", help="run one experiment and write its results")
    r.add_argument("experiment")
    r.add_argument("--quick", action="store_true", help="small sizes: seconds on 2 cores")
    r.add_argument("--out", default="results", help="results folder (default: results/)")
    r.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    r.add_argument("--seed", type=_seed, default=0)
    r.add_argument(
        "--shard",
        default=None,
        metavar="I/K",
        help="compute only the I-th of K interleaved parts of the grid; the run that finds every "
        "part done writes results.csv",
    )
    pl = sub.add_parser("plot", help="rebuild an experiment's figures from stored results")
    pl.add_argument("experiment")
    pl.add_argument("--out", default="results")
    rp = sub.add_parser("reproduce", help="run every experiment, build every figure and write the claims report")
    rp.add_argument("--quick", action="store_true")
    rp.add_argument("--out", default="results")
    rp.add_argument(
        "--figures",
        default=None,
        metavar="DIR",
        help="where the figures and CLAIMS.md go (default: figures/ for the full run, OUT/figures with --quick)",
    )
    rp.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    rp.add_argument("--seed", type=_seed, default=0)
    rp.add_argument(
        "--jobs",
        type=_jobs,
        default=1,
        metavar="K",
        help="run each experiment as K shard processes at once (default 1); the bytes do not change",
    )
    rr = sub.add_parser("report", help="write CLAIMS.md from stored results (no recomputation)")
    rr.add_argument("--out", default="results")
    rr.add_argument("--figures", default=None, metavar="DIR", help="where CLAIMS.md goes (default: OUT/figures)")
    cl = sub.add_parser(
        "clean", help="list the part folders of other code or versions (stale) and delete them with --delete"
    )
    cl.add_argument("--out", default="results", help="results folder (default: results/), or one experiment's")
    cl.add_argument(
        "--delete",
        action="store_true",
        help="delete the stale folders (never the one results.csv came from, one the current code can resume, "
        "or one a running sweep holds)",
    )
    return p


def _run(name: str, *, quick: bool, out: Path, device: str, seed: int, shard: str | None = None) -> bool:
    from experiments import get_experiment
    from precision_lab.lab.runner import parse_shard

    exp = get_experiment(name)
    part = parse_shard(shard)
    config = exp.Config.quick() if quick else exp.Config()
    path = exp.run(config, out / name, seed=seed, device=device, shard=part)
    if path is None:
        print(
            f"{name}: shard {shard} done; results.csv is written by the run that finds every shard finished "
            f"(run again without --shard to merge)"
        )
        return False
    print(f"{name}: results in {path}")
    return True


def _run_parallel(name: str, *, jobs: int, quick: bool, out: Path, device: str, seed: int) -> None:
    """Run ``jobs`` shard processes of one experiment at once, then merge them in this process."""
    from experiments import get_experiment

    if getattr(get_experiment(name), "SERIAL", False):
        jobs = 1  # its measurements (wall times) must not compete with other processes
    if jobs > 1:
        base = [
            sys.executable,
            "-m",
            "precision_lab.lab.cli",
            "run",
            name,
            "--out",
            str(out),
            "--device",
            device,
            "--seed",
            str(seed),
            *(["--quick"] if quick else []),
        ]
        # Split the cores between the shards: oversubscribed numba/OpenMP workers spin and slow a
        # sweep down many times over (the README's measured table). Results do not depend on
        # thread counts (tested), only the speed does.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        per = str(max(1, cores // jobs))
        env = {**os.environ, "OMP_NUM_THREADS": per, "NUMBA_NUM_THREADS": per}
        procs = [
            subprocess.Popen([*base, "--shard", f"{i}/{jobs}"], stdout=subprocess.DEVNULL, env=env)
            for i in range(1, jobs + 1)
        ]
        failed = [i + 1 for i, p in enumerate(procs) if p.wait() != 0]
        if failed:
            raise ValueError(f"{name}: shard process(es) {failed} of {jobs} failed (see their messages above)")
    _run(name, quick=quick, out=out, device=device, seed=seed)


def _plot(name: str, out: Path, fig_dir: Path, shown_as: Path | None = None) -> None:
    """Draw ``name``'s figures into ``fig_dir`` (printed as ``shown_as``: the folder they end up in)."""
    from experiments import get_figures
    from precision_lab.lab.results import BadFile

    figures = get_figures(name)
    results = out / name / "results.csv"
    if not results.is_file():
        raise ValueError(f"no results at {results}: run `precision-lab run {name}` first")
    try:
        paths = figures.plot(out / name, fig_dir)
    except BadFile:
        raise
    except (ValueError, KeyError) as exc:  # a value the figure cannot use, in a file nothing could check
        what = f"column {exc.args[0]!r} is missing" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(
            f"{results}: cannot draw {name}'s figures from it ({what}); run `precision-lab run {name}` again"
        ) from exc
    for path in paths:
        print(f"{name}: figure {(shown_as or fig_dir) / path.name}")


def _report(out: Path, fig_dir: Path, header: str, shown_as: Path | None = None) -> None:
    from experiments import REGISTRY
    from experiments.claims import write_report

    path = write_report(out, fig_dir, sorted(REGISTRY), header=header)
    print(f"claims report: {(shown_as or fig_dir) / path.name}")


def _clean(out: Path, delete: bool) -> None:
    from precision_lab.lab.runner import clean_sweeps

    found = clean_sweeps(out, delete=delete)
    for f in found:
        print(f"{f.status}  {f.path}  ({f.parts} parts, {f.size / 1e6:.1f} MB: {f.reason})")
    stale = [f for f in found if f.status == "stale"]
    deleted = [f for f in found if f.status == "deleted"]
    if deleted:
        print(f"deleted {len(deleted)} stale folder(s), {sum(f.size for f in deleted) / 1e6:.1f} MB")
    elif stale:
        print(
            f"{len(stale)} stale folder(s), {sum(f.size for f in stale) / 1e6:.1f} MB: "
            f"`precision-lab clean --out {out} --delete` deletes them"
        )
    else:
        print(f"no stale part folders under {out}")


def _folder(path: Path, flag: str) -> Path:
    """``path`` may be a folder or not exist yet; a file there is refused before anything runs."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder; choose another folder")
    return path


def _reproduce(args: argparse.Namespace) -> None:
    """Run every experiment, then draw every figure and the report into a staged folder swapped in at once."""
    from experiments import REGISTRY
    from precision_lab.lab.results import check_file_folder, staged_folder

    out = _folder(Path(args.out), "--out")
    fig_dir = Path(args.figures or (out / "figures" if args.quick else "figures"))
    check_file_folder(fig_dir, "--figures")  # before hours of computing
    for name in sorted(REGISTRY):
        _run_parallel(name, jobs=args.jobs, quick=args.quick, out=out, device=args.device, seed=args.seed)
    size = "quick sizes (`--quick`)" if args.quick else "full sizes"
    header = (
        f"Written by `precision-lab reproduce{' --quick' if args.quick else ''}` "
        f"({size}, seed {args.seed}, device {args.device}) from the results in `{out}/`."
    )
    with staged_folder(fig_dir) as stage:  # the figure set is replaced only once all of it is written
        for name in sorted(REGISTRY):
            _plot(name, out, stage, shown_as=fig_dir)
        _report(out, stage, header, shown_as=fig_dir)


def _int_in(flag: str, low: int, high: int | None = None, high_text: str = "") -> Callable[[str], int]:
    """An argparse type: an integer in ``[low, high)`` (no upper end if ``high`` is None).

    ``high_text`` is how the error message writes ``high`` (default: its digits).
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if high is None and value < low:
            raise argparse.ArgumentTypeError(f"{flag} must be >= {low}, got {value}")
        if high is not None and not low <= value < high:
            raise argparse.ArgumentTypeError(f"{flag} must be in [{low}, {high_text or high}), got {value}")
        return value

    return parse


_seed = _int_in("--seed", 0, 2**63, "2**63")
_jobs = _int_in("--jobs", 1)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``precision-lab`` command."""
    args = _parser().parse_args(argv)
    from experiments import REGISTRY

    try:
        if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda requested but no CUDA device is available; use --device cpu")
        if hasattr(args, "out"):
            _folder(Path(args.out), "--out")
        if getattr(args, "figures", None):
            _folder(Path(args.figures), "--figures")
        if args.command == "list":
            for name in sorted(REGISTRY):
                print(name)
        elif args.command == "run":
            _run(
                args.experiment,
                quick=args.quick,
                out=Path(args.out),
                device=args.device,
                seed=args.seed,
                shard=args.shard,
            )
        elif args.command == "plot":
            from precision_lab.lab.results import remove_stale_temporaries

            fig_dir = Path(args.out) / "figures"
            if fig_dir.is_dir():
                remove_stale_temporaries(fig_dir)  # a killed plot's temporaries
            _plot(args.experiment, Path(args.out), fig_dir)
        elif args.command == "report":
            _report(
                Path(args.out),
                Path(args.figures or Path(args.out) / "figures"),
                f"Written by `precision-lab report` from the results in `{args.out}/` (each experiment's "
                "`metadata.json` holds its config, seed, device and git commit).",
            )
        elif args.command == "clean":
            _clean(Path(args.out), args.delete)
        else:
            _reproduce(args)
    except (ValueError, OSError) as exc:
        if isinstance(exc, OSError) and exc.filename is not None:
            message = f"{exc.filename}: {exc.strerror}"
        else:
            message = str(exc)
        print(f"precision-lab: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
