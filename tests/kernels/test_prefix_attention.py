"""Shared-prefix attention (flash_attention's prefix_of): n documents packed after one copy of their common prefix
attend to all of it and causally to themselves, against a dense fp64 oracle built from the documents directly."""

import dataclasses
import importlib
import math

import pytest
import torch

from kernels import flash_attention
from kernels.flash_attention import Rows, check_prefix_of, prefix_rows
from tests.kernels import interpreter_tma
from tests.kernels.test_flash_attention import VARIANTS, rel

interpreter_tma.install()
fa = importlib.import_module("kernels.flash_attention")


def prefix_oracle(q, k, v, cu, prefix_of, causal=True, scale=None, total=None):
    """fp64: row i of document b sees document prefix_of[b] whole and its own document (causally); tail rows past
    cu[-1] form one more document. Differentiable."""
    T, Hq, D = q.shape
    G = Hq // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    bounds = list(zip(cu[:-1], cu[1:])) + ([(cu[-1], T)] if cu[-1] < T else [])
    parents = list(prefix_of) + [-1]
    ok = torch.zeros(T, T, dtype=torch.bool)
    for b, (s, e) in enumerate(bounds):
        own = torch.ones(e - s, e - s, dtype=torch.bool)
        ok[s:e, s:e] = own.tril() if causal else own
        if parents[b] >= 0:
            ps, pe = bounds[parents[b]]
            ok[s:e, ps:pe] = True
    qq = q.double().transpose(0, 1)
    kk = k.double().repeat_interleave(G, 1).transpose(0, 1)
    vv = v.double().repeat_interleave(G, 1).transpose(0, 1)
    s = (qq @ kk.transpose(-1, -2) * scale).masked_fill(~ok, -math.inf)
    lse = torch.logsumexp(s, -1)
    return (torch.softmax(s, -1) @ vv).transpose(0, 1), lse.transpose(0, 1)


# (cu_seqlens, prefix_of, tail rows): a prefix with three children (one of length 1), an unrelated document, a
# second prefix with one child, a one-row prefix, tail padding
CASES = [
    ([0, 37, 40, 41, 58, 64, 91, 95], [-1, 0, 0, 0, -1, -1, 5], 0),
    ([0, 1, 20, 33, 50], [-1, 0, 0, -1], 5),
    ([0, 70, 71, 90], [-1, 0, 0], 0),
]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("cu,prefix_of,tail", CASES)
def test_prefix_attention_triton_variants_match_fp64_oracle(variant, cu, prefix_of, tail, monkeypatch):
    """The other Triton configurations (dQ fused into dK/dV by atomics, split passes, TMA loads, ...) take the
    merge epilogue and the accumulating backward as well."""
    monkeypatch.setattr(fa, "INTERPRET_CONFIG", dataclasses.replace(fa.INTERPRET_CONFIG, **VARIANTS[variant]))
    test_prefix_attention_matches_fp64_oracle("triton", cu, prefix_of, tail, 6, 2, 32, True, monkeypatch)


