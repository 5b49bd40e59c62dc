"""Small helpers shared by the stages that run models (score, select, evaluate)."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence


def find_sub(seq: Sequence[int], sub: Sequence[int]) -> int:
    """Index of the first occurrence of ``sub`` in ``seq``, or -1."""
    n = len(sub)
    for i in range(len(seq) - n + 1):
        if list(seq[i:i + n]) == list(sub):
            return i
    return -1


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is a (CUDA) out-of-memory error, so a batch can be split and retried."""
    try:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


#: File suffixes of pickled PyTorch weights (unpickling can run arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def pickle_only_weights(folder: Any) -> List[str]:
    """Names of the pickled weight files (``pytorch_model.bin``, ``*.pt``, a
    ``.bin.index.json`` shard index) in a model folder that holds no
    safetensors weights; empty when it has safetensors (or no pickles)."""
    from pathlib import Path

    files = [p.name for p in Path(folder).iterdir() if p.is_file()]
    if any(f.endswith((".safetensors", ".safetensors.index.json")) for f in files):
        return []
    return sorted(f for f in files if f.endswith(PICKLE_SUFFIXES) or f.endswith(".bin.index.json"))


def pickle_refusal(what: str, files: Sequence[str]) -> str:
    """The message refusing pickle-only weights (``what``: e.g. ``model runs/x``)."""
    return (f"{what} holds only pickle weights ({', '.join(files)}), which can run code when loaded; "
            "convert them to safetensors (model.save_pretrained(dir) in a trusted environment) "
            "or pass --allow-pickle (config: allow_pickle: true) if you trust the file")


def load_causal_lm(spec: str, *, dtype: Any, gguf_file: Optional[str] = None, trust_remote_code: bool = False,
                   allow_pickle: bool = False) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` (a local folder or hub id;
    ``gguf_file``: a GGUF file in it). transformers dequantises GGUF weights on
    load but leaves a quantizer attached that refuses ``save_pretrained``; the
    weights are plain by then, so it is removed.

    Weights stored only as pickles (``pytorch_model.bin``) are refused with
    :class:`deft.errors.UnsafeWeightsError` unless ``allow_pickle`` (a local
    folder is checked up front; a hub id is loaded with ``use_safetensors``).
    GGUF and safetensors weights are always accepted. Other loading errors
    propagate."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from deft.errors import UnsafeWeightsError

    kw: dict = {"trust_remote_code": trust_remote_code, "dtype": dtype}
    local = Path(spec).expanduser()
    if gguf_file:
        kw["gguf_file"] = gguf_file
    elif not allow_pickle:
        if local.is_dir():
            pickled = pickle_only_weights(local)
            if pickled:
                raise UnsafeWeightsError(pickle_refusal(f"model {spec}", pickled))
        kw["use_safetensors"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, **kw)
    except OSError as e:
        if kw.get("use_safetensors") and not local.is_dir() and "safetensors" in str(e):  # a hub id
            raise UnsafeWeightsError(f"{pickle_refusal(f'model {spec}', ['pytorch_model.bin'])} "
                                     f"(no safetensors weights found: {str(e).splitlines()[0] if str(e) else e})") from None
        raise
    if gguf_file:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def load_tokenizer(model: str, *, tokenizer: Optional[str] = None, gguf_file: Optional[str] = None,
                   trust_remote_code: bool = False) -> Any:
    """The Hugging Face tokenizer of ``model`` (or ``tokenizer`` when given; a
    GGUF file carries its own tokenizer, read when no ``tokenizer`` is given).
    Loading errors propagate."""
    from transformers import AutoTokenizer

    kw: dict = {"trust_remote_code": trust_remote_code}
    if gguf_file and not tokenizer:
        kw["gguf_file"] = gguf_file
    return AutoTokenizer.from_pretrained(tokenizer or model, **kw)


def md_table(header: Sequence[Any], rows: Sequence[Sequence[Any]], left: int = 1) -> List[str]:
    """Lines of a Markdown table: the first ``left`` columns left-aligned, the
    rest right-aligned; ``|`` inside a cell is escaped."""
    def esc(c: Any) -> str:
        return str(c).replace("|", "\\|")

    out = ["| " + " | ".join(esc(h) for h in header) + " |",
           "|" + "|".join(":---" if i < left else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return out
