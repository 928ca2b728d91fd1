"""The dtypes (and devices) golong's Triton kernels take. Their accumulators and softmax state are fp32: an fp64
operand meets an fp32 accumulator in tl.dot (and torch.mm's out_dtype=fp32, on the logprob GEMM path, takes 16-bit
or fp32 only), so fp64 does not compile for sm_90, and integers have no kernel. backend="auto" sends those to
torch."""

from __future__ import annotations

import os

import torch

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_triton_dtype(t: torch.Tensor, what: str) -> None:
    """Raise TypeError unless backend='triton' takes t's dtype; `what` names the inputs in the message."""
    if t.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' takes fp32, fp16 or bf16 {what}, got {t.dtype}; backend='torch' takes "
                        "any dtype (its accumulators are fp32 as the kernels' are: the fp64 oracles are the "
                        "*_reference functions)")


def check_triton_device(t: torch.Tensor) -> None:
    """Raise RuntimeError unless t can reach a Triton kernel: a CUDA tensor, or any under TRITON_INTERPRET=1 (a
    CPU tensor otherwise fails inside Triton with "0 active drivers")."""
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run on CPU); "
                           "backend='torch' runs anywhere")
