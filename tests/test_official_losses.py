"""The official PRO and RRHF variants (``method.variant: official``) against
re-implementations of the reference code, on real PRO HH responses under a tiny
untrained Llama (the SmolLM2 tokenizer), loss and gradients to 1e-6; the size
of their difference from the default forms where it matters; the config rules;
and one `deft train` step of each.

The references below re-implement, step by step and in float64, what the
reference code computes (cited per function); they are written independently
of deft's losses (no deft function is called inside them) and take the
reference's own batch layout, built from deft's examples by
:func:`rrhf_layout` and :func:`pro_layout`.
"""

from __future__ import annotations

import json
import math
from typing import List, Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import shared_file, tiny_llama, tiny_train_assets, train_overrides
from deft.config import ConfigError, load_config, sft_weight
from deft.losses import PRO_OFFICIAL_EPS, pro_loss, rrhf_loss, rrhf_loss_official
from deft.train import Example, _forward, collate, frame_examples, loss_terms, padded_lengths, policy_tokenizers

CPU = torch.device("cpu")


# ------------------------------------------------------------------ references


def rrhf_reference(model, input_ids, attention_mask, labels, rw_scores, rrhf_weight: float = 100.0,
                   length_penalty: float = 1.0) -> torch.Tensor:
    """RRHF's loss as its reference code computes it: GanjinZero/RRHF,
    ``train.py`` (HEAD e1a2b61), ``RRHFTrainer.compute_loss`` and the methods
    it calls (``gather_logits_labels``, ``get_score``, ``rrhf_loss``,
    ``sft_loss``), for one prompt's ``cand`` responses (its batch size).
    ``labels`` come shifted from its collator: ``[-100] * (len(query) - 1) +
    response ids + [-100]``, right-padded with -100 to the input length."""
    labels = labels.clone()
    logp = F.log_softmax(model(input_ids=input_ids, attention_mask=attention_mask).logits, dim=-1)  # cand x T x V
    # gather_logits_labels: the mask is taken, then the -100 labels are set to 0 *in place* (the caller's tensor)
    mask = (labels != -100).to(logp.dtype)
    labels[labels == -100] = 0
    logit_label = torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1) * mask  # cand x T
    # get_score receives the same, now overwritten, labels: every position counts (RRHF issue #37)
    length = (labels != -100).to(logp.dtype).sum(-1)
    scores = logit_label.sum(-1) / length ** length_penalty
    # rrhf_loss: every pair where j has the higher reward score but the lower score adds s_i - s_j
    rw = rw_scores.reshape(1, -1)
    diff = scores.unsqueeze(0) - scores.unsqueeze(-1)  # [i, j] = s_j - s_i
    rw_diff = (rw.unsqueeze(1) - rw.unsqueeze(-1))[0]  # [i, j] = rw_j - rw_i
    rank = -diff[(rw_diff > 0) & (diff < 0)].sum()
    # sft_loss: the mean over every position of the highest-reward response's row
    sft = -logit_label[torch.argmax(rw)].mean()
    return rrhf_weight * rank + sft


def pro_reference(model, input_ids, attention_mask, prefix_mask, rewards, sft_index, sft_weight: float) -> torch.Tensor:
    """PRO's loss as its reference code computes it: AlibabaResearch/DAMO-ConvAI,
    ``PRO/train/utils/process_manager.py`` (64f4da7), ``ProcessManager.compute_loss``.
    ``input_ids``, ``attention_mask``, ``prefix_mask``: ``(B, stage, T)``, the
    labels are the input ids, and ``prefix_mask`` is 1 on the first
    ``len(prefix ids) - 1`` positions (``train_data_collator``'s ``ps_lens``),
    so that after the shift exactly the suffix tokens count."""
    B, stage, _ = input_ids.shape
    sums, counts = [], []
    for k in range(stage):  # one forward per rank position
        logits = model(input_ids=input_ids[:, k], attention_mask=attention_mask[:, k]).logits
        shift_logp = F.log_softmax(logits[:, :-1], dim=2)
        shift_mask = (attention_mask[:, k].bool() & ~prefix_mask[:, k].bool())[:, :-1]
        picked = torch.gather(shift_logp, 2, input_ids[:, k, 1:].unsqueeze(-1)).squeeze(-1)
        picked = picked.masked_fill(~shift_mask, 0.0)
        sums.append(picked.sum(1))
        counts.append(shift_mask.sum(1))
    sum_scores = torch.stack(sums, 1)  # B x stage
    scores = sum_scores / torch.stack(counts, 1)
    total = 0.0
    for k in range(stage - 1):
        neg_temp = rewards[:, k].view(-1, 1) - rewards[:, k + 1:]
        pos_temp = torch.max(neg_temp, dim=1).values
        log_sum = torch.log(1e-10 + torch.exp(scores[:, k] * pos_temp) + torch.sum(torch.exp(scores[:, k + 1:] * neg_temp), dim=1))
        total = total + torch.mean(log_sum - scores[:, k] * pos_temp)
    sft_scores = torch.gather(sum_scores, 1, sft_index.view(B, 1)).view(B)
    return total + sft_weight * math.pow(stage - 1, 2) * torch.mean(-sft_scores)


