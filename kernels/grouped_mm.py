"""Grouped GEMM over variable-size row groups: y[rows of g] = x[rows of g] @ w[g].

    x [M, K], w [G, K, N], offsets [G] int32 cumulative row ends (offsets[-1] == M); group g owns
    rows offsets[g-1]:offsets[g] (offsets[-1] := 0 for g = 0). Groups may be empty. -> y [M, N]
    in x's dtype, accumulated in fp32.  Differentiable w.r.t. x and w:
        dx[rows of g] = dy[rows of g] @ w[g]^T        (the forward kernel on w's transposed view)
        dw[g]         = x[rows of g]^T @ dy[rows of g] (a grouped reduction kernel)

This is the MoE expert GEMM: rows are token copies sorted by expert (kernels.moe_route), w the
stacked expert weights. `w` may be any strided view (e.g. transformers' fused
`gate_up_proj.transpose(1, 2)`): nothing copies it, and dw is allocated with w's strides so the
gradient lands in the parameter's own layout.

Backends: "triton" (persistent kernel over all groups' tiles, GPU or the interpreter; fp32, fp16 or bf16),
"torch" (`torch._grouped_mm` where it applies — int32 offsets, 16-byte aligned strides, fp32/bf16/fp16 on
CPU, bf16 on CUDA — else a per-group loop, which reads the offsets on the host and is meant as the
fp64 oracle / odd-layout fallback). "auto": triton on CUDA (for the dtypes it takes), torch otherwise.
Neither the Triton path nor the `_grouped_mm` path synchronises with the host: grids depend on shapes only.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from kernels import tuned
from kernels.aot import HOPPER_MAX_SHARED_BYTES
from kernels.dtypes import TRITON_DTYPES, check_first_backward, check_triton_device, check_triton_dtype
from kernels.tma import tma_ready

# Production tiles (Hopper, bf16, Qwen3-30B-A3B: H=2048, I=768 -> gate_up N=1536, down K=768), for the
# forward and dX: 128x256 fp32 accumulators over 8 warps (two warpgroups of HGMMA 64x256), 3 cp.async
# stages of (128x64 + 64x256) bf16 = 144 KiB shared memory, one persistent program per SM.
# Chosen on an H200 with bench.moe_configs (32K tokens x top-8, gate_up + down fwd+bwd): vs 128x128 / 4 stages,
# 1.08x forward and 1.15x fwd+bwd. A one-program-per-tile variant (no persistent loop) was slower at every
# tile shape tried there (128x128: 15.8 vs 15.6 ms), so the kernel stays persistent.
# TMA 1: x and w tiles by TMA tensor descriptors where the layouts allow (see _tma_operands); 0 until an H200 run
# of bench.moe_configs shows it faster.
FWD_CONFIG: dict[str, int] = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3,
                              "TMA": 0}
# dW = x_g^T dy_g: tiles over (K, N) of one expert, reduction over the expert's rows in BLOCK_M steps;
# 128x256 output tiles, 3 stages of (64x128 + 64x256) bf16 = 144 KiB (H200: 1.10x gate_up + down fwd+bwd
# vs 128x128 tiles).
# TMA 1: x and dy tiles by descriptors bounded at the group's last row (so its tail reads zeros, no masks).
DW_CONFIG: dict[str, int] = {"BLOCK_K": 128, "BLOCK_N": 256, "BLOCK_M": 64, "num_warps": 8, "num_stages": 3,
                             "TMA": 0}


def _tuned_tiles(device: torch.device, name: str, base: dict[str, int]) -> dict[str, int]:
    """This GPU's tuned overrides of FWD_CONFIG or DW_CONFIG (kernels/tuned.py; {} on CPU or untuned)."""
    over = tuned.values("grouped_mm", device, ["FWD_CONFIG", "DW_CONFIG"]).get(name, {})
    bad = sorted(set(over) - set(base))
    if bad:
        raise ValueError(f"tuned grouped_mm {name} has unknown keys {bad}; valid: {sorted(base)}")
    return over


