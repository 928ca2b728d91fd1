"""Which backward configuration of kernels.flash_attention is fastest on this GPU (H200: the production
default is chosen from this table).

    python -m bench.attention_configs             # CUDA: 32K packed tokens, GQA 32/8, head_dim 128, bf16
    python -m bench.attention_configs --dry-run   # CPU: list the candidates, nothing timed

Each candidate overrides some fields of kernels.flash_attention.CONFIG: bwd_split (dV and dK by two passes, split_*
tiles) or one joint dK/dV pass (bwd_* tiles), the dQ kernel's tiles (dq_*), the forward's tiles (fwd_*),
bwd_fused_dq (dQ by atomics inside the dK pass, no dQ kernel), or auto_backend (what backend="auto" runs: PyTorch's
FlashAttention-2 varlen kernels in place of ours, adopted where they win). Every candidate compiles for sm_90
without register spills and within shared memory under Triton 3.9 (tests/kernels/test_flash_attention.py checks this
on CPU); under Triton 3.6, the GPU image's, split 64x128 w8 s2 spills 28 B and the joint 64x64 s2 180 B. Each row
times forward + backward of causal varlen attention (4 documents of 8K tokens), checks dQ/dK/dV against the
default's, and reports the ratio to the default's time; torch SDPA (and flash-attn, when installed) on the same
documents is the same-run baseline. Worker processes compile the candidates in parallel first (Triton's disk cache
then serves the timing loop); candidates still untimed after --budget-s seconds are skipped, never run late.
Expected wall time on an H200 with 16 CPU cores: about 25-40 s (start-up 5 s, parallel compiles 10-20 s, timing 5
s).
--save-tuned DIR records the winner for this GPU (DIR/<GPU name>.json, kernels/tuned.py's format; bench/gpu_suite.sh
does, so its later steps run with it): copied into kernels/gpu_configs/ it becomes that GPU's setting. Only changes that
hold on every GPU belong in the TritonConfig defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import multiprocessing as mp
import os
import time
from multiprocessing.pool import AsyncResult, Pool
from typing import Any

import torch

from bench.common import print_table, save_results, save_tuned, timeit
from kernels import tuned

# (label, CONFIG field overrides); the first is the current default, the reference of every ratio
CANDIDATES: list[tuple[str, dict[str, Any]]] = [
    ("default", {}),
    # not a tile: flash_attention(backend="auto") runs PyTorch's FlashAttention-2 varlen kernels instead of ours
    ("auto: torch varlen_attn (FA2)", dict(auto_backend="varlen_attn")),
    # plain loads first: a TMA candidate that faults would leave the CUDA context unusable for the rest
    # dV and dK in separate passes (bwd_split), query rows m x key rows n, warps, stages
    ("split dV pass 2 stages", dict(bwd_split=True, split_dv_stages=2)),  # cp.async for the dV pass only
    # split, the query range as masked / unmasked / masked loops (bwd_three_loops)
    ("split 3-loop 32x128 w8 s2", dict(bwd_split=True, bwd_three_loops=True, split_block_m=32, split_block_n=128,
                                       split_warps=8, split_stages=2)),
    ("split 3-loop 32x64 w4 s1", dict(bwd_split=True, bwd_three_loops=True, split_block_m=32, split_block_n=64,
                                      split_warps=4, split_stages=1)),
    # forward tiles (query rows m x key rows n): the forward is in every timed step
    ("fwd 128x128 w8 s2", dict(fwd_block_m=128, fwd_block_n=128, fwd_warps=8, fwd_stages=2)),
    ("fwd 128x128 w8 s3", dict(fwd_block_m=128, fwd_block_n=128, fwd_warps=8, fwd_stages=3)),
    # forward and dQ programs from the last query block down (causal: longest first, no heavy last wave)
    ("q blocks heavy-first", dict(q_heavy_first=True)),
    # dQ inside the dK pass, each tile's share added by TMA reduce (cp.reduce.async.bulk.tensor, FlashAttention-3's
    # way) instead of per-thread atomics (the "split fused-dQ" of run 7, 1.20x): 6 matmuls per tile pair in the
    # whole backward instead of 8, no dQ kernel. Spill-free under Triton 3.6 and 3.9 (64x128 s2 spills under 3.6)
    ("split TMA fused-dQ s1", dict(bwd_split=True, bwd_tma=True, bwd_fused_dq=True, split_stages=1)),
    ("split TMA fused-dQ 32x128 s2", dict(bwd_split=True, bwd_tma=True, bwd_fused_dq=True, split_block_m=32,
                                          split_stages=2)),
    ("split TMA fused-dQ 32x128 s3", dict(bwd_split=True, bwd_tma=True, bwd_fused_dq=True, split_block_m=32,
                                          split_stages=3)),
    ("split TMA fused-dQ 64x64 s2", dict(bwd_split=True, bwd_tma=True, bwd_fused_dq=True, split_block_n=64,
                                         split_stages=2)),
    ("joint TMA fused-dQ 32x64 s2", dict(bwd_split=False, bwd_tma=True, bwd_fused_dq=True, bwd_block_m=32,
                                         bwd_block_n=64, bwd_warps=8, bwd_stages=2)),
    # query / dO / lse / delta tiles of the dK/dV kernel by TMA (bwd_tma): no address or staging registers, so
    # the split passes pipeline at 2-3 stages spill-free under Triton 3.6 and 3.9 (plain loads spill there)
    ("split TMA s2", dict(bwd_split=True, bwd_tma=True, split_stages=2)),
    ("split TMA s3", dict(bwd_split=True, bwd_tma=True, split_stages=3)),
    ("split TMA 32x128 s3", dict(bwd_split=True, bwd_tma=True, split_block_m=32, split_stages=3)),
    ("joint TMA 64x64 s3", dict(bwd_split=False, bwd_tma=True, bwd_block_m=64, bwd_block_n=64, bwd_warps=8,
                                bwd_stages=3)),
    # K / V tiles of the forward and the dQ kernel by TMA: 179 / 205 registers instead of 255 / 246 (Triton 3.6)
    ("fwd + dQ TMA", dict(fwd_tma=True, dq_tma=True)),
    ("fwd + dQ TMA, dQ s3", dict(fwd_tma=True, dq_tma=True, dq_stages=3)),
    ("all TMA, split s2", dict(fwd_tma=True, dq_tma=True, bwd_split=True, bwd_tma=True, split_stages=2)),
    ("all TMA, split s3, dQ s3", dict(fwd_tma=True, dq_tma=True, dq_stages=3, bwd_split=True, bwd_tma=True,
                                      split_stages=3)),
]
# Dropped after run 7 (times / the then split s2 default, which the current split s1 default ran 0.968x): split
# 32x128 w8 s2 1.061x, split 32x64 w4 s2 1.011x, split fused-dQ 32x128 w8 s2 1.198x, joint 64x64 w8 s1 1.117x,
# joint fused-dQ 32x64 w8 s2 1.535x, and (for the TMA fused-dQ rows) the then default split 64x128 s2, dq 128x128
# s1 1.018x and joint 64x64 w8 s2 1.091x. Spill (not candidates): with TMA, joint 64x128 / 32x128 and split 128x128
# (Triton 3.6 and 3.9).
# H200, 32K tokens (commit 3b8a5a4, head-major lse/delta, default split s2): split s1 0.97x (now the default),
# split 32x64 w4 s2 1.01x, split 32x128 1.06x, dq 128x128 1.02x, split fused-dQ 1.20x, joint 64x64 s2 1.09x.
# H200, 32K tokens (commit 0ae34af, lse/delta still token-major): split 64x128 w8 s2 0.94x the split s1 default,
# split 32x64 w4 s2 0.94x, split 32x128 w8 s2 1.04x, split fused-dQ 1.16x, dq 128x128 1.0x, joint 64x64 s2 1.04x.
# H200, 32K tokens (commit 68fad31), joint pass only: none of 11 tile variants (dK/dV 32x64 / 64x64, dQ 128x32 /
# 128x64 / 64x64, fused dQ) beat 64x64 w8 s2 (31.1 ms fwd+bwd, 0.46x SDPA) by more than noise.
# Not candidates: a joint dK/dV tile with 128 key rows, and 4-warp joint tiles, spill under both Triton 3.6 and
# 3.9 with head_dim 128 (two fp32 [128, 128] accumulators take 128 registers per thread at 8 warps); split
# 128x128, split 64x128 with 3 stages and 4-warp 64x128 tiles spill too; split 3-loop 64x128 keeps 8 B of stack
# under Triton 3.9 (2 stages: spills).

DOCS = 4
HQ, HKV, D = 32, 8, 128


def _fa() -> Any:
    return importlib.import_module("kernels.flash_attention")  # the module (the package exports the function)


def candidate_configs() -> list[tuple[str, Any]]:
    """(label, full TritonConfig) of every candidate, against the module's current CONFIG."""
    default = _fa().CONFIG
    return [(label, dataclasses.replace(default, **over)) for label, over in CANDIDATES]


