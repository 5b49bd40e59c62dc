"""``deft.integrations.trl.DeftDPOTrainer`` against TRL 1.16's own ``DPOTrainer``, on the tiny float64 Llama
and the real PRO HH pairs of ``test_vs_trl.py``, with a Q_diff built by deft from 200 real graded rows:
its loss is TRL's minus omega x R_dis (R_dis recomputed here from the logits with a materialised
log-softmax) to 1e-6, and so is its gradient; it trains, logs R_dis and the gradient share in
``log_history``; omega_share sets omega; a Q_diff of another vocabulary is refused. Skipped without TRL
(CI installs it: the ``test`` extra)."""

from __future__ import annotations

import copy
import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import backward_grads, float64_policy_and_reference, pro_hh_pairs, shared_file, trl_pairs

pytest.importorskip("trl")
pytest.importorskip("datasets")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-6


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_file("tokenizers/smollm2")))


@pytest.fixture(scope="module")
def rows():
    return pro_hh_pairs(6)


def _qdiff_file(root: Path, tokenizer: str) -> Path:
    """Q_diff of the first 200 PRO HH harmless rows (graded from their stored scores, a = 20), counted with ``tokenizer``."""
    from deft.data import load
    from deft.distribution import build_distribution, resolve_tokenizer, save_distribution
    from deft.grade import grade

    lines = gzip.open(shared_file("data/pro-hh/test_harmless_base.jsonl.gz"), "rt", encoding="utf-8").read().splitlines()[:200]
    raw = root / "rows.jsonl"
    raw.write_text("\n".join(lines) + "\n", encoding="utf-8")
    graded = grade(load(raw).frame, a=20)
    out = root / f"qdiff-{Path(tokenizer).name}.safetensors"
    save_distribution(build_distribution(graded, resolve_tokenizer(tokenizer), template="auto"), out)
    return out


@pytest.fixture(scope="module")
def qdiff(tmp_path_factory):
    return _qdiff_file(tmp_path_factory.mktemp("qdiff"), str(shared_file("tokenizers/smollm2")))


def _args(out: Path, **kw):
    from trl import DPOConfig

    base = dict(output_dir=str(out), report_to=[], use_cpu=True, bf16=False, max_length=None, beta=0.1,
                per_device_train_batch_size=3, dataset_num_proc=None, disable_tqdm=True, save_strategy="no",
                logging_steps=1, learning_rate=1e-3, seed=0)
    base.update(kw)
    return DPOConfig(**base)


