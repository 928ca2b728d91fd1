"""Context parallelism on packed batches: zigzag sharding of every per-token tensor over the cp
group, and the inverse gather for detached per-token values (old logprobs, IS weights).

Each packed document is cut into 2*cp chunks and cp rank r keeps chunks r and 2*cp-1-r (see
kernels.zigzag_shard), which balances causal-attention work across the ring. The model is given
the local token ids and the GLOBAL cu_seqlens; logprob/entropy come out for the local tokens only,
and the loss is normalised by the global token count, so summing gradients over the cp ranks
(FSDP's reduce-scatter does) gives the full-batch gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import kernels


def cp_shard(x: torch.Tensor, cu_seqlens: torch.Tensor, cp_rank: int, cp_size: int) -> torch.Tensor:
    """x [T, ...] in packed global order -> this rank's zigzag rows [T_local, ...]; identity if cp == 1."""
    if cp_size == 1:
        return x
    return kernels.zigzag_shard(x, cu_seqlens, cp_rank, cp_size)


def cp_gather(x_local: torch.Tensor, cu_seqlens: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Inverse of cp_shard for a detached tensor: every cp rank's shard [T_r, ...] -> [T, ...] in
    global order, on every rank of `group`. Not differentiable (used for old logprobs and the
    per-sequence IS veto, which need whole sequences)."""
    if group is None or dist.get_world_size(group) == 1:
        return x_local
    world, total = dist.get_world_size(group), int(cu_seqlens[-1])
    positions = torch.arange(total, device=x_local.device)
    index = [kernels.zigzag_shard(positions, cu_seqlens, r, world) for r in range(world)]
    longest = max(i.numel() for i in index)
    padded = x_local.new_zeros((longest, *x_local.shape[1:]))
    padded[: x_local.shape[0]] = x_local.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    out = x_local.new_empty((total, *x_local.shape[1:]))
    for idx, part in zip(index, parts):
        out[idx] = part[: idx.numel()]
    return out
