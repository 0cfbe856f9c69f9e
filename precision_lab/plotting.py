"""Figure helpers shared by the experiments: a headless backend and one way to save.

Experiments build their figures from stored results only (``plot(out_dir, fig_dir)``); this module
gives them the pyplot module on the Agg backend and saves a figure with stable bytes (no software
version string in the PNG metadata).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["pyplot", "save_figure", "trial_means"]


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def trial_means(rows: list[dict[str, str]], key: str, column: str) -> list[tuple[int, float]]:
    """``(x, mean of column)`` over the rows (trials) sharing each integer ``x = row[key]``, sorted by x."""
    sums: dict[int, list[float]] = {}
    for r in rows:
        sums.setdefault(int(r[key]), []).append(float(r[column]))
    return [(x, sum(v) / len(v)) for x, v in sorted(sums.items())]


def save_figure(fig: Any, fig_dir: str | Path, name: str) -> Path:
    """Lay out, save as ``fig_dir/name.png`` (120 dpi, no version metadata) and close ``fig``."""
    plt = pyplot()
    fig.tight_layout()
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    path = fig_dir / f"{name}.png"
    fig.savefig(path, dpi=120, metadata={"Software": None})  # no version string: stable bytes
    plt.close(fig)
    return path
