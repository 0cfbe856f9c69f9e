"""Underflow: fp16 ``pre`` vs ``post`` scaling -- elements flushed to zero and the error, vs N, +- a loss scale.

A fixed effective batch of E samples is split into N micro-batches of E/N (N on the power-of-two
grid up to E).  ``pre`` divides each micro-batch loss by N before backward, so every ``g_i / N`` is
computed and added; ``post`` adds the undivided ``g_i`` and divides the sum once.  For N a power of
two the division is exact unless it underflows (or, for ``post``'s larger sum, overflows), so in
fp16 -- smallest subnormal 2^-24, everything below 2^-25 rounds to zero -- the two placements
differ only through underflow and overflow.  A static loss scale S (GradScaler-style: the loss is
multiplied by S before backward, the accumulated sum divided by S once at the end) lifts small
gradients out of the underflow range; too large an S overflows to inf.

Regimes (``pairs``: micro-gradient compute precision -> accumulation buffer format):

* ``fp16 -> fp16``: pure fp16 micro-gradients into an fp16 buffer (underflow in backward and at the
  buffer; overflow of ``post``'s sum in the buffer);
* ``fp16 -> fp32``: the same fp16 micro-gradients into an fp32 buffer (underflow in backward only);
* ``fp32 -> fp16``: fp32 micro-gradients, rounded to fp16 as they are added (underflow at the add).

Loss scales 1 (none), 2^10 and 2^15, the largest power of two fp16 holds (2^16 = 65536 is above
fp16's max 65504, so ``loss * 2^16`` in pure fp16 is inf at once).  2^10 cures most of ``pre``'s
flushing; 2^15 shows the other side: ``post``'s fp16 buffer sums N gradients scaled by S and
overflows at large N (in the full run, the MLP's already at S = 2^10 and N = 4096), and the
micro-gradients of single-sample micro-batches overflow themselves (``nonfinite_inputs``), in
fp16 backward or when an fp32 one is rounded to fp16.  Powers of two make ``pre`` with S at N the
same computation as ``post`` with S/N (``pre`` with 2^15 at N = 32 and ``post`` with 2^10: the
same micro-gradients, sums and read-out), and their rows agree to the last digit.

Underflow happens in two places, and the regimes tell them apart: at the add (an fp32 value
rounded into the fp16 buffer) and inside pure-fp16 backward, where the loss is a mean over the
micro-batch and every per-sample term carries 1/B (1/(B T) per token for the transformer), or
1/(B N) = 1/E with ``pre`` at every N: a large micro-batch, or ``pre``, underflows in backward
before anything reaches the buffer.

What is measured, per (workload, regime, scaling, S, N, trial):

* ``flushed_fraction``: of the micro-gradient elements that are nonzero in exact arithmetic, the
  fraction that is exactly zero in the value that reaches the buffer *and* whose exact value (times
  ``S/N`` for ``pre``, ``S`` for ``post``) itself rounds to zero in the narrower format: flushed
  because the format cannot hold it.  "Nonzero" means above :data:`EXACT_ZERO` = 2^-50 times the
  micro-gradient's largest element: below it sits fp64's rounding residue of exact zeros (the
  transformer's key biases); elements that small are below fp16's range at every scale used here,
  so leaving them out undercounts flushes by at most their share.  "Exact" is the same
  micro-gradient (same micro-batch) computed by a float64 copy of the model, paired with the
  low-precision chunks one by one, scaled by ``S/N`` or ``S`` (powers of two: exact in fp64).
  "Reaches the buffer" is the micro-gradient rounded to the buffer format (round to nearest even),
  as ``Accumulator.add`` does: the fp16 micro-gradient itself for an fp32 buffer, the fp32 one
  rounded to fp16 for an fp16 buffer.  Only exact zeros count: a low-precision backward that turns
  a tiny exact value into a larger wrong one is not "flushed".  fp64 compute has a flushed fraction
  of exactly 0.
* ``zeroed_fraction``: the elements that arrive as exactly zero although their exact scaled value
  is representable: lost inside the fp16 computation (an intermediate underflow, such as the
  transformer's 1/(B T), or a cancellation), not at the buffer.
* ``subnormal_fraction``: of the same elements, the fraction that arrives nonzero but below the
  smallest normal of the narrower of compute and buffer format (2^-14 for fp16): kept, with fewer
  than 11 significant bits.
* ``nonfinite_inputs``: micro-gradient elements (over all N) that reach the buffer as inf or NaN.
* The error of the accumulated gradient after ``* 1/S`` (``pre``) or ``* 1/(S N)`` (``post``),
  applied once and rounded to the buffer format (``p.grad.mul_(...)``), against the fp64 gradient of
  all E samples (:func:`precision_lab.metrics.compare`: ``rel_l2_error``, ``norm_ratio``, ...,
  ``nonfinite``; a non-finite buffer gives ``rel_l2_error = inf``, reported, never averaged away),
  and ``quantisation_floor``, the error of the fp64 truth rounded once to the buffer format.

``run`` writes ``results.csv`` + ``metadata.json`` (resumable, shardable); ``plot`` only reads them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from precision_lab import metrics
from precision_lab._threads import intra_op_threads
from precision_lab.accumulators import STRATEGIES, Accumulator
from precision_lab.formats import Format, get_format
from precision_lab.gradients import COMPUTE_FORMATS, GradientEngine
from precision_lab.plotting import PALETTE, pyplot, save_figure
from precision_lab.results import read_csv
from precision_lab.rounding import round_nearest
from precision_lab.sweep import SCALINGS, TrialData, power_grid, run_tasks, stable_seed
from precision_lab.workloads import MODEL_WORKLOADS

NAME = "underflow"
COLUMNS = (
    "experiment",
    "workload",
    "compute_format",
    "buffer_format",
    "strategy",
    "scaling",
    "loss_scale",
    "n_accum",
    "micro_batch",
    "effective_batch",
    "trial",
    "seed",
    "flushed_fraction",
    "zeroed_fraction",
    "subnormal_fraction",
    "nonfinite_inputs",
    *metrics.METRIC_NAMES,
    "quantisation_floor",
)

# An fp64 element at most this fraction of its micro-gradient's largest one counts as zero in exact
# arithmetic.  Where the exact value is a sum that cancels to 0, fp64 backward leaves a residue of
# ~2^-53 relative (the transformer's key-bias gradient is exactly 0, since softmax ignores a shift
# shared by a row of scores, and comes out of fp64 near 2^-60 relative).  A value fp16 flushes lies
# below 2^-25 while the largest element is below fp16's max 2^16, so it is at least 2^-41 relative
# whenever the micro-gradient is finite: 2^-50 leaves a margin of 2^9 to the one and 2^3 to the other.
EXACT_ZERO = float.fromhex("0x1p-50")

# The format of the gradient each compute precision produces (bf16 autocast: fp32 gradients).
GRADIENT_FORMAT: dict[str, str] = {
    "fp64": "fp64",
    "fp32": "fp32",
    "bf16_autocast": "fp32",
    "bf16": "bf16",
    "fp16": "fp16",
}


@dataclass(frozen=True)
class Config:
    """What to sweep: regimes x scalings x loss scales x N (fixed effective batch) x trials.

    Cost on one core (``taskset -c 0``, one intra-op thread for all the numerics), measured on a
    2-core machine shared with four other jobs: the full config 412 s of CPU (461 s wall), most of
    it the transformer's pure-fp16 backward (5-7x the time of fp32 on this CPU); ``Config.quick()`` about
    10 s.  Cost grows linearly with ``trials`` and with the number of loss scales and scalings
    (one micro-gradient pass each, per N).
    """

    workloads: tuple[str, ...] = ("mlp", "transformer")  # see precision_lab.workloads
    effective_batch: tuple[int, ...] = (4096, 256)  # E per workload (samples; sequences for text)
    size: str = "full"  # workload size preset ("full" or "quick")
    pairs: tuple[tuple[str, str], ...] = (("fp16", "fp16"), ("fp16", "fp32"), ("fp32", "fp16"))  # compute -> buffer
    strategies: tuple[str, ...] = ("naive",)  # accumulation strategies of every buffer
    scalings: tuple[str, ...] = ("pre", "post")  # where 1/N is applied
    loss_scales: tuple[float, ...] = (1.0, 2.0**10, 2.0**15)  # static loss scales S (1 = none)
    n_accum: tuple[int, ...] | None = None  # accumulation counts N (None: 1, 2, 4, ... up to E)
    trials: int = 2  # independent batches (data draws)
    method: str = "vmap"  # micro-gradients by "vmap" or "loop" (bit-identical for these workloads)
    chunk_size: int = 64  # most micro-batches per vmap call (fixed, so the bytes never vary)
    chunk_samples: int = 256  # most samples per vmap call (bounds memory for large micro-batches)
    warmup_steps: int | None = None  # fp32 Adam steps before measuring (None: workload default)

    @classmethod
    def quick(cls) -> Config:
        """Seconds: small models, E = 256 digits / 32 text windows, 2 trials."""
        return cls(effective_batch=(256, 32), size="quick", trials=2)

    def computes(self) -> list[str]:
        """The compute precisions, in the order of first appearance in ``pairs``."""
        return list(dict.fromkeys(c for c, _ in self.pairs))

    def buffers(self, compute: str) -> list[tuple[str, str]]:
        """The (buffer format, strategy) pairs fed by ``compute``'s micro-gradients."""
        return [(b, s) for c, b in self.pairs if c == compute for s in self.strategies]

    def grid(self, effective_batch: int) -> list[int]:
        """The accumulation counts N for one workload (each must divide E)."""
        if self.n_accum is None:
            return power_grid(effective_batch, divides=effective_batch)
        bad = [n for n in self.n_accum if isinstance(n, bool) or not isinstance(n, int) or n < 1]
        if bad or not self.n_accum:
            raise ValueError(f"n_accum must be integers N >= 1, got {self.n_accum!r}")
        for n in self.n_accum:
            if effective_batch % n:
                raise ValueError(f"N={n} does not divide the effective batch {effective_batch}")
        return sorted(set(self.n_accum))

    def validate(self) -> None:
        """Check every field; a ValueError names the bad value (and the known ones)."""
        if len(self.effective_batch) != len(self.workloads):
            raise ValueError(f"effective_batch {self.effective_batch} needs one entry per workload {self.workloads}")
        for w in self.workloads:
            if w not in MODEL_WORKLOADS:
                raise ValueError(f"unknown workload {w!r}; known: {', '.join(MODEL_WORKLOADS)}")
        if not self.pairs:
            raise ValueError("pairs is empty: give at least one (compute, buffer) pair")
        for c, b in self.pairs:
            if c not in COMPUTE_FORMATS:
                raise ValueError(f"unknown compute format {c!r}; known: {', '.join(COMPUTE_FORMATS)}")
            get_format(b)  # ValueError lists the known formats
        for s in self.strategies:
            if s not in STRATEGIES or s == "exact":
                raise ValueError(f"unknown strategy {s!r}; known: {', '.join(STRATEGIES[:-1])}")
        for s in self.scalings:
            if s not in SCALINGS:
                raise ValueError(f"unknown scaling {s!r}; known: {', '.join(SCALINGS)}")
        for s in self.loss_scales:
            _check_loss_scale(s)
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"trials must be an integer >= 1, got {self.trials!r}")
        for e in self.effective_batch:
            self.grid(e)

    def tasks(self) -> list[dict[str, Any]]:
        """One task per (workload, compute, N, trial); scalings, loss scales and buffers share it."""
        self.validate()
        return [
            {"workload": w, "compute_format": c, "n_accum": n, "trial": t}
            for w, e in zip(self.workloads, self.effective_batch, strict=True)
            for c in self.computes()
            for n in self.grid(e)
            for t in range(self.trials)
        ]


