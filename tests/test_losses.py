"""Tests for deft.losses: each loss against values worked out by hand (with
``math``), gradient flow, the edge cases (ties, zero lengths, valid masks,
PRO at l = 2, label smoothing 0), and response_logprobs against a naive loop."""

from __future__ import annotations

import math

import pytest
import torch

from deft.losses import (
    DEFT_OMEGA_DPO,
    DEFT_OMEGA_PRO,
    deft_loss,
    dpo_loss,
    ipo_loss,
    length_normalized_scores,
    pro_loss,
    response_logprobs,
    rrhf_loss,
    sft_loss,
)

D = torch.float64


def t(x, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=D, requires_grad=grad)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def neg_log_sigmoid(x: float) -> float:
    return softplus(-x)


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


# ---------------------------------------------------------------- scores


def test_length_normalized_scores_zero_length_guard():
    logp = t([[-6.0, -1.0, 0.0]], grad=True)
    lengths = torch.tensor([[3, 0, 0]])
    s, usable = length_normalized_scores(logp, lengths)
    assert s.tolist() == [[-2.0, 0.0, 0.0]]
    assert usable.tolist() == [[True, False, False]]
    s.sum().backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad.tolist() == [[1 / 3, 0.0, 0.0]]


def test_length_normalized_scores_valid_mask():
    _, usable = length_normalized_scores(t([[-1.0, -2.0]]), torch.tensor([[1, 2]]), torch.tensor([[True, False]]))
    assert usable.tolist() == [[True, False]]


# ---------------------------------------------------------------- SFT


def test_sft_token_and_sequence_reductions():
    logp = t([[-6.0, -100.0], [-3.0, -100.0]], grad=True)
    lengths = torch.tensor([[3, 7], [1, 7]])
    # token mean: (6 + 3) / (3 + 1); sequence mean: (6/3 + 3/1) / 2
    assert sft_loss(logp, lengths).item() == pytest.approx(9 / 4)
    assert sft_loss(logp, lengths, reduction="sequence").item() == pytest.approx(2.5)
    # 1-D input = already the best responses
    assert sft_loss(logp[:, 0], lengths[:, 0]).item() == pytest.approx(9 / 4)
    sft_loss(logp, lengths).backward()
    assert logp.grad.tolist() == [[-0.25, 0.0], [-0.25, 0.0]]


def test_sft_excludes_zero_length_and_padding_best():
    logp = t([[-6.0, -1.0], [0.0, -1.0], [-50.0, -1.0]])
    lengths = torch.tensor([[3, 1], [0, 1], [5, 1]])
    valid = torch.tensor([[True, True], [True, True], [False, True]])
    # only row 0 counts
    assert sft_loss(logp, lengths, valid).item() == pytest.approx(2.0)
    assert sft_loss(logp, lengths, valid, reduction="sequence").item() == pytest.approx(2.0)


def test_sft_nothing_usable_is_connected_zero():
    logp = t([[0.0, -1.0]], grad=True)
    loss = sft_loss(logp, torch.tensor([[0, 1]]))
    assert loss.item() == 0.0
    loss.backward()
    assert logp.grad.tolist() == [[0.0, 0.0]]


def test_sft_bad_reduction():
    with pytest.raises(ValueError):
        sft_loss(t([[-1.0, -1.0]]), torch.tensor([[1, 1]]), reduction="mean")


# ---------------------------------------------------------------- DPO


def test_dpo_hand_values_and_metrics():
    pc = t([-1.0, -4.0], grad=True)
    pr = t([-3.0, -2.0], grad=True)
    rc = t([-2.0, -3.0])
    rr = t([-2.5, -2.0])
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # h0 = (-1+2) - (-3+2.5) = 1.5 ; h1 = (-4+3) - (-2+2) = -1
    l0, l1 = neg_log_sigmoid(0.15), neg_log_sigmoid(-0.1)
    assert out.losses.tolist() == pytest.approx([l0, l1])
    assert out.loss.item() == pytest.approx((l0 + l1) / 2)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.1])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.05, 0.0])
    assert out.margins.tolist() == pytest.approx([0.15, -0.1])
    assert out.accuracies.tolist() == [1.0, 0.0]
    assert out.accuracy.item() == 0.5
    assert not out.chosen_rewards.requires_grad
    m = out.metrics("train/")
    assert m["train/rewards/accuracy"] == 0.5 and m["train/loss"] == pytest.approx((l0 + l1) / 2)
    assert out.metrics() == {k[len("train/"):]: v for k, v in m.items()}
    out.loss.backward()
    # d/dpc of -log sig(beta h) / B = -beta * sigmoid(-beta h) / B
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert pc.grad.tolist() == pytest.approx([-0.1 * sig(-0.15) / 2, -0.1 * sig(0.1) / 2])
    assert pr.grad.tolist() == pytest.approx([0.1 * sig(-0.15) / 2, 0.1 * sig(0.1) / 2])


