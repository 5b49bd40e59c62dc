"""`deft stats` and the CLI's error reporting."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import shared_file, write_lines
from tokenizers import Tokenizer as PyTokenizer
from typer.testing import CliRunner

from deft.cli import app
from deft.data import load, load_frame
from deft.stats import compute_stats

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_compute_stats_on_a_hand_made_frame(tmp_path):
    tok_path = shared_file("tokenizers/gpt2/tokenizer.json")
    path = write_lines(
        tmp_path / "mini.jsonl",
        [
            {"prompt": "Hi", "responses": ["Hello there", "Go away", "Hi"], "scores": [1.0, -1.0, 0.0], "subset": "x"},
            {"prompt": "Name a colour", "responses": ["Blue", "Blue blue blue"], "subset": "y"},
        ],
    )
    s = compute_stats(load_frame(path), tok_path, top_k=3)
    ref = PyTokenizer.from_file(str(tok_path))
    responses = ["Hello there", "Go away", "Hi", "Blue", "Blue blue blue"]
    lengths = [len(ref.encode(r, add_special_tokens=False).ids) for r in responses]
    assert s["samples"] == 2
    assert s["subsets"] == {"x": 1, "y": 1}
    assert s["responses_per_sample"] == {"2": 1, "3": 1}
    assert s["samples_with_scores"] == 1
    assert s["response_tokens_total"] == sum(lengths)
    assert s["response_tokens"]["p0"] == min(lengths) and s["response_tokens"]["p100"] == max(lengths)
    assert s["response_tokens"]["mean"] == pytest.approx(np.mean(lengths))
    top = s["top_response_tokens"]
    assert top[0]["text"] == " blue" and top[0]["count"] == 2
    assert [t["count"] for t in top] == sorted((t["count"] for t in top), reverse=True)
    ctx = ["\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: Name a colour\n\nAssistant:"]
    assert s["context_tokens"]["p100"] == max(len(ref.encode(c).ids) for c in ctx)


def test_stats_json_on_real_hh():
    hh = shared_file("data/hh-rlhf/harmless-base-test.jsonl.gz")
    tok = shared_file("tokenizers/gpt2")
    r = run("stats", "--input", str(hh), "--tokenizer", str(tok), "--json", "--top", "5")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["samples"] == 2312 and s["subsets"] == {"harmless_base": 2312}
    assert s["responses_per_sample"] == {"2": 2312}
    assert len(s["top_response_tokens"]) == 5
    frame = load(hh).frame
    ref = PyTokenizer.from_file(str(tok / "tokenizer.json"))
    total = sum(len(e.ids) for e in ref.encode_batch(frame["responses"].explode().to_list(), add_special_tokens=False))
    assert s["response_tokens_total"] == total
    q = s["context_tokens"]
    assert q["p0"] <= q["p25"] <= q["p50"] <= q["p75"] <= q["p90"] <= q["p99"] <= q["p100"]


def test_stats_table_on_two_real_pro_files():
    a = shared_file("data/pro-hh/test_harmless_base.jsonl.gz")
    b = shared_file("data/pro-hh/test_helpful_base.jsonl.gz")
    tok = shared_file("tokenizers/smollm2/tokenizer.json")
    r = run("stats", "-i", str(a), "-i", str(b), "-t", str(tok))
    assert r.exit_code == 0, r.output
    assert "harmless_base" in r.stdout and "helpful_base" in r.stdout
    assert "4,666 samples" in r.stdout and "2,354" in r.stdout
    assert "samples with scores: 4,666" in r.stdout


def test_bad_input_is_one_line_naming_file_line_and_field(tmp_path):
    tok = shared_file("tokenizers/gpt2/tokenizer.json")
    bad = write_lines(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}])
    r = run("stats", "-i", str(bad), "-t", str(tok))
    assert r.exit_code == 2
    err = r.stderr.strip()
    assert "Traceback" not in r.output
    assert err.startswith("error:") and "bad.jsonl:2" in err and "rejected" in err


def test_skip_writes_rejects_and_reports(tmp_path, monkeypatch):
    tok = shared_file("tokenizers/gpt2/tokenizer.json")
    bad = write_lines(
        tmp_path / "mixed.jsonl",
        [{"prompt": "p", "chosen": "a", "rejected": "b"}, "{not json", {"prompt": "q", "chosen": "c", "rejected": "d"}],
    )
    monkeypatch.chdir(tmp_path)
    r = run("stats", "-i", str(bad), "-t", str(tok), "--on-error", "skip", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["samples"] == 2
    assert "skipped 1 of 3 rows" in r.stderr
    rejects = [json.loads(x) for x in (tmp_path / "mixed.jsonl.rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 1 and rejects[0]["source_line"] == 2 and rejects[0]["raw"] == "{not json"


def test_missing_files_and_bad_options(tmp_path):
    tok = shared_file("tokenizers/gpt2/tokenizer.json")
    good = write_lines(tmp_path / "g.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    r = run("stats", "-i", str(tmp_path / "nope.jsonl"), "-t", str(tok))
    assert r.exit_code == 2 and "nope.jsonl" in r.stderr
    r = run("stats", "-i", str(good), "-t", str(tmp_path / "missing-tok"))
    assert r.exit_code == 2 and "tokenizer file not found" in r.stderr
    r = run("stats", "-i", str(good), "-t", str(tok), "--on-error", "ignore")
    assert r.exit_code == 2 and "--on-error" in r.stderr


def test_installed_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "deft", "version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("deft ") and "native core" in out.stdout


def test_select_eval_run_commands_fail_in_one_line(tmp_path):
    """The newer commands keep the CLI contract: exit 2 and one `error:` line naming what was wrong."""
    good = write_lines(tmp_path / "g.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    r = run("select", "-i", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "s.parquet"), "-s", "easy")
    assert r.exit_code == 2 and "nope.jsonl" in r.stderr and "Traceback" not in r.stderr
    r = run("select", "-i", str(good), "-o", str(tmp_path / "s.parquet"), "-s", "easiest")
    assert r.exit_code == 2 and "easiest" in r.stderr
    r = run("select", "-i", str(good), "-o", str(tmp_path / "s.parquet"), "-s", "easy", "--fraction", "0")
    assert r.exit_code == 2 and "fraction" in r.stderr
    r = run("eval", "--data", str(good), "-o", str(tmp_path / "ev"))
    assert r.exit_code == 2 and "no model given" in r.stderr
    r = run("eval", "--model", str(tmp_path / "no-model"), "--data", str(good), "-o", str(tmp_path / "ev"))
    assert r.exit_code == 2 and "no-model" in r.stderr
    r = run("run", "--set", "model=m")
    assert r.exit_code == 2 and "inputs.files: required" in r.stderr
    r = run("run", "--config", str(tmp_path / "missing.yaml"))
    assert r.exit_code == 2 and "missing.yaml" in r.stderr
    for cmd in ("select", "eval", "run"):
        assert run(cmd, "--help").exit_code == 0
