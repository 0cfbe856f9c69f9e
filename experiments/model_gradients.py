"""Model gradients: how far is the accumulated gradient of a real model from the large-batch one?

A fixed effective batch of E samples is split into N micro-batches of E/N; each micro-gradient is
computed in a compute precision (fp32, pure bf16, ...) and accumulated in every buffer format x
strategy; the result is compared with the gradient of all E samples computed once in fp64.  The
buffer ``fp64 exact`` sums the micro-gradients as they arrive without rounding, so its error is the
input quantisation alone; every other buffer adds its accumulation rounding on top.  ``pre``
divides each micro-batch loss by N before backward (``loss / N``), ``post`` divides the sum once.
The ``quantisation_floor`` column is the error of the fp64 truth rounded once to the buffer format.

``run`` writes ``results.csv`` + ``metadata.json`` (resumable, shardable); ``plot`` only reads them.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from precision_lab import STRATEGIES, metrics
from precision_lab.plotting import FORMAT_STYLES, buffer_style, pyplot, save_figure, trial_intervals, trial_means
from precision_lab.results import read_csv
from precision_lab.sweep import TrialData, fixed_effective, fixed_micro, power_grid, run_tasks, stable_seed

NAME = "model-gradients"
COLUMNS = (
    "experiment",
    "workload",
    "regime",
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
    *metrics.METRIC_NAMES,
    "quantisation_floor",
)


@dataclass(frozen=True)
class Config:
    """What to sweep (fixed effective batch, N on a power-of-two grid up to E)."""

    workloads: tuple[str, ...] = ("mlp", "transformer")  # see precision_lab.workloads
    effective_batch: tuple[int, ...] = (4096, 256)  # E per workload (samples; sequences for text)
    size: str = "full"  # workload size preset ("full" or "quick")
    compute_formats: tuple[str, ...] = ("fp32", "bf16")  # precision of the micro-gradients
    buffer_formats: tuple[str, ...] = ("fp32", "bf16", "fp16")  # accumulation buffer formats
    strategies: tuple[str, ...] = ("naive", "kahan", "stochastic", "pairwise")
    scalings: tuple[str, ...] = ("pre", "post")  # where 1/N is applied
    fp16_loss_scale: float = 1.0  # static loss scale for fp16 compute (1 = none)
    trials: int = 3  # independent batches (and stochastic-rounding seeds)
    method: str = "vmap"  # micro-gradients by "vmap" or "loop" (bit-identical for these workloads)
    chunk_size: int = 64  # most micro-batches per vmap call (fixed, so the bytes never vary)
    chunk_samples: int = 256  # most samples per vmap call (bounds memory for large micro-batches)
    warmup_steps: int | None = None  # fp32 Adam steps before measuring (None: workload default)
    fixed_micro_batch: int | None = None  # also run the growing-N regime at this micro-batch B (one pass per trial)

    @classmethod
    def quick(cls) -> Config:
        """Seconds on 2 cores: small models, E = 256 digits / 32 text windows, 2 trials."""
        return cls(effective_batch=(256, 32), size="quick", buffer_formats=("fp32", "bf16", "fp16"), trials=2)

    def buffers(self) -> list[tuple[str, str]]:
        """Every (format, strategy), plus ``fp64 exact``: the input quantisation alone."""
        return [*itertools.product(self.buffer_formats, self.strategies), ("fp64", "exact")]

    def tasks(self) -> list[dict[str, Any]]:
        """One task per (workload, compute, N, trial); scalings and buffers share its pass.

        With ``fixed_micro_batch`` B, one more task per (workload, compute, trial) grows N over the
        power-of-two grid up to E/B on the same samples, recording every N in one pass (``post``).
        """
        if len(self.effective_batch) != len(self.workloads):
            raise ValueError(f"effective_batch {self.effective_batch} needs one entry per workload {self.workloads}")
        tasks = [
            {"workload": w, "compute_format": c, "regime": "fixed_effective", "n_accum": n, "trial": t}
            for w, e in zip(self.workloads, self.effective_batch, strict=True)
            for c in self.compute_formats
            for n in power_grid(e, divides=e)
            for t in range(self.trials)
        ]
        if self.fixed_micro_batch is not None:
            b = self.fixed_micro_batch
            if isinstance(b, bool) or not isinstance(b, int) or b < 1 or any(e % b for e in self.effective_batch):
                raise ValueError(
                    f"fixed_micro_batch {b!r} must be an integer >= 1 that divides every effective batch "
                    f"{self.effective_batch}"
                )
            tasks += [
                {
                    "workload": w,
                    "compute_format": c,
                    "regime": "fixed_micro",
                    "n_accum": e // self.fixed_micro_batch,
                    "trial": t,
                }
                for w, e in zip(self.workloads, self.effective_batch, strict=True)
                for c in self.compute_formats
                for t in range(self.trials)
            ]
        return tasks


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
    trials = TrialData.for_config(config, seed=seed, device=device)
    batch = trials.effective_batch

    def work(task: dict[str, Any]) -> list[dict[str, Any]]:
        w, compute, n, trial = task["workload"], task["compute_format"], task["n_accum"], task["trial"]
        regime = task["regime"]
        x, y, ref, data_seed = trials.data(w, trial)
        s = config.fp16_loss_scale if compute == "fp16" else 1.0  # GradScaler-style static scale
        rows = []
        for scaling in config.scalings:
            sr_seed = stable_seed(seed, w, compute, n, trial, scaling, regime)  # the buffers' stochastic rounding
            if regime == "fixed_effective":
                measured = fixed_effective(
                    trials.engine(w, compute),
                    x,
                    y,
                    ref,
                    n,
                    config.buffers(),
                    scaling=scaling,
                    seed=sr_seed,
                    loss_scale=s,
                )
            else:  # growing N at micro-batch B over the same samples; the truth at N: the first N*B of them
                measured = fixed_micro(
                    trials.engine(w, compute),
                    x,
                    y,
                    config.fixed_micro_batch,
                    power_grid(n),
                    config.buffers(),
                    scaling=scaling,
                    seed=sr_seed,
                    loss_scale=s,
                )
            for r in measured:
                b = batch[w] // r["n_accum"] if regime == "fixed_effective" else config.fixed_micro_batch
                rows.append(
                    {
                        "experiment": NAME,
                        "workload": w,
                        "regime": regime,
                        "compute_format": compute,
                        "scaling": scaling,
                        "loss_scale": s,
                        "micro_batch": b,
                        "effective_batch": b * r["n_accum"],
                        "trial": trial,
                        "seed": data_seed,
                        **r,
                    }
                )
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
    """Error and projection bias vs N, per workload x compute precision (post scaling, fixed E).

    Row 1: relative error of every buffer with the input-quantisation floor of each buffer format;
    rows 2-3: projection bias of the bf16 and fp16 buffers with 95% Student-t intervals across trials
    (fp32 buffers' bias is below 1e-6 and left out), next to the exact sum's (input quantisation).
    """
    plt = pyplot()

    rows = [
        r
        for r in read_csv(Path(out_dir) / "results.csv")
        if r["scaling"] == "post" and r["regime"] == "fixed_effective"
    ]
    panels = sorted({(r["workload"], r["compute_format"]) for r in rows}, key=lambda p: (p[0], p[1] != "fp32"))
    order = {f: i for i, f in enumerate(("fp32", "bf16", "fp16", "fp64"))}
    buffers = sorted({(r["buffer_format"], r["strategy"]) for r in rows}, key=lambda b: (order.get(b[0], 9), b[1]))
    bias_formats = [f for f in ("bf16", "fp16") if any(b[0] == f for b in buffers)]
    fig, axes = plt.subplots(
        1 + len(bias_formats),
        len(panels),
        figsize=(3.9 * len(panels), 3.3 * (1 + len(bias_formats))),
        squeeze=False,
        sharex="col",
    )
    for j, (w, c) in enumerate(panels):
        mine = [r for r in rows if (r["workload"], r["compute_format"]) == (w, c)]
        for fmt in sorted({r["buffer_format"] for r in mine} - {"fp64"}, key=order.__getitem__):
            floor = trial_means(
                [r for r in mine if r["buffer_format"] == fmt and r["strategy"] == "naive"],
                "n_accum",
                "quantisation_floor",
            )
            axes[0, j].loglog(
                *zip(*floor, strict=True),
                color="0.6",
                linewidth=2.5,
                alpha=0.5,
                linestyle=FORMAT_STYLES[fmt],
                label=f"{fmt} floor: fp64 truth rounded once",
            )
        for fmt, strategy in buffers:
            sel = [r for r in mine if (r["buffer_format"], r["strategy"]) == (fmt, strategy)]
            kw = {
                **buffer_style(fmt, strategy),
                "label": f"{fmt} {strategy}" if strategy != "exact" else "exact sum (input quantisation alone)",
            }
            axes[0, j].plot(*zip(*trial_means(sel, "n_accum", "rel_l2_error"), strict=True), **kw)
            for i, bfmt in enumerate(bias_formats, start=1):
                if fmt not in (bfmt, "fp64"):
                    continue
                ns, mean, lo, hi = map(np.array, zip(*trial_intervals(sel, "n_accum", "projection_bias"), strict=True))
                x = ns * 2.0 ** (0.06 * (STRATEGIES.index(strategy) - 2))  # side by side: no bar hides another
                axes[i, j].errorbar(x, mean, yerr=[mean - lo, hi - mean], capsize=2, elinewidth=0.8, marker=".", **kw)
        e = int(mine[0]["effective_batch"])
        axes[0, j].set_title(f"{w}, micro-gradients in {c}\n(effective batch E = {e})", fontsize=9)
        axes[0, j].set_yscale("log")
        for i, bfmt in enumerate(bias_formats, start=1):
            axes[i, j].set_yscale("symlog", linthresh=1e-4)
            axes[i, j].axhline(0.0, color="k", linewidth=0.6)
            axes[i, j].set_title(f"{bfmt} buffers", fontsize=9)
        axes[-1, j].set_xscale("log", base=2)
        axes[-1, j].set_xlabel("accumulation count N (micro-batch = E/N)")
    axes[0, 0].set_ylabel("relative L2 error\nvs fp64 large-batch gradient")
    for i in range(1, len(bias_formats) + 1):
        axes[i, 0].set_ylabel("projection bias <acc - ref, ref>/|ref|^2\n(symlog; bars: 95% CI over trials)")
    handles, labels = axes[0, -1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)  # outside: hides no data
    fig.suptitle(
        "Accumulated gradient vs the fp64 large-batch gradient: buffer format x strategy (post scaling, mean of trials)"
    )
    return [save_figure(fig, fig_dir, NAME)]
