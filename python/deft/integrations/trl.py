"""DEFT inside TRL: :class:`DeftDPOTrainer`, TRL's ``DPOTrainer`` with the
distribution reward, ``loss = L_m - omega * R_dis``.

``L_m`` is whatever TRL's ``DPOTrainer`` computes for the batch (any of its
``loss_type`` s, its reference handling, its RPO term), untouched: the
subclass calls TRL's ``compute_loss`` and subtracts ``omega * R_dis``.
``R_dis = mean_seq mean_t sum_v Q_diff[v] log softmax(z_t)[v]`` over the
response tokens (:mod:`deft.ops`), computed from the final hidden states
through the lm_head, as ``deft train`` computes it.

Where the hidden states come from. TRL 1.16 computes the log-probs with a
fused LM head (``add_fused_lm_head``): the model's forward runs its backbone
and projects the backbone's ``last_hidden_state`` in tiles, so neither logits
nor hidden states come back. A forward hook on that backbone (the
``base_model`` the fused forward calls) keeps the ``last_hidden_state`` of the
policy's forward -- the first forward inside ``compute_loss``; a reference
forward through the same module (PEFT, adapter disabled) comes after it and
is ignored. R_dis is then one GEMV per token on that tensor (no logits), and
its gradient flows through the same graph as TRL's loss. No TRL code is
copied.

Metrics, in TRL's logs (``trainer.state.log_history``, and every
``report_to``): ``R_dis``, ``L_m`` (TRL's loss), ``omega``, and at step 0
and every ``diagnose_every`` optimizer steps ``rdis_grad_share =
||grad(omega R_dis)|| / ||grad L_m||``, ``rdis_grad_cosine``,
``grad_norm_L_m`` and ``grad_norm_R_dis`` (:func:`deft.train.share_metrics`),
measured on that step's first micro-batch from its own graph (two more
backward passes, nothing written to ``.grad``); eval rows get ``eval_R_dis``,
``eval_L_m``. ``omega_share`` sets omega before training from the median
ratio over the first ``calibration_batches`` micro-batches
(:func:`deft.train.omega_for_share`, as ``deft.omega_share``), and every
checkpoint keeps the value (``deft_omega.json``, written with the weights,
before trainer_state.json and a Hub push), which a resumed run reuses. The
calibration runs as training does: its forwards under the accelerator's
autocast (bf16/fp16) and, when the arguments ask for it, with activation
checkpointing on (off again afterwards until ``Trainer.train`` turns it on).
Activation checkpointing must be non-reentrant (the share takes
``torch.autograd.grad``): ``use_reentrant`` unset becomes False, True is refused.

Tested in one process (CPU). Not supported: vision-language models; models
whose logits are transformed after the lm_head (softcapping, a logit scale);
``omega_share`` under DeepSpeed or FSDP (pass ``omega``); the gradient share
is not measured when parameters are partitioned (ZeRO-3, FSDP).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

try:
    import trl
    from trl import DPOTrainer
except ImportError as e:  # pragma: no cover - exercised in a subprocess without trl
    raise ImportError(
        f'deft.integrations.trl needs TRL (trl>=1.16,<2), which is not installed ({e}): pip install "deft[trl]"'
    ) from e

from accelerate.utils import is_peft_model
from packaging.version import Version
from transformers.trainer_utils import get_last_checkpoint

from deft.distribution import Distribution, check_vocabulary, hf_policy_tokenizer, load_distribution
from deft.export import export_pairs
from deft.grade import read_graded
from deft.io import write_json_atomic
from deft.losses import IGNORE_INDEX, deft_loss
from deft.ops import linear_head, prepare_q, rdis_for_model, rdis_mask
from deft.train import LOW_SHARE, grad_ratio, grad_terms, omega_for_share, share_metrics

__all__ = ["DeftDPOTrainer", "graded_pairs", "load_qdiff", "trl_batch_rdis", "OMEGA_FILE"]

if Version(trl.__version__) < Version("1.16"):  # pragma: no cover
    raise ImportError(f'deft.integrations.trl needs trl>=1.16,<2 (installed: {trl.__version__}): pip install "deft[trl]"')

logger = logging.getLogger(__name__)

#: The omega record written into every checkpoint folder, read back on resume.
OMEGA_FILE = "deft_omega.json"
RESPONSES = ("all", "best")
QDiffLike = Union[str, "os.PathLike[str]", Distribution, torch.Tensor, np.ndarray]


def load_qdiff(qdiff: QDiffLike) -> Tuple[torch.Tensor, Optional[Distribution], str]:
    """``(q_diff as a float32 CPU tensor, its Distribution or None, a name for messages)``
    of a ``deft distribution`` file (safetensors, never pickle), a loaded
    :class:`deft.distribution.Distribution`, or a 1-D tensor / array."""
    dist: Optional[Distribution] = None
    if isinstance(qdiff, (str, os.PathLike)):
        source = str(qdiff)
        dist = load_distribution(qdiff)
        values: Any = dist.q_diff
    elif isinstance(qdiff, Distribution):
        dist, values = qdiff, qdiff.q_diff
        source = f"the distribution counted with {qdiff.metadata.get('tokenizer_source', '?')}"
    elif isinstance(qdiff, (torch.Tensor, np.ndarray)):
        values, source = qdiff, "the given Q_diff tensor"
    else:
        raise TypeError(f"qdiff: a qdiff.safetensors path, a deft Distribution or a 1-D tensor, got {type(qdiff).__name__}")
    q = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float32)
    if q.dim() != 1 or q.numel() == 0:
        raise ValueError(f"{source}: Q_diff must be a non-empty 1-D vector over the vocabulary, got shape {tuple(q.shape)}")
    if not bool(torch.isfinite(q).all()):
        raise ValueError(f"{source}: Q_diff holds {int((~torch.isfinite(q)).sum())} non-finite values")
    return q.contiguous(), dist, source


def graded_pairs(graded: Union[str, "os.PathLike[str]"], *, levels: Sequence[str] = ("A",), template: str = "chat"):
    """The rows of a ``graded.parquet`` (`deft grade`) at ``levels`` as a TRL
    preference dataset (``datasets.Dataset`` of ``prompt``/``chosen``/``rejected``),
    one pair per prompt: the best response chosen, the worst rejected, as
    ``deft train`` pairs them (:func:`deft.export.export_pairs`, what `deft
    export` writes; a sample whose scores are all equal gives no pair).
    ``template`` must be the one Q_diff was counted with (``deft distribution
    show`` prints it): ``chat`` gives conversational records (TRL applies the
    tokenizer's chat template), ``plain`` HH text prompts ending in
    ``Assistant:`` and ``" " + response``."""
    from datasets import Dataset

    if template not in ("chat", "plain"):
        raise ValueError(f"template must be 'chat' or 'plain' (the template Q_diff was counted with), got {template!r}")
    frame = read_graded(graded, ("id", "subset", "context", "responses", "scores", "level"))
    result = export_pairs(frame, levels=list(levels), style="conversational" if template == "chat" else "standard")
    if result.records.height == 0:
        raise ValueError(f"{graded}: no pairs at levels {list(levels)} ({result.counts['samples']} samples there, "
                         f"{result.counts['no_preference']} without a preference; levels present: "
                         f"{sorted(frame['level'].unique().to_list())})")
    return Dataset.from_list(result.records.select("prompt", "chosen", "rejected").to_dicts())


def trl_batch_rdis(model: torch.nn.Module, hidden: torch.Tensor, inputs: Dict[str, torch.Tensor], q_diff: torch.Tensor,
                   responses: str = "all") -> torch.Tensor:
    """R_dis of a batch of TRL's ``DataCollatorForPreference`` (rows: the chosen
    sequences, then the rejected ones; ``completion_mask`` marks the response
    tokens) from the final hidden states ``hidden`` (the lm_head's input),
    through ``model``'s lm_head: the mean over the sequences (``responses="best"``:
    the chosen ones only) of each one's mean over its response tokens."""
    ids, completion = inputs["input_ids"], inputs["completion_mask"]
    labels = ids.masked_fill(completion == 0, IGNORE_INDEX)
    keep = None
    if responses == "best":
        keep = torch.arange(ids.shape[0], device=ids.device) < ids.shape[0] // 2
    mask = rdis_mask(labels, keep)
    head = linear_head(model, "DeftDPOTrainer computes R_dis from the hidden states")
    h = hidden[:, -ids.shape[1]:]  # prompt-learning PEFT prepends virtual tokens
    if h.device != head.weight.device:  # a model split across devices
        h, mask = h.to(head.weight.device), mask.to(head.weight.device)
    return rdis_for_model(model, h, q_diff, mask)


