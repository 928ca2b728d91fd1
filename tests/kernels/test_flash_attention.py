"""flash_attention: Triton kernels (interpreter) and torch backend vs an fp64 dense oracle per document."""

import dataclasses
import importlib
import math

import pytest
import torch

from kernels import aot
from kernels.aot import KernelResources
from kernels.flash_attention import (
    AOT_CONFIGS,
    Rows,
    _triton_bwd,
    _triton_fwd,
    aot_configs,
    attention_delta,
    block_attention_bwd,
    block_attention_fwd,
    flash_attention,
)
from kernels.ring_attention import ring_attention, zigzag_indices
from tests.kernels import interpreter_tma
from tests.kernels.launch_spy import LaunchSpy
from tests.kernels.segments import worst_segment_error

interpreter_tma.install()  # the fused-dQ TMA variants add dQ tiles by TMA reduce
fa = importlib.import_module("kernels.flash_attention")  # the module (the package exports the function)


def dense_attention(q, k, v, qr: Rows, kr: Rows, causal=True, scale=None):
    """fp64 oracle: q [Tq,Hq,D], k/v [Tk,Hkv,D], rows' global (doc, pos) -> out [Tq,Hq,D], lse [Tq,Hq].

    Rows that see no key get out 0 and lse -inf. Differentiable (autograd in fp64).
    """
    Hq, D = q.shape[1], q.shape[2]
    G = Hq // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    qq = q.double().transpose(0, 1)
    kk = k.double().repeat_interleave(G, 1).transpose(0, 1)
    vv = v.double().repeat_interleave(G, 1).transpose(0, 1)
    ok = qr.doc[:, None] == kr.doc[None, :]
    if causal:
        ok &= kr.pos[None, :] <= qr.pos[:, None]
    s = (qq @ kk.transpose(-1, -2) * scale).masked_fill(~ok, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return (p @ vv).transpose(0, 1), lse.transpose(0, 1)


def per_document_attention(q, k, v, cu, causal=True, scale=None):
    """fp64 attention computed document by document (independent of the Rows bookkeeping)."""
    G = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs, lses = [], []
    for a, e in zip(cu[:-1], cu[1:]):
        qq = q[a:e].double().transpose(0, 1)
        kk = k[a:e].double().repeat_interleave(G, 1).transpose(0, 1)
        vv = v[a:e].double().repeat_interleave(G, 1).transpose(0, 1)
        s = qq @ kk.transpose(-1, -2) * scale
        if causal:
            s = s.masked_fill(torch.ones(e - a, e - a, dtype=torch.bool, device=q.device).triu(1), -math.inf)
        outs.append((torch.softmax(s, -1) @ vv).transpose(0, 1))
        lses.append(torch.logsumexp(s, -1).transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _inputs(cu, hq, hkv, d, dtype):
    T = cu[-1]
    q = torch.randn(T, hq, d, dtype=dtype)
    k = torch.randn(T, hkv, d, dtype=dtype)
    v = torch.randn(T, hkv, d, dtype=dtype)
    return q, k, v


CASES = [  # (cu_seqlens, Hq, Hkv, D, causal): odd lengths, length-1 documents, GQA and MHA
    ([0, 1, 38, 39, 40, 91], 6, 2, 32, True),
    ([0, 53, 54, 77], 4, 4, 64, True),
    ([0, 21, 22, 70], 8, 1, 32, False),
]


@pytest.mark.parametrize("backend", ["triton", "torch", "torch_small_tiles"])
@pytest.mark.parametrize("cu,hq,hkv,d,causal", CASES)
def test_flash_attention_matches_fp64_per_document(backend, cu, hq, hkv, d, causal, monkeypatch):
    if backend == "torch_small_tiles":  # the defaults hold these documents in one tile: query tiles of 16 and key
        # tiles of 24 rows make the online softmax rescale across key tiles, tiles straddle documents, ragged ends
        monkeypatch.setattr(fa, "TORCH_BLOCK_M", 16)
        monkeypatch.setattr(fa, "TORCH_BLOCK_N", 24)
        backend = "torch"
    q, k, v = (x.requires_grad_() for x in _inputs(cu, hq, hkv, d, torch.float32))
    scale = 0.7 / math.sqrt(d)
    out, lse = flash_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), causal=causal, softmax_scale=scale,
                               backend=backend)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == (cu[-1], hq)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ro, rl = per_document_attention(q64, k64, v64, cu, causal, scale)
    assert rel(out, ro) < 1e-5 and rel(lse, rl) < 1e-5
    # gradients through out and lse together
    go, gl = torch.randn_like(ro), torch.randn_like(rl)
    ((out * go.float()).sum() + (lse * gl.float()).sum()).backward()
    ((ro * go).sum() + (rl * gl).sum()).backward()
    for ours, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel(ours, ref) < 1e-5


