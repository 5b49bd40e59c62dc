"""SimPO, CPO, ORPO and KTO (python/deft/losses.py) against TRL 1.16's formulas on the same
log-probs, their gradients, and their edge cases.

CPO and SimPO are TRL's own ``CPOTrainer.cpo_loss`` and ORPO's odds-ratio term is TRL's own
``ORPOTrainer.odds_ratio_loss``, each called on a stub trainer object with the same float64 tensors;
TRL 1.16 has no standalone KTO loss (it sits inside ``KTOTrainer._compute_loss``), so its formula is
transcribed below with the file and lines cited. TRL's NLL term of CPO (``cross_entropy_loss`` in
``CPOTrainer.concatenated_forward``) is transcribed as well and compared with ``sft_loss``
(``reduction="token"``) on the same logits. Skipped without TRL (CI installs it: the ``test`` extra)."""

from __future__ import annotations

import types

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from deft.losses import (  # noqa: E402
    cpo_loss, kto_loss, kto_reference_point, orpo_loss, response_logprobs, sft_loss, simpo_loss,
)

TOL = 1e-6


def _pairs(seed: int = 0, B: int = 7):
    """Summed log-probs of chosen and rejected responses (float64), their lengths, and references."""
    g = torch.Generator().manual_seed(seed)
    nc = torch.randint(1, 40, (B,), generator=g)
    nr = torch.randint(1, 40, (B,), generator=g)
    pc = -(torch.rand(B, generator=g, dtype=torch.float64) * 2.5 + 0.05) * nc
    pr = -(torch.rand(B, generator=g, dtype=torch.float64) * 2.5 + 0.05) * nr
    rc = pc + torch.randn(B, generator=g, dtype=torch.float64) * 3
    rr = pr + torch.randn(B, generator=g, dtype=torch.float64) * 3
    return pc, pr, nc, nr, rc, rr


def _leaf(*xs):
    return [x.clone().requires_grad_(True) for x in xs]


def _cpo_stub(loss_type: str, beta: float, label_smoothing: float = 0.0, gamma: float = 0.5):
    return types.SimpleNamespace(alpha=0.0, accelerator=types.SimpleNamespace(device=torch.device("cpu")), loss_type=loss_type,
                                 beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max())), (a, b)


def _same_as_trl(ours, ours_grads, losses, chosen_rewards, rejected_rewards, trl_grads) -> None:
    """deft's loss output and gradients equal TRL's ``cpo_loss`` results on the same inputs."""
    _close(ours.losses.detach(), losses.detach())
    _close(ours.chosen_rewards, chosen_rewards)
    _close(ours.rejected_rewards, rejected_rewards)
    assert len(ours_grads) == len(trl_grads)
    for x, y in zip(ours_grads, trl_grads):
        _close(x, y)


# --------------------------------------------------------------------------- CPO and SimPO vs TRL's CPOTrainer.cpo_loss


