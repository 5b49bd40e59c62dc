"""Monitoring of `deft train` (issue 14, item 6): train.report_to (TensorBoard,
W&B offline, the MLflow file store) with metrics.jsonl's names, the eval split
evaluated during training (train.eval_data / eval_holdout / eval_steps), resume
without repeated rows, and OUTPUT_DIR/curves.png. Tiny random Llama, a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_train_assets

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    a = tiny_train_assets(tmp_path_factory.mktemp("monitor_assets"))
    ev = a["root"] / "eval.parquet"  # rows the runs below do not train on (they take the first 16 of level A)
    a["frame"].slice(150, 6).write_parquet(ev)
    a["eval"] = ev
    return a


def overrides(assets, out: Path, **extra):
    base = {
        "model": str(assets["model"]), "data.graded": str(assets["graded"]), "data.max_length": 96, "data.max_prompt_length": 64,
        "deft.enabled": False, "train.output_dir": str(out), "train.micro_batch_size": 2, "train.gradient_accumulation_steps": 1,
        "train.lr": 1e-3, "train.warmup_steps": 0, "train.progress": False, "train.deepspeed": None, "train.save_steps": 0,
        "data.max_samples": 8, "train.eval_data": str(assets["eval"]), "train.eval_batch_size": 2,
        "train.ref_cache_dir": str(out.parent / "rc"),
    }
    base.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()]


def rows_of(out: Path):
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval/accuracy" in r]


def reported_names(rows):
    from deft.reporting import metric_name

    return {metric_name(k) for r in rows for k, v in r.items() if k not in ("step", "time") and isinstance(v, (int, float))}


# --------------------------------------------------------------------------- config


def test_missing_backend_and_eval_without_split_are_config_errors(monkeypatch, tmp_path):
    import importlib.util

    from deft.config import ConfigError, load_config

    base = ["model=m", "data.graded=g.parquet", "deft.enabled=false"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.report_to: wandb needs the wandb package.*pip install wandb"):
        load_config(None, base + ["train.report_to=[tensorboard, wandb]"])
    with pytest.raises(ConfigError, match="not one of tensorboard, wandb, mlflow"):
        load_config(None, base + ["train.report_to=[neptune]"])
    with pytest.raises(ConfigError, match="train.eval_steps: set train.eval_data or train.eval_holdout"):
        load_config(None, base + ["train.eval_steps=5"])
    with pytest.raises(ConfigError, match="eval_holdout"):
        load_config(None, base + ["train.eval_holdout=1.5"])
    cfg = load_config(None, base + ["train.report_to=tensorboard", "train.eval_holdout=0.1", "train.eval_steps=5"])
    assert cfg["train"]["report_to"] == ["tensorboard"]
    from deft.reporting import requested_backends

    assert requested_backends({"report_to": [], "tensorboard": True}) == ["tensorboard"]  # the deprecated alias
    assert requested_backends({"report_to": ["tensorboard", "mlflow"], "tensorboard": True}) == ["tensorboard", "mlflow"]


# --------------------------------------------------------------------------- eval split, TensorBoard, plot


def _pair_logps(cfg, template, frame, model_dir):
    """Summed log-probs of (best, worst) of each row, computed here as `deft experiment` does (one batch, float32)."""
    from transformers import AutoModelForCausalLM

    from deft.losses import response_logprobs
    from deft.train import collate, frame_examples, policy_tokenizers, to_slots

    hf_tok, ptok = policy_tokenizers(cfg)
    exs = frame_examples(cfg, frame, template, hf_tok, ptok, method="dpo")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    batch = collate(exs, hf_tok.pad_token_id if hf_tok.pad_token_id is not None else hf_tok.eos_token_id)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        lp, n = response_logprobs(out.logits.float(), batch["labels"])
    return to_slots(lp.double(), batch).numpy(), to_slots(n, batch, 0).numpy()


def test_eval_split_tensorboard_and_curves(assets, tmp_path):
    """DPO, 3 steps, eval every 2: eval rows at steps 0, 2 and 3 (the end); at
    step 0 the policy is its reference, so every margin is 0, every pair a tie
    and the accuracy exactly 0.5 (the DPO loss log 2); the last row's margin is
    what the saved model gives, computed independently; TensorBoard holds
    exactly metrics.jsonl's names; curves.png is written."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from deft.config import load_config
    from deft.train import run

    out = tmp_path / "run"
    ov = overrides(assets, out, **{"train.max_steps": 3, "train.eval_steps": 2, "train.report_to": ["tensorboard"]})
    res = run(None, ov)
    train_rows, ev = rows_of(out)
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert [r["step"] for r in ev] == [0, 2, 3]
    e0 = ev[0]
    assert e0["eval/accuracy"] == 0.5 and e0["eval/margin"] == 0.0
    assert e0["eval/chosen_reward"] == 0.0 and e0["eval/rejected_reward"] == 0.0
    assert e0["eval/loss"] == pytest.approx(np.log(2), abs=1e-12)
    assert ev[-1]["eval/margin"] != 0.0 and ev[-1]["eval/accuracy"] in {x / 12 for x in range(13)}  # 6 pairs, ties count 1/2
    # the last eval row is the saved model's, against the initial one, computed independently
    man = json.loads((out / "manifest.json").read_text())
    cfg = load_config(None, ov)
    import polars as pl

    frame = pl.read_parquet(assets["eval"])
    (pol, n), (ref, _) = _pair_logps(cfg, man["template"], frame, res.model_dir), _pair_logps(cfg, man["template"], frame, assets["model"])
    margin = 0.1 * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
    assert ev[-1]["eval/margin"] == pytest.approx(margin.mean(), rel=1e-3, abs=1e-5)
    assert ev[-1]["eval/nll"] == pytest.approx(np.mean(-pol[:, 0] / n[:, 0]), rel=1e-4)
    assert man["eval"]["pairs"] == 6 and man["reporting"]["tensorboard"]
    # TensorBoard: the same names as metrics.jsonl, at the same steps
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert tags == reported_names(train_rows + ev)
    assert {"train/loss", "rewards/margins", "eval/accuracy", "eval/margin"} <= tags
    assert [(s.step, s.value) for s in ea.Scalars("eval/accuracy")] == [(r["step"], pytest.approx(r["eval/accuracy"])) for r in ev]
    assert [s.step for s in ea.Scalars("train/loss")] == [1, 2, 3]
    png = out / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and man["outputs"]["curves"] == str(png)


