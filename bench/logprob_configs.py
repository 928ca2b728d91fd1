"""Where the fused LM-head kernel's time goes, and which backward layout is fastest on this GPU.

    python -m bench.logprob_configs             # CUDA: N=8192 (and --n ...), H=2560, V=151,936, bf16, T=0.7,
                                                # then an RL batch: 32K tokens, targets on 512 of every 4096
    python -m bench.logprob_configs --dry-run   # CPU: list the variants, nothing timed

Rows (each timed in the same run; ratio = variant time / the current default's time):
  forward only                 the forward kernel alone (no autograd graph)
  split (default)              16-bit weight: a dh pass and a dW pass, each recomputing the logits
                               (fp32 atomics into <= SCRATCH_BYTES of scratch)
  split dh 64x256 / dW 256x64  the same passes with tiles long along the reduced dimension (half the atomics)
  fused (fp32 dW scratch)      one pass, one recompute, atomics into an fp32 copy of dW (V*H*4 bytes extra)
  gemm                         BWD_MODE="gemm": cuBLAS logits blocks -> Triton dz blocks -> cuBLAS dh / dW
                               with fp32 output, two passes, no atomics
Every variant's dh/dW is compared with the default's (relative L2 error).
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

import torch

from bench.common import peak_extra_memory, print_table, save_results, timeit
from bench.logprob import FLOPS_RULE, MIB, H, T, V, _inputs


def _variants(L: Any) -> dict[str, dict[str, Any]]:
    K = L.KernelConfig
    return {
        "split (default)": {},
        "split dh 64x256 / dW 256x64": {
            "BWD_DH_CONFIG": K(block_m=64, block_n=256, block_k=32, num_warps=8, num_stages=3, block_h=64, group_m=8),
            "BWD_DW_CONFIG": K(block_m=256, block_n=64, block_k=32, num_warps=8, num_stages=3, block_h=64, group_m=8),
        },
        "fused (fp32 dW scratch)": {"SCRATCH_BYTES": 4 * V * H + (1 << 20)},
        "gemm (cuBLAS blocks, no atomics)": {"BWD_MODE": "gemm"},
    }


def _measure(L: Any, n: int, iters: int, variants: dict[str, dict[str, Any]], device: str = "cuda",
             dtype: torch.dtype = torch.bfloat16, response: int = 0) -> list[dict[str, Any]]:
    """response > 0: an RL batch of 4096-token sequences whose last `response` tokens alone carry
    targets (the prompt tokens are ignore_index, as the trainer passes them)."""
    h, w, t = _inputs(n, H, V, dtype, device)
    case = f"N={n}"
    if response:
        prompt = (torch.arange(n, device=t.device) % 4096) < 4096 - response
        t[prompt] = -100
        case = f"N={n}, {response} response tokens per 4096"
    n_eff = int((t != -100).sum())  # FLOPs count the rows with targets

    def fwd() -> None:
        with torch.no_grad():
            L.linear_logprob_entropy(h, w, t, T, backend="triton")

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        h.grad = w.grad = None
        lp, ent = L.linear_logprob_entropy(h, w, t, T, backend="triton")
        (lp.sum() + ent.sum()).backward()
        return h.grad, w.grad

    t_fwd = timeit(fwd, warmup=2, iters=iters)
    rows: list[dict[str, Any]] = [{"case": case, "impl": "forward only", "metric": "time",
                                   "value": round(t_fwd * 1e3, 2), "unit": "ms",
                                   "TFLOP/s": round(2 * n_eff * H * V / t_fwd / 1e12, 1)}]
    ref: list[torch.Tensor] | None = None
    t_default: float | None = None
    for name, overrides in variants.items():
        saved = {k: getattr(L, k) for k in overrides}
        try:
            for k, v in overrides.items():
                setattr(L, k, v)
            got = [g.float().clone() for g in step()]
            sec = timeit(step, warmup=1, iters=iters)
            extra, _ = peak_extra_memory(step)
        except Exception as e:  # record why a variant cannot run here, and go on with the others
            rows.append({"case": case, "impl": name, "metric": "error", "value": f"{type(e).__name__}: {e}"[:300],
                         "unit": ""})
            print(rows[-1], flush=True)
            continue
        finally:
            for k, v in saved.items():
                setattr(L, k, v)
        ref = ref or got
        t_default = t_default or sec
        err = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, ref))
        grads_mib = (n * H + V * H) * 2 / MIB
        rows.append({"case": case, "impl": name, "metric": "time", "value": round(sec * 1e3, 2), "unit": "ms",
                     "TFLOP/s": round(6 * n_eff * H * V / sec / 1e12, 1), "flops_rule": FLOPS_RULE,
                     "backward ms": round((sec - t_fwd) * 1e3, 2),
                     "extra_minus_grads_mib": round(extra / MIB - grads_mib, 1),
                     "baseline": "split (default)", "ratio": round(sec / t_default, 3),
                     "ratio_meaning": "variant time / default time (<1: variant faster)",
                     "grad rel err vs default": f"{err:.1e}"})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--n", type=int, nargs="+", default=[8192])
    ap.add_argument("--rl-n", type=int, default=32768, help="tokens of the prompt-heavy RL case (0: skip it)")
    ap.add_argument("--rl-response", type=int, default=512, help="response tokens per 4096-token sequence")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=None, help="directory for logprob_configs-gpu.json")
    args = ap.parse_args()
    L = importlib.import_module("kernels.logprob")  # the module (the package exports the function)
    variants = _variants(L)
    if args.dry_run or not torch.cuda.is_available():
        rows = [{"variant": k, "overrides": ", ".join(v) or "-"} for k, v in variants.items()]
        print_table("bench.logprob_configs --dry-run (nothing timed)", rows, ["variant", "overrides"])
        return

    rows = [r for n in args.n for r in _measure(L, n, args.iters, variants)]
    if args.rl_n:
        rows += _measure(L, args.rl_n, args.iters, variants, response=args.rl_response)
    save_results("logprob_configs", rows, out_dir=args.out)
    print_table("kernels.linear_logprob_entropy backward layouts (fwd+bwd, bf16, T=0.7)", rows,
                ["case", "impl", "value", "TFLOP/s", "backward ms", "extra_minus_grads_mib", "ratio",
                 "grad rel err vs default"])


if __name__ == "__main__":
    main()