def _fit_stages(cfg: dict[str, int], a_tile: int, b_tile: int, elem_bytes: int) -> dict[str, int]:
    """cfg with num_stages lowered until its pipelined A and B tiles fit Hopper's shared memory (fp32
    inputs take twice the bytes of the bf16 tiles the production configurations are sized for)."""
    stages = cfg["num_stages"]
    while stages > 1 and stages * (a_tile + b_tile) * elem_bytes > HOPPER_MAX_SHARED_BYTES * 0.9:
        stages -= 1
    return {**cfg, "num_stages": stages}


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _weight_desc(w_ptr, G, N, K, stride_wg, stride_wk, stride_wn, BLOCK_K: tl.constexpr, WB: tl.constexpr,
                 TMA: tl.constexpr, W_KMAJOR: tl.constexpr):
    """A 3-D descriptor over the stacked weights in their memory order (unit stride last), or w_ptr itself."""
    if TMA:
        if W_KMAJOR:
            return tl.make_tensor_descriptor(w_ptr, shape=[G, N, K], strides=[stride_wg, stride_wn, 1],
                                             block_shape=[1, WB, BLOCK_K])
        else:
            return tl.make_tensor_descriptor(w_ptr, shape=[G, K, N], strides=[stride_wg, stride_wk, 1],
                                             block_shape=[1, BLOCK_K, WB])
    else:
        return w_ptr


@triton.jit
def _rows_desc(x_ptr, M, K, stride_xm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr):
    """A descriptor over the first M rows of a row-major [*, K] matrix (rows past M read as zeros), or x_ptr."""
    if TMA:
        return tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    else:
        return x_ptr


@triton.jit
def _weight_box(w_desc, g, n0, k0, BLOCK_K: tl.constexpr, WB: tl.constexpr, W_KMAJOR: tl.constexpr):
    """[BLOCK_K, WB] of w[g] at (k0, n0); out-of-range rows / columns read as zeros."""
    if W_KMAJOR:
        return tl.trans(tl.reshape(w_desc.load([g, n0, k0]), (WB, BLOCK_K)))
    else:
        return tl.reshape(w_desc.load([g, k0, n0]), (BLOCK_K, WB))


@triton.jit
def _mainloop_tma(x_desc, x_ptrs, w_desc, g, n0, n_up, row0, m_mask, K, stride_xk, BLOCK_M: tl.constexpr,
                  BLOCK_K: tl.constexpr, WB: tl.constexpr, GATHER: tl.constexpr, SWIGLU: tl.constexpr,
                  W_KMAJOR: tl.constexpr):
    """acc [BLOCK_M, WB] = x rows @ w[g][:, n0:n0 + WB] (and, with SWIGLU, acc_up for columns n_up:n_up + WB).
    Rows past the group's end are computed (the next group's or zero-filled) and never stored."""
    acc = tl.zeros((BLOCK_M, WB), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, WB), dtype=tl.float32)
    rk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        if GATHER:  # rows by index: no TMA gather before Blackwell
            a = tl.load(x_ptrs, mask=m_mask[:, None] & (rk < K - k0)[None, :], other=0.0)
            x_ptrs += BLOCK_K * stride_xk
        else:
            a = x_desc.load([row0, k0])
        acc = tl.dot(a, _weight_box(w_desc, g, n0, k0, BLOCK_K, WB, W_KMAJOR), acc)
        if SWIGLU:
            acc_up = tl.dot(a, _weight_box(w_desc, g, n_up, k0, BLOCK_K, WB, W_KMAJOR), acc_up)
    return acc, acc_up


