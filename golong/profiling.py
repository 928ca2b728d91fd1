"""NVTX ranges for Nsight Systems, and the cudaProfilerStart/Stop capture window.

`nvtx_range(name)` emits a range when CUDA is available and is a shared no-op context otherwise,
so it can wrap every layer and phase at no cost on CPU.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
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
    """Context manager marking an NVTX range; a no-op without CUDA."""
    if not _nvtx_enabled():
        return _NULL
    import nvtx

    return nvtx.annotate(name, color=color, domain="golong")


class CaptureWindow:
    """cudaProfilerStart / Stop for `nsys profile --capture-range=cudaProfilerApi`: one window over each run of
    consecutive steps of `steps` (profile.steps), closed after its last step, after `last_step` or on an error. A
    window per step ended nsys's capture after the first one under --capture-range-end=stop ([3, 4]: step 3 only).
    No-ops without CUDA."""

    def __init__(self, steps: Sequence[int], last_step: int) -> None:
        self.steps, self.last_step, self.open = set(steps), last_step, False

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        if step in self.steps and not self.open:
            self._call("cudaProfilerStart")
            self.open = True
        try:
            yield
        except BaseException:
            self.close()
            raise
        if step + 1 not in self.steps or step >= self.last_step:
            self.close()

    def close(self) -> None:
        if self.open:
            self._call("cudaProfilerStop")
            self.open = False

    @staticmethod
    def _call(name: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the window holds the step's kernels whole
            getattr(torch.cuda.cudart(), name)()


class TorchTrace:
    """A torch.profiler trace of the steps it is entered for (CPU and, on a GPU, CUDA activity), written as a Chrome
    trace to `path` on exit."""

    def __init__(self, path: Path) -> None:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.path, self.prof = path, profile(activities=acts, record_shapes=True)

    def __enter__(self) -> TorchTrace:
        self.prof.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.prof.__exit__(*exc)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.path))


def add_layer_nvtx(model: torch.nn.Module) -> None:
    """An NVTX range around every decoder layer's forward (Nsight shows them per block)."""
    if not torch.cuda.is_available():
        return
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda *_, i=i: torch.cuda.nvtx.range_push(f"layer{i}"))
        layer.register_forward_hook(lambda *_: torch.cuda.nvtx.range_pop())