@pytest.mark.parametrize("cu,hq,hkv,d,causal", CASES)
def test_torch_backend_small_tiles_running_max_never_falls(monkeypatch, cu, hq, hkv, d, causal):
    """Each document's first key scores ~100 above the rest, and with key tiles of 24 rows it sits in an earlier
    key tile than most: a running max allowed to fall would rescale by exp(100) = inf."""
    monkeypatch.setattr(fa, "TORCH_BLOCK_M", 16)
    monkeypatch.setattr(fa, "TORCH_BLOCK_N", 24)
    q, k, v = _inputs(cu, hq, hkv, d, torch.float32)
    scale = 0.7 / math.sqrt(d)
    q[..., 0], k[cu[:-1], :, 0] = 10.0, 100.0 / (10.0 * scale)
    out, lse = flash_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), causal=causal, softmax_scale=scale,
                               backend="torch")
    ro, rl = per_document_attention(q, k, v, cu, causal, scale)
    assert rel(out, ro) < 1e-5 and rel(lse, rl) < 1e-6


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_scores_far_below_zero_are_attended_as_any_others(backend):
    """Softmax is shift-invariant: rows whose every score is near -14,400 attend as rows near 0 do (a running max
    started at -1e4 instead of -1e30 gave lse -inf and zero rows there), forward and backward, vs fp64."""
    cu = [0, 7, 40, 41, 70]
    q, k, v = _inputs(cu, 4, 2, 16, torch.float32)
    q, k = (q * 0.05 + 60.0).requires_grad_(), (k * 0.05 - 60.0).requires_grad_()  # scores ~ -16 * 3600 / 4
    v.requires_grad_()
    out, lse = flash_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), backend=backend)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ro, rl = per_document_attention(q64, k64, v64, cu, True, 16 ** -0.5)
    assert rl.max() < -1e4 and torch.isfinite(lse).all() and torch.isfinite(out).all()
    # fp32 scores of 1.4e4 carry ~1e-3 absolute rounding (their ulp): out within ~5e-4 (0 rows: error 1)
    assert rel(out, ro) < 5e-3 and rel(lse, rl) < 1e-6
    go = torch.randn_like(ro)
    (out * go.float()).sum().backward()
    (ro * go).sum().backward()
    assert rel(v.grad, v64.grad) < 5e-3
    assert rel(q.grad, q64.grad) < 5e-3 and rel(k.grad, k64.grad) < 5e-3


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_attention_delta_sums_in_fp32_whatever_the_inputs(backend):
    """delta = rowsum(out * dout) feeds every backward: fp16 out and dout are multiplied in fp32 (their product
    rounded to fp16 before the sum was 2e-4 off fp64 instead of 1e-7)."""
    out, do = (torch.randn(37, 3, 128, dtype=torch.float64) * 4).half(), (torch.randn(37, 3, 128) * 4).half()
    dlse = torch.randn(37, 3)
    ref = (out.double() * do.double()).sum(-1) - dlse.double()
    got = attention_delta(out, do, dlse, backend=backend)
    assert got.dtype == torch.float32 and rel(got, ref) < 1e-6


def test_key_and_query_ranges_match_brute_force():
    """key_ranges / query_ranges (the tiles' and the Triton kernels' loop bounds) against the visibility matrix,
    zigzag query and key shards of different ranks, causal and not."""
    cu = torch.tensor([0, 1, 38, 39, 40, 91])
    for qrank, krank in ((0, 0), (1, 2), (2, 0)):
        qi, ki = zigzag_indices(cu, qrank, 3), zigzag_indices(cu, krank, 3)
        qr, kr = _shard_rows(cu.tolist(), qi), _shard_rows(cu.tolist(), ki)
        for causal in (True, False):
            ok = qr.doc[:, None] == kr.doc[None, :]
            if causal:
                ok &= kr.pos[None, :] <= qr.pos[:, None]
            lo, hi = fa.key_ranges(qr, kr, causal)
            j = torch.arange(len(kr))
            assert torch.equal((j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None]), ok), (qrank, krank, causal)
            lo, hi = fa.query_ranges(qr, kr, causal)
            i = torch.arange(len(qr))
            assert torch.equal((i[:, None] >= lo[None, :]) & (i[:, None] < hi[None, :]), ok), (qrank, krank, causal)


def test_flash_attention_triton_fp16_head_dim_128():
    cu = [0, 17, 18, 45]
    q, k, v = (x.requires_grad_() for x in _inputs(cu, 4, 2, 128, torch.float16))
    out, lse = flash_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), backend="triton")
    assert out.dtype == torch.float16
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ro, rl = per_document_attention(q64, k64, v64, cu)
    assert rel(out, ro) < 2e-3 and rel(lse, rl) < 1e-4
    go = torch.randn_like(ro)
    (out.float() * go.float()).sum().backward()
    (ro * go).sum().backward()
    for ours, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel(ours, ref) < 5e-3


