"""Rollout importance-sampling correction: trainer vs rollout-engine logprob mismatch.

The rollout engine (vLLM, bf16 kernels, possibly stale weights) samples from pi_rollout, the trainer
computes pi_old for the same tokens. Per token rho = exp(logpi_old - logpi_rollout), detached:

    truncate   w = min(rho, upper)
    mask       w = rho if lower <= rho <= upper else 0          (reference run: 0.5, 5.0)
    veto       a sequence with any valid token rho < veto gets w = 0 everywhere

`level` picks the ratio the bounds read: "token", each token's rho; "sequence", the product of a response's token
ratios, exp(sum log rho), as the weight of every token of it (verl's token and sequence IS levels); "geometric",
their geometric mean, exp(mean log rho), which stays near 1: with mask only, a rejection of the responses it puts
outside bounds like [0.999, 1.001], the kept ones weighing 1 (verl's geometric rejection sampling). The veto reads the
token ratios at every level.

The weights multiply the policy loss (policy_loss(is_weights=...)). The metrics are how stale
weights show: the mismatch KL between rollout and trainer policies, and their perplexity ratio.
"""

from __future__ import annotations

import torch

IS_MODES = ("truncate", "mask")
IS_LEVELS = ("token", "sequence", "geometric")


def _seq_index(shape: torch.Size, device: torch.device, cu_seqlens: torch.Tensor | None,
               seq_index: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    n = shape.numel()
    if seq_index is not None:
        idx = seq_index.to(device=device, dtype=torch.long).reshape(-1)
        return idx, int(idx.max()) + 1 if idx.numel() else 0
    if cu_seqlens is not None:
        if cu_seqlens.device.type == "cpu" and int(cu_seqlens[-1]) != n:
            raise ValueError(f"cu_seqlens covers {int(cu_seqlens[-1])} tokens but the inputs have {n}")
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        lengths = cu[1:] - cu[:-1]
        # output_size: no device -> host sync to size the result
        idx = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=n)
        return idx, lengths.numel()
    if len(shape) == 2:  # padded [S, L]: one sequence per row
        return torch.arange(shape[0], device=device).repeat_interleave(shape[1]), shape[0]
    raise ValueError("packed 1-D inputs need cu_seqlens or seq_index")


