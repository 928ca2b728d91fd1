"""`golong eval`'s saved batches: each batch of validation prompts, once generated and scored, is appended to
OUT/eval.partial.jsonl, so that an eval stopped part way (a crash, a preemption, Ctrl-C) resumes after the batches
it saved.

    {"golong_eval_partial": 2, "fingerprint": "<sha1>"}                                                  first line
    {"first": 0, "end": 46, "timings": {...}, "results": [[score, finish, failed, numbers, info, text], ...]}

A batch holds `--save-every` prompts, or by default as many as keep each rank's requests within EVAL_BATCH_TOKENS
of context (prompt + max response tokens, times rollout.val_n): short prompts go in large batches (an engine kept
busy), 128K-token ones in batches of minutes. Each response is seeded by its place in the whole set, so any saved
run of batches from the first prompt on is valid whatever the batching: a rerun on another number of ranks or with
another --save-every keeps it. The fingerprint covers what the responses and scores depend on (the prompts' tokens,
the records, the weights' files, the resolved config, the reward function's code); a file of another eval is set
aside as eval.partial.jsonl.stale-<time>-<id>, and taken back by a rerun with its fingerprint. A torn last line
(a stop while writing it) is cut off. Rank 0 reads and writes the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from golong.logger import get_logger

log = get_logger()
VERSION = 2
EVAL_BATCH_TOKENS = 8 << 20  # per rank, by default: context tokens (prompt + max response) x responses of a batch


def batch_starts(prompt_tokens: Sequence[int], max_response_tokens: int, n: int, ranks: int,
                 save_every: int | None = None, first: int = 0) -> list[int]:
    """The first prompt of each batch from prompt `first` on: every `save_every` prompts (0: one batch), or by
    default a new batch where the next prompt would take the batch's context tokens (prompt + max response, n
    responses each) past EVAL_BATCH_TOKENS x ranks."""
    total = len(prompt_tokens)
    if save_every is not None:
        return list(range(first, total, save_every)) if save_every > 0 else [first]
    starts, used = [first], 0
    for i in range(first, total):
        cost = (prompt_tokens[i] + max_response_tokens) * n
        if used and used + cost > EVAL_BATCH_TOKENS * ranks:
            starts.append(i)
            used = 0
        used += cost
    return starts


def _files(path: str | Path | None) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of a checkpoint's or model directory's files: rewritten weights change them."""
    if not path or not Path(path).exists():
        return []
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [(str(p.relative_to(root)) if p != root else p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in files]


def fingerprint(prompts: Sequence[Any], config: dict[str, Any], checkpoint: str | Path | None) -> str:
    """sha1 of the prompts' token ids, their records (ground truth, extra_info, ...), the resolved config (`config`,
    without the output and logging settings) and the files of the checkpoint and of model.path."""
    h = hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode())
    for weights in (checkpoint, config.get("model", {}).get("path")):
        h.update(repr(_files(weights)).encode())
    if spec := config.get("rollout", {}).get("reward_function"):  # the scores follow its code, not its path
        from golong.rewards.function import code_sha1

        h.update(code_sha1(spec).encode())
    for p in prompts:
        record = {k: v for k, v in p.record.to_dict().items() if k != "prompt"}  # the prompt: its tokens, below
        h.update(f"|{p.index}:{len(p.input_ids)}:{json.dumps(record, sort_keys=True, default=str)}|".encode())
        h.update(np.ascontiguousarray(p.input_ids))
    return h.hexdigest()


def _row_ok(row: Any) -> bool:
    """[score, finish, failed, numbers, info, text] as append_batch writes it."""
    return (isinstance(row, list) and len(row) == 6 and isinstance(row[0], (int, float))
            and isinstance(row[1], str) and isinstance(row[2], bool) and isinstance(row[3], (dict, type(None)))
            and isinstance(row[4], (dict, type(None))) and isinstance(row[5], (str, type(None))))


def _set_aside(path: Path, why: str) -> None:
    """Move a saved eval that this one cannot resume to a name of its own (kept, not deleted: a rerun with its
    settings takes it back)."""
    stale = path.with_name(f"{path.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    os.replace(path, stale)
    log.warning(f"eval: {path}: {why}; moved to {stale}, starting over")


def _fingerprint_of(path: Path) -> str | None:
    """The fingerprint in a saved eval's first line (None: unreadable or not one)."""
    try:
        with path.open("rb") as f:
            head = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    return head.get("fingerprint") if isinstance(head, dict) and head.get("golong_eval_partial") == VERSION else None


def read_batches(path: Path, fp: str, total_prompts: int, n: int) -> list[dict[str, Any]]:
    """The batches saved at `path` under fingerprint `fp`: the run of them from prompt 0 on, each starting where the
    last ended, up to the first torn or misplaced one, which is cut off the file with all after it (new batches
    append after the good ones). A file without this fingerprint is set aside (_set_aside) and this eval's own, set
    aside earlier by a rerun with other settings, taken back (the largest where there are several), else a new one
    started."""
    batches: list[dict[str, Any]] = []
    if path.exists() and _fingerprint_of(path) != fp:
        _set_aside(path, "it holds another eval's responses (other weights, data or settings)")
    if not path.exists():
        mine = [a for a in path.parent.glob(f"{path.name}.stale*") if _fingerprint_of(a) == fp]
        if mine:
            aside = max(mine, key=lambda a: a.stat().st_size)
            os.replace(aside, path)
            log.info(f"eval: {aside} holds this eval's saved responses: resumed from it")
    if path.exists():
        good = 0
        try:
            with path.open("rb") as f:
                head = json.loads(f.readline())
                if not (isinstance(head, dict) and head.get("golong_eval_partial") == VERSION
                        and head.get("fingerprint") == fp):
                    raise ValueError("it holds another eval's responses (other weights, data or settings)")
                good, ended = f.tell(), True
                while line := f.readline():
                    try:
                        batch = json.loads(line)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        break  # a torn last line: a stop while it was written
                    first = batches[-1]["end"] if batches else 0
                    if not isinstance(batch, dict):
                        break
                    end, rows = batch.get("end"), batch.get("results")
                    if not (batch.get("first") == first and isinstance(end, int) and first < end <= total_prompts
                            and isinstance(rows, list) and len(rows) == (end - first) * n
                            and isinstance(batch.get("timings"), dict) and all(_row_ok(r) for r in rows)):
                        break  # rank 0 alone reads the file: a row it could not restore would stall the others
                    batches.append(batch)
                    good = f.tell()
                    ended = line.endswith(b"\n")  # a write cut just before its newline: the next batch's line
            os.truncate(path, good)
            if batches and not ended:  # would be glued to this one, and both cut off by the next resume
                with path.open("ab") as f:
                    f.write(b"\n")
            return batches
        except (ValueError, OSError) as e:  # unreadable
            _set_aside(path, str(e))
            batches = []
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"golong_eval_partial": VERSION, "fingerprint": fp}) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return batches


def append_batch(path: Path, first: int, end: int, results: Sequence[Sequence[Any]], timings: dict[str, float]
                 ) -> None:
    """Append one batch (its prompts first..end-1, each response's [score, finish, failed, numbers, info, text],
    its timings), flushed to disk before returning."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"first": first, "end": end, "timings": timings, "results": [list(r) for r in results]})
                + "\n")
        f.flush()
        os.fsync(f.fileno())
