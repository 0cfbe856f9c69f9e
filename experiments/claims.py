"""The claims report: a verdict on each common claim about gradient accumulation, from stored results.

``write_report(out_dir, fig_dir)`` reads the ``results.csv`` of every experiment under ``out_dir``
and writes ``fig_dir/CLAIMS.md``: for each claim C1-C10 its verdict (*holds*, *holds under
conditions*, *does not hold*), the measured numbers that decide it and the figure that shows them.
Nothing here is hard-coded: every verdict is computed from the numbers by the rule written next to
it in :data:`RULES`, so a changed measurement changes the report.  A claim whose experiment has not
been run says so and names the command that runs it.

The report carries no date or host, so the same results give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from precision_lab.lab.plotting import trial_intervals, trial_means
from precision_lab.lab.results import atomic_write_text, read_csv

__all__ = ["CLAIMS", "RULES", "Verdict", "evaluate", "load_results", "write_report"]

HOLDS, CONDITIONAL, FAILS, MISSING = "holds", "holds under conditions", "does not hold", "not measured"

# Equivalences hold "exactly" when fp64 computations of the two sides agree to this relative
# difference: fp64 rounding of N-term sums and a few hundred flops is ~1e-15; 2^-40 ~ 9.1e-13
# leaves a factor 1000 of headroom and is still 10 orders below any real discrepancy.
EXACT = 2.0**-40
ONE_PERCENT = 0.01  # C5's thresholds: relative error > 1%, norm ratio < 0.99

CLAIMS: dict[str, str] = {
    "C1": "Summing the gradients of N micro-batches of size B gives the gradient of one batch of N·B.",
    "C2": "Dividing each micro-batch loss by N makes the accumulated gradient an average, not N times too large.",
    "C3": "Zeroing gradients at every micro-step wipes the accumulation and the weights never change.",
    "C4": "The weights are frozen during the N micro-batches, so every micro-batch sees the same model and the "
    "result equals the large batch (think of BatchNorm and dropout).",
    "C5": "In bf16 (about 2.4 significant decimal digits) accumulation introduces a rounding bias that is negligible "
    "in most cases and matters only at very high accumulation counts or for very large models.",
    "C6": "Dividing the learning rate by N has the same effect as dividing the loss by N (SGD, SGD with momentum, "
    "with weight decay, Adam/AdamW).",
    "C7": "Frameworks with built-in accumulation handle the loss normalisation for you (variable token counts per "
    "micro-batch; a partial last window).",
    "C8": "Accumulation makes training slower (a figure of about 17% more time is quoted) while it saves memory.",
    "C9": "With data parallelism, accumulation lets ranks synchronise gradients N times less often with the same result.",
    "C10": "Stochastic rounding or Kahan summation make a low-precision accumulation buffer as good as fp32.",
}

RULES: dict[str, str] = {
    "C1": f"holds if every fp64 'accumulated vs large batch' comparison of a per-sample model agrees to {EXACT:.1e}; "
    "under conditions if a batch-coupled layer (BatchNorm in train mode) breaks it.",
    "C2": "holds if loss/N agrees with the large batch and the undivided loss is off by exactly N - 1 (relative).",
    "C3": "does not hold if the weights do move (the update equals -lr·g_last/N) while differing from the large batch.",
    "C4": "under conditions if per-sample layers agree and batch-coupled ones (BatchNorm train, nn.Dropout) differ.",
    "C5": "does not hold if a naive bf16 buffer's bias (|projection bias| or a norm change) passes 1% at N <= 64 on a "
    "real workload; holds under conditions if its bias or error passes 1% only at larger N; holds if never within "
    "the measured N.",
    "C6": "under conditions if SGD (with and without momentum) agrees exactly and weight decay or Adam do not.",
    "C7": "under conditions if the per-micro-batch normalisation is wrong and the global one right: only a framework "
    "that divides by the window's token count and the window's real size gets it right.",
    "C8": "under conditions if the time overhead at the smallest measured micro-batch exceeds 17% but the largest "
    "micro-batches stay below it, and the peak memory falls with N.",
    "C9": "holds if no_sync all-reduces once per step (every-step N times) and, in fp64, both agree with the "
    f"single-process large batch to {EXACT:.1e}.",
    "C10": "at the largest N, per micro-gradient precision (fp32, bf16): holds if bf16 Kahan and bf16 stochastic "
    "buffers both err at most 1.1x the fp32 buffer on every workload; holds under conditions if one of them does for "
    "one micro-gradient precision; does not hold otherwise.",
}


@dataclass
class Verdict:
    """One claim's verdict, the numbers that decide it, and where to see them."""

    claim: str
    verdict: str
    evidence: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


