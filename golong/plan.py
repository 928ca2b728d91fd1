"""`golong plan`: will this config fit, and how long can one step take at best — before launching.

    golong plan configs/qwen3-30b-a3b-grpo.yaml parallel.cp=8 --gpus 16 --gpu-mem 141

Model shapes come from the checkpoint's config.json when `model.path` exists, else from
`model.scratch`, else from a built-in table of Qwen3 models matched on the checkpoint directory
name (so a config can be planned before the weights are downloaded).

Memory: one optimizer step of the policy update is replayed at tensor granularity (`_Timeline`):
every buffer the implementation allocates — sharded master parameters, AdamW states and gradients
under FSDP2, the all-gathered compute copy of each block and its unsharded gradients, the
activations autograd saves (or only block inputs under activation checkpointing, plus one block
recomputed in backward), the fused logprob head's workspace, the attention and MLP temporaries —
is added and freed in program order, and the per-GPU peak is the maximum of the running sum.
The saved-activation inventories below are read off golong's code paths (CPU: the plain torch
paths in fp32; GPU: Liger RMSNorm/RoPE/SwiGLU and the Triton kernels), so the CPU prediction can be
checked against a measured training step (tests/golong/test_plan.py: within 15%). On GPU the
prediction is allocated bytes (torch.cuda.max_memory_allocated); a fixed runtime overhead (CUDA
context, NCCL, cuBLAS workspaces) is added before the fit check, allocator fragmentation is not.

The rollout engine (vLLM, colocated) sleeps during the update and owns
`rollout.gpu_memory_utilization` of the GPU while generating; a config fits when both phases do:
  update:  update peak + runtime overhead                                   <= GPU memory
  rollout: what the trainer keeps resident (sharded params, AdamW states, a KL term's reference policy)
           + vLLM reservation + runtime overhead                             <= GPU memory

FLOPs of one policy update over T tokens (documents of length S, causal):
  model FLOPs  = 6 * N_active * T  +  6 * L * n_q * d_head * sum_docs(S^2)
      N_active = matmul parameters a token meets (attention, dense MLP or router + top-k experts,
      LM head); the second term is causal attention, i.e. 12 * L * H_attn * S^2 / 2 per document.
  hardware FLOPs add what the implementation recomputes: the forward again under activation
  checkpointing (2 * N_layers * T + attention forward), the LM head logits in the fused backward
  (2 * V * H * T), and a forward for the old log-probs when the update is off-policy.
Rollout: prefill 2 * N_active * prompt tokens + causal attention, once per prompt (its n
responses share it); decode is bandwidth-bound: every step reads the weights once per engine and
every sequence's KV cache. All at the configured maximum lengths (prompt + response, capped by
trainer.micro_batch_tokens: where the two exceed it, a note says so, since the trainer runs a longer sequence as a
micro-batch of its own): the figures bound the worst step, not the average one.
Lower-bound time = max(FLOPs / (GPUs * 790 TFLOP/s), bytes / (GPUs * 4.3 TB/s)) per phase
(measured bf16 dense matmul and HBM bandwidth of one H200); communication is not in it.
FSDP2 traffic is shown beside it: per micro-batch each GPU receives (F-1)/F of every gathered parameter
in forward and again in backward (compute dtype) and as much of the gradients in the reduce-scatter
(reduce dtype), F = all GPUs; timed at an ASSUMED bus bandwidth (NVLink within one 8-GPU node, one
400 Gb/s NIC per GPU across nodes), with what exceeds the update's compute bound under perfect overlap:
a guide to trainer.micro_batch_tokens (fewer, larger micro-batches gather the weights fewer times).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from golong.config import ConfigError, RunConfig, runs_sdpa

GIB = 1024**3
H200_BF16_FLOPS = 790e12  # measured dense bf16 matmul throughput of one H200 (FLOP/s)
H200_HBM_BYTES_PER_S = 4.3e12  # measured HBM bandwidth of one H200 (bytes/s)
CUDA_RUNTIME_OVERHEAD = 2 * GIB  # CUDA context + NCCL buffers + cuBLAS/Triton workspaces, per GPU
VLLM_SLEEP_RESIDUE = 1 * GIB  # what a sleeping colocated vLLM engine still holds (CUDA graphs, context)
# ASSUMED (not measured here) collective bus bandwidths per GPU: NCCL within an NVLink node of 8 H100 / H200, and
# across nodes one 400 Gb/s NIC per GPU at ~90%
GPUS_PER_NODE = 8
NVLINK_BUS_BYTES_PER_S = 360e9
NIC_BUS_BYTES_PER_S = 45e9

# ------------------------------------------------------------------------------------------------
# Model shapes
# ------------------------------------------------------------------------------------------------

# Hugging Face config.json fields of released Qwen3 checkpoints (vocabulary 151,936; head_dim 128).
_QWEN3_COMMON = {"vocab_size": 151936, "head_dim": 128, "rope_theta": 1_000_000, "max_position_embeddings": 40960}
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": {"model_type": "qwen3", "hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "intermediate_size": 3072, "tie_word_embeddings": True},
    "qwen3-1.7b": {"model_type": "qwen3", "hidden_size": 2048, "num_hidden_layers": 28, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "intermediate_size": 6144, "tie_word_embeddings": True},
    "qwen3-4b": {"model_type": "qwen3", "hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "intermediate_size": 9728, "tie_word_embeddings": True},
    "qwen3-8b": {"model_type": "qwen3", "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "intermediate_size": 12288, "tie_word_embeddings": False},
    "qwen3-14b": {"model_type": "qwen3", "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
                  "num_key_value_heads": 8, "intermediate_size": 17408, "tie_word_embeddings": False},
    "qwen3-32b": {"model_type": "qwen3", "hidden_size": 5120, "num_hidden_layers": 64, "num_attention_heads": 64,
                  "num_key_value_heads": 8, "intermediate_size": 25600, "tie_word_embeddings": False},
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "intermediate_size": 6144,
                      "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                      "norm_topk_prob": True, "tie_word_embeddings": False},
    "qwen3-235b-a22b": {"model_type": "qwen3_moe", "hidden_size": 4096, "num_hidden_layers": 94,
                        "num_attention_heads": 64, "num_key_value_heads": 4, "intermediate_size": 12288,
                        "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 1536,
                        "norm_topk_prob": True, "tie_word_embeddings": False},
}
for _d in KNOWN_MODELS.values():
    for _k, _v in _QWEN3_COMMON.items():
        _d.setdefault(_k, _v)


@dataclass(frozen=True)
class ModelShape:
    """The dimensions the planner needs; `source` says where they came from."""

    name: str
    source: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # dense MLP width (dense layers of an MoE model use it too)
    experts: int = 0
    top_k: int = 0
    moe_intermediate: int = 0
    moe_layers: int = 0  # how many of the layers are sparse
    tied: bool = False

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    # parameter tensors (shapes), grouped as FSDP groups them: one group per block, one at the root
    def attention_tensors(self) -> list[tuple[int, ...]]:
        h, d = self.hidden, self.head_dim
        return [(self.heads * d, h), (self.kv_heads * d, h), (self.kv_heads * d, h), (h, self.heads * d),
                (d,), (d,), (h,), (h,)]  # q, k, v, o, q_norm, k_norm, input/post-attention norms

    def mlp_tensors(self, sparse: bool) -> list[tuple[int, ...]]:
        h = self.hidden
        if sparse:
            e, i = self.experts, self.moe_intermediate
            return [(e, h), (e, 2 * i, h), (e, h, i)]  # router, fused gate_up, down
        return [(self.intermediate, h), (self.intermediate, h), (h, self.intermediate)]

    def layer_tensors(self, sparse: bool) -> list[tuple[int, ...]]:
        return self.attention_tensors() + self.mlp_tensors(sparse)

    def root_tensors(self) -> list[tuple[int, ...]]:
        out = [(self.vocab, self.hidden), (self.hidden,)]  # embeddings (= LM head when tied), final norm
        return out if self.tied else out + [(self.vocab, self.hidden)]

    def layer_kinds(self) -> list[bool]:
        """sparse? for each layer, in order (sparse layers last when the counts are all we know)."""
        return [False] * (self.layers - self.moe_layers) + [True] * self.moe_layers

    @property
    def total_params(self) -> int:
        n = sum(math.prod(s) for s in self.root_tensors())
        return n + sum(sum(math.prod(s) for s in self.layer_tensors(sp)) for sp in self.layer_kinds())

    @property
    def layer_matmul_params_active(self) -> int:
        """Matmul parameters one token meets in all decoder layers (top-k experts only)."""
        h, d = self.hidden, self.head_dim
        attn = 2 * self.heads * d * h + 2 * self.kv_heads * d * h
        dense = 3 * h * self.intermediate
        sparse = self.experts * h + self.top_k * 3 * h * self.moe_intermediate
        return self.layers * attn + (self.layers - self.moe_layers) * dense + self.moe_layers * sparse

    @property
    def active_params(self) -> int:
        """N_active of the FLOP formula: decoder matmuls (top-k experts) + the LM head."""
        return self.layer_matmul_params_active + self.vocab * self.hidden

    @property
    def kv_bytes_per_token(self) -> int:
        """bf16 K and V of one token over all layers (the rollout engine's KV cache)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


def _shape_from_hf(raw: dict[str, Any], name: str, source: str) -> ModelShape:
    from golong.models.config import ModelConfig

    try:
        c = ModelConfig.from_hf(raw)  # validates: a config the model cannot run fails here too
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    moe_layers = sum(c.layer_is_moe(i) for i in range(c.num_hidden_layers))
    return ModelShape(
        name=name, source=source, vocab=c.vocab_size, hidden=c.hidden_size, layers=c.num_hidden_layers,
        heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
        intermediate=c.intermediate_size, experts=c.num_experts, top_k=c.num_experts_per_tok,
        moe_intermediate=c.moe_intermediate_size, moe_layers=moe_layers, tied=c.tie_word_embeddings)


def scratch_to_hf(s: Any) -> dict[str, Any]:
    """HF config dict of a `model.scratch` (golong.config.ScratchModelConfig)."""
    d = {"model_type": "qwen3_moe" if s.num_experts else "qwen3", "vocab_size": s.vocab_size,
         "hidden_size": s.hidden_size, "num_hidden_layers": s.num_hidden_layers,
         "num_attention_heads": s.num_attention_heads, "num_key_value_heads": s.num_key_value_heads,
         "head_dim": s.head_dim, "intermediate_size": s.intermediate_size,
         "max_position_embeddings": s.max_position_embeddings, "rope_theta": s.rope_theta,
         "rms_norm_eps": s.rms_norm_eps, "tie_word_embeddings": s.tie_word_embeddings}
    if s.num_experts:
        d.update(num_experts=s.num_experts, num_experts_per_tok=s.num_experts_per_tok,
                 moe_intermediate_size=s.moe_intermediate_size, norm_topk_prob=s.norm_topk_prob)
    return d


def _match_known(path: str) -> str | None:
    name = Path(path.rstrip("/")).name.lower().replace("_", "-")
    hits = [k for k in KNOWN_MODELS if name == k or name.startswith(k + "-")]
    return max(hits, key=len) if hits else None


def model_shape(model_cfg: Any) -> ModelShape:
    """Shapes of `cfg.model`: checkpoint config.json > model.scratch > built-in table by name."""
    path = model_cfg.path
    if path and (Path(path) / "config.json").is_file():
        try:
            raw = json.loads((Path(path) / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}/config.json: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})"
                              ) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}/config.json: a model config is a JSON object, this file holds a "
                              f"{type(raw).__name__}")
        return _shape_from_hf(raw, Path(path).name, f"{path}/config.json")
    if model_cfg.scratch is not None:
        return _shape_from_hf(scratch_to_hf(model_cfg.scratch), "scratch", "model.scratch")
    if path:
        key = _match_known(path)
        if key is not None:
            return _shape_from_hf(dict(KNOWN_MODELS[key]), Path(path).name, f"built-in table ({key})")
        raise ConfigError(f"model.path={path!r} has no config.json and its name matches none of the known models "
                         f"({', '.join(KNOWN_MODELS)}); set model.scratch or download the checkpoint")
    raise ConfigError("model.path or model.scratch must be set")


