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

``run`` writes ``results.csv`` + ``metadata.json`` (resumable, shardable); :mod:`experiments.figures.underflow`
only reads them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from experiments.trials import Trial, TrialData
from precision_lab import STRATEGIES, Accumulator, metrics
from precision_lab._threads import intra_op_threads
from precision_lab.checks import check_choice, check_format, check_int, check_ints, check_real
from precision_lab.formats import Format, get_format
from precision_lab.gradients import COMPUTE_FORMATS, GradientEngine
from precision_lab.lab.runner import run_tasks
from precision_lab.measure import SCALINGS, power_grid, stable_seed
from precision_lab.rounding import round_nearest
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

    All the numerics run on one intra-op thread.  Most of the cost is the transformer's pure-fp16
    backward (several times that of fp32 on a CPU).  Cost grows linearly with ``trials`` and with
    the number of loss scales and scalings (one micro-gradient pass each, per N).
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
        out = []
        for c, b in self.pairs:
            if c == compute:
                out += [(b, s) for s in self.strategies]
        return out

    def grid(self, effective_batch: int) -> list[int]:
        """The accumulation counts N for one workload (each must divide E)."""
        if self.n_accum is None:
            return power_grid(effective_batch, divides=effective_batch)
        n_values = check_ints(self.n_accum, "n_accum")
        for n in n_values:
            if effective_batch % n:
                raise ValueError(f"N={n} does not divide the effective batch {effective_batch}")
        return sorted(set(n_values))

    def validate(self) -> None:
        """Check every field; a ValueError names the bad value (and the known ones)."""
        if len(self.effective_batch) != len(self.workloads):
            raise ValueError(f"effective_batch {self.effective_batch} needs one entry per workload {self.workloads}")
        for w in self.workloads:
            check_choice(w, "workload", MODEL_WORKLOADS)
        if not self.pairs:
            raise ValueError("pairs is empty: give at least one (compute, buffer) pair")
        for c, b in self.pairs:
            check_choice(c, "compute format", COMPUTE_FORMATS)
            check_format(b)  # ValueError lists the known formats
        for s in self.strategies:
            check_choice(s, "strategy", [k for k in STRATEGIES if k != "exact"])
        for s in self.scalings:
            check_choice(s, "scaling", SCALINGS)
        for s in self.loss_scales:
            _check_loss_scale(s)
        check_int(self.trials, "trials")
        for e in self.effective_batch:
            self.grid(e)

    def tasks(self) -> list[Task]:
        """One task per (workload, compute, N, trial); scalings, loss scales and buffers share it."""
        self.validate()
        tasks: list[Task] = []
        for w, e in zip(self.workloads, self.effective_batch, strict=True):
            for c in self.computes():
                for n in self.grid(e):
                    for t in range(self.trials):
                        tasks.append(Task(workload=w, compute_format=c, n_accum=n, trial=t))
        return tasks


@dataclass(frozen=True)
class Task:
    """One N of one trial in one compute precision: every scaling, loss scale and buffer of it."""

    workload: str  # a model workload of precision_lab.workloads
    compute_format: str  # precision of the micro-gradients
    n_accum: int  # N: micro-batches of E/N
    trial: int  # which trial's batch


class Pass(NamedTuple):
    """One pass of micro-gradients in :func:`measure`: where 1/N is applied, and the loss scale."""

    scaling: str  # "pre": loss / N before backward; "post": the sum / N once
    loss_scale: float  # S: the loss times S before backward, the sum times 1/S once


