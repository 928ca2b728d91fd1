"""The dtypes (and devices) golong's Triton kernels take. Their accumulators and softmax state are fp32: an fp64
operand meets an fp32 accumulator in tl.dot (and torch.mm's out_dtype=fp32, on the logprob GEMM path, takes 16-bit
or fp32 only), so fp64 does not compile for sm_90, and integers have no kernel. backend="auto" sends those to
torch."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

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


def check_first_backward(op: str) -> None:
    """Raise RuntimeError in a Triton backward run with create_graph=True (grad mode on inside it): the kernels build
    no graph, so a second derivative through `op` would silently miss their terms."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}'s triton backend is differentiable once: create_graph=True (double backward) needs "
                           "backend='torch'")


def autocast_off(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run an autograd Function's forward or backward with autocast off on its tensors' device: the kernels and
    their torch paths keep their own precisions (fp32 logits and scores, fp32 accumulation), which an autocast
    region around the call or the backward would otherwise round to 16 bits. The forward's first tensor argument
    names the device."""

    @functools.wraps(method)
    def run(ctx: Any, *args: Any) -> Any:
        if not hasattr(ctx, "autocast_device"):  # the forward
            ctx.autocast_device = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        if not torch.amp.is_autocast_available(ctx.autocast_device):  # meta tensors (shape inference): none
            return method(ctx, *args)
        with torch.autocast(ctx.autocast_device, enabled=False):
            return method(ctx, *args)

    return run
