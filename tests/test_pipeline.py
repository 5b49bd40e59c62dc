"""Tests of `deft run` (python/deft/pipeline.py): the shipped pipeline configs,
and a whole run on a small slice of real HH data with a tiny random Llama,
killed mid-training and resumed to the same final artifacts."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import KILL_AT_SECOND_CHECKPOINT, save_tiny_llama, shared_file

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["hh-deft-dpo", "hh-dpo", "hh-deft-pro", "hh-pro", "hh-deft-dpo-all-levels", "hh-deft-dpo-no-rdis", "demo-smollm2"]


def test_shipped_pipeline_configs():
    from deft.pipeline import load_pipeline_config

    got = {n: load_pipeline_config(str(REPO / "configs" / "pipeline" / f"{n}.yaml"), ["model=some/model"]) for n in SHIPPED}
    assert (got["hh-deft-dpo"]["method"]["name"], got["hh-deft-dpo"]["deft"]["enabled"], got["hh-deft-dpo"]["data"]["levels"]) == ("dpo", True, ["A"])
    assert got["hh-deft-dpo"]["deft"]["omega"] == 2.5e-6 and got["hh-deft-dpo"]["train"]["lr"] == 5e-7
    assert got["hh-dpo"]["deft"]["enabled"] is False and got["hh-dpo"]["data"]["levels"] == ["A", "B", "C"]
    assert (got["hh-deft-pro"]["method"]["name"], got["hh-deft-pro"]["deft"]["omega"], got["hh-deft-pro"]["train"]["lr"],
            got["hh-deft-pro"]["train"]["epochs"]) == ("pro", 2.5e-5, 5e-6, 2)
    assert got["hh-pro"]["deft"]["enabled"] is False and got["hh-pro"]["method"]["name"] == "pro"
    assert got["hh-deft-dpo-all-levels"]["data"]["levels"] == ["A", "B", "C"] and got["hh-deft-dpo-all-levels"]["deft"]["enabled"]
    assert got["hh-deft-dpo-no-rdis"]["deft"]["omega"] == 0.0 and got["hh-deft-dpo-no-rdis"]["data"]["levels"] == ["A"]
    assert len({c["run_dir"] for c in got.values()}) == len(SHIPPED)
    # Table A.1's SFT weight 5e-2 for DEFT-DPO and its ablations; plain DPO has none (null: the method's default, 0)
    from deft.config import sft_weight

    assert [sft_weight(got[n]["method"]) for n in ("hh-deft-dpo", "hh-deft-dpo-all-levels", "hh-deft-dpo-no-rdis")] == [0.05] * 3
    assert got["hh-dpo"]["method"]["sft_weight"] is None and sft_weight(got["hh-dpo"]["method"]) == 0.0
    assert sft_weight(got["hh-pro"]["method"]) == 0.05 and sft_weight(got["hh-deft-pro"]["method"]) == 0.05


def test_shipped_experiment_configs():
    from deft.experiment import load_experiment_config, parse_arms

    for name in ("hh-mini-cpu", "demo-cpu", "hh-paper"):
        cfg = load_experiment_config(str(REPO / "configs" / "experiments" / f"{name}.yaml"), ["model=some/model"])
        arms = {a.name: a for a in parse_arms(cfg["experiment"]["arms"])}
        assert arms["base"].base and cfg["experiment"]["baseline"] in arms
    mini = load_experiment_config(str(REPO / "configs" / "experiments" / "hh-mini-cpu.yaml"))
    arms = {a.name: dict(a.set) for a in parse_arms(mini["experiment"]["arms"])}
    assert len(mini["experiment"]["seeds"]) >= 3
    assert arms["dpo-A"] == {"deft.enabled": False} and arms["no-rdis"] == {"deft.enabled": False, "method.sft_weight": 0.05}
    assert arms["deft-dpo-paper"]["deft.omega"] == 2.5e-6
    assert {arms[n]["deft.omega_share"] for n in ("deft-dpo-share0.1", "deft-dpo-share0.5")} == {0.1, 0.5}


def test_pipeline_config_errors(tmp_path):
    from deft.config import ConfigError
    from deft.pipeline import load_pipeline_config

    cfg = str(REPO / "configs" / "pipeline" / "hh-deft-dpo.yaml")
    with pytest.raises(ConfigError, match="model: required"):
        load_pipeline_config(cfg)
    with pytest.raises(ConfigError, match="unknown config key 'grade.alpha'"):
        load_pipeline_config(cfg, ["model=m", "grade.alpha=3"])
    with pytest.raises(ConfigError, match="eval.files: required"):
        load_pipeline_config(cfg, ["model=m", "eval.files=[]"])
    with pytest.raises(ConfigError, match="train.lr: must be positive"):
        load_pipeline_config(cfg, ["model=m", "train.lr=0"])  # the train keys are checked as `deft train` checks them
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ninputs:\n  files: [x.jsonl]\nselect:\n  strategy: hardest\n")
    with pytest.raises(ConfigError, match=r"select.strategy: 'hardest' is not one of easy, hard, random, centroid"):
        load_pipeline_config(str(bad))
    r = subprocess.run([sys.executable, "-m", "deft", "run", "--config", cfg, "--set", "model=m", "--from", "training"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "--from 'training': not a stage" in r.stderr


# --------------------------------------------------------------------------- a whole run


@pytest.fixture(scope="module")
def slice_assets(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer, 120 PRO harmless-base
    rows (their stored OpenAssistant RM scores grade them) and 3 helpful-base
    test rows."""
    root = tmp_path_factory.mktemp("pipeline_assets")
    model_dir = save_tiny_llama(root / "tiny-llama", max_position_embeddings=512)
    files = {}
    for name, n in (("test_harmless_base", 120), ("test_helpful_base", 3)):
        lines = gzip.open(shared_file(f"data/pro-hh/{name}.jsonl.gz"), "rt", encoding="utf-8").read().splitlines()[:n]
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"model": model_dir, "train": files["test_harmless_base"], "test": files["test_helpful_base"]}


