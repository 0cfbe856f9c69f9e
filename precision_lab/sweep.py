"""Sweeps: accumulate streams of micro-gradients into many buffers at once, resumably, in shards.

Two layers:

* **Measurement** (:func:`accumulate`): one pass over a stream of micro-gradients feeds every
  buffer configuration (format x strategy) at once and, at every accumulation count N in
  ``record``, compares each buffer's value with the fp64 reference.  A whole curve up to N_max
  therefore costs one accumulation of N_max micro-gradients (plus one comparison per recorded N),
  not the sum over N.  :func:`fixed_effective`, :func:`fixed_micro` and :func:`stream` build the
  passes of the two batch regimes and of synthetic streams on top of it.

* **Execution** (:func:`run_tasks`): a grid is a list of *tasks* (JSON-able dicts), each computed by
  the experiment into rows.  Each finished task is written atomically to its own part file under
  ``OUT/.parts/<fingerprint>/``; a run killed at any moment (SIGKILL included) leaves only complete
  files, and running again skips the finished tasks.  ``shard=(i, k)`` computes the i-th of k
  interleaved parts of the task list, so a sweep spreads over processes or array jobs.  When every
  task has a part, ``results.csv`` is the concatenation of the parts in task order, so it is the
  same bytes however the work was split.  The fingerprint hashes the experiment, config, seed,
  device, torch and Python versions and a digest of the package and experiment sources: a changed
config or changed code (committed or not) never reuses stale parts, and a ``results.csv`` of
another fingerprint is removed when a run starts, so ``plot`` never reads a stale one.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import math
import platform
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from precision_lab import metrics
from precision_lab.accumulators import Accumulator
from precision_lab.formats import get_format
from precision_lab.gradients import GradientEngine, reference_gradient, split
from precision_lab.results import atomic_write_text, remove_stale_temporaries, write_csv, write_metadata
from precision_lab.rounding import round_nearest
from precision_lab.workloads import ModelWorkload, make_workload

__all__ = [
    "SCALINGS",
    "TrialData",
    "accumulate",
    "fixed_effective",
    "fixed_micro",
    "parse_shard",
    "power_grid",
    "run_tasks",
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
    bad = [n for n in record if isinstance(n, bool) or not isinstance(n, int) or n < 1]
    if bad or not record:
        raise ValueError(f"accumulation counts must be integers >= 1, got {sorted(record, key=str)!r}")
    return sorted(set(record))


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
            micro-gradients (a double-double sum, then one division).
        buffers: ``(format, strategy)`` pairs.
        scaling: ``post`` quantises g_i and divides the sum by N (one pass records every N);
            ``pre`` quantises g_i/N, which depends on N, so each N is its own pass over the same
            draws.
        seed: Seed of the stochastic rounding.
        chunk_size: Micro-gradients drawn per call of ``samples``.
        device: Where buffers live.
    """
    want = _check_record(record)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
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


