"""Parallelism for the trainer: one device mesh (dp_shard, cp), FSDP2 sharding, context parallel.

    dims = init_parallel(dp_shard=-1, cp=2)         # process group + mesh from the world size
    apply_fsdp(model, dims, param_dtype="bfloat16") # fully_shard per block and at the root
    ids_local = cp_shard(ids, cu_seqlens, dims.cp_rank, dims.cp_size)   # zigzag shard (cp > 1)
"""

from golong.parallel.batching import balance, pack, plan_all_micro_batches, plan_micro_batches, rollout_share
from golong.parallel.context import cp_gather, cp_shard
from golong.parallel.fsdp import apply_activation_checkpointing, apply_fsdp, mixed_precision_policy
from golong.parallel.mesh import (
    ParallelDims,
    all_gather_objects,
    compute_device,
    gather_objects_to_rank0,
    init_distributed,
    init_parallel,
)

__all__ = [
    "ParallelDims",
    "all_gather_objects",
    "compute_device",
    "apply_activation_checkpointing",
    "apply_fsdp",
    "balance",
    "cp_gather",
    "cp_shard",
    "gather_objects_to_rank0",
    "init_distributed",
    "init_parallel",
    "mixed_precision_policy",
    "pack",
    "plan_all_micro_batches",
    "plan_micro_batches",
    "rollout_share",
]
