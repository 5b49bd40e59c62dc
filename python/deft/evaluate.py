"""`deft eval`: generate with one or more policies on held-out prompts and score
them the way the PRO / DEFT papers do (Table 2: BLEU and reward per HH subset).

Pipeline
--------
1. **Data.** ``data`` is any file :func:`deft.data.load` reads (canonical
   schema) and/or MT-Bench ``question.jsonl`` files (``question_id``,
   ``category``, ``turns``; detected from the first record). The *reference*
   of a preference row is its best response: ``responses[0]`` when the row is
   ``ranked``, else the response with the highest score (the first one when
   the row has no scores). ``limit`` keeps the first ``limit`` rows of every
   subset (and the first ``limit`` MT-Bench questions).
2. **Prompts** are rendered exactly as ``deft train`` renders them
   (:func:`deft.render.render_prompt`): the tokenizer's chat template with the
   generation prompt for template ``chat``, else plain HH text ending in
   ``"\\n\\nAssistant:"``. ``template="auto"`` takes the template recorded in
   the ``manifest.json`` of the ``deft train`` run the model folder came from
   (``runs/x/train/model`` -> ``runs/x/train/manifest.json``), else ``chat``
   when the tokenizer has a chat template, else ``plain``
   (:func:`deft.render.resolve_model_template`). Prompts are tokenised like the
   trainer's (the tokenizer's ``tokenizer.json`` through the native encoder,
   no special tokens) and left-truncated to ``max_prompt_length`` (384) tokens.
3. **Generation** (:func:`deft.generation.generate`): greedy (``do_sample=False``,
   ``num_beams=1``), ``max_new_tokens`` (128), batches of ``batch_size``
   prompts of similar length, padded on the *left* with an attention mask (so
   a batched greedy output is the unbatched one), bf16 on CUDA and fp32 on
   CPU, ``torch.inference_mode``, a static KV cache where the model supports
   one (the same greedy ids as the dynamic cache; benches/bench_generation.py);
   a CUDA out-of-memory error halves the batch.
   The new tokens are decoded (special tokens skipped) up to the first EOS,
   and the text is cut as the PRO evaluation cuts it (:func:`deft.generation.cut_generation`):
   stripped, then cut before the first ``Human:`` or ``Assistant:`` (any
   case), then right-stripped. A row stops generating as soon as its text
   holds such a marker (the cut would discard the rest anyway).
4. **Resumable**: every batch is appended to ``RUN_DIR/generations.jsonl``
   and flushed (fsync) as soon as it is produced. A rerun of the same call
   skips the ids already there (a torn last line, from a kill mid-write, is
   dropped and regenerated); ``RUN_DIR/plan.json`` records what determines the
   generations (model and a stat fingerprint of its weight files, template,
   lengths, dtype) and a rerun with different settings is refused unless
   ``overwrite=True``. When every row is done the policy is not even loaded.
5. **Reward**: every (context, generation) is scored with the reward model
   of ``deft grade`` (:func:`deft.score.load_reward_model`; ``"builtin"`` by
   default, or any Hugging Face sequence-classification RM with
   ``reward_template``), and ``reward = 100 * sigmoid(score)``, as PRO reports
   it. Per subset the mean over its samples; "Total" is the mean over all
   samples (i.e. subsets weighted by their sample counts, as PRO's
   ``infer_and_eval_main_score.py`` computes it).
6. **BLEU** (:mod:`deft.eval_metrics`): (a) PRO-compatible (:func:`pro_bleu`): NLTK's
   ``sentence_bleu([reference], generation)`` on the stripped raw strings --
   which NLTK evaluates over *characters* -- x 100, averaged over samples;
   (b) sacreBLEU corpus BLEU (:func:`sacre_bleu`, default 13a tokenisation)
   per subset and over all samples.
7. **Win / tie / lose** against a ``baseline`` (:func:`win_tie_lose`): on the
   prompts both have, the run wins a prompt when its reward exceeds the
   baseline's by more than ``tie_margin`` reward points (default
   :data:`DEFAULT_TIE_MARGIN` = 1.0 on the 0-100 scale, i.e. a 0.01 difference
   in the RM's preference probability), loses when it is lower by more than
   that, and ties otherwise; identical generations always tie. The baseline is
   a name of a model evaluated in the same call, another eval output folder
   (with one run, or a run's folder), or a generations / samples file
   (``.jsonl`` or ``.parquet`` with ``id`` and ``generation``). Prompt sets
   that differ are restricted to their intersection, with a note (an empty
   intersection, or a shared id whose conversation differs, is an error).
   Baseline generations are scored with the same reward model (scores stored
   by an eval with the identical reward model are reused).
8. **MT-Bench**: each question's turns are answered in order (turn 2's prompt
   holds turn 1's answer), greedy, ``mt_bench_max_new_tokens`` (1024, FastChat's
   default) per turn, and written to ``OUTPUT_DIR/mt_bench/model_answer/NAME.jsonl``
   in FastChat's ``model_answer`` format (resumable per question, sorted by
   ``question_id`` at the end), ready for FastChat's judge. No reward or BLEU.

Outputs (``OUTPUT_DIR``)
------------------------
``eval.json`` (everything below, machine-readable), ``eval.md`` (the Table 2
layout: one row per run, per subset BLEU and Reward, then Total BLEU and
Reward; then sacreBLEU and win/tie/lose tables), ``manifest.json``
(:func:`deft.io.write_manifest`: inputs with SHA-256, parameters, versions),
``metrics.jsonl`` (generation and scoring throughput, results), and per run
``NAME/generations.jsonl``, ``NAME/plan.json``, ``NAME/samples.parquet`` and
``NAME/samples.jsonl`` (``id, subset, prompt, generation, reference, score,
reward, bleu``, plus ``baseline_reward`` and ``outcome`` with a baseline). All
files except the append-only generations are written atomically. A model
folder that holds the model card of `deft train` gets its run's results in
that card (:func:`deft.model_card.update_card_eval`), after the outputs above
are published.
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np
import polars as pl

# Imported inside the functions that use them, on purpose: torch and transformers; importing deft stays
# fast. Generation is deft.generation's, BLEU, win/tie/lose and reward are deft.eval_metrics'.
from deft._hf import is_adapter, load_causal_lm, load_tokenizer, resolve_device, resolve_dtype, weights_stat_fingerprint
from deft._util import md_table
from deft.data import DataError, load_many
from deft.errors import UnsafeWeightsError
from deft.io import (
    MetricsLog, atomic_path, begin_publication, input_record, locked_output, remove_stale_temporaries,
    write_json_atomic, write_manifest, write_text_atomic,
)
from deft.eval_metrics import (
    DEFAULT_TIE_MARGIN, WinTieLose, pro_bleu, reward_100, rm_identity, sacre_bleu, sacrebleu_signature,
    score_responses, win_tie_lose,
)
from deft.generation import cut_generation, generate
from deft.model_card import update_card_eval
from deft.render import prompt_lead_ids, render_prompt, resolve_model_template
from deft.score import load_reward_model

__all__ = [
    "DEFAULT_TIE_MARGIN",
    "EvalReport",
    "RunResult",
    "SubsetScores",
    "WinTieLose",
    "MTBenchQuestion",
    "evaluate",
    "generate",
    "cut_generation",
    "pro_bleu",
    "sacre_bleu",
    "win_tie_lose",
    "score_responses",
    "reference_response",
    "load_mt_bench",
    "is_mt_bench_file",
    "write_mt_bench_answers",
    "load_policy",
    "default_model_name",
]

PathLike = Union[str, "os.PathLike[str]"]

FORMAT = "deft-eval-v1"


def _points(x: float) -> str:
    """``1 point``, ``0.5 points``."""
    return f"{x:g} point" + ("" if x == 1 else "s")


#: Plan keys whose change invalidates stored generations.
PLAN_VERSION = 1
GENERATIONS = "generations.jsonl"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def _log(msg: str) -> None:
    print(f"[deft eval] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# data


def reference_response(responses: Sequence[str], scores: Optional[Sequence[float]], ranked: bool) -> str:
    """The best response: ``responses[0]`` when ``ranked``, else the one with
    the highest score (the first of equal ones; ``responses[0]`` without
    scores)."""
    if not responses:
        raise ValueError("a row without responses has no reference")
    if ranked or scores is None:
        return responses[0]
    best = max(range(len(responses)), key=lambda i: (scores[i], -i))
    return responses[best]


@dataclass
class MTBenchQuestion:
    question_id: Any
    category: str
    turns: List[str]


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def is_mt_bench_file(path: PathLike) -> bool:
    """Whether a ``.jsonl`` / ``.jsonl.gz`` file's first record has MT-Bench's
    ``question_id`` and ``turns`` fields."""
    p = Path(path)
    if not p.name.endswith((".jsonl", ".jsonl.gz")) or not p.is_file():
        return False
    try:
        with _open_text(p) as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    return isinstance(rec, dict) and "question_id" in rec and "turns" in rec
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, EOFError):
        return False
    return False


def load_mt_bench(path: PathLike, *, limit: Optional[int] = None) -> List[MTBenchQuestion]:
    """Read an MT-Bench ``question.jsonl`` (``question_id``, ``category``,
    ``turns``: a non-empty list of strings). Errors name file, line and field
    (:class:`deft.data.DataError`)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(2, "MT-Bench question file not found", str(p))
    out: List[MTBenchQuestion] = []
    seen: Set[Any] = set()
    with _open_text(p) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(str(p), lineno, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(str(p), lineno, None, f"expected a JSON object, got {type(rec).__name__}")
            for key in ("question_id", "turns"):
                if key not in rec:
                    raise DataError(str(p), lineno, key, f"missing required field (fields present: {', '.join(sorted(rec))})")
            qid = rec["question_id"]
            if not isinstance(qid, (int, str)) or isinstance(qid, bool):
                raise DataError(str(p), lineno, "question_id", f"expected an integer or string, got {type(qid).__name__}")
            if qid in seen:
                raise DataError(str(p), lineno, "question_id", f"duplicate question_id {qid!r}")
            seen.add(qid)
            turns = rec["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
                raise DataError(str(p), lineno, "turns", "expected a non-empty array of non-empty strings")
            cat = rec.get("category", "")
            if not isinstance(cat, str):
                raise DataError(str(p), lineno, "category", f"expected a string, got {type(cat).__name__}")
            out.append(MTBenchQuestion(qid, cat, list(turns)))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise DataError(str(p), None, None, "no questions")
    return out


@dataclass
class _Sample:
    id: str
    subset: str
    context: List[Dict[str, str]]
    reference: str

    @property
    def context_key(self) -> str:
        return _context_key(self.context)


def _context_key(context: Sequence[Mapping[str, str]]) -> str:
    return json.dumps([{"role": t["role"], "content": t["content"]} for t in context], ensure_ascii=False)


def _load_samples(paths: Sequence[Path], limit: Optional[int]) -> Tuple[List[_Sample], Any]:
    res = load_many(paths)
    if res.notes:
        _log(f"{len(res.notes)} rows loaded under a documented special case (e.g. {res.notes[0]})")
    frame = res.frame
    samples: List[_Sample] = []
    per_subset: Dict[str, int] = {}
    for r in frame.iter_rows(named=True):
        sub = r["subset"]
        if limit is not None and per_subset.get(sub, 0) >= limit:
            continue
        per_subset[sub] = per_subset.get(sub, 0) + 1
        ctx = [{"role": t["role"], "content": t["content"]} for t in r["context"]]
        samples.append(_Sample(str(r["id"]), sub, ctx, reference_response(r["responses"], r["scores"], bool(r["ranked"]))))
    return samples, frame


# ---------------------------------------------------------------------------
# models


def default_model_name(spec: str) -> str:
    """A run name from a model path or hub id: the folder / repo name; for the
    ``model`` folder of a ``deft train`` run (``runs/x/train/model``) the run's
    name (``x``)."""
    p = Path(str(spec).rstrip("/"))
    name = p.name
    if name == "model" and p.parent.name:
        name = p.parent.parent.name if p.parent.name == "train" and p.parent.parent.name else p.parent.name
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", name).strip("-.") or "model"
    return name


def _looks_local(spec: str) -> bool:
    s = str(spec)
    return s.startswith(("/", "./", "../", "~", ".\\")) or s.count("/") > 1 or os.sep != "/" and os.sep in s


def _check_model_spec(spec: str, gguf_file: Optional[str]) -> None:
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ValueError(f"model {spec}: expected a model folder (save_pretrained) or a hub id, got a file")
        if gguf_file:
            if not (p / gguf_file).is_file():
                raise FileNotFoundError(f"model {spec}: GGUF file {gguf_file} not found in the folder")
        elif not (p / "config.json").is_file() and not is_adapter(p):
            raise FileNotFoundError(f"model {spec}: the folder has no config.json (nor adapter_config.json); is it a Hugging Face "
                                    f"model folder (save_pretrained)?")
        return
    if _looks_local(spec):
        raise FileNotFoundError(f"model {spec}: no such folder")


def _load_tokenizer(spec: str, *, tokenizer: Optional[str], gguf_file: Optional[str], trust_remote_code: bool):
    try:
        return load_tokenizer(spec, tokenizer=tokenizer, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"tokenizer of model {tokenizer or spec}: could not be loaded ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def load_policy(
    model: str,
    *,
    gguf_file: Optional[str] = None,
    tokenizer: Optional[str] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
):
    """Load a causal LM (a local Hugging Face folder or hub id; ``gguf_file``
    names a GGUF file in it, dequantised by transformers) and its tokenizer
    for generation: eval mode, KV cache on, on ``device`` (default: CUDA when
    available) in ``dtype`` (default: bfloat16 on CUDA, float32 on CPU).
    Pickle-only weights (``pytorch_model.bin``) are refused unless
    ``allow_pickle`` (:func:`deft._hf.load_causal_lm`).
    Returns ``(model, tokenizer)``."""
    import torch

    _check_model_spec(model, gguf_file)
    dev = resolve_device(device)
    dt = getattr(torch, resolve_dtype(dtype, dev))
    tok = _load_tokenizer(model, tokenizer=tokenizer, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    try:
        lm = load_causal_lm(model, dtype=dt, gguf_file=gguf_file, trust_remote_code=trust_remote_code,
                            allow_pickle=allow_pickle)
    except UnsafeWeightsError:
        raise
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"model {model}: could not be loaded ({type(e).__name__}: {_first_line(e)})") from None
    lm.to(dev)
    lm.eval()
    if hasattr(lm, "config"):
        lm.config.use_cache = True
    return lm, tok


# ---------------------------------------------------------------------------
# resumable JSONL


def _read_resumable_jsonl(path: Path, key: str, required: Sequence[str], *, repair: bool = True) -> List[Dict[str, Any]]:
    """Records of an append-only JSONL file. With ``repair`` (our own files) a
    last line without its newline (torn by a kill) is cut off the file; without
    it (someone else's file, e.g. a baseline) the file is read as it is and never
    changed. Any other bad line is an error."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and not repair:
        data += b"\n"  # a last line without a newline is still a line
    elif end < len(data):
        _log(f"{path}: dropping a torn last line ({len(data) - end} bytes) left by an interrupted run")
        with open(path, "r+b") as f:
            f.truncate(end)
        data = data[:end]
    out: List[Dict[str, Any]] = []
    seen: Set[Any] = set()
    for lineno, raw in enumerate(data.split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(str(path), lineno, None, f"not a JSON line ({e}); remove the line or pass overwrite to start over") from None
        if not isinstance(rec, dict):
            raise DataError(str(path), lineno, None, "expected a JSON object")
        for k in required:
            if k not in rec:
                raise DataError(str(path), lineno, k, "missing required field")
        if rec[key] in seen:
            raise DataError(str(path), lineno, key, f"duplicate {key} {rec[key]!r}; the file is corrupt")
        seen.add(rec[key])
        out.append(rec)
    return out


class _Appender:
    """Append JSON lines, flushed and fsynced per batch."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, records: Iterable[Mapping[str, Any]]) -> None:
        self.f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


# ---------------------------------------------------------------------------
# MT-Bench


def _answer_id(model_id: str, qid: Any, turns: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps([model_id, qid, list(turns)], ensure_ascii=False).encode()).hexdigest()[:22]


def write_mt_bench_answers(
    questions: Sequence[MTBenchQuestion],
    path: PathLike,
    *,
    model: Any,
    tokenizer: Any,
    model_id: str,
    template: str,
    max_new_tokens: int = 1024,
    max_prompt_length: int = 2048,
    batch_size: int = 8,
    progress: bool = False,
    metrics: Any = None,
) -> Path:
    """Answer MT-Bench questions turn by turn (turn ``k`` is prompted with the
    conversation so far, including this model's earlier answers), greedy, and
    append them to ``path`` in FastChat's ``model_answer`` JSONL format
    (``question_id, answer_id, model_id, choices: [{index: 0, turns}], tstamp``).
    Questions already in ``path`` are skipped (resume); at the end the file is
    rewritten sorted by ``question_id``, atomically. Prompts are rendered with
    :func:`deft.render.render_prompt` (``template`` ``plain`` or ``chat``) and
    answers cut with :func:`cut_generation`."""
    path = Path(path)
    done = {r["question_id"] for r in _read_resumable_jsonl(path, "question_id", ("question_id", "choices"))}
    todo = [q for q in questions if q.question_id not in done]
    if todo:
        lead = prompt_lead_ids(template, tokenizer)
        app = _Appender(path)
        try:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                answers: List[List[str]] = [[] for _ in chunk]
                for k in range(max(len(q.turns) for q in chunk)):
                    live = [j for j, q in enumerate(chunk) if k < len(q.turns)]
                    prompts = []
                    for j in live:
                        q = chunk[j]
                        ctx: List[Dict[str, str]] = []
                        for t in range(k):
                            ctx += [{"role": "user", "content": q.turns[t]}, {"role": "assistant", "content": answers[j][t]}]
                        ctx.append({"role": "user", "content": q.turns[k]})
                        prompts.append(render_prompt(ctx, template, tokenizer))
                    gens = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length,
                                    batch_size=batch_size, progress=False, metrics=metrics, description=f"{model_id}/mt-bench",
                                    lead_ids=lead)
                    for j, g in zip(live, gens):
                        answers[j].append(g)
                app.write({"question_id": q.question_id, "answer_id": _answer_id(model_id, q.question_id, a), "model_id": model_id,
                           "choices": [{"index": 0, "turns": a}], "tstamp": time.time()} for q, a in zip(chunk, answers))
                if progress:
                    _log(f"{model_id}: MT-Bench {min(start + batch_size, len(todo))}/{len(todo)} questions")
        finally:
            app.close()
    recs = _read_resumable_jsonl(path, "question_id", ("question_id", "choices"))
    recs.sort(key=lambda r: (str(type(r["question_id"])), r["question_id"]))
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    return path


# ---------------------------------------------------------------------------
# results


@dataclass
class SubsetScores:
    """Means over a subset's samples: PRO-compatible BLEU x 100, reward
    (100 * sigmoid(score)), and sacreBLEU corpus BLEU."""

    samples: int
    bleu: float
    reward: float
    sacrebleu: float

    def to_dict(self) -> Dict[str, Any]:
        return {"samples": self.samples, "bleu": self.bleu, "reward": self.reward, "sacrebleu": self.sacrebleu}


@dataclass
class RunResult:
    name: str
    model: str
    gguf_file: Optional[str]
    template: str
    subsets: Dict[str, SubsetScores] = field(default_factory=dict)
    total: Optional[SubsetScores] = None
    win_tie_lose: Optional[WinTieLose] = None
    generated: int = 0
    reused: int = 0
    run_dir: Optional[Path] = None
    generations_path: Optional[Path] = None
    samples_path: Optional[Path] = None
    samples_jsonl_path: Optional[Path] = None
    mt_bench_path: Optional[Path] = None
    mt_bench_questions: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name, "model": self.model, "gguf_file": self.gguf_file, "template": self.template,
            "subsets": {k: v.to_dict() for k, v in self.subsets.items()},
            "total": self.total.to_dict() if self.total else None,
            "win_tie_lose": self.win_tie_lose.to_dict() if self.win_tie_lose else None,
            "generated": self.generated, "reused": self.reused,
            "files": {k: (str(v) if v is not None else None) for k, v in (
                ("generations", self.generations_path), ("samples", self.samples_path),
                ("samples_jsonl", self.samples_jsonl_path), ("mt_bench_answers", self.mt_bench_path))},
            "mt_bench_questions": self.mt_bench_questions,
        }


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


