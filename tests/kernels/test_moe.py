"""kernels.moe_route / kernels.moe_mlp: Qwen3-MoE routing, permute/unpermute, expert MLP vs transformers."""

import importlib
import logging
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels.moe_mlp import expert_mlp
from kernels.moe_route import moe_route, route_topk
from tests.kernels.segments import each_row, worst_segment_error


def _hf_block(hidden=48, inter=40, experts=7, top_k=3, norm=True, dtype=torch.float64):
    """transformers' Qwen3-MoE sparse block (fused expert layout), random weights."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    logging.getLogger("transformers").setLevel(logging.ERROR)
    cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=experts,
                         num_experts_per_tok=top_k, norm_topk_prob=norm)
    block = Qwen3MoeSparseMoeBlock(cfg).to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block


@pytest.mark.parametrize("norm", [True, False])
def test_route_matches_transformers_router(norm):
    block = _hf_block(norm=norm, dtype=torch.float32)
    x = torch.randn(29, 48)
    _, hf_w, hf_i = block.gate(x)
    r = moe_route(torch.nn.functional.linear(x, block.gate.weight), 3, norm_topk_prob=norm)
    assert torch.equal(r.expert_ids, hf_i)
    torch.testing.assert_close(r.weights, hf_w, rtol=1e-6, atol=1e-7)
    if norm:
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(29))


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("T,E,k", [(37, 128, 8), (29, 60, 3), (5, 60, 1), (9, 12, 12)])
def test_route_topk_triton_matches_torch(T, E, k, norm):
    """The one-pass Triton routing (softmax, top-k, renormalisation) under the interpreter vs torch's
    softmax + topk: ids, weights and the logits' gradient; odd E (padded to a power of two), k = 1, k = E."""
    logits = torch.randn(T, E, dtype=torch.float64).float()  # fp32: no exact ties
    ours = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    w, ids = route_topk(ours, k, norm, backend="triton")
    w_ref, ids_ref = route_topk(ref, k, norm, backend="torch")
    assert torch.equal(ids, ids_ref) and ids.dtype == torch.int64
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-7)
    g = torch.randn(T, k)
    (w * g).sum().backward()
    (w_ref * g).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-7)
    # half precision logits: weights in the logits' dtype, the same probabilities as torch's (fp16 may tie)
    w16, ids16 = route_topk(logits.half(), k, norm, backend="triton")
    w16_ref, _ = route_topk(logits.half(), k, norm, backend="torch")
    assert w16.dtype == torch.float16
    torch.testing.assert_close(w16.float(), w16_ref.float(), rtol=2e-3, atol=1e-4)
    # logits far from 0 (a softmax without its max subtracted overflows exp: NaN weights, ids 0..k-1)
    for shift in (100.0, -100.0):
        far = logits * 3 + shift
        w_far, ids_far = route_topk(far, k, norm, backend="triton")
        w_far_ref, ids_far_ref = route_topk(far, k, norm, backend="torch")
        assert torch.isfinite(w_far).all() and torch.equal(ids_far, ids_far_ref), shift
        torch.testing.assert_close(w_far, w_far_ref, rtol=1e-5, atol=1e-7)


