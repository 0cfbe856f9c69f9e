"""Compiled CPU kernels (numba) for the generic exact rounding of :func:`precision_lab.rounding._generic`.

``_generic`` rounds into any :class:`~precision_lab.formats.Format` with ~25 eager float64 torch
ops.  These kernels give the same bits in one pass over fp32 or fp64 input, on the integer view of
``x`` widened to float64 (exact, and an fp32 subnormal becomes an fp64 normal)::

    A = |x| bits   0 eeeeeeeeeee mmmm...mmmm | dddd...dddd        (1 + 11 + 52 bits)
                                 <-- kept --> <-- s bits ->
    S = 1.mmm...m ddd...d  (the significand with its implicit bit; 0.mmm... for fp64 subnormals)

With ``E = max(exponent, -1022)`` the target's quantum is ``q = 2**(max(E, emin) - m)``, so the
number of discarded bits is ``s = 52 - m + max(0, emin - E) >= 0`` and ``frac = (S mod 2**s) / 2**s``
exactly (this is ``y - floor(y)`` of ``_generic``).  Rounding adds 0 or 1 to the kept bits::

    s <= 52:  result = ((A >> s) + inc) << s     the carry ripples into the exponent at a binade
                                                 edge (and into the Inf pattern past fp64's max)
    s >= 53:  result = inc ? 2**(emin - m) : 0   (|x| < q: only 0 and the smallest quantum)

with ``inc`` = round half to even (``"nearest"``), 0 (``"zero"``) or the Bernoulli(frac) draw of
``bernoulli`` (``"stochastic"``): the 63-bit word ``splitmix64(key, i) >> 1`` of flat element ``i``
against ``F = floor(frac * 2**63)``, up iff ``w < F``.  A tie ``w == F`` with bits of frac left below
2**-63 (probability 2**-63 per element) is settled by the serial refinement kernel, level by level
with the keys ``_random.mix_key(key, level)`` as ``bernoulli`` does; with ``random_bits=r`` the
comparison is ``splitmix64(key, i) >> (64 - r) < floor(frac * 2**r)``.  Overflow, flush-to-zero,
signed zeros, ±Inf and NaN follow ``_finalize`` (compared on bits: non-negative doubles order like
their bit patterns), and the float64 result is narrowed to fp32 by one correctly rounded cast, as
``_finish`` does (2**128 from rounding fp32's max into e11m10 becomes Inf there too).

Control, as in :mod:`precision_lab._native`: numba is imported on first use and the kernels are
compiled once (``cache=True``: later processes load them from ``__pycache__``); :func:`enabled`
says whether numba imports and ``PRECISION_LAB_NATIVE`` is not ``0``/``false``/``no``/``off``.  The
kernels use ``torch.get_num_threads()`` threads (capped by ``NUMBA_NUM_THREADS``); each element is
independent, so the bits do not depend on the thread count.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import torch

from precision_lab import _random
from precision_lab.formats import Format

__all__ = ["enabled", "round_into"]

_ENV_VAR = "PRECISION_LAB_NATIVE"
_OFF = ("0", "false", "no", "off")
_MODES = ("nearest", "zero", "stochastic")
_INF_BITS = 0x7FF0000000000000
_NAN_BITS = 0x7FF8000000000000  # the float64 bits of math.nan, as _finalize writes it
_SIGN_BIT = -(1 << 63)  # 0x8000000000000000 as int64
_MAX_LEVELS = 20  # refinement levels: frac has bits down to 2**-1073, i.e. 18 words of 63 bits


def enabled() -> bool:
    """Whether the compiled kernels can run: numba imports and ``PRECISION_LAB_NATIVE`` is not off.

    Returns:
        False where ``PRECISION_LAB_NATIVE`` is ``0``/``false``/``no``/``off`` (as for
        :mod:`precision_lab._native`) or numba is missing; the variable is read at every call.
    """
    if os.environ.get(_ENV_VAR, "").strip().lower() in _OFF:
        return False
    return _numba() is not None


def _numba() -> ModuleType | None:
    """The numba module, imported once on first use by :mod:`precision_lab._native` (None if missing)."""
    from precision_lab import _native

    return _native._numba()


def _f64_bits(v: float) -> int:
    """The float64 bit pattern of ``v`` as a signed int64 value."""
    return int(np.float64(v).view(np.int64))


def _params(fmt: Format, mode: str, saturate: bool) -> tuple[int, ...]:
    """The kernels' format arguments: m, emin and float64 bit patterns (int64) for _finalize's rules."""
    fmax = _f64_bits(fmt.max)
    qmin = _f64_bits(fmt.smallest_subnormal)  # 2**(emin - m): the smallest quantum of the layout
    flush = 0 if fmt.subnormals else _f64_bits(fmt.smallest_normal)  # |result| bits below this -> 0
    over = fmax if mode == "zero" or saturate else (_INF_BITS if fmt.has_inf else _NAN_BITS)  # |result| > max
    # ±Inf inputs: ±max with saturate ("SATFINITE"); else kept where the format has Inf, or +NaN.
    if saturate:
        inf_to, inf_sign = fmax, _SIGN_BIT
    elif fmt.has_inf:
        inf_to, inf_sign = _INF_BITS, _SIGN_BIT
    else:
        inf_to, inf_sign = _NAN_BITS, 0
    return fmt.mantissa_bits, fmt.emin, qmin, fmax, over, flush, inf_to, inf_sign


def round_into(
    x: torch.Tensor, out: torch.Tensor, fmt: Format, mode: str, *, saturate: bool, key: int, random_bits: int | None
) -> None:
    """Round ``x`` into ``fmt`` and write the result into ``out``: the bits of ``_generic(...).to(x.dtype)``.

    Args:
        x: Contiguous CPU tensor, float32 or float64.
        out: Contiguous CPU tensor of x's dtype and shape; may be ``x`` itself, not a partial overlap.
        fmt: Target format (any layout, subnormals or not, ``"ieee"`` or ``"fn"`` encoding).
        mode: ``"nearest"`` (ties to even), ``"zero"`` or ``"stochastic"``.
        saturate: Overflow and ±Inf inputs become ±max instead of ±Inf/NaN, as in ``_finalize``.
        key: Key of the counter-based random stream (``"stochastic"`` only; any int, used mod 2**64).
        random_bits: ``None`` for the exact Bernoulli draw, or r in 1..62 random bits per element.

    Raises:
        ValueError: Unsupported dtype, device, layout or mode; the message shows the value.
    """
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x has dtype {x.dtype}; round_into takes torch.float32 or torch.float64")
    if out.dtype != x.dtype or out.shape != x.shape:
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}; x is {x.dtype} {tuple(x.shape)}")
    if x.device.type != "cpu" or out.device.type != "cpu":
        raise ValueError(f"x is on {x.device} and out on {out.device}; round_into runs on the CPU")
    if not (x.is_contiguous() and out.is_contiguous()):
        raise ValueError("x and out must be contiguous")
    px, po, nbytes = x.data_ptr(), out.data_ptr(), x.numel() * x.element_size()
    if px != po and px < po + nbytes and po < px + nbytes:
        raise ValueError("out overlaps x without being x itself")
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r}; known: {', '.join(map(repr, _MODES))}")
    if random_bits is not None and not (isinstance(random_bits, int) and 1 <= random_bits <= 62):
        raise ValueError(f"random_bits={random_bits!r}; must be an int in 1..62 or None")
    if x.numel() == 0:
        return
    k = _kernels()
    k.set_threads()
    xa = x.detach().reshape(-1).numpy()
    oa = out.detach().reshape(-1).numpy()  # views: the kernels write into out's storage

    fin = _params(fmt, mode, saturate)
    if mode == "nearest":
        k.nearest(xa, oa, *fin)
    elif mode == "zero":
        k.zero(xa, oa, *fin)
    else:
        ukey = np.uint64(key & ((1 << 64) - 1))
        if random_bits is not None:
            k.stochastic_bits(xa, oa, *fin, ukey, random_bits)
        elif k.stochastic(xa, oa, *fin, ukey) > 0:
            # Some element tied with its first 63-bit word and has bits of frac below 2**-63:
            # settle every such element exactly with the refinement words, serially.
            keys = np.array(
                [key & ((1 << 64) - 1)] + [_random.mix_key(key, lv) for lv in range(1, _MAX_LEVELS)], dtype=np.uint64
            )
            k.refine(xa, oa, *fin, keys)


# --------------------------------------------------------------------------------------------------
# kernels: plain Python until _kernels() compiles them.  numba resolves the helpers and ``_prange``
# in this module's globals at compile time, so _kernels() rebinds those names to their compiled
# versions first; defining the kernels at module level (no closures) lets numba cache them on disk.
# --------------------------------------------------------------------------------------------------
_prange = range
_GAMMA, _MUL1, _MUL2 = np.uint64(_random.GAMMA), np.uint64(_random.MUL1), np.uint64(_random.MUL2)


def _splitmix64(key, i):
    """``_random.splitmix64_int(key, i)`` on uint64 (wrapping arithmetic)."""
    z = key + np.uint64(i + 1) * _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def _split(v, m, emin):
    """Float64 v -> (sign bit, |v| bits A, s discarded bits, min(s, 62), S mod 2**s, parity of S >> s)."""
    b = np.float64(v).view(np.int64)
    a = b & np.int64(0x7FFFFFFFFFFFFFFF)
    be = a >> 52
    e = max(be, 1) - 1023  # unbiased exponent; fp64 subnormals count as -1022 (emin <= them anyway)
    s = 52 - m + max(emin - e, 0)
    sc = min(s, 62)  # S < 2**53: shifting by 62 already discards everything
    sig = (a & np.int64(0xFFFFFFFFFFFFF)) | (min(be, 1) << 52)
    rem = sig & ((np.int64(1) << sc) - 1)
    return b & np.int64(_SIGN_BIT), a, s, sc, rem, (sig >> sc) & 1


def _finish(sign, a, s, sc, inc, qmin, fmax, over, flush, inf_to, inf_sign):
    """Kept bits + inc, then _finalize's overflow, flush-to-zero, sign and non-finite rules; float64."""
    mag = ((a >> sc) + inc) << sc if s <= 52 else qmin * inc
    mag = over if mag > fmax else mag
    mag = 0 if mag < flush else mag
    res = mag | sign
    if a >= _INF_BITS:
        res = (sign | a) if a > _INF_BITS else inf_to | (sign & inf_sign)  # NaN: x itself
    return np.int64(res).view(np.float64)


