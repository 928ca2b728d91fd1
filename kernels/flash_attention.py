"""Varlen (packed) causal GQA flash attention, forward and backward, returning the log-sum-exp.

Layout: every row of a packed batch carries a document id and a position within its document. A query
row i may attend a key row j iff doc(i) == doc(j) and (not causal or pos(j) <= pos(i)). The public
`flash_attention` derives (doc, pos) from `cu_seqlens`; ring attention (kernels/ring_attention.py) passes
the *global* (doc, pos) of a zigzag shard of queries and of a K/V block from another rank, so the same
local kernels serve both. Rows of each operand are sorted by (doc, pos) (global order), so the keys a
query row sees are one contiguous index range [kv_lo[i], kv_hi[i]) of the key buffer, and the queries
that see a key are one range [q_lo[j], q_hi[j]) of the query buffer. The kernels take these per-row
ranges (computed on device by searchsorted, no host sync): a tile of queries visits only the union of
its rows' ranges (fully masked tiles are never touched), tiles inside every row's range run without a
mask, and the mask of the rest is two integer compares.

Shapes and dtypes:
    q [Tq, Hq, D], k/v [Tk, Hkv, D] (fp32, fp16 or bf16; Hq % Hkv == 0, q head h reads kv head h // G)
    out [Tq, Hq, D] (dtype of q, or fp32 buffers inside the ring), lse [Tq, Hq] fp32 (natural log;
    -inf for a row that sees no key, which only happens for a K/V block from another rank).
All softmax statistics, accumulators and gradients are fp32.

Backends: "triton" (kernels below, also under TRITON_INTERPRET=1 on CPU), "torch" (blockwise over query and key
tiles with an online softmax, so memory stays O(tile) however long a document is; CPU path and test oracle), and
two peers' FlashAttention-2 varlen kernels, public entry only, GPU: "flash_attn" (the flash-attn package) and
"varlen_attn" (PyTorch's torch.nn.attention.varlen.varlen_attn).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from kernels import tuned
from kernels.dtypes import TRITON_DTYPES, autocast_off, check_first_backward, check_triton_device, check_triton_dtype
from kernels.tma import tma_ready

LOG2E = 1.4426950408889634

# --------------------------------------------------------------------------------------------------
# Row bookkeeping
# --------------------------------------------------------------------------------------------------


@dataclass
class Rows:
    """Global (document id, position in document) of each row of one operand, sorted by (doc, pos)."""

    doc: torch.Tensor  # [n] int32
    pos: torch.Tensor  # [n] int32

    def __len__(self) -> int:
        return self.doc.numel()

    @property
    def key(self) -> torch.Tensor:
        """int64 sort key doc << 32 | pos (ascending along the rows)."""
        return (self.doc.long() << 32) | self.pos.long()

    @staticmethod
    def from_cu_seqlens(cu_seqlens: torch.Tensor, total: int | None = None) -> Rows:
        """Rows of a packed batch: document b spans cu_seqlens[b]:cu_seqlens[b+1]. No host sync."""
        cu = cu_seqlens.to(torch.int64)
        n = int(total) if total is not None else int(cu[-1])
        t = torch.arange(n, device=cu.device, dtype=torch.int64)
        doc = torch.searchsorted(cu[1:], t, right=True)
        pos = t - cu[doc.clamp(max=cu.numel() - 2)]
        return Rows(doc.to(torch.int32), pos.to(torch.int32))


def key_ranges(q: Rows, k: Rows, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row i: the key rows [lo[i], hi[i]) it sees (int32 [Tq] each). Non-decreasing in i."""
    kk = k.key
    lo = torch.searchsorted(kk, q.doc.long() << 32)
    hi = torch.searchsorted(kk, q.key, right=True) if causal else torch.searchsorted(kk, (q.doc.long() + 1) << 32)
    return lo.to(torch.int32), hi.to(torch.int32)


def query_ranges(q: Rows, k: Rows, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key row j: the query rows [lo[j], hi[j]) that see it (int32 [Tk] each). Non-decreasing in j."""
    qk = q.key
    lo = torch.searchsorted(qk, k.key) if causal else torch.searchsorted(qk, k.doc.long() << 32)
    hi = torch.searchsorted(qk, (k.doc.long() + 1) << 32)
    return lo.to(torch.int32), torch.maximum(lo, hi).to(torch.int32)


def prefix_rows(rows: Rows, cu_seqlens: torch.Tensor, prefix_of: torch.Tensor) -> tuple[Rows, Rows]:
    """Shared prefixes as one more block pair: (query rows, key rows) relabelled so that a non-causal block
    attention over them computes, for every row of a document b with prefix a = prefix_of[b], its attention to
    all of document a, and nothing for the other rows (lse -inf); a causal one would too, a query's position (its
    global row) lying past its whole prefix. Merged through the lse with the usual causal block over `rows`, that
    is attention over prefix + own causal past, the layout of n responses packed after one copy of their prompt.

    rows: global (doc, pos) of the operand's rows (a packed batch or a zigzag shard; tail rows, doc B, have no
    prefix). Query labels: 3a+1 for a row whose document has prefix a, else 3*doc; key labels: 3a+1 for a row
    of a prefix a, else 3*doc+2, so only a document's rows and its prefix's rows share a label, and both
    labellings stay sorted. Query positions become the global row index (sorted within a label; a non-causal
    block ignores them). No host sync."""
    p = prefix_of.to(device=rows.doc.device, dtype=torch.int64)
    num_docs = p.numel()
    p = torch.cat([p, p.new_full((1,), -1)])  # tail rows: document B
    is_prefix = torch.zeros(num_docs + 2, dtype=torch.bool, device=p.device)
    is_prefix.scatter_(0, torch.where(p >= 0, p, num_docs + 1), True)
    doc = rows.doc.long()
    q_doc = torch.where(p[doc] >= 0, 3 * p[doc] + 1, 3 * doc)
    k_doc = torch.where(is_prefix[doc], 3 * doc + 1, 3 * doc + 2)
    cu = cu_seqlens.to(device=doc.device, dtype=torch.int64)
    row = cu[doc.clamp(max=num_docs - 1)] + rows.pos.long() if num_docs else rows.pos.long()
    return Rows(q_doc.to(torch.int32), row.to(torch.int32)), Rows(k_doc.to(torch.int32), rows.pos)


# --------------------------------------------------------------------------------------------------
# Torch reference (blockwise, online softmax, fp32)
# --------------------------------------------------------------------------------------------------

TORCH_BLOCK_M = 128
TORCH_BLOCK_N = 512


def _torch_tiles(q: Rows, k: Rows, causal: bool, n_q: int):
    """Yield (i0, i1, [(j0, j1, mask [i1-i0, j1-j0]), ...]) per query tile: the key tiles over the hull of the
    ranges of its rows that see any key (the Triton kernels' _tile_split takes all rows' union)."""
    lo, hi = key_ranges(q, k, causal)
    lo_h, hi_h = lo.tolist(), hi.tolist()
    for i0 in range(0, n_q, TORCH_BLOCK_M):
        i1 = min(i0 + TORCH_BLOCK_M, n_q)
        seen = [(a, b) for a, b in zip(lo_h[i0:i1], hi_h[i0:i1]) if b > a]
        jlo, jhi = (min(a for a, _ in seen), max(b for _, b in seen)) if seen else (0, 0)
        tiles = []
        for j0 in range(jlo, jhi, TORCH_BLOCK_N):
            j1 = min(j0 + TORCH_BLOCK_N, jhi)
            j = torch.arange(j0, j1, device=lo.device)
            tiles.append((j0, j1, (j[None, :] >= lo[i0:i1, None]) & (j[None, :] < hi[i0:i1, None])))
        yield i0, i1, tiles


def _torch_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qr: Rows, kr: Rows, causal: bool,
               scale: float, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fill out [Tq,Hq,D] and lse [Tq,Hq] (fp32). Query tiles x key tiles, only the visible key range."""
    Tq, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    for i0, i1, tiles in _torch_tiles(qr, kr, causal, Tq):
        n = i1 - i0
        # [Hkv, G, n, D]: the G query heads sharing a kv head batch against it
        qb = (q[i0:i1].float() * scale).view(n, Hkv, G, D).permute(1, 2, 0, 3)
        m = torch.full((Hkv, G, n), -math.inf, device=q.device)
        l = torch.zeros(Hkv, G, n, device=q.device)
        acc = torch.zeros(Hkv, G, n, D, device=q.device)
        for j0, j1, mask in tiles:
            kb = k[j0:j1].float().permute(1, 2, 0)[:, None]  # [Hkv, 1, D, nk]
            vb = v[j0:j1].float().permute(1, 0, 2)[:, None]  # [Hkv, 1, nk, D]
            s = torch.matmul(qb, kb).masked_fill_(~mask, -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)  # rows with no visible key so far
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + torch.matmul(p, vb)
            m = m_new
        # a row that sees no key (in a ring block, or in the prefix block outside shared prompts' documents) gets
        # out 0 and lse -inf
        o = torch.where(l[..., None] > 0, acc / l.clamp(min=1e-30)[..., None], 0.0)
        out[i0:i1] = o.permute(2, 0, 1, 3).reshape(n, Hq, D).to(out.dtype)
        lse[i0:i1] = (m + torch.log(l)).permute(2, 0, 1).reshape(n, Hq)


