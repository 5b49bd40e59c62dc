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
3. **Generation** (:func:`generate`): greedy (``do_sample=False``,
   ``num_beams=1``), ``max_new_tokens`` (128), batches of ``batch_size``
   prompts of similar length, padded on the *left* with an attention mask (so
   a batched greedy output is the unbatched one), bf16 on CUDA and fp32 on
   CPU, ``torch.inference_mode``; a CUDA out-of-memory error halves the batch.
   The new tokens are decoded (special tokens skipped) up to the first EOS,
   and the text is cut as the PRO evaluation cuts it (:func:`cut_generation`):
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
6. **BLEU**: (a) PRO-compatible (:func:`pro_bleu`): NLTK's
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
files except the append-only generations are written atomically.
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
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np
import polars as pl

# Imported inside the functions that use them, on purpose: torch, transformers, sacrebleu and tqdm;
# importing deft stays fast.
from deft._hf import (
    load_causal_lm, load_tokenizer, resolve_device, resolve_dtype, split_on_oom, weights_stat_fingerprint,
)
from deft._native import Tokenizer
from deft._util import chars_per_token, md_table, tokenize_clipped
from deft.data import DataError, load_many
from deft.errors import UnsafeWeightsError
from deft.io import (
    MetricsLog, atomic_path, begin_publication, input_record, locked_output, remove_stale_temporaries,
    write_json_atomic, write_manifest, write_text_atomic,
)
from deft.render import render_prompt, resolve_model_template
from deft.score import CPU_BATCH_TOKENS, load_reward_model, plan_batches, score_with_split

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


#: Tie margin of :func:`win_tie_lose`, in reward points (0-100 scale).
DEFAULT_TIE_MARGIN = 1.0
#: Plan keys whose change invalidates stored generations.
PLAN_VERSION = 1
GENERATIONS = "generations.jsonl"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
#: The turn markers the PRO evaluation cuts generations at, matched in any case.
_MARKER_RE = re.compile(r"human:|assistant:", re.IGNORECASE)
#: New tokens decoded per step by the marker stopping criterion.
_STOP_WINDOW = 16


