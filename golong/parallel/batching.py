"""Splitting a global batch of sequences over data-parallel ranks and into micro-batches.

Every rank holds the whole (gathered) rollout batch and runs these deterministic functions, so
every rank knows every other rank's plan without communicating. FSDP needs all ranks to run the
same number of forward/backward passes; `plan_micro_batches` pads the short ranks with empty
(all-masked) micro-batches.
"""

from __future__ import annotations

from collections.abc import Sequence


def balance(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of `lengths` split into `parts` groups of near-equal total length: longest first,
    each to the currently lightest part (ties: lowest part). Groups keep their indices sorted."""
    load = [0] * parts
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        p = min(range(parts), key=lambda p: (load[p], p))
        out[p].append(i)
        load[p] += lengths[i]
    return [sorted(o) for o in out]


def rollout_share(weights: Sequence[float], rank: int, world: int) -> range:
    """The requests (prompt-major: a prompt's n samples adjacent) rank `rank` generates: a contiguous block, cut
    where the running total of `weights` (each request's cost, e.g. the context its decoding reads: prompt +
    response tokens) passes rank / world of the whole, a request going where its midpoint falls. Every rank gets
    ~1/world of the work (within one request's weight; equal weights: counts within one), and a prompt's samples
    stay on one engine but where a cut falls among them, so the prefix cache prefills each long prompt once, not
    once per rank as a round-robin deal did (each of n samples on another rank)."""
    total = float(sum(weights))
    if total <= 0:
        return range(rank * len(weights) // world, (rank + 1) * len(weights) // world)
    start = stop = None
    run = 0.0
    for j, w in enumerate(weights):
        owner = min(world - 1, int((run + w / 2) * world / total))
        run += w
        if owner == rank and start is None:
            start = j
        if owner > rank:
            stop = j
            break
    if start is None:
        return range(0)
    return range(start, len(weights) if stop is None else stop)


def pack(indices: Sequence[int], lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """First-fit decreasing: indices into micro-batches of total length <= token_budget (a longer
    sequence gets a micro-batch of its own). Deterministic."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        for b in range(len(bins)):
            if lengths[i] <= room[b]:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(token_budget - lengths[i])
    return [sorted(b) for b in bins]


def plan_all_micro_batches(lengths: Sequence[int], dp_size: int, token_budget: int) -> list[list[list[int]]]:
    """Every dp rank's micro-batches (lists of sequence indices), each padded with empty lists so every
    rank has the same count (an empty micro-batch runs a masked dummy forward/backward)."""
    per_rank = [pack(idx, lengths, token_budget) for idx in balance(lengths, dp_size)]
    count = max(1, max(len(m) for m in per_rank))
    return [m + [[] for _ in range(count - len(m))] for m in per_rank]


def plan_micro_batches(lengths: Sequence[int], dp_size: int, dp_rank: int, token_budget: int
                       ) -> list[list[int]]:
    """This dp rank's micro-batches (plan_all_micro_batches')."""
    return plan_all_micro_batches(lengths, dp_size, token_budget)[dp_rank]
