"""kernels.linear_logprob_entropy: Triton kernels (interpreter) and torch backend vs an fp64 oracle,
memory of the torch backend, and the sm_90 AOT compile of every kernel at its production config."""

from __future__ import annotations

import pytest
import torch

import kernels
import kernels.logprob as L
from bench.common import peak_extra_memory
from kernels import aot
from kernels.aot import KernelResources
from kernels.logprob import AOT_CONFIGS, KernelConfig, linear_logprob_entropy_reference
from tests.kernels.segments import each_row, worst_segment_error

QWEN3_VOCAB = 151_936
IGNORE = -100


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def _problem(n: int, hdim: int, v: int, dtype: torch.dtype, ignored: slice | None = None):
    """Random inputs (already rounded to dtype), targets with ignored rows, random upstream grads."""
    h = torch.randn(n, hdim).to(dtype)
    w = (torch.randn(v, hdim) * 0.3).to(dtype)
    t = torch.randint(0, v, (n,))
    t[::7] = IGNORE
    if ignored is not None:  # a whole-tile block of ignored rows exercises the kernels' tile skipping
        t[ignored] = IGNORE
    g_lp, g_ent = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    return h, w, t, g_lp, g_ent


def _oracle(h, w, t, temperature, g_lp, g_ent):
    h64 = h.double().requires_grad_()
    w64 = w.double().requires_grad_()
    lp, ent = linear_logprob_entropy_reference(h64, w64, t, temperature, ignore_index=IGNORE)
    dh, dw = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (h64, w64))
    return lp.detach(), ent.detach(), dh, dw


def _ours(h, w, t, temperature, g_lp, g_ent, **kw):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    lp, ent = kernels.linear_logprob_entropy(h, w, t, temperature, ignore_index=IGNORE, **kw)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == t.shape
    dh, dw = torch.autograd.grad((lp * g_lp.float()).sum() + (ent * g_ent.float()).sum(), (h, w))
    assert dh.dtype == h.dtype and dw.dtype == w.dtype
    return lp.detach(), ent.detach(), dh, dw


def _check(h, w, t, temperature, g_lp, g_ent, grad_tol, **kw):
    lp, ent, dh, dw = _ours(h, w, t, temperature, g_lp, g_ent, **kw)
    rlp, rent, rdh, rdw = _oracle(h, w, t, temperature, g_lp, g_ent)
    ign = t == IGNORE
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert (lp <= 0).all()
    assert (lp[ign] == 0).all() and (ent[ign] == 0).all() and (dh[ign] == 0).all()
    assert (ent[~ign] > 0).all()
    errs = {"logprob": _rel(lp, rlp), "entropy": _rel(ent, rent), "dh": _rel(dh, rdh), "dW": _rel(dw, rdw)}
    # outputs are fp32 whatever the input dtype; 16-bit grads carry dz and the result rounded to 16 bits
    assert errs["logprob"] <= 1e-4 and errs["entropy"] <= 1e-4, errs
    assert errs["dh"] <= grad_tol and errs["dW"] <= grad_tol, errs


# ------------------------------------------------------------------ Triton kernels, interpreter


@pytest.fixture
def fused_tiles(monkeypatch):
    """The fused Triton layouts (forward tiles, atomic backward) instead of the GEMM-block defaults."""
    monkeypatch.setattr(L, "FWD_MODE", "triton")
    monkeypatch.setattr(L, "BWD_MODE", "atomic")


@pytest.mark.parametrize(
    "dtype,temperature,deterministic",
    [(torch.float32, 0.7, False), (torch.float32, 1.0, True), (torch.float16, 0.7, True),
     (torch.float16, 1.0, False)],
)
def test_triton_matches_fp64_odd_shapes(fused_tiles, monkeypatch, dtype, temperature, deterministic):
    # production block configs; a small fp32 scratch so 16-bit grads go through several token and
    # vocabulary chunks (the path Qwen3's bf16 LM head takes on a GPU)
    monkeypatch.setattr(L, "SCRATCH_BYTES", 256 * 96 * 4)
    h, w, t, g_lp, g_ent = _problem(333, 96, 1237, dtype, ignored=slice(0, 150))
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    _check(h, w, t, temperature, g_lp, g_ent, tol, backend="triton", deterministic=deterministic)


