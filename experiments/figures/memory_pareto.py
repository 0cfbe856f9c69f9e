"""Figure of memory-pareto: error vs buffer bytes per parameter, with the Pareto front; reads results only."""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from precision_lab import STRATEGIES
from precision_lab.checks import check_real
from precision_lab.lab.plotting import PALETTE, STRATEGY_COLORS, pyplot, save_figure
from precision_lab.lab.results import read_csv

__all__ = ["FRONT_RTOL", "BufferSummary", "pareto_front", "plot", "summarise"]

# --------------------------------------------------------------------------------------------------
# the Pareto front of stored results
# --------------------------------------------------------------------------------------------------
# Errors within 5% are ties on the figure's front: more bytes must buy more than 5%.  Below that the
# differences are last digits at the compute floor (fp64 naive vs exact: ~1e-5 relative), far inside
# the spread between trials.
FRONT_RTOL = 0.05


def pareto_front(
    points: Iterable[tuple[Hashable, float, float]], *, rtol: float = 0.0
) -> list[tuple[Hashable, float, float]]:
    """The non-dominated ``(key, bytes, error)`` points, sorted by bytes then error then key.

    q dominates p when q has no more bytes, an error no larger than p's times (1 + rtol), and is
    strictly better in one: fewer bytes, or an error smaller than p's / (1 + rtol).  With
    ``rtol = 0`` this is the usual definition; with ``rtol > 0`` errors within a factor 1 + rtol
    count as ties, so a buffer that costs more is on the front only if it is more than that factor
    more accurate than every cheaper one (the front's errors then fall by more than 1 + rtol per
    step).  Tied points do not dominate each other: duplicates are all kept (hiding one would hide
    a buffer that is just as good).  A NaN error is incomparable and never on the front; an
    infinite error is (only when no cheaper-or-equal point has a smaller error).

    Raises:
        ValueError: A NaN, infinite or negative byte count, or a negative or non-finite rtol.
    """
    check_real(rtol, "rtol", low=0.0, high=math.inf, high_open=True)
    pts = list(points)
    for key, b, _ in pts:
        check_real(b, f"bytes of {key!r}", low=0.0, high=math.inf, high_open=True)
    ok = [p for p in pts if not math.isnan(p[2])]
    f = 1.0 + rtol

    def dominated(p: tuple[Hashable, float, float]) -> bool:
        return any(q[1] <= p[1] and q[2] <= p[2] * f and (q[1] < p[1] or q[2] * f < p[2]) for q in ok)

    return sorted((p for p in ok if not dominated(p)), key=lambda p: (p[1], p[2], str(p[0])))


@dataclass(frozen=True)
class BufferSummary:
    """One buffer at one (workload, N): trial means of what ``results.csv`` holds, and the front."""

    buffer_format: str  # the buffer's format
    strategy: str  # its accumulation strategy
    bytes: float  # nominal buffer bytes per parameter (column bytes_per_param)
    error: float  # trial mean of rel_l2_error
    input_floor: float  # trial mean of input_floor
    quantisation_floor: float  # trial mean of quantisation_floor
    trials: int  # trials averaged
    on_front: bool  # on the Pareto front of its (workload, N), errors within rtol counting as ties


def _trial_mean(rows: list[dict[str, str]], column: str) -> float:
    return sum(float(r[column]) for r in rows) / len(rows)


def summarise(
    rows: Sequence[dict[str, str]], *, rtol: float = FRONT_RTOL
) -> dict[tuple[str, int], list[BufferSummary]]:
    """Trial means per (workload, N) and buffer, each a :class:`BufferSummary`.

    Rows are those of ``results.csv`` (strings); ``on_front``: on :func:`pareto_front` with ``rtol``.
    Each list is sorted by (bytes, format, strategy).
    """
    groups: dict[tuple[str, int], dict[tuple[str, str], list[dict[str, str]]]] = {}
    for r in rows:
        panel = groups.setdefault((r["workload"], int(r["n_accum"])), {})
        panel.setdefault((r["buffer_format"], r["strategy"]), []).append(r)
    out = {}
    for panel, buffers in sorted(groups.items()):
        points = [
            ((fmt, strategy), float(rs[0]["bytes_per_param"]), _trial_mean(rs, "rel_l2_error"))
            for (fmt, strategy), rs in buffers.items()
        ]
        front = {key for key, _, _ in pareto_front(points, rtol=rtol)}
        entries = [
            BufferSummary(
                buffer_format=fmt,
                strategy=strategy,
                bytes=float(rs[0]["bytes_per_param"]),
                error=_trial_mean(rs, "rel_l2_error"),
                input_floor=_trial_mean(rs, "input_floor"),
                quantisation_floor=_trial_mean(rs, "quantisation_floor"),
                trials=len(rs),
                on_front=(fmt, strategy) in front,
            )
            for (fmt, strategy), rs in buffers.items()
        ]
        out[panel] = sorted(entries, key=lambda e: (e.bytes, e.buffer_format, e.strategy))
    return out


