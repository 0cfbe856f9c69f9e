"""Compiled CPU kernels (numba) for the accumulation steps of a training loop, with their counts fused in.

:class:`~precision_lab.training.GradientAccumulator` adds every micro-gradient of every parameter
to a buffer, and :class:`~precision_lab.accumulators.Accumulator` counts each add's non-finite
addends besides; done with torch ops or with :mod:`precision_lab._native`'s kernels plus a separate
count, that is two to six passes over memory per add.  Each kernel here is one pass that converts
the addend to the buffer format, adds it, and counts (lost updates and non-finite addends) on the
way, with **the same bits** as the torch code it replaces:

========================  ==========================================================================
``naive_bf16``            ``s.add_(t.to(bf16))`` for a bf16 ``s`` and a bf16 or fp32 ``t``
``kahan_bf16``            one Kahan step in bf16 on ``(s, c)`` (``strategies.kahan.kahan_step``) of
                          ``t.to(bf16)`` for a bf16 or fp32 ``t``
``widen_add_f32``         ``s.add_(t)`` for an fp32 ``s`` and a bf16 ``t`` (exact widening, one fp32
                          rounding): the fp32 buffer of a bf16 model, 10 bytes per element moved
========================  ==========================================================================

and, for the stochastic strategy, :func:`bind_sr_bf16`: ``_native.sr_add_bf16``'s own compiled kernel
bound to a buffer (its public wrapper costs several times the kernel on a small tensor).
:func:`bind` binds the kernels above to a buffer the same way (checks and array views made once),
:func:`count_nonfinite` counts Inf/NaN in two torch passes (``~torch.isfinite`` takes five).

Each kernel returns ``(lost, nonfinite)``: the element-adds that left the buffer unchanged although the
addend was finite and nonzero and the stored number finite (:func:`precision_lab.strategies.absorbed`;
for Kahan: neither ``s`` nor ``c`` moved), and the non-finite elements of the addend after its
conversion to the buffer format (an fp32 addend beyond bf16's range counts: it became Inf).

Numerics, as in :mod:`precision_lab._native`: a bf16 pattern h is the fp32 pattern ``h << 16``;
fp32 -> bf16 rounds to nearest even, ``(b + 0x7FFF + ((b >> 16) & 1)) >> 16``, which is torch's cast;
sums are formed in fp32 and rounded once, as torch's bf16 ``add``/``sub`` do.  A NaN result is
stored as the pattern torch's cast writes in this process (:func:`precision_lab._native.bf16_nan_bits`);
torch itself writes other NaN payloads in the scalar tails of its vectorised loops, so NaN results
are NaN on both paths but their payloads may differ.  Every non-NaN result is bit-identical.

The pure-torch functions of the same names (``torch_naive_bf16``, ...) give the same bits and
counts on any device; callers run them, or the strategies' torch code (the same bits), where numba
is missing, ``PRECISION_LAB_NATIVE=0``, the tensor is on another device, or it has fewer than
:data:`precision_lab._native.MIN_NUMEL` elements (the switch is :func:`enabled`, which is
``_native.enabled``).

Threads: each kernel has a serial and a parallel entry point (``parallel=``).  The parallel one
runs on numba's thread pool like :mod:`precision_lab._native`'s kernels, which is what a large
standalone ``Accumulator.add`` wants.  A training loop (``GradientAccumulator``) calls the serial
one for its many small steps: a parallel launch costs more than their work, and a parallel region
waits for every one of its threads, so where the cores are busy (other processes, torch's own
workers) one descheduled thread holds the region, and the micro-step, for a scheduler tick; large
steps it runs in parallel, on torch's thread count, as torch runs its own elementwise ops.  The
bits do not depend on the choice.
"""

from __future__ import annotations

import functools
import threading
from types import ModuleType, SimpleNamespace

import numpy as np
import torch

from precision_lab import _native, _random

__all__ = [
    "bind",
    "bind_sr_bf16",
    "count_nonfinite",
    "enabled",
    "kahan_bf16",
    "naive_bf16",
    "torch_kahan_bf16",
    "torch_naive_bf16",
    "torch_widen_add_f32",
    "widen_add_f32",
]

