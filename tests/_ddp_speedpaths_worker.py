"""One rank of the flat-buffer DDP test (started twice by tests/test_training_speedpaths.py).

Usage: ``python tests/_ddp_speedpaths_worker.py RANK WORLD RENDEZVOUS_FILE OUT_DIR``.  For each case a
GradientAccumulator and the per-parameter reference (tests/_speedpaths_reference.py) accumulate the
same N = 3 micro-batches on two DDP copies of one model (no_sync on the first two); rank r takes
micro-batches [3r, 3r + 3).  ``OUT_DIR/rank{RANK}.pt`` maps each case to (gradients, the reference's
gradients, all-reduce count after each micro-step).
"""

from __future__ import annotations

import contextlib
import copy
import sys

import torch
import torch.distributed as dist
from _speedpaths_reference import ReferenceAccumulator
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from precision_lab.training import GradientAccumulator

CASES = {  # name: (parameter dtype, strategy, buffer format, scale, DDP's gradient_as_bucket_view)
    "naive own fp32": (torch.float32, "naive", None, None, False),
    "naive own bf16, bucket view": (torch.bfloat16, "naive", None, None, True),
    "kahan bf16 on fp32": (torch.float32, "kahan", "bf16", None, False),
    "kahan bf16 on fp32, scale, bucket view": (torch.float32, "kahan", "bf16", 0.5, True),
    "fp32 buffer on bf16": (torch.bfloat16, "naive", "fp32", None, False),
    "stochastic bf16 on fp32": (torch.float32, "stochastic", "bf16", None, False),
    "stochastic bf16 on bf16": (torch.bfloat16, "stochastic", "bf16", None, False),
    "kahan fp16 on fp32": (torch.float32, "kahan", "fp16", None, False),
}


def make_model(dtype: torch.dtype) -> nn.Module:
    """Small parameters and a 128 x 128 weight (the compiled kernels' size), from a seeded generator."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.to(dtype)


def _counting(calls: list[int]):  # noqa: ANN202 - DDP inspects the hook's signature
    def hook(state, bucket):  # noqa: ANN001, ANN202
        calls[0] += 1
        return default_hooks.allreduce_hook(state, bucket)

    return hook


def main() -> None:
    rank, world, rendezvous, out_dir = sys.argv[1:5]
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    n = 3
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(world * n, 4, 6, generator=g)
    ys = torch.randint(0, 3, (world * n, 4), generator=g)
    out = {}
    for case, (dtype, strategy, fmt, scale, bucket_view) in CASES.items():
        base = make_model(dtype)
        grads = []
        seen = []
        for reference in (False, True):
            model = copy.deepcopy(base)
            ddp = DDP(model, bucket_cap_mb=1, gradient_as_bucket_view=bucket_view)
            calls = [0]
            ddp.register_comm_hook(None, _counting(calls))
            gen = torch.Generator().manual_seed(2 + rank)
            kind = ReferenceAccumulator if reference else GradientAccumulator
            acc = kind(model.parameters(), strategy, fmt, generator=gen, ddp=ddp)
            counts = []
            for i in range(n):
                with contextlib.nullcontext() if i == n - 1 else ddp.no_sync():
                    x, y = xs[rank * n + i].to(dtype), ys[rank * n + i]
                    (nn.functional.cross_entropy(ddp(x).float(), y) / n).backward()
                counts.append(calls[0])
            acc.write_grads(scale)
            acc.remove()
            grads.append([p.grad.clone() for p in model.parameters()])
            seen.append([min(c, 1) for c in counts])  # buckets all-reduce together on the last step
        assert seen[0] == seen[1], (case, seen)
        out[case] = (grads[0], grads[1], seen[0])
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