# ------------------------------------------------------------------ layouts


def _lengths_mask(seqs: Sequence[np.ndarray], T: int) -> torch.Tensor:
    return torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs], dtype=torch.long)


def rrhf_layout(ex: Example, pad_id: int):
    """One prompt in the RRHF reference's layout (``DataCollatorForSupervisedDataset``):
    right-padded ids, and labels shifted by one (``-100`` on the first
    ``len(prompt) - 1`` positions, the response ids, a final ``-100``)."""
    T = max(len(s) for s in ex.input_ids)
    P = ex.prompt_len
    ids = torch.full((len(ex.input_ids), T), pad_id, dtype=torch.long)
    labels = torch.full((len(ex.input_ids), T), -100, dtype=torch.long)
    for j, s in enumerate(ex.input_ids):
        ids[j, :len(s)] = torch.from_numpy(s)
        labels[j, P - 1:len(s) - 1] = torch.from_numpy(s[P:])
    return ids, _lengths_mask(ex.input_ids, T), labels, torch.tensor([ex.rewards], dtype=torch.float64)


def pro_layout(examples: Sequence[Example], eos_id: int, extra_pad: int = 0):
    """A batch in the PRO reference's layout (``HH_DataManager.train_data_collator``):
    ``(B, stage, T)`` ids of the texts with no EOS appended (deft's final EOS
    removed), right-padded with EOS (its pad token) to the batch's longest
    (plus ``extra_pad`` positions), attention and prefix masks, rewards, and
    ``sft_index`` 0 (the best response)."""
    seqs = [s[:-1] if s[-1] == eos_id else s for ex in examples for s in ex.input_ids]
    T = max(len(s) for s in seqs) + extra_pad
    B, l = len(examples), len(examples[0].input_ids)
    ids = torch.full((B * l, T), eos_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.from_numpy(s)
    prefix = torch.tensor([[1 if t < ex.prompt_len - 1 else 0 for t in range(T)] for ex in examples for _ in ex.input_ids])
    rewards = torch.tensor([ex.rewards for ex in examples], dtype=torch.float64)
    return (ids.view(B, l, T), _lengths_mask(seqs, T).view(B, l, T), prefix.view(B, l, T), rewards,
            torch.zeros(B, dtype=torch.long))


def longest_is_cut(examples: Sequence[Example], eos_id: int) -> bool:
    """Whether the batch's longest sequence is a response cut at ``max_length``
    (no EOS): then the reference scores the EOS of every complete response, as
    deft does."""
    longest = max(len(s) for ex in examples for s in ex.input_ids)
    return any(len(s) == longest and s[-1] != eos_id for ex in examples for s in ex.input_ids)


# ------------------------------------------------------------------ data and model


@pytest.fixture(scope="module")
def tokenizers():
    tok_dir = str(shared_file("tokenizers/smollm2"))
    hf_tok, ptok = policy_tokenizers({"model": tok_dir, "tokenizer": None, "trust_remote_code": False, "gguf_file": None})
    return hf_tok, ptok


@pytest.fixture(scope="module")
def pro_hh(tokenizers):
    """The PRO HH harmless test rows as training examples (2 responses each,
    best first, their stored rewards), 96 tokens at most."""
    from deft.data import load

    hf_tok, ptok = tokenizers
    frame = load(shared_file("data/pro-hh/test_harmless_base.jsonl.gz")).frame
    cfg = {"method": {"name": "pro"}, "data": {"max_responses": None, "max_length": 96, "max_prompt_length": 64, "num_threads": 1}}
    out = []
    for ex in frame_examples(cfg, frame.head(400), "plain", hf_tok, ptok):  # best first, as graded data are
        order = sorted(range(ex.n_responses), key=lambda j: -ex.rewards[j])
        out.append(Example(ex.id, [ex.input_ids[j] for j in order], ex.prompt_len, [ex.rewards[j] for j in order]))
    return out


def three_responses(examples: Sequence[Example], n: int) -> List[Example]:
    """``n`` ranked lists of 3 real responses: each example's two plus the
    best response (and reward) of the next example, re-ranked by reward."""
    out = []
    for a, b in zip(examples[:n], examples[1:n + 1]):
        seqs = list(a.input_ids) + [np.concatenate([a.input_ids[0][:a.prompt_len], b.input_ids[0][b.prompt_len:]])]
        rewards = list(a.rewards) + [b.rewards[0]]
        order = sorted(range(3), key=lambda j: -rewards[j])
        out.append(Example(id=a.id, input_ids=[seqs[j] for j in order], prompt_len=a.prompt_len, rewards=[rewards[j] for j in order]))
    return out


@pytest.fixture(scope="module")
def model(tokenizers):
    """The tiny untrained Llama of the trainer tests, in float64 (so 1e-6 measures the formulas, not rounding)."""
    return tiny_llama(tokenizers[0]).double().eval()


def deft_loss(model, examples, method: str, variant: str, pad_id: int, w_sft=None):
    """L_m of deft's training path (collate, forward, ``loss_terms``) and its gradients."""
    cfg = {"method": {"name": method, "variant": variant, "sft_weight": w_sft}, "deft": {"responses": "all"}}
    batch = collate(examples, pad_id)
    out = _forward(model, batch, CPU, None, need_hidden=False)
    lm, _, metrics = loss_terms(cfg, method, model, out, batch, CPU, None, None)
    return lm, torch.autograd.grad(lm, list(model.parameters())), metrics


def grads_of(loss, model):
    return torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)


