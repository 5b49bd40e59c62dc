"""Grading tells the user about samples that cannot teach a preference: all-equal
scores (no Q+/Q- at all) and one response text repeated (with scores, the same
text can land in both Q+ and Q-), and ``--drop-duplicates`` drops the latter."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
from typer.testing import CliRunner

from conftest import shared_file
from deft.cli import app
from deft.data import load
from deft.grade import grade, grade_files, grade_warnings, repeated_response_rows


def _ranked(tmp_path: Path) -> Path:
    p = tmp_path / "ranked.jsonl"
    rows = [
        {"id": "dup", "prompt": "q", "responses": ["same", "other", "same"], "scores": [3.0, 2.0, 1.0]},
        {"id": "flat", "prompt": "q2", "responses": ["a", "b"], "scores": [1.0, 1.0]},
        {"id": "ok", "prompt": "q3", "responses": ["x", "y"], "scores": [2.0, 0.0]},
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_warnings_name_equal_scores_and_a_text_in_both_q_plus_and_q_minus(tmp_path: Path) -> None:
    g = grade(load(_ranked(tmp_path), format="ranked").frame, a=34, c=30)
    dup = g.filter(pl.col("id") == "dup").row(0, named=True)
    assert dup["responses"] == ["same", "other", "same"] and dup["polarity"][0] == 1 and dup["polarity"][-1] == -1
    w = grade_warnings(g)
    assert w[0].startswith("1 of 3 samples have all-equal scores")
    assert w[1].startswith("1 samples hold the same response text twice; in 1 of them one text is in both Q+ and Q-")


def test_drop_duplicates_drops_them_before_grading(tmp_path: Path) -> None:
    run = grade_files([_ranked(tmp_path)], tmp_path / "out", use_input_scores=True, a=34, c=30, drop_duplicates=True)
    assert run.n_dropped_duplicates == 1
    assert sorted(run.graded.get_column("id").to_list()) == ["flat", "ok"]
    man = json.loads(run.manifest_path.read_text())
    assert man["dropped_duplicates"] == 1 and man["parameters"]["drop_duplicates"] is True
    assert man["warnings"] == run.warnings and run.warnings[0].startswith("1 of 2 samples have all-equal scores")


def test_real_helpful_base_has_two_such_samples_and_the_cli_says_so(tmp_path: Path) -> None:
    src = shared_file("data/pro-hh/test_helpful_base.jsonl.gz")
    frame = load(src).frame
    assert int(repeated_response_rows(frame).sum()) == 2
    res = CliRunner().invoke(app, ["grade", "-i", str(src), "-o", str(tmp_path / "g"), "--use-input-scores"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "warning: 2 of 2,354 samples have all-equal scores" in out
    assert "2 samples hold the same response text twice" in out
    res = CliRunner().invoke(app, ["grade", "-i", str(src), "-o", str(tmp_path / "d"), "--use-input-scores", "--drop-duplicates"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "dropped 2 samples" in out and "same response text" not in out
    assert pl.read_parquet(tmp_path / "d" / "graded.parquet").height == 2352


def test_python_and_native_polarity_agree_on_scores_near_the_float_limit() -> None:
    """max - min overflows for scores near +/-1.8e308; both paths halve first
    (plain min-max would give NaN)."""
    from deft.grade import _polarity_native, _polarity_python, Thresholds

    frame = pl.DataFrame({"scores": [[1e308, -1e308, 0.0], [-1.7976931348623157e308, 1.7976931348623157e308], [5e307, -1e308, 1e308]],
                          "level": ["B", "A", "C"]})
    py, nat = _polarity_python(frame, Thresholds()), _polarity_native(frame, Thresholds())
    assert py.equals(nat)
    assert py["norm_scores"].to_list()[0] == [1.0, 0.5, 0.0]
    assert py["polarity"].to_list() == [[1, 0, -1], [1, -1], [1, 0, -1]]


def test_normalisation_is_exact_on_subnormal_and_huge_finite_scores() -> None:
    """(s - lo) / (hi - lo) without a needless rescale: halving a subnormal
    loses it (5e-324 / 2 rounds to 0), doubling 1.5e308 overflows. Both paths."""
    from deft.grade import _polarity_native, _polarity_python, Thresholds, polarity_reference

    cases = [([1e-323, 0.0, 5e-324], [1.0, 0.5, 0.0]), ([1.5e308, 0.0, 7.5e307], [1.0, 0.5, 0.0]),
             ([0.0, -1.6e308, -8e307], [1.0, 0.5, 0.0])]
    for scores, norm in cases:
        assert polarity_reference(scores, "B")[1] == norm, scores
    frame = pl.DataFrame({"scores": [c[0] for c in cases], "level": ["B", "A", "C"]})
    py, nat = _polarity_python(frame, Thresholds()), _polarity_native(frame, Thresholds())
    assert py.equals(nat) and py["norm_scores"].to_list() == [c[1] for c in cases]


def test_python_polarity_uses_the_given_thresholds_and_keeps_its_schema_when_empty() -> None:
    from deft.grade import _polarity_native, _polarity_python, Thresholds

    frame = pl.DataFrame({"scores": [[4.0, 3.0, 2.0, 1.0, 0.0]] * 3, "level": ["A", "B", "C"]})
    th = Thresholds(a_pos=0.6, a_neg=0.3, b_pos=None, b_neg=0.3, c_pos=0.7, c_neg=None)
    py, nat = _polarity_python(frame, th), _polarity_native(frame, th)
    assert py.equals(nat)
    # normalised 1, .75, .5, .25, 0: A +,+,0,-,- ; B +,0,0,-,- ; C +,+,0,0,-
    assert py["polarity"].to_list() == [[1, 1, 0, -1, -1], [1, 0, 0, -1, -1], [1, 1, 0, 0, -1]]
    assert _polarity_python(frame, Thresholds())["polarity"].to_list() != py["polarity"].to_list()
    empty = _polarity_python(frame.head(0), th)
    assert empty.height == 0 and empty.schema == {"human_order": pl.List(pl.Int64), "norm_scores": pl.List(pl.Float64),
                                                  "polarity": pl.List(pl.Int8)}
    assert empty.schema == _polarity_native(frame.head(0), th).schema


def test_a_single_sample_is_graded_and_summarised_exactly() -> None:
    from deft.grade import grade, summary

    frame = pl.DataFrame({"id": ["x"], "subset": ["s"], "context": [[{"role": "user", "content": "q"}]],
                          "responses": [["a", "b", "c", "d"]], "scores": [[4.0, 3.5, 1.0, 0.0]], "ranked": [True],
                          "meta": [None]},
                         schema={"id": pl.Utf8, "subset": pl.Utf8, "context": pl.List(pl.Struct({"role": pl.Utf8, "content": pl.Utf8})),
                                 "responses": pl.List(pl.Utf8), "scores": pl.List(pl.Float64), "ranked": pl.Boolean,
                                 "meta": pl.Utf8})
    g = grade(frame, a=60, c=10)  # one sample: round(0.6) = 1 in A, round(0.1) = 0 in C
    assert g.height == 1 and g["level"].to_list() == ["A"]
    assert g["polarity"].to_list() == [[1, 1, 0, -1]]  # normalised 1, .875, .25, 0: A is > 0.8 and the worst
    s = summary(g)
    assert s.select("subset", "level", "samples", "q_pos", "q_neg").rows() == [("s", "A", 1, 2, 1)]
