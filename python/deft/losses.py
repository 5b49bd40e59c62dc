"""Loss functions for preference fine-tuning: SFT, DPO, IPO, SimPO, CPO, ORPO,
KTO, RRHF, PRO and the DEFT combination, plus :func:`response_logprobs`, which turns causal-LM
logits into the per-response log-probability summaries the losses consume.

The losses are small pure functions over tensors the trainer has already
computed; none of them runs a model.

Conventions
-----------
* A batch holds ``B`` prompts, each with ``l >= 2`` responses ranked best
  first (index 0 is the best).
* ``logp_sum`` ``(B, l)``: sum over the response tokens of
  ``log p(y_t | prompt, y_<t)``; ``lengths`` ``(B, l)``: the number of response
  tokens (``n_tokens`` from :func:`response_logprobs`).
* ``valid`` ``(B, l)`` bool marks real responses in ragged lists (``False`` =
  padding slot). ``None`` means every slot is real.
* The length-normalised score is ``s_j = logp_sum_j / lengths_j``.

Zero-length guard (one rule for every loss): a response with
``lengths == 0`` (e.g. fully truncated) has ``s = 0`` and is treated exactly
like a padding slot. It takes part in no pairwise or listwise term, and when
it is the best response it adds no SFT term and is not counted in the SFT
mean. :func:`length_normalized_scores` returns both ``s`` and this combined
``usable = valid & (lengths > 0)`` mask. Callers of :func:`pro_loss`, which
receives scores rather than lengths, should pass that mask as ``valid``.

All reductions return scalar tensors that stay connected to the graph even
when nothing contributes (a zero with a zero gradient, not a constant).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = [
    "DEFT_OMEGA_DPO",
    "DEFT_OMEGA_PRO",
    "IGNORE_INDEX",
    "KTOLossOutput",
    "OddsRatioLossOutput",
    "PRO_OFFICIAL_EPS",
    "PreferenceLossOutput",
    "RRHF_OFFICIAL_WEIGHT",
    "RankingLossOutput",
    "cpo_loss",
    "deft_loss",
    "dpo_loss",
    "ipo_loss",
    "kto_loss",
    "kto_reference_point",
    "length_normalized_scores",
    "orpo_loss",
    "pro_loss",
    "response_logprobs_from_hidden",
    "response_logprobs",
    "rrhf_loss",
    "rrhf_loss_official",
    "sft_loss",
    "simpo_loss",
]

#: Label value marking positions that are not response tokens (HF convention).
IGNORE_INDEX = -100

#: The paper's DEFT weight of the distribution reward for DPO.
DEFT_OMEGA_DPO = 2.5e-6
#: The paper's DEFT weight of the distribution reward for PRO.
DEFT_OMEGA_PRO = 2.5e-5

#: The ``eps`` of the PRO reference code's ``log(eps + sum exp(.))`` (``pro_loss(official=True)``).
PRO_OFFICIAL_EPS = 1e-10
#: The RRHF reference code's default ``rrhf_weight`` (its shipped scripts pass 1).
RRHF_OFFICIAL_WEIGHT = 100.0

Number = Union[float, int]


# --------------------------------------------------------------------------
# outputs


@dataclass
class PreferenceLossOutput:
    """Result of a pairwise loss (:func:`dpo_loss`, :func:`ipo_loss`).

    ``loss`` is the scalar to back-propagate (batch mean of ``losses``). The
    other fields are per-example ``(B,)`` tensors for logging, detached from
    the graph: ``chosen_rewards = beta * (pi_c - ref_c)``,
    ``rejected_rewards = beta * (pi_r - ref_r)``,
    ``margins = chosen_rewards - rejected_rewards`` and
    ``accuracies = (chosen_rewards > rejected_rewards)`` as float (a tie counts
    as wrong, as in TRL).
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracies: torch.Tensor

    @property
    def accuracy(self) -> torch.Tensor:
        """Batch mean of :attr:`accuracies`."""
        return self.accuracies.mean()

    def metrics(self, prefix: str = "") -> Dict[str, float]:
        """Batch means as plain floats, keyed ``{prefix}loss``,
        ``{prefix}rewards/chosen`` and so on."""
        return {
            f"{prefix}loss": float(self.loss.detach()),
            f"{prefix}rewards/chosen": float(self.chosen_rewards.mean()),
            f"{prefix}rewards/rejected": float(self.rejected_rewards.mean()),
            f"{prefix}rewards/margins": float(self.margins.mean()),
            f"{prefix}rewards/accuracy": float(self.accuracies.mean()),
        }


@dataclass
class RankingLossOutput:
    """Result of a listwise or ranking loss (:func:`rrhf_loss`, :func:`pro_loss`).

    ``loss = rank_loss + sft_term``. ``sft_term`` is the SFT part already
    multiplied by its weight, so it is exactly what ``loss`` adds.
    """

    loss: torch.Tensor
    rank_loss: torch.Tensor
    sft_term: torch.Tensor

    def metrics(self, prefix: str = "") -> Dict[str, float]:
        """The three parts as plain floats."""
        return {
            f"{prefix}loss": float(self.loss.detach()),
            f"{prefix}rank_loss": float(self.rank_loss.detach()),
            f"{prefix}sft_term": float(self.sft_term.detach()),
        }


# --------------------------------------------------------------------------
# helpers