Rows = list[dict[str, str]]
Results = dict[str, Rows | None]


def load_results(out_dir: str | Path, names: Iterable[str]) -> Results:
    """``{experiment: rows}`` for every name whose ``out_dir/name/results.csv`` exists, else None.

    Each file is checked against its ``metadata.json`` (:func:`precision_lab.lab.results.read_csv`):
    a file cut short or edited raises a ValueError naming it.
    """
    out: Results = {}
    for name in names:
        path = Path(out_dir) / name / "results.csv"
        out[name] = read_csv(path) if path.exists() else None
    return out


def _g(x: float) -> str:
    """A number as the report prints it: 2 significant digits, exact zeros as 0."""
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.2g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.1e}"


def _missing(claim: str, *names: str) -> Verdict:
    return Verdict(
        claim, MISSING, [f"needs the results of {', '.join(names)}"], commands=[f"precision-lab run {n}" for n in names]
    )


def _eq(rows: Rows, claim: str, case: str | None = None, comparison: str | None = None) -> Rows:
    """Equivalence rows of a claim at the largest N, optionally one case/comparison (substring match)."""
    sel = [r for r in rows if r["claim"] == claim]
    if not sel:
        return []
    n_max = max(int(r["n_accum"]) for r in sel)
    return [
        r
        for r in sel
        if int(r["n_accum"]) == n_max
        and (case is None or case in r["case"])
        and (comparison is None or comparison in r["comparison"])
    ]


def _diff(rows: Rows) -> float:
    return max(float(r["rel_difference"]) for r in rows)


def _line(r: dict[str, str]) -> str:
    exact = " (bit-identical)" if r["bit_identical"] == "1" else ""
    return f"{r['case']}, {r['comparison']}, N = {r['n_accum']}: relative difference {_g(float(r['rel_difference']))}{exact}"


def _equivalence(
    claim: str, res: Results, decide: Callable[[Rows], str], note: tuple[str, str] | None = None
) -> Verdict:
    """A claim decided by the equivalence rows; ``note = (verdict, text)`` adds the text under that verdict."""
    rows = res.get("equivalence")
    if rows is None:
        return _missing(claim, "equivalence")
    sel = _eq(rows, claim)
    if not sel:
        return _missing(claim, "equivalence")
    v = Verdict(claim, decide(sel), [_line(r) for r in sel], ["equivalence.png"], ["precision-lab run equivalence"])
    if note is not None and v.verdict == note[0]:
        v.evidence.append(note[1])
    return v


def _c1(res: Results) -> Verdict:
    def decide(sel: Rows) -> str:
        ok = _diff(sel) <= EXACT
        rows = res["equivalence"] or []
        coupled = [r for r in _eq(rows, "C4", "batch norm, train") if float(r["rel_difference"]) > EXACT]
        return (CONDITIONAL if coupled else HOLDS) if ok else FAILS

    v = _equivalence("C1", res, decide)
    if v.verdict != MISSING:
        rows = res["equivalence"] or []
        v.evidence += [_line(r) for r in _eq(rows, "C4", "batch norm, train")]
        v.evidence.append(
            "it holds for per-sample losses in exact arithmetic; rounding in the buffer adds its own "
            "error (C5, C10), and BatchNorm in train mode couples the samples of a batch (C4)"
        )
    return v


