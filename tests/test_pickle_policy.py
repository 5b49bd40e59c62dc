"""Pickle-only policy weights (pytorch_model.bin) are refused by `deft train`
and `deft eval` (deft._hf.load_causal_lm) unless the user opts in; safetensors
policies need no opt-in (issue 10, item 5)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMALLER_LLAMA, shared_file, tiny_llama

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _tiny_llama(folder: Path, *, safe: bool) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(shared_file("tokenizers/smollm2")))
    model = tiny_llama(tok, **SMALLER_LLAMA, max_position_embeddings=256, tie_word_embeddings=True)
    model.save_pretrained(folder, safe_serialization=safe)
    if not safe and not (folder / "pytorch_model.bin").exists():  # transformers >= 5 writes safetensors regardless
        from safetensors.torch import load_file

        torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pickle_policy")
    pkl = _tiny_llama(root / "pickled", safe=False)
    assert (pkl / "pytorch_model.bin").exists() and not list(pkl.glob("*.safetensors"))
    safe = _tiny_llama(root / "safe", safe=True)
    return {"root": root, "pickled": pkl, "safe": safe}


def test_load_causal_lm_refuses_pickle_unless_allowed(models, monkeypatch):
    import transformers

    from deft._hf import load_causal_lm
    from deft.errors import DeftError, UnsafeWeightsError

    calls = []
    orig = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: calls.append(a) or orig(*a, **k))
    with pytest.raises(UnsafeWeightsError, match=r"holds only pickle weights \(pytorch_model.bin\).*--allow-pickle") as ei:
        load_causal_lm(str(models["pickled"]), dtype=torch.float32)
    assert isinstance(ei.value, DeftError) and "\n" not in str(ei.value)
    assert calls == []  # refused before anything was unpickled
    m = load_causal_lm(str(models["pickled"]), dtype=torch.float32, allow_pickle=True)
    assert m.config.hidden_size == 16
    m = load_causal_lm(str(models["safe"]), dtype=torch.float32)  # safetensors: no opt-in needed
    assert m.config.hidden_size == 16


def test_load_policy_keeps_the_refusal(models):
    from deft.errors import UnsafeWeightsError
    from deft.evaluate import load_policy

    with pytest.raises(UnsafeWeightsError, match="pickle"):
        load_policy(str(models["pickled"]), device="cpu")
    lm, _ = load_policy(str(models["pickled"]), device="cpu", allow_pickle=True)
    assert not lm.training


def _deft(*args, cwd):
    return subprocess.run([sys.executable, "-m", "deft", *args], capture_output=True, text=True, env=dict(os.environ),
                          cwd=cwd, timeout=600)


def test_cli_eval_refuses_pickle_policy_and_allow_pickle_opts_in(models, tmp_path):
    src = shared_file("data/pro-hh/test_harmless_base.jsonl.gz")
    data = tmp_path / "test_harmless_base.jsonl"
    data.write_text("\n".join(gzip.open(src, "rt", encoding="utf-8").read().splitlines()[:2]) + "\n", encoding="utf-8")
    common = ["eval", "--model", str(models["pickled"]), "--data", str(data), "--limit", "1", "--max-new-tokens", "2",
              "--device", "cpu", "--no-progress"]
    r = _deft(*common, "--output-dir", str(tmp_path / "refused"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("error: ") and "pytorch_model.bin" in lines[-1] and "--allow-pickle" in lines[-1], r.stderr
    r = _deft(*common, "--output-dir", str(tmp_path / "allowed"), "--allow-pickle", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "allowed" / "eval.json").exists()


def test_cli_train_refuses_pickle_policy_and_allow_pickle_opts_in(models, tmp_path):
    """`deft train` stops at the model load (before any step) with one line;
    --allow-pickle (= --set allow_pickle=true) trains the same config."""
    from deft.data import load
    from deft.grade import grade

    src = shared_file("data/pro-hh/test_harmless_base.jsonl.gz")
    raw = tmp_path / "test_harmless_base.jsonl"
    raw.write_text("\n".join(gzip.open(src, "rt", encoding="utf-8").read().splitlines()[:40]) + "\n", encoding="utf-8")
    graded = tmp_path / "graded.parquet"
    grade(load(raw).frame, a=20).write_parquet(graded)
    sets = {"model": models["pickled"], "data.graded": graded, "deft.enabled": "false", "train.max_steps": 1,
            "train.micro_batch_size": 1, "train.gradient_accumulation_steps": 1, "train.progress": "false",
            "train.deepspeed": "null", "train.device": "cpu", "data.max_length": 48, "data.max_prompt_length": 32,
            "data.max_samples": 2, "method.name": "sft"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    r = _deft("train", *args, "--set", f"train.output_dir={tmp_path / 'refused'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    last = [l for l in r.stderr.splitlines() if l.strip()][-1]
    assert last.startswith("error: ") and "pytorch_model.bin" in last and "--allow-pickle" in last, r.stderr
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()
    r = _deft("train", *args, "--set", f"train.output_dir={tmp_path / 'allowed'}", "--allow-pickle", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "allowed" / "model" / "model.safetensors").exists()  # saved back as safetensors


def test_allow_pickle_config_key_and_pipeline_pass_through(tmp_path):
    from deft.config import load_config
    from deft.pipeline import TrainStage, _train_config, load_pipeline_config

    base = ["model=m", "data.graded=g", "deft.enabled=false"]
    assert load_config(None, base)["allow_pickle"] is False
    assert load_config(None, base + ["allow_pickle=true"])["allow_pickle"] is True
    cfg = load_pipeline_config(None, ["model=m", "inputs.files=[x]", "eval.enabled=false", "allow_pickle=true"])
    assert _train_config(cfg, tmp_path)["allow_pickle"] is True
    # opting in does not change what the train stage computes, so it does not invalidate it
    off = load_pipeline_config(None, ["model=m", "inputs.files=[x]", "eval.enabled=false"])
    assert TrainStage(cfg, tmp_path, {}).params() == TrainStage(off, tmp_path, {}).params()
