"""A short seeded run of the native fuzz harness (tests/fuzz_native.py; the long run is scripts/fuzz.sh)."""

from __future__ import annotations

import math
import random

import pytest

import fuzz_native as fz

needs_shared = pytest.mark.skipif(not (fz.SHARED / "tokenizers" / "gpt2" / "tokenizer.json").exists(), reason="shared tokenizers are absent")


@pytest.fixture(scope="module")
def toks():
    return fz.Toks()


@needs_shared
def test_short_fuzz_run_has_no_mismatch_and_covers_every_input_kind(toks):
    counts, failures = fz.run(4000, seed=20261202, toks=toks)
    assert not failures, "\n".join(failures)
    seen = {(e, k) for (e, k) in counts}
    for kind in fz.TEXT_KINDS:
        assert ("count_tokens", kind) in seen and ("encode", kind) in seen, kind
    for kind in fz.SCORE_KINDS:
        assert ("assign_polarity", kind) in seen, kind
    assert sum(v for (e, _), v in counts.items() if e == "decode") > 100


def test_polarity_reference_agrees_with_deft_grade_on_ordinary_scores():
    from deft.grade import Thresholds, polarity_reference

    th = Thresholds()
    rng = random.Random(7)
    for _ in range(2000):
        scores = [rng.choice([rng.uniform(-5, 5), float(rng.randint(-2, 2))]) for _ in range(rng.randint(2, 6))]
        level = rng.randint(0, 2)
        status, rows = fz.polarity_reference([scores], [level], th.as_dict())
        assert status == "ok"
        assert tuple(rows[0]) == polarity_reference(scores, "ABC"[level], th)


def test_polarity_reference_states_the_errors_and_extremes():
    th = {"a_pos": 0.8, "a_neg": None, "b_pos": 0.9, "b_neg": 0.1, "c_pos": None, "c_neg": 0.2}
    assert fz.polarity_reference([[1.0, None]], [0], th) == ("error", "row 0: field 'scores[")
    assert fz.polarity_reference([[1.0, 2.0]], [0], {**th, "b_neg": math.nan}) == ("error", "threshold b_neg=")
    status, rows = fz.polarity_reference([[1e308, -1e308, 0.0]], [1], th)
    assert status == "ok" and rows[0] == ([0, 2, 1], [1.0, 0.5, 0.0], [1, 0, -1])
