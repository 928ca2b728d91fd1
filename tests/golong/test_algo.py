"""Algorithms: estimators vs hand-computed values and a per-response loop oracle, the policy loss
vs a direct per-token computation, micro-batch / 2-rank gradient invariance, rollout IS, dynamic
sampling."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from golong.algo import (
    AGG_MODES,
    ESTIMATORS,
    aggregation_weights,
    broadcast_to_tokens,
    compute_advantages,
    dynamic_sampling_filter,
    overlong_penalty,
    policy_loss,
    rollout_is_weights,
)
from tests.distributed import run_distributed

EPS = 1e-6

# A mixed batch: task "a" has prompts 0 (1,0,0,1) and 3 (1,1,0); task "b" has prompt 1 (0.5,0.5:
# a tie, all equal) and prompt 2 (a group of one, 0.25).
SCORES = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.25, 1.0, 1.0, 0.0]
PIDS = [0, 0, 0, 0, 1, 1, 2, 3, 3, 3]
TIDS = ["a", "a", "a", "a", "b", "b", "b", "a", "a", "a"]


def adv(est, **kw):
    a, m = compute_advantages(est, torch.tensor(SCORES, dtype=torch.float64), PIDS, TIDS, **kw)
    assert a.dtype == torch.float32 and a.shape == (10,)
    return a.double().tolist(), m


# ------------------------------------------------------------------ hand-computed estimators


def test_grpo_hand():
    a, _ = adv("grpo")
    s0 = math.sqrt(1 / 3)  # prompt 0: mean 1/2, unbiased var (4 * 1/4) / 3
    s3 = math.sqrt(1 / 3)  # prompt 3: mean 2/3, var ((1/3)^2 * 2 + (2/3)^2) / 2 = 1/3
    want = [0.5 / (s0 + EPS), -0.5 / (s0 + EPS), -0.5 / (s0 + EPS), 0.5 / (s0 + EPS),
            0.0, 0.0,  # tie: r - mu = 0
            0.25 / (1 + EPS),  # group of one: mu 0, sigma 1
            (1 / 3) / (s3 + EPS), (1 / 3) / (s3 + EPS), (-2 / 3) / (s3 + EPS)]
    assert a == pytest.approx(want, rel=1e-6)


def test_dr_grpo_hand():
    a, _ = adv("dr_grpo")
    assert a == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0.25, 1 / 3, 1 / 3, -2 / 3], rel=1e-6)


def test_tmn_grpo_hand():
    a, m = adv("tmn_grpo")
    s_a = math.sqrt((1 / 3 + 1 / 3) / 2)  # task a: mean of the two prompt variances
    s_b = math.sqrt((0.0 + 1.0) / 2)  # task b: tie variance 0, group of one variance 1
    want = [0.5 / (s_a + EPS), -0.5 / (s_a + EPS), -0.5 / (s_a + EPS), 0.5 / (s_a + EPS), 0, 0,
            0.25 / (s_b + EPS), (1 / 3) / (s_a + EPS), (1 / 3) / (s_a + EPS), (-2 / 3) / (s_a + EPS)]
    assert a == pytest.approx(want, rel=1e-6)
    assert m["task/a/sqrt_mean_var"] == pytest.approx(s_a) and m["task/b/sqrt_mean_var"] == pytest.approx(s_b)
    a2, _ = adv("tmn_grpo", norm_by_task_scale=False)
    assert a2 == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0.25, 1 / 3, 1 / 3, -2 / 3], rel=1e-6)


def test_tmn_difficulty_reweight_hand():
    alpha, gamma = 0.8, 1.0
    a, m = adv("tmn_grpo", difficulty_reweight=True, gamma=gamma, alpha=alpha)
    base, _ = adv("tmn_grpo")
    M_a = (0.5 + 2 / 3) / 2  # task means of prompt means (a group of one counts with mu = 0)
    M_b = (0.5 + 0.0) / 2
    assert alpha * 0.5 + (1 - alpha) * M_b == pytest.approx(0.45)
    # prompt 0: mu~ = .8*.5 + .2*M_a = 0.5167 -> pass 2/4
    p0 = 2 / 4
    assert alpha * 0.5 + (1 - alpha) * M_a == pytest.approx(0.516666, abs=1e-5)
    # prompt 3: mu~ = .8*2/3 + .2*M_a = 0.65 -> pass 2/3
    p3 = 2 / 3
    # prompt 1 (tie 0.5,0.5): mu~ = .8*.5 + .2*M_b = 0.45 -> pass 1; not above mu_u -> negative branch
    p1 = 1.0
    # prompt 2 (group of one): mu~ = M_b = 0.25; 0.25 > 0.25 is false -> pass 0; r > mu_u = 0 -> positive
    p2 = 0.0
    up = lambda p: math.exp(gamma * (0.5 - p))
    down = lambda p: math.exp(gamma * (p - 0.5))
    want = [base[0] * up(p0), base[1] * down(p0), base[2] * down(p0), base[3] * up(p0),
            base[4] * down(p1), base[5] * down(p1), base[6] * up(p2),
            base[7] * up(p3), base[8] * up(p3), base[9] * down(p3)]
    assert a == pytest.approx(want, rel=1e-6)
    assert a[6] == pytest.approx(base[6] * math.exp(0.5))  # hard singleton: its positive advantage grows
    assert m["difficulty/mean_pass_rate"] == pytest.approx((p0 + p1 + p2 + p3) / 4)


def test_task_norm_hand():
    a, _ = adv("task_norm")
    ra = [1, 0, 0, 1, 1, 1, 0]
    rb = [0.5, 0.5, 0.25]
    ma, sa = statistics.mean(ra), statistics.stdev(ra)
    mb, sb = statistics.mean(rb), statistics.stdev(rb)
    want = [(r - ma) / (sa + EPS) for r in ra[:4]] + [(r - mb) / (sb + EPS) for r in rb] + \
           [(r - ma) / (sa + EPS) for r in ra[4:]]
    assert a == pytest.approx(want, rel=1e-6)
    one, _ = compute_advantages("task_norm", torch.tensor([0.7]), [0], ["x"])  # one response: std 1
    assert one.tolist() == pytest.approx([0.0])


def test_single_task_all_equal_and_singletons():
    # one task, every group constant: all advantages 0 (no NaN from zero variance)
    for est in ("grpo", "tmn_grpo", "dr_grpo"):
        a, _ = compute_advantages(est, torch.tensor([1.0, 1.0, 0.0, 0.0]), ["p", "p", "q", "q"], ["t"] * 4)
        assert torch.equal(a, torch.zeros(4)), est
    for est in ESTIMATORS:  # task_norm centres on the task: a constant task
        a, _ = compute_advantages(est, torch.tensor([0.5, 0.5, 0.5]), ["p", "p", "q"], ["t"] * 3)
        assert torch.equal(a[:2], torch.zeros(2)), est
    # only groups of one: GRPO / TMN reduce to r / (1 + eps)
    s = torch.tensor([0.2, 0.9, 0.4])
    for est in ("grpo", "tmn_grpo"):
        a, _ = compute_advantages(est, s, [1, 2, 3], ["t"] * 3)
        assert a.tolist() == pytest.approx((s / (1 + EPS)).tolist(), rel=1e-6)


def test_metrics_as_goLongRL_logs_them():
    _, m = adv("grpo")
    assert m["task/a/mean_reward"] == pytest.approx(4 / 7)
    assert m["task/a/num_prompts"] == 2 and m["task/a/num_responses"] == 7
    assert m["task/b/rate_num"] == pytest.approx(0.5)
    # population stds per prompt: 0.5, 0, 0 (single), sqrt(2)/3; task a holds all the spread
    assert m["task/a/mean_std_reward"] == pytest.approx((0.5 + math.sqrt(2) / 3) / 2)
    assert m["task/a/rate_adv"] == pytest.approx(1.0) and m["task/b/rate_adv"] == 0.0
    assert m["adv/pos_frac"] == pytest.approx(5 / 10)
    _, m = compute_advantages("grpo", torch.rand(6), list(range(6)), ["T1.1 Global Cohesive Retrieval"] * 6)
    assert "task/T1-1_Global_Cohesive_Retrieval/mean_reward" in m


def test_all_advantage_metrics_vs_direct_computation():
    """Every logged statistic against python `statistics` on a random mixed batch (odd group sizes,
    singletons, ties, non-contiguous responses)."""
    rng = random.Random(7)
    pid, tid, r = [], [], []
    for p, (g, t) in enumerate([(3, "x"), (1, "x"), (5, "y"), (2, "y"), (4, "x"), (2, "z"), (1, "z")]):
        for _ in range(g):
            pid.append(p)
            tid.append(t)
            r.append(rng.choice([0.0, 1.0, rng.random()]))
    r[pid.index(3)] = r[pid.index(3) + 1] = 0.5  # a tie group: adv 0, not counted as positive
    order = list(range(len(r)))
    rng.shuffle(order)
    pid, tid, r = [pid[i] for i in order], [tid[i] for i in order], [r[i] for i in order]
    a, m = compute_advantages("tmn_grpo", torch.tensor(r, dtype=torch.float64), pid, tid,
                              difficulty_reweight=True, gamma=0.9, alpha=0.7)
    a = a.double().tolist()
    assert a == pytest.approx(_loop_oracle("tmn_grpo", r, pid, tid, reweight=True, gamma=0.9, alpha=0.7), rel=1e-6)
    assert m["score/mean"] == pytest.approx(statistics.mean(r))
    assert m["adv/mean"] == pytest.approx(statistics.mean(a), abs=1e-7)
    assert m["adv/std"] == pytest.approx(statistics.stdev(a), rel=1e-6)
    assert m["adv/max"] == pytest.approx(max(a), rel=1e-6) and m["adv/min"] == pytest.approx(min(a), rel=1e-6)
    assert m["adv/pos_frac"] == pytest.approx(sum(x > 0 for x in a) / len(a))
    groups = {p: [r[i] for i in range(len(r)) if pid[i] == p] for p in dict.fromkeys(pid)}
    task_of = {p: tid[pid.index(p)] for p in groups}
    pop_sd = {p: statistics.pstdev(xs) if len(xs) > 1 else 0.0 for p, xs in groups.items()}
    mu = {p: statistics.mean(xs) if len(xs) > 1 else 0.0 for p, xs in groups.items()}
    # the reweighting factor and pass rate, per response and per prompt
    weights, rates = [], []
    for p, xs in groups.items():
        M = statistics.mean(mu[q] for q in groups if task_of[q] == task_of[p])
        sm = M if len(xs) == 1 else 0.7 * mu[p] + 0.3 * M
        pr = sum(x > sm for x in xs) / len(xs)
        rates.append(pr)
        weights += [math.exp(0.9 * ((0.5 - pr) if x > mu[p] else (pr - 0.5))) for x in xs]
    assert m["difficulty/mean_pass_rate"] == pytest.approx(statistics.mean(rates))
    assert m["difficulty/mean_weight"] == pytest.approx(statistics.mean(weights))
    for t in ("x", "y", "z"):
        xs = [r[i] for i in range(len(r)) if tid[i] == t]
        at = [a[i] for i in range(len(r)) if tid[i] == t]
        ps = [p for p in groups if task_of[p] == t]
        var = [statistics.variance(groups[p]) if len(groups[p]) > 1 else 1.0 for p in ps]
        assert m[f"task/{t}/mean_reward"] == pytest.approx(statistics.mean(xs)), t
        assert m[f"task/{t}/std_reward"] == pytest.approx(statistics.pstdev(xs)), t
        assert m[f"task/{t}/mean_std_reward"] == pytest.approx(statistics.mean(pop_sd[p] for p in ps)), t
        assert m[f"task/{t}/sqrt_mean_var"] == pytest.approx(math.sqrt(statistics.mean(var))), t
        assert m[f"task/{t}/rate_adv"] == pytest.approx(sum(pop_sd[p] for p in ps) / sum(pop_sd.values())), t
        assert m[f"task/{t}/rate_num"] == pytest.approx(len(ps) / len(groups)), t
        assert m[f"task/{t}/num_prompts"] == len(ps) and m[f"task/{t}/num_responses"] == len(xs), t
        assert m[f"task/{t}/adv_pos_frac"] == pytest.approx(sum(x > 0 for x in at) / len(at)), t


def _loop_oracle(est, r, pid, tid, norm=True, reweight=False, gamma=1.0, alpha=0.8):
    """The DESIGN.md formulas, one response at a time."""
    groups, tasks = {}, {}
    for i, (p, t) in enumerate(zip(pid, tid)):
        groups.setdefault(p, []).append(i)
        tasks.setdefault(t, []).append(i)
    mu, var = {}, {}
    for p, idx in groups.items():
        xs = [r[i] for i in idx]
        mu[p], var[p] = (0.0, 1.0) if len(xs) == 1 else (statistics.mean(xs), statistics.variance(xs))
    task_of = {p: tid[idx[0]] for p, idx in groups.items()}
    prompts_of = {t: [p for p in groups if task_of[p] == t] for t in tasks}
    out = []
    for i in range(len(r)):
        p, t = pid[i], tid[i]
        if est == "grpo":
            out.append((r[i] - mu[p]) / (math.sqrt(var[p]) + EPS))
        elif est == "dr_grpo":
            out.append(r[i] - mu[p])
        elif est == "task_norm":
            xs = [r[j] for j in tasks[t]]
            sd = 1.0 if len(xs) == 1 else statistics.stdev(xs)
            out.append((r[i] - statistics.mean(xs)) / (sd + EPS))
        else:
            s = math.sqrt(statistics.mean(var[q] for q in prompts_of[t]))
            a = (r[i] - mu[p]) / (s + EPS) if norm else r[i] - mu[p]
            if reweight:
                M = statistics.mean(mu[q] for q in prompts_of[t])
                sm = M if len(groups[p]) == 1 else alpha * mu[p] + (1 - alpha) * M
                pr = sum(r[j] > sm for j in groups[p]) / len(groups[p])
                a *= math.exp(gamma * (0.5 - pr)) if r[i] > mu[p] else math.exp(gamma * (pr - 0.5))
            out.append(a)
    return out


@pytest.mark.parametrize("est, kw", [("grpo", {}), ("dr_grpo", {}), ("task_norm", {}), ("tmn_grpo", {}),
                                     ("tmn_grpo", {"norm": False}),
                                     ("tmn_grpo", {"reweight": True, "gamma": 0.7, "alpha": 0.6})])
def test_estimators_match_loop_oracle_on_random_batches(est, kw):
    rng = random.Random(hash((est, tuple(kw))) % 1000)
    for _ in range(20):
        pid, tid, r = [], [], []
        for p in range(rng.randint(1, 9)):
            g, t = rng.choice([1, 2, 3, 5, 8]), rng.choice(["x", "y", "z"])
            for _ in range(g):  # quantised scores: ties and all-equal groups are common
                pid.append(f"p{p}")
                tid.append(t)
                r.append(rng.choice([0.0, 0.25, 0.5, 1.0, rng.random()]))
        order = list(range(len(r)))
        rng.shuffle(order)  # responses of a prompt need not be contiguous
        pid, tid, r = [pid[i] for i in order], [tid[i] for i in order], [r[i] for i in order]
        want = _loop_oracle(est, r, pid, tid, **kw)
        got, _ = compute_advantages(est, torch.tensor(r, dtype=torch.float64), pid, tid,
                                    norm_by_task_scale=kw.get("norm", True),
                                    difficulty_reweight=kw.get("reweight", False),
                                    gamma=kw.get("gamma", 1.0), alpha=kw.get("alpha", 0.8))
        assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_estimator_errors():
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        compute_advantages("ppo", torch.zeros(2), [0, 0], ["a", "a"])
    with pytest.raises(ValueError, match="tmn_grpo only"):
        compute_advantages("grpo", torch.zeros(2), [0, 0], ["a", "a"], difficulty_reweight=True)
    with pytest.raises(ValueError, match="several task"):
        compute_advantages("tmn_grpo", torch.zeros(2), [0, 0], ["a", "b"])
    # tensor prompt ids work too
    s = torch.tensor([1.0, 0.0, 0.25, 0.5, 0.5])
    a, _ = compute_advantages("grpo", s, torch.tensor([5, 5, 7, 7, 7]), ["a"] * 5)
    b, _ = compute_advantages("grpo", s, [5, 5, 7, 7, 7], ["a"] * 5)
    assert torch.equal(a, b) and a[0] > 0 > a[1]


# ------------------------------------------------------------------ policy loss


def _loss_inputs(n=401, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    lp = (old + torch.randn(n, generator=g, dtype=torch.float64) * 0.8).requires_grad_()
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, generator=g) > 0.2
    isw = torch.rand(n, generator=g, dtype=torch.float64) * 2
    ref = old + torch.randn(n, generator=g, dtype=torch.float64) * 0.3
    ent = torch.rand(n, generator=g, dtype=torch.float64).requires_grad_()
    return lp, old, adv, mask, isw, ref, ent


def test_policy_loss_value_and_grad_vs_per_token():
    lp, old, adv, mask, isw, ref, ent = _loss_inputs()
    n_glob = 1000  # the mini-batch's valid tokens (this micro-batch holds fewer)
    kl_coef, ent_coef = 0.05, 0.01
    loss, met = policy_loss(lp, old, adv, mask, global_token_count=n_glob, is_weights=isw, ref_logprob=ref,
                            kl_coef=kl_coef, entropy=ent, entropy_coef=ent_coef)
    loss.backward()
    # direct per-token computation with the analytic gradient d L_t / d logpi_t
    total, grad, branches = 0.0, [], {"unclipped": 0, "clipped": 0, "dual": 0}
    pg_sum = clip_n = lower_n = kl_sum = k3_sum = 0.0
    for t in range(lp.numel()):
        x, o, A, w = lp[t].item(), old[t].item(), adv[t].item(), isw[t].item()
        rho = math.exp(x - o)
        l1, l2 = -A * rho, -A * min(max(rho, 0.8), 1.28)
        if mask[t]:
            clip_n += l2 > l1
            lower_n += A < 0 and max(l1, l2) > -3 * A
            kl_sum += o - x
        if A < 0 and max(l1, l2) > -3 * A:
            lt, g = -3 * A, 0.0
            branches["dual"] += 1
        elif l1 >= l2:
            lt, g = l1, -A * rho
            branches["unclipped"] += 1
        else:
            lt, g = l2, 0.0
            branches["clipped"] += 1
        d = ref[t].item() - x
        k3 = math.exp(d) - d - 1
        dk3 = 1 - math.exp(d)
        if k3 > 10:  # the KL term is clamped at 10 (as verl does): no gradient beyond
            k3, dk3 = 10.0, 0.0
        if mask[t]:
            total += (w * lt + kl_coef * k3 - ent_coef * ent[t].item()) / n_glob
            pg_sum += w * lt
            k3_sum += k3
            grad.append((w * g + kl_coef * dk3) / n_glob)
        else:
            grad.append(0.0)
    assert min(branches.values()) >= 5, branches  # every branch of the loss is exercised
    assert loss.item() == pytest.approx(total, rel=1e-10)
    assert torch.allclose(lp.grad, torch.tensor(grad, dtype=torch.float64), rtol=1e-9, atol=1e-15)
    assert torch.allclose(ent.grad, -ent_coef * mask.double() / n_glob)
    assert met["entropy"].item() == pytest.approx((ent.detach() * mask).sum().item() / n_glob)
    # every metric is this micro-batch's masked sum over the global token count
    assert met["pg_loss"].item() == pytest.approx(pg_sum / n_glob, rel=1e-10)
    assert met["pg_clipfrac"].item() == pytest.approx(clip_n / n_glob)
    assert met["pg_clipfrac_lower"].item() == pytest.approx(lower_n / n_glob) and lower_n > 0
    assert met["ppo_kl"].item() == pytest.approx(kl_sum / n_glob, rel=1e-10)
    assert met["kl_loss"].item() == pytest.approx(k3_sum / n_glob, rel=1e-10)
    assert all(v.dim() == 0 and not v.requires_grad for v in met.values())


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_gspo_is_the_sequence_level_objective(agg):
    """algo.policy_loss=gspo: with each token's sequence-mean log ratio passed in, policy_loss's loss and gradient
    are those of GSPO's objective written per sequence -- s_i = exp(mean_t(logpi - logpi_old)) differentiated
    whole, J_i = max(-A_i s_i, -A_i clip(s_i, 1 - 3e-4, 1 + 4e-4)), weighted by the sequence's total aggregation
    weight -- on fresh random inputs with some sequences clipped and some not, in fp64."""
    g = torch.Generator().manual_seed(11)
    lengths = [7, 1, 12, 5, 9, 3, 15, 4]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    S, T = len(lengths), sum(lengths)
    seq = torch.repeat_interleave(torch.arange(S), torch.tensor(lengths))
    lp = (-torch.rand(T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    # each sequence's drift from the old policy, token noise of +-5e-5 around it: sequences 0, 1, 4 and 7 beyond
    # the clip on their advantage's side, 5 and 6 beyond it on the other (unclipped), 2 and 3 inside
    drift = torch.tensor([6e-4, -5e-4, 1e-4, -2e-4, 5e-4, -6e-4, 2e-4, 8e-4], dtype=torch.float64)
    old = lp.detach() - drift[seq] - (torch.rand(T, generator=g, dtype=torch.float64) - 0.5) * 1e-4
    adv = broadcast_to_tokens(torch.tensor([1.0, -0.5, 0.7, -1.2, 0.3, 1.5, -0.8, 0.9], dtype=torch.float64), cu)
    mask = torch.ones(T)
    mask[cu[2] + 3] = 0  # a token that does not count (in the mean either)
    weights = aggregation_weights(agg, torch.tensor(lengths), seq, S, 16)
    n_tokens = int(mask.sum())
    seq_mean = torch.stack([(lp.detach() - old)[seq == i][mask[seq == i] > 0].mean() for i in range(S)])
    loss, met = policy_loss(lp, old, adv, mask, global_token_count=n_tokens, clip_low=3e-4, clip_high=4e-4,
                            dual_clip=None, token_weights=weights, seq_log_ratio=seq_mean[seq])
    loss.backward()
    got = lp.grad.clone()
    lp.grad = None
    want, clipped = 0.0, 0
    for i in range(S):
        on = (seq == i) & (mask > 0)
        s_i = torch.exp((lp[on] - old[on]).mean())
        a = adv[cu[i]].item()
        j = torch.maximum(-a * s_i, -a * s_i.clamp(1 - 3e-4, 1 + 4e-4))
        clipped += bool(-a * s_i.clamp(1 - 3e-4, 1 + 4e-4) > -a * s_i)
        total_weight = weights[on].double().sum() if weights is not None else on.sum().double() / n_tokens
        want = want + total_weight * j
    want.backward()
    assert clipped == 4  # both branches exercised
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert torch.allclose(got, lp.grad, rtol=1e-10, atol=1e-14) and lp.grad.abs().max() > 0
    assert met["pg_clipfrac"].item() > 0 and met["pg_clipfrac_lower"].item() == 0


def test_policy_loss_defaults_and_errors():
    lp, old, adv, mask, *_ = _loss_inputs(seed=1)
    loss, met = policy_loss(lp, old, adv, mask, global_token_count=int(mask.sum()))
    ratio = torch.exp(lp.detach() - old)
    per_tok = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28))
    per_tok = torch.where(adv < 0, torch.minimum(per_tok, -3 * adv), per_tok)
    assert loss.item() == pytest.approx(per_tok[mask].mean().item(), rel=1e-10)
    assert met["pg_clipfrac"].item() == pytest.approx(
        ((-adv * ratio.clamp(0.8, 1.28) > -adv * ratio) & mask).double().mean().item() * len(mask) / mask.sum().item())
    with pytest.raises(ValueError, match="ref_logprob"):
        policy_loss(lp, old, adv, mask, global_token_count=1, kl_coef=0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(lp, old, adv, mask, global_token_count=1, dual_clip=0.5)


def test_policy_loss_with_infinite_bounds_is_the_unbounded_loss():
    """algo.dual_clip / clip_high = +inf (the config allows them: no bound) give dual clip off / no upper clip,
    with finite gradients where the advantage is 0 (-0 x inf is NaN in the unselected branch)."""
    lp, old, adv, mask, *_ = _loss_inputs(seed=4)
    adv = torch.where(torch.arange(len(adv)) % 3 == 0, torch.zeros_like(adv), adv)
    assert (adv[mask] == 0).any() and (adv[mask] < 0).any()
    grads = []
    for kw in ({"dual_clip": float("inf"), "clip_high": float("inf")}, {"dual_clip": None, "clip_high": 1e30}):
        x = lp.detach().clone().requires_grad_(True)
        loss, _ = policy_loss(x, old, adv, mask, global_token_count=int(mask.sum()), **kw)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    (l_inf, g_inf), (l_off, g_off) = grads
    assert torch.isfinite(g_inf).all() and l_inf == l_off and torch.equal(g_inf, g_off)


def test_policy_loss_ignores_whatever_invalid_tokens_hold():
    """Invalid tokens may carry -inf / NaN (padding logprobs, unset advantages): the loss, its metrics and
    its gradients must be those of the valid tokens alone, as verl's masked sum (where(mask, v, 0)) gives."""
    lp, old, adv, mask, isw, ref, ent = _loss_inputs(seed=3)
    kw = dict(global_token_count=int(mask.sum()), kl_coef=0.05, entropy_coef=0.01)
    v = mask.nonzero()[:, 0]
    # reference: the valid tokens only, no invalid token present at all
    lp_v = lp.detach()[v].clone().requires_grad_()
    ent_v = ent.detach()[v].clone().requires_grad_()
    want, want_m = policy_loss(lp_v, old[v], adv[v], torch.ones(len(v), dtype=torch.bool), is_weights=isw[v],
                               ref_logprob=ref[v], entropy=ent_v, **kw)
    want.backward()
    bad = ~mask
    poison = [float("nan"), float("inf"), float("-inf")]
    fill = torch.tensor([poison[i % 3] for i in range(int(bad.sum()))], dtype=torch.float64)

    def spoil(x):
        x = x.detach().clone()
        x[bad] = fill
        return x

    lp_b, ent_b = spoil(lp).requires_grad_(), spoil(ent).requires_grad_()
    got, got_m = policy_loss(lp_b, spoil(old), spoil(adv), mask, is_weights=spoil(isw), entropy=ent_b,
                             ref_logprob=spoil(ref), **kw)
    got.backward()
    assert math.isfinite(got.item()) and got.item() == pytest.approx(want.item(), rel=1e-12)
    for k in want_m:
        assert got_m[k].item() == pytest.approx(want_m[k].item(), rel=1e-12, abs=1e-15), k
    assert torch.equal(lp_b.grad[bad], torch.zeros(int(bad.sum()), dtype=torch.float64))
    assert torch.allclose(lp_b.grad[v], lp_v.grad, rtol=1e-12, atol=0)
    assert torch.equal(ent_b.grad[bad], torch.zeros(int(bad.sum()), dtype=torch.float64))
    assert torch.allclose(ent_b.grad[v], ent_v.grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("count", [0, torch.tensor(0)])
def test_policy_loss_of_a_mini_batch_without_valid_tokens_is_zero(count):
    """No valid token in the mini-batch (e.g. every response empty): loss, metrics and gradient 0, not 0/0."""
    lp = torch.tensor([-0.5, -1.0], dtype=torch.float64, requires_grad=True)
    loss, m = policy_loss(lp, lp.detach() - 0.1, torch.tensor([1.0, -2.0], dtype=torch.float64),
                          torch.zeros(2, dtype=torch.bool), global_token_count=count)
    loss.backward()
    assert loss.item() == 0.0 and all(x.item() == 0.0 for x in m.values())
    assert lp.grad.tolist() == [0.0, 0.0]


class _TinyPolicy(torch.nn.Module):
    """logprob of the next token under a bigram softmax: enough to give the loss real parameters."""

    def __init__(self, vocab=23, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g, dtype=torch.float64))

    def forward(self, ids, cu):
        logits = self.table[ids].log_softmax(-1)  # [T, V]
        nxt = torch.roll(ids, -1)
        lp = logits.gather(1, nxt[:, None])[:, 0]
        last = torch.zeros_like(ids, dtype=torch.bool)
        last[(cu[1:] - 1).long()] = True
        return lp, last  # the last token of each sequence has no target


