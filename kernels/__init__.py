"""golong's Triton kernels: fused LM-head logprob/entropy, MoE grouped GEMM + routing, attention.

Each op lives in its own module (Triton kernel, torch reference, autograd Function, dispatcher).
The functions are imported eagerly on purpose: several share their module's name
(`kernels.flash_attention`), and binding the function here after the submodule import keeps the
package attribute pointing at the function, whatever imports the submodule later.
"""

from kernels.flash_attention import flash_attention
from kernels.grouped_mm import grouped_mm
from kernels.logprob import linear_logprob_entropy
from kernels.moe_mlp import expert_mlp
from kernels.moe_route import Routing, moe_route
from kernels.ring_attention import ring_attention, zigzag_shard

__all__ = [
    "Routing",
    "expert_mlp",
    "flash_attention",
    "grouped_mm",
    "linear_logprob_entropy",
    "moe_route",
    "ring_attention",
    "zigzag_shard",
]