@pytest.mark.parametrize("beta,ls", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_cpo_equals_trl_cpo_loss_sigmoid(beta, ls):
    from trl.experimental.cpo import CPOTrainer

    pc, pr, *_ = _pairs(1)
    a, b = _leaf(pc, pr)
    ours = cpo_loss(a, b, beta=beta, label_smoothing=ls)
    ga = torch.autograd.grad(ours.loss, (a, b))
    a2, b2 = _leaf(pc, pr)
    losses, cr, rr = CPOTrainer.cpo_loss(_cpo_stub("sigmoid", beta, ls), a2, b2)
    gt = torch.autograd.grad(losses.mean(), (a2, b2))
    _same_as_trl(ours, ga, losses, cr, rr, gt)
    assert float(ours.loss.detach()) > 0.1  # not a degenerate point


@pytest.mark.parametrize("beta,gamma,ls", [(2.0, 0.5, 0.0), (2.5, 1.375, 0.0), (2.0, 1.0, 0.1)])
def test_simpo_equals_trl_cpo_loss_simpo_on_average_logps(beta, gamma, ls):
    from trl.experimental.cpo import CPOTrainer

    pc, pr, nc, nr, *_ = _pairs(2)
    a, b = _leaf(pc, pr)
    ours = simpo_loss(a, b, nc, nr, beta=beta, gamma=gamma, label_smoothing=ls)
    ga = torch.autograd.grad(ours.loss, (a, b))
    # TRL averages the log-probs first (get_batch_logps(average_log_prob=True) for loss_type="simpo")
    a2, b2 = _leaf(pc, pr)
    losses, cr, rr = CPOTrainer.cpo_loss(_cpo_stub("simpo", beta, ls, gamma), a2 / nc, b2 / nr)
    gt = torch.autograd.grad(losses.mean(), (a2, b2))
    _same_as_trl(ours, ga, losses, cr, rr, gt)
    # the margin matters: gamma 0 is another loss
    assert abs(float(simpo_loss(pc, pr, nc, nr, beta=beta, gamma=0.0).loss) - float(ours.loss)) > 1e-3
    # already-averaged log-probs without lengths give the same
    _close(simpo_loss(pc / nc, pr / nr, beta=beta, gamma=gamma, label_smoothing=ls).losses, ours.losses.detach())


def test_cpo_nll_term_equals_trl_cross_entropy_on_the_chosen_tokens():
    """TRL's CPO NLL (cpo_trainer.py 826-845: ``nn.CrossEntropyLoss()`` over the shifted chosen logits
    and labels, the prompt labelled -100) is ``sft_loss(reduction="token")`` of the summed log-probs."""
    g = torch.Generator().manual_seed(3)
    B, T, V = 4, 11, 13
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    for b, (p, end) in enumerate([(3, 11), (5, 9), (2, 6), (7, 11)]):  # prompt and padding masked, ragged
        labels[b, :p] = -100
        labels[b, end:] = -100
    trl = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    logp, n = response_logprobs(logits, labels)
    ours = sft_loss(logp, n, reduction="token")
    assert abs(float(ours) - float(trl)) <= 1e-12
    g1 = torch.autograd.grad(ours, logits, retain_graph=True)[0]
    g2 = torch.autograd.grad(trl, logits)[0]
    assert float((g1 - g2).abs().max()) <= 1e-12
    # the per-response average (deft's RPO term for DPO/IPO) is a different number on ragged responses
    assert abs(float(sft_loss(logp, n, reduction="sequence")) - float(trl)) > 1e-3


# --------------------------------------------------------------------------- ORPO vs TRL's ORPOTrainer.odds_ratio_loss


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_orpo_equals_trl_odds_ratio_loss(beta):
    from trl.experimental.orpo import ORPOTrainer

    pc, pr, nc, nr, *_ = _pairs(4)
    pc = pc.clone()
    pc[0] = -0.01 * nc[0]  # an average log-prob above -log 2: TRL's other log1mexp branch
    a, b = _leaf(pc, pr)
    ours = orpo_loss(a, b, nc, nr, beta=beta)
    ga = torch.autograd.grad(ours.loss, (a, b))
    stub = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    a2, b2 = _leaf(pc, pr)
    losses, cr, rr, mean_ratio, mean_log_odds = ORPOTrainer.odds_ratio_loss(stub, a2 / nc, b2 / nr)
    gt = torch.autograd.grad(-losses.mean(), (a2, b2))  # TRL: loss = nll - losses.mean()
    # TRL casts the log-probs to float32 (orpo_trainer.py 690-691), so the agreement is float32's
    _close(ours.losses.detach().float(), -losses.detach(), 1e-6)
    _close(ours.chosen_rewards.float(), cr, 1e-6)
    _close(ours.rejected_rewards.float(), rr, 1e-6)
    assert abs(ours.metrics()["log_odds_ratio"] - float(mean_ratio)) <= 1e-6
    assert abs(ours.metrics()["log_odds_chosen"] - float(mean_log_odds)) <= 1e-5 * max(1.0, abs(float(mean_log_odds)))
    for x, y in zip(ga, gt):
        _close(x.float(), y.double().float(), 1e-5)
    # float64 against the formula itself, to 1e-12: log odds(p) = a - log(1 - exp(a))
    aw, al = pc / nc, pr / nr
    log_odds = (aw - al) - (torch.log(1 - torch.exp(aw)) - torch.log(1 - torch.exp(al)))
    _close(ours.losses.detach(), -beta * F.logsigmoid(log_odds), 1e-12)


def test_orpo_empty_response_adds_nothing_and_keeps_gradients_finite():
    pc = torch.tensor([-5.0, 0.0, -3.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-9.0, -4.0, -6.0], dtype=torch.float64, requires_grad=True)
    nc, nr = torch.tensor([5, 0, 3]), torch.tensor([3, 2, 4])
    o = orpo_loss(pc, pr, nc, nr, beta=0.1)
    assert o.losses[1] == 0 and o.losses[0] > 0 and o.losses[2] > 0
    assert float(o.loss) == pytest.approx(float(o.losses.sum()) / 3)  # still counted in the mean
    o.loss.backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all() and pc.grad[1] == 0 and pr.grad[1] == 0



def test_simpo_empty_response_adds_nothing_and_keeps_gradients_finite():
    """An empty response has no average log-prob; 0 (the best possible) must not score it."""
    pc = torch.tensor([-5.0, 0.0, -3.0, -4.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-9.0, -4.0, -6.0, 0.0], dtype=torch.float64, requires_grad=True)
    nc, nr = torch.tensor([5, 0, 3, 2]), torch.tensor([3, 2, 4, 0])
    o = simpo_loss(pc, pr, nc, nr, beta=2.0, gamma=0.5)
    assert o.losses[1] == 0 and o.losses[3] == 0 and o.losses[0] > 0 and o.losses[2] > 0
    assert float(o.loss) == pytest.approx(float(o.losses.sum()) / 4)  # still counted in the mean
    o.loss.backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    assert pc.grad[1] == 0 and pr.grad[1] == 0 and pc.grad[3] == 0 and pr.grad[3] == 0 and pc.grad[0] != 0

# --------------------------------------------------------------------------- KTO: TRL's formula, transcribed


def _trl_kto(beta, dw, uw, pc, pr, rc, rr, policy_kl, ref_kl):
    """trl/trainer/kto_trainer.py (TRL 1.16.0), ``KTOTrainer._compute_loss``, loss_type="kto":
    lines 1443-1444 (kl = mean(KL_logps - ref_KL_logps), detached, gathered, clamped at 0),
    1453 (chosen), 1470 (rejected), 1479-1482 (weighted, concatenated) and 1548 (nanmean)."""
    kl = (policy_kl - ref_kl).mean().detach()
    kl = kl.mean().clamp(min=0)  # gather_for_metrics over one process is the identity
    chosen_losses = 1 - torch.sigmoid(beta * ((pc - rc) - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - (pr - rr)))
    losses = torch.cat((dw * chosen_losses, uw * rejected_losses), 0)
    return losses.nanmean(), beta * (pc - rc).detach(), beta * (pr - rr).detach(), kl


@pytest.mark.parametrize("beta,dw,uw,shift", [(0.1, 1.0, 1.0, 0.0), (0.5, 1.0, 1.33, 0.0), (0.1, 1.0, 1.0, -40.0)])
def test_kto_equals_trl_formula(beta, dw, uw, shift):
    pc, pr, nc, nr, rc, rr = _pairs(5)
    g = torch.Generator().manual_seed(6)
    ref_kl = -torch.rand(2 * len(pc), generator=g, dtype=torch.float64) * 60
    policy_kl = ref_kl + 3.0 + shift + torch.randn(2 * len(pc), generator=g, dtype=torch.float64)  # shift < 0: the clamp at 0
    a, b = _leaf(pc, pr)
    pk = policy_kl.clone().requires_grad_(True)
    z = kto_reference_point(pk.view(-1, 2), ref_kl.view(-1, 2))
    assert not z.requires_grad  # the reference point carries no gradient
    ours = kto_loss(a, b, rc, rr, z, beta=beta, desirable_weight=dw, undesirable_weight=uw)
    ga = torch.autograd.grad(ours.loss, (a, b))
    a2, b2 = _leaf(pc, pr)
    loss, cr, rjr, kl = _trl_kto(beta, dw, uw, a2, b2, rc, rr, policy_kl, ref_kl)
    gt = torch.autograd.grad(loss, (a2, b2))
    assert abs(float(ours.loss) - float(loss)) <= 1e-12
    assert float(ours.kl) == pytest.approx(float(kl), abs=1e-12)
    assert (float(kl) == 0.0) == (shift < 0)
    _close(ours.chosen_rewards, cr, 1e-12)
    _close(ours.rejected_rewards, rjr, 1e-12)
    for x, y in zip(ga, gt):
        _close(x, y, 1e-12)
    # the reference point matters when positive
    if shift == 0.0:
        assert abs(float(kto_loss(pc, pr, rc, rr, 0.0, beta=beta, desirable_weight=dw, undesirable_weight=uw).loss) - float(loss)) > 1e-4


def test_kto_reference_point_masks_and_checks():
    pol = torch.tensor([[-1.0, -2.0], [-3.0, -100.0]])
    ref = torch.tensor([[-2.0, -2.5], [-3.5, 0.0]])
    valid = torch.tensor([[True, True], [True, False]])
    assert float(kto_reference_point(pol, ref, valid)) == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    with pytest.raises(ValueError, match="shape"):
        kto_reference_point(pol, ref[:, :1])
    with pytest.raises(ValueError, match="desirable_weight"):
        kto_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], 0.0, desirable_weight=-1.0)
    with pytest.raises(ValueError, match="beta"):
        kto_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], 0.0, beta=0.0)


