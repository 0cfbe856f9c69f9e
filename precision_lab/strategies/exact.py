"""The exact strategy: a superaccumulator, the exact sum of any finite fp64 addends, correctly rounded.

The reference for every other strategy: it sums the addends *as rounded to the buffer format*
(every strategy rounds its input first; format numbers are fp64 numbers), whatever the format.  The
sum is kept **exactly**, as a fixed-point integer (a Kulisch accumulator, after the designs of
ExBLAS and of Radford Neal's "small superaccumulator"), for any finite fp64 stream of any order and
any length; :meth:`SuperAccumulator.value` rounds it **once**, to nearest with ties to even, to
fp64: an exact sum beyond the largest finite fp64 rounds to ±inf as IEEE says, a subnormal sum is
returned exactly (it is a multiple of 2^-1074).

**The fixed point.**  Every finite fp64 number is ``M * 2^(e - 53)`` with an integer ``M``
(``|M| < 2^53``; ``torch.frexp`` gives ``M / 2^53`` and ``e``) and ``e - 53 >= -1126`` (the smallest
subnormal, 2^-1074, is ``2^52 * 2^-1126``), so each is an integer multiple of ``2^-1126``: bit
``k = e - 53 + 1126`` of the fixed point, ``k`` in [0, 2098).  The fixed point is cut into
**digits** of ``W = 52`` bits: digit ``g`` weighs ``2^(52 g - 1126)``.  An addend at ``k``, with
``j = k // 52`` and ``r = k % 52``, is ``M * 2^r`` at digit ``j``, split exactly into a low part
``(M mod 2^(52 - r)) * 2^r`` in ``[0, 2^52)`` added to digit ``j`` and a high part
``floor(M / 2^(52 - r))`` in ``(-2^52, 2^52)`` added to digit ``j + 1``.  Each digit is an int64;
after a **carry normalisation** (``c = d >> 52; d &= 2^52 - 1; next += c``, from the lowest digit
up) every digit but the top one is in ``[0, 2^52)`` and the top one carries the sign, so 2046 adds
fit between two normalisations without overflow (|digit| <= (1 + 2046) (2^52 - 1) < 2^63); the
accumulator normalises on its own before that.

**The window.**  A dense accumulator over the whole range needs 43 digits (344 bytes) per element.
Instead each accumulator keeps the digits ``[lo, hi)`` of the exponent window *seen so far*, the
same window for all its elements: ``lo`` the lowest digit a nonzero addend touched, ``hi - 1`` two
above the highest (its high part's digit, and one for the carries: an addend at digit ``j`` is below
``2^104`` units of digit ``j``, one unit of digit ``j + 2``, so the top digit of a sum of ``n``
addends holds less than ``n``: no overflow before 2^63 addends).  The window grows on demand (a copy
of the digits, then a normalisation).  Addends whose bits all fall in one digit cost 3 digits (24
bytes per element); each further 52 binades of spread between the largest and the smallest nonzero
addend cost one digit more: ``bytes_per_element`` reports what is held.

**Adds are vectorised** over elements *and* over a batch of addends: the unit keeps up to
``batch`` addends (``2^15 // numel``, at most 256: at most 256 KiB of fp64) and folds them in with
one :func:`exact_step` (two ``scatter_add_`` of the int64 parts), which removes the per-op cost of
torch for the small vectors of the summation experiment while keeping each fold near torch's
parallel grain (2^15 elements); a vector of more than 2^14 elements is folded at each add.  Reads
(``value`` and the rest) fold what is pending first.

**Read-out** (:func:`round_magnitude`): normalise, take the magnitude, find the top nonzero digit,
gather the 62 leading bits into an int64 plus a sticky bit for everything below, and round once to
the target precision (53 bits, fewer in the subnormal range); the rounded integer times a power of
two is exact in fp64 or overflows to ±inf as IEEE says.  ``scaled_value(factor)`` multiplies the
*exact* sum by ``factor`` (a power of two: a shift of the exponent; any other finite factor
``F * 2^f`` with an odd integer ``F < 2^53``: the digits are multiplied by ``F`` exactly, in
26-bit halves) and rounds that product once: it is the correctly rounded ``sum * factor``.

**Special values** follow IEEE for a sum: any NaN addend gives NaN, +inf and -inf both seen give
NaN, otherwise an infinite addend gives that infinity.  **Signed zero**: a sum that is exactly zero
is +0.0 unless every addend was -0.0 (what IEEE addition gives for ``-0 + -0``; no adds at all give
+0.0); a nonzero sum that rounds (``scaled_value``) to zero keeps its sign.

The unit never loses an update.
"""