def assert_grads_close(got, want, rel=1e-6):
    scale = max(float(w.abs().max()) for w in want)
    worst = max(float((g - w).abs().max()) for g, w in zip(got, want))
    assert worst <= rel * scale, f"largest gradient difference {worst:.3g} against a largest gradient {scale:.3g}"


def grad_norm(grads) -> float:
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads))


# ------------------------------------------------------------------ official == reference


def test_rrhf_official_matches_reference_one_prompt_at_a_time(model, pro_hh, tokenizers):
    """Each prompt alone (the reference's batch size): loss and gradients of
    the whole model to 1e-6, for 2 and 3 responses, with the reference's
    default rrhf_weight 100 (sft_weight null) and its scripts' 1 (sft_weight 1)."""
    pad = tokenizers[0].pad_token_id
    for ex in list(pro_hh[:3]) + three_responses(pro_hh, 3):
        for w_sft, rrhf_weight in ((None, 100.0), (1.0, 1.0)):
            got, g_got, _ = deft_loss(model, [ex], "rrhf", "official", pad, w_sft)
            want = rrhf_reference(model, *rrhf_layout(ex, pad), rrhf_weight=rrhf_weight)
            assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-9)
            assert_grads_close(g_got, grads_of(want, model))


def test_rrhf_official_batch_is_the_mean_of_one_prompt_batches(model, pro_hh, tokenizers):
    """A micro-batch of prompts of different lengths (so a shared padding
    length would differ from each prompt's): the mean of the reference's
    one-prompt losses, whatever the batch's own padding."""
    pad = tokenizers[0].pad_token_id
    exs = three_responses(pro_hh, 4)
    assert len({max(len(s) for s in ex.input_ids) for ex in exs}) > 1, "the test needs prompts of different padded lengths"
    got, g_got, metrics = deft_loss(model, exs, "rrhf", "official", pad)
    wants = [rrhf_reference(model, *rrhf_layout(ex, pad)) for ex in exs]
    want = sum(wants) / len(wants)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert_grads_close(g_got, grads_of(want, model))
    assert metrics["rank_loss"] + metrics["sft_term"] == pytest.approx(got.item(), rel=1e-12)