def _warn_template_mismatch(dist: Distribution, dataset: Any, source: str) -> None:
    """A warning when Q_diff was counted for one prompt template and the (raw) training data uses the other:
    conversational records are tokenised after the chat template (``chat``), plain text prompts are ``plain``."""
    from trl.data_utils import is_conversational

    template = dist.metadata.get("template")
    try:
        first = dataset[0] if dataset is not None and len(dataset) > 0 else None
    except (TypeError, KeyError, IndexError):  # an IterableDataset, a dict of splits
        return
    if template not in ("chat", "plain") or not isinstance(first, dict) or "chosen" not in first:
        return
    conversational = is_conversational(first)
    if conversational != (template == "chat"):
        logger.warning(f"DeftDPOTrainer: {source} was counted with template {template!r} but the training data is "
                       f"{'conversational' if conversational else 'plain text'}: the responses are tokenised differently "
                       f"from how Q_diff counted them; rebuild it with `deft distribution --template "
                       f"{'chat' if conversational else 'plain'}`")


class _FinalHidden:
    """Keeps the ``last_hidden_state`` of the first forward of ``backbone``
    while armed (:meth:`capture`)."""

    def __init__(self, backbone: torch.nn.Module):
        self._armed = False
        self._hidden: Optional[torch.Tensor] = None
        self.handle = backbone.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:  # noqa: ANN001
        if self._armed and self._hidden is None:
            h = getattr(output, "last_hidden_state", None)
            self._hidden = h if h is not None else output[0]

    @contextlib.contextmanager
    def capture(self):
        self._armed, self._hidden = True, None
        try:
            yield self
        finally:
            self._armed = False

    def pop(self) -> torch.Tensor:
        h, self._hidden = self._hidden, None
        if h is None:
            raise RuntimeError("DeftDPOTrainer: the policy's forward did not run through its backbone (base_model), "
                               "so there are no final hidden states to compute R_dis from")
        return h


