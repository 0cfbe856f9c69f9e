"""Accumulation buffers: the strategies that sum micro-batch gradients in a given format.

An :class:`Accumulator` is a stateful shell (optimi style) over pure per-strategy kernels.  Every
``add(t)`` first rounds ``t`` to the buffer format with round-to-nearest (the gradient arrives as a
``p.grad`` of that format would), then folds it into the buffer:

=============  ================================================================================
``naive``      ``s <- RN(s + t)``: what ``p.grad += g`` does in the buffer's dtype.
``kahan``      compensated summation with ``s`` *and* the compensation ``c`` stored in the format:
               ``y = RN(t - c); u = RN(s + y); c = RN(RN(u - s) - y); s = u``.
``stochastic`` ``s <- SR(s + t)`` with ``s + t`` formed in at least 2p+2 bits (fp32 for formats of
               p <= 11 bits, fp64 up to 26 (fp32 buffers included), an exact TwoSum for fp64).
``pairwise``   a binary-counter cascade: slot k holds the RN sum of 2^k consecutive addends, so a
               sum of N addends is a balanced tree of depth ceil(log2 N) (Higham 2002, §4.2).
``exact``      a renormalised double-double (TwoSum + Fast2Sum, ~106 bits) of the rounded inputs:
               the reference for every other strategy.  Exact while the partial sums fit in 106
               bits; otherwise within 2^-104 of the sum of their magnitudes (see ``exact_step``).
=============  ================================================================================

Arithmetic in a format: natively where torch has the dtype (bf16/fp16 ops round once from fp32,
which is correct rounding for + and - because 24 >= 2p + 1 (Figueroa 1995, "When is double
rounding innocuous?")); otherwise in a *work* dtype of at least 2p + 1 bits covering the format's
range (fp32 for fp8, tf32 and custom formats up to 11 bits of precision, fp64 up to 26), followed by
:func:`~precision_lab.rounding.round_nearest` -- again innocuous double rounding.

Bookkeeping: ``lost_updates`` counts element-adds that left the buffer unchanged although the
(rounded) addend was finite and nonzero and the buffer was finite (stagnation);
``nonfinite_inputs`` counts non-finite addend elements, ``nonfinite`` the buffer's non-finite
entries now.  ``bytes_per_element`` is the nominal memory of the strategy in the format (a bf16
Kahan buffer costs 4 bytes, like fp32), ``storage_bytes_per_element`` what this emulation uses.
"""

from __future__ import annotations

import math

import torch

from precision_lab import _native, _random
from precision_lab.formats import Format, get_format
from precision_lab.rounding import _bernoulli, _finish_sr_bf16, _round_any, round_nearest

__all__ = ["STRATEGIES", "Accumulator"]

STRATEGIES: tuple[str, ...] = ("naive", "kahan", "stochastic", "pairwise", "exact")
_NATIVE_ARITH = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _fp32_is_wide_enough(f: Format) -> bool:
    """fp32 holds 2p + 2 bits of f and its whole range (p <= 11: fp8, tf32, small customs)."""
    return 2 * f.precision + 2 <= 24 and f.emax <= 127 and f.quantum_exponent_min >= -149


def work_dtype(f: Format) -> torch.dtype:
    """Dtype in which one op of format ``f`` is computed before rounding (see module docstring)."""
    if f.torch_dtype in _NATIVE_ARITH:
        return f.torch_dtype
    if _fp32_is_wide_enough(f):
        return torch.float32
    if 2 * f.precision + 1 <= 53 and f.quantum_exponent_min >= -1074:
        return torch.float64
    raise ValueError(
        f"format {f.name!r} (precision {f.precision}) cannot be accumulated exactly-rounded here: "
        "custom formats need precision <= 26 bits or a native torch dtype"
    )


# --------------------------------------------------------------------------------------------------
# pure kernels: one rounded operation and the strategies' steps (torch; the fused CPU versions in
# _native give the same bits)
# --------------------------------------------------------------------------------------------------
def _op(a: torch.Tensor, b: torch.Tensor, f: Format, sign: int) -> torch.Tensor:
    """RN_f(a + sign*b) for tensors of the storage dtype (one correctly rounded add or sub)."""
    r = a + b if sign > 0 else a - b
    if r.dtype in _NATIVE_ARITH and f.torch_dtype == r.dtype:
        return r
    return round_nearest(r, f)


def _changed_count(new: torch.Tensor, old: torch.Tensor, t: torch.Tensor) -> int:
    """Element-adds with a finite nonzero addend into a finite buffer that left it unchanged."""
    lost = (new == old) & (t != 0) & torch.isfinite(t) & torch.isfinite(old)
    return int(lost.sum())


