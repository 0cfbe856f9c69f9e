"""Memory Pareto: buffer bytes per parameter vs accumulated-gradient error, at N = 16, 256 and 4096.

Which accumulation buffer buys the most accuracy per byte?  A bf16 Kahan buffer (sum and
compensation, 2 + 2 bytes) costs what an fp32 buffer costs: which wins?

**Errors.**  A fixed effective batch of E samples is split into N micro-batches of E/N; the
micro-gradients are computed in fp32 (``compute_format``) and fed to every buffer of the grid in
one pass (:func:`precision_lab.sweep.fixed_effective`), with ``post`` scaling (sum, then one
division by N, a power of two, in the buffer format).  The error is the relative L2 distance to the
gradient of all E samples computed once in fp64.  The MLP runs at E = 4096 digits (N = 16, 256,
4096, so micro-batches of 256, 16 and 1 sample); the transformer at E = 256 text windows, its
effective batch in the model-gradients experiment (N = 16, 256).  Errors are means over ``trials``
independent batches (each with its own stochastic-rounding seed).

**Two floors per format** (columns): ``quantisation_floor`` is the fp64 truth rounded once to the
buffer format; ``input_floor`` is the exact (double-double) sum of the micro-gradients *after*
each is rounded to the buffer format, which every strategy does first (``Accumulator.add``), then
scaled by 1/N.  No strategy in a format removes the rounding of its own addends, so
``input_floor`` is what Kahan summation approaches (pairwise, read out as one format number per
parameter, stays above ``quantisation_floor``), and it is why a bf16 Kahan buffer fed
fp32 micro-gradients stays orders of magnitude behind an fp32 buffer of the same size: Kahan cancels
the accumulation rounding, not the input quantisation.  (With micro-gradients computed in bf16 the
addends are already bf16 numbers; both buffers then sit at the compute floor.  Not in the default
grid.)

**Bytes per parameter** (:func:`bytes_per_param`) = storage bytes of one number of the format x
the number of format-sized arrays the strategy keeps per parameter:

* storage: a native dtype's itemsize (fp64 8, fp32 4, bf16 and fp16 2, both fp8 formats 1); a
  custom ``eXmY`` format without a native dtype is assumed stored byte-aligned, in
  ceil((1 + X + Y) / 8) bytes per number (no bit packing across numbers; ``Accumulator``'s
  ``bytes_per_element`` uses the unrounded (1 + X + Y) / 8 instead).  tf32 would count 3 bytes
  under this rule; hardware keeps it in 32-bit registers (not in the default grid).
* arrays: ``naive`` 1; ``stochastic`` 1 (plus one RNG key per *buffer*, not per parameter:
  negligible); ``kahan`` 2 (sum and compensation, both in the format); ``exact`` two fp64 arrays
  (16 bytes whatever the format); ``pairwise`` the most partial sums its binary-counter cascade
  holds at once, which grows with N (:func:`pairwise_partial_sums`).
* the micro-gradient being added (in the compute format) exists for every strategy and is not
  counted.

Pairwise, precisely: after k adds the cascade's occupied slots are the set bits of k (slot j holds
the sum of 2^j addends), so it holds popcount(k) partial sums between adds, and at most
max_{k <= N} popcount(k) = floor(log2(N + 1)) during N adds: 4, 8 and 12 at N = 16, 256, 4096
(reached at k = 15, 255, 4095; only one sum remains at k = N).  That count assumes each merge is
done in place (the incoming addend is merged into slot 0, the carry into the next slot, freeing
the lower one).  The emulation in :mod:`precision_lab.accumulators` merges out of place and keeps a
list of floor(log2 N) + 1 slot positions, one more than the live sums at a power-of-two N; its
``Accumulator.arrays`` reports those positions (5, 9, 13).  ``arrays`` here is the live peak.

``emulated_bytes_per_param`` is what this emulation stores for the same arrays: the fp8 formats
and custom formats without a native dtype live in a wider work dtype (fp32 for fp8), and
``exact`` in fp64 (transient temporaries not counted).

**Pareto front** (:func:`pareto_front`): for one (workload, N), the buffers that no other buffer
beats on both bytes and trial-mean error; on the figure, errors within 5% (``FRONT_RTOL``) are ties,
so a buffer that costs more must be more than 5% more accurate to be on the front.

**Read-outs.**  Kahan's error is that of its compensated read-out ``s - c`` (formed in fp64, as
``Accumulator.value`` does), which can go below the format's ``quantisation_floor``; an optimizer
that reads only the bf16 sum ``s`` sees at least that floor (about 1.7e-3 for bf16 here).
Pairwise, naive and stochastic read out one format number per parameter.

``run`` writes ``results.csv`` + ``metadata.json`` (resumable, shardable); ``plot`` only reads them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from precision_lab import metrics
from precision_lab.accumulators import STRATEGIES, work_dtype
from precision_lab.formats import get_format
from precision_lab.gradients import split
from precision_lab.plotting import PALETTE, STRATEGY_COLORS, pyplot, save_figure
from precision_lab.results import read_csv
from precision_lab.sweep import TrialData, fixed_effective, run_tasks, stable_seed

NAME = "memory-pareto"
COLUMNS = (
    "experiment",
    "workload",
    "compute_format",
    "buffer_format",
    "strategy",
    "scaling",
    "n_accum",
    "micro_batch",
    "effective_batch",
    "trial",
    "seed",
    "arrays",
    "bytes_per_param",
    "emulated_bytes_per_param",
    *metrics.METRIC_NAMES,
    "quantisation_floor",
    "input_floor",
)

# Every buffer a reader would consider at 1 to 16 bytes per parameter.
DEFAULT_BUFFERS: tuple[tuple[str, str], ...] = (
    ("fp64", "naive"),
    ("fp64", "exact"),
    ("fp32", "naive"),
    ("fp32", "kahan"),
    ("fp32", "stochastic"),
    ("fp32", "pairwise"),
    ("bf16", "naive"),
    ("bf16", "kahan"),
    ("bf16", "stochastic"),
    ("bf16", "pairwise"),
    ("fp16", "naive"),
    ("fp16", "kahan"),
    ("fp16", "stochastic"),
    ("fp16", "pairwise"),
    ("fp8_e4m3", "naive"),
    ("fp8_e4m3", "kahan"),
    ("fp8_e4m3", "stochastic"),
    ("fp8_e4m3", "pairwise"),
    ("fp8_e5m2", "naive"),
    ("fp8_e5m2", "kahan"),
    ("fp8_e5m2", "stochastic"),
    ("fp8_e5m2", "pairwise"),
)


# --------------------------------------------------------------------------------------------------
# bytes per parameter
# --------------------------------------------------------------------------------------------------
def _check_n(n_accum: int) -> int:
    if isinstance(n_accum, bool) or not isinstance(n_accum, int) or n_accum < 1:
        raise ValueError(f"the accumulation count N must be an integer >= 1, got {n_accum!r}")
    return n_accum


def _check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    return strategy


def storage_bytes(fmt: str) -> int:
    """Bytes of one stored number: the native dtype's itemsize, else ceil(bits / 8) (byte-aligned)."""
    f = get_format(fmt)
    if f.torch_dtype is not None:
        return torch.empty((), dtype=f.torch_dtype).element_size()
    return math.ceil(f.bits / 8)


