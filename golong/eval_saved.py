"""`golong eval`'s saved batches: each batch of validation prompts, once generated and scored, is appended to
OUT/eval.partial.jsonl, so that an eval stopped part way (a crash, a preemption, Ctrl-C) resumes at its next batch.

    {"golong_eval_partial": 1, "fingerprint": "<sha1>", "batch_prompts": 64}        first line
    {"first": 0, "timings": {...}, "results": [[score, finish, failed, numbers, info, text], ...]}   a batch

The fingerprint covers what the responses depend on (the prompts' tokens, the weights, the sampling and scoring
settings, the batch size): a file of other settings is started over. A torn last line (a stop while writing it) is
dropped. Rank 0 reads and writes the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from golong.logger import get_logger

log = get_logger()
VERSION = 1


def fingerprint(prompts: Sequence[Any], settings: Sequence[Any]) -> str:
    """sha1 of the prompts' token ids and record positions and of `settings` (any repr-able values)."""
    h = hashlib.sha1(repr(tuple(settings)).encode())
    for p in prompts:
        h.update(f"|{p.index}:{len(p.input_ids)}|".encode())
        h.update(np.ascontiguousarray(p.input_ids))
    return h.hexdigest()


def read_batches(path: Path, fp: str, batch_prompts: int, total_prompts: int, n: int) -> list[dict[str, Any]]:
    """The batches saved at `path` under fingerprint `fp`, in order, up to the first missing, torn or misplaced one;
    the file is rewritten to hold those alone (with its header), so that new batches append after them."""
    batches: list[dict[str, Any]] = []
    reason = None
    if path.exists():
        with path.open(encoding="utf-8") as f:
            lines = f.read().split("\n")
        try:
            head = json.loads(lines[0])
        except json.JSONDecodeError:
            head = None
        if not isinstance(head, dict) or head.get("golong_eval_partial") != VERSION or head.get("fingerprint") != fp \
                or head.get("batch_prompts") != batch_prompts:
            reason = "it holds another eval's responses (other weights, prompts, settings or --save-every)"
        else:
            for line in lines[1:]:
                first = len(batches) * batch_prompts
                expect = min(batch_prompts, total_prompts - first) * n
                try:
                    batch = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line: a stop while it was written
                if not (isinstance(batch, dict) and batch.get("first") == first
                        and len(batch.get("results") or []) == expect):
                    break
                batches.append(batch)
        if reason:
            log.warning(f"eval: {path}: {reason}: starting over")
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps({"golong_eval_partial": VERSION, "fingerprint": fp, "batch_prompts": batch_prompts}) + "\n")
        for batch in batches:
            f.write(json.dumps(batch) + "\n")
    os.replace(tmp, path)
    return batches


def append_batch(path: Path, first: int, results: Sequence[Sequence[Any]], timings: dict[str, float]) -> None:
    """Append one batch (its first prompt's position, each response's [score, finish, failed, numbers, info, text],
    its timings), flushed to disk before returning."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"first": first, "timings": timings, "results": [list(r) for r in results]}) + "\n")
        f.flush()
        os.fsync(f.fileno())