def _c2(res: Results) -> Verdict:
    def decide(sel: Rows) -> str:
        divided = [r for r in sel if r["predicted"] == "equal"]
        undivided = [r for r in sel if "not divided" in r["comparison"]]
        n = int(sel[0]["n_accum"])
        off_by = all(abs(float(r["rel_difference"]) - (n - 1)) <= 1e-9 * n for r in undivided)
        return HOLDS if _diff(divided) <= EXACT and undivided and off_by else FAILS

    return _equivalence(
        "C2",
        res,
        decide,
        (
            HOLDS,
            "the undivided sum is N times the mean: relative difference N - 1. With unequal micro-batch "
            "sizes or token counts dividing by N is no longer the mean (C7)",
        ),
    )


def _c3(res: Results) -> Verdict:
    def decide(sel: Rows) -> str:
        last = [r for r in sel if "g_last" in r["comparison"]]
        large = [r for r in sel if r["comparison"].endswith("vs large batch")]
        moves = bool(last) and _diff(last) <= EXACT
        return FAILS if moves and _diff(large) > EXACT else HOLDS

    return _equivalence(
        "C3",
        res,
        decide,
        (
            FAILS,
            "the accumulation is wiped, but the weights do change: each step applies the last "
            "micro-batch's gradient divided by N, a silent 1/N-sized step on 1/N of the data",
        ),
    )


def _c4(res: Results) -> Verdict:
    def decide(sel: Rows) -> str:
        equal = [r for r in sel if r["predicted"] == "equal"]
        differ = [r for r in sel if r["predicted"] == "differs"]
        if _diff(equal) > EXACT:
            return FAILS
        return CONDITIONAL if differ and min(float(r["rel_difference"]) for r in differ) > EXACT else HOLDS

    return _equivalence(
        "C4",
        res,
        decide,
        (
            CONDITIONAL,
            "the weights are indeed frozen, but BatchNorm in train mode normalises by micro-batch "
            "statistics and nn.Dropout draws other masks per micro-batch; layers that treat samples "
            "independently (LayerNorm, GroupNorm, BatchNorm in eval mode, masks keyed by sample) agree",
        ),
    )


def _c6(res: Results) -> Verdict:
    def decide(sel: Rows) -> str:
        plain = [r for r in sel if r["case"] in ("SGD", "SGD, momentum 0.9") and r["comparison"] == "lr/N vs loss/N"]
        other = [r for r in sel if r not in plain and r["comparison"] == "lr/N vs loss/N"]
        if not plain or _diff(plain) > EXACT:
            return FAILS
        return CONDITIONAL if other and max(float(r["rel_difference"]) for r in other) > EXACT else HOLDS

    return _equivalence(
        "C6",
        res,
        decide,
        (
            CONDITIONAL,
            "lr/N also divides coupled weight decay by N (fix: weight decay x N); Adam normalises the "
            "gradient's scale away, so lr/N shrinks its step about N times instead (loss/N equals the "
            "undivided loss with eps x N)",
        ),
    )


def _c7(res: Results) -> Verdict:
    def decide(sel: Rows) -> str:
        wrong = [r for r in sel if r["predicted"] == "differs"]
        right = [r for r in sel if r["predicted"] == "equal"]
        return (
            CONDITIONAL
            if wrong and min(float(r["rel_difference"]) for r in wrong) > EXACT and _diff(right) <= EXACT
            else FAILS
        )

    return _equivalence(
        "C7",
        res,
        decide,
        (
            CONDITIONAL,
            "no framework was run here: the rows show what a framework must do to be right (sum the "
            "token losses and divide by the window's token count; divide a partial window by its own "
            "size) and how far the naive per-micro-batch normalisation is off",
        ),
    )