@dataclass
class EvalReport:
    """What :func:`evaluate` returns (and writes to ``eval.json``)."""

    output_dir: Path
    runs: List[RunResult]
    subsets: List[str]
    reward_model: Optional[Dict[str, Any]]
    settings: Dict[str, Any]
    notes: List[str] = field(default_factory=list)
    eval_json: Optional[Path] = None
    eval_md: Optional[Path] = None
    manifest: Optional[Path] = None
    metrics: Optional[Path] = None

    def _subset_table(self, columns: Sequence[Tuple[str, Callable[[Optional["SubsetScores"]], str]]]) -> Tuple[List[str], List[List[str]]]:
        """Header and one row per run: for each subset, then "Total", one cell
        per ``(label, format)`` column."""
        groups = list(self.subsets) + ["Total"]
        header = ["Model"] + [f"{g} {label}" for g in groups for label, _ in columns]
        rows = [[r.name] + [cell(sc) for sc in [r.subsets.get(s) for s in self.subsets] + [r.total] for _, cell in columns]
                for r in self.runs]
        return header, rows

    def table(self) -> Tuple[List[str], List[List[str]]]:
        """The paper's Table 2 layout: header and one row per run."""
        return self._subset_table([("BLEU", lambda sc: _fmt(sc.bleu if sc else None)),
                                   ("Reward", lambda sc: _fmt(sc.reward if sc else None))])

    def to_markdown(self) -> str:
        lines: List[str] = ["# deft eval", ""]
        if self.subsets:
            rm = self.reward_model or {}
            lines += [f"BLEU: PRO-compatible (NLTK `sentence_bleu` over characters, x100); Reward: 100 * sigmoid(score) of "
                      f"`{rm.get('name', '?')}`; Total: mean over all samples.", ""]
            lines += md_table(*self.table())
            lines += ["", "## Samples and sacreBLEU", ""]
            lines += md_table(*self._subset_table([("n", lambda sc: str(sc.samples) if sc else "-"),
                                                   ("sacreBLEU", lambda sc: _fmt(sc.sacrebleu if sc else None))]))
        wtl = [r for r in self.runs if r.win_tie_lose is not None]
        if wtl:
            lines += ["", f"## Win / tie / lose (judged by the reward model; tie when the rewards differ by at most "
                      f"{_points(wtl[0].win_tie_lose.tie_margin)})", ""]
            h3 = ["Model", "Baseline", "n", "Win", "Tie", "Lose", "Win %", "Tie %", "Lose %"]
            r3 = []
            for r in wtl:
                w = r.win_tie_lose
                assert w is not None
                r3.append([r.name, w.baseline, str(w.n), str(w.win), str(w.tie), str(w.lose),
                           f"{100 * w.win_rate:.1f}", f"{100 * w.tie_rate:.1f}", f"{100 * w.lose_rate:.1f}"])
            lines += md_table(h3, r3, left=2)
        mt = [r for r in self.runs if r.mt_bench_path is not None]
        if mt:
            lines += ["", "## MT-Bench answers (FastChat model_answer format)", ""]
            lines += [f"- {r.name}: {r.mt_bench_questions} questions -> `{r.mt_bench_path}`" for r in mt]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "subsets": self.subsets,
            "reward_model": self.reward_model,
            "settings": self.settings,
            "runs": [r.to_dict() for r in self.runs],
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------
# baselines


