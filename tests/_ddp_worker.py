"""One rank of the GradientAccumulator DDP test (started twice by tests/test_training.py).

Usage: ``python tests/_ddp_worker.py RANK WORLD RENDEZVOUS_FILE OUT_DIR N B`` (the repository root on
``PYTHONPATH``).  Every rank builds the
same models and the same global data (2*N micro-batches of B samples); rank r takes micro-batches
[rN, (r+1)N).  Results go to ``OUT_DIR/rank{RANK}.pt`` (a dict of tensors, counts and messages).
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from experiments.ddp import leave_process_group
from precision_lab.training import GradientAccumulator

IN, HIDDEN, OUT = 6, 8, 3


def make_model(seed: int, dtype: torch.dtype) -> nn.Module:
    """A small MLP whose weights come from a seeded generator (no global RNG)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return model.to(dtype)


def make_data(seed: int, n_micro: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_micro, b, IN) inputs and (n_micro, b) class labels, fp64, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_micro, b, IN, generator=g, dtype=torch.float64), torch.randint(
        0, OUT, (n_micro, b), generator=g
    )


def _counting(calls: list[int]):  # noqa: ANN202 - DDP inspects the hook's signature, not its annotations
    def hook(state, bucket):  # noqa: ANN001, ANN202
        calls[0] += 1
        return default_hooks.allreduce_hook(state, bucket)  # divides by the world size, then all-reduces

    return hook


def window(
    ddp: DDP,
    xs: torch.Tensor,
    ys: torch.Tensor,
    rank: int,
    n: int,
    *,
    last_synced: bool = True,
    calls: list[int] | None = None,
) -> list[int]:
    """The standard pattern: micro-steps 1..N-1 inside no_sync, the last one outside; all-reduce counts after each."""
    seen = []
    dtype = next(ddp.parameters()).dtype
    for i in range(n):
        sync = last_synced and i == n - 1
        with contextlib.nullcontext() if sync else ddp.no_sync():
            x, y = xs[rank * n + i].to(dtype), ys[rank * n + i]
            (nn.functional.cross_entropy(ddp(x), y) / n).backward()  # DDP then averages over ranks
        seen.append(calls[0] if calls is not None else 0)
    return seen


def _misuse(xs: torch.Tensor, ys: torch.Tensor, rank: int, n: int, *, pass_ddp: bool, last_synced: bool) -> str:
    """Run one window the wrong way; return write_grads()'s error message ("no error" if none)."""
    model = make_model(0, torch.float64)
    ddp = DDP(model)
    acc = GradientAccumulator(model.parameters(), "exact", ddp=ddp if pass_ddp else None)
    window(ddp, xs, ys, rank, n, last_synced=last_synced)
    try:
        acc.write_grads()
        message = "no error"
    except RuntimeError as e:
        message = str(e)
    acc.remove(discard=True)
    return message


def main() -> None:
    rank, world, rendezvous, out_dir, n, b = sys.argv[1:7]
    rank, world, n, b = int(rank), int(world), int(n), int(b)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    xs, ys = make_data(1, world * n, b)
    out: dict = {}

    # 1. fp64 model, exact buffers: the all-reduced mean of each rank's accumulated sum; count all-reduces.
    for bucket_view in (False, True):
        model = make_model(0, torch.float64)
        ddp = DDP(model, gradient_as_bucket_view=bucket_view)
        calls = [0]
        ddp.register_comm_hook(None, _counting(calls))
        acc = GradientAccumulator(model.named_parameters(), "exact", ddp=ddp)
        out[f"calls_bv{int(bucket_view)}"] = window(ddp, xs, ys, rank, n, calls=calls)
        out[f"stats_bv{int(bucket_view)}"] = acc.write_grads()
        out[f"exact_bv{int(bucket_view)}"] = [p.grad.clone() for p in model.parameters()]
        acc.remove()

    # 2. fp32 model: naive, fmt=None with ddp= against plain DDP accumulation (no accumulator).
    plain = make_model(0, torch.float32)
    ddp_plain = DDP(plain)
    window(ddp_plain, xs, ys, rank, n)
    out["plain_fp32"] = [p.grad.clone() for p in plain.parameters()]
    model = make_model(0, torch.float32)
    ddp = DDP(model)
    with GradientAccumulator(model.parameters(), "naive", ddp=ddp) as acc:
        window(ddp, xs, ys, rank, n)
        acc.write_grads()
    out["naive_fp32"] = [p.grad.clone() for p in model.parameters()]

    # 3. misuse: DDP model without ddp=: DDP all-reduces the None we left (zeros) into p.grad.
    out["without_ddp_arg"] = _misuse(xs, ys, rank, n, pass_ddp=False, last_synced=True)
    # 4. misuse: ddp= given, but every micro-step inside no_sync: nothing was all-reduced.
    out["never_synced"] = _misuse(xs, ys, rank, n, pass_ddp=True, last_synced=False)

    # 5. scale= with ddp: applied to the all-reduced p.grad (a power of two: exact).
    model = make_model(0, torch.float64)
    ddp = DDP(model)
    with GradientAccumulator(model.parameters(), "exact", ddp=ddp) as acc:
        window(ddp, xs, ys, rank, n)
        acc.write_grads(scale=0.5)
    out["exact_half"] = [p.grad.clone() for p in model.parameters()]

    # 6. misuse: no no_sync at all (DDP all-reduces every micro-step): refused at the second backward.
    model = make_model(0, torch.float64)
    ddp = DDP(model)
    acc = GradientAccumulator(model.parameters(), "exact", ddp=ddp)
    try:
        for i in range(2):
            (nn.functional.cross_entropy(ddp(xs[rank * n + i]), ys[rank * n + i]) / n).backward()
        out["every_step_sync"] = "no error"
    except RuntimeError as e:
        out["every_step_sync"] = str(e)
    acc.remove(discard=True)

    torch.save(out, f"{out_dir}/rank{rank}.pt")
    leave_process_group(rank, world, rendezvous)  # barrier, destroy, then exit before gloo's teardown


if __name__ == "__main__":
    main()
