"""Greedy generation for `deft eval` and `deft experiment`: prompts encoded as
the trainer encodes them (the native encoder over the tokenizer's
``tokenizer.json``, no special tokens, left truncation), batches of similar
length padded on the left, EOS and turn-marker stopping, OOM halving, progress
per decoding step, and the PRO evaluation's cut (:func:`cut_generation`).
Resuming a run's generations is :mod:`deft.evaluate`'s (its ``generations.jsonl``)."""

from __future__ import annotations

import re
import sys
import time
import weakref
from typing import Any, Callable, List, Optional, Sequence

import numpy as np

from deft._hf import split_on_oom
from deft._native import Tokenizer
from deft._util import chars_per_token, tokenize_clipped

# Imported inside the functions that use them, on purpose: torch, transformers and tqdm; importing deft
# stays fast.

__all__ = ["generate", "cut_generation"]

#: The turn markers the PRO evaluation cuts generations at, matched in any case.
_MARKER_RE = re.compile(r"human:|assistant:", re.IGNORECASE)
#: New tokens decoded per step by the marker stopping criterion.
_STOP_WINDOW = 16
#: The character every turn marker ends with: a row is decoded only after a token holding it.
_MARKER_END = ":"


def _log(msg: str) -> None:
    print(f"[deft eval] {msg}", file=sys.stderr, flush=True)


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



_COLON_IDS: "weakref.WeakKeyDictionary[Any, frozenset]" = weakref.WeakKeyDictionary()


def _colon_ids(tokenizer: Any) -> frozenset:
    """The ids whose decoded text holds :data:`_MARKER_END` (every turn marker
    ends with a ``:``, one byte, so it lies inside the token that completes a
    marker). Cached per tokenizer."""
    try:
        return _COLON_IDS[tokenizer]
    except (KeyError, TypeError):
        pass
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
    ids = frozenset(i for i, p in enumerate(pieces) if _MARKER_END in p)
    try:
        _COLON_IDS[tokenizer] = ids
    except TypeError:  # not weak-referenceable
        pass
    return ids


def _marker_stop(tokenizer: Any, prompt_len: int):
    import torch
    from transformers import StoppingCriteria

    colon = _colon_ids(tokenizer)

    class MarkerStop(StoppingCriteria):
        """Per row: stop once the new text holds a turn marker. Checked after
        every step over the last :data:`_STOP_WINDOW` new tokens, which hold
        any marker completed by the newest token (markers are a few tokens);
        decoded only for the rows not stopped yet whose newest token holds a
        ``:`` (a marker completed by it ends there)."""

        def __init__(self) -> None:
            self.hit: Optional[Any] = None
            self.seen = prompt_len  # columns already checked

        def __call__(self, input_ids, scores, **kwargs):
            n, width = input_ids.shape
            if self.hit is None:
                self.hit = torch.zeros(n, dtype=torch.bool)
            if width > max(prompt_len, self.seen):
                # every column not checked yet (one per step; all of them when called on a whole sequence)
                fresh = input_ids[:, max(prompt_len, self.seen):].cpu().tolist()
                self.seen = width
                for i, row in enumerate(fresh):
                    if self.hit[i] or not any(t in colon for t in row):
                        continue
                    window = input_ids[i, max(prompt_len, width - len(row) - _STOP_WINDOW + 1):].tolist()
                    if _MARKER_RE.search(tokenizer.decode(window, skip_special_tokens=True)):
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
                    stop_at_markers: bool, on_step: Optional[Callable[[], None]] = None, cache: str = "static") -> List[List[int]]:
    """Greedy continuation ids of one left-padded batch, halving the batch on
    a CUDA out-of-memory error. ``on_step()`` is called after each decoding step."""
    def run(b: List[List[int]]) -> List[List[int]]:
        return _generate_once(model, tokenizer, b, pad_id=pad_id, eos=eos, max_new_tokens=max_new_tokens,
                              stop_at_markers=stop_at_markers, on_step=on_step, cache=cache)

    return split_on_oom(run, batch, combine=lambda a, b: a + b, on_split=lambda n, half: _log(
        f"out of memory generating a batch of {n}; retrying as {half} + {n - half}"))


def _generate_once(model, tokenizer, batch: List[List[int]], *, pad_id: int, eos: List[int], max_new_tokens: int,
                   stop_at_markers: bool, on_step: Optional[Callable[[], None]] = None, cache: str = "static") -> List[List[int]]:
    """Greedy continuation ids of one left-padded batch. ``cache``:
    ``static`` (a KV cache preallocated for the prompt plus ``max_new_tokens``,
    written in place; used when the model supports it, see :func:`_cache_implementation`)
    or ``dynamic`` (transformers' default, grown by concatenation at every step)."""
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
                           eos_token_id=eos if len(eos) > 1 else eos[0], cache_implementation=_cache_implementation(model, cache),
                           disable_compile=True)  # no automatic torch.compile on CUDA for a static cache
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


def _cache_implementation(model: Any, cache: str) -> Optional[str]:
    """``"static"`` when asked for and the model (the base model of a PEFT
    wrapper) supports a static cache (transformers' ``_can_compile_fullgraph``),
    else None (the dynamic cache)."""
    if cache == "dynamic":
        return None
    if cache != "static":
        raise ValueError(f"cache must be 'static' or 'dynamic', got {cache!r}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "static" if getattr(base, "_can_compile_fullgraph", False) else None


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
    lead_ids: Sequence[int] = (),
    cache: str = "static",
) -> List[str]:
    """Greedy generations for rendered ``prompts`` (see the module docstring),
    cut with :func:`cut_generation`, in input order.

    Prompts are tokenised without special tokens and left-truncated to
    ``max_prompt_length`` tokens, sorted by length (longest first) and
    generated ``batch_size`` at a time with left padding. ``on_batch(indices,
    generations, raw)`` is called after every batch (indices into ``prompts``;
    ``raw`` = the decoded text before the cut), e.g. to write results as they
    come. ``metrics``: a :class:`deft.io.MetricsLog` for per-batch throughput.
    ``lead_ids``: the ids every prompt starts with, as the trainer lays prompts
    out (:func:`deft.render.prompt_lead_ids`: the BOS of a Llama-family
    tokenizer): prepended when a prompt does not start with them, kept when it
    is left-truncated. ``cache``: the KV cache, ``static`` (default; the
    same greedy ids as ``dynamic``, faster on long generations, see
    benches/README.md) or ``dynamic``; a model without static-cache support
    always gets the dynamic one.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if cache not in ("static", "dynamic"):
        raise ValueError(f"cache must be 'static' or 'dynamic', got {cache!r}")
    prompts = list(prompts)
    out: List[Optional[str]] = [None] * len(prompts)
    if not prompts:
        return []
    lead = [int(x) for x in lead_ids]
    if len(lead) >= max_prompt_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) leaves no room after the {len(lead)} leading special token(s)")
    encoded = _encoder(tokenizer)(prompts, max_prompt_length + len(lead))
    if lead:
        room = max_prompt_length - len(lead)
        encoded = [lead + (x[len(lead):] if x[:len(lead)] == lead else x)[-room:] for x in encoded]
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
                                      max_new_tokens=max_new_tokens, stop_at_markers=stop_at_markers, on_step=on_step,
                                      cache=cache)
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
