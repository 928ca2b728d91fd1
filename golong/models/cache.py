"""KV cache for incremental decoding with the plain-torch model (rollout on CPU and in tests).

Layout: per layer k/v [B, max_len, Hkv, D]; `lengths[b]` tokens of row b are cached, at cache
positions 0 .. lengths[b]-1, which are also their RoPE positions. Rows advance independently, so
prompts of different lengths share one batch without left padding: see
Qwen3ForCausalLM.forward_cached for the calling convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per layer [B, max_len, Hkv, D]
    v: list[torch.Tensor]
    lengths: torch.Tensor  # [B] int64: tokens cached per row

    @classmethod
    def empty(cls, num_layers: int, batch: int, max_len: int, n_kv: int, head_dim: int,
              dtype: torch.dtype, device: torch.device | str) -> KVCache:
        # zeros, not empty: masked-out slots still enter SDPA's p @ V, and 0 * NaN would be NaN
        def z() -> torch.Tensor:
            return torch.zeros(batch, max_len, n_kv, head_dim, dtype=dtype, device=device)

        return cls([z() for _ in range(num_layers)], [z() for _ in range(num_layers)],
                   torch.zeros(batch, dtype=torch.long, device=device))

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k/v [B, S, Hkv, D] into cache positions slots [B, S] (-1: padding, not written)."""
        valid = slots >= 0
        rows = torch.arange(slots.shape[0], device=slots.device)[:, None].expand_as(slots)
        self.k[layer][rows[valid], slots[valid]] = k[valid].to(self.k[layer].dtype)
        self.v[layer][rows[valid], slots[valid]] = v[valid].to(self.v[layer].dtype)
