"""Tests of `deft eval` (python/deft/evaluate.py): a tiny random Llama with the
real SmolLM2 tokenizer, the builtin reward model, real PRO-HH test rows and
real MT-Bench questions; the PRO-compatible BLEU against hand-computed values
and against NLTK itself."""

from __future__ import annotations

import gzip
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import save_tiny_llama, shared_file

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sacrebleu")

from deft import evaluate as ev  # noqa: E402
from deft.data import DataError  # noqa: E402
from deft.evaluate import (  # noqa: E402
    cut_generation,
    default_model_name,
    evaluate,
    generate,
    pro_bleu,
    reference_response,
    sacre_bleu,
    win_tie_lose,
)

N_HARMLESS, N_HELPFUL = 5, 3  # unequal, so sample weighting differs from a plain mean of subsets
GEN = dict(max_new_tokens=8, max_prompt_length=64, batch_size=4, progress=False)


# --------------------------------------------------------------------------- fixtures


def _head_lines(src: Path, n: int):
    with gzip.open(src, "rt", encoding="utf-8") as f:
        return [next(f) for _ in range(n)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random Llama with the SmolLM2 tokenizer, 5 + 3 real PRO-HH test rows, 2 MT-Bench questions."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("eval_assets")
    tok = AutoTokenizer.from_pretrained(str(shared_file("tokenizers/smollm2")))
    model_dir = save_tiny_llama(root / "tiny-llama", tok)
    harmless = root / "test_harmless_base.jsonl"
    harmless.write_text("".join(_head_lines(shared_file("data/pro-hh/test_harmless_base.jsonl.gz"), N_HARMLESS)), encoding="utf-8")
    helpful = root / "test_helpful_base.jsonl"
    helpful.write_text("".join(_head_lines(shared_file("data/pro-hh/test_helpful_base.jsonl.gz"), N_HELPFUL)), encoding="utf-8")
    mt = root / "question.jsonl"
    mt.write_text("".join(shared_file("data/mt-bench/question.jsonl").read_text(encoding="utf-8").splitlines(True)[:2]), encoding="utf-8")
    return {"root": root, "model": model_dir, "tok": tok, "harmless": harmless, "helpful": helpful, "mt": mt}


@pytest.fixture(scope="module")
def rm():
    from deft.score import load_reward_model

    return load_reward_model("builtin", device="cpu")


@pytest.fixture(scope="module")
def first(assets, rm, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_first")
    rep = evaluate([str(assets["model"])], [assets["harmless"], assets["helpful"]], out, reward_model=rm, **GEN)
    return rep


def _jsonl(path: Path):
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def _seed_run(src_run: Path, dst_run: Path, lines=None):
    """Copy a run's generations (optionally only some lines) into another output folder."""
    dst_run.mkdir(parents=True, exist_ok=True)
    recs = _jsonl(src_run / "generations.jsonl")
    if lines is not None:
        recs = [recs[i] for i in lines]
    (dst_run / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return recs


# --------------------------------------------------------------------------- PRO-compatible BLEU


def test_pro_bleu_hand_computed():
    tiny = sys.float_info.min
    # identical: every p_n = 1, BP = exp(1 - 4/4) = 1
    assert pro_bleu("abcd", "abcd") == 1.0
    # hypothesis one character short: p_n = 4/4, 3/3, 2/2, 1/1; BP = exp(1 - 5/4)
    assert pro_bleu("abcde", "abcd") == pytest.approx(math.exp(1 - 5 / 4), rel=1e-15)
    # longer hypothesis: p = 4/5, 3/4, 2/3, 1/2 and BP = 1 -> (0.8*0.75*(2/3)*0.5)^(1/4) = 0.2^(1/4)
    assert pro_bleu("abcd", "abcdx") == pytest.approx(0.2 ** 0.25, rel=1e-14)
    # characters, not words: "ab ab" vs "ab ba" has unigrams a,b,' ',a,b -> 5/5; bigrams "ab","b ","  b"... :
    # hyp bigrams ab, b_, _b, ba vs ref ab, b_, _a, ab -> ab 1, b_ 1 -> 2/4; trigrams ab_, b_b, _ba vs ab_, b_a, _ab -> 1/3;
    # 4-grams ab_b, b_ba vs ab_a, b_ab -> 0/2 -> sys.float_info.min; BP = 1 (equal lengths)
    want = math.exp(0.25 * (math.log(1.0) + math.log(2 / 4) + math.log(1 / 3) + math.log(tiny)))
    assert pro_bleu("ab ab", "ab ba") == pytest.approx(want, rel=1e-12, abs=0)
    assert 0 < pro_bleu("ab ab", "ab ba") < 1e-70  # method0 quirk: tiny, not 0
    # clipping: hyp "aaab" vs ref "abab": unigrams a 3->2, b 1 -> 3/4; bigrams aa,aa,ab -> ab 1 -> 1/3; no 3-/4-gram match
    want = math.exp(0.25 * (math.log(3 / 4) + math.log(1 / 3) + 2 * math.log(tiny)))
    assert pro_bleu("abab", "aaab") == pytest.approx(want, rel=1e-12, abs=0)
    # shorter than 4 characters: p3 = p4 = 0/1 -> min; p1 = p2 = 1 -> exp(0.5 * log(min)) = sqrt(min)
    assert pro_bleu("ab", "ab") == pytest.approx(math.sqrt(tiny), rel=1e-12, abs=0)
    # no unigram match -> exactly 0; empty hypothesis -> 0
    assert pro_bleu("abc", "xyz") == 0.0
    assert pro_bleu("abc", "") == 0.0
    # several references: closest length 6 or 2 to a hypothesis of 4 is a tie -> the shorter (2) -> BP = 1
    assert pro_bleu(["abcdef", "ab"], "abcd") == 1.0
    # with only the long reference BP = exp(1 - 6/4)
    assert pro_bleu(["abcdef"], "abcd") == pytest.approx(math.exp(1 - 6 / 4), rel=1e-15)


def test_pro_bleu_matches_nltk_on_real_hh():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    import warnings

    from deft.data import load

    frame = load(shared_file("data/pro-hh/test_helpful_base.jsonl.gz")).frame.head(60)
    pairs = []
    for r in frame.iter_rows(named=True):
        a, b = r["responses"][0], r["responses"][1]
        pairs += [(a, b), (b, a), (a, a[: len(a) // 2]), (a, a[:3]), (a, "  " + b.upper())]
    assert len(pairs) == 300
    nonzero = tiny = 0
    for ref, hyp in pairs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = nltk_bleu.sentence_bleu([ref], hyp)
        got = pro_bleu(ref, hyp)
        assert got == want, (ref, hyp)  # bit-identical, not merely close
        nonzero += want > 1e-3
        tiny += 0 < want < 1e-60
    assert nonzero > 50 and tiny > 10  # both regimes exercised


def test_sacre_bleu():
    import sacrebleu

    hyps, refs = ["the cat sat on the mat", "a dog"], ["the cat sat on the mat", "the dog barked"]
    assert sacre_bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert sacre_bleu(hyps[:1], refs[:1]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        sacre_bleu(hyps, refs[:1])


# --------------------------------------------------------------------------- small pieces


def _pro_cut(text: str) -> str:
    """PRO's eval_hh/infer_func_now.py post-processing (after removing the prompt)."""
    text = text.strip()
    for stop in ["Human:", "human:", "Assistant:", "assistant:"]:
        i = text.find(stop)
        if i >= 0:
            text = text[:i].rstrip()
    return text


@pytest.mark.parametrize("text,want", [
    ("  Hello there.\n\nHuman: and then?", "Hello there."),
    ("Sure!\n\nassistant: again\n\nHuman: x", "Sure!"),
    ("I think so. Assistant: no human: yes", "I think so."),
    ("no marker at all  \n", "no marker at all"),
    ("Human: straight away", ""),
    ("a superhuman: feat", "a super"),  # PRO matches inside words too
    ("Human being, not a marker", "Human being, not a marker"),
])
def test_cut_matches_pro(text, want):
    assert cut_generation(text) == want == _pro_cut(text)


def test_cut_any_case():
    assert cut_generation("Fine.\n\nHUMAN: more") == "Fine."
    assert cut_generation("Ok\nASSISTANT: more") == "Ok"


def test_win_tie_lose_rules():
    run = {"a": 50.0, "b": 60.0, "c": 40.5, "d": 41.0, "f": 70.0}
    base = {"a": 50.5, "b": 50.0, "c": 42.0, "d": 40.0, "e": 10.0}
    w = win_tie_lose(run, base, tie_margin=1.0)
    # a: -0.5 tie; b: +10 win; c: -1.5 lose; d: +1.0 = margin -> tie
    assert (w.win, w.tie, w.lose, w.n) == (1, 2, 1, 4)
    assert (w.only_in_run, w.only_in_baseline) == (1, 1)
    assert w.win_rate == 0.25 and w.tie_rate == 0.5 and w.lose_rate == 0.25
    w0 = win_tie_lose(run, base, tie_margin=0.0, identical=["c"])
    assert (w0.win, w0.tie, w0.lose) == (2, 1, 1)  # c ties because the texts are identical
    with pytest.raises(ValueError, match="no prompt in common"):
        win_tie_lose({"x": 1.0}, {"y": 1.0})
    with pytest.raises(ValueError, match="tie_margin"):
        win_tie_lose(run, base, tie_margin=-1)


def test_reference_and_names():
    assert reference_response(["a", "b"], [0.0, 5.0], True) == "a"
    assert reference_response(["a", "b", "c"], [1.0, 5.0, 5.0], False) == "b"
    assert reference_response(["a", "b"], None, False) == "a"
    assert default_model_name("runs/x/train/model") == "x"
    assert default_model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == "SmolLM2-135M-Instruct"
    assert default_model_name("/m/some dir/") == "some-dir"


def test_template_from_train_manifest(assets, tmp_path):
    from deft.render import resolve_model_template as _resolve_prompt_template

    model = tmp_path / "runs" / "x" / "train" / "model"
    model.mkdir(parents=True)
    assert _resolve_prompt_template("auto", str(model), assets["tok"]) == "chat"  # the tokenizer has a chat template
    (model.parent / "manifest.json").write_text(json.dumps({"stage": "train", "template": "plain",
                                                            "outputs": {"model": str(model)}}))
    assert _resolve_prompt_template("auto", str(model), assets["tok"]) == "plain"  # as it was trained
    assert _resolve_prompt_template("chat", str(model), assets["tok"]) == "chat"  # explicit wins
    with pytest.raises(ValueError, match="template must be one of"):
        _resolve_prompt_template("oasst", str(model), assets["tok"])


# --------------------------------------------------------------------------- generation


def test_left_padding_equals_unbatched_and_manual_greedy(assets):
    from deft.evaluate import load_policy
    from deft.render import render_hh

    lm, tok = load_policy(str(assets["model"]), device="cpu")
    prompts = [render_hh([{"role": "user", "content": q}]) for q in
               ("Hi", "How do I bake bread at home without yeast, step by step?", "Why is the sky blue?",
                "Tell me a long story about a dragon, a knight and a very old castle on a hill.", "ok")]
    lens = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert len(set(lens)) > 2  # batches really are padded
    raw_b, raw_1 = {}, {}
    generate(lm, tok, prompts, max_new_tokens=10, batch_size=5, stop_at_markers=False,
             on_batch=lambda idx, g, r: raw_b.update(zip(idx, r)))
    generate(lm, tok, prompts, max_new_tokens=10, batch_size=1, stop_at_markers=False,
             on_batch=lambda idx, g, r: raw_1.update(zip(idx, r)))
    assert raw_b == raw_1 and len(raw_b) == 5
    assert any(v.strip() for v in raw_b.values())
    # greedy: the first two prompts against an explicit argmax loop without generate()
    for i in (0, 1):
        ids = tok(prompts[i], add_special_tokens=False, return_tensors="pt")["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(10):
                nxt = int(lm(ids).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert raw_1[i] == tok.decode(new, skip_special_tokens=True)


def _greedy_reference(lm, ids, max_new, eos, stop_re):
    """Plain greedy without a cache or a batch: the whole sequence through the
    model at every step; stops after EOS (not kept) or once the last 16 new
    tokens' text holds ``stop_re``."""
    ids, new = list(ids), []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(lm(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt in eos:
                break
            new.append(nxt)
            ids.append(nxt)
            if stop_re is not None and stop_re.search(lm.deft_tok.decode(new[-16:], skip_special_tokens=True)):
                break
    return new


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_default_generation_equals_uncached_greedy_reference(assets, monkeypatch, cache):
    """generate() (the default static cache, and the dynamic one) against a
    per-prompt greedy loop with no KV cache, on real rendered prompts of unequal
    lengths in padded, length-sorted batches, with lead ids and marker stopping
    (the marker made one the tiny model really writes, so a row stops early)."""
    import re

    import deft.generation as g
    from deft.evaluate import load_policy
    from deft.render import render_prompt

    lm, tok = load_policy(str(assets["model"]), device="cpu")
    lm.deft_tok = tok
    samples, _ = ev._load_samples([assets["helpful"], assets["harmless"]], None)
    prompts = [render_prompt(s.context, "plain") for s in samples[:5]]  # HH text: no BOS of its own
    lead = [tok.bos_token_id]
    eos = set(g._eos_ids(lm, tok))
    enc = [lead + tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert len({len(x) for x in enc}) > 2 and all(x[1:2] != lead for x in enc)  # padded batches; the lead is added
    max_new = 12
    free = [_greedy_reference(lm, x, max_new, eos, None) for x in enc]
    # a "marker": a piece of text the model writes a few tokens into one of its answers
    k = max(range(len(free)), key=lambda i: len(free[i]))
    piece = next(p for p in (tok.decode([t], skip_special_tokens=True).strip() for t in free[k][3:]) if p)
    monkeypatch.setattr(g, "_MARKER_RE", re.compile(re.escape(piece)))
    monkeypatch.setattr(g, "_MARKER_END", piece[-1])
    monkeypatch.setattr(g, "_COLON_IDS", type(g._COLON_IDS)())
    want = [_greedy_reference(lm, x, max_new, eos, g._MARKER_RE) for x in enc]
    assert any(len(w) < len(f) for w, f in zip(want, free))  # the marker stopped a row early
    got_ids, raw = [], {}
    inner = g._generate_batch
    monkeypatch.setattr(g, "_generate_batch", lambda *a, **kw: got_ids.extend(inner(*a, **kw)) or got_ids[-len(a[2]):])
    g.generate(lm, tok, prompts, max_new_tokens=max_new, batch_size=3, lead_ids=lead, cache=cache,
               on_batch=lambda idx, gens, r: raw.update(zip(idx, r)))
    order = sorted(range(len(prompts)), key=lambda i: -len(enc[i]))
    pad = tok.pad_token_id
    for j, i in enumerate(order):  # ids after a marker stop are padding
        ids = got_ids[j]
        assert ids[:len(want[i])] == want[i] and all(t == pad for t in ids[len(want[i]):]), i
        assert raw[i] == tok.decode(want[i], skip_special_tokens=True)


def test_marker_stopping_criterion(assets):
    from deft.generation import _marker_stop

    tok = assets["tok"]
    prompt = tok("\n\nHuman: hi\n\nAssistant:", add_special_tokens=False)["input_ids"]  # markers in the prompt do not count
    a = tok(" Hello!\n\nHuman: and you?", add_special_tokens=False)["input_ids"]
    b = tok(" Hello! I am a human being, not a marker.", add_special_tokens=False)["input_ids"]
    width = max(len(a), len(b))
    rows = [prompt + x + [tok.pad_token_id] * (width - len(x)) for x in (a, b)]
    crit = _marker_stop(tok, len(prompt))
    assert crit(torch.tensor(rows), None).tolist() == [True, False]
    filler = tok(" word" * 30, add_special_tokens=False)["input_ids"]
    assert len(filler) > 16  # the marker is now outside the decoded window: the row stays stopped
    assert crit(torch.tensor([r + filler for r in rows]), None).tolist() == [True, False]


def test_prompt_left_truncation(assets):
    from deft.generation import _encoder

    tok = assets["tok"]
    text = "\n\nHuman: " + "word " * 200 + "\n\nAssistant:"
    full = tok(text, add_special_tokens=False)["input_ids"]
    enc = _encoder(tok)([text], 16)[0]
    assert enc == full[-16:]  # the end ("Assistant:") survives


# --------------------------------------------------------------------------- end to end


def test_outputs_and_table_layout(first, assets):
    out = first.output_dir
    run = out / "tiny-llama"
    for f in ("eval.json", "eval.md", "manifest.json", "metrics.jsonl"):
        assert (out / f).is_file(), f
    for f in ("generations.jsonl", "plan.json", "samples.parquet", "samples.jsonl"):
        assert (run / f).is_file(), f
    assert first.eval_json == out / "eval.json" and first.eval_md == out / "eval.md"
    md = (out / "eval.md").read_text()
    assert md == first.to_markdown()
    lines = md.splitlines()
    header = "| Model | harmless_base BLEU | harmless_base Reward | helpful_base BLEU | helpful_base Reward | Total BLEU | Total Reward |"
    i = lines.index(header)
    assert lines[i + 1] == "|:---|---:|---:|---:|---:|---:|---:|"
    r = first.runs[0]
    cells = [c.strip() for c in lines[i + 2].strip("|").split("|")]
    assert cells == ["tiny-llama", f"{r.subsets['harmless_base'].bleu:.2f}", f"{r.subsets['harmless_base'].reward:.2f}",
                     f"{r.subsets['helpful_base'].bleu:.2f}", f"{r.subsets['helpful_base'].reward:.2f}",
                     f"{r.total.bleu:.2f}", f"{r.total.reward:.2f}"]
    assert not lines[i + 3].startswith("| tiny")  # one row per run
    doc = json.loads((out / "eval.json").read_text())
    assert doc["format"] == "deft-eval-v1" and doc["subsets"] == ["harmless_base", "helpful_base"]
    assert doc["runs"][0]["total"]["samples"] == N_HARMLESS + N_HELPFUL
    assert doc["reward_model"]["name"].startswith("builtin")
    man = json.loads((out / "manifest.json").read_text())
    assert man["stage"] == "eval" and len(man["inputs"]) == 2 and man["inputs"][0]["sha256"]
    events = {e["event"] for e in _jsonl(out / "metrics.jsonl")}
    assert {"generate", "score", "result"} <= events


def test_generations_prompts_and_cut(first, assets):
    from deft.data import load_many
    from deft.render import render_prompt

    gens = _jsonl(first.output_dir / "tiny-llama" / "generations.jsonl")
    frame = load_many([assets["harmless"], assets["helpful"]]).frame
    assert sorted(g["id"] for g in gens) == sorted(frame["id"].to_list())
    ctx = {r["id"]: r["context"] for r in frame.iter_rows(named=True)}
    assert first.runs[0].template == "chat"  # the SmolLM2 tokenizer has a chat template
    for g in gens:
        assert g["prompt"] == render_prompt(ctx[g["id"]], "chat", assets["tok"])
        assert g["prompt"].endswith("<|im_start|>assistant\n")
        assert g["generation"] == cut_generation(g["raw_generation"])
        assert g["context"] == ctx[g["id"]]


def test_rewards_bleu_and_weighting(first, assets, rm):
    import polars as pl

    from deft.data import load_many

    df = pl.read_parquet(first.output_dir / "tiny-llama" / "samples.parquet")
    assert df.columns[:9] == ["id", "subset", "context", "prompt", "generation", "reference", "score", "reward", "bleu"]
    assert df.height == N_HARMLESS + N_HELPFUL
    frame = load_many([assets["harmless"], assets["helpful"]]).frame
    best = {r["id"]: r["responses"][0] for r in frame.iter_rows(named=True)}  # ranked PRO rows: responses[0]
    ctx = {r["id"]: r["context"] for r in frame.iter_rows(named=True)}
    for r in df.iter_rows(named=True):
        assert r["reference"] == best[r["id"]]
        assert r["reward"] == pytest.approx(100.0 / (1.0 + math.exp(-r["score"])), rel=1e-12)
        assert r["bleu"] == pytest.approx(100.0 * pro_bleu(r["reference"].strip(), r["generation"].strip()), rel=1e-12, abs=0)
    again = rm.score([ctx[i] for i in df["id"]], df["generation"].to_list())
    np.testing.assert_allclose(again, df["score"].to_numpy(), rtol=1e-4, atol=1e-4)
    run = first.runs[0]
    for sub, n in (("harmless_base", N_HARMLESS), ("helpful_base", N_HELPFUL)):
        part = df.filter(pl.col("subset") == sub)
        assert run.subsets[sub].samples == part.height == n
        assert run.subsets[sub].reward == pytest.approx(part["reward"].mean(), rel=1e-12)
        assert run.subsets[sub].bleu == pytest.approx(part["bleu"].mean(), rel=1e-12)
        assert run.subsets[sub].sacrebleu == pytest.approx(sacre_bleu(part["generation"].to_list(), part["reference"].to_list()))
    h, g = run.subsets["harmless_base"], run.subsets["helpful_base"]
    # Total = mean over samples = subsets weighted by their sizes (5 and 3), as PRO's score script
    assert run.total.reward == pytest.approx(df["reward"].mean(), rel=1e-12)
    assert run.total.reward == pytest.approx((N_HARMLESS * h.reward + N_HELPFUL * g.reward) / (N_HARMLESS + N_HELPFUL), rel=1e-12)
    assert run.total.bleu == pytest.approx((N_HARMLESS * h.bleu + N_HELPFUL * g.bleu) / (N_HARMLESS + N_HELPFUL), rel=1e-12)
    assert run.total.sacrebleu == pytest.approx(sacre_bleu(df["generation"].to_list(), df["reference"].to_list()))


def test_resume_after_partial_generations(first, assets, rm, tmp_path, monkeypatch):
    src = first.output_dir / "tiny-llama"
    dst = tmp_path / "tiny-llama"
    full = _jsonl(src / "generations.jsonl")
    kept = _seed_run(src, dst, lines=[0, 1, 2])
    kept[0]["generation"] = "RESUMED MARKER"  # proves line 0 is reused, not regenerated
    torn = json.dumps(full[3])[:40]  # a kill in the middle of writing line 4
    (dst / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + torn, encoding="utf-8")
    rep = evaluate([str(assets["model"])], [assets["harmless"], assets["helpful"]], tmp_path, reward_model=rm, **GEN)
    assert (rep.runs[0].reused, rep.runs[0].generated) == (3, N_HARMLESS + N_HELPFUL - 3)
    got = _jsonl(dst / "generations.jsonl")  # every line parses: the torn one is gone
    ids = [g["id"] for g in got]
    assert len(ids) == len(set(ids)) == N_HARMLESS + N_HELPFUL  # no duplicate, none lost
    by_id = {g["id"]: g for g in got}
    assert by_id[full[0]["id"]]["generation"] == "RESUMED MARKER"
    for rec in full[1:]:
        assert by_id[rec["id"]]["generation"] == rec["generation"]  # greedy: the same text as the uninterrupted run

    # everything done: the policy is not loaded again
    def boom(*a, **k):
        raise AssertionError("the model was loaded although every generation exists")

    monkeypatch.setattr(ev, "load_policy", boom)
    rep2 = evaluate([str(assets["model"])], [assets["harmless"], assets["helpful"]], tmp_path, reward_model=rm, **GEN)
    assert rep2.runs[0].generated == 0 and rep2.runs[0].reused == N_HARMLESS + N_HELPFUL
    # other settings: refused, naming what changed
    with pytest.raises(ValueError, match="max_new_tokens: 8 -> 9"):
        evaluate([str(assets["model"])], [assets["harmless"]], tmp_path, reward_model=rm, **{**GEN, "max_new_tokens": 9})


def test_baseline_self_is_all_ties(first, assets, rm, tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "load_policy", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no generation expected")))
    _seed_run(first.output_dir / "tiny-llama", tmp_path / "tiny-llama")
    rep = evaluate([str(assets["model"])], [assets["harmless"], assets["helpful"]], tmp_path, reward_model=rm,
                   baseline=first.output_dir, **GEN)
    w = rep.runs[0].win_tie_lose
    assert (w.n, w.win, w.tie, w.lose) == (N_HARMLESS + N_HELPFUL, 0, N_HARMLESS + N_HELPFUL, 0)
    assert w.tie_rate == 1.0 and w.tie_margin == ev.DEFAULT_TIE_MARGIN
    md = rep.to_markdown()
    assert "| Model | Baseline | n | Win | Tie | Lose | Win % | Tie % | Lose % |" in md
    import polars as pl

    df = pl.read_parquet(tmp_path / "tiny-llama" / "samples.parquet")
    assert set(df["outcome"]) == {"tie"}


def test_baseline_in_run_and_intersection(first, assets, rm, tmp_path, monkeypatch):
    import polars as pl

    monkeypatch.setattr(ev, "load_policy", lambda *a, **k: (_ for _ in ()).throw(AssertionError("no generation expected")))
    src = first.output_dir / "tiny-llama"
    for name in ("a", "b"):
        _seed_run(src, tmp_path / "ab" / name)
    model = str(assets["model"])
    rep = evaluate([model, model], [assets["harmless"], assets["helpful"]], tmp_path / "ab", model_names=["a", "b"],
                   reward_model=rm, baseline="a", **GEN)
    assert rep.runs[0].win_tie_lose is None
    assert rep.runs[1].win_tie_lose.tie == N_HARMLESS + N_HELPFUL
    header, rows = rep.table()
    assert [r[0] for r in rows] == ["a", "b"]  # one row per evaluated model

    # a baseline file with 5 of the 8 prompts, two of them with a strong answer
    recs = _jsonl(src / "generations.jsonl")[:5]
    sub = {r["id"]: r["subset"] for r in recs}
    good = "I'm sorry, but I can't help with that. Is there something else I can help you with?"
    recs[0]["generation"] = recs[1]["generation"] = good
    bfile = tmp_path / "baseline.jsonl"
    bfile.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    _seed_run(src, tmp_path / "c" / "tiny-llama")
    rep = evaluate([model], [assets["harmless"], assets["helpful"]], tmp_path / "c", reward_model=rm, baseline=bfile, **GEN)
    w = rep.runs[0].win_tie_lose
    assert w.n == 5 and (w.only_in_run, w.only_in_baseline) == (3, 0)
    assert w.tie >= 3  # three identical generations
    assert any("compared on the 5 prompts both have" in n for n in rep.notes)
    df = pl.read_parquet(tmp_path / "c" / "tiny-llama" / "samples.parquet")
    assert df.filter(pl.col("outcome").is_null()).height == 3
    # the outcome of each prompt follows the rewards and the margin
    for r in df.filter(pl.col("outcome").is_not_null()).iter_rows(named=True):
        d = r["reward"] - r["baseline_reward"]
        want = "tie" if abs(d) <= w.tie_margin or r["id"] not in (recs[0]["id"], recs[1]["id"]) else ("win" if d > 0 else "lose")
        assert r["outcome"] == want, (r["id"], sub[r["id"]], d)

    # same id, other conversation: the baseline was made on other data
    recs[2]["context"] = [{"role": "user", "content": "something else entirely"}]
    bfile.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    with pytest.raises(ValueError, match="different conversation"):
        evaluate([model], [assets["harmless"], assets["helpful"]], tmp_path / "c", reward_model=rm, baseline=bfile, **GEN)
    with pytest.raises(FileNotFoundError, match="not a model name of this evaluation"):
        evaluate([model], [assets["harmless"]], tmp_path / "c", reward_model=rm, baseline=tmp_path / "nope", **GEN)


def test_mt_bench_answers(assets, tmp_path, monkeypatch):
    from deft.render import render_prompt

    seen = []
    real = ev.generate

    def spy(model, tokenizer, prompts, **kw):
        out = real(model, tokenizer, prompts, **kw)
        seen.append((list(prompts), out))
        return out

    monkeypatch.setattr(ev, "generate", spy)
    # MT-Bench only: no reward model is needed (a bogus one is never loaded)
    rep = evaluate([str(assets["model"])], [assets["mt"]], tmp_path, reward_model="no/such-reward-model", batch_size=2,
                   mt_bench_max_new_tokens=8, progress=False)
    path = tmp_path / "mt_bench" / "model_answer" / "tiny-llama.jsonl"
    assert rep.runs[0].mt_bench_path == path and rep.subsets == [] and rep.runs[0].total is None
    answers = _jsonl(path)
    qs = _jsonl(assets["mt"])
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in qs] == [81, 82]
    for a, q in zip(answers, qs):
        assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert a["model_id"] == "tiny-llama" and isinstance(a["tstamp"], float) and isinstance(a["answer_id"], str)
        assert len(a["choices"]) == 1 and a["choices"][0]["index"] == 0
        assert len(a["choices"][0]["turns"]) == len(q["turns"]) == 2
    assert len(seen) == 2  # one call per turn for the batch of 2 questions
    (p1, g1), (p2, g2) = seen
    assert [a["choices"][0]["turns"][0] for a in answers] == g1
    for q, a1, prompt in zip(qs, g1, p2):  # turn 2 sees this model's turn-1 answer
        ctx = [{"role": "user", "content": q["turns"][0]}, {"role": "assistant", "content": a1},
               {"role": "user", "content": q["turns"][1]}]
        assert prompt == render_prompt(ctx, "chat", assets["tok"])
    assert "MT-Bench answers" in (tmp_path / "eval.md").read_text()
    # rerun: nothing regenerated
    seen.clear()
    evaluate([str(assets["model"])], [assets["mt"]], tmp_path, batch_size=2, mt_bench_max_new_tokens=8, progress=False)
    assert seen == [] and _jsonl(path) == answers


# --------------------------------------------------------------------------- errors


def test_errors(assets, tmp_path):
    model = str(assets["model"])
    with pytest.raises(FileNotFoundError) as e:
        evaluate([model], [tmp_path / "missing.jsonl"], tmp_path / "o")
    assert e.value.filename == str(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no model given"):
        evaluate([], [assets["harmless"]], tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        evaluate([str(tmp_path / "no" / "model")], [assets["harmless"]], tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        evaluate([str(tmp_path / "empty")], [assets["harmless"]], tmp_path / "o")
    with pytest.raises(ValueError, match="several models would be named tiny-llama"):
        evaluate([model, model], [assets["harmless"]], tmp_path / "o")
    bad = tmp_path / "question.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "category": "x", "turns": ["hi"]}) + "\n"
                   + json.dumps({"question_id": 2, "category": "x", "turns": []}) + "\n")
    with pytest.raises(DataError, match=r"question\.jsonl:2: field 'turns': expected a non-empty array"):
        evaluate([model], [bad], tmp_path / "o")
    # a broken line inside a generations file (not a torn last line) is an error naming file and line
    run = tmp_path / "g" / "tiny-llama"
    run.mkdir(parents=True)
    (run / "generations.jsonl").write_text('{"id": "x", "prompt": "p", "generation": "g"}\n{not json\n{"id": "y"}\n')
    with pytest.raises(DataError, match=r"generations\.jsonl:2: not a JSON line"):
        evaluate([model], [assets["harmless"]], tmp_path / "g", progress=False)


def test_baseline_from_a_deft_run_folder(tmp_path):
    """`--baseline runs/hh-dpo` (a `deft run` folder): its eval stage holds the
    trained model and "base"; the trained model is the baseline."""
    from deft.evaluate import _resolve_baseline

    ev_dir = tmp_path / "hh-dpo" / "eval"
    for name, text in (("dpo", "trained answer"), ("base", "base answer")):
        (ev_dir / name).mkdir(parents=True)
        (ev_dir / name / "generations.jsonl").write_text(json.dumps({"id": "a", "generation": text}) + "\n")
    (ev_dir / "eval.json").write_text(json.dumps({"runs": [{"name": "dpo"}, {"name": "base"}]}))
    b = _resolve_baseline(tmp_path / "hh-dpo", ["deft-dpo"])
    assert b.generations == {"a": "trained answer"}
    with pytest.raises(ValueError, match="holds 2 runs"):  # a plain eval folder with two runs stays ambiguous
        _resolve_baseline(ev_dir, ["deft-dpo"])


def test_greedy_ignores_the_models_generation_config(assets, tmp_path):
    """A model's generation_config.json (repetition_penalty, sampling flags) must
    not leak into the greedy decoding."""
    import shutil

    from transformers import GenerationConfig

    from deft.evaluate import generate, load_policy
    from deft.render import render_hh

    odd = tmp_path / "tiny-rp"
    shutil.copytree(assets["model"], odd)
    GenerationConfig(repetition_penalty=3.0, no_repeat_ngram_size=2, do_sample=True, temperature=0.7,
                     eos_token_id=assets["tok"].eos_token_id).save_pretrained(odd)
    prompts = [render_hh([{"role": "user", "content": q}]) for q in ("Hi there, how are you?", "Why is the sky blue?")]
    got = {}
    for m in (assets["model"], odd):
        lm, tok = load_policy(str(m), device="cpu")
        got[m.name] = generate(lm, tok, prompts, max_new_tokens=12, batch_size=2, stop_at_markers=False)
        assert (lm.generation_config.repetition_penalty == 3.0) == (m == odd)  # the model keeps its own config afterwards
    assert got["tiny-rp"] == got[assets["model"].name]


def test_baseline_file_without_final_newline_is_read_whole_and_untouched(tmp_path):
    from deft.evaluate import _resolve_baseline

    f = tmp_path / "base.jsonl"
    raw = "\n".join(json.dumps({"id": f"x{i}", "generation": f"g{i}"}) for i in range(3))  # no final newline
    f.write_text(raw)
    b = _resolve_baseline(f, ["run"])
    assert sorted(b.generations) == ["x0", "x1", "x2"]
    assert f.read_text() == raw
    bad = tmp_path / "ev"
    bad.mkdir()
    (bad / "eval.json").write_text("{\n")
    with pytest.raises(ValueError, match=r"eval.json:2: not valid JSON"):
        _resolve_baseline(bad, ["run"])
