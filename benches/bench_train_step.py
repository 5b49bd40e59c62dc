"""Benchmark: one DEFT-DPO training step against one DPO step (same model, same batches).

Model: a randomly initialised Llama with SmolLM2-135M's shape (hidden 576, 9 heads / 3 KV heads,
MLP 1536, vocabulary 49,152, untied head) and --layers layers (30 is the real depth); the real
SmolLM2 tokenizer. Data: real HH rows with their stored RM scores (PRO format), graded with the
paper's a/c; Q_diff from all of them. Both runs use the plain PyTorch loop, the same seed, so the
same batches in the same order; the reference log-probs are cached before timing.

Reported: the median optimizer-step time over steps 2..N of each run and the DEFT overhead.
Target: overhead <= 3%.

Run:  python benches/bench_train_step.py [--layers 8] [--steps 8] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from deft.data import load
    from deft.distribution import build_distribution, resolve_tokenizer, save_distribution
    from deft.grade import grade
    from deft.train import run

    tmp = Path(tempfile.mkdtemp(prefix="deft-bench-train-"))
    tok = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "smollm2"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    model_dir = tmp / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    lines = gzip.open(SHARED / "data" / "pro-hh" / "test_harmless_base.jsonl.gz", "rt", encoding="utf-8").read().splitlines()
    raw = tmp / "test_harmless_base.jsonl"
    raw.write_text("\n".join(lines) + "\n", encoding="utf-8")
    graded = grade(load(raw).frame)
    graded.write_parquet(tmp / "graded.parquet")
    save_distribution(build_distribution(graded, resolve_tokenizer(str(model_dir)), graded_path=tmp / "graded.parquet"), tmp / "q.safetensors")

    def train(name: str, deft: bool) -> list:
        out = tmp / name
        sets = {
            "model": str(model_dir), "data.graded": str(tmp / "graded.parquet"), "data.max_length": args.max_length,
            "data.max_prompt_length": args.max_length // 2, "deft.enabled": deft,
            "deft.distribution": str(tmp / "q.safetensors") if deft else None,
            "train.output_dir": str(out), "train.micro_batch_size": args.micro_batch, "train.gradient_accumulation_steps": 1,
            "train.max_steps": args.steps, "train.deepspeed": None, "train.save_steps": 0, "train.progress": False,
            "train.ref_cache_dir": str(tmp / "ref"),
        }
        run(str(ROOT / "configs" / "deft-dpo.yaml"), [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sets.items()])
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    train("warmup", False)  # fills the reference cache and warms up the allocator
    results = {}
    for name, deft in (("dpo", False), ("deft-dpo", True), ("dpo-2", False), ("deft-dpo-2", True)):
        rows = train(name, deft)
        results[name] = [r["step_seconds"] for r in rows[1:]]
    dpo = statistics.median(results["dpo"] + results["dpo-2"])
    dft = statistics.median(results["deft-dpo"] + results["deft-dpo-2"])
    print(f"model: Llama, SmolLM2-135M shape with {args.layers} layers; micro-batch {args.micro_batch} pairs, max length {args.max_length}; "
          f"{args.steps} steps per run, two runs each, interleaved")
    print(f"DPO      median step {dpo * 1000:8.1f} ms")
    print(f"DEFT-DPO median step {dft * 1000:8.1f} ms")
    print(f"DEFT overhead: {100 * (dft / dpo - 1):+.1f}%  (target <= 3%)")


if __name__ == "__main__":
    main()