def _word(rem, s, level):
    """Bits 63*level+1 .. 63*level+63 after the point of frac = rem / 2**s, and whether any follow."""
    lo = 63 * (level + 1)  # the word is floor(frac * 2**lo) mod 2**63 = floor(rem * 2**(lo - s)) mod 2**63
    if s <= lo:
        sh = lo - s
        f = (rem << sh) if sh < 63 else 0
        return f & np.int64(0x7FFFFFFFFFFFFFFF), False
    sh = s - lo
    f = (rem >> sh) if sh < 63 else 0
    return f & np.int64(0x7FFFFFFFFFFFFFFF), (rem & ((np.int64(1) << min(sh, 62)) - 1)) != 0


def _nearest(x, out, m, emin, qmin, fmax, over, flush, inf_to, inf_sign):
    for i in _prange(x.size):
        sign, a, s, sc, rem, odd = _split(x[i], m, emin)
        mask = (np.int64(1) << sc) - 1
        inc = (rem + (((mask >> 1) + odd) & mask)) >> sc  # + 011..1 (+1 if odd): ties to even; s = 0: + 0
        out[i] = _finish(sign, a, s, sc, inc, qmin, fmax, over, flush, inf_to, inf_sign)


def _zero(x, out, m, emin, qmin, fmax, over, flush, inf_to, inf_sign):
    for i in _prange(x.size):
        sign, a, s, sc, rem, odd = _split(x[i], m, emin)
        out[i] = _finish(sign, a, s, sc, 0, qmin, fmax, over, flush, inf_to, inf_sign)