def test_dpo_tie_counts_as_wrong_and_gives_log2():
    z = t([-1.0])
    out = dpo_loss(z, z, z, z, beta=0.5)
    assert out.loss.item() == pytest.approx(math.log(2))
    assert out.accuracies.tolist() == [0.0]


def test_dpo_label_smoothing():
    pc, pr, rc, rr = t([-1.0]), t([-3.0]), t([-2.0]), t([-2.5])
    plain = dpo_loss(pc, pr, rc, rr, beta=0.1).loss.item()
    assert dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.0).loss.item() == plain
    eps = 0.2
    want = (1 - eps) * neg_log_sigmoid(0.15) + eps * neg_log_sigmoid(-0.15)
    assert dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=eps).loss.item() == pytest.approx(want)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, label_smoothing=0.5)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, beta=0.0)


# ---------------------------------------------------------------- IPO


def test_ipo_length_normalised_hand_value():
    pc, pr = t([-4.0], grad=True), t([-9.0], grad=True)
    rc, rr = t([-6.0]), t([-6.0])
    out = ipo_loss(pc, pr, rc, rr, beta=0.5, chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([3]))
    # averaged: pc=-2, rc=-3, pr=-3, rr=-2 ; h = 1 - (-1) = 2 ; (2 - 1/(2*0.5))^2 = 1
    assert out.loss.item() == pytest.approx(1.0)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5])
    out.loss.backward()
    # d/dpc = 2 (h - 1) * (1/2) = 1 ; d/dpr = 2 (h - 1) * (-1/3)
    assert pc.grad.tolist() == pytest.approx([1.0])
    assert pr.grad.tolist() == pytest.approx([-2 / 3])
    # pre-averaged inputs without lengths give the same
    same = ipo_loss(t([-2.0]), t([-3.0]), t([-3.0]), t([-2.0]), beta=0.5)
    assert same.loss.item() == pytest.approx(1.0)


def test_ipo_zero_length_and_argument_checks():
    out = ipo_loss(t([0.0]), t([-3.0]), t([0.0]), t([-3.0]), beta=0.25,
                   chosen_lengths=torch.tensor([0]), rejected_lengths=torch.tensor([3]))
    assert out.loss.item() == pytest.approx(4.0)  # h = 0 -> (0 - 2)^2
    with pytest.raises(ValueError):
        ipo_loss(t([0.0]), t([0.0]), t([0.0]), t([0.0]), chosen_lengths=torch.tensor([1]))


# ---------------------------------------------------------------- RRHF


def _rrhf_inputs():
    s = t([[-1.0, -0.5, -2.0], [-1.0, -1.0, -3.0]])
    lengths = torch.tensor([[2, 4, 1], [5, 1, 2]])
    return s, s.detach() * lengths, lengths


def test_rrhf_positional_ranking_hand_value():
    s, logp, lengths = _rrhf_inputs()
    s.requires_grad_(True)
    out = rrhf_loss(s, logp, lengths)
    # row 0: pairs (0,1) max(0, -0.5+1)=0.5, (0,2) 0, (1,2) 0 ; row 1 ties -> 0
    assert out.rank_loss.item() == pytest.approx(0.25)
    # SFT: mean of -logp[:,0]/len[:,0] = mean(1, 1)
    assert out.sft_term.item() == pytest.approx(1.0)
    assert out.loss.item() == pytest.approx(1.25)
    out.loss.backward()
    assert s.grad.flatten().tolist() == pytest.approx([-0.5, 0.5, 0.0, 0.0, 0.0, 0.0])