def test_route_topk_ties_take_the_lower_expert_and_bad_k_is_refused():
    """Equal probabilities: the Triton kernel takes the lowest expert ids, whatever the logits' layout (column-major
    logits fell back to torch.topk, which on the CPU takes others: 58 of 2,048 bf16 tokens routed differently)."""
    logits = torch.tensor([[0.5, 2.0, 2.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0, 3.0]])
    w, ids = route_topk(logits, 3, False, backend="triton")
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2]]
    torch.testing.assert_close(w, torch.softmax(logits, -1).gather(1, ids))
    # bf16 logits tie often (router logits are bf16 in training): the same ids in any layout, the lowest of the tied
    bf = torch.randn(2048, 128, generator=torch.Generator().manual_seed(0)).bfloat16()
    probs = torch.softmax(bf.float(), -1)
    assert (probs.topk(9).values[:, :-1] == probs.topk(9).values[:, 1:]).any()  # ties inside the top 8
    lowest = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :8]
    for x in (bf, bf.t().contiguous().t(), torch.cat([bf, bf], 1)[:, :128]):
        assert torch.equal(route_topk(x, 8, backend="triton")[1], lowest)
    for k, backend in ((6, "triton"), (0, "triton"), (0, "torch"), (6, "torch")):
        with pytest.raises(ValueError, match=r"top_k must be in \[1, 5\]"):
            route_topk(logits, k, backend=backend)
    with pytest.raises(ValueError, match=r"router_logits must be \[T, E\]"):
        moe_route(logits[None], 2, backend="torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_route_top_k_must_be_an_int(backend):
    """top_k sizes the outputs and is the Triton kernel's constexpr: a float failed in torch.empty / topk and a
    tensor deep inside Triton (an int tensor also left Routing.top_k a tensor). Int-likes are taken as ints."""
    logits = torch.randn(5, 6)
    for bad in (2.0, True, "2"):
        with pytest.raises(TypeError, match="top_k must be an int"):
            moe_route(logits, bad, backend=backend)
    r, ref = moe_route(logits, torch.tensor(2), backend=backend), moe_route(logits, 2, backend=backend)
    assert type(r.top_k) is int and r.top_k == 2
    assert torch.equal(r.expert_ids, ref.expert_ids) and torch.equal(r.weights, ref.weights)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_route_refuses_integer_logits(backend):
    """The routing weights come back in the logits' dtype: integer logits gave weights truncated to all 0
    (so every token's MoE output was 0), silently."""
    with pytest.raises(TypeError, match="router_logits must be a floating-point tensor, got torch.int64"):
        moe_route(torch.randint(-3, 3, (4, 6)), 2, backend=backend)
    with pytest.raises(TypeError, match="router_logits must be a floating-point tensor, got torch.int32"):
        route_topk(torch.randint(-3, 3, (4, 6), dtype=torch.int32), 2, backend=backend)


def test_sort_offsets_and_stability():
    T, E, k = 53, 9, 4
    logits = torch.randn(T, E)
    logits[:, 2] = -1e4  # expert 2 never chosen: an empty group
    r = moe_route(logits, k)
    flat = r.expert_ids.reshape(-1)
    counts = torch.bincount(flat, minlength=E)
    assert counts[2] == 0
    assert torch.equal(r.counts.long(), counts)
    assert r.offsets.dtype == torch.int32 and torch.equal(r.offsets.long(), counts.cumsum(0))
    sorted_ids = flat[r.order]
    assert (sorted_ids[1:] >= sorted_ids[:-1]).all()
    # stable: within one expert, copies keep token order
    same = sorted_ids[1:] == sorted_ids[:-1]
    assert (r.order[1:][same] > r.order[:-1][same]).all()
    assert torch.equal(r.order[r.inverse], torch.arange(T * k))
    # more experts than int8 holds (Qwen3-30B-A3B has 128), and more than int16 holds (the int64 sort keys)
    for E in (300, 40_000):
        logits = torch.randn(T, E)
        logits[:, E - 2] += 100.0  # the top expert ids sit past both ranges
        r = moe_route(logits, k, backend="torch")
        flat = r.expert_ids.reshape(-1)
        assert (flat == E - 2).sum() == T
        assert (flat[r.order][1:] >= flat[r.order][:-1]).all()
        assert torch.equal(r.offsets.long(), torch.bincount(flat, minlength=E).cumsum(0))


def test_permute_unpermute_round_trip_and_gradcheck():
    T, E, k, H = 17, 6, 2, 5
    r = moe_route(torch.randn(T, E, dtype=torch.float64), k)
    x = torch.randn(T, H, dtype=torch.float64)
    xp = r.permute(x)
    tok = r.order // k
    assert torch.equal(xp, x[tok])
    # weights sum to one per token (norm_topk_prob): unpermute(permute(x)) == x
    torch.testing.assert_close(r.unpermute(xp), x)
    # fp64 routing weights (as a fp32 router's next to bf16 experts) combine rows of another dtype, in that dtype
    y32 = r.unpermute(xp.float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, x.float())

    w = r.weights.detach().clone().requires_grad_()
    r2 = kernels.Routing(w, r.expert_ids, r.order, r.inverse, r.offsets, r.counts, k, E)
    xg = x.clone().requires_grad_()
    yp = torch.randn(T * k, H, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: r2.permute(a), (xg,))
    assert torch.autograd.gradcheck(lambda a, b: r2.unpermute(a), (yp, w))  # r2.weights is w
    assert torch.autograd.gradcheck(lambda a: r2.unpermute(r2.permute(a) * torch.arange(T * k)[:, None]), (xg,))


def _rel(a, b):
    assert torch.isfinite(a).all()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("T,E,k,H", [(29, 7, 3, 37), (1, 4, 4, 8), (40, 5, 1, 130)])
def test_triton_permute_unpermute_match_fp64(T, E, k, H, dtype, tol):
    """Triton combine (unpermute fwd), its backward (dy, dweights) and permute's backward under the
    interpreter vs the torch path in fp64, on odd widths; k = E (every expert) and k = 1 included."""
    r = moe_route(torch.randn(T, E), k, norm_topk_prob=False)  # weights not summing to 1: dw is not trivial
    x = torch.randn(T, H).to(dtype)
    w = r.weights.to(dtype).clone()
    g = torch.randn(T, H).to(dtype)
    gp = torch.randn(T * k, H).to(dtype)

    def run(backend, cast):
        xs = x.to(cast).clone().requires_grad_()
        ws = w.to(cast).clone().requires_grad_()
        rr = kernels.Routing(ws, r.expert_ids, r.order, r.inverse, r.offsets, r.counts, k, E)
        xp = rr.permute(xs, backend)
        xp.backward(gp.to(cast))
        yp = (xp.detach() * 1.5 + 0.25).requires_grad_()  # stands in for the experts' output
        out = rr.unpermute(yp, backend)
        out.backward(g.to(cast))
        return xp, out, xs.grad, yp.grad, ws.grad

    ours = run("triton", dtype)
    ref = run("torch", torch.float64)
    for name, a, b in zip(("permute", "unpermute", "dx", "dy", "dweights"), ours, ref):
        assert a.dtype == dtype, name
        assert _rel(a, b) < tol, (name, _rel(a, b))


def test_triton_combine_sums_its_k_terms_in_fp32():
    """The combine's k = 8 weighted terms in fp16: summed in fp32 and rounded once, each output is the fp64 sum
    rounded to fp16 or its neighbour (one ulp); a sum rounded to fp16 at every term drifts further."""
    g = torch.Generator().manual_seed(11)
    T, E, k, H = 64, 16, 8, 96
    r = moe_route(torch.randn(T, E, generator=g), k, norm_topk_prob=False)
    y = (torch.randn(T * k, H, generator=g) * 3).half()
    out = r.unpermute(y, backend="triton")
    w16 = r.weights.half().double()  # the combine takes the weights in y's dtype
    exact = (w16[:, :, None] * y.double()[r.inverse].view(T, k, H)).sum(1)
    rounded = exact.half()
    ulp = (torch.nextafter(rounded.abs(), torch.tensor(float("inf"), dtype=torch.float16)) - rounded.abs()).double()
    assert ((out.double() - rounded.double()).abs() <= ulp).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("M,inter", [(45, 37), (3, 768), (1, 1)])
def test_triton_swiglu_matches_fp64(M, inter, dtype, tol):
    from kernels.moe_mlp import swiglu

    h = (torch.randn(M, 2 * inter) * 3).to(dtype)
    da = torch.randn(M, inter).to(dtype)
    h64 = h.double().requires_grad_()
    ref = torch.nn.functional.silu(h64[:, :inter]) * h64[:, inter:]
    ref.backward(da.double())
    hs = h.clone().requires_grad_()
    a = swiglu(hs, "triton")
    a.backward(da)
    assert a.dtype == dtype and hs.grad.dtype == dtype
    assert _rel(a, ref) < tol and _rel(hs.grad, h64.grad) < tol


def test_swiglu_rejects_an_odd_width():
    from kernels.moe_mlp import swiglu

    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match="even last dimension"):
            swiglu(torch.randn(4, 7), backend)