def _torch_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
               delta: torch.Tensor, qr: Rows, kr: Rows, causal: bool, scale: float,
               dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Accumulate dq [Tq,Hq,D], dk/dv [Tk,Hkv,D] (fp32) given lse and delta = rowsum(dO*O) - dlse."""
    Tq, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    for i0, i1, tiles in _torch_tiles(qr, kr, causal, Tq):
        n = i1 - i0
        qb = q[i0:i1].float().view(n, Hkv, G, D).permute(1, 2, 0, 3)
        dob = do[i0:i1].float().view(n, Hkv, G, D).permute(1, 2, 0, 3)
        lb = lse[i0:i1].view(n, Hkv, G).permute(1, 2, 0)
        lb = torch.where(torch.isinf(lb), 0.0, lb)[..., None]
        db = delta[i0:i1].view(n, Hkv, G).permute(1, 2, 0)[..., None]
        for j0, j1, mask in tiles:
            kb = k[j0:j1].float().permute(1, 0, 2)[:, None]  # [Hkv, 1, nk, D]
            vb = v[j0:j1].float().permute(1, 0, 2)[:, None]
            s = (torch.matmul(qb, kb.transpose(-1, -2)) * scale).masked_fill_(~mask, -math.inf)
            p = torch.exp(s - lb)  # [Hkv, G, n, nk]
            dv[j0:j1] += torch.einsum("hgqk,hgqd->khd", p, dob)
            ds = p * (torch.matmul(dob, vb.transpose(-1, -2)) - db) * scale
            dq[i0:i1] += torch.matmul(ds, kb).permute(2, 0, 1, 3).reshape(n, Hq, D)
            dk[j0:j1] += torch.einsum("hgqk,hgqd->khd", ds, qb)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


# A row with an empty range sits where its label's keys would start: with shared prompts (prefix_rows), a tile
# holding a group's last responses and the next prompt's first rows scans the group's response keys too, about
# BLOCK / prompt length more prefix work per group. Taking the hull of the non-empty rows only (as _torch_tiles
# does) cost the forward kernel its last registers: 16 bytes of local memory at sm_90.
@triton.jit
def _tile_split(lo_ptr, hi_ptr, offs, ok, BLOCK: tl.constexpr, ALIGN: tl.constexpr = 1):
    """Each row's range start and length; the union [lo, hi) of the rows' ranges (lo rounded down to a
    multiple of ALIGN, for TMA boxes whose start must be 16-byte aligned); and [a, b): the tiles (grid
    lo + t*BLOCK) that every valid row sees entirely, which need no mask. Tiles in [lo, a) and [b, hi) are
    masked."""
    r_lo = tl.load(lo_ptr + offs, mask=ok, other=0)
    r_hi = tl.load(hi_ptr + offs, mask=ok, other=0)
    lo = tl.min(tl.where(ok, r_lo, 2147483647), 0) // ALIGN * ALIGN
    hi = tl.max(r_hi, 0)
    full_lo = tl.max(r_lo, 0)
    full_hi = tl.min(tl.where(ok, r_hi, 2147483647), 0)
    n_a = tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK)
    n_b = tl.maximum(tl.maximum(full_hi - lo, 0) // BLOCK, n_a)
    r_len = (r_hi - r_lo).to(tl.uint32, bitcast=True)
    return r_lo, r_len, lo, hi, lo + n_a * BLOCK, lo + n_b * BLOCK


@triton.jit
def _rows_source(base, rows, stride_row, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, TMA: tl.constexpr):
    """Where the loops read [BLOCK, HEAD_DIM] tiles of one head's [rows, HEAD_DIM] matrix at `base`: a TMA
    tensor descriptor, or `base` itself for pointer loads."""
    if TMA:
        return tl.make_tensor_descriptor(base, shape=[rows, HEAD_DIM], strides=[stride_row, 1],
                                         block_shape=[BLOCK, HEAD_DIM])
    else:
        return base


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, Kp, Vp, start, end, hi, r_lo, r_len, qk_scale, stride_kt, stride_vt,
               MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr = False):
    """Key tiles start, start + BLOCK_N, ... < end. TMA: Kp / Vp are tensor descriptors (rows past the end
    arrive as zeros; rows past hi are masked through s)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for s0 in range(start, end, BLOCK_N):
        offs_n = s0 + tl.arange(0, BLOCK_N)
        if TMA:
            kT = tl.trans(Kp.load([s0, 0]))
            v = Vp.load([s0, 0])
        elif MASKED:
            n_ok = offs_n < hi
            kT = tl.load(Kp + offs_n[None, :] * stride_kt + offs_d[:, None], mask=n_ok[None, :], other=0.0)
            v = tl.load(Vp + offs_n[:, None] * stride_vt + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        else:
            kT = tl.load(Kp + offs_n[None, :] * stride_kt + offs_d[:, None])
            v = tl.load(Vp + offs_n[:, None] * stride_vt + offs_d[None, :])
        s = tl.dot(q, kT) * qk_scale
        if MASKED:
            # lo <= n < hi as one unsigned compare: n - lo wraps to a huge value when n < lo
            ok = (offs_n[None, :] - r_lo[:, None]).to(tl.uint32, bitcast=True) < r_len[:, None]
            s = tl.where(ok, s, float("-inf"))
        # m_i starts at a finite -1e30 (not -inf), so a row with no visible key so far has exp2(-inf - m) = 0
        # terms and alpha = 1 on an all-zero state, with no inf - inf
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KV_LO, KV_HI,
    Tq, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAVY_FIRST: tl.constexpr = False, MERGE: tl.constexpr = False, TMA: tl.constexpr = False, Tk=0,
    WIDE: tl.constexpr = False,
):
    """One program: BLOCK_M query rows x one query head, over the union of its rows' key ranges.

    qk_scale = softmax_scale * log2(e): the softmax runs in base 2 (exp2 is one MUFU op). HEAVY_FIRST:
    program i takes the i-th query block from the end; under a causal mask later blocks see more keys, so the
    longest programs start first instead of forming the last wave. MERGE (ring steps): O / LSE hold a partial
    attention over other keys (fp32; lse -inf where none seen yet) and receive the softmax-weighted
    combination of it and this block's result, in the epilogue (no separate merge pass over O).
    """
    if WIDE:  # element offsets reach 2**31: every row / head stride in int64, so are the products
        stride_qt, stride_qh = stride_qt.to(tl.int64), stride_qh.to(tl.int64)
        stride_kt, stride_kh = stride_kt.to(tl.int64), stride_kh.to(tl.int64)
        stride_vt, stride_vh = stride_vt.to(tl.int64), stride_vh.to(tl.int64)
        stride_ot, stride_oh = stride_ot.to(tl.int64), stride_oh.to(tl.int64)
    pid_m = tl.program_id(0)
    if HEAVY_FIRST:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < Tq
    q = tl.load(Q + offs_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    r_lo, r_len, lo, hi, a, b = _tile_split(KV_LO, KV_HI, offs_m, m_ok, BLOCK_N)
    Kp = _rows_source(K + kvh * stride_kh, Tk, stride_kt, HEAD_DIM, BLOCK_N, TMA)
    Vp = _rows_source(V + kvh * stride_vh, Tk, stride_vt, HEAD_DIM, BLOCK_N, TMA)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, Kp, Vp, lo, a, hi, r_lo, r_len, qk_scale, stride_kt, stride_vt,
                               True, HEAD_DIM, BLOCK_N, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, Kp, Vp, a, b, hi, r_lo, r_len, qk_scale, stride_kt, stride_vt,
                               False, HEAD_DIM, BLOCK_N, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, Kp, Vp, b, hi, hi, r_lo, r_len, qk_scale, stride_kt, stride_vt,
                               True, HEAD_DIM, BLOCK_N, TMA)

    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    o_ptrs = O + offs_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    if MERGE:  # base 2 throughout: lse2 = m + log2(l) of this block, prev2 of the partial in O / LSE
        lse2 = tl.where(has, m_i + tl.math.log2(l_safe), float("-inf"))
        prev2 = tl.load(LSE + offs_m * stride_lt + h, mask=m_ok, other=float("-inf")) * 1.4426950408889634
        top = tl.maximum(lse2, prev2)
        top = tl.where(top == float("-inf"), 0.0, top)  # neither part has seen a key: weights 0, out stays 0
        w_prev = tl.math.exp2(prev2 - top)
        w_blk = tl.math.exp2(lse2 - top)
        tot = w_prev + w_blk
        seen = tot > 0.0
        tot_safe = tl.where(seen, tot, 1.0)
        o_prev = tl.load(o_ptrs, mask=m_ok[:, None], other=0.0).to(tl.float32)
        acc = o_prev * (w_prev / tot_safe)[:, None] + acc * (w_blk / (tot_safe * l_safe))[:, None]
        lse = tl.where(seen, (top + tl.math.log2(tot_safe)) * 0.6931471805599453, float("-inf"))
    else:
        acc = acc / l_safe[:, None]
        lse = tl.where(has, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_ok[:, None])
    tl.store(LSE + offs_m * stride_lt + h, lse, mask=m_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, Tq, H,
    stride_ot, stride_oh, stride_dot, stride_doh,
    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, WIDE: tl.constexpr = False,
):
    """delta[t, h] = sum_d O*dO - dlse (fp32): the softmax-backward row term, lse's gradient folded in."""
    if WIDE:  # element offsets reach 2**31: every row / head stride in int64, so are the products
        stride_ot, stride_oh = stride_ot.to(tl.int64), stride_oh.to(tl.int64)
        stride_dot, stride_doh = stride_dot.to(tl.int64), stride_doh.to(tl.int64)
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < Tq
    o = tl.load(O + offs_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=m_ok[:, None],
                 other=0.0)
    d = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        d -= tl.load(DLSE + offs_m * H + h, mask=m_ok, other=0.0)
    tl.store(DELTA + offs_m * H + h, d, mask=m_ok)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Qp, DOp, LSEp, DELTAp, DQp, start, end, a, b, hi, r_lo, r_len, qk_scale, sm_scale,
                stride_qt, stride_dot, stride_dqt, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                FUSED_DQ: tl.constexpr, PASS: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr):
    """Query tiles start, start + BLOCK_M, ... < end. MASK 0: tiles inside [a, b), no masks at all; 1: every
    tile masked; 2: one loop over [lo, hi) that masks the tiles outside [a, b) at run time (the joint dK/dV
    pass: three loops, as in the forward, need more registers than its two accumulators leave). TMA: Qp and
    DOp are tensor descriptors (rows past the end arrive as zeros; rows past hi are masked through p)."""
    offs_d = tl.arange(0, HEAD_DIM)
    for s0 in range(start, end, BLOCK_M):
        offs_m = s0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < hi  # all true inside [a, b)
        if TMA:  # LSEp / DELTAp: descriptors of the [Hq, Tq] rows, (1, BLOCK_M) boxes at [h, s0] (h in LSEp[1])
            qT = tl.trans(Qp.load([s0, 0]))
            do = DOp.load([s0, 0])
            lse = tl.reshape(LSEp[0].load([LSEp[1], s0]), [BLOCK_M])
            delta = tl.reshape(DELTAp.load([LSEp[1], s0]), [BLOCK_M])
        elif MASK == 0:
            qT = tl.load(Qp + offs_m[None, :] * stride_qt + offs_d[:, None])
            do = tl.load(DOp + offs_m[:, None] * stride_dot + offs_d[None, :])
            lse = tl.load(LSEp + offs_m)  # head-major copies: one 256-byte line per tile
            delta = tl.load(DELTAp + offs_m)
        else:
            qT = tl.load(Qp + offs_m[None, :] * stride_qt + offs_d[:, None], mask=m_ok[None, :], other=0.0)
            do = tl.load(DOp + offs_m[:, None] * stride_dot + offs_d[None, :], mask=m_ok[:, None], other=0.0)
            lse = tl.load(LSEp + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTAp + offs_m, mask=m_ok, other=0.0)
        # lse (base 2) is finite for every query row that sees a key of this block (the global lse includes it)
        sT = tl.dot(k, qT) * qk_scale
        pT = tl.math.exp2(sT - lse[None, :])
        if MASK == 1:
            ok = (offs_m[None, :] - r_lo[:, None]).to(tl.uint32, bitcast=True) < r_len[:, None]
            pT = tl.where(ok, pT, 0.0)
        elif MASK == 2:
            if (s0 < a) | (s0 >= b):
                ok = (offs_m[None, :] - r_lo[:, None]).to(tl.uint32, bitcast=True) < r_len[:, None]
                pT = tl.where(ok, pT, 0.0)
        if PASS != 2:
            dv += tl.dot(pT.to(do.dtype), do)
        if PASS != 1:
            dpT = tl.dot(v, tl.trans(do))
            dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)
            dk += tl.dot(dsT, tl.trans(qT))
            if FUSED_DQ:  # FlashAttention-2's scheme: dS is on hand, add its dQ share into fp32 dQ (no dQ kernel)
                dq = tl.dot(tl.trans(dsT), k) * sm_scale
                if TMA:  # one bulk reduce-add of the tile by the TMA unit (FlashAttention-3's way), no per-thread
                    DQp.atomic_add([s0, 0], dq)  # atomics; rows past Tq are clipped, rows past hi add zeros
                else:
                    tl.atomic_add(DQp + offs_m[:, None] * stride_dqt + offs_d[None, :], dq, mask=m_ok[:, None],
                                  sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV, DQ, Q_LO, Q_HI,
    Tk, Tq, stride_lh, qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, ACCUMULATE: tl.constexpr, FUSED_DQ: tl.constexpr,
    PASS: tl.constexpr, THREE_LOOPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr = False, WIDE: tl.constexpr = False,
):
    """One program: BLOCK_N key rows x one kv head; loops over the G query heads and the query range.

    Works on transposed tiles (keys x queries) so dK, dV accumulate in registers without atomics. With
    FUSED_DQ it also adds dQ = dS K (scaled) into the fp32 buffer DQ with atomics (with TMA: by TMA reduce of
    whole tiles), and no dQ kernel runs.
    PASS 0 computes dK and dV; PASS 1 only dV (2 matmuls per tile) and PASS 2 only dK (3): two launches
    recompute S once more, but each holds one fp32 accumulator, so 128-key tiles fit the registers.
    LSE2 (lse * log2 e) and DELTA are head-major [Hq, stride_lh] fp32 (Tq valid columns), so each query tile's
    values are one contiguous line (token-major they were Hq-strided scalar loads in the innermost loop).
    THREE_LOOPS: the query range as masked / unmasked / masked loops (no branch in the main loop) instead of
    one loop.
    TMA: query and dO tiles arrive by Hopper's tensor-memory accelerator (one thread issues a tile; no
    per-thread addresses or staging registers), so the loop can pipeline more stages in the same registers.
    """
    if WIDE:  # element offsets reach 2**31: every row / head stride in int64, so are the products
        stride_qt, stride_qh = stride_qt.to(tl.int64), stride_qh.to(tl.int64)
        stride_kt, stride_kh = stride_kt.to(tl.int64), stride_kh.to(tl.int64)
        stride_vt, stride_vh = stride_vt.to(tl.int64), stride_vh.to(tl.int64)
        stride_dot, stride_doh = stride_dot.to(tl.int64), stride_doh.to(tl.int64)
        stride_dkt, stride_dkh = stride_dkt.to(tl.int64), stride_dkh.to(tl.int64)
        stride_dvt, stride_dvh = stride_dvt.to(tl.int64), stride_dvh.to(tl.int64)
        stride_dqt, stride_dqh = stride_dqt.to(tl.int64), stride_dqh.to(tl.int64)
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < Tk
    k = tl.load(K + offs_n[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=n_ok[:, None], other=0.0)
    # TMA: query tiles start at multiples of 4 rows, so each fp32 lse / delta box starts 16-byte aligned
    r_lo, r_len, lo, hi, a, b = _tile_split(Q_LO, Q_HI, offs_n, n_ok, BLOCK_M, 4 if TMA else 1)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if TMA:  # the head-major rows are padded to stride_lh (a multiple of 4: 16-byte rows, as TMA needs)
        lse_desc = tl.make_tensor_descriptor(LSE2, shape=[GROUP * tl.num_programs(1), Tq], strides=[stride_lh, 1],
                                             block_shape=[1, BLOCK_M])
        delta_desc = tl.make_tensor_descriptor(DELTA, shape=[GROUP * tl.num_programs(1), Tq],
                                               strides=[stride_lh, 1], block_shape=[1, BLOCK_M])
    for g in range(GROUP):
        h = kvh * GROUP + g
        Qp = _rows_source(Q + h * stride_qh, Tq, stride_qt, HEAD_DIM, BLOCK_M, TMA)
        DOp = _rows_source(DO + h * stride_doh, Tq, stride_dot, HEAD_DIM, BLOCK_M, TMA)
        if TMA:
            LSEp = (lse_desc, h)
            DELTAp = delta_desc
        else:
            LSEp = LSE2 + h * stride_lh
            DELTAp = DELTA + h * stride_lh
        DQp = _rows_source(DQ + h * stride_dqh, Tq, stride_dqt, HEAD_DIM, BLOCK_M, TMA and FUSED_DQ and PASS != 1)
        if THREE_LOOPS:
            dk, dv = _dkdv_inner(dk, dv, k, v, Qp, DOp, LSEp, DELTAp, DQp, lo, a, a, b, hi, r_lo, r_len, qk_scale,
                                 sm_scale, stride_qt, stride_dot, stride_dqt, HEAD_DIM, BLOCK_M, FUSED_DQ, PASS, 1, TMA)
            dk, dv = _dkdv_inner(dk, dv, k, v, Qp, DOp, LSEp, DELTAp, DQp, a, b, a, b, hi, r_lo, r_len, qk_scale,
                                 sm_scale, stride_qt, stride_dot, stride_dqt, HEAD_DIM, BLOCK_M, FUSED_DQ, PASS, 0, TMA)
            dk, dv = _dkdv_inner(dk, dv, k, v, Qp, DOp, LSEp, DELTAp, DQp, b, hi, a, b, hi, r_lo, r_len, qk_scale,
                                 sm_scale, stride_qt, stride_dot, stride_dqt, HEAD_DIM, BLOCK_M, FUSED_DQ, PASS, 1, TMA)
        else:
            dk, dv = _dkdv_inner(dk, dv, k, v, Qp, DOp, LSEp, DELTAp, DQp, lo, hi, a, b, hi, r_lo, r_len, qk_scale,
                                 sm_scale, stride_qt, stride_dot, stride_dqt, HEAD_DIM, BLOCK_M, FUSED_DQ, PASS, 2, TMA)
    if PASS != 1:
        dk *= sm_scale
        dk_ptrs = DK + offs_n[:, None] * stride_dkt + kvh * stride_dkh + offs_d[None, :]
        if ACCUMULATE:  # ring: add this block pair's share into the fp32 buffer travelling with K/V
            dk += tl.load(dk_ptrs, mask=n_ok[:, None], other=0.0).to(tl.float32)
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_ok[:, None])
    if PASS != 2:
        dv_ptrs = DV + offs_n[:, None] * stride_dvt + kvh * stride_dvh + offs_d[None, :]
        if ACCUMULATE:
            dv += tl.load(dv_ptrs, mask=n_ok[:, None], other=0.0).to(tl.float32)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def _dq_inner(dq, q, do, lse, delta, Kp, Vp, start, end, hi, r_lo, r_len, qk_scale, stride_kt, stride_vt,
              MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr = False):
    """Key tiles start, start + BLOCK_N, ... < end; TMA as in _fwd_inner."""
    offs_d = tl.arange(0, HEAD_DIM)
    for s0 in range(start, end, BLOCK_N):
        offs_n = s0 + tl.arange(0, BLOCK_N)
        if TMA:
            kT = tl.trans(Kp.load([s0, 0]))
            vT = tl.trans(Vp.load([s0, 0]))
        elif MASKED:
            n_ok = offs_n < hi
            kT = tl.load(Kp + offs_n[None, :] * stride_kt + offs_d[:, None], mask=n_ok[None, :], other=0.0)
            vT = tl.load(Vp + offs_n[None, :] * stride_vt + offs_d[:, None], mask=n_ok[None, :], other=0.0)
        else:
            kT = tl.load(Kp + offs_n[None, :] * stride_kt + offs_d[:, None])
            vT = tl.load(Vp + offs_n[None, :] * stride_vt + offs_d[:, None])
        p = tl.math.exp2(tl.dot(q, kT) * qk_scale - lse[:, None])
        if MASKED:
            ok = (offs_n[None, :] - r_lo[:, None]).to(tl.uint32, bitcast=True) < r_len[:, None]
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, vT)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT))
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_LO, KV_HI,
    Tq, Hq, qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAVY_FIRST: tl.constexpr = False, TMA: tl.constexpr = False,
    Tk=0, WIDE: tl.constexpr = False,
):
    """One program: BLOCK_M query rows x one query head; dQ over the key range (recomputes P). HEAVY_FIRST and
    TMA (K / V tiles by tensor descriptors over Tk rows) as in _attn_fwd_kernel."""
    if WIDE:  # element offsets reach 2**31: every row / head stride in int64, so are the products
        stride_qt, stride_qh = stride_qt.to(tl.int64), stride_qh.to(tl.int64)
        stride_kt, stride_kh = stride_kt.to(tl.int64), stride_kh.to(tl.int64)
        stride_vt, stride_vh = stride_vt.to(tl.int64), stride_vh.to(tl.int64)
        stride_dot, stride_doh = stride_dot.to(tl.int64), stride_doh.to(tl.int64)
        stride_dqt, stride_dqh = stride_dqt.to(tl.int64), stride_dqh.to(tl.int64)
    pid_m = tl.program_id(0)
    if HEAVY_FIRST:
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < Tq
    q = tl.load(Q + offs_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=m_ok[:, None],
                 other=0.0)
    lse = tl.load(LSE + offs_m * Hq + h, mask=m_ok, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # such a row sees no key: every p is masked to 0
    delta = tl.load(DELTA + offs_m * Hq + h, mask=m_ok, other=0.0)
    r_lo, r_len, lo, hi, a, b = _tile_split(KV_LO, KV_HI, offs_m, m_ok, BLOCK_N)
    Kp = _rows_source(K + kvh * stride_kh, Tk, stride_kt, HEAD_DIM, BLOCK_N, TMA)
    Vp = _rows_source(V + kvh * stride_vh, Tk, stride_vt, HEAD_DIM, BLOCK_N, TMA)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, Kp, Vp, lo, a, hi, r_lo, r_len, qk_scale, stride_kt, stride_vt,
                   True, HEAD_DIM, BLOCK_N, TMA)
    dq = _dq_inner(dq, q, do, lse, delta, Kp, Vp, a, b, hi, r_lo, r_len, qk_scale, stride_kt, stride_vt,
                   False, HEAD_DIM, BLOCK_N, TMA)
    dq = _dq_inner(dq, q, do, lse, delta, Kp, Vp, b, hi, hi, r_lo, r_len, qk_scale, stride_kt, stride_vt,
                   True, HEAD_DIM, BLOCK_N, TMA)
    dq *= sm_scale
    dq_ptrs = DQ + offs_m[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :]
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=m_ok[:, None], other=0.0).to(tl.float32)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None])


