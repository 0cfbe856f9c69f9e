"""Training: does the accumulation buffer change what a bf16 model learns, and from which N?

The MLP (digits) and the character transformer are trained from the same initialisation on the
same micro-batches, with bf16 parameters and each accumulation buffer of interest, next to an fp32
run and an fp64 run (fp64 parameters, ``exact`` buffer: the reference trajectory).  Each optimizer
step accumulates N micro-batches of B samples (``loss / N`` before backward), through
:class:`precision_lab.training.GradientAccumulator`: the only difference between the bf16 runs is
the buffer.  Every ``eval_every`` steps each run records its training loss (mean of the window's
micro-batch losses), the loss and accuracy on a fixed held-out batch, and the relative distance of
its weights from the fp64 run's weights at the same step.

``run`` writes ``results.csv`` + ``metadata.json`` (resumable, shardable);
:mod:`experiments.figures.training` only reads them.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from precision_lab._threads import intra_op_threads
from precision_lab.checks import check_choices
from precision_lab.gradients import flat_parameters
from precision_lab.lab.runner import run_tasks
from precision_lab.measure import stable_seed
from precision_lab.training import GradientAccumulator
from precision_lab.workloads import ModelWorkload, make_workload

NAME = "training"
COLUMNS = (
    "experiment",
    "workload",
    "run",
    "param_format",
    "buffer_format",
    "strategy",
    "n_accum",
    "micro_batch",
    "trial",
    "seed",
    "step",
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "weight_distance",
    "lost_update_fraction",
)
_DTYPE = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}


class Run(NamedTuple):
    """One training run: parameters in one format, gradients accumulated in one buffer."""

    label: str  # the run's name (the ``run`` column)
    param_format: str  # format of the parameters (and of the micro-gradients)
    buffer_format: str  # format of the accumulation buffer
    strategy: str  # accumulation strategy of the buffer


# The runs trained side by side; the first is the reference trajectory.
RUNS: tuple[Run, ...] = (
    Run("fp64", "fp64", "fp64", "exact"),
    Run("fp32", "fp32", "fp32", "naive"),
    Run("bf16 params, fp32 buffer", "bf16", "fp32", "naive"),
    Run("bf16 naive", "bf16", "bf16", "naive"),
    Run("bf16 kahan", "bf16", "bf16", "kahan"),
    Run("bf16 neumaier", "bf16", "bf16", "neumaier"),
    Run("bf16 stochastic", "bf16", "bf16", "stochastic"),
    Run("bf16 pairwise", "bf16", "bf16", "pairwise"),
)


@dataclass(frozen=True)
class Config:
    """What to train."""

    workloads: tuple[str, ...] = ("mlp", "transformer")
    micro_batch: tuple[int, ...] = (4, 2)  # B per workload (samples; sequences for text)
    size: str = "full"  # workload size preset
    n_values: tuple[int, ...] = (1, 8, 64, 256)  # accumulation counts N
    steps: int = 60  # optimizer steps per run
    eval_every: int = 10  # record every this many steps (and the last)
    eval_size: int = 512  # held-out samples for eval loss / accuracy
    lr: float = 1e-3  # Adam learning rate (the same for every run)
    trials: int = 2  # seeds: data order and stochastic rounding
    runs: tuple[str, ...] = tuple(r.label for r in RUNS)  # which of RUNS to train

    @classmethod
    def quick(cls) -> Config:
        """The MLP only, N up to 64, 20 steps, one trial."""
        return cls(
            workloads=("mlp",),
            micro_batch=(4,),
            size="quick",
            n_values=(1, 8, 64),
            steps=20,
            eval_every=5,
            eval_size=256,
            trials=1,
        )

    def tasks(self) -> list[Task]:
        """One task per (workload, N, trial): every run trains in lockstep on the same batches."""
        if len(self.micro_batch) != len(self.workloads):
            raise ValueError(f"micro_batch {self.micro_batch} needs one entry per workload {self.workloads}")
        check_choices(self.runs, "runs", [r.label for r in RUNS])
        if "fp64" not in self.runs:
            raise ValueError(f"runs must include 'fp64' (the reference trajectory), got {self.runs!r}")
        tasks = []
        for w in self.workloads:
            for n in self.n_values:
                tasks += [Task(workload=w, n_accum=n, trial=t) for t in range(self.trials)]
        return tasks


@dataclass(frozen=True)
class Task:
    """Every run of one (workload, N, trial), trained in lockstep."""

    workload: str  # a model workload of precision_lab.workloads
    n_accum: int  # micro-batches per optimizer step
    trial: int  # seeds the data order and stochastic rounding


@dataclass
class _Trainee:
    """One run during a task: its model, optimizer and buffer, and the buffer's counts so far."""

    run: Run  # which run
    model: torch.nn.Module  # its parameters, in the run's parameter format
    opt: torch.optim.Optimizer  # Adam
    acc: GradientAccumulator  # the accumulation buffer
    lost: int = 0  # updates lost in the buffer so far
    adds: int = 0  # element adds into the buffer so far


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    pred = logits.reshape(-1, logits.shape[-1]).argmax(-1)
    return float((pred == targets.reshape(-1)).double().mean())


