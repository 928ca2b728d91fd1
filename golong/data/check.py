"""The records a run reads, and `golong data check CONFIG`: what training would see of them (per task: records,
prompts kept, truncated and dropped at data.max_prompt_tokens, prompt lengths), before a job is launched."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from golong.config import ConfigError, RunConfig, prompt_cache_dir
from golong.data.prompts import build_prompts_cached
from golong.data.records import Record, load_records
from golong.data.synthetic import generate
from golong.rewards.function import parse_spec
from golong.rewards.pass_at_k import PASS_SCORE


def run_records(cfg: RunConfig, *, train: bool = True) -> tuple[list[Record], list[Record]]:
    """(training, validation) records of a run: data.train_files, else data.synthetic_n synthetic records;
    data.val_files, else data.synthetic_val_n held-out synthetic records (another seed). train=False: the
    validation records only (training's list is empty)."""
    d = cfg.data
    routed = not cfg.rollout.reward_function  # a function of the user's own scores records golong cannot route
    if not train:
        records: list[Record] = []
    elif d.train_files:
        records = load_records(list(d.train_files), routed=routed)
    elif d.synthetic_n > 0:
        records = generate(d.synthetic_n, d.synthetic_context_tokens, seed=d.seed, tasks=d.synthetic_tasks or None)
    else:
        raise ConfigError("data.train_files is empty and data.synthetic_n is 0: no training data")
    if d.val_files:
        val = load_records(list(d.val_files), routed=routed)
    elif d.synthetic_val_n > 0:  # a different seed: held-out prompts
        val = generate(d.synthetic_val_n, d.synthetic_context_tokens, seed=d.seed + 7919,
                       tasks=d.synthetic_tasks or None)
    else:
        val = []
    return records, val


def task_metrics(records: Iterable[Record], function: str = "") -> dict[str, str]:
    """task name -> the metric its records are scored by ("a/b" when they mix): a data source can decide the
    metric whatever the task name says (an "EM" record of ability long_context, a judge source's math_verify).
    With a reward function ("file.py[:name]") it scores them all: its name, and the metric golong's own scoring
    (default_compute_score) would use, "none" where no metric fits (the function must score those itself):
    "compute_score() (golong: em)"."""
    scored_by: dict[str, set[str]] = defaultdict(set)
    name = f"{parse_spec(function)[1]}()" if function else None
    for r in records:
        scored_by[r.task].add(f"{name} (golong: {_golong_metric(r)})" if name else r.metric)
    return {t: "/".join(sorted(m)) for t, m in scored_by.items()}


def _golong_metric(record: Record) -> str:
    try:
        return record.metric
    except ValueError:
        return "none"


def check_data(cfg: RunConfig, *, answers: bool = False, train: bool = True) -> list[dict[str, Any]]:
    """One row per (split, task): records, prompts kept / truncated / dropped, kept prompts' token lengths
    (min, median, max); printed as a table. Bad records raise RecordError naming file and line, as training's
    loading does. `answers`: the records' reference answers scored too (score_answers). train=False: the
    validation records only, what `golong eval` reads (no training data needed)."""
    from golong.build import load_tokenizer

    d = cfg.data
    tokenizer = load_tokenizer(cfg)
    rows: list[dict[str, Any]] = []
    splits = list(zip(("train", "val"), run_records(cfg, train=train)))[0 if train else 1:]
    if not train and not splits[0][1]:
        raise ConfigError("nothing to check: --val-only reads data.val_files (or data.synthetic_val_n), and there "
                          "are none")
    for split, records in splits:
        # through the run's prompt cache: a training start (or another check) after this one tokenizes nothing
        prompts = build_prompts_cached(records, tokenizer, d.max_prompt_tokens, d.overflow, prompt_cache_dir(cfg),
                                       split)
        total: dict[str, int] = defaultdict(int)
        for r in records:
            total[r.task] += 1
        metric = task_metrics(records, cfg.rollout.reward_function)
        kept: dict[str, list[Any]] = defaultdict(list)
        for p in prompts:
            kept[p.record.task].append(p)
        for task in sorted(total):
            lengths = [len(p.input_ids) for p in kept[task]]
            rows.append({"split": split, "task": task, "metric": metric[task],
                         "records": total[task], "kept": len(lengths),
                         "truncated": sum(p.truncated for p in kept[task]), "dropped": total[task] - len(lengths),
                         "tokens_min": min(lengths, default=None),
                         "tokens_median": int(statistics.median(lengths)) if lengths else None,
                         "tokens_max": max(lengths, default=None)})
    _print(rows, cfg)
    if answers:
        score_answers(cfg, splits)
    train_rows = [r for r in rows if r["split"] == "train"]
    if train_rows and not sum(r["kept"] for r in train_rows):  # training stops there at start-up: say so here
        raise ConfigError(no_prompt_fits(sum(r["records"] for r in train_rows), cfg))
    if not train and not sum(r["kept"] for r in rows):  # as golong eval stops on it
        raise ConfigError(f"no validation prompt fits data.max_prompt_tokens={d.max_prompt_tokens} "
                          f"(data.overflow={d.overflow}): golong eval would have nothing to evaluate")
    return rows


def score_answers(cfg: RunConfig, splits: Iterable[tuple[str, list[Record]]]) -> list[dict[str, Any]]:
    """`golong data check --score-answers`: each record's reference answer, as the SFT warm-up would write it (an
    empty think block, then the answer), scored as training scores a response (rollout.reward_function, else
    golong's metric; in the timed scoring workers). One row per (split, task): records, answers scored, their mean,
    how many score below 1 and how many calls of a reward function failed; a record without a reference answer
    (a ground truth only the reward function reads) is not scored. Per task, the first record below 1 is printed with
    its position, score and (a failed call) error: a ground truth no answer can match, or a function that does
    not accept the answer it should. A function that fails on every answer of a split raises RewardFunctionError
    with the first failure's traceback, as training stops on a batch in which every call failed."""
    from golong.data.records import reference_answer, sft_target
    from golong.rewards.function import FunctionReport, RewardFunctionError
    from golong.rewards.scoring import reward_config, score_records

    rows: list[dict[str, Any]] = []
    for split, records in splits:
        answered = [(i, r) for i, r in enumerate(records) if reference_answer(r)]
        print(f"{split}: scoring the reference answers of {len(answered)} of {len(records)} records", flush=True)
        report = FunctionReport()
        scores = score_records([r for _, r in answered], [sft_target(r) for _, r in answered],
                               config=reward_config(cfg.rollout), report=report)
        if answered and len(report.errors) == len(answered):
            raise RewardFunctionError(
                f"{split}: the reward function failed on all {len(answered)} reference answers it was given "
                f"(rollout.reward_function={cfg.rollout.reward_function}); the first failure, from its scoring "
                f"worker:\n{min(report.errors)[1]}")
        by_task: dict[str, list[tuple[int, float, str | None]]] = defaultdict(list)
        for (i, r), score, info in zip(answered, scores, report.infos(len(answered))):
            by_task[r.task].append((i, score, (info or {}).get("reward_error")))
        total: dict[str, int] = defaultdict(int)
        for r in records:
            total[r.task] += 1
        for task in sorted(total):
            got = by_task[task]
            below = [x for x in got if x[1] < PASS_SCORE]
            rows.append({"split": split, "task": task, "records": total[task], "scored": len(got),
                         "mean": sum(x[1] for x in got) / len(got) if got else None, "below_1": len(below),
                         "failed": sum(x[2] is not None for x in got)})
            if below:
                i, score, error = below[0]
                print(f"{split} {task}: {len(below)} of {len(got)} reference answers score below 1; the first: record "
                      f"{i} (data_source {records[i].data_source!r}) scores {score:g}"
                      + (f": the reward function failed: {error}" if error else ""))
    _print_answers(rows, cfg)
    return rows


def _print_answers(rows: list[dict[str, Any]], cfg: RunConfig) -> None:
    from rich.markup import escape
    from rich.table import Table

    by = f"{parse_spec(cfg.rollout.reward_function)[1]}()" if cfg.rollout.reward_function else "golong's metrics"
    table = Table(title=f"reference answers scored by {by}")
    cols = {"split": "split", "task": "task", "records": "records", "scored": "answers", "mean": "mean score",
            "below_1": "below 1"}
    if cfg.rollout.reward_function:
        cols["failed"] = "function errors"
    for key, head in cols.items():
        table.add_column(head, justify="left" if key in ("split", "task") else "right", no_wrap=True)
    for r in rows:
        table.add_row(*("-" if r[c] is None else f"{r[c]:.3f}" if c == "mean" else escape(str(r[c])) for c in cols))
    print_table(table)


def no_prompt_fits(records: int, cfg: RunConfig) -> str:
    """The one-line error for training records of which none fits data.max_prompt_tokens."""
    d = cfg.data
    how = "(data.overflow=drop)" if d.overflow == "drop" else \
        "even truncated (the chat template alone is longer, or the cut would leave no question)"
    return f"none of the {records} training records fits data.max_prompt_tokens={d.max_prompt_tokens} {how}; " \
           "raise data.max_prompt_tokens"


def print_table(table: Any) -> None:
    """Print a rich Table to the terminal, or unwrapped (200 columns) to a log file: no squeezed columns. Callers
    pass names from the data (tasks, group labels) through rich.markup.escape: "[/x]" would raise."""
    from rich.console import Console

    console = Console()
    (console if console.is_terminal else Console(width=200)).print(table)


def print_task_counts(records: list[Any], title: str) -> None:
    """The records per task, with each task's metric (golong data synth, golong data import)."""
    from collections import Counter

    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    for head in ("task", "metric", "records"):
        table.add_column(head, justify="right" if head == "records" else "left", no_wrap=True)
    metric = task_metrics(records)
    for task, count in sorted(Counter(r.task for r in records).items()):
        table.add_row(escape(task), metric[task], str(count))
    table.add_row("all", "", str(len(records)))
    print_table(table)


def _print(rows: list[dict[str, Any]], cfg: RunConfig) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"golong data check: data.max_prompt_tokens={cfg.data.max_prompt_tokens}, "
                        f"data.overflow={cfg.data.overflow}")
    cols = {"split": "split", "task": "task", "metric": "metric", "records": "records", "kept": "prompts",
            "truncated": "truncated", "dropped": "dropped", "tokens_min": "min tok", "tokens_median": "median tok",
            "tokens_max": "max tok"}
    for key, head in cols.items():
        table.add_column(head, justify="left" if key in ("split", "task", "metric") else "right", no_wrap=True)
    for r in rows:
        table.add_row(*("-" if r[c] is None else escape(str(r[c])) for c in cols))  # no prompt kept: no lengths
    print_table(table)
    for r in rows:
        if r["kept"] == 0:
            print(f"golong: warning: every {r['split']} record of task {r['task']!r} is over data.max_prompt_tokens="
                  f"{cfg.data.max_prompt_tokens} (data.overflow={cfg.data.overflow}); raise the limit")
