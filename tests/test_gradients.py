"""The gradient engine: micro-gradients, the fp64 large-batch reference, the vmap and loop paths."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from precision_lab import Accumulator
from precision_lab.gradients import COMPUTE_FORMATS, GradientEngine, flat_parameters, reference_gradient


class Linear(nn.Linear):
    """matmul then add (no fused addmm), so vmap and a loop run the same kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight.t()) + self.bias


def mlp(widths: list[int], seed: int, norm: str | None = None) -> nn.Module:
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for a, b in zip(widths[:-1], widths[1:], strict=False):
            layers.append(Linear(a, b))
            if b != widths[-1]:
                if norm == "batch":
                    layers.append(nn.BatchNorm1d(b, track_running_stats=False))
                elif norm == "layer":
                    layers.append(nn.LayerNorm(b))
                layers.append(nn.Tanh())
        return nn.Sequential(*layers)


def data(n: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def accumulate_fp64(eng: GradientEngine, x: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    acc = Accumulator("exact", "fp64", (eng.num_params,))
    for chunk in eng.micro_gradients(x, y, n):
        for g in chunk:
            acc.add(g)
    return acc.value() / n


# The fp64 large-batch identity.  Both sides compute the same mathematical quantity in fp64; they
# differ only by fp64 rounding inside forward and backward, whose summations here are at most
# 64 terms long (widths and batches <= 64) through at most 3 layers.  2^-40 relative to the largest
# gradient entry leaves 2^13 fp64 ulps (u = 2^-53), more than gamma_k for k <= 2^12 per layer needs;
# the negative controls show the tolerance is tight enough to see fp32 arithmetic, a dropped 1/N and
# BatchNorm, which all change the gradient by far more.
IDENTITY_TOL = 2.0**-40


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 32), min_size=1, max_size=2),
    micro=st.integers(1, 8),
    n=st.sampled_from([1, 2, 3, 4, 8]),
    seed=st.integers(0, 2**16),
)
def test_fp64_accumulation_equals_large_batch(widths: list[int], micro: int, n: int, seed: int) -> None:
    model = mlp([5, *widths, 3], seed)
    x, y = data(micro * n, 5, 3, seed)
    ref = reference_gradient(model, F.cross_entropy, x, y)
    got = accumulate_fp64(GradientEngine(model, F.cross_entropy, "fp64"), x, y, n)
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= IDENTITY_TOL * scale
    # negative control: the same accumulation in fp32 arithmetic violates the tolerance unless
    # the gradient happens to be exactly representable (then both sides agree to the bit)
    got32 = accumulate_fp64(GradientEngine(model, F.cross_entropy, "fp32"), x, y, n)
    assert (got32 - ref).abs().max().item() > IDENTITY_TOL * scale or torch.equal(got32, ref)
    if n > 1:  # a dropped 1/N (the sum instead of the mean) is caught
        assert (got * n - ref).abs().max().item() > IDENTITY_TOL * scale or scale == 0


def test_batchnorm_breaks_the_identity_layernorm_keeps_it() -> None:
    x, y = data(64, 5, 3, 0)
    for norm, breaks in (("batch", True), ("layer", False)):
        model = mlp([5, 16, 3], 1, norm=norm)
        ref = reference_gradient(model, F.cross_entropy, x, y)
        got = accumulate_fp64(GradientEngine(model, F.cross_entropy, "fp64"), x, y, 8)
        err = (got - ref).abs().max().item() / ref.abs().max().item()
        assert (err > 1e-3) if breaks else (err <= IDENTITY_TOL), (norm, err)


@pytest.mark.parametrize("compute", COMPUTE_FORMATS)
@pytest.mark.parametrize("micro", [16, 32])
def test_vmap_and_loop_are_bit_identical(compute: str, micro: int) -> None:
    model = mlp([8, 32, 32, 4], 3)
    x, y = data(micro * 6, 8, 4, 4)
    paths = {}
    for method, chunk in (("loop", 1), ("vmap", 6), ("vmap", 4), ("vmap", 2)):
        eng = GradientEngine(model, F.cross_entropy, compute, method=method, chunk_size=chunk)
        paths[(method, chunk)] = torch.cat(list(eng.micro_gradients(x, y, 6, divide_by=6)))
    loop = paths[("loop", 1)]
    assert loop.shape == (6, eng.num_params)
    for key, g in paths.items():
        assert g.dtype == loop.dtype
        assert torch.equal(g, loop), key