@pytest.mark.parametrize("backend", ["triton", "torch", "torch_small_tiles"])
@pytest.mark.parametrize("cu,prefix_of,tail", CASES)
@pytest.mark.parametrize("hq,hkv,d,causal", [(6, 2, 32, True), (4, 4, 64, False)])
def test_prefix_attention_matches_fp64_oracle(backend, cu, prefix_of, tail, hq, hkv, d, causal, monkeypatch):
    if backend == "torch_small_tiles":  # tiles straddle the prefix / child boundaries and rescale across key tiles
        monkeypatch.setattr(fa, "TORCH_BLOCK_M", 16)
        monkeypatch.setattr(fa, "TORCH_BLOCK_N", 24)
        backend = "torch"
    T = cu[-1] + tail
    q, k, v = (torch.randn(T, h, d).requires_grad_() for h in (hq, hkv, hkv))
    scale = 0.8 / math.sqrt(d)
    out, lse = flash_attention(q, k, v, torch.tensor(cu, dtype=torch.int32), causal=causal, softmax_scale=scale,
                               backend=backend, prefix_of=torch.tensor(prefix_of, dtype=torch.int32))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ro, rl = prefix_oracle(q64, k64, v64, cu, prefix_of, causal, scale)
    assert out.dtype == torch.float32 and rel(out, ro) < 1e-5 and rel(lse, rl) < 1e-5
    go, gl = torch.randn_like(ro), torch.randn_like(rl)
    ((out * go.float()).sum() + (lse * gl.float()).sum()).backward()
    ((ro * go).sum() + (rl * gl).sum()).backward()
    for ours, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel(ours, ref) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_shared_prefix_equals_each_document_with_its_own_copy_of_the_prefix(backend):
    """The training identity: one prefix copy packed before n children gives each child's rows what a separate
    sequence prefix + child gives them, and the prefix's gradient is the sum over those n copies'."""
    P, lengths, hq, hkv, d = 29, [11, 1, 17], 4, 2, 32
    T = P + sum(lengths)
    q, k, v = (torch.randn(T, h, d, requires_grad=True) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, P, P + 11, P + 12, T], dtype=torch.int32)
    out, _ = flash_attention(q, k, v, cu, backend=backend, prefix_of=torch.tensor([-1, 0, 0, 0], dtype=torch.int32))
    go = torch.randn_like(out)
    (out * go).sum().backward()
    # unshared: prefix + child b as one document each, the prefix copied n times
    starts = [P, P + 11, P + 12]
    idx = torch.cat([torch.cat([torch.arange(P), torch.arange(s, s + n)]) for s, n in zip(starts, lengths)])
    q2, k2, v2 = (x.detach()[idx].requires_grad_() for x in (q, k, v))
    cu2 = torch.tensor([0] + [sum(P + n for n in lengths[:i + 1]) for i in range(3)], dtype=torch.int32)
    out2, _ = flash_attention(q2, k2, v2, cu2, backend=backend)
    child_rows = torch.cat([torch.arange(c + P, c + P + n) for c, n in zip(cu2[:-1].tolist(), lengths)])
    assert rel(out[P:], out2[child_rows]) < 1e-5
    # the prefix rows' own outputs are those of any copy; their gradient collects every copy's
    assert rel(out[:P], out2[:P]) < 1e-5
    g2 = torch.zeros_like(out2)
    g2[child_rows] = go[P:]
    g2[:P] = go[:P]  # one copy carries the prefix rows' own output gradient
    (out2 * g2).sum().backward()
    for x, x2 in ((q, q2), (k, k2), (v, v2)):
        summed = torch.zeros_like(x.grad).index_add_(0, idx, x2.grad)
        assert rel(x.grad, summed) < 1e-5


def test_prefix_rows_label_only_children_and_their_prefix_alike():
    cu = torch.tensor([0, 3, 5, 6, 9, 11], dtype=torch.int32)
    prefix_of = torch.tensor([-1, 0, 0, -1, 3], dtype=torch.int32)
    rows = Rows.from_cu_seqlens(cu, 13)  # two tail rows
    qx, kx = prefix_rows(rows, cu, prefix_of)
    same = qx.doc[:, None] == kx.doc[None, :]
    doc = rows.doc.long()
    parent = torch.cat([prefix_of.long(), torch.tensor([-1])])[doc]
    assert torch.equal(same, parent[:, None] == doc[None, :])
    for r in (qx, kx):  # both labellings sorted, as the kernels' range searches need
        assert torch.all(r.key[1:] >= r.key[:-1])
    # the loop bounds: the visible keys exactly, non-decreasing
    lo, hi = fa.key_ranges(qx, kx, causal=False)
    j = torch.arange(len(kx))
    assert torch.equal((j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None]), same)
    assert torch.all(lo[1:] >= lo[:-1]) and torch.all(hi[1:] >= hi[:-1])
    lo, hi = fa.query_ranges(qx, kx, causal=False)
    i = torch.arange(len(qx))
    assert torch.equal((i[:, None] >= lo[None, :]) & (i[:, None] < hi[None, :]), same)
    assert torch.all(lo[1:] >= lo[:-1]) and torch.all(hi[1:] >= hi[:-1])


