"""precision_lab: how much rounding error does gradient accumulation really introduce?

The public surface (see ``shared/DESIGN.md``)::

    fmt = get_format("bf16")
    y = round_nearest(x, "bf16"); y = round_stochastic(x, "fp16", generator=g)
    acc = Accumulator("kahan", "bf16", shape); acc.add(t); acc.value(); acc.lost_updates
"""

from precision_lab.accumulators import STRATEGIES, Accumulator
from precision_lab.formats import FORMAT_NAMES, Format, get_format
from precision_lab.rounding import round_nearest, round_stochastic, round_toward_zero

__all__ = [
    "FORMAT_NAMES",
    "STRATEGIES",
    "Accumulator",
    "Format",
    "get_format",
    "round_nearest",
    "round_stochastic",
    "round_toward_zero",
]
__version__ = "0.1.0"
