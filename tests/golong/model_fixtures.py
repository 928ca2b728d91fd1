"""Tiny random Qwen3 / Qwen3-MoE models built with transformers: the parity oracle for golong.models."""

from __future__ import annotations

import torch

VOCAB = 1000
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, rms_norm_eps=1e-6, max_position_embeddings=4096)


def hf_config(kind: str):
    from transformers import Qwen3Config, Qwen3MoeConfig

    if kind == "dense":  # tied head, as Qwen3-4B
        return Qwen3Config(**BASE, num_hidden_layers=2, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if kind == "moe":  # untied, 8 experts top-2 renormalised, one dense layer, YaRN RoPE
        return Qwen3MoeConfig(**BASE, num_hidden_layers=3, moe_intermediate_size=48, num_experts=8,
                              num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
                              tie_word_embeddings=False,
                              rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                               "original_max_position_embeddings": 1024})
    raise ValueError(kind)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights of O(1)-activation scale (HF's 0.02 init gives near-uniform logits that hide errors);
    norm weights away from 1 so a swapped or unloaded norm cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        elif name.endswith("embed_tokens.weight"):
            p.copy_(torch.randn(p.shape, generator=g))
        elif name.endswith("mlp.gate.weight"):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)


def build_hf(kind: str, seed: int = 1):
    from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

    cfg = hf_config(kind)
    cls = Qwen3MoeForCausalLM if kind == "moe" else Qwen3ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    randomize_(model, seed)
    return model


def packed_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (sum(lengths),), generator=g)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, cu


def hf_logits_per_doc(hf, ids: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """transformers run document by document (positions from 0), concatenated: [T, V]."""
    return torch.cat([hf(ids[cu[i]:cu[i + 1]][None]).logits[0] for i in range(len(cu) - 1)])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def sampling_probs(logits: torch.Tensor, p) -> torch.Tensor:
    """fp64 oracle of the distribution a rollout engine samples from, [B, V] for logits [B, V] and SamplingParams
    `p`: softmax(logits / T), cut to the top-k tokens, then to the top-p nucleus of their renormalised mass
    (vLLM's order), renormalised."""
    probs = torch.softmax(logits.double() / p.temperature, -1)
    out = torch.zeros_like(probs)
    for b in range(probs.shape[0]):
        vals, order = probs[b].sort(descending=True)
        keep = len(vals) if p.top_k <= 0 else p.top_k
        if p.top_p < 1:
            top = vals[:keep] / vals[:keep].sum()
            before = top.cumsum(0) - top
            keep = min(keep, int((before < p.top_p).sum()))
        keep = max(keep, 1)
        out[b, order[:keep]] = vals[:keep] / vals[:keep].sum()
    return out
