"""Dynamic sampling (DAPO): drop prompt groups whose scores are all equal -- they carry no signal.

The trainer keeps generating batches and concatenating the kept groups until the training batch
is full or `max_num_gen_batches` is reached; this module decides which responses to keep.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from golong.algo.advantages import group_index


def dynamic_sampling_filter(scores: torch.Tensor, prompt_ids: Sequence[Hashable] | torch.Tensor, *,
                            keep_singletons: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """keep_mask [B] bool (True for responses of prompts with non-constant scores) and metrics.

    A group of one response has all its scores equal and is dropped, as DESIGN.md's contract says;
    `keep_singletons=True` keeps it, as GoLongRL's filter does (`std > 0 or len == 1`: one score cannot
    show the group is constant, and GRPO gives it A = r). The trainer filters only with n > 1 responses
    per prompt, where the two agree. Metrics (python floats):
    dynamic_sampling/{num_prompts, kept_prompts, dropped_prompts, kept_frac, dropped_all_max,
    dropped_all_zero} -- the last two count dropped groups solved (all >= 1) and failed (all <= 0).
    """
    scores = torch.as_tensor(scores)
    if scores.dim() != 1 or len(prompt_ids) != scores.numel():
        raise ValueError("scores must be 1-D [B] with one prompt id per score")
    if scores.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=scores.device), {}
    inv, uniq = group_index(prompt_ids, scores.device)
    U = len(uniq)
    s = scores.to(torch.float64)
    hi = torch.full((U,), float("-inf"), dtype=torch.float64, device=s.device).scatter_reduce(0, inv, s, "amax")
    lo = torch.full((U,), float("inf"), dtype=torch.float64, device=s.device).scatter_reduce(0, inv, s, "amin")
    keep_u = hi > lo
    if keep_singletons:
        keep_u |= torch.bincount(inv, minlength=U) == 1
    dropped = ~keep_u
    kept = int(keep_u.sum())
    metrics = {
        "dynamic_sampling/num_prompts": float(U),
        "dynamic_sampling/kept_prompts": float(kept),
        "dynamic_sampling/dropped_prompts": float(U - kept),
        "dynamic_sampling/kept_frac": kept / U,
        "dynamic_sampling/dropped_all_max": float((dropped & (lo >= 1.0)).sum()),
        "dynamic_sampling/dropped_all_zero": float((dropped & (hi <= 0.0)).sum()),
    }
    return keep_u[inv], metrics
