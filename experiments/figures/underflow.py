"""Figure of the underflow experiment: flushed and subnormal fractions, error vs N; reads ``results.csv`` only."""

from __future__ import annotations

import math
from pathlib import Path

from experiments.underflow import NAME
from precision_lab.lab.plotting import PALETTE, pyplot, save_figure
from precision_lab.lab.results import read_csv
from precision_lab.measure import SCALINGS

__all__ = ["plot"]


def _scale_label(s: float) -> str:
    """``S=1`` (no loss scale), ``S=2^10``, or the number where it is not a power of two."""
    if s == 1.0:
        return "S=1 (none)"
    m, e = math.frexp(s)
    return f"S=2^{e - 1}" if m == 0.5 else f"S={s:g}"


def _by_n(sel: list[dict[str, str]], column: str) -> dict[int, list[float]]:
    """``column`` of the rows ``sel`` as floats, grouped by N (ascending)."""
    out: dict[int, list[float]] = {}
    for r in sel:
        out.setdefault(int(r["n_accum"]), []).append(float(r[column]))
    return dict(sorted(out.items()))


def plot(out_dir: str | Path, fig_dir: str | Path) -> list[Path]:
    """Flushed fraction, subnormal fraction and error vs N per workload x regime (trial means).

    Colour: the loss scale; line style and marker: the 1/N placement.  Points of the curves are
    dodged sideways (at most a fifth of a doubling) and earlier curves are drawn wider, so that
    coinciding values show as nested markers instead of hiding each other.  Fractions of exactly
    0 are drawn hollow, one decade below the smallest positive one (said on the axis).  Non-finite
    results are not averaged: where any trial's accumulated gradient holds inf/NaN, the error panel
    shows an ``x`` in a band at its top (one row per curve) instead of a point.
    """
    plt = pyplot()

    rows = read_csv(Path(out_dir) / "results.csv")
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    regimes = list(dict.fromkeys((r["compute_format"], r["buffer_format"], r["strategy"]) for r in rows))
    scales = sorted({float(r["loss_scale"]) for r in rows})
    scalings = [sc for sc in SCALINGS if any(r["scaling"] == sc for r in rows)]
    series = []  # (scaling, S) of every curve, in drawing order
    for s in scales:
        series += [(sc, s) for sc in scalings]
    colors = dict(
        zip(scales, [PALETTE[c] for c in ("vermillion", "blue", "green", "purple", "orange", "sky")], strict=False)
    )
    style = {"pre": {"linestyle": "-", "marker": "o"}, "post": {"linestyle": "--", "marker": "s"}}
    fractions = ("flushed_fraction", "subnormal_fraction")
    positive = []
    for r in rows:
        positive += [float(r[c]) for c in fractions if float(r[c]) > 0]
    zero_at = 10.0 ** (math.floor(math.log10(min(positive, default=1e-6))) - 1)  # where a fraction of 0 is drawn
    panels = (
        ("flushed_fraction", "flushed to zero\n(fraction of nonzero elements)"),
        ("subnormal_fraction", "arriving subnormal\n(fraction of nonzero elements)"),
        ("rel_l2_error", "relative L2 error\nvs fp64 large batch"),
    )

    fig, axes = plt.subplots(
        len(panels) * len(workloads),
        len(regimes),
        squeeze=False,
        figsize=(4.3 * len(regimes) + 2.2, 2.6 * len(panels) * len(workloads)),
    )
    overflow_seen = False
    for i, w in enumerate(workloads):
        for j, (compute, buffer, strategy) in enumerate(regimes):
            here = [
                r
                for r in rows
                if (r["workload"], r["compute_format"], r["buffer_format"], r["strategy"])
                == (w, compute, buffer, strategy)
            ]
            ax = {m: axes[len(panels) * i + k, j] for k, (m, _) in enumerate(panels)}
            overflowing = []
            for idx, (scaling, s) in enumerate(series):
                sel = [r for r in here if r["scaling"] == scaling and float(r["loss_scale"]) == s]
                if not sel:
                    continue
                dodge = 2.0 ** (0.08 * (idx - (len(series) - 1) / 2))
                nest = len(series) - 1 - idx  # earlier curves drawn wider: coinciding ones show as nested rings
                kw = {
                    "color": colors.get(s, PALETTE["black"]),
                    "markersize": 3 + 0.8 * nest,
                    "linewidth": 1 + 0.3 * nest,
                    "label": f"{scaling}, {_scale_label(s)}",
                    **style[scaling],
                }
                for m in fractions:
                    means = {n * dodge: sum(v) / len(v) for n, v in _by_n(sel, m).items()}
                    ax[m].plot(list(means), [f or zero_at for f in means.values()], **kw)
                    zeros = [n for n, f in means.items() if f == 0]  # hollow markers on the bottom line: exactly 0
                    ax[m].plot(
                        zeros,
                        [zero_at] * len(zeros),
                        linestyle="none",
                        marker=kw["marker"],
                        color=kw["color"],
                        markersize=kw["markersize"],
                        markerfacecolor="white",
                    )
                errors = _by_n(sel, "rel_l2_error")
                nonfinite = _by_n(sel, "nonfinite")
                ok = {
                    n: sum(v) / len(v)
                    for n, v in errors.items()
                    if all(map(math.isfinite, v)) and not any(nonfinite[n])
                }
                ax["rel_l2_error"].plot([n * dodge for n in ok], list(ok.values()), **kw)
                bad = [n * dodge for n in errors if n not in ok]
                if bad:
                    overflowing.append((bad, kw["color"], kw["label"]))
            floor = _by_n(here, "quantisation_floor")
            finite = [float(r["rel_l2_error"]) for r in here if math.isfinite(float(r["rel_l2_error"]))]
            floor_matters = bool(finite) and max(v[0] for v in floor.values()) > min(finite) / 100
            if floor_matters:  # (a negligible floor would only squash the axis)
                ax["rel_l2_error"].plot(
                    list(floor),
                    [v[0] for v in floor.values()],
                    color=PALETTE["black"],
                    linestyle=":",
                    linewidth=0.9,
                    label="fp64 truth rounded to the buffer format",
                )
            e = ax["rel_l2_error"]
            e.set_yscale("log")
            lo, hi = e.get_ylim() if finite else (1e-4, 1e-2)
            if hi / lo < 8:  # at least a factor 8 on the axis: last-digit differences are not blown up
                mid = math.sqrt(lo * hi)
                lo, hi = mid / math.sqrt(8), mid * math.sqrt(8)
            if overflowing:  # a band at the top of the error panel: one row of x per overflowing curve
                overflow_seen = True
                hi *= (hi / lo) ** (0.1 + 0.08 * len(overflowing))
            e.set_ylim(lo, hi)
            if overflowing:
                for k, (ns, color, label) in enumerate(overflowing):
                    y = 0.95 - 0.08 * k
                    e.plot(
                        ns,
                        [y] * len(ns),
                        linestyle="none",
                        marker="x",
                        markersize=6,
                        color=color,
                        markeredgewidth=1.4,
                        transform=e.get_xaxis_transform(),
                    )
                    e.text(0.02, y, f"inf/NaN ({label})", transform=e.transAxes, fontsize=6.5, va="center", color=color)
            ax["flushed_fraction"].set_title(f"{w}: {compute} micro-gradients\n-> {buffer} buffer ({strategy})")
            for m, label in panels:
                a = ax[m]
                a.set_xscale("log", base=2)
                a.set_yscale("log")
                if j == 0:
                    a.set_ylabel(label + (f"\n(exactly 0: hollow, at {zero_at:.0e})" if m in fractions else ""))
                a.set_xlabel("accumulation count N (fixed effective batch)")
    handles, labels = [], []
    for a in axes.flat:  # every curve, even one that is non-finite wherever it has an error
        for h, lab in zip(*a.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if overflow_seen:
        handles.append(plt.Line2D([], [], linestyle="none", marker="x", color=PALETTE["black"], markeredgewidth=1.4))
        labels.append("inf/NaN in the accumulated\ngradient (overflow) in >= 1\ntrial: a labelled row at the top")
    axes[0, -1].legend(
        handles, labels, loc="upper left", bbox_to_anchor=(1.04, 1.0), title="1/N placement, loss scale S"
    )
    fig.suptitle(
        "fp16 underflow vs N: micro-gradient elements flushed to zero or left subnormal, and the error,\n"
        "with the 1/N scaling before (pre) or after (post) accumulation, with and without a static "
        "loss scale S (trial means)"
    )
    return [save_figure(fig, fig_dir, NAME)]