@dataclass
class _Baseline:
    label: str
    generations: Dict[str, str]
    contexts: Dict[str, str]  # id -> context key (when known)
    scores: Dict[str, float]  # id -> raw score (when reusable)
    run: Optional[str] = None  # a run of this evaluation
    samples_path: Optional[Path] = None  # samples.parquet of the eval that made it
    scored_by: Optional[Dict[str, Any]] = None  # that eval's reward model identity


def _read_records(path: Path) -> List[Dict[str, Any]]:
    if path.suffix == ".parquet":
        return pl.read_parquet(path).to_dicts()
    return _read_resumable_jsonl(path, "id", ("id", "generation"), repair=False)


def _baseline_from_file(path: Path, label: str) -> _Baseline:
    recs = _read_records(path)
    if not recs:
        raise ValueError(f"baseline {path}: no generations")
    gens: Dict[str, str] = {}
    ctxs: Dict[str, str] = {}
    for i, r in enumerate(recs, start=1):
        for k in ("id", "generation"):
            if k not in r:
                raise DataError(str(path), i, k, "missing required field (a baseline needs id and generation)")
        gens[str(r["id"])] = str(r["generation"])
        c = r.get("context")
        if isinstance(c, str):
            try:
                c = json.loads(c)
            except json.JSONDecodeError:
                c = None
        if isinstance(c, list):
            ctxs[str(r["id"])] = _context_key(c)
    return _Baseline(label, gens, ctxs, {})