def _sets(a, run_dir: Path, **extra):
    base = {
        "run_dir": str(run_dir), "model": str(a["model"]),
        "inputs.files": [str(a["train"])], "grade.use_input_scores": True, "grade.a": 20,
        "data.max_length": 96, "data.max_prompt_length": 64, "data.max_samples": 12,
        "deft.omega": 0.5, "train.lr": 1e-3, "train.micro_batch_size": 2, "train.gradient_accumulation_steps": 2,
        "train.warmup_steps": 1, "train.deepspeed": None, "train.save_steps": 1, "train.save_total_limit": 2,
        "train.progress": False,
        "generation.max_new_tokens": 6, "eval.files": [str(a["test"])], "eval.reward_model": "builtin", "eval.batch_size": 2,
    }
    base.update(extra)
    out = []
    for k, v in base.items():
        out += ["--set", f"{k}={v if isinstance(v, str) else json.dumps(v)}"]
    return out


KILLER = KILL_AT_SECOND_CHECKPOINT + "from deft.cli import main\nsys.argv = [\"deft\", \"run\"] + sys.argv[1:]\nmain()\n"


def _deft_run(args, cwd):
    r = subprocess.run([sys.executable, "-m", "deft", "run", *args], capture_output=True, text=True, cwd=cwd, timeout=900,
                       env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-4000:] + r.stdout[-2000:]
    return r


def _stage_actions(stdout: str):
    return {line.split(":")[0].strip(): line.split(":")[1].split("(")[0].strip()
            for line in stdout.splitlines() if line.split(":")[0].strip() in ("select", "grade", "distribution", "train", "eval")}


