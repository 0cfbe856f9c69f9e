"""Accumulation buffers: the strategies that sum micro-batch gradients in a given format.

An :class:`Accumulator` is a stateful shell (optimi style) over one strategy *unit*: a small class of
:mod:`precision_lab.strategies`, one module per strategy, that holds the buffer's state and wraps
the strategy's pure kernel.  Every ``add(t)`` first rounds ``t`` to the buffer format with
round-to-nearest (the gradient arrives as a ``p.grad`` of that format would), then the unit folds
it into the buffer:

=============  ================================================================================
``naive``      ``s <- RN(s + t)``: what ``p.grad += g`` does in the buffer's dtype.
``kahan``      compensated summation with ``s`` *and* the compensation ``c`` stored in the format:
               ``y = RN(t - c); u = RN(s + y); c = RN(RN(u - s) - y); s = u``.
``neumaier``   Neumaier's (Kahan-Babuška) variant, ``s`` and ``c`` in the format: ``u = RN(s + t)``;
               ``d = RN(RN(s - u) + t)`` if ``|s| >= |t|`` else ``RN(RN(t - u) + s)``;
               ``c = RN(c + d); s = u``; read-out ``s + c`` (``c`` holds the lost parts, not negated).
``stochastic`` ``s <- SR(s + t)`` where the random decision sees the *exact* ``s + t`` (an
               error-free pair ``hi + lo``), so an addend far below the buffer's ulp still moves it
               with the right probability (see ``strategies.stochastic``).
``pairwise``   a binary-counter cascade: slot k holds the RN sum of 2^k consecutive addends, so a
               sum of N addends is a balanced tree of depth ceil(log2 N) (Higham 2002, §4.2).
``exact``      a superaccumulator (int64 digits over the whole fp64 range) of the rounded inputs:
               the reference for every other strategy.  Exact for any finite fp64 stream; the
               read-out is the correctly rounded fp64 of the exact sum (see ``strategies.exact``).
=============  ================================================================================

Arithmetic in a format: natively where torch has the dtype (bf16/fp16 ops round once from fp32,
which is correct rounding for + and - because 24 >= 2p + 1 (Figueroa 1995, "When is double
rounding innocuous?")); otherwise in a *work* dtype of at least 2p + 1 bits covering the format's
range (fp32 for fp8, tf32 and custom formats up to 11 bits of precision, fp64 up to 26), followed by
:func:`~precision_lab.rounding.round_nearest` -- again innocuous double rounding
(:mod:`precision_lab.strategies.arithmetic`).  Each strategy's module explains its numerics; more
strategies can be registered (:func:`~precision_lab.strategies.register_strategy`) and are then
accepted by name here and by :class:`~precision_lab.training.GradientAccumulator`.

Bookkeeping: ``lost_updates`` counts element-adds that left the buffer unchanged although the
(rounded) addend was finite and nonzero and the buffer was finite (stagnation, defined once by
:func:`~precision_lab.strategies.absorbed`); ``nonfinite_inputs`` counts non-finite addend
elements, ``nonfinite`` the buffer's non-finite entries now.  ``bytes_per_element`` is the nominal memory of the strategy in the format (a bf16
Kahan buffer costs 4 bytes, like fp32), ``storage_bytes_per_element`` what this emulation uses.
"""

from __future__ import annotations

import math

import torch

from precision_lab import _native, _native_training
from precision_lab.checks import check_real
from precision_lab.formats import Format, get_format
from precision_lab.rounding import round_nearest
from precision_lab.strategies import BUILTIN_STRATEGIES, Strategy, get_strategy
from precision_lab.strategies.arithmetic import work_dtype
from precision_lab.strategies.exact import exact_step
from precision_lab.strategies.kahan import Kahan, kahan_step
from precision_lab.strategies.naive import Naive, naive_step
from precision_lab.strategies.pairwise import pairwise_step, pairwise_total
from precision_lab.strategies.stochastic import stochastic_step

__all__ = [
    "STRATEGIES",
    "Accumulator",
    # the pure kernels, re-exported from their strategies' modules
    "exact_step",
    "kahan_step",
    "naive_step",
    "pairwise_step",
    "pairwise_total",
    "stochastic_step",
    "work_dtype",
]

