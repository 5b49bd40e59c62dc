"""The registry of input formats, and what a format module provides.

Each module of :mod:`deft.data.formats` registers one format with
:func:`register_format`: its name, a description of its fields (for the
message when no format fits), a detection rule, a row parser (one record ->
:class:`_Parsed`, or :class:`_RowError`) and, optionally, a
:class:`FastReader` for the vectorised fast path (:mod:`deft.data.fast`).
:func:`detect_format`, the loader and the fast path look formats up here, so
a new format is a new module there (plus its name in the imports of
:mod:`deft.data.formats`, which fix the order of :data:`deft.data.FORMATS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AbstractSet, Any, Callable, Dict, List, Mapping, Optional, Tuple

import polars as pl

__all__ = ["FastReader", "Format", "register_format", "get_format", "fast_reader", "format_names", "detect_format"]


@dataclass
class _Parsed:
    context: List[Dict[str, str]]
    responses: List[str]
    response_fields: List[str]  # where each response came from, for messages
    scores: Optional[List[float]]
    ranked: bool
    used: AbstractSet[str]
    notes: List[Tuple[Optional[str], str]] = field(default_factory=list)
    # Canonical records carry these themselves.
    source: Optional[Tuple[str, int]] = None
    meta: Optional[str] = None
    meta_given: bool = False


@dataclass
class _Built:
    """What a format builder makes of the decoded records: ``columns`` holds
    ``context``, ``responses`` and ``scores`` (and, for canonical input,
    ``ranked``, ``source_file``, ``source_line`` and ``meta``); ``row_notes``
    the notes of the records the row parser handled, by row index."""

    columns: pl.DataFrame
    response_field: Callable[[int], str]
    row_notes: Dict[int, List[Tuple[Optional[str], str]]] = field(default_factory=dict)


@dataclass(frozen=True)
class FastReader:
    """A format's part of the fast path (see :mod:`deft.data.fast`).

    ``build`` makes the canonical columns from the decoded records (or
    declines); ``arrow_fields()`` gives the format's own fields as pyarrow
    types (the explicit schema of pyarrow's JSON reader, present in a record
    or not); ``parquet_types`` the Polars types each of those columns may have
    in a Parquet file; ``used`` the fields the format reads (the others go to
    ``meta``, as in the row parser); ``extra_fields`` whether a record may
    have other fields at all.
    """

    build: Callable[[pl.DataFrame], _Built]
    arrow_fields: Callable[[], Dict[str, Any]]
    parquet_types: Mapping[str, Tuple[Any, ...]]
    used: AbstractSet[str]
    extra_fields: bool = True


@dataclass(frozen=True)
class Format:
    """A registered input format (see :func:`register_format`)."""

    name: str
    fields: str
    detect: Callable[[Mapping[str, Any]], bool]
    detect_order: int
    parse: Callable[[Mapping[str, Any]], _Parsed]
    empty_ok: bool = False
    fast: Optional[FastReader] = None


# The formats, in registration order (the order of FORMATS and of messages).
_REGISTRY: Dict[str, Format] = {}
# The same, in the order detect_format tries them.
_DETECTION: List[Format] = []


def register_format(
    name: str,
    *,
    fields: str,
    detect: Callable[[Mapping[str, Any]], bool],
    detect_order: int,
    parse: Callable[[Mapping[str, Any]], _Parsed],
    empty_ok: bool = False,
    fast: Optional[FastReader] = None,
) -> Format:
    """Register the input format ``name``.

    Args:
        fields: its fields, as the message for an undetectable file lists them.
        detect: whether a (first) record is in this format, judged from its
            fields.
        detect_order: :func:`detect_format` tries the formats by increasing
            ``detect_order`` (ties: registration order) and takes the first
            that accepts the record, so a format whose fields another's include
            comes first.
        parse: the row parser: one record -> :class:`_Parsed`, or raises
            :class:`~deft.data.results._RowError` naming the field.
        empty_ok: whether empty responses are kept (and noted) by default, as
            the format's real sources contain them (``allow_empty_responses``).
        fast: the format's vectorised reader, if it has one.
    """
    if name in _REGISTRY or name in ("auto", "mixed"):
        raise ValueError(f"format {name!r} is already registered or reserved")
    fmt = Format(name, fields, detect, detect_order, parse, empty_ok, fast)
    _REGISTRY[name] = fmt
    _DETECTION.append(fmt)
    _DETECTION.sort(key=lambda f: f.detect_order)  # (stable: ties keep registration order)
    return fmt


def get_format(name: str) -> Format:
    """The registered format ``name`` (KeyError when there is none)."""
    return _REGISTRY[name]


def fast_reader(name: Optional[str]) -> Optional[FastReader]:
    """The fast reader of format ``name``, or None (no such format, or none)."""
    fmt = _REGISTRY.get(name) if name is not None else None
    return fmt.fast if fmt is not None else None


def format_names() -> Tuple[str, ...]:
    """The registered formats' names, in registration order."""
    return tuple(_REGISTRY)


def detect_format(record: Mapping[str, Any]) -> Optional[str]:
    """The input format of ``record`` judged from its fields, or None."""
    for fmt in _DETECTION:
        if fmt.detect(record):
            return fmt.name
    return None


def _unknown_format_reason(record: Mapping[str, Any]) -> str:
    seen = ", ".join(sorted(map(str, record))) or "none"
    known = "; ".join(f"{fmt.name} ({fmt.fields})" for fmt in _REGISTRY.values())
    return (
        f"cannot detect the data format from the fields of the first record "
        f"(fields seen: {seen}); known formats: {known}; pass format= to force one"
    )