# --------------------------------------------------------------------------------------------------
# the figure
# --------------------------------------------------------------------------------------------------
FORMAT_MARKERS: dict[str, str] = {"fp64": "D", "fp32": "o", "bf16": "s", "fp16": "^", "fp8_e4m3": "v", "fp8_e5m2": "<"}
_OTHER_MARKERS = ("P", "X", "h", "*", "p", ">")
_FLOOR_STYLES = {"bf16": "--", "fp16": ":"}  # the input floors drawn (the 2-byte formats; fp32's is fp64 exact)


def _markers(formats: Iterable[str]) -> dict[str, str]:
    others = iter(_OTHER_MARKERS)
    return {f: FORMAT_MARKERS[f] if f in FORMAT_MARKERS else next(others, "o") for f in formats}


def _annotate_equal_bytes(ax: Any, entries: list[BufferSummary]) -> None:
    """The issue's question on the panel: an arrow from bf16 kahan down to fp32 naive (same bytes)."""
    by = {(e.buffer_format, e.strategy): e for e in entries}
    a, b = by.get(("fp32", "naive")), by.get(("bf16", "kahan"))
    if a is None or b is None or not (math.isfinite(a.error) and math.isfinite(b.error)) or a.error <= 0:
        return
    x = a.bytes * 2**0.3
    ax.annotate(
        "",
        xy=(x, a.error),
        xytext=(x, b.error),
        arrowprops={"arrowstyle": "<->", "color": PALETTE["black"], "linewidth": 0.8},
    )
    ratio = b.error / a.error
    word = "better" if ratio > 1 else "worse"
    ax.text(
        x * 2**0.08,
        math.sqrt(a.error * b.error),
        f"same {a.bytes:g} B:\nfp32 naive\n{float(f'{max(ratio, 1 / ratio):.2g}'):,g}x {word}\nthan bf16 kahan",
        fontsize=7,
        va="center",
        ha="left",
    )