def _read_eval_json(path: Path) -> Dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); is it the eval.json of `deft eval`?") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object; is it the eval.json of `deft eval`?")
    return doc


def _resolve_baseline(baseline: PathLike, names: Sequence[str]) -> _Baseline:
    b = str(baseline)
    if b in names:
        return _Baseline(b, {}, {}, {}, run=b)
    p = Path(b).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"baseline {b}: not a model name of this evaluation ({', '.join(names)}) "
                                "nor an existing eval output folder or generations file")
    if p.is_file():
        return _baseline_from_file(p, b)
    run_dir: Optional[Path] = None
    eval_doc: Optional[Dict[str, Any]] = None
    pipeline_run = not (p / "eval.json").is_file() and (p / "eval" / "eval.json").is_file()
    if pipeline_run:  # a `deft run` folder: its eval stage holds the trained model (and "base")
        p = p / "eval"
    if (p / GENERATIONS).is_file():
        run_dir = p
        if (p.parent / "eval.json").is_file():
            eval_doc = _read_eval_json(p.parent / "eval.json")
    elif (p / "eval.json").is_file():
        eval_doc = _read_eval_json(p / "eval.json")
        runs = [r for r in eval_doc.get("runs", []) if (p / r["name"] / GENERATIONS).is_file()]
        if pipeline_run and len(runs) > 1:
            runs = [r for r in runs if r["name"] != "base"]
        if len(runs) != 1:
            opts = ", ".join(str(p / r["name"]) for r in runs) or "none"
            raise ValueError(f"baseline {b}: the eval folder holds {len(runs)} runs with generations; name one of them: {opts}")
        run_dir = p / runs[0]["name"]
    else:
        raise ValueError(f"baseline {b}: a folder without eval.json or {GENERATIONS}; give an eval output folder, a run folder in it, "
                         "a `deft run` folder, or a generations file")
    base = _baseline_from_file(run_dir / GENERATIONS, b)
    if eval_doc is not None and (run_dir / "samples.parquet").is_file():
        base.samples_path = run_dir / "samples.parquet"
        base.scored_by = eval_doc.get("reward_model")
    return base