def naive_step(s: torch.Tensor, t: torch.Tensor, f: Format, count_lost: bool) -> int:
    """Naive step ``s <- RN(s + t)`` in place; returns the lost element-adds (0 when not counted)."""
    if count_lost:
        if s.device.type == "cpu" and s.dtype == torch.bfloat16 and _native.enabled(s.numel()):
            return _native.naive_add_bf16(s, t)
        old = s.clone()
        s.copy_(_op(s, t, f, +1))
        return _changed_count(s, old, t)
    if f.torch_dtype == s.dtype:
        s.add_(t)
    else:
        s.copy_(_op(s, t, f, +1))
    return 0


def kahan_step(s: torch.Tensor, c: torch.Tensor, t: torch.Tensor, f: Format, count_lost: bool) -> int:
    """One Kahan step in format f, in place on (s, c); returns lost element-adds."""
    if s.device.type == "cpu" and s.dtype == torch.bfloat16 and _native.enabled(s.numel()):
        return _native.kahan_add_bf16(s, c, t)
    y = _op(t, c, f, -1)  # subtract the previous step's lost low part
    u = _op(s, y, f, +1)
    new_c = _op(_op(u, s, f, -1), y, f, -1)  # (u - s) - y: what this addition just lost, negated
    lost = 0
    if count_lost:  # unchanged means neither the sum nor the compensation moved
        same = (u == s) & (new_c == c) & (t != 0) & torch.isfinite(t) & torch.isfinite(s)
        lost = int(same.sum())
    c.copy_(new_c)
    s.copy_(u)
    return lost


def _two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Knuth's TwoSum: hi = fl(a + b) and lo with hi + lo == a + b exactly (no overflow)."""
    hi = a + b
    bb = hi - a
    lo = (a - (hi - bb)) + (b - bb)
    # Inf/NaN: the error term would be Inf - Inf = NaN; the sum itself already says it all.
    return hi, torch.where(torch.isfinite(hi), lo, torch.zeros_like(lo))


def stochastic_step(s: torch.Tensor, t: torch.Tensor, f: Format, key: int, count_lost: bool) -> int:
    """Stochastic step ``s <- SR_f(s + t)``, s + t formed in >= 2p + 2 bits; returns lost element-adds."""
    if s.device.type == "cpu" and s.dtype == torch.bfloat16 and _native.enabled(s.numel()):
        return _native.sr_add_bf16(s, t, key, count_lost)
    old = s.clone() if count_lost else None
    if _fp32_is_wide_enough(f):
        wide = s.float() + t.float()  # 24 >= 2p + 2 bits; bf16 takes the fast SR path
        new = _finish_sr_bf16(wide, key, 16, None) if f.name == "bf16" else _round_any(wide, f, "stochastic", key=key)
    elif f.precision <= 26:
        new = _round_any(s.double() + t.double(), f, "stochastic", key=key)
    else:  # fp64 buffer: s + t = hi + lo exactly, then round the pair stochastically
        hi, lo = _two_sum(s, t)
        new = _sr_pair(hi, lo, key)
    s.copy_(new)
    return _changed_count(s, old, t) if count_lost else 0


def _sr_pair(hi: torch.Tensor, lo: torch.Tensor, key: int) -> torch.Tensor:
    """Stochastically round the exact value hi + lo (fp64, |lo| <= ulp(hi)/2) to fp64."""
    # fp64 buffer: the neighbours of hi + lo are hi and the next fp64 number in lo's direction.
    toward = torch.where(lo > 0, torch.full_like(hi, math.inf), torch.full_like(hi, -math.inf))
    nxt = torch.nextafter(hi, toward)
    gap = nxt - hi  # a power of two (up to sign): lo / gap is exact
    p = torch.where(lo == 0, torch.zeros_like(lo), (lo / gap).abs())
    out = torch.where(_bernoulli(p, key, None) > 0, nxt, hi)
    return torch.where(torch.isfinite(hi), out, hi)