# ------------------------------------------------------------------------------------------------
# What runs where
# ------------------------------------------------------------------------------------------------

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of tensor, as golong.parallel sets them up."""

    device: str  # "cuda" (Liger + Triton kernels) or "cpu" (plain torch paths)
    master: int  # sharded parameters, their gradients and the AdamW states (built in fp32)
    compute: int  # gathered parameters and activations (FSDP MixedPrecisionPolicy.param_dtype)
    reduce: int  # unsharded gradients before the reduce-scatter

    @staticmethod
    def of(cfg: RunConfig, device: str) -> Precision:
        if device == "cpu":  # golong.parallel.mixed_precision_policy: everything fp32 on CPU
            return Precision("cpu", 4, 4, 4)
        return Precision("cuda", 4, _BYTES[cfg.parallel.param_dtype], _BYTES[cfg.parallel.reduce_dtype])


def _lp_block_cols(n: int, k: dict[str, int]) -> int:
    """Vocabulary rows per logits block of the GEMM layouts for n live tokens (kernels.logprob.block_cols)."""
    try:
        from kernels.logprob import block_cols
    except ImportError:
        return k["lp_gemm_cols"]
    return block_cols(n, k["lp_gemm_rows"], k["lp_gemm_cols"], k["lp_gemm_cols_max"])


def _kernel_constants() -> dict[str, int]:
    """Tile sizes of the kernels' workspaces, read from kernels/ so the plan follows the code."""
    # import_module: the package exports functions under the submodules' names (kernels.flash_attention), so
    # `import kernels.flash_attention as fa` binds the function, not the module
    lp = importlib.import_module("kernels.logprob")
    fa = importlib.import_module("kernels.flash_attention")
    return {"lp_token_chunk": lp.TOKEN_CHUNK, "lp_vocab_chunk": lp.VOCAB_CHUNK, "lp_gemm_rows": lp.GEMM_ROWS,
            "lp_gemm_cols": lp.GEMM_COLS, "lp_gemm_cols_max": lp.GEMM_COLS_MAX, "lp_dh_group": lp.DH_GROUP,
            "attn_block_m": fa.TORCH_BLOCK_M, "attn_block_n": fa.TORCH_BLOCK_N}


