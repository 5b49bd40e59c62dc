"""Benchmark: reward-model scoring throughput, length bucketing vs naive fixed-order batching.

Data: the first --rows rows of the real HH-RLHF harmless-base test file (../shared/data/hh-rlhf),
both responses of each row, rendered with the ``plain`` template (HH transcript) and left-truncated
to --max-length GPT-2 tokens (real GPT-2 tokenizer from ../shared/tokenizers/gpt2).

Model: a randomly initialised GPT-2-layout sequence classifier (num_labels=1, seed 0), saved with
save_pretrained (safetensors) to a temporary folder and loaded back through
``deft.score.HFRewardModel.load`` (float32 on CPU, bfloat16 on CUDA):
  --model small  4 layers, width 256, 4 heads, 16.3M parameters (12.9M of them the token embedding)
  --model gpt2   GPT-2-small shape: 12 layers, width 768, 12 heads, 124M parameters
(default: small on CPU, gpt2 on CUDA). Scores are meaningless; the arithmetic is real.

Variants, all with the same model, the same encoded pairs and the same --batch-size:
  naive     batches of consecutive pairs in data order, each padded to its longest pair
  bucketed  pairs sorted by length (longest first), then cut into batches (deft.score.plan_batches)
  frame     deft.score.score_frame end to end (encoding, bucketing, part files, merge) with the
            same batch size, into a fresh work dir
  frame-auto  score_frame with its default token budget per batch (no --batch-size)
Timed: scoring only for naive/bucketed (encoding done once, untimed); whole call for frame*. Best of
--repeats, naive and bucketed interleaved. tokens/s counts real (unpadded) tokens.

Run:  python benches/bench_score.py                         (CPU, 1 thread, small model)
      python benches/bench_score.py --device cuda --rows 2312
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
HH = SHARED / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
TOK = SHARED / "tokenizers" / "gpt2"

SHAPES = {
    "small": dict(n_layer=4, n_embd=256, n_head=4),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
}


def build_model(folder: Path, shape: str, tokenizer_dir: Path) -> int:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_positions=1024, num_labels=1, pad_token_id=50256, **SHAPES[shape])
    model = GPT2ForSequenceClassification(cfg)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def time_batches(rm, items, batches) -> tuple[float, np.ndarray]:
    scores = np.empty(len(items))
    t0 = time.perf_counter()
    for b in batches:
        scores[b] = rm.score_batch([items[i] for i in b])
    return time.perf_counter() - t0, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    ap.add_argument("--model", choices=sorted(SHAPES), help="model shape (default: small on CPU, gpt2 on CUDA)")
    ap.add_argument("--rows", type=int, default=256, help="HH rows (2 pairs each); the file has 2,312")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data", type=Path, default=HH)
    ap.add_argument("--tokenizer", type=Path, default=TOK)
    ap.add_argument("--no-frame", action="store_true", help="skip the score_frame variants")
    args = ap.parse_args()
    for p in (args.data, args.tokenizer):
        if not p.exists():
            raise SystemExit(f"needs {p}")

    import torch

    torch.set_num_threads(args.threads)
    from deft.data import load
    from deft.score import HFRewardModel, plan_batches, score_frame

    cuda = args.device.startswith("cuda")
    shape = args.model or ("gpt2" if cuda else "small")
    frame = load(args.data).frame.head(args.rows)
    tmp = Path(tempfile.mkdtemp(prefix="bench-score-"))
    n_params = build_model(tmp / "rm", shape, args.tokenizer)
    rm = HFRewardModel.load(str(tmp / "rm"), template="plain", max_length=args.max_length, device=args.device)
    dev_name = torch.cuda.get_device_name(rm.device) if cuda else f"CPU, {args.threads} thread(s)"
    print(f"model {shape}: {n_params / 1e6:.1f}M params, {next(rm.model.parameters()).dtype}, device {dev_name}")

    pairs = [(c, r) for c, rs in frame.select("context", "responses").iter_rows() for r in rs]
    t0 = time.perf_counter()
    items = rm.encode([c for c, _ in pairs], [r for _, r in pairs])
    t_enc = time.perf_counter() - t0
    lengths = np.array([len(x) for x in items])
    tokens = int(lengths.sum())
    print(f"data: {frame.height} HH rows, {len(items)} pairs, {tokens:,} tokens "
          f"(mean {lengths.mean():.0f}, p50 {np.median(lengths):.0f}, max {lengths.max()}), "
          f"max_length {args.max_length}; encode {t_enc:.2f} s")

    variants = {"naive": plan_batches(lengths, batch_size=args.batch_size, bucket=False),
                "bucketed": plan_batches(lengths, batch_size=args.batch_size, bucket=True)}
    padded = {k: sum(len(b) * int(lengths[b].max()) for b in v) for k, v in variants.items()}
    rm.score_batch([items[i] for i in variants["bucketed"][-1]])  # warm-up
    rm.score_batch([items[i] for i in variants["bucketed"][0]])
    best = {k: float("inf") for k in variants}
    scores = {}
    for _ in range(args.repeats):
        for k, batches in variants.items():
            dt, s = time_batches(rm, items, batches)
            best[k] = min(best[k], dt)
            scores[k] = s

    rows = []
    for k in variants:
        rows.append((k, args.batch_size, best[k], padded[k]))
    if not args.no_frame:
        for name, kw in (("frame", dict(batch_size=args.batch_size)), ("frame-auto", {})):
            dt_best = float("inf")
            for r in range(args.repeats):
                work = tmp / f"work-{name}-{r}"
                t0 = time.perf_counter()
                out = score_frame(frame, rm, work_dir=work, progress=False, **kw)
                dt_best = min(dt_best, time.perf_counter() - t0)
            got = np.concatenate([np.asarray(x) for x in out["scores"].to_list()])
            diff = float(np.abs(got - scores["naive"]).max())
            import json

            done = json.loads((work / "shard-00000-of-00001" / "done.json").read_text())
            bs = f"{done['scored_now'] / done['batches']:.1f}" if name == "frame-auto" else str(args.batch_size)
            rows.append((name, bs, dt_best, done["padded_tokens"]))
            print(f"{name}: max |score - naive| = {diff:.2e}; "
                  f"batches {done['batches']}, max_batch_tokens {done['max_batch_tokens']}")

    tol = 5e-2 if cuda else 1e-4
    diff = float(np.abs(scores["bucketed"] - scores["naive"]).max())
    print(f"bucketed vs naive: max |score difference| = {diff:.2e} (tolerance {tol:g})")
    if diff > tol:
        raise SystemExit("scores differ between batchings")
    print()
    print(f"{'variant':<11} {'batch':>6} {'seconds':>8} {'pairs/s':>9} {'tokens/s':>10} {'padded tok':>11} {'pad waste':>9}")
    for name, bs, dt, pad in rows:
        print(f"{name:<11} {bs:>6} {dt:>8.2f} {len(items) / dt:>9.1f} {tokens / dt:>10,.0f} {pad:>11,} {1 - tokens / pad:>8.1%}")
    ratio = best["naive"] / best["bucketed"]
    print(f"\nbucketed / naive throughput: {ratio:.2f}x   target >= 1.5x   "
          f"(padded tokens {padded['naive'] / padded['bucketed']:.2f}x fewer)")


if __name__ == "__main__":
    main()