def exact_step(s: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> None:
    """Double-double accumulation (s, c) <- (s, c) + t, renormalised so that |c| <= ulp(s)/2.

    TwoSum makes s + t = h + e exactly; only the fp64 add c + e rounds, so each step's error is at
    most 2^-53 |c + e| <= 2^-105 |h| (Joldes, Muller & Popescu 2017, DWPlusFP: relative error <=
    2u^2 of the step's result).  The sum is exact whenever every partial sum fits in 106 bits,
    e.g. addends spanning fewer than ~106 - log2(N) binades; in general
    |value - exact| <= 2^-104 * sum_k |partial sum_k|.
    """
    h, e = _two_sum(s, t)
    lo = c + e
    hi = h + lo  # Fast2Sum(h, lo): |lo| is far below |h|, so the error term below is exact
    c.copy_(torch.where(torch.isfinite(hi), lo - (hi - h), torch.zeros_like(lo)))
    s.copy_(hi)


def pairwise_step(slots: list[torch.Tensor | None], t: torch.Tensor, f: Format, count_lost: bool) -> int:
    """Binary-counter insertion: carry t up through occupied slots, merging with RN."""
    carry = t.clone()
    # An element-add is lost when some merge of its cascade returned one operand unchanged although
    # the other was finite and nonzero (counted once per element-add, whichever operand vanished).
    lost_mask = torch.zeros_like(t, dtype=torch.bool) if count_lost else None
    for k in range(len(slots) + 1):
        if k == len(slots):
            slots.append(None)
        slot = slots[k]
        if slot is None:
            slots[k] = carry
            return int(lost_mask.sum()) if count_lost else 0
        merged = _op(slot, carry, f, +1)
        if count_lost:
            absorbed = ((merged == slot) & (carry != 0) & torch.isfinite(carry) & torch.isfinite(slot)) | (
                (merged == carry) & (slot != 0) & torch.isfinite(slot) & torch.isfinite(carry)
            )
            lost_mask |= absorbed
        slots[k] = None
        carry = merged
    raise AssertionError("unreachable")


def pairwise_total(slots: list[torch.Tensor | None], f: Format) -> torch.Tensor | None:
    """The cascade's read-out: occupied slots merged from the smallest up, with RN."""
    total = None
    for slot in slots:
        if slot is None:
            continue
        total = slot.clone() if total is None else _op(slot, total, f, +1)
    return total


# --------------------------------------------------------------------------------------------------
# the stateful shell
# --------------------------------------------------------------------------------------------------
class Accumulator:
    """A gradient accumulation buffer of one strategy in one format.

    Args:
        strategy: One of :data:`STRATEGIES`.
        fmt: Buffer format (name, ``eXmY`` or :class:`~precision_lab.formats.Format`).
        shape: Shape of the accumulated tensor.
        device: Where the buffer lives; ``"cuda"`` without a GPU is a ``ValueError``.
        generator: Randomness of the ``stochastic`` strategy (torch's default generator if None).
        count_lost: Track :attr:`lost_updates` (costs a comparison per add where no fused kernel
            exists; the naive strategy without it is exactly ``s.add_(t)``).

    Example::

        acc = Accumulator("kahan", "bf16", (1000,))
        for g in micro_grads:
            acc.add(g)
        acc.value()  # float64
    """

    def __init__(self, strategy: str, fmt: str | Format, shape: tuple[int, ...] | torch.Size | int, *,
                 device: str | torch.device = "cpu", generator: torch.Generator | None = None,
                 count_lost: bool = True) -> None:  # fmt: skip
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        self.strategy = strategy
        self.format = get_format(fmt)
        self.shape = torch.Size((shape,) if isinstance(shape, int) else shape)
        if any(d < 0 for d in self.shape):
            raise ValueError(f"shape {tuple(self.shape)} has a negative dimension")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use 'cpu'")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {str(device)!r}; known: 'cpu', 'cuda'")
        self.dtype = torch.float64 if strategy == "exact" else work_dtype(self.format)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self.count_lost = count_lost
        self.reset()

    # -- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty the buffer and zero every counter."""
        z = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        self._s = z
        self._c = torch.zeros_like(z) if self.strategy in ("kahan", "exact") else None
        self._slots: list[torch.Tensor | None] = []
        self.count = 0
        self.lost_updates = 0
        self.nonfinite_inputs = 0

    @property
    def element_adds(self) -> int:
        """Number of element-additions so far (adds x elements)."""
        return self.count * self.shape.numel()

    @property
    def lost_update_fraction(self) -> float:
        """lost_updates / element_adds (0.0 before the first add)."""
        return self.lost_updates / self.element_adds if self.element_adds else 0.0

    @property
    def nonfinite(self) -> int:
        """Non-finite entries of the buffer's value now."""
        return int((~torch.isfinite(self.value())).sum())

    @property
    def arrays(self) -> int:
        """Number of format-sized arrays the strategy keeps.

        Pairwise: the slot positions allocated so far, floor(log2 n) + 1 after n adds. The peak
        number of partial sums alive at once is floor(log2(n + 1)), one less whenever n + 1 is not
        a power of two (n = 5: 3 positions, at most 2 alive).
        """
        if self.strategy == "kahan":
            return 2
        if self.strategy == "pairwise":
            return max(1, len(self._slots))
        return 1

    @property
    def bytes_per_element(self) -> float:
        """Nominal memory per accumulated element in the buffer format (exact: two fp64)."""
        if self.strategy == "exact":
            return 16.0
        return self.arrays * self.format.bits / 8

    @property
    def storage_bytes_per_element(self) -> float:
        """Memory per element this emulation actually uses."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return (2 if self.strategy in ("kahan", "exact") else self.arrays) * itemsize

    # -- operations -----------------------------------------------------------------------------
    def _prepare(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"add expects a torch.Tensor, got {type(t).__name__}")
        if t.shape != self.shape:
            raise ValueError(f"add got shape {tuple(t.shape)}, the buffer has shape {tuple(self.shape)}")
        if t.device != self._s.device:
            raise ValueError(f"add got a tensor on {t.device}, the buffer is on {self._s.device}")
        if not t.is_floating_point():
            raise ValueError(f"add got dtype {t.dtype}; expected a floating-point tensor")
        if t.dtype == self.dtype and self.format.torch_dtype == t.dtype:
            tr = t  # already in the format
        elif t.dtype == torch.float32 and self.dtype == torch.bfloat16:
            tr = t.to(torch.bfloat16)  # torch's cast is RN-even (checked against ml_dtypes)
        else:
            tr = round_nearest(t.to(torch.float64) if t.dtype not in (torch.float32, torch.float64) else t,
                               self.format).to(self.dtype)  # fmt: skip
        if self.strategy == "exact" and tr.dtype != torch.float64:
            tr = tr.to(torch.float64)
        return tr

    def add(self, t: torch.Tensor) -> None:
        """Round ``t`` to the buffer format (RN) and accumulate it with the strategy."""
        tr = self._prepare(t)
        if tr.device.type == "cpu" and tr.dtype == torch.bfloat16 and _native.enabled(tr.numel()):
            self.nonfinite_inputs += _native.count_nonfinite_bf16(tr)
        else:
            self.nonfinite_inputs += int(torch.count_nonzero(~torch.isfinite(tr)))
        f = self.format
        if self.strategy == "naive":
            lost = naive_step(self._s, tr, f, self.count_lost)
        elif self.strategy == "kahan":
            lost = kahan_step(self._s, self._c, tr, f, self.count_lost)
        elif self.strategy == "stochastic":
            lost = stochastic_step(self._s, tr, f, _random.derive_key(self.generator), self.count_lost)
        elif self.strategy == "pairwise":
            lost = pairwise_step(self._slots, tr, f, self.count_lost)
        else:
            exact_step(self._s, self._c, tr)
            lost = 0
        self.lost_updates += lost
        self.count += 1

    def value(self) -> torch.Tensor:
        """The value the buffer represents, as float64.

        naive/stochastic: ``s``.  kahan: ``s - c`` (the compensated read-out, evaluated in fp64;
        use :meth:`raw_sum` for ``s`` alone, which is what an optimizer reading the bf16 buffer
        sees).  pairwise: the occupied slots merged in the format.  exact: ``s + c``.
        """
        if self.strategy == "pairwise":
            total = pairwise_total(self._slots, self.format)
            return torch.zeros(self.shape, dtype=torch.float64, device=self.device) if total is None else total.double()
        if self.strategy == "kahan":
            return self._s.double() - self._c.double()
        if self.strategy == "exact":
            return self._s + self._c
        return self._s.to(torch.float64, copy=True)

    def scaled_value(self, factor: float) -> torch.Tensor:
        """The value after ``buffer *= factor`` in the buffer format (``p.grad.div_(N)``), as float64.

        Each stored number is multiplied by ``factor`` and rounded to the format (RN): naive,
        stochastic and pairwise scale their read-out, kahan scales ``s`` and ``c`` separately,
        exact scales both fp64 halves.  The product is formed in fp64 and rounded once more to the
        format; for formats of at most 26 bits that double rounding is innocuous (53 >= 2p + 1).
        A power-of-two factor is exact unless the result underflows or overflows, which is the point:
        ``post`` scaling in fp16 can lose small sums to underflow just as ``pre`` scaling can.
        The buffer itself is not changed.
        """
        if not (isinstance(factor, (int, float)) and math.isfinite(factor)):
            raise ValueError(f"factor must be a finite number, got {factor!r}")
        if factor == 1:
            return self.value()

        def scale(x: torch.Tensor) -> torch.Tensor:
            y = x.to(torch.float64) * factor
            return y if self.strategy == "exact" else round_nearest(y, self.format)

        if self.strategy == "kahan":
            return scale(self._s) - scale(self._c)
        if self.strategy == "exact":
            return scale(self._s) + scale(self._c)
        return scale(self.value())

    def raw_sum(self) -> torch.Tensor:
        """The running sum ``s`` alone (no compensation, no cascade merge), as float64."""
        if self.strategy == "pairwise":
            return self.value()
        return self._s.to(torch.float64, copy=True)

    def __repr__(self) -> str:
        return (f"Accumulator({self.strategy!r}, {self.format.name!r}, shape={tuple(self.shape)}, "
                f"count={self.count}, lost_updates={self.lost_updates})")  # fmt: skip
