"""Measurement: one pass of micro-gradients into many buffers at once, against an fp64 reference.

:func:`accumulate` feeds one stream of micro-gradients to every buffer configuration (format x
strategy) at once and, at every accumulation count N in ``record``, compares each buffer's value
with the fp64 reference.  A whole curve up to N_max therefore costs one accumulation of N_max
micro-gradients (plus one comparison per recorded N), not the sum over N.  :func:`fixed_effective`,
:func:`fixed_micro` and :func:`stream` build the passes of the two batch regimes and of synthetic
streams on top of it.

This module is library: it knows nothing of tasks, part files or figures.  Running a grid of such
passes resumably is the lab's job (:mod:`precision_lab.lab.runner`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Any

import torch

from precision_lab import metrics
from precision_lab.accumulators import Accumulator
from precision_lab.checks import check_int, check_ints
from precision_lab.formats import get_format
from precision_lab.gradients import GradientEngine, split
from precision_lab.rounding import round_nearest

__all__ = [
    "MEASURE_COLUMNS",
    "SCALINGS",
    "accumulate",
    "fixed_effective",
    "fixed_micro",
    "power_grid",
    "stable_seed",
    "stream",
]

SCALINGS: tuple[str, ...] = ("pre", "post")
MEASURE_COLUMNS: tuple[str, ...] = ("buffer_format", "strategy", "n_accum", *metrics.METRIC_NAMES, "quantisation_floor")


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any JSON-able parts, stable across processes and Python versions."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _check_scaling(scaling: str) -> str:
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; known: {', '.join(SCALINGS)}")
    return scaling


def _check_record(record: Collection[int]) -> list[int]:
    return sorted(set(check_ints(sorted(record, key=str), "accumulation counts")))


# --------------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------------
def accumulate(
    chunks: Iterable[torch.Tensor],
    buffers: Sequence[tuple[str, str]],
    *,
    record: Collection[int],
    reference: Callable[[int], torch.Tensor],
    factor: Callable[[int], float],
    seed: int,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """Feed one stream of micro-gradients to every buffer; measure each at every N in ``record``.

    Args:
        chunks: The micro-gradients g_1, g_2, ... as tensors of shape ``(k, P)`` (any float dtype);
            the stream must hold at least ``max(record)`` of them (extra ones are not read).
        buffers: ``(format, strategy)`` pairs; each gets an :class:`Accumulator`.  Its stochastic
            rounding draws from a generator seeded by ``(seed, format, strategy)``, so adding a
            buffer to the list does not change the others' bits.
        record: The accumulation counts N at which to measure.
        reference: ``reference(N)`` -> the fp64 truth the accumulated gradient estimates at N.
        factor: ``factor(N)`` -> the scaling applied to the buffer before comparing (1/N for the
            ``post`` placement, 1 for ``pre``, times 1/S for a loss scale S), rounded in the buffer
            format (:meth:`Accumulator.scaled_value`).
        seed: Seed of the buffers' stochastic rounding.
        device: Where the buffers live.

    Returns:
        One dict per (buffer, N): ``buffer_format``, ``strategy``, ``n_accum``, the metrics of
        :func:`precision_lab.metrics.compare`, and ``quantisation_floor``, the relative error of the
        reference itself rounded once to the buffer format: no read-out that is a vector of format
        numbers (naive, stochastic, pairwise) can be closer.  Kahan's ``s - c`` and ``exact``'s
        pair carry more bits than one format number and can go below it.

    Raises:
        ValueError: A bad N, an unknown format/strategy, or a stream shorter than ``max(record)``.
    """
    want = _check_record(record)
    accs: list[Accumulator] | None = None
    n = 0
    rows: list[dict[str, Any]] = []
    for chunk in chunks:
        if chunk.dim() != 2:
            raise ValueError(f"micro-gradient chunks must have shape (k, P), got {tuple(chunk.shape)}")
        if accs is None:
            accs = [
                Accumulator(
                    strategy,
                    fmt,
                    (chunk.shape[1],),
                    device=device,
                    generator=torch.Generator(device=device).manual_seed(stable_seed(seed, fmt, strategy)),
                )
                for fmt, strategy in buffers
            ]
        for g in chunk:
            n += 1
            for acc in accs:
                acc.add(g)
            if n in want:
                ref = reference(n).to(device=device, dtype=torch.float64)
                f = factor(n)
                floors: dict[str, float] = {}
                for acc in accs:
                    name = acc.format.name
                    if name not in floors:
                        floors[name] = metrics.rel_l2_error(round_nearest(ref, acc.format), ref)
                    m = metrics.compare(
                        acc.scaled_value(f),
                        ref,
                        acc.format,
                        lost_updates=acc.lost_updates,
                        element_adds=acc.element_adds,
                    )
                    rows.append(
                        {
                            "buffer_format": name,
                            "strategy": acc.strategy,
                            "n_accum": n,
                            **m,
                            "quantisation_floor": floors[name],
                        }
                    )
            if n == want[-1]:
                return rows
    raise ValueError(f"the stream ended after {n} micro-gradients; N={want[-1]} was asked for")


def _factor(scaling: str, loss_scale: float) -> Callable[[int], float]:
    if _check_scaling(scaling) == "pre":
        return lambda n: 1.0 / loss_scale  # each g_i already carries 1/N
    return lambda n: 1.0 / (loss_scale * n)  # sum, then one division (and the unscale)


def fixed_effective(
    engine: GradientEngine,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    reference: torch.Tensor,
    n_micro: int,
    buffers: Sequence[tuple[str, str]],
    *,
    scaling: str,
    seed: int,
    loss_scale: float = 1.0,
) -> list[dict[str, Any]]:
    """Fixed effective batch: the E samples split into N micro-batches of E/N, one pass for this N.

    ``pre`` divides each micro-batch loss by N before backward; ``post`` accumulates the
    undivided gradients and divides the sum once.  ``reference`` is the fp64 gradient of all E
    samples (:func:`~precision_lab.gradients.reference_gradient`).
    """
    chunks = engine.micro_gradients(
        inputs, targets, n_micro, divide_by=n_micro if scaling == "pre" else 1, loss_scale=loss_scale
    )
    return accumulate(
        chunks,
        buffers,
        record={n_micro},
        reference=lambda n: reference,
        factor=_factor(scaling, loss_scale),
        seed=seed,
        device=engine.device,
    )


def fixed_micro(
    engine: GradientEngine,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    micro_batch: int,
    record: Collection[int],
    buffers: Sequence[tuple[str, str]],
    *,
    scaling: str,
    seed: int,
    loss_scale: float = 1.0,
) -> list[dict[str, Any]]:
    """Fixed micro-batch B, growing N: micro-batch i holds samples [iB, (i+1)B) of ``inputs``.

    The reference at N is the fp64 gradient of the first N*B samples (one pass each).  With ``post``
    scaling the micro-gradients do not depend on N, so one pass records every N of ``record``.
    With ``pre`` scaling micro-gradient i is the gradient of loss/N, which depends on N, so each N
    is its own pass; for N on a power-of-two grid that costs at most twice one pass to N_max.
    """
    want = _check_record(record)
    n_max = want[-1]
    if inputs.shape[0] < n_max * micro_batch:
        raise ValueError(
            f"N_max={n_max} micro-batches of {micro_batch} need {n_max * micro_batch} samples, got {inputs.shape[0]}"
        )
    refs: dict[int, torch.Tensor] = {}

    def reference(n: int) -> torch.Tensor:
        if n not in refs:
            refs[n] = engine.reference(inputs[: n * micro_batch], targets[: n * micro_batch])
        return refs[n]

    if _check_scaling(scaling) == "post":
        chunks = engine.micro_gradients(
            inputs[: n_max * micro_batch], targets[: n_max * micro_batch], n_max, loss_scale=loss_scale
        )
        return accumulate(
            chunks,
            buffers,
            record=want,
            reference=reference,
            factor=_factor(scaling, loss_scale),
            seed=seed,
            device=engine.device,
        )
    rows = []
    for n in want:
        chunks = engine.micro_gradients(
            inputs[: n * micro_batch], targets[: n * micro_batch], n, divide_by=n, loss_scale=loss_scale
        )
        rows += accumulate(
            chunks,
            buffers,
            record={n},
            reference=reference,
            factor=_factor(scaling, loss_scale),
            seed=seed,
            device=engine.device,
        )
    return rows


def stream(
    samples: Callable[[int], torch.Tensor],
    compute: str,
    record: Collection[int],
    buffers: Sequence[tuple[str, str]],
    *,
    scaling: str,
    seed: int,
    chunk_size: int = 256,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """A synthetic stream: micro-gradients drawn in fp64, quantised to ``compute``, accumulated.

    Args:
        samples: ``samples(k)`` -> the next k fp64 micro-gradients, shape ``(k, P)`` (a stateful
            draw, e.g. ``GradientStream.sample`` bound to a generator).
        compute: Format the micro-gradients arrive in (RN from fp64: input quantisation).
        record: The counts N to measure; the truth at N is the exact mean of the first N fp64
            micro-gradients (the exact sum, correctly rounded, then one division).
        buffers: ``(format, strategy)`` pairs.
        scaling: ``post`` quantises g_i and divides the sum by N (one pass records every N);
            ``pre`` quantises g_i/N, which depends on N, so each N is its own pass over the same
            draws.
        seed: Seed of the stochastic rounding.
        chunk_size: Micro-gradients drawn per call of ``samples``.
        device: Where buffers live.
    """
    want = _check_record(record)
    check_int(chunk_size, "chunk_size")
    fmt = get_format(compute)
    drawn: list[torch.Tensor] = []  # fp64 micro-gradients, kept so every pass sees the same stream
    total = 0
    while total < want[-1]:
        k = min(chunk_size, want[-1] - total)
        drawn.append(samples(k).to(device=device, dtype=torch.float64))
        if drawn[-1].shape[0] != k:
            raise ValueError(f"samples({k}) returned {drawn[-1].shape[0]} rows")
        total += k
    exact = Accumulator("exact", "fp64", (drawn[0].shape[1],), device=device)
    truth: dict[int, torch.Tensor] = {}
    n = 0
    for chunk in drawn:
        for g in chunk:
            n += 1
            exact.add(g)
            if n in want:
                truth[n] = exact.value() / n

    def quantised(divisor: int) -> Iterator[torch.Tensor]:
        for chunk in drawn:
            yield round_nearest(chunk / divisor if divisor != 1 else chunk, fmt)

    if _check_scaling(scaling) == "post":
        return accumulate(
            quantised(1),
            buffers,
            record=want,
            reference=truth.__getitem__,
            factor=lambda n: 1.0 / n,
            seed=seed,
            device=device,
        )
    rows = []
    for n in want:
        rows += accumulate(
            quantised(n),
            buffers,
            record={n},
            reference=truth.__getitem__,
            factor=lambda n: 1.0,
            seed=seed,
            device=device,
        )
    return rows


def power_grid(n_max: int, *, divides: int | None = None) -> list[int]:
    """1, 2, 4, ... up to ``n_max`` (and ``n_max`` itself); only divisors of ``divides`` if given."""
    check_int(n_max, "N_max")
    grid = sorted({2**k for k in range(int(math.log2(n_max)) + 1)} | {n_max})
    if divides is not None:
        for n in grid:
            split(divides, n)
    return grid
