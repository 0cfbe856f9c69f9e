"""Small models whose micro-batch gradients are the same bits under ``torch.func.vmap`` and in a loop.

The gradient measurements compute N micro-batch gradients either with ``torch.func`` (functional_call
+ grad + vmap over the micro-batches) or with a plain loop, one micro-batch at a time.  Both must
give the same bits, otherwise the comparison of accumulation strategies would be polluted by the way
the gradients were computed.  Stock PyTorch layers are not all batch-invariant, so the models here
are built from a few building blocks that are:

* :class:`Linear` computes ``matmul(x, W^T)`` and then ``+ b`` as two ops.  ``nn.Linear`` calls the
  fused ``addmm``; under ``vmap`` its gradients differ from the loop's in fp64 and bf16.
* :class:`Conv2d` lowers a convolution to ``unfold`` (im2col) followed by the same two-op matmul, so
  that a convolution is exactly a :class:`Linear` applied to patches.  ``F.conv2d``'s batching rule
  reshapes the micro-batches into other convolution dimensions, and its weight and bias gradients
  differ from the loop's in fp32 and bf16.
* :class:`BatchNorm2d` and :class:`LayerNorm` normalise with the native kernels but apply their
  affine parameters in a separate elementwise op: the fused kernels reduce the parameter gradients
  (``nn.BatchNorm2d(track_running_stats=False)``: also the statistics) in a different order under
  ``vmap``.  BatchNorm keeps no running statistics and never writes a buffer (``functional_call`` +
  ``vmap`` cannot write running statistics anyway).
* :class:`CausalSelfAttention` spells attention out (``q @ k^T * scale``, ``masked_fill`` with -inf,
  softmax, ``@ v``); no fused ``scaled_dot_product_attention``.

No module changes a parameter or buffer in place in ``forward``.

Threads: ``vmap`` turns a weight gradient ``x^T @ grad_out`` into one ``bmm`` over the micro-batches,
whose per-micro-batch results match a single-threaded GEMM (observed with MKL and oneDNN); the loop's
``mm`` may split the same GEMM over threads and sum in another order.  With ``torch.set_num_threads(1)`` every workload gives the same
bits both ways in fp64, fp32 and bf16 (checked at micro-batch 16 and 32); with more threads a few
GEMM shapes differ in the last bits (MKL sgemm with the 10-wide classifier head; oneDNN bf16 GEMMs
over 2048 rows).  ``tests/test_workloads.py`` lists them as strict expected failures.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional name)
from torch import Tensor, nn

__all__ = [
    "CNN",
    "MLP",
    "BatchNorm2d",
    "CausalSelfAttention",
    "CharTransformer",
    "Conv2d",
    "LayerNorm",
    "Linear",
    "TransformerBlock",
    "count_parameters",
]


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (every parameter tensor's ``numel``, summed)."""
    return sum(p.numel() for p in model.parameters())


