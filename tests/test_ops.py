"""R_dis custom ops (deft.ops): values and gradients against the naive formula
(materialised log_softmax), on CPU and, when available, CUDA."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from deft.ops import (
    is_zero_sum,
    prepare_q,
    rdis_for_model,
    rdis_from_hidden,
    rdis_from_logits,
    rdis_naive,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
F64 = torch.float64


@pytest.fixture(autouse=True)
def _no_tf32():
    """Exact float32 matmuls on CUDA for the float32 comparisons."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def make_q(v: int, zero_sum: bool, *, seed: int = 0, n: int = None) -> torch.Tensor:
    """A Q_diff-like vector: Q+/|Q+| - Q-/|Q-| (sum 0) or Q+ - 0.5 Q- (sum 0.5)."""
    g = torch.Generator().manual_seed(seed)
    n = v if n is None else n
    pos = torch.rand(n, generator=g, dtype=F64) ** 3
    neg = torch.rand(n, generator=g, dtype=F64) ** 3
    pos, neg = pos / pos.sum(), neg / neg.sum()
    return pos - neg if zero_sum else pos - 0.5 * neg


def make_mask(b: int, t: int, device="cpu") -> torch.Tensor:
    """Prompt prefix, response, right padding; sample 1 has no response token."""
    m = torch.zeros(b, t, device=device)
    for i in range(b):
        start, stop = 1 + i % 3, t - (i % 2)
        m[i, start:stop] = 1
    m[1 % b] = 0
    return m