# fixed-width constants (numba freezes globals; mixing unsigned and Python ints promotes to float)
_B16 = np.uint32(16)
_ONE32 = np.uint32(1)
_RNE_BIAS = np.uint32(0x7FFF)
_HIGH16 = np.uint32(0xFFFF0000)
_ABS32 = np.uint32(0x7FFFFFFF)
_INF32 = np.uint32(0x7F800000)
_ABS16 = np.uint16(0x7FFF)
_INF16 = np.uint16(0x7F80)
_ZERO16 = np.uint16(0)
_ONE16 = np.uint16(1)
_FIN16M1 = np.uint16(0x7F7F)  # |t| - 1 below this: t finite and nonzero
_CHUNK = 32768  # elements per counting block: below 2^16, so the per-block counts fit a uint16
_prange = range


def enabled(numel: int | None = None) -> bool:
    """Whether the compiled kernels are used: :func:`precision_lab._native.enabled` (same switch, same size floor)."""
    return _native.enabled(numel)


# --------------------------------------------------------------------------------------------------
# element helpers (compiled by _kernels(); plain functions so that numba's cache finds them again)
# --------------------------------------------------------------------------------------------------
def _widen(h):  # bf16 bits -> the fp32 value (exact)
    return np.uint32(np.uint32(h) << _B16).view(np.float32)


def _isnan32(b):
    return (b & _ABS32) > _INF32


def _cast16(b, nan):  # fp32 bits -> bf16 bits, round to nearest even; NaN -> torch's pattern
    r = np.uint16((b + _RNE_BIAS + ((b >> _B16) & _ONE32)) >> _B16)
    return nan if _isnan32(b) else r


def _to_bf16(v, nan):  # fp32 value -> bf16 bits (RN-even, NaN -> torch's pattern)
    return _cast16(np.float32(v).view(np.uint32), nan)


def _rn32(v):  # fp32 value -> RN_bf16(v) as an fp32 value, without NaN fix-up (NaN stays NaN)
    b = np.float32(v).view(np.uint32)
    return np.uint32((b + _RNE_BIAS + ((b >> _B16) & _ONE32)) & _HIGH16).view(np.float32)


def _high16(v, nan):  # fp32 value holding a bf16 number -> its bf16 bits; NaN -> torch's pattern
    b = np.float32(v).view(np.uint32)
    return nan if _isnan32(b) else np.uint16(b >> _B16)


def _same(a, b):  # bf16 bits a == b as numbers (-0 == +0, NaN != NaN)
    return ((a == b) | (((a | b) & _ABS16) == _ZERO16)) & ((a & _ABS16) <= _INF16)


def _counts(t, old):  # t finite and nonzero (|t| - 1 < 0x7F7F, wrapping), old finite
    return (np.uint16((t & _ABS16) - _ONE16) < _FIN16M1) & ((old & _ABS16) < _INF16)


def _bad(t):  # bf16 bits t are Inf or NaN
    return (t & _INF16) == _INF16


def _naive_step(a, b, nan):  # -> (new s bits, lost, nonfinite) for bf16 bits s = a, t = b
    r = _to_bf16(_widen(a) + _widen(b), nan)
    return r, _same(r, a) & _counts(b, a), _bad(b)


def _kahan_step(a, ci, b, nan):  # -> (new s, new c, lost, nonfinite), as _native._kahan_add
    fa = _widen(a)
    y = _rn32(_widen(b) - _widen(ci))  # subtract the previous step's lost low part
    fu = _rn32(fa + y)
    u = _high16(fu, nan)
    nc = _high16(_rn32(_rn32(fu - fa) - y), nan)  # (u - s) - y: what the add lost, negated
    return u, nc, _same(u, a) & _same(nc, ci) & _counts(b, a), _bad(b)


# --------------------------------------------------------------------------------------------------
# block loops: elements [lo, hi) of one counting block; t16 holds bf16 bits, t32 fp32 bits
# --------------------------------------------------------------------------------------------------
def _naive16_block(s, t, lo, hi, nan, count):
    lost = np.uint16(0)
    bad = np.uint16(0)
    for i in range(np.uint64(lo), np.uint64(hi)):  # unsigned: no negative-index wraparound, so LLVM vectorises
        r, k, f = _naive_step(s[i], t[i], nan)
        s[i] = r
        if count:  # a loop-invariant flag: LLVM compiles the loop twice, without the counting too
            lost = np.uint16(lost + np.uint16(k))
            bad = np.uint16(bad + np.uint16(f))
    return np.int64(lost), np.int64(bad)


