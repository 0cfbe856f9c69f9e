"""Rounding into any :class:`~precision_lab.formats.Format`: pure Tensor -> Tensor functions.

``round_nearest`` (ties to even), ``round_stochastic`` and ``round_toward_zero`` return a tensor of
``x``'s dtype whose values are representable in the target format (or write them into ``out=``, a
tensor of ``x``'s dtype or of the format's native dtype).  Inputs may be fp16, bf16, fp32 or fp64,
on any device.

How the result is computed (every step exact, so the only rounding is the one we ask for):

* **Generic path** (any format, any input).  In float64, write ``|x| = y * q`` where
  ``q = 2**(max(E, emin) - mantissa_bits)`` is the format's spacing at ``|x|`` (E = floor(log2|x|))::

        |x| = 1.b1 b2 ... bm | b(m+1) ... b52  x 2^E
              <-- kept ----> <-- discarded --->
        y   = |x| / q        an exact power-of-two scaling; the discarded bits become frac(y)

  then round ``y`` to an integer (half to even, floor, or stochastically) and scale back by ``q``.
  Below ``2**emin`` the spacing stays at the subnormal quantum, which is what gradual underflow
  means; with ``subnormals=False`` the tiny results are then flushed to a signed zero.  Because the
  whole computation happens once in fp64 there is no double rounding: fp64 inputs are correctly
  rounded (unlike torch's and ml_dtypes' fp64 -> bf16/fp16/fp8 casts, which go through fp32).
* **Native fast paths** (fp32 input, the format has a torch dtype): torch's fp32 -> bf16/fp16/fp8
  casts are correctly rounded (checked exhaustively against ml_dtypes in the tests), so
  ``round_nearest`` uses them; fp8_e4m3's cast saturates, so overflow is patched to NaN.
  ``round_stochastic`` to bf16 adds 16 random bits below the kept ones and truncates::

        fp32 bits   s eeeeeeee mmmmmmm | llllllllllllllll
                  + 0 00000000 0000000 | rrrrrrrrrrrrrrrr      r uniform in [0, 2^16)
        truncate    s eeeeeeee mmmmmmm | 0000000000000000      carry => rounded up

  which rounds up with probability exactly l / 2^16 = (x - down) / (up - down) (the carry ripples
  into the exponent at a binade edge, as it should).  On CPU a compiled kernel does this in one
  pass (:mod:`precision_lab._native`); the pure-torch version gives the same bits.

* **Exact sums** (for the stochastic accumulation strategy): :func:`sr_bf16_sum_keyed` and
  :func:`round_stochastic_sum_keyed` round ``a + b`` itself, not a wide sum rounded to nearest
  first, through TwoSum ``a + b = hi + lo`` and a second random decision on ``lo`` (from
  ``_random.pair_key(key)``) in the rare case that ``lo`` can still change the outcome; where
  ``lo == 0`` they give the bits of rounding ``hi``.

Overflow: results beyond ``fmt.max`` become ±Inf where the format has Inf; in fp8_e4m3 (no Inf)
they become NaN, as in ml_dtypes.  ``saturate=True`` maps overflow *and* ±Inf inputs to ±max in
every format (CUDA's "SATFINITE" conversion mode).  A bf16 or fp16 input whose rounded value is
not a number of its own dtype (fp16 65504 rounded to bf16 is 65536) raises ``ValueError`` rather
than being rounded a second time by the cast back.  ``round_toward_zero`` never overflows a finite input (IEEE: it returns ±max).  NaN stays NaN.
"""

from __future__ import annotations

import math

import torch

from precision_lab import _random
from precision_lab.checks import check_int
from precision_lab.formats import Format, get_format

__all__ = ["round_nearest", "round_stochastic", "round_toward_zero"]

_FLOAT_INPUTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NATIVE_RN_FROM_FP32 = ("bf16", "fp16", "fp8_e4m3", "fp8_e5m2")
_E4M3_OVERFLOW = 464.0  # midpoint of 448 and 480 (480 would be the NaN pattern): ties go to even 448


