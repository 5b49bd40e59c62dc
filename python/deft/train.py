"""`deft train`: fine-tune a causal LM on graded preference data with
``L = L_m - omega * R_dis`` (DEFT), or the plain baseline ``L_m``.

Pipeline
--------
1. **Data.** The rows of ``graded.parquet`` at ``data.levels`` (level A by
   default; ``[A, B, C]`` is the paper's -D^A ablation), responses best first.
   SFT trains on the best response, DPO/IPO on (best, worst), PRO/RRHF on the
   whole list with the scores as rewards.
2. **Tokenisation** (:func:`encode_examples`), laid out as the model's
   template and tokenizer do (:class:`deft.render.PolicyLayout`, the
   tokenisation TRL's DPOTrainer gives). Prompt, response and end are
   tokenised separately with the native batch encoder (no special tokens) and
   their ids concatenated. The prompt is the tokenizer's chat template
   (``add_generation_prompt=True``) when the template is ``chat``, else
   :func:`deft.render.render_hh` after the BOS the tokenizer's post-processor
   adds (Llama family; none for GPT-2 or SmolLM2). The response is
   ``response_prefix(template) + response`` -- the ids ``deft distribution``
   counted Q_diff with; the template comes from the distribution file and a
   mismatch is refused. The prompt is left-truncated to
   ``data.max_prompt_length`` (384) tokens, its BOS kept. The response's end
   is the chat template's end of turn (``<|im_end|>\n`` for ChatML; no extra
   EOS) or, for ``plain``, the tokenizer's ``eos_token_id``; it follows only a
   response that fits whole in ``data.max_length`` (512): a response cut short
   has no end (the model is not taught to stop mid-sentence). Labels are -100
   on the prompt and the padding, the ids elsewhere (the end included).
3. **Reference log-probs** (DPO/IPO/KTO; not for the reference-free SimPO,
   CPO, ORPO) are computed once, in a first pass with
   the initial policy, and cached as safetensors in ``train.ref_cache_dir``
   keyed by the model fingerprint, the precision and a hash of the token ids,
   so no reference model is held during training and reruns reuse them.
   KTO also caches those of its mismatched pairs (:func:`kto_kl_examples`).
4. **Training**: DeepSpeed (``train.deepspeed``: a JSON config; its batch
   sizes, gradient clipping and bf16 are filled in from the ``train`` section)
   or a plain PyTorch loop (``train.deepspeed: null``, one process). One
   process works without a launcher (gloo on CPU); several via ``deepspeed
   --num_gpus N --module deft train ...`` or ``torchrun -m deft train``. A torch AdamW is the
   client optimizer unless the DeepSpeed config names an ``optimizer``.
5. **Data order**: each epoch is a permutation seeded by ``(seed, epoch)``,
   padded by wrapping around to whole optimizer steps (every rank, every
   micro-batch, every accumulation group is full); rank ``r`` takes slot ``r``
   of each group of ``world_size`` micro-batches.
6. **Checkpoints** every ``train.save_steps`` optimizer steps in
   ``OUTPUT_DIR/checkpoints/step-N`` (written into a temporary folder, then
   renamed; the last ``save_total_limit`` kept): weights, optimizer,
   scheduler, trainer state and every rank's RNG state. ``--resume`` continues
   from the newest one, skipping the micro-batches already consumed, so an
   interrupted run (even ``kill -9``) ends with the same weights as an
   uninterrupted one.
7. **Outputs**: ``OUTPUT_DIR/model`` (``save_pretrained``, safetensors, with
   the tokenizer and a Hugging Face model card ``README.md``,
   :mod:`deft.model_card`), ``OUTPUT_DIR/manifest.json`` (config, data and model
   hashes, versions, git commit) and ``OUTPUT_DIR/metrics.jsonl`` (one line per
   optimizer step: loss, L_m, R_dis, rewards, margin, accuracy, lr, tokens/s,
   grad norm; with a distribution, at step 0 and every ``deft.diagnose_every``
   steps the R_dis gradient share and cosine, :func:`share_metrics`).
8. **omega** is ``deft.omega``, or with ``deft.omega_share`` calibrated before
   the first step (:func:`_calibrate_omega`) and kept in every checkpoint, so
   a resumed run uses the same value. DPO/IPO add ``method.sft_weight`` x the
   length-normalised NLL of the preferred response (RPO-style; 0 by default).

Code, in reading order: data (:func:`prepare_data`), forward and loss
assembly (:func:`compute_loss` over :mod:`deft.losses`), processes, RNG and
checkpoint folders, then the trainer: :func:`_train` is the whole recipe on
one screen (setup -> a loop of :func:`step`, one optimizer step returning its
metrics row -> final save) over :class:`Schedule` (data order),
:class:`Engine` (model and optimizer, DeepSpeed or plain), :class:`Job`
(what a run holds fixed) and :class:`TrainState` (what a checkpoint records).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import polars as pl
import torch
import torch.distributed as td
import tqdm.auto
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# Imported inside the functions that use them, on purpose: deepspeed (the optional [train] extra),
# transformers and tensorboard; importing deft stays fast.
from deft._hf import ADAPTER_BASE, is_oom, load_causal_lm, load_tokenizer, weights_fingerprint
from deft._util import chars_per_token, tokenize_clipped
from deft.config import PAIRED, REFERENCE_FREE, load_config, method_fingerprint, sft_weight
from deft.distribution import hf_policy_tokenizer, load_distribution
from deft.errors import CheckpointError
from deft.grade import read_graded
from deft.io import (
    MetricsLog, atomic_path, begin_publication, interrupted_publication, locked_output, remove_stale_temporaries,
    sha256_file, versions, write_json_atomic, write_text_atomic,
)
from deft.losses import (
    IGNORE_INDEX, deft_loss, dpo_loss, ipo_loss, length_normalized_scores, pro_loss, response_logprobs, rrhf_loss,
    sft_loss,
)
from deft.losses import PreferenceLossOutput, cpo_loss, kto_loss, kto_reference_point, orpo_loss, rrhf_loss_official, simpo_loss
from deft.model_card import CARD_NAME, write_card
from deft.ops import has_linear_head, logprobs_for_model, rdis_for_model, rdis_mask
from deft.render import policy_layout, render_prompt, resolve_template
from deft.reporting import Reporter, plot_curves, read_metrics, requested_backends

__all__ = ["Example", "encode_examples", "select_responses", "prepare_data", "train", "TrainResult"]

PAIRWISE = ("dpo", "ipo")
#: Methods whose loss reads reference log-probs (computed once and cached); the others compute none.
WITH_REFERENCE = PAIRWISE + ("kto",)
#: Below this R_dis gradient share at step 0, the trainer warns that R_dis cannot change the model.
LOW_SHARE = 1e-3
CHECKPOINTS = "checkpoints"
#: A checkpoint's weights when a LoRA adapter is trained: the trainable parameters only, by name.
ADAPTER_WEIGHTS = "adapter.safetensors"
#: The plot of the training loss and the eval split's accuracy and margin, written at the end.
CURVES = "curves.png"


def _log(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[deft train] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# data


@dataclass
class Example:
    """One prompt with its ``k`` tokenised responses (best first)."""

    id: str
    input_ids: List[np.ndarray]  # k arrays of int64: prompt ids + response ids (+ EOS)
    prompt_len: int
    rewards: List[float]

    @property
    def n_responses(self) -> int:
        return len(self.input_ids)


def select_responses(responses: Sequence[str], scores: Optional[Sequence[float]], method: str, max_responses: Optional[int] = None) -> Tuple[List[str], List[float]]:
    """Responses (best first) and their rewards as the method uses them:
    ``sft`` the best, a pairwise loss the best and the worst, a listwise loss
    all of them or, with ``max_responses`` (at least 2), the best
    ``max_responses - 1`` and the worst."""
    if max_responses is not None and max_responses < 2:
        raise ValueError(f"max_responses must be at least 2 (the best and the worst response), got {max_responses}")
    responses = list(responses)
    sc = list(scores) if scores is not None else [float(len(responses) - i) for i in range(len(responses))]
    if method == "sft":
        return responses[:1], sc[:1]
    if method in PAIRED:
        return [responses[0], responses[-1]], [sc[0], sc[-1]]
    if max_responses is not None and len(responses) > max_responses:
        keep = list(range(max_responses - 1)) + [len(responses) - 1]
        return [responses[i] for i in keep], [sc[i] for i in keep]
    return responses, sc


def encode_examples(
    ids: Sequence[str],
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    rewards: Sequence[Sequence[float]],
    native_tokenizer: Any,
    *,
    eos_token_id: int,
    response_prefix: str,
    max_length: int = 512,
    max_prompt_length: int = 384,
    num_threads: Optional[int] = None,
    lead_ids: Sequence[int] = (),
    response_suffix: str = "",
    append_eos: bool = True,
) -> List[Example]:
    """Tokenise rendered prompts and their responses; see the module docstring.
    ``lead_ids``, ``response_suffix`` and ``append_eos`` come from the
    template's :class:`deft.render.PolicyLayout`: the ids every prompt starts
    with (a BOS; prepended when the rendered prompt does not start with them,
    and kept when it is left-truncated), the text after every response (a chat
    template's end of turn, tokenised on its own) and whether EOS follows."""
    if max_length <= max_prompt_length:
        raise ValueError(f"max_length ({max_length}) must exceed max_prompt_length ({max_prompt_length})")
    lead = np.asarray(list(lead_ids), dtype=np.int64)
    if len(lead) >= max_prompt_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) leaves no room after the {len(lead)} leading special token(s)")

    def tokenize(texts: List[str]) -> List[np.ndarray]:
        ids, off = native_tokenizer.encode(texts, add_special_tokens=False, num_threads=num_threads)
        ids = ids.astype(np.int64)
        return [ids[off[j]:off[j + 1]] for j in range(len(texts))]

    # Huge prompts and responses are cut to what is kept (the prompt's last
    # max_prompt_length tokens, a response's first max_length) before
    # tokenising, with the same kept tokens (deft._util.tokenize_clipped).
    cpt = chars_per_token(native_tokenizer)
    room = max_prompt_length - len(lead)
    p_list = []
    for p in tokenize_clipped(tokenize, list(prompts), max_prompt_length + len(lead), "left", cpt):
        if len(lead) and np.array_equal(p[:len(lead)], lead):
            p = p[len(lead):]  # the template wrote the BOS itself
        p_list.append(np.concatenate([lead, p[len(p) - room:] if len(p) > room else p]))
    flat = [response_prefix + r for rs in responses for r in rs]
    r_list = tokenize_clipped(tokenize, flat, max_length, "right", cpt)
    end = np.concatenate([tokenize([response_suffix])[0] if response_suffix else np.zeros(0, dtype=np.int64),
                          np.array([eos_token_id] if append_eos else [], dtype=np.int64)])
    out: List[Example] = []
    k = 0
    for i, rs in enumerate(responses):
        prompt = p_list[i]
        budget = max_length - len(prompt)
        seqs = []
        for _ in rs:
            # the end (EOS, or the template's end of turn) only after a response that fits whole:
            # the model is not taught to stop mid-sentence
            resp = np.concatenate([r_list[k], end]) if len(r_list[k]) + len(end) <= budget else r_list[k][:budget]
            seqs.append(np.concatenate([prompt, resp]))
            k += 1
        out.append(Example(id=str(ids[i]), input_ids=seqs, prompt_len=len(prompt), rewards=[float(x) for x in rewards[i]]))
    return out


def labels_for(ex: Example) -> List[np.ndarray]:
    out = []
    for s in ex.input_ids:
        lab = s.copy()
        lab[: ex.prompt_len] = IGNORE_INDEX
        out.append(lab)
    return out


def data_hash(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.id.encode())
        h.update(np.int64(ex.prompt_len).tobytes())
        for s in ex.input_ids:
            h.update(np.int64(len(s)).tobytes())
            h.update(s.tobytes())
        h.update(np.asarray(ex.rewards, dtype=np.float64).tobytes())
    return h.hexdigest()


