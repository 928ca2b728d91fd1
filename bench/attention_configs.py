"""Which dK/dV tile configuration of kernels.flash_attention is fastest on this GPU (H200: the production
default is chosen from this table).

    python -m bench.attention_configs             # CUDA: 32K packed tokens, GQA 32/8, head_dim 128, bf16
    python -m bench.attention_configs --dry-run   # CPU: list the candidates, nothing timed

Candidates are the dK/dV tiles that compile without register spills for sm_90 under both Triton 3.6
(torch 2.11) and 3.9 (kernels.aot). Each row times forward + backward of causal varlen attention
(4 documents of 8K tokens) with the candidate swapped into kernels.flash_attention.CONFIG, checks dQ/dK/dV
against the current default, and reports the ratio to the default's time.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib

import torch

from bench.common import print_table, save_results, timeit

# (bwd_block_m, bwd_block_n, bwd_warps, bwd_stages)
CANDIDATES = [(64, 64, 8, 1), (32, 64, 8, 2), (64, 64, 8, 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--out", default=None, help="directory for attention_configs-gpu.json")
    args = ap.parse_args()
    fa = importlib.import_module("kernels.flash_attention")  # the module (the package exports the function)
    default = fa.CONFIG
    if args.dry_run or not torch.cuda.is_available():
        current = (default.bwd_block_m, default.bwd_block_n, default.bwd_warps, default.bwd_stages)
        rows = [{"bwd tiles (m, n, warps, stages)": str(c), "default": c == current} for c in CANDIDATES]
        print_table("bench.attention_configs --dry-run (nothing timed)", rows, list(rows[0]))
        return

    torch.manual_seed(0)
    T, docs = args.tokens, 4
    cu = torch.arange(0, T + 1, T // docs, dtype=torch.int32, device="cuda")
    q = torch.randn(T, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(T, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(T, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(T, 32, 128, device="cuda", dtype=torch.bfloat16)

    def step() -> tuple[torch.Tensor, ...]:
        for t in (q, k, v):
            t.grad = None
        out, _ = fa.flash_attention(q, k, v, cu, backend="triton")
        out.backward(g)
        return q.grad.clone(), k.grad.clone(), v.grad.clone()

    ref = step()
    t_default = timeit(step, warmup=2, iters=10)
    rows = []
    for m, n, w, s in CANDIDATES:
        fa.CONFIG = dataclasses.replace(default, bwd_block_m=m, bwd_block_n=n, bwd_warps=w, bwd_stages=s)
        try:
            got = step()
            err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, ref))
            t = timeit(step, warmup=2, iters=10)
        finally:
            fa.CONFIG = default
        # FlashAttention convention: fwd 2 matmuls + bwd 5, 2 flops per multiply-add, causal halves S^2
        flops = 7 * 2 * docs * (T // docs) ** 2 / 2 * 32 * 128
        rows.append({"case": f"{T} tok, 4 docs, fwd+bwd", "impl": f"bwd tiles {m},{n},{w},{s}",
                     "metric": "time", "value": round(t * 1e3, 3), "unit": "ms",
                     "TFLOP/s": round(flops / t / 1e12, 1), "baseline": "default", "ratio": round(t / t_default, 3),
                     "ratio_meaning": "candidate time / default time (<1: candidate faster)",
                     "grad rel err vs default": f"{err:.1e}"})
    save_results("attention_configs", rows, out_dir=args.out)
    print_table(f"flash_attention dK/dV tiles (m, n, warps, stages), default {default.bwd_block_m},"
                f"{default.bwd_block_n},{default.bwd_warps},{default.bwd_stages}", rows,
                ["impl", "value", "TFLOP/s", "ratio", "grad rel err vs default"])


if __name__ == "__main__":
    main()
