"""Shared test helpers: the location of the shared real data, and writers for
small hand-made data files in every supported container."""

from __future__ import annotations

import gzip
import json
import textwrap
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Sequence, Union

import polars as pl
import pytest

#: Containers the loaders support, as file-name suffixes.
CONTAINERS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


# --- no silent skips in CI ----------------------------------------------------
#
# With DEFT_NO_SKIPS=1 (set by .ci/run) a skipped test fails the run: CI installs
# every dependency the tests need and has ../shared, so a skip there means a
# missing install step or data folder, not an optional feature.

_SKIPPED: List[str] = []


def pytest_runtest_logreport(report) -> None:  # noqa: ANN001
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append(f"{report.nodeid}: {report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr}")


def pytest_collectreport(report) -> None:  # noqa: ANN001
    if report.skipped:
        _SKIPPED.append(f"{report.nodeid}: {report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr}")


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: ANN001
    import os

    if os.environ.get("DEFT_NO_SKIPS") == "1" and _SKIPPED:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_sep("=", f"DEFT_NO_SKIPS=1: {len(_SKIPPED)} test(s) skipped, which CI does not allow", red=True)
            for s in _SKIPPED:
                tr.write_line(f"  {s}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def shared_dir() -> Path:
    """``../shared`` relative to the repository root (where CI keeps the real
    data and tokenizers)."""
    return Path(__file__).resolve().parents[1].parent / "shared"


def shared_file(relative: str) -> Path:
    """A file under :func:`shared_dir`; skips the test when it is absent."""
    path = shared_dir() / relative
    if not path.exists():
        pytest.skip(f"shared data not available: {path} is missing (CI provides ../shared)")
    return path


def write_records(path: Path, records: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``records`` to ``path`` in the container its suffix names."""
    name = path.name
    if name.endswith(".parquet"):
        pl.DataFrame(list(records)).write_parquet(path)
    elif name.endswith((".json", ".json.gz")):
        data = json.dumps(list(records)).encode()
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    else:
        raise ValueError(f"no writer for {name}")
    return path


def write_lines(path: Path, lines: Iterable[Union[str, bytes, Mapping[str, Any]]]) -> Path:
    """Write a JSONL file line by line: dicts are JSON-encoded, strings written
    as they are, bytes written raw (for undecodable lines)."""
    out: List[bytes] = []
    for line in lines:
        if isinstance(line, bytes):
            out.append(line)
        elif isinstance(line, str):
            out.append(line.encode())
        else:
            out.append(json.dumps(line).encode())
    path.write_bytes(b"\n".join(out) + b"\n")
    return path


# --- a tiny random Llama policy (the real SmolLM2 tokenizer's vocabulary) ---


def tiny_llama_config(tok, **overrides: Any):
    """The ``LlamaConfig`` of :func:`tiny_llama`: sized for the SmolLM2
    tokenizer ``tok`` (49,152 ids), 2 layers of width 32, untied head;
    ``overrides`` change any field."""
    from transformers import LlamaConfig

    fields = dict(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
                  eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_llama(tok, *, seed: int = 0, **overrides: Any):
    """A tiny random ``LlamaForCausalLM`` (:func:`tiny_llama_config`), its
    weights drawn after ``torch.manual_seed(seed)``: equal arguments give
    equal weights."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config(tok, **overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


#: The smaller tiny Llama some tests use (one layer of width 16).
SMALLER_LLAMA = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


def save_tiny_llama(folder: Path, tok=None, *, seed: int = 0, **overrides: Any) -> Path:
    """:func:`tiny_llama` (with ``overrides``) saved with its tokenizer (the
    real SmolLM2 one unless ``tok``) into ``folder``, as a model folder."""
    if tok is None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(shared_file("tokenizers/smollm2")))
    tiny_llama(tok, seed=seed, **overrides).save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)


def pro_hh_pairs(n: int = 6) -> List[dict]:
    """``n`` short real PRO HH rows (harmless base, from its first 80 lines): context
    (chat messages), best and worst response; what the TRL comparisons train on."""
    import tempfile

    from deft.data import load

    lines = gzip.open(shared_file("data/pro-hh/test_harmless_base.jsonl.gz"), "rt", encoding="utf-8").read().splitlines()[:80]
    p = Path(tempfile.mkdtemp()) / "pro_rows.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = []
    for r in load(p).frame.iter_rows(named=True):
        if sum(len(t["content"]) for t in r["context"]) < 300 and max(len(x) for x in r["responses"]) < 250:
            out.append({"context": [dict(t) for t in r["context"]], "best": r["responses"][0], "worst": r["responses"][-1]})
    assert len(out) >= n
    return out[:n]


def trl_pairs(rows: Sequence[Mapping[str, Any]]) -> List[dict]:
    """:func:`pro_hh_pairs` rows as TRL's conversational preference records."""
    return [{"prompt": r["context"], "chosen": [{"role": "assistant", "content": r["best"]}],
             "rejected": [{"role": "assistant", "content": r["worst"]}]} for r in rows]


