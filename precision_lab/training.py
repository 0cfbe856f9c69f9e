"""A drop-in gradient accumulation buffer for a user's own training loop.

:class:`GradientAccumulator` hooks every parameter (``Tensor.register_post_accumulate_grad_hook``)
so that each backward's gradient is added to a buffer of the chosen strategy and format instead of
to ``p.grad``::

    acc = GradientAccumulator(model.parameters(), strategy="kahan", fmt="bf16")
    for x, y in micro_batches:                  # N of them
        (loss_fn(model(x), y) / N).backward()   # each micro-gradient goes into acc's buffers
    acc.write_grads()                           # p.grad <- accumulated value, correctly rounded to p.dtype
    optimizer.step(); optimizer.zero_grad()
    acc.remove()                                # or: with GradientAccumulator(...) as acc:

How a micro-step flows (per parameter): autograd accumulates the micro-gradient ``g`` into
``p.grad`` (which the previous hook call left ``None``, so ``p.grad`` is ``g`` itself); the hook adds
``p.grad`` to the buffer (rounding it to the buffer format first) and sets ``p.grad = None`` again,
so ``p.grad`` never holds a partial sum.  :meth:`GradientAccumulator.write_grads` writes
``round_nearest(value, format of p).to(p.dtype)`` -- correctly rounded, exact when representable.
Every strategy and format gives the bits of an :class:`~precision_lab.accumulators.Accumulator`
per parameter fed the same micro-gradients in the same order (tested), however the buffers are laid
out (below).

With ``strategy="naive"`` and ``fmt=None`` (the parameter's own format) each step is
``s <- RN(s + g)`` in ``p.dtype``, the same operation autograd performs for ``p.grad += g``, so the
result equals plain PyTorch accumulation bit for bit (tested for fp32, bf16 and fp16 models).

**Buffers** (what runs, fastest first; every path gives the same bits):

* ``naive`` with ``fmt=None`` does what autograd does: the window's first micro-gradient is *kept*
  (no copy, no zero-filled buffer), later ones are added in place, and :meth:`~GradientAccumulator.write_grads`
  hands that tensor over as ``p.grad``.  No conversion, no read-out, no copy.
* ``naive``, ``kahan`` and ``stochastic`` in a format torch has (fp64, fp32, bf16, fp16): one flat
  buffer per (device, parameter dtype) with a view per parameter.  The addend is converted on the
  way in by the add itself where it can be: an fp32 buffer adds a bf16 gradient with exact
  widening, a bf16 buffer rounds an fp32 gradient to nearest even, in one pass over memory
  (:mod:`precision_lab._native_training`, on CPU from ``_native.MIN_NUMEL`` elements; torch ops
  otherwise).  The gradients of parameters smaller than ``MIN_NUMEL`` (biases, norms) are kept as
  they arrive and added with one call per group when the backward ends (``queue_callback``: they
  are concatenated, in the buffer's order, and the step runs once over that region), instead of
  one small call each; ``stochastic`` adds every parameter at once (its random stream is per
  parameter and per add).  :meth:`~GradientAccumulator.write_grads` converts each group with one
  or two ops into a new tensor and gives each parameter a view of it: torch's cast (round to
  nearest even) where that is the correctly rounded value, fp64 and
  :func:`~precision_lab.rounding.round_nearest` otherwise (see :meth:`_FlatBuffers.take`).
* every other strategy (``pairwise``, ``exact``, registered ones) and format (fp8, tf32, ``eXmY``):
  one :class:`~precision_lab.accumulators.Accumulator` per parameter.

**Counting** is opt-in (``count_lost=True``, ``count_nonfinite=True``): each costs extra passes over
every micro-gradient on the torch paths (the compiled kernels count in the same pass), which a
training run does not need -- the gradient is the same, and non-finite micro-gradients reach the
written ``p.grad`` anyway (Inf/NaN propagate through every strategy), where ``GradScaler`` checks
them.  Counters are kept as device tensors where torch computes them, so counting never waits for
the device; they become Python integers when read.

DistributedDataParallel (pass ``ddp=ddp_model``): DDP's reducer registers its all-reduce trigger as
a *post hook of the parameter's AccumulateGrad node*, whereas post-accumulate-grad hooks run *inside*
that node, right after the accumulation.  So on every backward our hook runs first and DDP then
reads whatever ``p.grad`` we left (checked in the tests: DDP all-reduces exactly what the hook
wrote).  Whether a backward synchronises is decided by DDP in its forward (``torch.is_grad_enabled()
and require_backward_grad_sync``, i.e. outside ``no_sync()``); a forward hook on the DDP module
records the same condition.  On a synchronising backward the hook adds the last micro-gradient to
the buffer and writes the accumulated value, converted to ``p.dtype``, into ``p.grad``; DDP
all-reduces it (sum in ``p.dtype``, divided by the world size, or whatever comm hook is registered)
and writes the mean back into ``p.grad``.  ``write_grads()`` then keeps that all-reduced ``p.grad``
(applying ``scale`` to it, if given) and resets the buffers.  Micro-steps inside ``no_sync()``
perform no all-reduce; DDP all-reduces once per window, as without the accumulator.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.autograd.variable import Variable
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from precision_lab import _native, _native_training, _random
from precision_lab._threads import intra_op_threads
from precision_lab.accumulators import Accumulator
from precision_lab.checks import check_real
from precision_lab.formats import Format, get_format
from precision_lab.rounding import round_nearest
from precision_lab.strategies import Strategy, absorbed, get_strategy
from precision_lab.strategies.kahan import Kahan, kahan_step
from precision_lab.strategies.naive import Naive, naive_step
from precision_lab.strategies.stochastic import Stochastic

__all__ = ["GradientAccumulator"]

_PARAM_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_DEVICE_TYPES = ("cpu", "cuda")
# parameter -> the GradientAccumulator whose hook is registered on it (until remove()): a second
# accumulator on the same parameter would find p.grad already taken, so it is refused up front.
_OWNER: WeakIdKeyDictionary = WeakIdKeyDictionary()
# the id of the autograd graph task running now (-1 outside backward); None where torch lacks it,
# and then small parameters are added at once instead of being staged (see _FlatBuffers)
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
_UNBOUND = object()  # a kernel not looked up yet
# From this many elements a compiled step runs on torch's thread count (as torch runs its own
# elementwise ops), below it on the calling thread: a parallel launch costs more than the work of a
# small step, and waits for every thread where the cores are busy (see _native_training).
_PARALLEL_MIN_NUMEL = 1 << 18
_STRIDED = torch.strided


@dataclass(eq=False)
class _Slot:
    """One hooked parameter: where its buffer lives, its hook, and its counts in this window."""

    name: str
    param: torch.Tensor
    param_format: Format
    device: torch.device
    index: int  # position in the accumulator's parameter list
    handle: RemovableHandle | None = None
    synced: bool = False  # DDP reduced it in this window
    count: int = 0  # micro-gradients added in this window
    lost: int | torch.Tensor = 0  # lost updates (when counted): int, or a 0-d tensor on the device
    nonfinite: int | torch.Tensor = 0  # non-finite addend elements (when counted)
    # the flat buffers' fields (_FlatBuffers)
    group: _Group | None = None
    s: torch.Tensor | None = None  # view of the group's flat sum
    c: torch.Tensor | None = None  # view of the group's flat compensation (kahan)
    small: int = -1  # position among the group's small (staged) parameters, -1 for a large one
    unit: Strategy | None = None  # the strategy unit, its arrays bound to the views
    offset: int = 0  # where the views start in the group's flat arrays
    kernels: dict = field(default_factory=dict)  # addend dtype -> bound compiled step, or None

    def describe(self) -> str:
        p = self.param
        return f"{self.name!r} (shape {tuple(p.shape)}, {p.dtype}, {p.device})"


def _named(params: Iterable[Any]) -> list[tuple[str, torch.Tensor]]:
    """Accept tensors or (name, tensor) pairs (``model.named_parameters()``)."""
    out = []
    for i, item in enumerate(params):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, p = item
        else:
            name, p = f"param[{i}]", item
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"parameter {name!r} is a {type(p).__name__}, expected a torch.Tensor")
        out.append((name, p))
    return out


def _check_scale(scale: float | None) -> None:
    if scale is None:
        return
    check_real(scale, "scale (a finite number, or None)", low=-math.inf, high=math.inf, low_open=True, high_open=True)


def _in_param_layout(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``g`` (p.dtype) with p's strides: the gradient layout contract (AccumulateGrad; DDP checks it)."""
    if g.stride() != p.stride():
        g = torch.empty_like(p).copy_(g)
    return g