@dataclass
class _PassState:
    """One pass while :func:`measure` runs: its micro-gradients, its buffers and their counts."""

    spec: Pass  # the pass
    stream: Iterator[torch.Tensor]  # the engine's micro-gradient chunks
    accs: list[Accumulator]  # one per buffer
    counts: dict[str, dict[str, int]]  # buffer format -> flush_counts summed over the chunks


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
    trial: Trial,
    n_micro: int,
    *,
    buffers: Sequence[tuple[str, str]],
    passes: Sequence[tuple[str, float]],
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
        trial: All E samples (``x``, ``y``) and their fp64 gradient (``reference``: the truth every
            buffer is compared with).
        n_micro: The accumulation count N.
        buffers: ``(format, strategy)`` pairs, each fed every pass's micro-gradients.
        passes: :class:`Pass` ``(scaling, loss_scale)`` pairs: ``pre`` divides each loss by N before
            backward and reads the buffer out times ``1/S``; ``post`` reads it out times ``1/(S N)``.
        seed: Seed of the stochastic-rounding strategy (if any).

    Returns:
        Per pass, one dict per buffer: ``buffer_format``, ``strategy``, ``n_accum``,
        ``flushed_fraction``, ``subnormal_fraction``, ``nonfinite_inputs``, the metrics of
        :func:`precision_lab.metrics.compare` and ``quantisation_floor``.
    """
    if exact_engine.compute != "fp64":
        raise ValueError(f"exact_engine must compute in fp64, got {exact_engine.compute!r}")
    specs = []
    for scaling, s in passes:
        check_choice(scaling, "scaling", SCALINGS)
        _check_loss_scale(s)
        specs.append(Pass(scaling, s))
    buffers = [(get_format(b).name, strategy) for b, strategy in buffers]
    formats = list(dict.fromkeys(b for b, _ in buffers))
    narrow = {b: _narrower(engine.compute, b) for b in formats}
    device = engine.device
    states = []
    for spec in specs:
        divide_by = n_micro if spec.scaling == "pre" else 1
        stream = engine.micro_gradients(trial.x, trial.y, n_micro, divide_by=divide_by, loss_scale=spec.loss_scale)
        accs = []
        for b, strategy in buffers:
            generator = torch.Generator(device=device).manual_seed(stable_seed(seed, spec, b, strategy))
            accs.append(Accumulator(strategy, b, (engine.num_params,), device=device, generator=generator))
        counts = {b: dict.fromkeys(("nonzero", "flushed", "zeroed", "subnormal", "nonfinite"), 0) for b in formats}
        states.append(_PassState(spec, stream, accs, counts))
    # Counting and adding are elementwise work on 10^4..10^6 numbers: one intra-op thread (the engines
    # set their own) loses little, gives the same bits, and avoids idle-spinning threads that cost
    # ten times the work on a shared machine.
    with intra_op_threads(1):
        for exact in exact_engine.micro_gradients(trial.x, trial.y, n_micro):
            for state in states:
                chunk = next(state.stream)
                s = state.spec.loss_scale
                scale = s / n_micro if state.spec.scaling == "pre" else s
                for b in formats:
                    for k, v in flush_counts(exact, chunk, b, narrow[b], scale).items():
                        state.counts[b][k] += v
                for g in chunk:
                    for acc in state.accs:
                        acc.add(g)  # rounds g to the buffer format (RN), then p.grad += g
    if any(next(state.stream, None) is not None for state in states):
        raise ValueError("the engines chunk the micro-gradients differently; give them the same chunking")
    floors = {b: metrics.rel_l2_error(round_nearest(trial.reference, b), trial.reference) for b in formats}
    out = []
    for state in states:
        s = state.spec.loss_scale
        factor = 1.0 / s if state.spec.scaling == "pre" else 1.0 / (s * n_micro)  # unscale (and post's /N) once
        rows = []
        for acc in state.accs:
            c = state.counts[acc.format.name]
            m = metrics.compare(
                acc.scaled_value(factor),
                trial.reference,
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


def _check_loss_scale(s: object) -> float:
    return check_real(s, "loss scale", low=0.0, high=math.inf, low_open=True, high_open=True)


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
    passes = [Pass(scaling, float(s)) for scaling in config.scalings for s in config.loss_scales]

    def work(task: Task) -> list[dict[str, Any]]:
        w, compute, n, trial = task.workload, task.compute_format, task.n_accum, task.trial
        data = trials.data(w, trial)
        measured = measure(
            trials.engine(w, compute),
            trials.engine(w, "fp64"),
            data,
            n,
            buffers=config.buffers(compute),
            passes=passes,
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
                        "seed": data.data_seed,
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
        config=config,
        seed=seed,
        device=device,
        shard=shard,
        progress=progress,
    )
