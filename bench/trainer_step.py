"""One GRPO policy update on a tiny Qwen3-MoE (CPU): golong's trainer vs TRL's GRPOTrainer.

    python -m bench.trainer_step              # 4 prompts x 4 responses, 256 prompt + 128 response tokens
    python -m bench.trainer_step --dry-run    # tiny shapes, one iteration, nothing saved

The same transformers checkpoint (random init, saved once) is loaded by both, and both do one
optimizer step on the same batch (token ids, advantages), on-policy (old logprobs = the current
ones, detached), with the same settings: temperature 1.0, clip 0.2 / 0.28 (clip-higher), no KL
term, token-mean over the whole batch (TRL loss_type="dapo"), grad-norm clip 1.0, AdamW:

  golong  golong.actor.Actor.update: FSDP2 (1 rank, gloo), sequences packed without padding into
          micro-batches of --micro-batch-tokens, a prompt's responses sharing one copy of its rows
          (trainer.share_prompts), fused LM-head logprob/entropy (no [T, V] logits), grouped-GEMM experts,
          varlen attention; dual clip disabled (TRL has none)
  golong whole sequences   the same with trainer.share_prompts off: every response packed with its own
          prompt copy (what TRL, verl and OpenRLHF compute)
  trl     GRPOTrainer.compute_loss on its padded [B, L] batch (all rows the same length here, so
          padding costs TRL nothing), accelerate backward, its AdamW; use_cpu=True, no vLLM, no MoE
          router aux loss (golong has none)

Rollout generation is not timed: both would sample the same tokens, and this measures the update.
Figures: tokens/s (prompt + response tokens of the sequences / median wall time of --iters updates) and
peak extra memory of one update (CPU: RSS sampling). Ratios: speed golong / trl, memory trl / golong (> 1:
golong better), and the shared prompts against whole sequences.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from bench.common import peak_extra_memory, print_table, release_freed_heap, save_results, timeit

WHOLE = "golong whole sequences"


def build_checkpoint(path: Path, args: argparse.Namespace) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads // 2,
                         head_dim=32, num_experts=args.experts, num_experts_per_tok=args.top_k,
                         moe_intermediate_size=args.expert_size, norm_topk_prob=True, tie_word_embeddings=False,
                         max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(cfg).float().save_pretrained(path)


def make_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    b = args.prompts * args.responses
    prompts = torch.randint(0, args.vocab, (args.prompts, args.prompt_len), generator=g)
    return {"prompt_ids": prompts.repeat_interleave(args.responses, 0),
            "completion_ids": torch.randint(0, args.vocab, (b, args.response_len), generator=g),
            "advantages": torch.randn(b, generator=g)}


def golong_update(ckpt: Path, batch: dict[str, torch.Tensor], args: argparse.Namespace,  # noqa: ANN201
                  share_prompts: bool = True):
    from golong.actor import Actor, Rollout
    from golong.build import build_model
    from golong.config import RunConfig
    from golong.parallel import init_parallel

    cfg = RunConfig()
    cfg.model.path = str(ckpt)
    cfg.model.dtype = "float32"
    cfg.parallel.param_dtype = "float32"
    cfg.parallel.activation_checkpointing = False
    cfg.trainer.micro_batch_tokens = args.micro_batch_tokens
    cfg.trainer.mini_batch_prompts = args.prompts
    cfg.trainer.share_prompts = share_prompts
    cfg.algo.clip_low, cfg.algo.clip_high, cfg.algo.dual_clip = 0.2, 0.28, 1e9
    cfg.algo.rollout_is = "none"
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay, cfg.optim.grad_clip = 1e-6, 0, 0.0, 1.0
    cfg.rollout.temperature = 1.0
    dims = init_parallel(-1, 1, "gloo")
    actor = Actor(build_model(cfg, dims), dims, cfg)
    rollouts = [Rollout(p.tolist(), c.tolist(), None, group=i // args.responses, task="bench", advantage=float(a))
                for i, (p, c, a) in enumerate(zip(batch["prompt_ids"], batch["completion_ids"], batch["advantages"]))]

    def step() -> float:
        return actor.update(rollouts, "pg")["actor/loss"]

    return step


def trl_update(ckpt: Path, batch: dict[str, torch.Tensor], args: argparse.Namespace, out_dir: str):  # noqa: ANN201
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from golong.data.tokenizer import build_demo_tokenizer

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    b = args.prompts * args.responses
    config = GRPOConfig(output_dir=out_dir, use_cpu=True, bf16=False, report_to=[], per_device_train_batch_size=b,
                        num_generations=args.responses, max_completion_length=args.response_len, temperature=1.0,
                        beta=0.0, loss_type="dapo", epsilon=0.2, epsilon_high=0.28, max_grad_norm=1.0,
                        learning_rate=1e-6, weight_decay=0.0, lr_scheduler_type="constant", logging_steps=1_000_000,
                        router_aux_loss_coef=0.0)  # golong's loss has no MoE load-balancing term
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=config,
                          train_dataset=Dataset.from_dict({"prompt": ["hello"] * b}),
                          processing_class=build_demo_tokenizer(1024))
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by its training loop, which generates; we don't
    mask_p = torch.ones_like(batch["prompt_ids"])
    mask_c = torch.ones_like(batch["completion_ids"])
    inputs = {"prompt_ids": batch["prompt_ids"], "prompt_mask": mask_p, "completion_ids": batch["completion_ids"],
              "completion_mask": mask_c, "advantages": batch["advantages"],
              "num_items_in_batch": mask_c.sum().float()}
    model = trainer.model
    model.train()

    def step() -> float:
        loss = trainer.compute_loss(model, inputs)
        trainer.accelerator.backward(loss)
        trainer.accelerator.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def main(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokens = args.prompts * args.responses * (args.prompt_len + args.response_len)
    case = (f"{args.prompts}x{args.responses} seqs, {args.prompt_len}+{args.response_len} tok, H{args.hidden} "
            f"L{args.layers} E{args.experts}/top{args.top_k} V{args.vocab}")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        build_checkpoint(ckpt, args)
        batch = make_batch(args)
        measured = {}
        for name, make in (("golong", lambda: golong_update(ckpt, batch, args)),
                           (WHOLE, lambda: golong_update(ckpt, batch, args, share_prompts=False)),
                           ("trl", lambda: trl_update(ckpt, batch, args, str(Path(tmp) / "trl")))):
            step = make()
            loss = step()  # warm-up (also the first optimizer step)
            peak, _ = peak_extra_memory(step)
            release_freed_heap()
            sec = timeit(step, warmup=0, iters=args.iters)
            measured[name] = {"tokens_per_s": tokens / sec, "peak_mib": peak / 2**20, "loss": loss, "sec": sec}
            del step
            release_freed_heap()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    g, w, t = measured["golong"], measured[WHOLE], measured["trl"]
    rows = [
        {"case": case, "impl": "golong", "metric": "tokens_per_s", "value": g["tokens_per_s"], "unit": "tok/s",
         "baseline": "trl", "ratio": g["tokens_per_s"] / t["tokens_per_s"], "ratio_meaning": "golong / trl"},
        {"case": case, "impl": "golong", "metric": "shared_prompt_speedup", "value": g["tokens_per_s"],
         "unit": "tok/s", "baseline": WHOLE, "ratio": g["tokens_per_s"] / w["tokens_per_s"],
         "ratio_meaning": "shared prompts / whole sequences"},
        {"case": case, "impl": WHOLE, "metric": "tokens_per_s", "value": w["tokens_per_s"], "unit": "tok/s",
         "baseline": "trl", "ratio": w["tokens_per_s"] / t["tokens_per_s"], "ratio_meaning": "golong / trl"},
        {"case": case, "impl": "trl", "metric": "tokens_per_s", "value": t["tokens_per_s"], "unit": "tok/s"},
        {"case": case, "impl": "golong", "metric": "peak_memory", "value": g["peak_mib"], "unit": "MiB",
         "baseline": "trl", "ratio": t["peak_mib"] / max(g["peak_mib"], 1e-9), "ratio_meaning": "trl / golong"},
        {"case": case, "impl": WHOLE, "metric": "peak_memory", "value": w["peak_mib"], "unit": "MiB",
         "baseline": "trl", "ratio": t["peak_mib"] / max(w["peak_mib"], 1e-9),
         "ratio_meaning": "trl / golong whole sequences"},
        {"case": case, "impl": "trl", "metric": "peak_memory", "value": t["peak_mib"], "unit": "MiB"},
    ]
    if not args.dry_run:
        print(f"wrote {save_results('trainer_step', rows)}")
    # the first update's loss is the same function of the same weights and batch for both
    print(f"first-update loss: golong {g['loss']:+.6f}  whole sequences {w['loss']:+.6f}  trl {t['loss']:+.6f}")
    table = [{"impl": n, "tokens/s": m["tokens_per_s"], "s/update": m["sec"], "peak MiB": m["peak_mib"],
              "speed vs trl": m["tokens_per_s"] / t["tokens_per_s"], "memory trl/this": t["peak_mib"] / m["peak_mib"]}
             for n, m in measured.items()]
    print_table(f"one GRPO update, CPU, {tokens} tokens ({case}), {args.threads} thread(s)", table)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--responses", type=int, default=4, help="responses per prompt (GRPO group size)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--expert-size", type=int, default=128)
    p.add_argument("--micro-batch-tokens", type=int, default=1 << 20, help="golong packing budget (default: one)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, one iteration, nothing saved")
    args = p.parse_args(argv)
    if args.dry_run:
        args.prompts, args.responses, args.prompt_len, args.response_len = 2, 2, 16, 8
        args.vocab, args.hidden, args.layers, args.experts, args.top_k, args.expert_size, args.iters = (
            512, 64, 2, 4, 2, 32, 1)
    return args


if __name__ == "__main__":
    main(parse_args())
