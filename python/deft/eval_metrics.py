"""The metrics of `deft eval`: BLEU as PRO reports it (:func:`pro_bleu`) and
sacreBLEU, win/tie/lose against a baseline, and reward-model scores of
generations (:func:`score_responses`, :func:`reward_100`)."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from deft.score import CPU_BATCH_TOKENS, plan_batches, score_with_split

# Imported inside the functions that use them, on purpose: sacrebleu and tqdm; importing deft stays fast.

__all__ = ["DEFAULT_TIE_MARGIN", "WinTieLose", "pro_bleu", "sacre_bleu", "sacrebleu_signature", "win_tie_lose",
           "score_responses", "reward_100", "rm_identity"]

#: Tie margin of :func:`win_tie_lose`, in reward points (0-100 scale).
DEFAULT_TIE_MARGIN = 1.0


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


def sacrebleu_signature() -> str:
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


def rm_identity(rm: Any) -> Dict[str, Any]:
    return {"name": str(getattr(rm, "name", type(rm).__name__)), "template": str(getattr(rm, "template", "")),
            "max_length": int(getattr(rm, "max_length", 0) or 0), "revision": getattr(rm, "revision", None)}
