"""golong.parallel: batch planning, and the FSDP2 / context-parallel update against one rank.

The distributed tests run the trainer's real update (golong.actor.Actor: micro-batching, old
logprobs, rollout IS weights, clipped loss, grad clipping, AdamW) on the same fixed batch on 1 rank,
on 2 FSDP ranks and on a cp=2 ring, and compare the parameters afterwards.
"""

from __future__ import annotations

import math
import random
import re

import pytest
import torch

from golong.parallel import balance, pack, plan_micro_batches, rollout_share
from tests.distributed import run_distributed


# ------------------------------------------------------------------------------------- planning
def test_balance_splits_near_evenly_and_covers_everything():
    rng = random.Random(0)
    lengths = [rng.randint(1, 500) for _ in range(37)]
    parts = balance(lengths, 3)
    assert sorted(i for p in parts for i in p) == list(range(37))
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(lengths)  # greedy LPT bound


def test_balance_places_the_longest_first_on_the_lightest_part_ties_on_the_lowest():
    # LPT by hand: 5 -> part 0, 4 -> part 1, the 1s each to the lighter part (a tie at 5 / 5: part 0). The bound
    # above holds for any greedy order: shortest first gave loads 7 / 5, a count balance [[0, 1, 3], [2, 4]] too
    assert balance([5, 1, 1, 1, 4], 2) == [[0, 2], [1, 3, 4]]
    assert balance([3, 3, 2, 2, 2], 2) == [[0, 2, 4], [1, 3]]


@pytest.mark.parametrize("prompts, n, world", [(16, 16, 8), (5, 16, 8), (7, 3, 4), (3, 2, 8), (1, 1, 2), (0, 4, 2),
                                               (128, 16, 8)])
