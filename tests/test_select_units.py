"""Units of deft.select. ``kmeans2`` against a from-the-docstring reference (plain
Python loops, the same documented random draws), on data whose restarts reach
different local optima, plus its argument checks and dtype handling."""

from __future__ import annotations

import numpy as np
import pytest

from deft.select import KMEANS_MAX_ITER, KMEANS_RESTARTS, kmeans2


def reference_kmeans2(x, seed=0, n_init=10, max_iter=100):
    """k=2 Lloyd's from ``n_init`` k-means++ seedings of ``default_rng(seed)``
    (first centre ``rng.integers(n)``, second ``rng.choice(n, p=d^2/sum d^2)``);
    a point goes to cluster 1 only when strictly nearer to it; stop when the
    labels repeat; keep the first run of lowest inertia."""
    pts = [list(map(float, row)) for row in np.asarray(x, dtype=np.float64)]
    n = len(pts)

    def d2(a, b):
        return sum((u - v) ** 2 for u, v in zip(a, b))

    def mean(rows):
        return [sum(col) / len(rows) for col in zip(*rows)]

    rng = np.random.default_rng(seed)
    best = None
    for _ in range(n_init):
        first = int(rng.integers(n))
        w = np.array([d2(p, pts[first]) for p in pts])
        second = int(rng.choice(n, p=w / w.sum()))
        cents = [pts[first], pts[second]]
        labels = None
        for _ in range(max_iter):
            new = [1 if d2(p, cents[1]) < d2(p, cents[0]) else 0 for p in pts]
            if new == labels:
                break
            labels = new
            cents = [mean([p for p, l in zip(pts, labels) if l == k]) for k in (0, 1)]
        inertia = sum(d2(p, cents[l]) for p, l in zip(pts, labels))
        if best is None or inertia < best[2] - 1e-12:
            best = (labels, cents, inertia)
    return best


def _ambiguous(seed, n=40, d=3, scale=1.0):
    """Uniform points: many local optima, so restarts and seeds matter."""
    return np.random.default_rng(seed).uniform(0, scale, size=(n, d))


@pytest.mark.parametrize("data_seed,seed,n_init,max_iter,scale", [
    (0, 0, 10, 100, 1.0), (1, 3, 10, 100, 0.05), (2, 7, 1, 1, 1.0), (3, 1, 4, 2, 0.01), (4, 0, 25, 100, 0.2),
])
def test_equals_reference(data_seed, seed, n_init, max_iter, scale):
    x = _ambiguous(data_seed, scale=scale)
    labels, cents, inertia = kmeans2(x, seed=seed, n_init=n_init, max_iter=max_iter)
    rl, rc, ri = reference_kmeans2(x, seed=seed, n_init=n_init, max_iter=max_iter)
    assert labels.tolist() == rl
    np.testing.assert_allclose(cents, np.array(rc), rtol=1e-12, atol=1e-15)
    assert inertia == pytest.approx(ri, rel=1e-12, abs=0)
    assert labels.dtype == np.int64 and cents.dtype == np.float64 and cents.shape == (2, 3)


def test_restarts_matter_and_the_best_is_kept():
    # on this data the 25 restarts do not all agree, and the lowest inertia wins (the first among equals)
    x = _ambiguous(4, scale=0.2)
    per_run = [reference_kmeans2(x, seed=s, n_init=1)[2] for s in range(25)]
    assert len({round(v, 12) for v in per_run}) > 1
    _, _, inertia = kmeans2(x, seed=0, n_init=25)
    assert inertia <= min(reference_kmeans2(x, seed=0, n_init=k)[2] for k in (1, 5, 10)) + 1e-15


