"""deft's CPO, SimPO, CPO-SimPO and ORPO through the trainer path (encode, collate, forward,
``loss_terms``) against TRL 1.16's own ``CPOTrainer`` / ``ORPOTrainer`` code (``concatenated_forward``,
``cpo_loss`` / ``odds_ratio_loss``, ``get_batch_loss_metrics``) run on the same token ids, the six real
PRO HH pairs and the tiny float64 Llama of tests/test_vs_trl.py. TRL's methods run bound to a stub
holding the attributes they read (their trainers tokenise with their own, older rules; the ids are
deft's in both, so the comparison is of the loss code). Float64 throughout: loss and gradients agree
to 1e-10. ORPO's NLL differs on purpose (TRL's covers the prompt tokens too), so ORPO is compared on
its odds-ratio term, and the NLL difference is checked to be what it is."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from conftest import backward_grads, shared_file
from test_vs_trl import models, rows  # noqa: F401 - fixtures

pytest.importorskip("trl")
pytest.importorskip("transformers")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-10


def _examples(tok, rows):  # noqa: F811
    from deft.distribution import resolve_tokenizer
    from deft.render import policy_layout, render_prompt
    from deft.train import encode_examples

    native = resolve_tokenizer(str(shared_file("tokenizers/smollm2"))).native
    lay = policy_layout("chat", tok)
    prompts = [render_prompt(r["context"], "chat", tok) for r in rows]
    return encode_examples([str(i) for i in range(len(rows))], prompts, [[r["best"], r["worst"]] for r in rows], [[1.0, 0.0]] * len(rows),
                           native, eos_token_id=int(tok.eos_token_id), response_prefix=lay.prefix, max_length=4096, max_prompt_length=2048,
                           lead_ids=lay.lead_ids, response_suffix=lay.suffix, append_eos=lay.append_eos)


def _trl_batch(exs, pad):
    """TRL's paired batch (``chosen_*``, ``rejected_*``, right-padded, labels -100 on the prompt) of deft's ids."""
    out = {}
    for j, side in enumerate(("chosen", "rejected")):
        seqs = [e.input_ids[j] for e in exs]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        labels = torch.full((len(seqs), T), -100, dtype=torch.long)
        for i, (s, e) in enumerate(zip(seqs, exs)):
            ids[i, :len(s)] = torch.from_numpy(s)
            mask[i, :len(s)] = 1
            labels[i, e.prompt_len:len(s)] = torch.from_numpy(s[e.prompt_len:])
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return out


def _stub(trainer_cls, methods, **attrs):
    acc = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    attrs = {"alpha": 0.0, "label_smoothing": 0.0, **attrs}
    s = types.SimpleNamespace(accelerator=acc, is_encoder_decoder=False, aux_loss_enabled=False,
                              concatenated_inputs=trainer_cls.concatenated_inputs, get_batch_logps=trainer_cls.get_batch_logps, **attrs)
    for name in methods:
        setattr(s, name, types.MethodType(getattr(trainer_cls, name), s))
    return s


def _deft(method, sets, tok, policy, exs):
    from deft.config import load_config
    from deft.train import _forward, collate, loss_terms

    cfg = load_config(str(ROOT / "configs" / f"{method}.yaml"), ["model=x"] + sets)
    batch = collate(exs, tok.pad_token_id)
    dev = torch.device("cpu")
    policy.train()
    out = _forward(policy, batch, dev, None, need_hidden=False)
    lm, r_dis, metrics = loss_terms(cfg, method, policy, out, batch, dev, None, None)  # no reference log-probs
    assert r_dis is None
    return lm, metrics


def _compare(ours, theirs, g_ours, g_theirs):
    assert abs(float(ours) - float(theirs)) <= TOL * max(1.0, abs(float(theirs))), (float(ours), float(theirs))
    assert set(g_ours) == set(g_theirs)
    num = sum(float((g_ours[n] - g_theirs[n]).pow(2).sum()) for n in g_theirs) ** 0.5
    den = sum(float(g_theirs[n].pow(2).sum()) for n in g_theirs) ** 0.5
    assert den > 0 and num <= TOL * den, num / den


@pytest.mark.parametrize("method,loss_type,sets,attrs", [
    ("cpo", "sigmoid", ["method.beta=0.1"], dict(beta=0.1, cpo_alpha=1.0)),
    ("cpo", "sigmoid", ["method.beta=0.5", "method.sft_weight=0.3", "method.label_smoothing=0.1"], dict(beta=0.5, cpo_alpha=0.3, label_smoothing=0.1)),
    ("simpo", "simpo", [], dict(beta=2.0, cpo_alpha=0.0, simpo_gamma=1.0)),
    ("simpo", "simpo", ["method.sft_weight=1.0", "method.gamma=0.5"], dict(beta=2.0, cpo_alpha=1.0, simpo_gamma=0.5)),  # CPO-SimPO
])
def test_cpo_and_simpo_equal_trl_cpo_trainer(models, rows, method, loss_type, sets, attrs):  # noqa: F811
    from trl.experimental.cpo import CPOTrainer

    tok, policy, _ = models
    exs = _examples(tok, rows)
    lm, metrics = _deft(method, sets, tok, policy, exs)
    g_ours = backward_grads(lm, policy)
    stub = _stub(CPOTrainer, ("concatenated_forward", "cpo_loss", "get_batch_loss_metrics"), loss_type=loss_type,
                 pad_token_id=tok.pad_token_id, **attrs)
    loss, trl_metrics = stub.get_batch_loss_metrics(policy, _trl_batch(exs, tok.pad_token_id))
    _compare(lm, loss, g_ours, backward_grads(loss, policy))
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[k] == pytest.approx(trl_metrics[k], rel=1e-9, abs=1e-12), k
    assert metrics["rewards/accuracy"] == pytest.approx(trl_metrics["rewards/accuracies"], rel=1e-6)  # TRL: a float32 mean
    if attrs["cpo_alpha"]:
        assert metrics["sft_term"] == pytest.approx(attrs["cpo_alpha"] * trl_metrics["nll_loss"], rel=1e-9)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_odds_ratio_term_equals_trl_orpo_trainer(models, rows, beta):  # noqa: F811
    from trl.experimental.orpo import ORPOTrainer

    tok, policy, _ = models
    exs = _examples(tok, rows)
    stub = _stub(ORPOTrainer, ("concatenated_forward", "odds_ratio_loss"), beta=beta, padding_value=tok.pad_token_id)
    # the odds-ratio term alone (sft_weight 0): TRL's loss = nll - losses.mean()
    lm, metrics = _deft("orpo", [f"method.beta={beta}", "method.sft_weight=0"], tok, policy, exs)
    g_ours = backward_grads(lm, policy)
    pc, pr, _, _, trl_nll = stub.concatenated_forward(policy, _trl_batch(exs, tok.pad_token_id))
    losses, cr, rr, mean_ratio, mean_log_odds = stub.odds_ratio_loss(pc, pr)
    or_term = -losses.mean()
    # TRL casts the average log-probs to float32 inside odds_ratio_loss, so this part agrees to float32's precision
    assert abs(float(lm) - float(or_term)) <= 1e-6 * max(1.0, abs(float(or_term)))
    g_theirs = backward_grads(or_term, policy)
    num = sum(float((g_ours[n] - g_theirs[n]).pow(2).sum()) for n in g_theirs) ** 0.5
    den = sum(float(g_theirs[n].pow(2).sum()) for n in g_theirs) ** 0.5
    assert den > 0 and num <= 1e-5 * den, num / den
    assert metrics["log_odds_ratio"] == pytest.approx(float(mean_ratio), rel=1e-5)
    assert metrics["log_odds_chosen"] == pytest.approx(float(mean_log_odds), rel=1e-5, abs=1e-6)
    # the NLL: deft's covers the preferred responses' tokens (the paper's L_SFT), TRL's the prompt's as well
    _, m1 = _deft("orpo", [f"method.beta={beta}"], tok, policy, exs)
    b = _trl_batch(exs, tok.pad_token_id)
    with torch.no_grad():
        logits = policy(input_ids=b["chosen_input_ids"], attention_mask=b["chosen_attention_mask"]).logits[:, :-1]
    full = b["chosen_input_ids"].masked_fill(b["chosen_attention_mask"] == 0, -100)[:, 1:]
    resp = b["chosen_labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy
    nll_full, nll_resp = (float(ce(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), ignore_index=-100)) for t in (full, resp))
    assert float(trl_nll) == pytest.approx(nll_full, rel=1e-10) and m1["sft_term"] == pytest.approx(nll_resp, rel=1e-10)
    assert abs(nll_full - nll_resp) > 1e-4
