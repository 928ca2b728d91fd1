"""Public scoring API: one response, a batch through the process pool, or a data record.

    compute_score("ndcg", response, ["doc 3", "doc 1", "doc 7"])          -> 0.87
    score_batch([(metric, response, gold), ...], timeout=10, num_workers=8) -> [floats]
    score_record(record, response)                                       -> float

Every score of golong's metrics is a float in [0, 1]; model output never raises and is never executed. A
response without exactly one `</think>` (or with two `<think>`) scores 0 unless `require_think=False`
(non-thinking models). Each metric reads the part of the response GoLongRL's reward code gives it
(SCOPES). `score_records` with RewardConfig.function scores with the user's function instead
(golong.rewards.function): whatever it returns, on every response.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

from golong.rewards.answer import answer_region, checked_response, marked_answer
from golong.rewards.function import JOB, FunctionReport
from golong.rewards.metrics import ROUGE_LANGUAGES, Gold, check_metric, score_region
from golong.rewards.pool import DEFAULT_MEMORY_MB, check_memory, check_timeout, get_pool
from golong.rewards.tasks import route

DEFAULT_TIMEOUT_S = 10.0
# Metrics that can take super-linear time on adversarial input run in a worker process when a
# timeout is requested. The others are linear-time and run inline.
SANDBOXED = frozenset({"math_verify", "rouge_l", "retrieval_calculate", "model_verify", "mrcr", "docmath"})
# The text each metric reads, as GoLongRL's reward code hands it over:
#   "after_think": the text after </think>, whole (GoLongRL's EM, selection, retrieval_calculate and
#                  judge-source math_verify rewards split on it and cut no [Answer] marker; MRCR grades the
#                  reply of a model without a think block; GoLongRL's DocMath, Frames, LongBench v1 QA and
#                  CorpusQA evals remove what precedes it);
#   "marked": the LongBench-Pro answer area of the WHOLE response, think block included: after the last
#             [Answer] (else [答案]) wherever it is; with no marker, every line of the response counts;
#   "whole": the whole response, think block included (GoLongRL's multitableqa reads its first <answer>,
#            its math_longcot_math_verify the last 500 characters, and LongBench-Pro's Summary scores the
#            whole response, thinking included, against the reference summary).
SCOPES: dict[str, str] = {
    "em": "after_think",
    "choice": "after_think",
    "retrieval_calculate": "after_think",
    "model_verify": "after_think",
    "mrcr": "after_think",
    "docmath": "after_think",
    "frames": "after_think",
    "lbv1qa": "after_think",
    "corpusqa": "after_think",
    "accuracy": "marked",
    "f1": "marked",
    "subem": "marked",
    "ndcg": "marked",
    "pairwise": "marked",
    "rouge_l": "whole",
    "iou": "whole",
    "math_verify": "whole",
    "minerva": "whole",
}
# Metrics whose gold is the record's list of gold items (doc_ids); the others read golden_label.
LIST_METRICS = frozenset({"accuracy", "f1", "subem", "ndcg", "pairwise", "rouge_l"})


@dataclass
class RewardConfig:
    require_think: bool = True  # False for non-thinking models: the whole response is the answer
    timeout: float = DEFAULT_TIMEOUT_S  # per response, seconds
    num_workers: int = 8  # scoring subprocesses for score_batch
    memory_mb: int = DEFAULT_MEMORY_MB  # per scoring subprocess, beyond its start-up footprint
    function: str = ""  # "file.py[:name]": the user's reward function scores every record (golong.rewards.function)
    function_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to it (verl's reward_kwargs)


def reward_config(rollout: Any) -> RewardConfig:
    """The RewardConfig of a run's rollout section (golong.config.RolloutConfig): how training scores responses."""
    return RewardConfig(require_think=rollout.require_think, timeout=rollout.reward_timeout_s,
                        num_workers=rollout.reward_workers, memory_mb=rollout.reward_memory_mb,
                        function=rollout.reward_function, function_kwargs=dict(rollout.reward_kwargs))


def metric_text(metric: str, response: str, *, require_think: bool = True) -> str | None:
    """The text `metric` reads in `response` (SCOPES), or None when the response fails the format gate."""
    scope = SCOPES[metric]
    if scope in ("marked", "whole"):
        whole = checked_response(response, require_think=require_think)
        return whole if whole is None or scope == "whole" else marked_answer(whole)
    return answer_region(response, require_think=require_think)


