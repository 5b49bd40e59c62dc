#!/usr/bin/env python3
"""Train the head of deft's builtin reward model (see ``deft/builtin_rm.py``).

Reproduce the shipped assets from the repository root, with the shared data in
``../shared`` (12.5 minutes measured on 2 busy CPU cores: 10.5 of them the
one-off MiniLM embedding pass, cached under ``/tmp/deft-builtin-rm-cache``
(``$DEFT_BUILTIN_RM_CACHE``); a rerun from the cache takes ~2.5 minutes)::

    PYTHONPATH=python python scripts/train_builtin_rm.py

It loads the PRO-format HH test files (``test_harmless_base.jsonl.gz``,
``test_helpful_base.jsonl.gz``: context, 2 responses, the OpenAssistant
Pythia RM's ``reward`` logits), embeds every (context, response) pair with
:class:`deft.builtin_rm.MiniLMFeaturizer` -- the same code the runtime uses --
splits rows by :func:`deft.builtin_rm.split_of` (a salted hash of the row
``id``; ~20% held out), trains the head on the training rows, evaluates on
the held-out rows and writes ``python/deft/assets/builtin_rm/head.safetensors``
and ``config.json`` (recipe, standardisation constants, data hashes, metrics).

Loss (on scores standardised with the training mean/std):
``MSE(f, z) + pair_weight * MSE(f_0 - f_1, z_0 - z_1)`` -- pointwise
distillation plus distillation of the within-prompt score difference, which is
what ranking two responses needs. Seeds are fixed and torch runs with
deterministic algorithms on the CPU, so a rerun on the same machine gives the
same head.

``--validate`` reproduces how the hyper-parameters were chosen: it trains on
the rows of split buckets 35..99 and reports on buckets 20..34 (an inner
validation split of the training rows), never touching the held-out rows,
and writes nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import torch  # noqa: E402

from deft import data as deft_data  # noqa: E402
from deft import builtin_rm as brm  # noqa: E402
from deft.io import atomic_path, sha256_file, write_text_atomic  # noqa: E402

DATA_FILES = ("test_harmless_base.jsonl.gz", "test_helpful_base.jsonl.gz")
DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data" / "pro-hh"
CACHE_DIR = Path(os.environ.get("DEFT_BUILTIN_RM_CACHE", "/tmp/deft-builtin-rm-cache"))
#: Bump when MiniLMFeaturizer.features changes in a way the recipe does not capture.
FEATURIZER_VERSION = 1


# ------------------------------------------------------------------ metrics


def rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), 1-based."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = rankdata(np.asarray(a, float)), rankdata(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def metrics(pred: np.ndarray, scores: np.ndarray) -> Dict[str, Any]:
    """``pred``, ``scores``: (rows, 2), chosen (human-preferred) response first."""
    return {
        "rows": int(len(scores)),
        "responses": int(scores.size),
        "spearman": round(spearman(pred.reshape(-1), scores.reshape(-1)), 4),
        "pearson": round(float(np.corrcoef(pred.reshape(-1), scores.reshape(-1))[0, 1]), 4),
        "pairwise_accuracy": round(float(np.mean(pred[:, 0] > pred[:, 1])), 4),
        "oasst_rm_pairwise_accuracy": round(float(np.mean(scores[:, 0] > scores[:, 1])), 4),
        "agreement_with_oasst_rm_order": round(
            float(np.mean((pred[:, 0] > pred[:, 1]) == (scores[:, 0] > scores[:, 1]))), 4
        ),
    }


# ------------------------------------------------------------------ data + features


def load_rows(data_dir: Path) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    rows: List[Dict[str, Any]] = []
    files = []
    for name in DATA_FILES:
        path = data_dir / name
        if not path.is_file():
            sys.exit(f"error: {path} not found (pass --data-dir)")
        frame = deft_data.load(path).frame
        part = frame.select("id", "subset", "context", "responses", "scores").to_dicts()
        for r in part:
            if len(r["responses"]) != 2 or r["scores"] is None:
                sys.exit(f"error: {path}: row {r['id']} needs exactly 2 scored responses")
        rows += part
        files.append({"file": name, "sha256": sha256_file(path), "rows": len(part)})
    return rows, files


def embed(rows: List[Dict[str, Any]], files: List[Dict[str, Any]], recipe: Dict[str, Any],
          encoder_info: Dict[str, Any], batch_size: int) -> np.ndarray:
    """Features of every response, (rows, 2, n_features) float32, cached on disk."""
    key_src = json.dumps({"files": files, "recipe": recipe, "encoder": encoder_info,
                          "featurizer_version": FEATURIZER_VERSION}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    cache = CACHE_DIR / f"features-{key}.npy"
    if cache.is_file():
        feats = np.load(cache)
        print(f"features: cached {cache} {feats.shape}", flush=True)
        return feats
    featurizer = brm.MiniLMFeaturizer.load(device="cpu", max_length=recipe["max_length"],
                                           context_reserve=recipe["context_reserve"], layers=recipe["layers"])
    contexts = [r["context"] for r in rows for _ in r["responses"]]
    responses = [x for r in rows for x in r["responses"]]
    items = featurizer.encode(contexts, responses)
    order = sorted(range(len(items)), key=lambda i: (len(items[i]), items[i].input_ids))
    feats = np.zeros((len(items), featurizer.n_features), dtype=np.float32)
    t0 = time.time()
    with torch.inference_mode():
        for b, start in enumerate(range(0, len(order), batch_size)):
            idx = order[start:start + batch_size]
            feats[idx] = featurizer.features([items[i] for i in idx]).cpu().numpy()
            if b % 25 == 0:
                print(f"  embedded {start + len(idx)}/{len(items)} ({time.time() - t0:.0f}s)", flush=True)
    print(f"features: {len(items)} pairs in {time.time() - t0:.0f}s, mean {np.mean([len(i) for i in items]):.0f} tokens",
          flush=True)
    feats = feats.reshape(len(rows), 2, -1)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, feats)
    os.replace(tmp, cache)
    return feats


# ------------------------------------------------------------------ training


def train_head(x: np.ndarray, s: np.ndarray, args: argparse.Namespace) -> Tuple[Any, Dict[str, Any]]:
    """x: (rows, 2, n) features; s: (rows, 2) RM scores. Returns the head and
    its standardisation constants."""
    torch.manual_seed(args.seed)
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    f_mean = flat.mean(0).astype(np.float32)
    f_std = (flat.std(0) + 1e-6).astype(np.float32)
    s_mean, s_std = float(s.mean()), float(s.std())
    xt = torch.tensor((x - f_mean) / f_std, dtype=torch.float32)
    yt = torch.tensor((s - s_mean) / s_std, dtype=torch.float32)
    net = brm.build_head(x.shape[-1], args.hidden, args.dropout)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    net.train()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), args.batch_pairs):
            idx = perm[start:start + args.batch_pairs]
            f = net(xt[idx]).squeeze(-1)
            y = yt[idx]
            loss = ((f - y) ** 2).mean() + args.pair_weight * (((f[:, 0] - f[:, 1]) - (y[:, 0] - y[:, 1])) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        if (epoch + 1) % 10 == 0:
            print(f"  epoch {epoch + 1}/{args.epochs}: loss {total / len(xt):.4f}", flush=True)
    net.eval()
    return net, {"feature_mean": f_mean, "feature_std": f_std, "score_mean": s_mean, "score_std": s_std}


def predict(net: Any, std: Dict[str, Any], x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        z = net(torch.tensor((x - std["feature_mean"]) / std["feature_std"], dtype=torch.float32)).squeeze(-1)
    return z.double().numpy() * std["score_std"] + std["score_mean"]


def evaluate(pred: np.ndarray, scores: np.ndarray, subsets: np.ndarray) -> Dict[str, Any]:
    out = {"all": metrics(pred, scores)}
    for sub in sorted(set(subsets.tolist())):
        m = subsets == sub
        out[sub] = metrics(pred[m], scores[m])
    return out


def print_metrics(title: str, res: Dict[str, Any]) -> None:
    print(title)
    for sub, m in res.items():
        print(f"  {sub:14s} rows {m['rows']:5d}  spearman {m['spearman']:.4f}  pearson {m['pearson']:.4f}  "
              f"pairwise acc {m['pairwise_accuracy']:.4f}  (OpenAssistant RM {m['oasst_rm_pairwise_accuracy']:.4f}, "
              f"agrees with RM order {m['agreement_with_oasst_rm_order']:.4f})")


# ------------------------------------------------------------------ main


def main(argv: Sequence[str] = ()) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--out", type=Path, default=brm.ASSET_DIR)
    p.add_argument("--validate", action="store_true", help="inner validation run (buckets 35..99 -> 20..34); writes nothing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--embed-batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=brm.DEFAULT_MAX_LENGTH)
    p.add_argument("--context-reserve", type=int, default=brm.DEFAULT_CONTEXT_RESERVE)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-pairs", type=int, default=256)
    p.add_argument("--pair-weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(list(argv) or None)

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    rows, files = load_rows(args.data_dir)
    mpath = brm.minilm_path()
    encoder_info = {
        "name": "sentence-transformers/all-MiniLM-L6-v2",
        "package": brm.MINILM_PACKAGE,
        "package_version": importlib.metadata.version(brm.MINILM_PACKAGE),
        **brm.minilm_fingerprint(mpath),
        "weights_sha256": sha256_file(mpath / "model.safetensors"),
    }
    recipe = {"max_length": args.max_length, "context_reserve": args.context_reserve, "layers": list(brm.DEFAULT_LAYERS)}
    feats = embed(rows, files, recipe, encoder_info, args.embed_batch)
    scores = np.array([r["scores"] for r in rows], dtype=np.float64)
    subsets = np.array([r["subset"] for r in rows])
    buckets = np.array([brm.split_bucket(r["id"]) for r in rows])
    heldout = buckets < brm.HELDOUT_PERCENT
    if args.validate:
        train_m, eval_m, label = buckets >= 35, (buckets >= 20) & (buckets < 35), "inner validation (buckets 20..34)"
    else:
        train_m, eval_m, label = ~heldout, heldout, "held-out split"
    print(f"rows: {len(rows)}; train {int(train_m.sum())}, {label} {int(eval_m.sum())}", flush=True)

    t0 = time.time()
    net, std = train_head(feats[train_m], scores[train_m], args)
    print(f"head trained in {time.time() - t0:.0f}s", flush=True)
    res_eval = evaluate(predict(net, std, feats[eval_m]), scores[eval_m], subsets[eval_m])
    res_train = evaluate(predict(net, std, feats[train_m]), scores[train_m], subsets[train_m])
    print_metrics("train rows:", res_train)
    print_metrics(f"{label}:", res_eval)
    if args.validate:
        print(f"wall time {time.time() - t_start:.0f}s")
        return 0

    from safetensors.torch import save_file

    n_features = feats.shape[-1]
    tensors = {f"net.{k}": v.detach().to(torch.float32).contiguous() for k, v in net.state_dict().items()}
    tensors["feature_mean"] = torch.tensor(std["feature_mean"])
    tensors["feature_std"] = torch.tensor(std["feature_std"])
    config = {
        "name": f"builtin:all-MiniLM-L6-v2+{brm.HEAD_VERSION}",
        "format_version": 1,
        "template": "builtin",
        "description": "all-MiniLM-L6-v2 (sentence pair: left-truncated HH-rendered context, right-truncated "
                       "response) -> mean-pooled layers 4-6 over response and context segments + log token "
                       "counts -> MLP head distilled from OpenAssistant Pythia RM logits (PRO HH test files)",
        "encoder": encoder_info,
        "features": {
            "text": "[CLS] tail(tokens(render_hh(context))) [SEP] head(tokens(response)) [SEP]; "
                    "token type 0 up to the first [SEP], 1 after; MiniLM's uncased WordPiece, no special tokens inside",
            "truncation": "response keeps its first max_length-3-min(len(context), context_reserve) tokens; "
                          "context keeps its last max_length-3-len(kept response) tokens",
            **recipe,
            "pooling": "per layer in `layers`, mean over token-type-1 positions (response + final [SEP]); "
                       "then the same over token-type-0 positions ([CLS] + context + [SEP])",
            "extra": ["log1p(kept response tokens)", "log1p(kept context tokens)"],
            "n_features": n_features,
        },
        "head": {
            "architecture": "standardise(features) -> Linear(n_features, hidden) -> GELU -> Linear(hidden, 1)",
            "n_features": n_features,
            "hidden": args.hidden,
            "dtype": "float32",
            "tensors": "net.1.weight, net.1.bias, net.4.weight, net.4.bias, feature_mean, feature_std",
        },
        "standardisation": {
            "score_mean": round(std["score_mean"], 8),
            "score_std": round(std["score_std"], 8),
            "note": "score = head_output * score_std + score_mean (OpenAssistant RM logit scale); "
                    "features standardised with feature_mean/feature_std from head.safetensors",
        },
        "training": {
            "data": files,
            "split": {"salt": brm.SPLIT_SALT, "heldout_percent": brm.HELDOUT_PERCENT,
                      "rule": "bucket = int(sha256(f'{salt}:{id}')[:8], 16) % 100; heldout iff bucket < heldout_percent",
                      "train_rows": int(train_m.sum()), "heldout_rows": int(heldout.sum())},
            "target": "stored OpenAssistant RM logits (`reward` / canonical `scores`), standardised",
            "loss": f"MSE(f, z) + {args.pair_weight} * MSE(f0 - f1, z0 - z1)",
            "optimizer": {"name": "AdamW", "lr": args.lr, "weight_decay": args.weight_decay},
            "dropout": args.dropout,
            "epochs": args.epochs,
            "batch_pairs": args.batch_pairs,
            "seed": args.seed,
            "hyperparameters_chosen_on": "inner validation split (buckets 20..34) -- see --validate",
            "versions": {"torch": torch.__version__,
                         "transformers": importlib.metadata.version("transformers")},
        },
        "metrics": {"heldout": res_eval, "train": res_train["all"]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    head_path, config_path = args.out / brm.HEAD_FILE, args.out / brm.CONFIG_FILE
    with atomic_path(head_path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "name": config["name"]})
    write_text_atomic(config_path, json.dumps(config, indent=2) + "\n")
    for path in (head_path, config_path):
        os.chmod(path, 0o644)  # package data: world-readable once installed
    print(f"wrote {head_path} ({head_path.stat().st_size} bytes), {config_path} ({config_path.stat().st_size} bytes)")
    print(f"wall time {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