@pytest.fixture(scope="module")
def moe_aot_resources():
    import importlib

    from kernels import aot

    mods = [importlib.import_module(m) for m in ("kernels.moe_route", "kernels.moe_mlp")]
    return aot.reports([c for m in mods for c in m.AOT_CONFIGS])


@pytest.mark.parametrize("name", ["moe_topk", "moe_combine", "moe_combine_bwd", "swiglu_fwd", "swiglu_bwd"])
def test_aot_sm90_moe_elementwise_kernels(moe_aot_resources, name):
    """The routing, gather-reduce and SwiGLU kernels compile for sm_90 without local memory, with 16-byte loads."""
    r = moe_aot_resources[name]
    assert r.local_bytes == 0 and r.spill_stores == 0 and r.spill_loads == 0, r
    assert r.fits_hopper_smem, r.shared_bytes
    # vector accesses, counted per thread: a row of H 2048 over 256 threads is 8 bf16 = one 16-byte LDG per
    # gathered row (+ its index and weight); SwiGLU's 4 x 1024 tile over 128 threads is 32 bf16 per operand
    # = four 16-byte accesses (scalar code would show 8x the counts)
    # top-k: a 32 x 128 bf16 logits tile over 128 threads = 32 values = four 16-byte loads per thread
    max_ldg, max_stg = {"moe_topk": (4, 2), "moe_combine": (24, 1), "moe_combine_bwd": (25, 16), "swiglu_fwd": (8, 4),
                        "swiglu_bwd": (12, 8)}[name]
    assert 0 < r.sass_histogram.get("LDG", 0) <= max_ldg, r.sass_histogram
    assert 0 < r.sass_histogram.get("STG", 0) <= max_stg, r.sass_histogram


def _compare_to_hf(block, x, backend, tol):
    """Our route + expert_mlp on the block's own parameters vs block(x): output and every gradient."""
    ref = block(x[None])[0]
    g = torch.randn_like(ref)
    ref.backward(g)
    ref_grads = [p.grad.clone() for p in block.parameters()]
    ref_dx = x.grad.clone()
    block.zero_grad()
    x.grad = None

    logits = torch.nn.functional.linear(x, block.gate.weight)
    r = moe_route(logits, block.gate.top_k, block.gate.norm_topk_prob)
    y = expert_mlp(x, r, block.experts.gate_up_proj, block.experts.down_proj, backend=backend)
    y.backward(g)

    def rel(a, b):
        assert torch.isfinite(a).all()
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    assert rel(y.detach(), ref.detach()) < tol
    assert rel(x.grad, ref_dx) < tol
    names = [n for n, _ in block.named_parameters()]
    assert {"gate.weight", "experts.gate_up_proj", "experts.down_proj"} <= set(names)
    for n, p, q in zip(names, block.parameters(), ref_grads):
        assert q.norm() > 0, n
        assert rel(p.grad, q) < tol, n
    return r