def _batch(trainer, rows):
    feats = [trainer.train_dataset[i] for i in range(len(rows))]
    return trainer.data_collator([{k: f[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for f in feats])


def _loss_and_grads(trainer, inputs):
    model = trainer.model.train()
    loss = trainer.compute_loss(model, inputs)
    return float(loss.detach()), backward_grads(loss, model)


def _reference_rdis(model, inputs, q, best_only: bool):
    """R_dis with the plain formula: the model's logits, log_softmax over the vocabulary, Q_diff dot it per
    response-predicting position, mean per sequence, mean over sequences (float64). Q_diff = Q+/|Q+| - Q-/|Q-|
    sums to 0; the file's float32 values sum to ~4e-9, a rounding residue deft's op drops by definition
    (``deft.ops``: the zero-sum path), so the reference takes them re-centred to sum to 0 exactly."""
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
    logp = torch.log_softmax(out.logits.double(), dim=-1)
    q = q.double() - q.double().mean()
    per_pos = (logp * q).sum(-1)  # (N, T)
    mask = torch.zeros_like(per_pos, dtype=torch.bool)
    mask[:, :-1] = inputs["completion_mask"][:, 1:] != 0
    n = per_pos.shape[0] if not best_only else per_pos.shape[0] // 2
    return torch.stack([per_pos[i][mask[i]].mean() for i in range(n)]).mean()


def _dist_q(path):
    from deft.distribution import load_distribution

    return torch.from_numpy(load_distribution(path).q_diff.astype("float32"))


@pytest.mark.parametrize("responses", ["all", "best"])
def test_loss_and_gradient_are_trl_minus_omega_rdis(tok, rows, qdiff, tmp_path, responses):
    from datasets import Dataset
    from trl import DPOTrainer

    from deft.integrations import DeftDPOTrainer

    policy, ref = float64_policy_and_reference(tok)
    data = Dataset.from_list(trl_pairs(rows))
    omega = 20.0
    trl_tr = DPOTrainer(model=copy.deepcopy(policy), ref_model=ref, args=_args(tmp_path / "trl", per_device_train_batch_size=6),
                        train_dataset=data, processing_class=tok)
    deft_tr = DeftDPOTrainer(model=copy.deepcopy(policy), ref_model=ref, args=_args(tmp_path / "deft", per_device_train_batch_size=6),
                             train_dataset=data, processing_class=tok, qdiff=qdiff, omega=omega, rdis_responses=responses)
    inputs = _batch(trl_tr, rows)
    assert torch.equal(inputs["input_ids"], _batch(deft_tr, rows)["input_ids"])

    l_trl, g_trl = _loss_and_grads(trl_tr, inputs)
    l_deft, g_deft = _loss_and_grads(deft_tr, inputs)

    # R_dis and its gradient, independently of deft.ops and of the trainer
    model = copy.deepcopy(policy).train()
    r = _reference_rdis(model, inputs, _dist_q(qdiff), responses == "best")
    r.backward()
    r = r.item()
    g_r = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    assert abs(omega * r) > 1e-3  # the term is far above the tolerance: a missing or flipped R_dis fails
    assert abs(l_deft - (l_trl - omega * r)) <= TOL, (l_deft, l_trl, r)
    assert deft_tr._metrics["train"]["R_dis"][-1] == pytest.approx(r, abs=1e-9)
    assert deft_tr._metrics["train"]["L_m"][-1] == pytest.approx(l_trl, abs=1e-9)
    assert deft_tr._metrics["train"]["omega"][-1] == omega
    want = {n: g_trl[n] - omega * g_r[n] for n in g_trl}
    num = sum(float((g_deft[n] - want[n]).pow(2).sum()) for n in want) ** 0.5
    den = sum(float(want[n].pow(2).sum()) for n in want) ** 0.5
    assert set(g_deft) == set(want) and num <= TOL * den, num / den
    moved = sum(float((omega * g_r[n]).pow(2).sum()) for n in want) ** 0.5
    assert moved > 1e-3 * den  # the R_dis gradient is not negligible against TRL's


def test_lora_policy_hidden_states_are_the_adapters(tok, rows, qdiff, tmp_path):
    """With a LoRA adapter and no reference model, TRL's reference forward runs through the same backbone
    (adapter disabled) after the policy's: R_dis must be the adapted policy's, and its gradient reach the adapter."""
    pytest.importorskip("peft")
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOTrainer

    from deft.integrations import DeftDPOTrainer

    policy, _ = float64_policy_and_reference(tok)
    data = Dataset.from_list(trl_pairs(rows))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    omega = 20.0
    torch.manual_seed(1)
    trl_tr = DPOTrainer(model=copy.deepcopy(policy), args=_args(tmp_path / "trl", per_device_train_batch_size=6), train_dataset=data,
                        processing_class=tok, peft_config=lora)
    torch.manual_seed(1)
    deft_tr = DeftDPOTrainer(model=copy.deepcopy(policy), args=_args(tmp_path / "deft", per_device_train_batch_size=6), train_dataset=data,
                             processing_class=tok, peft_config=lora, qdiff=qdiff, omega=omega)
    inputs = _batch(trl_tr, rows)
    l_trl, g_trl = _loss_and_grads(trl_tr, inputs)
    l_deft, g_deft = _loss_and_grads(deft_tr, inputs)
    assert set(g_trl) == set(g_deft) and g_trl and all("lora_" in n for n in g_trl)

    model = deft_tr.model.train()  # the adapted policy (not a deepcopy: TRL's patched forward stays bound to the original)
    r = _reference_rdis(model, inputs, _dist_q(qdiff), False)
    g_r = backward_grads(r, model)
    assert set(g_r) == set(g_trl)
    with model.disable_adapter(), torch.no_grad():
        r_base = _reference_rdis(model, inputs, _dist_q(qdiff), False).item()
    r = r.item()
    assert abs(omega * (r - r_base)) > 1e-4  # the adapter changes R_dis: taking the reference's would fail
    assert abs(l_deft - (l_trl - omega * r)) <= TOL, (l_deft, l_trl, r, r_base)
    want = {n: g_trl[n] - omega * g_r[n] for n in g_trl}
    num = sum(float((g_deft[n] - want[n]).pow(2).sum()) for n in want) ** 0.5
    den = sum(float(want[n].pow(2).sum()) for n in want) ** 0.5
    assert num <= TOL * den, num / den


def test_trains_and_logs_rdis_and_share(tok, rows, qdiff, tmp_path):
    from datasets import Dataset

    from deft.integrations import DeftDPOTrainer

    policy, ref = float64_policy_and_reference(tok)
    before = [p.detach().clone() for p in policy.parameters()]
    tr = DeftDPOTrainer(model=policy, ref_model=ref, args=_args(tmp_path / "run", max_steps=3), train_dataset=Dataset.from_list(trl_pairs(rows)),
                        processing_class=tok, qdiff=qdiff, omega=5.0, diagnose_every=2)
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 3]
    for h in logs:
        assert math.isfinite(h["R_dis"]) and h["omega"] == 5.0 and math.isfinite(h["L_m"])
        assert h["loss"] == pytest.approx(h["L_m"] - 5.0 * h["R_dis"], rel=1e-6, abs=1e-9)
    # measured at optimizer step 0 (logged as step 1) and step 2 (logged as step 3), not in between
    assert ["rdis_grad_share" in h for h in logs] == [True, False, True]
    for h in (logs[0], logs[2]):
        assert h["rdis_grad_share"] > 0 and -1 <= h["rdis_grad_cosine"] <= 1
        assert h["rdis_grad_share"] == pytest.approx(5.0 * h["grad_norm_R_dis"] / h["grad_norm_L_m"], rel=1e-9)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_omega_share_sets_omega(tok, rows, qdiff, tmp_path):
    """Calibrated on the first micro-batch, the share measured at step 0 on that same micro-batch is the target."""
    from datasets import Dataset

    from deft.integrations import DeftDPOTrainer
    from deft.integrations.trl import OMEGA_FILE

    policy, ref = float64_policy_and_reference(tok)
    tr = DeftDPOTrainer(model=policy, ref_model=ref, args=_args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=1),
                        train_dataset=Dataset.from_list(trl_pairs(rows)), processing_class=tok, qdiff=qdiff, omega_share=0.25,
                        calibration_batches=1)
    tr.train()
    info = tr.omega_info
    assert info["source"] == "calibrated" and len(info["ratios"]) == 1
    assert tr.omega == pytest.approx(0.25 / info["ratio_median"], rel=1e-12)
    first = tr.state.log_history[0]
    assert first["omega"] == tr.omega
    assert first["rdis_grad_share"] == pytest.approx(0.25, rel=1e-6)
    rec = json.loads((tmp_path / "run" / "checkpoint-1" / OMEGA_FILE).read_text())
    assert rec["value"] == tr.omega and rec["omega_share"] == 0.25

    # a resumed run takes omega from the checkpoint (made distinctive here), not from a new calibration
    rec["value"] = 123.0
    (tmp_path / "run" / "checkpoint-1" / OMEGA_FILE).write_text(json.dumps(rec))
    policy2, ref2 = float64_policy_and_reference(tok)
    tr2 = DeftDPOTrainer(model=policy2, ref_model=ref2, args=_args(tmp_path / "run", max_steps=2, save_strategy="no"),
                         train_dataset=Dataset.from_list(trl_pairs(rows)), processing_class=tok, qdiff=qdiff, omega_share=0.25)
    tr2.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert tr2.omega == 123.0 and tr2.omega_info["source"] == "checkpoint"
    tr3 = DeftDPOTrainer(model=policy2, ref_model=ref2, args=_args(tmp_path / "run", max_steps=2, save_strategy="no"),
                         train_dataset=Dataset.from_list(trl_pairs(rows)), processing_class=tok, qdiff=qdiff, omega_share=0.5)
    with pytest.raises(ValueError, match="cannot resume with omega_share 0.5: .*records omega_share 0.25"):
        tr3.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))


