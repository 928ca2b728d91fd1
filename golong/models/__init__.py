"""Lean Qwen3 / Qwen3-MoE on golong's kernels, with Hugging Face checkpoint I/O.

    model = golong.models.from_pretrained(path, dtype=torch.bfloat16, device="cpu")
    model = golong.models.from_config(hf_config_or_dict, dtype, device)   # random init
    hidden = model(input_ids, cu_seqlens, position_ids=None)               # packed [T] -> [T, H]
    logits = model.logits(hidden)
    logprob, entropy = model.logprob_entropy(hidden, targets, temperature=1.0)
    model.save_pretrained(path)
"""

from golong.models.cache import KVCache
from golong.models.checkpoint import from_config, from_pretrained, load_weights, save_pretrained
from golong.models.config import ConfigError, ModelConfig, YarnScaling
from golong.models.qwen3 import Qwen3ForCausalLM, packed_position_ids

__all__ = [
    "ConfigError",
    "KVCache",
    "ModelConfig",
    "Qwen3ForCausalLM",
    "YarnScaling",
    "from_config",
    "from_pretrained",
    "load_weights",
    "packed_position_ids",
    "save_pretrained",
]