@pytest.mark.parametrize("dtype,backend,tol", [
    (torch.float64, "torch", 1e-12),  # per-group loop (the oracle path)
    (torch.float32, "torch", 1e-5),  # torch._grouped_mm
    (torch.float32, "triton", 1e-5),  # Triton kernels in the interpreter
])
def test_expert_mlp_matches_transformers_block(dtype, backend, tol):
    block = _hf_block(dtype=dtype)
    x = torch.randn(37, 48, dtype=dtype, requires_grad=True)
    _compare_to_hf(block, x, backend, tol)


@pytest.mark.parametrize("gather,fuse", [(True, True), (True, False), (False, True), (False, False)])
def test_expert_mlp_gate_up_forms_match_transformers_block(monkeypatch, gather, fuse):
    """GATHER_IN_GEMM (the gate_up GEMM reads x rows by token index, no permuted copy) x SWIGLU_IN_GEMM (SwiGLU
    in its epilogue): output and every gradient, each form checked to run."""
    import kernels.moe_mlp as moe_mlp

    monkeypatch.setattr(moe_mlp, "GATHER_IN_GEMM", gather)
    monkeypatch.setattr(moe_mlp, "SWIGLU_IN_GEMM", fuse)
    calls = []
    orig = moe_mlp._GateUp.apply
    monkeypatch.setattr(moe_mlp._GateUp, "apply", lambda *a: calls.append((a[3] is not None, a[6])) or orig(*a))
    block = _hf_block(dtype=torch.float32)
    x = torch.randn(37, 48, requires_grad=True)
    _compare_to_hf(block, x, "triton", 1e-5)
    assert calls == ([(gather, fuse)] if gather or fuse else [])


def test_expert_mlp_fused_swiglu_without_grad_writes_no_product(monkeypatch):
    """No gradient (rollouts, reference log-probs): the [T*k, 2I] product is never written, same output."""
    import kernels.moe_mlp as moe_mlp

    monkeypatch.setattr(moe_mlp, "SWIGLU_IN_GEMM", True)
    block = _hf_block(dtype=torch.float32)
    x = torch.randn(37, 48)
    r = moe_route(torch.nn.functional.linear(x, block.gate.weight), block.gate.top_k, block.gate.norm_topk_prob)
    seen = []
    orig = moe_mlp._triton_fwd
    monkeypatch.setattr(moe_mlp, "_triton_fwd", lambda *a, **k: seen.append(k.get("h_out")) or orig(*a, **k))
    with torch.no_grad():
        y = expert_mlp(x, r, block.experts.gate_up_proj, block.experts.down_proj, backend="triton")
        ref = block(x[None])[0]
    assert seen == [None]  # the gate_up GEMM ran with the SwiGLU epilogue and no product buffer
    assert ((y - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("grad_of", ["weights", "x"])
def test_expert_mlp_fused_swiglu_keeps_the_product_for_either_grad(monkeypatch, grad_of):
    """The SwiGLU epilogue keeps the gate_up product whenever a backward will need it: when only the expert
    weights want a gradient (x from a frozen embedding) as well as when only x does."""
    import kernels.moe_mlp as moe_mlp

    monkeypatch.setattr(moe_mlp, "SWIGLU_IN_GEMM", True)
    monkeypatch.setattr(moe_mlp, "GATHER_IN_GEMM", False)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 16, generator=g)
    r = moe_route(torch.randn(9, 4, generator=g), 2, backend="torch")
    gate_up, down = torch.randn(4, 12, 16, generator=g), torch.randn(4, 16, 6, generator=g)
    grads = {}
    for backend in ("triton", "torch"):
        leaf = (gate_up if grad_of == "weights" else x).clone().requires_grad_()
        xx, gu = (x, leaf) if grad_of == "weights" else (leaf, gate_up)
        y = expert_mlp(xx, r, gu, down, backend=backend)
        (grads[backend],) = torch.autograd.grad((y * torch.arange(16.0)).sum(), leaf)
    assert _rel(grads["triton"], grads["torch"]) < 1e-5


def test_expert_mlp_norm_topk_false_and_empty_experts():
    block = _hf_block(hidden=32, inter=24, experts=10, top_k=2, norm=False, dtype=torch.float64)
    with torch.no_grad():
        block.gate.weight[7:] = 0.0  # logits 0 vs O(1): experts 7..9 seldom or never chosen
    x = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)  # 10 copies over 10 experts
    r = _compare_to_hf(block, x, "torch", 1e-12)
    assert (r.counts == 0).sum() >= 2


# ----------------------------------------------------------------------------------------------
# no host synchronisation on the model path
# ----------------------------------------------------------------------------------------------

# aten ops that read device data on the host (item/bool/int, data-dependent output shapes)
_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "nonzero_static", "masked_select",
             "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim", "bincount", "equal",
             "repeat_interleave", "_assert_async", "allclose"}


class _NoHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS:
            raise AssertionError(f"host sync: aten.{name}")
        if name == "_to_copy" and args[0].device.type != "cpu" and str(kwargs.get("device")) == "cpu":
            raise AssertionError("host sync: device-to-host copy")
        return func(*args, **kwargs)


