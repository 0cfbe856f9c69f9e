"""Compiled CPU kernels (numba) for the bf16 hot loops; the pure-torch code stays the reference.

Each kernel fuses what the torch path does in several passes (and several temporaries) into one
parallel loop over the elements, and gives **the same bits** as the torch code it replaces:

========================  ========================================================================
``sr_bf16``               fp32 -> bf16 stochastic rounding, the bits of ``rounding._sr_bf16_torch``
``naive_add_bf16``        ``s <- RN(s + t)`` in bf16, the bits of ``s.add_(t)``, plus the lost count
``kahan_add_bf16``        one Kahan step with every op rounded to bf16, as ``strategies.kahan.kahan_step``
``sr_add_bf16``           ``s <- SR(s + t)`` of the exact sum, the bits of ``rounding.sr_bf16_sum_keyed``
``count_nonfinite_bf16``  ``int((~torch.isfinite(t)).sum())`` for a bf16 ``t``, in one pass
========================  ========================================================================

Bit layout of the stochastic rounding (element i draws lane i % 4 of the splitmix64 word for
counter i // 4, see :mod:`precision_lab._random`, so one hash serves four elements)::

    splitmix64(key, i // 4)   | lane 3 | lane 2 | lane 1 | lane 0 |    (4 x 16 bits)
    fp32 bits of x            s eeeeeeee mmmmmmm | llllllllllllllll
                            + 0 00000000 0000000 | rrrrrrrrrrrrrrrr     r = lane (i % 4), low
                                                                        16 - random_bits cleared
    result                    s eeeeeeee mmmmmmm | 0000000000000000     (uint32 wrap = torch's)

bf16 <-> fp32: a bf16 pattern h is the fp32 pattern ``h << 16``; fp32 -> bf16 rounds to nearest
even as torch's cast does: ``(b + 0x7FFF + ((b >> 16) & 1)) >> 16``.  The naive and Kahan kernels
form sums in fp32 (``float(s) + float(t)``, one fp32 rounding) exactly as torch's bf16
``add``/``sub`` do.

``sr_add_bf16`` rounds the EXACT sum: a wide sum rounded to nearest first would lose every addend
below half of fp32's spacing at s (2^-25 to 2^-24 of |s|) before the random decision sees it.  fp32 TwoSum gives ``s + t = h + e``
exactly (s and t are bf16 numbers; an fp32 overflow means ``|s + t| >= 2^128``, which is Inf in bf16
anyway), and the fast path above runs on ``Alo``, the fp32 bits of ``|s + t|`` rounded down: ``h``'s
bits, minus one where ``e`` points toward zero.  Where ``e != 0`` and the low 16 bits of
``Alo + r`` come out 0xFFFF (probability 2^-16: the one lane value at which ``e`` can still change
the outcome), a second decision from the stream ``_random.pair_key(key)`` adds one more::

    result = (Alo + r + C) >> 16,   C = [U' < theta] xor [e points toward zero],
                                    theta = |e| / ulp32(Alo), U' the 63-bit words of element i

so P(up) = (L + psi) / 2^16 with L the low 16 bits of Alo and psi the position of ``|s + t|``
between Alo and the next fp32 number: exactly (|s + t| - down) / (up - down).  The vectorised loop
stores each element's old value and a flag; a second, scalar pass over a chunk runs only where a
flag is set (:func:`_sr_tip`).

NaN results: torch's CPU cast to bf16 writes one fixed pattern for every NaN, which depends on the
build (0xFFFF from the vectorised x86 kernels, 0x7FC0 from the scalar code, e.g. with
``ATEN_CPU_CAPABILITY=default``).  The kernels write the pattern that ``Tensor.to(torch.bfloat16)``
produces in this process (probed once), so ``sr_bf16`` into a bf16 ``out`` and ``sr_add_bf16``
match torch to the bit everywhere.  Torch's bf16 ``add_``/``sub`` use the vectorised code for whole
vectors only and the scalar code (0x7FC0) for the elements left over in each thread's chunk, so
for ``naive_add_bf16`` / ``kahan_add_bf16`` a NaN result can differ from torch's *payload*
there (it is a NaN in both); every non-NaN result is bit-identical.

Control:

* numba is imported, and its thread pool started with torch's thread count kept, on the first
  call of :func:`enabled` (not when precision_lab is imported) and each kernel is compiled on its
  first use (``cache=True``: later processes load it from ``__pycache__`` in well under a second).
* ``PRECISION_LAB_NATIVE=0`` (or ``false``/``no``/``off``) disables the kernels; the variable is
  read at every call of :func:`enabled`, so it can be changed at run time.  Without numba the
  torch code is used silently.
* The kernels run on ``torch.get_num_threads()`` threads (capped by numba's ``NUMBA_NUM_THREADS``);
  the bits do not depend on the thread count (each element's random lane depends only on its
  index).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace

import numpy as np
import torch

from precision_lab import _random

__all__ = [
    "disabled",
    "ENV_VAR",
    "count_nonfinite_bf16",
    "enabled",
    "kahan_add_bf16",
    "naive_add_bf16",
    "sr_add_bf16",
    "sr_bf16",
]

ENV_VAR = "PRECISION_LAB_NATIVE"
_OFF = ("0", "false", "no", "off")

# Constants as fixed-width numpy scalars: numba freezes globals, and mixing uint64 with Python
# ints would promote to float64.
_GAMMA = np.uint64(_random.GAMMA)
_MUL1 = np.uint64(_random.MUL1)
_MUL2 = np.uint64(_random.MUL2)
_ONE64 = np.uint64(1)
_SH27 = np.uint64(27)
_SH30 = np.uint64(30)
_SH31 = np.uint64(31)
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
_LOW16 = np.uint32(0xFFFF)
_SH23 = np.uint32(23)
_EXP8 = np.uint32(0xFF)
_MIXBASE = np.uint64(1 << 62)  # _random.mix_key(key, level) = _mix(key, 2^62 + level) >> 1
_TWO63 = np.float64(2.0**63)


# --------------------------------------------------------------------------------------------------
# switches
# --------------------------------------------------------------------------------------------------
@functools.cache
def _numba() -> ModuleType | None:
    """Import numba once and start its thread pool; None where it is not installed or does not import.

    numba's OpenMP pool starts with ``omp_set_num_threads(NUMBA_NUM_THREADS)`` in the OpenMP runtime
    that torch shares, which raised ``torch.get_num_threads()`` (1 -> all cores under
    ``OMP_NUM_THREADS=1``).  The pool is started here, once, and torch's count put back, so the
    caller's setting holds for torch and (through :func:`_threads`) for the kernels.
    """
    try:
        import numba
    except ImportError:
        return None
    from precision_lab._threads import intra_op_threads

    with intra_op_threads(None):  # restores torch's thread count after the pool has started
        numba.get_num_threads()  # starts numba's thread pool (once per process)
    return numba


# Below this many elements the parallel kernels' thread start-up costs more than they save (and
# under CPU contention their spinning workers cost milliseconds per call): the torch code, which
# gives the same bits, runs instead.
MIN_NUMEL = 1 << 14


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Inside the block the compiled kernels are off (the pure-torch paths, same bits); restored after."""
    before = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[ENV_VAR]
        else:
            os.environ[ENV_VAR] = before