def _naive32_block(s, t, lo, hi, nan, count):
    lost = np.uint16(0)
    bad = np.uint16(0)
    for i in range(np.uint64(lo), np.uint64(hi)):  # unsigned: no negative-index wraparound, so LLVM vectorises
        r, k, f = _naive_step(s[i], _cast16(t[i], nan), nan)
        s[i] = r
        if count:  # a loop-invariant flag: LLVM compiles the loop twice, without the counting too
            lost = np.uint16(lost + np.uint16(k))
            bad = np.uint16(bad + np.uint16(f))
    return np.int64(lost), np.int64(bad)


def _kahan16_block(s, c, t, lo, hi, nan, count):
    lost = np.uint16(0)
    bad = np.uint16(0)
    for i in range(np.uint64(lo), np.uint64(hi)):  # unsigned: no negative-index wraparound, so LLVM vectorises
        u, nc, k, f = _kahan_step(s[i], c[i], t[i], nan)
        s[i] = u
        c[i] = nc
        if count:  # a loop-invariant flag: LLVM compiles the loop twice, without the counting too
            lost = np.uint16(lost + np.uint16(k))
            bad = np.uint16(bad + np.uint16(f))
    return np.int64(lost), np.int64(bad)


def _kahan32_block(s, c, t, lo, hi, nan, count):
    lost = np.uint16(0)
    bad = np.uint16(0)
    for i in range(np.uint64(lo), np.uint64(hi)):  # unsigned: no negative-index wraparound, so LLVM vectorises
        u, nc, k, f = _kahan_step(s[i], c[i], _cast16(t[i], nan), nan)
        s[i] = u
        c[i] = nc
        if count:  # a loop-invariant flag: LLVM compiles the loop twice, without the counting too
            lost = np.uint16(lost + np.uint16(k))
            bad = np.uint16(bad + np.uint16(f))
    return np.int64(lost), np.int64(bad)


def _widen_block(s, t, lo, hi, count):  # s: fp32 values, t: bf16 bits
    lost = np.uint16(0)
    bad = np.uint16(0)
    for i in range(np.uint64(lo), np.uint64(hi)):  # unsigned: no negative-index wraparound, so LLVM vectorises
        a = s[i]
        b = _widen(t[i])
        r = np.float32(a + b)
        s[i] = r
        if count:
            finite_b = np.isfinite(b)
            lost = np.uint16(lost + np.uint16((r == a) & (b != 0) & finite_b & np.isfinite(a)))
            bad = np.uint16(bad + np.uint16(not finite_b))
    return np.int64(lost), np.int64(bad)


