"""Prompts: chat template + overlong handling, an on-disk cache of the result, and the resumable, deterministic
prompt sampler.

Left truncation keeps the chat template intact: the longest message's *content* loses tokens from
its start (documents come first in long-context prompts, the question last), then the template is
re-applied; when that message is used up, the next longest is cut. A prompt that still does not fit
(template overhead alone too long), or would fit only without its last user message (the question), is dropped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from golong.data.records import Record
from golong.logger import ProgressLog

logger = logging.getLogger(__name__)

OVERFLOW_MODES = ("truncate_left", "truncate_middle", "drop")
ENCODE_BATCH = 64  # records chat-templated, then tokenized in one call
# how long a node's ranks wait for its local rank 0 to tokenize (GoLongRL's ~1.4B prompt tokens: minutes to tens of
# minutes). Through the job's store, not a collective: parallel.timeout_s does not apply; a writer that dies takes
# the job down with it under torchrun
SHARED_BUILD_WAIT_S = 24 * 3600.0
_SHARED_CALLS = itertools.count()


@dataclass
class EncodedPrompt:
    # [L] int32, the chat-templated prompt incl. the assistant generation header. An array, not a list: a list
    # spends ~36 bytes a token (an int object each), 23K long-context records ~50 GB on every rank
    input_ids: np.ndarray
    index: int  # position of the record in the `records` passed to build_prompts
    record: Record
    truncated: bool = False


def _encode(tokenizer: Any, messages: list[dict[str, str]], kwargs: dict[str, Any]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _truncate(tokenizer: Any, messages: list[dict[str, str]], ids: list[int], limit: int,
              kwargs: dict[str, Any], middle: bool) -> list[int] | None:
    """The chat-templated ids with the longest message cut until they fit `limit`: its start (middle=False),
    or its middle, keeping its first and last halves (LongBench's truncation: a single-message prompt keeps
    its instructions and its question); None where the cut would leave no question or nothing is left to cut."""
    msgs = [dict(m) for m in messages]
    question = max((k for k, m in enumerate(msgs) if m.get("role") == "user"), default=None)
    excess = len(ids) - limit
    # one round per message emptied, plus a few: re-tokenising cut text can merge differently
    for _ in range(len(msgs) + 6):
        tokens = [list(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for m in msgs]
        j = max(range(len(msgs)), key=lambda k: len(tokens[k]))  # the longest message is cut
        if not tokens[j]:
            return None  # nothing left to cut: the template alone is over the limit
        keep = max(len(tokens[j]) - excess, 0)
        if not keep and j == question:  # the question would go: empty the longest other message first
            others = [k for k in range(len(msgs)) if k != question and tokens[k]]
            if not others:
                return None  # a prompt without its question teaches nothing: drop it
            j = max(others, key=lambda k: len(tokens[k]))
            keep = 0
        head = keep // 2 if middle else 0
        # a cut inside a multi-byte character decodes to U+FFFD: drop the partial character
        kept = tokenizer.decode(tokens[j][:head]).rstrip("\ufffd") if head else ""
        if keep - head:
            kept += tokenizer.decode(tokens[j][len(tokens[j]) - (keep - head):]).lstrip("\ufffd")
        msgs[j]["content"] = kept
        ids = _encode(tokenizer, msgs, kwargs)
        if len(ids) <= limit:
            return ids
        excess = len(ids) - limit
    return None


def build_prompts(records: Sequence[Record], tokenizer: Any, max_prompt_tokens: int,
                  overflow: str = "truncate_left", *, chat_template_kwargs: dict[str, Any] | None = None,
                  progress_every_s: float = 30.0, split: str = "") -> list[EncodedPrompt]:
    """Chat-template and tokenize `records`; prompts over `max_prompt_tokens` are truncated (overflow=
    "truncate_left": the longest message's start, "truncate_middle": its middle) or dropped ("drop"). Logs how
    many of each, and how far it got every `progress_every_s` seconds: thousands of 128K-token prompts take
    minutes before training starts.
    `split` ("train", "val") names the records in those lines."""
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"overflow={overflow!r}; choose one of {', '.join(OVERFLOW_MODES)}")
    kwargs = dict(chat_template_kwargs or {})
    out: list[EncodedPrompt] = []
    n_trunc = n_drop = 0
    name = f"build_prompts ({split})" if split else "build_prompts"
    progress = ProgressLog(name, len(records), "records tokenized", every_s=progress_every_s, logger=logger)
    for b0 in range(0, len(records), ENCODE_BATCH):
        batch = records[b0:b0 + ENCODE_BATCH]
        texts = [tokenizer.apply_chat_template(r.prompt, tokenize=False, add_generation_prompt=True, **kwargs)
                 for r in batch]
        # one call per batch: a fast (Rust) tokenizer encodes a batch on all cores, one text at a time on one
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for i, rec, ids in zip(range(b0, b0 + len(batch)), batch, encoded):
            if len(ids) > max_prompt_tokens:
                cut = None if overflow == "drop" else \
                    _truncate(tokenizer, rec.prompt, ids, max_prompt_tokens, kwargs, overflow == "truncate_middle")
                n_trunc, n_drop = n_trunc + (cut is not None), n_drop + (cut is None)
                if cut is not None:
                    out.append(EncodedPrompt(np.asarray(cut, dtype=np.int32), i, rec, truncated=True))
            else:
                out.append(EncodedPrompt(np.asarray(ids, dtype=np.int32), i, rec))
            progress.advance(items=1)
    cut = "" if overflow == "drop" else f"{n_trunc} {overflow.removeprefix('truncate_')}-truncated, "
    logger.info("%s: %d records -> %d prompts (%s%d dropped; limit %d tokens)", name, len(records), len(out), cut,
                n_drop, max_prompt_tokens)
    return out


# bump when build_prompts' output for the same inputs changes (2: truncation empties the other messages before it
# drops a prompt whose question is the longest message)
CACHE_VERSION = 2


def cacheable(tokenizer: Any) -> bool:
    """Whether prompts of this tokenizer can be cached: it needs a serialised form (a fast tokenizer)."""
    return getattr(tokenizer, "backend_tokenizer", None) is not None


def prompt_cache_key(records: Sequence[Record], tokenizer: Any, max_prompt_tokens: int, overflow: str,
                     chat_template_kwargs: dict[str, Any] | None = None) -> str | None:
    """A name for what `build_prompts` makes of these inputs: a hash of every message, the tokenizer (its whole
    serialised vocabulary and rules, chat template, special tokens and decode clean-up, the transformers and
    tokenizers versions), the limit and the overflow mode. None for a tokenizer with no serialised form (a slow
    one): no cache then."""
    if not cacheable(tokenizer):
        return None
    import tokenizers
    import transformers

    # beyond tokenizer.json: the template's variables (bos_token, ...), decode's clean-up (left truncation decodes)
    # and the libraries that render and encode
    h = hashlib.sha256(json.dumps([CACHE_VERSION, max_prompt_tokens, overflow, chat_template_kwargs or {},
                                   tokenizer.chat_template, type(tokenizer).__name__, tokenizer.special_tokens_map,
                                   getattr(tokenizer, "clean_up_tokenization_spaces", None),
                                   transformers.__version__, tokenizers.__version__], sort_keys=True,
                                  default=str).encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(len(records).to_bytes(8, "little"))
    for rec in records:  # every field length-prefixed: any character may occur in a message
        h.update(len(rec.prompt).to_bytes(8, "little"))
        for m in rec.prompt:
            for field in (str(m.get("role")), str(m.get("content"))):
                b = field.encode("utf-8", "surrogatepass")
                h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()[:40]


def save_prompts(prompts: Sequence[EncodedPrompt], directory: Path) -> bool:
    """Write `prompts` to `directory` (ids.npy: every prompt's ids end to end, int32; meta.npy: [n, 3] int64 of
    end offset, record index, truncated), through a temporary directory synced and renamed at the end: a crash or
    a concurrent writer (ranks of several nodes on a shared file system) never leaves a partial cache. False where
    another writer's copy was in place first (this one is dropped)."""
    directory = Path(directory)
    # a fresh name per writer (pids repeat across the nodes that share a file system); mkdir, not mkdtemp, keeps
    # the umask's permissions for the ranks of other users
    tmp = directory.with_name(f"{directory.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir(parents=True)
    ids = np.concatenate([p.input_ids for p in prompts]) if prompts else np.zeros(0, dtype=np.int32)
    ends = np.cumsum([len(p.input_ids) for p in prompts], dtype=np.int64)
    meta = np.stack([ends, [p.index for p in prompts], [p.truncated for p in prompts]], axis=1) if prompts else \
        np.zeros((0, 3), dtype=np.int64)
    try:
        for name, array in (("ids.npy", ids.astype(np.int32, copy=False)), ("meta.npy", meta.astype(np.int64))):
            with open(tmp / name, "wb") as f:
                np.save(f, array)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(directory)
    except OSError:  # another rank got there first: its copy is the same
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True


# A writer's temporary directory untouched this long belongs to a writer that died (killed, preempted): a live one
# writes its files within minutes of creating it (5.6 GB for GoLongRL's 1.4B prompt tokens).
STALE_WRITE_S = 3600.0


def remove_stale_writes(directory: Path, older_than_s: float = STALE_WRITE_S) -> int:
    """Delete the temporary directories save_prompts left beside `directory` when its writer was killed (nothing
    in them or on them changed for `older_than_s`); returns how many. A live writer's directory is left alone."""
    directory = Path(directory)
    removed = 0
    now = time.time()
    for bad in directory.parent.glob(f"{directory.name}.bad-*"):  # an unreadable cache set aside, its removal cut
        shutil.rmtree(bad, ignore_errors=True)
    for tmp in directory.parent.glob(f"{directory.name}.tmp-*"):
        try:
            touched = max([tmp.stat().st_mtime] + [f.stat().st_mtime for f in tmp.iterdir()])
        except OSError:  # renamed or removed under us by its writer
            continue
        if now - touched > older_than_s:
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
    return removed


def load_prompts(directory: Path, records: Sequence[Record]) -> list[EncodedPrompt] | None:
    """The prompts `save_prompts` wrote for `records`, their ids memory-mapped (read-only; the ranks of a node
    share one copy in the page cache), or None when there is no readable cache there."""
    try:
        ids = np.load(Path(directory) / "ids.npy", mmap_mode="r")
        meta = np.load(Path(directory) / "meta.npy")
    except (OSError, ValueError):
        return None
    if len(meta) and (int(meta[-1, 0]) != len(ids) or int(meta[:, 1].max()) >= len(records)):
        return None
    starts = np.concatenate([[0], meta[:-1, 0]])
    return [EncodedPrompt(ids[int(a):int(e)], int(i), records[int(i)], bool(t))
            for a, (e, i, t) in zip(starts.tolist(), meta.tolist())]


def build_prompts_cached(records: Sequence[Record], tokenizer: Any, max_prompt_tokens: int, overflow: str,
                         cache: Path | None, split: str, *, write: bool = True) -> list[EncodedPrompt]:
    """build_prompts of `records` through the prompt cache directory `cache` (None: no cache): read there
    (memory-mapped) when it holds these records under this tokenizer, limit and overflow, else built and, with
    `write`, saved there for the next reader (a training start, `golong data check`); a killed writer's leftovers
    are removed first. A write that fails (full or read-only disk) costs the next reader its tokenizing only."""
    if not records:
        return []
    key = None if cache is None else prompt_cache_key(records, tokenizer, max_prompt_tokens, overflow)
    where = None if key is None else Path(cache) / f"{split}-{key}"  # no key (a slow tokenizer): no cache
    if write and where is not None and remove_stale_writes(where):
        logger.info("%s prompts: removed the temporary directories of killed prompt-cache writers", split)
    got = None if where is None else load_prompts(where, records)
    if got is not None:
        logger.info("%s prompts: %d read from the prompt cache %s", split, len(got), where)
        return got
    if write and where is not None and where.exists():  # unreadable (cut by a crash): replaced, not kept forever
        bad = where.with_name(f"{where.name}.bad-{uuid.uuid4().hex}")
        try:
            where.rename(bad)
            shutil.rmtree(bad, ignore_errors=True)
            logger.warning("%s prompts: the prompt cache %s was unreadable; it is rebuilt", split, where)
        except OSError:
            pass
    built = build_prompts(records, tokenizer, max_prompt_tokens, overflow, split=split)
    if write and where is not None:
        try:
            if save_prompts(built, where):
                logger.info("%s prompts: written to the prompt cache %s for the next start", split, where)
        except OSError as e:
            logger.warning("%s prompts: could not write the prompt cache %s: %s", split, where, e,
                           extra={"every_rank": True})  # each node's local rank 0 writes
    return built


def build_prompts_shared(records: Sequence[Record], tokenizer: Any, max_prompt_tokens: int, overflow: str,
                         cache: Path | None, split: str, wait_s: float = SHARED_BUILD_WAIT_S) -> list[EncodedPrompt]:
    """build_prompts_cached on every rank of a job: a node's local rank 0 reads the cache or tokenizes and writes
    it, while the node's other ranks wait (on the job's store) and then map what it wrote, so a first start
    tokenizes once per node instead of once per rank (8 ranks tokenizing at once on one node's cores take ~8x as
    long). Where it wrote nothing (a failed write) they tokenize for themselves. Without a process group, a cache
    or a tokenizer that caches: build_prompts_cached on each rank. Every rank must make the same calls in the
    same order (they are numbered: a key of the store is set once)."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if (cache is None or not records or not cacheable(tokenizer) or not dist.is_initialized()
            or dist.get_world_size() == 1):
        return build_prompts_cached(records, tokenizer, max_prompt_tokens, overflow, cache, split, write=local == 0)
    store = dist.distributed_c10d._get_default_store()
    # unique per call, torchrun restart (its store outlives a restarted worker group) and node (torchrun numbers a
    # node's ranks contiguously, its local rank 0 first)
    attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}.{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    done = f"golong/prompt_cache/{attempt}/{next(_SHARED_CALLS)}/{split}/node-of-rank-{dist.get_rank() - local}"
    if local == 0:
        try:
            return build_prompts_cached(records, tokenizer, max_prompt_tokens, overflow, cache, split, write=True)
        finally:  # failed too: the others then tokenize themselves (and most likely fail alike, with its message)
            store.set(done, "1")
    try:
        store.wait([done], timedelta(seconds=wait_s))
    except dist.DistStoreError:
        # tokenizing late would leave this rank that much behind at the next collective, past its timeout
        raise RuntimeError(f"{split} prompts: this node's local rank 0 has not built them in {wait_s:.0f} s") from None
    return build_prompts_cached(records, tokenizer, max_prompt_tokens, overflow, cache, split, write=False)


def prompts_fingerprint(prompts: Sequence[EncodedPrompt], edge: int = 16) -> str:
    """A short hash of the prompts in order: each one's token count and its first and last `edge` token ids, its
    task and data source (reading every token of GoLongRL's long-context prompts would take seconds a start). A
    resume compares it with the checkpoint's: other data of the same size moves the data order onto other prompts."""
    h = hashlib.blake2b(digest_size=8)
    for p in prompts:
        ids = p.input_ids
        h.update(len(ids).to_bytes(8, "little"))
        h.update(np.asarray(ids[:edge], dtype=np.int64).tobytes())
        h.update(np.asarray(ids[-edge:], dtype=np.int64).tobytes())
        h.update(json.dumps([p.record.task, p.record.data_source]).encode())
    return h.hexdigest()


class PromptSampler:
    """Endless stream of record indices: epoch e visits all n once, in a permutation fixed by
    (seed, e). `state_dict()` / `load_state_dict()` resume exactly where it stopped."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        if n <= 0:
            raise ValueError(f"PromptSampler needs n >= 1, got {n}")
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self) -> PromptSampler:
        return self

    def __next__(self) -> int:
        if self.position >= self.n:
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        idx = int(self._order[self.position])
        self.position += 1
        return idx

    def take(self, k: int) -> list[int]:
        """The next k indices (crossing epoch boundaries as needed)."""
        return [next(self) for _ in range(k)]

    def state_dict(self) -> dict[str, int | bool]:
        return {"n": self.n, "seed": self.seed, "shuffle": self.shuffle, "epoch": self.epoch,
                "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["n"]) != self.n:
            raise ValueError(f"sampler state is for {state['n']} prompts, this dataset has {self.n}")
        self.seed, self.shuffle = int(state["seed"]), bool(state["shuffle"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
