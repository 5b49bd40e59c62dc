"""The ``canonical`` format: a file already in the canonical schema
(``context`` and ``responses``; the other columns may be omitted); row parser
and fast builder."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import polars as pl

# Imported inside _arrow_fields, on purpose: pyarrow (only the fast JSON reader uses it); importing deft stays fast.
from deft.data.fast import _TEXT, _any_in_lists, _bad_score, _declining_checks, _require_fast
from deft.data.fields import _expect_str, _expect_str_list, _parse_messages, _parse_scores, _require, _type_name
from deft.data.registry import FastReader, _Built, _Parsed, register_format
from deft.data.results import _RowError
from deft.data.schema import ROLES, SCHEMA

#: The fields the format reads (all of them: canonical records have no others).
_USED = frozenset(SCHEMA)


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
    parsed = _Parsed(context, responses, fields, scores, ranked, _USED, source=source)
    parsed.meta, parsed.meta_given = meta, True
    return parsed


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


def _detect(record: Mapping[str, Any]) -> bool:
    """``context`` and ``responses`` (tried first: ``ranked`` records have
    ``responses`` too)."""
    return {"context", "responses"} <= set(record)


def _arrow_fields() -> Dict[str, Any]:
    import pyarrow as pa

    s = pa.string()
    return {
        "context": pa.list_(pa.struct([("role", s), ("content", s)])), "responses": pa.list_(s),
        "scores": pa.list_(pa.float64()), "ranked": pa.bool_(), "source_file": s,
        "source_line": pa.int64(), "meta": s,
    }


_MESSAGE = pl.Struct({"role": pl.Utf8, "content": pl.Utf8})

register_format(
    "canonical",
    fields="context, responses, ranked, ...",
    detect=_detect,
    detect_order=10,
    parse=_parse_canonical,
    empty_ok=True,
    fast=FastReader(
        build=_fast_canonical,
        arrow_fields=_arrow_fields,
        parquet_types={
            "context": (pl.List(_MESSAGE),), "responses": (pl.List(pl.Utf8),),
            "scores": (pl.List(pl.Float64), pl.Null), "ranked": (pl.Boolean,),
            "source_file": _TEXT, "source_line": (pl.Int64, pl.Int32, pl.Null), "meta": _TEXT,
        },
        used=_USED,
        extra_fields=False,
    ),
)
