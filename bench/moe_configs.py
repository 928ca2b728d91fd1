"""Which tile configuration of kernels.grouped_mm is fastest on this GPU (H200: the production defaults
FWD_CONFIG / DW_CONFIG are chosen from this table).

    python -m bench.moe_configs --out DIR      # CUDA: Qwen3-30B-A3B expert GEMMs, 32K tokens x top-8, bf16
    python -m bench.moe_configs --dry-run      # CPU: list the candidates, nothing timed

Shapes (uniform routing of 32768 tokens, top-8 of 128 experts, so 262144 rows):
  gate_up  [T*8, 2048] x [128, 2048, 1536]   (gate_up_proj [128, 1536, 2048] seen transposed)
  down     [T*8,  768] x [128,  768, 2048]   (down_proj [128, 2048, 768] seen transposed)
Each candidate (overrides of FWD_CONFIG, which serves the forward and dX, and of DW_CONFIG) is swapped into
the module constants, checked against the default's y / dx / dw, and timed forward and fwd+bwd on both
GEMMs, with torch._grouped_mm (the torch backend) measured in the same run. Every candidate compiles for
sm_90 without spills and with HGMMA (tests/kernels/test_grouped_mm.py checks it on CPU). The last table
sums each candidate's gate_up + down times: the MoE MLP's GEMM time. --save-tuned DIR records the winner
(gate_up + down fwd+bwd > 3% faster than the default, outputs and gradients checked) for this GPU in
DIR/<GPU name>.json (kernels/tuned.py's format; copied into kernels/gpu_configs/ it becomes that GPU's setting).
~30 s on an H200 (compiles ~1-2 s per kernel).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
from typing import Any

import torch

from bench.common import print_table, save_results, save_tuned, timeit
from kernels import tuned

# name -> (FWD_CONFIG overrides, DW_CONFIG overrides); "default" is the configuration in kernels.grouped_mm.
# Registers / shared memory per CTA from kernels.aot (Triton 3.9, sm_90) in the comments. H200 (Triton 3.6)
# at the time the default was chosen, gate_up + down fwd+bwd: previous_128x128 15.6 ms, torch 12.3 ms;
# 128x256 forward alone 13.6 ms, 128x256 dW alone 14.2 ms; one-program-per-tile 128x128 15.8 ms.
CANDIDATES: dict[str, tuple[dict[str, int], dict[str, int]]] = {
    "default": ({}, {}),
    # forward / dX: 4 stages (192 KiB). (128-wide k-steps in 2 stages spill in dX: not a candidate.)
    "fwd_s4": ({"num_stages": 4}, {}),
    # (256x128 forward tiles ran 1.088x the default's gate_up + down fwd+bwd on the H200, commit 68fad31, and
    # keep 16-24 B of stack with the SwiGLU epilogue under Triton 3.9: dropped)
    # dW: 4 stages (192 KiB); 256x128 output tiles
    "dw_s4": ({}, {"num_stages": 4}),
    "dw_k256": ({}, {"BLOCK_K": 256, "BLOCK_N": 128}),
    # fwd_s4 and dw_s4 each ran 0.977x / 0.971x the default's time there (commit 68fad31): both together
    "fwd_s4_dw_s4": ({"num_stages": 4}, {"num_stages": 4}),
    # forward / dX tiles by TMA descriptors (w always, x unless gathered): no per-thread addresses, 193-234
    # registers instead of 209-255 (Triton 3.6 / 3.9), SwiGLU as two 128-column accumulators
    "fwd_tma": ({"TMA": 1}, {}),
    "fwd_tma_s4": ({"TMA": 1, "num_stages": 4}, {}),
    # dW's x and dy tiles by descriptors bounded at the group's end (154-161 registers instead of 166-170)
    "dw_tma": ({}, {"TMA": 1}),
    "fwd_dw_tma": ({"TMA": 1}, {"TMA": 1}),
}
# Dropped after run 4 (H200, commit 68fad31; time ratios vs the default, gate_up / down fwd+bwd): previous_128x128
# (the 128x128 4-stage tiles, 0.84x / 0.90x the default's speed), dw_m128_s2 (0.98x / 0.92x).


def _module() -> Any:
    return importlib.import_module("kernels.grouped_mm")  # the module (the package exports the function)


def merged(name: str) -> tuple[dict[str, int], dict[str, int]]:
    """The full (FWD_CONFIG, DW_CONFIG) a candidate runs with."""
    gm = _module()
    fwd, dw = CANDIDATES[name]
    return {**gm.FWD_CONFIG, **fwd}, {**gm.DW_CONFIG, **dw}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=None, help="candidate names to time (default: all)")
    ap.add_argument("--out", default=None, help="directory for moe_configs-gpu.json")
    ap.add_argument("--save-tuned", default=None, metavar="DIR", help="record the winner for this GPU in DIR")
    args = ap.parse_args()
    os.environ["GOLONG_TUNED"] = "0"  # candidates are measured against the built-in defaults
    gm = _module()
    if args.dry_run or not torch.cuda.is_available():
        rows = [{"candidate": n, "FWD_CONFIG overrides": str(f), "DW_CONFIG overrides": str(d)}
                for n, (f, d) in CANDIDATES.items()]
        print_table("bench.moe_configs --dry-run (nothing timed)", rows, list(rows[0]))
        return

    from bench.moe import make_logits
    from kernels.moe_route import moe_route

    E, H, I, k = 128, 2048, 768, 8
    gen = torch.Generator(device="cuda").manual_seed(0)
    offsets = moe_route(make_logits(args.tokens, E, 0.0, "cuda", torch.bfloat16, gen), k).offsets
    rows_n = args.tokens * k

    def randn(*s: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*s, generator=gen, device="cuda") * std).to(torch.bfloat16)

    # (x, w as the MLP passes it, dy) per GEMM
    gemms = {
        "gate_up": (randn(rows_n, H), randn(E, 2 * I, H, std=H**-0.5).transpose(1, 2), randn(rows_n, 2 * I)),
        "down": (randn(rows_n, I), randn(E, H, I, std=I**-0.5).transpose(1, 2), randn(rows_n, H)),
    }
    for x, w, _ in gemms.values():
        x.requires_grad_()
        w.requires_grad_()

    def fwd(gemm: str, backend: str) -> torch.Tensor:
        x, w, _ = gemms[gemm]
        with torch.no_grad():
            return gm.grouped_mm(x, w, offsets, backend=backend)

    def step(gemm: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, w, dy = gemms[gemm]
        x.grad = w.grad = None
        y = gm.grouped_mm(x, w, offsets, backend=backend)
        y.backward(dy)
        return y.detach(), x.grad, w.grad

    def measure(backend: str) -> dict[tuple[str, str], float]:
        t = {}
        for gemm in gemms:
            t[(gemm, "fwd")] = timeit(functools.partial(fwd, gemm, backend), warmup=1, iters=args.iters)
            t[(gemm, "fwd+bwd")] = timeit(functools.partial(step, gemm, backend), warmup=1, iters=args.iters)
        return t

    flops = {"gate_up": 2 * rows_n * H * 2 * I, "down": 2 * rows_n * I * H}
    ref = {gemm: step(gemm, "triton") for gemm in gemms}
    t_default = measure("triton")
    t_torch = measure("torch")
    t_default_fb = sum(s for (_, m), s in t_default.items() if m == "fwd+bwd")
    default_fwd, default_dw = gm.FWD_CONFIG, gm.DW_CONFIG
    rows: list[dict[str, Any]] = []

    def add(name: str, t: dict[tuple[str, str], float], err: str, cfg: str) -> None:
        for (gemm, mode), secs in t.items():
            f = flops[gemm] * (3 if mode == "fwd+bwd" else 1)
            rows.append({"case": f"{gemm} {args.tokens}x{k} tok, {mode}", "impl": name, "metric": "time",
                         "value": round(secs * 1e3, 3), "unit": "ms", "TFLOP/s": round(f / secs / 1e12, 1),
                         "baseline": "default", "ratio": round(t_default[(gemm, mode)] / secs, 3),
                         "ratio_meaning": "default time / candidate time (>1: candidate faster)",
                         "vs_torch": round(t_torch[(gemm, mode)] / secs, 3),
                         "rel err vs default": err, "config": cfg})
        save_results("moe_configs", rows, out_dir=args.out)  # what is measured survives a time limit
        fb = sum(s for (_, m), s in t.items() if m == "fwd+bwd")
        print(f"  {name}: fwd+bwd gate_up+down {fb * 1e3:.2f} ms ({t_default_fb / fb:.3f}x default)", flush=True)

    add("torch._grouped_mm", t_torch, "", "backend=torch")
    fwd_bwd: dict[str, float] = {}
    checked: dict[str, bool] = {}
    for name in args.only or list(CANDIDATES):
        fwd_cfg, dw_cfg = merged(name)
        gm.FWD_CONFIG, gm.DW_CONFIG = fwd_cfg, dw_cfg
        try:
            got = {gemm: step(gemm, "triton") for gemm in gemms}
            err = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                      for gemm in gemms for a, b in zip(got[gemm], ref[gemm]))
            t = t_default if name == "default" else measure("triton")
        except Exception as e:  # a candidate that fails to compile or launch is reported, not fatal
            print(f"  {name}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        finally:
            gm.FWD_CONFIG, gm.DW_CONFIG = default_fwd, default_dw
        add(name, t, f"{err:.1e}", f"fwd {CANDIDATES[name][0]} dw {CANDIDATES[name][1]}")
        fwd_bwd[name] = sum(s for (_, m), s in t.items() if m == "fwd+bwd")
        checked[name] = err < 1e-2

    print_table(f"grouped_mm tile candidates, Qwen3-30B-A3B, {args.tokens} tokens x top-{k}, bf16", rows,
                ["case", "impl", "value", "TFLOP/s", "ratio", "vs_torch", "rel err vs default"])
    totals = {}
    for r in rows:
        mode = r["case"].rsplit(", ", 1)[1]
        totals.setdefault(r["impl"], {}).setdefault(mode, 0.0)
        totals[r["impl"]][mode] += r["value"]
    base = totals.get("default", {})
    summary = [{"impl": n, **{f"{m} ms": round(v, 3) for m, v in ms.items()},
                **{f"{m} vs default": round(base[m] / v, 3) for m, v in ms.items() if base.get(m)}}
               for n, ms in totals.items()]
    print_table("gate_up + down (the MoE MLP's GEMMs)", summary, list(summary[0]))
    if "default" in fwd_bwd:
        winner = tuned.pick(fwd_bwd, checked, "default")
        print(f"adopt: {winner} (gate_up + down fwd+bwd {fwd_bwd['default'] / fwd_bwd[winner]:.3f}x default)")
        if args.save_tuned:
            fwd_over, dw_over = CANDIDATES[winner]
            save_tuned("grouped_mm", {n: o for n, o in (("FWD_CONFIG", fwd_over), ("DW_CONFIG", dw_over)) if o},
                       args.save_tuned, candidate=winner, case=f"{args.tokens} tokens x top-{k}, gate_up + down",
                       **{"fwd+bwd ms": round(fwd_bwd[winner] * 1e3, 3),
                          "default fwd+bwd ms": round(fwd_bwd["default"] * 1e3, 3)})


if __name__ == "__main__":
    main()
