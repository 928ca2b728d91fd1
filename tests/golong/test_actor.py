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


def test_plan_cuts_a_run_over_the_budget_into_even_pieces():
    """16 responses of which 5 fit the budget beside the prompt: 4 x 4, not 5 + 5 + 5 + 1 (a prompt copy for one
    response)."""
    prompt = np.arange(100, dtype=np.int32)
    rollouts = [Rollout(prompt, np.zeros(9, dtype=np.int32), None, group=0, task="t") for _ in range(16)]
    (plan,) = _plans(rollouts, True, 99 + 5 * 10, 1)
    assert sorted(len(m) for m in plan) == [4, 4, 4, 4]


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