@pytest.fixture
def no_host_sync(monkeypatch):
    """Fail on anything that reads tensor data on the host: the aten ops above (caught in forward
    and in the autograd backward) plus the Python-level readers that bypass dispatch."""

    def boom(*_a, **_k):
        raise AssertionError("host sync: python-level tensor read")

    for attr in ("tolist", "numpy", "__array__"):
        monkeypatch.setattr(torch.Tensor, attr, boom)
    return _NoHostSync


def _moe_layer(x, router_w, gate_up, down, top_k, backend):
    r = moe_route(torch.nn.functional.linear(x, router_w), top_k, backend=backend)
    return expert_mlp(x, r, gate_up, down, backend=backend)


def _moe_params(dtype, T=64, H=32, inter=16, E=8):
    x = torch.randn(T, H, dtype=dtype, requires_grad=True)
    router_w = torch.randn(E, H, dtype=dtype, requires_grad=True)
    gate_up = torch.randn(E, 2 * inter, H, dtype=dtype, requires_grad=True)
    down = torch.randn(E, H, inter, dtype=dtype, requires_grad=True)
    return x, router_w, gate_up, down


def test_moe_path_has_no_host_sync(no_host_sync):
    params = _moe_params(torch.float32)  # aligned fp32: the torch._grouped_mm path
    with no_host_sync():
        y = _moe_layer(*params, top_k=2, backend="torch")
        y.square().sum().backward()
    assert all(p.grad is not None and p.grad.norm() > 0 for p in params)


def test_no_host_sync_guard_catches_a_sync(no_host_sync):
    # the guard must fail when a sync is there: the fp64 fallback loop reads offsets on the host,
    # and so do bincount and .item()
    params = _moe_params(torch.float64)
    with pytest.raises(AssertionError, match="host sync"), no_host_sync():
        _moe_layer(*params, top_k=2, backend="torch")
    with pytest.raises(AssertionError, match="host sync"), no_host_sync():
        torch.bincount(torch.tensor([1, 2]))
    with pytest.raises(AssertionError, match="host sync"), no_host_sync():
        torch.ones(3).sum().item()


@pytest.mark.gpu
def test_moe_layer_cuda_graph_capture_triton():
    torch.manual_seed(0)
    dev = "cuda"
    T, H, inter, E, k = 512, 256, 128, 16, 4
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
    router_w = (torch.randn(E, H, device=dev, dtype=torch.bfloat16) / H**0.5).requires_grad_()
    gate_up = (torch.randn(E, 2 * inter, H, device=dev, dtype=torch.bfloat16) / H**0.5).requires_grad_()
    down = (torch.randn(E, H, inter, device=dev, dtype=torch.bfloat16) / inter**0.5).requires_grad_()
    params = (x, router_w, gate_up, down)

    def step():
        y = _moe_layer(x, router_w, gate_up, down, k, "triton")
        y.float().square().sum().backward()
        return y

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up (compiles kernels) outside the capture
            step()
    torch.cuda.current_stream().wait_stream(s)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # raises on any host sync inside
        y_graph = step()
    for p in params:
        p.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    y_eager = _moe_layer(x, router_w, gate_up, down, k, "torch")
    y_eager.float().square().sum().backward()
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    assert rel(y_graph, y_eager) < 2e-2
    for g, p in zip(grads, params):
        assert rel(g, p.grad) < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("gather,fuse,tma", [(True, True, False), (True, False, False), (False, True, False),
                                             (False, False, False), (True, True, True), (False, True, True)])
def test_expert_mlp_gate_up_forms_bf16_cuda(monkeypatch, gather, fuse, tma):
    """Each gate_up form with the real kernels vs the torch backend (torch._grouped_mm), both bf16 (the same
    routing), output and gradients; tma: the grouped GEMMs' TMA tile loads (bench.moe_configs candidates)."""
    import kernels.moe_mlp as moe_mlp

    grouped_mm = importlib.import_module("kernels.grouped_mm")  # `import ... as` would bind the exported function

    monkeypatch.setenv("GOLONG_TUNED", "0")
    monkeypatch.setattr(moe_mlp, "GATHER_IN_GEMM", gather)
    monkeypatch.setattr(moe_mlp, "SWIGLU_IN_GEMM", fuse)
    monkeypatch.setattr(grouped_mm, "FWD_CONFIG", {**grouped_mm.FWD_CONFIG, "TMA": int(tma)})
    monkeypatch.setattr(grouped_mm, "DW_CONFIG", {**grouped_mm.DW_CONFIG, "TMA": int(tma)})
    torch.manual_seed(0)
    T, H, inter, E, k = 1000, 256, 192, 16, 4
    x = torch.randn(T, H, device="cuda")
    router_w = torch.randn(E, H, device="cuda") / H**0.5
    gate_up = torch.randn(E, 2 * inter, H, device="cuda") / H**0.5
    down = torch.randn(E, H, inter, device="cuda") / inter**0.5
    results = []
    for backend in ("triton", "torch"):
        params = [p.to(torch.bfloat16).requires_grad_() for p in (x, router_w, gate_up, down)]
        # one top-k for both (the Triton one, tested against torch's elsewhere): a tie between bf16 logits that
        # the two break differently would move a token to another expert, which is not what this test is about
        r = moe_route(torch.nn.functional.linear(params[0], params[1]), k, backend="triton")
        y = expert_mlp(params[0], r, params[2], params[3], backend=backend)
        y.float().square().sum().backward()
        results.append([y.detach()] + [p.grad for p in params])
    for name, ours, ref in zip(("y", "x", "router", "gate_up", "down"), *results):
        assert ((ours.float() - ref.float()).norm() / ref.float().norm()).item() < 3e-2, name
        # token by token (y, dx) and expert by expert (weights): a dropped row or group reads ~1 there; rows'
        # bf16 error against fp64 on CPU: <= 8.3e-3
        err, row = worst_segment_error(ours, ref, each_row(ref.shape[0]))
        assert err < 3e-2, (name, row, err)


