"""Model cards: ``README.md`` in every final model folder of `deft train`.

:func:`write_card` writes a Hugging Face model card into ``OUTPUT_DIR/model``
(and ``OUTPUT_DIR/merged``), so the folder can be pushed to a hub as it is:

- **front matter** (YAML between ``---`` lines) with model-card metadata:
  ``base_model`` (a hub id: ``card.base_model``, else the ``model`` spec when it
  is a hub id, else the id of a Hugging Face cache folder; omitted for other
  local folders), ``base_model_relation``, ``library_name`` (``transformers``,
  or ``peft`` for an adapter folder), ``pipeline_tag: text-generation``,
  ``tags`` (deft, the method, lora), ``datasets`` (``card.datasets``),
  ``license`` (``card.license``, else the license in the base model folder's
  own card; omitted when unknown) and, once ``deft eval`` has evaluated the
  folder, ``model-index`` with its results;
- **markdown**: the method and loss (``L = L_m - omega * R_dis``, the omega
  used and how it was set), the data (graded file and its SHA-256, levels,
  samples, the grading reward model), Q_diff (file SHA-256, vocabulary size,
  counts, the top positive and negative tokens decoded with the policy's
  tokenizer), training (steps, epochs, lr, first / last / mean of the
  metrics.jsonl rows, the R_dis gradient share), evaluation, reproducibility
  (deft version, git commit, the command line, the whole config) and how to
  load the folder.

:func:`render_card` is the pure core: manifest, metrics and Q_diff file in, card
text out. :func:`update_card_eval` is what ``deft eval`` calls for every model
it evaluated: when the model folder holds a deft card, its evaluation section
and ``model-index`` are replaced by the results of that evaluation (the most
recent ``deft eval`` of the folder); any other README is left alone.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import yaml

from deft._hf import is_adapter
from deft._util import md_table
from deft.config import LABEL_SMOOTHING, PAIRED
from deft.distribution import PolicyTokenizer, load_distribution, resolve_tokenizer, top_tokens
from deft.io import sha256_file, write_text_atomic

__all__ = [
    "CARD_NAME", "render_card", "write_card", "read_card", "is_deft_card", "card_metadata", "training_summary",
    "qdiff_summary", "eval_results", "model_index", "update_card_eval", "base_model_id",
]

PathLike = Union[str, "Path"]

#: The card's file name in a model folder (what the Hugging Face hub reads).
CARD_NAME = "README.md"
#: Marks a card deft wrote (``deft eval`` updates only those).
MARKER = "<!-- deft model card: written by `deft train`; `deft eval` of this folder updates its evaluation section -->"
EVAL_BEGIN = "<!-- deft:eval:begin -->"
EVAL_END = "<!-- deft:eval:end -->"

METHOD_NAMES = {"sft": "SFT", "dpo": "DPO", "ipo": "IPO", "pro": "PRO", "rrhf": "RRHF", "simpo": "SimPO", "cpo": "CPO",
                "orpo": "ORPO", "kto": "KTO"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_HF_CACHE = re.compile(r"models--([A-Za-z0-9][A-Za-z0-9._-]*)--([A-Za-z0-9][A-Za-z0-9._-]*)")
#: metrics.jsonl keys summarised in the training table, in this order (those a run logged).
TRAIN_KEYS = ("loss", "L_m", "R_dis", "pair_loss", "rank_loss", "sft_term", "rewards/accuracy", "rewards/margins", "rewards/chosen",
              "rewards/rejected", "kl", "log_odds_ratio", "log_odds_chosen", "rdis_grad_share", "rdis_grad_cosine", "grad_norm", "lr")
EVAL_KEYS = ("eval/accuracy", "eval/margin", "eval/chosen_reward", "eval/rejected_reward", "eval/nll", "eval/loss")


# ---------------------------------------------------------------------------
# small helpers


def _num(x: Any) -> str:
    """A metric for a table: 4 significant digits, ``-`` when missing."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return f"{int(x):,}"
    return f"{float(x):.4g}"