def _reuse_baseline_scores(base: _Baseline, rm_id: Dict[str, Any]) -> None:
    """Take the baseline's stored scores when they come from the identical
    reward model and belong to the same generation text."""
    if base.samples_path is None or base.scored_by != rm_id:
        return

    df = pl.read_parquet(base.samples_path, columns=["id", "generation", "score"])
    for r in df.iter_rows(named=True):
        if base.generations.get(r["id"]) == r["generation"]:
            base.scores[r["id"]] = float(r["score"])


# ---------------------------------------------------------------------------
# the evaluation


def _as_list(x: Union[None, str, Sequence[Optional[str]]], n: int, what: str) -> List[Optional[str]]:
    if x is None or isinstance(x, (str, os.PathLike)):
        return [str(x) if x is not None else None] * n
    xs = [str(v) if v is not None else None for v in x]
    if len(xs) != n:
        raise ValueError(f"{what}: {len(xs)} values for {n} models")
    return xs


def _check_plan(run_dir: Path, plan: Dict[str, Any], overwrite: bool) -> None:
    path = run_dir / "plan.json"
    if path.exists() and not overwrite:
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            old = {}
        diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        if diff:
            detail = "; ".join(f"{k}: {old.get(k)!r} -> {plan.get(k)!r}" for k in diff)
            raise ValueError(f"{run_dir} holds generations made with other settings ({detail}); "
                             "pass overwrite (--overwrite) to discard them or choose another output folder")
    if overwrite:
        for name in (GENERATIONS, "samples.parquet", "samples.jsonl"):
            (run_dir / name).unlink(missing_ok=True)
    write_json_atomic(path, plan)


@locked_output("eval", "output_dir")
def evaluate(
    models: Sequence[str],
    data: Sequence[PathLike],
    output_dir: PathLike,
    *,
    reward_model: Any = "builtin",
    reward_template: str = "auto",
    reward_max_length: int = 1024,
    reward_batch_size: Optional[int] = None,
    template: str = "auto",
    baseline: Optional[PathLike] = None,
    max_new_tokens: int = 128,
    max_prompt_length: int = 384,
    batch_size: int = 8,
    limit: Optional[int] = None,
    tie_margin: float = DEFAULT_TIE_MARGIN,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    gguf_file: Union[None, str, Sequence[Optional[str]]] = None,
    tokenizer: Union[None, str, Sequence[Optional[str]]] = None,
    model_names: Optional[Sequence[str]] = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    mt_bench_max_new_tokens: int = 1024,
    mt_bench_max_prompt_length: int = 2048,
    overwrite: bool = False,
    progress: bool = True,
) -> EvalReport:
    """Evaluate ``models`` on ``data`` into ``output_dir``; see the module docstring.

    ``models``: local model folders or hub ids (run names from
    :func:`default_model_name`, or ``model_names``); ``gguf_file`` and
    ``tokenizer`` apply to every model, or give one value (or None) per model.
    ``reward_model``: ``"builtin"``, a hub id / local folder of a
    sequence-classification RM (``reward_template``: auto, oasst, chat,
    plain), or a loaded :class:`deft.score.RewardModel`. ``baseline``: a name in
    ``model_names``, an eval output folder, a run folder or a generations file.
    ``allow_pickle``: load policies whose weights are only pickles
    (``pytorch_model.bin``; refused by default, as they can run code when
    loaded). A rerun with the same arguments resumes; ``overwrite`` discards stored
    generations. Returns an :class:`EvalReport` (files written: ``eval_json``,
    ``eval_md``, ``manifest``, ``metrics`` and per run the paths in
    :class:`RunResult`).
    """
    models, data_paths, ggufs, toks, names = _check_arguments(
        models, data, gguf_file=gguf_file, tokenizer=tokenizer, model_names=model_names, limit=limit, tie_margin=tie_margin,
        sizes={"max_new_tokens": max_new_tokens, "max_prompt_length": max_prompt_length, "batch_size": batch_size,
               "mt_bench_max_new_tokens": mt_bench_max_new_tokens, "mt_bench_max_prompt_length": mt_bench_max_prompt_length})
    dev = resolve_device(device)
    dt_name = resolve_dtype(dtype, dev)
    samples, questions, subsets = _load_eval_data(data_paths, limit)
    base = _check_baseline(baseline, names, samples) if baseline is not None and samples else None  # before any generation

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl")
    notes: List[str] = []
    gen = _GenSettings(template=template, max_new_tokens=max_new_tokens, max_prompt_length=max_prompt_length,
                       mt_bench_max_new_tokens=mt_bench_max_new_tokens, mt_bench_max_prompt_length=mt_bench_max_prompt_length,
                       batch_size=batch_size, device=dev, dtype=dt_name, trust_remote_code=trust_remote_code,
                       allow_pickle=allow_pickle, overwrite=overwrite, progress=progress)

    # ---- generation, one model at a time
    runs: List[RunResult] = []
    run_records: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for spec, name, gguf, tok_spec in zip(models, names, ggufs, toks):
        result, run_records[name] = _generate_run(spec, name, gguf, tok_spec, out, samples, questions, gen, metrics)
        runs.append(result)

    # ---- reward, BLEU, baseline; publication: samples files, eval.json, eval.md, then manifest.json (the commit record)
    pub = begin_publication(out / "manifest.json", [out / "eval.json", out / "eval.md"], overwrite=True)
    rm_id: Optional[Dict[str, Any]] = None
    rm_spec: Optional[str] = None
    if samples:
        rm_id, rm_spec = _score_runs(runs, run_records, samples, subsets, base, notes, reward_model=reward_model,
                                     reward_template=reward_template, reward_max_length=reward_max_length,
                                     reward_batch_size=reward_batch_size, tie_margin=tie_margin, device=dev,
                                     trust_remote_code=trust_remote_code, progress=progress, metrics=metrics)
    elif baseline is not None:
        notes.append("baseline ignored: MT-Bench answers are not scored here")

    settings = {"template": template, "max_new_tokens": max_new_tokens, "max_prompt_length": max_prompt_length,
                "batch_size": batch_size, "limit": limit, "tie_margin": tie_margin, "device": dev, "dtype": dt_name,
                "decoding": "greedy", "data": [str(p) for p in data_paths], "baseline": str(baseline) if baseline is not None else None,
                "mt_bench_max_new_tokens": mt_bench_max_new_tokens, "mt_bench_max_prompt_length": mt_bench_max_prompt_length,
                "reward_template": reward_template, "reward_max_length": reward_max_length,
                "bleu": "pro: nltk sentence_bleu([reference.strip()], generation.strip()) over characters, x100, mean over samples",
                "sacrebleu_signature": sacrebleu_signature() if samples else None}
    report = EvalReport(out, runs, subsets, rm_id, settings, notes)
    doc = report.to_dict()
    report.eval_json = write_json_atomic(out / "eval.json", doc)
    report.eval_md = write_text_atomic(out / "eval.md", report.to_markdown())
    report.metrics = out / "metrics.jsonl"
    inputs = [input_record(p) for p in data_paths]
    if baseline is not None and base is not None and base.run is None:
        bp = Path(str(baseline))
        inputs.append({"baseline": str(bp), **(input_record(bp) if bp.is_file() else {})})
    report.manifest = write_manifest(
        out / "manifest.json", stage="eval", inputs=inputs,
        parameters={**settings, "models": models, "model_names": names, "gguf_file": ggufs, "tokenizer": toks,
                    "reward_model": rm_spec},
        outputs={"eval_json": str(report.eval_json), "eval_md": str(report.eval_md), "metrics": str(report.metrics),
                 "runs": {r.name: r.to_dict()["files"] for r in runs}},
        reward_model=rm_id, runs=[{"name": n, "model": m, "fingerprint": weights_stat_fingerprint(m, g)} for n, m, g in zip(names, models, ggufs)],
    )
    pub.done()
    if samples:
        _update_model_cards(runs, doc, report.eval_json)
    return report


