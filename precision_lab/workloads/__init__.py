"""Workloads: where the micro-batch gradients come from.

Two families:

* **Model workloads** (:func:`make_workload`): a small model, its loss and its data, all on the CPU in
  float32 and fully determined by a seed.  ``"mlp"`` and ``"cnn"`` classify scikit-learn's digits;
  ``"transformer"`` is a character-level GPT on Python standard-library source (text already on the
  machine, see :mod:`precision_lab.workloads.data`).  The models are built from batch-invariant
  blocks (:mod:`precision_lab.workloads.models`), so micro-batch gradients computed with
  ``torch.func.vmap`` and in a loop agree to the bit (the tests list the exceptions).
* **Synthetic streams** (:func:`make_stream`): micro-gradients with a known mean and a gaussian,
  Student-t or sparse noise law (:mod:`precision_lab.workloads.synthetic`).

Example::

    w = make_workload("mlp", seed=0)
    x, y = w.sample(64, torch.Generator().manual_seed(1))
    loss = w.loss_fn(w.model(x), y)

    s = make_stream("student_t", 10_000, df=3.0)
    g = torch.Generator().manual_seed(0)
    grads = s.sample(32, s.signal(g), g)  # (32, 10000) float64
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F  # noqa: N812 (the conventional name)
from torch import Tensor, nn

from precision_lab._threads import intra_op_threads
from precision_lab.checks import check_int
from precision_lab.workloads.data import (
    CORPUS_FILES,
    DIGITS_SIZE,
    load_corpus,
    sample_digits,
    sample_windows,
)
from precision_lab.workloads.models import CNN, MLP, CharTransformer, count_parameters
from precision_lab.workloads.synthetic import STREAM_KINDS, GradientStream, make_stream

__all__ = [
    "MODEL_WORKLOADS",
    "SIZES",
    "STREAM_KINDS",
    "GradientStream",
    "ModelWorkload",
    "classification_loss",
    "make_stream",
    "make_workload",
    "next_token_loss",
]

MODEL_WORKLOADS: tuple[str, ...] = ("mlp", "cnn", "transformer")
SIZES: tuple[str, ...] = ("full", "quick")

# Architecture per (workload, size).  "quick" is small enough for fast gradients in the quick runs.
_ARCH: dict[str, dict[str, dict]] = {
    "mlp": {"full": {"sizes": (64, 128, 128, 10)}, "quick": {"sizes": (64, 64, 10)}},
    "cnn": {"full": {"channels": (8, 16)}, "quick": {"channels": (4, 8)}},
    "transformer": {
        "full": {"context": 64, "width": 64, "depth": 2, "heads": 4},
        "quick": {"context": 32, "width": 32, "depth": 2, "heads": 4},
    },
}
# fp32 Adam steps taken before the model is returned, when the caller does not say.
_DEFAULT_WARMUP: dict[str, dict[str, int]] = {
    "full": {"mlp": 200, "cnn": 100, "transformer": 100},
    "quick": {"mlp": 20, "cnn": 20, "transformer": 20},
}
WARMUP_LR = 1e-3
WARMUP_BATCH = 64


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of (B, classes) logits against (B,) int64 labels."""
    return F.cross_entropy(logits, labels)


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over all B*T positions of (B, T, V) logits against (B, T) int64 targets."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@dataclass(frozen=True, eq=False)
class ModelWorkload:
    """A model, its loss and its data.

    Attributes:
        name: One of :data:`MODEL_WORKLOADS`.
        model: float32 module on the CPU, in train mode, determined by the seed (and the warm-up).
        loss_fn: ``(model_output, targets) -> scalar`` mean loss of a (micro-)batch.
        data_size: Number of distinct samples (digits: 1797; text: number of distinct windows).
        info: JSON-serialisable description (dataset, sample count, parameter count, architecture,
            warm-up; for text the corpus file names, its sha256 and the Python version).
        sampler: ``(batch, generator) -> (inputs, targets)``; use :meth:`sample`.
    """

    name: str
    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    data_size: int
    info: dict
    sampler: Callable[[int, torch.Generator], tuple[Tensor, Tensor]] = field(repr=False)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draw ``batch`` samples ``(inputs, targets)`` with ``generator`` (the only source of randomness).

        Digits: inputs (B, 64) float32 for the MLP, (B, 1, 8, 8) for the CNN, targets (B,) int64;
        drawn without replacement when ``batch <= data_size``, with replacement otherwise.  Text:
        inputs and targets (B, T) int64 token ids, windows drawn with replacement.
        """
        return self.sampler(batch, generator)


def _digits_images(batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Digits as (B, 1, 8, 8) images."""
    x, y = sample_digits(batch, generator)
    return x.reshape(-1, 1, 8, 8), y


