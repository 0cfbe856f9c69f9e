"""A drop-in gradient accumulation buffer for a user's own training loop.

:class:`GradientAccumulator` hooks every parameter (``Tensor.register_post_accumulate_grad_hook``)
so that each backward's gradient is added to an :class:`~precision_lab.accumulators.Accumulator`
of the chosen strategy and format instead of to ``p.grad``::

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

With ``strategy="naive"`` and ``fmt=None`` (the parameter's own format) each step is
``s <- RN(s + g)`` in ``p.dtype``, the same operation autograd performs for ``p.grad += g``, so the
result equals plain PyTorch accumulation bit for bit (tested for fp32, bf16 and fp16 models).

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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

from precision_lab.accumulators import Accumulator
from precision_lab.checks import check_real
from precision_lab.formats import Format, get_format
from precision_lab.rounding import round_nearest
from precision_lab.strategies import get_strategy

__all__ = ["GradientAccumulator"]

_PARAM_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_DEVICE_TYPES = ("cpu", "cuda")
# parameter -> the GradientAccumulator whose hook is registered on it (until remove()): a second
# accumulator on the same parameter would find p.grad already taken, so it is refused up front.
_OWNER: WeakIdKeyDictionary = WeakIdKeyDictionary()


@dataclass(eq=False)
class _Slot:
    """One hooked parameter: its buffer, its hook, and whether DDP reduced it in this window."""

    name: str
    param: torch.Tensor
    param_format: Format
    acc: Accumulator
    handle: RemovableHandle | None = None
    synced: bool = False

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


def _as_param_grad(value: torch.Tensor, slot: _Slot) -> torch.Tensor:
    """float64 ``value`` correctly rounded to the parameter's format, in p.dtype and p's layout."""
    p = slot.param
    g = round_nearest(value, slot.param_format).to(p.dtype)  # exact: the rounded values are p.dtype numbers
    if g.stride() != p.stride():  # the gradient layout contract (AccumulateGrad; DDP checks it)
        g = torch.empty_like(p).copy_(g)
    return g


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
        count_lost: Track lost (stagnated) updates; see :class:`Accumulator`.
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
    """

    def __init__(
        self,
        params: Iterable[Any],
        strategy: str = "naive",
        fmt: str | Format | torch.dtype | None = None,
        *,
        generator: torch.Generator | None = None,
        count_lost: bool = True,
        ddp: torch.nn.Module | None = None,
    ) -> None:
        if get_strategy(strategy).needs_generator and generator is None:  # unknown names: ValueError
            raise ValueError(
                f"strategy {strategy!r} needs generator=torch.Generator(...).manual_seed(seed) so that the "
                "accumulated gradients can be reproduced; got generator=None"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        buffer_format = None if fmt is None else get_format(fmt)
        self.strategy = strategy
        self.format = buffer_format
        self.ddp = ddp
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
            pfmt = get_format(p.dtype)
            acc = Accumulator(
                strategy,
                pfmt if buffer_format is None else buffer_format,
                p.shape,
                device=p.device,
                generator=generator,
                count_lost=count_lost,
            )
            slots.append(_Slot(name, p, pfmt, acc))
        if not slots:
            raise ValueError("no parameter with requires_grad=True was given")
        self._slots = slots
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
        def hook(p: torch.Tensor) -> None:
            self._receive(slot, p)

        return hook

    def _receive(self, slot: _Slot, p: torch.Tensor) -> None:
        g = p.grad
        if g is None:
            raise RuntimeError(
                f"parameter {slot.describe()}: p.grad is None in the post-accumulate hook; another hook "
                "cleared it before the GradientAccumulator could take it"
            )
        if p.dtype != slot.param_format.torch_dtype or p.device != slot.acc.device:
            raise RuntimeError(
                f"parameter {slot.name!r} is now {p.dtype} on {p.device}, but its buffer was made for "
                f"{slot.param_format.torch_dtype} on {slot.acc.device}; create the GradientAccumulator after "
                "moving or casting the model"
            )
        if g.layout != torch.strided:
            raise RuntimeError(
                f"parameter {slot.describe()} received a {g.layout} gradient; only dense gradients can be accumulated"
            )
        sync = self.ddp is not None and self._sync_armed
        if sync and slot.synced:
            raise RuntimeError(
                f"parameter {slot.describe()} received a second synchronising (outside no_sync) backward in one "
                "window; call write_grads() after the window's last, synchronising micro-step"
            )
        slot.acc.add(g)  # rounded to the buffer format, then accumulated by the strategy
        if sync:
            # DDP's reducer reads p.grad right after this hook returns: hand it the whole window's sum.
            p.grad = _as_param_grad(slot.acc.value(), slot)
            slot.synced = True
        else:
            p.grad = None

    # -- reading out ----------------------------------------------------------------------------
    def write_grads(self, scale: float | None = None) -> dict[str, int]:
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
            ``nonfinite_inputs`` (see the properties of the same names).

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
        stats = self.stats()
        if stats["micro_steps"] == 0:
            raise RuntimeError("write_grads() with no backward since the last write_grads() (or since creation)")
        new: list[tuple[_Slot, torch.Tensor]] = []
        for slot in self._slots:
            if slot.acc.count == 0:
                continue
            p = slot.param
            if self.ddp is not None:
                if not slot.synced or p.grad is None:
                    raise RuntimeError(
                        f"parameter {slot.describe()} has {slot.acc.count} micro-gradients that DDP never "
                        "all-reduced: run the window's last micro-step (forward and backward) outside no_sync() "
                        "and make sure it reaches every parameter that had gradients"
                    )
                if scale is None:
                    continue
                new.append((slot, _as_param_grad(p.grad.to(torch.float64) * scale, slot)))
                continue
            if p.grad is not None:
                raise RuntimeError(
                    f"parameter {slot.describe()}: p.grad was set after the GradientAccumulator took the gradient "
                    "(by DistributedDataParallel's reducer? then pass ddp=the DDP module); refusing to overwrite it"
                )
            value = slot.acc.value() if scale is None else slot.acc.scaled_value(scale)
            new.append((slot, _as_param_grad(value, slot)))
        for slot, g in new:
            slot.param.grad = g
        self._reset()
        return stats

    def _reset(self) -> None:
        for slot in self._slots:
            slot.acc.reset()
            slot.synced = False
        self._sync_armed = False

    def stats(self) -> dict[str, int]:
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
        return max(slot.acc.count for slot in self._slots)

    @property
    def element_adds(self) -> int:
        """Element-additions into the buffers in the current window."""
        return sum(slot.acc.element_adds for slot in self._slots)

    @property
    def lost_updates(self) -> int:
        """Element-adds in the current window that left a buffer unchanged (stagnation)."""
        return sum(slot.acc.lost_updates for slot in self._slots)

    @property
    def nonfinite_inputs(self) -> int:
        """Non-finite micro-gradient elements this window, after rounding to the buffer format.

        An fp32 gradient too large for an fp16 buffer counts here: it became Inf on the way in.
        """
        return sum(slot.acc.nonfinite_inputs for slot in self._slots)

    @property
    def nonfinite(self) -> int:
        """Non-finite entries of the accumulated values now."""
        return sum(slot.acc.nonfinite for slot in self._slots)

    @property
    def numel(self) -> int:
        """Elements accumulated (all hooked parameters)."""
        return sum(slot.param.numel() for slot in self._slots)

    @property
    def bytes_per_element(self) -> float:
        """Nominal buffer memory per element (:attr:`Accumulator.bytes_per_element`), averaged over elements."""
        total = sum(slot.acc.bytes_per_element * slot.param.numel() for slot in self._slots)
        return total / self.numel if self.numel else 0.0

    @property
    def accumulators(self) -> tuple[Accumulator, ...]:
        """The per-parameter buffers, in parameter order (for metrics; do not add to them)."""
        return tuple(slot.acc for slot in self._slots)

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