def enabled(numel: int | None = None) -> bool:
    """Whether the compiled kernels are used: numba imports and ``PRECISION_LAB_NATIVE`` is not 0.

    Args:
        numel: The size of the call; below :data:`MIN_NUMEL` the torch path is used.

    Returns:
        True where the callers should use this module's kernels instead of the torch code.
    """
    if os.environ.get(ENV_VAR, "").strip().lower() in _OFF:
        return False
    if numel is not None and numel < MIN_NUMEL:
        return False
    return _numba() is not None


@functools.cache
def bf16_nan_bits() -> int:
    """The bf16 pattern torch's CPU cast writes for a NaN in this process (0xFFFF on x86 builds)."""
    probe = torch.full((64,), math.nan, dtype=torch.float32).to(torch.bfloat16)
    return int(probe.view(torch.int16)[0]) & 0xFFFF


def _threads(numba: ModuleType) -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


# --------------------------------------------------------------------------------------------------
# kernel sources, compiled by _kernels() on first use
# --------------------------------------------------------------------------------------------------
# They are plain module-level functions so that numba's on-disk cache finds them again in the next
# process (closures over other compiled functions would not be cached).  _kernels() replaces the
# helpers' names in this module's namespace by their compiled versions (numba resolves globals when
# it compiles a caller) and _prange by numba.prange.
#
# Elements are processed in chunks of _CHUNK: the parallel loop runs over chunks (so the work split
# never depends on the thread count), and the inner loop over a chunk is a plain counted loop that
# LLVM vectorises.  Lost updates are counted per chunk in a uint16 (hence _CHUNK < 2^16), which
# vectorises in 16-bit lanes.  The stochastic kernels first fill a chunk's splitmix64 words (one
# per 4 elements: a loop of 64-bit multiplies on its own) and then read them as 16-bit lanes: on a
# little-endian machine uint16 number i of the words is lane i % 4 of word i // 4.
_CHUNK = 32768  # a multiple of 4 (one random word per 4 elements) below 2^16 (uint16 counts)
_prange = range


