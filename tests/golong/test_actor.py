"""The actor's packing of rollouts into micro-batches: whole sequences, or a prompt's responses sharing its rows."""

import numpy as np
import pytest
import torch

from golong.actor import IGNORE, Rollout, build_micro_batch, packed_rows, prompt_runs
from golong.models import packed_position_ids


def _rollouts():
    g = torch.Generator().manual_seed(3)
    out = []
    for group, (p, lengths) in enumerate([(9, [4, 1, 6]), (1, [3, 2]), (5, [7]), (6, [0, 3])]):
        prompt = np.asarray(torch.randint(0, 100, (p,), generator=g), dtype=np.int32)
        for n in lengths:
            out.append(Rollout(prompt, np.asarray(torch.randint(0, 100, (n,), generator=g), dtype=np.int32),
                               (-torch.rand(n, generator=g)).numpy(), group=group, task="t",
                               advantage=float(torch.randn((), generator=g))))
    return out


def _scored(mb):
    """Per scored row in packed order: (target, advantage, rollout logprob, old, ref, sequence index)."""
    keep = mb.mask > 0
    assert torch.equal(keep, mb.targets != IGNORE)
    return [mb.targets[keep], mb.advantages[keep], mb.rollout_logprobs[keep], mb.old_logprobs[keep],
            mb.ref_logprobs[keep], mb.seq_index[keep]]


def test_shared_prompt_layout_scores_every_response_token_as_the_whole_sequence_does():
    rollouts = _rollouts()
    indices = list(range(len(rollouts)))
    old = {i: torch.randn(len(r.response_ids)) for i, r in enumerate(rollouts)}
    ref = {i: torch.randn(len(r.response_ids)) for i, r in enumerate(rollouts)}
    whole = build_micro_batch(rollouts, indices, old, ref=ref)
    shared = build_micro_batch(rollouts, indices, old, ref=ref, share_prompts=True)
    for a, b in zip(_scored(whole), _scored(shared)):
        assert torch.equal(a, b)
    # group 0 (3 responses) and group 3 (2) share their prompts; group 1's prompt has one token and group 2 one
    # response: packed whole
    assert whole.prefix_of is None
    assert shared.prefix_of.tolist() == [-1, 0, 0, 0, -1, -1, -1, -1, 7, 7]
    assert len(shared.input_ids) == len(whole.input_ids) - 2 * 8 - 5
    # each rollout's first response token is scored at its start row, in both layouts; positions continue the prompt
    pos_whole = packed_position_ids(whole.cu_seqlens, len(whole.input_ids))
    pos_shared = packed_position_ids(shared.cu_seqlens, len(shared.input_ids), shared.prefix_of)
    for i, a, b in zip(indices, whole.starts, shared.starts):
        r = rollouts[i]
        if len(r.response_ids):
            assert whole.targets[a] == shared.targets[b] == r.response_ids[0]
        assert whole.input_ids[a] == shared.input_ids[b] == r.prompt_ids[-1]
        assert pos_whole[a] == pos_shared[b] == len(r.prompt_ids) - 1
    # the shared prompt documents' rows: tokens of the prompt, nothing scored, the sequence index of their first
    # response (their seq_index must name a rollout of the micro-batch)
    cu = shared.cu_seqlens.tolist()
    for doc, first in ((0, 0), (7, 6)):
        rows = slice(cu[doc], cu[doc + 1])
        assert shared.input_ids[rows].tolist() == list(rollouts[first].prompt_ids[:-1])
        assert (shared.mask[rows] == 0).all() and (shared.seq_index[rows] == first).all()


def test_runs_and_packed_rows():
    rollouts = _rollouts()
    assert prompt_runs(rollouts, [0, 1, 2, 3, 4, 6, 5]) == [[0, 1, 2], [3, 4], [6], [5]]
    assert packed_rows(rollouts, [0, 1, 2], True) == 8 + (5 + 2 + 7)
    assert packed_rows(rollouts, [0, 1, 2], False) == 3 * 9 + 11
    assert packed_rows(rollouts, [3, 4], True) == packed_rows(rollouts, [3, 4], False) == 7  # 1-token prompt


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("budget", [12, 20, 1000])
def test_plan_keeps_a_prompts_responses_together_within_the_budget(share, budget):
    from types import SimpleNamespace

    from golong.actor import Actor
    from tests.golong.trainer_helpers import tiny_config

    rollouts = _rollouts()
    actor = Actor.__new__(Actor)  # only _plan's inputs: the config and the dims
    actor.cfg = tiny_config(trainer__share_prompts=share, trainer__micro_batch_tokens=budget)
    actor.dims = SimpleNamespace(dp_size=1, dp_rank=0)
    plan = actor._plan(rollouts, list(range(len(rollouts))))
    assert sorted(i for m in plan for i in m) == list(range(len(rollouts)))
    for m in plan:
        runs = prompt_runs(rollouts, m)
        assert len({rollouts[r[0]].group for r in runs}) == len(runs)  # a prompt's members adjacent
        rows = sum(packed_rows(rollouts, r, share) for r in runs)
        assert rows <= budget or len(m) == 1
    if budget == 1000:
        assert len(plan) == 1