def _inputs(T: int) -> tuple[torch.Tensor, ...]:
    """cu_seqlens of DOCS equal documents, q, k, v (requiring grad) and the output gradient."""
    cu = torch.arange(0, T + 1, T // DOCS, dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(T, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (HQ, HKV, HKV))
    return cu, q, k, v, torch.randn(T, HQ, D, device="cuda", dtype=torch.bfloat16)


def _step(fa: Any, cu: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
          backend: str = "auto") -> tuple[torch.Tensor, ...]:
    for t in (q, k, v):
        t.grad = None
    out, _ = fa.flash_attention(q, k, v, cu, backend=backend)
    out.backward(g)
    return q.grad, k.grad, v.grad


def _warm(over: dict[str, Any]) -> str:
    """Worker: compile one candidate's kernels into Triton's disk cache with a small input of the same
    specialisation (sizes and strides divisible by 16, same heads, dtypes and head_dim)."""
    fa = _fa()
    fa.CONFIG = dataclasses.replace(fa.CONFIG, **over)
    torch.manual_seed(0)
    _step(fa, *_inputs(1024))
    torch.cuda.synchronize()
    return "ok"


class _Precompile:
    """Worker processes compiling the candidates in parallel; the timing loop then loads them from Triton's cache."""

    def __init__(self, overs: list[dict[str, Any]], workers: int) -> None:
        self.pool: Pool | None = None
        self.result: AsyncResult | None = None
        if workers <= 0 or not overs:
            return
        try:
            self.pool = mp.get_context("spawn").Pool(min(workers, len(overs)))
            self.result = self.pool.map_async(_warm, overs)
        except Exception as e:  # noqa: BLE001 - without workers the timing loop compiles each candidate itself
            print(f"precompile disabled: {type(e).__name__}: {e}")

    def join(self, timeout: float) -> None:
        """Wait at most timeout seconds, then stop the workers (so they never overlap a measurement)."""
        try:
            if self.result is not None:
                self.result.get(timeout=max(1.0, timeout))
        except Exception as e:  # noqa: BLE001 - a failed warm-up only costs compile time in the timing loop
            print(f"precompile incomplete: {type(e).__name__}: {e}")
        finally:
            if self.pool is not None:
                self.pool.terminate()


def _sdpa_time(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, iters: int) -> float:
    """torch SDPA on the documents as a [B, H, S, D] batch (K/V expanded to Hq heads beforehand, so only
    attention is timed)."""
    q4, k4, v4, g4 = (x.detach().view(DOCS, x.shape[0] // DOCS, -1, D).repeat_interleave(HQ // x.shape[1], 2)
                      .transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v, g))

    def step() -> None:
        for t in (q4, k4, v4):
            t.grad = None
        torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=True).backward(g4)

    return timeit(step, warmup=1, iters=iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=40.0, help="skip candidates not started by then (s)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                    help="processes compiling candidates in parallel (0: compile in the timing loop)")
    ap.add_argument("--out", default=None, help="directory for attention_configs-gpu.json")
    ap.add_argument("--save-tuned", default=None, metavar="DIR",
                    help="record the winner (>3%% faster than the default, gradients checked) for this GPU in "
                         "DIR/<GPU>.json, the format of kernels/gpu_configs/")
    args = ap.parse_args()
    # candidates are measured against the built-in defaults: no tuned file may change them (workers inherit it)
    os.environ["GOLONG_TUNED"] = "0"
    t_start = time.perf_counter()
    fa = _fa()
    default = fa.CONFIG
    configs = candidate_configs()
    if args.dry_run or not torch.cuda.is_available():
        rows = [{"candidate": label, "overrides": str(over) or "-", "default": cfg == default}
                for (label, over), (_, cfg) in zip(CANDIDATES, configs)]
        print_table("bench.attention_configs --dry-run (nothing timed)", rows, list(rows[0]))
        return

    warm = _Precompile([over for _, over in CANDIDATES[1:]], args.workers)
    torch.manual_seed(0)
    T = args.tokens
    cu, q, k, v, g = _inputs(T)
    S = T // DOCS
    # FlashAttention convention: fwd 2 matmuls + bwd 5, 2 flops per multiply-add, causal halves S^2
    flops = 7 * 2 * DOCS * S**2 / 2 * HQ * D
    case = f"{T} tok, {DOCS} docs, GQA {HQ}/{HKV}, d {D}, bf16, causal fwd+bwd"

    t_sdpa: float | None = None

    def row(impl: str, t: float, t_ref: float, **extra: Any) -> dict[str, Any]:
        return {"case": case, "impl": impl, "metric": "time", "value": round(t * 1e3, 3), "unit": "ms",
                "TFLOP/s": round(flops / t / 1e12, 1), "baseline": "default", "ratio": round(t / t_ref, 3),
                "ratio_meaning": "time / default's time (<1: faster than the default)",
                "speed vs SDPA": round(t_sdpa / t, 3) if t_sdpa else None, **extra}

    ref = tuple(x.clone() for x in _step(fa, cu, q, k, v, g))  # compiles the default meanwhile
    warm.join(args.budget_s - (time.perf_counter() - t_start))
    # same-run baselines: torch SDPA, and FlashAttention-2's varlen kernels (flash-attn when installed; PyTorch's)
    try:
        t_sdpa = _sdpa_time(q, k, v, g, args.iters)
    except RuntimeError as e:
        print(f"SDPA baseline failed: {e}")
    t_default = timeit(lambda: _step(fa, cu, q, k, v, g), warmup=1, iters=args.iters)
    rows = [row("default", t_default, t_default, config=dataclasses.asdict(default), **{"grad rel err": "0"})]
    if t_sdpa:
        rows.append(row("torch SDPA", t_sdpa, t_default))
    # flash-attn's FlashAttention-2 varlen kernels when installed (PyTorch's build of them is a candidate: the
    # auto_backend row); flash_attention would run ours in place of a missing one, so it is checked first
    if fa._flash_attn_available(q):
        try:
            t = timeit(lambda: _step(fa, cu, q, k, v, g, backend="flash_attn"), warmup=1, iters=args.iters)
            rows.append(row("flash-attn 2 varlen", t, t_default))
        except Exception as e:  # noqa: BLE001 - a failing peer must not lose the sweep
            rows.append({"case": case, "impl": "flash-attn 2 varlen", "metric": "time", "value": None, "unit": "ms",
                         "note": f"failed: {type(e).__name__}: {str(e)[:200]}"})
    save_results("attention_configs", rows, out_dir=args.out)

    for (label, _), (_, cfg) in zip(CANDIDATES[1:], configs[1:]):
        if time.perf_counter() - t_start > args.budget_s:
            rows.append({"case": case, "impl": label, "metric": "time", "value": None, "unit": "ms",
                         "note": f"skipped: past --budget-s {args.budget_s}"})
            continue
        fa.CONFIG = cfg
        try:
            got = _step(fa, cu, q, k, v, g)
            err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(got, ref))
            t = timeit(lambda: _step(fa, cu, q, k, v, g), warmup=1, iters=args.iters)
            rows.append(row(label, t, t_default, config=dataclasses.asdict(cfg),
                            **{"grad rel err": f"{err:.1e}" + ("" if err < 2e-2 else " WRONG")}))
        except Exception as e:  # noqa: BLE001 - one failing candidate must not lose the sweep
            rows.append({"case": case, "impl": label, "metric": "time", "value": None, "unit": "ms",
                         "note": f"failed: {type(e).__name__}: {str(e)[:200]}"})
        finally:
            fa.CONFIG = default
        save_results("attention_configs", rows, out_dir=args.out)  # what is measured survives a time limit
    print_table(f"flash_attention backward configs ({case}); {time.perf_counter() - t_start:.0f} s", rows,
                ["impl", "value", "TFLOP/s", "ratio", "speed vs SDPA", "grad rel err", "note"])
    timed = {r["impl"]: r for r in rows if r.get("config")}
    winner = tuned.pick({n: r["value"] for n, r in timed.items()},
                        {n: "WRONG" not in r.get("grad rel err", "") for n, r in timed.items()}, "default")
    best = timed[winner]
    changed = {f: v for f, v in best["config"].items() if getattr(default, f) != v}
    print(f"adopt: {winner} ({best['ratio']}x default); TritonConfig fields to change: {changed or 'none'}")
    if args.save_tuned:
        save_tuned("flash_attention", changed, args.save_tuned, candidate=winner, case=case,
                   **{"time / default": best["ratio"], "default ms": t_default * 1e3,
                      "speed vs SDPA": best["speed vs SDPA"]})


if __name__ == "__main__":
    main()
