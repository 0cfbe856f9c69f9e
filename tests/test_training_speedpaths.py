"""GradientAccumulator's speed paths give the bits of the per-parameter design, and its counts when asked.

The oracle is tests/_speedpaths_reference.py: the accumulator as it was before the flat buffers (one
:class:`Accumulator` per parameter, fed in hook order, read out through fp64 and ``round_nearest``).

* every strategy with a speed path (``naive``, ``kahan``, ``stochastic``), buffer format and model
  dtype, and a sample of the per-parameter fallback: ``p.grad`` after two windows (the second
  post-scaled) equals the reference bit for bit, with the compiled kernels on and off; the model has
  a parameter of ``_native.MIN_NUMEL`` elements (kernels) and small ones (staged);
* ``naive`` with ``fmt=None`` is plain PyTorch bit for bit, down to the sign of a zero sum;
* counts when asked equal the reference's, per parameter and in total, also with non-finite
  micro-gradients; by default nothing is counted (``None``);
* staging: parameters reached by some micro-steps only, a nested (reentrant checkpoint) backward,
  a backward that raised half-way, a model on several dtypes;
* the kernels of :mod:`precision_lab._native_training` against their torch fallbacks and
  :mod:`precision_lab._native`'s kernels, on special values; bad input raises;
* ``Accumulator.add``'s fused path gives the bits and counts of the strategy step plus a separate count;
* DDP (two gloo processes) and CUDA (gpu marker): the same bits as the reference.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _speedpaths_reference import ReferenceAccumulator
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from precision_lab import Accumulator, _native, _native_training
from precision_lab.formats import get_format
from precision_lab.strategies import absorbed
from precision_lab.strategies.kahan import kahan_step
from precision_lab.training import GradientAccumulator, _FlatBuffers, _OwnFormatNaive, _PerParameter

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BIG = _native.MIN_NUMEL  # the 128 x 128 weight: at the compiled kernels' size floor, not staged


def native(on: bool) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext() if on else _native.disabled()


def make_model(dtype: torch.dtype, seed: int, device: str = "cpu") -> nn.Module:
    """Small parameters (staged) around one 128 x 128 weight (16384 elements: kernels, never staged)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 128), nn.Tanh(), nn.Linear(128, 128), nn.LayerNorm(128), nn.Linear(128, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 and p.numel() == 128 else 0.0))
    assert model[2].weight.numel() == BIG
    return model.to(device=device, dtype=dtype)


def data(n: int, seed: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 8, generator=g).to(dtype), torch.randint(0, 5, (4,), generator=g)) for _ in range(n)]


def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int, weight: float = 1.0) -> None:
    device = next(model.parameters()).device
    (F.cross_entropy(model(x.to(device)).float(), y.to(device)) * weight / n).backward()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(got: nn.Module, want: nn.Module, what: str = "") -> None:
    """Every p.grad identical bit for bit, NaN payloads aside (a NaN where the other has one)."""
    for k, (p, q) in enumerate(zip(got.parameters(), want.parameters(), strict=True)):
        assert (p.grad is None) == (q.grad is None), (what, k)
        if p.grad is None:
            continue
        assert p.grad.dtype == q.grad.dtype, (what, k)
        assert p.grad.shape == q.grad.shape, (what, k)
        assert p.grad.stride() == p.stride(), (what, k)  # the gradient layout contract
        nan_p, nan_q = torch.isnan(p.grad), torch.isnan(q.grad)
        assert torch.equal(nan_p, nan_q), (what, k)
        a = bits(torch.where(nan_p, torch.zeros_like(p.grad), p.grad))
        b = bits(torch.where(nan_q, torch.zeros_like(q.grad), q.grad))
        assert torch.equal(a, b), (what, k, int((a != b).sum()))


def run_both(
    strategy: str,
    fmt: str | None,
    pdtype: str,
    *,
    windows: int = 2,
    n: int = 4,
    seed: int = 0,
    count: bool = False,
    weights: list[float] | None = None,
) -> tuple[GradientAccumulator, ReferenceAccumulator, nn.Module, nn.Module]:
    """The same windows through a GradientAccumulator and the reference, on two copies of one model."""
    dtype = DTYPES[pdtype]
    model = make_model(dtype, seed)
    ref_model = copy.deepcopy(model)
    acc = GradientAccumulator(
        model.parameters(),
        strategy,
        fmt,
        generator=torch.Generator().manual_seed(seed + 1),
        count_lost=count,
        count_nonfinite=count,
    )
    ref = ReferenceAccumulator(
        ref_model.parameters(), strategy, fmt, generator=torch.Generator().manual_seed(seed + 1), count_lost=count
    )
    batches = data(n * windows, seed + 2, dtype)
    for w in range(windows):
        if w:
            model.zero_grad(set_to_none=True)
            ref_model.zero_grad(set_to_none=True)
        for i in range(n):
            x, y = batches[w * n + i]
            weight = 1.0 if weights is None else weights[i]
            step(model, x, y, n, weight)
            step(ref_model, x, y, n, weight)
        if count:
            check_counts(acc, ref)
            ref.last_counts = (sum(r.lost_updates for r in ref.accs), sum(r.nonfinite_inputs for r in ref.accs))
        scale = None if w % 2 == 0 else 0.25
        acc.write_grads(scale)
        ref.write_grads(scale)
        assert_same_bits(model, ref_model, f"{strategy} {fmt} {pdtype} window {w}")
    acc.remove()
    ref.remove()
    return acc, ref, model, ref_model


