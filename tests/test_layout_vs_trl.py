"""Prompts and responses laid out as the model's template and tokenizer do
(python/deft/render.py: PolicyLayout; python/deft/train.py: encode_examples;
python/deft/generation.py: lead_ids), checked against TRL's DPOTrainer
tokenisation of the same real PRO HH rows with three tokenizers: SmolLM2's
(ChatML chat template, no BOS), a BOS-adding variant of it without a chat
template (the Llama family's post-processor; plain layout), and that variant
with a template that writes the BOS itself (Llama 3 style)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from conftest import shared_file

pytest.importorskip("transformers")

CHATML_WITH_BOS = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _variant(root: Path, name: str, *, bos: bool, chat_template) -> Path:
    """SmolLM2's tokenizer with a BOS-adding post-processor (``<|endoftext|>``,
    id 0) and/or another chat template (None: none at all)."""
    src = shared_file("tokenizers/smollm2")
    folder = root / name
    folder.mkdir()
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    if bos:
        tj["post_processor"] = {"type": "TemplateProcessing",
                                "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                                "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                         {"Sequence": {"id": "B", "type_id": 1}}],
                                "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}
    (folder / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.pop("chat_template", None)
    if bos:
        cfg["bos_token"] = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    if chat_template == "same":
        (folder / "chat_template.jinja").write_text((src / "chat_template.jinja").read_text(encoding="utf-8"), encoding="utf-8")
    elif chat_template is not None:
        (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout_tokenizers")
    return {"chatml": _variant(root, "chatml", bos=False, chat_template="same"),
            "bos-plain": _variant(root, "bos-plain", bos=True, chat_template=None),
            "bos-chat": _variant(root, "bos-chat", bos=True, chat_template=CHATML_WITH_BOS)}


@pytest.fixture(scope="module")
def rows():
    """Real PRO HH rows (harmless base): context, best and worst response, short enough not to be truncated."""
    from deft.data import load

    lines = gzip.open(shared_file("data/pro-hh/test_harmless_base.jsonl.gz"), "rt", encoding="utf-8").read().splitlines()[:60]
    frame = load(lines_file(lines)).frame
    out = []
    for r in frame.iter_rows(named=True):
        if sum(len(t["content"]) for t in r["context"]) < 1200 and max(len(x) for x in r["responses"]) < 800:
            out.append({"context": [dict(t) for t in r["context"]], "best": r["responses"][0], "worst": r["responses"][-1]})
    assert len(out) >= 20
    return out[:20]


def lines_file(lines):
    import tempfile

    p = Path(tempfile.mkdtemp()) / "pro_rows.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_layouts_of_the_three_tokenizers(tokenizers):
    from transformers import AutoTokenizer

    from deft.render import policy_layout, resolve_template

    got = {}
    for name, folder in tokenizers.items():
        tok = AutoTokenizer.from_pretrained(str(folder))
        got[name] = policy_layout(resolve_template("auto", tok), tok)
    assert got["chatml"].template == "chat" and got["chatml"].lead_ids == () and got["chatml"].suffix == "<|im_end|>\n"
    assert not got["chatml"].append_eos
    assert got["bos-plain"].template == "plain" and got["bos-plain"].lead_ids == (0,) and got["bos-plain"].append_eos
    assert got["bos-chat"].template == "chat" and got["bos-chat"].lead_ids == (0,) and got["bos-chat"].suffix == "<|im_end|>\n"


def _deft_sequences(folder: Path, rows, template: str):
    """deft's (prompt, chosen, rejected) ids for ``rows``, as the trainer tokenises them."""
    from transformers import AutoTokenizer

    from deft.distribution import resolve_tokenizer
    from deft.render import policy_layout, render_prompt
    from deft.train import encode_examples

    tok = AutoTokenizer.from_pretrained(str(folder))
    lay = policy_layout(template, tok)
    native = resolve_tokenizer(str(folder)).native
    prompts = [render_prompt(r["context"], template, tok) for r in rows]
    exs = encode_examples([str(i) for i in range(len(rows))], prompts, [[r["best"], r["worst"]] for r in rows],
                          [[1.0, 0.0]] * len(rows), native, eos_token_id=int(tok.eos_token_id), response_prefix=lay.prefix,
                          max_length=4096, max_prompt_length=2048, lead_ids=lay.lead_ids, response_suffix=lay.suffix,
                          append_eos=lay.append_eos)
    return [(e.input_ids[0][:e.prompt_len].tolist(), e.input_ids[0][e.prompt_len:].tolist(), e.input_ids[1][e.prompt_len:].tolist())
            for e in exs], lay, native


