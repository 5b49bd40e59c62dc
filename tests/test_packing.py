"""Padding-free batches: packed sequences with per-sequence position ids
(train.packing, deft.train.collate(pack=...)) and length-grouped sampling
(train.group_by_length, deft.train.Schedule.micro_batches)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_file, tiny_llama, tiny_train_assets, train_overrides

torch = pytest.importorskip("torch")


def _examples(n=4, seed=0, prompt_len=(3, 20), resp_len=(1, 30), k=2):
    from deft.train import Example

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = rng.integers(5, 1000, size=rng.integers(*prompt_len))
        seqs = [np.concatenate([p, rng.integers(5, 1000, size=rng.integers(*resp_len))]) for _ in range(k)]
        out.append(Example(str(i), seqs, len(p), [float(k - j) for j in range(k)]))
    return out


@pytest.mark.parametrize("capacity", [1, 40, 10_000])
def test_packed_rows_hold_every_sequence_once_with_restarting_positions(capacity):
    from deft.losses import IGNORE_INDEX
    from deft.train import collate, unpack

    exs = _examples(n=5)
    padded = collate(exs, pad_id=0)
    packed = collate(exs, pad_id=0, pack=capacity)
    R, L = packed["input_ids"].shape
    N = padded["input_ids"].shape[0]
    lengths = padded["attention_mask"].sum(1)
    # each row within the capacity, unless one sequence is longer on its own
    per_row = [(packed["segments"][r] >= 0).sum().item() for r in range(R)]
    assert all(n <= max(capacity, int(lengths.max())) for n in per_row)
    if capacity == 40:  # first fit, longest first
        assert L <= 40 + int(lengths.max())
    if capacity == 1:  # rows as long as the longest sequence: never more positions than padding
        assert L == padded["input_ids"].shape[1] and R < N
    if capacity == 10_000:
        assert R == 1 and L == int(lengths.sum())  # one row, no padding at all
    # the per-sequence view gives back the padded batch
    view = unpack(packed["input_ids"][..., None], packed)[..., 0]
    mask = padded["attention_mask"].bool()
    assert torch.equal(view[mask], padded["input_ids"][mask])
    assert torch.equal(packed["seq_labels"], padded["labels"])
    # positions restart at 0 at every sequence; each sequence's first label is ignored
    for i in range(N):
        pos = packed["gather"][i, : int(lengths[i])]
        assert packed["position_ids"].view(-1)[pos].tolist() == list(range(int(lengths[i])))
        assert int(packed["labels"].view(-1)[pos[0]]) == IGNORE_INDEX
        assert (packed["segments"].view(-1)[pos] == i).all()
    assert packed["tokens"] == padded["tokens"] == int(lengths.sum())
    assert packed["positions"] == R * L <= padded["positions"]
    assert torch.equal(packed["row"], padded["row"]) and torch.equal(packed["col"], padded["col"])


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_file("tokenizers/smollm2")))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("from_hidden", [False, True])
def test_packed_logprobs_and_gradients_equal_the_padded_batch(tok, attn, from_hidden):
    """A Llama given packed rows attends within each sequence only: the response log-probs, the R_dis
    hidden states and the gradients equal the padded batch's to float32 rounding."""
    from deft.train import _forward, _seq_logps, collate, unpack

    model = tiny_llama(tok, attn_implementation=attn).eval()
    exs = _examples(n=4, seed=1)
    cpu = torch.device("cpu")
    mask = collate(exs, 0)["attention_mask"].bool()
    res = {}
    for name, batch in (("padded", collate(exs, 0)), ("packed", collate(exs, 0, pack=64))):
        model.zero_grad()
        out = _forward(model, batch, cpu, None, True, from_hidden)
        lp, n = _seq_logps(out, batch, cpu, model)
        hidden = unpack(out.hidden_states[-1], batch)
        w = torch.linspace(-1, 1, len(lp))
        ((lp * w).sum() + hidden[mask].square().mean()).backward()
        res[name] = (lp.detach(), n, hidden.detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
    (lp0, n0, h0, g0), (lp1, n1, h1, g1) = res["padded"], res["packed"]
    assert torch.equal(n0, n1) and int(n0.min()) > 0
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h1[mask], h0[mask], rtol=1e-5, atol=1e-5)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=k)