def _stochastic(x, out, m, emin, qmin, fmax, over, flush, inf_to, inf_sign, key):
    pending = 0
    for i in _prange(x.size):
        sign, a, s, sc, rem, odd = _split(x[i], m, emin)
        f, more = _word(rem, s, 0)
        w = np.int64(_splitmix64(key, i) >> np.uint64(1))
        if (w == f) and more:  # undecided (probability 2**-63): out[i] is left to _refine
            pending += 1
        else:
            out[i] = _finish(sign, a, s, sc, np.int64(w < f), qmin, fmax, over, flush, inf_to, inf_sign)
    return pending


def _refine(x, out, m, emin, qmin, fmax, over, flush, inf_to, inf_sign, keys):
    for i in range(x.size):  # serial: runs only when some element is undecided after 63 bits
        sign, a, s, sc, rem, odd = _split(x[i], m, emin)
        f, more = _word(rem, s, 0)
        if not ((np.int64(_splitmix64(keys[0], i) >> np.uint64(1)) == f) and more):
            continue  # decided by _stochastic (if out is x, x[i] now holds a result: rem = 0, never undecided)
        inc = 0
        for level in range(1, keys.size):
            f, more = _word(rem, s, level)
            w = np.int64(_splitmix64(keys[level], i) >> np.uint64(1))
            if w != f or not more:  # w < f: up; w > f: down; w == f with nothing left: down
                inc = np.int64(w < f)
                break
        out[i] = _finish(sign, a, s, sc, inc, qmin, fmax, over, flush, inf_to, inf_sign)


