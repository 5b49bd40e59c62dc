"""deft's KTO against TRL 1.16's ``KTOTrainer`` end to end (TRL has no standalone KTO loss function):
TRL's own tokenisation, unpairing, KL completions, collator and ``compute_loss`` on the six real PRO
HH pairs and the tiny float64 Llama of tests/test_vs_trl.py, against deft's trainer path (encode,
:func:`deft.train.kto_kl_examples`, collate, forward, :func:`deft.losses.kto_reference_point`,
``loss_terms``). With the whole set as one batch, TRL's rotation of completions within the batch
pairs each prompt with the completions of the previous pair, as deft does, so both estimate the
reference point from the same mismatched pairs (positive here: the reference is the perturbed model). Agreement to float32's 1e-5 (TRL's log-probs come
from its float32 kernel), loss and gradient."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from conftest import backward_grads, shared_file
from test_vs_trl import TOL, models, rows  # noqa: F401 - fixtures

pytest.importorskip("trl")
pytest.importorskip("transformers")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _trl_kto(beta, tok, policy, ref, rows, tmp_path, undesirable_weight=1.0):  # noqa: F811
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    data = [{"prompt": r["context"], "chosen": [{"role": "assistant", "content": r["best"]}],
             "rejected": [{"role": "assistant", "content": r["worst"]}]} for r in rows]
    n = len(rows)
    args = KTOConfig(output_dir=str(tmp_path / "trl-kto"), report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
                     max_length=None, beta=beta, per_device_train_batch_size=2 * n, dataset_num_proc=None, disable_tqdm=True,
                     undesirable_weight=undesirable_weight)
    trainer = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(data), processing_class=tok)
    feats = [trainer.train_dataset[i] for i in range(2 * n)]
    assert [f["label"] for f in feats] == [True] * n + [False] * n  # chosen rows first, then rejected (unpair_preference_dataset)
    ids = [(list(feats[i]["prompt_ids"]), list(feats[i]["completion_ids"]), list(feats[n + i]["completion_ids"])) for i in range(n)]
    kl_ids = sorted((tuple(f["prompt_ids"]), tuple(f["KL_completion_ids"])) for f in feats)
    inputs = trainer.data_collator([{k: f[k] for k in ("prompt_ids", "completion_ids", "KL_completion_ids", "label")} for f in feats])
    loss = trainer.compute_loss(trainer.model.train(), inputs)
    return float(loss.detach()), backward_grads(loss, trainer.model), ids, kl_ids, trainer._metrics["train"]["kl"][-1]


def _deft_kto(beta, tok, policy, ref, rows, undesirable_weight=1.0):  # noqa: F811
    from deft.config import load_config
    from deft.distribution import resolve_tokenizer
    from deft.losses import kto_reference_point
    from deft.render import policy_layout, render_prompt
    from deft.train import _forward, _seq_logps, collate, encode_examples, kto_kl_examples, loss_terms, to_slots

    native = resolve_tokenizer(str(shared_file("tokenizers/smollm2"))).native
    lay = policy_layout("chat", tok)
    prompts = [render_prompt(r["context"], "chat", tok) for r in rows]
    exs = encode_examples([str(i) for i in range(len(rows))], prompts, [[r["best"], r["worst"]] for r in rows], [[1.0, 0.0]] * len(rows),
                          native, eos_token_id=int(tok.eos_token_id), response_prefix=lay.prefix, max_length=4096, max_prompt_length=2048,
                          lead_ids=lay.lead_ids, response_suffix=lay.suffix, append_eos=lay.append_eos)
    ids = [(e.input_ids[0][:e.prompt_len].tolist(), e.input_ids[0][e.prompt_len:].tolist(), e.input_ids[1][e.prompt_len:].tolist())
           for e in exs]
    kl_exs = kto_kl_examples(exs, 4096)
    kl_ids = sorted((tuple(s[:e.prompt_len].tolist()), tuple(s[e.prompt_len:].tolist())) for e in kl_exs for s in e.input_ids)
    cfg = load_config(str(ROOT / "configs" / "kto.yaml"), ["model=x", f"method.beta={beta}", f"method.undesirable_weight={undesirable_weight}"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch, kl_batch = collate(exs, pad), collate(kl_exs, pad)
    dev = torch.device("cpu")

    def logps(model, b):
        return to_slots(_seq_logps(_forward(model, b, dev, None, need_hidden=False), b, dev, model)[0], b)

    with torch.no_grad():
        ref_logp, ref_kl = logps(ref, batch), logps(ref, kl_batch)
        policy.train()
        pol_kl = logps(policy, kl_batch)
    batch["kto_kl"] = kto_reference_point(pol_kl, ref_kl)
    out = _forward(policy, batch, dev, None, need_hidden=False)
    lm, r_dis, metrics = loss_terms(cfg, "kto", policy, out, batch, dev, None, ref_logp)
    assert r_dis is None
    return float(lm.detach()), backward_grads(lm, policy), ids, kl_ids, metrics["kl"]


@pytest.mark.parametrize("beta,uw", [(0.1, 1.0), (0.5, 1.33)])
def test_kto_loss_and_gradients_equal_trl(models, rows, tmp_path, beta, uw):  # noqa: F811
    tok, moved, base = models
    # the policy is the base model, the reference the perturbed one (whose log-probs are lower): the reference
    # point mean(log pi - log pi_ref) over the mismatched pairs is then positive, and the clamp does not hide it
    policy, ref = copy.deepcopy(base), moved
    ours, g_ours, ids_ours, kl_ours, kl_val = _deft_kto(beta, tok, policy, ref, rows, uw)
    theirs, g_theirs, ids_theirs, kl_theirs, kl_trl = _trl_kto(beta, tok, copy.deepcopy(policy), ref, rows, tmp_path, uw)
    assert ids_ours == ids_theirs  # the same tokens
    assert kl_ours == kl_theirs  # the same mismatched (prompt, completion) pairs
    assert kl_val > 0.1 and abs(kl_val - kl_trl) <= TOL * max(1.0, abs(kl_trl)), (kl_val, kl_trl)  # a reference point that matters
    assert abs(ours - theirs) <= TOL * max(1.0, abs(theirs)), (ours, theirs)
    assert set(g_ours) == set(g_theirs) and len(g_ours) == len(list(policy.parameters()))
    num = sum(float((g_ours[n] - g_theirs[n]).pow(2).sum()) for n in g_theirs) ** 0.5
    den = sum(float(g_theirs[n].pow(2).sum()) for n in g_theirs) ** 0.5
    assert den > 0 and num <= TOL * den, (num / den)
    assert abs(theirs - 0.5) > 1e-3  # away from the value at policy == reference