def naive_hidden(h, w, q, m, bias=None, dtype=F64):
    return rdis_naive(F.linear(h.to(dtype), w.to(dtype), None if bias is None else bias.to(dtype)), q, m, dtype=dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------- float64 gradcheck


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_sum", [True, False])
@pytest.mark.parametrize("chunk_rows", [0, 2])
def test_logits_gradcheck_float64(device, zero_sum, chunk_rows):
    torch.manual_seed(0)
    b, t, v = 3, 4, 7
    z = torch.randn(b, t, v, dtype=F64, device=device, requires_grad=True)
    q, m = make_q(v, zero_sum), make_mask(b, t, device)
    assert is_zero_sum(q)[0] == zero_sum
    got = rdis_from_logits(z, q, m, chunk_rows=chunk_rows)
    assert got.dtype == F64
    torch.testing.assert_close(got, rdis_naive(z, q, m, dtype=F64), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: rdis_from_logits(x, q, m, chunk_rows=chunk_rows), (z,))
    # the analytic gradient equals the naive formula's
    g1 = torch.autograd.grad(rdis_from_logits(z, q, m, chunk_rows=chunk_rows), z)[0]
    g2 = torch.autograd.grad(rdis_naive(z, q, m, dtype=F64), z)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_sum", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_hidden_gradcheck_float64(device, zero_sum, with_bias):
    torch.manual_seed(1)
    b, t, v, d = 2, 4, 9, 5
    h = torch.randn(b, t, d, dtype=F64, device=device, requires_grad=True)
    w = torch.randn(v, d, dtype=F64, device=device, requires_grad=True)
    bias = torch.randn(v, dtype=F64, device=device, requires_grad=True) if with_bias else None
    q, m = make_q(v, zero_sum, seed=3), make_mask(b, t, device)
    m[1, 2] = 1  # both samples non-empty here; the empty one is covered elsewhere
    inputs = (h, w) + ((bias,) if with_bias else ())

    def fn(*xs):
        return rdis_from_hidden(xs[0], xs[1], q, m, xs[2] if with_bias else None, chunk_rows=3)

    torch.testing.assert_close(fn(*inputs), naive_hidden(h, w, q, m, bias), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fn, inputs)
    g1 = torch.autograd.grad(fn(*inputs), inputs)
    g2 = torch.autograd.grad(naive_hidden(h, w, q, m, bias), inputs)
    for a, e in zip(g1, g2):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- float32 / bf16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_sum", [True, False])
@pytest.mark.parametrize("chunk_rows", [0, 5])
def test_logits_float32_matches_naive(device, zero_sum, chunk_rows):
    torch.manual_seed(2)
    b, t, v = 4, 12, 1000
    z64 = torch.randn(b, t, v, dtype=F64, device=device) * 3
    z = z64.float().requires_grad_()
    q, m = make_q(v, zero_sum, seed=5), make_mask(b, t, device)
    got = rdis_from_logits(z, q, m, chunk_rows=chunk_rows)
    assert got.dtype == torch.float32 and got.shape == ()
    z64 = z.detach().double().requires_grad_()
    ref = rdis_naive(z64, q, m, dtype=F64)
    assert rel(got, ref) < 1e-5
    (g,) = torch.autograd.grad(got, z)
    (g_ref,) = torch.autograd.grad(ref, z64)
    assert g.dtype == torch.float32 and rel(g, g_ref) < 1e-5
    assert float(g[1].abs().max()) == 0.0  # the empty sample gets no gradient


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_sum", [True, False])
def test_logits_non_contiguous(device, zero_sum):
    """Shifted logits (logits[:, :-1]) are walked without a copy and give the same result."""
    torch.manual_seed(3)
    full = torch.randn(3, 9, 50, device=device, requires_grad=True)
    z = full[:, :-1]
    assert not z.is_contiguous()
    q, m = make_q(50, zero_sum), make_mask(3, 8, device)
    got = rdis_from_logits(z, q, m, chunk_rows=3)
    ref = rdis_naive(z.detach().double(), q, m, dtype=F64)
    assert rel(got, ref) < 1e-5
    (g,) = torch.autograd.grad(got, full)
    (g_ref,) = torch.autograd.grad(rdis_naive(full[:, :-1], q, m), full)
    assert rel(g, g_ref) < 1e-5 and float(g[:, -1].abs().max()) == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_sum", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_hidden_float32_matches_naive(device, zero_sum, with_bias):
    torch.manual_seed(4)
    b, t, v, d = 3, 10, 700, 48
    h = torch.randn(b, t, d, device=device, requires_grad=True)
    w = (torch.randn(v, d, device=device) / d**0.5).requires_grad_()
    bias = (torch.randn(v, device=device) * 0.1).requires_grad_() if with_bias else None
    q, m = make_q(v, zero_sum, seed=6), make_mask(b, t, device)
    inputs = [h, w] + ([bias] if with_bias else [])
    got = rdis_from_hidden(h, w, q, m, bias, chunk_rows=7)
    d64 = [x.detach().double().requires_grad_() for x in inputs]
    ref = naive_hidden(d64[0], d64[1], q, m, d64[2] if with_bias else None)
    assert rel(got, ref) < 1e-5
    for a, e in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(ref, d64)):
        assert a.dtype == torch.float32 and rel(a, e) < 1e-5
    # hidden and logits entry points agree
    z = F.linear(h, w, bias)
    assert rel(got, rdis_from_logits(z, q, m)) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zero_sum", [True, False])
def test_bf16_inputs(device, zero_sum):
    """bf16 in, float32 accumulation and result; gradients in bf16 (looser tolerance)."""
    torch.manual_seed(5)
    b, t, v, d = 2, 8, 600, 32
    q, m = make_q(v, zero_sum, seed=7), make_mask(b, t, device)
    m[1, 3:] = 1
    z = (torch.randn(b, t, v, device=device) * 2).bfloat16().requires_grad_()
    got = rdis_from_logits(z, q, m, chunk_rows=3)
    assert got.dtype == torch.float32
    z64 = z.detach().double().requires_grad_()  # the same bf16 values, exactly
    ref = rdis_naive(z64, q, m, dtype=F64)
    assert rel(got, ref) < 1e-5  # float32 accumulation of exact bf16 inputs
    (g,) = torch.autograd.grad(got, z)
    assert g.dtype == torch.bfloat16 and rel(g, torch.autograd.grad(ref, z64)[0]) < 1e-2

    h = torch.randn(b, t, d, device=device).bfloat16().requires_grad_()
    w = (torch.randn(v, d, device=device) / d**0.5).bfloat16().requires_grad_()
    got = rdis_from_hidden(h, w, q, m, chunk_rows=5)
    assert got.dtype == torch.float32
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = naive_hidden(h64, w64, q, m)
    assert rel(got, ref) < 1e-5
    for a, e in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(ref, (h64, w64))):
        assert a.dtype == torch.bfloat16 and rel(a, e) < 1e-2


