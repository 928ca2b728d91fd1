"""NVTX ranges for Nsight Systems, and the cudaProfilerStart/Stop capture window.

`nvtx_range(name)` emits a range when CUDA is available and is a shared no-op context otherwise,
so it can wrap every layer and phase at no cost on CPU.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch


@functools.cache
def _nvtx_enabled() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import nvtx  # noqa: F401
    except ImportError:
        return False
    return True


_NULL = contextlib.nullcontext()


def nvtx_range(name: str, color: str | None = None) -> Any:
    """Context manager (and decorator) marking an NVTX range; a no-op without CUDA."""
    if not _nvtx_enabled():
        return _NULL
    import nvtx

    return nvtx.annotate(name, color=color, domain="golong")


@contextlib.contextmanager
def cuda_profiler_window(active: bool) -> Iterator[None]:
    """cudaProfilerStart/Stop around the block when `active`, for
    `nsys profile --capture-range=cudaProfilerApi`."""
    if not (active and torch.cuda.is_available()):
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    try:
        yield
    finally:
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
