"""Corpus statistics of a canonical preference frame (`deft stats`).

Token counts use the native core: response token frequencies come from
:func:`deft._native.count_tokens` over the exploded ``responses`` column (read in
place from Arrow memory), lengths from :meth:`deft._native.Tokenizer.encode`.
Contexts are measured as plain HH text (``render_hh``), responses as stored.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Union

import numpy as np
import polars as pl

from deft._native import Tokenizer
from deft.data import render_hh

QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


def _quantiles(lengths: np.ndarray) -> Dict[str, float]:
    if lengths.size == 0:
        return {}
    out = {f"p{int(q * 100)}": float(np.quantile(lengths, q)) for q in QUANTILES}
    out["mean"] = float(lengths.mean())
    return out


def _lengths(tok: Tokenizer, texts: Any, num_threads: Optional[int]) -> np.ndarray:
    _, offsets = tok.encode(texts, num_threads=num_threads)
    return np.diff(offsets)


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

    hist = tok.count_tokens(responses, num_threads=num_threads)
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