def test_defaults_and_determinism():
    x = _ambiguous(5)
    a = kmeans2(x)
    b = kmeans2(x, seed=0, n_init=KMEANS_RESTARTS, max_iter=KMEANS_MAX_ITER)
    assert a[0].tolist() == b[0].tolist() and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert (KMEANS_RESTARTS, KMEANS_MAX_ITER) == (10, 100)
    # one restart, one iteration: the result depends on the seed (so the default seed 0 is pinned)
    one = [kmeans2(x, seed=s, n_init=1, max_iter=1)[0].tolist() for s in (0, 0, 1)]
    assert one[0] == one[1] != one[2]
    assert one[0] == reference_kmeans2(x, seed=0, n_init=1, max_iter=1)[0]


def test_ties_go_to_cluster_0_and_single_feature_works():
    # 1-d points; the middle point 1.0 is equidistant from centroids at 0 and 2 after convergence
    x = np.array([[0.0], [0.0], [1.0], [2.0], [2.0]])
    labels, cents, _ = kmeans2(x, seed=0)
    rl, rc, _ = reference_kmeans2(x, seed=0)
    assert labels.tolist() == rl and cents.shape == (2, 1)
    np.testing.assert_allclose(cents, np.array(rc))


def test_float32_and_int_input_are_computed_in_float64():
    x64 = _ambiguous(6)
    x32 = x64.astype(np.float32)
    l32, c32, i32 = kmeans2(x32, seed=2)
    rl, rc, ri = reference_kmeans2(x32.astype(np.float64), seed=2)
    assert l32.tolist() == rl and c32.dtype == np.float64
    np.testing.assert_allclose(c32, np.array(rc), rtol=1e-12)
    assert i32 == pytest.approx(ri, rel=1e-12, abs=0)
    xi = np.array([[0, 0], [0, 1], [9, 9], [9, 8], [1, 0]])
    li, ci, ii = kmeans2(xi)
    assert ci.dtype == np.float64 and li.tolist() == reference_kmeans2(xi)[0] and ii == pytest.approx(reference_kmeans2(xi)[2])


