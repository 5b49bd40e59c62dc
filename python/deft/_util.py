"""Small helpers shared by the stages that run models (score, select, evaluate)."""

from __future__ import annotations

from typing import Sequence


def find_sub(seq: Sequence[int], sub: Sequence[int]) -> int:
    """Index of the first occurrence of ``sub`` in ``seq``, or -1."""
    n = len(sub)
    for i in range(len(seq) - n + 1):
        if list(seq[i:i + n]) == list(sub):
            return i
    return -1


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is a (CUDA) out-of-memory error, so a batch can be split and retried."""
    try:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()
