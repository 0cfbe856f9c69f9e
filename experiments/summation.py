"""Summation: error vs N of summing synthetic gradient streams in every format x strategy, against the bounds.

Each stream is a sequence of micro-gradients g_1, g_2, ... (vectors of ``elements`` entries).  Every
buffer format x strategy sums the same format-rounded addends x_i = RN(g_i); at every power of two
N up to ``n_max`` the buffer is compared with the *exact* sum S = sum_i x_i of those same rounded
addends (a superaccumulator, :class:`~precision_lab.Accumulator` ``"exact"``), so the error measured is
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
seeded generator (:func:`~precision_lab.measure.stable_seed`), so every format sees the same fp64 draws.

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
  smaller); *not* claimed for ``kahan`` and ``neumaier`` (whose own bounds exceed it at small n) nor
  for ``stochastic`` (each SR step errs by up to 2u, so its worst case is ``gamma_{n-1}(2u)``).
* ``bound_probabilistic``: ``gamma~_{n-1}(lam; u) = lam sqrt(n-1) u + O(u**2)`` (Higham & Mary 2019,
  Thm 3.1) with the config's ``lam`` (column ``lam``) and ``bound_probabilistic_confidence``.  It is
  a theorem about a *model* of random, independent rounding errors, which RN need not follow: it is
  expected to hold for the random streams and fails for stagnation (constant addends, errors of one
  sign), e.g. fp16 at N >= 4096.
* ``bound_strategy``: the strategy's own bound: ``naive`` gamma_{n-1}(u); ``kahan``
  :func:`~precision_lab.theory.kahan_sum_bound` (3u + O(n u**2), rigorous for the compensated
  read-out s - c); ``neumaier`` :func:`~precision_lab.theory.neumaier_sum_bound`
  (``u|S_j| + (1 + u) min(1, gamma_{n-2}) min(1, gamma_{n-1}) A_j``, rigorous for the read-out s + c,
  taken here with ``|S_j| <= A_j``: the coefficient ``u + (1 + u) min(..) min(..)`` times kappa, which
  gives up the algorithm's ``|S|`` advantage on cancelling streams, a factor up to kappa on the ``u``
  term only; past ``n u = 1`` the coefficient is ~1 and the bound says nothing); ``pairwise``
  gamma_{ceil(log2 n)}(u); ``stochastic`` Connolly-Higham-Mary 2021, ``gamma~_{n-1}(lam; 2u)``, a
  theorem for SR with no assumption on the data, holding with ``bound_strategy_confidence`` (1.0 for
  the four deterministic bounds).

A bound is ``inf`` (void, not a claim that the error is infinite) where its hypothesis fails: the
theory function returns inf (e.g. ``(n-1) u >= 1``: bf16 from N = 257 on), an addend of the block was
non-finite after rounding (``nonfinite_inputs``; fp8_e4m3 has no Inf and turns addends beyond 448 into
NaN), or the sum may overflow: every partial sum of entry j is at most ``(1 + c) A_j`` in magnitude
while the bound holds, so ``(1 + c) max_j A_j <= max`` keeps every rounding inside the format's range
(Kahan: ``<= max / 2``, headroom for the intermediates ``x + e`` and ``u - s`` of its steps; Neumaier:
``<= max / 2`` as well, since its partial sums, compensation and ``s + t`` stay within ``2 A_j``).

Lost updates (``lost_update_fraction``: element-adds that left the buffer unchanged although the
rounded addend was finite and nonzero) are those of :class:`~precision_lab.Accumulator`.  For speed the
naive, kahan, neumaier and stochastic buffers of all streams of a (format, trial) share one wide
buffer (the cost of an add is mostly per call, not per entry), and their lost updates are counted per
stream from the public state with the Accumulator's definitions: naive and stochastic ``s``
unchanged; kahan and neumaier ``s`` and the read-out (``s - c``, ``s + c``) unchanged (the same as
``s`` and ``c`` unchanged unless c moves by less than half an fp64 ulp of s, ~2^-53 |s|, which takes
an addend and a compensation some 2^45 times smaller than the sum).  Pairwise buffers are one per stream and count their own (absorption in
any merge of the cascade).  The tests check these counts against one Accumulator per stream.

Computing and plotting are separate: ``run`` writes ``results.csv`` + ``metadata.json`` (resumable,
shardable: one task per trial x format); :mod:`experiments.figures.summation` only reads them and draws
``summation.png`` (bf16 and fp16, every bound of bf16, lost updates) and ``summation_formats.png``
(every format).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from precision_lab import Accumulator, get_format, metrics, round_nearest, theory
from precision_lab.accumulators import work_dtype
from precision_lab.checks import check_choices, check_format, check_int, check_real
from precision_lab.formats import Format
from precision_lab.lab.runner import run_tasks
from precision_lab.measure import power_grid, stable_seed
from precision_lab.strategies import absorbed
from precision_lab.workloads import make_stream

NAME = "summation"
#: the strategies swept (the library's STRATEGIES less "exact", which is the reference)
SWEPT_STRATEGIES: tuple[str, ...] = ("naive", "kahan", "neumaier", "stochastic", "pairwise")


class StreamLaw(NamedTuple):
    """How one synthetic stream is drawn."""

    kind: str  # the stream kind of precision_lab.workloads.make_stream ("constant": every addend 1)
    params: dict[str, float]  # its parameters (mean, spread, df, density)


#: stream name -> its law; the signal of "positive" is +mean everywhere (no signs)
STREAMS: dict[str, StreamLaw] = {
    "constant": StreamLaw("constant", {}),
    "positive": StreamLaw("gaussian", {"mean": 1.0, "spread": 0.25}),
    "low_snr": StreamLaw("gaussian", {"mean": 0.05, "spread": 1.0}),
    "student_t": StreamLaw("student_t", {"mean": 0.05, "spread": 1.0, "df": 3.0}),
    "sparse": StreamLaw("sparse", {"mean": 0.05, "spread": 1.0, "density": 0.1}),
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

    Cost: the full config is 6 tasks (one per format) of 65,536 adds; the time is linear in N (the
    README has measured times).  One add is one call per strategy for all streams at once, plus one
    pairwise buffer per stream, so ``elements`` costs little and ``n_max``, ``formats``, ``streams``
    and ``trials`` set the time; per add, tf32 costs ~3x bf16 and fp8 ~1.5x (rounding emulated).
    Memory: a trial's draws are kept for all its formats (n_max x streams x elements fp64, 0.54 GB
    for the full config).
    """

    formats: tuple[str, ...] = ("bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "tf32", "fp32")  # buffer formats
    strategies: tuple[str, ...] = SWEPT_STRATEGIES  # accumulation strategies ("exact" is always the reference)
    streams: tuple[str, ...] = ("constant", "positive", "low_snr", "student_t")  # see STREAMS
    n_max: int = 2**16  # largest accumulation count N; every power of two up to it is recorded
    elements: int = 256  # gradient entries per micro-gradient, per stream (each an independent scalar stream)
    trials: int = 1  # independent draws of every stream (and stochastic-rounding seeds)
    lam: float = 8.0  # lambda of the probabilistic bounds (their confidence is recorded per row)

    def __post_init__(self) -> None:
        # formats: any format name (custom eXmY ones too), so no fixed list to choose from
        if not isinstance(self.formats, tuple) or len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats must be a tuple without repeats, got {self.formats!r}")
        for f in self.formats:
            check_format(f)  # ValueError naming the unknown format
        check_choices(self.strategies, "strategies", SWEPT_STRATEGIES, empty=True)  # "exact" is the reference
        check_choices(self.streams, "streams", STREAMS)
        for name in ("n_max", "elements", "trials"):
            check_int(getattr(self, name), name)
        check_real(self.lam, "lam", low=0.0, high=math.inf, low_open=True, high_open=True)

    @classmethod
    def quick(cls) -> Config:
        """N up to 2^12 (fp16's stall at 2048 included), every format but fp32."""
        return cls(formats=("bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "tf32"), n_max=2**12)

    def tasks(self) -> list[Task]:
        """One task per (trial, format); all streams and strategies share its pass over N.

        Trial-major order, so that a process (or shard) runs the formats of one trial in a row and
        draws the trial's streams once.
        """
        return [Task(trial=t, buffer_format=f) for t in range(self.trials) for f in self.formats]


@dataclass(frozen=True)
class Task:
    """One (trial, buffer format): every stream and strategy in one pass over N."""

    trial: int  # index of the independent draw of every stream
    buffer_format: str  # the buffers' format (a name as given in Config.formats)


# --------------------------------------------------------------------------------------------------
# streams
# --------------------------------------------------------------------------------------------------
def data_seed(seed: int, stream: str, trial: int) -> int:
    """The seed of one (stream, trial)'s draws: the same for every format."""
    return stable_seed(seed, NAME, stream, trial, "data")


def stream_chunks(stream: str, elements: int, n_max: int, seed: int, chunk: int = 256) -> Iterator[torch.Tensor]:
    """The fp64 micro-gradients of one stream, ``n_max`` rows in all, in chunks of ``chunk`` rows."""
    law = STREAMS[stream]
    if law.kind == "constant":
        for lo in range(0, n_max, chunk):
            yield torch.ones(min(chunk, n_max - lo), elements, dtype=torch.float64)
        return
    gen = torch.Generator().manual_seed(seed)
    s = make_stream(law.kind, elements, **law.params)
    # "positive": every entry's mean is +mean (no random signs), so all addends share one sign
    positive = stream == "positive"
    signal = torch.full((elements,), law.params["mean"], dtype=torch.float64) if positive else s.signal(gen)
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


class Coefficient(NamedTuple):
    """A per-entry bound coefficient and the conditions of its claim."""

    c: float  # the coefficient c(n, u): the theory function at abs_sum = 1
    probability: float  # Q, the per-entry probability that it holds (1 for deterministic bounds)
    headroom: float  # the factor by which (1 + c) max A must stay below the format's max (2: Kahan, Neumaier)


def coefficients(strategy: str, n: int, u: float, lam: float) -> dict[str, Coefficient]:
    """Per-entry bound coefficients ``c(n, u)`` of one strategy: bound name -> :class:`Coefficient`.

    The names are those of the columns ``bound_<name>``: ``worst_case``, ``probabilistic`` and
    ``strategy`` (the strategy's own bound).
    """
    worst = Coefficient(theory.recursive_sum_bound(n, u, 1.0), 1.0, 1.0)
    if strategy == "naive":
        own = worst
    elif strategy == "kahan":
        own = Coefficient(theory.kahan_sum_bound(n, u, 1.0), 1.0, 2.0)  # headroom for x + e and u - s
    elif strategy == "neumaier":  # abs_total = abs_sum: |S_j| <= A_j (module docstring)
        own = Coefficient(theory.neumaier_sum_bound(n, u, 1.0), 1.0, 2.0)  # partial sums within 2 A
    elif strategy == "pairwise":
        own = Coefficient(theory.pairwise_sum_bound(n, u, 1.0), 1.0, 1.0)
    elif strategy == "stochastic":
        own = Coefficient(
            theory.stochastic_rounding_sum_bound(n, u, 1.0, lam),
            theory.stochastic_rounding_bound_probability(n, u, lam),
            1.0,
        )
    else:
        raise KeyError(strategy)
    probabilistic = Coefficient(
        theory.probabilistic_sum_bound(n, u, 1.0, lam), theory.probabilistic_bound_probability(n, u, lam), 1.0
    )
    return {"worst_case": worst, "probabilistic": probabilistic, "strategy": own}


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
@dataclass
class _TaskBuffers:
    """The buffers of one (format, trial) task and what its rows carry besides their values."""

    config: Config  # the sweep (streams, elements, strategies, lam)
    fmt: Format  # the buffers' format
    trial: int  # the trial index
    seeds: dict[str, int]  # stream -> the seed of its draws (column "seed")
    wide: dict[str, Accumulator]  # strategy -> one buffer over all streams side by side (all but pairwise)
    pair: list[Accumulator]  # one pairwise buffer per stream (empty when pairwise is not swept)
    lost: dict[str, torch.Tensor]  # strategy -> lost updates so far of each stream's block of its wide buffer


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
    chunks = draw(config, seed, trial) if chunks is None else chunks
    # One wide buffer per strategy over all streams (count_lost=False: counted per stream below) ...
    wide: dict[str, Accumulator] = {}
    for s in config.strategies:
        if s == "pairwise":
            continue
        generator = torch.Generator(device=device).manual_seed(stable_seed(seed, NAME, fmt.name, s, trial))
        wide[s] = Accumulator(s, fmt, (width,), device=device, count_lost=False, generator=generator)
    # ... except pairwise, whose lost updates (absorption inside the cascade) only the buffer counts.
    pair = (
        [Accumulator("pairwise", fmt, (m,), device=device) for _ in streams] if "pairwise" in config.strategies else []
    )
    buffers = _TaskBuffers(
        config=config,
        fmt=fmt,
        trial=trial,
        seeds={s: data_seed(seed, s, trial) for s in streams},
        wide=wide,
        pair=pair,
        lost={s: torch.zeros(blocks, dtype=torch.int64, device=device) for s in wide},
    )
    # The reference: the exact sums of the rounded addends and of their magnitudes, side by side.
    exact = Accumulator("exact", "fp64", (2 * width,), device=device)
    before = {s: acc.raw_sum() for s, acc in wide.items()}
    compensated = [s for s in ("kahan", "neumaier") if s in wide]  # two numbers per entry: s and c
    readout = {s: wide[s].value() for s in compensated}
    lost = buffers.lost
    bad_before = torch.zeros(blocks, dtype=torch.int64, device=device)  # non-finite addends of earlier chunks
    dtype = work_dtype(fmt)
    rows: list[dict[str, Any]] = []
    n = 0
    for chunk in chunks:
        x = round_nearest(chunk.to(device), fmt)  # input quantisation, once for all buffers
        finite = torch.isfinite(x)
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
                gone = absorbed(now, before[s], x_work[i])  # the library's one lost-update test
                if s in readout:  # s and c both unchanged: s and the read-out s -+ c unchanged
                    out = acc.value()
                    gone &= out == readout[s]
                    readout[s] = out
                lost[s] += gone.view(blocks, m).sum(dim=1)
                before[s] = now
            for b, acc in enumerate(pair):
                acc.add(x_work[i, b * m : (b + 1) * m])
            if n in record:
                rows += _measure(buffers, n, exact.value(), bad[i])
        bad_before = bad[-1]
    # rows in (stream, strategy) order, then by N
    order = {key: k for k, key in enumerate(itertools.product(streams, config.strategies))}
    rows.sort(key=lambda r: (order[(r["stream"], r["strategy"])], r["n_accum"]))
    return rows


def _measure(buffers: _TaskBuffers, n: int, both: torch.Tensor, bad_inputs: torch.Tensor) -> list[dict[str, Any]]:
    """The rows of every (stream, strategy) at accumulation count ``n``.

    ``both`` is the exact reference: the sums of the addends and of their magnitudes side by side;
    ``bad_inputs`` the non-finite addends of each stream so far.
    """
    config, fmt = buffers.config, buffers.fmt
    m, width = config.elements, len(config.streams) * config.elements
    ref_all, abs_all = both[:width], both[width:]
    values = {s: acc.value() for s, acc in buffers.wide.items()}
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
                acc = buffers.pair[b]
                value, lost_here = acc.value(), acc.lost_updates
            else:
                value, lost_here = values[strategy][block], int(buffers.lost[strategy][b])
            row = {
                "experiment": NAME,
                "stream": stream,
                "buffer_format": fmt.name,
                "strategy": strategy,
                "n_accum": n,
                "elements": m,
                "trial": buffers.trial,
                "seed": buffers.seeds[stream],
                "nonfinite_inputs": bad,
                "predicted_stall": stall,
                "sum_condition": kappa,
                "lam": config.lam,
                **metrics.compare(value, ref, fmt, lost_updates=lost_here, element_adds=n * m),
            }
            for name, coeff in coeffs[strategy].items():
                row[f"bound_{name}"] = relative_bound(coeff.c, coeff.headroom, fmt, norm_abs, norm_sum, max_abs, bad)
                if name != "worst_case":
                    row[f"bound_{name}_confidence"] = confidence(coeff.probability, m)
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

    def work(task: Task) -> list[dict[str, Any]]:
        return measure_task(config, task.buffer_format, task.trial, seed, device, draws(task.trial))

    return run_tasks(
        NAME,
        out_dir,
        config.tasks(),
        work,
        columns=COLUMNS,
        config=config,
        seed=seed,
        device=device,
        shard=shard,
        progress=progress,
    )
