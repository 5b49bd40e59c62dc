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


def load_causal_lm(spec: str, *, dtype: Any, gguf_file: Optional[str] = None, trust_remote_code: bool = False) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` (a local folder or hub id;
    ``gguf_file``: a GGUF file in it). transformers dequantises GGUF weights on
    load but leaves a quantizer attached that refuses ``save_pretrained``; the
    weights are plain by then, so it is removed. Loading errors propagate."""
    from transformers import AutoModelForCausalLM

    kw: dict = {"trust_remote_code": trust_remote_code, "dtype": dtype}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(spec, **kw)
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
