"""Benchmark: deft's DPO trainer step against TRL's DPOTrainer step, full fine-tuning and LoRA.

Same model, same token ids, same pairs in the same order, same hyper-parameters, in one run:

- Model: a randomly initialised Llama built here from a config (default hidden 384, 6 layers,
  6 heads / 2 KV heads, MLP 1024, tied embeddings, SmolLM2's 49,152-token vocabulary: 28.3M
  parameters) and saved once to a folder both trainers load in float32; or --model FOLDER (a
  Hugging Face causal-LM folder with its tokenizer, e.g. SmolLM2-135M dequantised to safetensors).
- Data: real PRO HH harmless-base test rows (level A after `deft grade`), best and worst response,
  SmolLM2's chat template. Only rows that neither trainer truncates are used (prompt <=
  --max-prompt-length, each sequence <= --max-length), so both see the same ids: TRL tokenises the
  conversational rows itself, and each TRL run checks that its prompt/chosen/rejected ids equal
  deft's, pair by pair, before training. TRL gets the pairs in deft's (seeded) order and reads them
  sequentially (`train_sampling_strategy="sequential"`), so step k trains the same batch in both.
- Hyper-parameters, both trainers: DPO (sigmoid) loss, beta 0.1, AdamW (betas 0.9/0.999, eps 1e-8,
  weight decay 0; TRL keeps its default optimizer implementation), the same learning rate, a
  linear schedule with 10% warm-up (TRL's first warm-up step has lr 0, deft's lr / (w + 1)),
  gradient clipping at 1.0, --batch pairs per step, no gradient accumulation, float32 on CPU
  (`bf16=False`: TRL's default autocasts to bf16, also on CPU), no gradient checkpointing in either
  (TRL's default turns it on; --gradient-checkpointing turns it on in both), no checkpoints during
  the run. LoRA: the same r, alpha, dropout 0 (TRL disables dropout by default), every linear
  layer but the lm_head.
- Variants, interleaved every round (full: deft, deft-hidden, trl, trl-pre; then LoRA), each a
  fresh subprocess, so its peak RSS is its own:
    deft     `deft.train.run` with configs/dpo.yaml (plain PyTorch loop): reference log-probs
             computed once at setup (the trainer's cached reference), no reference model in memory;
             its default `train.logprobs: logits` (the full B x T x V logits)
    deft-hidden  the same with `train.logprobs: hidden` (log-probs from the hidden states, chunk by
             chunk, response positions only; TRL's `fused_lm_head` is the same idea)
    trl      TRL's DPOTrainer, otherwise with its defaults: a reference forward every step (full fine-tuning:
             a second copy of the model; LoRA: the base model with the adapter disabled)
    trl-pre  the same with `precompute_ref_log_probs=True` (reference log-probs computed at setup,
             no reference model kept), the configuration comparable to deft's cached reference

Reported per variant: pairs/s over the steady-state steps (the wall time from the end of step 1 to
the end of the last step, so setup, reference precomputation and step 1 are excluded; between two
step ends everything either trainer does per step counts: data collation, logging), the peak RSS of
the process up to the end of its last step (ru_maxrss: setup included, final model save excluded)
and that peak above the RSS after the trainer's imports; then deft / TRL ratios. Targets (issue 14):
deft >= 3x TRL's pairs/s and <= 0.5x its peak memory, with and without LoRA.

Run:  python benches/bench_vs_trl.py [--rounds 2] [--steps 6] [--batch 2] [--modes full,lora]
Needs TRL (pip install -e '.[bench]'). Writes benches/results/bench_vs_trl.json (--json to change).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
VARIANTS = ("deft", "deft-hidden", "trl", "trl-pre")


# --------------------------------------------------------------------------- child processes


def _rss_now_kb() -> int:
    for line in open("/proc/self/status", encoding="ascii"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _peak_kb() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child_deft(spec: dict) -> dict:
    import deft.train as dt

    rss_imports = _rss_now_kb()
    ends, peaks, losses = [], [], []
    orig = dt.step

    def timed(*a, **k):
        row = orig(*a, **k)
        ends.append(time.perf_counter())
        peaks.append(_peak_kb())
        losses.append(row.get("loss"))
        return row

    dt.step = timed  # _train() looks step up in the module at call time
    t0 = time.perf_counter()
    dt.run(str(ROOT / "configs" / "dpo.yaml"), [f"{k}={json.dumps(v)}" for k, v in spec["deft_sets"].items()])
    return {"ends": ends, "peaks_kb": peaks, "losses": losses, "rss_imports_kb": rss_imports, "t0": t0}


def child_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rss_imports = _rss_now_kb()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(spec["model"])
    peft_config = None
    if spec["lora"]:
        from peft import LoraConfig

        peft_config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules="all-linear",
                                 bias="none", task_type="CAUSAL_LM")
    h = spec["hp"]
    args = DPOConfig(output_dir=spec["out"], report_to=[], use_cpu=True, bf16=False, fp16=False,
                     gradient_checkpointing=h["gradient_checkpointing"], per_device_train_batch_size=h["batch"],
                     gradient_accumulation_steps=1, max_steps=h["steps"], learning_rate=h["lr"], lr_scheduler_type="linear",
                     warmup_steps=h["warmup_steps"], max_grad_norm=1.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
                     adam_epsilon=1e-8, beta=h["beta"], loss_type=["sigmoid"], max_length=h["max_length"], seed=h["seed"],
                     save_strategy="no", train_sampling_strategy="sequential", dataset_num_proc=None,
                     precompute_ref_log_probs=spec["precompute"], disable_tqdm=True)
    trainer = DPOTrainer(model=spec["model"], args=args, train_dataset=Dataset.from_list(spec["rows"]), processing_class=tok,
                         peft_config=peft_config)
    got = [[list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"])] for r in trainer.train_dataset]
    if got != spec["ids"]:
        bad = next(i for i, (a, b) in enumerate(zip(got, spec["ids"])) if a != b) if len(got) == len(spec["ids"]) else "count"
        raise SystemExit(f"TRL's token ids differ from deft's (pair {bad})")
    dtype = next(trainer.model.parameters()).dtype
    if dtype != torch.float32:
        raise SystemExit(f"TRL loaded the model in {dtype}, expected float32")
    ends, peaks = [], []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            peaks.append(_peak_kb())

    trainer.add_callback(Timer())
    out = trainer.train()
    return {"ends": ends, "peaks_kb": peaks, "losses": [float(out.training_loss)], "rss_imports_kb": rss_imports, "t0": t0,
            "ref_model": trainer.ref_model is not None}


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    res = child_deft(spec) if spec["variant"].startswith("deft") else child_trl(spec)
    Path(spec["result"]).write_text(json.dumps(res))


# --------------------------------------------------------------------------- parent


def build_model(tmp: Path, args) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(SHARED / "tokenizers" / "smollm2"))
    torch.manual_seed(0)
    heads = args.hidden // 64
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 3), max_position_embeddings=2048,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      pad_token_id=tok.pad_token_id)
    folder = tmp / "model"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def prepare_pairs(tmp: Path, model_dir: Path, args):
    """The graded rows both trainers use (untruncated at the benchmark's lengths), deft's config
    overrides shared by all deft runs, and, in deft's training order, TRL's rows and deft's ids."""
    import polars as pl

    from deft.config import load_config
    from deft.data import load
    from deft.grade import grade, read_graded
    from deft.render import resolve_template
    from deft.train import Schedule, frame_examples, policy_tokenizers, prepare_data, select_responses

    n = args.batch * args.steps
    lines = gzip.open(SHARED / "data" / "pro-hh" / "test_harmless_base.jsonl.gz", "rt", encoding="utf-8").read().splitlines()
    raw = tmp / "rows.jsonl"
    raw.write_text("\n".join(lines) + "\n", encoding="utf-8")
    graded = grade(load(raw).frame)
    graded.write_parquet(tmp / "all.parquet")
    frame = read_graded(tmp / "all.parquet").filter(pl.col("level") == "A")

    big = load_config(str(ROOT / "configs" / "dpo.yaml"), [f"model={model_dir}", "data.max_length=100000", "data.max_prompt_length=50000"])
    hf_tok, ptok = policy_tokenizers(big)
    template = resolve_template("auto", ptok, require=str(model_dir))
    whole = frame_examples(big, frame.head(40 * n), template, hf_tok, ptok)
    keep = [e.id for e in whole if e.prompt_len <= args.max_prompt_length and max(len(s) for s in e.input_ids) <= args.max_length]
    if len(keep) < n:
        sys.exit(f"only {len(keep)} rows fit max_length {args.max_length}; need {n}")
    keep = keep[:n]
    sub = frame.filter(pl.col("id").is_in(keep))
    sub.write_parquet(tmp / "graded.parquet")

    sets = {"model": str(model_dir), "data.graded": str(tmp / "graded.parquet"), "data.levels": ["A"], "data.template": "auto",
            "data.max_length": args.max_length, "data.max_prompt_length": args.max_prompt_length, "method.name": "dpo",
            "method.beta": args.beta, "deft.enabled": False, "train.deepspeed": None, "train.micro_batch_size": args.batch,
            "train.gradient_accumulation_steps": 1, "train.max_steps": args.steps, "train.scheduler": "linear",
            "train.warmup_ratio": 0.1, "train.max_grad_norm": 1.0, "train.weight_decay": 0.0, "train.seed": 42,
            "train.precision": "fp32", "train.device": "cpu", "train.save_steps": 0, "train.progress": False,
            "train.gradient_checkpointing": args.gradient_checkpointing}
    cfg = load_config(str(ROOT / "configs" / "dpo.yaml"), [f"{k}={json.dumps(v)}" for k, v in sets.items()])
    prep = prepare_data(cfg)
    sched = Schedule.of(cfg["train"], len(prep.examples), 1)
    order = [int(i) for mb in sched.micro_batches(cfg["train"]["seed"], 0) for i in mb]
    by_id = {r["id"]: r for r in read_graded(tmp / "graded.parquet").iter_rows(named=True)}
    rows, ids = [], []
    for i in order:
        ex = prep.examples[i]
        r = by_id[ex.id]
        best, worst = select_responses(r["responses"], r.get("scores"), "dpo")[0]
        rows.append({"prompt": [dict(t) for t in r["context"]], "chosen": [{"role": "assistant", "content": best}],
                     "rejected": [{"role": "assistant", "content": worst}]})
        p = ex.prompt_len
        ids.append([ex.input_ids[0][:p].tolist(), ex.input_ids[0][p:].tolist(), ex.input_ids[1][p:].tolist()])
    return sets, rows, ids, sched.warmup_steps, prep.template


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--batch", type=int, default=2, help="pairs per optimizer step")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-prompt-length", type=int, default=128)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=5e-6, help="learning rate, full fine-tuning")
    ap.add_argument("--lora-lr", type=float, default=1e-4)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--model", default=None, help="a causal-LM folder with its tokenizer (default: the Llama built here)")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--gradient-checkpointing", action="store_true", help="in both trainers")
    ap.add_argument("--json", default=str(ROOT / "benches" / "results" / "bench_vs_trl.json"))
    args = ap.parse_args()
    if args.child:
        child_main(args.child)
        return
    try:
        import trl
    except ImportError:
        sys.exit("TRL is not installed: pip install -e '.[bench]'")

    tmp = Path(tempfile.mkdtemp(prefix="deft-bench-vs-trl-"))
    model_dir = Path(args.model) if args.model else build_model(tmp, args)
    sets, rows, ids, warmup, template = prepare_pairs(tmp, model_dir, args)
    from transformers import AutoConfig

    mcfg = AutoConfig.from_pretrained(str(model_dir))
    n_params = _count_params(model_dir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(tmp / "hf-datasets"))
    modes = args.modes.split(",")
    variants = args.variants.split(",")
    runs: dict = {m: {v: [] for v in variants} for m in modes}
    for rnd in range(args.rounds):
        for mode in modes:
            for v in variants:
                name = f"{mode}-{v}-{rnd}"
                lora = mode == "lora"
                lr = args.lora_lr if lora else args.lr
                spec = {"variant": v, "result": str(tmp / f"{name}.json"), "out": str(tmp / name), "model": str(model_dir),
                        "lora": lora, "r": args.r, "alpha": args.alpha, "precompute": v == "trl-pre", "rows": rows, "ids": ids,
                        "hp": {"batch": args.batch, "steps": args.steps, "lr": lr, "warmup_steps": warmup, "beta": args.beta,
                               "max_length": args.max_length, "seed": 42, "gradient_checkpointing": args.gradient_checkpointing},
                        "deft_sets": {**sets, "train.lr": lr, "train.output_dir": str(tmp / name), "train.ref_cache_dir": str(tmp / name / "ref"),
                                      "train.logprobs": "hidden" if v == "deft-hidden" else "logits", "peft.enabled": lora, "peft.r": args.r, "peft.alpha": args.alpha, "peft.dropout": 0.0}}
                sp = tmp / f"{name}.spec.json"
                sp.write_text(json.dumps(spec))
                t = time.perf_counter()
                r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(sp)], capture_output=True, text=True, env=env)
                if r.returncode != 0:
                    sys.exit(f"{name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
                res = json.loads(Path(spec["result"]).read_text())
                ends = res["ends"]
                if len(ends) != args.steps:
                    sys.exit(f"{name}: {len(ends)} step ends recorded, expected {args.steps}")
                steady = ends[-1] - ends[0]
                res.update({"pairs_per_s": (args.steps - 1) * args.batch / steady, "steady_seconds": steady,
                            "setup_and_step1_seconds": ends[0] - res["t0"], "process_seconds": time.perf_counter() - t,
                            "peak_kb": res["peaks_kb"][-1]})
                runs[mode][v].append(res)
                print(f"round {rnd} {mode:4s} {v:11s} {res['pairs_per_s']:7.2f} pairs/s  peak RSS {res['peak_kb'] / 1024:7.0f} MiB "
                      f"(+{(res['peak_kb'] - res['rss_imports_kb']) / 1024:5.0f} over imports)  setup+step 1 {res['setup_and_step1_seconds']:5.1f} s",
                      flush=True)

    summary: dict = {}
    for mode in modes:
        summary[mode] = {}
        for v in variants:
            rs = runs[mode][v]
            summary[mode][v] = {"pairs_per_s": statistics.median(r["pairs_per_s"] for r in rs),
                                "peak_mib": statistics.median(r["peak_kb"] for r in rs) / 1024,
                                "peak_over_imports_mib": statistics.median(r["peak_kb"] - r["rss_imports_kb"] for r in rs) / 1024}
    print()
    print(f"model: {'Llama built here' if not args.model else args.model} ({n_params / 1e6:.1f}M parameters, {mcfg.num_hidden_layers} layers x "
          f"{mcfg.hidden_size}), float32, template {template}; {args.batch} pairs/step, max length {args.max_length}; "
          f"{args.rounds} interleaved rounds x {args.steps} steps (steps 2..{args.steps} timed); TRL {trl.__version__}; "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'mode':5s} {'variant':11s} {'pairs/s':>8s} {'peak RSS MiB':>13s} {'over imports':>13s}")
    for mode in modes:
        for v in variants:
            s = summary[mode][v]
            print(f"{mode:5s} {v:11s} {s['pairs_per_s']:8.2f} {s['peak_mib']:13.0f} {s['peak_over_imports_mib']:13.0f}")
    ratios: dict = {}
    ours = [v for v in variants if v.startswith("deft")]
    theirs = [v for v in variants if v.startswith("trl")]
    if ours and theirs:
        print("\ndeft / TRL (targets: pairs/s >= 3x, peak memory <= 0.5x)")
        for mode in modes:
            for dv in ours:
                d = summary[mode][dv]
                for v in theirs:
                    o = summary[mode][v]
                    rr = {"pairs_per_s": d["pairs_per_s"] / o["pairs_per_s"], "peak": d["peak_mib"] / o["peak_mib"],
                          "peak_over_imports": d["peak_over_imports_mib"] / o["peak_over_imports_mib"]}
                    ratios[f"{mode}/{dv}/{v}"] = rr
                    print(f"{mode:5s} {dv:11s} vs {v:8s} pairs/s {rr['pairs_per_s']:5.2f}x {'met' if rr['pairs_per_s'] >= 3 else 'MISSED':6s}  "
                          f"peak RSS {rr['peak']:5.2f}x {'met' if rr['peak'] <= 0.5 else 'MISSED':6s}  (above imports {rr['peak_over_imports']:5.2f}x)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "args": vars(args), "trl": trl.__version__,
                               "parameters": n_params, "template": template, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                                                          "loadavg_end": os.getloadavg()},
                               "date": time.strftime("%Y-%m-%d %H:%M"), "summary": summary, "ratios": ratios,
                               "runs": {m: {v: [{k: r[k] for k in ("pairs_per_s", "peak_kb", "rss_imports_kb", "steady_seconds",
                                                                    "setup_and_step1_seconds", "losses")} for r in rs]
                                            for v, rs in vs.items()} for m, vs in runs.items()}}, indent=1) + "\n")
    print(f"\nwrote {out}")


def _count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                n += _prod(h.get_slice(k).get_shape())
    return n


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p


if __name__ == "__main__":
    main()