def _mean_at(rows: Rows, column: str) -> dict[int, float]:
    return dict(trial_means(rows, "n_accum", column))


def _first(curve: dict[int, float], test: Callable[[float], bool]) -> int | None:
    return next((n for n in sorted(curve) if test(curve[n])), None)


def _c5(res: Results) -> Verdict:
    rows = res.get("model-gradients")
    if rows is None:
        return _missing("C5", "model-gradients")
    rows = [
        r for r in rows if r["scaling"] == "post" and r["regime"] == "fixed_effective" and r["compute_format"] == "fp32"
    ]
    v = Verdict("C5", HOLDS, figures=["model-gradients.png"], commands=["precision-lab run model-gradients"])
    first_bias, first_err = [], []
    for w in sorted({r["workload"] for r in rows}):
        n_max = max(int(r["n_accum"]) for r in rows if r["workload"] == w)
        for fmt in ("bf16", "fp16"):
            for strategy in ("naive", "kahan", "stochastic", "pairwise"):
                sel = [r for r in rows if (r["workload"], r["buffer_format"], r["strategy"]) == (w, fmt, strategy)]
                if not sel:
                    continue
                err, ratio = _mean_at(sel, "rel_l2_error"), _mean_at(sel, "norm_ratio")
                bias = {n: (m, lo, hi) for n, m, lo, hi in trial_intervals(sel, "n_accum", "projection_bias")}
                n_err = _first(err, lambda e: not e <= ONE_PERCENT)  # NaN/inf count as past it
                n_shrink = _first(ratio, lambda q: not q >= 1 - ONE_PERCENT)
                n_grow = _first(ratio, lambda q: q > 1 + ONE_PERCENT)
                # a bias: |mean| past 1% with a 95% interval that excludes 0 (noise alone also moves the
                # norm, by sqrt(1 + error^2), so the norm ratio does not decide it); NaN counts as past
                n_bias = _first(bias, lambda b: not abs(b[0]) <= ONE_PERCENT and not b[1] <= 0.0 <= b[2])
                if fmt == "bf16" and strategy == "naive":
                    first_err.append(n_err)
                    first_bias.append(n_bias)
                m, lo, hi = bias[n_max]
                v.evidence.append(
                    f"{w}, {fmt} {strategy}: error > 1% from N = {n_err or f'never (N <= {n_max})'}; "
                    f"bias > 1% (95% CI excluding 0) from N = {n_bias or 'never'}; norm shrinks 1% from N = {n_shrink or 'never'}"
                    + (f", grows 1% from N = {n_grow}" if n_grow else "")
                    + f"; at N = {n_max}: error {_g(err[n_max])}, bias {_g(m)} (95% CI {_g(lo)} to {_g(hi)}), "
                    f"norm ratio {ratio[n_max]:.4f}"
                )
    hit_bias = [n for n in first_bias if n is not None]
    if hit_bias and min(hit_bias) <= 64:
        v.verdict = FAILS
    elif hit_bias or any(n is not None for n in first_err):
        v.verdict = CONDITIONAL
    floor = [float(r["quantisation_floor"]) for r in rows if r["buffer_format"] == "bf16"]
    v.evidence.append(
        "micro-gradients in fp32, fixed effective batch, post scaling, mean over trials; the bf16 "
        f"floor (the fp64 truth rounded once to bf16) is {_g(sum(floor) / len(floor)) if floor else 'n/a'}"
        " on average. Where a naive buffer's error passes 1% long before its bias does, the error is "
        "mostly rounding noise at moderate N and turns into a bias only once updates stagnate"
    )
    v.evidence += _training_lines(res)
    if res.get("training") is not None:
        v.figures.append("training.png")
    return v


