"""Typed run configuration: dataclasses loaded from YAML plus dotted `key=value` overrides.

    cfg = load_config("configs/qwen3-4b-grpo.yaml", ["algo.adv_estimator=tmn_grpo", "optim.lr=2e-6"])

OmegaConf structured configs check keys and types; string fields with a fixed set of values carry
their choices in field metadata and are checked here. Every problem is raised as ConfigError with
one readable line naming the key, which the CLI prints without a traceback.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

ADV_ESTIMATORS = ("grpo", "tmn_grpo", "task_norm", "dr_grpo")


class ConfigError(ValueError):
    """A bad config file or override; the message is one line naming the key."""


def _choice(default: str, choices: tuple[str, ...]) -> Any:
    return field(default=default, metadata={"choices": choices})


@dataclass
class ScratchModelConfig:
    """Architecture of a randomly initialised Qwen3 / Qwen3-MoE (CPU demo, tests, benchmarks)."""

    vocab_size: int = 2048
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 256
    num_experts: int = 0  # 0 = dense Qwen3; > 0 = Qwen3-MoE
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64
    norm_topk_prob: bool = True
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True


@dataclass
class ModelConfig:
    path: Optional[str] = None  # Hugging Face checkpoint directory (config.json + safetensors)
    scratch: Optional[ScratchModelConfig] = None  # used when path is None: random init
    tokenizer: Optional[str] = None  # defaults to `path`
    dtype: str = _choice("bfloat16", ("bfloat16", "float32", "float16"))
    attn_backend: str = _choice("auto", ("auto", "triton", "torch", "flash_attn"))
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # parquet / jsonl in GoLongRL/verl format
    val_files: list[str] = field(default_factory=list)
    max_prompt_tokens: int = 163_840
    overflow: str = _choice("truncate_left", ("truncate_left", "drop"))
    shuffle: bool = True
    seed: int = 0
    # when train_files is empty: generate the 9 synthetic tasks in memory
    synthetic_n: int = 0
    synthetic_val_n: int = 0
    synthetic_context_tokens: int = 256
    synthetic_tasks: list[str] = field(default_factory=list)  # default: all nine


@dataclass
class RolloutConfig:
    engine: str = _choice("vllm", ("vllm", "torch"))
    n: int = 16  # responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_response_tokens: int = 16_384
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.6
    weight_sync_bucket_mb: int = 512
    val_temperature: float = 0.6
    val_top_p: float = 0.95
    val_n: int = 1
    require_think: bool = True  # a response scores 0 unless it has exactly one </think>
    reward_timeout_s: float = 10.0
    reward_workers: int = 8


@dataclass
class AlgoConfig:
    adv_estimator: str = _choice("grpo", ADV_ESTIMATORS)
    norm_by_task_scale: bool = True
    difficulty_reweight: bool = False
    gamma: float = 1.0
    alpha: float = 0.8
    eps: float = 1e-6
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 3.0
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    rollout_is: str = _choice("mask", ("mask", "truncate", "none"))
    rollout_is_lower: float = 0.5
    rollout_is_upper: float = 5.0
    rollout_is_veto: float = 1e-4
    dynamic_sampling: bool = True
    max_num_gen_batches: int = 4
    ppo_epochs: int = 1


@dataclass
class OptimConfig:
    lr: float = 2e-6
    warmup_steps: int = 5
    lr_schedule: str = _choice("constant", ("constant", "cosine"))
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    # AdamW implementation. "for-loop": one parameter at a time, temporaries the size of the largest
    # parameter shard; "foreach" (torch's CUDA default) keeps a temporary the size of ALL optimizer states
    # (+15 GiB at Qwen3-4B on one GPU, measured); "fused": one kernel, no temporaries.
    impl: str = _choice("for-loop", ("for-loop", "foreach", "fused"))


@dataclass
class ParallelConfig:
    dp_shard: int = -1  # -1: world_size // cp
    cp: int = 1  # context-parallel (ring attention) degree
    param_dtype: str = _choice("bfloat16", ("bfloat16", "float32"))
    reduce_dtype: str = _choice("float32", ("float32", "bfloat16"))
    activation_checkpointing: bool = True
    cpu_offload: bool = False
    backend: str = _choice("auto", ("auto", "nccl", "gloo"))


@dataclass
class TrainerConfig:
    total_steps: int = 100
    prompts_per_step: int = 128
    mini_batch_prompts: int = 128  # prompts per optimizer step (one PPO epoch)
    micro_batch_tokens: int = 32_768  # packed token budget per forward/backward
    val_every: int = 0  # 0 = never
    val_before_train: bool = False
    max_consecutive_nonfinite: int = 3
    seed: int = 1
    # supervised warm-up on the records' reference answers before RL (the CPU demo); 0 = none
    sft_steps: int = 0
    sft_prompts_per_step: int = 32
    sft_lr: float = 0.0  # 0: optim.lr


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: <logging.run_dir>/checkpoints
    every: int = 50
    keep_last: int = 2
    resume: str = "auto"  # "auto" (latest valid), "none", or a checkpoint path


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "golong"
    progress: bool = True


@dataclass
class ProfileConfig:
    steps: list[int] = field(default_factory=list)  # cudaProfilerStart/Stop around these steps
    torch_trace: bool = False  # also write a torch.profiler trace for them
    nvtx: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


def _valid_keys(node_cls: Any) -> str:
    return ", ".join(f.name for f in dataclasses.fields(node_cls))


def _lookup_section(full_key: str) -> Any:
    """The dataclass that owns `full_key`'s parent, for listing valid keys."""
    cls: Any = RunConfig
    for part in full_key.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return cls
        sub = fields[part].default_factory if fields[part].default_factory is not dataclasses.MISSING else None
        if sub is None or not dataclasses.is_dataclass(sub):
            typ = {"scratch": ScratchModelConfig}.get(part)
            if typ is None:
                return cls
            sub = typ
        cls = sub
    return cls


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0].strip()
    name = type(err).__name__
    if name == "ConfigKeyError" or "not in struct" in msg or "Key '" in msg and "not in" in msg:
        section = _lookup_section(key)
        return f"unknown config key '{key}'; valid keys here: {_valid_keys(section)}"
    value = getattr(err, "value", None)
    expected = getattr(err, "object_type_str", None)
    if "Value '" in msg and ("could not be converted" in msg or "is not a" in msg):
        return f"bad value for '{key}': {msg}"
    if value is not None and expected:
        return f"bad value {value!r} for '{key}' (expected {expected})"
    return f"config error at '{key}': {msg}"


