"""Render canonical contexts (see :mod:`deft.data`) as model prompts.

A context is a sequence of ``{"role", "content"}`` mappings with roles
``system``, ``user`` and ``assistant`` -- e.g. one value of a canonical
frame's ``context`` column (Polars gives a list of dicts).

* :func:`render_hh` -- Anthropic HH-RLHF transcript text.
* :func:`render_oasst` -- OpenAssistant / PRO tagged text.
* :func:`render_chat` -- a Hugging Face tokenizer's chat template.

Every prompt and response template deft uses is defined here:

* The policy's templates (:data:`POLICY_TEMPLATES`: ``plain`` = HH text with
  ``" "`` before the response, ``chat`` = the tokenizer's chat template with the
  generation prompt and nothing before the response, ``auto`` = ``chat`` when
  the tokenizer has a chat template): :func:`resolve_template`,
  :func:`render_prompt`, :func:`response_prefix`. ``deft train`` renders its
  prompts and responses with them, ``deft distribution`` counts responses after
  the same prefix and records the template in its metadata, ``deft train``
  records it in its manifest and ``deft eval`` reads it back there
  (:func:`trained_template`, :func:`resolve_model_template`).
* A reward model's pair templates (:data:`RM_TEMPLATES`: ``oasst``, ``chat``,
  ``plain``, ``auto``): :func:`resolve_rm_template`, :func:`render_pair`.
"""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["render_hh", "render_oasst", "render_chat", "POLICY_TEMPLATES", "RM_TEMPLATES", "check_template",
           "resolve_template", "render_prompt", "response_prefix", "PolicyLayout", "policy_layout", "chat_response_suffix",
           "special_lead_ids", "prompt_lead_ids", "trained_template", "resolve_model_template",
           "resolve_rm_template", "render_pair"]

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


# ---------------------------------------------------------------------------
# the policy's templates: training, Q_diff counting, evaluation, selection

POLICY_TEMPLATES = ("auto", "plain", "chat")


def _chat_template(tokenizer: Any) -> Any:
    """The chat template of a Hugging Face tokenizer or a
    :class:`deft.distribution.PolicyTokenizer` (both carry ``chat_template``;
    empty or None when there is none)."""
    return getattr(tokenizer, "chat_template", None)


def check_template(template: str) -> str:
    """``template`` when it is one of :data:`POLICY_TEMPLATES`, else a ValueError."""
    if template not in POLICY_TEMPLATES:
        raise ValueError(f"template must be one of {', '.join(POLICY_TEMPLATES)}, got {template!r}")
    return template


def resolve_template(template: str, tokenizer: Any, *, require: Optional[str] = None) -> str:
    """``plain`` or ``chat`` for ``template`` (one of :data:`POLICY_TEMPLATES`):
    ``auto`` is ``chat`` when ``tokenizer`` has a chat template, else ``plain``.
    With ``require`` (the tokenizer's name in the message), ``chat`` on a
    tokenizer without a chat template is a ValueError."""
    check_template(template)
    chat = _chat_template(tokenizer)
    if template == "auto":
        return "chat" if chat else "plain"
    if template == "chat" and require is not None and not chat:
        raise ValueError(f"template 'chat' but the tokenizer of {require} has no chat template")
    return template


def render_prompt(context: Context, template: str, tokenizer: Any = None) -> str:
    """The policy's prompt for ``context`` under a resolved template: the
    tokenizer's chat template with the generation prompt (``chat``), else HH
    text ending in ``"\n\nAssistant:"``."""
    if template == "chat":
        return render_chat(context, tokenizer)
    return render_hh(context)


def response_prefix(template: str) -> str:
    """Text the trainer puts between the rendered prompt and the response."""
    if template == "plain":
        return " "
    if template == "chat":
        return ""
    raise ValueError(f"template must be 'plain' or 'chat', got {template!r}")


_PROBE_CONTEXT = [{"role": "user", "content": "Hello."}]
_PROBE_RESPONSE = "deft-probe-response-7f3c"


def chat_response_suffix(tokenizer: Any) -> str:
    """What a tokenizer's chat template writes after an assistant message's
    content: its end of turn (``"<|im_end|>\n"`` for ChatML,
    ``"<|eot_id|>"`` for Llama 3). Found by rendering a probe conversation with
    and without the response (as TRL's DPOTrainer tokenises conversational data,
    prompt + response rendered together); a ValueError when the template does
    not render the response's content verbatim."""
    prompt = render_chat(_PROBE_CONTEXT, tokenizer)
    full = render_chat(_PROBE_CONTEXT, tokenizer, response=_PROBE_RESPONSE)
    at = full.rfind(_PROBE_RESPONSE)
    if at < 0:
        raise ValueError("the chat template does not render an assistant message's content verbatim; deft cannot tell "
                         "where a response ends (use template plain)")
    if not full[:at].startswith(prompt):
        raise ValueError("the chat template renders the prompt differently with and without the response (the "
                         "generation prompt is not a prefix of the conversation); use template plain")
    return full[at + len(_PROBE_RESPONSE):]


