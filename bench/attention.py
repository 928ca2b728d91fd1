"""Varlen flash attention and zigzag ring attention.

    python -m bench.attention                 # CPU: ring on gloo ranks W = 1, 2, 4, 8 (torch local backend)
    python -m bench.attention --dry-run       # resolve imports/args, one tiny local fwd+bwd, no spawn
    python -m bench.attention                 # CUDA: local kernel TFLOP/s vs FlashAttention-2 and torch SDPA
    torchrun --nproc_per_node 8 -m bench.attention --ring   # CUDA, 8 GPUs: ring vs ring-flash-attn

CPU (what a laptop can show about the ring):
  memory   per-rank peak extra memory of ring fwd+bwd on a fixed packed batch, vs W = 1 (ideal 1/W)
  comm     bytes each rank sends, vs the analytic minimum: the K/V of every other rank that its queries
           see (forward); that again plus one fp32 dK/dV partial per such block (backward)
  balance  max/min causal work (visible (query, key) pairs) over ranks on a mixed-length batch,
           zigzag vs a contiguous split (the baseline); target <= 1.05
CUDA (one GPU): causal, GQA 32/8, head_dim 128, bf16, 16K-128K tokens, one document and a packed
  mixed-length batch; fwd and fwd+bwd TFLOP/s of ours (triton) vs FlashAttention-2's varlen kernels on the
  same packed rows, as the flash-attn package has them (when installed) and as PyTorch builds them in
  (torch.nn.attention.varlen.varlen_attn: the FA2 peer without the package), and torch SDPA (one document
  only: SDPA has no varlen; K/V pre-expanded to 32 heads): its default choice among the flash / cuDNN /
  memory-efficient backends, and its flash backend alone where varlen_attn does not run (the same kernel); plus
  bf16 accuracy vs an fp64 per-document reference. FLOPs: fwd 4*Hq*D*sum L(L+1)/2, bwd 2.5x fwd.
CUDA ring replay (one GPU): every rank's ring steps (the functions ring_attention calls) run one after another
  and timed, W = 8 on a 128K-token packed batch; the ring's time on W GPUs = sum over steps of the slowest
  rank (plus any hop longer than its step at --link-gbs), vs the ideal: the local kernel on the whole batch / W.
CUDA ring (torchrun, NCCL): fwd+bwd time of ring_attention vs ring-flash-attn's
  zigzag_ring_flash_attn_varlen_func on the same packed batch (document lengths multiples of 2W, which
  ring-flash-attn needs), and vs the ideal: one GPU's local kernel time on the whole batch / W.
The table (last) gives ratios vs the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import random
import socket
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import peak_extra_memory, print_table, save_results, timeit
from kernels.flash_attention import (
    attention_delta,
    flash_attention,
    torch_varlen_attention,
    varlen_bounds,
)
from kernels.ring_attention import (
    ZigzagPlan,
    _owners,
    comm_stats,
    ring_attention,
    ring_bwd_step,
    ring_fwd_step,
    zigzag_indices,
    zigzag_shard,
)


def mixed_lengths(total: int, max_len: int, seed: int = 0, multiple: int = 1) -> list[int]:
    """Document lengths summing to `total`: uniform in [1, max_len] plus a few very short ones."""
    rng = random.Random(seed)
    out: list[int] = []
    while sum(out) < total:
        n = rng.choice([1, 2, 3, 7]) if rng.random() < 0.15 else rng.randint(1, max_len)
        out.append(min(n, total - sum(out)))
    if multiple > 1:  # round every length to a multiple (ring-flash-attn's zigzag needs 2W | L)
        out = [max(multiple, (n // multiple) * multiple) for n in out]
    return out


def cu_of(lengths: list[int], device: Any = "cpu") -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def causal_pairs(lengths: list[int]) -> int:
    return sum(n * (n + 1) // 2 for n in lengths)


# ------------------------------------------------------------------------------------------------
# CPU: load balance, memory and communication of the ring
# ------------------------------------------------------------------------------------------------


def balance_rows(lengths: list[int], worlds: list[int]) -> list[dict[str, Any]]:
    cu = cu_of(lengths)
    T = sum(lengths)
    rows = []
    for w in worlds:
        owner, r = _owners(cu, w)
        work = torch.bincount(owner, weights=r.pos.double() + 1, minlength=w)  # keys each query row sees
        contiguous = torch.bincount(torch.arange(T) * w // T, weights=r.pos.double() + 1, minlength=w)
        zz, base = (work.max() / work.min()).item(), (contiguous.max() / contiguous.min()).item()
        rows.append({"case": f"balance W={w} T={T} docs={len(lengths)}", "impl": "zigzag", "metric": "max/min work",
                     "value": zz, "unit": "x", "baseline": "contiguous split", "baseline_value": base,
                     "ratio": zz / base, "ratio_meaning": "ours / baseline (lower is better); target value <= 1.05"})
    return rows


def _ring_rank(rank: int, world: int, port: int, lengths: list[int], heads: tuple[int, int, int], q_out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        hq, hkv, d = heads
        cu = cu_of(lengths)
        g = torch.Generator().manual_seed(0)
        T = sum(lengths)
        # only the local shard stays alive: the global tensors are dropped before measuring
        q, k, v, do = (zigzag_shard(torch.randn(T, h, d, generator=g), cu, rank, world) for h in (hq, hkv, hkv, hq))
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_()

        def step() -> None:
            out = ring_attention(q, k, v, cu, causal=True, backend="torch")
            out.backward(do)

        # one unmeasured step first: lazy initialisation (autograd engine, BLAS packing buffers sized by
        # the first large GEMM, gloo pairs) is not the ring's memory
        step()
        q.grad = k.grad = v.grad = None
        dist.barrier()

        comm_stats.reset()
        start = time.perf_counter()
        peak, _ = peak_extra_memory(step)
        secs = time.perf_counter() - start
        inputs = sum(x.numel() * x.element_size() for x in (q, k, v, do))
        q_out.put((rank, peak, inputs, comm_stats.fwd_bytes, comm_stats.bwd_bytes, secs))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ring_cpu_rows(lengths: list[int], worlds: list[int], heads: tuple[int, int, int]) -> list[dict[str, Any]]:
    # RSS is the only CPU peak gauge: make glibc serve every allocation over 64 KiB with mmap (returned to
    # the OS on free), so RSS tracks live tensors instead of the heap's high-water mark
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    ctx = mp.get_context("spawn")
    hq, hkv, d = heads
    cu = cu_of(lengths)
    T = sum(lengths)
    rows: list[dict[str, Any]] = []
    base_peak = None
    for w in [1] + [w for w in worlds if w != 1]:  # W=1 first: every ratio is against it
        q_out = ctx.SimpleQueue()
        port = _free_port()
        procs = [ctx.Process(target=_ring_rank, args=(r, w, port, lengths, heads, q_out)) for r in range(w)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"ring bench at W={w} failed: exit codes {[p.exitcode for p in procs]}")
        res = sorted(q_out.get() for _ in range(w))
        peaks = [r[1] for r in res]
        peak = max(peaks)
        base_peak = base_peak or peak
        secs = max(r[5] for r in res)
        case = f"ring W={w} T={T} Hq={hq} Hkv={hkv} D={d} fp32"
        rows.append({"case": case, "impl": "ring (torch local)", "metric": "peak extra memory / rank (max)",
                     "value": peak / 2**20, "unit": "MiB", "baseline": "W=1", "baseline_value": base_peak / 2**20,
                     "ratio": peak / base_peak, "ideal_ratio": 1 / w,
                     "ratio_meaning": "ours / W=1 (ideal 1/W)", "inputs_mib_per_rank": max(r[2] for r in res) / 2**20,
                     "peak_mib_per_rank": [round(p / 2**20, 1) for p in peaks], "seconds": secs})
        if w == 1:
            continue
        plan = ZigzagPlan.build(cu, w, True)
        kv_row = 2 * hkv * d * 4  # fp32 K and V of one row
        grad_row = 2 * hkv * d * 4  # fp32 dK and dV partial of one row
        need = [sum(plan.counts[s] for s in range(w) if s != r and plan.visible[r][s]) for r in range(w)]
        min_fwd = [n * kv_row for n in need]
        min_bwd = [n * (kv_row + grad_row) for n in need]
        for phase, idx, mins in (("fwd", 3, min_fwd), ("fwd+bwd", None, None)):
            sent = [r[3] if idx else r[3] + r[4] for r in res]
            lower = mins if mins else [a + b for a, b in zip(min_fwd, min_bwd)]
            rows.append({"case": case, "impl": "ring", "metric": f"bytes sent / rank, {phase} (max)",
                         "value": max(sent) / 2**20, "unit": "MiB", "baseline": "analytic minimum (max over ranks)",
                         "baseline_value": max(lower) / 2**20, "ratio": max(sent) / max(lower),
                         "ratio_meaning": "ours / minimum"})
    return rows


# ------------------------------------------------------------------------------------------------
# One device: the ring's schedule replayed, step by step
# ------------------------------------------------------------------------------------------------


class _Clock:
    """Times a sequence of calls: CUDA events on a GPU (read once at the end), perf_counter on CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.marks = cuda, []

    def run(self, fn: Any) -> Any:
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            self.marks.append((a, b))
        else:
            t0 = time.perf_counter()
            out = fn()
            self.marks.append(time.perf_counter() - t0)
        return out

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self.marks]
        return list(self.marks)