from __future__ import annotations

import math

import torch

from precision_lab.formats import Format
from precision_lab.strategies import Strategy

__all__ = ["DIGIT_BITS", "Exact", "SuperAccumulator", "exact_step", "round_magnitude"]

#: Bits per digit of the fixed point (each digit an int64).
DIGIT_BITS = 52
#: The weight of bit 0 of digit 0: every fp64 number is an integer multiple of 2^-1126 (see above).
_ORIGIN = -1126
#: The most digits a window spans: ``(1023 + 1 - 53 - _ORIGIN) // 52 + 3`` (the largest finite
#: number's digit, its high part and a carry digit), 43 digits in all.
MAX_DIGITS = (1024 - 53 - _ORIGIN) // DIGIT_BITS + 3
#: Adds between two carry normalisations: (1 + 2046) (2^52 - 1) < 2^63, so no digit overflows.
_NORMALIZE_EVERY = 2046
#: Pending addends a unit keeps at most, in elements: torch's parallel grain (256 KiB of fp64).
_BATCH_ELEMENTS = 2**15
#: ... and at most this many addends (enough to amortise the per-call cost of the torch ops).
_BATCH_ADDS = 256
#: k // 52 as (k * _DIV_MAGIC) >> _DIV_SHIFT, exact for 0 <= k < 2^12 (every bit position k < 2098).
_DIV_MAGIC, _DIV_SHIFT = 20165, 20
#: The flag bits of non-finite addends seen.
_NAN, _POS_INF, _NEG_INF = 1, 2, 4


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exact ``2.0**exponent`` (float64) for integer exponents in [-1022, 1023], from the bits."""
    return ((exponent + 1023) << 52).view(torch.float64)


def normalize(digits: torch.Tensor, bits: int = DIGIT_BITS) -> None:
    """Propagate carries in place, lowest digit first: every digit but the top one ends in [0, 2^bits).

    The represented integer ``sum_i digits[i] * 2^(bits * i)`` (per column) does not change; the top
    digit keeps the sign and whatever carry reached it.

    Args:
        digits: int64 digits, shape ``(rows, elements)``, the lowest digit first.
        bits: Bits per digit.
    """
    mask = (1 << bits) - 1
    for i in range(digits.shape[0] - 1):
        carry = digits[i] >> bits  # arithmetic shift: floor division, negative digits borrow
        digits[i].bitwise_and_(mask)
        digits[i + 1].add_(carry)


def round_magnitude(digits: torch.Tensor, bits: int, exponent: int) -> torch.Tensor:
    """``sum_i digits[i] * 2^(bits * i + exponent)`` rounded once to fp64, to nearest, ties to even.

    The 62 leading bits of each column are gathered into an int64 ``T`` (its top bit at bit 61)
    with a sticky bit for everything below them OR-ed into bit 0, then rounded to the result's last
    place (52 bits below the leading one, or 2^-1074 for a subnormal result) by adding half of it
    less one plus the parity of the kept part (ties to even) and shifting.

    Args:
        digits: Nonnegative int64 digits, each below ``2^bits`` (a normalised magnitude), shape
            ``(rows, elements)``, the lowest digit first.
        bits: Bits per digit (at most 52).
        exponent: The weight of bit 0 of digit 0, a power of two's exponent.

    Returns:
        The float64 magnitudes, shape ``(elements,)``: +0.0 for a zero column, +inf where the
        rounded value exceeds the largest finite fp64, subnormals exact where the sum is one.
    """
    lead = 1 + -(-61 // bits)  # digits holding 62 leading bits whatever the top digit holds
    nonzero = digits != 0
    rows = digits.shape[0]
    top = torch.zeros(digits.shape[1], dtype=torch.int64, device=digits.device)  # the top nonzero digit
    bottom = torch.full_like(top, rows)  # the lowest nonzero digit (rows: none)
    for i in range(rows):
        top.masked_fill_(nonzero[i], i)
        bottom.masked_fill_(nonzero[rows - 1 - i], rows - 1 - i)
    sticky = bottom <= top - lead  # a nonzero digit below those gathered into T
    digit = digits.gather(0, top.unsqueeze(0))[0]
    width = torch.frexp(digit.double())[1].to(torch.int64)  # bits of the top digit, 1 to `bits` (0: a zero column)
    t = digit << (62 - width)
    for g in range(1, lead):
        digit = digits.gather(0, (top - g).clamp(min=0).unsqueeze(0))[0]
        digit = torch.where(top >= g, digit, 0)
        shift = (62 - bits * g) - width  # where this digit's bit 0 lands in T (negative: below bit 0)
        if 62 - bits * g - bits >= 0:  # always left
            t += digit << shift
            continue
        right = (-shift).clamp_(0, bits)  # a digit shifted right by `bits` is gone entirely
        kept = digit >> right
        sticky |= (kept << right) != digit  # bits shifted out are bits below T
        if 61 - bits * g >= 0:  # left or right, depending on the width
            kept = torch.where(shift >= 0, digit << shift.clamp(min=0), kept)
        t += kept
    t |= sticky  # the sticky bit: below the last place in every case (at least 9 bits are dropped)
    t_exponent = bits * top + (exponent - 62) + width  # the weight of T's bit 0
    huge = (t_exponent > 1023 - 61) & (width > 0)  # at least 2^1024: beyond every finite fp64 (not 0)
    # the result's last place: 52 below the leading bit, 2^-1074 in the subnormal range (and a
    # finite stand-in for the huge, whose result is replaced by inf below)
    target = (t_exponent + (61 - 52)).clamp_(-1074, 971)
    drop = (target - t_exponent).clamp_(1, 63)  # >= 9 bits; 63 drops everything (T < 2^62)
    half = torch.ones_like(drop) << (drop - 1)
    m = (t + (half - 1) + ((t >> drop) & 1)) >> drop  # round to nearest, ties to even; < 2^63, no overflow
    half_exp = target >> 1  # two exact steps: both factors are normal powers of two
    out = m.double() * _pow2(half_exp) * _pow2(target - half_exp)  # exact, or inf past the largest fp64
    return torch.where(huge, math.inf, out)


class SuperAccumulator:
    """Exact per-element sums of fp64 numbers over the exponent window seen (see the module docstring).

    Args:
        numel: Number of elements summed side by side.
        device: Where the digits live.

    Attributes:
        digits: int64 digits, shape ``(hi - lo, numel)``, digit ``lo + i`` in row ``i``.
        lo: The global index of the lowest digit held.
        adds: Addends folded in so far.
        special: uint8 flags of the non-finite addends seen per element (1 NaN, 2 +inf, 4 -inf), or
            None before the first non-finite addend.
        negative_zero: bool, the elements whose every addend so far was -0.0, or None once no
            element is (then it is not tracked any more).
    """

    def __init__(self, numel: int, device: torch.device) -> None:
        self.numel = numel
        self.device = device
        self.digits = torch.zeros((0, numel), dtype=torch.int64, device=device)
        self.lo = 0
        self.adds = 0
        self.unnormalized = 0  # adds since the last carry normalisation
        self.special: torch.Tensor | None = None
        self.negative_zero: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held: the digits and, while tracked, the per-element flags."""
        flags = sum(f.numel() for f in (self.special, self.negative_zero) if f is not None)
        return self.digits.numel() * 8 + flags

    def normalize(self) -> None:
        """Propagate the carries of the digits (the sum is unchanged)."""
        normalize(self.digits)
        self.unnormalized = 0

    def cover(self, lo: int, hi: int) -> None:
        """Grow the window to hold digits ``[lo, hi)`` as well (a copy, then a normalisation)."""
        rows = self.digits.shape[0]
        if rows and self.lo <= lo and hi <= self.lo + rows:
            return
        new_lo, new_hi = (lo, hi) if not rows else (min(lo, self.lo), max(hi, self.lo + rows))
        grown = torch.zeros((new_hi - new_lo, self.numel), dtype=torch.int64, device=self.device)
        grown[self.lo - new_lo : self.lo - new_lo + rows] = self.digits
        self.digits, self.lo = grown, new_lo
        self.normalize()  # the old top digit (signed, any size) is now an inner digit

    def value(self, factor: float = 1.0) -> torch.Tensor:
        """The exact sum times ``factor`` (finite), rounded once to fp64 (to nearest, ties to even).

        A factor of ±0 gives ±0 by the signs of the exact sum and of the factor (NaN where an
        infinity or NaN was added); non-finite sums follow the rules of the module docstring, times
        the factor.

        Args:
            factor: Any finite fp64 number; the product with the exact sum is exact before rounding.

        Returns:
            A new float64 tensor of shape ``(numel,)``.

        Raises:
            ValueError: For a non-finite ``factor``.
        """
        if not math.isfinite(factor):
            raise ValueError(f"factor must be finite, got {factor!r}")
        if factor == 0:  # ±0 by the signs of the (exact) sum and the factor; inf * 0 = NaN
            total = self.value()
            zero = torch.copysign(torch.zeros_like(total), total) * factor
            return zero if self.special is None else torch.where(self.special != 0, math.nan, zero)
        f_mantissa, f_exponent = math.frexp(abs(factor))
        odd, shift = int(f_mantissa * 2**53), f_exponent - 53  # |factor| = odd * 2^shift exactly
        while odd % 2 == 0:
            odd, shift = odd // 2, shift + 1
        self.normalize()
        if self.digits.shape[0]:
            negative = self.digits[-1] < 0  # inner digits are >= 0, so the top one has the sum's sign
            # the magnitude, one digit more on top so that every digit is below 2^52 after the carries
            rows = self.digits.shape[0]
            magnitude = torch.empty((rows + 1, self.numel), dtype=torch.int64, device=self.device)
            torch.mul(self.digits, 1 - 2 * negative.long(), out=magnitude[:rows])
            magnitude[rows].zero_()
            normalize(magnitude)
            bits, exponent = DIGIT_BITS, DIGIT_BITS * self.lo + _ORIGIN + shift
            if odd != 1:
                magnitude, bits = _times(magnitude, odd), DIGIT_BITS // 2
            out = round_magnitude(magnitude, bits, exponent)
            out = torch.where(negative != (factor < 0), -out, out)
        else:  # no nonzero addend yet: +0.0, times the factor (-0.0 for a negative one)
            out = torch.zeros(self.numel, dtype=torch.float64, device=self.device) * factor
            negative = torch.zeros(self.numel, dtype=torch.bool, device=self.device)
        if self.negative_zero is not None:  # an exact zero sum of -0.0 addends only is -0.0
            is_zero = (self.digits == 0).all(0) if self.digits.shape[0] else torch.ones_like(negative)
            zero = torch.where(self.negative_zero, -0.0, 0.0).double() * factor
            out = torch.where(is_zero, zero, out)
        if self.special is not None:
            both = _POS_INF | _NEG_INF
            nan = ((self.special & _NAN) != 0) | ((self.special & both) == both)
            inf = torch.where((self.special & _POS_INF) != 0, math.inf, -math.inf).double() * factor
            out = torch.where(self.special != 0, inf, out)
            out = torch.where(nan, math.nan, out)
        return out