def test_expert_mlp_checks_dtypes_before_the_fused_gate_up_gemm():
    """The triton path's fused gate_up GEMM calls the kernel launcher directly, past grouped_mm's checks: a
    gate_up_proj in another dtype than x failed deep inside Triton, and fp64 operands met the kernel's fp32
    accumulator in tl.dot and gave a silently wrong output. Both are refused up front, naming the tensors."""
    g = torch.Generator().manual_seed(3)
    r = moe_route(torch.randn(7, 4, generator=g), 2, backend="torch")
    x, gate_up, down = torch.randn(7, 8, generator=g), torch.randn(4, 6, 8, generator=g), torch.randn(4, 8, 3,
                                                                                                       generator=g)
    for backend in ("triton", "torch"):
        with pytest.raises(TypeError, match="x, gate_up_proj and down_proj must share one dtype"):
            expert_mlp(x, r, gate_up.half(), down, backend=backend)
        with pytest.raises(TypeError, match="x, gate_up_proj and down_proj must share one dtype"):
            expert_mlp(x, r, gate_up, down.half(), backend=backend)
    x64, gate_up64, down64 = x.double(), gate_up.double(), down.double()
    with pytest.raises(TypeError, match="backend='triton' takes fp32, fp16 or bf16 x and expert weights"):
        expert_mlp(x64, r, gate_up64, down64, backend="triton")
    # the same product in the torch backend's fp64 (auto on CPU), against per-copy expert MLPs
    ref = torch.zeros_like(x64)
    for t in range(7):
        for j in range(2):
            e = int(r.expert_ids[t, j])
            h = gate_up64[e] @ x64[t]
            ref[t] += r.weights[t, j].double() * (down64[e] @ (torch.nn.functional.silu(h[:3]) * h[3:]))
    assert _rel(expert_mlp(x64, r, gate_up64, down64), ref) < 1e-12


def test_nan_and_all_masked_router_rows_keep_expert_ids_in_range():
    # NaN logits (a diverged router) or a row of -inf: ids must stay in [0, E) or the sort / grouped GEMMs would
    # address rows past their buffers; the weights are NaN, as torch's softmax gives them
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    logits[1] = float("nan")
    logits[4] = float("-inf")
    r = moe_route(logits, 2, backend="triton")
    assert ((r.expert_ids >= 0) & (r.expert_ids < 5)).all() and r.offsets[-1] == 12
    assert r.weights[[1, 4]].isnan().all() and r.weights[[0, 2, 3, 5]].isfinite().all()
    ref = moe_route(logits, 2, backend="torch")
    assert torch.equal(r.expert_ids[[0, 2, 3, 5]], ref.expert_ids[[0, 2, 3, 5]])


