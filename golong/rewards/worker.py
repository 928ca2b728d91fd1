"""Scoring subprocess: `python -m golong.rewards.worker` (started by golong.rewards.pool).

Reads frames of [(index, metric, region, gold), ...] from stdin, writes "took" once it has read one, then one
(index, score) frame per job to the original stdout ((index, 0.0, traceback) where the user's reward function
raised, (index, score, None, extras) where its dict result held more than the score; after a MemoryError in it,
"exiting", and the worker ends: the pool starts another for the rest of its jobs); anything the metric libraries
print goes to stderr instead. A None frame (or a closed stdin) ends it. With
GOLONG_REWARD_FUNCTION set, the worker imports that function at start-up (a failure is reported as a
("failed", traceback) frame instead of "ready") and runs it for jobs of kind `function.JOB`, whose gold
is (data_source, ground_truth, extra_info, require_think, reward_kwargs).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback


def _exit_with_parent() -> None:
    """Die with the process that started us. A job stuck in C code (sympy) never reads the closed pipe, and
    a trainer stopped by SIGTERM / SIGKILL (torchrun, Slurm) runs no atexit hook: on Linux the kernel sends
    SIGKILL to this worker when its parent exits."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
        except (OSError, AttributeError):
            pass
    parent = int(os.environ.get("GOLONG_REWARD_PARENT", "0"))
    if parent and os.getppid() != parent:  # the parent was gone before prctl took effect
        os._exit(0)


def _limit_memory(extra_mb: int) -> None:
    """Cap this process's data segment (heap and private mappings, RLIMIT_DATA) at its current size plus
    `extra_mb` MiB, so that an allocation past it fails (MemoryError) instead of taking the node's memory."""
    if not sys.platform.startswith("linux") or extra_mb <= 0:
        return
    import resource

    with open("/proc/self/status") as f:
        vm_data = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = vm_data + (extra_mb << 20)
    resource.setrlimit(resource.RLIMIT_DATA, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def main() -> None:
    _exit_with_parent()
    # Ctrl-C is the parent's to handle; so are the stop signals a scheduler sends to every process of a job
    # (Slurm): the trainer finishes its step, which needs these scores, then checkpoints. We die with it.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints must not corrupt the frame stream
    in_fd = sys.stdin.fileno()

    from golong.rewards import function
    from golong.rewards.metrics import score_region
    from golong.rewards.pool import read_frame, write_frame

    try:  # warm the slow imports now, not inside a timed job
        import math_verify  # noqa: F401
    except Exception:
        pass
    try:
        import jieba  # Chinese ROUGE-L tokenisation: its dictionary takes ~1 s to load

        jieba.setLogLevel(60)
        jieba.initialize()
    except Exception:
        pass
    user_fn = None
    if spec := os.environ.get("GOLONG_REWARD_FUNCTION"):
        try:  # the user's module-level work (imports, loading a model of their own) is start-up too
            names = tuple(filter(None, os.environ.get("GOLONG_REWARD_KWARGS", "").split(",")))
            user_fn = function.load_function(spec, names)
        except BaseException:
            write_frame(out, ("failed", traceback.format_exc()))
            return
    _limit_memory(int(os.environ.get("GOLONG_REWARD_MEMORY_MB", "0")))  # after the imports: their memory is start-up
    write_frame(out, "ready")
    while True:
        try:
            batch = read_frame(in_fd)
        except EOFError:
            return
        if batch is None:
            return
        write_frame(out, "took")  # a worker that dies from here on dies running this chunk's first unanswered job
        for i, metric, region, gold in batch:
            if metric != function.JOB:
                write_frame(out, (i, score_region(metric, region, gold)))
                continue
            data_source, ground_truth, extra_info, require_think, kwargs = gold
            function.set_require_think(require_think)
            try:
                score, extras = function.call_function(user_fn, data_source, region, ground_truth, extra_info, kwargs)
            except MemoryError:  # at the memory cap, where whatever the function keeps would fail its later calls too:
                write_frame(out, (i, 0.0, traceback.format_exc(limit=-8) + "(the scoring worker reached "
                                  "rollout.reward_memory_mb; a fresh one takes the next calls)"))
                write_frame(out, "exiting")
                return
            except BaseException:  # the user's code (sys.exit too): the score is 0, the trainer reports the traceback
                write_frame(out, (i, 0.0, traceback.format_exc(limit=-8)))
            else:
                write_frame(out, (i, score, None, extras) if extras else (i, score))


if __name__ == "__main__":
    main()