def _shard_rows(cu, idx):
    rows = Rows.from_cu_seqlens(torch.tensor(cu, dtype=torch.int32))
    return Rows(rows.doc[idx], rows.pos[idx])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_block_attention_merges_partial_attentions_into_out_and_lse(backend):
    """Ring forward: key shards of ranks 0, 1, 2 merged one after another into one (out, lse) equal attention
    over all their keys; rows that see no key of a shard (or of any shard so far) included."""
    cu = [0, 3, 40, 41, 70, 71]
    world = 3
    cu_t = torch.tensor(cu)
    qi = zigzag_indices(cu_t, 1, world)
    qr = _shard_rows(cu, qi)
    q = torch.randn(len(qi), 6, 32)
    kv = torch.randn(cu[-1], 2, 3, 32)
    scale = 32**-0.5
    out = torch.zeros(q.shape)
    lse = torch.full(q.shape[:2], float("-inf"))
    for src in (2, 0, 1):  # the ring's order on rank 1: the local block last, so some rows start unseen
        ki = zigzag_indices(cu_t, src, world)
        blk = kv[ki]
        got = block_attention_fwd(q, blk[:, 0], blk[:, 1], qr, _shard_rows(cu, ki), causal=True, scale=scale,
                                  backend=backend, out=out, lse=lse)
        assert got[0] is out and got[1] is lse
    q64, kv64 = q.double(), kv.double()
    ro, rl = dense_attention(q64, kv64[:, 0], kv64[:, 1], qr, _shard_rows(cu, torch.arange(cu[-1])), True, scale)
    assert rel(out, ro) < 1e-5
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isinf(lse), ~fin) and rel(lse[fin], rl[fin]) < 1e-6
    all_rows = _shard_rows(cu, torch.arange(cu[-1]))
    with pytest.raises(ValueError, match="fp32"):
        block_attention_fwd(q, kv[:, 0], kv[:, 1], qr, all_rows, causal=True,
                            scale=scale, backend=backend, out=out.half(), lse=lse)
    for bad_out, bad_lse in ((out[:-1], lse), (out, lse[:, :-1]), (out, lse.t().contiguous().t())):
        with pytest.raises(ValueError, match="out must be"):
            block_attention_fwd(q, kv[:, 0], kv[:, 1], qr, all_rows, causal=True, scale=scale, backend=backend,
                                out=bad_out, lse=bad_lse)
    do, delta = torch.randn(q.shape), torch.randn(q.shape[:2])
    for bufs in ((torch.zeros(q.shape), None, None), (torch.zeros(q.shape), torch.zeros(cu[-1], 2, 32),
                                                      torch.zeros(cu[-1], 2, 32, dtype=torch.float64))):
        with pytest.raises(ValueError, match="all three fp32 gradient buffers"):
            block_attention_bwd(do, q, kv[:, 0], kv[:, 1], lse, delta, qr, all_rows, causal=True, scale=scale,
                                backend=backend, dq=bufs[0], dk=bufs[1], dv=bufs[2])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_block_attention_global_positions_poisoned_outputs(backend):
    """A zigzag query shard against another rank's K/V shard: rows with no visible key get lse -inf.

    Output buffers are NaN-poisoned (triton) or pre-filled (accumulate) before the kernels write them.
    """
    cu = [0, 3, 40, 41, 70]
    world = 3
    qi = zigzag_indices(torch.tensor(cu), 2, world)
    ki = zigzag_indices(torch.tensor(cu), 0, world)
    qr, kr = _shard_rows(cu, qi), _shard_rows(cu, ki)
    q = torch.randn(len(qi), 6, 32)
    k, v = torch.randn(len(ki), 3, 32), torch.randn(len(ki), 3, 32)
    scale = 32**-0.5
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ro, rl = dense_attention(q64, k64, v64, qr, kr, True, scale)
    assert torch.isinf(rl).any() and not torch.isinf(rl).all()  # the case is non-trivial
    if backend == "triton":
        out = torch.full(q.shape, float("nan"))
        lse = torch.full(q.shape[:2], float("nan"))
        _triton_fwd(q, k, v, qr, kr, True, scale, out, lse)
    else:
        out, lse = block_attention_fwd(q, k, v, qr, kr, causal=True, scale=scale, backend=backend)
    assert rel(out, ro) < 1e-5
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isinf(lse), ~fin) and rel(lse[fin], rl[fin]) < 1e-6

    # backward with the block's own lse (as a single block): fp64 autograd through out
    go = torch.randn_like(ro)
    (ro * go).sum().backward()
    do = go.float()
    delta = attention_delta(out, do, backend=backend)
    if backend == "triton":
        bufs = [torch.full(q.shape, float("nan")), torch.full(k.shape, float("nan")), torch.full(v.shape, float("nan"))]
        _triton_bwd(do, q, k, v, lse, delta, qr, kr, True, scale, *bufs, False)
        dq, dk, dv = bufs
    else:
        dq, dk, dv = block_attention_bwd(do, q, k, v, lse, delta, qr, kr, causal=True, scale=scale, backend=backend)
    for ours, ref in ((dq, q64.grad), (dk, k64.grad), (dv, v64.grad)):
        assert rel(ours, ref) < 1e-5
    # accumulate mode adds into existing fp32 buffers (strided views of one [n, 2H, D] buffer for dK/dV)
    base_q = torch.randn(q.shape)
    base_kv = torch.randn(k.shape[0], 6, 32)
    acc_q, acc_kv = base_q.clone(), base_kv.clone()
    block_attention_bwd(do, q, k, v, lse, delta, qr, kr, causal=True, scale=scale, backend=backend,
                        dq=acc_q, dk=acc_kv[:, :3], dv=acc_kv[:, 3:])
    assert rel(acc_q - base_q, q64.grad) < 1e-5
    assert rel(acc_kv[:, :3] - base_kv[:, :3], k64.grad) < 1e-5
    assert rel(acc_kv[:, 3:] - base_kv[:, 3:], v64.grad) < 1e-5


VARIANTS = {  # interpreter configurations beside INTERPRET_CONFIG: dQ fused into dK/dV (atomics), asymmetric tiles,
    # split dK / dV passes
    "fused_dq": dict(bwd_fused_dq=True),
    "asymmetric": dict(bwd_block_m=16, bwd_block_n=32, dq_block_m=32, dq_block_n=16),
    "fused_dq_asymmetric": dict(bwd_fused_dq=True, bwd_block_m=32, bwd_block_n=16),
    "split": dict(bwd_split=True),  # dV and dK by separate passes (the GPU default)
    "split_fused_dq": dict(bwd_split=True, bwd_fused_dq=True, split_block_m=32, split_block_n=16),
    "split_three_loops": dict(bwd_split=True, bwd_three_loops=True),  # masked / unmasked / masked query loops
    "three_loops_fused_dq": dict(bwd_three_loops=True, bwd_fused_dq=True, bwd_block_m=16, bwd_block_n=32),
    "q_heavy_first": dict(q_heavy_first=True),  # forward and dQ programs in reverse query-block order
    "split_dv_stages": dict(bwd_split=True, split_stages=1, split_dv_stages=2),
    # query / dO / lse / delta tiles through TMA tensor descriptors (the joint pass with fused dQ as well)
    "split_tma": dict(bwd_split=True, bwd_tma=True, split_block_m=32, split_block_n=16),
    "split_three_loops_tma": dict(bwd_split=True, bwd_three_loops=True, bwd_tma=True),
    # fused dQ under TMA: dQ tiles added by TMA reduce (tensor_descriptor.atomic_add), joint and split passes
    "tma_fused_dq": dict(bwd_tma=True, bwd_fused_dq=True),
    "split_tma_fused_dq": dict(bwd_split=True, bwd_tma=True, bwd_fused_dq=True, split_block_m=32, split_block_n=16),
    "split_three_loops_tma_fused_dq": dict(bwd_split=True, bwd_three_loops=True, bwd_tma=True, bwd_fused_dq=True),
    "all_tma": dict(bwd_split=True, bwd_tma=True, fwd_tma=True, dq_tma=True, fwd_block_n=32, dq_block_n=32),
}


