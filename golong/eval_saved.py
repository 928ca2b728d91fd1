"""`golong eval`'s saved batches: each batch of validation prompts, once generated and scored, is appended to
OUT/eval.partial.jsonl, so that an eval stopped part way (a crash, a preemption, Ctrl-C) resumes at its next batch.

    {"golong_eval_partial": 1, "fingerprint": "<sha1>", "starts": [0, 355, ...]}                      first line
    {"first": 0, "timings": {...}, "results": [[score, finish, failed, numbers, info, text], ...]}   a batch

A batch holds `--save-every` prompts, or by default as many as keep each rank's requests within EVAL_BATCH_TOKENS
of context (prompt + max response tokens, times rollout.val_n): short prompts go in large batches (an engine kept
busy), 128K-token ones in batches of minutes. The fingerprint covers what the responses depend on (the prompts'
tokens, the weights, the sampling and scoring settings); a file of other settings or batches is started over. A
torn last line (a stop while writing it) is dropped. Rank 0 reads and writes the file.
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
EVAL_BATCH_TOKENS = 8 << 20  # per rank, by default: context tokens (prompt + max response) x responses of a batch


def batch_starts(prompt_tokens: Sequence[int], max_response_tokens: int, n: int, ranks: int,
                 save_every: int | None = None) -> list[int]:
    """The first prompt of each batch: every `save_every` prompts (0: one batch), or by default a new batch where
    the next prompt would take the batch's context tokens (prompt + max response, n responses each) past
    EVAL_BATCH_TOKENS x ranks."""
    total = len(prompt_tokens)
    if save_every is not None:
        return list(range(0, total, save_every)) if save_every > 0 else [0]
    starts, used = [0], 0
    for i, tokens in enumerate(prompt_tokens):
        cost = (tokens + max_response_tokens) * n
        if used and used + cost > EVAL_BATCH_TOKENS * ranks:
            starts.append(i)
            used = 0
        used += cost
    return starts


def fingerprint(prompts: Sequence[Any], settings: Sequence[Any]) -> str:
    """sha1 of the prompts' token ids and record positions and of `settings` (any repr-able values)."""
    h = hashlib.sha1(repr(tuple(settings)).encode())
    for p in prompts:
        h.update(f"|{p.index}:{len(p.input_ids)}|".encode())
        h.update(np.ascontiguousarray(p.input_ids))
    return h.hexdigest()


def read_batches(path: Path, fp: str, starts: Sequence[int], total_prompts: int, n: int) -> list[dict[str, Any]]:
    """The batches saved at `path` under fingerprint `fp` and batch starts `starts`, in order, up to the first
    missing, torn or misplaced one; the file is rewritten to hold those alone (with its header), so that new batches
    append after them."""
    batches: list[dict[str, Any]] = []
    ends = [*starts[1:], total_prompts]
    if path.exists():
        with path.open(encoding="utf-8") as f:
            lines = f.read().split("\n")
        try:
            head = json.loads(lines[0])
        except json.JSONDecodeError:
            head = None
        if not isinstance(head, dict) or head.get("golong_eval_partial") != VERSION or head.get("fingerprint") != fp \
                or head.get("starts") != list(starts):
            log.warning(f"eval: {path}: it holds another eval's responses (other weights, prompts, settings or "
                        "batches): starting over")
        else:
            for line, first, end in zip(lines[1:], starts, ends):
                try:
                    batch = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line: a stop while it was written
                if not (isinstance(batch, dict) and batch.get("first") == first
                        and len(batch.get("results") or []) == (end - first) * n):
                    break
                batches.append(batch)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(json.dumps({"golong_eval_partial": VERSION, "fingerprint": fp, "starts": list(starts)}) + "\n")
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