def compute_score(metric: str, response: str, ground_truth: Gold, *, timeout: float | None = DEFAULT_TIMEOUT_S,
                  require_think: bool = True) -> float:
    """Score one response with `metric` against `ground_truth` (a string, a list of gold items, or for
    retrieval_calculate {"doc_ids", "golden_label"}, for model_verify {"answer", "golden_label"}, for mrcr
    {"answer", "prefix"}, for rouge_l
    optionally {"references", "language": "Chinese" | "English"}), on the part of the response SCOPES names.

    With a timeout, the SANDBOXED metrics (math-verify, ROUGE-L, retrieval_calculate, model_verify, mrcr, docmath)
    run in a pooled worker process that is killed when it overruns (score 0); the other metrics run here, in time linear
    in the response. `timeout=None` scores everything in this process without a limit. Raises ValueError only for an
    unknown metric name or a timeout that is not a finite number of seconds > 0.
    """
    check_metric(metric)
    if timeout is not None:
        check_timeout(timeout)
    try:
        region = metric_text(metric, response, require_think=require_think)
    except Exception:  # e.g. a non-str response
        return 0.0
    if region is None:
        return 0.0
    if timeout is not None and metric in SANDBOXED:
        return get_pool(1).map([(metric, region, ground_truth)], timeout)[0]
    return score_region(metric, region, ground_truth)


def score_batch(items: Sequence[tuple[str, str, Gold]], *, timeout: float = DEFAULT_TIMEOUT_S,
                num_workers: int = 8, require_think: bool = True, memory_mb: int = DEFAULT_MEMORY_MB,
                report: FunctionReport | None = None) -> list[float]:
    """Scores of [(metric, response, ground_truth), ...] in order, through `num_workers` processes.

    Each item has its own `timeout` (seconds of worker time); an item over it, or one that needs more than
    `memory_mb` MiB in its worker, scores 0. Each metric's text (SCOPES) is cut here, so only it travels to the
    workers. `num_workers=0` scores the linear-time metrics inline in this process; the SANDBOXED ones
    (math-verify parses model output with sympy) still go through one timed worker, as in `compute_score`.
    Where `report` is given, the items that ran out of time or lost their worker go to report.lost (item index,
    what happened).
    """
    check_timeout(timeout)
    check_memory(memory_mb)
    jobs: list[tuple[str, str, Gold]] = []
    where: list[int] = []
    out = [0.0] * len(items)
    for i, (metric, response, gold) in enumerate(items):
        check_metric(metric)
        try:
            region = metric_text(metric, response, require_think=require_think)
        except Exception:
            region = None
        if region is not None:
            jobs.append((metric, region, gold))
            where.append(i)
    pooled = FunctionReport()
    if num_workers <= 0:
        scores = [0.0 if job[0] in SANDBOXED else score_region(*job) for job in jobs]
        timed = [k for k, job in enumerate(jobs) if job[0] in SANDBOXED]
        if timed:
            for k, s in zip(timed, get_pool(1, memory_mb).map([jobs[k] for k in timed], timeout, pooled)):
                scores[k] = s
            pooled.lost = [(timed[k], what) for k, what in pooled.lost]
    else:
        scores = get_pool(num_workers, memory_mb).map(jobs, timeout, pooled)
    for i, s in zip(where, scores):
        out[i] = s
    if report is not None:
        report.lost += [(where[k], what) for k, what in pooled.lost]
    return out


def _record_fields(record: Any) -> tuple[str | None, str | None, dict, Any]:
    """(data_source, ability, extra_info, ground_truth) of a Record or a verl-layout dict."""
    if isinstance(record, dict):
        rm = record.get("reward_model") or {}
        gt = rm.get("ground_truth") if isinstance(rm, dict) else None
        return record.get("data_source"), record.get("ability"), record.get("extra_info") or {}, gt
    return record.data_source, record.ability, record.extra_info or {}, record.ground_truth