#: The built-in strategies; :func:`~precision_lab.strategies.strategy_names` adds any registered since.
STRATEGIES: tuple[str, ...] = BUILTIN_STRATEGIES


class Accumulator:
    """A gradient accumulation buffer of one strategy in one format.

    Args:
        strategy: One of :data:`STRATEGIES`, or a name registered with
            :func:`~precision_lab.strategies.register_strategy`.
        fmt: Buffer format (name, ``eXmY`` or :class:`~precision_lab.formats.Format`).
        shape: Shape of the accumulated tensor.
        device: Where the buffer lives; ``"cuda"`` without a GPU is a ``ValueError``.
        generator: Randomness of the ``stochastic`` strategy (torch's default generator if None).
        count_lost: Track :attr:`lost_updates` (costs a comparison per add where no fused kernel
            exists; the naive strategy without it is exactly ``s.add_(t)``).

    Example::

        acc = Accumulator("kahan", "bf16", (1000,))
        for g in micro_grads:
            acc.add(g)
        acc.value()  # float64
    """

    def __init__(
        self,
        strategy: str,
        fmt: str | Format,
        shape: tuple[int, ...] | torch.Size | int,
        *,
        device: str | torch.device = "cpu",
        generator: torch.Generator | None = None,
        count_lost: bool = True,
    ) -> None:
        self._unit_class = get_strategy(strategy)
        self.strategy = strategy
        self.format = get_format(fmt)
        self.shape = torch.Size((shape,) if isinstance(shape, int) else shape)
        if any(d < 0 for d in self.shape):
            raise ValueError(f"shape {tuple(self.shape)} has a negative dimension")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use 'cpu'")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {str(device)!r}; known: 'cpu', 'cuda'")
        self.dtype = self._unit_class.storage_dtype(self.format)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self.count_lost = count_lost
        self.reset()

    # -- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty the buffer and zero every counter."""
        device = torch.empty(0, device=self.device).device  # concrete: 'cuda' -> 'cuda:0'
        self._unit: Strategy = self._unit_class(self.format, self.shape, dtype=self.dtype, device=device)
        self.count = 0
        self.lost_updates = 0
        self.nonfinite_inputs = 0

    # Read-only views of the unit's state: tests/test_native.py reads _s and _c, and
    # tests/test_memory_pareto_experiment.py reads _slots.
    @property
    def _s(self) -> torch.Tensor:
        return self._unit.sum

    @property
    def _c(self) -> torch.Tensor:
        return self._unit.compensation

    @property
    def _slots(self) -> list[torch.Tensor | None]:
        return self._unit.slots

    @property
    def element_adds(self) -> int:
        """Number of element-additions so far (adds x elements)."""
        return self.count * self.shape.numel()

    @property
    def lost_update_fraction(self) -> float:
        """lost_updates / element_adds (0.0 before the first add)."""
        return self.lost_updates / self.element_adds if self.element_adds else 0.0

    @property
    def nonfinite(self) -> int:
        """Non-finite entries of the buffer's value now."""
        return int((~torch.isfinite(self.value())).sum())

    @property
    def arrays(self) -> int:
        """Number of format-sized arrays the strategy keeps.

        Pairwise: the slot positions allocated so far, floor(log2 n) + 1 after n adds. The peak
        number of partial sums alive at once is floor(log2(n + 1)), one less whenever n + 1 is not
        a power of two (n = 5: 3 positions, at most 2 alive).
        """
        return self._unit.arrays

    @property
    def bytes_per_element(self) -> float:
        """Nominal memory per accumulated element in the buffer format (exact: its int64 digits held)."""
        return self._unit.bytes_per_element

    @property
    def storage_bytes_per_element(self) -> float:
        """Memory per element this emulation actually uses."""
        return self._unit.storage_bytes_per_element

    # -- operations -----------------------------------------------------------------------------
    def _prepare(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` checked, rounded to the format (RN) and converted to the storage dtype."""
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"add expects a torch.Tensor, got {type(t).__name__}")
        if t.shape != self.shape:
            raise ValueError(f"add got shape {tuple(t.shape)}, the buffer has shape {tuple(self.shape)}")
        if t.device != self._unit.device:
            raise ValueError(f"add got a tensor on {t.device}, the buffer is on {self._unit.device}")
        if not t.is_floating_point():
            raise ValueError(f"add got dtype {t.dtype}; expected a floating-point tensor")
        if t.dtype == self.dtype and self.format.torch_dtype == t.dtype:
            return t  # already in the format
        if t.dtype == torch.float32 and self.dtype == torch.bfloat16:
            return t.to(torch.bfloat16)  # torch's cast is RN-even (checked against ml_dtypes)
        wide = t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float64)
        return round_nearest(wide, self.format).to(self.dtype)

    def add(self, t: torch.Tensor) -> None:
        """Round ``t`` to the buffer format (RN) and accumulate it with the strategy."""
        tr = self._prepare(t)
        fused = self._fused_step(tr)
        if fused is not None:  # the step and both counts in one pass
            lost, nonfinite = fused
        else:
            nonfinite = self._count_nonfinite_of(tr) if self._count_nonfinite else 0
            lost = self._unit.add(tr, generator=self.generator, count_lost=self.count_lost)
        if self._count_nonfinite:
            self.nonfinite_inputs += nonfinite
        self.lost_updates += lost
        self.count += 1

    # Counting non-finite addends: GradientAccumulator turns it off (its count_nonfinite) on its own
    # Accumulators; everyone else gets the count.
    _count_nonfinite = True

    def _fused_step(self, tr: torch.Tensor) -> tuple[int, int] | None:
        """The bf16 CPU Kahan step, or naive step with lost-update counting, fused with the count of non-finite addends.

        One compiled pass of :mod:`precision_lab._native_training` instead of the strategy's kernel
        plus a counting pass: the same bits and counts (Kahan's kernel counts lost updates whether
        asked or not, as ``kahan_step``'s compiled path does).  None where no such kernel applies.
        """
        if tr.dtype != torch.bfloat16 or tr.device.type != "cpu" or not _native_training.enabled(tr.numel()):
            return None
        unit = self._unit
        if type(unit) is Kahan:
            return _native_training.kahan_bf16(unit.sum, unit.compensation, tr, parallel=True)
        if type(unit) is Naive and self.count_lost:
            return _native_training.naive_bf16(unit.sum, tr, parallel=True)
        return None

    @staticmethod
    def _count_nonfinite_of(tr: torch.Tensor) -> int:
        """``int((~torch.isfinite(tr)).sum())``: one compiled pass for bf16 on CPU, two torch passes otherwise."""
        if tr.device.type == "cpu" and tr.dtype == torch.bfloat16 and _native.enabled(tr.numel()):
            return _native.count_nonfinite_bf16(tr)
        return int(_native_training.count_nonfinite(tr))

    def value(self) -> torch.Tensor:
        """The value the buffer represents, as float64.

        naive/stochastic: ``s``.  kahan: ``s - c`` (the compensated read-out, evaluated in fp64;
        use :meth:`raw_sum` for ``s`` alone, which is what an optimizer reading the bf16 buffer
        sees).  pairwise: the occupied slots merged in the format.  exact: ``s + c``.
        """
        return self._unit.value()

    def scaled_value(self, factor: float) -> torch.Tensor:
        """The value after ``buffer *= factor`` in the buffer format (``p.grad.div_(N)``), as float64.

        Each stored number is multiplied by ``factor`` and rounded to the format (RN): naive,
        stochastic and pairwise scale their read-out, kahan scales ``s`` and ``c`` separately,
        exact scales both fp64 halves.  The product is formed in fp64 and rounded once more to the
        format; for formats of at most 26 bits that double rounding is innocuous (53 >= 2p + 1).
        A power-of-two factor is exact unless the result underflows or overflows, which is the point:
        ``post`` scaling in fp16 can lose small sums to underflow just as ``pre`` scaling can.
        The buffer itself is not changed.
        """
        check_real(factor, "factor", low=-math.inf, low_open=True, high=math.inf, high_open=True)
        if factor == 1:
            return self.value()
        return self._unit.scaled_value(factor)

    def raw_sum(self) -> torch.Tensor:
        """The running sum ``s`` alone (no compensation, no cascade merge), as float64."""
        return self._unit.raw_sum()

    def __repr__(self) -> str:
        return (
            f"Accumulator({self.strategy!r}, {self.format.name!r}, shape={tuple(self.shape)}, "
            f"count={self.count}, lost_updates={self.lost_updates})"
        )
