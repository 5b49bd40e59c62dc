"""deft's DPO and IPO losses and their gradients against TRL's DPOTrainer (TRL's own code:
``DPOTrainer.compute_loss`` on a batch from its own tokenisation and collator), on the same tiny
Llama in float64 and the same real PRO HH pairs; with the policy moved away from the reference so
the loss depends on beta. TRL's log-probs come from its chunked kernel (``fused_lm_head``), which
accumulates in float32 even for a float64 model, so the agreement is float32's: loss to 1e-5, the
gradient over all parameters to a relative L2 of 1e-5 (each parameter tensor to 1e-4). Skipped
without TRL (CI installs it: the ``test`` extra)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from conftest import backward_grads, float64_policy_and_reference, pro_hh_pairs, shared_file, trl_pairs

pytest.importorskip("trl")
pytest.importorskip("transformers")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


@pytest.fixture(scope="module")
def rows():
    """Six short real PRO HH rows (harmless base): context, best and worst response."""
    return pro_hh_pairs(6)


@pytest.fixture(scope="module")
def models():
    """A tiny float64 Llama with SmolLM2's vocabulary: the reference, and the policy moved away from it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(shared_file("tokenizers/smollm2")))
    policy, ref = float64_policy_and_reference(tok)
    return tok, policy, ref


def _trl_loss_and_grads(loss_type: str, beta: float, tok, policy, ref, rows, tmp_path):
    """TRL's loss on all rows as one batch, its gradients, and the ids it trained on."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    data = trl_pairs(rows)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
                     max_length=None, beta=beta, loss_type=[loss_type], per_device_train_batch_size=len(rows), dataset_num_proc=None,
                     disable_tqdm=True)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(data), processing_class=tok)
    feats = [trainer.train_dataset[i] for i in range(len(rows))]
    ids = [(list(f["prompt_ids"]), list(f["chosen_ids"]), list(f["rejected_ids"])) for f in feats]
    inputs = trainer.data_collator([{k: f[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for f in feats])
    loss = trainer.compute_loss(trainer.model.train(), inputs)
    return float(loss.detach()), backward_grads(loss, trainer.model), ids


def _deft_loss_and_grads(method: str, beta: float, tok, policy, ref, rows):
    """deft's trainer path: encode_examples, collate, _forward, _seq_logps (the reference's too), loss_terms."""
    from deft.config import load_config
    from deft.distribution import resolve_tokenizer
    from deft.render import policy_layout, render_prompt, resolve_template
    from deft.train import _forward, _seq_logps, collate, encode_examples, loss_terms, to_slots

    native = resolve_tokenizer(str(shared_file("tokenizers/smollm2"))).native
    template = "chat"
    assert resolve_template("auto", tok) == template
    lay = policy_layout(template, tok)
    prompts = [render_prompt(r["context"], template, tok) for r in rows]
    exs = encode_examples([str(i) for i in range(len(rows))], prompts, [[r["best"], r["worst"]] for r in rows], [[1.0, 0.0]] * len(rows),
                          native, eos_token_id=int(tok.eos_token_id), response_prefix=lay.prefix, max_length=4096, max_prompt_length=2048,
                          lead_ids=lay.lead_ids, response_suffix=lay.suffix, append_eos=lay.append_eos)
    ids = [(e.input_ids[0][:e.prompt_len].tolist(), e.input_ids[0][e.prompt_len:].tolist(), e.input_ids[1][e.prompt_len:].tolist())
           for e in exs]
    cfg = load_config(str(ROOT / "configs" / f"{method}.yaml"), ["model=x", f"method.beta={beta}"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = collate(exs, pad)
    dev = torch.device("cpu")
    with torch.no_grad():
        r_out = _forward(ref, batch, dev, None, need_hidden=False)
        ref_logp = to_slots(_seq_logps(r_out, batch, dev, ref)[0], batch)
    out = _forward(policy.train(), batch, dev, None, need_hidden=False)
    lm, r_dis, _ = loss_terms(cfg, method, policy, out, batch, dev, None, ref_logp)
    assert r_dis is None
    return float(lm.detach()), backward_grads(lm, policy), ids


@pytest.mark.parametrize("method,trl_loss,beta", [("dpo", "sigmoid", 0.1), ("dpo", "sigmoid", 0.5), ("ipo", "ipo", 0.1)])
def test_loss_and_gradients_equal_trl(models, rows, tmp_path, method, trl_loss, beta):
    tok, policy, ref = models
    ours, g_ours, ids_ours = _deft_loss_and_grads(method, beta, tok, policy, ref, rows)
    theirs, g_theirs, ids_theirs = _trl_loss_and_grads(trl_loss, beta, tok, copy.deepcopy(policy), ref, rows, tmp_path)
    assert ids_ours == ids_theirs  # the same tokens, so the same log-probs
    assert abs(ours - theirs) <= TOL * max(1.0, abs(theirs)), (ours, theirs)
    assert set(g_ours) == set(g_theirs) and len(g_ours) == len(list(policy.parameters()))
    num = sum(float((g_ours[n] - g_theirs[n]).pow(2).sum()) for n in g_theirs) ** 0.5
    den = sum(float(g_theirs[n].pow(2).sum()) for n in g_theirs) ** 0.5
    assert den > 0 and num <= TOL * den, (num / den)
    for n in g_theirs:  # every parameter tensor on its own, also those with small gradients (float32 rounding: 10x looser)
        assert float((g_ours[n] - g_theirs[n]).norm()) <= 10 * TOL * float(g_theirs[n].norm()) + 1e-12, n
    # the batch's loss is far from its beta-independent value at policy == reference (log 2 for DPO)
    if method == "dpo":
        assert abs(theirs - 0.6931471805599453) > 1e-3


def test_loss_differs_when_beta_differs(models, rows, tmp_path):
    """The comparison can fail: deft at beta 0.1 is not TRL at beta 0.11."""
    tok, policy, ref = models
    ours, g_ours, _ = _deft_loss_and_grads("dpo", 0.1, tok, policy, ref, rows)
    theirs, g_theirs, _ = _trl_loss_and_grads("sigmoid", 0.11, tok, copy.deepcopy(policy), ref, rows, tmp_path)
    assert abs(ours - theirs) > 100 * TOL
    num = sum(float((g_ours[n] - g_theirs[n]).pow(2).sum()) for n in g_theirs) ** 0.5
    den = sum(float(g_theirs[n].pow(2).sum()) for n in g_theirs) ** 0.5
    assert num > 100 * TOL * den
