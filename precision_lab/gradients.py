"""Micro-batch gradients of any ``nn.Module`` and the fp64 large-batch reference.

A batch of E samples is split into N contiguous micro-batches of E/N samples.  For micro-batch i
the engine computes ``g_i``, the gradient of the micro-batch's mean loss (optionally divided by N
and multiplied by a static loss scale *before* backward, in the compute precision, as a training
loop does), flattened over the parameters in ``named_parameters()`` order.  The truth is the
gradient of the whole batch's mean loss, computed once in fp64 by a float64 copy of the model.

Compute precisions (:data:`COMPUTE_FORMATS`), so that input quantisation (the micro-gradient itself
is inexact) and accumulation rounding (the buffer's adds) can be measured apart:

=================  ===============================================================================
``fp64``           a float64 copy of the model and inputs: micro-gradients carry only fp64 rounding
``fp32``           the model as given (float32)
``bf16_autocast``  fp32 parameters, forward under ``torch.autocast(dtype=bfloat16)``: fp32 gradients
                   computed from bf16 activations (mixed precision as most users run it)
``bf16``           pure bf16: parameters, activations, loss and gradients in bf16
``fp16``           pure fp16, with an optional static loss scale S (``loss * S`` before backward;
                   the caller divides the accumulated sum by S once, as ``GradScaler`` does)
=================  ===============================================================================

Two paths give the micro-gradients: ``vmap`` (``torch.func.vmap`` of ``torch.func.grad`` over a
chunk of micro-batches; the chunk size bounds memory) and ``loop`` (``torch.func.grad`` once per
micro-batch, which is bit-identical to ``loss.backward()``).  For the workloads in
:mod:`precision_lab.workloads`, whose layers avoid fused ``addmm`` and use explicit attention, the two
paths are bit-identical (tested) when the gradients are computed with one intra-op thread, which is
the engine's default (``threads=1``).  With more threads the loop's matrix products split their
reductions across threads and sum in another order than vmap's per-micro-batch GEMMs: on this CPU
(MKL/oneDNN, 2 threads) the fp32 weight gradient of the 10-wide classifier head of the MLP and CNN
differs in ~10% of entries by up to ~1 fp32 eps x max|g|, and 1-8 entries of the bf16 transformer
at micro-batch 32 by 1-8 ulp.  One thread also makes the bytes independent of the machine's core
count; parallelism comes from running shards in separate processes (``--shard I/K``).

For an arbitrary user model vmap and loop need not agree even with one thread: vmap turns each
matrix product into a batched one, and stock layers (``nn.Linear``'s fused addmm, ``nn.Conv2d``,
affine norms) take other kernels for other shapes.  The chunk size is therefore a fixed number
from the caller's config, never chosen from free memory, so the same command gives the same bytes
on any machine.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from precision_lab._threads import intra_op_threads
from precision_lab.checks import check_int, check_real

__all__ = [
    "COMPUTE_FORMATS",
    "METHODS",
    "GradientEngine",
    "flat_gradients",
    "flat_parameters",
    "reference_gradient",
    "split",
]

COMPUTE_FORMATS: tuple[str, ...] = ("fp64", "fp32", "bf16_autocast", "bf16", "fp16")
METHODS: tuple[str, ...] = ("vmap", "loop")
_PARAM_DTYPE = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "bf16_autocast": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_compute(compute: str) -> str:
    if compute not in COMPUTE_FORMATS:
        raise ValueError(f"unknown compute format {compute!r}; known: {', '.join(COMPUTE_FORMATS)}")
    return compute


def split(n_items: int, n_micro: int) -> int:
    """Micro-batch size of ``n_items`` samples split into ``n_micro`` equal parts (ValueError otherwise)."""
    check_int(n_micro, "the accumulation count N")
    if n_items % n_micro:
        raise ValueError(f"a batch of {n_items} samples does not split into N={n_micro} equal micro-batches")
    return n_items // n_micro


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters of ``model`` flattened in ``named_parameters()`` order (a copy)."""
    return torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])


def flat_gradients(model: nn.Module) -> torch.Tensor:
    """Every parameter's ``.grad`` flattened in ``named_parameters()`` order, as float64 (zeros where None)."""
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for _, p in model.named_parameters()]
    ).to(torch.float64)


def _cast_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if x.is_floating_point() else x  # token ids stay integers


