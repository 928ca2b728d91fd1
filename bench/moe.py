"""MoE expert MLP and grouped GEMM throughput (Qwen3-30B-A3B: H 2048, expert I 768, 128 experts, top-8).

    python -m bench.moe                       # CPU: shapes scaled down (see --scale), fp32
    python -m bench.moe --tokens 32768        # CUDA: full shapes, bf16 (the default there)
    python -m bench.moe --dry-run             # resolve imports/args, run every impl once on tiny shapes

Two levels, each forward and forward+backward, uniform and skewed routing (one expert receives 30%
of the tokens; top-8 of 128 gives each expert ~6% under uniform routing):
  moe_mlp     router logits -> y: ours (kernels.moe_route + kernels.expert_mlp) vs a per-expert loop
              (transformers' eager Qwen3MoeExperts algorithm) and, on CUDA, Liger's fused MoE; on CUDA also
              ours_triton with each of kernels.moe_mlp's GATHER_IN_GEMM (the gate_up GEMM reads x rows by index, no
              permuted copy) and SWIGLU_IN_GEMM (SwiGLU in its epilogue) flipped from the value in use:
              ours_triton_gather / _no_gather, ours_triton_swiglu_in_gemm / _swiglu_kernel (--save-tuned records
              the faster of each); and ours_*_replayed, the same MLP routed through recorded experts (routing replay,
              moe_route(expert_ids=); uniform routing; replayed_vs_own: its throughput over ours')
  grouped_mm  the gate_up GEMM alone on pre-routed rows: ours vs a per-expert loop (hand-written
              backward) vs a bare torch._grouped_mm call
On CPU "ours" is the torch backend (torch._grouped_mm); on CUDA the Triton kernels, with the torch
backend (torch routing ops, torch._grouped_mm) as the peer. FLOPs count the expert GEMMs only (fwd 6*T*k*H*I for the
MLP; backward twice the forward). On CUDA a CUDA-graph capture of our fwd+bwd is attempted and
reported, the per-expert loop MLP is timed forward only (--gpu-loop: fwd+bwd too, seconds a step),
and Liger runs last, each of its kernels pinned to one config (--liger-autotune: its own autotuning,
minutes; --skip-liger: none; skipped once --budget-s has passed). On an H200 the run takes ~30-60 s.
Rows are printed and saved as they are measured; the table (last) gives ratios vs the baseline
measured in the same run and, for skewed routing, throughput relative to uniform (skew_vs_uniform).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import kernels.moe_mlp as moe_mlp
from bench.common import print_table, save_results, save_tuned, timeit
from kernels import tuned
from kernels.grouped_mm import grouped_mm, grouped_mm_supported
from kernels.moe_mlp import expert_mlp
from kernels.moe_route import moe_route, route_topk


def loop_moe(x: torch.Tensor, logits: torch.Tensor, top_k: int, gate_up: torch.Tensor, down: torch.Tensor
             ) -> torch.Tensor:
    """The per-expert loop transformers' eager Qwen3MoeExperts runs (one host sync per expert)."""
    weights, ids = route_topk(logits, top_k)
    out = torch.zeros_like(x)
    inter = gate_up.shape[1] // 2
    for e in range(gate_up.shape[0]):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        h = x[tok] @ gate_up[e].t()
        a = F.silu(h[:, :inter]) * h[:, inter:]
        out.index_add_(0, tok, (a @ down[e].t()) * weights[tok, slot, None].to(x.dtype))
    return out


def ours_moe(x, logits, top_k, gate_up, down, backend="auto"):
    return expert_mlp(x, moe_route(logits, top_k, backend=backend), gate_up, down, backend=backend)