# ------------------------------------------------------------------------------------------------
# Memory: replay of one update step
# ------------------------------------------------------------------------------------------------

# Component labels of the breakdown table (live bytes at the peak, per GPU).
PARAMS = "parameters, sharded master copy"
GRADS = "gradients, sharded"
OPTIM = "AdamW states (m, v)"
REFERENCE = "reference policy (algo.kl_coef), sharded compute copy"
GATHERED = "parameters, all-gathered compute copy"
UNSHARDED_GRADS = "gradients, unsharded (before reduce-scatter)"
ACTS = "activations saved for backward"
ACT_GRADS = "activation gradients in flight"
HEAD_WS = "fused logprob head workspace"
ATTN_WS = "attention workspace"
TEMPS = "other temporaries"
INPUTS = "micro-batch inputs, RoPE tables"


class _Timeline:
    """Running sum of live bytes per component; remembers the largest total and its breakdown."""

    def __init__(self) -> None:
        self.live: dict[str, float] = {}
        self.peak = 0.0
        self.peak_phase = ""
        self.at_peak: dict[str, float] = {}
        self.phase = ""

    def add(self, label: str, nbytes: float) -> None:
        self.live[label] = self.live.get(label, 0.0) + nbytes
        total = sum(self.live.values())
        if total > self.peak:
            self.peak, self.peak_phase, self.at_peak = total, self.phase, dict(self.live)

    def free(self, label: str, nbytes: float) -> None:
        self.live[label] = self.live.get(label, 0.0) - nbytes

    def transient(self, label: str, nbytes: float) -> None:
        self.add(label, nbytes)
        self.free(label, nbytes)


@dataclass
class _Layer:
    """Per-token byte counts of one decoder layer on one backend (see _layer_profile)."""

    saved: float  # everything autograd keeps for this layer's backward, its input included
    saved_mlp: float  # the part saved by the MLP / MoE block (freed first in backward)
    fwd_temp: float  # largest short-lived forward temporary on top of the saved tensors
    bwd_mlp_temp: float  # MLP backward: activation gradients live at once
    bwd_attn_temp: float  # attention backward: dq/dk/dv buffers + qkv gradients
    attn_tiles_fwd: float  # attention score tiles (bytes, not per token) live at once in forward
    attn_tiles_bwd: float


def _layer_profile(s: ModelShape, p: Precision, sparse: bool, cp: int, tokens: int, doc_len: int,
                   k: dict[str, int]) -> _Layer:
    """Bytes per token that one layer's forward saves, and its temporaries, read off golong's code.

    Saved for backward, per token (a = activation bytes; rsqrt/rstd, lse and router state fp32):
      CPU (plain torch, fp32)                      GPU (Liger RMSNorm/RoPE/SwiGLU, Triton)
      layer input x, norm x*rsqrt, norm out  3H    layer input x, norm out          2H
      q, k projections + q/k-norm x*rsqrt          q, k projections                 nq D + nkv D
                             2 nq D + 2 nkv D
      rotated q, k; v; attention out               rotated q, k (in place); v; out
                             2 nq D + 2 nkv D                                        2 nq D + 2 nkv D
      residual, norm x*rsqrt, norm out       3H    residual, norm out               2H
      dense MLP: gate, up, silu, product     4I    gate, up, product                3I
      fp32: rsqrt/rstd 2 + nq + nkv, lse nq; int32 doc/pos of flash_attention (not in the ring)
      MoE block instead of the dense MLP: router probs E and top-k weights k + 1 (fp32), expert ids
      and inverse permutation 2k (int64), combine weights k, permuted input kH, gate_up 2k I_e,
      SwiGLU saves k I_e (CPU: silu and product 2k I_e), expert outputs in token order kH.
    """
    h, nq, nkv, d, a = s.hidden, s.heads, s.kv_heads, s.head_dim, p.compute
    cpu = p.device == "cpu"
    attn = a * ((3 * h + 4 * nq * d + 4 * nkv * d) if cpu else (2 * h + 3 * nq * d + 3 * nkv * d))
    attn += 4 * (1 + nq + nkv + nq) + (0 if cp > 1 else 8)
    mlp = a * (3 * h if cpu else 2 * h) + 4
    if sparse:
        kk, ie = s.top_k, s.moe_intermediate
        mlp += 4 * (s.experts + kk + 1) + 16 * kk + a * (kk + 2 * kk * h + (4 if cpu else 3) * kk * ie)
    else:
        mlp += a * (4 if cpu else 3) * s.intermediate
    # forward temporaries: RoPE's products and rotate_half (CPU); router logits and the expert
    # outputs before the combine (MoE); the ring's K/V send/receive buffers and partial outputs
    fwd_temp = a * 3 * nq * d if cpu else a * h
    if sparse:
        fwd_temp = max(fwd_temp, a * (s.top_k * h + s.experts))
    # backward: activation gradients live at once on top of the saved tensors — dense: d(product),
    # then d(silu) and d(up) once the product is freed (Liger computes them in place: one [T, I]);
    # MoE: d(expert outputs) in token and in expert order, then d(gate_up) as the SwiGLU is undone
    if sparse:
        bwd_mlp = a * (2 * s.top_k * h + 2 * s.top_k * s.moe_intermediate)
    else:
        bwd_mlp = a * s.intermediate * (2 if cpu else 1)
    bwd_attn = 4 * (nq + 2 * nkv) * d + a * (nq * d + h)
    if cp > 1:
        fwd_temp = max(fwd_temp, a * 4 * nkv * d + 4 * 2 * nq * d)
        bwd_attn += a * 4 * nkv * d + 4 * 3 * 2 * nkv * d
    tiles_fwd = tiles_bwd = 0.0
    if cpu:
        # the torch backend walks query blocks x visible key blocks with an online softmax: score
        # tiles [Hq, block_m, block_n] fp32, 3 live at once in forward and 5 in backward
        tile = 4 * nq * min(k["attn_block_m"], tokens) * min(k["attn_block_n"], doc_len)
        tiles_fwd, tiles_bwd = 3 * tile, 5 * tile
    return _Layer(saved=attn + mlp, saved_mlp=mlp, fwd_temp=fwd_temp, bwd_mlp_temp=bwd_mlp, bwd_attn_temp=bwd_attn,
                  attn_tiles_fwd=tiles_fwd, attn_tiles_bwd=tiles_bwd)


