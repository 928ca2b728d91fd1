"""Rewards: the nine capability types, each scored by its natural metric, in [0, 1].

    from golong.rewards import compute_score, metric_for, score_batch, score_record
    compute_score(metric_for("T2.1 Global Timeline Reconstruction"), response, gold_items)

Modules: answer (answer region + item normalisation), metrics (the eighteen metrics), tasks (task and
data-source routing), pool (timed scoring subprocesses), scoring (the public entry points), function (a
reward function of the user's own, verl's signature; default_compute_score is golong's under it).
"""

from golong.rewards.answer import answer_region
from golong.rewards.function import default_compute_score
from golong.rewards.metrics import METRICS
from golong.rewards.scoring import (
    DEFAULT_TIMEOUT_S,
    RewardConfig,
    compute_score,
    record_target,
    score_batch,
    score_record,
    score_records,
)
from golong.rewards.tasks import (
    CAPABILITIES,
    LBP_GROUPS,
    LONGBENCH_PRO,
    METRIC_NAMES,
    known_tasks,
    metric_for,
    route,
    task_group,
)

__all__ = [
    "CAPABILITIES",
    "DEFAULT_TIMEOUT_S",
    "LBP_GROUPS",
    "LONGBENCH_PRO",
    "METRICS",
    "METRIC_NAMES",
    "RewardConfig",
    "answer_region",
    "compute_score",
    "default_compute_score",
    "known_tasks",
    "metric_for",
    "record_target",
    "route",
    "score_batch",
    "score_record",
    "score_records",
    "task_group",
]