@pytest.mark.parametrize("layout,offset", [("gemm", -30.0), ("fused", -30.0), ("gemm", -100.0)])
def test_far_negative_logits_keep_padded_columns_out(monkeypatch, layout, offset):
    # every logit near -43 (T = 0.7): a padded column of the ragged last vocabulary tile that leaked into the
    # statistics as logit 0 instead of -inf would dominate the softmax, where random N(0, 1) logits hide it.
    # Near -143: exp(z) underflows fp32, so the running max must start below every logit (not at 0)
    if layout == "fused":
        monkeypatch.setattr(L, "FWD_MODE", "triton")
        monkeypatch.setattr(L, "BWD_MODE", "atomic")
    h, w, t, g_lp, g_ent = _problem(45, 32, 1237, torch.float32)
    h[:, 0], w[:, 0] = 1.0, offset
    h[:, 1:] *= 0.1
    lp, _ = kernels.linear_logprob_entropy(h, w, t, 0.7, ignore_index=IGNORE, backend="torch")
    assert (lp[t != IGNORE] < -1.0).all()  # a spread distribution: every class matters, none dominates
    if offset > -50:
        _check(h, w, t, 0.7, g_lp, g_ent, 1e-4, backend="triton")
    else:  # forward only: dh's column 0 is -100 x (a row sum of dz that cancels to ~0), fp32 noise relative to it
        lp, ent = kernels.linear_logprob_entropy(h, w, t, 0.7, ignore_index=IGNORE, backend="triton")
        rlp, rent, _, _ = _oracle(h, w, t, 0.7, g_lp, g_ent)
        assert _rel(lp, rlp) <= 1e-5 and _rel(ent, rent) <= 1e-5


def test_triton_16bit_backward_scratch_stays_within_budget(fused_tiles, monkeypatch):
    """The split backward (16-bit weight too large for an fp32 dW copy) keeps its fp32 scratch within
    SCRATCH_BYTES in total, whatever the number of token / vocabulary chunks: every fp32 2-D tensor it
    allocates is recorded, and their sizes must add up to at most the budget."""
    from torch.utils._python_dispatch import TorchDispatchMode

    allocs = {torch.ops.aten.empty.memory_format, torch.ops.aten.zeros.default, torch.ops.aten.empty_strided.default,
              torch.ops.aten.new_zeros.default, torch.ops.aten.new_empty.default, torch.ops.aten.zeros_like.default,
              torch.ops.aten.empty_like.default}

    class Fp32Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in allocs and out.dtype == torch.float32 and out.dim() == 2:
                self.bytes.append(out.numel() * 4)
            return out

    budget = 256 * 96 * 4  # 256 rows of fp32 scratch: 333 tokens and 1237 vocab rows take several chunks each
    monkeypatch.setattr(L, "SCRATCH_BYTES", budget)
    h, w, t, g_lp, g_ent = _problem(333, 96, 1237, torch.float16)
    h.requires_grad_()
    w.requires_grad_()
    lp, ent = kernels.linear_logprob_entropy(h, w, t, 0.7, backend="triton")
    mode = Fp32Allocations()
    with mode:
        torch.autograd.backward((lp, ent), (g_lp.float(), g_ent.float()))
    assert mode.bytes, "no fp32 scratch recorded: the split path did not run"
    assert sum(mode.bytes) <= budget, mode.bytes
    assert h.grad is not None and w.grad is not None


