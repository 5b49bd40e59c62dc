"""The DEFT distribution reward R_dis as a custom torch op.

Definition. For logits ``z`` (B x T x V), a response mask ``m`` (B x T) and the
discrepancy distribution ``Q_diff`` (V,)::

    R_dis = mean_b [ (1/|m_b|) sum_t m_bt * sum_v Q_diff[v] * log_softmax(z_bt)[v] ]

The mask is aligned with the logits rows, like the label mask of the LM loss
(teacher forcing): ``m[b, t] = 1`` when the logits at ``(b, t)`` predict a
response token (prompt and padding rows 0). Float masks are used as weights,
``|m_b| = sum_t m_bt``. **Empty rows**: a sample with no response token
(``|m_b| = 0``) contributes 0 and is excluded from the batch mean, so the mean
runs over the samples with at least one response token; if there is none,
R_dis is 0 (with zero gradients, never NaN).

Why it is cheap. ``log_softmax(z)_v = z_v - logsumexp(z)``, so per token
``sum_v Q_v log_softmax(z)_v = Q.z - (sum Q) * logsumexp(z)``. ``Q_diff = Q+/|Q+|
- Q-/|Q-|`` sums to 0, and then the per-token value is exactly ``Q.z``; for
``z = W h + b`` that is ``h.(W^T Q) + Q.b``: no V-sized per-token tensor, not
even the logits.

Paths (chosen per call from ``Q_diff``; see :func:`is_zero_sum`):

* zero-sum fast path, when ``|sum Q| <= zero_sum_tol * sum|Q|`` (default tol
  1e-6, sum in float64; the dropped term ``(sum Q) * logsumexp(z)`` is then at
  most ``1e-6 * sum|Q| * |logsumexp(z)|`` per token; a float32 Q+/|Q+| - Q-/|Q-|
  sums to ~1e-8 * sum|Q|). Pass ``zero_sum_tol=0`` to force the exact path. From logits: one GEMV ``z @ Q`` forward, and the backward
  is the outer product ``g Q^T`` written straight into the logits gradient;
  nothing is saved for backward (not even the logits). From hidden states:
  ``u = W^T Q`` (d,), then ``h.u`` per token; backward ``dh = g u^T``,
  ``dW = Q (sum_t g_t h_t)^T`` (an outer product of two vectors, never a
  V x B*T matrix), ``db = Q sum_t g_t``.
* exact general path, otherwise: ``Q.z - (sum Q) * logsumexp(z)``, with
  logsumexp computed over chunks of the flattened B*T rows (from hidden
  states, each chunk's logits are computed from W and dropped). Nothing
  V-sized per token is saved for backward: the backward recomputes each chunk's
  softmax (and, from hidden states, its logits) and accumulates the gradients.
  A chunk holds ``chunk_rows`` rows (default: as many as fit 8 MiB of float32
  logits on CPU, 256 MiB on CUDA).

Precision: float32 and bfloat16 (or float16) inputs, float32 accumulation and
float32 results (float64 inputs, e.g. for gradcheck, run in float64): the long
dot products with Q (over V, with heavy cancellation) are float32 GEMVs over
blocks of 4096 entries summed in float64, and ``W^T Q`` is accumulated in
float64, which keeps R_dis within ~1e-6 relative of a float64 reference; gradients are returned in each input's dtype (computed in
float32 and cast chunk by chunk). In the exact path from bf16 hidden states the
weight is upcast once (a V x d float32 temporary). Matmuls follow torch's TF32
settings on CUDA (off by default for float32 matmuls).

Ops (``torch.ops.deft.*``, registered with ``torch.library.custom_op`` plus
``register_fake`` and ``register_autograd``, so torch.compile, functorch and
DeepSpeed see ordinary ops; no Triton): ``rdis_logits`` / ``rdis_logits_bwd``
and ``rdis_hidden`` / ``rdis_hidden_bwd``. They return the per-token values
(B x T, float32); the masked means are plain torch in :func:`rdis_from_logits`,
:func:`rdis_from_hidden` and :func:`rdis_for_model`.

``Q_diff`` is a constant (no gradient). A ``Q_diff`` shorter than V (a padded
vocabulary, e.g. 50257 ids in a 50304-row lm_head) is zero-padded; a longer one
is an error.
"""

