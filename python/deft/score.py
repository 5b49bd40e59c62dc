"""Reward-model scoring of a canonical preference frame: fast, resumable, shardable.

Every response of every row (a *pair* = (row, response index)) gets one scalar
score from a reward model; :func:`score_frame` returns the frame with its
``scores`` column replaced by them.

Reward models
=============
Anything following the :class:`RewardModel` protocol: ``encode`` turns
(context, response) pairs into model inputs (already truncated; ``len(item)`` is
the token count, used for length bucketing) and ``score_batch`` scores a list of
them. :class:`HFRewardModel` covers any Hugging Face sequence-classification
reward model (``num_labels == 1``), e.g. the paper's
``OpenAssistant/oasst-rm-2.1-pythia-1.4b-epoch-2.5``; ``"builtin"`` is deft's own
(:mod:`deft.builtin_rm`). :func:`load_reward_model` picks between them.

:class:`HFRewardModel` decisions:

* Weights are read from safetensors only (``use_safetensors=True``): a checkpoint
  with only pickled weights (``pytorch_model.bin``, ``*.pt``) is refused.
  ``trust_remote_code`` is off unless asked for. A checkpoint whose config lists
  architectures but no ``*ForSequenceClassification``, with ``num_labels != 1``,
  or with weights missing once loaded (an untrained head) is refused.
* Templates (:data:`TEMPLATES`): ``oasst`` = ``render_oasst(context, response)``
  (how the PRO/DEFT evaluation feeds OpenAssistant RMs), ``chat`` =
  ``render_chat(context, tokenizer, response)``, ``plain`` =
  ``render_hh(context) + " " + response``; ``auto`` = oasst when the tokenizer
  knows ``<|prompter|>``, else chat when it has a chat template, else plain.
* Truncation keeps the end: the rendered text is tokenized without special
  tokens and cut from the *left* to ``max_length`` tokens, so the response
  survives (if the response alone is longer, its tail does). The special tokens
  the tokenizer itself adds around one sequence (BOS/[CLS] before, EOS/[SEP]
  after; found once by probing the tokenizer) are set aside before the cut and
  put back after it, so a truncated input still starts with BOS/[CLS]. ``oasst``
  and ``plain`` texts get these tokenizer special tokens; ``chat`` texts do not
  (chat templates write their own), but a leading BOS written by the template
  is kept through truncation the same way.
* Padding is always on the right, per batch, with the tokenizer's pad token (its
  EOS, or 0, when it has none) and an attention mask; the tokenizer's own
  ``padding_side`` is ignored. Real tokens then keep the positions of an
  unpadded forward pass for every architecture, and the model config's
  ``pad_token_id`` is set to the padding id, so Hugging Face's pooling ("last
  token that is not padding") lands on each sequence's last real token. Should
  a sequence *end* with the padding id (e.g. a text ending in EOS when pad ==
  EOS), that batch is padded with another id (and ``pad_token_id`` set to it for
  the batch), so the score is still read at the true last token.
* bfloat16 on CUDA, float32 on CPU (``dtype`` overrides); ``torch.inference_mode``.

Resumable, lossless runs
========================
``score_frame(..., work_dir=W)`` keeps everything under ``W``:

* ``W/plan.json``: the input's fingerprint (SHA-256 over ids, contexts and
  responses), row and pair counts, the model's name (and revision when known),
  template, max_length and the number of shards. A rerun with a different plan
  is a :class:`PlanMismatchError` unless ``overwrite=True`` (which discards the
  old scores).
* ``W/shard-KKKKK-of-NNNNN/part-NNNNNN.parquet``: scores as they are computed
  (every ``flush_every`` batches or 30 s), each part written atomically; columns
  ``row`` (row index in the frame), ``id``, ``response`` (index in
  ``responses``), ``score`` (f64), ``tokens`` (encoded length). A rerun reads the
  parts, scores only the pairs no part holds, and so continues after a crash or
  SIGKILL with no pair lost or scored twice. Stale temporary files are removed.
  ``done.json`` marks a complete shard; a lock file keeps two processes off the
  same shard.

Sharding
========
``shard=(k, n)`` (or ``"k/n"``) scores the rows whose index ``% n == k``
(interleaved, so every shard gets the same mix of lengths). With ``shard=None``
the torchrun / deepspeed launcher variables ``RANK`` and ``WORLD_SIZE`` are used
when set, else the whole frame is one shard. Once every shard's ``done.json`` is
in ``W`` the call merges all parts (checking that every pair is there exactly
once) and returns the scored frame; otherwise it logs the missing shards and
returns None (``wait`` seconds lets it poll for them first).

Batching
========
Pairs are sorted by encoded length (longest first, so an out-of-memory error
shows at once) and cut into batches padded to their own longest item (length
bucketing): ``batch_size`` pairs per batch, or as many as fit in
``max_batch_tokens`` padded tokens. The default token budget is 8192 on CPU and,
on CUDA, derived from free GPU memory and the model's width (2,048 to 65,536).
A CUDA out-of-memory error splits the batch in halves and retries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import numpy as np
import polars as pl

# Imported inside the functions that use them, on purpose: torch, transformers and rich; importing deft
# stays fast.
from deft._hf import default_device, dtype_kwarg, log_split, pickle_only_weights, split_on_oom
from deft._util import chars_per_token, clip_text, find_sub, tokenize_clipped
from deft.builtin_rm import BuiltinRewardModel
from deft.errors import DeftError
from deft.io import MetricsLog, atomic_path, lock_file, unlock_file, write_json_atomic
from deft.render import RM_TEMPLATES, render_pair, resolve_rm_template


__all__ = [
    "RewardModel",
    "HFRewardModel",
    "RewardModelError",
    "PlanMismatchError",
    "ScoreWorkError",
    "TEMPLATES",
    "load_reward_model",
    "score_frame",
    "parse_shard",
    "resolve_shard",
    "frame_fingerprint",
    "plan_batches",
    "read_parts",
]

log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
Context = Sequence[Mapping[str, str]]

#: Accepted ``template`` values of :class:`HFRewardModel` (:data:`deft.render.RM_TEMPLATES`).
TEMPLATES = RM_TEMPLATES
#: Default token budget per batch on CPU (padded tokens).
CPU_BATCH_TOKENS = 8192
#: Bounds of the CUDA token budget derived from free memory.
CUDA_BATCH_TOKENS = (2048, 65536)
#: Flush scores to a part file at least this often (seconds).
FLUSH_SECONDS = 30.0
PLAN_VERSION = 1
_PLAN_KEYS = ("version", "fingerprint", "rows", "pairs", "model", "revision", "template", "max_length", "shards", "shard_scheme")


class RewardModelError(DeftError, ValueError):
    """A checkpoint that cannot be used as a reward model (and why)."""


class PlanMismatchError(DeftError, ValueError):
    """``work_dir`` holds scores of a different run (data, model, template...)."""


class ScoreWorkError(DeftError, RuntimeError):
    """The scoring work dir is in use by another process or its part files are corrupt."""


@runtime_checkable
class RewardModel(Protocol):
    """What :func:`score_frame` needs from a reward model."""

    name: str
    template: str
    max_length: int

    def encode(self, contexts: Sequence[Sequence[Mapping[str, str]]], responses: Sequence[str]) -> List[Any]:
        """One model input per (context, response) pair, already truncated;
        ``len(item)`` is its token count."""
        ...

    def score_batch(self, items: List[Any]) -> np.ndarray:
        """float64 scores, one per item."""
        ...


# --------------------------------------------------------------------------
# Hugging Face sequence-classification reward models
# --------------------------------------------------------------------------


def _check_local_weights(path: Path, name: str) -> None:
    if any(p.is_file() and p.name.endswith((".safetensors", ".safetensors.index.json")) for p in path.iterdir()):
        return
    pickled = pickle_only_weights(path)
    if pickled:
        raise RewardModelError(
            f"reward model {name}: only pickled PyTorch weights found ({', '.join(pickled)}); deft loads "
            "safetensors weights only (unpickling can run arbitrary code). Convert the checkpoint to "
            "safetensors (e.g. model.save_pretrained(dir) in a trusted environment) and load that."
        )
    raise RewardModelError(f"reward model {name}: no safetensors weights (*.safetensors) in {path}")



class HFRewardModel:
    """A Hugging Face ``*ForSequenceClassification`` model with one output, as
    a :class:`RewardModel` (see the module docs for templates, truncation and
    padding). Build with :meth:`load`, or wrap an already loaded model and
    tokenizer with the constructor."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str, template: str = "auto",
                 max_length: int = 1024, revision: Optional[str] = None):
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        num_labels = getattr(model.config, "num_labels", None)
        if num_labels != 1:
            raise RewardModelError(
                f"reward model {name} has num_labels={num_labels}; a reward model must output exactly one "
                "scalar per sequence (num_labels=1)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.revision = revision
        self.max_length = int(max_length)
        self.template = resolve_rm_template(template, tokenizer)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        # HF seq-cls heads pool at the last token != config.pad_token_id: keep it equal to the padding id.
        self.model.config.pad_token_id = self.pad_id
        self.vocab_size = int(getattr(model.config, "vocab_size", 0) or len(tokenizer))
        self._prefix, self._suffix = self._probe_special_tokens()

    # -- loading ----------------------------------------------------------

    @classmethod
    def load(cls, name_or_path: str, *, template: str = "auto", max_length: int = 1024,
             device: Optional[str] = None, dtype: Any = None, trust_remote_code: bool = False) -> "HFRewardModel":
        """Load a reward model by hub name or local folder (safetensors only)."""
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        name = str(name_or_path)
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        archs = list(getattr(config, "architectures", None) or [])
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise RewardModelError(
                f"{name} is not a sequence-classification reward model: its config lists architectures "
                f"{archs}, none of them *ForSequenceClassification (a causal LM or other head cannot give "
                "one scalar score per sequence)")
        if config.num_labels != 1:
            raise RewardModelError(
                f"reward model {name} has num_labels={config.num_labels}; a reward model must output exactly "
                "one scalar per sequence (num_labels=1)")
        local = Path(name)
        if local.is_dir():
            _check_local_weights(local, name)
        device = device or default_device()
        torch_device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if torch_device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        kwargs = {dtype_kwarg(): dtype}
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                name, config=config, use_safetensors=True, trust_remote_code=trust_remote_code,
                output_loading_info=True, **kwargs)
        except OSError as e:
            if "safetensors" in str(e):
                raise RewardModelError(
                    f"reward model {name}: no safetensors weights found; deft refuses pickled weights "
                    f"(pytorch_model.bin). ({e})") from None
            raise
        missing = list(info.get("missing_keys") or [])
        if missing:
            shown = ", ".join(sorted(missing)[:8]) + (" ..." if len(missing) > 8 else "")
            raise RewardModelError(
                f"reward model {name}: {len(missing)} weight(s) missing from the checkpoint ({shown}); they "
                "would be randomly initialised (e.g. an untrained score head), so its scores would be meaningless")
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model.to(torch_device)
        revision = getattr(config, "_commit_hash", None)
        return cls(model, tokenizer, name=name, template=template, max_length=max_length, revision=revision)

    # -- rendering and encoding --------------------------------------------

    def _probe_special_tokens(self) -> Tuple[List[int], List[int]]:
        """The special ids the tokenizer adds before/after one sequence (for
        templates tokenized with ``add_special_tokens=True``)."""
        if self.template == "chat":
            return [], []
        probe = "Hello world, how are you?"
        bare = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(probe, add_special_tokens=True)["input_ids"]
        i = find_sub(full, bare)
        if i < 0:
            log.warning("%s: cannot locate the text among the tokenizer's special tokens; "
                        "encoding without special tokens", self.name)
            return [], []
        return list(full[:i]), list(full[i + len(bare):])

    def render(self, context: Context, response: str) -> str:
        """The text the model scores for one pair, before tokenization."""
        return render_pair(context, response, self.template, self.tokenizer)

    def encode(self, contexts: Sequence[Context], responses: Sequence[str]) -> List[np.ndarray]:
        """Token ids (int32 arrays) per pair, left-truncated to ``max_length``
        with the tokenizer's special tokens kept (see module docs)."""
        if len(contexts) != len(responses):
            raise ValueError(f"{len(contexts)} contexts but {len(responses)} responses")
        texts = [self.render(c, r) for c, r in zip(contexts, responses)]
        out: List[np.ndarray] = []
        if not texts:
            return out
        # At most max_length tokens of each text's end are kept: a huge text is
        # cut to that before tokenising, keeping the same tokens
        # (deft._util.tokenize_clipped); a leading BOS of the chat template stays.
        bos_text = self.tokenizer.bos_token if self.template == "chat" else None
        cpt = chars_per_token(self.tokenizer)
        heads = [bos_text if bos_text and t.startswith(bos_text) and clip_text(t, self.max_length, "left", cpt) is not t
                 else "" for t in texts]  # only texts that are cut lose their start

        def tokenize(batch: List[str]) -> List[Sequence[int]]:
            return self.tokenizer(batch, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

        bodies = tokenize_clipped(tokenize, [t[len(h):] for t, h in zip(texts, heads)], self.max_length, "left", cpt)
        if any(heads):
            bos_ids = tokenize([bos_text])[0]
            ids_list = [list(bos_ids) + list(b) if h else b for h, b in zip(heads, bodies)]
        else:
            ids_list = bodies
        bos = self.tokenizer.bos_token_id
        for ids in ids_list:
            prefix, suffix = self._prefix, self._suffix
            if self.template == "chat" and bos is not None and ids and ids[0] == bos:
                prefix, ids = [bos], ids[1:]
            budget = self.max_length - len(prefix) - len(suffix)
            if budget < 1:
                raise ValueError(f"max_length={self.max_length} leaves no room next to the special tokens")
            if len(ids) > budget:
                ids = ids[len(ids) - budget:]
            out.append(np.asarray(list(prefix) + list(ids) + list(suffix), dtype=np.int32))
        return out

    # -- scoring -------------------------------------------------------------

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def _pad_id_for(self, items: Sequence[np.ndarray]) -> int:
        last = {int(x[-1]) for x in items if len(x)}
        if self.pad_id not in last:
            return self.pad_id
        for cand in range(self.vocab_size):
            if cand not in last:
                return cand
        raise RuntimeError("no padding id available")  # pragma: no cover

    def score_batch(self, items: List[Any]) -> np.ndarray:
        """Scores (float64) of encoded items, padded on the right as one batch."""
        import torch

        if not items:
            return np.zeros(0, dtype=np.float64)
        lengths = [len(x) for x in items]
        if min(lengths) < 1:
            raise ValueError("cannot score an empty sequence")
        width = max(lengths)
        pad = self._pad_id_for(items)
        ids = np.full((len(items), width), pad, dtype=np.int64)
        mask = np.zeros((len(items), width), dtype=np.int64)
        for i, x in enumerate(items):
            ids[i, :len(x)] = x
            mask[i, :len(x)] = 1
        device = self.device
        config = self.model.config
        saved = config.pad_token_id
        config.pad_token_id = pad
        try:
            with torch.inference_mode():
                out = self.model(input_ids=torch.from_numpy(ids).to(device),
                                 attention_mask=torch.from_numpy(mask).to(device))
        finally:
            config.pad_token_id = saved
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits.reshape(len(items), -1)[:, 0].float().cpu().numpy().astype(np.float64)

    def suggest_max_batch_tokens(self) -> int:
        """Default padded tokens per batch: :data:`CPU_BATCH_TOKENS` on CPU; on
        CUDA half the free memory over a per-token activation estimate
        (``bytes * (8*hidden + 2*intermediate + heads*max_length)``), clamped
        to :data:`CUDA_BATCH_TOKENS`."""
        import torch

        device = self.device
        if device.type != "cuda":
            return CPU_BATCH_TOKENS
        free, _ = torch.cuda.mem_get_info(device)
        cfg = self.model.config
        hidden = int(getattr(cfg, "hidden_size", 0) or 1024)
        inter = int(getattr(cfg, "intermediate_size", 0) or getattr(cfg, "n_inner", 0) or 4 * hidden)
        heads = int(getattr(cfg, "num_attention_heads", 0) or 16)
        elt = next(self.model.parameters()).element_size()
        per_token = elt * (8 * hidden + 2 * inter + heads * self.max_length)
        lo, hi = CUDA_BATCH_TOKENS
        return int(min(hi, max(lo, 0.5 * free / per_token)))

    def __repr__(self) -> str:
        return (f"HFRewardModel(name={self.name!r}, template={self.template!r}, "
                f"max_length={self.max_length}, device={self.device})")


def load_reward_model(name_or_path: str = "builtin", *, template: str = "auto", max_length: int = 1024,
                      device: Optional[str] = None, dtype: Any = None,
                      trust_remote_code: bool = False) -> RewardModel:
    """``"builtin"`` -> :class:`deft.builtin_rm.BuiltinRewardModel` (template,
    dtype and trust_remote_code do not apply), anything else -> a Hugging Face
    sequence-classification model by hub name or local path
    (:meth:`HFRewardModel.load`)."""
    if name_or_path == "builtin":
        if template not in ("auto", "builtin"):
            log.warning("the builtin reward model renders (context, response) its own fixed way (a sentence pair); "
                        "template %r is not used", template)
        return BuiltinRewardModel.load(device=device, max_length=max_length)
    return HFRewardModel.load(name_or_path, template=template, max_length=max_length, device=device,
                              dtype=dtype, trust_remote_code=trust_remote_code)


# --------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------


def parse_shard(text: str) -> Tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``."""
    s = str(text).strip()
    parts = s.split("/")
    if len(parts) != 2:
        raise ValueError(f"invalid shard {text!r}: expected 'K/N' (shard K of N, 0 <= K < N), e.g. '0/4'")
    try:
        k, n = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"invalid shard {text!r}: K and N must be integers, as in '0/4'") from None
    return _check_shard(k, n, repr(text))


def _check_shard(k: int, n: int, what: str) -> Tuple[int, int]:
    if n < 1:
        raise ValueError(f"invalid shard {what}: the number of shards N must be >= 1, got {n}")
    if not 0 <= k < n:
        raise ValueError(f"invalid shard {what}: K must satisfy 0 <= K < N={n} (shards are numbered from 0), got {k}")
    return k, n


def resolve_shard(shard: Union[None, str, Tuple[int, int]] = None) -> Tuple[int, int]:
    """The shard to score: ``shard`` itself (a ``(k, n)`` pair or ``"k/n"``),
    else ``RANK``/``WORLD_SIZE`` from the environment (torchrun, deepspeed),
    else ``(0, 1)``."""
    if shard is None:
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
        if rank is None or world is None:
            return 0, 1
        try:
            return _check_shard(int(rank), int(world), f"RANK={rank} WORLD_SIZE={world}")
        except ValueError as e:
            raise ValueError(f"{e} (from the environment)") from None
    if isinstance(shard, str):
        return parse_shard(shard)
    k, n = shard
    return _check_shard(int(k), int(n), f"{k}/{n}")


# --------------------------------------------------------------------------
# Plan and parts
# --------------------------------------------------------------------------


def frame_fingerprint(frame: pl.DataFrame) -> str:
    """SHA-256 over every row's id, context and responses (in order)."""
    h = hashlib.sha256()
    for rid, ctx, resp in frame.select("id", "context", "responses").iter_rows():
        h.update(json.dumps([rid, ctx, resp], ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _shard_dir(work: Path, k: int, n: int) -> Path:
    return work / f"shard-{k:05d}-of-{n:05d}"


def _check_plan(work: Path, plan: Dict[str, Any], overwrite: bool) -> None:
    path = work / "plan.json"
    if not path.exists() and any(work.glob("shard-*-of-*")):
        if not overwrite:
            raise PlanMismatchError(
                f"{work} holds shard folders but no plan.json, so their scores cannot be matched to this run. "
                "Use another work_dir, or overwrite=True to discard them.")
        _clear_work_dir(work)
    if path.exists():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            old = {"unreadable": str(e)}
        diffs = [f"{key}: {old.get(key)!r} in the work dir, {plan[key]!r} now"
                 for key in _PLAN_KEYS if old.get(key) != plan[key]]
        if not diffs:
            return
        if not overwrite:
            raise PlanMismatchError(
                f"{work} holds scores of a different run ({'; '.join(diffs)}). Use another work_dir, "
                "or overwrite=True to discard them.")
        log.warning("discarding the scores in %s (%s)", work, "; ".join(diffs))
        _clear_work_dir(work)
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {**plan, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _clear_work_dir(work: Path) -> None:
    """Remove what score_frame wrote (plan.json, shard folders); nothing else."""
    (work / "plan.json").unlink(missing_ok=True)
    for d in work.glob("shard-*-of-*"):
        if d.is_dir():
            for f in d.iterdir():
                if f.is_file() and (f.name.startswith(("part-", ".part-", "done", ".done", "lock"))):
                    f.unlink()
            with contextlib.suppress(OSError):
                d.rmdir()


_KEY = 1 << 16  # pair key = row * _KEY + response index

_PART_SCHEMA = {"row": pl.Int64, "id": pl.Utf8, "response": pl.Int32, "score": pl.Float64, "tokens": pl.Int32}


def read_parts(shard_dir: PathLike) -> pl.DataFrame:
    """All part files of one shard folder as one frame (columns ``row``, ``id``,
    ``response``, ``score``, ``tokens``)."""
    files = sorted(Path(shard_dir).glob("part-*.parquet"))
    if not files:
        return pl.DataFrame(schema=_PART_SCHEMA)
    frames = []
    for f in files:
        try:
            frames.append(pl.read_parquet(f))
        except (pl.exceptions.PolarsError, OSError) as e:
            raise ScoreWorkError(f"{f}: unreadable part file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                 "the work dir is corrupt: delete the file (or the folder) to rescore its pairs") from None
    try:
        return pl.concat(frames, how="vertical")
    except pl.exceptions.PolarsError as e:
        raise ScoreWorkError(f"{shard_dir}: part files do not share the part schema ({str(e).splitlines()[0]}); the work dir is corrupt") from None


def _write_part(shard_dir: Path, index: int, rows: List[int], ids: List[str], resp: List[int],
                scores: List[float], tokens: List[int]) -> Path:
    path = shard_dir / f"part-{index:06d}.parquet"
    df = pl.DataFrame({"row": rows, "id": ids, "response": resp, "score": scores, "tokens": tokens},
                      schema=_PART_SCHEMA)
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)
    return path


@contextlib.contextmanager
def _shard_lock(shard_dir: Path, what: str) -> Iterator[None]:
    shard_dir.mkdir(parents=True, exist_ok=True)
    with open(shard_dir / "lock", "a+") as f:
        try:
            lock_file(f.fileno(), wait=False)
        except OSError:
            raise ScoreWorkError(f"{what} in {shard_dir.parent} is being scored by another process") from None
        try:
            yield
        finally:
            unlock_file(f.fileno())


# --------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------


def plan_batches(lengths: Sequence[int], *, batch_size: Optional[int] = None,
                 max_batch_tokens: Optional[int] = None, bucket: bool = True) -> List[np.ndarray]:
    """Index batches over items of the given lengths. ``bucket``: sort by length
    (longest first, stable) so each batch pads to a similar length; without it
    items keep their order (the naive baseline). Either ``batch_size`` items per
    batch, or as many as keep ``count * longest <= max_batch_tokens`` (at least
    one)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable") if bucket else np.arange(len(lengths))
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if max_batch_tokens is None or max_batch_tokens < 1:
        raise ValueError("give batch_size or a positive max_batch_tokens")
    batches: List[np.ndarray] = []
    start, longest = 0, 0
    for i, idx in enumerate(order):
        new_longest = max(longest, int(lengths[idx]))
        if i > start and (i - start + 1) * new_longest > max_batch_tokens:
            batches.append(order[start:i])
            start, new_longest = i, int(lengths[idx])
        longest = new_longest
    if start < len(order):
        batches.append(order[start:])
    return batches



def score_with_split(model: RewardModel, items: List[Any]) -> np.ndarray:
    """``model.score_batch(items)`` as float64, halving the batch on a CUDA out-of-memory error."""
    return split_on_oom(lambda b: np.asarray(model.score_batch(b), dtype=np.float64), items,
                        combine=lambda a, b: np.concatenate([a, b]), on_split=log_split(log, "on"))


class _Progress:
    """A rich progress bar (pairs, pairs/s, tokens/s, ETA), or nothing."""

    def __init__(self, enabled: bool, description: str, total: int, completed: int):
        self.bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("pairs"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(), transient=False)
        self.bar.start()
        self.task = self.bar.add_task(description, total=total, completed=completed, rate="")

    def update(self, advance: int, pairs_s: float, tokens_s: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=advance, rate=f"{pairs_s:,.1f} pairs/s {tokens_s:,.0f} tok/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# --------------------------------------------------------------------------
# score_frame
# --------------------------------------------------------------------------


def score_frame(
    frame: pl.DataFrame,
    model: RewardModel,
    *,
    work_dir: PathLike,
    shard: Union[None, str, Tuple[int, int]] = None,
    batch_size: Optional[int] = None,
    max_batch_tokens: Optional[int] = None,
    progress: bool = True,
    metrics: Optional[PathLike] = None,
    flush_every: int = 16,
    overwrite: bool = False,
    wait: float = 0.0,
) -> Optional[pl.DataFrame]:
    """Score every (row, response) pair of a canonical frame with ``model``.

    Scores this call's shard (``shard``, or RANK/WORLD_SIZE, else everything;
    rows with ``index % n == k``), flushing them to part files under
    ``work_dir`` every ``flush_every`` batches (and every 30 s) so a rerun of
    the same call resumes where a killed one stopped. Then, when every shard
    is complete in ``work_dir`` (polling up to ``wait`` seconds for the
    others), returns ``frame`` with ``scores`` replaced by the model's scores
    (list[f64] per row, in response order); otherwise logs the missing shards
    and returns None. ``batch_size`` pairs per batch, else ``max_batch_tokens``
    padded tokens per batch (default: the model's ``suggest_max_batch_tokens()``
    or :data:`CPU_BATCH_TOKENS`). ``metrics``: a JSONL path for
    :class:`deft.io.MetricsLog` (one record per flush and one at the end).
    ``overwrite``: discard a ``work_dir`` whose plan does not match instead of
    raising :class:`PlanMismatchError`. See the module docs for the layout.
    """
    k, n = resolve_shard(shard)
    if flush_every < 1:
        raise ValueError(f"flush_every must be >= 1, got {flush_every}")
    for col in ("id", "context", "responses"):
        if col not in frame.columns:
            raise ValueError(f"frame has no {col!r} column; expected a canonical frame (deft.data)")
    ids: List[str] = frame.get_column("id").cast(pl.Utf8).to_list()
    if frame.get_column("id").n_unique() != frame.height:
        raise ValueError("frame ids are not unique; pairs are keyed by (id, response index)")
    n_resp = frame.get_column("responses").list.len().fill_null(0).to_list()
    if n_resp and (min(n_resp) < 1 or max(n_resp) >= _KEY):
        raise ValueError(f"every row needs 1 to {_KEY - 1} responses")
    work = Path(work_dir)
    plan = {
        "version": PLAN_VERSION,
        "fingerprint": frame_fingerprint(frame),
        "rows": frame.height,
        "pairs": int(sum(n_resp)),
        "model": str(model.name),
        "revision": getattr(model, "revision", None),
        "template": str(model.template),
        "max_length": int(model.max_length),
        "shards": n,
        "shard_scheme": "row % shards",
    }
    _check_plan(work, plan, overwrite)
    shard_dir = _shard_dir(work, k, n)
    if not (shard_dir / "done.json").exists():
        with _shard_lock(shard_dir, f"shard {k}/{n}"):
            if not (shard_dir / "done.json").exists():
                _score_shard(frame, model, ids, n_resp, shard_dir, k, n, batch_size=batch_size,
                             max_batch_tokens=max_batch_tokens, progress=progress, metrics=MetricsLog(metrics),
                             flush_every=flush_every)
    deadline = time.monotonic() + max(0.0, wait)
    while True:
        missing = [s for s in range(n) if not (_shard_dir(work, s, n) / "done.json").exists()]
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
    if missing:
        log.warning("shard %d/%d is complete; waiting for shard(s) %s of %d in %s before merging",
                    k, n, ", ".join(str(s) for s in missing), n, work)
        return None
    return _merge(frame, ids, n_resp, work, n)


def _score_shard(frame: pl.DataFrame, model: RewardModel, ids: List[str], n_resp: List[int], shard_dir: Path,
                 k: int, n: int, *, batch_size: Optional[int], max_batch_tokens: Optional[int], progress: bool,
                 metrics: MetricsLog, flush_every: int) -> None:
    shard_dir.mkdir(parents=True, exist_ok=True)
    for f in shard_dir.iterdir():  # temporaries of writes a kill interrupted
        if f.name.startswith(".") and f.name.endswith(".tmp"):
            f.unlink(missing_ok=True)
    done = read_parts(shard_dir)
    keys = done.select((pl.col("row") * _KEY + pl.col("response")).alias("k")).get_column("k")
    if keys.n_unique() != done.height:
        raise ScoreWorkError(f"{shard_dir}: part files hold duplicate pairs; the work dir is corrupt")
    bad = done.filter((pl.col("row") % n != k) | (pl.col("row") >= len(ids)))
    if bad.height:
        raise ScoreWorkError(f"{shard_dir}: part files hold rows that are not in shard {k}/{n}")
    done_keys = set(keys.to_list())
    next_part = 1 + max((int(f.stem.split("-")[1]) for f in shard_dir.glob("part-*.parquet")), default=-1)

    rows = range(k, len(ids), n)
    todo: List[Tuple[int, int]] = [(r, j) for r in rows for j in range(n_resp[r]) if r * _KEY + j not in done_keys]
    total = sum(n_resp[r] for r in rows)
    t_start = time.perf_counter()
    log.info("shard %d/%d: %d pairs, %d already scored, %d to score", k, n, total, len(done_keys), len(todo))

    contexts = frame.get_column("context")
    responses = frame.get_column("responses")
    items: List[Any] = []
    chunk = 4096
    for s in range(0, len(todo), chunk):
        part = todo[s:s + chunk]
        row_idx = [r for r, _ in part]
        ctx = contexts.gather(row_idx).to_list()
        resp = responses.gather(row_idx).to_list()
        items.extend(model.encode(ctx, [resp[i][j] for i, (_, j) in enumerate(part)]))
    lengths = np.fromiter((len(x) for x in items), dtype=np.int64, count=len(items))
    if batch_size is None and max_batch_tokens is None:
        suggest = getattr(model, "suggest_max_batch_tokens", None)
        max_batch_tokens = int(suggest()) if callable(suggest) else CPU_BATCH_TOKENS
    batches = plan_batches(lengths, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    t_encoded = time.perf_counter()

    bar = _Progress(progress, f"scoring {k}/{n}" if n > 1 else "scoring", total, total - len(todo))
    buf: Dict[str, list] = {"row": [], "id": [], "response": [], "score": [], "tokens": []}
    pairs_done, tokens_done, padded_done, batches_since, last_flush = 0, 0, 0, 0, time.monotonic()
    t_loop = time.perf_counter()

    def flush() -> None:
        nonlocal next_part, batches_since, last_flush
        if not buf["row"]:
            return
        _write_part(shard_dir, next_part, buf["row"], buf["id"], buf["response"], buf["score"], buf["tokens"])
        next_part += 1
        for v in buf.values():
            v.clear()
        elapsed = max(time.perf_counter() - t_loop, 1e-9)
        metrics.log(event="score_flush", shard=f"{k}/{n}", pairs_done=total - len(todo) + pairs_done,
                    pairs_total=total, pairs_per_s=round(pairs_done / elapsed, 3),
                    tokens_per_s=round(tokens_done / elapsed, 1), batch_size=round(pairs_done / max(1, nb), 2),
                    padded_tokens_per_s=round(padded_done / elapsed, 1), part=next_part - 1)
        batches_since, last_flush = 0, time.monotonic()

    nb = 0
    try:
        for batch in batches:
            batch_items = [items[i] for i in batch]
            scores = score_with_split(model, batch_items)
            if scores.shape != (len(batch_items),):
                raise RuntimeError(f"{model.name}: score_batch returned shape {scores.shape} for {len(batch_items)} items")
            if not np.all(np.isfinite(scores)):
                raise RuntimeError(f"{model.name}: non-finite score in a batch of {len(batch_items)}")
            for i, sc in zip(batch, scores):
                r, j = todo[i]
                buf["row"].append(r)
                buf["id"].append(ids[r])
                buf["response"].append(j)
                buf["score"].append(float(sc))
                buf["tokens"].append(int(lengths[i]))
            nb += 1
            batches_since += 1
            ntok = int(lengths[batch].sum())
            pairs_done += len(batch)
            tokens_done += ntok
            padded_done += len(batch) * int(lengths[batch].max())
            elapsed = max(time.perf_counter() - t_loop, 1e-9)
            bar.update(len(batch), pairs_done / elapsed, tokens_done / elapsed)
            if batches_since >= flush_every or time.monotonic() - last_flush >= FLUSH_SECONDS:
                flush()
        flush()
    except BaseException:
        with contextlib.suppress(Exception):  # keep the finished batches (Ctrl-C, a failing batch)
            flush()
        raise
    finally:
        bar.close()
    elapsed = time.perf_counter() - t_loop
    summary = {
        "shard": [k, n], "pairs": total, "scored_now": pairs_done, "resumed": total - len(todo),
        "tokens": tokens_done, "padded_tokens": padded_done, "batches": nb,
        "encode_s": round(t_encoded - t_start, 3), "score_s": round(elapsed, 3),
        "pairs_per_s": round(pairs_done / max(elapsed, 1e-9), 3),
        "tokens_per_s": round(tokens_done / max(elapsed, 1e-9), 1),
        "batch_size": batch_size, "max_batch_tokens": max_batch_tokens,
    }
    metrics.log(event="score_done", **summary)
    # Check the shard before marking it complete.
    final = read_parts(shard_dir)
    if final.height != total or final.select((pl.col("row") * _KEY + pl.col("response")).n_unique()).item() != total:
        raise ScoreWorkError(f"{shard_dir}: expected {total} scored pairs, found {final.height} (with duplicates?)")
    write_json_atomic(shard_dir / "done.json", {**summary, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    log.info("shard %d/%d done: %d pairs in %.1f s (%.1f pairs/s)", k, n, pairs_done, elapsed, summary["pairs_per_s"])


def _merge(frame: pl.DataFrame, ids: List[str], n_resp: List[int], work: Path, n: int) -> pl.DataFrame:
    parts = pl.concat([read_parts(_shard_dir(work, s, n)) for s in range(n)], how="vertical")
    total = int(sum(n_resp))
    expected = pl.DataFrame({"row": np.repeat(np.arange(len(n_resp), dtype=np.int64), n_resp),
                             "response": np.concatenate([np.arange(m, dtype=np.int32) for m in n_resp])
                             if n_resp else np.zeros(0, dtype=np.int32)},
                            schema={"row": pl.Int64, "response": pl.Int32})
    parts = parts.sort(["row", "response"])
    if parts.height != total or not parts.select("row", "response").equals(expected):
        raise ScoreWorkError(f"{work}: the shards' parts do not hold each of the {total} pairs exactly once "
                           f"(found {parts.height} rows)")
    if parts.get_column("id").to_list() != list(np.repeat(np.asarray(ids, dtype=object), n_resp)):
        raise ScoreWorkError(f"{work}: part ids do not match the frame's ids")
    scores = parts.group_by("row", maintain_order=True).agg(pl.col("score")).get_column("score")
    return frame.with_columns(scores.cast(pl.List(pl.Float64)).alias("scores"))
