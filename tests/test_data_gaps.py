"""Smaller loader gaps of the hardening issue: repeated responses are noted
(identically by the fast and the row path), CR-only line endings get a hint,
and the pairs type error names every valid form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deft import data
from deft.data import DataError
from test_data_fast import load_both


def _pro(prompt: str, suffix: list, reward: list) -> dict:
    return {"prefix": [["<|prompter|>" + prompt]] * len(suffix), "suffix": suffix, "reward": reward}


def test_repeated_responses_are_noted_by_both_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "pro.jsonl"
    rows = [
        _pro("hi", ["a", "b", "a", "b"], [1.0, 0.5, 0.2, 0.1]),
        _pro("yo", ["x", "y"], [1.0, 0.0]),
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res, _, decisions = load_both(p, monkeypatch, format="pro")
    assert decisions == ["fast"]  # the fast path handled it, with the same notes as the row path
    assert isinstance(res, data.LoadResult)
    got = [(n.line, n.reason.split(";")[0]) for n in res.notes]
    assert got == [(1, "response 2 is the same text as response 0"), (1, "response 3 is the same text as response 1")]
    assert all("--drop-duplicates" in n.reason for n in res.notes)
    assert res.frame.height == 2  # kept


def test_pairs_with_the_same_chosen_and_rejected_are_noted(tmp_path: Path) -> None:
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    res = data.load(p, format="pairs")
    assert [(n.line, n.field) for n in res.notes] == [(1, "rejected")]
    assert "same text as response 0" in res.notes[0].reason


def test_cr_only_line_endings_get_a_hint(tmp_path: Path) -> None:
    p = tmp_path / "mac.jsonl"
    rec = json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
    p.write_bytes((rec + "\r" + rec + "\r").encode())
    with pytest.raises(DataError) as e:
        data.load(p)
    assert e.value.line == 1
    assert "Extra data" in str(e.value) and "CR-only line endings" in str(e.value)
    # a plain "Extra data" without carriage returns gets no such hint
    q = tmp_path / "two.jsonl"
    q.write_text(rec + " " + rec + "\n")
    with pytest.raises(DataError) as e2:
        data.load(q)
    assert "Extra data" in str(e2.value) and "CR" not in str(e2.value)


@pytest.mark.parametrize("prompt", [True, False])
def test_pairs_type_error_names_the_valid_forms(tmp_path: Path, prompt: bool) -> None:
    p = tmp_path / "bad.jsonl"
    rec = {"chosen": 5, "rejected": "y"}
    if prompt:
        rec["prompt"] = "x"
    p.write_text(json.dumps(rec) + "\n")
    with pytest.raises(DataError) as e:
        data.load(p, format="pairs")
    assert e.value.field == "chosen"
    if prompt:  # after a prompt, a plain string is a valid response
        assert e.value.reason == "expected a string or an array of assistant messages, got an integer"
    else:  # without one, chosen must be the whole conversation
        assert "expected an array of messages" in e.value.reason


def test_a_split_named_file_takes_its_folders_name_however_the_path_is_spelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "helpful-base"
    folder.mkdir()
    f = folder / "train.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    monkeypatch.chdir(folder)
    for spelled in (Path("train.jsonl"), f, Path("..") / "helpful-base" / "train.jsonl"):
        for mode in ("rows", "fast"):
            if mode == "rows":
                monkeypatch.setenv("DEFT_LOADER", "rows")
            else:
                monkeypatch.delenv("DEFT_LOADER", raising=False)
            assert data.load(spelled).frame["subset"].to_list() == ["helpful_base"], (spelled, mode)
