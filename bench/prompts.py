"""Host side of the data path at the recipe's scale (CPU): tokenizing, the prompt cache, and the host memory that
prompts and a step's rollouts hold on every rank.

    python -m bench.prompts              # 2,000 records of ~6K tokens; 64 prompts of 50K tokens x 16 responses
    python -m bench.prompts --dry-run    # tiny sizes, nothing saved

GoLongRL trains on ~23K records with prompts up to 160K tokens (~1.4B prompt tokens), and every rank holds
them all; a step keeps each generation batch's rollouts for its metrics. Figures and their same-run peers:

  tokenize      build_prompts (chat template + tokenizer, the demo tokenizer) tokens/s, batched (a fast tokenizer
                encodes a batch on all cores) vs one text a call
  cache read    load_prompts of the same prompts from the prompt cache (a restart): seconds; ratio: tokenize
                time / read time
  cache write   save_prompts: seconds
  held prompts  bytes a prompt token holds once built (RSS after malloc_trim), at Qwen3-vocabulary ids (uniform in
                [0, 151936): the demo tokenizer's small ids would be cached int objects): golong's int32 arrays vs
                Python lists of ints (what golong held before)
  rollouts      bytes a generation batch's rollouts hold beyond the prompts themselves: golong's (each response
                references its prompt's array; response ids / logprobs int32 / fp32 arrays) vs each response
                copying its prompt's ids into a list and holding lists (what golong held before)
  gather        a generation batch's results as every rank unpickles them: int32 / fp32 arrays vs lists of numbers
  shares        rollout work of the heaviest rank / the mean: rollout_share (cut by work) vs equal request counts
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import held_extra_memory, print_table, save_results

QWEN3_VOCAB = 151_936


def _ratio(peer: float, ours: float) -> float:
    return peer / ours if ours > 0 else float("nan")  # tiny --dry-run sizes grow RSS by no whole page


def bench_tokenize(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    from golong.data.prompts import build_prompts, load_prompts, save_prompts
    from golong.data.synthetic import generate
    from golong.data.tokenizer import build_demo_tokenizer

    tok = build_demo_tokenizer()
    records = generate(args.records, args.record_tokens, seed=0)
    import golong.data.prompts as prompts_module

    limit = 4 * args.record_tokens  # nothing truncated: the figure is the plain tokenizing rate
    batch = prompts_module.ENCODE_BATCH
    try:  # one text per tokenizer call, as build_prompts did before it batched: the same-run baseline
        prompts_module.ENCODE_BATCH = 1
        t0 = time.perf_counter()
        single = build_prompts(records, tok, limit)
        t_single = time.perf_counter() - t0
    finally:
        prompts_module.ENCODE_BATCH = batch
    t0 = time.perf_counter()
    built = build_prompts(records, tok, limit)
    t_tok = time.perf_counter() - t0
    assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(single, built))
    tokens = sum(len(p.input_ids) for p in built)
    case = f"{len(records)} records, {tokens / 1e6:.2f}M tokens"
    where = Path(tempfile.mkdtemp(prefix="golong-bench-prompts-")) / "train-key"
    try:
        t0 = time.perf_counter()
        save_prompts(built, where)
        t_write = time.perf_counter() - t0
        reads = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            got = load_prompts(where, records)
            reads.append(time.perf_counter() - t0)
        t_read = sorted(reads)[len(reads) // 2]
        assert got is not None and all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(got, built))
    finally:
        shutil.rmtree(where.parent, ignore_errors=True)
    rows += [
        {"case": case, "impl": f"build_prompts ({batch} texts a call)", "metric": "tokens/s", "value": tokens / t_tok,
         "unit": "tokens/s", "seconds": t_tok, "baseline": "one text a call", "ratio": _ratio(t_single, t_tok),
         "ratio_meaning": "peer / ours", "note": "demo tokenizer, one process"},
        {"case": case, "impl": "one text a call", "metric": "tokens/s", "value": tokens / t_single, "unit": "tokens/s",
         "seconds": t_single},
        {"case": case, "impl": "prompt cache read", "metric": "time", "value": t_read, "unit": "s",
         "baseline": "build_prompts", "ratio": _ratio(t_tok, t_read), "ratio_meaning": "peer / ours"},
        {"case": case, "impl": "prompt cache write", "metric": "time", "value": t_write, "unit": "s"},
    ]


def bench_held_prompts(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    from golong.data.prompts import EncodedPrompt

    rng = np.random.default_rng(0)
    n, length = args.held_prompts, args.held_tokens
    ids = [rng.integers(0, QWEN3_VOCAB, length, dtype=np.int32) for _ in range(n)]
    tokens = n * length
    case = f"{n} prompts x {length} tokens, Qwen3-vocabulary ids"
    ours, held = held_extra_memory(lambda: [EncodedPrompt(a.copy(), i, None) for i, a in enumerate(ids)])
    del held
    lists, held = held_extra_memory(lambda: [a.tolist() for a in ids])
    del held
    rows += [
        {"case": case, "impl": "int32 arrays (golong)", "metric": "bytes/token", "value": ours / tokens,
         "unit": "B", "baseline": "lists of ints", "ratio": _ratio(lists, ours), "ratio_meaning": "peer / ours"},
        {"case": case, "impl": "lists of ints", "metric": "bytes/token", "value": lists / tokens, "unit": "B"},
    ]


def bench_rollouts(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    from golong.actor import Rollout

    rng = np.random.default_rng(1)
    p, n, plen, rlen = args.rollout_prompts, args.responses, args.rollout_prompt_tokens, args.response_tokens
    prompts = [rng.integers(0, QWEN3_VOCAB, plen, dtype=np.int32) for _ in range(p)]
    # what an engine returns: token id lists and logprob lists per response
    results = [(rng.integers(0, QWEN3_VOCAB, rlen).tolist(), (-rng.random(rlen)).tolist()) for _ in range(p * n)]
    case = f"{p} prompts of {plen} tokens x {n} responses of {rlen}"

    def golong_rollouts() -> list[Rollout]:  # as Trainer.collect_rollouts builds them
        return [Rollout(prompts[j // n], np.asarray(toks, dtype=np.int32), np.asarray(lps, dtype=np.float32),
                        group=j // n, task="t") for j, (toks, lps) in enumerate(results)]

    prompt_lists = [a.tolist() for a in prompts]  # the prompts as they were held then (not counted below)

    def copied_rollouts() -> list[Rollout]:  # each response with its own list of its prompt's ids, lists kept
        return [Rollout(list(prompt_lists[j // n]), list(toks), list(lps), group=j // n, task="t")
                for j, (toks, lps) in enumerate(results)]

    ours, held = held_extra_memory(golong_rollouts)
    assert all(r.prompt_ids is prompts[j // n] for j, r in enumerate(held))
    del held
    copied, held = held_extra_memory(copied_rollouts)
    del held
    rows += [
        {"case": case, "impl": "shared prompt arrays (golong)", "metric": "held", "value": ours / 2**20,
         "unit": "MiB", "baseline": "copied lists", "ratio": _ratio(copied, ours), "ratio_meaning": "peer / ours"},
        {"case": case, "impl": "copied lists", "metric": "held", "value": copied / 2**20, "unit": "MiB"},
    ]


def bench_gather(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """What every rank unpickles of a generation batch's results (all_gather_object): golong's int32 / fp32 arrays
    vs lists of Python numbers."""
    import pickle

    rng = np.random.default_rng(2)
    k, rlen = args.rollout_prompts * args.responses, args.response_tokens
    lists = [(j, rng.integers(0, QWEN3_VOCAB, rlen).tolist(), (-rng.random(rlen)).tolist()) for j in range(k)]
    arrays = [(j, np.asarray(t, dtype=np.int32), np.asarray(lp, dtype=np.float32)) for j, t, lp in lists]
    case = f"gather of {k} responses of {rlen} tokens"
    sizes, times = {}, {}
    for name, obj in (("arrays", arrays), ("lists", lists)):
        blob = pickle.dumps(obj)
        sizes[name] = len(blob)
        reads = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            pickle.loads(blob)
            reads.append(time.perf_counter() - t0)
        times[name] = sorted(reads)[len(reads) // 2]
    mtok = k * rlen / 1e6
    rows += [
        {"case": case, "impl": "int32 / fp32 arrays (golong)", "metric": "pickled", "value": sizes["arrays"] / mtok
         / 2**20, "unit": "MiB / 1M tokens", "baseline": "lists of numbers",
         "ratio": _ratio(sizes["lists"], sizes["arrays"]), "ratio_meaning": "peer / ours"},
        {"case": case, "impl": "lists of numbers", "metric": "pickled", "value": sizes["lists"] / mtok / 2**20,
         "unit": "MiB / 1M tokens"},
        {"case": case, "impl": "int32 / fp32 arrays (golong)", "metric": "unpickle", "value": times["arrays"] / mtok,
         "unit": "s / 1M tokens", "baseline": "lists of numbers", "ratio": _ratio(times["lists"], times["arrays"]),
         "ratio_meaning": "peer / ours"},
        {"case": case, "impl": "lists of numbers", "metric": "unpickle", "value": times["lists"] / mtok,
         "unit": "s / 1M tokens"},
    ]


def bench_rollout_share(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """The heaviest rank's rollout work / the mean: golong.parallel.rollout_share (contiguous, cut by each request's
    prompt + response budget) vs equal request counts, prompt lengths lognormal (mean ~55K) in [4K, 160K]."""
    from golong.parallel import rollout_share

    p, n, world = args.share_prompts, args.responses, args.world
    rng = np.random.default_rng(3)
    lens = np.clip(rng.lognormal(10.7, 0.7, p), 4096, 160_000).astype(int)
    weights = [int(lens[j // n]) + args.response_tokens for j in range(p * n)]
    total = p * n
    by_work = [sum(weights[j] for j in rollout_share(weights, r, world)) for r in range(world)]
    by_count = [sum(weights[r * total // world:(r + 1) * total // world]) for r in range(world)]
    case = f"{p} prompts x {n} samples on {world} ranks"
    rows += [
        {"case": case, "impl": "rollout_share (golong)", "metric": "heaviest / mean", "value": max(by_work)
         / (sum(by_work) / world), "unit": "", "baseline": "equal counts",
         "ratio": _ratio(max(by_count), max(by_work)), "ratio_meaning": "peer / ours"},
        {"case": case, "impl": "equal counts", "metric": "heaviest / mean",
         "value": max(by_count) / (sum(by_count) / world), "unit": ""},
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--record-tokens", type=int, default=6000, help="context length of each synthetic record")
    ap.add_argument("--iters", type=int, default=5, help="cache reads timed (median)")
    ap.add_argument("--held-prompts", type=int, default=200)
    ap.add_argument("--held-tokens", type=int, default=50_000)
    ap.add_argument("--rollout-prompts", type=int, default=64)
    ap.add_argument("--responses", type=int, default=16)
    ap.add_argument("--rollout-prompt-tokens", type=int, default=50_000)
    ap.add_argument("--response-tokens", type=int, default=2_000)
    ap.add_argument("--share-prompts", type=int, default=128, help="prompts of the rollout-share balance case")
    ap.add_argument("--world", type=int, default=8, help="ranks of the rollout-share balance case")
    ap.add_argument("--out", default=None, help="results directory (default bench/results)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, nothing saved")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.records, args.record_tokens, args.iters = 8, 200, 1
        args.held_prompts, args.held_tokens = 4, 1000
        args.rollout_prompts, args.responses, args.rollout_prompt_tokens, args.response_tokens = 2, 2, 1000, 100
        args.share_prompts, args.world = 8, 4
    rows: list[dict[str, Any]] = []
    bench_tokenize(args, rows)
    bench_held_prompts(args, rows)
    bench_rollouts(args, rows)
    bench_gather(args, rows)
    bench_rollout_share(args, rows)
    if not args.dry_run:
        print(f"results: {save_results('prompts', rows, args.out)}")
    print_table("host data path (CPU): tokenizing, prompt cache, held memory", rows,
                ["case", "impl", "metric", "value", "unit", "baseline", "ratio", "ratio_meaning", "note"])


if __name__ == "__main__":
    main()
