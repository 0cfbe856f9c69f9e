"""Figures of the summation experiment: error and lost updates vs N, with the bounds; reads results only."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

from experiments.summation import NAME, STREAMS, SWEPT_STRATEGIES
from precision_lab.lab.plotting import FORMAT_STYLES, STRATEGY_COLORS, buffer_style, pyplot, save_figure
from precision_lab.lab.results import read_csv

__all__ = ["BOUND_LINES", "BoundLine", "plot"]


class BoundLine(NamedTuple):
    """How one stored bound is drawn."""

    strategy: str  # the strategy whose rows hold it
    column: str  # its column of results.csv
    grey: str  # line colour
    marker: str  # marker shape


#: the bounds drawn (relative: coefficient times kappa): label -> how
BOUND_LINES: dict[str, BoundLine] = {
    r"worst case $\gamma_{N-1}$ (naive; rigorous)": BoundLine("naive", "bound_worst_case", "#000000", "^"),
    r"$\tilde\gamma_{N-1}(\lambda) \approx \lambda\sqrt{N}u$ (HM19)": BoundLine(
        "naive", "bound_probabilistic", "#888888", "s"
    ),
    r"Kahan $3u + O(Nu^2)$ (rigorous)": BoundLine("kahan", "bound_strategy", "#000000", "D"),
    r"Neumaier $u + O(N^2u^2)$ (rigorous)": BoundLine("neumaier", "bound_strategy", "#000000", "P"),
    r"pairwise $\gamma_{\lceil \log_2 N \rceil}$ (rigorous)": BoundLine("pairwise", "bound_strategy", "#888888", "o"),
    r"SR $\approx 2\lambda\sqrt{N}u$ (CHM21 theorem)": BoundLine("stochastic", "bound_strategy", "#000000", "v"),
}
_OVERFLOW_MARK = {"marker": "x", "markersize": 5, "linestyle": "none"}
_TOP = 1000.0  # top of the error axes: errors and bounds stop at 10, the band above holds the overflow marks
_N_FROM = 2  # N = 1 is a single addend, exact in every strategy: not drawn


def _series(rows: list[dict[str, str]], column: str) -> tuple[list[int], list[float]]:
    """(N, trial mean of ``column``) for N >= 2, sorted; a non-finite trial makes the mean inf."""
    by_n: dict[int, list[float]] = {}
    for r in rows:
        if int(r["n_accum"]) >= _N_FROM:
            by_n.setdefault(int(r["n_accum"]), []).append(float(r[column]))
    ns = sorted(by_n)
    means = [math.fsum(by_n[n]) / len(by_n[n]) if all(map(math.isfinite, by_n[n])) else math.inf for n in ns]
    return ns, means


def _floor(values: list[float]) -> float:
    """A power of ten below every positive finite value: where errors of exactly 0 are drawn."""
    positive = [v for v in values if 0 < v < math.inf]
    return 10.0 ** (math.floor(math.log10(min(positive))) - 1) if positive else 1e-12


def _error_curve(
    ax: Any, ns: list[int], errs: list[float], floor: float, style: dict[str, Any], slot: tuple[int, int]
) -> None:
    """Log-log error curve: 0 drawn at ``floor``; non-finite (overflowed) points as x in the band above 10.

    ``slot = (k, of)``: the curve is the k-th of ``of`` in its panel; their x marks are stacked in the
    band (10, _TOP) so that none hides another.
    """
    ax.loglog(ns, [max(e, floor) if math.isfinite(e) else math.nan for e in errs], **style)
    bad = [n for n, e in zip(ns, errs, strict=True) if not math.isfinite(e)]
    if bad:
        hi, lo = _TOP / 1.6, 16.0
        y = hi * (lo / hi) ** (slot[0] / max(1, slot[1] - 1))
        ax.plot(bad, [y] * len(bad), color=style["color"], **_OVERFLOW_MARK)


def _bound_curve(ax: Any, rows: list[dict[str, str]], label: str, size: float = 3.0) -> None:
    """One bound of BOUND_LINES (trial mean), where it is finite and positive (void bounds are inf)."""
    line = BOUND_LINES[label]
    ns, bounds = _series([r for r in rows if r["strategy"] == line.strategy], line.column)
    # relative bounds above 10 say nothing; void ones are inf, and 0 (N = 1) is not drawn
    pts = [(n, b) for n, b in zip(ns, bounds, strict=True) if 0 < b <= 10.0]
    if pts:
        ax.loglog(
            *zip(*pts, strict=True), color=line.grey, marker=line.marker, markersize=size, linewidth=0.7, label=label
        )


def _select(rows: list[dict[str, str]], **match: str) -> list[dict[str, str]]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _describe(stream: str) -> str:
    """The stream's law in a few words, for panel titles."""
    kind, params = STREAMS[stream].kind, STREAMS[stream].params
    if kind == "constant":
        return "every addend 1"
    sign = "+" if stream == "positive" else "\u00b1"  # positive: all means +; else random signs
    extra = {"student_t": f", df {params.get('df', 0):g}", "sparse": f", density {params.get('density', 0):g}"}
    return f"{kind}, mean {sign}{params['mean']:g}, spread {params['spread']:g}{extra.get(kind, '')}"


