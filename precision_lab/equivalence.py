"""Is gradient accumulation the same as a large batch?  The claims, as numbers one can compute.

Every function here is pure and seeded: it deep-copies the given ``nn.Module``, casts the copy to
``dtype`` (float64 unless told otherwise, so that the claims are tested, not fp32 rounding), runs
plain ``loss.backward()`` and stock ``torch.optim`` optimizers on it, and returns flat float64
tensors in ``named_parameters()`` order.  Stochastic layers (dropout) draw from the global torch RNG
seeded with ``seed`` inside ``torch.random.fork_rng``, so the caller's RNG state is left alone, and
everything runs on one intra-op thread (restored afterwards), so the bytes do not depend on the machine's
core count.

One optimizer step sees N micro-batches of B samples (``N*B`` samples in all, split contiguously).
The accumulation conventions (:data:`CONVENTIONS`) differ in where the 1/N goes:

========================  =========================================================================
``loss_div_n``            each micro-batch's mean loss / N before backward, optimizer at ``lr``
``lr_div_n``              each micro-batch's mean loss undivided, optimizer at ``lr / N``
``sum``                   loss undivided, ``lr`` (the gradient is the *sum* of micro-gradients; the
                          classic forgotten 1/N, and the right-hand side of the Adam identities)
``large_batch``           one forward and backward of all ``N*B`` samples, mean loss, ``lr``
``zero_grad_every_step``  the mistake: ``zero_grad()`` before every micro-batch's backward of
                          loss / N, one step after N of them: only the last micro-batch counts
========================  =========================================================================

What holds (``g`` the mean gradient of the N*B samples, ``G = N g`` the sum of micro-gradients;
the tests in ``tests/test_equivalence.py`` check each line, bit for bit where it says so):

* SGD, with or without momentum (any number of steps): ``loss_div_n == lr_div_n == large_batch``.
  The first equality is bit-exact when N is a power of two: ``g_i / N`` is then exact, and so is
  every product that follows (``lr * (G/N) == (lr/N) * G`` as real numbers, rounded once).
* SGD with coupled weight decay ``wd`` (``grad + wd * p``): ``lr_div_n`` steps with
  ``(lr/N) * (G + wd p) = lr (g + (wd/N) p)``, i.e. it divides the weight decay by N.  What holds
  instead is ``loss_div_n(lr, wd) == lr_div_n(lr, N*wd)``, since ``(lr/N)(G + N wd p) = lr (g + wd p)``
  (bit-exact for N a power of two, momentum or not).
* Adam (``u = lr * m_hat / (sqrt(v_hat) + eps)``): scaling every gradient by c > 0 scales m by c and
  sqrt(v) by c, so ``u(c g; eps) = u(g; eps / c)``.  Hence ``loss_div_n(eps) == sum(N*eps)`` (with
  Adam's coupled weight decay, which is part of the gradient: ``loss_div_n(wd, eps) == sum(N*wd,
  N*eps)``), and ``lr_div_n(lr, wd, eps) == loss_div_n(lr/N, wd/N, eps/N)``: lr/N shrinks Adam's
  step by about N (exactly N as eps -> 0).  With the lr divided by N no choice of wd or eps brings
  the step back, so lr/N is not loss/N for Adam.
* AdamW (decoupled: ``p <- p (1 - lr wd)`` then the Adam step): the decay never sees the gradient,
  so ``loss_div_n(lr, wd, eps) == sum(lr, wd, N*eps)``, while ``lr_div_n(lr, wd, eps) ==
  loss_div_n(lr/N, wd, eps/N)`` shrinks both the decay and the step by N.  (Undoing it takes
  ``lr_div_n(N*lr, wd/N, N*eps)``, i.e. not dividing the lr at all.)
  The Adam(W) relations are bit-exact for N a power of two (every scaling above is then exact) and
  hold to rounding otherwise, where Adam amplifies a gradient's rounding error by up to ``1/eps``
  in entries with ``|g|`` near eps.
* ``zero_grad_every_step``: the step uses ``g_N / N`` (the last micro-batch's gradient over N); for N a
  power of two it is bit for bit one step on the last micro-batch alone at ``lr / N``.
* Token-level losses over padded sequences (:func:`token_gradient`): dividing each micro-batch's
  *sum* of token losses by the *global* token count equals the large batch for any split; the mean
  of per-micro-batch token means equals it only when every micro-batch holds as many tokens.
* A partial last window of k < N micro-batches (:func:`window_gradients`): dividing by N scales its
  gradient by k/N; dividing by k gives the window's large-batch gradient.
* Layers that mix samples (BatchNorm in train mode) break the identity; per-sample layers
  (LayerNorm, GroupNorm, BatchNorm in eval mode) keep it.  Dropout keeps it when every sample gets
  the same mask in both runs (:class:`SampleKeyedDropout`), and not otherwise: stock ``nn.Dropout``
  masks depend on the order in which the one global RNG stream is consumed.  With a single dropout
  layer torch's CPU Bernoulli sampler happens to hand N micro-batches the large batch's masks (the
  stream is consumed row after row); with two layers the micro-batches interleave the layers' draws
  and get other masks.  (On CUDA the Philox offsets advance per call, so expect other masks there.)

Example::

    spec = OptimizerSpec("adam", lr=1e-3)
    u1 = accumulated_update(model, batches, 4, spec, convention="loss_div_n")
    u2 = accumulated_update(model, batches, 4, spec.replace(eps=4 * spec.eps), convention="sum")
    assert torch.equal(u1, u2)  # N = 4 is a power of two
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional name)
from torch import nn

from precision_lab._threads import intra_op_threads
from precision_lab.checks import check_choice, check_int, check_real
from precision_lab.gradients import flat_gradients, flat_parameters, split

__all__ = [
    "CONVENTIONS",
    "NORMALISATIONS",
    "OPTIMIZERS",
    "WINDOW_MODES",
    "OptimizerSpec",
    "SampleKeyedDropout",
    "TokenBatch",
    "accumulated_gradient",
    "accumulated_update",
    "micro_batches",
    "token_gradient",
    "train",
    "trajectory",
    "window_gradients",
]

CONVENTIONS: tuple[str, ...] = ("loss_div_n", "lr_div_n", "sum", "large_batch", "zero_grad_every_step")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")
NORMALISATIONS: tuple[str, ...] = ("mean_of_means", "global_token_mean", "large_batch")
WINDOW_MODES: tuple[str, ...] = ("divide_by_n", "divide_by_window", "large_batch")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


def _check_choice(kind: str, value: str, allowed: tuple[str, ...]) -> str:
    return check_choice(value, kind, allowed)


def _check_n(n: int) -> int:
    return check_int(n, "the accumulation count N")


def _check_nonneg(name: str, v: float, *, positive: bool = False) -> None:
    check_real(v, name, low=0.0, low_open=positive, high=math.inf, high_open=True)


@dataclass(frozen=True)
class OptimizerSpec:
    """One ``torch.optim`` optimizer and its hyper-parameters.

    Attributes:
        name: ``"sgd"`` (``torch.optim.SGD``), ``"adam"`` (``torch.optim.Adam``, coupled weight
            decay: ``wd * p`` is added to the gradient) or ``"adamw"`` (``torch.optim.AdamW``,
            decoupled: ``p <- p * (1 - lr * wd)`` before the Adam step).
        lr: The learning rate (``lr_div_n`` divides it by N).
        momentum: SGD's momentum (heavy ball, no dampening); must be 0 for Adam(W).
        weight_decay: SGD and Adam: coupled; AdamW: decoupled.
        eps: Adam(W)'s denominator term; ignored by SGD.
        betas: Adam(W)'s moment decay rates; ignored by SGD.
    """

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    eps: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.name, OPTIMIZERS)
        _check_nonneg("lr", self.lr, positive=True)
        _check_nonneg("momentum", self.momentum)
        _check_nonneg("weight_decay", self.weight_decay)
        _check_nonneg("eps", self.eps)
        if self.momentum and self.name != "sgd":
            raise ValueError(f"momentum={self.momentum!r} applies to 'sgd' only, not {self.name!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")

    def replace(self, **changes: float | str | tuple[float, float]) -> OptimizerSpec:
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def build(
        self, params: Iterator[nn.Parameter] | list[nn.Parameter], *, lr: float | None = None
    ) -> torch.optim.Optimizer:
        """The optimizer over ``params`` (at ``lr`` instead of ``self.lr`` when given)."""
        lr = self.lr if lr is None else lr
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)
        cls = torch.optim.Adam if self.name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)


class SampleKeyedDropout(nn.Module):
    """Dropout whose mask for a sample depends only on ``seed`` and the sample's position in the data.

    The r-th row this layer has seen since construction (counting across calls) gets the mask
    drawn from a ``torch.Generator`` seeded with ``seed * 2**32 + r``.  A batch split into micro-
    batches therefore gets the same masks as the whole batch however the calls are cut and whatever
    else draws random numbers in between, which is what the accumulation identity needs.  Stock
    ``nn.Dropout`` draws from one shared stream: its masks depend on the consumption order (see the
    module docstring).  Dropped units are zeroed and kept ones scaled by ``1 / (1 - p)``; in eval
    mode the layer is the identity.  The drivers in this module deep-copy the model, so each run
    starts from row 0.

    Args:
        p: Drop probability in [0, 1).
        seed: Non-negative integer seed.
    """

    def __init__(self, p: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        check_real(p, "dropout probability", low=0.0, high=1.0, high_open=True)
        check_int(seed, "seed", minimum=0, maximum=2**31 - 1)
        self.p = float(p)
        self.seed = seed
        self.rows_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the masks of the next ``x.shape[0]`` rows (the first dimension indexes samples)."""
        if not self.training or self.p == 0.0:
            return x
        g = torch.Generator()
        rows = []
        for r in range(self.rows_seen, self.rows_seen + x.shape[0]):
            g.manual_seed(self.seed * 2**32 + r)
            rows.append(torch.rand(x.shape[1:], generator=g, dtype=torch.float64) >= self.p)
        self.rows_seen += x.shape[0]
        keep = torch.stack(rows).to(device=x.device)
        return torch.where(keep, x / (1.0 - self.p), torch.zeros((), dtype=x.dtype, device=x.device))

    def extra_repr(self) -> str:
        """``p`` and ``seed``."""
        return f"p={self.p}, seed={self.seed}"


