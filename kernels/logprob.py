"""Fused LM-head log-probability and entropy: `linear_logprob_entropy`.

For hidden states h [N, H], the LM-head weight W [V, H] and sampled tokens t [N]:

    z        = h @ W.T / T                      (never materialised as [N, V])
    logprob  = z[t] - logsumexp(z)              [N] fp32
    entropy  = -(p * log p).sum(-1), p = softmax(z)   [N] fp32

Both outputs are differentiable w.r.t. h and W. With upstream grads g_lp, g_ent the logit grad is

    dz = (g_lp * (onehot(t) - p) - g_ent * p * (log p + entropy)) / T

and dh = dz @ W, dW = dz.T @ h. Rows whose target equals `ignore_index` give 0 and no gradient.

Both backends stream over vocabulary tiles with an online merge of (max m, s = sum exp(z - m),
a = sum exp(z - m) * (z - m)) in fp32, so that lse = m + log s and entropy = log s - a / s. The
shifted form of a avoids the cancellation of `lse - E[z]` when logits share a large offset.

Backends: "torch" chunks over tokens and vocab (CPU path and test oracle; memory independent of
N); "triton" runs the kernels below (forward: tiles over tokens x vocab splits, partials merged
on the host; backward: the logits are recomputed tile by tile, dz is built in registers and
consumed at once by tensor-core dots for dh and dW, accumulated in fp32 with atomics, or by
owner-computes kernels in deterministic mode; or, with FWD_MODE / BWD_MODE = "gemm", as cuBLAS
GEMMs over [GEMM_ROWS, GEMM_COLS] fp32 logits blocks with a Triton pass that turns each block into
row statistics / dz). "auto" = triton on CUDA tensors, torch otherwise.
Tiles whose rows are all ignored (or carry no gradient) are skipped, so prompt tokens of packed
RL sequences cost nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from kernels.dtypes import TRITON_DTYPES, autocast_off, check_triton_device, check_triton_dtype

__all__ = ["linear_logprob_entropy", "linear_logprob_entropy_reference", "AOT_CONFIGS"]

# torch backend tiles: one fp32 [TOKEN_CHUNK, VOCAB_CHUNK] tile is 32 MiB; a handful are live at once.
TOKEN_CHUNK = 1024
VOCAB_CHUNK = 8192

# Large finite stand-in for -inf as the running max, so the rescale factors never compute inf - inf.
_NEG_BIG = -1.0e30


# --------------------------------------------------------------------------------------------------
# torch backend (chunked, fp32 accumulation)
# --------------------------------------------------------------------------------------------------


def _torch_forward(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_t: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns logprob, entropy, lse, each [N] fp32 (ignored rows: logprob = entropy = 0)."""
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    logprob = torch.zeros(n, dtype=torch.float32, device=dev)
    entropy = torch.zeros(n, dtype=torch.float32, device=dev)
    lse_out = torch.zeros(n, dtype=torch.float32, device=dev)
    for n0 in range(0, n, TOKEN_CHUNK):
        n1 = min(n, n0 + TOKEN_CHUNK)
        tc = targets[n0:n1]
        valid = tc != ignore_index
        if not valid.any():  # e.g. prompt tokens of packed sequences
            continue
        hc = hidden[n0:n1].float() * inv_t  # z = (h / T) @ W.T: the temperature costs no pass over [n, V]
        m = torch.full((n1 - n0,), _NEG_BIG, dtype=torch.float32, device=dev)
        s = torch.zeros_like(m)
        a = torch.zeros_like(m)
        zt = torch.zeros_like(m)
        for v0 in range(0, v, VOCAB_CHUNK):
            v1 = min(v, v0 + VOCAB_CHUNK)
            z = hc @ weight[v0:v1].float().T
            m_new = torch.maximum(m, z.amax(dim=1))
            # old terms re-based from m to m_new: a' = scale * (a + (m - m_new) * s)
            scale = torch.exp(m - m_new)
            a = scale * (a + (m - m_new) * s)
            z.sub_(m_new[:, None])  # z is now z - m_new
            e = torch.exp(z)
            s = scale * s + e.sum(dim=1)
            a = a + torch.einsum("ij,ij->i", e, z)  # batched dot: no [n, V] temporary
            m = m_new
            inside = (tc >= v0) & (tc < v1)
            if inside.any():
                rows = inside.nonzero().squeeze(1)
                zt[rows] = z[rows, tc[rows] - v0] + m_new[rows]
            del z, e
        lse = m + torch.log(s)
        logprob[n0:n1] = torch.where(valid, zt - lse, 0.0)
        entropy[n0:n1] = torch.where(valid, torch.log(s) - a / s, 0.0)
        lse_out[n0:n1] = lse
    return logprob, entropy, lse_out