def test_eval_holdout_sft(assets, tmp_path):
    """train.eval_holdout alone: a fraction of the training prompts is the eval
    split and is not trained on; SFT's reference is the initial policy too (0.5 at step 0)."""
    from deft.train import prepare_data, run
    from deft.config import load_config

    ov = overrides(assets, tmp_path / "sft", **{"method.name": "sft", "train.eval_data": None, "train.eval_holdout": 0.2,
                                                "train.eval_max_samples": 4, "train.max_steps": 1})
    cfg = load_config(None, ov)
    prep = prepare_data(cfg)
    train_ids = {e.id for e in prep.examples}
    assert len(prep.eval_examples) == 4 and not train_ids & {e.id for e in prep.eval_examples}
    run(None, ov)
    _, ev = rows_of(tmp_path / "sft")
    assert [r["step"] for r in ev] == [0, 1] and ev[0]["eval/accuracy"] == 0.5 and ev[0]["eval/margin"] == 0.0
    assert ev[0]["eval/loss"] == pytest.approx(ev[0]["eval/nll"], rel=0.5)  # token- vs sequence-averaged NLL


# --------------------------------------------------------------------------- MLflow and resume


def test_mlflow_file_store_and_resume_without_repeated_rows(assets, tmp_path, monkeypatch):
    """report_to [tensorboard, mlflow] with the file store under OUTPUT_DIR/mlruns;
    then --resume from the step-2 checkpoint: metrics.jsonl, TensorBoard and the
    (same) MLflow run hold each step once."""
    pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from mlflow.tracking import MlflowClient

    from deft.train import run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "ml"
    ov = overrides(assets, out, **{"train.max_steps": 3, "train.save_steps": 2, "train.eval_steps": 1,
                                   "train.report_to": ["tensorboard", "mlflow"]})
    run(None, ov)
    first = json.loads((out / "reporting.json").read_text())["mlflow"]
    assert first["tracking_uri"] == (out / "mlruns").resolve().as_uri()
    res = run(None, ov, resume=True)
    assert res.resumed_from == 2
    train_rows, ev = rows_of(out)
    assert [r["step"] for r in train_rows] == [1, 2, 3] and [r["step"] for r in ev] == [0, 1, 2, 3]
    rec = json.loads((out / "reporting.json").read_text())["mlflow"]
    assert rec == first  # the same run, continued
    client = MlflowClient(tracking_uri=rec["tracking_uri"])
    r = client.get_run(rec["run_id"])
    assert r.info.status == "FINISHED"
    assert set(r.data.metrics) == reported_names(train_rows + ev)
    assert r.data.params["method.name"] == "dpo"
    assert sorted(m.step for m in client.get_metric_history(rec["run_id"], "train/loss")) == [1, 2, 3]
    acc = client.get_metric_history(rec["run_id"], "eval/accuracy")
    assert sorted(m.step for m in acc) == [0, 1, 2, 3]
    assert [m.value for m in sorted(acc, key=lambda m: m.step)][0] == 0.5
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    assert [s.step for s in ea.Scalars("eval/accuracy")] == [0, 1, 2, 3]
    assert [s.step for s in ea.Scalars("train/loss")] == [1, 2, 3]