def _plans(rollouts, share, budget, dp):
    from types import SimpleNamespace

    from golong.actor import Actor
    from tests.golong.trainer_helpers import tiny_config

    actor = Actor.__new__(Actor)
    actor.cfg = tiny_config(trainer__share_prompts=share, trainer__micro_batch_tokens=budget)
    out = []
    for rank in range(dp):
        actor.dims = SimpleNamespace(dp_size=dp, dp_rank=rank)
        out.append(actor._plan(rollouts, list(range(len(rollouts)))))
    return out


def test_plan_packs_a_prompts_responses_together_where_they_fit():
    rollouts = _rollouts()
    # shared: units of 22 (group 0), 7, 12 and 10 rows fill two micro-batches of 30; whole: 72 rows need three
    (shared,) = _plans(rollouts, True, 30, 1)
    assert sorted(sorted(m) for m in shared) == [[0, 1, 2, 3, 4], [5, 6, 7]]
    (whole,) = _plans(rollouts, False, 30, 1)
    assert len(whole) == 3


def _loads(rollouts, plans):
    """Per dp rank: (packed rows, prompts it holds)."""
    return [(sum(packed_rows(rollouts, r, True) for m in plan for r in prompt_runs(rollouts, m)),
             len({rollouts[i].group for m in plan for i in m})) for plan in plans]


@pytest.mark.parametrize("prompts,dp,want", [
    (2, 4, [(1803, 1)] * 4),  # each prompt's run halved: one prompt copy and 4 responses per rank
    (4, 4, [(2607, 1)] * 4),  # a whole run per rank
    (1, 3, [(999 + 3 * 201, 1), (999 + 3 * 201, 1), (999 + 2 * 201, 1)]),  # 8 responses in parts of 3, 3, 2
])
def test_plan_splits_prompt_runs_over_the_dp_ranks(prompts, dp, want):
    """Whole runs would give some ranks all the work and others none; single responses would give every rank
    every prompt. A run is split into its share of the ranks, with near-equal response counts."""
    arrays = [np.arange(1000 * g, 1000 * (g + 1), dtype=np.int32) for g in range(prompts)]
    rollouts = [Rollout(arrays[g], np.zeros(200, dtype=np.int32), None, group=g, task="t")
                for g in range(prompts) for _ in range(8)]
    assert sorted(_loads(rollouts, _plans(rollouts, True, 32768, dp))) == sorted(want)
    # without sharing: one unit per rollout, balanced by count
    counts = [sum(len(m) for m in p) for p in _plans(rollouts, False, 32768, dp)]
    assert max(counts) - min(counts) <= 1


def test_plan_keeps_a_run_whole_where_its_prompt_is_about_a_ranks_share():
    """Splitting a run whose prompt alone is about a dp rank's share only adds prompt copies: the busiest rank
    would hold a copy either way. A 10K-token prompt x 16 beside 10 small runs on 2 ranks stays on one rank."""
    big = np.arange(10_000, dtype=np.int32)
    rollouts = [Rollout(big, np.zeros(10, dtype=np.int32), None, group=0, task="t") for _ in range(16)]
    for g in range(1, 11):
        small = np.arange(100, dtype=np.int32) + 100 * g
        rollouts += [Rollout(small, np.zeros(50, dtype=np.int32), None, group=g, task="t") for _ in range(4)]
    plans = _plans(rollouts, True, 32768, 2)
    holders = [rank for rank, plan in enumerate(plans) if any(rollouts[i].group == 0 for m in plan for i in m)]
    assert len(holders) == 1