@dataclass(frozen=True)
class TritonConfig:
    """Tile sizes and launch options (production: head_dim 128, bf16, sm_90)."""

    fwd_block_m: int = 128
    fwd_block_n: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 3
    bwd_block_m: int = 64  # query tile of the dK/dV kernel
    bwd_block_n: int = 64  # key tile of the dK/dV kernel
    bwd_warps: int = 8
    # 2 stages: spill-free under Triton 3.9; under 3.6 (torch 2.11) they spill 184 B/thread yet still beat
    # 1 stage on an H200 (bench.attention_configs, 32K tokens: 31.0 vs 33.1 ms fwd+bwd)
    bwd_stages: int = 2
    dq_block_m: int = 128  # query tile of the dQ kernel
    dq_block_n: int = 64  # key tile of the dQ kernel
    dq_warps: int = 8
    dq_stages: int = 2
    pre_block_m: int = 64
    # dQ computed inside the dK/dV kernel (atomic adds into an fp32 dQ, as FlashAttention-2 does): 5 matmuls per
    # tile instead of 7, no dQ kernel (the dq_* fields are then unused); dQ's summation order is not deterministic.
    # With bwd_tma each [BLOCK_M, D] dQ tile is added by one TMA reduce (FlashAttention-3's way; SASS UTMAREDG)
    # instead of per-thread atomics, which made the split fused-dQ pass 1.20x slower on the H200 (run 7)
    bwd_fused_dq: bool = False
    # dV and dK by two launches of the dK/dV kernel (PASS 1, then PASS 2), each with one accumulator, using the
    # split_* tiles (the bwd_* tiles are then unused); with bwd_fused_dq the dK launch also adds dQ.
    # Why: on an H200 (bench.profile_kernels, 32K tokens, commit f7f6ced) the joint dK/dV kernel took 28.5 ms
    # (~230 TFLOP/s) against 8.2 ms for the dQ kernel (~600): its two fp32 accumulators leave 64-key tiles
    # only (64x32 wgmma per warpgroup at 8 warps) and still spill under Triton 3.6. Split, each pass holds one
    # accumulator and takes 128-key tiles (64x64 / 64x128 wgmma) for one more S recompute (8 matmuls per tile
    # pair in the whole backward instead of 7). Measured on the H200 (commit 3b8a5a4, lse / delta head-major):
    # both passes 23.6 ms vs 28.5 for the joint kernel; fwd+bwd 0.54-0.57x SDPA at 16K-128K tokens (joint:
    # 0.45-0.49x); in bench.attention_configs split 64x128 w8 with 1 stage ran 0.97x the 2-stage one, and it is
    # the one without spills under Triton 3.6 too (2 stages: 28 B in the dK pass).
    bwd_split: bool = True
    split_block_m: int = 64  # query tile of the split passes
    split_block_n: int = 128  # key tile of the split passes
    split_warps: int = 8
    split_stages: int = 1
    # the dV pass's stages when it should differ (None: split_stages). With one stage the query tiles arrive by
    # plain loads (no cp.async pipelining, SASS shows no LDGSTS); the dV pass (one accumulator, 2 matmuls)
    # pipelines with 2 stages spill-free under Triton 3.6 and 3.9, the dK pass spills there
    split_dv_stages: int | None = None
    # the dK/dV kernel's query range as masked / unmasked / masked loops, as the forward and dQ kernels do (no
    # run-time branch in the main loop); off: one loop masking the tiles outside [a, b) at run time
    bwd_three_loops: bool = False
    # forward and dQ programs take query blocks from the last one down (causal: the longest first)
    q_heavy_first: bool = False
    # tiles by TMA tensor descriptors (Hopper's tensor-memory accelerator; rows must be 16-byte aligned, else the
    # launch falls back to plain loads): no per-thread addresses or staging registers. bwd_tma: the dK/dV
    # kernel's query, dO, lse and delta tiles; its split passes then pipeline at 2-3 stages spill-free under
    # Triton 3.6 (dK pass 224-228 registers; with plain loads 2 stages spill) and 3.9. fwd_tma / dq_tma: the
    # K / V tiles of the forward and the dQ kernel (Triton 3.6: 179 and 205 registers instead of 255 and 246).
    # Off until an H200 run of bench.attention_configs (which checks them) shows them faster.
    bwd_tma: bool = False
    fwd_tma: bool = False
    dq_tma: bool = False
    # stages of the ring's forward (MERGE epilogue: the fp32 partial output is read back too); with fwd_stages 3
    # it keeps 16 B of stack under Triton 3.9 (255 registers), with 2 none
    merge_fwd_stages: int = 2
    # what flash_attention(backend="auto") runs on CUDA fp16/bf16: our "triton" kernels, or "varlen_attn"
    # (PyTorch's FlashAttention-2 varlen kernels: lse not differentiable, dQ summed by atomics in no fixed order) on
    # a GPU whose bench.attention_configs sweep measured those faster. The ring's blocks always run ours (they merge
    # partial outputs through the LSE).
    auto_backend: str = "triton"

    def __post_init__(self) -> None:
        if self.auto_backend not in ("triton", "varlen_attn"):
            raise ValueError(f"auto_backend={self.auto_backend!r}: valid 'triton', 'varlen_attn'")

    def dkdv_launches(self) -> list[tuple[int, str, int, int, int, int]]:
        """The dK/dV kernel launches: (PASS, name suffix, BLOCK_M, BLOCK_N, warps, stages) each."""
        if not self.bwd_split:
            return [(0, "", self.bwd_block_m, self.bwd_block_n, self.bwd_warps, self.bwd_stages)]
        dv_stages = self.split_stages if self.split_dv_stages is None else self.split_dv_stages
        tiles = (self.split_block_m, self.split_block_n, self.split_warps)
        return [(1, "_dv", *tiles, dv_stages), (2, "_dk", *tiles, self.split_stages)]