def replay_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, cu: torch.Tensor, world: int,
                *, backend: str = "auto") -> dict[str, Any]:
    """Every rank's ring steps of ring_attention (kernels.ring_attention.ring_fwd_step / ring_bwd_step, the
    functions the ring itself calls) run one after another on this device, each timed.

    q/dout [T, Hq, D], k/v [T, Hkv, D]: the GLOBAL packed batch. Returns the global out / dq / dk / dv
    assembled from the shards (so the replay is checked against unsharded attention) and the seconds of
    (phase, step, rank): t_fwd / t_bwd [W][W]; t_pre[r] is rank r's delta and casts between the passes.
    On W GPUs the ranks run a step concurrently and a step ends with its slowest rank (the next K/V block
    arrives then), so sum over steps of max over ranks is the ring's time when communication hides.
    """
    scale = q.shape[-1] ** -0.5
    plan = ZigzagPlan.build(cu, world, True, q.device)
    idx = [zigzag_indices(cu.to(q.device), r, world) for r in range(world)]
    qs, dos = [q[i] for i in idx], [dout[i] for i in idx]
    kvs = [torch.cat([k[i], v[i]], dim=1) for i in idx]
    clock = _Clock(q.is_cuda)
    outs = [torch.zeros(x.shape, device=q.device, dtype=torch.float32) for x in qs]
    lses = [torch.full(x.shape[:2], -math.inf, device=q.device, dtype=torch.float32) for x in qs]
    vis = [[plan.visible[r][(r - i) % world] for r in range(world)] for i in range(world)]
    for i in range(world):
        for r in range(world):
            src = (r - i) % world
            clock.run(lambda r=r, src=src, go=vis[i][r]: go and ring_fwd_step(
                qs[r], kvs[src], plan.rows[r], plan.rows[src], outs[r], lses[r], causal=True, scale=scale,
                backend=backend))

    def pre(r: int) -> tuple[torch.Tensor, torch.Tensor]:
        o = outs[r].to(q.dtype)
        return o, attention_delta(o, dos[r], backend=backend)

    pres = [clock.run(lambda r=r: pre(r)) for r in range(world)]
    dqs = [torch.zeros(x.shape, device=q.device, dtype=torch.float32) for x in qs]
    dkvs = [torch.zeros(x.shape, device=q.device, dtype=torch.float32) for x in kvs]
    for i in range(world):
        for r in range(world):
            src = (r - i) % world
            if vis[i][r]:
                mine = clock.run(lambda r=r, src=src: ring_bwd_step(
                    dos[r], qs[r], kvs[src], lses[r], pres[r][1], plan.rows[r], plan.rows[src], dqs[r],
                    causal=True, scale=scale, backend=backend))
                dkvs[src] += mine  # in the ring this sum travels with the block; the replay keeps it in place
            else:
                clock.run(lambda: None)
    secs = clock.seconds()
    n = world * world
    t_fwd = [secs[i * world:(i + 1) * world] for i in range(world)]
    t_pre = secs[n:n + world]
    t_bwd = [secs[n + world + i * world:n + world + (i + 1) * world] for i in range(world)]
    hkv = k.shape[1]
    out, dq = torch.empty_like(q), torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    for r in range(world):
        out[idx[r]] = pres[r][0]
        dq[idx[r]] = dqs[r].to(q.dtype)
        dk[idx[r]] = dkvs[r][:, :hkv].to(k.dtype)
        dv[idx[r]] = dkvs[r][:, hkv:].to(v.dtype)
    return {"out": out, "dq": dq, "dk": dk, "dv": dv, "t_fwd": t_fwd, "t_bwd": t_bwd, "t_pre": t_pre,
            "plan": plan, "kv_bytes": [x.numel() * x.element_size() for x in kvs]}


