"""pass@k, best@n, worst@n and std@n over a prompt's n sampled responses (validation and `golong eval` with
rollout.val_n > 1), and the standard error of the mean reward over prompts."""

from __future__ import annotations

from collections.abc import Sequence
from math import comb, sqrt
from statistics import fmean, pstdev, stdev

# A response passes at the full score (every capability metric's 1); training's reward/pass_rate reads the same.
PASS_SCORE = 1.0 - 1e-9


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of the chance that at least one of k responses, drawn without replacement from a
    prompt's n of which c pass, passes (Chen et al. 2021): 1 - C(n - c, k) / C(n, k), in exact integers rounded
    once (pass@1 is c / n to the last bit)."""
    if not (1 <= k <= n and 0 <= c <= n):
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    total = comb(n, k)
    return (total - comb(n - c, k)) / total


def k_values(n: int) -> list[int]:
    """The k reported for n responses a prompt: 1, 2, 4, ... below n, and n."""
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) < n]
    return ks + [n]


def sample_metrics(groups: Sequence[Sequence[float]]) -> dict[str, float]:
    """Means over prompts of pass@k for every k of `k_values(n)` and, for n > 1, of best@n, worst@n and std@n (a
    prompt's highest score, its lowest, and the population std of its n scores, as verl's std@N). With two prompts
    or more, reward_stderr: the standard error of the mean reward, the sample std of the prompts' mean scores over
    sqrt(prompts) (lm-evaluation-harness's stderr, the prompt as the unit). groups: each prompt's n scores, the same
    n for all (at least one prompt). Keys "pass@<k>", "best@<n>", "worst@<n>", "std@<n>", "reward_stderr"."""
    n = len(groups[0]) if groups else 0
    if n == 0 or any(len(g) != n for g in groups):
        raise ValueError("sample_metrics needs one or more prompts, each with the same number (>= 1) of scores")
    passed = [sum(s >= PASS_SCORE for s in g) for g in groups]
    out = {f"pass@{k}": sum(pass_at_k(n, c, k) for c in passed) / len(groups) for k in k_values(n)}
    if n > 1:
        out[f"best@{n}"] = fmean(max(g) for g in groups)
        out[f"worst@{n}"] = fmean(min(g) for g in groups)
        out[f"std@{n}"] = fmean(pstdev(g) for g in groups)
    if len(groups) > 1:
        out["reward_stderr"] = stdev(fmean(g) for g in groups) / sqrt(len(groups))
    return out
