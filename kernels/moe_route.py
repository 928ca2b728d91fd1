"""Qwen3-MoE token routing: top-k experts per token, tokens sorted by expert, permute / unpermute.

Routing follows transformers' `Qwen3MoeTopKRouter`: softmax over experts in fp32, top-k, optional
renormalisation of the k probabilities (`norm_topk_prob`), weights cast back to the logits' dtype.
The T*k token copies are then sorted (stably) by expert id so that each expert's rows are one
contiguous slice of the permuted activations, described by int32 cumulative `offsets` — the layout
`kernels.grouped_mm` consumes.

Nothing here synchronises with the host: group sizes stay on the device (scatter_add of ones, not
bincount, which reads the max on the host; no nonzero / item / tolist), so the whole MoE layer can
be captured in a CUDA graph. Everything is differentiable w.r.t. the router logits (through the
routing weights) and the activations (through permute / unpermute).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Routing of T tokens to E experts, k per token.

    weights     [T, k]  logits' dtype, differentiable: combine weight of each (token, slot)
    expert_ids  [T, k]  int64: expert of each (token, slot)
    order       [T*k]   int64: order[p] = flat (token*k + slot) index of permuted row p
    inverse     [T*k]   int64: inverse[token*k + slot] = permuted row of that copy
    offsets     [E]     int32: cumulative row ends of each expert's slice in permuted order
    counts      [E]     int32: rows per expert (offsets = cumsum(counts))
    """

    weights: torch.Tensor
    expert_ids: torch.Tensor
    order: torch.Tensor
    inverse: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor
    top_k: int
    num_experts: int

    @property
    def num_tokens(self) -> int:
        return self.weights.shape[0]

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T*k, H]: row p is token order[p] // k; rows grouped by expert."""
        return _Permute.apply(x, self.order, self.inverse, self.top_k)

    def unpermute(self, y: torch.Tensor) -> torch.Tensor:
        """y [T*k, H] (permuted order) -> [T, H]: out[t] = sum_j weights[t, j] * y[inverse[t*k + j]]."""
        return _Unpermute.apply(y, self.weights.to(y.dtype), self.order, self.inverse)


class _Permute(torch.autograd.Function):
    """Gather of token rows into expert order; backward is a gather + k-way sum (no atomics)."""

    @staticmethod
    def forward(ctx, x, order, inverse, top_k):
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x[order // top_k]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        g = grad[inverse].view(-1, ctx.top_k, grad.shape[-1])
        return g.sum(1), None, None, None  # reductions accumulate in fp32 for bf16 inputs


class _Unpermute(torch.autograd.Function):
    """Weighted k-way combine back to token order. Both directions are gathers (the inverse of a
    permutation is a permutation), so there is no scatter, no atomics and no index_put."""

    @staticmethod
    def forward(ctx, y, weights, order, inverse):
        t, k = weights.shape
        y_tok = y[inverse].view(t, k, y.shape[-1])
        ctx.save_for_backward(y, weights, order, inverse)
        # bmm accumulates the k-term sum in fp32 on GPU even for bf16 operands
        return torch.bmm(weights.unsqueeze(1), y_tok).squeeze(1)

    @staticmethod
    def backward(ctx, grad):
        y, weights, order, inverse = ctx.saved_tensors
        t, k = weights.shape
        dy = dw = None
        if ctx.needs_input_grad[0]:
            # permuted row p is copy order[p] = (token, slot): d y[p] = weights[token, slot] * grad[token]
            dy = grad[order // k] * weights.reshape(-1)[order].unsqueeze(1)
        if ctx.needs_input_grad[1]:
            y_tok = y[inverse].view(t, k, y.shape[-1])
            dw = torch.bmm(y_tok, grad.unsqueeze(2)).squeeze(2)
        return dy, dw, None, None


def route_topk(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE top-k: (weights [T, k] in the logits' dtype, expert ids [T, k] int64)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    top_w, top_i = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return top_w.to(router_logits.dtype), top_i


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """expert_ids [T, k] -> (order, inverse, offsets, counts); see Routing. Host-sync free."""
    flat = expert_ids.reshape(-1)
    # stable: copies of one expert keep token order, so results do not depend on the sort's whims
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    return order, inverse, offsets, counts


def moe_route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True) -> Routing:
    """Route tokens as Qwen3-MoE does and sort their copies by expert.

    router_logits [T, E] (any float dtype) -> Routing. Differentiable w.r.t. router_logits through
    Routing.weights.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got {tuple(router_logits.shape)}")
    num_experts = router_logits.shape[1]
    weights, expert_ids = route_topk(router_logits, top_k, norm_topk_prob)
    order, inverse, offsets, counts = sort_by_expert(expert_ids, num_experts)
    return Routing(weights, expert_ids, order, inverse, offsets, counts, top_k, num_experts)