def rollout_is_weights(old_logprob: torch.Tensor, rollout_logprob: torch.Tensor, mask: torch.Tensor, *,
                       cu_seqlens: torch.Tensor | None = None, seq_index: torch.Tensor | None = None,
                       mode: str = "mask", lower: float = 0.5, upper: float = 5.0, veto: float | None = 1e-4,
                       level: str = "token") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token IS weights (shape of `old_logprob`, fp32, 0 on invalid tokens) and metrics.

    Inputs are packed [N] with `cu_seqlens` [S+1] (or `seq_index` [N]) giving sequences, or padded
    [S, L]. Metrics are detached 0-d fp32 tensors over this call's valid tokens / sequences:
    rollout_is/{weight_mean, ratio_mean, ratio_max, ratio_min, masked_frac, veto_frac} (the ratios of `level`, over
    tokens: a sequence-level ratio counts once per token of its response) and
    mismatch/{kl, kl_k1, trainer_ppl, rollout_ppl, ppl_ratio} (kl: the k3 estimator, as the trainer logs it).
    """
    if mode not in IS_MODES:
        raise ValueError(f"rollout IS mode {mode!r}; choose one of {', '.join(IS_MODES)}")
    if level not in IS_LEVELS:
        raise ValueError(f"rollout IS level {level!r}; choose one of {', '.join(IS_LEVELS)}")
    if level == "geometric" and mode != "mask":
        raise ValueError("rollout IS level 'geometric' rejects responses (mode 'mask'); a geometric mean is no "
                         "importance weight to truncate by")
    with torch.no_grad():
        shape, dev = old_logprob.shape, old_logprob.device
        old = old_logprob.detach().float().reshape(-1)
        roll = rollout_logprob.detach().float().reshape(-1)
        m = mask.reshape(-1).to(device=dev, dtype=torch.bool)
        seq, S = _seq_index(shape, dev, cu_seqlens, seq_index)
        if seq.numel() != old.numel():
            raise ValueError(f"sequences cover {seq.numel()} tokens but the inputs have {old.numel()}")
        # invalid tokens may hold -inf / NaN logprobs: zero them, or NaN * 0 would spoil the metrics
        old = torch.where(m, old, torch.zeros_like(old))
        roll = torch.where(m, roll, torch.zeros_like(roll))
        # a valid token with -inf under both policies (or a NaN logprob) has no ratio: give it the floor, so the
        # veto / mask drops it instead of a NaN weight reaching the loss
        log_ratio = torch.nan_to_num(old - roll, nan=-20.0).clamp(-20.0, 20.0)
        d64 = torch.nan_to_num(old.double() - roll.double(), nan=-20.0).clamp(-20.0, 20.0)
        rho_tok = torch.exp(log_ratio)
        rho = rho_tok
        if level != "token":  # the response's ratio, on each of its tokens (in fp64: a sum over 100K tokens)
            total = torch.zeros(S, dtype=torch.float64, device=dev).index_add_(0, seq, (log_ratio * m).double())
            if level == "geometric":
                total = total / torch.zeros(S, dtype=torch.float64, device=dev).index_add_(
                    0, seq, m.double()).clamp_min(1)
            rho = torch.exp(total.clamp(-20.0, 20.0)).float()[seq]
        if mode == "truncate":
            w = rho.clamp(max=upper)
            bounded = rho > upper
        else:
            inside = (rho >= lower) & (rho <= upper)
            kept = torch.ones_like(rho) if level == "geometric" else rho  # geometric: rejection, no reweighting
            w = torch.where(inside, kept, torch.zeros_like(rho))
            bounded = ~inside
        seq_valid = torch.zeros(S, device=dev).index_add_(0, seq, m.float()) > 0
        if veto is not None:
            bad = torch.zeros(S, device=dev).index_add_(0, seq, ((rho_tok < veto) & m).float()) > 0
            w = torch.where(bad[seq], torch.zeros_like(w), w)
        else:
            bad = torch.zeros(S, dtype=torch.bool, device=dev)
        w = torch.where(m, w, torch.zeros_like(w))

        mf = m.float()
        n_tok = mf.sum().clamp_min(1)
        n_seq = seq_valid.float().sum().clamp_min(1)
        # per-sequence mean logprobs for the perplexities
        tok_per_seq = torch.zeros(S, device=dev).index_add_(0, seq, mf).clamp_min(1)
        mean_old = torch.zeros(S, device=dev).index_add_(0, seq, old * mf) / tok_per_seq
        mean_roll = torch.zeros(S, device=dev).index_add_(0, seq, roll * mf) / tok_per_seq
        sv = seq_valid.float()
        zero = torch.zeros((), device=dev)
        has = m.any()
        metrics = {
            "rollout_is/weight_mean": (w * mf).sum() / n_tok,
            "rollout_is/ratio_mean": (rho * mf).sum() / n_tok,
            "rollout_is/ratio_max": torch.where(has, rho.masked_fill(~m, float("-inf")).max(), zero),
            "rollout_is/ratio_min": torch.where(has, rho.masked_fill(~m, float("inf")).min(), zero),
            "rollout_is/masked_frac": (bounded & m).float().sum() / n_tok,
            "rollout_is/veto_frac": (bad & seq_valid).float().sum() / n_seq,
            # tokens were sampled from pi_rollout: E[log pi_rollout - log pi_old] = KL(rollout || old) (k1); k3 is
            # its non-negative, lower-variance estimator
            # in fp64: at a small mismatch d the k3 term is d^2 / 2, below fp32's resolution of exp(d) - d - 1
            "mismatch/kl": (((torch.expm1(d64) - d64) * mf).sum() / n_tok).float(),
            "mismatch/kl_k1": ((roll - old) * mf).sum() / n_tok,
            "mismatch/trainer_ppl": (torch.exp(-mean_old) * sv).sum() / n_seq,
            "mismatch/rollout_ppl": (torch.exp(-mean_roll) * sv).sum() / n_seq,
            "mismatch/ppl_ratio": (torch.exp(mean_roll - mean_old) * sv).sum() / n_seq,
        }
    return w.reshape(shape), metrics