def plot(out_dir: str | Path, fig_dir: str | Path) -> list[Path]:
    """Error vs bytes per parameter, one panel per (workload, N), the Pareto front as a step line."""
    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullLocator

    rows = read_csv(Path(out_dir) / "results.csv")
    table = summarise(rows)
    meta = {(r["workload"], int(r["n_accum"])): r for r in rows}
    workloads = list(dict.fromkeys(w for w, _ in table))
    ns = {w: sorted(n for v, n in table if v == w) for w in workloads}
    ncols = max(len(v) for v in ns.values())
    every = list(itertools.chain.from_iterable(table.values()))  # every panel's buffers
    formats = list(dict.fromkeys(e.buffer_format for e in every))
    strategies = [s for s in STRATEGIES if any(e.strategy == s for e in every)]
    markers = _markers(formats)
    # naive and stochastic buffers of one format often err alike: dodge them apart sideways (x0.9, x1.1)
    dodge = {"naive": 2**-0.13, "stochastic": 2**0.13}
    top = max(e.bytes for e in every)
    ticks = [2**k for k in range(math.ceil(math.log2(top)) + 1)]

    # the legend goes in the last row's empty panels if it has any, else in a column of its own
    free = ncols - len(ns[workloads[-1]])
    fig = plt.figure(figsize=(3.9 * ncols + (0 if free else 2.6), 3.8 * len(workloads)))
    grid = fig.add_gridspec(
        len(workloads), ncols + (0 if free else 1), width_ratios=[1] * ncols + ([] if free else [0.66])
    )
    for i, w in enumerate(workloads):
        for j in range(ncols):
            if j >= len(ns[w]):
                continue
            n = ns[w][j]
            entries = table[(w, n)]
            ax = fig.add_subplot(grid[i, j])
            for e in entries:
                x = e.bytes * dodge.get(e.strategy, 1.0)
                on = e.on_front
                ax.plot(
                    [x],
                    [e.error],
                    linestyle="none",
                    marker=markers[e.buffer_format],
                    markersize=6.5,
                    color=STRATEGY_COLORS.get(e.strategy, PALETTE["purple"]),
                    markeredgecolor="black",
                    markeredgewidth=1.1 if on else 0.0,
                    zorder=3,
                )
            best: dict[float, float] = {}  # the staircase: the front's lowest error at each byte count
            for e in entries:
                if e.on_front:
                    best[e.bytes] = min(e.error, best.get(e.bytes, math.inf))
            xs, ys = sorted(best), [best[b] for b in sorted(best)]
            if xs:  # the staircase: the best error up to each byte count (flat beyond the last point)
                ax.step(
                    [*xs, ticks[-1] * 1.25],
                    [*ys, ys[-1]],
                    where="post",
                    color="black",
                    linewidth=1.0,
                    alpha=0.6,
                    zorder=2,
                )
            for f, ls in _FLOOR_STYLES.items():
                fl = [e.input_floor for e in entries if e.buffer_format == f]
                if fl:
                    ax.axhline(fl[0], color="grey", linestyle=ls, linewidth=0.9, zorder=1)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(t) for t in ticks])
            ax.set_xlim(ticks[0] / 1.35, ticks[-1] * 1.25)
            _annotate_equal_bytes(ax, entries)
            r = meta[(w, n)]
            ax.set_title(f"{w}: N = {n} micro-batches of {r['micro_batch']} (E = {r['effective_batch']})", fontsize=9)
            ax.set_xlabel("buffer bytes per parameter")
            if j == 0:
                ax.set_ylabel("relative L2 error vs fp64 large batch")

    colour = [
        Line2D(
            [], [], linestyle="none", marker="o", markersize=7, color=STRATEGY_COLORS.get(s, PALETTE["purple"]), label=s
        )
        for s in strategies
    ]
    colour += [
        Line2D([], [], color="black", alpha=0.6, label="Pareto front"),
        Line2D(
            [],
            [],
            linestyle="none",
            marker="o",
            markersize=7,
            color="white",
            markeredgecolor="black",
            markeredgewidth=1.1,
            label="on the front",
        ),
    ]
    shape = [Line2D([], [], linestyle="none", marker=markers[f], markersize=7, color="grey", label=f) for f in formats]
    shape += [
        Line2D([], [], color="grey", linestyle=ls, label=f"{f} input floor")
        for f, ls in _FLOOR_STYLES.items()
        if f in formats
    ]
    lax = fig.add_subplot(grid[-1, ncols - free :] if free else grid[:, -1])
    lax.axis("off")
    kw = {"fontsize": 8, "title_fontsize": 8, "frameon": False, "alignment": "left"}
    lax.add_artist(lax.legend(handles=colour, loc="upper left", title="colour: strategy", **kw))
    lax.legend(
        handles=shape,
        loc="upper left",
        bbox_to_anchor=(0.5, 1.0) if free else (0.0, 0.68),
        title="marker: buffer format",
        **kw,
    )
    compute = rows[0]["compute_format"]
    note = (
        f"- input floor: each {compute} micro-gradient rounded to\n  the format, then summed exactly (no strategy\n"
        "  in that format beats it)\n- pairwise keeps floor(log2(N+1)) partial sums:\n  its bytes grow with N\n"
        "- front: errors within 5% count as ties\n- naive / stochastic markers dodged left / right\n"
        "  of their byte count; trial means"
    )
    lax.text(0.02, 0.0, note, transform=lax.transAxes, fontsize=7, va="bottom", linespacing=1.35)
    fig.suptitle(
        f"Which buffer buys the most accuracy per byte? Accumulated gradient (micro-gradients in {compute}, "
        "post scaling) vs the fp64 large-batch gradient"
    )
    return [save_figure(fig, fig_dir, "memory_pareto")]