# --------------------------------------------------------------------------------------------------
# counting what underflows on the way into the buffer
# --------------------------------------------------------------------------------------------------
def flush_counts(
    exact: torch.Tensor,
    grad: torch.Tensor,
    buffer: str | Format,
    narrow: str | Format | None = None,
    scale: float = 1.0,
) -> dict[str, int]:
    """Count what happens to the nonzero elements of ``exact`` on their way into the buffer.

    Args:
        exact: The micro-gradient in exact (fp64) arithmetic.
        grad: The same micro-gradient as computed (any float dtype, same shape).
        buffer: The buffer format; ``grad`` is rounded to it (RN-even) as ``Accumulator.add`` does.
        narrow: The format whose subnormal range counts (default: ``buffer``); pass the narrower of
            compute and buffer format.
        scale: What ``grad`` is of ``exact``'s scale: ``S/N`` for ``pre``, ``S`` for ``post``.

    Returns:
        ``nonzero`` (elements of ``exact`` above :data:`EXACT_ZERO` times the largest magnitude in
        their micro-gradient, the last dimension; the rest is 0 or fp64 residue), ``flushed`` (of
        those, the ones that arrive as exactly 0 and whose exact value ``scale * exact`` itself
        rounds to 0 in ``narrow``: too small for the format), ``zeroed`` (the ones that arrive as 0
        although their exact value is representable: lost inside the fp16 computation, by an
        intermediate underflow or a cancellation), ``subnormal`` (arrive nonzero and finite but
        below the smallest normal of ``narrow``) and ``nonfinite`` (elements of every kind that
        arrive as inf or NaN).

    Example: into fp16 (smallest subnormal 2^-24), 2^-26 and the tie 2^-25 (to even: 0) flush;
    1.5 * 2^-25 rounds up to 2^-24, which is kept, as a subnormal.
    """
    if exact.shape != grad.shape:
        raise ValueError(f"shape mismatch: exact has shape {tuple(exact.shape)}, grad {tuple(grad.shape)}")
    buffer = get_format(buffer)
    narrow = buffer if narrow is None else get_format(narrow)
    arrived = round_nearest(grad, buffer)
    if arrived.dtype in (torch.float16, torch.bfloat16):
        arrived = arrived.float()  # exact; CPU elementwise ops in half precision are slow
    a = arrived.abs()
    e = exact.abs()
    # zero in exact arithmetic: 0, or fp64 rounding residue of an exactly cancelling sum (see EXACT_ZERO)
    nonzero = e > EXACT_ZERO * e.amax(dim=-1, keepdim=True) if e.numel() else e != 0
    small = a < narrow.smallest_normal  # NaN compares False: never small
    too_small = round_nearest(exact * scale, narrow) == 0  # x scale: a power of two, exact in fp64
    lost = nonzero & (a == 0)
    return {
        "nonzero": int(torch.count_nonzero(nonzero)),
        "flushed": int(torch.count_nonzero(lost & too_small)),
        "zeroed": int(torch.count_nonzero(lost & ~too_small)),
        "subnormal": int(torch.count_nonzero(nonzero & small & (a > 0))),
        "nonfinite": int(torch.count_nonzero(~torch.isfinite(a))),
    }


