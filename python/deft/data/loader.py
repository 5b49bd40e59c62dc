"""Loading and saving: :func:`load`, :func:`load_many`, :func:`load_frame`
(each file offered to the fast path first, else read record by record through
the format's row parser), the rejects file of ``on_error="skip"``, and
:func:`save`."""

from __future__ import annotations

import gzip
import itertools
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import polars as pl

from deft.data.containers import PathLike, _derive_subset_cached, _frame_records, _Record, _records
from deft.data.fast import _fast_load, _fast_load_table, _FastFile, _trace_fast
from deft.data.hf import DatasetSource, is_dataset_source, open_dataset_source
from deft.data.fields import _type_name
from deft.data.registry import detect_format, format_names, get_format, _unknown_format_reason
from deft.data.results import DataError, LoadResult, Note, Reject, _duplicate_notes, _RowError
from deft.data.schema import SCHEMA, _frame_from_columns, validate_frame
from deft.io import atomic_path

#: What :func:`load` reads: a data file, a ``save_to_disk`` folder, an
#: ``hf:NAME[:CONFIG][:SPLIT]`` string or a ``datasets.Dataset`` /
#: ``DatasetDict`` (see :mod:`deft.data.hf`).
Source = Union[PathLike, Any]


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
        self.n_sources = 0
        # Unnamed dataset objects loaded so far, as opened (``dataset``, then ``dataset#POSITION``).
        self.unnamed: List[Tuple[Any, DatasetSource]] = []

    def _fail(self, err: DataError, raw: Optional[str]) -> None:
        if self.on_error == "raise":
            raise err
        self.rejects.append(Reject(err.file, err.line, err.field, err.reason, raw))

    def load_file(self, path: Source, fmt: str) -> str:
        """Read one file (or dataset source) into the shared columns; return its format."""
        names = format_names()
        if fmt != "auto" and fmt not in names:
            raise ValueError(f"unknown format {fmt!r}; expected 'auto' or one of {', '.join(names)}")
        self.n_sources += 1
        if is_dataset_source(path):
            src = open_dataset_source(path)
            if src.unnamed:
                src = self._distinct_unnamed(path, src)
            records = src.records()
            fast = _fast_load_table(records, src.display, src.name, src.subset_from, fmt, self.subset, self.allow_empty)
            return self._load_records(fast, src.display, src.name, src.subset_from, fmt, _frame_records(records),
                                      "dataset is empty: it holds no rows")
        display = os.fspath(path)  # type: ignore[arg-type]
        p = Path(display)
        fast = _fast_load(p, display, fmt, self.subset, self.allow_empty)
        return self._load_records(fast, display, p.name, f"{p.resolve().parent.name}/{p.name}", fmt,
                                  _LazyRecords(p, display), "file is empty: it holds no records")

    def _distinct_unnamed(self, obj: Any, src: DatasetSource) -> DatasetSource:
        """``src`` numbered by its position when an earlier source of this call was another unnamed object
        (the same object again keeps the name it got, so its rows are duplicates)."""
        for earlier, opened in self.unnamed:
            if earlier is obj:
                return opened
        if self.unnamed:
            src = src.numbered(self.n_sources)
        self.unnamed.append((obj, src))
        return src

    def _load_records(self, fast: Optional[_FastFile], display: str, name: str, subset_from: str, fmt: str,
                      records: Iterable[_Record], empty: str) -> str:
        """Take what the fast path loaded, else read ``records`` one by one."""
        if fast is not None and self._take_fast(fast, display):
            return fast.fmt
        self._remember_fast_ids()
        detected: Optional[str] = None if fmt == "auto" else fmt
        n_file = n_bad = 0
        first_error: Optional[str] = None
        for rec in records:
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
                    self._add_row(value, detected, display, name, rec.line, subset_from)
                    continue
                except _RowError as e:
                    problem = (e.field, e.reason)
            n_bad += 1
            err = DataError(display, rec.line, problem[0], problem[1])
            first_error = first_error or str(err)
            self._fail(err, rec.raw)
        if n_file == 0:
            raise DataError(display, None, None, empty)
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
        spec = get_format(fmt)
        parsed = spec.parse(rec)
        row_id = self._row_id(rec, name, line)
        subset = rec.get("subset")
        if subset is None:
            subset = self.subset if self.subset is not None else _derive_subset_cached(subset_from)
        elif not isinstance(subset, str):
            raise _RowError("subset", f"expected a string, got {_type_name(subset)}")
        allow_empty = self.allow_empty if self.allow_empty is not None else spec.empty_ok
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


class _LazyRecords:
    """A file's records, opened (and checked) only when iterated: after the
    fast path has declined."""

    def __init__(self, path: Path, display: str) -> None:
        self.path, self.display = path, display

    def __iter__(self) -> Iterator[_Record]:
        return iter(_records(self.path, self.display))


def load(
    path: Source,
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
            ``.parquet`` file; or a Hugging Face dataset: a
            ``datasets.Dataset`` (or a ``DatasetDict`` holding one split), a
            ``save_to_disk`` folder, or ``"hf:NAME[:CONFIG][:SPLIT]"`` read
            from the local datasets cache (see :mod:`deft.data.hf`).
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
    paths: Iterable[Source],
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