CONFIG = TritonConfig()
# small tiles keep the interpreter fast and put many tile boundaries inside tiny test inputs
INTERPRET_CONFIG = TritonConfig(fwd_block_m=16, fwd_block_n=16, fwd_warps=4, fwd_stages=1, bwd_block_m=16,
                                bwd_block_n=16, bwd_warps=4, bwd_stages=1, dq_block_m=16, dq_block_n=16, dq_warps=4,
                                dq_stages=1, pre_block_m=16, bwd_fused_dq=False, bwd_split=False, split_block_m=16,
                                split_block_n=32, split_warps=4, split_stages=1, bwd_three_loops=False,
                                q_heavy_first=False, split_dv_stages=None, merge_fwd_stages=1, bwd_tma=False,
                                fwd_tma=False, dq_tma=False)


_FIELDS = [f.name for f in dataclasses.fields(TritonConfig)]


def config_for(device: torch.device) -> TritonConfig:
    """The launch configuration on `device`: CONFIG with its GPU's tuned fields (kernels/tuned.py) on CUDA;
    INTERPRET_CONFIG elsewhere (the interpreter on CPU tensors)."""
    if device.type != "cuda":
        return INTERPRET_CONFIG
    over = tuned.values("flash_attention", device, _FIELDS)
    try:
        return _replaced(CONFIG, tuple(sorted(over.items()))) if over else CONFIG
    except (TypeError, ValueError) as e:  # a value TritonConfig refuses: name the file, as for a bad name
        index = device.index if device.index is not None else torch.cuda.current_device()
        path = tuned.lookup("flash_attention", tuned.gpu_name(index))[1]
        raise ValueError(f"{path}: [flash_attention] {e}") from None