def _listed(value: Any) -> Any:
    """A list for a numpy array (pandas reads parquet list columns as arrays), else `value` as it is."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, (str, bytes)) else value


def record_target(record: Any) -> tuple[str, Gold]:
    """(metric, gold) of a data record: its routed metric and the gold field that metric reads."""
    data_source, ability, extra, gt = _record_fields(record)
    gt = _listed(gt)
    metric = route(data_source, ability, extra.get("reward_mode") if isinstance(extra, dict) else None)
    if isinstance(gt, list) and gt and not isinstance(gt[0], str):
        gt = gt[-1]  # verl datasets sometimes store a list of ground-truth dicts: the last one counts
    if metric in ("model_verify", "mrcr"):
        label = gt if isinstance(gt, str) else (gt.get("golden_label") if isinstance(gt, dict) else
                                                getattr(gt, "golden_label", "")) or ""
        if metric == "mrcr":  # the gold message and the random prefix the answer must start with
            prefix = extra.get("random_string_to_prepend") if isinstance(extra, dict) else None
            return metric, {"answer": label, "prefix": prefix if isinstance(prefix, str) else ""}
        # the exact answer extra_info carries (else the label), then math-verify
        answer = extra.get("ground_truth") if isinstance(extra, dict) else None
        return metric, {"answer": answer if isinstance(answer, str) else label, "golden_label": label}
    if isinstance(gt, (str, list)):
        return metric, gt
    if isinstance(gt, dict):
        doc_ids = list(_listed(gt.get("doc_ids")) or [])
        label, summary = gt.get("golden_label") or "", gt.get("summary")
    else:
        doc_ids, label = list(_listed(getattr(gt, "doc_ids", [])) or []), getattr(gt, "golden_label", "") or ""
        summary = getattr(gt, "summary", None)
    if metric == "retrieval_calculate":  # both: the documents to cite and the number to reach
        return metric, {"doc_ids": doc_ids, "golden_label": label}
    if metric == "rouge_l" and summary in ROUGE_LANGUAGES:  # GoLongRL's LongBench-Pro: the references' language
        return metric, {"references": doc_ids if doc_ids else label, "language": summary}
    if metric in LIST_METRICS:
        return metric, (doc_ids if doc_ids else label)
    return metric, (label if label else doc_ids)


def score_record(record: Any, response: str, *, require_think: bool = True,
                 timeout: float | None = DEFAULT_TIMEOUT_S) -> float:
    """Score `response` against a data record (golong.data.Record or a GoLongRL/verl dict)."""
    metric, gold = record_target(record)
    return compute_score(metric, response, gold, timeout=timeout, require_think=require_think)


def function_inputs(record: Any) -> tuple[str | None, Any, dict]:
    """(data_source, ground_truth, extra_info) a reward function is called with: the ground truth as the data file
    stores it, extra_info with the record's ability added under "ability" when it has no such key."""
    data_source, ability, extra, gt = _record_fields(record)
    raw = getattr(record, "raw_ground_truth", None)
    if raw is not None:
        gt = raw[0]
    elif is_dataclass(gt):  # a Record built in code (no file behind it): the verl layout of its fields
        gt = asdict(gt)
    extra = dict(extra) if isinstance(extra, dict) else {}
    if ability and "ability" not in extra:
        extra["ability"] = ability
    return data_source, _listed(gt), extra


def score_records(records: Sequence[Any], responses: Sequence[str], *, config: RewardConfig | None = None,
                  report: FunctionReport | None = None) -> list[float]:
    """Batch `score_record`: response i is scored against records[i], through the pool. With config.function, the
    user's function scores every response (its whole text, no format gate), in the timed workers; a call that
    raised, ran out of time or killed its worker scores 0 and, where `report` is given, goes to report.errors as
    (i, what happened: a traceback); what else its dict results held goes to report.extras[i]. Without it, a
    response whose metric ran out of time or lost its worker scores 0 and goes to report.lost."""
    cfg = config or RewardConfig()
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} records but {len(responses)} responses")
    if cfg.function:
        jobs = [(JOB, resp, (*function_inputs(rec), cfg.require_think, cfg.function_kwargs))
                for rec, resp in zip(records, responses)]
        pool = get_pool(max(1, cfg.num_workers), cfg.memory_mb, cfg.function, tuple(sorted(cfg.function_kwargs)))
        return pool.map(jobs, cfg.timeout, report)
    targets = [record_target(r) for r in records]
    return score_batch([(m, resp, g) for (m, g), resp in zip(targets, responses)], timeout=cfg.timeout,
                       num_workers=cfg.num_workers, require_think=cfg.require_think, memory_mb=cfg.memory_mb,
                       report=report)
