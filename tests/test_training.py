"""GradientAccumulator: hooks that accumulate a real training loop's micro-gradients in any buffer.

The claims, each checked against an oracle that does not use the accumulator:

* ``naive`` in the parameter's own format *is* plain PyTorch accumulation (bit for bit, property test
  over random MLPs, micro-batch splits and fp32/bf16/fp16 models; also under optimizers, autocast,
  clipping and DDP);
* every strategy/format equals a standalone :class:`Accumulator` fed the same micro-gradients, and a
  wider buffer equals the plain-torch sum in that dtype;
* ``exact`` on an fp64 model equals the fp64 large-batch gradient to fp64 rounding (with negative
  controls that the tolerance would catch a missing 1/N, fp32 arithmetic or a dropped micro-batch);
* Kahan bf16 buffers beat plain bf16 accumulation at N = 256 (seeded, stated margins);
* GradScaler skips the step and backs off when a micro-step overflows the fp16 buffer;
* DDP (two real gloo processes): the all-reduced mean of every rank's accumulated sum, with one
  all-reduce per window;
* every bad input named in the docstring raises, naming the value.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import _ddp_worker
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import skip_init

from precision_lab import STRATEGIES, Accumulator, round_nearest
from precision_lab.training import GradientAccumulator

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}

# Tolerance of the fp64 identities (exact buffers on an fp64 model vs the fp64 large-batch gradient).
# Both sides compute the same mathematical quantity in fp64; they differ only by fp64 rounding inside
# forward and backward (sums of at most 32 samples and 16 features through 3 linear layers) and by the order
# of the sum over micro-batches.  Each entry's error is at most gamma_k * sum|terms| with k < 2^7;
# 2^-40 relative to the largest entry leaves 2^13 fp64 ulps (u = 2^-53), i.e. room for a cancellation
# factor sum|terms| / max|g| of 2^6.  The observed differences are ~2^-52 (N = 3, 8; 0 for N = 1).  The
# negative controls (missing 1/N, fp32 arithmetic at ~2^-22.4, a dropped micro-batch) miss it by 2^17 and more.
FP64_TOL = 2.0**-40


# --------------------------------------------------------------------------------------------------
# models and data: seeded generators only (no global RNG)
# --------------------------------------------------------------------------------------------------
def mlp(widths: list[int], dtype: torch.dtype, seed: int, act: str = "tanh", device: str = "cpu") -> nn.Sequential:
    """An MLP with weights ~ N(0, 0.5^2) drawn from a seeded generator, cast (RN) to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        lin = skip_init(nn.Linear, a, b, dtype=torch.float64)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g, dtype=torch.float64) * 0.5)
            lin.bias.copy_(torch.randn(b, generator=g, dtype=torch.float64) * 0.5)
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def batches(n: int, b: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, b, d) fp64 inputs and (n, b) labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, b, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n, b), generator=g)


def grads(model: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def flat(gs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1).double() for g in gs])


def run_window(
    model: nn.Module,
    xs: torch.Tensor,
    ys: torch.Tensor,
    *,
    scale_loss: bool = True,
    scaler: torch.amp.GradScaler | None = None,
    autocast: bool = False,
) -> None:
    """N micro-steps of ``(cross_entropy / N).backward()`` (the user's loop, with or without an accumulator)."""
    n = xs.shape[0]
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    for i in range(n):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            loss = F.cross_entropy(model(xs[i].to(device, dtype)), ys[i].to(device))
        loss = loss / n if scale_loss else loss
        (scaler.scale(loss) if scaler is not None else loss).backward()


