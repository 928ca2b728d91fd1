"""Task name -> metric: the nine capability types, the 25 LongBench-Pro subtasks, data-source routes.

The data sources GoLongRL's reward code names ("EM", "selection", "multitableqa_pretraining",
"retrieval_calculate", and those naming a judge: *model_verify*, *model_judge*, *retrieval_summary_calculate*)
decide their metric; other records name their task in `extra_info.reward_mode`
(LongBench-Pro subtasks such as "T2.1 Global Timeline Reconstruction", or "math_verify") or in
`ability`; the rest are routed by data_source pattern (multitableqa*, math sources).
"""

from __future__ import annotations

import re

# The nine capability types of the GoLongRL taxonomy and their natural metric.
CAPABILITIES: dict[str, str] = {
    "precise_retrieval": "em",
    "comprehension": "choice",  # multiple-choice reading comprehension (LongBench-Pro QA uses accuracy)
    "exhaustive_retrieval": "f1",
    "numerical_reasoning": "math_verify",
    "structured_extraction": "iou",
    "structured_matching": "subem",
    "graded_ranking": "ndcg",
    "sequence_ordering": "pairwise",
    "summarization": "rouge_l",
}

# LongBench-Pro subtasks (names exactly as GoLongRL's reward code lists them).
LONGBENCH_PRO: dict[str, str] = {
    "T1.1 Global Cohesive Retrieval": "ndcg",
    "T1.2 Key-Snippet Retrieval": "ndcg",
    "T2.1 Global Timeline Reconstruction": "pairwise",
    "T2.2 Local Causal Chain Sorting": "pairwise",
    "T3.1 Multi-Doc Integration QA": "accuracy",
    "T3.2 Single-Hop Fact QA": "accuracy",
    "T4.1 Global-Coverage Constrained Summary": "rouge_l",
    "T4.2 Query-Focused Summary": "rouge_l",
    "T5.1 Full-Sentence Citation Alignment": "f1",
    "T5.2 Key-Statement Citation Alignment": "f1",
    "T6.1 Large-Scale Document Clustering": "subem",
    "T6.2 Targeted Subset Cluster Identification": "f1",
    "T6.3 Global Frequency Analysis": "pairwise",
    "T7.1 Global Conflict & Inconsistency Localization": "f1",
    "T7.2 Targeted Rule or Condition Violation Detection": "f1",
    "T7.3 Comprehensive Error & Anomaly Sweep": "f1",
    "T8.1 Structured Multi-Source Consistency Verification": "subem",
    "T8.2 Single-Source Targeted Aggregation": "subem",
    "T8.3 Long-Context Procedural State Tracking": "subem",
    "T9.1 Dependency-Aware Multi-Version Impact Analysis": "f1",
    "T9.2 Localized Interface Change Detection": "f1",
    "T10.1 Large-Scale In-Context Rule Induction": "subem",
    "T10.2 Targeted Example-Based Rule Induction": "subem",
    "T11.1 Long-Range Entity & Commitment Tracking": "accuracy",
    "T11.2 Short-Range Reference Resolution & State Query": "accuracy",
}

METRIC_NAMES = ("em", "accuracy", "choice", "f1", "math_verify", "iou", "subem", "ndcg", "pairwise", "rouge_l",
                "retrieval_calculate", "model_verify", "mrcr", "docmath", "minerva", "frames", "lbv1qa", "corpusqa")

# The data sources GoLongRL's reward code dispatches on by name: they decide the metric whatever
# reward_mode / ability say (a retrieval_calculate record may carry reward_mode "math_verify").
DATA_SOURCES: dict[str, str] = {
    "EM": "em",
    "selection": "choice",
    "multitableqa_pretraining": "iou",
    "retrieval_calculate": "retrieval_calculate",
    # verl's math_dapo grader without math-verify (data_source math_dapo_math_verify and *math_longcot_math_verify
    # sources get math-verify, as any other *math* source)
    "math_dapo": "minerva",
    "math": "minerva",
    "math_dapo_reasoning": "minerva",
    "math_longcot": "minerva",
}
# The model card's benchmarks as `golong data import` writes them (golong.data.benchmarks): the source's metric, for
# a record whose reward_mode and ability name no task (the importer's abilities, e.g. "mrcr_8needle", name the task
# a result is reported under; another dataset's "longbench_v2" records keep the task they name).
BENCHMARK_SOURCES: dict[str, str] = {
    "longbench_v2": "choice",
    "openai_mrcr": "mrcr",
    "docmath": "docmath",
    "frames": "frames",
    "lbv1qa": "lbv1qa",
    "corpusqa": "corpusqa",
}
# the data sources a routing error lists by name: not multitableqa_pretraining (one of multitableqa*), nor a
# benchmark source named as its metric (listed with the metric names)
_NAMED_SOURCES = [d for d in DATA_SOURCES if d != "multitableqa_pretraining"] + \
    [d for d in BENCHMARK_SOURCES if d not in METRIC_NAMES]
# Data sources whose name contains one of these were scored by a judge model in GoLongRL; its reward code
# scores their reward_mode "math_verify" records without one (model_verify: an exact answer, else math-verify
# after </think>) and needs the judge for every other mode.
JUDGED_SOURCE_MARKS = ("model_verify", "retrieval_summary_calculate", "model_judge")

