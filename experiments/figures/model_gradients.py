"""Figure of the model-gradients experiment: error and projection bias vs N; reads ``results.csv`` only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.model_gradients import NAME
from precision_lab import STRATEGIES
from precision_lab.lab.plotting import FORMAT_STYLES, buffer_style, pyplot, save_figure, trial_intervals, trial_means
from precision_lab.lab.results import read_csv

__all__ = ["plot"]


def plot(out_dir: str | Path, fig_dir: str | Path) -> list[Path]:
    """Error and projection bias vs N, per workload x compute precision (post scaling, fixed E).

    Row 1: relative error of every buffer with the input-quantisation floor of each buffer format;
    rows 2-3: projection bias of the bf16 and fp16 buffers with 95% Student-t intervals across trials
    (fp32 buffers' bias is below 1e-6 and left out), next to the exact sum's (input quantisation).
    """
    plt = pyplot()

    rows = [
        r
        for r in read_csv(Path(out_dir) / "results.csv")
        if r["scaling"] == "post" and r["regime"] == "fixed_effective"
    ]
    panels = sorted({(r["workload"], r["compute_format"]) for r in rows}, key=lambda p: (p[0], p[1] != "fp32"))
    order = {f: i for i, f in enumerate(("fp32", "bf16", "fp16", "fp64"))}
    buffers = sorted({(r["buffer_format"], r["strategy"]) for r in rows}, key=lambda b: (order.get(b[0], 9), b[1]))
    bias_formats = [f for f in ("bf16", "fp16") if any(b[0] == f for b in buffers)]
    fig, axes = plt.subplots(
        1 + len(bias_formats),
        len(panels),
        figsize=(3.9 * len(panels), 3.3 * (1 + len(bias_formats))),
        squeeze=False,
        sharex="col",
    )
    for j, (w, c) in enumerate(panels):
        mine = [r for r in rows if (r["workload"], r["compute_format"]) == (w, c)]
        for fmt in sorted({r["buffer_format"] for r in mine} - {"fp64"}, key=order.__getitem__):
            floor = trial_means(
                [r for r in mine if r["buffer_format"] == fmt and r["strategy"] == "naive"],
                "n_accum",
                "quantisation_floor",
            )
            axes[0, j].loglog(
                *zip(*floor, strict=True),
                color="0.6",
                linewidth=2.5,
                alpha=0.5,
                linestyle=FORMAT_STYLES[fmt],
                label=f"{fmt} floor: fp64 truth rounded once",
            )
        for fmt, strategy in buffers:
            sel = [r for r in mine if (r["buffer_format"], r["strategy"]) == (fmt, strategy)]
            kw = {
                **buffer_style(fmt, strategy),
                "label": f"{fmt} {strategy}" if strategy != "exact" else "exact sum (input quantisation alone)",
            }
            axes[0, j].plot(*zip(*trial_means(sel, "n_accum", "rel_l2_error"), strict=True), **kw)
            for i, bfmt in enumerate(bias_formats, start=1):
                if fmt not in (bfmt, "fp64"):
                    continue
                ns, mean, lo, hi = map(np.array, zip(*trial_intervals(sel, "n_accum", "projection_bias"), strict=True))
                dodge = STRATEGIES.index(strategy) - (len(STRATEGIES) - 1) / 2  # side by side: no bar hides another
                x = ns * 2.0 ** (0.06 * dodge)
                axes[i, j].errorbar(x, mean, yerr=[mean - lo, hi - mean], capsize=2, elinewidth=0.8, marker=".", **kw)
        e = int(mine[0]["effective_batch"])
        axes[0, j].set_title(f"{w}, micro-gradients in {c}\n(effective batch E = {e})", fontsize=9)
        axes[0, j].set_yscale("log")
        for i, bfmt in enumerate(bias_formats, start=1):
            axes[i, j].set_yscale("symlog", linthresh=1e-4)
            axes[i, j].axhline(0.0, color="k", linewidth=0.6)
            axes[i, j].set_title(f"{bfmt} buffers", fontsize=9)
        axes[-1, j].set_xscale("log", base=2)
        axes[-1, j].set_xlabel("accumulation count N (micro-batch = E/N)")
    axes[0, 0].set_ylabel("relative L2 error\nvs fp64 large-batch gradient")
    for i in range(1, len(bias_formats) + 1):
        axes[i, 0].set_ylabel("projection bias <acc - ref, ref>/|ref|^2\n(symlog; bars: 95% CI over trials)")
    handles, labels = axes[0, -1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)  # outside: hides no data
    fig.suptitle(
        "Accumulated gradient vs the fp64 large-batch gradient: buffer format x strategy (post scaling, mean of trials)"
    )
    return [save_figure(fig, fig_dir, NAME)]
