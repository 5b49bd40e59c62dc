"""Seeded fuzzing of deft._native against pure-Python references.

Entry points and their references:

* ``count_tokens`` (module function and ``Tokenizer.count_tokens``): a
  histogram of the Python ``tokenizers`` library's ``encode`` ids;
* ``Tokenizer.encode`` (``add_special_tokens``, ``max_length``,
  ``truncation_side``): the Python library's ids, sliced;
* ``Tokenizer.decode``: the Python library's ``decode`` of the same ids;
* ``assign_polarity``: :func:`polarity_reference`, a plain-Python statement
  of the rule in rust/polarity.rs (and ``deft.grade.polarity_reference``),
  with the overflow-free normalisation and the error checks of the native
  entry point (thresholds, nulls, bad level codes, short or non-finite lists).

Texts come as lists, tuples, numpy object arrays, pyarrow ``string`` /
``large_string`` / ``string_view`` arrays, chunked arrays, sliced arrays (with
hidden rows around the slice) and Polars Series, with nulls, empty strings,
unicode, NUL and special-token text. Tokenizers: GPT-2, SmolLM2 and a copy of
SmolLM2 whose tokenizer.json carries padding + truncation (which deft must
ignore: its reference is the plain SmolLM2).

Every case is built from ``random.Random(seed * 1_000_003 + index)`` alone, so
a reported mismatch is replayed with ``--seed S --start I --cases 1``.

Used by tests/test_native_fuzz.py (a short run) and scripts/fuzz.sh (>= 1e6 cases).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import polars as pl
import pyarrow as pa
from tokenizers import Tokenizer as RefTokenizer

from deft import _native

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TOKENIZER_NAMES = ("gpt2", "smollm2")


# --- text generation ----------------------------------------------------------

_ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789")
    + list(" \t\n.,!?'\"-()[]{}<>|/\\:;_*#@$%^&+=~`")
    + ["  ", "\n\n", "\r\n", "\0", "é", "e\u0301", "ß", "Ü", "ñ", "ø", "Ω", "Ж", "ж", "ا", "ע", "中", "文", "日本", "한",
       "🎉", "👩\u200d👩\u200d👧", "\u200b", "\ufeff", "\u00a0", "\U0001f600", "ﬁ", "²", "…", "—"]
)
_WORDS = ["hello", " world", " the", " deft", "Human:", " Assistant:", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
          " I", " am", " sorry", "\n\nHuman: hi", " don't", " 123", " 3.14"]


def gen_text(rng: random.Random) -> Optional[str]:
    u = rng.random()
    if u < 0.08:
        return None
    if u < 0.14:
        return ""
    parts = []
    for _ in range(rng.randint(1, 6)):
        parts.append(rng.choice(_WORDS) if rng.random() < 0.3 else rng.choice(_ALPHABET))
    return "".join(parts)


def gen_texts(rng: random.Random) -> List[Optional[str]]:
    return [gen_text(rng) for _ in range(rng.choice((0, 1, 1, 2, 3, 4, 5, 6)))]


def _junk(rng: random.Random, n: int) -> List[Optional[str]]:
    return [rng.choice([None, "", "hidden junk <|endoftext|>", "zz"]) for _ in range(n)]


def _pa_sliced(rng: random.Random, texts: List[Optional[str]], typ: pa.DataType) -> pa.Array:
    before, after = _junk(rng, rng.randint(0, 3)), _junk(rng, rng.randint(0, 3))
    return pa.array(before + texts + after, type=typ).slice(len(before), len(texts))


def _pa_chunked(rng: random.Random, texts: List[Optional[str]]) -> pa.ChunkedArray:
    typ = rng.choice([pa.string(), pa.large_string(), pa.string_view()])
    cuts = sorted(rng.randint(0, len(texts)) for _ in range(rng.randint(0, 2)))
    bounds = [0] + cuts + [len(texts)]
    chunks = [texts[a:b] for a, b in zip(bounds, bounds[1:])]
    arrs = [_pa_sliced(rng, c, typ) if rng.random() < 0.5 else pa.array(c, type=typ) for c in chunks]
    return pa.chunked_array(arrs, type=typ)


def _polars(rng: random.Random, texts: List[Optional[str]]) -> pl.Series:
    if texts and rng.random() < 0.4:
        k = rng.randint(0, len(texts))
        return pl.concat([pl.Series(texts[:k], dtype=pl.String), pl.Series(texts[k:], dtype=pl.String)], rechunk=False)
    if rng.random() < 0.3:
        pad = _junk(rng, 2)
        return pl.Series(pad + texts, dtype=pl.String).slice(len(pad), len(texts))
    return pl.Series(texts, dtype=pl.String)


def _numpy_object(rng: random.Random, texts: List[Optional[str]]) -> np.ndarray:
    a = np.empty(len(texts), dtype=object)
    a[:] = texts
    return a


TEXT_KINDS: Dict[str, Callable[[random.Random, List[Optional[str]]], Any]] = {
    "list": lambda rng, t: list(t),
    "tuple": lambda rng, t: tuple(t),
    "generator": lambda rng, t: (x for x in t),
    "numpy_object": _numpy_object,
    "pa_string": lambda rng, t: pa.array(t, type=pa.string()),
    "pa_large_string": lambda rng, t: pa.array(t, type=pa.large_string()),
    "pa_string_view": lambda rng, t: pa.array(t, type=pa.string_view()),
    "pa_sliced": lambda rng, t: _pa_sliced(rng, t, rng.choice([pa.string(), pa.large_string(), pa.string_view()])),
    "pa_chunked": _pa_chunked,
    "polars": _polars,
}


# --- tokenizers -----------------------------------------------------------------


class Toks:
    """Native handles and their Python references, loaded once."""

    def __init__(self, shared: Path = SHARED):
        self.native: Dict[str, Any] = {}
        self.ref: Dict[str, RefTokenizer] = {}
        self.vocab: Dict[str, int] = {}
        for name in TOKENIZER_NAMES:
            path = shared / "tokenizers" / name / "tokenizer.json"
            if not path.exists():
                raise FileNotFoundError(f"{path} is absent (the shared tokenizers are needed)")
            self.ref[name] = RefTokenizer.from_file(str(path))
            self.native[name] = _native.Tokenizer(path)
            self.vocab[name] = self.native[name].vocab_size
        padded = RefTokenizer.from_file(str(shared / "tokenizers" / "smollm2" / "tokenizer.json"))
        padded.enable_padding(length=32, pad_id=0, pad_token="<|endoftext|>")
        padded.enable_truncation(5)
        self.native["smollm2_padded"] = _native.Tokenizer.from_str(padded.to_str())
        self.ref["smollm2_padded"] = self.ref["smollm2"]  # deft must ignore the file's padding/truncation
        self.vocab["smollm2_padded"] = self.vocab["smollm2"]
        self.names = list(self.native)


# --- references ------------------------------------------------------------------


def ref_ids(toks: Toks, name: str, texts: Sequence[Optional[str]], add: bool) -> List[List[int]]:
    present = [t for t in texts if t is not None]
    encs = iter(toks.ref[name].encode_batch(present, add_special_tokens=add)) if present else iter(())
    return [[] if t is None else next(encs).ids for t in texts]


def polarity_reference(
    rows: Sequence[Optional[Sequence[Optional[float]]]], levels: Sequence[int], th: Dict[str, Optional[float]]
) -> Tuple[str, Any]:
    """("ok", (order, norm, pol) per row) or ("error", substring the ValueError must hold)."""
    for k in ("a_pos", "a_neg", "b_pos", "b_neg", "c_pos", "c_neg"):
        v = th[k]
        if v is not None and not (0.0 <= v <= 1.0):
            return "error", f"threshold {k}="
    out = []
    for row, (scores, code) in enumerate(zip(rows, levels)):
        if scores is None:
            return "error", f"row {row}: field 'scores': missing"
        if any(s is None for s in scores):
            return "error", f"row {row}: field 'scores["
        if code > 2:
            return "error", f"row {row}: field 'level'"
        if len(scores) < 2:
            return "error", f"row {row}: field 'scores': {len(scores)} score"
        if not all(math.isfinite(s) for s in scores):
            return "error", f"row {row}: field 'scores["
        pos, neg = [(th["a_pos"], th["a_neg"]), (th["b_pos"], th["b_neg"]), (th["c_pos"], th["c_neg"])][code]
        n = len(scores)
        order = sorted(range(n), key=lambda i: -scores[i])  # stable; -0.0 ties 0.0
        hi, lo = scores[order[0]], scores[order[-1]]
        if hi == lo:
            out.append((order, [0.5] * n, [0] * n))
            continue
        scale = 1.0 if math.isfinite(hi - lo) else 0.5  # no overflow for scores near +/-1.8e308
        hs, ls = hi * scale, lo * scale
        norm, pol = [], []
        for k, i in enumerate(order):
            r = (scores[i] * scale - ls) / (hs - ls)
            if k == 0 or (pos is not None and r > pos):
                p = 1
            elif k == n - 1 or (neg is not None and r < neg):
                p = -1
            else:
                p = 0
            norm.append(r)
            pol.append(p)
        out.append((order, norm, pol))
    return "ok", out


# --- cases -------------------------------------------------------------------------


class Mismatch(AssertionError):
    pass


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise Mismatch(what)


def case_count(rng: random.Random, toks: Toks) -> str:
    name = rng.choice(toks.names)
    kind = rng.choice(list(TEXT_KINDS))
    texts = gen_texts(rng)
    add = rng.random() < 0.3
    obj = TEXT_KINDS[kind](rng, texts)
    tok = toks.native[name]
    threads = rng.choice([1, 2]) if rng.random() < 0.02 else None
    if rng.random() < 0.5:
        got = _native.count_tokens(obj, tok, add_special_tokens=add, num_threads=threads)
    else:
        got = tok.count_tokens(obj, add_special_tokens=add, num_threads=threads)
    want = Counter(i for ids in ref_ids(toks, name, texts, add) for i in ids)
    _check(got.dtype == np.uint64 and got.shape == (toks.vocab[name],), f"shape {got.shape} dtype {got.dtype}")
    nz = np.flatnonzero(got)
    have = dict(zip(nz.tolist(), got[nz].tolist()))
    _check(have == dict(want), f"{name} {kind} add={add} texts={texts!r}: got {have} want {dict(want)}")
    return kind


def case_encode(rng: random.Random, toks: Toks) -> str:
    name = rng.choice(toks.names)
    kind = rng.choice(list(TEXT_KINDS))
    texts = gen_texts(rng)
    add = rng.random() < 0.3
    max_length = rng.choice([None, None, 1, 2, 3, 5, 8])
    side = rng.choice(["left", "right"])
    ids, off = toks.native[name].encode(TEXT_KINDS[kind](rng, texts), add_special_tokens=add, max_length=max_length, truncation_side=side)
    _check(ids.dtype == np.uint32 and off.dtype == np.int64 and len(off) == len(texts) + 1 and off[0] == 0, "encode shapes")
    for i, full in enumerate(ref_ids(toks, name, texts, add)):
        want = full
        if max_length is not None and len(full) > max_length:
            want = full[-max_length:] if side == "left" else full[:max_length]
        got = ids[off[i] : off[i + 1]].tolist()
        _check(got == want, f"{name} {kind} add={add} max_length={max_length} side={side} text={texts[i]!r}: got {got} want {want}")
    _check(off[-1] == len(ids), "last offset")
    return kind


_ID_DTYPES = [np.int32, np.int64, np.uint32, np.uint64, np.uint16, ">i4", "<u8"]


def case_decode(rng: random.Random, toks: Toks) -> str:
    name = rng.choice(TOKENIZER_NAMES)
    vocab = toks.vocab[name]
    ids = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
    skip = rng.random() < 0.5
    kind = rng.choice(["list", "tuple", "numpy", "numpy_strided", "numpy_reversed", "numpy_scalars", "bad_negative", "bad_too_large"])
    tok = toks.native[name]
    if kind.startswith("bad"):
        bad = list(ids) + [-rng.randint(1, 2**40) if kind == "bad_negative" else rng.randint(2**32, 2**70)]
        pos = rng.randint(0, len(ids))
        bad.insert(pos, bad.pop())
        obj = np.asarray(bad, dtype=np.int64) if kind == "bad_negative" and rng.random() < 0.5 else bad
        try:
            tok.decode(obj)
        except ValueError as e:
            _check(f"ids[{pos}] = " in str(e), f"decode error message {e}")
            return kind
        raise Mismatch(f"decode({bad!r}) did not raise")
    dt = rng.choice(_ID_DTYPES)
    if kind == "list":
        obj: Any = list(ids)
    elif kind == "tuple":
        obj = tuple(ids)
    elif kind == "numpy":
        obj = np.asarray(ids, dtype=dt)
    elif kind == "numpy_strided":
        big = np.zeros(2 * len(ids), dtype=dt)
        big[::2] = ids
        big[1::2] = vocab + 7  # hidden, out of range: must not be read
        obj = big[::2]
    elif kind == "numpy_reversed":
        obj = np.asarray(ids[::-1], dtype=dt)[::-1]
    else:
        obj = list(np.asarray(ids, dtype=np.int64))
    got = tok.decode(obj, skip_special_tokens=skip)
    want = toks.ref[name].decode(ids, skip_special_tokens=skip)
    _check(got == want, f"{name} {kind} {dt} ids={ids} skip={skip}: got {got!r} want {want!r}")
    return kind


_SCORE_POOL = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 3.0, 1e-300, 5e-324, 1e308, -1e308, 1.7976931348623157e308, -1.7976931348623157e308, 7.25]


def gen_scores(rng: random.Random) -> Optional[List[Optional[float]]]:
    u = rng.random()
    if u < 0.02:
        return None
    n = rng.choice([0, 1, 2, 2, 3, 3, 4, 5, 6]) if u < 0.05 else rng.choice([2, 2, 3, 3, 4, 5, 6])
    out: List[Optional[float]] = []
    for _ in range(n):
        v = rng.random()
        if v < 0.4:
            out.append(rng.choice(_SCORE_POOL))
        elif v < 0.7:
            out.append(float(rng.randint(-3, 3)))
        elif v < 0.995:
            out.append(rng.uniform(-10, 10))
        else:
            out.append(rng.choice([None, math.nan, math.inf, -math.inf]))
    return out


def _th(rng: random.Random) -> Dict[str, Optional[float]]:
    th: Dict[str, Optional[float]] = {"a_pos": 0.8, "a_neg": None, "b_pos": 0.9, "b_neg": 0.1, "c_pos": None, "c_neg": 0.2}
    if rng.random() < 0.5:
        for k in th:
            v = rng.random()
            th[k] = None if v < 0.3 else rng.choice([0.0, 1.0, 0.5, 0.25]) if v < 0.5 else rng.random()
    if rng.random() < 0.03:
        th[rng.choice(list(th))] = rng.choice([-1.0, 1.5, math.nan, math.inf, -1e-9])
    return th


def _scores_array(rng: random.Random, rows: List[Optional[List[Optional[float]]]], kind: str) -> Any:
    if kind == "polars":
        return pl.Series(rows, dtype=pl.List(pl.Float64))
    if kind == "polars_sliced":
        pad = [[None, 1.0], None]
        return pl.Series(pad + rows + pad, dtype=pl.List(pl.Float64)).slice(len(pad), len(rows))
    typ = pa.large_list(pa.float64()) if rng.random() < 0.5 else pa.list_(pa.float64())
    if kind == "pa_list":
        return pa.array(rows, type=typ)
    if kind == "pa_sliced":
        before = [[None, 9.0], None, [1.0]][: rng.randint(0, 3)]
        after = [[math.nan, None], [None]][: rng.randint(0, 2)]
        return pa.array(before + rows + after, type=typ).slice(len(before), len(rows))
    # pa_chunked: chunks, some of them sliced
    k = rng.randint(0, len(rows))
    parts = []
    for part in (rows[:k], rows[k:]):
        if rng.random() < 0.5:
            parts.append(pa.array([[None]] + part + [[None, None]], type=typ).slice(1, len(part)))
        else:
            parts.append(pa.array(part, type=typ))
    return pa.chunked_array(parts, type=typ)


SCORE_KINDS = ["pa_list", "pa_sliced", "pa_chunked", "polars", "polars_sliced"]


def case_polarity(rng: random.Random, toks: Optional[Toks] = None) -> str:
    n = rng.choice([0, 1, 1, 2, 3, 4])
    rows = [gen_scores(rng) for _ in range(n)]
    levels = [rng.randint(0, 2) if rng.random() > 0.01 else rng.randint(3, 255) for _ in range(n)]
    th = _th(rng)
    kind = rng.choice(SCORE_KINDS)
    scores = _scores_array(rng, rows, kind)
    lv = pl.Series(levels, dtype=pl.UInt8) if rng.random() < 0.3 else pa.array(levels, type=pa.uint8())
    status, want = polarity_reference(rows, levels, th)
    try:
        order, norm, pol = _native.assign_polarity(scores, lv, **th)
    except ValueError as e:
        _check(status == "error" and want in str(e), f"{kind} rows={rows} levels={levels} th={th}: raised {e!r}, want {status} {want!r}")
        return kind
    _check(status == "ok", f"{kind} rows={rows} levels={levels} th={th}: no error, want {want!r}")
    got = list(zip(order.to_pylist(), norm.to_pylist(), pol.to_pylist()))
    for i, (g, w) in enumerate(zip(got, want)):
        o, r, p = g
        _check(o == w[0] and p == w[2] and len(r) == len(w[1]), f"{kind} row {i} {rows[i]} level {levels[i]} th={th}: got {g} want {w}")
        _check(all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(r, w[1])), f"norm row {i}: {r} vs {w[1]}")
        _check(all(0.0 <= x <= 1.0 for x in r), f"norm outside [0, 1]: {r}")
    _check(len(got) == len(want), "row count")
    return kind


ENTRY_POINTS: List[Tuple[str, Callable[[random.Random, Toks], str], float]] = [
    ("count_tokens", case_count, 0.33),
    ("encode", case_encode, 0.27),
    ("assign_polarity", case_polarity, 0.28),
    ("decode", case_decode, 0.12),
]


def run(cases: int, seed: int = 0, start: int = 0, toks: Optional[Toks] = None, max_failures: int = 5,
        progress: Optional[Callable[[int], None]] = None) -> Tuple[Counter, List[str]]:
    """Run ``cases`` cases; return (counts per (entry point, input kind), mismatch reports)."""
    toks = toks or Toks()
    names = [e[0] for e in ENTRY_POINTS]
    funcs = {e[0]: e[1] for e in ENTRY_POINTS}
    weights = [e[2] for e in ENTRY_POINTS]
    counts: Counter = Counter()
    failures: List[str] = []
    for index in range(start, start + cases):
        rng = random.Random(seed * 1_000_003 + index)
        entry = rng.choices(names, weights)[0]
        try:
            kind = funcs[entry](rng, toks)
        except Exception as e:  # noqa: BLE001 - every unexpected outcome is a mismatch
            failures.append(f"seed {seed} case {index} ({entry}): {type(e).__name__}: {e}")
            counts[(entry, "MISMATCH")] += 1
            if len(failures) >= max_failures:
                break
            continue
        counts[(entry, kind)] += 1
        if progress and (index - start + 1) % 50_000 == 0:
            progress(index - start + 1)
    return counts, failures


def report(counts: Counter) -> str:
    lines = []
    for entry, _, _ in ENTRY_POINTS:
        kinds = sorted((k, v) for (e, k), v in counts.items() if e == entry)
        total = sum(v for _, v in kinds)
        lines.append(f"{entry}: {total}  (" + ", ".join(f"{k} {v}" for k, v in kinds) + ")")
    lines.append(f"total: {sum(counts.values())}")
    return "\n".join(lines)


def _worker(args: Tuple[int, int, int]) -> Tuple[Counter, List[str]]:
    cases, seed, start = args
    return run(cases, seed=seed, start=start)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first case index (to replay one case)")
    ap.add_argument("--workers", type=int, default=1, help="processes (cases are split between them)")
    a = ap.parse_args(argv)
    t0 = time.time()
    if a.workers > 1:
        import multiprocessing as mp

        per = -(-a.cases // a.workers)
        jobs = [(min(per, a.cases - w * per), a.seed, a.start + w * per) for w in range(a.workers) if w * per < a.cases]
        with mp.get_context("fork").Pool(len(jobs)) as pool:
            results = pool.map(_worker, jobs)
        counts: Counter = Counter()
        failures: List[str] = []
        for c, f in results:
            counts.update(c)
            failures.extend(f)
    else:
        def progress(n: int) -> None:
            print(f"  {n} cases, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

        counts, failures = run(a.cases, seed=a.seed, start=a.start, progress=progress)
    print(f"deft._native fuzz: seed {a.seed}, cases {a.start}..{a.start + a.cases - 1}, {time.time() - t0:.0f} s")
    print(report(counts))
    if failures:
        print(f"MISMATCHES ({len(failures)}, stopped after the first few per worker):")
        for f in failures:
            print("  " + f)
        return 1
    print("mismatches: 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