def _update_model_cards(runs: Sequence[RunResult], doc: Mapping[str, Any], eval_json: Path) -> None:
    """Put each run's results into the model card of the folder it evaluated,
    when that folder holds one `deft train` wrote (:func:`deft.model_card.update_card_eval`);
    a card that cannot be updated is a warning (the evaluation is published)."""
    for r in runs:
        if not Path(r.model).expanduser().is_dir():
            continue
        try:
            card = update_card_eval(Path(r.model).expanduser(), doc, r.name, eval_json)
        except (OSError, ValueError) as e:
            _log(f"warning: the model card of {r.model} was not updated: {e}")
            continue
        if card is not None:
            _log(f"{r.name}: evaluation results written to the model card {card}")


def _check_arguments(models: Any, data: Any, *, gguf_file: Any, tokenizer: Any, model_names: Optional[Sequence[str]],
                     limit: Optional[int], tie_margin: float, sizes: Mapping[str, Any]
                     ) -> Tuple[List[str], List[Path], List[Optional[str]], List[Optional[str]], List[str]]:
    """``evaluate``'s arguments checked: the models, data files, per-model
    GGUF files, tokenizers and run names."""
    models = [str(models)] if isinstance(models, (str, os.PathLike)) else [str(m) for m in models]
    data = [data] if isinstance(data, (str, os.PathLike)) else data
    if not models:
        raise ValueError("no model given: pass at least one model folder or hub id (--model PATH)")
    data_paths = [Path(d) for d in data]
    if not data_paths:
        raise ValueError("no data given: pass at least one test file (--data FILE)")
    for p in data_paths:
        if not p.exists():
            raise FileNotFoundError(2, "data file not found", str(p))
    for name, v in sizes.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if not (tie_margin >= 0 and math.isfinite(tie_margin)):
        raise ValueError(f"tie_margin must be a finite number >= 0, got {tie_margin}")
    ggufs = _as_list(gguf_file, len(models), "gguf_file")
    toks = _as_list(tokenizer, len(models), "tokenizer")
    names = list(model_names) if model_names is not None else [default_model_name(m) for m in models]
    if len(names) != len(models):
        raise ValueError(f"model_names: {len(names)} names for {len(models)} models")
    for n in names:
        if not _NAME_RE.match(n) or n in ("mt_bench",):
            raise ValueError(f"model name {n!r}: use letters, digits, '.', '_', '+', '-' (it names a folder), and not 'mt_bench'")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"several models would be named {', '.join(dups)}; give distinct names (model_names / --name)")
    for m, g in zip(models, ggufs):
        _check_model_spec(m, g)
    return models, data_paths, ggufs, toks, names


def _load_eval_data(data_paths: Sequence[Path], limit: Optional[int]) -> Tuple[List[_Sample], List[MTBenchQuestion], List[str]]:
    """The preference samples, the MT-Bench questions and the subsets in order of appearance."""
    mt_files = [p for p in data_paths if is_mt_bench_file(p)]
    pref_files = [p for p in data_paths if p not in mt_files]
    samples: List[_Sample] = []
    if pref_files:
        samples, _ = _load_samples(pref_files, limit)
        if not samples:
            raise ValueError(f"no samples in {', '.join(map(str, pref_files))}")
    questions: List[MTBenchQuestion] = []
    for p in mt_files:
        questions += load_mt_bench(p, limit=limit)
    if len({q.question_id for q in questions}) != len(questions):
        raise ValueError("MT-Bench question ids repeat across the question files")
    subsets: List[str] = []
    for s in samples:
        if s.subset not in subsets:
            subsets.append(s.subset)
    return samples, questions, subsets


def _check_baseline(baseline: PathLike, names: Sequence[str], samples: Sequence[_Sample]) -> _Baseline:
    """The baseline resolved and checked against the evaluated prompts, so that
    a bad one fails before any generation."""
    base = _resolve_baseline(baseline, names)
    if base.run is None:
        ids = {s.id for s in samples}
        if not ids & base.generations.keys():
            raise ValueError(f"baseline {base.label}: none of its {len(base.generations)} ids is among the {len(ids)} "
                             f"evaluated prompts (e.g. {next(iter(base.generations))!r} vs {samples[0].id!r})")
        for s in samples:
            known = base.contexts.get(s.id)
            if known is not None and known != s.context_key:
                raise ValueError(f"baseline {base.label}: id {s.id!r} has a different conversation than in the test data; "
                                 "the baseline was generated on other data")
    return base


