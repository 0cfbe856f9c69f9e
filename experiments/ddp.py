"""DDP: does accumulating under ``no_sync`` give the single-process gradient with N times fewer all-reduces?

Real ``torch.distributed`` (gloo, ``world_size`` processes started by the experiment itself on this
machine; the same code runs on NCCL across GPUs).  Each rank takes its own N micro-batches of B
samples of one global batch; DDP averages over ranks, so every rank should end with the gradient of
the whole global batch.  For each N, model precision (fp64: the identity to rounding; fp32: what
users run), all-reduce precision (``native``: the gradients' own dtype, DDP's default; ``bf16``: ``bf16_compress_hook``) and mode
(:data:`MODES`: ``no_sync`` on all but the last micro-step, an all-reduce after every micro-step,
or ``no_sync`` with :class:`~precision_lab.training.GradientAccumulator` buffers), rank 0
records the all-reduce calls (counted by a wrapping comm hook: one per gradient bucket per sync),
the error against the fp64 large-batch gradient, and the largest difference from one process
accumulating all micro-batches in the same precision.

``run`` writes ``results.csv`` + ``metadata.json``; :mod:`experiments.figures.ddp` only reads them.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from precision_lab import metrics
from precision_lab.gradients import flat_gradients, reference_gradient
from precision_lab.lab.runner import run_tasks
from precision_lab.measure import stable_seed

NAME = "ddp"
COLUMNS = (
    "experiment",
    "workload",
    "model_format",
    "allreduce_format",
    "mode",
    "n_accum",
    "micro_batch",
    "world_size",
    "seed",
    "allreduces",
    "rel_l2_error",
    "max_abs_diff_vs_single_process",
)
_DTYPE = {"fp64": torch.float64, "fp32": torch.float32}
# plain DDP with no_sync on all but the last micro-step; an all-reduce after every micro-step; and
# no_sync with precision_lab's GradientAccumulator(ddp=...) buffers (the parameter's own format, which
# must reproduce plain no_sync bit for bit, and a bf16 Kahan buffer)
MODES = ("no_sync", "every_step", "no_sync, GradientAccumulator naive", "no_sync, GradientAccumulator bf16 kahan")


@dataclass(frozen=True)
class Config:
    """What to measure."""

    workload: str = "mlp"  # a model workload of precision_lab.workloads
    size: str = "full"  # its size preset
    world_size: int = 2  # processes (gloo on CPU)
    n_values: tuple[int, ...] = (1, 4, 16, 64)  # micro-batches per rank per optimizer step
    micro_batch: int = 8  # samples per micro-batch
    model_formats: tuple[str, ...] = ("fp64", "fp32")
    allreduce_formats: tuple[str, ...] = ("native", "bf16")  # native: the gradients' dtype; bf16: bf16_compress_hook
    warmup_steps: int | None = None  # workload default

    @classmethod
    def quick(cls) -> Config:
        """Seconds: the quick MLP, N up to 16."""
        return cls(size="quick", n_values=(1, 4, 16))


@dataclass(frozen=True)
class Task:
    """The whole grid is one task: every rank runs every (N, precision, mode) in one process group."""

    world_size: int  # processes


def _micro(xs: torch.Tensor, ys: torch.Tensor, i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (xs[i].to(dtype) if xs.is_floating_point() else xs[i]), ys[i]


def leave_process_group(rank: int, world: int, marker: str, timeout: float = 600.0) -> NoReturn:
    """End a gloo rank deterministically: barrier, destroy the group, wait for every rank, flush, ``os._exit(0)``.

    gloo's threads (``gloo_tcp_loop``, ``pt_gloo_runloop``) outlive ``destroy_process_group()`` while
    DDP modules still reference the group, and at a normal interpreter exit they are torn down by
    C++ static destructors while running: under CPU load a rank then dies with "terminate called
    without an active exception" (SIGABRT) after its work is done (pytorch/pytorch#190489, and
    #179291 on tearing gloo down during finalisation).  ``os._exit`` skips the interpreter's
    finalisation and those destructors; the kernel ends the threads.  Before that: the barrier
    (no collective is pending on any rank), the group destroyed, and a marker file per rank
    (``MARKER.left.RANK``) so that no rank closes its sockets while a peer is still inside gloo (at
    most ``timeout`` seconds: a peer that died is not waited for).  Output files must be written
    and closed before the call; stdout and stderr are flushed here.

    Under ``torch.multiprocessing.spawn`` the parent sees exit code 0, as for a normal return: its
    error queue is written only when the function raises, and an exception never reaches this call.
    """
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    Path(f"{marker}.left.{rank}").touch()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(os.path.exists(f"{marker}.left.{r}") for r in range(world)):
        time.sleep(0.01)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank: int, world: int, rendezvous: str, config: dict[str, Any], seed: int, out_file: str) -> None:
    """One rank: every (N, model format, all-reduce format, mode); rank 0 writes the rows as JSON."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    from precision_lab.training import GradientAccumulator
    from precision_lab.workloads import make_workload

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    wl = make_workload(cfg.workload, seed=seed, size=cfg.size, warmup_steps=cfg.warmup_steps)
    rows = []
    for n in cfg.n_values:
        data_seed = stable_seed(seed, n, "data")
        x, y = wl.sample(world * n * cfg.micro_batch, torch.Generator().manual_seed(data_seed))  # same on all ranks
        truth = reference_gradient(wl.model, wl.loss_fn, x, y)
        xs = x.reshape(world * n, cfg.micro_batch, *x.shape[1:])
        ys = y.reshape(world * n, cfg.micro_batch, *y.shape[1:])
        for mfmt in cfg.model_formats:
            dtype = _DTYPE[mfmt]

            single = copy.deepcopy(wl.model).to(dtype)  # one process, all world*N micro-batches
            for i in range(world * n):
                xi, yi = _micro(xs, ys, i, dtype)
                (wl.loss_fn(single(xi), yi) / (world * n)).backward()
            single_grad = flat_gradients(single)
            for afmt in cfg.allreduce_formats:
                for mode in MODES:
                    model = DDP(copy.deepcopy(wl.model).to(dtype))
                    acc = None
                    if mode.startswith("no_sync, GradientAccumulator"):  # the drop-in buffer under DDP
                        fmt, strategy = (None, "naive") if mode.endswith("naive") else ("bf16", "kahan")
                        acc = GradientAccumulator(model.parameters(), strategy=strategy, fmt=fmt, ddp=model)
                    calls = [0]
                    base = default_hooks.bf16_compress_hook if afmt == "bf16" else default_hooks.allreduce_hook

                    def hook(state, bucket, base=base, calls=calls):  # noqa: ANN001, ANN202 - DDP checks annotations
                        calls[0] += 1
                        return base(state, bucket)

                    model.register_comm_hook(None, hook)
                    for i in range(n):
                        last = i == n - 1
                        ctx = model.no_sync() if mode != "every_step" and not last else contextlib.nullcontext()
                        with ctx:
                            xi, yi = _micro(xs, ys, rank * n + i, dtype)  # rank r holds micro-batches [rN, (r+1)N)
                            (wl.loss_fn(model(xi), yi) / n).backward()  # DDP then averages over ranks
                    if acc is not None:
                        acc.write_grads()  # keeps the p.grad DDP all-reduced on the last micro-step
                        acc.remove()
                    got = flat_gradients(model.module)
                    total = torch.tensor([calls[0]])
                    dist.all_reduce(total)  # all ranks call the hook equally; check it
                    rows.append(
                        {
                            "experiment": NAME,
                            "workload": cfg.workload,
                            "model_format": mfmt,
                            "allreduce_format": afmt,
                            "mode": mode,
                            "n_accum": n,
                            "micro_batch": cfg.micro_batch,
                            "world_size": world,
                            "seed": data_seed,
                            "allreduces": calls[0] if int(total) == world * calls[0] else -1,
                            "rel_l2_error": metrics.rel_l2_error(got, truth),
                            "max_abs_diff_vs_single_process": float((got - single_grad).abs().max()),
                        }
                    )
    if rank == 0:
        Path(out_file).write_text(json.dumps(rows))
    leave_process_group(rank, world, rendezvous)


def run(
    config: Config,
    out_dir: str | Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> Path | None:
    """Start ``world_size`` gloo processes, measure, write ``results.csv`` (one task: the whole grid)."""
    if device != "cpu":
        raise ValueError(f"the ddp experiment runs gloo on CPU processes; --device {device!r} is not supported here")
    if config.world_size < 2:
        raise ValueError(f"world_size must be >= 2, got {config.world_size!r}")

    def work(task: Task) -> list[dict[str, Any]]:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            out_file = os.path.join(tmp, "rows.json")
            mp.spawn(
                _worker,
                args=(config.world_size, os.path.join(tmp, "rendezvous"), dataclasses.asdict(config), seed, out_file),
                nprocs=config.world_size,
                join=True,
            )
            return json.loads(Path(out_file).read_text())

    return run_tasks(
        NAME,
        out_dir,
        [Task(world_size=config.world_size)],
        work,
        columns=COLUMNS,
        config=config,
        seed=seed,
        device=device,
        shard=shard,
        progress=progress,
    )
