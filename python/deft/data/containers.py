"""File containers: the supported extensions (``.jsonl``, ``.jsonl.gz``,
``.json``, ``.json.gz``, ``.parquet``), subset names derived from file names
(:func:`derive_subset`), and reading a file into records (:class:`_Record`:
the decoded value, or the reason it could not be read), which the loader
hands to the row parsers."""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Tuple, Union

import polars as pl

from deft.data.fields import _type_name
from deft.data.results import DataError, _one_line

PathLike = Union[str, "os.PathLike[str]"]

_EXTENSIONS: Tuple[Tuple[str, str], ...] = (
    # (suffix, container); longest suffixes first
    (".jsonl.gz", "jsonl"),
    (".json.gz", "json"),
    (".jsonl", "jsonl"),
    (".json", "json"),
    (".parquet", "parquet"),
)

# ---------------------------------------------------------------------------
# Subset names
# ---------------------------------------------------------------------------


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


@functools.lru_cache(maxsize=64)
def _derive_subset_cached(name: str) -> str:
    return derive_subset(name)


# ---------------------------------------------------------------------------
# Reading files into records
# ---------------------------------------------------------------------------


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
    return _frame_records(frame)


def _frame_records(frame: pl.DataFrame) -> Iterator[_Record]:
    """The rows of a frame of records (Parquet, a Hugging Face dataset),
    numbered from 1."""
    for i, row in enumerate(frame.iter_rows(named=True), start=1):
        yield _Record(i, json.dumps(row, ensure_ascii=False, default=str), row)


def _records(path: Path, display: str) -> Iterator[_Record]:
    """Check that ``path`` is a readable data file and yield its records."""
    if not path.exists():
        raise DataError(display, None, None, "file not found")
    if path.is_dir():
        raise DataError(display, None, None, "not a regular file but a folder; a folder is read only when it "
                                             "is a datasets save_to_disk folder (state.json or dataset_dict.json)")
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
