"""Routing replay (R3, `rollout.router_replay`): the experts the rollout engine routed each token to, moved from the
rank that generated a response to the ranks that train on it.

With each response it generates, a rank's engine returns the experts of every token it read, [P + R - 1, layers,
top_k] (the prompt's tokens, then the response's but its last). A rank keeps its own in a `RoutingStore`: the prompt's
rows once per prompt, each response's rows apart. Once the step's batch is known and planned, `exchange` sends, by an
all-to-all in rounds of ROUND_BYTES, each response's rows and each prompt's rows once to the ranks of the dp group
whose micro-batches hold it
(every cp rank of that group: each shards the rows as it shards the tokens), where they become the rollout's
`prompt_experts` / `response_experts`. A rank holds the records of its own generation share and of its dp group's
training share, never the whole step's: at the recipe's lengths (160K-token prompts, 16K-token responses, 48 layers
x top-8) a prompt's rows take 63 MB, kept once, and a response's 6 MB. A prompt's rows are those of the rank that
generated its first kept response: where its responses were generated on two ranks, the second engine's routing of
the prompt (the same prefill, up to rounding near a tie) is not the one replayed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from golong.parallel import all_gather_objects


def record_dtype(num_experts: int) -> type[np.integer]:
    """The dtype of a routing record: uint8 up to 256 experts, int16 beyond."""
    return np.uint8 if num_experts <= 256 else np.int16


@dataclass
class RoutingStore:
    """This rank's records of the step's generated responses, by (generation batch, prompt) and (generation batch,
    request); [rows, layers, top_k] of record_dtype(num_experts) (`shape`: (layers, top_k))."""

    shape: tuple[int, int]
    num_experts: int
    prompts: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    responses: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    @property
    def dtype(self) -> type[np.integer]:
        return record_dtype(self.num_experts)

    def add(self, batch: int, prompt: int, request: int, rows: np.ndarray | None, prompt_len: int, response_len: int
            ) -> None:
        """One response's record: its prompt's rows (kept once per prompt) and its own, as copies in the store's dtype
        (a view would keep the engine's whole [P + R - 1] array alive per response). A record of another shape, or
        with an expert outside [0, num_experts), raises (on the host: a device-side assert would stop one rank)."""
        if response_len < 1:
            raise RuntimeError("the rollout engine returned an empty response: a routing record needs one token "
                               "(rollout.router_replay)")
        want = (prompt_len + response_len - 1, *self.shape)
        got = None if rows is None else tuple(np.shape(rows))
        if got != want:
            raise RuntimeError(f"the rollout engine returned routed experts of shape {got} for a {prompt_len}-token "
                               f"prompt and a {response_len}-token response: want {want} (prompt + response - 1 "
                               "tokens x layers x top_k; rollout.router_replay)")
        rows = np.asarray(rows)
        if rows.size and not (0 <= rows.min() and rows.max() < self.num_experts):
            raise RuntimeError(f"the rollout engine returned routed experts in [{rows.min()}, {rows.max()}]: want "
                               f"[0, {self.num_experts}) (rollout.router_replay)")
        if (batch, prompt) not in self.prompts:
            self.prompts[(batch, prompt)] = rows[:prompt_len].astype(self.dtype)
        self.responses[(batch, request)] = rows[prompt_len:].astype(self.dtype)

    def keep(self, keys: Iterable[RouteKey]) -> None:
        """Drop every record but those of these rollouts (the ones dynamic sampling kept)."""
        keys = list(keys)
        prompts, responses = {(k.batch, k.prompt) for k in keys}, {(k.batch, k.request) for k in keys}
        self.prompts = {k: v for k, v in self.prompts.items() if k in prompts}
        self.responses = {k: v for k, v in self.responses.items() if k in responses}

    def clear(self) -> None:
        self.prompts.clear()
        self.responses.clear()


@dataclass(frozen=True)
class RouteKey:
    """Where a rollout's record lives: the rank that generated it, its generation batch, prompt and request there."""

    origin: int
    batch: int
    prompt: int
    request: int


def _items(rollouts: Sequence[Any], owners: Sequence[int], cp: int) -> list[tuple[int, int, str, Any, int]]:
    """Every transfer of the exchange, in the one order all ranks agree on: (source rank, destination rank, kind
    "prompt" / "response", key, rollout index). A prompt's rows go once to each rank of a dp group that trains one of
    its responses, from the rank that generated the first of them; a response's from its own generating rank."""
    first_origin: dict[tuple[int, int], int] = {}
    for r in rollouts:
        k = r.route_key
        first_origin.setdefault((k.batch, k.prompt), k.origin)
    items, sent = [], set()
    for i, (r, dp_rank) in enumerate(zip(rollouts, owners)):
        if dp_rank < 0:
            continue
        k = r.route_key
        for dst in range(dp_rank * cp, (dp_rank + 1) * cp):
            if (dst, k.batch, k.prompt) not in sent:
                sent.add((dst, k.batch, k.prompt))
                items.append((first_origin[(k.batch, k.prompt)], dst, "prompt", (k.batch, k.prompt), i))
            items.append((k.origin, dst, "response", (k.batch, k.request), i))
    return items


# bytes each rank sends in one round of the exchange (split evenly over the destinations): on NCCL the round's send and
# receive buffers live on the GPU
ROUND_BYTES = 512 << 20


def exchange(rollouts: Sequence[Any], owners: Sequence[int], store: RoutingStore, rank: int, world: int, cp: int,
             device: torch.device) -> int:
    """Give every rollout its routing record on the ranks that train on it (a collective: every rank calls it with the
    same rollouts and owners). owners[i]: the dp rank whose micro-batches hold rollout i (-1: none); rank = dp_rank *
    cp + cp_rank. Rollouts of other dp groups get None. A record some rank lacks stops every rank, naming it.
    Returns the bytes this rank received."""
    if any(not -1 <= d < world // cp for d in owners):
        raise ValueError(f"owners must be dp ranks in [0, {world // cp}) or -1, got {sorted(set(owners))}")
    shape, dtype = store.shape, np.dtype(store.dtype)
    row_bytes = int(np.prod(shape)) * dtype.itemsize

    def rows(kind: str, i: int) -> int:
        r = rollouts[i]
        return len(r.prompt_ids) if kind == "prompt" else max(len(r.response_ids) - 1, 0)

    items = _items(rollouts, owners, cp)
    send: list[list[np.ndarray]] = [[] for _ in range(world)]
    recv_sizes = [0] * world
    incoming: list[tuple[int, str, Any, int]] = []
    missing = None
    for src, dst, kind, key, i in items:
        if src == rank:
            held = (store.prompts if kind == "prompt" else store.responses).get(key)
            if held is None or held.shape != (rows(kind, i), *shape):
                missing = missing or (f"routing replay: rank {rank} holds no {kind} record {key} of the shape "
                                      f"rollout {i} needs ({rows(kind, i)}, {', '.join(map(str, shape))})")
                continue
            send[dst].append(np.ascontiguousarray(held).reshape(-1).view(np.uint8))
        if dst == rank:
            recv_sizes[src] += rows(kind, i) * row_bytes
            incoming.append((src, kind, key, i))
    # every rank learns of a missing record (a rank raising alone would leave the others waiting)
    if missing := next((m for m in all_gather_objects(missing) if m), None):
        raise RuntimeError(missing)
    if world == 1:
        received = np.concatenate(send[0]) if send[0] else np.zeros(0, np.uint8)
    else:
        received = _all_to_all(send, recv_sizes, world, device)
    offsets = np.concatenate([[0], np.cumsum(recv_sizes)])
    cursor = list(offsets[:-1])
    prompts: dict[tuple[int, int], np.ndarray] = {}
    responses: dict[int, np.ndarray] = {}
    for src, kind, key, i in sorted(incoming, key=lambda x: x[0]):  # stable: each source's items in send order
        n = rows(kind, i) * row_bytes
        block = received[cursor[src]:cursor[src] + n].view(dtype).reshape(-1, *shape)
        cursor[src] += n
        if kind == "prompt":
            prompts[key] = block
        else:
            responses[i] = block
    for i, r in enumerate(rollouts):
        k = r.route_key
        if i in responses:
            r.prompt_experts, r.response_experts = prompts[(k.batch, k.prompt)], responses[i]
        else:
            r.prompt_experts = r.response_experts = None
    return int(sum(recv_sizes))


def _byte_range(parts: list[np.ndarray], lo: int, hi: int) -> list[np.ndarray]:
    """Bytes [lo, hi) of the concatenation of `parts` (1-D uint8), as views of them."""
    out, at = [], 0
    for a in parts:
        a_lo, a_hi = max(lo - at, 0), min(hi - at, a.nbytes)
        if a_hi > a_lo:
            out.append(a[a_lo:a_hi])
        at += a.nbytes
    return out


def _all_to_all(send: list[list[np.ndarray]], recv_sizes: list[int], world: int, device: torch.device
                ) -> np.ndarray:
    """All-to-all of byte payloads (send[d]: this rank's arrays for rank d, in order) in rounds of at most
    ROUND_BYTES // world bytes per destination, so the round buffers stay small (no copy of the whole payload) ->
    what this rank received, source after source."""
    per = max(1, ROUND_BYTES // world)
    send_sizes = [sum(a.nbytes for a in parts) for parts in send]
    recv_at = np.concatenate([[0], np.cumsum(recv_sizes)])
    out = np.empty(int(recv_at[-1]), np.uint8)
    rounds = -(-max(max(send_sizes), max(recv_sizes)) // per)
    # every rank must run the same number of rounds: the largest pair anywhere decides
    count = torch.tensor([rounds], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    for c in range(int(count)):
        lo = c * per
        s = [max(0, min(per, n - lo)) for n in send_sizes]
        r = [max(0, min(per, n - lo)) for n in recv_sizes]
        pieces = [a for d in range(world) for a in _byte_range(send[d], lo, lo + s[d])]
        chunk = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
        got = torch.empty(sum(r), dtype=torch.uint8, device=device)
        dist.all_to_all_single(got, torch.from_numpy(chunk).to(device), r, s)
        got = got.cpu().numpy()
        at = 0
        for src in range(world):
            out[recv_at[src] + lo:recv_at[src] + lo + r[src]] = got[at:at + r[src]]
            at += r[src]
    return out