def kto_kl_examples(examples: Sequence[Example], max_length: int) -> List[Example]:
    """KTO's mismatched (prompt, completion) pairs for its reference point: the
    prompt of example ``i`` with the two completions (best, worst) of example
    ``i - 1`` (cyclic, in data order), cut to ``max_length`` tokens. This is
    TRL's ``KTOTrainer`` pairing -- each unpaired row's ``KL_completion_ids``
    are the previous row's completion -- with the rotation over the whole
    data set instead of within each fixed, unshuffled batch, so that the
    pairs do not depend on the (shuffled) micro-batches and their reference
    log-probs are computed once and cached."""
    if len(examples) < 2:
        raise ValueError(f"kto needs at least 2 samples (its reference point pairs each prompt with another sample's "
                         f"completions); got {len(examples)}")
    out: List[Example] = []
    for i, ex in enumerate(examples):
        other = examples[i - 1]
        prompt = ex.input_ids[0][:ex.prompt_len]
        seqs = [np.concatenate([prompt, s[other.prompt_len:]])[:max_length] for s in other.input_ids]
        out.append(Example(id=f"{ex.id}|kl:{other.id}", input_ids=seqs, prompt_len=ex.prompt_len, rewards=list(other.rewards)))
    return out


def collate(examples: Sequence[Example], pad_id: int, slots: Optional[int] = None, pack: int = 0):
    """Flatten ``B`` examples into sequences padded on the right.

    Returns a dict: ``input_ids``, ``attention_mask``, ``labels`` ``(N, T)``;
    ``row``/``col`` ``(N,)`` (the example and response slot of each sequence);
    ``valid`` and ``rewards`` ``(B, l)``; ``tokens`` (non-pad tokens) and
    ``positions`` (all positions the model computes, padding included).

    ``pack`` > 0: the ``N`` sequences are packed into rows of at most
    ``max(pack, T)`` tokens (first fit, longest first; ``pack=1``: rows as
    long as the longest sequence, so never more positions than padding), each
    sequence restarting its ``position_ids`` at 0, with no attention mask: a
    model that takes packed sequences (transformers' Llama family and others,
    which then attend within each sequence only) computes no padding but the
    tail of each row. ``input_ids``, ``labels``, ``position_ids`` and ``segments`` (the
    sequence of each position, -1 for padding) are ``(R, L)``; ``seq_labels``
    ``(N, T)`` and ``gather`` (each sequence's positions in the flattened rows)
    give the padded per-sequence view (:func:`unpack`)."""
    l = slots or max(ex.n_responses for ex in examples)
    seqs, labs, row, col = [], [], [], []
    for b, ex in enumerate(examples):
        for j, (s, lab) in enumerate(zip(ex.input_ids, labels_for(ex))):
            seqs.append(s)
            labs.append(lab)
            row.append(b)
            col.append(j)
    T = max(len(s) for s in seqs)
    N = len(seqs)
    input_ids = torch.full((N, T), pad_id, dtype=torch.long)
    labels = torch.full((N, T), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((N, T), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        input_ids[i, : len(s)] = torch.from_numpy(s)
        labels[i, : len(s)] = torch.from_numpy(lab)
        attn[i, : len(s)] = 1
    out = {"input_ids": input_ids, "attention_mask": attn, "labels": labels, "positions": N * T}
    if pack:
        out = _pack(seqs, labs, labels, pad_id, pack)
    valid = torch.zeros((len(examples), l), dtype=torch.bool)
    rewards = torch.zeros((len(examples), l), dtype=torch.float32)
    for b, ex in enumerate(examples):
        valid[b, : ex.n_responses] = True
        rewards[b, : ex.n_responses] = torch.tensor(ex.rewards, dtype=torch.float32)
    out.update({"row": torch.tensor(row), "col": torch.tensor(col), "valid": valid, "rewards": rewards,
                "tokens": sum(len(s) for s in seqs)})
    return out


def _pack(seqs: Sequence[np.ndarray], labs: Sequence[np.ndarray], seq_labels, pad_id: int, capacity: int) -> Dict[str, Any]:
    """The packed rows of :func:`collate` (``pack=capacity``)."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # stable: ties keep their order
    capacity = max(capacity, len(seqs[order[0]]))
    rows: List[List[int]] = []
    room: List[int] = []
    for i in order:
        n = len(seqs[i])
        for r, left in enumerate(room):
            if n <= left:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    L = max(sum(len(seqs[i]) for i in r) for r in rows)
    R = len(rows)
    input_ids = torch.full((R, L), pad_id, dtype=torch.long)
    labels = torch.full((R, L), IGNORE_INDEX, dtype=torch.long)
    segments = torch.full((R, L), -1, dtype=torch.long)
    position_ids = torch.zeros((R, L), dtype=torch.long)
    T = seq_labels.shape[1]
    gather = torch.zeros((len(seqs), T), dtype=torch.long)  # padding positions of the per-sequence view read position 0
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = len(seqs[i])
            input_ids[r, at:at + n] = torch.from_numpy(seqs[i])
            labels[r, at:at + n] = torch.from_numpy(labs[i])
            labels[r, at] = IGNORE_INDEX  # never predicted from the previous sequence's last token
            segments[r, at:at + n] = i
            position_ids[r, at:at + n] = torch.arange(n)
            gather[i, :n] = r * L + at + torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(L - at)  # the tail: a sequence of its own, attended by nothing real
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segments": segments,
            "seq_labels": seq_labels, "gather": gather, "positions": R * L}


def unpack(x, batch):
    """Per-sequence ``(N, T, ...)`` view of a packed batch's per-position
    tensor ``x`` ``(R, L, ...)`` (differentiable); ``x`` itself for a padded batch."""
    if "gather" not in batch:
        return x
    g = batch["gather"].to(x.device)
    return x.reshape(-1, *x.shape[2:])[g.reshape(-1)].reshape(*g.shape, *x.shape[2:])


@dataclass
class Prepared:
    examples: List[Example]
    template: str
    data_hash: str
    q_diff: Optional[np.ndarray]
    distribution_meta: Dict[str, str]
    tokenizer: Any  # HF tokenizer
    policy_tokenizer: Any  # deft.distribution.PolicyTokenizer
    eos_token_id: int
    pad_token_id: int
    eval_examples: Optional[List[Example]] = None  # the eval split's (best, worst) pairs (train.eval_data / eval_holdout)
    eval_hash: Optional[str] = None


def policy_tokenizers(cfg: Mapping[str, Any]):
    """The policy's tokenizer as ``(hf_tokenizer, PolicyTokenizer)``: the
    Hugging Face one (chat template, EOS, saving) and deft's native identity of
    the same ``tokenizer.json`` (the vocabulary `deft distribution` counted)."""
    spec = cfg["tokenizer"] or cfg["model"]
    hf_tok = load_tokenizer(cfg["model"], tokenizer=cfg["tokenizer"], gguf_file=cfg.get("gguf_file"),
                            trust_remote_code=cfg["trust_remote_code"])
    return hf_tok, hf_policy_tokenizer(hf_tok, spec)


def frame_examples(cfg: Mapping[str, Any], frame: Any, template: str, hf_tok: Any, ptok: Any, method: Optional[str] = None) -> List[Example]:
    """Tokenised :class:`Example` s of the rows of a canonical (or graded)
    frame, as ``method`` (default ``method.name``) uses their responses."""

    method = method or cfg["method"]["name"]
    has_scores = "scores" in frame.columns
    ids, prompts, resps, rews = [], [], [], []
    for r in frame.iter_rows(named=True):
        rs, sc = select_responses(r["responses"], r["scores"] if has_scores else None, method, cfg["data"]["max_responses"])
        ids.append(r["id"])
        prompts.append(render_prompt(r["context"], template, hf_tok))
        resps.append(rs)
        rews.append(sc)
    lay = policy_layout(template, hf_tok)
    return encode_examples(
        ids, prompts, resps, rews, ptok.native, eos_token_id=int(hf_tok.eos_token_id), response_prefix=lay.prefix,
        max_length=cfg["data"]["max_length"], max_prompt_length=cfg["data"]["max_prompt_length"],
        num_threads=cfg["data"]["num_threads"], lead_ids=lay.lead_ids, response_suffix=lay.suffix, append_eos=lay.append_eos,
    )


def prepare_data(cfg: Mapping[str, Any]) -> Prepared:
    """Load the graded data, the distribution and the tokenizer; tokenise."""
    spec = cfg["tokenizer"] or cfg["model"]
    hf_tok, ptok = policy_tokenizers(cfg)
    dist_meta: Dict[str, str] = {}
    q = None
    want = template = cfg["data"]["template"]
    if cfg["deft"]["enabled"]:
        dist = load_distribution(cfg["deft"]["distribution"], tokenizer=ptok)
        dist_meta = dict(dist.metadata)
        q = dist.q_diff.astype(np.float32)
        tmpl = dist_meta.get("template", "")
        if want != "auto" and want != tmpl:
            raise ValueError(f"data.template is {want!r} but {cfg['deft']['distribution']} was counted with template {tmpl!r}: "
                             f"responses would be tokenised differently; rebuild the distribution or set data.template={tmpl}")
        template = tmpl
    template = resolve_template(template, ptok, require=str(spec))  # auto resolved; chat needs a chat template
    eos = hf_tok.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {spec} has no eos_token_id; the trainer appends EOS after each response")
    pad = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else eos

    graded_path = Path(cfg["data"]["graded"])

    frame = read_graded(graded_path, ("id", "context", "responses", "level"))
    levels = list(cfg["data"]["levels"])
    frame = frame.filter(pl.col("level").is_in(levels))
    held = None
    if cfg["train"]["eval_holdout"] > 0:  # by prompt hash, as `deft experiment` splits: a repeated prompt is on one side
        from deft.experiment import split_by_prompt

        frame, held = split_by_prompt(frame, cfg["train"]["eval_holdout"])
    if cfg["data"]["max_samples"] is not None:
        frame = frame.head(cfg["data"]["max_samples"])
    if frame.height == 0:
        raise ValueError(f"{graded_path}: no samples at levels {levels}")
    examples = frame_examples(cfg, frame, template, hf_tok, ptok)
    ev = eval_frame(cfg, held)
    eval_examples = frame_examples(cfg, ev, template, hf_tok, ptok, method="dpo") if ev is not None else None
    return Prepared(examples, template, data_hash(examples), q, dist_meta, hf_tok, ptok, int(eos), int(pad),
                    eval_examples, data_hash(eval_examples) if eval_examples else None)


def eval_frame(cfg: Mapping[str, Any], held: Optional[Any] = None) -> Optional[Any]:
    """The eval split's rows (``id``, ``context``, ``responses``, best first):
    the held-out training rows ``held`` (``train.eval_holdout``), then those
    of ``train.eval_data`` (a graded.parquet, or any file :func:`deft.data.load`
    reads); rows with fewer than two responses left out, at most
    ``train.eval_max_samples``. ``None`` without an eval split."""
    t = cfg["train"]
    cols = ["id", "context", "responses"]
    frames = [held.select(cols)] if held is not None else []
    if t["eval_data"]:
        p = Path(t["eval_data"])
        if p.suffix == ".parquet":
            f = read_graded(p, cols)
        else:
            from deft.data import load

            f = load(p).frame
        frames.append(f.select(cols))
    if not frames:
        return None
    frame = pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]
    frame = frame.filter(pl.col("responses").list.len() >= 2)
    if t["eval_max_samples"] is not None:
        frame = frame.head(t["eval_max_samples"])
    if frame.height == 0:
        raise ValueError(f"the eval split (train.eval_data {t['eval_data']}, train.eval_holdout {t['eval_holdout']:g}) "
                         "holds no pair (a row with at least two responses)")
    return frame


# ---------------------------------------------------------------------------
# schedule and data order


def lr_lambda(total_steps: int, warmup_steps: int, kind: str):
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        rest = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / rest)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return f


def epoch_order(n: int, seed: int, epoch: int, group: int) -> np.ndarray:
    """Seeded permutation of ``range(n)``, wrapped around to a multiple of ``group``."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    pad = (-n) % group
    if pad:
        perm = np.concatenate([perm, np.resize(perm, pad)])
    return perm


# ---------------------------------------------------------------------------
# model forward and losses


def _model_fingerprint(cfg: Mapping[str, Any]) -> str:
    """Identity of the initial weights (:func:`deft._hf.weights_fingerprint`)."""
    return weights_fingerprint(cfg["model"], cfg.get("gguf_file"))


def _forward(model, batch, device, autocast_dtype, need_hidden: bool, from_hidden: bool = False):
    """The model's output on a batch. ``from_hidden`` (``train.logprobs:
    hidden``): the hidden states and the logits of the last position only
    (``logits_to_keep=1``); :func:`_seq_logps` then computes the log-probs
    from the hidden states, chunk by chunk, and the B x T x V logits never exist."""
    ctx = torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    extra = {"logits_to_keep": 1} if from_hidden else {}
    if "position_ids" in batch:  # packed rows: no attention mask, the position ids delimit the sequences
        extra["position_ids"] = batch["position_ids"].to(device)
    else:
        extra["attention_mask"] = batch["attention_mask"].to(device)
    with ctx:
        out = model(input_ids=batch["input_ids"].to(device), output_hidden_states=need_hidden or from_hidden, use_cache=False, **extra)
    return out


def _seq_logps(out, batch, device, module=None):
    """Summed response log-probs and token counts: from the logits, or -- when
    the output holds fewer logits than positions (``_forward(from_hidden=True)``)
    -- from the last hidden states through ``module``'s lm_head."""
    labels = batch["labels"].to(device)
    seg = {"segments": batch["segments"], "n_segments": len(batch["row"])} if "segments" in batch else {}
    if module is not None and out.logits.shape[1] < labels.shape[1]:
        return logprobs_for_model(module, out.hidden_states[-1], labels, **seg)
    return response_logprobs(out.logits, labels, **seg)


def to_slots(values, batch, fill=0.0):
    B, l = batch["valid"].shape
    out = torch.full((B, l), fill, dtype=values.dtype, device=values.device)
    return out.index_put((batch["row"].to(values.device), batch["col"].to(values.device)), values)


def padded_lengths(batch, device) -> torch.Tensor:
    """``(B,)``: per prompt, the positions of its longest sequence (prompt +
    response + end), which is the length the official RRHF code pads that
    prompt's responses to (it trains one prompt per batch): the same whatever
    the micro-batch size, packing or grouping."""
    if "segments" in batch:  # packed rows: the positions of each sequence
        seg = batch["segments"].to(device)
        seq_len = torch.bincount(seg[seg >= 0], minlength=len(batch["row"]))
    else:
        seq_len = batch["attention_mask"].to(device).sum(dim=1)
    return to_slots(seq_len, batch, 0).amax(dim=1)


def loss_terms(cfg, method: str, module, out, batch, device, q_diff, ref: Optional[Any]):
    """The two terms of one micro-batch's objective, ``(L_m, R_dis, metrics)``:
    ``L_m`` the method's loss (with its SFT term), ``R_dis`` the distribution
    reward (``None`` without a distribution)."""
    logp, ntok = _seq_logps(out, batch, device, module)
    logp_s = to_slots(logp, batch)
    len_s = to_slots(ntok, batch, 0)
    valid = batch["valid"].to(device)
    rewards = batch["rewards"].to(device)
    m = cfg["method"]
    w_sft = sft_weight(m)
    metrics: Dict[str, float] = {}
    if method == "sft":
        lm = sft_loss(logp_s, len_s, valid)
    elif method in WITH_REFERENCE:  # dpo, ipo, kto: against the cached reference log-probs
        assert ref is not None
        ref = ref.to(device=device, dtype=logp_s.dtype)
        if method == "dpo":
            o = dpo_loss(logp_s[:, 0], logp_s[:, 1], ref[:, 0], ref[:, 1], beta=m["beta"], label_smoothing=m["label_smoothing"])
        elif method == "ipo":
            o = ipo_loss(logp_s[:, 0], logp_s[:, 1], ref[:, 0], ref[:, 1], beta=m["beta"], chosen_lengths=len_s[:, 0], rejected_lengths=len_s[:, 1])
        else:
            assert "kto_kl" in batch, "kto needs the reference point (_kto_reference_point)"
            o = kto_loss(logp_s[:, 0], logp_s[:, 1], ref[:, 0], ref[:, 1], batch["kto_kl"], beta=m["beta"],
                         desirable_weight=m["desirable_weight"], undesirable_weight=m["undesirable_weight"])
        lm = o.loss
        metrics.update({k: v for k, v in o.metrics().items() if k != "loss"})
        if w_sft != 0.0:  # RPO-style: + weight x length-normalised NLL of the preferred response
            lm = _with_sft_term(lm, w_sft * sft_loss(logp_s[:, 0], len_s[:, 0], valid[:, 0], reduction="sequence"), metrics)
    elif method in REFERENCE_FREE:  # no reference log-probs
        o, sft_term = reference_free_loss(m, method, logp_s[:, 0], logp_s[:, 1], len_s[:, 0], len_s[:, 1], valid[:, 0])
        lm = o.loss
        metrics.update({k: v for k, v in o.metrics().items() if k != "loss"})
        if sft_term is not None:
            lm = _with_sft_term(lm, sft_term, metrics)
    elif method == "rrhf" and m.get("variant") == "official":  # the reference's form: rrhf_weight = 1 / sft_weight
        o = rrhf_loss_official(logp_s, len_s, padded_lengths(batch, device), valid, rewards=rewards, rrhf_weight=1.0 / w_sft)
        lm = o.loss
        metrics.update({"rank_loss": float(o.rank_loss.detach()), "sft_term": float(o.sft_term.detach())})
    elif method == "rrhf":
        o = rrhf_loss(None, logp_s, len_s, valid, sft_weight=w_sft, rewards=rewards)
        lm = o.loss
        metrics.update({"rank_loss": float(o.rank_loss.detach()), "sft_term": float(o.sft_term.detach())})
    elif method == "pro":
        s, usable = length_normalized_scores(logp_s, len_s, valid)
        o = pro_loss(s, rewards, logp_s[:, 0], valid=usable, sft_weight=w_sft, official=m.get("variant") == "official")
        lm = o.loss
        metrics.update({"rank_loss": float(o.rank_loss.detach()), "sft_term": float(o.sft_term.detach())})
    else:  # pragma: no cover - validated by the config
        raise ValueError(f"unknown method {method!r}")
    r_dis = None
    if q_diff is not None:  # per sequence (a packed batch is unpacked: the hidden states are d-sized)
        labels = batch.get("seq_labels", batch["labels"]).to(device)
        best = batch["col"].to(device) == 0 if cfg["deft"]["responses"] == "best" else None
        mask = rdis_mask(labels, best)
        r_dis = rdis_for_model(module, unpack(out.hidden_states[-1], batch), q_diff, mask)
        metrics["R_dis"] = float(r_dis.detach())
    return lm, r_dis, metrics


def _with_sft_term(pair_loss, sft_term, metrics: Dict[str, float]):
    """``pair_loss + sft_term``, logging both (``pair_loss``, ``sft_term``)."""
    metrics.update({"pair_loss": float(pair_loss.detach()), "sft_term": float(sft_term.detach())})
    return pair_loss + sft_term


def reference_free_loss(m: Mapping[str, Any], method: str, pc, pr, nc, nr, valid_c=None) -> Tuple[PreferenceLossOutput, Optional[Any]]:
    """A reference-free method's loss (SimPO, CPO, ORPO) from summed log-probs
    ``pc``, ``pr`` and token counts ``nc``, ``nr`` of the (best, worst) pairs:
    its pairwise output and its NLL term, ``method.sft_weight`` x
    :func:`deft.losses.sft_loss` over all preferred-response tokens together
    (``reduction="token"``: TRL's CPO and ORPO trainers' ``CrossEntropyLoss``
    on the chosen responses), or ``None`` when the weight is 0."""
    if method == "simpo":
        o = simpo_loss(pc, pr, nc, nr, beta=m["beta"], gamma=m["gamma"], label_smoothing=m["label_smoothing"])
    elif method == "cpo":
        o = cpo_loss(pc, pr, beta=m["beta"], label_smoothing=m["label_smoothing"])
    elif method == "orpo":
        o = orpo_loss(pc, pr, nc, nr, beta=m["beta"])
    else:  # pragma: no cover - REFERENCE_FREE lists the three
        raise ValueError(f"{method!r} is not a reference-free method")
    w = sft_weight(m)
    return o, (w * sft_loss(pc, nc, valid_c, reduction="token") if w != 0.0 else None)


def compute_loss(cfg, method: str, module, out, batch, device, q_diff, ref: Optional[Any]):
    """Loss ``L_m - omega * R_dis`` and metrics of one micro-batch from the model output."""
    lm, r_dis, metrics = loss_terms(cfg, method, module, out, batch, device, q_diff, ref)
    loss = lm if r_dis is None else deft_loss(lm, r_dis, cfg["deft"]["omega"])
    metrics["L_m"] = float(lm.detach())
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def grad_terms(lm, r_dis, params, *, retain_graph: bool = False) -> Dict[str, float]:
    """Exact gradient norms of the two terms over ``params`` (two separate
    backward passes through the same graph) and their inner product:
    ``{"norm_L_m", "norm_R_dis", "dot"}`` with ``dot = grad(L_m) . grad(R_dis)``.
    Nothing is accumulated into ``.grad``. ``retain_graph``: keep the graph for
    a later backward of the training loss (measuring on the step's own graph)."""
    g_m = torch.autograd.grad(lm, params, retain_graph=True, allow_unused=True)
    g_r = torch.autograd.grad(r_dis, params, retain_graph=retain_graph, allow_unused=True)
    nm = nr = dot = 0.0
    for a, b in zip(g_m, g_r):
        if a is not None:
            nm += float(a.double().pow(2).sum())
        if b is not None:
            nr += float(b.double().pow(2).sum())
        if a is not None and b is not None:
            dot += float((a.double() * b.double()).sum())
    return {"norm_L_m": math.sqrt(nm), "norm_R_dis": math.sqrt(nr), "dot": dot}


def share_metrics(g: Mapping[str, float], omega: float) -> Dict[str, float]:
    """``rdis_grad_share = ||grad(omega R_dis)|| / ||grad L_m||`` and
    ``rdis_grad_cosine``, the cosine between ``grad L_m`` and
    ``grad(-omega R_dis)`` -- the two terms as the minimised loss
    ``L_m - omega R_dis`` adds them (positive: R_dis pushes the same way as
    L_m)."""
    nm, nr = g["norm_L_m"], g["norm_R_dis"]
    share = abs(omega) * nr / nm if nm > 0 else float("inf") if omega and nr > 0 else 0.0
    sign = -1.0 if omega >= 0 else 1.0
    cos = sign * g["dot"] / (nm * nr) if nm > 0 and nr > 0 else 0.0
    return {"rdis_grad_share": share, "rdis_grad_cosine": cos, "grad_norm_L_m": nm, "grad_norm_R_dis": nr}


def _diagnose(job: "Job", eng: "Engine", batch, ref) -> Dict[str, float]:
    """Gradient norms of L_m and R_dis on one micro-batch, without touching
    the training state (gradients, RNG)."""
    devices = [eng.device] if eng.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if job.method == "kto" and "kto_kl" not in batch:
            batch["kto_kl"] = _kto_reference_point(job, eng, eng.module, batch, ref)
        # through the module, not a DeepSpeed engine: the engine's forward hooks expect engine.backward
        out = _forward(eng.module, batch, eng.device, eng.autocast_dtype, need_hidden=True, from_hidden=job.from_hidden)
        lm, r_dis, _ = loss_terms(job.cfg, job.method, eng.module, out, batch, eng.device, job.q_diff, ref)
        return grad_terms(lm, r_dis, eng.params)


# ---------------------------------------------------------------------------
# distributed setup


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False
    env_set: List[str] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup_dist(use_deepspeed: bool, cuda: bool) -> Dist:
    d = Dist()
    launched = "WORLD_SIZE" in os.environ
    if not launched:
        defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
        for k, v in defaults.items():
            if k not in os.environ:
                os.environ[k] = v
                d.env_set.append(k)
    d.rank, d.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    d.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not use_deepspeed:
        if d.world > 1:
            raise ValueError("the plain PyTorch loop (train.deepspeed: null) runs in one process; use a DeepSpeed config for several")
        return d
    if not td.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
        d.initialized_here = True
    return d


def _teardown_dist(d: Dist) -> None:
    if d.initialized_here and td.is_initialized():
        td.destroy_process_group()
    for k in d.env_set:
        os.environ.pop(k, None)


def _barrier(d: Dist) -> None:
    if td.is_initialized() and d.world > 1:
        td.barrier()


# ---------------------------------------------------------------------------
# RNG and checkpoints


def _rng_state() -> Dict[str, Any]:
    # plain containers and tensors only, so checkpoints load with torch.load(weights_only=True)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Mapping[str, Any]) -> None:
    random.setstate(st["python"])
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def list_checkpoints(output_dir: Path) -> List[Tuple[int, Path]]:
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and p.is_dir() and (p / "trainer_state.json").exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _finalize_checkpoint(tmp: Path, final: Path) -> None:
    """Publish a fully written checkpoint folder (atomic rename)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def _prune_checkpoints(output_dir: Path, keep: int) -> None:
    cks = list_checkpoints(output_dir)
    for _, p in cks[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------
# the trainer: train() sets up the processes, _train() is the recipe (setup ->
# loop of step() calls -> final save), read top to bottom.


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Optional[Path]
    global_step: int
    total_steps: int
    last_metrics: Dict[str, float]
    ref_cache: Optional[Path] = None
    ref_cache_hit: bool = False
    resumed_from: Optional[int] = None


#: micro-batches per window of train.group_by_length's sort (Schedule.micro_batches)
LENGTH_WINDOW = 64


@dataclass
class Schedule:
    """How ``n`` samples become optimizer steps: each step takes
    ``accumulation`` micro-batches of ``micro_batch_size`` samples on each of
    ``world`` ranks (``group`` samples in all)."""

    n: int
    micro_batch_size: int
    accumulation: int
    world: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def of(cls, t: Mapping[str, Any], n: int, world: int) -> "Schedule":
        mbs, gas = t["micro_batch_size"], t["gradient_accumulation_steps"]
        steps_per_epoch = math.ceil(n / (mbs * world * gas))
        total = t["max_steps"] if t["max_steps"] is not None else steps_per_epoch * t["epochs"]
        warmup = t["warmup_steps"] if t["warmup_steps"] is not None else int(math.ceil(t["warmup_ratio"] * total))
        return cls(n, mbs, gas, world, steps_per_epoch, total, warmup)

    @property
    def group(self) -> int:
        return self.micro_batch_size * self.world * self.accumulation

    def micro_batches(self, seed: int, epoch: int, lengths: Optional[np.ndarray] = None) -> List[np.ndarray]:
        """Epoch ``epoch``'s micro-batches, each the sample indices of every
        rank (rank ``r`` takes slot ``r``): ``steps_per_epoch x accumulation`` of them.

        ``lengths`` (``train.group_by_length``: each sample's longest
        sequence): within each window of :data:`LENGTH_WINDOW` micro-batches of
        the shuffled order, the samples are sorted by length, so that each
        micro-batch holds similar lengths, and the window's micro-batches are
        then shuffled again (seeded by ``seed`` and ``epoch``, so a resumed run
        sees the same order)."""
        order = epoch_order(self.n, seed, epoch, self.group)
        size = self.micro_batch_size * self.world
        batches = [order[i: i + size] for i in range(0, len(order), size)]
        if lengths is None:
            return batches
        rng = np.random.default_rng([seed, epoch, 1])
        out: List[np.ndarray] = []
        for w in range(0, len(batches), LENGTH_WINDOW):
            window = np.concatenate(batches[w: w + LENGTH_WINDOW])
            window = window[np.argsort(-lengths[window], kind="stable")]
            sorted_batches = [window[i: i + size] for i in range(0, len(window), size)]
            out.extend(sorted_batches[j] for j in rng.permutation(len(sorted_batches)))
        return out


@dataclass
class Engine:
    """The model and what updates it: a DeepSpeed engine, or a plain PyTorch
    optimizer and scheduler."""

    model: Any  # the Hugging Face model as loaded
    module: Any  # the model the losses read (the engine's module under DeepSpeed)
    runner: Any  # what the training forward pass runs through (the DeepSpeed engine, or the model)
    ds: Any  # the DeepSpeed engine, or None
    optimizer: Any
    scheduler: Any
    device: torch.device
    autocast_dtype: Optional[torch.dtype]
    params: List[Any]  # the trained parameters
    accumulation: int
    max_grad_norm: float
    hf_ds_config: Any = None  # kept alive under ZeRO-3: from_pretrained and save read it through a weak reference
    adapter: Optional[Dict[str, Any]] = None  # the LoRA adapter trained (peft), or None: every weight is trained
    loading: Dict[str, Any] = field(default_factory=dict)  # how the policy was loaded (dtype, attention, ...), for the manifest

    def reference_mode(self):
        """The context the reference log-probs are computed in: the policy
        with its LoRA adapter disabled (no second copy of the model), or as it is."""
        return self.module.disable_adapter() if self.adapter is not None else contextlib.nullcontext()

    @property
    def zero3(self) -> bool:
        return self.ds is not None and self.ds.zero_optimization_stage() == 3

    def backward(self, loss, boundary: bool):
        """Backward of one micro-batch; at an accumulation ``boundary`` also
        clip, update and schedule. Returns the gradient norm before clipping
        at a boundary, else ``None``."""
        if self.ds is not None:
            self.ds.backward(loss)
            manual = None
            if boundary and self.ds.zero_optimization_stage() == 0:  # ZeRO-0 does not report its norm: take it before clipping
                grads = [p.grad.detach().float().norm(2) for p in self.params if p.grad is not None]
                manual = torch.stack(grads).norm(2) if grads else None
            self.ds.step()
            gn = self.ds.get_global_grad_norm() if boundary else None
            return manual if gn is None else gn
        (loss / self.accumulation).backward()
        if not boundary:
            return None
        gn = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm if self.max_grad_norm > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gn

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.optimizer.param_groups[0]["lr"])


@dataclass
class Job:
    """What stays fixed during a run: config, processes, data, distribution,
    reference log-probs."""

    cfg: Dict[str, Any]
    method: str
    out_dir: Path
    d: Dist
    prep: Prepared
    sched: Schedule
    model_fp: str
    q_diff: Optional[Any]  # torch tensor on the training device, or None
    ref_all: Optional[Any] = None  # (N, 2) reference log-probs (DPO/IPO)
    eval_ref: Optional[Any] = None  # (E, 2) reference log-probs of the eval pairs
    kl_examples: Optional[List[Example]] = None  # KTO: the mismatched pairs of each example (kto_kl_examples)
    kl_ref: Optional[Any] = None  # KTO: (N, 2) their reference log-probs
    kl_ref_path: Optional[Path] = None  # KTO: their cache file
    eval_info: Optional[Dict[str, Any]] = None  # the eval split, for the manifest
    reporting: Dict[str, Any] = field(default_factory=dict)  # where the metrics were reported (deft.reporting.Reporter.record)
    diagnose: bool = False  # measure the R_dis gradient share (deft.diagnose_every)
    from_hidden: bool = False  # log-probs from the hidden states, chunk by chunk (train.logprobs: hidden)
    pack: int = 0  # tokens per packed row (train.packing), 0: padded batches

    def batch(self, gidx: np.ndarray, pack: Optional[int] = None):
        """This rank's slice of a micro-batch: the collated batch (packed into
        rows of ``pack`` tokens, default :attr:`pack`) and its reference log-probs."""
        mbs = self.sched.micro_batch_size
        idx = gidx[self.d.rank * mbs:(self.d.rank + 1) * mbs]
        ref = self.ref_all[torch.as_tensor(idx)] if self.ref_all is not None else None
        b = collate([self.prep.examples[i] for i in idx], self.prep.pad_token_id, pack=self.pack if pack is None else pack)
        if self.kl_examples is not None:  # KTO: the mismatched pairs ride along, their reference log-probs in ref[:, 2:]
            b["kl"] = collate([self.kl_examples[i] for i in idx], self.prep.pad_token_id, pack=self.pack if pack is None else pack)
            ref = torch.cat([ref, self.kl_ref[torch.as_tensor(idx)]], dim=1)
        return b, ref

    def micro_batches(self, epoch: int) -> List[np.ndarray]:
        t = self.cfg["train"]
        lengths = None
        if t["group_by_length"]:
            lengths = np.array([max(len(s) for s in ex.input_ids) for ex in self.prep.examples])
        return self.sched.micro_batches(t["seed"], epoch, lengths)

    def diagnose_at(self, step: int) -> bool:
        every = self.cfg["deft"]["diagnose_every"]
        return self.diagnose and (step == 0 or (every > 0 and step % every == 0))

    def eval_at(self, step: int) -> bool:
        """Whether the eval split is evaluated after optimizer step ``step``
        (0: before training): then, every ``train.eval_steps`` and at the end."""
        every = self.cfg["train"]["eval_steps"]
        return self.eval_ref is not None and (step == 0 or step == self.sched.total_steps or (every > 0 and step % every == 0))


@dataclass
class TrainState:
    """What the loop advances and a checkpoint records (with the weights, the
    optimizer and every rank's RNG)."""

    global_step: int = 0
    epoch: int = 0
    omega: Dict[str, Any] = field(default_factory=dict)  # value and source (deft.omega, calibrated, checkpoint)
    resumed_from: Optional[int] = None


def _git_commit() -> Optional[str]:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                           cwd=Path(__file__).resolve().parent)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


@locked_output("train", lambda a: a["cfg"]["train"]["output_dir"], when=lambda a: int(os.environ.get("RANK", "0")) == 0)
def train(cfg: Mapping[str, Any], *, resume: bool = False) -> TrainResult:
    """Run a training job described by a validated config (see :mod:`deft.config`)."""
    cfg = copy.deepcopy(dict(cfg))
    cfg["method"]["sft_weight"] = sft_weight(cfg["method"])  # the effective weight (null: the method's default)
    t = cfg["train"]
    use_ds = t["deepspeed"] is not None
    cuda = torch.cuda.is_available() and t["device"] != "cpu"
    if use_ds and not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    d = _setup_dist(use_ds, cuda)
    try:
        return _train(cfg, resume, d, use_ds, cuda)
    finally:
        _teardown_dist(d)


def _train(cfg: Dict[str, Any], resume: bool, d: Dist, use_ds: bool, cuda: bool) -> TrainResult:
    t, method, out_dir = cfg["train"], cfg["method"]["name"], Path(cfg["train"]["output_dir"])
    # ----- setup: device, output folder, data, model and optimizer, reference log-probs
    device, bf16 = _device_and_precision(t, cuda, d)
    resume = _claim_output_dir(out_dir, resume, d)
    _seed_all(t["seed"])
    prep = prepare_data(cfg)
    sched = Schedule.of(t, len(prep.examples), d.world)
    kl_examples = None
    if method == "kto":  # its mismatched pairs (at least 2 samples) before the model is loaded and the reference pass
        if t["micro_batch_size"] < 2:
            _log("warning: kto estimates its reference point per micro-batch, from its prompts paired with other samples' "
                 "completions: with train.micro_batch_size 1 that is 2 pairs (TRL refuses a batch of 1); the kto configs use 4")
        kl_examples = kto_kl_examples(prep.examples, cfg["data"]["max_length"])
    _log(f"{sched.n} samples (levels {','.join(cfg['data']['levels'])}), method {method}, DEFT {'on' if prep.q_diff is not None else 'off'}, "
         f"template {prep.template}; {sched.steps_per_epoch} steps/epoch, {sched.total_steps} steps, world {d.world}")
    model_fp = _model_fingerprint(cfg)
    eng = _build_engine(cfg, prep, sched, d, device, bf16, use_ds)
    q_diff = torch.from_numpy(prep.q_diff).to(device) if prep.q_diff is not None else None
    job = Job(cfg, method, out_dir, d, prep, sched, model_fp, q_diff)
    job.from_hidden = t["logprobs"] == "hidden" and has_linear_head(eng.module)
    if t["logprobs"] == "hidden" and not job.from_hidden:
        _log("train.logprobs hidden: the model transforms its logits after the lm_head; computing them whole")
    eng.loading["logprobs"] = "hidden" if job.from_hidden else "logits"
    if t["packing"]:
        job.pack = int(t["pack_length"] or 1)  # null: rows as long as each micro-batch's longest sequence
        eng.loading["packing"] = _check_packing(job, eng)
    ref_path, ref_hit = None, False
    if method in WITH_REFERENCE:
        job.ref_all, ref_path, ref_hit = _reference_logps(job, eng, bf16)
    if method == "kto":
        job.kl_examples = kl_examples
        job.kl_ref, job.kl_ref_path = _kto_kl_reference_logps(job, eng, bf16)
    if prep.eval_examples:  # the eval pairs under the initial policy (every method: the reference of the implicit reward)
        job.eval_ref, eval_ref_path = _eval_reference_logps(job, eng, bf16)
        job.eval_info = {"data": t["eval_data"], "holdout": t["eval_holdout"], "pairs": len(prep.eval_examples),
                         "data_hash": prep.eval_hash, "eval_steps": t["eval_steps"], "reference_cache": str(eval_ref_path)}

    # ----- resume, then omega (as configured, or calibrated to a gradient share)
    state = _resume(job, eng) if resume else TrainState()
    sent_through = _last_logged_step(out_dir / "metrics.jsonl")  # what the interrupted process reported, before trimming
    # Whenever the run (re)starts at global_step, metric lines of later steps are stale: those an
    # interrupted run logged after its checkpoint, or all of them when it starts over.
    _trim_metrics(out_dir / "metrics.jsonl", state.global_step)
    if d.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    state.omega = _choose_omega(job, eng, state)

    # ----- loop: one step() per optimizer step, the eval split every train.eval_steps, a checkpoint every train.save_steps
    metrics_log = MetricsLog(out_dir / "metrics.jsonl" if d.rank == 0 else None)
    with Reporter(requested_backends(t) if d.rank == 0 else (), out_dir, cfg, resume_from=state.resumed_from,
                  sent_through=sent_through) as reporter:
        job.reporting = reporter.record

        def log(row: Dict[str, Any]) -> None:
            metrics_log.log(**row)
            reporter.log(row)

        if state.global_step == 0 and job.eval_at(0):
            log(_evaluate(job, eng, 0))
        bar = None
        if t["progress"] and d.rank == 0:
            bar = tqdm.auto.tqdm(total=sched.total_steps, initial=state.global_step, desc=f"{method}{'+deft' if q_diff is not None else ''}",
                                 unit="step", dynamic_ncols=True)
        last: Dict[str, float] = {}
        eng.runner.train()
        while state.global_step < sched.total_steps:
            state.epoch = state.global_step // sched.steps_per_epoch
            micro = job.micro_batches(state.epoch)
            for first in range((state.global_step % sched.steps_per_epoch) * sched.accumulation, len(micro), sched.accumulation):
                last = step(job, eng, state, micro, first)
                log(last)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")
                if job.eval_at(state.global_step):  # logged before the checkpoint: a resumed run does not repeat it
                    log(_evaluate(job, eng, state.global_step))
                if t["save_steps"] > 0 and state.global_step % t["save_steps"] == 0 and state.global_step < sched.total_steps:
                    _save_checkpoint(job, eng, state)
                if state.global_step >= sched.total_steps:
                    break
        if bar is not None:
            bar.close()
    if d.rank == 0:
        try:
            plot_curves(out_dir / "metrics.jsonl", out_dir / CURVES)
        except Exception as e:  # noqa: BLE001 - a plot is not worth the trained model
            _log(f"warning: {CURVES} not written: {type(e).__name__}: {e}")

    # ----- final model and manifest
    model_dir = _save_final(job, eng, state, ref_path)
    return TrainResult(out_dir, model_dir, state.global_step, sched.total_steps, last, ref_path, ref_hit, state.resumed_from)


def step(job: Job, eng: Engine, state: TrainState, micro: Sequence[np.ndarray], first: int) -> Dict[str, Any]:
    """One optimizer step over the micro-batches ``micro[first:first +
    accumulation]``: forward, loss, backward, then the update. Advances
    ``state.global_step`` and returns the step's metrics row (averaged over the
    micro-batches and, with several ranks, over the ranks)."""
    cfg, d, gas = job.cfg, job.d, job.sched.accumulation
    acc: Dict[str, List[float]] = {}
    diag: Dict[str, float] = {}
    tokens, positions, gn = 0, 0, None
    t0 = time.perf_counter()
    for mi in range(first, first + gas):
        batch, ref = job.batch(micro[mi])
        if job.method == "kto":
            batch["kto_kl"] = _kto_reference_point(job, eng, eng.runner, batch, ref)
        if mi == first and job.diagnose_at(state.global_step):  # measured before this step's update
            diag = share_metrics(_diagnose(job, eng, batch, ref), cfg["deft"]["omega"])
            if state.global_step == 0 and d.rank == 0 and diag["rdis_grad_share"] < LOW_SHARE:
                _log(f"warning: at step 0 the R_dis gradient is {diag['rdis_grad_share']:.2e} of the L_m gradient "
                     f"(omega {cfg['deft']['omega']:.3g}): below {LOW_SHARE:g}, the distribution reward cannot change the "
                     f"model at this omega; raise deft.omega or set deft.omega_share (e.g. 0.1)")
        out = _forward(eng.runner, batch, eng.device, eng.autocast_dtype, job.q_diff is not None, job.from_hidden)
        loss, mets = compute_loss(cfg, job.method, eng.module, out, batch, eng.device, job.q_diff, ref)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {float(loss)} at step {state.global_step + 1} (micro-batch {mi})")
        tokens += batch["tokens"]
        positions += batch["positions"]
        for k, v in mets.items():
            acc.setdefault(k, []).append(v)
        gn = eng.backward(loss, boundary=mi == first + gas - 1)
    state.global_step += 1
    dt = time.perf_counter() - t0
    row: Dict[str, Any] = {k: float(np.mean(v)) for k, v in acc.items()}
    row.update(diag)
    if d.world > 1:
        row = _mean_across(row, d)
    row.update({"step": state.global_step, "epoch": state.epoch + (first + gas) / len(micro),
                "lr": eng.lr(), "tokens_per_s": tokens * d.world / max(dt, 1e-9), "step_seconds": dt,
                "pad_share": 1.0 - tokens / max(positions, 1),
                "grad_norm": float(gn) if gn is not None else None})
    return row


# ----- setup


def _device_and_precision(t: Mapping[str, Any], cuda: bool, d: Dist) -> Tuple[torch.device, bool]:
    """The training device and whether to train in bf16."""
    if t["device"] not in ("auto", "cpu") and not t["device"].startswith("cuda"):
        raise ValueError(f"train.device: expected auto, cpu, cuda or cuda:N, got {t['device']!r}")
    if cuda:
        device = torch.device(t["device"]) if t["device"].startswith("cuda:") else torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    bf16 = (t["precision"] == "bf16") or (t["precision"] == "auto" and cuda)
    if bf16 and not cuda:
        raise ValueError("train.precision bf16 needs CUDA here; use fp32 (or auto) on CPU")
    return device, bf16


def _claim_output_dir(out_dir: Path, resume: bool, d: Dist) -> bool:
    """Refuse to clobber a run; clear what a killed run left half-written.
    Returns whether to resume (also when the previous run died publishing its
    final model)."""
    existing = list_checkpoints(out_dir)
    if not resume and interrupted_publication(out_dir / "manifest.json"):
        # the run finished but died publishing model/ and manifest.json: the same command completes it
        _log(f"{out_dir}: the final save of the previous run was interrupted; continuing from its newest checkpoint")
        resume = True
    if not resume and (existing or (out_dir / "model").exists()):  # every rank sees the same (shared) folder
        raise FileExistsError(f"{out_dir} already holds a run (checkpoints or model); pass --resume to continue it or choose another train.output_dir")
    if d.rank == 0:
        if (out_dir / CHECKPOINTS).is_dir():
            for p in (out_dir / CHECKPOINTS).iterdir():
                if p.name.startswith(".tmp-"):
                    shutil.rmtree(p, ignore_errors=True)  # a checkpoint a killed run did not finish
        remove_stale_temporaries(out_dir)  # e.g. manifest.json or metrics.jsonl writes a kill cut short
    _barrier(d)
    return resume


def load_dtype(use_ds: bool, bf16: bool) -> torch.dtype:
    """The dtype the policy's weights are loaded in: bf16 when DeepSpeed
    trains in bf16 (it keeps the float32 master weights in its optimizer, so a
    float32 copy of the model per rank would only be converted down), float32
    otherwise (the plain loop keeps float32 weights and autocasts to bf16)."""
    return torch.bfloat16 if use_ds and bf16 else torch.float32


def _load_model(cfg: Mapping[str, Any], dtype: torch.dtype = torch.float32, zero3: bool = False):
    """The policy, loaded in ``dtype`` with ``attn_implementation``; under
    ZeRO-3 (an ``HfDeepSpeedConfig`` alive) transformers constructs it
    partitioned, otherwise with ``low_cpu_mem_usage`` (no random
    initialisation of weights the checkpoint overwrites)."""
    extra: Dict[str, Any] = {}
    if cfg.get("attn_implementation"):
        extra["attn_implementation"] = cfg["attn_implementation"]
    if not zero3:
        extra["low_cpu_mem_usage"] = True  # transformers >= 5 always loads this way and ignores the flag
    try:
        model = load_causal_lm(cfg["model"], dtype=dtype, gguf_file=cfg.get("gguf_file"),
                               trust_remote_code=cfg["trust_remote_code"], allow_pickle=cfg.get("allow_pickle", False), **extra)
    except OSError as e:
        raise FileNotFoundError(f"model {cfg['model']}: {e}") from None
    if cfg["train"]["gradient_checkpointing"]:
        # non-reentrant: the R_dis gradient share takes torch.autograd.grad, which reentrant checkpointing refuses
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False
    return model


def _ds_config(cfg: Mapping[str, Any], world: int, bf16: bool) -> Dict[str, Any]:
    path = Path(cfg["train"]["deepspeed"])
    if not path.exists():
        raise FileNotFoundError(2, "DeepSpeed config not found", str(path))
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    t = cfg["train"]
    ds["train_micro_batch_size_per_gpu"] = t["micro_batch_size"]
    ds["gradient_accumulation_steps"] = t["gradient_accumulation_steps"]
    ds["train_batch_size"] = t["micro_batch_size"] * t["gradient_accumulation_steps"] * world
    ds["gradient_clipping"] = float(t["max_grad_norm"])  # explicit: DeepSpeed otherwise clips to 1.0
    ds["bf16"] = {**(ds.get("bf16") if isinstance(ds.get("bf16"), dict) else {}), "enabled": bool(bf16)}
    ds.pop("fp16", None)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    ds.setdefault("zero_allow_untested_optimizer", True)
    opt = ds.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        fill = {"lr": t["lr"], "betas": list(t["adam_betas"]), "eps": t["adam_eps"], "weight_decay": t["weight_decay"]}
        for k, v in fill.items():
            if params.get(k, "auto") == "auto":
                params[k] = v
    for key in ("scheduler",):
        if key in ds:
            raise ValueError(f"{path}: remove '{key}'; the schedule comes from train.scheduler/warmup")
    return ds


def _zero_stage(ds: Mapping[str, Any]) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def _build_engine(cfg: Mapping[str, Any], prep: Prepared, sched: Schedule, d: Dist, device: torch.device, bf16: bool,
                  use_ds: bool) -> Engine:
    """Load the policy and wrap it: a DeepSpeed engine (``train.deepspeed``)
    or the model with a torch AdamW and the LR schedule."""
    t = cfg["train"]
    ds_cfg = _ds_config(cfg, d.world, bf16) if use_ds else None
    hf_ds = None
    if ds_cfg is not None and _zero_stage(ds_cfg) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_cfg)  # from_pretrained partitions under zero.Init while this lives
    dtype = load_dtype(use_ds, bf16)
    model = _load_model(cfg, dtype, zero3=hf_ds is not None)
    loading = {"dtype": str(dtype).replace("torch.", ""), "attn_implementation": getattr(model.config, "_attn_implementation", None),
               "gradient_checkpointing": "non-reentrant" if t["gradient_checkpointing"] else None,
               "construction": "zero3-partitioned" if hf_ds is not None else "low_cpu_mem_usage"}
    adapter = None
    if cfg["peft"]["enabled"]:
        if hf_ds is not None:
            raise ValueError("peft.enabled: LoRA with ZeRO-3 is not supported; use ZeRO 0-2 (the adapter is small) or train every weight")
        model, adapter = _attach_adapter(cfg, model)
    head = model.get_output_embeddings()
    if prep.q_diff is not None and head is not None:
        rows = getattr(head.weight, "ds_shape", head.weight.shape)[0]
        if len(prep.q_diff) > rows:
            raise ValueError(f"distribution has {len(prep.q_diff)} entries but the model's lm_head has {rows} rows")
    sched_fn = lr_lambda(sched.total_steps, sched.warmup_steps, t["scheduler"])

    def make_opt(params):
        return torch.optim.AdamW(params, lr=t["lr"], betas=tuple(t["adam_betas"]), eps=t["adam_eps"], weight_decay=t["weight_decay"])

    if use_ds:
        import deepspeed

        params = [p for p in model.parameters() if p.requires_grad]
        client_opt = None if "optimizer" in ds_cfg else make_opt(params)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=client_opt, model_parameters=params, config=ds_cfg,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched_fn),
        )
        module, runner, autocast_dtype = engine.module, engine, None
    else:
        model.to(device)
        optimizer = make_opt([p for p in model.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, sched_fn)
        engine, module, runner = None, model, model
        autocast_dtype = torch.bfloat16 if bf16 else None
    return Engine(model, module, runner, engine, optimizer, scheduler, device, autocast_dtype,
                  [p for p in module.parameters() if p.requires_grad], sched.accumulation, float(t["max_grad_norm"]), hf_ds, adapter,
                  loading)


def _attach_adapter(cfg: Mapping[str, Any], model):
    """The policy with a LoRA adapter (``peft``): a new one (``peft.r``,
    ``alpha``, ``dropout``, ``target_modules``) or ``peft.path``'s, trainable.
    Only the adapter's parameters require gradients. Returns ``(model,
    record)``, the record going to the manifest and every checkpoint."""
    from peft import LoraConfig, PeftModel, get_peft_model  # the optional [lora] extra

    pf = cfg["peft"]
    if pf["path"]:
        if not (Path(pf["path"]) / "adapter_config.json").is_file():
            raise FileNotFoundError(2, "peft.path: not an adapter folder (no adapter_config.json)", str(pf["path"]))
        model = PeftModel.from_pretrained(model, pf["path"], is_trainable=True)
    else:
        targets = pf["target_modules"] if pf["target_modules"] not in (None, ["all-linear"]) else "all-linear"
        model = get_peft_model(model, LoraConfig(r=pf["r"], lora_alpha=pf["alpha"], lora_dropout=pf["dropout"],
                                                 target_modules=targets, bias="none", task_type="CAUSAL_LM"))
    if cfg["train"]["gradient_checkpointing"]:
        model.enable_input_require_grads()  # the frozen embeddings' output must carry a gradient into the checkpointed blocks
    lc = model.peft_config["default"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    record = {"r": int(lc.r), "alpha": float(lc.lora_alpha), "dropout": float(lc.lora_dropout),
              "target_modules": sorted({m.rsplit(".", 1)[-1] for m in ([lc.target_modules] if isinstance(lc.target_modules, str) else lc.target_modules)}),
              "path": pf["path"], "path_sha256": _sha(Path(pf["path"]) / "adapter_model.safetensors") if pf["path"] else None,
              "trainable_parameters": trainable, "total_parameters": total}
    _log(f"LoRA r={record['r']} alpha={record['alpha']:g}: {trainable:,} of {total:,} parameters trained "
         f"({100 * trainable / max(total, 1):.2f}%)")
    return model, record


def _check_packing(job: Job, eng: Engine) -> Dict[str, Any]:
    """Before training with ``train.packing``: the first micro-batch's
    response log-probs, packed and padded, under the initial weights (no
    gradient, dropout off). A model that takes packed sequences gives the same
    values up to rounding; one that ignores the position ids' boundaries
    attends across sequences and is refused. Returns the record for the
    manifest's ``loading``."""
    first = job.micro_batches(0)[0]
    batches = (job.batch(first)[0], job.batch(first, pack=0)[0])
    eng.runner.eval()
    try:
        with torch.no_grad():
            got = [_seq_logps(_forward(eng.runner, b, eng.device, eng.autocast_dtype, False, job.from_hidden), b, eng.device, eng.module)
                   for b in batches]
    finally:
        eng.runner.train()
    (lp_packed, n_packed), (lp_padded, n_padded) = got
    if not torch.equal(n_packed.cpu(), n_padded.cpu()):  # pragma: no cover - collate builds both from the same sequences
        raise RuntimeError("train.packing: the packed batch does not hold the padded batch's response tokens")
    per_token = ((lp_packed.double() - lp_padded.double()).abs() / n_padded.clamp_min(1).double()).max().item()
    tol = 2e-2 if eng.autocast_dtype is not None or next(eng.module.parameters()).dtype != torch.float32 else 1e-4
    if not per_token <= tol:
        raise ValueError(f"train.packing: {type(eng.module).__name__} does not keep packed sequences apart (response log-probs "
                         f"differ from the padded batch's by {per_token:.3g} per token, above {tol:g}): the model ignores the "
                         f"per-sequence position ids; set train.packing: false")
    rows = f"{job.pack} tokens" if job.pack > 1 else "each micro-batch's longest sequence"
    _log(f"packing: rows of {rows}; packed and padded log-probs agree to {per_token:.2g} per token")
    return {"pack_length": job.cfg["train"]["pack_length"], "check_max_diff_per_token": per_token}


def _resume(job: Job, eng: Engine) -> TrainState:
    """The state of the newest checkpoint, loaded into ``eng`` (weights,
    optimizer, scheduler, this rank's RNG); a fresh state when there is none."""
    cks = list_checkpoints(job.out_dir)
    if not cks:
        _log("--resume: no checkpoint yet; starting from the beginning")
        return TrainState()
    step, ck = cks[-1]
    state = _load_checkpoint_file(ck / "trainer_state.json", lambda f: json.loads(f.read_text(encoding="utf-8")))
    if state["data_hash"] != job.prep.data_hash:
        raise ValueError(f"cannot resume from {ck}: the training data differ (tokenised data hash changed)")
    if state["model_fingerprint"] != job.model_fp:
        raise ValueError(f"cannot resume from {ck}: the initial model differs")
    s, d = job.sched, job.d
    if state["world_size"] * state["micro_batch_size"] * state["gradient_accumulation_steps"] != s.group:
        raise ValueError(f"cannot resume from {ck}: global batch {state['world_size']}x{state['micro_batch_size']}x"
                         f"{state['gradient_accumulation_steps']} differs from {d.world}x{s.micro_batch_size}x{s.accumulation}")
    if state.get("peft") != eng.adapter:
        raise ValueError(f"cannot resume from {ck}: it was trained with peft {state.get('peft')}, this run has {eng.adapter}")
    was_grouped = bool(((state.get("config") or {}).get("train") or {}).get("group_by_length", False))
    if was_grouped != job.cfg["train"]["group_by_length"]:  # another order of the samples: the rest of the epoch would repeat some
        raise ValueError(f"cannot resume from {ck}: it was trained with train.group_by_length {str(was_grouped).lower()}, "
                         f"this run has {str(job.cfg['train']['group_by_length']).lower()} (another order of the samples)")
    if "method" in state:  # the loss (checkpoints from before this record resume unchecked): the same data, another objective
        was, now = state["method"] or {}, method_fingerprint(job.cfg["method"])
        diff = [f"method.{k} {json.dumps(was.get(k))} -> {json.dumps(now.get(k))}"
                for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
        if diff:
            raise ValueError(f"cannot resume from {ck}: it was trained with another loss ({', '.join(diff)})")
    if eng.ds is not None:
        path, _ = _load_checkpoint_file(ck / "ds", lambda f: eng.ds.load_checkpoint(
            str(ck), tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True,
            load_module_strict=eng.adapter is None))  # with an adapter, only the trainable weights were saved
        if path is None:
            raise ValueError(f"cannot resume: DeepSpeed could not load {ck}")
    else:
        if eng.adapter is not None:  # the adapter's weights; the base model is the one loaded
            _load_checkpoint_file(ck / ADAPTER_WEIGHTS, lambda f: _load_adapter_weights(eng.module, load_file(str(f))))
        else:
            _load_checkpoint_file(ck / "model.safetensors", lambda f: eng.model.load_state_dict(load_file(str(f)), strict=True))
        # weights_only: no arbitrary unpickling (a foreign pickle is refused, as a CheckpointError)
        other = _load_checkpoint_file(ck / "optimizer.pt", lambda f: torch.load(f, map_location=eng.device, weights_only=True))
        _load_checkpoint_file(ck / "optimizer.pt", lambda f: (eng.optimizer.load_state_dict(other["optimizer"]),
                                                               eng.scheduler.load_state_dict(other["scheduler"])))
    rng_file = ck / f"rng_rank{d.rank}.pt"
    if rng_file.exists():
        _load_checkpoint_file(rng_file, lambda f: _set_rng_state(torch.load(f, weights_only=True)))
    _log(f"resumed from {ck} (step {step})")
    return TrainState(global_step=step, omega=dict(state.get("omega") or {}), resumed_from=step)


def _choose_omega(job: Job, eng: Engine, state: TrainState) -> Dict[str, Any]:
    """omega as configured (``deft.omega``), or calibrated to
    ``deft.omega_share`` on the initial weights (and then kept in every
    checkpoint: a resumed run reuses it). Sets ``cfg["deft"]["omega"]`` and
    whether the loop measures the gradient share (``job.diagnose``)."""
    q_diff, deft_cfg = job.q_diff, job.cfg["deft"]
    restored = state.omega or None  # what the checkpoint recorded (None: starting afresh, or an old checkpoint)
    zero3 = eng.zero3
    job.diagnose = q_diff is not None and not zero3
    if q_diff is not None and zero3:
        _log("warning: rdis_grad_share is not measured under ZeRO-3 (the parameters are partitioned)")
    omega_info: Dict[str, Any] = {"value": deft_cfg["omega"], "source": "deft.omega"}
    eng.runner.train()  # measured in the mode it trains in (dropout)
    if q_diff is not None and deft_cfg["omega_share"] is not None:
        if zero3:
            raise ValueError("deft.omega_share needs the gradient of each term, which ZeRO-3 partitions; set deft.omega instead")
        if restored is not None and restored.get("omega_share") == deft_cfg["omega_share"]:
            omega_info = dict(restored, source="checkpoint")
            _log(f"omega {omega_info['value']:.4g} (calibrated to share {deft_cfg['omega_share']:g}; from the checkpoint)")
        elif state.global_step > 0:  # calibrating now would measure the trained weights, not the initial ones
            had = restored.get("omega_share") if restored else None
            raise ValueError(f"cannot resume with deft.omega_share {deft_cfg['omega_share']:g}: the checkpoint at step {state.global_step} "
                             f"was trained with {'omega_share ' + format(had, 'g') if had is not None else 'a fixed omega'}; "
                             f"use the same setting or start a new run")
        else:
            omega_info = _calibrate_omega(job, eng)
        deft_cfg["omega"] = float(omega_info["value"])
    if job.diagnose and deft_cfg["omega"] == 0.0:
        job.diagnose = False  # R_dis is off (the -R_dis ablation): its share is 0 by construction
    return omega_info


def _calibrate_omega(job: Job, eng: Engine) -> Dict[str, Any]:
    """omega such that ``omega * ||grad R_dis|| = omega_share * ||grad L_m||``,
    with the median ratio over the first ``deft.calibration_batches``
    micro-batches of the first epoch (the initial weights)."""
    cfg, d = job.cfg, job.d
    share = float(cfg["deft"]["omega_share"])
    micro = job.micro_batches(0)
    ratios = []
    t0 = time.perf_counter()
    for gidx in micro[:cfg["deft"]["calibration_batches"]]:
        batch, ref = job.batch(gidx)
        ratios.append(grad_ratio(_diagnose(job, eng, batch, ref)))
    info = omega_for_share(share, ratios, (lambda rho: _mean_across({"rho": rho}, d)["rho"]) if d.world > 1 else None)
    _log(f"omega {info['value']:.4g}: ||grad R_dis|| / ||grad L_m|| = {info['ratio_median']:.4g} (median of {len(ratios)} "
         f"micro-batches, {time.perf_counter() - t0:.1f}s), for a gradient share of {share:g}")
    return info


def grad_ratio(g: Mapping[str, float]) -> float:
    """``||grad R_dis|| / ||grad L_m||`` of one :func:`grad_terms` measurement (inf when L_m has no gradient)."""
    return g["norm_R_dis"] / g["norm_L_m"] if g["norm_L_m"] > 0 else float("inf")


def omega_for_share(share: float, ratios: Sequence[float], reduce: Optional[Callable[[float], float]] = None,
                    key: str = "deft.omega_share", instead: str = "deft.omega") -> Dict[str, Any]:
    """omega such that ``omega * ||grad R_dis|| = share * ||grad L_m||`` from the
    measured ratios (:func:`grad_ratio`, one per micro-batch): ``share / median``,
    the median first combined across processes by ``reduce`` (a mean). The record
    the manifest and checkpoints keep: ``{"value", "source", "omega_share",
    "ratio_median", "ratios"}``. A ValueError when no finite positive ratio exists."""
    rho = float(np.median(ratios))
    if reduce is not None:
        rho = float(reduce(rho))
    if not (rho > 0 and math.isfinite(rho)):
        raise ValueError(f"{key}: cannot calibrate omega, ||grad R_dis|| / ||grad L_m|| is {rho} on the first "
                         f"{len(ratios)} micro-batches; set {instead} instead")
    return {"value": share / rho, "source": "calibrated", "omega_share": float(share), "ratio_median": rho,
            "ratios": [float(r) for r in ratios]}


# ----- loop helpers


def _evaluate(job: Job, eng: Engine, step: int) -> Dict[str, Any]:
    """The eval row of optimizer step ``step``: on the eval pairs, in eval
    mode without gradients, the implicit reward ``beta * log(pi / pi_ref)``
    of the best and the worst response as `deft experiment` measures it
    (summed log-probs, the reference the initial policy): ``eval/accuracy``
    (a tie counts 1/2, so the initial policy scores exactly 0.5),
    ``eval/margin``, ``eval/chosen_reward``, ``eval/rejected_reward``, the
    per-token NLL of the best response ``eval/nll`` and, for SFT, DPO, IPO,
    SimPO, CPO and ORPO, the method's loss ``eval/loss`` (without R_dis; not
    for KTO, whose reference point needs mismatched pairs of the eval split). Every rank computes the
    same row (the pairs are sharded and gathered)."""
    cfg, t0 = job.cfg, time.perf_counter()
    m = cfg["method"]
    logp, ntok = _pair_logps(job, eng, job.prep.eval_examples, _eval_batch_size(cfg))
    ref = job.eval_ref.double()
    lc, lr, rc, rr = logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1]
    beta = float(m["beta"])
    margin = beta * ((lc - rc) - (lr - rr))
    acc = (margin > 0).double() + 0.5 * (margin == 0).double()
    nc = ntok[:, 0].clamp(min=1)
    row: Dict[str, Any] = {"step": step, "eval/accuracy": float(acc.mean()), "eval/margin": float(margin.mean()),
                           "eval/chosen_reward": float((beta * (lc - rc)).mean()), "eval/rejected_reward": float((beta * (lr - rr)).mean()),
                           "eval/nll": float((-lc / nc).mean())}
    w_sft = sft_weight(m)
    loss = None
    if job.method == "sft":
        loss = sft_loss(lc, ntok[:, 0])
    elif job.method == "dpo":
        loss = dpo_loss(lc, lr, rc, rr, beta=beta, label_smoothing=m["label_smoothing"]).loss
    elif job.method == "ipo":
        loss = ipo_loss(lc, lr, rc, rr, beta=beta, chosen_lengths=ntok[:, 0], rejected_lengths=ntok[:, 1]).loss
    elif job.method in REFERENCE_FREE:  # its own loss needs no reference: the same as in training
        o, nll = reference_free_loss(m, job.method, lc, lr, ntok[:, 0], ntok[:, 1])
        loss = o.loss if nll is None else o.loss + nll
    if loss is not None and job.method in PAIRWISE and w_sft != 0.0:
        loss = loss + w_sft * sft_loss(lc, ntok[:, 0], reduction="sequence")
    if loss is not None:
        row["eval/loss"] = float(loss)
    row["eval/seconds"] = time.perf_counter() - t0
    _log(f"eval at step {step} ({len(lc)} pairs): accuracy {row['eval/accuracy']:.4f}, margin {row['eval/margin']:.4g}, "
         f"nll {row['eval/nll']:.4f}")
    return row


def _last_logged_step(path: Path) -> int:
    """The highest step in a metrics.jsonl (0: none, or not rank 0)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    return max((int(r["step"]) for r in read_metrics(path)), default=0)


def _mean_across(row: Dict[str, float], d: Dist) -> Dict[str, float]:
    keys = sorted(row)
    v = torch.tensor([row[k] for k in keys], dtype=torch.float64)
    if td.get_backend() == "nccl":
        v = v.cuda()
    td.all_reduce(v)
    return {k: float(x) / d.world for k, x in zip(keys, v.cpu().tolist())}


# ----- checkpoints and the final save


def _load_checkpoint_file(path: Path, load: Callable[[Path], Any]) -> Any:
    """``load(path)`` for a file of a checkpoint ``--resume`` reads; a file that
    is missing, truncated, foreign or refused by ``torch.load(weights_only=True)``
    (a pickle that would run code) becomes one :class:`deft.errors.CheckpointError`
    naming the file."""
    try:
        return load(path)
    except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, KeyError, ValueError, SafetensorError) as e:
        # a device or communication failure (out of memory, CUDA, NCCL) says nothing about the file: keep it
        if isinstance(e, RuntimeError) and not isinstance(e, pickle.UnpicklingError) and (
                is_oom(e) or any(k in str(e) for k in ("CUDA", "NCCL", "cuDNN", "HIP", "XPU"))):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"checkpoint {path} is not a deft checkpoint or is unsafe to load: {type(e).__name__}"
                              f"{': ' + first if first else ''}; delete the checkpoint folder to resume from an earlier one") from None


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines of steps after ``step``, the one a run (re)starts from
    (0: starting over drops them all, the eval row of step 0 too)."""
    if int(os.environ.get("RANK", "0")) != 0 or not path.exists():
        return

    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if step > 0 and json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
    write_text_atomic(path, "".join(l + "\n" for l in keep))


def _adapter_weights(module) -> Dict[str, Any]:
    return {n: p.detach().contiguous().cpu() for n, p in module.named_parameters() if p.requires_grad}


def _load_adapter_weights(module, sd: Mapping[str, Any]) -> None:
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if set(params) != set(sd):
        missing, extra = sorted(set(params) - set(sd)), sorted(set(sd) - set(params))
        raise KeyError(f"the adapter's parameters differ (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(sd[n])


def _save_checkpoint(job: Job, eng: Engine, state: TrainState) -> Path:
    """``checkpoints/step-N``: written into a temporary folder by every rank,
    then renamed by rank 0 (the last ``train.save_total_limit`` kept)."""
    cfg, d, out_dir = job.cfg, job.d, job.out_dir
    root = out_dir / CHECKPOINTS
    tmp = root / f".tmp-step-{state.global_step}"
    final = root / f"step-{state.global_step}"
    if d.rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier(d)
    if eng.ds is not None:
        eng.ds.save_checkpoint(str(tmp), tag="ds", exclude_frozen_parameters=eng.adapter is not None)
    elif d.rank == 0 and eng.adapter is not None:  # the adapter's weights only: the base model is unchanged
        save_file(_adapter_weights(eng.module), str(tmp / ADAPTER_WEIGHTS))
        torch.save({"optimizer": eng.optimizer.state_dict(), "scheduler": eng.scheduler.state_dict()}, tmp / "optimizer.pt")
    elif d.rank == 0:
        sd = {k: v.detach().contiguous().cpu() for k, v in eng.model.state_dict().items()}
        # tied weights share storage; safetensors refuses shared tensors, so clone them
        seen: Dict[int, str] = {}
        for k, v in sd.items():
            ptr = v.data_ptr()
            if ptr in seen:
                sd[k] = v.clone()
            seen[ptr] = k
        save_file(sd, str(tmp / "model.safetensors"))
        torch.save({"optimizer": eng.optimizer.state_dict(), "scheduler": eng.scheduler.state_dict()}, tmp / "optimizer.pt")
    torch.save(_rng_state(), tmp / f"rng_rank{d.rank}.pt")
    _barrier(d)
    if d.rank == 0:
        trainer_state = {
            "global_step": state.global_step, "epoch": state.epoch, "data_hash": job.prep.data_hash, "model_fingerprint": job.model_fp,
            "world_size": d.world, "micro_batch_size": cfg["train"]["micro_batch_size"],
            "gradient_accumulation_steps": cfg["train"]["gradient_accumulation_steps"], "config": cfg,
            "method": method_fingerprint(cfg["method"]),  # what _resume compares: the loss
            "omega": dict(state.omega) if state.omega else None,
        }
        if eng.adapter is not None:
            trainer_state["peft"] = eng.adapter
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        _finalize_checkpoint(tmp, final)
        _prune_checkpoints(out_dir, cfg["train"]["save_total_limit"])
    _barrier(d)
    return final


def _save_final(job: Job, eng: Engine, state: TrainState, ref_path: Optional[Path]) -> Optional[Path]:
    """``OUTPUT_DIR/model`` (safetensors, with the tokenizer and its model card
    ``README.md``), then ``manifest.json``, published together (an interrupted
    save is completed by the same command)."""
    cfg, d, out_dir, prep = job.cfg, job.d, job.out_dir, job.prep
    state_dict = eng.ds._zero3_consolidated_16bit_state_dict() if eng.zero3 else None
    model_dir = out_dir / "model"
    merged_dir = out_dir / "merged" if eng.adapter is not None and cfg["peft"]["merge"] else None
    if d.rank == 0:
        manifest = _final_manifest(job, eng, state, ref_path, model_dir, merged_dir)
        # model/ (and merged/), then manifest.json
        pub = begin_publication(out_dir / "manifest.json", [model_dir] + ([merged_dir] if merged_dir else []), overwrite=True)
        tmp = out_dir / ".tmp-model"
        if tmp.exists():
            shutil.rmtree(tmp)
        kw = {"safe_serialization": True}
        if state_dict is not None:
            kw["state_dict"] = state_dict
        eng.module.save_pretrained(str(tmp), **kw)  # with an adapter: adapter_model.safetensors and adapter_config.json
        prep.tokenizer.save_pretrained(str(tmp))
        if eng.adapter is not None:  # what deft._hf.load_causal_lm loads the adapter onto
            write_json_atomic(tmp / ADAPTER_BASE, {"base_model": cfg["model"], "gguf_file": cfg.get("gguf_file"),
                                                   "fingerprint": job.model_fp})
        _write_card(job, manifest, tmp, model_dir)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(tmp, model_dir)
        if not (model_dir / CARD_NAME).exists():  # writing it failed (a warning): not an output
            manifest["outputs"].pop("card", None)
        if merged_dir is not None:  # last: merging changes the module's weights in place
            tmp = out_dir / ".tmp-merged"
            if tmp.exists():
                shutil.rmtree(tmp)
            eng.module.merge_and_unload().save_pretrained(str(tmp), safe_serialization=True)
            prep.tokenizer.save_pretrained(str(tmp))
            _write_card(job, manifest, tmp, merged_dir, merged=True)
            if merged_dir.exists():
                shutil.rmtree(merged_dir)
            os.replace(tmp, merged_dir)
        write_json_atomic(out_dir / "manifest.json", manifest)
        pub.done()
    _barrier(d)
    return model_dir


def _final_manifest(job: Job, eng: Engine, state: TrainState, ref_path: Optional[Path], model_dir: Path,
                    merged_dir: Optional[Path]) -> Dict[str, Any]:
    """What ``OUTPUT_DIR/manifest.json`` records of a finished run (and the model card reads)."""
    cfg, d, out_dir, prep = job.cfg, job.d, job.out_dir, job.prep
    return {
        "stage": "train",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": sys.argv,
        "config": cfg,
        "method": cfg["method"]["name"],
        "deft": cfg["deft"]["enabled"],
        "template": prep.template,
        "samples": len(prep.examples),
        "data_hash": prep.data_hash,
        "graded": {"path": str(cfg["data"]["graded"]), "sha256": _sha(cfg["data"]["graded"])},
        "distribution": ({"path": cfg["deft"]["distribution"], "sha256": _sha(cfg["deft"]["distribution"]),
                          "metadata": prep.distribution_meta} if cfg["deft"]["enabled"] else None),
        "model": {"source": cfg["model"], "gguf_file": cfg.get("gguf_file"), "fingerprint": job.model_fp},
        "tokenizer": {"source": prep.policy_tokenizer.source, "sha256": prep.policy_tokenizer.sha256,
                      "vocab_hash": prep.policy_tokenizer.vocab_hash, "eos_token_id": prep.eos_token_id},
        "reference_cache": str(ref_path) if ref_path else None,
        "kto_reference_cache": str(job.kl_ref_path) if job.kl_ref_path else None,  # KTO: the mismatched pairs' reference
        "eval": job.eval_info,
        "reporting": job.reporting or None,
        "peft": eng.adapter,
        "loading": eng.loading,
        "omega": dict(state.omega) if state.omega and cfg["deft"]["enabled"] else None,
        "diagnostics": diagnostics_summary(out_dir / "metrics.jsonl"),
        "world_size": d.world,
        "global_step": state.global_step,
        "total_steps": job.sched.total_steps,
        "steps_per_epoch": job.sched.steps_per_epoch,
        "outputs": {"model": str(model_dir), "metrics": str(out_dir / "metrics.jsonl"),
                    "card": str(model_dir / CARD_NAME),
                    **({"curves": str(out_dir / CURVES)} if (out_dir / CURVES).exists() else {}),
                    **({"merged": str(merged_dir)} if merged_dir else {})},
        "versions": versions(),
        "git_commit": _git_commit(),
    }


def _write_card(job: Job, manifest: Mapping[str, Any], folder: Path, final: Path, *, merged: bool = False) -> None:
    """The model card ``folder/README.md`` (:func:`deft.model_card.write_card`)
    of the model folder that ``folder`` becomes, ``final``; a failure is a
    warning, not worth the trained model."""
    cfg = job.cfg
    try:
        write_card(folder, manifest, job.out_dir / "metrics.jsonl", cfg["deft"]["distribution"] if cfg["deft"]["enabled"] else None,
                   tokenizer=job.prep.policy_tokenizer, merged=merged, top=cfg["card"]["top_tokens"])
    except Exception as e:  # noqa: BLE001
        _log(f"warning: model card {final / CARD_NAME} not written: {type(e).__name__}: {e}")


def diagnostics_summary(metrics_path: Path) -> Optional[Dict[str, Any]]:
    """The R_dis gradient share and cosine over a run's metrics.jsonl:
    ``{"rdis_grad_share": {"step_0", "median", "last"}, "rdis_grad_cosine": {...},
    "measured_steps"}``, or ``None`` when none was measured."""
    rows = []
    if metrics_path.exists():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and r.get("rdis_grad_share") is not None:
                rows.append(r)
    if not rows:
        return None
    out: Dict[str, Any] = {"measured_steps": [int(r["step"]) - 1 for r in rows]}
    for k in ("rdis_grad_share", "rdis_grad_cosine"):
        v = [float(r[k]) for r in rows]
        out[k] = {"step_0": v[0] if rows[0]["step"] == 1 else None, "median": float(np.median(v)), "last": v[-1]}
    return out


def _sha(path) -> Optional[str]:
    try:
        return sha256_file(path)
    except OSError:
        return None


# ---------------------------------------------------------------------------
# reference log-probs


def _reference_logps(job: Job, eng: Engine, bf16: bool):
    """``(N, 2)`` float32 summed log-probs of (best, worst) under the initial
    policy; cached on disk. Returns (tensor, path, cache_hit)."""
    cfg, prep, t = job.cfg, job.prep, job.cfg["train"]
    key = {"model": job.model_fp, "data": prep.data_hash, "bf16": bf16, "max_length": cfg["data"]["max_length"]}
    return _cached_pair_logps(job, eng, prep.examples, t["ref_batch_size"] or t["micro_batch_size"], key, "ref",
                              prep.data_hash, bf16, "reference log-probs", "samples")


def _kto_kl_reference_logps(job: Job, eng: Engine, bf16: bool):
    """``(N, 2)`` float32 reference log-probs of KTO's mismatched pairs
    (:attr:`Job.kl_examples`), cached like the training reference's, and
    the cache file."""
    cfg, t = job.cfg, job.cfg["train"]
    kl_hash = data_hash(job.kl_examples)
    key = {"model": job.model_fp, "data": kl_hash, "bf16": bf16, "max_length": cfg["data"]["max_length"]}
    ref, path, _ = _cached_pair_logps(job, eng, job.kl_examples, t["ref_batch_size"] or t["micro_batch_size"], key, "ref-kto-kl",
                                      kl_hash, bf16, "KTO reference-point log-probs", "samples")
    return ref, path


def _kto_reference_point(job: Job, eng: Engine, model, batch, ref):
    """KTO's reference point for one micro-batch: the mean over its mismatched
    pairs (``batch["kl"]``) of the policy's summed log-prob minus the
    reference's (``ref[:, 2:]``), under ``model`` without gradients (in the
    mode it trains in, as TRL's ``_compute_kl_logps``), averaged over the
    ranks (TRL gathers it over processes), detached; :func:`deft.losses.kto_loss`
    clamps it at 0."""
    kl = batch["kl"]
    with torch.no_grad():
        out = _forward(model, kl, eng.device, eng.autocast_dtype, need_hidden=False, from_hidden=job.from_hidden)
        logp, ntok = _seq_logps(out, kl, eng.device, eng.module)
    pol = to_slots(logp, kl)
    usable = kl["valid"].to(pol.device) & (to_slots(ntok, kl, 0) > 0)
    z = kto_reference_point(pol, ref[:, 2:4].to(device=pol.device, dtype=pol.dtype), usable)
    if job.d.world > 1:
        z = z.clone()
        td.all_reduce(z)
        z = z / job.d.world
    return z


def _cached_pair_logps(job: Job, eng: Engine, examples: Sequence[Example], bs: int, key: Mapping[str, Any], prefix: str,
                       data_hash: str, bf16: bool, what: str, unit: str):
    """``(len(examples), 2)`` float32 log-probs of (best, worst) under the
    initial policy (:func:`_pair_logps` with ``reference=True``), read from
    or written (atomically, by rank 0) to ``REF_CACHE/PREFIX-HASH.safetensors``,
    ``HASH`` that of ``key``. Returns (tensor, path, cache_hit)."""
    t, d = job.cfg["train"], job.d
    digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()
    path = Path(t["ref_cache_dir"] or Path(t["output_dir"]) / "ref_cache") / f"{prefix}-{digest[:24]}.safetensors"
    n = len(examples)
    if path.exists():
        ref = load_file(str(path))["ref_logps"]
        if ref.shape == (n, 2):
            _log(f"{what}: reusing {path}")
            return ref, path, True
    t0 = time.perf_counter()
    ref, _ = _pair_logps(job, eng, examples, bs, reference=True, desc=what if t["progress"] else None)
    ref = ref.float()
    if d.rank == 0:
        with atomic_path(path) as tmp:
            save_file({"ref_logps": ref.contiguous()}, str(tmp), metadata={"model_fingerprint": job.model_fp, "data_hash": data_hash,
                                                                          "bf16": str(bf16), "format": "deft-ref-logps-v1"})
    _barrier(d)
    _log(f"{what} for {n} {unit} in {time.perf_counter() - t0:.1f}s -> {path}")
    return ref, path, False


def _pair_logps(job: Job, eng: Engine, examples: Sequence[Example], bs: int, *, reference: bool = False,
                desc: Optional[str] = None):
    """``(N, 2)`` float64 summed log-probs and token counts of (best, worst)
    of each example, in eval mode without gradients, under the policy as it
    is or (``reference``) its reference (with a LoRA adapter: the base
    model). The examples are sharded over the ranks, the same count on each
    (ZeRO-3 runs the forwards in lockstep), in batches of ``bs``, and gathered:
    every rank returns all of them. ``desc``: a progress bar (rank 0)."""
    d, pad = job.d, job.prep.pad_token_id
    n = len(examples)
    per_rank = math.ceil(n / d.world)
    mine = [min(i, n - 1) for i in range(d.rank * per_rank, (d.rank + 1) * per_rank)]  # same count on every rank (ZeRO-3 lockstep)
    res = torch.zeros((n, 4), dtype=torch.float64)  # log-probs (best, worst), token counts (best, worst)
    eng.runner.eval()
    bar = None
    if desc is not None and d.rank == 0:
        bar = tqdm.auto.tqdm(total=len(mine), desc=desc, unit="sample", dynamic_ncols=True)
    with torch.no_grad(), (eng.reference_mode() if reference else contextlib.nullcontext()):
        for i in range(0, len(mine), bs):
            idx = mine[i:i + bs]
            batch = collate([examples[j] for j in idx], pad, slots=2)
            out = _forward(eng.runner, batch, eng.device, eng.autocast_dtype, need_hidden=False, from_hidden=job.from_hidden)
            logp, ntok = _seq_logps(out, batch, eng.device, eng.module)
            vals = torch.cat([to_slots(logp.float(), batch).cpu().double(), to_slots(ntok, batch, 0).cpu().double()], dim=1)
            for k, j in enumerate(idx):
                if d.rank * per_rank + i + k < n:  # owned, not padding
                    res[j] = vals[k]
            if bar is not None:
                bar.update(len(idx))
    if bar is not None:
        bar.close()
    eng.runner.train()
    if d.world > 1:
        r = res.cuda() if td.get_backend() == "nccl" else res
        td.all_reduce(r)
        res = r.cpu()
    return res[:, :2].contiguous(), res[:, 2:].contiguous()


def _eval_batch_size(cfg: Mapping[str, Any]) -> int:
    return cfg["train"]["eval_batch_size"] or cfg["train"]["micro_batch_size"]


def _eval_reference_logps(job: Job, eng: Engine, bf16: bool):
    """``(E, 2)`` float32 summed log-probs of the eval pairs under the initial
    policy (the reference of the eval's implicit reward, for every method;
    with a LoRA adapter the base model), computed before a resumed run loads
    its checkpoint, in the batches the evaluation uses (so that the policy
    before training has margins of exactly 0); cached beside the training
    reference, keyed by what changes those batches' numerics. Returns (tensor, path)."""
    cfg, prep, d = job.cfg, job.prep, job.d
    key = {"model": job.model_fp, "eval_data": prep.eval_hash, "bf16": bf16, "batch": _eval_batch_size(cfg), "world": d.world,
           "logprobs": job.from_hidden, "max_length": cfg["data"]["max_length"],
           "zero": eng.ds.zero_optimization_stage() if eng.ds is not None else None, "lora": eng.adapter is not None}
    ref, path, _ = _cached_pair_logps(job, eng, prep.eval_examples, _eval_batch_size(cfg), key, "ref-eval", prep.eval_hash, bf16,
                                      "eval reference log-probs", "pairs")
    return ref, path


# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# entry point used by the CLI


def run(config: Optional[str], overrides: Sequence[str] = (), *, resume: bool = False) -> TrainResult:
    cfg = load_config(config, overrides)
    return train(cfg, resume=resume)