def plot(out_dir: str | Path, fig_dir: str | Path) -> list[Path]:
    """``summation.png`` (bf16/fp16, every bound of bf16, lost updates) and ``summation_formats.png`` (all formats)."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    rows = read_csv(Path(out_dir) / "results.csv")
    streams = [s for s in STREAMS if any(r["stream"] == s for r in rows)]
    present = {r["buffer_format"] for r in rows}
    formats = [f for f in ("fp32", "tf32", "fp16", "bf16", "fp8_e5m2", "fp8_e4m3") if f in present]
    formats += sorted(present - set(formats))
    strategies = [s for s in SWEPT_STRATEGIES if any(r["strategy"] == s for r in rows)]
    main = [f for f in ("bf16", "fp16") if f in formats] or formats[:2]
    bound_fmt = main[0]
    lam = float(rows[0]["lam"])
    floor = _floor([float(r["rel_l2_error"]) for r in rows if int(r["n_accum"]) >= _N_FROM])
    xlabel = "accumulation count N"
    kappa_note = r"bounds are relative: coefficient $\times\ \kappa = \|\sum|x_i|\|_2 / \|\sum x_i\|_2$"
    paths = []

    # --- figure 1: bf16 and fp16, every bound of bf16, lost updates ----------------------------------------------
    fig, axes = plt.subplots(
        2,
        len(streams) + 1,
        figsize=(3.6 * len(streams) + 3.4, 7.4),
        squeeze=False,
        gridspec_kw={"width_ratios": [1] * len(streams) + [0.95]},
    )
    for j, stream in enumerate(streams):
        ax_err, ax_lost = axes[0, j], axes[1, j]
        here = _select(rows, stream=stream)
        for label in BOUND_LINES:
            _bound_curve(ax_err, _select(here, buffer_format=bound_fmt), label)
        for fmt in main:
            for k, strategy in enumerate(strategies):
                sel = _select(here, buffer_format=fmt, strategy=strategy)
                style = {**buffer_style(fmt, strategy), "linewidth": 1.6}
                slot = (k + len(strategies) * main.index(fmt), len(strategies) * len(main))
                _error_curve(ax_err, *_series(sel, "rel_l2_error"), floor, style, slot)
                ax_lost.semilogx(*_series(sel, "lost_update_fraction"), **style)
        n_top = max(int(r["n_accum"]) for r in here)
        if stream == "constant":  # where theory says round-to-nearest stops adding 1
            notes = []
            for fmt in main:
                stall = int(_select(here, buffer_format=fmt)[0]["predicted_stall"])  # theory's, stored by run
                if stall < n_top:
                    style = FORMAT_STYLES.get(fmt, "-")
                    ax_lost.axvline(stall, color="#999999", linewidth=0.9, linestyle=style)
                    notes.append(f"{fmt}: N = {stall}")
            if notes:
                ax_lost.text(
                    0.03,
                    0.97,
                    "theory's stall (grey lines)\n" + "\n".join(notes),
                    transform=ax_lost.transAxes,
                    fontsize=7,
                    va="top",
                    color="#444444",
                )
        ax_err.set_title(f"{stream}\n({_describe(stream)})", fontsize=9)
        ax_err.set_ylim(floor / 2, _TOP)
        ax_lost.set_ylim(-0.03, 1.03)
        ax_err.set_xlabel(xlabel)
        ax_lost.set_xlabel(xlabel)
    axes[0, 0].set_ylabel(f"relative L2 error vs exact sum\n(0 drawn at {floor:.0e}; x above 10: overflow)")
    axes[1, 0].set_ylabel("lost-update fraction\n(adds that left the buffer unchanged)")
    handles = [Line2D([], [], color=STRATEGY_COLORS[s], linewidth=2, label=s) for s in strategies]
    handles += [Line2D([], [], color="#333333", linestyle=FORMAT_STYLES.get(f, "-"), label=f"{f} buffer") for f in main]
    handles += [Line2D([], [], color="#333333", label="buffer overflowed", **_OVERFLOW_MARK)]
    bounds = [
        Line2D([], [], color=line.grey, marker=line.marker, markersize=3, linewidth=0.7, label=lab)
        for lab, line in BOUND_LINES.items()
    ]
    for ax in axes[:, -1]:
        ax.axis("off")
    leg = axes[0, -1].legend(
        handles=handles,
        loc="upper left",
        title="measured: strategy (colour), format (line)",
        fontsize=7,
        title_fontsize=7,
        frameon=False,
        alignment="left",
    )
    axes[0, -1].add_artist(leg)
    axes[1, -1].legend(  # its own panel: under the measured legend it overlapped it (one row per strategy)
        handles=bounds,
        loc="upper left",
        fontsize=7,
        title_fontsize=7,
        frameon=False,
        alignment="left",
        title=f"bounds for {bound_fmt} (grey), $\\lambda$ = {lam:g};\n{kappa_note}",
    )
    fig.suptitle(
        f"Summation error of {' and '.join(main)} buffers vs N for {len(streams)} synthetic gradient streams, "
        f"against the theoretical bounds for {bound_fmt}"
    )
    paths.append(save_figure(fig, fig_dir, NAME))

    # --- figure 2: every format (rows), with its worst-case and probabilistic bounds ------------------------------
    fig, axes = plt.subplots(
        len(formats),
        len(streams),
        figsize=(3.2 * len(streams) + 2.6, 1.9 * len(formats) + 1.0),
        squeeze=False,
        sharex=True,
    )
    two = list(BOUND_LINES)[:2]
    for i, fmt in enumerate(formats):
        for j, stream in enumerate(streams):
            ax = axes[i, j]
            here = _select(rows, stream=stream, buffer_format=fmt)
            for label in two:
                _bound_curve(ax, here, label, size=2.5)
            for k, strategy in enumerate(strategies):  # one format per panel: solid lines, colour = strategy
                style = {"color": STRATEGY_COLORS[strategy], "linewidth": 1.3}
                _error_curve(
                    ax, *_series(_select(here, strategy=strategy), "rel_l2_error"), floor, style, (k, len(strategies))
                )
            ax.set_ylim(floor / 2, _TOP)
            if i == 0:
                ax.set_title(f"{stream}\n({_describe(stream)})", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{fmt} buffer\nrel. L2 error", fontsize=8)
            if i == len(formats) - 1:
                ax.set_xlabel(xlabel)
    handles = [Line2D([], [], color=STRATEGY_COLORS[s], linewidth=2, label=s) for s in strategies]
    handles += [b for b in bounds if b.get_label() in two]
    handles.append(Line2D([], [], color="#333333", label="buffer overflowed", **_OVERFLOW_MARK))
    axes[0, -1].legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.04, 1.0),
        fontsize=7,
        frameon=False,
        title=f"bounds of the row's format,\n$\\lambda$ = {lam:g}",
        title_fontsize=7,
        alignment="left",
    )
    fig.suptitle(
        f"Relative L2 error vs the exact sum of the rounded addends, every buffer format (rows); 0 drawn at {floor:.0e}"
    )
    paths.append(save_figure(fig, fig_dir, f"{NAME}_formats"))
    return paths