class TrialData:
    """Workloads, each trial's batch with its fp64 gradient, and gradient engines, built once and cached.

    The experiments that split a fixed effective batch of a real model (model-gradients, underflow,
    memory-pareto) share this: a trial's batch is the same for every N, precision and buffer, and
    drawn from ``stable_seed(seed, workload, trial, "data")``.

    Args:
        effective_batch: ``{workload name: E}``.
        seed: The experiment's base seed (workload initialisation and warm-up, data draws).
        size: Workload size preset ("full" or "quick").
        warmup_steps: fp32 Adam steps before measuring (None: the workload's default).
        device: Where gradients are computed.
        method, chunk_size, chunk_samples: passed to :class:`GradientEngine`.
    """

    def __init__(
        self,
        effective_batch: Mapping[str, int],
        *,
        seed: int,
        size: str,
        warmup_steps: int | None,
        device: str = "cpu",
        method: str = "vmap",
        chunk_size: int = 64,
        chunk_samples: int = 256,
    ) -> None:
        self.effective_batch = dict(effective_batch)
        self.seed, self.size, self.warmup_steps, self.device = seed, size, warmup_steps, device
        self.engine_options = {"method": method, "chunk_size": chunk_size, "chunk_samples": chunk_samples}
        self._workloads: dict[str, ModelWorkload] = {}
        self._data: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = {}
        self._engines: dict[tuple[str, str], GradientEngine] = {}

    @classmethod
    def for_config(cls, config: Any, *, seed: int, device: str) -> TrialData:
        """The trial data of an experiment config (model-gradients, underflow, memory-pareto).

        Reads ``workloads``, ``effective_batch``, ``size``, ``warmup_steps``, ``method``, ``chunk_size``
        and ``chunk_samples``.
        """
        return cls(
            dict(zip(config.workloads, config.effective_batch, strict=True)),
            seed=seed,
            size=config.size,
            warmup_steps=config.warmup_steps,
            device=device,
            method=config.method,
            chunk_size=config.chunk_size,
            chunk_samples=config.chunk_samples,
        )

    def workload(self, name: str) -> ModelWorkload:
        """The warmed-up workload ``name``."""
        if name not in self._workloads:
            self._workloads[name] = make_workload(name, seed=self.seed, size=self.size, warmup_steps=self.warmup_steps)
        return self._workloads[name]

    def data(self, name: str, trial: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """The trial's batch ``(x, y)``, its fp64 large-batch gradient and its data seed."""
        if (name, trial) not in self._data:
            wl = self.workload(name)
            data_seed = stable_seed(self.seed, name, trial, "data")
            x, y = wl.sample(self.effective_batch[name], torch.Generator().manual_seed(data_seed))
            ref = reference_gradient(wl.model, wl.loss_fn, x, y, device=self.device)
            self._data[(name, trial)] = (x, y, ref, data_seed)
        return self._data[(name, trial)]

    def engine(self, name: str, compute: str) -> GradientEngine:
        """The gradient engine of workload ``name`` in precision ``compute``."""
        if (name, compute) not in self._engines:
            wl = self.workload(name)
            self._engines[(name, compute)] = GradientEngine(
                wl.model, wl.loss_fn, compute, device=self.device, **self.engine_options
            )
        return self._engines[(name, compute)]


def power_grid(n_max: int, *, divides: int | None = None) -> list[int]:
    """1, 2, 4, ... up to ``n_max`` (and ``n_max`` itself); only divisors of ``divides`` if given."""
    if isinstance(n_max, bool) or not isinstance(n_max, int) or n_max < 1:
        raise ValueError(f"N_max must be an integer >= 1, got {n_max!r}")
    grid = sorted({2**k for k in range(int(math.log2(n_max)) + 1)} | {n_max})
    if divides is not None:
        for n in grid:
            split(divides, n)
    return grid


# --------------------------------------------------------------------------------------------------
# execution: resumable, shardable task lists
# --------------------------------------------------------------------------------------------------
def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/K"`` -> (I, K) with 1 <= I <= K; None passes through; ValueError names the bad value."""
    if text is None:
        return None
    try:
        i, k = (int(p) for p in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/K (e.g. 2/8), got {text!r}") from None
    if not 1 <= i <= k:
        raise ValueError(f"--shard {text!r}: need 1 <= I <= K")
    return i, k


# Modules that never touch a result's numbers or bytes: editing a figure or the command line must not
# invalidate hours of finished sweeps.
_PRESENTATION = ("plotting.py", "cli.py")


def _without_plot(source: bytes) -> bytes:
    """An experiment module's code without its ``plot`` function (which only reads stored results)."""
    tree = ast.parse(source)
    tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name == "plot")]
    return ast.dump(tree, include_attributes=False).encode()


