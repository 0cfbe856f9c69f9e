"""Speed of the roundings on CPU, against torch's plain fp32 -> bf16 cast measured in the same process.

Usage::

    python benchmarks/bench_rounding.py [--n 16777216] [--threads 2] [--repeat 10]

Prints a markdown table: median wall time of ``--repeat`` calls (after two warm-up calls), giga
elements per second, and the ratio to the baseline ``buf.copy_(x)`` (fp32 -> bf16 cast into a
preallocated buffer; timed first and again last, the faster median is the reference).  The targets of the compiled fp32 -> bf16 stochastic rounding (see
``precision_lab/_native.py``) are checked at the end: at least 10x faster than torchao's
``_fp32_to_bf16_sr`` (torch.randint + torch.where) and at most 4x the plain cast.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable

import torch
from _common import parse_args, ratio_table, torch_path

import precision_lab as pl


def load_torchao_sr() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Import torchao's fp32 -> bf16 stochastic rounding (None if absent), silencing its load messages."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stderr(io.StringIO()),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            from torchao.optim.quant_utils import _fp32_to_bf16_sr
    except Exception:  # noqa: BLE001 (any failure to import an optional baseline just drops its row)
        return None
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return _fp32_to_bf16_sr


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeat=10)
    torch.set_num_threads(args.threads)
    n = args.n

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-20, 20, (n,), generator=g).float())
    x64 = x.double()
    bf16 = torch.empty(n, dtype=torch.bfloat16)
    fp16 = torch.empty(n, dtype=torch.float16)
    fp8 = torch.empty(n, dtype=torch.float8_e4m3fn)
    fp32 = torch.empty(n, dtype=torch.float32)
    torchao_sr = load_torchao_sr()

    def sr_native() -> None:
        pl.round_stochastic(x, "bf16", generator=g, out=bf16)

    def sr_torch() -> None:
        with torch_path():
            pl.round_stochastic(x, "bf16", generator=g, out=bf16)

    rows: list[tuple[str, Callable[[], object]]] = [
        ("`buf.copy_(x)` fp32 -> bf16 cast (baseline)", lambda: bf16.copy_(x)),
        ("`round_stochastic(x, 'bf16', out=buf)` (compiled)", sr_native),
        ("`round_stochastic(x, 'bf16', out=buf)` (torch fallback)", sr_torch),
        (
            "`torch.randint(0, 2**16, (n,), int32)` alone",
            lambda: torch.randint(0, 1 << 16, (n,), dtype=torch.int32, generator=g),
        ),
    ]
    if torchao_sr is not None:
        rows.append(("torchao `_fp32_to_bf16_sr(x)`", lambda: torchao_sr(x)))
    rows += [
        ("`round_nearest(x, 'bf16', out=buf)`", lambda: pl.round_nearest(x, "bf16", out=bf16)),
        ("`round_nearest(x, 'fp16', out=buf)`", lambda: pl.round_nearest(x, "fp16", out=fp16)),
        ("`round_nearest(x, 'fp8_e5m2')` (fp32 out)", lambda: pl.round_nearest(x, "fp8_e5m2", out=fp32)),
        ("`round_nearest(x, 'fp8_e4m3', out=buf)`", lambda: pl.round_nearest(x, "fp8_e4m3", out=fp8)),
        ("`round_nearest(x, 'tf32')` (generic fp64 path)", lambda: pl.round_nearest(x, "tf32", out=fp32)),
        (
            "`round_stochastic(x64, 'bf16', out=buf)` (generic)",
            lambda: pl.round_stochastic(x64, "bf16", generator=g, out=bf16),
        ),
        ("`round_toward_zero(x, 'bf16', out=buf)` (generic)", lambda: pl.round_toward_zero(x, "bf16", out=bf16)),
    ]

    times, base = ratio_table("bench_rounding", rows, n, args.repeat, args.threads)

    sr = times[rows[1][0]]
    print("\nTargets (compiled fp32 -> bf16 stochastic rounding):")
    if torchao_sr is not None:
        speedup = times["torchao `_fp32_to_bf16_sr(x)`"] / sr
        print(f"- >= 10x faster than torchao: {speedup:.1f}x -> {'met' if speedup >= 10 else 'NOT met'}")
    else:
        print("- >= 10x faster than torchao: torchao not importable, not measured")
    print(f"- <= 4x the plain cast: {sr / base:.2f}x -> {'met' if sr / base <= 4 else 'NOT met'}")


if __name__ == "__main__":
    main()