def _stochastic_bits(x, out, m, emin, qmin, fmax, over, flush, inf_to, inf_sign, key, r):
    for i in _prange(x.size):
        sign, a, s, sc, rem, odd = _split(x[i], m, emin)
        f = (rem << (r - s)) if s <= r else (rem >> min(s - r, 63))  # floor(frac * 2**r)
        w = np.int64(_splitmix64(key, i) >> np.uint64(64 - r))
        out[i] = _finish(sign, a, s, sc, np.int64(w < f), qmin, fmax, over, flush, inf_to, inf_sign)


_HELPERS = (_splitmix64, _split, _finish, _word)
_BUILD_LOCK = threading.Lock()


def _jit(numba: ModuleType, fn: Callable[..., Any], **options: Any) -> Any:
    """numba.njit(fn), cached on disk where a cache directory is writable."""
    try:
        return numba.njit(cache=True, nogil=True, **options)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available" (read-only install)
        return numba.njit(nogil=True, **options)(fn)


@functools.cache
def _kernels() -> SimpleNamespace:
    """Compile (or load from numba's on-disk cache) the kernels; numba is imported here, on first use."""
    numba = _numba()
    if numba is None:
        raise RuntimeError(f"precision_lab._native_generic needs numba (or set {_ENV_VAR}=0)")
    with _BUILD_LOCK:
        namespace = globals()
        namespace["_prange"] = numba.prange
        for fn in _HELPERS:
            namespace[fn.__name__] = _jit(numba, fn, inline="always")

    def set_threads() -> None:
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))

    par = functools.partial(_jit, numba, parallel=True)
    return SimpleNamespace(
        nearest=par(_nearest),
        zero=par(_zero),
        stochastic=par(_stochastic),
        stochastic_bits=par(_stochastic_bits),
        refine=_jit(numba, _refine),
        set_threads=set_threads,
    )
