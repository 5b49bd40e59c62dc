"""LoRA adapters in `deft train` (``peft:``), and adapter folders in loading
and evaluation (python/deft/train.py, python/deft/_hf.py), on a tiny random
Llama with the real SmolLM2 tokenizer and PRO HH rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_train_assets, train_overrides

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_train_assets(tmp_path_factory.mktemp("lora_assets"))


def overrides(assets, out: Path, **extra):
    return train_overrides(assets, out, **{"train.lr": 1e-2, "peft.enabled": True, "peft.r": 4, "peft.alpha": 8,
                                           "peft.dropout": 0.0, **extra})


def weights(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def lora_run(assets, tmp_path_factory):
    """DEFT-DPO with a new LoRA adapter, 3 steps, a checkpoint every step, merged at the end."""
    from deft.train import run

    out = tmp_path_factory.mktemp("lora") / "run"
    res = run(None, overrides(assets, out, **{"train.max_steps": 3, "train.save_steps": 1, "train.save_total_limit": 5,
                                              "peft.merge": True, "train.ref_cache_dir": str(out.parent / "rc")}))
    return out, res


def test_only_the_adapter_is_trained_and_saved(assets, lora_run):
    out, res = lora_run
    man = json.loads((out / "manifest.json").read_text())
    pf = man["peft"]
    assert pf["r"] == 4 and pf["alpha"] == 8.0 and pf["path"] is None
    # all-linear: every projection of the tiny Llama, not the lm_head
    assert set(pf["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    model_dir = out / "model"
    names = {p.name for p in model_dir.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "deft_base.json", "tokenizer.json"} <= names
    assert "model.safetensors" not in names
    adapter = weights(model_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert sum(v.numel() for v in adapter.values()) == pf["trainable_parameters"] < pf["total_parameters"] / 10
    assert json.loads((model_dir / "deft_base.json").read_text())["base_model"] == str(assets["model"])
    # training moved the adapter: lora_B starts at zero
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)
    # checkpoints hold the adapter only, and the R_dis gradient share was measured over its parameters
    ck = out / "checkpoints" / "step-1"
    assert not (ck / "model.safetensors").exists()
    assert set(weights(ck / "adapter.safetensors")) and all("lora_" in k for k in weights(ck / "adapter.safetensors"))
    assert json.loads((ck / "trainer_state.json").read_text())["peft"] == pf
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(np.isfinite(r["R_dis"]) and r["rdis_grad_share"] > 0 for r in rows)


def test_adapter_folder_loads_as_the_trained_policy(assets, lora_run):
    """deft._hf.load_causal_lm on model/ gives base + adapter (merged), equal to
    peft's unmerged model and to merged/; the base weights are untouched."""
    from deft._hf import load_causal_lm, weights_fingerprint

    out, _ = lora_run
    ids = torch.tensor([[1, 17, 423, 9, 88, 1045, 5]])
    merged = load_causal_lm(str(out / "model"), dtype=torch.float32).eval()
    unmerged = load_causal_lm(str(out / "model"), dtype=torch.float32, merge_adapter=False).eval()
    written = load_causal_lm(str(out / "merged"), dtype=torch.float32).eval()
    base = load_causal_lm(str(assets["model"]), dtype=torch.float32).eval()
    with torch.no_grad():
        lm, lu, lw, lb = (m(input_ids=ids).logits for m in (merged, unmerged, written, base))
    torch.testing.assert_close(lm, lu, rtol=0, atol=1e-5)
    torch.testing.assert_close(lm, lw, rtol=0, atol=1e-5)
    assert float((lm - lb).abs().max()) > 1e-3  # the adapter changes the policy
    before = weights(assets["model"] / "model.safetensors")
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items() if k in before)
    # an adapter folder's fingerprint covers its base
    assert weights_fingerprint(str(out / "model")) != weights_fingerprint(str(assets["model"]))