def test_tma_loads_run_where_rows_are_16_byte_aligned_and_fall_back_elsewhere(monkeypatch):
    monkeypatch.setattr(fa, "INTERPRET_CONFIG", dataclasses.replace(fa.INTERPRET_CONFIG, **VARIANTS["all_tma"]))
    spies = {name: LaunchSpy(getattr(fa, name))
             for name in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(fa, name, spy)
    cu = [0, 1, 38, 39, 40, 91]  # 91 rows: the head-major lse / delta rows are padded to 92
    for offset, tma in ((0, True), (1, False)):  # offset 1: q and k start 4 bytes past a 16-byte boundary
        for spy in spies.values():
            spy.launches.clear()
        q0, k0, v = _inputs(cu, 6, 2, 32, torch.float32)
        q, k = (torch.randn(x.numel() + offset)[offset:].view(x.shape).copy_(x).requires_grad_() for x in (q0, k0))
        v.requires_grad_()
        out, lse = flash_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), backend="triton")
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
        ro, rl = per_document_attention(q64, k64, v64, cu)
        go = torch.randn_like(ro)
        (out * go.float()).sum().backward()
        (ro * go).sum().backward()
        for ours, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
            assert rel(ours, ref) < 1e-5
        assert [launch["TMA"] for launch in spies["_attn_fwd_kernel"].launches] == [tma]
        assert [launch["TMA"] for launch in spies["_attn_bwd_dkdv_kernel"].launches] == [tma, tma]  # dV, dK passes
        assert [launch["TMA"] for launch in spies["_attn_bwd_dq_kernel"].launches] == [tma]


def test_fused_dq_tma_reduce_needs_an_aligned_dq_buffer(monkeypatch):
    """Fused dQ under TMA adds dQ tiles by TMA reduce into the fp32 buffer; a ring buffer 4 bytes off a
    16-byte boundary sends the whole launch to plain loads and per-thread atomics, with the same sums."""
    monkeypatch.setattr(fa, "INTERPRET_CONFIG",
                        dataclasses.replace(fa.INTERPRET_CONFIG, **VARIANTS["split_tma_fused_dq"]))
    spy = LaunchSpy(fa._attn_bwd_dkdv_kernel)
    monkeypatch.setattr(fa, "_attn_bwd_dkdv_kernel", spy)
    cu = [0, 1, 38, 39, 40, 91]
    q, k, v = _inputs(cu, 6, 2, 32, torch.float32)
    rows = Rows.from_cu_seqlens(torch.tensor(cu, dtype=torch.int32))
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ro, _ = dense_attention(q64, k64, v64, rows, rows)
    go = torch.randn_like(ro)
    (ro * go).sum().backward()
    out, lse = block_attention_fwd(q, k, v, rows, rows, causal=True, scale=32**-0.5, backend="triton")
    delta = attention_delta(out, go.float(), backend="triton")
    for offset, tma in ((0, True), (1, False)):
        spy.launches.clear()
        base = torch.randn(q.shape)
        acc_q = torch.empty(q.numel() + offset)[offset:].view(q.shape).copy_(base)
        block_attention_bwd(go.float(), q, k, v, lse, delta, rows, rows, causal=True, scale=32**-0.5,
                            backend="triton", dq=acc_q, dk=torch.zeros(k.shape), dv=torch.zeros(v.shape))
        assert [launch["TMA"] for launch in spy.launches] == [tma, tma]  # dV pass, dK pass (+ dQ)
        assert rel(acc_q - base, q64.grad) < 1e-5


@pytest.fixture(params=list(VARIANTS))
def variant(request, monkeypatch):
    monkeypatch.setattr(fa, "INTERPRET_CONFIG", dataclasses.replace(fa.INTERPRET_CONFIG, **VARIANTS[request.param]))


@pytest.mark.parametrize("cu,hq,hkv,d,causal", CASES)
def test_triton_backward_variants_match_fp64(variant, cu, hq, hkv, d, causal, monkeypatch):
    test_flash_attention_matches_fp64_per_document("triton", cu, hq, hkv, d, causal, monkeypatch)


def test_triton_backward_variants_poisoned_outputs_and_accumulate(variant):
    test_block_attention_global_positions_poisoned_outputs("triton")


def test_flash_attention_flash_attn_backend_falls_back_on_cpu():
    cu = [0, 5, 12]
    q, k, v = _inputs(cu, 2, 1, 32, torch.float32)
    out, lse = flash_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), backend="flash_attn")
    ro, rl = per_document_attention(q, k, v, cu)
    assert rel(out, ro) < 1e-5 and rel(lse, rl) < 1e-5


def _fake_varlen_attn(release: str):
    """Stand-ins for torch.nn.attention.varlen.varlen_attn as the PyTorch releases golong supports declare it (2.11:
    window_size and scale, Hkv < Hq taken as it is; 2.12 on: enable_gqa, without which it refuses Hkv < Hq),
    computing in fp64 per document from cu_seq_q alone and returning lse as the real one does ([Hq, T]); each
    records its calls. What they check is the adapter's use of the API (arguments, tail rows, GQA, lse layout), not
    PyTorch's kernel (the gpu test below runs that)."""
    calls = []

    def attend(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, window_size, scale, gqa, return_aux):
        if release == "2.12" and k.shape[1] != q.shape[1] and not gqa:
            raise ValueError("Expect query and key/value to have the same number of heads ... enable_gqa=True")
        assert isinstance(window_size, tuple)  # the real wrapper compares it with the tuple (-1, 0)
        cu = cu_seq_q.tolist()
        assert torch.equal(cu_seq_q, cu_seq_k) and cu[-1] == q.shape[0] and cu_seq_q.dtype == torch.int32
        assert max_q == max_k == max(b - a for a, b in zip(cu[:-1], cu[1:]))
        causal = window_size == (-1, 0)
        out, lse = per_document_attention(q, k, v, cu, causal=causal, scale=scale)
        calls.append(dict(causal=causal, scale=scale, gqa=gqa, kv_heads=k.shape[1], cu=cu))
        out = out.to(q.dtype)
        return (out, lse.transpose(0, 1).float()) if return_aux is not None and return_aux.lse else out

    if release == "2.11":
        def fn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1)):
            return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size, scale, False, return_aux)
    else:
        def fn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
               window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
            return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size, scale, enable_gqa,
                          return_aux)
    return fn, calls


