"""Qwen3 attention: q/k RMSNorm per head, RoPE, GQA, causal over packed documents.

Training / scoring path: packed tokens [T, H] with cu_seqlens, through kernels.flash_attention
(one device) or kernels.ring_attention (context parallel: the tokens are this rank's zigzag shard,
cu_seqlens the global one). On CPU the default ("auto") is instead torch SDPA one document at a time:
ATen's fused CPU attention is ~8x faster there than kernels.flash_attention's blockwise torch
reference (bench/model.py), which made the whole model slower than transformers on CPU.
Decoding path: a dense [B, S] batch against a KVCache (see cache.py), through torch SDPA with an
explicit mask — prompts of different lengths share one batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

import kernels
from golong.models.cache import KVCache
from golong.models.config import ModelConfig
from golong.models.layers import RMSNorm, apply_rope

# attention implementations a model can be set to (golong.config's model.attn_backend choices)
ATTENTION_BACKENDS = ("auto", "kernels", "triton", "torch", "flash_attn", "varlen_attn", "sdpa")

class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, device=None, dtype=None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.scale = self.head_dim ** -0.5
        self.backend = "auto"  # one of ATTENTION_BACKENDS; see Qwen3ForCausalLM.set_attention_backend
        kw = dict(bias=False, device=device, dtype=dtype)
        h, d = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(h, self.n_heads * d, **kw)
        self.k_proj = nn.Linear(h, self.n_kv * d, **kw)
        self.v_proj = nn.Linear(h, self.n_kv * d, **kw)
        self.o_proj = nn.Linear(self.n_heads * d, h, **kw)
        self.q_norm = RMSNorm(d, config.rms_norm_eps, device=device, dtype=dtype)
        self.k_norm = RMSNorm(d, config.rms_norm_eps, device=device, dtype=dtype)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> q [N, Hq, D], k/v [N, Hkv, D] with qk-norm and RoPE applied."""
        n = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(n, self.n_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(n, self.n_kv, self.head_dim))
        v = self.v_proj(x).view(n, self.n_kv, self.head_dim)
        q, k = apply_rope(q, k, cos, sin)
        return q, k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                cp_group: dist.ProcessGroup | None = None, prefix_of: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H] packed (T local tokens), cos/sin [T, D], cu_seqlens [B+1] int32 (global under CP), prefix_of
        [B] int32 or None (kernels.flash_attention's shared prefixes)."""
        return self.project_out(self.attend(*self._qkv(x, cos, sin), cu_seqlens, cp_group, prefix_of))

    def project_out(self, out: torch.Tensor) -> torch.Tensor:
        """out [T, Hq, D] -> o_proj [T, H]."""
        return self.o_proj(out.reshape(out.shape[0], self.n_heads * self.head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               cp_group: dist.ProcessGroup | None = None, prefix_of: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of packed q [T, Hq, D], k/v [T, Hkv, D] by this module's backend -> [T, Hq, D]; with
        prefix_of, each document also attends to all of its prefix document. Shared prefixes run our kernels where
        the backend names a peer's (flash_attn, varlen_attn), as context parallelism does."""
        ours = ("triton", "torch")
        if cp_group is not None and dist.get_world_size(cp_group) > 1:
            local = self.backend if self.backend in ours else "auto"
            out = kernels.ring_attention(q, k, v, cu_seqlens, cp_group, causal=True, softmax_scale=self.scale,
                                         backend=local, prefix_of=prefix_of)
        elif self.backend == "sdpa" or (self.backend == "auto" and not q.is_cuda):
            out = sdpa_varlen(q, k, v, cu_seqlens, self.scale, prefix_of)
        else:
            kernel = "auto" if self.backend in ("auto", "kernels") else self.backend
            if prefix_of is not None and kernel not in ours:
                kernel = "auto"  # the peers' kernels take no prefix
            out, _ = kernels.flash_attention(q, k, v, cu_seqlens, causal=True, softmax_scale=self.scale,
                                             backend=kernel, prefix_of=prefix_of)
        return out

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                       slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, S, H]; cos/sin [B, S, D]; slots [B, S] (cache position of each new token, -1 = padding);
        mask [B, S, L] bool (which of the first L cache positions each query sees) -> [B, S, H]."""
        b, s, _ = x.shape
        q, k, v = self._qkv(x.reshape(b * s, -1), cos.reshape(b * s, -1), sin.reshape(b * s, -1))
        cache.write(self.layer_idx, k.view(b, s, self.n_kv, self.head_dim),
                    v.view(b, s, self.n_kv, self.head_dim), slots)
        length = mask.shape[-1]
        kc, vc = cache.k[self.layer_idx][:, :length], cache.v[self.layer_idx][:, :length]
        out = F.scaled_dot_product_attention(
            q.view(b, s, self.n_heads, self.head_dim).transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2),
            attn_mask=mask[:, None], scale=self.scale, enable_gqa=self.n_heads != self.n_kv)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))


def sdpa_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                scale: float, prefix_of: torch.Tensor | None = None) -> torch.Tensor:
    """Causal packed attention with torch SDPA, one document at a time (one host sync for the bounds).

    q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens [B+1], prefix_of [B] or None -> out [T, Hq, D]. For CPU, where
    SDPA runs ATen's fused flash-style kernel (memory O(document), forward and backward). A document with a
    prefix attends to [prefix keys; its own keys], causal from the lower right (its rows see the whole prefix):
    on CPU ATen builds that mask, [own rows, prefix + own rows], and the concatenated K/V kept for the backward
    holds the prefix's once per document, as whole sequences do.
    """
    bounds = cu_seqlens.tolist()
    parents = prefix_of.tolist() if prefix_of is not None else [-1] * (len(bounds) - 1)
    if bounds[-1] < q.shape[0]:  # rows past the last document: one more document, as kernels.flash_attention has it
        bounds, parents = [*bounds, q.shape[0]], [*parents, -1]
    outs = []
    for a, b, parent in zip(bounds[:-1], bounds[1:], parents):
        if b == a:
            continue
        qd = q[a:b].transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
        if parent < 0:
            kd, vd = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (k, v))
            o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale, enable_gqa=True)
        else:
            pa, pb = bounds[parent], bounds[parent + 1]
            kd, vd = (torch.cat([t[pa:pb], t[a:b]]).transpose(0, 1).unsqueeze(0) for t in (k, v))
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=causal_lower_right(b - a, pb - pa + b - a),
                                               scale=scale, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)
