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
    from the file name by :func:`derive_subset` (``harmless-base-test.jsonl.gz``,
    ``test_harmless_base.jsonl.gz`` and ``harmless-base/train.jsonl.gz`` all
    give ``harmless_base``).
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

Large ``pro``, ``hh`` and ``canonical`` files are read by a vectorised fast
path (pyarrow's JSON reader, Polars expressions) that gives exactly what the
record-by-record reader gives and hands anything unusual -- an error, a skipped
record, an odd shape -- to it; set ``DEFT_LOADER=rows`` to always read record
by record.

Prompt rendering (:func:`render_hh`, :func:`render_oasst`, :func:`render_chat`)
lives in :mod:`deft.render` and is re-exported here.
"""

from __future__ import annotations

import functools
import gzip
import itertools
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

# Imported inside the functions that use them, on purpose: pyarrow (only the fast JSON reader and the Arrow
# conversions use it); importing deft stays fast.
from deft.errors import DeftError
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


class DataError(DeftError, ValueError):
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
    ``-test``/``_test``/``-train``/``_train``/``-dev``/``_dev``; hyphens become
    underscores, so HH-RLHF's file names and PRO's name a subset alike. A file
    named only by its split (``harmless-base/train.jsonl.gz``, Anthropic's
    layout) takes the name of its folder.

    >>> derive_subset("data/harmless-base-test.jsonl.gz")
    'harmless_base'
    >>> derive_subset("test_harmless_base.jsonl.gz")
    'harmless_base'
    >>> derive_subset("hh-rlhf/helpful-base/test.jsonl.gz")
    'helpful_base'
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
    out = out or stem
    folder = Path(path).parent.name
    if out.lower() in _SPLIT_NAMES and folder not in ("", ".", ".."):
        out = folder
    return out.replace("-", "_")


#: File names that name a split, not a subset (the folder names the subset).
_SPLIT_NAMES = ("train", "test", "dev", "valid", "validation", "eval")


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


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(value: object, path: str = "") -> Optional[Tuple[str, str]]:
    """(field, character) of the first string holding a lone UTF-16 surrogate
    (JSON ``"\\ud800"`` without its pair), which no UTF-8 text can hold."""
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        return (path or "(value)", m.group()) if m else None
    if isinstance(value, dict):
        for k, v in value.items():
            hit = _lone_surrogate(v, f"{path}.{k}" if path else str(k))
            if hit:
                return hit
    elif isinstance(value, list):
        for i, v in enumerate(value):
            hit = _lone_surrogate(v, f"{path}[{i}]")
            if hit:
                return hit
    return None


def _surrogate_error(value: object) -> Optional[Tuple[Optional[str], str]]:
    hit = _lone_surrogate(value)
    if hit is None:
        return None
    field, ch = hit
    return field, f"holds a lone UTF-16 surrogate escape (\\u{ord(ch):04x}), which is not valid Unicode text"


def _cr_hint(text: str, e: json.JSONDecodeError) -> str:
    """A hint for JSON Lines whose records are separated by CR alone (old Mac
    line endings), which read as one line holding several objects."""
    if e.msg == "Extra data" and "\r" in text.rstrip("\r\n"):
        return ("; the line holds carriage returns (CR) between records: the file seems to use CR-only line "
                "endings, which JSON Lines does not allow; convert them to LF (e.g. tr '\\r' '\\n')")
    return ""


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
                yield _Record(lineno, text, error=(None, f"invalid JSON: {e}{_cr_hint(text, e)}"))
                continue
            if "\\ud" in text or "\\uD" in text:  # a surrogate escape: paired (fine) or lone
                bad = _surrogate_error(value)
                if bad is not None:
                    yield _Record(lineno, text, error=bad)
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
        bad = _surrogate_error(item)
        if bad is not None:
            yield _Record(i, json.dumps(item), error=bad)
            continue
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
    if not isinstance(value, (list, tuple)):
        raise _RowError(field, f"expected a string or an array of assistant messages, got {_type_name(value)}")
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
# Vectorised fast path
# ---------------------------------------------------------------------------
#
# The row parsers above are the reference: they define every format, give the
# precise error for a bad record and implement ``on_error="skip"``. They cost
# about 100 us a record, so :class:`_Loader` first offers each file to
# :func:`_fast_load`, which reads it with a native reader (pyarrow's JSON
# reader with an explicit schema, or Polars' Parquet reader) and builds the
# canonical columns with Polars expressions, without a Python loop over the
# records. It covers the ``pro``, ``hh`` and ``canonical`` formats in JSON
# Lines (``.jsonl``, ``.jsonl.gz``, a ``.json``/``.json.gz`` holding JSON
# Lines) and Parquet.
#
# The fast path accepts a file only when it can show that the row path would
# load every record of it, without an error or a reject, into the same frame
# with the same notes. On anything else -- a parse error, undecodable text, a
# missing or mistyped field (pyarrow's reader is strict: an unknown field, a
# type change or a duplicated key is an error), a validation failure, an
# unusual shape -- it *declines* and the row path loads the file from scratch,
# with its precise errors and rejects. The few records whose parsing is easier
# to get right in Python (HH pairs whose contexts differ or need a note) are
# handed to the row parser one at a time.

#: Environment variable choosing the loader: ``rows`` forces the row-by-row
#: path; anything else (``auto``, the default) tries the fast path first.
_LOADER_ENV = "DEFT_LOADER"

#: When set to a list, each file load appends ``(file, decision)``: ``"fast"``,
#: or ``"rows: <why the fast path declined>"``. For tests and debugging.
_fast_trace: Optional[List[Tuple[str, str]]] = None

#: The characters for which ``str.isspace()`` is true, i.e. what ``str.strip()``
#: removes (Polars' own strip uses Unicode White_Space, which lacks \x1c-\x1f).
_PY_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)

#: What ``json.dumps(..., ensure_ascii=False)`` escapes inside a string.
_JSON_ESCAPES: Dict[str, str] = {
    "\\": "\\\\", '"': '\\"', "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
    **{chr(i): f"\\u{i:04x}" for i in range(0x20) if chr(i) not in "\b\f\n\r\t"},
}

#: Key names the fast path renders into ``meta`` (anything else: row path).
_SIMPLE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")

_BOM = b"\xef\xbb\xbf"


class _Decline(Exception):
    """The fast path cannot vouch for a file; the row path must load it."""


def _fast_path_enabled() -> bool:
    return os.environ.get(_LOADER_ENV, "auto").strip().lower() != "rows"


def _require_fast(ok: bool, reason: str) -> None:
    if not ok:
        raise _Decline(reason)


@dataclass
class _FastFile:
    """A file loaded by the fast path: the canonical ``frame``, the detected
    format, the record count, the notes, and each row's loader location (the
    line; differs from ``source_line`` for canonical input)."""

    frame: pl.DataFrame
    fmt: str
    n_read: int
    notes: List[Note]
    lines: pl.Series


@dataclass
class _Built:
    """What a format builder makes of the decoded records: ``columns`` holds
    ``context``, ``responses`` and ``scores`` (and, for canonical input,
    ``ranked``, ``source_file``, ``source_line`` and ``meta``); ``row_notes``
    the notes of the records the row parser handled, by row index."""

    columns: pl.DataFrame
    response_field: Callable[[int], str]
    row_notes: Dict[int, List[Tuple[Optional[str], str]]] = field(default_factory=dict)


def _fast_load(
    path: Path, display: str, fmt: str, subset: Optional[str], allow_empty: Optional[bool]
) -> Optional[_FastFile]:
    """Load ``path`` with the fast path, or return None when it declines (the
    caller then runs the row path). Never raises for bad data."""
    if not _fast_path_enabled():
        return None
    try:
        return _fast_load_file(path, display, fmt, subset, allow_empty)
    except _Decline as e:
        _trace_fast(display, f"rows: {e}")
    except Exception as e:  # any surprise (parser error, odd type...) -> row path
        _trace_fast(display, f"rows: {type(e).__name__}: {_one_line(str(e))[:300]}")
    return None


def _trace_fast(display: str, decision: str) -> None:
    if _fast_trace is not None:
        _fast_trace.append((display, decision))


def _fast_load_file(
    path: Path, display: str, fmt: str, subset: Optional[str], allow_empty: Optional[bool]
) -> _FastFile:
    _require_fast(path.is_file(), "not a regular file")
    kind = _container(path, display)
    raw_lines: Optional[pl.Series] = None
    if kind == "parquet":
        records = pl.read_parquet(path)
        _require_fast(records.height > 0, "no records")
        fmt = _fast_format(records.row(0, named=True), fmt)
        _check_parquet_types(records, fmt)
        lines = pl.Series("line", range(1, records.height + 1), dtype=pl.Int64)
    else:
        records, rows, fmt = _fast_read_json_lines(path, kind, fmt)
        lines, raw_lines = rows["lineno"].cast(pl.Int64), rows["line"]
    built = _FAST_BUILDERS[fmt](records)
    return _assemble(records, built, fmt, path, display, lines, raw_lines, subset, allow_empty)


def _fast_format(first: Mapping[str, Any], fmt: str) -> str:
    """The format of a file whose first record is ``first`` (``fmt`` unless
    ``"auto"``), if the fast path covers it."""
    detected = detect_format(first) if fmt == "auto" else fmt
    _require_fast(detected in _FAST_BUILDERS, f"no fast path for format {detected!r}")
    return str(detected)


# -- Reading ----------------------------------------------------------------


def _fast_read_json_lines(path: Path, kind: str, fmt: str) -> Tuple[pl.DataFrame, pl.DataFrame, str]:
    """Decode a JSON Lines file with pyarrow's JSON reader. Returns the
    records (one column per schema field), the lines they come from (``line``:
    text, ``lineno``: 1-based line number) and the format.

    The row path numbers the lines of the file (``.jsonl``: split at ``\\n``;
    JSON Lines in a ``.json`` file: ``bytes.splitlines``), decodes each as
    UTF-8 (a BOM allowed on line 1), skips blank ones and parses each other
    line as one JSON value. Here each non-blank line must look like one object
    (stripped of JSON whitespace, its text starts with ``{`` and ends with
    ``}``), and pyarrow must return as many rows: as a JSON value cannot span
    lines (a string cannot hold a raw newline) and such a line holds at least
    one object, rows and lines then correspond one to one, in order. pyarrow's
    reader is strict: with the explicit schema of :func:`_fast_arrow_schema`,
    an unknown or repeated field, another type than the schema's, invalid JSON
    or a lone surrogate is an error.
    """
    import pyarrow as pa
    import pyarrow.json as pj

    rows, data = _fast_lines(path, kind)
    _require_fast(rows.height > 0, "no records")
    first = json.loads(rows["line"][0])
    _require_fast(isinstance(first, dict), "the first record is not an object")
    fmt = _fast_format(first, fmt)
    longest = int(rows.select(pl.col("line").str.len_bytes().max()).item())
    schema = _fast_arrow_schema(first, fmt)
    table = pj.read_json(
        pa.BufferReader(data if data is not None else _joined(rows["line"])),
        read_options=pj.ReadOptions(block_size=max(4 << 20, 2 * longest + 64)),
        parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error"),
    )
    _require_fast(table.num_rows == rows.height, "records and lines do not correspond")
    records = pl.from_arrow(table)
    assert isinstance(records, pl.DataFrame)
    return records, rows, fmt


def _fast_lines(path: Path, kind: str) -> Tuple[pl.DataFrame, Optional[bytes]]:
    """The non-blank lines of a JSON Lines file (``line``, ``lineno``), each
    checked to look like one object, and the file's bytes (decompressed), or
    None when the lines came straight from a gzip file."""
    gz = path.name.lower().endswith(".gz")
    if gz and kind == "jsonl":
        lines = _gzip_lines(path)
        if lines is not None:
            return _object_lines(lines), None
    data = _read_bytes(path, path.name, gz)
    if kind == "json":
        _require_fast(data.lstrip(_BOM + b" \t\r\n")[:1] == b"{", "a JSON array")
    return _object_lines(_split_lines(data, kind)), data


def _numbered(lines: pl.Series) -> pl.DataFrame:
    return lines.rename("line").to_frame().with_row_index("lineno", offset=1)


def _split_lines(data: bytes, kind: str) -> pl.DataFrame:
    """The lines of ``data`` as the row path sees them (``line``: decoded,
    strictly, as UTF-8, without a BOM at the start, null or empty when blank;
    ``lineno``)."""
    bom = len(_BOM) if data.startswith(_BOM) else 0
    if kind == "jsonl" and b"\r" not in data:
        # Polars' CSV reader, with no quoting and a separator that JSON text
        # cannot hold raw, splits at "\n" only, multi-threaded (and drops a
        # leading BOM). The byte count shows the lines are whole and in order.
        lines = _csv_lines(data)
        newlines = lines.len() if data.endswith(b"\n") else lines.len() - 1
        _require_fast(_text_bytes(lines) + newlines + bom == len(data), "lines do not add up")
        return _numbered(lines)
    if kind == "json":
        parts = data.splitlines()
    else:
        parts = data.split(b"\n")
        if not parts[-1]:
            parts.pop()  # (after the final newline)
    if bom:
        parts[0] = parts[0][bom:]
    return _numbered(pl.Series("line", parts, dtype=pl.Binary).cast(pl.Utf8))


def _gzip_lines(path: Path) -> Optional[pl.DataFrame]:
    """The lines of a gzip JSON Lines file (as :func:`_split_lines`), which
    Polars' CSV reader decompresses (about twice as fast as zlib, and strict:
    a corrupt stream or a wrong checksum is an error) and splits; or None when
    they cannot be shown to be the file's lines exactly (then the caller
    decompresses the file itself)."""
    raw = path.read_bytes()
    try:
        lines = _csv_lines(raw)
    except Exception:  # (invalid UTF-8, a stray byte... or not gzip at all)
        return None
    with gzip.open(path, "rb") as fh:
        bom = len(_BOM) if fh.read(len(_BOM)) == _BOM else 0
    # The size the gzip trailer gives (of the last member, modulo 2**32) must
    # be that of the lines, their newlines (the last line's is optional) and
    # the BOM: no text was lost or changed. ("\r\n" line ends, which the CSV
    # reader shortens, and files of several gzip members fail here.)
    size = _text_bytes(lines) + lines.len() + bom
    if int.from_bytes(raw[-4:], "little") not in (size % 2**32, (size - 1) % 2**32):
        return None
    return _numbered(lines)


def _csv_lines(data: bytes) -> pl.Series:
    return pl.read_csv(
        data, has_header=False, separator="\x01", quote_char=None, schema={"line": pl.Utf8},
    ).to_series()


def _text_bytes(lines: pl.Series) -> int:
    return int(lines.str.len_bytes().sum() or 0)


def _joined(lines: pl.Series) -> Any:
    """The (non-null) lines, each followed by a newline, as one pyarrow buffer."""
    import pyarrow as pa

    array = (lines + "\n").to_arrow()  # (the text of a string array is contiguous)
    if array.type != pa.large_string():
        array = array.cast(pa.large_string())
    _, offsets, data = array.buffers()
    ends = memoryview(offsets).cast("q")
    start, end = ends[array.offset], ends[array.offset + len(array)]
    return data.slice(start, end - start)


def _object_lines(rows: pl.DataFrame) -> pl.DataFrame:
    """The non-blank ``rows``; declines unless each looks like one object."""
    line = pl.col("line")
    if rows.select((line.str.starts_with("{") & line.str.ends_with("}")).fill_null(False).all()).item():
        return rows
    stripped = line.str.strip_chars(" \t\r").fill_null("")
    shape = rows.select(blank=stripped == "", obj=stripped.str.starts_with("{") & stripped.str.ends_with("}"))
    _require_fast(bool((shape["blank"] | shape["obj"]).all()), "a line that is not one JSON object")
    return rows.filter(~shape["blank"])


def _fast_arrow_schema(first: Mapping[str, Any], fmt: str) -> Any:
    """The explicit pyarrow schema to read a file in format ``fmt`` with: the
    format's own fields (present in the first record or not), ``id`` (int64
    when the first record's id is an integer, else string), ``subset``, and the
    first record's other fields typed from their values (:func:`_arrow_type_of`).
    A later record with another field or another type makes pyarrow fail."""
    import pyarrow as pa

    s = pa.string()
    fields: Dict[str, Any] = {
        "pro": {"prefix": pa.list_(pa.list_(s)), "suffix": pa.list_(s), "reward": pa.list_(pa.float64())},
        "hh": {"chosen": s, "rejected": s},
        "canonical": {
            "context": pa.list_(pa.struct([("role", s), ("content", s)])), "responses": pa.list_(s),
            "scores": pa.list_(pa.float64()), "ranked": pa.bool_(), "source_file": s,
            "source_line": pa.int64(), "meta": s,
        },
    }[fmt]
    rid = first.get("id")
    fields["id"] = pa.int64() if isinstance(rid, int) and not isinstance(rid, bool) else s
    fields["subset"] = s
    for key, value in first.items():
        if key not in fields:
            _require_fast(fmt != "canonical", f"unexpected field {key!r} in a canonical record")
            _require_fast(bool(_SIMPLE_KEY.match(key)), f"field name {key!r}")
            fields[key] = _arrow_type_of(value, key)
    return pa.schema(list(fields.items()))


def _arrow_type_of(value: object, where: str) -> Any:
    """pyarrow type for an unused field, from its value in the first record:
    null, boolean, int64, string, and objects and non-empty arrays of those.
    Floats are refused (``meta`` would need Python's float repr)."""
    import pyarrow as pa

    if value is None:
        return pa.null()
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        _require_fast(-(2**63) <= value < 2**63, f"{where}: integer out of range")
        return pa.int64()
    if isinstance(value, str):
        return pa.string()
    if isinstance(value, dict):
        _require_fast(bool(value), f"{where}: empty object")
        items = []
        for key, item in value.items():
            _require_fast(isinstance(key, str) and bool(_SIMPLE_KEY.match(key)), f"{where}: key {key!r}")
            items.append((key, _arrow_type_of(item, f"{where}.{key}")))
        return pa.struct(items)
    if isinstance(value, list):
        types = {_arrow_type_of(item, f"{where}[]") for item in value if item is not None}
        _require_fast(len(types) == 1, f"{where}: empty or mixed array")
        return pa.list_(types.pop())
    raise _Decline(f"{where}: a {_type_name(value)}")


# Polars types a Parquet file must have for the row path to read it exactly as
# the fast path does (Null: a column that is null throughout).
_TEXT = (pl.Utf8, pl.Null)


def _check_parquet_types(records: pl.DataFrame, fmt: str) -> None:
    """Decline unless each column has a type the fast path reads exactly as
    the row path reads the Python values of ``iter_rows``."""
    expected: Dict[str, Tuple[Any, ...]] = {
        "id": (pl.Utf8, pl.Int64, pl.Int32, pl.UInt32, pl.Null),
        "subset": _TEXT,
    }
    if fmt == "pro":
        expected.update(prefix=(pl.List(pl.List(pl.Utf8)),), suffix=(pl.List(pl.Utf8),),
                        reward=(pl.List(pl.Float64), pl.Null))
    elif fmt == "hh":
        expected.update(chosen=(pl.Utf8,), rejected=(pl.Utf8,))
    else:
        message = pl.Struct({"role": pl.Utf8, "content": pl.Utf8})
        expected.update(context=(pl.List(message),), responses=(pl.List(pl.Utf8),),
                        scores=(pl.List(pl.Float64), pl.Null), ranked=(pl.Boolean,),
                        source_file=_TEXT, source_line=(pl.Int64, pl.Int32, pl.Null), meta=_TEXT)
    for name, dtype in records.schema.items():
        if name in expected:
            _require_fast(any(dtype == t for t in expected[name]), f"column {name!r} has type {dtype}")
        else:
            _require_fast(fmt != "canonical" and _renderable(dtype), f"column {name!r} has type {dtype}")


def _renderable(dtype: pl.DataType) -> bool:
    """Whether :func:`_json_text` renders values of ``dtype``."""
    if dtype in (pl.Null, pl.Boolean, pl.Int64, pl.Utf8):
        return True
    if isinstance(dtype, pl.List):
        return _renderable(dtype.inner)
    if isinstance(dtype, pl.Struct):
        return bool(dtype.fields) and all(_SIMPLE_KEY.match(f.name) and _renderable(f.dtype) for f in dtype.fields)
    return False


# -- Format builders --------------------------------------------------------


def _any_in_lists(column: str, test: pl.Expr) -> pl.Expr:
    """Per row: does ``test`` hold for any element of the list ``column``?"""
    return pl.col(column).list.eval(test).list.any().fill_null(False)


def _strip_one_space(text: pl.Expr) -> pl.Expr:
    return pl.when(text.str.starts_with(" ")).then(text.str.slice(1)).otherwise(text)


def _declining_checks(frame: pl.DataFrame, checks: Mapping[str, pl.Expr]) -> None:
    """Decline, naming the first failed check, if any check is true for a row
    (a null counts as true: each check must decide every row)."""
    found = frame.select([expr.fill_null(True).any().alias(name) for name, expr in checks.items()])
    for name, hit in found.row(0, named=True).items():
        _require_fast(not hit, name)


def _fast_pro(records: pl.DataFrame) -> _Built:
    """PRO records (see :func:`_parse_pro`)."""
    el = pl.element()
    prefix, suffix = pl.col("prefix"), pl.col("suffix")
    _declining_checks(records, {
        "prefix or suffix missing": prefix.is_null() | suffix.is_null(),
        "null suffix": _any_in_lists("suffix", el.is_null()),
        "fewer than 2 suffixes": suffix.list.len() < 2,
        "prefix and suffix counts differ": prefix.list.len() != suffix.list.len(),
        "null prefix": _any_in_lists("prefix", el.is_null()),
    })
    # All contexts of a record must be equal once the generation slot (a final
    # bare "<|assistant|>") is dropped; usually they are equal as given.
    slot = "<|assistant|>"

    def without_slot(turns: pl.Expr) -> pl.Expr:
        return pl.when(turns.list.last() == slot).then(turns.list.head(turns.list.len() - 1)).otherwise(turns)

    def all_equal(normalise: Callable[[pl.Expr], pl.Expr]) -> pl.Expr:
        first = normalise(prefix.list.first())
        same = pl.lit(True)
        for i in range(1, int(records.select(prefix.list.len().max()).item())):
            other = normalise(prefix.list.get(i, null_on_oob=True))
            same = same & ((prefix.list.len() <= i) | (other == first).fill_null(False))
        return same

    unequal = records.filter(~all_equal(lambda turns: turns))
    _declining_checks(unequal, {"contexts differ": ~all_equal(without_slot)})
    # So every context's turns are the first context's: strings with a role tag.
    first = records["prefix"].list.first()
    turns = first.explode().drop_nulls().rename("turn")  # (an empty context explodes to a null)
    _require_fast(turns.len() == first.list.len().sum(), "null turn")
    tagged = pl.any_horizontal([pl.col("turn").str.starts_with(tag) for tag, _ in _PRO_TAGS])
    _require_fast(turns.to_frame().select(tagged.all()).item(), "untagged turn")

    has_reward = "reward" in records.columns and records.schema["reward"] != pl.Null
    if has_reward:
        reward = pl.col("reward")
        _declining_checks(records, {
            "reward count differs": reward.is_not_null() & (reward.list.len() != suffix.list.len()),
            # (-0.0 is refused: pyarrow reads the integer -0 as -0.0, Python as 0)
            "null, non-finite or -0 reward": _any_in_lists("reward", _bad_score(el)),
        })
    else:
        reward = pl.lit(None, pl.List(pl.Float64))
    # Each turn: the role its tag names, the text after the tag (the last tag
    # is the only one left once the others are ruled out).
    (tag_1, role_1), (tag_2, role_2), (tag_3, role_3) = _PRO_TAGS
    is_1, is_2 = el.str.starts_with(tag_1), el.str.starts_with(tag_2)
    role = pl.when(is_1).then(pl.lit(role_1)).when(is_2).then(pl.lit(role_2)).otherwise(pl.lit(role_3))
    skip = pl.when(is_1).then(len(tag_1)).when(is_2).then(len(tag_2)).otherwise(len(tag_3))
    turn = pl.struct(role.alias("role"), el.str.slice(skip).alias("content"))
    context = without_slot(prefix.list.first()).list.eval(turn)
    columns = records.select(context=context, responses=suffix, scores=reward)
    return _Built(columns, lambda i: f"suffix[{i}]")


def _bad_score(x: pl.Expr) -> pl.Expr:
    """A score the fast path does not take: null, NaN, infinite or -0.0."""
    return x.is_null() | ~x.is_finite() | ((x == 0.0) & ((1.0 / x) < 0))


def _fast_hh(records: pl.DataFrame) -> _Built:
    """HH transcript pairs (see :func:`_parse_hh`). The usual pair -- both
    transcripts share the text before their last ``"\\n\\nAssistant:"`` -- is
    split with expressions; a pair whose contexts differ, or whose context has
    an unusual start or a NUL character, goes to :func:`_parse_hh`."""
    el = pl.element()
    marker = _HH_ASSISTANT
    _declining_checks(records, {
        "chosen or rejected missing": pl.col("chosen").is_null() | pl.col("rejected").is_null(),
    })
    work = records.select(
        c=pl.col("chosen").str.split(marker),
        r=pl.col("rejected").str.split(marker),
    )
    _declining_checks(work, {
        "no assistant marker": (pl.col("c").list.len() < 2) | (pl.col("r").list.len() < 2),
    })

    def context_of(parts: pl.Expr) -> pl.Expr:
        return parts.list.head(parts.list.len() - 1).list.join(marker)

    work = work.select(
        ctx=context_of(pl.col("c")),
        other=context_of(pl.col("r")),
        reply_c=_strip_one_space(pl.col("c").list.last()),
        reply_r=_strip_one_space(pl.col("r").list.last()),
    )
    # The context: split at the role markers (they never overlap), each piece
    # led by its role's letter; the text before the first marker, led by "S",
    # is a system turn unless empty. (Each step is materialised: eager Polars
    # would evaluate a repeated subexpression again.)
    markers = pl.col("ctx").str.replace_many(["\n\nHuman:", "\n\nAssistant:"], ["\x00U", "\x00A"])
    work = work.with_columns(parts=pl.concat_str([pl.lit("S"), markers]).str.split("\x00"))
    work = work.with_columns(preamble=pl.col("parts").list.first().str.slice(1))
    preamble = pl.col("preamble")
    system = el.str.starts_with("S")
    role = (
        pl.when(system).then(pl.lit("system"))
        .when(el.str.starts_with("U")).then(pl.lit("user"))
        .otherwise(pl.lit("assistant"))
    )
    text = el.str.slice(1)
    content = pl.when(system).then(text).otherwise(_strip_one_space(text).str.strip_chars_end(_PY_WHITESPACE))
    turns = pl.col("parts").list.slice((preamble == "").cast(pl.Int64))
    work = work.with_columns(
        context=turns.list.eval(pl.struct(role.alias("role"), content.alias("content"))),
        responses=pl.concat_list([pl.col("reply_c"), pl.col("reply_r")]),
        special=(pl.col("ctx") != pl.col("other"))
        | pl.col("ctx").str.contains("\x00", literal=True)
        | ((preamble != "") & (preamble.str.contains("Human:", literal=True)
                               | preamble.str.contains("Assistant:", literal=True))),
    )
    columns = work.select("context", "responses", scores=pl.lit(None, pl.List(pl.Float64)))
    fields = ("chosen", "rejected")
    special = work["special"].arg_true().to_list()
    if not special:
        return _Built(columns, fields.__getitem__)
    # The rare pairs the row parser splits (or rejects: then the row path runs).
    notes: Dict[int, List[Tuple[Optional[str], str]]] = {}
    parsed: List[_Parsed] = []
    for i, (chosen, rejected) in zip(special, records.select(fields)[special].iter_rows()):
        try:
            p = _parse_hh({"chosen": chosen, "rejected": rejected})
        except _RowError as e:
            raise _Decline(f"row error: {e.reason}") from e
        parsed.append(p)
        if p.notes:
            notes[i] = list(p.notes)
    patch = pl.DataFrame(
        {"context": [p.context for p in parsed], "responses": [p.responses for p in parsed]},
        schema={"context": SCHEMA["context"], "responses": SCHEMA["responses"]},
    )
    columns = _replace_rows(columns, special, patch)
    return _Built(columns, fields.__getitem__, notes)


def _replace_rows(frame: pl.DataFrame, rows: Sequence[int], patch: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with the columns of ``patch`` (one row per entry of ``rows``)
    replacing its own in those rows."""
    where = pl.Series("_where", [None] * frame.height, dtype=pl.UInt32).scatter(list(rows), range(len(rows)))
    spread = patch.select(pl.all().gather(where))  # (null where not patched)
    hit = where.is_not_null()
    return frame.with_columns(
        pl.when(hit).then(spread[name]).otherwise(pl.col(name)).alias(name) for name in patch.columns
    )


def _fast_canonical(records: pl.DataFrame) -> _Built:
    """Canonical records (see :func:`_parse_canonical`)."""
    el = pl.element()
    cols = records.columns
    _require_fast(set(cols) <= set(SCHEMA), "unexpected field in a canonical record")
    _require_fast({"context", "responses", "ranked"} <= set(cols), "a required field is missing")

    def col(name: str, dtype: pl.DataType) -> pl.Expr:
        return pl.col(name) if name in cols else pl.lit(None, dtype)

    scores = col("scores", pl.List(pl.Float64))
    source_file, source_line = col("source_file", pl.Utf8), col("source_line", pl.Int64)
    roles = list(ROLES)
    checks = {
        "context missing": pl.col("context").is_null(),
        "null message, role or content": _any_in_lists(
            "context", el.is_null() | el.struct.field("role").is_null() | el.struct.field("content").is_null()
        ),
        "unknown role": _any_in_lists("context", ~el.struct.field("role").is_in(roles)),
        "responses missing": pl.col("responses").is_null(),
        "null response": _any_in_lists("responses", el.is_null()),
        "fewer than 2 responses": pl.col("responses").list.len() < 2,
        "ranked missing": pl.col("ranked").is_null(),
        "source_file without source_line or back": source_file.is_null() != source_line.is_null(),
        "source_line < 1": (source_line < 1).fill_null(False),
    }
    if "scores" in cols and records.schema["scores"] != pl.Null:
        checks["scores count differs"] = scores.is_not_null() & (scores.list.len() != pl.col("responses").list.len())
        checks["null, non-finite or -0 score"] = _any_in_lists("scores", _bad_score(el))
    _declining_checks(records, checks)
    columns = records.select(
        context=pl.col("context").list.eval(pl.struct(el.struct.field("role"), el.struct.field("content"))),
        responses=pl.col("responses"),
        scores=scores.cast(pl.List(pl.Float64)),
        ranked=pl.col("ranked"),
        source_file=source_file.cast(pl.Utf8),
        source_line=source_line.cast(pl.Int64),
        meta=col("meta", pl.Utf8).cast(pl.Utf8),
    )
    return _Built(columns, lambda i: f"responses[{i}]")


_FAST_BUILDERS: Dict[str, Callable[[pl.DataFrame], _Built]] = {
    "pro": _fast_pro,
    "hh": _fast_hh,
    "canonical": _fast_canonical,
}

# The fields each format reads (the others go to ``meta``), as in the row parsers.
_FAST_USED: Dict[str, Set[str]] = {
    "pro": {"prefix", "suffix", "reward"},
    "hh": {"chosen", "rejected"},
    "canonical": set(SCHEMA),
}


# -- Ids, subsets, meta, notes ----------------------------------------------


def _duplicate_notes(responses: Sequence[str], fields: Sequence[Optional[str]]) -> List[Tuple[Optional[str], str]]:
    """A note for each response whose text repeats an earlier one of the same
    sample: kept, but a preference between two copies of one text says
    nothing, and with scores one text can land in both Q+ and Q-
    (`deft grade --drop-duplicates` drops such samples)."""
    first: Dict[str, int] = {}
    out: List[Tuple[Optional[str], str]] = []
    for i, text in enumerate(responses):
        j = first.setdefault(text, i)
        if j != i:
            out.append((fields[i], f"response {i} is the same text as response {j}; kept "
                                   "(`deft grade --drop-duplicates` drops such samples)"))
    return out


def _assemble(
    records: pl.DataFrame,
    built: _Built,
    fmt: str,
    path: Path,
    display: str,
    lines: pl.Series,
    raw_lines: Optional[pl.Series],
    subset: Optional[str],
    allow_empty: Optional[bool],
) -> _FastFile:
    """The canonical frame and notes from a builder's columns, made as
    :meth:`_Loader._add_row` makes them."""
    el = pl.element()
    columns = built.columns
    n = records.height
    name = path.name
    absent = pl.Series([None] * n, dtype=pl.Utf8)
    given = pl.DataFrame({
        "id": records["id"].cast(pl.Utf8) if "id" in records.columns else absent,
        "subset": records["subset"].cast(pl.Utf8) if "subset" in records.columns else absent,
        "line": lines,
    })
    # id: the record's own (a string or an integer; not blank), else "{file name}:{line}".
    _declining_checks(given, {"blank id": (pl.col("id").str.strip_chars(_PY_WHITESPACE) == "").fill_null(False)})
    ids = given.select(pl.coalesce(pl.col("id"), pl.lit(f"{name}:") + pl.col("line").cast(pl.Utf8))).to_series()
    _require_fast(not ids.is_duplicated().any(), "duplicate id")
    default_subset = subset if subset is not None else _derive_subset_cached(f"{path.resolve().parent.name}/{name}")
    if "meta" in columns.columns:  # canonical records carry their own
        meta = columns["meta"]
    else:
        meta = _fast_meta(records, fmt, raw_lines)

    # Empty responses are kept (and noted) where the format allows them.
    empty = columns.select(pl.col("responses").list.eval(el.str.strip_chars(_PY_WHITESPACE) == "")).to_series()
    has_empty = empty.list.any()
    allowed = allow_empty if allow_empty is not None else fmt in _EMPTY_OK_BY_DEFAULT
    _require_fast(allowed or not has_empty.any(), "empty response")

    def given_or(column: str, default: pl.Series) -> pl.Series:
        if column not in columns.columns:
            return default
        return pl.DataFrame({"a": columns[column], "b": default}).select(pl.coalesce("a", "b")).to_series()

    frame = pl.DataFrame({
        "id": ids,
        "subset": given["subset"].fill_null(default_subset),
        "context": columns["context"],
        "responses": columns["responses"],
        "scores": columns["scores"],
        "ranked": given_or("ranked", pl.Series([True] * n, dtype=pl.Boolean)),
        "source_file": given_or("source_file", pl.Series([display] * n, dtype=pl.Utf8)),
        "source_line": given_or("source_line", lines),
        "meta": meta,
    }).cast(SCHEMA)  # type: ignore[arg-type]

    # Notes, in the row path's order: the row parser's, then empty responses, then repeated ones.
    has_dup = columns.select(pl.col("responses").list.n_unique() < pl.col("responses").list.len()).to_series()
    noted = sorted(set(built.row_notes) | set(has_empty.arg_true().to_list()) | set(has_dup.arg_true().to_list()))
    notes: List[Note] = []
    if noted:
        texts = columns["responses"].gather(noted).to_list()
        for row, line, flags, resp in zip(noted, lines.gather(noted).to_list(), empty.gather(noted).to_list(), texts):
            for f, reason in built.row_notes.get(row, []):
                notes.append(Note(display, line, f, reason))
            for i, is_empty in enumerate(flags):
                if is_empty:
                    reason = f"response {i} is empty; kept (an assistant reply that says nothing)"
                    notes.append(Note(display, line, built.response_field(i), reason))
            fields = [built.response_field(i) for i in range(len(resp))]
            notes.extend(Note(display, line, f, r) for f, r in _duplicate_notes(resp, fields))
    return _FastFile(frame, fmt, n, notes, lines)


def _json_text(value: pl.Expr, dtype: pl.DataType, item_sep: str = ", ", key_sep: str = ": ") -> pl.Expr:
    """JSON text of ``value`` as ``json.dumps(value, ensure_ascii=False,
    separators=(item_sep, key_sep))`` writes it, for the types of
    :func:`_renderable` (objects keep the field order of ``dtype``)."""
    if dtype == pl.Null:
        return pl.lit("null")
    if dtype == pl.Utf8:
        escaped = value.str.replace_many(list(_JSON_ESCAPES), list(_JSON_ESCAPES.values()))
        text = pl.concat_str([pl.lit('"'), escaped, pl.lit('"')])
    elif dtype == pl.Int64:
        text = value.cast(pl.Utf8)
    elif dtype == pl.Boolean:
        text = pl.when(value).then(pl.lit("true")).otherwise(pl.lit("false"))
    elif isinstance(dtype, pl.Struct):
        parts: List[pl.Expr] = []
        for i, f in enumerate(dtype.fields):
            parts.append(pl.lit(("{" if i == 0 else item_sep) + json.dumps(f.name) + key_sep))
            parts.append(_json_text(value.struct.field(f.name), f.dtype, item_sep, key_sep))
        parts.append(pl.lit("}"))
        text = pl.concat_str(parts)
    elif isinstance(dtype, pl.List):
        inner = pl.element()
        items = value.list.eval(_json_text(inner, dtype.inner, item_sep, key_sep)).list.join(item_sep)
        text = pl.concat_str([pl.lit("["), items, pl.lit("]")])
    else:
        raise _Decline(f"cannot render {dtype} as JSON")
    return pl.when(value.is_null()).then(pl.lit("null")).otherwise(text)


def _members_text(records: pl.DataFrame, names: Sequence[str], item_sep: str, key_sep: str) -> pl.Expr:
    """``"k1": v1, "k2": v2`` for the given fields (JSON object members)."""
    parts: List[pl.Expr] = []
    for i, k in enumerate(names):
        parts.append(pl.lit(("" if i == 0 else item_sep) + json.dumps(k) + key_sep))
        parts.append(_json_text(pl.col(k), records.schema[k], item_sep, key_sep))
    return pl.concat_str(parts)


def _fast_meta(records: pl.DataFrame, fmt: str, raw_lines: Optional[pl.Series]) -> pl.Series:
    """The ``meta`` column: JSON text of the fields the format does not use
    (besides ``id`` and ``subset``), as the row path writes it.

    Parquet rows hold every column, so their text follows the columns. A JSON
    line may lack a field, hold it as null, or order fields its own way, and
    the decoded records cannot tell; so each line must contain the fields as
    one run of members ``"k1": v1, "k2": v2`` (or compact, ``"k1":v1,"k2":v2``)
    followed by ``,`` or ``}``, rendered from the decoded values. Given that
    pyarrow accepted the line (every key is a known field, none repeated) and
    that these names are plain and appear only at the top level of the
    schema, that run can only be the line's own top-level members, so the line
    holds exactly these fields, in this order, with these values.
    """
    extra = [k for k in records.columns if k not in _FAST_USED[fmt] and k not in ("id", "subset")]
    if not extra:
        return pl.Series("meta", [None] * records.height, dtype=pl.Utf8)
    members = records.select(_members_text(records, extra, ", ", ": ")).to_series()
    if raw_lines is not None:
        nested: Set[str] = set()
        for k in extra:
            nested |= _nested_names(records.schema[k])
        _require_fast(not (nested & set(records.columns)), "a field name is used at two levels")
        pending = pl.DataFrame({"line": raw_lines, "members": members, "row": range(records.height)})

        def unmatched(pending: pl.DataFrame) -> pl.DataFrame:
            for end in (",", "}"):
                run = pl.concat_str([pl.col("members"), pl.lit(end)])
                pending = pending.filter(~pl.col("line").str.contains(run, literal=True).fill_null(False))
            return pending

        pending = unmatched(pending)
        if pending.height:  # the rest may be compact JSON
            rest = records[pending["row"]]
            compact = rest.select(_members_text(rest, extra, ",", ":")).to_series()
            pending = unmatched(pending.with_columns(members=compact))
        _require_fast(pending.height == 0, "unused fields are missing, reordered or written differently")
    return members.to_frame().select(pl.concat_str([pl.lit("{"), pl.col(members.name), pl.lit("}")])).to_series()


def _nested_names(dtype: pl.DataType) -> Set[str]:
    """The struct field names anywhere inside ``dtype``."""
    if isinstance(dtype, pl.List):
        return _nested_names(dtype.inner)
    if isinstance(dtype, pl.Struct):
        out = {f.name for f in dtype.fields}
        for f in dtype.fields:
            out |= _nested_names(f.dtype)
        return out
    return set()


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
        # Rows of the row path not yet in a chunk; chunks of the frame, in order.
        self.columns: Dict[str, List[Any]] = {name: [] for name in SCHEMA}
        self.chunks: List[pl.DataFrame] = []
        self.seen_ids: Dict[str, Tuple[str, int]] = {}
        # Ids of files the fast path loaded, not yet in seen_ids: (ids, file, lines).
        self.fast_ids: List[Tuple[pl.Series, str, pl.Series]] = []
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
        fast = _fast_load(p, display, fmt, self.subset, self.allow_empty)
        if fast is not None and self._take_fast(fast, display):
            return fast.fmt
        self._remember_fast_ids()
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
                    self._add_row(value, detected, display, p.name, rec.line, f"{p.resolve().parent.name}/{p.name}")
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

    def _take_fast(self, fast: _FastFile, display: str) -> bool:
        """Add a file the fast path loaded, unless one of its ids was already
        used by an earlier file (then the row path reports it)."""
        ids = fast.frame["id"]  # (unique within the file)
        clash = bool(self.seen_ids) and not self.seen_ids.keys().isdisjoint(ids.to_list())
        clash = clash or any(pl.concat([earlier, ids]).is_duplicated().any() for earlier, _, _ in self.fast_ids)
        if clash:
            _trace_fast(display, "rows: an id of an earlier file")
            return False
        _trace_fast(display, "fast")
        self._flush_rows()
        self.chunks.append(fast.frame)
        self.fast_ids.append((ids, display, fast.lines))
        self.n_read += fast.n_read
        self.notes.extend(fast.notes)
        return True

    def _remember_fast_ids(self) -> None:
        """Put the ids of fast-loaded files into ``seen_ids`` (which the row
        path checks)."""
        for ids, display, lines in self.fast_ids:
            self.seen_ids.update(zip(ids.to_list(), zip(itertools.repeat(display), lines.to_list())))
        self.fast_ids.clear()

    def _flush_rows(self) -> None:
        """Turn the rows collected by the row path into a chunk."""
        if self.columns["id"]:
            self.chunks.append(_frame_from_columns(self.columns))
            self.columns = {name: [] for name in SCHEMA}

    def _add_row(self, rec: Mapping[str, Any], fmt: str, display: str, name: str, line: int, subset_from: str) -> None:
        parsed = _PARSERS[fmt](rec)
        row_id = self._row_id(rec, name, line)
        subset = rec.get("subset")
        if subset is None:
            subset = self.subset if self.subset is not None else _derive_subset_cached(subset_from)
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
        notes.extend(_duplicate_notes(parsed.responses, parsed.response_fields))
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
        self._flush_rows()
        if not self.chunks:
            frame = _frame_from_columns(self.columns)
        elif len(self.chunks) == 1:
            frame = self.chunks[0]
        else:
            frame = pl.concat(self.chunks, how="vertical", rechunk=True)
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