def test_segment_sums_refuse_a_label_on_padding():
    from deft.losses import response_logprobs

    logits = torch.randn(1, 6, 10)
    labels = torch.tensor([[-100, 1, 2, -100, 3, 4]])
    seg = torch.tensor([[0, 0, 0, 1, 1, -1]])
    with pytest.raises(ValueError, match="padding position"):
        response_logprobs(logits, labels, segments=seg, n_segments=2)
    lp, n = response_logprobs(logits, labels, segments=torch.tensor([[0, 0, 0, 1, 1, 1]]), n_segments=3)
    assert n.tolist() == [2, 2, 0] and float(lp[2]) == 0.0


# --- length-grouped sampling ---


def _schedule(n, mbs=2, world=1, gas=2):
    from deft.train import Schedule

    t = {"micro_batch_size": mbs, "gradient_accumulation_steps": gas, "max_steps": None, "epochs": 1, "warmup_steps": 0, "warmup_ratio": 0.0}
    return Schedule.of(t, n, world)


def test_length_grouped_micro_batches_are_the_same_samples_with_less_padding():
    import gzip

    from deft.train import LENGTH_WINDOW

    # the real lengths (characters of the longest response) of PRO's HH harmless test set
    rows = [json.loads(l) for l in gzip.open(shared_file("data/pro-hh/test_harmless_base.jsonl.gz"), "rt").read().splitlines()[:600]]
    lengths = np.array([len("".join(r["prefix"][0])) + max(len(s) for s in r["suffix"]) for r in rows])
    sched = _schedule(len(lengths), mbs=4)
    plain = sched.micro_batches(seed=3, epoch=0)
    grouped = sched.micro_batches(seed=3, epoch=0, lengths=lengths)
    assert len(grouped) == len(plain)
    assert sorted(np.concatenate(grouped).tolist()) == sorted(np.concatenate(plain).tolist())
    # per window the same samples, regrouped
    size = 4
    w = LENGTH_WINDOW
    for s in range(0, len(plain), w):
        assert sorted(np.concatenate(plain[s:s + w]).tolist()) == sorted(np.concatenate(grouped[s:s + w]).tolist())

    def pad_share(batches):
        return 1 - sum(lengths[b].sum() for b in batches) / sum(lengths[b].max() * len(b) for b in batches)

    assert pad_share(grouped) < 0.25 * pad_share(plain)
    # deterministic (a resumed run sees the same order), different per epoch and seed
    again = sched.micro_batches(seed=3, epoch=0, lengths=lengths)
    assert all(np.array_equal(a, b) for a, b in zip(grouped, again))
    other = sched.micro_batches(seed=3, epoch=1, lengths=lengths)
    assert not all(np.array_equal(a, b) for a, b in zip(grouped, other))
    assert all(len(b) == size for b in grouped)


# --- the trainer ---


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_train_assets(tmp_path_factory.mktemp("packing_assets"))


def _overrides(assets, out: Path, **extra):
    return train_overrides(assets, out, **{"train.micro_batch_size": 3, "data.max_samples": 18, "train.max_steps": 2, **extra})