def assert_bit_equal(got: list[torch.Tensor | None], want: list[torch.Tensor | None]) -> None:
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        assert (a is None) == (b is None), k
        if a is not None:
            assert a.dtype == b.dtype, (k, a.dtype, b.dtype)
            assert torch.equal(a, b), (k, (a.double() - b.double()).abs().max())


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------------
# (a) naive, the parameter's own format == plain PyTorch, bit for bit
# --------------------------------------------------------------------------------------------------
# a quarter of the profile's examples: each one runs two small training windows
@settings(max_examples=max(10, settings.default.max_examples // 4))
@given(
    dtype=st.sampled_from(["fp32", "bf16", "fp16"]),
    hidden=st.lists(st.integers(1, 12), max_size=2),
    d_in=st.integers(1, 8),
    classes=st.integers(1, 5),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=16),
    act=st.sampled_from(sorted(ACTIVATIONS)),
    seed=st.integers(0, 2**32 - 1),
)
def test_naive_in_param_format_is_plain_pytorch_bit_for_bit(
    dtype: str, hidden: list[int], d_in: int, classes: int, sizes: list[int], act: str, seed: int
) -> None:
    """Random MLPs, random splits of a batch into N micro-batches of varying size (sum loss / total)."""
    model = mlp([d_in, *hidden, classes], DTYPES[dtype], seed, act)
    plain = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed + 1)
    total = sum(sizes)
    x = torch.randn(total, d_in, generator=g, dtype=torch.float64).to(DTYPES[dtype])
    y = torch.randint(0, classes, (total,), generator=g)
    chunks = list(zip(x.split(sizes), y.split(sizes), strict=True))

    for xi, yi in chunks:  # plain PyTorch: autograd accumulates into p.grad
        (F.cross_entropy(plain(xi), yi, reduction="sum") / total).backward()
    acc = GradientAccumulator(model.parameters())
    for xi, yi in chunks:
        (F.cross_entropy(model(xi), yi, reduction="sum") / total).backward()
        assert all(p.grad is None for p in model.parameters())  # never a partial sum in p.grad
    assert acc.micro_steps == len(sizes)
    acc.write_grads()
    acc.remove()
    assert_bit_equal(grads(model), grads(plain))


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n", [2, 8, 32])
def test_post_scaling_equals_plain_div(dtype: str, n: int) -> None:
    """``write_grads(scale=1/N)`` after unscaled losses == ``p.grad.div_(N)`` (N a power of two: both exact)."""
    model = mlp([5, 7, 3], DTYPES[dtype], 3)
    plain = copy.deepcopy(model)
    xs, ys = batches(n, 2, 5, 3, 4)
    run_window(plain, xs, ys, scale_loss=False)
    for p in plain.parameters():
        p.grad.div_(n)
    with GradientAccumulator(model.parameters()) as acc:
        run_window(model, xs, ys, scale_loss=False)
        acc.write_grads(scale=1 / n)
    assert_bit_equal(grads(model), grads(plain))


@pytest.mark.parametrize("opt", ["sgd_momentum", "adam", "adamw", "rmsprop"])
def test_any_optimizer_with_clipping_follows_the_plain_trajectory(opt: str) -> None:
    """Three optimizer steps with gradient clipping after write_grads: identical parameters to plain PyTorch."""
    make = {
        "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
    }[opt]
    model = mlp([6, 8, 4], torch.float32, 5)
    plain = copy.deepcopy(model)
    opt_a, opt_b = make(plain.parameters()), make(model.parameters())
    acc = GradientAccumulator(model.named_parameters())
    for step in range(3):
        xs, ys = batches(4, 3, 6, 4, 100 + step)
        run_window(plain, xs, ys)
        norm_a = nn.utils.clip_grad_norm_(plain.parameters(), 0.05)
        opt_a.step()
        opt_a.zero_grad()
        run_window(model, xs, ys)
        acc.write_grads()
        norm_b = nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        assert float(norm_b) > 0.05  # the clip is active
        opt_b.step()
        opt_b.zero_grad()
        assert torch.equal(norm_a, norm_b)
    acc.remove()
    assert_bit_equal(list(model.parameters()), list(plain.parameters()))


def test_bf16_autocast_fp32_params_is_plain_pytorch() -> None:
    model = mlp([6, 8, 4], torch.float32, 6)
    plain = copy.deepcopy(model)
    xs, ys = batches(4, 3, 6, 4, 7)
    run_window(plain, xs, ys, autocast=True)
    with GradientAccumulator(model.parameters()) as acc:
        run_window(model, xs, ys, autocast=True)
        acc.write_grads()
    assert_bit_equal(grads(model), grads(plain))


def test_forgotten_zero_grad_enters_the_next_window_as_in_pytorch() -> None:
    """Documented: a p.grad left from the last step is added by autograd to the next micro-gradient."""
    model = mlp([4, 5, 2], torch.bfloat16, 8)
    plain = copy.deepcopy(model)
    xs, ys = batches(6, 2, 4, 2, 9)
    run_window(plain, xs[:3], ys[:3])
    run_window(plain, xs[3:], ys[3:])  # no zero_grad in between
    with GradientAccumulator(model.parameters()) as acc:
        run_window(model, xs[:3], ys[:3])
        acc.write_grads()
        run_window(model, xs[3:], ys[3:])  # no zero_grad in between
        acc.write_grads()
    assert_bit_equal(grads(model), grads(plain))


# --------------------------------------------------------------------------------------------------
# every strategy and buffer format: the hook feeds the Accumulator exactly what it should
# --------------------------------------------------------------------------------------------------
BUFFERS = [("fp32", None), ("bf16", "fp32"), ("fp32", "bf16"), ("fp16", "bf16"), ("bf16", "e5m7"), ("fp64", "fp16")]


