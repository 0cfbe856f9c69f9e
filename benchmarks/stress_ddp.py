"""Run the DDP tests many times in a row with the CPU oversubscribed: gloo ranks must never abort.

A CI run under heavy load once lost a gloo rank to "terminate called without an active exception"
(SIGABRT) after its work was done: gloo's threads outlived ``destroy_process_group()`` and were torn
down during interpreter finalisation.  The workers now leave through
:func:`experiments.ddp.leave_process_group`.  This script runs ``tests/test_ddp_experiment.py`` and
the DDP tests of ``tests/test_training.py`` RUNS times (default 30) while BUSY busy-loop processes
(default 4) compete for the cores, and prints one line per run and a summary.  Exit code 0 only
if every run passed.

Usage: ``python benchmarks/stress_ddp.py [--runs 30] [--busy 4]`` (from the repository root).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_ddp_experiment.py", "tests/test_training.py", "-k", "ddp"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--busy", type=int, default=4, help="busy-loop processes competing for the cores")
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    print(f"{args.runs} runs of {' '.join(TESTS)}; {args.busy} busy loops on {cores} cores", flush=True)
    times, failed = [], []
    try:
        for i in range(1, args.runs + 1):
            t0 = time.monotonic()
            out = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=False,
            )
            dt = time.monotonic() - t0
            times.append(dt)
            lines = out.stdout.strip().splitlines()
            summary = lines[-1] if lines else "(no output)"
            aborted = "terminate called" in out.stdout + out.stderr
            ok = out.returncode == 0 and not aborted
            if not ok:
                failed.append(i)
                print(out.stdout[-3000:] + out.stderr[-3000:], flush=True)
            print(f"run {i:2d}: rc {out.returncode}, {dt:5.1f} s, {summary}{'  ABORT' if aborted else ''}", flush=True)
    finally:
        for proc in busy:
            proc.send_signal(signal.SIGTERM)
        for proc in busy:
            proc.wait()
    print(
        f"{args.runs - len(failed)}/{args.runs} runs passed; median {statistics.median(times):.1f} s, "
        f"max {max(times):.1f} s per run" + (f"; failed runs: {failed}" if failed else "")
    )
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
