"""One policy-update step of a Qwen3-4B-shaped model on one GPU: tokens/s, MFU, and golong.plan's
prediction vs the measured peak memory.

    python -m bench.gpu_train_step                    # CUDA: 16K tokens, random weights, no download
    python -m bench.gpu_train_step --tokens 32768 --docs 4
    python -m bench.gpu_train_step --dry-run          # CPU: a tiny model through the same code, nothing saved
    python -m bench.gpu_train_step --keep-attention --layers 12   # plain checkpointing vs ac_keep_attention
    python -m bench.gpu_train_step --keep-attention --iters 5   # without CUDA: on a CPU-sized model (CPU_SHAPE)
    python -m bench.gpu_train_step --shared-prompt 512 --docs 8 --layers 12   # shared prompts vs whole sequences

The step is golong's own (golong.actor.Actor.update: FSDP2 on a world of one, fp32 master weights,
bf16 compute, activation checkpointing, the fused logprob head, the clipped policy loss, AdamW),
on `--docs` sequences of `--tokens / --docs` tokens with random ids and advantages.
Figures (median of --iters steps after one warm-up):
  tokens/s          trained tokens per second
  MFU               model FLOPs / time / 989 TFLOP/s (H100/H200 SXM dense bf16 peak); model FLOPs =
                    6 N_active T + 6 L n_q d_head S^2 per sequence (causal attention), as golong.plan
  roofline ratio    measured time / golong.plan's lower bound (790 TFLOP/s, 4.3 TB/s)
  peak memory       torch.cuda.max_memory_allocated vs golong.plan's prediction for the same step
  kernel time       one more step under torch.profiler (after the peak is read): its --profile-top kernels
If the planner says the full 36 layers do not fit the GPU, layers are dropped until they do (the
row says how many ran): the figures are per-layer representative either way.
--keep-attention: the same step with plain activation checkpointing and with parallel.ac_keep_attention, one
after the other in this process: the step-time ratio (keep / plain) and each peak against golong.plan's; on a
machine without CUDA, at CPU_SHAPE and --cpu-tokens in one sequence (torch SDPA attention, times only).
--shared-prompt R: the --docs sequences are responses of R tokens to one prompt (the rest of --tokens / --docs), the
step timed with trainer.share_prompts off (each sequence whole) and on (the prompt packed once), in turn: the step-time
ratio and the rows each runs; without CUDA at CPU_SHAPE and --cpu-tokens.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import print_table, save_results  # noqa: E402

H100_H200_BF16_PEAK = 989.4e12  # dense bf16 tensor-core peak of an H100/H200 SXM (FLOP/s)
GIB = 1024**3
# --keep-attention without CUDA: small enough for a 2-core CPU, attention a large share of the step as at long context
CPU_SHAPE = dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                 head_dim=32, intermediate_size=512, tie_word_embeddings=False, max_position_embeddings=16384)


def make_config(layers: int, tokens: int, docs: int, tiny: bool, keep_attention: bool = False,
                shape: dict | None = None, share_prompts: bool = True):
    from golong.config import load_config
    from golong.plan import KNOWN_MODELS

    if shape is None and tiny:
        shape = dict(vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=32, intermediate_size=128, tie_word_embeddings=True)
    elif shape is None:
        q = KNOWN_MODELS["qwen3-4b"]
        shape = dict(vocab_size=q["vocab_size"], hidden_size=q["hidden_size"], num_hidden_layers=layers,
                     num_attention_heads=q["num_attention_heads"], num_key_value_heads=q["num_key_value_heads"],
                     head_dim=q["head_dim"], intermediate_size=q["intermediate_size"],
                     tie_word_embeddings=q["tie_word_embeddings"], max_position_embeddings=max(40960, tokens))
    overrides = [f"model.scratch.{k}={v}" for k, v in shape.items()]
    overrides += ["parallel.dp_shard=1", "parallel.cp=1", "parallel.activation_checkpointing=true",
                  "parallel.param_dtype=bfloat16", "parallel.reduce_dtype=float32",
                  f"trainer.micro_batch_tokens={tokens}", f"trainer.prompts_per_step={docs}",
                  f"trainer.mini_batch_prompts={docs}", "rollout.engine=torch", "algo.rollout_is=none",
                  "optim.lr=1e-6", f"parallel.ac_keep_attention={keep_attention}",
                  f"trainer.share_prompts={share_prompts}"]
    return load_config(None, overrides)


def step_flops(cfg, tokens: int, docs: int) -> tuple[float, float, float]:
    """(model FLOPs, hardware FLOPs, roofline lower-bound seconds on one H200) of the step, as
    golong.plan counts them."""
    from golong.plan import H200_BF16_FLOPS, H200_HBM_BYTES_PER_S, model_shape, update_flops

    s = model_shape(cfg.model)
    model, hw = update_flops(s, [tokens // docs] * docs, checkpointing=cfg.parallel.activation_checkpointing,
                             keep_attention=cfg.parallel.ac_keep_attention)
    # weights read in forward, recompute and twice in backward (bf16); AdamW's 7 fp32 passes
    traffic = 4 * s.total_params * 2 + 7 * 4 * s.total_params
    return model, hw, max(hw / H200_BF16_FLOPS, traffic / H200_HBM_BYTES_PER_S)


def fit_layers(tokens: int, docs: int, layers: int, mem_bytes: float, keep_attention: bool = False
               ) -> tuple[int, float]:
    """Most layers (<= layers) whose predicted update peak + CUDA overhead fits mem_bytes."""
    from golong.plan import CUDA_RUNTIME_OVERHEAD, predict

    for n in range(layers, 0, -1):
        plan = predict(make_config(n, tokens, docs, tiny=False, keep_attention=keep_attention), gpus=1,
                       gpu_mem_gib=mem_bytes / GIB,
                       device="cuda", num_docs=docs, micro_batches=1)
        if plan.memory.peak_bytes + CUDA_RUNTIME_OVERHEAD <= mem_bytes:
            return n, plan.memory.peak_bytes
    raise SystemExit("not even one layer fits this GPU")


def build_step(cfg, tokens: int, docs: int, response: int = 0):  # noqa: ANN201
    """(golong Actor on a fresh model, `docs` rollouts of `tokens // docs` random tokens with random advantages);
    response > 0: each rollout that many response tokens after one prompt all of them share."""
    from golong.actor import Actor, Rollout
    from golong.build import build_model
    from golong.parallel import init_parallel

    dims = init_parallel(1, 1)
    actor = Actor(build_model(cfg, dims, seed=0), dims, cfg)
    g = torch.Generator().manual_seed(0)
    vocab = cfg.model.scratch.vocab_size
    rollouts = []
    prompt = torch.randint(0, vocab, (tokens // docs - response,), generator=g).numpy().astype(np.int32)
    for i in range(docs):
        if response:
            ids = torch.randint(0, vocab, (response,), generator=g).numpy().astype(np.int32)
            rollouts.append(Rollout(prompt_ids=prompt, response_ids=ids, rollout_logprobs=None, group=0, task="t",
                                    advantage=float(torch.randn((), generator=g))))
            continue
        ids = torch.randint(0, vocab, (tokens // docs,), generator=g).tolist()
        rollouts.append(Rollout(prompt_ids=ids[:1], response_ids=ids[1:], rollout_logprobs=None, group=i, task="t",
                                advantage=float(torch.randn((), generator=g))))
    return actor, rollouts


def run_interleaved(cfgs: dict, tokens: int, docs: int, iters: int, response: int = 0) -> dict:
    """{key: step times} of one actor per config, their steps taken in turn (first by turns too): a CPU's speed
    drifts over the minute such a comparison takes, which a sequential A-then-B run reads as a difference."""
    steps = {key: build_step(cfg, tokens, docs, response) for key, cfg in cfgs.items()}
    for actor, rollouts in steps.values():
        actor.update(rollouts)  # warm-up: AdamW states
    times: dict = {key: [] for key in cfgs}
    order = list(cfgs)
    for i in range(iters):
        for key in order if i % 2 == 0 else order[::-1]:
            actor, rollouts = steps[key]
            t0 = time.perf_counter()
            actor.update(rollouts)
            times[key].append(time.perf_counter() - t0)
    return times


def run(cfg, tokens: int, docs: int, iters: int, profile_top: int = 0, response: int = 0
        ) -> tuple[list[float], float, list[dict]]:
    """(step times in s, peak allocated bytes during the timed steps, and with profile_top > 0 the device
    kernels taking the most time in one more step, profiled after the peak is read)."""
    actor, rollouts = build_step(cfg, tokens, docs, response)
    cuda = torch.cuda.is_available()
    actor.update(rollouts)  # warm-up: Triton autotune / compile, AdamW states
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        actor.update(rollouts)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
    kernels = []
    if profile_top:
        from bench.profile_kernels import kernel_table

        kernels = kernel_table(lambda: actor.update(rollouts), 1, cuda, profile_top, warmup=False)
    return times, peak, kernels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384, help="tokens in the step (one micro-batch)")
    ap.add_argument("--docs", type=int, default=1, help="sequences the tokens are split into")
    ap.add_argument("--layers", type=int, default=36, help="decoder layers (Qwen3-4B: 36)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--profile-top", type=int, default=15,
                    help="after the timed steps, profile one more and list its N slowest kernels (0: skip)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, one step, nothing saved")
    ap.add_argument("--keep-attention", action="store_true",
                    help="time plain activation checkpointing against parallel.ac_keep_attention (same process)")
    ap.add_argument("--cpu-tokens", type=int, default=8192, help="--keep-attention without CUDA: tokens")
    ap.add_argument("--shared-prompt", type=int, default=0, metavar="R",
                    help="the --docs sequences answer one prompt with R-token responses: time trainer.share_prompts "
                         "off against on (same process)")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    args = ap.parse_args(argv)

    from golong.plan import predict

    if args.keep_attention:
        return compare_keep_attention(args)
    if args.shared_prompt:
        return compare_shared_prompts(args)
    if args.dry_run:
        cfg = make_config(2, 256, 2, tiny=True)
        times, _, kernels = run(cfg, 256, 2, 1, profile_top=args.profile_top)
        print_table("one tiny step's top aten ops (CPU)", kernels)
        plan = predict(cfg, gpus=1, device="cpu", num_docs=2, micro_batches=1)
        # the CUDA-side planning and FLOP counting, for the full shape on an 80 GiB and a 141 GiB GPU
        fits = {gib: fit_layers(args.tokens, args.docs, args.layers, gib * GIB)[0] for gib in (80, 141)}
        _, _, lower = step_flops(make_config(args.layers, args.tokens, args.docs, tiny=False), args.tokens, args.docs)
        print_table("gpu_train_step --dry-run (CPU, tiny model; nothing saved)", [
            {"figure": "tiny step time (CPU)", "value": f"{times[0]:.3f} s"},
            {"figure": "planned CPU peak (tiny)", "value": f"{plan.memory.peak_bytes / 2**20:.1f} MiB"},
            {"figure": "layers that fit 80 / 141 GiB", "value": f"{fits[80]} / {fits[141]}"},
            {"figure": "H200 roofline lower bound (full shape)", "value": f"{lower:.3f} s"}])
        return 0
    if not torch.cuda.is_available():
        print("gpu_train_step needs CUDA (use --dry-run on CPU)", file=sys.stderr)
        return 2

    mem = torch.cuda.get_device_properties(0).total_memory
    layers, _ = fit_layers(args.tokens, args.docs, args.layers, mem)
    cfg = make_config(layers, args.tokens, args.docs, tiny=False)
    plan = predict(cfg, gpus=1, gpu_mem_gib=mem / GIB, device="cuda", num_docs=args.docs, micro_batches=1)
    times, peak, kernels = run(cfg, args.tokens, args.docs, args.iters, profile_top=args.profile_top)
    t = statistics.median(times)
    flops, _, lower = step_flops(cfg, args.tokens, args.docs)
    case = f"Qwen3-4B shape, {layers} layers, {args.tokens} tokens in {args.docs} seq"
    rows = [
        {"case": case, "impl": "golong Actor.update", "metric": "tokens/s", "value": args.tokens / t,
         "unit": "tok/s", "step_s": t, "times_s": times},
        {"case": case, "impl": "golong Actor.update", "metric": "MFU", "value": flops / t / H100_H200_BF16_PEAK,
         "unit": "fraction of 989 TFLOP/s", "model_flops": flops, "tflops": flops / t / 1e12},
        {"case": case, "impl": "golong Actor.update", "metric": "step time", "value": t, "unit": "s",
         "baseline": "golong.plan roofline lower bound (790 TFLOP/s)", "ratio": t / lower,
         "ratio_meaning": "measured / lower bound (>= 1)"},
        {"case": case, "impl": "golong Actor.update", "metric": "peak allocated memory", "value": peak / GIB,
         "unit": "GiB", "baseline": "golong.plan prediction", "ratio": peak / plan.memory.peak_bytes,
         "ratio_meaning": "measured / predicted", "predicted_gib": plan.memory.peak_bytes / GIB},
    ]
    rows += [{"case": case, "impl": "golong Actor.update", "metric": f"kernel time per step: {k['kernel']}",
              "kernel": k["kernel"], "value": k["ms/iter"], "unit": "ms", "share": k["share"],
              "calls": k.get("calls/iter")} for k in kernels]
    path = save_results("gpu_train_step", rows, args.out)
    print(f"wrote {path}")
    if kernels:
        print_table("device kernels taking the most time in one more step (torch.profiler)", kernels)
    print_table(f"One policy update on {torch.cuda.get_device_name()}", [
        {"figure": r["metric"], "value": f"{r['value']:.4g} {r['unit']}", "baseline": r.get("baseline", ""),
         "ratio": f"{r['ratio']:.3f}" if "ratio" in r else ""} for r in rows if "kernel" not in r])
    return 0


def compare_keep_attention(args: argparse.Namespace) -> int:
    """Plain checkpointing, then ac_keep_attention, on the same shape (the layers both fit): step times (median of
    --iters after a warm-up) and peaks vs golong.plan."""
    from golong.plan import predict

    cuda = torch.cuda.is_available()
    shape = CPU_SHAPE if not cuda and not args.dry_run else None
    if args.dry_run:
        tokens, docs, layers = 256, 2, 2
    elif shape is not None:
        tokens, docs, layers = args.cpu_tokens, 1, shape["num_hidden_layers"]
    else:
        tokens, docs = args.tokens, args.docs
        layers = fit_layers(tokens, docs, args.layers, torch.cuda.get_device_properties(0).total_memory,
                            keep_attention=True)[0]
    mem = torch.cuda.get_device_properties(0).total_memory if cuda else 0
    cfgs = {keep: make_config(layers, tokens, docs, tiny=args.dry_run, keep_attention=keep, shape=shape)
            for keep in (False, True)}
    iters = 1 if args.dry_run else args.iters
    # without CUDA both models live at once and take their steps in turn (no memory figures there); on a GPU one at
    # a time, each step's peak read alone
    cpu_times = None if cuda else run_interleaved(cfgs, tokens, docs, iters)
    rows, steps = [], {}
    for keep, cfg in cfgs.items():
        plan = predict(cfg, gpus=1, gpu_mem_gib=max(mem, GIB) / GIB, device="cuda" if cuda else "cpu",
                       num_docs=docs, micro_batches=1)
        times, peak, _ = run(cfg, tokens, docs, iters) if cuda else (cpu_times[keep], float("nan"), [])
        steps[keep] = statistics.median(times)
        _, hw, _ = step_flops(cfg, tokens, docs)
        impl = "ac_keep_attention" if keep else "plain checkpointing"
        case = "tiny" if args.dry_run else (f"CPU shape (H {shape['hidden_size']}, {layers} layers), {tokens} tokens "
                                            "in 1 seq, SDPA" if shape else
                                            f"Qwen3-4B shape, {layers} layers, {tokens} tokens in {docs} seq")
        rows.append({"case": case, "impl": impl, "metric": "step time", "value": steps[keep], "unit": "s",
                     "times_s": times, "hardware_flops": hw,
                     **({"baseline": "plain checkpointing, same run", "ratio": steps[True] / steps[False],
                         "ratio_meaning": "keep / plain step time (< 1: faster)",
                         "planned_ratio": hw / rows[0]["hardware_flops"]} if keep else {})})
        if cuda:  # torch.cuda.max_memory_allocated; no CPU equivalent here
            rows.append({"case": case, "impl": impl, "metric": "peak allocated memory", "value": peak / GIB,
                         "unit": "GiB", "baseline": "golong.plan prediction", "ratio": peak / plan.memory.peak_bytes,
                         "ratio_meaning": "measured / predicted", "predicted_gib": plan.memory.peak_bytes / GIB})
        gc.collect()  # the first run's model, optimizer and FSDP2 state hold reference cycles
        if cuda:
            torch.cuda.empty_cache()
    if not args.dry_run:
        print(f"wrote {save_results('train_step_keep_attention', rows, args.out)}")
    print_table("Activation checkpointing: plain vs keeping the attention output (golong Actor.update)", [
        {"impl": r["impl"], "figure": r["metric"], "value": f"{r['value']:.4g} {r['unit']}",
         "baseline": r.get("baseline", ""), "ratio": f"{r['ratio']:.3f}" if "ratio" in r else "",
         "planned": f"{r['planned_ratio']:.3f}" if "planned_ratio" in r else ""} for r in rows])
    return 0


def compare_shared_prompts(args: argparse.Namespace) -> int:
    """The same step with each sequence whole, then with the prompt packed once (trainer.share_prompts), steps in
    turn: step times (median of --iters after a warm-up), their ratio and the rows each layout runs."""
    cuda = torch.cuda.is_available()
    shape = CPU_SHAPE if not cuda and not args.dry_run else None
    docs = max(2, args.docs)
    if args.dry_run:
        tokens, docs, layers, response = 256, 4, 2, args.shared_prompt
    elif shape is not None:
        tokens, layers, response = args.cpu_tokens, shape["num_hidden_layers"], args.shared_prompt
    else:
        tokens, response = args.tokens, args.shared_prompt
        layers = fit_layers(tokens, docs, args.layers, torch.cuda.get_device_properties(0).total_memory)[0]
    if not 0 < response < tokens // docs - 1:
        raise SystemExit(f"--shared-prompt {response} leaves no prompt in {tokens // docs}-token sequences")
    cfgs = {share: make_config(layers, tokens, docs, tiny=args.dry_run, shape=shape, share_prompts=share)
            for share in (False, True)}
    iters = 1 if args.dry_run else args.iters
    # without CUDA both models live at once and take their steps in turn; on a GPU one at a time (memory)
    if cuda:
        times = {}
        for share, cfg in cfgs.items():
            times[share] = run(cfg, tokens, docs, iters, response=response)[0]
            gc.collect()
            torch.cuda.empty_cache()
    else:
        times = run_interleaved(cfgs, tokens, docs, iters, response)
    prompt = tokens // docs - response
    rows_run = {False: tokens // docs * docs, True: prompt - 1 + docs * (response + 1)}
    case = "tiny" if args.dry_run else (
        f"{'CPU shape (H ' + str(shape['hidden_size']) + ')' if shape else 'Qwen3-4B shape'}, {layers} layers, "
        f"a {prompt}-token prompt x {docs} responses of {response}")
    med = {share: statistics.median(t) for share, t in times.items()}
    rows = []
    for share in (False, True):
        impl = "shared prompt" if share else "whole sequences"
        rows.append({"case": case, "impl": impl, "metric": "step time", "value": med[share], "unit": "s",
                     "times_s": times[share], "rows": rows_run[share],
                     **({"baseline": "whole sequences, same run", "ratio": med[False] / med[True],
                         "ratio_meaning": "whole / shared step time (> 1: faster)",
                         "rows_ratio": rows_run[False] / rows_run[True]} if share else {})})
    if not args.dry_run:
        print(f"wrote {save_results('train_step_shared_prompts', rows, args.out)}")
    print_table("One policy update: whole sequences vs a prompt packed once (golong Actor.update)", [
        {"impl": r["impl"], "step": f"{r['value']:.4g} s", "rows": r["rows"],
         "ratio": f"{r['ratio']:.3f}" if "ratio" in r else "",
         "rows whole / shared": f"{r['rows_ratio']:.3f}" if "rows_ratio" in r else ""} for r in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
