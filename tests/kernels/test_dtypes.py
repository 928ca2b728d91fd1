"""kernels.dtypes: what backend='triton' takes. A CPU tensor without TRITON_INTERPRET failed inside Triton with
"0 active drivers ([]). There should only be one." for every op but the logprob one: now each says what it needs."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.moe_mlp import expert_mlp
from kernels.moe_route import moe_route

NEEDS = r"backend='triton' needs CUDA tensors \(or TRITON_INTERPRET=1 to run on CPU\); backend='torch' runs anywhere"


def test_triton_on_cpu_without_the_interpreter_says_what_it_needs(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(8, 16)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k = torch.randn(8, 2, 16), torch.randn(8, 1, 16)
    routing = moe_route(torch.randn(8, 4), 2, backend="torch")
    calls = {
        "grouped_mm": lambda: kernels.grouped_mm(x, torch.randn(2, 16, 4), torch.tensor([3, 8], dtype=torch.int32),
                                                 backend="triton"),
        "moe_route": lambda: moe_route(torch.randn(8, 4), 2, backend="triton"),
        "unpermute": lambda: routing.unpermute(torch.randn(16, 16), backend="triton"),
        "expert_mlp": lambda: expert_mlp(x, routing, torch.randn(4, 12, 16), torch.randn(4, 16, 6), backend="triton"),
        "flash_attention": lambda: kernels.flash_attention(q, k, k, cu, backend="triton"),
        # flash-attn's kernels are not on CPU: it falls back to triton, which says so
        "flash_attn": lambda: kernels.flash_attention(q, k, k, cu, backend="flash_attn"),
        "logprob": lambda: kernels.linear_logprob_entropy(x, torch.randn(10, 16), torch.randint(0, 10, (8,)),
                                                          backend="triton"),
    }
    for call in calls.values():
        with pytest.raises(RuntimeError, match=NEEDS):
            call()
    # the torch backend runs the same calls
    assert kernels.flash_attention(q, k, k, cu, backend="torch")[0].shape == q.shape
    assert kernels.grouped_mm(x, torch.randn(2, 16, 4), torch.tensor([3, 8], dtype=torch.int32),
                              backend="torch").shape == (8, 4)


def test_fp64_is_refused_by_triton_and_named_for_torch():
    with pytest.raises(TypeError, match=r"takes fp32, fp16 or bf16 x and w, got torch.float64; backend='torch' takes "
                                        r"any dtype \(its accumulators are fp32 as the kernels' are: the fp64 oracles "
                                        r"are the \*_reference functions\)"):
        kernels.grouped_mm(torch.randn(8, 16, dtype=torch.float64), torch.randn(2, 16, 4, dtype=torch.float64),
                           torch.tensor([3, 8], dtype=torch.int32), backend="triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_autocast_region_does_not_round_the_kernels_to_16_bits(backend):
    """Inside torch.autocast (bf16) the LM head's logits and attention's scores stay fp32, forward and backward
    (the torch paths' matmuls were autocast to bf16: logprob error 4e-2 vs 1e-6 outside): the results match the
    same call outside the region, and the fp64 reference."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(16, 128, generator=g, requires_grad=True)
    w = (torch.randn(1031, 128, generator=g) * 0.3).requires_grad_()
    t = torch.randint(0, 1031, (16,), generator=g)
    q = torch.randn(23, 4, 32, generator=g, requires_grad=True)
    kv = torch.randn(23, 2, 32, generator=g, requires_grad=True)
    cu = torch.tensor([0, 9, 23], dtype=torch.int32)

    def run():
        lp, ent = kernels.linear_logprob_entropy(h, w, t, 0.7, backend=backend)
        out, lse = kernels.flash_attention(q, kv, kv, cu, backend=backend)
        loss = (lp * torch.linspace(-1, 1, 16)).sum() + ent.sum() + out.square().sum() + lse.sum()
        return [lp, ent, out, lse, *torch.autograd.grad(loss, (h, w, q, kv))]

    plain = [x.detach() for x in run()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = [x.detach() for x in run()]
    ref_logits = (h.double() @ w.double().T) / 0.7
    ref_lp = torch.log_softmax(ref_logits, -1).gather(1, t[:, None])[:, 0]
    for name, a, b in zip(("logprob", "entropy", "out", "lse", "dh", "dw", "dq", "dkv"), cast, plain):
        assert a.dtype == b.dtype and torch.isfinite(a).all(), name
        assert ((a.double() - b.double()).norm() / b.double().norm()).item() < 1e-5, name
    assert ((cast[0].double() - ref_lp).norm() / ref_lp.norm()).item() < 1e-5


def test_meta_tensors_still_infer_shapes_through_the_torch_attention():
    """autocast_off has no autocast to turn off on the meta device (torch.autocast("meta") raises): shape inference
    through the torch backend works as before it."""
    q, kv = torch.randn(20, 4, 32, device="meta"), torch.randn(20, 2, 32, device="meta")
    out, lse = kernels.flash_attention(q, kv, kv, torch.tensor([0, 9, 20], dtype=torch.int32), backend="torch")
    assert out.shape == (20, 4, 32) and lse.shape == (20, 4) and out.is_meta
