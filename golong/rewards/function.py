"""A reward function of the user's own (`rollout.reward_function=my_reward.py:compute_score`), verl's signature:

    def compute_score(data_source, solution_str, ground_truth, extra_info=None) -> float | dict

called by keyword, as verl calls it. solution_str is the whole decoded response (think block included: golong's
format gate is not applied, the function sees every response); ground_truth the record's
`reward_model.ground_truth` as stored; extra_info its `extra_info` (with its `ability` added when it has none).
A number (numpy scalars and 0-d arrays included) or a dict with it under "score" (verl); a coroutine function is
run to completion. The function scores every record, and runs only in the timed, memory-capped scoring workers
(golong.rewards.pool): the trainer parses the file (`check_function`) but never imports it.
`default_compute_score` is golong's own routing, format gate and metrics under the same signature, for a
function that handles a few data sources itself and hands the rest back.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import inspect
import json
import math
import numbers
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_NAME = "compute_score"  # verl's custom_reward_function.name default
JOB = "reward_function"  # the pool job kind that calls the user's function (not a metric name)
EXTRA_TEXT_CHARS = 500  # a text extra (DAPO's "pred") and a failure's line are cut to this in the rollout dump
MAX_EXTRAS = 32  # what a dict result holds beyond this many keys is dropped


class RewardFunctionError(RuntimeError):
    """The user's reward function failed to load, or failed on every response of a batch; the message holds its
    traceback (the CLI prints it alone, not the trainer's)."""


@dataclass
class FunctionReport:
    """What a batch of reward-function calls reported beside their scores."""

    errors: list[tuple[int, str]] = field(default_factory=list)  # (job index, what went wrong: a traceback)
    # golong's own metrics' jobs that ran out of time or lost their worker (an out-of-memory kill) and so scored 0:
    # (job index, what happened)
    lost: list[tuple[int, str]] = field(default_factory=list)
    # job index -> what a dict result held beside "score" (call_function's extras: numbers, or text)
    extras: dict[int, dict[str, float | str | None]] = field(default_factory=dict)

    def numbers(self) -> dict[str, list[float]]:
        """The numeric extras by key, in job order (the values logged as reward/extra/<key> means)."""
        out: dict[str, list[float]] = {}
        for i in sorted(self.extras):
            for key, v in self.extras[i].items():
                if isinstance(v, float):
                    out.setdefault(key, []).append(v)
        return out

    def infos(self, n: int) -> list[dict[str, Any] | None]:
        """Each of jobs 0..n-1's fields in a rollout dump: "reward_error" (the exception, error_line) where the call
        failed, "reward_extras" where its dict result held more than the score; None for a plain score."""
        failed = dict(self.errors)
        out: list[dict[str, Any] | None] = []
        for i in range(n):
            info: dict[str, Any] = {}
            if i in failed:
                info["reward_error"] = error_line(failed[i])
            if self.extras.get(i):
                info["reward_extras"] = self.extras[i]
            out.append(info or None)
        return out


def error_line(text: str) -> str:
    """A failure in one line, at most EXTRA_TEXT_CHARS: a traceback's exception (the lines after its last frame,
    a multi-line message joined), or the message itself."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    frames = [k for k, line in enumerate(lines) if line.startswith((" ", "\t"))]
    return _cut(" ".join(line.strip() for line in lines[frames[-1] + 1 if frames else 0:]) or "failed")


def _cut(text: str) -> str:
    """text, cut to EXTRA_TEXT_CHARS (marked by "...")."""
    return text if len(text) <= EXTRA_TEXT_CHARS else text[:EXTRA_TEXT_CHARS] + "..."


# Set by the scoring worker per job: rollout.require_think of the run, for default_compute_score's format gate.
_require_think = True


def parse_spec(spec: str) -> tuple[Path, str]:
    """"path/to/file.py[:name]" -> (absolute path, function name; compute_score when not given)."""
    head, sep, tail = spec.rpartition(":")
    path, name = (head, tail) if sep and head and tail.isidentifier() else (spec, DEFAULT_NAME)
    return Path(path).expanduser().resolve(), name


def code_sha1(spec: str) -> str:
    """sha1 of the code of a reward function spec's file ("no file" where there is none): the scores follow its code,
    not its path."""
    import hashlib

    path = parse_spec(spec)[0]
    return hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "no file"


def check_function(spec: str, key: str = "rollout.reward_function") -> str | None:
    """The problem with a reward function spec, one line naming `key`, or None: the file must exist, be Python
    that parses, and define `name` at its top level (a def, an assignment or an import). Nothing is executed."""
    path, name = parse_spec(spec)
    where = f"{key}={spec}"
    if not path.is_file():
        return f"{where}: {path} does not exist (expected path/to/file.py or path/to/file.py:function_name)"
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as e:
        return f"{where}: {path}:{e.lineno}: {e.msg}"
    except (OSError, ValueError) as e:
        return f"{where}: cannot read {path} ({e})"
    defined = _module_names(tree.body)
    if name not in defined and "*" not in defined:  # a star import may define it: the worker will tell
        functions = [n for n, is_function in defined.items() if is_function]
        return (f"{where}: {path} defines no {name!r} at its top level (its functions: "
                f"{', '.join(functions) or 'none'}; name one as path/to/file.py:function_name)")
    return None


def _module_names(body: list[ast.stmt]) -> dict[str, bool]:
    """Names a module body binds (name -> whether by a def), into if / try / with blocks, not into functions;
    "*" for a star import."""
    names: dict[str, bool] = {}

    def targets(t: ast.expr) -> None:
        if isinstance(t, ast.Name):
            names[t.id] = False
        elif isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                targets(e)

    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = True
        elif isinstance(node, ast.ClassDef):
            names[node.name] = False
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                targets(t)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets(node.target)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update({(a.asname or a.name).split(".")[0]: False for a in node.names})
        for block in ("body", "orelse", "finalbody", "handlers"):  # if / try / with / for blocks
            inner = getattr(node, block, None) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                        ast.ClassDef)) else None
            if isinstance(inner, list):
                for k, v in _module_names([s for s in inner if isinstance(s, ast.stmt)] +
                                          [s for h in inner if isinstance(h, ast.ExceptHandler)
                                           for s in h.body]).items():
                    names.setdefault(k, v)
    return names


def load_function(spec: str, kwarg_names: tuple[str, ...] = ()) -> Callable[..., Any]:
    """Import the file (its directory first on sys.path, for its own helper modules) and return the function,
    checked to take verl's keyword arguments and `kwarg_names` (rollout.reward_kwargs). Runs the user's code:
    called in the scoring workers only."""
    path, name = parse_spec(spec)
    sys.path.insert(0, str(path.parent))
    module_spec = importlib.util.spec_from_file_location(f"golong_user_reward_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"{path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise TypeError(f"{path}: {name!r} is {type(fn).__name__}, not a function")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without one: its first call will tell
        return fn
    try:
        signature.bind(data_source="", solution_str="", ground_truth=None, extra_info={},
                       **dict.fromkeys(kwarg_names))
    except TypeError as e:
        extra = f" and rollout.reward_kwargs {', '.join(kwarg_names)}" if kwarg_names else ""
        raise TypeError(f"{path}: {name}{signature} cannot be called as verl calls a reward function, by keyword: "
                        f"data_source, solution_str, ground_truth, extra_info{extra} ({e})") from None
    return fn


def call_function(fn: Callable[..., Any], data_source: str, solution_str: str, ground_truth: Any,
                  extra_info: dict[str, Any], kwargs: dict[str, Any] | None = None
                  ) -> tuple[float, dict[str, float | str | None]]:
    """fn's score as a finite float (fn called by keyword, as verl does, with `kwargs`: rollout.reward_kwargs),
    and what else a dict result held (verl's extra reward info, e.g. DAPO's "acc" and "pred"; string keys, the first
    MAX_EXTRAS): numbers as floats (bools 0 / 1, non-finite ones None), anything else as its text (dicts, lists
    and tuples as JSON), cut to EXTRA_TEXT_CHARS. Raises TypeError /
    ValueError naming what it returned where the score is not a finite number."""
    out = fn(data_source=data_source, solution_str=solution_str, ground_truth=ground_truth, extra_info=extra_info,
             **(kwargs or {}))
    if inspect.isawaitable(out):  # an async def, as verl's reward loop awaits
        out = asyncio.run(_awaited(out))
    score = out.get("score") if isinstance(out, dict) else out
    value = _number(score)
    if value is None:
        shown = f"a dict without a number under 'score' (keys {sorted(out)})" if isinstance(out, dict) else \
            f"{type(out).__name__} {out!r:.80}"
        raise TypeError(f"a reward function must return a number or a dict with 'score'; got {shown}")
    if not math.isfinite(value):
        raise ValueError(f"a reward function returned {score}; scores must be finite")
    extras: dict[str, float | str | None] = {}
    for key, v in out.items() if isinstance(out, dict) else ():
        if key == "score" or not isinstance(key, str):  # metric names are strings: 1 and "1" would collide
            continue
        if len(extras) == MAX_EXTRAS:
            break
        number = _number(v)
        if number is not None:
            extras[key] = number if math.isfinite(number) else None
        else:
            extras[key] = _cut(v if isinstance(v, str) else _as_text(v))
    return value, extras


def _as_text(v: Any) -> str:
    """A non-number extra as text: JSON for dicts, lists and tuples (a dump's reader can parse it), else repr."""
    if isinstance(v, (dict, list, tuple)):
        try:
            return json.dumps(v, default=repr, allow_nan=False)
        except (TypeError, ValueError):  # keys JSON cannot hold (tuples), NaN, a circular reference
            pass
    return repr(v)


def _number(v: Any) -> float | None:
    """v as a float where it is one (numpy scalars, 0-d arrays, one-element tensors, bools), else None."""
    if v is None or isinstance(v, (str, bytes)):
        return None
    try:
        return float(v)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an int past a float's range (10**400)
        return None


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def default_compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
                          **_: Any) -> float:
    """golong's built-in score of a response, under verl's signature: the record is routed as at data load
    (data_source, extra_info's reward_mode, then its ability) and scored here, with the run's
    rollout.require_think; raises ValueError for a record no metric fits and for a ground truth that holds no gold
    answer (a number is its text, as at data load). Inside a reward function it runs in the worker that called
    the function, under the same time limit."""
    from golong.rewards.scoring import compute_score, record_target

    if isinstance(ground_truth, numbers.Real) and not isinstance(ground_truth, bool):  # numpy's too (parquet)
        ground_truth = str(ground_truth.item() if hasattr(ground_truth, "item") else ground_truth)
    extra = dict(extra_info or {})
    record = {"data_source": data_source, "ability": extra.get("ability"), "extra_info": extra,
              "reward_model": {"ground_truth": ground_truth}}
    metric, gold = record_target(record)
    if not gold or (isinstance(gold, dict) and not any(gold.values())):
        raise ValueError(f"default_compute_score: no gold answer for metric {metric} in ground_truth "
                         f"{ground_truth!r:.200} (a string, a list of gold items, or doc_ids / golden_label)")
    return compute_score(metric, solution_str, gold, timeout=None, require_think=_require_think)


def set_require_think(value: bool) -> None:
    global _require_think
    _require_think = bool(value)
