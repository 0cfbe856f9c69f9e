"""Tests of precision_lab.workloads: model workloads, their data, batch invariance, synthetic streams.

Exact checks (``torch.equal``) for everything deterministic: parameters from a seed, samples from a
generator, vmap-vs-loop gradients.  Statistical checks of the streams use a fixed seed and a
6-standard-error band (a two-sided normal tail of 2e-9 per check), each with a negative control that
the same band rejects, so that the check is known to have power.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import re
import string
import sysconfig
from pathlib import Path

import pytest
import scipy.stats
import torch
from torch.func import functional_call, grad, vmap

from precision_lab.gradients import COMPUTE_FORMATS, GradientEngine
from precision_lab.workloads import (
    MODEL_WORKLOADS,
    STREAM_KINDS,
    GradientStream,
    ModelWorkload,
    make_stream,
    make_workload,
)
from precision_lab.workloads import data as wdata

Z = 6.0  # half-width of the statistical bands, in standard errors


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach() for k, p in model.named_parameters()}


@functools.cache
def _at_init(name: str, size: str = "full") -> ModelWorkload:
    """Workloads at initialisation, built once (tests copy the model before changing it)."""
    return make_workload(name, size=size, warmup_steps=0)


# --------------------------------------------------------------------------------------------------
# model workloads: construction, shapes, info
# --------------------------------------------------------------------------------------------------
def test_names() -> None:
    assert MODEL_WORKLOADS == ("mlp", "cnn", "transformer")
    assert STREAM_KINDS == ("gaussian", "student_t", "sparse")


def _expected_parameters(name: str, size: str, vocab: int) -> int:
    """Parameter counts from the architecture, written out independently of the model code."""
    if name == "mlp":
        sizes = (64, 128, 128, 10) if size == "full" else (64, 64, 10)
        return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    if name == "cnn":
        c1, c2 = (8, 16) if size == "full" else (4, 8)
        return (9 * c1 + c1) + 2 * c1 + (9 * c1 * c2 + c2) + 2 * c2 + (16 * c2 * 10 + 10)
    t, c = (64, 64) if size == "full" else (32, 32)
    block = 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + 2 * c + (c * 4 * c + 4 * c) + (4 * c * c + c)
    return vocab * c + t * c + 2 * block + 2 * c + (c * vocab + vocab)


@pytest.mark.parametrize("size", ["full", "quick"])
@pytest.mark.parametrize("name", MODEL_WORKLOADS)
def test_workload_builds_and_runs(name: str, size: str) -> None:
    w = _at_init(name, size)
    assert w.name == name
    assert w.model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in w.model.parameters())
    x, y = w.sample(16, _gen(0))
    out = w.model(x)
    if name == "transformer":
        t, vocab = w.info["architecture"]["context"], w.info["vocab_size"]
        assert t == (64 if size == "full" else 32)
        assert x.shape == y.shape == (16, t)
        assert x.dtype == y.dtype == torch.int64
        assert out.shape == (16, t, vocab)
    else:
        vocab = 0
        assert x.dtype == torch.float32
        assert y.dtype == torch.int64
        assert x.shape == ((16, 64) if name == "mlp" else (16, 1, 8, 8))
        assert y.shape == (16,)
        assert out.shape == (16, 10)
    loss = w.loss_fn(out, y)
    assert loss.shape == ()
    assert torch.isfinite(loss)
    n_params = sum(p.numel() for p in w.model.parameters())
    assert w.info["parameters"] == n_params == _expected_parameters(name, size, vocab)
    assert w.info["samples"] == w.data_size
    json.dumps(w.info)  # serialisable


def test_loss_is_mean_over_tokens() -> None:
    w = _at_init("transformer", "quick")
    x, y = w.sample(3, _gen(0))
    logits = w.model(x)
    per_token = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    assert per_token.shape == (3 * 32,)
    torch.testing.assert_close(w.loss_fn(logits, y), per_token.mean(), rtol=0, atol=1e-6)


def test_transformer_info_records_corpus() -> None:
    info = _at_init("transformer").info
    assert info["corpus_files"] == list(wdata.CORPUS_FILES)
    assert info["corpus_sha256"] == wdata.load_corpus().sha256
    assert info["samples"] == _at_init("transformer").data_size == len(wdata.load_corpus()) - 64 - 1


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"name": "resnet"}, "'resnet'"),
        ({"name": "mlp", "size": "tiny"}, "'tiny'"),
        ({"name": "mlp", "warmup_steps": -1}, "-1"),
    ],
)
def test_make_workload_bad_arguments(kwargs: dict, bad: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=re.escape(bad)):
        make_workload(name, **kwargs)


# --------------------------------------------------------------------------------------------------
# determinism and warm-up
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_WORKLOADS)
def test_same_seed_same_bits_and_global_rng_untouched(name: str) -> None:
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    a = make_workload(name, seed=3, size="quick")  # default warm-up (20 Adam steps) included
    b = make_workload(name, seed=3, size="quick")
    c = make_workload(name, seed=4, size="quick")
    assert torch.equal(torch.random.get_rng_state(), before)
    pa, pb, pc = _params(a.model), _params(b.model), _params(c.model)
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)
    xa, ya = a.sample(8, _gen(5))
    xb, yb = b.sample(8, _gen(5))
    xc, _ = a.sample(8, _gen(6))
    assert torch.equal(xa, xb)
    assert torch.equal(ya, yb)
    assert not torch.equal(xa, xc)


@pytest.mark.parametrize(
    ("name", "size"), [("mlp", "full"), ("mlp", "quick"), ("cnn", "quick"), ("transformer", "quick")]
)
def test_warmup_lowers_loss(name: str, size: str) -> None:
    cold = _at_init(name, size)
    warm = make_workload(name, size=size)  # the default number of warm-up steps
    assert warm.info["warmup"]["steps"] > 0
    x, y = cold.sample(256, _gen(99))  # a fixed evaluation batch, not the warm-up's data stream
    with torch.no_grad():
        loss_cold = cold.loss_fn(cold.model(x), y).item()
        loss_warm = warm.loss_fn(warm.model(x), y).item()
    assert loss_warm < loss_cold
    assert all(p.grad is None for p in warm.model.parameters())


def test_zero_warmup_is_the_initialisation() -> None:
    a = make_workload("mlp", seed=7, warmup_steps=0)
    torch.manual_seed(7)
    reference = torch.nn.Linear(64, 128)  # the first layer draws first, like nn.Linear
    assert torch.equal(a.model.layers[0].weight, reference.weight.detach())
    assert a.info["warmup"]["steps"] == 0
    assert a.info["warmup"]["last_loss"] is None


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def test_digits_tensors() -> None:
    x, y = wdata.load_digits()
    assert x.shape == (1797, 64)
    assert x.dtype == torch.float32
    assert y.shape == (1797,)
    assert y.dtype == torch.int64
    assert torch.equal(x * 16, (x * 16).round())
    assert x.min() == 0
    assert x.max() == 1
    assert set(y.tolist()) == set(range(10))


@pytest.mark.parametrize("batch", [1, 64, 1797, 2000])
def test_digits_sampling_follows_documented_draws(batch: int) -> None:
    x, y = wdata.sample_digits(batch, _gen(11))
    g = _gen(11)
    if batch <= 1797:
        idx = torch.randperm(1797, generator=g)[:batch]
        assert len(set(idx.tolist())) == batch  # without replacement
    else:
        idx = torch.randint(0, 1797, (batch,), generator=g)
    inputs, labels = wdata.load_digits()
    assert torch.equal(x, inputs[idx])
    assert torch.equal(y, labels[idx])


def test_text_windows_are_shifted_corpus_slices() -> None:
    w = _at_init("transformer")
    corpus = wdata.load_corpus()
    x, y = w.sample(5, _gen(2))
    starts = torch.randint(0, len(corpus) - 64 - 1, (5,), generator=_gen(2))
    for row, s in enumerate(starts.tolist()):
        assert torch.equal(x[row], corpus.ids[s : s + 64])
        assert torch.equal(y[row], corpus.ids[s + 1 : s + 65])


def test_corpus_text_hash_and_vocabulary() -> None:
    corpus = wdata.load_corpus()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n".join((stdlib / f).read_text(encoding="utf-8") for f in wdata.CORPUS_FILES)
    assert corpus.text == text
    assert corpus.sha256 == hashlib.sha256(text.encode("utf-8")).hexdigest()
    allowed = set(string.printable) - set("\t\r\x0b\x0c") | {"?"}
    assert set(corpus.vocab) <= allowed
    assert list(corpus.vocab) == sorted(corpus.vocab)
    assert corpus.ids.dtype == torch.int64
    assert len(corpus) == len(text)
    mapped = corpus.decode(corpus.ids)
    assert all(a == b or (b == "?" and a not in allowed) for a, b in zip(text, mapped, strict=True))


def test_missing_corpus_file_is_named() -> None:
    with pytest.raises(FileNotFoundError, match="no_such_module_xyz.py"):
        wdata.load_corpus(("textwrap.py", "no_such_module_xyz.py"))


# --------------------------------------------------------------------------------------------------
# batch invariance: vmap over micro-batches == a loop over micro-batches, to the bit
# --------------------------------------------------------------------------------------------------
_DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}


def _invariance_cases() -> list:
    return [
        pytest.param(name, dtype, b, id=f"{name}-{dname}-B{b}")
        for name in MODEL_WORKLOADS
        for dname, dtype in _DTYPES.items()
        for b in (16, 32)
    ]


def _ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between entries (ordinal distance of the encodings)."""
    bits = a.element_size() * 8
    signed = {64: torch.int64, 32: torch.int32, 16: torch.int16}[bits]

    def ordinal(t: torch.Tensor) -> torch.Tensor:
        i = t.view(signed).to(torch.int64)
        return torch.where(i < 0, -(i & ((1 << (bits - 1)) - 1)), i)

    return int((ordinal(a) - ordinal(b)).abs().max())