# --------------------------------------------------------------------------- gradients and arguments


def test_new_losses_gradcheck():
    pc, pr, nc, nr, rc, rr = _pairs(7, B=4)
    checks = {
        "simpo": lambda a, b: simpo_loss(a, b, nc, nr, beta=2.0, gamma=0.7).loss,
        "cpo": lambda a, b: cpo_loss(a, b, beta=0.2).loss,
        "orpo": lambda a, b: orpo_loss(a, b, nc, nr, beta=0.3).loss,
        "kto": lambda a, b: kto_loss(a, b, rc, rr, torch.tensor(1.5, dtype=torch.float64), beta=0.4, undesirable_weight=1.2).loss,
    }
    for name, f in checks.items():
        a, b = _leaf(pc, pr)
        assert torch.autograd.gradcheck(f, (a, b)), name
        g = torch.autograd.grad(f(a, b), (a, b))
        assert float(g[0].abs().sum()) > 0 and float(g[1].abs().sum()) > 0, name
        assert (g[0] <= 0).all() and (g[1] >= 0).all(), name  # descending raises the chosen and lowers the rejected


def test_new_losses_check_arguments():
    x = torch.tensor([-1.0, -2.0])
    with pytest.raises(ValueError, match="beta"):
        simpo_loss(x, x, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        cpo_loss(x, x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="both"):
        orpo_loss(x, x, torch.tensor([1, 2]), None)
    with pytest.raises(ValueError, match="both"):
        simpo_loss(x, x, None, torch.tensor([1, 2]))
