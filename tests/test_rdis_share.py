"""The SFT term of the pairwise losses, the R_dis gradient share, and omega
calibrated to a share (python/deft/train.py: loss_terms, grad_terms,
share_metrics, _calibrate_omega), on a tiny random Llama with the real SmolLM2
tokenizer and graded PRO-HH rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_train_assets, train_overrides

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_train_assets(tmp_path_factory.mktemp("share_assets"))


def overrides(assets, out: Path, **extra):
    return train_overrides(assets, out, **extra)


def rows_of(out: Path):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def _setup(assets, **extra):
    """(cfg, prepared data, model, q_diff, reference log-probs of every example) as the trainer builds them."""
    from deft.config import load_config
    from deft.train import _load_model, collate, prepare_data

    cfg = load_config(None, overrides(assets, Path("unused"), **extra))
    prep = prepare_data(cfg)
    model = _load_model(cfg)
    model.train()
    q = torch.from_numpy(prep.q_diff)
    with torch.no_grad():
        batch = collate(prep.examples, prep.pad_token_id)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        from deft.losses import response_logprobs
        from deft.train import to_slots

        logp, _ = response_logprobs(out.logits, batch["labels"])
        ref = to_slots(logp, batch)
    return cfg, prep, model, q, ref


def _terms(cfg, prep, model, q, ref, idx):
    from deft.train import _forward, collate, loss_terms

    batch = collate([prep.examples[i] for i in idx], prep.pad_token_id)
    out = _forward(model, batch, torch.device("cpu"), None, need_hidden=True)
    return batch, out, loss_terms(cfg, cfg["method"]["name"], model, out, batch, torch.device("cpu"), q, ref[list(idx)] * 1.0)


# --------------------------------------------------------------------------- 1. the SFT term of DPO/IPO


@pytest.mark.parametrize("method", ["dpo", "ipo"])
def test_pairwise_sft_term_is_weight_times_length_normalised_nll(assets, method):
    """L_m with sft_weight w = the pairwise loss + w * mean_b(-log p(y_w) / |y_w|), the NLL
    computed here by hand from the logits (log_softmax, gather at the labels)."""
    w = 0.05
    cfg, prep, model, q, ref = _setup(assets, **{"method.name": method, "method.sft_weight": w})
    cfg0 = json.loads(json.dumps(cfg))
    cfg0["method"]["sft_weight"] = 0.0
    idx = [0, 3, 5]
    torch.manual_seed(0)
    with torch.no_grad():
        # move the policy away from the reference so that the pairwise loss is not at its start value
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        batch, out, (lm, _, mets) = _terms(cfg, prep, model, q, ref, idx)
        _, _, (lm0, _, mets0) = _terms(cfg0, prep, model, q, ref, idx)
    lp = torch.log_softmax(out.logits.double(), -1)
    nll = []
    for i in range(len(idx)):
        seq = int(((batch["row"] == i) & (batch["col"] == 0)).nonzero()[0])  # the preferred response's sequence
        lab = batch["labels"][seq]
        pos = (lab[1:] != -100).nonzero().flatten()
        tok = lp[seq, pos, lab[1:][pos]]
        nll.append(float(-tok.sum() / len(pos)))
    expected_sft = w * float(np.mean(nll))
    assert mets["sft_term"] == pytest.approx(expected_sft, rel=1e-5)
    assert float(lm) == pytest.approx(float(lm0) + expected_sft, rel=1e-5)
    assert mets["pair_loss"] == pytest.approx(float(lm0), rel=1e-6)
    assert "sft_term" not in mets0 and "pair_loss" not in mets0  # weight 0: no term, no metric


@pytest.mark.parametrize("w", [0.0, 0.05, 1.0])
def test_pairwise_sft_term_on_hand_made_logprobs(monkeypatch, w):
    """Two pairs with made-up summed log-probs and lengths: the SFT term is w x the mean over
    pairs of -logp(chosen) / n(chosen), added to the DPO loss; at w = 0 L_m is the DPO loss itself."""
    import torch.nn.functional as F

    import deft.train as tm

    logp = torch.tensor([-10.0, -20.0, -6.0, -9.0], dtype=torch.float64)  # (chosen, rejected) of pair 0, then pair 1
    ntok = torch.tensor([5, 4, 3, 3])
    monkeypatch.setattr(tm, "_seq_logps", lambda out, batch, device, module=None: (logp, ntok))
    batch = {"row": torch.tensor([0, 0, 1, 1]), "col": torch.tensor([0, 1, 0, 1]), "valid": torch.ones(2, 2, dtype=torch.bool),
             "rewards": torch.zeros(2, 2)}
    ref = torch.tensor([[-11.0, -19.0], [-6.5, -8.0]], dtype=torch.float64)
    cfg = {"method": {"name": "dpo", "beta": 0.1, "label_smoothing": 0.0, "sft_weight": w}, "deft": {}}
    lm, r_dis, mets = tm.loss_terms(cfg, "dpo", None, None, batch, torch.device("cpu"), None, ref)
    h = torch.tensor([(-10 + 11) - (-20 + 19), (-6 + 6.5) - (-9 + 8)], dtype=torch.float64)
    dpo = float((-F.logsigmoid(0.1 * h)).mean())
    sft = w * (10 / 5 + 6 / 3) / 2
    assert r_dis is None
    assert float(lm) == pytest.approx(dpo + sft, rel=1e-12)
    if w == 0.0:
        assert float(lm) == dpo and "sft_term" not in mets
    else:
        assert mets["sft_term"] == pytest.approx(sft, rel=1e-12) and mets["pair_loss"] == pytest.approx(dpo, rel=1e-12)


def test_sft_weight_defaults_by_method():
    from deft.config import load_config, sft_weight

    def cfg(*o):
        return load_config(None, ["model=m", "data.graded=g", "deft.enabled=false", *o])["method"]

    assert cfg()["sft_weight"] is None
    assert sft_weight(cfg()) == 0.0  # dpo: today's DPO exactly
    assert sft_weight(cfg("method.name=ipo")) == 0.0
    assert sft_weight(cfg("method.name=pro")) == 0.05 and sft_weight(cfg("method.name=rrhf")) == 0.05
    assert sft_weight(cfg("method.name=dpo", "method.sft_weight=5e-2")) == 0.05
    from deft.config import ConfigError

    with pytest.raises(ConfigError, match="method.sft_weight: must be >= 0"):
        cfg("method.sft_weight=-1")


def test_plain_dpo_default_has_no_sft_term(assets, tmp_path):
    """Plain DPO (no distribution) with the default sft_weight (null) trains exactly what an explicit 0
    trains and logs no SFT term; 0.05 trains something else. The manifest records the effective weight."""
    from safetensors.torch import load_file

    from deft.train import run

    plain = {"train.max_steps": 2, "deft.enabled": False, "deft.distribution": None}
    a = run(None, overrides(assets, tmp_path / "a", **plain))
    b = run(None, overrides(assets, tmp_path / "b", **plain, **{"method.sft_weight": 0.0}))
    c = run(None, overrides(assets, tmp_path / "c", **plain, **{"method.sft_weight": 0.05}))
    wa, wb, wc = (load_file(str(x.model_dir / "model.safetensors")) for x in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["config"]["method"]["sft_weight"] == 0.0
    ra, rc = rows_of(tmp_path / "a")[0], rows_of(tmp_path / "c")[0]
    assert "sft_term" not in ra and "pair_loss" not in ra and ra["loss"] == ra["L_m"]
    assert ra["L_m"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: policy == reference, the DPO loss is log 2
    assert rc["pair_loss"] == ra["L_m"] and rc["L_m"] == pytest.approx(rc["pair_loss"] + rc["sft_term"], rel=1e-6)
    assert rc["sft_term"] > 0


# --------------------------------------------------------------------------- 2. gradient share


def test_grad_terms_equal_two_separate_backward_passes(assets):
    from deft.train import grad_terms, share_metrics

    cfg, prep, model, q, ref = _setup(assets)
    params = [p for p in model.parameters() if p.requires_grad]
    _, _, (lm, r_dis, _) = _terms(cfg, prep, model, q, ref, [1, 2])
    g = grad_terms(lm, r_dis, params)
    assert all(p.grad is None for p in params)  # nothing accumulated

    _, _, (lm, r_dis, _) = _terms(cfg, prep, model, q, ref, [1, 2])
    lm.backward(retain_graph=True)
    gm = [p.grad.detach().double().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64) for p in params]
    model.zero_grad(set_to_none=True)
    r_dis.backward()
    gr = [p.grad.detach().double().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64) for p in params]
    model.zero_grad(set_to_none=True)
    nm = math.sqrt(sum(float((x ** 2).sum()) for x in gm))
    nr = math.sqrt(sum(float((x ** 2).sum()) for x in gr))
    dot = sum(float((a * b).sum()) for a, b in zip(gm, gr))
    assert g["norm_L_m"] == pytest.approx(nm, rel=1e-6) and g["norm_R_dis"] == pytest.approx(nr, rel=1e-6)
    assert g["dot"] == pytest.approx(dot, rel=1e-5, abs=1e-9)
    m = share_metrics(g, 0.5)
    assert m["rdis_grad_share"] == pytest.approx(0.5 * nr / nm, rel=1e-6)
    # the cosine is between grad L_m and grad(-omega R_dis), the two terms the minimised loss adds
    assert m["rdis_grad_cosine"] == pytest.approx(-dot / (nm * nr), rel=1e-5, abs=1e-9)
    assert share_metrics(g, -0.5)["rdis_grad_cosine"] == pytest.approx(dot / (nm * nr), rel=1e-5, abs=1e-9)
    assert share_metrics(g, 0.0)["rdis_grad_share"] == 0.0


def test_share_logged_at_step_0_and_every_n_steps_with_a_warning(assets, tmp_path, capfd):
    from deft.train import run

    out = tmp_path / "paper"
    run(None, overrides(assets, out, **{"train.max_steps": 5, "deft.omega": 2.5e-6, "deft.diagnose_every": 2}))
    rows = rows_of(out)
    measured = [r["step"] for r in rows if "rdis_grad_share" in r]
    assert measured == [1, 3, 5]  # before the updates of steps 0, 2 and 4
    r = rows[0]
    assert r["rdis_grad_share"] == pytest.approx(2.5e-6 * r["grad_norm_R_dis"] / r["grad_norm_L_m"], rel=1e-9)
    assert r["rdis_grad_share"] < 1e-3 and -1 <= r["rdis_grad_cosine"] <= 1
    err = capfd.readouterr().err
    assert "warning: at step 0 the R_dis gradient is" in err and "cannot change the model at this omega" in err
    man = json.loads((out / "manifest.json").read_text())
    diag = man["diagnostics"]
    assert diag["measured_steps"] == [0, 2, 4]
    assert diag["rdis_grad_share"]["step_0"] == r["rdis_grad_share"]
    assert diag["rdis_grad_share"]["last"] == rows[4]["rdis_grad_share"]
    assert man["omega"] == {"value": 2.5e-6, "source": "deft.omega"}

    out1 = tmp_path / "large"
    run(None, overrides(assets, out1, **{"train.max_steps": 1, "deft.omega": 50.0, "deft.diagnose_every": 0}))
    assert "warning: at step 0" not in capfd.readouterr().err
    # no distribution, nothing to measure
    out2 = tmp_path / "off"
    run(None, overrides(assets, out2, **{"train.max_steps": 1, "deft.enabled": False, "deft.distribution": None}))
    assert "rdis_grad_share" not in rows_of(out2)[0]
    assert json.loads((out2 / "manifest.json").read_text())["diagnostics"] is None


@pytest.fixture(scope="module")
def dropout_model(assets, tmp_path_factory):
    """The tiny Llama with attention dropout 0.1: training draws random numbers every forward pass."""
    import shutil

    folder = tmp_path_factory.mktemp("dropout") / "tiny-llama-dropout"
    shutil.copytree(assets["model"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["attention_dropout"] = 0.1
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("extra", [{}, {"deft.omega_share": 0.2}])
def test_diagnostics_do_not_change_training(assets, dropout_model, tmp_path, monkeypatch, extra):
    """The measuring passes (and the calibration's) leave gradients, RNG and weights alone: with dropout
    on, the same run with the measurement replaced by a constant ends with bit-identical weights."""
    from safetensors.torch import load_file

    import deft.train as tm

    ov = {"model": str(dropout_model), "train.max_steps": 3, **extra}
    a = tm.run(None, overrides(assets, tmp_path / "a", **ov))
    calls = []

    def fake(*a, **k):
        calls.append(1)
        return {"norm_L_m": 1.0, "norm_R_dis": 1.0, "dot": 0.0}

    monkeypatch.setattr(tm, "_diagnose", fake)
    if extra:  # the calibration keeps the omega of run a, so that only the measurement differs
        omega = json.loads((tmp_path / "a" / "manifest.json").read_text())["omega"]
        monkeypatch.setattr(tm, "_calibrate_omega", lambda *a, **k: dict(omega))
    b = tm.run(None, overrides(assets, tmp_path / "b", **ov))
    wa, wb = load_file(str(a.model_dir / "model.safetensors")), load_file(str(b.model_dir / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert calls and rows_of(tmp_path / "b")[0]["rdis_grad_share"] == pytest.approx(json.loads(
        (tmp_path / "b" / "manifest.json").read_text())["config"]["deft"]["omega"])
    # and dropout is really on (the same run without it ends elsewhere), so the masks drawn after each
    # measurement are the ones an unmeasured run draws
    c = tm.run(None, overrides(assets, tmp_path / "c", **{**ov, "model": str(assets["model"])}))
    wc = load_file(str(c.model_dir / "model.safetensors"))
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


# --------------------------------------------------------------------------- omega_share


def test_omega_share_gives_the_requested_share_on_a_fresh_measurement(assets, tmp_path):
    from deft.train import grad_terms, run

    target = 0.3
    out = tmp_path / "cal"
    # calibrated on all 8 micro-batches of the epoch: the ratio ||grad R_dis|| / ||grad L_m|| varies by about
    # +-25% between micro-batches of this data (0.016-0.026), so a median of 3 predicts 4 others only to ~25%
    run(None, overrides(assets, out, **{"train.max_steps": 1, "deft.omega_share": target, "deft.calibration_batches": 8}))
    man = json.loads((out / "manifest.json").read_text())
    om = man["omega"]
    assert om["source"] == "calibrated" and om["omega_share"] == target and len(om["ratios"]) == 8
    assert om["value"] == pytest.approx(target / float(np.median(om["ratios"])), rel=1e-12)
    assert man["config"]["deft"]["omega"] == om["value"]
    # measured afresh, outside the trainer, on other micro-batches of the initial model
    cfg, prep, model, q, ref = _setup(assets)
    params = [p for p in model.parameters() if p.requires_grad]
    shares = []
    for idx in ([8, 9], [10, 11], [12, 13], [14, 15]):
        _, _, (lm, r_dis, _) = _terms(cfg, prep, model, q, ref, idx)
        g = grad_terms(lm, r_dis, params)
        shares.append(om["value"] * g["norm_R_dis"] / g["norm_L_m"])
    assert float(np.median(shares)) == pytest.approx(target, rel=0.2)
    assert rows_of(out)[0]["rdis_grad_share"] == pytest.approx(target, rel=0.2)


def test_omega_share_is_reused_on_resume(assets, tmp_path, monkeypatch):
    import deft.train as tm

    out = tmp_path / "run"
    ov = overrides(assets, out, **{"train.max_steps": 3, "train.save_steps": 1, "deft.omega_share": 0.2})
    real_save = tm._save_checkpoint

    def crash_after_step_2(*a, **k):
        path = real_save(*a, **k)
        if a[2].global_step == 2:  # (job, engine, state)
            raise KeyboardInterrupt("killed")
        return path

    monkeypatch.setattr(tm, "_save_checkpoint", crash_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        tm.run(None, ov)
    first = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())["omega"]
    assert first["source"] == "calibrated"
    monkeypatch.setattr(tm, "_save_checkpoint", real_save)

    def no_calibration(*a, **k):
        raise AssertionError("calibrated again on resume")

    monkeypatch.setattr(tm, "_calibrate_omega", no_calibration)
    tm.run(None, ov, resume=True)
    man = json.loads((out / "manifest.json").read_text())
    assert man["omega"]["value"] == first["value"] and man["omega"]["source"] == "checkpoint"
    assert man["config"]["deft"]["omega"] == first["value"]


def test_omega_zero_and_checkpointing(assets, tmp_path, capfd):
    """omega 0 with a distribution (the -R_dis ablation) measures nothing and warns of nothing; gradient
    checkpointing (non-reentrant) works with the measurement and the calibration."""
    from deft.train import run

    run(None, overrides(assets, tmp_path / "zero", **{"train.max_steps": 1, "deft.omega": 0.0}))
    assert "rdis_grad_share" not in rows_of(tmp_path / "zero")[0] and "warning: at step 0" not in capfd.readouterr().err
    run(None, overrides(assets, tmp_path / "ckpt", **{"train.max_steps": 1, "train.gradient_checkpointing": True,
                                                      "deft.omega_share": 0.2, "deft.calibration_batches": 2}))
    r = rows_of(tmp_path / "ckpt")[0]
    assert r["rdis_grad_share"] == pytest.approx(0.2, rel=0.5)


def test_resume_with_another_omega_setting_is_refused(assets, tmp_path, monkeypatch):
    import deft.train as tm

    out = tmp_path / "run"
    real_save = tm._save_checkpoint

    def crash(*a, **k):
        real_save(*a, **k)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(tm, "_save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        tm.run(None, overrides(assets, out, **{"train.max_steps": 3, "train.save_steps": 1, "deft.omega_share": 0.2}))
    monkeypatch.setattr(tm, "_save_checkpoint", real_save)
    with pytest.raises(ValueError, match="cannot resume with deft.omega_share 0.5: the checkpoint at step 1 was trained with omega_share 0.2"):
        tm.run(None, overrides(assets, out, **{"train.max_steps": 3, "train.save_steps": 1, "deft.omega_share": 0.5}), resume=True)


def test_omega_share_config_checks():
    from deft.config import ConfigError, load_config

    base = ["model=m", "data.graded=g", "deft.distribution=d"]
    with pytest.raises(ConfigError, match="deft.omega_share: must be positive"):
        load_config(None, base + ["deft.omega_share=0"])
    with pytest.raises(ConfigError, match="deft.calibration_batches"):
        load_config(None, base + ["deft.calibration_batches=0"])
    with pytest.raises(ConfigError, match="deft.diagnose_every"):
        load_config(None, base + ["deft.diagnose_every=-1"])