@pytest.mark.parametrize("release", ["2.11", "2.12"])
@pytest.mark.parametrize("causal,scale", [(True, None), (True, 0.3), (False, 0.3)])
def test_varlen_attn_backend_adapts_to_each_release_signature(release, causal, scale, monkeypatch):
    """flash_attention(backend="varlen_attn") through PyTorch's varlen_attn, as each release declares it (stand-ins;
    the CPU tensors pass for CUDA ones): causal by window_size (-1, 0), the scale passed, GQA by enable_gqa where a
    release has it, tail rows as one more document, lse [T, Hq] and detached; vs fp64 per document, gradients too."""
    fn, calls = _fake_varlen_attn(release)
    monkeypatch.setattr(fa, "_varlen_attn_fn", lambda: fn)
    monkeypatch.setattr(fa, "_varlen_attn_available", lambda q: True)
    cu = [0, 1, 17, 17, 40]  # a one-token document and an empty one; rows 40..45 are the tail
    q0, k0, v0 = _inputs([0, 46], 4, 2, 32, torch.float32)
    q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
    out, lse = flash_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), causal=causal, softmax_scale=scale,
                               backend="varlen_attn")
    q64, k64, v64 = (x.double().requires_grad_() for x in (q0, k0, v0))
    ro, rl = per_document_attention(q64, k64, v64, cu + [46], causal=causal, scale=scale)
    assert rel(out, ro) < 1e-6 and rel(lse, rl) < 1e-6 and lse.shape == (46, 4) and not lse.requires_grad
    go = torch.randn_like(ro)
    (out * go.float()).sum().backward()
    (ro * go).sum().backward()
    for ours, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel(ours, ref) < 1e-6
    (call,) = calls
    assert call["causal"] == causal and call["cu"] == cu + [46] and call["scale"] == (scale or 32 ** -0.5)
    assert (call["gqa"], call["kv_heads"]) == (release == "2.12", 2)  # the K/V heads as they are
    calls.clear()
    flash_attention(q0, k0, v0, torch.tensor(cu + [46], dtype=torch.int32), backend="varlen_attn")
    assert calls[0]["cu"] == cu + [46]  # no tail: the bounds as given
    empty = torch.zeros(0, 4, 32)
    out, lse = flash_attention(empty, empty[:, :2], empty[:, :2], torch.zeros(1, dtype=torch.int32),
                               backend="varlen_attn")
    assert out.shape == (0, 4, 32) and lse.shape == (0, 4) and len(calls) == 1  # nothing to attend: no call


def test_auto_runs_varlen_attn_only_where_the_gpu_config_says_so(monkeypatch):
    """backend="auto" runs PyTorch's FA2 kernels where the launch config (a GPU's tuned TritonConfig, from the
    bench.attention_configs sweep) sets auto_backend="varlen_attn", else ours; an unknown auto_backend is refused."""
    fn, calls = _fake_varlen_attn("2.12")
    monkeypatch.setattr(fa, "_varlen_attn_fn", lambda: fn)
    monkeypatch.setattr(fa, "_varlen_attn_available", lambda q: True)  # the CPU tensors pass for CUDA ones
    cu = [0, 5, 12]
    q, k, v = _inputs(cu, 2, 1, 32, torch.float32)
    ro, rl = per_document_attention(q, k, v, cu)
    for auto, took in (("triton", 0), ("varlen_attn", 1)):
        monkeypatch.setattr(fa, "INTERPRET_CONFIG", dataclasses.replace(fa.INTERPRET_CONFIG, auto_backend=auto))
        calls.clear()
        out, lse = flash_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), backend="auto")
        assert len(calls) == took and rel(out, ro) < 1e-5 and rel(lse, rl) < 1e-5, auto
        calls.clear()
        flash_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), backend="triton")  # named: always ours
        rows = Rows.from_cu_seqlens(torch.tensor(cu, dtype=torch.int32))
        block_attention_fwd(q, k, v, rows, rows, causal=True, scale=32 ** -0.5, backend="auto")  # the ring's blocks
        assert not calls
    with pytest.raises(ValueError, match="auto_backend='fa3': valid 'triton', 'varlen_attn'"):
        dataclasses.replace(fa.CONFIG, auto_backend="fa3")


def test_varlen_bounds_add_the_tail_and_copy_only_when_needed():
    """The FA2 kernels' int32 bounds and longest document: tail rows as one more document, an int64 or empty
    cu_seqlens converted, an int32 one without a tail passed as it is (no copy to the device at every layer)."""
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    assert fa.varlen_bounds(cu, 10)[0] is cu and fa.varlen_bounds(cu, 10)[1] == 7
    for given, total, want, longest in (([0, 3, 10], 12, [0, 3, 10, 12], 7), ([0, 3, 10], 10, [0, 3, 10], 7),
                                        ([0], 0, [0], 0), ([0, 2], 11, [0, 2, 11], 9)):
        got, got_longest = fa.varlen_bounds(torch.tensor(given, dtype=torch.int64), total)
        assert (got.tolist(), got.dtype, got_longest) == (want, torch.int32, longest)