def _training_lines(res: Results) -> list[str]:
    """Held-out loss per run at the largest N, and whether the buffers' spread is below the bf16 weights' gap."""
    train = res.get("training")
    if train is None:
        return []
    last = max(int(r["step"]) for r in train)
    final = [r for r in train if int(r["step"]) == last]
    out = []
    for w in sorted({r["workload"] for r in final}):
        n = max(int(r["n_accum"]) for r in final if r["workload"] == w)
        loss = {
            run: dict(
                trial_means([r for r in final if r["workload"] == w and r["run"] == run], "n_accum", "eval_loss")
            )[n]
            for run in sorted({r["run"] for r in final})
        }
        bf16 = [x for k, x in loss.items() if k.startswith("bf16")]
        text = f"training {w} at N = {n}: held-out loss " + ", ".join(f"{k} {x:.4f}" for k, x in loss.items())
        if bf16 and "fp32" in loss:
            spread, gap = max(bf16) - min(bf16), sum(bf16) / len(bf16) - loss["fp32"]
            text += f"; the bf16 buffers differ by {_g(spread)}, the bf16 weights cost {_g(gap)} against fp32" + (
                ": the buffer's effect is below the weights' own rounding" if spread < abs(gap) / 4 else ""
            )
        out.append(text)
    return out


def _c8(res: Results) -> Verdict:
    rows = res.get("overhead")
    if rows is None:
        return _missing("C8", "overhead")
    rows = [r for r in rows if r["mode"] == "pytorch"]
    v = Verdict("C8", HOLDS, figures=["overhead.png"], commands=["precision-lab run overhead"])
    slower_small, fast_large, memory_falls = [], [], []
    for w in sorted({r["workload"] for r in rows}):
        mine = sorted((r for r in rows if r["workload"] == w), key=lambda r: int(r["n_accum"]))
        by_n = {int(r["n_accum"]): r for r in mine}
        n_max = max(by_n)
        over = {n: float(r["time_ratio"]) - 1 for n, r in by_n.items()}
        ok = [n for n in sorted(over) if n > 1 and over[n] <= 0.17]
        slower_small.append(over[n_max] > 0.17)
        fast_large.append(bool(ok))
        memory_falls.append(float(by_n[n_max]["peak_bytes"]) < float(by_n[1]["peak_bytes"]))
        v.evidence.append(
            f"{w}, E = {mine[0]['effective_batch']} ({mine[0]['device']}, {mine[0]['threads']} thread(s)): time per "
            "effective batch vs N = 1: "
            + ", ".join(f"N = {n} (micro-batch {by_n[n]['micro_batch']}) {1 + over[n]:.2f}x" for n in sorted(over))
            + f"; peak memory {float(by_n[1]['peak_bytes']) / 2**20:.2f} MiB at N = 1, "
            f"{float(by_n[n_max]['peak_bytes']) / 2**20:.2f} MiB at N = {n_max}"
        )
        buffers = sorted(
            {
                (r["mode"], r["time_vs_pytorch"])
                for r in res["overhead"] or []
                if r["workload"] == w and int(r["n_accum"]) == n_max and r["mode"] != "pytorch"
            }
        )
        if buffers:
            v.evidence.append(
                f"{w}, N = {n_max}: GradientAccumulator time / PyTorch's: "
                + ", ".join(f"{m} {float(t):.2f}x" for m, t in buffers)
            )
    if all(memory_falls):
        v.verdict = CONDITIONAL if any(slower_small) and any(fast_large) else (HOLDS if any(slower_small) else FAILS)
    else:
        v.verdict = FAILS
    v.evidence.append(
        "the overhead is the fixed cost per micro-batch (kernel launches, Python and autograd "
        "bookkeeping) over less work per call: it depends on the micro-batch size, not on "
        "accumulation as such"
    )
    return v


