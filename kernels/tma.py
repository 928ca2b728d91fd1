"""What TMA tensor descriptors built inside a kernel (`tl.make_tensor_descriptor`) need from the host: a 16-byte
aligned base, every stride but the unit one a multiple of 16 bytes, and (on CUDA) a scratch allocator for the
descriptors themselves (128 bytes each)."""

from __future__ import annotations

import torch
import triton

_ALLOCATOR = False


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether every tensor can be read or written through a descriptor over its memory order (one unit stride,
    the others and the base 16-byte aligned); on CUDA, installs the descriptor allocator once."""
    global _ALLOCATOR
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or 1 not in t.stride() or any((s * size) % 16 for s in t.stride() if s != 1):
            return False
    if tensors and tensors[0].is_cuda and not _ALLOCATOR:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR = True
    return True