# --------------------------------------------------------------------------- masks, padding, errors


@pytest.mark.parametrize("device", DEVICES)
def test_empty_masks(device):
    torch.manual_seed(6)
    q = make_q(20, True)
    z = torch.randn(3, 5, 20, device=device, requires_grad=True)
    h = torch.randn(3, 5, 4, device=device, requires_grad=True)
    w = torch.randn(20, 4, device=device, requires_grad=True)
    m = torch.zeros(3, 5, device=device)
    for got, leaves in ((rdis_from_logits(z, q, m), (z,)), (rdis_from_hidden(h, w, q, m), (h, w))):
        assert float(got.detach()) == 0.0
        for g in torch.autograd.grad(got, leaves):
            assert torch.isfinite(g).all() and float(g.abs().max()) == 0.0
    # one empty sample: excluded from the batch mean; reduction="none" gives it 0
    m[0, 1:3] = 1
    m[2, 4] = 1
    per = rdis_from_logits(z, q, m, reduction="none")
    assert per.shape == (3,) and float(per[1].detach()) == 0.0
    torch.testing.assert_close(rdis_from_logits(z, q, m), (per[0] + per[2]) / 2)
    # bool and float masks agree
    torch.testing.assert_close(rdis_from_logits(z, q, m.bool()), rdis_from_logits(z, q, m))


@pytest.mark.parametrize("device", DEVICES)
def test_q_padding_and_errors(device):
    torch.manual_seed(7)
    v, d = 30, 6
    q_short = make_q(v - 4, True, n=v - 4)
    q_full = torch.cat([q_short, torch.zeros(4, dtype=F64)])
    z = torch.randn(2, 5, v, device=device)
    h, w = torch.randn(2, 5, d, device=device), torch.randn(v, d, device=device)
    m = torch.ones(2, 5, device=device)
    torch.testing.assert_close(rdis_from_logits(z, q_short, m), rdis_from_logits(z, q_full, m))
    torch.testing.assert_close(rdis_from_hidden(h, w, q_short, m), rdis_from_hidden(h, w, q_full, m))
    assert prepare_q(q_short, v).shape == (v,)
    q_long = make_q(v + 1, True)
    with pytest.raises(ValueError, match=r"q_diff has 31 entries but .* V=30"):
        rdis_from_logits(z, q_long, m)
    with pytest.raises(ValueError, match=r"q_diff has 31 entries but .* V=30"):
        rdis_from_hidden(h, w, q_long, m)
    with pytest.raises(ValueError, match="mask shape"):
        rdis_from_logits(z, q_full, m[:, :4])
    with pytest.raises(ValueError, match=r"\(V, d=6\)"):
        rdis_from_hidden(h, w.t(), q_full, m)
    with pytest.raises(ValueError, match="1-D"):
        rdis_from_logits(z, q_full[None], m)


def test_q_is_constant():
    q = make_q(10, True).float().requires_grad_()
    z = torch.randn(1, 3, 10, requires_grad=True)
    rdis_from_logits(z, q, torch.ones(1, 3)).backward()
    assert q.grad is None and z.grad is not None


def test_zero_sum_tolerance():
    """Below the tolerance the logsumexp term is dropped (fast path); zero_sum_tol=0 forces the exact path."""
    torch.manual_seed(8)
    v = 40
    q = make_q(v, True) + 1e-9 / v  # sum 1e-9, relative 5e-10
    z = torch.randn(2, 3, v, dtype=F64) * 5
    m = torch.ones(2, 3)
    assert is_zero_sum(q)[0] and not is_zero_sum(q, 0.0)[0]
    fast, exact = rdis_from_logits(z, q, m), rdis_from_logits(z, q, m, zero_sum_tol=0.0)
    torch.testing.assert_close(exact, rdis_naive(z, q, m, dtype=F64), rtol=1e-12, atol=1e-14)
    lse = torch.logsumexp(z, -1).mean()
    torch.testing.assert_close(fast - exact, 1e-9 * lse, rtol=1e-6, atol=1e-18)