def test_varlen_attn_backend_falls_back_to_triton_off_cuda(monkeypatch):
    """On CPU tensors backend="varlen_attn" runs our triton kernels."""
    fn, calls = _fake_varlen_attn("2.12")
    monkeypatch.setattr(fa, "_varlen_attn_fn", lambda: fn)
    cu = [0, 5, 12]
    q, k, v = _inputs(cu, 2, 1, 32, torch.float32)
    out, lse = flash_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), backend="varlen_attn")
    ro, rl = per_document_attention(q, k, v, cu)
    assert rel(out, ro) < 1e-5 and rel(lse, rl) < 1e-5 and not calls


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_flash_attention_tail_padding_attends_only_itself(backend):
    """Rows past cu_seqlens[-1] form their own document: real rows are unaffected, the tail attends itself."""
    cu = [0, 9, 30]
    q, k, v = _inputs([0, 37], 4, 2, 32, torch.float32)
    out, lse = flash_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), backend=backend)
    ro, rl = per_document_attention(q, k, v, cu + [37])  # the 7 tail rows as one more document
    assert rel(out[:30], ro[:30]) < 1e-5 and rel(lse[:30], rl[:30]) < 1e-5
    assert rel(out[30:], ro[30:]) < 1e-5 and rel(lse[30:], rl[30:]) < 1e-5


def test_public_name_stays_callable_after_submodule_import():
    import kernels
    import kernels.flash_attention  # noqa: F401  (binds the module to the package attribute)

    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    q, k, v = _inputs([0, 11], 4, 2, 16, torch.float32)
    out, lse = kernels.flash_attention(q, k, v, cu, backend="torch")
    ref, ref_lse = flash_attention(q, k, v, cu, backend="torch")
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
    assert callable(kernels.ring_attention) and callable(kernels.zigzag_shard)


def test_flash_attention_rejects_bad_gqa():
    q, k = torch.randn(4, 3, 16), torch.randn(4, 2, 16)
    with pytest.raises(ValueError, match="Hq % Hkv == 0"):
        flash_attention(q, k, k, torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="Hkv >= 1"):  # was a ZeroDivisionError
        flash_attention(q, k[:, :0], k[:, :0], torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="one device; got cpu, meta, cpu"):
        flash_attention(q, q.to("meta"), q, torch.tensor([0, 4], dtype=torch.int32))


@pytest.mark.parametrize("cu, message", [
    ([2, 4, 9], "must start at 0"),  # not starting at 0
    ([0, 4, 12], "end at most at the 9 packed rows"),  # documents past the rows
    ([0, 6, 4, 9], "never decrease"),
])
def test_flash_attention_rejects_bad_cu_seqlens(cu, message):
    q, k = torch.randn(9, 4, 16), torch.randn(9, 2, 16)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=message):
            flash_attention(q, k, k, torch.tensor(cu, dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="1-D int32"):
        flash_attention(q, k, k, torch.tensor([0.0, 4.5, 9.0]))
    with pytest.raises(ValueError, match="1-D int32"):
        flash_attention(q, k, k, torch.tensor([], dtype=torch.int32))


def test_flash_attention_rejects_mismatched_rows_dtypes_and_head_dims():
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    q, k = torch.randn(9, 4, 16), torch.randn(9, 2, 16)
    for bad_k in (k[:8], k[:8].clone()):  # k / v must hold q's rows, not fewer
        with pytest.raises(ValueError, match="same packed rows in one dtype"):
            flash_attention(q, bad_k, bad_k, cu, backend="torch")
    with pytest.raises(ValueError, match="same packed rows in one dtype"):
        flash_attention(q, k.half(), k.half(), cu, backend="torch")
    q24, k24 = torch.randn(9, 4, 24), torch.randn(9, 2, 24)
    with pytest.raises(ValueError, match="power of two in \\[16, 256\\], got 24; use backend='torch'"):
        flash_attention(q24, k24, k24, cu, backend="triton")
    out, _ = flash_attention(q24, k24, k24, cu, backend="torch")  # any head_dim on the torch backend
    assert out.shape == (9, 4, 24) and out.isfinite().all()
    with pytest.raises(ValueError, match="same packed rows in one dtype"):  # v alone in another dtype
        flash_attention(q, k, k.double(), cu, backend="torch")
    with pytest.raises(ValueError, match="expected q \\[T,Hq,D\\], k/v \\[T,Hkv,D\\]"):  # v with other heads
        flash_attention(q, k, torch.randn(9, 4, 16), cu, backend="torch")
    with pytest.raises(ValueError, match="equal head_dim"):
        flash_attention(q, torch.randn(9, 2, 32), torch.randn(9, 2, 32), cu, backend="torch")
    for d in (8, 512):  # powers of two outside [16, 256]
        qd, kd = torch.randn(9, 4, d), torch.randn(9, 2, d)
        with pytest.raises(ValueError, match=f"power of two in \\[16, 256\\], got {d}"):
            flash_attention(qd, kd, kd, cu, backend="triton")
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'; valid: 'auto', 'triton', 'torch', "
                                         "'flash_attn', 'varlen_attn'"):
        flash_attention(q, k, k, cu, backend="cuda")
    for backend in ("torch", "triton"):  # NaN / inf gave NaN or zero rows, each backend its own
        for scale in (float("nan"), float("inf"), -float("inf")):
            with pytest.raises(ValueError, match="softmax_scale must be a finite number"):
                flash_attention(q, k, k, cu, softmax_scale=scale, backend=backend)
    with pytest.raises(ValueError, match="softmax_scale must be a finite number"):
        ring_attention(q, k, k, cu, group=None, softmax_scale=float("nan"))


