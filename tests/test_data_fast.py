"""The vectorised fast path of deft.data.load against the row-by-row path.

Every test loads the same input twice -- with ``DEFT_LOADER=rows`` (the
reference row path) and with the fast path allowed -- and requires identical
outcomes: the same frame (``equals`` and dtypes), format, record count, notes,
rejects and rejects file, or the same error. ``deft.data.fast._fast_trace`` tells
whether the fast path took a file or declined it, so the tests also pin down
which inputs are meant to be vectorised and which must fall back.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple, Union

import polars as pl
import pytest

import deft.data as data
from conftest import CONTAINERS, shared_file, write_lines, write_records
from deft.data import SCHEMA, DataError, LoadResult
from deft.data import fast as data_fast
from test_data import BAD_ROWS, FILE_CASES, FORMAT_CASES, HH_FILE, PRO_HARMLESS, PRO_HELPFUL, _bad_file, _file_case

Outcome = Union[LoadResult, BaseException]

FAST_FORMATS = ("pro", "hh", "canonical")


def _run(paths: Sequence[Path], kwargs: Dict[str, Any]) -> Outcome:
    try:
        if len(paths) == 1:
            return data.load(paths[0], **kwargs)
        return data.load_many(paths, **kwargs)
    except Exception as e:  # compared below
        return e


def load_both(
    paths: Union[Path, Sequence[Path]], monkeypatch: pytest.MonkeyPatch, **kwargs: Any
) -> Tuple[Outcome, Outcome, List[str]]:
    """(row path outcome, fast path outcome, the fast path's decisions)."""
    paths = [paths] if isinstance(paths, Path) else list(paths)
    rejects = kwargs.pop("rejects_path", None)
    with monkeypatch.context() as m:
        m.setenv("DEFT_LOADER", "rows")
        m.setattr(data_fast, "_fast_trace", [])
        rows = _run(paths, {**kwargs, "rejects_path": None if rejects is None else Path(str(rejects) + ".rows")})
        assert data_fast._fast_trace == []  # the fast path was not even tried
    with monkeypatch.context() as m:
        m.delenv("DEFT_LOADER", raising=False)
        trace: List[Tuple[str, str]] = []
        m.setattr(data_fast, "_fast_trace", trace)
        fast = _run(paths, {**kwargs, "rejects_path": rejects})
    assert_same(rows, fast)
    if rejects is not None and isinstance(rows, LoadResult):
        assert Path(str(rejects) + ".rows").read_bytes() == Path(rejects).read_bytes()
    return rows, fast, [decision for _, decision in trace]


def assert_same(rows: Outcome, fast: Outcome) -> None:
    if isinstance(rows, BaseException) or isinstance(fast, BaseException):
        assert type(rows) is type(fast), (rows, fast)
        assert str(rows) == str(fast)
        if isinstance(rows, DataError):
            assert isinstance(fast, DataError)
            assert (rows.file, rows.line, rows.field, rows.reason) == (fast.file, fast.line, fast.field, fast.reason)
        return
    assert dict(fast.frame.schema) == dict(rows.frame.schema) == SCHEMA
    assert fast.frame.equals(rows.frame), _first_difference(rows.frame, fast.frame)
    assert repr(fast.frame.to_dicts()) == repr(rows.frame.to_dicts())  # (also tells -0.0 from 0.0)
    assert (fast.format, fast.n_read) == (rows.format, rows.n_read)
    assert fast.notes == rows.notes
    assert fast.rejects == rows.rejects


def _first_difference(a: pl.DataFrame, b: pl.DataFrame) -> str:
    if a.height != b.height:
        return f"heights {a.height} != {b.height}"
    for i, (x, y) in enumerate(zip(a.iter_rows(named=True), b.iter_rows(named=True))):
        if x != y:
            return f"row {i}: {x!r} != {y!r}"
    return "?"


# ---------------------------------------------------------------------------
# The loader switch
# ---------------------------------------------------------------------------


def test_rows_setting_forces_the_row_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_records(tmp_path / "p.jsonl", FORMAT_CASES["pro"][0])
    rows, fast, decisions = load_both(path, monkeypatch)
    assert decisions == ["fast"]
    monkeypatch.setenv("DEFT_LOADER", " Rows ")
    assert not data_fast._fast_path_enabled()
    monkeypatch.setenv("DEFT_LOADER", "auto")
    assert data_fast._fast_path_enabled()


def test_python_whitespace_constant() -> None:
    """``_PY_WHITESPACE`` is exactly what str.strip() removes."""
    assert data_fast._PY_WHITESPACE == "".join(c for c in map(chr, range(0x110000)) if c.isspace())


def test_json_text_matches_json_dumps() -> None:
    texts = ["".join(map(chr, range(0x80))), "caf\u00e9 \u2028 \U0001f600 \u00a0", "", "\\\"", "a\x7f\x85"]
    frame = pl.DataFrame({
        "s": texts,
        "i": [0, -5, 2**63 - 1, None, 7],
        "b": [True, False, None, True, False],
        "t": [{"x": "a", "n": 1}, None, {"x": None, "n": None}, {"x": "\n", "n": -1}, {"x": "", "n": 0}],
        "l": [["a", None], [], None, ["\t"], ["x", "y"]],
    })
    for seps in ((", ", ": "), (",", ":")):
        for name in frame.columns:
            got = frame.select(data_fast._json_text(pl.col(name), frame.schema[name], *seps)).to_series().to_list()
            want = [json.dumps(v, ensure_ascii=False, separators=seps) for v in frame[name].to_list()]
            assert got == want, name


# ---------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("relative", [HH_FILE, PRO_HARMLESS, PRO_HELPFUL])
def test_real_files(relative: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rows, fast, decisions = load_both(shared_file(relative), monkeypatch)
    assert decisions == ["fast"]
    assert isinstance(rows, LoadResult) and rows.notes  # (the empty responses, HH splits)


def test_real_pro_files_together(monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [shared_file(PRO_HARMLESS), shared_file(PRO_HELPFUL)]
    rows, fast, decisions = load_both(paths, monkeypatch)
    assert decisions == ["fast", "fast"]
    # The same file twice: every id repeats, which the row path reports.
    rows, fast, decisions = load_both([paths[0], paths[0]], monkeypatch, on_error="skip")
    assert decisions == ["fast", "rows: an id of an earlier file"]
    assert isinstance(rows, LoadResult) and len(rows.rejects) == 2312


def test_real_files_in_other_containers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real PRO and HH lines as plain .jsonl, as JSON Lines in a .json
    file, and re-saved as a canonical file."""
    for relative in (HH_FILE, PRO_HARMLESS):
        text = gzip.decompress(shared_file(relative).read_bytes())
        plain = tmp_path / Path(relative).name.replace(".jsonl.gz", ".jsonl")
        plain.write_bytes(text)
        as_json = tmp_path / Path(relative).name.replace(".jsonl.gz", ".json")
        as_json.write_bytes(text)
        for path in (plain, as_json):
            assert load_both(path, monkeypatch)[2] == ["fast"]
        frame = data.load(shared_file(relative)).frame
        for suffix in (".parquet", ".jsonl.gz"):
            saved = data.save(frame, tmp_path / f"canon{suffix}")
            rows, fast, decisions = load_both(saved, monkeypatch)
            assert decisions == ["fast"]
            assert isinstance(rows, LoadResult) and rows.frame.equals(frame)


# ---------------------------------------------------------------------------
# The hand-made fixtures of test_data
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("case", sorted(FORMAT_CASES))
def test_format_cases(case: str, container: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records, _ = FORMAT_CASES[case]
    path = write_records(tmp_path / f"train_my-data{container}", records)
    rows, fast, decisions = load_both(path, monkeypatch)
    json_array = container in (".json", ".json.gz")  # (write_records writes an array there)
    expect_fast = case.split("-")[0] in FAST_FORMATS and not json_array
    assert (decisions == ["fast"]) == expect_fast, decisions


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows(case: str, on_error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _bad_file(tmp_path, case)
    rows, fast, decisions = load_both(path, monkeypatch, on_error=on_error, rejects_path=tmp_path / "rejects.jsonl")
    assert decisions and decisions[0].startswith("rows: ")
    if on_error == "raise":
        assert isinstance(rows, DataError) and rows.line == 2
    else:
        assert isinstance(rows, LoadResult) and len(rows.rejects) == 1


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_file_level_errors(case: str, on_error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows, fast, decisions = load_both(_file_case(tmp_path, case), monkeypatch, on_error=on_error)
    assert isinstance(rows, DataError)


# ---------------------------------------------------------------------------
# Edge cases: each must load identically; the fast path takes or declines
# ---------------------------------------------------------------------------

Q = "<|prompter|>Q"
PRO = {"prefix": [[Q, "<|assistant|>"]] * 2, "suffix": ["a", "b"], "reward": [1.0, 0.5]}
PRO_META = {**PRO, "sft_index": 0, "meta": {"path": "p/q.jsonl", "line_num": 3, "task": "dialogue"}}
HH = {"chosen": "\n\nHuman: Q\n\nAssistant: a", "rejected": "\n\nHuman: Q\n\nAssistant: b"}


def dumps(rec: Any, **kwargs: Any) -> str:
    return json.dumps(rec, **kwargs)


def pro(i: int, **fields: Any) -> Dict[str, Any]:
    return {**PRO_META, "sft_index": i, **fields}


def hh(chosen: str, rejected: str, **fields: Any) -> Dict[str, Any]:
    return {"chosen": chosen, "rejected": rejected, **fields}


def pair(context: str, chosen: str, rejected: str) -> Dict[str, Any]:
    """An HH pair: the same context, then each reply."""
    return hh(context + chosen, context + rejected)


Line = Union[str, bytes, Dict[str, Any]]

# name -> (lines, True when the fast path must take the file)
EDGE_CASES: Dict[str, Tuple[List[Line], bool]] = {
    # -- lines and text
    "blank-lines": ([pro(0), "", "  \t", pro(1), ""], True),
    "empty-lines": (["", pro(0), "", "", pro(1), ""], True),
    "crlf": ([dumps(pro(0)) + "\r", dumps(pro(1)) + "\r", "\r"], True),
    "bom": ([b"\xef\xbb\xbf" + dumps(pro(0)).encode(), pro(1)], True),
    "no-final-newline": ([pro(0), pro(1)], True),
    "indented": (["  " + dumps(pro(0)) + " ", pro(1)], True),
    "bom-on-line-2": ([pro(0), b"\xef\xbb\xbf" + dumps(pro(1)).encode()], False),
    "two-objects-on-a-line": ([dumps(pro(0)) + " " + dumps(pro(1)), pro(2)], False),
    "object-over-two-lines": ([pro(0), '{"prefix": [["<|prompter|>Q"], ["<|prompter|>Q"]],', '"suffix": ["a", "b"]}'], False),
    "two-objects-and-two-lines": ([dumps(pro(0)) + dumps(pro(1)), dumps(PRO)[:-1] + ",", '"sft_index": 9}'], False),
    "lone-cr": ([dumps(pro(0)) + "\r" + dumps(pro(1)), pro(2)], False),
    "python-only-blank": ([pro(0), "\x1c", pro(1)], False),
    "not-utf8": ([pro(0), b'{"prefix": [["<|prompter|>caf\xe9"]], "suffix": ["a", "b"]}'], False),
    "nul-byte": ([pro(0), dumps(pro(1)) + "\x00"], False),
    "surrogate-pair": ([pro(0, suffix=["\U0001f600", "b"]), pro(1, suffix=["x", "\u00e9\U0001f600"])], True),
    "lone-surrogate": ([pro(0), '{"prefix": [["<|prompter|>Q"], ["<|prompter|>Q"]], "suffix": ["\\ud800", "b"]}'], False),
    "escapes": ([pro(0, suffix=['"\\/\b\f\n\r\t\u0001', "\u2028\u00e9"])], True),
    # -- fields and types
    "coerced-suffix": ([pro(0), '{"prefix": [["<|prompter|>Q"], ["<|prompter|>Q"]], "suffix": ["a", 5]}'], False),
    "bool-reward": ([pro(0), pro(1, reward=[True, 0])], False),
    "string-reward": ([pro(0), pro(1, reward=["1", 0])], False),
    "int-rewards": ([pro(0, reward=[3, -2]), pro(1, reward=[0, 1e300])], True),
    "minus-zero-reward": ([pro(0), dumps(pro(1)).replace("[1.0, 0.5]", "[-0, 1]")], False),
    "minus-zero-float-reward": ([pro(0, reward=[-0.0, 1.0])], False),
    "nan-reward": ([pro(0), dumps(pro(1)).replace("[1.0, 0.5]", "[NaN, 1]")], False),
    "infinite-reward": ([pro(0), dumps(pro(1)).replace("[1.0, 0.5]", "[1, -Infinity]")], False),
    "huge-reward": ([pro(0), dumps(pro(1)).replace("[1.0, 0.5]", "[1e400, 1]")], False),
    "big-int-reward": ([pro(0, reward=[2**70 + 1, -(2**64)])], True),
    "null-reward": ([pro(0), pro(1, reward=None)], True),
    "no-reward": ([{k: v for k, v in PRO.items() if k != "reward"}] * 2, True),
    "null-in-reward": ([pro(0), pro(1, reward=[1, None])], False),
    "reward-count": ([pro(0), pro(1, reward=[1, 2, 3])], False),
    "duplicate-key": ([pro(0), dumps(pro(1))[:-1] + ', "suffix": ["c", "d"]}'], False),
    "duplicate-nested-key": ([pro(0), dumps(pro(1))[:-2] + ', "task": "x"}}'], False),
    "unknown-field": ([pro(0), pro(1, other=1)], False),
    "unknown-nested-field": ([pro(0), pro(1, meta={"path": "p", "line_num": 1, "task": "t", "x": 1})], False),
    "chosen-not-a-string": ([HH, hh(7, "\n\nHuman: Q\n\nAssistant: b")], False),  # type: ignore[arg-type]
    "subset-not-a-string": ([pro(0, subset="s"), pro(1, subset=3)], False),
    "subset-field": ([pro(0, subset="s"), pro(1), pro(2, subset=None)], True),
    # -- ids
    "int-ids": ([pro(0, id=10), pro(1, id=-3), pro(2)], True),
    "string-ids": ([pro(0, id="x"), pro(1, id=None), pro(2, id="d.jsonl:1")], True),
    "id-types-mixed": ([pro(0, id="x"), pro(1, id=3)], False),
    "float-id": ([pro(0, id=1.5)], False),
    "bool-id": ([pro(0), pro(1, id=True)], False),
    "duplicate-id": ([pro(0, id="x"), pro(1, id="x")], False),
    "id-clashes-with-default": ([pro(0, id="@NAME@:2"), pro(1)], False),
    "blank-id": ([pro(0, id=" \t")], False),
    "python-blank-id": ([pro(0, id="\x1c\u3000")], False),
    "huge-int-id": ([pro(0, id=2**64)], False),
    # -- unused fields (meta)
    "meta-compact": ([dumps(pro(0), separators=(",", ":")), dumps(pro(1), separators=(",", ":"))], True),
    "meta-mixed-separators": ([pro(0), dumps(pro(1), separators=(",", ":"))], True),
    "meta-explicit-null": ([pro(0), pro(1, sft_index=None, meta=None)], True),
    "meta-nested-null": ([pro(0), pro(1, meta={"path": None, "line_num": None, "task": None})], True),
    "meta-missing-field": ([pro(0), {k: v for k, v in pro(1).items() if k != "sft_index"}], False),
    "meta-missing-nested-field": ([pro(0), pro(1, meta={"path": "p", "line_num": 1})], False),
    "meta-reordered": ([pro(0), {"meta": PRO_META["meta"], "sft_index": 1, **PRO}], False),
    "meta-nested-reordered": ([pro(0), pro(1, meta={"task": "t", "path": "p", "line_num": 1})], False),
    "meta-not-ascii": ([dumps(pro(0, meta={"path": "caf\u00e9", "line_num": 1, "task": "\U0001f600"}),
                              ensure_ascii=False)], True),
    "meta-ascii-escaped": ([dumps(pro(0, meta={"path": "caf\u00e9", "line_num": 1, "task": "t"}))], False),
    "meta-escapes": ([dumps(pro(0, meta={"path": 'a"b\\c\n\t\u0001/', "line_num": 1, "task": "\u2028"}),
                            ensure_ascii=False)], True),
    "meta-kinds": ([pro(0, tags=["x", None], flag=True, none=None, deep={"a": [{"b": 1}]}),
                    pro(1, tags=[], flag=False, none=None, deep={"a": []})], True),
    "meta-float": ([pro(0, score=0.5)], False),
    "meta-int-then-float": ([pro(0, rank=1), pro(1, rank=1.5)], False),
    "meta-huge-int": ([pro(0, rank=2**63)], False),
    "meta-empty-object": ([pro(0, extra={})], False),
    "meta-empty-list": ([pro(0, extra=[])], False),
    "meta-mixed-list": ([pro(0, extra=[1, "a"])], False),
    "meta-odd-key": ([pro(0, **{"odd key": 1})], False),
    "meta-key-twice": ([pro(0, line_num=5)], False),
    "meta-escaped-key": ([pro(0), dumps(pro(1)).replace('"sft_index"', '"sft\\u005findex"')], False),
    # -- PRO contexts
    "pro-slot-only-in-some": ([pro(0, prefix=[[Q, "<|assistant|>"], [Q]])], True),
    "pro-no-slot": ([pro(0, prefix=[[Q], [Q]])], True),
    "pro-system-and-turns": ([pro(0, prefix=[["<|system|>S", Q, "<|assistant|>A", "<|prompter|>"]] * 2)], True),
    "pro-empty-context": ([pro(0, prefix=[[], []])], True),
    "pro-slot-then-nothing": ([pro(0, prefix=[["<|assistant|>"], []])], True),
    "pro-three": ([pro(0, prefix=[[Q]] * 3, suffix=["x", "y", "z"], reward=[3, 2, 1]),
                   pro(1, prefix=[[Q]] * 4, suffix=["w", "x", "y", "z"], reward=[4, 3, 2, 1])], True),
    "pro-contexts-differ": ([pro(0, prefix=[[Q], [Q, "<|assistant|>x"]])], False),
    "pro-contexts-differ-late": ([pro(0, prefix=[[Q]] * 3 + [["<|prompter|>R"]], suffix=list("wxyz"), reward=None)], False),
    "pro-untagged": ([pro(0, prefix=[["Q"], ["Q"]])], False),
    "pro-null-turn": ([pro(0, prefix=[[Q, None], [Q, None]])], False),
    "pro-null-context": ([pro(0, prefix=[None, None])], False),
    "pro-one-suffix": ([pro(0, prefix=[[Q]], suffix=["a"], reward=None)], False),
    "pro-empty-suffixes": ([pro(0, suffix=["", " \n"]), pro(1, suffix=["a", "\u3000"])], True),
    "pro-null-suffix": ([pro(0, suffix=["a", None])], False),
    "pro-missing-prefix": ([pro(0), {"suffix": ["a", "b"]}], False),
    # -- HH
    "hh-plain": ([HH, pair("\n\nHuman: Hi\n\nAssistant: Yo\n\nHuman: More?\n\nAssistant:", "  no", " yes")], True),
    "hh-extra": ([hh(HH["chosen"], HH["rejected"], extra=1), hh(HH["chosen"], HH["rejected"], extra=2)], True),
    "hh-split-earlier": ([HH, pair("\n\nHuman: S\n\nAssistant:", " no", " ok\n\nHuman: how?\n\nAssistant: so")], True),
    "hh-bare-start": ([HH, hh("Human: Hi\n\nAssistant: Yo", "Human: Hi\n\nAssistant: No")], True),
    "hh-bare-start-after-space": ([hh(" \n Human: Hi\n\nAssistant: Yo", " \n Human: Hi\n\nAssistant: No")], True),
    "hh-preamble": ([hh("Rules.\n\nHuman: Hi\n\nAssistant: Yo", "Rules.\n\nHuman: Hi\n\nAssistant: No"),
                     hh("  \n\nHuman: Hi\n\nAssistant: Yo", "  \n\nHuman: Hi\n\nAssistant: No")], True),
    "hh-preamble-mentions-human": ([pair("Say Human: x\n\nHuman: Hi\n\nAssistant:", " Yo", " No")], True),
    "hh-nul": ([hh("\n\nHuman: a\x00b\n\nAssistant: y", "\n\nHuman: a\x00b\n\nAssistant: n")], True),
    "hh-whitespace": ([pair("\n\nHuman:  Hi \x1c\u3000\n\nAssistant:", "\tYo\x85", " \u00a0")], True),
    "hh-multi-paragraph": ([hh("\n\nHuman: A\n\nB\n\n\nC\n\nAssistant: D\n\nE\n\nHuman: F \n\nAssistant: G",
                               "\n\nHuman: A\n\nB\n\n\nC\n\nAssistant: D\n\nE\n\nHuman: F \n\nAssistant: H")], True),
    "hh-markers-touching": ([pair("\n\nHuman:\n\nAssistant:\n\nHuman:\n\nAssistant:", "", " x")], True),
    "hh-empty-responses": ([hh("\n\nHuman: Q\n\nAssistant: ", "\n\nHuman: Q\n\nAssistant:"), HH], True),
    "hh-context-differs": ([HH, hh("\n\nHuman: Hi\n\nAssistant: a", "\n\nHuman: Ho\n\nAssistant: b")], False),
    "hh-no-marker": ([HH, hh("\n\nHuman: Hi", "\n\nHuman: Hi\n\nAssistant: b")], False),
    "hh-null": ([HH, hh(None, "x")], False),  # type: ignore[arg-type]
    "hh-not-ascii": ([pair("\n\nHuman: caf\u00e9 \U0001f600\n\nAssistant:", " \u00e9", " \u2028")], True),
}


def _write_edge(path: Path, lines: List[Line], final_newline: bool = True) -> Path:
    """Write JSON Lines (dicts JSON-encoded, text as is with ``@NAME@`` the
    file name, bytes raw), gzip-compressed for a ``.gz`` name."""
    encoded = [
        line if isinstance(line, bytes)
        else (line if isinstance(line, str) else dumps(line)).replace("@NAME@", path.name).encode()
        for line in lines
    ]
    raw = b"\n".join(encoded) + (b"\n" if final_newline else b"")
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


@pytest.mark.parametrize("container", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_cases(case: str, container: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines, fast_expected = EDGE_CASES[case]
    path = _write_edge(tmp_path / f"d{container}", lines, final_newline=case != "no-final-newline")
    for on_error in ("raise", "skip"):
        rows, fast, decisions = load_both(path, monkeypatch, on_error=on_error)
        assert (decisions == ["fast"]) == fast_expected, decisions


@pytest.mark.parametrize("case", ["pro-empty-suffixes", "hh-empty-responses"])
def test_empty_responses_not_allowed(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_edge(tmp_path / "d.jsonl", EDGE_CASES[case][0])
    rows, fast, decisions = load_both(path, monkeypatch, allow_empty_responses=False)
    assert isinstance(rows, DataError) and decisions == ["rows: empty response"]
    rows, fast, decisions = load_both(path, monkeypatch, allow_empty_responses=True)
    assert decisions == ["fast"]


def test_subset_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write_edge(tmp_path / "test_x.jsonl", [pro(0), pro(1, subset="own")])
    assert load_both(path, monkeypatch, subset="given")[2] == ["fast"]
    assert load_both(path, monkeypatch)[2] == ["fast"]


def test_json_container_with_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = dumps(pro(0)) + "\r" + dumps(pro(1)) + "\r\n\n" + dumps(pro(2))
    for name in ("d.json", "d.json.gz"):
        path = tmp_path / name
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
        assert load_both(path, monkeypatch)[2] == ["fast"]


@pytest.mark.parametrize(
    "case, lines, polars_gzip",
    [
        ("plain", [pro(i) for i in range(5)], True),
        ("blank", ["", " ", pro(0), "", pro(1), ""], True),
        ("bom", [b"\xef\xbb\xbf" + dumps(pro(0)).encode(), pro(1)], True),
        ("bom-blank", [b"\xef\xbb\xbf", pro(0)], True),
        ("crlf", [dumps(pro(i)) + "\r" for i in range(3)], False),  # (the CSV reader drops "\r")
        ("hh", [HH, hh("\n\nHuman: S\n\nAssistant: no", "\n\nHuman: S\n\nAssistant: ok\n\nHuman: h\n\nAssistant: s")], True),
    ],
)
def test_gzip_lines(case: str, lines: List[Line], polars_gzip: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gzip JSON Lines are decompressed and split by Polars when the sizes
    agree, else by Python; both give the row path's lines."""
    used: List[bool] = []
    real = data_fast._gzip_lines

    def spy(path: Path) -> Any:
        lines = real(path)
        used.append(lines is not None)
        return lines

    monkeypatch.setattr(data_fast, "_gzip_lines", spy)
    for final_newline in (True, False):
        path = _write_edge(tmp_path / f"{case}.jsonl.gz", lines, final_newline)
        used.clear()
        assert load_both(path, monkeypatch, on_error="skip")[2] == ["fast"]
        assert used == [polars_gzip]


def test_odd_gzip_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "d.jsonl.gz"
    members = [gzip.compress((dumps(pro(i)) + "\n").encode()) for i in range(2)]
    path.write_bytes(b"".join(members))  # several members
    assert load_both(path, monkeypatch)[2] == ["fast"]
    path.write_bytes(members[0] + b"\0" * 8)  # zero padding: Python's gzip reads it
    assert load_both(path, monkeypatch)[2] == ["fast"]
    for broken in (members[0][:-5], members[0][:-8] + b"\0\0\0\0" + members[0][-4:], members[0] + b"junk"):
        path.write_bytes(broken)  # truncated, bad checksum, trailing junk
        rows, fast, decisions = load_both(path, monkeypatch)
        assert isinstance(rows, DataError) and decisions[0].startswith("rows: ")


# ---------------------------------------------------------------------------
# Several files
# ---------------------------------------------------------------------------


def test_load_many_mixing_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = _write_edge(tmp_path / "a.jsonl", [pro(0, id="x"), pro(1, id="y")])
    b = write_lines(tmp_path / "b.jsonl", [{"prompt": "p", "responses": ["r", "s"], "id": "z"}])
    c = _write_edge(tmp_path / "c.jsonl", [pro(0, id="w"), pro(1, id="x")])  # x: also in a
    d = _write_edge(tmp_path / "d.jsonl", [pro(0, id="z")])  # z: also in b
    e = _write_edge(tmp_path / "e.jsonl", [HH, HH])
    for paths, decisions in [
        ([a, b, e], ["fast", "rows: no fast path for format 'ranked'", "fast"]),
        ([b, a, e, a], ["rows: no fast path for format 'ranked'", "fast", "fast", "rows: an id of an earlier file"]),
        ([a, c], ["fast", "rows: an id of an earlier file"]),
        ([b, d], ["rows: no fast path for format 'ranked'", "rows: an id of an earlier file"]),
        ([c, b, a], ["fast", "rows: no fast path for format 'ranked'", "rows: an id of an earlier file"]),
    ]:
        for on_error in ("raise", "skip"):
            got = load_both(paths, monkeypatch, on_error=on_error, rejects_path=tmp_path / "r.jsonl")[2]
            assert got == decisions[: len(got)]


# ---------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "records, fast_expected",
    [
        ([PRO_META, pro(1)], True),
        ([pro(0, id=5), pro(1, id=None)], True),
        ([pro(0, tags=["a", None], flag=None)], True),
        ([pro(0, score=0.5)], False),
        ([{**PRO, "reward": None}, {**PRO, "reward": None}], True),
        ([HH, hh("Human: Hi\n\nAssistant: Yo", "Human: Hi\n\nAssistant: No")], True),
        ([{"context": [{"role": "user", "content": "Q"}], "responses": ["a", ""], "ranked": False}], True),
        ([{"context": [{"role": "bot", "content": "Q"}], "responses": ["a", "b"], "ranked": True}], False),
        ([{"context": [], "responses": ["a", "b"], "ranked": True, "source_file": "f", "source_line": None}], False),
        ([{"context": [], "responses": ["a", "b"], "ranked": True, "scores": [1, 2]}], False),  # (Int64 scores)
    ],
)
def test_parquet(records: List[Dict[str, Any]], fast_expected: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_records(tmp_path / "d.parquet", records)
    rows, fast, decisions = load_both(path, monkeypatch, on_error="skip")
    assert (decisions == ["fast"]) == fast_expected, decisions


# ---------------------------------------------------------------------------
# Random records
# ---------------------------------------------------------------------------

ALPHABET = list("ab \n\t\r\"\\/:{}[],") + ["\x00", "\x1c", "\x7f", "\x85", "\u00a0", "\u00e9", "\u2028", "\u3000", "\U0001f600",
                                           "Human:", "Assistant:", "\n\nHuman:", "\n\nAssistant:", "<|prompter|>", "<|assistant|>"]


REPLY_ALPHABET = [a for a in ALPHABET if "Assistant:" not in a]  # (a reply with the marker: a row error)


def _text(rng: random.Random, n: int = 6, alphabet: Sequence[str] = ALPHABET) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(n)))


def _random_pro(rng: random.Random, i: int) -> Dict[str, Any]:
    tags = ["<|prompter|>", "<|assistant|>", "<|system|>"]
    context = [rng.choice(tags) + (_text(rng) or "x") for _ in range(rng.randrange(4))]  # (not a bare slot)
    k = rng.randrange(2, 5)
    prefix = [context + (["<|assistant|>"] if rng.random() < 0.7 else []) for _ in range(k)]
    rec: Dict[str, Any] = {"prefix": prefix, "suffix": [_text(rng) for _ in range(k)]}
    if rng.random() < 0.8:
        rec["reward"] = [rng.choice([rng.uniform(-5, 5), rng.randrange(-3, 3), rng.random() * 1e-7]) for _ in range(k)]
    rec["sft_index"] = i
    rec["meta"] = {"path": _text(rng), "line_num": rng.randrange(10**6), "task": _text(rng)}
    return rec


def _random_hh(rng: random.Random, i: int) -> Dict[str, Any]:
    def turns() -> str:
        return "".join(rng.choice(["\n\nHuman:", "\n\nAssistant:"]) + rng.choice(["", " "]) + _text(rng) for _ in range(rng.randrange(4)))
    context = rng.choice(["", _text(rng)]) + turns() + "\n\nHuman: " + _text(rng)
    rec = {"chosen": context + "\n\nAssistant:" + rng.choice(["", " "]) + _text(rng, alphabet=REPLY_ALPHABET),
           "rejected": context + "\n\nAssistant:" + rng.choice(["", " "]) + _text(rng, alphabet=REPLY_ALPHABET)
           + rng.choice(["", turns()])}
    if rng.random() < 0.3:
        rec["id"] = f"r{i}"
    return rec


@pytest.mark.parametrize("kind", ["pro", "hh"])
@pytest.mark.parametrize("seed", range(4))
def test_random_records(kind: str, seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    make = _random_pro if kind == "pro" else _random_hh
    records = [make(rng, i) for i in range(200)]
    path = tmp_path / "r.jsonl.gz"
    ensure_ascii = seed % 2 == 0
    path.write_bytes(gzip.compress("".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in records).encode()))
    rows, fast, decisions = load_both(path, monkeypatch, on_error="skip")
    assert isinstance(rows, LoadResult) and rows.frame.height > 0
    if kind == "hh" or not ensure_ascii:
        assert decisions == ["fast"]  # (PRO meta with non-ASCII text written as \u escapes: rows)
