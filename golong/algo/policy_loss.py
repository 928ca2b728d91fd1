"""Clipped policy-gradient loss (clip-higher + dual clip), token-mean over the global mini-batch.

Per valid token t, with rho = exp(logpi - logpi_old) and advantage A:

    L = max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high))     (clip-higher: 0.2 / 0.28)
    L = min(L, -A * dual_clip)   where A < 0                        (dual clip, c = 3)
    L = L * w_t                                                     (rollout IS weight, detached)

loss = sum_t (L + kl_coef * KL_t - entropy_coef * H_t) / global_token_count

GSPO (algo.policy_loss=gspo) replaces rho by its sequence-level form: with s_i = exp(mean over response i's tokens of
(logpi - logpi_old)) (the geometric mean of the token ratios), each token of response i takes

    rho_t = exp(logpi_t - sg(logpi_t) + sg(log s_i))     (value s_i, gradient s_i * d logpi_t)

so the clip decides per sequence; the caller passes sg(log s_i) per token (`seq_log_ratio`: under context
parallelism the mean runs over every rank's shard of the response) and no dual clip.

`global_token_count` is the number of valid tokens in the whole mini-batch, over all micro-batches
and data-parallel ranks: summing the gradients of every micro-batch's loss (and SUM-all-reducing
them across ranks) then gives exactly the gradient of the global token mean, however the
mini-batch is split. A DP reduction that averages (FSDP's default) must be compensated by the
caller, e.g. by scaling the loss with the DP world size. Other aggregations over the mini-batch's
S responses (aggregation_weights: seq-mean-token-mean weighs response i's tokens 1 / (S |o_i|)) replace
1 / global_token_count by a weight per token.
"""

from __future__ import annotations

import torch

LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: keeps rho finite when logprobs drift far apart
KL_CLAMP = 10.0