def test_triton_backend_refuses_fp64_and_auto_takes_torch_for_it():
    """fp64 q/k/v do not compile for the GPU (the fp64 products meet the kernels' fp32 accumulators:
    CompilationError in _fwd_inner, seen by an sm_90 AOT compile of attn_fwd with *fp64 pointers), while the
    interpreter ran them: the triton backend now refuses them by name, and "auto" on CUDA takes torch."""
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    q, k = torch.randn(9, 4, 16, dtype=torch.float64), torch.randn(9, 2, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="backend='triton' takes fp32, fp16 or bf16 q/k/v, got torch.float64"):
        flash_attention(q, k, k, cu, backend="triton")
    with pytest.raises(TypeError, match="backend='triton' takes fp32, fp16 or bf16 q/k/v, got torch.float64"):
        flash_attention(q, k, k, cu, backend="flash_attn")  # no flash-attn on CPU: falls back to triton
    assert fa._resolve("auto", q) == "torch" and fa._resolve("auto", q.float()) == "torch"  # CPU tensors
    # the rule on CUDA tensors, seen through stand-ins (no GPU here): fp64 takes torch, 16-bit / fp32 take triton
    from types import SimpleNamespace

    on_cuda = [SimpleNamespace(is_cuda=True, dtype=dt, shape=(9, 4, 128))
               for dt in (torch.float64, torch.bfloat16, torch.float32)]
    assert [fa._resolve("auto", t) for t in on_cuda] == ["torch", "triton", "triton"]
    out, lse = flash_attention(q, k, k, cu)
    ref_out, ref_lse = per_document_attention(q, k, k, [0, 4, 9])
    assert out.dtype == torch.float64 and rel(out, ref_out) < 1e-5 and rel(lse, ref_lse) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_flash_attention_refuses_integer_inputs(backend):
    """Integer q/k/v: the torch backend attended in fp32 and cast the output back to int64 (silently
    truncated), the triton backend failed inside the kernel."""
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    q, k = torch.randint(-3, 3, (9, 4, 16)), torch.randint(-3, 3, (9, 2, 16))
    with pytest.raises(TypeError, match="q, k and v must be floating-point tensors; got torch.int64"):
        flash_attention(q, k, k, cu, backend=backend)


def test_triton_kernels_index_past_int32_in_int64():
    """Element offsets past 2**31 (a contiguous q from 524,288 rows at 32 x 128 heads; here rows 2**30 apart in a
    lazily allocated 8 GiB buffer, only the touched pages real) wrapped in the kernels' int32 offsets: a segfault
    in the interpreter, reads and writes of other memory on a GPU. Such inputs now compile the WIDE (int64 offset)
    kernels: forward, LSE and all three gradients match the torch backend; a small input stays on int32."""
    D, stride, T = 16, 2**30, 3
    g = torch.Generator().manual_seed(5)
    buf = torch.empty((T - 1) * stride + 2 * D)  # fp32: 2**31 + 32 elements
    q = buf.as_strided((T, 2, D), (stride, D, 1))
    q.copy_(torch.randn(T, 2, D, generator=g))
    k, v, go = (torch.randn(T, h, D, generator=g) for h in (1, 1, 2))
    assert fa._wide(q) and not fa._wide(k, v, go)
    cu = torch.tensor([0, 1, 3], dtype=torch.int32)
    res = {}
    for backend in ("torch", "triton"):
        qq, kk, vv = (t.detach().clone() if t is not q else t.detach() for t in (q, k, v))
        for t in (qq, kk, vv):
            t.requires_grad_()
        out, lse = flash_attention(qq, kk, vv, cu, backend=backend)
        grads = torch.autograd.grad((out * go).sum() + lse.sum(), (qq, kk, vv))
        res[backend] = (out, lse, *grads)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), res["triton"], res["torch"]):
        assert rel(a, b) < 1e-5, name


def test_double_backward_torch_matches_fp64_and_triton_refuses_it_by_name():
    """The torch backend's backward is torch ops on the saved out / lse, so create_graph=True gives true second
    derivatives; the triton one failed inside a mul(out=) with a message naming neither op nor backend."""
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(9, h, 16, generator=g, dtype=torch.float64).requires_grad_() for h in (4, 2, 2))
    g_lse = torch.randn(9, 4, generator=g, dtype=torch.float64)
    second = []
    for attend in (lambda: flash_attention(q, k, v, cu, backend="torch"),
                   lambda: per_document_attention(q, k, v, [0, 3, 9], True)):
        out, lse = attend()
        first = torch.autograd.grad(out.square().sum() + (lse * g_lse).sum(), (q, k, v), create_graph=True)
        second.append(torch.autograd.grad(sum(x.square().sum() for x in first), (q, k, v)))
    assert all(rel(a, b) < 1e-5 for a, b in zip(*second))
    out, lse = flash_attention(q.float(), k.float(), v.float(), cu, backend="triton")
    with pytest.raises(RuntimeError, match="triton backend is differentiable once"):
        torch.autograd.grad(out.square().sum(), (q, k, v), create_graph=True)


WIDE_AOT_CONFIGS = aot_configs(fa.CONFIG, wide=True)  # what inputs spanning 2**31 elements launch


@pytest.fixture(scope="module")
def aot_resources():
    """sm_90 resources of every AOT_CONFIGS kernel and its WIDE form, compiled in one child process without the
    interpreter."""
    return aot.reports(AOT_CONFIGS + WIDE_AOT_CONFIGS)


@pytest.mark.parametrize("name", [c["name"] for c in AOT_CONFIGS + WIDE_AOT_CONFIGS])
def test_aot_sm90_production_config(aot_resources, name):
    r = aot_resources[name]
    assert r.local_bytes == 0 and r.spill_stores == 0 and r.spill_loads == 0, r
    assert r.fits_hopper_smem, r.shared_bytes
    if not name.startswith("attn_bwd_preprocess"):  # the only kernel without a matmul
        assert r.has_hgmma, r.sass_histogram


