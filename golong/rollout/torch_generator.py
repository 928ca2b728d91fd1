"""Batched sampling on the model's KV cache: the rollout engine for CPU, tests and the demo.

    gen = TorchGenerator(model, eos_token_ids=[tok.eos_token_id])
    out = gen.generate(prompts, SamplingParams(temperature=1.0, top_p=1.0, max_tokens=64), seeds=seeds)
    out.token_ids[i], out.logprobs[i], out.finish_reasons[i]

Prompts of different lengths share one batch without left padding (the cache tracks a length per
row). Each request has its own seed and draws exactly one uniform number per generated token from
its own generator, so a response depends only on (model, prompt, params, seed): not on the batch it
was in, the batch size or which rank generated it, up to floating-point ties (the batched forward's logits move by
~1e-6 with the batch's shape, which can swap two near-tied tokens in the sampler's order). That is what makes runs
reproducible across world sizes and across a resume.

`logprobs[i][t]` is the token's log probability under the distribution it was sampled from, as
vLLM returns it (logprobs_mode="processed_logprobs"): softmax(logits / temperature), cut to the
top-k tokens, then to the top-p nucleus of what is left, and renormalised. Without top-k / top-p it
is exactly what the trainer recomputes as the old policy (greedy decoding, temperature 0: the plain
log softmax); with them, the rollout IS weights and mismatch metrics include the truncation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:  # the vLLM venv imports this module without golong's config stack (omegaconf)
    from golong.models.config import ModelConfig

# vLLM's SamplingParams raises a temperature in (0, 0.01) to 0.01 (sampling_params.py, _MAX_TEMP): both engines
# sample, and report logprobs, at the same temperature
MIN_TEMPERATURE = 0.01


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy; (0, MIN_TEMPERATURE) samples at MIN_TEMPERATURE, as vLLM does
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    max_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the engine's EOS ids


@dataclass
class GenerationResult:
    """One entry per request, in request order. token_ids include the stop token when one was
    sampled (finish_reason "stop"), else end at max_tokens ("length"). routed_experts (with record_routing, a MoE
    model): the experts each token the model read was routed to, [P + R - 1, num_hidden_layers, top_k] (prompt
    then response tokens, the last sampled one never read; dense layers' columns 0), in the layout vLLM returns
    them (its integer dtype; golong.replay.record_dtype from this generator)."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    routed_experts: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.token_ids)



def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor, params: SamplingParams
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] fp32, uniforms [B] in [0, 1) -> (tokens [B] int64, logprobs [B] fp32).

    Inverse-CDF sampling over the probabilities sorted in descending order, restricted to the top-k
    tokens and then, as vLLM does, to the smallest prefix holding top_p of their renormalised mass (the
    first token always stays). Deterministic given the uniforms. logprobs are of that truncated,
    renormalised distribution (see the module docstring).
    """
    logits = logits.float()
    if params.temperature <= 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    logp = torch.log_softmax(logits / max(params.temperature, MIN_TEMPERATURE), -1)
    probs, order = logp.exp().sort(-1, descending=True)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if params.top_k > 0:
        keep[:, params.top_k:] = False
    if params.top_p < 1.0:
        kept = probs * keep
        before = (kept.cumsum(-1) - kept) / kept.sum(-1, keepdim=True)  # top-k mass strictly before each token
        keep &= before < params.top_p
    keep[:, 0] = True
    probs = probs * keep
    cdf = probs.cumsum(-1)
    target = uniforms.to(cdf)[:, None] * cdf[:, -1:]
    pick = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)
    # never land on a truncated (zero-mass) slot through rounding at the top of the cdf
    pick = torch.minimum(pick, keep.sum(-1, keepdim=True) - 1)
    tokens = order.gather(-1, pick)[:, 0]
    token_logp = logp.gather(-1, tokens[:, None])[:, 0]
    if params.top_k > 0 or params.top_p < 1.0:  # renormalise over the kept tokens
        sorted_logp = logp.gather(-1, order).masked_fill(~keep, float("-inf"))
        token_logp = token_logp - torch.logsumexp(sorted_logp, -1)
    return tokens, token_logp


class TorchGenerator:
    """Sampler over a golong Qwen3 model (`new_kv_cache` / `forward_cached` / `logits`).

    The model should be a plain (unsharded) module: with FSDP training, the trainer keeps a
    separate rollout copy and pushes weights into it after each update (`load_weights`), exactly
    as it does for vLLM.
    """

    def __init__(self, model: nn.Module, eos_token_ids: Sequence[int], *, max_batch: int = 256) -> None:
        self.model = model
        self.eos_token_ids = list(eos_token_ids)
        self.max_batch = max_batch

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Weight sync: copy (name, full tensor) pairs into the rollout model's parameters."""
        params = dict(self.model.named_parameters())
        for name, t in named_tensors:
            params[name].copy_(t)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int] | None = None,
                 progress: Callable[[int], None] | None = None, record_routing: bool = False) -> GenerationResult:
        """Sample one response per prompt (repeat a prompt for several). seeds: one per prompt
        (default 0..N-1). progress(k) is called with the number of requests just finished. record_routing (a MoE
        model): also return each token's experts (GenerationResult.routed_experts)."""
        if seeds is None:
            seeds = list(range(len(prompts)))
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        parts = []
        # longest prompts first: rows of a chunk then have similar lengths (less wasted prefill)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        if record_routing and not self.model.config.is_moe:
            raise ValueError("record_routing: the model is dense, no experts to record")
        results: dict[int, tuple[list[int], list[float], str, np.ndarray | None]] = {}
        for start in range(0, len(order), self.max_batch):
            idx = order[start:start + self.max_batch]
            part = self._generate_chunk([prompts[i] for i in idx], params, [seeds[i] for i in idx], record_routing)
            for j, i in enumerate(idx):
                results[i] = (part.token_ids[j], part.logprobs[j], part.finish_reasons[j],
                              part.routed_experts[j] if part.routed_experts is not None else None)
            if progress is not None:
                progress(len(idx))
        parts = [results[i] for i in range(len(prompts))]
        return GenerationResult([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts],
                                [p[3] for p in parts] if record_routing else None)

    def _generate_chunk(self, prompts: list[Sequence[int]], params: SamplingParams,
                        seeds: list[int], record_routing: bool = False) -> GenerationResult:
        model = self.model
        device = model.lm_head_weight.device
        b = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        if int(lengths.min()) < 1:
            raise ValueError("empty prompt")
        max_new = params.max_tokens
        cache = model.new_kv_cache(b, int(lengths.max()) + max_new)
        ids = torch.zeros(b, int(lengths.max()), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        stop = torch.tensor(sorted(set(self.eos_token_ids) | set(params.stop_token_ids)), dtype=torch.long)

        was_training = model.training
        model.eval()
        recording = model.record_routing() if record_routing else contextlib.nullcontext()
        routes: list[list[torch.Tensor]] = [[] for _ in range(b)]  # per row: [tokens, layers, top_k] pieces
        with recording as recorded:
            hidden = model.forward_cached(ids.to(device), cache, lengths.to(device))
            if record_routing:
                _take_routing(recorded, model.config, routes, lengths)
            out = self._decode(model, cache, hidden, lengths, params, gens, stop, recorded, routes)
        model.train(was_training)
        if record_routing:
            from golong.replay import record_dtype  # here: see the TYPE_CHECKING import above

            dtype = record_dtype(model.config.num_experts)
            out.routed_experts = [torch.cat(r).numpy().astype(dtype) for r in routes]
        return out

    def _decode(self, model: nn.Module, cache: Any, hidden: torch.Tensor, lengths: torch.Tensor,
                params: SamplingParams, gens: list[torch.Generator], stop: torch.Tensor,
                recorded: dict[int, list[torch.Tensor]] | None, routes: list[list[torch.Tensor]]
                ) -> GenerationResult:
        """The sampling loop after the prefill (hidden: its output)."""
        b, device, max_new = len(gens), hidden.device, params.max_tokens
        last = hidden[torch.arange(b, device=device), (lengths - 1).to(device)]
        out_tokens = torch.zeros(b, max_new, dtype=torch.long)
        out_logp = torch.zeros(b, max_new, dtype=torch.float32)
        n_out = torch.zeros(b, dtype=torch.long)
        done = torch.zeros(b, dtype=torch.bool)
        stopped = torch.zeros(b, dtype=torch.bool)
        for t in range(max_new):
            logits = model.logits(last).float().cpu()
            # one uniform per request per token from its own stream: batch-independent sampling
            u = torch.stack([torch.rand((), generator=g) for g in gens])
            tok, logp = sample_tokens(logits, u, params)
            active = ~done
            out_tokens[active, t] = tok[active]
            out_logp[active, t] = logp[active]
            n_out += active.long()
            hit = active & torch.isin(tok, stop)
            stopped |= hit
            done |= hit
            if t == max_new - 1 or bool(done.all()):
                break
            step_len = (~done).long()
            hidden = model.forward_cached(tok[:, None].to(device), cache, step_len.to(device))
            if recorded is not None:
                _take_routing(recorded, model.config, routes, step_len)
            last = hidden[:, 0]
        return GenerationResult(
            token_ids=[out_tokens[i, : n_out[i]].tolist() for i in range(b)],
            logprobs=[out_logp[i, : n_out[i]].tolist() for i in range(b)],
            finish_reasons=["stop" if bool(stopped[i]) else "length" for i in range(b)],
        )


def _take_routing(recorded: dict[int, list[torch.Tensor]], config: ModelConfig, routes: list[list[torch.Tensor]],
                  lengths: torch.Tensor) -> None:
    """Move one forward_cached call's recorded experts (per MoE layer [B * S, top_k]) into each row's routes:
    row b's first lengths[b] tokens, as [tokens, num_hidden_layers, top_k] (dense layers' columns 0)."""
    b = len(routes)
    step: torch.Tensor | None = None
    for i, ids in recorded.items():
        x = ids.pop().cpu().view(b, -1, config.num_experts_per_tok)
        if step is None:
            step = torch.zeros(b, x.shape[1], config.num_hidden_layers, config.num_experts_per_tok,
                               dtype=torch.int64)
        step[:, :, i] = x
    for row, n in enumerate(lengths.tolist()):
        if n:
            routes[row].append(step[row, :n])