def _narrower(compute: str, buffer: str) -> Format:
    """The format of the two whose normal range ends higher (its subnormals are the binding ones)."""
    a, b = get_format(GRADIENT_FORMAT[compute]), get_format(buffer)
    return a if a.smallest_normal >= b.smallest_normal else b


def measure(
    engine: GradientEngine,
    exact_engine: GradientEngine,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    reference: torch.Tensor,
    n_micro: int,
    buffers: Sequence[tuple[str, str]],
    passes: Sequence[tuple[str, float]],
    *,
    seed: int = 0,
) -> list[list[dict[str, Any]]]:
    """Split the batch into N micro-batches; for every (scaling, S) in ``passes`` accumulate and count.

    One pass over the fp64 micro-gradients (``exact_engine``) runs in lockstep with one pass of
    ``engine`` per (scaling, S), chunk by chunk.  The fp64 pass is computed without ``/N`` and
    ``*S``: which elements are nonzero does not depend on them (a power-of-two scaling in fp64 is
    exact, and every factor here stays some 1000 binades away from fp64's underflow), and the fp64
    values themselves are only used for that pattern.

    Args:
        engine: The micro-gradients' compute precision.
        exact_engine: An fp64 engine of the same model, chunking and method (the chunks pair up).
        inputs: All E samples.
        targets: Their targets.
        reference: The fp64 gradient of all E samples (the truth every buffer is compared with).
        n_micro: The accumulation count N.
        buffers: ``(format, strategy)`` pairs, each fed every pass's micro-gradients.
        passes: ``(scaling, loss_scale)`` pairs: ``pre`` divides each loss by N before backward
            and reads the buffer out times ``1/S``; ``post`` reads it out times ``1/(S N)``.
        seed: Seed of the stochastic-rounding strategy (if any).

    Returns:
        Per pass, one dict per buffer: ``buffer_format``, ``strategy``, ``n_accum``,
        ``flushed_fraction``, ``subnormal_fraction``, ``nonfinite_inputs``, the metrics of
        :func:`precision_lab.metrics.compare` and ``quantisation_floor``.
    """
    if exact_engine.compute != "fp64":
        raise ValueError(f"exact_engine must compute in fp64, got {exact_engine.compute!r}")
    for scaling, s in passes:
        if scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {scaling!r}; known: {', '.join(SCALINGS)}")
        _check_loss_scale(s)
    buffers = [(get_format(b).name, strategy) for b, strategy in buffers]
    formats = list(dict.fromkeys(b for b, _ in buffers))
    narrow = {b: _narrower(engine.compute, b) for b in formats}
    device = engine.device
    streams = [
        engine.micro_gradients(inputs, targets, n_micro, divide_by=n_micro if scaling == "pre" else 1, loss_scale=s)
        for scaling, s in passes
    ]
    accs = [
        [
            Accumulator(
                strategy,
                b,
                (engine.num_params,),
                device=device,
                generator=torch.Generator(device=device).manual_seed(stable_seed(seed, p, b, strategy)),
            )
            for b, strategy in buffers
        ]
        for p in passes
    ]
    counts = [
        {b: dict.fromkeys(("nonzero", "flushed", "zeroed", "subnormal", "nonfinite"), 0) for b in formats}
        for _ in passes
    ]
    # Counting and adding are elementwise work on 10^4..10^6 numbers: one intra-op thread (the engines
    # set their own) loses little, gives the same bits, and avoids idle-spinning threads that cost
    # ten times the work on a shared machine.
    with intra_op_threads(1):
        for exact in exact_engine.micro_gradients(inputs, targets, n_micro):
            for (scaling, s), stream, pass_accs, pass_counts in zip(passes, streams, accs, counts, strict=True):
                chunk = next(stream)
                scale = s / n_micro if scaling == "pre" else s
                for b in formats:
                    for k, v in flush_counts(exact, chunk, b, narrow[b], scale).items():
                        pass_counts[b][k] += v
                for g in chunk:
                    for acc in pass_accs:
                        acc.add(g)  # rounds g to the buffer format (RN), then p.grad += g
    if any(next(stream, None) is not None for stream in streams):
        raise ValueError("the engines chunk the micro-gradients differently; give them the same chunking")
    floors = {b: metrics.rel_l2_error(round_nearest(reference, b), reference) for b in formats}
    out = []
    for (scaling, s), pass_accs, pass_counts in zip(passes, accs, counts, strict=True):
        factor = 1.0 / s if scaling == "pre" else 1.0 / (s * n_micro)  # unscale (and post's /N) once, in the buffer
        rows = []
        for acc in pass_accs:
            c = pass_counts[acc.format.name]
            m = metrics.compare(
                acc.scaled_value(factor),
                reference,
                acc.format,
                lost_updates=acc.lost_updates,
                element_adds=acc.element_adds,
            )
            rows.append(
                {
                    "buffer_format": acc.format.name,
                    "strategy": acc.strategy,
                    "n_accum": n_micro,
                    "flushed_fraction": c["flushed"] / c["nonzero"] if c["nonzero"] else 0.0,
                    "zeroed_fraction": c["zeroed"] / c["nonzero"] if c["nonzero"] else 0.0,
                    "subnormal_fraction": c["subnormal"] / c["nonzero"] if c["nonzero"] else 0.0,
                    "nonfinite_inputs": c["nonfinite"],
                    **m,
                    "quantisation_floor": floors[acc.format.name],
                }
            )
        out.append(rows)
    return out