def _check_choices(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        val = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if "choices" in f.metadata and val not in f.metadata["choices"]:
            raise ConfigError(f"{key}={val!r} is not a valid choice; choose one of: {', '.join(f.metadata['choices'])}")
        if dataclasses.is_dataclass(val):
            _check_choices(val, prefix=f"{key}.")


def _check_values(cfg: RunConfig) -> None:
    checks = [
        (cfg.rollout.n >= 1, "rollout.n must be >= 1"),
        (cfg.parallel.cp >= 1, "parallel.cp must be >= 1"),
        (cfg.trainer.prompts_per_step >= 1, "trainer.prompts_per_step must be >= 1"),
        (cfg.trainer.mini_batch_prompts >= 1, "trainer.mini_batch_prompts must be >= 1"),
        (cfg.trainer.micro_batch_tokens >= 1, "trainer.micro_batch_tokens must be >= 1"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (0 < cfg.algo.rollout_is_lower <= 1 <= cfg.algo.rollout_is_upper,
         "algo.rollout_is_lower must be in (0, 1] and algo.rollout_is_upper >= 1"),
        (0.0 <= cfg.algo.alpha <= 1.0, "algo.alpha must be in [0, 1]"),
        (cfg.model.path is not None or cfg.model.scratch is not None,
         "model.path (a Hugging Face checkpoint) or model.scratch (random init) must be set"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults <- YAML file <- `key=value` overrides, validated. Raises ConfigError."""
    base = OmegaConf.structured(RunConfig)
    layers = []
    try:
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}")
            layers.append(OmegaConf.load(p))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(base, *layers)
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    except Exception as e:  # YAML syntax errors and the like
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    _check_choices(cfg)
    _check_values(cfg)
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


__all__ = ["ADV_ESTIMATORS", "ConfigError", "RunConfig", "load_config", "to_yaml", "to_dict", "MISSING"]
