"""Benchmark: the R_dis custom op (deft.ops) against the naive formula, forward + backward.

Naive: ``(log_softmax(z.float()) * Q).sum(-1)``, masked mean (deft.ops.rdis_naive), with the
log-softmax materialised; from hidden states the naive path first computes the logits
``F.linear(h, W)``. Variants, all on the same inputs in one run:

  logits  naive     naive formula on the logits (B*T x V)
  logits  op-fast   rdis_from_logits, zero-sum Q_diff (Q+/|Q+| - Q-/|Q-|): GEMV forward, outer-product backward
  logits  op-exact  rdis_from_logits, Q with sum 0.5 (general path: chunked logsumexp, softmax recomputed in backward)
  hidden  naive     logits = h W^T, then the naive formula; gradients to h and W
  hidden  op-fast   rdis_from_hidden, zero-sum Q_diff: u = W^T Q, h.u; no V-sized per-token tensor at all
  hidden  op-exact  rdis_from_hidden, Q with sum 0.5: logits computed chunk by chunk, recomputed in backward

Inputs: float32 (``--dtype bf16`` for bf16 inputs), logits ~ N(0, 4), h ~ N(0, 1), W ~ N(0, 1/d);
Q+ and Q- from Zipf-like random counts; rows = B*T with T = 512 and a 128-token prompt masked out.
Timed: forward + backward (gradients w.r.t. the logits, or h and W), best of --repeats after one
warm-up. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the inputs; on CPU each
variant runs in its own subprocess and reports the peak RSS (``ru_maxrss``) above the RSS after
creating its inputs (with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the RSS). ``NV`` = one B*T x V float32 tensor; the logits' own gradient (an output) is
1 NV, the hidden-state variants' gradients are V x d + B*T x d.
Exactness: relative error of R_dis (|got - ref| / |ref|) and of the gradients (max abs error /
max abs) against the naive formula in float64 on the same (float32-rounded) inputs.

Run:  python benches/bench_ops.py --quick                 (CPU: V=32k, B*T=1024, d=768, 1 thread)
      python benches/bench_ops.py --device cuda           (full grid: V 32k/128k x B*T 1024/4096 x d 768/2048)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

T = 512
PROMPT = 128
VARIANTS = ("naive", "op-fast", "op-exact")


def make_inputs(source, v, n, d, dtype, device, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    # a Zipf unigram distribution (random rank order); Q+ and Q- are token counts of 2M-token
    # corpora drawn from two perturbations of it, the logits are log-unigram plus noise: R_dis
    # is then O(0.1), as for a real policy, rather than the ~0 of unrelated random data
    rank = torch.randperm(v, generator=g).double() + 1
    log_uni = -1.1 * rank.log()
    log_uni -= log_uni.logsumexp(0)

    def counts():
        lam = 2e6 * (log_uni + 0.5 * torch.randn(v, generator=g, dtype=torch.float64)).softmax(0)
        return torch.poisson(lam, generator=g)

    counts_pos, counts_neg = counts(), counts()
    qp, qn = counts_pos / counts_pos.sum(), counts_neg / counts_neg.sum()
    q_fast = (qp - qn).float()  # what deft distribution writes (float32, sums to ~0)
    q_exact = (qp - 0.5 * qn).float()
    b = max(1, n // T)
    t = n // b
    mask = torch.zeros(b, t, device=device)
    mask[:, min(PROMPT, t - 1):] = 1
    torch.manual_seed(seed)
    if source == "logits":
        z = torch.randn(b, t, v, device=device).mul_(2).add_(log_uni.float().to(device)).to(dtype)
        return dict(z=z.requires_grad_()), q_fast, q_exact, mask
    h = torch.randn(b, t, d, device=device).to(dtype)
    h[..., 0] = 1.0  # a constant feature, so W[:, 0] carries the log-unigram bias
    w = (torch.randn(v, d, device=device) / d**0.5)
    w[:, 0] = log_uni.float().to(device)
    w = w.to(dtype)
    return dict(h=h.requires_grad_(), w=w.requires_grad_()), q_fast, q_exact, mask


def step_fn(source, variant, tensors, q_fast, q_exact, mask):
    import torch.nn.functional as F

    from deft.ops import rdis_from_hidden, rdis_from_logits, rdis_naive

    q = q_exact if variant == "op-exact" else q_fast
    if source == "logits":
        z = tensors["z"]
        if variant == "naive":
            return lambda: rdis_naive(z, q, mask)
        return lambda: rdis_from_logits(z, q, mask)
    h, w = tensors["h"], tensors["w"]
    if variant == "naive":
        return lambda: rdis_naive(F.linear(h, w), q, mask)
    return lambda: rdis_from_hidden(h, w, q, mask)


def reference(source, tensors, q, mask):
    """float64 naive value and gradients."""
    import torch
    import torch.nn.functional as F

    from deft.ops import rdis_naive

    t64 = {k: x.detach().double().requires_grad_() for k, x in tensors.items()}
    if source == "logits":
        r = rdis_naive(t64["z"], q, mask, dtype=torch.float64)
    else:
        r = rdis_naive(F.linear(t64["h"], t64["w"]), q, mask, dtype=torch.float64)
    grads = torch.autograd.grad(r, list(t64.values()))
    return float(r.detach()), list(grads)


def errors(val, grads, ref):
    rv, rg = ref
    err_v = abs(val - rv) / max(abs(rv), 1e-30)
    err_g = max(float((a.double() - e).abs().max() / e.abs().max().clamp_min(1e-30)) for a, e in zip(grads, rg))
    return err_v, err_g


def run_variant(source, variant, tensors, q_fast, q_exact, mask, repeats, cuda):
    """(best seconds, value, grads) of forward + backward."""
    import torch

    fn = step_fn(source, variant, tensors, q_fast, q_exact, mask)
    leaves = list(tensors.values())
    best, val, grads = float("inf"), None, None
    for i in range(repeats + 1):
        for x in leaves:
            x.grad = None
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = fn()
        r.backward()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i > 0:
            best = min(best, dt)
        val = float(r.detach())
    grads = [x.grad for x in leaves]
    return best, val, grads


def warm_up(source) -> None:
    """Run every variant once on tiny inputs (lazy imports, op dispatch set-up)."""
    tensors, q_fast, q_exact, mask = make_inputs(source, 64, 8, 16, _dtype("fp32"), "cpu")
    for variant in VARIANTS:
        step_fn(source, variant, tensors, q_fast, q_exact, mask)().backward()


def _dtype(name):
    import torch

    return dict(fp32=torch.float32, bf16=torch.bfloat16)[name]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec: dict) -> None:
    """One CPU variant in its own process: time, peak RSS above the inputs, errors."""
    import torch

    torch.set_num_threads(spec["threads"])
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16)[spec["dtype"]]
    tensors, q_fast, q_exact, mask = make_inputs(spec["source"], spec["v"], spec["n"], spec["d"], dtype, "cpu")
    warm_up(spec["source"])  # imports and first-call set-up happen before the baseline

    base = rss_mib()
    best, val, grads = run_variant(spec["source"], spec["variant"], tensors, q_fast, q_exact, mask, spec["repeats"], False)
    peak = rss_mib() - base
    q = q_exact if spec["variant"] == "op-exact" else q_fast
    grads = [g.clone() for g in grads]
    for x in tensors.values():
        x.grad = None
    err_v, err_g = errors(val, grads, reference(spec["source"], tensors, q, mask))
    print(json.dumps(dict(seconds=best, peak_mib=peak, err_v=err_v, err_g=err_g)))


def cases(args):
    out = []
    for v in args.vocab:
        for n in args.rows:
            out.append(("logits", v, n, 0))
            for d in args.dim:
                out.append(("hidden", v, n, d))
    return out


def fmt_row(source, v, n, d, variant, res, nv_mib):
    dd = f"d={d:<5}" if d else " " * 7
    return (f"{source:<6} V={v:<7} B*T={n:<5} {dd} {variant:<9} {res['seconds'] * 1e3:9.1f} ms   "
            f"peak +{res['peak_mib']:8.1f} MiB ({res['peak_mib'] / nv_mib:4.2f} NV)   "
            f"err R {res['err_v']:.1e}  grad {res['err_g']:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--quick", action="store_true", help="V=32768, B*T=1024, d=768 (the CPU default)")
    ap.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes (default 32768 131072)")
    ap.add_argument("--rows", type=int, nargs="+", help="B*T values (default 1024 4096)")
    ap.add_argument("--dim", type=int, nargs="+", help="hidden sizes (default 768 2048)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--repeats", type=int, help="timed repeats after one warm-up (default 3 CPU, 10 CUDA)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--inprocess", action="store_true",
                    help="CPU: run all variants in this process (no peak memory; for checking the script)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    import torch

    cuda = args.device.startswith("cuda")
    quick = args.quick or not cuda
    args.vocab = args.vocab or ([32768] if quick else [32768, 131072])
    args.rows = args.rows or ([1024] if quick else [1024, 4096])
    args.dim = args.dim or ([768] if quick else [768, 2048])
    args.repeats = args.repeats or (10 if cuda else 3)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        dev_name = torch.cuda.get_device_name()
    else:
        dev_name = f"CPU, {args.threads} thread(s)"
    print(f"torch {torch.__version__}, {dev_name}, inputs {args.dtype}, forward + backward, best of {args.repeats}")
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16)[args.dtype]
    import deft.ops  # noqa: F401

    # a fixed glibc mmap threshold: freed large blocks go back to the OS, so peak RSS follows the
    # live tensors (the default dynamic threshold keeps freed chunks in the heap and inflates it)
    child_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    results = {}
    for source, v, n, d in cases(args):
        nv_mib = n * v * 4 / 2**20
        if cuda or args.inprocess:
            tensors, q_fast, q_exact, mask = make_inputs(source, v, n, d, dtype, args.device)
            refs = {}
            for variant in VARIANTS:
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                best, val, grads = run_variant(source, variant, tensors, q_fast, q_exact, mask, args.repeats, cuda)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
                grads = [g.clone() for g in grads]
                for x in tensors.values():
                    x.grad = None
                key = "exact" if variant == "op-exact" else "fast"
                if key not in refs:
                    refs[key] = reference(source, tensors, q_exact if key == "exact" else q_fast, mask)
                err_v, err_g = errors(val, grads, refs[key])
                del grads
                res = dict(seconds=best, peak_mib=peak, err_v=err_v, err_g=err_g)
                results[(source, v, n, d, variant)] = res
                print(fmt_row(source, v, n, d, variant, res, nv_mib), flush=True)
            del tensors, refs
            if cuda:
                torch.cuda.empty_cache()
        else:
            for variant in VARIANTS:
                spec = dict(source=source, v=v, n=n, d=d, variant=variant, dtype=args.dtype,
                            repeats=args.repeats, threads=args.threads)
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                     capture_output=True, text=True, env=child_env)
                if out.returncode != 0:
                    raise SystemExit(out.stderr)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results[(source, v, n, d, variant)] = res
                print(fmt_row(source, v, n, d, variant, res, nv_mib), flush=True)

    elem = torch.finfo(dtype).bits // 8
    print("\nsummary (speed-up = naive / op, forward + backward):")
    for source, v, n, d in cases(args):
        naive, fast, exact = (results[(source, v, n, d, k)] for k in VARIANTS)
        nv_mib = n * v * 4 / 2**20
        tag = f"{source:<6} V={v:<7} B*T={n:<5}" + (f" d={d:<5}" if d else " " * 8)
        if source == "logits":
            extra = fast["peak_mib"] - n * v * elem / 2**20  # beyond the logits' own gradient
            verdict = "met" if naive["seconds"] / fast["seconds"] >= 3 and extra < 0.5 * nv_mib else "NOT met"
            target = f"target >= 3x and no extra NV: {verdict} (fast peak beyond the gradient {extra / nv_mib:+.2f} NV)"
        else:
            extra = fast["peak_mib"] - (v * d + n * d) * elem / 2**20  # beyond the W and h gradients
            verdict = "met" if extra < 0.5 * nv_mib else "NOT met"
            target = (f"target no V-sized per-token tensor: {verdict} "
                      f"(fast peak beyond the W, h gradients {extra / nv_mib:+.2f} NV)")
        errs = max(fast["err_v"], exact["err_v"])
        print(f"{tag} op-fast {naive['seconds'] / fast['seconds']:6.2f}x  op-exact "
              f"{naive['seconds'] / exact['seconds']:6.2f}x  peak naive/fast/exact "
              f"{naive['peak_mib'] / nv_mib:.2f}/{fast['peak_mib'] / nv_mib:.2f}/{exact['peak_mib'] / nv_mib:.2f} NV  "
              f"max rel err R {errs:.1e} (<= 1e-5: {'yes' if errs <= 1e-5 else 'NO'})  {target}")


if __name__ == "__main__":
    main()