@pytest.mark.parametrize("compute", ["fp32", "bf16", "fp16", "bf16_autocast"])
def test_loop_equals_plain_backward(compute: str) -> None:
    """What a training loop computes: ``(loss / N).backward()`` on a model copy in that precision."""
    model = mlp([8, 16, 4], 5)
    x, y = data(24, 8, 4, 6)
    eng = GradientEngine(model, F.cross_entropy, compute, method="loop")
    got = list(eng.micro_gradients(x, y, 3, divide_by=3))
    plain = eng.model  # the engine's own copy, already in the compute precision
    for i in range(3):
        plain.zero_grad()
        xi = x[i * 8 : (i + 1) * 8].to(eng.dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == "bf16_autocast"):
            out = plain(xi)
        (F.cross_entropy(out.float() if compute == "bf16_autocast" else out, y[i * 8 : (i + 1) * 8]) / 3).backward()
        expect = torch.cat([p.grad.reshape(-1) for p in plain.parameters()])
        assert torch.equal(got[i][0], expect)


@pytest.mark.parametrize("compute", ["fp64", "fp32", "bf16"])
def test_pre_scaling_by_a_power_of_two_is_exact(compute: str) -> None:
    """loss/N with N = 2^k scales every gradient exactly (no underflow at these magnitudes)."""
    model = mlp([8, 16, 4], 7)
    x, y = data(64, 8, 4, 8)
    eng = GradientEngine(model, F.cross_entropy, compute)
    pre = torch.cat(list(eng.micro_gradients(x, y, 16, divide_by=16)))
    post = torch.cat(list(eng.micro_gradients(x, y, 16)))
    assert torch.equal(pre, post / 16)


def test_pre_scaling_underflows_in_fp16() -> None:
    """Negative control of the above: tiny gradients divided by N before backward flush to zero in fp16."""
    model = mlp([8, 16, 4], 7)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e-3)  # logits ~ 0: gradients of the first layer ~ 1e-6, near fp16's subnormals
    x, y = data(64, 8, 4, 8)
    eng = GradientEngine(model, F.cross_entropy, "fp16")
    pre = torch.cat(list(eng.micro_gradients(x, y, 64, divide_by=1024)))
    post = torch.cat(list(eng.micro_gradients(x, y, 64)))
    assert int((pre == 0).sum()) > int((post == 0).sum())
    assert not torch.equal(pre.double(), post.double() / 1024)


def test_static_loss_scale_multiplies_the_gradient() -> None:
    model = mlp([8, 16, 4], 9)
    x, y = data(32, 8, 4, 10)
    eng = GradientEngine(model, F.cross_entropy, "fp32")
    assert torch.equal(
        torch.cat(list(eng.micro_gradients(x, y, 4, loss_scale=1024.0))),
        torch.cat(list(eng.micro_gradients(x, y, 4))) * 1024,
    )


def test_engine_leaves_the_model_alone_and_flattens_in_parameter_order() -> None:
    model = mlp([8, 16, 4], 11)
    before = flat_parameters(model)
    eng = GradientEngine(model, F.cross_entropy, "bf16")
    assert eng.num_params == before.numel()
    assert next(model.parameters()).dtype == torch.float32
    assert torch.equal(flat_parameters(model), before)
    x, y = data(8, 8, 4, 0)
    (g,) = eng.micro_gradients(x, y, 1)
    assert g.shape == (1, before.numel())
    assert g.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "call", "needle"),
    [
        ({"compute": "fp12"}, {"n_micro": 1}, "unknown compute format 'fp12'"),
        ({"method": "scan"}, {"n_micro": 1}, "unknown method 'scan'"),
        ({"chunk_size": 0}, {"n_micro": 1}, "chunk_size must be an integer >= 1, got 0"),
        ({}, {"n_micro": 0}, "N must be an integer >= 1, got 0"),
        ({}, {"n_micro": 3}, "a batch of 8 samples does not split into N=3"),
        ({}, {"n_micro": 2, "divide_by": 0}, "divide_by must be a real number in (0, inf), got 0"),
        ({}, {"n_micro": 2, "loss_scale": float("inf")}, "loss_scale must be a real number in (0, inf), got inf"),
    ],
    ids=["compute", "method", "chunk", "n0", "split", "divide0", "scale-inf"],
)
def test_bad_input_names_the_value(kwargs: dict, call: dict, needle: str) -> None:
    model = mlp([4, 2], 0)
    x, y = data(8, 4, 2, 0)
    compute = kwargs.pop("compute", "fp32")

    def build_and_draw() -> None:
        eng = GradientEngine(model, F.cross_entropy, compute, **kwargs)
        next(eng.micro_gradients(x, y, **call))

    with pytest.raises(ValueError, match=re.escape(needle)):
        build_and_draw()


def test_mismatched_targets_and_missing_cuda() -> None:
    model = mlp([4, 2], 0)
    x, y = data(8, 4, 2, 0)
    eng = GradientEngine(model, F.cross_entropy)
    with pytest.raises(ValueError, match="inputs hold 8 samples but targets 7"):
        next(eng.micro_gradients(x, y[:7], 2))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            GradientEngine(model, F.cross_entropy, device="cuda")