def _saved_numels(fn):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


def test_fast_paths_save_nothing_vocab_sized_per_token():
    b, t, v, d = 2, 16, 512, 8
    q, m = make_q(v, True), torch.ones(b, t)
    z = torch.randn(b, t, v, requires_grad=True)
    out, sizes = _saved_numels(lambda: rdis_from_logits(z, q, m))
    assert max(sizes) < b * t * v  # the logits are not even kept
    h, w = torch.randn(b, t, d, requires_grad=True), torch.randn(v, d, requires_grad=True)
    out, sizes = _saved_numels(lambda: rdis_from_hidden(h, w, make_q(v, False), m))
    assert max(sizes) <= v * d  # exact path: inputs only, logits recomputed in backward
    out, sizes = _saved_numels(lambda: rdis_from_logits(z, make_q(v, False), m))
    assert max(sizes) == b * t * v and sizes.count(b * t * v) == 1  # exact path: the input logits only


# --------------------------------------------------------------------------- torch.library


def _op_samples(device):
    torch.manual_seed(9)
    b, t, v, d = 2, 3, 11, 4
    q = prepare_q(make_q(v, False), v, device)
    z = torch.randn(b, t, v, device=device, requires_grad=True)
    h = torch.randn(b, t, d, device=device, requires_grad=True)
    w = torch.randn(v, d, device=device, requires_grad=True)
    bias = torch.randn(v, device=device, requires_grad=True)
    g = torch.randn(b, t, device=device)
    ops = torch.ops.deft
    return [
        (ops.rdis_logits.default, (z, q, 0.0, 0)),
        (ops.rdis_logits.default, (z, q, 0.25, 2)),
        (ops.rdis_logits.default, (z.detach().bfloat16().requires_grad_(), q, 0.25, 2)),
        (ops.rdis_hidden.default, (h, w, q, None, 0.0, 0)),
        (ops.rdis_hidden.default, (h, w, q, bias, 0.0, 0)),
        (ops.rdis_hidden.default, (h, w, q, bias, 0.5, 4)),
        (ops.rdis_logits_bwd.default, (g, None, q, 0.0, [b, t, v], torch.float32, 0)),
        (ops.rdis_logits_bwd.default, (g, z.detach(), q, 0.5, [b, t, v], torch.float32, 4)),
        (ops.rdis_hidden_bwd.default, (g, h.detach(), w.detach(), q, bias.detach(), 0.5, 2, True, True, True)),
        (ops.rdis_hidden_bwd.default, (g, h.detach(), w.detach(), q, None, 0.0, 2, True, False, False)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _op_samples(device):
        torch.library.opcheck(op, args)


def test_torch_compile_smoke():
    """torch.compile (inductor on CPU) sees ordinary ops: fullgraph through the raw
    ops, and the public functions (a graph break at the host-side sum of Q is fine)."""
    torch._dynamo.reset()
    torch.manual_seed(10)
    b, t, v, d = 2, 5, 64, 8
    q = make_q(v, True)
    qp = prepare_q(q, v)
    m = make_mask(b, t)
    z = torch.randn(b, t, v, requires_grad=True)
    h, w = torch.randn(b, t, d, requires_grad=True), torch.randn(v, d, requires_grad=True)

    def raw(z, h, w):
        a = torch.ops.deft.rdis_logits(z, qp, 0.0, 0)
        c = torch.ops.deft.rdis_hidden(h, w, qp, None, 0.0, 0)
        return (a * m).sum() + (c * m).sum()

    import shutil

    # inductor compiles C++ on CPU: without a compiler the test cannot run; any other failure is a failure
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("torch.compile needs a C++ compiler (g++/clang++) for the CPU inductor backend; none on PATH")
    compiled = torch.compile(raw, fullgraph=True)
    got = compiled(z, h, w)
    torch.testing.assert_close(got, raw(z, h, w))
    g1 = torch.autograd.grad(got, (z, h, w))
    g2 = torch.autograd.grad(raw(z, h, w), (z, h, w))
    for a, e in zip(g1, g2):
        torch.testing.assert_close(a, e)
    public = torch.compile(lambda z, h, w: rdis_from_logits(z, q, m) + rdis_from_hidden(h, w, q, m))
    torch.testing.assert_close(public(z, h, w), rdis_from_logits(z, q, m) + rdis_from_hidden(h, w, q, m))


# --------------------------------------------------------------------------- models


def _tiny_llama(v=96, tie=False):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11)
    cfg = LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("zero_sum", [True, False])
@pytest.mark.parametrize("tie", [False, True])
def test_rdis_for_model_llama(zero_sum, tie):
    """hidden_states[-1] is the final-norm output the lm_head consumes; the hidden
    path equals the logits path, value and gradients (Q_diff over the real
    vocabulary, shorter than a padded lm_head)."""
    model = _tiny_llama(tie=tie)
    b, t = 3, 10
    ids = torch.randint(3, 96, (b, t), generator=torch.Generator().manual_seed(0))
    mask = make_mask(b, t)
    q = make_q(90, zero_sum)  # 90 real ids, 96 rows in the lm_head
    out = model(ids, output_hidden_states=True)
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)
    a = rdis_for_model(model, out.hidden_states[-1], q, mask)
    e = rdis_from_logits(out.logits, q, mask)
    assert rel(a, e) < 1e-5 and rel(a, rdis_naive(out.logits.double(), q, mask, dtype=F64)) < 1e-5
    params = [model.lm_head.weight, model.model.layers[0].mlp.up_proj.weight]
    ga = torch.autograd.grad(a, params, retain_graph=True)
    ge = torch.autograd.grad(e, params)
    for x, y in zip(ga, ge):
        assert rel(x, y) < 1e-4