def test_rrhf_official_packed_batch_gives_the_same_loss(model, pro_hh, tokenizers):
    """Packed rows (``train.packing``): the same per-prompt padded lengths, so the same loss."""
    pad = tokenizers[0].pad_token_id
    exs = three_responses(pro_hh, 3)
    padded = collate(exs, pad)
    packed = collate(exs, pad, pack=1)
    assert padded_lengths(packed, CPU).tolist() == padded_lengths(padded, CPU).tolist()
    assert padded_lengths(padded, CPU).tolist() == [max(len(s) for s in ex.input_ids) for ex in exs]
    cfg = {"method": {"name": "rrhf", "variant": "official", "sft_weight": None}, "deft": {"responses": "all"}}
    got = [loss_terms(cfg, "rrhf", model, _forward(model, b, CPU, None, need_hidden=False), b, CPU, None, None)[0].item()
           for b in (padded, packed)]
    assert got[1] == pytest.approx(got[0], rel=1e-9)


def test_pro_official_matches_reference(model, pro_hh, tokenizers):
    """Batches of 4 prompts with 2 (the real lists) and 3 responses, and of
    the rows with the largest reward gaps (where the 1e-10 matters): loss and
    gradients to 1e-6 against the reference, sft_weight 0.05 (its HH script's)."""
    pad, eos = tokenizers[0].pad_token_id, tokenizers[0].eos_token_id
    for exs in (list(pro_hh[:4]), three_responses(pro_hh, 4), _large_gap_rows(pro_hh, 4, 2.0)):
        assert longest_is_cut(exs, eos)
        got, g_got, metrics = deft_loss(model, exs, "pro", "official", pad)
        want = pro_reference(model, *pro_layout(exs, eos), sft_weight=0.05)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        assert_grads_close(g_got, grads_of(want, model))
        assert metrics["rank_loss"] + metrics["sft_term"] == pytest.approx(got.item(), rel=1e-12)


def test_pro_reference_leaves_out_the_eos_of_the_batchs_longest(model, pro_hh, tokenizers):
    """The one layout difference, not reproduced: when the batch's longest
    response is complete, the reference scores no EOS for it (its mask counts
    the first pad of shorter sequences only), where deft scores every complete
    response's EOS. One more padding column in the reference's batch gives the
    longest its EOS too, and then the two agree to 1e-6."""
    pad, eos = tokenizers[0].pad_token_id, tokenizers[0].eos_token_id
    exs = [ex for ex in pro_hh if all(s[-1] == eos for s in ex.input_ids)][:4]
    assert not longest_is_cut(exs, eos)
    got, _, _ = deft_loss(model, exs, "pro", "official", pad)
    as_is = pro_reference(model, *pro_layout(exs, eos), sft_weight=0.05)
    assert abs(as_is.item() - got.item()) > 1e-5 * abs(got.item())  # measured: 9.5e-5
    padded = pro_reference(model, *pro_layout(exs, eos, extra_pad=1), sft_weight=0.05)
    assert got.item() == pytest.approx(padded.item(), rel=1e-6)


# ------------------------------------------------------------------ where official and default differ


def _large_gap_rows(examples: Sequence[Example], n: int, gap: float) -> List[Example]:
    rows = [ex for ex in examples if ex.rewards[0] - ex.rewards[-1] >= gap][:n]
    assert len(rows) == n, f"fewer than {n} rows with a reward gap >= {gap} in the first rows of the PRO HH file"
    return rows


def test_pro_untrained_model_large_reward_gaps_official_differs(model, pro_hh, tokenizers):
    """Untrained, the tiny model's per-token log-probs are about -log(49152) =
    -10.8; times the largest real reward gaps (>= 2) the exponents reach -20 to
    -35, where the reference's 1e-10 outweighs sum exp(.). Measured here (4
    prompts, 96 tokens, float64): the official loss is 8.0% above the default
    and its gradient norm 24% above. On rows with small gaps (< 0.5) they
    agree to 1e-6."""
    pad = tokenizers[0].pad_token_id
    exs = _large_gap_rows(pro_hh, 4, 2.0)
    d_loss, d_grads, _ = deft_loss(model, exs, "pro", "default", pad)
    o_loss, o_grads, _ = deft_loss(model, exs, "pro", "official", pad)
    rel_loss = (o_loss.item() - d_loss.item()) / d_loss.item()
    rel_grad = (grad_norm(o_grads) - grad_norm(d_grads)) / grad_norm(d_grads)
    assert rel_loss == pytest.approx(0.080, abs=0.005) and rel_grad == pytest.approx(0.24, abs=0.02), (rel_loss, rel_grad)
    small = [ex for ex in pro_hh if ex.rewards[0] - ex.rewards[-1] < 0.5][:4]
    d_small, _, _ = deft_loss(model, small, "pro", "default", pad)
    o_small, _, _ = deft_loss(model, small, "pro", "official", pad)
    assert o_small.item() == pytest.approx(d_small.item(), rel=1e-6)