@pytest.fixture(scope="module")
def aot_sweep_resources() -> dict[str, dict[str, KernelResources]]:
    """sm_90 resources of the kernels of every bench.attention_configs candidate (one child, no interpreter;
    kernels shared by several candidates compile once)."""
    entries = [{**c, "name": f"{label}/{c['name']}"} for label, cfg in _sweep_configs().items()
               for c in aot_configs(cfg)]
    out: dict[str, dict[str, KernelResources]] = {}
    for key, r in aot.reports(entries).items():
        label, name = key.split("/")
        out.setdefault(label, {})[name] = r
    return out


def _sweep_configs() -> dict:
    from bench.attention_configs import candidate_configs

    return dict(candidate_configs())


@pytest.mark.parametrize("label", list(_sweep_configs()))
def test_aot_sm90_sweep_candidates(aot_sweep_resources, label):
    """Every config the GPU sweep times compiles for sm_90 without spills, within shared memory, with HGMMA."""
    kernels = aot_sweep_resources[label]
    assert ("attn_bwd_dq" in kernels) == (not _sweep_configs()[label].bwd_fused_dq)  # fused: no dQ kernel
    for name, r in kernels.items():
        assert r.local_bytes == 0 and r.spill_stores == 0 and r.spill_loads == 0, (name, r)
        assert r.fits_hopper_smem, (name, r.shared_bytes)
        assert name == "attn_bwd_preprocess" or r.has_hgmma, (name, r.sass_histogram)
    cfg = _sweep_configs()[label]
    if cfg.bwd_fused_dq and cfg.bwd_tma:  # dQ tiles leave through the TMA unit's reduce, not per-thread atomics
        dk_pass = kernels["attn_bwd_dkdv_dk" if cfg.bwd_split else "attn_bwd_dkdv"]
        assert dk_pass.sass_histogram.get("UTMAREDG", 0) > 0, dk_pass.sass_histogram


@pytest.mark.gpu
def test_wide_kernels_bf16_cuda():
    """The WIDE (int64 offset) kernels on sm_90 with real addresses: q rows 2.1M elements apart in a 4 GiB bf16
    buffer, the last past 2**31 (the interpreter checks the numbers, not the hardware's address arithmetic), vs
    fp64 per document."""
    cu, D = [0, 700, 1003], 128
    stride = (2**31 // 1002 // 8 + 1) * 8  # the last row's offset passes 2**31
    buf = torch.empty(1002 * stride + 32 * D, device="cuda", dtype=torch.bfloat16)
    q = buf.as_strided((1003, 32, D), (stride, D, 1))
    q0, k, v = (x.cuda() for x in _inputs(cu, 32, 8, D, torch.bfloat16))
    q.copy_(q0)
    assert fa._wide(q)
    q, k, v = q.detach().requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out, lse = flash_attention(q, k, v, torch.tensor(cu, dtype=torch.int32, device="cuda"), backend="triton")
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q0, k, v))
    ro, rl = per_document_attention(q64, k64, v64, cu)
    go = torch.randn_like(ro)
    (out.float() * go.float()).sum().backward()
    (ro * go).sum().backward()
    assert rel(out, ro) < 1e-2 and rel(lse, rl) < 1e-3
    for ours, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel(ours, ref) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "flash_attn", "varlen_attn", "triton_all_tma", "triton_tma_fused_dq"])
def test_flash_attention_bf16_cuda(backend, monkeypatch):
    if backend == "flash_attn":  # without the package the backend falls back to triton: nothing new to test
        pytest.importorskip("flash_attn")
    taken = []
    if backend == "varlen_attn":  # PyTorch's FA2 kernels; counted, so that a silent fallback to triton fails
        pytest.importorskip("torch.nn.attention.varlen")
        real = fa._varlen_attn_fn()
        monkeypatch.setattr(fa, "_varlen_attn_fn", lambda: taken.append(1) or real)
    variants = {  # bench.attention_configs candidates: every tile load by TMA; dQ added by TMA reduce
        "triton_all_tma": dict(fwd_tma=True, dq_tma=True, bwd_tma=True),
        "triton_tma_fused_dq": dict(bwd_split=True, bwd_tma=True, bwd_fused_dq=True, split_block_m=32,
                                    split_stages=2),
    }
    if backend in variants:
        monkeypatch.setattr(fa, "CONFIG", dataclasses.replace(fa.CONFIG, **variants[backend]))
        monkeypatch.setenv("GOLONG_TUNED", "0")
        backend = "triton"
    cu = [0, 1000, 1001, 3333, 4096]
    q, k, v = (x.cuda().requires_grad_() for x in _inputs(cu, 32, 8, 128, torch.bfloat16))
    out, lse = flash_attention(q, k, v, torch.tensor(cu, dtype=torch.int32, device="cuda"), backend=backend)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ro, rl = per_document_attention(q64, k64, v64, cu)
    assert rel(out, ro) < 1e-2 and rel(lse, rl) < 1e-3
    go = torch.randn_like(ro)
    (out.float() * go.float()).sum().backward()
    (ro * go).sum().backward()
    for ours, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel(ours, ref) < 2e-2
    # document by document: a skipped or mis-attended document (the one-token one included) reads ~1 there
    for name, ours, ref in (("out", out, ro), ("lse", lse, rl), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad),
                            ("dv", v.grad, v64.grad)):
        err, doc = worst_segment_error(ours, ref, cu)
        assert err < (1e-3 if name == "lse" else 2e-2), (name, doc, err)
    if backend == "varlen_attn":
        assert taken
    if backend in ("varlen_attn", "flash_attn"):
        # tail rows past cu_seqlens[-1] (one more document), another scale, non-causal: what the adapters map
        for causal in (True, False):
            out, lse = flash_attention(q, k, v, torch.tensor(cu[:-1], dtype=torch.int32, device="cuda"),
                                       causal=causal, softmax_scale=0.05, backend=backend)
            ro, rl = per_document_attention(q64, k64, v64, cu, causal=causal, scale=0.05)
            assert rel(out, ro) < 1e-2 and rel(lse, rl) < 1e-3, causal