def check_counts(acc: GradientAccumulator, ref: ReferenceAccumulator) -> None:
    mine = acc.accumulators
    for k, (a, r) in enumerate(zip(mine, ref.accs, strict=True)):
        assert (a.count, a.lost_updates, a.nonfinite_inputs) == (r.count, r.lost_updates, r.nonfinite_inputs), k
        assert torch.equal(a.value().isnan(), r.value().isnan()), k
    stats = acc.stats()
    assert stats["lost_updates"] == sum(r.lost_updates for r in ref.accs)
    assert stats["nonfinite_inputs"] == sum(r.nonfinite_inputs for r in ref.accs)


# --------------------------------------------------------------------------------------------------
# which buffers run
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("strategy", "fmt", "kind"),
    [
        ("naive", None, _OwnFormatNaive),
        ("naive", "fp32", _FlatBuffers),  # the fp32 model's own format given explicitly: the zero-filled buffer
        ("naive", "bf16", _FlatBuffers),
        ("naive", "fp64", _FlatBuffers),
        ("kahan", "bf16", _FlatBuffers),
        ("kahan", None, _FlatBuffers),
        ("stochastic", "fp16", _FlatBuffers),
        ("naive", "fp8_e4m3", _PerParameter),
        ("kahan", "e5m7", _PerParameter),
        ("pairwise", "bf16", _PerParameter),
        ("exact", None, _PerParameter),
    ],
)
def test_the_buffer_kind_follows_strategy_and_format(strategy: str, fmt: str | None, kind: type) -> None:
    model = make_model(torch.float32, 0)
    with GradientAccumulator(model.parameters(), strategy, fmt, generator=torch.Generator()) as acc:
        assert type(acc._buffers) is kind


def test_flat_buffers_lay_out_small_parameters_first_and_share_storage() -> None:
    model = make_model(torch.bfloat16, 0)
    with GradientAccumulator(model.parameters(), "kahan", "bf16") as acc:
        (group,) = acc._buffers.groups
        sizes = [s.param.numel() for s in group.slots]
        assert sizes[-1] == BIG  # small (staged) first
        assert all(n < BIG for n in sizes[:-1])
        assert group.small_numel == sum(sizes[:-1])
        for slot in group.slots:
            assert slot.s.untyped_storage().data_ptr() == group.sum.untyped_storage().data_ptr()
            assert slot.unit.sum is slot.s
            assert slot.unit.compensation is slot.c


# --------------------------------------------------------------------------------------------------
# the same bits as the per-parameter design
# --------------------------------------------------------------------------------------------------
FAST = [(s, f) for s in ("naive", "kahan", "stochastic") for f in (None, "fp32", "bf16", "fp16")]
# (strategy, buffer format, parameter dtype) where a compiled kernel runs, so the torch path is checked as well
KERNELS = {(s, "bf16", p) for s in ("naive", "kahan", "stochastic") for p in ("fp32", "bf16")}
KERNELS |= {("naive", "fp32", "bf16"), ("kahan", None, "bf16"), ("stochastic", None, "bf16")}
GRID = [
    pytest.param(s, f, p, k, id=f"{s}-{f or 'own'}-{p}param-{'kernels' if k else 'torch'}", marks=marks)
    for s, f in FAST
    if (s, f) != ("naive", None)  # naive in the parameter's format is compared with plain PyTorch (below)
    for p, marks in (("fp32", ()), ("bf16", ()), ("fp16", pytest.mark.slow))  # fp16 models: the slow run
    for k in ((True, False) if (s, f, p) in KERNELS else (True,))
]


@pytest.mark.parametrize(("strategy", "fmt", "pdtype", "kernels"), GRID)
def test_speed_paths_equal_the_per_parameter_design(strategy: str, fmt: str | None, pdtype: str, kernels: bool) -> None:
    """Two windows, the second with write_grads(scale=0.25): every p.grad bit for bit."""
    with native(kernels):
        run_both(strategy, fmt, pdtype)