def pairwise_partial_sums(n_accum: int) -> int:
    """Most partial sums the pairwise cascade holds during N adds: max_{k<=N} popcount(k) = floor(log2(N+1))."""
    return (_check_n(n_accum) + 1).bit_length() - 1


def buffer_arrays(strategy: str, n_accum: int) -> int:
    """Format-sized arrays per parameter the strategy keeps (pairwise: its live peak over N adds)."""
    _check_n(n_accum)
    if _check_strategy(strategy) == "pairwise":
        return pairwise_partial_sums(n_accum)
    return 2 if strategy in ("kahan", "exact") else 1


def bytes_per_param(fmt: str, strategy: str, n_accum: int) -> int:
    """Nominal buffer bytes per parameter: ``buffer_arrays`` x ``storage_bytes`` (exact: two fp64)."""
    arrays = buffer_arrays(strategy, n_accum)
    return arrays * (8 if strategy == "exact" else storage_bytes(fmt))


def emulated_bytes_per_param(fmt: str, strategy: str, n_accum: int) -> int:
    """Bytes per parameter this emulation stores for the same arrays (fp8 lives in fp32, exact in fp64)."""
    arrays = buffer_arrays(strategy, n_accum)
    dtype = torch.float64 if strategy == "exact" else work_dtype(get_format(fmt))
    return arrays * torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------------