def _times(magnitude: torch.Tensor, odd: int) -> torch.Tensor:
    """The digits of ``magnitude * odd`` (``odd < 2^53``), exactly, in 26-bit digits.

    ``magnitude`` holds normalised 52-bit digits; each is split into two 26-bit digits, and ``odd``
    into ``odd_hi * 2^26 + odd_lo`` (``odd_hi < 2^27``): every partial product is below 2^53, two of
    them per digit below 2^54, and the carries are propagated once at the end.
    """
    half = DIGIT_BITS // 2
    split = torch.stack([magnitude & ((1 << half) - 1), magnitude >> half], dim=1).flatten(0, 1)
    rows = split.shape[0]
    product = torch.zeros((rows + 3, split.shape[1]), dtype=torch.int64, device=split.device)
    product[:rows] += split * (odd & ((1 << half) - 1))
    product[1 : rows + 1] += split * (odd >> half)
    normalize(product, half)
    return product


def exact_step(acc: SuperAccumulator, t: torch.Tensor) -> None:
    """Fold addends into the superaccumulator, exactly: ``acc += t`` (or ``+= t[0] + t[1] + ...``).

    Args:
        acc: The accumulator, changed in place.
        t: One addend per element, shape ``(numel,)``, or a batch of them, shape ``(n, numel)``;
            any float dtype (widened to fp64 exactly).  Non-finite addends set the element's flags.

    Raises:
        ValueError: For addends of another shape.
    """
    if t.dim() == 1 and t.shape[0] == acc.numel:
        x = t.unsqueeze(0)
    elif t.dim() == 2 and t.shape[1] == acc.numel:
        x = t
    else:
        raise ValueError(
            f"exact_step got addends of shape {tuple(t.shape)}; expected ({acc.numel},) or (n, {acc.numel})"
        )
    x = x.to(torch.float64)
    for start in range(0, x.shape[0], _NORMALIZE_EVERY):
        _fold(acc, x[start : start + _NORMALIZE_EVERY])


