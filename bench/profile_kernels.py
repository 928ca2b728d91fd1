"""Where each headline op's time goes, kernel by kernel (torch.profiler), so fusion work aims at the right place.

    python -m bench.profile_kernels                 # CUDA: MoE MLP (32K tok; uniform and 30% on one expert),
                                                    # attention (32K tok), logprob (8K)
    python -m bench.profile_kernels --cases moe     # one case
    python -m bench.profile_kernels --dry-run       # CPU, tiny shapes: resolve every case once

For every case and phase (fwd, fwd+bwd) the op runs `--iters` times under the profiler after a warm-up;
the table lists the device kernels that take the most time: calls and milliseconds per iteration and
their share of the phase's kernel time. Kernel names are cut at the first '(' or '<' so template
arguments of one kernel do not split it into rows.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import print_table, save_results


def _short(name: str) -> str:
    return re.split(r"[(<]", name, maxsplit=1)[0].strip()[:70] or name[:70]


def kernel_table(fn: Callable[[], Any], iters: int, cuda: bool, top: int, warmup: bool = True
                 ) -> list[dict[str, Any]]:
    """Runs fn once to warm up (unless warmup=False), then `iters` times under the profiler; returns the top
    kernels."""
    if warmup:
        fn()
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(iters):
            fn()
        if cuda:
            torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for ev in prof.events():
        if cuda:  # device kernels only; CPU-side ops would double count
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = ev.device_time
        else:  # CPU: leaf aten ops stand in for kernels
            if ev.cpu_children or not ev.name.startswith("aten::"):
                continue
            us = ev.cpu_time
        t = totals.setdefault(_short(ev.name), [0, 0.0])
        t[0] += 1
        t[1] += us
    whole = sum(t[1] for t in totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])
    rows = [{"kernel": k, "calls/iter": round(c / iters, 2), "ms/iter": round(us / iters / 1e3, 3),
             "share": round(us / whole, 3)} for k, (c, us) in ranked[:top]]
    rest = sum(t[1] for _, t in ranked[top:])
    if rest:
        rows.append({"kernel": f"({len(ranked) - top} others)", "ms/iter": round(rest / iters / 1e3, 3),
                     "share": round(rest / whole, 3)})
    rows.append({"kernel": "TOTAL kernel time", "ms/iter": round(whole / iters / 1e3, 3), "share": 1.0})
    return rows


def _fwd_bwd(fwd: Callable[[], torch.Tensor], leaves: list[torch.Tensor], dy: torch.Tensor | None
             ) -> Callable[[], None]:
    def run() -> None:
        for p in leaves:
            p.grad = None
        out = fwd()
        out.backward(dy if dy is not None else torch.ones_like(out))
    return run


def case_moe(cuda: bool, tiny: bool, skew: float = 0.0) -> tuple[str, Callable, Callable]:
    """skew > 0: one expert is in the top-k of that fraction of the tokens (as bench.moe's skewed routing)."""
    from bench.moe import make_logits
    from kernels.moe_mlp import expert_mlp
    from kernels.moe_route import moe_route

    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    T, H, I, E, k = (64, 64, 32, 8, 2) if tiny else ((32768, 2048, 768, 128, 8) if cuda else (1024, 512, 192, 32, 8))
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(T, H, generator=g, device=dev).to(dt).requires_grad_()
    logits = make_logits(T, E, skew, dev, dt, g).requires_grad_()
    gate_up = (torch.randn(E, 2 * I, H, generator=g, device=dev) * H**-0.5).to(dt).requires_grad_()
    down = (torch.randn(E, H, I, generator=g, device=dev) * I**-0.5).to(dt).requires_grad_()
    dy = torch.randn(T, H, generator=g, device=dev).to(dt)

    def fwd() -> torch.Tensor:
        return expert_mlp(x, moe_route(logits, k), gate_up, down)

    def fwd_nograd() -> None:
        with torch.no_grad():
            fwd()
    title = f"moe T={T} H={H} I={I} E={E} k={k}" + (f" skewed {skew:.0%}" if skew else "")
    return title, fwd_nograd, _fwd_bwd(fwd, [x, logits, gate_up, down], dy)


def case_attention(cuda: bool, tiny: bool) -> tuple[str, Callable, Callable]:
    from kernels.flash_attention import flash_attention

    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    T, hq, hkv, d = (96, 4, 2, 32) if tiny else ((32768, 32, 8, 128) if cuda else (2048, 8, 2, 64))
    lengths = [T // 2, T // 4, T - T // 2 - T // 4]
    cu = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(len(lengths))], device=dev, dtype=torch.int32)
    g = torch.Generator(device=dev).manual_seed(0)
    q, kk, v = (torch.randn(T, h, d, generator=g, device=dev).to(dt).requires_grad_() for h in (hq, hkv, hkv))
    go = torch.randn(T, hq, d, generator=g, device=dev).to(dt)
    backend = "triton" if cuda else "torch"

    def fwd() -> torch.Tensor:
        return flash_attention(q, kk, v, cu, backend=backend)[0]

    def fwd_nograd() -> None:
        with torch.no_grad():
            fwd()
    return f"attention T={T} docs={len(lengths)} GQA {hq}/{hkv} d={d}", fwd_nograd, _fwd_bwd(fwd, [q, kk, v], go)


def case_logprob(cuda: bool, tiny: bool) -> tuple[str, Callable, Callable]:
    from kernels.logprob import linear_logprob_entropy

    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    N, H, V = (64, 32, 1000) if tiny else ((8192, 2560, 151936) if cuda else (1024, 256, 151936))
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(N, H, generator=g, device=dev).to(dt).requires_grad_()
    w = (torch.randn(V, H, generator=g, device=dev) * H**-0.5).to(dt).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g, device=dev)
    backend = "triton" if cuda else "torch"

    def fwd() -> torch.Tensor:
        lp, ent = linear_logprob_entropy(h, w, t, 0.7, backend=backend)
        return lp.sum() + ent.sum()

    def fwd_nograd() -> None:
        with torch.no_grad():
            fwd()
    return f"logprob N={N} H={H} V={V} T=0.7", fwd_nograd, _fwd_bwd(fwd, [h, w], None)


CASES = {"moe": case_moe, "moe_skewed": lambda cuda, tiny: case_moe(cuda, tiny, skew=0.3),
         "attention": case_attention, "logprob": case_logprob}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--top", type=int, default=14, help="kernels listed per phase")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, one iteration, nothing saved")
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    rows: list[dict[str, Any]] = []
    for name in args.cases:
        title, fwd, fwd_bwd = CASES[name](cuda, args.dry_run)
        for phase, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            table = kernel_table(fn, 1 if args.dry_run else args.iters, cuda, args.top)
            print_table(f"{title}: {phase} ({'CUDA kernels' if cuda else 'CPU aten ops'})", table)
            rows += [{"case": title, "phase": phase, **r} for r in table]
    if not args.dry_run:
        save_results("profile_kernels", rows, out_dir=args.out)


if __name__ == "__main__":
    main()
