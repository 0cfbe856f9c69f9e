"""Figure helpers shared by the experiments: one colour-blind-safe style and one way to save.

Experiments build their figures from stored results only (``plot(out_dir, fig_dir)``).  This module
gives them the pyplot module on the Agg backend with the project style applied, the colours of the
strategies and the line styles of the formats (the same in every figure), and saves each figure as
a PNG (for the README) plus an SVG vector copy, both with stable bytes (no version or date in the
metadata, a fixed SVG id salt).

Colours are the Okabe-Ito palette (Okabe & Ito, "Color Universal Design", 2008), distinguishable
under the common colour-vision deficiencies; formats are told apart by line style as well, so no
figure relies on colour alone.
"""

from __future__ import annotations

import io
from pathlib import Path
from types import ModuleType
from typing import Any

from precision_lab.lab.results import atomic_write_bytes, make_folder
from precision_lab.metrics import summarize

__all__ = [
    "FORMAT_STYLES",
    "PALETTE",
    "STRATEGY_COLORS",
    "buffer_style",
    "pyplot",
    "save_figure",
    "trial_intervals",
    "trial_means",
]

# Okabe-Ito, in the order the default colour cycle uses them.
PALETTE: dict[str, str] = {
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "green": "#009E73",
    "orange": "#E69F00",
    "purple": "#CC79A7",
    "sky": "#56B4E9",
    "yellow": "#F0E442",
    "black": "#000000",
}
STRATEGY_COLORS: dict[str, str] = {
    "naive": PALETTE["vermillion"],
    "kahan": PALETTE["blue"],
    "neumaier": PALETTE["sky"],
    "stochastic": PALETTE["orange"],
    "pairwise": PALETTE["green"],
    "exact": PALETTE["black"],
}
FORMAT_STYLES: dict[str, Any] = {
    "fp64": "-.",
    "fp32": "-",
    "tf32": (0, (6, 2)),
    "bf16": "--",
    "fp16": ":",
    "fp8_e4m3": (0, (3, 1, 1, 1)),
    "fp8_e5m2": (0, (1, 3)),
}

_STYLE = {
    "axes.prop_cycle": None,  # filled in by pyplot() (needs matplotlib's cycler)
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 7,
    "legend.framealpha": 0.9,
    "lines.linewidth": 1.3,
    "figure.titlesize": 11,
    "svg.hashsalt": "precision_lab",  # stable element ids: the same figure gives the same SVG bytes
    "svg.fonttype": "none",  # text stays text in the vector copy
}


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, with the project style applied."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    matplotlib.rcParams.update({**_STYLE, "axes.prop_cycle": cycler(color=list(PALETTE.values()))})
    return plt


def buffer_style(fmt: str, strategy: str) -> dict[str, Any]:
    """Line keywords of a (buffer format, strategy) curve: colour by strategy, line style by format."""
    return {"color": STRATEGY_COLORS.get(strategy, PALETTE["purple"]), "linestyle": FORMAT_STYLES.get(fmt, "-")}


def trial_means(rows: list[dict[str, str]], key: str, column: str) -> list[tuple[int, float]]:
    """``(x, mean of column)`` over the rows (trials) sharing each integer ``x = row[key]``, sorted by x."""
    sums: dict[int, list[float]] = {}
    for r in rows:
        sums.setdefault(int(r[key]), []).append(float(r[column]))
    return [(x, sum(v) / len(v)) for x, v in sorted(sums.items())]


def trial_intervals(
    rows: list[dict[str, str]], key: str, column: str, confidence: float = 0.95
) -> list[tuple[int, float, float, float]]:
    """``(x, mean, ci_low, ci_high)`` over the trials sharing each ``x``, sorted by x.

    The interval is :func:`precision_lab.metrics.summarize`'s Student-t one (NaN ends with one trial).
    """
    groups: dict[int, list[float]] = {}
    for r in rows:
        groups.setdefault(int(r[key]), []).append(float(r[column]))
    out = []
    for x, values in sorted(groups.items()):
        s = summarize(values, confidence)
        out.append((x, s.mean, s.ci_low, s.ci_high))
    return out


def save_figure(fig: Any, fig_dir: str | Path, name: str) -> Path:
    """Lay out, save ``fig_dir/name.png`` (150 dpi) and the vector copy ``name.svg``, close ``fig``.

    Returns the PNG's path.  Neither file carries a software version or date, so the same figure
    gives the same bytes.  Both are rendered in memory first and written atomically (mode 0666 less
    the umask, as :func:`open` makes files): a killed ``plot`` leaves the previous file or the new one.
    """
    plt = pyplot()
    try:
        fig.tight_layout()
        # rendered in memory, then each file written atomically: a kill never leaves half a figure
        # (bbox "tight": legends placed outside the axes are kept in the file)
        png, svg = io.BytesIO(), io.BytesIO()
        fig.savefig(png, format="png", dpi=150, metadata={"Software": None}, bbox_inches="tight")
        fig.savefig(svg, format="svg", metadata={"Creator": None, "Date": None}, bbox_inches="tight")
    finally:
        plt.close(fig)
    fig_dir = make_folder(fig_dir, "figure folder")
    path = fig_dir / f"{name}.png"
    atomic_write_bytes(path, png.getvalue())
    atomic_write_bytes(fig_dir / f"{name}.svg", svg.getvalue())
    return path