def test_rrhf_uses_rewards_and_skips_reward_ties():
    s, logp, lengths = _rrhf_inputs()
    rewards = t([[1.0, 3.0, 2.0], [2.0, 2.0, 2.0]])
    out = rrhf_loss(s, logp, lengths, sft_weight=0.0, rewards=rewards)
    # row 0: 1>0: max(0, s0-s1)=0 ; 1>2: max(0, s2-s1)=0 ; 2>0: max(0, s0-s2)=1 ; row 1: all ties
    assert out.rank_loss.item() == pytest.approx(0.5)
    assert out.sft_term.item() == 0.0


def test_rrhf_s_none_valid_mask_and_zero_length():
    logp = t([[-2.0, -1.0, 0.0, 5.0]], grad=True)
    lengths = torch.tensor([[2, 4, 0, 1]])
    valid = torch.tensor([[True, True, True, False]])
    out = rrhf_loss(None, logp, lengths, valid, sft_weight=0.5)
    # usable: 0 (s=-1), 1 (s=-0.25); slot 2 empty, slot 3 padding
    assert out.rank_loss.item() == pytest.approx(0.75)
    assert out.sft_term.item() == pytest.approx(0.5)
    out.loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-0.5 - 0.25, 0.25, 0.0, 0.0])


# ---------------------------------------------------------------- PRO


def test_pro_three_responses_with_rewards_hand_value():
    s = t([[-1.0, -2.0, -1.5]], grad=True)
    r = t([[3.0, 1.0, 0.0]])
    best = t([-10.0], grad=True)
    out = pro_loss(s, r, best, sft_weight=0.05)
    # round 0: d = (2, 3), d_00 = 3 ; round 1: d = 1, d_11 = 1
    r0 = lse(-1 * 3, -2 * 2, -1.5 * 3) + 3
    r1 = lse(-2, -1.5) + 2
    assert out.rank_loss.item() == pytest.approx(r0 + r1)
    assert out.sft_term.item() == pytest.approx(0.05 * 4 * 10)
    assert out.loss.item() == pytest.approx(r0 + r1 + 2.0)
    assert out.metrics() == pytest.approx({"loss": r0 + r1 + 2.0, "rank_loss": r0 + r1, "sft_term": 2.0})
    assert list(out.metrics("train/")) == ["train/loss", "train/rank_loss", "train/sft_term"]
    out.loss.backward()
    assert best.grad.tolist() == pytest.approx([-0.2])
    assert torch.isfinite(s.grad).all() and s.grad[0, 0] < 0


def test_pro_without_rewards_uses_unit_temperatures():
    s = t([[-1.0, -2.0, -1.5], [0.0, 0.0, 0.0]])
    out = pro_loss(s, None, t([-4.0, -2.0]), sft_weight=0.0)
    row0 = (lse(-1, -2, -1.5) + 1) + (lse(-2, -1.5) + 2)
    row1 = math.log(3) + math.log(2)  # ties: uniform softmax
    assert out.rank_loss.item() == pytest.approx((row0 + row1) / 2)
    assert out.sft_term.item() == 0.0


def test_pro_l2_reduces_to_scaled_pairwise():
    s = t([[-1.0, -1.4], [-2.0, -0.5]])
    r = t([[2.0, 0.5], [1.0, 0.0]])
    best = t([-7.0, -3.0])
    out = pro_loss(s, r, best, sft_weight=0.1)
    # -log sigmoid(d (s0 - s1)) with d = r0 - r1, plus sft_weight * 1**2 * (-best)
    p0 = neg_log_sigmoid(1.5 * (-1.0 + 1.4))
    p1 = neg_log_sigmoid(1.0 * (-2.0 + 0.5))
    assert out.rank_loss.item() == pytest.approx((p0 + p1) / 2)
    assert out.sft_term.item() == pytest.approx(0.1 * (7 + 3) / 2)
    # without rewards: the plain -log sigmoid(s0 - s1)
    plain = pro_loss(s, None, best, sft_weight=0.0)
    assert plain.rank_loss.item() == pytest.approx((neg_log_sigmoid(0.4) + neg_log_sigmoid(-1.5)) / 2)


def test_pro_reward_ties_give_zero_temperature():
    s = t([[-1.0, -2.0, -3.0]])
    r = t([[1.0, 1.0, 1.0]])
    out = pro_loss(s, r, t([0.0]), sft_weight=0.0)
    # all gaps 0: every exp term is 1 -> log 3 + log 2
    assert out.rank_loss.item() == pytest.approx(math.log(3) + math.log(2))