def test_bad_qdiff_and_arguments_are_refused(tok, rows, qdiff, tmp_path):
    from datasets import Dataset

    from deft.integrations import DeftDPOTrainer

    policy, ref = float64_policy_and_reference(tok)
    data = Dataset.from_list(trl_pairs(rows))

    def make(**kw):
        return DeftDPOTrainer(model=policy, ref_model=ref, args=_args(tmp_path / "x"), train_dataset=data, processing_class=tok, **kw)

    gpt2 = _qdiff_file(tmp_path, str(shared_file("tokenizers/gpt2")))  # 50257 ids, SmolLM2 has 49152
    with pytest.raises(ValueError, match=r"qdiff-gpt2\.safetensors: Q_diff has 50257 entries but the model's lm_head has 49152 rows"):
        make(qdiff=gpt2, omega=1.0)
    with pytest.raises(ValueError, match="Q_diff has 50257 entries"):
        make(qdiff=torch.zeros(50257), omega=1.0)
    # same size, another vocabulary: caught by the tokenizer's vocabulary hash
    from deft.distribution import load_distribution

    other = load_distribution(qdiff)
    other.metadata["vocab_hash"] = "0" * 64
    other.metadata["tokenizer_source"] = "some/other-tokenizer"
    with pytest.raises(ValueError, match="counted with tokenizer some/other-tokenizer .* has a different vocabulary"):
        make(qdiff=other, omega=1.0)
    with pytest.raises(FileNotFoundError, match="distribution file not found"):
        make(qdiff=tmp_path / "missing.safetensors", omega=1.0)
    with pytest.raises(ValueError, match="exactly one of omega"):
        make(qdiff=qdiff, omega=1.0, omega_share=0.1)
    with pytest.raises(ValueError, match="exactly one of omega"):
        make(qdiff=qdiff)
    with pytest.raises(ValueError, match="rdis_responses must be one of"):
        make(qdiff=qdiff, omega=1.0, rdis_responses="worst")
    with pytest.raises(ValueError, match="non-finite"):
        make(qdiff=torch.full((49152,), float("nan")), omega=1.0)


