"""`deft train` with SimPO, CPO, ORPO and KTO and DEFT on (python/deft/train.py): two steps each on
the tiny Llama of tests/conftest.py, what each computes and caches (no reference pass for the
reference-free methods), the eval split, KTO's mismatched pairs, and the config checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_train_assets, train_overrides

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_train_assets(tmp_path_factory.mktemp("train_losses_assets"))


def _rows(out: Path):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


EXTRA_KEYS = {"simpo": (), "cpo": ("pair_loss", "sft_term"), "orpo": ("pair_loss", "sft_term", "log_odds_ratio", "log_odds_chosen"),
              "kto": ("kl",)}


@pytest.mark.parametrize("method", ["simpo", "cpo", "orpo", "kto"])
def test_two_deft_steps(assets, tmp_path, method):
    from deft.train import run

    out, cache = tmp_path / method, tmp_path / "cache"
    res = run(None, train_overrides(assets, out, **{"method.name": method, "train.max_steps": 2, "train.gradient_accumulation_steps": 1,
                                                    "train.ref_cache_dir": str(cache)}))
    assert res.global_step == 2
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("loss", "L_m", "R_dis", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy") + EXTRA_KEYS[method]:
            assert np.isfinite(r[k]), (k, r)
        assert r["loss"] == pytest.approx(r["L_m"] - 0.5 * r["R_dis"], rel=1e-4, abs=1e-6)
        if "sft_term" in r:
            assert r["L_m"] == pytest.approx(r["pair_loss"] + r["sft_term"], rel=1e-5)
    if method == "kto":  # the reference log-probs of the pairs and of the mismatched pairs, cached
        assert res.ref_cache is not None and res.ref_cache.exists()
        assert sorted(p.name.split("-")[:-1] == ["ref", "kto", "kl"] for p in cache.iterdir()) == [False, True]
        man = json.loads((out / "manifest.json").read_text())  # both caches recorded
        assert man["reference_cache"] == str(res.ref_cache) and Path(man["kto_reference_cache"]).name.startswith("ref-kto-kl-")
        assert Path(man["kto_reference_cache"]).exists()
        # at step 1 the policy is the reference: reference point 0 and every loss term 1 - sigmoid(0) = 0.5
        assert abs(rows[0]["kl"]) < 1e-4 and rows[0]["L_m"] == pytest.approx(0.5, abs=1e-4)
        assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    else:  # reference-free: no reference pass, nothing cached
        assert res.ref_cache is None and not cache.exists()
        man = json.loads((out / "manifest.json").read_text())
        assert man["config"]["method"]["name"] == method


def test_kto_reference_point_moves_and_refuses_one_sample(assets, tmp_path, capsys):
    from deft.train import run

    out = tmp_path / "kto"
    run(None, train_overrides(assets, out, **{"method.name": "kto", "train.max_steps": 3, "train.gradient_accumulation_steps": 1,
                                              "train.lr": 5e-3, "deft.enabled": False, "deft.distribution": None}))
    rows = _rows(out)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-4) and rows[-1]["kl"] > 1e-3  # the policy has moved from the reference
    capsys.readouterr()
    with pytest.raises(ValueError, match="kto needs at least 2 samples"):
        run(None, train_overrides(assets, tmp_path / "one", **{"method.name": "kto", "data.max_samples": 1, "train.max_steps": 1,
                                                                "train.micro_batch_size": 1, "train.ref_cache_dir": str(tmp_path / "rc1")}))
    err = capsys.readouterr().err
    assert "with train.micro_batch_size 1 that is 2 pairs" in err
    assert not (tmp_path / "rc1").exists() and "reference log-probs" not in err  # refused before the reference pass


def test_kto_kl_examples_pair_each_prompt_with_the_previous_completions():
    from deft.train import Example, kto_kl_examples

    a = Example("a", [np.array([1, 2, 10, 11]), np.array([1, 2, 12])], 2, [1.0, 0.0])
    b = Example("b", [np.array([3, 20]), np.array([3, 21, 22, 23])], 1, [2.0, 1.0])
    c = Example("c", [np.array([4, 5, 6, 30]), np.array([4, 5, 6, 31])], 3, [0.5, 0.1])
    got = kto_kl_examples([a, b, c], max_length=5)
    assert [g.id for g in got] == ["a|kl:c", "b|kl:a", "c|kl:b"]
    assert [s.tolist() for s in got[0].input_ids] == [[1, 2, 30], [1, 2, 31]]
    assert [s.tolist() for s in got[1].input_ids] == [[3, 10, 11], [3, 12]]
    assert [s.tolist() for s in got[2].input_ids] == [[4, 5, 6, 20], [4, 5, 6, 21, 22]]  # cut to max_length
    assert [g.prompt_len for g in got] == [2, 1, 3]


def test_reference_free_eval_split(assets, tmp_path):
    """The eval split works for a reference-free method: its implicit reward is measured against the
    initial policy (one pass over the eval pairs, as for SFT); training computes no reference."""
    from deft.train import run

    out, cache = tmp_path / "simpo-eval", tmp_path / "cache"
    res = run(None, train_overrides(assets, out, **{"method.name": "simpo", "method.beta": 2.0, "train.max_steps": 1,
                                                    "train.gradient_accumulation_steps": 1, "train.eval_holdout": 0.25,
                                                    "train.eval_max_samples": 4, "train.ref_cache_dir": str(cache),
                                                    "deft.enabled": False, "deft.distribution": None}))
    assert res.ref_cache is None
    assert [p.name.split("-")[:2] for p in cache.iterdir()] == [["ref", "eval"]]
    ev = [r for r in _rows(out) if "eval/accuracy" in r]
    assert [r["step"] for r in ev] == [0, 1]
    assert ev[0]["eval/accuracy"] == 0.5 and ev[0]["eval/margin"] == 0.0
    assert all(np.isfinite(r["eval/loss"]) for r in ev)


def test_config_keys_and_checks():
    from deft.config import ConfigError, load_config

    base = ["model=m", "data.graded=g", "deft.distribution=q"]
    expect = {  # name: (method, beta, sft_weight, extra)
        "simpo": ("simpo", 2.0, 0.0, {"gamma": 1.0}), "cpo": ("cpo", 0.1, 1.0, {}), "orpo": ("orpo", 0.1, 1.0, {}),
        "kto": ("kto", 0.1, 0.0, {"desirable_weight": 1.0, "undesirable_weight": 1.0}),
    }
    for name, (method, beta, w, extra) in expect.items():
        for prefix in ("", "deft-"):
            c = load_config(REPO / "configs" / f"{prefix}{name}.yaml", base)
            m = c["method"]
            assert m["name"] == method and m["beta"] == beta and c["deft"]["enabled"] == bool(prefix), (prefix, name)
            from deft.config import sft_weight

            assert sft_weight(m) == w and all(m[k] == v for k, v in extra.items()), (prefix, name)
    with pytest.raises(ConfigError, match="method.label_smoothing: orpo has no label smoothing"):
        load_config(None, base + ["method.name=orpo", "method.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="method.beta: must be positive for simpo"):
        load_config(None, base + ["method.name=simpo", "method.beta=0"])
    with pytest.raises(ConfigError, match="method.undesirable_weight: must be >= 0"):
        load_config(None, base + ["method.name=kto", "method.undesirable_weight=-1"])
    with pytest.raises(ConfigError, match="at least one must be positive"):
        load_config(None, base + ["method.name=kto", "method.undesirable_weight=0", "method.desirable_weight=0"])
    assert load_config(None, base + ["method.name=cpo", "method.label_smoothing=0.1"])["method"]["label_smoothing"] == 0.1


def test_new_method_keys_leave_other_fingerprints_alone():
    """`deft run` / `deft experiment` fingerprints of DPO runs do not change with the SimPO/KTO keys;
    a SimPO run's changes with its gamma."""
    from deft.config import load_config
    from deft.pipeline import train_fingerprint_config

    base = ["model=m", "data.graded=g", "deft.distribution=q"]
    dpo = train_fingerprint_config(load_config(REPO / "configs" / "deft-dpo.yaml", base))
    assert not {"gamma", "desirable_weight", "undesirable_weight"} & set(dpo["method"])
    assert dpo == train_fingerprint_config(load_config(REPO / "configs" / "deft-dpo.yaml", base + ["method.gamma=3", "method.desirable_weight=2"]))
    s1 = train_fingerprint_config(load_config(REPO / "configs" / "simpo.yaml", base))
    s2 = train_fingerprint_config(load_config(REPO / "configs" / "simpo.yaml", base + ["method.gamma=0.5"]))
    assert s1["method"]["gamma"] == 1.0 and s1 != s2 and "desirable_weight" not in s1["method"]
    k = train_fingerprint_config(load_config(REPO / "configs" / "kto.yaml", base))
    assert k["method"]["undesirable_weight"] == 1.0 and "gamma" not in k["method"]