@pytest.mark.parametrize(
    "dtype,temperature,fwd,rows,dh_group",
    [(torch.float32, 0.7, "gemm", 128, 1), (torch.float16, 1.0, "gemm", 512, 1),
     (torch.float16, 0.7, "triton", 128, 1), (torch.float32, 1.0, "triton", 512, 1),
     (torch.float32, 0.7, "gemm", 512, 2), (torch.float16, 1.0, "gemm", 512, 3)],
)
def test_gemm_layouts_match_fp64_odd_shapes(monkeypatch, dtype, temperature, fwd, rows, dh_group):
    """FWD_MODE / BWD_MODE "gemm": logits blocks from GEMMs, row statistics and dz by Triton, dh / dW by block
    GEMMs. Small blocks so 333 tokens (183 with gradient) and 1237 vocabulary rows take several partial blocks;
    GEMM_ROWS 128 takes the two-pass backward, 512 the one-pass backward, there with DH_GROUP blocks per dh GEMM
    (1237 = 3 x 384 + 85: groups of 2 and 3 end in a partial group)."""
    monkeypatch.setattr(L, "FWD_MODE", fwd)
    monkeypatch.setattr(L, "BWD_MODE", "gemm")
    monkeypatch.setattr(L, "GEMM_ROWS", rows)
    monkeypatch.setattr(L, "GEMM_COLS", 384)
    monkeypatch.setattr(L, "DH_GROUP", dh_group)
    h, w, t, g_lp, g_ent = _problem(333, 96, 1237, dtype, ignored=slice(0, 150))
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    _check(h, w, t, temperature, g_lp, g_ent, tol, backend="triton")


@pytest.mark.parametrize("dh_group", [1, 2])
def test_gemm_layouts_one_pass_and_two_pass_agree(monkeypatch, dh_group):
    """The one-pass backward (rows with gradient fit one block) and the two-pass one give the same dh and dW,
    also when only one of them is wanted (the one-pass loop then computes dW alone)."""
    monkeypatch.setattr(L, "BWD_MODE", "gemm")
    monkeypatch.setattr(L, "DH_GROUP", dh_group)
    monkeypatch.setattr(L, "GEMM_COLS", 200)
    h, w, t, g_lp, g_ent = _problem(150, 40, 701, torch.float32)
    got = {}
    for rows in (64, 1024):
        monkeypatch.setattr(L, "GEMM_ROWS", rows)
        for wanted in ("both", "dh", "dw"):
            hh, ww = h.clone().requires_grad_(wanted != "dw"), w.clone().requires_grad_(wanted != "dh")
            lp, ent = kernels.linear_logprob_entropy(hh, ww, t, 0.7, backend="triton")
            inputs = [x for x in (hh, ww) if x.requires_grad]
            got[rows, wanted] = torch.autograd.grad((lp * g_lp.float()).sum() + (ent * g_ent.float()).sum(), inputs)
    _, _, rdh, rdw = _oracle(h, w, t, 0.7, g_lp, g_ent)
    for (rows, wanted), grads in got.items():
        refs = {"both": (rdh, rdw), "dh": (rdh,), "dw": (rdw,)}[wanted]
        for g, r in zip(grads, refs):
            assert _rel(g, r) <= 1e-4, (rows, wanted)


def test_gemm_forward_matches_fp64_full_qwen3_vocab(monkeypatch):
    monkeypatch.setattr(L, "FWD_MODE", "gemm")
    monkeypatch.setattr(L, "BWD_MODE", "gemm")
    monkeypatch.setattr(L, "GEMM_COLS", 32768)  # 151,936 = 4 full blocks + a partial one
    h, w, t, g_lp, g_ent = _problem(37, 40, QWEN3_VOCAB, torch.float32)
    t[3] = QWEN3_VOCAB - 1  # last id: inside the last, partial block
    _check(h, w, t, 0.7, g_lp, g_ent, 1e-4, backend="triton")


def test_block_cols_widens_for_few_rows_within_bounds():
    assert L.block_cols(2048, rows=1024, cols=384, cols_max=4096) == 384  # a full token block: cols
    assert L.block_cols(1024, rows=1024, cols=384, cols_max=4096) == 384
    assert L.block_cols(100, rows=1024, cols=384, cols_max=4096) == 3840  # 384 x 1024 / 100, to a multiple of 256
    assert L.block_cols(1, rows=1024, cols=384, cols_max=4096) == 4096  # capped at cols_max
    assert L.block_cols(0, rows=1024, cols=384, cols_max=4096) == 4096
    assert L.block_cols(1000, rows=1024, cols=384, cols_max=4096) == 384  # 393 rounds down to 256: never < cols