# --------------------------------------------------------------------------- W&B offline


def test_wandb_offline_run(assets, tmp_path, monkeypatch):
    """report_to [wandb] with WANDB_MODE=offline: every row goes to run.log at
    its step under metrics.jsonl's names, and the offline run folder's log
    (run-ID.wandb) holds those names and the training config."""
    wandb = pytest.importorskip("wandb")
    from deft.train import run

    wdir = tmp_path / "wandb-home"
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(wdir), "WANDB_CONFIG_DIR": str(wdir / "config"),
                 "WANDB_CACHE_DIR": str(wdir / "cache"), "WANDB_DATA_DIR": str(wdir / "data"), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(k, v)
    logged, real_init = [], wandb.init

    def init(*a, **k):
        r = real_init(*a, **k)
        real_log = r.log
        r.log = lambda data, step=None, **kw: (logged.append((step, dict(data))), real_log(data, step=step, **kw))[1]
        return r

    monkeypatch.setattr(wandb, "init", init)
    out = tmp_path / "wb"
    run(None, overrides(assets, out, **{"train.max_steps": 2, "train.eval_steps": 1, "train.report_to": ["wandb"]}))
    train_rows, ev = rows_of(out)
    from deft.reporting import metric_name

    expect = [(r["step"], {metric_name(k): v for k, v in r.items() if k not in ("step", "time") and v is not None}) for r in
              [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]]
    assert [s for s, _ in logged] == [0, 1, 1, 2, 2] == [s for s, _ in expect]
    for (s, got), (_, want) in zip(logged, expect):
        assert got == pytest.approx(want), s
    rec = json.loads((out / "reporting.json").read_text())["wandb"]
    assert rec["mode"] == "offline"
    runs = list((wdir / "wandb").glob(f"offline-run-*-{rec['id']}"))
    assert len(runs) == 1, list((wdir / "wandb").iterdir())
    blob = (runs[0] / f"run-{rec['id']}.wandb").read_bytes()
    for name in reported_names(train_rows + ev):
        assert name.encode() in blob, name
    assert b"label_smoothing" in blob  # the config


# --------------------------------------------------------------------------- DeepSpeed


def test_eval_split_under_deepspeed_zero3(assets, tmp_path):
    """The eval split under DeepSpeed ZeRO-3 (one CPU process, gloo; the
    forwards of the partitioned model in lockstep): the same eval rows as
    the plain loop, 0.5 before training."""
    pytest.importorskip("deepspeed")
    import os
    import subprocess
    import sys

    from deft.train import run

    repo = Path(__file__).resolve().parents[1]
    extra = {"train.max_steps": 2, "train.eval_steps": 1}
    run(None, overrides(assets, tmp_path / "plain", **extra))
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    ov = overrides(assets, tmp_path / "ds", **extra, **{"train.deepspeed": str(repo / "configs" / "deepspeed" / "zero3.json"),
                                                           "train.ref_cache_dir": str(tmp_path / "rc-ds")})
    r = subprocess.run([sys.executable, "-m", "deft", "train"] + [a for o in ov for a in ("--set", o)], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _, ev = rows_of(tmp_path / "ds")
    _, ref = rows_of(tmp_path / "plain")
    assert [e["step"] for e in ev] == [0, 1, 2] and ev[0]["eval/accuracy"] == 0.5 and ev[0]["eval/margin"] == 0.0
    for a, b in zip(ev, ref):
        for k in ("eval/accuracy", "eval/margin", "eval/nll", "eval/loss"):
            # after two ZeRO-3 updates the weights differ from the plain loop's by ~1e-6 (test_train allows 1e-5)
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-6), (a["step"], k)
