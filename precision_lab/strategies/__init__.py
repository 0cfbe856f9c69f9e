"""Accumulation strategies, one unit each, and the registry that names them.

A strategy is a small class (a :class:`Strategy`) that holds the state one buffer of it needs, in
the arrays of one format, and knows how to fold an addend into it and how to read it out.
:class:`~precision_lab.accumulators.Accumulator` (and through it
:class:`~precision_lab.training.GradientAccumulator`) looks the unit up by name with
:func:`get_strategy` and delegates to it; it rounds the addend to the buffer format first and keeps
the counters.  The built-in units, one module each (the numerical explanation lives there):

==============  =============================  ==========================================
module          unit (its state)               pure kernels
==============  =============================  ==========================================
``naive``       ``Naive`` (``sum``)            ``naive_step``
``kahan``       ``Kahan`` (``sum``,            ``kahan_step``
                ``compensation``)
``neumaier``    ``Neumaier`` (``sum``,         ``neumaier_step``
                ``compensation``)
``stochastic``  ``Stochastic`` (``sum``)       ``stochastic_step``
``pairwise``    ``Pairwise`` (``slots``)       ``pairwise_step``, ``pairwise_total``
``exact``       ``Exact`` (``digits``)         ``exact_step``
==============  =============================  ==========================================

and :mod:`~precision_lab.strategies.arithmetic`, the format arithmetic they share.

Adding a strategy is one new unit: subclass :class:`Strategy`, give it a ``name``, implement
``add`` and ``value`` (and whatever else differs from the defaults), and decorate it with
:func:`register_strategy`; ``Accumulator(name, ...)`` and ``GradientAccumulator(..., strategy=name)``
then use it unchanged.

Lost updates (stagnation) are defined once, by :func:`absorbed`: an element-add is lost when it
left a stored number unchanged although the addend was finite and nonzero and the stored number
finite.  Every unit counts with it (the compiled bf16 kernels of :mod:`precision_lab._native`
count the same elements).
"""

from __future__ import annotations

import abc
from typing import ClassVar, TypeVar

import torch

from precision_lab.formats import Format
from precision_lab.rounding import round_nearest
from precision_lab.strategies.arithmetic import work_dtype

__all__ = [
    "BUILTIN_STRATEGIES",
    "Exact",
    "Kahan",
    "Naive",
    "Neumaier",
    "Pairwise",
    "Stochastic",
    "Strategy",
    "absorbed",
    "count_absorbed",
    "get_strategy",
    "register_strategy",
    "strategy_names",
    "unregister_strategy",
]


# --------------------------------------------------------------------------------------------------
# lost updates
# --------------------------------------------------------------------------------------------------
def absorbed(new: torch.Tensor, old: torch.Tensor, addend: torch.Tensor) -> torch.Tensor:
    """Elements where adding ``addend`` to ``old`` gave ``new == old``: the addend was absorbed.

    Only finite nonzero addends into a finite stored number count (adding 0 changes nothing by
    design; a non-finite addend or buffer is counted elsewhere).  Numbers compare as numbers:
    -0 == +0, and a NaN ``new`` never equals ``old``.

    Args:
        new: The stored number after the add.
        old: The stored number before it.
        addend: What was added (rounded to the format), broadcastable to ``old``.

    Returns:
        A bool mask of the lost element-adds.
    """
    return (new == old) & (addend != 0) & torch.isfinite(addend) & torch.isfinite(old)


def count_absorbed(new: torch.Tensor, old: torch.Tensor, addend: torch.Tensor) -> int:
    """The number of lost element-adds, ``int(absorbed(new, old, addend).sum())``."""
    return int(absorbed(new, old, addend).sum())


