"""GoLongRL / verl records: the dataclass, validation, and .parquet / .jsonl reading and writing.

On disk (one row or JSON line per record, verl layout):

    {"data_source": "longbench_pro",
     "prompt": [{"role": "user", "content": "..."}],
     "ability": "long_context",
     "reward_model": {"style": "rule",
                      "ground_truth": {"doc_ids": ["..."], "golden_label": "...", "summary": "..."}},
     "extra_info": {"reward_mode": "T2.1 Global Timeline Reconstruction", "index": 7}}

Every record must route to a reward metric (data_source, reward_mode or ability; see
golong.rewards.tasks) and carry a non-empty ground truth, unless the run scores with a reward function
of its own (`routed=False`): then any data_source goes and the ground truth may be any value, handed to
that function as stored. A bad record raises RecordError naming the file and the line (JSONL, 1-based)
or row (parquet, 0-based).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """A malformed record; the message names the file and row/line."""


@dataclass
class GroundTruth:
    doc_ids: list[str] = field(default_factory=list)  # gold items, in order (lists, rankings, refs)
    golden_label: str = ""  # a single gold answer (EM, choice letter, number, table JSON)
    summary: str = ""


@dataclass
class Record:
    data_source: str
    prompt: list[dict[str, str]]  # chat messages [{"role", "content"}]
    ability: str
    ground_truth: GroundTruth
    extra_info: dict[str, Any] = field(default_factory=dict)
    style: str = "rule"
    # (reward_model.ground_truth as the file stores it,) for a user's reward function (routed=False loads); a tuple,
    # so that a stored null is told from "not kept"
    raw_ground_truth: tuple[Any] | None = None

    @property
    def task(self) -> str:
        """The task name used for per-task statistics: reward_mode, else ability, else data_source."""
        return str(self.extra_info.get("reward_mode") or self.ability or self.data_source)

    @property
    def metric(self) -> str:
        from golong.rewards.tasks import route

        return route(self.data_source, self.ability, self.extra_info.get("reward_mode"))

    def to_dict(self) -> dict[str, Any]:
        gt = self.ground_truth
        return {
            "data_source": self.data_source,
            "prompt": [dict(m) for m in self.prompt],
            "ability": self.ability,
            "reward_model": {"style": self.style, "ground_truth": {
                "doc_ids": list(gt.doc_ids), "golden_label": gt.golden_label, "summary": gt.summary}
                if self.raw_ground_truth is None else self.raw_ground_truth[0]},
            "extra_info": dict(self.extra_info),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "record", *, routed: bool = True) -> Record:
        """Validate a verl-layout dict and build a Record; RecordError(f"{where}: ...") if bad. routed=False (a run
        with its own reward function): the record need not route to a metric, its ground truth may be any value."""

        def bad(msg: str) -> RecordError:
            return RecordError(f"{where}: {msg}")

        if not isinstance(d, dict):
            raise bad(f"expected a JSON object, got {type(d).__name__}")
        missing = [k for k in ("data_source", "prompt", "reward_model") if k not in d]
        if missing:
            raise bad(f"missing field(s) {', '.join(missing)}")
        data_source = d["data_source"]
        if not isinstance(data_source, str) or not data_source:
            raise bad("data_source must be a non-empty string")
        prompt = _check_prompt(d["prompt"], bad)
        ability = d.get("ability") or ""
        if not isinstance(ability, str):
            raise bad("ability must be a string")
        extra = d.get("extra_info") or {}
        if not isinstance(extra, dict):
            raise bad("extra_info must be an object")
        rm = d["reward_model"]
        if not isinstance(rm, dict) or "ground_truth" not in rm:
            raise bad("reward_model must be an object with a ground_truth")
        mode = extra.get("reward_mode")
        if mode is not None and not isinstance(mode, str):
            raise bad(f"extra_info.reward_mode must be a string, got {type(mode).__name__}")
        raw = rm["ground_truth"]
        if routed:
            gt = _check_ground_truth(raw, bad)
        else:  # what golong's own fields can hold of it, for the SFT warm-up's target (a number: its text)
            try:
                number = isinstance(raw, (int, float)) and not isinstance(raw, bool)
                gt = _check_ground_truth(str(raw) if number else raw, bad)
            except RecordError:
                gt = GroundTruth()
        rec = cls(data_source, prompt, ability, gt, dict(extra), str(rm.get("style") or "rule"),
                  None if routed else (raw,))
        if not routed:
            return rec
        try:
            metric = rec.metric
        except ValueError as e:
            raise bad(f"{e}; a task golong has no metric for can be scored by a function of your own: "
                      "rollout.reward_function=path/to/file.py[:name]") from None
        if metric == "retrieval_calculate" and not (gt.doc_ids and gt.golden_label.strip()):
            raise bad("a retrieval_calculate record needs both ground_truth.doc_ids (the documents to cite) "
                      "and golden_label (the number to reach)")
        prefix = extra.get("random_string_to_prepend")
        if metric == "mrcr" and not (gt.golden_label and isinstance(prefix, str) and prefix):
            raise bad("an MRCR record needs ground_truth.golden_label (the message to reproduce) and "
                      "extra_info.random_string_to_prepend (the prefix the answer must start with)")
        if metric == "docmath" and not _finite_number(gt.golden_label):
            raise bad(f"a docmath record needs ground_truth.golden_label to be the reference number, got "
                      f"{gt.golden_label!r}")
        answer = extra.get("ground_truth")
        if metric == "model_verify" and not (gt.golden_label.strip() or (isinstance(answer, str) and answer.strip())):
            # doc_ids alone do not do: this reward reads the exact answer and golden_label only (a blank one: every
            # response would score 0)
            raise bad("a math_verify record of a judge-model data source needs a non-empty ground_truth.golden_label "
                      "(or extra_info.ground_truth)")
        from golong.rewards.tasks import is_known_task, known_tasks

        if mode and mode not in _warned_modes and not is_known_task(mode):
            _warned_modes.add(mode)
            logger.warning("%s: extra_info.reward_mode %r is not a known task; the record is scored by %s "
                           "(routed by ability / data_source). Known tasks: %s", where, mode, rec.metric,
                           ", ".join(known_tasks()))
        return rec


_warned_modes: set[str] = set()  # unknown reward_mode values already reported (once per process)


def _check_prompt(p: Any, bad: Any) -> list[dict[str, str]]:
    if isinstance(p, str):  # a bare prompt string is one user turn
        p = [{"role": "user", "content": p}]
    if not isinstance(p, list) or not p:
        raise bad("prompt must be a non-empty list of chat messages")
    out = []
    for j, m in enumerate(p):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise bad(f"prompt[{j}] must be an object with string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise bad(f"prompt[{j}].role {m['role']!r} is not one of {', '.join(ROLES)}")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in JSON): no tokenizer takes it
            raise bad(f"prompt[{j}].content holds {m['content'][e.start]!r} at character {e.start}, which is not "
                      "text (a lone UTF-16 surrogate)") from None
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in out):  # chat templates (Qwen3's) refuse a conversation without one
        raise bad("prompt has no user message")
    return out


def _check_ground_truth(gt: Any, bad: Any) -> GroundTruth:
    if isinstance(gt, list) and gt and isinstance(gt[-1], dict):
        gt = gt[-1]  # verl sometimes stores a list of ground-truth dicts: the last one counts
    if isinstance(gt, str):
        gt = {"golden_label": gt}
    if not isinstance(gt, dict):
        raise bad("reward_model.ground_truth must be an object (doc_ids, golden_label, summary) or a string (a "
                  "reward function of your own, rollout.reward_function, takes any value)")
    doc_ids = gt.get("doc_ids")
    if doc_ids is None:
        doc_ids = []
    if not isinstance(doc_ids, (list, tuple)) or not all(isinstance(x, str) for x in doc_ids):
        raise bad("reward_model.ground_truth.doc_ids must be a list of strings")
    label = gt.get("golden_label")
    label = "" if label is None else label
    summary = gt.get("summary")
    summary = "" if summary is None else summary
    if not isinstance(label, str) or not isinstance(summary, str):
        raise bad("reward_model.ground_truth.golden_label and .summary must be strings")
    if not doc_ids and not label.strip():
        raise bad("empty ground truth: neither doc_ids nor golden_label is set")
    return GroundTruth(list(doc_ids), label, summary)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:  # bytes: a decoding error names its line
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(f"{path}: line {n}: not UTF-8 text (byte {e.start + 1}: {e.reason})") from None
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                # a pretty-printed JSON document (an array of records) fails on its first line
                document = n == 1 and (line.lstrip().startswith("[") or line.strip() == "{")
                hint = ("; records are read one JSON object per line (JSON Lines), and this file looks like one JSON "
                        "document") if document else ""
                # some of json's messages end in "at" themselves ("Invalid control character at")
                raise RecordError(f"{path}: line {n}: invalid JSON ({e.msg.removesuffix(' at')} at column "
                                  f"{e.colno}){hint}") from None
            yield f"{path}: line {n}", d


def _iter_parquet(path: Path, batch_size: int = 256) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=batch_size)
        for batch in batches:
            for d in batch.to_pylist():
                if isinstance(d, dict) and isinstance(d.get("extra_info"), dict):
                    # a struct column holds the union of every row's keys: drop the ones this row lacks
                    d["extra_info"] = {k: v for k, v in d["extra_info"].items() if v is not None}
                rm = d.get("reward_model") if isinstance(d, dict) else None
                if isinstance(rm, dict) and isinstance(rm.get("ground_truth"), dict):  # the same, as .jsonl reads it
                    rm["ground_truth"] = {k: v for k, v in rm["ground_truth"].items() if v is not None}
                yield f"{path}: row {row}", d
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise RecordError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None


def _finite_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except (TypeError, ValueError):
        return False


def iter_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, row) of every row of a .parquet or JSON Lines (.jsonl / .json) file, streamed; `where` names the file
    and the line (1-based) or row (0-based). RecordError for an unreadable file or line."""
    p = Path(path)
    if p.is_dir():  # verl's data.train_files names files, not a folder of them
        raise RecordError(f"{p}: is a directory; a data file (.parquet / .jsonl / .json) is expected: list its files")
    if not p.is_file():
        raise FileNotFoundError(f"dataset file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return _iter_parquet(p)
    if suffix in (".jsonl", ".json"):
        return _iter_jsonl(p)
    raise RecordError(f"{p}: unsupported dataset format {suffix!r} (use .parquet or .jsonl)")


def iter_records(path: str | Path, *, routed: bool = True) -> Iterator[Record]:
    """Stream validated Records from a .parquet or .jsonl file (routed: see Record.from_dict)."""
    empty = True
    for where, d in iter_rows(path):
        empty = False
        yield Record.from_dict(d, where, routed=routed)
    if empty:
        raise RecordError(f"{path}: the file holds no records")


def load_records(path: str | Path | list[str | Path], limit: int | None = None, *, routed: bool = True
                 ) -> list[Record]:
    """The records of one file or a list of files (.parquet / .jsonl), validated, in file order; with
    `limit`, the first `limit` of them (nothing after those is read). routed: see Record.from_dict."""
    paths = path if isinstance(path, list) else [path]
    out: list[Record] = []
    for p in paths:
        if limit is not None and len(out) >= limit:
            break
        for rec in iter_records(p, routed=routed):
            out.append(rec)
            if limit is not None and len(out) >= limit:
                break
    return out


def write_records(records: list[Record], path: str | Path) -> Path:
    """Write records as .jsonl or .parquet (by suffix), creating parent directories."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    rows = [r.to_dict() for r in records]
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not any(row["extra_info"] for row in rows):
            for row in rows:  # parquet has no struct without fields
                del row["extra_info"]
        try:
            table = pa.Table.from_pylist(rows)
        except pa.ArrowException as e:
            raise ValueError(f"{p}: records do not fit one parquet schema ({e}); extra_info values of one key "
                             "must share a type across records (or write .jsonl)") from None
        pq.write_table(table, p)
    elif suffix in (".jsonl", ".json"):
        with p.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    else:
        raise ValueError(f"{p}: unsupported dataset format {suffix!r} (use .parquet or .jsonl)")
    return p


def reference_answer(record: Any) -> str:
    """A record's reference answer: extra_info.answer, else ground_truth.golden_label, else its doc_ids one per
    line; "" where it has none (a ground truth only the run's own reward function reads)."""
    return str(record.extra_info.get("answer") or record.ground_truth.golden_label or "\n".join(
        record.ground_truth.doc_ids))


def sft_target(record: Any) -> str:
    """The SFT response for a record: an empty think block, then its reference answer (synthetic
    records store one; otherwise the golden label, else the gold items one per line), after an
    [Answer] marker where the record's reward reads only what follows one (LongBench-Pro metrics)."""
    from golong.rewards.scoring import SCOPES

    answer = reference_answer(record)
    try:
        scope = SCOPES[record.metric]
    except ValueError:  # a record only the run's own reward function scores (rollout.reward_function)
        scope = "whole"
    if scope == "marked" and "[Answer]" not in answer:
        answer = f"[Answer]\n{answer}"
    return f"<think>\n\n</think>\n\n{answer}"
