"""One argument checker for the whole project: integers, reals, probabilities, choices and formats.

Each check returns the value (as ``int``/``float``/:class:`~precision_lab.formats.Format`) or raises a
``ValueError`` that names the argument and shows the bad value, so that every layer (library,
experiments' configs, command line) words the same mistake the same way.  ``bool`` is never an
integer or a real number here, although Python says it is one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

from precision_lab.formats import Format, get_format

__all__ = [
    "check_choice",
    "check_choices",
    "check_format",
    "check_int",
    "check_ints",
    "check_probability",
    "check_real",
]


def check_int(value: object, name: str, *, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]`` (either end may be None: unbounded)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
        if maximum is None:
            want = "an integer" if minimum is None else f"an integer >= {minimum}"
        elif minimum is None:
            want = f"an integer <= {maximum}"
        else:
            want = f"an integer in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return int(value)


def check_ints(values: object, name: str, *, minimum: int | None = 1, maximum: int | None = None) -> tuple[int, ...]:
    """A non-empty collection of integers, each as :func:`check_int` (the message shows all of them)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be a non-empty collection of integers, got {values!r}")
    items = tuple(values)
    try:
        if not items:
            raise ValueError
        return tuple(check_int(v, name, minimum=minimum, maximum=maximum) for v in items)
    except ValueError:
        low = "" if minimum is None else f" >= {minimum}"
        high = "" if maximum is None else f" <= {maximum}"
        raise ValueError(f"{name} must be integers{low}{high}, got {values!r}") from None


def check_real(
    value: object,
    name: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float in the interval from ``low`` to ``high``; open ends exclude the bound.

    NaN is never in range; an infinite value only where an end is infinite and closed.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        v = float(value)
        ok = (low < v if low_open else low <= v) and (v < high if high_open else v <= high)
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name} must be a real number in {left}{low:g}, {high:g}{right}, got {value!r}")
    return float(value)


def check_probability(value: object, name: str, *, closed: bool = False) -> float:
    """A probability in (0, 1), or in [0, 1] with ``closed=True``."""
    return check_real(value, name, low=0.0, high=1.0, low_open=not closed, high_open=not closed)


def check_choice(value: object, name: str, allowed: Iterable[str]) -> str:
    """``value`` if it is one of ``allowed``; the message lists them."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; known: {', '.join(allowed)}")
    return value


def check_choices(values: object, name: str, allowed: Iterable[str], *, empty: bool = False) -> tuple[str, ...]:
    """A tuple of distinct members of ``allowed`` (non-empty unless ``empty``)."""
    if not isinstance(values, tuple) or len(set(values)) != len(values) or (not values and not empty):
        raise ValueError(f"{name} must be a{'' if empty else ' non-empty'} tuple without repeats, got {values!r}")
    return tuple(check_choice(v, name[:-1] if name.endswith("s") else name, allowed) for v in values)


def check_format(fmt: object) -> Format:
    """The :class:`Format` named by ``fmt``; ValueError names the bad value and the known formats."""
    if not isinstance(fmt, (str, Format)):
        raise ValueError(f"a format must be a name such as 'bf16' or a Format, got {fmt!r}")
    return get_format(fmt)
