"""Outcome-reward advantage estimators: GRPO, TMN-GRPO (+ difficulty reweight), task-norm, Dr.GRPO.

Per response i: score r_i, prompt u(i), task m(u). With per-prompt mean mu_u and unbiased variance
v_u (a group of one: mu = 0, v = 1), std sigma_u = sqrt(v_u):

    grpo       A_i = (r_i - mu_u) / (sigma_u + eps)
    dr_grpo    A_i =  r_i - mu_u
    tmn_grpo   A_i = (r_i - mu_u) / (s_m + eps),  s_m = sqrt(mean of v_u over task m's prompts)
               (norm_by_task_scale=False: A_i = r_i - mu_u)
    task_norm  A_i = (r_i - mean_m) / (std_m + eps) over all of task m's responses (unbiased std;
               a task with one response: std 1)

Difficulty reweight (tmn_grpo only): M_m = mean of mu_u over task m's prompts, smoothed mean
mu~_u = alpha mu_u + (1 - alpha) M_m (a group of one: M_m), pass rate p_u = share of u's responses
with r_i > mu~_u; A_i *= exp(gamma (0.5 - p_u)) if r_i > mu_u else exp(gamma (p_u - 0.5)).

Everything is bincount/gather over the batch, in float64; advantages come back as float32.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch

ESTIMATORS = ("grpo", "tmn_grpo", "task_norm", "dr_grpo")


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment per response: lengths [B] (response tokens, stop token included) ->
    [B] float64 penalties in [-factor, 0]: 0 up to max_tokens - buffer tokens, then falling linearly to -factor at
    max_tokens. buffer 0: all 0."""
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float64)
    excess = lengths.to(torch.float64) - (max_tokens - buffer)
    return (-excess / buffer * factor).clamp(max=0.0)


def group_index(ids: Sequence[Hashable] | torch.Tensor, device: torch.device | None = None
                ) -> tuple[torch.Tensor, list[Any]]:
    """(inverse [B] int64, unique ids in first-appearance order) for any hashable ids or a tensor."""
    if isinstance(ids, torch.Tensor):
        uniq, inv = torch.unique(ids.flatten(), return_inverse=True)
        return inv.to(device=device, dtype=torch.long), uniq.tolist()
    table: dict[Hashable, int] = {}
    inv_list = [table.setdefault(x, len(table)) for x in ids]
    return torch.tensor(inv_list, dtype=torch.long, device=device), list(table)