def _mask(valid: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if valid is None:
        return torch.ones(like.shape, dtype=torch.bool, device=like.device)
    if valid.shape != like.shape:
        raise ValueError(f"valid has shape {tuple(valid.shape)}, expected {tuple(like.shape)}")
    return valid.to(device=like.device, dtype=torch.bool)


def _check_2d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must have shape (B, l), got {tuple(x.shape)}")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask``; zero (still on the graph) when the
    mask is empty."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1).to(total.dtype)


def length_normalized_scores(
    logp_sum: torch.Tensor,
    lengths: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Length-normalised scores and the mask of responses that may be scored.

    ``s = logp_sum / lengths`` where ``lengths > 0`` and ``0`` elsewhere;
    ``usable = valid & (lengths > 0)``. The division is guarded, so the
    gradient is finite (zero) for empty responses too. Works for any shape.
    """
    lengths = lengths.to(logp_sum.device)
    positive = lengths > 0
    safe = torch.where(positive, lengths, torch.ones_like(lengths)).to(logp_sum.dtype)
    s = torch.where(positive, logp_sum / safe, torch.zeros_like(logp_sum))
    return s, _mask(valid, logp_sum) & positive


# --------------------------------------------------------------------------
# SFT


def sft_loss(
    logp_sum: torch.Tensor,
    lengths: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    reduction: str = "token",
) -> torch.Tensor:
    """Negative log-likelihood of the best response (index 0), token-averaged.

    ``logp_sum`` and ``lengths`` are ``(B, l)`` (column 0 is used) or ``(B,)``
    (already the best response). With ``n_b = lengths[b, 0]`` and
    ``L_b = logp_sum[b, 0]``:

    * ``reduction="token"`` (default, the usual SFT loss of a causal LM, where
      all response tokens of the batch are averaged together)::

          L_SFT = - sum_b L_b / sum_b n_b

    * ``reduction="sequence"`` (average within each response first, then over
      the batch)::

          L_SFT = mean_b ( -L_b / n_b )

    Rows whose best response is padding (``valid[b, 0]`` false) or empty
    (``n_b = 0``) are left out of both the numerator and the count. If no row
    remains, the loss is 0.
    """
    if logp_sum.dim() == 2:
        logp_sum, lengths = logp_sum[:, 0], lengths[:, 0]
        if valid is not None:
            valid = valid[:, 0]
    if logp_sum.dim() != 1:
        raise ValueError(f"logp_sum must be (B, l) or (B,), got {tuple(logp_sum.shape)}")
    lengths = lengths.to(logp_sum.device)
    s, usable = length_normalized_scores(logp_sum, lengths, valid)
    if reduction == "sequence":
        return _masked_mean(-s, usable)
    if reduction == "token":
        nll = torch.where(usable, -logp_sum, torch.zeros_like(logp_sum)).sum()
        n = torch.where(usable, lengths, torch.zeros_like(lengths)).sum()
        return nll / n.clamp(min=1).to(nll.dtype)
    raise ValueError(f"reduction must be 'token' or 'sequence', got {reduction!r}")


# --------------------------------------------------------------------------
# pairwise: DPO, IPO


def _pairwise_output(
    losses: torch.Tensor,
    beta: float,
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
) -> PreferenceLossOutput:
    chosen = (beta * (pc - rc)).detach()
    rejected = (beta * (pr - rr)).detach()
    return PreferenceLossOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=chosen,
        rejected_rewards=rejected,
        margins=chosen - rejected,
        accuracies=(chosen > rejected).to(chosen.dtype),
    )


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """Sigmoid DPO (Rafailov et al. 2023) on summed response log-probs.

    All inputs are ``(B,)`` summed log-probs (``logp_sum``) of the chosen and
    rejected responses under the policy (``pc``, ``pr``) and the frozen
    reference (``rc``, ``rr``). With ``h = (pc - rc) - (pr - rr)`` and label
    smoothing ``eps`` (the conservative DPO of TRL)::

        loss_b = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
        loss   = mean_b loss_b

    ``eps = 0`` gives the plain ``-log sigmoid(beta * h)``. The rewards in the
    result are ``beta * (p - r)``; see :class:`PreferenceLossOutput`.
    """
    _check_beta_smoothing(beta, label_smoothing)
    logits = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    losses = _smoothed_sigmoid_loss(logits, label_smoothing)
    return _pairwise_output(losses, beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected)


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
) -> PreferenceLossOutput:
    """IPO (Azar et al. 2023) on length-normalised log-probs, as TRL does it.

    TRL's IPO averages log-probs over the response tokens before taking the
    log-ratios (``logp_sum / n_tokens``). We do the same: pass summed log-probs
    together with ``chosen_lengths`` / ``rejected_lengths`` (the same lengths
    serve policy and reference, since the tokens are the same), or pass
    already-averaged log-probs and leave the lengths ``None``. Empty responses
    (length 0) have a normalised log-prob of 0. With the normalised values
    ``h = (pc - rc) - (pr - rr)``::

        loss_b = (h - 1 / (2 * beta)) ** 2
        loss   = mean_b loss_b

    The logged rewards are ``beta * (p - r)`` on the same normalised values.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("give both chosen_lengths and rejected_lengths, or neither")
    if chosen_lengths is not None:
        policy_chosen, _ = length_normalized_scores(policy_chosen, chosen_lengths)
        ref_chosen, _ = length_normalized_scores(ref_chosen, chosen_lengths)
        policy_rejected, _ = length_normalized_scores(policy_rejected, rejected_lengths)
        ref_rejected, _ = length_normalized_scores(ref_rejected, rejected_lengths)
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return _pairwise_output(losses, beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected)


# --------------------------------------------------------------------------
# more pairwise losses: SimPO, CPO, ORPO (reference-free), KTO (unpaired)


@dataclass
class OddsRatioLossOutput(PreferenceLossOutput):
    """Result of :func:`orpo_loss`: a :class:`PreferenceLossOutput` (``losses``
    the odds-ratio term ``-lambda * log sigmoid(log_odds)``) plus, per example,
    ``log_odds`` and ``ratio = log sigmoid(log_odds)``, detached."""

    log_odds: torch.Tensor
    ratio: torch.Tensor

    def metrics(self, prefix: str = "") -> Dict[str, float]:
        """TRL's ORPO metric names: ``log_odds_ratio`` (mean of ``ratio``) and
        ``log_odds_chosen`` (mean of ``log_odds``), beside the pairwise ones."""
        out = super().metrics(prefix)
        out[f"{prefix}log_odds_ratio"] = float(self.ratio.mean())
        out[f"{prefix}log_odds_chosen"] = float(self.log_odds.mean())
        return out


@dataclass
class KTOLossOutput(PreferenceLossOutput):
    """Result of :func:`kto_loss`: a :class:`PreferenceLossOutput` plus the
    reference point ``kl`` (a detached scalar) the losses were computed with."""

    kl: torch.Tensor

    def metrics(self, prefix: str = "") -> Dict[str, float]:
        out = super().metrics(prefix)
        out[f"{prefix}kl"] = float(self.kl)
        return out


def _check_beta_smoothing(beta: float, label_smoothing: float = 0.0) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def _smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


def _pair_averages(pc: torch.Tensor, pr: torch.Tensor, nc: Optional[torch.Tensor], nr: Optional[torch.Tensor]):
    """``(a_w, a_l, ok)``: the average log-probs of a pair from summed ones and
    their lengths, ``ok`` false where either response is empty; without
    lengths ``pc``, ``pr`` are the averages already and ``ok`` is None."""
    if (nc is None) != (nr is None):
        raise ValueError("give both chosen_lengths and rejected_lengths, or neither")
    if nc is None:
        return pc, pr, None
    a_w, ok_w = length_normalized_scores(pc, nc)
    a_l, ok_l = length_normalized_scores(pr, nr)
    return a_w, a_l, ok_w & ok_l


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """SimPO (Meng et al. 2024): a reference-free sigmoid loss on the average
    log-probs with a target reward margin ``gamma``.

    Pass summed log-probs with their ``chosen_lengths`` / ``rejected_lengths``
    (averaged here) or already-averaged log-probs and no lengths. With the
    averages ``a_w``, ``a_l``::

        loss_b = -log sigmoid(beta * (a_w - a_l) - gamma)        (label smoothing eps: as in dpo_loss)
        loss   = mean_b loss_b

    This is TRL's ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"``
    (``simpo_gamma`` = ``gamma``), whose log-probs are token averages; the
    rewards are ``beta * a``. CPO-SimPO adds the NLL term (the trainer's
    ``method.sft_weight``, TRL's ``cpo_alpha``).

    With lengths, a pair with an empty response (length 0: no average; 0,
    the best possible, would reward it) adds 0 and no gradient and still
    counts in the mean, as in :func:`orpo_loss`.
    """
    _check_beta_smoothing(beta, label_smoothing)
    policy_chosen, policy_rejected, ok = _pair_averages(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths)
    losses = _smoothed_sigmoid_loss(beta * (policy_chosen - policy_rejected) - gamma, label_smoothing)
    if ok is not None:
        losses = torch.where(ok, losses, torch.zeros_like(losses))
    zero = torch.zeros_like(policy_chosen)
    return _pairwise_output(losses, beta, policy_chosen, policy_rejected, zero, zero)


def cpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """The preference term of CPO (Xu et al. 2024): DPO's sigmoid loss on the
    policy's summed log-probs alone (the reference dropped)::

        loss_b = -log sigmoid(beta * (pc - pr))                  (label smoothing eps: as in dpo_loss)
        loss   = mean_b loss_b

    TRL's ``CPOTrainer.cpo_loss`` with ``loss_type="sigmoid"``. CPO's NLL term
    on the preferred response (TRL's ``cpo_alpha``, default 1) is added by the
    trainer with :func:`sft_loss` (``method.sft_weight``). Rewards ``beta * p``.
    """
    _check_beta_smoothing(beta, label_smoothing)
    losses = _smoothed_sigmoid_loss(beta * (policy_chosen - policy_rejected), label_smoothing)
    zero = torch.zeros_like(policy_chosen)
    return _pairwise_output(losses, beta, policy_chosen, policy_rejected, zero, zero)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, branching at ``-log 2`` (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    beta: float = 0.1,
) -> OddsRatioLossOutput:
    """The odds-ratio term of ORPO (Hong et al. 2024), weight ``beta`` (the
    paper's lambda, TRL's ``ORPOConfig.beta``), on average log-probs.

    Pass summed log-probs with their lengths (averaged here) or averages and
    no lengths. With ``a = mean token log-prob`` and ``odds(y) = p / (1 - p)``,
    ``p = exp(a)``::

        log_odds_b = (a_w - a_l) - (log(1 - exp(a_w)) - log(1 - exp(a_l)))
        loss_b     = -beta * log sigmoid(log_odds_b)
        loss       = mean_b loss_b

    TRL's ``ORPOTrainer.odds_ratio_loss`` (its ``losses`` are
    ``beta * log sigmoid``, which it subtracts; ``log1mexp`` the same stable
    branch), in float32 as TRL casts it, or float64 for float64 inputs. ORPO's NLL term
    is added by the trainer (:func:`sft_loss`, ``method.sft_weight`` 1).
    A pair with an empty response (length 0, average 0, ``p = 1``: odds
    infinite) adds 0 and still counts in the mean; with averages passed
    directly, an average of 0 is treated the same way.
    """
    _check_beta_smoothing(beta)
    a_w, a_l, ok = _pair_averages(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths)
    if ok is None:  # averages given: an average of 0 is an empty response (or p = 1)
        ok = (a_w < 0) & (a_l < 0)
    a_w = a_w if a_w.dtype == torch.float64 else a_w.float()
    a_l = a_l if a_l.dtype == torch.float64 else a_l.float()
    safe_w = torch.where(ok, a_w, torch.full_like(a_w, -1.0))  # finite values (and gradients) where the term is dropped
    safe_l = torch.where(ok, a_l, torch.full_like(a_l, -1.0))
    log_odds = (safe_w - safe_l) - (_log1mexp(safe_w) - _log1mexp(safe_l))
    ratio = F.logsigmoid(log_odds)
    losses = torch.where(ok, -beta * ratio, torch.zeros_like(ratio))
    zero = torch.zeros_like(a_w)
    base = _pairwise_output(losses, beta, a_w, a_l, zero, zero)
    return OddsRatioLossOutput(**vars(base), log_odds=log_odds.detach(), ratio=ratio.detach())


def kto_reference_point(
    policy_kl: torch.Tensor,
    ref_kl: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """KTO's reference point ``z_ref`` from mismatched (prompt, completion)
    pairs: the mean of ``policy_kl - ref_kl`` (summed log-probs of the
    mismatched completions) over the ``valid`` entries, detached, as TRL's
    ``KTOTrainer`` computes ``kl`` before gathering over processes and
    clamping at 0. Returns the (unclamped) mean; :func:`kto_loss` clamps."""
    if policy_kl.shape != ref_kl.shape:
        raise ValueError(f"policy_kl has shape {tuple(policy_kl.shape)}, ref_kl {tuple(ref_kl.shape)}")
    v = _mask(valid, policy_kl)
    return _masked_mean((policy_kl - ref_kl.to(policy_kl)).detach(), v)


def kto_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    kl: Union[torch.Tensor, Number],
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLossOutput:
    """KTO (Ethayarajh et al. 2024) on paired data taken apart: every chosen
    response is a desirable example, every rejected one an undesirable
    example, with summed log-probs. With ``z = max(0, kl)`` the reference point
    (:func:`kto_reference_point`, no gradient) and ``r = p - ref``::

        desirable_b   = 1 - sigmoid(beta * (r_w - z))
        undesirable_b = 1 - sigmoid(beta * (z - r_l))
        loss = mean over the 2B examples of [desirable_weight * desirable_b, undesirable_weight * undesirable_b]

    TRL's ``KTOTrainer`` (``loss_type="kto"``: Eqn (7) of the paper, the
    ``losses.nanmean()`` of its desirable and undesirable rows). ``losses``
    per pair is the mean of its two weighted terms, so ``loss`` is their
    batch mean. Rewards ``beta * r``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0 or desirable_weight + undesirable_weight <= 0:
        raise ValueError(f"desirable_weight and undesirable_weight must be >= 0, not both 0; got {desirable_weight}, {undesirable_weight}")
    z = torch.as_tensor(kl, dtype=policy_chosen.dtype, device=policy_chosen.device).detach().clamp(min=0)
    r_w = policy_chosen - ref_chosen
    r_l = policy_rejected - ref_rejected
    desirable = 1.0 - torch.sigmoid(beta * (r_w - z))
    undesirable = 1.0 - torch.sigmoid(beta * (z - r_l))
    losses = 0.5 * (desirable_weight * desirable + undesirable_weight * undesirable)
    base = _pairwise_output(losses, beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return KTOLossOutput(**vars(base), kl=z)


# --------------------------------------------------------------------------
# listwise / ranking: RRHF, PRO


def rrhf_loss(
    s: Optional[torch.Tensor],
    logp_sum: torch.Tensor,
    lengths: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    sft_weight: float = 1.0,
    rewards: Optional[torch.Tensor] = None,
) -> RankingLossOutput:
    """RRHF (Yuan et al. 2023): a hinge ranking loss plus SFT on the best response.

    ``s`` ``(B, l)`` are the policy's length-normalised scores (``None``:
    computed here as ``logp_sum / lengths``). "i is better than j" means
    ``i < j`` (the list is ranked best first), or ``rewards[b, i] > rewards[b, j]``
    when ``rewards`` ``(B, l)`` are given. As in RRHF's reference code, equal
    rewards make no pair::

        rank_b    = sum_{i better than j, both usable} max(0, s_j - s_i)
        rank_loss = mean_b rank_b
        sft_term  = sft_weight * mean_b ( -logp_sum[b, 0] / lengths[b, 0] )
        loss      = rank_loss + sft_term

    "usable" is ``valid & (lengths > 0)``. The reference (GanjinZero/RRHF,
    ``train.py``, ``RRHFTrainer.compute_loss``) trains one prompt per batch
    and sums its pairs; we sum the pairs of each prompt and average over the
    prompts. The SFT term here is the best response's NLL per response token
    (``sft_loss(..., reduction="sequence")``, over rows whose best response is
    usable). The reference differs in three ways, which
    :func:`rrhf_loss_official` reproduces: its SFT term
    ``-logit_label[max_idx].mean()`` is the summed NLL divided by *all*
    positions of the padded sequence (prompt and padding included); its scores
    are divided by that padded length too, not by the response length (its
    ``gather_logits_labels`` overwrites the ``-100`` labels in place before
    ``get_score`` counts them, RRHF issue #37); and it weights the rank term,
    ``rrhf_weight * rank + sft`` (default 100, its scripts pass 1), where this
    weights the SFT term (``sft_weight = 1 / rrhf_weight`` gives the same
    balance, smaller by the factor ``rrhf_weight``). The SFT term uses index 0
    even when ``rewards`` are given.
    """
    _check_2d("logp_sum", logp_sum)
    s_computed, usable = length_normalized_scores(logp_sum, lengths, valid)
    if s is None:
        s = s_computed
    elif s.shape != logp_sum.shape:
        raise ValueError(f"s has shape {tuple(s.shape)}, expected {tuple(logp_sum.shape)}")
    l = s.shape[1]
    if rewards is not None:
        if rewards.shape != s.shape:
            raise ValueError(f"rewards has shape {tuple(rewards.shape)}, expected {tuple(s.shape)}")
        r = rewards.to(s.device)
        better = r[:, :, None] > r[:, None, :]  # better[b, i, j]: i beats j
    else:
        idx = torch.arange(l, device=s.device)
        better = (idx[:, None] < idx[None, :]).expand(s.shape[0], l, l)
    pairs = better & usable[:, :, None] & usable[:, None, :]
    hinge = torch.relu(s[:, None, :] - s[:, :, None])  # [b, i, j] = max(0, s_j - s_i)
    rank = torch.where(pairs, hinge, torch.zeros_like(hinge)).sum(dim=(1, 2)).mean()
    sft = sft_weight * sft_loss(logp_sum, lengths, valid, reduction="sequence")
    return RankingLossOutput(loss=rank + sft, rank_loss=rank, sft_term=sft)


def rrhf_loss_official(
    logp_sum: torch.Tensor,
    lengths: torch.Tensor,
    padded_lengths: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    rewards: Optional[torch.Tensor] = None,
    rrhf_weight: float = RRHF_OFFICIAL_WEIGHT,
) -> RankingLossOutput:
    """RRHF exactly as the reference code computes it (GanjinZero/RRHF,
    ``train.py``, ``RRHFTrainer.compute_loss`` with ``length_penalty`` 1).

    ``padded_lengths`` ``(B,)`` is ``T_b``, the number of positions of prompt
    ``b``'s padded sequences: the longest of its ``l`` sequences (prompt +
    response + end), which is what the reference pads one prompt's responses
    to (it trains one prompt per batch). Its ``logit_label`` is zero at prompt
    and padding positions, so its ``-logit_label[max_idx].mean()`` is the
    best response's summed log-prob divided by ``T_b``; and since its
    ``gather_logits_labels`` overwrites the ``-100`` labels in place before
    ``get_score`` counts them, every score is divided by ``T_b`` as well::

        s_bj      = logp_sum[b, j] / T_b
        rank_b    = sum_{i better than j, both usable} max(0, s_bj - s_bi)
        sft_b     = -logp_sum[b, m_b] / T_b,   m_b = argmax_j rewards[b, j] (the first on ties; 0 without rewards)
        loss      = mean_b ( rrhf_weight * rank_b + sft_b )

    "Better" and "usable" are as in :func:`rrhf_loss`. The output's
    ``rank_loss`` is the weighted ``rrhf_weight * mean_b rank_b`` and
    ``sft_term`` the SFT mean, so ``loss = rank_loss + sft_term``. With one
    prompt this is the reference's loss; a batch of ``B`` prompts gives the
    mean of their ``B`` reference losses (what gradient accumulation over
    ``B`` one-prompt batches gives).
    """
    _check_2d("logp_sum", logp_sum)
    B, l = logp_sum.shape
    if padded_lengths.shape != (B,):
        raise ValueError(f"padded_lengths must have shape ({B},), got {tuple(padded_lengths.shape)}")
    T = padded_lengths.to(device=logp_sum.device, dtype=logp_sum.dtype).clamp(min=1)
    s = logp_sum / T[:, None]
    ranked = rrhf_loss(s, logp_sum, lengths, valid, sft_weight=0.0, rewards=rewards)
    v = _mask(valid, logp_sum)
    if rewards is not None:
        if rewards.shape != logp_sum.shape:
            raise ValueError(f"rewards has shape {tuple(rewards.shape)}, expected {tuple(logp_sum.shape)}")
        r = rewards.to(device=logp_sum.device, dtype=logp_sum.dtype)
        best = torch.where(v, r, torch.full_like(r, float("-inf"))).argmax(dim=1)
    else:
        best = torch.zeros(B, dtype=torch.long, device=logp_sum.device)
    sft_rows = -logp_sum.gather(1, best[:, None]).squeeze(1) / T
    sft = _masked_mean(sft_rows, v.any(dim=1))
    rank = rrhf_weight * ranked.rank_loss
    return RankingLossOutput(loss=rank + sft, rank_loss=rank, sft_term=sft)


def pro_loss(
    s: torch.Tensor,
    rewards: Optional[torch.Tensor],
    logp_sum_best: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    sft_weight: float = 0.05,
    official: bool = False,
) -> RankingLossOutput:
    """PRO (Song et al. 2023): ``l - 1`` softmax rounds plus weighted SFT.

    This follows ``ProcessManager.compute_loss`` in the PRO reference code
    (AlibabaResearch/DAMO-ConvAI, ``PRO/train/utils/process_manager.py``).
    ``s`` ``(B, l)`` are the policy's length-normalised scores
    (``logp_sum / n_tokens``), ranked best first. ``rewards`` ``(B, l)`` are the
    reward-model scores, or ``None``. ``logp_sum_best`` ``(B,)`` is the
    *summed* log-prob of the best response.

    Round ``k = 0 .. l-2`` uses the reward gaps as inverse temperatures,
    ``d_kj = r_k - r_j`` for ``j > k`` and ``d_kk = max_{j>k} d_kj``. These are
    ``1/T`` in the paper's notation, ``exp(s / T) = exp(s * d)``::

        rank_bk = logsumexp(s_k d_kk, s_{k+1} d_{k,k+1}, ..., s_{l-1} d_{k,l-1}) - s_k d_kk
                = -log( exp(s_k d_kk) / sum_{j>=k} exp(s_j d_kj) )

    With ``rewards=None``, all ``d = 1`` (a plain softmax). The reference takes
    the batch mean of each round and adds the rounds up (it does not average
    them). Its SFT part is ``sft_weight * (l - 1)**2 * mean_b(-logp_sum_best)``,
    on the summed (not length-normalised) NLL. Per example::

        loss = mean_b [ sum_k rank_bk + sft_weight * (n_b - 1)**2 * (-logp_sum_best_b) ]

    With every slot valid, ``n_b = l``, and this equals the reference exactly
    (the sum of per-round means is the mean of per-example sums). Ragged
    lists: ``n_b`` is the number of valid responses in row ``b``. A round
    exists only where ``k`` is valid and some ``j > k`` is valid, and its sums
    and maxima run over valid ``j`` only, so a row has ``n_b - 1`` rounds.
    Absent rounds add 0 (they still count in the batch mean). A row whose best
    slot is invalid adds no SFT term. Pass ``valid & (lengths > 0)``; see the
    module notes. Unlike the reference, we use a stable ``logsumexp`` in place
    of ``log(1e-10 + sum exp(.))``. ``official=True`` computes the reference's
    ``log(PRO_OFFICIAL_EPS + sum exp(.))`` instead, to 1e-6 of its code: the
    same for a trained model, but where ``sum exp(.)`` is not much larger than
    1e-10 (low log-probs times large reward gaps, as in an untrained or small
    model) the ``eps`` floors the round's log-sum: the loss is higher, the
    negatives' gradient shrinks towards 0 and the best response's grows
    towards ``-d_kk`` (the round turns into a plain push on ``s_k``). Scores,
    temperatures and the SFT term are the same in both. Which tokens are
    scored is the data layout's business and is not changed: the reference's
    collator appends no EOS and pads with EOS, and its mask (position ``t``'s
    paired with token ``t + 1``) scores the first pad, i.e. the EOS, of every
    response shorter than the batch's longest and no EOS for the longest;
    `deft train` scores the EOS of every complete response.

    For ``l = 2`` with gap ``d = r_0 - r_1`` (``d = 1`` without rewards), this
    reduces to a scaled pairwise (DPO-like, reference-free) loss::

        loss = mean_b [ -log sigmoid(d (s_0 - s_1)) + sft_weight * (-logp_sum_best) ]
    """
    _check_2d("s", s)
    B, l = s.shape
    v = _mask(valid, s)
    if logp_sum_best.shape != (B,):
        raise ValueError(f"logp_sum_best must have shape ({B},), got {tuple(logp_sum_best.shape)}")
    if rewards is not None:
        if rewards.shape != s.shape:
            raise ValueError(f"rewards has shape {tuple(rewards.shape)}, expected {tuple(s.shape)}")
        r = torch.where(v, rewards.to(device=s.device, dtype=s.dtype), torch.zeros_like(s))
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)

    rank_rows = torch.zeros(B, dtype=s.dtype, device=s.device) + 0.0 * s.sum()
    for k in range(l - 1):
        rest_valid = v[:, k + 1 :]  # (B, l-k-1)
        active = v[:, k] & rest_valid.any(dim=1)
        if rewards is not None:
            gaps = r[:, k : k + 1] - r[:, k + 1 :]  # d_kj, j > k
            gap_max = torch.where(rest_valid, gaps, neg_inf).max(dim=1).values
            pos_temp = torch.where(active, gap_max, torch.ones_like(gap_max))
        else:
            gaps = torch.ones_like(s[:, k + 1 :])
            pos_temp = torch.ones_like(s[:, k])
        pos = s[:, k] * pos_temp
        neg = (s[:, k + 1 :] * gaps).masked_fill(~rest_valid, float("-inf"))
        if official:  # the reference's log(eps + exp(pos) + sum exp(neg)), masked terms exp(-inf) = 0
            round_loss = torch.log(PRO_OFFICIAL_EPS + torch.exp(torch.cat([pos[:, None], neg], dim=1)).sum(dim=1)) - pos
        else:
            round_loss = torch.logsumexp(torch.cat([pos[:, None], neg], dim=1), dim=1) - pos
        rank_rows = rank_rows + torch.where(active, round_loss, torch.zeros_like(round_loss))
    rank = rank_rows.mean()

    n_rounds = (v.sum(dim=1) - 1).clamp(min=0).to(s.dtype)
    best = logp_sum_best.to(s.dtype)
    sft_rows = torch.where(v[:, 0], sft_weight * n_rounds**2 * (-best), torch.zeros_like(best))
    sft = sft_rows.mean()
    return RankingLossOutput(loss=rank + sft, rank_loss=rank, sft_term=sft)


# --------------------------------------------------------------------------
# DEFT


def deft_loss(
    base_loss: torch.Tensor,
    r_dis: Union[torch.Tensor, Number],
    omega: Number,
) -> torch.Tensor:
    """The DEFT objective ``L = L_m - omega * R_dis``.

    ``L_m`` is the alignment loss of the base method (DPO, PRO, ...), and
    ``R_dis`` is the distribution reward, which is maximised (hence the minus).
    ``omega`` comes from the config. The paper uses 2.5e-6 for DPO
    (:data:`DEFT_OMEGA_DPO`) and 2.5e-5 for PRO (:data:`DEFT_OMEGA_PRO`).
    ``omega = 0`` returns the base loss.
    """
    omega = float(omega)
    if omega != omega or omega in (float("inf"), float("-inf")):
        raise ValueError(f"omega must be finite, got {omega}")
    if omega == 0.0:
        return base_loss
    return base_loss - omega * r_dis


# --------------------------------------------------------------------------
# log-probs from logits

_CHUNK_BYTES = 256 * 1024 * 1024


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _ShiftedTokenLogProbs(torch.autograd.Function):
    """``out[b, t] = log softmax(logits[b, t])[target[b, t]]`` for ``t < T-1``
    where ``mask[b, t]``, else 0. It runs over chunks of positions in a float32
    (float64 for float64 logits) working copy. Only the original ``logits``
    and the per-position log-normaliser ``(B, T-1)`` are kept for backward,
    which recomputes the softmax chunk by chunk."""

    @staticmethod
    def forward(ctx, logits, targets, mask, chunk):  # type: ignore[override]
        B, T, _ = logits.shape
        cdtype = _compute_dtype(logits.dtype)
        out = torch.zeros(B, T - 1, dtype=cdtype, device=logits.device)
        lse = torch.zeros(B, T - 1, dtype=cdtype, device=logits.device)
        spans = _spans(mask)
        for b, lo, hi in spans:
            for start in range(lo, hi, chunk):
                end = min(start + chunk, hi)
                x = logits[b, start:end].to(cdtype)
                norm = torch.logsumexp(x, dim=-1)
                tok = x.gather(-1, targets[b, start:end, None]).squeeze(-1)
                out[b, start:end] = tok - norm
                lse[b, start:end] = norm
        out = out * mask
        ctx.save_for_backward(logits, targets, mask, lse)
        ctx.chunk = chunk
        ctx.spans = spans
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        logits, targets, mask, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        g_all = (grad_out * mask).to(lse.dtype)
        for b, lo, hi in ctx.spans:
            for start in range(lo, hi, ctx.chunk):
                end = min(start + ctx.chunk, hi)
                g = g_all[b, start:end, None]
                # a private float copy, turned in place into -g * softmax
                d = logits[b, start:end].to(lse.dtype, copy=True)
                d.sub_(lse[b, start:end, None]).exp_().mul_(-g)
                d.scatter_add_(-1, targets[b, start:end, None], g)  # + g * onehot
                grad[b, start:end] = d.to(grad.dtype)
        return grad, None, None, None


def _spans(mask: torch.Tensor):
    """Per row, the ``[first, last+1)`` range of masked positions (rows with
    none are skipped). One host sync for the whole batch."""
    T1 = mask.shape[1]
    if T1 == 0:
        return []
    pos = torch.arange(T1, device=mask.device)
    any_ = mask.any(dim=1)
    first = torch.where(mask, pos, T1).min(dim=1).values
    last = torch.where(mask, pos, -1).max(dim=1).values
    rows = torch.stack([any_.long(), first, last + 1], dim=1).tolist()
    return [(b, lo, hi) for b, (has, lo, hi) in enumerate(rows) if has]


def response_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: Optional[int] = None,
    ignore_index: int = IGNORE_INDEX,
    segments: Optional[torch.Tensor] = None,
    n_segments: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed response-token log-probs of each sequence of a causal LM.

    ``logits`` ``(B, T, V)`` are the model outputs, and ``labels`` ``(B, T)``
    are the input ids with ``ignore_index`` (-100) outside the response (at
    prompt and padding positions). In the usual causal-LM shift, the logits at
    ``t`` predict the token at ``t + 1``::

        logp_sum[b] = sum_{t : labels[b, t+1] != -100} log softmax(logits[b, t])[labels[b, t+1]]
        n_tokens[b] = #{t : labels[b, t+1] != -100}

    Returns ``(logp_sum, n_tokens)``: ``logp_sum`` is ``(B,)`` float32
    (float64 for float64 logits) and differentiable with respect to
    ``logits``; ``n_tokens`` is ``(B,)`` int64.

    Memory: no full-size ``log_softmax`` copy is made. The log-probs are
    computed ``chunk_size`` positions at a time (default: about 256 MiB of
    float32 per chunk), from the first to the last response position of each
    row only, in float32 for accuracy even when the logits are bf16/fp16. A
    bf16 ``cross_entropy`` would round every token's log-prob to bf16 before
    the sum. The backward pass keeps only the logits (which autograd holds
    anyway) and a ``(B, T-1)`` log-normaliser, and recomputes the softmax
    chunk by chunk in place. The extra peak memory is the gradient of the
    logits plus a few chunk-sized float32 temporaries. On an H200, for bf16
    logits (2, 1024, 151936), forward plus backward peaked at 1.05 GiB over
    the logits, against 3.48 GiB for a float32 ``log_softmax`` + ``gather``,
    and the log-prob sums were identical.

    Packed rows (several sequences per row, ``deft.train.collate(pack=...)``):
    ``segments`` ``(B, T)`` gives each position's sequence (``-1`` for
    padding) and the sums are per sequence, ``(n_segments,)``. Each sequence's
    first label must be ``ignore_index``, so that no position predicts a token
    of the next sequence.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(logits.shape[:2])}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    B, T, V = logits.shape
    labels = labels.to(logits.device)
    targets = labels[:, 1:]
    mask = targets != ignore_index
    safe = torch.where(mask, targets, torch.zeros_like(targets)).long()
    if bool(((safe < 0) | (safe >= V)).any()):
        raise ValueError(f"labels outside [0, {V}) other than ignore_index={ignore_index}")
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_BYTES // (4 * max(V, 1)))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    per_token = _ShiftedTokenLogProbs.apply(logits, safe, mask, int(chunk_size))
    if segments is not None:
        return _segment_sums(per_token[mask], segments, mask, n_segments)
    return per_token.sum(dim=1), mask.sum(dim=1)


def _segment_sums(values: torch.Tensor, segments: torch.Tensor, mask: torch.Tensor, n_segments: Optional[int]):
    """Per-sequence sums of the masked positions' ``values`` (one per ``True`` of
    ``mask``, the shifted ``(B, T-1)`` target mask) and their counts, for packed
    rows whose positions belong to the sequences ``segments`` ``(B, T)``."""
    if segments.shape != (mask.shape[0], mask.shape[1] + 1):
        raise ValueError(f"segments has shape {tuple(segments.shape)}, expected {(mask.shape[0], mask.shape[1] + 1)}")
    seg = segments.to(mask.device)[:, 1:][mask].long()
    if bool((seg < 0).any()):
        raise ValueError("a response label sits on a padding position (segment -1)")
    n = int(n_segments) if n_segments is not None else (int(seg.max()) + 1 if seg.numel() else 0)
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, seg, values)
    return sums, torch.bincount(seg, minlength=n)


class _LinearTokenLogProbs(torch.autograd.Function):
    """``out[n] = log softmax(h[n] @ W^T + b)[target[n]]`` for ``N`` rows of
    hidden states, ``chunk`` rows at a time: each chunk's logits (``chunk x
    V``) are computed, reduced and dropped. Only ``h``, ``W``, ``b`` and the
    per-row log-normaliser are kept for backward, which recomputes each chunk's
    logits. The matmuls run in ``mm_dtype`` (the model's, or autocast's);
    softmax and accumulation in float32 (float64 for float64 inputs)."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk, mm_dtype):  # type: ignore[override]
        N = h.shape[0]
        cdtype = _compute_dtype(h.dtype if h.dtype == torch.float64 else weight.dtype)
        w = weight.to(mm_dtype)
        b = bias.to(mm_dtype) if bias is not None else None
        out = torch.empty(N, dtype=cdtype, device=h.device)
        lse = torch.empty(N, dtype=cdtype, device=h.device)
        for s in range(0, N, chunk):
            z = F.linear(h[s:s + chunk].to(mm_dtype), w, b).to(cdtype)
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            out[s:s + chunk] = z.gather(-1, targets[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
        ctx.save_for_backward(h, weight, bias if bias is not None else torch.empty(0), targets, lse)
        ctx.has_bias, ctx.chunk, ctx.mm_dtype = bias is not None, chunk, mm_dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        h, weight, bias, targets, lse = ctx.saved_tensors
        mm = ctx.mm_dtype
        w = weight.to(mm)
        b = bias.to(mm) if ctx.has_bias else None
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=lse.dtype, device=weight.device) if need_b else None
        g_all = grad_out.to(lse.dtype)
        for s in range(0, h.shape[0], ctx.chunk):
            hc = h[s:s + ctx.chunk].to(mm)
            g = g_all[s:s + ctx.chunk, None]
            # d out / d z = onehot(target) - softmax(z), times the incoming gradient
            d = F.linear(hc, w, b).to(lse.dtype).sub_(lse[s:s + ctx.chunk, None]).exp_().mul_(-g)
            d.scatter_add_(-1, targets[s:s + ctx.chunk, None], g)
            dm = d.to(mm)
            if need_h:
                grad_h[s:s + ctx.chunk] = (dm @ w).to(h.dtype)
            if need_w:
                grad_w += (dm.t() @ hc).to(lse.dtype)
            if need_b:
                grad_b += d.sum(dim=0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None)


def response_logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    chunk_size: Optional[int] = None,
    matmul_dtype: Optional[torch.dtype] = None,
    ignore_index: int = IGNORE_INDEX,
    segments: Optional[torch.Tensor] = None,
    n_segments: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`response_logprobs` from the last hidden states ``(B, T, d)``
    and the lm_head (``weight`` ``(V, d)``, optional ``bias``), without the
    ``B x T x V`` logits: only the response positions are gathered, and their
    logits are computed ``chunk_size`` rows at a time (default about 256 MiB of
    float32), reduced to the label's log-prob and dropped, in the forward and
    again in the backward pass. Differentiable with respect to ``hidden``,
    ``weight`` and ``bias``. ``matmul_dtype``: the dtype of the head's matmul
    (default ``weight``'s; pass autocast's, e.g. bf16, to match a model run
    under autocast). Returns ``(logp_sum (B,), n_tokens (B,))``; for packed rows
    (``segments``, as in :func:`response_logprobs`) ``(n_segments,)`` each."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, d), got {tuple(hidden.shape)}")
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(hidden.shape[:2])}")
    V = weight.shape[0]
    labels = labels.to(hidden.device)
    targets = labels[:, 1:]
    mask = targets != ignore_index
    sel = targets[mask].long()
    if bool(((sel < 0) | (sel >= V)).any()):
        raise ValueError(f"labels outside [0, {V}) other than ignore_index={ignore_index}")
    if chunk_size is None:
        chunk_size = max(1, (256 * 1024 * 1024) // (4 * max(V, 1)))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    h = hidden[:, :-1][mask]  # (N, d): the positions that predict a response token
    per_token = _LinearTokenLogProbs.apply(h, weight, bias, sel, int(chunk_size), matmul_dtype or weight.dtype)
    if segments is not None:
        return _segment_sums(per_token, segments, mask, n_segments)
    rows = mask.nonzero()[:, 0]
    logp = torch.zeros(hidden.shape[0], dtype=per_token.dtype, device=hidden.device).index_add(0, rows, per_token)
    return logp, mask.sum(dim=1)
