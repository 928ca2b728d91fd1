"""RL algorithms: advantage estimators, the policy loss, rollout IS correction, dynamic sampling.

    adv, m = compute_advantages("tmn_grpo", scores, prompt_ids, task_ids, difficulty_reweight=True)
    keep, m = dynamic_sampling_filter(scores, prompt_ids)
    w, m = rollout_is_weights(old_lp, rollout_lp, mask, cu_seqlens=cu, mode="mask")
    loss, m = policy_loss(lp, old_lp, broadcast_to_tokens(adv, cu), mask,
                          global_token_count=n_valid_tokens_in_minibatch, is_weights=w)
"""

from golong.algo.advantages import ESTIMATORS, compute_advantages, group_index, overlong_penalty
from golong.algo.dynamic_sampling import dynamic_sampling_filter
from golong.algo.policy_loss import AGG_MODES, aggregation_weights, broadcast_to_tokens, low_var_kl, policy_loss
from golong.algo.rollout_is import IS_MODES, rollout_is_weights

__all__ = [
    "AGG_MODES",
    "ESTIMATORS",
    "IS_MODES",
    "aggregation_weights",
    "broadcast_to_tokens",
    "compute_advantages",
    "dynamic_sampling_filter",
    "group_index",
    "low_var_kl",
    "overlong_penalty",
    "policy_loss",
    "rollout_is_weights",
]