def _c9(res: Results) -> Verdict:
    rows = res.get("ddp")
    if rows is None:
        return _missing("C9", "ddp")
    v = Verdict("C9", FAILS, figures=["ddp.png"], commands=["precision-lab run ddp"])
    n_max = max(int(r["n_accum"]) for r in rows)
    at = {(r["model_format"], r["allreduce_format"], r["mode"]): r for r in rows if int(r["n_accum"]) == n_max}
    once = all(int(r["allreduces"]) == 1 for k, r in at.items() if k[2].startswith("no_sync"))
    every = all(int(r["allreduces"]) == n_max for k, r in at.items() if k[2] == "every_step")
    e_ns, e_ev = (float(at[("fp64", "native", m)]["rel_l2_error"]) for m in ("no_sync", "every_step"))
    if once and every and max(e_ns, e_ev) <= EXACT:
        v.verdict = HOLDS
    v.evidence.append(
        f"N = {n_max} micro-batches per rank, {rows[0]['world_size']} ranks: no_sync all-reduces "
        f"{at[('fp64', 'native', 'no_sync')]['allreduces']} time(s) per step, every-step "
        f"{at[('fp64', 'native', 'every_step')]['allreduces']} times"
    )
    v.evidence.append(
        f"fp64 model, relative error vs the single-process large batch: no_sync {_g(e_ns)}, every step {_g(e_ev)}"
    )
    key = ("fp32", "bf16")
    if all((*key, m) in at for m in ("no_sync", "every_step")):
        v.evidence.append(
            f"with a bf16-compressed all-reduce the error is {_g(float(at[(*key, 'no_sync')]['rel_l2_error']))} "
            f"with no_sync and {_g(float(at[(*key, 'every_step')]['rel_l2_error']))} every step: "
            "fewer lossy reductions, smaller error"
        )
    return v


def _c10(res: Results) -> Verdict:
    rows = res.get("model-gradients")
    if rows is None:
        return _missing("C10", "model-gradients")
    rows = [r for r in rows if r["scaling"] == "post" and r["regime"] == "fixed_effective"]
    v = Verdict("C10", FAILS, figures=["model-gradients.png"], commands=["precision-lab run model-gradients"])
    close: dict[tuple[str, str], list[bool]] = {}  # (compute, strategy) -> within 1.1x of fp32, per workload
    for w in sorted({r["workload"] for r in rows}):
        n_max = max(int(r["n_accum"]) for r in rows if r["workload"] == w)
        for compute in sorted({r["compute_format"] for r in rows if r["workload"] == w}, key=lambda c: c != "fp32"):

            def err(fmt: str, strategy: str, w: str = w, n_max: int = n_max, compute: str = compute) -> float:
                sel = [
                    r
                    for r in rows
                    if (r["workload"], r["compute_format"], r["buffer_format"], r["strategy"])
                    == (w, compute, fmt, strategy)
                ]
                return _mean_at(sel, "rel_l2_error")[n_max] if sel else math.nan

            fp32 = err("fp32", "naive")
            parts = []
            for strategy in ("naive", "stochastic", "kahan"):
                e = err("bf16", strategy)
                if strategy != "naive":
                    close.setdefault((compute, strategy), []).append(e <= 1.1 * fp32)  # NaN: not close
                parts.append(f"{strategy} {_g(e)}")
            v.evidence.append(
                f"{w}, {compute} micro-gradients, N = {n_max}: bf16 " + ", ".join(parts) + f" vs fp32 naive {_g(fp32)}"
            )
    if all(all(x) for x in close.values()) and close:
        v.verdict = HOLDS
    elif any(all(x) for x in close.values()):
        v.verdict = CONDITIONAL
    v.evidence.append(
        "a buffer rounds each micro-gradient to its format before adding it, so with fp32 "
        "micro-gradients no bf16 buffer can match fp32: Kahan gets down to the error of that rounding "
        "(the input floor), no further. With micro-gradients already in bf16 that rounding is common "
        "to every buffer, and the comparison is between the sums alone. Kahan's value is read as "
        "s - c in fp64 here; written to a bf16 p.grad it is rounded once more. Stochastic rounding "
        "removes stagnation's bias but adds variance, and is worse than round-to-nearest until "
        "stagnation"
    )
    pareto = res.get("memory-pareto")
    if pareto is not None:
        v.figures.append("memory_pareto.png")
        for w in sorted({r["workload"] for r in pareto}):
            n_max = max(int(r["n_accum"]) for r in pareto if r["workload"] == w)

            def perr(fmt: str, strategy: str, w: str = w, n_max: int = n_max) -> float:
                sel = [r for r in pareto if (r["workload"], r["buffer_format"], r["strategy"]) == (w, fmt, strategy)]
                return _mean_at(sel, "rel_l2_error")[n_max]

            v.evidence.append(
                f"same 4 bytes per parameter ({w}, N = {n_max}): bf16 Kahan {_g(perr('bf16', 'kahan'))} "
                f"vs fp32 naive {_g(perr('fp32', 'naive'))}"
            )
    v.evidence += _training_lines(res)
    if res.get("training") is not None:
        v.figures.append("training.png")
    return v


