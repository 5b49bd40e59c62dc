"""How `deft train` loads the policy (python/deft/train.py: load_dtype,
_load_model; config key attn_implementation), on a tiny random Llama with the
real SmolLM2 tokenizer and PRO HH rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import tiny_train_assets, train_overrides

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_train_assets(tmp_path_factory.mktemp("loading_assets"))


def overrides(assets, out: Path, **extra):
    return train_overrides(assets, out, **extra)



def test_attention_kernels_agree_and_loading_is_recorded(assets, tmp_path):
    """attn_implementation eager and sdpa train the same first step (to float32 rounding); the manifest
    records how the policy was loaded; gradient checkpointing (non-reentrant) gives the same step too."""
    from deft.train import run

    rows, mans = {}, {}
    for name, extra in (("eager", {"attn_implementation": "eager"}), ("sdpa", {"attn_implementation": "sdpa"}),
                        ("ckpt", {"attn_implementation": "sdpa", "train.gradient_checkpointing": True})):
        run(None, overrides(assets, tmp_path / name, **{"train.max_steps": 1, "train.ref_cache_dir": str(tmp_path / f"rc-{name}"), **extra}))
        rows[name] = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        mans[name] = json.loads((tmp_path / name / "manifest.json").read_text())["loading"]
    for k in ("loss", "L_m", "R_dis", "grad_norm"):
        assert rows["eager"][k] == pytest.approx(rows["sdpa"][k], rel=1e-5, abs=1e-7), k
        assert rows["ckpt"][k] == pytest.approx(rows["sdpa"][k], rel=1e-5, abs=1e-7), k
    assert mans["eager"] == {"dtype": "float32", "attn_implementation": "eager", "gradient_checkpointing": None,
                             "construction": "low_cpu_mem_usage", "logprobs": "logits"}
    assert mans["sdpa"]["attn_implementation"] == "sdpa" and mans["ckpt"]["gradient_checkpointing"] == "non-reentrant"


def test_load_dtype_and_attention_config():
    from deft.config import ConfigError, load_config
    from deft.train import load_dtype

    assert load_dtype(use_ds=True, bf16=True) == torch.bfloat16  # DeepSpeed keeps the float32 master weights
    assert load_dtype(use_ds=False, bf16=True) == torch.float32  # the plain loop autocasts float32 weights
    assert load_dtype(use_ds=True, bf16=False) == torch.float32
    with pytest.raises(ConfigError, match=r"attn_implementation: 'flash' is not one of eager, sdpa, flash_attention_2"):
        load_config(None, ["model=x", "data.graded=g", "deft.enabled=false", "attn_implementation=flash"])
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ConfigError, match="flash_attention_2 needs the flash-attn package"):
            load_config(None, ["model=x", "data.graded=g", "deft.enabled=false", "attn_implementation=flash_attention_2"])