def _check_vmap_equals_loop(name: str, dtype: torch.dtype, b: int, n: int = 4) -> None:
    w = _at_init(name)
    model = copy.deepcopy(w.model).to(dtype)
    params = _params(model)

    def loss_of_params(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return w.loss_fn(functional_call(model, p, (x,)), y)

    x, y = w.sample(n * b, _gen(123))
    if x.is_floating_point():
        x = x.to(dtype)
    x, y = x.reshape(n, b, *x.shape[1:]), y.reshape(n, b, *y.shape[1:])
    batched = vmap(grad(loss_of_params), in_dims=(None, 0, 0))(params, x, y)
    differ = {}
    for i in range(n):
        single = grad(loss_of_params)(params, x[i], y[i])
        assert single.keys() == params.keys()
        for k in params:
            assert single[k].dtype == dtype
            if not torch.equal(single[k], batched[k][i]):
                differ[k] = max(differ.get(k, 0), _ulp_distance(single[k], batched[k][i]))
    assert not differ, f"vmap and loop gradients differ (parameter: max ulps): {differ}"


@pytest.fixture
def single_thread():
    """Run a test with one intra-op thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize(("name", "dtype", "b"), _invariance_cases())
def test_vmap_gradients_equal_loop_gradients_single_thread(name: str, dtype: torch.dtype, b: int) -> None:
    # With more than one intra-op thread the loop's GEMMs split their reductions across threads
    # (see precision_lab.gradients); with one thread these layers are batch-invariant, every case exact.
    _check_vmap_equals_loop(name, dtype, b)


@pytest.mark.parametrize("compute", COMPUTE_FORMATS)
@pytest.mark.parametrize("name", MODEL_WORKLOADS)
def test_engine_vmap_equals_loop_at_the_callers_thread_count(name: str, compute: str) -> None:
    """GradientEngine pins one thread while computing: vmap == loop whatever torch.get_num_threads() is."""
    w = _at_init(name)
    x, y = w.sample(4 * 32, _gen(7))
    got = {}
    for method, chunk in (("loop", 1), ("vmap", 4), ("vmap", 3)):
        eng = GradientEngine(w.model, w.loss_fn, compute, method=method, chunk_size=chunk)
        got[(method, chunk)] = torch.cat(list(eng.micro_gradients(x, y, 4, divide_by=4)))
    loop = got[("loop", 1)]
    for key, g in got.items():
        assert torch.equal(g, loop), (key, _ulp_distance(g, loop))


# --------------------------------------------------------------------------------------------------
# synthetic streams
# --------------------------------------------------------------------------------------------------
def _within(estimate: float, expected: float, se: float) -> bool:
    return abs(estimate - expected) <= Z * se


def test_signal_is_mean_times_signs() -> None:
    s = make_stream("gaussian", 1000, mean=0.25)
    sig = s.signal(_gen(0))
    assert sig.shape == (1000,)
    assert sig.dtype == torch.float64
    assert set(sig.tolist()) == {0.25, -0.25}
    assert torch.equal(sig, s.signal(_gen(0)))
    assert _within(float((sig > 0).double().mean()), 0.5, math.sqrt(0.25 / 1000))


_STREAMS = {
    "gaussian": {},
    "student_t": {"df": 3.0},
    "sparse": {"density": 0.1},
}


@pytest.mark.parametrize("kind", STREAM_KINDS)
def test_stream_mean_is_the_signal(kind: str) -> None:
    s = make_stream(kind, 1000, mean=0.05, spread=1.0, **_STREAMS[kind])
    g = _gen(1)
    sig = s.signal(g)
    n = 2000
    grads = s.sample(n, sig, g)
    assert grads.shape == (n, 1000)
    assert grads.dtype == torch.float64
    signs = sig.sign()
    # Projection on the signal's signs: estimates `mean`; each term has variance s.variance().
    estimate = float((grads * signs).mean())
    se = math.sqrt(s.variance() / grads.numel())
    assert _within(estimate, 0.05, se)
    assert not _within(estimate, 0.0, se)  # negative control: a zero-mean stream is rejected
    # Element-wise: every column's mean is within Z standard errors of its signal entry, and the sum of
    # the squared standardised deviations is chi-squared-like: m +- Z * sqrt(2m) (CLT, n = 2000 rows).
    column_se = math.sqrt(s.variance() / n)
    z = (grads.mean(0) - sig) / column_se
    assert float(z.abs().max()) <= Z
    m = sig.numel()
    assert _within(float((z**2).sum()), m, math.sqrt(2 * m))
    z_flipped = (grads.mean(0) + sig) / column_se  # negative control: the signal with flipped signs fails
    assert not _within(float((z_flipped**2).sum()), m, math.sqrt(2 * m))


@pytest.mark.parametrize(
    ("kind", "kwargs"), [("gaussian", {}), ("student_t", {"df": 10.0}), ("sparse", {"density": 0.25})]
)
def test_stream_variance(kind: str, kwargs: dict) -> None:
    # student_t with df=10: the fourth moment is finite, so the sample variance has a standard error.
    s = make_stream(kind, 500, mean=0.5, spread=2.0, **kwargs)
    g = _gen(2)
    sig = s.signal(g)
    dev2 = (s.sample(400, sig, g) - sig) ** 2
    se = float(dev2.std()) / math.sqrt(dev2.numel())
    assert _within(float(dev2.mean()), s.variance(), se)
    assert not _within(float(dev2.mean()), 4.0 if kind == "sparse" else 1.0, se)  # negative control
    if kind != "sparse":
        assert s.variance() == 4.0


def test_student_t_has_the_scaled_t_law() -> None:
    df = 3.0
    s = make_stream("student_t", 500, mean=0.0, spread=1.0, df=df)
    g = _gen(3)
    z = s.sample(200, s.signal(g), g).flatten().numpy()
    law = scipy.stats.t(df, scale=math.sqrt((df - 2) / df))
    assert scipy.stats.kstest(z, law.cdf).pvalue > 1e-3
    assert scipy.stats.kstest(z, scipy.stats.norm.cdf).pvalue < 1e-9  # negative control: not gaussian


def test_sparse_density_and_values() -> None:
    s = make_stream("sparse", 1000, mean=0.0, spread=1.0, density=0.2)
    g = _gen(4)
    grads = s.sample(100, s.signal(g), g)
    frac = float((grads != 0).double().mean())
    assert _within(frac, 0.2, math.sqrt(0.2 * 0.8 / grads.numel()))
    dense = make_stream("sparse", 1000, density=1.0)
    g = _gen(4)
    assert bool((dense.sample(3, dense.signal(g), g) != 0).all())


@pytest.mark.parametrize("kind", STREAM_KINDS)
def test_stream_is_chunk_invariant(kind: str) -> None:
    s = make_stream(kind, 37, **_STREAMS[kind])
    g1, g2 = _gen(5), _gen(5)
    sig1, sig2 = s.signal(g1), s.signal(g2)
    parts = torch.cat([s.sample(10, sig1, g1), s.sample(0, sig1, g1), s.sample(6, sig1, g1)])
    whole = s.sample(16, sig2, g2)
    assert torch.equal(sig1, sig2)
    assert torch.equal(parts, whole)
    assert not torch.equal(whole[:8], whole[8:])


def test_zero_spread_gives_the_signal() -> None:
    s = make_stream("gaussian", 10, mean=1.0, spread=0.0)
    g = _gen(6)
    sig = s.signal(g)
    assert torch.equal(s.sample(4, sig, g), sig.expand(4, 10))


@pytest.mark.parametrize(
    ("kind", "elements", "kwargs", "bad"),
    [
        ("laplace", 10, {}, "'laplace'"),
        ("gaussian", 0, {}, "elements must be an integer >= 1, got 0"),
        ("gaussian", 10, {"spread": -1.0}, "spread must be a real number in [0, inf), got -1.0"),
        ("gaussian", 10, {"mean": -0.5}, "mean must be a real number in [0, inf), got -0.5"),
        ("student_t", 10, {"df": 2.0}, "df (> 2: finite variance) must be a real number in (2, inf), got 2.0"),
        ("student_t", 10, {"df": 1.5}, "df (> 2: finite variance) must be a real number in (2, inf), got 1.5"),
        ("sparse", 10, {"density": 0.0}, "density must be a real number in (0, 1], got 0.0"),
        ("sparse", 10, {"density": 1.5}, "density must be a real number in (0, 1], got 1.5"),
        ("gaussian", 10, {"scale": 1.0}, "'scale'"),
    ],
)
def test_make_stream_bad_arguments(kind: str, elements: int, kwargs: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(bad)):
        make_stream(kind, elements, **kwargs)


def test_stream_dataclass_validates_and_sample_checks_arguments() -> None:
    with pytest.raises(ValueError, match=re.escape("density must be a real number in (0, 1], got 0.0")):
        GradientStream("sparse", 10, density=0.0)
    s = make_stream("gaussian", 10)
    with pytest.raises(ValueError, match=re.escape("n must be an integer >= 0, got -1")):
        s.sample(-1, s.signal(_gen(0)), _gen(0))
    with pytest.raises(ValueError, match=re.escape("(10,) float64")):
        s.sample(2, torch.zeros(9, dtype=torch.float64), _gen(0))
