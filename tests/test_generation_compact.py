"""deft's greedy loop (deft.generation._greedy_compacting, the default): the
same ids as `model.generate` (DEFT_GENERATE=hf, deft's earlier path) on real
prompts, with rows of one batch stopping at EOS and at turn markers at
different steps and leaving the batch."""

from __future__ import annotations

import gzip
import re

import pytest

from conftest import shared_file, tiny_llama

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoTokenizer

    from deft.data import load
    from deft.render import render_hh

    tok = AutoTokenizer.from_pretrained(str(shared_file("tokenizers/smollm2")))
    lm = tiny_llama(tok, seed=3).eval()
    lines = gzip.open(shared_file("data/pro-hh/test_harmless_base.jsonl.gz"), "rt", encoding="utf-8").read().splitlines()[:6]
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "hh.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prompts = [render_hh(c) for c in load(path).frame["context"].to_list()]
    return lm, tok, prompts


def _both(monkeypatch, lm, tok, prompts, **kw):
    from deft.generation import generate

    calls = []  # the batch size of every forward pass
    hook = lm.register_forward_pre_hook(lambda m, a, k: calls.append(int(k["input_ids"].shape[0])), with_kwargs=True)
    out = {}
    try:
        for path in ("hf", "compact"):
            monkeypatch.setenv("DEFT_GENERATE", path)
            calls.clear()
            out[path] = (generate(lm, tok, prompts, **kw), list(calls))
    finally:
        hook.remove()
    return out


def test_same_text_as_generate_with_rows_stopping_at_eos(setup, monkeypatch):
    lm, tok, prompts = setup
    free = _both(monkeypatch, lm, tok, prompts, max_new_tokens=20, batch_size=6, stop_at_markers=False)
    assert free["hf"][0] == free["compact"][0]
    # an EOS that some rows emit early and others later or never: make it the model's EOS
    ids = [tok(g, add_special_tokens=False)["input_ids"] for g in free["hf"][0]]
    counts = {}
    for row in ids:
        for t in set(row[2:12]):
            counts[t] = counts.get(t, 0) + 1
    eos = max((t for t, c in counts.items() if c < len(ids)), key=lambda t: counts[t])
    monkeypatch.setattr(lm.generation_config, "eos_token_id", [eos, tok.eos_token_id])
    got = _both(monkeypatch, lm, tok, prompts, max_new_tokens=20, batch_size=6, stop_at_markers=False)
    assert got["hf"][0] == got["compact"][0]
    assert got["compact"][0] != free["compact"][0]  # the EOS cut some rows short
    # the finished rows left the batch: later steps ran on fewer rows, and on fewer row-steps in all
    assert got["compact"][1][0] == 6 and min(got["compact"][1]) < 6
    assert sum(got["compact"][1]) < sum(got["hf"][1])


def test_same_text_as_generate_with_rows_stopping_at_a_marker(setup, monkeypatch):
    """The turn-marker stop, with a marker this random model writes (the text of a token some
    generations hold): the same cut texts on both paths, and rows leave the batch."""
    import deft.generation as g

    lm, tok, prompts = setup
    free = _both(monkeypatch, lm, tok, prompts, max_new_tokens=16, batch_size=6, stop_at_markers=False)[
        "compact"][0]
    words = [w for text in free for w in set(re.findall(r"[A-Za-z]{3,}", text))]
    marker = max(set(words), key=lambda w: (0 < words.count(w) < len(prompts), words.count(w)))
    monkeypatch.setattr(g, "_MARKER_RE", re.compile(re.escape(marker)))
    got = _both(monkeypatch, lm, tok, prompts, max_new_tokens=16, batch_size=6, stop_at_markers=True)
    assert got["hf"][0] == got["compact"][0]
    assert any(marker in t for t in free) and got["compact"][0] != free
    assert sum(got["compact"][1]) < sum(got["hf"][1])
