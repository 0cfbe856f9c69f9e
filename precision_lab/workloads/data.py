"""Data already on the machine: scikit-learn's digits and a character corpus from Python's stdlib.

Nothing is downloaded.  Digits ship with scikit-learn (1797 8x8 images, 16 grey levels, 10 classes).
The text corpus is a fixed list of Python standard-library source files read from the running
interpreter's stdlib directory, concatenated in that order with a newline between files; its exact
content therefore depends on the Python version, which is why the workloads record the file names and
the corpus's sha256 in their ``info``.

Sampling takes a ``torch.Generator`` and nothing else random: the same generator state gives the
same batch.  Everything is on the CPU, inputs float32 (digits) or int64 token ids (text).
"""

from __future__ import annotations

import hashlib
import sysconfig
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "CORPUS_FILES",
    "DIGITS_SIZE",
    "CharCorpus",
    "load_corpus",
    "load_digits",
    "sample_digits",
    "sample_windows",
]

DIGITS_SIZE = 1797
# Fixed and ordered: the corpus is these files' text joined by "\n".
CORPUS_FILES: tuple[str, ...] = (
    "textwrap.py",
    "heapq.py",
    "bisect.py",
    "fractions.py",
    "difflib.py",
    "string.py",
    "calendar.py",
)
UNKNOWN_CHAR = "?"  # every character outside printable ASCII and "\n" becomes this one token


@lru_cache(maxsize=1)
def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as tensors, loaded once per process.

    Returns:
        ``(inputs, labels)``: inputs (1797, 64) float32 pixel values divided by 16 (exactly, so in
        [0, 1]), labels (1797,) int64 in 0..9.  The tensors are shared by every caller (cached): do
        not modify them in place.
    """
    from sklearn.datasets import load_digits as _sk_load_digits  # imported lazily: sklearn is slow to import

    digits = _sk_load_digits()
    inputs = torch.tensor(digits.data / 16.0, dtype=torch.float32)  # 0..16 / 16: exact in fp32
    labels = torch.tensor(digits.target, dtype=torch.int64)
    if inputs.shape != (DIGITS_SIZE, 64):
        raise RuntimeError(f"unexpected digits shape {tuple(inputs.shape)}; expected ({DIGITS_SIZE}, 64)")
    return inputs, labels


def sample_digits(batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw ``batch`` digits: without replacement when ``batch <= 1797``, with replacement otherwise.

    Args:
        batch: Number of samples (>= 1).
        generator: Source of randomness (the only one).

    Returns:
        ``(inputs, labels)``: (batch, 64) float32 and (batch,) int64, fresh tensors.
    """
    if batch < 1:
        raise ValueError(f"batch={batch!r}: must be >= 1")
    inputs, labels = load_digits()
    if batch <= DIGITS_SIZE:
        idx = torch.randperm(DIGITS_SIZE, generator=generator)[:batch]
    else:
        idx = torch.randint(0, DIGITS_SIZE, (batch,), generator=generator)
    return inputs[idx], labels[idx]


class CharCorpus:
    """A character-level corpus: its text, vocabulary and token ids.

    Attributes:
        files: Corpus file names (relative to the stdlib directory), in order.
        text: The raw concatenated text (before the unknown-character mapping).
        sha256: Hex sha256 of ``text`` encoded as UTF-8.
        vocab: Sorted characters of the mapped text; token id i is ``vocab[i]``.
        ids: (len(text),) int64 token ids.
    """

    def __init__(self, files: tuple[str, ...], text: str) -> None:
        self.files = files
        self.text = text
        self.sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        # Printable ASCII (space .. "~") and newline are kept; anything else (tab, non-ASCII) is "?".
        mapped = "".join(c if c == "\n" or " " <= c <= "~" else UNKNOWN_CHAR for c in text)
        self.vocab: tuple[str, ...] = tuple(sorted(set(mapped)))
        table = torch.zeros(128, dtype=torch.int64)
        for i, c in enumerate(self.vocab):
            table[ord(c)] = i
        codes = torch.frombuffer(bytearray(mapped.encode("ascii")), dtype=torch.uint8)
        self.ids = table[codes.to(torch.int64)]

    def __len__(self) -> int:
        return self.ids.numel()

    def decode(self, ids: Tensor) -> str:
        """Characters of a 1-D tensor of token ids."""
        return "".join(self.vocab[i] for i in ids.tolist())


@lru_cache(maxsize=4)
def load_corpus(files: tuple[str, ...] = CORPUS_FILES) -> CharCorpus:
    """The stdlib text corpus, read once per process.

    Args:
        files: Names of files in the running interpreter's stdlib directory
            (``sysconfig.get_paths()["stdlib"]``), concatenated in this order with newlines.

    Returns:
        The :class:`CharCorpus`; shared by every caller (cached): do not modify it.

    Raises:
        FileNotFoundError: A file is missing (none is skipped silently: the corpus would change).
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in files:
        path = stdlib / name
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {name!r} not found in the stdlib directory {str(stdlib)!r}")
        parts.append(path.read_text(encoding="utf-8"))
    return CharCorpus(tuple(files), "\n".join(parts))


def sample_windows(ids: Tensor, context: int, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random windows of a token sequence with their next-token targets.

    Window starts are ``torch.randint(0, len(ids) - context - 1, (batch,))`` (with replacement);
    inputs are ``ids[s : s + context]`` and targets ``ids[s + 1 : s + context + 1]``.

    Args:
        ids: (L,) int64 token ids, ``L >= context + 2``.
        context: Window length T.
        batch: Number of windows (>= 1).
        generator: Source of randomness (the only one).

    Returns:
        ``(inputs, targets)``, both (batch, context) int64, fresh tensors.
    """
    if batch < 1:
        raise ValueError(f"batch={batch!r}: must be >= 1")
    starts_available = ids.numel() - context - 1
    if starts_available < 1:
        raise ValueError(f"context={context!r} is too long for a sequence of {ids.numel()} tokens")
    starts = torch.randint(0, starts_available, (batch,), generator=generator)
    windows = ids[starts[:, None] + torch.arange(context + 1)]
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
