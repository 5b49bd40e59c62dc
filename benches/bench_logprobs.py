"""Benchmark: label log-probs from the hidden states, chunk by chunk (train.logprobs: hidden),
against the logits path (train.logprobs: logits), forward and backward of the lm_head + log-prob sum.

Shapes: d = 576 (SmolLM2-135M), T = 512, B = 4 sequences (2 pairs), half of each sequence response;
V = 49,152 (SmolLM2) and 128,256 (Llama 3). float32 on CPU (a GPU run uses --device cuda and reports
torch.cuda.max_memory_allocated). Each measurement is a fresh subprocess (its peak RSS over the RSS
after the inputs are built is its own); variants interleaved, --repeats rounds; reported: median
time (of a warm second run) and the median peak memory of the first run over the inputs, and hidden /
logits ratios.

Run:  python benches/bench_logprobs.py [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
from deft.losses import response_logprobs, response_logprobs_from_hidden
mode, V, T, B, d, dev = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
torch.manual_seed(0)
h = torch.randn(B, T, d, device=dev, requires_grad=True)
W = (torch.randn(V, d, device=dev) * 0.02).requires_grad_()
labels = torch.randint(0, V, (B, T), device=dev)
labels[:, : T // 2] = -100
def run():
    if mode == "logits":
        lp, _ = response_logprobs(torch.nn.functional.linear(h, W), labels)
    else:
        lp, _ = response_logprobs_from_hidden(h, W, labels)
    lp.sum().backward()
    h.grad = W.grad = None
# peak memory of the first run over what the inputs hold (ru_maxrss never decreases, so it is taken
# before any run), then the time of a second, warm run
if dev == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
run()
if dev == "cuda":
    torch.cuda.synchronize(); peak = torch.cuda.max_memory_allocated() - base
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
t0 = time.perf_counter(); run()
if dev == "cuda":
    torch.cuda.synchronize()
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "peak_bytes": peak}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--d", type=int, default=576)
    args = ap.parse_args()
    for V in (49152, 128256):
        res = {"logits": [], "hidden": []}
        for _ in range(args.repeats):
            for mode in ("logits", "hidden"):
                r = subprocess.run([sys.executable, "-c", CHILD, mode, str(V), str(args.T), str(args.B), str(args.d), args.device],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    sys.exit(r.stderr[-2000:])
                res[mode].append(json.loads(r.stdout.strip().splitlines()[-1]))
        med = {m: (statistics.median(x["seconds"] for x in v), statistics.median(x["peak_bytes"] for x in v)) for m, v in res.items()}
        for m, (t, p) in med.items():
            print(f"V={V:>7,} B={args.B} T={args.T} d={args.d} {args.device}  {m:6s}  {t * 1000:8.1f} ms  peak +{p / 2**20:8.1f} MiB")
        (tl, pl), (th, ph) = med["logits"], med["hidden"]
        print(f"V={V:>7,}  hidden / logits: time {th / tl:.2f}x, peak memory {ph / max(pl, 1):.2f}x")


if __name__ == "__main__":
    main()