def broadcast_to_tokens(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-sequence values [S] -> per-token values [cu_seqlens[-1]] (e.g. advantages)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
    return torch.repeat_interleave(values, lengths)


AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def aggregation_weights(mode: str, response_lengths: torch.Tensor, seq_index: torch.Tensor, num_sequences: int,
                        max_response_tokens: int) -> torch.Tensor | None:
    """policy_loss's token_weights for an aggregation over a mini-batch of `num_sequences` responses: [T] fp32,
    per token (seq_index [T] int64: the token's response in response_lengths [S_local] int, which need not hold
    every response of the mini-batch). token-mean: None (policy_loss divides by the global token count)."""
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of: {', '.join(AGG_MODES)}")
    if mode == "token-mean":
        return None
    per_seq = torch.ones(response_lengths.shape, dtype=torch.float64) / num_sequences
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / response_lengths.to(torch.float64).clamp_min(1)
    elif mode == "seq-mean-token-sum-norm":
        per_seq = per_seq / max_response_tokens
    return per_seq[seq_index].to(torch.float32)


def low_var_kl(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1, d = logpi_ref - logpi (>= 0)."""
    d = (ref_logprob - logprob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1).clamp(-KL_CLAMP, KL_CLAMP)


def policy_loss(logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, global_token_count: int | float | torch.Tensor,
                clip_low: float = 0.2, clip_high: float = 0.28, dual_clip: float | None = 3.0,
                is_weights: torch.Tensor | None = None, ref_logprob: torch.Tensor | None = None,
                kl_coef: float = 0.0, entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
                token_weights: torch.Tensor | None = None, seq_log_ratio: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy loss of one micro-batch and its metrics.

    All tensor arguments share one shape (packed tokens [N], or [B, L]); `advantages` is per token
    (see broadcast_to_tokens); `mask` (bool or 0/1) marks the response tokens that count. Only
    `logprob` (and `entropy`, if its coefficient is non-zero) receive gradients.

    Metrics are detached 0-d tensors (no host sync) holding this micro-batch's SUM divided by
    `global_token_count`: adding them over micro-batches and ranks gives the global token mean.
    `token_weights` (same shape; see aggregation_weights): the loss terms (and pg_loss, kl_loss, entropy) sum
    each token's term times its weight instead of dividing by `global_token_count`; the clip fractions and
    ppo_kl stay token means. `seq_log_ratio` (same shape, detached): each token's sequence-mean log ratio, for
    GSPO's ratio (module docstring).
    Keys: pg_loss, pg_clipfrac, pg_clipfrac_lower, ppo_kl, and kl_loss / entropy when given (kl_loss: the
    k3 KL to the reference policy, unscaled by kl_coef, as verl's actor/kl_loss).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")
    dtype = torch.float32 if logprob.dtype in (torch.float16, torch.bfloat16) else logprob.dtype
    valid = mask.to(torch.bool)
    m = valid.to(dtype)
    # a python number divides without creating a device tensor (no host-device copy in the loss);
    # a mini-batch without valid tokens gives 0, not 0/0 (as verl's masked mean does)
    denom = global_token_count.to(dtype).clamp_min(1) if isinstance(global_token_count, torch.Tensor) \
        else max(float(global_token_count), 1.0)
    lp = logprob.to(dtype)
    # invalid tokens may hold anything (-inf / NaN logprobs of padding, unset advantages): select them
    # away before any arithmetic, as masking by multiplication would turn NaN * 0 into NaN (in the
    # loss and in its gradient)
    zero = torch.zeros((), dtype=dtype, device=lp.device)
    adv = torch.where(valid, advantages.to(dtype).detach(), zero)
    if seq_log_ratio is None:
        log_ratio = torch.where(valid, lp - old_logprob.to(dtype).detach(), zero)
    else:  # GSPO: the sequence's ratio in value, this token's logprob in gradient
        log_ratio = torch.where(valid, lp - lp.detach() + seq_log_ratio.to(dtype).detach(), zero)
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    l_unclipped = -adv * ratio
    l_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_tok = torch.maximum(l_unclipped, l_clipped)
    metrics: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        metrics["pg_clipfrac"] = ((l_clipped > l_unclipped).to(dtype) * m).sum() / denom
        metrics["ppo_kl"] = (-log_ratio * m).sum() / denom
    if dual_clip is not None:
        cap = -adv * dual_clip
        with torch.no_grad():
            metrics["pg_clipfrac_lower"] = (((adv < 0) & (loss_tok > cap)).to(dtype) * m).sum() / denom
        loss_tok = torch.where(adv < 0, torch.minimum(loss_tok, cap), loss_tok)
    else:
        metrics["pg_clipfrac_lower"] = torch.zeros((), dtype=dtype, device=lp.device)
    if is_weights is not None:
        loss_tok = loss_tok * torch.where(valid, is_weights.to(dtype).detach(), zero)
    w = m / denom if token_weights is None else torch.where(valid, token_weights.to(dtype).detach(), zero)
    pg = (loss_tok * w).sum()
    loss = pg
    metrics["pg_loss"] = pg.detach()
    if ref_logprob is not None:
        # both sides 0 on invalid tokens: KL 0 there, and no NaN reaches the gradient through exp
        kl_tok = low_var_kl(torch.where(valid, lp, zero), torch.where(valid, ref_logprob.to(dtype).detach(), zero))
        kl = (kl_tok * w).sum()
        metrics["kl_loss"] = kl.detach()
        if kl_coef != 0.0:
            loss = loss + kl_coef * kl
    elif kl_coef != 0.0:
        raise ValueError("kl_coef != 0 needs ref_logprob")
    if entropy is not None:
        ent = (torch.where(valid, entropy.to(dtype), zero) * w).sum()
        metrics["entropy"] = ent.detach()
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * ent
    elif entropy_coef != 0.0:
        raise ValueError("entropy_coef != 0 needs entropy")
    return loss, metrics
