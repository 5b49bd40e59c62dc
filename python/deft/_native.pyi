"""Typed interface of ``deft._native``, the Rust core of deft.

Texts (``TextsLike``) may be a list/tuple/iterable of ``str`` (``None`` entries
are allowed), a Polars ``Series`` of strings, a pyarrow ``Array`` or
``ChunkedArray`` of ``string``/``large_string``/``string_view``, or any object
exporting the Arrow PyCapsule interface (``__arrow_c_array__`` or
``__arrow_c_stream__``). Arrow input is read in place, never copied into Python
strings. Null entries are skipped by counting and encode to empty sequences.

Tokenizers (``TokenizerLike``) may be a path (``str`` or ``os.PathLike``) to a
``tokenizer.json`` file or to a folder holding one, the JSON text itself, or a
loaded :class:`Tokenizer`. A ``tokenizer.json``'s own ``padding`` and
``truncation`` settings (e.g. a sentence-transformers ``Fixed(128)`` padding,
or what ``enable_padding()`` + ``save()`` leaves) are ignored: deft always
counts and encodes unpadded, untruncated sequences (cut only by
``encode(max_length=...)``), so results equal the unpadded tokenizer's.

All work runs with the GIL released on a rayon thread pool: all cores by
default, or ``num_threads`` threads. Token ids equal those of the Python
``tokenizers`` library for the same ``tokenizer.json`` and options.
"""

import os
from typing import Any, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

TextsLike = Union[Sequence[Optional[str]], Iterable[Optional[str]], Any]
TokenizerLike = Union[str, "os.PathLike[str]", "Tokenizer"]

class Tokenizer:
    """A Hugging Face ``tokenizer.json`` loaded once and reused across calls."""

    def __init__(self, source: Union[str, "os.PathLike[str]"]) -> None:
        """Load from a path (file or folder with ``tokenizer.json``) or from JSON text."""
    @staticmethod
    def from_file(path: Union[str, "os.PathLike[str]"]) -> "Tokenizer": ...
    @staticmethod
    def from_str(json: str) -> "Tokenizer": ...
    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens: the length of ``count_tokens`` output.

        The largest id + 1 when the id space has small holes. Raises
        ``ValueError`` for an absurdly sparse id space (largest id + 1 above
        both 2**20 and twice the number of tokens), which cannot be counted.
        """
    @property
    def source(self) -> str:
        """Where the tokenizer was loaded from (a path, or ``"<json text>"``)."""
    def count_tokens(
        self,
        texts: TextsLike,
        *,
        add_special_tokens: bool = False,
        num_threads: Optional[int] = None,
    ) -> npt.NDArray[np.uint64]:
        """Histogram of token ids over ``texts``; see :func:`count_tokens`."""
    def encode(
        self,
        texts: TextsLike,
        *,
        add_special_tokens: bool = False,
        max_length: Optional[int] = None,
        truncation_side: str = "right",
        num_threads: Optional[int] = None,
    ) -> Tuple[npt.NDArray[np.uint32], npt.NDArray[np.int64]]:
        """Encode all texts at once.

        Returns ``(ids, offsets)``: ``ids`` holds every text's token ids
        concatenated and ``offsets`` (length ``len(texts) + 1``) delimits them, so
        text ``i`` is ``ids[offsets[i]:offsets[i + 1]]``. With ``max_length``, a
        longer sequence is cut (after special tokens were added) on the
        ``truncation_side`` (``"right"`` keeps the start, ``"left"`` the end).
        """
    def decode(self, ids: Union[Sequence[int], npt.NDArray[np.integer[Any]]], *, skip_special_tokens: bool = False) -> str:
        """Decode token ids: a 1-D numpy array of any integer dtype (any
        strides, e.g. ``ids[::2]``; copied when needed) or a sequence of ints.

        Raises ``ValueError`` naming the position for a negative id or one
        that does not fit in uint32, or for an array that is not 1-D, and
        ``TypeError`` for non-integer data.
        """
    def id_to_token(self, id: int) -> Optional[str]: ...
    def token_to_id(self, token: str) -> Optional[int]: ...

def count_tokens(
    texts: TextsLike,
    tokenizer: TokenizerLike,
    *,
    add_special_tokens: bool = False,
    num_threads: Optional[int] = None,
) -> npt.NDArray[np.uint64]:
    """Count how often every token id occurs in the encodings of ``texts``.

    Returns a ``uint64`` array of length ``vocab_size`` (including added
    tokens). Memory stays bounded whatever the corpus size: each thread keeps
    one histogram and no token ids are kept after they are counted.

    Raises ``TypeError`` for texts that are not strings, ``FileNotFoundError``
    for a missing tokenizer file, ``ValueError`` for a tokenizer that cannot
    be parsed, whose id space is absurdly sparse (see
    :attr:`Tokenizer.vocab_size`), or a text it cannot encode or that yields an
    id outside the histogram (naming the row), and ``MemoryError`` when the
    per-thread histograms cannot be allocated.
    """

def assign_polarity(
    scores: Any,
    levels: Any,
    *,
    a_pos: Optional[float] = 0.8,
    a_neg: Optional[float] = None,
    b_pos: Optional[float] = 0.9,
    b_neg: Optional[float] = 0.1,
    c_pos: Optional[float] = None,
    c_neg: Optional[float] = 0.2,
) -> Tuple[Any, Any, Any]:
    """DEFT's Q+/Q- assignment over a whole column, straight from Arrow memory.

    ``scores``: an Arrow ``list<double>`` column (Polars Series, pyarrow array
    or PyCapsule exporter), one list of >= 2 finite scores per sample.
    ``levels``: Arrow ``uint8`` codes, 0 = A, 1 = B, 2 = C, one per sample.
    Sliced arrays are read through their own offsets; values outside the
    visible rows are neither read nor checked.

    Per sample, responses are sorted best-first by score (stable: ties keep
    their original order) and scores min-max normalised, r = (s - min) / (max -
    min) (computed on halved scores when max - min would overflow, so r stays
    in [0, 1] even for scores near +/-1.8e308). The best response gets +1 (Q+), the worst -1 (Q-); any other response
    with r > ``<level>_pos`` gets +1, else with r < ``<level>_neg`` gets -1
    (``None``: the level has no such rule), else 0. A sample whose scores are
    all equal has r = 0.5 and polarity 0 everywhere.

    Returns three pyarrow ``large_list`` arrays, all in best-first order:
    ``order`` (uint32 original index of each response), ``normalised``
    (float64) and ``polarity`` (int8). Raises ``ValueError`` naming the row
    for a null, short or non-finite score list or a null score inside a list,
    and ``ValueError`` naming the parameter for a threshold that is not
    ``None`` or a number in [0, 1] (NaN included), as
    ``deft.grade.Thresholds.check`` does.
    """
