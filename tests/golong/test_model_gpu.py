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
