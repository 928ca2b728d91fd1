"""Qwen3-MoE token routing: top-k experts per token, tokens sorted by expert, permute / unpermute.

Routing follows transformers' `Qwen3MoeTopKRouter`: softmax over experts in fp32, top-k, optional
renormalisation of the k probabilities (`norm_topk_prob`), weights cast back to the logits' dtype.
The T*k token copies are then sorted (stably) by expert id so that each expert's rows are one
contiguous slice of the permuted activations, described by int32 cumulative `offsets` — the layout
`kernels.grouped_mm` consumes.

Nothing here synchronises with the host: group sizes stay on the device (a binary search in the
sorted expert ids, not bincount, which reads the max on the host; no nonzero / item / tolist), so the
whole MoE layer can be captured in a CUDA graph. Everything is differentiable w.r.t. the router logits (through the
routing weights) and the activations (through permute / unpermute).

permute / unpermute take a backend: "torch" (gathers + a batched matmul) or "triton" (the k-way
weighted combine of unpermute, its backward, and permute's backward as one Triton gather-reduce
kernel each: one program per token reads its k permuted rows and accumulates in fp32; on an H200 the
torch ops for these took ~5 ms of a 23 ms MoE MLP fwd+bwd at 32K tokens). "auto": triton on CUDA.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from kernels.dtypes import TRITON_DTYPES, check_first_backward, check_triton_device


@dataclass
class Routing:
    """Routing of T tokens to E experts, k per token.

    weights     [T, k]  logits' dtype, differentiable: combine weight of each (token, slot)
    expert_ids  [T, k]  int64: expert of each (token, slot)
    order       [T*k]   int64: order[p] = flat (token*k + slot) index of permuted row p
    inverse     [T*k]   int64: inverse[token*k + slot] = permuted row of that copy
    offsets     [E]     int32: cumulative row ends of each expert's slice in permuted order
    counts      [E]     int32: rows per expert (offsets = cumsum(counts))
    agreement   [2]     fp64 or None: with replayed experts, (rows whose replayed experts are the router's own top-k,
                        rows replayed); None without
    """

    weights: torch.Tensor
    expert_ids: torch.Tensor
    order: torch.Tensor
    inverse: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    top_k: int
    num_experts: int
    agreement: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.weights.shape[0]

    def permute(self, x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """x [T, H] -> [T*k, H]: row p is token order[p] // k; rows grouped by expert."""
        self._check_rows(x, self.num_tokens, "x", "T")
        return _Permute.apply(x, self.order, self.inverse, self.top_k, _use_triton(backend, x))

    def unpermute(self, y: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """y [T*k, H] (permuted order) -> [T, H]: out[t] = sum_j weights[t, j] * y[inverse[t*k + j]]."""
        self._check_rows(y, self.num_tokens * self.top_k, "y", "T*k")
        if not y.is_floating_point():  # the weights are cast to y's dtype: integers would combine with weight 0
            raise TypeError(f"y must be a floating-point tensor, got {y.dtype}")
        return _Unpermute.apply(y, self.weights.to(y.dtype), self.order, self.inverse, _use_triton(backend, y))

    def _check_rows(self, t: torch.Tensor, rows: int, name: str, what: str) -> None:
        if t.dim() != 2 or t.shape[0] != rows:
            raise ValueError(f"{name} must be [{what}, H] = [{rows}, H] for this routing "
                             f"({self.num_tokens} tokens, top-{self.top_k}); got {tuple(t.shape)}")


def _use_triton(backend: str, t: torch.Tensor) -> bool:
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown backend {backend!r}; valid: 'auto', 'triton', 'torch'")
    # one program holds a whole row (see _combine_kernel); wider rows take the torch path, and so do empty ones
    # (a BLOCK_H of next_power_of_2(0) = 1 makes no valid launch)
    # auto: fp64 goes to torch, since the kernels compute in fp32 (kernels.dtypes)
    auto = backend == "auto" and t.is_cuda and t.dtype in TRITON_DTYPES
    use = (backend == "triton" or auto) and 0 < t.shape[-1] <= MAX_TRITON_ROW
    if use and backend == "triton":
        check_triton_device(t)
    return use


# --------------------------------------------------------------------------------------------
# Triton gather-reduce kernels: one program per token, its whole row of H in registers
# --------------------------------------------------------------------------------------------

MAX_TRITON_ROW = 16384


@triton.jit
def _combine_kernel(Y, W, IDX, OUT, H, stride_y, stride_o, K: tl.constexpr, HAS_W: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    """OUT[t] = sum_j W[t, j] * Y[IDX[t*K + j]] (W = 1 without HAS_W), summed in fp32."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    ok = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(K):
        row = tl.load(IDX + t * K + j)
        y = tl.load(Y + row * stride_y + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_W:
            y *= tl.load(W + t * K + j).to(tl.float32)
        acc += y
    tl.store(OUT + t * stride_o + offs, acc.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _combine_bwd_kernel(G, Y, W, IDX, DY, DW, H, stride_g, stride_y, stride_dy, K: tl.constexpr,
                        NEED_DY: tl.constexpr, NEED_DW: tl.constexpr, BLOCK_H: tl.constexpr):
    """Backward of _combine_kernel for token t: DY[IDX[t*K + j]] = W[t, j] * G[t] (a scatter to distinct rows:
    IDX is a permutation) and DW[t, j] = <Y[IDX[t*K + j]], G[t]> in fp32."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    ok = offs < H
    g = tl.load(G + t * stride_g + offs, mask=ok, other=0.0).to(tl.float32)
    for j in tl.static_range(K):
        row = tl.load(IDX + t * K + j)
        if NEED_DY:
            w = tl.load(W + t * K + j).to(tl.float32)
            tl.store(DY + row * stride_dy + offs, (w * g).to(DY.dtype.element_ty), mask=ok)
        if NEED_DW:
            y = tl.load(Y + row * stride_y + offs, mask=ok, other=0.0).to(tl.float32)
            tl.store(DW + t * K + j, tl.sum(y * g, 0).to(DW.dtype.element_ty))


def _row_launch(h: int) -> dict[str, int]:
    block = triton.next_power_of_2(h)
    return {"BLOCK_H": block, "num_warps": max(1, min(16, block // 256))}


def _triton_combine(y: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor | None, tokens: int, k: int
                    ) -> torch.Tensor:
    """[tokens, H] = sum over j of (weights[t, j] *) y[idx[t*k + j]]; y [T*k, H] with unit last stride."""
    y = y if y.stride(-1) == 1 else y.contiguous()
    out = torch.empty(tokens, y.shape[1], device=y.device, dtype=y.dtype)
    if tokens:
        _combine_kernel[(tokens,)](y, weights if weights is not None else y, idx, out, y.shape[1], y.stride(0),
                                   out.stride(0), K=k, HAS_W=weights is not None, **_row_launch(y.shape[1]))
    return out


class _Permute(torch.autograd.Function):
    """Gather of token rows into expert order; backward is a gather + k-way sum (no atomics)."""

    @staticmethod
    def forward(ctx, x, order, inverse, top_k, use_triton):
        ctx.save_for_backward(inverse)
        ctx.top_k, ctx.use_triton = top_k, use_triton
        return x[order // top_k]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        if ctx.use_triton:
            check_first_backward("Routing.permute")
            return _triton_combine(grad, inverse, None, inverse.numel() // ctx.top_k, ctx.top_k), None, None, None, None
        g = grad[inverse].view(inverse.numel() // ctx.top_k, ctx.top_k, grad.shape[-1])  # not -1: H may be 0
        return g.sum(1), None, None, None, None  # reductions accumulate in fp32 for bf16 inputs


class _Unpermute(torch.autograd.Function):
    """Weighted k-way combine back to token order. Both directions are gathers (the inverse of a
    permutation is a permutation), so there is no scatter-add, no atomics and no index_put."""

    @staticmethod
    def forward(ctx, y, weights, order, inverse, use_triton):
        t, k = weights.shape
        ctx.save_for_backward(y, weights, order, inverse)
        ctx.use_triton = use_triton
        if use_triton:
            return _triton_combine(y, inverse, weights.contiguous(), t, k)
        y_tok = y[inverse].view(t, k, y.shape[-1])
        # bmm accumulates the k-term sum in fp32 on GPU even for bf16 operands
        return torch.bmm(weights.unsqueeze(1), y_tok).squeeze(1)

    @staticmethod
    def backward(ctx, grad):
        y, weights, order, inverse = ctx.saved_tensors
        t, k = weights.shape
        need_dy, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy = dw = None
        if ctx.use_triton:
            check_first_backward("Routing.unpermute")
        if ctx.use_triton and t and (need_dy or need_dw):
            grad = grad if grad.stride(-1) == 1 else grad.contiguous()
            y = y if y.stride(-1) == 1 else y.contiguous()
            weights = weights.contiguous()
            dy = torch.empty_like(y, memory_format=torch.contiguous_format) if need_dy else None
            dw = torch.empty_like(weights) if need_dw else None
            _combine_bwd_kernel[(t,)](grad, y, weights, inverse, dy if need_dy else y, dw if need_dw else weights,
                                      y.shape[1], grad.stride(0), y.stride(0), dy.stride(0) if need_dy else 0,
                                      K=k, NEED_DY=need_dy, NEED_DW=need_dw, **_row_launch(y.shape[1]))
            return dy, dw, None, None, None
        if need_dy:
            # permuted row p is copy order[p] = (token, slot): d y[p] = weights[token, slot] * grad[token]
            dy = grad[order // k] * weights.reshape(-1)[order].unsqueeze(1)
        if need_dw:
            y_tok = y[inverse].view(t, k, y.shape[-1])
            dw = torch.bmm(y_tok, grad.unsqueeze(2)).squeeze(2)
        return dy, dw, None, None, None


@triton.jit
def _topk_kernel(L, W, IDS, T, E, stride_l, K: tl.constexpr, NORM: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """BLOCK_T tokens: softmax over the E logits in fp32, the K largest probabilities in descending order (ties:
    the lower expert id first) and, with NORM, divided by their sum. W [T, K] in L's dtype, IDS [T, K] int64."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    x = tl.load(L + rows[:, None] * stride_l + cols[None, :], mask=row_ok[:, None] & (cols < E)[None, :],
                other=float("-inf")).to(tl.float32)
    x = tl.where(row_ok[:, None], x, 0.0)  # rows past T: finite, never stored
    p = tl.exp(x - tl.max(x, 1)[:, None])
    p = p / tl.sum(p, 1)[:, None]
    # a row with NaN (or only -inf) logits has NaN probabilities, which compare false with everything: rank them
    # below every real probability but above taken (-1) and padded (-2) columns, so the ids stay in [0, E)
    p = tl.where(p == p, p, -0.5)
    p = tl.where((cols < E)[None, :], p, -2.0)
    w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(K):
        best = tl.max(p, 1)
        # the lowest column holding the maximum (explicit: ties resolve the same way on every GPU and layout)
        pick = tl.min(tl.where(p == best[:, None], cols[None, :], BLOCK_E), 1)
        w = tl.where(slots[None, :] == j, tl.where(best >= 0, best, float("nan"))[:, None], w)  # NaN in, NaN out
        ids = tl.where(slots[None, :] == j, pick[:, None], ids)
        p = tl.where(cols[None, :] == pick[:, None], -1.0, p)  # taken: below every probability
    if NORM:
        w = w / tl.sum(w, 1)[:, None]  # unused slots hold 0
    ok = row_ok[:, None] & (slots < K)[None, :]
    out = rows[:, None] * K + slots[None, :]
    tl.store(W + out, w.to(W.dtype.element_ty), mask=ok)
    tl.store(IDS + out, ids.to(tl.int64), mask=ok)


def _topk_launch(num_experts: int, top_k: int) -> dict[str, int]:
    block_e = triton.next_power_of_2(num_experts)
    return {"BLOCK_T": max(1, 4096 // block_e), "BLOCK_E": block_e, "BLOCK_K": triton.next_power_of_2(top_k),
            "num_warps": 4}


def _route_topk_torch(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool,
                      expert_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' routing in torch ops; with expert_ids given, the weights of those experts (the Triton
    path's backward recomputes them through autograd)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    if expert_ids is None:
        # transformers' own op: among equal probabilities it picks as it does (the Triton kernel takes the lowest
        # ids), so that this path is the exact oracle of transformers' block, ties included
        top_w, top_i = torch.topk(probs, top_k, dim=-1)
    else:
        top_i = expert_ids
        top_w = probs.gather(1, top_i)
    if norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return top_w.to(router_logits.dtype), top_i


class _RouteTopK(torch.autograd.Function):
    """Routing by _topk_kernel (one pass over the logits; torch's softmax + topk took ~0.24 ms of a 5.3 ms MoE
    forward on an H200 at 32K tokens). Backward: the weights' gradient w.r.t. the logits, through torch's
    softmax / gather / renormalisation on the chosen experts."""

    @staticmethod
    def forward(ctx, logits, top_k, norm):
        t, e = logits.shape
        weights = torch.empty(t, top_k, device=logits.device, dtype=logits.dtype)
        ids = torch.empty(t, top_k, device=logits.device, dtype=torch.int64)
        if t:
            launch = _topk_launch(e, top_k)
            _topk_kernel[(triton.cdiv(t, launch["BLOCK_T"]),)](logits, weights, ids, t, e, logits.stride(0),
                                                               K=top_k, NORM=norm, **launch)
        ctx.save_for_backward(logits, ids)
        ctx.norm = norm
        ctx.mark_non_differentiable(ids)
        return weights, ids

    @staticmethod
    def backward(ctx, grad_w, _grad_ids):
        check_first_backward("route_topk")  # the torch ops below run on a detached copy of the logits
        logits, ids = ctx.saved_tensors
        with torch.enable_grad():
            x = logits.detach().requires_grad_()
            w, _ = _route_topk_torch(x, ids.shape[1], ctx.norm, expert_ids=ids)
            (grad,) = torch.autograd.grad(w, x, grad_w)
        return grad, None, None


def _int_top_k(top_k: Any) -> int:
    """top_k as a Python int (it sizes the outputs and is a Triton constexpr); anything int-like is taken."""
    if isinstance(top_k, bool):
        raise TypeError(f"top_k must be an int, got {top_k!r}")
    try:
        return operator.index(top_k)
    except TypeError:
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__} {top_k!r}") from None


def route_topk(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True, backend: str = "auto"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE top-k: (weights [T, k] in the logits' dtype, expert ids [T, k] int64, probabilities descending).
    backend "triton" (one kernel; "auto" on CUDA) or "torch" (softmax + torch.topk, as transformers routes). Among
    equal probabilities (bf16 logits tie often) the Triton kernel takes the lowest expert ids, whatever the logits'
    layout; torch.topk takes them as it does (on the CPU not the lowest), so the two backends can route a tied
    token to different (equally weighted) experts: compare them on untied logits."""
    if not router_logits.is_floating_point():  # the weights come back in the logits' dtype: ints would be 0
        raise TypeError(f"router_logits must be a floating-point tensor, got {router_logits.dtype}")
    top_k = _int_top_k(top_k)
    if not 1 <= top_k <= router_logits.shape[-1]:
        raise ValueError(f"top_k must be in [1, {router_logits.shape[-1]}] (the number of experts), got {top_k}")
    if _use_triton(backend, router_logits):
        return _RouteTopK.apply(router_logits.contiguous(), top_k, norm_topk_prob)
    return _route_topk_torch(router_logits, top_k, norm_topk_prob)


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """expert_ids [T, k] -> (order, inverse, offsets, counts); see Routing. Host-sync free."""
    flat = expert_ids.reshape(-1)
    # stable: copies of one expert keep token order, so results do not depend on the sort's whims. 16-bit keys:
    # the CUDA radix sort makes one pass per key byte (2 instead of 8 for int64 ids)
    keys = flat.to(torch.int16) if num_experts <= torch.iinfo(torch.int16).max else flat
    order = torch.argsort(keys, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    # group ends by binary search in the sorted ids: no atomics (a scatter-add of ones serialises on a hot
    # expert's counter) and no host sync (bincount reads the max on the host)
    experts = torch.arange(num_experts, device=flat.device, dtype=flat.dtype)
    offsets = torch.searchsorted(flat[order], experts, right=True).to(torch.int32)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    return order, inverse, offsets, counts


def replay_experts(router_logits: torch.Tensor, own_ids: torch.Tensor, expert_ids: torch.Tensor,
                   norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routing replay (R3: the experts the rollout engine chose, so that training routes as inference did).

    expert_ids [T, k] int: each token's experts; a row holding a negative entry has no record and keeps own_ids
    [T, k] (the router's own top-k). -> (weights [T, k] in the logits' dtype, ids [T, k] int64, agreement [2] fp64):
    the router's probabilities of those experts (renormalised over them with norm_topk_prob), differentiable w.r.t.
    the logits, as transformers' router weighs the experts it picks; (rows whose replayed experts are the router's
    own choice, rows replayed). Out-of-range or repeated experts in a row fail a device-side assert (no host
    sync)."""
    if expert_ids.shape != own_ids.shape or expert_ids.is_floating_point():
        raise ValueError(f"expert_ids must be an integer tensor of shape {tuple(own_ids.shape)} ([T, top_k]), got "
                         f"{expert_ids.dtype} {tuple(expert_ids.shape)}")
    given = expert_ids.to(device=own_ids.device, dtype=torch.int64)
    recorded = (given >= 0).all(dim=1, keepdim=True)
    ids = torch.where(recorded, given, own_ids)
    sorted_ids = ids.sort(dim=1).values
    if ids.numel():
        ok = (ids < router_logits.shape[1]).all() & (sorted_ids[:, 1:] != sorted_ids[:, :-1]).all()
        torch._assert_async(ok, "moe_route: replayed expert_ids hold an expert outside [0, E) or one twice in a row")
    same = (sorted_ids == own_ids.sort(dim=1).values).all(dim=1, keepdim=True) & recorded
    agreement = torch.stack([same.sum(), recorded.sum()]).double()
    return (*_route_topk_torch(router_logits, ids.shape[1], norm_topk_prob, expert_ids=ids), agreement)


def moe_route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True, backend: str = "auto",
              expert_ids: torch.Tensor | None = None) -> Routing:
    """Route tokens as Qwen3-MoE does and sort their copies by expert.

    router_logits [T, E] (any float dtype) -> Routing. Differentiable w.r.t. router_logits through
    Routing.weights. backend: the top-k's (see route_topk). expert_ids [T, top_k] int or None: replay these
    experts instead of the top-k (rows with a negative entry route by their own top-k; see replay_experts).
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got {tuple(router_logits.shape)}")
    num_experts, top_k = router_logits.shape[1], _int_top_k(top_k)
    weights, own_ids = route_topk(router_logits, top_k, norm_topk_prob, backend)
    agreement = None
    if expert_ids is None:
        expert_ids = own_ids
    else:
        weights, expert_ids, agreement = replay_experts(router_logits, own_ids, expert_ids, norm_topk_prob)
    order, inverse, offsets, counts = sort_by_expert(expert_ids, num_experts)
    return Routing(weights, expert_ids, order, inverse, offsets, counts, top_k, num_experts, agreement)


def _row_kernel_aot(name: str, fn: Any, signature: dict[str, str], constexprs: dict[str, Any], hidden: int,
                    aligned: list[str]) -> dict[str, Any]:
    launch = _row_launch(hidden)
    return {"name": name, "fn": fn, "signature": signature, "constexprs": {**constexprs, "BLOCK_H": launch["BLOCK_H"]},
            "num_warps": launch["num_warps"], "num_stages": 1, "divisible_by_16": aligned}


# kernels.aot descriptions at Qwen3-30B-A3B's shapes (H 2048, top-8, bf16), as the launchers run them
_TOPK_LAUNCH = _topk_launch(128, 8)
AOT_CONFIGS: list[dict[str, Any]] = [
    {"name": "moe_topk", "fn": _topk_kernel,
     "signature": {"L": "*bf16", "W": "*bf16", "IDS": "*i64", "T": "i32", "E": "i32", "stride_l": "i32"},
     "constexprs": {"K": 8, "NORM": True, **{k: v for k, v in _TOPK_LAUNCH.items() if k.startswith("BLOCK")}},
     "num_warps": _TOPK_LAUNCH["num_warps"], "num_stages": 1,
     "divisible_by_16": ["L", "W", "IDS", "T", "E", "stride_l"]},
    _row_kernel_aot("moe_combine", _combine_kernel,
                    {"Y": "*bf16", "W": "*bf16", "IDX": "*i64", "OUT": "*bf16", "H": "i32", "stride_y": "i32",
                     "stride_o": "i32"}, {"K": 8, "HAS_W": True}, 2048, ["Y", "W", "IDX", "OUT", "H", "stride_y",
                                                                           "stride_o"]),
    _row_kernel_aot("moe_combine_bwd", _combine_bwd_kernel,
                    {"G": "*bf16", "Y": "*bf16", "W": "*bf16", "IDX": "*i64", "DY": "*bf16", "DW": "*bf16", "H": "i32",
                     "stride_g": "i32", "stride_y": "i32", "stride_dy": "i32"},
                    {"K": 8, "NEED_DY": True, "NEED_DW": True}, 2048,
                    ["G", "Y", "W", "IDX", "DY", "DW", "H", "stride_g", "stride_y", "stride_dy"]),
]
