"""Sequence-parallel ring attention over zigzag shards of a packed variable-length batch.

Sharding (`zigzag_shard`): every document of length L is cut into 2W chunks at c*L // (2W) (sizes
differ by at most one; empty chunks when L < 2W); rank r keeps chunks r and 2W-1-r of every document,
rows in global order. Under a causal mask each rank then holds an early and a late piece of every
document, so causal work is balanced for any mix of lengths, with no padding.

Ring (`ring_attention`): W steps; at step i rank r holds the K/V block of rank (r - i) mod W. The
send of that block to rank r+1 and the receive of the next one from r-1 are posted with
`batch_isend_irecv` *before* the local block is computed, so communication hides behind compute.
Partial outputs are merged through their log-sum-exp in fp32 (by the forward kernel's epilogue); a block
pair with no visible (query, key) pair is skipped (decided on the host from cu_seqlens, no sync). The local kernel is
`kernels.flash_attention.block_attention_*`, which masks by *global* (document, position) of each
query and key row. Backward: the same ring again, with an fp32 dK/dV accumulator travelling one hop
behind its K/V block; after W hops every accumulator is back on its owner.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from kernels.dtypes import autocast_off
from kernels.flash_attention import (
    Rows,
    _check,
    _resolve,
    _softmax_scale,
    attention_delta,
    block_attention_bwd,
    block_attention_fwd,
    check_cu_seqlens,
    check_prefix_of,
    prefix_rows,
)

# --------------------------------------------------------------------------------------------------
# Zigzag sharding
# --------------------------------------------------------------------------------------------------


def _owners(cu_seqlens: torch.Tensor, world: int) -> tuple[torch.Tensor, Rows]:
    """Owner rank of every global row and the rows' global (doc, pos)."""
    rows = Rows.from_cu_seqlens(cu_seqlens)
    cu = cu_seqlens.to(device=rows.doc.device, dtype=torch.int64)
    length = (cu[1:] - cu[:-1])[rows.doc.long()]
    n = 2 * world
    # chunk c of a length-L document is [c*L//n, (c+1)*L//n); row p lies in chunk (n*(p+1) - 1) // L
    chunk = (n * (rows.pos.long() + 1) - 1) // length
    owner = torch.where(chunk < world, chunk, n - 1 - chunk)
    return owner, rows


@dataclass
class ZigzagPlan:
    """Everything a rank needs about every rank's shard: computed from the global cu_seqlens alone."""

    world: int
    counts: list[int]  # rows held by each rank
    rows: list[Rows]  # each rank's rows: global (doc, pos), in global order
    visible: list[list[bool]] = field(default_factory=list)  # visible[r][s]: r's queries see s's keys
    causal: bool = True
    # with shared prefixes (prefix_of): each rank's rows relabelled by prefix_rows (queries, keys), and
    # visible_prefix[r][s]: r holds rows of a document whose prefix s holds rows of
    prefix: list[tuple[Rows, Rows]] | None = None
    visible_prefix: list[list[bool]] | None = None

    @staticmethod
    def build(cu_seqlens: torch.Tensor, world: int, causal: bool = True, device: Any = None,
              prefix_of: torch.Tensor | None = None) -> ZigzagPlan:
        cu_host = cu_seqlens.cpu()
        check_cu_seqlens(cu_host, None)
        owner, rows = _owners(cu_host, world)
        order = torch.sort(owner, stable=True).indices
        counts = torch.bincount(owner, minlength=world).tolist()
        host, start = [], 0  # each rank's rows
        for c in counts:
            idx = order[start:start + c]
            start += c
            host.append(Rows(rows.doc[idx], rows.pos[idx]))
        per_rank = [Rows(x.doc.to(device), x.pos.to(device)) for x in host]
        # visibility: per document, the first key position of rank s vs the last query position of rank r
        num_docs = cu_seqlens.numel() - 1
        first = torch.full((world, num_docs), 2**62, dtype=torch.int64)
        last = torch.full((world, num_docs), -1, dtype=torch.int64)
        doc, pos = rows.doc.long(), rows.pos.long()
        flat = owner * num_docs + doc
        first.view(-1).scatter_reduce_(0, flat, pos, "amin")
        last.view(-1).scatter_reduce_(0, flat, pos, "amax")
        has = last >= 0
        if causal:
            vis = ((last[:, None, :] >= first[None, :, :]) & has[:, None, :] & has[None, :, :]).any(-1)
        else:
            vis = (has[:, None, :] & has[None, :, :]).any(-1)
        plan = ZigzagPlan(world, counts, per_rank, vis.tolist(), causal)
        if prefix_of is not None:
            parent = prefix_of.cpu().long()
            check_prefix_of(parent, num_docs)
            # has_child[r, a]: rank r holds rows of some document whose prefix is a
            child = parent >= 0
            has_child = torch.zeros(world, num_docs, dtype=torch.long)
            has_child.index_add_(1, parent[child], has[:, child].long())
            plan.visible_prefix = ((has_child[:, None, :] > 0) & has[None, :, :]).any(-1).tolist()
            plan.prefix = [tuple(Rows(x.doc.to(device), x.pos.to(device)) for x in prefix_rows(h, cu_host, parent))
                           for h in host]
        return plan

    def blocks(self, r: int, s: int) -> list[tuple[Rows, Rows, bool]]:
        """The block pairs rank r's queries compute against rank s's keys: (query rows, key rows, causal) for
        the documents' own rows where any is visible, and for their shared prefixes (non-causal) where any."""
        out = [(self.rows[r], self.rows[s], self.causal)] if self.visible[r][s] else []
        if self.prefix is not None and self.visible_prefix[r][s]:
            out.append((self.prefix[r][0], self.prefix[s][1], False))
        return out


