"""Tests of `deft train` (python/deft/train.py, python/deft/config.py) on a tiny
random Llama with the real SmolLM2 tokenizer and a graded slice of PRO's HH data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import KILL_AT_SECOND_CHECKPOINT, shared_file, tiny_train_assets, train_overrides

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama (random), graded.parquet (200 PRO-HH rows, a=20) and Q_diff."""
    return tiny_train_assets(tmp_path_factory.mktemp("train_assets"))


def overrides(assets, out: Path, **extra):
    return train_overrides(assets, out, **extra)


def load_weights(model_dir: Path):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


# --------------------------------------------------------------------------- preprocessing


def test_encode_boundary_truncation_labels_eos(assets):
    from deft._native import Tokenizer

    from deft.train import collate, encode_examples, labels_for

    tok = Tokenizer(str(assets["model"] / "tokenizer.json"))
    eos = 2
    prompt = "\n\nHuman: " + "word " * 200 + "end\n\nAssistant:"
    exs = encode_examples(["a", "b"], [prompt, "\n\nHuman: hi\n\nAssistant:"], [["good answer", "bad"], ["x " * 300, ""]],
                          [[1.0, 0.0], [2.0, 1.0]], tok, eos_token_id=eos, response_prefix=" ", max_length=64, max_prompt_length=16)
    a, b = exs
    p_full, _ = tok.encode([prompt])
    # prompt left-truncated: keeps the end ("Assistant:")
    assert a.prompt_len == 16
    assert a.input_ids[0][:16].tolist() == p_full[-16:].tolist()
    r_ids, _ = tok.encode([" good answer"])
    assert a.input_ids[0][16:].tolist() == r_ids.tolist() + [eos]
    # labels: -100 on the prompt, ids on the response incl. EOS
    lab = labels_for(a)[0]
    assert (lab[:16] == -100).all() and (lab[16:] == a.input_ids[0][16:]).all()
    # response right-truncated to fit max_length; no EOS then
    assert len(b.input_ids[0]) == 64 and b.input_ids[0][-1] != eos
    rb, _ = tok.encode([" " + "x " * 300])
    assert b.input_ids[0][b.prompt_len:].tolist() == rb[: 64 - b.prompt_len].tolist()
    # an empty response is just the prefix + EOS
    assert b.input_ids[1][b.prompt_len:].tolist() == tok.encode([" "])[0].tolist() + [eos]
    batch = collate(exs, pad_id=0)
    assert batch["input_ids"].shape == (4, 64)
    assert batch["valid"].all() and batch["row"].tolist() == [0, 0, 1, 1] and batch["col"].tolist() == [0, 1, 0, 1]
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_prepare_data_chat_template_and_selection(assets):
    from deft.config import load_config
    from deft.train import prepare_data

    cfg = load_config(None, overrides(assets, assets["root"] / "unused", **{"data.max_samples": None}))
    prep = prepare_data(cfg)
    frame = assets["frame"]
    n_a = int((frame["level"] == "A").sum())
    assert len(prep.examples) == n_a and n_a > 10
    assert prep.template == "chat"  # SmolLM2 has a chat template, and the distribution was counted with it
    ex = prep.examples[0]
    assert ex.n_responses == 2
    text = prep.policy_tokenizer.native.decode(ex.input_ids[0][: ex.prompt_len].tolist())
    assert text.endswith("<|im_start|>assistant\n")
    # a whole response ends as the chat template ends an assistant turn (ChatML: <|im_end|>, then a newline), no extra EOS
    end = prep.policy_tokenizer.native.decode(ex.input_ids[0][-2:].tolist())
    assert end == "<|im_end|>\n" or len(ex.input_ids[0]) == 96
    # all levels -> more samples; SFT keeps one response
    cfg2 = load_config(None, overrides(assets, assets["root"] / "unused", **{"data.levels": "[A, B, C]", "method.name": "sft", "data.max_samples": None}))
    prep2 = prepare_data(cfg2)
    assert len(prep2.examples) == frame.height and all(e.n_responses == 1 for e in prep2.examples)


def test_template_mismatch_refused(assets):
    from deft.config import load_config
    from deft.train import prepare_data

    cfg = load_config(None, overrides(assets, assets["root"] / "unused", **{"data.template": "plain"}))
    with pytest.raises(ValueError, match="template"):
        prepare_data(cfg)
    # chat without DEFT on a tokenizer that has no chat template (GPT-2's) is refused, naming the tokenizer
    gpt2 = str(shared_file("tokenizers/gpt2"))
    cfg = load_config(None, overrides(assets, assets["root"] / "unused", **{"data.template": "chat", "deft.enabled": "false",
                                                                             "tokenizer": gpt2}))
    with pytest.raises(ValueError, match=f"template 'chat' but the tokenizer of {gpt2} has no chat template"):
        prepare_data(cfg)