class GradientEngine:
    """Micro-batch gradients of one model in one compute precision.

    Args:
        model: Any ``nn.Module``; it is copied (``copy.deepcopy``) and cast to the compute
            precision, the original is left alone.  Buffers are passed to ``functional_call``
            unchanged: a module that writes its buffers in forward (BatchNorm with running stats)
            cannot be vmapped; use ``track_running_stats=False``.
        loss_fn: ``loss_fn(output, targets)`` -> the mean loss of a micro-batch.
        compute: One of :data:`COMPUTE_FORMATS`.
        method: ``"vmap"`` or ``"loop"`` (see the module docstring).
        chunk_size: Most micro-batches per vmap call.  Ignored by ``loop``.
        chunk_samples: Most samples per vmap call: a chunk holds
            ``max(1, min(chunk_size, chunk_samples // micro_batch))`` micro-batches, which bounds
            memory (and keeps large micro-batches from thrashing the cache).  Both are part of the
            config, never derived from free memory, so the bytes never depend on the machine.
        device: Where to compute.
        threads: Intra-op threads while computing gradients (restored between chunks, so the
            caller's own work keeps its threads).  1, the default, makes vmap and loop bit-identical
            for the built-in workloads and the bytes independent of the core count; None uses
            torch's current setting (faster, last-bit differences in some shapes, see above).

    Example::

        eng = GradientEngine(model, F.cross_entropy, "bf16")
        for g in eng.micro_gradients(x, y, n_micro=16, divide_by=16):  # chunks of (k, P)
            ...
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        compute: str = "fp32",
        *,
        method: str = "vmap",
        chunk_size: int = 64,
        chunk_samples: int = 256,
        device: str | torch.device = "cpu",
        threads: int | None = 1,
    ) -> None:
        self.compute = _check_compute(compute)
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
        check_int(chunk_size, "chunk_size")
        check_int(chunk_samples, "chunk_samples")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use 'cpu'")
        if threads is not None:
            check_int(threads, "threads")
        self.method = method
        self.chunk_size = chunk_size
        self.chunk_samples = chunk_samples
        self.threads = threads
        self.dtype = _PARAM_DTYPE[compute]
        self.model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype)
        # the truth is always the given model in fp64 (not this precision's rounded weights)
        self.reference_model = copy.deepcopy(model).to(device=self.device, dtype=torch.float64)
        self.params = {k: v.detach() for k, v in self.model.named_parameters()}
        self.buffers = {k: v.detach() for k, v in self.model.named_buffers()}
        self.shapes = [(k, v.shape, v.numel()) for k, v in self.params.items()]
        self.num_params = sum(n for _, _, n in self.shapes)
        self.loss_fn = loss_fn

    # -- the scalar function whose gradient is taken ---------------------------------------------
    def _loss(
        self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, divide_by: int, loss_scale: float
    ) -> torch.Tensor:
        if self.compute == "bf16_autocast":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                out = functional_call(self.model, (params, self.buffers), (x,))
            loss = self.loss_fn(out.float(), y)
        else:
            loss = self.loss_fn(functional_call(self.model, (params, self.buffers), (x,)), y)
        if divide_by != 1:
            loss = loss / divide_by  # "loss / N" before backward, in the compute precision
        if loss_scale != 1.0:
            loss = loss * loss_scale  # static loss scale (fp16): the caller divides the sum by it
        return loss

    def reference(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The fp64 gradient of the *given* model (unrounded weights) on the whole batch."""
        return reference_gradient(self.reference_model, self.loss_fn, inputs, targets, device=self.device)

    def _flatten(self, grads: dict[str, torch.Tensor], lead: int) -> torch.Tensor:
        return torch.cat([grads[k].reshape(lead, n) for k, _, n in self.shapes], dim=1)

    def micro_gradients(
        self, inputs: torch.Tensor, targets: torch.Tensor, n_micro: int, *, divide_by: int = 1, loss_scale: float = 1.0
    ) -> Iterator[torch.Tensor]:
        """Yield the N micro-gradients, in order, as chunks of shape ``(k, num_params)``.

        The chunks are in the compute precision's gradient dtype (fp64, fp32, fp32, bf16, fp16).

        Args:
            inputs: All E samples; split into ``n_micro`` contiguous micro-batches of E/N.
            targets: Their targets (first dimension E).
            n_micro: The accumulation count N (E must be divisible by it).
            divide_by: Divide each micro-batch's loss by this before backward (``N`` for the
                ``pre`` scaling placement, 1 for ``post``).
            loss_scale: Multiply the loss by this before backward (a static fp16 loss scale).

        Raises:
            ValueError: N < 1, an empty batch (E = 0), E not divisible by N, mismatched input and
                target counts, or a non-positive or non-finite ``divide_by``/``loss_scale``.
        """
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"inputs hold {inputs.shape[0]} samples but targets {targets.shape[0]}")
        if inputs.shape[0] == 0:
            raise ValueError(f"empty batch: inputs of shape {tuple(inputs.shape)}; need at least one sample")
        b = split(inputs.shape[0], n_micro)
        for name, v in (("divide_by", divide_by), ("loss_scale", loss_scale)):
            check_real(v, name, low=0.0, low_open=True, high=math.inf, high_open=True)
        x = _cast_input(inputs, self.dtype).to(self.device).reshape(n_micro, b, *inputs.shape[1:])
        y = targets.to(self.device).reshape(n_micro, b, *targets.shape[1:])
        g = grad(self._loss)
        if self.method == "loop":
            for i in range(n_micro):
                with intra_op_threads(self.threads):  # set per step: never leaks across a yield
                    out = self._flatten(g(self.params, x[i], y[i], divide_by, loss_scale), 1)
                yield out
            return
        batched = vmap(g, in_dims=(None, 0, 0, None, None))
        chunk = max(1, min(self.chunk_size, self.chunk_samples // b))
        for lo in range(0, n_micro, chunk):
            hi = min(lo + chunk, n_micro)
            with intra_op_threads(self.threads):
                if hi - lo == 1:  # vmap over one micro-batch takes other kernels than over several
                    out = self._flatten(g(self.params, x[lo], y[lo], divide_by, loss_scale), 1)
                else:
                    out = self._flatten(batched(self.params, x[lo:hi], y[lo:hi], divide_by, loss_scale), hi - lo)
            yield out


def reference_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The gradient of the whole batch's mean loss, in one fp64 pass, flattened (float64).

    One pass over all E samples, not a sum of chunks: a model whose output depends on the batch
    composition (BatchNorm in train mode) has a large-batch gradient that no sum of micro-batch
    gradients equals, and that difference is part of what is measured.

    Raises:
        ValueError: An empty batch (the mean loss of no samples is no gradient), or mismatched
            input and target counts.
    """
    eng = GradientEngine(model, loss_fn, "fp64", method="loop", device=device)
    (g,) = eng.micro_gradients(inputs, targets, 1)
    return g[0]
