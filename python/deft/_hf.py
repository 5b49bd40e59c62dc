"""The one place where deft meets Hugging Face models: loading models and
tokenizers (a local folder, a hub id, a GGUF file), device and dtype
resolution, the safetensors-only rule with its pickle refusal, the batch
runner that halves a batch on CUDA out-of-memory, model and vocabulary
fingerprints, and quiet loading.

Every stage (score, select, train, evaluate, the builtin reward model) uses
these; none defines its own. torch and transformers are imported inside the
functions on purpose: importing deft (the CLI's ``--help``, grading with stored
scores) must not pay for them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar

from tokenizers import Tokenizer as PyTokenizer

from deft.errors import UnsafeWeightsError
from deft.io import sha256_file_cached

__all__ = [
    "ADAPTER_BASE", "PICKLE_SUFFIXES", "adapter_base", "default_device", "dtype_kwarg", "is_adapter", "is_oom", "load_causal_lm",
    "load_tokenizer",
    "pickle_only_weights", "pickle_refusal", "quiet_transformers", "resolve_device", "resolve_dtype",
    "split_on_oom", "vocab_hash", "weights_fingerprint", "weights_stat_fingerprint",
]

T = TypeVar("T")


# --------------------------------------------------------------------------- devices and dtypes


def default_device() -> str:
    """``cuda`` (``cuda:LOCAL_RANK`` under a launcher) when CUDA is available, else ``cpu``."""
    import torch

    if torch.cuda.is_available():
        local = os.environ.get("LOCAL_RANK")
        return f"cuda:{int(local)}" if local is not None else "cuda"
    return "cpu"


def resolve_device(device: Optional[str]) -> str:
    """``None``/``auto`` -> ``cuda`` when available, else ``cpu``; ``cpu``,
    ``cuda`` and ``cuda:N`` are checked against what is here."""
    import torch

    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device: expected cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available here")
    return device


def resolve_dtype(dtype: Optional[str], device: str) -> str:
    """``None``/``auto`` -> ``bfloat16`` on CUDA, ``float32`` on CPU; the
    short names (bf16, fp16, fp32) -> torch's names."""
    if dtype is None or dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    names = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "fp32": "float32", "float32": "float32"}
    if dtype not in names:
        raise ValueError(f"dtype: expected auto, float32, bfloat16 or float16, got {dtype!r}")
    return names[dtype]


def dtype_kwarg() -> str:
    """The ``from_pretrained`` keyword for the dtype: ``dtype`` (transformers >= 4.56) or the older ``torch_dtype``."""
    import transformers

    try:
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    except ValueError:
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