@pytest.mark.parametrize("rows,dh_group", [(128, 1), (1024, 1), (1024, 2)])
def test_gemm_layouts_never_allocate_more_than_a_block(monkeypatch, rows, dh_group):
    """No tensor the GEMM forward or backward allocates is larger than one logits block (GEMM_ROWS x
    GEMM_COLS elements) or the hidden states (dh, the gradient itself); an [N, V] tensor would be 13x larger
    than either here. The token blocks are gathered one at a time, so no N x H copy of the live rows appears
    either (the sizes are exact). GEMM_ROWS 1024 > the live rows: the blocks widen to 256 columns
    (block_cols) but keep within GEMM_ROWS x GEMM_COLS elements; DH_GROUP 2 puts two dz blocks side by side."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(L, "FWD_MODE", "gemm")
    monkeypatch.setattr(L, "BWD_MODE", "gemm")
    monkeypatch.setattr(L, "GEMM_ROWS", rows)
    monkeypatch.setattr(L, "GEMM_COLS", 128)
    monkeypatch.setattr(L, "DH_GROUP", dh_group)
    bound = rows * 128 * dh_group  # elements of one block (of the dz group in the one-pass backward)
    h, w, t, g_lp, g_ent = _problem(333, 96, 1237, torch.float16)
    h.requires_grad_()
    w.requires_grad_()
    sizes = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dim() == 2 and out.numel() != w.numel():  # dW: the output
                sizes.append(tuple(out.shape))
            return out

    with Sizes():
        lp, ent = kernels.linear_logprob_entropy(h, w, t, 0.7, backend="triton")
        torch.autograd.backward((lp, ent), (g_lp.float(), g_ent.float()))
    big = [s for s in sizes if s[0] * s[1] > bound]
    assert sizes and all(s == tuple(h.shape) for s in big), sorted(set(sizes))  # only dh may be that large
    if rows == 128:
        assert big  # dh (333 x 96) is larger than a block: the check does see large tensors
    else:  # 333 tokens, <= 333 live: 128 x 1024 / 333 = 393 -> 256 columns per block
        assert L.block_cols(333) == 256 and L.block_cols(1024) == 128
        assert any(s[1] == 256 for s in sizes), sorted(set(sizes))
        assert any(s[1] == 512 for s in sizes) == (dh_group == 2), sorted(set(sizes))  # a dz group of 2 blocks
    for name, bad in (("FWD_MODE", "fused"), ("BWD_MODE", "fast")):
        monkeypatch.setattr(L, name, bad)
        with pytest.raises(ValueError, match=name):
            lp, ent = kernels.linear_logprob_entropy(h, w, t, 0.7, backend="triton")
            lp.sum().backward()
        monkeypatch.undo()


# the interpreter walks tiles in Python: at the full vocabulary use wide vocab tiles (same kernels)
_WIDE = KernelConfig(block_m=64, block_n=4096, block_k=32, num_warps=4, num_stages=1, block_h=32, group_m=2)


def test_triton_matches_fp64_full_qwen3_vocab(fused_tiles, monkeypatch):
    for name in ("FWD_CONFIG", "BWD_CONFIG", "BWD_DET_CONFIG"):
        monkeypatch.setattr(L, name, _WIDE)
    h, w, t, g_lp, g_ent = _problem(37, 40, QWEN3_VOCAB, torch.float32)
    t[3] = QWEN3_VOCAB - 1  # last id: inside the last, partial vocab tile
    _check(h, w, t, 0.7, g_lp, g_ent, 1e-4, backend="triton")


@pytest.mark.parametrize("backend,fwd,bwd", [("triton", "triton", "atomic"), ("triton", "gemm", "gemm"),
                                             ("torch", None, None)])
def test_single_output_grads(monkeypatch, backend, fwd, bwd):
    """Gradient through logprob alone and entropy alone (the other output's grad is None)."""
    if backend == "triton":
        monkeypatch.setattr(L, "FWD_MODE", fwd)
        monkeypatch.setattr(L, "BWD_MODE", bwd)
    else:  # several token and vocab chunks
        monkeypatch.setattr(L, "TOKEN_CHUNK", 32)
        monkeypatch.setattr(L, "VOCAB_CHUNK", 128)
    h, w, t, g_lp, g_ent = _problem(70, 48, 389, torch.float32)
    for use_lp in (True, False):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = kernels.linear_logprob_entropy(hh, ww, t, 0.7, backend=backend)
        out = (lp * g_lp.float()).sum() if use_lp else (ent * g_ent.float()).sum()
        dh, dw = torch.autograd.grad(out, (hh, ww))
        zero = torch.zeros_like(g_lp)
        _, _, rdh, rdw = _oracle(h, w, t, 0.7, g_lp if use_lp else zero, zero if use_lp else g_ent)
        assert _rel(dh, rdh) <= 1e-4 and _rel(dw, rdw) <= 1e-4


def test_triton_skipped_forward_rows_do_not_poison_backward(fused_tiles, monkeypatch):
    """Forward and backward tiles of different heights: a backward tile mixes rows whose forward
    tile was skipped (all ignored: placeholder lse) with live rows, and the logits are large enough
    that exp(z - placeholder) overflows. Those rows must stay out of dh and dW."""
    monkeypatch.setattr(L, "FWD_CONFIG", KernelConfig(block_m=32, block_n=128, block_k=32, num_warps=4,
                                                      num_stages=1))
    monkeypatch.setattr(L, "BWD_CONFIG", KernelConfig(block_m=64, block_n=128, block_k=32, num_warps=4,
                                                      num_stages=1, block_h=32))
    h, w, t, g_lp, g_ent = _problem(100, 32, 300, torch.float32, ignored=slice(0, 32))
    w = w * 40  # logits ~ N(0, 70^2): exp(z) overflows fp32 without the max shift
    _check(h, w, t, 1.0, g_lp, g_ent, 1e-4, backend="triton")



@pytest.mark.parametrize("backend,bwd,deterministic", [("torch", None, False), ("triton", "atomic", False),
                                                       ("triton", "atomic", True), ("triton", "gemm", False)])
def test_an_ignored_rows_non_finite_hidden_state_stays_out_of_dw(monkeypatch, backend, bwd, deterministic):
    """An ignored row gives no gradient whatever its hidden state: dz = 0 there, but 0 * inf in dz.T @ h turned
    the whole of dW into NaN (the torch backend and the fused-tile backward kernels)."""
    if backend == "triton":
        monkeypatch.setattr(L, "FWD_MODE", "triton" if bwd == "atomic" else "gemm")
        monkeypatch.setattr(L, "BWD_MODE", bwd)
    else:
        monkeypatch.setattr(L, "TOKEN_CHUNK", 16)
    h, w, t, g_lp, g_ent = _problem(45, 32, 300, torch.float32)
    bad = (t == IGNORE).nonzero().squeeze(1)[:3]
    h[bad[0]], h[bad[1]], h[bad[2], 5] = float("inf"), float("nan"), float("-inf")
    lp, ent, dh, dw = _ours(h, w, t, 0.7, g_lp, g_ent, backend=backend,
                            **({"deterministic": True} if deterministic else {}))
    keep = t != IGNORE
    _, _, rdh, rdw = _oracle(h[keep], w, t[keep], 0.7, g_lp[keep], g_ent[keep])
    assert torch.isfinite(dw).all() and _rel(dw, rdw) <= 1e-4
    assert (dh[~keep] == 0).all() and _rel(dh[keep], rdh) <= 1e-4
    assert (lp[~keep] == 0).all() and (ent[~keep] == 0).all()

# ------------------------------------------------------------------ torch backend


@pytest.mark.parametrize("dtype,temperature", [(torch.float32, 1.0), (torch.float32, 0.7), (torch.float16, 0.7)])
def test_torch_backend_matches_fp64_odd_shapes(monkeypatch, dtype, temperature):
    monkeypatch.setattr(L, "TOKEN_CHUNK", 128)  # several token and vocab chunks, ragged last ones
    monkeypatch.setattr(L, "VOCAB_CHUNK", 500)
    h, w, t, g_lp, g_ent = _problem(333, 96, 1237, dtype, ignored=slice(0, 150))
    _check(h, w, t, temperature, g_lp, g_ent, 1e-4 if dtype == torch.float32 else 2e-3, backend="torch")


def test_torch_backend_matches_fp64_full_qwen3_vocab():
    h, w, t, g_lp, g_ent = _problem(37, 40, QWEN3_VOCAB, torch.float32)
    t[3] = QWEN3_VOCAB - 1
    _check(h, w, t, 0.7, g_lp, g_ent, 1e-4, backend="torch")


def test_torch_backend_targets_on_chunk_edges_and_chunk_maxima_far_apart(monkeypatch):
    """Targets at the first and last id of every vocab chunk; the vocab chunks' logits sit +90, 0 and
    -90 apart (chunk order high -> low), so a running max that is allowed to fall overflows the
    rescale factor and a target column looked up one chunk off is far from the oracle."""
    monkeypatch.setattr(L, "TOKEN_CHUNK", 64)
    monkeypatch.setattr(L, "VOCAB_CHUNK", 500)
    h, w, t, g_lp, g_ent = _problem(150, 24, 1237, torch.float32)
    h[:, 0] = 1.0
    w[:500, 0], w[500:1000, 0], w[1000:, 0] = 90.0, 0.0, -90.0
    edges = torch.tensor([0, 499, 500, 999, 1000, 1236])
    live = (t != IGNORE).nonzero().squeeze(1)
    t[live] = edges[torch.arange(live.numel()) % edges.numel()]
    _check(h, w, t, 0.7, g_lp, g_ent, 1e-4, backend="torch")


def test_torch_backend_extra_memory_independent_of_n():
    """N=4096, H=64, V=151,936: materialised fp32 logits alone would take 2,374 MiB."""
    n, hdim = 4096, 64
    h = torch.randn(n, hdim, requires_grad=True)
    w = (torch.randn(QWEN3_VOCAB, hdim) * 0.3).requires_grad_()
    t = torch.randint(0, QWEN3_VOCAB, (n,))

    def fwd_bwd():
        lp, ent = kernels.linear_logprob_entropy(h, w, t, 0.7, backend="torch")
        (lp.sum() + 0.1 * ent.sum()).backward()
        return lp.detach()

    extra, lp = peak_extra_memory(fwd_bwd)
    assert torch.isfinite(lp).all() and (lp <= 0).all()
    assert h.grad is not None and torch.isfinite(w.grad).all()
    assert extra < 768 * 2**20, f"extra peak {extra / 2**20:.0f} MiB"


# ------------------------------------------------------------------ dispatcher


def test_dispatch_auto_is_torch_on_cpu_and_bad_args_raise(monkeypatch):
    h, w, t, _, _ = _problem(20, 16, 50, torch.float32)
    auto = kernels.linear_logprob_entropy(h, w, t, 0.7)
    ref = kernels.linear_logprob_entropy(h, w, t, 0.7, backend="torch")
    assert torch.equal(auto[0], ref[0]) and torch.equal(auto[1], ref[1])
    with pytest.raises(ValueError):
        kernels.linear_logprob_entropy(h, w, t, backend="cuda")
    with pytest.raises(ValueError):
        kernels.linear_logprob_entropy(h, w, t, 0.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        kernels.linear_logprob_entropy(h, w, t, backend="triton")


# ------------------------------------------------------------------ sm_90 AOT at production configs


@pytest.fixture(scope="module")
def aot_reports() -> dict[str, KernelResources]:
    """All kernels compiled for sm_90 in ONE child process without the interpreter (one torch import)."""
    return aot.reports(AOT_CONFIGS)


@pytest.mark.parametrize("name", [c["name"] for c in AOT_CONFIGS])
def test_aot_sm90_production_config(aot_reports, name):
    r = aot_reports[name]
    assert r.local_bytes == 0 and r.spill_stores == 0 and r.spill_loads == 0, r
    assert 0 < r.registers <= 255
    if name == "logprob_dz_block":  # elementwise: fp32 logits block -> 16-bit dz, 16-byte accesses
        br, bc = L.DZ_TILE
        per_thread = br * bc // (4 * 32)  # elements per thread (4 warps)
        assert r.sass_histogram.get("STG") == per_thread * 2 // 16, r.sass_histogram  # 16-byte stores
        assert r.sass_histogram.get("LDG", 0) < per_thread, r.sass_histogram  # the fp32 loads are vectors
        return
    if name == "logprob_stats_block":  # streams an fp32 logits block: 16-byte loads, pipelined in registers
        br, bc = L.STATS_TILE
        per_thread = br * bc // (4 * 32)  # fp32 elements per thread and loop step (4 warps)
        assert 0 < r.sass_histogram.get("LDG", 0) < per_thread * 3, r.sass_histogram  # scalar loads: >= 3x
        return
    assert r.fits_hopper_smem and r.shared_bytes > 0, r.shared_bytes
    assert r.has_hgmma, r.sass_histogram  # every matmul kernel here runs on the tensor cores
    assert r.sass_histogram.get("LDGSTS", 0) > 0, "operand loads are not pipelined through cp.async"


def test_aot_configs_are_the_launch_configs():
    """AOT_CONFIGS must describe what the launchers actually run."""
    by_name = {c["name"]: c for c in AOT_CONFIGS}
    for name, cfg in [("logprob_fwd", L.FWD_CONFIG), ("logprob_bwd", L.BWD_CONFIG),
                      ("logprob_bwd_dh_deterministic", L.BWD_DET_CONFIG),
                      ("logprob_bwd_dw_deterministic", L.BWD_DET_CONFIG)]:
        c = by_name[name]
        assert (c["num_warps"], c["num_stages"]) == (cfg.num_warps, cfg.num_stages)
        assert (c["constexprs"]["BLOCK_M"], c["constexprs"]["BLOCK_N"], c["constexprs"]["BLOCK_K"]) == (
            cfg.block_m, cfg.block_n, cfg.block_k)
        assert c["constexprs"].get("BLOCK_H", cfg.block_h) == cfg.block_h


# ------------------------------------------------------------------ GPU (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic,fwd,bwd", [(False, "triton", "atomic"), (True, "triton", "atomic"),
                                                  (False, "gemm", "gemm"), (False, "triton", "gemm")])
