"""One helper: run a block with a fixed number of torch intra-op threads.

Multi-threaded CPU GEMMs split their reductions across threads, so their last bits depend on the
thread count.  Everything whose bytes must not depend on the machine (micro-gradients, warm-up and
training runs, the equivalence checks) runs under ``intra_op_threads(1)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["intra_op_threads"]


@contextlib.contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None: leave the setting alone); restore after."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
