"""Run a test body on N gloo ranks (CPU) and surface any rank's failure with its traceback."""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a rendezvous port for spawned ranks or torchrun)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, errq: Any,
            give_up_at: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch

    torch.set_num_threads(1)
    try:
        # a collective a peer never joins raises (with its traceback) by give_up_at, before run_distributed's
        # deadline, rather than after gloo's default 30 minutes
        wait = timedelta(seconds=max(1.0, give_up_at - time.time()))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=wait)
        fn(rank, world, *args)
        dist.barrier()  # no rank tears its connections down while a peer still uses them
    except BaseException:
        errq.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # The body passed. Leave without the interpreter's teardown: gloo's worker threads can abort it
    # ("terminate called without an active exception", exit -6) after everything checked has passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0) -> None:
    """Call fn(rank, world_size, *args) on `world_size` spawned gloo ranks.

    fn must be importable at module level (spawn pickles it by name). Raises AssertionError
    carrying the traceback of every rank that failed.
    """
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    port = free_port()
    give_up_at = time.time() + 0.8 * timeout
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, errq, give_up_at), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout  # one for all ranks (a join each waited up to world_size x timeout)
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = []
    while not errq.empty():
        errors.append(errq.get())
    if errors:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors))
        # a rank that died without a traceback (a signal, an abort) leaves its peers' "connection closed" errors:
        # name it and how it ended
        silent = [(i, "still running" if i in hung else p.exitcode) for i, p in enumerate(procs)
                  if i not in {r for r, _ in errors} and p.exitcode != 0]
        died = f" (and ranks died without a traceback, with exit codes: {silent})" if silent else ""
        raise AssertionError(f"{len(errors)} rank(s) failed{died}:\n{msg}")
    if hung:
        raise AssertionError(f"ranks {hung} did not finish within {timeout}s")
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks exited non-zero: {bad}")