def _torch_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    g_lp: torch.Tensor,
    g_ent: torch.Tensor,
    inv_t: float,
    need_dh: bool,
    need_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dh [N, H] in hidden's dtype, dW [V, H] in weight's dtype; fp32 accumulation.

    g_lp, g_ent are fp32 [N] with ignored rows already zeroed. Tokens are the outer loop, so the
    only buffers are one token chunk's dh and the fp32 dW accumulator (independent of N).
    """
    n, v = hidden.shape[0], weight.shape[0]
    dh = torch.zeros_like(hidden) if need_dh else None
    if need_dw:
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for n0 in range(0, n, TOKEN_CHUNK):
        n1 = min(n, n0 + TOKEN_CHUNK)
        glc, gec = g_lp[n0:n1, None], g_ent[n0:n1, None]
        if not (glc.any() or gec.any()):  # no gradient flows through these rows
            continue
        hc = hidden[n0:n1].float()
        hcs = hc * inv_t
        tc = targets[n0:n1]
        neg_lse = -lse[n0:n1, None]
        # dz = p * (alpha * log p + beta) + g_lp / T * onehot, with per-row
        # alpha = -g_ent / T and beta = -(g_lp + g_ent * H) / T
        alpha = -gec * inv_t
        beta = -(glc + gec * entropy[n0:n1, None]) * inv_t
        # rows without gradient may carry a placeholder lse (skipped in the forward): zero them explicitly
        dead = ((glc == 0) & (gec == 0)).squeeze(1)
        dead = dead if dead.any() else None
        # an ignored row's hidden state may be anything (inf included): 0 * inf would spoil dW
        hc_dw = hc if dead is None or not need_dw else hc.masked_fill(dead[:, None], 0.0)
        dhc = torch.zeros_like(hc) if need_dh else None
        for v0 in range(0, v, VOCAB_CHUNK):
            v1 = min(v, v0 + VOCAB_CHUNK)
            wc = weight[v0:v1].float()
            logp = torch.addmm(neg_lse, hcs, wc.T)  # log p = z - lse
            p = torch.exp(logp)
            dz = torch.addcmul(beta, logp, alpha, out=logp).mul_(p)
            del p
            if dead is not None:
                dz[dead] = 0.0
            inside = (tc >= v0) & (tc < v1)
            if inside.any():
                rows = inside.nonzero().squeeze(1)
                dz[rows, tc[rows] - v0] += glc[rows, 0] * inv_t
            if need_dh:
                dhc.addmm_(dz, wc)
            if need_dw:
                dw[v0:v1].addmm_(dz.T, hc_dw)
            del dz, logp
        if need_dh:
            dh[n0:n1] = dhc
    return dh, (dw.to(weight.dtype) if need_dw else None)


def linear_logprob_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
    *, ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive materialised-logits reference (autograd through torch ops). Small shapes only.

    Computes in the dtype of `hidden` (pass fp64 tensors for an oracle).
    """
    logits = hidden @ weight.T / temperature
    logp = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    lp = logp.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1)
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    return torch.where(valid, lp, zero), torch.where(valid, ent, zero)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(h_ptrs, w_ptrs, row_ok, col_ok, H,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """h[rows] @ W[cols].T as a [BLOCK_M, BLOCK_N] fp32 tile (padded rows/cols read as 0)."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, H, BLOCK_K):
        k_ok = (k + rk) < H
        hk = tl.load(h_ptrs + k, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wk = tl.load(w_ptrs + k, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(hk, tl.trans(wk), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _merge_tile(acc, cols, col_ok, tgt, inv_t, m_i, s_i, a_i, zt):
    """Online merge of one tile of raw logits acc [R, C] (finite on every row) into the running row
    statistics m (max of z = acc / T), s = sum exp(z - m), a = sum exp(z - m) (z - m) and the target logit."""
    z = tl.where(col_ok[None, :], acc * inv_t, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(z, axis=1))
    scale = tl.exp(m_i - m_new)
    zs = z - m_new[:, None]
    e = tl.exp(zs)  # 0 on padded columns
    a_i = scale * (a_i + (m_i - m_new) * s_i) + tl.sum(e * tl.where(col_ok[None, :], zs, 0.0), axis=1)
    s_i = scale * s_i + tl.sum(e, axis=1)
    # col_ok: a block's padded columns may carry the id of the next block's target
    zt += tl.sum(tl.where((cols[None, :] == tgt[:, None]) & col_ok[None, :], z, 0.0), axis=1)
    return m_new, s_i, a_i, zt


@triton.jit
def _stats_block_kernel(
    z_ptr, tgt_ptr, m_ptr, s_ptr, a_ptr, zt_ptr, R, C, stride_z, c_off, inv_t,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """GEMM forward: merges one block of raw logits z = h @ W.T (fp32 [R, C], token ids c_off + [0, C))
    into the running row statistics (fp32 [R] each; m starts at -1e30, the others at 0). One program owns
    BLOCK_R rows across the whole block, so no two programs touch the same row."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1) - c_off
    m_i = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
    s_i = tl.load(s_ptr + rows, mask=row_ok, other=0.0)
    a_i = tl.load(a_ptr + rows, mask=row_ok, other=0.0)
    zt = tl.load(zt_ptr + rows, mask=row_ok, other=0.0)
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_z
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        acc = tl.load(z_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        m_i, s_i, a_i, zt = _merge_tile(acc, cols, col_ok, tgt, inv_t, m_i, s_i, a_i, zt)
    tl.store(m_ptr + rows, m_i, mask=row_ok)
    tl.store(s_ptr + rows, s_i, mask=row_ok)
    tl.store(a_ptr + rows, a_i, mask=row_ok)
    tl.store(zt_ptr + rows, zt, mask=row_ok)


@triton.jit
def _fwd_kernel(
    h_ptr, w_ptr, tgt_ptr, pm_ptr, ps_ptr, pa_ptr, pzt_ptr,
    N, V, H, stride_h, stride_w, inv_t, ignore_index, tiles_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: BLOCK_M tokens x one split of the vocabulary (tiles_per_split tiles of BLOCK_N).

    Writes per-(split, row) partials m, s = sum exp(z - m), a = sum exp(z - m) (z - m) and the
    target logit (0 if the target is outside the split) to [S, N] fp32 buffers.
    """
    pid_m = tl.program_id(0)  # fastest: concurrent programs share the same W tiles in L2
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=ignore_index)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    s_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    a_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    zt = tl.zeros([BLOCK_M], dtype=tl.float32)
    # a tile whose rows are all ignored (prompt tokens of packed sequences) does no work
    if tl.max((tgt != ignore_index).to(tl.int32), axis=0) > 0:
        rk = tl.arange(0, BLOCK_K)
        h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + rk[None, :]
        v_begin = pid_s * tiles_per_split * BLOCK_N
        n_tiles = tl.minimum(tiles_per_split, tl.cdiv(V - v_begin, BLOCK_N))
        for j in range(0, n_tiles):
            cols = v_begin + j * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < V
            w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_w + rk[None, :]
            acc = _logits_tile(h_ptrs, w_ptrs, row_ok, col_ok, H, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            m_i, s_i, a_i, zt = _merge_tile(acc, cols, col_ok, tgt, inv_t, m_i, s_i, a_i, zt)
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        s_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    off = pid_s * N + rows
    tl.store(pm_ptr + off, m_i, mask=row_ok)
    tl.store(ps_ptr + off, s_i, mask=row_ok)
    tl.store(pa_ptr + off, a_i, mask=row_ok)
    tl.store(pzt_ptr + off, zt, mask=row_ok)


@triton.jit
def _dlogits_tile(acc, cols, row_ok, col_ok, tgt, lse, ent, glp, gent, inv_t):
    """dz = (g_lp (onehot - p) - g_ent p (log p + H)) / T for one tile; 0 outside rows row_ok x cols col_ok."""
    logp = tl.where(row_ok[:, None], acc * inv_t - lse[:, None], 0.0)  # dead rows: no exp overflow
    p = tl.exp(logp)
    dz = -p * (glp[:, None] + gent[:, None] * (logp + ent[:, None]))
    dz += tl.where(cols[None, :] == tgt[:, None], glp[:, None], 0.0)
    return tl.where(row_ok[:, None] & col_ok[None, :], dz * inv_t, 0.0)


@triton.jit
def _dz_block_kernel(
    z_ptr, dz_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr,
    R, C, stride_z, stride_dz, c_off, inv_t,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """GEMM backward: dz (in dz_ptr's dtype) from one block of raw logits z = h @ W.T (fp32 [R, C]);
    the block's columns are token ids c_off + [0, C)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < R
    col_ok = cols < C
    glp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    gent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
    live = row_ok & ((glp != 0) | (gent != 0))  # see _bwd_kernel: placeholder lse on dead rows
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1) - c_off
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    r64 = rows.to(tl.int64)[:, None]
    mask = row_ok[:, None] & col_ok[None, :]
    z = tl.load(z_ptr + r64 * stride_z + cols[None, :], mask=mask, other=0.0)
    dz = _dlogits_tile(z, cols, live, col_ok, tgt, lse, ent, glp, gent, inv_t)
    tl.store(dz_ptr + r64 * stride_dz + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(
    h_ptr, w_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dh_ptr, dw_ptr,
    N, V, H, stride_h, stride_w, stride_dh, stride_dw, inv_t, v_off,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_M: tl.constexpr, COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: one (token tile, vocab tile). Recomputes the logits (BLOCK_K-wide K loop),
    builds dz in registers and adds dz @ W[cols] into dh[rows] and dz.T @ h[rows] into dW[cols]
    (fp32 atomics), BLOCK_H columns of H at a time. W may be a slice of the vocabulary starting at
    token id v_off."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    num_v = tl.cdiv(V, BLOCK_N)
    # grouped order: GROUP_M token tiles sweep the vocabulary together, so h and dh rows stay in L2
    per_group = GROUP_M * num_v
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_v * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    col_ok = cols < V
    glp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    gent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
    # rows without gradient get dz = 0 explicitly: their saved lse may be a placeholder (skipped in
    # the forward) and exp(z - lse) * 0 must not become inf * 0. Loads keep the plain bounds mask,
    # whose structure the compiler needs to pipeline them.
    live = row_ok & ((glp != 0) | (gent != 0))
    # rows without gradient (ignored, or unused outputs) do no work
    if tl.max(tl.abs(glp) + tl.abs(gent), axis=0) > 0:
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1) - v_off
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        rk = tl.arange(0, BLOCK_K)
        acc = _logits_tile(h_ptr + rows.to(tl.int64)[:, None] * stride_h + rk[None, :],
                           w_ptr + cols.to(tl.int64)[:, None] * stride_w + rk[None, :],
                           row_ok, col_ok, H, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        dz = _dlogits_tile(acc, cols, live, col_ok, tgt, lse, ent, glp, gent, inv_t)
        dzc = dz.to(h_ptr.dtype.element_ty)
        dzt = tl.trans(dzc)
        rh = tl.arange(0, BLOCK_H)
        h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + rh[None, :]
        w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_w + rh[None, :]
        dh_ptrs = dh_ptr + rows.to(tl.int64)[:, None] * stride_dh + rh[None, :]
        dw_ptrs = dw_ptr + cols.to(tl.int64)[:, None] * stride_dw + rh[None, :]
        for k in range(0, H, BLOCK_H):
            k_ok = (k + rh) < H
            if COMPUTE_DH:
                wk = tl.load(w_ptrs + k, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                dh_part = tl.dot(dzc, wk, input_precision=PRECISION)
                tl.atomic_add(dh_ptrs + k, dh_part, mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
            if COMPUTE_DW:
                hk = tl.load(h_ptrs + k, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                hk = tl.where(live[:, None], hk, 0.0)  # an ignored row's h may be inf: 0 * inf in dW
                dw_part = tl.dot(dzt, hk, input_precision=PRECISION)
                tl.atomic_add(dw_ptrs + k, dw_part, mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")


@triton.jit
def _bwd_dh_kernel(
    h_ptr, w_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dh_ptr,
    N, V, H, stride_h, stride_w, stride_dh, inv_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Deterministic dh: one program owns BLOCK_M rows of dh (fp32) and sweeps the vocabulary in
    order, adding dz @ W[cols] into its rows; no other program writes them."""
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    glp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    gent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
    # rows without gradient get dz = 0 explicitly: their saved lse may be a placeholder (skipped in
    # the forward) and exp(z - lse) * 0 must not become inf * 0. Loads keep the plain bounds mask,
    # whose structure the compiler needs to pipeline them.
    live = row_ok & ((glp != 0) | (gent != 0))
    if tl.max(tl.abs(glp) + tl.abs(gent), axis=0) > 0:
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        rk = tl.arange(0, BLOCK_K)
        rh = tl.arange(0, BLOCK_H)
        h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + rk[None, :]
        dh_ptrs = dh_ptr + rows.to(tl.int64)[:, None] * stride_dh + rh[None, :]
        for v0 in range(0, V, BLOCK_N):
            cols = v0 + tl.arange(0, BLOCK_N)
            col_ok = cols < V
            w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
            acc = _logits_tile(h_ptrs, w_rows + rk[None, :], row_ok, col_ok, H, BLOCK_M, BLOCK_N, BLOCK_K,
                               PRECISION)
            dz = _dlogits_tile(acc, cols, live, col_ok, tgt, lse, ent, glp, gent, inv_t)
            dzc = dz.to(h_ptr.dtype.element_ty)
            for k in range(0, H, BLOCK_H):
                k_ok = (k + rh) < H
                wk = tl.load(w_rows + rh[None, :] + k, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                mask = row_ok[:, None] & k_ok[None, :]
                cur = tl.load(dh_ptrs + k, mask=mask, other=0.0)
                tl.store(dh_ptrs + k, cur + tl.dot(dzc, wk, input_precision=PRECISION), mask=mask)
            # the next sweep re-reads these rows, maybe from other threads: order global writes first
            tl.debug_barrier()


@triton.jit
def _bwd_dw_kernel(
    h_ptr, w_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dw_ptr,
    N, V, H, stride_h, stride_w, stride_dw, inv_t, v_off,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Deterministic dW: one program owns BLOCK_N rows of dW (fp32) and sweeps the tokens in order,
    adding dz.T @ h[rows] into its rows; no other program writes them. W may be a slice of the
    vocabulary starting at token id v_off."""
    pid_v = tl.program_id(0)
    cols = pid_v * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < V
    rk = tl.arange(0, BLOCK_K)
    rh = tl.arange(0, BLOCK_H)
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_w + rk[None, :]
    dw_ptrs = dw_ptr + cols.to(tl.int64)[:, None] * stride_dw + rh[None, :]
    for n0 in range(0, N, BLOCK_M):
        rows = n0 + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        glp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
        gent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        live = row_ok & ((glp != 0) | (gent != 0))  # as in _bwd_kernel
        if tl.max(tl.abs(glp) + tl.abs(gent), axis=0) > 0:
            tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1) - v_off
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
            ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
            h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
            acc = _logits_tile(h_rows + rk[None, :], w_ptrs, row_ok, col_ok, H, BLOCK_M, BLOCK_N, BLOCK_K,
                               PRECISION)
            dz = _dlogits_tile(acc, cols, live, col_ok, tgt, lse, ent, glp, gent, inv_t)
            dzt = tl.trans(dz.to(h_ptr.dtype.element_ty))
            for k in range(0, H, BLOCK_H):
                k_ok = (k + rh) < H
                hk = tl.load(h_rows + rh[None, :] + k, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                hk = tl.where(live[:, None], hk, 0.0)  # as in _bwd_kernel
                mask = col_ok[:, None] & k_ok[None, :]
                cur = tl.load(dw_ptrs + k, mask=mask, other=0.0)
                tl.store(dw_ptrs + k, cur + tl.dot(dzt, hk, input_precision=PRECISION), mask=mask)
            tl.debug_barrier()


# --------------------------------------------------------------------------------------------------
# Triton launchers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Block configuration of one kernel (the production one is compiled for sm_90 in tests)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    block_h: int = 64  # backward: width of the H slices of dh / dW one dot produces
    group_m: int = 1


FWD_CONFIG = KernelConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=4)
BWD_CONFIG = KernelConfig(block_m=128, block_n=128, block_k=32, num_warps=8, num_stages=3, block_h=64, group_m=8)
BWD_DET_CONFIG = KernelConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
# Layouts of the "triton" backend (deterministic=False; deterministic=True always takes the Triton kernels):
#   FWD_MODE "triton": fused tiles, logits consumed in registers by an online softmax (_fwd_kernel)
#            "gemm":   cuBLAS fp32 logits blocks -> Triton row statistics (_stats_block_kernel)
#   BWD_MODE "atomic": Triton tiles recompute the logits and consume dz at once with tensor-core dots, fp32
#                      atomics into dh / dW (see _triton_backward)
#            "gemm":   cuBLAS blocks: logits block -> dz block (Triton, 16-bit) -> dh and dW GEMMs accumulated
#                      in fp32, no atomics; one pass when the rows with gradient fit one block of GEMM_ROWS,
#                      else a dh pass and a dW pass (see _gemm_backward)
# H200, N=8192, H=2560, bf16, fwd+bwd (bench/logprob_configs.py, commit 68fad31): GEMM forward + one-pass GEMM
# backward 47.6 ms (401 TFLOP/s counting 6NHV); fused forward + GEMM backward 50.8; fused forward + atomic split
# backward 122.7. Forward alone: GEMM blocks 13.1 ms (486 TFLOP/s) vs fused kernel 16.1 (396); on a prompt-heavy
# RL batch (32K tokens, 512 targets per 4096) 6.7 vs 12.8 ms, since the GEMM forward only computes live rows.
FWD_MODE = "gemm"
BWD_MODE = "gemm"
# One logits block of the GEMM layouts: GEMM_ROWS tokens x GEMM_COLS vocabulary rows (fp32 block + 16-bit dz
# block: 96 MiB at 8192 x 2048); the backward keeps an fp32 dh accumulator of GEMM_ROWS x H (80 MiB at H 2560).
GEMM_ROWS = 8192
GEMM_COLS = 2048
# With fewer rows in play than GEMM_ROWS (an RL batch: gradient on the response tokens only), blocks widen to
# keep GEMM_ROWS x GEMM_COLS elements, up to GEMM_COLS_MAX: wider GEMMs, fewer fp32 dh accumulations. H200, 32K
# tokens with 4096 live rows (run 6): 4096 columns 23.4 ms vs 24.4 ms at 2048, 157 MiB extra vs 109 MiB.
GEMM_COLS_MAX = 8192
STATS_TILE = (4, 512)  # (rows, columns) per loop step of the forward's row-statistics kernel, 4 warps; H200: forward
# 12.5 vs 13.8 ms at N 8K with (16, 256), whose 168 registers per thread allowed 3 programs per SM (now 72: 7)
DZ_TILE = (32, 128)  # (rows, columns) per program of the elementwise dz kernel: 16 fp32 per thread, 4 warps
# One-pass backward: vocabulary blocks whose dz feed one dh GEMM (K = DH_GROUP x block columns). The H200 profile
# (run 7, N 8K) had the dh GEMMs at 11.0 ms against 8.6 for the same-size logits GEMMs: each of the 75 reads and
# writes the fp32 [GEMM_ROWS, H] accumulator (168 MB); 2 halves that traffic for one more dz block (32 MiB).
DH_GROUP = 1
# Backward fp32 scratch budget for 16-bit gradients (bounds the extra memory at any N; see _triton_backward)
SCRATCH_BYTES = 192 * 1024 * 1024


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs must stay fp32 (tf32 would cost ~1e-3 relative error); 16-bit inputs ignore this
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, so CPU tests still exercise several vocabulary splits


def _triton_forward(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_t: float, ignore_index: int,
    cfg: KernelConfig | None = None, splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_triton_device(hidden)
    cfg = cfg or FWD_CONFIG
    n, hdim = hidden.shape
    v = weight.shape[0]
    num_m, num_vt = triton.cdiv(n, cfg.block_m), triton.cdiv(v, cfg.block_n)
    if splits is None:
        # split the vocabulary only as much as needed to fill the GPU twice over
        splits = max(1, min(num_vt, triton.cdiv(2 * _num_sms(hidden.device), max(num_m, 1))))
    tiles_per_split = triton.cdiv(num_vt, splits)
    splits = triton.cdiv(num_vt, tiles_per_split)
    # NaN-filled: a (row, split) the kernel failed to write would poison the result, not hide
    parts = torch.full((4, splits, n), float("nan"), dtype=torch.float32, device=hidden.device)
    if n > 0:
        _fwd_kernel[(num_m, splits)](
            hidden, weight, targets, parts[0], parts[1], parts[2], parts[3],
            n, v, hdim, hidden.stride(0), weight.stride(0), inv_t, ignore_index, tiles_per_split,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=_precision(hidden.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    pm, ps, pa, pzt = parts.unbind(0)
    m = pm.amax(dim=0)
    scale = torch.exp(pm - m)
    s = (scale * ps).sum(dim=0)
    a = (scale * (pa + (pm - m) * ps)).sum(dim=0)
    lse = m + torch.log(s)
    valid = targets != ignore_index
    logprob = torch.where(valid, pzt.sum(dim=0) - lse, 0.0)
    entropy = torch.where(valid, torch.log(s) - a / s, 0.0)
    return logprob, entropy, lse


def _triton_backward(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
    entropy: torch.Tensor, g_lp: torch.Tensor, g_ent: torch.Tensor, inv_t: float,
    need_dh: bool, need_dw: bool, deterministic: bool, cfg: KernelConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dh [N, H] (hidden's dtype), dW [V, H] (weight's dtype), both accumulated in fp32.

    fp32 gradients are accumulated in place. A 16-bit gradient goes through an fp32 scratch of at
    most SCRATCH_BYTES: a chunk of tokens (dh) or of vocabulary rows (dW), then cast.
      fused (default when both grads are wanted and dW's fp32 accumulator fits the budget, e.g.
        fp32 weight): one pass, one logits recompute, atomics into dh and dW (~6 N H V flops).
      split (16-bit weight too large, or only one grad wanted): a dh pass over token chunks and a
        dW pass over vocabulary chunks, each recomputing the logits (~8 N H V flops).
      deterministic: split, with owner-computes kernels instead of atomics.
    """
    check_triton_device(hidden)
    cfg = cfg or (BWD_DET_CONFIG if deterministic else BWD_CONFIG)
    n, hdim = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    dh = (torch.zeros_like(hidden) if hidden.dtype == torch.float32 else torch.empty_like(hidden)) if need_dh else None
    dw = (torch.zeros_like(weight) if weight.dtype == torch.float32 else torch.empty_like(weight)) if need_dw else None
    if n == 0 or (not need_dh and not need_dw):
        return (dh.zero_() if need_dh else None), (dw.zero_() if need_dw else None)
    # rows of fp32 scratch the budget allows (a multiple of both tile heights)
    scratch_rows = max(256, SCRATCH_BYTES // (4 * hdim) // 256 * 256)
    launch = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_H=cfg.block_h,
                  PRECISION=_precision(hidden.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    rows = (hidden, targets, lse, entropy, g_lp, g_ent)

    def chunks(total: int, fp32_out: bool):
        step = total if fp32_out else scratch_rows
        return [(i, min(total, i + step)) for i in range(0, total, step)]

    # fp32 scratch buffers by slot, reused by every chunk (the split passes share one): a fresh tensor per
    # chunk would be allocated while the previous chunk's is still referenced, doubling the peak. A slot's
    # first chunk is its largest (chunks only shrink at the end), so its first allocation fits them all.
    bufs: dict[str, torch.Tensor] = {}

    def scratch(out: torch.Tensor, r0: int, r1: int, slot: str) -> torch.Tensor:
        if out.dtype == torch.float32:
            return out[r0:r1]
        if slot not in bufs:
            bufs[slot] = torch.empty(r1 - r0, hdim, dtype=torch.float32, device=dev)
        return bufs[slot][: r1 - r0].zero_()

    fused = (not deterministic and need_dh and need_dw
             and (weight.dtype == torch.float32 or v * hdim * 4 <= SCRATCH_BYTES))
    if fused:
        dw32 = scratch(dw, 0, v, "dw")
        for n0, n1 in chunks(n, hidden.dtype == torch.float32):
            dh32 = scratch(dh, n0, n1, "dh")
            h, t, ls, en, gl, ge = (x[n0:n1] for x in rows)
            grid = (triton.cdiv(n1 - n0, cfg.block_m) * triton.cdiv(v, cfg.block_n),)
            _bwd_kernel[grid](h, weight, t, ls, en, gl, ge, dh32, dw32, n1 - n0, v, hdim, h.stride(0),
                              weight.stride(0), dh32.stride(0), dw32.stride(0), inv_t, 0, GROUP_M=cfg.group_m,
                              COMPUTE_DH=True, COMPUTE_DW=True, **launch)
            if dh32.data_ptr() != dh[n0:n1].data_ptr():
                dh[n0:n1] = dh32
        if dw32.data_ptr() != dw.data_ptr():
            dw.copy_(dw32)
        return dh, dw

    # size the shared buffer for both passes up front, so the dW pass never reallocates it
    split_rows = max(min(n, scratch_rows) if need_dh and hidden.dtype != torch.float32 else 0,
                     min(v, scratch_rows) if need_dw and weight.dtype != torch.float32 else 0)
    if split_rows:
        bufs["split"] = torch.empty(split_rows, hdim, dtype=torch.float32, device=dev)
    if need_dh:
        for n0, n1 in chunks(n, hidden.dtype == torch.float32):
            dh32 = scratch(dh, n0, n1, "split")
            h, t, ls, en, gl, ge = (x[n0:n1] for x in rows)
            if deterministic:
                _bwd_dh_kernel[(triton.cdiv(n1 - n0, cfg.block_m),)](
                    h, weight, t, ls, en, gl, ge, dh32, n1 - n0, v, hdim, h.stride(0), weight.stride(0),
                    dh32.stride(0), inv_t, **launch)
            else:
                grid = (triton.cdiv(n1 - n0, cfg.block_m) * triton.cdiv(v, cfg.block_n),)
                _bwd_kernel[grid](h, weight, t, ls, en, gl, ge, dh32, dh32, n1 - n0, v, hdim, h.stride(0),
                                  weight.stride(0), dh32.stride(0), dh32.stride(0), inv_t, 0, GROUP_M=cfg.group_m,
                                  COMPUTE_DH=True, COMPUTE_DW=False, **launch)
            if dh32.data_ptr() != dh[n0:n1].data_ptr():
                dh[n0:n1] = dh32
    if need_dw:
        for v0, v1 in chunks(v, weight.dtype == torch.float32):
            dw32 = scratch(dw, v0, v1, "split")
            w = weight[v0:v1]
            if deterministic:
                _bwd_dw_kernel[(triton.cdiv(v1 - v0, cfg.block_n),)](
                    hidden, w, targets, lse, entropy, g_lp, g_ent, dw32, n, v1 - v0, hdim, hidden.stride(0),
                    w.stride(0), dw32.stride(0), inv_t, v0, **launch)
            else:
                grid = (triton.cdiv(n, cfg.block_m) * triton.cdiv(v1 - v0, cfg.block_n),)
                _bwd_kernel[grid](hidden, w, targets, lse, entropy, g_lp, g_ent, dw32, dw32, n, v1 - v0, hdim,
                                  hidden.stride(0), w.stride(0), dw32.stride(0), dw32.stride(0), inv_t, v0,
                                  GROUP_M=cfg.group_m, COMPUTE_DH=False, COMPUTE_DW=True, **launch)
            if dw32.data_ptr() != dw[v0:v1].data_ptr():
                dw[v0:v1] = dw32
    return dh, dw


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result: 16-bit operands go to cuBLAS with fp32 accumulation and output
    (torch.mm's out_dtype); on CPU (interpreter tests) the operands are upcast."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


_ADDMM_IN_PLACE: bool | None = None  # CUDA: does torch.addmm(out_dtype=fp32, out=acc) work on this build?


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, accumulated in fp32. 16-bit CUDA operands: one cuBLAS GEMM with beta = 1 into acc
    (no temporary of acc's size) where this torch supports it, else through a temporary."""
    global _ADDMM_IN_PLACE
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif not a.is_cuda:
        acc.addmm_(a.float(), b.float())
    else:
        if _ADDMM_IN_PLACE is None:  # probe once: a wrong or missing kernel falls back, never corrupts
            x, y = torch.randn(64, 32, device=a.device), torch.randn(32, 48, device=a.device)
            c = torch.randn(64, 48, device=a.device)
            want = c + x.to(a.dtype).float() @ y.to(a.dtype).float()
            try:
                torch.addmm(c, x.to(a.dtype), y.to(a.dtype), out_dtype=torch.float32, out=c)
                _ADDMM_IN_PLACE = bool(torch.allclose(c, want, rtol=1e-4, atol=1e-4))
            except (RuntimeError, TypeError):
                _ADDMM_IN_PLACE = False
        if _ADDMM_IN_PLACE:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        else:
            acc += torch.mm(a, b, out_dtype=torch.float32)


def block_cols(n_live: int, rows: int | None = None, cols: int | None = None, cols_max: int | None = None) -> int:
    """Vocabulary rows per logits block for n_live rows: cols, or wider when n_live < rows so that a block
    holds at most rows x cols elements (a multiple of 256, at most cols_max). None: the module's GEMM_ROWS,
    GEMM_COLS, GEMM_COLS_MAX (read at call time). golong.plan sizes the head workspace with it."""
    rows = GEMM_ROWS if rows is None else rows
    cols = GEMM_COLS if cols is None else cols
    cols_max = GEMM_COLS_MAX if cols_max is None else cols_max
    if n_live >= rows:
        return cols
    wide = cols * rows // max(n_live, 1) // 256 * 256
    return max(cols, min(cols_max, wide))


def _live_rows(mask: torch.Tensor) -> torch.Tensor | None:
    """Indices of the rows that take part (None: all do, so blocks are plain slices). One host sync."""
    idx = mask.nonzero().squeeze(1)
    return None if idx.numel() == mask.numel() else idx


def _take(x: torch.Tensor, idx: torch.Tensor | None, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of the live rows of x (a view when every row is live)."""
    return x[r0:r1] if idx is None else x.index_select(0, idx[r0:r1])


def _gemm_forward(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_t: float, ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward as cuBLAS GEMMs over [GEMM_ROWS, GEMM_COLS] fp32 logits blocks, each merged into running
    row statistics by _stats_block_kernel. Ignored rows are left out (logprob = entropy = lse = 0 there).
    Extra memory: one fp32 logits block, the gathered rows of one token block, 16 bytes per token."""
    check_triton_device(hidden)
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    logprob = torch.zeros(n, dtype=torch.float32, device=dev)
    entropy = torch.zeros_like(logprob)
    lse = torch.zeros_like(logprob)
    idx = _live_rows(targets != ignore_index)
    n_live = n if idx is None else idx.numel()
    if n_live == 0:
        return logprob, entropy, lse
    stats = torch.zeros(4, n_live, dtype=torch.float32, device=dev)  # m, s, a, target logit
    stats[0] = _NEG_BIG
    br, bc = STATS_TILE
    cols = block_cols(n_live)
    for n0 in range(0, n_live, GEMM_ROWS):
        n1 = min(n_live, n0 + GEMM_ROWS)
        h, t = _take(hidden, idx, n0, n1), _take(targets, idx, n0, n1)
        m, s, a, zt = (x[n0:n1] for x in stats)
        for v0 in range(0, v, cols):
            v1 = min(v, v0 + cols)
            z = _mm_fp32(h, weight[v0:v1].T)
            _stats_block_kernel[(triton.cdiv(n1 - n0, br),)](
                z, t, m, s, a, zt, n1 - n0, v1 - v0, z.stride(0), v0, inv_t, BLOCK_R=br, BLOCK_C=bc, num_warps=4,
                num_stages=3)
            del z
    m, s, a, zt = stats.unbind(0)
    log_s = torch.log(s)
    out = (zt - m - log_s, log_s - a / s, m + log_s)  # logprob, entropy, lse of the live rows
    for full, part in zip((logprob, entropy, lse), out):
        if idx is None:
            full.copy_(part)
        else:
            full.index_copy_(0, idx, part)
    return logprob, entropy, lse


def _gemm_backward(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
    entropy: torch.Tensor, g_lp: torch.Tensor, g_ent: torch.Tensor, inv_t: float,
    need_dh: bool, need_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backward as dense GEMMs over [GEMM_ROWS, GEMM_COLS] blocks of the logits; no atomics.

    Only rows with gradient take part (N counts them; prompt tokens of packed RL sequences have none).
    One pass when N <= GEMM_ROWS: per vocabulary block, logits -> dz (Triton, hidden's dtype) -> dh += dz @ W
    (fp32 accumulator) and dW[block] = dz.T @ h (complete, fp32 output): ~6 N H V flops. Otherwise a dh pass
    over token blocks and a dW pass over vocabulary blocks, each computing the logits again: ~8 N H V flops.
    Extra memory: one fp32 logits block, one dz block (DH_GROUP of them side by side in the one-pass backward,
    whose dh GEMMs then take DH_GROUP blocks at a time), one fp32 accumulator (GEMM_ROWS x H or GEMM_COLS x H)
    and the gathered rows of one token block: ~200 MiB at the defaults and H 2560, whatever N.
    """
    check_triton_device(hidden)
    n, hdim = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    idx = _live_rows((g_lp != 0) | (g_ent != 0))
    n_live = n if idx is None else idx.numel()
    # rows without gradient get 0; when every row has one, the blocks overwrite all of dh
    dh = (torch.empty_like(hidden) if idx is None else torch.zeros_like(hidden)) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    if n_live == 0:
        return dh, (dw.zero_() if need_dw else None)
    row_data = (hidden, targets, lse, entropy, g_lp, g_ent)

    def token_block(n0: int, n1: int) -> list[torch.Tensor]:
        return [_take(x, idx, n0, n1) for x in row_data]

    def dz_block(rows: list[torch.Tensor], v0: int, v1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        h, t, ls, en, gl, ge = rows
        z = _mm_fp32(h, weight[v0:v1].T)
        dz = torch.empty(z.shape, dtype=hidden.dtype, device=dev) if out is None else out
        br, bc = DZ_TILE
        _dz_block_kernel[(triton.cdiv(z.shape[0], br), triton.cdiv(v1 - v0, bc))](
            z, dz, t, ls, en, gl, ge, z.shape[0], v1 - v0, z.stride(0), dz.stride(0), v0, inv_t,
            BLOCK_R=br, BLOCK_C=bc, num_warps=4)
        return dz

    def blocks(total: int, size: int) -> list[tuple[int, int]]:
        return [(i, min(total, i + size)) for i in range(0, total, size)]

    one_pass = n_live <= GEMM_ROWS
    cols = block_cols(n_live)  # GEMM_COLS unless one_pass
    group = max(1, DH_GROUP) if one_pass else 1
    if need_dh or one_pass:
        for n0, n1 in blocks(n_live, GEMM_ROWS):
            rows = token_block(n0, n1)
            acc = torch.zeros(n1 - n0, hdim, dtype=torch.float32, device=dev) if need_dh else None
            for g0, g1 in blocks(v, cols * group):  # one dh GEMM per group of vocabulary blocks
                dz_group = torch.empty(n1 - n0, g1 - g0, dtype=hidden.dtype, device=dev)
                for v0, v1 in blocks(g1 - g0, cols):
                    dz = dz_block(rows, g0 + v0, g0 + v1, out=dz_group[:, v0:v1])
                    if need_dw and one_pass:
                        dw[g0 + v0:g0 + v1] = _mm_fp32(dz.T, rows[0])
                if need_dh:
                    _addmm_fp32(acc, dz_group, weight[g0:g1])
                del dz_group, dz
            if need_dh:
                if idx is None:
                    dh[n0:n1] = acc
                else:
                    dh.index_copy_(0, idx[n0:n1], acc.to(dh.dtype))
            del acc, rows
    if need_dw and not one_pass:
        for v0, v1 in blocks(v, cols):
            acc = torch.zeros(v1 - v0, hdim, dtype=torch.float32, device=dev)
            for n0, n1 in blocks(n_live, GEMM_ROWS):
                rows = token_block(n0, n1)
                _addmm_fp32(acc, dz_block(rows, v0, v1).T, rows[0])
            dw[v0:v1] = acc
            del acc
    return dh, dw


# --------------------------------------------------------------------------------------------------
# autograd Function + dispatcher
# --------------------------------------------------------------------------------------------------


class _LinearLogprobEntropy(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                temperature: float, ignore_index: int, backend: str, deterministic: bool):
        inv_t = 1.0 / float(temperature)
        if FWD_MODE not in ("triton", "gemm"):
            raise ValueError(f"kernels.logprob.FWD_MODE must be 'triton' or 'gemm', got {FWD_MODE!r}")
        if backend == "triton" and FWD_MODE == "gemm":
            logprob, entropy, lse = _gemm_forward(hidden, weight, targets, inv_t, ignore_index)
        elif backend == "triton":
            logprob, entropy, lse = _triton_forward(hidden, weight, targets, inv_t, ignore_index)
        else:
            logprob, entropy, lse = _torch_forward(hidden, weight, targets, inv_t, ignore_index)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.inv_t, ctx.ignore_index, ctx.backend, ctx.deterministic = inv_t, ignore_index, backend, deterministic
        return logprob, entropy

    @staticmethod
    @autocast_off
    def backward(ctx: Any, g_lp: torch.Tensor | None, g_ent: torch.Tensor | None):
        if torch.is_grad_enabled():  # create_graph=True: the kernels and in-place chunk updates build no graph,
            # so a second derivative would silently miss terms (triton) or fail inside an out= op (torch)
            raise RuntimeError("linear_logprob_entropy is differentiable once: create_graph=True (double "
                               "backward) is not supported")
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dh or need_dw):
            return None, None, None, None, None, None, None
        valid = targets != ctx.ignore_index
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # ignored rows get no gradient, whatever the upstream grad says
        g_lp = zero.expand(targets.shape) if g_lp is None else torch.where(valid, g_lp.float(), zero)
        g_ent = zero.expand(targets.shape) if g_ent is None else torch.where(valid, g_ent.float(), zero)
        g_lp, g_ent = g_lp.contiguous(), g_ent.contiguous()
        if BWD_MODE not in ("atomic", "gemm"):
            raise ValueError(f"kernels.logprob.BWD_MODE must be 'atomic' or 'gemm', got {BWD_MODE!r}")
        if ctx.backend == "triton" and BWD_MODE == "gemm" and not ctx.deterministic:
            dh, dw = _gemm_backward(hidden, weight, targets, lse, entropy, g_lp, g_ent, ctx.inv_t, need_dh, need_dw)
        elif ctx.backend == "triton":
            dh, dw = _triton_backward(hidden, weight, targets, lse, entropy, g_lp, g_ent, ctx.inv_t,
                                      need_dh, need_dw, ctx.deterministic)
        else:
            dh, dw = _torch_backward(hidden, weight, targets, lse, entropy, g_lp, g_ent, ctx.inv_t,
                                     need_dh, need_dw)
        return dh, dw, None, None, None, None, None


def linear_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    *,
    ignore_index: int = -100,
    backend: str = "auto",
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of `targets` and entropy under softmax(hidden @ weight.T / temperature).

    hidden [N, H] (fp32/bf16/fp16; leading dims are flattened), weight [V, H] (same dtype),
    targets [N] (hidden's leading shape) int64 -> logprob [N] fp32 (<= 0), entropy [N] fp32. Never materialises
    [N, V]. 16-bit inputs: the Triton backward rounds each dlogits block to the input dtype for the tensor-core
    products (fp32 accumulation); in fp16 a term below 6e-8 (g * p with a per-token gradient g ~ 1e-4 and
    p ~ 1 / V) flushes to 0, so use bf16 (the trainer's dtype) or scale the loss.
    Rows with targets == ignore_index give 0 and no gradient. backend: "auto" (triton on CUDA
    tensors in fp32/bf16/fp16, torch otherwise), "triton" or "torch". deterministic: the Triton backward uses
    owner-computes kernels instead of atomics (bitwise reproducible dh and dW; the torch backend
    is deterministic anyway). Extra memory is independent of N: the Triton backend works in
    GEMM_ROWS x GEMM_COLS logits blocks (see _gemm_forward / _gemm_backward; FWD_MODE and BWD_MODE
    select the fused-tile kernels instead), the torch backend in TOKEN_CHUNK x VOCAB_CHUNK chunks.
    """
    if backend == "auto":
        backend = "triton" if hidden.is_cuda and hidden.dtype in TRITON_DTYPES else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "triton":
        check_triton_dtype(hidden, "hidden and weight")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    lead = hidden.shape[:-1]
    if targets.shape != lead:  # the same count in another shape (e.g. transposed) would pair rows wrongly
        raise ValueError(f"targets must have hidden's leading shape {list(lead)}, got {list(targets.shape)}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, {hidden.shape[1]}], got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight dtypes differ: {hidden.dtype} vs {weight.dtype}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (token ids), got {targets.dtype}")
    # an id outside [0, V) would silently give logprob = -lse; one host sync (the forward has one anyway)
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets[{i}] = {int(targets[i])} is outside the vocabulary [0, {weight.shape[0]}) "
                         f"and is not ignore_index ({ignore_index})")
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous().long()
    lp, ent = _LinearLogprobEntropy.apply(hidden, weight, targets, float(temperature), int(ignore_index),
                                          backend, bool(deterministic))
    return lp.reshape(lead), ent.reshape(lead)


# --------------------------------------------------------------------------------------------------
# production configurations, for the sm_90 AOT compile (tests, bench/static_report.py)
# --------------------------------------------------------------------------------------------------


def _aot_entry(name: str, fn: Any, cfg: KernelConfig, signature: dict[str, str], **constexprs: Any) -> dict:
    ce = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "PRECISION": "tf32", **constexprs}
    # what the JIT sees at run time: aligned tensors, H = 2560 and V = 151,936 (both multiples of 16);
    # N is left unhinted (any token count)
    div16 = [a for a, ty in signature.items() if ty.startswith("*") or a in ("H", "V") or a.startswith("stride")]
    return {"name": name, "fn": fn, "signature": signature, "constexprs": ce, "num_warps": cfg.num_warps,
            "num_stages": cfg.num_stages, "divisible_by_16": div16}


_P16, _PF, _I = "*bf16", "*fp32", "i32"
_ROW_PTRS = {"tgt_ptr": "*i64", "lse_ptr": _PF, "ent_ptr": _PF, "glp_ptr": _PF, "gent_ptr": _PF}
_SIZES = {"N": _I, "V": _I, "H": _I, "stride_h": _I, "stride_w": _I}

# Qwen3-4B LM head: H = 2560, V = 151,936, bf16 activations and weight.
AOT_CONFIGS: list[dict[str, Any]] = [
    _aot_entry("logprob_fwd", _fwd_kernel, FWD_CONFIG, {
        "h_ptr": _P16, "w_ptr": _P16, "tgt_ptr": "*i64", "pm_ptr": _PF, "ps_ptr": _PF, "pa_ptr": _PF,
        "pzt_ptr": _PF, **_SIZES, "inv_t": "fp32", "ignore_index": _I, "tiles_per_split": _I}),
    _aot_entry("logprob_bwd", _bwd_kernel, BWD_CONFIG, {
        "h_ptr": _P16, "w_ptr": _P16, **_ROW_PTRS, "dh_ptr": _PF, "dw_ptr": _PF, **_SIZES,
        "stride_dh": _I, "stride_dw": _I, "inv_t": "fp32", "v_off": _I},
        BLOCK_H=BWD_CONFIG.block_h, GROUP_M=BWD_CONFIG.group_m, COMPUTE_DH=True, COMPUTE_DW=True),
    {"name": "logprob_dz_block", "fn": _dz_block_kernel,
     "signature": {"z_ptr": _PF, "dz_ptr": _P16, **_ROW_PTRS, "R": _I, "C": _I, "stride_z": _I, "stride_dz": _I,
                   "c_off": _I, "inv_t": "fp32"},
     "constexprs": {"BLOCK_R": DZ_TILE[0], "BLOCK_C": DZ_TILE[1]}, "num_warps": 4, "num_stages": 1,
     "divisible_by_16": ["z_ptr", "dz_ptr", *_ROW_PTRS, "C", "stride_z", "stride_dz", "c_off"]},
    {"name": "logprob_stats_block", "fn": _stats_block_kernel,
     "signature": {"z_ptr": _PF, "tgt_ptr": "*i64", "m_ptr": _PF, "s_ptr": _PF, "a_ptr": _PF, "zt_ptr": _PF,
                   "R": _I, "C": _I, "stride_z": _I, "c_off": _I, "inv_t": "fp32"},
     "constexprs": {"BLOCK_R": STATS_TILE[0], "BLOCK_C": STATS_TILE[1]}, "num_warps": 4, "num_stages": 3,
     "divisible_by_16": ["z_ptr", "tgt_ptr", "m_ptr", "s_ptr", "a_ptr", "zt_ptr", "C", "stride_z", "c_off"]},
    _aot_entry("logprob_bwd_dh_deterministic", _bwd_dh_kernel, BWD_DET_CONFIG, {
        "h_ptr": _P16, "w_ptr": _P16, **_ROW_PTRS, "dh_ptr": _PF, **_SIZES, "stride_dh": _I,
        "inv_t": "fp32"}, BLOCK_H=BWD_DET_CONFIG.block_h),
    _aot_entry("logprob_bwd_dw_deterministic", _bwd_dw_kernel, BWD_DET_CONFIG, {
        "h_ptr": _P16, "w_ptr": _P16, **_ROW_PTRS, "dw_ptr": _PF, **_SIZES, "stride_dw": _I,
        "inv_t": "fp32", "v_off": _I}, BLOCK_H=BWD_DET_CONFIG.block_h),
]