class Linear(nn.Linear):
    """``nn.Linear`` computed as ``matmul(x, W^T)`` followed by ``+ b`` (two ops, no fused ``addmm``).

    Same parameters, initialisation and state dict as :class:`torch.nn.Linear`.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Apply ``x @ W^T + b`` over the last dimension of ``x``."""
        y = torch.matmul(x, self.weight.t())
        if self.bias is not None:
            y = y + self.bias
        return y


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` computed as im2col (``F.unfold``) + :class:`Linear`-style matmul.

    Supports ``groups=1`` and zero padding given as an int or pair (what the workloads use). The
    parameters, their shapes and initialisation are those of :class:`torch.nn.Conv2d`.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError(
                f"Conv2d supports groups=1, padding_mode='zeros' and numeric padding; got groups={self.groups!r}, "
                f"padding_mode={self.padding_mode!r}, padding={self.padding!r}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Convolve ``x`` of shape (B, C, H, W) to (B, out_channels, H', W')."""
        b, _, h, w = x.shape
        kh, kw = self.kernel_size
        (ph, pw), (sh, sw), (dh, dw) = self.padding, self.stride, self.dilation
        h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        # (B, C*kh*kw, L) -> (B, L, C*kh*kw): one row per output pixel, then the two-op Linear.
        y = torch.matmul(cols.transpose(1, 2), self.weight.reshape(self.out_channels, -1).t())
        if self.bias is not None:
            y = y + self.bias
        # Back to contiguous NCHW: the rows-as-pixels layout would be a channels-last view, for which
        # the BatchNorm kernel reduces in a different order than for the copy vmap makes of it.
        return y.transpose(1, 2).reshape(b, self.out_channels, h_out, w_out).contiguous()


class BatchNorm2d(nn.Module):
    """Batch normalisation with the current batch's statistics only; the affine map is a separate op.

    Same forward as ``nn.BatchNorm2d(channels, eps, affine=True, track_running_stats=False)`` in train
    mode: each channel is normalised by its mean and biased variance over (B, H, W) of the batch it is
    given, by the native ``F.batch_norm`` kernel (which accumulates bf16/fp16 statistics in fp32), and
    then scaled and shifted by ``weight`` and ``bias`` in a second, elementwise op.  The split matters:
    ``F.batch_norm`` with the affine parameters fused computes their gradients with a reduction whose
    order changes under ``vmap``; the split form gives the same bits in a loop and under ``vmap``.
    The module holds no buffers, so ``eval()`` changes nothing: statistics always come from the batch.

    Args:
        channels: Number of channels C of the (B, C, H, W) input.
        eps: Added to the variance before the square root.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise each channel of ``x`` (B, C, H, W) over (B, H, W), then apply the affine map."""
        y = F.batch_norm(x, None, None, None, None, training=True, momentum=0.0, eps=self.eps)
        return y * self.weight.reshape(1, -1, 1, 1) + self.bias.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        """Show the channel count and eps."""
        return f"{self.channels}, eps={self.eps}, track_running_stats=False"


class LayerNorm(nn.Module):
    """Layer normalisation over the last dimension, with the affine map as a separate op.

    Same forward as ``nn.LayerNorm(width, eps)``: the native ``F.layer_norm`` kernel normalises
    (fp32 statistics for bf16/fp16 inputs), then ``* weight + bias`` follows elementwise.  With the
    affine parameters fused, the native backward sums their gradients in an order that changes under
    ``vmap``; split, the parameter gradients are plain broadcast reductions that do not.

    Args:
        width: Size of the normalised (last) dimension.
        eps: Added to the variance before the square root.
    """

    def __init__(self, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.width = width
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise the last dimension of ``x``, then apply the affine map."""
        return F.layer_norm(x, (self.width,), None, None, self.eps) * self.weight + self.bias

    def extra_repr(self) -> str:
        """Show the width and eps."""
        return f"{self.width}, eps={self.eps}"


class MLP(nn.Module):
    """Multi-layer perceptron with ReLU between :class:`Linear` layers.

    Args:
        sizes: Layer widths from input to output, e.g. ``(64, 128, 128, 10)``.
    """

    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least input and output sizes; got sizes={sizes!r}")
        self.sizes = tuple(sizes)
        self.layers = nn.ModuleList(Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, sizes[0]) inputs to (B, sizes[-1]) logits."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class CNN(nn.Module):
    """Two conv + BatchNorm + ReLU stages, 2x2 average pooling and a linear classifier, for 8x8 digits.

    ``conv(1->c1, 3x3, pad 1) + BN + ReLU, conv(c1->c2, 3x3, pad 1) + BN + ReLU, avgpool 2, flatten,
    Linear(c2*4*4 -> classes)``.

    BatchNorm is deliberately kept: it uses the statistics of the micro-batch it is given (no running
    statistics; :class:`BatchNorm2d` has ``track_running_stats=False`` semantics), so each
    micro-batch's gradient depends on which samples share the micro-batch, and the sum of N
    micro-batch gradients is *not* the large-batch gradient even in exact arithmetic.  That coupling
    is the point of this workload: it separates the accumulation's rounding error from the change of
    the objective that micro-batching itself causes.

    Args:
        channels: (c1, c2), the two convolutions' output channels.
        classes: Number of output classes.
        side: Input height and width (8 for digits); must be even.
    """

    def __init__(self, channels: tuple[int, int] = (8, 16), classes: int = 10, side: int = 8) -> None:
        super().__init__()
        if side % 2:
            raise ValueError(f"CNN input side must be even for 2x2 pooling; got side={side!r}")
        c1, c2 = channels
        self.channels = (c1, c2)
        self.side = side
        self.conv1 = Conv2d(1, c1, 3, padding=1)
        self.bn1 = BatchNorm2d(c1)
        self.conv2 = Conv2d(c1, c2, 3, padding=1)
        self.bn2 = BatchNorm2d(c2)
        self.head = Linear(c2 * (side // 2) ** 2, classes)

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, side*side) or (B, 1, side, side) images to (B, classes) logits."""
        x = x.reshape(x.shape[0], 1, self.side, self.side)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.avg_pool2d(x, 2)
        return self.head(x.flatten(1))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention written out explicitly (no fused attention kernel).

    Args:
        width: Model width C (divisible by ``heads``).
        heads: Number of heads.
        context: Maximum sequence length (size of the causal mask).
    """

    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width!r} is not divisible by heads={heads!r}")
        self.heads = heads
        self.qkv = Linear(width, 3 * width)
        self.proj = Linear(width, width)
        # True above the diagonal: position t may not attend to t' > t. A constant, never written.
        self.register_buffer("mask", torch.ones(context, context, dtype=torch.bool).triu(1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the T positions of ``x`` (B, T, C)."""
        b, t, c = x.shape
        d = c // self.heads
        q, k, v = self.qkv(x).split(c, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        att = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
        att = att.masked_fill(self.mask[:t, :t], float("-inf"))
        att = torch.softmax(att, dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(b, t, c)
        return self.proj(y)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` (GELU, tanh form).

    Args:
        width: Model width C.
        heads: Attention heads.
        context: Maximum sequence length.
        mlp_ratio: Hidden width of the MLP is ``mlp_ratio * width``.
    """

    def __init__(self, width: int, heads: int, context: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.ln1 = LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, context)
        self.ln2 = LayerNorm(width)
        self.fc = Linear(width, mlp_ratio * width)
        self.out = Linear(mlp_ratio * width, width)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to (B, T, C)."""
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class CharTransformer(nn.Module):
    """Character-level GPT: token + learned positional embedding, pre-LN blocks, final LN, linear head.

    Weights are initialised as in nanoGPT: linear and embedding weights N(0, 0.02^2), biases zero,
    LayerNorm weight one and bias zero.  The generator is the global one, so build the model inside
    ``torch.random.fork_rng`` (as :func:`~precision_lab.workloads.make_workload` does).

    Args:
        vocab: Vocabulary size V.
        context: Sequence length T the model accepts (at most).
        width: Model width C.
        depth: Number of blocks.
        heads: Attention heads per block.
    """

    def __init__(self, vocab: int, context: int, width: int = 64, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.vocab, self.context, self.width, self.depth, self.heads = vocab, context, width, depth, heads
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads, context) for _ in range(depth))
        self.ln_f = LayerNorm(width)
        self.head = Linear(width, vocab)
        self.register_buffer("positions", torch.arange(context), persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, ids: Tensor) -> Tensor:
        """Map (B, T) int64 token ids to (B, T, V) next-token logits."""
        t = ids.shape[-1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.context}")
        x = self.tok(ids) + self.pos(self.positions[:t])
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