def test_a_tiles_loop_spans_only_the_keys_its_rows_see(monkeypatch):
    """A query tile holding a group's last responses and the next group's prompt copy (whose rows see nothing in
    the prefix block, their empty range placed at their label's keys) scans the hull of the keys its rows see,
    not the group's response keys in between (the torch reference's tiles; the Triton kernels' _tile_split keeps
    the union, which the forward's registers cannot afford to refine)."""
    monkeypatch.setattr(fa, "TORCH_BLOCK_M", 16)
    P, n, R = 64, 4, 16  # two groups: a prompt copy of 64 rows, then 4 responses of 16
    group = [P + R * i for i in range(n + 1)]
    cu = torch.tensor([0] + group + [P + n * R + b for b in group], dtype=torch.int32)
    prefix_of = torch.tensor([-1] + [0] * n + [-1] + [n + 1] * n, dtype=torch.int32)
    rows = Rows.from_cu_seqlens(cu)
    qx, kx = prefix_rows(rows, cu, prefix_of)
    same = (qx.doc[:, None] == kx.doc[None, :])
    for i0, i1, tiles in fa._torch_tiles(qx, kx, False, len(qx)):
        seen = torch.nonzero(same[i0:i1].any(0)).flatten()
        want = (int(seen.min()), int(seen.max()) + 1) if seen.numel() else None
        got = (tiles[0][0], tiles[-1][1]) if tiles else None
        assert got == want, (i0, got, want)


