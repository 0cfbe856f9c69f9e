"""The compiled CPU kernels give the bits of the torch code they replace.

Every kernel of ``precision_lab._native`` is run against the torch path with the kernels switched
off (``PRECISION_LAB_NATIVE=0``), on curated edge values (signed zeros, subnormals, bf16 max,
values that round up to Inf, ties, carries across binades, Inf, NaN with several payloads), on
uniformly random bit patterns and on random values of mixed magnitude, for sizes that are not
multiples of 4.  Results are compared as bit patterns, exactly.

One documented exception: torch's bf16 ``add_``/``sub`` write the NaN pattern of its scalar code
(0x7FC0) for the elements that do not fill a whole vector, and that of its vectorised cast
(0xFFFF on x86) elsewhere, so for the naive and Kahan kernels a NaN result is compared as "NaN in
both" (every other bit pattern exactly), and the kernel's NaN is checked to be the cast's pattern.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("numba", reason="numba is not installed: the compiled kernels are unavailable")

from precision_lab import _native, _random, rounding  # noqa: E402
from precision_lab.accumulators import Accumulator, kahan_step, naive_step, stochastic_step  # noqa: E402
from precision_lab.formats import get_format  # noqa: E402

BF16 = get_format("bf16")
SIZES = [1, 3, 5, 1023, 3 * _native._CHUNK + 7]  # the last spans several chunks of the kernels

# fp32 inputs of the stochastic rounding, as bit patterns (and their negatives)
F32_EDGES = [
    0x00000000,  # +0
    0x00000001,  # smallest subnormal
    0x00008000,  # subnormal, exactly half a bf16 subnormal step
    0x0000FFFF,  # subnormal just below the next bf16 subnormal
    0x007FFFFF,  # largest subnormal: rounds up into the normal range
    0x00800000,  # smallest normal
    0x3F800000,  # 1
    0x3F808000,  # tie between 1 and 1 + 2^-7
    0x3F80FFFF,  # just below 1 + 2^-7
    0x3F7FFFFF,  # just below 1: rounding up carries into the next binade
    0x3FFFFFFF,  # just below 2
    0x7F7F0000,  # bf16 max
    0x7F7F8000,  # halfway between bf16 max and the overflow threshold
    0x7F7FFFFF,  # fp32 max: rounds up to Inf
    0x7F800000,  # Inf
    0x7FC00000,  # quiet NaN
    0x7F800001,  # signalling NaN with a tiny payload (must not carry into Inf)
    0x7FBFFFFF,  # signalling NaN, full payload
    0x7FFFFFFF,  # NaN, all ones (the uint32 add wraps for the negative one)
]
F32_EDGES = F32_EDGES + [b | 0x80000000 for b in F32_EDGES]

# bf16 buffer and addend values, as bit patterns (and their negatives)
BF16_EDGES = [
    0x0000,  # +0
    0x0001,  # smallest subnormal
    0x0002,
    0x007F,  # largest subnormal
    0x0080,  # smallest normal
    0x0100,
    0x3B80,  # 2^-8: half an ulp of 1
    0x3B00,  # 2^-9
    0x3C00,  # 2^-7: one ulp of 1
    0x3F7F,  # just below 1
    0x3F80,  # 1
    0x3F81,  # 1 + 2^-7
    0x3FC0,  # 1.5
    0x4000,  # 2
    0x4380,  # 256
    0x4B80,  # 2^24
    0x7F00,  # 2^127
    0x7F7E,
    0x7F7F,  # bf16 max: max + max overflows
    0x7F80,  # Inf
    0x7FC0,  # quiet NaN
    0x7F81,  # signalling NaN
    0x7FFF,  # NaN, all ones
]
BF16_EDGES = BF16_EDGES + [b | 0x8000 for b in BF16_EDGES]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _native_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels are on in this file unless a test switches them off (whatever the environment)."""
    monkeypatch.delenv(_native.ENV_VAR, raising=False)
    assert _native.enabled()


@contextlib.contextmanager
def torch_path():
    """Run the reference: the package's torch code with the kernels switched off."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_native.ENV_VAR, "0")
        assert not _native.enabled()
        yield


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bits(t: torch.Tensor) -> np.ndarray:
    """Unsigned bit patterns of a bf16 or fp32 tensor."""
    if t.dtype == torch.bfloat16:
        return t.reshape(-1).view(torch.int16).numpy().view(np.uint16)
    return t.reshape(-1).view(torch.int32).numpy().view(np.uint32)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    np.testing.assert_array_equal(bits(actual), bits(expected))


def assert_bits_equal_but_nan_payload(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same bits wherever expected is not NaN; NaN in the same places, with the cast's pattern."""
    nan = torch.isnan(expected.float()).reshape(-1).numpy()
    np.testing.assert_array_equal(torch.isnan(actual.float()).reshape(-1).numpy(), nan)
    np.testing.assert_array_equal(bits(actual)[~nan], bits(expected)[~nan])
    assert (bits(actual)[nan] == _native.bf16_nan_bits()).all()


