"""CUDA path of golong.models (Triton kernels + Liger RMSNorm/RoPE/SwiGLU, bf16) vs the CPU fp32 path."""

from __future__ import annotations

import sys

import pytest
import torch

import golong.models as gm
from tests.golong.model_fixtures import build_hf, packed_batch, rel

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_cuda_bf16_matches_cpu_fp32(kind, tmp_path):
    build_hf(kind).save_pretrained(tmp_path)
    cpu = gm.from_pretrained(tmp_path, dtype=torch.float32)
    gpu = gm.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda")
    ids, cu = packed_batch([77, 300, 141], seed=1)
    targets = torch.randint(0, 1000, ids.shape)
    coef = torch.randn(ids.shape)
    outs = []
    for model, dev in ((cpu, "cpu"), (gpu, "cuda")):
        model.set_activation_checkpointing(dev == "cuda")
        lp, ent = model(ids.to(dev), cu.to(dev), targets=targets.to(dev))
        ((coef.to(dev) * lp).sum() + ent.sum()).backward()
        outs.append((lp.detach().cpu(), ent.detach().cpu(),
                     {n: p.grad.float().cpu() for n, p in model.named_parameters()}))
    (lp0, ent0, g0), (lp1, ent1, g1) = outs
    assert rel(lp1, lp0) <= 3e-2 and rel(ent1, ent0) <= 3e-2
    for n in g0:
        assert torch.isfinite(g1[n]).all() and rel(g1[n], g0[n]) <= 1e-1, n
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return
    assert "liger_kernel.ops" in sys.modules  # RMSNorm / RoPE / SwiGLU went through Liger


@pytest.mark.parametrize("backend", ["triton", "varlen_attn"])
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_checkpointing_that_keeps_attention_matches_plain_checkpointing_on_cuda(kind, backend, tmp_path):
    """parallel.ac_keep_attention on the Triton attention kernels and on PyTorch's varlen_attn (a custom op whose
    saved q, k, v the hooks must reach as well): the same gradients as plain checkpointing (the recomputed q, k, v
    are the forward's, bitwise), the attention run once per layer."""
    from golong.models.attention import Attention

    build_hf(kind).save_pretrained(tmp_path)
    model = gm.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda")
    model.set_attention_backend(backend)
    ids, cu = packed_batch([77, 300, 141], seed=2)
    targets = torch.randint(0, 1000, ids.shape)
    calls, attend = [0], Attention.attend

    def counted(self, *args):
        calls[0] += 1
        return attend(self, *args)

    Attention.attend = counted
    try:
        grads = []
        for keep in (False, True):
            model.zero_grad()
            model.set_activation_checkpointing(True, keep_attention=keep)
            calls[0] = 0
            lp, ent = model(ids.cuda(), cu.cuda(), targets=targets.cuda())
            (lp.sum() + ent.sum()).backward()
            assert calls[0] == (1 if keep else 2) * len(model.model.layers)
            grads.append({n: p.grad.float().cpu() for n, p in model.named_parameters()})
    finally:
        Attention.attend = attend
    # FlashAttention-2's backward adds dQ by fp32 atomics, in an order that varies from run to run
    tol = 1e-6 if backend == "triton" else 2e-3
    for n in grads[0]:
        assert rel(grads[1][n], grads[0][n]) <= tol, n
