"""Routing replay (R3, `rollout.router_replay`): the experts the rollout engine routed each token to, moved from the
rank that generated a response to the ranks that train on it.

With each response it generates, a rank's engine returns the experts of every token it read, [P + R - 1, layers,
top_k] (the prompt's tokens, then the response's but its last). A rank keeps its own in a `RoutingStore`: the prompt's
rows once per prompt, each response's rows apart. Once the step's batch is known and planned, `exchange` sends, in one
all-to-all, each response's rows and each prompt's rows once to the ranks of the dp group whose micro-batches hold it
(every cp rank of that group: each shards the rows as it shards the tokens), where they become the rollout's
`prompt_experts` / `response_experts`. A rank holds the records of its own generation share and of its dp group's
training share, never the whole step's: at the recipe's lengths (160K-token prompts, 16K-token responses, 48 layers
x top-8) a response's record is ~65 MB.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class RoutingStore:
    """This rank's records of the step's generated responses, by (generation batch, prompt) and (generation batch,
    request); uint8 / int16 [rows, layers, top_k]."""

    prompts: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    responses: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def add(self, batch: int, prompt: int, request: int, rows: np.ndarray, prompt_len: int, response_len: int
            ) -> None:
        """One response's record: its prompt's rows (kept once per prompt) and its own."""
        if rows is None or len(rows) != prompt_len + response_len - 1:
            raise RuntimeError(f"the rollout engine returned {None if rows is None else len(rows)} rows of routed "
                               f"experts for a {prompt_len}-token prompt and a {response_len}-token response: want "
                               f"{prompt_len + response_len - 1} (rollout.router_replay)")
        self.prompts.setdefault((batch, prompt), rows[:prompt_len])
        self.responses[(batch, request)] = rows[prompt_len:]

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


def exchange(rollouts: Sequence[Any], owners: Sequence[int], store: RoutingStore, rank: int, world: int, cp: int,
             shape: tuple[int, int], dtype: np.dtype, device: torch.device) -> int:
    """Give every rollout its routing record on the ranks that train on it (a collective: every rank calls it with the
    same rollouts and owners). owners[i]: the dp rank whose micro-batches hold rollout i (-1: none); rank = dp_rank *
    cp + cp_rank. shape: (layers, top_k) of a record row. Rollouts of other dp groups get None. Returns the bytes
    this rank received."""
    if any(not -1 <= d < world // cp for d in owners):
        raise ValueError(f"owners must be dp ranks in [0, {world // cp}) or -1, got {sorted(set(owners))}")
    dtype = np.dtype(dtype)
    row_bytes = int(np.prod(shape)) * dtype.itemsize

    def rows(kind: str, i: int) -> int:
        r = rollouts[i]
        return len(r.prompt_ids) if kind == "prompt" else max(len(r.response_ids) - 1, 0)

    items = _items(rollouts, owners, cp)
    send: list[list[np.ndarray]] = [[] for _ in range(world)]
    recv_sizes = [0] * world
    incoming: list[tuple[int, str, Any, int]] = []
    for src, dst, kind, key, i in items:
        if src == rank:
            held = (store.prompts if kind == "prompt" else store.responses).get(key)
            if held is None or len(held) != rows(kind, i):
                raise RuntimeError(f"routing replay: rank {rank} holds no {kind} record {key} of the length rollout "
                                   f"{i} needs ({rows(kind, i)} rows)")
            send[dst].append(np.ascontiguousarray(held, dtype=dtype).reshape(-1).view(np.uint8))
        if dst == rank:
            recv_sizes[src] += rows(kind, i) * row_bytes
            incoming.append((src, kind, key, i))
    send_sizes = [sum(a.nbytes for a in parts) for parts in send]
    flat = np.concatenate([a for parts in send for a in parts]) if any(send_sizes) else np.zeros(0, np.uint8)
    if world > 1:
        out = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=device)
        dist.all_to_all_single(out, torch.from_numpy(flat).to(device), recv_sizes, send_sizes)
        received = out.cpu().numpy()
    else:
        received = flat
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