@pytest.mark.parametrize(
    ("got", "want"),
    [
        (("kahan", "bf16", 1), ("naive", "bf16", 1)),  # another strategy
        (("naive", "bf16", 1), ("naive", "fp32", 1)),  # another format
        (("stochastic", "bf16", 1), ("stochastic", "bf16", 2)),  # another seed
    ],
)
def test_negative_control_the_comparison_tells_buffers_apart(got: tuple, want: tuple) -> None:
    """The bit comparison of these tests fails on a wrong strategy, format or random stream (so a pass says something)."""
    model = make_model(torch.bfloat16, 40)
    ref_model = copy.deepcopy(model)
    acc = GradientAccumulator(model.parameters(), got[0], got[1], generator=torch.Generator().manual_seed(got[2]))
    ref = ReferenceAccumulator(
        ref_model.parameters(), want[0], want[1], generator=torch.Generator().manual_seed(want[2])
    )
    for x, y in data(8, 41, torch.bfloat16):
        step(model, x, y, 8)
        step(ref_model, x, y, 8)
    acc.write_grads()
    ref.write_grads()
    with pytest.raises(AssertionError):
        assert_same_bits(model, ref_model)
    acc.remove()


@pytest.mark.parametrize(
    ("strategy", "fmt", "pdtype"),
    [
        ("naive", "fp16", "fp16"),  # the fp16 model's own format, explicitly (a zero-filled buffer)
        ("kahan", None, "fp16"),
        ("naive", "fp64", "fp32"),  # exact widening into an fp64 buffer
        ("naive", "bf16", "fp64"),  # fp64 addends rounded through round_nearest (torch's cast rounds twice)
        ("naive", "fp64", "bf16"),  # fp64 buffer read out into bf16 through round_nearest
        ("kahan", None, "fp64"),
        ("kahan", "fp16", "bf16"),  # fp16 Kahan read out into bf16: the fp64 route (fp16 does not fit in bf16)
        ("kahan", "bf16", "fp16"),  # bf16 Kahan read out into fp16: the fp64 route
        ("stochastic", "fp64", "fp32"),
        ("stochastic", None, "fp64"),
        ("pairwise", "bf16", "fp32"),  # the per-parameter fallback
        ("naive", "fp8_e4m3", "bf16"),
        ("kahan", "e5m7", "fp32"),
    ],
)
def test_other_dtype_pairs_equal_the_per_parameter_design(strategy: str, fmt: str, pdtype: str) -> None:
    run_both(strategy, fmt, pdtype)


