"""Label log-probs from the last hidden states, chunk by chunk, without the
B x T x V logits (python/deft/losses.py: response_logprobs_from_hidden;
python/deft/ops.py: logprobs_for_model; train.logprobs: hidden)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_train_assets, train_overrides

torch = pytest.importorskip("torch")


def _case(dtype, B=3, T=40, d=32, V=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, d, dtype=dtype, generator=g)
    W = torch.randn(V, d, dtype=dtype, generator=g) * 0.1
    b = torch.randn(V, dtype=dtype, generator=g) * 0.1
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :10] = -100
    labels[1, 30:] = -100  # padding
    labels[2] = -100  # a row without response tokens
    return h, W, b, labels


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_equals_the_logits_path_with_gradients(dtype, tol, chunk):
    from deft.losses import response_logprobs, response_logprobs_from_hidden

    h, W, b, labels = _case(dtype)
    args = [x.clone().requires_grad_() for x in (h, W, b)]
    lp, n = response_logprobs(torch.nn.functional.linear(*args), labels)
    weights = torch.tensor([0.3, -1.2, 0.7], dtype=lp.dtype)
    ga = torch.autograd.grad((lp * weights).sum(), args)
    args2 = [x.clone().requires_grad_() for x in (h, W, b)]
    lp2, n2 = response_logprobs_from_hidden(args2[0], args2[1], labels, args2[2], chunk_size=chunk)
    gb = torch.autograd.grad((lp2 * weights).sum(), args2)
    assert torch.equal(n, n2) and n.tolist() == [30, 20, 0]
    torch.testing.assert_close(lp2, lp, rtol=0, atol=tol * 100)
    assert float(lp2[2]) == 0.0
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, rtol=tol, atol=tol)


def test_gradcheck_and_no_bias():
    from deft.losses import response_logprobs_from_hidden

    h, W, _, _ = _case(torch.float64, B=3, T=6, d=3, V=11)
    labels = torch.tensor([[-100, -100, 4, 7, 1, 10], [-100, 3, 3, 0, -100, -100], [-100, -100, -100, -100, -100, 2]])
    h.requires_grad_()
    W.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, w: response_logprobs_from_hidden(a, w, labels, chunk_size=3)[0], (h, W))


def test_bad_labels_refused():
    from deft.losses import response_logprobs_from_hidden

    h, W, b, labels = _case(torch.float32)
    labels[0, 20] = 5000
    with pytest.raises(ValueError, match=r"labels outside \[0, 1000\)"):
        response_logprobs_from_hidden(h, W, labels, b)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_train_assets(tmp_path_factory.mktemp("hidden_assets"))


def _overrides(assets, out: Path, **extra):
    return train_overrides(assets, out, **{"train.max_steps": 2, **extra})


@pytest.mark.parametrize("method", ["dpo", "pro"])
def test_training_from_hidden_states_equals_training_from_logits(assets, tmp_path, method):
    """Two DEFT steps (with the R_dis gradient share measured) from hidden states give the metrics and the
    weights of the logits path to float32 rounding; the manifest says which path ran."""
    from safetensors.torch import load_file

    from deft.train import run

    rows, weights = {}, {}
    for mode in ("logits", "hidden"):
        out = tmp_path / mode
        run(None, _overrides(assets, out, **{"train.logprobs": mode, "method.name": method, "train.ref_cache_dir": str(tmp_path / f"rc-{mode}")}))
        rows[mode] = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        weights[mode] = load_file(str(out / "model" / "model.safetensors"))
        assert json.loads((out / "manifest.json").read_text())["loading"]["logprobs"] == mode
    for a, b in zip(rows["logits"], rows["hidden"]):
        for k in ("loss", "L_m", "R_dis", "grad_norm", "rdis_grad_share"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), k
    for k in weights["logits"]:
        torch.testing.assert_close(weights["hidden"][k], weights["logits"][k], rtol=0, atol=1e-5)
