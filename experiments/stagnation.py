"""Stagnation: how each accumulation strategy loses (or keeps) small addends as N grows.

The textbook failure of a low-precision gradient buffer: once the running sum ``s`` is large
enough that an addend is at most half an ulp of ``s``, round-to-nearest returns ``s`` unchanged and
the addend is lost.  Adding 1.0 in a naive buffer stalls at exactly 2^t (256 in bf16).  This
experiment measures, for streams of identical and of random micro-gradients, the relative error of
the accumulated value against the exact sum of the same (format-rounded) addends, and the fraction
of lost element-adds, for every format x strategy, recording every power of two N on the way.

Computing and plotting are separate: ``run`` writes ``results.csv`` + ``metadata.json``; ``plot``
only reads them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from precision_lab import STRATEGIES, Accumulator, get_format, metrics, theory
from precision_lab.plotting import pyplot, save_figure, trial_means
from precision_lab.results import read_csv
from precision_lab.sweep import power_grid, run_tasks

NAME = "stagnation"
COLUMNS = ("experiment", "stream", "buffer_format", "strategy", "n_accum", "elements", "trial", "seed",
           "rel_l2_error", "norm_ratio", "projection_bias", "lost_update_fraction", "nonfinite",
           "predicted_stall")  # fmt: skip


@dataclass(frozen=True)
class Config:
    """What to sweep."""

    formats: tuple[str, ...] = ("bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "tf32")  # buffer formats
    strategies: tuple[str, ...] = STRATEGIES  # accumulation strategies
    streams: tuple[str, ...] = ("constant", "positive", "low_snr")  # micro-gradient streams, see _stream
    n_max: int = 4096  # largest accumulation count N; every power of two up to it is recorded
    elements: int = 2048  # gradient entries per micro-batch
    trials: int = 3  # independent streams (and SR seeds) per configuration

    @classmethod
    def quick(cls) -> Config:
        """A configuration that finishes in seconds on 2 cores."""
        return cls(formats=("bf16", "fp16", "fp8_e5m2"), n_max=1024, elements=256, trials=2)


def _stream(kind: str, elements: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and spread of a stream's micro-gradients g_i = mean + spread * z_i (z standard normal).

    constant: every g_i = 1 (pure stagnation, no noise); positive: mean 1, spread 0.25 (all
    addends share a sign, the sum grows like N); low_snr: mean 0.05, spread 1 (like real gradients:
    the signal is small against the micro-batch noise, the sum grows like sqrt(N)).
    """
    ones = torch.ones(elements, dtype=torch.float64)
    if kind == "constant":
        return ones, torch.zeros_like(ones)
    if kind == "positive":
        return ones, 0.25 * ones
    if kind == "low_snr":
        sign = torch.where(torch.rand(elements, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
        return 0.05 * sign, ones
    raise ValueError(f"unknown stream {kind!r}; known: constant, positive, low_snr")


def run(config: Config, out_dir: str | Path, *, seed: int = 0, device: str = "cpu",
        shard: tuple[int, int] | None = None, progress: bool = True) -> Path | None:  # fmt: skip
    """Run (or resume) the sweep; returns ``results.csv`` once the whole grid is done."""
    record = set(power_grid(config.n_max))
    tasks = [{"stream": s, "buffer_format": f, "trial": t}
             for s in config.streams for f in config.formats for t in range(config.trials)]  # fmt: skip

    def work(task: dict) -> list[dict]:
        stream, trial = task["stream"], task["trial"]
        fmt = get_format(task["buffer_format"])
        trial_seed = seed * 1_000_003 + trial  # one seed per trial: data and stochastic rounding
        gen = torch.Generator().manual_seed(trial_seed)
        mean, spread = _stream(stream, config.elements, gen)
        accs = {s: Accumulator(s, fmt, (config.elements,), device=device,
                               generator=torch.Generator(device=device).manual_seed(trial_seed))
                for s in config.strategies}  # fmt: skip
        # The reference: the exact sum of the same format-rounded addends (input quantisation is
        # common to all strategies, so the error measured is accumulation rounding alone).
        exact = Accumulator("exact", fmt, (config.elements,), device=device)
        rows = []
        for n in range(1, config.n_max + 1):
            g = (mean + spread * torch.randn(config.elements, generator=gen, dtype=torch.float64)).to(device)
            exact.add(g)
            for acc in accs.values():
                acc.add(g)
            if n not in record:
                continue
            ref = exact.value()
            stall = theory.stagnation_count(fmt, 1.0) if stream == "constant" else ""
            for strategy, acc in accs.items():
                m = metrics.compare(acc.value(), ref, fmt, lost_updates=acc.lost_updates,
                                    element_adds=acc.element_adds)  # fmt: skip
                rows.append({"experiment": NAME, "stream": stream, "buffer_format": fmt.name,
                             "strategy": strategy, "n_accum": n, "elements": config.elements,
                             "trial": trial, "seed": trial_seed, "predicted_stall": stall,
                             **{k: m[k] for k in COLUMNS if k in m}})  # fmt: skip
        rows.sort(key=lambda r: (r["strategy"], r["n_accum"]))
        return rows

    return run_tasks(NAME, out_dir, tasks, work, columns=COLUMNS, config=dataclasses.asdict(config), seed=seed,
                     device=device, shard=shard, progress=progress)  # fmt: skip


def plot(out_dir: str | Path, fig_dir: str | Path) -> list[Path]:
    """Error and lost-update fraction vs N from stored results (no recomputation)."""
    plt = pyplot()

    rows = read_csv(Path(out_dir) / "results.csv")
    streams = sorted({r["stream"] for r in rows})
    formats = sorted({r["buffer_format"] for r in rows})
    strategies = [s for s in STRATEGIES if any(r["strategy"] == s for r in rows) and s != "exact"]
    fig, axes = plt.subplots(2, len(streams), figsize=(4.5 * len(streams), 7), squeeze=False)
    styles = dict(zip(formats, ["-", "--", ":", "-.", (0, (1, 3))], strict=False))
    colors = dict(zip(strategies, ["C0", "C1", "C2", "C3", "C4"], strict=False))
    for j, stream in enumerate(streams):
        for fmt in formats:
            for strategy in strategies:
                sel = [r for r in rows if (r["stream"], r["buffer_format"], r["strategy"]) == (stream, fmt, strategy)]
                ns, err = zip(*trial_means(sel, "n_accum", "rel_l2_error"), strict=True)
                lost = [m for _, m in trial_means(sel, "n_accum", "lost_update_fraction")]
                kw = {"color": colors[strategy], "linestyle": styles[fmt], "linewidth": 1.2}
                axes[0, j].loglog(ns, [max(e, 1e-12) for e in err], label=f"{fmt} {strategy}", **kw)
                axes[1, j].semilogx(ns, lost, **kw)
        axes[0, j].set_title(f"stream: {stream}")
        axes[0, j].set_ylabel("relative L2 error vs exact sum\n(an error of 0 is drawn at 1e-12)")
        axes[1, j].set_ylabel("lost-update fraction")
        axes[1, j].set_xlabel("accumulation count N")
    axes[0, -1].legend(fontsize=6, ncol=2)
    return [save_figure(fig, fig_dir, NAME)]