@pytest.mark.parametrize(("pdtype", "fmt"), BUFFERS, ids=[f"{p}param-{f or 'own'}buf" for p, f in BUFFERS])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_equals_a_standalone_accumulator(strategy: str, pdtype: str, fmt: str | None) -> None:
    """p.grad == RN_{p.dtype}(Accumulator fed the micro-gradients of separate autograd.grad calls), bit for bit.

    One generator serves all buffers in hook order; the oracle's buffers share one generator too and
    are fed in the order the hooks fired (recorded by a hook registered before the accumulator's), so
    the stochastic strategy is compared bit for bit as well.
    """
    n = 6
    model = mlp([5, 6, 3], DTYPES[pdtype], 10)
    params = list(model.parameters())
    xs, ys = batches(n, 2, 5, 3, 11)
    order: list[int] = []
    recorders = [p.register_post_accumulate_grad_hook(lambda p, k=k: order.append(k)) for k, p in enumerate(params)]
    acc = GradientAccumulator(params, strategy, fmt, generator=torch.Generator().manual_seed(12))
    run_window(model, xs, ys)
    for h in recorders:
        h.remove()
    assert sorted(order) == sorted(list(range(len(params))) * n)

    oracle = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(12)
    refs = [Accumulator(strategy, fmt or pdtype, p.shape, generator=gen) for p in params]
    per_step = len(params)
    for i in range(n):
        loss = F.cross_entropy(oracle(xs[i].to(DTYPES[pdtype])), ys[i]) / n
        micro = torch.autograd.grad(loss, list(oracle.parameters()))
        for k in order[i * per_step : (i + 1) * per_step]:
            refs[k].add(micro[k])
    for a, ref in zip(acc.accumulators, refs, strict=True):
        assert a.count == n
        assert torch.equal(a.value(), ref.value())
    got = acc.write_grads()
    assert got["micro_steps"] == n
    assert got["element_adds"] == n * sum(p.numel() for p in params)
    for p, ref in zip(params, refs, strict=True):
        assert p.grad.dtype == p.dtype
        assert torch.equal(p.grad, round_nearest(ref.value(), pdtype).to(p.dtype))
    acc.remove()


@pytest.mark.parametrize("n", [1, 5, 16])
def test_stochastic_buffer_is_reproducible_from_its_generator(n: int) -> None:
    def window(seed: int) -> list[torch.Tensor]:
        model = mlp([5, 6, 3], torch.float32, 13)
        with GradientAccumulator(
            model.parameters(), "stochastic", "bf16", generator=torch.Generator().manual_seed(seed)
        ) as acc:
            run_window(model, *batches(n, 2, 5, 3, 14))
            acc.write_grads()
        return grads(model)

    assert_bit_equal(window(1), window(1))
    differs = any(not torch.equal(a, b) for a, b in zip(window(1), window(2), strict=True))
    # one add into an empty buffer is exact (the addend is already rounded to bf16): no randomness used
    assert differs == (n > 1)


def test_fp32_buffer_on_bf16_params_equals_the_plain_fp32_sum() -> None:
    """Independent oracle: the micro-gradients summed in fp32 with torch's ``+``, then cast (RN-even) to bf16."""
    n = 16
    model = mlp([6, 8, 4], torch.bfloat16, 15)
    xs, ys = batches(n, 3, 6, 4, 16)
    oracle = copy.deepcopy(model)
    sums = [torch.zeros(p.shape, dtype=torch.float32) for p in oracle.parameters()]
    for i in range(n):
        loss = F.cross_entropy(oracle(xs[i].to(torch.bfloat16)), ys[i]) / n
        for s, g in zip(sums, torch.autograd.grad(loss, list(oracle.parameters())), strict=True):
            s += g.float()  # exact widening, one fp32 rounding per add
    with GradientAccumulator(model.parameters(), "naive", "fp32") as acc:
        run_window(model, xs, ys)
        acc.write_grads()
    assert_bit_equal(grads(model), [s.to(torch.bfloat16) for s in sums])
    # and the wide buffer is not what bf16 accumulation gives (else the test shows nothing)
    plain = copy.deepcopy(model)
    plain.zero_grad(set_to_none=True)
    run_window(plain, xs, ys)
    assert any(not torch.equal(a, b) for a, b in zip(grads(model), grads(plain), strict=True))


