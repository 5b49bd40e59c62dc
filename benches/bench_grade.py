"""Benchmark: grade + distribution of a paper-sized preference set, with given scores.

Data: the real PRO-format HH test rows (../shared/data/pro-hh, 4,666 rows with
stored OpenAssistant RM scores) replicated to --samples rows (default 160,800,
the paper's training-set size); each copy gets its own id and a tiny
deterministic score jitter so that copies do not tie. Written once as a PRO
.jsonl.gz, as a user would hand it to `deft grade --use-input-scores`.

Measured in one run (wall time of each stage, peak RSS of the process):
  load -> grade (levels + native polarity) -> write graded.parquet -> distribution (GPT-2 tokenizer)
and the polarity assignment alone, three ways on the same frame:
  native      deft._native.assign_polarity over the Arrow list columns
  polars      the same rules as Polars expressions (explode, window ranks, group back)
  python      deft.grade.polarity_reference in a Python loop (the tests' reference)

Run:  python benches/bench_grade.py [--samples 160800]
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import tempfile
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PRO = [SHARED / "data" / "pro-hh" / f"test_{s}.jsonl.gz" for s in ("harmless_base", "helpful_base")]
TOK = SHARED / "tokenizers" / "gpt2"


def make_input(path: Path, n: int) -> None:
    rows = []
    for p in PRO:
        with gzip.open(p, "rt", encoding="utf-8") as f:
            rows.extend((p.name, json.loads(line)) for line in f)
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as out:
        for i in range(n):
            name, r = rows[i % len(rows)]
            copy = i // len(rows)
            rec = dict(r)
            rec["id"] = f"{name}:{i % len(rows)}:{copy}"
            rec["subset"] = "harmless_base" if "harmless" in name else "helpful_base"
            rec["reward"] = [x + 1e-6 * ((i * 7919 + j) % 1000) for j, x in enumerate(r["reward"])]
            out.write(json.dumps(rec) + "\n")


def polarity_polars(df: pl.DataFrame) -> pl.DataFrame:
    """DEFT's rules as Polars expressions (paper thresholds)."""
    pos = pl.when(pl.col("level") == "A").then(0.8).when(pl.col("level") == "B").then(0.9).otherwise(None)
    neg = pl.when(pl.col("level") == "B").then(0.1).when(pl.col("level") == "C").then(0.2).otherwise(None)
    e = (
        df.select("scores", "level").with_row_index("r")
        .with_columns(pl.int_ranges(pl.col("scores").list.len()).alias("k"))
        .explode("scores", "k")
        .sort(["r", "scores", "k"], descending=[False, True, False])
        .with_columns(
            pl.col("scores").max().over("r").alias("hi"),
            pl.col("scores").min().over("r").alias("lo"),
            pl.int_range(pl.len()).over("r").alias("pos_in"),
            pl.len().over("r").alias("n"),
        )
        .with_columns(
            pl.when(pl.col("hi") == pl.col("lo")).then(0.5)
            .otherwise((pl.col("scores") - pl.col("lo")) / (pl.col("hi") - pl.col("lo"))).alias("norm")
        )
        .with_columns(
            pl.when(pl.col("hi") == pl.col("lo")).then(0)
            .when((pl.col("pos_in") == 0) | (pos.is_not_null() & (pl.col("norm") > pos))).then(1)
            .when((pl.col("pos_in") == pl.col("n") - 1) | (neg.is_not_null() & (pl.col("norm") < neg))).then(-1)
            .otherwise(0).cast(pl.Int8).alias("polarity")
        )
    )
    return e.group_by("r", maintain_order=True).agg(pl.col("k").alias("human_order"), "norm", "polarity")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=160_800)
    args = ap.parse_args()
    from deft.data import load
    from deft.distribution import build_distribution, resolve_tokenizer, save_distribution
    from deft.grade import Thresholds, _polarity_native, _polarity_python, assign_levels, grade
    from deft.io import atomic_path

    tmp = Path(tempfile.mkdtemp(prefix="deft-bench-grade-"))
    src = tmp / "pro160k.jsonl.gz"
    t = time.perf_counter()
    make_input(src, args.samples)
    print(f"input: {args.samples:,} PRO rows, {src.stat().st_size / 2**20:.1f} MiB gzip (made in {time.perf_counter() - t:.1f} s, not timed)")

    times = {}
    t0 = time.perf_counter()
    frame = load(src).frame
    times["load"] = time.perf_counter() - t0
    t = time.perf_counter()
    graded = grade(frame)
    times["grade"] = time.perf_counter() - t
    t = time.perf_counter()
    with atomic_path(tmp / "graded.parquet") as p:
        graded.write_parquet(p)
    times["write"] = time.perf_counter() - t
    t = time.perf_counter()
    tok = resolve_tokenizer(TOK)
    dist = build_distribution(graded, tok, template="plain", graded_path=tmp / "graded.parquet")
    save_distribution(dist, tmp / "qdiff.safetensors")
    times["distribution"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    levels = dict(graded.group_by("level").len().sort("level").iter_rows())
    print(f"levels: {levels}; Q+ {int(dist.metadata['pos_tokens']):,} tokens, Q- {int(dist.metadata['neg_tokens']):,} tokens")
    print("stages: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
    print(f"grade + distribution end to end: {total:.2f} s (target < 30 s), peak RSS {peak:,.0f} MiB")

    leveled = assign_levels(frame, 3.73, 12.5, True)
    th = Thresholds()
    res = {}
    for name, fn in (("native", lambda: _polarity_native(leveled, th)), ("polars", lambda: polarity_polars(leveled)),
                     ("python", lambda: _polarity_python(leveled, th))):
        best = float("inf")
        for _ in range(3 if name != "python" else 1):
            t = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t)
        res[name] = (best, out)
    nat = res["native"][1]
    for name in ("polars", "python"):
        other = res[name][1]
        assert other["polarity"].to_list() == nat["polarity"].to_list(), f"{name} polarity disagrees with native"
        assert other["human_order"].cast(pl.List(pl.Int64)).to_list() == nat["human_order"].to_list()
    print("polarity assignment on the same frame (all three agree):")
    for name, (sec, _) in res.items():
        print(f"  {name:7s} {sec * 1000:9.1f} ms   {res[name][0] / res['native'][0]:6.1f}x native")


if __name__ == "__main__":
    main()