def _warm_up(model: nn.Module, loss_fn: Callable, sampler: Callable, steps: int, seed: int) -> float | None:
    """Take ``steps`` fp32 Adam steps (lr 1e-3, batch 64, data generator seeded with ``seed + 1``).

    Returns the loss of the last step (before its update), or None for ``steps == 0``.
    """
    if steps == 0:
        return None
    generator = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=WARMUP_LR, foreach=False)
    loss = None
    for _ in range(steps):
        x, y = sampler(WARMUP_BATCH, generator)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # leave no .grad behind
    return float(loss.detach())


def make_workload(name: str, *, seed: int = 0, size: str = "full", warmup_steps: int | None = None) -> ModelWorkload:
    """Build a model workload, deterministically from ``seed``.

    The model is initialised from ``seed`` inside ``torch.random.fork_rng`` (the global RNG state is
    left unchanged), then trained for ``warmup_steps`` fp32 Adam steps (lr 1e-3, batch 64, batches
    drawn with ``torch.Generator().manual_seed(seed + 1)``), so that gradients are measured on a
    model that has started learning.  The same seed gives bit-identical parameters (on the same
    machine and torch build; float reductions may differ between CPUs and thread counts).

    Args:
        name: One of :data:`MODEL_WORKLOADS`.
        seed: Seed of the initialisation and the warm-up data.
        size: ``"full"`` or ``"quick"`` (smaller model and context for fast runs; see ``info``).
        warmup_steps: Number of Adam steps; None for the default (full: mlp 200, cnn 100,
            transformer 100; quick: 20 each); 0 returns the model at initialisation.

    Returns:
        The :class:`ModelWorkload`, its model in train mode.

    Raises:
        ValueError: Unknown name or size, or negative ``warmup_steps``.
    """
    if name not in MODEL_WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(map(repr, MODEL_WORKLOADS))}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {', '.join(map(repr, SIZES))}")
    if warmup_steps is None:
        warmup_steps = _DEFAULT_WARMUP[size][name]
    check_int(warmup_steps, "warmup_steps (an integer >= 0, or None for the default)", minimum=0)
    arch = _ARCH[name][size]

    info: dict = {"workload": name, "size": size, "seed": seed}
    if name == "transformer":
        corpus = load_corpus(CORPUS_FILES)
        context = arch["context"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model: nn.Module = CharTransformer(
                len(corpus.vocab), context, width=arch["width"], depth=arch["depth"], heads=arch["heads"]
            )
        loss_fn: Callable[[Tensor, Tensor], Tensor] = next_token_loss
        sampler = partial(sample_windows, corpus.ids, context)
        data_size = len(corpus) - context - 1
        info |= {
            "dataset": "python stdlib source (character level)",
            "samples": data_size,
            "corpus_files": list(corpus.files),
            "corpus_sha256": corpus.sha256,
            "corpus_chars": len(corpus),
            "python_version": platform.python_version(),
            "vocab_size": len(corpus.vocab),
            "architecture": {"type": "char_transformer", **arch, "mlp_ratio": 4, "gelu": "tanh"},
            "input": {"shape": ["B", context], "dtype": "int64"},
        }
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MLP(arch["sizes"]) if name == "mlp" else CNN(arch["channels"])
        loss_fn = classification_loss
        sampler = sample_digits if name == "mlp" else _digits_images
        data_size = DIGITS_SIZE
        shape = ["B", 64] if name == "mlp" else ["B", 1, 8, 8]
        if name == "mlp":
            arch_info = {"type": "mlp", "sizes": list(arch["sizes"]), "activation": "relu"}
        else:
            c1, c2 = arch["channels"]
            arch_info = {
                "type": "cnn",
                "channels": [c1, c2],
                "layers": f"conv3x3(1->{c1})+bn+relu, conv3x3({c1}->{c2})+bn+relu, avgpool2, linear({c2 * 16}->10)",
                "batchnorm": "micro-batch statistics (track_running_stats=False)",
            }
        info |= {
            "dataset": "sklearn digits",
            "samples": data_size,
            "architecture": arch_info,
            "input": {"shape": shape, "dtype": "float32"},
        }

    model = model.to(torch.float32)  # a no-op unless the global default dtype was changed
    with intra_op_threads(1):  # the weights must not depend on the core count (see precision_lab._threads)
        last_loss = _warm_up(model, loss_fn, sampler, warmup_steps, seed)
    model.train()
    info |= {
        "parameters": count_parameters(model),
        "parameter_shapes": {k: list(p.shape) for k, p in model.named_parameters()},
        "warmup": {
            "steps": warmup_steps,
            "optimizer": "adam",
            "lr": WARMUP_LR,
            "batch": WARMUP_BATCH,
            "data_seed": seed + 1,
            "last_loss": last_loss,
        },
        "loss": "cross_entropy (mean)",
    }
    return ModelWorkload(name=name, model=model, loss_fn=loss_fn, data_size=data_size, info=info, sampler=sampler)
