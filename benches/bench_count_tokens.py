"""Benchmark: token counting over a corpus, deft._native against named baselines.

Corpus: the HH-RLHF harmless-base test responses (../shared/data/hh-rlhf), chosen
and rejected, replicated to --docs documents; every copy is made unique by
prefixing its index, so no cache of repeated texts can help. Tokenizer: GPT-2.

Variants, each measured in a fresh subprocess (so peak RSS is its own):
  a  collections.Counter over tokenizers.Tokenizer.encode, one text at a time
  b  tokenizers.Tokenizer.encode_batch_fast + numpy.bincount (best pure-Python pipeline)
  c  deft._native.count_tokens (list input; and Arrow input, zero-copy)
  d  deft._native.Tokenizer.encode: the same native encoding, ids kept, no counting (the limit)
  e  tokenizers.Tokenizer.encode_batch_fast alone, results dropped (reference point)

Run:  python benches/bench_count_tokens.py            (150k and 300k docs, 1 and 2 threads)
      python benches/bench_count_tokens.py --quick    (20k docs, a smoke run)
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
HH = SHARED / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
TOK = SHARED / "tokenizers" / "gpt2" / "tokenizer.json"


def corpus(n_docs: int) -> list[str]:
    base = []
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            for k in ("chosen", "rejected"):
                base.append(row[k].rsplit("\n\nAssistant:", 1)[1])
    return [f"{i} {base[i % len(base)]}" for i in range(n_docs)]


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_variant(variant: str, n_docs: int, threads: int) -> dict:
    """Runs in the child process."""
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    import numpy as np

    texts = corpus(n_docs)
    from tokenizers import Tokenizer as PyTok

    from deft._native import Tokenizer, count_tokens

    ref = PyTok.from_file(str(TOK))
    tok = Tokenizer(TOK)  # loading is not timed, for any variant
    data = texts
    if variant == "c-arrow":
        import pyarrow as pa

        data = pa.array(texts)  # conversion to Arrow is not part of counting
    before = rss_mib()
    t0 = time.perf_counter()
    if variant == "a":
        from collections import Counter

        c: Counter = Counter()
        for t in texts:
            c.update(ref.encode(t, add_special_tokens=False).ids)
        n_tokens = sum(c.values())
    elif variant == "b":
        hist = np.zeros(ref.get_vocab_size(True), dtype=np.int64)
        for i in range(0, len(texts), 10_000):
            encs = ref.encode_batch_fast(texts[i : i + 10_000], add_special_tokens=False)
            ids = np.fromiter((x for e in encs for x in e.ids), dtype=np.int64)
            hist += np.bincount(ids, minlength=hist.size)
        n_tokens = int(hist.sum())
    elif variant in ("c", "c-arrow"):
        hist = count_tokens(data, tok, num_threads=threads)
        n_tokens = int(hist.sum())
    elif variant == "d":
        ids, _ = tok.encode(texts, num_threads=threads)
        n_tokens = int(ids.size)
    elif variant == "e":
        n_tokens = 0
        for i in range(0, len(texts), 10_000):
            encs = ref.encode_batch_fast(texts[i : i + 10_000], add_special_tokens=False)
            n_tokens += sum(len(e) for e in encs)
    else:
        raise SystemExit(f"unknown variant {variant}")
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "docs": n_docs, "threads": threads, "tokens": n_tokens, "seconds": dt,
            "tokens_per_s": n_tokens / dt, "rss_before_mib": before, "peak_rss_mib": peak}


def measure(variant: str, n_docs: int, threads: int, repeats: int) -> dict:
    best = None
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--child", variant, str(n_docs), str(threads)],
                             check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if best is None or r["seconds"] < best["seconds"]:
            best = r
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--docs", type=int, default=150_000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="best of N runs per variant")
    ap.add_argument("--json", type=Path, help="also write all results here")
    args = ap.parse_args()
    if args.child:
        v, n, t = args.child
        print(json.dumps(run_variant(v, int(n), int(t))))
        return
    if not HH.exists():
        raise SystemExit(f"needs {HH}")
    n = 20_000 if args.quick else args.docs
    threads = os.cpu_count() or 2
    rows = []
    plan = [("a", n, threads, 1), ("b", n, threads, args.repeats), ("e", n, threads, args.repeats),
            ("d", n, threads, args.repeats), ("c", n, threads, args.repeats), ("c-arrow", n, threads, args.repeats),
            ("c", n, 1, args.repeats), ("d", n, 1, args.repeats), ("c", 2 * n, threads, 1), ("c-arrow", 2 * n, threads, 1)]
    for v, docs, th, rep in plan:
        r = measure(v, docs, th, rep)
        rows.append(r)
        print(f"{v:8s} docs={docs:>7,} threads={th}  {r['tokens']:>11,} tokens  {r['seconds']:7.2f} s  "
              f"{r['tokens_per_s'] / 1e6:6.2f} M tok/s  peak RSS {r['peak_rss_mib']:7.0f} MiB "
              f"(+{r['peak_rss_mib'] - r['rss_before_mib']:.0f} over corpus)", flush=True)

    def get(v, docs=n, th=threads):
        return next(r for r in rows if r["variant"] == v and r["docs"] == docs and r["threads"] == th)

    b, c, ca, d = get("b"), get("c"), get("c-arrow"), get("d")
    assert b["tokens"] == c["tokens"] == d["tokens"] == ca["tokens"], "variants disagree on the token count"
    print()
    print(f"c/b  (native count vs best pure-Python pipeline): {c['tokens_per_s'] / b['tokens_per_s']:.2f}x   target >= 1.2x")
    print(f"c/d  (native count vs native encode, the limit):  {c['tokens_per_s'] / d['tokens_per_s']:.3f}   "
          f"counting overhead {100 * (1 - c['tokens_per_s'] / d['tokens_per_s']):+.1f}%  target <= 5%")
    print(f"c-arrow/b: {ca['tokens_per_s'] / b['tokens_per_s']:.2f}x;  c/a: {c['tokens_per_s'] / get('a')['tokens_per_s']:.2f}x;"
          f"  c/e (vs encode_batch_fast alone): {c['tokens_per_s'] / get('e')['tokens_per_s']:.2f}x")
    c1 = get("c", n, 1)
    print(f"c threads 1 -> {threads}: {c1['tokens_per_s'] / 1e6:.2f} -> {c['tokens_per_s'] / 1e6:.2f} M tok/s "
          f"({c['tokens_per_s'] / c1['tokens_per_s']:.2f}x)")
    c2, ca2 = get("c", 2 * n), get("c-arrow", 2 * n)
    print(f"peak RSS above corpus, c: {c['peak_rss_mib'] - c['rss_before_mib']:.0f} MiB at {n:,} docs, "
          f"{c2['peak_rss_mib'] - c2['rss_before_mib']:.0f} MiB at {2 * n:,} docs;  c-arrow: "
          f"{ca['peak_rss_mib'] - ca['rss_before_mib']:.0f} / {ca2['peak_rss_mib'] - ca2['rss_before_mib']:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
