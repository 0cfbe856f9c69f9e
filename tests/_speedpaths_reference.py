"""The per-parameter GradientAccumulator as it was before the flat buffers: the oracle of the speed paths.

One :class:`~precision_lab.accumulators.Accumulator` per parameter, fed by a post-accumulate-grad
hook in hook order, read out through fp64 and ``round_nearest`` -- the algorithm
``precision_lab.training`` ran until the flat buffers, fused kernels and staging replaced it, kept
here verbatim (less its argument checks) so that tests/test_training_speedpaths.py and the DDP
worker can compare every new path with it bit for bit.
"""

from __future__ import annotations

import torch

from precision_lab.accumulators import Accumulator
from precision_lab.formats import get_format
from precision_lab.rounding import round_nearest


class ReferenceAccumulator:
    """``GradientAccumulator(params, strategy, fmt, generator=..., ddp=...)`` of the old, per-parameter design."""

    def __init__(self, params, strategy="naive", fmt=None, *, generator=None, count_lost=True, ddp=None) -> None:  # noqa: ANN001
        self.params = [p for p in params if p.requires_grad]
        self.ddp = ddp
        self.sync_armed = False
        self.synced = [False] * len(self.params)
        self.accs = [
            Accumulator(
                strategy,
                get_format(p.dtype) if fmt is None else fmt,
                p.shape,
                device=p.device,
                generator=generator,
                count_lost=count_lost,
            )
            for p in self.params
        ]
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(k)) for k, p in enumerate(self.params)]
        if ddp is not None:
            self.handles.append(ddp.register_forward_hook(self._on_forward))

    def _on_forward(self, module, args, output) -> None:  # noqa: ANN001
        self.sync_armed = torch.is_grad_enabled() and bool(module.require_backward_grad_sync)

    def _grad(self, k: int, value: torch.Tensor) -> torch.Tensor:
        p = self.params[k]
        g = round_nearest(value, get_format(p.dtype)).to(p.dtype)
        return torch.empty_like(p).copy_(g) if g.stride() != p.stride() else g

    def _hook(self, k: int):  # noqa: ANN202
        def hook(p: torch.Tensor) -> None:
            self.accs[k].add(p.grad)
            if self.ddp is not None and self.sync_armed:
                p.grad = self._grad(k, self.accs[k].value())
                self.synced[k] = True
            else:
                p.grad = None

        return hook

    def write_grads(self, scale: float | None = None) -> None:
        for k, (p, acc) in enumerate(zip(self.params, self.accs, strict=True)):
            if acc.count == 0:
                continue
            if self.ddp is not None:
                if scale is not None:
                    p.grad = self._grad(k, p.grad.to(torch.float64) * scale)
            else:
                p.grad = self._grad(k, acc.value() if scale is None else acc.scaled_value(scale))
        for acc in self.accs:
            acc.reset()
        self.synced = [False] * len(self.params)
        self.sync_armed = False

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
