"""`golong eval-compare A B`: two evals of the same prompts side by side, prompt by prompt.

Each eval's reward_stderr is the noise of its mean over prompts; two checkpoints scored on the same prompts share
that part of it (a hard prompt is hard for both), so the difference is judged by the paired statistic: per prompt
d = (B's mean score) - (A's), and per task and overall the mean of d with its standard error, the sample std of d
over sqrt(prompts), and how many prompts B scored above, equal to (|d| <= TIE) and below A. With `by`, the same
per group of prompts: their token bin (prompt_tokens), or a record key `golong eval --by` labelled their rows with.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

from golong.data.records import RecordError
from golong.eval_groups import PROMPT_TOKENS, label_order, token_bin

# what names a prompt in responses.jsonl: its task, source and position among the eval's records
_KEY = ("task", "data_source", "record")
# what must then agree for the two rows to be one prompt: its tokens' hash (older files: their count) and cut
_CONTENT = ("prompt_sha1", "prompt_tokens", "truncated")
# a prompt's two means closer than this are equal: means of other response counts round differently (0.2, 0.4 vs
# 0.3 x 3 differ by 6e-17)
TIE = 1e-9
# eval.json settings that make two evals' scores not comparable as the same measurement when they differ (judge: its
# model); an eval.json written before a setting was recorded does not hold it and is not compared on it
_SETTINGS = ("temperature", "top_p", "responses_per_prompt", "max_prompt_tokens", "overflow", "max_response_tokens",
             "require_think", "reward_function", "reward_kwargs", "judge")


def _setting(info: dict[str, Any], name: str) -> Any:
    value = info.get(name)
    return (value or {}).get("model") if name == "judge" else value


@dataclass
class EvalScores:
    """One eval's responses.jsonl: each prompt's scores and what identifies its text, keyed by _KEY."""

    path: Path
    scores: dict[tuple, list[float]]
    content: dict[tuple, tuple]  # key -> the row's _CONTENT fields (None where an older file lacks one)
    # key -> its group labels by --by key: the row's `groups` (golong eval --by KEY) and its prompt_tokens bin
    groups: dict[tuple, dict[str, str]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # eval.json beside it, where there is one
    warnings: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The checkpoint or model the eval scored, else its file."""
        return str(self.info.get("checkpoint") or self.info.get("model") or self.path)


def read_scores(source: str | Path) -> EvalScores:
    """An eval directory's responses.jsonl (or that file itself, or its eval.json) and the eval.json beside it: each
    prompt's scores, content fields and group labels (its rows' `groups`, and its prompt_tokens bin under
    "prompt_tokens"). A missing file or a row that is not a golong eval response is an error naming the file and
    line."""
    path = Path(source)
    if path.is_dir():
        path = path / "responses.jsonl"
    elif path.name == "eval.json":  # the eval's summary: its responses are beside it
        path = path.with_name("responses.jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (an eval directory holds responses.jsonl once golong eval ends)")
    scores: dict[tuple, list[float]] = defaultdict(list)
    content: dict[tuple, tuple] = {}
    groups: dict[tuple, dict[str, str]] = {}
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = tuple(row[k] for k in _KEY)
                hash(key)
                score = row["score"]
                if isinstance(score, bool) or not isinstance(score, (int, float)):
                    raise TypeError(f"score {score!r} is not a number")
                labels = row.get("groups", {})  # golong eval --by KEY: the prompt's group under each KEY
                if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
                    raise TypeError(f"groups {labels!r} is not a mapping of keys to labels")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise RecordError(f"{path}:{line_no}: not a golong eval response ({type(e).__name__}: {e}); each "
                                  f"row needs {', '.join(_KEY)} and a numeric score") from None
            if not math.isfinite(score):
                raise RecordError(f"{path}:{line_no}: score {score} is not a finite number")
            seen = tuple(row.get(k) for k in _CONTENT)
            if content.setdefault(key, seen) != seen:
                raise RecordError(f"{path}:{line_no}: two different prompts under task {key[0]}, data_source "
                                  f"{key[1]}, record {key[2]}: not one eval's responses.jsonl")
            if isinstance(tokens := row.get("prompt_tokens"), int):
                labels = {**labels, PROMPT_TOKENS: token_bin(tokens)}
            if groups.setdefault(key, labels) != labels:
                raise RecordError(f"{path}:{line_no}: the groups of task {key[0]}, data_source {key[1]}, record "
                                  f"{key[2]} differ from its earlier rows'")
            scores[key].append(float(score))
    if not scores:
        raise RecordError(f"{path}: no responses")
    out = EvalScores(path, dict(scores), content, groups)
    if (meta := path.with_name("eval.json")).is_file():
        try:
            info = json.loads(meta.read_text())
        except json.JSONDecodeError:
            out.warnings.append(f"{meta} is not JSON: its settings are not compared")
        else:
            if _is_eval_info(info):
                out.info = info
            else:
                out.warnings.append(f"{meta} is not an eval.json golong wrote (its object, tasks, judge or by has "
                                    "another shape): its settings are not compared")
    if path.with_name("eval.partial.jsonl").is_file():
        out.warnings.append(f"{path.parent} also holds eval.partial.jsonl: an eval there is under way or was stopped, "
                            f"and {path.name} is an earlier eval's")
    return out


