"""Figure of the overhead experiment: time ratio, peak memory and the buffers' overhead vs N; reads results only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from experiments.overhead import MODE_BY_NAME, MODES, NAME
from precision_lab.lab.plotting import FORMAT_STYLES, PALETTE, STRATEGY_COLORS, pyplot, save_figure
from precision_lab.lab.results import read_csv
from precision_lab.workloads import MODEL_WORKLOADS

__all__ = ["plot"]

_MIB = 2.0**20
C8_TIME_RATIO = 1.17  # the quoted "about 17% more time"


def _mode_style(mode: str) -> dict[str, Any]:
    spec = MODE_BY_NAME[mode]
    if spec.strategy is None:
        return {"color": PALETTE["black"], "linestyle": "-", "marker": "o"}
    marker = {"naive": "s", "kahan": "^", "neumaier": "P", "stochastic": "v"}.get(spec.strategy, "D")
    return {"color": STRATEGY_COLORS[spec.strategy], "linestyle": FORMAT_STYLES[spec.buffer_format], "marker": marker}


def _label(mode: str) -> str:
    return "PyTorch p.grad (fp32)" if mode == "pytorch" else f"GradientAccumulator {mode.replace('-', ' ')}"


def plot(out_dir: str | Path, fig_dir: str | Path) -> list[Path]:
    """Per workload: time ratio vs N = 1, peak memory, and the buffers' overhead over PyTorch, vs N."""
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    rows = read_csv(Path(out_dir) / "results.csv")
    workloads = [w for w in MODEL_WORKLOADS if any(r["workload"] == w for r in rows)]
    modes = [m.name for m in MODES if any(r["mode"] == m.name for r in rows)]
    fig = plt.figure(figsize=(5.4 * len(workloads), 12))
    grid = fig.add_gridspec(4, len(workloads), height_ratios=(1, 1, 1, 0.16))
    axes = np.array([[fig.add_subplot(grid[i, j]) for j in range(len(workloads))] for i in range(3)])
    for j, w in enumerate(workloads):
        mine = [r for r in rows if r["workload"] == w]
        e = int(mine[0]["effective_batch"])
        base = next(r for r in mine if r["mode"] == "pytorch" and r["n_accum"] == "1")
        for m in modes:
            cur = sorted((r for r in mine if r["mode"] == m), key=lambda r: int(r["n_accum"]))
            n = [int(r["n_accum"]) for r in cur]
            t1 = float(next(r for r in cur if r["n_accum"] == "1")["time_median_s"])
            kw = {**_mode_style(m), "markersize": 4, "label": _label(m)}
            ratio = [float(r["time_ratio"]) for r in cur]
            lo = [max(ratio[i] - float(r["time_q1_s"]) / t1, 0.0) for i, r in enumerate(cur)]
            hi = [max(float(r["time_q3_s"]) / t1 - ratio[i], 0.0) for i, r in enumerate(cur)]
            axes[0, j].errorbar(n, ratio, yerr=[lo, hi], capsize=2, **kw)
            axes[1, j].plot(n, [float(r["peak_bytes"]) / _MIB for r in cur], **kw)
            axes[1, j].axhline(float(cur[0]["static_bytes"]) / _MIB, color=kw["color"], linestyle=":", linewidth=0.9)
            axes[2, j].plot(n, [float(r["time_vs_pytorch"]) for r in cur], **kw)
        axes[0, j].axhline(C8_TIME_RATIO, color=PALETTE["purple"], linestyle="--", linewidth=1.0)
        axes[0, j].axhline(1.0, color="0.5", linewidth=0.8)
        axes[2, j].axhline(1.0, color="0.5", linewidth=0.8)
        t_ms = 1e3 * float(base["time_median_s"])
        axes[0, j].set_title(
            f"{w}: time per step of E = {e} samples vs N = 1\n(PyTorch at N = 1: {t_ms:.3g} ms)", fontsize=10
        )
        axes[0, j].set_ylabel("median time(N) / median time(N = 1)")
        axes[1, j].set_title(
            f"{w}: peak memory of one step\n(PyTorch at N = 1: {float(base['peak_bytes']) / _MIB:.3g} MiB)", fontsize=10
        )
        axes[1, j].set_ylabel("peak memory (MiB)")
        axes[2, j].set_title(f"{w}: cost of the buffer over PyTorch at the same N", fontsize=10)
        axes[2, j].set_ylabel("median time / PyTorch's median time")
        for i in range(3):
            ax = axes[i, j]
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(plain)
            ax.set_xlabel(f"accumulation count N (micro-batches of E/N = {e}/N samples)")
        for i in (0, 1):
            axes[i, j].set_yscale("log")
            axes[i, j].yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
            axes[i, j].yaxis.set_major_formatter(plain)
            axes[i, j].yaxis.set_minor_formatter(NullFormatter())
    handles = [Line2D([], [], **{**_mode_style(m), "markersize": 4}, label=_label(m)) for m in modes]
    handles += [
        Line2D([], [], color=PALETTE["purple"], linestyle="--", label="+17% time (the quoted overhead, C8)"),
        Line2D(
            [], [], color="0.3", linestyle=":", label="memory held between steps (mode's colour; equal ones overlap)"
        ),
    ]
    legend = fig.add_subplot(grid[3, :])  # a row of its own: the legend covers no data
    legend.axis("off")
    legend.legend(handles=handles, loc="center", ncol=3, fontsize=8, frameon=False)
    device, threads = rows[0]["device"], rows[0]["threads"]
    fig.suptitle(
        f"Gradient accumulation at a fixed effective batch: wall time and peak memory vs N\n"
        f"({device}, {threads} thread{'s' if threads != '1' else ''}; median and quartiles of "
        f"{rows[0]['repeats']} timed steps)",
        fontsize=11,
    )
    return [save_figure(fig, fig_dir, NAME)]
