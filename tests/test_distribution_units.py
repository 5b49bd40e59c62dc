"""Units of deft.distribution on the real GPT-2 tokenizer: ``top_tokens``
ranks, decodes and filters by sign exactly."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_build_distribution_counts_with_the_prefix_and_records_its_inputs(tmp_path):
    import json

    import polars as pl
    from tokenizers import Tokenizer

    import deft
    from deft.distribution import build_distribution

    tok = resolve_tokenizer(str(shared_file("tokenizers/gpt2")))
    graded = pl.DataFrame({"responses": [["I am sorry.", "Go away.", "Maybe."], ["Sure, here.", "No."]],
                           "polarity": [[1, -1, 0], [1, -1]]},
                          schema={"responses": pl.List(pl.Utf8), "polarity": pl.List(pl.Int8)})
    path = tmp_path / "graded.parquet"
    graded.write_parquet(path)
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "grade"}))
    dist = build_distribution(graded, tok, template="plain", graded_path=path)
    hf = Tokenizer.from_file(str(shared_file("tokenizers/gpt2/tokenizer.json")))
    want_pos, want_neg = np.zeros(tok.vocab_size, np.int64), np.zeros(tok.vocab_size, np.int64)
    for text, pol in (("I am sorry.", 1), ("Go away.", -1), ("Sure, here.", 1), ("No.", -1)):
        for i in hf.encode(" " + text, add_special_tokens=False).ids:  # plain template: responses follow "Assistant:"
            (want_pos if pol == 1 else want_neg)[i] += 1
    np.testing.assert_array_equal(dist.q_pos, want_pos)
    np.testing.assert_array_equal(dist.q_neg, want_neg)
    np.testing.assert_allclose(dist.q_diff, want_pos / want_pos.sum() - want_neg / want_neg.sum(), atol=1e-8)
    m = dist.metadata
    assert (m["graded_path"], m["deft_version"], m["pos_responses"], m["neg_responses"], m["samples"]) == (
        str(path), deft.__version__, "2", "2", "2")
    assert m["graded_manifest"] == str(tmp_path / "manifest.json") and len(m["graded_sha256"]) == 64
    assert m["response_prefix"] == json.dumps(" ") and m["template"] == "plain"
    # an empty side names the graded file
    none_neg = graded.with_columns(pl.Series("polarity", [[1, 0, 0], [1, 0]], dtype=pl.List(pl.Int8)))
    with pytest.raises(ValueError, match=rf"^Q- is empty in {path}: 0 responses have that polarity"):
        build_distribution(none_neg, tok, template="plain", graded_path=path)