def _is_eval_info(info: Any) -> bool:
    """Whether eval.json's parsed `info` has the shape of golong eval's: an object whose tasks are objects, its judge
    an object or null, its by an object."""
    if not isinstance(info, dict):
        return False
    tasks = info.get("tasks") or {}
    return (isinstance(tasks, dict) and all(isinstance(row, dict) for row in tasks.values())
            and isinstance(info.get("judge") or {}, dict) and isinstance(info.get("by") or {}, dict))


def _paired(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """Means of A and B and of d = B - A over prompts, d's standard error (None for one prompt), and the prompts B
    scored higher, equal (|d| <= TIE) and lower."""
    d = [b - a for a, b in pairs]
    return {"prompts": len(pairs), "reward_a": fmean(a for a, _ in pairs), "reward_b": fmean(b for _, b in pairs),
            "diff": fmean(d), "diff_stderr": stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None,
            "b_higher": sum(x > TIE for x in d), "equal": sum(abs(x) <= TIE for x in d),
            "b_lower": sum(x < -TIE for x in d)}


def compare(a: EvalScores, b: EvalScores, by: Sequence[str] = (), common: bool = False) -> dict[str, Any]:
    """The paired comparison of B against A, overall and per task (see the module docstring), and per group under
    each key of `by` (`by.<key>.<label>`). Both must hold the same prompts (common: the prompts both hold, the
    others counted in a warning), by key and by content (the prompt's token hash, or its token count and cut in
    files without one); the number of responses a prompt may differ (each prompt's mean is compared).
    `warnings`: prompts left out, the eval settings that differ (eval.json) and stale files; `per_prompt`: each
    prompt's key and its two mean scores (--json)."""
    only_a, only_b = sorted(a.scores.keys() - b.scores.keys()), sorted(b.scores.keys() - a.scores.keys())
    keys = sorted(a.scores.keys() & b.scores.keys())
    if (only_a or only_b) and not (common and keys):
        first = (only_a or only_b)[0]
        raise RecordError(f"{a.path} and {b.path} hold different prompts ({len(only_a)} only in the first, "
                          f"{len(only_b)} only in the second, {len(keys)} in both; the first such: task {first[0]}, "
                          f"data_source {first[1]}, record {first[2]}): compare evals of the same validation records, "
                          "data.max_prompt_tokens and data.overflow"
                          + ("" if common or not keys else ", or pass --common to compare the prompts both hold"))
    differ = [k for k in keys if any(x is not None and y is not None and x != y
                                     for x, y in zip(a.content[k], b.content[k]))]
    if differ:
        k = differ[0]
        raise RecordError(f"{a.path} and {b.path} name the same records but {len(differ)} of their {len(keys)} "
                          f"prompts differ (the first: task {k[0]}, data_source {k[1]}, record {k[2]}; its "
                          f"{', '.join(_CONTENT)}: {a.content[k]} vs {b.content[k]}): other data (files, seed, "
                          "context length), another truncation, or another tokenizer or chat template")
    warnings = [*a.warnings, *b.warnings]
    if only_a or only_b:
        warnings.append(f"--common: {len(keys)} prompts both evals hold are compared; {len(only_a)} only in A and "
                        f"{len(only_b)} only in B are left out")
    if a.info and b.info:
        warnings += [f"eval settings differ: {s} {_setting(a.info, s)} (A) vs {_setting(b.info, s)} (B)"
                     for s in _SETTINGS if s in a.info and s in b.info and _setting(a.info, s) != _setting(b.info, s)]
        # scored by other metrics (a reward function of the user's in one): B - A mixes two measurements
        metric_a, metric_b = ({t: row.get("metric") for t, row in (e.info.get("tasks") or {}).items()}
                              for e in (a, b))
        warnings += [f"task {t} is scored differently: {metric_a[t]} (A) vs {metric_b[t]} (B)"
                     for t in sorted(set(metric_a) & set(metric_b)) if metric_a[t] != metric_b[t]]
    means = {key: (fmean(a.scores[key]), fmean(b.scores[key])) for key in keys}
    pairs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key in keys:
        pairs[key[0]].append(means[key])
    every = [p for task in sorted(pairs) for p in pairs[task]]
    out = {"a": str(a.path), "b": str(b.path), "a_label": a.label, "b_label": b.label, "warnings": warnings,
           **_paired(every), "tasks": {task: _paired(pairs[task]) for task in sorted(pairs)}}
    if by:
        out["by"] = {key: _by_group(a, b, keys, means, key) for key in dict.fromkeys(by)}
        for key, groups in out["by"].items():  # --common: a group all of whose prompts were left out is not shown
            gone = {e.groups[k].get(key) for e, left in ((a, only_a), (b, only_b)) for k in left} - set(groups) - {None}
            if gone:
                warnings.append(f"--by {key}: no prompt both evals hold in group(s) "
                                f"{', '.join(sorted(gone, key=lambda x: label_order(key, x)))}")
    out["per_prompt"] = [{**dict(zip(_KEY, key)), "a": means[key][0], "b": means[key][1]} for key in keys]
    return out


def _by_group(a: EvalScores, b: EvalScores, keys: list[tuple], means: dict[tuple, tuple[float, float]], by: str
              ) -> dict[str, dict[str, Any]]:
    """The paired statistics per group of prompts under `by`, read from both evals' rows, which must label each
    prompt alike."""
    labelled: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key in keys:
        label_a, label_b = a.groups[key].get(by), b.groups[key].get(by)
        for ev, label in ((a, label_a), (b, label_b)):
            if label is None:
                held = sorted({k for g in ev.groups.values() for k in g})
                if by == PROMPT_TOKENS:
                    how = "its rows hold no prompt_tokens (golong before it)"
                elif by in (ev.info.get("by") or {}):
                    how = (f"its eval.json has by.{by}, but golong did not yet label the rows then; a new `golong eval "
                           f"--by {by}` does, generating the responses again")
                elif not set(held) - {PROMPT_TOKENS}:
                    how = ("its rows carry no record labels: golong wrote them before rows carried labels; a new "
                           "`golong eval` labels them, generating the responses again")
                else:
                    how = (f"rows carry their records' extra_info keys holding numbers or short text, and `golong eval "
                           f"--by {by}` labels them with {by} whatever it holds, generating the responses again")
                raise RecordError(f"{ev.path}: task {key[0]}, data_source {key[1]}, record {key[2]} has no group "
                                  f"under {by!r} ({how}); groups its rows hold: {', '.join(held) or 'none'}")
        if label_a != label_b:
            raise RecordError(f"task {key[0]}, data_source {key[1]}, record {key[2]} is in group {label_a!r} under "
                              f"{by!r} in {a.path} but {label_b!r} in {b.path}: their records differ")
        labelled[label_a].append(means[key])
    return {label: _paired(labelled[label]) for label in sorted(labelled, key=lambda x: label_order(by, x))}


def print_comparison(result: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from golong.data.check import print_table

    # names from the data and paths are text, not rich markup ("[/x]" would raise, "[bold]x" print as x)
    table = Table(title=f"B - A, prompt by prompt (A: {escape(result['a_label'])}, B: {escape(result['b_label'])})")
    for col in ("task", "prompts", "A", "B", "B - A ± stderr", "B higher / equal / lower"):
        table.add_column(col, justify="left" if col == "task" else "right")

    def row(name: str, r: dict[str, Any]) -> None:
        diff = f"{round(r['diff'], 3) + 0.0:+.3f}" + ("" if r["diff_stderr"] is None else f" ± {r['diff_stderr']:.3f}")
        table.add_row(escape(name), str(r["prompts"]), f"{r['reward_a']:.3f}", f"{r['reward_b']:.3f}", diff,
                      f"{r['b_higher']} / {r['equal']} / {r['b_lower']}")

    for task, r in result["tasks"].items():
        row(task, r)
    row("all", result)
    print_table(table)
    for key, groups in result.get("by", {}).items():
        table = Table(title=f"B - A by {escape(key)}")
        for i, col in enumerate((escape(key), "prompts", "A", "B", "B - A ± stderr", "B higher / equal / lower")):
            table.add_column(col, justify="left" if i == 0 else "right")
        for label, r in groups.items():
            row(label, r)
        print_table(table)
    for line in result["warnings"]:
        print(f"warning: {line}")