def special_lead_ids(tokenizer: Any) -> Tuple[int, ...]:
    """The ids a Hugging Face tokenizer's post-processor puts before a single
    sequence when it adds special tokens: ``(bos_token_id,)`` for the Llama
    family, ``()`` for GPT-2 and SmolLM2."""
    probe = "Hello world."
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i:i + len(plain)] == plain:
            return tuple(int(x) for x in with_special[:i])
    return ()


@dataclass(frozen=True)
class PolicyLayout:
    """How the policy's sequences are laid out under a resolved template, as
    the model's chat template and its tokenizer's post-processor lay them out
    (the tokenisation TRL's DPOTrainer gives):

    * ``plain``: ``lead_ids`` (the BOS the post-processor adds, if any) +
      HH prompt text; ``" "`` + response; then EOS.
    * ``chat``: the chat template's prompt with the generation prompt (its own
      BOS text, if the template writes one; ``lead_ids`` are then those
      leading ids, kept when a long prompt is left-truncated); the response;
      then the template's end of turn (``suffix``), and no extra EOS.

    The prompt, the response (``prefix`` + response) and the ``suffix`` are
    tokenised separately and concatenated, so a response's ids are the same
    here, in ``deft distribution``'s counts and wherever else it is tokenised."""

    template: str
    lead_ids: Tuple[int, ...]
    prefix: str
    suffix: str
    append_eos: bool


def policy_layout(template: str, tokenizer: Any) -> PolicyLayout:
    """:class:`PolicyLayout` for a resolved template (``plain``/``chat``) and
    the policy's Hugging Face tokenizer."""
    prefix, lead = response_prefix(template), prompt_lead_ids(template, tokenizer)
    if template == "chat":
        suffix = chat_response_suffix(tokenizer)
        return PolicyLayout("chat", lead, prefix, suffix, append_eos=suffix == "")
    return PolicyLayout("plain", lead, prefix, "", append_eos=True)


def prompt_lead_ids(template: str, tokenizer: Any) -> Tuple[int, ...]:
    """The ids every prompt starts with under a resolved template
    (:attr:`PolicyLayout.lead_ids`): for ``plain`` the BOS the tokenizer's
    post-processor adds (:func:`special_lead_ids`); for ``chat`` that BOS when
    the chat template writes it itself (Llama 3), else none."""
    lead = special_lead_ids(tokenizer)
    if template == "chat" and lead:
        ids = list(tokenizer(render_chat(_PROBE_CONTEXT, tokenizer), add_special_tokens=False)["input_ids"])
        if list(lead) != ids[:len(lead)]:
            return ()
    return lead


def trained_template(model: str) -> Optional[str]:
    """The template ``deft train`` recorded in its manifest for a model folder
    it saved (``OUTPUT_DIR/model`` beside ``OUTPUT_DIR/manifest.json``), else None."""
    p = Path(model).expanduser()
    if not p.is_dir():
        return None
    man = p.parent / "manifest.json"
    if not man.is_file():
        return None
    try:
        doc = json.loads(man.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("stage") != "train":
        return None
    out = doc.get("outputs") or {}
    if isinstance(out, dict) and out.get("model") and Path(out["model"]).name != p.name:
        return None
    t = doc.get("template")
    return t if t in ("plain", "chat") else None


def resolve_model_template(template: str, model: str, tokenizer: Any) -> str:
    """The template to prompt ``model`` with: ``auto`` is what ``deft train``
    recorded for it (:func:`trained_template`), else as :func:`resolve_template`;
    ``chat`` on a tokenizer without a chat template is a ValueError."""
    if template == "auto":
        template = trained_template(model) or template
    return resolve_template(template, tokenizer, require=str(model))


# ---------------------------------------------------------------------------
# a reward model's templates

RM_TEMPLATES = ("auto", "oasst", "chat", "plain")


def resolve_rm_template(template: str, tokenizer: Any) -> str:
    """``auto``: ``oasst`` when the tokenizer knows ``<|prompter|>`` (the
    OpenAssistant reward models), ``chat`` when it has a chat template, else
    ``plain``; any other value as it is."""
    if template != "auto":
        return template
    if "<|prompter|>" in tokenizer.get_vocab():
        return "oasst"
    if _chat_template(tokenizer):
        return "chat"
    return "plain"


def render_pair(context: Context, response: str, template: str, tokenizer: Any = None) -> str:
    """The text a reward model scores for one (context, response) under a
    resolved :data:`RM_TEMPLATES` value: OpenAssistant tags, the chat template
    with the response as the last assistant turn, or HH text + ``" "`` + response."""
    if template == "oasst":
        return render_oasst(context, response)
    if template == "chat":
        return render_chat(context, tokenizer, response)
    return render_hh(context) + " " + response
