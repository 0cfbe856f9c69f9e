"""Synthetic gradient streams: micro-batch gradients with a known mean and a chosen noise law.

A stream models N micro-batch gradients of one parameter vector as ``g_i = signal + noise_i``: a
fixed *signal* (the true gradient, ``mean * (random signs)``) plus i.i.d. zero-mean noise of scale
``spread``.  The accumulated sum should approach ``N * signal``; how far a low-precision buffer
drifts from it is what the experiments measure.  ``mean / spread`` is the per-element
signal-to-noise ratio of one micro-gradient.

Noise laws (``z`` has mean 0 and variance 1 in the first two):

* ``"gaussian"``: ``g = signal + spread * z``, ``z ~ N(0, 1)``.
* ``"student_t"``: ``g = signal + spread * z``, ``z = t_df * sqrt((df - 2) / df)``, a Student t with
  ``df > 2`` degrees of freedom scaled to unit variance (heavy tails; for ``df <= 4`` the fourth
  moment is infinite).  ``t_df = x / sqrt(c / df)`` with ``x ~ N(0, 1)`` and ``c = 2 * Gamma(df/2)``
  chi-squared, the gamma variate drawn by Marsaglia & Tsang's method (ACM TOMS 26(3), 2000).
* ``"sparse"``: each entry is nonzero with probability ``density`` and then equals
  ``(signal + spread * x) / density`` with ``x ~ N(0, 1)``; otherwise it is exactly 0.  Hence
  ``E[g] = density * signal / density = signal`` exactly (in real arithmetic), and the per-element
  variance is ``(signal**2 + spread**2) / density - signal**2`` (see :meth:`GradientStream.variance`).

Reproducibility: :meth:`GradientStream.sample` draws the micro-gradients one after another, each row
from the generator in a fixed order, so the values depend only on the generator's state: calling
``sample(10)`` and then ``sample(6)`` on one generator gives exactly the rows of one ``sample(16)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from precision_lab.checks import check_choice, check_int, check_real

__all__ = ["STREAM_KINDS", "GradientStream", "make_stream"]

STREAM_KINDS: tuple[str, ...] = ("gaussian", "student_t", "sparse")


def _standard_gamma(alpha: float, n: int, generator: torch.Generator) -> Tensor:
    """Draw n i.i.d. Gamma(alpha, 1) variates (alpha >= 1), float64, by Marsaglia & Tsang's squeeze-free method.

    ``d = alpha - 1/3, c = 1/sqrt(9d)``; draw ``x ~ N(0,1), u ~ U[0,1)``, ``v = (1 + c x)^3``; accept
    ``d v`` when ``v > 0`` and ``log u < x^2/2 + d - d v + d log v``.  Rejected entries are redrawn
    (all of them together, in index order) until none is left, so the output depends only on the
    generator's state.
    """
    d = alpha - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(n, dtype=torch.float64)
    todo = torch.arange(n)
    while todo.numel():
        k = todo.numel()
        x = torch.randn(k, generator=generator, dtype=torch.float64)
        u = torch.rand(k, generator=generator, dtype=torch.float64)
        v = (1.0 + c * x) ** 3
        # log(v) of v <= 0 is NaN or -inf; the (v > 0) term rejects those entries first.
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v))
        out[todo[ok]] = d * v[ok]
        todo = todo[~ok]
    return out


@dataclass(frozen=True)
class GradientStream:
    """A stream of synthetic micro-batch gradients (see the module docstring for the laws).

    Attributes:
        kind: One of :data:`STREAM_KINDS`.
        elements: Gradient entries per micro-batch (>= 1).
        mean: Magnitude of the signal per element (>= 0); the signal is ``mean * (random signs)``.
        spread: Scale of the noise (>= 0): its standard deviation for gaussian and student_t.
        df: Degrees of freedom of the student_t noise (> 2, so that the variance is finite).
        density: Probability that an entry of a sparse micro-gradient is nonzero, in (0, 1].
    """

    kind: str
    elements: int
    mean: float = 0.05
    spread: float = 1.0
    df: float = 3.0
    density: float = 0.1

    def __post_init__(self) -> None:
        check_choice(self.kind, "stream kind", STREAM_KINDS)
        check_int(self.elements, "elements")
        check_real(self.mean, "mean", low=0.0, high=math.inf, high_open=True)
        check_real(self.spread, "spread", low=0.0, high=math.inf, high_open=True)
        # df > 2: the variance is infinite for df <= 2
        check_real(self.df, "df (> 2: finite variance)", low=2.0, low_open=True, high=math.inf, high_open=True)
        check_real(self.density, "density", low=0.0, low_open=True, high=1.0)

    def variance(self) -> float:
        """Per-element variance of one micro-gradient ``g_i`` (spread², or the sparse formula)."""
        if self.kind == "sparse":
            return (self.mean**2 + self.spread**2) / self.density - self.mean**2
        return self.spread**2

    def signal(self, generator: torch.Generator) -> Tensor:
        """The true gradient: (elements,) float64, ``mean`` times independent random signs ±1."""
        signs = torch.randint(0, 2, (self.elements,), generator=generator, dtype=torch.float64) * 2.0 - 1.0
        return self.mean * signs

    def sample(self, n: int, signal: Tensor, generator: torch.Generator) -> Tensor:
        """Draw ``n`` micro-gradients with ``E[g_i] = signal``.

        Rows are drawn one after another from ``generator`` (for each row: gaussian ``randn``;
        student_t ``randn`` then the gamma variates; sparse ``rand`` for the mask then ``randn``), so
        the result depends only on the generator's state and consecutive calls continue one stream.

        Args:
            n: Number of micro-gradients (>= 0).
            signal: (elements,) float64, usually from :meth:`signal`.
            generator: Source of randomness (the only one).

        Returns:
            (n, elements) float64.
        """
        check_int(n, "n", minimum=0)
        if signal.shape != (self.elements,) or signal.dtype != torch.float64:
            raise ValueError(
                f"signal must be a ({self.elements},) float64 tensor; got {tuple(signal.shape)} {signal.dtype}"
            )
        out = torch.empty(n, self.elements, dtype=torch.float64)
        for i in range(n):
            out[i] = self._row(signal, generator)
        return out

    def _row(self, signal: Tensor, generator: torch.Generator) -> Tensor:
        """One micro-gradient (see :meth:`sample` for the order of the draws)."""
        m = self.elements
        if self.kind == "gaussian":
            return signal + self.spread * torch.randn(m, generator=generator, dtype=torch.float64)
        if self.kind == "student_t":
            x = torch.randn(m, generator=generator, dtype=torch.float64)
            gamma = _standard_gamma(0.5 * self.df, m, generator)
            # t_df * sqrt((df-2)/df) = x / sqrt(2*gamma/df) * sqrt((df-2)/df) = x * sqrt((df-2) / (2*gamma))
            return signal + self.spread * x * torch.sqrt((self.df - 2.0) / (2.0 * gamma))
        keep = torch.rand(m, generator=generator, dtype=torch.float64) < self.density
        x = torch.randn(m, generator=generator, dtype=torch.float64)
        return torch.where(keep, (signal + self.spread * x) / self.density, 0.0)


def make_stream(kind: str, elements: int, **kwargs: float) -> GradientStream:
    """Build a validated :class:`GradientStream`.

    Args:
        kind: One of :data:`STREAM_KINDS`.
        elements: Gradient entries per micro-batch (>= 1).
        **kwargs: ``mean``, ``spread``, ``df``, ``density`` (see :class:`GradientStream`).

    Raises:
        ValueError: Unknown kind, ``elements < 1``, ``mean < 0``, ``spread < 0``, ``df <= 2``,
            ``density`` outside (0, 1], or a non-finite value; the message names the bad value.
    """
    unknown = set(kwargs) - {"mean", "spread", "df", "density"}
    if unknown:
        raise ValueError(f"unknown stream parameter(s) {sorted(unknown)!r}; known: 'mean', 'spread', 'df', 'density'")
    return GradientStream(kind, elements, **kwargs)
