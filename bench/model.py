"""Model forward+backward: golong vs transformers on a tiny Qwen3-MoE, 4K packed tokens.

    python -m bench.model              # CPU: fp32, 4096 tokens in 8 documents of random lengths
    python -m bench.model --dry-run    # tiny shapes, one iteration, nothing saved

One RL policy-update micro-step: forward, per-token logprob of the targets and entropy of
softmax(logits / T), a policy-gradient-like loss on both, backward. Same weights (golong loads the
transformers checkpoint), same tokens, same loss (checked to agree) for:
  golong               packed [T] ids + cu_seqlens, fused LM head (kernels.linear_logprob_entropy:
                       never materialises [T, V]), kernels.flash_attention, kernels.expert_mlp
  transformers-packed  one row of packed ids, position_ids restarting per document (transformers
                       builds the block-diagonal mask from them), full logits -> log_softmax
  transformers-padded  one row per document, right-padded to the longest, attention_mask
Figures: tokens/s (real tokens, median of --iters rounds, impls interleaved) and peak extra memory of one step (CPU: RSS
sampling). Ratios vs each transformers variant: speed = golong / peer, memory = peer / golong
(both > 1 mean golong is better).
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from bench.common import peak_extra_memory, print_table, save_results, timeit


def doc_lengths(total: int, docs: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(total - 1, generator=g)[: docs - 1].add(1).tolist())
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def hf_loss(logits: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor, valid: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """What a transformers-based trainer computes: full logits -> log_softmax -> gather + entropy."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    lp = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    ent = -(logp.exp() * logp).sum(-1)
    return ((coef * lp + 0.01 * ent) * valid).sum() / valid.sum()


def main(args: argparse.Namespace) -> list[dict]:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    import golong.models as gm

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    cfg = Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         moe_intermediate_size=args.moe_inter, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                         num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True,
                         max_position_embeddings=max(4096, args.tokens))
    hf = Qwen3MoeForCausalLM(cfg).to(device=dev, dtype=dtype).train()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = gm.from_pretrained(d, dtype=dtype, device=dev).train()

    lengths = doc_lengths(args.tokens, args.docs)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(dev)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(dev)
    coef = torch.randn(args.tokens, generator=g).to(dev)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    pos = gm.packed_position_ids(cu, args.tokens)
    # padded layout for the transformers-padded peer
    lmax, b = max(lengths), len(lengths)
    pad = lambda x, fill: torch.stack([torch.nn.functional.pad(x[cu[i]:cu[i + 1]], (0, lmax - lengths[i]),  # noqa: E731
                                                               value=fill) for i in range(b)])
    ids_p, tgt_p, coef_p = pad(ids, 0), pad(targets, 0), pad(coef, 0.0)
    mask_p = pad(torch.ones_like(ids), 0)
    T = args.temperature

    def step_golong() -> float:
        lp, ent = ours(ids, cu, targets=targets, temperature=T)
        loss = (coef * lp + 0.01 * ent).sum() / args.tokens
        loss.backward()
        ours.zero_grad(set_to_none=True)
        return loss.item()

    def step_hf_packed() -> float:
        # use_cache=False: with a cache transformers ignores the packing in position_ids (cross-doc attention)
        logits = hf(input_ids=ids[None], position_ids=pos[None], use_cache=False).logits
        loss = hf_loss(logits, targets[None], coef[None], torch.ones_like(coef[None]), T)
        loss.backward()
        hf.zero_grad(set_to_none=True)
        return loss.item()

    def step_hf_padded() -> float:
        logits = hf(input_ids=ids_p, attention_mask=mask_p, use_cache=False).logits
        loss = hf_loss(logits, tgt_p, coef_p, mask_p.float(), T)
        loss.backward()
        hf.zero_grad(set_to_none=True)
        return loss.item()

    impls = {"golong": step_golong, "transformers-packed": step_hf_packed, "transformers-padded": step_hf_padded}
    losses = {name: fn() for name, fn in impls.items()}  # warm-up, and the same-work check
    for name, val in losses.items():
        assert abs(val - losses["golong"]) <= 1e-3 * max(1.0, abs(val)), f"{name} loss {val} != golong {losses}"
    mems = {}
    for name, fn in impls.items():
        mems[name], _ = peak_extra_memory(fn)  # trims the heap an earlier impl freed first
    # timing round-robin (one step of each impl per round, median over rounds): on a shared machine
    # the load drifts over minutes, and back-to-back blocks would put the drift into the ratios
    secs: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(1 if args.dry_run else args.iters):
        for name, fn in impls.items():
            secs[name].append(timeit(fn, warmup=0, iters=1))
    res = {}
    for name in impls:
        sec = sorted(secs[name])[len(secs[name]) // 2]
        res[name] = (args.tokens / sec, mems[name] / 2**20)
        print(f"{name:22s} {args.tokens / sec:10.1f} tok/s  {mems[name] / 2**20:9.1f} MiB  ({sec * 1e3:.0f} ms/step, "
              f"rounds {', '.join(f'{t:.1f}' for t in secs[name])} s)")

    case = (f"L{args.layers} H{args.hidden} V{args.vocab} E{args.experts} top{args.top_k} I{args.moe_inter} "
            f"T{args.tokens} docs{args.docs} {str(dtype).removeprefix('torch.')}")
    rows = []
    for name, (tps, mem) in res.items():
        rows.append(dict(case=case, impl=name, metric="tokens_per_s", value=tps, unit="tok/s"))
        rows.append(dict(case=case, impl=name, metric="peak_extra_mem", value=mem, unit="MiB"))
    g_tps, g_mem = res["golong"]
    for peer in ("transformers-packed", "transformers-padded"):
        p_tps, p_mem = res[peer]
        rows.append(dict(case=case, impl="golong", metric="speedup", value=g_tps / p_tps, unit="x", baseline=peer,
                         ratio=g_tps / p_tps, ratio_meaning="golong tok/s / peer tok/s"))
        rows.append(dict(case=case, impl="golong", metric="memory_saving", value=p_mem / max(g_mem, 1e-9), unit="x",
                         baseline=peer, ratio=p_mem / max(g_mem, 1e-9), ratio_meaning="peer MiB / golong MiB"))
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--moe-inter", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, one iteration, nothing saved")
    args = p.parse_args()
    if args.dry_run:
        args.tokens, args.docs, args.layers, args.vocab, args.hidden = 256, 3, 2, 2048, 64
    rows = main(args)
    if not args.dry_run:
        print("saved", save_results("model", rows))
    cols = ["case", "impl", "metric", "value", "unit", "baseline"]
    print_table("Qwen3-MoE fwd+bwd: golong vs transformers" + (" (dry run)" if args.dry_run else ""), rows, cols)
