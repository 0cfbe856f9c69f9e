"""precision_lab: how much rounding error does gradient accumulation really introduce?

The public surface (design notes: ``docs/design.md`` in the repository)::

    fmt = get_format("bf16")
    y = round_nearest(x, "bf16"); y = round_stochastic(x, "fp16", generator=g)
    acc = Accumulator("kahan", "bf16", shape); acc.add(t); acc.value(); acc.lost_updates
    eng = GradientEngine(model, loss_fn, "bf16"); eng.micro_gradients(x, y, n_micro=16)
    reference_gradient(model, loss_fn, x, y)  # fp64, whole batch
    acc = GradientAccumulator(model.parameters(), strategy="kahan", fmt="bf16")  # in a training loop
"""

from precision_lab.accumulators import STRATEGIES, Accumulator
from precision_lab.formats import FORMAT_NAMES, Format, get_format
from precision_lab.gradients import COMPUTE_FORMATS, GradientEngine, reference_gradient
from precision_lab.rounding import round_nearest, round_stochastic, round_toward_zero
from precision_lab.training import GradientAccumulator

__all__ = [
    "COMPUTE_FORMATS",
    "FORMAT_NAMES",
    "STRATEGIES",
    "Accumulator",
    "Format",
    "GradientAccumulator",
    "GradientEngine",
    "get_format",
    "reference_gradient",
    "round_nearest",
    "round_stochastic",
    "round_toward_zero",
]
__version__ = "0.1.0"