class TokenBatch(NamedTuple):
    """A micro-batch of right-padded sequences.

    Attributes:
        x: Inputs ``(B, T, ...)``; the model maps them to logits ``(B, T, classes)``.
        y: Integer targets ``(B, T)``.
        mask: Boolean ``(B, T)``: True on real tokens, False on padding.
    """

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor


# -- plumbing -----------------------------------------------------------------------------------


def _copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    return copy.deepcopy(model).to(dtype=dtype)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if x.is_floating_point() else x


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the global torch RNG and use one intra-op thread for the block; restore both afterwards.

    One thread, as :class:`~precision_lab.gradients.GradientEngine` defaults to: the bytes do not
    depend on the core count, and these tiny models run faster than with threads that spin-wait
    for a busy CPU.
    """
    check_int(seed, "seed", minimum=0)
    with torch.random.fork_rng(devices=[]), intra_op_threads(1):
        torch.manual_seed(seed)
        yield


def micro_batches(x: torch.Tensor, y: torch.Tensor, n: int) -> list[Batch]:
    """Split ``(x, y)`` into ``n`` contiguous micro-batches of equal size (ValueError otherwise)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"inputs hold {x.shape[0]} samples but targets {y.shape[0]}")
    b = split(x.shape[0], _check_n(n))
    return [(x[i * b : (i + 1) * b], y[i * b : (i + 1) * b]) for i in range(n)]


