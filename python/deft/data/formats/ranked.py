"""The ``ranked`` format: ``{"prompt": str | [messages]}`` or ``{"messages":
[messages]}`` with ``"responses": [str, ...]``, optional ``"scores"`` and
``"ranked"``."""

from __future__ import annotations

from typing import Any, Mapping

from deft.data.fields import _expect_str_list, _parse_messages, _parse_prompt, _parse_scores, _require, _type_name
from deft.data.registry import _Parsed, register_format
from deft.data.results import _RowError


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


def _detect(record: Mapping[str, Any]) -> bool:
    keys = set(record)
    return "responses" in keys and ("prompt" in keys or "messages" in keys)


register_format(
    "ranked",
    fields="prompt or messages, responses, scores (optional)",
    detect=_detect,
    detect_order=30,
    parse=_parse_ranked,
)