@pytest.mark.parametrize(("strategy", "fmt"), [("kahan", "bf16"), ("naive", "fp32"), ("stochastic", "bf16")])
def test_a_parameter_large_enough_for_the_parallel_kernels(strategy: str, fmt: str) -> None:
    """A 512 x 512 weight (2^18 elements): the compiled steps run on torch's thread count; the same bits."""
    g = torch.Generator().manual_seed(50)
    model = nn.Sequential(nn.Linear(16, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model = model.bfloat16()
    ref_model = copy.deepcopy(model)
    acc = GradientAccumulator(model.parameters(), strategy, fmt, generator=torch.Generator().manual_seed(51))
    ref = ReferenceAccumulator(ref_model.parameters(), strategy, fmt, generator=torch.Generator().manual_seed(51))
    for _ in range(3):
        x, y = torch.randn(4, 16, generator=g).bfloat16(), torch.randint(0, 4, (4,), generator=g)
        for m in (model, ref_model):
            (F.cross_entropy(m(x).float(), y) / 3).backward()
    acc.write_grads()
    ref.write_grads()
    assert_same_bits(model, ref_model)
    acc.remove()


@pytest.mark.parametrize("pdtype", ["fp32", "bf16", "fp16"])
def test_naive_own_format_is_plain_pytorch_even_for_a_negative_zero_sum(pdtype: str) -> None:
    """The window's first micro-gradient is kept as autograd made it: a -0 stays -0 as in ``p.grad += g``.

    The per-parameter design started from a +0 buffer, so its sum of -0s was +0 (negative control);
    with the format given explicitly (that buffer, flat) that is what comes out.
    """
    dtype = DTYPES[pdtype]
    w, explicit, plain, ref = (nn.Parameter(torch.ones(4, dtype=dtype)) for _ in range(4))
    x = torch.tensor([-0.0, 1.0, -0.0, 0.5], dtype=dtype)  # d/dw (w * x).sum() = x: -0 in two entries
    reference = ReferenceAccumulator([ref])
    acc = GradientAccumulator([w])
    acc_explicit = GradientAccumulator([explicit], "naive", pdtype)
    assert type(acc_explicit._buffers) is _FlatBuffers
    for _ in range(2):
        for p in (w, explicit, plain, ref):
            (p * x).sum().backward()
    assert torch.equal(acc_explicit.accumulators[0].value(), reference.accs[0].value())
    acc.write_grads()
    acc_explicit.write_grads()
    reference.write_grads()
    assert torch.equal(bits(w.grad), bits(plain.grad))
    assert bits(plain.grad)[0] == bits(torch.tensor(-0.0, dtype=dtype))
    assert not torch.equal(bits(ref.grad), bits(plain.grad))  # +0 there
    assert torch.equal(bits(explicit.grad), bits(ref.grad))
    acc.remove()
    acc_explicit.remove()


@pytest.mark.parametrize("pdtype", ["fp32", "bf16", "fp16"])
def test_naive_own_format_hands_over_the_window_without_copies(pdtype: str) -> None:
    """Windows after the first, a forgotten zero_grad, and a kept reference to an old p.grad: plain PyTorch."""
    dtype = DTYPES[pdtype]
    model = make_model(dtype, 3)
    plain = copy.deepcopy(model)
    batches = data(12, 4, dtype)
    acc = GradientAccumulator(model.parameters())
    kept = []
    for w in range(3):
        for x, y in batches[4 * w : 4 * w + 4]:
            step(model, x, y, 4)
            step(plain, x, y, 4)
            assert all(p.grad is None for p in model.parameters())
        acc.write_grads()
        assert_same_bits(model, plain, f"window {w}")
        kept.append([p.grad.clone() for p in model.parameters()])
        old = [p.grad for p in model.parameters()]
        if w == 0:  # zero_grad forgotten: the next window starts from this gradient, as in PyTorch
            continue
        model.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
        for x, y in batches[:2]:
            step(model, x, y, 4)
        acc.write_grads()  # a window that must not write into the gradients handed out before
        assert all(torch.equal(o, k) for o, k in zip(old, kept[-1], strict=True))
        model.zero_grad(set_to_none=True)
    acc.remove()


# --------------------------------------------------------------------------------------------------
# counting, when asked; nothing by default
# --------------------------------------------------------------------------------------------------
COUNTED = [("naive", None), ("naive", "fp32"), ("naive", "bf16"), ("kahan", "bf16"), ("stochastic", "bf16")]


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("pdtype", ["fp32", "bf16"])
@pytest.mark.parametrize(("strategy", "fmt"), COUNTED, ids=[f"{s}-{f or 'own'}" for s, f in COUNTED])
def test_counts_when_asked_equal_the_accumulators(strategy: str, fmt: str | None, pdtype: str, kernels: bool) -> None:
    """Lost updates and non-finite inputs, per parameter and in total, with stagnation and overflow.

    The first micro-step's loss is weighted 2^10 (later addends fall below the buffers' half-ulp:
    lost updates) and the last one's by Inf (non-finite addends and buffers).
    """
    with native(kernels):
        acc, ref, model, ref_model = run_both(
            strategy, fmt, pdtype, windows=1, n=6, count=True, weights=[2.0**10, 1.0, 1.0, 1.0, 1.0, math.inf]
        )
    assert any(torch.isnan(p.grad).any() or torch.isinf(p.grad).any() for p in model.parameters())
    lost, nonfinite = ref.last_counts  # the window's counts, before write_grads reset them
    assert nonfinite > 0
    if fmt != "fp32":  # the counts checked are not trivially 0
        assert lost > 0


@pytest.mark.parametrize(("strategy", "fmt"), COUNTED, ids=[f"{s}-{f or 'own'}" for s, f in COUNTED])
def test_counts_over_two_windows_restart_at_zero(strategy: str, fmt: str | None) -> None:
    """Counts per window: write_grads resets them (checked in each window against fresh reference counts)."""
    weights = [2.0**10] + [1.0] * 7
    run_both(strategy, fmt, "bf16", windows=2, n=8, count=True, weights=weights)


def test_by_default_nothing_is_counted() -> None:
    """The documented default: count_lost=False, count_nonfinite=False; the counts read None (never 0)."""
    model = make_model(torch.bfloat16, 5)
    acc = GradientAccumulator(model.parameters(), "naive", "bf16")
    assert (acc.count_lost, acc.count_nonfinite) == (False, False)
    for x, y in data(2, 6, torch.bfloat16):
        step(model, x, y, 2, weight=2.0**126)  # non-finite gradients: still not counted
    assert acc.lost_updates is None
    assert acc.nonfinite_inputs is None
    assert all(a.lost_updates == 0 and a.nonfinite_inputs == 0 for a in acc.accumulators)  # Accumulator's 0
    stats = acc.write_grads()
    assert stats == {
        "micro_steps": 2,
        "element_adds": 2 * acc.numel,
        "lost_updates": None,
        "nonfinite_inputs": None,
    }
    acc.remove()


def test_count_flags_must_be_booleans() -> None:
    model = make_model(torch.float32, 7)
    with pytest.raises(ValueError, match="count_lost must be True or False, got 1"):
        GradientAccumulator(model.parameters(), count_lost=1)
    with pytest.raises(ValueError, match="count_nonfinite must be True or False, got 'yes'"):
        GradientAccumulator(model.parameters(), count_nonfinite="yes")
    GradientAccumulator(model.parameters()).remove()  # nothing stayed hooked


# --------------------------------------------------------------------------------------------------
# staging of small parameters
# --------------------------------------------------------------------------------------------------
class TwoBranches(nn.Module):
    """Branch b only on odd micro-steps: its (small) parameters get gradients in some windows' steps only."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.trunk = make_model(dtype, 8)
        self.b = nn.Linear(8, 5).to(dtype)
        self.use_b = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.trunk(x)
        return out + self.b(x) if self.use_b else out


@pytest.mark.parametrize(("strategy", "fmt"), [("kahan", "bf16"), ("naive", "fp32"), ("naive", "bf16")])
def test_parameters_reached_by_some_micro_steps_only(strategy: str, fmt: str) -> None:
    model = TwoBranches(torch.bfloat16)
    ref_model = copy.deepcopy(model)
    acc = GradientAccumulator(model.parameters(), strategy, fmt)
    ref = ReferenceAccumulator(ref_model.parameters(), strategy, fmt)
    for i, (x, y) in enumerate(data(6, 9, torch.bfloat16)):
        for m in (model, ref_model):
            m.use_b = i % 2 == 1
            step(m, x, y, 6)
    acc.write_grads()
    ref.write_grads()
    assert_same_bits(model, ref_model)
    acc.remove()


@pytest.mark.parametrize(("strategy", "fmt"), [("kahan", "bf16"), ("naive", "fp32")])
def test_reentrant_checkpoint_nested_backward(strategy: str, fmt: str) -> None:
    """A reentrant checkpoint runs a backward inside the backward: the staged batch is flushed at both ends."""

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = make_model(torch.float32, 10)
            self.head = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(checkpoint(self.inner, x, use_reentrant=True))

    torch.manual_seed(0)
    model = Checkpointed()
    ref_model = copy.deepcopy(model)
    acc = GradientAccumulator(model.parameters(), strategy, fmt)
    ref = ReferenceAccumulator(ref_model.parameters(), strategy, fmt)
    for x, y in data(4, 11, torch.float32):
        for m in (model, ref_model):
            (F.cross_entropy(m(x.requires_grad_()), y % 3) / 4).backward()
    acc.write_grads()
    ref.write_grads()
    assert_same_bits(model, ref_model)
    acc.remove()


def test_a_backward_that_raises_half_way_keeps_what_was_staged() -> None:
    """Micro-step 2's backward raises after the last layers' gradients arrived: those stay in the window.

    The reference adds each gradient as it arrives; the staged small gradients of the failed backward
    (whose end-of-backward callback never ran) are added at the next backward, or by write_grads.
    """

    class Boom(Exception):
        pass

    def boom(g: torch.Tensor) -> None:
        raise Boom

    def run(model: nn.Module, failing: bool) -> None:
        for i, (x, y) in enumerate(data(4, 12, torch.float32)):
            h = model[0](x)
            if failing and i == 1:
                h.register_hook(boom)
            out = model[4](model[3](model[2](model[1](h))))
            loss = F.cross_entropy(out, y) / 4
            if failing and i == 1:
                with pytest.raises(Boom):
                    loss.backward()
            else:
                loss.backward()

    for last_fails in (False, True):
        model = make_model(torch.float32, 13)
        ref_model = copy.deepcopy(model)
        acc = GradientAccumulator(model.parameters(), "kahan", "bf16")
        ref = ReferenceAccumulator(ref_model.parameters(), "kahan", "bf16")
        run(model, True)
        run(ref_model, True)
        if last_fails:  # the failed backward is the window's last: write_grads adds what it staged
            for m in (model, ref_model):
                x, y = data(1, 14, torch.float32)[0]
                h = m[0](x)
                h.register_hook(boom)
                with pytest.raises(Boom):
                    (F.cross_entropy(m[4](m[3](m[2](m[1](h)))), y) / 4).backward()
        acc.write_grads()
        ref.write_grads()
        assert_same_bits(model, ref_model, f"last_fails={last_fails}")
        acc.remove()


def test_a_model_in_several_dtypes_has_a_group_per_dtype() -> None:
    model = make_model(torch.float32, 15)
    model[2].to(torch.bfloat16)
    model[2].register_forward_pre_hook(lambda m, args: (args[0].to(torch.bfloat16),))
    model[2].register_forward_hook(lambda m, args, out: out.float())
    ref_model = copy.deepcopy(model)
    acc = GradientAccumulator(model.parameters(), "kahan", None)
    ref = ReferenceAccumulator(ref_model.parameters(), "kahan", None)
    assert sorted(str(g.dtype) for g in acc._buffers.groups) == ["torch.bfloat16", "torch.float32"]
    for x, y in data(3, 16, torch.float32):
        for m in (model, ref_model):
            step(m, x, y, 3)
    acc.write_grads()
    ref.write_grads()
    assert_same_bits(model, ref_model)
    acc.remove()


def test_accumulators_are_snapshots_of_the_flat_buffers() -> None:
    """``accumulators`` still gives per-parameter Accumulators (values, raw sums, scaled values, counts)."""
    model = make_model(torch.float32, 17)
    ref_model = copy.deepcopy(model)
    acc = GradientAccumulator(model.parameters(), "kahan", "bf16")
    ref = ReferenceAccumulator(ref_model.parameters(), "kahan", "bf16")
    for x, y in data(5, 18, torch.float32):
        step(model, x, y, 5)
        step(ref_model, x, y, 5)
    snaps = acc.accumulators
    for a, r in zip(snaps, ref.accs, strict=True):
        assert (a.strategy, a.format, a.shape, a.count) == (r.strategy, r.format, r.shape, r.count)
        assert torch.equal(a.value(), r.value())
        assert torch.equal(a.raw_sum(), r.raw_sum())
        assert torch.equal(a.scaled_value(0.5), r.scaled_value(0.5))
    snaps[0].add(torch.ones_like(model[0].weight))  # a copy: the accumulator does not change
    assert torch.equal(acc.accumulators[0].value(), ref.accs[0].value())
    acc.write_grads()
    acc.remove()


# --------------------------------------------------------------------------------------------------
# the kernels of _native_training
# --------------------------------------------------------------------------------------------------
def specials(n: int, dtype: torch.dtype, seed: int, spread: int = 130) -> torch.Tensor:
    """Values over the whole range, 5% of them signed zeros, Inf, NaN, subnormals and near-overflow numbers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-spread, spread, (n,), generator=g).float())
    sp = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 2.0**-133, -(2.0**-126), 3.38e38, -3.39e38, 2.0**127])
    idx = torch.randint(0, n, (n // 20,), generator=g)
    x[idx] = sp[torch.randint(0, len(sp), (n // 20,), generator=g)]
    return x.to(dtype)


needs_numba = pytest.mark.skipif(not _native_training.enabled(), reason="numba is not installed or kernels are off")


@needs_numba
@pytest.mark.parametrize("addend", ["bf16", "fp32"])
@pytest.mark.parametrize("n", [1, 1000, 3 * 32768 + 5])
def test_kernels_equal_torch_and_native(addend: str, n: int) -> None:
    """naive_bf16 / kahan_bf16 (serial, parallel, bound) == torch fallback == _native's kernel + count, bits and counts."""
    s = specials(n, torch.bfloat16, 1)
    c = (specials(n, torch.float32, 2, spread=20) * 2.0**-9).bfloat16()
    t = specials(n, DTYPES[addend], 3)
    tb = t.to(torch.bfloat16)
    for kind in ("naive", "kahan"):
        runs = {}
        for name in ("serial", "parallel", "bound", "bound parallel", "bound, no count", "torch", "native"):
            ss, cc = s.clone(), c.clone()
            if name in ("serial", "parallel"):
                fn = getattr(_native_training, f"{kind}_bf16")
                args = (ss, cc, t) if kind == "kahan" else (ss, t)
                counts = fn(*args, parallel=name == "parallel")
            elif name.startswith("bound"):
                counts = _native_training.bind(
                    f"{kind}_bf16",
                    ss,
                    cc if kind == "kahan" else None,
                    addend=t.dtype,
                    parallel=name.endswith("parallel"),
                    count=not name.endswith("no count"),
                )(t)
            elif name == "torch":
                fn = getattr(_native_training, f"torch_{kind}_bf16")
                counts = tuple(int(v) for v in (fn(ss, cc, t) if kind == "kahan" else fn(ss, t)))
            else:  # what Accumulator.add ran before: _native's kernel, then a separate count
                lost = _native.kahan_add_bf16(ss, cc, tb) if kind == "kahan" else _native.naive_add_bf16(ss, tb)
                counts = (lost, _native.count_nonfinite_bf16(tb))
            runs[name] = (ss, cc, counts)
        want_s, want_c, want = runs["native"]
        if n > 1:
            assert want[1] > 0  # the data has non-finite addends
            assert want[0] > 0  # and absorbed ones
        for name, (ss, cc, counts) in runs.items():
            assert counts == ((0, 0) if name.endswith("no count") else want), (kind, name)
            exact = name != "torch"  # torch writes other NaN payloads in its scalar tails
            for got, ref in ((ss, want_s), (cc, want_c)):
                if exact:
                    assert torch.equal(bits(got), bits(ref)), (kind, name)
                else:
                    assert torch.equal(got.isnan(), ref.isnan()), (kind, name)
                    assert torch.equal(
                        bits(torch.where(got.isnan(), 0, got)), bits(torch.where(ref.isnan(), 0, ref))
                    ), (kind, name)


@needs_numba
def test_widen_add_f32_equals_torch() -> None:
    n = 70001
    s = specials(n, torch.float32, 4)
    t = specials(n, torch.bfloat16, 5)
    results = []
    for fn in (
        lambda a: _native_training.widen_add_f32(a, t),
        lambda a: _native_training.widen_add_f32(a, t, parallel=True),
        lambda a: _native_training.bind("widen_add_f32", a, addend=torch.bfloat16)(t),
        lambda a: _native_training.bind("widen_add_f32", a, addend=torch.bfloat16, parallel=True)(t),
        lambda a: tuple(int(v) for v in _native_training.torch_widen_add_f32(a, t)),
    ):
        a = s.clone()
        results.append((fn(a), a))
    want = s.clone().add_(t)
    lost = int(absorbed(want, s, t).sum())
    for counts, got in results:
        assert counts == (lost, int((~torch.isfinite(t)).sum()))
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(bits(torch.where(got.isnan(), 0, got)), bits(torch.where(want.isnan(), 0, want)))
    assert lost > 0
    a = s.clone()  # without counting: the same bits, (0, 0)
    assert _native_training.bind("widen_add_f32", a, addend=torch.bfloat16, count=False)(t) == (0, 0)
    assert torch.equal(bits(torch.where(a.isnan(), 0, a)), bits(torch.where(want.isnan(), 0, want)))


@needs_numba
@pytest.mark.parametrize("n", [3, 128, 40000])
def test_bound_sr_kernel_equals_native_sr_add(n: int) -> None:
    """bind_sr_bf16 calls _native's compiled SR kernel directly: the bits and lost count of sr_add_bf16."""
    assert _native_training._sr_bound_agrees()  # else GradientAccumulator falls back (slower, same bits)
    s = specials(n, torch.bfloat16, 6, spread=30)
    t = (specials(n, torch.float32, 7, spread=30) * 2.0**-10).bfloat16()
    for key in (1, 2**62 + 12345):
        for parallel in (False, True):
            want, got = s.clone(), s.clone()
            lost = _native.sr_add_bf16(want, t, key, True)
            assert _native_training.bind_sr_bf16(got, parallel=parallel)(t, key) == lost
            assert torch.equal(bits(got), bits(want))


def test_count_nonfinite_is_the_isfinite_count() -> None:
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        x = specials(5000, torch.float32, 8).to(dtype)
        assert int(_native_training.count_nonfinite(x)) == int((~torch.isfinite(x)).sum()) > 0


@needs_numba
def test_kernel_arguments_are_checked() -> None:
    s = torch.zeros(10, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"s: expected a contiguous CPU torch.bfloat16 tensor of 10 elements"):
        _native_training.naive_bf16(s.float(), s)
    with pytest.raises(ValueError, match="contiguous: False"):
        _native_training.naive_bf16(torch.zeros(20, dtype=torch.bfloat16)[::2], s)
    with pytest.raises(ValueError, match=r"t: expected a CPU tensor of 10 elements and dtype in"):
        _native_training.kahan_bf16(s, s.clone(), torch.zeros(10, dtype=torch.float16))
    with pytest.raises(ValueError, match="bind: no kernel 'widen_add_f32' for torch.bfloat16 buffers"):
        _native_training.bind("widen_add_f32", s, addend=torch.float32)
    step_fn = _native_training.bind("naive_bf16", s, addend=torch.bfloat16)
    with pytest.raises(ValueError, match="step: expected a CPU torch.bfloat16 addend of 10 elements"):
        step_fn(torch.zeros(11, dtype=torch.bfloat16))


# --------------------------------------------------------------------------------------------------
# Accumulator.add's fused path
# --------------------------------------------------------------------------------------------------
@needs_numba
@pytest.mark.parametrize(("strategy", "count_lost"), [("kahan", True), ("kahan", False), ("naive", True)])
def test_accumulator_add_fused_path_keeps_bits_and_counts(strategy: str, count_lost: bool) -> None:
    """The one-pass kernel gives what the strategy's kernel and a separate count gave (and the torch path)."""
    n = 2 * BIG + 3
    addends = [specials(n, torch.bfloat16, 20 + i, spread=20) * 2.0**-i for i in range(6)]
    fused = Accumulator(strategy, "bf16", n, count_lost=count_lost)
    old = Accumulator(strategy, "bf16", n, count_lost=count_lost)
    old._fused_step = lambda tr: None  # the path before: strategy step, then the separate count
    with _native.disabled():
        torch_acc = Accumulator(strategy, "bf16", n, count_lost=count_lost)
    for t in addends:
        fused.add(t)
        old.add(t)
        with _native.disabled():
            torch_acc.add(t)
        assert (fused.lost_updates, fused.nonfinite_inputs) == (old.lost_updates, old.nonfinite_inputs)
        assert torch.equal(bits(fused._s), bits(old._s))
        if strategy == "kahan":
            assert torch.equal(bits(fused._c), bits(old._c))
    assert fused.nonfinite_inputs == torch_acc.nonfinite_inputs > 0
    if count_lost:
        assert fused.lost_updates == torch_acc.lost_updates > 0
    assert torch.equal(fused.value().isnan(), torch_acc.value().isnan())


def test_kahan_step_still_counts_what_the_fused_kernel_counts() -> None:
    """The fused path counts Kahan's lost updates whether asked or not, as kahan_step's compiled path did."""
    n = BIG
    s, c = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
    t = torch.full((n,), 2.0**-20, dtype=torch.bfloat16)
    s += 1
    lost = kahan_step(s, c, t, get_format("bf16"), False)
    acc = Accumulator("kahan", "bf16", n, count_lost=False)
    acc.add(torch.ones(n))
    acc.add(torch.full((n,), 2.0**-20))
    assert acc.lost_updates == (lost if _native.enabled(n) else 0)


# --------------------------------------------------------------------------------------------------
# DDP: two gloo processes, the flat buffers against the reference
# --------------------------------------------------------------------------------------------------
def test_ddp_flat_buffers_equal_the_reference(tmp_path: Path) -> None:
    """naive/own, kahan bf16, fp32 buffer on bf16, stochastic bf16 under DDP no_sync: the reference's bits (~5 s)."""
    world = 2
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, str(ROOT / "tests" / "_ddp_speedpaths_worker.py")]
    procs = [
        subprocess.Popen(
            [*cmd, str(r), str(world), str(tmp_path / "rendezvous"), str(tmp_path)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    for r in range(world):
        out = torch.load(tmp_path / f"rank{r}.pt")
        assert len(out) == 8
        for case, (got, want, calls) in out.items():
            assert calls == [0, 0, 1], case  # one all-reduce per window, on its last micro-step
            for k, (a, b) in enumerate(zip(got, want, strict=True)):
                assert torch.equal(bits(a), bits(b)), (r, case, k)


# --------------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(("strategy", "fmt"), [*FAST, ("pairwise", "bf16")], ids=lambda v: str(v))
@pytest.mark.parametrize("pdtype", ["fp32", "bf16"])
def test_cuda_speed_paths_equal_the_reference(strategy: str, fmt: str | None, pdtype: str) -> None:
    dtype = DTYPES[pdtype]
    model = make_model(dtype, 30, device="cuda")
    ref_model = copy.deepcopy(model)
    gen = torch.Generator(device="cuda").manual_seed(31)
    gen_ref = torch.Generator(device="cuda").manual_seed(31)
    acc = GradientAccumulator(model.parameters(), strategy, fmt, generator=gen, count_lost=True, count_nonfinite=True)
    ref = ReferenceAccumulator(ref_model.parameters(), strategy, fmt, generator=gen_ref)
    for w in range(2):
        for x, y in data(4, 32 + w, dtype):
            step(model, x, y, 4)
            step(ref_model, x, y, 4)
        if strategy != "naive" or fmt is not None:
            check_counts(acc, ref)
        acc.write_grads(None if w == 0 else 0.25)
        ref.write_grads(None if w == 0 else 0.25)
        if strategy == "naive" and fmt is None:
            continue  # own format: compared with plain PyTorch in test_training.py
        assert_same_bits(model, ref_model, f"window {w}")
        model.zero_grad(set_to_none=True)
        ref_model.zero_grad(set_to_none=True)
    acc.remove()