# --------------------------------------------------------------------------------------------------
# (b) exact buffers on an fp64 model == the fp64 large-batch gradient
# --------------------------------------------------------------------------------------------------
def large_batch_fp64(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Gradient of the mean loss over all N*B samples, one fp64 pass (the truth)."""
    m = copy.deepcopy(model).double()
    m.zero_grad(set_to_none=True)
    F.cross_entropy(m(xs.reshape(-1, xs.shape[-1]).double()), ys.reshape(-1)).backward()
    return flat([p.grad for p in m.parameters()])


@pytest.mark.parametrize("n", [1, 3, 8])
def test_exact_on_fp64_model_is_the_large_batch_gradient(n: int) -> None:
    model = mlp([6, 16, 16, 3], torch.float64, 17)
    xs, ys = batches(n, 32 // n, 6, 3, 18)
    truth = large_batch_fp64(model, xs, ys)
    tol = FP64_TOL * float(truth.abs().max())

    def accumulated(m: nn.Module, xs: torch.Tensor, ys: torch.Tensor, **kw: bool) -> torch.Tensor:
        with GradientAccumulator(m.parameters(), "exact") as acc:
            run_window(m, xs, ys, **kw)
            acc.write_grads()
        return flat(grads(m))

    err = float((accumulated(copy.deepcopy(model), xs, ys) - truth).abs().max())
    assert err <= tol
    # negative controls: each of these errors exceeds the tolerance by more than 2^10
    controls = {"fp32 arithmetic": accumulated(copy.deepcopy(model).float(), xs, ys)}
    if n > 1:
        controls["missing 1/N"] = accumulated(copy.deepcopy(model), xs, ys, scale_loss=False)
        controls["dropped micro-batch"] = accumulated(copy.deepcopy(model), xs[:-1], ys[:-1]) * (n - 1) / n
    for what, g in controls.items():
        assert float((g - truth).abs().max()) > 2.0**10 * tol, what


# --------------------------------------------------------------------------------------------------
# (c) Kahan bf16 buffers beat plain bf16 accumulation for large N
# --------------------------------------------------------------------------------------------------
def test_kahan_bf16_beats_plain_bf16_accumulation_at_n256() -> None:
    """bf16 model, N = 256 micro-batches of 4 (seed fixed, margins below).

    Measured at this seed (relative L2).  Against the exact sum of the same bf16 micro-gradients
    (accumulation error only): plain bf16 accumulation is off by 2^-5.8 (it stagnates: 10.5 % of the
    element-adds are lost), Kahan by 2^-9.4, mostly the final rounding to bf16 (u = 2^-8): ratio 12.
    Against the fp64 large-batch gradient (input quantisation included: the exact sum of the bf16
    micro-gradients is itself 2^-8.2 off) plain is 2^-5.7 off, Kahan 2^-8.2: ratio 5.3.  Asserted:
    Kahan within u of the exact sum, at least 4x closer than plain on both measures, and 20x fewer
    lost updates (measured 37262 vs 125).
    """
    n = 256
    model = mlp([32, 32, 10], torch.bfloat16, 19)
    xs, ys = batches(n, 4, 32, 10, 20)
    truth = large_batch_fp64(model, xs, ys)

    def window(strategy: str, fmt: str | None) -> tuple[torch.Tensor, dict[str, int]]:
        m = copy.deepcopy(model)
        with GradientAccumulator(m.parameters(), strategy, fmt, count_lost=True) as acc:
            run_window(m, xs, ys)
            stats = acc.write_grads()
        return flat(grads(m)), stats

    plain, plain_stats = window("naive", None)
    kahan, kahan_stats = window("kahan", "bf16")
    exact_sum, _ = window("exact", None)  # the same micro-gradients, summed exactly, rounded to bf16 once
    m = copy.deepcopy(model)
    run_window(m, xs, ys)
    assert torch.equal(flat(grads(m)), plain)  # plain bf16 accumulation is what PyTorch does
    assert rel_l2(kahan, exact_sum) <= 2.0**-8
    assert rel_l2(plain, exact_sum) >= 4 * rel_l2(kahan, exact_sum)
    assert rel_l2(plain, truth) >= 4 * rel_l2(kahan, truth)
    assert plain_stats["lost_updates"] > 20 * kahan_stats["lost_updates"] > 0


# --------------------------------------------------------------------------------------------------
# GradScaler: scaled micro-gradients in an fp16 buffer, one inf/NaN check per window
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_grad_scaler_fp16_kahan_buffer(autocast: bool) -> None:
    """fp32 params, fp16 Kahan buffer of S * g_i: after unscale_, within the buffer's error bound of sum g_i.

    Bound per element: each scaled micro-gradient is rounded into fp16 (<= u |S g_i|, u = 2^-11, S g_i
    normal in fp16 here), Kahan adds at most 2u + O(N u^2) of sum |S g_i|, the read-out and unscaling
    are exact or fp32 roundings: |p.grad - sum g_i| <= 4u * sum |g_i| + N * 2^-24 / S (subnormals).
    """
    n, scale = 8, 2.0**12
    model = mlp([6, 8, 4], torch.float32, 21)
    xs, ys = batches(n, 3, 6, 4, 22)
    micro = []
    oracle = copy.deepcopy(model)
    for i in range(n):
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = F.cross_entropy(oracle(xs[i].float()), ys[i])  # as run_window: the loss inside autocast too
        micro.append(torch.autograd.grad(loss / n, list(oracle.parameters())))
    want = [sum(m[k].double() for m in micro) for k in range(len(micro[0]))]
    mass = [sum(m[k].double().abs() for m in micro) for k in range(len(micro[0]))]

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    before = [p.detach().clone() for p in model.parameters()]
    with GradientAccumulator(model.parameters(), "kahan", "fp16", count_nonfinite=True) as acc:
        run_window(model, xs, ys, scaler=scaler, autocast=autocast)
        stats = acc.write_grads()
        assert stats["nonfinite_inputs"] == 0
        scaler.unscale_(opt)
        for p, w, m in zip(model.parameters(), want, mass, strict=True):
            assert ((p.grad.double() - w).abs() <= 4 * 2.0**-11 * m + n * 2.0**-24 / scale).all()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() == scale
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))  # the step was taken


@pytest.mark.parametrize("fmt", ["fp16", "fp32"])
def test_grad_scaler_skips_the_step_when_a_micro_step_overflows_the_buffer(fmt: str) -> None:
    """One micro-step's scaled gradient exceeds fp16's 65504 (finite in fp32): the fp16 window is skipped.

    Negative control: the same window in an fp32 buffer stays finite and the step is taken.
    """
    n, scale = 4, 2.0**16
    model = mlp([6, 8, 4], torch.float32, 23)
    xs, ys = batches(n, 3, 6, 4, 24)
    weight = [1.0, 1.0, 2.0**10, 1.0]  # micro-step 3's loss (a spike): scaled gradients ~2^16 * 2^10 * 0.01
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    before = [p.detach().clone() for p in model.parameters()]
    counts = []  # non-finite inputs so far, after each micro-step
    with GradientAccumulator(model.parameters(), "kahan", fmt, count_nonfinite=True) as acc:
        for i in range(n):
            loss = F.cross_entropy(model(xs[i].float()), ys[i]) * weight[i] / n
            scaler.scale(loss).backward()
            counts.append(acc.nonfinite_inputs)
        overflowed = acc.nonfinite_inputs
        stats = acc.write_grads()
        scaler.step(opt)
        scaler.update()
    unchanged = all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    if fmt == "fp16":
        assert counts[1] == 0  # the ordinary micro-steps fit in fp16
        assert overflowed == counts[2] > 0  # the spike overflowed on its way into the buffer
        assert stats["nonfinite_inputs"] == overflowed
        assert unchanged
        assert scaler.get_scale() == scale / 2  # backoff_factor 0.5
    else:
        assert overflowed == 0
        assert not unchanged
        assert scaler.get_scale() == scale


# --------------------------------------------------------------------------------------------------
# properties and lifetime
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("strategy", "fmt", "pdtype", "nbytes"),
    [
        ("naive", None, "bf16", 2.0),
        ("kahan", "bf16", "fp32", 4.0),
        ("naive", "fp32", "bf16", 4.0),
        ("exact", None, "fp32", 0.0),  # a superaccumulator holds no digit before the first add
        ("stochastic", "bf16", "fp32", 2.0),
    ],
)
def test_bytes_per_element(strategy: str, fmt: str | None, pdtype: str, nbytes: float) -> None:
    model = mlp([3, 4, 2], DTYPES[pdtype], 25)
    acc = GradientAccumulator(model.parameters(), strategy, fmt, generator=torch.Generator().manual_seed(0))
    assert acc.bytes_per_element == nbytes
    assert acc.numel == sum(p.numel() for p in model.parameters())
    acc.remove()


def test_window_counters_and_reset() -> None:
    model = mlp([4, 5, 2], torch.bfloat16, 26)
    xs, ys = batches(64, 2, 4, 2, 27)
    acc = GradientAccumulator(model.parameters(), "naive", "bf16", count_lost=True, count_nonfinite=True)
    assert (acc.micro_steps, acc.lost_updates, acc.nonfinite_inputs, acc.nonfinite) == (0, 0, 0, 0)
    run_window(model, xs, ys)
    assert acc.micro_steps == 64
    assert acc.lost_updates == sum(a.lost_updates for a in acc.accumulators) > 0  # bf16 stagnates by N = 64
    stats = acc.write_grads()
    assert stats == {
        "micro_steps": 64,
        "element_adds": 64 * acc.numel,
        "lost_updates": stats["lost_updates"],
        "nonfinite_inputs": 0,
    }
    assert stats["lost_updates"] > 0
    assert (acc.micro_steps, acc.lost_updates, acc.element_adds) == (0, 0, 0)  # reset
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    model.zero_grad()
    run_window(model, xs[:1], ys[:1])
    assert acc.nonfinite_inputs > 0
    assert acc.nonfinite > 0
    acc.write_grads()
    assert torch.isnan(model[0].weight.grad).any()
    acc.remove()


def test_remove_restores_plain_pytorch_and_refuses_to_drop_gradients() -> None:
    model = mlp([4, 5, 2], torch.float32, 28)
    plain = copy.deepcopy(model)
    xs, ys = batches(3, 2, 4, 2, 29)
    acc = GradientAccumulator(model.parameters(), "kahan", "bf16")
    run_window(model, xs, ys)
    with pytest.raises(RuntimeError, match="3 micro-steps not yet written"):
        acc.remove()
    assert not acc.removed  # nothing detached when it raises
    acc.write_grads()
    model.zero_grad()
    acc.remove()
    assert acc.removed
    acc.remove()  # idempotent
    run_window(model, xs, ys)  # hooks gone: autograd accumulates into p.grad again
    run_window(plain, xs, ys)
    assert_bit_equal(grads(model), grads(plain))
    with pytest.raises(RuntimeError, match="after remove"):
        acc.write_grads()
    # a new accumulator may hook the parameters once the old one is gone
    model.zero_grad()
    GradientAccumulator(model.parameters()).remove()


def test_context_manager_discards_an_unwritten_window_only_on_an_exception() -> None:
    model = mlp([4, 5, 2], torch.float32, 30)
    xs, ys = batches(2, 2, 4, 2, 31)
    acc = GradientAccumulator(model.parameters())

    def failing_loop() -> None:
        with acc:
            run_window(model, xs, ys)
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        failing_loop()
    assert acc.removed
    with pytest.raises(RuntimeError, match="not yet written"), GradientAccumulator(model.parameters()) as acc2:
        run_window(model, xs, ys)
    acc2.remove(discard=True)
    assert all(p.grad is None for p in model.parameters())


def test_parameter_without_gradient_keeps_grad_none() -> None:
    """Like PyTorch: a parameter no backward reached in the window keeps p.grad None."""
    model = mlp([4, 5, 2], torch.float32, 32)
    unused = nn.Parameter(torch.ones(3))
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    acc = GradientAccumulator([*model.parameters(), unused, frozen])
    assert len(acc.parameters) == 5  # frozen: skipped
    run_window(model, *batches(2, 2, 4, 2, 33))
    acc.write_grads()
    assert unused.grad is None
    assert frozen.grad is None
    assert all(p.grad is not None for p in model.parameters())
    acc.remove()


def test_partial_window_parameter() -> None:
    """A parameter reached by some micro-steps only accumulates those (as p.grad would)."""
    a, b = nn.Parameter(torch.tensor([1.0, 2.0])), nn.Parameter(torch.tensor([3.0]))
    acc = GradientAccumulator([a, b], "exact")
    (a.sum() * 2).backward()
    (a.sum() + b.sum() * 5).backward()
    assert acc.micro_steps == 2
    acc.write_grads()
    assert a.grad.tolist() == [3.0, 3.0]
    assert b.grad.tolist() == [5.0]
    acc.remove()


# --------------------------------------------------------------------------------------------------
# bad input: an error that names the value, never a silent wrong gradient
# --------------------------------------------------------------------------------------------------
def test_unknown_strategy_and_format() -> None:
    model = mlp([3, 2], torch.float32, 34)
    with pytest.raises(ValueError, match="unknown strategy 'kahn'; known: naive, kahan"):
        GradientAccumulator(model.parameters(), "kahn")
    with pytest.raises(ValueError, match="unknown format 'bf17'"):
        GradientAccumulator(model.parameters(), "naive", "bf17")


def test_stochastic_needs_a_generator() -> None:
    model = mlp([3, 2], torch.float32, 35)
    with pytest.raises(ValueError, match="strategy 'stochastic' needs generator=.*got generator=None"):
        GradientAccumulator(model.parameters(), "stochastic", "bf16")
    with pytest.raises(ValueError, match="generator must be a torch.Generator or None, got int"):
        GradientAccumulator(model.parameters(), "stochastic", "bf16", generator=7)


def test_write_grads_without_backward_raises() -> None:
    model = mlp([3, 2], torch.float32, 36)
    acc = GradientAccumulator(model.parameters())
    with pytest.raises(RuntimeError, match="no backward since the last write_grads"):
        acc.write_grads()
    run_window(model, *batches(1, 2, 3, 2, 37))
    acc.write_grads()
    with pytest.raises(RuntimeError, match="no backward since the last write_grads"):
        acc.write_grads()
    acc.remove()


def test_bad_scale_raises_and_changes_nothing() -> None:
    model = mlp([3, 2], torch.float32, 38)
    acc = GradientAccumulator(model.parameters())
    run_window(model, *batches(2, 2, 3, 2, 39))
    for bad in (float("inf"), float("nan"), "0.5", True):
        with pytest.raises(
            ValueError, match=re.escape("scale (a finite number, or None) must be a real number in (-inf, inf), got")
        ):
            acc.write_grads(scale=bad)
    assert acc.micro_steps == 2
    assert all(p.grad is None for p in model.parameters())
    acc.write_grads(scale=0.5)
    acc.remove()


def test_existing_grad_at_creation_raises() -> None:
    """Documented choice: refuse (a gradient of unknown window would be counted twice or dropped)."""
    model = mlp([3, 2], torch.float32, 40)
    run_window(model, *batches(1, 2, 3, 2, 41))
    with pytest.raises(
        ValueError, match=r"parameter '0.weight' \(shape \(2, 3\), torch.float32, cpu\) already has a .grad"
    ):
        GradientAccumulator(model.named_parameters())
    model.zero_grad()
    GradientAccumulator(model.named_parameters()).remove()


def test_parameters_on_unsupported_or_mixed_devices() -> None:
    """Several devices are supported (each buffer on its parameter's device: see the gpu test); 'meta' is not."""
    cpu = nn.Parameter(torch.ones(2))
    meta = nn.Parameter(torch.ones(2, device="meta"))
    with pytest.raises(ValueError, match=r"'param\[1\]' .* is on device 'meta'; supported: 'cpu', 'cuda'"):
        GradientAccumulator([cpu, meta])
    GradientAccumulator([cpu]).remove()  # nothing stayed hooked by the failed construction


def test_bad_parameter_lists() -> None:
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="is listed twice"):
        GradientAccumulator([p, p])
    with pytest.raises(ValueError, match="is not a leaf tensor"):
        GradientAccumulator([p * 2])
    with pytest.raises(ValueError, match="has dtype torch.complex64"):
        GradientAccumulator([nn.Parameter(torch.ones(2, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        GradientAccumulator([torch.ones(2)])
    with pytest.raises(ValueError, match="'w' is a list, expected a torch.Tensor"):
        GradientAccumulator([("w", [1.0])])


def test_two_accumulators_on_one_parameter_are_refused() -> None:
    model = mlp([3, 2], torch.float32, 42)
    acc = GradientAccumulator(model.parameters(), "kahan", "bf16")
    with pytest.raises(ValueError, match="is already hooked by GradientAccumulator\\('kahan', 'bf16'"):
        GradientAccumulator(model.parameters())
    acc.remove()
    GradientAccumulator(model.parameters()).remove()


def test_parameter_cast_after_creation_raises_in_backward() -> None:
    model = mlp([3, 2], torch.float32, 43)
    acc = GradientAccumulator(model.parameters())
    model.double()  # the parameters keep their identity, their dtype changes
    with pytest.raises(RuntimeError, match="is now torch.float64 on cpu, but its buffer was made for torch.float32"):
        run_window(model, *batches(1, 2, 3, 2, 44))
    acc.remove(discard=True)


def test_sparse_gradients_raise() -> None:
    emb = nn.Embedding(5, 3, sparse=True)
    acc = GradientAccumulator(emb.parameters())
    with pytest.raises(RuntimeError, match="received a torch.sparse_coo gradient"):
        emb(torch.tensor([1, 2])).sum().backward()
    acc.remove(discard=True)


def test_ddp_argument_is_checked() -> None:
    class FakeDDP(nn.Module):
        require_backward_grad_sync = True

        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    model = mlp([3, 2], torch.float32, 45)
    with pytest.raises(ValueError, match="ddp must be the DistributedDataParallel module .* got Sequential"):
        GradientAccumulator(model.parameters(), ddp=model)
    other = mlp([3, 2], torch.float32, 46)
    with pytest.raises(ValueError, match="is not a parameter of the ddp module FakeDDP"):
        GradientAccumulator(model.parameters(), ddp=FakeDDP(other))


# --------------------------------------------------------------------------------------------------
# DDP: two real gloo processes
# --------------------------------------------------------------------------------------------------
def test_ddp_no_sync_gives_the_all_reduced_accumulated_gradient(tmp_path: Path) -> None:
    """World size 2, fp64 model, exact buffers, N = 4 micro-batches of B = 3 per rank (~3 s).

    Each rank accumulates sum_i grad(loss_i / N) over its own N micro-batches; DDP averages over the
    2 ranks, so both ranks must end with the gradient of the mean loss over all 2*N*B samples (fp64
    truth, FP64_TOL).  Negative control: a rank's own accumulated gradient (no all-reduce) misses it.
    All-reduces are counted by a comm hook: none in micro-steps 1..N-1, one bucket on the last.
    Also: naive/own-format on an fp32 model == plain DDP accumulation bit for bit, and the two
    misuses (no ddp= argument; every micro-step inside no_sync) raise in write_grads.
    """
    n, b, world = 4, 3, 2
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, str(ROOT / "tests" / "_ddp_worker.py")]
    args = [str(world), str(tmp_path / "rendezvous"), str(tmp_path), str(n), str(b)]
    procs = [
        subprocess.Popen(
            [*cmd, str(r), *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for r in range(world)
    ]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    out = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    xs, ys = _ddp_worker.make_data(1, world * n, b)
    model = _ddp_worker.make_model(0, torch.float64)
    truth = large_batch_fp64(model, xs, ys)
    tol = FP64_TOL * float(truth.abs().max())
    single = copy.deepcopy(model)  # one process accumulating all 2*N micro-batches (loss / 2N)
    with GradientAccumulator(single.parameters(), "exact") as acc:
        run_window(single, xs, ys)
        acc.write_grads()
    assert float((flat(grads(single)) - truth).abs().max()) <= tol
    for r in range(world):
        assert float((flat(out[r]["exact_bv0"]) - flat(grads(single))).abs().max()) <= tol
        local = large_batch_fp64(model, xs[r * n : (r + 1) * n], ys[r * n : (r + 1) * n])
        assert float((local - truth).abs().max()) > 2.0**20 * tol  # the all-reduce matters
        for bv in (0, 1):  # gradient_as_bucket_view off and on
            got = flat(out[r][f"exact_bv{bv}"])
            assert float((got - truth).abs().max()) <= tol, (r, bv)
            assert out[r][f"calls_bv{bv}"] == [0] * (n - 1) + [1]  # one bucket, all-reduced once, at the end
            assert out[r][f"stats_bv{bv}"]["micro_steps"] == n
        assert_bit_equal(out[r]["naive_fp32"], out[r]["plain_fp32"])
        assert_bit_equal(out[r]["exact_half"], [g / 2 for g in out[r]["exact_bv0"]])
        assert "p.grad was set after the GradientAccumulator took the gradient" in out[r]["without_ddp_arg"]
        assert "4 micro-gradients that DDP never all-reduced" in out[r]["never_synced"]
        assert "received a second synchronising (outside no_sync) backward" in out[r]["every_step_sync"]
    assert_bit_equal(out[0]["exact_bv0"], out[1]["exact_bv0"])  # both ranks hold the same gradient


# --------------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_cuda_naive_is_plain_pytorch(dtype: str) -> None:
    model = mlp([16, 32, 8], DTYPES[dtype], 47, device="cuda")
    plain = copy.deepcopy(model)
    xs, ys = batches(8, 4, 16, 8, 48)
    run_window(plain, xs, ys)
    with GradientAccumulator(model.parameters()) as acc:
        run_window(model, xs, ys)
        acc.write_grads()
    assert_bit_equal(grads(model), grads(plain))
    assert all(p.grad.device.type == "cuda" for p in model.parameters())


@pytest.mark.gpu
def test_cuda_kahan_bf16_equals_a_standalone_accumulator() -> None:
    n = 8
    model = mlp([16, 32, 8], torch.float32, 49, device="cuda")
    xs, ys = batches(n, 4, 16, 8, 50)
    oracle = copy.deepcopy(model)
    refs = [Accumulator("kahan", "bf16", p.shape, device="cuda") for p in oracle.parameters()]
    for i in range(n):
        loss = F.cross_entropy(oracle(xs[i].float().cuda()), ys[i].cuda()) / n
        for ref, g in zip(refs, torch.autograd.grad(loss, list(oracle.parameters())), strict=True):
            ref.add(g)
    with GradientAccumulator(model.parameters(), "kahan", "bf16") as acc:
        run_window(model, xs, ys)
        for a, ref in zip(acc.accumulators, refs, strict=True):
            assert a.device.type == "cuda"
            assert torch.equal(a.value(), ref.value())
        acc.write_grads()


@pytest.mark.gpu
def test_parameters_on_cpu_and_cuda_each_keep_their_buffer() -> None:
    """A model split over cpu and cuda: exact fp64 buffers on each parameter's device, = fp64 truth."""
    first = mlp([6, 16], torch.float64, 51)
    second = mlp([16, 3], torch.float64, 52, device="cuda")
    n = 4
    xs, ys = batches(n, 8, 6, 3, 53)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return second(torch.tanh(first(x)).cuda())

    truth_loss = F.cross_entropy(forward(xs.reshape(-1, 6)), ys.reshape(-1).cuda())
    params = [*first.parameters(), *second.parameters()]
    truth = flat([g.cpu() for g in torch.autograd.grad(truth_loss, params)])
    with GradientAccumulator(params, "exact") as acc:
        assert [a.device.type for a in acc.accumulators] == ["cpu", "cpu", "cuda", "cuda"]
        for i in range(n):
            (F.cross_entropy(forward(xs[i]), ys[i].cuda()) / n).backward()
        acc.write_grads()
    got = flat([p.grad.cpu() for p in params])
    assert float((got - truth).abs().max()) <= FP64_TOL * float(truth.abs().max())
