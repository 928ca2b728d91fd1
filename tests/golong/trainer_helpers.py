"""Shared helpers for the trainer / parallel / checkpoint tests: a tiny config and a fixed batch."""

from __future__ import annotations

import pytest
import torch

from golong.config import RunConfig, ScratchModelConfig


def tiny_config(run_dir: str = "/tmp/golong-test", **over) -> RunConfig:
    """A tiny Qwen3-MoE (2 layers, 4 experts top-2, untied head, vocab 1024), fp32 on CPU."""
    cfg = RunConfig()
    cfg.model.scratch = ScratchModelConfig(vocab_size=1024, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           num_key_value_heads=1, head_dim=32, intermediate_size=48, num_experts=4,
                                           num_experts_per_tok=2, moe_intermediate_size=24,
                                           tie_word_embeddings=False, max_position_embeddings=2048)
    cfg.model.dtype = "float32"
    cfg.parallel.param_dtype = "float32"
    cfg.parallel.activation_checkpointing = False
    cfg.parallel.backend = "gloo"
    cfg.optim.lr = 1e-2
    cfg.optim.warmup_steps = 0
    cfg.optim.weight_decay = 0.01
    cfg.logging.run_dir = run_dir
    cfg.logging.tensorboard = False
    cfg.logging.progress = False
    for key, value in over.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def fixed_rollouts(n_prompts: int = 5, n: int = 3, seed: int = 0, vocab: int = 1024):
    """Rollouts with random (odd) lengths, advantages and rollout logprobs; identical on every rank."""
    from golong.actor import Rollout

    g = torch.Generator().manual_seed(seed)
    out = []
    for p in range(n_prompts):
        prompt = torch.randint(0, vocab, (int(torch.randint(3, 17, (), generator=g)),), generator=g).tolist()
        for _ in range(n):
            r = int(torch.randint(1, 12, (), generator=g))
            resp = torch.randint(0, vocab, (r,), generator=g).tolist()
            # rollout logprobs near the tiny model's (about -log V): IS ratios both inside and outside [0.5, 5]
            lps = (-torch.log(torch.tensor(float(vocab))) + 0.8 * torch.randn(r, generator=g)).tolist()
            out.append(Rollout(prompt, resp, lps, group=p, task=f"task{p % 2}", score=0.0,
                               advantage=float(torch.randn((), generator=g))))
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """In-process tests run torch on one thread: on a shared 2-core machine, two threads per
    process oversubscribe the cores and small ops get ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