def _fold(acc: SuperAccumulator, x: torch.Tensor) -> None:
    """:func:`exact_step` for at most ``_NORMALIZE_EVERY`` addends per element, shape ``(n, numel)``."""
    n = x.shape[0]
    if n == 0 or acc.numel == 0:
        acc.adds += n
        return
    if acc.adds == 0 or acc.negative_zero is not None:  # tracked while some element saw only -0.0
        all_negative_zero = ((x == 0) & torch.signbit(x)).all(0)
        acc.negative_zero = all_negative_zero if acc.adds == 0 else acc.negative_zero & all_negative_zero
        if not bool(acc.negative_zero.any()):
            acc.negative_zero = None
    acc.adds += n
    _place(acc, x, finite=False)


def _place(acc: SuperAccumulator, x: torch.Tensor, *, finite: bool) -> None:
    """Add the numbers ``x`` (``finite``: known to be finite) into the digits; flag non-finite ones."""
    fraction, exponent = torch.frexp(x)  # x = fraction * 2^exponent, |fraction| in [0.5, 1) or 0
    m = (fraction * 2.0**53).to(torch.int64)  # x = m * 2^(exponent - 53), exactly (if finite)
    k = torch.add(exponent, -53 - _ORIGIN, out=torch.empty_like(m))  # m's bit 0 in the fixed point, >= 0
    j = (k * _DIV_MAGIC) >> _DIV_SHIFT  # k // 52 (exact for 0 <= k < 2^12)
    r = k.sub_(j, alpha=DIGIT_BITS)  # in [0, 52): m * 2^r at digit j
    nonzero = m != 0
    if acc.digits.shape[0]:
        j = torch.where(nonzero, j, acc.lo)  # a zero adds 0 to a digit inside the window
        bounds = torch.aminmax(j)
    else:
        bounds = torch.where(nonzero, j, MAX_DIGITS).amin(), torch.where(nonzero, j, -1).amax()
    # one synchronisation: the window needed and, in the sum, whether every addend is finite
    total, lo, hi = torch.stack([x.sum(), bounds[0].double(), bounds[1].double()]).tolist()
    if not (finite or math.isfinite(total)):  # an infinite or NaN addend, or a sum past the fp64 range
        ok = torch.isfinite(x)
        if not bool(ok.all()):
            flags = (
                torch.isnan(x).any(0).to(torch.uint8) * _NAN
                + (x == math.inf).any(0).to(torch.uint8) * _POS_INF
                + (x == -math.inf).any(0).to(torch.uint8) * _NEG_INF
            )
            acc.special = flags if acc.special is None else acc.special | flags
            _place(acc, torch.where(ok, x, 0.0), finite=True)
            return
    lo, hi = int(lo), int(hi)
    if hi < 0:
        return  # nothing but zeros so far
    if not acc.digits.shape[0]:
        j = torch.where(nonzero, j, lo)
    acc.cover(lo, hi + 3)  # the high part lands on digit j + 1; one more digit takes the carries
    if acc.unnormalized + x.shape[0] > _NORMALIZE_EVERY:
        acc.normalize()
    acc.unnormalized += x.shape[0]
    low_bits = DIGIT_BITS - r  # in [1, 52]: m's bits that stay on digit j
    high = m >> low_bits  # in (-2^52, 2^52)
    low = m.sub_(high << low_bits).bitwise_left_shift_(r)  # (m mod 2^(52 - r)) * 2^r, in [0, 2^52)
    row = j.sub_(acc.lo)
    acc.digits.scatter_add_(0, row, low)
    acc.digits[1:].scatter_add_(0, row, high)  # digit j + 1