def _log(msg: str) -> None:
    print(f"[deft eval] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# text post-processing and BLEU


def cut_generation(text: str) -> str:
    """Post-process a decoded generation as the PRO HH evaluation does: strip,
    cut before the first ``Human:`` / ``Assistant:`` (any case: the model
    starting the next dialogue turn), right-strip.

    PRO (``eval_hh/infer_func_now.py``) cuts at ``Human:``, ``human:``,
    ``Assistant:`` and ``assistant:`` in turn, keeping the text before the
    first occurrence of each: the result is the text before the earliest of
    them, which is what this does (also for e.g. ``HUMAN:``)."""
    text = text.strip()
    m = _MARKER_RE.search(text)
    if m is not None:
        text = text[: m.start()].rstrip()
    return text


def _char_ngrams(s: str, n: int) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for i in range(len(s) - n + 1):
        g = s[i:i + n]
        out[g] = out.get(g, 0) + 1
    return out


def pro_bleu(reference: Union[str, Sequence[str]], hypothesis: str) -> float:
    """BLEU exactly as PRO/DEFT report it: ``nltk.translate.bleu_score.sentence_bleu([reference], hypothesis)``
    with NLTK's defaults (uniform weights ``(0.25,) * 4``, no smoothing), in
    pure Python. Returns a value in [0, 1] (the evaluation reports it x 100).

    PRO passes the **raw strings**, not token lists, and NLTK iterates over
    whatever it is given, so this BLEU is computed over **characters**: the
    n-grams are character n-grams (spaces included) and the lengths in the
    brevity penalty are character counts. This function reproduces NLTK
    (3.x, ``corpus_bleu`` with one hypothesis) operation for operation:

    * modified precision ``p_n`` = clipped n-gram matches / hypothesis n-grams,
      the denominator at least 1 (a hypothesis shorter than ``n`` gives 0/1);
    * when there is no unigram match at all the result is exactly 0;
    * "no smoothing" (``SmoothingFunction().method0``) replaces a zero
      precision by ``sys.float_info.min``, so a hypothesis with unigram matches
      but no 4-gram match scores a tiny positive number (about 1e-77 or less),
      not 0;
    * brevity penalty with the *closest* reference length (ties: the shorter
      reference): 1 when the hypothesis is longer, 0 when it is empty, else
      ``exp(1 - r / c)``;
    * ``BLEU = BP * exp(fsum(0.25 * log(p_n)))``.

    ``reference`` is one reference string, or a sequence of them (as NLTK's
    list of references). The evaluation calls it as PRO's ``get_bleu`` does,
    on ``reference.strip()`` and ``generation.strip()``.
    """
    refs: List[str] = [reference] if isinstance(reference, str) else list(reference)
    if not refs:
        raise ValueError("pro_bleu needs at least one reference")
    for r in refs:
        if not isinstance(r, str):
            raise TypeError(f"references must be strings, got {type(r).__name__}")
    if not isinstance(hypothesis, str):
        raise TypeError(f"hypothesis must be a string, got {type(hypothesis).__name__}")
    numerators: List[int] = []
    denominators: List[int] = []
    for n in range(1, 5):
        counts = _char_ngrams(hypothesis, n) if len(hypothesis) >= n else {}
        max_counts: Dict[str, int] = {}
        for ref in refs:
            ref_counts = _char_ngrams(ref, n) if len(ref) >= n else {}
            for g in counts:
                max_counts[g] = max(max_counts.get(g, 0), ref_counts.get(g, 0))
        numerators.append(sum(min(c, max_counts[g]) for g, c in counts.items()))
        denominators.append(max(1, sum(counts.values())))
    hyp_len = len(hypothesis)
    ref_len = min((len(r) for r in refs), key=lambda rl: (abs(rl - hyp_len), rl))
    if hyp_len > ref_len:
        bp = 1.0
    elif hyp_len == 0:
        bp = 0.0
    else:
        bp = math.exp(1 - ref_len / hyp_len)
    if numerators[0] == 0:
        return 0.0
    p_n = [num / den if num != 0 else sys.float_info.min for num, den in zip(numerators, denominators)]
    s = math.fsum(0.25 * math.log(p) for p in p_n if p > 0)
    return float(bp * math.exp(s))


def sacre_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU corpus BLEU (0-100; default 13a tokenisation, exp smoothing
    off as in sacreBLEU's defaults) of ``hypotheses`` against one reference
    each."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return float("nan")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def _sacrebleu_signature() -> str:
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    bleu.corpus_score(["a"], [["a"]])  # the signature needs the number of references
    return str(bleu.get_signature())


# ---------------------------------------------------------------------------
# win / tie / lose


@dataclass
class WinTieLose:
    """Outcome counts of a run against a baseline on their common prompts."""

    baseline: str
    win: int
    tie: int
    lose: int
    tie_margin: float
    only_in_run: int = 0
    only_in_baseline: int = 0

    @property
    def n(self) -> int:
        return self.win + self.tie + self.lose

    @property
    def win_rate(self) -> float:
        return self.win / self.n if self.n else float("nan")

    @property
    def tie_rate(self) -> float:
        return self.tie / self.n if self.n else float("nan")

    @property
    def lose_rate(self) -> float:
        return self.lose / self.n if self.n else float("nan")

    def to_dict(self) -> Dict[str, Any]:
        return {"baseline": self.baseline, "n": self.n, "win": self.win, "tie": self.tie, "lose": self.lose,
                "win_rate": self.win_rate, "tie_rate": self.tie_rate, "lose_rate": self.lose_rate,
                "tie_margin": self.tie_margin, "only_in_run": self.only_in_run, "only_in_baseline": self.only_in_baseline}


def win_tie_lose(
    rewards: Mapping[str, float],
    baseline_rewards: Mapping[str, float],
    *,
    tie_margin: float = DEFAULT_TIE_MARGIN,
    identical: Iterable[str] = (),
    baseline: str = "baseline",
) -> WinTieLose:
    """Compare per-prompt rewards (id -> reward, 0-100 scale) of a run with a
    baseline's on the ids both have: win when ``reward - baseline > tie_margin``,
    lose when ``< -tie_margin``, else tie; ids in ``identical`` (the two
    generations are the same text) always tie. Ids in only one of them are
    counted in ``only_in_run`` / ``only_in_baseline`` and otherwise ignored;
    no common id is a ValueError."""
    if not (tie_margin >= 0 and math.isfinite(tie_margin)):
        raise ValueError(f"tie_margin must be a finite number >= 0, got {tie_margin}")
    same = set(identical)
    common = [k for k in rewards if k in baseline_rewards]
    if not common:
        raise ValueError(f"no prompt in common with baseline {baseline} ({len(rewards)} run ids, {len(baseline_rewards)} baseline ids)")
    win = tie = lose = 0
    for k in common:
        d = float(rewards[k]) - float(baseline_rewards[k])
        if k in same or abs(d) <= tie_margin:
            tie += 1
        elif d > 0:
            win += 1
        else:
            lose += 1
    return WinTieLose(baseline=baseline, win=win, tie=tie, lose=lose, tie_margin=float(tie_margin),
                      only_in_run=len(rewards) - len(common), only_in_baseline=len(baseline_rewards) - len(common))


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
        elif not (p / "config.json").is_file():
            raise FileNotFoundError(f"model {spec}: the folder has no config.json; is it a Hugging Face model folder (save_pretrained)?")
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
# generation


_ENCODERS: "weakref.WeakKeyDictionary[Any, Callable[[Sequence[str], int], List[List[int]]]]" = weakref.WeakKeyDictionary()


def _encoder(tokenizer: Any) -> Callable[[Sequence[str], int], List[List[int]]]:
    """Prompt encoder matching the trainer's: the native encoder over the
    tokenizer's tokenizer.json (no special tokens, left truncation); the
    tokenizer itself when it is not a fast tokenizer. Cached per tokenizer."""
    try:
        return _ENCODERS[tokenizer]
    except (KeyError, TypeError):
        pass
    enc = _make_encoder(tokenizer)
    try:
        _ENCODERS[tokenizer] = enc
    except TypeError:  # not weak-referenceable
        pass
    return enc


def _make_encoder(tokenizer: Any) -> Callable[[Sequence[str], int], List[List[int]]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        native = Tokenizer.from_str(backend.to_str())
        cpt = chars_per_token(native)

        def tokenize(texts: List[str]) -> List[Any]:
            ids, off = native.encode(texts, add_special_tokens=False)
            ids = ids.astype(np.int64)
            return [ids[off[i]:off[i + 1]] for i in range(len(texts))]

        def enc(texts: Sequence[str], max_len: int) -> List[List[int]]:
            # a huge prompt is cut to what its last max_len tokens need first (same tokens)
            return [x[len(x) - max_len:].tolist() if len(x) > max_len else x.tolist()
                    for x in tokenize_clipped(tokenize, list(texts), max_len, "left", cpt)]

        return enc

    def enc_hf(texts: Sequence[str], max_len: int) -> List[List[int]]:
        def tokenize(batch: List[str]) -> List[Any]:
            return tokenizer(batch, add_special_tokens=False)["input_ids"]

        return [list(x)[-max_len:] for x in tokenize_clipped(tokenize, list(texts), max_len, "left", chars_per_token(tokenizer))]

    return enc_hf


def _eos_ids(model: Any, tokenizer: Any) -> List[int]:
    ids: List[int] = []
    gc_ = getattr(model, "generation_config", None)
    cand = getattr(gc_, "eos_token_id", None) if gc_ is not None else None
    for x in ([cand] if isinstance(cand, int) else list(cand or [])) + [getattr(tokenizer, "eos_token_id", None)]:
        if isinstance(x, int) and x not in ids:
            ids.append(x)
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer has an EOS token id")
    return ids



def _marker_stop(tokenizer: Any, prompt_len: int):
    import torch
    from transformers import StoppingCriteria

    class MarkerStop(StoppingCriteria):
        """Per row: stop once the new text holds a turn marker. Checked at
        every step over the last :data:`_STOP_WINDOW` new tokens, which hold
        any marker completed by the newest token (markers are a few tokens)."""

        def __init__(self) -> None:
            self.hit: Optional[Any] = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.hit is None:
                self.hit = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            window = input_ids[:, max(prompt_len, input_ids.shape[1] - _STOP_WINDOW):].cpu().tolist()
            for i, row in enumerate(window):
                if not self.hit[i] and _MARKER_RE.search(tokenizer.decode(row, skip_special_tokens=True)):
                    self.hit[i] = True
            return self.hit.to(input_ids.device)

    return MarkerStop()


def _step_ticker(on_step: Callable[[], None]):
    """A stopping criterion that never stops: it calls ``on_step()`` after every
    decoding step (progress within a batch)."""
    import torch
    from transformers import StoppingCriteria

    class Ticker(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            on_step()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return Ticker()


def _generate_batch(model, tokenizer, batch: List[List[int]], *, pad_id: int, eos: List[int], max_new_tokens: int,
                    stop_at_markers: bool, on_step: Optional[Callable[[], None]] = None) -> List[List[int]]:
    """Greedy continuation ids of one left-padded batch, halving the batch on
    a CUDA out-of-memory error. ``on_step()`` is called after each decoding step."""
    def run(b: List[List[int]]) -> List[List[int]]:
        return _generate_once(model, tokenizer, b, pad_id=pad_id, eos=eos, max_new_tokens=max_new_tokens,
                              stop_at_markers=stop_at_markers, on_step=on_step)

    return split_on_oom(run, batch, combine=lambda a, b: a + b, on_split=lambda n, half: _log(
        f"out of memory generating a batch of {n}; retrying as {half} + {n - half}"))


def _generate_once(model, tokenizer, batch: List[List[int]], *, pad_id: int, eos: List[int], max_new_tokens: int,
                   stop_at_markers: bool, on_step: Optional[Callable[[], None]] = None) -> List[List[int]]:
    """Greedy continuation ids of one left-padded batch."""
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    device = next(model.parameters()).device
    T = max(len(x) for x in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, T - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, T - len(x):] = 1
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
                           eos_token_id=eos if len(eos) > 1 else eos[0])
    crit = StoppingCriteriaList([_marker_stop(tokenizer, T)] if stop_at_markers else [])
    if on_step is not None:
        crit.append(_step_ticker(on_step))
    # generate() fills every field `cfg` leaves unset from the model's own generation_config.json
    # (repetition_penalty, no_repeat_ngram_size, suppress_tokens, ...): swap in a blank one so the
    # decoding is plain greedy whatever the model ships
    saved = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    try:
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=cfg,
                                 stopping_criteria=crit or None)
    finally:
        model.generation_config = saved
    res = []
    eos_set = set(eos)
    for row in out[:, T:].cpu().tolist():
        cut = next((j for j, t in enumerate(row) if t in eos_set), len(row))
        res.append(row[:cut])
    return res


def _bar_ticker(bar: Any, done: int, n: int, max_new_tokens: int) -> Callable[[], None]:
    """Move ``bar`` (in prompts) by ``n / max_new_tokens`` per decoding step of
    a batch of ``n`` prompts, never past ``done + n``."""
    def tick() -> None:
        bar.update(min(n / max_new_tokens, done + n - bar.n))

    return tick


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    max_prompt_length: int = 384,
    batch_size: int = 8,
    stop_at_markers: bool = True,
    progress: bool = False,
    on_batch: Optional[Callable[[List[int], List[str], List[str]], None]] = None,
    metrics: Any = None,
    description: str = "generate",
) -> List[str]:
    """Greedy generations for rendered ``prompts`` (see the module docstring),
    cut with :func:`cut_generation`, in input order.

    Prompts are tokenised without special tokens and left-truncated to
    ``max_prompt_length`` tokens, sorted by length (longest first) and
    generated ``batch_size`` at a time with left padding. ``on_batch(indices,
    generations, raw)`` is called after every batch (indices into ``prompts``;
    ``raw`` = the decoded text before the cut), e.g. to write results as they
    come. ``metrics``: a :class:`deft.io.MetricsLog` for per-batch throughput.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = list(prompts)
    out: List[Optional[str]] = [None] * len(prompts)
    if not prompts:
        return []
    encoded = _encoder(tokenizer)(prompts, max_prompt_length)
    for i, x in enumerate(encoded):
        if not x:
            raise ValueError(f"prompt {i} encodes to no tokens")
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else eos[0]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        # the bar counts prompts, moved a little at every decoding step (a batch of 8 x 128 new
        # tokens can take minutes on a CPU) and set exactly when the batch is done
        bar = tqdm(total=len(prompts), desc=description, unit="prompt", dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n:.1f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]")
    try:
        for b, start in enumerate(range(0, len(order), batch_size)):
            idx = order[start:start + batch_size]
            t0 = time.perf_counter()
            on_step = _bar_ticker(bar, start, len(idx), max_new_tokens) if bar is not None else None
            new_ids = _generate_batch(model, tokenizer, [encoded[i] for i in idx], pad_id=pad, eos=eos,
                                      max_new_tokens=max_new_tokens, stop_at_markers=stop_at_markers, on_step=on_step)
            raw = [tokenizer.decode(x, skip_special_tokens=True) for x in new_ids]
            gens = [cut_generation(r) for r in raw]
            dt = time.perf_counter() - t0
            for i, g in zip(idx, gens):
                out[i] = g
            if on_batch is not None:
                on_batch(list(idx), gens, raw)
            if metrics is not None:
                ntok = sum(len(x) for x in new_ids)
                metrics.log(event="generate", run=description, batch=b, prompts=len(idx),
                            prompt_tokens=sum(len(encoded[i]) for i in idx), new_tokens=ntok,
                            seconds=round(dt, 4), new_tokens_per_s=ntok / max(dt, 1e-9))
            if bar is not None:
                bar.update(start + len(idx) - bar.n)
    finally:
        if bar is not None:
            bar.close()
    return [g if g is not None else "" for g in out]


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
                                    batch_size=batch_size, progress=False, metrics=metrics, description=f"{model_id}/mt-bench")
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
# reward


def score_responses(rm: Any, contexts: Sequence[Sequence[Mapping[str, str]]], responses: Sequence[str], *,
                    batch_size: Optional[int] = None, progress: bool = False, metrics: Any = None,
                    description: str = "reward") -> np.ndarray:
    """Raw reward-model scores (float64) of (context, response) pairs, in input
    order, with any :class:`deft.score.RewardModel`: length-bucketed batches of
    ``batch_size`` pairs or of the model's padded-token budget; a CUDA
    out-of-memory error halves the batch."""
    if len(contexts) != len(responses):
        raise ValueError(f"{len(contexts)} contexts but {len(responses)} responses")
    out = np.zeros(len(responses), dtype=np.float64)
    if not responses:
        return out
    items = rm.encode(list(contexts), list(responses))
    lengths = [len(x) for x in items]
    if batch_size is not None:
        batches = plan_batches(lengths, batch_size=batch_size)
    else:
        budget = rm.suggest_max_batch_tokens() if hasattr(rm, "suggest_max_batch_tokens") else CPU_BATCH_TOKENS
        batches = plan_batches(lengths, max_batch_tokens=budget)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc=description, unit="pair", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for idx in batches:
            out[idx] = score_with_split(rm, [items[i] for i in idx])
            if bar is not None:
                bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    if metrics is not None:
        dt = time.perf_counter() - t0
        metrics.log(event="score", run=description, pairs=len(items), tokens=int(sum(lengths)), seconds=round(dt, 4),
                    pairs_per_s=len(items) / max(dt, 1e-9))
    return out


def reward_100(scores: np.ndarray) -> np.ndarray:
    """100 * sigmoid(scores), without overflow."""
    s = np.asarray(scores, dtype=np.float64)
    e = np.exp(-np.abs(s))
    return 100.0 * np.where(s >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _rm_identity(rm: Any) -> Dict[str, Any]:
    return {"name": str(getattr(rm, "name", type(rm).__name__)), "template": str(getattr(rm, "template", "")),
            "max_length": int(getattr(rm, "max_length", 0) or 0), "revision": getattr(rm, "revision", None)}


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
    for name, v, lo in (("max_new_tokens", max_new_tokens, 1), ("max_prompt_length", max_prompt_length, 1),
                        ("batch_size", batch_size, 1), ("mt_bench_max_new_tokens", mt_bench_max_new_tokens, 1),
                        ("mt_bench_max_prompt_length", mt_bench_max_prompt_length, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
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
    dev = resolve_device(device)
    dt_name = resolve_dtype(dtype, dev)

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

    base: Optional[_Baseline] = None
    if baseline is not None and samples:  # before any generation: a bad baseline fails fast
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

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl")
    notes: List[str] = []
    runs: List[RunResult] = []
    run_records: Dict[str, Dict[str, Dict[str, Any]]] = {}

    # ---- generation, one model at a time
    for spec, name, gguf, tok_spec in zip(models, names, ggufs, toks):
        run_dir = out / name
        run_dir.mkdir(parents=True, exist_ok=True)

        remove_stale_temporaries(run_dir)  # of writes a killed run did not finish (plan.json, samples)
        hf_tok = _load_tokenizer(spec, tokenizer=tok_spec, gguf_file=gguf, trust_remote_code=trust_remote_code)
        tmpl = resolve_model_template(template, spec, hf_tok)
        plan = {"version": PLAN_VERSION, "model": spec, "fingerprint": weights_stat_fingerprint(spec, gguf), "tokenizer": tok_spec,
                "template": tmpl, "max_new_tokens": max_new_tokens, "max_prompt_length": max_prompt_length,
                "mt_bench_max_new_tokens": mt_bench_max_new_tokens, "mt_bench_max_prompt_length": mt_bench_max_prompt_length,
                "dtype": dt_name, "decoding": "greedy", "cut": "pro-v1"}
        _check_plan(run_dir, plan, overwrite)
        mt_path = out / "mt_bench" / "model_answer" / f"{name}.jsonl"
        remove_stale_temporaries(mt_path.parent)
        if overwrite:
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
            lm, hf_tok = load_policy(spec, gguf_file=gguf, tokenizer=tok_spec, device=dev, dtype=dt_name,
                                     trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
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
                        generate(lm, hf_tok, [prompts[i] for i in pending], max_new_tokens=max_new_tokens,
                                 max_prompt_length=max_prompt_length, batch_size=batch_size, progress=progress,
                                 on_batch=on_batch, metrics=metrics, description=name)
                    finally:
                        app.close()
                    result.generated = len(pending)
                if questions:
                    write_mt_bench_answers(questions, mt_path, model=lm, tokenizer=hf_tok, model_id=name, template=tmpl,
                                           max_new_tokens=mt_bench_max_new_tokens, max_prompt_length=mt_bench_max_prompt_length,
                                           batch_size=batch_size, progress=progress, metrics=metrics)
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
        run_records[name] = done
        runs.append(result)

    # ---- reward, BLEU, baseline; publication: samples files, eval.json, eval.md, then manifest.json (the commit record)

    pub = begin_publication(out / "manifest.json", [out / "eval.json", out / "eval.md"], overwrite=True)
    rm_id: Optional[Dict[str, Any]] = None
    rm_spec: Optional[str] = None
    if samples:
        if isinstance(reward_model, str):
            rm = load_reward_model(reward_model, template=reward_template, max_length=reward_max_length, device=dev,
                                   trust_remote_code=trust_remote_code)
            rm_spec = reward_model
        else:
            rm = reward_model
            rm_spec = str(getattr(rm, "name", type(rm).__name__))
        rm_id = _rm_identity(rm)
        if base is not None:
            _reuse_baseline_scores(base, rm_id)
        ctxs = [s.context for s in samples]
        all_scores: Dict[str, np.ndarray] = {}
        for r in runs:
            gens = [run_records[r.name][s.id]["generation"] for s in samples]
            all_scores[r.name] = score_responses(rm, ctxs, gens, batch_size=reward_batch_size, progress=progress, metrics=metrics,
                                                 description=f"{r.name}/reward")
        base_rewards: Dict[str, float] = {}
        base_gens: Dict[str, str] = {}
        if base is not None:
            if base.run is not None:
                base_gens = {s.id: run_records[base.run][s.id]["generation"] for s in samples}
                base_rewards = dict(zip((s.id for s in samples), reward_100(all_scores[base.run]).tolist()))
            else:
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
                                         batch_size=reward_batch_size, progress=progress, metrics=metrics,
                                         description="baseline/reward")
                    base.scores.update(zip((s.id for s in need), sc.tolist()))
                base_gens = {s.id: base.generations[s.id] for s in common}
                base_rewards = {k: float(reward_100(np.array([base.scores[k]]))[0]) for k in base_gens}
                extra = len(set(base.generations) - set(by_id))
                missing = len(samples) - len(common)
                if extra or missing:
                    notes.append(f"baseline {base.label}: compared on the {len(common)} prompts both have "
                                 f"({missing} evaluated prompts missing from the baseline, {extra} baseline prompts not evaluated)")
                    _log(notes[-1])

        for r in runs:
            gens = [run_records[r.name][s.id]["generation"] for s in samples]
            refs = [s.reference for s in samples]
            scores = all_scores[r.name]
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
                r.run_dir, samples, [run_records[r.name][s.id]["prompt"] for s in samples], gens, scores, rewards, bleus,
                b_rew if base is not None else None, outcome if base is not None else None)
            metrics.log(event="result", run=r.name, **{f"{k}_{m}": v for k, sc in
                                                        list(r.subsets.items()) + [("total", r.total)]
                                                        for m, v in sc.to_dict().items()})
        del rm
        gc.collect()
    elif baseline is not None:
        notes.append("baseline ignored: MT-Bench answers are not scored here")

    settings = {"template": template, "max_new_tokens": max_new_tokens, "max_prompt_length": max_prompt_length,
                "batch_size": batch_size, "limit": limit, "tie_margin": tie_margin, "device": dev, "dtype": dt_name,
                "decoding": "greedy", "data": [str(p) for p in data_paths], "baseline": str(baseline) if baseline is not None else None,
                "mt_bench_max_new_tokens": mt_bench_max_new_tokens, "mt_bench_max_prompt_length": mt_bench_max_prompt_length,
                "reward_template": reward_template, "reward_max_length": reward_max_length,
                "bleu": "pro: nltk sentence_bleu([reference.strip()], generation.strip()) over characters, x100, mean over samples",
                "sacrebleu_signature": _sacrebleu_signature() if samples else None}
    report = EvalReport(out, runs, subsets, rm_id, settings, notes)
    report.eval_json = write_json_atomic(out / "eval.json", report.to_dict())
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
    return report


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