# Pareto front
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
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"rtol must be a finite number >= 0, got {rtol!r}")
    pts = list(points)
    for key, b, _ in pts:
        if not (math.isfinite(b) and b >= 0):
            raise ValueError(f"bytes of {key!r} must be finite and >= 0, got {b!r}")
    ok = [p for p in pts if not math.isnan(p[2])]
    f = 1.0 + rtol

    def dominated(p: tuple[Hashable, float, float]) -> bool:
        return any(q[1] <= p[1] and q[2] <= p[2] * f and (q[1] < p[1] or q[2] * f < p[2]) for q in ok)

    return sorted((p for p in ok if not dominated(p)), key=lambda p: (p[1], p[2], str(p[0])))


def summarise(
    rows: Sequence[dict[str, str]], *, rtol: float = FRONT_RTOL
) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Trial means per (workload, N) and buffer: format, strategy, bytes, error, floors, on_front.

    Rows are those of ``results.csv`` (strings); ``on_front``: on :func:`pareto_front` with ``rtol``.
    Each list is sorted by (bytes, format, strategy).
    """
    groups: dict[tuple[str, int], dict[tuple[str, str], list[dict[str, str]]]] = {}
    for r in rows:
        panel = groups.setdefault((r["workload"], int(r["n_accum"])), {})
        panel.setdefault((r["buffer_format"], r["strategy"]), []).append(r)
    out = {}
    for panel, buffers in sorted(groups.items()):
        entries = []
        for (fmt, strategy), rs in buffers.items():

            def mean(col: str, rs: list[dict[str, str]] = rs) -> float:
                return sum(float(r[col]) for r in rs) / len(rs)

            entries.append(
                {
                    "buffer_format": fmt,
                    "strategy": strategy,
                    "bytes": float(rs[0]["bytes_per_param"]),
                    "error": mean("rel_l2_error"),
                    "input_floor": mean("input_floor"),
                    "quantisation_floor": mean("quantisation_floor"),
                    "trials": len(rs),
                }
            )
        front = {
            k
            for k, _, _ in pareto_front(
                (((e["buffer_format"], e["strategy"]), e["bytes"], e["error"]) for e in entries), rtol=rtol
            )
        }
        for e in entries:
            e["on_front"] = (e["buffer_format"], e["strategy"]) in front
        out[panel] = sorted(entries, key=lambda e: (e["bytes"], e["buffer_format"], e["strategy"]))
    return out


# --------------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """What to sweep: every buffer at each (workload, N) of a fixed effective batch.

    Cost, measured on one core of a 2-core machine shared with other workers (load 2-7):
    ``quick()`` 4 s (plus 3 s for the figure); the full config 5 min 40 s (MLP N = 4096: 66-96 s
    per trial, 22 buffers plus 5 floor accumulators on 26k parameters; transformer N = 256: ~19 s
    per trial; the rest ~30 s).
    """

    workloads: tuple[str, ...] = ("mlp", "transformer")  # see precision_lab.workloads
    effective_batch: tuple[int, ...] = (4096, 256)  # E per workload (samples; text windows)
    n_accum: tuple[tuple[int, ...], ...] = ((16, 256, 4096), (16, 256))  # N per workload; each divides E
    size: str = "full"  # workload size preset ("full" or "quick")
    compute_format: str = "fp32"  # precision of the micro-gradients (see precision_lab.gradients)
    buffers: tuple[tuple[str, str], ...] = DEFAULT_BUFFERS  # (buffer format, strategy)
    trials: int = 3  # independent batches (and stochastic-rounding seeds)
    method: str = "vmap"  # micro-gradients by "vmap" or "loop" (bit-identical for these workloads)
    chunk_size: int = 64  # most micro-batches per vmap call (fixed, so the bytes never vary)
    chunk_samples: int = 256  # most samples per vmap call (bounds memory for large micro-batches)
    warmup_steps: int | None = None  # fp32 Adam steps before measuring (None: workload default)

    @classmethod
    def quick(cls) -> Config:
        """Seconds on one core: small models, E = 256 digits (N = 16, 256), 32 text windows (N = 4, 32)."""
        return cls(effective_batch=(256, 32), n_accum=((16, 256), (4, 32)), size="quick", trials=2)

    def floor_buffers(self) -> list[tuple[str, str]]:
        """``(format, "exact")`` per buffer format: the exact sum of the addends rounded to that format."""
        formats = dict.fromkeys(get_format(f).name for f, _ in self.buffers)
        return [(f, "exact") for f in formats if (f, "exact") not in self.buffers]

    def tasks(self) -> list[dict[str, Any]]:
        """One task per (workload, N, trial); every buffer shares its pass.  Validates the config."""
        if not len(self.workloads) == len(self.effective_batch) == len(self.n_accum):
            raise ValueError(
                f"effective_batch {self.effective_batch} and n_accum {self.n_accum} need one entry "
                f"per workload {self.workloads}"
            )
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"trials must be an integer >= 1, got {self.trials!r}")
        if not self.buffers:
            raise ValueError("buffers is empty: give at least one (format, strategy)")
        for fmt, strategy in self.buffers:
            emulated_bytes_per_param(fmt, strategy, 1)  # unknown format or strategy: ValueError naming it
        names = [(get_format(f).name, s) for f, s in self.buffers]
        if len(set(names)) != len(names):
            raise ValueError(f"buffers {self.buffers} name a (format, strategy) twice")
        for e, ns in zip(self.effective_batch, self.n_accum, strict=True):
            if not ns:
                raise ValueError(f"n_accum for effective batch {e} is empty")
            for n in ns:
                split(e, n)  # N < 1 or N not dividing E: ValueError naming both
        return [
            {"workload": w, "n_accum": n, "trial": t}
            for w, ns in zip(self.workloads, self.n_accum, strict=True)
            for n in ns
            for t in range(self.trials)
        ]


def run(
    config: Config,
    out_dir: str | Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> Path | None:
    """Run (or resume) the sweep; returns ``results.csv`` once the whole grid is done."""
    tasks = config.tasks()  # validate before building anything
    trials = TrialData.for_config(config, seed=seed, device=device)
    batch = trials.effective_batch

    buffers = [(get_format(f).name, s) for f, s in config.buffers]
    measured_buffers = [*buffers, *config.floor_buffers()]

    def work(task: dict[str, Any]) -> list[dict[str, Any]]:
        w, n, trial = task["workload"], task["n_accum"], task["trial"]
        x, y, ref, data_seed = trials.data(w, trial)
        sr_seed = stable_seed(seed, w, config.compute_format, n, trial, "post")  # the buffers' stochastic rounding
        # post scaling: sum the undivided micro-gradients, divide the buffer by N (a power of two: exact
        # unless it underflows) once, in the buffer format
        measured = fixed_effective(
            trials.engine(w, config.compute_format), x, y, ref, n, measured_buffers, scaling="post", seed=sr_seed
        )
        # input floor: the exact sum of the addends rounded to the format (what add() rounds them to first)
        floor = {r["buffer_format"]: r["rel_l2_error"] for r in measured if r["strategy"] == "exact"}
        rows = []
        for r in measured:
            fmt, strategy = r["buffer_format"], r["strategy"]
            if (fmt, strategy) not in buffers:
                continue  # a floor-only accumulator
            rows.append(
                {
                    "experiment": NAME,
                    "workload": w,
                    "compute_format": config.compute_format,
                    "scaling": "post",
                    "micro_batch": batch[w] // n,
                    "effective_batch": batch[w],
                    "trial": trial,
                    "seed": data_seed,
                    "arrays": buffer_arrays(strategy, n),
                    "bytes_per_param": bytes_per_param(fmt, strategy, n),
                    "emulated_bytes_per_param": emulated_bytes_per_param(fmt, strategy, n),
                    **r,
                    "input_floor": floor[fmt],
                }
            )
        return rows

    return run_tasks(
        NAME,
        out_dir,
        tasks,
        work,
        columns=COLUMNS,
        config=dataclasses.asdict(config),
        seed=seed,
        device=device,
        shard=shard,
        progress=progress,
    )


# --------------------------------------------------------------------------------------------------
# the figure
# --------------------------------------------------------------------------------------------------
FORMAT_MARKERS: dict[str, str] = {"fp64": "D", "fp32": "o", "bf16": "s", "fp16": "^", "fp8_e4m3": "v", "fp8_e5m2": "<"}
_OTHER_MARKERS = ("P", "X", "h", "*", "p", ">")
_FLOOR_STYLES = {"bf16": "--", "fp16": ":"}  # the input floors drawn (the 2-byte formats; fp32's is fp64 exact)


def _markers(formats: Iterable[str]) -> dict[str, str]:
    others = iter(_OTHER_MARKERS)
    return {f: FORMAT_MARKERS[f] if f in FORMAT_MARKERS else next(others, "o") for f in formats}


def _annotate_equal_bytes(ax: Any, entries: list[dict[str, Any]]) -> None:
    """The issue's question on the panel: an arrow from bf16 kahan down to fp32 naive (same bytes)."""
    by = {(e["buffer_format"], e["strategy"]): e for e in entries}
    a, b = by.get(("fp32", "naive")), by.get(("bf16", "kahan"))
    if a is None or b is None or not (math.isfinite(a["error"]) and math.isfinite(b["error"])) or a["error"] <= 0:
        return
    x = a["bytes"] * 2**0.3
    ax.annotate(
        "",
        xy=(x, a["error"]),
        xytext=(x, b["error"]),
        arrowprops={"arrowstyle": "<->", "color": PALETTE["black"], "linewidth": 0.8},
    )
    ratio = b["error"] / a["error"]
    word = "better" if ratio > 1 else "worse"
    ax.text(
        x * 2**0.08,
        math.sqrt(a["error"] * b["error"]),
        f"same {a['bytes']:g} B:\nfp32 naive\n{float(f'{max(ratio, 1 / ratio):.2g}'):,g}x {word}\nthan bf16 kahan",
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
    formats = list(dict.fromkeys(e["buffer_format"] for v in table.values() for e in v))
    strategies = [s for s in STRATEGIES if any(e["strategy"] == s for v in table.values() for e in v)]
    markers = _markers(formats)
    # naive and stochastic buffers of one format often err alike: dodge them apart sideways (x0.9, x1.1)
    dodge = {"naive": 2**-0.13, "stochastic": 2**0.13}
    top = max(e["bytes"] for v in table.values() for e in v)
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
                x = e["bytes"] * dodge.get(e["strategy"], 1.0)
                on = e["on_front"]
                ax.plot(
                    [x],
                    [e["error"]],
                    linestyle="none",
                    marker=markers[e["buffer_format"]],
                    markersize=6.5,
                    color=STRATEGY_COLORS.get(e["strategy"], PALETTE["purple"]),
                    markeredgecolor="black",
                    markeredgewidth=1.1 if on else 0.0,
                    zorder=3,
                )
            best: dict[float, float] = {}  # the staircase: the front's lowest error at each byte count
            for e in entries:
                if e["on_front"]:
                    best[e["bytes"]] = min(e["error"], best.get(e["bytes"], math.inf))
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
                fl = [e["input_floor"] for e in entries if e["buffer_format"] == f]
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
