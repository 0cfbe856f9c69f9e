"""Equivalence: is accumulating N micro-batches the same as one large batch?  Claims C1-C4, C6, C7.

Every comparison runs in fp64 on real data (scikit-learn's digits for the classifiers, Python
standard-library text for the token model), so what differs is the claim, not fp32 rounding.  Each
row compares a left-hand side with a right-hand side (``rel_difference`` = max |lhs - rhs| / max
|rhs|, and whether they are bit-identical) and says what the maths predicts: ``equal`` (within
2^-40 relative: fp64 rounding of the same quantity by another order, 2^13 ulps of room) or
``differs``.  ``as_predicted`` says whether the measurement agrees.  Where a claim fails, the row
after it shows the fix that restores equality.  The functions are in
:mod:`precision_lab.equivalence`, whose docstring derives every relation.

``run`` writes ``results.csv`` + ``metadata.json``; :mod:`experiments.figures.equivalence` only reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from precision_lab import equivalence as eq
from precision_lab.lab.runner import run_tasks
from precision_lab.measure import stable_seed
from precision_lab.workloads import make_workload

NAME = "equivalence"
COLUMNS = (
    "experiment",
    "claim",
    "case",
    "comparison",
    "n_accum",
    "predicted",
    "rel_difference",
    "bit_identical",
    "as_predicted",
)
TOL = 2.0**-40  # fp64: the same quantity by two summation orders (see tests/test_gradients.py)


@dataclass(frozen=True)
class Config:
    """What to compare."""

    n_values: tuple[int, ...] = (2, 3, 8, 32)  # accumulation counts N (3: not a power of two)
    micro_batch: int = 8  # samples per micro-batch
    hidden: int = 32  # width of the norm/dropout test networks
    steps: int = 3  # optimizer steps for the lr/N vs loss/N comparisons (momentum and Adam need > 1)

    @classmethod
    def quick(cls) -> Config:
        """A few seconds."""
        return cls(n_values=(2, 3, 8))


@dataclass(frozen=True)
class Task:
    """The whole comparison is one task: it takes seconds."""

    claims: str  # the claims it covers


class OptimizerCase(NamedTuple):
    """One optimizer of the lr/N vs loss/N comparison (C6)."""

    case: str  # the row's case
    spec: eq.OptimizerSpec  # the optimizer
    predicted: str  # "equal" or "differs"
    fix: Callable[[eq.OptimizerSpec], eq.OptimizerSpec] | None  # the spec whose lr/N run equals loss/N, if needed


def _compare(lhs: torch.Tensor, rhs: torch.Tensor) -> tuple[float, bool]:
    scale = rhs.abs().max().item() or 1.0
    return (lhs - rhs).abs().max().item() / scale, bool(torch.equal(lhs, rhs))


def _net(norm: str | None, hidden: int, seed: int, dropout: str | None = None) -> nn.Module:
    """Digits classifier 64-h-h-10 with a norm (and dropout) after each hidden layer, seeded."""
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, (a, b) in enumerate(((64, hidden), (hidden, hidden))):
            layers.append(nn.Linear(a, b))
            layers.append(
                {
                    "batch": nn.BatchNorm1d(b),
                    "layer": nn.LayerNorm(b),
                    "group": nn.GroupNorm(4, b),
                    None: nn.Identity(),
                }[norm]
            )
            layers.append(nn.Tanh())
            if dropout == "stock":
                layers.append(nn.Dropout(0.3))
            elif dropout == "keyed":
                layers.append(eq.SampleKeyedDropout(0.3, seed=seed + i))
        layers.append(nn.Linear(hidden, 10))
    return nn.Sequential(*layers)


class _TokenModel(nn.Module):
    """Embedding + linear next-character model (logits (B, T, V) from ids (B, T))."""

    def __init__(self, vocab: int, width: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.out = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(ids)))


def run(
    config: Config,
    out_dir: str | Path,
    *,
    seed: int = 0,
    device: str = "cpu",
    shard: tuple[int, int] | None = None,
    progress: bool = True,
) -> Path | None:
    """Compute every comparison (one task: they take seconds); returns ``results.csv``."""
    if device != "cpu":
        raise ValueError(f"the equivalence experiment runs in fp64 on CPU; --device {device!r} is not supported")

    def work(task: Task) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []

        def add(
            claim: str, case: str, comparison: str, *, n: int, predicted: str, lhs: torch.Tensor, rhs: torch.Tensor
        ) -> None:
            rel, same = _compare(lhs, rhs)
            ok = (rel <= TOL) if predicted == "equal" else (rel > TOL)
            rows.append(
                {
                    "experiment": NAME,
                    "claim": claim,
                    "case": case,
                    "comparison": comparison,
                    "n_accum": n,
                    "predicted": predicted,
                    "rel_difference": rel,
                    "bit_identical": int(same),
                    "as_predicted": int(ok),
                }
            )

        digits = make_workload("mlp", seed=seed, size="quick", warmup_steps=0)
        for n in config.n_values:
            g = torch.Generator().manual_seed(stable_seed(seed, n, "data"))
            x, y = digits.sample(n * config.micro_batch, g)
            steps = [digits.sample(n * config.micro_batch, g) for _ in range(config.steps)]
            net = _net(None, config.hidden, seed)
            big = eq.accumulated_gradient(net, x, y, 1)

            # C1: summing N micro-batch gradients of loss/N gives the large-batch gradient
            add(
                "C1",
                "MLP, digits",
                "accumulated vs large batch",
                n=n,
                predicted="equal",
                lhs=eq.accumulated_gradient(net, x, y, n),
                rhs=big,
            )
            # C2: without the 1/N the accumulated gradient is N times too large
            add(
                "C2",
                "MLP, digits",
                "loss not divided by N vs large batch",
                n=n,
                predicted="differs",
                lhs=eq.accumulated_gradient(net, x, y, n) * n,
                rhs=big,
            )
            sgd = eq.OptimizerSpec("sgd", lr=0.1)
            first = steps[:1]
            upd = {
                c: eq.accumulated_update(net, first, n, sgd, convention=c)
                for c in ("sum", "loss_div_n", "large_batch", "zero_grad_every_step")
            }
            add(
                "C2",
                "MLP, SGD",
                "update, loss/N vs large batch",
                n=n,
                predicted="equal",
                lhs=upd["loss_div_n"],
                rhs=upd["large_batch"],
            )
            add(
                "C2",
                "MLP, SGD",
                "update, loss not divided vs large batch",
                n=n,
                predicted="differs",
                lhs=upd["sum"],
                rhs=upd["large_batch"],
            )
            # C3: zero_grad at every micro-step: the update is the last micro-batch's gradient / N
            add(
                "C3",
                "MLP, SGD",
                "zero_grad every micro-step vs large batch",
                n=n,
                predicted="differs",
                lhs=upd["zero_grad_every_step"],
                rhs=upd["large_batch"],
            )
            xs, ys = first[0]
            last = eq.accumulated_gradient(net, xs[-config.micro_batch :], ys[-config.micro_batch :], 1)
            add(
                "C3",
                "MLP, SGD",
                "zero_grad every micro-step vs -lr * g_last / N",
                n=n,
                predicted="equal",
                lhs=upd["zero_grad_every_step"],
                rhs=-sgd.lr * last / n,
            )
            # C4: the model is frozen within the window -- but BatchNorm and dropout see micro-batches
            for norm, mode, predicted in (
                ("batch", "train", "differs"),
                ("batch", "eval", "equal"),
                ("layer", "train", "equal"),
                ("group", "train", "equal"),
            ):
                m = _net(norm, config.hidden, seed)
                m.train(mode == "train")
                add(
                    "C4",
                    f"{norm} norm, {mode} mode",
                    "accumulated vs large batch",
                    n=n,
                    predicted=predicted,
                    lhs=eq.accumulated_gradient(m, x, y, n),
                    rhs=eq.accumulated_gradient(m, x, y, 1),
                )
            for kind, predicted in (("stock", "differs"), ("keyed", "equal")):
                m = _net(None, config.hidden, seed, dropout=kind)
                add(
                    "C4",
                    f"dropout ({'torch.nn.Dropout, 2 layers' if kind == 'stock' else 'masks keyed by sample'})",
                    "accumulated vs large batch",
                    n=n,
                    predicted=predicted,
                    lhs=eq.accumulated_gradient(m, x, y, n, seed=1),
                    rhs=eq.accumulated_gradient(m, x, y, 1, seed=1),
                )
            # C6: lr/N vs loss/N, over several steps
            cases = [
                OptimizerCase("SGD", sgd, "equal", None),
                OptimizerCase("SGD, momentum 0.9", sgd.replace(momentum=0.9), "equal", None),
                OptimizerCase(
                    "SGD, weight decay 0.1",
                    sgd.replace(weight_decay=0.1),
                    "differs",
                    lambda s, n=n: s.replace(weight_decay=s.weight_decay * n),
                ),
                OptimizerCase("Adam", eq.OptimizerSpec("adam", lr=1e-2), "differs", None),
                OptimizerCase(
                    "AdamW, weight decay 0.1", eq.OptimizerSpec("adamw", lr=1e-2, weight_decay=0.1), "differs", None
                ),
            ]
            for case, spec, predicted, fix in cases:
                ref = eq.train(net, steps, n, spec, convention="loss_div_n")
                add(
                    "C6",
                    case,
                    "lr/N vs loss/N",
                    n=n,
                    predicted=predicted,
                    lhs=eq.train(net, steps, n, spec, convention="lr_div_n"),
                    rhs=ref,
                )
                if fix is not None:
                    add(
                        "C6",
                        case,
                        "lr/N with weight decay x N vs loss/N",
                        n=n,
                        predicted="equal",
                        lhs=eq.train(net, steps, n, fix(spec), convention="lr_div_n"),
                        rhs=ref,
                    )
                if spec.name in ("adam", "adamw"):  # what holds: Adam is invariant to the loss scale up to eps
                    add(
                        "C6",
                        case,
                        "loss not divided, eps x N vs loss/N",
                        n=n,
                        predicted="equal",
                        lhs=eq.train(net, steps, n, spec.replace(eps=spec.eps * n), convention="sum"),
                        rhs=ref,
                    )
        # C7: token-count normalisation (variable lengths) and the partial last window
        text = make_workload("transformer", seed=seed, size="quick", warmup_steps=0)
        vocab = text.model.vocab
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tok = _TokenModel(vocab)
        g = torch.Generator().manual_seed(stable_seed(seed, "tokens"))
        for n in config.n_values:
            micro = []
            for _ in range(n):
                ids, tgt = text.sample(4, g)
                lengths = torch.randint(4, ids.shape[1] + 1, (4,), generator=g)  # real tokens per sequence
                mask = torch.arange(ids.shape[1]) < lengths[:, None]
                micro.append(eq.TokenBatch(ids, tgt, mask))
            big = eq.token_gradient(tok, micro, normalisation="large_batch")
            add(
                "C7",
                "variable-length text",
                "mean of per-micro-batch token means vs large batch",
                n=n,
                predicted="differs",
                lhs=eq.token_gradient(tok, micro, normalisation="mean_of_means"),
                rhs=big,
            )
            add(
                "C7",
                "variable-length text",
                "sum / global token count vs large batch",
                n=n,
                predicted="equal",
                lhs=eq.token_gradient(tok, micro, normalisation="global_token_mean"),
                rhs=big,
            )
            m = n + 1 if n > 1 else 3  # an epoch of n + 1 micro-batches: the last window holds 1 of N
            xs, ys = digits.sample(m * config.micro_batch, g)
            micro_xy = [
                (
                    xs[i * config.micro_batch : (i + 1) * config.micro_batch],
                    ys[i * config.micro_batch : (i + 1) * config.micro_batch],
                )
                for i in range(m)
            ]
            net = _net(None, config.hidden, seed)
            truth = eq.window_gradients(net, micro_xy, n, mode="large_batch")[-1]
            add(
                "C7",
                "partial last window (1 of N)",
                "loss / N vs the window's large batch",
                n=n,
                predicted="differs",
                lhs=eq.window_gradients(net, micro_xy, n, mode="divide_by_n")[-1],
                rhs=truth,
            )
            add(
                "C7",
                "partial last window (1 of N)",
                "loss / window size vs the window's large batch",
                n=n,
                predicted="equal",
                lhs=eq.window_gradients(net, micro_xy, n, mode="divide_by_window")[-1],
                rhs=truth,
            )
        return rows

    return run_tasks(
        NAME,
        out_dir,
        [Task(claims="C1-C4,C6,C7")],
        work,
        columns=COLUMNS,
        config=config,
        seed=seed,
        device=device,
        shard=shard,
        progress=progress,
    )