EVALUATORS: dict[str, Callable[[Results], Verdict]] = {
    "C1": _c1,
    "C2": _c2,
    "C3": _c3,
    "C4": _c4,
    "C5": _c5,
    "C6": _c6,
    "C7": _c7,
    "C8": _c8,
    "C9": _c9,
    "C10": _c10,
}


def evaluate(res: Results) -> list[Verdict]:
    """Every claim's verdict from the loaded results (``not measured`` where its experiment is missing)."""
    return [EVALUATORS[c](res) for c in CLAIMS]


def render(verdicts: list[Verdict], *, header: str = "") -> str:
    """The markdown report."""
    out = ["# Claims about gradient accumulation, measured", ""]
    if header:
        out += [header, ""]
    out += ["| claim | verdict |", "| --- | --- |"]
    out += [f"| [{v.claim}](#{v.claim.lower()}) {CLAIMS[v.claim]} | **{v.verdict}** |" for v in verdicts]
    for v in verdicts:
        out += ["", f"## {v.claim}", "", f"> {CLAIMS[v.claim]}", "", f"**Verdict: {v.verdict}.**", ""]
        out += [f"- {e}" for e in v.evidence]
        out += ["", f"Rule: {RULES[v.claim]}"]
        if v.figures:
            out += ["", " ".join(f"![{f}]({f})" for f in v.figures)]
        if v.commands:
            out += ["", "Regenerate: " + "; ".join(f"`{c}`" for c in v.commands)]
    return "\n".join(out) + "\n"


def write_report(out_dir: str | Path, fig_dir: str | Path, names: Iterable[str], *, header: str = "") -> Path:
    """Evaluate every claim from ``out_dir/<name>/results.csv`` and write ``fig_dir/CLAIMS.md`` atomically.

    Every results file is checked as it is read (:func:`precision_lab.lab.results.read_csv`).

    Raises:
        ValueError: A results file or its ``metadata.json`` is unreadable, cut short or edited
            (:class:`~precision_lab.lab.results.BadFile`, naming it), or a value in a results file
            that has no ``metadata.json`` to check it against cannot be used (naming those files).
            Nothing is written then.
    """
    names = list(names)
    results = load_results(out_dir, names)
    try:
        text = render(evaluate(results), header=header)
    except (ValueError, KeyError) as exc:
        unchecked = [
            str(Path(out_dir) / n / "results.csv")
            for n in names
            if results.get(n) is not None and not (Path(out_dir) / n / "metadata.json").exists()
        ]
        what = f"'{exc.args[0]}' is missing" if isinstance(exc, KeyError) else str(exc)
        where = f"results without metadata.json to check them: {', '.join(unchecked)}" if unchecked else "the code"
        raise ValueError(
            f"cannot evaluate the claims from {out_dir}: {what} (suspect {where}); run that experiment again"
        ) from exc
    path = Path(fig_dir) / "CLAIMS.md"
    atomic_write_text(path, text)
    return path