def _as_param_grad(value: torch.Tensor, slot: _Slot) -> torch.Tensor:
    """float64 ``value`` correctly rounded to the parameter's format, in p.dtype and p's layout."""
    p = slot.param
    return _in_param_layout(round_nearest(value, slot.param_format).to(p.dtype), p)  # exact: p.dtype numbers


def _cast_rounds_correctly(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether torch's cast of ``src`` numbers to ``dst`` is round to nearest even (or exact).

    From fp32, bf16 and fp16 every cast goes through fp32 exactly and rounds once; from fp64 only
    the cast to fp32 does (to bf16/fp16 torch rounds twice, via fp32).
    """
    return src != torch.float64 or dst in (torch.float64, torch.float32)


# --------------------------------------------------------------------------------------------------
# the buffers: one object per GradientAccumulator, holding every parameter's state
# --------------------------------------------------------------------------------------------------
class _Buffers:
    """What every kind of buffer offers the hooks and the read-out."""

    def __init__(self, strategy: str, generator: torch.Generator | None, count_lost: bool, count_nonfinite: bool):
        self.strategy = strategy
        self.generator = generator
        self.count_lost = count_lost
        self.count_nonfinite = count_nonfinite
        self.counting = count_lost or count_nonfinite
        self.staging = False  # whether stage() may keep addends for flush()

    def add(self, slot: _Slot, g: torch.Tensor) -> None:
        """Add the micro-gradient ``g`` (p.dtype, p's shape) to the slot's buffer now."""
        raise NotImplementedError

    def stage(self, slot: _Slot, g: torch.Tensor) -> bool:
        """Keep ``g`` to be added by :meth:`flush` at the end of the backward; False: not staged (add it now)."""
        return False

    def flush(self) -> None:
        """Add every staged micro-gradient."""

    def take(self, slot: _Slot) -> torch.Tensor:
        """The window's value, correctly rounded to p.dtype, as a new tensor in p's layout."""
        raise NotImplementedError

    def take_many(self, slots: list[_Slot]) -> list[torch.Tensor]:
        """:meth:`take` of each slot (buffers may share one conversion among them)."""
        return [self.take(slot) for slot in slots]

    def copy_out(self, slot: _Slot) -> torch.Tensor:
        """The value as a new tensor in p.dtype and p's layout, the buffer kept (DDP's synchronising step)."""
        raise NotImplementedError

    def take_scaled(self, slot: _Slot, scale: float) -> torch.Tensor:
        """:meth:`take` after ``buffer *= scale`` in the buffer's format (``Accumulator.scaled_value``)."""
        raise NotImplementedError

    def value(self, slot: _Slot) -> torch.Tensor:
        """The value the slot's buffer represents, float64."""
        raise NotImplementedError

    def reset(self, slots: list[_Slot]) -> None:
        """Empty every buffer (the counts are the GradientAccumulator's)."""
        raise NotImplementedError

    def snapshot(self, slot: _Slot) -> Accumulator:
        """An Accumulator holding the slot's buffer state and counts."""
        raise NotImplementedError

    def bytes_per_element(self, slot: _Slot) -> float:
        """Nominal bytes per element of the slot's buffer (``Accumulator.bytes_per_element``)."""
        raise NotImplementedError

    def lost(self, slot: _Slot) -> int:
        """The slot's lost updates in this window."""
        return int(slot.lost)

    def nonfinite(self, slot: _Slot) -> int:
        """The slot's non-finite addend elements in this window."""
        return int(slot.nonfinite)

    def _filled(self, acc: Accumulator, slot: _Slot) -> Accumulator:
        acc.count = slot.count
        acc.lost_updates = self.lost(slot) if self.count_lost else 0
        acc.nonfinite_inputs = self.nonfinite(slot) if self.count_nonfinite else 0
        return acc


class _OwnFormatNaive(_Buffers):
    """``naive`` in each parameter's own format: what autograd does, with p.grad kept empty.

    The first micro-gradient of the window is kept as it is (autograd made it for us: ``p.grad``
    was ``None``, so it is a fresh tensor or the stolen incoming gradient, in p's layout); later
    ones are added in place (``s.add_(g)``, autograd's ``p.grad += g``); the read-out hands the tensor
    over.  A sum that is -0 stays -0, as in plain PyTorch (the per-parameter design, which started
    from a +0 buffer, made it +0; with the format given explicitly, ``fmt="fp32"`` for fp32
    parameters, that buffer is what runs, as a flat buffer).
    """

    def __init__(self, slots: list[_Slot], count_lost: bool, count_nonfinite: bool) -> None:
        super().__init__("naive", None, count_lost, count_nonfinite)
        self.held: list[torch.Tensor | None] = [None] * len(slots)

    def add(self, slot: _Slot, g: torch.Tensor) -> None:
        s = self.held[slot.index]
        if s is None:  # s = 0 + g: nothing can be lost
            self.held[slot.index] = g
            if self.count_nonfinite:
                slot.nonfinite = slot.nonfinite + _native_training.count_nonfinite(g)
            return
        if not self.counting:
            s.add_(g)
            return
        if (
            s.dtype == torch.bfloat16
            and s.device.type == "cpu"
            and s.is_contiguous()
            and _native_training.enabled(s.numel())
        ):
            lost, bad = _native_training.naive_bf16(s, g)
        else:
            old = s.clone() if self.count_lost else None
            s.add_(g)
            lost = absorbed(s, old, g).sum() if self.count_lost else 0
            bad = _native_training.count_nonfinite(g) if self.count_nonfinite else 0
        if self.count_lost:
            slot.lost = slot.lost + lost
        if self.count_nonfinite:
            slot.nonfinite = slot.nonfinite + bad

    def take(self, slot: _Slot) -> torch.Tensor:
        s = self.held[slot.index]
        self.held[slot.index] = None
        return _in_param_layout(s, slot.param)

    def copy_out(self, slot: _Slot) -> torch.Tensor:
        """The value as a new tensor, keeping the buffer (DDP's synchronising micro-step)."""
        return torch.empty_like(slot.param).copy_(self.held[slot.index])

    def take_scaled(self, slot: _Slot, scale: float) -> torch.Tensor:
        s = self.held[slot.index]
        self.held[slot.index] = None
        return _as_param_grad(round_nearest(s.to(torch.float64) * scale, slot.param_format), slot)

    def value(self, slot: _Slot) -> torch.Tensor:
        s = self.held[slot.index]
        p = slot.param
        return torch.zeros(p.shape, dtype=torch.float64, device=p.device) if s is None else s.to(torch.float64)

    def reset(self, slots: list[_Slot]) -> None:
        self.held[:] = [None] * len(self.held)  # in place: the hooks hold this list

    def snapshot(self, slot: _Slot) -> Accumulator:
        p = slot.param
        acc = Accumulator("naive", slot.param_format, p.shape, device=p.device, count_lost=self.count_lost)
        s = self.held[slot.index]
        if s is not None:
            acc._s.copy_(s)
        return self._filled(acc, slot)

    def bytes_per_element(self, slot: _Slot) -> float:
        return slot.param_format.bits / 8


@dataclass(eq=False)
class _Group:
    """The parameters of one (device, parameter dtype) in a flat buffer: small ones first, then large."""

    device: torch.device
    param_dtype: torch.dtype
    format: Format  # the buffer's format
    dtype: torch.dtype  # its storage dtype (the format's own torch dtype)
    slots: list[_Slot] = field(default_factory=list)
    small: list[_Slot] = field(default_factory=list)  # numel < MIN_NUMEL, at the front of the buffer
    small_numel: int = 0
    sum: torch.Tensor | None = None
    compensation: torch.Tensor | None = None
    grads: list[torch.Tensor | None] = field(default_factory=list)  # per small parameter: its waiting gradient
    waiting: int = 0  # small parameters with a waiting gradient
    dirty: bool = False  # something was added since the last reset
    widens: bool = False  # the parameters' numbers are the format's: naive adds them as they are (s.add_(g))
    kernels: dict = field(default_factory=dict)  # the staging area's bound compiled steps (see _Slot)


class _FlatBuffers(_Buffers):
    """``naive``, ``kahan`` and ``stochastic`` in a format with a torch dtype: flat buffers, views per parameter.

    Each add is the strategy's own step on the parameter's view, with the addend converted as
    ``Accumulator.add`` converts it, so every element sees the arithmetic of a per-parameter
    Accumulator: ``naive``/``kahan`` through the fused kernels of :mod:`precision_lab._native_training`
    (same bits as ``naive_step``/``kahan_step``) or the strategies' torch code, ``stochastic`` through
    its unit (``Stochastic.add``, bound to the view: one key per parameter and add, in hook order).
    Staged small parameters are added elementwise with the same ops on the whole staging area.
    """

    def __init__(
        self,
        slots: list[_Slot],
        unit_class: type[Strategy],
        buffer_format: Format | None,
        generator: torch.Generator | None,
        count_lost: bool,
        count_nonfinite: bool,
    ) -> None:
        super().__init__(unit_class.name, generator, count_lost, count_nonfinite)
        self.unit_class = unit_class
        self.kind = {Naive: "naive", Kahan: "kahan", Stochastic: "stochastic"}[unit_class]
        # staging pays where a small add costs several torch ops (kahan) or a conversion; never for
        # stochastic (random streams per parameter) nor while counting (counts per parameter)
        self.staging = self.kind != "stochastic" and not self.counting and _graph_task_id is not None
        self.lock = threading.RLock()
        groups: dict[tuple[torch.device, torch.dtype], _Group] = {}
        for slot in slots:
            p = slot.param
            fmt = slot.param_format if buffer_format is None else buffer_format
            key = (p.device, p.dtype)
            if key not in groups:
                groups[key] = _Group(p.device, p.dtype, fmt, unit_class.storage_dtype(fmt))
            groups[key].slots.append(slot)
        self.groups = list(groups.values())
        for group in self.groups:
            self._lay_out(group)

    def _lay_out(self, group: _Group) -> None:
        small_limit = _native.MIN_NUMEL if self.staging else 0
        group.small = [s for s in group.slots if s.param.numel() < small_limit]
        large = [s for s in group.slots if s.param.numel() >= small_limit]
        group.small_numel = sum(s.param.numel() for s in group.small)
        total = group.small_numel + sum(s.param.numel() for s in large)
        group.sum = torch.zeros(total, dtype=group.dtype, device=group.device)
        if self.kind == "kahan":
            group.compensation = torch.zeros(total, dtype=group.dtype, device=group.device)
        group.grads = [None] * len(group.small)
        group.widens = get_format(group.param_dtype).fits_in(group.format)
        for k, slot in enumerate(group.small):
            slot.small = k
        offset = 0
        for slot in [*group.small, *large]:
            p = slot.param
            n = p.numel()
            slot.group = group
            slot.offset = offset
            slot.s = group.sum[offset : offset + n].view(p.shape)
            if group.compensation is not None:
                slot.c = group.compensation[offset : offset + n].view(p.shape)
            # the strategy unit, its arrays replaced by the views (a unit of zero elements is made first)
            unit = self.unit_class(group.format, torch.Size([0]), dtype=group.dtype, device=slot.s.device)
            unit.shape = p.shape
            unit.sum = slot.s
            if slot.c is not None:
                unit.compensation = slot.c
            slot.unit = unit
            offset += n
        group.slots = [*group.small, *large]

    # -- adding ---------------------------------------------------------------------------------
    def _fused(
        self, holder: _Slot | _Group, s: torch.Tensor, c: torch.Tensor | None, g: torch.Tensor
    ) -> tuple[int, int] | None:
        """The step in one compiled pass where a kernel exists (CPU): (lost, nonfinite); None otherwise.

        The kernel is bound to ``holder``'s arrays on its first use (``_native_training.bind``); it
        runs on the calling thread below ``_PARALLEL_MIN_NUMEL`` elements, on torch's thread count
        from there.  Whether kernels are on is asked at every call (``PRECISION_LAB_NATIVE``).
        """
        if not s.is_cpu or not _native_training.enabled(s.numel()):
            return None
        step = holder.kernels.get(g.dtype, _UNBOUND)
        if step is _UNBOUND:
            step = holder.kernels[g.dtype] = self._bind(s, c, g.dtype)
        return None if step is None else step(g)

    def _bind(self, s: torch.Tensor, c: torch.Tensor | None, addend: torch.dtype):  # noqa: ANN202
        parallel = s.numel() >= _PARALLEL_MIN_NUMEL
        if self.kind in ("naive", "kahan") and s.dtype == torch.bfloat16 and addend in (torch.bfloat16, torch.float32):
            return _native_training.bind(
                f"{self.kind}_bf16", s, c, addend=addend, parallel=parallel, count=self.counting
            )
        if self.kind == "naive" and s.dtype == torch.float32 and addend == torch.bfloat16:
            return _native_training.bind("widen_add_f32", s, addend=addend, parallel=parallel, count=self.counting)
        return None

    def _convert(self, g: torch.Tensor, group: _Group) -> torch.Tensor:
        if g.dtype == group.dtype:
            return g
        if _cast_rounds_correctly(g.dtype, group.dtype):
            return g.to(group.dtype)
        return round_nearest(g.to(torch.float64), group.format).to(group.dtype)

    def _torch_step(self, slot: _Slot, s: torch.Tensor, c: torch.Tensor | None, t: torch.Tensor) -> None:
        """The strategy's step on (s, c) with the converted addend t, no counting."""
        if self.kind == "naive":
            s.add_(t)
        elif self.kind == "kahan":
            kahan_step(s, c, t, slot.group.format, False)
        else:
            self._stochastic(slot, t, count_lost=False)

    def _stochastic(self, slot: _Slot, t: torch.Tensor, *, count_lost: bool) -> int:
        """``Stochastic.add`` on the slot's view: one key from the generator, then ``stochastic_step``.

        A bf16 buffer on CPU runs the compiled kernel that ``stochastic_step`` uses from
        ``_native.MIN_NUMEL`` elements (``_native.sr_add_bf16``, the same bits as its torch path)
        for every size, bound to the view (:func:`~precision_lab._native_training.bind_sr_bf16`; on the
        calling thread below ``_PARALLEL_MIN_NUMEL`` elements): on a bias of a hundred elements the
        torch path is some twenty small ops, the bound kernel one call.
        """
        s = slot.s
        if s.device.type == "cpu" and s.dtype == torch.bfloat16 and _native.enabled():
            step = slot.kernels.get("sr", _UNBOUND)
            if step is _UNBOUND:
                step = slot.kernels["sr"] = _native_training.bind_sr_bf16(s, parallel=s.numel() >= _PARALLEL_MIN_NUMEL)
            key = _random.derive_key(self.generator)  # Stochastic.add's key
            if step is not None:
                lost = step(t, key)
                return lost if count_lost else 0
            with intra_op_threads(1):  # the kernels run on torch's thread count (_native._threads)
                return _native.sr_add_bf16(s, t, key, count_lost)
        return slot.unit.add(t, generator=self.generator, count_lost=count_lost)

    def add(self, slot: _Slot, g: torch.Tensor) -> None:
        group = slot.group
        group.dirty = True
        s, c = slot.s, slot.c
        if self.kind != "stochastic":
            fused = self._fused(slot, s, c, g)
            if fused is not None:
                if self.count_lost:
                    slot.lost = slot.lost + fused[0]
                if self.count_nonfinite:
                    slot.nonfinite = slot.nonfinite + fused[1]
                return
        # naive adds the parameters' numbers as they are where the format holds them (s.add_(g)
        # widens exactly); everything else is rounded to the format first, as Accumulator.add does
        t = g if self.kind == "naive" and group.widens else self._convert(g, group)
        if not self.counting:
            self._torch_step(slot, s, c, t)
            return
        if self.count_nonfinite:
            slot.nonfinite = slot.nonfinite + _native_training.count_nonfinite(t)
        if not self.count_lost:
            self._torch_step(slot, s, c, t)
        elif s.device.type == "cpu":  # the strategies' own counts: Python ints, nothing to wait for
            if self.kind == "naive":
                slot.lost = slot.lost + naive_step(s, self._convert(g, group), group.format, True)
            elif self.kind == "kahan":
                slot.lost = slot.lost + kahan_step(s, c, t, group.format, True)
            else:
                slot.lost = slot.lost + self._stochastic(slot, t, count_lost=True)
        else:  # the same counts (strategies.absorbed) as device tensors: no host synchronisation
            old_s = s.clone()
            old_c = c.clone() if c is not None else None
            self._torch_step(slot, s, c, t)
            lost = absorbed(s, old_s, t)
            if c is not None:
                lost &= c == old_c
            slot.lost = slot.lost + lost.sum()

    def stage(self, slot: _Slot, g: torch.Tensor) -> bool:
        if slot.small < 0:
            return False
        group = slot.group
        with self.lock:  # hooks of CPU and CUDA parameters run on different autograd threads
            if group.grads[slot.small] is not None:  # a second gradient before the flush (nested backward)
                self._flush()
            group.grads[slot.small] = g  # autograd's fresh tensor (p.grad is set to None): added at the flush
            group.waiting += 1
            group.dirty = True
        return True

    def flush(self) -> None:
        with self.lock:
            self._flush()

    def _flush(self) -> None:
        for group in self.groups:
            if not group.waiting:
                continue
            grads = group.grads
            group.grads = [None] * len(grads)
            if group.waiting == len(grads):  # the usual case: one step over the small parameters' region
                n = group.small_numel
                t = torch.cat([g.reshape(-1) for g in grads])  # in layout order; freed after the step
                c = None if group.compensation is None else group.compensation[:n]
                self._step(group, group.sum[:n], c, t)
            else:
                for slot, g in zip(group.small, grads, strict=True):
                    if g is not None:
                        self._step(slot, slot.s, slot.c, g)
            group.waiting = 0

    def _step(self, holder: _Slot | _Group, s: torch.Tensor, c: torch.Tensor | None, g: torch.Tensor) -> None:
        """The strategy's step of the addend ``g`` (the parameters' dtype) on (s, c), without counting."""
        if self._fused(holder, s, c, g) is not None:
            return
        group = holder if isinstance(holder, _Group) else holder.group
        t = (
            g if self.kind == "naive" and group.widens else self._convert(g, group)
        )  # naive adds a narrower dtype exactly widened: s.add_(g)
        if self.kind == "naive":
            s.add_(t)
        else:
            kahan_step(s, c, t, group.format, False)

    # -- reading out ----------------------------------------------------------------------------
    def take(self, slot: _Slot) -> torch.Tensor:
        """The value in p.dtype: torch's cast or subtraction where that is the correctly rounded value.

        ``naive``/``stochastic``: the value is ``s``; torch's cast of a buffer dtype other than fp64 is
        round to nearest even (:func:`_cast_rounds_correctly`).  ``kahan``: the value is ``s - c``,
        rounded once to p's format (``round_nearest`` of the fp64 difference).  Where the buffer's
        numbers are p.dtype numbers, torch's subtraction in p.dtype gives that: it rounds the exact
        difference once, and the fp64 route rounds twice (fp64, then p's format), which is innocuous
        for ``+``/``-`` of p's numbers since 53 >= 2p + 2 for p <= 24 (Figueroa 1995); bf16/fp16
        subtraction computes in fp32 and rounds to the format, innocuous again (24 >= 2p + 2 for
        p <= 11).  Every other case takes the fp64 route of the per-parameter Accumulator.
        """
        p = slot.param
        group = slot.group
        if self.kind != "kahan":
            if _cast_rounds_correctly(group.dtype, p.dtype):
                return torch.empty_like(p).copy_(slot.s)
            return _as_param_grad(slot.s.to(torch.float64), slot)
        if group.format.fits_in(slot.param_format):
            out = torch.empty_like(p).copy_(slot.s)  # exact
            return out.sub_(slot.c)  # RN_p(s - c), computed in p.dtype (mixed dtypes: widened exactly)
        return _as_param_grad(slot.unit.value(), slot)

    def take_many(self, slots: list[_Slot]) -> list[torch.Tensor]:
        """Each group converted at once (one or two ops, the rules of :meth:`take` elementwise); views of it.

        The written gradients of a group are views of one new tensor (their own strides where
        those are p's, else copies), which no buffer keeps: it belongs to the caller.
        """
        converted: dict[int, torch.Tensor] = {}
        out = []
        for slot in slots:
            group = slot.group
            flat = converted.get(id(group))
            if flat is None:
                flat = converted[id(group)] = self._group_value(group)
            p = slot.param
            out.append(_in_param_layout(flat[slot.offset : slot.offset + p.numel()].view(p.shape), p))
        return out

    def _group_value(self, group: _Group) -> torch.Tensor:
        """The whole group's values in the parameters' dtype, as :meth:`take` gives each."""
        pfmt = group.slots[0].param_format
        pdtype = group.param_dtype
        if self.kind != "kahan":
            if _cast_rounds_correctly(group.dtype, pdtype):
                return group.sum.to(pdtype, copy=True)
            return round_nearest(group.sum.to(torch.float64), pfmt).to(pdtype)
        if group.format.fits_in(pfmt):
            if group.dtype == pdtype:
                return torch.sub(group.sum, group.compensation)
            return group.sum.to(pdtype).sub_(group.compensation)
        value = group.sum.to(torch.float64) - group.compensation.to(torch.float64)  # Kahan.value()
        return round_nearest(value, pfmt).to(pdtype)

    def copy_out(self, slot: _Slot) -> torch.Tensor:
        """The value as a new tensor, keeping the buffer (DDP's synchronising micro-step)."""
        return self.take(slot)

    def take_scaled(self, slot: _Slot, scale: float) -> torch.Tensor:
        return _as_param_grad(slot.unit.scaled_value(scale), slot)

    def value(self, slot: _Slot) -> torch.Tensor:
        return slot.unit.value()

    def reset(self, slots: list[_Slot]) -> None:
        self.flush()  # nothing stays staged across windows
        for group in self.groups:
            if group.dirty:
                group.sum.zero_()
                if group.compensation is not None:
                    group.compensation.zero_()
                group.dirty = False

    def snapshot(self, slot: _Slot) -> Accumulator:
        p = slot.param
        acc = Accumulator(
            self.strategy,
            slot.group.format,
            p.shape,
            device=p.device,
            generator=self.generator,
            count_lost=self.count_lost,
        )
        acc._s.copy_(slot.s)
        if slot.c is not None:
            acc._c.copy_(slot.c)
        return self._filled(acc, slot)

    def bytes_per_element(self, slot: _Slot) -> float:
        return slot.unit.bytes_per_element


class _PerParameter(_Buffers):
    """Any other strategy or format: one :class:`Accumulator` per parameter, as they come."""

    def __init__(
        self,
        slots: list[_Slot],
        strategy: str,
        buffer_format: Format | None,
        generator: torch.Generator | None,
        count_lost: bool,
        count_nonfinite: bool,
    ) -> None:
        super().__init__(strategy, generator, count_lost, count_nonfinite)
        self.accs: list[Accumulator] = []
        for slot in slots:
            p = slot.param
            acc = Accumulator(
                strategy,
                slot.param_format if buffer_format is None else buffer_format,
                p.shape,
                device=p.device,
                generator=generator,
                count_lost=count_lost,
            )
            acc._count_nonfinite = count_nonfinite
            self.accs.append(acc)

    def add(self, slot: _Slot, g: torch.Tensor) -> None:
        self.accs[slot.index].add(g)  # rounded to the buffer format, then accumulated by the strategy

    def take(self, slot: _Slot) -> torch.Tensor:
        return _as_param_grad(self.accs[slot.index].value(), slot)

    def copy_out(self, slot: _Slot) -> torch.Tensor:
        """The value as a new tensor (DDP's synchronising micro-step)."""
        return self.take(slot)

    def take_scaled(self, slot: _Slot, scale: float) -> torch.Tensor:
        return _as_param_grad(self.accs[slot.index].scaled_value(scale), slot)

    def value(self, slot: _Slot) -> torch.Tensor:
        return self.accs[slot.index].value()

    def reset(self, slots: list[_Slot]) -> None:
        for acc in self.accs:
            if acc.count:
                acc.reset()

    def snapshot(self, slot: _Slot) -> Accumulator:
        return self.accs[slot.index]

    def bytes_per_element(self, slot: _Slot) -> float:
        return self.accs[slot.index].bytes_per_element

    def lost(self, slot: _Slot) -> int:
        return self.accs[slot.index].lost_updates

    def nonfinite(self, slot: _Slot) -> int:
        return self.accs[slot.index].nonfinite_inputs


def _make_buffers(
    slots: list[_Slot],
    strategy: str,
    buffer_format: Format | None,
    generator: torch.Generator | None,
    count_lost: bool,
    count_nonfinite: bool,
) -> _Buffers:
    unit_class = get_strategy(strategy)
    if unit_class is Naive and buffer_format is None:
        return _OwnFormatNaive(slots, count_lost, count_nonfinite)
    if unit_class in (Naive, Kahan, Stochastic):
        formats = [buffer_format] if buffer_format is not None else [s.param_format for s in slots]
        if all(f.torch_dtype is not None and unit_class.storage_dtype(f) == f.torch_dtype for f in formats):
            return _FlatBuffers(slots, unit_class, buffer_format, generator, count_lost, count_nonfinite)
    return _PerParameter(slots, strategy, buffer_format, generator, count_lost, count_nonfinite)


# --------------------------------------------------------------------------------------------------
# the accumulator
# --------------------------------------------------------------------------------------------------
class GradientAccumulator:
    """Accumulate each backward's parameter gradients in buffers of any strategy and format.

    Args:
        params: The parameters (``model.parameters()``) or ``model.named_parameters()`` pairs (names
            appear in error messages).  Parameters with ``requires_grad=False`` are skipped; the rest
            must be leaf tensors of dtype fp64/fp32/bf16/fp16 on ``cpu`` or ``cuda`` devices (several
            devices are fine: each buffer lives on its parameter's device), each listed once, with
            ``p.grad is None`` (zero the gradients before creating the accumulator) and not already
            hooked by another live ``GradientAccumulator``.
        strategy: A registered strategy name (:data:`~precision_lab.accumulators.STRATEGIES` or one
            added with :func:`~precision_lab.strategies.register_strategy`).
        fmt: Buffer format (name, ``eXmY``, dtype or :class:`Format`); ``None`` means each
            parameter's own format.
        generator: A ``torch.Generator``; required (reproducibility) by a strategy that draws random bits
            (its unit's ``needs_generator``, e.g. ``"stochastic"``),
            ignored otherwise.  One generator serves every buffer, in hook order.
        count_lost: Count lost (stagnated) updates, :attr:`lost_updates` (see
            :class:`~precision_lab.accumulators.Accumulator`).  Off by default: it costs a comparison
            with the old buffer per element and add (extra passes on the torch paths), and a training
            run does not need it.  Without it :attr:`lost_updates` and the statistics' ``lost_updates``
            are ``None``.
        count_nonfinite: Count non-finite micro-gradient elements, :attr:`nonfinite_inputs`.  Off by
            default (an extra pass per add on the torch paths): Inf and NaN reach the written
            ``p.grad`` anyway, where ``GradScaler`` finds them.  Without it :attr:`nonfinite_inputs` and
            the statistics' ``nonfinite_inputs`` are ``None``.
        ddp: The ``DistributedDataParallel`` module wrapping these parameters, to accumulate under
            ``no_sync()`` (see the module docstring).

    Raises:
        ValueError: For each bad input named above, an unknown strategy or format, or a
            stochastic strategy without a generator.

    Behaviours worth knowing:

    * A parameter that received no gradient in the window keeps its ``p.grad`` untouched by
      :meth:`write_grads` (``None`` after ``zero_grad()``), as in PyTorch.
    * A gradient still in ``p.grad`` when a micro-step's backward arrives (``zero_grad()`` forgotten
      after the optimizer step) is added to that micro-gradient by autograd before the hook sees it,
      so it enters the window, as it would in plain PyTorch.
    * After :meth:`remove`, backward accumulates into ``p.grad`` as plain PyTorch does.
    * A gradient that is not strided (sparse) raises ``RuntimeError`` from inside backward.
    * Small parameters' gradients may wait in a staging area until their backward ends (see the
      module docstring); every read (:meth:`write_grads`, the properties) sees them added.
    """

    def __init__(
        self,
        params: Iterable[Any],
        strategy: str = "naive",
        fmt: str | Format | torch.dtype | None = None,
        *,
        generator: torch.Generator | None = None,
        count_lost: bool = False,
        count_nonfinite: bool = False,
        ddp: torch.nn.Module | None = None,
    ) -> None:
        if get_strategy(strategy).needs_generator and generator is None:  # unknown names: ValueError
            raise ValueError(
                f"strategy {strategy!r} needs generator=torch.Generator(...).manual_seed(seed) so that the "
                "accumulated gradients can be reproduced; got generator=None"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        for flag, value in (("count_lost", count_lost), ("count_nonfinite", count_nonfinite)):
            if not isinstance(value, bool):
                raise ValueError(f"{flag} must be True or False, got {value!r}")
        buffer_format = None if fmt is None else get_format(fmt)
        self.strategy = strategy
        self.format = buffer_format
        self.ddp = ddp
        self.count_lost = count_lost
        self.count_nonfinite = count_nonfinite
        if buffer_format is not None:
            Accumulator(strategy, buffer_format, 0)  # a format the strategy cannot emulate: its ValueError now
        named = _named(params)
        ddp_params = self._check_ddp(ddp)
        seen: set[int] = set()
        slots: list[_Slot] = []
        for name, p in named:
            if not p.requires_grad:
                continue
            label = f"{name!r} (shape {tuple(p.shape)}, {p.dtype}, {p.device})"
            if id(p) in seen:
                raise ValueError(f"parameter {label} is listed twice")
            seen.add(id(p))
            if not p.is_leaf:
                raise ValueError(f"parameter {label} is not a leaf tensor; only leaves accumulate .grad")
            if p.dtype not in _PARAM_DTYPES:
                raise ValueError(
                    f"parameter {label} has dtype {p.dtype}; supported: {', '.join(map(str, _PARAM_DTYPES))}"
                )
            if p.device.type not in _DEVICE_TYPES:
                raise ValueError(
                    f"parameter {label} is on device {str(p.device)!r}; supported: 'cpu', 'cuda' "
                    "(parameters may mix them: each buffer lives on its parameter's device)"
                )
            if p.grad is not None:
                raise ValueError(
                    f"parameter {label} already has a .grad; call optimizer.zero_grad() or model.zero_grad() "
                    "(set_to_none=True) before creating the GradientAccumulator"
                )
            owner = _OWNER.get(p)
            if owner is not None and owner is not self:
                raise ValueError(f"parameter {label} is already hooked by {owner!r}; call its remove() first")
            if ddp_params is not None and id(p) not in ddp_params:
                raise ValueError(f"parameter {label} is not a parameter of the ddp module {type(ddp).__name__}")
            slots.append(_Slot(name, p, get_format(p.dtype), p.device, len(slots)))
        if not slots:
            raise ValueError("no parameter with requires_grad=True was given")
        self._slots = slots
        self._buffers = _make_buffers(slots, strategy, buffer_format, generator, count_lost, count_nonfinite)
        self._flush_task: int | None = None  # the graph task whose end will add the staged gradients
        self._sync_armed = False  # the last DDP forward asked for a synchronising backward
        self._removed = False
        self._ddp_handle = None
        for slot in slots:
            slot.handle = slot.param.register_post_accumulate_grad_hook(self._make_hook(slot))
            _OWNER[slot.param] = self
        if ddp is not None:
            self._ddp_handle = ddp.register_forward_hook(self._on_ddp_forward)

    # -- DDP ------------------------------------------------------------------------------------
    @staticmethod
    def _check_ddp(ddp: torch.nn.Module | None) -> set[int] | None:
        if ddp is None:
            return None
        if not isinstance(ddp, torch.nn.Module) or not hasattr(ddp, "require_backward_grad_sync"):
            raise ValueError(
                f"ddp must be the DistributedDataParallel module (with require_backward_grad_sync), "
                f"got {type(ddp).__name__}"
            )
        return {id(q) for q in ddp.parameters()}

    def _on_ddp_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        # DDP decides in its forward whether the coming backward all-reduces (prepare_for_backward);
        # the same condition, read after DDP's forward has run:
        self._sync_armed = torch.is_grad_enabled() and bool(module.require_backward_grad_sync)

    # -- the hook -------------------------------------------------------------------------------
    def _make_hook(self, slot: _Slot):  # noqa: ANN202 - a closure over the slot
        # The hook runs once per parameter and micro-step: the usual case takes the shortest path
        # (names bound here, cheap checks); anything unusual goes through _receive, which checks
        # everything and raises or handles DDP's synchronising step.
        buffers = self._buffers
        add = buffers.add
        stage = buffers.stage if buffers.staging else None
        dtype = slot.param_format.torch_dtype
        device_index = slot.param.get_device()  # -1 on the CPU
        receive = self._receive
        arm_flush = self._arm_flush

        if isinstance(buffers, _OwnFormatNaive) and not buffers.counting:
            held = buffers.held  # reset() empties this list in place
            k = slot.index

            def own_format_hook(p: torch.Tensor) -> None:  # autograd's p.grad += g, one call less
                g = p.grad
                if (
                    g is None
                    or g.dtype is not dtype
                    or g.layout is not _STRIDED
                    or self._sync_armed
                    or g.get_device() != device_index
                ):
                    receive(slot, p)
                    return
                s = held[k]
                if s is None:
                    held[k] = g
                else:
                    s.add_(g)
                slot.count += 1
                p.grad = None

            return own_format_hook

        def hook(p: torch.Tensor) -> None:
            g = p.grad
            if (
                g is None
                or g.dtype is not dtype
                or g.layout is not _STRIDED
                or self._sync_armed
                or g.get_device() != device_index
            ):
                receive(slot, p)
                return
            if stage is not None and stage(slot, g):
                arm_flush()
            else:
                add(slot, g)
            slot.count += 1
            p.grad = None

        return hook

    def _check_arrival(self, slot: _Slot, p: torch.Tensor, g: torch.Tensor | None) -> None:
        if g is None:
            raise RuntimeError(
                f"parameter {slot.describe()}: p.grad is None in the post-accumulate hook; another hook "
                "cleared it before the GradientAccumulator could take it"
            )
        want = slot.param_format.torch_dtype
        if p.dtype != want or p.device != slot.device:
            raise RuntimeError(
                f"parameter {slot.name!r} is now {p.dtype} on {p.device}, but its buffer was made for "
                f"{want} on {slot.device}; create the GradientAccumulator after moving or casting the model"
            )
        if g.layout != torch.strided:
            raise RuntimeError(
                f"parameter {slot.describe()} received a {g.layout} gradient; only dense gradients can be accumulated"
            )

    def _receive(self, slot: _Slot, p: torch.Tensor) -> None:
        g = p.grad
        if (
            g is None
            or p.dtype != slot.param_format.torch_dtype
            or p.device != slot.device
            or g.layout != torch.strided
        ):
            self._check_arrival(slot, p, g)  # raises
        if self._sync_armed:  # only ever set with ddp
            if slot.synced:
                raise RuntimeError(
                    f"parameter {slot.describe()} received a second synchronising (outside no_sync) backward in "
                    "one window; call write_grads() after the window's last, synchronising micro-step"
                )
            self._buffers.add(slot, g)
            slot.count += 1
            # DDP's reducer reads p.grad right after this hook returns: hand it the whole window's sum.
            p.grad = self._buffers.copy_out(slot)
            slot.synced = True
            return
        if self._buffers.stage(slot, g):
            self._arm_flush()
        else:
            self._buffers.add(slot, g)
        slot.count += 1
        p.grad = None

    def _arm_flush(self) -> None:
        """Make sure the staged gradients are added when the running backward ends."""
        task = _graph_task_id()
        if task == self._flush_task:
            return
        if self._flush_task is not None:
            # a staged batch whose backward never reached its end (it raised), or an outer backward's
            # batch before a nested one: add it now
            self._buffers.flush()
        Variable._execution_engine.queue_callback(self._on_backward_end)
        self._flush_task = task

    def _on_backward_end(self) -> None:
        self._flush_task = None
        self._buffers.flush()

    # -- reading out ----------------------------------------------------------------------------
    def write_grads(self, scale: float | None = None) -> dict[str, int | None]:
        """Set ``p.grad`` of every parameter that received gradients to the accumulated value; reset.

        The value is converted with correct rounding, ``round_nearest(value, format of p).to(p.dtype)``,
        so it is exact whenever the accumulated value is representable in ``p.dtype``.  Parameters
        that received no gradient in the window keep their ``p.grad`` (``None`` after ``zero_grad``).

        Args:
            scale: Optional factor for post-scaling (``scale=1/N`` after summing unscaled losses),
                applied in the buffer's format (:meth:`Accumulator.scaled_value`).  With ``ddp`` the
                all-reduce has already happened in ``p.dtype``; the factor is then applied to the
                all-reduced ``p.grad`` (product in fp64, rounded once to ``p.dtype``).

        Returns:
            The window's statistics: ``micro_steps``, ``element_adds``, ``lost_updates`` and
            ``nonfinite_inputs`` (see the properties of the same names; the last two are ``None``
            unless counted).

        Raises:
            RuntimeError: After :meth:`remove`; when no backward reached the parameters since the
                last ``write_grads``; with ``ddp``, when a parameter with gradients in the window was
                not all-reduced (the last micro-step ran inside ``no_sync()``, or that parameter got
                no gradient in it); without ``ddp``, when something wrote ``p.grad`` after the hook
                took it (typically DDP's reducer: pass ``ddp=``).  Nothing is changed when it raises.
            ValueError: ``scale`` is not a finite number.
        """
        if self._removed:
            raise RuntimeError("write_grads() after remove(): this GradientAccumulator holds no hooks any more")
        _check_scale(scale)
        self._buffers.flush()
        stats = self.stats()
        if stats["micro_steps"] == 0:
            raise RuntimeError("write_grads() with no backward since the last write_grads() (or since creation)")
        written = [slot for slot in self._slots if slot.count]
        for slot in written:  # every check before anything changes
            p = slot.param
            if self.ddp is not None:
                if not slot.synced or p.grad is None:
                    raise RuntimeError(
                        f"parameter {slot.describe()} has {slot.count} micro-gradients that DDP never "
                        "all-reduced: run the window's last micro-step (forward and backward) outside no_sync() "
                        "and make sure it reaches every parameter that had gradients"
                    )
            elif p.grad is not None:
                raise RuntimeError(
                    f"parameter {slot.describe()}: p.grad was set after the GradientAccumulator took the gradient "
                    "(by DistributedDataParallel's reducer? then pass ddp=the DDP module); refusing to overwrite it"
                )
        new: list[tuple[_Slot, torch.Tensor]] = []
        if self.ddp is not None:
            if scale is not None:
                new = [(slot, _as_param_grad(slot.param.grad.to(torch.float64) * scale, slot)) for slot in written]
        elif scale is None or scale == 1:  # Accumulator.scaled_value(1) is value()
            new = list(zip(written, self._buffers.take_many(written), strict=True))
        else:
            new = [(slot, self._buffers.take_scaled(slot, scale)) for slot in written]
        for slot, g in new:
            slot.param.grad = g
        self._reset()
        return stats

    def _reset(self) -> None:
        self._buffers.reset(self._slots)
        for slot in self._slots:
            slot.count = 0
            slot.lost = 0
            slot.nonfinite = 0
            slot.synced = False
        self._sync_armed = False

    def stats(self) -> dict[str, int | None]:
        """The current window's ``micro_steps``, ``element_adds``, ``lost_updates``, ``nonfinite_inputs``."""
        return {
            "micro_steps": self.micro_steps,
            "element_adds": self.element_adds,
            "lost_updates": self.lost_updates,
            "nonfinite_inputs": self.nonfinite_inputs,
        }

    # -- properties -----------------------------------------------------------------------------
    @property
    def micro_steps(self) -> int:
        """Backward passes in the current window: the most gradients any one parameter received."""
        return max(slot.count for slot in self._slots)

    @property
    def element_adds(self) -> int:
        """Element-additions into the buffers in the current window."""
        return sum(slot.count * slot.param.numel() for slot in self._slots)

    @property
    def lost_updates(self) -> int | None:
        """Element-adds in the current window that left a buffer unchanged (stagnation); None unless ``count_lost``."""
        if not self.count_lost:
            return None
        self._buffers.flush()
        return sum(self._buffers.lost(slot) for slot in self._slots)

    @property
    def nonfinite_inputs(self) -> int | None:
        """Non-finite micro-gradient elements this window, after rounding to the buffer format.

        An fp32 gradient too large for an fp16 buffer counts here: it became Inf on the way in.
        ``None`` unless ``count_nonfinite``.
        """
        if not self.count_nonfinite:
            return None
        return sum(self._buffers.nonfinite(slot) for slot in self._slots)

    @property
    def nonfinite(self) -> int:
        """Non-finite entries of the accumulated values now."""
        self._buffers.flush()
        return sum(int((~torch.isfinite(self._buffers.value(slot))).sum()) for slot in self._slots)

    @property
    def numel(self) -> int:
        """Elements accumulated (all hooked parameters)."""
        return sum(slot.param.numel() for slot in self._slots)

    @property
    def bytes_per_element(self) -> float:
        """Nominal buffer memory per element (:attr:`Accumulator.bytes_per_element`), averaged over elements."""
        total = sum(self._buffers.bytes_per_element(slot) * slot.param.numel() for slot in self._slots)
        return total / self.numel if self.numel else 0.0

    @property
    def accumulators(self) -> tuple[Accumulator, ...]:
        """Per-parameter :class:`Accumulator` objects holding each buffer's state, in parameter order.

        Their ``value()``, ``raw_sum()``, ``scaled_value()``, ``count``, ``lost_updates`` and
        ``nonfinite_inputs`` are those of the per-parameter buffer (counts that are not counted read
        0).  Where the buffers live in flat storage (``naive``, ``kahan``, ``stochastic`` in a
        format with a torch dtype) they are copies made on each access: adding to them does not
        change this GradientAccumulator.  For metrics; do not add to them.
        """
        self._buffers.flush()
        return tuple(self._buffers.snapshot(slot) for slot in self._slots)

    @property
    def parameters(self) -> tuple[torch.Tensor, ...]:
        """The hooked parameters (those with ``requires_grad``), in the order given."""
        return tuple(slot.param for slot in self._slots)

    @property
    def removed(self) -> bool:
        """Whether :meth:`remove` has detached the hooks."""
        return self._removed

    # -- lifetime -------------------------------------------------------------------------------
    def remove(self, *, discard: bool = False) -> None:
        """Detach every hook; afterwards backward accumulates into ``p.grad`` as plain PyTorch does.

        Args:
            discard: Drop gradients accumulated since the last :meth:`write_grads`.  Without it such
                gradients raise ``RuntimeError`` (and nothing is detached), so none is lost silently.
        """
        if self._removed:
            return
        if self.micro_steps and not discard:
            raise RuntimeError(
                f"remove() with {self.micro_steps} micro-steps not yet written; call write_grads() first, "
                "or remove(discard=True) to drop them"
            )
        for slot in self._slots:
            if slot.handle is not None:
                slot.handle.remove()
                slot.handle = None
            if _OWNER.get(slot.param) is self:
                del _OWNER[slot.param]
        if self._ddp_handle is not None:
            self._ddp_handle.remove()
            self._ddp_handle = None
        self._reset()
        self._removed = True

    def __enter__(self) -> GradientAccumulator:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        # leaving on an exception drops the unwritten window rather than masking the exception
        self.remove(discard=exc_type is not None)

    def __repr__(self) -> str:
        fmt = "param" if self.format is None else self.format.name
        state = "removed" if self._removed else f"micro_steps={self.micro_steps}"
        return (
            f"GradientAccumulator({self.strategy!r}, {fmt!r}, parameters={len(self._slots)}, "
            f"ddp={self.ddp is not None}, {state})"
        )
