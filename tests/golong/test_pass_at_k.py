"""pass@k and best@n against brute force over every k-subset of a prompt's responses."""

import itertools
import math
import random
from math import comb

import pytest

from golong.rewards.pass_at_k import PASS_SCORE, k_values, pass_at_k, sample_metrics


def _brute_pass_at_k(passed: list[bool], k: int) -> float:
    """The share of k-subsets of the responses holding a passing one."""
    subsets = list(itertools.combinations(passed, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_is_the_share_of_k_subsets_holding_a_pass():
    for n in range(1, 8):
        for c in range(n + 1):
            passed = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(passed, k), rel=1e-12, abs=1e-15), (n, c, k)


def test_pass_at_1_is_the_pass_rate_to_the_last_bit():
    assert all(pass_at_k(n, c, 1) == c / n for n in range(1, 65) for c in range(n + 1))
    assert all(pass_at_k(n, c, n) == (1.0 if c else 0.0) for n in range(1, 65) for c in range(n + 1))


def test_pass_at_k_at_large_n_matches_exact_binomials():
    for n, c, k in ((200, 3, 100), (1000, 1, 7), (1000, 999, 1), (512, 17, 512), (300, 0, 50)):
        exact = 1 - comb(n - c, k) / comb(n, k)  # Python's int / int rounds the exact ratio once
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12, abs=1e-15), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(4, 1, 0), (4, 1, 5), (4, 5, 2), (4, -1, 2), (0, 0, 1)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(n, c, k)


def test_k_values_are_the_powers_of_two_below_n_and_n():
    assert k_values(1) == [1]
    assert k_values(2) == [1, 2]
    assert k_values(5) == [1, 2, 4, 5]
    assert k_values(8) == [1, 2, 4, 8]
    assert k_values(12) == [1, 2, 4, 8, 12]


def test_sample_metrics_are_means_over_prompts():
    rng = random.Random(0)
    for n in (1, 2, 3, 5, 8):
        # scores in [0, 1.2]: some pass (>= 1), some only come close
        groups = [[rng.choice([0.0, 0.3, 0.999, 1.0, 1.2, rng.random()]) for _ in range(n)] for _ in range(7)]
        got = sample_metrics(groups)
        want = {f"pass@{k}": sum(_brute_pass_at_k([s >= 1.0 for s in g], k) for g in groups) / 7
                for k in k_values(n)}
        if n > 1:
            want[f"best@{n}"] = sum(max(g) for g in groups) / 7
            want[f"worst@{n}"] = sum(min(g) for g in groups) / 7
            # population std of each prompt's scores (numpy's default, as verl's std@N), by the definition
            want[f"std@{n}"] = sum(math.sqrt(sum((s - sum(g) / n) ** 2 for s in g) / n) for g in groups) / 7
        means = [sum(g) / n for g in groups]
        grand = sum(means) / 7
        want["reward_stderr"] = math.sqrt(sum((m - grand) ** 2 for m in means) / 6) / math.sqrt(7)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-12), (n, key)
    # a score within rounding of 1 passes, 0.999 does not
    assert sample_metrics([[1.0 - 1e-12], [0.999]]) == {"pass@1": 0.5,
                                                        "reward_stderr": pytest.approx((1.0 - 0.999) / 2, rel=1e-6)}
    # one prompt: no standard error over prompts
    assert "reward_stderr" not in sample_metrics([[0.5, 1.0]]) and sample_metrics([[0.5, 1.0]])["std@2"] == 0.25
    assert PASS_SCORE < 1.0


@pytest.mark.parametrize("groups", [[], [[]], [[1.0, 0.0], [1.0]]])
def test_sample_metrics_refuses_ragged_or_empty_groups(groups):
    with pytest.raises(ValueError, match="same number"):
        sample_metrics(groups)
