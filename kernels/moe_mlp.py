"""Qwen3-MoE expert MLP on routed tokens: permute -> gate_up grouped GEMM -> SwiGLU -> down grouped GEMM
-> weighted combine.

Weights are in transformers 5's fused `Qwen3MoeExperts` layout, used as they are (no copies):
    gate_up_proj [E, 2I, H]  rows 0:I are the gate projection, rows I:2I the up projection
    down_proj    [E, H, I]
so expert e computes  down_proj[e] @ (silu(gate_e x) * (up_e x)). The grouped GEMMs read
`gate_up_proj.transpose(1, 2)` ([E, H, 2I]) and `down_proj.transpose(1, 2)` ([E, I, H]) as strided
views, and their weight gradients come back in the parameters' own layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.grouped_mm import grouped_mm
from kernels.moe_route import Routing


def expert_mlp(x: torch.Tensor, routing: Routing, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
               backend: str = "auto") -> torch.Tensor:
    """x [T, H], routing from kernels.moe_route, gate_up_proj [E, 2I, H], down_proj [E, H, I] -> y [T, H].

    y[t] = sum_j routing.weights[t, j] * expert_{ids[t, j]}(x[t]), in x's dtype. Differentiable
    w.r.t. x, both weights and (through routing.weights) the router logits. No host sync.
    """
    num_experts, two_i, hidden = gate_up_proj.shape
    if down_proj.shape != (num_experts, hidden, two_i // 2) or x.shape[-1] != hidden:
        raise ValueError(f"shapes: x {tuple(x.shape)}, gate_up_proj {tuple(gate_up_proj.shape)}, "
                         f"down_proj {tuple(down_proj.shape)}")
    inter = two_i // 2
    xp = routing.permute(x)  # [T*k, H], rows grouped by expert
    h = grouped_mm(xp, gate_up_proj.transpose(1, 2), routing.offsets, backend=backend)  # [T*k, 2I]
    a = F.silu(h[:, :inter]) * h[:, inter:]  # gate first, as transformers' chunk(2) reads it
    yp = grouped_mm(a, down_proj.transpose(1, 2), routing.offsets, backend=backend)  # [T*k, H]
    return routing.unpermute(yp)