def _mix(key, counter):  # splitmix64(key, counter), as _random.splitmix64_int
    z = key + (counter + _ONE64) * _GAMMA
    z = (z ^ (z >> _SH30)) * _MUL1
    z = (z ^ (z >> _SH27)) * _MUL2
    return z ^ (z >> _SH31)


def _fill_words(words, key, first, count):  # words[j] = splitmix64(key, first + j), j < count
    for j in range(np.uint64(0), np.uint64(count)):
        words[j] = _mix(key, np.uint64(first) + j)


def _isnan32(b):
    return (b & _ABS32) > _INF32


def _widen(h):  # bf16 bits -> the fp32 value (exact)
    return np.uint32(np.uint32(h) << _B16).view(np.float32)


def _to_bf16(v, nan):  # fp32 value -> bf16 bits, round to nearest even; NaN -> torch's pattern
    b = np.float32(v).view(np.uint32)
    r = np.uint16((b + _RNE_BIAS + ((b >> _B16) & _ONE32)) >> _B16)
    return nan if _isnan32(b) else r


def _rn32(v):  # fp32 value -> RN_bf16(v) as an fp32 value, without NaN fix-up (see _kahan_add)
    b = np.float32(v).view(np.uint32)
    return np.uint32((b + _RNE_BIAS + ((b >> _B16) & _ONE32)) & _HIGH16).view(np.float32)


def _high16(v, nan):  # fp32 value holding a bf16 number -> its bf16 bits; NaN -> torch's pattern
    b = np.float32(v).view(np.uint32)
    return nan if _isnan32(b) else np.uint16(b >> _B16)


def _sr16(b, r, nan):  # fp32 bits + 16 random bits -> bf16 bits (truncation after the carry)
    v = np.uint16((b + r) >> _B16)
    return nan if _isnan32(b) else v


def _sr32(b, r):  # the same, kept as fp32 bits; a NaN passes through unchanged
    v = (b + r) & _HIGH16
    return b if _isnan32(b) else v


def _same(a, b):  # bf16 bits a == b as numbers (-0 == +0, NaN != NaN)
    return ((a == b) | (((a | b) & _ABS16) == _ZERO16)) & ((a & _ABS16) <= _INF16)


def _counts(t, old):  # t finite and nonzero (|t| - 1 < 0x7F7F, wrapping), old finite
    return (np.uint16((t & _ABS16) - _ONE16) < _FIN16M1) & ((old & _ABS16) < _INF16)