@triton.jit
def _grouped_mm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, offs_ptr, rows_ptr,
    G, N, K,
    stride_xm, stride_xk,
    stride_wg, stride_wk, stride_wn,
    stride_ym, stride_yn,
    NUM_PROGRAMS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    GATHER: tl.constexpr, SWIGLU: tl.constexpr = False, STORE_H: tl.constexpr = False, h_ptr=None,
    stride_hm=0, TMA: tl.constexpr = False, W_KMAJOR: tl.constexpr = True, M=0,
):
    """Persistent grid: program p takes global tiles p, p + P, p + 2P, ... of the concatenation of
    every group's (m-tile, n-tile) grid. Tile counts come from the device-side offsets, so the grid
    (P programs) is fixed by the shapes and empty groups simply own no tiles. GATHER: row r of the
    product reads x row rows_ptr[r] (int64), so a permuted copy of x is never written.

    SWIGLU (the MoE gate_up GEMM): w's N columns are gate | up halves of I = N / 2 each; a tile's BLOCK_N
    accumulator columns interleave gate column c and up column I + c, so the epilogue holds both and writes
    y = silu(gate) * up [M, I] (BLOCK_N / 2 columns per tile): no [M, 2I] product is read back by a separate
    SwiGLU kernel. STORE_H also writes the product h [M, 2I] (bf16, gate | up) for the backward.

    TMA: w tiles (and x tiles unless GATHER) arrive by tensor descriptors, zero-filled past the edges;
    W_KMAJOR: w's unit stride is along K (w[g] stored [N, K]). With SWIGLU the gate and up columns are two
    boxes and two accumulators instead of interleaved columns.

    M: rows of the product (= x's rows unless GATHER). Group ends are clamped to [previous end, M], so offsets
    that overrun M or decrease cannot send a tile outside y (rows past the last offset are not written)."""
    pid = tl.program_id(0)
    HALF: tl.constexpr = BLOCK_N // 2
    WB: tl.constexpr = HALF if SWIGLU else BLOCK_N  # columns per TMA weight box
    w_desc = _weight_desc(w_ptr, G, N, K, stride_wg, stride_wk, stride_wn, BLOCK_K, WB, TMA, W_KMAJOR)
    x_desc = _rows_desc(x_ptr, M, K, stride_xm, BLOCK_M, BLOCK_K, TMA and not GATHER)
    I = N // 2
    if SWIGLU:
        num_n = tl.cdiv(I, HALF)
    else:
        num_n = tl.cdiv(N, BLOCK_N)
    tile = pid  # next global tile this program owns; only ever increases
    first_tile = 0  # global index of group g's first tile
    row_start = 0
    for g in range(G):
        row_end = tl.minimum(tl.maximum(tl.load(offs_ptr + g), row_start), M)
        group_tiles = tl.cdiv(row_end - row_start, BLOCK_M) * num_n
        while tile < first_tile + group_tiles:
            local = tile - first_tile
            # n fastest: programs running together share x's row block and sweep w[g]
            # (<= 6 MiB in bf16 for Qwen3-30B-A3B), which stays in L2.
            tm = local // num_n
            tn = local % num_n
            rm = row_start + tm * BLOCK_M + tl.arange(0, BLOCK_M)
            if SWIGLU:  # accumulator column j: gate column c = tn * HALF + j // 2 when j is even, else up column
                j = tl.arange(0, BLOCK_N)
                c = tn * HALF + j // 2
                rn = c + (j % 2) * I
                n_mask = c < I
            else:
                rn = tn * BLOCK_N + tl.arange(0, BLOCK_N)
                n_mask = rn < N
            rk = tl.arange(0, BLOCK_K)
            m_mask = rm < row_end
            # int64 row offsets: 1M-token packs x 8 copies x 2048 overflow int32
            if GATHER:
                src = tl.load(rows_ptr + rm, mask=m_mask, other=0)
            else:
                src = rm.to(tl.int64)
            x_ptrs = x_ptr + src[:, None] * stride_xm + rk[None, :] * stride_xk
            w_ptrs = w_ptr + tl.cast(g, tl.int64) * stride_wg + rk[:, None] * stride_wk + rn[None, :] * stride_wn
            if TMA:
                acc, acc_up = _mainloop_tma(x_desc, x_ptrs, w_desc, g, tn * WB, I + tn * HALF,
                                            row_start + tm * BLOCK_M, m_mask, K, stride_xk, BLOCK_M, BLOCK_K, WB,
                                            GATHER, SWIGLU, W_KMAJOR)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    if EVEN_K:
                        a = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
                        b = tl.load(w_ptrs, mask=n_mask[None, :], other=0.0)
                    else:
                        k_mask = rk < K - k0
                        a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                        b = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                    acc = tl.dot(a, b, acc)
                    x_ptrs += BLOCK_K * stride_xk
                    w_ptrs += BLOCK_K * stride_wk
            if SWIGLU:
                if TMA:
                    gate, up = acc, acc_up
                else:
                    gate, up = tl.split(tl.reshape(acc, (BLOCK_M, HALF, 2)))
                rc = tn * HALF + tl.arange(0, HALF)
                ok = m_mask[:, None] & (rc < I)[None, :]
                if STORE_H:
                    h_ptrs = h_ptr + rm.to(tl.int64)[:, None] * stride_hm + rc[None, :]
                    tl.store(h_ptrs, gate.to(h_ptr.dtype.element_ty), mask=ok)
                    tl.store(h_ptrs + I, up.to(h_ptr.dtype.element_ty), mask=ok)
                    # the backward's h is rounded to h's dtype: compute y from the same values
                    gate = gate.to(h_ptr.dtype.element_ty).to(tl.float32)
                    up = up.to(h_ptr.dtype.element_ty).to(tl.float32)
                act = gate * tl.sigmoid(gate) * up
                y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rc[None, :] * stride_yn
                tl.store(y_ptrs, act.to(y_ptr.dtype.element_ty), mask=ok)
            else:
                y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :] * stride_yn
                tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
            tile += NUM_PROGRAMS
        first_tile += group_tiles
        row_start = row_end