def test_pro_valid_mask_padding_matches_shorter_list():
    s3 = t([[-1.0, -2.0, -1.5]])
    r3 = t([[3.0, 1.0, 0.0]])
    full = pro_loss(s3, r3, t([-10.0]), sft_weight=0.05)
    s4 = t([[-1.0, -2.0, -1.5, 50.0]])
    r4 = t([[3.0, 1.0, 0.0, float("nan")]])
    valid = torch.tensor([[True, True, True, False]])
    padded = pro_loss(s4, r4, t([-10.0]), valid, sft_weight=0.05)
    assert padded.loss.item() == pytest.approx(full.loss.item())
    # a hole in the middle: rounds over {0, 2} only, (n - 1)^2 = 1
    hole = pro_loss(s3, r3, t([-10.0]), torch.tensor([[True, False, True]]), sft_weight=0.05)
    assert hole.rank_loss.item() == pytest.approx(neg_log_sigmoid(3 * (-1.0 + 1.5)))
    assert hole.sft_term.item() == pytest.approx(0.5)


def test_pro_ragged_batch_mean_and_gradients():
    s = t([[-1.0, -2.0, -1.5], [-0.5, -0.7, 0.0]], grad=True)
    r = t([[3.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    best = t([-10.0, -4.0], grad=True)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    out = pro_loss(s, r, best, valid, sft_weight=0.05)
    row0 = (lse(-3, -4, -4.5) + 3) + (lse(-2, -1.5) + 2) + 0.05 * 4 * 10
    row1 = neg_log_sigmoid(1 * (-0.5 + 0.7)) + 0.05 * 1 * 4
    assert out.loss.item() == pytest.approx((row0 + row1) / 2)
    out.loss.backward()
    assert torch.isfinite(s.grad).all()
    assert s.grad[1, 2].item() == 0.0  # padding gets no gradient
    assert best.grad.tolist() == pytest.approx([-0.1, -0.025])


def test_pro_matches_reference_formula_on_random_inputs():
    """Against a direct transcription of the reference loop (exp/log, batch
    mean per round, (l-1)^2 weighted batch-mean summed NLL)."""
    g = torch.Generator().manual_seed(0)
    B, l, w = 4, 4, 0.05
    s = -torch.rand(B, l, generator=g, dtype=D) * 3
    r = torch.sort(torch.randn(B, l, generator=g, dtype=D), dim=1, descending=True).values
    best = -torch.rand(B, generator=g, dtype=D) * 20
    want = 0.0
    for k in range(l - 1):
        per = []
        for b in range(B):
            neg_t = [r[b, k].item() - r[b, j].item() for j in range(k + 1, l)]
            pos_t = max(neg_t)
            denom = math.exp(s[b, k].item() * pos_t) + sum(
                math.exp(s[b, j].item() * tt) for j, tt in zip(range(k + 1, l), neg_t)
            )
            per.append(math.log(denom) - s[b, k].item() * pos_t)
        want += sum(per) / B
    want += w * (l - 1) ** 2 * (-best).mean().item()
    assert pro_loss(s, r, best, sft_weight=w).loss.item() == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------- DEFT


def test_deft_loss():
    base = t(1.0, grad=True)
    r_dis = t(100.0, grad=True)
    loss = deft_loss(base, r_dis, DEFT_OMEGA_DPO)
    assert loss.item() == pytest.approx(1.0 - 2.5e-4)
    loss.backward()
    assert base.grad.item() == 1.0
    assert r_dis.grad.item() == pytest.approx(-2.5e-6)
    assert DEFT_OMEGA_PRO == 2.5e-5
    assert deft_loss(base, 3.0, 0.5).item() == pytest.approx(-0.5)
    assert deft_loss(base, r_dis, 0) is base
    with pytest.raises(ValueError):
        deft_loss(base, r_dis, float("nan"))


# ---------------------------------------------------------------- gradients flow


def test_all_losses_backpropagate():
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(3, 4, generator=g, dtype=D) * 10).requires_grad_(True)
    lengths = torch.tensor([[3, 5, 2, 4]] * 3)
    ref = -torch.rand(3, 4, generator=g, dtype=D) * 10
    s, usable = length_normalized_scores(logp, lengths)
    total = (
        sft_loss(logp, lengths)
        + dpo_loss(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], label_smoothing=0.1).loss
        + ipo_loss(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1], chosen_lengths=lengths[:, 0],
                   rejected_lengths=lengths[:, 1]).loss
        + rrhf_loss(s, logp, lengths).loss
        + pro_loss(s, ref, logp[:, 0], usable).loss
    )
    deft_loss(total, logp.sum(), 1e-3).backward()
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad != 0).all()