@pytest.mark.parametrize("prefix_of", [
    [-1, 2, -1, -1],  # a later document
    [-1, 1, -1, -1],  # itself
    [-1, 0, 1, -1],  # a prefix with a prefix
    [0, -1, -1, -1],  # the first document
    [-1, 0, -1, 0],  # a run broken by another document
    [-1, 7, -1, -1],  # no such document
    [-2, -1, -1, -1],
])
def test_prefix_of_must_point_back_to_a_plain_document_followed_by_its_run(prefix_of):
    cu = torch.tensor([0, 3, 5, 6, 9], dtype=torch.int32)
    q = torch.randn(9, 2, 16)
    with pytest.raises(ValueError, match="prefix_of must hold -1 or an earlier document without a prefix"):
        flash_attention(q, q, q, cu, prefix_of=torch.tensor(prefix_of, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"prefix_of must be a 1-D int32 tensor \[4\]"):
        flash_attention(q, q, q, cu, prefix_of=torch.tensor(prefix_of[:3], dtype=torch.int32))


@pytest.mark.parametrize("backend", ["flash_attn", "varlen_attn"])
def test_peer_backends_refuse_prefixes(backend):
    q = torch.randn(9, 2, 16)
    with pytest.raises(ValueError, match="shared prefixes"):
        flash_attention(q, q, q, torch.tensor([0, 4, 9], dtype=torch.int32), backend=backend,
                        prefix_of=torch.tensor([-1, 0], dtype=torch.int32))


def test_check_prefix_of_accepts_runs_and_empty_batches():
    check_prefix_of(torch.tensor([-1, 0, 0, -1, -1, 4], dtype=torch.int32), 6)
    check_prefix_of(torch.zeros(0, dtype=torch.int32), 0)


# ------------------------------------------------------------------------------------------------
# ring_attention with shared prefixes
# ------------------------------------------------------------------------------------------------

# a long prefix with four children (one of length 1, one shorter than 2W), an unrelated document, a short prefix
RING_CU = [0, 61, 70, 71, 74, 93, 110, 113, 125]
RING_PREFIX = [-1, 0, 0, 0, 0, -1, -1, 6]


@pytest.mark.parametrize("world", [2, 3, 4, 8])
@pytest.mark.parametrize("cu,prefix_of", [(RING_CU, RING_PREFIX), ([0, 3, 5, 6, 40], [-1, 0, 0, -1])])
def test_zigzag_plan_prefix_visibility_matches_brute_force(world, cu, prefix_of):
    from kernels.ring_attention import ZigzagPlan, zigzag_indices

    cu, prefix_of = torch.tensor(cu, dtype=torch.int32), torch.tensor(prefix_of, dtype=torch.int32)
    plan = ZigzagPlan.build(cu, world, True, prefix_of=prefix_of)
    rows = Rows.from_cu_seqlens(cu)
    parent = prefix_of.long()[rows.doc.long()]
    for r in range(world):
        mine = zigzag_indices(cu, r, world)
        for s in range(world):
            theirs = zigzag_indices(cu, s, world)
            seen = (parent[mine][:, None] == rows.doc.long()[theirs][None, :]).any()
            assert plan.visible_prefix[r][s] == bool(seen), (r, s)
            assert len(plan.blocks(r, s)) == plan.visible[r][s] + bool(seen)
    if world > 2 and len(cu) == 5:  # short documents: some rank pairs have no prefix block
        assert not all(all(v) for v in plan.visible_prefix)


def test_ring_plan_cache_tells_prefixes_apart():
    ra = importlib.import_module("kernels.ring_attention")  # the package exports the function under this name
    cu, prefix_of = torch.tensor(RING_CU, dtype=torch.int32), torch.tensor(RING_PREFIX, dtype=torch.int32)
    plain = ra._plan(cu, 2, True, "cpu")
    shared = ra._plan(cu, 2, True, "cpu", prefix_of)
    assert plain.prefix is None and shared.prefix is not None
    assert ra._plan(cu, 2, True, "cpu", prefix_of) is shared and ra._plan(cu, 2, True, "cpu") is plain
    # a prefix_of whose values read like more of cu_seqlens is another key still
    other = torch.tensor(RING_PREFIX[:-1] + [-1], dtype=torch.int32)
    assert ra._plan(cu, 2, True, "cpu", other).prefix is not shared.prefix


def _ring_prefix_body(rank, world):
    import torch.distributed as dist

    from kernels import ring_attention, zigzag_shard
    from tests.kernels.test_ring_attention import _subgroups

    cu, prefix_of = torch.tensor(RING_CU, dtype=torch.int32), torch.tensor(RING_PREFIX, dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    q, k, v, go = (torch.randn(RING_CU[-1], h, 16, generator=g) for h in (4, 2, 2, 4))
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref_out, _ = prefix_oracle(q64, k64, v64, RING_CU, RING_PREFIX)
    (ref_out * go.double()).sum().backward()
    ref = (ref_out.detach(), q64.grad, k64.grad, v64.grad)
    pair = _subgroups(2, world)[1](rank)
    runs = [(None, world, "torch")] + ([(pair, 2, "triton")] if rank < 2 else [])
    for group, w, backend in runs:
        r = dist.get_rank(group)
        ql, kl, vl = (zigzag_shard(x, cu, r, w).requires_grad_() for x in (q, k, v))
        out = ring_attention(ql, kl, vl, cu, group, backend=backend, prefix_of=prefix_of)
        (out * zigzag_shard(go, cu, r, w)).sum().backward()
        for name, a, b in zip(("out", "dq", "dk", "dv"), (out.detach(), ql.grad, kl.grad, vl.grad), ref):
            err = rel(a, zigzag_shard(b, cu, r, w))
            assert err < 1e-5, (name, w, backend, err)
    dist.barrier()


@pytest.mark.distributed
def test_ring_attention_with_shared_prefixes_matches_fp64_on_4_and_2_ranks():
    from tests.distributed import run_distributed

    run_distributed(_ring_prefix_body, 4)


@pytest.mark.gpu
def test_prefix_attention_bf16_cuda():
    """The compiled Triton kernels (merge epilogue, accumulating backward) on a prompt shared by four responses
    (one of one token), head_dim 128, GQA 32/8, against the fp64 oracle, per document too."""
    from tests.kernels.segments import worst_segment_error

    cu = [0, 1500, 1800, 1801, 2318, 2568, 2900]
    prefix_of = [-1, 0, 0, 0, 0, -1]
    T = cu[-1]
    q, k, v = (torch.randn(T, h, 128, dtype=torch.bfloat16, device="cuda").requires_grad_() for h in (32, 8, 8))
    out, lse = flash_attention(q, k, v, torch.tensor(cu, dtype=torch.int32, device="cuda"), backend="triton",
                               prefix_of=torch.tensor(prefix_of, dtype=torch.int32, device="cuda"))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ro, rl = prefix_oracle(q64, k64, v64, cu, prefix_of)
    go = torch.randn_like(ro)
    (out.float() * go.float()).sum().backward()
    (ro * go).sum().backward()
    for name, ours, ref in (("out", out, ro), ("lse", lse, rl), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad),
                            ("dv", v.grad, v64.grad)):
        tol = 1e-3 if name == "lse" else 2e-2
        assert rel(ours, ref) < tol, name
        err, doc = worst_segment_error(ours, ref, cu)
        assert err < tol, (name, doc, err)