@pytest.mark.parametrize("lengths", ["equal", "lognormal"])
def test_rollout_share_keeps_a_prompts_samples_on_one_rank_and_balances_work(prompts, n, world, lengths):
    """Requests are prompt-major (a prompt's n samples adjacent), each weighing its prompt's length + the response
    budget: each rank gets a contiguous block, every request once; the blocks' weights are within one request of
    an equal share (equal weights: counts within one); a prompt's samples span as few ranks as the cuts allow, so
    the prefix cache prefills it once. The round-robin deal it replaces gave every rank a sample of every prompt."""
    import random

    rng = random.Random(prompts * 1000 + n * 10 + world)
    lens = [8192] * prompts if lengths == "equal" else \
        [min(160_000, max(4096, int(rng.lognormvariate(10.7, 0.7)))) for _ in range(prompts)]
    weights = [lens[j // n] + 4096 for j in range(prompts * n)]
    total = prompts * n
    shares = [rollout_share(weights, r, world) for r in range(world)]
    assert [j for s in shares for j in s] == list(range(total))
    loads = [sum(weights[j] for j in s) for s in shares]
    if total:
        assert max(loads) <= sum(weights) / world + max(weights)
    if lengths == "equal":
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    ranks_of = [{r for r, s in enumerate(shares) for j in s if j // n == p} for p in range(prompts)]
    if lengths == "equal" and total % world == 0 and (total // world) % n == 0:  # blocks of whole prompts
        assert all(len(rs) == 1 for rs in ranks_of)
    # a prompt reaches another rank only across a cut: prefills in all <= prompts + world - 1
    assert sum(map(len, ranks_of)) <= prompts + world - 1
    if prompts == 128:
        old = [{j % world for j in range(p * n, (p + 1) * n)} for p in range(prompts)]
        assert sum(map(len, old)) == prompts * world  # what round-robin cost: every prompt on every rank
        by_count = [sum(weights[j] for j in range(r * total // world, (r + 1) * total // world)) for r in range(world)]
        if lengths == "lognormal":  # equal counts leave the slowest engine well above the mean; weights do not
            assert max(by_count) / (sum(by_count) / world) > 1.1 > max(loads) / (sum(loads) / world)


def test_rollout_share_deals_out_requests_of_no_weight():
    # no cost known (all weights 0): counts within one, in order; a request of weight 0 at the very end (its
    # midpoint at the whole total) still belongs to the last rank, not to a rank past it
    assert [list(rollout_share([0] * 5, r, 2)) for r in range(2)] == [[0, 1], [2, 3, 4]]
    assert [list(rollout_share([1, 1, 0], r, 2)) for r in range(2)] == [[0], [1, 2]]


def test_pack_respects_budget_and_is_deterministic():
    rng = random.Random(1)
    lengths = [rng.randint(1, 90) for _ in range(50)] + [130]  # one longer than the budget
    bins = pack(range(len(lengths)), lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert len(b) == 1 or sum(lengths[i] for i in b) <= 100
    assert bins == pack(range(len(lengths)), lengths, 100)
    # first-fit decreasing by hand: sequences that fill the budget exactly share a micro-batch (a fit counted
    # strictly below the budget ran extra micro-batches, each a forward and backward FSDP pads onto every rank)
    assert pack([0, 1, 2], [5, 3, 8], 8) == [[2], [0, 1]]
    assert pack(range(5), [6, 2, 4, 4, 9], 10) == [[4], [0, 2], [1, 3]]


def test_plan_pads_ranks_to_the_same_count():
    lengths = [100, 100, 100, 5]  # rank 0: [100], [100]; rank 1: [100, 5] and a dummy
    plans = [plan_micro_batches(lengths, 2, r, 120) for r in range(2)]
    assert len(plans[0]) == len(plans[1]) == 2
    members = sorted(i for p in plans for m in p for i in m)
    assert members == list(range(4))
    assert any(m == [] for p in plans for m in p)  # the lighter rank runs an empty (dummy) micro-batch


# ------------------------------------------------------------------------------ distributed parity
def _run_updates(rank: int, world: int, cp: int, out: str, steps: int, on_policy: bool = False,
                 kl_coef: float = 0.0, agg: str = "token-mean", keep_attention: bool = False,
                 policy: str = "vanilla", share_prompts: bool = True) -> None:
    from golong.actor import Actor
    from golong.build import build_model
    from golong.parallel import init_parallel
    from tests.golong.trainer_helpers import fixed_rollouts, tiny_config

    # 2 mini-batches x 2 PPO epochs: the off-policy path (old-logprob pass) and 4 optimizer steps;
    # a small micro-batch budget so each rank packs several micro-batches (and some dummies).
    # on_policy: one mini-batch, one epoch (the recipe's): the old logprobs are the update's own, no pass of theirs
    cfg = tiny_config(parallel__cp=cp, trainer__mini_batch_prompts=100 if on_policy else 3,
                      trainer__micro_batch_tokens=48, algo__ppo_epochs=1 if on_policy else 2,
                      algo__rollout_is="mask", optim__grad_clip=0.5, algo__kl_coef=kl_coef, algo__loss_agg_mode=agg,
                      parallel__activation_checkpointing=cp > 1,  # recomputation must not change a thing
                      parallel__ac_keep_attention=keep_attention, algo__policy_loss=policy,
                      trainer__share_prompts=share_prompts,
                      **({"algo__clip_low": 3e-4, "algo__clip_high": 4e-4} if policy == "gspo" else {}))
    dims = init_parallel(-1, cp, "gloo")
    # rank = dp_rank x cp + cp_rank: a cp group is cp consecutive ranks (one node: the ring stays on NVLink)
    assert (dims.rank, dims.world_size, dims.dp_rank, dims.cp_rank) == (rank, world, rank // cp, rank % cp)
    if cp > 1:
        assert torch.distributed.get_process_group_ranks(dims.cp_group) == list(range(rank - rank % cp,
                                                                                   rank - rank % cp + cp))
        _check_cp_gather(dims)
    reference = build_model(cfg, dims, reference=True) if kl_coef else None
    actor = Actor(build_model(cfg, dims), dims, cfg, reference)
    assert actor.model.keep_attention == keep_attention
    if on_policy:
        def no_pass(*args, **kwargs):
            raise AssertionError("an old-logprob pass on-policy")

        actor.compute_logprobs = no_pass
    init = {n: t.clone() for n, t in actor.full_state()}
    rollouts = fixed_rollouts()
    history = [actor.update(rollouts, "pg") for _ in range(steps)]
    params = {n: t.clone() for n, t in actor.full_state()}
    if rank == 0:
        torch.save({"init": init, "params": params, "history": history}, out)


def _check_cp_gather(dims) -> None:
    from golong.parallel import cp_gather, cp_shard

    cu = torch.tensor([0, 5, 6, 19, 30], dtype=torch.int32)  # odd lengths incl. a 1-token document
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
    local = cp_shard(x, cu, dims.cp_rank, dims.cp_size)
    assert 0 < local.shape[0] < 30
    assert torch.equal(cp_gather(local, cu, dims.cp_group), x)


def _compare(a: dict, b: dict, tol: float) -> None:
    for name, p in a["params"].items():
        err = (p - b["params"][name]).abs().max().item()
        assert err <= tol, f"{name}: max |diff| {err:.2e} > {tol}"
    for ha, hb in zip(a["history"], b["history"]):
        for key in ("actor/loss", "actor/pg_clipfrac", "actor/entropy", "actor/grad_norm", "rollout_is/weight_mean",
                    *(["actor/kl_loss"] if "actor/kl_loss" in ha else [])):
            assert abs(ha[key] - hb[key]) <= 1e-4 * max(1.0, abs(ha[key])), (key, ha[key], hb[key])


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("p") / "one.pt")
    run_distributed(_run_updates, 1, 1, out, 2)
    return torch.load(out)


@pytest.mark.distributed
def test_fsdp_two_ranks_match_one_rank(one_rank, tmp_path):
    out = str(tmp_path / "two.pt")
    run_distributed(_run_updates, 2, 1, out, 2)
    two = torch.load(out)
    h = one_rank["history"][0]
    assert h["actor/optimizer_steps"] == 4 and h["actor/skipped_steps"] == 0
    assert 0 < h["rollout_is/weight_mean"] and h["rollout_is/masked_frac"] > 0  # IS weights really active
    moved = min((one_rank["params"][n] - one_rank["init"][n]).abs().max().item() for n in two["params"])
    assert moved > 1e-3  # every parameter really trained (lr 1e-2), so the tolerance below means something
    _compare(one_rank, two, 1e-5)


@pytest.mark.distributed
def test_responses_sharing_their_prompts_rows_update_as_whole_sequences(one_rank, tmp_path):
    """trainer.share_prompts (on in every run here): a prompt's responses in a micro-batch pack the prompt once. The
    update (old-logprob pass, IS weights, 4 optimizer steps) matches packing each sequence whole, on fewer rows."""
    out = str(tmp_path / "whole.pt")
    run_distributed(_run_updates, 1, 1, out, 2, False, 0.0, "token-mean", False, "vanilla", False)
    whole = torch.load(out)
    _compare(whole, one_rank, 1e-4)  # as under cp: the same sums in another order (1.5e-5 here after 4 Adam steps)
    assert whole["history"][0]["actor/packed_rows_fraction"] == 1.0
    assert 0.5 < one_rank["history"][0]["actor/packed_rows_fraction"] < 0.9


@pytest.mark.distributed
def test_context_parallel_two_ranks_match_one_rank(one_rank, tmp_path):
    out = str(tmp_path / "cp.pt")
    run_distributed(_run_updates, 2, 2, out, 2)
    _compare(one_rank, torch.load(out), 1e-4)


@pytest.mark.distributed
def test_on_policy_context_parallel_needs_no_old_logprob_pass(tmp_path):
    """One mini-batch, one PPO epoch, rollout IS on (the recipe): under cp the IS weights take the update's own
    logprobs gathered over the ring (was: a whole extra forward over the batch); the update matches one rank, also
    under FSDP2 with the activation checkpointing that keeps the attention (parallel.ac_keep_attention)."""
    runs = {}
    for world, cp in ((1, 1), (2, 2)):
        out = str(tmp_path / f"{world}_{cp}.pt")
        run_distributed(_run_updates, world, cp, out, 2, True, 0.0, "token-mean", cp > 1)
        runs[world, cp] = torch.load(out)
    h = runs[1, 1]["history"][0]
    assert h["actor/optimizer_steps"] == 1 and h["rollout_is/masked_frac"] > 0 and h["rollout_is/veto_frac"] >= 0
    assert "time/old_logprob_s" not in h
    _compare(runs[1, 1], runs[2, 2], 1e-4)


@pytest.mark.distributed
def test_kl_to_the_reference_policy_under_fsdp_and_context_parallel_matches_one_rank(tmp_path):
    """algo.kl_coef > 0: the reference policy's pass (sharded like the policy, whole sequences gathered over the
    ring) and the KL term give the same update on 2 ranks with cp 2 as on one; off-policy (2 mini-batches x 2
    epochs), so the KL grows from 0 (the policy starts at the reference) within the update."""
    runs = {}
    for world, cp in ((1, 1), (2, 2)):
        out = str(tmp_path / f"{world}_{cp}.pt")
        run_distributed(_run_updates, world, cp, out, 2, False, 0.5)
        runs[world, cp] = torch.load(out)
    first, second = runs[1, 1]["history"]
    assert 0 < first["actor/kl_loss"] < second["actor/kl_loss"], (first, second)
    assert first["time/ref_logprob_s"] > 0 and first["actor/optimizer_steps"] == 4
    _compare(runs[1, 1], runs[2, 2], 1e-4)


def _reference_from_checkpoint(rank: int, world: int, path: str) -> None:
    from golong.actor import Actor
    from golong.build import build_model, reference_dtype
    from golong.parallel import init_parallel
    from tests.golong.trainer_helpers import fixed_rollouts, tiny_config

    # bf16 compute is the default (on a GPU; FSDP computes in fp32 on CPU): the reference must hold what the policy
    # computes with, not its own rounding of the checkpoint
    cfg = tiny_config(parallel__param_dtype="bfloat16", algo__kl_coef=0.1, trainer__micro_batch_tokens=64)
    cfg.model.path, cfg.model.scratch = path, None
    dims = init_parallel(-1, 1, "gloo")
    reference = build_model(cfg, dims, reference=True)
    actor = Actor(build_model(cfg, dims), dims, cfg, reference)
    assert {p.dtype for p in reference.parameters()} == {reference_dtype(cfg)} == {torch.float32}
    rollouts = fixed_rollouts(n_prompts=3, n=2, seed=1, vocab=1000)
    idx = list(range(len(rollouts)))
    policy, ref = actor.compute_logprobs(rollouts, idx), actor.compute_logprobs(rollouts, idx, reference)
    assert all(torch.equal(policy[i], ref[i]) for i in idx)
    assert actor.update(rollouts, "pg")["actor/kl_loss"] == 0.0  # one on-policy step: the policy is the reference
    with pytest.raises(ValueError, match="algo.kl_coef > 0 needs the reference policy"):
        Actor(actor.model, dims, cfg).update(rollouts, "pg")


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_the_reference_policy_is_the_checkpoint_the_policy_starts_from(tmp_path, kind):
    """model.path: the reference is built on the meta device and streamed in like the policy; both compute with the
    same weights (tied embeddings, MoE experts, YaRN), so their logprobs agree bitwise before the first update."""
    from tests.golong.model_fixtures import build_hf

    build_hf(kind).save_pretrained(tmp_path / kind)
    run_distributed(_reference_from_checkpoint, 1, str(tmp_path / kind))


@pytest.mark.distributed
def test_sequence_mean_aggregation_under_fsdp_and_context_parallel_matches_one_rank(one_rank, tmp_path):
    """algo.loss_agg_mode=seq-mean-token-mean: each token weighs 1 / (S |o_i|), sharded over the ring like the
    advantages; 2 ranks with cp 2 give one rank's update, which differs from the token mean's."""
    runs = {}
    for world, cp in ((1, 1), (2, 2)):
        out = str(tmp_path / f"{world}_{cp}.pt")
        run_distributed(_run_updates, world, cp, out, 2, False, 0.0, "seq-mean-token-mean")
        runs[world, cp] = torch.load(out)
    _compare(runs[1, 1], runs[2, 2], 1e-4)
    assert runs[1, 1]["history"][0]["actor/loss"] != pytest.approx(one_rank["history"][0]["actor/loss"], rel=1e-3)


@pytest.mark.distributed
def test_gspo_under_fsdp_and_context_parallel_matches_one_rank(one_rank, tmp_path):
    """algo.policy_loss=gspo: a response's ratio is the mean log ratio over its tokens on both ranks of the ring (an
    all-reduce over the cp group), so 2 ranks with cp 2 give one rank's update, clipped at 3e-4 / 4e-4 on some
    responses; it differs from the token ratio's update."""
    runs = {}
    for world, cp in ((1, 1), (2, 2)):
        out = str(tmp_path / f"{world}_{cp}.pt")
        run_distributed(_run_updates, world, cp, out, 2, False, 0.0, "seq-mean-token-mean", False, "gspo")
        runs[world, cp] = torch.load(out)
    _compare(runs[1, 1], runs[2, 2], 1e-4)
    assert all(0 < h["actor/pg_clipfrac"] < 1 for h in runs[1, 1]["history"])
    assert runs[1, 1]["history"][0]["actor/loss"] != pytest.approx(one_rank["history"][0]["actor/loss"], rel=1e-3)


@pytest.mark.distributed
def test_fsdp_and_context_parallel_together_match_one_rank(one_rank, tmp_path):
    """dp_shard 2 x cp 2: two rings of two, each with its own micro-batch plan (unequal token counts, dummies)."""
    out = str(tmp_path / "dp_cp.pt")
    run_distributed(_run_updates, 4, 2, out, 2)
    _compare(one_rank, torch.load(out), 1e-4)


def _tiny_batch_run(rank: int, world: int, cp: int, out: str) -> None:
    from golong.actor import Actor, Rollout
    from golong.build import build_model
    from golong.parallel import init_parallel
    from tests.golong.trainer_helpers import tiny_config

    # adam_eps 1e-4: the first mini-batch scores only a row that attends to itself alone, so its q/k gradients are
    # rounding noise (~1e-8 on one rank, exactly 0 on the ring); at the default eps 1e-8 Adam turns that noise into
    # updates of ~lr / 2 that differ between the runs, and every later step with them
    cfg = tiny_config(parallel__cp=cp, trainer__mini_batch_prompts=1, algo__rollout_is="mask", optim__grad_clip=0.5,
                      optim__adam_eps=1e-4)
    dims = init_parallel(-1, cp, "gloo")
    actor = Actor(build_model(cfg, dims), dims, cfg)
    # one sequence per mini-batch, 2 and 3 tokens long: on 2 dp ranks one rank runs only dummy micro-batches;
    # on a cp=3 ring the 2-token document leaves cp rank 1 with no rows at all
    rollouts = [Rollout([5], [7], [-6.8], group=0, task="t", advantage=1.0),
                Rollout([3, 9], [4], [-7.0], group=1, task="t", advantage=-0.5)]
    metrics = actor.update(rollouts, "pg")
    params = {n: t.clone() for n, t in actor.full_state()}
    if rank == 0:
        torch.save({"params": params, "metrics": metrics}, out)


@pytest.mark.distributed
def test_batches_with_fewer_sequences_than_ranks_or_tokens_than_cp_chunks(tmp_path):
    """Metric keys differ per rank when a rank has nothing to score (their all-reduce sizes did not match), and an
    empty cp shard has no max: the update must still run and match one rank."""
    runs = {}
    for world, cp in [(1, 1), (2, 1), (3, 3)]:
        run_distributed(_tiny_batch_run, world, cp, str(tmp_path / f"{world}_{cp}.pt"))
        runs[world, cp] = torch.load(tmp_path / f"{world}_{cp}.pt")
    one = runs[1, 1]
    assert "mismatch/max_abs" in one["metrics"] and one["metrics"]["actor/optimizer_steps"] == 2
    for key, run in runs.items():
        for name, p in one["params"].items():
            assert (p - run["params"][name]).abs().max().item() <= 1e-4, (key, name)  # as the cp test above
        for k, v in one["metrics"].items():
            if not k.startswith("time/"):
                assert run["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (key, k, run["metrics"][k], v)


# ------------------------------------------------------------------ the update vs the DESIGN formulas
def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()


def _grads(model) -> dict:
    return {n: _full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference_loss(model, rollouts, old, temperature, ref=None, kl_coef=0.0, agg="token-mean", max_tokens=0,
                    ent_coef=0.0, gspo=False):
    """The DESIGN.md policy loss written out, one sequence at a time: logprobs of the response tokens at
    temperature T (the model's fused head, tested on its own in tests/kernels), rollout IS (mask [0.5, 5],
    veto 1e-4 per sequence), clip 0.2 / 0.28, dual clip 3, + kl_coef x k3 KL to the reference logprobs `ref`
    (exp(d) - d - 1, d = ref - logprob) - ent_coef x entropy, token mean over the mini-batch's response tokens
    (agg: verl's other loss_agg_modes over its S responses: mean of each response's token mean, sum / S,
    sum / (S x max_tokens)). `rollouts` (and old, ref, by position): one mini-batch. Returns (loss, the logprobs).
    gspo: GSPO's sequence-level objective instead (no rollout IS, no dual clip, clip 3e-4 / 4e-4): the response's
    ratio s = exp(mean(logpi - logpi_old)) differentiated whole, |o_i| x max(-A s, -A clip(s)) in place of the
    token terms' sum."""
    total, n_tokens, lps = 0.0, sum(len(r.response_ids) for r in rollouts), []
    per_seq = {"token-mean": lambda n: n_tokens, "seq-mean-token-mean": lambda n: len(rollouts) * n,
               "seq-mean-token-sum": lambda n: len(rollouts),
               "seq-mean-token-sum-norm": lambda n: len(rollouts) * max_tokens}[agg]  # a response's divisor
    for i, r in enumerate(rollouts):
        ids = torch.tensor(r.prompt_ids + r.response_ids)
        p = len(r.prompt_ids)
        targets = torch.full_like(ids, -100)
        targets[p - 1:-1] = ids[p:]  # position t predicts token t + 1
        lp, ent = model(ids, torch.tensor([0, len(ids)], dtype=torch.int32), targets=targets, temperature=temperature)
        lp, ent = lp[p - 1:-1].double(), ent[p - 1:-1].double()
        lps.append(lp.detach())
        if old is None:
            continue
        rho_is = torch.exp(old[i] - torch.tensor(r.rollout_logprobs, dtype=torch.float64))
        w = torch.where((rho_is >= 0.5) & (rho_is <= 5.0), rho_is, torch.zeros_like(rho_is))
        if bool((rho_is < 1e-4).any()):
            w = torch.zeros_like(w)
        a = r.advantage
        if gspo:
            s = torch.exp((lp - old[i]).mean())
            seq = len(lp) * torch.maximum(-a * s, -a * s.clamp(1 - 3e-4, 1 + 4e-4))
        else:
            rho = torch.exp(lp - old[i])
            per_tok = torch.maximum(-a * rho, -a * rho.clamp(0.8, 1.28))
            if a < 0:
                per_tok = torch.minimum(per_tok, torch.full_like(per_tok, -3.0 * a))
            seq = (per_tok * w).sum()
        if ref is not None:
            d = ref[i] - lp
            seq = seq + kl_coef * (torch.exp(d) - d - 1).sum()
        seq = seq - ent_coef * ent.sum()
        total = total + seq / per_seq(len(r.response_ids))
    return total, lps


def _update_vs_reference(rank: int, world: int, kl_coef: float = 0.0, agg: str = "token-mean", minis: int = 1,
                         ent_coef: float = 0.0, gspo: bool = False, epochs: int = 2) -> None:
    from golong.actor import Actor
    from golong.build import build_model
    from golong.parallel import init_parallel
    from tests.golong.trainer_helpers import fixed_rollouts, tiny_config

    # one mini-batch, 2 PPO epochs (off-policy: old logprobs from a pass before the update); several
    # micro-batches of 40 tokens; temperature 0.7; no grad clipping, so the gradients are the loss's
    # minis 2: two prompts a mini-batch, each step's loss over its own (S and the token count are the mini-batch's)
    # epochs 1, minis 1: on-policy, the old logprobs are the update's own, detached (no pass of theirs); epochs 1,
    # minis 2: the second mini-batch's old policy is still the one before the update, from the old-logprob pass
    on_policy = epochs == 1 and minis == 1
    cfg = tiny_config(trainer__mini_batch_prompts=100 if minis == 1 else 2, trainer__micro_batch_tokens=40,
                      algo__ppo_epochs=epochs, algo__entropy_coef=ent_coef,
                      algo__rollout_is="none" if gspo else "mask", optim__grad_clip=0.0, rollout__temperature=0.7,
                      optim__lr=1e-2 if kl_coef else 4e-2, algo__kl_coef=kl_coef, algo__loss_agg_mode=agg,
                      rollout__max_response_tokens=16, algo__policy_loss="gspo" if gspo else "vanilla",
                      algo__clip_low=3e-4 if gspo else 0.2, algo__clip_high=4e-4 if gspo else 0.28)
    dims = init_parallel(-1, 1, "gloo")
    reference = build_model(cfg, dims, reference=True) if kl_coef else None
    actor = Actor(build_model(cfg, dims), dims, cfg, reference)
    rollouts = fixed_rollouts(n_prompts=4, n=3, seed=5)
    ref = None
    if kl_coef:
        with torch.no_grad():
            _, ref = _reference_loss(reference, rollouts, None, 0.7)
            _, start = _reference_loss(actor.model, rollouts, None, 0.7)
        assert all(torch.equal(a, b) for a, b in zip(ref, start))  # the reference is the starting policy, exactly
        frozen = {n: _full(p).clone() for n, p in reference.named_parameters()}
    rollouts[2].rollout_logprobs[0] += 15.0  # a vetoed sequence
    # a stale old policy for some sequences (as after a long rollout): ratios e^1.3 ~ 3.7 reach the dual clip
    # on negative advantages and the upper clip on positive ones
    shift = [1.3 if i % 2 == 0 and not on_policy else 0.0 for i in range(len(rollouts))]
    assert {r.advantage < 0 for r in rollouts[::2]} == {True, False}
    real_logprobs = actor.compute_logprobs
    # (the old policy's pass only: the reference policy's, model=reference, is left as it is)
    actor.compute_logprobs = lambda rs, idx, model=None: real_logprobs(rs, idx, model) if model is not None else \
        {i: v - shift[i] for i, v in real_logprobs(rs, idx).items()}
    if kl_coef:  # an update first: the policy moves away from the reference, so the KL and its gradient are not 0
        actor.update(rollouts, "pg")
    with torch.no_grad():
        _, lps = _reference_loss(actor.model, rollouts, None, 0.7)
    old = [lp - s for lp, s in zip(lps, shift)]
    real_step, steps, norms = actor.optimizer.step, [], []

    def checked_step(*args, **kwargs):
        params = dict(actor.model.named_parameters())
        saved = {n: p.grad for n, p in params.items()}
        got = _grads(actor.model)
        for p in params.values():
            p.grad = None
        mini = [i for i in range(len(rollouts)) if rollouts[i].group // (4 // minis) == len(steps) % minis]
        loss, now = _reference_loss(actor.model, [rollouts[i] for i in mini], [old[i] for i in mini], 0.7,
                                    None if ref is None else [ref[i] for i in mini], kl_coef, agg, 16, ent_coef,
                                    gspo)
        if ref is not None:  # k3 stays below its clamp (10 at |d| ~ 2.5), where the formula above holds
            assert 0.1 < max((ref[i] - c).abs().max().item() for i, c in zip(mini, now)) < 2.5
        loss.backward()
        want = _grads(actor.model)
        assert sorted(got) == sorted(want) and len(want) > 10
        scale = max(g.abs().max().item() for g in want.values())
        assert scale > 1e-4
        for n in want:
            err = (got[n] - want[n]).abs().max().item()
            assert err <= 1e-4 * scale, (len(steps), n, err, scale)
        for n, p in params.items():
            p.grad = saved[n]
        steps.append(float(loss))
        norms.append(float(torch.cat([g.flatten() for g in want.values()]).norm()))
        return real_step(*args, **kwargs)

    actor.optimizer.step = checked_step
    m = actor.update(rollouts, "pg")
    assert len(steps) == epochs * minis and m["actor/optimizer_steps"] == epochs * minis
    assert m["actor/loss"] == pytest.approx(sum(steps) / len(steps), rel=1e-4)
    # grad norms: the mean and the largest over the optimizer steps (before clipping; none here)
    assert m["actor/grad_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-4)
    assert m["actor/grad_norm_max"] == pytest.approx(max(norms), rel=1e-4)
    # rollout vs trainer mismatch: the old policy's logprobs (the ones the IS weights use) against the rollout's,
    # not the policy that moves within the update; each token counted once per epoch, so the plain token mean
    rollout_lp = torch.cat([torch.tensor(r.rollout_logprobs, dtype=torch.float64) for r in rollouts])
    assert m["mismatch/kl_k1"] == pytest.approx(float((rollout_lp - torch.cat(old)).mean()), rel=1e-4, abs=1e-5)
    # every branch was exercised: IS mask and veto, the upper / lower clip, the dual clip (GSPO: the clip)
    if on_policy:  # every ratio is 1: nothing clipped
        assert m["rollout_is/veto_frac"] > 0 and m["actor/pg_clipfrac"] == 0 and "time/old_logprob_s" not in m, m
    elif gspo:
        assert "rollout_is/veto_frac" not in m and m["actor/pg_clipfrac_lower"] == 0
        assert 0 < m["actor/pg_clipfrac"] < 1, m
    else:
        assert m["rollout_is/veto_frac"] > 0 and m["rollout_is/masked_frac"] > 0
        assert m["actor/pg_clipfrac"] > 0 and m["actor/pg_clipfrac_lower"] > 0, m
    if kl_coef:
        assert m["actor/kl_loss"] > 1e-3 and "time/ref_logprob_s" in m, m
        # actor/loss = pg_loss + kl_coef x kl_loss (- entropy_coef x the aggregated entropy), over optimizer steps
        if not ent_coef:
            assert m["actor/loss"] == pytest.approx(m["actor/pg_loss"] + kl_coef * m["actor/kl_loss"], rel=1e-5)
        assert all(torch.equal(_full(p), frozen[n]) for n, p in reference.named_parameters())  # it stays frozen
        assert not any(p.requires_grad for p in reference.parameters())
    else:
        assert "actor/kl_loss" not in m and "time/ref_logprob_s" not in m


@pytest.mark.distributed
@pytest.mark.parametrize("kl_coef, agg, minis, ent_coef, gspo", [
    (0.0, "token-mean", 1, 0.0, False), (0.3, "token-mean", 1, 0.0, False),
    (0.0, "seq-mean-token-mean", 2, 0.02, False), (0.3, "seq-mean-token-sum", 2, 0.0, False),
    (0.3, "seq-mean-token-sum-norm", 1, 0.02, False), (0.0, "seq-mean-token-mean", 2, 0.0, True),
    (0.3, "token-mean", 1, 0.02, True)])
def test_actor_update_gradients_match_the_design_formulas(kl_coef, agg, minis, ent_coef, gspo):
    """The trainer's real update (micro-batching, target shift, temperature, old logprobs, rollout IS weights,
    clipped loss, KL to the reference policy, an entropy bonus, global token mean or another algo.loss_agg_mode,
    one or two mini-batches; GSPO's sequence ratio) against the loss written out from DESIGN.md (GSPO: its
    sequence-level objective), one sequence at a time."""
    run_distributed(_update_vs_reference, 1, kl_coef, agg, minis, ent_coef, gspo)


@pytest.mark.distributed
@pytest.mark.parametrize("minis", [1, 2])
def test_one_epoch_updates_match_the_design_formulas(minis):
    """One PPO epoch. One mini-batch (on-policy, the recipe): no old-logprob pass, the ratio's denominator is the
    update's own logprob. Two: the second mini-batch's old policy is the one before the update (its old-logprob
    pass), not the policy the first step moved (whose ratios would all be 1: no clipping, no staleness seen)."""
    run_distributed(_update_vs_reference, 1, 0.0, "token-mean", minis, 0.0, False, 1)


# ------------------------------------------------------------------------------ rollout-IS metrics
def _is_metric_run(rank: int, world: int, budgets: list[int], out: str, level: str = "token", cp: int = 1) -> None:
    from golong.actor import Actor
    from golong.build import build_model
    from golong.parallel import init_parallel
    from tests.golong.trainer_helpers import fixed_rollouts, tiny_config

    cfg = tiny_config(trainer__mini_batch_prompts=100, algo__ppo_epochs=1, algo__rollout_is="mask",
                      algo__rollout_is_level=level, parallel__cp=cp)
    dims = init_parallel(-1, cp, "gloo")
    actor = Actor(build_model(cfg, dims), dims, cfg)
    actor.optimizer.step = lambda *a, **k: None  # the same policy for every budget
    rollouts = fixed_rollouts()
    rollouts[0].rollout_logprobs[0] += 12.0  # ratio ~ e^-12 < 1e-4: sequence 0 vetoed
    rollouts[7].rollout_logprobs[-1] -= 2.5  # the batch's largest ratio, in a middle sequence
    result = {"metrics": {}}
    for budget in budgets:
        actor.cfg.trainer.micro_batch_tokens = budget
        result["metrics"][budget] = actor.update(rollouts, "pg")
    if world == 1:  # the whole batch's ratios, for the expected values
        old = actor.compute_logprobs(rollouts, list(range(len(rollouts))))
        result["rho"] = [torch.exp(old[i] - torch.tensor(r.rollout_logprobs)) for i, r in enumerate(rollouts)]
    if rank == 0:
        torch.save(result, out)


def _sft_run(rank: int, world: int, budgets: list[int], out: str) -> None:
    from golong.actor import Actor
    from golong.build import build_model
    from golong.parallel import init_parallel
    from tests.golong.trainer_helpers import fixed_rollouts, tiny_config

    cfg = tiny_config(trainer__mini_batch_prompts=100, algo__ppo_epochs=2)  # PPO's epochs: not the SFT loss's
    dims = init_parallel(-1, 1, "gloo")
    actor = Actor(build_model(cfg, dims), dims, cfg)
    actor.optimizer.step = lambda *a, **k: None  # the same weights for every budget
    rollouts = fixed_rollouts()
    result = {"metrics": {}}
    for budget in budgets:
        actor.cfg.trainer.micro_batch_tokens = budget
        result["metrics"][budget] = actor.update(rollouts, "sft")
    if world == 1:  # the whole batch's token-mean NLL of the targets
        lp = actor.compute_logprobs(rollouts, list(range(len(rollouts))))
        result["nll"] = float(-torch.cat([lp[i] for i in range(len(rollouts))]).double().mean())
    if rank == 0:
        torch.save(result, out)


@pytest.mark.distributed
def test_the_sft_loss_is_the_whole_batchs_token_mean(tmp_path):
    """The SFT warm-up's loss and gradient are the token mean NLL over the whole mini-batch, whatever the
    micro-batching (48 tokens: several micro-batches) and the number of ranks (a per-micro-batch mean weighed short
    micro-batches' tokens more: loss 34.6 instead of 6.9)."""
    run_distributed(_sft_run, 1, [48, 100000], str(tmp_path / "one.pt"))
    run_distributed(_sft_run, 2, [48], str(tmp_path / "two.pt"))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    runs = {"1 rank, 48": one["metrics"][48], "1 rank, 100000": one["metrics"][100000],
            "2 ranks, 48": two["metrics"][48]}
    for name, m in runs.items():
        assert m["sft/loss"] == pytest.approx(one["nll"], rel=1e-5), name
        assert m["sft/optimizer_steps"] == 1, name  # one pass over the batch, whatever algo.ppo_epochs
        assert m["sft/grad_norm"] == pytest.approx(one["metrics"][100000]["sft/grad_norm"], rel=1e-4), name


def _nonfinite_grad_run(rank: int, world: int, out: str) -> None:
    from golong.actor import Actor
    from golong.build import build_model
    from golong.parallel import init_parallel
    from tests.golong.trainer_helpers import fixed_rollouts, tiny_config

    cfg = tiny_config(trainer__mini_batch_prompts=100, algo__ppo_epochs=2, optim__grad_clip=1.0)
    dims = init_parallel(-1, 1, "gloo")
    actor = Actor(build_model(cfg, dims), dims, cfg)
    before = {n: p.detach().clone() for n, p in actor.model.named_parameters()}
    # one parameter's gradient overflows (an inf in a bf16 reduction) while every loss stays finite
    param = next(p for n, p in actor.model.named_parameters() if "norm" in n)
    real_clip = actor._clip_grad_norm

    def overflowed() -> float:
        grad = param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad  # FSDP2: a DTensor
        grad.view(-1)[0] = float("inf")
        return real_clip()

    actor._clip_grad_norm = overflowed
    m = actor.update(fixed_rollouts(), "pg")
    changed = [n for n, p in actor.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    torch.save({"metrics": m, "changed": changed}, out)


@pytest.mark.distributed
def test_a_non_finite_gradient_norm_skips_the_step_though_the_loss_is_finite(tmp_path):
    """An inf / NaN gradient norm with a finite loss: the optimizer step is skipped (clipping cannot scale an inf
    gradient; Adam would write inf / NaN into every weight it touches), counted in actor/skipped_steps."""
    run_distributed(_nonfinite_grad_run, 1, str(tmp_path / "out.pt"))
    got = torch.load(tmp_path / "out.pt")
    m = got["metrics"]
    assert math.isfinite(m["actor/loss"]) and m["actor/skipped_steps"] == 2 and m["actor/optimizer_steps"] == 0, m
    assert got["changed"] == []


@pytest.mark.distributed
def test_rollout_is_metrics_are_whole_batch_statistics(tmp_path):
    """ratio max / min are the batch's extremes and veto_frac the fraction of vetoed sequences, and the rollout vs
    trainer mismatch (KL in both estimators, |log ratio|) the whole batch's token means, whatever the
    micro-batching (48 tokens: several micro-batches per rank) and the number of ranks."""
    run_distributed(_is_metric_run, 1, [48, 100000], str(tmp_path / "one.pt"))
    run_distributed(_is_metric_run, 2, [48], str(tmp_path / "two.pt"))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    rho = one["rho"]
    flat = torch.cat(rho)
    inside = ((flat >= 0.5) & (flat <= 5.0)).double()
    vetoed = torch.tensor([bool((r < 1e-4).any()) for r in rho])
    seq_ppl_ratio = torch.stack([torch.exp(-torch.log(r).mean()) for r in rho])  # exp(mean(roll - old))
    expected = {"rollout_is/ratio_max": float(flat.max()), "rollout_is/ratio_min": float(flat.min()),
                "rollout_is/veto_frac": float(vetoed.double().mean()),
                "rollout_is/masked_frac": float(1 - inside.mean()), "rollout_is/ratio_mean": float(flat.mean()),
                "mismatch/ppl_ratio": float(seq_ppl_ratio.mean()),
                # KL(rollout || trainer) per token: k3 = rho - 1 - log rho, k1 = -log rho (rho = old / rollout)
                "mismatch/kl": float((flat.double() - 1 - flat.double().log()).mean()),
                "mismatch/kl_k1": float(-flat.double().log().mean()),
                "mismatch/mean_abs": float(flat.double().log().abs().mean()),
                "mismatch/max_abs": float(flat.double().log().abs().max())}
    assert expected["rollout_is/veto_frac"] > 0 and expected["rollout_is/ratio_min"] < 1e-4
    assert int(flat.argmax()) == sum(len(r) for r in rho[:8]) - 1  # the planted maximum
    runs = {"1 rank, 48": one["metrics"][48], "1 rank, 100000": one["metrics"][100000],
            "2 ranks, 48": two["metrics"][48]}
    for name, metrics in runs.items():
        for key, want in expected.items():
            assert metrics[key] == pytest.approx(want, rel=1e-4), (name, key, metrics[key], want)


@pytest.mark.distributed
@pytest.mark.parametrize("level", ["geometric", "sequence"])
def test_sequence_level_rollout_is_masks_whole_responses_in_the_update(level, tmp_path):
    """algo.rollout_is_level=geometric / sequence reach the update: a response is masked as a whole where the
    geometric mean (the product) of its token ratios leaves [0.5, 5] (the response with a 12-nat mismatch on one
    token among them), and the ratio metrics are the responses' ratios, whatever the micro-batching, the number of
    ranks and the context-parallel split of each response over a ring of 2."""
    run_distributed(_is_metric_run, 1, [48, 100000], str(tmp_path / "one.pt"), level)
    run_distributed(_is_metric_run, 2, [48], str(tmp_path / "two.pt"), level)
    run_distributed(_is_metric_run, 2, [48], str(tmp_path / "cp.pt"), level, 2)
    one, two, cp = (torch.load(tmp_path / f"{name}.pt") for name in ("one", "two", "cp"))
    rho = one["rho"]
    # each token weighs its response's ratio (the product clamped to +-20 nats, as rollout_is_weights does)
    log_ratio = [torch.log(r).double().mean() if level == "geometric" else torch.log(r).double().sum()
                 for r in rho]
    flat = torch.cat([torch.exp(lr.clamp(-20, 20)).repeat(len(r)) for lr, r in zip(log_ratio, rho)]).double()
    outside = ((flat < 0.5) | (flat > 5.0)).double()
    assert 0 < outside.mean() < 1 and bool(outside[: len(rho[0])].all())  # response 0 is masked whole
    expected = {"rollout_is/masked_frac": float(outside.mean()), "rollout_is/ratio_max": float(flat.max()),
                "rollout_is/ratio_min": float(flat.min()), "rollout_is/ratio_mean": float(flat.mean())}
    for name, metrics in {"1 rank, 48": one["metrics"][48], "1 rank, 100000": one["metrics"][100000],
                          "2 ranks, 48": two["metrics"][48], "cp 2, 48": cp["metrics"][48]}.items():
        for key, want in expected.items():
            assert metrics[key] == pytest.approx(want, rel=1e-4), (name, key, metrics[key], want)


# --------------------------------------------------------------------------- actor/entropy's aggregation
def _entropy_metric_run(rank: int, world: int, out: str) -> None:
    from golong.actor import Actor
    from golong.build import build_model
    from golong.parallel import init_parallel
    from tests.golong.trainer_helpers import fixed_rollouts, tiny_config

    rollouts = fixed_rollouts(n_prompts=5, n=3, seed=1)
    result = {}
    for coef in (0.0, 1e-3):
        # 3 mini-batches of unequal token counts
        cfg = tiny_config(trainer__mini_batch_prompts=2, algo__entropy_coef=coef)
        dims = init_parallel(-1, 1, "gloo")
        actor = Actor(build_model(cfg, dims), dims, cfg)
        real_forward = actor.forward

        def forward(mb, model=None, real_forward=real_forward):  # entropy of every token: its rollout's index + 1
            logprob, entropy = real_forward(mb, model)
            value = (torch.tensor(mb.indices + [0])[mb.seq_index] + 1).to(entropy)
            return logprob, entropy * 0 + value

        actor.forward = forward
        result[coef] = actor.update(rollouts, "pg")["actor/entropy"]
    if rank == 0:
        torch.save(result, out)


@pytest.mark.distributed
def test_actor_entropy_is_the_token_mean_of_the_update_with_or_without_an_entropy_term(tmp_path):
    """actor/entropy is the mean over every response token of the update, also where the loss has an entropy
    term (algo.entropy_coef): its definition does not change with the loss."""
    run_distributed(_entropy_metric_run, 1, str(tmp_path / "ent.pt"))
    from tests.golong.trainer_helpers import fixed_rollouts

    got = torch.load(tmp_path / "ent.pt")
    rollouts = fixed_rollouts(n_prompts=5, n=3, seed=1)
    lengths = [len(r.response_ids) for r in rollouts]
    want = sum((i + 1) * n for i, n in enumerate(lengths)) / sum(lengths)
    assert got[0.0] == pytest.approx(want, rel=1e-6)
    assert got[1e-3] == pytest.approx(want, rel=1e-6)


def test_cpu_offload_adds_gloo_for_host_tensors(monkeypatch):
    # with FSDP CPU offload the sharded parameters / gradients are host tensors: their grad-norm and full_tensor
    # collectives need a CPU backend next to NCCL (plain "nccl" fails with "no backend for device type cpu")
    from golong.parallel import mesh

    seen = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(mesh.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(mesh.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mesh.torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(mesh.dist, "TCPStore", lambda *a, **k: None)
    monkeypatch.setattr(mesh.dist, "init_process_group", lambda backend, **kw: seen.append(backend))
    monkeypatch.setattr(mesh.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(mesh.dist, "get_world_size", lambda: 1)
    mesh.init_distributed(cpu_collectives=True)
    mesh.init_distributed()
    mesh.init_distributed("gloo", cpu_collectives=True)
    assert seen == ["cuda:nccl,cpu:gloo", "nccl", "gloo"]


def test_init_parallel_refuses_a_mesh_that_does_not_fit_the_world(monkeypatch):
    """cp, the rollout engine's tensor-parallel size and dp_shard x cp must fit the launched world (here 4 ranks):
    a config error at start-up, not a hang or a wrong mesh later."""
    from golong.config import ConfigError
    from golong.parallel import mesh

    monkeypatch.setattr(mesh, "init_distributed", lambda *a, **k: (0, 4))
    for kwargs, message in [({"cp": 3}, "parallel.cp=3 must divide the world size 4"),
                            ({"cp": 2, "rollout_tp": 3}, "rollout.tensor_parallel_size=3 must divide the world size 4"),
                            ({"dp_shard": 4, "cp": 2}, "parallel.dp_shard=4 x parallel.cp=2 != world size 4"),
                            ({"dp_shard": 1, "cp": 2}, "parallel.dp_shard=1 x parallel.cp=2 != world size 4")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            mesh.init_parallel(backend="gloo", **kwargs)
    seen = []

    class Mesh:  # what init_parallel reads of the device mesh
        def __getitem__(self, names):
            return self

        def _flatten(self, name):
            return self

        def get_local_rank(self, name):
            return {"dp_shard": 1, "cp": 0}[name]

    monkeypatch.setattr(mesh, "init_device_mesh", lambda device, shape, mesh_dim_names: seen.append(
        (shape, mesh_dim_names)) or Mesh())
    dims = mesh.init_parallel(-1, 2, "gloo", rollout_tp=2)  # dp_shard -1: world / cp
    assert seen == [((2, 2), ("dp_shard", "cp"))]
    assert (dims.dp_size, dims.dp_rank, dims.cp_size, dims.cp_rank, dims.rank, dims.world_size) == (2, 1, 2, 0, 2, 4)


def test_mixed_precision_computes_in_param_dtype_and_reduces_in_reduce_dtype_on_gpu():
    # on CPU everything stays fp32 (gloo has no bf16 reduce-scatter) whatever the config says
    from golong.parallel import mixed_precision_policy

    gpu = mixed_precision_policy("bfloat16", "float32", device="cuda")
    assert (gpu.param_dtype, gpu.reduce_dtype) == (torch.bfloat16, torch.float32)
    half = mixed_precision_policy("float16", "bfloat16", device="cuda")
    assert (half.param_dtype, half.reduce_dtype) == (torch.float16, torch.bfloat16)
    cpu = mixed_precision_policy("bfloat16", "bfloat16", device="cpu")
    assert (cpu.param_dtype, cpu.reduce_dtype) == (torch.float32, torch.float32)


def test_cpu_offload_without_a_gpu_is_refused(monkeypatch):
    # CPU offload keeps a GPU run's shards in pinned host memory: without a GPU it is a config mistake, said at once
    from golong.parallel import apply_fsdp

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="parallel.cpu_offload needs a GPU"):
        apply_fsdp(torch.nn.Linear(2, 2), None, cpu_offload=True)


def _cast_before_gather(rank: int, world: int) -> None:
    from torch.distributed.tensor import DTensor

    from golong.actor import Actor
    from golong.build import build_model
    from golong.models.checkpoint import hf_state_items
    from golong.parallel import init_parallel
    from tests.golong.trainer_helpers import tiny_config

    dims = init_parallel(-1, 1, "gloo")
    actor = Actor(build_model(tiny_config(), dims), dims, tiny_config())
    p = next(iter(actor.model.parameters()))
    assert isinstance(p, DTensor) and p.dtype == torch.float32
    cast = p.detach().to(torch.bfloat16)  # what full_parameters gathers: the shard, cast where it lies
    assert isinstance(cast, DTensor) and cast.placements == p.placements and cast.to_local().dtype == torch.bfloat16
    full = dict(hf_state_items(actor.model, device=None))
    half = dict(hf_state_items(actor.model, dtype=torch.bfloat16, device=None))
    assert list(half) == list(full) and len(full) > 10
    for k, v in full.items():
        assert half[k].dtype == torch.bfloat16 and torch.equal(half[k], v.to(torch.bfloat16)), k


@pytest.mark.distributed
def test_weight_sync_casts_each_shard_before_its_gather():
    """The vLLM push gathers parameters in the engine's dtype: each FSDP shard is cast first (an fp32 master
    gathered, then cast, moves twice the bytes); the values equal the fp32 gather cast afterwards."""
    run_distributed(_cast_before_gather, 2)


def _built_from_scratch(rank: int, world: int) -> None:
    from golong.build import build_model
    from golong.parallel import init_parallel
    from tests.golong.trainer_helpers import tiny_config

    cfg = tiny_config(model__attn_backend="torch")
    dims = init_parallel(-1, 1, "gloo")

    def weights(model):
        return {k: v.full_tensor().clone() for k, v in model.state_dict().items()}

    start = weights(build_model(cfg, dims))
    same = weights(build_model(cfg, dims, seed=cfg.trainer.seed))
    other = weights(build_model(cfg, dims, seed=cfg.trainer.seed + 1))
    assert all(torch.equal(same[k], v) for k, v in start.items())
    assert not any(torch.equal(other[k], v) for k, v in start.items() if "norm" not in k)  # norms start at 1
    reference = build_model(cfg, dims, reference=True)
    assert {layer.self_attn.backend for layer in reference.model.layers} == {"torch"}  # model.attn_backend's
    frozen = weights(reference)
    assert all(torch.equal(frozen[k], v) for k, v in start.items())


@pytest.mark.distributed
def test_a_scratch_model_is_its_seeds_and_the_reference_policy_starts_from_it():
    """From scratch the weights are the seed's (trainer.seed unless one is given: tests build "other weights" so);
    the KL term's reference policy starts from the same weights, attending as model.attn_backend says."""
    run_distributed(_built_from_scratch, 1)