@functools.lru_cache(maxsize=16)
def _replaced(base: TritonConfig, fields: tuple[tuple[str, Any], ...]) -> TritonConfig:
    return dataclasses.replace(base, **dict(fields))


def _cfg(q: torch.Tensor) -> TritonConfig:
    return config_for(q.device)


def _wide(*tensors: torch.Tensor) -> bool:
    """Whether an element offset into one of `tensors` reaches 2**31 (at Qwen3-4B's 32 x 128 q heads, from 524,288
    packed rows): the kernels then compute offsets in int64 (WIDE), else in int32, which is cheaper and would
    wrap there."""
    return any(t.numel() and sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n) >= 2**31 for t in tensors)


def _triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qr: Rows, kr: Rows, causal: bool,
                scale: float, out: torch.Tensor, lse: torch.Tensor, merge: bool = False) -> None:
    Tq, Hq, D = q.shape
    if Tq == 0:
        return
    c = _cfg(q)
    lo, hi = key_ranges(qr, kr, causal)
    _attn_fwd_kernel[(triton.cdiv(Tq, c.fwd_block_m), Hq)](
        q, k, v, out, lse, lo, hi, Tq, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        lse.stride(0),
        GROUP=Hq // k.shape[1], HEAD_DIM=D, BLOCK_M=c.fwd_block_m, BLOCK_N=c.fwd_block_n,
        HEAVY_FIRST=c.q_heavy_first, MERGE=merge, TMA=c.fwd_tma and tma_ready(k, v), Tk=k.shape[0],
        WIDE=_wide(q, k, v, out), num_warps=c.fwd_warps, num_stages=c.merge_fwd_stages if merge else c.fwd_stages,
    )


def _triton_delta(out: torch.Tensor, do: torch.Tensor, dlse: torch.Tensor | None) -> torch.Tensor:
    Tq, Hq, D = out.shape
    delta = torch.empty(Tq, Hq, device=out.device, dtype=torch.float32)
    if Tq == 0:
        return delta
    c = _cfg(out)
    _attn_bwd_preprocess_kernel[(triton.cdiv(Tq, c.pre_block_m), Hq)](
        out, do, dlse if dlse is not None else delta, delta, Tq, Hq,
        out.stride(0), out.stride(1), do.stride(0), do.stride(1),
        HAS_DLSE=dlse is not None, HEAD_DIM=D, BLOCK_M=c.pre_block_m, WIDE=_wide(out, do),
    )
    return delta


