"""golong's Triton kernels: fused LM-head logprob/entropy, MoE grouped GEMM + routing, attention.

Each op lives in its own module (Triton kernel, torch reference, autograd Function, dispatcher).
Exports are resolved lazily so `import kernels` stays cheap and pulls in triton only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "linear_logprob_entropy": "kernels.logprob",
    "grouped_mm": "kernels.grouped_mm",
    "moe_route": "kernels.moe_route",
    "Routing": "kernels.moe_route",
    "expert_mlp": "kernels.moe_mlp",
    "flash_attention": "kernels.flash_attention",
    "zigzag_shard": "kernels.ring_attention",
    "ring_attention": "kernels.ring_attention",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