def test_shape_checks_name_the_routing():
    g = torch.Generator().manual_seed(2)
    r = moe_route(torch.randn(7, 4, generator=g), 2, backend="torch")
    gate_up, down = torch.randn(4, 6, 8, generator=g), torch.randn(4, 8, 3, generator=g)
    with pytest.raises(ValueError, match="x must be \\[T, H\\] = \\[7, H\\]"):
        r.permute(torch.randn(8, 8))
    with pytest.raises(ValueError, match="y must be \\[T\\*k, H\\] = \\[14, H\\]"):
        r.unpermute(torch.randn(13, 8))
    with pytest.raises(ValueError, match="x must be \\[T, H\\] = \\[7, H\\]"):
        r.permute(torch.randn(7, 2, 4))
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        r.permute(torch.randn(7, 8), backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        route_topk(torch.randn(7, 4), 2, backend="cuda")
    with pytest.raises(ValueError, match="routing is for 7 tokens over 4 experts"):
        expert_mlp(torch.randn(7, 8), r, torch.randn(5, 6, 8), torch.randn(5, 8, 3))
    with pytest.raises(ValueError, match="routing is for 7 tokens"):
        expert_mlp(torch.randn(8, 8), r, gate_up, down)
    with pytest.raises(ValueError, match="expected x \\[T, H\\]"):
        expert_mlp(torch.randn(1, 7, 8), r, gate_up, down)
    with pytest.raises(ValueError, match="shapes: "):  # down_proj [E, H, I] with I = 2I / 2 = 3
        expert_mlp(torch.randn(7, 8), r, gate_up, torch.randn(4, 8, 4, generator=g))
    with pytest.raises(ValueError, match="shapes: "):  # gate | up needs an even 2I
        expert_mlp(torch.randn(7, 8), r, torch.randn(4, 7, 8, generator=g), torch.randn(4, 8, 3, generator=g))
    assert expert_mlp(torch.randn(7, 8), r, gate_up, down).shape == (7, 8)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unpermute_refuses_integer_rows_and_takes_empty_rows(backend):
    """An integer y used to come back all zeros (the routing weights, cast to y's dtype, round to 0); rows of width
    0 failed inside the Triton kernel (arange(0, 0)) in unpermute and in permute's backward."""
    r = moe_route(torch.randn(5, 4), 2, backend=backend)
    with pytest.raises(TypeError, match="y must be a floating-point tensor, got torch.int64"):
        r.unpermute(torch.arange(20).view(10, 2), backend=backend)
    x = torch.randn(5, 0, requires_grad=True)
    xp = r.permute(x, backend=backend)
    assert r.unpermute(xp, backend=backend).shape == (5, 0)
    (dx,) = torch.autograd.grad(xp.sum(), x)
    assert dx.shape == (5, 0)


def test_auto_backend_sends_fp64_to_torch_on_cuda():
    """The routing / combine / SwiGLU kernels compute in fp32: "auto" on CUDA took them for fp64 too (an fp64
    oracle then matched only to fp32 precision), against kernels.dtypes' rule."""
    from types import SimpleNamespace

    from kernels.moe_route import _use_triton

    def on_cuda(dtype):
        return SimpleNamespace(is_cuda=True, dtype=dtype, shape=(4, 8))

    assert not _use_triton("auto", on_cuda(torch.float64))
    assert all(_use_triton("auto", on_cuda(dt)) for dt in (torch.float32, torch.float16, torch.bfloat16))
    assert _use_triton("triton", on_cuda(torch.float64))  # asked for by name


# ---------------------------------------------------------------------------------------------- routing replay
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_replaying_the_routers_own_choice_routes_as_without_replay(norm, backend):
    torch.manual_seed(11)
    logits = torch.randn(37, 9)
    ref = moe_route(logits, 3, norm, backend=backend)
    got = moe_route(logits, 3, norm, backend=backend, expert_ids=ref.expert_ids.flip(1).to(torch.uint8))
    assert ref.agreement is None and got.agreement.tolist() == [37, 37]  # every row the router's own choice
    # the slots' order may differ; what each token gets must not: the same experts, each with the same weight
    for r in (ref, got):
        assert torch.equal(r.counts, ref.counts) and torch.equal(r.offsets, ref.offsets)
    dense = [torch.zeros(37, 9).scatter(1, r.expert_ids, r.weights) for r in (ref, got)]
    torch.testing.assert_close(dense[1], dense[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("norm", [True, False])
def test_replayed_experts_take_the_routers_probabilities_of_them_with_their_gradient(norm):
    torch.manual_seed(12)
    T, E, k = 41, 10, 3
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    given = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    given[5] = -1  # no record: the router's own top-k
    given[17, 1] = -1
    r = moe_route(logits, k, norm, backend="torch", expert_ids=given)
    own = moe_route(logits.detach(), k, norm, backend="torch").expert_ids
    want_ids = given.clone()
    want_ids[5], want_ids[17] = own[5], own[17]
    assert torch.equal(r.expert_ids, want_ids)
    # the reference, in fp64: softmax over all experts, the chosen ones' probabilities, renormalised over them
    # (norm); the router's softmax runs in fp32 as transformers' does
    probs = torch.softmax(logits, -1).gather(1, want_ids)
    want_w = probs / probs.sum(-1, keepdim=True) if norm else probs
    assert (r.weights - want_w).norm() / want_w.norm() < 1e-6
    g = torch.randn(T, k, dtype=torch.float64)
    (dl,) = torch.autograd.grad(r.weights, logits, g)
    (dl_ref,) = torch.autograd.grad(want_w, logits, g)
    assert (dl - dl_ref).norm() / dl_ref.norm() < 1e-6 and dl.abs().sum() > 0
    # agreement: the recorded rows (all but 5 and 17) whose experts are the router's own top-k, as a set
    same = sum(set(given[t].tolist()) == set(own[t].tolist()) for t in range(T) if t not in (5, 17))
    given[8] = own[8].flip(0)  # one more row the router would have chosen
    assert moe_route(logits, k, norm, backend="torch", expert_ids=given).agreement.tolist() == [same + 1, T - 2]
    # the sort follows the replayed experts: expert e's rows are the copies that name e
    flat = r.expert_ids.reshape(-1)[r.order]
    assert torch.equal(flat, flat.sort().values)
    assert torch.equal(r.counts.long(), torch.bincount(want_ids.reshape(-1), minlength=E))


def test_replayed_experts_out_of_range_repeated_or_misshapen_are_refused():
    logits = torch.randn(6, 5)
    ok = torch.tensor([[0, 1]] * 6)
    for bad, err in ((ok[:5], ValueError), (ok.float(), ValueError), (ok[:, :1], ValueError)):
        with pytest.raises(err, match="expert_ids must be"):
            moe_route(logits, 2, expert_ids=bad)
    for value in (5, 1):  # outside [0, E); the same expert twice in a row
        given = ok.clone()
        given[3, 0] = value
        with pytest.raises(RuntimeError, match="replayed expert_ids"):
            moe_route(logits, 2, expert_ids=given)


@pytest.mark.gpu
def test_replaying_the_routers_own_choice_on_cuda_matches_and_captures_in_a_graph():
    """Routing replay on the GPU path (the Triton top-k for rows without a record, torch weights for the replayed
    ones): the router's own choice replayed gives its weights to bf16 rounding; the assert and the agreement count
    need no host sync (the forward captures in a CUDA graph)."""
    torch.manual_seed(1)
    logits = torch.randn(4099, 128, device="cuda", dtype=torch.bfloat16)
    ref = moe_route(logits, 8, backend="triton")
    given = ref.expert_ids.to(torch.int16)
    given[7] = -1  # no record: the Triton top-k's own choice
    got = moe_route(logits, 8, backend="triton", expert_ids=given)
    assert torch.equal(got.expert_ids, ref.expert_ids) and got.agreement.tolist() == [4098, 4098]
    dense = [torch.zeros(4099, 128, device="cuda").scatter(1, r.expert_ids, r.weights.float()) for r in (ref, got)]
    assert ((dense[1] - dense[0]).norm() / dense[0].norm()).item() < 1e-2
    graph = torch.cuda.CUDAGraph()
    moe_route(logits, 8, backend="triton", expert_ids=given)  # warm up outside the capture
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):  # raises on any host sync inside
        moe_route(logits, 8, backend="triton", expert_ids=given)
    graph.replay()
    torch.cuda.synchronize()


def test_triton_moe_ops_refuse_double_backward_and_the_torch_backend_is_twice_differentiable():
    """create_graph=True through a Triton backward would drop the kernels' terms from the second derivative
    without a word: each MoE op's triton backend refuses it by name; the torch backend's second derivative (a
    gradient penalty through the whole layer) matches transformers' block in fp64."""
    from kernels.grouped_mm import grouped_mm
    from kernels.moe_mlp import swiglu

    torch.manual_seed(3)
    x, router_w, gate_up, down = _moe_params(torch.float32, T=29, H=24, inter=10, E=5)
    r = moe_route(torch.nn.functional.linear(x, router_w).detach(), 2, backend="triton")  # route_topk: below
    logits = torch.randn(29, 5, requires_grad=True)
    h = torch.randn(31, 20, requires_grad=True)
    w = torch.randn(5, 24, 10, requires_grad=True)
    xp = r.permute(x.detach(), backend="torch").requires_grad_()  # [T*k, H] in expert order
    y = torch.randn(58, 24, requires_grad=True)
    cases = {"grouped_mm": lambda: grouped_mm(xp, w, r.offsets, backend="triton"),
             "Routing.permute": lambda: r.permute(x, backend="triton"),
             "Routing.unpermute": lambda: r.unpermute(y, backend="triton"),
             "route_topk": lambda: route_topk(logits, 2, backend="triton")[0],
             "swiglu": lambda: swiglu(h, backend="triton"),
             "expert_mlp": lambda: expert_mlp(x, r, gate_up, down, backend="triton")}
    for name, run in cases.items():
        out = run()
        inputs = [x, xp, y, w, logits, h, gate_up, down]
        first = torch.autograd.grad(out.square().sum(), inputs, allow_unused=True)  # once: fine
        assert any(g is not None and g.norm() > 0 for g in first), name
        # the layer: whichever of its pieces' backwards runs first (the combine) refuses
        who = "" if name == "expert_mlp" else re.escape(name)
        with pytest.raises(RuntimeError, match=f"{who}'s triton backend is differentiable once"):
            out = run()
            torch.autograd.grad(out.square().sum(), inputs, create_graph=True, allow_unused=True)

    # torch backend: d/dparams of |d loss / dx|^2 against transformers' block in fp64
    block = _hf_block(hidden=24, inter=10, experts=5, top_k=2, dtype=torch.float64)
    x64 = torch.randn(29, 24, dtype=torch.float64, requires_grad=True)
    params = [block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj]

    def penalty(y, xs):
        (gx,) = torch.autograd.grad(y.square().sum(), xs, create_graph=True)
        return gx.square().sum()

    ref = torch.autograd.grad(penalty(block(x64[None])[0], x64), params)
    x32 = x64.detach().float().requires_grad_()
    p32 = [p.detach().float().requires_grad_() for p in params]
    r32 = moe_route(torch.nn.functional.linear(x32, p32[0]), 2, backend="torch")
    ours = torch.autograd.grad(penalty(expert_mlp(x32, r32, p32[1], p32[2], backend="torch"), x32), p32)
    for name, a, b in zip(("gate", "gate_up", "down"), ours, ref):
        assert b.norm() > 0 and _rel(a, b) < 1e-4, (name, _rel(a, b))
