"""Canonical preference data: reading, validating and saving.

Every preference dataset deft works with is turned into one Polars frame with
the *canonical schema* below, whatever the source format. Readers never drop a
record silently: a bad record either raises :class:`DataError` (``on_error=
"raise"``, the default) or is skipped and reported as a :class:`Reject`
(``on_error="skip"``), optionally written to a rejects file. Records that load
under a documented, non-obvious interpretation are reported as :class:`Note`.

Canonical schema
================
One row per prompt, columns in this order (see :data:`SCHEMA`):

``id`` (Utf8)
    The record's own ``id`` field (a string or an integer, converted to str)
    when present and not null, else ``"{file name}:{line}"`` (basename of the
    file, 1-based record number). Unique within one load (also across the files
    of :func:`load_many`); a duplicated id is a row error on field ``id``.
``subset`` (Utf8)
    The record's ``subset`` field, else the ``subset=`` argument, else derived
    from the file name by :func:`derive_subset` (``harmless-base-test.jsonl.gz``
    -> ``harmless-base``, ``test_harmless_base.jsonl.gz`` -> ``harmless_base``).
``context`` (List(Struct{role: Utf8, content: Utf8}))
    The conversation before the responses. Roles are ``system``, ``user`` and
    ``assistant`` (HH ``Human``/``Assistant``, OpenAssistant/PRO
    ``<|prompter|>``/``<|assistant|>``/``<|system|>``, chat messages
    ``user``/``assistant``/``system``). The last turn is normally a user turn;
    no empty assistant turn is appended (the PRO generation slot is dropped).
``responses`` (List(Utf8))
    At least two responses, stored as given (except that the single space after
    HH's ``Assistant:`` marker is removed). A response must be non-empty after
    ``strip()`` -- except that the HH and PRO sources encode an assistant reply
    that says nothing as an empty final turn (4 rows in each of the real HH/PRO
    test files), so for the ``hh``, ``pro`` and ``canonical`` formats empty
    responses are kept and reported as a :class:`Note`; see
    ``allow_empty_responses`` of :func:`load`.
``scores`` (List(Float64), nullable)
    One finite score per response, or null for the whole row when the source
    has no scores. Never used to reorder responses here.
``ranked`` (Boolean)
    True when the responses are in preference order, best first: HH and
    TRL chosen/rejected, PRO suffixes, ranked lists (unless the record says
    ``"ranked": false``).
``source_file`` (Utf8), ``source_line`` (Int64)
    Where the row came from: the path as given, and the 1-based line (JSONL),
    element index (JSON array) or row (Parquet).
``meta`` (Utf8, nullable)
    JSON text of the source fields that were not used (e.g. PRO's ``meta`` and
    ``sft_index``), or null when there are none.

Input formats
=============
Detected from the fields of the first record (``format="auto"``) or forced:

``hh``
    Raw HH-RLHF transcripts ``{"chosen": str, "rejected": str}``; see
    :func:`_split_hh` for how they are split into context and responses.
``pairs``
    TRL preference pairs ``{"prompt", "chosen", "rejected"}``; each value is a
    string or a list of ``{"role", "content"}`` messages. Without ``prompt``
    ("implicit prompt"), ``chosen``/``rejected`` are whole conversations split
    at their final assistant message; their contexts must match. Optional
    ``score_chosen``/``score_rejected`` become ``scores``.
``pro``
    PRO ranking data ``{"prefix": [[turn, ...], ...], "suffix": [r1, r2, ...],
    "reward": [...], ...}`` with ``<|prompter|>``/``<|assistant|>`` tagged turns.
``ranked``
    ``{"prompt": str | [messages]}`` or ``{"messages": [messages]}`` with
    ``"responses": [str, ...]``, optional ``"scores"`` and ``"ranked"``.
``canonical``
    A file already in the canonical schema (``context`` and ``responses``);
    ``id``, ``subset``, ``scores``, ``meta``, ``source_file``/``source_line``
    may be omitted (defaults as above).

Containers: ``.jsonl``, ``.jsonl.gz``, ``.json`` / ``.json.gz`` (a top-level
array of objects; a ``.json`` file whose first character is ``{`` is read as
JSON Lines, as written by Hugging Face ``datasets``) and ``.parquet``. Text is
decoded as UTF-8 line by line (a UTF-8 BOM is accepted), so an undecodable
line is reported with its number and can be skipped; blank lines are ignored.

Prompt rendering (:func:`render_hh`, :func:`render_oasst`, :func:`render_chat`)
lives in :mod:`deft.render` and is re-exported here.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

import polars as pl

from deft.io import atomic_path

from deft.render import render_chat, render_hh, render_oasst

__all__ = [
    "SCHEMA",
    "FORMATS",
    "ROLES",
    "DataError",
    "Reject",
    "Note",
    "LoadResult",
    "load",
    "load_frame",
    "load_many",
    "save",
    "validate_frame",
    "detect_format",
    "derive_subset",
    # re-exported from deft.render
    "render_hh",
    "render_oasst",
    "render_chat",
]

PathLike = Union[str, "os.PathLike[str]"]

#: The canonical columns, in order, with their Polars types.
SCHEMA: Dict[str, pl.DataType] = {
    "id": pl.Utf8(),
    "subset": pl.Utf8(),
    "context": pl.List(pl.Struct({"role": pl.Utf8(), "content": pl.Utf8()})),
    "responses": pl.List(pl.Utf8()),
    "scores": pl.List(pl.Float64()),
    "ranked": pl.Boolean(),
    "source_file": pl.Utf8(),
    "source_line": pl.Int64(),
    "meta": pl.Utf8(),
}

#: Input formats understood by :func:`load` (besides ``"auto"``).
FORMATS: Tuple[str, ...] = ("hh", "pairs", "pro", "ranked", "canonical")

#: Canonical context roles.
ROLES: Tuple[str, ...] = ("system", "user", "assistant")

_FORMAT_FIELDS = {
    "hh": "chosen, rejected as transcript strings",
    "pairs": "prompt (optional), chosen, rejected",
    "pro": "prefix, suffix, reward (optional)",
    "ranked": "prompt or messages, responses, scores (optional)",
    "canonical": "context, responses, ranked, ...",
}

# Formats whose sources legitimately contain empty responses (see module doc).
_EMPTY_OK_BY_DEFAULT = frozenset({"hh", "pro", "canonical"})

_EXTENSIONS: Tuple[Tuple[str, str], ...] = (
    # (suffix, container); longest suffixes first
    (".jsonl.gz", "jsonl"),
    (".json.gz", "json"),
    (".jsonl", "jsonl"),
    (".json", "json"),
    (".parquet", "parquet"),
)


# ---------------------------------------------------------------------------
# Errors and results
# ---------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _location(file: str, line: Optional[int], field: Optional[str], reason: str) -> str:
    where = file if line is None else f"{file}:{line}"
    if field is None:
        return f"{where}: {reason}"
    return f"{where}: field '{field}': {reason}"


class DataError(ValueError):
    """A problem with input data, located as precisely as possible.

    ``str(err)`` is one line: ``"{file}:{line}: field '{field}': {reason}"``;
    the ``:{line}`` part is left out for file-level errors and the
    ``field '...'`` part when the problem is not about one field (invalid
    JSON, undecodable text, ...).
    """

    def __init__(
        self,
        file: str,
        line: Optional[int],
        field: Optional[str],
        reason: str,
    ) -> None:
        self.file = str(file)
        self.line = line
        self.field = field
        self.reason = _one_line(reason)
        super().__init__(_location(self.file, line, field, self.reason))


@dataclass(frozen=True)
class Reject:
    """A record skipped under ``on_error="skip"``; ``raw`` is its original
    text (JSONL line; JSON text of an array element or Parquet row), or None
    when the line could not be decoded."""

    file: str
    line: Optional[int]
    field: Optional[str]
    reason: str
    raw: Optional[str] = None

    def __str__(self) -> str:
        return _location(self.file, self.line, self.field, self.reason)

    def to_json(self) -> Dict[str, Any]:
        """The record written to a rejects file."""
        return {
            "source_file": self.file,
            "source_line": self.line,
            "field": self.field,
            "reason": self.reason,
            "raw": self.raw,
        }


@dataclass(frozen=True)
class Note:
    """A record that was loaded under a documented but notable interpretation
    (an HH pair split at an earlier shared marker, an empty response kept...)."""

    file: str
    line: Optional[int]
    field: Optional[str]
    reason: str

    def __str__(self) -> str:
        return _location(self.file, self.line, self.field, self.reason)


@dataclass
class LoadResult:
    """What :func:`load` / :func:`load_many` return.

    ``frame`` is canonical (see :data:`SCHEMA`); ``format`` the (detected)
    input format, or ``"mixed"`` for several files of different formats;
    ``n_read`` counts the records read, good and bad; ``rejects`` the skipped
    ones; ``rejects_path`` the rejects file written, if any; ``notes`` the rows
    loaded with a notable interpretation.
    """

    frame: pl.DataFrame
    format: str
    n_read: int
    rejects: List[Reject] = field(default_factory=list)
    rejects_path: Optional[Path] = None
    notes: List[Note] = field(default_factory=list)


class _RowError(Exception):
    """Raised by the row parsers; becomes a :class:`DataError` with the
    record's location."""

    def __init__(self, field: Optional[str], reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def _type_name(value: object) -> str:
    """JSON-flavoured name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


def _snippet(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


def _require(rec: Mapping[str, Any], name: str) -> Any:
    if name not in rec:
        seen = ", ".join(sorted(map(str, rec))) or "none"
        raise _RowError(name, f"missing required field (fields present: {seen})")
    return rec[name]


def _expect_str(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise _RowError(field, f"expected a string, got {_type_name(value)}")
    return value


def _expect_list(value: object, field: str, what: str = "an array") -> List[Any]:
    if not isinstance(value, (list, tuple)):
        raise _RowError(field, f"expected {what}, got {_type_name(value)}")
    return list(value)


def _expect_str_list(value: object, field: str, min_len: int = 0) -> List[str]:
    items = _expect_list(value, field, "an array of strings")
    for i, item in enumerate(items):
        _expect_str(item, f"{field}[{i}]")
    if len(items) < min_len:
        raise _RowError(field, f"expected at least {min_len} responses, got {len(items)}")
    return items


def _parse_score(value: object, field: str) -> float:
    """One finite number (JSON's NaN/Infinity literals are rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _RowError(field, f"expected a number, got {_type_name(value)}")
    x = float(value)
    if not math.isfinite(x):
        raise _RowError(field, f"score must be finite, got {x!r}")
    return x


def _parse_scores(value: object, field: str, n: int) -> Optional[List[float]]:
    """A list of ``n`` finite numbers, or None when ``value`` is null."""
    if value is None:
        return None
    items = _expect_list(value, field, "an array of numbers")
    out = [_parse_score(item, f"{field}[{i}]") for i, item in enumerate(items)]
    if len(out) != n:
        raise _RowError(field, f"has {len(out)} scores but there are {n} responses")
    return out


def _turn(role: str, content: str) -> Dict[str, str]:
    return {"role": role, "content": content}


def _parse_messages(value: object, field: str) -> List[Dict[str, str]]:
    """Chat messages ``[{"role", "content"}, ...]`` with canonical roles."""
    items = _expect_list(value, field, "an array of messages")
    out: List[Dict[str, str]] = []
    for i, msg in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(msg, Mapping):
            raise _RowError(where, f"expected a message object, got {_type_name(msg)}")
        role = _expect_str(_require_msg(msg, "role", where), f"{where}.role")
        content = _expect_str(_require_msg(msg, "content", where), f"{where}.content")
        if role not in ROLES:
            raise _RowError(
                f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}"
            )
        extra = sorted(str(k) for k, v in msg.items() if k not in ("role", "content") and v is not None)
        if extra:
            raise _RowError(
                where,
                f"unsupported message key(s) {', '.join(extra)}: only role and content are kept",
            )
        out.append(_turn(role, content))
    return out


def _require_msg(msg: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in msg:
        raise _RowError(f"{where}.{key}", "missing required key in message")
    return msg[key]


def _parse_prompt(value: object, field: str) -> List[Dict[str, str]]:
    """A prompt string (one user turn) or a list of messages."""
    if isinstance(value, str):
        return [_turn("user", value)]
    if isinstance(value, (list, tuple)):
        return _parse_messages(value, field)
    raise _RowError(field, f"expected a string or an array of messages, got {_type_name(value)}")


def _first_difference(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Index of the first element where ``a`` and ``b`` differ (or the length
    of the shorter one when it is a prefix of the other)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# ---------------------------------------------------------------------------
# Format detection and subset names
# ---------------------------------------------------------------------------


def detect_format(record: Mapping[str, Any]) -> Optional[str]:
    """The input format of ``record`` judged from its fields, or None."""
    keys = set(record)
    if {"context", "responses"} <= keys:
        return "canonical"
    if {"prefix", "suffix"} <= keys:
        return "pro"
    if "responses" in keys and ("prompt" in keys or "messages" in keys):
        return "ranked"
    if {"chosen", "rejected"} <= keys:
        if "prompt" in keys:
            return "pairs"
        return "hh" if isinstance(record["chosen"], str) else "pairs"
    return None


def _unknown_format_reason(record: Mapping[str, Any]) -> str:
    seen = ", ".join(sorted(map(str, record))) or "none"
    known = "; ".join(f"{name} ({fields})" for name, fields in _FORMAT_FIELDS.items())
    return (
        f"cannot detect the data format from the fields of the first record "
        f"(fields seen: {seen}); known formats: {known}; pass format= to force one"
    )


_SUBSET_PREFIXES = ("test_", "train_", "dev_")
_SUBSET_SUFFIXES = ("-test", "_test", "-train", "_train", "-dev", "_dev")


def derive_subset(path: PathLike) -> str:
    """Subset name from a file name: the basename without its data extension,
    without a leading ``test_``/``train_``/``dev_`` and without a trailing
    ``-test``/``_test``/``-train``/``_train``/``-dev``/``_dev``.

    >>> derive_subset("data/harmless-base-test.jsonl.gz")
    'harmless-base'
    >>> derive_subset("test_harmless_base.jsonl.gz")
    'harmless_base'
    """
    name = Path(path).name
    stem = name
    for suffix, _ in _EXTENSIONS:
        if name.lower().endswith(suffix):
            stem = name[: -len(suffix)]
            break
    out = stem
    for prefix in _SUBSET_PREFIXES:
        if out.startswith(prefix):
            out = out[len(prefix) :]
            break
    for suffix in _SUBSET_SUFFIXES:
        if out.endswith(suffix):
            out = out[: -len(suffix)]
            break
    return out or stem


# ---------------------------------------------------------------------------
# Containers: turning files into records
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _derive_subset_cached(name: str) -> str:
    return derive_subset(name)


@dataclass
class _Record:
    line: int
    raw: Optional[str]
    value: object = None
    error: Optional[Tuple[Optional[str], str]] = None  # (field, reason)


def _container(path: Path, display: str) -> str:
    lower = path.name.lower()
    for suffix, kind in _EXTENSIONS:
        if lower.endswith(suffix):
            return kind
    supported = ", ".join(s for s, _ in _EXTENSIONS)
    raise DataError(display, None, None, f"unsupported file extension; supported: {supported}")


def _decode_line(raw: bytes, first: bool) -> Tuple[Optional[str], Optional[str]]:
    """(text, None) or (None, reason) for one line of bytes."""
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 4]
        return None, f"line is not valid UTF-8: {e.reason} at byte {e.start} ({bad!r})"
    return text.rstrip("\r\n"), None


def _jsonl_records(lines: Iterable[bytes], display: str) -> Iterator[_Record]:
    lineno = 0
    try:
        for lineno, raw in enumerate(lines, start=1):
            text, problem = _decode_line(raw, lineno == 1)
            if text is None:
                yield _Record(lineno, None, error=(None, problem or "undecodable line"))
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                yield _Record(lineno, text, error=(None, f"invalid JSON: {e}"))
                continue
            yield _Record(lineno, text, value)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(display, lineno + 1 if lineno else None, None, f"cannot read file: {e}") from e


def _read_bytes(path: Path, display: str, gz: bool) -> bytes:
    try:
        if gz:
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(display, None, None, f"cannot read file: {e}") from e


def _json_records(path: Path, display: str, gz: bool) -> Iterator[_Record]:
    data = _read_bytes(path, display, gz)
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head == b"{":  # JSON Lines in a .json file (Hugging Face datasets' default)
        yield from _jsonl_records(data.splitlines(keepends=True), display)
        return
    if not head:
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(display, line, None, f"file is not valid UTF-8: {e.reason} at byte {e.start}") from e
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(display, e.lineno, None, f"invalid JSON: {e}") from e
    if not isinstance(value, list):
        raise DataError(
            display, None, None, f"expected a top-level JSON array of objects, got {_type_name(value)}"
        )
    for i, item in enumerate(value, start=1):
        yield _Record(i, json.dumps(item, ensure_ascii=False), item)


def _parquet_records(path: Path, display: str) -> Iterator[_Record]:
    try:
        frame = pl.read_parquet(path)
    except Exception as e:  # polars/arrow raise a variety of error types
        raise DataError(display, None, None, f"cannot read Parquet file: {_one_line(str(e))}") from e
    for i, row in enumerate(frame.iter_rows(named=True), start=1):
        yield _Record(i, json.dumps(row, ensure_ascii=False, default=str), row)


def _records(path: Path, display: str) -> Iterator[_Record]:
    """Check that ``path`` is a readable data file and yield its records."""
    if not path.exists():
        raise DataError(display, None, None, "file not found")
    if not path.is_file():
        raise DataError(display, None, None, "not a regular file")
    kind = _container(path, display)
    gz = path.name.lower().endswith(".gz")
    if kind == "parquet":
        return _parquet_records(path, display)
    if kind == "json":
        return _json_records(path, display, gz)
    return _jsonl_lines(path, display, gz)


def _jsonl_lines(path: Path, display: str, gz: bool) -> Iterator[_Record]:
    try:
        fh = gzip.open(path, "rb") if gz else open(path, "rb")
    except OSError as e:
        raise DataError(display, None, None, f"cannot open file: {e}") from e
    with fh:
        yield from _jsonl_records(fh, display)


# ---------------------------------------------------------------------------
# Row parsers: one record -> canonical fields
# ---------------------------------------------------------------------------


@dataclass
class _Parsed:
    context: List[Dict[str, str]]
    responses: List[str]
    response_fields: List[str]  # where each response came from, for messages
    scores: Optional[List[float]]
    ranked: bool
    used: Set[str]
    notes: List[Tuple[Optional[str], str]] = field(default_factory=list)
    # Canonical records carry these themselves.
    source: Optional[Tuple[str, int]] = None
    meta: Optional[str] = None
    meta_given: bool = False


_HH_ASSISTANT = "\n\nAssistant:"
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_BARE_START = re.compile(r"\A\s*(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def _hh_content(text: str) -> str:
    """Turn content after a role marker: one leading space and trailing
    whitespace removed, inner text exact."""
    if text.startswith(" "):
        text = text[1:]
    return text.rstrip()


def _parse_hh_context(prefix: str) -> Tuple[List[Dict[str, str]], Optional[str]]:
    """Split an HH transcript prefix into turns, only at ``"\\n\\nHuman:"`` /
    ``"\\n\\nAssistant:"`` markers, so multi-paragraph turns stay whole.

    Text before the first marker becomes a ``system`` turn, kept as is (this is
    how :func:`deft.render.render_hh` renders a system turn), except text that
    itself starts with ``Human:``/``Assistant:`` (a transcript without the
    leading blank lines), which is read as that turn and noted.
    """
    parts = _HH_MARKER.split(prefix)
    preamble, rest = parts[0], parts[1:]
    turns: List[Dict[str, str]] = []
    note: Optional[str] = None
    if preamble:
        bare = _HH_BARE_START.match(preamble)
        if bare:
            turns.append(_turn(_HH_ROLE[bare.group(1)], _hh_content(preamble[bare.end() :])))
            note = f"transcript starts with {bare.group(1)!r}: without the usual leading blank lines"
        else:
            turns.append(_turn("system", preamble))
    for i in range(0, len(rest), 2):
        turns.append(_turn(_HH_ROLE[rest[i]], _hh_content(rest[i + 1])))
    return turns, note


def _split_hh(chosen: str, rejected: str) -> Tuple[int, Optional[str]]:
    """Where to split an HH pair into the shared context and the responses.

    Normally both transcripts are split at their last ``"\\n\\nAssistant:"``
    and the two prefixes must be identical. In the real HH-RLHF data some
    responses themselves continue the dialogue (``"...\\n\\nHuman: ...
    \\n\\nAssistant: ..."`` generated inside one reply; 5 of 2,312 rows of
    harmless-base test). Such a pair is split at the earlier of the two last
    markers when both transcripts have the same text up to and including it;
    this is reported as a note. Anything else is an
    error naming the first character offset where the contexts differ.
    """
    ic, ir = chosen.rfind(_HH_ASSISTANT), rejected.rfind(_HH_ASSISTANT)
    for name, pos in (("chosen", ic), ("rejected", ir)):
        if pos < 0:
            raise _RowError(name, 'no "\\n\\nAssistant:" marker: the transcript has no assistant response')
    if ic == ir and chosen[:ic] == rejected[:ir]:
        return ic, None
    split = min(ic, ir)
    end = split + len(_HH_ASSISTANT)
    if chosen[:end] == rejected[:end]:
        longer = "chosen" if ic > ir else "rejected"
        return split, (
            f"contexts end at different \"\\n\\nAssistant:\" markers; split at the last shared one "
            f"(offset {split}), so the {longer!r} response contains further dialogue turns"
        )
    offset = _first_difference(chosen[:ic], rejected[:ir])
    raise _RowError(
        "rejected",
        f"context differs from the context of 'chosen' at character offset {offset}: "
        f"chosen has {_snippet(chosen[offset:ic])}, rejected has {_snippet(rejected[offset:ir])}",
    )


def _parse_hh(rec: Mapping[str, Any]) -> _Parsed:
    chosen = _expect_str(_require(rec, "chosen"), "chosen")
    rejected = _expect_str(_require(rec, "rejected"), "rejected")
    split, split_note = _split_hh(chosen, rejected)
    context, context_note = _parse_hh_context(chosen[:split])
    responses = []
    for text in (chosen, rejected):
        reply = text[split + len(_HH_ASSISTANT) :]
        responses.append(reply[1:] if reply.startswith(" ") else reply)
    notes: List[Tuple[Optional[str], str]] = []
    if context_note:
        notes.append(("chosen", context_note))
    if split_note:
        notes.append(("rejected", split_note))
    return _Parsed(context, responses, ["chosen", "rejected"], None, True, {"chosen", "rejected"}, notes)


def _assistant_reply(value: object, field: str) -> Tuple[str, Optional[str]]:
    """The response of a TRL ``chosen``/``rejected`` value given an explicit
    prompt: a string, or messages that are all assistant messages (several are
    joined with a blank line, and noted)."""
    if isinstance(value, str):
        return value, None
    messages = _parse_messages(value, field)
    if not messages:
        raise _RowError(field, "empty message list: expected the assistant response")
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            raise _RowError(
                f"{field}[{i}].role",
                f"got a {msg['role']!r} message; with a separate 'prompt', {field!r} must hold only "
                f"the assistant response",
            )
    if len(messages) > 1:
        note = f"{len(messages)} assistant messages joined with a blank line"
        return "\n\n".join(m["content"] for m in messages), note
    return messages[0]["content"], None


def _split_conversation(value: object, field: str) -> Tuple[List[Dict[str, str]], str]:
    """(context, response) of a whole conversation ending with the assistant
    reply (TRL implicit prompt)."""
    if isinstance(value, str):
        raise _RowError(
            field,
            "expected an array of messages when there is no 'prompt' field "
            "(a plain transcript string is the 'hh' format)",
        )
    messages = _parse_messages(value, field)
    if not messages:
        raise _RowError(field, "empty message list: expected a conversation ending with the assistant response")
    last = messages[-1]
    if last["role"] != "assistant":
        raise _RowError(
            f"{field}[{len(messages) - 1}].role",
            f"conversation ends with a {last['role']!r} message; expected the assistant response last",
        )
    return messages[:-1], last["content"]


def _parse_pairs(rec: Mapping[str, Any]) -> _Parsed:
    used = {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
    chosen_value = _require(rec, "chosen")
    rejected_value = _require(rec, "rejected")
    notes: List[Tuple[Optional[str], str]] = []
    if "prompt" in rec:
        context = _parse_prompt(rec["prompt"], "prompt")
        responses = []
        for name, value in (("chosen", chosen_value), ("rejected", rejected_value)):
            text, note = _assistant_reply(value, name)
            responses.append(text)
            if note:
                notes.append((name, note))
    else:
        context, chosen = _split_conversation(chosen_value, "chosen")
        other, rejected = _split_conversation(rejected_value, "rejected")
        if other != context:
            k = _first_difference(context, other)
            raise _RowError(
                "rejected",
                f"context differs from the context of 'chosen' at message {k} "
                f"(chosen has {len(context)} context messages, rejected has {len(other)})",
            )
        responses = [chosen, rejected]
    sc, sr = rec.get("score_chosen"), rec.get("score_rejected")
    scores: Optional[List[float]] = None
    if sc is not None or sr is not None:
        if sc is None or sr is None:
            missing = "score_chosen" if sc is None else "score_rejected"
            raise _RowError(missing, "missing while the other score is given")
        scores = [_parse_score(sc, "score_chosen"), _parse_score(sr, "score_rejected")]
    return _Parsed(context, responses, ["chosen", "rejected"], scores, True, used, notes)


_PRO_TAGS = (("<|prompter|>", "user"), ("<|assistant|>", "assistant"), ("<|system|>", "system"))


def _parse_pro_turns(value: object, field: str) -> List[Dict[str, str]]:
    turns_raw = _expect_str_list(value, field)
    turns: List[Dict[str, str]] = []
    for j, text in enumerate(turns_raw):
        for tag, role in _PRO_TAGS:
            if text.startswith(tag):
                turns.append(_turn(role, text[len(tag) :]))
                break
        else:
            tags = ", ".join(t for t, _ in _PRO_TAGS)
            raise _RowError(f"{field}[{j}]", f"turn does not start with a role tag ({tags}): {_snippet(text)}")
    # The trailing empty assistant turn is the generation slot, not context.
    if turns and turns[-1] == _turn("assistant", ""):
        turns.pop()
    return turns


def _parse_pro(rec: Mapping[str, Any]) -> _Parsed:
    prefixes = _expect_list(_require(rec, "prefix"), "prefix", "an array of turn arrays")
    suffix = _expect_str_list(_require(rec, "suffix"), "suffix", min_len=2)
    if len(prefixes) != len(suffix):
        raise _RowError("prefix", f"has {len(prefixes)} contexts but there are {len(suffix)} suffixes")
    contexts = [_parse_pro_turns(p, f"prefix[{i}]") for i, p in enumerate(prefixes)]
    for i, ctx in enumerate(contexts[1:], start=1):
        if ctx != contexts[0]:
            k = _first_difference(contexts[0], ctx)
            raise _RowError(
                f"prefix[{i}]",
                f"context of response {i} differs from prefix[0] at turn {k}; "
                f"all responses of a record must share one context",
            )
    scores = _parse_scores(rec.get("reward"), "reward", len(suffix))
    fields = [f"suffix[{i}]" for i in range(len(suffix))]
    return _Parsed(contexts[0], suffix, fields, scores, True, {"prefix", "suffix", "reward"})


def _parse_ranked(rec: Mapping[str, Any]) -> _Parsed:
    if "prompt" in rec and "messages" in rec:
        raise _RowError("messages", "give either 'prompt' or 'messages', not both")
    if "messages" in rec:
        context = _parse_messages(rec["messages"], "messages")
    else:
        context = _parse_prompt(_require(rec, "prompt"), "prompt")
    responses = _expect_str_list(_require(rec, "responses"), "responses", min_len=2)
    scores = _parse_scores(rec.get("scores"), "scores", len(responses))
    ranked = rec.get("ranked", True)
    if ranked is None:
        ranked = True
    if not isinstance(ranked, bool):
        raise _RowError("ranked", f"expected a boolean, got {_type_name(ranked)}")
    fields = [f"responses[{i}]" for i in range(len(responses))]
    return _Parsed(context, responses, fields, scores, ranked, {"prompt", "messages", "responses", "scores", "ranked"})


def _parse_canonical(rec: Mapping[str, Any]) -> _Parsed:
    extra = sorted(str(k) for k in rec if k not in SCHEMA)
    if extra:
        raise _RowError(
            extra[0],
            f"unexpected field(s) {', '.join(extra)} in a canonical record; "
            f"canonical columns are {', '.join(SCHEMA)} (put anything else in 'meta')",
        )
    context = _parse_messages(_require(rec, "context"), "context")
    responses = _expect_str_list(_require(rec, "responses"), "responses", min_len=2)
    scores = _parse_scores(rec.get("scores"), "scores", len(responses))
    ranked = _require(rec, "ranked")
    if not isinstance(ranked, bool):
        raise _RowError("ranked", f"expected a boolean, got {_type_name(ranked)}")
    source: Optional[Tuple[str, int]] = None
    sf, sl = rec.get("source_file"), rec.get("source_line")
    if sf is not None or sl is not None:
        if sf is None or sl is None:
            missing = "source_file" if sf is None else "source_line"
            raise _RowError(missing, "missing while the other source field is given")
        _expect_str(sf, "source_file")
        if isinstance(sl, bool) or not isinstance(sl, int):
            raise _RowError("source_line", f"expected an integer, got {_type_name(sl)}")
        if sl < 1:
            raise _RowError("source_line", f"must be >= 1, got {sl}")
        source = (sf, sl)
    meta = rec.get("meta")
    if meta is not None:
        _expect_str(meta, "meta")
    fields = [f"responses[{i}]" for i in range(len(responses))]
    parsed = _Parsed(context, responses, fields, scores, ranked, set(SCHEMA), source=source)
    parsed.meta, parsed.meta_given = meta, True
    return parsed


_PARSERS: Dict[str, Callable[[Mapping[str, Any]], _Parsed]] = {
    "hh": _parse_hh,
    "pairs": _parse_pairs,
    "pro": _parse_pro,
    "ranked": _parse_ranked,
    "canonical": _parse_canonical,
}


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def _arrow_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.large_string()),
            ("subset", pa.large_string()),
            ("context", pa.large_list(pa.struct([("role", pa.large_string()), ("content", pa.large_string())]))),
            ("responses", pa.large_list(pa.large_string())),
            ("scores", pa.large_list(pa.float64())),
            ("ranked", pa.bool_()),
            ("source_file", pa.large_string()),
            ("source_line", pa.int64()),
            ("meta", pa.large_string()),
        ]
    )


def _frame_from_columns(columns: Mapping[str, List[Any]]) -> pl.DataFrame:
    """Build the canonical frame from Python column lists. Goes through
    pyarrow's C++ converter, several times faster than Polars' Python-side
    construction for the nested ``context`` column."""
    import pyarrow as pa

    table = pa.Table.from_pydict({k: columns[k] for k in SCHEMA}, schema=_arrow_schema())
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame.cast(SCHEMA)  # type: ignore[arg-type]


class _Loader:
    """State shared by the files of one load: options, ids, rows, problems."""

    def __init__(self, on_error: str, subset: Optional[str], allow_empty: Optional[bool]) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if subset is not None and not isinstance(subset, str):
            raise TypeError(f"subset must be a string or None, got {type(subset).__name__}")
        self.on_error = on_error
        self.subset = subset
        self.allow_empty = allow_empty
        self.columns: Dict[str, List[Any]] = {name: [] for name in SCHEMA}
        self.seen_ids: Dict[str, Tuple[str, int]] = {}
        self.rejects: List[Reject] = []
        self.notes: List[Note] = []
        self.n_read = 0

    def _fail(self, err: DataError, raw: Optional[str]) -> None:
        if self.on_error == "raise":
            raise err
        self.rejects.append(Reject(err.file, err.line, err.field, err.reason, raw))

    def load_file(self, path: PathLike, fmt: str) -> str:
        """Read one file into the shared columns; return its format."""
        if fmt != "auto" and fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; expected 'auto' or one of {', '.join(FORMATS)}")
        display = os.fspath(path)
        p = Path(display)
        detected: Optional[str] = None if fmt == "auto" else fmt
        n_file = n_bad = 0
        first_error: Optional[str] = None
        for rec in _records(p, display):
            n_file += 1
            self.n_read += 1
            problem = rec.error
            if problem is None and not isinstance(rec.value, Mapping):
                problem = (None, f"expected a JSON object, got {_type_name(rec.value)}")
            if problem is None:
                value: Mapping[str, Any] = rec.value  # type: ignore[assignment]
                if detected is None:
                    detected = detect_format(value)
                    if detected is None:
                        raise DataError(display, rec.line, None, _unknown_format_reason(value))
                try:
                    self._add_row(value, detected, display, p.name, rec.line)
                    continue
                except _RowError as e:
                    problem = (e.field, e.reason)
            n_bad += 1
            err = DataError(display, rec.line, problem[0], problem[1])
            first_error = first_error or str(err)
            self._fail(err, rec.raw)
        if n_file == 0:
            raise DataError(display, None, None, "file is empty: it holds no records")
        if detected is None:
            raise DataError(
                display, None, None,
                f"none of the {n_file} records could be read, so the format is unknown "
                f"(first error: {first_error})",
            )
        return detected

    def _add_row(self, rec: Mapping[str, Any], fmt: str, display: str, name: str, line: int) -> None:
        parsed = _PARSERS[fmt](rec)
        row_id = self._row_id(rec, name, line)
        subset = rec.get("subset")
        if subset is None:
            subset = self.subset if self.subset is not None else _derive_subset_cached(name)
        elif not isinstance(subset, str):
            raise _RowError("subset", f"expected a string, got {_type_name(subset)}")
        allow_empty = self.allow_empty if self.allow_empty is not None else fmt in _EMPTY_OK_BY_DEFAULT
        notes = list(parsed.notes)
        for i, (text, where) in enumerate(zip(parsed.responses, parsed.response_fields)):
            if text.strip():
                continue
            if not allow_empty:
                raise _RowError(where, f"response {i} is empty or whitespace-only")
            notes.append((where, f"response {i} is empty; kept (an assistant reply that says nothing)"))
        if row_id in self.seen_ids:
            f, l = self.seen_ids[row_id]
            raise _RowError("id", f"duplicate id {row_id!r}: already used by {f}:{l}")
        if parsed.meta_given:
            meta = parsed.meta
        else:
            rest = {k: v for k, v in rec.items() if k not in parsed.used and k not in ("id", "subset")}
            meta = json.dumps(rest, ensure_ascii=False, default=str) if rest else None
        source_file, source_line = parsed.source or (display, line)
        # Accept the row.
        self.seen_ids[row_id] = (display, line)
        values = (row_id, subset, parsed.context, parsed.responses, parsed.scores,
                  parsed.ranked, source_file, source_line, meta)
        for column, value in zip(SCHEMA, values):
            self.columns[column].append(value)
        self.notes.extend(Note(display, line, f, r) for f, r in notes)

    @staticmethod
    def _row_id(rec: Mapping[str, Any], name: str, line: int) -> str:
        value = rec.get("id")
        if value is None:
            return f"{name}:{line}"
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _RowError("id", f"expected a string or an integer, got {_type_name(value)}")
        text = str(value)
        if not text.strip():
            raise _RowError("id", "id is empty")
        return text

    def result(self, fmt: str, rejects_path: Optional[PathLike]) -> LoadResult:
        frame = _frame_from_columns(self.columns)
        validate_frame(frame)
        written: Optional[Path] = None
        if rejects_path is not None:
            written = Path(rejects_path)
            lines = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in self.rejects)
            _atomic_write(written, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
        return LoadResult(frame, fmt, self.n_read, self.rejects, written, self.notes)


def load(
    path: PathLike,
    *,
    format: str = "auto",
    subset: Optional[str] = None,
    on_error: str = "raise",
    rejects_path: Optional[PathLike] = None,
    allow_empty_responses: Optional[bool] = None,
) -> LoadResult:
    """Load one preference data file into a canonical frame.

    Args:
        path: a ``.jsonl``, ``.jsonl.gz``, ``.json``, ``.json.gz`` or
            ``.parquet`` file.
        format: ``"auto"`` (detect from the first record's fields) or one of
            :data:`FORMATS`.
        subset: subset name for records without a ``subset`` field (default:
            derived from the file name, see :func:`derive_subset`).
        on_error: ``"raise"`` raises the first bad record's :class:`DataError`;
            ``"skip"`` skips bad records and lists them in ``rejects``.
            File-level problems (missing, empty or unreadable file, unsupported
            extension, undetectable format) always raise.
        rejects_path: when given, a JSON Lines file written (atomically) with
            one ``{"source_file", "source_line", "field", "reason", "raw"}``
            object per rejected record (empty when none). Default: no file.
        allow_empty_responses: keep responses that are empty after ``strip()``
            (reported as notes) instead of rejecting the record. None means the
            format's default: kept for ``hh``, ``pro`` and ``canonical`` (whose
            real sources contain them), rejected for ``pairs`` and ``ranked``.

    Raises:
        DataError: bad input (see above).
        ValueError: an invalid ``format`` or ``on_error`` argument.
    """
    loader = _Loader(on_error, subset, allow_empty_responses)
    detected = loader.load_file(path, format)
    return loader.result(detected, rejects_path)


def load_many(
    paths: Iterable[PathLike],
    *,
    format: str = "auto",
    subset: Optional[str] = None,
    on_error: str = "raise",
    rejects_path: Optional[PathLike] = None,
    allow_empty_responses: Optional[bool] = None,
) -> LoadResult:
    """Load several files (each detected separately unless ``format`` is
    forced) into one canonical frame, in order. Ids must be unique across all
    files; ``format`` of the result is the common format or ``"mixed"``.
    Arguments are as for :func:`load`."""
    paths = list(paths)
    if not paths:
        raise ValueError("load_many() needs at least one path")
    loader = _Loader(on_error, subset, allow_empty_responses)
    formats = [loader.load_file(p, format) for p in paths]
    fmt = formats[0] if len(set(formats)) == 1 else "mixed"
    return loader.result(fmt, rejects_path)


def load_frame(path: PathLike, **kwargs: Any) -> pl.DataFrame:
    """``load(path, **kwargs).frame``."""
    return load(path, **kwargs).frame


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def _frame_error(df: pl.DataFrame, row: int, column: str, reason: str) -> DataError:
    """A DataError pointing at a frame row's source (or at the frame)."""
    file, line = "<frame>", None
    if "source_file" in df.columns and "source_line" in df.columns:
        f, l = df["source_file"][row], df["source_line"][row]
        if f is not None:
            file, line = str(f), l
    rid = df["id"][row] if "id" in df.columns else None
    return DataError(file, line, column, f"row {row}" + (f" (id {rid!r})" if rid is not None else "") + f": {reason}")


def validate_frame(df: pl.DataFrame, *, allow_empty_responses: bool = True) -> None:
    """Raise :class:`DataError` unless ``df`` is a canonical frame.

    Checks the column names, order and types against :data:`SCHEMA`, then the
    row invariants: no nulls except in ``scores``/``meta``; known roles; at
    least two responses; scores (when not null) finite and one per response;
    ``source_line >= 1``; unique ids; and, unless ``allow_empty_responses``,
    responses non-empty after strip. Row errors point at the row's
    ``source_file:source_line``.
    """
    if not isinstance(df, pl.DataFrame):
        raise TypeError(f"expected a polars DataFrame, got {type(df).__name__}")
    expected = list(SCHEMA)
    if df.columns != expected:
        missing = [c for c in expected if c not in df.columns]
        extra = [c for c in df.columns if c not in SCHEMA]
        detail = []
        if missing:
            detail.append(f"missing {', '.join(missing)}")
        if extra:
            detail.append(f"unexpected {', '.join(extra)}")
        if not detail:
            detail.append(f"wrong order {', '.join(df.columns)}")
        raise DataError("<frame>", None, None, f"not canonical: columns must be {', '.join(expected)} ({'; '.join(detail)})")
    for name, dtype in SCHEMA.items():
        if df.schema[name] != dtype:
            raise DataError("<frame>", None, name, f"has type {df.schema[name]}, expected {dtype}")
    if df.height == 0:
        return

    def first(mask: pl.Expr) -> Optional[int]:
        hits = df.select(pl.arg_where(mask.fill_null(True)).first()).item()
        return None if hits is None else int(hits)

    resp = pl.col("responses")
    n_resp = resp.list.len()
    checks: List[Tuple[str, pl.Expr, str]] = [
        (name, pl.col(name).is_null(), "is null")
        for name in SCHEMA if name not in ("scores", "meta")
    ]
    checks += [
        ("context", pl.col("context").list.eval(pl.element().struct.field("role").is_in(list(ROLES)).not_().fill_null(True)).list.any(),
         f"has a null or unknown role (roles are {', '.join(ROLES)})"),
        ("context", pl.col("context").list.eval(pl.element().struct.field("content").is_null()).list.any(), "has a null content"),
        ("responses", n_resp < 2, "has fewer than 2 responses"),
        ("responses", resp.list.eval(pl.element().is_null()).list.any(), "has a null response"),
        ("scores", pl.col("scores").is_not_null() & (pl.col("scores").list.len() != n_resp), "length differs from the number of responses"),
        ("scores", pl.col("scores").list.eval(pl.element().is_null() | pl.element().is_finite().not_()).list.any().fill_null(False),
         "has a null or non-finite score"),
        ("source_line", pl.col("source_line") < 1, "must be >= 1"),
        ("id", pl.col("id").is_duplicated(), "duplicate id"),
    ]
    if not allow_empty_responses:
        checks.append(("responses", resp.list.eval(pl.element().str.strip_chars() == "").list.any(), "has an empty response"))
    for column, mask, reason in checks:
        row = first(mask)
        if row is not None:
            raise _frame_error(df, row, column, reason)


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` via a temporary file in the same directory + os.replace."""
    with atomic_path(path) as tmp:
        write(tmp)


def save(frame: pl.DataFrame, path: PathLike, *, validate: bool = True) -> Path:
    """Write a canonical frame atomically: Parquet, or JSON Lines when the
    name ends in ``.jsonl`` / ``.jsonl.gz``. Validates first unless
    ``validate=False``. Returns the path written."""
    out = Path(path)
    lower = out.name.lower()
    if validate:
        validate_frame(frame)
    if lower.endswith(".parquet"):
        _atomic_write(out, lambda tmp: frame.write_parquet(tmp))
    elif lower.endswith(".jsonl"):
        _atomic_write(out, lambda tmp: frame.write_ndjson(tmp))
    elif lower.endswith(".jsonl.gz"):
        def write_gz(tmp: Path) -> None:
            with gzip.open(tmp, "wb") as fh:
                frame.write_ndjson(fh)
        _atomic_write(out, write_gz)
    else:
        raise ValueError(f"{path}: unsupported output extension; use .parquet, .jsonl or .jsonl.gz")
    return out