# --------------------------------------------------------------------------- out of memory


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is a (CUDA) out-of-memory error, so a batch can be split and retried."""
    try:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def split_on_oom(run: Callable[[List[Any]], T], items: List[Any], *, combine: Callable[[T, T], T],
                 on_split: Optional[Callable[[int, int], None]] = None) -> T:
    """``run(items)``; on an out-of-memory error, the CUDA cache is emptied
    and the two halves are run the same way (recursively) and ``combine``\\ d,
    after ``on_split(n, half)``. An OOM on a single item, and every other
    error, is raised."""
    try:
        return run(items)
    except Exception as e:  # noqa: BLE001
        if not is_oom(e) or len(items) == 1:
            raise
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(items) // 2
    if on_split is not None:
        on_split(len(items), half)
    return combine(split_on_oom(run, items[:half], combine=combine, on_split=on_split),
                   split_on_oom(run, items[half:], combine=combine, on_split=on_split))


# --------------------------------------------------------------------------- safe weights


#: File suffixes of pickled PyTorch weights (unpickling can run arbitrary code).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def pickle_only_weights(folder: Any) -> List[str]:
    """Names of the pickled weight files (``pytorch_model.bin``, ``*.pt``, a
    ``.bin.index.json`` shard index) in a model folder that holds no
    safetensors weights; empty when it has safetensors (or no pickles)."""
    files = [p.name for p in Path(folder).iterdir() if p.is_file()]
    if any(f.endswith((".safetensors", ".safetensors.index.json")) for f in files):
        return []
    return sorted(f for f in files if f.endswith(PICKLE_SUFFIXES) or f.endswith(".bin.index.json"))


def pickle_refusal(what: str, files: Sequence[str]) -> str:
    """The message refusing pickle-only weights (``what``: e.g. ``model runs/x``)."""
    return (f"{what} holds only pickle weights ({', '.join(files)}), which can run code when loaded; "
            "convert them to safetensors (model.save_pretrained(dir) in a trusted environment) "
            "or pass --allow-pickle (config: allow_pickle: true) if you trust the file")


# --------------------------------------------------------------------------- loading


#: What ``deft train`` writes beside a LoRA adapter: the base model it was trained on (``base_model``,
#: ``gguf_file``, ``fingerprint``), so that an adapter folder loads like a model folder.
ADAPTER_BASE = "deft_base.json"


def is_adapter(spec: Any) -> bool:
    """Whether ``spec`` is a local folder holding a ``peft`` adapter (``adapter_config.json``)."""
    return (Path(str(spec)).expanduser() / "adapter_config.json").is_file()


def adapter_base(folder: Any) -> Tuple[str, Optional[str]]:
    """``(base model, gguf_file)`` of an adapter folder: from deft's
    ``deft_base.json`` when present, else peft's ``base_model_name_or_path``."""
    p = Path(str(folder)).expanduser()
    rec = p / ADAPTER_BASE
    if rec.is_file():
        base = json.loads(rec.read_text(encoding="utf-8"))
        return str(base["base_model"]), base.get("gguf_file")
    base = json.loads((p / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"adapter {p}: adapter_config.json names no base_model_name_or_path and there is no {ADAPTER_BASE}")
    return str(base), None


def load_causal_lm(spec: str, *, dtype: Any, gguf_file: Optional[str] = None, trust_remote_code: bool = False,
                   allow_pickle: bool = False, merge_adapter: bool = True, **extra: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` (a local folder or hub id;
    ``gguf_file``: a GGUF file in it). transformers dequantises GGUF weights on
    load but leaves a quantizer attached that refuses ``save_pretrained``; the
    weights are plain by then, so it is removed.

    Weights stored only as pickles (``pytorch_model.bin``) are refused with
    :class:`deft.errors.UnsafeWeightsError` unless ``allow_pickle`` (a local
    folder is checked up front; a hub id is loaded with ``use_safetensors``).
    GGUF and safetensors weights are always accepted. Other loading errors
    propagate.

    A LoRA adapter folder (``adapter_config.json``, e.g. ``deft train``'s
    ``model/`` with ``peft.enabled``) loads its base model (:func:`adapter_base`;
    ``gguf_file`` must then be None) and the adapter on it, merged into the
    weights unless ``merge_adapter`` is false (then a ``peft.PeftModel``).
    ``extra`` goes to ``from_pretrained`` (e.g. ``attn_implementation``)."""
    from transformers import AutoModelForCausalLM

    if is_adapter(spec):
        if gguf_file:
            raise ValueError(f"{spec} is a LoRA adapter folder: its base model comes from {ADAPTER_BASE}; do not pass a gguf_file")
        from peft import PeftModel  # the optional [lora] extra

        base, base_gguf = adapter_base(spec)
        model = PeftModel.from_pretrained(load_causal_lm(base, dtype=dtype, gguf_file=base_gguf, trust_remote_code=trust_remote_code,
                                                         allow_pickle=allow_pickle, **extra), str(spec))
        return model.merge_and_unload() if merge_adapter else model

    kw: dict = {"trust_remote_code": trust_remote_code, "dtype": dtype, **extra}
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


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' weight-loading progress bar and info logs."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    bar = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- fingerprints

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def vocab_hash(tokenizer_json: str) -> Tuple[str, int]:
    """SHA-256 of a tokenizer's vocabulary (token -> id, added tokens
    included) and the vocabulary size: what a Q_diff is indexed by."""
    vocab = PyTokenizer.from_str(tokenizer_json).get_vocab(with_added_tokens=True)
    items = sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))
    size = max(vocab.values()) + 1 if vocab else 0
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest(), size


def weights_fingerprint(spec: str, gguf_file: Optional[str] = None) -> str:
    """Identity of a model's weights by content: the SHA-256 of its weight and
    config files for a local folder (cached by size and modification time), the
    resolved commit for a hub id. What a training checkpoint and the reference
    cache are keyed by."""
    p = Path(spec)
    h = hashlib.sha256()
    if is_adapter(p):  # the adapter's files and its base model's identity
        h.update(weights_fingerprint(*adapter_base(p)).encode())
    if p.is_dir():
        names = sorted(f for f in p.iterdir() if f.is_file() and (f.suffix in (".safetensors", ".bin", ".gguf", ".pt")
                                                                  or f.name in ("config.json", "adapter_config.json")))
        if gguf_file:
            names.append(p / gguf_file)
        for f in names:
            if f.exists():
                h.update(f.name.encode())
                h.update(sha256_file_cached(f).encode())
    else:
        h.update(str(spec).encode())
        try:
            from transformers import AutoConfig

            c = AutoConfig.from_pretrained(spec)
            h.update(str(getattr(c, "_commit_hash", "")).encode())
        except Exception:  # noqa: BLE001 - offline: the name alone
            pass
        if gguf_file:
            h.update(str(gguf_file).encode())
    return h.hexdigest()


def weights_stat_fingerprint(spec: str, gguf_file: Optional[str]) -> Dict[str, Any]:
    """A cheap identity of the weights: name, size and mtime of the weight and
    config files of a local folder (so a retrained model in the same folder
    does not reuse stale generations); the spec for a hub id."""
    p = Path(spec).expanduser()
    if not p.is_dir():
        return {"hub_id": str(spec), "gguf_file": gguf_file}
    files = []
    for f in sorted(p.iterdir()):
        if f.is_file() and (f.suffix in _WEIGHT_SUFFIXES or f.name in ("config.json", "tokenizer.json", "adapter_config.json")):
            st = f.stat()
            files.append([f.name, st.st_size, st.st_mtime_ns])
    out = {"folder": str(p.resolve()), "gguf_file": gguf_file, "files": hashlib.sha256(json.dumps(files).encode()).hexdigest()}
    if is_adapter(p):
        out["base"] = weights_stat_fingerprint(*adapter_base(p))
    return out


def log_split(logger: logging.Logger, what: str) -> Callable[[int, int], None]:
    """An ``on_split`` for :func:`split_on_oom` that logs a warning."""
    return lambda n, half: logger.warning("out of memory %s a batch of %d; retrying as %d + %d", what, n, half, n - half)