def _batch(seed=0, n_seq=8):
    g = torch.Generator().manual_seed(seed)
    seqs, advs, prompts = [], [], []
    for _ in range(n_seq):
        n = int(torch.randint(5, 40, (1,), generator=g))
        seqs.append(torch.randint(0, 23, (n,), generator=g))
        prompts.append(int(torch.randint(1, n - 2, (1,), generator=g)))
        advs.append(float(torch.randn(1, generator=g)))
    return seqs, advs, prompts


def _valid_count(seqs, prompts, idx):
    return sum(len(seqs[i]) - prompts[i] - 1 for i in idx)


def test_same_gradient_for_1_2_4_micro_batches():
    seqs, advs, prompts = _batch()
    n_glob = _valid_count(seqs, prompts, range(len(seqs)))

    def grad_for(splits, per_micro_mean=False):
        model = _TinyPolicy()
        for idx in splits:
            n = _valid_count(seqs, prompts, idx) if per_micro_mean else n_glob
            _micro_loss_seeded(model, seqs, advs, prompts, idx, n).backward()
        return model.table.grad.clone()

    g1 = grad_for([list(range(8))])
    g2 = grad_for([[0, 1, 2], [3, 4, 5, 6, 7]])
    g4 = grad_for([[0, 5], [1, 6], [2, 7], [3, 4]])
    assert g1.abs().sum() > 0
    for g in (g2, g4):
        assert torch.allclose(g, g1, rtol=1e-12, atol=1e-15)
    # a per-micro-batch token mean (what the global normaliser avoids) gives a different gradient
    assert not torch.allclose(grad_for([[0, 1, 2], [3, 4, 5, 6, 7]], per_micro_mean=True), g1)


