"""Figure of the training experiment: held-out loss, its gap to fp64, weight distance; reads ``results.csv`` only."""

from __future__ import annotations

from pathlib import Path

from experiments.training import NAME, RUNS
from precision_lab.lab.plotting import PALETTE, buffer_style, pyplot, save_figure, trial_means
from precision_lab.lab.results import read_csv

__all__ = ["plot"]

# runs with a colour of their own; the bf16-buffer runs take their strategy's colour (sky is Neumaier's,
# so the fp32 run, a reference like fp64, is drawn in neutral grey)
OWN_COLORS = {"fp64": PALETTE["black"], "fp32": "#777777", "bf16 params, fp32 buffer": PALETTE["purple"]}


def plot(out_dir: str | Path, fig_dir: str | Path) -> list[Path]:
    """Per workload: held-out loss vs step at the largest N; final loss gap to fp64 and weight distance vs N.

    The runs overlap at the scale of the loss itself, so rows 2 and 3 show differences from the fp64
    run, and every run has its own marker (coinciding runs stay visible as overlaid markers).
    """
    plt = pyplot()

    rows = read_csv(Path(out_dir) / "results.csv")
    workloads = sorted({r["workload"] for r in rows})
    runs = [r for r in RUNS if any(x["run"] == r.label for x in rows)]
    last = max(int(r["step"]) for r in rows)
    fig, axes = plt.subplots(3, len(workloads), figsize=(5.5 * len(workloads), 10), squeeze=False)
    markers = dict(zip((r.label for r in RUNS), "ovs^DPx+", strict=True))
    for j, w in enumerate(workloads):
        n_max = max(int(r["n_accum"]) for r in rows if r["workload"] == w)
        final = [r for r in rows if r["workload"] == w and int(r["step"]) == last]
        fp64 = dict(trial_means([r for r in final if r["run"] == "fp64"], "n_accum", "eval_loss"))
        for run in runs:
            label = run.label
            mine = [r for r in rows if r["workload"] == w and r["run"] == label]
            color = OWN_COLORS.get(label, buffer_style(run.buffer_format, run.strategy)["color"])
            kw = {
                "color": color,
                "marker": markers[label],
                "markersize": 5,
                "markerfacecolor": "none",
                "linewidth": 1.1,
                "linestyle": "-" if run.param_format != "bf16" else "--",
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