def test_argument_errors():
    with pytest.raises(ValueError, match=r"^kmeans2 needs a 2-d array of at least 2 points, got shape \(4,\)$"):
        kmeans2(np.zeros(4))
    with pytest.raises(ValueError, match=r"^kmeans2 needs a 2-d array of at least 2 points, got shape \(1, 3\)$"):
        kmeans2(np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"^kmeans2: points must be finite$"):
        kmeans2(np.array([[0.0, 1.0], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match=r"^kmeans2: all points are identical; two clusters are undefined$"):
        kmeans2(np.ones((3, 2)))
    x = _ambiguous(7, n=6)
    for n_init, max_iter in ((0, 5), (5, 0), (0, 0), (-1, 3)):
        with pytest.raises(ValueError, match=rf"^n_init and max_iter must be >= 1, got {n_init}, {max_iter}$"):
            kmeans2(x, n_init=n_init, max_iter=max_iter)
    kmeans2(x, n_init=1, max_iter=1)  # the smallest valid values


def test_row_key_is_the_documented_64_bit_hash():
    import hashlib

    from deft.select import _row_key

    for seed, row, purpose in ((0, "r1", "random"), (7, "harmless_base/0042", "hard"), (2**40, "ü", "orient")):
        digest = hashlib.sha256(f"deft-select:{purpose}:{seed}:{row}".encode("utf-8")).digest()
        assert _row_key(seed, row, purpose) == int.from_bytes(digest[:8], "big") < 2**64
    assert _row_key(0, "r1", "random") == 0x62BA93D1CAAC6C44  # pinned: selections made before stay reproducible
    keys = {_row_key(s, r, p) for s in (0, 1) for r in ("a", "b") for p in ("random", "hard")}
    assert len(keys) == 8  # seed, row and purpose all matter


# --------------------------------------------------------------- embeddings and pair picks


def _unit(deg):
    a = np.deg2rad(deg)
    return np.array([np.cos(a), np.sin(a)])


def test_flat_embeddings_are_float64_and_checked_per_row():
    from deft.select import _flat_embeddings

    rows = [np.array([[3.0, 4.0], [1.0, 0.0]], dtype=np.float32), np.array([[0.1, 0.7]], dtype=np.float32)]
    flat = _flat_embeddings(rows, [2, 1])
    want = np.concatenate([r.astype(np.float64) for r in rows])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert flat.dtype == np.float64 and np.array_equal(flat, want)  # normalised in float64, not float32
    with pytest.raises(ValueError, match=r"embeddings\[0\]: expected shape \(3, dim\) for 3 responses, got \(2, 2\)"):
        _flat_embeddings(rows, [3, 1])
    with pytest.raises(ValueError, match=r"embeddings\[1\]: expected shape \(1, dim\)"):
        _flat_embeddings([rows[0], np.array([0.1, 0.7])], [2, 1])


def test_random_pick_follows_the_documented_per_row_seed():
    from deft.select import _pick_pair, _row_key

    distinct = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    emb = np.array([_unit(a) for a in (0, 30, 60, 90, 120)])
    sims = emb @ emb.T
    picks = set()
    for seed in (0, 3):
        for rid in ("a", "b", "c", "d"):
            want = distinct[int(np.random.default_rng(_row_key(seed, rid, "pair")).integers(len(distinct)))]
            got = _pick_pair("random", emb, distinct, sims, seed, rid)
            assert got == want
            picks.add(got)
    assert len(picks) > 2


def test_select_pairs_passes_each_rows_id_to_the_random_pick(tmp_path):
    from conftest import write_records
    from deft.data import load
    from deft.select import _row_key, select_pairs

    responses = ["r0", "r1", "r2", "r3", "r4"]
    frame = load(write_records(tmp_path / "ranked.jsonl", [{"prompt": f"q{k}", "responses": responses} for k in range(6)])).frame
    res = select_pairs(frame, "random", fraction=1.0, seed=5)
    distinct = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    assert res.frame.height == 6
    for rid, pair in zip(res.frame["id"].to_list(), res.frame["responses"].to_list()):
        i, j = distinct[int(np.random.default_rng(_row_key(5, rid, "pair")).integers(len(distinct)))]
        assert pair == [responses[i], responses[j]], rid


def test_centroid_pick_seeds_kmeans_per_row_and_falls_back_to_the_nearest_cross_pair():
    from deft.select import _pick_pair, _row_key

    # two clusters on the unit circle; responses 0 and 1 are copies of one text (pair (0, 1) is not distinct)
    emb = np.array([_unit(a) for a in (0, 180, -25, 160, 30, 215, 10)])
    distinct = [(i, j) for i in range(7) for j in range(i + 1, 7) if (i, j) != (0, 1)]
    sims = emb @ emb.T
    labels, cents, _ = kmeans2(emb, seed=_row_key(0, "r", "kmeans"))
    picks = sorted(int(np.flatnonzero(labels == k)[np.argmin(((emb[labels == k] - cents[k]) ** 2).sum(1))]) for k in (0, 1))
    assert picks == [0, 1]  # the nearest members are the two copies: the fallback runs
    d = ((emb[:, None, :] - cents[None]) ** 2).sum(-1)
    cross = [p for p in distinct if labels[p[0]] != labels[p[1]]]
    want = min(cross, key=lambda p: (d[p[0], labels[p[0]]] + d[p[1], labels[p[1]]], p))
    assert _pick_pair("centroid", emb, distinct, sims, 0, "r") == want
    # the nearest cross pair is not simply the first cross pair, nor the pair of the two nearest points
    assert want != cross[0]


def test_random_keeps_the_documented_subset_rounded_half_up_and_reports_its_parameters(tmp_path):
    import polars as pl

    from conftest import write_records
    from deft.data import load
    from deft.select import _row_key, select_pairs

    frame = load(write_records(tmp_path / "p.jsonl", [{"prompt": f"q{k}", "responses": ["a", "b", "c"]} for k in range(5)])).frame
    res = select_pairs(frame, "random", fraction=0.5, seed=11)
    ids = frame["id"].to_list()
    order = sorted(ids, key=lambda i: (_row_key(11, i, "subset"), i))
    assert res.n_kept == 3  # 5 x 0.5 = 2.5 keeps 3 (half up)
    assert res.frame["id"].to_list() == [i for i in ids if i in order[:3]]
    sel = res.selection
    assert sel["rank"].to_list() == [order.index(i) + 1 for i in ids]
    assert (res.seed, res.strategy, res.fraction, res.orient) == (11, "random", 0.5, "rank")
    assert sel.schema == {"id": pl.Utf8, "subset": pl.Utf8, "n_responses": pl.Int64, "candidate": pl.Boolean,
                          "better": pl.Int64, "worse": pl.Int64, "similarity": pl.Float64, "min_similarity": pl.Float64,
                          "max_similarity": pl.Float64, "oriented_by": pl.Utf8, "rank": pl.Int64, "kept": pl.Boolean,
                          "reason": pl.Utf8}
    assert sel["subset"].to_list() == frame["subset"].to_list() and sel["n_responses"].to_list() == [3] * 5
    # 4 x 0.5 = 2 exactly; 5 x 0.1 = 0.5 keeps 1
    assert select_pairs(frame.head(4), "random", fraction=0.5).n_kept == 2
    assert select_pairs(frame, "random", fraction=0.1).n_kept == 1


def test_fit_lengths_accepts_a_zero_reserve():
    from deft.select import fit_lengths

    assert fit_lengths(50, 10, 32, 0) == (22, 10)
    assert fit_lengths(50, 40, 32, 0) == (0, 32)
    assert fit_lengths(50, 40, 32, 8) == (8, 24)
    assert fit_lengths(5, 5, 1, 0) == (0, 1)  # the smallest budget
    for budget, reserve in ((0, 0), (1, 1), (4, -1), (4, 4)):
        with pytest.raises(ValueError, match=f"no room for the response: budget={budget}, reserve={reserve}"):
            fit_lengths(5, 5, budget, reserve)


def test_centroid_picks_follow_the_documented_per_row_kmeans_seed(tmp_path):
    """On embeddings where k-means has several optima the pick depends on the
    seed, which is _row_key(seed, row id, "kmeans"), through select_pairs too."""
    from conftest import write_records
    from deft.data import load
    from deft.select import _pick_pair, _row_key, select_pairs

    n, rows = 12, 6
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(rows, n, 30))
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    distinct = [(i, j) for i in range(n) for j in range(i + 1, n)]

    def expected(e, rid, seed):
        labels, cents, _ = kmeans2(e, seed=_row_key(seed, rid, "kmeans"))
        picks = [int(np.flatnonzero(labels == k)[np.argmin(((e[labels == k] - cents[k]) ** 2).sum(1))]) for k in (0, 1)]
        return tuple(sorted(picks))

    frame = load(write_records(tmp_path / "c.jsonl", [{"prompt": f"q{k}", "responses": [f"r{k}-{i}" for i in range(n)]}
                                                      for k in range(rows)])).frame
    ids = frame["id"].to_list()
    res = select_pairs(frame, "centroid", fraction=1.0, seed=2, embeddings=[e for e in emb])
    got = dict(zip(res.frame["id"].to_list(), res.frame["responses"].to_list()))
    seed_matters = 0
    for k, rid in enumerate(ids):
        a, b = expected(emb[k], rid, 2)
        assert _pick_pair("centroid", emb[k], distinct, emb[k] @ emb[k].T, 2, rid) == (a, b)
        assert got[rid] == [f"r{k}-{a}", f"r{k}-{b}"], rid
        seed_matters += expected(emb[k], rid, 3) != (a, b) or expected(emb[k], "other", 2) != (a, b)
    assert seed_matters >= 2  # the data really has seed-dependent optima
