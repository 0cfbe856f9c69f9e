"""Summation: error vs N of summing synthetic gradient streams in every format x strategy, against the bounds.

Each stream is a sequence of micro-gradients g_1, g_2, ... (vectors of ``elements`` entries).  Every
buffer format x strategy sums the same format-rounded addends x_i = RN(g_i); at every power of two
N up to ``n_max`` the buffer is compared with the *exact* sum S = sum_i x_i of those same rounded
addends (a double-double, :class:`~precision_lab.Accumulator` ``"exact"``), so the error measured is
accumulation rounding alone: input quantisation is common to all strategies and not part of it.

Streams (mean / spread is the per-element signal-to-noise ratio of one micro-gradient):

* ``constant``: every addend 1.  Pure stagnation: the naive buffer stops at exactly
  ``theory.stagnation_count(fmt, 1) = 2**t`` (256 for bf16), recorded as ``predicted_stall``.
* ``positive``: gaussian, mean +1 in every entry, spread 0.25 (SNR 4): the sum grows like N.
* ``low_snr``: gaussian, mean 0.05 with random signs, spread 1 (SNR 0.05, as real gradients: the
  signal is small against the micro-batch noise; the sum grows like sqrt(N) before 0.05 N wins).
* ``student_t``: as ``low_snr`` with Student-t noise, df = 3 (heavy tails).
* ``sparse``: as ``low_snr``, each entry nonzero with probability 0.1 (scaled by 1/0.1).

The streams come from :func:`precision_lab.workloads.make_stream`; each (stream, trial) has its own
seeded generator (:func:`~precision_lab.sweep.stable_seed`), so every format sees the same fp64 draws.

Bounds on the relative L2 error.  For one entry j, recursive summation and its variants satisfy
``|E_j| <= c(n, u) A_j`` with ``A_j = sum_i |x_ij|`` (the ``abs_sum`` of :mod:`precision_lab.theory`),
where the coefficient ``c`` is the theory function evaluated at ``abs_sum = 1``.  Over the vector,
``||E||_2**2 = sum_j E_j**2 <= c**2 sum_j A_j**2``, so ``||E||_2 <= c ||A||_2`` and

    rel_l2_error = ||computed - S||_2 / ||S||_2  <=  c(n, u) * kappa,   kappa = ||A||_2 / ||S||_2 >= 1,

``kappa`` (column ``sum_condition``) being the condition number of the vector sum in this norm
(1 for a positive stream; large for low SNR, where the addends cancel).  A probabilistic bound that
holds for each entry with probability at least Q holds for all m entries at once, hence for the norm,
with probability at least ``1 - m (1 - Q)`` (a union bound: no independence between entries is
assumed); that number, clipped at 0, is the stated ``*_confidence``.  The columns:

* ``bound_worst_case``: ``gamma_{n-1}(u)`` (Higham (4.4)), the worst case of recursive summation with
  round-to-nearest.  Rigorous for ``naive``, and for ``pairwise`` (whose ``gamma_{ceil(log2 n)}`` is
  smaller); *not* claimed for ``kahan`` (whose own bound exceeds it at small n) nor for
  ``stochastic`` (each SR step errs by up to 2u, so its worst case is ``gamma_{n-1}(2u)``).
* ``bound_probabilistic``: ``gamma~_{n-1}(lam; u) = lam sqrt(n-1) u + O(u**2)`` (Higham & Mary 2019,
  Thm 3.1) with the config's ``lam`` (column ``lam``) and ``bound_probabilistic_confidence``.  It is
  a theorem about a *model* of random, independent rounding errors, which RN need not follow: it is
  expected to hold for the random streams and fails for stagnation (constant addends, errors of one
  sign), e.g. fp16 at N >= 4096.
* ``bound_strategy``: the strategy's own bound: ``naive`` gamma_{n-1}(u); ``kahan``
  :func:`~precision_lab.theory.kahan_sum_bound` (3u + O(n u**2), rigorous for the compensated
  read-out s - c); ``pairwise`` gamma_{ceil(log2 n)}(u); ``stochastic`` Connolly-Higham-Mary 2021,
  ``gamma~_{n-1}(lam; 2u)``, a theorem for SR with no assumption on the data, holding with
  ``bound_strategy_confidence`` (1.0 for the three deterministic bounds).

A bound is ``inf`` (void, not a claim that the error is infinite) where its hypothesis fails: the
theory function returns inf (e.g. ``(n-1) u >= 1``: bf16 from N = 257 on), an addend of the block was
non-finite after rounding (``nonfinite_inputs``; fp8_e4m3 has no Inf and turns addends beyond 448 into
NaN), or the sum may overflow: every partial sum of entry j is at most ``(1 + c) A_j`` in magnitude
while the bound holds, so ``(1 + c) max_j A_j <= max`` keeps every rounding inside the format's range
(Kahan: ``<= max / 2``, headroom for the intermediates ``x + e`` and ``u - s`` of its steps).

Lost updates (``lost_update_fraction``: element-adds that left the buffer unchanged although the
rounded addend was finite and nonzero) are those of :class:`~precision_lab.Accumulator`.  For speed the
naive, kahan and stochastic buffers of all streams of a (format, trial) share one wide buffer (the
cost of an add is mostly per call, not per entry), and their lost updates are counted per stream from
the public state with the Accumulator's definitions: naive and stochastic ``s`` unchanged; kahan
``s`` and the read-out ``s - c`` unchanged (the same as ``s`` and ``c`` unchanged unless c moves by
less than half an fp64 ulp of s, ~2^-53 |s|, which takes an addend and a compensation some 2^45
times smaller than the sum).  Pairwise buffers are one per stream and count their own (absorption in
any merge of the cascade).  The tests check these counts against one Accumulator per stream.

Computing and plotting are separate: ``run`` writes ``results.csv`` + ``metadata.json`` (resumable,
shardable: one task per trial x format); ``plot`` only reads them and draws ``summation.png`` (bf16 and
fp16, every bound of bf16, lost updates) and ``summation_formats.png`` (every format).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from precision_lab import Accumulator, get_format, metrics, round_nearest, theory
from precision_lab.accumulators import work_dtype
from precision_lab.formats import Format
from precision_lab.plotting import FORMAT_STYLES, STRATEGY_COLORS, buffer_style, pyplot, save_figure
from precision_lab.results import read_csv
from precision_lab.sweep import power_grid, run_tasks, stable_seed
from precision_lab.workloads import make_stream

NAME = "summation"
STRATEGIES: tuple[str, ...] = ("naive", "kahan", "stochastic", "pairwise")  # "exact" is the reference
#: stream name -> (workload kind, parameters); the signal of "positive" is +mean everywhere (no signs)
STREAMS: dict[str, tuple[str, dict[str, float]]] = {
    "constant": ("constant", {}),
    "positive": ("gaussian", {"mean": 1.0, "spread": 0.25}),
    "low_snr": ("gaussian", {"mean": 0.05, "spread": 1.0}),
    "student_t": ("student_t", {"mean": 0.05, "spread": 1.0, "df": 3.0}),
    "sparse": ("sparse", {"mean": 0.05, "spread": 1.0, "density": 0.1}),
}
BOUND_COLUMNS = (
    "sum_condition",
    "lam",
    "bound_worst_case",
    "bound_probabilistic",
    "bound_probabilistic_confidence",
    "bound_strategy",
    "bound_strategy_confidence",
)
COLUMNS = (
    "experiment",
    "stream",
    "buffer_format",
    "strategy",
    "n_accum",
    "elements",
    "trial",
    "seed",
    *metrics.METRIC_NAMES,
    "nonfinite_inputs",
    "predicted_stall",
    *BOUND_COLUMNS,
)


@dataclass(frozen=True)
class Config:
    """What to sweep.

    Cost (CPU seconds of one process, ``torch.set_num_threads(1)``, on a 2-core machine shared with 4
    other jobs, ``PRECISION_LAB_NATIVE=0``): ``quick()`` 16 s (17.5 s wall); the full config is 6 tasks
    (one per format) of 65,536 adds, timed at n_max = 2^12 (17.5 s) and 2^14 (70.9 s: linear in N),
    so about 285 s (4.8 min) in all.  One add is one call per strategy for all streams at once, plus
    one pairwise buffer per stream, so ``elements`` costs little and ``n_max``, ``formats``, ``streams``
    and ``trials`` set the time; per add, tf32 costs ~3x bf16 and fp8 ~1.5x (rounding emulated).
    Memory: a trial's draws are kept for all its formats (n_max x streams x elements fp64, 0.54 GB
    for the full config).  With the numba kernels on (the default), bf16 stochastic rounding of
    these small buffers goes through the compiled kernel whatever its size (``rounding._finish_sr_bf16``),
    whose per-call overhead makes the quick run 44 s instead of 16 s (the same bytes).
    """

    formats: tuple[str, ...] = ("bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "tf32", "fp32")  # buffer formats
    strategies: tuple[str, ...] = STRATEGIES  # accumulation strategies ("exact" is always the reference)
    streams: tuple[str, ...] = ("constant", "positive", "low_snr", "student_t")  # see STREAMS
    n_max: int = 2**16  # largest accumulation count N; every power of two up to it is recorded
    elements: int = 256  # gradient entries per micro-gradient, per stream (each an independent scalar stream)
    trials: int = 1  # independent draws of every stream (and stochastic-rounding seeds)
    lam: float = 8.0  # lambda of the probabilistic bounds (their confidence is recorded per row)

    def __post_init__(self) -> None:
        for name in ("formats", "strategies", "streams"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(set(value)) != len(value):
                raise ValueError(f"{name} must be a tuple without repeats, got {value!r}")
        for f in self.formats:
            get_format(f)  # ValueError naming the unknown format
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad:
            raise ValueError(f"unknown strategy {bad[0]!r}; known: {', '.join(STRATEGIES)} (exact is the reference)")
        bad = [s for s in self.streams if s not in STREAMS]
        if bad or not self.streams:
            raise ValueError(f"unknown stream {(bad or [None])[0]!r} in {self.streams!r}; known: {', '.join(STREAMS)}")
        for name in ("n_max", "elements", "trials"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        lam = self.lam
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not 0 < lam < math.inf:
            raise ValueError(f"lam must be a finite number > 0, got {lam!r}")

    @classmethod
    def quick(cls) -> Config:
        """N up to 2^12 (fp16's stall at 2048 included), every format but fp32: 16 s on one core."""
        return cls(formats=("bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "tf32"), n_max=2**12)

    def tasks(self) -> list[dict[str, Any]]:
        """One task per (trial, format); all streams and strategies share its pass over N.

        Trial-major order, so that a process (or shard) runs the formats of one trial in a row and
        draws the trial's streams once.
        """
        return [{"trial": t, "buffer_format": f} for t in range(self.trials) for f in self.formats]


# --------------------------------------------------------------------------------------------------
# streams
# --------------------------------------------------------------------------------------------------
def data_seed(seed: int, stream: str, trial: int) -> int:
    """The seed of one (stream, trial)'s draws: the same for every format."""
    return stable_seed(seed, NAME, stream, trial, "data")


def stream_chunks(stream: str, elements: int, n_max: int, seed: int, chunk: int = 256) -> Iterator[torch.Tensor]:
    """The fp64 micro-gradients of one stream, ``n_max`` rows in all, in chunks of ``chunk`` rows."""
    kind, params = STREAMS[stream]
    if kind == "constant":
        for lo in range(0, n_max, chunk):
            yield torch.ones(min(chunk, n_max - lo), elements, dtype=torch.float64)
        return
    gen = torch.Generator().manual_seed(seed)
    s = make_stream(kind, elements, **params)
    # "positive": every entry's mean is +mean (no random signs), so all addends share one sign
    signal = torch.full((elements,), params["mean"], dtype=torch.float64) if stream == "positive" else s.signal(gen)
    for lo in range(0, n_max, chunk):
        yield s.sample(min(chunk, n_max - lo), signal, gen)


def draw(config: Config, seed: int, trial: int) -> list[torch.Tensor]:
    """Every stream of one trial side by side: chunks of shape (rows, streams x elements), fp64."""
    parts = [stream_chunks(s, config.elements, config.n_max, data_seed(seed, s, trial)) for s in config.streams]
    return [torch.cat(rows, dim=1) for rows in zip(*parts, strict=True)]


# --------------------------------------------------------------------------------------------------
# bounds
# --------------------------------------------------------------------------------------------------
def _norm(x: torch.Tensor) -> float:
    """Euclidean norm in fp64, thread-count independent (fsum of the squares)."""
    return math.sqrt(math.fsum(v * v for v in x.tolist()))


def coefficients(strategy: str, n: int, u: float, lam: float) -> dict[str, tuple[float, float, float]]:
    """Per-entry bound coefficients ``c(n, u)`` (theory at abs_sum = 1): name -> (c, Q, headroom).

    ``Q`` is the per-entry probability (1 for deterministic bounds), ``headroom`` the factor by which
    ``(1 + c) max A`` must stay below the format's max (2 for Kahan's intermediates).
    """
    worst = theory.recursive_sum_bound(n, u, 1.0)
    own = {
        "naive": (worst, 1.0, 1.0),
        "kahan": (theory.kahan_sum_bound(n, u, 1.0), 1.0, 2.0),
        "pairwise": (theory.pairwise_sum_bound(n, u, 1.0), 1.0, 1.0),
        "stochastic": (
            theory.stochastic_rounding_sum_bound(n, u, 1.0, lam),
            theory.stochastic_rounding_bound_probability(n, u, lam),
            1.0,
        ),
    }[strategy]
    return {
        "worst_case": (worst, 1.0, 1.0),
        "probabilistic": (
            theory.probabilistic_sum_bound(n, u, 1.0, lam),
            theory.probabilistic_bound_probability(n, u, lam),
            1.0,
        ),
        "strategy": own,
    }


def relative_bound(
    c: float, headroom: float, fmt: Format, norm_abs: float, norm_sum: float, max_abs: float, bad_inputs: int
) -> float:
    """``c * ||A|| / ||S||``, or inf where the bound is void (module docstring)."""
    if bad_inputs or not math.isfinite(c) or (1.0 + c) * max_abs * headroom > fmt.max:
        return math.inf
    if c == 0.0 or norm_abs == 0.0:  # one addend (nothing rounded) or all addends zero: exact
        return 0.0
    return math.inf if norm_sum == 0.0 else c * (norm_abs / norm_sum)


def confidence(q: float, elements: int) -> float:
    """Probability that a per-entry bound of probability ``q`` holds for all entries: ``1 - m (1 - q)``."""
    return max(0.0, 1.0 - elements * (1.0 - q))


# --------------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------------
def _unchanged(now: torch.Tensor, before: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Element-adds that left a stored number unchanged (the Accumulator's lost-update test)."""
    return (now == before) & live & torch.isfinite(before)


def measure_task(
    config: Config, fmt_name: str, trial: int, seed: int, device: str = "cpu", chunks: list[torch.Tensor] | None = None
) -> list[dict[str, Any]]:
    """Sum every stream of one (format, trial) in every strategy; one row per (stream, strategy, N).

    ``chunks`` are the trial's draws (:func:`draw`, computed here if None); they do not depend on
    the format, so ``run`` reuses them across the formats of a trial.
    """
    fmt = get_format(fmt_name)
    streams, m = config.streams, config.elements
    blocks, width = len(streams), len(streams) * config.elements
    record = set(power_grid(config.n_max))
    seeds = {s: data_seed(seed, s, trial) for s in streams}
    chunks = draw(config, seed, trial) if chunks is None else chunks
    # One wide buffer per strategy over all streams (count_lost=False: counted per stream below) ...
    wide = {
        s: Accumulator(
            s,
            fmt,
            (width,),
            device=device,
            count_lost=False,
            generator=torch.Generator(device=device).manual_seed(stable_seed(seed, NAME, fmt.name, s, trial)),
        )
        for s in config.strategies
        if s != "pairwise"
    }
    # ... except pairwise, whose lost updates (absorption inside the cascade) only the buffer counts.
    pair = (
        [Accumulator("pairwise", fmt, (m,), device=device) for _ in streams] if "pairwise" in config.strategies else []
    )
    # The reference: the exact sums of the rounded addends and of their magnitudes, side by side.
    exact = Accumulator("exact", "fp64", (2 * width,), device=device)
    before = {s: acc.raw_sum() for s, acc in wide.items()}
    readout = {"kahan": wide["kahan"].value()} if "kahan" in wide else {}
    lost = {s: torch.zeros(blocks, dtype=torch.int64, device=device) for s in wide}
    bad_before = torch.zeros(blocks, dtype=torch.int64, device=device)  # non-finite addends of earlier chunks
    dtype = work_dtype(fmt)
    rows: list[dict[str, Any]] = []
    n = 0
    for chunk in chunks:
        x = round_nearest(chunk.to(device), fmt)  # input quantisation, once for all buffers
        finite = torch.isfinite(x)
        live = finite & (x != 0)  # the addends whose loss counts
        bad = bad_before + (~finite).view(x.shape[0], blocks, m).sum(dim=2).cumsum(dim=0)  # up to each row
        x_ref = torch.where(finite, x, 0.0)  # a non-finite addend voids its block's bounds (nonfinite_inputs)
        both = torch.cat([x_ref, x_ref.abs()], dim=1)
        x_work = x.to(dtype)  # exact: format numbers are numbers of the work dtype
        for i in range(x.shape[0]):
            n += 1
            exact.add(both[i])
            for s, acc in wide.items():
                acc.add(x_work[i])
                now = acc.raw_sum()
                gone = _unchanged(now, before[s], live[i])
                if s == "kahan":  # s and c both unchanged: s and the read-out s - c unchanged
                    out = acc.value()
                    gone &= out == readout[s]
                    readout[s] = out
                lost[s] += gone.view(blocks, m).sum(dim=1)
                before[s] = now
            for b, acc in enumerate(pair):
                acc.add(x_work[i, b * m : (b + 1) * m])
            if n in record:
                rows += _measure(config, fmt, trial, seeds, n, exact.value(), wide, pair, lost, bad[i])
        bad_before = bad[-1]
    order = {(s, g): k for k, (s, g) in enumerate((s, g) for s in streams for g in config.strategies)}
    rows.sort(key=lambda r: (order[(r["stream"], r["strategy"])], r["n_accum"]))
    return rows


def _measure(
    config: Config,
    fmt: Format,
    trial: int,
    seeds: dict[str, int],
    n: int,
    both: torch.Tensor,
    wide: dict[str, Accumulator],
    pair: list[Accumulator],
    lost: dict[str, torch.Tensor],
    bad_inputs: torch.Tensor,
) -> list[dict[str, Any]]:
    """The rows of every (stream, strategy) at accumulation count ``n``."""
    m, width = config.elements, len(config.streams) * config.elements
    ref_all, abs_all = both[:width], both[width:]
    values = {s: acc.value() for s, acc in wide.items()}
    u = fmt.unit_roundoff
    coeffs = {s: coefficients(s, n, u, config.lam) for s in config.strategies}
    rows = []
    for b, stream in enumerate(config.streams):
        block = slice(b * m, (b + 1) * m)
        ref, absum = ref_all[block], abs_all[block]
        norm_sum, norm_abs, max_abs = _norm(ref), _norm(absum), float(absum.max())
        bad = int(bad_inputs[b])
        kappa = norm_abs / norm_sum if norm_sum else (1.0 if norm_abs == 0 else math.inf)
        stall = theory.stagnation_count(fmt, 1.0) if stream == "constant" else ""
        for strategy in config.strategies:
            if strategy == "pairwise":
                acc = pair[b]
                value, lost_here = acc.value(), acc.lost_updates
            else:
                value, lost_here = values[strategy][block], int(lost[strategy][b])
            row = {
                "experiment": NAME,
                "stream": stream,
                "buffer_format": fmt.name,
                "strategy": strategy,
                "n_accum": n,
                "elements": m,
                "trial": trial,
                "seed": seeds[stream],
                "nonfinite_inputs": bad,
                "predicted_stall": stall,
                "sum_condition": kappa,
                "lam": config.lam,
                **metrics.compare(value, ref, fmt, lost_updates=lost_here, element_adds=n * m),
            }
            for name, (c, q, headroom) in coeffs[strategy].items():
                row[f"bound_{name}"] = relative_bound(c, headroom, fmt, norm_abs, norm_sum, max_abs, bad)
                if name != "worst_case":
                    row[f"bound_{name}_confidence"] = confidence(q, m)
            rows.append(row)
    return rows


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

    @functools.lru_cache(maxsize=1)  # one trial's draws (n_max x streams x elements fp64) at a time
    def draws(trial: int) -> list[torch.Tensor]:
        return draw(config, seed, trial)

    def work(task: dict[str, Any]) -> list[dict[str, Any]]:
        return measure_task(config, task["buffer_format"], task["trial"], seed, device, draws(task["trial"]))

    return run_tasks(
        NAME,
        out_dir,
        config.tasks(),
        work,
        columns=COLUMNS,
        config=dataclasses.asdict(config),
        seed=seed,
        device=device,
        shard=shard,
        progress=progress,
    )


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------
#: the bounds drawn (relative: coefficient times kappa): label -> (strategy whose rows hold it, column, grey, marker)
BOUND_LINES: dict[str, tuple[str, str, str, str]] = {
    r"worst case $\gamma_{N-1}$ (naive; rigorous)": ("naive", "bound_worst_case", "#000000", "^"),
    r"$\tilde\gamma_{N-1}(\lambda) \approx \lambda\sqrt{N}u$ (HM19)": ("naive", "bound_probabilistic", "#888888", "s"),
    r"Kahan $3u + O(Nu^2)$ (rigorous)": ("kahan", "bound_strategy", "#000000", "D"),
    r"pairwise $\gamma_{\lceil \log_2 N \rceil}$ (rigorous)": ("pairwise", "bound_strategy", "#888888", "o"),
    r"SR $\approx 2\lambda\sqrt{N}u$ (CHM21 theorem)": ("stochastic", "bound_strategy", "#000000", "v"),
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
    strategy, column, grey, marker = BOUND_LINES[label]
    # relative bounds above 10 say nothing; void ones are inf, and 0 (N = 1) is not drawn
    pts = [
        (n, b)
        for n, b in zip(*_series([r for r in rows if r["strategy"] == strategy], column), strict=True)
        if 0 < b <= 10.0
    ]
    if pts:
        ax.loglog(*zip(*pts, strict=True), color=grey, marker=marker, markersize=size, linewidth=0.7, label=label)


def _select(rows: list[dict[str, str]], **match: str) -> list[dict[str, str]]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _describe(stream: str) -> str:
    """The stream's law in a few words, for panel titles."""
    kind, params = STREAMS[stream]
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
    strategies = [s for s in STRATEGIES if any(r["strategy"] == s for r in rows)]
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
        Line2D([], [], color=g, marker=m, markersize=3, linewidth=0.7, label=lab)
        for lab, (_, _, g, m) in BOUND_LINES.items()
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
    axes[0, -1].legend(
        handles=bounds,
        loc="lower left",
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