# ---------------------------------------------------------------- response_logprobs


def _naive_logprobs(logits: torch.Tensor, labels: torch.Tensor):
    B, T, _ = logits.shape
    sums, counts = [], []
    for b in range(B):
        acc, n = torch.zeros((), dtype=D), 0
        for pos in range(T - 1):
            y = int(labels[b, pos + 1])
            if y == -100:
                continue
            acc = acc + torch.log_softmax(logits[b, pos].to(D), dim=-1)[y]
            n += 1
        sums.append(acc)
        counts.append(n)
    return torch.stack(sums), counts


def _lm_batch(dtype=D, seed=0, V=11):
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 7
    logits = (torch.randn(B, T, V, generator=g, dtype=D) * 3).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # prompt
    labels[1, :2] = -100
    labels[1, 5:] = -100  # right padding
    labels[2, :] = -100  # no response tokens at all
    return logits, labels


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 100])
def test_response_logprobs_matches_naive_loop(chunk_size):
    logits, labels = _lm_batch()
    logits.requires_grad_(True)
    got, n = response_logprobs(logits, labels, chunk_size=chunk_size)
    want, counts = _naive_logprobs(logits, labels)
    assert n.tolist() == counts == [4, 3, 0]
    assert n.dtype == torch.int64 and got.dtype == D
    torch.testing.assert_close(got, want)
    # gradients equal autograd through the naive loop
    w = torch.tensor([0.3, -1.7, 2.0], dtype=D)
    (g_fast,) = torch.autograd.grad((got * w).sum(), logits)
    (g_naive,) = torch.autograd.grad((want * w).sum(), logits)
    torch.testing.assert_close(g_fast, g_naive)
    assert g_fast[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_response_logprobs_gradcheck():
    logits, labels = _lm_batch(V=5, seed=3)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: response_logprobs(x, labels, chunk_size=2)[0], (logits,), fast_mode=True
    )


def test_response_logprobs_bf16_accumulates_in_float32():
    logits, labels = _lm_batch(dtype=torch.bfloat16, seed=5, V=50)
    logits.requires_grad_(True)
    got, _ = response_logprobs(logits, labels)
    assert got.dtype == torch.float32
    want, _ = _naive_logprobs(logits.detach(), labels)  # exact math on the same bf16 values
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    got.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_response_logprobs_checks_inputs():
    logits, labels = _lm_batch()
    with pytest.raises(ValueError):
        response_logprobs(logits, labels[:, :-1])
    bad = labels.clone()
    bad[0, 5] = 11
    with pytest.raises(ValueError):
        response_logprobs(logits, bad)
    with pytest.raises(ValueError):
        response_logprobs(logits, labels, chunk_size=0)


def test_ranking_losses_name_the_argument_with_a_bad_shape():
    with pytest.raises(ValueError, match=r"^s must have shape \(B, l\), got \(3,\)$"):
        pro_loss(t([1.0, 2.0, 3.0]), None, t([1.0]))
    with pytest.raises(ValueError, match=r"^logp_sum must have shape \(B, l\), got \(2,\)$"):
        rrhf_loss(None, t([1.0, 2.0]), t([1.0, 1.0]))
    with pytest.raises(ValueError, match=r"^logp_sum must have shape \(B, l\), got \(2, 0\)$"):
        rrhf_loss(torch.zeros(2, 0, dtype=D), torch.zeros(2, 0, dtype=D), torch.zeros(2, 0, dtype=D))


def test_single_response_lists_are_accepted_and_carry_no_ranking_signal():
    out = pro_loss(t([[-1.5], [-0.5]]), None, t([-3.0, -1.0]), sft_weight=0.05)
    assert out.rank_loss.item() == 0.0 and out.sft_term.item() == 0.0  # 0 rounds, weight (l-1)^2 = 0
    out = rrhf_loss(None, t([[-3.0], [-1.0]]), t([[2.0], [1.0]]), sft_weight=1.0)
    assert out.rank_loss.item() == 0.0 and out.sft_term.item() == pytest.approx((1.5 + 1.0) / 2)