# -- gradients and optimizer steps ---------------------------------------------------------------


def accumulated_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    n: int,
    *,
    loss_fn: LossFn = F.cross_entropy,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> torch.Tensor:
    """The gradient a training loop accumulates: ``(loss_i / N).backward()`` for each of N micro-batches.

    ``n=1`` gives the large-batch gradient of the same code path.  The model's train/eval mode is
    kept (BatchNorm in train mode updates the copy's running statistics, not the caller's).

    Args:
        model: Any ``nn.Module``; deep-copied and cast to ``dtype``.
        x: All N*B inputs.
        y: Their targets.
        n: The accumulation count N (must divide the sample count).
        loss_fn: ``loss_fn(output, targets)`` -> the micro-batch's mean loss.
        dtype: The compute precision of the copy.
        seed: Seeds the global RNG (inside ``fork_rng``) for stochastic layers.

    Returns:
        The accumulated ``p.grad`` of every parameter, flattened, as float64.
    """
    batches = micro_batches(x, y, n)
    m = _copy(model, dtype)
    with _seeded(seed):
        for xi, yi in batches:
            (loss_fn(m(_cast(xi, dtype)), yi) / n).backward()
    return flat_gradients(m)


def _optimizer_step(
    m: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    n: int,
    convention: str,
    loss_fn: LossFn,
    dtype: torch.dtype,
) -> None:
    opt.zero_grad()
    if convention == "large_batch":
        loss_fn(m(_cast(x, dtype)), y).backward()
    else:
        divide = 1 if convention in ("lr_div_n", "sum") else n  # "lr_div_n": the 1/N lives in the lr
        for xi, yi in micro_batches(x, y, n):
            if convention == "zero_grad_every_step":
                opt.zero_grad()  # the mistake: the buffer forgets the earlier micro-batches
            loss = loss_fn(m(_cast(xi, dtype)), yi)
            (loss / divide if divide != 1 else loss).backward()
    opt.step()