@dataclass(frozen=True)
class _GenSettings:
    """How every model is prompted and decoded (the same for all runs)."""

    template: str
    max_new_tokens: int
    max_prompt_length: int
    mt_bench_max_new_tokens: int
    mt_bench_max_prompt_length: int
    batch_size: int
    device: str
    dtype: str
    trust_remote_code: bool
    allow_pickle: bool
    overwrite: bool
    progress: bool


def _generate_run(spec: str, name: str, gguf: Optional[str], tok_spec: Optional[str], out: Path, samples: Sequence[_Sample],
                  questions: Sequence[MTBenchQuestion], gen: _GenSettings, metrics: Any
                  ) -> Tuple[RunResult, Dict[str, Dict[str, Any]]]:
    """Generate (or resume) one model's answers into ``out/name``: its
    generations of every sample (returned by id) and its MT-Bench answers."""
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)

    remove_stale_temporaries(run_dir)  # of writes a killed run did not finish (plan.json, samples)
    hf_tok = _load_tokenizer(spec, tokenizer=tok_spec, gguf_file=gguf, trust_remote_code=gen.trust_remote_code)
    tmpl = resolve_model_template(gen.template, spec, hf_tok)
    plan = {"version": PLAN_VERSION, "model": spec, "fingerprint": weights_stat_fingerprint(spec, gguf), "tokenizer": tok_spec,
            "template": tmpl, "max_new_tokens": gen.max_new_tokens, "max_prompt_length": gen.max_prompt_length,
            "mt_bench_max_new_tokens": gen.mt_bench_max_new_tokens, "mt_bench_max_prompt_length": gen.mt_bench_max_prompt_length,
            "dtype": gen.dtype, "decoding": "greedy", "cut": "pro-v1"}
    lead = prompt_lead_ids(tmpl, hf_tok)
    if lead:  # a BOS before every prompt (recorded only then: earlier plans without one stay valid)
        plan["lead_ids"] = list(lead)
    _check_plan(run_dir, plan, gen.overwrite)
    mt_path = out / "mt_bench" / "model_answer" / f"{name}.jsonl"
    remove_stale_temporaries(mt_path.parent)
    if gen.overwrite:
        mt_path.unlink(missing_ok=True)
    prompts = [render_prompt(s.context, tmpl, hf_tok) for s in samples]
    gen_path = run_dir / GENERATIONS
    existing = _read_resumable_jsonl(gen_path, "id", ("id", "prompt", "generation"))
    by_id = {s.id: (i, s) for i, s in enumerate(samples)}
    done: Dict[str, Dict[str, Any]] = {}
    for rec in existing:
        hit = by_id.get(str(rec["id"]))
        if hit is None:
            continue  # e.g. from a run with a larger limit: kept in the file, not used
        i, s = hit
        if rec["prompt"] != prompts[i]:
            raise ValueError(f"{gen_path}: id {rec['id']!r} was generated for a different prompt than the data now renders; "
                             "the data changed: pass overwrite (--overwrite) or use another output folder")
        done[s.id] = rec
    pending = [i for i, s in enumerate(samples) if s.id not in done]
    mt_done = {r["question_id"] for r in _read_resumable_jsonl(mt_path, "question_id", ("question_id", "choices"))} if questions else set()
    mt_pending = [q for q in questions if q.question_id not in mt_done]
    result = RunResult(name=name, model=spec, gguf_file=gguf, template=tmpl, run_dir=run_dir,
                       generations_path=gen_path if samples else None, reused=len(done))
    if pending or mt_pending:
        if done:
            _log(f"{name}: resuming; {len(done)} of {len(samples)} generations already in {gen_path}")
        lm, hf_tok = load_policy(spec, gguf_file=gguf, tokenizer=tok_spec, device=gen.device, dtype=gen.dtype,
                                 trust_remote_code=gen.trust_remote_code, allow_pickle=gen.allow_pickle)
        try:
            if pending:
                app = _Appender(gen_path)

                def on_batch(idx: List[int], gens: List[str], raw: List[str]) -> None:
                    recs = []
                    for j, g, r in zip(idx, gens, raw):
                        s = samples[pending[j]]
                        rec = {"id": s.id, "subset": s.subset, "prompt": prompts[pending[j]], "generation": g,
                               "raw_generation": r, "context": s.context}
                        done[s.id] = rec
                        recs.append(rec)
                    app.write(recs)

                try:
                    generate(lm, hf_tok, [prompts[i] for i in pending], max_new_tokens=gen.max_new_tokens,
                             max_prompt_length=gen.max_prompt_length, batch_size=gen.batch_size, progress=gen.progress,
                             on_batch=on_batch, metrics=metrics, description=name, lead_ids=lead)
                finally:
                    app.close()
                result.generated = len(pending)
            if questions:
                write_mt_bench_answers(questions, mt_path, model=lm, tokenizer=hf_tok, model_id=name, template=tmpl,
                                       max_new_tokens=gen.mt_bench_max_new_tokens, max_prompt_length=gen.mt_bench_max_prompt_length,
                                       batch_size=gen.batch_size, progress=gen.progress, metrics=metrics)
        finally:
            del lm
            gc.collect()
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except ImportError:  # pragma: no cover
                pass
    elif questions:  # all answered: re-sort only
        write_mt_bench_answers(questions, mt_path, model=None, tokenizer=hf_tok, model_id=name, template=tmpl)
    if questions:
        result.mt_bench_path = mt_path
        result.mt_bench_questions = len(questions)
    return result, done


def _score_runs(runs: Sequence[RunResult], run_records: Mapping[str, Mapping[str, Mapping[str, Any]]], samples: Sequence[_Sample],
                subsets: Sequence[str], base: Optional[_Baseline], notes: List[str], *, reward_model: Any, reward_template: str,
                reward_max_length: int, reward_batch_size: Optional[int], tie_margin: float, device: str,
                trust_remote_code: bool, progress: bool, metrics: Any) -> Tuple[Dict[str, Any], str]:
    """Score every run's generations (and the baseline's) with the reward
    model, then each run's metrics and samples files; returns the reward
    model's identity and the name it was given by."""
    if isinstance(reward_model, str):
        rm = load_reward_model(reward_model, template=reward_template, max_length=reward_max_length, device=device,
                               trust_remote_code=trust_remote_code)
        rm_spec = reward_model
    else:
        rm = reward_model
        rm_spec = str(getattr(rm, "name", type(rm).__name__))
    rm_id = rm_identity(rm)
    if base is not None:
        _reuse_baseline_scores(base, rm_id)
    ctxs = [s.context for s in samples]
    all_scores: Dict[str, np.ndarray] = {}
    for r in runs:
        gens = [run_records[r.name][s.id]["generation"] for s in samples]
        all_scores[r.name] = score_responses(rm, ctxs, gens, batch_size=reward_batch_size, progress=progress, metrics=metrics,
                                             description=f"{r.name}/reward")
    base_gens: Dict[str, str] = {}
    base_rewards: Dict[str, float] = {}
    if base is not None:
        base_gens, base_rewards = _baseline_rewards(base, samples, run_records, all_scores, rm, notes,
                                                    batch_size=reward_batch_size, progress=progress, metrics=metrics)
    for r in runs:
        _score_run(r, samples, subsets, run_records[r.name], all_scores[r.name], base, base_gens, base_rewards,
                   tie_margin=tie_margin, metrics=metrics)
    del rm
    gc.collect()
    return rm_id, rm_spec