def test_rdis_for_model_gpt2_tied():
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(12)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=80, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                       bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, 80, (2, 7))
    mask = make_mask(2, 7)
    mask[1, 3:] = 1
    out = model(ids, output_hidden_states=True)
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)  # after ln_f
    q = make_q(80, True)
    a = rdis_for_model(model, out.hidden_states[-1], q, mask)
    assert rel(a, rdis_from_logits(out.logits, q, mask)) < 1e-5
    a.backward()
    assert model.transformer.wte.weight.grad is not None  # tied: flows to the embedding


def test_rdis_for_model_zero3_routes_through_head():
    """A ZeRO-3-partitioned weight (ds_id) is used inside a call of the head module,
    so DeepSpeed's module hooks (gather / release / re-gather for backward) run;
    simulated here with a forward pre-hook (DeepSpeed itself is not installed)."""
    model = _tiny_llama()
    ids = torch.randint(3, 96, (2, 6))
    mask = torch.ones(2, 6)
    q = make_q(96, True)
    out = model(ids, output_hidden_states=True)
    hid = out.hidden_states[-1]
    expected = rdis_for_model(model, hid, q, mask)
    (g_expected,) = torch.autograd.grad(expected, model.lm_head.weight, retain_graph=True)
    calls = []
    handle = model.lm_head.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape))
    model.lm_head.weight.ds_id = 0
    try:
        got = rdis_for_model(model, hid, q, mask)
    finally:
        del model.lm_head.weight.ds_id
        handle.remove()
    assert calls == [hid.shape] and "forward" not in model.lm_head.__dict__
    torch.testing.assert_close(got, expected)
    (g,) = torch.autograd.grad(got, model.lm_head.weight)
    torch.testing.assert_close(g, g_expected)
    with pytest.raises(ValueError, match="q_diff has 97"):
        model.lm_head.weight.ds_id = 0
        try:
            rdis_for_model(model, hid, make_q(97, True), mask)
        finally:
            del model.lm_head.weight.ds_id


def test_rdis_for_model_refuses_logit_transforms():
    model = _tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="rdis_from_logits"):
        rdis_for_model(model, torch.randn(1, 2, 32), make_q(96, True), torch.ones(1, 2))