def test_rrhf_untrained_model_official_differs(model, pro_hh, tokenizers):
    """The official RRHF divides by the padded length where the default divides
    by the response length, and weighs rank x100 over SFT instead of SFT
    x0.01 under rank: with the same balance (sft_weight 0.01) the official
    loss is not the default's x100."""
    pad = tokenizers[0].pad_token_id
    exs = three_responses(pro_hh, 4)
    d_loss, d_grads, _ = deft_loss(model, exs, "rrhf", "default", pad, 0.01)
    o_loss, o_grads, _ = deft_loss(model, exs, "rrhf", "official", pad, 0.01)
    ratio = o_loss.item() / d_loss.item()
    assert abs(ratio / 100 - 1) > 0.05, ratio
    assert abs(grad_norm(o_grads) / grad_norm(d_grads) / 100 - 1) > 0.05


# ------------------------------------------------------------------ the loss functions alone


def test_pro_official_equals_default_for_a_trained_model():
    """Scores of a trained model (per-token log-probs near 0): log(1e-10 + S)
    and log S agree far below 1e-6."""
    g = torch.Generator().manual_seed(0)
    s = -torch.rand(8, 4, generator=g, dtype=torch.float64)
    r = torch.sort(torch.randn(8, 4, generator=g, dtype=torch.float64), dim=1, descending=True).values
    best = -torch.rand(8, generator=g, dtype=torch.float64) * 30
    a = pro_loss(s, r, best)
    b = pro_loss(s, r, best, official=True)
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-8)


def test_pro_official_underflow_keeps_the_push_on_the_best():
    """exp underflows to 0 in float32 (s * d = -200): the round is
    log(1e-10) - s_0 d, its gradient -d on s_0 and 0 on the rest, where the
    default is the pairwise softplus(d (s_1 - s_0))."""
    s = torch.tensor([[-20.0, -21.0]], requires_grad=True)
    r = torch.tensor([[10.0, 0.0]])
    best = torch.tensor([0.0])
    o = pro_loss(s, r, best, sft_weight=0.0, official=True)
    assert o.loss.item() == pytest.approx(math.log(PRO_OFFICIAL_EPS) + 200.0, rel=1e-6)
    o.loss.backward()
    assert s.grad.tolist() == [[-10.0, 0.0]]
    d = pro_loss(s.detach().double(), r.double(), best.double(), sft_weight=0.0)
    assert d.loss.item() == pytest.approx(math.log1p(math.exp(-10.0)))


def test_rrhf_official_hand_values_and_ragged_rows():
    logp = torch.tensor([[-6.0, -2.0, -9.0], [-4.0, -8.0, 0.0]], dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([[3, 2, 3], [2, 4, 0]])
    T = torch.tensor([10, 8])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    rewards = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 0.0]], dtype=torch.float64)
    o = rrhf_loss_official(logp, lengths, T, valid, rewards=rewards, rrhf_weight=100.0)
    # row 0: s = (-0.6, -0.2, -0.9): 0 beats 1 with s_1 > s_0: 0.4 ; row 1: s = (-0.5, -1.0), 1 beats 0: s_0 - s_1 = 0.5
    assert o.rank_loss.item() == pytest.approx(100 * (0.4 + 0.5) / 2)
    # SFT: the highest reward: row 0 slot 0 (6 / 10), row 1 slot 1 (8 / 8)
    assert o.sft_term.item() == pytest.approx((0.6 + 1.0) / 2)
    assert o.loss.item() == pytest.approx(45.0 + 0.8)
    o.loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-50 / 10 - 0.05, 50 / 10, 0.0, 50 / 8, -50 / 8 - 1 / 16, 0.0])
    with pytest.raises(ValueError, match="padded_lengths"):
        rrhf_loss_official(logp, lengths, torch.tensor([10]))


