"""Run logging: rank-0 console, a JSONL metrics file, TensorBoard and (optionally) wandb."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


class _StdoutHandler(logging.StreamHandler):
    """A StreamHandler on whatever sys.stdout is now (as rich's console is), not the one at creation."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


class _OtherRankFilter(logging.Filter):
    """On ranks > 0: drop warnings every rank would print alike (config, data, step events: one line per rank on
    a 64-GPU job), keep errors and warnings logged with `extra={"every_rank": True}`, and say which rank."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.prefix = f"rank {rank}: "

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR and not getattr(record, "every_rank", False):
            return False
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def get_logger(name: str = "golong") -> logging.Logger:
    """Console logger that prints on rank 0; other ranks print errors and warnings logged with
    `extra={"every_rank": True}` (a rank's own trouble), prefixed "rank N: "."""
    log = logging.getLogger(name)
    if not log.handlers:
        handler: logging.Handler
        if sys.stdout.isatty():  # a terminal: rich's columns, wrapped to its width
            from rich.logging import RichHandler

            handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
            handler.setFormatter(logging.Formatter("%(message)s"))
        else:  # a file or pipe (Slurm logs, tee): one line per record, never wrapped, so paths copy and grep finds
            handler = _StdoutHandler()
            handler.setFormatter(logging.Formatter("[%(asctime)s] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    r = rank()
    for handler in log.handlers:
        for f in [f for f in handler.filters if isinstance(f, _OtherRankFilter)]:
            handler.removeFilter(f)
        if r != 0:
            handler.addFilter(_OtherRankFilter(r))
    log.setLevel(logging.INFO if r == 0 else logging.WARNING)
    return log


# Seconds between progress lines of a long load or write (weights, export): often enough to show it moves,
# seldom enough not to flood a cluster log. A module attribute, so tests can set it to 0.
PROGRESS_EVERY_S = 30.0


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


class ProgressLog:
    """Progress of long work as log lines on rank 0, "LABEL: 3/16 shards, 12.1 GB of 61.1 GB (31s)" (no total:
    "3 shards"; no total_bytes: no sizes), at most one every `every_s` seconds (default PROGRESS_EVERY_S), and a
    closing line from close() if it ran longer than that: loading a 30B model's shards or tokenizing a long-context
    dataset (minutes) is no longer silent, and quick work prints nothing. advance(nbytes, items) as it goes."""

    def __init__(self, label: str, total_items: int | None, unit: str, *, total_bytes: int | None = None,
                 every_s: float | None = None, logger: logging.Logger | None = None) -> None:
        self.label, self.total_items, self.unit, self.total_bytes = label, total_items, unit, total_bytes
        self.bytes = self.items = 0
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.start = self.last = time.monotonic()
        self.log = logger or get_logger()

    def _line(self) -> str:
        items = f"{self.items}/{self.total_items}" if self.total_items is not None else str(self.items)
        size = f", {_size(self.bytes)} of {_size(self.total_bytes)}" if self.total_bytes is not None else ""
        return f"{self.label}: {items} {self.unit}{size} ({time.monotonic() - self.start:.0f}s)"

    def advance(self, nbytes: int = 0, items: int = 0) -> None:
        self.bytes += nbytes
        self.items += items
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.log.info(self._line())

    def close(self) -> None:
        if time.monotonic() - self.start >= self.every_s:
            self.log.info(self._line() + ", done")


def _scalar(v: Any) -> float | int | str | None:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().item() if v.numel() == 1 else None
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, str)):
        return v
    try:
        v = float(v)  # a Python or numpy number
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else str(v)  # JSON has no NaN/inf


WANDB_ID_FILE = "wandb_run_id"


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory: read from RUN_DIR/wandb_run_id, else made and kept there (written
    atomically before wandb.init, so a run killed at any point resumes the id it logged under)."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B ids: lowercase letters and digits; 8 like wandb's own
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n")
    tmp.replace(path)
    return run_id


class MetricsWriter:
    """Append-only metrics sink. JSONL always (flushed per step, so a crash loses nothing
    already logged); TensorBoard and wandb when enabled. Only rank 0 writes. Like metrics.jsonl, the W&B run
    belongs to the run directory: every run in it (a resume) logs to the same W&B run, against the x-axis
    `trainer/step` (W&B's own step only increases: it would drop the SFT rows, at steps <= -1, and a resume's
    replayed steps). A resume first `rewind`s the file and TensorBoard past the steps it will log again."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "golong", config: dict[str, Any] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.active = rank() == 0
        self._tb = None
        self._wandb = None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        torn = False
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"  # a run killed mid-line: end that line, or it swallows our first row
        self._jsonl = open(self.path, "a", buffering=1)
        if torn:
            self._jsonl.write("\n")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        if wandb:
            import wandb as _wandb

            # a resumed run (same run_dir) continues the same W&B run instead of starting a new one beside it
            self._wandb = _wandb.init(project=wandb_project, dir=str(self.run_dir), config=config or {},
                                      id=wandb_run_id(self.run_dir), resume="allow")
            self._wandb.define_metric("trainer/step")
            self._wandb.define_metric("*", step_metric="trainer/step")

    def rewind(self, next_step: int | None) -> int:
        """Before a run logs from `next_step` on (None: a fresh start, every row is stale): rows already logged at
        steps >= next_step belong to work an interruption discarded. They move from metrics.jsonl to
        metrics.discarded.jsonl (nothing is lost; each step keeps one row), and TensorBoard hides its events from
        the first of those steps (purge_step). Returns how many rows moved."""
        if not self.active:
            return 0
        self._jsonl.close()
        kept, moved, first = [], [], None
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    step = json.loads(line)["step"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn line
                stale = next_step is None or step >= next_step
                (moved if stale else kept).append(line)
                if stale:
                    first = step if first is None else min(first, step)
        if moved:
            with open(self.run_dir / "metrics.discarded.jsonl", "a", encoding="utf-8") as f:
                f.writelines(moved)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, self.path)
        self._jsonl = open(self.path, "a", buffering=1)
        if moved and self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=first)
        return len(moved)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        row = {"step": step}
        for k, v in metrics.items():
            s = _scalar(v)
            if s is not None:
                row[k] = s
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({**numeric, "trainer/step": step})

    def close(self) -> None:
        if not self.active:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """One JSON object a line (UTF-8), written whole or not at all: a temporary file of this writer's own renamed
    into place, removed when writing fails; returns path. U+2028 / U+2029 (in model output) are escaped: Python's
    str.splitlines() and JavaScript end lines there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False).replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
                        + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a torn last line (crash mid-write) is ignored."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