@triton.jit
def _grouped_mm_dw_kernel(
    x_ptr, dy_ptr, dw_ptr, offs_ptr, order_ptr, rows_ptr,
    K, N,
    stride_xm, stride_xk,
    stride_dym, stride_dyn,
    stride_dwg, stride_dwk, stride_dwn,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GATHER: tl.constexpr,
    TMA: tl.constexpr = False,
):
    """dw[g, k-tile, n-tile] = sum over group g's rows of x^T dy. Grid (k-tiles * n-tiles, G); an
    empty group runs zero reduction steps and writes zeros, as its gradient is. Grid row j serves
    group order[j] (groups by decreasing size): the CUDA scheduler starts grid rows in order, so the
    longest reductions (a hot expert's) start first instead of forming a tail wherever that expert is.
    TMA: dy tiles (and x tiles unless GATHER) by descriptors whose row count is the group's end, so rows
    past it arrive as zeros."""
    pid = tl.program_id(0)
    g = tl.load(order_ptr + tl.program_id(1))
    num_n = tl.cdiv(N, BLOCK_N)
    tk = pid // num_n
    tn = pid % num_n
    row_start = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
    row_end = tl.load(offs_ptr + g)
    rk = tk * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    k_mask = rk < K
    n_mask = rn < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    rows_seen = tl.maximum(row_end, 1)  # a descriptor needs a non-empty shape (an empty group loads nothing)
    x_desc = _rows_desc(x_ptr, rows_seen, K, stride_xm, BLOCK_M, BLOCK_K, TMA and not GATHER)
    dy_desc = _rows_desc(dy_ptr, rows_seen, N, stride_dym, BLOCK_M, BLOCK_N, TMA)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + rm
        m_mask = rows < row_end
        rows64 = rows.to(tl.int64)
        if TMA and not GATHER:
            a = x_desc.load([m0, tk * BLOCK_K])
        else:
            if GATHER:
                src = tl.load(rows_ptr + rows, mask=m_mask, other=0)
            else:
                src = rows64
            a = tl.load(x_ptr + src[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if TMA:
            b = dy_desc.load([m0, tn * BLOCK_N])
        else:
            b = tl.load(dy_ptr + rows64[:, None] * stride_dym + rn[None, :] * stride_dyn,
                        mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc)
    dw_ptrs = dw_ptr + g.to(tl.int64) * stride_dwg + rk[:, None] * stride_dwk + rn[None, :] * stride_dwn
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=k_mask[:, None] & n_mask[None, :])


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _persistent_programs(x: torch.Tensor, max_tiles: int) -> int:
    # the interpreter runs programs one after another: a few programs still exercise the
    # multi-tile-per-program schedule without wasting time
    sms = _num_sms(x.device.index or 0) if x.is_cuda else 4
    return max(1, min(sms, max_tiles))


def _tma_operands(x: torch.Tensor, w: torch.Tensor, gather: bool, swiglu: bool) -> bool:
    """Whether the forward kernel's TMA path takes these operands: w [G, K, N] with a unit stride along K or N,
    x with unit last stride (unless rows are gathered), all else 16-byte aligned; the SwiGLU up box starts at
    column I, which must be 16-byte aligned when it is w's unit-stride dimension."""
    if w.stride(1) != 1 and w.stride(2) != 1:
        return False
    if swiglu and w.stride(2) == 1 and (w.shape[2] // 2 * w.element_size()) % 16:
        return False
    return tma_ready(w) and (gather or (x.stride(1) == 1 and tma_ready(x)))


def _triton_fwd(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, config: dict[str, int] | None = None,
                out: torch.Tensor | None = None, rows: torch.Tensor | None = None, swiglu: bool = False,
                h_out: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = x[rows] @ w[group] per group (x itself where rows is None; rows [M] int64).

    swiglu: y [M, N/2] = silu(gate) * up of that product (gate | up halves of N), computed in the GEMM's
    epilogue; the product itself goes to h_out [M, N] (unit last stride) when given."""
    cfg = {**FWD_CONFIG, **_tuned_tiles(x.device, "FWD_CONFIG", FWD_CONFIG), **(config or {})}
    cfg = _fit_stages(cfg, cfg["BLOCK_M"] * cfg["BLOCK_K"], cfg["BLOCK_K"] * cfg["BLOCK_N"], x.element_size())
    M, K = x.shape[0] if rows is None else rows.shape[0], x.shape[1]
    G, _, N = w.shape
    offsets = offsets.contiguous()  # the kernel reads offs_ptr + g: a strided view (e.g. a column) would be misread
    if swiglu and N % 2:
        raise ValueError(f"the SwiGLU epilogue needs an even N (gate | up), got {N}")
    n_out = N // 2 if swiglu else N
    y = torch.empty((M, n_out), dtype=x.dtype, device=x.device) if out is None else out
    if M == 0 or N == 0:
        return y
    if K == 0:
        if h_out is not None:
            h_out.zero_()
        return y.zero_()
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    # each non-empty group adds at most one partial m-tile: a shape-only bound on the tile count
    max_tiles = (triton.cdiv(M, bm) + G) * triton.cdiv(n_out, bn // 2 if swiglu else bn)
    args = (x, w, y, offsets, rows if rows is not None else offsets, G, N, K,
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1))
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "EVEN_K": K % bk == 0, "GATHER": rows is not None,
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    meta["M"] = M
    if cfg["TMA"] and _tma_operands(x, w, rows is not None, swiglu):
        meta.update(TMA=True, W_KMAJOR=w.stride(1) == 1)
    if swiglu:
        meta.update(SWIGLU=True, STORE_H=h_out is not None)
        if h_out is not None:
            if h_out.shape != (M, N) or h_out.stride(-1) != 1:
                raise ValueError(f"h_out must be [{M}, {N}] with a unit last stride, got {tuple(h_out.shape)}")
            meta.update(h_ptr=h_out, stride_hm=h_out.stride(0))
    programs = _persistent_programs(x, max_tiles)
    _grouped_mm_fwd_kernel[(programs,)](*args, programs, **meta)
    return y


def _triton_dw(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, like: torch.Tensor,
               config: dict[str, int] | None = None, out: torch.Tensor | None = None,
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """dw[g] = x[rows of g]^T dy[rows of g] (x[rows] for the gathered form), in like's layout."""
    cfg = {**DW_CONFIG, **_tuned_tiles(x.device, "DW_CONFIG", DW_CONFIG), **(config or {})}
    cfg = _fit_stages(cfg, cfg["BLOCK_M"] * cfg["BLOCK_K"], cfg["BLOCK_M"] * cfg["BLOCK_N"], x.element_size())
    K, N = x.shape[1], dy.shape[1]
    G = offsets.shape[0]
    # same strides as w (empty_like keeps a dense permuted layout): a transposed parameter view
    # gets its gradient in the parameter's own layout, with no copy in AccumulateGrad
    dw = torch.empty_like(like) if out is None else out
    if K == 0 or N == 0 or G == 0:
        return dw.zero_()
    bk, bn = cfg["BLOCK_K"], cfg["BLOCK_N"]
    grid = (triton.cdiv(K, bk) * triton.cdiv(N, bn), G)
    # the groups the forward used: ends clamped to [previous end, rows] (bad offsets must not read past x / dy)
    offsets = torch.cummax(offsets.clamp(0, dy.shape[0]), 0).values.to(torch.int32)
    # largest groups first (longest-processing-time order); device ops only, no host sync
    sizes = torch.diff(offsets, prepend=offsets.new_zeros(1))
    order = torch.argsort(sizes, descending=True, stable=True).to(torch.int32)
    tma = bool(cfg["TMA"]) and dy.stride(1) == 1 and tma_ready(dy) and (
        rows is not None or (x.stride(1) == 1 and tma_ready(x)))
    _grouped_mm_dw_kernel[grid](
        x, dy, dw, offsets, order, rows if rows is not None else offsets, K, N,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        BLOCK_K=bk, BLOCK_N=bn, BLOCK_M=cfg["BLOCK_M"], GATHER=rows is not None, TMA=tma,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return dw


class _TritonGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets):
        ctx.save_for_backward(x, w, offsets)
        return _triton_fwd(x, w, offsets)

    @staticmethod
    def backward(ctx, dy):
        check_first_backward("grouped_mm")
        x, w, offsets = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _triton_fwd(dy, w.transpose(1, 2), offsets)
        if ctx.needs_input_grad[1]:
            dw = _triton_dw(x, dy, offsets, like=w)
        return dx, dw, None


# --------------------------------------------------------------------------------------------
# torch reference / CPU path
# --------------------------------------------------------------------------------------------


def _aligned(t: torch.Tensor) -> bool:
    """torch._grouped_mm's layout rule: a unit stride in one of the last two dims, every other
    stride (and the base pointer) a multiple of 16 bytes."""
    if t.stride(-1) != 1 and t.stride(-2) != 1:
        return False
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s, n in zip(t.stride(), t.shape)
                                          if s != 1 and n > 1)


def grouped_mm_supported(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> bool:
    """Whether torch._grouped_mm can take (a, b, offsets) as they are (checked on shapes, no sync)."""
    if not hasattr(torch, "_grouped_mm") or offsets.dtype != torch.int32 or a.dtype != b.dtype:
        return False
    ok_dtypes = (torch.bfloat16,) if a.is_cuda else (torch.float32, torch.bfloat16, torch.float16)
    if a.dtype not in ok_dtypes or a.numel() == 0 or b.numel() == 0:
        return False
    if a.is_cuda and torch.cuda.get_device_capability(a.device) < (9, 0):
        return False
    return _aligned(a) and _aligned(b)


def _mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """y = per-group x_g @ w[g] without autograd (torch._grouped_mm or a loop)."""
    if grouped_mm_supported(x, w, offsets):
        return torch._grouped_mm(x, w, offs=offsets)
    y = x.new_empty(x.shape[0], w.shape[2])
    start = 0
    for g, end in enumerate(offsets.tolist()):  # host sync: fallback / oracle only
        torch.matmul(x[start:end], w[g], out=y[start:end])
        start = end
    return y


def _mm_dw(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """dw[g] = x_g^T @ dy_g in w's layout."""
    n_major = like.stride(1) == 1 and like.stride(2) != 1  # w is a transposed [G, N, K] view
    if n_major and grouped_mm_supported(dy.t(), x, offsets):
        return torch._grouped_mm(dy.t(), x, offs=offsets).transpose(1, 2)
    if not n_major and grouped_mm_supported(x.t(), dy, offsets):
        return torch._grouped_mm(x.t(), dy, offs=offsets)
    dw = torch.empty_like(like)
    start = 0
    for g, end in enumerate(offsets.tolist()):  # host sync: fallback / oracle only
        torch.matmul(x[start:end].t(), dy[start:end], out=dw[g])
        start = end
    return dw


class _TorchGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets):
        ctx.save_for_backward(x, w, offsets)
        return _mm(x, w, offsets)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        dy = dy.contiguous()  # _grouped_mm needs an aligned upstream gradient
        if torch.is_grad_enabled():  # create_graph=True: the gradients through differentiable ops
            dx = _TorchGroupedMM.apply(dy, w.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
            dw = None
            if ctx.needs_input_grad[1]:
                ends = offsets.tolist()  # host sync: double backward only
                dw = torch.stack([x[start:end].t() @ dy[start:end] for start, end in zip([0, *ends[:-1]], ends)])
            return dx, dw, None
        dx = _mm(dy, w.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
        dw = _mm_dw(x, dy, offsets, like=w) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Plain per-group loop with autograd through torch ops (any dtype, e.g. the fp64 oracle)."""
    out = []
    start = 0
    for g, end in enumerate(offsets.tolist()):
        out.append(x[start:end] @ w[g])
        start = end
    return torch.cat(out) if out else x.new_empty(0, w.shape[2])


# --------------------------------------------------------------------------------------------
# dispatcher
# --------------------------------------------------------------------------------------------


def _check_offsets(offsets: torch.Tensor, rows: int) -> None:
    """Host-side check of CPU offsets: non-decreasing from 0 (an empty offsets tensor holds no rows), last == rows."""
    bounds = torch.cat([offsets.new_zeros(1), offsets]).long()
    if bool((bounds.diff() < 0).any()) or int(bounds[-1]) != rows:
        shown = offsets.tolist()
        raise ValueError(f"offsets must be non-decreasing cumulative row ends from >= 0 to offsets[-1] == M = {rows}"
                         f"; got {shown[:12]}{' ...' if len(shown) > 12 else ''}")


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Grouped matmul: x [M, K], w [G, K, N] (any strides), offsets [G] int32 -> y [M, N].

    Rows offsets[g-1]:offsets[g] of x are multiplied by w[g]; offsets must be non-decreasing from >= 0 with
    offsets[-1] == M: a ValueError where offsets live on the host, not checked on a GPU (that would need a host
    sync). There the Triton kernels clamp bad offsets so they never touch memory outside x, w and y; rows past
    offsets[-1] are then left unwritten. backend: "auto" | "triton" | "torch".
    """
    if x.dim() != 2 or w.dim() != 3 or offsets.dim() != 1:
        raise ValueError(f"expected x [M,K], w [G,K,N], offsets [G]; got {tuple(x.shape)}, {tuple(w.shape)}, "
                         f"{tuple(offsets.shape)}")
    if x.shape[1] != w.shape[1] or offsets.shape[0] != w.shape[0]:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w {tuple(w.shape)}, offsets {tuple(offsets.shape)}")
    if offsets.dtype != torch.int32:
        raise TypeError(f"offsets must be int32, got {offsets.dtype}")
    if x.dtype != w.dtype:
        raise TypeError(f"x and w dtypes differ: {x.dtype} vs {w.dtype}")
    if offsets.device.type == "cpu":  # free on the host; bad offsets leave rows of y uninitialised
        _check_offsets(offsets, x.shape[0])
    return grouped_mm_unchecked(x, w, offsets, backend)


def grouped_mm_unchecked(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, backend: str) -> torch.Tensor:
    """grouped_mm without its input checks, for callers whose offsets are valid by construction
    (kernels.moe_mlp: the routing's), so the MoE path reads nothing on the host even on CPU."""
    if backend == "auto":
        backend = "triton" if x.is_cuda and x.dtype in TRITON_DTYPES else "torch"
    if backend == "triton":
        check_triton_dtype(x, "x and w")
        check_triton_device(x)
        return _TritonGroupedMM.apply(x, w, offsets)
    if backend == "torch":
        return _TorchGroupedMM.apply(x, w, offsets)
    raise ValueError(f"unknown backend {backend!r}; valid: 'auto', 'triton', 'torch'")


def aot_configs(fwd: dict[str, int] | None = None, dw: dict[str, int] | None = None, prefix: str = "grouped_mm"
                ) -> list[dict[str, Any]]:
    """sm_90 compile targets (kernels.aot) of the forward / dX / dW kernels at the given tile configs
    (default: FWD_CONFIG, DW_CONFIG), bf16 at Qwen3-30B-A3B shapes; names are prefix + _fwd/_dx/_dw."""
    fwd = {**FWD_CONFIG, **(fwd or {})}
    dw = {**DW_CONFIG, **(dw or {})}
    ptr = "*bf16"
    fwd_sig = {"x_ptr": ptr, "w_ptr": ptr, "y_ptr": ptr, "offs_ptr": "*i32", "rows_ptr": "*i64", "G": "i32",
               "N": "i32", "K": "i32",
               "stride_xm": "i32", "stride_wg": "i32", "stride_wk": "i32", "stride_wn": "i32", "stride_ym": "i32"}
    fwd_const: dict[str, Any] = {"stride_xk": 1, "stride_yn": 1, "EVEN_K": True, "GATHER": False, "SWIGLU": False,
                                 "STORE_H": False, "h_ptr": None, "stride_hm": 0, "TMA": bool(fwd["TMA"]),
                                 **{k: v for k, v in fwd.items() if k.startswith("BLOCK")}}
    fwd_sig["M"] = "i32"
    fn = _grouped_mm_fwd_kernel
    fwd_sig["NUM_PROGRAMS"] = "i32"
    # what the JIT marks 16-divisible at Qwen3-30B-A3B shapes: aligned pointers, sizes and strides
    # (2048, 1536, 768, expert strides); G = 128 too, NUM_PROGRAMS (the SM count, 132) is not
    fwd_div = [k for k in fwd_sig if k != "NUM_PROGRAMS"]
    dw_sig = {"x_ptr": ptr, "dy_ptr": ptr, "dw_ptr": ptr, "offs_ptr": "*i32", "order_ptr": "*i32", "rows_ptr": "*i64",
              "K": "i32", "N": "i32",
              "stride_xm": "i32", "stride_dym": "i32", "stride_dwg": "i32", "stride_dwk": "i32", "stride_dwn": "i32"}
    dw_const = {"stride_xk": 1, "stride_dyn": 1, "GATHER": False, "TMA": bool(dw["TMA"]),
                **{k: v for k, v in dw.items() if k.startswith("BLOCK")}}
    fwd_opts = {"num_warps": fwd["num_warps"], "num_stages": fwd["num_stages"]}
    configs = []
    # The JIT specialises an int arg equal to 1 as a constant, so the unit stride of w picks the
    # binary: the forward reads w = gate_up_proj^T / down_proj^T views (unit stride along K), dX
    # reads their transposes (unit stride along N).
    for name, unit in (("fwd", "stride_wk"), ("dx", "stride_wn")):
        sig = {k: v for k, v in fwd_sig.items() if k != unit}
        configs.append({"name": f"{prefix}_{name}", "fn": fn, "signature": sig,
                        "constexprs": {**fwd_const, unit: 1, "W_KMAJOR": unit == "stride_wk"}, **fwd_opts,
                        "divisible_by_16": [k for k in fwd_div if k != unit]})
    # dW is written in w's layout: [E, 2I, H] / [E, H, I] parameters seen as [E, K, N] -> unit stride along K
    dw_sig.pop("stride_dwk")
    configs.append({"name": f"{prefix}_dw", "fn": _grouped_mm_dw_kernel, "signature": dw_sig,
                    "constexprs": {**dw_const, "stride_dwk": 1}, "num_warps": dw["num_warps"],
                    "num_stages": dw["num_stages"], "divisible_by_16": list(dw_sig)})
    # the gathered forms (kernels.moe_mlp with GATHER_IN_GEMM): gate_up's forward and dW read x rows by index
    configs.append({**configs[0], "name": f"{prefix}_fwd_gather", "constexprs": {**configs[0]["constexprs"],
                                                                                  "GATHER": True}})
    configs.append({**configs[2], "name": f"{prefix}_dw_gather", "constexprs": {**configs[2]["constexprs"],
                                                                                 "GATHER": True}})
    # gate_up with the SwiGLU epilogue (kernels.moe_mlp): training (h stored for the backward), no-grad, gathered
    for name, store_h, gather in (("fwd_swiglu", True, False), ("fwd_swiglu_nograd", False, False),
                                  ("fwd_swiglu_gather", True, True)):
        const = {**configs[0]["constexprs"], "GATHER": gather, "SWIGLU": True, "STORE_H": store_h}
        sig, div = dict(configs[0]["signature"]), list(configs[0]["divisible_by_16"])
        if store_h:
            del const["h_ptr"], const["stride_hm"]
            sig.update(h_ptr=ptr, stride_hm="i32")
            div += ["h_ptr", "stride_hm"]
        configs.append({**configs[0], "name": f"{prefix}_{name}", "signature": sig, "constexprs": const,
                        "divisible_by_16": div})
    return configs


# Production sm_90 compile targets (bf16, Qwen3-30B-A3B): x and y row-major (unit inner stride, as
# the JIT specialises it); w's strides are runtime values so one binary serves the forward
# (w = gate_up_proj^T / down_proj^T views) and dX (w^T views) alike.
AOT_CONFIGS: list[dict[str, Any]] = aot_configs()
