"""The trainer's two rollout engines behind one interface (sync_weights, sleep, generate): the plain-torch
generator (CPU, tests) and colocated vLLM."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from golong.build import stop_token_ids
from golong.config import RunConfig
from golong.models.checkpoint import full_parameters, hf_state_items
from golong.parallel import compute_device
from golong.rollout.torch_generator import GenerationResult, SamplingParams, TorchGenerator


class TorchEngine:
    """The plain-torch rollout engine: an unsharded copy of the policy in the rollout dtype,
    refreshed from the trainer's parameters after each update (like vLLM's weight sync)."""

    def __init__(self, cfg: RunConfig, model: nn.Module, tokenizer: Any) -> None:
        from golong.models import Qwen3ForCausalLM

        device = compute_device()
        with torch.device("meta"):
            copy = Qwen3ForCausalLM(model.config, dtype=getattr(torch, cfg.model.dtype))
        copy.to_empty(device=device)
        copy.eval().requires_grad_(False)
        self.gen = TorchGenerator(copy, stop_token_ids(tokenizer, cfg.model.path), max_batch=256)

    def sync_weights(self, model: nn.Module) -> None:
        """Copy the trainer's parameters in (collective: DTensors are gathered one at a time)."""
        self.gen.load_weights(full_parameters(model))

    def sleep(self) -> None:  # nothing to release: the copy is small next to the trainer's state
        pass

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int],
                 progress: Any = None, routing: bool = False) -> GenerationResult:
        """routing: with each response, its tokens' experts (GenerationResult.routed_experts; a MoE model)."""
        return self.gen.generate(prompts, params, seeds, progress=progress, record_routing=routing)


class VLLMRollout:
    """golong.rollout.vllm_engine.VLLMEngine behind the trainer's engine interface: colocated,
    asleep during the update, weights pushed from the (sharded) trainer in memory after it."""

    def __init__(self, cfg: RunConfig, model: nn.Module, tokenizer: Any, run_dir: Path) -> None:
        from golong.rollout.vllm_engine import VLLMConfig, VLLMEngine  # lazy: vLLM only when asked for

        path = cfg.model.path
        if path is None:  # from scratch: vLLM needs a config.json; weights come from the first push
            path = str(run_dir / "vllm_model")
            if dist.get_rank() == 0:
                Path(path).mkdir(parents=True, exist_ok=True)
                import json

                (Path(path) / "config.json").write_text(json.dumps(model.config.to_hf(dtype=cfg.model.dtype)))
            dist.barrier()
        r = cfg.rollout
        self.engine = VLLMEngine(VLLMConfig(
            model=path, tensor_parallel_size=r.tensor_parallel_size,
            dtype=cfg.model.dtype if torch.cuda.is_available() else "float32",
            max_model_len=cfg.data.max_prompt_tokens + r.max_response_tokens,
            gpu_memory_utilization=r.gpu_memory_utilization, bucket_bytes=r.weight_sync_bucket_mb << 20,
            load_format="dummy", seed=cfg.trainer.seed, return_routed_experts=r.router_replay),
            eos_token_ids=stop_token_ids(tokenizer, path))

    def sync_weights(self, model: nn.Module) -> None:
        self.engine.update_weights(hf_state_items(model, dtype=self.engine.dtype, device=None))

    def sleep(self) -> None:
        self.engine.sleep()

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int],
                 progress: Any = None, routing: bool = False) -> GenerationResult:
        """routing: keep the experts vLLM returns (engine-wide with rollout.router_replay) with each response."""
        out = self.engine.generate(prompts, params, seeds, progress=progress)
        if not routing:
            out.routed_experts = None
        return out


def build_engine(cfg: RunConfig, model: nn.Module, tokenizer: Any, run_dir: Path) -> Any:
    if cfg.rollout.engine == "torch":
        return TorchEngine(cfg, model, tokenizer)
    return VLLMRollout(cfg, model, tokenizer, run_dir)
