"""The ``pairs`` format: TRL preference pairs ``{"prompt", "chosen",
"rejected"}`` (explicit prompt, or implicit: whole conversations split at their
final assistant message), with optional ``score_chosen``/``score_rejected``."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

from deft.data.fields import _first_difference, _parse_messages, _parse_prompt, _parse_score, _require, _type_name
from deft.data.registry import _Parsed, register_format
from deft.data.results import _RowError


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


def _detect(record: Mapping[str, Any]) -> bool:
    """``chosen`` and ``rejected`` (tried after ``hh``, which takes transcript
    strings without a ``prompt``)."""
    return {"chosen", "rejected"} <= set(record)


register_format(
    "pairs",
    fields="prompt (optional), chosen, rejected",
    detect=_detect,
    detect_order=50,
    parse=_parse_pairs,
)