def test_reentrant_checkpointing_is_refused_and_unset_becomes_non_reentrant(tok, rows, qdiff, tmp_path):
    """The gradient share needs torch.autograd.grad, which reentrant checkpointing refuses: checked in __init__."""
    from datasets import Dataset

    from deft.integrations import DeftDPOTrainer

    policy, ref = float64_policy_and_reference(tok)
    data = Dataset.from_list(trl_pairs(rows))

    def make(**kw):
        return DeftDPOTrainer(model=policy, ref_model=ref, args=_args(tmp_path / "x", **kw), train_dataset=data,
                              processing_class=tok, qdiff=qdiff, omega=1.0)

    with pytest.raises(ValueError, match="use_reentrant=True cannot give the gradient of R_dis"):
        make(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    tr = make(gradient_checkpointing=True, gradient_checkpointing_kwargs={"preserve_rng_state": True})
    assert tr.args.activation_checkpointing_kwargs == {"preserve_rng_state": True, "use_reentrant": False}
    assert tr.args.gradient_checkpointing_kwargs == tr.args.activation_checkpointing_kwargs
    tr = make(gradient_checkpointing=False, gradient_checkpointing_kwargs={"use_reentrant": True})  # no checkpointing: no matter
    assert tr.args.activation_checkpointing_kwargs == {"use_reentrant": True}


def test_calibration_runs_as_training_does_checkpointed_and_autocast(tok, rows, qdiff, tmp_path):
    """omega_share is calibrated before Trainer.train turns checkpointing on and prepares the model (its
    autocast): the calibration turns both on itself, and leaves the model as it found it."""
    from datasets import Dataset

    from deft.integrations import DeftDPOTrainer
    from deft.integrations.trl import OMEGA_FILE

    policy, ref = float64_policy_and_reference(tok)
    tr = DeftDPOTrainer(model=policy, ref_model=ref, args=_args(tmp_path / "run", bf16=True, gradient_checkpointing=True),
                        train_dataset=Dataset.from_list(trl_pairs(rows)), processing_class=tok, qdiff=qdiff, omega_share=0.25,
                        calibration_batches=1)
    seen = []
    terms = tr._terms

    def spy(model, inputs, return_outputs=False):
        seen.append((policy.is_activation_checkpointing, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return terms(model, inputs, return_outputs)

    tr._terms = spy
    assert not policy.is_activation_checkpointing
    tr._set_omega(None)
    assert seen == [(True, True, torch.bfloat16)]
    assert not policy.is_activation_checkpointing  # Trainer.train turns it on again for training
    assert tr.omega_info["source"] == "calibrated" and math.isfinite(tr.omega) and tr.omega > 0
    tr.save_model(str(tmp_path / "final"))  # every model save keeps omega
    assert json.loads((tmp_path / "final" / OMEGA_FILE).read_text())["value"] == tr.omega


def test_template_mismatch_is_warned(tok, rows, qdiff, tmp_path, caplog):
    """Q_diff counted for the chat template (SmolLM2) and plain-text TRL records: a warning naming the fix."""
    import logging

    from datasets import Dataset

    from deft.integrations import DeftDPOTrainer
    from deft.render import render_hh

    policy, ref = float64_policy_and_reference(tok)
    plain = [{"prompt": render_hh(r["context"]), "chosen": " " + r["best"], "rejected": " " + r["worst"]} for r in rows]
    for data, warned in ((plain, True), (trl_pairs(rows), False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="deft.integrations.trl"):
            DeftDPOTrainer(model=policy, ref_model=ref, args=_args(tmp_path / "x"), train_dataset=Dataset.from_list(data),
                           processing_class=tok, qdiff=qdiff, omega=1.0)
        assert ("counted with template 'chat' but the training data is plain text" in caplog.text) == warned, caplog.text
        assert ("deft distribution --template plain" in caplog.text) == warned


def test_graded_pairs(tmp_path):
    """graded.parquet -> TRL records: level A only, best response chosen and worst rejected, per template."""
    from deft.data import load
    from deft.grade import grade
    from deft.integrations.trl import graded_pairs

    lines = gzip.open(shared_file("data/pro-hh/test_harmless_base.jsonl.gz"), "rt", encoding="utf-8").read().splitlines()[:100]
    raw = tmp_path / "rows.jsonl"
    raw.write_text("\n".join(lines) + "\n", encoding="utf-8")
    graded = grade(load(raw).frame, a=20)
    path = tmp_path / "graded.parquet"
    graded.write_parquet(path)
    a = graded.filter(graded["level"] == "A")
    chat = graded_pairs(path)
    assert len(chat) == a.height == 20
    first = a.row(0, named=True)
    assert chat[0]["prompt"] == [dict(t) for t in first["context"]]
    assert chat[0]["chosen"] == [{"role": "assistant", "content": first["responses"][0]}]
    assert chat[0]["rejected"] == [{"role": "assistant", "content": first["responses"][-1]}]
    assert first["scores"][0] > first["scores"][-1]
    plain = graded_pairs(path, levels=("A", "B"), template="plain")
    ab = graded.filter(graded["level"].is_in(["A", "B"]))
    assert len(plain) == ab.height > a.height
    row = ab.row(0, named=True)
    assert plain[0]["prompt"].endswith("\n\nAssistant:") and row["context"][-1]["content"] in plain[0]["prompt"]
    assert plain[0]["chosen"] == " " + row["responses"][0] and plain[0]["rejected"] == " " + row["responses"][-1]
    with pytest.raises(ValueError, match=r"unknown level 'D'"):
        graded_pairs(path, levels=("D",))
    only_a = tmp_path / "only-a.parquet"
    a.write_parquet(only_a)
    with pytest.raises(ValueError, match=r"no pairs at levels \['C'\] \(0 samples there"):
        graded_pairs(only_a, levels=("C",))
    with pytest.raises(ValueError, match="template must be 'chat' or 'plain'"):
        graded_pairs(path, template="oasst")


def test_import_without_trl_names_the_extra():
    """``deft.integrations`` imports without TRL; the trainer then says what to install."""
    code = (
        "import sys; sys.modules['trl'] = None\n"
        "import deft.integrations\n"
        "assert 'trl' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n"
        "    from deft.integrations import DeftDPOTrainer\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "IMPORTERROR" in out.stdout and 'pip install "deft[trl]"' in out.stdout
