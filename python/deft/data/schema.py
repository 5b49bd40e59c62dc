"""The canonical schema: :data:`SCHEMA` (columns, order, Polars types),
:data:`ROLES`, the Arrow form of the schema, building a canonical frame from
Python columns, and :func:`validate_frame` (see :mod:`deft.data` for what each
column holds)."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import polars as pl

# Imported inside the functions that use them, on purpose: pyarrow (only the fast JSON reader and the Arrow
# conversions use it); importing deft stays fast.
from deft.data.results import DataError

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

#: Canonical context roles.
ROLES: Tuple[str, ...] = ("system", "user", "assistant")


# ---------------------------------------------------------------------------
# Canonical frames
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