def test_gpu_bf16_matches_fp64(monkeypatch, deterministic, fwd, bwd):
    monkeypatch.setattr(L, "FWD_MODE", fwd)
    monkeypatch.setattr(L, "BWD_MODE", bwd)
    torch.manual_seed(1)
    n, hdim = 1000, 2560
    h, w, t, g_lp, g_ent = _problem(n, hdim, QWEN3_VOCAB, torch.bfloat16)
    h, w, t, g_lp, g_ent = (x.cuda() for x in (h, w, t, g_lp, g_ent))
    lp, ent, dh, dw = _ours(h, w, t, 0.7, g_lp, g_ent, backend="triton", deterministic=deterministic)
    rlp, rent, rdh, rdw = _oracle(h, w, t, 0.7, g_lp, g_ent)
    assert _rel(lp, rlp) <= 1e-3 and _rel(ent, rent) <= 1e-3
    # bf16 gradients: rounding the exact result to bf16 alone costs ~1.5e-3; compare to that floor
    floor_dh, floor_dw = _rel(rdh.bfloat16(), rdh), _rel(rdw.bfloat16(), rdw)
    assert _rel(dh, rdh) <= 1e-3 + floor_dh and _rel(dw, rdw) <= 1e-3 + floor_dw
    # row by row (tokens for logprob, entropy, dh; vocabulary entries for dW): a dropped or misrouted row would
    # move the whole-tensor errors by ~1/sqrt(rows) only. Rows' bf16 floor on CPU: <= 2.4e-3 (dW)
    for name, ours, ref, tol in (("logprob", lp, rlp, 1e-3), ("entropy", ent, rent, 1e-3), ("dh", dh, rdh, 1e-2),
                                 ("dw", dw, rdw, 1e-2)):
        err, row = worst_segment_error(ours, ref, each_row(ref.shape[0]))
        assert err <= tol, (name, row, err)


