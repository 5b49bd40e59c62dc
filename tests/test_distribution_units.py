"""Units of deft.distribution on the real GPT-2 tokenizer: ``top_tokens``
ranks, decodes and filters by sign exactly."""

from __future__ import annotations

import numpy as np

from conftest import shared_file
from deft.distribution import Distribution, resolve_tokenizer, top_tokens


def test_top_tokens_ranks_by_sign_and_never_pads_with_the_other_side():
    tok = resolve_tokenizer(str(shared_file("tokenizers/gpt2")))
    v = tok.vocab_size
    q_pos = np.zeros(v, dtype=np.int64)
    q_neg = np.zeros(v, dtype=np.int64)
    q_diff = np.zeros(v, dtype=np.float32)
    # ids of " the", " sorry", "!", " kill" in GPT-2: 262, 7926, 0, 1494
    q_diff[[262, 7926, 0, 1494]] = [0.25, 0.5, -0.125, -0.0625]
    q_pos[[262, 7926]] = [3, 5]
    q_neg[[0, 1494, 262]] = [2, 1, 1]
    top = top_tokens(Distribution(q_pos, q_neg, q_diff, {}), tok, k=5)
    assert [(t["id"], t["token"], t["text"], t["q_diff"], t["q_pos"], t["q_neg"]) for t in top["positive"]] == [
        (7926, "Ġsorry", " sorry", 0.5, 5, 0), (262, "Ġthe", " the", 0.25, 3, 1)]
    assert [(t["id"], t["token"], t["text"], t["q_diff"], t["q_pos"], t["q_neg"]) for t in top["negative"]] == [
        (0, "!", "!", -0.125, 0, 2), (1494, "Ġkill", " kill", -0.0625, 0, 1)]
    # k cuts each side; zeros never appear
    top1 = top_tokens(Distribution(q_pos, q_neg, q_diff, {}), tok, k=1)
    assert [t["id"] for t in top1["positive"]] == [7926] and [t["id"] for t in top1["negative"]] == [0]
    assert top_tokens(Distribution(q_pos, q_neg, np.zeros(v, dtype=np.float32), {}), tok) == {"positive": [], "negative": []}