def run(
    config: Config,
    out_dir: str | Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> Path | None:
    """Run (or resume) the training grid; returns ``results.csv`` once it is complete."""
    micro = dict(zip(config.workloads, config.micro_batch, strict=True))
    runs = [r for r in RUNS if r.label in config.runs]

    @functools.cache
    def workload(w: str) -> ModelWorkload:
        return make_workload(w, seed=seed, size=config.size, warmup_steps=0)  # train from initialisation

    def work(task: Task) -> list[dict[str, Any]]:
        # one intra-op thread: the bytes do not depend on the core count (multi-threaded GEMMs sum in
        # another order), and these small models gain nothing from more
        with intra_op_threads(1):
            return train(task)

    def train(task: Task) -> list[dict[str, Any]]:
        w, n, trial = task.workload, task.n_accum, task.trial
        wl, b = workload(w), micro[w]
        data_seed = stable_seed(seed, w, n, trial, "data")
        data = torch.Generator().manual_seed(data_seed)  # the same micro-batches for every run
        x_eval, y_eval = wl.sample(config.eval_size, torch.Generator().manual_seed(stable_seed(seed, w, "eval")))
        trainees = []
        for r in runs:
            m = copy.deepcopy(wl.model).to(device=device, dtype=_DTYPE[r.param_format])
            opt = torch.optim.Adam(m.parameters(), lr=config.lr)
            gen = torch.Generator(device=device).manual_seed(stable_seed(seed, w, n, trial, r.label))
            acc = GradientAccumulator(
                m.parameters(),
                strategy=r.strategy,
                fmt=r.buffer_format,
                generator=gen if r.strategy == "stochastic" else None,
                count_lost=True,  # the lost_update_fraction column
            )
            trainees.append(_Trainee(r, m, opt, acc))
        rows: list[dict[str, Any]] = []
        for step in range(1, config.steps + 1):
            losses = [0.0] * len(trainees)  # the window's mean micro-batch loss, per run
            for _ in range(n):
                x, y = wl.sample(b, data)
                x, y = x.to(device), y.to(device)
                for k, t in enumerate(trainees):
                    xk = x.to(_DTYPE[t.run.param_format]) if x.is_floating_point() else x
                    loss = wl.loss_fn(t.model(xk), y)
                    (loss / n).backward()  # "loss / N": each micro-gradient goes into the run's buffer
                    losses[k] += float(loss.detach()) / n
            for t in trainees:
                stats = t.acc.write_grads()
                t.lost += stats["lost_updates"]
                t.adds += stats["element_adds"]
                t.opt.step()
                t.opt.zero_grad()
            if step % config.eval_every and step != config.steps:
                continue
            ref = flat_parameters(trainees[0].model).double()
            for t, train_loss in zip(trainees, losses, strict=True):
                with torch.no_grad():
                    fmt = _DTYPE[t.run.param_format]
                    xe = x_eval.to(device, fmt) if x_eval.is_floating_point() else x_eval.to(device)
                    out = t.model(xe)
                    eval_loss = float(wl.loss_fn(out.double(), y_eval.to(device)))
                dist = float((flat_parameters(t.model).double() - ref).norm() / ref.norm())
                rows.append(
                    {
                        "experiment": NAME,
                        "workload": w,
                        "run": t.run.label,
                        "param_format": t.run.param_format,
                        "buffer_format": t.run.buffer_format,
                        "strategy": t.run.strategy,
                        "n_accum": n,
                        "micro_batch": b,
                        "trial": trial,
                        "seed": data_seed,
                        "step": step,
                        "train_loss": train_loss,
                        "eval_loss": eval_loss,
                        "eval_accuracy": _accuracy(out, y_eval.to(device)),
                        "weight_distance": dist,
                        "lost_update_fraction": t.lost / t.adds if t.adds else 0.0,
                    }
                )
        for t in trainees:
            t.acc.remove()
        return rows

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
