"""The dtypes golong's Triton kernels take. Their accumulators and softmax state are fp32: an fp64 operand meets
an fp32 accumulator in tl.dot (and torch.mm's out_dtype=fp32, on the logprob GEMM path, takes 16-bit or fp32
only), so fp64 does not compile for sm_90, and integers have no kernel. backend="auto" sends those to torch."""

from __future__ import annotations

import torch

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_triton_dtype(t: torch.Tensor, what: str) -> None:
    """Raise TypeError unless backend='triton' takes t's dtype; `what` names the inputs in the message."""
    if t.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' takes fp32, fp16 or bf16 {what}, got {t.dtype}; "
                        "backend='torch' computes in any dtype (e.g. the fp64 oracle)")
