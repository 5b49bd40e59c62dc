"""Grading, polarity and the discrepancy distribution."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
from conftest import shared_file, write_lines
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as PyTokenizer
from typer.testing import CliRunner

from deft._native import assign_polarity
from deft.cli import app
from deft.data import load, load_many
from deft.distribution import build_distribution, load_distribution, resolve_tokenizer, save_distribution
from deft.grade import Thresholds, grade, level_counts, polarity_reference

runner = CliRunner()
PRO = ("data/pro-hh/test_harmless_base.jsonl.gz", "data/pro-hh/test_helpful_base.jsonl.gz")


@pytest.fixture(scope="module")
def pro_frame() -> pl.DataFrame:
    return load_many([shared_file(p) for p in PRO]).frame


@pytest.fixture(scope="module")
def pro_graded(pro_frame) -> pl.DataFrame:
    return grade(pro_frame)


def test_level_counts_round_half_up():
    assert level_counts(160_800, 3.73, 12.5) == (5998, 20100)
    assert level_counts(2312, 3.73, 12.5) == (86, 289)
    assert level_counts(2354, 3.73, 12.5) == (88, 294)
    assert level_counts(10, 3.73, 12.5) == (1, 1)  # A never empty
    assert level_counts(1, 3.73, 12.5) == (1, 0)  # A and C never overlap
    assert level_counts(0, 3.73, 12.5) == (0, 0)


def test_real_pro_levels_per_subset(pro_graded):
    counts = {(s, lv): n for s, lv, n in pro_graded.group_by("subset", "level").len().iter_rows()}
    assert counts == {
        ("harmless_base", "A"): 86, ("harmless_base", "B"): 1937, ("harmless_base", "C"): 289,
        ("helpful_base", "A"): 88, ("helpful_base", "B"): 1972, ("helpful_base", "C"): 294,
    }
    for subset in ("harmless_base", "helpful_base"):
        g = pro_graded.filter(pl.col("subset") == subset)
        best = {lv: g.filter(pl.col("level") == lv).get_column("best_score") for lv in "ABC"}
        assert best["A"].min() >= best["B"].max() >= best["B"].min() >= best["C"].max()
        assert sorted(g.get_column("level_rank").to_list()) == list(range(1, g.height + 1))


def test_real_pro_polarity_matches_reference(pro_frame, pro_graded):
    scores = pro_frame.get_column("scores").to_list()
    responses = pro_frame.get_column("responses").to_list()
    th = Thresholds()
    for i, row in enumerate(pro_graded.iter_rows(named=True)):
        order, norm, pol = polarity_reference(scores[i], row["level"], th)
        assert row["human_order"] == order
        assert row["polarity"] == pol
        assert row["norm_scores"] == pytest.approx(norm)
        assert row["responses"] == [responses[i][k] for k in order]
        assert row["scores"] == [scores[i][k] for k in order]
        assert row["best_score"] == max(scores[i])
    # pairs: best +1 and worst -1 everywhere except exact ties
    pol = pro_graded.get_column("polarity").to_list()
    ties = sum(1 for s in scores if s[0] == s[1])
    assert sum(1 for p in pol if p == [1, -1]) == len(pol) - ties


def test_native_and_python_grading_agree(pro_frame):
    assert grade(pro_frame, native=True).equals(grade(pro_frame, native=False))


score_lists = st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.1, 0.5, 0.79, 0.8, 0.95, 1.0, 3.0]) | st.floats(-5, 5), min_size=2, max_size=8)
opt = st.one_of(st.none(), st.floats(0, 1))


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(score_lists, min_size=1, max_size=12), codes=st.data(), ths=st.tuples(opt, opt, opt, opt, opt, opt))
def test_native_polarity_equals_reference_on_generated_lists(rows, codes, ths):
    levels = codes.draw(st.lists(st.integers(0, 2), min_size=len(rows), max_size=len(rows)))
    th = Thresholds(*ths)
    order, norm, pol = assign_polarity(pl.Series(rows, dtype=pl.List(pl.Float64)), pl.Series(levels, dtype=pl.UInt8), **th.as_dict())
    for i, s in enumerate(rows):
        o, n, p = polarity_reference(s, "ABC"[levels[i]], th)
        assert order[i].as_py() == o
        assert pol[i].as_py() == p
        assert norm[i].as_py() == pytest.approx(n)


def test_assign_polarity_errors_name_the_row():
    lv = pl.Series([0, 0], dtype=pl.UInt8)
    with pytest.raises(ValueError, match=r"row 1: field 'scores\[0\]': NaN"):
        assign_polarity(pl.Series([[1.0, 2.0], [math.nan, 1.0]]), lv)
    with pytest.raises(ValueError, match="row 0: field 'scores': 1 score"):
        assign_polarity(pl.Series([[1.0], [1.0, 2.0]]), lv)
    with pytest.raises(ValueError, match="row 1: field 'scores': missing"):
        assign_polarity(pl.Series([[1.0, 2.0], None], dtype=pl.List(pl.Float64)), lv)
    with pytest.raises(ValueError, match="level': code 7"):
        assign_polarity(pl.Series([[1.0, 2.0], [1.0, 2.0]]), pl.Series([0, 7], dtype=pl.UInt8))
    with pytest.raises(ValueError, match="2 rows but levels has 1"):
        assign_polarity(pl.Series([[1.0, 2.0], [1.0, 2.0]]), pl.Series([0], dtype=pl.UInt8))
    with pytest.raises(TypeError, match="uint8"):
        assign_polarity(pl.Series([[1.0, 2.0]]), pl.Series([0], dtype=pl.Int64))


def test_ranked_lists_ties_and_all_equal(tmp_path):
    path = write_lines(
        tmp_path / "ranked.jsonl",
        [
            {"prompt": f"q{i}", "responses": ["a", "b", "c", "d"], "scores": s}
            for i, s in enumerate([[0.0, 10.0, 8.5, 1.0], [2.0, 2.0, 2.0, 2.0], [1.0, 3.0, 3.0, 0.0]] + [[float(i), 0.0, 1.0, 2.0] for i in range(3, 40)])
        ],
    )
    g = grade(load(path).frame, a=10, c=10)
    row0 = g.filter(pl.col("id") == "ranked.jsonl:1").row(0, named=True)
    assert row0["responses"] == ["b", "c", "d", "a"] and row0["human_order"] == [1, 2, 3, 0]
    assert row0["norm_scores"] == pytest.approx([1.0, 0.85, 0.1, 0.0])
    eq = g.filter(pl.col("id") == "ranked.jsonl:2").row(0, named=True)
    assert eq["polarity"] == [0, 0, 0, 0] and eq["norm_scores"] == [0.5] * 4
    tie = g.filter(pl.col("id") == "ranked.jsonl:3").row(0, named=True)
    assert tie["human_order"] == [1, 2, 0, 3]


def test_bad_grading_parameters(pro_frame):
    for a, c in ((0, 10), (100, 1), (50, 50), (-1, 10), (5, 0)):
        with pytest.raises(ValueError, match="--a|--c"):
            grade(pro_frame, a=a, c=c)
    with pytest.raises(ValueError, match="threshold b_pos"):
        grade(pro_frame, thresholds=Thresholds(b_pos=1.5))


def test_grading_without_scores_names_the_row():
    hh = load(shared_file("data/hh-rlhf/harmless-base-test.jsonl.gz")).frame
    with pytest.raises(ValueError, match=r"harmless-base-test.jsonl.gz:1: field 'scores': missing; 2312 of 2312"):
        grade(hh)


# --- the command -------------------------------------------------------------


def test_cli_grade_with_input_scores(tmp_path):
    out = tmp_path / "g"
    args = ["grade", "-i", str(shared_file(PRO[0])), "-i", str(shared_file(PRO[1])), "--use-input-scores", "-o", str(out), "--plot"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "harmless_base" in r.stdout and "helpful_base" in r.stdout
    g = pl.read_parquet(out / "graded.parquet")
    assert g.height == 4666 and (g.get_column("level") == "A").sum() == 86 + 88
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "grade" and m["parameters"]["a"] == 3.73 and m["parameters"]["per_subset"] is True
    assert m["inputs"][0]["sha256"] and m["outputs"]["graded"]["rows"] == 4666
    assert m["counts"]["harmless_base/A"]["samples"] == 86
    assert (out / "best_scores.png").read_bytes()[:4] == b"\x89PNG"
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "already exists; pass --overwrite" in r.stderr
    r = runner.invoke(app, args + ["--overwrite", "--a", "10", "--no-per-subset"])
    assert r.exit_code == 0, r.output
    assert (pl.read_parquet(out / "graded.parquet").get_column("level") == "A").sum() == 467


def test_cli_grade_config_file_and_bad_options(tmp_path):
    cfg = tmp_path / "grade.yaml"
    cfg.write_text("use_input_scores: true\na: 5\nc: 20\n")
    out = tmp_path / "g"
    r = runner.invoke(app, ["grade", "-i", str(shared_file(PRO[0])), "-o", str(out), "--config", str(cfg), "--c", "10"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["parameters"]["a"] == 5 and m["parameters"]["c"] == 10  # the command line wins
    cfg.write_text("alpha: 5\n")
    r = runner.invoke(app, ["grade", "-i", str(shared_file(PRO[0])), "--config", str(cfg)])
    assert r.exit_code == 2 and "unknown option(s) alpha" in r.output
    r = runner.invoke(app, ["grade", "-i", str(shared_file(PRO[0])), "--use-input-scores", "--a", "60", "--c", "50", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "must be below 100" in r.stderr
    r = runner.invoke(app, ["grade", "-i", str(shared_file("data/hh-rlhf/harmless-base-test.jsonl.gz")), "--use-input-scores", "-o", str(tmp_path / "y")])
    assert r.exit_code == 2 and "harmless-base-test.jsonl.gz:1: field 'scores': missing" in r.stderr


# --- distribution ---------------------------------------------------------------


def _reference_counts(texts, tok_json_path):
    ref = PyTokenizer.from_file(str(tok_json_path))
    out = np.zeros(ref.get_vocab_size(True), dtype=np.int64)
    for t in texts:
        for i in ref.encode(t, add_special_tokens=False).ids:
            out[i] += 1
    return out


def test_distribution_counts_q_pos_and_q_neg_as_the_trainer_tokenises(pro_graded, tmp_path):
    tok_file = shared_file("tokenizers/gpt2/tokenizer.json")
    tok = resolve_tokenizer(tok_file)
    dist = build_distribution(pro_graded, tok, template="plain")
    rows = pro_graded.select("responses", "polarity").explode("responses", "polarity")
    pos = [" " + t for t in rows.filter(pl.col("polarity") == 1).get_column("responses").to_list()]
    neg = [" " + t for t in rows.filter(pl.col("polarity") == -1).get_column("responses").to_list()]
    np.testing.assert_array_equal(dist.q_pos, _reference_counts(pos, tok_file))
    np.testing.assert_array_equal(dist.q_neg, _reference_counts(neg, tok_file))
    assert dist.q_diff.dtype == np.float32 and dist.q_diff.shape == (50257,)
    assert abs(float(dist.q_diff.astype(np.float64).sum())) < 1e-5
    expected = dist.q_pos / dist.q_pos.sum() - dist.q_neg / dist.q_neg.sum()
    np.testing.assert_allclose(dist.q_diff, expected, rtol=1e-6, atol=1e-9)
    assert dist.metadata["template"] == "plain" and json.loads(dist.metadata["response_prefix"]) == " "
    path = save_distribution(dist, tmp_path / "q.safetensors")
    back = load_distribution(path, tokenizer=tok)
    np.testing.assert_array_equal(back.q_diff, dist.q_diff)
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_distribution(dist, path)
    with pytest.raises(ValueError, match="different vocabulary"):
        load_distribution(path, tokenizer=resolve_tokenizer(shared_file("tokenizers/smollm2")))


def test_chat_template_tokenizers_count_responses_without_prefix(pro_graded):
    tok = resolve_tokenizer(shared_file("tokenizers/smollm2"))
    assert tok.chat_template is not None
    dist = build_distribution(pro_graded.head(300), tok)
    assert dist.metadata["template"] == "chat" and json.loads(dist.metadata["response_prefix"]) == ""
    assert dist.vocab_size == 49152


def test_empty_q_minus_fails_clearly(tmp_path):
    g = pl.DataFrame({"responses": [["a b", "c"]], "polarity": [[1, 0]]}, schema={"responses": pl.List(pl.Utf8), "polarity": pl.List(pl.Int8)})
    with pytest.raises(ValueError, match="Q- is empty"):
        build_distribution(g, resolve_tokenizer(shared_file("tokenizers/gpt2")), template="plain")


def test_cli_distribution_build_and_show(tmp_path):
    out = tmp_path / "g"
    r = runner.invoke(app, ["grade", "-i", str(shared_file(PRO[0])), "--use-input-scores", "-o", str(out)])
    assert r.exit_code == 0, r.output
    q = tmp_path / "qdiff.safetensors"
    gpt2 = str(shared_file("tokenizers/gpt2"))
    r = runner.invoke(app, ["distribution", "--graded", str(out / "graded.parquet"), "--tokenizer", gpt2, "--output", str(q), "--plot", str(tmp_path / "top.png")])
    assert r.exit_code == 0, r.output
    assert "most positive tokens" in r.stdout and "most negative tokens" in r.stdout
    assert (tmp_path / "top.png").exists()
    meta = load_distribution(q).metadata
    assert meta["graded_sha256"] and meta["graded_manifest_sha256"]
    r = runner.invoke(app, ["distribution", "show", str(q), "--json", "--top", "5"])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.stdout)
    assert len(shown["positive"]) == 5 and all(t["q_diff"] > 0 for t in shown["positive"])
    assert all(t["q_diff"] < 0 for t in shown["negative"])
    r = runner.invoke(app, ["distribution", "--graded", str(out / "graded.parquet"), "--tokenizer", gpt2, "--output", str(q)])
    assert r.exit_code == 2 and "already exists" in r.stderr
    r = runner.invoke(app, ["distribution", "show", str(q), "--tokenizer", str(shared_file("tokenizers/smollm2"))])
    assert r.exit_code == 2 and "different vocabulary" in r.stderr
    r = runner.invoke(app, ["distribution", "--graded", str(out / "graded.parquet")])
    assert r.exit_code == 2 and "missing --tokenizer, --output" in r.stderr


# --- grading with a reward model ------------------------------------------------


def test_cli_grade_with_a_local_reward_model_on_raw_hh(tmp_path):
    """`deft grade --reward-model PATH` on real HH transcripts, scored by a tiny local RM."""
    from conftest import save_tiny_reward_model

    from deft.score import HFRewardModel

    rm = save_tiny_reward_model(tmp_path / "rm")
    lines = shared_file("data/hh-rlhf/harmless-base-test.jsonl.gz")
    import gzip

    with gzip.open(lines, "rt", encoding="utf-8") as f:
        head = [next(f) for _ in range(40)]
    small = tmp_path / "hh40.jsonl"
    small.write_text("".join(head), encoding="utf-8")
    out = tmp_path / "g"
    r = runner.invoke(app, ["grade", "-i", str(small), "--reward-model", str(rm), "--template", "plain", "--max-length", "256",
                            "--a", "10", "--c", "20", "-o", str(out)])
    assert r.exit_code == 0, r.output
    g = pl.read_parquet(out / "graded.parquet")
    assert g.height == 40 and dict(g.group_by("level").len().iter_rows()) == {"A": 4, "B": 28, "C": 8}
    model = HFRewardModel.load(str(rm), template="plain", max_length=256, device="cpu")
    frame = load(small).frame
    want = model.score_batch(model.encode(frame["context"].to_list()[:3], [x[0] for x in frame["responses"].to_list()[:3]]))
    got = {row["id"]: dict(zip(row["human_order"], row["scores"])) for row in g.head(3).iter_rows(named=True)}
    for i, rid in enumerate(frame["id"].to_list()[:3]):
        assert got[rid][0] == pytest.approx(want[i], rel=1e-4, abs=1e-5)
    m = json.loads((out / "manifest.json").read_text())
    assert m["parameters"]["reward_model"] == model.name and m["parameters"]["template"] == "plain"
    assert (out / "scores").is_dir()
    # refusing a causal LM as a reward model, with the reason
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = tmp_path / "lm"
    GPT2LMHeadModel(GPT2Config(vocab_size=50304, n_embd=16, n_layer=1, n_head=2)).save_pretrained(lm)
    r = runner.invoke(app, ["grade", "-i", str(small), "--reward-model", str(lm), "-o", str(tmp_path / "g2")])
    assert r.exit_code == 2 and "sequence" in r.stderr.lower()


def test_shipped_grade_configs_are_valid(tmp_path):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    out = tmp_path / "g"
    r = runner.invoke(app, ["grade", "-i", str(shared_file(PRO[0])), "--config", str(root / "configs" / "grade.yaml"),
                            "--use-input-scores", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "manifest.json").read_text())["parameters"]["a"] == 3.73
    import yaml

    for cfg in (root / "configs").glob("grade*.yaml"):
        keys = set(yaml.safe_load(cfg.read_text()))
        assert keys <= {p.name for p in __import__("typer").main.get_command(app).commands["grade"].params}, cfg


def test_cli_grade_builtin_reward_model_on_raw_hh(tmp_path):
    """The default: `deft grade --input hh.jsonl` with the builtin RM, offline, on real HH transcripts."""
    import gzip

    from deft.builtin_rm import BuiltinRewardModel

    with gzip.open(shared_file("data/hh-rlhf/harmless-base-test.jsonl.gz"), "rt", encoding="utf-8") as f:
        head = [next(f) for _ in range(48)]
    small = tmp_path / "hh.jsonl"
    small.write_text("".join(head), encoding="utf-8")
    out = tmp_path / "g"
    r = runner.invoke(app, ["grade", "--input", str(small), "-o", str(out), "--a", "10", "--c", "25"])
    assert r.exit_code == 0, r.output
    g = pl.read_parquet(out / "graded.parquet")
    assert dict(g.group_by("level").len().iter_rows()) == {"A": 5, "B": 31, "C": 12}
    m = json.loads((out / "manifest.json").read_text())
    assert m["parameters"]["reward_model"].startswith("builtin:")
    frame = load(small).frame
    want = BuiltinRewardModel.load(device="cpu").score(frame["context"].to_list(), [x[0] for x in frame["responses"].to_list()])
    got = {row["id"]: dict(zip(row["human_order"], row["scores"])) for row in g.iter_rows(named=True)}
    np.testing.assert_allclose([got[i][0] for i in frame["id"].to_list()], want, rtol=1e-4, atol=1e-4)