def ring_replay_rows(tokens: int, world: int, hq: int, hkv: int, d: int, iters: int, link_gbs: float,
                     max_doc: int | None = None) -> list[dict[str, Any]]:
    """The ring's time on W GPUs estimated from one device (CUDA: bf16, triton; CPU: fp32, torch backend): sum
    over steps of the slowest rank's compute (the step's K/V hop hidden behind it, or the hop's time at link_gbs
    GB/s when longer), vs the ideal: the local kernel on the whole batch / W. Same kernels and block pairs as
    ring_attention."""
    lengths = mixed_lengths(tokens, max_doc or tokens // 4, seed=1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    cu = cu_of(lengths, dev)
    T = sum(lengths)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, go = (torch.randn(T, h, d, device=dev, dtype=dtype, generator=g) for h in (hq, hkv, hkv, hq))
    runs = [replay_ring(q, k, v, go, cu, world) for _ in range(iters + 1)][1:]  # the first one compiles
    fq, fk, fv = (x.clone().requires_grad_() for x in (q, k, v))
    ours = "triton" if dev == "cuda" else "torch"  # the ring's blocks' kernels (not a tuned auto_backend's)
    local = timeit(lambda: flash_attention(fq, fk, fv, cu, backend=ours)[0].backward(go), iters=iters)
    # the replay computes the ring's result: it must match the local kernel on the whole batch
    fq.grad = fk.grad = fv.grad = None
    ref_out = flash_attention(fq, fk, fv, cu, backend=ours)[0]
    ref_out.backward(go)
    diffs = {name: ((runs[-1][name].float() - ref.float()).norm() / ref.float().norm()).item()
             for name, ref in (("out", ref_out), ("dq", fq.grad), ("dk", fk.grad), ("dv", fv.grad))}
    link = link_gbs * 1e9
    kv_bytes = runs[0]["kv_bytes"]
    rows = []
    case = (f"ring replay W={world} T={T} ({len(lengths)} docs, longest {max(lengths)}) GQA {hq}/{hkv} D={d} "
            f"{str(dtype).removeprefix('torch.')}")
    totals = {"compute only": [], f"+ hops at {link_gbs:g} GB/s": []}
    for run in runs:
        fwd = [max(ts) for ts in run["t_fwd"]]
        bwd = [max(ts) for ts in run["t_bwd"]]
        pre = max(run["t_pre"])
        totals["compute only"].append(sum(fwd) + pre + sum(bwd))
        # hop i sends the K/V block held at step i (bf16) and, in the backward, an fp32 dK/dV partial (2x bytes)
        hop_fwd = [max(kv_bytes[(r - i) % world] for r in range(world)) / link for i in range(world)]
        hop_bwd = [3 * h for h in hop_fwd]
        with_comm = (sum(max(c, h) for c, h in zip(fwd[:-1], hop_fwd[:-1])) + fwd[-1] + pre
                     + sum(max(c, h) for c, h in zip(bwd, hop_bwd)))
        totals[f"+ hops at {link_gbs:g} GB/s"].append(with_comm)
    ideal = local / world
    for name, ts in totals.items():
        t = sorted(ts)[len(ts) // 2]
        rows.append({"case": case, "impl": f"ours ring, one-device replay ({name})", "metric": "fwd+bwd ms",
                     "value": t * 1e3, "unit": "ms", "baseline": "ideal (local kernel, whole batch / W)",
                     "baseline_value": ideal * 1e3, "ratio": ideal / t,
                     "ratio_meaning": "ideal / ours = scaling efficiency (target >= 0.85)"})
    rows += [{"case": case, "impl": "ours ring, one-device replay", "metric": f"rel diff {name} vs local kernel",
              "value": err, "unit": "", "baseline": None, "baseline_value": None, "ratio": None,
              "ratio_meaning": "relative L2 difference from the unsharded kernel (same dtype)"}
             for name, err in diffs.items()]
    run = runs[len(runs) // 2]
    busy = [sum(run["t_fwd"][i][r] + run["t_bwd"][i][r] for i in range(world)) + run["t_pre"][r] for r in range(world)]
    rows.append({"case": case, "impl": "ours ring, one-device replay", "metric": "max/min busy time over ranks",
                 "value": max(busy) / max(min(busy), 1e-12), "unit": "x", "baseline": None, "baseline_value": None,
                 "ratio": None, "ratio_meaning": "load balance of the measured step times (1 = perfect)"})
    return rows


# ------------------------------------------------------------------------------------------------
# CUDA: local kernel throughput and accuracy
# ------------------------------------------------------------------------------------------------


def _fa2():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


VARLEN_PEER = "torch varlen_attn (FA2 kernel)"


@functools.lru_cache(maxsize=1)
def _varlen_attn_missing() -> str | None:
    """None where PyTorch's varlen_attn runs a causal GQA 32/8 bf16 fwd+bwd at head_dim 128 here, else why not."""
    cu = torch.tensor([0, 100, 256], dtype=torch.int32, device="cuda")
    q, k = (torch.randn(256, h, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (32, 8))
    try:
        torch_varlen_attention(q, k, k, cu, 156, True, 128 ** -0.5)[0].sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure means no such peer here, said in the table
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None


def _per_doc_fp64(q, k, v, lengths):
    G = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lengths:
        qq = q[start:start + n].double().transpose(0, 1)
        kk = k[start:start + n].double().repeat_interleave(G, 1).transpose(0, 1)
        vv = v[start:start + n].double().repeat_interleave(G, 1).transpose(0, 1)
        s = (qq @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
        s.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), -math.inf)
        outs.append((torch.softmax(s, -1) @ vv).transpose(0, 1))
        start += n
    return torch.cat(outs)


def accuracy_rows(hq: int, hkv: int, d: int) -> list[dict[str, Any]]:
    lengths = mixed_lengths(4096, 2048, seed=3)
    cu = cu_of(lengths, "cuda")
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, d, device="cuda", dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    go = torch.randn(T, hq, d, device="cuda", dtype=torch.bfloat16)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = _per_doc_fp64(q64, k64, v64, lengths)
    ref.backward(go.double())
    refs = [ref.detach(), q64.grad, k64.grad, v64.grad]
    rows = []
    impls = {"ours (triton)": lambda a, b, c: flash_attention(a, b, c, cu, backend="triton")[0]}
    fa = _fa2()
    if fa is not None:
        impls["flash-attn 2"] = lambda a, b, c: fa(a, b, c, cu, cu, max(lengths), max(lengths), causal=True)
    if _varlen_attn_missing() is None:
        impls[VARLEN_PEER] = lambda a, b, c: torch_varlen_attention(a, b, c, cu, max(lengths), True, d ** -0.5)[0]
    for name, fn in impls.items():
        a, b, c = (x.clone().requires_grad_() for x in (q, k, v))
        out = fn(a, b, c)
        out.backward(go)
        for what, ours, r in zip(("out", "dq", "dk", "dv"), (out, a.grad, b.grad, c.grad), refs):
            err = ((ours.double() - r).norm() / r.norm()).item()
            rows.append({"case": f"accuracy T={T} docs={len(lengths)} bf16", "impl": name, "metric": f"rel err {what}",
                         "value": err, "unit": "", "baseline": "fp64 per document"})
    return rows


def _sdpa_backend_runs(backend: Any) -> bool:
    """Whether torch SDPA's `backend` alone runs a causal bf16 fwd+bwd at head_dim 128 here."""
    from torch.nn.attention import sdpa_kernel

    q = torch.randn(1, 2, 256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    try:
        with sdpa_kernel([backend]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
        return True
    except RuntimeError:
        return False


def _throughput_case(T: int, layout: str, hq: int, hkv: int, d: int, iters: int) -> list[dict[str, Any]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fa = _fa2()
    lengths = [T] if layout == "1 doc" else mixed_lengths(T, T // 4, seed=T)
    cu = cu_of(lengths, "cuda")
    max_len = max(lengths)
    q, k, v = (torch.randn(T, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (hq, hkv, hkv))
    go = torch.randn(T, hq, d, device="cuda", dtype=torch.bfloat16)
    impls = {"ours": lambda: flash_attention(q, k, v, cu, backend="triton")[0]}
    if fa is not None:
        impls["flash-attn 2"] = lambda: fa(q, k, v, cu, cu, max_len, max_len, causal=True)
    if _varlen_attn_missing() is None:  # the same packed rows and GQA heads as ours; bounds read before timing
        bounds = varlen_bounds(cu, T)
        impls[VARLEN_PEER] = lambda: torch_varlen_attention(q, k, v, *bounds, True, d ** -0.5)[0]
    if layout == "1 doc":
        G = hq // hkv
        qs = q.detach().transpose(0, 1)[None].requires_grad_()
        ks = k.detach().repeat_interleave(G, 1).transpose(0, 1)[None].requires_grad_()
        vs = v.detach().repeat_interleave(G, 1).transpose(0, 1)[None].requires_grad_()

        def sdpa(backends: list) -> torch.Tensor:
            with sdpa_kernel(backends):
                out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            return out[0].transpose(0, 1)

        # no math fallback: at 128K tokens it would materialise the [H, T, T] scores
        impls["torch SDPA"] = lambda: sdpa([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                            SDPBackend.EFFICIENT_ATTENTION])
        # PyTorch's flash backend is FlashAttention-2's kernel built into torch: timed where varlen_attn does not run
        # (varlen_attn calls that kernel too; one timing of it is enough)
        if VARLEN_PEER not in impls and _sdpa_backend_runs(SDPBackend.FLASH_ATTENTION):
            impls["torch SDPA flash (FA2 kernel)"] = lambda: sdpa([SDPBackend.FLASH_ATTENTION])
    flops_fwd = 4.0 * hq * d * causal_pairs(lengths)
    # fewer timed calls where one takes ~1 s (a 128K-token document's fwd+bwd): the suite's step has 50 s for all
    iters = max(2, min(iters, round(iters * 32768 / T)))
    case = f"T={T} {layout} ({len(lengths)} docs) GQA {hq}/{hkv} D={d} bf16"
    res: dict[tuple[str, str], float] = {}
    rows = []
    for name, fn in list(impls.items()):
        try:
            res[(name, "fwd")] = flops_fwd / timeit(fn, warmup=1, iters=iters) / 1e12
            res[(name, "fwd+bwd")] = 3.5 * flops_fwd / timeit(lambda fn=fn: fn().backward(go), warmup=1,
                                                              iters=iters) / 1e12
        except Exception as e:  # noqa: BLE001 - a peer that fails here (memory, an API change) is a row, not the end
            if name == "ours":
                raise
            del impls[name]
            rows.append({"case": case, "impl": name, "metric": "error", "value": f"{type(e).__name__}: {str(e)[:200]}",
                         "unit": ""})
            torch.cuda.empty_cache()
    for phase in ("fwd", "fwd+bwd"):
        ours = {"case": case, "impl": "ours", "metric": f"TFLOP/s {phase}", "value": res[("ours", phase)],
                "unit": "TFLOP/s"}
        peers = [n for n in impls if n != "ours"]
        rows += [dict(ours, baseline=p, baseline_value=res[(p, phase)], ratio=res[("ours", phase)] / res[(p, phase)],
                      ratio_meaning="ours / peer (higher is better)") for p in peers] or [ours]
    return rows


def throughput_rows(tokens: list[int], hq: int, hkv: int, d: int, iters: int,
                    done: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Rows of every (size, layout) case; each case's rows are saved with `done` (the rows measured before) as
    soon as it finishes, so a step timeout keeps what was measured."""
    rows = []
    missing = _varlen_attn_missing()
    if missing is not None:  # say why there is no such row; without flash-attn either, packed rows have no peer
        rows.append({"case": "torch varlen_attn", "impl": VARLEN_PEER, "metric": "error",
                     "value": f"no torch varlen_attn peer: {missing}", "unit": ""})
    if _fa2() is None:
        rows.append({"case": "flash-attn 2 (varlen)", "impl": "flash-attn 2", "metric": "error",
                     "value": "flash_attn not installed: no flash-attn row"
                              + ("" if missing is None else "; packed rows have no peer at all"), "unit": ""})
    for T in tokens:
        for layout in ("1 doc", "packed"):
            rows += _throughput_case(T, layout, hq, hkv, d, iters)
            torch.cuda.empty_cache()
            if done is not None:
                save_results("attention", done + rows)
    return rows


def shared_prompt_rows(prompt: int, n: int, resp: int, hq: int, hkv: int, d: int, iters: int,
                       device: str) -> list[dict[str, Any]]:
    """A prompt shared by n responses (flash_attention's prefix_of, the actor's trainer.share_prompts layout) vs
    the n sequences packed whole, our kernels fwd+bwd on both: the time ratio beside the ideal one (attended
    pairs whole / shared), and the largest difference of the responses' outputs."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    backend = "triton" if device == "cuda" else "torch"
    whole = [prompt + resp] * n
    shared = [prompt - 1] + [resp + 1] * n
    g = torch.Generator(device=device).manual_seed(0)
    P = prompt - 1
    rows = P + n * (resp + 1)
    qs, ks, vs = (torch.randn(rows, h, d, device=device, dtype=dtype, generator=g) for h in (hq, hkv, hkv))
    # the whole layout: row j of sequence i is the shared layout's prompt row j, then response i's rows
    idx = torch.cat([torch.cat([torch.arange(P), P + i * (resp + 1) + torch.arange(resp + 1)]) for i in range(n)])
    idx = idx.to(device)
    runs = {
        "shared prompt": (qs, ks, vs, cu_of(shared, device), torch.tensor([-1] + [0] * n, dtype=torch.int32,
                                                                            device=device)),
        "whole sequences": (qs[idx], ks[idx], vs[idx], cu_of(whole, device), None),
    }
    secs, outs = {}, {}
    for name, (q, k, v, cu, prefix_of) in runs.items():
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        go = torch.randn_like(q)

        def step(q=q, k=k, v=v, cu=cu, prefix_of=prefix_of, go=go) -> torch.Tensor:
            out, _ = flash_attention(q, k, v, cu, backend=backend, prefix_of=prefix_of)
            out.backward(go)
            return out

        outs[name] = step().detach()
        secs[name] = timeit(step, warmup=1, iters=iters)
    pairs_whole = causal_pairs(whole)
    pairs_shared = causal_pairs([P]) + n * (resp + 1) * P + causal_pairs([resp + 1] * n)
    # the responses' rows of both layouts (the whole layout's prompt rows hold the same values n times)
    resp_rows = torch.cat([P + i * (resp + 1) + torch.arange(resp + 1) for i in range(n)]).to(device)
    mine = torch.cat([i * (prompt + resp) + P + torch.arange(resp + 1) for i in range(n)]).to(device)
    diff = ((outs["shared prompt"][resp_rows].float() - outs["whole sequences"][mine].float()).norm()
            / outs["whole sequences"][mine].float().norm()).item()
    case = f"prompt {prompt} shared by {n} responses of {resp}, GQA {hq}/{hkv} D={d} {str(dtype)[6:]} ({device})"
    return [
        {"case": case, "impl": "ours, shared prompt", "metric": "fwd+bwd ms", "value": secs["shared prompt"] * 1e3,
         "unit": "ms", "baseline": "ours, whole sequences", "baseline_value": secs["whole sequences"] * 1e3,
         "ratio": secs["whole sequences"] / secs["shared prompt"], "ratio_meaning": "whole / shared time"},
        {"case": case, "impl": "attended pairs", "metric": "whole / shared", "value": pairs_whole / pairs_shared,
         "unit": "x"},
        {"case": case, "impl": "ours, shared prompt", "metric": "rel diff of the responses' outputs vs whole",
         "value": diff, "unit": ""},
    ]


def ring_gpu_rows(tokens: int, hq: int, hkv: int, d: int, iters: int) -> list[dict[str, Any]]:
    """Under torchrun with NCCL: ring fwd+bwd vs ring-flash-attn zigzag varlen vs ideal (local / W)."""
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    lengths = mixed_lengths(tokens, tokens // 4, seed=1, multiple=2 * world)
    cu = cu_of(lengths, "cuda")
    T = sum(lengths)
    g = torch.Generator(device="cuda").manual_seed(0)
    full = [torch.randn(T, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for h in (hq, hkv, hkv, hq)]
    q, k, v, go = (zigzag_shard(x, cu, rank, world) for x in full)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    res = {"ours ring": timeit(lambda: ring_attention(q, k, v, cu).backward(go), iters=iters)}
    try:
        from ring_flash_attn import zigzag_ring_flash_attn_varlen_func

        local_cu = cu // world  # every document length is a multiple of 2W: the same zigzag layout
        max_local = max(lengths) // world
        res["ring-flash-attn zigzag"] = timeit(lambda: zigzag_ring_flash_attn_varlen_func(
            q, k, v, local_cu, max_local, causal=True).backward(go), iters=iters)
    except ImportError:
        res_note = "ring_flash_attn not installed: no ring-flash-attn zigzag row"
    else:
        res_note = None
    fq, fk, fv = (x.requires_grad_() for x in full[:3])
    ideal = timeit(lambda: flash_attention(fq, fk, fv, cu, backend="triton")[0].backward(full[3]), iters=iters) / world
    rows = []
    for name, secs in res.items():
        rows.append({"case": f"ring W={world} T={T} ({len(lengths)} docs) GQA {hq}/{hkv} D={d} bf16", "impl": name,
                     "metric": "fwd+bwd ms", "value": secs * 1e3, "unit": "ms", "baseline": "ideal (1 GPU / W)",
                     "baseline_value": ideal * 1e3, "ratio": ideal / secs,
                     "ratio_meaning": "ideal / ours = scaling efficiency (target >= 0.85)"})
    if res_note:
        rows.append({"case": f"ring W={world}", "impl": "ring-flash-attn zigzag", "metric": "error", "value": res_note,
                     "unit": ""})
    if rank != 0:
        rows = []
    dist.destroy_process_group()
    return rows


# ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="resolve imports/args, one tiny local step, no spawn")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8], help="CPU ring sizes")
    ap.add_argument("--cpu-tokens", type=int, default=32768, help="packed batch size of the CPU ring run")
    ap.add_argument("--cpu-max-doc", type=int, default=4096, help="longest document of the CPU ring batch")
    ap.add_argument("--cpu-heads", type=int, nargs=3, default=[8, 2, 64], metavar=("HQ", "HKV", "D"))
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768, 65536, 131072], help="CUDA sizes")
    ap.add_argument("--heads", type=int, nargs=3, default=[32, 8, 128], metavar=("HQ", "HKV", "D"))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--ring", action="store_true", help="CUDA ring under torchrun (NCCL)")
    ap.add_argument("--ring-tokens", type=int, default=131072)
    ap.add_argument("--replay-world", type=int, default=8, help="ring size of the one-device ring replay")
    ap.add_argument("--replay-tokens", type=int, default=131072, help="CUDA packed batch of the ring replay")
    ap.add_argument("--link-gbs", type=float, default=450.0,
                    help="per-direction GB/s of a ring hop in the replay's comm model (H100/H200 NVLink: 450)")
    args = ap.parse_args()
    hq, hkv, d = args.heads

    if args.dry_run:
        lengths = [1, 5, 30]
        cu = cu_of(lengths)
        q, k, v = (torch.randn(36, h, 16, requires_grad=True) for h in (4, 2, 2))
        out, lse = flash_attention(q, k, v, cu, backend="torch")
        out.sum().backward()
        replay_ring(q.detach(), k.detach(), v.detach(), torch.randn_like(q), cu, 4, backend="torch")
        rows = balance_rows(mixed_lengths(4096, 512), [2, 4]) + shared_prompt_rows(33, 3, 5, 4, 2, 16, 1, "cpu")
        print_table("bench.attention --dry-run (nothing saved)", rows, ["case", "impl", "metric", "value", "ratio"])
        return

    if args.ring:
        rows = ring_gpu_rows(args.ring_tokens, hq, hkv, d, args.iters)
        if rows:
            save_results("attention_ring", rows)
            print_table("ring attention, fwd+bwd (NCCL)", rows,
                        ["case", "impl", "value", "unit", "baseline", "baseline_value", "ratio"])
        return

    if torch.cuda.is_available():
        rows = accuracy_rows(hq, hkv, d)
        rows += throughput_rows(args.tokens, hq, hkv, d, args.iters, done=rows)  # saved case by case
        rows += shared_prompt_rows(16384, 8, 1024, hq, hkv, d, 2, "cuda")
        save_results("attention", rows)
        try:
            rows += ring_replay_rows(args.replay_tokens, args.replay_world, hq, hkv, d, args.iters, args.link_gbs)
        except Exception as e:  # noqa: BLE001 - the local-kernel rows stand on their own
            rows.append({"case": f"ring replay W={args.replay_world}", "impl": "ring_attention", "metric": "error",
                         "value": f"{type(e).__name__}: {str(e)[:300]}", "unit": ""})
    else:
        rows = balance_rows(mixed_lengths(1 << 20, 131072, seed=1), [2, 4, 8])
        rows += ring_cpu_rows(mixed_lengths(args.cpu_tokens, args.cpu_max_doc, seed=2), args.worlds,
                              tuple(args.cpu_heads))
        rows += shared_prompt_rows(4096, 8, 256, *args.cpu_heads, 2, "cpu")
    path = save_results("attention", rows)
    print(f"results: {path}")
    print_table("attention", rows, ["case", "impl", "metric", "value", "unit", "baseline", "baseline_value", "ratio"])


if __name__ == "__main__":
    main()