# --------------------------------------------------------------------------------------------------
# argument checking
# --------------------------------------------------------------------------------------------------
def _check(x: torch.Tensor, fmt: str | Format, out: torch.Tensor | None) -> Format:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_INPUTS:
        raise ValueError(f"x has dtype {x.dtype}; rounding takes {', '.join(map(str, _FLOAT_INPUTS))}")
    f = get_format(fmt)
    if out is not None:
        allowed = {x.dtype} | ({f.torch_dtype} if f.torch_dtype is not None else set())
        if out.dtype not in allowed:
            raise ValueError(
                f"out has dtype {out.dtype}; for x of {x.dtype} into {f.name} it must be one of {sorted(map(str, allowed))}"
            )
        if out.shape != x.shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, x has shape {tuple(x.shape)}")
        if out.device != x.device:
            raise ValueError(f"out is on {out.device}, x on {x.device}")
    return f


def _finish(result: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Return ``result`` in x's dtype, or copy it into ``out`` (exact: values are representable)."""
    if out is None:
        if result.dtype == x.dtype:
            return result
        cast = result.to(x.dtype)
        if x.dtype in (torch.float16, torch.bfloat16) and not bool(
            (cast.to(result.dtype) == result).logical_or_(torch.isnan(result)).all()
        ):
            bad = result[(cast.to(result.dtype) != result) & ~torch.isnan(result)][0].item()
            raise ValueError(
                f"the rounded value {bad!r} is not representable in the input dtype {x.dtype}; "
                "pass x as float32/float64 or give out= of the format's dtype"
            )
        return cast
    out.copy_(result)
    return out


# --------------------------------------------------------------------------------------------------
# generic exact path (fp64 arithmetic, any format)
# --------------------------------------------------------------------------------------------------
def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact 2**exponent in float64 for integer exponents in [-1074, 1023], built from bits."""
    normal = ((exponent.clamp(min=-1022) + 1023) << 52).view(torch.float64)
    subnormal = (torch.ones_like(exponent) << (exponent.clamp(-1074, -1023) + 1074)).view(torch.float64)
    return torch.where(exponent >= -1022, normal, subnormal)


def _scale(a: torch.Tensor, f: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Split |x| (float64, finite, >= 0) as y * q with q the format's spacing at |x|; both exact."""
    _, e = torch.frexp(a)  # a = m * 2^e, m in [0.5, 1): floor(log2 a) = e - 1 (a = 0 gives e = 0)
    qexp = ((e.to(torch.int64) - 1).clamp(min=f.emin) - f.mantissa_bits).clamp(min=-1074)
    q = _pow2(qexp)
    return a / q, q  # division by a power of two: exact, and y < 2^(m+1) stays far from overflow


def _finalize(x64: torch.Tensor, mag: torch.Tensor, f: Format, *, saturate: bool, rz: bool) -> torch.Tensor:
    """Apply the sign, overflow, flush-to-zero and non-finite rules to rounded magnitudes."""
    fmax = f.max
    over = mag > fmax
    if rz or saturate:
        mag = torch.where(over, torch.full_like(mag, fmax), mag)
    elif f.has_inf:
        mag = torch.where(over, torch.full_like(mag, math.inf), mag)
    else:
        mag = torch.where(over, torch.full_like(mag, math.nan), mag)
    if not f.subnormals:
        mag = torch.where(mag < f.smallest_normal, torch.zeros_like(mag), mag)
    res = torch.copysign(mag, x64)
    # Non-finite inputs: NaN stays NaN; with saturate ±Inf -> ±max ("SATFINITE"); otherwise Inf stays
    # Inf where the format has it, else becomes NaN.
    if saturate:
        inf_to = torch.copysign(torch.full_like(x64, fmax), x64)
    elif f.has_inf:
        inf_to = x64
    else:
        inf_to = torch.full_like(x64, math.nan)
    res = torch.where(torch.isinf(x64), inf_to, res)
    return torch.where(torch.isnan(x64), x64, res)


def _generic(
    x: torch.Tensor, f: Format, mode: str, *, saturate: bool = False, key: int = 0, random_bits: int | None = None
) -> torch.Tensor:
    """Round any float tensor into ``f`` in float64 arithmetic; returns float64."""
    x64 = x.to(torch.float64)
    a = torch.nan_to_num(x64.abs(), nan=0.0, posinf=0.0)  # non-finite handled in _finalize
    y, q = _scale(a, f)
    if mode == "nearest":
        r = torch.round(y)  # round half to even
    elif mode == "zero":
        r = torch.floor(y)
    else:
        fl = torch.floor(y)
        r = fl + bernoulli(y - fl, key, random_bits)  # frac = y - floor(y) is exact
    return _finalize(x64, r * q, f, saturate=saturate, rz=mode == "zero")


_NATIVE_MIN_NUMEL = 4096  # below this, a numba launch costs more than the eager torch ops


def _round_any(
    x: torch.Tensor, f: Format, mode: str, *, saturate: bool = False, key: int = 0, random_bits: int | None = None
) -> torch.Tensor:
    """:func:`_generic` with x's dtype out (fp32/fp64 x), through the compiled kernel where it applies.

    The kernel (:mod:`precision_lab._native_generic`) gives the same bits in one pass; it is used
    on CPU for tensors of at least ``_NATIVE_MIN_NUMEL`` elements when every result of ``f`` is a
    number of x's dtype (otherwise ``_finish`` must see the float64 result to refuse it).
    """
    from precision_lab import _native_generic

    if (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.numel() >= _NATIVE_MIN_NUMEL
        and f.fits_in(get_format(x.dtype))
        and _native_generic.enabled()
    ):
        xc = x.contiguous()
        res = torch.empty_like(xc)
        _native_generic.round_into(xc, res, f, mode, saturate=saturate, key=key, random_bits=random_bits)
        return res
    return _generic(x, f, mode, saturate=saturate, key=key, random_bits=random_bits)


def bernoulli(
    frac: torch.Tensor, key: int, random_bits: int | None = None, *, index: torch.Tensor | None = None
) -> torch.Tensor:
    """One exact Bernoulli(frac) draw per element, frac in [0, 1) float64; returns 0.0/1.0 float64.

    A keyed building block (not in ``__all__``): element i of the flat tensor draws from the
    counter-based stream ``key`` (:mod:`precision_lab._random`), so equal keys give equal draws.
    ``index`` (int64, frac's shape) gives each element its counter instead of its flat position, so
    that a subset of a tensor draws the bits its elements have in the whole.

    Element i compares U_i ~ Uniform[0, 1) with frac_i, U_i's bits coming 63 at a time from the
    counter-based stream.  With w the first 63 bits and F = floor(frac * 2^63): w < F means U < frac
    for sure, w > F means U > frac for sure, and w == F (probability 2^-63) is settled by the next
    63 bits against the exact residual frac * 2^63 - F.  So P(1) = frac exactly, for any dyadic frac.

    With ``random_bits=r`` only r bits are used, as hardware SR units do: P(1) = floor(frac*2^r)/2^r,
    biased towards zero by up to 2^-r ulp.
    """
    idx = _counters(frac, index)
    if random_bits is not None:
        scaled = torch.ldexp(frac, torch.tensor(random_bits, dtype=torch.float64, device=frac.device))
        w = _random._lsr(_random.splitmix64(key, idx), 64 - random_bits)
        return (w < torch.floor(scaled).to(torch.int64)).to(torch.float64)
    return _uniform_below([frac], key, idx)[0].to(torch.float64)


def _counters(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """The counters of x's elements in the random stream: ``index``, or the flat positions."""
    if index is not None:
        return index
    return torch.arange(x.numel(), device=x.device, dtype=torch.int64).view(x.shape)


_TWO63 = 9223372036854775808.0  # 2^63


def _uniform_below(thresholds: list[torch.Tensor], key: int, idx: torch.Tensor) -> list[torch.Tensor]:
    """``U < th`` (bool) for each threshold th in [0, 1] (float64), one U per element for all of them.

    U's bits are the 63-bit words ``splitmix64(key_level, idx) >> 1`` (``key`` at level 0, then
    ``mix_key(key, level)``), compared level by level as :func:`bernoulli` describes; a threshold
    of 1 is always above U.  The comparisons are exact for any dyadic thresholds.
    """
    residual = list(thresholds)
    below = [th >= 1.0 for th in thresholds]
    pending = [~b for b in below]
    level = 0
    while True:
        w = _random._lsr(_random.splitmix64(_random.mix_key(key, level) if level else key, idx), 1)
        for j, res in enumerate(residual):
            scaled = torch.where(pending[j], res, 0.0) * _TWO63  # exact; 0 where decided (no 2^63 overflow)
            big_f = torch.floor(scaled)
            fi = big_f.to(torch.int64)
            below[j] = below[j] | (pending[j] & (w < fi))
            pending[j] = pending[j] & (w == fi)
            residual[j] = scaled - big_f  # exact fractional part
        if not any(bool(p.any()) for p in pending):
            return below
        level += 1


def _bernoulli_pow2(mant: torch.Tensor, exp: torch.Tensor, key: int, idx: torch.Tensor) -> torch.Tensor:
    """Bernoulli(mant * 2^exp) (bool) for mant in [0, 1) float64 and int64 exp <= 0, underflow-free.

    The bits of :func:`bernoulli` of the same probability (the same words, the same floors per
    level), but the probability is kept as (mantissa, exponent), so one far below float64's
    smallest number is still exact: a level whose scaled probability is below 1 has F = 0 and just
    shifts the exponent by 63.
    """
    up = torch.zeros_like(mant, dtype=torch.bool)
    pending = torch.ones_like(up)
    level = 0
    while True:
        w = _random._lsr(_random.splitmix64(_random.mix_key(key, level) if level else key, idx), 1)
        e63 = exp + 63
        wide = e63 > 0  # the scaled probability may reach 1: it is at most 2^63 (exact in float64)
        scaled = torch.where(wide, torch.ldexp(mant, e63.clamp(max=63).to(torch.float64)), 0.0)
        big_f = torch.floor(scaled)
        fi = big_f.to(torch.int64)
        up = up | (pending & (w < fi))
        pending = pending & (w == fi)
        if not bool(pending.any()):
            return up
        m2, e2 = torch.frexp(scaled - big_f)  # exact fractional part, renormalised
        mant = torch.where(wide, m2, mant)
        exp = torch.where(wide, e2.to(torch.int64), e63)
        level += 1


# --------------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------------
def round_nearest(
    x: torch.Tensor, fmt: str | Format, *, saturate: bool = False, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Round to the nearest number of ``fmt``, ties to even.

    Args:
        x: fp16, bf16, fp32 or fp64 tensor, any device.
        fmt: Target format (name, ``eXmY`` or :class:`Format`).
        saturate: Overflow and ±Inf inputs become ±max (like CUDA's SATFINITE conversions)
            instead of ±Inf/NaN.
        out: Optional tensor of x's dtype or of the format's native dtype to write into.

    Returns:
        A tensor of x's dtype (or ``out``) holding values representable in ``fmt``.
    """
    f = _check(x, fmt, out)
    if get_format(x.dtype).fits_in(f) and not saturate:
        return _finish(x.clone() if out is None else x, x, out)  # every x is representable
    w = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # exact widening
    if w.dtype == torch.float32 and f.name in _NATIVE_RN_FROM_FP32 and (not saturate or f.name == "fp8_e4m3"):
        native = out if out is not None and out.dtype == f.torch_dtype and f.name != "fp8_e4m3" else None
        if native is not None:
            native.copy_(w)  # torch's fp32 -> bf16/fp16/fp8_e5m2 cast rounds to nearest even
            return native
        r = w.to(f.torch_dtype).to(torch.float32)
        if f.name == "fp8_e4m3":  # torch's cast saturates and sends Inf to 448
            bad = w.abs() > _E4M3_OVERFLOW  # also true for ±Inf
            fill = torch.copysign(torch.full_like(w, f.max), w) if saturate else torch.full_like(w, math.nan)
            r = torch.where(bad, fill, r)
        return _finish(r, x, out)
    if x.dtype == torch.float64 and f.name == "fp32" and not saturate:
        return _finish(x.to(torch.float32).to(torch.float64), x, out)  # one correctly rounded cast
    return _finish(_round_any(w, f, "nearest", saturate=saturate), x, out)


def round_toward_zero(x: torch.Tensor, fmt: str | Format, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Round toward zero (truncate) into ``fmt``; finite values never overflow (IEEE: ±max).

    Args:
        x: fp16, bf16, fp32 or fp64 tensor, any device.
        fmt: Target format.
        out: Optional tensor of x's dtype or of the format's native dtype to write into.
    """
    f = _check(x, fmt, out)
    w = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # exact widening
    return _finish(_round_any(w, f, "zero"), x, out)


def round_stochastic(
    x: torch.Tensor,
    fmt: str | Format,
    *,
    generator: torch.Generator | None = None,
    random_bits: int | None = None,
    saturate: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stochastic rounding: up with probability (x - down) / (up - down), else down.

    The result is always one of the two neighbours of x in ``fmt`` (x itself if representable),
    and E[result] = x exactly (for finite results).  The random bits come from a counter-based hash
    keyed by one draw from ``generator`` (see :mod:`precision_lab._random`), so the same generator
    state gives the same bits on every device and path.

    Args:
        x: fp16, bf16, fp32 or fp64 tensor, any device.
        fmt: Target format.
        generator: Source of the key (torch's default generator when ``None``).
        random_bits: Use only this many random bits (1..62), as hardware SR units do; the
            probability becomes floor(p * 2^r) / 2^r, biased toward zero. ``None``: exact.
        saturate: Overflow (and ±Inf) become ±max instead of ±Inf/NaN.
        out: Optional tensor of x's dtype or of the format's native dtype to write into.
    """
    f = _check(x, fmt, out)
    if random_bits is not None:
        check_int(random_bits, "random_bits (or None: exact)", minimum=1, maximum=62)
    key = _random.derive_key(generator)
    if x.dtype == torch.float32 and f.name == "bf16" and not saturate and (random_bits is None or random_bits <= 16):
        return _finish_sr_bf16(x, key, 16 if random_bits is None else random_bits, out)
    if get_format(x.dtype).fits_in(f) and not saturate:
        return _finish(x.clone() if out is None else x, x, out)
    w = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # exact widening
    return _finish(_round_any(w, f, "stochastic", saturate=saturate, key=key, random_bits=random_bits), x, out)


def round_stochastic_keyed(x: torch.Tensor, fmt: Format, key: int) -> torch.Tensor:
    """Stochastic rounding of an fp32 or fp64 ``x`` into ``fmt`` with the random stream ``key``.

    A keyed building block (not in ``__all__``) for callers that derive the key themselves
    (:func:`~precision_lab._random.derive_key`), such as the stochastic accumulation strategy.  No
    argument checks, no ``out=``, no saturation, all random bits; every result of ``fmt`` must be a
    number of x's dtype.  fp32 into bf16 takes the 16-bit fast path, everything else the exact
    generic path: the bits :func:`round_stochastic` gives for a generator whose next key is ``key``.

    Args:
        x: fp32 or fp64 tensor, any device.
        fmt: Target format.
        key: Key of the counter-based random stream.

    Returns:
        A tensor of x's dtype holding values representable in ``fmt``.
    """
    if x.dtype == torch.float32 and fmt.name == "bf16":
        return _finish_sr_bf16(x, key, 16, None)
    return _round_any(x, fmt, "stochastic", key=key)


# --------------------------------------------------------------------------------------------------
# stochastic rounding of an exact sum a + b = hi + lo (the stochastic accumulation strategy)
# --------------------------------------------------------------------------------------------------
def _two_sum_nan(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Knuth's TwoSum: hi = fl(a + b), lo = a + b - hi exactly; lo is NaN where hi is not finite.

    (Where hi is ±Inf or NaN a step computes Inf - Inf or carries the NaN.)  Three temporaries.
    """
    hi = a + b
    z = hi - a  # b's part of hi
    lo = hi - z  # a's part of hi
    lo.neg_().add_(a)  # a - a's part
    z.neg_().add_(b)  # b - b's part
    return hi, lo.add_(z)


def _two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Knuth's TwoSum: hi = fl(a + b), lo = a + b - hi exactly (0 where hi is not finite)."""
    hi, lo = _two_sum_nan(a, b)
    return hi, torch.where(torch.isfinite(hi), lo, 0.0)


def round_stochastic_sum_keyed(a: torch.Tensor, b: torch.Tensor, fmt: Format, key: int) -> torch.Tensor:
    """``SR_fmt(a + b)`` of the EXACT sum of two float64 tensors, with the random stream ``key``.

    A keyed building block (not in ``__all__``) of the stochastic accumulation strategy, for sums
    that float64 need not hold: ``a + b = hi + lo`` (TwoSum).  Where ``lo == 0`` the result is
    :func:`round_stochastic_keyed` of ``hi``, bit for bit.  Elsewhere (and where ``a + b`` overflows
    float64 although both are finite: then ``a/2 + b/2`` is rounded, at half scale) the exact value
    decides, with ``A = |hi|`` rounded down to ``Alo`` in float64 (``Alo = A`` if ``lo`` points away
    from zero, else A's predecessor) and ``g = ulp64(Alo) / q`` (q: the target's spacing there)::

        |a + b| = fl * q + (f0 + g * psi) * q      fl = floor(Alo / q), f0 = Alo / q - fl,
                                                   psi in (0, 1): where |a + b| lies in [Alo, Alo + ulp)
        up  <=>  U < f0                                 (U: the words of key, as for hi alone)
             or  f0 <= U < f0 + g  and  C               (C ~ Bernoulli(psi) from _random.pair_key(key))

    ``theta = |lo| / ulp64`` (the distance of the exact sum from ``hi`` in float64 spacings on lo's
    side) is exact, and ``C = [U' < theta]``, negated where ``lo`` points toward zero
    (``psi = 1 - theta`` there).  P(up) = f0 + g psi, the exact distance ratio, for every addend:
    the second stream only ever sees the elements whose first decision ``lo`` can still change.

    Args:
        a: float64 tensor (numbers of ``fmt``, or any float64 numbers).
        b: float64 tensor of a's shape and device.
        fmt: Target format (any; its numbers fit in float64).
        key: Key of the counter-based random stream (``_random.derive_key``).

    Returns:
        A float64 tensor of the rounded sums; NaN/Inf inputs as IEEE addition gives them.
    """
    hi, lo = _two_sum_nan(a, b)
    out = _round_any(hi, fmt, "stochastic", key=key)
    over = torch.isnan(lo).reshape(-1)
    redo = (lo != 0).reshape(-1)  # a finite sum that float64 did not hold (or a NaN lo, see over)
    if bool(over.any()):  # NaN/Inf inputs stay as rounded; finite ones overflowed (or a step of TwoSum did)
        over &= torch.isfinite(a).reshape(-1) & torch.isfinite(b).reshape(-1)
        redo &= ~torch.isnan(lo).reshape(-1)
        redo |= over
    if not bool(redo.any()):
        return out
    idx = redo.nonzero().squeeze(1)
    a1, b1, ov = a.reshape(-1)[idx], b.reshape(-1)[idx], over[idx]
    shift = ov.to(torch.int64)  # 1: the exact sum is 2 * (a/2 + b/2), rounded at half scale
    h, low = _two_sum(torch.where(ov, a1 * 0.5, a1), torch.where(ov, b1 * 0.5, b1))  # halving is exact here
    out.view(-1)[idx] = _sr_pair(h, low, shift, fmt, key, idx)  # out is a new tensor: ours to write
    return out


def _sr_pair(
    hi: torch.Tensor, lo: torch.Tensor, shift: torch.Tensor, f: Format, key: int, idx: torch.Tensor
) -> torch.Tensor:
    """SR into ``f`` of the exact ``2^shift * (hi + lo)`` (float64, hi finite, |lo| <= ulp(hi)/2)."""
    big = hi.abs()
    d = torch.where(hi < 0, -lo, lo)  # |x| = big + d
    down = d < 0
    alo = torch.where(down, torch.nextafter(big, torch.zeros_like(big)), big)  # RD64(|x|), > 0 where d != 0
    _, e = torch.frexp(alo)
    expo = e.to(torch.int64) - 1  # floor(log2 alo)
    ulp_exp = expo.clamp(min=-1022) - 52  # ulp64(alo) = 2^ulp_exp: the float64 gap above alo
    qexp = ((expo + shift).clamp(min=f.emin) - f.mantissa_bits).clamp(min=-1074) - shift  # spacing / 2^shift
    q = _pow2(qexp)
    y = alo / q  # exact (power-of-two scaling)
    fl = torch.floor(y)
    f0 = y - fl
    f1 = f0 + _pow2(ulp_exp) / q  # exact: (alo + ulp) / q - fl, at most 1
    first, second = _uniform_below([f0, f1], key, idx)
    up = first
    tip = second & ~first & (d != 0)
    if bool(tip.any()):
        sub = tip.nonzero().squeeze(1)
        m, ed = torch.frexp(d[sub].abs())
        c = _bernoulli_pow2(m, ed.to(torch.int64) - ulp_exp[sub], _random.pair_key(key), idx[sub])
        up = up.clone()
        up[sub] = c ^ down[sub]
    mag = (fl + up.to(torch.float64)) * q * _pow2(shift)  # may overflow to Inf: _finalize's rules apply
    return _finalize(hi, mag, f, saturate=False, rz=False)


def sr_bf16_sum_keyed(a: torch.Tensor, b: torch.Tensor, key: int) -> torch.Tensor:
    """``SR_bf16(a + b)`` of the EXACT sum of two fp32 tensors of bf16 numbers (returns fp32).

    The bf16 fast path's rule (:func:`_sr_bf16_torch`) applied to the exact sum ``a + b = hi + lo``
    (TwoSum in fp32; exact, as a and b are bf16 numbers: an fp32 overflow means ``|a + b| >= 2^128``,
    which rounds to Inf anyway).  With ``Alo`` the fp32 bits of ``|a + b|`` rounded down in fp32
    (``hi``'s bits, minus one where ``lo`` points toward zero), L = its low 16 bits and r the
    element's 16 random bits (:func:`sr_bf16_random16`)::

        result = (Alo + r + C) & 0xFFFF0000      (bits; the sign rides along)
        C      = 0 unless lo != 0 and L + r == 0xFFFF (probability 2^-16); there C = [U' < theta]
                 xor [lo points toward zero], theta = |lo| / ulp32(Alo), U' from _random.pair_key(key)

    so P(up) = (L + psi) / 2^16 with psi in [0, 1) the position of the exact sum between Alo and the
    next fp32 number: the exact distance ratio.  Where ``lo == 0`` these are the bits of the fast
    path applied to ``hi``.  The compiled kernel ``_native.sr_add_bf16`` gives the same bits.
    """
    hi, lo = _two_sum_nan(a, b)
    flat_h, flat_l = hi.reshape(-1), lo.reshape(-1)
    hb = flat_h.view(torch.int32)
    live = flat_l != 0
    live &= flat_l == flat_l  # a finite sum that fp32 did not hold (lo is NaN where hi is not finite)
    toward = torch.bitwise_xor(hb, flat_l.view(torch.int32)).bitwise_right_shift_(31)  # -1: lo points toward zero
    toward.mul_(live)
    v = sr_bf16_random16(key, flat_h.numel(), flat_h.device)
    v += hb
    v += toward  # bits of Alo (|s + t| rounded down in fp32) + r
    res = v & -65536  # -65536 == 0xFFFF0000 as int32
    tip = live & ((v & 0xFFFF) == 0xFFFF)
    if bool(tip.any()):
        sub = tip.nonzero().squeeze(1)
        alo = hb[sub] + toward[sub]
        expo = ((alo >> 23) & 0xFF).clamp(min=1).to(torch.float64)  # ulp32(Alo) = 2^(expo - 150)
        theta = torch.ldexp(flat_l[sub].double().abs(), 150.0 - expo)  # exact, >= 2^-237
        c = _uniform_below([theta], _random.pair_key(key), sub)[0] ^ (toward[sub] != 0)
        res[sub] += c.to(torch.int32) << 16
    out = torch.where(torch.isnan(flat_h), flat_h, res.view(torch.float32))  # a NaN payload must not carry
    return out.view(hi.shape)


# --------------------------------------------------------------------------------------------------
# fp32 -> bf16 stochastic rounding fast path
# --------------------------------------------------------------------------------------------------
def sr_bf16_random16(key: int, n: int, device: torch.device | str) -> torch.Tensor:
    """The 16-bit random numbers of the bf16 fast path, as int32 in [0, 2^16).

    Element i uses lane i % 4 of the splitmix64 word for counter i // 4 (bits 16*lane .. 16*lane+15).
    """
    blocks = _random.splitmix64(key, torch.arange((n + 3) // 4, dtype=torch.int64, device=device))
    lanes = torch.stack([_random._lsr(blocks, 16 * j) & 0xFFFF for j in range(4)], dim=1)
    return lanes.reshape(-1)[:n].to(torch.int32)


def _sr_bf16_torch(x: torch.Tensor, key: int, random_bits: int) -> torch.Tensor:
    """Pure-torch fp32 -> bf16 stochastic rounding (returns fp32 holding bf16 values)."""
    flat = x.reshape(-1)
    r = sr_bf16_random16(key, flat.numel(), x.device)
    if random_bits < 16:
        r = r & ~((1 << (16 - random_bits)) - 1)  # keep the top r of the 16 random bits
    bits = flat.view(torch.int32)
    rounded = ((bits + r) & -65536).view(torch.float32)  # -65536 == 0xFFFF0000 as int32
    rounded = torch.where(torch.isnan(flat), flat, rounded)  # a NaN payload must not carry into Inf
    return rounded.view(x.shape)


def _finish_sr_bf16(x: torch.Tensor, key: int, random_bits: int, out: torch.Tensor | None) -> torch.Tensor:
    from precision_lab import _native

    if x.device.type == "cpu" and _native.enabled(x.numel()):
        xc = x.contiguous()
        if out is not None and out.is_contiguous():
            _native.sr_bf16(xc, out, key, random_bits)
            return out
        res = torch.empty_like(xc)
        _native.sr_bf16(xc, res, key, random_bits)
        return _finish(res, x, out)
    return _finish(_sr_bf16_torch(x.contiguous(), key, random_bits), x, out)
