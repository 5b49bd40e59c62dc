"""A train-step oracle (issue 11, item 2): step 1 of metrics.jsonl (L_m, R_dis,
sft_term, loss) for every method with DEFT on, recomputed from the graded file,
the initial weights and Q_diff by an independent forward pass (one unpadded
sequence at a time, plain log_softmax over the full vocabulary) and each
method's formula written out here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_train_assets

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

N_SAMPLES = 3  # with micro-batch 2: the epoch order decides which 2 are in step 1
MBS = 2
OMEGA = 0.5
SEED = 42


def _longer_lists(graded):
    """PRO-HH has pairs only; give every row a third, worst response (the worse
    response of the next row, scored below the list), so "worst" is not
    "second" and PRO/RRHF rank three responses; every fourth row a fourth
    (the next row's better one, scored lower still), so a micro-batch mixes
    lists of 3 and 4 and the trainer's slot mask matters."""
    import polars as pl

    resp, sc, pol = graded["responses"].to_list(), graded["scores"].to_list(), graded["polarity"].to_list()
    n = len(resp)
    extra = [[resp[(i + 1) % n][-1]] + ([resp[(i + 1) % n][0]] if i % 4 == 3 else []) for i in range(n)]
    return graded.with_columns(
        pl.Series("responses", [r + e for r, e in zip(resp, extra)], dtype=graded["responses"].dtype),
        pl.Series("scores", [x + [min(x) - 1.0 - k for k in range(len(e))] for x, e in zip(sc, extra)], dtype=graded["scores"].dtype),
        pl.Series("polarity", [x + [0] * (len(e) - 1) + [x[-1]] for x, e in zip(pol, extra)], dtype=graded["polarity"].dtype),
    )


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama (random; lm_head x20, so the logits have a real spread and the
    log-probs differ between responses), graded.parquet (200 PRO-HH rows, a=20,
    lists lengthened by _longer_lists) and Q_diff."""
    return tiny_train_assets(tmp_path_factory.mktemp("oracle_assets"), lm_head_scale=20.0, adjust=_longer_lists)


def overrides(assets, out: Path, **extra):
    base = {
        "model": str(assets["model"]),
        "data.graded": str(assets["graded"]),
        "data.max_length": 96,
        "data.max_prompt_length": 64,
        "data.max_samples": N_SAMPLES,
        "deft.distribution": str(assets["dist"]),
        "deft.omega": OMEGA,
        "train.output_dir": str(out),
        "train.micro_batch_size": MBS,
        "train.gradient_accumulation_steps": 1,
        "train.max_steps": 1,
        "train.lr": 1e-3,
        "train.warmup_steps": 0,
        "train.seed": SEED,
        "train.progress": False,
        "train.deepspeed": None,
        "train.save_steps": 0,
    }
    base.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def oracle_inputs(assets):
    """Per sample of step 1: its responses' (prompt_len, ids) as this test
    selects them from the graded file (best first), and their rewards."""
    import polars as pl
    from transformers import AutoModelForCausalLM

    from deft._native import Tokenizer
    from deft.config import load_config
    from deft.distribution import load_distribution
    from deft.render import policy_layout, render_prompt
    from deft.train import encode_examples, epoch_order, prepare_data

    cfg = load_config(None, overrides(assets, assets["root"] / "unused"))
    prep = prepare_data(cfg)  # used only for the template and its HF tokenizer
    frame = pl.read_parquet(assets["graded"]).filter(pl.col("level") == "A").head(N_SAMPLES)
    assert frame.height == N_SAMPLES
    # step 1's micro-batch: the first MBS entries of epoch 0's seeded order
    step1 = [int(i) for i in epoch_order(N_SAMPLES, SEED, 0, MBS)[:MBS]]
    rows = [frame.row(i, named=True) for i in step1]
    assert any(len(r["responses"]) > 2 for r in rows), "need a list of more than 2 responses (worst != second)"
    assert len({len(r["responses"]) for r in rows}) == 2, "need lists of different lengths in one micro-batch"
    has_scores = "scores" in frame.columns
    tok = Tokenizer(str(assets["model"] / "tokenizer.json"))
    lay = policy_layout(prep.template, prep.tokenizer)
    samples = []
    for r in rows:
        resps = list(r["responses"])
        scores = list(r["scores"]) if has_scores else [float(len(resps) - i) for i in range(len(resps))]
        # laid out as the model's template does (checked against TRL in test_layout_vs_trl)
        ex = encode_examples([r["id"]], [render_prompt(r["context"], prep.template, prep.tokenizer)], [resps], [scores], tok,
                             eos_token_id=prep.eos_token_id, response_prefix=lay.prefix, lead_ids=lay.lead_ids,
                             response_suffix=lay.suffix, append_eos=lay.append_eos, max_length=96, max_prompt_length=64)[0]
        samples.append({"prompt_len": ex.prompt_len, "ids": [torch.from_numpy(s) for s in ex.input_ids],
                        "rewards": [float(x) for x in scores]})
    q = torch.from_numpy(load_distribution(assets["dist"]).q_diff.astype(np.float64))
    model = AutoModelForCausalLM.from_pretrained(str(assets["model"]), torch_dtype=torch.float32).eval()
    # per response: summed log-prob, token count, mean over its tokens of sum_v q[v] log_softmax(z_t)[v]
    with torch.no_grad():
        for s in samples:
            s["logp"], s["n"], s["rdis"] = [], [], []
            P = s["prompt_len"]
            for ids in s["ids"]:
                logits = model(input_ids=ids[None], use_cache=False).logits[0].double()
                lsm = torch.log_softmax(logits, dim=-1)
                pos = torch.arange(P - 1, len(ids) - 1)  # logits at t predict the response token t + 1
                s["logp"].append(float(lsm[pos, ids[pos + 1]].sum()))
                s["n"].append(len(pos))
                s["rdis"].append(float((lsm[pos] @ q).mean()))
    return samples


def _oracle(samples, method: str, responses: str, m: dict):
    """(L_m, sft_term or None, R_dis) from the papers' formulas."""
    def chosen(s):
        return {"sft": [0], "dpo": [0, -1], "ipo": [0, -1]}.get(method, list(range(len(s["ids"]))))

    B = len(samples)
    sft_term = None
    w_sft = m["sft_weight"] if m["sft_weight"] is not None else 0.05  # the documented PRO/RRHF default
    if method == "sft":
        lm = -sum(s["logp"][0] for s in samples) / sum(s["n"][0] for s in samples)
    elif method == "dpo":  # reference = the initial model, i.e. the policy at step 1
        tot = 0.0
        for s in samples:
            pc, pr = s["logp"][0], s["logp"][-1]
            h = m["beta"] * ((pc - pc) - (pr - pr))
            ls = m["label_smoothing"]
            tot += -(1 - ls) * math.log(1 / (1 + math.exp(-h))) - ls * math.log(1 / (1 + math.exp(h)))
        lm = tot / B
    elif method == "ipo":
        lm = sum((0.0 - 1 / (2 * m["beta"])) ** 2 for _ in samples) / B
    elif method == "rrhf":
        rank = 0.0
        for s in samples:
            sc = [lp / n for lp, n in zip(s["logp"], s["n"])]
            r = s["rewards"]
            rank += sum(max(0.0, sc[j] - sc[i]) for i in range(len(sc)) for j in range(len(sc)) if r[i] > r[j])
        sft_term = w_sft * sum(-s["logp"][0] / s["n"][0] for s in samples) / B
        lm = rank / B + sft_term
    elif method == "pro":
        rank, sft = 0.0, 0.0
        for s in samples:
            sc = [lp / n for lp, n in zip(s["logp"], s["n"])]
            r = s["rewards"]
            l = len(sc)
            for k in range(l - 1):
                d = [r[k] - r[j] for j in range(k + 1, l)]
                terms = [sc[k] * max(d)] + [sc[j] * dj for j, dj in zip(range(k + 1, l), d)]
                mx = max(terms)
                rank += mx + math.log(sum(math.exp(t - mx) for t in terms)) - terms[0]
            sft += w_sft * (l - 1) ** 2 * (-s["logp"][0])
        sft_term = sft / B
        lm = rank / B + sft_term
    else:
        raise AssertionError(method)
    seqs = [s["rdis"][j] for s in samples for j in chosen(s) if responses == "all" or j == 0]
    return lm, sft_term, sum(seqs) / len(seqs)


@pytest.mark.parametrize("responses", ["all", "best"])
@pytest.mark.parametrize("method", ["sft", "dpo", "ipo", "pro", "rrhf"])
def test_step1_metrics_match_oracle(assets, oracle_inputs, tmp_path, method, responses):
    import deft.train
    from deft.config import defaults

    out = tmp_path / "out"
    deft.train.run(None, overrides(assets, out, **{"method.name": method, "deft.responses": responses}))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1
    m = defaults()["method"]
    lm, sft_term, rdis = _oracle(oracle_inputs, method, responses, m)
    tol = dict(rel=1e-5, abs=1e-5)
    assert row["R_dis"] == pytest.approx(rdis, **tol)
    assert row["L_m"] == pytest.approx(lm, **tol)
    if sft_term is not None:
        assert row["sft_term"] == pytest.approx(sft_term, **tol)
        assert row["rank_loss"] == pytest.approx(lm - sft_term, **tol)
    assert row["loss"] == pytest.approx(lm - OMEGA * rdis, **tol)