@pytest.mark.parametrize("responses, want", [(16, [4, 4, 4, 4]), (6, [3, 3])])
def test_plan_cuts_a_run_over_the_budget_into_even_pieces(responses, want):
    """16 responses of which 5 fit the budget beside the prompt: 4 x 4, not 5 + 5 + 5 + 1 (a prompt copy for one
    response); 6 of them: 3 + 3, not 5 + 1 (two pieces are evened out too)."""
    prompt = np.arange(100, dtype=np.int32)
    rollouts = [Rollout(prompt, np.zeros(9, dtype=np.int32), None, group=0, task="t") for _ in range(responses)]
    (plan,) = _plans(rollouts, True, 99 + 5 * 10, 1)
    assert sorted(len(m) for m in plan) == want


@pytest.mark.parametrize("share", [False, True])
def test_routing_records_follow_each_row_to_its_sequence_position(share):
    """Rollout.prompt_experts / response_experts (routing replay): every packed row replays the record of its token
    in its own sequence (the shared prompt copy: its first response's), -1 where there is none (each sequence's
    last token, rollouts without records, the dummy micro-batch)."""
    rollouts = _rollouts()
    layers, k = 3, 2

    def record(seed: int, rows: int) -> np.ndarray:  # distinct values per (rollout, position, layer, slot)
        return ((np.arange(rows)[:, None, None] * 7 + np.arange(layers)[None, :, None] * 3
                 + np.arange(k)[None, None, :] + seed * 50) % 251).astype(np.uint8)

    full = {}
    for i, r in enumerate(rollouts):
        if i == 4:  # no record: its rows all -1
            continue
        rec = record(i, len(r.prompt_ids) + len(r.response_ids) - 1) if len(r.response_ids) else \
            record(i, len(r.prompt_ids))[:-1]  # an empty response: the prompt's last token was not read either
        r.prompt_experts, r.response_experts = rec[:len(r.prompt_ids)], rec[len(r.prompt_ids):]
        full[i] = rec
    indices = list(range(len(rollouts)))
    mb = build_micro_batch(rollouts, indices, None, share_prompts=share)
    assert mb.routed_experts.dtype == torch.int16 and mb.routed_experts.shape == (len(mb.input_ids), layers, k)
    pos = packed_position_ids(mb.cu_seqlens, len(mb.input_ids), mb.prefix_of)
    for row in range(len(mb.input_ids)):
        i = indices[int(mb.seq_index[row])]
        p = int(pos[row])
        want = full[i][p] if i in full and p < len(full[i]) else np.full((layers, k), -1)
        assert np.array_equal(mb.routed_experts[row].numpy(), want), (row, i, p)
    assert (mb.routed_experts == -1).any(dim=(1, 2)).sum() == len(rollouts) + rollouts[4].length - 1
    for r in rollouts:
        r.prompt_experts = r.response_experts = None
    assert build_micro_batch(rollouts, indices, None, share_prompts=share).routed_experts is None
    assert build_micro_batch(rollouts, [], None).routed_experts is None


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("dp", [1, 3])
def test_owners_name_the_dp_rank_whose_micro_batches_hold_each_rollout(share, dp):
    """Actor.owners (where golong.replay sends each record): for every mini-batch and every dp rank, the rollouts of
    that rank's plan; and a rank that would train a replayed rollout without its record stops (check_routing)."""
    from types import SimpleNamespace

    from golong.actor import Actor, split_mini_batches
    from golong.replay import RouteKey
    from tests.golong.trainer_helpers import tiny_config

    rollouts = _rollouts()
    actor = Actor.__new__(Actor)
    actor.cfg = tiny_config(trainer__share_prompts=share, trainer__micro_batch_tokens=14, trainer__mini_batch_prompts=2,
                            rollout__router_replay=True)
    actor.dims = SimpleNamespace(dp_size=dp, dp_rank=0, rank=0, cp_size=1)
    owners = actor.owners(rollouts)
    want = [-1] * len(rollouts)
    minis = split_mini_batches(rollouts, 2)
    assert len(minis) == 2
    for mini in minis:
        for rank in range(dp):
            actor.dims = SimpleNamespace(dp_size=dp, dp_rank=rank, rank=rank, cp_size=1)
            for members in actor._plan(rollouts, mini):
                for i in members:
                    assert want[i] == -1
                    want[i] = rank
    assert owners == want and -1 not in owners and (dp == 1 or len(set(owners)) > 1)
    actor.check_routing(rollouts, minis)  # no rollout replayed
    rollouts[2].route_key = RouteKey(0, 0, 0, 2)  # replayed, but its record never came
    for rank in range(dp):
        actor.dims = SimpleNamespace(dp_size=dp, dp_rank=rank, rank=rank, cp_size=1)
        if rank == owners[2]:
            with pytest.raises(RuntimeError, match=f"rollout 2 is in a micro-batch of dp rank {rank} but holds no "
                                                   f"record of its experts on rank {rank}"):
                actor.check_routing(rollouts, minis)
        else:  # on one process: a rank that does not train it sees nothing wrong (on many, all_gather tells all)
            actor.check_routing(rollouts, minis)