def _trl_sequences(folder: Path, rows, conversational: bool, tmp_path: Path):
    """TRL's DPOTrainer tokenisation of the same rows (its train_dataset after preparation)."""
    pytest.importorskip("trl")
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    from deft.render import render_hh

    tok = AutoTokenizer.from_pretrained(str(folder))
    if conversational:
        data = [{"prompt": r["context"], "chosen": [{"role": "assistant", "content": r["best"]}],
                 "rejected": [{"role": "assistant", "content": r["worst"]}]} for r in rows]
    else:
        data = [{"prompt": render_hh(r["context"]), "chosen": " " + r["best"], "rejected": " " + r["worst"]} for r in rows]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096))
    model.save_pretrained(tmp_path / "tiny")  # TRL builds its reference model from the policy's path
    model = str(tmp_path / "tiny")
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], max_length=None, per_device_train_batch_size=1,
                     use_cpu=True, dataset_num_proc=None, precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok)
    return [(list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"])) for r in trainer.train_dataset]


@pytest.mark.parametrize("name,template,conversational", [("chatml", "chat", True), ("bos-plain", "plain", False),
                                                          ("bos-chat", "chat", True), ("chatml", "plain", False)])
def test_training_ids_equal_trl(tokenizers, rows, tmp_path, name, template, conversational):
    """Every prompt, chosen and rejected id sequence equals TRL's: the BOS a Llama-family tokenizer adds
    (plain), the template's own BOS and end of turn (chat: <|im_end|> and a newline, no extra EOS), EOS after a
    plain response; and a response's ids are those deft distribution counts (prefix + response) plus that end."""
    ours, lay, native = _deft_sequences(tokenizers[name], rows, template)
    theirs = _trl_sequences(tokenizers[name], rows, conversational, tmp_path)
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a[0] == b[0], (i, "prompt")
        assert a[1] == b[1], (i, "chosen")
        assert a[2] == b[2], (i, "rejected")
        counted = native.encode([lay.prefix + rows[i]["best"]], add_special_tokens=False)[0].tolist()
        assert a[1][:len(counted)] == counted and len(a[1]) - len(counted) in (1, 2)


def test_generation_prompts_start_like_training_prompts(tokenizers, rows, monkeypatch):
    """deft eval's prompts get the same leading BOS as the trainer's, also when left-truncated."""
    from transformers import AutoTokenizer

    import deft.generation as g
    from deft.render import prompt_lead_ids, render_prompt

    tok = AutoTokenizer.from_pretrained(str(tokenizers["bos-plain"]))
    seen = []

    def fake_batch(model, tokenizer, batch, **kw):
        seen.extend(batch)
        return [[tok.eos_token_id] for _ in batch]

    monkeypatch.setattr(g, "_generate_batch", fake_batch)
    monkeypatch.setattr(g, "_eos_ids", lambda model, tokenizer: [tok.eos_token_id])
    prompts = [render_prompt(r["context"], "plain", tok) for r in rows[:3]]
    g.generate(None, tok, prompts, max_new_tokens=2, max_prompt_length=16, lead_ids=prompt_lead_ids("plain", tok))
    assert len(seen) == 3 and all(x[0] == 0 and len(x) == 16 for x in seen)
    full = tok(prompts[0], add_special_tokens=False)["input_ids"]
    assert sorted(seen, key=len)[0][1:] == full[-15:] or any(x[1:] == full[-15:] for x in seen)
