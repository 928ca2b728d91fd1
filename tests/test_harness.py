import pytest
import torch
import torch.distributed as dist
import triton
import triton.language as tl

from kernels.aot import report
from tests.distributed import run_distributed


@triton.jit
def _tile_matmul(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=(rm[:, None] < M) & (k0 + rk < K)[None, :],
                    other=0.0)
        b = tl.load(b_ptr + (k0 + rk)[:, None] * N + rn[None, :], mask=(k0 + rk < K)[:, None] & (rn[None, :] < N),
                    other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def test_tile_matmul_interpreter_matches_fp64():
    M, N, K = 37, 45, 70
    a, b = torch.randn(M, K), torch.randn(K, N)
    c = torch.full((M, N), float("nan"))
    _tile_matmul[(triton.cdiv(M, 16), triton.cdiv(N, 16))](a, b, c, M, N, K, BM=16, BN=16, BK=16)
    ref = a.double() @ b.double()
    assert ((c.double() - ref).norm() / ref.norm()) < 1e-5


def test_aot_sm90_matmul_shows_hgmma_and_no_spills():
    sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32"}
    r = report(_tile_matmul, sig, {"BM": 128, "BN": 128, "BK": 64}, num_warps=8, num_stages=3)
    assert r.has_hgmma, r.sass_histogram
    assert r.local_bytes == 0 and r.spill_stores == 0 and r.spill_loads == 0
    assert 0 < r.shared_bytes <= 227 * 1024
    assert 0 < r.registers <= 255


def _allreduce_body(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert t.item() == world * (world + 1) / 2


def _failing_body(rank, world):
    if rank == 1:
        raise ValueError("boom on rank one")


@pytest.mark.distributed
def test_run_distributed_allreduce():
    run_distributed(_allreduce_body, 3)


@pytest.mark.distributed
def test_run_distributed_propagates_rank_failure():
    with pytest.raises(AssertionError, match="boom on rank one"):
        run_distributed(_failing_body, 2)


def _killed_body(rank, world):
    import os
    import signal

    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # no traceback: its peer sees only a closed connection
    dist.all_reduce(torch.ones(1))


@pytest.mark.distributed
def test_run_distributed_names_a_rank_that_died_without_a_traceback():
    with pytest.raises(AssertionError, match=r"1 rank\(s\) failed \(and ranks died without a traceback, with exit "
                                             r"codes: \[\(1, -9\)\]\)"):
        run_distributed(_killed_body, 2, timeout=60)


def _hanging_body(rank, world):
    import time

    if rank == world - 1:
        time.sleep(600)  # never joins its peers' barrier
    dist.barrier()


@pytest.mark.distributed
def test_run_distributed_gives_up_at_one_deadline_with_the_waiting_ranks_tracebacks():
    """A hang was reported after world_size x timeout (a join per rank), without a traceback from the ranks left
    waiting in gloo's 30-minute collective timeout: one deadline now, and those ranks raise before it."""
    import time

    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)2 rank\(s\) failed \(and ranks died without a traceback, with "
                                             r"exit codes: \[\(2, 'still running'\)\]\).*--- rank 0 ---.*barrier"):
        run_distributed(_hanging_body, 3, timeout=30)  # its ranks' start (spawn, import torch) takes seconds
    assert time.monotonic() - t0 < 2 * 30  # was up to 3 x 30 s
