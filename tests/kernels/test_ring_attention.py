"""zigzag_shard properties and ring_attention on 2, 3, 4 and 8 gloo ranks vs unsharded fp64 attention."""

import importlib
import random
import re

import pytest
import torch
import torch.distributed as dist

from kernels.flash_attention import Rows
from kernels.ring_attention import ZigzagPlan, _owners, comm_stats, ring_attention, zigzag_indices, zigzag_shard
from tests.distributed import run_distributed
from tests.kernels.segments import worst_segment_error
from tests.kernels.test_flash_attention import per_document_attention, rel

ra = importlib.import_module("kernels.ring_attention")  # the module (the package exports the function)


def _cu(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


# ------------------------------------------------------------------------------------------------
# zigzag_shard
# ------------------------------------------------------------------------------------------------


def test_shard_and_ring_check_inputs_before_any_communication():
    x = torch.randn(9, 2)
    with pytest.raises(ValueError, match="end at the 9 packed rows"):
        zigzag_shard(x, torch.tensor(_cu([4, 3]), dtype=torch.int32), 0, 2)  # x has 2 rows no document holds
    with pytest.raises(ValueError, match="never decrease"):
        zigzag_shard(x, torch.tensor([0, 6, 4, 9], dtype=torch.int32), 0, 2)
    for rank in (-1, 2):
        with pytest.raises(ValueError, match=f"rank {rank} outside world of 2"):
            zigzag_shard(x, torch.tensor(_cu([4, 5]), dtype=torch.int32), rank, 2)
    for rank, world in ((1, 1.5), (0.0, 2), (torch.tensor([0, 1]), 2)):  # a float world gave a nonsense shard
        with pytest.raises(TypeError, match="(rank|world) must be an int"):
            zigzag_shard(x, torch.tensor(_cu([4, 5]), dtype=torch.int32), rank, world)
    assert torch.equal(zigzag_shard(x, torch.tensor(_cu([4, 5]), dtype=torch.int32), torch.tensor(1), 2),
                       zigzag_shard(x, torch.tensor(_cu([4, 5]), dtype=torch.int32), 1, 2))
    # bad GQA: raised at the call, before a K/V block is posted to a peer (no process group is needed to see it)
    q, k = torch.randn(4, 3, 16), torch.randn(4, 2, 16)
    with pytest.raises(ValueError, match="Hq % Hkv == 0"):
        ring_attention(q, k, k, torch.tensor([0, 8], dtype=torch.int32), group=None)
    with pytest.raises(ValueError, match="same rows in one dtype"):
        ring_attention(q, k[:3, :1], k[:3, :1], torch.tensor([0, 8], dtype=torch.int32), group=None)
    # the ring runs our kernels' block steps (partial outputs merged by LSE): flash-attn is no choice there
    with pytest.raises(ValueError, match="unknown local attention backend 'flash_attn'; valid: 'auto', 'triton', "
                                         "'torch'$"):
        ring_attention(k, k, k, torch.tensor([0, 4], dtype=torch.int32), group=None, backend="flash_attn")
    # prefix_of as given, as flash_attention checks it (a float one was truncated, a 2-D one failed in torch.cat)
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    for bad in (torch.tensor([-1.0, 0.9]), torch.tensor([[-1, 0]], dtype=torch.int32),
                torch.tensor([-1], dtype=torch.int32)):
        with pytest.raises(ValueError, match=r"prefix_of must be a 1-D int32 tensor \[2\] \(one entry per document\); "
                                             + re.escape(f"got {bad.dtype} {tuple(bad.shape)}")):
            ring_attention(k, k, k, cu, group=None, prefix_of=bad)


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_zigzag_shard_partitions_every_document_into_2w_chunks(world):
    rng = random.Random(world)
    for _ in range(4):
        # lengths 0 .. 3*2W: documents shorter than 2W (some empty), and longer ones
        lengths = [rng.randint(0, 6 * world) for _ in range(rng.randint(1, 7))]
        cu = _cu(lengths)
        cu_t = torch.tensor(cu, dtype=torch.int32)
        T = cu[-1]
        x = torch.randn(T, 3)
        seen = []
        for r in range(world):
            idx = zigzag_indices(cu_t, r, world)
            assert torch.equal(zigzag_shard(x, cu_t, r, world), x[idx])
            assert bool((idx[1:] > idx[:-1]).all()), "rows must stay in global order"
            expect = []
            for b, n in enumerate(lengths):
                bounds = [c * n // (2 * world) for c in range(2 * world + 1)]
                sizes = [bounds[c + 1] - bounds[c] for c in range(2 * world)]
                assert max(sizes) - min(sizes) <= 1  # near-equal chunks, no padding
                for c in sorted({r, 2 * world - 1 - r}):
                    expect += range(cu[b] + bounds[c], cu[b] + bounds[c + 1])
            assert idx.tolist() == expect
            seen += idx.tolist()
        assert sorted(seen) == list(range(T))


def test_zigzag_balances_causal_work_on_mixed_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(1, 3000) for _ in range(40)] + [1, 2, 3, 5, 7]
    cu = torch.tensor(_cu(lengths), dtype=torch.int32)
    for world in (2, 4, 8):
        owner, rows = _owners(cu, world)
        # causal work of a query row = number of keys it sees = pos + 1
        work = torch.bincount(owner, weights=rows.pos.double() + 1, minlength=world)
        assert work.max() / work.min() <= 1.05, work


@pytest.mark.parametrize("lengths", [[1, 7, 60, 3, 17, 6], [1, 3, 2, 5, 1]])
def test_zigzag_plan_visibility_matches_brute_force(lengths):
    cu = torch.tensor(_cu(lengths), dtype=torch.int32)
    world = 4
    for causal in (True, False):
        plan = ZigzagPlan.build(cu, world, causal)
        rows = Rows.from_cu_seqlens(cu)
        for r in range(world):
            qi = zigzag_indices(cu, r, world)
            assert plan.counts[r] == qi.numel()
            assert torch.equal(plan.rows[r].doc, rows.doc[qi]) and torch.equal(plan.rows[r].pos, rows.pos[qi])
            for s in range(world):
                ki = zigzag_indices(cu, s, world)
                ok = rows.doc[qi][:, None] == rows.doc[ki][None, :]
                if causal:
                    ok &= rows.pos[ki][None, :] <= rows.pos[qi][:, None]
                assert plan.visible[r][s] == bool(ok.any()), (causal, r, s)
        if causal and max(lengths) < 2 * world:  # short documents only: some block pairs are skipped
            assert not all(all(v) for v in plan.visible)


def test_plan_cache_stays_bounded():
    ra._PLANS.clear()
    for n in range(1, 12):
        ra._plan(torch.tensor(_cu([n, 3])), 2, True, "cpu")
    assert len(ra._PLANS) <= 8
    last = ra._plan(torch.tensor(_cu([11, 3])), 2, True, "cpu")
    assert ra._plan(torch.tensor(_cu([11, 3])), 2, True, "cpu") is last  # a hit, not a rebuild


# ------------------------------------------------------------------------------------------------
# ring_attention
# ------------------------------------------------------------------------------------------------


def _global_inputs(cu, hq, hkv, d, seed=1234, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    T = cu[-1]
    return [torch.randn(T, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv, hq)]  # q, k, v, dout


def _reference(q, k, v, go, cu, causal):
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    out, _ = per_document_attention(q64, k64, v64, cu, causal)
    (out * go.double()).sum().backward()
    return out.detach(), q64.grad, k64.grad, v64.grad


def _run_ring(q, k, v, go, cu_t, rank, world, group, causal, backend):
    ql, kl, vl = (zigzag_shard(x, cu_t, rank, world).requires_grad_() for x in (q, k, v))
    out = ring_attention(ql, kl, vl, cu_t, group, causal=causal, backend=backend)
    (out.float() * zigzag_shard(go, cu_t, rank, world).float()).sum().backward()
    return out.detach(), ql.grad, kl.grad, vl.grad


def _check_case(group, lengths, hq, hkv, d, causal, backend, tol):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    cu = _cu(lengths)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    q, k, v, go = _global_inputs(cu, hq, hkv, d)
    ref = _reference(q, k, v, go, cu, causal)
    comm_stats.reset()
    steps = {"fwd": 0, "bwd": 0}  # ring steps this rank computes: one per visible block pair, in each pass
    fwd_step, bwd_step = ra.ring_fwd_step, ra.ring_bwd_step

    def counted(name, fn):
        return lambda *a, **kw: steps.__setitem__(name, steps[name] + 1) or fn(*a, **kw)

    ra.ring_fwd_step, ra.ring_bwd_step = counted("fwd", fwd_step), counted("bwd", bwd_step)
    try:
        ours = _run_ring(q, k, v, go, cu_t, rank, world, group, causal, backend)
    finally:
        ra.ring_fwd_step, ra.ring_bwd_step = fwd_step, bwd_step
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        b_local = zigzag_shard(b, cu_t, rank, world)
        assert a.shape == b_local.shape
        if b_local.norm() > 1e-3 * b.norm():
            err = rel(a, b_local)
        else:  # e.g. dq of rows that see only themselves is exactly 0: measure against the global norm
            err = ((a.double() - b_local).norm() / b.norm()).item()
        assert err < tol, (name, rank, world, lengths, causal, backend, err)
    # the forward sends this rank's block and then W-2 relayed ones: every block but rank+1's
    plan = ZigzagPlan.build(cu_t, world, causal)
    sent_rows = sum(plan.counts[(rank - i) % world] for i in range(world - 1))
    assert comm_stats.fwd_bytes == sent_rows * 2 * hkv * d * q.element_size()
    # the backward sends the same K/V blocks, plus an fp32 dK/dV accumulator of every block (the last hop brings
    # each home): all T rows once when W > 1
    grad_rows = cu[-1] if world > 1 else 0
    assert comm_stats.bwd_bytes == (sent_rows * q.element_size() + grad_rows * 4) * 2 * hkv * d
    # fully masked block pairs are skipped, in both passes
    assert steps["fwd"] == steps["bwd"] == sum(plan.visible[rank]), (steps, plan.visible[rank])


def _global_err(pairs):
    """Relative error over all ranks: sqrt(sum |a-b|^2 / sum |b|^2) for each (a, b) pair."""
    num_den = torch.tensor([[(a.double() - b.double()).norm() ** 2, b.double().norm() ** 2] for a, b in pairs])
    dist.all_reduce(num_den)
    return (num_den[:, 0] / num_den[:, 1]).sqrt()


def _bf16_error_growth(rank, world, lengths, solo):
    """bf16 inputs: errors of out, dq, dk, dv over the whole ring at W=world and at W=1 (vs fp64)."""
    cu = _cu(lengths)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    q, k, v, go = _global_inputs(cu, 4, 2, 32, seed=7, dtype=torch.bfloat16)
    ref = _reference(q, k, v, go, cu, True)
    ours = _run_ring(q, k, v, go, cu_t, rank, world, None, True, "torch")
    err_w = _global_err([(a, zigzag_shard(b, cu_t, rank, world)) for a, b in zip(ours, ref)])
    ours1 = _run_ring(q, k, v, go, cu_t, 0, 1, solo, True, "torch")
    err_1 = torch.tensor([rel(a, b) for a, b in zip(ours1, ref)], dtype=torch.float64)
    assert (err_w > 0).all() and (err_1 > 0).all()
    assert (err_w <= 2 * err_1).all(), (err_w, err_1)


CASES = {  # documents shorter than 2W (incl. length 1) and one longer than a whole shard (T / W rows)
    2: [1, 3, 40, 2, 11],
    3: [1, 5, 50, 4, 13],
    4: [1, 7, 60, 3, 17, 6],
    8: [1, 5, 9, 150, 15, 2],
}


def _subgroups(size, world):
    """Consecutive groups of `size` ranks (new_group is entered by every rank, in the same order)."""
    groups = [dist.new_group(list(range(s, s + size))) for s in range(0, world - size + 1, size)]
    return groups, lambda rank: groups[rank // size] if rank // size < len(groups) else None


def _ring_body(rank, world):
    """One spawn of 8 ranks: rings of 8, of 4 (two groups), of 3 and of 2 (sub-groups), and of 1."""
    assert world == 8
    for w in CASES:
        lengths = CASES[w]
        assert max(lengths) > sum(lengths) / w and min(lengths) < 2 * w
    solo = _subgroups(1, world)[1](rank)
    mine = {w: _subgroups(w, world)[1](rank) for w in (2, 3, 4)}
    _check_case(None, CASES[8], 4, 2, 32, True, "torch", 1e-5)
    for w in (2, 3, 4):
        if mine[w] is not None:
            _check_case(mine[w], CASES[w], 4, 2, 32, True, "torch", 1e-5)
    if mine[3] is not None:
        _check_case(mine[3], CASES[3], 6, 3, 16, False, "torch", 1e-5)
    if mine[4] is not None:  # only documents shorter than 2W: rank 1 holds no row, yet joins every hop
        assert ZigzagPlan.build(torch.tensor(_cu([1, 2, 3])), 4).counts[1] == 0
        _check_case(mine[4], [1, 2, 3], 4, 2, 32, True, "torch", 1e-5)
    if mine[2] is not None and rank < 2:  # Triton kernels under the interpreter: one small ring
        _check_case(mine[2], [1, 3, 21, 2, 5], 4, 2, 16, True, "triton", 1e-5)
    _bf16_error_growth(rank, world, CASES[8], solo)
    # rows that are not this rank's zigzag shard of cu_seqlens (a per-rank cu_seqlens passed by mistake)
    x = torch.randn(5, 2, 16)
    with pytest.raises(ValueError, match=r"rank 0 holds 5 q / 5 k rows, but zigzag_shard .* cu_seqlens .* gives it 9"):
        ring_attention(x, x, x, torch.tensor([0, 9], dtype=torch.int32), solo, backend="torch")
    # double backward is refused by name (the ring's backward builds no graph: a second derivative would be wrong)
    x.requires_grad_()
    y = ring_attention(x, x, x, torch.tensor([0, 5], dtype=torch.int32), solo, backend="torch")
    with pytest.raises(RuntimeError, match="ring_attention is differentiable once"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    dist.barrier()


@pytest.mark.distributed
def test_ring_attention_matches_unsharded_on_2_3_4_8_ranks():
    run_distributed(_ring_body, 8)


# ------------------------------------------------------------------------------------------------
# one-device replay of the ring's schedule (bench.attention's ring estimate on one GPU)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world,backend", [(3, "torch"), (8, "torch"), (3, "triton")])
def test_ring_replay_runs_the_ring_steps_and_matches_unsharded(world, backend):
    from bench.attention import replay_ring

    lengths = [1, 5, 2 * world - 1, 41, 97, 3]  # documents shorter than 2W and longer than a shard
    cu = _cu(lengths)
    q, k, v, go = _global_inputs(cu, 4, 2, 16, seed=world)
    res = replay_ring(q, k, v, go, torch.tensor(cu, dtype=torch.int32), world, backend=backend)
    for name, ref in zip(("out", "dq", "dk", "dv"), _reference(q, k, v, go, cu, True)):
        assert rel(res[name], ref) < 1e-5, name
    # one timing per (step, rank) in each pass, one per rank between the passes
    assert [len(t) for t in res["t_fwd"]] == [world] * world and len(res["t_bwd"]) == world
    assert len(res["t_pre"]) == world
    assert all(t >= 0 for ts in res["t_fwd"] + res["t_bwd"] for t in ts)
    assert sum(map(sum, res["t_fwd"])) > 0 and sum(map(sum, res["t_bwd"])) > 0  # the steps were really timed


@pytest.mark.gpu
def test_ring_replay_bf16_cuda_matches_local_kernel():
    """The ring's steps with the real kernels (fused merge epilogue, accumulating backward) on one GPU."""
    from bench.attention import replay_ring
    from kernels.flash_attention import flash_attention

    lengths = [1, 15, 700, 3000, 77, 2300]
    cu = torch.tensor(_cu(lengths), dtype=torch.int32, device="cuda")
    q, k, v, go = (x.cuda() for x in _global_inputs(_cu(lengths), 32, 8, 128, dtype=torch.bfloat16))
    res = replay_ring(q, k, v, go, cu, 8)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    out64, _ = flash_attention(q64, k64, v64, cu, backend="torch")
    (out64 * go.double()).sum().backward()
    for name, ref in (("out", out64), ("dq", q64.grad), ("dk", k64.grad), ("dv", v64.grad)):
        assert rel(res[name], ref.detach()) < 2e-2, name
        err, doc = worst_segment_error(res[name], ref, cu.tolist())  # a lost chunk or document reads ~1 here
        assert err < 2e-2, (name, doc, err)