def _count(x: Any) -> str:
    """A count recorded as a string (safetensors metadata), with thousands separators."""
    try:
        return f"{int(str(x)):,}"
    except ValueError:
        return "?"


def _code(text: str) -> str:
    """``text`` as an inline code span (its ``repr``, so spaces and newlines show)."""
    r = repr(text)
    return f"`` {r} ``" if "`" in r else f"`{r}`"


def _sha(sha: Optional[str]) -> str:
    return f"`{sha}`" if sha else "-"


def _local(spec: str) -> bool:
    return Path(str(spec)).expanduser().exists()


def base_model_id(manifest: Mapping[str, Any]) -> Optional[str]:
    """The base model as a hub id, for ``base_model``: ``card.base_model``,
    else the trained ``model`` when it is a hub id (not a local path), else the
    ``ORG/NAME`` of a Hugging Face cache folder (``.../models--ORG--NAME/...``);
    ``None`` when unknown (a local folder)."""
    cfg = manifest.get("config") or {}
    given = (cfg.get("card") or {}).get("base_model")
    if given:
        return str(given)
    src = str((manifest.get("model") or {}).get("source") or cfg.get("model") or "")
    if not src:
        return None
    if not _local(src):
        return src if _HUB_ID.match(src) else None
    m = _HF_CACHE.search(src)
    return f"{m.group(1)}/{m.group(2)}" if m else None


def _folder_card_metadata(folder: PathLike) -> Dict[str, Any]:
    """The front matter of ``folder/README.md`` (``{}`` when absent or unreadable)."""
    try:
        meta, _ = read_card(Path(folder) / CARD_NAME)
    except (OSError, ValueError):
        return {}
    return meta


def _license(manifest: Mapping[str, Any]) -> Optional[str]:
    """``card.license``, else the license in the base model folder's own card."""
    cfg = manifest.get("config") or {}
    given = (cfg.get("card") or {}).get("license")
    if given:
        return str(given)
    src = str((manifest.get("model") or {}).get("source") or cfg.get("model") or "")
    if src and Path(src).expanduser().is_dir():
        lic = _folder_card_metadata(Path(src).expanduser()).get("license")
        return str(lic) if isinstance(lic, str) and lic else None
    return None


def _method_label(manifest: Mapping[str, Any]) -> str:
    m = METHOD_NAMES.get(str(manifest.get("method")), str(manifest.get("method")).upper())
    return f"DEFT-{m}" if manifest.get("deft") else m


def _command(argv: Any) -> Optional[str]:
    """The recorded ``sys.argv`` as a shell line (``deft`` for the entry point, ``python -m deft`` for the module)."""
    if not isinstance(argv, (list, tuple)) or not argv:
        return None
    args = [str(a) for a in argv]
    first = Path(args[0])
    if first.name == "deft":
        args[0] = "deft"
    elif first.name == "__main__.py" and first.parent.name == "deft":
        args = ["python", "-m", "deft"] + args[1:]
    return shlex.join(args)


# ---------------------------------------------------------------------------
# reading the run


def training_summary(metrics_path: Optional[PathLike]) -> Dict[str, Any]:
    """Over a run's ``metrics.jsonl``: ``{"steps": n training rows, "train": {key:
    {"first", "last", "mean"}}, "eval": {key: {"step_first", "first", "step_last",
    "last"}}}`` for the keys of :data:`TRAIN_KEYS` / :data:`EVAL_KEYS` the run
    logged (training rows are those with ``loss``, eval rows those with
    ``eval/accuracy``). Empty when the file is missing."""
    rows: List[Dict[str, Any]] = []
    p = Path(metrics_path) if metrics_path is not None else None
    if p is not None and p.exists():
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError:
                raise ValueError(f"{p}:{n}: not valid JSON; is it the metrics.jsonl of `deft train`?") from None
            if isinstance(r, dict):
                rows.append(r)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/accuracy" in r]
    out: Dict[str, Any] = {"steps": len(train_rows), "train": {}, "eval": {}}
    for k in TRAIN_KEYS:
        v = [float(r[k]) for r in train_rows if isinstance(r.get(k), (int, float))]
        if v:
            out["train"][k] = {"first": v[0], "last": v[-1], "mean": float(np.mean(v))}
    for k in EVAL_KEYS:
        v = [(int(r.get("step", 0)), float(r[k])) for r in eval_rows if isinstance(r.get(k), (int, float))]
        if v:
            out["eval"][k] = {"step_first": v[0][0], "first": v[0][1], "step_last": v[-1][0], "last": v[-1][1]}
    return out