def _dist_grad_worker(rank: int, world: int) -> None:
    import torch.distributed as dist

    seqs, advs, prompts = _batch(seed=3)
    mine = [i for i in range(len(seqs)) if i % world == rank]
    # the normaliser: valid tokens of the whole mini-batch, summed over ranks
    n_glob = torch.tensor(float(_valid_count(seqs, prompts, mine)), dtype=torch.float64)
    dist.all_reduce(n_glob)
    assert n_glob.item() == _valid_count(seqs, prompts, range(len(seqs)))
    model = _TinyPolicy()
    for idx in (mine[: len(mine) // 2], mine[len(mine) // 2:]):  # 2 micro-batches per rank
        _micro_loss_seeded(model, seqs, advs, prompts, idx, n_glob).backward()
    grad = model.table.grad.clone()
    dist.all_reduce(grad)  # SUM across ranks
    ref = _TinyPolicy()
    _micro_loss_seeded(ref, seqs, advs, prompts, list(range(len(seqs))), n_glob.item()).backward()
    assert torch.allclose(grad, ref.table.grad, rtol=1e-12, atol=1e-15), (grad - ref.table.grad).abs().max()


def _micro_loss_seeded(model, seqs, advs, prompts, idx, n_glob):
    ids = torch.cat([seqs[i] for i in idx])
    cu = torch.zeros(len(idx) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor([len(seqs[i]) for i in idx]), 0)
    lp, last = model(ids, cu)
    mask = torch.cat([torch.arange(len(seqs[i])) >= prompts[i] for i in idx]) & ~last
    adv = broadcast_to_tokens(torch.tensor([advs[i] for i in idx], dtype=torch.float64), cu)
    noise = torch.cat([torch.randn(len(seqs[i]), generator=torch.Generator().manual_seed(100 + i),
                                   dtype=torch.float64) * 0.3 for i in idx])
    loss, _ = policy_loss(lp, lp.detach() + noise, adv, mask, global_token_count=n_glob)
    return loss


@pytest.mark.distributed
def test_two_gloo_ranks_give_the_single_process_gradient():
    run_distributed(_dist_grad_worker, 2)


# ------------------------------------------------------------------ rollout IS


def test_rollout_is_kl_is_exact_at_a_small_mismatch():
    """At per-token mismatches d ~ 3e-4 the k3 term exp(d) - d - 1 ~ d^2 / 2 is below fp32's resolution near 1:
    computed in fp32, mismatch/kl read 26% low. fp32 logprobs, as the trainer passes them."""
    g = torch.Generator().manual_seed(0)
    roll = -torch.rand(4000, generator=g) * 3
    old = roll + torch.randn(4000, generator=g) * 3e-4
    _, m = rollout_is_weights(old, roll, torch.ones(4000, dtype=torch.bool), mode="truncate",
                              cu_seqlens=torch.tensor([0, 1500, 4000], dtype=torch.int32))
    d = old.double() - roll.double()
    assert m["mismatch/kl"].dtype == torch.float32
    assert m["mismatch/kl"].item() == pytest.approx((torch.expm1(d) - d).mean().item(), rel=1e-4)

def test_rollout_is_hand():
    # two sequences of 4 and 3 tokens; rho per token chosen directly
    rho = torch.tensor([0.4, 1.0, 6.0, 2.0, 1e-5, 1.5, 0.9], dtype=torch.float64)
    roll = -torch.rand(7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    old = roll + rho.log()
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    cu = torch.tensor([0, 4, 7], dtype=torch.int32)
    w, m = rollout_is_weights(old, roll, mask, cu_seqlens=cu, mode="mask")
    # seq 0: 0.4 and 6 fall outside [0.5, 5]; seq 1 has rho 1e-5 < veto: all of it dropped
    assert w.tolist() == pytest.approx([0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0])
    assert m["rollout_is/masked_frac"].item() == pytest.approx(3 / 6)  # 0.4, 6, 1e-5
    assert m["rollout_is/veto_frac"].item() == pytest.approx(1 / 2)
    assert m["rollout_is/ratio_max"].item() == pytest.approx(6.0)
    assert m["rollout_is/ratio_min"].item() == pytest.approx(1e-5)
    lr = rho.log()[:6]
    assert m["mismatch/kl_k1"].item() == pytest.approx((-lr).mean().item(), rel=1e-6)
    # the k3 estimator under the name the trainer logs it
    assert m["mismatch/kl"].item() == pytest.approx((rho[:6] - lr - 1).mean().item(), rel=1e-6)
    ratio0 = math.exp(-lr[:4].mean().item())  # exp(mean(rollout - old)) per sequence
    ratio1 = math.exp(-lr[4:6].mean().item())
    assert m["mismatch/ppl_ratio"].item() == pytest.approx((ratio0 + ratio1) / 2, rel=1e-6)
    assert m["mismatch/trainer_ppl"].item() == pytest.approx(
        (math.exp(-old[:4].mean().item()) + math.exp(-old[4:6].mean().item())) / 2, rel=1e-6)
    w, m = rollout_is_weights(old, roll, mask, cu_seqlens=cu, mode="truncate", veto=None)
    assert w.tolist() == pytest.approx([0.4, 1.0, 5.0, 2.0, 1e-5, 1.5, 0.0], rel=1e-6)
    assert m["rollout_is/masked_frac"].item() == pytest.approx(1 / 6)
    assert m["rollout_is/veto_frac"].item() == 0.0
    # padded [S, L] input and seq_index give the same weights as cu_seqlens
    seq_index = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    w2, _ = rollout_is_weights(old, roll, mask, seq_index=seq_index)
    w3, _ = rollout_is_weights(old, roll, mask, cu_seqlens=cu)
    assert torch.equal(w2, w3)
    wp, _ = rollout_is_weights(old[:6].reshape(2, 3), roll[:6].reshape(2, 3), mask[:6].reshape(2, 3))
    assert wp.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]  # row 1 holds rho 1e-5: vetoed
    wp, _ = rollout_is_weights(old[:6].reshape(2, 3), roll[:6].reshape(2, 3), mask[:6].reshape(2, 3), veto=None)
    assert wp.reshape(-1).tolist() == pytest.approx([0.0, 1.0, 0.0, 2.0, 0.0, 1.5], rel=1e-6)
    with pytest.raises(ValueError, match="cu_seqlens or seq_index"):
        rollout_is_weights(old, roll, mask)
    with pytest.raises(ValueError, match="covers 6 tokens"):
        rollout_is_weights(old, roll, mask, cu_seqlens=torch.tensor([0, 4, 6]))


@pytest.mark.parametrize("level, mode", [("sequence", "truncate"), ("sequence", "mask"), ("geometric", "mask")])
def test_rollout_is_levels_weigh_each_response_by_its_ratio(level, mode):
    """algo.rollout_is_level: every token of a response weighs the response's ratio -- the product of its token
    ratios (sequence), truncated or masked by the bounds -- or, geometric, 1 where the geometric mean of its token
    ratios is inside the bounds and 0 outside (a rejection), both over its valid tokens only; the veto still reads
    the token ratios. Against a per-sequence loop in fp64 on fresh random inputs of odd lengths (a 1-token
    response included), with a padding token holding -inf."""
    g = torch.Generator().manual_seed(7)
    lengths = [5, 1, 9, 4, 13, 2]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    T = sum(lengths)
    roll = -torch.rand(T, generator=g, dtype=torch.float64) * 2
    # per-token drifts of +-0.15 around a per-response offset, so some responses leave the bounds and some do not
    offset = torch.tensor([0.02, -0.4, 0.001, 0.3, -0.002, 0.05], dtype=torch.float64)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    old = roll + offset[seq] + (torch.rand(T, generator=g, dtype=torch.float64) - 0.5) * 0.3
    mask = torch.ones(T, dtype=torch.bool)
    mask[cu[2] + 4] = False
    old[cu[2] + 4] = float("-inf")  # padding: not counted anywhere
    old[cu[4] + 6] = roll[cu[4] + 6] + math.log(1e-5)  # one token under the veto: response 4 dropped
    lower, upper = (0.9, 1.1) if level == "geometric" else (0.5, 2.0)
    w, m = rollout_is_weights(old, roll, mask, cu_seqlens=cu, mode=mode, lower=lower, upper=upper, level=level)
    want, outside = torch.zeros(T, dtype=torch.float64), 0
    for i in range(len(lengths)):
        on = (seq == i) & mask
        log_r = (old[on] - roll[on]).sum()
        r = math.exp(log_r / on.sum() if level == "geometric" else log_r)
        out = r > upper if mode == "truncate" else not lower <= r <= upper
        outside += bool(out)
        weight = min(r, upper) if mode == "truncate" else 0.0 if out else 1.0 if level == "geometric" else r
        want[on] = 0.0 if i == 4 else weight
    assert 1 <= outside <= len(lengths) - 2  # both sides of the bounds
    assert torch.allclose(w.double(), want, rtol=1e-5, atol=0)
    assert m["rollout_is/veto_frac"].item() == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="rollout IS level 'seq'"):
        rollout_is_weights(old, roll, mask, cu_seqlens=cu, level="seq")
    with pytest.raises(ValueError, match="rejects responses"):
        rollout_is_weights(old, roll, mask, cu_seqlens=cu, level="geometric", mode="truncate")


def test_rollout_is_weights_stay_finite_when_a_valid_token_has_no_ratio():
    # token 1 is -inf under both policies (a broken logprob), token 4 NaN in the trainer: no ratio exists, so
    # their sequences are vetoed (truncate and mask) and no weight is NaN; seq 2 is untouched
    roll = torch.tensor([-0.5, float("-inf"), -0.2, -0.3, -1.0, -0.7, -0.1])
    old = torch.tensor([-0.4, float("-inf"), -0.1, -0.3, float("nan"), -0.7, -0.3])
    mask = torch.ones(7, dtype=torch.bool)
    cu = torch.tensor([0, 3, 5, 7], dtype=torch.int32)
    for mode in ("truncate", "mask"):
        w, _ = rollout_is_weights(old, roll, mask, cu_seqlens=cu, mode=mode)
        assert w.isfinite().all(), (mode, w)
        assert w[:5].tolist() == [0.0] * 5
        assert w[5:].tolist() == pytest.approx([1.0, math.exp(-0.2)], rel=1e-6)
    w, _ = rollout_is_weights(old, roll, mask, cu_seqlens=cu, mode="truncate", veto=None)
    assert w.isfinite().all() and w[[1, 4]].max() < 1e-8


def test_rollout_is_means_bounds_and_invalid_tokens():
    # packed: seq 0 valid tokens rho (0.5, 5.0, 2.0) -- the mask-mode bounds are inclusive -- and an
    # invalid (prompt) token with rho 1e-6 that must not veto it; seq 1 has no valid token at all
    # (not counted in the per-sequence means); seq 2 valid tokens (0.25, 1.0)
    rho = torch.tensor([1e-6, 0.5, 5.0, 2.0, 3e-6, 1.0, 0.25, 1.0], dtype=torch.float32)
    roll = torch.tensor([-0.3, 0.0, 0.0, -0.1, -1.1, -0.4, -1.6, -0.9])  # 0 at the bounds: rho exact
    old = roll + rho.log()
    rho = torch.exp(old - roll).double()  # what the code sees
    mask = torch.tensor([0, 1, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    cu = torch.tensor([0, 4, 6, 8], dtype=torch.int32)
    w, m = rollout_is_weights(old, roll, mask, cu_seqlens=cu, mode="mask")
    assert w.tolist() == pytest.approx([0.0, 0.5, 5.0, 2.0, 0.0, 0.0, 0.0, 1.0], rel=1e-6)
    v = mask.nonzero()[:, 0].tolist()
    wv = [0.5, 5.0, 2.0, 0.0, 1.0]
    assert m["rollout_is/weight_mean"].item() == pytest.approx(sum(wv) / 5, rel=1e-6)
    assert m["rollout_is/ratio_mean"].item() == pytest.approx(rho[v].mean().item(), rel=1e-6)
    assert m["rollout_is/masked_frac"].item() == pytest.approx(1 / 5)
    assert m["rollout_is/veto_frac"].item() == 0.0
    assert m["rollout_is/ratio_min"].item() == pytest.approx(0.25, rel=1e-6)
    seqs = [[1, 2, 3], [6, 7]]  # valid tokens of the two sequences that have any
    mo = [old[s].double().mean().item() for s in seqs]
    mr = [roll[s].double().mean().item() for s in seqs]
    assert m["mismatch/trainer_ppl"].item() == pytest.approx(sum(math.exp(-x) for x in mo) / 2, rel=1e-6)
    assert m["mismatch/rollout_ppl"].item() == pytest.approx(sum(math.exp(-x) for x in mr) / 2, rel=1e-6)
    assert m["mismatch/ppl_ratio"].item() == pytest.approx(
        sum(math.exp(b - a) for a, b in zip(mo, mr)) / 2, rel=1e-6)
    # a valid token below the veto in seq 2 drops it: 1 of the 2 sequences with valid tokens
    mask2 = mask.clone()
    mask2[4] = True
    cu2 = torch.tensor([0, 4, 8], dtype=torch.int32)
    w, m = rollout_is_weights(old, roll, mask2, cu_seqlens=cu2, mode="truncate", upper=4.0)
    assert w.tolist() == pytest.approx([0.0, 0.5, 4.0, 2.0, 0.0, 0.0, 0.0, 0.0], rel=1e-6)
    assert m["rollout_is/veto_frac"].item() == pytest.approx(1 / 2)
    assert m["rollout_is/masked_frac"].item() == pytest.approx(1 / 6)  # only 5.0 > upper; veto is apart


def test_rollout_is_metrics_ignore_what_invalid_tokens_hold():
    """-inf / NaN logprobs on invalid tokens leave the weights and every metric as with finite ones."""
    g = torch.Generator().manual_seed(5)
    roll = -torch.rand(40, generator=g) * 2
    old = roll + torch.randn(40, generator=g) * 0.5
    mask = torch.rand(40, generator=g) > 0.3
    cu = torch.tensor([0, 7, 19, 26, 40], dtype=torch.int32)
    for mode in ("mask", "truncate"):
        w0, m0 = rollout_is_weights(old, roll, mask, cu_seqlens=cu, mode=mode)
        o, r = old.clone(), roll.clone()
        o[~mask] = float("nan")
        r[~mask] = torch.tensor([float("-inf"), float("nan")]).repeat(20)[: int((~mask).sum())]
        w1, m1 = rollout_is_weights(o, r, mask, cu_seqlens=cu, mode=mode)
        assert torch.equal(w0, w1)
        for k in m0:
            assert math.isfinite(m1[k].item()) and m1[k].item() == pytest.approx(m0[k].item(), rel=1e-6), k


def test_is_weights_scale_the_loss():
    lp, old, adv, mask, *_ = _loss_inputs(seed=2)
    w = torch.rand(lp.shape, dtype=torch.float64)
    l_w, _ = policy_loss(lp, old, adv, mask, global_token_count=100, is_weights=w)
    ratio = torch.exp(lp.detach() - old)
    tok = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.28))
    tok = torch.where(adv < 0, torch.minimum(tok, -3 * adv), tok)
    assert l_w.item() == pytest.approx((tok * w * mask).sum().item() / 100, rel=1e-10)


# ------------------------------------------------------------------ dynamic sampling


def test_overlong_penalty_is_dapos_soft_punishment():
    """0 up to max - buffer tokens, then -factor x excess / buffer, reaching -factor at the response budget."""
    lengths = torch.tensor([1, 700, 767, 768, 769, 900, 1023, 1024])
    got = overlong_penalty(lengths, 1024, 256, 0.5)
    want = [min(0.0, -(n - 768) / 256 * 0.5) for n in lengths.tolist()]
    assert got.dtype == torch.float64 and got.tolist() == pytest.approx(want, abs=1e-15)
    assert got[-1] == -0.5 and got[4] < 0 == got[3]
    assert torch.equal(overlong_penalty(lengths, 1024, 0, 0.5), torch.zeros(8, dtype=torch.float64))


def test_aggregation_weights_per_token():
    """Three responses of lengths 2, 1, 3 in a mini-batch of S = 4 (the fourth on another rank)."""
    lengths, seq = torch.tensor([2, 1, 3]), torch.tensor([0, 0, 1, 2, 2, 2])
    assert aggregation_weights("token-mean", lengths, seq, 4, 8) is None
    got = {m: aggregation_weights(m, lengths, seq, 4, 8).tolist() for m in AGG_MODES[1:]}
    assert got["seq-mean-token-mean"] == pytest.approx([1 / 8, 1 / 8, 1 / 4, 1 / 12, 1 / 12, 1 / 12])
    assert got["seq-mean-token-sum"] == pytest.approx([1 / 4] * 6)
    assert got["seq-mean-token-sum-norm"] == pytest.approx([1 / 32] * 6)
    with pytest.raises(ValueError, match="choose one of: token-mean, seq-mean-token-mean"):
        aggregation_weights("seq-sum", lengths, seq, 4, 8)
    from golong.config import ADV_ESTIMATORS, LOSS_AGG_MODES  # the config's choices are the algorithms'

    assert (ADV_ESTIMATORS, LOSS_AGG_MODES) == (ESTIMATORS, AGG_MODES)


def test_dynamic_sampling_filter():
    scores = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.0, 0.0, 0.3, 1.0, 1.0, 1.0])
    pids = ["a", "a", "b", "b", "c", "c", "d", "e", "e", "e"]
    keep, m = dynamic_sampling_filter(scores, pids)  # DESIGN.md: a group of one has all its scores equal
    assert keep.tolist() == [False, False, True, True, False, False, False, False, False, False]
    assert m["dynamic_sampling/kept_prompts"] == 1 and m["dynamic_sampling/dropped_prompts"] == 4
    assert m["dynamic_sampling/dropped_all_max"] == 2 and m["dynamic_sampling/dropped_all_zero"] == 1
    assert m["dynamic_sampling/kept_frac"] == pytest.approx(1 / 5)
    assert m["dynamic_sampling/num_prompts"] == 5
    # keep_singletons: a group of one is kept, as GoLongRL's filter keeps it (`std > 0 or len == 1`)
    keep, m = dynamic_sampling_filter(scores, pids, keep_singletons=True)
    assert keep.tolist() == [False, False, True, True, False, False, True, False, False, False]
    assert m["dynamic_sampling/kept_prompts"] == 2 and m["dynamic_sampling/dropped_prompts"] == 3
    assert m["dynamic_sampling/dropped_all_max"] == 2 and m["dynamic_sampling/dropped_all_zero"] == 1
    assert m["dynamic_sampling/kept_frac"] == pytest.approx(2 / 5)
    # a lone 1.0 or 0.0 is kept too, so it counts in neither dropped_all_* metric
    keep, m = dynamic_sampling_filter(torch.tensor([1.0, 0.0, 0.0]), ["x", "y", "y"], keep_singletons=True)
    assert keep.tolist() == [True, False, False]
    assert m["dynamic_sampling/dropped_all_max"] == 0 and m["dynamic_sampling/dropped_all_zero"] == 1