class Exact(Strategy):
    """The exact reference: a :class:`SuperAccumulator` (``superaccumulator``), whatever the format.

    Up to ``batch`` addends (``2^15 // numel``, at most 256) wait in ``pending`` (fp64) and are
    folded in together by one :func:`exact_step`; every read folds them first.
    """

    name = "exact"

    def __init__(self, fmt: Format, shape: torch.Size, *, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(fmt, shape, dtype=dtype, device=device)
        numel = shape.numel()
        self.superaccumulator = SuperAccumulator(numel, device)
        self.batch = max(1, min(_BATCH_ADDS, _BATCH_ELEMENTS // max(numel, 1)))
        self.pending: torch.Tensor | None = None
        self.waiting = 0  # addends in pending

    @classmethod
    def storage_dtype(cls, fmt: Format) -> torch.dtype:
        """fp64 for every format (the addends are format numbers, exact in fp64)."""
        return torch.float64

    # -- memory -----------------------------------------------------------------------------------
    @property
    def arrays(self) -> int:
        """The int64 digit arrays held: the width of the exponent window seen (0 before any add).

        Pending addends are folded in first, so the count covers every add so far.
        """
        self.fold()
        return self.superaccumulator.digits.shape[0]

    @property
    def bytes_per_element(self) -> float:
        """The superaccumulator's memory: 8 bytes per digit, plus 1 per flag array while tracked.

        It depends on the data: the window of digits grows with the exponent range of the nonzero
        addends (3 digits, 24 bytes, while their bits all fall in one 52-bit digit; one digit more
        per further 52 binades; at most ``MAX_DIGITS`` = 43 digits, 344 bytes).  The flag bytes
        (non-finite addends seen; elements that saw only -0.0) exist only while needed.  Pending
        addends are folded in first; the pending batch itself is counted in
        :attr:`storage_bytes_per_element`.
        """
        self.fold()
        return self.superaccumulator.nbytes / max(self.superaccumulator.numel, 1)

    @property
    def storage_arrays(self) -> int:
        """The 8-byte arrays held: the digits and the pending batch (``batch`` rows once allocated)."""
        return self.arrays + (self.batch if self.pending is not None else 0)

    @property
    def storage_bytes_per_element(self) -> float:
        """Memory per element held now: the superaccumulator and the pending batch."""
        return self.bytes_per_element + (8.0 * self.batch if self.pending is not None else 0.0)

    # -- operations -------------------------------------------------------------------------------
    def add(self, t: torch.Tensor, *, generator: torch.Generator | None, count_lost: bool) -> int:
        """``sum <- sum + t`` exactly (or later, with the batch); never loses an update (returns 0)."""
        if self.batch == 1:
            exact_step(self.superaccumulator, t.reshape(-1))
            return 0
        if self.pending is None:
            self.pending = torch.empty(
                (self.batch, self.superaccumulator.numel), dtype=torch.float64, device=self.device
            )
        self.pending[self.waiting].copy_(t.reshape(-1))
        self.waiting += 1
        if self.waiting == self.batch:
            self.fold()
        return 0

    def fold(self) -> None:
        """Fold the pending addends into the superaccumulator."""
        if self.waiting:
            exact_step(self.superaccumulator, self.pending[: self.waiting])
            self.waiting = 0

    def value(self) -> torch.Tensor:
        """The exact sum rounded once to fp64 (to nearest, ties to even)."""
        return self.scaled_value(1.0)

    def raw_sum(self) -> torch.Tensor:
        """The same as :meth:`value`: the exact sum has no separate running part."""
        return self.value()

    def scaled_value(self, factor: float) -> torch.Tensor:
        """The exact sum times ``factor`` rounded once to fp64: exact scaling, one rounding.

        A power-of-two factor shifts the exponent; any other finite factor multiplies the exact
        digits by its odd integer significand exactly.  Either way the result is the correctly
        rounded ``sum * factor`` (with ``factor`` the fp64 number given), not the product of two
        rounded numbers.
        """
        self.fold()
        return self.superaccumulator.value(factor).reshape(self.shape)
