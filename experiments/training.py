"""Training: does the accumulation buffer change what a bf16 model learns, and from which N?

The MLP (digits) and the character transformer are trained from the same initialisation on the
same micro-batches, with bf16 parameters and each accumulation buffer of interest, next to an fp32
run and an fp64 run (fp64 parameters, ``exact`` buffer: the reference trajectory).  Each optimizer
step accumulates N micro-batches of B samples (``loss / N`` before backward), through
:class:`precision_lab.training.GradientAccumulator`: the only difference between the bf16 runs is
the buffer.  Every ``eval_every`` steps each run records its training loss (mean of the window's
micro-batch losses), the loss and accuracy on a fixed held-out batch, and the relative distance of
its weights from the fp64 run's weights at the same step.

``run`` writes ``results.csv`` + ``metadata.json`` (resumable, shardable); ``plot`` only reads them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from precision_lab._threads import intra_op_threads
from precision_lab.gradients import flat_parameters
from precision_lab.plotting import PALETTE, buffer_style, pyplot, save_figure, trial_means
from precision_lab.results import read_csv
from precision_lab.sweep import run_tasks, stable_seed
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

# (run label, parameter format, buffer format, strategy); the first is the reference trajectory.
RUNS: tuple[tuple[str, str, str, str], ...] = (
    ("fp64", "fp64", "fp64", "exact"),
    ("fp32", "fp32", "fp32", "naive"),
    ("bf16 params, fp32 buffer", "bf16", "fp32", "naive"),
    ("bf16 naive", "bf16", "bf16", "naive"),
    ("bf16 kahan", "bf16", "bf16", "kahan"),
    ("bf16 stochastic", "bf16", "bf16", "stochastic"),
    ("bf16 pairwise", "bf16", "bf16", "pairwise"),
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
    runs: tuple[str, ...] = tuple(r[0] for r in RUNS)  # which of RUNS to train

    @classmethod
    def quick(cls) -> Config:
        """Well under a minute on 2 cores: the MLP only, N up to 64, 20 steps, one trial."""
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

    def tasks(self) -> list[dict[str, Any]]:
        """One task per (workload, N, trial): every run trains in lockstep on the same batches."""
        if len(self.micro_batch) != len(self.workloads):
            raise ValueError(f"micro_batch {self.micro_batch} needs one entry per workload {self.workloads}")
        known = [r[0] for r in RUNS]
        bad = [r for r in self.runs if r not in known]
        if bad or "fp64" not in self.runs:
            raise ValueError(f"runs must include 'fp64' (the reference) and come from {known}; got {self.runs!r}")
        return [
            {"workload": w, "n_accum": n, "trial": t}
            for w in self.workloads
            for n in self.n_values
            for t in range(self.trials)
        ]


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
    runs = [r for r in RUNS if r[0] in config.runs]

    @functools.cache
    def workload(w: str) -> ModelWorkload:
        return make_workload(w, seed=seed, size=config.size, warmup_steps=0)  # train from initialisation

    def work(task: dict[str, Any]) -> list[dict[str, Any]]:
        # one intra-op thread: the bytes do not depend on the core count (multi-threaded GEMMs sum in
        # another order), and these small models gain nothing from more
        with intra_op_threads(1):
            return train(task)

    def train(task: dict[str, Any]) -> list[dict[str, Any]]:
        w, n, trial = task["workload"], task["n_accum"], task["trial"]
        wl, b = workload(w), micro[w]
        data_seed = stable_seed(seed, w, n, trial, "data")
        data = torch.Generator().manual_seed(data_seed)  # the same micro-batches for every run
        x_eval, y_eval = wl.sample(config.eval_size, torch.Generator().manual_seed(stable_seed(seed, w, "eval")))
        models, opts, accs = [], [], []
        for label, pfmt, bfmt, strategy in runs:
            m = copy.deepcopy(wl.model).to(device=device, dtype=_DTYPE[pfmt])
            models.append(m)
            opts.append(torch.optim.Adam(m.parameters(), lr=config.lr))
            gen = torch.Generator(device=device).manual_seed(stable_seed(seed, w, n, trial, label))
            accs.append(
                GradientAccumulator(
                    m.parameters(), strategy=strategy, fmt=bfmt, generator=gen if strategy == "stochastic" else None
                )
            )
        rows: list[dict[str, Any]] = []
        losses = [0.0] * len(runs)
        lost = [0] * len(runs)
        adds = [0] * len(runs)
        for step in range(1, config.steps + 1):
            losses = [0.0] * len(runs)
            for _ in range(n):
                x, y = wl.sample(b, data)
                x, y = x.to(device), y.to(device)
                for k, m in enumerate(models):
                    xk = x.to(_DTYPE[runs[k][1]]) if x.is_floating_point() else x
                    loss = wl.loss_fn(m(xk), y)
                    (loss / n).backward()  # "loss / N": each micro-gradient goes into the run's buffer
                    losses[k] += float(loss.detach()) / n
            for k in range(len(runs)):
                stats = accs[k].write_grads()
                lost[k] += stats["lost_updates"]
                adds[k] += stats["element_adds"]
                opts[k].step()
                opts[k].zero_grad()
            if step % config.eval_every and step != config.steps:
                continue
            ref = flat_parameters(models[0]).double()
            for k, (label, pfmt, bfmt, strategy) in enumerate(runs):
                with torch.no_grad():
                    xe = x_eval.to(device, _DTYPE[pfmt]) if x_eval.is_floating_point() else x_eval.to(device)
                    out = models[k](xe)
                    eval_loss = float(wl.loss_fn(out.double(), y_eval.to(device)))
                dist = float((flat_parameters(models[k]).double() - ref).norm() / ref.norm())
                rows.append(
                    {
                        "experiment": NAME,
                        "workload": w,
                        "run": label,
                        "param_format": pfmt,
                        "buffer_format": bfmt,
                        "strategy": strategy,
                        "n_accum": n,
                        "micro_batch": b,
                        "trial": trial,
                        "seed": data_seed,
                        "step": step,
                        "train_loss": losses[k],
                        "eval_loss": eval_loss,
                        "eval_accuracy": _accuracy(out, y_eval.to(device)),
                        "weight_distance": dist,
                        "lost_update_fraction": lost[k] / adds[k] if adds[k] else 0.0,
                    }
                )
        for acc in accs:
            acc.remove()
        return rows

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


def plot(out_dir: str | Path, fig_dir: str | Path) -> list[Path]:
    """Per workload: held-out loss vs step at the largest N; final loss gap to fp64 and weight distance vs N.

    The runs overlap at the scale of the loss itself, so rows 2 and 3 show differences from the fp64
    run, and every run has its own marker (coinciding runs stay visible as overlaid markers).
    """
    plt = pyplot()

    rows = read_csv(Path(out_dir) / "results.csv")
    workloads = sorted({r["workload"] for r in rows})
    runs = [r for r in RUNS if any(x["run"] == r[0] for x in rows)]
    last = max(int(r["step"]) for r in rows)
    fig, axes = plt.subplots(3, len(workloads), figsize=(5.5 * len(workloads), 10), squeeze=False)
    markers = dict(zip((r[0] for r in RUNS), "ovs^Dx+", strict=True))
    for j, w in enumerate(workloads):
        n_max = max(int(r["n_accum"]) for r in rows if r["workload"] == w)
        final = [r for r in rows if r["workload"] == w and int(r["step"]) == last]
        fp64 = dict(trial_means([r for r in final if r["run"] == "fp64"], "n_accum", "eval_loss"))
        for label, param, buffer, strategy in runs:
            mine = [r for r in rows if r["workload"] == w and r["run"] == label]
            own = {"fp64": PALETTE["black"], "fp32": PALETTE["sky"], "bf16 params, fp32 buffer": PALETTE["purple"]}
            color = own.get(label, buffer_style(buffer, strategy)["color"])  # bf16 buffers: the strategy's colour
            kw = {
                "color": color,
                "marker": markers[label],
                "markersize": 5,
                "markerfacecolor": "none",
                "linewidth": 1.1,
                "linestyle": "-" if param != "bf16" else "--",
                "label": label,
            }
            curve = trial_means([r for r in mine if int(r["n_accum"]) == n_max], "step", "eval_loss")
            axes[0, j].plot(*zip(*curve, strict=True), **kw)
            if label == "fp64":  # the reference: at distance 0 from itself
                continue
            mine_final = [r for r in final if r["run"] == label]
            gap = [(n, m - fp64[n]) for n, m in trial_means(mine_final, "n_accum", "eval_loss")]
            axes[1, j].plot(*zip(*gap, strict=True), **kw)
            dist = [(n, max(d, 1e-12)) for n, d in trial_means(mine_final, "n_accum", "weight_distance")]
            axes[2, j].plot(*zip(*dist, strict=True), **kw)
        axes[0, j].set_title(f"{w}: held-out loss during training, N = {n_max}", fontsize=10)
        axes[0, j].set_xlabel("optimizer step")
        axes[0, j].set_ylabel("held-out loss (nats)")
        axes[1, j].set_title(f"{w}: after {last} optimizer steps", fontsize=10)
        axes[1, j].set_ylabel("held-out loss - fp64 run's (nats)")
        axes[1, j].axhline(0.0, color="k", linewidth=0.6)
        axes[2, j].set_ylabel("|w - w_fp64| / |w_fp64| (trial mean)")
        axes[2, j].set_yscale("log")
        for ax in axes[1:, j]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("accumulation count N (micro-batches per step)")
    axes[0, -1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))  # outside: hides no data
    fig.suptitle("Training with bf16 parameters: which accumulation buffer, from which N? (mean of trials)")
    return [save_figure(fig, fig_dir, NAME)]