# --------------------------------------------------------------------------------------------------
# the unit
# --------------------------------------------------------------------------------------------------
class Strategy(abc.ABC):
    """The state and arithmetic of one strategy for one buffer (one format, shape and device).

    The :class:`~precision_lab.accumulators.Accumulator` creates a unit on construction and on every
    ``reset()``, hands :meth:`add` its addends already rounded to the format (round to nearest) and
    converted to :meth:`storage_dtype`, and reads the value out through the unit.

    Args:
        fmt: The buffer format.
        shape: Shape of the accumulated tensor.
        dtype: The storage dtype, ``storage_dtype(fmt)``.
        device: Where the state lives (a concrete device, e.g. ``cuda:0``).

    Attributes:
        name: The registry key (class attribute).
        needs_generator: Whether :meth:`add` draws random bits from its ``generator`` (class
            attribute); ``GradientAccumulator`` then insists on a seeded generator.
    """

    name: ClassVar[str] = ""
    needs_generator: ClassVar[bool] = False

    def __init__(self, fmt: Format, shape: torch.Size, *, dtype: torch.dtype, device: torch.device) -> None:
        self.format = fmt
        self.shape = shape
        self.dtype = dtype
        self.device = device

    @classmethod
    def storage_dtype(cls, fmt: Format) -> torch.dtype:
        """The dtype of the stored arrays and of the addends: the format's work dtype.

        Raises:
            ValueError: Where the format cannot be emulated (see
                :func:`~precision_lab.strategies.arithmetic.work_dtype`).
        """
        return work_dtype(fmt)

    def zeros(self) -> torch.Tensor:
        """A new zero array of the buffer's shape, storage dtype and device."""
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device)

    # -- what every unit implements ---------------------------------------------------------------
    @abc.abstractmethod
    def add(self, t: torch.Tensor, *, generator: torch.Generator | None, count_lost: bool) -> int:
        """Fold the addend ``t`` (format numbers in the storage dtype) into the state.

        Args:
            t: The addend, of the buffer's shape, dtype and device.
            generator: The source of random bits (torch's default generator when ``None``); only
                units with ``needs_generator`` draw from it.
            count_lost: Whether to count the lost element-adds (see :func:`absorbed`).

        Returns:
            The lost element-adds of this add (0 when not counted).
        """

    @abc.abstractmethod
    def value(self) -> torch.Tensor:
        """The value the state represents, as a new float64 tensor."""

    # -- defaults ---------------------------------------------------------------------------------
    def raw_sum(self) -> torch.Tensor:
        """The running sum alone (no compensation, no cascade merge), as a new float64 tensor."""
        return self.value()

    def scaled_value(self, factor: float) -> torch.Tensor:
        """The value after ``buffer *= factor`` in the format, as float64 (``factor`` finite, not 1).

        By default the read-out is multiplied in fp64 and rounded to the format (RN); units that
        store several numbers per element scale each of them (see the Accumulator's method).
        """
        return self.round_to_format(self.value() * factor)

    def round_to_format(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (float64) rounded to the buffer format with round to nearest, still float64."""
        return round_nearest(x, self.format)

    @property
    def arrays(self) -> int:
        """Number of format-sized arrays the unit keeps."""
        return 1

    @property
    def bytes_per_element(self) -> float:
        """Nominal memory per accumulated element in the buffer format."""
        return self.arrays * self.format.bits / 8

    @property
    def storage_arrays(self) -> int:
        """Number of arrays of the storage dtype this emulation holds."""
        return self.arrays

    @property
    def storage_bytes_per_element(self) -> float:
        """Memory per element this emulation actually uses."""
        return self.storage_arrays * self.dtype.itemsize


# --------------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Strategy]] = {}
_StrategyClass = TypeVar("_StrategyClass", bound=type[Strategy])


def register_strategy(cls: _StrategyClass) -> _StrategyClass:
    """Register a :class:`Strategy` subclass under its ``name``; usable as a class decorator.

    Args:
        cls: The unit class; its ``name`` must be a nonempty string not registered yet.

    Returns:
        ``cls`` itself.

    Raises:
        ValueError: If ``cls`` is not a Strategy subclass, has no name, or the name is taken.
    """
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ValueError(f"register_strategy takes a Strategy subclass, got {cls!r}")
    name = cls.name
    if not (isinstance(name, str) and name):
        raise ValueError(f"strategy class {cls.__qualname__} needs a nonempty string 'name', got {name!r}")
    if name in _REGISTRY:
        other = _REGISTRY[name]
        raise ValueError(f"strategy {name!r} is already registered ({other.__module__}.{other.__qualname__})")
    _REGISTRY[name] = cls
    return cls


def unregister_strategy(name: str) -> None:
    """Remove a registered strategy (built-in strategies cannot be removed).

    Raises:
        ValueError: If ``name`` is built in or not registered.
    """
    if name in BUILTIN_STRATEGIES:
        raise ValueError(f"strategy {name!r} is built in and cannot be unregistered")
    if name not in _REGISTRY:
        raise ValueError(f"strategy {name!r} is not registered; registered: {', '.join(_REGISTRY)}")
    del _REGISTRY[name]


def get_strategy(name: str) -> type[Strategy]:
    """The unit class registered as ``name``.

    Raises:
        ValueError: For an unknown name, listing the registered ones.
    """
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(_REGISTRY)}")
    return cls


def strategy_names() -> tuple[str, ...]:
    """Names of the registered strategies, built-in ones first, in registration order."""
    return tuple(_REGISTRY)


# The built-in units (their modules import the names above, so this comes last), registered in this order.
from precision_lab.strategies.exact import Exact  # noqa: E402
from precision_lab.strategies.kahan import Kahan  # noqa: E402
from precision_lab.strategies.naive import Naive  # noqa: E402
from precision_lab.strategies.neumaier import Neumaier  # noqa: E402
from precision_lab.strategies.pairwise import Pairwise  # noqa: E402
from precision_lab.strategies.stochastic import Stochastic  # noqa: E402

for _unit in (Naive, Kahan, Neumaier, Stochastic, Pairwise, Exact):
    register_strategy(_unit)
#: The built-in strategies: ``("naive", "kahan", "neumaier", "stochastic", "pairwise", "exact")``.
BUILTIN_STRATEGIES: tuple[str, ...] = strategy_names()
