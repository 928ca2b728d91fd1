"""kernels.grouped_mm: Triton kernels (interpreter) and the torch path vs fp64 per-group matmuls."""

import importlib

import pytest
import torch

from bench.moe_configs import CANDIDATES
from kernels import aot
from kernels.aot import report
from kernels.grouped_mm import (
    AOT_CONFIGS,
    _grouped_mm_fwd_kernel,
    _triton_dw,
    _triton_fwd,
    aot_configs,
    grouped_mm,
    grouped_mm_supported,
)
from tests.kernels.launch_spy import LaunchSpy
from tests.kernels.segments import each_row, worst_segment_error

gm = importlib.import_module("kernels.grouped_mm")  # the module (the package exports the function)

SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}  # many tiles per group on tiny shapes

# group sizes (-> offsets): empty groups first / middle / last, one group holding every row, one group
GROUPINGS = {
    "mixed": [0, 10, 0, 33, 1, 31, 0],
    "all_in_one": [0, 0, 75, 0],
    "single": [75],
}


def _offsets(sizes):
    return torch.tensor(sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _ref_fwd(x, w, offsets):
    y, start = [], 0
    for g, end in enumerate(offsets.tolist()):
        y.append(x[start:end].double() @ w[g].double())
        start = end
    return torch.cat(y)


def _ref_dw(x, dy, offsets):
    dw, start = [], 0
    for end in offsets.tolist():
        dw.append(x[start:end].double().t() @ dy[start:end].double())
        start = end
    return torch.stack(dw)


def _rel(a, ref):
    assert torch.isfinite(a).all(), "non-finite values (an unwritten NaN-poisoned element?)"
    return ((a.double() - ref).norm() / ref.norm()).item()


def _weights(G, K, N, dtype, transposed):
    # transposed: the fused-parameter case, w = param.transpose(1, 2) with param [G, N, K]
    return torch.randn(G, N, K, dtype=dtype).transpose(1, 2) if transposed else torch.randn(G, K, N, dtype=dtype)


TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
@pytest.mark.parametrize("K", [37, 48])  # masked K tail / EVEN_K fast path
def test_triton_kernels_match_fp64(dtype, grouping, K):
    sizes = GROUPINGS[grouping]
    offsets = _offsets(sizes)
    M, N, G = int(sum(sizes)), 29, len(sizes)
    x = torch.randn(M, K, dtype=dtype)
    w = _weights(G, K, N, dtype, transposed=True)
    dy = torch.randn(M, N, dtype=dtype)

    y = _triton_fwd(x, w, offsets, SMALL, out=torch.full((M, N), float("nan"), dtype=dtype))
    assert _rel(y, _ref_fwd(x, w, offsets)) < TOL[dtype]

    # dX = dY W^T is the forward kernel on w's transposed view
    dx = _triton_fwd(dy, w.transpose(1, 2), offsets, SMALL, out=torch.full((M, K), float("nan"), dtype=dtype))
    assert _rel(dx, _ref_fwd(dy, w.transpose(1, 2), offsets)) < TOL[dtype]

    dw_out = torch.empty_like(w).fill_(float("nan"))
    dw = _triton_dw(x, dy, offsets, like=w, config={**SMALL, "BLOCK_M": 8}, out=dw_out)
    ref_dw = _ref_dw(x, dy, offsets)
    assert _rel(dw, ref_dw) < TOL[dtype]
    for g, size in enumerate(sizes):
        if size == 0:
            assert (dw[g] == 0).all()  # an expert that got no tokens has an exactly-zero gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
def test_triton_gathered_rows_match_fp64(dtype, grouping):
    """rows=: the forward and dW kernels read x[rows[r]] for row r (the MoE gate_up GEMM without the permuted
    copy); rows repeat and skip source rows, as token copies do."""
    sizes = GROUPINGS[grouping]
    offsets = _offsets(sizes)
    M, K, N, T = int(sum(sizes)), 37, 29, 11
    x = torch.randn(T, K, dtype=dtype)
    rows = torch.randint(0, T, (M,))
    w = _weights(len(sizes), K, N, dtype, transposed=True)
    dy = torch.randn(M, N, dtype=dtype)
    y = _triton_fwd(x, w, offsets, SMALL, out=torch.full((M, N), float("nan"), dtype=dtype), rows=rows)
    assert _rel(y, _ref_fwd(x[rows], w, offsets)) < TOL[dtype]
    dw = _triton_dw(x, dy, offsets, like=w, config={**SMALL, "BLOCK_M": 8},
                    out=torch.empty_like(w).fill_(float("nan")), rows=rows)
    assert _rel(dw, _ref_dw(x[rows], dy, offsets)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
@pytest.mark.parametrize("gathered", [False, True])
def test_triton_swiglu_epilogue_matches_fp64(dtype, grouping, gathered):
    """swiglu=True: y = silu(gate) * up of the product (gate | up halves of N) from the GEMM's epilogue, and the
    product itself in h_out; odd I, so the last column tile is partial."""
    sizes = GROUPINGS[grouping]
    offsets = _offsets(sizes)
    M, K, inter, T = int(sum(sizes)), 37, 19, 11
    rows = torch.randint(0, T, (M,)) if gathered else None
    x = torch.randn(T if gathered else M, K, dtype=dtype)
    w = _weights(len(sizes), K, 2 * inter, dtype, transposed=True) / K**0.5
    ref_h = _ref_fwd(x if rows is None else x[rows], w, offsets)
    ref_y = torch.nn.functional.silu(ref_h[:, :inter]) * ref_h[:, inter:]
    h = torch.full((M, 2 * inter), float("nan"), dtype=dtype)
    y = _triton_fwd(x, w, offsets, SMALL, out=torch.full((M, inter), float("nan"), dtype=dtype), rows=rows,
                    swiglu=True, h_out=h)
    assert _rel(h, ref_h) < TOL[dtype] and _rel(y, ref_y) < TOL[dtype]
    if dtype == torch.float16:  # y comes from the rounded h the backward reads (gate and up rounded to fp16
        # first): the same as SwiGLU of h itself but for the odd last-bit difference of the two silu formulas
        # (from an unrounded gate and up: a third of the elements off)
        again = (torch.nn.functional.silu(h[:, :inter].float()) * h[:, inter:].float()).to(dtype)
        assert (y != again).float().mean() <= 0.01
    y_nograd = _triton_fwd(x, w, offsets, SMALL, out=torch.full((M, inter), float("nan"), dtype=dtype), rows=rows,
                           swiglu=True)  # no h written: y from the fp32 accumulator
    assert _rel(y_nograd, ref_y) < TOL[dtype]
    with pytest.raises(ValueError, match="even N"):
        _triton_fwd(x, w[:, :, 1:], offsets, SMALL, rows=rows, swiglu=True)


def test_triton_fp16_long_reductions_accumulate_in_fp32():
    """A 2,048-deep K loop (forward, dX) and a 1,000-row group (dW) in fp16: fp32 accumulators keep the result at
    the output's own rounding (2e-4 relative); an accumulator rounded to fp16 every step drifts to 1.5e-3, which
    the short reductions elsewhere (and their 2e-3 tolerance) let through."""
    g = torch.Generator().manual_seed(7)
    offsets = _offsets([40, 0, 27])
    x = torch.randn(67, 2048, generator=g).half()
    w = torch.randn(3, 24, 2048, generator=g).half().transpose(1, 2)  # [G, K, N] view of a fused parameter
    y = _triton_fwd(x, w, offsets, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64})
    assert _rel(y, _ref_fwd(x, w, offsets)) < 5e-4
    offsets = _offsets([1000, 30])
    x, dy = torch.randn(1030, 40, generator=g).half(), torch.randn(1030, 24, generator=g).half()
    dw = _triton_dw(x, dy, offsets, like=torch.empty(2, 40, 24, dtype=torch.float16),
                    config={"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32})
    assert _rel(dw, _ref_dw(x, dy, offsets)) < 5e-4


def test_triton_autograd_matches_fp64_with_production_tiles():
    # production block sizes, and the kernels reached through autograd (x and w both need grad)
    sizes = [3, 0, 150, 7, 0, 40]
    offsets = _offsets(sizes)
    M, K, N = sum(sizes), 70, 133
    param = torch.randn(len(sizes), N, K, requires_grad=True)  # fused layout [G, N, K]
    x = torch.randn(M, K, requires_grad=True)
    y = grouped_mm(x, param.transpose(1, 2), offsets, backend="triton")
    dy = torch.randn(M, N)
    y.backward(dy)
    w = param.detach().transpose(1, 2)
    assert _rel(y.detach(), _ref_fwd(x.detach(), w, offsets)) < 1e-5
    assert _rel(x.grad, _ref_fwd(dy, w.transpose(1, 2), offsets)) < 1e-5
    assert _rel(param.grad, _ref_dw(x.detach(), dy, offsets).transpose(1, 2)) < 1e-5
    assert param.grad.is_contiguous()  # dW written in the parameter's own layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("transposed", [True, False])
def test_torch_backend_matches_fp64(dtype, transposed):
    sizes = [5, 0, 64, 1, 0, 26]
    offsets = _offsets(sizes)
    M, K, N = sum(sizes), 48, 40  # 16-byte aligned strides: torch._grouped_mm applies (fp32/bf16)
    w = _weights(len(sizes), K, N, dtype, transposed).requires_grad_()
    x = torch.randn(M, K, dtype=dtype, requires_grad=True)
    assert grouped_mm_supported(x, w, offsets) == (dtype != torch.float64)
    y = grouped_mm(x, w, offsets, backend="torch")
    dy = torch.randn(N, M, dtype=dtype).t()  # non-contiguous upstream gradient
    y.backward(dy)
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    wd = w.detach()
    assert _rel(y.detach(), _ref_fwd(x.detach(), wd, offsets)) < tol
    assert _rel(x.grad, _ref_fwd(dy, wd.transpose(1, 2), offsets)) < tol
    assert _rel(w.grad, _ref_dw(x.detach(), dy, offsets)) < tol
    assert w.grad.stride() == wd.stride()
    # dW comes out in w's layout (autograd would otherwise copy it into the parameter's: a [G, N, K] one's)
    y = grouped_mm(x, w, offsets, backend="torch")
    (dw,) = torch.autograd.grad(y, w, dy)
    assert dw.stride() == wd.stride()


def test_torch_backend_odd_layout_falls_back_to_loop():
    sizes = [4, 0, 9]
    offsets = _offsets(sizes)
    x = torch.randn(13, 7)  # 28-byte rows: not what torch._grouped_mm takes
    w = torch.randn(3, 7, 5)
    assert not grouped_mm_supported(x, w, offsets)
    assert _rel(grouped_mm(x, w, offsets, backend="torch"), _ref_fwd(x, w, offsets)) < 1e-6
    # no unit stride in x's last two dims (torch._grouped_mm refuses it): the loop, with autograd
    xs = torch.randn(13, 64)[:, ::4].requires_grad_()  # strides (64, 4): 16-byte multiples, none unit
    ws = torch.randn(3, 16, 8, requires_grad=True)
    assert not grouped_mm_supported(xs, ws, offsets)
    y = grouped_mm(xs, ws, offsets, backend="torch")
    dy = torch.randn(13, 8)
    y.backward(dy)
    assert _rel(y.detach(), _ref_fwd(xs.detach(), ws.detach(), offsets)) < 1e-6
    assert _rel(xs.grad, _ref_fwd(dy, ws.detach().transpose(1, 2), offsets)) < 1e-6
    assert _rel(ws.grad, _ref_dw(xs.detach(), dy, offsets)) < 1e-6
    # aligned, but int64 offsets or mixed dtypes: not for torch._grouped_mm
    xa, wa = torch.randn(13, 16), torch.randn(3, 16, 8)
    assert grouped_mm_supported(xa, wa, offsets)
    assert not grouped_mm_supported(xa, wa, offsets.long())
    assert not grouped_mm_supported(xa, wa.bfloat16(), offsets)


def test_fit_stages_lowers_pipeline_depth_to_fit_hopper_shared_memory():
    # the production tiles (128x64 A, 64x256 B): 3 stages of bf16 take 144 KiB; fp32 doubles it past 0.9 x 227 KiB
    fwd = gm.FWD_CONFIG
    a, b = fwd["BLOCK_M"] * fwd["BLOCK_K"], fwd["BLOCK_K"] * fwd["BLOCK_N"]
    assert gm._fit_stages(fwd, a, b, 2) == fwd
    assert gm._fit_stages(fwd, a, b, 4) == {**fwd, "num_stages": 2}
    assert gm._fit_stages({**fwd, "num_stages": 5}, a, b, 2)["num_stages"] == 4  # 240 KiB > 204 KiB; 192 KiB fits
    # 216 KiB fits 227 KiB but not the 10% kept for the kernel's other shared memory (barriers, epilogue)
    assert gm._fit_stages({"num_stages": 3}, 12288, 24576, 2) == {"num_stages": 2}
    assert gm._fit_stages({"num_stages": 3}, 64 * 1024, 64 * 1024, 4) == {"num_stages": 1}  # never below one stage


def test_dispatcher_validates_inputs():
    x, w = torch.randn(6, 4), torch.randn(2, 4, 3)
    with pytest.raises(TypeError):
        grouped_mm(x, w, torch.tensor([3, 6]))  # int64 offsets
    with pytest.raises(ValueError):
        grouped_mm(x, torch.randn(2, 5, 3), torch.tensor([3, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="unknown backend 'cuda'; valid: 'auto', 'triton', 'torch'"):
        grouped_mm(x, w, torch.tensor([3, 6], dtype=torch.int32), backend="cuda")
    with pytest.raises(ValueError, match="shape mismatch"):  # one offset per group
        grouped_mm(x, w, torch.tensor([6], dtype=torch.int32))
    with pytest.raises(ValueError, match="expected x"):
        grouped_mm(x[None], w, torch.tensor([3, 6], dtype=torch.int32))
    with pytest.raises(TypeError, match="dtypes differ"):
        grouped_mm(x, w.double(), torch.tensor([3, 6], dtype=torch.int32))
    # offsets on the host are checked (torch._grouped_mm left rows past a short last offset uninitialised)
    for bad in ([3, 5], [3, 7], [4, 3], [-1, 6]):
        for backend in ("torch", "triton"):
            with pytest.raises(ValueError, match=r"non-decreasing .* M = 6; got \[" + str(bad[0])):
                grouped_mm(x, w, torch.tensor(bad, dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match="M = 6; got \\[\\]"):  # no group cannot hold 6 rows
        grouped_mm(x, w[:0], torch.zeros(0, dtype=torch.int32))
    assert grouped_mm(x[:0], w[:0], torch.zeros(0, dtype=torch.int32)).shape == (0, 3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_offsets_view(backend):
    """offsets as a strided view (a column of a [G, 2] table): the forward kernel read offs_ptr + g, i.e. every
    other element, and gave a silently wrong y and dx (relative error ~1); dw was right."""
    x, w = torch.randn(75, 37), torch.randn(7, 37, 20)
    table = torch.stack([_offsets(GROUPINGS["mixed"]), torch.full((7,), 1000, dtype=torch.int32)], 1)
    offsets = table[:, 0]
    assert offsets.stride() == (2,)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = grouped_mm(xa, wa, offsets, backend=backend)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert _rel(y, _ref_fwd(x, w, offsets)) < 1e-5
    assert _rel(xa.grad, _ref_fwd(dy, w.transpose(1, 2), offsets)) < 1e-5
    assert _rel(wa.grad, _ref_dw(x, dy, offsets)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_triton_backend_rejects_dtypes_its_kernels_do_not_take(dtype):
    """tl.dot of fp64 operands into the kernels' fp32 accumulator gave a silently wrong product (relative error
    ~1 in the interpreter; a compile error on a GPU); integers failed deep inside Triton. The dispatcher names
    the dtype and the torch backend, which computes it."""
    x, w, offsets = torch.randn(6, 4).to(dtype), torch.randn(2, 4, 3).to(dtype), _offsets([2, 4])
    with pytest.raises(TypeError, match=f"backend='triton' takes fp32, fp16 or bf16 x and w, got {dtype}"):
        grouped_mm(x, w, offsets, backend="triton")
    assert torch.equal(grouped_mm(x, w, offsets), torch.cat([x[:2] @ w[0], x[2:] @ w[1]]))  # auto: torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
def test_triton_tma_forward_matches_fp64(dtype, grouping, monkeypatch):
    """TMA 1: w tiles (and x tiles unless gathered) by tensor descriptors. K = 40 with 16-wide k boxes: the last
    box is zero-filled past K; the forward reads w with its unit stride along K, dX along N; the SwiGLU form
    takes gate and up as two boxes (I = 12 with 8-column boxes: the last gate box overlaps up columns, which
    are not stored). An x whose base is off a 16-byte boundary falls back to the cp.async loop."""
    spy = LaunchSpy(gm._grouped_mm_fwd_kernel)
    monkeypatch.setattr(gm, "_grouped_mm_fwd_kernel", spy)
    cfg = {**SMALL, "TMA": 1}
    sizes = GROUPINGS[grouping]
    offsets = _offsets(sizes)
    M, K, N, inter, T = int(sum(sizes)), 40, 24, 12, 11
    x = torch.randn(M, K, dtype=dtype)
    w = _weights(len(sizes), K, N, dtype, transposed=True)
    dy = torch.randn(M, N, dtype=dtype)
    nan = float("nan")
    y = _triton_fwd(x, w, offsets, cfg, out=torch.full((M, N), nan, dtype=dtype))
    assert _rel(y, _ref_fwd(x, w, offsets)) < TOL[dtype]
    dx = _triton_fwd(dy, w.transpose(1, 2), offsets, cfg, out=torch.full((M, K), nan, dtype=dtype))
    assert _rel(dx, _ref_fwd(dy, w.transpose(1, 2), offsets)) < TOL[dtype]
    assert [(c.get("TMA"), c.get("W_KMAJOR")) for c in spy.launches] == [(True, True), (True, False)]
    w2 = _weights(len(sizes), K, 2 * inter, dtype, transposed=True) / K**0.5
    for rows in (None, torch.randint(0, T, (M,))):
        xs = x if rows is None else torch.randn(T, K, dtype=dtype)
        ref_h = _ref_fwd(xs if rows is None else xs[rows], w2, offsets)
        ref_y = torch.nn.functional.silu(ref_h[:, :inter]) * ref_h[:, inter:]
        h = torch.full((M, 2 * inter), nan, dtype=dtype)
        y = _triton_fwd(xs, w2, offsets, cfg, out=torch.full((M, inter), nan, dtype=dtype), rows=rows,
                        swiglu=True, h_out=h)
        assert _rel(h, ref_h) < TOL[dtype] and _rel(y, ref_y) < TOL[dtype]
        assert spy.launches[-1]["TMA"] and spy.launches[-1]["GATHER"] == (rows is not None)
    x_off = torch.empty(M * K + 1, dtype=dtype)[1:].view(M, K).copy_(x)  # base 4 / 2 bytes off alignment
    y = _triton_fwd(x_off, w, offsets, cfg, out=torch.full((M, N), nan, dtype=dtype))
    assert _rel(y, _ref_fwd(x, w, offsets)) < TOL[dtype] and "TMA" not in spy.launches[-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
def test_triton_tma_dw_matches_fp64(dtype, grouping, monkeypatch):
    """DW_CONFIG TMA 1: x and dy tiles by descriptors ending at the group's last row, so the next group's rows
    never enter a reduction (8-row steps over groups of 10, 33, 1, 31 rows; K = 40 with 16-wide boxes);
    gathered x rows by index with dy by TMA; an empty expert's gradient is exactly zero."""
    spy = LaunchSpy(gm._grouped_mm_dw_kernel)
    monkeypatch.setattr(gm, "_grouped_mm_dw_kernel", spy)
    cfg = {**SMALL, "BLOCK_M": 8, "TMA": 1}
    sizes = GROUPINGS[grouping]
    offsets = _offsets(sizes)
    M, K, N, T = int(sum(sizes)), 40, 24, 11
    w = _weights(len(sizes), K, N, dtype, transposed=True)
    dy = torch.randn(M, N, dtype=dtype)
    for rows in (None, torch.randint(0, T, (M,))):
        x = torch.randn(M if rows is None else T, K, dtype=dtype)
        dw = _triton_dw(x, dy, offsets, like=w, config=cfg, out=torch.empty_like(w).fill_(float("nan")), rows=rows)
        assert _rel(dw, _ref_dw(x if rows is None else x[rows], dy, offsets)) < TOL[dtype]
        assert spy.launches[-1]["TMA"] and spy.launches[-1]["GATHER"] == (rows is not None)
        for g, size in enumerate(sizes):
            if size == 0:
                assert (dw[g] == 0).all()
    dy_off = torch.empty(M * N + 1, dtype=dtype)[1:].view(M, N).copy_(dy)  # base off a 16-byte boundary
    x = torch.randn(M, K, dtype=dtype)
    dw = _triton_dw(x, dy_off, offsets, like=w, config=cfg, out=torch.empty_like(w).fill_(float("nan")))
    assert _rel(dw, _ref_dw(x, dy, offsets)) < TOL[dtype] and not spy.launches[-1]["TMA"]


@pytest.mark.parametrize("cfg", AOT_CONFIGS, ids=[c["name"] for c in AOT_CONFIGS])
def test_aot_sm90_production_config(cfg):
    r = report(cfg["fn"], cfg["signature"], cfg["constexprs"], num_warps=cfg["num_warps"],
               num_stages=cfg["num_stages"], divisible_by_16=cfg["divisible_by_16"])
    assert r.has_hgmma, r.sass_histogram
    assert r.local_bytes == 0 and r.spill_stores == 0 and r.spill_loads == 0, r
    assert 0 < r.shared_bytes and r.fits_hopper_smem, r.shared_bytes
    assert r.sass_histogram.get("LDGSTS", 0) > 0, "loads not pipelined through cp.async"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tma", [(torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True)])
def test_triton_on_gpu_matches_fp64(dtype, tma, monkeypatch):
    monkeypatch.setenv("GOLONG_TUNED", "0")
    monkeypatch.setattr(gm, "FWD_CONFIG", {**gm.FWD_CONFIG, "TMA": int(tma)})
    monkeypatch.setattr(gm, "DW_CONFIG", {**gm.DW_CONFIG, "TMA": int(tma)})
    sizes = [0, 1000, 3, 0, 517, 2048, 1]
    offsets = _offsets(sizes).cuda()
    M, K, N = sum(sizes), 2048, 768
    param = torch.randn(len(sizes), N, K, device="cuda", dtype=dtype).div_(K**0.5).requires_grad_()
    x = torch.randn(M, K, device="cuda", dtype=dtype, requires_grad=True)
    y = grouped_mm(x, param.transpose(1, 2), offsets)
    dy = torch.randn_like(y)
    y.backward(dy)
    w = param.detach().transpose(1, 2).cpu()
    off = offsets.cpu()
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3  # fp32 inputs take the tf32 tensor-core path
    ref_y = _ref_fwd(x.detach().cpu(), w, off)
    ref_dx = _ref_fwd(dy.cpu(), w.transpose(1, 2), off)
    ref_dw = _ref_dw(x.detach().cpu(), dy.cpu(), off).transpose(1, 2)
    assert _rel(y.detach().cpu(), ref_y) < tol
    assert _rel(x.grad.cpu(), ref_dx) < tol
    assert _rel(param.grad.cpu(), ref_dw) < tol
    # group by group (the one-row groups' rows, the empty groups' zero dW): a dropped group reads ~1 there
    bounds = [0, *off.tolist()]
    for name, ours, ref, segs in (("y", y, ref_y, bounds), ("dx", x.grad, ref_dx, bounds),
                                  ("dw", param.grad, ref_dw, each_row(len(sizes)))):
        err, group = worst_segment_error(ours, ref, segs)
        assert err < tol, (name, group, err)


def test_aot_sm90_moe_configs_candidates():
    """Every tile candidate bench.moe_configs times compiles for sm_90 spill-free, with HGMMA and pipelined
    loads (cp.async, or TMA where the candidate turns it on), within Hopper's shared memory (one child process
    without the interpreter for all of them)."""
    entries = {name: aot_configs(fwd, dw, prefix=name) for name, (fwd, dw) in CANDIDATES.items()}
    res = aot.reports([c for per in entries.values() for c in per])
    assert len(res) == len(aot_configs()) * len(CANDIDATES)  # fwd, dx, dw and the gathered fwd, dw
    for candidate, per in entries.items():
        fwd_tma, dw_tma = (bool(over.get("TMA")) for over in CANDIDATES[candidate])
        for entry in per:
            name, r = entry["name"], res[entry["name"]]
            assert r.has_hgmma, (name, r.sass_histogram)
            assert r.local_bytes == 0 and r.spill_stores == 0 and r.spill_loads == 0, (name, r)
            assert 0 < r.shared_bytes and r.fits_hopper_smem, (name, r.shared_bytes)
            if fwd_tma if entry["fn"] is _grouped_mm_fwd_kernel else dw_tma:  # tiles by TMA but gathered x rows
                assert r.sass_histogram.get("UTMALDG", 0) > 0, (name, "no TMA loads")
                gathered = entry["constexprs"]["GATHER"]  # x rows by index: still cp.async
                assert (r.sass_histogram.get("LDGSTS", 0) > 0) == gathered, (name, r.sass_histogram)
            else:
                assert r.sass_histogram.get("LDGSTS", 0) > 0, (name, "loads not pipelined through cp.async")


def test_bad_offsets_never_leave_the_buffers():
    # offsets decreasing, then past M (a routing bug, unchecked without a host sync): the kernels clamp group ends
    # to [previous end, M], so every write lands in y and every read in x / dy; the groups they imply are those
    # of the clamped offsets [3, 3, 10]
    g = torch.Generator().manual_seed(11)
    M, K, N = 10, 24, 20
    x = torch.randn(M, K, generator=g)
    w = torch.randn(3, K, N, generator=g)
    bad, clamped = torch.tensor([3, 2, 40], dtype=torch.int32), torch.tensor([3, 3, 10], dtype=torch.int32)
    room = torch.full((M + 8, N), float("nan"))  # y plus 8 guard rows, poisoned
    y = _triton_fwd(x, w, bad, SMALL, out=room[:M])
    assert _rel(y, _ref_fwd(x, w, clamped)) <= 1e-5
    assert room[M:].isnan().all()  # the guard rows were not written
    dy = torch.randn(M, N, generator=g)
    dw = _triton_dw(x, dy, bad, like=w, config=SMALL, out=torch.full_like(w, float("nan")))
    assert _rel(dw, _ref_dw(x, dy, clamped)) <= 1e-5  # every group's dW written (_rel rejects a leftover NaN)
