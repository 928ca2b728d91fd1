"""A process pool that scores (metric, answer region, gold) jobs with a hard per-item time limit.

Workers are plain `python -m golong.rewards.worker` subprocesses talking length-prefixed pickle
frames over their stdin/stdout pipes: no fork of a (possibly CUDA / multi-threaded) trainer, no
re-import of the caller's __main__, and they work from daemonic processes too. The parent sends a
chunk of jobs to an idle worker; the worker answers job by job, so the parent always knows which job
is running and since when. A job running past `timeout` scores 0: its worker is killed (the only
reliable way to stop math-verify / sympy stuck in C code) and replaced, and the rest of its chunk
goes back to the queue. Each worker may also allocate at most `memory_mb` beyond its start-up
footprint (RLIMIT_DATA): a response such as 2^{2^{40}} makes sympy grow without bound, and eight
workers doing so at once would take the node's memory from the trainer; over the limit the job
raises MemoryError (or the worker dies) and scores 0.
"""

from __future__ import annotations

import atexit
import math
import os
import pickle
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from golong.rewards.function import JOB, FunctionReport, RewardFunctionError

_HEADER = struct.Struct("<Q")
STARTUP_TIMEOUT_S = 120.0  # a worker's interpreter start + imports; generous for loaded CI machines
MAX_CHUNK = 64
_STARTUP_EXIT = "a reward worker exited during start-up; see its stderr above (python -m golong.rewards.worker)"
DEFAULT_MEMORY_MB = 2048  # per worker, beyond start-up; a real math-verify or ROUGE-L job takes < 100 MB

Job = tuple[str, str, Any]  # (metric, answer region, gold); metric JOB: the user's reward function


