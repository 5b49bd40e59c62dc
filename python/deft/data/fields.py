"""Small helpers of the row parsers: checking one record's fields (types,
required fields, scores, chat messages) and raising :class:`_RowError` with the
field and the reason."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

from deft.data.results import _RowError
from deft.data.schema import ROLES


def _type_name(value: object) -> str:
    """JSON-flavoured name of a value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


def _snippet(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


def _require(rec: Mapping[str, Any], name: str) -> Any:
    if name not in rec:
        seen = ", ".join(sorted(map(str, rec))) or "none"
        raise _RowError(name, f"missing required field (fields present: {seen})")
    return rec[name]


def _expect_str(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise _RowError(field, f"expected a string, got {_type_name(value)}")
    return value


def _expect_list(value: object, field: str, what: str = "an array") -> List[Any]:
    if not isinstance(value, (list, tuple)):
        raise _RowError(field, f"expected {what}, got {_type_name(value)}")
    return list(value)


def _expect_str_list(value: object, field: str, min_len: int = 0) -> List[str]:
    items = _expect_list(value, field, "an array of strings")
    for i, item in enumerate(items):
        _expect_str(item, f"{field}[{i}]")
    if len(items) < min_len:
        raise _RowError(field, f"expected at least {min_len} responses, got {len(items)}")
    return items


def _parse_score(value: object, field: str) -> float:
    """One finite number (JSON's NaN/Infinity literals are rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _RowError(field, f"expected a number, got {_type_name(value)}")
    x = float(value)
    if not math.isfinite(x):
        raise _RowError(field, f"score must be finite, got {x!r}")
    return x


def _parse_scores(value: object, field: str, n: int) -> Optional[List[float]]:
    """A list of ``n`` finite numbers, or None when ``value`` is null."""
    if value is None:
        return None
    items = _expect_list(value, field, "an array of numbers")
    out = [_parse_score(item, f"{field}[{i}]") for i, item in enumerate(items)]
    if len(out) != n:
        raise _RowError(field, f"has {len(out)} scores but there are {n} responses")
    return out


def _turn(role: str, content: str) -> Dict[str, str]:
    return {"role": role, "content": content}


def _parse_messages(value: object, field: str) -> List[Dict[str, str]]:
    """Chat messages ``[{"role", "content"}, ...]`` with canonical roles."""
    items = _expect_list(value, field, "an array of messages")
    out: List[Dict[str, str]] = []
    for i, msg in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(msg, Mapping):
            raise _RowError(where, f"expected a message object, got {_type_name(msg)}")
        role = _expect_str(_require_msg(msg, "role", where), f"{where}.role")
        content = _expect_str(_require_msg(msg, "content", where), f"{where}.content")
        if role not in ROLES:
            raise _RowError(
                f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}"
            )
        extra = sorted(str(k) for k, v in msg.items() if k not in ("role", "content") and v is not None)
        if extra:
            raise _RowError(
                where,
                f"unsupported message key(s) {', '.join(extra)}: only role and content are kept",
            )
        out.append(_turn(role, content))
    return out


def _require_msg(msg: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in msg:
        raise _RowError(f"{where}.{key}", "missing required key in message")
    return msg[key]


def _parse_prompt(value: object, field: str) -> List[Dict[str, str]]:
    """A prompt string (one user turn) or a list of messages."""
    if isinstance(value, str):
        return [_turn("user", value)]
    if isinstance(value, (list, tuple)):
        return _parse_messages(value, field)
    raise _RowError(field, f"expected a string or an array of messages, got {_type_name(value)}")


def _first_difference(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Index of the first element where ``a`` and ``b`` differ (or the length
    of the shorter one when it is a prefix of the other)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
