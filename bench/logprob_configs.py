"""Where the fused LM-head kernel's time goes, and which backward layout is fastest on this GPU.

    python -m bench.logprob_configs             # CUDA: N=8192 (and --n ...), H=2560, V=151,936, bf16, T=0.7,
                                                # then an RL batch: 32K tokens, targets on 512 of every 4096
    python -m bench.logprob_configs --dry-run   # CPU: list the variants, nothing timed

Rows (each timed in the same run; ratio = variant time / the current default's time):
  forward only (gemm | triton)  the forward alone (no autograd graph), each FWD_MODE
  default (FWD_MODE, BWD_MODE)  the module's current settings (now: GEMM forward, GEMM backward): the
                                reference of every ratio
  gemm fwd + gemm bwd           FWD_MODE = BWD_MODE = "gemm": cuBLAS fp32 logits blocks of GEMM_ROWS x GEMM_COLS,
                                Triton row statistics / dz, cuBLAS dh and dW accumulated in fp32; the backward
                                is one pass when the rows with gradient fit GEMM_ROWS
  triton fwd + gemm bwd         the fused forward kernel (logits never leave registers) with the GEMM backward
  gemm, GEMM_COLS 1024 .. 4096  the same with narrower / wider logits blocks (memory vs GEMM shape)
  gemm two-pass                 the same with GEMM_ROWS 4096: at 8K tokens a dh pass and a dW pass, each computing
                                the logits again
  gemm, STATS_TILE (r, c)       the forward's row-statistics kernel with r rows x c columns per step (fewer rows per
                                program: more programs in flight over one logits block)
  gemm, DH_GROUP 2              the one-pass backward's dh GEMM over two vocabulary blocks' dz at a time (half the
                                read-modify-writes of the fp32 dh accumulator, one more dz block of memory)
  triton fwd + atomic split     fused forward, 16-bit weight backward as a dh pass and a dW pass of fused tiles
                                with fp32 atomics into <= SCRATCH_BYTES of scratch (the default before 2026-12-04)
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
    gemm = {"FWD_MODE": "gemm", "BWD_MODE": "gemm"}
    variants = {
        f"default ({L.FWD_MODE} fwd, {L.BWD_MODE} bwd)": {},  # first: the reference of every ratio
        "gemm fwd + gemm bwd": gemm,
        "triton fwd + gemm bwd": {"FWD_MODE": "triton", "BWD_MODE": "gemm"},
        "gemm, GEMM_COLS 1024": {**gemm, "GEMM_COLS": 1024},
        "gemm, GEMM_COLS 3072": {**gemm, "GEMM_COLS": 3072},
        "gemm, GEMM_COLS 4096": {**gemm, "GEMM_COLS": 4096},
        "gemm two-pass (GEMM_ROWS 4096)": {**gemm, "GEMM_ROWS": 4096},
        "gemm, STATS_TILE (4, 512)": {**gemm, "STATS_TILE": (4, 512)},
        "gemm, STATS_TILE (8, 256)": {**gemm, "STATS_TILE": (8, 256)},
        "gemm, DH_GROUP 2": {**gemm, "DH_GROUP": 2},
        "triton fwd + atomic split bwd": {"FWD_MODE": "triton", "BWD_MODE": "atomic"},
    }
    # a variant equal to the current defaults would time the default twice
    return {name: o for i, (name, o) in enumerate(variants.items())
            if i == 0 or any(getattr(L, k) != v for k, v in o.items())}


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

    rows: list[dict[str, Any]] = []
    t_fwds = {}
    for mode in ("gemm", "triton"):
        saved_mode, L.FWD_MODE = L.FWD_MODE, mode
        try:
            t_fwds[mode] = timeit(fwd, warmup=2, iters=iters)
        finally:
            L.FWD_MODE = saved_mode
        rows.append({"case": case, "impl": f"forward only ({mode})", "metric": "time",
                     "value": round(t_fwds[mode] * 1e3, 2), "unit": "ms",
                     "TFLOP/s": round(2 * n_eff * H * V / t_fwds[mode] / 1e12, 1)})
        print(rows[-1], flush=True)
    ref: list[torch.Tensor] | None = None
    t_default, baseline = 1.0, ""
    for name, overrides in variants.items():
        saved = {k: getattr(L, k) for k in overrides}
        try:
            for k, v in overrides.items():
                setattr(L, k, v)
            got = [g.float().clone() for g in step()]
            sec = timeit(step, warmup=1, iters=iters)
            h.grad = w.grad = None  # else the old grads, freed inside step, offset the new ones
            extra, _ = peak_extra_memory(step)
            t_fwd = timeit(fwd, warmup=1, iters=iters)  # this variant's forward alone
        except Exception as e:  # record why a variant cannot run here, and go on with the others
            rows.append({"case": case, "impl": name, "metric": "error", "value": f"{type(e).__name__}: {e}"[:300],
                         "unit": ""})
            print(rows[-1], flush=True)
            continue
        finally:
            for k, v in saved.items():
                setattr(L, k, v)
        if ref is None:  # the first variant that ran is the reference the rows name
            ref, t_default, baseline = got, sec, name
        err = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, ref))
        grads_mib = (n * H + V * H) * 2 / MIB
        rows.append({"case": case, "impl": name, "metric": "time", "value": round(sec * 1e3, 2), "unit": "ms",
                     "TFLOP/s": round(6 * n_eff * H * V / sec / 1e12, 1), "flops_rule": FLOPS_RULE,
                     "forward ms": round(t_fwd * 1e3, 2), "backward ms": round((sec - t_fwd) * 1e3, 2),
                     "extra_minus_grads_mib": round(extra / MIB - grads_mib, 1),
                     "baseline": baseline, "ratio": round(sec / t_default, 3),
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
                ["case", "impl", "value", "TFLOP/s", "forward ms", "backward ms", "extra_minus_grads_mib", "ratio",
                 "grad rel err vs default"])


if __name__ == "__main__":
    main()
