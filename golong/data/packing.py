"""Sequence packing: variable-length sequences -> micro-batches of one packed row + cu_seqlens.

Sequences go, longest first, into the least-loaded micro-batch that still has room (ties: the
earliest), opening a new one when none has. Starting from the minimum number of micro-batches the
token budget allows, this balances tokens across micro-batches and is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [T] int64, the member sequences back to back
    cu_seqlens: torch.Tensor  # [B+1] int32, cumulative sequence lengths (starts at 0)
    position_ids: torch.Tensor  # [T] int64, restarting at 0 for each sequence
    indices: list[int]  # index (into the input `seqs`) of each member sequence, in packed order

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def pack(seqs: Sequence[Sequence[int] | torch.Tensor], token_budget: int, *, min_batches: int = 1
         ) -> list[PackedBatch]:
    """Pack `seqs` (lists or 1-D tensors of token ids) into micro-batches of <= token_budget tokens.

    Returns at least `min(min_batches, len(seqs))` micro-batches (ranks that must run the same
    number of micro-batches pass the agreed maximum). Raises ValueError for an empty sequence or
    one longer than the budget.
    """
    lengths = [len(s) for s in seqs]
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"sequence {i} is empty")
        if n > token_budget:
            raise ValueError(f"sequence {i} has {n} tokens, more than the token budget {token_budget}")
    if not seqs:
        return []
    k = max(min(min_batches, len(seqs)), -(-sum(lengths) // token_budget))
    bins: list[list[int]] = [[] for _ in range(k)]
    loads = [0] * k
    for i in sorted(range(len(seqs)), key=lambda j: (-lengths[j], j)):
        fits = [b for b in range(len(bins)) if loads[b] + lengths[i] <= token_budget]
        if fits:
            b = min(fits, key=lambda c: (loads[c], c))
        else:
            bins.append([])
            loads.append(0)
            b = len(bins) - 1
        bins[b].append(i)
        loads[b] += lengths[i]
    out = []
    for members in bins:
        if not members:
            continue
        parts = [torch.as_tensor(seqs[i], dtype=torch.long).reshape(-1) for i in members]
        lens = torch.tensor([lengths[i] for i in members], dtype=torch.int32)
        cu = torch.zeros(len(members) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens, 0)
        pos = torch.cat([torch.arange(lengths[i], dtype=torch.long) for i in members])
        out.append(PackedBatch(torch.cat(parts), cu, pos, members))
    return out
