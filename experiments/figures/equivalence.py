"""Figure of the equivalence experiment: one bar per comparison at the largest N; reads ``results.csv`` only."""

from __future__ import annotations

from pathlib import Path

from experiments.equivalence import NAME, TOL
from precision_lab.lab.plotting import pyplot, save_figure
from precision_lab.lab.results import read_csv

__all__ = ["plot"]


def plot(out_dir: str | Path, fig_dir: str | Path) -> list[Path]:
    """One bar per comparison (largest N): relative difference on a log scale, the 2^-40 line drawn."""
    plt = pyplot()

    rows = read_csv(Path(out_dir) / "results.csv")
    n_max = max(int(r["n_accum"]) for r in rows)
    sel = [r for r in rows if int(r["n_accum"]) == n_max]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(sel) + 1.5))
    labels = [f"{r['claim']} {r['case']}: {r['comparison']}" for r in sel]
    vals = [max(float(r["rel_difference"]), 1e-18) for r in sel]
    colors = ["#0072B2" if r["predicted"] == "equal" else "#D55E00" for r in sel]
    ax.barh(range(len(sel)), vals, color=colors)
    ax.set_xscale("log")
    ax.axvline(TOL, color="k", linestyle=":", linewidth=1)
    ax.set_yticks(range(len(sel)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel(f"max |lhs - rhs| / max |rhs| at N = {n_max} (fp64; dotted: 2^-40; 0 drawn at 1e-18)")
    ax.set_title(
        "Gradient accumulation vs one large batch, fp64\nblue: the maths says equal; orange: it says different",
        fontsize=9,
    )
    return [save_figure(fig, fig_dir, NAME)]
