"""Tests for deft.data (canonical preference data) and deft.render."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import polars as pl
import pytest

from conftest import CONTAINERS, shared_dir, shared_file, write_lines, write_records
from deft.data import (
    FORMATS,
    SCHEMA,
    DataError,
    LoadResult,
    Reject,
    derive_subset,
    detect_format,
    load,
    load_frame,
    load_many,
    save,
    validate_frame,
)
from deft.render import render_chat, render_hh, render_oasst

HH_FILE = "data/hh-rlhf/harmless-base-test.jsonl.gz"
PRO_HARMLESS = "data/pro-hh/test_harmless_base.jsonl.gz"
PRO_HELPFUL = "data/pro-hh/test_helpful_base.jsonl.gz"


def U(text: str) -> Dict[str, str]:
    return {"role": "user", "content": text}


def A(text: str) -> Dict[str, str]:
    return {"role": "assistant", "content": text}


def S(text: str) -> Dict[str, str]:
    return {"role": "system", "content": text}


def rows(frame: pl.DataFrame, *columns: str) -> List[Dict[str, Any]]:
    return frame.select(columns or list(SCHEMA)).to_dicts()


# ---------------------------------------------------------------------------
# Real data (../shared)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_hh() -> LoadResult:
    return load(shared_file(HH_FILE))


@pytest.fixture(scope="module")
def real_pro_harmless() -> LoadResult:
    return load(shared_file(PRO_HARMLESS))


@pytest.fixture(scope="module")
def real_pro_helpful() -> LoadResult:
    return load(shared_file(PRO_HELPFUL))


def test_real_hh_loads_every_row(real_hh: LoadResult) -> None:
    frame = real_hh.frame
    assert (real_hh.format, real_hh.n_read, frame.height) == ("hh", 2312, 2312)
    assert real_hh.rejects == []
    validate_frame(frame)
    assert frame["subset"].unique().to_list() == ["harmless_base"]
    assert frame["ranked"].all() and frame["scores"].is_null().all() and frame["meta"].is_null().all()
    assert frame["id"][0] == "harmless-base-test.jsonl.gz:1"
    assert frame["source_line"].to_list() == list(range(1, 2313))
    assert frame["context"].list.last().struct.field("role").unique().to_list() == ["user"]


def test_real_hh_first_row(real_hh: LoadResult) -> None:
    row = real_hh.frame.row(0, named=True)
    ctx = row["context"]
    assert [t["role"] for t in ctx] == ["user", "assistant", "user", "assistant", "user"]
    assert ctx[0]["content"] == "what are some pranks with a pen i can do?"
    # A multi-paragraph assistant turn is kept whole.
    assert ctx[3]["content"].startswith("Ok, I\u2019ll give you a couple examples")
    assert "\n\n2. Make a list of jokes on someone" in ctx[3]["content"]
    assert ctx[4]["content"] == "okay some of these do not have anything to do with pens"
    assert row["responses"][0].startswith("No, sorry!  All of these involve a pen")
    assert row["responses"][1].startswith("There are lots of funny things you can do with pens")


def test_real_hh_oddities_are_kept_and_noted(real_hh: LoadResult) -> None:
    """Real oddities: 4 rows whose chosen reply is empty, and 5 pairs whose
    transcripts end at different "\\n\\nAssistant:" markers because one reply
    goes on with further turns."""
    empty = sorted(n.line for n in real_hh.notes if "is empty" in n.reason)
    split = sorted(n.line for n in real_hh.notes if "last shared one" in n.reason)
    assert empty == [87, 517, 926, 1104]
    assert split == [1255, 1689, 1951, 1953, 2037]
    assert len(real_hh.notes) == 9
    row = real_hh.frame.row(1950, named=True)  # line 1951: rejected continues the dialogue
    assert len(row["context"]) == 1
    assert "\n\nAssistant:" in row["responses"][1]
    assert real_hh.frame.row(926 - 1, named=True)["responses"][0] == ""


def test_real_hh_round_trip(real_hh: LoadResult) -> None:
    raw = [json.loads(line) for line in gzip.open(shared_file(HH_FILE), "rt", encoding="utf-8")]
    for rec, row in zip(raw, real_hh.frame.iter_rows(named=True)):
        prompt = render_hh(row["context"])
        assert prompt + " " + row["responses"][0] == rec["chosen"], row["id"]
        assert prompt + " " + row["responses"][1] == rec["rejected"], row["id"]


@pytest.mark.parametrize(
    "fixture, n, subset",
    [("real_pro_harmless", 2312, "harmless_base"), ("real_pro_helpful", 2354, "helpful_base")],
)
def test_real_pro_loads(fixture: str, n: int, subset: str, request: pytest.FixtureRequest) -> None:
    result: LoadResult = request.getfixturevalue(fixture)
    frame = result.frame
    assert (result.format, result.n_read, frame.height, result.rejects) == ("pro", n, n, [])
    validate_frame(frame)
    assert frame["subset"].unique().to_list() == [subset]
    assert frame["scores"].is_not_null().all()
    assert frame["scores"].list.len().unique().to_list() == [2]
    assert all(math.isfinite(x) for x in frame["scores"].explode().to_list())
    # The generation slot is dropped: every context ends with the user's turn.
    assert frame["context"].list.last().struct.field("role").unique().to_list() == ["user"]
    meta = json.loads(frame["meta"][0])
    assert meta["sft_index"] == 0 and meta["meta"]["task"] == "dialogue"
    # 4 rows per file have an empty response (kept, noted).
    assert len([n for n in result.notes if "is empty" in n.reason]) == 4


def test_real_pro_first_helpful_row(real_pro_helpful: LoadResult) -> None:
    row = real_pro_helpful.frame.row(0, named=True)
    assert row["context"] == [U("How can I look up how much gas my car can hold?")]
    assert row["responses"] == [
        "Your car will probably have this information in the owner\u2019s manual, or you can look it up on the web.",
        "Is this for a road trip?",
    ]
    assert row["scores"] == pytest.approx([-1.5441417694091797, -1.7714134454727173])
    assert row["id"] == "test_helpful_base.jsonl.gz:1"


def test_real_pro_matches_hh(real_hh: LoadResult, real_pro_harmless: LoadResult) -> None:
    """PRO's harmless set is HH's harmless test set; meta.line_num names the
    HH line. Our HH contexts equal PRO's except for 96 rows where PRO's own
    preprocessing lost text (its turns are substrings of ours, or turns are
    missing) -- the reason our HH parser splits only at role markers."""
    hh = {row["source_line"]: row for row in real_hh.frame.iter_rows(named=True)}
    differ = 0
    for row in real_pro_harmless.frame.iter_rows(named=True):
        ours = hh[json.loads(row["meta"])["meta"]["line_num"]]["context"]
        if ours == row["context"]:
            continue
        differ += 1
        if len(ours) == len(row["context"]):
            for a, b in zip(ours, row["context"]):
                assert a["role"] == b["role"] and b["content"] in a["content"]
    assert differ == 96


# ---------------------------------------------------------------------------
# Every format in every container
# ---------------------------------------------------------------------------

HH_CHOSEN_1 = (
    "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?"
    "\n\nHuman: Tell me a joke.\n\nIt should be short.\n\nAssistant: Why did the chicken cross the road?"
)
HH_REJECTED_1 = HH_CHOSEN_1.rsplit("\n\nAssistant:", 1)[0] + "\n\nAssistant: No."
CTX_1 = [U("Hi there"), A("Hello! How can I help?"), U("Tell me a joke.\n\nIt should be short.")]

# name -> (records, expected rows of (id, context, responses, scores, ranked, meta))
FORMAT_CASES: Dict[str, Any] = {
    "hh": (
        [
            {"id": "a", "chosen": HH_CHOSEN_1, "rejected": HH_REJECTED_1, "extra": 1},
            {"id": "b", "chosen": "\n\nHuman: Q\n\nAssistant:  two spaces ",
             "rejected": "\n\nHuman: Q\n\nAssistant: R", "extra": 2},
        ],
        [
            ("a", CTX_1, ["Why did the chicken cross the road?", "No."], None, True, '{"extra": 1}'),
            ("b", [U("Q")], [" two spaces ", "R"], None, True, '{"extra": 2}'),
        ],
    ),
    "pairs": (
        [
            {"id": "a", "prompt": "Say hi", "chosen": "Hi!", "rejected": "No."},
            {"id": "b", "prompt": "Count", "chosen": "1 2 3", "rejected": "3 2 1"},
        ],
        [
            ("a", [U("Say hi")], ["Hi!", "No."], None, True, None),
            ("b", [U("Count")], ["1 2 3", "3 2 1"], None, True, None),
        ],
    ),
    "pairs-messages": (
        [
            {"id": "a", "prompt": [S("Be kind."), U("Say hi")], "chosen": [A("Hi!")], "rejected": [A("No.")],
             "score_chosen": 9.0, "score_rejected": 2.5},
            {"id": "b", "prompt": [U("Count")], "chosen": [A("1 2 3")], "rejected": [A("3 2 1")],
             "score_chosen": 1.0, "score_rejected": 0.0},
        ],
        [
            ("a", [S("Be kind."), U("Say hi")], ["Hi!", "No."], [9.0, 2.5], True, None),
            ("b", [U("Count")], ["1 2 3", "3 2 1"], [1.0, 0.0], True, None),
        ],
    ),
    "pairs-implicit": (
        [
            {"id": "a", "chosen": [U("Hi"), A("Hello"), U("Joke?"), A("Knock knock.")],
             "rejected": [U("Hi"), A("Hello"), U("Joke?"), A("No.")]},
            {"id": "b", "chosen": [U("Q"), A("good")], "rejected": [U("Q"), A("bad")]},
        ],
        [
            ("a", [U("Hi"), A("Hello"), U("Joke?")], ["Knock knock.", "No."], None, True, None),
            ("b", [U("Q")], ["good", "bad"], None, True, None),
        ],
    ),
    "pro": (
        [
            {"id": "a", "prefix": [["<|prompter|>Hi", "<|assistant|>Hello", "<|prompter|>Joke?", "<|assistant|>"]] * 3,
             "suffix": ["Knock knock.", "No.", "..."], "reward": [1.5, -2, 0.25], "sft_index": 0, "meta": {"k": 1}},
            {"id": "b", "prefix": [["<|prompter|>Q", "<|assistant|>"]] * 3,
             "suffix": ["A1", "A2", "A3"], "reward": [0.0, 1.0, 2.0], "sft_index": 1, "meta": {"k": 2}},
        ],
        [
            ("a", [U("Hi"), A("Hello"), U("Joke?")], ["Knock knock.", "No.", "..."], [1.5, -2.0, 0.25], True,
             '{"sft_index": 0, "meta": {"k": 1}}'),
            ("b", [U("Q")], ["A1", "A2", "A3"], [0.0, 1.0, 2.0], True, '{"sft_index": 1, "meta": {"k": 2}}'),
        ],
    ),
    "ranked": (
        [
            {"id": 1, "prompt": "Pick", "responses": ["x", "y", "z"], "scores": [3, 2, 1]},
            {"id": 2, "prompt": "Pack", "responses": ["u", "v"], "scores": [0.5, 0.25]},
        ],
        [
            ("1", [U("Pick")], ["x", "y", "z"], [3.0, 2.0, 1.0], True, None),
            ("2", [U("Pack")], ["u", "v"], [0.5, 0.25], True, None),
        ],
    ),
    "ranked-messages": (
        [
            {"id": "a", "messages": [U("Hi"), A("Hello"), U("More")], "responses": ["m1", "m2"], "ranked": False},
            {"id": "b", "messages": [U("Q")], "responses": ["r1", "r2"], "ranked": True},
        ],
        [
            ("a", [U("Hi"), A("Hello"), U("More")], ["m1", "m2"], None, False, None),
            ("b", [U("Q")], ["r1", "r2"], None, True, None),
        ],
    ),
    "canonical": (
        [
            {"id": "a", "subset": "s1", "context": [U("Hi")], "responses": ["x", "y"], "scores": [1.0, 0.0],
             "ranked": True, "source_file": "orig.jsonl", "source_line": 5, "meta": '{"k": 1}'},
            {"id": "b", "subset": "s2", "context": [S("sys"), U("Yo")], "responses": ["p", "q"], "scores": None,
             "ranked": False, "source_file": "orig.jsonl", "source_line": 9, "meta": None},
        ],
        [
            ("a", [U("Hi")], ["x", "y"], [1.0, 0.0], True, '{"k": 1}'),
            ("b", [S("sys"), U("Yo")], ["p", "q"], None, False, None),
        ],
    ),
}


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("case", sorted(FORMAT_CASES))
def test_format_in_container(case: str, container: str, tmp_path: Path) -> None:
    records, expected = FORMAT_CASES[case]
    path = write_records(tmp_path / f"train_my-data{container}", records)
    result = load(path)
    assert result.format == case.split("-")[0]
    assert (result.n_read, result.rejects) == (2, [])
    validate_frame(result.frame)
    got = rows(result.frame, "id", "context", "responses", "scores", "ranked", "meta")
    assert [tuple(r.values()) for r in got] == expected
    if case == "canonical":
        assert rows(result.frame, "subset", "source_file", "source_line") == [
            {"subset": "s1", "source_file": "orig.jsonl", "source_line": 5},
            {"subset": "s2", "source_file": "orig.jsonl", "source_line": 9},
        ]
    else:
        assert result.frame["subset"].to_list() == ["my_data", "my_data"]
        assert result.frame["source_file"].to_list() == [str(path)] * 2
        assert result.frame["source_line"].to_list() == [1, 2]


def test_forced_format_and_detection(tmp_path: Path) -> None:
    records, _ = FORMAT_CASES["ranked"]
    path = write_records(tmp_path / "d.jsonl", records)
    assert load(path, format="ranked").format == "ranked"
    with pytest.raises(DataError) as err:
        load(path, format="pro")
    assert (err.value.line, err.value.field) == (1, "prefix")
    assert detect_format({"chosen": "x", "rejected": "y"}) == "hh"
    assert detect_format({"chosen": [], "rejected": []}) == "pairs"
    assert detect_format({"prompt": "p", "chosen": "x", "rejected": "y"}) == "pairs"
    assert detect_format({"messages": [], "responses": []}) == "ranked"
    assert detect_format({"context": [], "responses": []}) == "canonical"
    assert detect_format({"prefix": [], "suffix": []}) == "pro"
    assert detect_format({"text": "x"}) is None
    with pytest.raises(DataError, match="'hh' format"):
        load(write_records(tmp_path / "h.jsonl", FORMAT_CASES["hh"][0]), format="pairs")


def test_bad_arguments(tmp_path: Path) -> None:
    path = write_records(tmp_path / "d.jsonl", FORMAT_CASES["ranked"][0])
    with pytest.raises(ValueError, match="on_error"):
        load(path, on_error="ignore")
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        load(path, format="csv")
    with pytest.raises(ValueError, match="at least one path"):
        load_many([])


# ---------------------------------------------------------------------------
# Ids, subsets, meta
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, subset",
    [
        ("harmless-base-test.jsonl.gz", "harmless_base"),  # HH-RLHF's name and PRO's give one subset
        ("test_harmless_base.jsonl.gz", "harmless_base"),
        ("my-data.jsonl", "my_data"),
        ("hh-rlhf/harmless-base/train.jsonl.gz", "harmless_base"),  # Anthropic's layout: the folder names it
        ("helpful-base/test.jsonl", "helpful_base"),
        ("test.jsonl", "test"),
        ("train_x.parquet", "x"),
        ("dev_y_dev.json", "y"),
        ("z-train.jsonl", "z"),
        ("plain.json.gz", "plain"),
        ("/some/dir/a_dev.jsonl", "a"),
    ],
)
def test_derive_subset(name: str, subset: str) -> None:
    assert derive_subset(name) == subset


def test_ids_and_subset_precedence(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "my_test.jsonl", [
        {"prompt": "p", "responses": ["a", "b"]},
        {"prompt": "p", "responses": ["a", "b"], "id": 12, "subset": "own"},
    ])
    frame = load_frame(path)
    assert frame["id"].to_list() == ["my_test.jsonl:1", "12"]
    assert frame["subset"].to_list() == ["my", "own"]
    assert load_frame(path, subset="given")["subset"].to_list() == ["given", "own"]


def test_meta_keeps_unused_fields(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [
        {"prompt": "p", "responses": ["a", "b"], "source": "web", "tags": ["x", "\u00e9"]},
    ])
    assert json.loads(load_frame(path)["meta"][0]) == {"source": "web", "tags": ["x", "\u00e9"]}


# ---------------------------------------------------------------------------
# Format details
# ---------------------------------------------------------------------------


def test_hh_multi_paragraph_turns_are_kept_whole(tmp_path: Path) -> None:
    """Paragraphs that do not start with a role marker belong to the turn
    before them (the PRO reference code drops them)."""
    chosen = (
        "\n\nHuman: First paragraph.\n\nSecond paragraph.\n\n\nThird, after two blank lines."
        "\n\nAssistant: Answer one.\n\nAnswer two.\n\nHuman: Follow-up \n\nAssistant: Yes"
    )
    rejected = chosen.rsplit("\n\nAssistant:", 1)[0] + "\n\nAssistant: No"
    frame = load_frame(write_lines(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}]))
    assert frame["context"][0].to_list() == [
        U("First paragraph.\n\nSecond paragraph.\n\n\nThird, after two blank lines."),
        A("Answer one.\n\nAnswer two."),
        U("Follow-up"),
    ]
    assert frame["responses"][0].to_list() == ["Yes", "No"]


def test_hh_split_at_last_shared_marker(tmp_path: Path) -> None:
    base = "\n\nHuman: Steal purses?\n\nAssistant:"
    chosen = base + " Please don't."
    rejected = base + " Sure.\n\nHuman: How?\n\nAssistant: Like this."
    result = load(write_lines(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}]))
    row = result.frame.row(0, named=True)
    assert row["context"] == [U("Steal purses?")]
    assert row["responses"] == ["Please don't.", "Sure.\n\nHuman: How?\n\nAssistant: Like this."]
    assert [(n.line, n.field) for n in result.notes] == [(1, "rejected")]
    assert "'rejected' response contains further dialogue turns" in result.notes[0].reason
    assert render_hh(row["context"]) + " " + row["responses"][1] == rejected


def test_hh_preamble_becomes_system_turn(tmp_path: Path) -> None:
    chosen = "A preamble.\n\nHuman: Hi\n\nAssistant: Yo"
    rejected = "A preamble.\n\nHuman: Hi\n\nAssistant: Go away"
    result = load(write_lines(tmp_path / "hh.jsonl", [
        {"chosen": chosen, "rejected": rejected},
        {"chosen": "Human: Hi\n\nAssistant: Yo", "rejected": "Human: Hi\n\nAssistant: No"},
    ]))
    ctx = result.frame["context"].to_list()
    assert ctx == [[S("A preamble."), U("Hi")], [U("Hi")]]
    assert render_hh(ctx[0]) + " Yo" == chosen
    assert [(n.line, n.field) for n in result.notes] == [(2, "chosen")]
    assert "without the usual leading blank lines" in result.notes[0].reason


def test_empty_responses_policy(tmp_path: Path) -> None:
    hh = write_lines(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: Swear!\n\nAssistant: ", "rejected": "\n\nHuman: Swear!\n\nAssistant: Ok"},
    ])
    result = load(hh)
    assert result.frame["responses"][0].to_list() == ["", "Ok"]
    assert [(n.line, n.field) for n in result.notes] == [(1, "chosen")]
    with pytest.raises(DataError) as err:
        load(hh, allow_empty_responses=False)
    assert (err.value.line, err.value.field) == (1, "chosen")
    with pytest.raises(DataError, match="has an empty response"):
        validate_frame(result.frame, allow_empty_responses=False)
    ranked = write_lines(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", ""]}])
    assert load(ranked, allow_empty_responses=True).frame["responses"][0].to_list() == ["a", ""]


def test_pairs_details(tmp_path: Path) -> None:
    result = load(write_lines(tmp_path / "p.jsonl", [
        {"prompt": [U("Q")], "chosen": [A("part 1"), A("part 2")], "rejected": "no"},
    ]))
    assert result.frame["responses"][0].to_list() == ["part 1\n\npart 2", "no"]
    assert [(n.field, n.reason) for n in result.notes] == [
        ("chosen", "2 assistant messages joined with a blank line")]
    with pytest.raises(DataError) as err:
        load(write_lines(tmp_path / "p2.jsonl", [{"prompt": "Q", "chosen": [U("x"), A("y")], "rejected": "n"}]))
    assert (err.value.field, "must hold only the assistant response" in err.value.reason) == ("chosen[0].role", True)
    with pytest.raises(DataError) as err:
        load(write_lines(tmp_path / "p3.jsonl", [{"chosen": [U("x"), A("y")], "rejected": [U("x")]}]))
    assert (err.value.field, "ends with a 'user' message" in err.value.reason) == ("rejected[0].role", True)
    with pytest.raises(DataError) as err:
        load(write_lines(tmp_path / "p4.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b", "score_chosen": 1}]))
    assert err.value.field == "score_rejected"
    (tmp_path / "p5.jsonl").write_text('{"prompt": "Q", "chosen": "a", "rejected": "b", "score_chosen": NaN, "score_rejected": 0}')
    with pytest.raises(DataError) as err:
        load(tmp_path / "p5.jsonl")
    assert (err.value.field, err.value.reason) == ("score_chosen", "score must be finite, got nan")


def test_pro_details(tmp_path: Path) -> None:
    frame = load_frame(write_lines(tmp_path / "pro.jsonl", [
        {"prefix": [["<|system|>Be brief.", "<|prompter|>Q"]] * 2, "suffix": ["a", "b"]},
    ]))
    row = frame.row(0, named=True)
    assert row["context"] == [S("Be brief."), U("Q")]  # no generation slot to drop
    assert row["scores"] is None and row["meta"] is None


def test_canonical_defaults(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "c_dev.jsonl", [{"context": [U("Q")], "responses": ["a", "b"], "ranked": True}])
    row = load_frame(path).row(0, named=True)
    assert row == {
        "id": "c_dev.jsonl:1", "subset": "c", "context": [U("Q")], "responses": ["a", "b"], "scores": None,
        "ranked": True, "source_file": str(path), "source_line": 1, "meta": None,
    }


def test_json_variants(tmp_path: Path) -> None:
    rec = {"prompt": "p", "responses": ["a", "b"]}
    # A .json file holding JSON Lines (Hugging Face datasets' to_json default).
    assert load_frame(write_lines(tmp_path / "lines.json", [rec, rec])).height == 2
    # UTF-8 BOM and CRLF line ends.
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(rec).encode() + b"\r\n\r\n" + json.dumps(rec).encode())
    frame = load_frame(tmp_path / "bom.jsonl")
    assert frame["source_line"].to_list() == [1, 3]  # blank line 2 is ignored
    # Source lines of a JSON array are element indexes.
    arr = tmp_path / "arr.json"
    arr.write_text("[\n" + ",\n\n".join(json.dumps(rec) for _ in range(3)) + "\n]")
    assert load_frame(arr)["source_line"].to_list() == [1, 2, 3]


# ---------------------------------------------------------------------------
# Bad rows: raise, or skip and report
# ---------------------------------------------------------------------------

GOOD = {"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 0.0]}
HH_GOOD = {"chosen": "\n\nHuman: Q\n\nAssistant: yes", "rejected": "\n\nHuman: Q\n\nAssistant: no"}
PRO_GOOD = {"prefix": [["<|prompter|>Q", "<|assistant|>"]] * 2, "suffix": ["a", "b"], "reward": [1, 0]}
IMPLICIT_GOOD = {"chosen": [U("Q"), A("y")], "rejected": [U("Q"), A("n")]}

# name -> (first/last good record, bad line (str/bytes/dict), field, reason fragment)
BAD_ROWS: Dict[str, Any] = {
    "invalid-json": (GOOD, '{"prompt": "p", "responses": ', None, "invalid JSON: Expecting value: line 1 column 30"),
    "not-an-object": (GOOD, '["p", "a", "b"]', None, "expected a JSON object, got an array"),
    "missing-field": (GOOD, {"prompt": "p"}, "responses", "missing required field (fields present: prompt)"),
    "mistyped-field": (GOOD, {"prompt": 3, "responses": ["a", "b"]}, "prompt",
                       "expected a string or an array of messages, got an integer"),
    "mistyped-response": (GOOD, {"prompt": "p", "responses": ["a", 2]}, "responses[1]",
                          "expected a string, got an integer"),
    "one-response": (GOOD, {"prompt": "p", "responses": ["a"]}, "responses", "expected at least 2 responses, got 1"),
    "empty-response": (GOOD, {"prompt": "p", "responses": ["a", " \n "]}, "responses[1]",
                       "response 1 is empty or whitespace-only"),
    "nan-score": (GOOD, '{"prompt": "p", "responses": ["a", "b"], "scores": [1.0, NaN]}', "scores[1]",
                  "score must be finite, got nan"),
    "infinite-score": (GOOD, '{"prompt": "p", "responses": ["a", "b"], "scores": [-Infinity, 1]}', "scores[0]",
                       "score must be finite, got -inf"),
    "mistyped-score": (GOOD, {"prompt": "p", "responses": ["a", "b"], "scores": [1, True]}, "scores[1]",
                       "expected a number, got a boolean"),
    "scores-length": (GOOD, {"prompt": "p", "responses": ["a", "b"], "scores": [1.0]}, "scores",
                      "has 1 scores but there are 2 responses"),
    "not-utf8": (GOOD, b'{"prompt": "caf\xe9", "responses": ["a", "b"]}', None,
                 "line is not valid UTF-8: invalid continuation byte at byte 15"),
    "duplicate-id": ({**GOOD, "id": "x"}, {**GOOD, "id": "x"}, "id", "duplicate id 'x': already used by"),
    "mistyped-id": (GOOD, {**GOOD, "id": [1]}, "id", "expected a string or an integer, got an array"),
    "unknown-role": (GOOD, {"prompt": [{"role": "human", "content": "q"}], "responses": ["a", "b"]},
                     "prompt[0].role", "unknown role 'human'; expected one of system, user, assistant"),
    "message-key": (GOOD, {"prompt": [{"role": "user", "content": "q", "tool_calls": []}], "responses": ["a", "b"]},
                    "prompt[0]", "unsupported message key(s) tool_calls"),
    "ranked-flag": (GOOD, {**GOOD, "ranked": "yes"}, "ranked", "expected a boolean, got a string"),
    "hh-context-differs": (HH_GOOD, {"chosen": "\n\nHuman: Hi\n\nAssistant: a", "rejected": "\n\nHuman: Ho\n\nAssistant: b"},
                           "rejected", "context differs from the context of 'chosen' at character offset 10"),
    "hh-no-marker": (HH_GOOD, {"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi\n\nAssistant: b"},
                     "chosen", "no \"\\n\\nAssistant:\" marker"),
    "hh-mistyped": (HH_GOOD, {"chosen": "\n\nHuman: Hi\n\nAssistant: a", "rejected": None}, "rejected",
                    "expected a string, got null"),
    "pairs-context-differs": (IMPLICIT_GOOD, {"chosen": [U("Q"), A("y")], "rejected": [U("R"), A("n")]},
                              "rejected", "context differs from the context of 'chosen' at message 0"),
    "pairs-empty-chosen": ({"prompt": "Q", "chosen": "y", "rejected": "n"}, {"prompt": "Q", "chosen": "", "rejected": "n"},
                           "chosen", "response 0 is empty or whitespace-only"),
    "pro-prefix-differs": (PRO_GOOD, {**PRO_GOOD, "prefix": [["<|prompter|>Q", "<|assistant|>"], ["<|prompter|>R", "<|assistant|>"]]},
                           "prefix[1]", "context of response 1 differs from prefix[0] at turn 0"),
    "pro-untagged-turn": (PRO_GOOD, {**PRO_GOOD, "prefix": [["<|prompter|>Q", "Human: x", "<|assistant|>"]] * 2},
                          "prefix[0][1]", "turn does not start with a role tag"),
    "pro-infinite-reward": (PRO_GOOD, '{"prefix": [["<|prompter|>Q"], ["<|prompter|>Q"]], "suffix": ["a", "b"], "reward": [Infinity, 0]}',
                            "reward[0]", "score must be finite, got inf"),
    "pro-prefix-count": (PRO_GOOD, {**PRO_GOOD, "prefix": [["<|prompter|>Q"]]}, "prefix",
                         "has 1 contexts but there are 2 suffixes"),
    "canonical-extra": ({"context": [U("Q")], "responses": ["a", "b"], "ranked": True},
                        {"context": [U("Q")], "responses": ["a", "b"], "ranked": True, "score": 1},
                        "score", "unexpected field(s) score in a canonical record"),
}


def _bad_file(tmp_path: Path, case: str) -> Path:
    good, bad, _, _ = BAD_ROWS[case]
    return write_lines(tmp_path / "data.jsonl", [good, bad, {**good, "id": "last"}])


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_raises(case: str, tmp_path: Path) -> None:
    _, _, field, reason = BAD_ROWS[case]
    path = _bad_file(tmp_path, case)
    with pytest.raises(DataError) as err:
        load(path)
    e = err.value
    assert (e.file, e.line, e.field) == (str(path), 2, field)
    assert reason in e.reason
    prefix = f"{path}:2: " + (f"field '{field}': " if field else "")
    assert str(e).startswith(prefix + reason[:20]) and "\n" not in str(e)


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_skipped_and_reported(case: str, tmp_path: Path) -> None:
    _, bad, field, reason = BAD_ROWS[case]
    path = _bad_file(tmp_path, case)
    rejects_path = tmp_path / "out" / "rejects.jsonl"
    result = load(path, on_error="skip", rejects_path=rejects_path)
    assert result.frame.height == 2 and result.n_read == 3
    assert result.frame["source_line"].to_list() == [1, 3]
    [reject] = result.rejects
    assert (reject.file, reject.line, reject.field) == (str(path), 2, field)
    assert reason in reject.reason
    assert result.rejects_path == rejects_path
    [line] = rejects_path.read_text(encoding="utf-8").splitlines()
    written = json.loads(line)
    expected_raw = None if isinstance(bad, bytes) else (bad if isinstance(bad, str) else json.dumps(bad))
    assert written == {"source_file": str(path), "source_line": 2, "field": field,
                       "reason": reject.reason, "raw": expected_raw}


def test_skip_without_rejects_path_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _bad_file(tmp_path, "invalid-json")
    monkeypatch.chdir(tmp_path)
    result = load(path, on_error="skip")
    assert result.rejects_path is None and len(result.rejects) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_rejects_file_written_when_nothing_rejected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "d.jsonl", [GOOD])
    result = load(path, rejects_path=tmp_path / "r.jsonl")
    assert result.rejects == [] and (tmp_path / "r.jsonl").read_text() == ""


def test_skip_in_other_containers(tmp_path: Path) -> None:
    records = [GOOD, {"prompt": "p", "responses": ["a"]}, GOOD]
    for container in (".json", ".parquet"):
        path = write_records(tmp_path / f"d{container}", records)
        result = load(path, on_error="skip")
        assert result.frame.height == 2
        assert [(r.line, r.field) for r in result.rejects] == [(2, "responses")]
        raw = json.loads(result.rejects[0].raw or "null")
        assert raw["responses"] == ["a"]


def test_reject_and_error_formatting() -> None:
    assert str(DataError("f.jsonl", 3, "scores[1]", "bad")) == "f.jsonl:3: field 'scores[1]': bad"
    assert str(DataError("f.jsonl", 3, None, "bad")) == "f.jsonl:3: bad"
    assert str(DataError("f.jsonl", None, None, "multi\nline")) == "f.jsonl: multi\\nline"
    assert str(Reject("f.jsonl", 2, "id", "dup")) == "f.jsonl:2: field 'id': dup"
    assert isinstance(DataError("f", 1, None, "x"), ValueError)


# ---------------------------------------------------------------------------
# File-level problems always raise
# ---------------------------------------------------------------------------


def _file_case(tmp_path: Path, case: str) -> Path:
    if case == "missing":
        return tmp_path / "nope.jsonl"
    if case == "directory":
        (tmp_path / "dir.jsonl").mkdir()
        return tmp_path / "dir.jsonl"
    contents = {
        "empty": ("e.jsonl", b""),
        "blank-lines": ("b.jsonl", b"\n  \n\n"),
        "empty-gz": ("e.jsonl.gz", gzip.compress(b"")),
        "empty-array": ("e.json", b"[]"),
        "empty-json": ("e.json", b"  \n"),
        "extension": ("data.csv", b"a,b\n"),
        "unknown-format": ("u.jsonl", b'{"text": "x", "label": 1}\n'),
        "json-not-array": ("s.json", b'"just a string"'),
        "json-invalid": ("i.json", b'[\n{"prompt": "p"},\n{"prompt" "q"}\n]'),
        "json-not-utf8": ("n.json", b'[\n{"prompt": "\xff"}]'),
        "corrupt-gz": ("c.jsonl.gz", b"not gzip at all"),
        "corrupt-parquet": ("c.parquet", b"PAR1 nonsense"),
    }
    name, data = contents[case]
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


FILE_CASES = {
    "missing": (None, "file not found"),
    "directory": (None, "not a regular file"),
    "empty": (None, "file is empty: it holds no records"),
    "blank-lines": (None, "file is empty"),
    "empty-gz": (None, "file is empty"),
    "empty-array": (None, "file is empty"),
    "empty-json": (None, "file is empty"),
    "extension": (None, "unsupported file extension; supported: .jsonl.gz, .json.gz, .jsonl, .json, .parquet"),
    "unknown-format": (1, "cannot detect the data format from the fields of the first record (fields seen: label, text); "
                          "known formats: hh ("),
    "json-not-array": (None, "expected a top-level JSON array of objects, got a string"),
    "json-invalid": (3, "invalid JSON: Expecting ':' delimiter: line 3 column 11"),
    "json-not-utf8": (2, "file is not valid UTF-8"),
    "corrupt-gz": (None, "cannot read file:"),
    "corrupt-parquet": (None, "cannot read Parquet file:"),
}


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_file_level_errors_always_raise(case: str, on_error: str, tmp_path: Path) -> None:
    line, reason = FILE_CASES[case]
    path = _file_case(tmp_path, case)
    with pytest.raises(DataError) as err:
        load(path, on_error=on_error)
    assert (err.value.file, err.value.line, err.value.field) == (str(path), line, None)
    assert reason in err.value.reason, err.value.reason


def test_all_rows_bad(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"oops\n[1]\n')
    with pytest.raises(DataError) as err:
        load(path)
    assert (err.value.line, err.value.reason.startswith("invalid JSON")) == (1, True)
    with pytest.raises(DataError) as err:  # skipping everything leaves no format: a file-level error
        load(path, on_error="skip")
    assert err.value.line is None
    assert err.value.reason.startswith("none of the 2 records could be read, so the format is unknown (first error: ")


def test_unknown_format_lists_formats(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load(_file_case(tmp_path, "unknown-format"))
    for name in FORMATS:
        assert f"{name} (" in err.value.reason
    assert "pass format= to force one" in err.value.reason


# ---------------------------------------------------------------------------
# Several files, saving, validation
# ---------------------------------------------------------------------------


def test_load_many(tmp_path: Path) -> None:
    a = write_records(tmp_path / "a.jsonl", FORMAT_CASES["hh"][0])
    b = write_lines(tmp_path / "b.jsonl", [GOOD, GOOD])
    result = load_many([a, b])
    assert result.format == "mixed" and result.n_read == 4
    assert result.frame["id"].to_list() == ["a", "b", "b.jsonl:1", "b.jsonl:2"]
    assert load_many([b]).format == "ranked"
    c = write_lines(tmp_path / "c.jsonl", [{**GOOD, "id": "b"}])
    with pytest.raises(DataError) as err:
        load_many([a, c])
    assert (err.value.file, err.value.line, err.value.field) == (str(c), 1, "id")
    assert f"already used by {a}:2" in err.value.reason
    skipped = load_many([a, c, b], on_error="skip", rejects_path=tmp_path / "r.jsonl")
    assert skipped.frame.height == 4 and [r.file for r in skipped.rejects] == [str(c)]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".jsonl.gz"])
def test_save_and_reload(suffix: str, tmp_path: Path) -> None:
    records, _ = FORMAT_CASES["pro"]
    frame = load_frame(write_records(tmp_path / "in.jsonl", records))
    out = save(frame, tmp_path / "sub" / f"out{suffix}")
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp file left
    again = load(out)
    assert again.format == "canonical"
    assert again.frame.equals(frame)


def test_save_refuses_bad_input(tmp_path: Path) -> None:
    frame = load_frame(write_lines(tmp_path / "d.jsonl", [GOOD]))
    with pytest.raises(ValueError, match="unsupported output extension"):
        save(frame, tmp_path / "out.csv")
    with pytest.raises(DataError, match="not canonical"):
        save(frame.drop("meta"), tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


def _canonical_frame(tmp_path: Path) -> pl.DataFrame:
    return load_frame(write_lines(tmp_path / "v.jsonl", [GOOD, GOOD]))


@pytest.mark.parametrize(
    "mutate, field, reason",
    [
        (lambda f: f.select(list(reversed(f.columns))), None, "wrong order"),
        (lambda f: f.with_columns(pl.col("source_line").cast(pl.Int32)), "source_line", "has type Int32"),
        (lambda f: f.with_columns(pl.lit("same").alias("id")), "id", "row 0 (id 'same'): duplicate id"),
        (lambda f: f.with_columns(pl.lit(None, pl.Utf8).alias("subset")), "subset", "is null"),
        (lambda f: f.with_columns(pl.col("responses").list.head(1)), "responses", "fewer than 2 responses"),
        (lambda f: f.with_columns(pl.col("scores").list.head(1)), "scores", "length differs"),
        (lambda f: f.with_columns(pl.col("scores").list.eval(pl.element() / 0.0)), "scores", "non-finite"),
        (lambda f: f.with_columns(pl.lit(0, pl.Int64).alias("source_line")), "source_line", "must be >= 1"),
        (lambda f: f.with_columns(pl.col("context").list.eval(pl.struct(
            pl.lit("bot").alias("role"), pl.element().struct.field("content")))), "context", "unknown role"),
    ],
)
def test_validate_frame_errors(mutate: Any, field: Optional[str], reason: str, tmp_path: Path) -> None:
    frame = _canonical_frame(tmp_path)
    validate_frame(frame)
    with pytest.raises(DataError) as err:
        validate_frame(mutate(frame))
    assert err.value.field == field and reason in err.value.reason, str(err.value)


def test_validate_frame_points_at_source(tmp_path: Path) -> None:
    frame = _canonical_frame(tmp_path)
    bad = frame.with_columns(pl.when(pl.col("source_line") == 2).then(pl.col("scores").list.head(1))
                             .otherwise(pl.col("scores")).alias("scores"))
    with pytest.raises(DataError) as err:
        validate_frame(bad)
    assert (err.value.file, err.value.line) == (str(tmp_path / "v.jsonl"), 2)
    validate_frame(pl.DataFrame(schema=SCHEMA))  # an empty canonical frame is fine


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

CTX = [U("Hi"), A("Hello"), U("Joke?")]


def test_render_hh() -> None:
    assert render_hh(CTX) == "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant:"
    assert render_hh([S("Rules."), U("Hi")]) == "Rules.\n\nHuman: Hi\n\nAssistant:"
    with pytest.raises(ValueError, match="no system role"):
        render_hh([U("Hi"), S("late")])
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        render_hh([{"role": "bot", "content": "x"}])


def test_render_reexported_from_data() -> None:
    import deft.data
    assert deft.data.render_hh is render_hh and deft.data.render_chat is render_chat


def test_render_oasst() -> None:
    assert render_oasst(CTX) == "<|prompter|>Hi</s><|assistant|>Hello</s><|prompter|>Joke?</s><|assistant|>"
    assert render_oasst([S("S"), U("Q")], "R") == "<|system|>S</s><|prompter|>Q</s><|assistant|>R</s>"


def test_render_accepts_frame_values(tmp_path: Path) -> None:
    frame = load_frame(write_records(tmp_path / "p.parquet", FORMAT_CASES["pro"][0]))
    assert render_oasst(frame["context"][0]) == render_oasst(frame["context"][0].to_list())
    assert render_hh(frame.row(0, named=True)["context"]).startswith("\n\nHuman: Hi")


@pytest.fixture(scope="module")
def smollm2() -> Any:
    transformers = pytest.importorskip("transformers")
    folder = shared_dir() / "tokenizers" / "smollm2"
    if not folder.exists():
        pytest.skip(f"shared tokenizer not available: {folder} is missing (CI provides ../shared)")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def test_render_chat_smollm2(smollm2: Any) -> None:
    prompt = render_chat([S("Be brief.")] + CTX, smollm2)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nJoke?<|im_end|>\n<|im_start|>assistant\n"
    )
    full = render_chat([S("Be brief.")] + CTX, smollm2, response="No.")
    assert full == prompt + "No.<|im_end|>\n"
    # Without a system turn the template adds its own default system prompt.
    assert render_chat(CTX, smollm2).startswith("<|im_start|>system\nYou are a helpful AI assistant")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_lone_surrogate_is_a_row_error_naming_the_field(tmp_path, suffix):
    """JSON can spell a lone UTF-16 surrogate ("\\ud800"), which no UTF-8 text can
    hold: a row error naming file, line and field (skippable), not a crash; a
    proper surrogate pair (an emoji) is fine."""
    rows = ['{"prompt": "p", "chosen": "a\\ud800b", "rejected": "c"}',
            '{"prompt": "p2", "chosen": "smile \\ud83d\\ude00", "rejected": "y"}']
    path = tmp_path / f"s{suffix}"
    path.write_text("\n".join(rows) + "\n" if suffix == ".jsonl" else "[" + ",\n".join(rows) + "]\n")
    with pytest.raises(DataError, match=r"s\.json(l)?:1: field 'chosen': holds a lone UTF-16 surrogate escape \(\\ud800\)"):
        load(path)
    res = load(path, on_error="skip")
    assert res.frame.height == 1 and res.frame["responses"][0].to_list() == ["smile \U0001F600", "y"]
    assert [(r.line, r.field) for r in res.rejects] == [(1, "chosen")]
