"""Lean Qwen3 / Qwen3-MoE causal LM on packed sequences.

Module and parameter names mirror transformers' Qwen3(Moe)ForCausalLM with fused experts, so a
state_dict key *is* the Hugging Face checkpoint key (see checkpoint.py for the per-expert layout).

    hidden = model(input_ids [T], cu_seqlens [B+1] int32, position_ids=None)   # [T, H]
    logits = model.logits(hidden)                                             # plain head
    logprob, entropy = model.logprob_entropy(hidden, targets, temperature)    # fused head, fp32

No padding anywhere: documents are concatenated, `cu_seqlens` marks their boundaries, positions
restart at 0 in every document unless `position_ids` is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

import kernels
from golong.models.attention import ATTENTION_BACKENDS, Attention
from golong.models.cache import KVCache
from golong.models.config import ModelConfig
from golong.models.layers import MLP, RMSNorm, RotaryEmbedding
from golong.models.moe import MoE


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, device=None, dtype=None) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx, device=device, dtype=dtype)
        if config.layer_is_moe(layer_idx):
            self.mlp: nn.Module = MoE(config, device=device, dtype=dtype)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, device=device, dtype=dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                cp_group: dist.ProcessGroup | None = None, prefix_of: torch.Tensor | None = None,
                routed_experts: torch.Tensor | None = None, keep_attention: bool = False) -> torch.Tensor:
        """keep_attention: activation checkpointing inside the layer that keeps the attention's output (and what
        it saves beside q, k, v: its LSE), so that the backward recomputes the norms, projections, MLP / MoE and
        q, k, v from the layer's input, but not the attention (nor, under context parallelism, the ring's K/V
        passes). Stored per token: the input [H], the attention output [Hq*D] and the LSE [Hq] fp32, against the
        input alone under plain checkpointing (torch.utils.checkpoint around the whole layer); the SDPA backend
        saves per-document views of q, k, v, which then stay held too. A flag of forward, not a method of its
        own: FSDP2 gathers the layer's parameters in its forward hooks."""
        if keep_attention:
            return self._forward_keeping_attention(x, cos, sin, cu_seqlens, cp_group, prefix_of, routed_experts)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cu_seqlens, cp_group, prefix_of)
        return x + self._mlp(self.post_attention_layernorm(x), routed_experts)

    def _mlp(self, h: torch.Tensor, routed_experts: torch.Tensor | None) -> torch.Tensor:
        """routed_experts [T, top_k]: the experts a MoE layer replays (a dense layer has none to replay)."""
        if routed_experts is None or not isinstance(self.mlp, MoE):
            return self.mlp(h)
        return self.mlp(h, routed_experts)

    def _forward_keeping_attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                   cu_seqlens: torch.Tensor, cp_group: dist.ProcessGroup | None,
                                   prefix_of: torch.Tensor | None, routed_experts: torch.Tensor | None
                                   ) -> torch.Tensor:
        attn = self.self_attn

        def qkv(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return attn._qkv(self.input_layernorm(h), cos, sin)

        def rest(h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            h = h + attn.project_out(out)
            return h + self._mlp(self.post_attention_layernorm(h), routed_experts)

        q, k, v = checkpoint(qkv, x, use_reentrant=False)
        with _RecomputedWhenSaved((q, k, v), lambda: qkv(x)):
            out = attn.attend(q, k, v, cu_seqlens, cp_group, prefix_of)
        return checkpoint(rest, x, out, use_reentrant=False)

    def forward_cached(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache,
                       slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn.forward_cached(self.input_layernorm(x), cos, sin, cache, slots, mask)
        b, s, h = x.shape
        return x + self.mlp(self.post_attention_layernorm(x).view(b * s, h)).view(b, s, h)


class _RecomputedWhenSaved(torch.autograd.graph.saved_tensors_hooks):
    """Within it, autograd stores none of `tensors` for backward: where an op saves one of them (by identity), its
    backward gets it back from `recompute()` (run once, without grad, for all of them, and dropped once each saved
    one is back). Other saved tensors are stored as usual."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], recompute: Callable[[], tuple[torch.Tensor, ...]]) -> None:
        saved: set[int] = set()  # indices of `tensors` some op saved
        taken: set[int] = set()
        cache: dict[int, torch.Tensor] = {}
        # emptied on exit: every saved tensor keeps both hooks, and this one must not keep `tensors`
        self.watched = list(tensors)

        def pack(t: torch.Tensor) -> Any:
            for i, mine in enumerate(self.watched):
                if t is mine:
                    saved.add(i)
                    return _Recomputed(i)
            return t

        def unpack(packed: Any) -> torch.Tensor:
            if not isinstance(packed, _Recomputed):
                return packed
            if not cache:
                with torch.no_grad():
                    cache.update(enumerate(recompute()))
            t = cache[packed.index]
            taken.add(packed.index)
            if taken >= saved:  # all back: free them (a second backward, retain_graph, recomputes)
                cache.clear()
                taken.clear()
            return t

        super().__init__(pack, unpack)

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.watched.clear()


@dataclass(frozen=True)
class _Recomputed:
    index: int


class Qwen3Model(nn.Module):
    """Embeddings, decoder layers and the final norm (HF prefix `model.`)."""

    def __init__(self, config: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, i, device=device, dtype=dtype)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device=device, dtype=dtype)


def packed_position_ids(cu_seqlens: torch.Tensor, total: int, prefix_of: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Positions restarting at 0 in every document: [total] int64. A document with a prefix (prefix_of [B], -1:
    none) continues after it: its positions start at the prefix's length. No host sync."""
    cu = cu_seqlens.long()
    idx = torch.arange(total, device=cu_seqlens.device)
    doc = torch.searchsorted(cu[1:], idx, right=True)
    pos = idx - cu[doc]
    if prefix_of is None:
        return pos
    p = prefix_of.to(device=cu.device, dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]
    offset = torch.where(p >= 0, lengths[p.clamp(min=0)], 0)
    return pos + torch.cat([offset, offset.new_zeros(1)])[doc]  # tail rows past cu[-1]: no prefix


class Qwen3ForCausalLM(nn.Module):
    """Qwen3 dense or MoE decoder with an LM head (tied to the embeddings when the config says so).

    Knobs the trainer may set: `cp_group` (context-parallel ProcessGroup; size > 1 switches
    attention to ring attention on zigzag shards), `set_activation_checkpointing`,
    `set_attention_backend`.
    """

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config, device=device, dtype=dtype)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False, device=device, dtype=dtype)
        self.rotary = RotaryEmbedding(config)
        self.cp_group: dist.ProcessGroup | None = None
        self.activation_checkpointing = False
        self.keep_attention = False

    # ------------------------------------------------------------------------------ setup
    def set_activation_checkpointing(self, enabled: bool = True, keep_attention: bool = False) -> None:
        """Recompute each decoder layer in backward instead of storing its activations; keep_attention: all of it
        but the attention, whose output is stored (DecoderLayer.forward, keep_attention)."""
        self.activation_checkpointing = enabled
        self.keep_attention = enabled and keep_attention

    def set_attention_backend(self, backend: str = "auto") -> None:
        """Attention: "kernels" (kernels.flash_attention with its own auto choice), "triton" / "torch" /
        "flash_attn" / "varlen_attn" (that kernels.flash_attention backend), "sdpa" (torch SDPA per document) or "auto"
        (kernels on CUDA, sdpa on CPU, where it is much faster). Context parallelism always runs
        kernels.ring_attention, whose local blocks take "triton" / "torch" when named here."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(ATTENTION_BACKENDS)}")
        for layer in self.model.layers:
            layer.self_attn.backend = backend

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, H]: lm_head.weight, or the embedding matrix when tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Random init as transformers does: N(0, initializer_range) matrices, unit norms."""
        std = self.config.hf_config.get("initializer_range", 0.02) if std is None else std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)

    # ---------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, position_ids: torch.Tensor | None = None,
                *, targets: torch.Tensor | None = None, temperature: float = 1.0,
                prefix_of: torch.Tensor | None = None, routed_experts: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids [T] int (packed documents; under context parallelism, this rank's zigzag shard),
        cu_seqlens [B+1] int32 (document boundaries in the full packed batch), position_ids [T] or None
        (restart per document) -> final hidden states [T, H] in the model dtype.

        With `targets` [T] int64, returns the fused head's (logprob [T], entropy [T]) fp32 instead,
        so FSDP sees the LM head used inside forward. prefix_of [B] int32 (kernels.flash_attention): document b
        also attends to all of document prefix_of[b] and its positions continue after it (n responses packed
        after one copy of their prompt). routed_experts [T, num_hidden_layers, top_k] int or None (rows as
        input_ids'): routing replay, each MoE layer routes token t through experts routed_experts[t, layer] (a row
        with a negative entry by its own top-k; dense layers' columns are not read), the rollout engines' layout.
        """
        cp = self.cp_group if self.cp_group is not None and dist.get_world_size(self.cp_group) > 1 else None
        if position_ids is None:
            total = int(cu_seqlens[-1]) if cp is not None else input_ids.shape[0]
            position_ids = packed_position_ids(cu_seqlens, total, prefix_of)
            if cp is not None:
                position_ids = kernels.zigzag_shard(position_ids, cu_seqlens, dist.get_rank(cp),
                                                    dist.get_world_size(cp))
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids, x.dtype)
        if routed_experts is not None:
            if not self.config.is_moe:
                raise ValueError("routed_experts given to a dense model: it has no experts to route through")
            want = (input_ids.shape[0], len(self.model.layers), self.config.num_experts_per_tok)
            if tuple(routed_experts.shape) != want:
                raise ValueError(f"routed_experts must be [tokens, layers, top_k] = {list(want)}, got "
                                 f"{list(routed_experts.shape)}")
        for i, layer in enumerate(self.model.layers):
            routed = routed_experts[:, i] if routed_experts is not None else None
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = layer(x, cos, sin, cu_seqlens, cp, prefix_of, routed, keep_attention=True) \
                    if self.keep_attention else \
                    checkpoint(layer, x, cos, sin, cu_seqlens, cp, prefix_of, routed, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cu_seqlens, cp, prefix_of, routed)
        hidden = self.model.norm(x)
        if targets is None:
            return hidden
        return self.logprob_entropy(hidden, targets, temperature)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., V] fp32 (matmul in the model dtype, then upcast)."""
        return (hidden @ self.lm_head_weight.t()).float()

    def logprob_entropy(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                        ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused LM head: hidden [N, H], targets [N] int64 -> (logprob [N], entropy [N]) fp32 of
        softmax(hidden @ W.T / temperature), never materialising [N, V]. Ignored rows give 0."""
        return kernels.linear_logprob_entropy(hidden, self.lm_head_weight, targets, temperature,
                                              ignore_index=ignore_index)

    @contextmanager
    def record_routing(self) -> Iterator[dict[int, list[torch.Tensor]]]:
        """Within it, every forward appends each MoE layer's chosen experts [rows, top_k] int64 (rows in the
        order of that forward's flattened tokens) to recorded[layer index]; yields `recorded`."""
        recorded: dict[int, list[torch.Tensor]] = {i: [] for i, _ in self._moe_layers()}
        with self._on_moe_layers("recorded", recorded.__getitem__):
            yield recorded

    @contextmanager
    def count_replay_agreement(self, device: torch.device | str) -> Iterator[torch.Tensor]:
        """Within it, every MoE layer's forward that replays experts adds (rows whose replayed experts are its router's
        own top-k, rows replayed) to the yielded [2] fp64 tensor on `device` (the activations')."""
        counts = torch.zeros(2, dtype=torch.float64, device=device)
        with self._on_moe_layers("agreement", lambda _: counts):
            yield counts

    def _moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, layer.mlp) for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, MoE)]

    @contextmanager
    def _on_moe_layers(self, name: str, value: Callable[[int], Any]) -> Iterator[None]:
        """Each MoE layer's attribute `name` set to value(layer index) within it, None again after."""
        moe = self._moe_layers()
        for i, mlp in moe:
            setattr(mlp, name, value(i))
        try:
            yield
        finally:
            for _, mlp in moe:
                setattr(mlp, name, None)

    # ------------------------------------------------------------------------ decoding
    def new_kv_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> KVCache:
        """Empty cache for `batch` rows of up to `max_len` tokens each (prompt + generated)."""
        w = self.model.embed_tokens.weight
        c = self.config
        return KVCache.empty(c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim,
                             dtype or w.dtype, device or w.device)

    def forward_cached(self, input_ids: torch.Tensor, cache: KVCache,
                       input_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Incremental forward for generation.

        input_ids [B, S] int: row b's new tokens, right-padded; only the first input_lengths[b] of
        them are real (input_lengths [B] int, default all S; 0 leaves the row untouched). They take
        positions cache.lengths[b] + 0 .. input_lengths[b]-1, attend causally to everything row b has
        cached plus themselves, and are appended to the cache (cache.lengths += input_lengths).
        Returns hidden [B, S, H] (after the final norm); rows' padding entries are meaningless.
        Prefill: call once with the right-padded prompts and their lengths, then read
        hidden[b, input_lengths[b]-1]. Decode: input_ids [B, 1] with input_lengths = 1 (0 for
        finished rows). Raises if a row would exceed the cache's max_len.
        """
        b, s = input_ids.shape
        dev = input_ids.device
        if input_lengths is None:
            input_lengths = torch.full((b,), s, dtype=torch.long, device=dev)
        input_lengths = input_lengths.to(device=dev, dtype=torch.long)
        new_lengths = cache.lengths + input_lengths
        length = int(new_lengths.max())  # host sync: fine for the plain-torch sampler
        if length > cache.max_len:
            raise ValueError(f"KV cache overflow: a row needs {length} positions, max_len={cache.max_len}")
        j = torch.arange(s, device=dev)
        positions = cache.lengths[:, None] + j  # [B, S]
        slots = torch.where(j < input_lengths[:, None], positions, torch.full_like(positions, -1))
        mask = torch.arange(length, device=dev)[None, None, :] <= positions[:, :, None]  # [B, S, L]
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.model.layers:
            x = layer.forward_cached(x, cos, sin, cache, slots, mask)
        cache.lengths = new_lengths
        return self.model.norm(x)

    # ------------------------------------------------------------------------------- I/O
    def save_pretrained(self, path: str | Path, **kwargs) -> None:
        """Write a Hugging Face checkpoint (see golong.models.checkpoint.save_pretrained)."""
        from golong.models.checkpoint import save_pretrained

        save_pretrained(self, path, **kwargs)

    def num_params(self, filter_fn: Callable[[str], bool] | None = None) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if filter_fn is None or filter_fn(n))
