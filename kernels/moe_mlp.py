"""Qwen3-MoE expert MLP on routed tokens: permute -> gate_up grouped GEMM -> SwiGLU -> down grouped GEMM
-> weighted combine.

Weights are in transformers 5's fused `Qwen3MoeExperts` layout, used as they are (no copies):
    gate_up_proj [E, 2I, H]  rows 0:I are the gate projection, rows I:2I the up projection
    down_proj    [E, H, I]
so expert e computes  down_proj[e] @ (silu(gate_e x) * (up_e x)). The grouped GEMMs read
`gate_up_proj.transpose(1, 2)` ([E, H, 2I]) and `down_proj.transpose(1, 2)` ([E, I, H]) as strided
views, and their weight gradients come back in the parameters' own layout.

With the triton backend SwiGLU's forward is the gate_up GEMM's epilogue (SWIGLU_IN_GEMM: each accumulator
tile holds matching gate and up columns, so a = silu(gate) * up is written directly; the [rows, 2I] product h
is written only when a gradient needs it, and never read back in the forward), and its backward one Triton
kernel that reads h and da and writes dh in place of the [rows, 2I] buffer the gate_up GEMM's dX needs. The
standalone SwiGLU kernel serves the unfused path. Liger's SwiGLU takes gate and up as separate contiguous
tensors and returns their gradients separately, which here would cost a copy each way; torch's silu * mul on
the strided halves ran 1 ms forward and ~4.5 ms backward on an H200 at 32K tokens x top-8.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import tuned
from kernels.dtypes import TRITON_DTYPES, check_first_backward, check_triton_device, check_triton_dtype
from kernels.grouped_mm import _triton_dw, _triton_fwd, grouped_mm_unchecked
from kernels.moe_route import Routing, _triton_combine, _use_triton

# triton backend: the gate_up GEMM reads each permuted row straight from x through its token index (forward
# and dW), so the [T*k, H] permuted copy of x is neither written nor kept for the backward (1 GiB per layer at
# 32K tokens, H 2048, top-8; its gather took 0.55 ms of a 5.3 ms forward on an H200). Off until an H200 run
# of bench.moe (row ours_triton_gather) shows the gathered A loads keep the GEMM's speed. None: this GPU's
# tuned setting (kernels/tuned.py, written by bench.moe --save-tuned), else off; True / False force it.
GATHER_IN_GEMM: bool | None = None
# triton backend: SwiGLU in the gate_up GEMM's epilogue (on: the standalone SwiGLU kernel's read of h, 0.28 ms
# of the 5.3 ms forward on an H200, and, without grad, h's write disappear). None: this GPU's tuned setting,
# else on; True / False force it.
SWIGLU_IN_GEMM: bool | None = None
_DEFAULTS = {"GATHER_IN_GEMM": False, "SWIGLU_IN_GEMM": True}


def _setting(name: str, device: torch.device) -> bool:
    forced = globals()[name]
    if forced is not None:
        return bool(forced)
    return bool(tuned.values("moe_mlp", device, list(_DEFAULTS)).get(name, _DEFAULTS[name]))


def gather_in_gemm(device: torch.device) -> bool:
    """Whether expert_mlp's Triton path gathers x rows inside the gate_up GEMM on `device` (GATHER_IN_GEMM
    resolved)."""
    return _setting("GATHER_IN_GEMM", device)


def swiglu_in_gemm(device: torch.device) -> bool:
    """Whether expert_mlp's Triton path computes SwiGLU in the gate_up GEMM's epilogue on `device`
    (SWIGLU_IN_GEMM resolved)."""
    return _setting("SWIGLU_IN_GEMM", device)


@triton.jit
def _swiglu_tile(Hp, M, I, stride_h, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_I] tile: rows, columns, mask, and gate g = H[m, i], up u = H[m, I + i]
    in fp32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok = (rows[:, None] < M) & (cols[None, :] < I)
    hp = Hp + rows[:, None] * stride_h + cols[None, :]
    g = tl.load(hp, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(hp + I, mask=ok, other=0.0).to(tl.float32)
    return rows, cols, ok, g, u


@triton.jit
def _swiglu_fwd_kernel(Hp, A, M, I, stride_h, stride_a, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    """A[m, i] = silu(H[m, i]) * H[m, I + i], in fp32."""
    rows, cols, ok, g, u = _swiglu_tile(Hp, M, I, stride_h, BLOCK_M, BLOCK_I)
    a = g * tl.sigmoid(g) * u
    tl.store(A + rows[:, None] * stride_a + cols[None, :], a.to(A.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(Hp, DA, DH, M, I, stride_h, stride_da, stride_dh, BLOCK_M: tl.constexpr,
                       BLOCK_I: tl.constexpr):
    """DH[m, i] = DA * u * silu'(g), DH[m, I + i] = DA * silu(g), with g = H[m, i], u = H[m, I + i]."""
    rows, cols, ok, g, u = _swiglu_tile(Hp, M, I, stride_h, BLOCK_M, BLOCK_I)
    da = tl.load(DA + rows[:, None] * stride_da + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = da * u * (sig + silu * (1.0 - sig))
    dp = DH + rows[:, None] * stride_dh + cols[None, :]
    tl.store(dp, dg.to(DH.dtype.element_ty), mask=ok)
    tl.store(dp + I, (da * silu).to(DH.dtype.element_ty), mask=ok)


def _swiglu_grid(m: int, inter: int) -> tuple[tuple[int, int], dict[str, int]]:
    block_i = min(1024, triton.next_power_of_2(inter))
    block_m = max(1, 4096 // block_i)  # 4K elements per program: 32 per thread at 4 warps
    return (triton.cdiv(m, block_m), triton.cdiv(inter, block_i)), {"BLOCK_M": block_m, "BLOCK_I": block_i}


class _SwiGLU(torch.autograd.Function):
    """h [M, 2I] (gate | up, unit last stride) -> silu(gate) * up [M, I]; backward -> dh [M, 2I]."""

    @staticmethod
    def forward(ctx, h):
        m, inter = h.shape[0], h.shape[1] // 2
        a = torch.empty(m, inter, device=h.device, dtype=h.dtype)
        if m:
            grid, meta = _swiglu_grid(m, inter)
            _swiglu_fwd_kernel[grid](h, a, m, inter, h.stride(0), a.stride(0), **meta)
        ctx.save_for_backward(h)
        return a

    @staticmethod
    def backward(ctx, da):
        check_first_backward("swiglu")
        (h,) = ctx.saved_tensors
        return _swiglu_backward(h, da)


def _swiglu_backward(h: torch.Tensor, da: torch.Tensor) -> torch.Tensor:
    """dh [M, 2I] of a = silu(gate) * up given h [M, 2I] (gate | up) and da [M, I]."""
    m, inter = h.shape[0], h.shape[1] // 2
    da = da if da.stride(-1) == 1 else da.contiguous()
    dh = torch.empty(m, 2 * inter, device=h.device, dtype=h.dtype)
    if m:
        grid, meta = _swiglu_grid(m, inter)
        _swiglu_bwd_kernel[grid](h, da, dh, m, inter, h.stride(0), da.stride(0), dh.stride(0), **meta)
    return dh


class _GateUp(torch.autograd.Function):
    """The gate_up grouped GEMM in its fused forms: x [M, H] (permuted copies, rows None) or x [T, H] read by
    token index (rows [T*k] int64: no permuted copy); with swiglu the result is a = silu(gate) * up [M, I] from
    the GEMM's epilogue, else h [M, 2I]. Backward: dh (by the SwiGLU backward kernel from the saved h when
    swiglu), dX by the grouped GEMM on w^T (summed back to tokens by the combine kernel, as permute's backward,
    when gathered), dW by the grouped dW kernel (reading x rows by index when gathered)."""

    @staticmethod
    def forward(ctx, x, w, offsets, rows, inverse, top_k, swiglu, keep_h):
        m = x.shape[0] if rows is None else rows.shape[0]
        h = None
        if swiglu:
            # the product is kept only for a backward (keep_h; not for rollouts or reference log-probs)
            if keep_h:
                h = torch.empty(m, w.shape[2], dtype=x.dtype, device=x.device)
            out = _triton_fwd(x, w, offsets, rows=rows, swiglu=True, h_out=h)
        else:
            out = _triton_fwd(x, w, offsets, rows=rows)
        ctx.save_for_backward(x, w, offsets, rows, inverse, h)
        ctx.top_k, ctx.swiglu = top_k, swiglu
        return out

    @staticmethod
    def backward(ctx, grad):
        check_first_backward("expert_mlp")
        x, w, offsets, rows, inverse, h = ctx.saved_tensors
        if ctx.swiglu and h is None:
            raise RuntimeError("expert_mlp ran its forward without keeping the gate_up product (keep_h=False)")
        dh = _swiglu_backward(h, grad) if ctx.swiglu else (grad if grad.stride(-1) == 1 else grad.contiguous())
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _triton_fwd(dh, w.transpose(1, 2), offsets)
            if rows is not None:
                dx = _triton_combine(dx, inverse, None, x.shape[0], ctx.top_k)
        if ctx.needs_input_grad[1]:
            dw = _triton_dw(x, dh, offsets, like=w, rows=rows)
        return dx, dw, None, None, None, None, None, None


def swiglu(h: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """h [M, 2I] laid out gate | up (transformers' chunk(2) order) -> silu(gate) * up [M, I] in h's dtype."""
    if h.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dimension (gate | up), got shape {tuple(h.shape)}")
    inter = h.shape[-1] // 2
    if _use_triton(backend, h) and h.dim() == 2 and h.stride(-1) == 1:
        return _SwiGLU.apply(h)
    return F.silu(h[..., :inter]) * h[..., inter:]


def expert_mlp(x: torch.Tensor, routing: Routing, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
               backend: str = "auto") -> torch.Tensor:
    """x [T, H], routing from kernels.moe_route, gate_up_proj [E, 2I, H], down_proj [E, H, I] -> y [T, H].

    x and both weights share one dtype (the triton backend: fp32, fp16 or bf16).
    y[t] = sum_j routing.weights[t, j] * expert_{ids[t, j]}(x[t]), in x's dtype. Differentiable
    w.r.t. x, both weights and (through routing.weights) the router logits. No host sync.
    """
    if x.dim() != 2 or gate_up_proj.dim() != 3 or down_proj.dim() != 3:
        raise ValueError(f"expected x [T, H], gate_up_proj [E, 2I, H], down_proj [E, H, I]; got {tuple(x.shape)}, "
                         f"{tuple(gate_up_proj.shape)}, {tuple(down_proj.shape)}")
    num_experts, two_i, hidden = gate_up_proj.shape
    if down_proj.shape != (num_experts, hidden, two_i // 2) or x.shape[-1] != hidden or two_i % 2:
        raise ValueError(f"shapes: x {tuple(x.shape)}, gate_up_proj {tuple(gate_up_proj.shape)}, "
                         f"down_proj {tuple(down_proj.shape)}")
    if num_experts != routing.num_experts or x.shape[0] != routing.num_tokens:
        raise ValueError(f"the routing is for {routing.num_tokens} tokens over {routing.num_experts} experts; got x "
                         f"{tuple(x.shape)} and {num_experts} experts in gate_up_proj")
    if not x.dtype == gate_up_proj.dtype == down_proj.dtype:
        raise TypeError(f"x, gate_up_proj and down_proj must share one dtype; got {x.dtype}, {gate_up_proj.dtype}, "
                        f"{down_proj.dtype}")
    if backend == "triton":
        check_triton_dtype(x, "x and expert weights")
        check_triton_device(x)
    # "auto" on CUDA: dtypes the grouped GEMM kernels do not take (fp64) go the torch way
    triton_path = _use_triton(backend, x) and x.stride(-1) == 1 and x.dtype in TRITON_DTYPES
    gather = triton_path and gather_in_gemm(x.device)
    fuse = triton_path and swiglu_in_gemm(x.device)
    if gather or fuse:
        src = x if gather else routing.permute(x, backend)  # [T, H] read by token index, or [T*k, H] copies
        # inside the Function grad mode is off and needs_input_grad ignores it: decide here whether a backward comes
        keep_h = torch.is_grad_enabled() and (src.requires_grad or gate_up_proj.requires_grad)
        out = _GateUp.apply(src, gate_up_proj.transpose(1, 2), routing.offsets,
                            routing.order // routing.top_k if gather else None, routing.inverse if gather else None,
                            routing.top_k, fuse, keep_h)  # rows grouped by expert
        a = out if fuse else swiglu(out, backend)  # [T*k, I]
    else:
        xp = routing.permute(x, backend)  # [T*k, H], rows grouped by expert
        h = grouped_mm_unchecked(xp, gate_up_proj.transpose(1, 2), routing.offsets, backend)  # [T*k, 2I]
        a = swiglu(h, backend)  # gate first, as transformers' chunk(2) reads it
    yp = grouped_mm_unchecked(a, down_proj.transpose(1, 2), routing.offsets, backend)  # [T*k, H]
    return routing.unpermute(yp, backend)


def _swiglu_aot(name: str, fn: Any, pointers: list[str], strides: list[str]) -> dict[str, Any]:
    _, meta = _swiglu_grid(1, 768)  # Qwen3-30B-A3B's expert width
    return {"name": name, "fn": fn,
            "signature": {**dict.fromkeys(pointers, "*bf16"), "M": "i32", "I": "i32", **dict.fromkeys(strides, "i32")},
            "constexprs": meta, "num_warps": 4, "num_stages": 1, "divisible_by_16": [*pointers, "I", *strides]}


# kernels.aot descriptions (bf16, I 768), as _SwiGLU launches them
AOT_CONFIGS: list[dict[str, Any]] = [
    _swiglu_aot("swiglu_fwd", _swiglu_fwd_kernel, ["Hp", "A"], ["stride_h", "stride_a"]),
    _swiglu_aot("swiglu_bwd", _swiglu_bwd_kernel, ["Hp", "DA", "DH"], ["stride_h", "stride_da", "stride_dh"]),
]