from __future__ import annotations

import contextlib
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

from deft.losses import IGNORE_INDEX, response_logprobs_from_hidden

__all__ = [
    "rdis_from_logits",
    "rdis_from_hidden",
    "rdis_for_model",
    "logprobs_for_model",
    "linear_head",
    "has_linear_head",
    "rdis_naive",
    "rdis_mask",
    "prepare_q",
    "is_zero_sum",
    "ZERO_SUM_TOL",
]

#: Relative tolerance below which ``sum(Q_diff)`` counts as 0 (fast path).
ZERO_SUM_TOL = 1e-6
_CHUNK_BYTES_CPU = 8 << 20
_CHUNK_BYTES_CUDA = 256 << 20
_F32 = torch.float32
_COLS = 4096  # column block of the float32 dot products with Q (float64 across blocks)


# --------------------------------------------------------------------------- helpers


def _chunk_rows(chunk_rows: int, n_cols: int, device: torch.device) -> int:
    if chunk_rows > 0:
        return chunk_rows
    budget = _CHUNK_BYTES_CUDA if device.type == "cuda" else _CHUNK_BYTES_CPU
    return max(1, budget // (4 * max(1, n_cols)))


def _flat_view(x: Tensor) -> Optional[Tensor]:
    """``x`` (..., C) as an (N, C) view, or None when that needs a copy."""
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return None


def _row_blocks(x: Tensor, rows: int):
    """Yield ``(start, stop, block)`` over the rows of ``x`` (..., C) flattened,
    ``block`` a 2-D *view* of flat rows ``start:stop``; never copies ``x`` (a
    non-flattenable layout, e.g. ``logits[:, :-1]``, is walked per sample)."""
    c = x.shape[-1]
    flat = _flat_view(x)
    if flat is not None:
        n = flat.shape[0]
        for s in range(0, n, rows):
            yield s, min(n, s + rows), flat[s : s + rows]
        return
    if x.dim() > 3:  # walk each leading index (a reshape could copy)
        per = x[0].numel() // c
        for i in range(x.shape[0]):
            for s, e, block in _row_blocks(x[i], rows):
                yield i * per + s, i * per + e, block
        return
    t = x.shape[1]
    for b in range(x.shape[0]):
        for s in range(0, t, rows):
            e = min(t, s + rows)
            yield b * t + s, b * t + e, x[b, s:e]


def _outer_into(out: Tensor, g: Tensor, q: Tensor, rows: int) -> None:
    """``out[i] = g[i] * q`` (float32 math) written into ``out`` (N x V, any
    float dtype) chunk by chunk, so a bf16 ``out`` needs no N x V float32 temp."""
    if out.dtype == q.dtype:
        torch.outer(g, q, out=out)
        return
    for s in range(0, out.shape[0], rows):
        out[s : s + rows].copy_(torch.outer(g[s : s + rows], q))


def _qdot(block: Tensor, q: Tensor, out: Tensor) -> None:
    """``out = block @ q`` (block N x V in ``q.dtype``): float32 GEMVs over column
    blocks of ``_COLS`` entries, summed in float64 across blocks, so the error of a
    long (V up to 10^5+), cancelling dot product stays at float32 rounding."""
    v = block.shape[1]
    if v <= _COLS or q.dtype == torch.float64:
        torch.mv(block, q, out=out)
        return
    k, main = divmod(v, _COLS)[0], (v // _COLS) * _COLS
    if block.stride(1) == 1 and block.stride(0) == v:
        # one batched kernel for all full column blocks (few launches matter on GPUs):
        # (N, K, C) x (K, C) -> (N, K) float32 partial sums, added in float64
        blocks = block.as_strided((block.shape[0], k, _COLS), (v, _COLS, 1))  # a view: no copy of the logits
        part = torch.einsum("nkc,kc->nk", blocks, q[:main].view(k, _COLS))
        tot = part.sum(dim=1, dtype=torch.float64)
    else:
        tot = torch.zeros(block.shape[0], dtype=torch.float64, device=block.device)
        for c in range(0, main, _COLS):
            tot += torch.mv(block[:, c : c + _COLS], q[c : c + _COLS])
    if main < v:
        tot += torch.mv(block[:, main:], q[main:])
    out.copy_(tot)


def _budget_rows(n_cols: int, device: torch.device) -> int:
    """Rows of an (R x n_cols) float32 temporary that fit the default chunk budget."""
    return _chunk_rows(0, n_cols, device)


# --------------------------------------------------------------------------- op: from logits


@torch.library.custom_op("deft::rdis_logits", mutates_args=())
def _rdis_logits(logits: Tensor, q: Tensor, qsum: float, chunk_rows: int) -> Tensor:
    """Per-row ``Q.z - qsum * logsumexp(z)`` (float32, shape ``logits.shape[:-1]``).
    ``q`` is float32 of length V; ``qsum == 0.0`` skips the logsumexp."""
    v = logits.shape[-1]
    acc = q.dtype
    out = torch.empty(logits.shape[:-1], dtype=acc, device=logits.device)
    flat_out = out.view(-1)
    if out.numel() == 0:
        return out
    rows = _chunk_rows(chunk_rows, v, logits.device)
    flat = _flat_view(logits)
    if qsum == 0.0 and logits.dtype == acc and flat is not None:
        _qdot(flat, q, flat_out)  # GEMVs straight on the logits, no temporaries
        return out
    for s, e, block in _row_blocks(logits, rows):
        b32 = block.to(acc)
        _qdot(b32, q, flat_out[s:e])
        if qsum != 0.0:
            flat_out[s:e].sub_(torch.logsumexp(b32, dim=-1), alpha=qsum)
    return out


@_rdis_logits.register_fake
def _(logits, q, qsum, chunk_rows):
    return logits.new_empty(logits.shape[:-1], dtype=q.dtype)


@torch.library.custom_op("deft::rdis_logits_bwd", mutates_args=())
def _rdis_logits_bwd(
    grad: Tensor, logits: Optional[Tensor], q: Tensor, qsum: float, shape: List[int], dtype: torch.dtype, chunk_rows: int
) -> Tensor:
    """Gradient of :func:`_rdis_logits` w.r.t. the logits: ``g (q - qsum softmax(z))``.
    ``logits`` may be None when ``qsum == 0`` (it is not needed then)."""
    v = shape[-1]
    out = torch.empty(shape, dtype=dtype, device=grad.device)
    if out.numel() == 0:
        return out
    g = grad.to(q.dtype).reshape(-1)
    flat = out.view(-1, v)
    rows = _chunk_rows(chunk_rows, v, grad.device)
    if qsum == 0.0:
        _outer_into(flat, g, q, rows)
        return out
    assert logits is not None
    for s, e, block in _row_blocks(logits, rows):
        gc = g[s:e]
        p = torch.softmax(block.to(q.dtype), dim=-1)
        p.mul_((gc * -qsum).unsqueeze(1))
        if flat.dtype == p.dtype:
            torch.addr(p, gc, q, out=flat[s:e])
        else:
            flat[s:e].copy_(p.addr_(gc, q))
    return out


@_rdis_logits_bwd.register_fake
def _(grad, logits, q, qsum, shape, dtype, chunk_rows):
    return grad.new_empty(shape, dtype=dtype)


def _logits_setup(ctx, inputs, output):
    logits, q, qsum, chunk_rows = inputs
    ctx.qsum, ctx.chunk_rows = qsum, chunk_rows
    ctx.shape, ctx.dtype = list(logits.shape), logits.dtype
    # the fast path needs nothing of the logits in backward: do not keep them alive
    ctx.save_for_backward(q, logits if qsum != 0.0 else None)


def _logits_backward(ctx, grad):
    q, logits = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    g = torch.ops.deft.rdis_logits_bwd(grad, logits, q, ctx.qsum, ctx.shape, ctx.dtype, ctx.chunk_rows)
    return g, None, None, None


_rdis_logits.register_autograd(_logits_backward, setup_context=_logits_setup)


# --------------------------------------------------------------------------- op: from hidden states


def _u(weight: Tensor, q: Tensor) -> Tensor:
    """``W^T q`` (d,): float32 GEMVs over row blocks of W, summed in float64 across
    blocks (a sum over V terms with heavy cancellation, as in :func:`_qdot`),
    returned in ``q.dtype``. No full-size copy of a bf16 W."""
    v, d = weight.shape
    if q.dtype == torch.float64:
        return torch.mv(weight.to(torch.float64).t(), q)
    rows = max(1, min(_COLS, _budget_rows(d, weight.device)))
    u = torch.zeros(d, dtype=torch.float64, device=weight.device)
    for s in range(0, v, rows):
        u += torch.mv(weight[s : s + rows].to(q.dtype).t(), q[s : s + rows])
    return u.to(q.dtype)


def _qb(q: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
    return None if bias is None else torch.dot(q, bias.to(q.dtype))


@torch.library.custom_op("deft::rdis_hidden", mutates_args=())
def _rdis_hidden(
    hidden: Tensor, weight: Tensor, q: Tensor, bias: Optional[Tensor], qsum: float, chunk_rows: int
) -> Tensor:
    """Per-row ``Q.z - qsum * logsumexp(z)`` for ``z = hidden @ weight^T + bias``
    (float32, shape ``hidden.shape[:-1]``) without materialising the logits
    (``qsum == 0``) or only chunk by chunk (otherwise)."""
    v, d = weight.shape
    acc = q.dtype
    out = torch.empty(hidden.shape[:-1], dtype=acc, device=hidden.device)
    if out.numel() == 0:
        return out
    flat_out = out.view(-1)
    h2 = hidden.reshape(-1, d)
    if qsum == 0.0:
        u = _u(weight, q)
        rows = _budget_rows(d, hidden.device)
        for s in range(0, h2.shape[0], rows):
            torch.mv(h2[s : s + rows].to(acc), u, out=flat_out[s : s + rows])
        qb = _qb(q, bias)
        if qb is not None:
            flat_out.add_(qb)
        return out
    rows = _chunk_rows(chunk_rows, v, hidden.device)
    w32 = weight.to(acc)
    b32 = None if bias is None else bias.to(acc)
    for s in range(0, h2.shape[0], rows):
        h = h2[s : s + rows].to(acc)
        z = torch.mm(h, w32.t()) if b32 is None else torch.addmm(b32, h, w32.t())
        _qdot(z, q, flat_out[s : s + rows])
        flat_out[s : s + rows].sub_(torch.logsumexp(z, dim=-1), alpha=qsum)
        del z
    return out


@_rdis_hidden.register_fake
def _(hidden, weight, q, bias, qsum, chunk_rows):
    return hidden.new_empty(hidden.shape[:-1], dtype=q.dtype)


@torch.library.custom_op("deft::rdis_hidden_bwd", mutates_args=())
def _rdis_hidden_bwd(
    grad: Tensor,
    hidden: Tensor,
    weight: Tensor,
    q: Tensor,
    bias: Optional[Tensor],
    qsum: float,
    chunk_rows: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`_rdis_hidden` w.r.t. hidden, weight and bias (each in
    its input's dtype; a gradient not asked for comes back as an empty tensor)."""
    v, d = weight.shape
    dev = hidden.device
    acc = q.dtype
    g = grad.to(acc).reshape(-1)
    h2 = hidden.reshape(-1, d)
    n = h2.shape[0]
    gh, gw, gb = hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)  # distinct: outputs may not alias
    if qsum == 0.0:
        if need_hidden:
            u = _u(weight, q)
            gh = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev)
            _outer_into(gh.view(-1, d), g, u, _budget_rows(d, dev))
        if need_weight:
            a = torch.zeros(d, dtype=acc, device=dev)  # sum_t g_t h_t
            rows = _budget_rows(d, dev)
            for s in range(0, n, rows):
                a.addmv_(h2[s : s + rows].to(acc).t(), g[s : s + rows])
            gw = torch.empty((v, d), dtype=weight.dtype, device=weight.device)
            _outer_into(gw, q, a, _budget_rows(d, weight.device))
        if need_bias:
            gb = (q * g.sum()).to(bias.dtype)
        return gh, gw, gb
    rows = _chunk_rows(chunk_rows, v, dev)
    w32 = weight.to(acc)
    b32 = None if bias is None else bias.to(acc)
    gh32 = torch.empty((n, d), dtype=acc, device=dev) if need_hidden else None
    gw32 = torch.zeros((v, d), dtype=acc, device=dev) if need_weight else None
    gb32 = torch.zeros(v, dtype=acc, device=dev) if need_bias else None
    for s in range(0, n, rows):
        h = h2[s : s + rows].to(acc)
        gc = g[s : s + rows]
        z = torch.mm(h, w32.t()) if b32 is None else torch.addmm(b32, h, w32.t())
        p = torch.softmax(z, dim=-1)  # dR/dz = g (q - qsum softmax(z))
        del z
        p.mul_((gc * -qsum).unsqueeze(1))
        p.addr_(gc, q)
        if gh32 is not None:
            torch.mm(p, w32, out=gh32[s : s + rows])
        if gw32 is not None:
            gw32.addmm_(p.t(), h)
        if gb32 is not None:
            gb32.add_(p.sum(0))
        del p
    if gh32 is not None:
        gh = gh32.view(hidden.shape).to(hidden.dtype)
    if gw32 is not None:
        gw = gw32.to(weight.dtype)
    if gb32 is not None:
        gb = gb32.to(bias.dtype)
    return gh, gw, gb


@_rdis_hidden_bwd.register_fake
def _(grad, hidden, weight, q, bias, qsum, chunk_rows, need_hidden, need_weight, need_bias):
    gh = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    gw = torch.empty_like(weight) if need_weight else hidden.new_empty(0)
    gb = torch.empty_like(bias) if (need_bias and bias is not None) else hidden.new_empty(0)
    return gh, gw, gb


def _hidden_setup(ctx, inputs, output):
    hidden, weight, q, bias, qsum, chunk_rows = inputs
    ctx.qsum, ctx.chunk_rows = qsum, chunk_rows
    ctx.save_for_backward(hidden, weight, q, bias)


def _hidden_backward(ctx, grad):
    hidden, weight, q, bias = ctx.saved_tensors
    nh, nw, _, nb = ctx.needs_input_grad[:4]
    nb = bool(nb) and bias is not None
    if not (nh or nw or nb):
        return None, None, None, None, None, None
    gh, gw, gb = torch.ops.deft.rdis_hidden_bwd(
        grad, hidden, weight, q, bias, ctx.qsum, ctx.chunk_rows, bool(nh), bool(nw), nb
    )
    return (gh if nh else None), (gw if nw else None), None, (gb if nb else None), None, None


_rdis_hidden.register_autograd(_hidden_backward, setup_context=_hidden_setup)


# --------------------------------------------------------------------------- public API


def prepare_q(q_diff: Any, vocab: int, device: Any = None, dtype: torch.dtype = _F32) -> Tensor:
    """``Q_diff`` as a ``dtype`` (float32) tensor of length ``vocab`` on ``device``, detached
    (a constant), zero-padded when shorter (padded vocabularies). Longer is an
    error: Q_diff and the model must share a vocabulary."""
    q = torch.as_tensor(q_diff).detach()
    if q.dim() != 1:
        raise ValueError(f"q_diff must be 1-D (V,), got shape {tuple(q.shape)}")
    n = q.shape[0]
    if n > vocab:
        raise ValueError(
            f"q_diff has {n} entries but the logits / lm_head have only V={vocab}: Q_diff must be built with "
            f"the policy's tokenizer (a shorter Q_diff is zero-padded, a longer one cannot be)"
        )
    q = q.to(device=device, dtype=dtype)
    if n < vocab:
        q = torch.nn.functional.pad(q, (0, vocab - n))
    return q.contiguous()


def is_zero_sum(q_diff: Tensor, tol: float = ZERO_SUM_TOL) -> Tuple[bool, float]:
    """``(|sum Q| <= tol * sum|Q|, sum Q)``, in float64. Reads the sum back to the
    host (one sync when Q_diff lives on the GPU: keep it on the CPU to avoid it)."""
    q = torch.as_tensor(q_diff).detach().to(torch.float64)
    s = float(q.sum())
    return abs(s) <= tol * float(q.abs().sum()), s


def rdis_mask(labels: Tensor, keep_rows: Optional[Tensor] = None, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The R_dis mask (B x T, bool) of teacher-forced ``labels`` (B x T, ``ignore_index``
    on the prompt and the padding): row ``t`` is 1 when the logits there predict a
    response token, ``labels[t + 1] != ignore_index``. ``keep_rows`` (B, bool):
    only those sequences count (``deft.responses: best``)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    if keep_rows is not None:
        mask &= keep_rows.to(device=mask.device, dtype=torch.bool)[:, None]
    return mask


def _masked_mean(values: Tensor, mask: Tensor, reduction: str) -> Tensor:
    """Per-sample mean of ``values`` (B x T) over ``mask`` rows, then the mean over
    the samples with a non-empty mask (0 when there is none)."""
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the rows {tuple(values.shape)}")
    m = mask.to(device=values.device, dtype=values.dtype)
    count = m.sum(-1)
    valid = count > 0
    # where, not multiplication: masked-out rows never leak into the result
    num = torch.where(m != 0, values * m, values.new_zeros(())).sum(-1)
    per_sample = torch.where(valid, num / count.clamp_min(torch.finfo(values.dtype).tiny), num.new_zeros(()))
    if reduction == "none":
        return per_sample
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return per_sample.sum() / valid.sum().clamp_min(1).to(values.dtype)


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 accumulation; float64 when an input is float64 (gradcheck)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else _F32


def _qsum_for(q_diff: Any, zero_sum_tol: float) -> float:
    zero, s = is_zero_sum(torch.as_tensor(q_diff), zero_sum_tol)
    return 0.0 if zero else s


def rdis_from_logits(
    logits: Tensor,
    q_diff: Any,
    mask: Tensor,
    *,
    reduction: str = "mean",
    zero_sum_tol: float = ZERO_SUM_TOL,
    chunk_rows: int = 0,
) -> Tensor:
    """R_dis from logits (B x T x V, float32/bf16/fp16) and a mask (B x T) aligned
    with the logits rows. Returns a float32 scalar (``reduction="mean"``) or the
    per-sample means (B,) (``"none"``, 0 for empty samples). No B x T x V tensor
    beyond the logits' own gradient is created; the zero-sum path saves nothing."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    qsum = _qsum_for(q_diff, zero_sum_tol)
    q = prepare_q(q_diff, logits.shape[-1], logits.device, _acc_dtype(logits))
    values = torch.ops.deft.rdis_logits(logits, q, qsum, int(chunk_rows))
    return _masked_mean(values, mask, reduction)


def rdis_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    q_diff: Any,
    mask: Tensor,
    bias: Optional[Tensor] = None,
    *,
    reduction: str = "mean",
    zero_sum_tol: float = ZERO_SUM_TOL,
    chunk_rows: int = 0,
) -> Tensor:
    """R_dis for logits ``hidden @ weight^T + bias`` (hidden B x T x d: the
    final-norm output the lm_head consumes; weight V x d) without the logits.
    Gradients flow to hidden, weight and bias."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, d), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, d={hidden.shape[-1]}), got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be (V={weight.shape[0]},), got shape {tuple(bias.shape)}")
    qsum = _qsum_for(q_diff, zero_sum_tol)
    q = prepare_q(q_diff, weight.shape[0], weight.device, _acc_dtype(hidden, weight))
    values = torch.ops.deft.rdis_hidden(hidden, weight, q, bias, qsum, int(chunk_rows))
    return _masked_mean(values, mask, reduction)


def _is_zero3(param: Tensor) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def _forward_replaced(module: torch.nn.Module, fn):
    """Temporarily route ``module(...)`` to ``fn`` (an instance attribute shadows
    the class ``forward``; the module's hooks still run)."""
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield
    finally:
        if had:
            module.forward = old
        else:
            del module.forward


def linear_head(model: torch.nn.Module, instead: str = "use the logits") -> torch.nn.Module:
    """The lm_head of a causal LM whose logits are exactly ``head(hidden_states[-1])``
    (a Linear: weight V x d, optional bias); a ValueError for models that
    transform the logits after it (final-logit softcapping, a logit scale)."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding with a weight (get_output_embeddings())")
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cap = getattr(cfg, "final_logit_softcapping", None)
        scale = getattr(cfg, "logit_scale", None)
        if cap or (scale is not None and scale != 1.0):
            raise ValueError(f"{type(model).__name__} transforms its logits after the lm_head (softcapping / logit scale): {instead}")
    return head


def has_linear_head(model: torch.nn.Module) -> bool:
    try:
        linear_head(model)
        return True
    except ValueError:
        return False


def logprobs_for_model(model: torch.nn.Module, hidden_states: Tensor, labels: Tensor, *, chunk_size: Optional[int] = None,
                       segments: Optional[Tensor] = None, n_segments: Optional[int] = None):
    """:func:`deft.losses.response_logprobs_from_hidden` through a causal LM's
    lm_head (:func:`linear_head`): the summed response log-probs without the
    B x T x V logits. Under ZeRO-3 it runs through the head module, as
    :func:`rdis_for_model` does. ``segments``/``n_segments``: packed rows
    (:func:`deft.losses.response_logprobs`)."""
    head = linear_head(model)

    def fn(h):
        return response_logprobs_from_hidden(h, head.weight, labels, getattr(head, "bias", None), chunk_size=chunk_size,
                                             segments=segments, n_segments=n_segments)

    if not _is_zero3(head.weight):
        return fn(hidden_states)
    with _forward_replaced(head, fn):
        return head(hidden_states)


def rdis_for_model(
    model: torch.nn.Module,
    hidden_states: Tensor,
    q_diff: Any,
    mask: Tensor,
    *,
    reduction: str = "mean",
    zero_sum_tol: float = ZERO_SUM_TOL,
    chunk_rows: int = 0,
) -> Tensor:
    """R_dis for a causal LM from its last hidden states, without its logits.

    ``hidden_states`` must be what the lm_head consumes: the final-norm output.
    For HF Llama and GPT-2, ``model(..., output_hidden_states=True).hidden_states[-1]``
    is exactly that (``lm_head(hidden_states[-1]) == logits``; tested). The head
    is ``model.get_output_embeddings()`` (a Linear: weight V x d, optional bias;
    tied embeddings are fine). Models that transform the logits after the head
    (final-logit softcapping, a logit scale) are refused: use
    :func:`rdis_from_logits` for them.

    DeepSpeed ZeRO-3 (the weight has ``ds_id``, i.e. it is partitioned): the
    computation runs *through the head module* (its ``forward`` is swapped for
    the R_dis computation for the duration of one call), so DeepSpeed's own
    module hooks gather the weight before the forward, release it after, re-gather
    it before the backward and reduce-scatter its gradient, exactly as for a normal
    lm_head call. (``GatheredParameters`` around the call alone would not do:
    the weight is partitioned again by the time backward needs it.) Untested:
    the test suite trains with ZeRO 0-2 only, whose parameters are ordinary
    tensors and take the direct path.
    """
    head = linear_head(model, "use rdis_from_logits")
    weight = head.weight
    bias = getattr(head, "bias", None)
    kw = dict(reduction=reduction, zero_sum_tol=zero_sum_tol, chunk_rows=chunk_rows)
    if not _is_zero3(weight):
        return rdis_from_hidden(hidden_states, weight, q_diff, mask, bias, **kw)

    vocab = getattr(weight, "ds_shape", weight.shape)[0]
    prepare_q(q_diff, vocab)  # shape check before any communication

    def fn(h):  # runs inside the head's DeepSpeed hooks: the weight is gathered here
        return rdis_from_hidden(h, head.weight, q_diff, mask, getattr(head, "bias", None), **kw)

    with _forward_replaced(head, fn):
        return head(hidden_states)


def rdis_naive(logits: Tensor, q_diff: Any, mask: Tensor, *, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The reference formula with a materialised ``log_softmax`` (B x T x V);
    for tests and benchmarks. Same empty-sample rule as the op."""
    dtype = dtype or _F32
    z = logits.to(dtype)
    q = prepare_q(q_diff, logits.shape[-1], logits.device, dtype)
    values = (torch.log_softmax(z, dim=-1) * q).sum(-1)
    m = mask.to(dtype)
    count = m.sum(-1)
    valid = count > 0
    per_sample = torch.where(valid, (values * m).sum(-1) / count.clamp_min(1), values.new_zeros(()))
    return per_sample.sum() / valid.sum().clamp_min(1).to(dtype)