@pytest.mark.gpu
def test_gpu_deterministic_mode_is_bitwise_reproducible():
    h, w, t, g_lp, g_ent = (x.cuda() for x in _problem(3000, 256, 20_011, torch.bfloat16))
    first = _ours(h, w, t, 0.7, g_lp, g_ent, backend="triton", deterministic=True)
    second = _ours(h, w, t, 0.7, g_lp, g_ent, backend="triton", deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_leading_dims_and_mismatched_shapes_or_dtypes():
    h, w = torch.randn(2, 3, 8), torch.randn(11, 8)
    t = torch.tensor([[0, 10, IGNORE], [4, 5, 6]])
    lp, ent = kernels.linear_logprob_entropy(h, w, t, 0.7)
    assert lp.shape == ent.shape == (2, 3)
    rlp, rent = linear_logprob_entropy_reference(h.reshape(6, 8).double(), w.double(), t.reshape(6), 0.7)
    assert torch.allclose(lp.reshape(6).double(), rlp, atol=1e-5) and torch.allclose(ent.reshape(6).double(), rent,
                                                                                       atol=1e-5)
    with pytest.raises(ValueError, match="weight must be"):
        kernels.linear_logprob_entropy(h, torch.randn(11, 9), t)
    with pytest.raises(ValueError, match=r"targets must have hidden's leading shape \[2, 3\], got \[5\]"):
        kernels.linear_logprob_entropy(h, w, t.reshape(6)[:5])
    # the same count in another shape pairs rows with other rows' targets: refused, not silently wrong
    with pytest.raises(ValueError, match=r"targets must have hidden's leading shape \[2, 3\], got \[3, 2\]"):
        kernels.linear_logprob_entropy(h, w, t.T)
    with pytest.raises(ValueError, match="dtypes differ"):
        kernels.linear_logprob_entropy(h, w.half(), t)


def test_triton_backend_refuses_fp64_and_auto_takes_torch_for_it():
    """fp64 hidden / weight do not run on a GPU: the fused-tile kernels fail to compile for sm_90 (fp64 products
    into fp32 accumulators) and the GEMM path's torch.mm(out_dtype=fp32) takes only 16-bit or fp32 operands;
    the interpreter ran them. The triton backend refuses them by name; "auto" (CUDA) takes torch."""
    h, w, t, _, _ = _problem(9, 16, 37, torch.float64)
    with pytest.raises(TypeError, match="backend='triton' takes fp32, fp16 or bf16 hidden and weight, got "
                                        "torch.float64"):
        kernels.linear_logprob_entropy(h, w, t, backend="triton")
    lp, ent = kernels.linear_logprob_entropy(h, w, t)
    lp_ref, ent_ref = linear_logprob_entropy_reference(h, w, t)
    assert _rel(lp, lp_ref) < 1e-6 and _rel(ent, ent_ref) < 1e-6


def test_bad_targets_and_temperature_are_errors():
    h, w = torch.randn(5, 8), torch.randn(11, 8)
    for t in (torch.tensor([0, 1, 11, 2, 3]), torch.tensor([0, -1, 2, 3, 4])):  # V, and a negative non-ignore id
        for backend in ("torch", "triton"):
            with pytest.raises(ValueError, match="outside the vocabulary \\[0, 11\\)"):
                kernels.linear_logprob_entropy(h, w, t, backend=backend)
    with pytest.raises(TypeError, match="integer tensor"):
        kernels.linear_logprob_entropy(h, w, torch.tensor([0.0, 1, 2, 3, 4]))
    for temperature in (float("nan"), float("inf"), 0.0):
        with pytest.raises(ValueError, match="finite number > 0"):
            kernels.linear_logprob_entropy(h, w, torch.tensor([0, 1, 2, 3, 4]), temperature)
    lp, _ = kernels.linear_logprob_entropy(h, w, torch.tensor([0, IGNORE, 10, 3, IGNORE]))  # ignored ids are fine
    assert lp[1] == 0 and lp[4] == 0 and (lp[[0, 2, 3]] < 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_double_backward_is_refused_not_wrong(backend):
    """The backward builds no graph of its own: a second derivative through it used to be silently incomplete
    (triton: no dh term at all, dW's missed dz's dependence on h and W) or fail inside an addcmul(out=) (torch).
    create_graph=True is refused by name; plain first-order gradients are unchanged."""
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    t = torch.tensor([0, IGNORE, 10, 3, 4, 5])
    lp, ent = kernels.linear_logprob_entropy(h, w, t, backend=backend)
    with pytest.raises(RuntimeError, match="differentiable once: create_graph=True"):
        torch.autograd.grad((lp + ent).sum(), (h, w), create_graph=True)
    lp, ent = kernels.linear_logprob_entropy(h, w, t, backend=backend)
    dh, = torch.autograd.grad((lp + ent).sum(), h)
    h64 = h.detach().double().requires_grad_()
    lp64, ent64 = linear_logprob_entropy_reference(h64, w.detach().double(), t)
    assert _rel(dh, torch.autograd.grad((lp64 + ent64).sum(), h64)[0]) < 1e-5