def float64_policy_and_reference(tok, shift: float = 0.05):
    """:func:`tiny_llama` in float64 as the reference, and a policy moved away
    from it by ``shift`` x Gaussian noise (so DPO's loss depends on beta)."""
    import copy

    import torch

    ref = tiny_llama(tok).to(torch.float64).eval()
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(shift * torch.randn_like(p))
    return policy, ref


def backward_grads(loss, model) -> dict:
    """Backpropagate ``loss`` into ``model`` from cleared gradients and return
    them by parameter name (cloned), leaving ``model``'s ``.grad`` cleared."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def tiny_train_assets(root: Path, *, lm_head_scale: float = 1.0, adjust=None) -> dict:
    """What the trainer tests train on, under ``root``: :func:`tiny_llama` with
    the SmolLM2 tokenizer (``tiny-llama/``; its lm_head multiplied by
    ``lm_head_scale``), the first 200 rows of PRO's HH harmless test file graded
    with a = 20 from their stored scores (``graded.parquet``; passed through
    ``adjust(frame) -> frame`` first when given) and their Q_diff
    (``qdiff.safetensors``). Returns the paths and the graded frame."""
    import torch
    from transformers import AutoTokenizer

    from deft.data import load
    from deft.distribution import build_distribution, resolve_tokenizer, save_distribution
    from deft.grade import grade

    model_dir = root / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(str(shared_file("tokenizers/smollm2")))
    model = tiny_llama(tok)
    if lm_head_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(lm_head_scale)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    lines = gzip.open(shared_file("data/pro-hh/test_harmless_base.jsonl.gz"), "rt", encoding="utf-8").read().splitlines()[:200]
    raw = root / "test_harmless_base.jsonl"
    raw.write_text("\n".join(lines) + "\n", encoding="utf-8")
    graded = grade(load(raw).frame, a=20)
    if adjust is not None:
        graded = adjust(graded)
    graded_path = root / "graded.parquet"
    graded.write_parquet(graded_path)
    dist_path = root / "qdiff.safetensors"
    save_distribution(build_distribution(graded, resolve_tokenizer(str(model_dir)), template="auto", graded_path=graded_path),
                      dist_path)
    return {"root": root, "model": model_dir, "graded": graded_path, "dist": dist_path, "frame": graded}


def train_overrides(assets: Mapping[str, Any], out: Path, **extra: Any) -> List[str]:
    """``--set`` overrides of a small, fast `deft train` run on :func:`tiny_train_assets`
    into ``out`` (plain loop, 16 samples, 2 x 2 pairs per step, lr 1e-3, no checkpoints,
    omega 0.5: large enough to matter in a few steps); ``extra`` adds or replaces keys."""
    import json

    base = {
        "model": str(assets["model"]), "data.graded": str(assets["graded"]), "data.max_length": 96, "data.max_prompt_length": 64,
        "deft.distribution": str(assets["dist"]), "deft.omega": 0.5, "train.output_dir": str(out), "train.micro_batch_size": 2,
        "train.gradient_accumulation_steps": 2, "train.lr": 1e-3, "train.warmup_steps": 1, "train.progress": False,
        "train.deepspeed": None, "train.save_steps": 0,
        "data.max_samples": 16,  # the shared CPU is slow: a 49k-row lm_head costs ~0.1 s per sequence
    }
    base.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()]


# --- a tiny reward model for scoring tests (no network) ---------------------

VOCAB = 50304  # GPT-2's 50257 ids plus room for added special tokens


def gpt2_hf_tokenizer(**kwargs):
    """The real GPT-2 tokenizer from ../shared as a transformers tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_file("tokenizers/gpt2")), **kwargs)


def tiny_config(**kwargs):
    """A tiny GPT-2 sequence-classification config (num_labels=1)."""
    from transformers import GPT2Config

    base = dict(vocab_size=VOCAB, n_positions=1024, n_embd=32, n_layer=2, n_head=2, num_labels=1,
                pad_token_id=50256, eos_token_id=50256, bos_token_id=50256)
    base.update(kwargs)
    return GPT2Config(**base)


def save_tiny_reward_model(folder: Path, tokenizer=None, *, seed: int = 0, **config) -> Path:
    """Save a randomly initialised tiny GPT-2 reward model (safetensors) with the GPT-2 tokenizer; no network."""
    import torch
    from transformers import GPT2ForSequenceClassification

    torch.manual_seed(seed)
    model = GPT2ForSequenceClassification(tiny_config(**config))
    with torch.no_grad():  # O(1) scores, so a 1e-5 tolerance means something
        model.score.weight.mul_(50.0)
    model.save_pretrained(folder)
    (tokenizer or gpt2_hf_tokenizer()).save_pretrained(folder)
    return folder




#: Python source that SIGKILLs its own process while `deft.train` publishes its
#: second checkpoint (a kill -9 mid-run); append the entry point to run.
KILL_AT_SECOND_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys
    import deft.train as t
    calls = []
    orig = t._finalize_checkpoint
    def finalize(tmp, final):
        calls.append(1)
        if len(calls) == 2:  # killed while publishing the second checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        orig(tmp, final)
    t._finalize_checkpoint = finalize
""")