def _shard_bytes(tensors: list[tuple[int, ...]], world: int, nbytes: int) -> int:
    """FSDP2 keeps ceil(dim0 / world) rows of every parameter on each rank (dim 0 is padded)."""
    return sum(-(-t[0] // world) * math.prod(t[1:]) * nbytes for t in tensors)


def _full_bytes(tensors: list[tuple[int, ...]], nbytes: int) -> int:
    return sum(math.prod(t) * nbytes for t in tensors)


@dataclass
class MemoryPlan:
    peak_bytes: float  # update-step peak, allocated bytes per GPU
    peak_phase: str
    breakdown: dict[str, float]  # component -> live bytes at the peak
    resident_bytes: float  # what the trainer keeps between steps (params + AdamW states + any reference policy)
    tokens_per_gpu: int


def simulate_update(s: ModelShape, p: Precision, *, tokens: int, fsdp: int, cp: int, checkpointing: bool,
                    cpu_offload: bool = False, micro_batches: int = 1, num_docs: int = 1,
                    optimizer: str | None = None, reference: bool = False, keep_attention: bool = False,
                    holds_qkv: bool = False) -> MemoryPlan:
    """Replay one micro-batch of `tokens` tokens per GPU (the last of `micro_batches`) and the
    optimizer step; return the per-GPU peak of allocated bytes and its breakdown.

    FSDP2 as golong.parallel.apply_fsdp sets it up: one unit per decoder layer (resharded after
    forward except the last; the next one prefetched in backward), the root unit (embeddings, final
    norm, LM head) resharded after forward and gathered again for backward. optimizer (optim.impl):
    "for-loop" (AdamW(foreach=False): two temporaries the size of the largest parameter shard),
    "foreach" (one temporary the size of all states) or "fused" (none). reference: a frozen copy of the
    weights in the compute dtype for the KL term (its forward-only pass runs before the update and peaks lower).
    keep_attention (parallel.ac_keep_attention): checkpointing keeps each layer's attention output and LSE too,
    and its recompute runs no attention; holds_qkv: and q, k, v (SDPA's per-document views of them).
    """
    k = _kernel_constants()
    optimizer = optimizer or "for-loop"
    tl = _Timeline()
    T, H, V, a = tokens, s.hidden, s.vocab, p.compute
    X = T * H * a  # one [T, H] activation
    kinds = s.layer_kinds()
    root_t = s.root_tensors()
    layer_t = [s.layer_tensors(sp) for sp in kinds]
    on_gpu = 0 if cpu_offload else 1  # CPUOffloadPolicy keeps shards, grads and AdamW states in host memory

    # ---- resident state at the start of the step
    tl.phase = "step start"
    shard_root = _shard_bytes(root_t, fsdp, p.master)
    shard_layers = [_shard_bytes(t, fsdp, p.master) for t in layer_t]
    shard_all = shard_root + sum(shard_layers)
    tl.add(PARAMS, on_gpu * shard_all)
    tl.add(OPTIM, on_gpu * 2 * shard_all)
    if reference:
        tl.add(REFERENCE, on_gpu * (_shard_bytes(root_t, fsdp, p.compute)
                                    + sum(_shard_bytes(t, fsdp, p.compute) for t in layer_t)))
    resident = tl.peak
    first = micro_batches == 1  # later micro-batches find the sharded gradients already allocated
    if not first:
        tl.add(GRADS, on_gpu * shard_all)

    # FSDP2 collectives (torch/distributed/fsdp/_fully_shard): an all-gather writes into a flat
    # buffer of world x padded shard, then copies out into the unsharded parameters; in forward the
    # flat buffer stays referenced until the next all-gather (all_gather_state), in backward it is
    # freed after the copy-out, and a backward prefetch holds it from the previous layer's
    # pre-backward until this one's. A reduce-scatter copies the unsharded gradients (cast to the
    # reduce dtype) into a flat input that stays referenced until the next reduce-scatter or the end
    # of backward (reduce_scatter_states). One rank copies the shards directly, without the flat
    # buffer. gloo adds a copy of each flat buffer inside the collective.
    lingering = {"ag": 0.0, "rs": 0.0}
    gloo_copy = p.device == "cpu" and fsdp > 1

    def release(kind: str) -> None:
        tl.free(GATHERED if kind == "ag" else UNSHARDED_GRADS, lingering[kind])
        lingering[kind] = 0.0

    def all_gather(shard: int) -> float:
        """Issue the collective; returns its flat output (0 on one rank)."""
        if cpu_offload:
            tl.transient(TEMPS, shard // p.master * a)  # host-to-device copy of the shards
        if fsdp == 1:
            return 0.0
        flat = shard // p.master * a * fsdp
        tl.add(GATHERED, flat)
        if gloo_copy:
            tl.transient(TEMPS, flat)
        return flat

    def copy_out(tensors: list[tuple[int, ...]], flat: float, forward: bool) -> int:
        full = _full_bytes(tensors, a)
        if forward:
            release("ag")
        tl.add(GATHERED, full)
        if forward:
            lingering["ag"] = flat
        else:
            tl.free(GATHERED, flat)
        return full

    def gather(tensors: list[tuple[int, ...]], shard: int, forward: bool) -> int:
        return copy_out(tensors, all_gather(shard), forward)

    def reduce_scatter(shard: int, ugrad: int) -> None:
        flat = shard // p.master * p.reduce * fsdp
        release("rs")
        tl.add(UNSHARDED_GRADS, flat)
        tl.free(UNSHARDED_GRADS, ugrad)
        if gloo_copy:
            tl.add(TEMPS, flat)
        out = on_gpu * shard
        if first:
            tl.add(GRADS, out)  # the reduce-scatter output becomes the sharded gradient
        else:
            tl.transient(TEMPS, shard // p.master * p.reduce)  # then accumulated into it
        if gloo_copy:
            tl.free(TEMPS, flat)
        if fsdp > 1:
            lingering["rs"] = flat
        else:
            tl.free(UNSHARDED_GRADS, flat)

    # ---- forward
    tl.phase = "forward"
    # the trainer's packed micro-batch (ids, targets, seq index int64; mask, advantages, rollout
    # logprobs fp32) for the whole cp group, this rank's shards of what the model reads, positions,
    # cos/sin tables
    inputs = T * cp * (3 * 8 + 3 * 4) + (T * (8 + 8 + 4 + 4) if cp > 1 else 0) + T * 8 + 2 * T * s.head_dim * a
    tl.add(INPUTS, inputs)
    root_full = gather(root_t, shard_root, forward=True)
    tl.add(ACTS, X)  # embedding output = layer 0's input
    doc_len = max(1, -(-T // max(num_docs, 1)))
    profiles = [_layer_profile(s, p, sp, cp, T, doc_len, k) for sp in kinds]
    # what checkpointing keeps of a layer beside its input where it keeps the attention: output, LSE (fp32) and
    # flash_attention's int32 document / position rows (not the ring's)
    qkv_row = a * (s.heads + 2 * s.kv_heads) * s.head_dim
    kept = (s.heads * s.head_dim * a + 4 * s.heads + (0 if cp > 1 else 8) + (qkv_row if holds_qkv else 0)) * T \
        if checkpointing and keep_attention else 0
    layer_full = [_full_bytes(t, a) for t in layer_t]
    last = len(profiles) - 1
    for i, lp in enumerate(profiles):
        tl.phase = f"forward, layer {i}"
        gather(layer_t[i], shard_layers[i], forward=True)
        inner = lp.saved * T - X  # everything the layer saves except its input
        tl.add(ACTS, inner)
        tl.transient(TEMPS, lp.fwd_temp * T)
        tl.transient(ATTN_WS, lp.attn_tiles_fwd)
        tl.add(ACTS, X)  # the layer's output
        if checkpointing:
            tl.free(ACTS, inner - kept)  # only the layer's input (and the kept attention) stays, as its checkpoint
        if i < last:
            tl.free(GATHERED, layer_full[i])
    tl.phase = "LM head forward"
    norm_saved = X * (2 if p.device == "cpu" else 1) + 4 * T  # final norm internals (input counted above)
    head_saved = 3 * 4 * T  # logprob, entropy, lse (fp32)
    tl.add(ACTS, norm_saved + head_saved)
    tl.transient(HEAD_WS, _head_workspace(p, T, V, H, k, backward=False))
    # root post-forward: the root unit reshards, and the last all-gather buffer is released
    tl.free(GATHERED, root_full)
    release("ag")

    # ---- backward: head, final norm, then layers last to first
    tl.phase = "LM head backward"
    gather(root_t, shard_root, forward=False)  # root pre-backward
    tl.add(UNSHARDED_GRADS, V * H * a)  # LM head (or tied embedding) gradient
    tl.add(ACT_GRADS, X)  # dh
    tl.transient(HEAD_WS, _head_workspace(p, T, V, H, k, backward=True))
    tl.free(ACTS, head_saved)
    tl.add(UNSHARDED_GRADS, H * a)  # final norm weight
    tl.add(ACT_GRADS, X)  # dx of the norm, then dh is dropped
    tl.free(ACT_GRADS, X)
    tl.free(ACTS, norm_saved + X)  # the norm's input (last layer's output) is no longer needed
    prefetched = 0.0
    for i in reversed(range(len(profiles))):
        lp = profiles[i]
        tl.phase = f"backward, layer {i}"
        if i < last:  # this layer's parameters: copied out of the flat buffer prefetched earlier
            copy_out(layer_t[i], prefetched, forward=False)
        prefetched = all_gather(shard_layers[i - 1]) if i > 0 else 0.0  # prefetch the next layer
        inner = lp.saved * T - X
        if kept:  # the part after the attention first (its backward frees it), the part before it below
            tl.add(ACTS, lp.saved_mlp * T)
            tl.transient(TEMPS, lp.fwd_temp * T)
        elif checkpointing:  # recompute the layer's forward from its stored input
            tl.add(ACTS, inner)
            tl.transient(TEMPS, lp.fwd_temp * T)
            tl.transient(ATTN_WS, lp.attn_tiles_fwd)
        mlp_w = _full_bytes(s.mlp_tensors(kinds[i]), a)
        tl.transient(ACT_GRADS, lp.bwd_mlp_temp * T)
        tl.add(UNSHARDED_GRADS, mlp_w)
        tl.free(ACTS, lp.saved_mlp * T)
        qkv = qkv_row * T if kept and not holds_qkv else 0
        tl.add(ACTS, qkv)  # keep_attention: q, k, v recomputed for the attention's backward alone
        tl.add(ACT_GRADS, lp.bwd_attn_temp * T)
        tl.transient(ATTN_WS, lp.attn_tiles_bwd)
        if kept:  # then the recompute of the projections (norm, q/k-norm, RoPE) that their gradients run through
            tl.free(ACTS, qkv)
            tl.add(ACTS, inner - lp.saved_mlp * T - kept)
        tl.add(UNSHARDED_GRADS, layer_full[i] - mlp_w)
        tl.free(ACT_GRADS, lp.bwd_attn_temp * T)
        tl.free(ACTS, inner - lp.saved_mlp * T + X)  # attention internals and the layer's input
        reduce_scatter(shard_layers[i], layer_full[i])
        tl.free(GATHERED, layer_full[i])
    # embeddings: their gradient (tied: a fresh [V, H] accumulated into the head's), then the root
    # reshards its parameters and reduce-scatters its gradients
    tl.phase = "backward, embeddings"
    if s.tied:
        tl.transient(UNSHARDED_GRADS, V * H * a)
    else:
        tl.add(UNSHARDED_GRADS, V * H * a)
    tl.free(GATHERED, root_full)
    reduce_scatter(shard_root, _full_bytes(root_t, a))
    release("rs")  # end of backward: the retained reduce-scatter input is released
    tl.free(ACT_GRADS, X)
    tl.free(INPUTS, inputs)

    # ---- optimizer step (after the last micro-batch)
    tl.phase = "optimizer step"
    if on_gpu and optimizer == "foreach":
        tl.transient(TEMPS, shard_all)  # sqrt(v) of every parameter at once
    elif on_gpu and optimizer == "for-loop":
        largest = max(_shard_bytes([t], fsdp, p.master) for ts in [root_t, *layer_t] for t in ts)
        tl.transient(TEMPS, 2 * largest)  # sqrt(v) and sqrt(v) / bias correction of one parameter
    breakdown = {kk: v for kk, v in tl.at_peak.items() if v > 0}
    return MemoryPlan(peak_bytes=tl.peak, peak_phase=tl.peak_phase, breakdown=breakdown, resident_bytes=resident,
                      tokens_per_gpu=T)


def _head_workspace(p: Precision, n: int, v: int, h: int, k: dict[str, int], backward: bool) -> float:
    """Extra bytes of kernels.linear_logprob_entropy beyond its inputs, outputs and the weight
    gradient: bounded by the token chunk, not by n (the point of the fused head).

    torch backend (CPU), per token chunk tc x vocabulary chunk vc: forward keeps the logits tile
    and its exp (2 fp32 tiles) and the scaled fp32 hidden chunk; backward the log p and p tiles,
    the scaled hidden chunk and the chunk's dh accumulator (and an fp32 dW when the weight is 16-bit).
    Triton backend (GPU, GEMM layouts): per block of r = min(n, GEMM_ROWS) tokens x c vocabulary rows
    (GEMM_COLS, widened by kernels.logprob.block_cols when n < GEMM_ROWS), an fp32 logits block and the
    gathered token rows; forward adds 4 fp32 row statistics per token, backward a 16-bit dz block (DH_GROUP of
    them side by side when the backward is one pass, n <= GEMM_ROWS), an fp32 dh accumulator (r x h) and an fp32
    dW block (c x h).
    """
    if p.device == "cpu":
        tc, vc = min(n, k["lp_token_chunk"]), min(v, k["lp_vocab_chunk"])
        tile, chunk = 4 * tc * vc, 4 * tc * h
        if not backward:
            return 2 * tile + chunk
        dw = 4 * v * h if p.compute != 4 else 0  # fp32 weights: dW is the gradient itself
        return dw + 2 * tile + 2 * chunk + (chunk if p.compute != 4 else 0)
    r, c = min(n, k["lp_gemm_rows"]), min(v, _lp_block_cols(n, k))
    block = 4 * r * c + p.compute * r * h
    if not backward:
        return block + 16 * n
    dz_blocks = k["lp_dh_group"] if n <= k["lp_gemm_rows"] else 1
    return block + dz_blocks * p.compute * r * c + 4 * r * h + 4 * c * h


# ------------------------------------------------------------------------------------------------
# FLOPs and roofline
# ------------------------------------------------------------------------------------------------


@dataclass
class Throughput:
    tokens: int  # tokens trained per step (all GPUs)
    docs: int
    doc_len: int
    model_flops: float
    hardware_flops: float
    update_s: float  # roofline lower bound of the policy update
    update_bound: str  # "compute" or "memory"
    rollout_prefill_flops: float
    rollout_decode_bytes: float
    rollout_s: float
    micro_batches_per_gpu: int
    kv_seqs_per_engine: float  # sequences at full length whose KV cache fits in the vLLM reservation
    # prompts whose KV cache fits with all n responses': the prompt's blocks once (vLLM's prefix cache shares them
    # among the n requests of one prompt once its prefill is done), every response's own
    kv_prompts_per_engine: float
    fsdp_bytes: float  # FSDP2 all-gather + reduce-scatter bytes each GPU receives in one step
    fsdp_bus: float  # the assumed bus bandwidth (bytes/s): NVLINK_BUS_BYTES_PER_S in one node, else NIC_BUS_...
    fsdp_s: float  # fsdp_bytes at fsdp_bus
    update_compute_s: float  # the update's compute bound, which FSDP's prefetch can hide the traffic behind


def update_flops(s: ModelShape, seq_lens: list[int] | tuple[int, ...], *, checkpointing: bool,
                 old_logprob_pass: bool = False, ref_logprob_pass: bool = False, keep_attention: bool = False
                 ) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one forward+backward over sequences of these lengths.

    model = 6 N_active T + 6 L n_q d_head sum S^2 (causal attention: 12 L H_attn S^2 / 2 per
    sequence); hardware adds the LM-head logits the fused backward recomputes (2 V H T), the
    forward again under activation checkpointing (keep_attention: without the attention, and the q, k, v
    projections twice: once more for the attention's backward), and a forward for old log-probs if off-policy
    and one for the reference policy's with a KL term.
    """
    tokens = sum(seq_lens)
    attn_fwd = 2 * s.layers * s.heads * s.head_dim * sum(n * n for n in seq_lens)
    model = 6 * s.active_params * tokens + 3 * attn_fwd
    layer_fwd = 2 * s.layer_matmul_params_active * tokens + attn_fwd
    hw = model + 2 * s.vocab * s.hidden * tokens
    if checkpointing and keep_attention:
        hw += layer_fwd - attn_fwd + 2 * s.layers * s.hidden * (s.heads + 2 * s.kv_heads) * s.head_dim * tokens
    elif checkpointing:
        hw += layer_fwd
    hw += (int(old_logprob_pass) + int(ref_logprob_pass)) * (layer_fwd + 2 * s.vocab * s.hidden * tokens)
    return model, hw


def throughput(cfg: RunConfig, s: ModelShape, gpus: int, gpu_mem_bytes: float, p: Precision) -> Throughput:
    tr, ro = cfg.trainer, cfg.rollout
    prompt = min(cfg.data.max_prompt_tokens, tr.micro_batch_tokens)
    doc_len = min(prompt + ro.max_response_tokens, tr.micro_batch_tokens)
    resp = doc_len - prompt
    docs = tr.prompts_per_step * ro.n
    tokens = docs * doc_len
    on_policy = cfg.algo.ppo_epochs == 1 and tr.mini_batch_prompts >= tr.prompts_per_step
    # as the trainer decides (Actor.update): off-policy only (on-policy the update's own logprobs are the old ones;
    # under context parallelism the IS weights all-gather them, no pass of their own)
    old_pass = not on_policy
    model, hw = update_flops(s, [doc_len] * docs, checkpointing=cfg.parallel.activation_checkpointing,
                             old_logprob_pass=old_pass, ref_logprob_pass=cfg.algo.kl_coef > 0,
                             keep_attention=cfg.parallel.ac_keep_attention)
    # memory traffic of the update: every micro-batch reads the gathered weights in forward, again in
    # backward (twice: input and weight gradients) and in the recompute; AdamW reads p, g, m, v and
    # writes p, m, v once per step (fp32)
    dp = max(1, gpus // max(cfg.parallel.cp, 1))
    micro = max(1, math.ceil(tokens / dp / tr.micro_batch_tokens))
    passes = 3 + (1 if cfg.parallel.activation_checkpointing else 0)
    update_bytes = micro * passes * s.total_params * p.compute * gpus + 7 * 4 * s.total_params
    t_compute = hw / (gpus * H200_BF16_FLOPS)
    t_memory = update_bytes / (gpus * H200_HBM_BYTES_PER_S)
    # rollout: prefill compute-bound, decode bandwidth-bound (weights per engine step + KV reads)
    tp = max(1, ro.tensor_parallel_size)
    engines = max(1, gpus // tp)
    # the rounds of trainer.gen_batch_prompts prompts that even a batch with no all-equal group takes to fill the
    # step (one when a round holds the step; dynamic sampling may need more), up to algo.max_num_gen_batches
    per_gen = (tr.gen_batch_prompts or tr.prompts_per_step) if cfg.algo.dynamic_sampling else tr.prompts_per_step
    rounds = min(math.ceil(tr.prompts_per_step / per_gen),
                 cfg.algo.max_num_gen_batches if cfg.algo.dynamic_sampling else 1)
    gen = rounds * per_gen
    # the n responses of a prompt share its prefill (the engine sends n requests of it; vLLM's prefix cache serves
    # the later ones the first one's KV)
    prefill = (2 * s.active_params * prompt + 2 * s.layers * s.heads * s.head_dim * prompt**2) * gen
    steps = resp
    decode_weight_bytes = engines * steps * s.total_params * 2
    kv_read = gen * ro.n * s.kv_bytes_per_token * (resp * prompt + resp**2 / 2)
    decode_bytes = decode_weight_bytes + kv_read
    rollout_s = max(prefill / (gpus * H200_BF16_FLOPS), 0.0) + decode_bytes / (gpus * H200_HBM_BYTES_PER_S)
    reserve = ro.gpu_memory_utilization * gpu_mem_bytes * tp - s.total_params * 2
    kv_seqs = max(0.0, reserve) / (s.kv_bytes_per_token * doc_len)
    kv_prompts = max(0.0, reserve) / (s.kv_bytes_per_token * (prompt + ro.n * resp))
    # FSDP2 over every GPU: a gather in forward and one in backward (blocks reshard after forward), a reduce-scatter
    fsdp_bytes = micro * (2 * p.compute + p.reduce) * s.total_params * (gpus - 1) / gpus
    bus = NVLINK_BUS_BYTES_PER_S if gpus <= GPUS_PER_NODE else NIC_BUS_BYTES_PER_S
    return Throughput(tokens=tokens, docs=docs, doc_len=doc_len, model_flops=model, hardware_flops=hw,
                      update_s=max(t_compute, t_memory), update_bound="compute" if t_compute >= t_memory else "memory",
                      rollout_prefill_flops=prefill, rollout_decode_bytes=decode_bytes, rollout_s=rollout_s,
                      micro_batches_per_gpu=micro, kv_seqs_per_engine=kv_seqs,
                      kv_prompts_per_engine=kv_prompts, fsdp_bytes=fsdp_bytes,
                      fsdp_bus=bus, fsdp_s=fsdp_bytes / bus, update_compute_s=t_compute)


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    shape: ModelShape
    gpus: int
    gpu_mem_bytes: float
    dp: int
    cp: int
    precision: Precision
    memory: MemoryPlan
    overhead_bytes: float
    rollout_reserve_bytes: float
    update_total_bytes: float
    rollout_total_bytes: float
    throughput: Throughput
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return max(self.update_total_bytes, self.rollout_total_bytes) <= self.gpu_mem_bytes


def predict(cfg: RunConfig, gpus: int, gpu_mem_gib: float = 141.0, *, device: str = "cuda",
            micro_batch_tokens: int | None = None, num_docs: int | None = None, micro_batches: int | None = None,
            optimizer: str | None = None) -> Plan:
    """Plan `cfg` on `gpus` GPUs of `gpu_mem_gib` GiB. device="cpu" models what runs on a CPU
    (torch paths, fp32 everywhere, no CUDA overhead, no vLLM); micro_batch_tokens overrides
    trainer.micro_batch_tokens (tokens per cp group), num_docs the documents in a micro-batch
    (attention tiles), micro_batches the micro-batches per optimizer step (default: from the
    batch size, as the trainer packs it)."""
    s = model_shape(cfg.model)
    cp = cfg.parallel.cp
    if gpus % cp:
        raise ConfigError(f"parallel.cp={cp} does not divide --gpus {gpus}")
    dp = cfg.parallel.dp_shard if cfg.parallel.dp_shard != -1 else gpus // cp
    if dp * cp != gpus:
        raise ConfigError(f"parallel.dp_shard={dp} x parallel.cp={cp} != --gpus {gpus}")
    rollout_tp = cfg.rollout.tensor_parallel_size
    if cfg.rollout.engine == "vllm" and gpus % rollout_tp:  # the trainer refuses it at start-up (init_parallel)
        raise ConfigError(f"rollout.tensor_parallel_size={rollout_tp} does not divide --gpus {gpus}")
    p = Precision.of(cfg, device)
    mbt = micro_batch_tokens or cfg.trainer.micro_batch_tokens
    tokens = -(-mbt // cp)
    gpu_mem = gpu_mem_gib * GIB
    tp = throughput(cfg, s, gpus, gpu_mem, p)
    if micro_batches is None:
        micro_batches = tp.micro_batches_per_gpu
    if num_docs is None:
        num_docs = max(1, mbt // max(tp.doc_len, 1))
    # keeping the attention, SDPA (which saves per-document views of q, k, v) holds them too; the ring does not use it
    sdpa = runs_sdpa(cfg, cpu=device == "cpu")
    mem = simulate_update(s, p, tokens=tokens, fsdp=dp * cp, cp=cp,
                          checkpointing=cfg.parallel.activation_checkpointing, cpu_offload=cfg.parallel.cpu_offload,
                          micro_batches=micro_batches, num_docs=num_docs, optimizer=optimizer or cfg.optim.impl,
                          reference=cfg.algo.kl_coef > 0, keep_attention=cfg.parallel.ac_keep_attention,
                          holds_qkv=sdpa)
    overhead = CUDA_RUNTIME_OVERHEAD if device == "cuda" else 0.0
    vllm = device == "cuda" and cfg.rollout.engine == "vllm"
    reserve = cfg.rollout.gpu_memory_utilization * gpu_mem if vllm else 0.0
    notes = []
    if vllm:
        notes.append(f"vLLM sleeps during the update (level 2: weights and KV cache released); "
                     f"{VLLM_SLEEP_RESIDUE / GIB:.0f} GiB assumed left on the GPU")
    tr = cfg.trainer
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens
    if longest > tr.micro_batch_tokens:  # the figures cap a sequence at the budget; the trainer does not cut one
        notes.append(f"WARNING: sequences of up to {longest:,} tokens (data.max_prompt_tokens + "
                     f"rollout.max_response_tokens) exceed trainer.micro_batch_tokens={tr.micro_batch_tokens:,}: "
                     "the trainer runs such a sequence as a micro-batch of its own, above the budget's memory, and "
                     "these figures cap sequences at the budget; plan the worst case with "
                     f"trainer.micro_batch_tokens={longest}")
    if tr.share_prompts and cfg.rollout.n > 1:
        prompt = min(cfg.data.max_prompt_tokens, tr.micro_batch_tokens)  # as throughput() takes them
        resp = tp.doc_len - prompt
        per_micro = min(cfg.rollout.n, max(1, (tr.micro_batch_tokens - (prompt - 1)) // (resp + 1)))
        shared = (f"pack {per_micro} per micro-batch beside one copy of it" if per_micro > 1 else
                  "pack one per micro-batch, each a whole sequence")
        notes.append(f"figures count whole sequences: with trainer.share_prompts a full-length prompt's "
                     f"{cfg.rollout.n} responses {shared}; shorter prompts share theirs among more")
    if cfg.rollout.router_replay and s.is_moe:
        notes.append(_routing_note(cfg, s, gpus, dp))
    update_total = mem.peak_bytes + overhead + (VLLM_SLEEP_RESIDUE if vllm else 0.0)
    rollout_total = mem.resident_bytes + reserve + overhead
    return Plan(shape=s, gpus=gpus, gpu_mem_bytes=gpu_mem, dp=dp, cp=cp, precision=p, memory=mem,
                overhead_bytes=overhead, rollout_reserve_bytes=reserve, update_total_bytes=update_total,
                rollout_total_bytes=rollout_total, throughput=tp, notes=notes)


def _routing_note(cfg: RunConfig, s: ModelShape, gpus: int, dp: int) -> str:
    """Host memory of routing replay's records per rank (golong.replay): its share of a generation batch's, then its
    dp group's share of the step's kept ones, at the longest prompt and response."""
    import numpy as np

    from golong.replay import record_dtype  # here: golong.replay loads torch.distributed

    tr, n = cfg.trainer, cfg.rollout.n
    row = s.layers * s.top_k * np.dtype(record_dtype(s.experts)).itemsize  # bytes of one token's record
    per_gen = (tr.gen_batch_prompts or tr.prompts_per_step) if cfg.algo.dynamic_sampling else tr.prompts_per_step
    prompt, response = cfg.data.max_prompt_tokens, cfg.rollout.max_response_tokens
    generated = per_gen * (prompt + n * response) * row / gpus
    trained = tr.prompts_per_step * (prompt + n * response) * row / dp
    return (f"rollout.router_replay: each rank keeps the routing records of the responses it generated (up to "
            f"{generated / GIB:,.1f} GiB of host memory for a generation batch) and receives its dp group's share of "
            f"the step's ({trained / GIB:,.1f} GiB); {row} bytes a token")


def _checkpointing(cfg: RunConfig) -> str:
    if not cfg.parallel.activation_checkpointing:
        return "off"
    return "on, keeping the attention output" if cfg.parallel.ac_keep_attention else "on"


def _gib(x: float) -> str:
    return f"{x / GIB:,.2f} GiB"


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:,.2f} {prefix}{unit}"
    return f"{x:,.0f} {unit}"


def _seconds(x: float) -> str:
    return f"{x:,.2f} s" if x < 120 else f"{x / 60:,.1f} min"


def render(plan: Plan, cfg: RunConfig) -> None:
    """Print the plan as rich tables."""
    from rich.console import Console
    from rich.table import Table

    s, m, t = plan.shape, plan.memory, plan.throughput
    con = Console(width=120)
    kind = (f"MoE {s.experts} experts top-{s.top_k}, expert I {s.moe_intermediate}" if s.is_moe
            else f"dense, I {s.intermediate}")
    con.print(f"[bold]{s.name}[/bold] ({s.source}): H {s.hidden}, {s.layers} layers, {s.heads} q / {s.kv_heads} kv "
              f"heads x {s.head_dim}, {kind}, V {s.vocab:,}, {'tied' if s.tied else 'untied'} embeddings; "
              f"{s.total_params / 1e9:.2f} B parameters, {s.active_params / 1e9:.2f} B active")
    con.print(f"{plan.gpus} GPUs x {plan.gpu_mem_bytes / GIB:.0f} GiB ({plan.precision.device}); FSDP2 over dp_shard "
              f"{plan.dp} x cp {plan.cp} = {plan.dp * plan.cp}; {m.tokens_per_gpu:,} tokens per GPU per micro-batch; "
              f"activation checkpointing {_checkpointing(cfg)}; "
              f"cpu_offload {'on' if cfg.parallel.cpu_offload else 'off'}")
    tab = Table(title=f"Per-GPU memory at the update peak ({m.peak_phase})")
    tab.add_column("component")
    tab.add_column("GiB", justify="right")
    for label, v in sorted(m.breakdown.items(), key=lambda kv: -kv[1]):
        tab.add_row(label, f"{v / GIB:,.2f}")
    tab.add_row("[bold]update peak (allocated)[/bold]", f"[bold]{m.peak_bytes / GIB:,.2f}[/bold]")
    if plan.overhead_bytes:
        tab.add_row("CUDA runtime overhead (context, NCCL, workspaces)", f"{plan.overhead_bytes / GIB:,.2f}")
    if plan.rollout_reserve_bytes:
        tab.add_row("sleeping vLLM engine", f"{VLLM_SLEEP_RESIDUE / GIB:,.2f}")
    tab.add_row("[bold]update phase total[/bold]", f"[bold]{plan.update_total_bytes / GIB:,.2f}[/bold]")
    if plan.rollout_reserve_bytes:
        what = "params + AdamW + reference" if cfg.algo.kl_coef > 0 else "params + AdamW"
        tab.add_row(f"rollout phase: trainer resident ({what})", f"{m.resident_bytes / GIB:,.2f}")
        tab.add_row(f"rollout phase: vLLM reservation ({cfg.rollout.gpu_memory_utilization:.2f} x GPU)",
                    f"{plan.rollout_reserve_bytes / GIB:,.2f}")
        tab.add_row("[bold]rollout phase total[/bold]", f"[bold]{plan.rollout_total_bytes / GIB:,.2f}[/bold]")
    con.print(tab)
    perf = Table(title="One RL step at maximum lengths: work and roofline lower bound (790 TFLOP/s bf16, "
                       "4.3 TB/s per H200)")
    perf.add_column("figure")
    perf.add_column("value", justify="right")
    rows = [
        ("sequences x length", f"{t.docs:,} x {t.doc_len:,}"),
        ("tokens per step", f"{t.tokens:,}"),
        ("micro-batches per GPU", f"{t.micro_batches_per_gpu:,}"),
        ("update model FLOPs (6 N_active T + attention)", _si(t.model_flops, "FLOP")),
        ("update hardware FLOPs (+ recompute)", _si(t.hardware_flops, "FLOP")),
        (f"update lower bound ({t.update_bound}-bound)", _seconds(t.update_s)),
        ("rollout prefill FLOPs", _si(t.rollout_prefill_flops, "FLOP")),
        ("rollout decode bytes (weights + KV reads)", _si(t.rollout_decode_bytes, "B")),
        ("rollout lower bound", _seconds(t.rollout_s)),
        ("KV cache capacity per engine (full-length sequences)", f"{t.kv_seqs_per_engine:,.1f}"),
        (f"  prompts with their {cfg.rollout.n} responses (prefix cache: the prompt's KV once)",
         f"{t.kv_prompts_per_engine:,.1f}"),
        ("step lower bound (rollout + update)", _seconds(t.rollout_s + t.update_s)),
        ("FSDP traffic per GPU per step (gathers + reduce-scatter)", _si(t.fsdp_bytes, "B")),
        (f"  at {t.fsdp_bus / 1e9:.0f} GB/s "
         f"({'NVLink, one node' if t.fsdp_bus == NVLINK_BUS_BYTES_PER_S else 'a 400 Gb/s NIC per GPU'}; assumed)",
         _seconds(t.fsdp_s)),
        ("  beyond the update's compute (perfect overlap)", _seconds(max(0.0, t.fsdp_s - t.update_compute_s))),
    ]
    if plan.precision.device == "cpu":  # H200 rooflines say nothing about a CPU run
        perf.title = "One RL step at maximum lengths: work"
        gpu_only = ("lower bound", "KV cache", "prompts with their", " GB/s (", "beyond the update")
        rows = [r for r in rows if not any(s in r[0] for s in gpu_only)]
    for r in rows:
        perf.add_row(*r)
    con.print(perf)
    for n in plan.notes:
        con.print(f"note: {n}")
    verdict = "[green]FITS[/green]" if plan.fits else "[red]DOES NOT FIT[/red]"
    worst = max(plan.update_total_bytes, plan.rollout_total_bytes)
    con.print(f"{verdict}: {worst / GIB:,.1f} of {plan.gpu_mem_bytes / GIB:,.0f} GiB per GPU "
              f"({100 * worst / plan.gpu_mem_bytes:.0f}%)")


def plan_main(cfg: RunConfig, gpus: int, gpu_mem_gib: float = 141.0) -> int:
    """`golong plan`: print the plan; exit code 0 if it fits, 1 if it does not.

    A config with parallel.backend=gloo (the CPU demo) is planned in CPU mode: `--gpus` counts
    ranks and `--gpu-mem` the memory each may use."""
    device = "cpu" if cfg.parallel.backend == "gloo" else "cuda"
    plan = predict(cfg, gpus, gpu_mem_gib, device=device)
    render(plan, cfg)
    p = cfg.parallel
    if not plan.fits and p.activation_checkpointing and p.ac_keep_attention \
            and plan.update_total_bytes >= plan.rollout_total_bytes:  # the update is what does not fit: say the way out
        plain = predict(dataclasses.replace(cfg, parallel=dataclasses.replace(p, ac_keep_attention=False)), gpus,
                        gpu_mem_gib, device=device)
        print(f"parallel.ac_keep_attention=false (recompute the attention too) plans the update at "
              f"{plain.update_total_bytes / GIB:,.1f} GiB per GPU, for {plain.throughput.hardware_flops / 1e18:,.2f} "
              f"EFLOP instead of {plan.throughput.hardware_flops / 1e18:,.2f}")
    return 0 if plan.fits else 1


__all__ = ["KNOWN_MODELS", "ModelShape", "Plan", "model_shape", "plan_main", "predict", "simulate_update"]