def _bincount(index: torch.Tensor, n: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    if weights is None:
        return torch.bincount(index, minlength=n).to(torch.float64)
    return torch.bincount(index, weights=weights.to(torch.float64), minlength=n)


def _group_stats(r: torch.Tensor, inv: torch.Tensor, n: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group: count, mean, unbiased variance (two-pass), population std."""
    cnt = _bincount(inv, n)
    mean = _bincount(inv, n, r) / cnt.clamp_min(1)
    sq = _bincount(inv, n, (r - mean[inv]) ** 2)
    var = sq / (cnt - 1).clamp_min(1)
    pop_std = (sq / cnt.clamp_min(1)).sqrt()
    return cnt, mean, var, pop_std


def _safe_name(task: Any) -> str:
    return str(task).replace(" ", "_").replace(".", "-").replace("/", "-")


def compute_advantages(estimator: str, scores: torch.Tensor, prompt_ids: Sequence[Hashable] | torch.Tensor,
                       task_ids: Sequence[Hashable] | torch.Tensor, *, eps: float = 1e-6,
                       norm_by_task_scale: bool = True, difficulty_reweight: bool = False,
                       gamma: float = 1.0, alpha: float = 0.8) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages [B] float32 for scores [B] grouped by prompt (and task), plus metrics.

    Metrics are python floats (one host sync at the end): score/mean, adv/{mean,std,max,min,pos_frac},
    per task `task/<name>/{mean_reward,std_reward,mean_std_reward,sqrt_mean_var,rate_adv,rate_num,
    num_prompts,num_responses}` as GoLongRL logs them (and adv_pos_frac), and difficulty/{mean_pass_rate,
    mean_weight} with reweighting.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if difficulty_reweight and estimator != "tmn_grpo":
        raise ValueError("difficulty_reweight applies on top of tmn_grpo only")
    scores = torch.as_tensor(scores)
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [B], got shape {tuple(scores.shape)}")
    B = scores.numel()
    if len(prompt_ids) != B or len(task_ids) != B:
        raise ValueError(f"{B} scores, {len(prompt_ids)} prompt ids and {len(task_ids)} task ids must match")
    dev = scores.device
    r = scores.to(torch.float64)
    if B == 0:
        return torch.zeros(0, dtype=torch.float32, device=dev), {}

    inv_u, _ = group_index(prompt_ids, dev)
    inv_m, tasks = group_index(task_ids, dev)
    U, M = int(inv_u.max()) + 1, len(tasks)
    # each prompt belongs to exactly one task
    task_of_u = torch.full((U,), -1, dtype=torch.long, device=dev).scatter_(0, inv_u, inv_m)
    if bool((task_of_u[inv_u] != inv_m).any()):
        raise ValueError("a prompt id appears with several task ids")

    cnt_u, mean_u, var_u, pop_std_u = _group_stats(r, inv_u, U)
    single = cnt_u <= 1
    mean_u = torch.where(single, torch.zeros_like(mean_u), mean_u)
    var_u = torch.where(single, torch.ones_like(var_u), var_u)
    prompts_per_task = _bincount(task_of_u, M).clamp_min(1)
    s_m = (_bincount(task_of_u, M, var_u) / prompts_per_task).sqrt()
    centred = r - mean_u[inv_u]

    metrics: dict[str, Any] = {}
    if estimator == "grpo":
        adv = centred / (var_u.sqrt()[inv_u] + eps)
    elif estimator == "dr_grpo":
        adv = centred
    elif estimator == "task_norm":
        cnt_m, mean_m, var_m, _ = _group_stats(r, inv_m, M)
        std_m = torch.where(cnt_m <= 1, torch.ones_like(var_m), var_m.sqrt())
        adv = (r - mean_m[inv_m]) / (std_m[inv_m] + eps)
    else:  # tmn_grpo
        adv = centred / (s_m[inv_m] + eps) if norm_by_task_scale else centred
        if difficulty_reweight:
            task_mean = _bincount(task_of_u, M, mean_u) / prompts_per_task
            smooth = torch.where(single, task_mean[task_of_u], alpha * mean_u + (1 - alpha) * task_mean[task_of_u])
            passed = (r > smooth[inv_u]).to(torch.float64)
            pass_rate = _bincount(inv_u, U, passed) / cnt_u.clamp_min(1)
            p = pass_rate[inv_u]
            weight = torch.where(r > mean_u[inv_u], torch.exp(gamma * (0.5 - p)), torch.exp(gamma * (p - 0.5)))
            adv = adv * weight
            metrics["difficulty/mean_pass_rate"] = pass_rate.mean()
            metrics["difficulty/mean_weight"] = weight.mean()

    # ---- metrics (GoLongRL's per-task statistics) ----
    metrics["score/mean"] = r.mean()
    metrics["adv/mean"] = adv.mean()
    metrics["adv/std"] = adv.std() if B > 1 else torch.zeros((), dtype=torch.float64)
    metrics["adv/max"] = adv.max()
    metrics["adv/min"] = adv.min()
    metrics["adv/pos_frac"] = (adv > 0).to(torch.float64).mean()
    cnt_m, mean_m, _, pop_std_m = _group_stats(r, inv_m, M)
    pop_std_u = torch.where(single, torch.zeros_like(pop_std_u), pop_std_u)
    std_sum_m = _bincount(task_of_u, M, pop_std_u)
    total_std = pop_std_u.sum()
    rate_adv = torch.where(total_std > 0, std_sum_m / total_std.clamp_min(1e-300), torch.zeros_like(std_sum_m))
    pos_m = _bincount(inv_m, M, (adv > 0).to(torch.float64)) / cnt_m.clamp_min(1)
    per_task = torch.stack([mean_m, pop_std_m, std_sum_m / prompts_per_task, s_m, rate_adv,
                            _bincount(task_of_u, M) / U, _bincount(task_of_u, M), cnt_m, pos_m], 1).tolist()
    out = {k: float(v) for k, v in metrics.items()}
    for t, row in zip(tasks, per_task):
        pre = f"task/{_safe_name(t)}"
        for key, v in zip(("mean_reward", "std_reward", "mean_std_reward", "sqrt_mean_var", "rate_adv",
                           "rate_num", "num_prompts", "num_responses", "adv_pos_frac"), row):
            out[f"{pre}/{key}"] = float(v)
    return adv.to(torch.float32), out