def write_frame(f: Any, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(_HEADER.pack(len(data)))
    f.write(data)
    f.flush()


def _read_exact(fd: int, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = os.read(fd, n - got)
        if not b:
            raise EOFError("worker pipe closed")
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def read_frame(fd: int) -> Any:
    (n,) = _HEADER.unpack(_read_exact(fd, _HEADER.size))
    return pickle.loads(_read_exact(fd, n))


@dataclass
class _Worker:
    proc: subprocess.Popen
    ready: bool = False
    started: float = field(default_factory=time.monotonic)
    queue: deque = field(default_factory=deque)  # job indices sent and not yet answered, in order
    took: bool = False  # it has read the chunk it was sent last ("took"): its first unanswered job is running
    deadline: float = float("inf")

    @property
    def fd(self) -> int:
        return self.proc.stdout.fileno()  # type: ignore[union-attr]


def _spawn(memory_mb: int, function: str = "", kwarg_names: tuple[str, ...] = ()) -> _Worker:
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the golong package
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["OMP_NUM_THREADS"] = "1"
    env["GOLONG_REWARD_PARENT"] = str(os.getpid())  # the worker exits with us (see worker._exit_with_parent)
    env["GOLONG_REWARD_MEMORY_MB"] = str(memory_mb)
    env["GOLONG_REWARD_FUNCTION"] = function  # the user's reward function, imported by the worker ("": none)
    env["GOLONG_REWARD_KWARGS"] = ",".join(kwarg_names)  # the keyword arguments it must take beside verl's
    # its own process group: a job killed at its time limit takes whatever it started (a subprocess, a sandbox)
    # with it (_kill)
    proc = subprocess.Popen([sys.executable, "-m", "golong.rewards.worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env, close_fds=True, start_new_session=True)
    return _Worker(proc)


def _exit_code(w: _Worker) -> int | None:
    """The exit status of a worker whose pipe closed (it is exiting: a moment to reap it)."""
    try:
        return w.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return None


def _kill(w: _Worker) -> None:
    """Kill a worker and every process of its group (what its jobs started), then reap it."""
    try:
        os.killpg(w.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass
    try:
        w.proc.kill()
        w.proc.wait(timeout=10)
    except Exception:
        pass
    for f in (w.proc.stdin, w.proc.stdout):
        try:
            f.close()  # type: ignore[union-attr]
        except Exception:
            pass


def check_memory(memory_mb: int) -> None:
    """A memory limit must be a whole number of MiB > 0."""
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb <= 0:
        raise ValueError(f"reward worker memory limit must be a whole number of MiB > 0, got {memory_mb!r}")


def check_timeout(timeout: float) -> None:
    """A time limit must be a finite number of seconds > 0 (a NaN deadline would never pass)."""
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"reward timeout must be a finite number of seconds > 0, got {timeout!r}")


class ScoringPool:
    """`num_workers` scoring subprocesses of at most `memory_mb` each, started lazily and kept for reuse;
    with `function` ("file.py:name"), each worker imports that reward function at start-up."""

    def __init__(self, num_workers: int, memory_mb: int = DEFAULT_MEMORY_MB, function: str = "",
                 kwarg_names: tuple[str, ...] = ()) -> None:
        check_memory(memory_mb)
        self.num_workers = max(1, int(num_workers))
        self.memory_mb = memory_mb
        self.function = function
        self.kwarg_names = kwarg_names
        self.workers: list[_Worker] = []
        self.timeouts = 0  # jobs that ran out of time, over the pool's life
        self.restarts = 0
        self._lock = threading.Lock()

    def _ensure(self) -> None:
        self.workers = [w for w in self.workers if w.proc.poll() is None]
        while len(self.workers) < self.num_workers:
            self.workers.append(_spawn(self.memory_mb, self.function, self.kwarg_names))

    def close(self) -> None:
        for w in self.workers:
            try:
                write_frame(w.proc.stdin, None)
            except Exception:
                pass
            _kill(w)
        self.workers = []

    def start(self) -> None:
        """Start the workers and wait until each is ready: RuntimeError (naming the reward function and its
        traceback) where one fails to, so that a broken function is found before any response is generated."""
        with self._lock:
            self._ensure()
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            sel = selectors.DefaultSelector()  # not select.select: it refuses descriptors >= 1024
            try:
                for w in self.workers:
                    if w.ready:
                        continue
                    sel.register(w.fd, selectors.EVENT_READ)
                    ready = sel.select(timeout=max(0.0, deadline - time.monotonic()))
                    sel.unregister(w.fd)
                    if not ready:
                        raise RuntimeError(self._startup_timeout())
                    try:
                        msg = read_frame(w.fd)
                    except (EOFError, OSError, pickle.UnpicklingError):
                        raise RuntimeError(_STARTUP_EXIT) from None
                    if msg != "ready":
                        raise self._load_failure(msg[1])
                    w.ready = True
            except BaseException:
                self.close()
                raise
            finally:
                sel.close()

    def _startup_timeout(self) -> str:
        what = f" (importing the reward function {self.function}: its module-level set-up counts)" if self.function \
            else ""
        return f"reward worker did not start within {STARTUP_TIMEOUT_S:.0f} s{what}"

    def _load_failure(self, tb: str) -> RewardFunctionError:
        return RewardFunctionError(f"the reward function {self.function} failed to load in a scoring worker:\n{tb}")

    def map(self, jobs: list[Job], timeout: float, report: FunctionReport | None = None) -> list[float]:
        """Scores of `jobs` in order; a job over `timeout` seconds (or whose worker died) scores 0. A reward-function
        job that raised, ran out of time or lost its worker scores 0 too; where `report` is given, such failures go
        to report.errors (job index, what happened), a metric job's timeouts and lost workers to report.lost, and
        what else dict results held to report.extras[job index]."""
        check_timeout(timeout)
        with self._lock:
            return self._map(jobs, float(timeout), FunctionReport() if report is None else report)

    def _map(self, jobs: list[Job], timeout: float, report: FunctionReport) -> list[float]:
        errors = report.errors
        results = [0.0] * len(jobs)
        if not jobs:
            return results
        self._ensure()
        pending = deque(range(len(jobs)))
        chunk = max(1, min(MAX_CHUNK, -(-len(jobs) // (4 * self.num_workers))))
        sel = selectors.DefaultSelector()
        for w in self.workers:
            sel.register(w.fd, selectors.EVENT_READ, w)
        outstanding = len(jobs)
        unread: Counter[int] = Counter()  # job -> deaths of workers sent it at the head of a chunk they did not read

        def assign(w: _Worker) -> None:
            if not pending or not w.ready:
                return
            idx = [pending.popleft() for _ in range(min(chunk, len(pending)))]
            w.queue.extend(idx)
            w.took = False
            w.deadline = time.monotonic() + timeout
            try:
                write_frame(w.proc.stdin, [(i, *jobs[i]) for i in idx])
            except OSError:  # it died since its last answer: its chunk goes back to the queue
                replace(w)

        def replace(w: _Worker) -> _Worker:
            sel.unregister(w.fd)
            _kill(w)
            pending.extendleft(reversed(w.queue))
            nw = _spawn(self.memory_mb, self.function, self.kwarg_names)
            self.workers[self.workers.index(w)] = nw
            sel.register(nw.fd, selectors.EVENT_READ, nw)
            self.restarts += 1
            for idle in self.workers:  # its chunk went back to the queue: idle workers take it (not the new one,
                if not idle.queue:     # which starts for a second or more)
                    assign(idle)
            return nw

        for w in self.workers:
            assign(w)
        try:
            while outstanding > 0:
                now = time.monotonic()
                horizon = min(w.deadline if w.ready else w.started + STARTUP_TIMEOUT_S for w in self.workers)
                events = sel.select(timeout=None if horizon == float("inf") else max(0.0, horizon - now))
                for key, _ in events:
                    w = key.data
                    try:
                        msg = read_frame(w.fd)
                    except (EOFError, OSError, pickle.UnpicklingError):
                        if not w.ready:  # broken environment, not a bad job: do not respawn forever
                            raise RuntimeError(_STARTUP_EXIT) from None
                        # the worker died (OOM kill, crash): its running job scores 0. One that died before it read
                        # its chunk (between two batches) ran none of it: the chunk goes back whole, up to twice
                        head = w.queue[0] if w.queue else None
                        if head is not None and not w.took and unread[head] < 2:
                            unread[head] += 1
                        elif head is not None:
                            lost = w.queue.popleft()
                            outstanding -= 1
                            died = f"the scoring worker died (exit code {_exit_code(w)})"
                            if jobs[lost][0] == JOB:
                                errors.append((lost, f"{died} while the reward function ran"))
                            else:
                                report.lost.append((lost, f"{died} while scoring metric {jobs[lost][0]}"))
                        assign(replace(w))
                        continue
                    if msg == "ready":
                        w.ready = True
                        assign(w)
                        continue
                    if msg == "took":
                        w.took = True
                        continue
                    if msg == "exiting":  # it hit its memory cap in the reward function: its other jobs go back
                        assign(replace(w))
                        continue
                    if msg[0] == "failed":  # the reward function did not import: the same in every worker
                        raise self._load_failure(msg[1])
                    i, s = msg[:2]
                    results[i] = s
                    if len(msg) >= 3 and msg[2] is not None:
                        errors.append((i, msg[2]))
                    if len(msg) == 4 and msg[3]:
                        report.extras[i] = msg[3]
                    w.queue.popleft()
                    outstanding -= 1
                    w.deadline = time.monotonic() + timeout
                    if not w.queue:
                        w.deadline = float("inf")
                        assign(w)
                now = time.monotonic()
                for w in list(self.workers):
                    if w.ready and w.queue and now >= w.deadline:
                        late = w.queue.popleft()  # the running job: out of time, scores 0
                        outstanding -= 1
                        if jobs[late][0] == JOB:
                            errors.append((late, f"the reward function ran past the {timeout:g} s time limit "
                                                 "(rollout.reward_timeout_s)"))
                        else:
                            report.lost.append((late, f"metric {jobs[late][0]} ran past the {timeout:g} s time "
                                                      "limit (rollout.reward_timeout_s)"))
                        self.timeouts += 1
                        replace(w)
                    elif not w.ready and now >= w.started + STARTUP_TIMEOUT_S:
                        raise RuntimeError(self._startup_timeout())
        except BaseException:
            # interrupted or broken mid-flight: workers may hold half-sent frames; start clean next time
            self.close()
            raise
        finally:
            sel.close()
        return results


_POOLS: dict[tuple[int, int, str, tuple[str, ...]], ScoringPool] = {}
_POOLS_LOCK = threading.Lock()


def get_pool(num_workers: int, memory_mb: int = DEFAULT_MEMORY_MB, function: str = "",
             kwarg_names: tuple[str, ...] = ()) -> ScoringPool:
    """The process-wide pool of `num_workers` workers of `memory_mb` running `function` ("" for golong's own
    metrics only; checked to take `kwarg_names` too), created on first use, closed at exit."""
    with _POOLS_LOCK:
        key = (num_workers, memory_mb, function, tuple(kwarg_names))
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = ScoringPool(num_workers, memory_mb, function, tuple(kwarg_names))
        return pool


@atexit.register
def close_pools() -> None:
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.close()
        _POOLS.clear()