def _sr_to_f32(x, out, key, mask):
    n = x.size
    for ch in _prange((n + _CHUNK - 1) // _CHUNK):
        lo = ch * _CHUNK
        m = min(n - lo, _CHUNK)
        words = np.empty(_CHUNK // 4, np.uint64)
        _fill_words(words, key, lo // 4, (m + 3) // 4)
        r16 = words.view(np.uint16)
        for i in range(np.uint64(0), np.uint64(m)):
            k = np.uint64(lo) + i
            out[k] = _sr32(x[k], np.uint32(r16[i]) & mask)
    return 0


def _sr_to_bf16(x, out, key, mask, nan):
    n = x.size
    for ch in _prange((n + _CHUNK - 1) // _CHUNK):
        lo = ch * _CHUNK
        m = min(n - lo, _CHUNK)
        words = np.empty(_CHUNK // 4, np.uint64)
        _fill_words(words, key, lo // 4, (m + 3) // 4)
        r16 = words.view(np.uint16)
        for i in range(np.uint64(0), np.uint64(m)):
            k = np.uint64(lo) + i
            out[k] = _sr16(x[k], np.uint32(r16[i]) & mask, nan)
    return 0


def _naive_add(s, t, nan):
    n = s.size
    lost = 0
    for ch in _prange((n + _CHUNK - 1) // _CHUNK):
        lo = np.uint64(ch * _CHUNK)
        hi = np.uint64(min(n, (ch + 1) * _CHUNK))
        count = np.uint16(0)
        for i in range(lo, hi):
            a = s[i]
            b = t[i]
            r = _to_bf16(_widen(a) + _widen(b), nan)
            s[i] = r
            count = np.uint16(count + np.uint16(_same(r, a) & _counts(b, a)))
        lost += np.int64(count)
    return lost


def _kahan_add(s, c, t, nan):
    # The intermediates stay fp32 values rounded to bf16 (_rn32) without the NaN fix-up: a NaN made
    # by fp32 arithmetic on widened bf16 values is a quieted operand or the default NaN, both with
    # zero low 16 bits, so rounding keeps it a NaN.  The stored results get torch's NaN pattern.
    n = s.size
    lost = 0
    for ch in _prange((n + _CHUNK - 1) // _CHUNK):
        lo = np.uint64(ch * _CHUNK)
        hi = np.uint64(min(n, (ch + 1) * _CHUNK))
        count = np.uint16(0)
        for i in range(lo, hi):
            a = s[i]
            ci = c[i]
            b = t[i]
            fa = _widen(a)
            y = _rn32(_widen(b) - _widen(ci))  # subtract the previous step's lost low part
            fu = _rn32(fa + y)
            u = _high16(fu, nan)
            nc = _high16(_rn32(_rn32(fu - fa) - y), nan)  # (u - s) - y: what the add lost, negated
            s[i] = u
            c[i] = nc
            count = np.uint16(count + np.uint16(_same(u, a) & _same(nc, ci) & _counts(b, a)))
        lost += np.int64(count)
    return lost


def _two_sum32(fa, fb):  # fp32 TwoSum: (hi, lo) with hi + lo == fa + fb exactly (hi finite)
    h = np.float32(fa + fb)
    z = np.float32(h - fa)
    return h, np.float32(np.float32(fa - np.float32(h - z)) + np.float32(fb - z))


def _below63(theta, key, counter):  # U < theta (0/1) for U from the words of key at counter, as
    # rounding._uniform_below: 63-bit words splitmix64(key_level, counter) >> 1, key_level = key at
    # level 0 and _random.mix_key(key, level) after, against floor(residual * 2^63), level by level
    res = theta
    level = np.uint64(0)
    while True:
        k = key if level == 0 else _mix(key, _MIXBASE + level) >> _ONE64
        w = _mix(k, np.uint64(counter)) >> _ONE64
        scaled = res * _TWO63
        f = np.floor(scaled)
        fi = np.uint64(f)
        if w != fi:
            return np.uint16(w < fi)
        res = scaled - f
        level += _ONE64


def _sr_tip(s, t, olds, tips, lo, m, pkey):
    # The rare elements whose first decision lo can still change (L + r == 0xFFFF, lo != 0): the
    # stored result is the lower neighbour; the exact sum's second decision may step it up by one.
    # Returns the change of the lost count.
    delta = 0
    flags = tips.view(np.uint64)  # 8 flags a word; tips beyond m are never read
    for j in range((m + 7) // 8):
        if flags[j] == 0:
            continue
        for i in range(8 * j, min(8 * j + 8, m)):
            if tips[i] == 0:
                continue
            k = np.uint64(lo) + np.uint64(i)
            a = olds[i]
            b = t[k]
            h, e = _two_sum32(_widen(a), _widen(b))
            hb = np.float32(h).view(np.uint32)
            toward = ((hb ^ np.float32(e).view(np.uint32)) >> _SH31) & _ONE32  # lo points toward zero
            alo = hb - toward
            expo = max(np.int64((alo >> _SH23) & _EXP8), 1)  # ulp32(Alo) = 2^(expo - 150)
            theta = math.ldexp(abs(np.float64(e)), 150 - expo)  # exact
            if (_below63(theta, pkey, k) ^ np.uint16(toward)) != 0:
                v = s[k]
                up = np.uint16(v + _ONE16)
                s[k] = up
                delta += np.int64(_same(up, a) & _counts(b, a)) - np.int64(_same(v, a) & _counts(b, a))
    return delta


def _sr_add(s, t, key, pkey, nan):
    # SR of the exact s + t = h + e (fp32 TwoSum): bits(RD32 of the exact sum) + r, truncated; where
    # e != 0 and the low 16 bits come out 0xFFFF, _sr_tip decides on e (see sr_add_bf16).
    n = s.size
    lost = 0
    for ch in _prange((n + _CHUNK - 1) // _CHUNK):
        lo = ch * _CHUNK
        m = min(n - lo, _CHUNK)
        words = np.empty(_CHUNK // 4, np.uint64)
        _fill_words(words, key, lo // 4, (m + 3) // 4)
        r16 = words.view(np.uint16)
        olds = np.empty(_CHUNK, np.uint16)
        tips = np.empty(_CHUNK, np.uint8)
        count = np.uint16(0)
        ntips = np.uint16(0)
        for i in range(np.uint64(0), np.uint64(m)):
            k = np.uint64(lo) + i
            a = s[k]
            b = t[k]
            h, e = _two_sum32(_widen(a), _widen(b))
            hb = np.float32(h).view(np.uint32)
            live = (e != np.float32(0)) & ((hb & _ABS32) < _INF32)  # a finite sum that fp32 did not hold
            # uint32 casts keep the lanes 32 bits wide (numba computes narrow integers in 64 bits)
            toward = np.uint32(np.uint32(live) & np.uint32(np.uint32(hb ^ np.float32(e).view(np.uint32)) >> _SH31))
            v = np.uint32(np.uint32(hb - toward) + np.uint32(r16[i]))
            tip = np.uint8(live & (np.uint32(v & _LOW16) == _LOW16))
            r = nan if _isnan32(hb) else np.uint16(v >> _B16)
            s[k] = r
            olds[i] = a
            tips[i] = tip
            ntips = np.uint16(ntips + np.uint16(tip))
            count = np.uint16(count + np.uint16(_same(r, a) & _counts(b, a)))
        lost += np.int64(count)
        if ntips != 0:
            lost += _sr_tip(s, t, olds, tips, lo, m, pkey)
    return lost


def _count_nonfinite(t):
    n = t.size
    total = 0
    for ch in _prange((n + _CHUNK - 1) // _CHUNK):
        lo = np.uint64(ch * _CHUNK)
        hi = np.uint64(min(n, (ch + 1) * _CHUNK))
        count = np.uint16(0)
        for i in range(lo, hi):
            count = np.uint16(count + np.uint16((t[i] & _INF16) == _INF16))
        total += np.int64(count)
    return total


_HELPERS = {
    f.__name__: f
    for f in (
        _mix,
        _fill_words,
        _isnan32,
        _widen,
        _to_bf16,
        _rn32,
        _high16,
        _sr16,
        _sr32,
        _same,
        _counts,
        _two_sum32,
        _below63,
        _sr_tip,
    )
}
_PARALLEL = {
    f.__name__.lstrip("_"): f for f in (_sr_to_f32, _sr_to_bf16, _naive_add, _kahan_add, _sr_add, _count_nonfinite)
}
_BUILD_LOCK = threading.Lock()


def _jit(numba: ModuleType, fn, **options):
    """numba.njit(fn) with cache=True where a cache directory is writable, else without."""
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(**options)(fn)


@functools.cache
def _kernels() -> SimpleNamespace:
    numba = _numba()
    if numba is None:
        raise RuntimeError(f"precision_lab._native needs numba (or set {ENV_VAR}=0)")
    if not np.little_endian:  # the 16-bit view of the random words assumes it
        raise RuntimeError("precision_lab._native assumes a little-endian machine")
    with _BUILD_LOCK:
        namespace = globals()
        namespace["_prange"] = numba.prange
        for name, fn in _HELPERS.items():
            namespace[name] = _jit(numba, fn)
        return SimpleNamespace(**{name: _jit(numba, fn, parallel=True) for name, fn in _PARALLEL.items()})


# --------------------------------------------------------------------------------------------------
# tensor plumbing
# --------------------------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> np.ndarray:
    """Unsigned bit patterns of a contiguous CPU tensor, sharing its memory (1-D)."""
    if t.dtype == torch.bfloat16:
        return t.detach().reshape(-1).view(torch.int16).numpy().view(np.uint16)
    return t.detach().reshape(-1).view(torch.int32).numpy().view(np.uint32)


def _check(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], numel: int) -> None:
    if t.device.type != "cpu" or t.dtype not in dtypes or t.numel() != numel:
        raise ValueError(
            f"{name}: expected a CPU tensor of {numel} elements and dtype in {[str(d) for d in dtypes]}, "
            f"got {t.dtype} with {t.numel()} elements on {t.device}"
        )


def _inplace(fn, *bufs: torch.Tensor) -> int:
    """Run ``fn`` on the bits of ``bufs``, through contiguous copies where a buffer is not contiguous."""
    work = [b if b.is_contiguous() else b.contiguous() for b in bufs]
    result = fn(*[_bits(w) for w in work])
    for b, w in zip(bufs, work, strict=True):
        if w is not b:
            b.copy_(w)
    return int(result)


def _key(key: int) -> np.uint64:
    return np.uint64(key & ((1 << 64) - 1))


# --------------------------------------------------------------------------------------------------
# public kernels
# --------------------------------------------------------------------------------------------------
def sr_bf16(x: torch.Tensor, out: torch.Tensor, key: int, random_bits: int) -> None:
    """fp32 -> bf16 stochastic rounding of ``x`` into ``out``: the bits of ``_sr_bf16_torch``.

    Args:
        x: Contiguous fp32 CPU tensor.
        out: Contiguous fp32 or bf16 CPU tensor with as many elements (may be ``x`` itself).
        key: The stream's key (``_random.derive_key``); element i uses lane i % 4 of
            ``splitmix64(key, i // 4)``.
        random_bits: How many of the 16 random bits to use (1..16; the low ones are cleared).
    """
    _check("x", x, (torch.float32,), x.numel())
    _check("out", out, (torch.float32, torch.bfloat16), x.numel())
    if not (x.is_contiguous() and out.is_contiguous()):
        raise ValueError("sr_bf16 needs contiguous x and out")
    if not 1 <= random_bits <= 16:
        raise ValueError(f"random_bits={random_bits!r}; the bf16 kernel takes 1..16")
    k = _kernels()
    _threads(_numba())
    mask = np.uint32(0xFFFF & ~((1 << (16 - random_bits)) - 1))
    if out.dtype == torch.bfloat16:
        k.sr_to_bf16(_bits(x), _bits(out), _key(key), mask, np.uint16(bf16_nan_bits()))
    else:
        k.sr_to_f32(_bits(x), _bits(out), _key(key), mask)


def naive_add_bf16(s: torch.Tensor, t: torch.Tensor) -> int:
    """``s.add_(t)`` for bf16 ``s`` and ``t`` (same bits), counting the lost element-adds.

    Args:
        s: bf16 CPU buffer, updated in place.
        t: bf16 CPU addend with as many elements.

    Returns:
        The element-adds with a finite nonzero ``t`` into a finite ``s`` that left ``s`` unchanged
        (``strategies.absorbed``).
    """
    _check("s", s, (torch.bfloat16,), s.numel())
    _check("t", t, (torch.bfloat16,), s.numel())
    k = _kernels()
    _threads(_numba())
    nan = np.uint16(bf16_nan_bits())
    tb = _bits(t.contiguous())
    return _inplace(lambda sb: k.naive_add(sb, tb, nan), s)


def kahan_add_bf16(s: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> int:
    """One bf16 Kahan step in place on ``(s, c)``: the bits of ``strategies.kahan.kahan_step``.

    ``y = RN(t - c); u = RN(s + y); c = RN(RN(u - s) - y); s = u``, each op rounded to bf16.

    Args:
        s: bf16 CPU running sum, updated in place.
        c: bf16 CPU compensation, updated in place.
        t: bf16 CPU addend.

    Returns:
        The element-adds with a finite nonzero ``t`` into a finite ``s`` that changed neither
        ``s`` nor ``c``.
    """
    _check("s", s, (torch.bfloat16,), s.numel())
    _check("c", c, (torch.bfloat16,), s.numel())
    _check("t", t, (torch.bfloat16,), s.numel())
    k = _kernels()
    _threads(_numba())
    nan = np.uint16(bf16_nan_bits())
    tb = _bits(t.contiguous())
    return _inplace(lambda sb, cb: k.kahan_add(sb, cb, tb, nan), s, c)


def sr_add_bf16(s: torch.Tensor, t: torch.Tensor, key: int, count_lost: bool) -> int:
    """``s <- SR_bf16(s + t)`` of the exact sum, in place: the bits of ``rounding.sr_bf16_sum_keyed``.

    The module docstring has the rule: the fast path's 16 random bits (element i on lane i % 4 of
    ``splitmix64(key, i // 4)``) on the fp32 sum rounded down, and where the fp32 TwoSum error can
    still tip the outcome, a decision on it from ``_random.pair_key(key)``.  The same bits as
    ``strategies.stochastic.stochastic_step`` with the kernels off.

    Args:
        s: bf16 CPU buffer, updated in place.
        t: bf16 CPU addend with as many elements.
        key: The stream's key for this add.
        count_lost: Whether to return the lost element-adds (else 0).

    Returns:
        The lost element-adds as ``strategies.absorbed`` defines them, or 0.
    """
    _check("s", s, (torch.bfloat16,), s.numel())
    _check("t", t, (torch.bfloat16,), s.numel())
    k = _kernels()
    _threads(_numba())
    nan = np.uint16(bf16_nan_bits())
    tb = _bits(t.contiguous())
    pkey = _key(_random.pair_key(key))
    lost = _inplace(lambda sb: k.sr_add(sb, tb, _key(key), pkey, nan), s)
    return lost if count_lost else 0


def count_nonfinite_bf16(t: torch.Tensor) -> int:
    """Number of non-finite (Inf or NaN) elements of a bf16 CPU tensor, in one parallel pass.

    Torch's ``int((~torch.isfinite(t)).sum())`` costs dozens of times a bf16 ``add_`` on CPU (a bool
    temporary, then an int64 reduction); this is what an accumulator's ``nonfinite_inputs`` needs.

    Args:
        t: bf16 CPU tensor (any layout; a non-contiguous one is copied first).

    Returns:
        The count, as ``int((~torch.isfinite(t)).sum())`` gives it.
    """
    _check("t", t, (torch.bfloat16,), t.numel())
    k = _kernels()
    _threads(_numba())
    return int(k.count_nonfinite(_bits(t.contiguous())))