def _baseline_rewards(base: _Baseline, samples: Sequence[_Sample], run_records: Mapping[str, Mapping[str, Mapping[str, Any]]],
                      all_scores: Mapping[str, np.ndarray], rm: Any, notes: List[str], *, batch_size: Optional[int],
                      progress: bool, metrics: Any) -> Tuple[Dict[str, str], Dict[str, float]]:
    """The baseline's generation and reward (0-100) per prompt id: one of this
    evaluation's runs, or a stored baseline (scored now where its scores are
    not reusable). Prompts the two do not share go into ``notes``."""
    if base.run is not None:
        base_gens = {s.id: run_records[base.run][s.id]["generation"] for s in samples}
        return base_gens, dict(zip((s.id for s in samples), reward_100(all_scores[base.run]).tolist()))
    by_id = {s.id: s for s in samples}
    common = [s for s in samples if s.id in base.generations]
    for s in common:
        known = base.contexts.get(s.id)
        if known is not None and known != s.context_key:
            raise ValueError(f"baseline {base.label}: id {s.id!r} has a different conversation than in the test data; "
                             "the baseline was generated on other data")
    need = [s for s in common if s.id not in base.scores]
    if need:
        sc = score_responses(rm, [s.context for s in need], [base.generations[s.id] for s in need],
                             batch_size=batch_size, progress=progress, metrics=metrics, description="baseline/reward")
        base.scores.update(zip((s.id for s in need), sc.tolist()))
    base_gens = {s.id: base.generations[s.id] for s in common}
    base_rewards = {k: float(reward_100(np.array([base.scores[k]]))[0]) for k in base_gens}
    extra = len(set(base.generations) - set(by_id))
    missing = len(samples) - len(common)
    if extra or missing:
        notes.append(f"baseline {base.label}: compared on the {len(common)} prompts both have "
                     f"({missing} evaluated prompts missing from the baseline, {extra} baseline prompts not evaluated)")
        _log(notes[-1])
    return base_gens, base_rewards


def _score_run(r: RunResult, samples: Sequence[_Sample], subsets: Sequence[str], records: Mapping[str, Mapping[str, Any]],
               scores: np.ndarray, base: Optional[_Baseline], base_gens: Mapping[str, str], base_rewards: Mapping[str, float],
               *, tie_margin: float, metrics: Any) -> None:
    """One run's BLEU and reward per subset and in total, its win/tie/lose
    against the baseline, and its samples files (``r`` is filled in)."""
    gens = [records[s.id]["generation"] for s in samples]
    refs = [s.reference for s in samples]
    rewards = reward_100(scores)
    bleus = np.array([100.0 * pro_bleu(ref.strip(), g.strip()) for ref, g in zip(refs, gens)], dtype=np.float64)
    for sub in subsets:
        m = [i for i, s in enumerate(samples) if s.subset == sub]
        r.subsets[sub] = SubsetScores(len(m), float(bleus[m].mean()), float(rewards[m].mean()),
                                      sacre_bleu([gens[i] for i in m], [refs[i] for i in m]))
    r.total = SubsetScores(len(samples), float(bleus.mean()), float(rewards.mean()), sacre_bleu(gens, refs))
    outcome: List[Optional[str]] = [None] * len(samples)
    b_rew: List[Optional[float]] = [None] * len(samples)
    if base is not None and base.run != r.name:
        mine = {s.id: float(x) for s, x in zip(samples, rewards)}
        ident = [s.id for s, g in zip(samples, gens) if base_gens.get(s.id) == g]
        r.win_tie_lose = win_tie_lose(mine, base_rewards, tie_margin=tie_margin, identical=ident, baseline=base.label)
        if base.run is None:  # base_rewards holds the shared prompts only
            r.win_tie_lose.only_in_baseline = len(set(base.generations) - set(mine))
        ident_set = set(ident)
        for i, s in enumerate(samples):
            if s.id in base_rewards:
                b_rew[i] = base_rewards[s.id]
                d = mine[s.id] - base_rewards[s.id]
                outcome[i] = "tie" if s.id in ident_set or abs(d) <= tie_margin else ("win" if d > 0 else "lose")
    r.samples_path, r.samples_jsonl_path = _write_samples(
        r.run_dir, samples, [records[s.id]["prompt"] for s in samples], gens, scores, rewards, bleus,
        b_rew if base is not None else None, outcome if base is not None else None)
    metrics.log(event="result", run=r.name, **{f"{k}_{m}": v for k, sc in
                                                list(r.subsets.items()) + [("total", r.total)]
                                                for m, v in sc.to_dict().items()})


def _write_samples(run_dir: Optional[Path], samples: Sequence[_Sample], prompts: Sequence[str], gens: Sequence[str],
                   scores: np.ndarray, rewards: np.ndarray, bleus: np.ndarray, base_rewards: Optional[List[Optional[float]]],
                   outcome: Optional[List[Optional[str]]]) -> Tuple[Path, Path]:
    assert run_dir is not None
    cols: Dict[str, Any] = {
        "id": [s.id for s in samples], "subset": [s.subset for s in samples],
        "context": [s.context_key for s in samples], "prompt": list(prompts), "generation": list(gens),
        "reference": [s.reference for s in samples], "score": scores.tolist(), "reward": rewards.tolist(),
        "bleu": bleus.tolist(),
    }
    schema: Dict[str, Any] = {k: pl.Utf8 for k in ("id", "subset", "context", "prompt", "generation", "reference")}
    schema.update({"score": pl.Float64, "reward": pl.Float64, "bleu": pl.Float64})
    if base_rewards is not None and outcome is not None:
        cols["baseline_reward"] = base_rewards
        cols["outcome"] = outcome
        schema.update({"baseline_reward": pl.Float64, "outcome": pl.Utf8})
    df = pl.DataFrame(cols, schema=schema)
    pq = run_dir / "samples.parquet"
    with atomic_path(pq) as tmp:
        df.write_parquet(tmp)
    js = run_dir / "samples.jsonl"
    write_text_atomic(js, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in df.to_dicts()))
    return pq, js
