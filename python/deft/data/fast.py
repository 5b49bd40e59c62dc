"""The vectorised fast path of :func:`deft.data.load`.

The row parsers (:mod:`deft.data.formats`) are the reference: they define every format, give the
precise error for a bad record and implement ``on_error="skip"``. They cost
about 100 us a record, so :class:`_Loader` first offers each file to
:func:`_fast_load`, which reads it with a native reader (pyarrow's JSON
reader with an explicit schema, or Polars' Parquet reader) and builds the
canonical columns with Polars expressions, without a Python loop over the
records. It covers the ``pro``, ``hh`` and ``canonical`` formats in JSON
Lines (``.jsonl``, ``.jsonl.gz``, a ``.json``/``.json.gz`` holding JSON
Lines) and Parquet.

The fast path accepts a file only when it can show that the row path would
load every record of it, without an error or a reject, into the same frame
with the same notes. On anything else -- a parse error, undecodable text, a
missing or mistyped field (pyarrow's reader is strict: an unknown field, a
type change or a duplicated key is an error), a validation failure, an
unusual shape -- it *declines* and the row path loads the file from scratch,
with its precise errors and rejects. The few records whose parsing is easier
to get right in Python (HH pairs whose contexts differ or need a note) are
handed to the row parser one at a time.

The format-specific parts (a builder of the canonical columns, the fields
and their types) come from each format's :class:`~deft.data.registry.FastReader`
(see :mod:`deft.data.formats`); this module reads the lines, decodes them,
checks the unused fields and assembles the frame and its notes.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import polars as pl

# Imported inside the functions that use them, on purpose: pyarrow (only the fast JSON reader and the Arrow
# conversions use it); importing deft stays fast.
from deft.data.containers import _container, _derive_subset_cached, _read_bytes
from deft.data.fields import _type_name
from deft.data.registry import FastReader, _Built, detect_format, fast_reader, get_format
from deft.data.results import Note, _duplicate_notes, _one_line
from deft.data.schema import SCHEMA

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


def _fast_load(
    path: Path, display: str, fmt: str, subset: Optional[str], allow_empty: Optional[bool]
) -> Optional[_FastFile]:
    """Load ``path`` with the fast path, or return None when it declines (the
    caller then runs the row path). Never raises for bad data."""
    return _fast_try(display, lambda: _fast_load_file(path, display, fmt, subset, allow_empty))


def _fast_load_table(
    records: pl.DataFrame, display: str, name: str, subset_from: str, fmt: str, subset: Optional[str],
    allow_empty: Optional[bool],
) -> Optional[_FastFile]:
    """:func:`_fast_load` for records already in a frame, one per row (a
    Hugging Face dataset's Arrow table), read as a Parquet file's: ``name``
    makes the default ids (``"{name}:{row}"``), ``subset_from`` the default
    subset (:func:`derive_subset`)."""
    return _fast_try(display, lambda: _fast_load_records(records, display, name, subset_from, fmt, subset, allow_empty))


def _fast_try(display: str, load: Callable[[], _FastFile]) -> Optional[_FastFile]:
    if not _fast_path_enabled():
        return None
    try:
        return load()
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
    subset_from = f"{path.resolve().parent.name}/{path.name}"
    if kind == "parquet":
        return _fast_load_records(pl.read_parquet(path), display, path.name, subset_from, fmt, subset, allow_empty)
    records, rows, fmt = _fast_read_json_lines(path, kind, fmt)
    lines, raw_lines = rows["lineno"].cast(pl.Int64), rows["line"]
    built = _reader(fmt).build(records)
    return _assemble(records, built, fmt, path.name, subset_from, display, lines, raw_lines, subset, allow_empty)


def _fast_load_records(
    records: pl.DataFrame, display: str, name: str, subset_from: str, fmt: str, subset: Optional[str],
    allow_empty: Optional[bool],
) -> _FastFile:
    """The fast path of a frame of records, one per row, numbered from 1 (a
    Parquet file, a Hugging Face dataset)."""
    _require_fast(records.height > 0, "no records")
    fmt = _fast_format(records.row(0, named=True), fmt)
    _check_parquet_types(records, fmt)
    lines = pl.Series("line", range(1, records.height + 1), dtype=pl.Int64)
    built = _reader(fmt).build(records)
    return _assemble(records, built, fmt, name, subset_from, display, lines, None, subset, allow_empty)


def _fast_format(first: Mapping[str, Any], fmt: str) -> str:
    """The format of a file whose first record is ``first`` (``fmt`` unless
    ``"auto"``), if the fast path covers it."""
    detected = detect_format(first) if fmt == "auto" else fmt
    _require_fast(fast_reader(detected) is not None, f"no fast path for format {detected!r}")
    return str(detected)


def _reader(fmt: str) -> FastReader:
    """The fast reader of ``fmt``, a format :func:`_fast_format` accepted."""
    reader = fast_reader(fmt)
    assert reader is not None
    return reader


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
    reader = _reader(fmt)
    fields: Dict[str, Any] = reader.arrow_fields()
    rid = first.get("id")
    fields["id"] = pa.int64() if isinstance(rid, int) and not isinstance(rid, bool) else s
    fields["subset"] = s
    for key, value in first.items():
        if key not in fields:
            _require_fast(reader.extra_fields, f"unexpected field {key!r} in a {fmt} record")
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
    reader = _reader(fmt)
    expected.update(reader.parquet_types)
    for name, dtype in records.schema.items():
        if name in expected:
            _require_fast(any(dtype == t for t in expected[name]), f"column {name!r} has type {dtype}")
        else:
            _require_fast(reader.extra_fields and _renderable(dtype), f"column {name!r} has type {dtype}")


def _renderable(dtype: pl.DataType) -> bool:
    """Whether :func:`_json_text` renders values of ``dtype``."""
    if dtype in (pl.Null, pl.Boolean, pl.Int64, pl.Utf8):
        return True
    if isinstance(dtype, pl.List):
        return _renderable(dtype.inner)
    if isinstance(dtype, pl.Struct):
        return bool(dtype.fields) and all(_SIMPLE_KEY.match(f.name) and _renderable(f.dtype) for f in dtype.fields)
    return False


# -- Helpers of the format builders -----------------------------------------


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


def _bad_score(x: pl.Expr) -> pl.Expr:
    """A score the fast path does not take: null, NaN, infinite or -0.0."""
    return x.is_null() | ~x.is_finite() | ((x == 0.0) & ((1.0 / x) < 0))


def _replace_rows(frame: pl.DataFrame, rows: Sequence[int], patch: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with the columns of ``patch`` (one row per entry of ``rows``)
    replacing its own in those rows."""
    where = pl.Series("_where", [None] * frame.height, dtype=pl.UInt32).scatter(list(rows), range(len(rows)))
    spread = patch.select(pl.all().gather(where))  # (null where not patched)
    hit = where.is_not_null()
    return frame.with_columns(
        pl.when(hit).then(spread[name]).otherwise(pl.col(name)).alias(name) for name in patch.columns
    )


# -- Ids, subsets, meta, notes ----------------------------------------------


def _assemble(
    records: pl.DataFrame,
    built: _Built,
    fmt: str,
    name: str,
    subset_from: str,
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
    default_subset = subset if subset is not None else _derive_subset_cached(subset_from)
    if "meta" in columns.columns:  # canonical records carry their own
        meta = columns["meta"]
    else:
        meta = _fast_meta(records, fmt, raw_lines)

    # Empty responses are kept (and noted) where the format allows them.
    empty = columns.select(pl.col("responses").list.eval(el.str.strip_chars(_PY_WHITESPACE) == "")).to_series()
    has_empty = empty.list.any()
    allowed = allow_empty if allow_empty is not None else get_format(fmt).empty_ok
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
    used = _reader(fmt).used
    extra = [k for k in records.columns if k not in used and k not in ("id", "subset")]
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
