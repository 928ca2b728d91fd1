"""What a run's config names, built: the model (FSDP-sharded, from scratch or a checkpoint), the frozen reference
policy of the KL term, the tokenizer and the ids that stop a response."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from golong.config import ConfigError, RunConfig
from golong.models.config import ModelConfig
from golong.parallel import (
    ParallelDims,
    apply_activation_checkpointing,
    apply_fsdp,
    compute_device,
    mixed_precision_policy,
)


def scratch_hf_config(cfg: RunConfig) -> dict[str, Any]:
    """model.scratch as a Hugging Face config dict (qwen3, or qwen3_moe with experts)."""
    s = cfg.model.scratch
    assert s is not None
    d = dict(vocab_size=s.vocab_size, hidden_size=s.hidden_size, num_hidden_layers=s.num_hidden_layers,
             num_attention_heads=s.num_attention_heads, num_key_value_heads=s.num_key_value_heads,
             head_dim=s.head_dim, intermediate_size=s.intermediate_size,
             max_position_embeddings=s.max_position_embeddings,
             rope_theta=s.rope_theta, rms_norm_eps=s.rms_norm_eps, tie_word_embeddings=s.tie_word_embeddings,
             hidden_act="silu", initializer_range=0.02)
    if s.num_experts > 0:
        d.update(model_type="qwen3_moe", num_experts=s.num_experts, num_experts_per_tok=s.num_experts_per_tok,
                 moe_intermediate_size=s.moe_intermediate_size, norm_topk_prob=s.norm_topk_prob,
                 decoder_sparse_step=1, mlp_only_layers=[])
    else:
        d.update(model_type="qwen3")
    return d


def model_config(cfg: RunConfig) -> ModelConfig:
    """The architecture cfg.model names (model.path's config.json, else model.scratch) as a golong ModelConfig.
    One a Qwen3 model cannot represent is a ConfigError naming where it came from (one line from the CLI)."""
    if cfg.model.path is not None:
        return ModelConfig.from_hf(cfg.model.path)  # its errors name the file
    try:
        return ModelConfig.from_hf(scratch_hf_config(cfg))
    except ConfigError as e:
        raise ConfigError(f"model.scratch: {e}") from None


def reference_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype the policy computes in, which the KL term's reference policy is held in."""
    return mixed_precision_policy(cfg.parallel.param_dtype, cfg.parallel.reduce_dtype).param_dtype


def build_model(cfg: RunConfig, dims: ParallelDims, seed: int | None = None, *, reference: bool = False
                ) -> nn.Module:
    """The training model, FSDP-sharded, fp32 master weights. From scratch: built in full on every
    rank from the same seed, then sharded (tiny models only). From a checkpoint: built on the
    meta device, sharded, then each rank streams in just its shards.

    reference: the frozen reference policy of the KL term: the same starting weights held in the policy's
    compute dtype (parallel.param_dtype on a GPU, fp32 on CPU, as FSDP's mixed precision casts them), so the two
    agree exactly before the first update, without gradients; rebuilt the same way on a resume, so checkpoints
    need not hold it."""
    from golong.models import Qwen3ForCausalLM, from_config, load_weights

    device = compute_device()
    dtype = reference_dtype(cfg) if reference else torch.float32
    if cfg.model.path is None:
        torch.manual_seed(cfg.trainer.seed if seed is None else seed)
        # initialised in fp32 whatever the dtype: the policy's values, rounded as its compute copy rounds them
        model = from_config(model_config(cfg), dtype=torch.float32, device=device).to(dtype)
    else:
        with torch.device("meta"):
            model = Qwen3ForCausalLM(model_config(cfg), dtype=dtype)
    if reference:
        model.requires_grad_(False)
    elif cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(model, keep_attention=cfg.parallel.ac_keep_attention)
    apply_fsdp(model, dims, param_dtype=cfg.parallel.param_dtype, reduce_dtype=cfg.parallel.reduce_dtype,
               cpu_offload=cfg.parallel.cpu_offload, backward=not reference)
    if cfg.model.path is not None:  # with CPU offload FSDP keeps the sharded parameters on the host
        load_weights(model, cfg.model.path, device="cpu" if cfg.parallel.cpu_offload else device)
        model.source_path = cfg.model.path
    model.cp_group = dims.cp_group
    model.set_attention_backend(cfg.model.attn_backend)
    return model


def load_tokenizer(cfg: RunConfig) -> Any:
    src = cfg.model.tokenizer or cfg.model.path
    if src is not None:
        from transformers import AutoTokenizer

        key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
        try:
            tok = AutoTokenizer.from_pretrained(src, trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError) as e:  # a file, a folder without tokenizer files: transformers' traceback
            raise ConfigError(f"{key}={src}: no tokenizer loads from it ({str(e).splitlines()[0][:200]}); give the "
                              "chat model's folder (tokenizer.json / tokenizer_config.json)") from None
        # transformers builds an empty tokenizer from a folder without tokenizer files, and prompts
        # are chat-templated: both would fail later with a message that does not name the folder
        if tok.chat_template is None:
            raise ConfigError(f"tokenizer {src} has no chat template (or no tokenizer files at all): point "
                              "model.tokenizer at the chat model's tokenizer folder")
        return tok
    from golong.data.tokenizer import build_demo_tokenizer

    assert cfg.model.scratch is not None
    return build_demo_tokenizer(vocab_size=cfg.model.scratch.vocab_size)


def stop_token_ids(tokenizer: Any, model_path: str | None = None) -> list[int]:
    """The ids that end a response, for both engines and `_strip_stop`: the tokenizer's EOS, <|im_end|>,
    <|endoftext|> and the checkpoint's own EOS ids (vLLM adds those to every request's stop ids by itself)."""
    ids = {tokenizer.eos_token_id, *checkpoint_eos_ids(model_path)}
    for name in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def checkpoint_eos_ids(model_path: str | None) -> list[int]:
    """eos_token_id of a Hugging Face checkpoint as vLLM reads it (InputProcessor -> update_from_generation_config):
    from generation_config.json, or from config.json when there is none."""
    if model_path is None:
        return []
    import json

    for name in ("generation_config.json", "config.json"):
        if (f := Path(model_path) / name).is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return []