def test_gradients_are_clipped_to_optim_grad_clip_and_the_norm_before_clipping_is_returned():
    """optim.grad_clip scales the gradients down to that total L2 norm (never up); the returned (logged) norm is the
    one before clipping; grad_clip 0 leaves them as they are."""
    from golong.actor import Actor
    from tests.golong.trainer_helpers import tiny_config

    def clipped(clip: float, weight: float, bias: float) -> tuple[float, torch.Tensor, torch.Tensor]:
        actor = Actor.__new__(Actor)  # only _clip_grad_norm's inputs: the config and the model
        actor.cfg = tiny_config(optim__grad_clip=clip)
        actor.model = torch.nn.Linear(3, 2)
        actor.model.weight.grad = torch.full((2, 3), weight)
        actor.model.bias.grad = torch.full((2,), bias)
        return actor._clip_grad_norm(), actor.model.weight.grad, actor.model.bias.grad

    # |g| = sqrt(6 x 1 + 2 x 2^2) = sqrt(14) by hand
    norm, w, b = clipped(0.5, 1.0, 2.0)
    assert norm == pytest.approx(14 ** 0.5)
    assert float(torch.cat([w.flatten(), b]).norm()) == pytest.approx(0.5, rel=1e-5)
    assert torch.allclose(w, torch.full((2, 3), 0.5 / 14 ** 0.5)) and torch.allclose(b, torch.full((2,), 1 / 14 ** 0.5))
    norm, w, b = clipped(0.5, 0.1, 0.0)  # |g| = sqrt(0.06) < 0.5: untouched
    assert norm == pytest.approx(0.06 ** 0.5) and torch.equal(w, torch.full((2, 3), 0.1))
    norm, w, b = clipped(0.0, 1.0, 2.0)  # no clipping
    assert norm == pytest.approx(14 ** 0.5) and torch.equal(w, torch.ones(2, 3))
    assert torch.equal(b, torch.full((2,), 2.0))


def test_rollout_is_metrics_of_a_micro_batch_weigh_by_its_scored_tokens_and_scored_sequences():
    """_accumulate_is_metrics: token means weigh by the micro-batch's response tokens, sequence means (veto_frac,
    the perplexities) by its scored sequences (a shared prompt's document scores none: not a sequence), each over
    the cp ranks that all computed them; ratio_max / ratio_min are kept as maxima; a dummy adds nothing."""
    from collections import defaultdict

    from golong.actor import _accumulate_is_metrics

    sums = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
    maxes = defaultdict(lambda: torch.tensor(float("-inf"), dtype=torch.float64))
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)  # a shared prompt's 3 rows, then 2 and 3 scored rows
    mask = torch.tensor([0, 0, 0, 1, 1, 0, 1, 1, 1], dtype=torch.float32)
    metrics = {"rollout_is/ratio_max": torch.tensor(3.0), "rollout_is/ratio_min": torch.tensor(0.25),
               "rollout_is/veto_frac": torch.tensor(0.5), "rollout_is/ratio_mean": torch.tensor(1.5),
               "mismatch/trainer_ppl": torch.tensor(2.0)}
    _accumulate_is_metrics(metrics, mask, cu, 2, sums, maxes)  # cp 2: 5 tokens, 2 sequences, halved per rank
    _accumulate_is_metrics(metrics, torch.zeros(4), torch.tensor([0, 4], dtype=torch.int32), 2, sums, maxes)  # dummy
    got = {k: float(v) for k, v in sums.items()}
    assert got == {"m:rollout_is/veto_frac": 0.5 * 1.0, "w:rollout_is/veto_frac": 1.0,
                   "m:mismatch/trainer_ppl": 2.0 * 1.0, "w:mismatch/trainer_ppl": 1.0,
                   "m:rollout_is/ratio_mean": 1.5 * 2.5, "w:rollout_is/ratio_mean": 2.5}
    assert {k: float(v) for k, v in maxes.items()} == {"rollout_is/ratio_max": 3.0, "-rollout_is/ratio_min": -0.25}
