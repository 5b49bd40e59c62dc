"""Render canonical contexts (see :mod:`deft.data`) as model prompts.

A context is a sequence of ``{"role", "content"}`` mappings with roles
``system``, ``user`` and ``assistant`` -- e.g. one value of a canonical
frame's ``context`` column (Polars gives a list of dicts).

* :func:`render_hh` -- Anthropic HH-RLHF transcript text.
* :func:`render_oasst` -- OpenAssistant / PRO tagged text.
* :func:`render_chat` -- a Hugging Face tokenizer's chat template.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = ["render_hh", "render_oasst", "render_chat"]

Context = Sequence[Mapping[str, str]]

_ROLES = ("system", "user", "assistant")


def _turns(context: Context) -> List[Dict[str, str]]:
    """Plain ``{"role", "content"}`` dicts, checked."""
    out: List[Dict[str, str]] = []
    for i, turn in enumerate(context):
        try:
            role, content = turn["role"], turn["content"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"context turn {i}: expected a mapping with 'role' and 'content' ({e!r})") from None
        if role not in _ROLES:
            raise ValueError(f"context turn {i}: unknown role {role!r}; expected one of {', '.join(_ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"context turn {i}: content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def render_hh(context: Context) -> str:
    """HH-RLHF transcript ending with the generation marker:
    ``"\\n\\nHuman: {u}\\n\\nAssistant: {a}...\\n\\nHuman: {u}\\n\\nAssistant:"``.

    HH has no system role: leading ``system`` turns are prepended as they are,
    before the first ``"\\n\\nHuman:"`` marker (the inverse of how
    :mod:`deft.data` reads text before the first marker); a system turn after a
    user/assistant turn is a ValueError. For an HH pair loaded by
    :func:`deft.data.load`, ``render_hh(context) + " " + response`` gives back
    the original transcript.
    """
    parts: List[str] = []
    started = False
    for i, turn in enumerate(_turns(context)):
        role, content = turn["role"], turn["content"]
        if role == "system":
            if started:
                raise ValueError(f"context turn {i}: HH transcripts have no system role; "
                                 "system turns are only supported before the first user/assistant turn")
            parts.append(content)
            continue
        started = True
        parts.append(f"\n\n{'Human' if role == 'user' else 'Assistant'}: {content}")
    parts.append("\n\nAssistant:")
    return "".join(parts)


_OASST_TAGS = {"system": "<|system|>", "user": "<|prompter|>", "assistant": "<|assistant|>"}


def render_oasst(context: Context, response: Optional[str] = None) -> str:
    """OpenAssistant / PRO format:
    ``"<|prompter|>{u}</s><|assistant|>{a}</s>...<|assistant|>"``, followed by
    ``"{response}</s>"`` when a response is given. System turns render as
    ``"<|system|>{s}</s>"``."""
    parts = [f"{_OASST_TAGS[t['role']]}{t['content']}</s>" for t in _turns(context)]
    parts.append("<|assistant|>")
    if response is not None:
        parts.append(f"{response}</s>")
    return "".join(parts)


def render_chat(context: Context, tokenizer: Any, response: Optional[str] = None) -> str:
    """Render with a Hugging Face tokenizer's chat template
    (``tokenizer.apply_chat_template(..., tokenize=False)``). Without a
    response the generation prompt is added; with one, the response is
    appended as the final assistant message."""
    messages = _turns(context)
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=response is None
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text
