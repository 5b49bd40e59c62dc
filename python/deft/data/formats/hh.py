"""The ``hh`` format: raw HH-RLHF transcripts ``{"chosen": str, "rejected":
str}``, split into the shared context and the two responses (:func:`_split_hh`);
row parser and fast builder."""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import polars as pl

# Imported inside _arrow_fields, on purpose: pyarrow (only the fast JSON reader uses it); importing deft stays fast.
from deft.data.fast import _PY_WHITESPACE, _Decline, _declining_checks, _replace_rows, _strip_one_space
from deft.data.fields import _expect_str, _first_difference, _require, _snippet, _turn
from deft.data.registry import FastReader, _Built, _Parsed, register_format
from deft.data.results import _RowError
from deft.data.schema import SCHEMA

_HH_ASSISTANT = "\n\nAssistant:"
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_BARE_START = re.compile(r"\A\s*(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}

#: The fields the format reads (the others go to ``meta``).
_USED = frozenset({"chosen", "rejected"})


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
    return _Parsed(context, responses, ["chosen", "rejected"], None, True, _USED, notes)


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


def _detect(record: Mapping[str, Any]) -> bool:
    """Transcript pairs: ``chosen`` and ``rejected``, no ``prompt``, and
    ``chosen`` a string (else the record is ``pairs``)."""
    keys = set(record)
    return {"chosen", "rejected"} <= keys and "prompt" not in keys and isinstance(record["chosen"], str)


def _arrow_fields() -> Dict[str, Any]:
    import pyarrow as pa

    s = pa.string()
    return {"chosen": s, "rejected": s}


register_format(
    "hh",
    fields="chosen, rejected as transcript strings",
    detect=_detect,
    detect_order=40,
    parse=_parse_hh,
    empty_ok=True,
    fast=FastReader(
        build=_fast_hh,
        arrow_fields=_arrow_fields,
        parquet_types={"chosen": (pl.Utf8,), "rejected": (pl.Utf8,)},
        used=_USED,
    ),
)