def test_row_blocks_walk_every_row_in_order_as_views_also_for_4d_inputs():
    from deft.ops import _row_blocks

    base = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).reshape(2, 3, 5, 4)
    # flattenable (also a transposed 2-D one); walked per sample (3-D, and 4-D with leading dims mergeable or not)
    for x in (base, base[:, :, :-1], base[:, 1:, :-1], base[0, :, :-1], base[0, 0].t()):
        want = x.reshape(-1, x.shape[-1])
        got, pos = [], 0
        for start, stop, block in _row_blocks(x, 3):
            assert start == pos and stop - start == block.shape[0] <= 3 and block.dim() == 2 and block.shape[1] == x.shape[-1]
            assert block.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()  # a view, not a copy
            got.append(block)
            pos = stop
        assert pos == want.shape[0]
        assert torch.equal(torch.cat(got), want)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_rdis_from_logits_with_a_vocabulary_of_several_column_blocks(layout):
    """V > 4096: the float32 dot products with Q run over 4096-column blocks
    (one batched kernel for a contiguous block, a loop otherwise) plus the
    remainder, summed in float64; equal to the float64 formula."""
    from deft.ops import _COLS, rdis_from_logits

    g = torch.Generator().manual_seed(3)
    V = 3 * _COLS + 17
    wide = torch.randn(2, 5, V + 9, generator=g) * 4
    logits = wide[..., :V] if layout == "strided" else wide[..., :V].contiguous()
    q = torch.randn(V, generator=g, dtype=torch.float64)
    q -= q.mean()  # zero sum: the logits path
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]], dtype=torch.bool)
    got = rdis_from_logits(logits, q, mask)
    z = logits.double()
    want = ((z * q).sum(-1) * mask).sum(-1) / mask.sum(-1)
    # float32 rounding of 4096-term partial sums: within 1e-6 of the sum of |terms|
    scale = (z * q).abs().sum(-1).max().item()
    assert abs(got.item() - want.mean().item()) < 1e-6 * scale
    per = rdis_from_logits(logits, q, mask, reduction="none")
    assert (per.double() - want).abs().max().item() < 1e-6 * scale


def test_mean_over_samples_with_a_single_nonempty_sample():
    from deft.ops import rdis_from_logits, rdis_naive

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 4, 11, generator=g)
    q = torch.randn(11, generator=g, dtype=torch.float64)
    q -= q.mean()
    mask = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    got = rdis_from_logits(logits, q, mask)
    z = logits[1, 1:3].double()
    want = (torch.log_softmax(z, -1) @ q).mean()  # the one sample's mean: not halved, not averaged with empties
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    assert got.item() == pytest.approx(rdis_naive(logits, q, mask).item(), rel=1e-5)


class _HeadModel(torch.nn.Module):
    """A bare model exposing an lm_head with a bias, and a config."""

    def __init__(self, v, d, **config):
        super().__init__()
        self.head = torch.nn.Linear(d, v, bias=True)
        self.config = type("Cfg", (), config)()

    def get_output_embeddings(self):
        return self.head


def test_rdis_for_model_includes_the_head_bias_and_refuses_a_logit_scale():
    from deft.ops import rdis_for_model, rdis_naive

    g = torch.Generator().manual_seed(6)
    model = _HeadModel(13, 8)
    with torch.no_grad():
        model.head.bias.copy_(torch.randn(13, generator=g) * 3)
    h = torch.randn(2, 5, 8, generator=g)
    q = torch.randn(13, generator=g, dtype=torch.float64)
    q[0] += 0.5  # not zero-sum: the bias enters through the log-normaliser too
    mask = torch.ones(2, 5, dtype=torch.bool)
    got = rdis_for_model(model, h, q, mask)
    assert got.item() == pytest.approx(rdis_naive(model.head(h), q, mask).item(), rel=1e-5, abs=1e-6)
    for cfg in ({"logit_scale": 0.5}, {"final_logit_softcapping": 30.0}):
        with pytest.raises(ValueError, match="transforms its logits after the lm_head"):
            rdis_for_model(_HeadModel(13, 8, **cfg), h, q, mask)
    rdis_for_model(_HeadModel(13, 8, logit_scale=1.0), h, q, mask)  # a scale of 1 is no transform
