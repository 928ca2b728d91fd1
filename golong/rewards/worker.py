"""Scoring subprocess: `python -m golong.rewards.worker` (started by golong.rewards.pool).

Reads frames of [(index, metric, region, gold), ...] from stdin, writes one (index, score) frame per
job to the original stdout; anything the metric libraries print goes to stderr instead. A None
frame (or a closed stdin) ends it.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints must not corrupt the frame stream
    in_fd = sys.stdin.fileno()

    from golong.rewards.metrics import score_region
    from golong.rewards.pool import read_frame, write_frame

    try:  # warm the slow import now, not inside a timed job
        import math_verify  # noqa: F401
    except Exception:
        pass
    write_frame(out, "ready")
    while True:
        try:
            batch = read_frame(in_fd)
        except EOFError:
            return
        if batch is None:
            return
        for i, metric, region, gold in batch:
            write_frame(out, (i, score_region(metric, region, gold)))


if __name__ == "__main__":
    main()
