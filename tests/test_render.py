"""deft.render's template rules, with hand-written expectations: the policy's
templates (auto resolution, the chat requirement, the response prefix, what
`deft train` recorded), a reward model's (auto resolution, the pair text)."""

from __future__ import annotations

import json

import pytest

from deft.render import (
    check_template,
    render_pair,
    render_prompt,
    resolve_model_template,
    resolve_rm_template,
    resolve_template,
    response_prefix,
    trained_template,
)

CTX = [{"role": "user", "content": "hi"}]


class Tok:
    """A stand-in tokenizer: a chat template (or none) and a vocabulary."""

    def __init__(self, chat=None, vocab=("a", "b")):
        self.chat_template = chat
        self._vocab = {t: i for i, t in enumerate(vocab)}

    def get_vocab(self):
        return dict(self._vocab)

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def test_policy_template_resolution():
    assert resolve_template("auto", Tok(chat="{{x}}")) == "chat"
    assert resolve_template("auto", Tok()) == "plain"
    assert resolve_template("auto", Tok(chat="")) == "plain"
    assert resolve_template("plain", Tok(chat="{{x}}")) == "plain"  # explicit wins
    assert resolve_template("chat", Tok()) == "chat"  # without require: counting needs no template text
    with pytest.raises(ValueError, match=r"template 'chat' but the tokenizer of my/tok has no chat template"):
        resolve_template("chat", Tok(), require="my/tok")
    assert resolve_template("chat", Tok(chat="{{x}}"), require="my/tok") == "chat"
    for bad in ("oasst", "Chat", ""):
        with pytest.raises(ValueError, match="template must be one of auto, plain, chat"):
            resolve_template(bad, Tok())
        with pytest.raises(ValueError, match="template must be one of auto, plain, chat"):
            check_template(bad)
    assert check_template("auto") == "auto"


def test_prompt_and_response_prefix():
    assert render_prompt(CTX, "plain") == "\n\nHuman: hi\n\nAssistant:"
    assert render_prompt(CTX, "chat", Tok(chat="x")) == "<user>hi<assistant>"
    assert response_prefix("plain") == " " and response_prefix("chat") == ""
    with pytest.raises(ValueError):
        response_prefix("auto")


def test_trained_template_and_model_resolution(tmp_path):
    run = tmp_path / "train"
    model = run / "model"
    model.mkdir(parents=True)
    tok = Tok(chat="x")
    assert trained_template(str(model)) is None  # no manifest
    assert resolve_model_template("auto", str(model), tok) == "chat"
    (run / "manifest.json").write_text(json.dumps({"stage": "train", "template": "plain", "outputs": {"model": str(model)}}))
    assert trained_template(str(model)) == "plain"
    assert resolve_model_template("auto", str(model), tok) == "plain"  # as it was trained
    assert resolve_model_template("chat", str(model), tok) == "chat"  # explicit wins
    (run / "manifest.json").write_text(json.dumps({"stage": "eval", "template": "plain"}))
    assert trained_template(str(model)) is None  # not a train manifest
    (run / "manifest.json").write_text(json.dumps({"stage": "train", "template": "plain", "outputs": {"model": str(run / "other")}}))
    assert trained_template(str(model)) is None  # the manifest is another folder's
    (run / "manifest.json").write_text("{not json")
    assert trained_template(str(model)) is None
    with pytest.raises(ValueError, match="has no chat template"):
        resolve_model_template("chat", str(model), Tok())
    with pytest.raises(ValueError, match="template must be one of"):
        resolve_model_template("oasst", str(model), tok)


def test_reward_model_templates():
    assert resolve_rm_template("auto", Tok(chat="x", vocab=("<|prompter|>", "a"))) == "oasst"  # before chat
    assert resolve_rm_template("auto", Tok(chat="x")) == "chat"
    assert resolve_rm_template("auto", Tok()) == "plain"
    assert resolve_rm_template("plain", Tok(vocab=("<|prompter|>",))) == "plain"
    assert render_pair(CTX, "ok", "oasst") == "<|prompter|>hi</s><|assistant|>ok</s>"
    assert render_pair(CTX, "ok", "plain") == "\n\nHuman: hi\n\nAssistant: ok"
    assert render_pair(CTX, "ok", "chat", Tok(chat="x")) == "<user>hi<assistant>ok"
