"""Fused LM-head logprob + entropy (`kernels.linear_logprob_entropy`) vs materialised logits, Liger, CCE.

Each case runs forward + backward (grads w.r.t. hidden and weight) at H=2560, V=151,936 (Qwen3-4B).
Ours computes logprob AND entropy at temperature T; Liger and CCE compute cross-entropy only (no
entropy output), with the temperature folded into the hidden states. FLOPs are counted as
6*N*H*V per forward+backward (2NHV forward + 4NHV backward; the backward's logits recompute is
not counted), so TFLOP/s is comparable across implementations.

  CPU:  python -m bench.logprob                 # torch backend vs naive vs CCE (torch_compile)
  CUDA: python -m bench.logprob                 # Triton vs naive vs Liger FLCE vs CCE, bf16; then one step
                                                # of ours at N=1M for its peak extra memory (--mem-n)
        python -m bench.logprob --n 8192        # one N only
        python -m bench.logprob --dry-run       # imports + tiny inputs only
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.common import peak_extra_memory, print_table, save_results, timeit

H, V, T = 2560, 151_936, 0.7
CPU_NS = [1024, 4096, 16384]
CPU_WARMUP_NS = (256, 512)  # each impl's untimed first calls: torch.compile (CCE) recompiles at a second shape
OURS = ("triton", "ours_torch")  # a failing run of one of these fails the bench (a peer's is its error row)
GPU_NS = [8192, 32768, 131072]
GPU_MEM_NS = [1 << 20]  # one step each: peak extra memory at 1M tokens (inputs + grads ~12 GiB, ~10 s)
FLOPS_RULE = "6*N*H*V per fwd+bwd (2NHV fwd + 4NHV bwd; backward logits recompute not counted)"
# what each implementation computes, recorded in every row: the peers do less work than ours for the same FLOPs
_OURS_WORK = "logprob + entropy at temperature T; grads of both w.r.t. hidden and weight"
_PEER_WORK = ("cross-entropy only (no entropy), T folded in as hidden * (1/T) (an extra [N, H] multiply); "
              "grads w.r.t. hidden and weight")
WORK = {"triton": _OURS_WORK, "ours_torch": _OURS_WORK, "naive": _OURS_WORK, "liger": _PEER_WORK, "cce": _PEER_WORK,
        "cce_torch_compile": _PEER_WORK}
MIB = 2**20
# logprob and entropy, fp32 [N] each: outputs, alive through the backward, so inside the measured peak; the
# issue's bound counts memory beyond inputs, outputs and gradients (extra_beyond_io_mib)
_OUTPUT_BYTES = 8


def _inputs(n: int, hdim: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)  # on the GPU: CPU randn of 128K x 2560 takes seconds
    h = torch.randn(n, hdim, generator=g, device=device).to(dtype).requires_grad_()
    w = (torch.randn(v, hdim, generator=g, device=device) * hdim**-0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g, device=device)
    return h, w, t


def _ours(backend: str) -> Callable:
    import kernels

    def run(h, w, t):
        lp, ent = kernels.linear_logprob_entropy(h, w, t, T, backend=backend)
        (lp.sum() + ent.sum()).backward()

    return run


def _naive(h, w, t):
    """Materialised fp32 logits, log_softmax, gather, entropy; autograd backward."""
    logits = (h @ w.T).float() / T
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(1, t[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1)
    (lp.sum() + ent.sum()).backward()


def _cce(impl: str) -> Callable:
    def run(h, w, t):  # imported here: a missing package is that peer's error row, not the end of the bench
        from cut_cross_entropy import linear_cross_entropy

        loss = linear_cross_entropy(h * (1.0 / T), w, t, reduction="sum", impl=impl)
        loss.backward()

    return run


def _liger(h, w, t):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    liger_fused_linear_cross_entropy(h * (1.0 / T), w, t, reduction="sum").backward()


def _mem_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _clear(h, w) -> None:
    h.grad = None
    w.grad = None
    gc.collect()


def _measure_cpu(name: str, fn: Callable, n: int, dtype: torch.dtype, warmup: int, est_bytes: int) -> dict:
    row: dict[str, Any] = {"case": f"N={n}", "impl": name, "n": n, "h": H, "v": V, "dtype": str(dtype), "T": T}
    avail = _mem_available()
    if est_bytes > 0.7 * avail:
        row["skipped"] = f"needs ~{est_bytes / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
        return row
    h, w, t = _inputs(n, H, V, dtype, "cpu")
    try:
        for _ in range(warmup):
            fn(h, w, t)
            _clear(h, w)
        t0 = time.perf_counter()
        extra, _ = peak_extra_memory(lambda: fn(h, w, t))
        row["time_s"] = time.perf_counter() - t0
    except Exception as e:  # record why a peer cannot run here instead of a number
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return row
    grads = (h.numel() + w.numel()) * h.element_size()
    row.update(peak_extra_mib=extra / MIB, extra_minus_grads_mib=(extra - grads) / MIB,
               extra_beyond_io_mib=(extra - grads - _OUTPUT_BYTES * n) / MIB,
               tflops=6 * n * H * V / row["time_s"] / 1e12)
    _clear(h, w)
    return row


def _measure_gpu(name: str, fn: Callable, n: int, iters: int) -> dict:
    """iters 0: one step, its peak extra memory and wall time only (no warm-up: the kernels were compiled at
    smaller N)."""
    row: dict[str, Any] = {"case": f"N={n}", "impl": name, "n": n, "h": H, "v": V, "dtype": "bf16", "T": T}
    try:
        h, w, t = _inputs(n, H, V, torch.bfloat16, "cuda")

        def step():
            fn(h, w, t)
            h.grad = w.grad = None

        if iters:
            sec = timeit(step, warmup=2, iters=iters)
            extra, _ = peak_extra_memory(step)
        else:
            t0 = time.perf_counter()
            extra, _ = peak_extra_memory(step)
            torch.cuda.synchronize()
            sec = time.perf_counter() - t0
            row["note"] = "one step: memory, and the time of that single step"
    except torch.OutOfMemoryError as e:
        row["error"] = f"OOM: {str(e)[:200]}"
        return row
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return row
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    grads = (n * H + V * H) * 2
    row.update(time_s=sec, tflops=6 * n * H * V / sec / 1e12, peak_extra_mib=extra / MIB,
               extra_minus_grads_mib=(extra - grads) / MIB,
               extra_beyond_io_mib=(extra - grads - _OUTPUT_BYTES * n) / MIB)
    return row


def _gpu_correctness(n: int = 2048) -> list[dict]:
    """bf16 Triton vs an fp64 oracle (materialised logits) on the same bf16-rounded inputs."""
    import kernels
    from kernels.logprob import linear_logprob_entropy_reference

    rows = []
    h, w, t = _inputs(n, H, V, torch.bfloat16, "cuda", seed=1)
    lp, ent = kernels.linear_logprob_entropy(h, w, t, T, backend="triton")
    (lp.sum() + ent.sum()).backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rlp, rent = linear_logprob_entropy_reference(h64, w64, t, T)
    (rlp.sum() + rent.sum()).backward()
    pairs = [("logprob", lp, rlp), ("entropy", ent, rent), ("dh", h.grad, h64.grad), ("dW", w.grad, w64.grad)]
    for what, a, b in pairs:
        err = ((a.double() - b).norm() / b.norm()).item()
        floor = ((b.bfloat16().double() - b).norm() / b.norm()).item()  # rounding the exact result to bf16
        rows.append({"case": f"N={n} correctness", "impl": "triton", "metric": f"rel_err_{what}", "value": err,
                     "unit": "rel L2 vs fp64", "bf16_rounding_floor": floor, "target": 1e-3,
                     "ok": err <= 1e-3 + (floor if what in ("dh", "dW") else 0.0)})
    return rows


def _with_ratios(rows: list[dict], baseline: str) -> None:
    base = {r["n"]: r for r in rows if r["impl"] == baseline and "time_s" in r}
    for r in rows:
        b = base.get(r.get("n"))
        if b is not None and "time_s" in r and r["impl"] != baseline:
            r["baseline"] = baseline
            r["speedup_vs_baseline"] = b["time_s"] / r["time_s"]
            r["memory_ratio_vs_baseline"] = r["peak_extra_mib"] / max(b["peak_extra_mib"], 1e-9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="*", help="token counts (default: CPU 1K 4K 16K, GPU 8K 32K 128K)")
    p.add_argument("--impls", nargs="*", help="subset of implementations to run")
    p.add_argument("--peers-up-to", type=int, default=None,
                   help="run the peers (naive, CCE, Liger) only for N <= this (CPU time and memory)")
    p.add_argument("--iters", type=int, default=5, help="GPU timing iterations")
    p.add_argument("--mem-n", type=int, nargs="*", default=None,
                   help="GPU: token counts where ours runs one step for its peak memory (default 1M)")
    p.add_argument("--dry-run", action="store_true", help="import everything, build tiny inputs, run nothing big")
    p.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = p.parse_args()
    cuda = torch.cuda.is_available()

    if cuda:
        impls: dict[str, Callable] = {"triton": _ours("triton"), "naive": _naive, "liger": _liger,
                                      "cce": _cce("cce")}
    else:
        impls = {"ours_torch": _ours("torch"), "naive": _naive, "cce_torch_compile": _cce("torch_compile")}
    if args.impls:
        impls = {k: v for k, v in impls.items() if k in args.impls}
    ns = args.n or (GPU_NS if cuda else CPU_NS)

    if args.dry_run:
        import importlib

        import kernels

        for peer in ("cut_cross_entropy", "liger_kernel.transformers.functional"):  # optional: rows of their own
            try:
                importlib.import_module(peer)
            except ImportError as e:
                print(f"dry run: peer {peer} not importable ({e}): its rows will be error rows")

        h, w, t = _inputs(64, 32, 1000, torch.float32, "cpu")
        lp, ent = kernels.linear_logprob_entropy(h, w, t, T, backend="torch")
        (lp.sum() + ent.sum()).backward()
        rows = [{"case": f"N={n}", "impl": k, "planned": True} for n in ns for k in impls]
        print_table(f"bench/logprob dry run ({'cuda' if cuda else 'cpu'}): imports ok, tiny fwd+bwd ok", rows)
        return

    rows: list[dict] = []
    if cuda:
        rows += _gpu_correctness()
        for r in rows:
            print(r, flush=True)
        for n in ns:
            for name, fn in impls.items():
                if name != "triton" and args.peers_up_to is not None and n > args.peers_up_to:
                    continue
                rows.append(_measure_gpu(name, fn, n, args.iters))
                print(rows[-1], flush=True)
                save_results("logprob", rows, args.out)  # keep what is measured if a time limit stops the run
        for n in GPU_MEM_NS if args.mem_n is None else args.mem_n:  # the N = 1M memory bound
            if "triton" in impls:
                rows.append(_measure_gpu("triton", impls["triton"], n, 0))
                print(rows[-1], flush=True)
                save_results("logprob", rows, args.out)
        _with_ratios(rows, "naive")
    else:
        dtype = torch.float32  # CPU has no fast bf16 GEMM everywhere; every impl runs fp32 here
        # Calls of each impl at two small N before any timing: first calls pay one-time costs (torch.compile of
        # CCE, which compiles again for dynamic shapes at the second shape it sees; thread-pool and allocator
        # start-up) that would land on the smallest N's single timed call.
        for fn in impls.values():
            for warm_n in CPU_WARMUP_NS:
                hh, ww, tt = _inputs(warm_n, H, V, dtype, "cpu")
                try:
                    fn(hh, ww, tt)
                except Exception:
                    pass  # the measured call below records the error
                del hh, ww, tt
        for n in ns:
            for name, fn in impls.items():
                if name != "ours_torch" and args.peers_up_to is not None and n > args.peers_up_to:
                    continue
                logits = n * V * 4
                est = {"naive": 5 * logits, "cce_torch_compile": 3 * logits}.get(name, 0) + 2 * V * H * 4
                rows.append(_measure_cpu(name, fn, n, dtype, warmup=0, est_bytes=est))
                print(rows[-1], flush=True)
        _with_ratios(rows, "naive")
    for r in rows:
        r.setdefault("flops_rule", FLOPS_RULE)
        r.setdefault("computes", WORK[r["impl"]])
    path = save_results("logprob", rows, args.out)
    print(f"wrote {path}")
    cols = ["case", "impl", "time_s", "tflops", "peak_extra_mib", "extra_beyond_io_mib", "speedup_vs_baseline",
            "memory_ratio_vs_baseline", "metric", "value", "ok", "skipped", "error"]
    print_table(f"bench/logprob: fwd+bwd, H={H}, V={V}, T={T} (ratios vs naive, same run; Liger / CCE: "
                "cross-entropy only, no entropy)",
                rows, [c for c in cols if any(c in r for r in rows)])
    failed = [r for r in rows if (r["impl"] in OURS and "error" in r) or r.get("ok") is False]
    if failed:  # the rows are kept (written above); the suite's step fails on the exit status
        raise SystemExit(f"bench/logprob: {len(failed)} of our rows failed: "
                         + "; ".join(f"{r['case']} {r['impl']}: {r.get('error') or r.get('metric')}" for r in failed))


if __name__ == "__main__":
    main()