_PLANS: dict[tuple, ZigzagPlan] = {}


def _plan(cu_seqlens: torch.Tensor, world: int, causal: bool, device: Any,
          prefix_of: torch.Tensor | None = None) -> ZigzagPlan:
    """ZigzagPlan.build, cached: every layer of a step shares one cu_seqlens (one small D2H copy each, prefix_of
    in the same copy)."""
    given = cu_seqlens if prefix_of is None else torch.cat([cu_seqlens.long(), prefix_of.to(cu_seqlens.device).long()])
    key = (tuple(given.tolist()), cu_seqlens.numel(), prefix_of is not None, world, causal, str(device))
    if key not in _PLANS:
        if len(_PLANS) >= 8:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = ZigzagPlan.build(cu_seqlens, world, causal, device, prefix_of)
    return _PLANS[key]


def zigzag_indices(cu_seqlens: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Global row indices (int64, ascending) that rank `rank` of `world` keeps."""
    owner, _ = _owners(cu_seqlens, world)
    return torch.nonzero(owner == rank).flatten()


def _index(n: Any, name: str) -> int:
    try:
        return operator.index(n)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(n).__name__} {n!r}") from None


def zigzag_shard(x: torch.Tensor, cu_seqlens: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rows of packed x [T, ...] that rank `rank` keeps: chunks r and 2W-1-r of every document.

    Each document of length L is cut into 2*world chunks at c*L // (2*world); any L works (no padding;
    a document shorter than 2*world leaves some chunks empty). Rows stay in global order.
    """
    rank, world = _index(rank, "rank"), _index(world, "world")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of {world}")
    check_cu_seqlens(cu_seqlens.cpu(), x.shape[0])  # host values: the chunking reads them anyway
    return x[zigzag_indices(cu_seqlens.to(x.device), rank, world)]


# --------------------------------------------------------------------------------------------------
# Communication
# --------------------------------------------------------------------------------------------------


@dataclass
class CommStats:
    """Bytes this process sent through ring_attention (for bench/attention.py)."""

    fwd_bytes: int = 0
    bwd_bytes: int = 0

    def reset(self) -> None:
        self.fwd_bytes = self.bwd_bytes = 0


comm_stats = CommStats()

_TAG_KV, _TAG_GRAD = 17, 29


class _Ring:
    """Point-to-point neighbours of this rank in `group`; every op batched with batch_isend_irecv."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world) if group is not None else \
            (self.rank + 1) % self.world
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world) if group is not None else \
            (self.rank - 1) % self.world

    def start(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]],
              phase: str) -> list[Any]:
        """Post sends to next and receives from prev (empty tensors skipped on both sides)."""
        ops = []
        # NCCL matches a pair's messages in posting order: post sends and receives in the same tag order
        for t, tag in sends:
            if t.numel():
                ops.append(dist.P2POp(dist.isend, t, self.next, self.group, tag))
                if phase == "fwd":
                    comm_stats.fwd_bytes += t.numel() * t.element_size()
                else:
                    comm_stats.bwd_bytes += t.numel() * t.element_size()
        for t, tag in recvs:
            if t.numel():
                ops.append(dist.P2POp(dist.irecv, t, self.prev, self.group, tag))
        return dist.batch_isend_irecv(ops) if ops else []


def _wait(reqs: list[Any]) -> None:
    for r in reqs:
        r.wait()


def ring_fwd_step(q: torch.Tensor, kv: torch.Tensor, rows_q: Rows, rows_k: Rows, out: torch.Tensor,
                  lse: torch.Tensor, *, causal: bool, scale: float, backend: str) -> None:
    """One ring step of the forward: q [n, Hq, D] attends the K/V block kv [m, 2*Hkv, D] (K heads first);
    the block's partial output is merged into out [n, Hq, D] / lse [n, Hq] (fp32) in place."""
    hkv = kv.shape[1] // 2
    block_attention_fwd(q, kv[:, :hkv], kv[:, hkv:], rows_q, rows_k, causal=causal, scale=scale, backend=backend,
                        out=out, lse=lse)


def ring_bwd_step(dout: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
                  rows_q: Rows, rows_k: Rows, dq: torch.Tensor, *, causal: bool, scale: float, backend: str,
                  into: torch.Tensor | None = None) -> torch.Tensor:
    """One ring step of the backward: adds the block pair's dQ into dq (fp32) and returns this rank's share of
    the block's dK/dV, fp32 [m, 2*Hkv, D] (the layout of kv): added into `into` where given, else fresh."""
    hkv = kv.shape[1] // 2
    mine = torch.zeros(kv.shape, device=q.device, dtype=torch.float32) if into is None else into
    block_attention_bwd(dout, q, kv[:, :hkv], kv[:, hkv:], lse, delta, rows_q, rows_k, causal=causal, scale=scale,
                        backend=backend, dq=dq, dk=mine[:, :hkv], dv=mine[:, hkv:])
    return mine


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------


class _RingAttention(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, group: Any,
                causal: bool, scale: float, backend: str, prefix_of: torch.Tensor | None) -> torch.Tensor:
        ring = _Ring(group)
        W, r = ring.world, ring.rank
        plan = _plan(cu_seqlens, W, causal, q.device, prefix_of)
        if q.shape[0] != plan.counts[r] or k.shape[0] != plan.counts[r]:
            raise ValueError(f"rank {r} holds {q.shape[0]} q / {k.shape[0]} k rows, but zigzag_shard over W={W} of "
                             f"cu_seqlens (the global packed batch, {sum(plan.counts)} rows) gives it "
                             f"{plan.counts[r]}: pass the global cu_seqlens and this rank's zigzag_shard rows")
        kv = torch.cat([k, v], dim=1)  # one message per hop: [n, 2*Hkv, D]
        out = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        lse = torch.full(q.shape[:2], -math.inf, device=q.device, dtype=torch.float32)
        for i in range(W):
            src = (r - i) % W
            reqs, nxt = [], None
            if i < W - 1:
                nxt = kv.new_empty((plan.counts[(r - i - 1) % W], *kv.shape[1:]))
                reqs = ring.start([(kv, _TAG_KV)], [(nxt, _TAG_KV)], "fwd")
            for rows_q, rows_k, block_causal in plan.blocks(r, src):
                ring_fwd_step(q, kv, rows_q, rows_k, out, lse, causal=block_causal, scale=scale, backend=backend)
            _wait(reqs)
            if nxt is not None:
                kv = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.plan, ctx.causal, ctx.scale, ctx.backend = ring, plan, causal, scale, backend
        return out

    @staticmethod
    @autocast_off
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[Any, ...]:
        # create_graph=True: the backward ring's messages and in-place sums build no graph, so a second derivative
        # would silently miss terms
        if torch.is_grad_enabled():
            raise RuntimeError("ring_attention is differentiable once: create_graph=True (double backward) is not "
                               "supported")
        q, k, v, out, lse = ctx.saved_tensors
        ring, plan = ctx.ring, ctx.plan
        W, r = ring.world, ring.rank
        Hkv = k.shape[1]
        delta = attention_delta(out, dout, backend=ctx.backend)
        dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        kv = torch.cat([k, v], dim=1)
        dkv = None  # fp32 [n_src, 2*Hkv, D]: gradient of the block we hold, summed over the ranks it visited
        for i in range(W):
            src = (r - i) % W
            sends, recvs, nxt, acc = [], [], None, None
            if i >= 1:  # pass on the accumulator of the previous block; receive the one of this block
                acc = torch.empty((plan.counts[src], *kv.shape[1:]), device=q.device, dtype=torch.float32)
                sends.append((dkv, _TAG_GRAD))
                recvs.append((acc, _TAG_GRAD))
            if i < W - 1:
                nxt = kv.new_empty((plan.counts[(r - i - 1) % W], *kv.shape[1:]))
                sends.append((kv, _TAG_KV))
                recvs.append((nxt, _TAG_KV))
            reqs = ring.start(sends, recvs, "bwd")
            # this rank's share of the block's dK/dV goes into its own buffer while the accumulator travels
            mine = torch.zeros((plan.counts[src], *kv.shape[1:]), device=q.device, dtype=torch.float32)
            for rows_q, rows_k, block_causal in plan.blocks(r, src):
                ring_bwd_step(dout, q, kv, lse, delta, rows_q, rows_k, dq, causal=block_causal, scale=ctx.scale,
                              backend=ctx.backend, into=mine)
            _wait(reqs)
            dkv = mine if acc is None else acc.add_(mine)
            if nxt is not None:
                kv = nxt
        if W > 1:  # the last hop brings every accumulator home
            own = torch.empty((plan.counts[r], *kv.shape[1:]), device=q.device, dtype=torch.float32)
            _wait(ring.start([(dkv, _TAG_GRAD)], [(own, _TAG_GRAD)], "bwd"))
            dkv = own
        dk, dv = dkv[:, :Hkv].to(k.dtype), dkv[:, Hkv:].to(v.dtype)
        return dq.to(q.dtype), dk, dv, None, None, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, group: Any = None,
                   *, causal: bool = True, softmax_scale: float | None = None, backend: str = "auto",
                   prefix_of: torch.Tensor | None = None) -> torch.Tensor:
    """Context-parallel attention over the ranks of `group` (None: the default group).

    q [n, Hq, D], k/v [n, Hkv, D]: this rank's zigzag_shard of the packed global q/k/v; cu_seqlens
    [B+1] int32 is the GLOBAL one (same on every rank). Returns this rank's shard of the global
    output, [n, Hq, D] in q.dtype. Differentiable w.r.t. q, k, v. backend selects the local kernel
    ("auto": triton on CUDA, torch otherwise). prefix_of [B] int32: shared prefixes, as in flash_attention
    (each rank's queries then also compute a non-causal block against the prefix rows each K/V block holds).
    """
    _check(q, k, v)  # before any send is posted: a rank that raises later would leave its peers waiting
    if k.shape[0] != q.shape[0] or q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"q, k and v must hold this rank's same rows in one dtype; got q {tuple(q.shape)} "
                         f"{q.dtype}, k {tuple(k.shape)} {k.dtype}, v {v.dtype}")
    _resolve(backend, q)
    if prefix_of is not None:  # as given (its dtype and shape), before it is planned with or any send is posted
        check_prefix_of(prefix_of, cu_seqlens.numel() - 1)
    scale = _softmax_scale(softmax_scale, q.shape[-1])
    return _RingAttention.apply(q, k, v, cu_seqlens, group, causal, scale, backend, prefix_of)