def test_reference_is_the_model_with_the_adapter_disabled(assets, lora_run, tmp_path):
    """Continuing the trained adapter (peft.path, non-zero lora_B) computes its
    reference log-probs with the adapter disabled: equal to a full fine-tuning
    run's reference (the base model), and cached under the same key."""
    from deft.train import run

    out, _ = lora_run
    full = run(None, overrides(assets, tmp_path / "full", **{"train.max_steps": 1, "peft.enabled": False, "peft.r": 16,
                                                             "train.ref_cache_dir": str(tmp_path / "rc_full")}))
    cont = run(None, overrides(assets, tmp_path / "cont", **{"train.max_steps": 1, "peft.path": str(out / "model"),
                                                             "train.ref_cache_dir": str(tmp_path / "rc_cont")}))
    assert not full.ref_cache_hit and not cont.ref_cache_hit
    assert full.ref_cache.name == cont.ref_cache.name
    torch.testing.assert_close(weights(cont.ref_cache)["ref_logps"], weights(full.ref_cache)["ref_logps"], rtol=0, atol=1e-5)
    # the continued adapter starts from the trained one: its first step's implicit rewards are not 0
    row = json.loads((tmp_path / "cont" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(row["rewards/margins"]) > 0
    assert json.loads((tmp_path / "cont" / "manifest.json").read_text())["peft"]["path"] == str(out / "model")


@pytest.mark.slow  # three training processes
def test_resume_matches_uninterrupted(assets, tmp_path):
    """Killed after its second checkpoint, the resumed LoRA run ends with the
    same adapter as an uninterrupted one (fresh processes: one numerical environment)."""
    extra = {"train.max_steps": 4, "train.save_steps": 2, "train.ref_cache_dir": str(tmp_path / "rc"), "peft.dropout": 0.1}
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)

    def deft_train(out, *flags, code=None):
        args = [a for o in overrides(assets, out, **extra) for a in ("--set", o)]
        cmd = [sys.executable, "-m", "deft", "train", *flags, *args] if code is None else [sys.executable, "-c", code, *overrides(assets, out, **extra)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)

    r = deft_train(tmp_path / "full")
    assert r.returncode == 0, r.stderr[-3000:]
    crash = ("import sys\nimport deft.train as t\nreal = t._save_checkpoint\n"
             "def save(job, eng, state):\n    real(job, eng, state)\n    if state.global_step == 2:\n        raise SystemExit(3)\n"
             "t._save_checkpoint = save\nt.run(None, sys.argv[1:])\n")
    r = deft_train(tmp_path / "killed", code=crash)
    assert r.returncode == 3, r.stderr[-3000:]
    r = deft_train(tmp_path / "killed", "--resume")
    assert r.returncode == 0 and "step 2" in r.stderr, r.stderr[-3000:]
    a = weights(tmp_path / "full" / "model" / "adapter_model.safetensors")
    b = weights(tmp_path / "killed" / "model" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # a resume with another adapter shape is refused
    r = subprocess.run([sys.executable, "-m", "deft", "train", "--resume"] + [a for o in overrides(assets, tmp_path / "killed", **{**extra, "peft.r": 8})
                                                                             for a in ("--set", o)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "cannot resume" in r.stderr and "peft" in r.stderr


@pytest.mark.slow  # a DeepSpeed process
def test_lora_under_deepspeed_zero2_matches_the_plain_loop(assets, tmp_path):
    """ZeRO-2 with an adapter: the same first step as the plain loop, and the
    DeepSpeed checkpoint leaves out the frozen base weights."""
    from deft.train import run

    run(None, overrides(assets, tmp_path / "plain", **{"train.max_steps": 2}))
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = tmp_path / "ds"
    ov = overrides(assets, out, **{"train.deepspeed": str(REPO / "configs" / "deepspeed" / "zero2.json"), "train.max_steps": 2,
                                   "train.save_steps": 1})
    r = subprocess.run([sys.executable, "-m", "deft", "train"] + [a for o in ov for a in ("--set", o)], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    plain_row = json.loads((tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()[0])
    for k in ("loss", "L_m", "R_dis"):
        assert rows[0][k] == pytest.approx(plain_row[k], rel=1e-5, abs=1e-7), k
    ck = out / "checkpoints" / "step-1" / "ds"
    size = sum(f.stat().st_size for f in ck.rglob("*model_states.pt"))
    assert 0 < size < (assets["model"] / "model.safetensors").stat().st_size / 4
    assert (out / "model" / "adapter_model.safetensors").exists()


def test_eval_accepts_an_adapter_folder(assets, lora_run, tmp_path):
    from deft.evaluate import evaluate

    out, _ = lora_run
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(l + "\n" for l in (assets["root"] / "test_harmless_base.jsonl").read_text().splitlines()[:2]))
    rep = evaluate([str(out / "model")], [data], tmp_path / "eval", max_new_tokens=4, batch_size=2, progress=False, device="cpu")
    run = rep.runs[0]
    gens = [json.loads(l) for l in Path(run.to_dict()["files"]["generations"]).read_text().splitlines()]
    assert len(gens) == 2


def test_peft_config_errors():
    from deft.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"peft.path: set peft.enabled: true"):
        load_config(None, ["model=x", "data.graded=g", "deft.enabled=false", "peft.path=some/adapter"])
    with pytest.raises(ConfigError, match=r"peft.r: must be >= 1, got 0"):
        load_config(None, ["model=x", "data.graded=g", "deft.enabled=false", "peft.enabled=true", "peft.r=0"])
    with pytest.raises(ConfigError, match=r"peft.target_modules: expected a non-empty list"):
        load_config(None, ["model=x", "data.graded=g", "deft.enabled=false", "peft.enabled=true", "peft.target_modules=[]"])


def test_select_embeds_with_an_adapter_folder(lora_run):
    """deft select's causal-LM embedder on an adapter folder: the base model with the adapter merged,
    the same vectors as the merged model's folder."""
    from deft.select import ResponseEmbedder

    out, _ = lora_run
    ctx = [[{"role": "user", "content": "How do I bake bread?"}], [{"role": "user", "content": "Tell me a joke."}]]
    resp = ["Mix flour, water, salt and yeast, then bake.", "Why did the chicken cross the road?"]
    a = ResponseEmbedder.load(str(out / "model"), device="cpu", template="plain", max_length=64)
    b = ResponseEmbedder.load(str(out / "merged"), device="cpu", template="plain", max_length=64)
    assert a.kind == "causal" and a.identity["base_model"] and a.identity["adapter_sha256"]
    np.testing.assert_allclose(a.embed(ctx, resp), b.embed(ctx, resp), atol=1e-5)