def test_rrhf_default_is_unchanged_by_the_official_variant():
    logp = torch.tensor([[-6.0, -2.0]], dtype=torch.float64)
    out = rrhf_loss(None, logp, torch.tensor([[3, 2]]), sft_weight=0.5)
    assert out.rank_loss.item() == pytest.approx(1.0) and out.sft_term.item() == pytest.approx(1.0)


# ------------------------------------------------------------------ config and training


def _cfg(*sets: str):
    return load_config(None, ["model=m", "data.graded=g.parquet", "deft.enabled=false", *sets])


def test_variant_config_rules():
    assert _cfg("method.name=pro")["method"]["variant"] == "default"
    assert _cfg("method.name=pro", "method.variant=official")["method"]["variant"] == "official"
    for name in ("dpo", "ipo", "sft"):
        with pytest.raises(ConfigError, match=r"method\.variant: 'official' exists for pro and rrhf only, not " + name):
            _cfg(f"method.name={name}", "method.variant=official")
    with pytest.raises(ConfigError, match=r"method\.variant: 'unofficial' is not one of default, official"):
        _cfg("method.variant=unofficial")
    with pytest.raises(ConfigError, match=r"method\.sft_weight: must be > 0 for the official RRHF"):
        _cfg("method.name=rrhf", "method.variant=official", "method.sft_weight=0")
    # official RRHF: sft_weight null is the reference's rrhf_weight 100
    assert sft_weight(_cfg("method.name=rrhf", "method.variant=official")["method"]) == 0.01
    assert sft_weight(_cfg("method.name=rrhf")["method"]) == 0.05
    assert sft_weight(_cfg("method.name=pro", "method.variant=official")["method"]) == 0.05


def test_pipeline_fingerprint_ignores_the_default_variant():
    from deft.pipeline import train_fingerprint_config

    cfg = _cfg("method.name=pro")
    fp = train_fingerprint_config(cfg)
    assert "variant" not in fp["method"]
    cfg["method"]["variant"] = "official"
    assert train_fingerprint_config(cfg)["method"]["variant"] == "official"


@pytest.fixture(scope="module")
def train_assets(tmp_path_factory):
    return tiny_train_assets(tmp_path_factory.mktemp("assets"))


@pytest.mark.parametrize("method", ["pro", "rrhf"])
def test_deft_train_official_variant_runs_a_step(tmp_path, train_assets, method):
    """`deft train` computes the official loss: step 1 (the same initial model, data and batch, the same
    sft_weight) gives another L_m than the default variant. RRHF: rank / sft_weight + SFT against
    rank + sft_weight * SFT. PRO: the reference's log(1e-10 + sum exp) is above logsumexp by about
    1e-10 / sum exp, small for these rounds of the tiny random model but far above float32 rounding."""
    from deft.train import run

    def step_one(variant):
        out = tmp_path / variant
        run(None, train_overrides(train_assets, out, **{"method.name": method, "method.variant": variant, "method.sft_weight": 0.05,
                                                        "train.max_steps": 1, "data.max_samples": 4}))
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        step = [r for r in rows if "L_m" in r]
        assert len(step) == 1 and all(math.isfinite(step[0][k]) for k in ("L_m", "rank_loss", "sft_term"))
        return step[0], json.loads((out / "manifest.json").read_text())

    default, _ = step_one("default")
    official, manifest = step_one("official")
    assert manifest["config"]["method"]["variant"] == "official" and manifest["config"]["method"]["sft_weight"] == 0.05
    if method == "rrhf":  # (the reference's SFT term is its own too: not comparable)
        assert abs(official["L_m"] - default["L_m"]) > 0.1 * abs(default["L_m"]), (official, default)
    else:  # the same SFT term; eps only raises a round's loss: here by ~1e-5 (the rounds' sum exp ~1e-5), far above float32 rounding (~1e-7)
        assert official["sft_term"] == default["sft_term"]
        assert official["rank_loss"] - default["rank_loss"] > 2e-6 and official["L_m"] - default["L_m"] > 2e-6, (official, default)