def _with(settings: dict[str, bool], fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """fn() with kernels.moe_mlp's GATHER_IN_GEMM / SWIGLU_IN_GEMM forced as given (the backward runs after they
    are restored; its Function does not read them)."""
    saved = {name: getattr(moe_mlp, name) for name in settings}
    for name, on in settings.items():
        setattr(moe_mlp, name, on)
    try:
        return fn()
    finally:
        for name, value in saved.items():
            setattr(moe_mlp, name, value)


# per gate_up setting, indexed by the value in use: the row that times the other value
_FLIP_ROWS = {"GATHER_IN_GEMM": ("ours_triton_gather", "ours_triton_no_gather"),
              "SWIGLU_IN_GEMM": ("ours_triton_swiglu_in_gemm", "ours_triton_swiglu_kernel")}


def liger_moe_fn(autotune: bool) -> Callable | None:
    """Liger's fused MoE, or None where it is not installed. autotune=False pins each of its kernels to
    one config (LIGER_FUSED_MOE_AUTOTUNE=0, read at import): its full autotuning compiles ~30 configs
    per kernel, minutes at these shapes."""
    if not autotune:
        os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0")
    try:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction
    except Exception:  # not installed / no CUDA build
        return None

    def run(x, logits, top_k, gate_up, down):
        weights, ids = route_topk(logits, top_k)
        return LigerFusedMoEFunction.apply(x, gate_up, down, ids.to(torch.int32), weights)

    return run


class _LoopGMM(torch.autograd.Function):
    """Per-expert matmul loop with a hand-written backward (per-group dx rows and dw[g] written in
    place), so the baseline pays for its loop and host sync, not for autograd's full-size
    zero-filled gradients of every slice."""

    @staticmethod
    def forward(ctx, x, w, offsets):
        ctx.save_for_backward(x, w)
        ctx.bounds = [0, *offsets.tolist()]  # host sync, once
        y = x.new_empty(x.shape[0], w.shape[2])
        for g, (s, e) in enumerate(zip(ctx.bounds[:-1], ctx.bounds[1:])):
            torch.matmul(x[s:e], w[g], out=y[s:e])
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx, dw = torch.empty_like(x), torch.empty_like(w)
        for g, (s, e) in enumerate(zip(ctx.bounds[:-1], ctx.bounds[1:])):
            torch.matmul(dy[s:e], w[g].t(), out=dx[s:e])
            torch.matmul(x[s:e].t(), dy[s:e], out=dw[g])
        return dx, dw, None


def loop_gmm(x, w, offsets):
    return _LoopGMM.apply(x, w, offsets)


def make_logits(tokens: int, experts: int, skew: float, device, dtype, gen: torch.Generator) -> torch.Tensor:
    """Router logits [tokens, experts]; with skew > 0 expert 0 is in the top-k of exactly that fraction of
    tokens. Drawn on `gen`'s device (CPU-side draws of the CUDA shapes take seconds)."""
    logits = torch.randn(tokens, experts, generator=gen, device=gen.device)
    if skew > 0:
        hot = torch.randperm(tokens, generator=gen, device=gen.device)[: int(round(skew * tokens))]
        logits[:, 0] = -30.0
        logits[hot, 0] = 30.0
    return logits.to(device=device, dtype=dtype)


def _time(fn: Callable[[], Any], iters: int) -> float:
    return timeit(fn, warmup=1, iters=iters)


def _fwd_bwd(fn: Callable[[], torch.Tensor], params: list[torch.Tensor], dy: torch.Tensor) -> Callable[[], None]:
    def run():
        for p in params:
            p.grad = None
        fn().backward(dy)
    return run


def graph_capture_check(fn: Callable[[], torch.Tensor], params: list[torch.Tensor], dy: torch.Tensor) -> str:
    """Capture fwd+bwd in a CUDA graph and replay it; 'ok' or the error."""
    try:
        step = _fwd_bwd(fn, params, dy)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step()
        torch.cuda.current_stream().wait_stream(s)
        for p in params:
            p.grad = None
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn().backward(dy)
        g.replay()
        torch.cuda.synchronize()
        return "ok"
    except Exception as e:  # report, do not abort the bench
        return f"failed: {type(e).__name__}: {str(e)[:120]}"


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    scale = 1 if cuda else args.scale
    if args.dry_run:
        T, H, I, E, k = 64, 64, 32, 8, 2
    else:
        T = args.tokens or (32768 if cuda else 1024)
        H, I, E, k = args.hidden // scale, args.inter // scale, args.experts, args.top_k
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*s: int, std: float = 1.0, grad: bool = False) -> torch.Tensor:
        t = (torch.randn(*s, generator=gen, device=device) * std).to(dtype)
        return t.requires_grad_() if grad else t

    x = randn(T, H, grad=True)
    gate_up = randn(E, 2 * I, H, std=H**-0.5, grad=True)
    down = randn(E, H, I, std=I**-0.5, grad=True)
    dy = randn(T, H)
    iters = 1 if args.dry_run else args.iters
    shape = f"T={T} H={H} I={I} E={E} k={k} {str(dtype).removeprefix('torch.')}"
    print(f"device {device}, {shape}" + ("" if cuda else f" (Qwen3-30B-A3B H and I divided by {scale})"),
          flush=True)

    rows: list[dict[str, Any]] = []
    mlp_flops = 6 * T * k * H * I
    gmm_flops = 2 * T * k * H * 2 * I
    ours_name = "ours_triton" if cuda else "ours_torch"
    base = "ours_torch(_grouped_mm)" if cuda else "per_expert_loop"
    unit, per = ("TFLOP/s", 1e12) if cuda else ("GFLOP/s", 1e9)

    def elapsed() -> float:
        return time.perf_counter() - t_start

    def add(level, routing, impl, mode, secs, flops, baseline, **extra):
        rows.append({"case": f"{level}/{routing}", "impl": impl, "mode": mode, "metric": "throughput",
                     "value": flops / secs / per, "unit": unit, "ms": secs * 1e3, "shape": shape,
                     "baseline": baseline, **extra})
        # progress under a timeout: each row is printed and saved as soon as it is measured
        print(f"  [{elapsed():5.1f}s] {level}/{routing} {impl} {mode}: {secs * 1e3:.2f} ms", flush=True)
        if not args.dry_run:
            save_results("moe", rows, out_dir=args.out)

    def mlp(routing: str, impl: str, fn: Callable[[], torch.Tensor], bwd: bool = True,
            **extra) -> None:
        with torch.no_grad():
            add("moe_mlp", routing, impl, "fwd", _time(fn, iters), mlp_flops, base, **extra)
        if bwd:
            add("moe_mlp", routing, impl, "fwd+bwd", _time(_fwd_bwd(fn, [x, gate_up, down], dy), iters),
                3 * mlp_flops, base, **extra)

    def one_routing(routing: str, logits: torch.Tensor) -> None:
        # --- full MoE MLP: ours, the _grouped_mm peer, the per-expert loop ---
        ours = lambda: ours_moe(x, logits, k, gate_up, down)
        mlp(routing, ours_name, ours, **({n.lower(): v for n, v in active.items()} if cuda else {}))
        if cuda:
            mlp(routing, "ours_torch(_grouped_mm)",
                lambda: ours_moe(x, logits, k, gate_up, down, backend="torch"))
            # each gate_up setting flipped from the one in use (this GPU's tuned one, or the built-in default)
            for name, on in active.items():
                mlp(routing, _FLIP_ROWS[name][on], lambda name=name, on=on: _with({name: not on}, ours))
        if routing == "uniform":  # routing replay (rollout.router_replay): the same MLP through recorded experts
            ids = moe_route(logits, k).expert_ids.to(torch.uint8)
            mlp(routing, f"{ours_name}_replayed",
                lambda: expert_mlp(x, moe_route(logits, k, expert_ids=ids), gate_up, down))
        # on CUDA its forward only (~0.1 s a call): autograd through 128 indexed slices zero-fills
        # full-size gradients per expert, seconds a step at 32K tokens; --gpu-loop adds it
        mlp(routing, "per_expert_loop", lambda: loop_moe(x, logits, k, gate_up, down),
            bwd=args.gpu_loop or not cuda)
        if cuda:
            status = graph_capture_check(ours, [x, gate_up, down], dy)
            rows.append({"case": f"moe_mlp/{routing}", "impl": ours_name, "mode": "cuda_graph_fwd+bwd",
                         "metric": "capture", "value": status, "unit": "", "shape": shape})
            print(f"  [{elapsed():5.1f}s] CUDA graph capture ({routing}): {status}", flush=True)

        # --- the gate_up grouped GEMM alone, on rows already sorted by expert ---
        r = moe_route(logits, k)
        xp = r.permute(x).detach().requires_grad_()
        w = gate_up.detach().transpose(1, 2).requires_grad_()  # [E, H, 2I] strided view, as the MLP uses
        dyp = randn(T * k, 2 * I)
        gimpls: dict[str, Callable[[], torch.Tensor]] = {
            ours_name: lambda: grouped_mm(xp, w, r.offsets),
            "per_expert_loop": lambda: loop_gmm(xp, w, r.offsets),
        }
        if grouped_mm_supported(xp, w, r.offsets):
            gimpls["torch._grouped_mm"] = lambda: torch._grouped_mm(xp, w, offs=r.offsets)
        gbase = "torch._grouped_mm" if cuda else "per_expert_loop"
        for impl, fn in gimpls.items():
            with torch.no_grad():
                add("grouped_mm", routing, impl, "fwd", _time(fn, iters), gmm_flops, gbase)
            add("grouped_mm", routing, impl, "fwd+bwd", _time(_fwd_bwd(fn, [xp, w], dyp), iters),
                3 * gmm_flops, gbase)

    # the gate_up settings as expert_mlp resolves them on this device
    active = {"GATHER_IN_GEMM": moe_mlp.gather_in_gemm(x.device), "SWIGLU_IN_GEMM": moe_mlp.swiglu_in_gemm(x.device)}
    routings = {"uniform": make_logits(T, E, 0.0, device, dtype, gen),
                "skewed30": make_logits(T, E, args.skew, device, dtype, gen)}
    # one untimed fwd+bwd first: the first timed row of a run otherwise pays the process's start-up costs (on CPU
    # it read 1.3-1.6x slower than the same call later in the run)
    _fwd_bwd(lambda: ours_moe(x, routings["uniform"], k, gate_up, down), [x, gate_up, down], dy)()
    for routing, logits in routings.items():
        one_routing(routing, logits)
    if cuda and args.save_tuned:  # before Liger: a step timeout there must not lose the choice
        _save_choices(rows, active, lambda: ours_moe(x, routings["uniform"], k, gate_up, down), [x, gate_up, down],
                      dy, args.save_tuned)

    # Liger last: it compiles its own kernels (and autotunes them with --liger-autotune)
    liger = liger_moe_fn(args.liger_autotune) if cuda and not args.skip_liger else None
    if cuda and not args.skip_liger and liger is None:  # say so: a missing peer must not vanish from the table
        rows.append({"case": "moe_mlp", "impl": "liger_fused_moe", "metric": "error",
                     "value": "liger_kernel.ops.fused_moe not importable (not installed or no CUDA build)", "unit": ""})
    if liger is not None:
        note = "autotuned" if args.liger_autotune else "LIGER_FUSED_MOE_AUTOTUNE=0 (one config per kernel)"
        for routing, logits in routings.items():
            if elapsed() > args.budget_s:
                print(f"  [{elapsed():5.1f}s] liger_fused_moe/{routing} skipped: past --budget-s {args.budget_s}",
                      flush=True)
                continue
            mlp(routing, "liger_fused_moe", lambda lg=logits: liger(x, lg, k, gate_up, down), liger_note=note)

    # ratios vs the baseline of the same case and mode (value = throughput: ours / peer)
    ref = {(r["case"], r["impl"], r["mode"]): r["value"] for r in rows if r["metric"] == "throughput"}
    for r in rows:
        peer = ref.get((r["case"], r.get("baseline"), r["mode"]))
        if r["metric"] == "throughput" and peer:
            r["ratio"] = r["value"] / peer
            r["ratio_meaning"] = "throughput / baseline throughput (higher is better)"
    # replay cost: throughput through recorded experts / through the router's own choice
    for r in rows:
        if r["metric"] == "throughput" and r["impl"] == f"{ours_name}_replayed":
            r["replayed_vs_own"] = r["value"] / ref[(r["case"], ours_name, r["mode"])]
    # skew cost: throughput under skewed routing / uniform, per impl and mode
    for r in rows:
        if r["metric"] == "throughput" and r["case"].endswith("/skewed30"):
            u = ref.get((r["case"].replace("skewed30", "uniform"), r["impl"], r["mode"]))
            if u:
                r["skew_vs_uniform"] = r["value"] / u
    print(f"  [{elapsed():5.1f}s] done", flush=True)
    return rows