_LBP_SHORT = {name.split(" ", 1)[0]: metric for name, metric in LONGBENCH_PRO.items()}  # "T1.1" -> ndcg


def _canon(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


_LBP_CANON = {_canon(name): metric for name, metric in LONGBENCH_PRO.items()}


def _lbp_metric(task: str) -> str | None:
    """The metric of a LongBench-Pro subtask: its full name, its number ("T1.1") or a spacing / case variant."""
    return LONGBENCH_PRO.get(task) or _LBP_SHORT.get(task.strip().upper()) or _LBP_CANON.get(_canon(task))


def _lookup(task: str) -> str | None:
    if (m := _lbp_metric(task)) is not None:
        return m
    c = _canon(task)
    if c in CAPABILITIES:
        return CAPABILITIES[c]
    if c in METRIC_NAMES:
        return c
    if c in ("rouge", "rougel", "summary"):
        return "rouge_l"
    return None


# GoLongRL's trainer normalises (TMN-GRPO, task-norm) and logs LongBench-Pro records per metric
# group, not per subtask: its TASK_METRIC_CONFIG maps the 25 subtasks to these six labels.
LBP_GROUPS: dict[str, str] = {"ndcg": "NDCG", "pairwise": "Pairwise_Accuracy", "accuracy": "Accuracy",
                              "rouge_l": "Summary", "f1": "F1_Score", "subem": "SubEM"}


def task_group(task: str) -> str:
    """The task id advantages group by, as GoLongRL forms it: a LongBench-Pro subtask (any spelling
    metric_for accepts) -> its metric group ("T1.2 Key-Snippet Retrieval" -> "NDCG"); any other
    task name unchanged."""
    if not isinstance(task, str):
        return task
    m = _lbp_metric(task)
    return LBP_GROUPS[m] if m is not None else task


def is_known_task(name: str) -> bool:
    """Whether metric_for(name) resolves (a capability type, LongBench-Pro subtask or metric name)."""
    return isinstance(name, str) and _lookup(name) is not None


def known_tasks() -> list[str]:
    return [*CAPABILITIES, *LONGBENCH_PRO, *METRIC_NAMES]


def _known_hint(*given: object) -> str:
    """The names a task may take, grouped (the 25 LongBench-Pro subtasks by their number range), after the
    closest matches of what was given."""
    import difflib

    names = {n.lower(): n for n in known_tasks()}
    close = [names[m] for g in given if isinstance(g, str) and g
             for m in difflib.get_close_matches(g.lower(), names, n=2, cutoff=0.75)]
    lbp = list(LONGBENCH_PRO)
    example = "" if close else f" (e.g. {lbp[2]!r})"  # a close match shows one already
    hint = (f"known tasks: capability types {', '.join(CAPABILITIES)}; metric names {', '.join(METRIC_NAMES)}; "
            f"the {len(lbp)} LongBench-Pro subtasks {lbp[0].split()[0]} ... {lbp[-1].split()[0]} by number or full "
            f"name{example}")
    return f"did you mean {' or '.join(map(repr, dict.fromkeys(close)))}? {hint}" if close else hint


def metric_for(task: str) -> str:
    """Metric of a capability type ("graded_ranking"), LongBench-Pro subtask ("T1.1 ..." or "T1.1")
    or metric name. Raises ValueError naming the known ones (and the closest to `task`)."""
    m = _lookup(task) if isinstance(task, str) else None
    if m is None:
        raise ValueError(f"unknown task {task!r}; {_known_hint(task)}")
    return m


def route(data_source: str | None, ability: str | None = None, reward_mode: str | None = None) -> str:
    """Metric for a record, as GoLongRL's reward code picks it: a data_source it names (DATA_SOURCES), a judge-model
    data source (JUDGED_SOURCE_MARKS) in reward_mode "math_verify" (model_verify), else the reward_mode, else the
    ability, else one of `golong data import`'s benchmark sources (BENCHMARK_SOURCES), else a data_source pattern
    (multitableqa*, *math*).

    Raises ValueError for a judge-model data source in any other reward_mode (it needs the recipe's judge model),
    and naming all three fields and the known names when none resolves.
    """
    ds = data_source if isinstance(data_source, str) else ""
    if ds in DATA_SOURCES:
        return DATA_SOURCES[ds]
    if any(mark in ds for mark in JUDGED_SOURCE_MARKS):
        if reward_mode == "math_verify":
            return "model_verify"
        raise ValueError(f"data_source {ds!r} with reward_mode {reward_mode!r} is scored by a judge model in "
                         "GoLongRL, which golong does not run; of these sources only reward_mode 'math_verify' "
                         "records can be trained on")
    for name in (reward_mode, ability):
        if isinstance(name, str) and name and (m := _lookup(name)) is not None:
            return m
    if ds in BENCHMARK_SOURCES:
        return BENCHMARK_SOURCES[ds]
    if ds.startswith("multitableqa"):
        return "iou"
    if "math" in ds.lower():
        return "math_verify"
    raise ValueError(
        f"cannot route record to a metric (reward_mode={reward_mode!r}, ability={ability!r}, "
        f"data_source={data_source!r}); {_known_hint(reward_mode, ability)}; "
        f"known data sources: {', '.join(_NAMED_SOURCES)}, multitableqa*, *math*")