def f32_from_bits(patterns: list[int] | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(patterns, dtype=np.uint32).view(np.float32).copy())


def bf16_from_bits(patterns: list[int] | np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(patterns, dtype=np.uint16).view(np.int16).copy()).view(torch.bfloat16)


def f32_input(n: int, seed: int) -> torch.Tensor:
    """Make n fp32 values: the edge values, uniform bit patterns and mixed magnitudes, interleaved."""
    g = torch.Generator().manual_seed(seed)
    edges = f32_from_bits(F32_EDGES)
    patterns = torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    mixed = torch.randn(n, generator=g) * torch.exp2(torch.randint(-150, 128, (n,), generator=g).float())
    pick = torch.randint(0, 3, (n,), generator=g)
    x = torch.where(pick == 0, patterns, mixed)
    x = torch.where(pick == 2, edges[torch.randint(0, len(edges), (n,), generator=g)], x)
    return x


def bf16_input(n: int, seed: int, *, lo: int = -40, hi: int = 40, nonfinite: bool = True) -> torch.Tensor:
    """Make n bf16 values of mixed magnitude 2^lo..2^hi, with edge values and (optionally) bit patterns."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * torch.exp2(torch.randint(lo, hi, (n,), generator=g).float())).bfloat16()
    x[torch.rand(n, generator=g) < 0.05] = 0.0
    if nonfinite:
        pick = torch.randint(0, 8, (n,), generator=g)
        patterns = torch.randint(-(2**15), 2**15, (n,), generator=g, dtype=torch.int16).view(torch.bfloat16)
        edges = bf16_from_bits(BF16_EDGES)
        x = torch.where(pick == 0, patterns, x)
        x = torch.where(pick == 1, edges[torch.randint(0, len(edges), (n,), generator=g)], x)
    return x


def edge_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    """Every (buffer, addend) pair of edge values (plus 1 + the edges and the edges + tiny)."""
    e = np.asarray(BF16_EDGES, dtype=np.uint16)
    s, t = np.meshgrid(e, e, indexing="ij")
    return bf16_from_bits(s.reshape(-1)), bf16_from_bits(t.reshape(-1))


# --------------------------------------------------------------------------------------------------
# switches
# --------------------------------------------------------------------------------------------------
def test_env_var_switches_the_kernels_off_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    for off in ("0", "false", "off", "No"):
        monkeypatch.setenv(_native.ENV_VAR, off)
        assert not _native.enabled()
    monkeypatch.setenv(_native.ENV_VAR, "1")
    assert _native.enabled()


def test_numba_is_imported_lazily_and_missing_numba_falls_back_to_torch() -> None:
    code = (
        "import sys, torch\n"
        "import precision_lab as pl\n"
        "assert 'numba' not in sys.modules, 'numba imported with precision_lab'\n"
        "sys.modules['numba'] = None  # makes 'import numba' fail\n"
        "from precision_lab import _native\n"
        "assert not _native.enabled()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "y = pl.round_stochastic(torch.linspace(-3, 3, 11), 'bf16', generator=g)\n"
        "acc = pl.Accumulator('kahan', 'bf16', 11)\n"
        "acc.add(y)\n"
        "assert torch.equal(acc.value().float(), y)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_bf16_nan_bits_is_torchs_cast_of_nan() -> None:
    nans = f32_from_bits([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF] * 20)
    assert (bits(nans.to(torch.bfloat16)) == _native.bf16_nan_bits()).all()


# --------------------------------------------------------------------------------------------------
# sr_bf16
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("random_bits", [16, 8, 1])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", SIZES)
def test_sr_bf16_matches_torch(n: int, out_dtype: torch.dtype, random_bits: int) -> None:
    x = f32_input(n, seed=n)
    key = _random.derive_key(torch.Generator().manual_seed(random_bits))
    out = torch.empty(n, dtype=out_dtype)
    _native.sr_bf16(x, out, key, random_bits)
    expected = torch.empty(n, dtype=out_dtype).copy_(rounding._sr_bf16_torch(x, key, random_bits))
    assert_bits_equal(out, expected)


def test_sr_bf16_edges_meet_every_random_lane() -> None:
    x = f32_from_bits(np.tile(np.asarray(F32_EDGES, dtype=np.uint32), 257))  # 257 * 38: lanes rotate
    for key in (0, 1, 2**63 - 1, 0x123456789ABCDEF):
        for out_dtype in (torch.float32, torch.bfloat16):
            out = torch.empty(x.shape, dtype=out_dtype)
            _native.sr_bf16(x, out, key, 16)
            assert_bits_equal(out, torch.empty_like(out).copy_(rounding._sr_bf16_torch(x, key, 16)))


def test_sr_bf16_in_place_and_empty() -> None:
    x = f32_input(1001, seed=3)
    expected = rounding._sr_bf16_torch(x, 77, 16)
    _native.sr_bf16(x, x, 77, 16)
    assert_bits_equal(x, expected)
    _native.sr_bf16(torch.empty(0), torch.empty(0, dtype=torch.bfloat16), 77, 16)


@pytest.mark.parametrize("random_bits", [None, 8, 1])
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16], ids=["none", "fp32", "bf16"])
def test_round_stochastic_same_bits_with_and_without_kernels(
    random_bits: int | None, out_dtype: torch.dtype | None
) -> None:
    x = f32_input(17 * 241, seed=11).reshape(17, 241)

    def run() -> torch.Tensor:
        out = None if out_dtype is None else torch.empty(x.shape, dtype=out_dtype)
        g = torch.Generator().manual_seed(5)
        return rounding.round_stochastic(x, "bf16", generator=g, random_bits=random_bits, out=out)

    native = run()
    with torch_path():
        reference = run()
    assert_bits_equal(native, reference)


# --------------------------------------------------------------------------------------------------
# naive
# --------------------------------------------------------------------------------------------------
def test_naive_add_edge_pairs() -> None:
    s, t = edge_pairs()
    expected, expected_lost = s.clone(), None
    with torch_path():
        expected_lost = naive_step(expected, t, BF16, True)
    lost = _native.naive_add_bf16(s, t)
    assert_bits_equal_but_nan_payload(s, expected)
    assert lost == expected_lost


@pytest.mark.parametrize("n", SIZES)
def test_naive_add_matches_torch(n: int) -> None:
    s, t = bf16_input(n, seed=n), bf16_input(n, seed=n + 1)
    expected = s.clone()
    with torch_path():
        expected_lost = naive_step(expected, t, BF16, True)
    assert expected_lost > 0 or n < 100  # the test data does stagnate
    lost = _native.naive_add_bf16(s, t)
    assert_bits_equal_but_nan_payload(s, expected)
    assert lost == expected_lost


def test_naive_add_every_bf16_pattern() -> None:
    s = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for seed in range(3):
        t = bf16_input(s.numel(), seed=seed)
        expected = s.clone()
        with torch_path():
            expected_lost = naive_step(expected, t, BF16, True)
        got = s.clone()
        assert _native.naive_add_bf16(got, t) == expected_lost
        assert_bits_equal_but_nan_payload(got, expected)


def test_naive_add_non_contiguous() -> None:
    s = bf16_input(2 * 999, seed=1).reshape(999, 2).t()  # non-contiguous views
    t = bf16_input(2 * 999, seed=2).reshape(999, 2).t()
    expected = s.clone()
    with torch_path():
        expected_lost = naive_step(expected, t, BF16, True)
    assert _native.naive_add_bf16(s, t) == expected_lost
    assert_bits_equal_but_nan_payload(s, expected)


# --------------------------------------------------------------------------------------------------
# kahan
# --------------------------------------------------------------------------------------------------
def test_kahan_add_edge_triples() -> None:
    s, t = edge_pairs()
    for c_bits in (0x0000, 0x8000, 0x0001, 0x3B80, 0xBB80, 0x7F7F, 0x7F80, 0x7FC0):
        c = bf16_from_bits(np.full(s.numel(), c_bits))
        es, ec = s.clone(), c.clone()
        with torch_path():
            expected_lost = kahan_step(es, ec, t, BF16, True)
        gs, gc = s.clone(), c.clone()
        assert _native.kahan_add_bf16(gs, gc, t) == expected_lost
        assert_bits_equal_but_nan_payload(gs, es)
        assert_bits_equal_but_nan_payload(gc, ec)


@pytest.mark.parametrize("n", SIZES)
def test_kahan_add_matches_torch(n: int) -> None:
    s, t = bf16_input(n, seed=n), bf16_input(n, seed=n + 1)
    c = bf16_input(n, seed=n + 2, lo=-60, hi=-20)  # compensations are small
    es, ec = s.clone(), c.clone()
    with torch_path():
        expected_lost = kahan_step(es, ec, t, BF16, True)
    assert _native.kahan_add_bf16(s, c, t) == expected_lost
    assert_bits_equal_but_nan_payload(s, es)
    assert_bits_equal_but_nan_payload(c, ec)


# --------------------------------------------------------------------------------------------------
# stochastic
# --------------------------------------------------------------------------------------------------
def test_sr_add_edge_pairs() -> None:
    s, t = edge_pairs()
    s, t = s.repeat(5), t.repeat(5)  # every pair meets several random lanes
    expected = s.clone()
    with torch_path():
        expected_lost = stochastic_step(expected, t, BF16, 4242, True)
    assert _native.sr_add_bf16(s, t, 4242, True) == expected_lost
    assert_bits_equal(s, expected)  # the reference casts its fp32 NaNs: the same pattern


@pytest.mark.parametrize("count_lost", [True, False])
@pytest.mark.parametrize("n", SIZES)
def test_sr_add_matches_torch(n: int, count_lost: bool) -> None:
    s, t = bf16_input(n, seed=n), bf16_input(n, seed=n + 1)
    expected = s.clone()
    with torch_path():
        expected_lost = stochastic_step(expected, t, BF16, 2**62 + n, count_lost)
    assert _native.sr_add_bf16(s, t, 2**62 + n, count_lost) == expected_lost
    assert_bits_equal(s, expected)


# --------------------------------------------------------------------------------------------------
# counting non-finite addends
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, *SIZES])
def test_count_nonfinite_matches_torch(n: int) -> None:
    t = bf16_input(n, seed=n)
    assert _native.count_nonfinite_bf16(t) == int((~torch.isfinite(t)).sum())


def test_count_nonfinite_every_bf16_pattern() -> None:
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    assert _native.count_nonfinite_bf16(every) == int((~torch.isfinite(every)).sum()) == 2 * 2**7
    assert _native.count_nonfinite_bf16(every.reshape(256, 256).t()) == 2 * 2**7  # non-contiguous


def test_small_buffers_take_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below MIN_NUMEL the parallel kernels cost more than they save; the Accumulator must not call them."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a compiled kernel was called for a small buffer")

    for name in ("naive_add_bf16", "kahan_add_bf16", "sr_add_bf16", "count_nonfinite_bf16"):
        monkeypatch.setattr(_native, name, refuse)
    for strategy in ("naive", "kahan", "stochastic"):
        acc = Accumulator(strategy, "bf16", _native.MIN_NUMEL - 1, generator=torch.Generator().manual_seed(0))
        acc.add(torch.ones(_native.MIN_NUMEL - 1))
        assert acc.value()[0] == 1.0


# --------------------------------------------------------------------------------------------------
# through the Accumulator, many steps
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["naive", "kahan", "stochastic"])
@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "nonfinite"])
def test_accumulator_same_bits_with_and_without_kernels(strategy: str, nonfinite: bool) -> None:
    n, steps = _native.MIN_NUMEL + 3, 12  # above the size where the Accumulator switches to the kernels
    addends = [bf16_input(n, seed=100 + k, lo=-30, hi=-5, nonfinite=nonfinite and k == 7) for k in range(steps)]
    addends[3] = addends[3].float() * 3.3  # an fp32 addend: rounded to bf16 by the accumulator first

    def run() -> Accumulator:
        acc = Accumulator(strategy, "bf16", n, generator=torch.Generator().manual_seed(9))
        for a in addends:
            acc.add(a)
        return acc

    native = run()
    with torch_path():
        reference = run()
    compare = assert_bits_equal_but_nan_payload if strategy != "stochastic" else assert_bits_equal
    compare(native._s, reference._s)
    if strategy == "kahan":
        compare(native._c, reference._c)
    assert native.lost_updates == reference.lost_updates
    assert reference.lost_updates > 0


# --------------------------------------------------------------------------------------------------
# thread-count independence
# --------------------------------------------------------------------------------------------------
def test_same_bits_with_one_and_two_threads() -> None:
    n = 5 * _native._CHUNK + 3
    x = f32_input(n, seed=1)
    s, c, t = bf16_input(n, seed=2), bf16_input(n, seed=3, lo=-60, hi=-20), bf16_input(n, seed=4)
    results = []
    for k in (1, 2):
        with threads(k):
            out = torch.empty(n, dtype=torch.bfloat16)
            _native.sr_bf16(x, out, 99, 16)
            s1, s2, s3, c3 = s.clone(), s.clone(), s.clone(), c.clone()
            lost = (
                _native.naive_add_bf16(s1, t),
                _native.sr_add_bf16(s2, t, 99, True),
                _native.kahan_add_bf16(s3, c3, t),
                _native.count_nonfinite_bf16(t),
            )
            results.append((out, s1, s2, s3, c3, lost))
    for a, b in zip(results[0][:5], results[1][:5], strict=True):
        assert_bits_equal(a, b)
    assert results[0][5] == results[1][5]
