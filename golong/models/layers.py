"""Small building blocks of Qwen3: RMSNorm, RoPE (with YaRN), SwiGLU.

On CUDA, when liger-kernel is installed, RMSNorm / RoPE / SwiGLU run Liger's Triton kernels; on
CPU they are plain torch (liger is never imported there: its Triton kernels need a GPU).
The torch paths follow transformers' Qwen3 numerics exactly (norm in fp32, then cast, then the
weight; cos/sin cast to the activation dtype), so fp32 logits match it to rounding.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from golong.models.config import ModelConfig, YarnScaling


@functools.cache
def _liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def use_liger(x: torch.Tensor) -> bool:
    return x.is_cuda and _liger_available()


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), normalised in fp32; x [..., D] -> [..., D] x.dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_liger(x) and isinstance(self.weight, torch.Tensor) and type(self.weight) is nn.Parameter:
            from liger_kernel.ops import LigerRMSNormFunction

            shape = x.shape
            # casting_mode "llama" = transformers' order of casts; in_place=False because the
            # input gradient buffer is shared with the residual stream.
            y = LigerRMSNormFunction.apply(x.reshape(-1, shape[-1]), self.weight, self.eps, 0.0, "llama", False)
            return y.view(shape)
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


# ---------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(head_dim: int, theta: float, scaling: YarnScaling | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] fp32 and the cos/sin magnitude ("attention factor").

    YaRN (arXiv 2309.00071): dimensions that rotate fewer than beta_slow times over the original
    context are interpolated (freq / factor), those rotating more than beta_fast times are kept,
    with a linear ramp in between; cos/sin are scaled by 0.1 ln(factor) + 1.
    """
    # explicit CPU device: models are built under `with torch.device("meta")`
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
    base_freq = 1.0 / (theta ** exponent)
    if scaling is None:
        return base_freq, 1.0
    s = scaling

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = s.attention_factor
    if attn_factor is None:
        if s.mscale and s.mscale_all_dim:
            attn_factor = mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim)
        else:
            attn_factor = mscale(s.factor)

    def dim_for_rotations(n_rot: float) -> float:
        # the (fractional) dimension index whose wavelength fits n_rot times into the original context
        return head_dim * math.log(s.original_max_position_embeddings / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for_rotations(s.beta_fast), dim_for_rotations(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original frequency (extrapolate), 0: interpolate
    inv_freq = (base_freq / s.factor) * (1 - keep) + base_freq * keep
    return inv_freq, float(attn_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. Frequencies stay fp32 whatever the model dtype.

    They are a plain attribute, not a buffer, so `model.to(bfloat16)` cannot round them and
    meta-device construction / FSDP never has to materialise them.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.inv_freq_cpu, self.attention_scaling = rope_inv_freq(config.head_dim, config.rope_theta,
                                                                  config.rope_scaling)
        self._per_device: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._per_device:
            self._per_device[device] = self.inv_freq_cpu.to(device)
        return self._per_device[device]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [...] int -> cos, sin [..., head_dim] in `dtype` (computed in fp32)."""
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D], cos/sin [T, D] -> rotated q, k (rotate-half convention)."""
    if use_liger(q):
        from liger_kernel.ops import LigerRopeFunction

        # liger wants [B, H, T, D] views of [B, T, H, D] storage, and cos/sin [1, T, D]
        q4, k4 = q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2)
        q4, k4 = LigerRopeFunction.apply(q4, k4, cos.unsqueeze(0), sin.unsqueeze(0))
        return q4.transpose(1, 2)[0], k4.transpose(1, 2)[0]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


# -------------------------------------------------------------------------------------- SwiGLU
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, same shape."""
    if use_liger(gate):
        from liger_kernel.ops import LigerSiLUMulFunction

        return LigerSiLUMulFunction.apply(gate, up)
    return F.silu(gate) * up


class MLP(nn.Module):
    """Dense SwiGLU MLP: down(silu(gate(x)) * up(x)); x [T, H] -> [T, H]."""

    def __init__(self, hidden: int, intermediate: int, device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
