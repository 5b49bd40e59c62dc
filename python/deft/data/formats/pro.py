"""The ``pro`` format: PRO ranking data ``{"prefix": [[turn, ...], ...],
"suffix": [r1, r2, ...], "reward": [...]}`` with ``<|prompter|>``/
``<|assistant|>``/``<|system|>`` tagged turns; row parser and fast builder."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping

import polars as pl

# Imported inside _arrow_fields, on purpose: pyarrow (only the fast JSON reader uses it); importing deft stays fast.
from deft.data.fast import _any_in_lists, _bad_score, _declining_checks, _require_fast
from deft.data.fields import _expect_list, _expect_str_list, _first_difference, _parse_scores, _require, _snippet, _turn
from deft.data.registry import FastReader, _Built, _Parsed, register_format
from deft.data.results import _RowError

_PRO_TAGS = (("<|prompter|>", "user"), ("<|assistant|>", "assistant"), ("<|system|>", "system"))

#: The fields the format reads (the others go to ``meta``).
_USED = frozenset({"prefix", "suffix", "reward"})


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
    return _Parsed(contexts[0], suffix, fields, scores, True, _USED)


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


def _detect(record: Mapping[str, Any]) -> bool:
    return {"prefix", "suffix"} <= set(record)


def _arrow_fields() -> Dict[str, Any]:
    import pyarrow as pa

    s = pa.string()
    return {"prefix": pa.list_(pa.list_(s)), "suffix": pa.list_(s), "reward": pa.list_(pa.float64())}


register_format(
    "pro",
    fields="prefix, suffix, reward (optional)",
    detect=_detect,
    detect_order=20,
    parse=_parse_pro,
    empty_ok=True,
    fast=FastReader(
        build=_fast_pro,
        arrow_fields=_arrow_fields,
        parquet_types={
            "prefix": (pl.List(pl.List(pl.Utf8)),), "suffix": (pl.List(pl.Utf8),),
            "reward": (pl.List(pl.Float64), pl.Null),
        },
        used=_USED,
    ),
)
