"""Tests of precision_lab._random: splitmix64 bit for bit, and the statistics of the bits SR draws.

Every statistical test here fixes its seed (so a run is deterministic), states its false-positive
rate (ALPHA = 1e-6 per test, Bonferroni-split where one test makes several comparisons), and is
applied to at least one deliberately bad generator (a negative control) that it must reject.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import available_devices
from scipy import stats

from precision_lab import _random
from precision_lab._random import derive_key, mix_key, splitmix64, splitmix64_int
from precision_lab.rounding import sr_bf16_random16

MASK64 = (1 << 64) - 1
ALPHA = 1e-6  # false-positive rate of each statistical test


def _u64(t: torch.Tensor) -> list[int]:
    """int64 bit patterns as unsigned Python integers."""
    return [v & MASK64 for v in t.cpu().tolist()]


# ==================================================================================================
# splitmix64 == the pure-Python reference, bit for bit
# ==================================================================================================
def test_reference_matches_published_splitmix64_vectors():
    """Our reference reproduces the published SplitMix64 outputs.

    SplitMix64 (Vigna's splitmix64.c) seeded with s returns mix(s + i*GAMMA) for i = 1, 2, ...;
    here the key is the seed and counter i-1.  Published first outputs for seeds 0 and 42.
    """
    assert [splitmix64_int(0, c) for c in range(4)] == [
        0xE220A8397B1DCDAF,
        0x6E789E6AA1B965F4,
        0x06C45D188009454F,
        0xF88BB8A8724C81EC,
    ]
    assert [splitmix64_int(42, c) for c in range(4)] == [
        0xBDD732262FEB6E95,
        0x28EFE333B266F103,
        0x47526757130F9F52,
        0x581CE1FF0E4AE394,
    ]


KEYS = [
    0,
    1,
    42,
    0x1234_5678_9ABC_DEF0,
    2**62,
    2**63 - 1,
    2**63,
    2**63 + 12345,
    2**64 - 1,
    2**64 + 7,
    2**70 + 3,
    -1,
    -(2**63),
]


def _counters() -> list[int]:
    rng = np.random.default_rng(5)
    near = [b + d for b in (2**31, 2**32, 2**62, 2**63 - 16) for d in range(-8, 8) if b + d < 2**63]
    extreme = [-1, -2, -(2**63), 2**63 - 1, 2**63 - 2]  # counter + 1 wraps at 2^63 - 1
    randoms = rng.integers(-(2**63), 2**63 - 1, size=500, dtype=np.int64).tolist()
    return list(range(1200)) + near + extreme + randoms


@pytest.mark.parametrize("device", available_devices())
@pytest.mark.parametrize("key", KEYS, ids=lambda k: f"key{k:#x}" if k >= 0 else f"key-{-k:#x}")
def test_splitmix64_matches_reference(key, device):
    counters = _counters()
    got = splitmix64(key, torch.tensor(counters, dtype=torch.int64, device=device))
    assert got.dtype == torch.int64
    want = [splitmix64_int(key, c) for c in counters]
    assert _u64(got) == want
    # keys are taken modulo 2^64
    assert want == [splitmix64_int(key & MASK64, c) for c in counters]


@pytest.mark.parametrize("device", available_devices())
def test_splitmix64_shapes_and_logical_shift(device):
    c = torch.arange(24, dtype=torch.int64, device=device).view(2, 3, 4)
    got = splitmix64(7, c)
    assert got.shape == c.shape
    assert _u64(got.reshape(-1)) == [splitmix64_int(7, i) for i in range(24)]
    z = torch.tensor([-1, -(2**63), 2**63 - 1, 0x0123_4567_89AB_CDEF], dtype=torch.int64, device=device)
    for s in (1, 16, 30, 31, 48, 63):
        assert _u64(_random._lsr(z, s)) == [(v & MASK64) >> s for v in z.tolist()]


def test_sr_bf16_random16_layout():
    """Element i is lane i % 4 (bits 16*lane .. 16*lane + 15) of the splitmix64 word for counter i // 4."""
    key = 0x5DEECE66D
    for n in (0, 1, 3, 4, 13, 1000):
        got = sr_bf16_random16(key, n, "cpu")
        assert got.dtype == torch.int32
        assert got.shape == (n,)
        want = [(splitmix64_int(key, i // 4) >> (16 * (i % 4))) & 0xFFFF for i in range(n)]
        assert got.tolist() == want


@pytest.mark.parametrize("device", available_devices())
def test_sr_bf16_random16_is_the_same_on_every_device(device):
    a = sr_bf16_random16(99, 4099, "cpu")
    assert torch.equal(sr_bf16_random16(99, 4099, device).cpu(), a)


# ==================================================================================================
# derive_key and mix_key
# ==================================================================================================
def test_derive_key_is_reproducible_and_advances_the_generator():
    g1, g2 = torch.Generator().manual_seed(2024), torch.Generator().manual_seed(2024)
    k1 = derive_key(g1)
    assert k1 == derive_key(g2)  # same seed, same key
    assert isinstance(k1, int)
    state = g1.get_state()
    k1b = derive_key(g1)
    assert not torch.equal(state, g1.get_state())  # the draw advanced the generator
    assert k1b != k1  # a second rounding gets an independent stream
    assert k1b == derive_key(g2)  # ... and the sequence is reproducible
    keys = {derive_key(torch.Generator().manual_seed(s)) for s in range(2000)}
    assert len(keys) == 2000  # 63-bit keys: a collision among 2000 has probability ~2e-13
    assert all(0 <= k < 2**63 for k in keys)


def test_derive_key_none_uses_the_default_generator():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(77)
        k = derive_key(None)
        k_next = derive_key(None)
    assert k == derive_key(torch.Generator().manual_seed(77))
    assert k_next != k


@pytest.mark.parametrize("bad", [42, "seed", np.random.default_rng(0)], ids=["int", "str", "numpy"])
def test_derive_key_rejects_non_generators(bad):
    with pytest.raises(ValueError, match=type(bad).__name__):
        derive_key(bad)


def test_mix_key():
    keys = [derive_key(torch.Generator().manual_seed(s)) for s in range(64)]
    mixed = [mix_key(k, salt) for k in keys for salt in range(4)]
    assert all(0 <= m < 2**63 for m in mixed)
    assert len(set(mixed) | set(keys)) == len(mixed) + len(keys)  # all distinct, none equal to a key
    assert mix_key(keys[0], 1) == mix_key(keys[0], 1)


# ==================================================================================================
# statistics of the 16-bit lanes of the bf16 fast path
# ==================================================================================================
def _two_sided_chi2_pvalue(counts: np.ndarray) -> float:
    """Uniform-cells chi-square, two-sided: too uniform (e.g. a permutation of the cells) also fails."""
    n, k = counts.sum(), counts.size
    expected = n / k
    stat = float(((counts - expected) ** 2).sum() / expected)
    return 2 * min(stats.chi2.sf(stat, k - 1), stats.chi2.cdf(stat, k - 1))


def _splitmix_lanes(n: int, seed: int = 0) -> np.ndarray:
    key = derive_key(torch.Generator().manual_seed(seed))
    return sr_bf16_random16(key, n, "cpu").numpy().astype(np.int64)


def _weak_multiplicative(n: int, seed: int = 0) -> np.ndarray:
    """Knuth's multiplicative hash of the counter: a bijection on every block of 2^16 counters."""
    return (np.arange(n, dtype=np.int64) * 2654435761 + seed) & 0xFFFF


def _same_word_twice(n: int, seed: int = 0) -> np.ndarray:
    """A layout bug: lanes 1 and 3 repeat lanes 0 and 2 of the same word."""
    return _splitmix_lanes(n, seed).reshape(-1, 4)[:, [0, 0, 2, 2]].reshape(-1)


def _biased_bit(n: int, seed: int = 0) -> np.ndarray:
    """Bit 0 ORed with bit 1: P(bit 0 = 1) = 3/4."""
    r = _splitmix_lanes(n, seed)
    return r | ((r >> 1) & 1)


def _low_bits_lcg(n: int, seed: int = 0) -> np.ndarray:
    """The low 16 bits of a 64-bit LCG x <- a x + c (Knuth's MMIX constants): bit j has period 2^(j+1)."""
    a, c, block = 6364136223846793005, 1442695040888963407, 1024
    first, x = [], seed
    for _ in range(block):
        x = (a * x + c) & MASK64
        first.append(x)
    big_a, big_c = 1, 0  # the map of `block` steps, composed exactly with Python integers
    for _ in range(block):
        big_a, big_c = (a * big_a) & MASK64, (a * big_c + c) & MASK64
    blocks = [np.array(first, dtype=np.uint64)]
    with np.errstate(over="ignore"):
        for _ in range(-(-n // block) - 1):
            blocks.append(blocks[-1] * np.uint64(big_a) + np.uint64(big_c))  # wraps mod 2^64
    return (np.concatenate(blocks)[:n] & np.uint64(0xFFFF)).astype(np.int64)


SOURCES = {
    "splitmix": _splitmix_lanes,
    "weak-multiplicative": _weak_multiplicative,
    "same-word-twice": _same_word_twice,
    "biased-bit": _biased_bit,
}
_N = 2**22  # lanes per test: 64 expected per cell of a 2^16-cell chi-square


def _uniformity_pvalues(r: np.ndarray) -> list[float]:
    return [
        _two_sided_chi2_pvalue(np.bincount(r, minlength=1 << 16)),  # all 2^16 values
        _two_sided_chi2_pvalue(np.bincount(r >> 8, minlength=256)),  # the high byte
        _two_sided_chi2_pvalue(np.bincount(r & 0xFF, minlength=256)),  # the low byte
    ]


@pytest.mark.parametrize(
    ("source", "passes"),
    [("splitmix", True), ("weak-multiplicative", False), ("biased-bit", False)],
)
def test_lanes_are_uniform(source, passes):
    """The lanes are uniform (two-sided chi-square).

    Chi-square over 2^16 cells (64 expected each) and over the 256 values of each byte; ALPHA/3 each.
    Controls: the multiplicative hash is a permutation (chi-square = 0, too uniform); a biased bit.
    """
    r = SOURCES[source](_N)
    ok = min(_uniformity_pvalues(r)) >= ALPHA / 3
    assert ok == passes


def _bit_frequency_pvalues(r: np.ndarray) -> list[float]:
    ones = [int(((r >> b) & 1).sum()) for b in range(16)]
    return [stats.binomtest(k, r.size, 0.5).pvalue for k in ones]


@pytest.mark.parametrize(("source", "passes"), [("splitmix", True), ("biased-bit", False)])
def test_each_bit_is_fair(source, passes):
    """Exact binomial test of P(bit b = 1) = 1/2 for each of the 16 bits, ALPHA/16 each."""
    r = SOURCES[source](_N)
    assert (min(_bit_frequency_pvalues(r)) >= ALPHA / 16) == passes


def _serial_pvalues(r: np.ndarray) -> list[float]:
    """Serial-pair chi-square p-values of the high bytes.

    Pairs of high bytes (256 x 256 cells, 64 expected each) for three kinds of neighbours:
    lanes (0,1) and (2,3) of one word, lane 3 with lane 0 of the next word, and one lane across
    consecutive words.  Disjoint pairs within each kind, so the cells are multinomial.
    """
    hb = r >> 8
    w = hb.reshape(-1, 4)
    kinds = [
        (w[:, 0::2].reshape(-1), w[:, 1::2].reshape(-1)),  # same word
        (w[:-1, 3], w[1:, 0]),  # word boundary
        (w[0:-1:2, 1], w[1::2, 1]),  # same lane, consecutive words
    ]
    return [_two_sided_chi2_pvalue(np.bincount((a << 8) | b, minlength=1 << 16)) for a, b in kinds]


@pytest.mark.parametrize(
    ("source", "passes"),
    [("splitmix", True), ("weak-multiplicative", False), ("same-word-twice", False)],
)
def test_neighbouring_lanes_are_independent_chi2(source, passes):
    """Neighbouring lanes are independent (serial-pair chi-square).

    Serial-pair chi-square, ALPHA/3 per kind.  Controls: consecutive values of the multiplicative
    hash differ by a constant; duplicated lanes are perfectly dependent.
    """
    r = SOURCES[source](2 * _N)
    assert (min(_serial_pvalues(r)) >= ALPHA / 3) == passes


_LAGS = range(1, 9)


def _max_abs_lag_z(r: np.ndarray) -> float:
    """The max over lags 1..8 of sqrt(n) |Pearson correlation of r[i], r[i + lag]|, N(0, 1) under independence."""
    x = (r - r.mean()) / r.std()
    return max(abs(float(np.dot(x[:-lag], x[lag:]))) / np.sqrt(x.size - lag) for lag in _LAGS)


@pytest.mark.parametrize(
    ("source", "passes"),
    [("splitmix", True), ("weak-multiplicative", False), ("same-word-twice", False)],
)
def test_neighbouring_lanes_are_uncorrelated(source, passes):
    """Neighbouring lanes are uncorrelated.

    |corr(r_i, r_{i+lag})| < z / sqrt(n) for lags 1..8, two-sided at ALPHA/8 per lag (n = 2^22, so
    correlations above ~1.8e-3 are detected).  Controls: the multiplicative hash (lag-1 corr ~ -0.5),
    duplicated lanes (lag-1 corr 1 at every other element, ~0.5 overall).
    """
    r = SOURCES[source](_N)
    bound = stats.norm.isf(ALPHA / len(_LAGS) / 2)
    assert (_max_abs_lag_z(r) < bound) == passes


def _cross_stream_pvalues(streams: list[np.ndarray]) -> tuple[float, float]:
    """P-values of the independence of streams with different keys.

    (chi-square p over pairs of high bytes of streams s and s + 1 at the same index, Bonferroni-
    corrected max |correlation| p over all pairs of streams).  Each is ALPHA/2 at the call site.
    """
    hb = [s >> 8 for s in streams]
    cells = sum(np.bincount((a << 8) | b, minlength=1 << 16) for a, b in zip(hb[:-1], hb[1:], strict=True))
    p_chi2 = _two_sided_chi2_pvalue(cells)
    x = torch.from_numpy(np.stack(streams).astype(np.float64))
    x = (x - x.mean(dim=1, keepdim=True)) / x.std(dim=1, correction=0, keepdim=True)
    m = (x @ x.T / x.shape[1]).numpy()  # the correlation matrix
    k = len(streams)
    off = np.abs(m[np.triu_indices(k, 1)])
    n = streams[0].size
    p_corr = min(1.0, 2 * stats.norm.sf(off.max() * np.sqrt(n)) * (k * (k - 1) // 2))
    return p_chi2, p_corr


_STREAMS, _STREAM_LEN = 64, 2**16  # 63 x 2^16 pairs: 63 expected per cell; 2016 correlations


def _streams_from_generator_seeds() -> list[np.ndarray]:
    return [_splitmix_lanes(_STREAM_LEN, seed=s) for s in range(_STREAMS)]


def _streams_from_consecutive_keys() -> list[np.ndarray]:
    base = derive_key(torch.Generator().manual_seed(3))
    return [sr_bf16_random16(base + i, _STREAM_LEN, "cpu").numpy().astype(np.int64) for i in range(_STREAMS)]


def _streams_additive_key() -> list[np.ndarray]:
    """Control: the key added after mixing -- streams of keys k and k + 1 differ by 1 everywhere."""
    base = _splitmix_lanes(_STREAM_LEN)
    return [(base + i) & 0xFFFF for i in range(_STREAMS)]


def _streams_shared_key() -> list[np.ndarray]:
    """Control: every stream reuses one key (e.g. a generator re-seeded identically before each call)."""
    return [_splitmix_lanes(_STREAM_LEN, seed=0) for _ in range(_STREAMS)]


@pytest.mark.parametrize(
    ("streams", "passes"),
    [
        (_streams_from_generator_seeds, True),
        (_streams_from_consecutive_keys, True),
        (_streams_additive_key, False),
        (_streams_shared_key, False),
    ],
    ids=["generator-seeds", "consecutive-keys", "control-additive-key", "control-shared-key"],
)
def test_streams_of_different_keys_are_independent(streams, passes):
    """Streams of different keys are independent.

    Streams keyed by derive_key of consecutive generator seeds, and by consecutive integer keys
    (the most structured keys), look independent: pair chi-square and all 2016 pairwise correlations,
    ALPHA/2 each.
    """
    p_chi2, p_corr = _cross_stream_pvalues(streams())
    assert (min(p_chi2, p_corr) >= ALPHA / 2) == passes


def _avalanche_pvalue(mix, n_counters: int = 4096) -> float:
    """Avalanche p-value of the key bits.

    Flipping any one of the 64 key bits flips each output bit with probability 1/2: total flipped
    bits over 64 x n_counters x 64 output bits vs Binomial(.., 1/2), plus per key bit (Bonferroni).
    """
    base = derive_key(torch.Generator().manual_seed(8))
    c = torch.arange(n_counters, dtype=torch.int64)
    w0 = mix(base, c)
    pvals = []
    for b in range(64):
        diff = (w0 ^ mix(base ^ (1 << b), c)).numpy().view(np.uint64)
        flips = int(np.unpackbits(diff.view(np.uint8)).sum())
        pvals.append(stats.binomtest(flips, 64 * n_counters, 0.5).pvalue)
    return min(1.0, min(pvals) * 64)


def test_key_bits_avalanche():
    """Every key bit affects every output bit.

    Every key bit changes about half of every word: binomial test per key bit, ALPHA overall.
    Control: a hash that adds the key after mixing the counter changes only the bits above the
    flipped one, so flipping the top key bit flips one output bit.
    """
    assert _avalanche_pvalue(splitmix64) >= ALPHA

    def additive(key: int, c: torch.Tensor) -> torch.Tensor:
        return splitmix64(0, c) + _random._signed(key & MASK64)

    assert _avalanche_pvalue(additive) < ALPHA


def test_low_bits_of_an_lcg_fail_the_lane_tests():
    """A further control for the lane battery: the low 16 bits of a 64-bit LCG (short periods per bit)."""
    r = _low_bits_lcg(2**18)
    assert min(_uniformity_pvalues(r) + _serial_pvalues(r[: (r.size // 8) * 8])) < ALPHA


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_lanes_battery_64m(seed):
    """The uniformity, bit, serial and correlation tests on 2^26 lanes (1024 per cell)."""
    r = _splitmix_lanes(2**26, seed=seed)
    assert min(_uniformity_pvalues(r)) >= ALPHA / 3
    assert min(_bit_frequency_pvalues(r)) >= ALPHA / 16
    assert min(_serial_pvalues(r)) >= ALPHA / 3
    assert _max_abs_lag_z(r) < stats.norm.isf(ALPHA / len(_LAGS) / 2)
