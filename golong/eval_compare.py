"""`golong eval-compare A B`: two evals of the same prompts side by side, prompt by prompt.

Each eval's reward_stderr is the noise of its mean over prompts; two checkpoints scored on the same prompts share
that part of it (a hard prompt is hard for both), so the difference is judged by the paired statistic: per prompt
d = (B's mean score) - (A's), and per task and overall the mean of d with its standard error, the sample std of d
over sqrt(prompts), and how many prompts B scored above, equal to and below A.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

from golong.data.records import RecordError

# what names a prompt in responses.jsonl, whatever the model or its prompt's token count
_KEY = ("task", "data_source", "record")


@dataclass
class EvalScores:
    """One eval's responses.jsonl: each prompt's scores, keyed by (task, data_source, record)."""

    path: Path
    scores: dict[tuple, list[float]]


def read_scores(source: str | Path) -> EvalScores:
    """The scores of an eval directory's responses.jsonl (or of that file itself). A missing file or a row that is
    not a golong eval response is an error naming the file and line."""
    path = Path(source)
    if path.is_dir():
        path = path / "responses.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (an eval directory holds responses.jsonl once golong eval ends)")
    scores: dict[tuple, list[float]] = defaultdict(list)
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = tuple(row[k] for k in _KEY)
                score = float(row["score"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise RecordError(f"{path}:{line_no}: not a golong eval response ({type(e).__name__}: {e}); each "
                                  f"row needs {', '.join(_KEY)} and score") from None
            if not math.isfinite(score):
                raise RecordError(f"{path}:{line_no}: score {score} is not a finite number")
            scores[key].append(score)
    if not scores:
        raise RecordError(f"{path}: no responses")
    return EvalScores(path, dict(scores))


def _paired(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """Means of A and B and of d = B - A over prompts, d's standard error (None for one prompt), wins / ties /
    losses of B."""
    d = [b - a for a, b in pairs]
    return {"prompts": len(pairs), "reward_a": fmean(a for a, _ in pairs), "reward_b": fmean(b for _, b in pairs),
            "diff": fmean(d), "diff_stderr": stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None,
            "b_higher": sum(x > 0 for x in d), "equal": sum(x == 0 for x in d), "b_lower": sum(x < 0 for x in d)}


def compare(a: EvalScores, b: EvalScores) -> dict[str, Any]:
    """The paired comparison of B against A, overall and per task (see the module docstring). Both must hold the
    same prompts; the number of responses a prompt may differ (each prompt's mean is compared)."""
    only_a, only_b = sorted(a.scores.keys() - b.scores.keys()), sorted(b.scores.keys() - a.scores.keys())
    if only_a or only_b:
        first = (only_a or only_b)[0]
        raise RecordError(f"{a.path} and {b.path} hold different prompts ({len(only_a)} only in the first, "
                          f"{len(only_b)} only in the second; the first such: task {first[0]}, data_source "
                          f"{first[1]}, record {first[2]}): compare evals of the same validation data and "
                          "data.max_prompt_tokens")
    pairs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key in sorted(a.scores):
        pairs[key[0]].append((fmean(a.scores[key]), fmean(b.scores[key])))
    every = [p for task in sorted(pairs) for p in pairs[task]]
    return {"a": str(a.path), "b": str(b.path), **_paired(every),
            "tasks": {task: _paired(pairs[task]) for task in sorted(pairs)}}


def print_comparison(result: dict[str, Any]) -> None:
    from rich.table import Table

    from golong.data.check import print_table

    table = Table(title=f"B - A, prompt by prompt (A: {result['a']}, B: {result['b']})")
    for col in ("task", "prompts", "A", "B", "B - A ± stderr", "B higher / equal / lower"):
        table.add_column(col, justify="left" if col == "task" else "right")

    def row(name: str, r: dict[str, Any]) -> None:
        diff = f"{r['diff']:+.3f}" + ("" if r["diff_stderr"] is None else f" ± {r['diff_stderr']:.3f}")
        table.add_row(name, str(r["prompts"]), f"{r['reward_a']:.3f}", f"{r['reward_b']:.3f}", diff,
                      f"{r['b_higher']} / {r['equal']} / {r['b_lower']}")

    for task, r in result["tasks"].items():
        row(task, r)
    row("all", result)
    print_table(table)
