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