def _check_loss_scale(s: float) -> float:
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
        raise ValueError(f"loss scale {s!r} must be a finite number > 0")
    return s


# --------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------
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
    tasks = config.tasks()  # validates the config before anything is computed
    trials = TrialData.for_config(config, seed=seed, device=device)
    batch = trials.effective_batch

    def work(task: dict[str, Any]) -> list[dict[str, Any]]:
        w, compute, n, trial = task["workload"], task["compute_format"], task["n_accum"], task["trial"]
        x, y, ref, data_seed = trials.data(w, trial)
        passes = [(scaling, float(s)) for scaling in config.scalings for s in config.loss_scales]
        measured = measure(
            trials.engine(w, compute),
            trials.engine(w, "fp64"),
            x,
            y,
            ref,
            n,
            config.buffers(compute),
            passes,
            seed=stable_seed(seed, w, compute, n, trial),
        )
        rows = []
        for (scaling, s), pass_rows in zip(passes, measured, strict=True):
            for r in pass_rows:
                rows.append(
                    {
                        "experiment": NAME,
                        "workload": w,
                        "compute_format": compute,
                        "scaling": scaling,
                        "loss_scale": s,
                        "micro_batch": batch[w] // n,
                        "effective_batch": batch[w],
                        "trial": trial,
                        "seed": data_seed,
                        **r,
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
# plot
# --------------------------------------------------------------------------------------------------
def _scale_label(s: float) -> str:
    """``S=1`` (no loss scale), ``S=2^10``, or the number where it is not a power of two."""
    if s == 1.0:
        return "S=1 (none)"
    m, e = math.frexp(s)
    return f"S=2^{e - 1}" if m == 0.5 else f"S={s:g}"


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
    series = [(sc, s) for s in scales for sc in SCALINGS if any(r["scaling"] == sc for r in rows)]
    colors = dict(
        zip(scales, [PALETTE[c] for c in ("vermillion", "blue", "green", "purple", "orange", "sky")], strict=False)
    )
    style = {"pre": {"linestyle": "-", "marker": "o"}, "post": {"linestyle": "--", "marker": "s"}}
    fractions = ("flushed_fraction", "subnormal_fraction")
    positive = [float(r[c]) for r in rows for c in fractions if float(r[c]) > 0]
    zero_at = 10.0 ** (math.floor(math.log10(min(positive, default=1e-6))) - 1)  # where a fraction of 0 is drawn
    panels = (
        ("flushed_fraction", "flushed to zero\n(fraction of nonzero elements)"),
        ("subnormal_fraction", "arriving subnormal\n(fraction of nonzero elements)"),
        ("rel_l2_error", "relative L2 error\nvs fp64 large batch"),
    )

    def by_n(sel: list[dict[str, str]], column: str) -> dict[int, list[float]]:
        out: dict[int, list[float]] = {}
        for r in sel:
            out.setdefault(int(r["n_accum"]), []).append(float(r[column]))
        return dict(sorted(out.items()))

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
                    means = {n * dodge: sum(v) / len(v) for n, v in by_n(sel, m).items()}
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
                errors = by_n(sel, "rel_l2_error")
                nonfinite = by_n(sel, "nonfinite")
                ok = {
                    n: sum(v) / len(v)
                    for n, v in errors.items()
                    if all(map(math.isfinite, v)) and not any(nonfinite[n])
                }
                ax["rel_l2_error"].plot([n * dodge for n in ok], list(ok.values()), **kw)
                bad = [n * dodge for n in errors if n not in ok]
                if bad:
                    overflowing.append((bad, kw["color"], kw["label"]))
            floor = by_n(here, "quantisation_floor")
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