@functools.cache
def code_digest(module: str | None = None) -> str:
    """sha256 (16 hex digits) of the code that computes a sweep's results, as on disk.

    Hashes every ``.py`` file of ``precision_lab`` except the presentation-only modules
    (``plotting.py``, ``cli.py``), plus the experiment module ``module`` (a module name such as
    ``"experiments.training"``; None: every ``experiments/*.py``) without its ``plot`` function
    (its syntax tree, so comments do not count either).  Part of the sweep fingerprint, so that
    edited code (committed or not, installed from git or not) never reuses parts computed by other
    code, while editing a figure or another experiment leaves finished parts valid.
    """
    h = hashlib.sha256()
    package = Path(__file__).resolve().parent
    files = [f for f in sorted(package.rglob("*.py")) if f.relative_to(package).as_posix() not in _PRESENTATION]
    for f in files:
        h.update(f.relative_to(package.parent).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    spec = importlib.util.find_spec(module or "experiments")
    if spec is not None and spec.origin is not None:
        origin = Path(spec.origin).resolve()
        for f in [origin] if module else sorted(origin.parent.rglob("*.py")):
            h.update(f.relative_to(package.parent).as_posix().encode() + b"\0" + _without_plot(f.read_bytes()) + b"\0")
    return h.hexdigest()[:16]


def _fingerprint(
    experiment: str, config: Mapping[str, Any], seed: int, device: str, columns: Sequence[str], module: str | None
) -> str:
    key = {
        "experiment": experiment,
        "config": config,
        "seed": seed,
        "device": device,
        "columns": list(columns),
        "code": code_digest(module),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _drop_stale_results(out: Path, fingerprint: str) -> None:
    """Remove ``results.csv``/``metadata.json`` written for another fingerprint (config, code, seed...).

    Until this grid completes, ``plot`` then finds no results instead of silently reading another
    configuration's.
    """
    meta = out / "metadata.json"
    try:
        old = json.loads(meta.read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError):
        old = None
    if old != fingerprint:
        (out / "results.csv").unlink(missing_ok=True)
        meta.unlink(missing_ok=True)


def run_tasks(
    experiment: str,
    out_dir: str | Path,
    tasks: Sequence[Mapping[str, Any]],
    work: Callable[[Mapping[str, Any]], list[dict[str, Any]]],
    *,
    columns: Sequence[str],
    config: Mapping[str, Any],
    seed: int,
    device: str = "cpu",
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> Path | None:
    """Compute every unfinished task of this shard, then merge if the whole grid is done.

    Args:
        experiment: Name written to metadata and hashed into the fingerprint.
        out_dir: ``DIR/EXPERIMENT``; gets ``results.csv``, ``metadata.json`` and ``.parts/``.
        tasks: The grid, in its canonical order (JSON-able dicts).
        work: ``work(task)`` -> the task's rows (dicts with every column of ``columns``).
        columns: The CSV columns.
        config: The experiment's full config (hashed; written to metadata).
        seed: Base seed (hashed; written to metadata).
        device: Device the work runs on.
        shard: ``(i, k)``: compute only tasks ``j`` with ``j % k == i - 1``.
        progress: Show a progress bar (counts and ETA) on stderr.

    Returns:
        The path of ``results.csv`` once every task of the grid is finished, else None.
    """
    out = Path(out_dir)
    # The experiment's own module is hashed, not every experiment's: by convention experiment "a-b"
    # lives in ``experiments.a_b``; a name without such a module hashes every experiment module.
    module = "experiments." + experiment.replace("-", "_")
    module = module if importlib.util.find_spec("experiments") and importlib.util.find_spec(module) else None
    fingerprint = _fingerprint(experiment, config, seed, device, columns, module)
    parts = out / ".parts" / fingerprint
    parts.mkdir(parents=True, exist_ok=True)
    _drop_stale_results(out, fingerprint)
    remove_stale_temporaries(parts)  # half-written parts of a killed run (never a finished one)
    remove_stale_temporaries(out)
    started_file = parts / "started"
    if not started_file.exists():
        atomic_write_text(started_file, datetime.now(timezone.utc).isoformat() + "\n")

    def part(j: int) -> Path:
        return parts / f"{j:06d}.csv"

    mine = [j for j in range(len(tasks)) if shard is None or j % shard[1] == shard[0] - 1]
    todo = [j for j in mine if not part(j).exists()]
    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(todo),
        desc=experiment,
        unit="task",
        disable=not progress,
        dynamic_ncols=True,
    )
    with bar:
        for j in todo:
            bar.set_postfix_str(", ".join(f"{k}={v}" for k, v in tasks[j].items()), refresh=False)
            write_csv(part(j), work(tasks[j]), columns)  # atomic: a kill leaves no half part
            bar.update(1)
    if not all(part(j).exists() for j in range(len(tasks))):
        return None
    header = ",".join(columns) + "\n"
    body = []
    for j in range(len(tasks)):
        text = part(j).read_text(encoding="utf-8")
        if not text.startswith(header):
            raise ValueError(f"part {part(j)} has other columns than {list(columns)}; delete {parts} and rerun")
        body.append(text[len(header) :])
    atomic_write_text(out / "results.csv", header + "".join(body))
    started = datetime.fromisoformat(started_file.read_text().strip())
    write_metadata(
        out / "metadata.json",
        config={**config, "tasks": len(tasks), "parts": str(parts.relative_to(out))},
        seed=seed,
        device=device,
        started=started,
        extra={"experiment": experiment, "fingerprint": fingerprint, "code": code_digest(module)},
    )
    return out / "results.csv"
