"""Qwen3-MoE sparse block: softmax top-k router + SwiGLU experts, on kernels.moe_route / grouped_mm.

Expert weights use transformers 5's fused layout (also the checkpoint's "fused keys"):
  gate_up_proj [E, 2*I, H]  (rows :I are gate_proj, rows I: are up_proj of each expert)
  down_proj    [E, H, I]
so a parameter is one tensor per layer (FSDP shards it on the expert dim) and there is no Python
loop over experts: kernels.expert_mlp sorts tokens by expert once and runs each projection as one
grouped GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from golong.models.config import ModelConfig


class Router(nn.Module):
    """router logits = x @ weight.T; weight [E, H] (checkpoint key `mlp.gate.weight`)."""

    def __init__(self, num_experts: int, hidden: int, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int, device=None, dtype=None) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden, device=device,
                                                     dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, routing: kernels.Routing) -> torch.Tensor:
        """x [T, H], routing of its T tokens -> [T, H] = sum_k w_k * expert_k(x)."""
        return kernels.expert_mlp(x, routing, self.gate_up_proj, self.down_proj)


class MoE(nn.Module):
    """x [T, H] -> [T, H].

    `recorded`: a list (set by the rollout engine, else None) to which each forward appends its tokens' experts
    [T, top_k] int64, in the order of x's rows (routing replay records them). `agreement`: a [2] fp64 tensor (set by
    the trainer, else None) to which each forward that replays experts adds (rows whose replayed experts are the
    router's own choice, rows replayed)."""

    def __init__(self, config: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = Router(config.num_experts, config.hidden_size, device=device, dtype=dtype)
        self.experts = Experts(config.num_experts, config.hidden_size, config.moe_intermediate_size,
                               device=device, dtype=dtype)
        self.recorded: list[torch.Tensor] | None = None
        self.agreement: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor | None = None) -> torch.Tensor:
        """expert_ids [T, top_k] int or None: route through these experts (routing replay; a row with a negative
        entry routes by its own top-k), weighted by this router's probabilities of them."""
        routing = kernels.moe_route(self.gate(x), self.top_k, self.norm_topk_prob, expert_ids=expert_ids)
        if self.recorded is not None:
            self.recorded.append(routing.expert_ids.detach())
        if self.agreement is not None and routing.agreement is not None:
            self.agreement += routing.agreement.to(self.agreement.device)
        return self.experts(x, routing)
