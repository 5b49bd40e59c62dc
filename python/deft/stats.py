"""Corpus statistics of a canonical preference frame (`deft stats`).

Token counts use the native core: response token frequencies come from
:func:`deft._native.count_tokens` over the exploded ``responses`` column (read in
place from Arrow memory), lengths from :meth:`deft._native.Tokenizer.encode`.
Contexts are measured as plain HH text (``render_hh``), responses as stored.

Length quantiles need every text's full token count, so nothing is truncated
here; instead a text over :data:`PIECE_CHARS` characters is tokenised in
pieces cut at word boundaries (``deft._util.split_at_boundaries``), a bounded
batch of pieces at a time, and the pieces' counts are added up. For byte-level
BPE and WordPiece tokenizers (split at spaces before tokenising) the sums equal
the whole texts' counts, and so does the token histogram; a SentencePiece-style
tokenizer that prepends a word marker to every input may count one token more
per piece (at most one per ``PIECE_CHARS`` characters). Memory then stays
bounded by the batch, not by the longest text.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Union

import numpy as np
import polars as pl

from deft._native import Tokenizer
from deft._util import split_at_boundaries
from deft.render import render_hh

QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


def _quantiles(lengths: np.ndarray) -> Dict[str, float]:
    if lengths.size == 0:
        return {}
    out = {f"p{int(q * 100)}": float(np.quantile(lengths, q)) for q in QUANTILES}
    out["mean"] = float(lengths.mean())
    return out


#: Texts longer than this (characters) are counted in pieces (see the module docs).
PIECE_CHARS = 1 << 16
#: Characters of pieces tokenised per call.
BATCH_CHARS = 1 << 23


def _text_lengths(texts: Any) -> np.ndarray:
    if isinstance(texts, pl.Series):
        return texts.str.len_chars().fill_null(0).to_numpy()
    return np.fromiter((len(t) if t is not None else 0 for t in texts), dtype=np.int64)


def _pieces(texts: Any):
    """(pieces, owner): the texts with every long one split at word boundaries."""
    pieces: List[str] = []
    owner: List[int] = []
    for i, t in enumerate(texts.to_list() if isinstance(texts, pl.Series) else texts):
        for p in split_at_boundaries(t, PIECE_CHARS) if t else [t]:
            pieces.append(p)
            owner.append(i)
    return pieces, np.asarray(owner, dtype=np.int64)


def _batches(pieces: List[Any]):
    start, size = 0, 0
    for j, p in enumerate(pieces):
        size += len(p) if p else 0
        if size >= BATCH_CHARS:
            yield start, j + 1
            start, size = j + 1, 0
    if start < len(pieces):
        yield start, len(pieces)


def _lengths(tok: Tokenizer, texts: Any, num_threads: Optional[int]) -> np.ndarray:
    n = len(texts)
    if n == 0 or int(_text_lengths(texts).max()) <= 2 * PIECE_CHARS:
        _, offsets = tok.encode(texts, num_threads=num_threads)
        return np.diff(offsets)
    pieces, owner = _pieces(texts)
    counts = np.zeros(len(pieces), dtype=np.int64)
    for a, b in _batches(pieces):
        _, offsets = tok.encode(pieces[a:b], num_threads=num_threads)
        counts[a:b] = np.diff(offsets)
    return np.bincount(owner, weights=counts, minlength=n).astype(np.int64)


def _histogram(tok: Tokenizer, texts: Any, num_threads: Optional[int]) -> np.ndarray:
    if len(texts) == 0 or int(_text_lengths(texts).max()) <= 2 * PIECE_CHARS:
        return tok.count_tokens(texts, num_threads=num_threads)
    pieces, _ = _pieces(texts)
    hist = None
    for a, b in _batches(pieces):
        h = tok.count_tokens(pieces[a:b], num_threads=num_threads)
        hist = h if hist is None else hist + h
    return hist


def load_tokenizer(tokenizer: Union[str, "os.PathLike[str]", Tokenizer]) -> Tokenizer:
    """A native tokenizer from a handle, a tokenizer.json path or a folder holding one."""
    return tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)


def compute_stats(
    frame: pl.DataFrame,
    tokenizer: Union[str, "os.PathLike[str]", Tokenizer],
    *,
    top_k: int = 20,
    num_threads: Optional[int] = None,
) -> Dict[str, Any]:
    """Statistics of a canonical frame, as a JSON-serialisable dict.

    Keys: ``samples``, ``subsets`` (samples per subset), ``responses_per_sample``
    (how many samples have n responses), ``samples_with_scores``,
    ``context_tokens`` / ``response_tokens`` (quantiles p0..p100 and mean),
    ``response_tokens_total`` and ``top_response_tokens`` (the ``top_k`` most
    frequent ids with their token string, decoded text, count and share).
    """
    tok = load_tokenizer(tokenizer)
    subsets = frame.group_by("subset").len().sort("subset")
    n_resp = frame.select(pl.col("responses").list.len().alias("n")).group_by("n").len().sort("n")
    responses = frame.get_column("responses").explode()
    contexts = [render_hh(c) for c in frame.get_column("context").to_list()]

    hist = _histogram(tok, responses, num_threads)
    total = int(hist.sum())
    order = np.argsort(-hist.astype(np.int64), kind="stable")[: max(top_k, 0)]
    top: List[Dict[str, Any]] = [
        {
            "id": int(i),
            "token": tok.id_to_token(int(i)),
            "text": tok.decode([int(i)]),
            "count": int(hist[i]),
            "share": float(hist[i] / total) if total else 0.0,
        }
        for i in order
        if hist[i] > 0
    ]
    return {
        "samples": frame.height,
        "subsets": {r["subset"]: r["len"] for r in subsets.iter_rows(named=True)},
        "responses_per_sample": {str(r["n"]): r["len"] for r in n_resp.iter_rows(named=True)},
        "samples_with_scores": int(frame.get_column("scores").is_not_null().sum()),
        "context_tokens": _quantiles(_lengths(tok, contexts, num_threads)),
        "response_tokens": _quantiles(_lengths(tok, responses, num_threads)),
        "response_tokens_total": total,
        "top_response_tokens": top,
        "tokenizer": {"source": tok.source, "vocab_size": tok.vocab_size},
    }
