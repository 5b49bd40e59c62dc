"""`deft experiment` (python/deft/experiment.py): the prompt split, the
bootstrap statistics, and a whole experiment on a tiny random Llama with the
real SmolLM2 tokenizer, PRO-HH rows graded from their stored scores and the
builtin reward model -- run, killed, resumed."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import shared_file, tiny_llama

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- statistics


def test_bootstrap_ci_matches_hand_computed_cases():
    from deft.experiment import bootstrap_mean_ci

    # two items 0 and 1: resampled means 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4
    c = bootstrap_mean_ci([0.0, 1.0], n_boot=4000, seed=0)
    assert c == {"mean": 0.5, "lo": 0.0, "hi": 1.0}
    # three items 0, 0, 3: the mean is the number k of 3s drawn, k ~ Binomial(3, 1/3):
    # P(k=0) = 8/27 > 2.5% and P(k=3) = 1/27 > 2.5%, so the interval is [0, 3]
    c = bootstrap_mean_ci([0.0, 0.0, 3.0], n_boot=4000, seed=1)
    assert (c["mean"], c["lo"], c["hi"]) == (1.0, 0.0, 3.0)
    # the median of the bootstrap means is the median of Binomial(3, 1/3) = 1
    # seeds are resampled too: two seeds whose items are 0 and 1 -> seed means 0, 1/2, 1 as above
    c = bootstrap_mean_ci([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], n_boot=4000, seed=2)
    assert c == {"mean": 0.5, "lo": 0.0, "hi": 1.0}
    # a constant has a zero-width interval
    assert bootstrap_mean_ci(np.full((3, 5), 2.5)) == {"mean": 2.5, "lo": 2.5, "hi": 2.5}
    # large n: the interval is the normal one, mean +- 1.96 sd / sqrt(n), within 10%
    x = np.random.default_rng(0).normal(size=2000)
    c = bootstrap_mean_ci(x, n_boot=2000, seed=3)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert (c["hi"] - c["lo"]) / 2 == pytest.approx(half, rel=0.1)
    # reproducible
    assert bootstrap_mean_ci(x, n_boot=500, seed=4) == bootstrap_mean_ci(x, n_boot=500, seed=4)


def test_paired_difference_and_verdicts():
    from deft.experiment import paired_difference, verdict

    rng = np.random.default_rng(0)
    b = rng.normal(size=(3, 200))
    assert paired_difference(b + 0.5, b, True)["verdict"] == "better"
    assert paired_difference(b + 0.5, b, False)["verdict"] == "worse"  # e.g. a higher NLL
    assert paired_difference(b - 0.5, b, None)["verdict"] == "lower"
    d = paired_difference(b + rng.normal(scale=0.01, size=b.shape), b, True)
    assert d["verdict"] == "no measurable difference" and d["lo"] < 0 < d["hi"]
    # paired: a shift far below the spread of the items is still detected, because the items cancel
    d = paired_difference(b + 0.05 + rng.normal(scale=0.1, size=b.shape), b, True)
    assert d["verdict"] == "better" and d["lo"] > 0
    assert paired_difference(b + 0.05 + rng.normal(scale=0.1, size=b.shape), b + rng.normal(scale=3.0, size=b.shape), True)[
        "verdict"] == "no measurable difference"  # the same shift, unpaired noise: lost
    assert verdict({"lo": 0.0, "hi": 1.0}, True) == "no measurable difference"


# --------------------------------------------------------------------------- split


def test_split_never_puts_one_prompt_on_both_sides():
    import polars as pl

    from deft.data import load
    from deft.experiment import prompt_key, split_by_prompt

    frame = load(shared_file("data/pro-hh/test_harmless_base.jsonl.gz")).frame
    # the same prompts again with other responses (and ids): each must land beside its twin
    twins = frame.head(300).with_columns(pl.col("id") + "-twin", pl.col("responses").list.reverse())
    both = pl.concat([frame, twins])
    train, held = split_by_prompt(both, 0.1, salt=7)
    assert train.height + held.height == both.height
    tk = {prompt_key(c, 7) for c in train["context"].to_list()}
    hk = {prompt_key(c, 7) for c in held["context"].to_list()}
    assert not tk & hk
    twin_ids = set(held["id"].to_list())
    assert all((i + "-twin" in twin_ids) for i in frame.head(300)["id"].to_list() if i in twin_ids)
    assert 0.07 < held.height / both.height < 0.13
    # deterministic, and the salt changes the split
    t2, h2 = split_by_prompt(both, 0.1, salt=7)
    assert h2["id"].to_list() == held["id"].to_list()
    _, h3 = split_by_prompt(both, 0.1, salt=8)
    assert set(h3["id"].to_list()) != set(held["id"].to_list())


def test_config_errors(tmp_path):
    from deft.config import ConfigError
    from deft.experiment import load_experiment_config

    base = ["model=m", "inputs.files=[x.jsonl]", "grade.use_input_scores=true"]
    with pytest.raises(ConfigError, match="is the reward model grading used"):
        load_experiment_config(None, ["model=m", "inputs.files=[x.jsonl]", "experiment.arms=[{name: a}]"])
    with pytest.raises(ConfigError, match="at least one trained arm"):
        load_experiment_config(None, base + ["experiment.arms=[{name: base, base: true}]"])
    with pytest.raises(ConfigError, match=r"arm dpo: unknown config key 'method.nope'"):
        load_experiment_config(None, base + ["experiment.arms=[{name: dpo, set: {method.nope: 1}}]"])
    with pytest.raises(ConfigError, match="data 'B' is not one of A, random, all"):
        load_experiment_config(None, base + ["experiment.arms=[{name: dpo, data: B}]"])
    with pytest.raises(ConfigError, match="duplicate arm name"):
        load_experiment_config(None, base + ["experiment.arms=[{name: a}, {name: a}]"])
    with pytest.raises(ConfigError, match="train.seed is set by the experiment"):
        load_experiment_config(None, base + ["experiment.arms=[{name: a, set: {train.seed: 3}}]"])
    with pytest.raises(ConfigError, match="experiment.baseline: 'zz' is not an arm"):
        load_experiment_config(None, base + ["experiment.arms=[{name: a}]", "experiment.baseline=zz"])


# --------------------------------------------------------------------------- a whole experiment


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("exp")
    tok = AutoTokenizer.from_pretrained(str(shared_file("tokenizers/smollm2")))
    model = tiny_llama(tok)
    model.save_pretrained(root / "tiny-llama")
    tok.save_pretrained(root / "tiny-llama")
    lines = gzip.open(shared_file("data/pro-hh/test_harmless_base.jsonl.gz"), "rt", encoding="utf-8").read().splitlines()[:240]
    (root / "pro.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def experiment_config(root: Path, run_dir: Path) -> Path:
    cfg = {
        "run_dir": str(run_dir), "model": str(root / "tiny-llama"),
        "inputs": {"files": [str(root / "pro.jsonl")]},
        "grade": {"use_input_scores": True, "a": 8.0, "c": 12.5},
        "data": {"max_length": 96, "max_prompt_length": 64},
        "method": {"name": "dpo", "beta": 0.1},
        "deft": {"omega": 2.5e-6, "diagnose_every": 0},
        "train": {"lr": 1e-3, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 3, "warmup_steps": 1,
                  "deepspeed": None, "save_steps": 1, "progress": False},
        "generation": {"max_new_tokens": 6},
        "experiment": {"seeds": [0, 1], "baseline": "dpo-A", "eval_fraction": 0.2, "eval_pairs": 24, "eval_prompts": 4,
                       "batch_size": 8, "bootstrap": 300, "device": "cpu",
                       "arms": [{"name": "base", "base": True},
                                {"name": "dpo-A", "set": {"deft.enabled": False}},
                                {"name": "deft-share", "set": {"deft.omega_share": 0.3, "method.sft_weight": 0.05}}]},
    }
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _stable(summary: dict) -> dict:
    """experiment.json without what differs between two runs of the same work (the folder, wall times)."""
    s = json.loads(json.dumps(summary))
    s.pop("run_dir")
    for a in s["arms"]:
        t = a.get("training")
        if t:
            t.pop("seconds")
            for p in t["per_seed"]:
                p.pop("seconds")
    return s


KILL_IN_SECOND_TRAIN_UNIT = textwrap.dedent("""
    import os, signal, sys
    import deft.train as t
    calls = []
    orig = t._finalize_checkpoint
    def finalize(tmp, final):
        calls.append(1)
        if len(calls) == 4:  # the second checkpoint of the second train unit (3 steps: checkpoints at 1 and 2)
            os.kill(os.getpid(), signal.SIGKILL)
        orig(tmp, final)
    t._finalize_checkpoint = finalize
    from deft.cli import main
    sys.argv = ["deft"] + sys.argv[1:]
    main()
