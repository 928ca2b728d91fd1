"""Process group and the 2-D device mesh (dp_shard, cp).

FSDP shards parameters over all dp_shard * cp ranks (the flattened mesh): context-parallel ranks
compute gradients on different tokens of the same sequences, so their gradients are summed by the
same reduce-scatter as the data-parallel ones. Ring attention runs inside each cp group.
Rank layout: rank = dp_rank * cp + cp_rank, so a cp group is `cp` consecutive ranks (one node
when cp <= GPUs per node: ring traffic stays on NVLink).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_device() -> torch.device:
    """This rank's GPU (torch.cuda.current_device(), which init_parallel set), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(backend: str = "auto", timeout_s: float = 1800.0, cpu_collectives: bool = False
                     ) -> tuple[int, int]:
    """Initialise the default process group once; returns (rank, world_size).

    Under torchrun the env:// variables are used. A plain `python -m golong train` becomes a
    world of one, so the trainer runs the same FSDP code path on 1 rank as on N.
    backend "auto": nccl on CUDA, gloo on CPU. cpu_collectives (FSDP CPU offload: sharded parameters and
    gradients live on the host, and their norm / full_tensor collectives run there) adds gloo for CPU tensors
    next to nccl.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if cpu_collectives and backend == "nccl":
        backend = "cuda:nccl,cpu:gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=timeout_s)
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        store = dist.TCPStore("127.0.0.1", _free_port(), 1, is_master=True)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


@dataclass
class ParallelDims:
    """Where this rank sits in the (dp_shard, cp) mesh."""

    mesh: DeviceMesh  # 2-D, dims ("dp_shard", "cp")
    fsdp_mesh: DeviceMesh  # 1-D, the flattened dp_shard x cp: parameters are sharded over it
    dp_size: int
    dp_rank: int
    cp_size: int
    cp_rank: int

    @property
    def world_size(self) -> int:
        return self.dp_size * self.cp_size

    @property
    def rank(self) -> int:
        return self.dp_rank * self.cp_size + self.cp_rank

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        """The ring-attention group, None when cp == 1."""
        return self.mesh["cp"].get_group() if self.cp_size > 1 else None

    @property
    def dp_group(self) -> dist.ProcessGroup:
        return self.mesh["dp_shard"].get_group()


def init_parallel(dp_shard: int = -1, cp: int = 1, backend: str = "auto", cpu_offload: bool = False,
                  timeout_s: float = 1800.0, rollout_tp: int = 1) -> ParallelDims:
    """Init the process group and build the mesh. dp_shard = -1 means world_size // cp. cpu_offload: the
    process group also reduces CPU tensors (see init_distributed); timeout_s: its collectives' time limit;
    rollout_tp: the vLLM engine's tensor-parallel size, which must divide the world too (one engine per tp ranks)."""
    from golong.config import ConfigError  # a config that does not fit the launch: one line from the CLI

    _, world = init_distributed(backend, timeout_s, cpu_collectives=cpu_offload)
    launch = "ranks (torchrun --nproc_per_node / --nnodes)"
    if cp < 1 or world % cp:
        raise ConfigError(f"parallel.cp={cp} must divide the world size {world}; launch a multiple of {cp} {launch}")
    if world % rollout_tp:  # checked here, not by the engine once the model is built
        raise ConfigError(f"rollout.tensor_parallel_size={rollout_tp} must divide the world size {world}; launch a "
                          f"multiple of {rollout_tp} {launch} or set rollout.tensor_parallel_size to a divisor of it")
    if dp_shard == -1:
        dp_shard = world // cp
    if dp_shard * cp != world:
        raise ConfigError(f"parallel.dp_shard={dp_shard} x parallel.cp={cp} != world size {world}; launch "
                          f"{dp_shard * cp} {launch} or set parallel.dp_shard=-1 (world size / cp)")
    mesh = init_device_mesh(device_type(), (dp_shard, cp), mesh_dim_names=("dp_shard", "cp"))
    fsdp_mesh = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    return ParallelDims(mesh=mesh, fsdp_mesh=fsdp_mesh, dp_size=dp_shard, dp_rank=mesh.get_local_rank("dp_shard"),
                        cp_size=cp, cp_rank=mesh.get_local_rank("cp"))


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's obj, in rank order, on every rank (pickled; small objects only). A collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_objects_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's obj on rank 0 (rank order), None on the others. A collective: every rank calls it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
