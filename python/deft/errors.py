"""The base class of deft's anticipated failures.

An error derived from :class:`DeftError` is a failure deft expects and can
explain (bad input, an unsafe or foreign file, a folder another process is
working in, a pipeline stage that cannot run): the command line prints it as
one line, ``error: <message>``, and exits with status 2. Anything else that
escapes a command is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["DeftError", "UnsafeWeightsError", "CheckpointError"]


class DeftError(Exception):
    """An anticipated failure, reported as one line (no traceback)."""


class UnsafeWeightsError(DeftError, ValueError):
    """A model whose weights are stored only as pickles (``pytorch_model.bin``),
    which can run code when loaded, and the caller did not opt in."""


class CheckpointError(DeftError, ValueError):
    """A training checkpoint that is not deft's or is unsafe to load."""