def _triton_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                delta: torch.Tensor, qr: Rows, kr: Rows, causal: bool, scale: float,
                dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, accumulate: bool) -> None:
    """Write (or with accumulate, add into) dq, dk, dv; the buffers' dtype is the output dtype."""
    Tq, Hq, D = q.shape
    Tk, Hkv, _ = k.shape
    if Tq == 0 or Tk == 0:
        if not accumulate:
            dq.zero_(), dk.zero_(), dv.zero_()
        return
    c = _cfg(q)
    G = Hq // Hkv
    qlo, qhi = query_ranges(qr, kr, causal)
    # fused: atomics add into fp32 dQ (the ring's buffer as is; otherwise a zeroed one, copied into dq after)
    dq32 = dq
    if c.bwd_fused_dq and not accumulate:
        dq32 = dq.zero_() if dq.dtype == torch.float32 else torch.zeros(dq.shape, device=dq.device)
    # head-major [Hq, Tq] copies, rows padded to a multiple of 4 (16 bytes, for TMA): 4 bytes x Hq x Tq each
    # (4 MiB at 32K tokens, 32 heads)
    stride_lh = -(-Tq // 4) * 4
    lse2_h = torch.empty(Hq, stride_lh, device=q.device, dtype=torch.float32)
    delta_h = torch.empty_like(lse2_h)
    torch.mul(lse.t(), LOG2E, out=lse2_h[:, :Tq])
    delta_h[:, :Tq] = delta.t()
    # fused dQ under TMA: the dQ tiles are added by TMA reduce, so the fp32 buffer must be 16-byte aligned too
    tma = c.bwd_tma and tma_ready(q, do) and not (c.bwd_fused_dq and not tma_ready(dq32))
    wide = _wide(q, k, v, do, dq32, dk, dv)
    for pass_, _, bm, bn, warps, stages in c.dkdv_launches():
        _attn_bwd_dkdv_kernel[(triton.cdiv(Tk, bn), Hkv)](
            q, k, v, do, lse2_h, delta_h, dk, dv, dq32, qlo, qhi,
            Tk, Tq, stride_lh, scale * LOG2E, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), dq32.stride(0), dq32.stride(1),
            GROUP=G, HEAD_DIM=D, ACCUMULATE=accumulate, FUSED_DQ=c.bwd_fused_dq, PASS=pass_,
            THREE_LOOPS=c.bwd_three_loops, BLOCK_M=bm, BLOCK_N=bn, TMA=tma, WIDE=wide, num_warps=warps,
            num_stages=stages,
        )
    if c.bwd_fused_dq:
        if dq32 is not dq:
            dq.copy_(dq32)
        return
    klo, khi = key_ranges(qr, kr, causal)
    _attn_bwd_dq_kernel[(triton.cdiv(Tq, c.dq_block_m), Hq)](
        q, k, v, do, lse, delta, dq, klo, khi,
        Tq, Hq, scale * LOG2E, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1),
        GROUP=G, HEAD_DIM=D, ACCUMULATE=accumulate, BLOCK_M=c.dq_block_m, BLOCK_N=c.dq_block_n,
        HEAVY_FIRST=c.q_heavy_first, TMA=c.dq_tma and tma_ready(k, v), Tk=Tk, WIDE=wide, num_warps=c.dq_warps,
        num_stages=c.dq_stages,
    )


# --------------------------------------------------------------------------------------------------
# Local block attention (shared by flash_attention and ring_attention)
# --------------------------------------------------------------------------------------------------


def _resolve(backend: str, t: torch.Tensor) -> str:
    """The local kernel for a q [T, H, D]; the Triton kernels tile head_dim as one power-of-two block.
    (flash_attention takes "flash_attn" before this; the ring's blocks need our kernels' partial-merge.)"""
    if backend == "auto":
        backend = "triton" if t.is_cuda and t.dtype in TRITON_DTYPES else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"unknown local attention backend {backend!r}; valid: 'auto', 'triton', 'torch'")
    if backend == "triton":
        check_triton_dtype(t, "q/k/v")
        check_triton_device(t)
    d = t.shape[-1]
    if backend == "triton" and (d < 16 or d > 256 or d & (d - 1)):
        raise ValueError(f"the triton backend needs head_dim a power of two in [16, 256], got {d}; "
                         "use backend='torch'")
    return backend


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    # the kernels take row/head strides but assume a contiguous head_dim (K/V slices of a ring buffer)
    return x if x.stride(-1) == 1 else x.contiguous()


