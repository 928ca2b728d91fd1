"""Shared plumbing for bench/ scripts: timing, peak memory, JSON results and the closing table.

Every bench script measures its baseline in the same run and reports ratios, because these
machines are noisy. Results are JSON files in bench/results/ that bench/report.py turns into
the table in bench/README.md.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({cpu}, {torch.get_num_threads()} threads)"


def git_commit(cwd: str | Path | None = None) -> str:
    """Short HEAD, with "-dirty" when tracked files outside bench/results differ from it (the code measured is not
    that commit); $GOLONG_COMMIT where the tree travelled without .git (the GPU machine)."""
    if os.environ.get("GOLONG_COMMIT"):
        return os.environ["GOLONG_COMMIT"]
    cwd = cwd or Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=cwd,
                              check=True).stdout.strip()
        # bench/results: the results files a run writes as it goes must not mark its own later rows dirty
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                  ":(top,exclude)bench/results"], capture_output=True, text=True, cwd=cwd,
                                 check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if changed else head


def timeit(fn: Callable[[], Any], *, warmup: int = 1, iters: int = 3) -> float:
    """Median wall seconds of fn() (synchronising CUDA when present)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def release_freed_heap() -> None:
    """Hand the heap pages glibc keeps after free() back to the OS (malloc_trim), so RSS is live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def peak_extra_memory(fn: Callable[[], Any], interval: float = 0.002) -> tuple[int, Any]:
    """Peak memory (bytes) fn() allocates above what was live when it started, and its result.

    CUDA: torch.cuda.max_memory_allocated. CPU: resident-set sampling in a thread (the CPU
    allocator has no peak counter); large allocations are touched, so RSS sees them. The freed heap
    is trimmed first: pages an earlier call freed but glibc kept are already resident, and fn()
    reusing them would raise no RSS (its peak would read low, down to 0).
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, out
    release_freed_heap()
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        stop.set()
        t.join()
    peak[0] = max(peak[0], _rss_bytes())
    return peak[0] - base, out


def held_extra_memory(build: Callable[[], Any]) -> tuple[int, Any]:
    """Memory (bytes) the result of build() holds once built, and that result: RSS growth, the freed heap handed
    back before and after (peak_extra_memory measures the high-water mark instead)."""
    release_freed_heap()
    base = _rss_bytes()
    out = build()
    release_freed_heap()
    return _rss_bytes() - base, out


def save_results(bench: str, rows: list[dict[str, Any]], out_dir: str | Path | None = None) -> Path:
    """Write rows (one dict per measured figure) with date, device, commit and command.

    Each row should carry at least: case, impl, metric, value, unit; and, where a peer was
    measured in the same run, baseline (peer impl name) and ratio (ours / peer or peer / ours,
    stated by `ratio_meaning`).
    """
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = "gpu" if torch.cuda.is_available() else "cpu"
    now = _dt.datetime.now(_dt.timezone.utc)
    payload = {
        "bench": bench,
        "date": now.strftime("%Y-%m-%d"),
        "device": device_name(),
        "commit": git_commit(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "torch": torch.__version__,
        "rows": rows,
    }
    if torch.cuda.is_available():  # the per-GPU settings the kernels ran with (kernels/tuned.py)
        from kernels import tuned

        payload["tuned"] = tuned.in_use(device_name())
    path = out_dir / f"{bench}-{dev}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)
    return path


def save_tuned(module: str, values: dict[str, Any], directory: str | Path, **measured: Any) -> Path:
    """Record a sweep's winner for this GPU as kernels/tuned.py reads it (directory/<GPU name>.json), with the
    date, commit, torch / Triton versions and the given measurements."""
    import triton

    from kernels import tuned

    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"), "commit": git_commit(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "torch": torch.__version__,
            "triton": triton.__version__, **measured}
    path = tuned.save(module, values, meta, device_name(), directory)
    print(f"tuned {module} for {device_name()}: {values or 'built-in defaults'} -> {path}", flush=True)
    return path


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """Print rows as a table (rich), the last thing a bench script shows."""
    from rich.console import Console
    from rich.table import Table

    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[_fmt(r.get(c, "")) for c in columns])
    Console(width=200).print(table)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
