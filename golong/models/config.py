"""Typed model config parsed from a Hugging Face Qwen3 / Qwen3-MoE `config.json`.

Only what the model can represent is accepted: anything else (sliding-window attention, an
unknown RoPE type, attention bias, another activation...) raises ConfigError naming the field,
instead of silently training a different network than the checkpoint describes.
The raw dict is kept so `save_pretrained` writes back every field it did not touch
(eos ids, architectures, generation-related keys), which vLLM and transformers read.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from golong.config import ConfigError  # one error type: the CLI shows it as one line

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe")


@dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE scaling (as `rope_scaling` / `rope_parameters` with rope_type "yarn")."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None  # None: derived from factor (and mscale/mscale_all_dim)
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass
class ModelConfig:
    """Architecture of a Qwen3 (dense) or Qwen3-MoE model.

    `num_experts == 0` means dense. For MoE, layer i uses the sparse block unless i is in
    `mlp_only_layers` or (i + 1) % decoder_sparse_step != 0 (then a dense MLP of `intermediate_size`).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_is_moe(self, i: int) -> bool:
        return self.is_moe and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    # ------------------------------------------------------------------ HF <-> typed
    @classmethod
    def from_hf(cls, cfg: dict[str, Any] | Any) -> ModelConfig:
        """Parse a HF config (dict, path to config.json / its folder, or a transformers config).
        Raises ConfigError (naming the file when given a path) for a field the model cannot represent."""
        if not isinstance(cfg, (str, Path)):
            return cls._parse(_as_dict(cfg))
        path = Path(cfg) / "config.json" if Path(cfg).is_dir() else Path(cfg)
        if Path(cfg).is_dir() and not path.is_file():
            raise ConfigError(f"{cfg} is not a Hugging Face model directory: it has no config.json")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
        try:
            return cls._parse(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def _parse(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model_type={model_type!r}: only {SUPPORTED_MODEL_TYPES} are supported")

        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise ConfigError(f"config field {key!r} is missing")
            return size(key, raw[key])

        def size(key: str, value: Any) -> int:  # a count or a width: a negative one failed deep in the model build
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"config field {key}={value!r} must be an integer >= 1")
            return value

        _reject(raw, "hidden_act", lambda v: v not in (None, "silu"), "only 'silu' (SwiGLU) is supported")
        _reject(raw, "attention_bias", bool, "q/k/v/o projections with bias are not supported")
        _reject(raw, "mlp_bias", bool, "MLP projections with bias are not supported")
        _reject(raw, "use_sliding_window", bool, "sliding-window attention is not supported")
        _reject(raw, "attention_dropout", lambda v: v not in (None, 0, 0.0), "attention dropout is not supported")
        _reject(raw, "partial_rotary_factor", lambda v: v not in (None, 1, 1.0), "partial RoPE is not supported")
        _reject(raw, "dual_chunk_attention_config", bool, "dual-chunk attention is not supported (use YaRN)")
        _reject(raw, "quantization_config", bool, "quantized checkpoints (FP8, AWQ, GPTQ...) are not supported; "
                "use the bf16 one")
        layer_types = raw.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise ConfigError(f"layer_types={sorted(set(layer_types))}: only 'full_attention' layers are supported")

        n_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        # transformers' defaults when the field is absent: Qwen3Config has head_dim=128, Qwen3MoeConfig
        # no such field (hidden_size // num_attention_heads)
        head_dim = size("head_dim", raw.get("head_dim") or (128 if model_type == "qwen3" else hidden // n_heads))
        # absent: the transformers class default (Qwen3Config 32, Qwen3MoeConfig 4); null: one per query head
        n_kv = raw.get("num_key_value_heads", 32 if model_type == "qwen3" else 4) or n_heads
        n_kv = size("num_key_value_heads", n_kv)
        if n_heads % n_kv:
            raise ConfigError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
        max_pos = raw.get("max_position_embeddings", 32768)
        rope_theta, scaling = _parse_rope(raw, max_pos)

        num_experts = 0
        if model_type == "qwen3_moe":
            num_experts = raw.get("num_experts", raw.get("num_local_experts"))
            if not num_experts:
                raise ConfigError("config field 'num_experts' is missing or 0 for model_type 'qwen3_moe'")
            size("num_experts", num_experts)
        step = raw.get("decoder_sparse_step", 1) or 1
        out = cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            num_experts=num_experts,
            num_experts_per_tok=raw.get("num_experts_per_tok", 0) if num_experts else 0,
            moe_intermediate_size=raw.get("moe_intermediate_size", 0) if num_experts else 0,
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            decoder_sparse_step=step,
            mlp_only_layers=tuple(raw.get("mlp_only_layers") or ()),
            hf_config=raw,
        )
        if out.is_moe and not (0 < out.num_experts_per_tok <= out.num_experts):
            raise ConfigError(f"num_experts_per_tok={out.num_experts_per_tok} must be in [1, {out.num_experts}]")
        if out.is_moe:
            if not raw.get("moe_intermediate_size"):
                raise ConfigError("config field 'moe_intermediate_size' is missing for model_type 'qwen3_moe'")
            size("moe_intermediate_size", out.moe_intermediate_size)
        return out

    def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
        """HF config.json dict: the original fields, with this config's values written over them."""
        d = copy.deepcopy(self.hf_config)
        d.update(
            model_type=self.model_type,
            architectures=["Qwen3MoeForCausalLM" if self.model_type == "qwen3_moe" else "Qwen3ForCausalLM"],
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu", attention_bias=False,
        )
        # One RoPE spelling understood by both transformers 4.x/vLLM (rope_theta + rope_scaling)
        # and transformers 5 (which converts those into rope_parameters on load).
        d.pop("rope_parameters", None)
        d["rope_theta"] = self.rope_theta
        d["rope_scaling"] = None
        if self.rope_scaling is not None:
            # Only non-default keys: older readers (vLLM's get_rope) choke on keys they don't know.
            defaults = YarnScaling(factor=0.0, original_max_position_embeddings=0)
            s = {k: v for k, v in dataclasses.asdict(self.rope_scaling).items()
                 if v is not None and (k in ("factor", "original_max_position_embeddings")
                                       or v != getattr(defaults, k))}
            d["rope_scaling"] = {"rope_type": "yarn", **s}
        if self.is_moe:
            d.pop("num_local_experts", None)
            d.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                     moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                     decoder_sparse_step=self.decoder_sparse_step, mlp_only_layers=list(self.mlp_only_layers))
        if dtype is not None:
            d["torch_dtype"] = dtype
            d["dtype"] = dtype
        return d


def _as_dict(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, ModelConfig):
        return copy.deepcopy(cfg.hf_config)
    if isinstance(cfg, dict):
        return copy.deepcopy(cfg)
    if hasattr(cfg, "to_dict"):  # a transformers PretrainedConfig
        d = cfg.to_dict()
        if "num_experts" not in d and getattr(cfg, "num_experts", None):
            d["num_experts"] = cfg.num_experts
        return d
    raise TypeError(f"cannot read a model config from {type(cfg).__name__}")


def _reject(raw: dict[str, Any], key: str, bad: Any, why: str) -> None:
    if key in raw and bad(raw[key]):
        raise ConfigError(f"config field {key}={raw[key]!r}: {why}")


def _parse_rope(raw: dict[str, Any], max_pos: int) -> tuple[float, YarnScaling | None]:
    """RoPE from either spelling: rope_theta + rope_scaling (HF 4.x) or rope_parameters (HF 5)."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    if params and any(isinstance(v, dict) for v in params.values()):
        raise ConfigError("config field 'rope_parameters' is per layer type; only one global RoPE is supported")
    if not (params and scaling):
        return _rope_of(params or scaling, raw, max_pos, "rope_parameters" if params else "rope_scaling")
    # e.g. rope_scaling (YaRN, as Qwen's model cards say) added to a transformers-5 config that has rope_parameters:
    # transformers then takes rope_scaling whole (rope_theta from the top level, else its default), vLLM may read
    # either: each spelling is read on its own, and unless they give the same RoPE, neither is picked
    a = _rope_of(scaling, raw, max_pos, "rope_scaling")
    b = _rope_of(params, raw, max_pos, "rope_parameters")
    if a != b:
        fields = {"rope_theta": (a[0], b[0])}
        if a[1] is None or b[1] is None:
            fields["rope_type"] = ("default" if a[1] is None else "yarn", "default" if b[1] is None else "yarn")
        else:
            fields.update({f.name: (getattr(a[1], f.name), getattr(b[1], f.name)) for f in dataclasses.fields(a[1])})
        diff = ", ".join(f"{k} ({x} against {y})" for k, (x, y) in fields.items() if x != y)
        raise ConfigError(f"config fields rope_scaling={scaling} and rope_parameters={params} disagree on {diff} "
                          "(each read on its own, as transformers reads rope_scaling); keep only one of them")
    return a


def _rope_of(d: dict[str, Any], raw: dict[str, Any], max_pos: int, where: str) -> tuple[float, YarnScaling | None]:
    """(theta, YaRN or None) of one RoPE spelling `d` (rope_scaling or rope_parameters) of config `raw`."""
    theta = d.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = d.get("rope_type", d.get("type", "default"))
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"config field partial_rotary_factor={d['partial_rotary_factor']}: not supported")
    if rope_type == "default":
        return float(theta), None
    if rope_type != "yarn":
        raise ConfigError(f"config field {where}.rope_type={rope_type!r}: only 'default' and 'yarn' are supported")
    if d.get("factor") is None:
        raise ConfigError(f"config field {where}.factor is missing for YaRN")
    beta_fast = d.get("beta_fast") or 32.0
    beta_slow = d.get("beta_slow") or 1.0
    orig = raw.get("original_max_position_embeddings") or d.get("original_max_position_embeddings") or max_pos
    return float(theta), YarnScaling(
        factor=float(d["factor"]), original_max_position_embeddings=int(orig),
        beta_fast=float(beta_fast), beta_slow=float(beta_slow),
        attention_factor=d.get("attention_factor"), mscale=d.get("mscale"),
        mscale_all_dim=d.get("mscale_all_dim"), truncate=bool(d.get("truncate", True)),
    )