def _save_choices(rows: list[dict[str, Any]], active: dict[str, bool], fn: Callable[[], torch.Tensor],
                  params: list[torch.Tensor], dy: torch.Tensor, directory: str) -> None:
    """Record GATHER_IN_GEMM and SWIGLU_IN_GEMM for this GPU: each differs from its built-in default only where
    the other value's uniform-routing fwd+bwd is more than 3% faster with the same output and gradients (bf16
    rel err < 1e-2 against the setting in use)."""
    ms = {r["impl"]: r["ms"] for r in rows if r["case"] == "moe_mlp/uniform" and r["mode"] == "fwd+bwd"}

    def result(settings: dict[str, bool]) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        y = _with(settings, fn)
        y.backward(dy)
        return [y.detach().float()] + [p.grad.float() for p in params]

    base = result(active)
    chosen, measured = {}, {}
    for name, on in active.items():
        flipped = _FLIP_ROWS[name][on]
        err = max(((a - b).norm() / b.norm()).item() for a, b in zip(result({name: not on}), base))
        times = {"on": ms["ours_triton"], "off": ms[flipped]} if on else {"on": ms[flipped], "off": ms["ours_triton"]}
        default = "on" if moe_mlp._DEFAULTS[name] else "off"
        ok = {default: True, ("off" if default == "on" else "on"): err < 1e-2}
        chosen[name] = tuned.pick(times, ok, default) == "on"
        measured[name] = {"on ms": round(times["on"], 3), "off ms": round(times["off"], 3), "rel err": f"{err:.1e}"}
    save_tuned("moe_mlp", chosen, directory, case="moe_mlp/uniform fwd+bwd", **measured)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=None, help="tokens per MoE call (default: 32768 CUDA, 1024 CPU)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=768, help="expert intermediate size")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--scale", type=int, default=4, help="CPU only: divide hidden and inter by this")
    p.add_argument("--skew", type=float, default=0.3, help="fraction of tokens routed to expert 0 (skewed case)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--cpu", action="store_true", help="run the CPU bench even when CUDA is present")
    p.add_argument("--gpu-loop", action="store_true", help="CUDA: time the per-expert loop MLP's fwd+bwd too "
                   "(seconds per step); its forward is always timed")
    p.add_argument("--skip-liger", action="store_true", help="leave out Liger's fused MoE (CUDA)")
    p.add_argument("--liger-autotune", action="store_true",
                   help="let Liger autotune its fused-MoE kernels (minutes); default: one config per kernel")
    p.add_argument("--budget-s", type=float, default=60.0,
                   help="CUDA: skip the Liger rows (run last) once this many seconds have passed")
    p.add_argument("--out", default=None, help="directory for moe-<device>.json (default bench/results)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, one iteration, nothing saved")
    p.add_argument("--save-tuned", default=None, metavar="DIR",
                   help="CUDA: record GATHER_IN_GEMM / SWIGLU_IN_GEMM (the faster, same results) for this GPU in "
                        "DIR/<GPU>.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(min(torch.get_num_threads(), int(os.environ.get("BENCH_THREADS", "2"))))
    rows = run(args)
    if not args.dry_run:
        print(f"saved {save_results('moe', rows, out_dir=args.out)}")
    cols = ["case", "impl", "mode", "value", "unit", "ms", "baseline", "ratio", "skew_vs_uniform", "replayed_vs_own"]
    print_table("MoE expert MLP / grouped GEMM" + (" (dry run)" if args.dry_run else ""), rows, cols)


if __name__ == "__main__":
    main()
