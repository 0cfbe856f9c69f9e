"""Figure of the ddp experiment: all-reduce calls and error vs N; reads ``results.csv`` only."""

from __future__ import annotations

from pathlib import Path

from experiments.ddp import MODES, NAME
from precision_lab.lab.plotting import pyplot, save_figure
from precision_lab.lab.results import read_csv

__all__ = ["plot"]


def plot(out_dir: str | Path, fig_dir: str | Path) -> list[Path]:
    """All-reduce calls and error vs N, per mode and all-reduce precision."""
    plt = pyplot()

    rows = read_csv(Path(out_dir) / "results.csv")
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    styles = dict(zip(MODES, ("-", "--", ":", "-."), strict=True))
    for i, (mfmt, afmt) in enumerate(sorted({(r["model_format"], r["allreduce_format"]) for r in rows})):
        for mode, ls in styles.items():
            sel = sorted(
                (r for r in rows if (r["model_format"], r["allreduce_format"], r["mode"]) == (mfmt, afmt, mode)),
                key=lambda r: int(r["n_accum"]),
            )
            ns = [int(r["n_accum"]) for r in sel]
            marker = "osx+"[MODES.index(mode)]  # coinciding modes stay visible as overlaid markers
            kw = {
                "color": f"C{i}",
                "linestyle": ls,
                "marker": marker,
                "label": f"{mfmt} model, {afmt} all-reduce, {mode}",
            }
            axes[0].loglog(ns, [int(r["allreduces"]) for r in sel], base=2, **kw)
            axes[1].loglog(ns, [max(float(r["rel_l2_error"]), 1e-18) for r in sel], base=2, **kw)
    axes[0].set_ylabel("all-reduce calls per optimizer step")
    axes[1].set_ylabel("relative L2 error vs fp64 large batch")
    for ax in axes:
        ax.set_xlabel("micro-batches per rank N")
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))  # outside: it hides no data
    fig.suptitle("DDP with gradient accumulation: no_sync vs an all-reduce every micro-step")
    return [save_figure(fig, fig_dir, NAME)]