def _deepspeed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@pytest.mark.slow
def test_kto_packed_hidden_and_deepspeed_match_the_plain_loop(assets, tmp_path):
    """KTO's extra pass over the mismatched pairs goes through every batch layout and engine: packed
    rows with log-probs from the hidden states, and ZeRO-2 in one process, give the plain padded
    loop's losses, reference points and R_dis over three steps."""
    import os
    import subprocess
    import sys

    from deft.train import run

    kw = {"method.name": "kto", "train.max_steps": 3, "train.gradient_accumulation_steps": 1, "train.lr": 5e-3}
    run(None, train_overrides(assets, tmp_path / "plain", **kw))
    run(None, train_overrides(assets, tmp_path / "packed", **kw, **{"train.packing": True, "train.logprobs": "hidden"}))
    runs = {"plain": _rows(tmp_path / "plain"), "packed": _rows(tmp_path / "packed")}
    if _deepspeed_available():
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        ov = train_overrides(assets, tmp_path / "ds", **kw, **{"train.deepspeed": str(REPO / "configs" / "deepspeed" / "zero2.json")})
        r = subprocess.run([sys.executable, "-m", "deft", "train"] + [a for o in ov for a in ("--set", o)], capture_output=True,
                           text=True, env=env, cwd=tmp_path, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs["ds"] = _rows(tmp_path / "ds")
    plain = runs.pop("plain")
    assert max(r["kl"] for r in plain) > 1e-3, [r["kl"] for r in plain]  # a reference point that is not the trivial 0
    for name, rows in runs.items():
        for a, b in zip(plain, rows):
            for k in ("L_m", "R_dis", "loss"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (name, a["step"], k)
            # kl is a mean of differences of summed log-probs (hundreds of nats): float32 rounding of those
            assert b["kl"] == pytest.approx(a["kl"], abs=1e-4), (name, a["step"])


@pytest.mark.slow
def test_experiment_with_simpo_and_deft_kto_arms(tmp_path):
    """`deft experiment` runs arms of the new methods: SimPO (no reference pass: the shared ref_cache
    only gets KTO's two files) and DEFT-KTO, each evaluated like every arm against the base model."""
    import gzip
    import os
    import subprocess
    import sys

    import yaml
    from transformers import AutoTokenizer

    from conftest import shared_file, tiny_llama

    tok = AutoTokenizer.from_pretrained(str(shared_file("tokenizers/smollm2")))
    tiny_llama(tok).save_pretrained(tmp_path / "tiny-llama")
    tok.save_pretrained(tmp_path / "tiny-llama")
    lines = gzip.open(shared_file("data/pro-hh/test_harmless_base.jsonl.gz"), "rt", encoding="utf-8").read().splitlines()[:160]
    (tmp_path / "pro.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    run_dir = tmp_path / "exp"
    cfg = {
        "run_dir": str(run_dir), "model": str(tmp_path / "tiny-llama"), "inputs": {"files": [str(tmp_path / "pro.jsonl")]},
        "grade": {"use_input_scores": True, "a": 10.0, "c": 12.5}, "data": {"max_length": 96, "max_prompt_length": 64},
        "method": {"name": "dpo", "beta": 0.1}, "deft": {"omega": 0.5, "diagnose_every": 0},
        "train": {"lr": 1e-3, "micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 2, "warmup_steps": 1,
                  "deepspeed": None, "save_steps": 0, "progress": False},
        "generation": {"max_new_tokens": 4},
        "experiment": {"seeds": [0], "baseline": "simpo-A", "eval_fraction": 0.2, "eval_pairs": 8, "eval_prompts": 2,
                       "batch_size": 8, "bootstrap": 100, "device": "cpu",
                       "arms": [{"name": "base", "base": True},
                                {"name": "simpo-A", "set": {"deft.enabled": False, "method.name": "simpo", "method.beta": 2.0}},
                                {"name": "deft-kto", "set": {"method.name": "kto"}}]},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "deft", "experiment", "--config", str(path), "--no-progress"], capture_output=True,
                       text=True, env=dict(os.environ), cwd=tmp_path, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((run_dir / "experiment.json").read_text())
    arms = {a["name"]: a for a in summary["arms"]}
    assert arms["simpo-A"]["training"]["steps"] == 2 and arms["deft-kto"]["training"]["steps"] == 2
    assert set(arms["deft-kto"]["vs_baseline"]) >= {"accuracy", "margin", "nll"}
    assert sorted(p.name.split("-")[:-1] for p in (run_dir / "ref_cache").iterdir()) == [["ref"], ["ref", "kto", "kl"]]
    rows = _rows(run_dir / "arms" / "deft-kto" / "seed-0" / "train")
    assert all(np.isfinite(r["R_dis"]) and np.isfinite(r["kl"]) for r in rows)