def qdiff_summary(qdiff_path: PathLike, tokenizer: Optional[PolicyTokenizer] = None, k: int = 10) -> Dict[str, Any]:
    """A Q_diff file for the card: its SHA-256, vocabulary size, metadata and
    the ``k`` most positive and negative tokens decoded with ``tokenizer``
    (checked against the file's vocabulary; :func:`deft.distribution.top_tokens`)."""
    path = Path(qdiff_path)
    dist = load_distribution(path, tokenizer=tokenizer)
    out: Dict[str, Any] = {"path": str(path), "sha256": sha256_file(path), "vocab_size": dist.vocab_size, "metadata": dist.metadata}
    out["top"] = top_tokens(dist, tokenizer, k) if tokenizer is not None else None
    return out


def _graded_manifest(graded_path: Optional[str]) -> Dict[str, Any]:
    if not graded_path:
        return {}
    p = Path(graded_path).with_name("manifest.json")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) and doc.get("stage") == "grade" else {}


# ---------------------------------------------------------------------------
# evaluation results (deft eval's eval.json)


def eval_results(eval_doc: Mapping[str, Any], run_name: str, eval_json: Optional[PathLike] = None) -> Dict[str, Any]:
    """The results of run ``run_name`` in an ``eval.json`` of `deft eval`, as
    the card shows them: per subset and in total (samples, BLEU, reward,
    sacreBLEU), win/tie/lose, and the settings that shaped them."""
    runs = [r for r in eval_doc.get("runs") or [] if isinstance(r, dict) and r.get("name") == run_name]
    where = f"{eval_json}: " if eval_json is not None else ""
    if not runs:
        raise ValueError(f"{where}no run named {run_name!r} (runs: {[r.get('name') for r in eval_doc.get('runs') or []]})")
    run = runs[0]
    settings = eval_doc.get("settings") or {}
    rm = eval_doc.get("reward_model") or {}
    return {
        "eval_json": str(eval_json) if eval_json is not None else None,
        "created": eval_doc.get("created"),
        "name": run_name,
        "reward_model": rm.get("name") if isinstance(rm, dict) else None,
        "data": list(settings.get("data") or []),
        "limit": settings.get("limit"),
        "max_new_tokens": settings.get("max_new_tokens"),
        "template": run.get("template"),
        "subsets": dict(run.get("subsets") or {}),
        "total": run.get("total"),
        "win_tie_lose": run.get("win_tie_lose"),
        "mt_bench_questions": run.get("mt_bench_questions") or 0,
    }


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def model_index(ev: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """``model-index`` metadata of the evaluation results ``ev`` (:func:`eval_results`),
    named by the eval run: one result per subset and, with several, one over all
    of them; the win rate goes with the last."""
    rm = ev.get("reward_model") or "reward model"
    subsets = ev.get("subsets") or {}
    groups = [(s, s, v) for s, v in subsets.items()]
    if ev.get("total") and len(subsets) != 1:
        groups.append(("all", " + ".join(subsets) or "all", ev["total"]))
    results = []
    for i, (dtype, dname, sc) in enumerate(groups):
        metrics = [{"type": t, "value": round(float(sc[k]), 4), "name": label}
                   for k, t, label in (("bleu", "bleu", "BLEU (PRO-compatible, character 4-grams, x100)"),
                                       ("reward", "reward", f"Reward (100 * sigmoid, {rm})"),
                                       ("sacrebleu", "sacrebleu", "sacreBLEU"))
                   if _finite(sc.get(k))]
        w = ev.get("win_tie_lose")
        if i == len(groups) - 1 and w and _finite(w.get("win_rate")):
            metrics.append({"type": "win_rate", "value": round(float(w["win_rate"]), 4),
                            "name": f"Win rate vs {w.get('baseline')} (judged by {rm})"})
        if metrics:
            results.append({"task": {"type": "text-generation", "name": "Text Generation"},
                            "dataset": {"name": dname, "type": dtype}, "metrics": metrics})
    return [{"name": str(ev.get("name") or "model"), "results": results}] if results else []


def _eval_section(ev: Optional[Mapping[str, Any]]) -> List[str]:
    lines = [EVAL_BEGIN, "## Evaluation", ""]
    if not ev:
        lines += ["Not evaluated yet. `deft eval --model THIS_FOLDER --data TEST_FILE ...` writes its results here.", "", EVAL_END]
        return lines
    data = ", ".join(f"`{Path(d).name}`" for d in ev.get("data") or []) or "-"
    lines += [f"`deft eval` ({ev.get('created') or '?'}, `{ev.get('eval_json')}`, run `{ev.get('name')}`): greedy generations "
              f"of at most {ev.get('max_new_tokens')} new tokens (template {ev.get('template')}) on {data}"
              + (f", the first {ev['limit']} rows of each subset" if ev.get("limit") else "")
              + f"; BLEU is PRO-compatible (NLTK sentence BLEU over characters, x100), Reward 100 * sigmoid of the score "
              f"of `{ev.get('reward_model')}`.", ""]
    rows = [[s, _num(v.get("samples")), _num(v.get("bleu")), _num(v.get("reward")), _num(v.get("sacrebleu"))]
            for s, v in (ev.get("subsets") or {}).items()]
    if ev.get("total"):
        t = ev["total"]
        rows.append(["Total", _num(t.get("samples")), _num(t.get("bleu")), _num(t.get("reward")), _num(t.get("sacrebleu"))])
    if rows:
        lines += md_table(["subset", "samples", "BLEU", "Reward", "sacreBLEU"], rows) + [""]
    w = ev.get("win_tie_lose")
    if w:
        lines += [f"Against `{w.get('baseline')}` (judged by the reward model; a tie within {w.get('tie_margin')} points): "
                  f"win {w.get('win')}, tie {w.get('tie')}, lose {w.get('lose')} of {w.get('n')} prompts "
                  f"(win rate {100 * float(w.get('win_rate', 0)):.1f}%).", ""]
    if ev.get("mt_bench_questions"):
        lines += [f"MT-Bench: answers to {ev['mt_bench_questions']} questions written for FastChat's judge (not scored here).", ""]
    lines.append(EVAL_END)
    return lines


# ---------------------------------------------------------------------------
# the card


def card_metadata(manifest: Mapping[str, Any], *, adapter: bool = False, merged: bool = False,
                  eval_result: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The front matter: Hugging Face model-card metadata keys only."""
    card = (manifest.get("config") or {}).get("card") or {}
    meta: Dict[str, Any] = {}
    base = base_model_id(manifest)
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "adapter" if adapter else "finetune"
    meta["library_name"] = "peft" if adapter else "transformers"
    lic = _license(manifest)
    if lic:
        meta["license"] = lic
    if card.get("datasets"):
        meta["datasets"] = [str(d) for d in card["datasets"]]
    method = str(manifest.get("method") or "")
    tags = ["deft", method] + (["deft-" + method] if manifest.get("deft") else []) + (["lora"] if adapter or merged else [])
    meta["tags"] = [t for t in tags + (["peft"] if adapter else []) if t]
    meta["pipeline_tag"] = "text-generation"
    if eval_result:
        idx = model_index(eval_result)
        if idx:
            meta["model-index"] = idx
    return meta


def _front_matter(meta: Mapping[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(dict(meta), sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def _settings(rows: Sequence[Sequence[Any]]) -> List[str]:
    """A two-column table of settings (no header text), then a blank line."""
    return md_table(["", ""], rows, left=2) + [""]


def _method_section(manifest: Mapping[str, Any]) -> List[str]:
    cfg = manifest.get("config") or {}
    data_cfg, method_cfg, deft_cfg = (cfg.get(k) or {} for k in ("data", "method", "deft"))
    method = str(manifest.get("method") or method_cfg.get("name") or "?")
    lines = ["## Method", ""]
    rows: List[List[str]] = [["method", method]]
    if method_cfg.get("variant") == "official":
        rows.append(["variant", "official (the reference implementation's loss)"])
    if method in PAIRED:
        rows.append(["beta (ORPO's lambda)" if method == "orpo" else "beta", _num(method_cfg.get("beta"))])
    if method == "simpo":
        rows.append(["gamma (target reward margin)", _num(method_cfg.get("gamma"))])
    if method == "kto":
        rows += [["desirable weight", _num(method_cfg.get("desirable_weight"))],
                 ["undesirable weight", _num(method_cfg.get("undesirable_weight"))]]
    if method in LABEL_SMOOTHING:
        rows.append(["label smoothing", _num(method_cfg.get("label_smoothing"))])
    if method_cfg.get("sft_weight") is not None:
        rows.append(["SFT weight (NLL of the best response)", _num(method_cfg.get("sft_weight"))])
    if manifest.get("deft"):
        omega = manifest.get("omega") or {}
        lines += [f"Loss `L = L_m - omega * R_dis`: `L_m` is the {METHOD_NAMES.get(method, method)} loss and "
                  "`R_dis = mean_t sum_v Q_diff[v] log softmax(z_t)[v]` over the response tokens pulls the output distribution "
                  "towards the tokens of preferred responses (Q_diff below).", ""]
        how = (f"calibrated to an R_dis gradient share of {_num(omega.get('omega_share'))} (median ratio "
               f"||grad R_dis|| / ||grad L_m|| {_num(omega.get('ratio_median'))})" if omega.get("omega_share") is not None
               else str(omega.get("source") or "deft.omega"))
        rows += [["omega", _num(omega.get("value", deft_cfg.get("omega")))], ["omega set by", how],
                 ["R_dis over", f"{deft_cfg.get('responses', 'all')} responses"]]
    else:
        lines += [f"Loss `L = L_m`, the plain {METHOD_NAMES.get(method, method)} loss (DEFT's R_dis term off).", ""]
    rows += [["template", str(manifest.get("template"))],
             ["max length / prompt", f"{data_cfg.get('max_length')} / {data_cfg.get('max_prompt_length')} tokens"]]
    peft = manifest.get("peft")
    if isinstance(peft, dict):
        rows.append(["LoRA", f"r {peft.get('r')}, alpha {peft.get('alpha')}, targets {peft.get('target_modules')}, "
                             f"{_num(peft.get('trainable'))} of {_num(peft.get('total'))} parameters trained"])
    return lines + md_table(["setting", "value"], rows, left=2) + [""]


def _data_section(manifest: Mapping[str, Any]) -> List[str]:
    cfg = manifest.get("config") or {}
    data_cfg = cfg.get("data") or {}
    method = str(manifest.get("method") or "")
    graded = manifest.get("graded") or {}
    levels = [str(x) for x in data_cfg.get("levels") or []]
    if method == "sft":
        unit = "the best response"
    elif method in PAIRED:
        unit = "a (best, worst) pair"
    else:
        unit = "its ranked responses" + (f" (at most {data_cfg['max_responses']})" if data_cfg.get("max_responses") else "")
    lines = ["## Data", "", f"{_num(manifest.get('samples'))} samples (prompts) of level{'s' if len(levels) != 1 else ''} "
             f"{', '.join(levels) or '?'} of `{Path(str(graded.get('path') or '?')).name}`, each trained on {unit}"
             + (f" (`data.max_samples` {data_cfg['max_samples']})" if data_cfg.get("max_samples") else "") + ".", ""]
    rows = [["graded file", f"`{graded.get('path')}`"], ["graded file SHA-256", _sha(graded.get("sha256"))],
            ["tokenised data hash", _sha(manifest.get("data_hash"))]]
    gm = _graded_manifest(graded.get("path"))
    if gm:
        params = gm.get("parameters") or {}
        rows.append(["graded by", f"`{params.get('reward_model')}` (a = {params.get('a')}, c = {params.get('c')})"])
        ins = [f"`{Path(str(i.get('path'))).name}`" for i in gm.get("inputs") or [] if isinstance(i, dict)]
        if ins:
            rows.append(["graded from", ", ".join(ins)])
    split = manifest.get("eval")
    if split:
        rows.append(["eval split", f"{split.get('pairs')} held-out pairs" + (f" of `{split.get('data')}`" if split.get("data") else "")
                     + (f", holdout {split.get('holdout')} of the training prompts" if split.get("holdout") else "")])
    return lines + _settings(rows)


def _qdiff_section(manifest: Mapping[str, Any], qdiff_path: PathLike, tokenizer: Optional[PolicyTokenizer], top: int) -> List[str]:
    q = qdiff_summary(qdiff_path, tokenizer, top)
    md = q["metadata"]
    lines = ["## Discrepancy distribution Q_diff", "",
             "`Q_diff = Q+/sum(Q+) - Q-/sum(Q-)` over the tokens of the Q+ and Q- responses of the graded file (every level), "
             "counted with the policy's tokenizer.", ""]
    rows = [["file", f"`{q['path']}`"], ["SHA-256", _sha(q["sha256"])], ["vocabulary", _num(q["vocab_size"])],
            ["Q+ responses / tokens", f"{_count(md.get('pos_responses'))} / {_count(md.get('pos_tokens'))}"],
            ["Q- responses / tokens", f"{_count(md.get('neg_responses'))} / {_count(md.get('neg_tokens'))}"]]
    recorded = (manifest.get("distribution") or {}).get("sha256")
    if recorded and recorded != q["sha256"]:
        rows.append(["note", f"the file changed since training (trained with SHA-256 {_sha(recorded)})"])
    lines += _settings(rows)
    tt = q["top"]
    if tt and (tt["positive"] or tt["negative"]):
        rows = []
        for i in range(max(len(tt["positive"]), len(tt["negative"]))):
            p = tt["positive"][i] if i < len(tt["positive"]) else None
            m = tt["negative"][i] if i < len(tt["negative"]) else None
            rows.append([str(i + 1), _code(p["text"]) if p else "", f"{p['q_diff']:+.3e}" if p else "",
                         _code(m["text"]) if m else "", f"{m['q_diff']:+.3e}" if m else ""])
        lines += [f"Top {top} tokens each way (decoded):", ""]
        lines += md_table(["#", "Q_diff > 0 (preferred)", "Q_diff", "Q_diff < 0 (dispreferred)", "Q_diff"], rows, left=2) + [""]
    return lines


def _training_section(manifest: Mapping[str, Any], metrics_path: Optional[PathLike]) -> List[str]:
    t = (manifest.get("config") or {}).get("train") or {}
    steps, spe = manifest.get("global_step"), manifest.get("steps_per_epoch")
    rows = [["optimizer steps", f"{_num(steps)} of {_num(manifest.get('total_steps'))}"]]
    if spe:
        rows.append(["epochs", f"{float(steps or 0) / float(spe):.3g} ({spe} steps per epoch)"])
    warmup = t.get("warmup_steps") if t.get("warmup_steps") is not None else f"ratio {t.get('warmup_ratio')}"
    engine = f"DeepSpeed `{Path(str(t['deepspeed'])).name}`" if t.get("deepspeed") else "plain PyTorch loop"
    rows += [["learning rate", f"{_num(t.get('lr'))} ({t.get('scheduler')}, warmup {warmup})"],
             ["batch", f"{manifest.get('world_size') or 1} x {t.get('micro_batch_size')} x {t.get('gradient_accumulation_steps')} "
                       "(processes x micro-batch x accumulation)"],
             ["seed", str(t.get("seed"))],
             ["precision / engine", f"{(manifest.get('loading') or {}).get('dtype', t.get('precision'))} / {engine}"]]
    lines = ["## Training", ""] + _settings(rows)
    summary = training_summary(metrics_path)
    if summary["train"]:
        lines += [f"From `metrics.jsonl` ({summary['steps']} steps):", ""]
        lines += md_table(["metric", "first step", "last step", "mean"],
                          [[k, _num(v["first"]), _num(v["last"]), _num(v["mean"])] for k, v in summary["train"].items()]) + [""]
    if summary["eval"]:
        lines += ["Held-out eval split during training (the implicit reward `beta * log(pi / pi_ref)` against the initial policy):", ""]
        lines += md_table(["metric", "before (step)", "at the end (step)"],
                          [[k, f"{_num(v['first'])} ({v['step_first']})", f"{_num(v['last'])} ({v['step_last']})"]
                           for k, v in summary["eval"].items()]) + [""]
    share = (manifest.get("diagnostics") or {}).get("rdis_grad_share")
    if share:
        lines += [f"R_dis gradient share `||grad(omega R_dis)|| / ||grad L_m||`: {_num(share.get('step_0'))} at step 0, median "
                  f"{_num(share.get('median'))}, last {_num(share.get('last'))} (below 1e-3 the distribution reward cannot change "
                  "the model).", ""]
    return lines


def _usage_section(manifest: Mapping[str, Any], adapter: bool) -> List[str]:
    lines = ["## How to use", "", "```python"]
    if adapter:
        src = str((manifest.get("model") or {}).get("source") or "?")
        lines += ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                  'path = "."  # this folder, or its hub id once pushed',
                  "model = AutoPeftModelForCausalLM.from_pretrained(path)  # the base model named in adapter_config.json, with the adapter",
                  "tokenizer = AutoTokenizer.from_pretrained(path)", "```", "",
                  f"The base model is `{src}`; `deft eval --model THIS_FOLDER` (and everything in deft that loads a policy) "
                  "loads it and merges the adapter.", ""]
    else:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  'path = "."  # this folder, or its hub id once pushed',
                  "model = AutoModelForCausalLM.from_pretrained(path)", "tokenizer = AutoTokenizer.from_pretrained(path)", "```", ""]
    if manifest.get("template") == "chat":
        lines += ["Prompt it with the tokenizer's chat template (`apply_chat_template(..., add_generation_prompt=True)`), as it was trained.", ""]
    else:
        lines += ['Prompt it with plain HH text ending in `"\\n\\nAssistant:"`, as it was trained.', ""]
    return lines


def _reproducibility_section(manifest: Mapping[str, Any]) -> List[str]:
    versions = manifest.get("versions") or {}
    rows = [["deft", str(versions.get("deft", "?"))], ["git commit", f"`{manifest['git_commit']}`" if manifest.get("git_commit") else "-"],
            ["trained", str(manifest.get("created") or "?")],
            ["libraries", ", ".join(f"{k} {versions[k]}" for k in ("torch", "transformers", "deepspeed", "python") if k in versions) or "-"]]
    lines = ["## Reproducibility", ""] + _settings(rows)
    cmd = _command(manifest.get("command"))
    if cmd:
        lines += ["Command:", "", "```bash", cmd, "```", ""]
    cfg = manifest.get("config")
    if cfg:
        lines += ["<details><summary>The whole training config</summary>", "", "```yaml",
                  yaml.safe_dump(dict(cfg), sort_keys=False, allow_unicode=True, width=1000).rstrip(), "```", "", "</details>", ""]
    return lines


def render_card(manifest: Mapping[str, Any], metrics_path: Optional[PathLike], qdiff_path: Optional[PathLike],
                eval_result: Optional[Mapping[str, Any]] = None, *, tokenizer: Optional[PolicyTokenizer] = None,
                adapter: bool = False, merged: bool = False, top: int = 10) -> str:
    """The card of a `deft train` run: its ``manifest.json`` as a dict, its
    ``metrics.jsonl`` and the Q_diff file it trained with (``None`` without
    DEFT), for the folder of a full model, an ``adapter`` or a ``merged``
    adapter. ``tokenizer`` decodes the ``top`` Q_diff tokens (without one they
    are left out). ``eval_result``: :func:`eval_results`."""
    label = _method_label(manifest)
    base = base_model_id(manifest)
    model = manifest.get("model") or {}
    src = str(model.get("source") or (manifest.get("config") or {}).get("model") or "?")
    what = ("a LoRA adapter (load it onto the base model)" if adapter else
            "the base model with the LoRA adapter merged in" if merged else "the full fine-tuned weights (safetensors)")
    lines = [_front_matter(card_metadata(manifest, adapter=adapter, merged=merged, eval_result=eval_result)), MARKER, "",
             f"# {label} fine-tune of {base or Path(src).name or src}", "",
             f"Trained with deft (DEFT: distribution-guided efficient fine-tuning) as {label}; this folder holds {what}, "
             f"with the tokenizer. Base model: `{src}`" + (f" (`{model['gguf_file']}`)" if model.get("gguf_file") else "")
             + (f", hub id `{base}`." if base and base != src else "."), ""]
    lines += _method_section(manifest) + _data_section(manifest)
    if qdiff_path is not None:
        lines += _qdiff_section(manifest, qdiff_path, tokenizer, top)
    lines += _training_section(manifest, metrics_path) + _eval_section(eval_result) + [""]
    lines += _usage_section(manifest, adapter) + _reproducibility_section(manifest)
    return "\n".join(lines).rstrip() + "\n"


def write_card(model_dir: PathLike, manifest: Mapping[str, Any], metrics_path: Optional[PathLike], qdiff_path: Optional[PathLike],
               eval_result: Optional[Mapping[str, Any]] = None, *, tokenizer: Optional[PolicyTokenizer] = None,
               merged: bool = False, top: int = 10) -> Path:
    """Write ``model_dir/README.md`` (:func:`render_card`) atomically. An
    adapter folder (``adapter_config.json``) gets the peft card; without
    ``tokenizer`` the folder's own ``tokenizer.json`` decodes the top tokens."""
    model_dir = Path(model_dir)
    if tokenizer is None and qdiff_path is not None and (model_dir / "tokenizer.json").exists():
        tokenizer = resolve_tokenizer(model_dir / "tokenizer.json")
    text = render_card(manifest, metrics_path, qdiff_path, eval_result, tokenizer=tokenizer, adapter=is_adapter(model_dir),
                       merged=merged, top=top)
    return write_text_atomic(model_dir / CARD_NAME, text)


# ---------------------------------------------------------------------------
# reading and updating a card


def read_card(path: PathLike) -> Tuple[Dict[str, Any], str]:
    """``(front matter, body)`` of a model card; ``({}, text)`` without front matter."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}, text
    end = text.find("\n---\n", 3)
    if end < 0:
        raise ValueError(f"{p}: the front matter opened by '---' on line 1 is never closed")
    try:
        meta = yaml.safe_load(text[4:end + 1])
    except yaml.YAMLError as e:
        raise ValueError(f"{p}: front matter is not valid YAML ({e})") from None
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise ValueError(f"{p}: front matter is not a mapping")
    return meta, text[end + 5:]


def is_deft_card(model_dir: PathLike) -> bool:
    """Whether ``model_dir`` holds a card written by :func:`write_card`."""
    p = Path(model_dir) / CARD_NAME
    if not p.is_file():
        return False
    try:
        _, body = read_card(p)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return MARKER in body and EVAL_BEGIN in body and EVAL_END in body


def update_card_eval(model_dir: PathLike, eval_doc: Mapping[str, Any], run_name: str, eval_json: Optional[PathLike] = None) -> Optional[Path]:
    """Put run ``run_name`` of an ``eval.json`` into the card of ``model_dir``:
    its evaluation section and ``model-index`` are replaced, the rest kept.
    Returns the card's path, or ``None`` when the folder holds no deft card."""
    model_dir = Path(model_dir)
    if not is_deft_card(model_dir):
        return None
    path = model_dir / CARD_NAME
    meta, body = read_card(path)
    ev = eval_results(eval_doc, run_name, eval_json)
    meta.pop("model-index", None)
    idx = model_index(ev)
    if idx:
        meta["model-index"] = idx
    a, b = body.index(EVAL_BEGIN), body.index(EVAL_END) + len(EVAL_END)
    new_body = body[:a] + "\n".join(_eval_section(ev)) + body[b:]
    return write_text_atomic(path, _front_matter(meta) + new_body)
