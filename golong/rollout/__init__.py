"""Rollout engines. Both return the same `GenerationResult` (token ids + sampled-token logprobs).

    TorchGenerator    plain-torch sampling on the model's KV cache (CPU, tests, the demo)
    VLLMEngine        colocated vLLM with in-memory weight sync (GPU; golong.rollout.vllm_engine)

vLLM is imported only when its engine is asked for, never by `import golong.rollout`.
"""

from golong.rollout.torch_generator import GenerationResult, SamplingParams, TorchGenerator, sample_tokens

__all__ = ["GenerationResult", "SamplingParams", "TorchGenerator", "sample_tokens"]