@pytest.mark.slow  # four `deft run` processes: ~1-2 minutes on a shared 2-core CPU
def test_pipeline_run_kill_resume_same_artifacts(slice_assets, tmp_path):
    from safetensors.torch import load_file

    from deft.train import list_checkpoints

    full = tmp_path / "full"
    r = _deft_run(_sets(slice_assets, full), tmp_path)
    assert _stage_actions(r.stdout) == {"grade": "ran", "distribution": "ran", "train": "ran", "eval": "ran"}
    for rel in ("grade/graded.parquet", "distribution/qdiff.safetensors", "train/model/model.safetensors", "eval/eval.json",
                "eval/eval.md", "report.md", "train_curves.png"):
        assert (full / rel).exists(), rel
    for st in ("grade", "distribution", "train", "eval"):
        assert json.loads((full / st / "stage.json").read_text())["status"] == "done"
    report = (full / "report.md").read_text()
    for heading in ("## Grading", "## Discrepancy distribution", "## Training", "## Evaluation"):
        assert heading in report
    assert "deft-dpo" in report and "base" in report and "helpful" in report
    assert "per subset:" not in report and ("subsets graded together" in report or "subset graded on its own" in report)
    assert "tie when the rewards differ by at most 1 point)" in report  # not "1 points"
    card = (full / "train/model/README.md").read_text()  # the model card, with the eval stage's results
    assert "model-index:\n- name: deft-dpo\n" in card and str(full / "eval" / "eval.json") in card and "deft run" in card

    # killed while training, then the same command again: train resumes, the rest follows
    killed = tmp_path / "killed"
    k = subprocess.run([sys.executable, "-c", KILLER, *_sets(slice_assets, killed)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=900, env=dict(os.environ))
    assert k.returncode == -signal.SIGKILL, k.stderr[-3000:]
    assert json.loads((killed / "train" / "stage.json").read_text())["status"] == "running"
    assert [s for s, _ in list_checkpoints(killed / "train")] == [1]
    assert not (killed / "eval").exists()
    r = _deft_run(_sets(slice_assets, killed), tmp_path)
    assert _stage_actions(r.stdout) == {"grade": "skipped", "distribution": "skipped", "train": "resumed", "eval": "ran"}
    assert "resumed from" in r.stderr

    a, b = load_file(str(full / "train/model/model.safetensors")), load_file(str(killed / "train/model/model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    ea, eb = json.loads((full / "eval/eval.json").read_text()), json.loads((killed / "eval/eval.json").read_text())
    assert json.dumps(ea["runs"], sort_keys=True).replace(str(full), "RUN") == json.dumps(eb["runs"], sort_keys=True).replace(str(killed), "RUN")
    assert (full / "eval/eval.md").read_text() == (killed / "eval/eval.md").read_text()

    # nothing to do the third time; a changed training parameter redoes train and eval only
    r = _deft_run(_sets(slice_assets, killed), tmp_path)
    assert set(_stage_actions(r.stdout).values()) == {"skipped"}
    d = subprocess.run([sys.executable, "-m", "deft", "run", "--dry-run", *_sets(slice_assets, killed, **{"deft.omega": 0.25})],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert d.returncode == 0, d.stderr[-3000:]
    plan = {line.split()[0]: line.split()[1] for line in d.stdout.splitlines() if line.strip()}
    assert plan == {"select": "disabled", "grade": "skip", "distribution": "skip", "train": "run", "eval": "run"}
    d = subprocess.run([sys.executable, "-m", "deft", "run", "--dry-run", "--from", "distribution", *_sets(slice_assets, killed)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    plan = {line.split()[0]: line.split()[1] for line in d.stdout.splitlines() if line.strip()}
    assert plan == {"select": "disabled", "grade": "skip", "distribution": "run", "train": "run", "eval": "run"}


@pytest.mark.slow  # MiniLM embeddings + one training step: ~30 s on a shared 2-core CPU
def test_pipeline_with_select_and_no_eval(slice_assets, tmp_path):
    """select.enabled puts REAL selection before grading (its output is what is
    graded and trained on); eval.enabled: false stops after training."""
    import polars as pl

    from deft.config import ConfigError
    from deft.pipeline import load_pipeline_config, run_pipeline

    sets = _sets(slice_assets, tmp_path / "run", **{"select.enabled": True, "select.strategy": "hard", "select.fraction": 0.5,
                                                     "eval.enabled": False, "eval.files": [], "train.max_steps": 1,
                                                     "data.max_samples": 4})
    cfg = load_pipeline_config(None, [s for s in sets if s != "--set"])
    res = run_pipeline(cfg)
    assert [(r.name, r.action) for r in res.stages] == [("select", "ran"), ("grade", "ran"), ("distribution", "ran"),
                                                       ("train", "ran"), ("eval", "disabled")]
    selected = pl.read_parquet(tmp_path / "run/select/selected.parquet")
    assert selected.height == 60  # half of the 120 prompts
    graded = pl.read_parquet(tmp_path / "run/grade/graded.parquet")
    assert sorted(graded["id"].to_list()) == sorted(selected["id"].to_list())
    gman = json.loads((tmp_path / "run/grade/manifest.json").read_text())
    assert gman["inputs"][0]["path"].endswith("select/selected.parquet")
    assert "Disabled (eval.enabled: false)" in res.report.read_text()
    log = [json.loads(l) for l in (tmp_path / "run/pipeline.jsonl").read_text().splitlines()]
    assert [(x["stage"], x["action"]) for x in log] == [("select", "ran"), ("grade", "ran"), ("distribution", "ran"), ("train", "ran")]
    # a different selection changes what every later stage sees
    cfg2 = load_pipeline_config(None, [s for s in sets if s != "--set"] + ["select.strategy=easy"])
    from deft.pipeline import plan_pipeline

    assert [p["action"] for p in plan_pipeline(cfg2)] == ["run", "run", "run", "run", "disabled"]
    assert [p["action"] for p in plan_pipeline(cfg)] == ["skip", "skip", "skip", "skip", "disabled"]
    with pytest.raises(ConfigError, match="select.fraction"):
        load_pipeline_config(None, [s for s in sets if s != "--set"] + ["select.fraction=1.5"])


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_launch_command():
    from deft.pipeline import launch_command

    assert launch_command("torchrun --nproc_per_node 8", Path("c.yaml"), False) == \
        ["torchrun", "--nproc_per_node", "8", "-m", "deft", "train", "--config", "c.yaml"]
    assert launch_command("deepspeed --num_gpus 8 --num_nodes 2", Path("c.yaml"), True) == \
        ["deepspeed", "--num_gpus", "8", "--num_nodes", "2", "--module", "deft", "train", "--config", "c.yaml", "--resume"]


@pytest.mark.slow  # two training processes: ~40 s on a shared 2-core CPU
def test_pipeline_train_stage_under_a_launcher(slice_assets, tmp_path):
    """launcher: the train stage runs in two torchrun processes (gloo, ZeRO-2)
    and ends with the weights of the one-process run (2 x 2 samples per step =
    1 x 2 samples x 2 accumulation steps)."""
    from safetensors.torch import load_file

    from deft.pipeline import load_pipeline_config, run_pipeline

    common = {"eval.enabled": False, "eval.files": [], "train.max_steps": 2, "data.max_samples": 8,
              "train.deepspeed": str(REPO / "configs" / "deepspeed" / "zero2.json")}
    one = load_pipeline_config(None, [s for s in _sets(slice_assets, tmp_path / "one", **common) if s != "--set"])
    run_pipeline(one)
    two = load_pipeline_config(None, [s for s in _sets(slice_assets, tmp_path / "two", **{
        **common, "train.gradient_accumulation_steps": 1,
        "launcher": f"{sys.executable} -m torch.distributed.run --nproc_per_node 2 --master_port {_free_port()}"})
        if s != "--set"])
    res = run_pipeline(two)
    assert [r.action for r in res.stages] == ["disabled", "ran", "ran", "ran", "disabled"]
    assert (tmp_path / "two/train/train_config.yaml").exists()
    man = json.loads((tmp_path / "two/train/manifest.json").read_text())
    assert man["world_size"] == 2
    a, b = load_file(str(tmp_path / "one/train/model/model.safetensors")), load_file(str(tmp_path / "two/train/model/model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
