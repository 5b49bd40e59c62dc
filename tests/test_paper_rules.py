"""The paper's grading rule, pinned end to end with values worked out by hand.

Every expected value below was written from the paper's rule, not computed
by deft:

* samples ranked by their best response's score (ties: smaller ``id`` first);
  top ``n_A = max(1, floor(n*a/100 + 0.5))`` are level A, bottom
  ``n_C = min(floor(n*c/100 + 0.5), n - n_A)`` level C, the rest B
  (a = 3.73, c = 12.5);
* per sample, ``r = (s - min) / (max - min)``, responses best-first; the best
  is Q+ and the worst Q-; A: r > 0.8 -> Q+; B: r > 0.9 -> Q+, r < 0.1 -> Q-;
  C: r < 0.2 -> Q-; strict; all-equal scores: r = 0.5 and no Q+/Q-.

Scores are ``r * 2**k`` with min 0, so that ``(s - min) / (max - min)`` gives
back ``r`` exactly and responses can sit exactly at a threshold.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import polars as pl
import pytest
import typer
from typer.testing import CliRunner

from deft.cli import _threshold, app
from deft.data import load
from deft.grade import Thresholds, grade, level_counts

runner = CliRunner()

# ---------------------------------------------------------------------------
# the hand-worked file: 8 samples, defaults a = 3.73, c = 12.5
#   n_A = max(1, floor(8 * 0.0373 + 0.5)) = max(1, floor(0.7984)) = 1
#   n_C = floor(8 * 0.125 + 0.5) = floor(1.5) = 1
# so the sample with the highest best score is A, the lowest C, six are B.
# Each sample: (id, scale = its best score, r values in FILE order,
#               expected best-first [(r, polarity)], level, level_rank)

CASES = [
    # level A (best 4): r > 0.8 -> Q+; no Q- rule (0.05 stays 0); 0.8 itself is not > 0.8
    ("s-a", 4.0, [0.79, 1.0, 0.8, 0.05, 0.81, 0.0],
     [(1.0, 1), (0.81, 1), (0.8, 0), (0.79, 0), (0.05, 0), (0.0, -1)], "A", 1),
    # level B (best 2): r > 0.9 -> Q+, r < 0.1 -> Q-; 0.9 and 0.1 themselves stay 0
    ("s-b1", 2.0, [0.9, 0.0, 0.91, 1.0, 0.1, 0.09],
     [(1.0, 1), (0.91, 1), (0.9, 0), (0.1, 0), (0.09, -1), (0.0, -1)], "B", 2),
    # level B (best 1): A's 0.8 and C's 0.2 rules do not apply in B
    ("s-b2", 1.0, [0.85, 0.0, 0.15, 1.0, 0.5],
     [(1.0, 1), (0.85, 0), (0.5, 0), (0.15, 0), (0.0, -1)], "B", 3),
    # level B (best 0.5): 0.24 and 0.2 are not below 0.1
    ("s-b3", 0.5, [0.2, 1.0, 0.0, 0.24, 0.89],
     [(1.0, 1), (0.89, 0), (0.24, 0), (0.2, 0), (0.0, -1)], "B", 4),
    # level B (best 0.25): all-equal scores: r = 0.5, no Q+ and no Q-
    ("s-beq", 0.25, [1.0, 1.0, 1.0],
     [(0.5, 0), (0.5, 0), (0.5, 0)], "B", 5),
    # level B (best 0.125): exactly at both thresholds -> 0
    ("s-b5", 0.125, [0.0, 0.9, 1.0, 0.1],
     [(1.0, 1), (0.9, 0), (0.1, 0), (0.0, -1)], "B", 6),
    # level B (best 0.0625): two responses at 0.5
    ("s-b6", 0.0625, [0.5, 0.0, 1.0, 0.5],
     [(1.0, 1), (0.5, 0), (0.5, 0), (0.0, -1)], "B", 7),
    # level C (best 1/32): r < 0.2 -> Q-; no Q+ rule (0.95 stays 0); 0.2 itself is not < 0.2
    ("s-c", 1.0 / 32, [0.95, 0.0, 1.0, 0.2, 0.19, 0.21],
     [(1.0, 1), (0.95, 0), (0.21, 0), (0.2, 0), (0.19, -1), (0.0, -1)], "C", 8),
]

# the original index (file order) of each response, best-first, by hand
HUMAN_ORDER = {
    "s-a": [1, 4, 2, 0, 3, 5],
    "s-b1": [3, 2, 0, 4, 5, 1],
    "s-b2": [3, 0, 4, 2, 1],
    "s-b3": [1, 4, 3, 0, 2],
    "s-beq": [0, 1, 2],
    "s-b5": [2, 1, 3, 0],
    "s-b6": [2, 0, 3, 1],  # stable: the two 0.5 keep file order
    "s-c": [2, 0, 5, 3, 4, 1],
}


def _records(cases=CASES) -> List[dict]:
    out = []
    for sid, scale, rs, _want, _lv, _rank in cases:
        out.append({
            "id": sid,
            "prompt": f"prompt of {sid}",
            "responses": [f"{sid} response {i}" for i in range(len(rs))],
            "scores": [r * scale if sid != "s-beq" else scale for r in rs],
        })
    return out


def _write(path: Path, records: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _by_id(graded: pl.DataFrame) -> Dict[str, dict]:
    return {r["id"]: r for r in graded.iter_rows(named=True)}


def _check_hand_table(graded: pl.DataFrame, cases=CASES, polarity_override=None) -> None:
    rows = _by_id(graded)
    assert sorted(rows) == sorted(c[0] for c in cases)
    for sid, scale, _rs, want, level, rank in cases:
        r = rows[sid]
        assert r["level"] == level, sid
        assert r["level_rank"] == rank, sid
        assert r["norm_scores"] == [w[0] for w in want], sid
        pol = polarity_override[sid] if polarity_override and sid in polarity_override else [w[1] for w in want]
        assert r["polarity"] == pol, sid
        assert r["human_order"] == HUMAN_ORDER[sid], sid
        assert r["responses"] == [f"{sid} response {i}" for i in HUMAN_ORDER[sid]], sid
        assert r["best_score"] == scale, sid


# ---------------------------------------------------------------------------
# (a) defaults


def test_default_thresholds_are_the_papers():
    th = Thresholds()
    assert th.a_pos == 0.8
    assert th.a_neg is None
    assert th.b_pos == 0.9
    assert th.b_neg == 0.1
    assert th.c_pos is None
    assert th.c_neg == 0.2
    assert th.rule("A") == (0.8, None)
    assert th.rule("B") == (0.9, 0.1)
    assert th.rule("C") == (None, 0.2)
    sig = inspect.signature(grade)
    assert sig.parameters["a"].default == 3.73
    assert sig.parameters["c"].default == 12.5
    assert sig.parameters["thresholds"].default == Thresholds()


def _grade_command():
    group = typer.main.get_command(app)
    return group.commands["grade"]  # type: ignore[attr-defined]


def test_cli_grade_defaults_are_the_papers():
    params = {p.name: p for p in _grade_command().params}
    assert params["a"].default == 3.73
    assert params["c"].default == 12.5
    assert params["a_pos"].default == 0.8
    assert params["b_pos"].default == 0.9
    assert params["b_neg"].default == 0.1
    assert params["c_neg"].default == 0.2
    assert "--a-pos" in params["a_pos"].opts and "--b-pos" in params["b_pos"].opts
    assert "--b-neg" in params["b_neg"].opts and "--c-neg" in params["c_neg"].opts


def test_negative_threshold_means_no_rule():
    assert _threshold(-1.0) is None
    assert _threshold(-0.5) is None
    assert _threshold(-1e-9) is None
    assert _threshold(None) is None
    assert _threshold(0.0) == 0.0
    assert _threshold(0.3) == 0.3
    assert _threshold(1.0) == 1.0


# ---------------------------------------------------------------------------
# (b) hand-worked ranked lists at each level


@pytest.fixture(scope="module")
def hand_file(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("paper") / "hand.jsonl", _records())


@pytest.mark.parametrize("native", [True, False])
def test_hand_table_through_grade(hand_file, native):
    frame = load(hand_file).frame
    _check_hand_table(grade(frame, native=native))


def test_hand_table_scores_reordered_best_first(hand_file):
    rows = _by_id(grade(load(hand_file).frame))
    for sid, scale, rs, want, _lv, _rank in CASES:
        if sid == "s-beq":
            assert rows[sid]["scores"] == [scale] * 3
        else:
            assert rows[sid]["scores"] == [w[0] * scale for w in want]


def _cli_grade(tmp_path: Path, inp: Path, *extra: str) -> pl.DataFrame:
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    r = runner.invoke(app, ["grade", "-i", str(inp), "--use-input-scores", "-o", str(out), *extra])
    assert r.exit_code == 0, r.output
    return pl.read_parquet(out / "graded.parquet")


def test_hand_table_through_cli_defaults(tmp_path, hand_file):
    _check_hand_table(_cli_grade(tmp_path, hand_file))


def test_cli_negative_thresholds_leave_only_best_and_worst(tmp_path, hand_file):
    graded = _cli_grade(tmp_path, hand_file, "--a-pos", "-1", "--b-pos", "-1", "--b-neg", "-1", "--c-neg", "-1")
    override = {}
    for sid, _scale, _rs, want, _lv, _rank in CASES:
        if sid == "s-beq":
            override[sid] = [0, 0, 0]
        else:
            override[sid] = [1] + [0] * (len(want) - 2) + [-1]
    _check_hand_table(graded, polarity_override=override)


def test_cli_thresholds_move_membership(tmp_path, hand_file):
    # --a-pos 0.5: A's 0.8 and 0.79 join Q+; --b-neg 0.25: B's 0.24, 0.2 (and 0.15, 0.1, 0.09) join Q-;
    # --b-pos 0.88: B's 0.89, 0.9 join Q+; --c-neg 0.96: C's 0.95, 0.21, 0.2, 0.19 join Q-
    graded = _cli_grade(tmp_path, hand_file, "--a-pos", "0.5", "--b-pos", "0.88", "--b-neg", "0.25", "--c-neg", "0.96")
    override = {
        "s-a": [1, 1, 1, 1, 0, -1],
        "s-b1": [1, 1, 1, -1, -1, -1],
        "s-b2": [1, 0, 0, -1, -1],
        "s-b3": [1, 1, -1, -1, -1],
        "s-beq": [0, 0, 0],
        "s-b5": [1, 1, -1, -1],
        "s-b6": [1, 0, 0, -1],
        "s-c": [1, -1, -1, -1, -1, -1],
    }
    _check_hand_table(graded, polarity_override=override)


def test_cli_a_pos_0_6_differs_from_default(tmp_path, hand_file):
    # the default a_pos is 0.8: with 0.6, A's 0.8 and 0.79 are Q+ (a wrong default would look like this)
    rows = _by_id(_cli_grade(tmp_path, hand_file, "--a-pos", "0.6"))
    assert rows["s-a"]["polarity"] == [1, 1, 1, 1, 0, -1]
    rows = _by_id(grade(load(hand_file).frame))
    assert rows["s-a"]["polarity"] == [1, 1, 0, 0, 0, -1]


# ---------------------------------------------------------------------------
# (c) level counts with a fractional part of .5, above and below

COUNTS = [
    # (n, a, c, n_A, n_C), each worked by hand
    (4, 3.73, 12.5, 1, 1),        # 0.1492 -> 0 -> at least 1; 0.5 -> 1 (half up)
    (4, 12.5, 12.5, 1, 1),        # 0.5 -> 1; 0.5 -> 1
    (4, 12.5, 37.5, 1, 2),        # 0.5 -> 1; 1.5 -> 2
    (20, 12.5, 12.5, 3, 3),       # 2.5 -> 3 (banker's rounding would give 2)
    (20, 12.4, 12.4, 2, 2),       # 2.48 -> 2
    (20, 12.6, 12.6, 3, 3),       # 2.52 -> 3
    (20, 7.5, 17.5, 2, 4),        # 1.5 -> 2; 3.5 -> 4
    (16, 9.375, 15.625, 2, 3),    # 1.5 -> 2; 2.5 -> 3
    (40, 3.75, 11.25, 2, 5),      # 1.5 -> 2; 4.5 -> 5
    (1000, 0.05, 0.15, 1, 2),     # 0.5 -> 1; 1.5 -> 2
    (8, 3.73, 12.5, 1, 1),        # 0.2984 -> 0 -> 1; 1.0 -> 1
    (10, 3.73, 12.5, 1, 1),       # 0.373 -> 1; 1.25 -> 1
    (160_800, 3.73, 12.5, 5998, 20100),  # 5997.84 -> 5998; 20100
    (1, 3.73, 12.5, 1, 0),        # A takes the only sample
    (1, 10.0, 60.0, 1, 0),        # n_C = floor(1.1) = 1, cut to n - n_A = 0
    (2, 10.0, 75.0, 1, 1),        # n_C = floor(2.0) = 2, cut to n - n_A = 1
    (3, 49.0, 50.0, 1, 2),        # 1.47 -> 1; 1.5 -> 2 = n - n_A
]


@pytest.mark.parametrize("n,a,c,n_a,n_c", COUNTS)
def test_level_counts_by_hand(n, a, c, n_a, n_c):
    assert level_counts(n, a, c) == (n_a, n_c)


def _ranked_samples(n: int) -> List[dict]:
    # sample k (k = 1..n) has best score n + 1 - k: rank k; ids sort in rank order
    return [{"id": f"r{k:03d}", "prompt": "p", "responses": ["good", "bad"], "scores": [float(n + 1 - k), 0.0]}
            for k in range(1, n + 1)]


def _levels_by_rank(graded: pl.DataFrame) -> str:
    return "".join(graded.sort("level_rank").get_column("level").to_list())


@pytest.mark.parametrize("n,a,c,want", [
    (4, 3.73, 12.5, "ABBC"),                 # n_C = floor(0.5 + 0.5) = 1
    (20, 12.5, 12.5, "AAA" + "B" * 14 + "CCC"),
    (20, 12.4, 12.6, "AA" + "B" * 15 + "CCC"),
    (2, 10.0, 75.0, "AC"),
    (3, 49.0, 50.0, "ACC"),
])
def test_levels_through_grade(tmp_path, n, a, c, want):
    frame = load(_write(tmp_path / "ranked.jsonl", _ranked_samples(n))).frame
    graded = grade(frame, a=a, c=c)
    assert _levels_by_rank(graded) == want
    assert graded.sort("level_rank").get_column("id").to_list() == [f"r{k:03d}" for k in range(1, n + 1)]


def test_levels_through_cli(tmp_path):
    inp = _write(tmp_path / "ranked.jsonl", _ranked_samples(4))
    sub = tmp_path / "runs"
    sub.mkdir()
    assert _levels_by_rank(_cli_grade(sub, inp)) == "ABBC"  # defaults: the half-up n_C
    inp = _write(tmp_path / "ranked8.jsonl", _ranked_samples(8))
    # 8 * 31.25% = 2.5 -> 3 A; 8 * 18.75% = 1.5 -> 2 C
    assert _levels_by_rank(_cli_grade(sub, inp, "--a", "31.25", "--c", "18.75")) == "AAABBBCC"


# ---------------------------------------------------------------------------
# (d) the tie-break by id: equal best scores, the smaller id ranks higher

TIE_IDS_FILE_ORDER = ["g", "b", "h", "a", "e", "c", "f", "d"]


def _tie_records() -> List[dict]:
    # every sample: best 1.0, then 0.85, 0.15, 0.0 -> r = 1, 0.85, 0.15, 0 in every level
    return [{"id": i, "prompt": f"p{i}", "responses": [f"{i}0", f"{i}1", f"{i}2", f"{i}3"],
             "scores": [0.15, 1.0, 0.0, 0.85]} for i in TIE_IDS_FILE_ORDER]


@pytest.mark.parametrize("native", [True, False])
def test_tie_break_by_id(tmp_path, native):
    graded = grade(load(_write(tmp_path / "ties.jsonl", _tie_records())).frame, native=native)
    rows = _by_id(graded)
    # 8 samples, defaults: 1 A (the smallest id "a"), 1 C (the largest id "h")
    assert {i: rows[i]["level_rank"] for i in rows} == {i: k + 1 for k, i in enumerate("abcdefgh")}
    assert {i: rows[i]["level"] for i in rows} == {"a": "A", "b": "B", "c": "B", "d": "B", "e": "B", "f": "B", "g": "B", "h": "C"}
    # best-first r = 1, 0.85, 0.15, 0: A: 0.85 > 0.8 -> Q+; B: neither; C: 0.15 < 0.2 -> Q-
    assert rows["a"]["polarity"] == [1, 1, 0, -1]
    for i in "bcdefg":
        assert rows[i]["polarity"] == [1, 0, 0, -1]
    assert rows["h"]["polarity"] == [1, 0, -1, -1]
    assert rows["a"]["responses"] == ["a1", "a3", "a0", "a2"]


def test_tie_break_by_id_through_cli(tmp_path):
    inp = _write(tmp_path / "ties.jsonl", _tie_records())
    sub = tmp_path / "runs"
    sub.mkdir()
    graded = _cli_grade(sub, inp)
    assert graded.sort("level_rank").get_column("id").to_list() == list("abcdefgh")
    assert _levels_by_rank(graded) == "ABBBBBBC"
