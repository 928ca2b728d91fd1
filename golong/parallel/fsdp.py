"""FSDP2 (`fully_shard`) per decoder block and at the root, mixed precision, CPU offload,
activation checkpointing.

Each decoder layer is its own FSDP unit, so at most one layer's full parameters (plus the root's
embeddings / norm / LM head) are materialised at a time; the root unit keeps the embedding and the
(possibly tied) LM head together, which is what makes tied weights safe to shard.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from golong.parallel.mesh import ParallelDims

# FSDP2 warns when the root module returns a view (our (logprob, entropy) outputs are): the risk it
# names is an in-place op on that output, which the trainer never does.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def mixed_precision_policy(param_dtype: str = "bfloat16", reduce_dtype: str = "float32",
                           device: str | None = None) -> MixedPrecisionPolicy:
    """bf16 compute params with fp32 gradient reduction on GPU. On CPU everything stays fp32:
    gloo has no bf16 reduce-scatter and CPU bf16 matmuls are slower, not faster."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[reduce_dtype])


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a golong Qwen3 model (model.model.layers)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no .model.layers: not a golong Qwen3 model")
    return list(layers)


def apply_fsdp(model: nn.Module, dims: ParallelDims, *, param_dtype: str = "bfloat16",
               reduce_dtype: str = "float32", cpu_offload: bool = False,
               reshard_after_forward: bool = True, backward: bool = True) -> nn.Module:
    """Shard `model` in place over dims.fsdp_mesh (all ranks). The master parameters keep the
    dtype they were built in (fp32 for training); `param_dtype` is the compute copy.

    The last layer is not resharded after forward: backward needs it immediately, so gathering it
    again would be wasted traffic (torchtitan does the same). backward=False (a frozen model that
    only runs forward passes): it is resharded like the others.
    """
    if cpu_offload and not torch.cuda.is_available():
        raise ValueError("parallel.cpu_offload needs a GPU: it keeps the shards of GPU training in pinned host memory")
    mp = mixed_precision_policy(param_dtype, reduce_dtype)
    offload: OffloadPolicy = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        fully_shard(layer, mesh=dims.fsdp_mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=reshard_after_forward and (i < len(layers) - 1 or not backward))
    fully_shard(model, mesh=dims.fsdp_mesh, mp_policy=mp, offload_policy=offload,
                reshard_after_forward=reshard_after_forward)
    return model


def apply_activation_checkpointing(model: nn.Module, enabled: bool = True, keep_attention: bool = False) -> None:
    """Recompute each decoder block in backward (the model checkpoints per layer itself); keep_attention: all of
    it but the attention, whose output is kept."""
    if not hasattr(model, "set_activation_checkpointing"):
        raise TypeError(f"{type(model).__name__} does not support activation checkpointing")
    model.set_activation_checkpointing(enabled, keep_attention=keep_attention)