""")


def test_experiment_runs_is_killed_and_resumes_to_the_same_result(tiny_setup, tmp_path):
    env = dict(os.environ)
    ref_dir = tmp_path / "straight"
    cfg_ref = experiment_config(tiny_setup, ref_dir)
    r = subprocess.run([sys.executable, "-m", "deft", "experiment", "--config", str(cfg_ref), "--no-progress"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Paired differences to `dpo-A`" in r.stdout
    straight = json.loads((ref_dir / "experiment.json").read_text())
    units = sorted((ref_dir / "arms").glob("*/seed-*/train"))
    assert len(units) == 4 and all((u / "model").is_dir() and not (u / "checkpoints").exists() for u in units)

    run_dir = tmp_path / "killed"
    cfg = experiment_config(tiny_setup, run_dir)
    script = tmp_path / "kill.py"
    script.write_text(KILL_IN_SECOND_TRAIN_UNIT)
    r = subprocess.run([sys.executable, str(script), "experiment", "--config", str(cfg), "--no-progress"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    assert r.returncode == -9, r.stderr[-3000:]
    assert not (run_dir / "experiment.json").exists()
    unit = run_dir / "arms" / "deft-share" / "seed-0" / "train"
    assert json.loads((unit / "stage.json").read_text())["status"] == "running"
    r = subprocess.run([sys.executable, "-m", "deft", "experiment", "--config", str(cfg), "--no-progress"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "deft-share/seed-0/train: resuming" in r.stderr and "resumed from" in r.stderr
    assert "dpo-A/seed-0/train: up to date" in r.stderr
    resumed = json.loads((run_dir / "experiment.json").read_text())
    assert _stable(resumed) == _stable(straight)

    # what the summary holds
    arms = {a["name"]: a for a in straight["arms"]}
    assert set(arms) == {"base", "dpo-A", "deft-share"}
    base = arms["base"]["metrics"]
    assert base["accuracy"]["mean"] == 0.5 and base["margin"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    assert base["win"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0}
    for name in ("dpo-A", "deft-share"):
        m = arms[name]["metrics"]
        for k in ("accuracy", "margin", "reward", "win", "nll", "logratio"):
            assert m[k]["lo"] <= m[k]["mean"] <= m[k]["hi"], (name, k)
        assert arms[name]["training"]["steps"] == 3 and arms[name]["training"]["tokens"] > 0
    assert arms["dpo-A"]["training"]["rdis_grad_share"] is None  # R_dis off: nothing measured
    assert arms["deft-share"]["training"]["rdis_grad_share"] == pytest.approx(0.3, rel=0.5)
    assert set(arms["deft-share"]["vs_baseline"]) == {"accuracy", "margin", "reward", "win", "nll", "logratio"}
    assert arms["dpo-A"]["vs_baseline"] == {}
    assert set(arms["dpo-A"]["vs_base"]) == {"accuracy", "margin", "reward", "nll", "logratio"} and arms["base"]["vs_base"] == {}
    # base vs dpo-A is the mirror of dpo-A vs base
    assert arms["base"]["vs_baseline"]["margin"]["mean"] == pytest.approx(-arms["dpo-A"]["vs_base"]["margin"]["mean"], abs=1e-12)
    assert straight["eval"]["pairs_by_subset"] == {"pro": straight["eval"]["pairs"]}  # the subset of pro.jsonl
    assert straight["eval"]["device"] == "cpu" and straight["eval"]["dtype"] == "float32"
    # the split: no held-out prompt was graded or trained on
    from deft.experiment import prompt_key
    import polars as pl

    held = pl.read_parquet(run_dir / "split" / "eval.parquet")
    graded = pl.read_parquet(run_dir / "grade" / "graded.parquet")
    assert not {prompt_key(c) for c in held["context"].to_list()} & {prompt_key(c) for c in graded["context"].to_list()}
    assert straight["eval"]["pairs"] == min(24, held.height) and straight["eval"]["prompts"] == 4
    md = (run_dir / "experiment.md").read_text()
    assert "| deft-share |" in md and "R_dis gradient share" in md
    assert (run_dir / "metrics.png").stat().st_size > 0 and (run_dir / "training_curves.png").stat().st_size > 0
    # a rerun does nothing but summarise again
    r = subprocess.run([sys.executable, "-m", "deft", "experiment", "--config", str(cfg), "--no-progress"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200)
    assert r.returncode == 0 and "running" not in r.stderr.replace("running ->", "") and "resuming" not in r.stderr
    assert _stable(json.loads((run_dir / "experiment.json").read_text())) == _stable(straight)


def test_split_with_given_eval_files_drops_their_prompts_from_training(tmp_path):
    """experiment.eval_files: those rows are the held-out split, and every input row with one of
    their prompts leaves the training rows (here the eval file repeats 50 input prompts)."""
    import polars as pl

    from deft.data import load
    from deft.experiment import EXPERIMENT_SCHEMA, _Split, prompt_key
    from deft.config import read_config

    lines = gzip.open(shared_file("data/pro-hh/test_harmless_base.jsonl.gz"), "rt", encoding="utf-8").read().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:200]) + "\n", encoding="utf-8")
    (tmp_path / "test.jsonl").write_text("\n".join(lines[150:260]) + "\n", encoding="utf-8")
    cfg = read_config(None, ["model=m", f"inputs.files=[{tmp_path / 'train.jsonl'}]",
                             f"experiment.eval_files=[{tmp_path / 'test.jsonl'}]"], EXPERIMENT_SCHEMA)
    st = _Split(cfg, tmp_path / "run", {})
    st.run(False)
    train = pl.read_parquet(st.outputs()["train"])
    held = pl.read_parquet(st.outputs()["eval"])
    assert held.height == 110
    hk = {prompt_key(c) for c in held["context"].to_list()}
    assert not hk & {prompt_key(c) for c in train["context"].to_list()}
    whole = load(tmp_path / "train.jsonl").frame
    assert train.height == sum(prompt_key(c) not in hk for c in whole["context"].to_list())
    assert train.height <= 150
    # held-out rows in prompt-key order: any first N are a uniform sample of the files and subsets
    assert [prompt_key(c) for c in held["context"].to_list()] == sorted(prompt_key(c) for c in held["context"].to_list())
    info = json.loads(st.outputs()["split"].read_text())
    assert info["eval_rows"] == 110 and info["train_rows"] == train.height