# --------------------------------------------------------------------------- config


def test_config_files_and_overrides(tmp_path):
    from deft.config import ConfigError, load_config

    cfg = load_config(REPO / "configs" / "deft-dpo.yaml", ["model=m", "data.graded=g", "deft.distribution=q"])
    assert cfg["method"]["name"] == "dpo" and cfg["train"]["lr"] == 5e-7 and cfg["deft"]["omega"] == 2.5e-6
    assert cfg["method"]["beta"] == 0.1 and cfg["data"]["max_length"] == 512 and cfg["generation"]["max_new_tokens"] == 128
    pro = load_config(REPO / "configs" / "deft-pro.yaml", ["model=m", "data.graded=g", "deft.distribution=q"])
    assert pro["train"]["lr"] == 5e-6 and pro["train"]["epochs"] == 2 and pro["method"]["sft_weight"] == 0.05 and pro["deft"]["omega"] == 2.5e-5
    for name in ("sft", "dpo", "ipo", "pro", "rrhf", "deft-rrhf"):
        c = load_config(REPO / "configs" / f"{name}.yaml", ["model=m", "data.graded=g", "deft.distribution=q"])
        assert c["deft"]["enabled"] == name.startswith("deft-")
    cfg = load_config(REPO / "configs" / "deft-dpo.yaml", ["model=m", "data.graded=g", "deft.enabled=false", "train.lr=1e-6",
                                                            "data.levels=[A,B,C]", "train.deepspeed=null", "train.max_steps=3"])
    assert cfg["deft"]["enabled"] is False and cfg["train"]["lr"] == 1e-6 and cfg["data"]["levels"] == ["A", "B", "C"]
    assert cfg["train"]["deepspeed"] is None and cfg["train"]["max_steps"] == 3
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'.*valid: .*lr"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"train.epochs: expected int"):
        load_config(None, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match=r"method.name: 'foo' is not one of"):
        load_config(None, ["method.name=foo"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["train.lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ntrain:\n  bogus: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.bogus'.*valid:"):
        load_config(bad)
    with pytest.raises(ConfigError, match="deft.distribution: required"):
        load_config(None, ["model=m", "data.graded=g"])


def test_cli_train_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "deft", "train", "--config", str(REPO / "configs" / "deft-dpo.yaml"), "--set", "train.nope=1"],
                       capture_output=True, text=True, env=dict(os.environ), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "unknown config key 'train.nope'" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- training


def test_dpo_deft_plain_loop_and_ref_cache(assets, tmp_path):
    from deft.train import run

    before = load_weights(assets["model"])
    out = tmp_path / "run"
    cache = tmp_path / "refcache"
    res = run(None, overrides(assets, out, **{"train.max_steps": 3, "train.ref_cache_dir": str(cache)}))
    assert res.global_step == 3 and not res.ref_cache_hit and res.ref_cache.exists()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        for k in ("loss", "L_m", "R_dis", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "lr", "tokens_per_s", "grad_norm"):
            assert np.isfinite(r[k]), (k, r)
        assert r["loss"] == pytest.approx(r["L_m"] - 0.5 * r["R_dis"], rel=1e-4, abs=1e-6)
    assert rows[0]["L_m"] == pytest.approx(np.log(2), abs=1e-3)  # policy == reference at the start
    after = load_weights(out / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    man = json.loads((out / "manifest.json").read_text())
    assert man["data_hash"] and man["model"]["fingerprint"] and man["config"]["method"]["name"] == "dpo"
    assert (out / "model" / "tokenizer.json").exists()
    # rerun with the same data and model: the reference log-probs come from the cache
    res2 = run(None, overrides(assets, tmp_path / "run2", **{"train.max_steps": 1, "train.ref_cache_dir": str(cache)}))
    assert res2.ref_cache_hit and res2.ref_cache == res.ref_cache
    # an existing run is not overwritten without --resume
    with pytest.raises(FileExistsError, match="--resume"):
        run(None, overrides(assets, out, **{"train.max_steps": 1, "train.ref_cache_dir": str(cache)}))


def test_reference_pass_shows_progress(assets, tmp_path, monkeypatch):
    """The reference log-prob pass (minutes for a real model on a CPU) has a bar,
    moved after each batch is computed, ending at the number of samples."""
    import tqdm.auto

    from deft.train import run

    import deft.train as train_mod

    seen, forwards = [], []
    real_forward = train_mod._forward

    def counting_forward(*a, **k):
        forwards.append(1)
        return real_forward(*a, **k)

    class Recorder(tqdm.auto.tqdm):
        def update(self, n=1):
            out = super().update(n)
            seen.append((self.desc, self.n, self.total, len(forwards)))
            return out

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    monkeypatch.setattr(train_mod, "_forward", counting_forward)
    run(None, overrides(assets, tmp_path / "run", **{"train.max_steps": 1, "train.progress": True, "data.max_samples": 6,
                                                      "train.ref_batch_size": 2}))
    ref = [(n, total, f) for desc, n, total, f in seen if desc == "reference log-probs"]
    assert ref == [(2, 6, 1), (4, 6, 2), (6, 6, 3)]  # each move after its batch's forward pass


@pytest.mark.parametrize("method", ["sft", "ipo", "pro", "rrhf"])
def test_other_methods_one_step(assets, tmp_path, method):
    from deft.train import run

    res = run(None, overrides(assets, tmp_path / method, **{"method.name": method, "train.max_steps": 1,
                                                           "train.gradient_accumulation_steps": 1}))
    assert res.global_step == 1 and np.isfinite(res.last_metrics["loss"]) and np.isfinite(res.last_metrics["R_dis"])


def test_baseline_without_deft(assets, tmp_path):
    from deft.train import run

    res = run(None, overrides(assets, tmp_path / "base", **{"deft.enabled": False, "deft.distribution": None, "train.max_steps": 1}))
    assert "R_dis" not in res.last_metrics and res.last_metrics["loss"] == res.last_metrics["L_m"]


def test_tensorboard_logging(assets, tmp_path):
    """train.tensorboard: the JSONL metrics also go to TensorBoard event files."""
    pytest.importorskip("tensorboard")  # in the [test] extra
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from deft.train import run

    out = tmp_path / "tb"
    run(None, overrides(assets, out, **{"train.max_steps": 2, "train.tensorboard": True}))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert {"train/loss", "train/R_dis", "train/lr", "rewards/margins"} <= set(tags)
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def _deepspeed_available():
    try:
        import deepspeed  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.fixture(scope="module")
def plain_two_steps(assets, tmp_path_factory):
    """Two DEFT-DPO steps of the plain PyTorch loop: the reference the DeepSpeed runs are held to."""
    from deft.train import run

    out = tmp_path_factory.mktemp("plain") / "run"
    run(None, overrides(assets, out, **{"train.max_steps": 2}))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, load_weights(out / "model")


@pytest.mark.skipif(not _deepspeed_available(), reason="deepspeed not installed")
@pytest.mark.parametrize("zero", ["zero0", "zero1", "zero2", "zero3", "zero3-offload"])
def test_dpo_deft_deepspeed_cpu(assets, tmp_path, zero, plain_two_steps):
    """Every shipped DeepSpeed config (ZeRO 0-3, 3 + CPU offload) in one CPU
    process without a launcher (gloo) computes what the plain loop computes:
    the same step-1 loss, L_m and R_dis (under ZeRO-3 the lm_head weight is
    partitioned and R_dis goes through the module), and weights that stay close
    after two steps; the saved model is whole (ZeRO-3 gathers it)."""
    env = dict(os.environ)  # subprocesses import the same deft as this test
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = tmp_path / "ds"
    ov = overrides(assets, out, **{"train.deepspeed": str(REPO / "configs" / "deepspeed" / f"{zero}.json"), "train.max_steps": 2,
                                   "train.save_steps": 1, "train.save_total_limit": 1})
    cmd = [sys.executable, "-m", "deft", "train"] + [a for o in ov for a in ("--set", o)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(x["loss"]) and np.isfinite(x["R_dis"]) for x in rows)
    assert all(np.isfinite(x["grad_norm"]) and x["grad_norm"] > 0 for x in rows)
    ref_rows, ref_w = plain_two_steps
    for k in ("loss", "L_m", "R_dis", "rewards/margins"):
        assert rows[0][k] == pytest.approx(ref_rows[0][k], rel=1e-5, abs=1e-7), (k, rows[0][k], ref_rows[0][k])
    assert rows[0]["grad_norm"] == pytest.approx(ref_rows[0]["grad_norm"], rel=1e-4)
    before, after = load_weights(assets["model"]), load_weights(out / "model")
    assert sorted(after) == sorted(before)
    for k in before:
        assert after[k].shape == before[k].shape, k  # not a ZeRO-3 shard
        torch.testing.assert_close(after[k], ref_w[k], rtol=0, atol=1e-5)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    ck = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ck == ["step-1"]  # saved at step 1, not at the last step; keep 1


@pytest.mark.slow  # two processes, ~20-30 s each on a shared 2-core CPU
@pytest.mark.skipif(not _deepspeed_available(), reason="deepspeed not installed")
@pytest.mark.parametrize("launcher,zero", [("torchrun", "zero2"), ("torchrun", "zero3"), ("deepspeed", "zero2")])
def test_deepspeed_two_processes(assets, tmp_path, launcher, zero, plain_two_steps):
    """`torchrun --nproc_per_node 2 -m deft train` and `deepspeed --num_gpus 2
    --module deft train` (which passes --local_rank=N before the subcommand),
    gloo on CPU: 2 ranks x 2 samples see the same 4 samples per step as one
    process with gradient accumulation 2, so the metrics (averaged across ranks)
    and the weights match the plain loop; only rank 0 writes."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = tmp_path / "mp"
    ov = overrides(assets, out, **{"train.deepspeed": str(REPO / "configs" / "deepspeed" / f"{zero}.json"), "train.max_steps": 2,
                                   "train.gradient_accumulation_steps": 1, "train.save_steps": 1})
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "-m", "deft", "train"]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port), "--module", "deft", "train"]
    cmd += [a for o in ov for a in ("--set", o)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    assert "world 2" in r.stderr
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2]  # one writer
    ref_rows, ref_w = plain_two_steps
    for k in ("loss", "L_m", "R_dis", "rewards/margins"):
        assert rows[0][k] == pytest.approx(ref_rows[0][k], rel=1e-5, abs=1e-7), (k, rows[0][k], ref_rows[0][k])
    after = load_weights(out / "model")
    for k in ref_w:
        assert after[k].shape == ref_w[k].shape, k
        torch.testing.assert_close(after[k], ref_w[k], rtol=0, atol=1e-5)
    ck = out / "checkpoints" / "step-1"  # the last step is not checkpointed: the model is saved
    assert sorted(p.name for p in ck.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]


KILLER = KILL_AT_SECOND_CHECKPOINT + "t.run(None, sys.argv[1:])\n"


@pytest.mark.slow  # four fresh processes: ~60-100 s on a shared 2-core CPU
def test_resume_after_kill_matches_uninterrupted(assets, tmp_path):
    """kill -9 while the second checkpoint is being published, --resume, and
    compare with an uninterrupted run (all three runs in fresh processes, so
    they share one numerical environment): bitwise the same weights."""
    from deft.train import list_checkpoints

    extra = {"train.max_steps": 7, "train.save_steps": 3, "train.save_total_limit": 2, "train.ref_cache_dir": str(tmp_path / "rc"),
             "train.scheduler": "cosine"}  # 4 steps per epoch: the resumed run restarts mid-epoch and crosses into epoch 1
    env = dict(os.environ)  # subprocesses import the same deft as this test

    def deft_train(out, *flags):
        cmd = [sys.executable, "-m", "deft", "train", *flags] + [a for o in overrides(assets, out, **extra) for a in ("--set", o)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    deft_train(tmp_path / "full")
    out = tmp_path / "killed"
    r = subprocess.run([sys.executable, "-c", KILLER] + overrides(assets, out, **extra), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert [s for s, _ in list_checkpoints(out)] == [3]
    assert any(p.name.startswith(".tmp-step-6") for p in (out / "checkpoints").iterdir())  # the half-published one
    assert not (out / "model").exists()
    r = deft_train(out, "--resume")
    assert "resumed from" in r.stderr and "step 3" in r.stderr
    a, b = load_weights(tmp_path / "full" / "model"), load_weights(out / "model")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))
    assert [s for s, _ in list_checkpoints(out)] == [3, 6]
    assert not any(p.name.startswith(".tmp") for p in (out / "checkpoints").iterdir())


KILL_AFTER_STEP_2 = textwrap.dedent("""
    import os, signal, sys
    import deft.io as io
    orig = io.MetricsLog.log
    def log(self, **fields):
        orig(self, **fields)
        if fields.get("step") == 2:  # killed after logging step 2, before the first checkpoint (step 3)
            os.kill(os.getpid(), signal.SIGKILL)
    io.MetricsLog.log = log
    import deft.train as t
    t.run(None, sys.argv[1:])
""")


def test_resume_before_the_first_checkpoint_starts_metrics_over(assets, tmp_path):
    """--resume of a run killed before its first checkpoint starts over, and
    metrics.jsonl holds each step once, as an uninterrupted run's does (issue 10, item 7)."""
    from deft.train import list_checkpoints, run

    extra = {"train.max_steps": 4, "train.save_steps": 3, "train.ref_cache_dir": str(tmp_path / "rc")}
    env = dict(os.environ)
    out = tmp_path / "killed"
    r = subprocess.run([sys.executable, "-c", KILL_AFTER_STEP_2] + overrides(assets, out, **extra), env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert list_checkpoints(out) == []
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    res = run(None, overrides(assets, out, **extra), resume=True)
    assert res.resumed_from is None and res.global_step == 4
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    full = run(None, overrides(assets, tmp_path / "full", **extra))
    assert steps == [json.loads(l)["step"] for l in (full.output_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_resume_with_another_loss_is_refused(assets, tmp_path):
    """The paired methods share the tokenised data (and its hash): a resume after changing the method or a
    loss setting would go on with another objective, so it is refused in one line naming the keys; a
    checkpoint from before the method record resumes unchecked."""
    from deft.train import list_checkpoints, run

    out = tmp_path / "run"
    extra = {"method.name": "simpo", "method.beta": 2.0, "method.gamma": 0.5, "train.max_steps": 2, "train.save_steps": 1}
    run(None, overrides(assets, out, **extra))
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint.*: it was trained with another loss \(method.gamma 0.5 -> 1.0\)$"):
        run(None, overrides(assets, out, **{**extra, "method.gamma": 1.0, "train.max_steps": 3}), resume=True)
    with pytest.raises(ValueError, match=r"another loss \(method.beta 2.0 -> 0.1, method.gamma 0.5 -> null, method.name \"simpo\" -> \"cpo\", method.sft_weight 0.0 -> 1.0\)$"):
        run(None, overrides(assets, out, **{**extra, "method.name": "cpo", "method.beta": 0.1, "train.max_steps": 3}), resume=True)
    res = run(None, overrides(assets, out, **{**extra, "train.max_steps": 3}), resume=True)  # the same loss resumes
    assert res.resumed_from == 1 and res.global_step == 3
    step, ck = list_checkpoints(out)[-1]
    state = json.loads((ck / "trainer_state.json").read_text())
    assert step == 2 and state["method"] == {"name": "simpo", "beta": 2.0, "gamma": 0.5, "label_smoothing": 0.0, "sft_weight": 0.0}
    del state["method"]  # as written before the record existed
    (ck / "trainer_state.json").write_text(json.dumps(state))
    res = run(None, overrides(assets, out, **{**extra, "method.gamma": 1.0, "train.max_steps": 4}), resume=True)
    assert res.resumed_from == 2 and res.global_step == 4

class _RunsCode:
    """Unpickling this runs ``touch PATH`` (what weights_only=True must refuse)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_resume_refuses_an_unsafe_optimizer_pickle_in_one_line(assets, tmp_path):
    """A malicious optimizer.pt in the newest checkpoint: torch.load(weights_only=True)
    blocks it, and `deft train --resume` says so in one line naming the file, exit 2 (issue 10, item 6)."""
    import pickle

    from deft.train import list_checkpoints, run

    out = tmp_path / "run"
    extra = {"train.max_steps": 2, "train.save_steps": 1, "train.ref_cache_dir": str(tmp_path / "rc")}
    run(None, overrides(assets, out, **extra))
    (_, ck), = list_checkpoints(out)  # step 1 (none is written at the last step)
    marker = tmp_path / "pwned"
    (ck / "optimizer.pt").write_bytes(pickle.dumps(_RunsCode(marker)))
    cmd = [sys.executable, "-m", "deft", "train", "--resume"] + [a for o in overrides(assets, out, **extra) for a in ("--set", o)]
    r = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not marker.exists()
    last = r.stderr.rstrip().splitlines()[-1]
    assert last.startswith("error: checkpoint ") and str(ck / "optimizer.pt") in last and "unsafe to load" in last, r.stderr[-2000:]
