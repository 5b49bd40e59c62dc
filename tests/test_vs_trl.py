"""deft's DPO and IPO losses and gradients against TRL's DPOTrainer (its own
compute_loss, not a re-implementation of its formula) on the same real PRO HH
pairs, the same ids and the same model: equal to 1e-5. The policy is moved
away from the reference first, so that the loss is not the trivial log 2."""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import pytest

from conftest import SMALLER_LLAMA, shared_file, tiny_llama

torch = pytest.importorskip("torch")
pytest.importorskip("trl")


@pytest.fixture(scope="module")
def pairs():
    from deft.data import load

    lines = gzip.open(shared_file("data/pro-hh/test_harmless_base.jsonl.gz"), "rt", encoding="utf-8").read().splitlines()[:40]
    path = Path(tempfile.mkdtemp()) / "hh.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = []
    for r in load(path).frame.iter_rows(named=True):
        if sum(len(t["content"]) for t in r["context"]) < 600 and max(len(x) for x in r["responses"]) < 400:
            out.append({"prompt": [dict(t) for t in r["context"]], "chosen": [{"role": "assistant", "content": r["responses"][0]}],
                        "rejected": [{"role": "assistant", "content": r["responses"][-1]}]})
    assert len(out) >= 4
    return out[:4]


def _trl(tmp_path: Path, pairs, loss_type: str, beta: float):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(str(shared_file("tokenizers/smollm2")))
    tiny_llama(tok, **SMALLER_LLAMA).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], max_length=None, per_device_train_batch_size=len(pairs),
                     use_cpu=True, precompute_ref_log_probs=False, beta=beta, loss_type=[loss_type])
    trainer = DPOTrainer(model=str(tmp_path / "tiny"), args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok)
    with torch.no_grad():  # policy != reference: the loss and its gradient are not those of the initial point
        g = torch.Generator().manual_seed(0)
        for p in trainer.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return trainer


def _deft_batch(inputs):
    """TRL's batch (chosen rows, then rejected rows) as deft's examples: the same ids."""
    import numpy as np

    from deft.train import Example

    ids, att, comp = inputs["input_ids"], inputs["attention_mask"].bool(), inputs["completion_mask"].bool()
    B = ids.shape[0] // 2
    exs = []
    for i in range(B):
        seqs, plen = [], None
        for r in (i, B + i):
            row = ids[r][att[r]].numpy().astype(np.int64)
            p = int((att[r] & ~comp[r]).sum())
            assert plen in (None, p)
            plen = p
            seqs.append(row)
        exs.append(Example(str(i), seqs, plen, [1.0, 0.0]))
    return exs


@pytest.mark.parametrize("loss_type,method", [("sigmoid", "dpo"), ("ipo", "ipo")])
def test_loss_and_gradients_equal_trl(tmp_path, pairs, loss_type, method):
    from deft.train import _forward, _seq_logps, collate, loss_terms, to_slots

    beta = 0.1
    trainer = _trl(tmp_path, pairs, loss_type, beta)
    model, ref_model = trainer.model, trainer.ref_model
    model.train()
    inputs = next(iter(trainer.get_train_dataloader()))
    params = [p for p in model.parameters() if p.requires_grad]

    model.zero_grad()
    trl_loss = trainer.compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in params]

    batch = collate(_deft_batch(inputs), pad_id=int(trainer.processing_class.pad_token_id))
    cpu = torch.device("cpu")
    with torch.no_grad():
        ref = to_slots(_seq_logps(_forward(ref_model, batch, cpu, None, False), batch, cpu)[0], batch)
    cfg = {"method": {"name": method, "beta": beta, "label_smoothing": 0.0, "sft_weight": 0.0}, "deft": {"responses": "all"}}
    model.zero_grad()
    lm, r_dis, _ = loss_terms(cfg, method, model, _forward(model, batch, cpu, None, False), batch, cpu, None, ref)
    assert r_dis is None
    lm.backward()
    grads = [p.grad.clone() for p in params]

    assert abs(float(trl_loss) - 0.6931) > 1e-3  # a real loss, not the initial log 2
    assert float(lm) == pytest.approx(float(trl_loss), rel=1e-5, abs=1e-6)
    num = torch.sqrt(sum(((a - b).double() ** 2).sum() for a, b in zip(grads, trl_grads)))
    den = torch.sqrt(sum((b.double() ** 2).sum() for b in trl_grads))
    assert float(den) > 0 and float(num / den) <= 1e-5, float(num / den)