def trajectory(
    model: nn.Module,
    batches: Sequence[Batch],
    n: int,
    spec: OptimizerSpec,
    *,
    convention: str,
    loss_fn: LossFn = F.cross_entropy,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> torch.Tensor:
    """Take one optimizer step per batch under an accumulation convention; return the parameters after each.

    Args:
        model: Any ``nn.Module``; deep-copied and cast to ``dtype`` (the caller's model is untouched).
            Its train/eval mode is kept.
        batches: One ``(x, y)`` per optimizer step, each of N*B samples (split contiguously into N
            micro-batches of B, except under ``large_batch``).  Two or more steps make momentum
            and Adam's moments matter.
        n: The accumulation count N.
        spec: The optimizer (``lr_div_n`` builds it at ``spec.lr / n``).
        convention: One of :data:`CONVENTIONS` (see the module docstring).
        loss_fn: ``loss_fn(output, targets)`` -> a batch's mean loss.
        dtype: The compute precision.
        seed: Seeds the global RNG (inside ``fork_rng``) for stochastic layers.

    Returns:
        A float64 tensor ``(steps + 1, num_params)``: row 0 the initial parameters (cast to
        ``dtype``), row t the parameters after step t, flattened in ``named_parameters()`` order.

    Raises:
        ValueError: An unknown convention, N < 1, no batches, or a batch that does not split into N.
    """
    _check_choice("convention", convention, CONVENTIONS)
    _check_n(n)
    if len(batches) == 0:
        raise ValueError("batches is empty: at least one optimizer step is needed")
    for x, y in batches:  # validate every split before any work
        micro_batches(x, y, n)
    m = _copy(model, dtype)
    opt = spec.build(list(m.parameters()), lr=spec.lr / n if convention == "lr_div_n" else spec.lr)
    rows = [flat_parameters(m)]
    with _seeded(seed):
        for x, y in batches:
            _optimizer_step(m, opt, x, y, n, convention, loss_fn, dtype)
            rows.append(flat_parameters(m))
    return torch.stack(rows).to(torch.float64)


def train(
    model: nn.Module,
    batches: Sequence[Batch],
    n: int,
    spec: OptimizerSpec,
    *,
    convention: str,
    loss_fn: LossFn = F.cross_entropy,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> torch.Tensor:
    """The parameters after the last step of :func:`trajectory` (flat float64)."""
    return trajectory(model, batches, n, spec, convention=convention, loss_fn=loss_fn, dtype=dtype, seed=seed)[-1]


def accumulated_update(
    model: nn.Module,
    batches: Sequence[Batch],
    n: int,
    spec: OptimizerSpec,
    *,
    convention: str,
    loss_fn: LossFn = F.cross_entropy,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> torch.Tensor:
    """The parameter change of :func:`train`: final minus initial parameters (flat float64).

    The subtraction is rounded: each entry carries up to half an ulp of ``|final|`` beyond the
    update itself; compare :func:`train` outputs to test bit-identity.
    """
    path = trajectory(model, batches, n, spec, convention=convention, loss_fn=loss_fn, dtype=dtype, seed=seed)
    return path[-1] - path[0]


# -- token-count normalisation -------------------------------------------------------------------


def _token_loss_sum(m: nn.Module, batch: TokenBatch, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Sum of the per-token cross-entropies over the real tokens, and how many there are."""
    logits = m(_cast(batch.x, dtype))
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.y.reshape(-1), reduction="none")
    mask = batch.mask.reshape(-1)
    return torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype)).sum(), int(mask.sum())


def _check_tokens(micro: Sequence[TokenBatch]) -> None:
    if len(micro) == 0:
        raise ValueError("micro_batches is empty")
    for i, b in enumerate(micro):
        if b.mask.dtype != torch.bool or b.mask.shape != b.y.shape or tuple(b.x.shape[:2]) != tuple(b.y.shape):
            raise ValueError(
                f"micro-batch {i}: x {tuple(b.x.shape)}, y {tuple(b.y.shape)} and bool mask "
                f"{tuple(b.mask.shape)} ({b.mask.dtype}) must share (B, T)"
            )
        if not bool(b.mask.any()):
            raise ValueError(f"micro-batch {i} holds no real token (its mask is all False)")


def _pad_cat(micro: Sequence[TokenBatch]) -> TokenBatch:
    """One batch of all the micro-batches' sequences, right-padded (zeros, target 0, mask False)."""
    t = max(b.y.shape[1] for b in micro)

    def pad(v: torch.Tensor) -> torch.Tensor:
        extra = [0, 0] * (v.dim() - 2) + [0, t - v.shape[1]]  # F.pad lists the last dimension first
        return F.pad(v, extra)

    return TokenBatch(*(torch.cat([pad(getattr(b, f)) for b in micro]) for f in TokenBatch._fields))


def token_gradient(
    model: nn.Module,
    micro_batches: Sequence[TokenBatch],
    *,
    normalisation: str,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> torch.Tensor:
    """The gradient of a token-level cross-entropy accumulated over micro-batches of padded sequences.

    Args:
        model: Maps ``x`` ``(B, T, ...)`` to logits ``(B, T, classes)``; deep-copied, cast to ``dtype``.
        micro_batches: The N micro-batches of one optimizer step (their T may differ).
        normalisation: ``"mean_of_means"`` (each micro-batch's sum over its real tokens / its own
            token count / N: what dividing a per-micro-batch mean loss by N does),
            ``"global_token_mean"`` (each micro-batch's sum / the total token count of all N) or
            ``"large_batch"`` (all sequences padded to one T in one forward, sum / total count).
        dtype: The compute precision.
        seed: Seeds the global RNG (inside ``fork_rng``) for stochastic layers.

    Returns:
        The flat float64 gradient.  ``global_token_mean`` equals ``large_batch`` for any split;
        ``mean_of_means`` equals it when every micro-batch holds the same number of real tokens.
    """
    _check_choice("normalisation", normalisation, NORMALISATIONS)
    _check_tokens(micro_batches)
    m = _copy(model, dtype)
    with _seeded(seed):
        if normalisation == "large_batch":
            total, count = _token_loss_sum(m, _pad_cat(micro_batches), dtype)
            (total / count).backward()
        else:
            n = len(micro_batches)
            # the global count is known before any backward: a loader can count mask.sum() up front
            n_tokens = sum(int(b.mask.sum()) for b in micro_batches)
            for b in micro_batches:
                total, count = _token_loss_sum(m, b, dtype)
                (total / count / n if normalisation == "mean_of_means" else total / n_tokens).backward()
    return flat_gradients(m)


# -- a partial last window -----------------------------------------------------------------------


def window_gradients(
    model: nn.Module,
    micro_batches: Sequence[Batch],
    n: int,
    *,
    mode: str,
    loss_fn: LossFn = F.cross_entropy,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> list[torch.Tensor]:
    """The gradient of each accumulation window when M micro-batches are grouped N at a time.

    The windows are consecutive groups of N micro-batches; when N does not divide M the last one
    holds ``k = M mod N`` (an epoch's tail).  All windows see the same (unchanged) parameters.

    Args:
        model: Any ``nn.Module``; deep-copied and cast to ``dtype``.
        micro_batches: The M micro-batches ``(x, y)``, in order.
        n: The accumulation count N.
        mode: ``"divide_by_n"`` (each loss / N, the fixed divisor: wrong in a short window),
            ``"divide_by_window"`` (each loss / the window's real size k) or ``"large_batch"`` (one
            backward of the window's concatenated samples, mean loss).
        loss_fn: ``loss_fn(output, targets)`` -> a batch's mean loss.
        dtype: The compute precision.
        seed: Seeds the global RNG (inside ``fork_rng``) for stochastic layers.

    Returns:
        One flat float64 gradient per window.
    """
    _check_choice("window mode", mode, WINDOW_MODES)
    _check_n(n)
    if len(micro_batches) == 0:
        raise ValueError("micro_batches is empty")
    m = _copy(model, dtype)
    out = []
    with _seeded(seed):
        for lo in range(0, len(micro_batches), n):
            window = micro_batches[lo : lo + n]
            m.zero_grad()
            if mode == "large_batch":
                x = torch.cat([xi for xi, _ in window])
                y = torch.cat([yi for _, yi in window])
                loss_fn(m(_cast(x, dtype)), y).backward()
            else:
                divide = n if mode == "divide_by_n" else len(window)
                for xi, yi in window:
                    (loss_fn(m(_cast(xi, dtype)), yi) / divide).backward()
            out.append(flat_gradients(m))
    return out
