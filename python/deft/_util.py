"""Small helpers shared by the stages: sub-sequence search, markdown tables,
text clipping before tokenisation. (Model handling lives in :mod:`deft._hf`.)"""

from __future__ import annotations

import re
from typing import Any, Callable, List, Sequence


def find_sub(seq: Sequence[int], sub: Sequence[int]) -> int:
    """Index of the first occurrence of ``sub`` in ``seq``, or -1."""
    n = len(sub)
    for i in range(len(seq) - n + 1):
        if list(seq[i:i + n]) == list(sub):
            return i
    return -1


def md_table(header: Sequence[Any], rows: Sequence[Sequence[Any]], left: int = 1) -> List[str]:
    """Lines of a Markdown table: the first ``left`` columns left-aligned, the
    rest right-aligned; ``|`` inside a cell is escaped."""
    def esc(c: Any) -> str:
        return str(c).replace("|", "\\|")

    out = ["| " + " | ".join(esc(h) for h in header) + " |",
           "|" + "|".join(":---" if i < left else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return out


# --------------------------------------------------------------------------- bounded tokenisation
#
# A 50 MB response should not be tokenised in full when only its first (or,
# for a left-truncated prompt, its last) few hundred tokens are kept. The text
# is first cut to a character budget: ``max_tokens`` times an upper bound on the
# characters one token covers (the longest token string in the vocabulary: a
# byte-level BPE token covers at most one character per byte-symbol, a
# WordPiece token at most its length), plus a margin. The cut is placed at a
# space that follows a non-space, which every pre-tokenizer deft meets
# (byte-level BPE with the GPT-2 / Llama-3 split regexes, BERT WordPiece) treats
# as a word boundary, so the tokens on the kept side of the cut are exactly the
# full text's. A clipped text must still yield ``max_tokens`` + CLIP_MARGIN_TOKENS
# tokens (so nothing next to the cut is kept); when it does not (a run of
# words that become one [UNK], a text with very long tokens), the budget is
# doubled and the text tokenised again, up to the whole text.

#: Tokens beyond ``max_tokens`` a clipped text must yield (the ones next to the cut are never kept).
CLIP_MARGIN_TOKENS = 8
#: Characters added to the character budget.
CLIP_MARGIN_CHARS = 64
#: Floor of the characters-per-token bound.
MIN_CHARS_PER_TOKEN = 16

_CUT = None


def _cut_re():
    global _CUT
    if _CUT is None:
        _CUT = re.compile(r"(?<=\S)[ \t]")  # a space or tab after a non-space: a word boundary
    return _CUT


def chars_per_token(tokenizer: Any) -> int:
    """An upper bound on the characters one token of ``tokenizer`` covers: the
    longest token string in its vocabulary (at least MIN_CHARS_PER_TOKEN).
    ``tokenizer``: a transformers tokenizer, a ``tokenizers.Tokenizer`` or a
    :class:`deft._native.Tokenizer`. Cached on the object when possible."""
    cached = getattr(tokenizer, "_deft_chars_per_token", None)
    if cached:
        return int(cached)
    longest = 0
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if callable(get_vocab):
        longest = max((len(t) for t in get_vocab()), default=0)
    elif hasattr(tokenizer, "id_to_token") and hasattr(tokenizer, "vocab_size"):
        for i in range(int(tokenizer.vocab_size)):
            t = tokenizer.id_to_token(i)
            if t is not None and len(t) > longest:
                longest = len(t)
    bound = max(longest, MIN_CHARS_PER_TOKEN)
    try:
        tokenizer._deft_chars_per_token = bound
    except (AttributeError, TypeError):
        pass
    return bound


def clip_text(text: str, max_tokens: int, side: str, chars_per_tok: int, *, scale: int = 1) -> str:
    """``text`` cut to what keeping ``max_tokens`` tokens can need: ``side`` is
    the side that is dropped (``"right"``: the start is kept, ``"left"``: the end).
    The budget is ``scale * ((max_tokens + CLIP_MARGIN_TOKENS) * chars_per_tok +
    CLIP_MARGIN_CHARS)`` characters; the cut sits at the first word boundary
    (a space after a non-space) beyond it, searched for over one more budget;
    a text with no boundary there is cut at twice the budget. Texts within the
    budget are returned unchanged."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    budget = scale * ((max_tokens + CLIP_MARGIN_TOKENS) * chars_per_tok + CLIP_MARGIN_CHARS)
    n = len(text)
    if n <= 2 * budget:
        return text
    if side == "right":
        m = _cut_re().search(text, budget, 2 * budget)
        return text[:m.start() if m else 2 * budget]
    lo, hi = n - 2 * budget, n - budget  # the kept suffix starts at a boundary in [lo, hi]
    last = None
    for last in _cut_re().finditer(text, lo, hi + 1):
        pass
    return text[last.start() if last else lo:]


def tokenize_clipped(tokenize: Callable[[List[str]], Sequence[Sequence[int]]], texts: Sequence[str], max_tokens: int,
                     side: str, chars_per_tok: int) -> List[Sequence[int]]:
    """``tokenize(texts)`` with every text first cut by :func:`clip_text`: the
    ``max_tokens`` tokens kept from the ``side`` not dropped (the first ones for
    ``"right"``, the last ones for ``"left"``) equal those of the whole text's
    tokens. A clipped text yielding fewer than ``max_tokens + CLIP_MARGIN_TOKENS``
    tokens is tokenised again with a doubled budget (finally whole). Returns the
    token ids of the (clipped) texts, untruncated: the caller truncates."""
    texts = list(texts)
    clipped = [clip_text(t, max_tokens, side, chars_per_tok) for t in texts]
    out = list(tokenize(clipped)) if clipped else []
    scale = 1
    todo = [i for i, (t, c) in enumerate(zip(texts, clipped)) if len(c) < len(t) and len(out[i]) < max_tokens + CLIP_MARGIN_TOKENS]
    while todo:
        scale *= 2
        again = [clip_text(texts[i], max_tokens, side, chars_per_tok, scale=scale) for i in todo]
        for i, ids in zip(todo, tokenize(again)):
            out[i] = ids
        todo = [i for i, c in zip(todo, again) if len(c) < len(texts[i]) and len(out[i]) < max_tokens + CLIP_MARGIN_TOKENS]
    return out


def split_at_boundaries(text: str, max_chars: int) -> List[str]:
    """``text`` in pieces of about ``max_chars`` characters, each cut at a word
    boundary as in :func:`clip_text` (no boundary within a further
    ``max_chars``: cut there anyway), so the pieces' token counts add up to the
    whole text's (exact for byte-level BPE and WordPiece tokenizers)."""
    if len(text) <= 2 * max_chars:
        return [text]
    pieces, start, n = [], 0, len(text)
    while n - start > 2 * max_chars:
        m = _cut_re().search(text, start + max_chars, start + 2 * max_chars)
        end = m.start() if m else start + 2 * max_chars
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return pieces