def test_longbench_pro_subtasks_share_their_metric_groups_task_statistics():
    """GoLongRL groups LongBench-Pro records by metric (TASK_METRIC_CONFIG) before TMN-GRPO: T1.1 and T1.2
    share one task scale s_m and one task mean M_m ("NDCG"); other task names stay as they are."""
    from golong.rewards import LONGBENCH_PRO, task_group

    assert task_group("T1.1 Global Cohesive Retrieval") == task_group("T1.2 Key-Snippet Retrieval") == "NDCG"
    assert task_group("T4.2 Query-Focused Summary") == task_group("t4.1") == "Summary"
    assert task_group("T6.2 Targeted Subset Cluster Identification") == "F1_Score"
    assert task_group("T6.3 Global Frequency Analysis") == "Pairwise_Accuracy"
    assert task_group("T8.1 Structured Multi-Source Consistency Verification") == "SubEM"
    assert task_group("T11.2 Short-Range Reference Resolution & State Query") == "Accuracy"
    assert task_group("graded_ranking") == "graded_ranking" and task_group("math_verify") == "math_verify"
    assert len({task_group(t) for t in LONGBENCH_PRO}) == 6
    r = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.0]
    pids = [0, 0, 0, 0, 1, 1, 1, 1]
    raw = ["T1.1 Global Cohesive Retrieval"] * 4 + ["T1.2 Key-Snippet Retrieval"] * 4
    a, m = compute_advantages("tmn_grpo", torch.tensor(r, dtype=torch.float64), pids,
                              [task_group(t) for t in raw], difficulty_reweight=True)
    # by hand: v_0 = 0.25, v_1 = 11/48, one task: s = sqrt((0.25 + 11/48) / 2); mu = 0.25, 0.625
    s = math.sqrt((0.25 + 11 / 48) / 2)
    M = (0.25 + 0.625) / 2
    p0 = sum(x > 0.8 * 0.25 + 0.2 * M for x in r[:4]) / 4  # 1 of 4
    p1 = sum(x > 0.8 * 0.625 + 0.2 * M for x in r[4:]) / 4  # 2 of 4
    want = [(x - 0.25) / (s + EPS) * math.exp((0.5 - p0) if x > 0.25 else (p0 - 0.5)) for x in r[:4]]
    want += [(x - 0.625) / (s + EPS) * math.exp((0.5 - p1) if x > 0.625 else (p1 - 0.5)) for x in r[4:]]
    assert a.double().tolist() == pytest.approx(want, rel=1e-6)
    assert m["task/NDCG/num_prompts"] == 2 and m["task/NDCG/sqrt_mean_var"] == pytest.approx(s)
    per_subtask, _ = compute_advantages("tmn_grpo", torch.tensor(r, dtype=torch.float64), pids, raw,
                                        difficulty_reweight=True)
    assert not torch.allclose(per_subtask, a)  # a scale per subtask is a different estimator