# --------------------------------------------------------------------------------------------------
# entry points: the block loop over the whole array, serially (range) or on numba's pool (prange)
# --------------------------------------------------------------------------------------------------
def _naive16_ser(s, t, nan, count):
    lost = 0
    bad = 0
    for ch in range((s.size + _CHUNK - 1) // _CHUNK):
        k, f = _naive16_block(s, t, ch * _CHUNK, min(s.size, (ch + 1) * _CHUNK), nan, count)
        lost += k
        bad += f
    return lost, bad


def _naive16_par(s, t, nan, count):
    lost = 0
    bad = 0
    for ch in _prange((s.size + _CHUNK - 1) // _CHUNK):
        k, f = _naive16_block(s, t, ch * _CHUNK, min(s.size, (ch + 1) * _CHUNK), nan, count)
        lost += k
        bad += f
    return lost, bad


def _naive32_ser(s, t, nan, count):
    lost = 0
    bad = 0
    for ch in range((s.size + _CHUNK - 1) // _CHUNK):
        k, f = _naive32_block(s, t, ch * _CHUNK, min(s.size, (ch + 1) * _CHUNK), nan, count)
        lost += k
        bad += f
    return lost, bad


def _naive32_par(s, t, nan, count):
    lost = 0
    bad = 0
    for ch in _prange((s.size + _CHUNK - 1) // _CHUNK):
        k, f = _naive32_block(s, t, ch * _CHUNK, min(s.size, (ch + 1) * _CHUNK), nan, count)
        lost += k
        bad += f
    return lost, bad


def _kahan16_ser(s, c, t, nan, count):
    lost = 0
    bad = 0
    for ch in range((s.size + _CHUNK - 1) // _CHUNK):
        k, f = _kahan16_block(s, c, t, ch * _CHUNK, min(s.size, (ch + 1) * _CHUNK), nan, count)
        lost += k
        bad += f
    return lost, bad


def _kahan16_par(s, c, t, nan, count):
    lost = 0
    bad = 0
    for ch in _prange((s.size + _CHUNK - 1) // _CHUNK):
        k, f = _kahan16_block(s, c, t, ch * _CHUNK, min(s.size, (ch + 1) * _CHUNK), nan, count)
        lost += k
        bad += f
    return lost, bad


def _kahan32_ser(s, c, t, nan, count):
    lost = 0
    bad = 0
    for ch in range((s.size + _CHUNK - 1) // _CHUNK):
        k, f = _kahan32_block(s, c, t, ch * _CHUNK, min(s.size, (ch + 1) * _CHUNK), nan, count)
        lost += k
        bad += f
    return lost, bad


def _kahan32_par(s, c, t, nan, count):
    lost = 0
    bad = 0
    for ch in _prange((s.size + _CHUNK - 1) // _CHUNK):
        k, f = _kahan32_block(s, c, t, ch * _CHUNK, min(s.size, (ch + 1) * _CHUNK), nan, count)
        lost += k
        bad += f
    return lost, bad


def _widen_ser(s, t, count):
    lost = 0
    bad = 0
    for ch in range((s.size + _CHUNK - 1) // _CHUNK):
        k, f = _widen_block(s, t, ch * _CHUNK, min(s.size, (ch + 1) * _CHUNK), count)
        lost += k
        bad += f
    return lost, bad


def _widen_par(s, t, count):
    lost = 0
    bad = 0
    for ch in _prange((s.size + _CHUNK - 1) // _CHUNK):
        k, f = _widen_block(s, t, ch * _CHUNK, min(s.size, (ch + 1) * _CHUNK), count)
        lost += k
        bad += f
    return lost, bad


_HELPERS = (_widen, _isnan32, _cast16, _to_bf16, _rn32, _high16, _same, _counts, _bad, _naive_step, _kahan_step)
_BLOCKS = (_naive16_block, _naive32_block, _kahan16_block, _kahan32_block, _widen_block)
_SERIAL = (_naive16_ser, _naive32_ser, _kahan16_ser, _kahan32_ser, _widen_ser)
_PARALLEL = (_naive16_par, _naive32_par, _kahan16_par, _kahan32_par, _widen_par)
_BUILD_LOCK = threading.Lock()


def _jit(numba: ModuleType, fn, **options):
    """numba.njit(fn) with cache=True where a cache directory is writable, else without."""
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(**options)(fn)


@functools.cache
def _kernels() -> SimpleNamespace:
    numba = _native._numba()
    if numba is None:
        raise RuntimeError(f"precision_lab._native_training needs numba (or set {_native.ENV_VAR}=0)")
    with _BUILD_LOCK:
        namespace = globals()
        namespace["_prange"] = numba.prange
        for fn in (*_HELPERS, *_BLOCKS):  # callees first: numba resolves globals when it compiles a caller
            namespace[fn.__name__] = _jit(numba, fn)
        kernels = {fn.__name__.lstrip("_"): _jit(numba, fn) for fn in _SERIAL}
        kernels.update({fn.__name__.lstrip("_"): _jit(numba, fn, parallel=True) for fn in _PARALLEL})
        return SimpleNamespace(**kernels)


# --------------------------------------------------------------------------------------------------
# tensor plumbing
# --------------------------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> np.ndarray:
    """Unsigned bit patterns of a contiguous CPU bf16 or fp32 tensor, sharing its memory (1-D)."""
    flat = t.detach().reshape(-1)
    if t.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.view(torch.int32).numpy().view(np.uint32)


def _buffer(name: str, s: torch.Tensor, dtype: torch.dtype, numel: int) -> None:
    if s.device.type != "cpu" or s.dtype != dtype or s.numel() != numel or not s.is_contiguous():
        raise ValueError(
            f"{name}: expected a contiguous CPU {dtype} tensor of {numel} elements, "
            f"got {s.dtype} with {s.numel()} elements on {s.device} (contiguous: {s.is_contiguous()})"
        )


def _addend(t: torch.Tensor, dtypes: tuple[torch.dtype, ...], numel: int) -> torch.Tensor:
    if t.device.type != "cpu" or t.dtype not in dtypes or t.numel() != numel:
        raise ValueError(
            f"t: expected a CPU tensor of {numel} elements and dtype in {[str(d) for d in dtypes]}, "
            f"got {t.dtype} with {t.numel()} elements on {t.device}"
        )
    return t.contiguous()


def _run(serial, parallel, use_parallel: bool, *args) -> tuple[int, int]:
    if use_parallel:
        _native._threads(_native._numba())
        lost, bad = parallel(*args)
    else:
        lost, bad = serial(*args)
    return int(lost), int(bad)


# --------------------------------------------------------------------------------------------------
# public kernels
# --------------------------------------------------------------------------------------------------
def naive_bf16(s: torch.Tensor, t: torch.Tensor, *, parallel: bool = False, count: bool = True) -> tuple[int, int]:
    """``s.add_(t.to(torch.bfloat16))`` in one pass, counting (see the module docstring).

    Args:
        s: Contiguous bf16 CPU buffer, updated in place.
        t: bf16 or fp32 CPU addend with as many elements (any layout: read in ``s``'s order).
        parallel: Run on numba's thread pool instead of the calling thread.
        count: Count; without it the loop skips the counting and ``(0, 0)`` is returned.

    Returns:
        ``(lost, nonfinite)``.
    """
    _buffer("s", s, torch.bfloat16, s.numel())
    tc = _addend(t, (torch.bfloat16, torch.float32), s.numel())
    k = _kernels()
    nan = np.uint16(_native.bf16_nan_bits())
    if tc.dtype == torch.bfloat16:
        return _run(k.naive16_ser, k.naive16_par, parallel, _bits(s), _bits(tc), nan, count)
    return _run(k.naive32_ser, k.naive32_par, parallel, _bits(s), _bits(tc), nan, count)


def kahan_bf16(
    s: torch.Tensor, c: torch.Tensor, t: torch.Tensor, *, parallel: bool = False, count: bool = True
) -> tuple[int, int]:
    """One bf16 Kahan step of ``t.to(torch.bfloat16)`` on ``(s, c)`` in one pass, counting.

    ``y = RN(t - c); u = RN(s + y); c = RN(RN(u - s) - y); s = u``, each op rounded to bf16: the
    bits of :func:`precision_lab.strategies.kahan.kahan_step`.

    Args:
        s: Contiguous bf16 CPU running sum, updated in place.
        c: Contiguous bf16 CPU compensation, updated in place.
        t: bf16 or fp32 CPU addend with as many elements.
        parallel: Run on numba's thread pool instead of the calling thread.
        count: Count; without it the loop skips the counting and ``(0, 0)`` is returned.

    Returns:
        ``(lost, nonfinite)``; an add is lost when it changed neither ``s`` nor ``c``.
    """
    _buffer("s", s, torch.bfloat16, s.numel())
    _buffer("c", c, torch.bfloat16, s.numel())
    tc = _addend(t, (torch.bfloat16, torch.float32), s.numel())
    k = _kernels()
    nan = np.uint16(_native.bf16_nan_bits())
    if tc.dtype == torch.bfloat16:
        return _run(k.kahan16_ser, k.kahan16_par, parallel, _bits(s), _bits(c), _bits(tc), nan, count)
    return _run(k.kahan32_ser, k.kahan32_par, parallel, _bits(s), _bits(c), _bits(tc), nan, count)


def widen_add_f32(s: torch.Tensor, t: torch.Tensor, *, parallel: bool = False, count: bool = True) -> tuple[int, int]:
    """``s.add_(t)`` for an fp32 ``s`` and a bf16 ``t`` in one pass (exact widening, one fp32 rounding), counting.

    Args:
        s: Contiguous fp32 CPU buffer, updated in place.
        t: bf16 CPU addend with as many elements.
        parallel: Run on numba's thread pool instead of the calling thread.
        count: Count; without it the loop skips the counting and ``(0, 0)`` is returned.

    Returns:
        ``(lost, nonfinite)``.
    """
    _buffer("s", s, torch.float32, s.numel())
    tc = _addend(t, (torch.bfloat16,), s.numel())
    k = _kernels()
    values = s.detach().reshape(-1).numpy()
    return _run(k.widen_ser, k.widen_par, parallel, values, _bits(tc), count)


def bind(  # noqa: ANN201
    kind: str,
    s: torch.Tensor,
    c: torch.Tensor | None = None,
    *,
    addend: torch.dtype,
    parallel: bool = False,
    count: bool = True,
):
    """A kernel bound to its buffer: checks and array views done once, for a training loop's many calls.

    Args:
        kind: ``"naive_bf16"``, ``"kahan_bf16"`` or ``"widen_add_f32"`` (the functions of those names).
        s: The buffer (contiguous CPU, bf16; fp32 for ``widen_add_f32``), kept by the closure.
        c: Kahan's compensation (bf16), else None.
        addend: The dtype of every addend (bf16, or fp32 for the bf16 buffers).
        parallel: The parallel entry point, on torch's current thread count at each call
            (``_native._threads``), instead of the calling thread alone.
        count: Count (else each step returns ``(0, 0)`` and skips the counting).

    Returns:
        ``step(t) -> (lost, nonfinite)``, the kernel on ``t`` (``addend`` dtype, as many elements,
        any layout).

    Raises:
        ValueError: For an unknown kind or buffers and dtypes it does not take.
    """
    k = _kernels()
    nan = np.uint16(_native.bf16_nan_bits())
    n = s.numel()
    t_bits = torch.int16 if addend == torch.bfloat16 else torch.int32
    t_view = np.uint16 if addend == torch.bfloat16 else np.uint32
    if kind == "widen_add_f32" and addend == torch.bfloat16:
        _buffer("s", s, torch.float32, n)
        fn, arrays = (k.widen_par if parallel else k.widen_ser), (s.detach().reshape(-1).numpy(),)
    elif kind in ("naive_bf16", "kahan_bf16") and addend in (torch.bfloat16, torch.float32):
        _buffer("s", s, torch.bfloat16, n)
        if kind == "kahan_bf16":
            _buffer("c", c, torch.bfloat16, n)
            arrays = (_bits(s), _bits(c))
            fn = k.kahan16_ser if addend == torch.bfloat16 else k.kahan32_ser
            if parallel:
                fn = k.kahan16_par if addend == torch.bfloat16 else k.kahan32_par
        else:
            arrays = (_bits(s),)
            fn = k.naive16_ser if addend == torch.bfloat16 else k.naive32_ser
            if parallel:
                fn = k.naive16_par if addend == torch.bfloat16 else k.naive32_par
    else:
        raise ValueError(f"bind: no kernel {kind!r} for {s.dtype} buffers and {addend} addends")
    extra = () if kind == "widen_add_f32" else (nan,)
    numba = _native._numba()

    def step(t: torch.Tensor) -> tuple[int, int]:
        if t.dtype is not addend or t.numel() != n or not t.is_cpu:
            raise ValueError(f"step: expected a CPU {addend} addend of {n} elements, got {t.dtype} {tuple(t.shape)}")
        if t.requires_grad or not t.is_contiguous():
            t = t.detach().contiguous()
        if parallel:
            _native._threads(numba)
        lost, bad = fn(*arrays, t.view(t_bits).numpy().reshape(-1).view(t_view), *extra, count)
        return int(lost), int(bad)

    return step


# --------------------------------------------------------------------------------------------------
# the stochastic strategy's bf16 kernel, bound (the kernel itself is _native's)
# --------------------------------------------------------------------------------------------------
_MASK64 = (1 << 64) - 1


def _sr_step(s: torch.Tensor, parallel: bool = False):  # noqa: ANN202
    raw = _native._kernels().sr_add
    numba = _native._numba()
    sb = _bits(s)
    n = s.numel()
    nan = np.uint16(_native.bf16_nan_bits())
    pair_key = _random.pair_key

    def step(t: torch.Tensor, key: int) -> int:
        if t.dtype is not torch.bfloat16 or t.numel() != n or not t.is_cpu:
            raise ValueError(f"step: expected a CPU bf16 addend of {n} elements, got {t.dtype} {tuple(t.shape)}")
        if t.requires_grad or not t.is_contiguous():
            t = t.detach().contiguous()
        if parallel:
            _native._threads(numba)  # torch's thread count, as _native's wrappers set it
        else:
            numba.set_num_threads(1)  # thread-local; _native's wrappers set it again on each of their calls
        tb = t.view(torch.int16).numpy().reshape(-1).view(np.uint16)
        return int(raw(sb, tb, np.uint64(key & _MASK64), np.uint64(pair_key(key) & _MASK64), nan))

    return step


@functools.cache
def _sr_bound_agrees() -> bool:
    """Whether the bound call gives ``_native.sr_add_bf16``'s bits and count, on a probe (once per process).

    The probe's 2^19 addends lie 2^30 or more below the running sums, so the fp32 TwoSum error of
    every sum is nonzero and the second decision (probability 2^-16 each) is taken about 8 times
    (this seed: 5), besides the key's stream on every element.  False also where the kernel's
    signature changed: the caller then uses ``_native.sr_add_bf16`` itself (the same bits, more
    overhead per call).
    """
    g = torch.Generator().manual_seed(20240607)
    n = 1 << 19
    s = (torch.randn(n, generator=g) * torch.exp2(torch.randint(0, 20, (n,), generator=g).float())).bfloat16()
    t = (torch.randn(n, generator=g) * torch.exp2(torch.randint(-60, -30, (n,), generator=g).float())).bfloat16()
    key = 0x5EED_F00D_1234_5678
    want = s.clone()
    got = s.clone()
    try:
        lost_want = _native.sr_add_bf16(want, t, key, True)
        lost_got = _sr_step(got)(t, key)
    except (TypeError, ValueError, AttributeError):  # the kernel or its helpers changed shape
        return False
    return lost_got == lost_want and torch.equal(got.view(torch.int16), want.view(torch.int16))


def bind_sr_bf16(s: torch.Tensor, *, parallel: bool = False):  # noqa: ANN201
    """``_native.sr_add_bf16`` bound to the bf16 buffer ``s``: ``step(t, key) -> lost``.

    The same compiled kernel, called with ``s``'s array view made once and without the public
    function's per-call checks (on a bias of a hundred elements they cost several times the
    kernel).  It runs on one thread, or with ``parallel`` on torch's current thread count (see the
    module docstring).  The lost count is always computed.

    Args:
        s: Contiguous bf16 CPU buffer, kept by the closure.
        parallel: Run on torch's thread count instead of the calling thread alone.

    Returns:
        The step, or None where it does not reproduce ``_native.sr_add_bf16`` on a probe (then call
        that function).
    """
    _buffer("s", s, torch.bfloat16, s.numel())
    return _sr_step(s, parallel) if _sr_bound_agrees() else None


# --------------------------------------------------------------------------------------------------
# the pure-torch fallbacks: the same bits and counts, any device, counts as 0-d int64 tensors
# --------------------------------------------------------------------------------------------------
def _absorbed(new: torch.Tensor, old: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # strategies.absorbed, restated here: this module sits below the strategies
    return (new == old) & (t != 0) & torch.isfinite(t) & torch.isfinite(old)


def count_nonfinite(t: torch.Tensor) -> torch.Tensor:
    """Non-finite elements of a floating-point ``t`` as a 0-d int64 tensor on t's device (no host sync).

    ``t * 0`` is ±0 where ``t`` is finite and NaN where it is ±Inf or NaN, and ``count_nonzero``
    counts the NaNs: the count of ``~torch.isfinite(t)`` in two passes instead of five.
    """
    return torch.count_nonzero(t * 0)


def torch_naive_bf16(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fallback of :func:`naive_bf16`: ``(lost, nonfinite)`` as 0-d tensors."""
    tb = t.to(torch.bfloat16)
    old = s.clone()
    s.add_(tb)
    return _absorbed(s, old, tb).sum(), count_nonfinite(tb)


def torch_kahan_bf16(s: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fallback of :func:`kahan_bf16` (``kahan_step``'s torch path): ``(lost, nonfinite)`` as 0-d tensors."""
    tb = t.to(torch.bfloat16)
    y = tb - c
    u = s + y
    new_c = (u - s) - y
    lost = (_absorbed(u, s, tb) & (new_c == c)).sum()
    c.copy_(new_c)
    s.copy_(u)
    return lost, count_nonfinite(tb)


def torch_widen_add_f32(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fallback of :func:`widen_add_f32`: ``(lost, nonfinite)`` as 0-d tensors."""
    old = s.clone()
    s.add_(t)
    return _absorbed(s, old, t).sum(), count_nonfinite(t)