def _partitioned(params: List[torch.Tensor]) -> bool:
    """Parameters sharded across processes (DeepSpeed ZeRO-3, FSDP's DTensors): their gradient norms are per shard."""
    return any(hasattr(p, "ds_id") or type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor"
               for p in params)


def _checkpointing(args: Any) -> bool:
    """Activation (gradient) checkpointing on in these TrainingArguments (transformers 5 names it both ways)."""
    return bool(getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", None))


def _checkpointing_kwargs(args: Any) -> Dict[str, Any]:
    kwargs = getattr(args, "activation_checkpointing_kwargs", None) or getattr(args, "gradient_checkpointing_kwargs", None) or {}
    if isinstance(kwargs, str):  # a JSON string, as from the command line
        kwargs = json.loads(kwargs)
    return kwargs


def _zero3(args: Any) -> bool:
    plugin = getattr(args, "deepspeed_plugin", None)
    return plugin is not None and getattr(plugin, "zero_stage", None) == 3


class DeftDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` minimising ``L_m - omega * R_dis``.

    Takes every argument of ``trl.DPOTrainer``, plus (keywords only):

    - ``qdiff``: the discrepancy distribution: a ``qdiff.safetensors`` from
      ``deft distribution`` (its vocabulary is checked against the trainer's
      tokenizer), a :class:`deft.distribution.Distribution`, or a 1-D tensor;
      longer than the model's lm_head is an error, shorter (a padded
      vocabulary) is zero-padded.
    - ``omega``: the weight of R_dis (the paper: 2.5e-6 for DPO), or
    - ``omega_share``: set omega before training so that ``||grad(omega R_dis)||``
      is this fraction of ``||grad L_m||`` (median over the first
      ``calibration_batches`` micro-batches); exactly one of the two.
    - ``rdis_responses``: ``"all"`` (chosen and rejected responses, deft's
      default) or ``"best"`` (the chosen ones).
    - ``diagnose_every``: measure ``rdis_grad_share`` at step 0 and every N
      optimizer steps (0: step 0 only); two extra backward passes of one
      micro-batch each time.
    """

    def __init__(self, *args: Any, qdiff: QDiffLike, omega: Optional[float] = None, omega_share: Optional[float] = None,
                 rdis_responses: str = "all", diagnose_every: int = 1, calibration_batches: int = 4, **kwargs: Any):
        if (omega is None) == (omega_share is None):
            raise ValueError("DeftDPOTrainer: pass exactly one of omega (the weight of R_dis) and omega_share "
                             f"(its target gradient share); got omega={omega!r}, omega_share={omega_share!r}")
        if omega is not None and not math.isfinite(float(omega)):
            raise ValueError(f"DeftDPOTrainer: omega must be finite, got {omega!r}")
        if omega_share is not None and not (math.isfinite(float(omega_share)) and float(omega_share) > 0):
            raise ValueError(f"DeftDPOTrainer: omega_share must be positive, got {omega_share!r}")
        if rdis_responses not in RESPONSES:
            raise ValueError(f"DeftDPOTrainer: rdis_responses must be one of {RESPONSES}, got {rdis_responses!r}")
        if int(diagnose_every) != diagnose_every or diagnose_every < 0:
            raise ValueError(f"DeftDPOTrainer: diagnose_every must be an integer >= 0, got {diagnose_every!r}")
        if int(calibration_batches) != calibration_batches or calibration_batches < 1:
            raise ValueError(f"DeftDPOTrainer: calibration_batches must be an integer >= 1, got {calibration_batches!r}")
        q, dist, source = load_qdiff(qdiff)  # a bad file fails before TRL tokenises the data
        if dist is not None:
            _warn_template_mismatch(dist, kwargs.get("train_dataset"), source)
        super().__init__(*args, **kwargs)

        causal = self.model.get_base_model() if is_peft_model(self.model) else self.model
        if causal.config.get_text_config() is not causal.config:
            raise ValueError(f"DeftDPOTrainer supports text-only causal LMs, not {type(causal).__name__}")
        head = linear_head(causal, "DeftDPOTrainer computes R_dis from the hidden states through it")
        vocab = int(getattr(head.weight, "ds_shape", head.weight.shape)[0])
        if q.numel() > vocab:
            raise ValueError(f"{source}: Q_diff has {q.numel()} entries but the model's lm_head has {vocab} rows: "
                             "build Q_diff with the policy's tokenizer (`deft distribution --tokenizer POLICY`)")
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        if dist is not None and getattr(tok, "backend_tokenizer", None) is not None:
            check_vocabulary(dist, hf_policy_tokenizer(tok, getattr(tok, "name_or_path", "") or type(tok).__name__), source)
        self.qdiff = prepare_q(q, vocab, "cpu")  # zero-padded to the lm_head; moved to its device per call
        self.qdiff_source = source
        self.omega: Optional[float] = None if omega is None else float(omega)
        self.omega_share = None if omega_share is None else float(omega_share)
        self.omega_info: Dict[str, Any] = {"value": self.omega, "source": "omega"} if omega is not None else {}
        self.rdis_responses = rdis_responses
        self.diagnose_every = int(diagnose_every)
        self.calibration_batches = int(calibration_batches)
        self._causal = causal
        self._hidden = _FinalHidden(causal.base_model)
        self._diagnosed_step: Optional[int] = None
        self._warned_partitioned = False
        self._require_nonreentrant_checkpointing()

    def _require_nonreentrant_checkpointing(self) -> None:
        """The gradient share (``_diagnose``, the omega_share calibration) takes
        ``torch.autograd.grad`` of the loss terms, which reentrant activation
        checkpointing refuses: ``use_reentrant`` is set to False when unset, and
        an explicit True is an error. Exempt: DeepSpeed ZeRO-3 and FSDP, where
        TRL forces reentrant checkpointing for PEFT and the share is not measured."""
        args = self.args
        if not _checkpointing(args) or self.is_fsdp_enabled or _zero3(args):
            return
        kwargs = _checkpointing_kwargs(args)
        if kwargs.get("use_reentrant") is None:
            kwargs["use_reentrant"] = False
            for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):  # transformers 5: the first, the second its alias
                if hasattr(args, name):
                    setattr(args, name, kwargs)
        elif kwargs["use_reentrant"]:
            raise ValueError("DeftDPOTrainer: gradient checkpointing with use_reentrant=True cannot give the gradient of "
                             "R_dis separately from L_m's (rdis_grad_share, omega_share use torch.autograd.grad, which "
                             "reentrant checkpointing refuses); set gradient_checkpointing_kwargs={'use_reentrant': False} "
                             "or leave use_reentrant unset")

    # ----- the loss

    def _terms(self, model, inputs, return_outputs: bool = False):
        """``(L_m, R_dis, outputs)``: TRL's loss (and outputs) with R_dis from the same forward."""
        with self._hidden.capture():
            out = super().compute_loss(model, inputs, return_outputs=return_outputs)
        hidden = self._hidden.pop()
        lm, outputs = out if return_outputs else (out, None)
        return lm, trl_batch_rdis(self._causal, hidden, inputs, self.qdiff, self.rdis_responses), outputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.omega is None:
            raise RuntimeError("DeftDPOTrainer: omega is calibrated from omega_share when training starts; call train() first")
        mode = "train" if self.model.training else "eval"
        lm, r_dis, outputs = self._terms(model, inputs, return_outputs)
        if mode == "train" and torch.is_grad_enabled() and self._diagnose_due():
            self._diagnose(lm, r_dis)
        loss = deft_loss(lm, r_dis, self.omega)
        gather = self.accelerator.gather  # per-process scalars: gather_for_metrics would trim them on a last uneven batch
        self._metrics[mode]["R_dis"].append(gather(r_dis.detach()).mean().item())
        self._metrics[mode]["L_m"].append(gather(lm.detach()).mean().item())
        self._metrics[mode]["omega"].append(self.omega)
        return (loss, outputs) if return_outputs else loss

    # ----- the gradient share

    def _trainable(self) -> List[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _diagnose_due(self) -> bool:
        step = self.state.global_step
        if self.omega == 0.0 or step == self._diagnosed_step:  # omega 0: the share is 0 by construction
            return False
        return step == 0 or (self.diagnose_every > 0 and step % self.diagnose_every == 0)

    def _diagnose(self, lm: torch.Tensor, r_dis: torch.Tensor) -> None:
        """The share on this micro-batch's own graph (kept for the training backward)."""
        self._diagnosed_step = self.state.global_step
        params = self._trainable()
        if _partitioned(params):
            if not self._warned_partitioned:
                logger.warning("DeftDPOTrainer: rdis_grad_share is not measured: the parameters are partitioned (ZeRO-3 / FSDP)")
                self._warned_partitioned = True
            return
        row = share_metrics(grad_terms(lm, r_dis, params, retain_graph=True), self.omega)
        dev = self.accelerator.device
        for k, v in row.items():
            self._metrics["train"][k].append(self.accelerator.gather(torch.tensor([v], dtype=torch.float64, device=dev)).mean().item())
        if self.state.global_step == 0 and row["rdis_grad_share"] < LOW_SHARE:
            logger.warning(f"DeftDPOTrainer: rdis_grad_share {row['rdis_grad_share']:.3g} at step 0 (omega {self.omega:.4g}): "
                           "R_dis cannot change the model at this omega; omega_share sets it from a target share")

    # ----- omega from omega_share, kept in checkpoints

    def train(self, resume_from_checkpoint: Optional[Union[str, bool]] = None, trial: Any = None, **kwargs: Any):
        if self.omega_share is not None:
            self._set_omega(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _set_omega(self, resume_from_checkpoint: Optional[Union[str, bool]]) -> None:
        ckpt = resume_from_checkpoint
        if ckpt is True:
            ckpt = get_last_checkpoint(self.args.output_dir)  # None: transformers reports the missing checkpoint
        if ckpt:
            rec_path = Path(ckpt) / OMEGA_FILE
            rec = json.loads(rec_path.read_text(encoding="utf-8")) if rec_path.exists() else {}
            if rec.get("omega_share") != self.omega_share or not isinstance(rec.get("value"), (int, float)):
                had = f"omega_share {rec['omega_share']:g}" if rec.get("omega_share") is not None else "no calibrated omega"
                raise ValueError(f"cannot resume with omega_share {self.omega_share:g}: {rec_path} records {had}; "
                                 "use the same setting or start a new run")
            self.omega, self.omega_info = float(rec["value"]), dict(rec, source="checkpoint")
            logger.info(f"DeftDPOTrainer: omega {self.omega:.4g} (omega_share {self.omega_share:g}, from {ckpt})")
            return
        if self.omega_info.get("source") == "calibrated":  # train() again on the same trainer: same omega
            return
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("DeftDPOTrainer: omega_share is calibrated before the model is prepared, which DeepSpeed and FSDP "
                             "do not allow; pass omega (measure the share in a one-process run first)")
        self.omega_info = self._calibrate()
        self.omega = float(self.omega_info["value"])
        logger.info(f"DeftDPOTrainer: omega {self.omega:.4g}: ||grad R_dis|| / ||grad L_m|| = {self.omega_info['ratio_median']:.4g} "
                    f"(median of {len(self.omega_info['ratios'])} micro-batches), for a gradient share of {self.omega_share:g}")

    def _calibrate(self) -> Dict[str, Any]:
        """The ratios on the first ``calibration_batches`` micro-batches of the
        training order, without changing it (the RNG is forked) or TRL's metrics."""
        model, params = self.model, self._trainable()
        saved = ({k: defaultdict(list, {m: list(v) for m, v in d.items()}) for k, d in self._metrics.items()}, self._total_train_tokens)
        was_training = model.training
        model.train()  # measured in the mode it trains in
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        ratios: List[float] = []
        try:
            with torch.random.fork_rng(devices=devices), self._training_checkpointing():
                for batch in self.get_train_dataloader():
                    if len(ratios) == self.calibration_batches:
                        break
                    inputs = self._prepare_inputs(batch)
                    # the model is not prepared yet, so its forward does not autocast: as in training (bf16/fp16),
                    # the forward runs under the accelerator's autocast; the backward outside it, as torch advises
                    with self.accelerator.autocast(), self.compute_loss_context_manager():
                        lm, r_dis, _ = self._terms(model, inputs)
                    ratios.append(grad_ratio(grad_terms(lm, r_dis, params)))
        finally:
            self._metrics, self._total_train_tokens = saved
            model.train(was_training)
        reduce = None
        if self.accelerator.num_processes > 1:
            def reduce(rho: float) -> float:
                return self.accelerator.gather(torch.tensor([rho], device=self.accelerator.device)).mean().item()
        return omega_for_share(self.omega_share, ratios, reduce, key="omega_share", instead="omega")

    @contextlib.contextmanager
    def _training_checkpointing(self):
        """Activation checkpointing on for the block when the arguments ask for it, as ``Trainer.train`` turns it
        on only after the calibration; the model's state before is restored after."""
        causal = self._causal
        on = getattr(causal, "is_activation_checkpointing", None)  # transformers >= 5.25; before: is_gradient_checkpointing
        if not _checkpointing(self.args) or (on if on is not None else getattr(causal, "is_gradient_checkpointing", True)):
            yield
            return
        kwargs = dict(_checkpointing_kwargs(self.args))
        every, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
        if hasattr(causal, "activation_checkpointing_enable"):  # transformers >= 5.25
            causal.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None, every_n_layers=every, offload=offload)
            disable = getattr(causal, "activation_checkpointing_disable", causal.gradient_checkpointing_disable)
        else:
            causal.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
            disable = causal.gradient_checkpointing_disable
        try:
            yield
        finally:
            disable()

    def _save(self, output_dir: Optional[str] = None, state_dict: Any = None) -> None:
        """Every model save (a checkpoint's, ``save_model``'s) keeps omega in ``deft_omega.json`` beside the
        weights: written here, inside the save, so a checkpoint has it before its trainer_state.json and before
        a push to the Hub."""
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save and self.omega is not None:
            write_json_atomic(Path(output_dir or self.args.output_dir) / OMEGA_FILE,
                              {**self.omega_info, "value": self.omega, "omega_share": self.omega_share, "qdiff": self.qdiff_source})