def _softmax_scale(softmax_scale: float | None, head_dim: int) -> float:
    """The scores' scale: softmax_scale, a finite number (NaN or inf gave NaN or zero rows, each backend its
    own), or head_dim**-0.5."""
    if softmax_scale is None:
        return head_dim ** -0.5
    scale = float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale!r}")
    return scale


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"expected q [T,Hq,D], k/v [T,Hkv,D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1] != 0 or q.shape[2] != k.shape[2]:
        raise ValueError(f"GQA needs Hkv >= 1, Hq % Hkv == 0 and equal head_dim; got {tuple(q.shape)} vs "
                         f"{tuple(k.shape)}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k and v must be on one device; got {q.device}, {k.device}, {v.device}")
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise TypeError(f"q, k and v must be floating-point tensors; got {q.dtype}, {k.dtype}, {v.dtype}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int | None, tail: bool = False) -> None:
    """cu_seqlens [B+1] int32/int64: starts at 0, never decreases, ends at `total` (the packed rows; None:
    not checked) — or at most there with `tail` (attention: rows past the end, tail padding, form one more
    document). Checked on the host when cu_seqlens lives there; on a GPU by a device-side assert, which costs
    no host sync (a bad batch then stops the process at the next synchronisation, naming the check)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [B+1]; got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.long()
    ok = (cu[0] == 0) & (cu[1:] >= cu[:-1]).all()
    if total is not None:
        ok &= (cu[-1] <= total) if tail else (cu[-1] == total)
    end = f" and end at {'most at ' if tail else ''}the {total} packed rows" if total is not None else ""
    _require(ok, "cu_seqlens must start at 0, never decrease" + end, cu)


def _require(ok: torch.Tensor, what: str, values: torch.Tensor) -> None:
    """Raise ValueError(what, showing `values`) unless ok, on the host where the tensors live there; on a GPU a
    device-side assert instead, which costs no host sync."""
    if values.device.type == "cpu":
        if not bool(ok):
            shown = values.tolist()
            raise ValueError(f"{what}; got {shown[:12]}{' ...' if len(shown) > 12 else ''}")
    else:
        torch._assert_async(ok, what)


def check_prefix_of(prefix_of: torch.Tensor, num_docs: int) -> None:
    """prefix_of [B] int (document b also sees all of document prefix_of[b]; -1: no prefix). A prefix has no
    prefix itself and its documents follow it immediately, as one run. Checked like check_cu_seqlens: on the host
    where prefix_of lives there, else by a device-side assert (no host sync)."""
    if prefix_of.dim() != 1 or prefix_of.numel() != num_docs or prefix_of.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"prefix_of must be a 1-D int32 tensor [{num_docs}] (one entry per document); got "
                         f"{prefix_of.dtype} {tuple(prefix_of.shape)}")
    p = prefix_of.long()
    b = torch.arange(num_docs, device=p.device)
    has = p >= 0
    ok = ((p >= -1) & (p < b)).all()
    if num_docs:
        ok &= (~has | (p[p.clamp(0, num_docs - 1)] == -1)).all()
        # the run: document b-1 is b's prefix or shares it
        prev = torch.cat([p.new_full((1,), -2), p[:-1]])
        ok &= (~has | (prev == p) | (b - 1 == p)).all()
    _require(ok, "prefix_of must hold -1 or an earlier document without a prefix of its own, the documents of one "
             "prefix following it as one run", p)


def block_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qr: Rows, kr: Rows, *, causal: bool,
                        scale: float, backend: str = "auto", out_dtype: torch.dtype | None = None,
                        out: torch.Tensor | None = None, lse: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query rows qr over key rows kr (global doc/pos bookkeeping) -> (out, lse fp32).

    out has dtype out_dtype (default q.dtype); a row that sees no key gets out 0 and lse -inf.
    Given out [Tq, Hq, D] and lse [Tq, Hq] (both fp32, lse contiguous): they hold a partial attention over
    other keys (lse -inf where none) and this block's is merged into them in place, softmax-weighted through
    the lse (the Triton kernel does it in its epilogue); they are returned.
    """
    _check(q, k, v)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    merge = out is not None or lse is not None
    if merge:
        if out is None or lse is None or out.dtype != torch.float32 or lse.dtype != torch.float32:
            raise ValueError("merging needs both out and lse, fp32")
        if out.shape != q.shape or lse.shape != q.shape[:2] or out.stride(-1) != 1 or not lse.is_contiguous():
            raise ValueError(f"out must be {tuple(q.shape)} with a unit last stride and lse a contiguous "
                             f"{tuple(q.shape[:2])}; got {tuple(out.shape)}, {tuple(lse.shape)}")
        if not k.shape[0]:
            return out, lse
    else:
        out = torch.empty(q.shape, device=q.device, dtype=out_dtype or q.dtype)
        lse = torch.empty(q.shape[:2], device=q.device, dtype=torch.float32)
        if q.shape[0] and not k.shape[0]:
            out.zero_(), lse.fill_(-math.inf)
            return out, lse
    if _resolve(backend, q) == "triton":
        _triton_fwd(q, k, v, qr, kr, causal, scale, out, lse, merge)
    elif merge:
        o_blk, lse_blk = torch.empty_like(out), torch.empty_like(lse)
        _torch_fwd(q, k, v, qr, kr, causal, scale, o_blk, lse_blk)
        _merge_partial(out, lse, o_blk, lse_blk)
    else:
        _torch_fwd(q, k, v, qr, kr, causal, scale, out, lse)
    return out, lse


def _merge_partial(out: torch.Tensor, lse: torch.Tensor, o_blk: torch.Tensor, lse_blk: torch.Tensor) -> None:
    """In place, fp32: (out, lse) <- softmax-weighted combination of two partial attentions."""
    new = torch.logaddexp(lse, lse_blk)
    safe = torch.where(torch.isinf(new), 0.0, new)  # rows that have seen nothing yet: both -inf
    out.mul_(torch.exp(lse - safe)[..., None]).add_(o_blk * torch.exp(lse_blk - safe)[..., None])
    lse.copy_(new)


def attention_delta(out: torch.Tensor, do: torch.Tensor, dlse: torch.Tensor | None = None, *,
                    backend: str = "auto") -> torch.Tensor:
    """delta [T,Hq] fp32 = rowsum(out * dout) - dlse, the row term of the softmax backward."""
    if _resolve(backend, out) == "triton":
        return _triton_delta(out.contiguous(), do.contiguous(), None if dlse is None else dlse.float().contiguous())
    d = torch.einsum("thd,thd->th", out.float(), do.float())
    return d if dlse is None else d - dlse.float()


def block_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: torch.Tensor,
                        delta: torch.Tensor, qr: Rows, kr: Rows, *, causal: bool, scale: float,
                        backend: str = "auto", dq: torch.Tensor | None = None, dk: torch.Tensor | None = None,
                        dv: torch.Tensor | None = None, grad_dtype: torch.dtype = torch.float32
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of one block pair, given the row lse and delta of the *full* attention.

    Because p = exp(s - lse_full) is the exact global softmax restricted to this block, the block
    gradients of a ring simply add up: pass fp32 buffers dq, dk, dv (all three, any strides with a unit
    last stride) and the block's gradients are added into them. Without buffers, fresh gradients are
    returned in grad_dtype (accumulated in fp32 either way).
    """
    q, k, v, do = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(do)
    lse, delta = lse.contiguous(), delta.contiguous()
    accumulate = dq is not None
    if accumulate and (dk is None or dv is None or {dq.dtype, dk.dtype, dv.dtype} != {torch.float32}):
        raise ValueError("pass all three fp32 gradient buffers or none")
    if _resolve(backend, q) == "triton":
        if not accumulate:
            dq = torch.empty(q.shape, device=q.device, dtype=grad_dtype)
            dk = torch.empty(k.shape, device=q.device, dtype=grad_dtype)
            dv = torch.empty(v.shape, device=q.device, dtype=grad_dtype)
        _triton_bwd(do, q, k, v, lse, delta, qr, kr, causal, scale, dq, dk, dv, accumulate)
        return dq, dk, dv
    if accumulate:
        _torch_bwd(do, q, k, v, lse, delta, qr, kr, causal, scale, dq, dk, dv)
        return dq, dk, dv
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dk = torch.zeros(k.shape, device=q.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=q.device, dtype=torch.float32)
    _torch_bwd(do, q, k, v, lse, delta, qr, kr, causal, scale, dq, dk, dv)
    return dq.to(grad_dtype), dk.to(grad_dtype), dv.to(grad_dtype)


# --------------------------------------------------------------------------------------------------
# Autograd + public entry
# --------------------------------------------------------------------------------------------------


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                causal: bool, scale: float, backend: str, prefix_of: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = Rows.from_cu_seqlens(cu_seqlens, q.shape[0])
        if prefix_of is None:
            out, lse = block_attention_fwd(q, k, v, rows, rows, causal=causal, scale=scale, backend=backend)
            ctx.save_for_backward(q, k, v, out, lse, rows.doc, rows.pos)
        else:  # own document, then the prefix merged in through the lse (fp32 until the end)
            out, lse = block_attention_fwd(q, k, v, rows, rows, causal=causal, scale=scale, backend=backend,
                                           out_dtype=torch.float32)
            qx, kx = prefix_rows(rows, cu_seqlens, prefix_of)
            block_attention_fwd(q, k, v, qx, kx, causal=False, scale=scale, backend=backend, out=out, lse=lse)
            out = out.to(q.dtype)
            ctx.save_for_backward(q, k, v, out, lse, rows.doc, rows.pos, qx.doc, qx.pos, kx.doc, kx.pos)
        ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
        return out, lse

    @staticmethod
    @autocast_off
    def backward(ctx: Any, dout: torch.Tensor, dlse: torch.Tensor | None) -> tuple[Any, ...]:
        if ctx.backend == "triton":  # the torch backend's ops build a graph through the saved out and lse
            check_first_backward("flash_attention")
        q, k, v, out, lse, doc, pos, *prefix = ctx.saved_tensors
        rows = Rows(doc, pos)
        if dout is None:
            dout = torch.zeros_like(out)
        delta = attention_delta(out, dout, dlse, backend=ctx.backend)
        if not prefix:
            dq, dk, dv = block_attention_bwd(dout, q, k, v, lse, delta, rows, rows, causal=ctx.causal,
                                             scale=ctx.scale, backend=ctx.backend, grad_dtype=q.dtype)
        else:  # both blocks' gradients, each through the merged lse, add up in fp32
            dq, dk, dv = (torch.zeros(t.shape, device=t.device, dtype=torch.float32) for t in (q, k, v))
            block_attention_bwd(dout, q, k, v, lse, delta, rows, rows, causal=ctx.causal, scale=ctx.scale,
                                backend=ctx.backend, dq=dq, dk=dk, dv=dv)
            block_attention_bwd(dout, q, k, v, lse, delta, Rows(prefix[0], prefix[1]), Rows(prefix[2], prefix[3]),
                                causal=False, scale=ctx.scale, backend=ctx.backend, dq=dq, dk=dk, dv=dv)
            dq = dq.to(q.dtype)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


# flash_attention's backends: ours (triton, torch) and two peers' varlen kernels
BACKENDS = ("auto", "triton", "torch", "flash_attn", "varlen_attn")


def _flash_attn_available(q: torch.Tensor) -> bool:
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _flash_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn import flash_attn_varlen_func

    cu, max_len = varlen_bounds(cu_seqlens, q.shape[0])  # tail rows as one more document, as our kernels treat them
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=causal,
                                         return_attn_probs=True)
    if lse.dim() == 3:  # flash-attn < 2.4 (?): [B, Hq, max_seqlen], padded per document
        lens = (cu[1:] - cu[:-1]).tolist()
        lse = torch.cat([lse[b, :, :n] for b, n in enumerate(lens)], dim=1)
    # flash-attn's lse is [Hq, T] and not differentiable: out is, through flash-attn's own backward
    return out, lse.transpose(0, 1).float().contiguous()


def _varlen_attn_fn() -> Any:
    """torch.nn.attention.varlen.varlen_attn (in every torch golong supports: >= 2.11)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


@functools.cache
def _takes_enable_gqa(fn: Any) -> bool:
    """Whether this torch's varlen_attn has enable_gqa (2.12 on), read once, not at every layer's call."""
    return "enable_gqa" in inspect.signature(fn).parameters


def _varlen_attn_available(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def varlen_bounds(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, int]:
    """(int32 cu_seqlens on its device with the tail rows past cu_seqlens[-1] as one more document, the longest
    document) for the FlashAttention-2 varlen kernels, which take that bound on the host: one sync per call (the
    model's attention pays it per layer, as flash-attn's kernels would; the bench reads it once per batch)."""
    bounds = cu_seqlens.tolist()
    tail = bounds[-1] < total
    bounds += [total] if tail else []
    longest = max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)
    if not tail and cu_seqlens.dtype == torch.int32 and cu_seqlens.is_contiguous():
        return cu_seqlens, longest  # as it is: no copy to the device per call
    return torch.tensor(bounds, dtype=torch.int32, device=cu_seqlens.device), longest


def torch_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
                           causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """flash_attention's contract through PyTorch's varlen_attn (cu, max_len: varlen_bounds): out [T, Hq, D]
    (differentiable w.r.t. q, k, v) and lse [T, Hq] fp32, detached (varlen_attn's backward drops the gradient of its
    lse, so a loss through it would get a silently wrong gradient). torch 2.12 added enable_gqa for Hkv < Hq; 2.11's
    kernel takes GQA as it is."""
    from torch.nn.attention.varlen import AuxRequest

    t, hq, _ = q.shape
    if t == 0:
        return q.new_empty(q.shape), torch.empty(0, hq, dtype=torch.float32, device=q.device)
    fn = _varlen_attn_fn()
    gqa = {"enable_gqa": True} if k.shape[1] != hq and _takes_enable_gqa(fn) else {}
    out, lse = fn(q, k, v, cu, cu, max_len, max_len, return_aux=AuxRequest(lse=True), scale=scale,
                  window_size=(-1, 0) if causal else (-1, -1), **gqa)
    return out, lse.detach().float().transpose(0, 1).contiguous()  # [Hq, T] -> [T, Hq]


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                    causal: bool = True, softmax_scale: float | None = None, backend: str = "auto",
                    prefix_of: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed variable-length attention with GQA.

    q [T, Hq, D], k/v [T, Hkv, D] (Hq % Hkv == 0), cu_seqlens [B+1] int32 (document b is rows
    cu_seqlens[b]:cu_seqlens[b+1]; cu_seqlens[-1] == T, or < T: the tail rows, padding, then attend only each
    other). softmax_scale defaults to D**-0.5.
    Returns out [T, Hq, D] in q.dtype and lse [T, Hq] fp32 (natural-log log-sum-exp of the scaled scores
    of each row). Differentiable w.r.t. q, k, v through out and lse.
    backend: "auto" (triton on CUDA for fp32/fp16/bf16, or varlen_attn for fp16/bf16 where this GPU's tuned
    TritonConfig.auto_backend says so, lse then not differentiable; torch otherwise), "triton", "torch", "flash_attn"
    (flash-attn's varlen kernels) or "varlen_attn" (PyTorch's): those two run on CUDA fp16/bf16 only, fall back
    to triton elsewhere (and flash_attn without the package), and there only out is differentiable, not lse.
    prefix_of [B] int32 (check_prefix_of): document b also attends to all of document prefix_of[b] (-1: none),
    the layout of n responses packed after one copy of their prompt; it runs our kernels ("auto": triton on
    CUDA, torch otherwise), a second block pair merged through the lse, so the two peers' backends refuse it.
    """
    _check(q, k, v)
    if k.shape[0] != q.shape[0] or q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"q, k and v must hold the same packed rows in one dtype; got q {tuple(q.shape)} {q.dtype}, "
                         f"k {tuple(k.shape)} {k.dtype}, v {v.dtype}")
    check_cu_seqlens(cu_seqlens, q.shape[0], tail=True)
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(map(repr, BACKENDS))}")
    scale = _softmax_scale(softmax_scale, q.shape[-1])
    if prefix_of is not None:
        check_prefix_of(prefix_of, cu_seqlens.numel() - 1)
        if backend in ("flash_attn", "varlen_attn"):
            raise ValueError(f"backend {backend!r} cannot attend to shared prefixes (prefix_of); use 'auto', "
                             "'triton' or 'torch'")
        return _FlashAttention.apply(q, k, v, cu_seqlens, causal, scale, _resolve(backend, q), prefix_of)
    if backend == "auto" and _varlen_attn_available(q) and _cfg(q).auto_backend == "varlen_attn":
        backend = "varlen_attn"  # measured faster on this GPU (TritonConfig.auto_backend)
    if backend == "flash_attn":
        if _flash_attn_available(q):
            return _flash_attn_varlen(q, k, v, cu_seqlens, causal, scale)
        backend = "triton"
    if backend == "varlen_attn":
        if _varlen_attn_available(q):
            return torch_varlen_attention(q, k, v, *varlen_bounds(cu_seqlens, q.shape[0]), causal, scale)
        backend = "triton"
    return _FlashAttention.apply(q, k, v, cu_seqlens, causal, scale, _resolve(backend, q), None)


# Production configurations for the AOT sm_90 compile test (head_dim 128, bf16, GQA 32/8; the ring's
# fp32 gradient buffers, which is the larger-register variant of the backward kernels).
def _i32(*names: str) -> dict[str, str]:
    return dict.fromkeys(names, "i32")


def _aligned(*names: str) -> list[str]:
    # what the JIT specialises at run time: torch allocations are 16-byte aligned, and with head_dim 128
    # every row/head stride of q/k/v (also of slices of a fused qkv or of the ring's [n, 2*Hkv, D]
    # buffer) is a multiple of 16 elements
    return [*names, "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh"]


_STRIDES_QKV = _i32("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh")


def aot_configs(c: TritonConfig = CONFIG, *, wide: bool = False) -> list[dict[str, Any]]:
    """The kernels.aot descriptions of the kernels that configuration c launches (with bwd_fused_dq, no dQ kernel);
    wide: their WIDE (int64 offset) forms, names ending in _wide, as inputs spanning 2**31 elements launch them."""
    dkdv = [
        {
            "name": "attn_bwd_dkdv" + suffix,
            "fn": _attn_bwd_dkdv_kernel,
            "signature": {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "LSE2": "*fp32", "DELTA": "*fp32",
                          "DK": "*fp32", "DV": "*fp32", "DQ": "*fp32", "Q_LO": "*i32", "Q_HI": "*i32", "Tk": "i32",
                          "Tq": "i32", "stride_lh": "i32", "qk_scale": "fp32", "sm_scale": "fp32", **_STRIDES_QKV,
                          **_i32("stride_dot", "stride_doh", "stride_dkt", "stride_dkh", "stride_dvt", "stride_dvh",
                                 "stride_dqt", "stride_dqh")},
            "constexprs": {"GROUP": 4, "HEAD_DIM": 128, "ACCUMULATE": True, "FUSED_DQ": c.bwd_fused_dq,
                           "PASS": pass_, "THREE_LOOPS": c.bwd_three_loops, "BLOCK_M": bm, "BLOCK_N": bn,
                           "TMA": c.bwd_tma, "WIDE": False},
            "num_warps": warps,
            "num_stages": stages,
            "divisible_by_16": _aligned("Q", "K", "V", "DO", "LSE2", "DELTA", "DK", "DV", "DQ", "Q_LO", "Q_HI",
                                        "Tq", "stride_lh", "stride_dot", "stride_doh", "stride_dkt", "stride_dkh",
                                        "stride_dvt", "stride_dvh", "stride_dqt", "stride_dqh"),
        }
        for pass_, suffix, bm, bn, warps, stages in c.dkdv_launches()
    ]
    def fwd(name: str, out: str, merge: bool, stages: int) -> dict[str, Any]:
        return {
            "name": name,
            "fn": _attn_fwd_kernel,
            "signature": {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": out, "LSE": "*fp32", "KV_LO": "*i32",
                          "KV_HI": "*i32", "Tq": "i32", "qk_scale": "fp32", **_STRIDES_QKV,
                          **_i32("stride_ot", "stride_oh", "stride_lt", "Tk")},
            "constexprs": {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_M": c.fwd_block_m, "BLOCK_N": c.fwd_block_n,
                           "HEAVY_FIRST": c.q_heavy_first, "MERGE": merge, "TMA": c.fwd_tma, "WIDE": False},
            "num_warps": c.fwd_warps,
            "num_stages": stages,
            "divisible_by_16": _aligned("Q", "K", "V", "O", "LSE", "KV_LO", "KV_HI", "stride_ot", "stride_oh"),
        }

    configs = [
        fwd("attn_fwd", "*bf16", False, c.fwd_stages),
        # a ring step's forward: merges into the fp32 partial output (MERGE epilogue)
        fwd("attn_fwd_ring", "*fp32", True, c.merge_fwd_stages),
        # shared prompts: the own-document block writes fp32 for the prefix block to merge into
        fwd("attn_fwd_prefix", "*fp32", False, c.fwd_stages),
        {
            "name": "attn_bwd_dq",
            "fn": _attn_bwd_dq_kernel,
            "signature": {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "LSE": "*fp32", "DELTA": "*fp32",
                          "DQ": "*fp32", "KV_LO": "*i32", "KV_HI": "*i32", "Tq": "i32", "Hq": "i32",
                          "qk_scale": "fp32", "sm_scale": "fp32", **_STRIDES_QKV,
                          **_i32("stride_dot", "stride_doh", "stride_dqt", "stride_dqh", "Tk")},
            "constexprs": {"GROUP": 4, "HEAD_DIM": 128, "ACCUMULATE": True, "BLOCK_M": c.dq_block_m,
                           "BLOCK_N": c.dq_block_n, "HEAVY_FIRST": c.q_heavy_first, "TMA": c.dq_tma,
                           "WIDE": False},
            "num_warps": c.dq_warps,
            "num_stages": c.dq_stages,
            "divisible_by_16": _aligned("Q", "K", "V", "DO", "LSE", "DELTA", "DQ", "KV_LO", "KV_HI", "stride_dot",
                                        "stride_doh", "stride_dqt", "stride_dqh"),
        },
        {
            "name": "attn_bwd_preprocess",
            "fn": _attn_bwd_preprocess_kernel,
            "signature": {"O": "*bf16", "DO": "*bf16", "DLSE": "*fp32", "DELTA": "*fp32", "Tq": "i32", "H": "i32",
                          **_i32("stride_ot", "stride_oh", "stride_dot", "stride_doh")},
            "constexprs": {"HAS_DLSE": False, "HEAD_DIM": 128, "BLOCK_M": c.pre_block_m, "WIDE": False},
            "num_warps": 4,
            "num_stages": 1,
            "divisible_by_16": ["O", "DO", "DLSE", "DELTA", "stride_ot", "stride_oh", "stride_dot", "stride_doh"],
        },
    ]
    configs[1:1] = dkdv
    configs = [x for x in configs if not (c.bwd_fused_dq and x["name"] == "attn_bwd_dq")]
    if wide:  # strides past 2**31 arrive as i64 (the JIT types them by value); smaller ones are cast in the kernel
        configs = [{**x, "name": x["name"] + "_wide", "constexprs": {**x["constexprs"], "WIDE": True},
                    "signature": {k: "i64" if k.startswith("stride_") and t == "i32" else t
                                  for k, t in x["signature"].items()}} for x in configs]
    return configs


AOT_CONFIGS: list[dict[str, Any]] = aot_configs(CONFIG)