@pytest.mark.parametrize("method", ["dpo", "pro"])
def test_packed_training_equals_padded_training(assets, tmp_path, method):
    """Two DEFT steps on packed rows give the padded run's metrics and weights to float32 rounding, with
    less padding computed; the manifest records the packing and its check."""
    from safetensors.torch import load_file

    from deft.train import run

    rows, weights = {}, {}
    modes = {"padded": {}, "packed": {"train.packing": True}, "one-row": {"train.packing": True, "train.pack_length": 1000}}
    for mode, extra in modes.items():
        out = tmp_path / mode
        run(None, _overrides(assets, out, **{"method.name": method, "train.ref_cache_dir": str(tmp_path / "rc"), **extra}))
        rows[mode] = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        weights[mode] = load_file(str(out / "model" / "model.safetensors"))
    loading = json.loads((tmp_path / "one-row" / "manifest.json").read_text())["loading"]
    assert loading["packing"]["pack_length"] == 1000 and loading["packing"]["check_max_diff_per_token"] < 1e-5
    assert "packing" not in json.loads((tmp_path / "padded" / "manifest.json").read_text())["loading"]
    for mode in ("packed", "one-row"):
        for a, b in zip(rows["padded"], rows[mode]):
            for k in ("loss", "L_m", "R_dis", "grad_norm", "rdis_grad_share"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
            assert b["pad_share"] <= a["pad_share"] and a["pad_share"] > 0.05
            assert b["pad_share"] == 0.0 if mode == "one-row" else True
        for k in weights["padded"]:
            torch.testing.assert_close(weights[mode][k], weights["padded"][k], rtol=0, atol=1e-5)


def test_packing_refused_for_a_model_that_attends_across_sequences(assets, tmp_path, monkeypatch):
    """A model that ignores the position ids' boundaries (here: a forward that drops them, as a model
    without packed-sequence support does) is refused before any step, with what to do."""
    from transformers import LlamaForCausalLM

    from deft.train import run

    real = LlamaForCausalLM.forward

    def forward(self, *args, position_ids=None, **kwargs):
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    with pytest.raises(ValueError, match=r"does not keep packed sequences apart .* set train.packing: false"):
        run(None, _overrides(assets, tmp_path / "out", **{"method.name": "sft", "train.packing": True, "train.pack_length": 1000}))
    assert not (tmp_path / "out" / "metrics.jsonl").exists() or not (tmp_path / "out" / "metrics.jsonl").read_text()


def test_group_by_length_trains_and_records_padding(assets, tmp_path):
    from deft.train import run

    for mode in ("plain", "grouped"):
        run(None, _overrides(assets, tmp_path / mode, **{"method.name": "sft", "train.max_steps": 3,
                                                         "train.group_by_length": mode == "grouped"}))
    share = {m: np.mean([json.loads(l)["pad_share"] for l in (tmp_path / m / "metrics.jsonl").read_text().splitlines()])
             for m in ("plain", "grouped")}
    assert 0 <= share["grouped"] < share["plain"]


def test_pack_length_needs_packing():
    from deft.config import ConfigError
    from deft.train import run

    with pytest.raises(ConfigError, match="train.pack_length: set train.packing: true"):
        run(None, ["model=x", "data.graded=y", "deft.enabled=false", "train.pack_length=128"])


@pytest.mark.slow  # a DeepSpeed process
def test_packing_and_length_grouping_under_deepspeed_match_the_plain_loop(assets, tmp_path):
    """ZeRO-2, packed rows, length-grouped order: the plain loop's metrics (same order, padded rows)."""
    import os
    import subprocess
    import sys

    from deft.train import run

    extra = {"method.name": "dpo", "train.group_by_length": True, "train.ref_cache_dir": str(tmp_path / "rc")}
    run(None, _overrides(assets, tmp_path / "plain", **extra))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out = tmp_path / "ds"
    ov = _overrides(assets, out, **{**extra, "train.packing": True, "train.pack_length": 1000,
                                    "train.deepspeed": str(Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero2.json")})
    r = subprocess.run([sys.executable, "-m", "deft", "train"] + [a for o in ov for a in ("--set", o)], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    plain = [json.loads(l) for l in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    ds = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(ds) == len(plain) == 2
    for a, b in zip(plain, ds):
        for k in ("loss", "L_m", "R_dis"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
        assert b["pad_share"] == 0.0 < a["pad_share"]


def test_resume_with_another_length_grouping_is_refused(assets, tmp_path):
    """group_by_length changes the order of the samples: a resume that changes it would repeat some
    samples and skip others in the rest of the epoch, so it is refused; packing alone may change."""
    from deft.train import run

    ov = dict(**{"method.name": "sft", "train.max_steps": 3, "train.save_steps": 1, "train.group_by_length": True})
    run(None, _overrides(assets, tmp_path / "out", **ov))
    with pytest.raises(ValueError, match="cannot resume .* train.group_by_length true, this run has false"):
        run(None, _overrides(assets, tmp_path / "out", **{**ov, "train.group_by_length": False, "train.max_steps": 4}), resume=True)
    res = run(None, _overrides(assets, tmp_path / "out", **{**ov, "train.packing": True, "train.max_steps": 4}), resume=True)
    assert res.resumed_from == 2 and res.global_step == 4
