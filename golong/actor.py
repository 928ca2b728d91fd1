"""The policy update: rollouts packed into micro-batches, the PPO-style loss over mini-batches of prompts, the
optimizer and its LR schedule (`Actor.update`).

Token layout of one sequence (prompt p_0..p_{P-1}, response r_0..r_{R-1}), packed with others:
position t predicts token t+1, so response token r_j is scored at position P-1+j; those R
positions carry the loss mask, the advantage, the rollout logprob and the old logprob.

Shared prompts (trainer.share_prompts): the k responses of one prompt in a micro-batch are packed as
p_0..p_{P-2} once, then each response as its own document [p_{P-1}, r_0..r_{R-1}] that attends to that
copy as a prefix (MicroBatch.prefix_of) with positions continuing after it. Every response is scored exactly
as its whole sequence would be, and the prompt's forward and backward run once instead of k times.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from golong.config import RunConfig
from golong.logger import get_logger
from golong.models.checkpoint import full_parameters
from golong.parallel import (
    ParallelDims,
    all_gather_objects,
    compute_device,
    cp_gather,
    cp_shard,
    plan_all_micro_batches,
)
from golong.profiling import nvtx_range
from golong.replay import RouteKey

log = get_logger()

IGNORE = -100


@dataclass
class Rollout:
    """One response to one prompt: the unit of the training batch."""

    # [P] int; in training the prompt's own int32 array, shared by its n responses (a copy each took n times the
    # prompt's memory, on every rank, for every generation batch of the step)
    prompt_ids: Sequence[int]
    response_ids: Sequence[int]  # [R] int (int32 array in training)
    rollout_logprobs: Sequence[float] | None  # [R] sampled-token logprobs from the rollout engine (fp32 array)
    group: int  # prompt group (responses to the same prompt share it)
    task: str
    score: float = 0.0
    advantage: float = 0.0
    finish_reason: str = "length"
    prompt_index: int | None = None  # position of its prompt in the trainer's training prompts (rollouts it made)
    text: str | None = None  # the decoded response, stop token stripped: on rank 0 with logging.dump_rollouts only
    # with rollout.reward_function: the numbers its dict result held beside the score (every rank: dynamic
    # sampling may filter on one), and the call's failure and all it held (FunctionReport.infos; rank 0, for the dump)
    reward_numbers: dict[str, float] | None = None
    reward_info: dict[str, Any] | None = None
    # routing replay (rollout.router_replay, a MoE model): where the engine's record of it lives (golong.replay), and
    # on the ranks that train on it the experts the engine routed each token it read to: [P, layers, top_k] for the
    # prompt (one array, shared by its responses) and [R - 1, layers, top_k] for the response (its last token was
    # never read); uint8 / int16
    route_key: RouteKey | None = None
    prompt_experts: np.ndarray | None = None
    response_experts: np.ndarray | None = None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class MicroBatch:
    """Packed per-token tensors of some rollouts, in GLOBAL packed order (before cp sharding)."""

    input_ids: torch.Tensor  # [T] int64
    targets: torch.Tensor  # [T] int64, IGNORE off the response
    cu_seqlens: torch.Tensor  # [B+1] int32
    mask: torch.Tensor  # [T] fp32, 1 on response-scoring positions
    advantages: torch.Tensor  # [T] fp32
    rollout_logprobs: torch.Tensor  # [T] fp32 (0 where unknown)
    has_rollout_logprobs: bool
    old_logprobs: torch.Tensor | None  # [T] fp32
    ref_logprobs: torch.Tensor | None  # [T] fp32, the reference policy's (algo.kl_coef > 0)
    seq_index: torch.Tensor  # [T] int64, position of each token's sequence in `indices`
    indices: list[int]  # rollout indices, packed order (empty: a dummy micro-batch)
    starts: list[int]  # the packed row scoring each of `indices`' first response token
    prefix_of: torch.Tensor | None = None  # [B] int32: a document's shared prompt document (-1: none); None: none
    # [T, layers, top_k] int16: the experts each row replays (-1: none recorded, the router's own top-k); None: no
    # rollout of the micro-batch has them
    routed_experts: torch.Tensor | None = None


def prompt_runs(rollouts: Sequence[Rollout], indices: Sequence[int]) -> list[list[int]]:
    """`indices` cut into runs of consecutive rollouts of one prompt (group)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and rollouts[runs[-1][-1]].group == rollouts[i].group:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def shares_prompt(rollouts: Sequence[Rollout], run: Sequence[int]) -> bool:
    """Whether a run of one prompt's rollouts packs its prompt once: two or more responses, a prompt of two or more
    tokens (its last token opens each response's document), the same prompt in each (in training one array)."""
    first = rollouts[run[0]].prompt_ids
    return len(run) > 1 and len(first) > 1 and all(
        rollouts[i].prompt_ids is first or np.array_equal(rollouts[i].prompt_ids, first) for i in run[1:])


def packed_rows(rollouts: Sequence[Rollout], run: Sequence[int], share: bool) -> int:
    """Rows a run of one prompt's rollouts takes in a micro-batch."""
    if share and shares_prompt(rollouts, run):
        return len(rollouts[run[0]].prompt_ids) - 1 + sum(len(rollouts[i].response_ids) + 1 for i in run)
    return sum(rollouts[i].length for i in run)


def _even(run: Sequence[int], m: int) -> list[list[int]]:
    """run cut into m consecutive parts whose lengths differ by at most one."""
    return [list(run[j * len(run) // m:(j + 1) * len(run) // m]) for j in range(m)]


def _split_run(rollouts: Sequence[Rollout], run: Sequence[int], total: int, dp: int) -> list[list[int]]:
    """A run of one prompt's rollouts in m parts of near-equal response counts, each with its own prompt copy: the
    least m that minimises an estimate of the busiest dp rank's rows, max(all rows with the m - 1 extra copies /
    dp, the largest part). A run above a rank's share is split so the others get work; not where its prompt alone
    is about a share, which each part would carry again."""
    k, p = len(run), len(rollouts[run[0]].prompt_ids) - 1
    r = sum(len(rollouts[i].response_ids) + 1 for i in run) / k
    best = min(range(1, k + 1), key=lambda m: (max((total + (m - 1) * p) / dp, p + math.ceil(k / m) * r), m))
    return _even(run, best)


def _cut_runs(rollouts: Sequence[Rollout], runs: Sequence[Sequence[int]], limit: int) -> list[list[int]]:
    """Each run of one prompt's rollouts cut, in order, into parts whose packed rows (shared) stay within `limit`
    (a single rollout over it is a part of its own)."""
    parts: list[list[int]] = []
    for run in runs:
        part: list[int] = []
        for i in run:
            if part and packed_rows(rollouts, part + [i], True) > limit:
                parts.append(part)
                part = []
            part.append(i)
        parts.append(part)
    return parts


def build_micro_batch(rollouts: Sequence[Rollout], indices: Sequence[int], old: dict[int, torch.Tensor] | None,
                      min_tokens: int = 4, ref: dict[int, torch.Tensor] | None = None, share_prompts: bool = False
                      ) -> MicroBatch:
    """old / ref: response-token logprobs by rollout index ([R] fp32), of the old and the reference policy.
    share_prompts: consecutive rollouts of one prompt pack it once (the module docstring's layout)."""
    ids, tgt, mask, adv, rlp, olp, ref_lp, seq = [], [], [], [], [], [], [], []
    cu, starts, prefix_of, routes = [0], [], [], []
    has_rlp = bool(indices) and all(rollouts[i].rollout_logprobs is not None for i in indices)
    recorded = [i for i in indices if rollouts[i].prompt_experts is not None]
    route_shape = rollouts[recorded[0]].prompt_experts.shape[1:] if recorded else None

    def experts(i: int, a: int, b: int) -> np.ndarray:
        """The recorded experts of rollout i's sequence positions [a, b) (prompt then response), -1 where it has
        none (its last token, which the engine never read)."""
        r, out = rollouts[i], np.full((b - a, *route_shape), -1, np.int16)
        if r.prompt_experts is not None:
            for rows, start in ((r.prompt_experts, 0), (r.response_experts, len(r.prompt_ids))):
                lo, hi = max(a, start), min(b, start + len(rows))
                if hi > lo:
                    out[lo - a:hi - a] = rows[lo - start:hi - start]
        return out

    def add(tokens: np.ndarray, first: int, k: int, i: int | None, prefix: int = -1) -> None:
        """One document: rows first.. score rollout i's response (i None: a shared prompt, nothing scored);
        prefix: the index of its shared prompt's document."""
        full = torch.from_numpy(tokens.astype(np.int64, copy=False))
        t = torch.full_like(full, IGNORE)
        m, lp = torch.zeros(len(full)), torch.zeros(len(full))
        olp.append(torch.zeros(len(full))), ref_lp.append(torch.zeros(len(full)))
        if i is not None:
            r = rollouts[i]
            n = len(r.response_ids)
            t[first: first + n] = full[first + 1:]
            m[first: first + n] = 1.0
            if has_rlp:
                lp[first: first + n] = torch.tensor(r.rollout_logprobs, dtype=torch.float32)
            for given, out in ((old, olp), (ref, ref_lp)):
                if given is not None:
                    out[-1][first: first + n] = given[i]
            starts.append(cu[-1] + first)
        ids.append(full), tgt.append(t), mask.append(m), rlp.append(lp)
        adv.append(m * rollouts[i].advantage if i is not None else m)
        seq.append(torch.full((len(full),), k, dtype=torch.long))
        cu.append(cu[-1] + len(full))
        prefix_of.append(prefix)

    k = 0
    for run in prompt_runs(rollouts, indices):
        prompt = np.asarray(rollouts[run[0]].prompt_ids)
        shared = share_prompts and shares_prompt(rollouts, run)
        if shared:
            parent = len(cu) - 1
            add(prompt[:-1], 0, k, None)
            if route_shape is not None:  # the prompt's rows once: the run's first response's record of them
                routes.append(experts(run[0], 0, len(prompt) - 1))
        for i in run:
            response = np.asarray(rollouts[i].response_ids)
            if shared:
                add(np.concatenate([prompt[-1:], response]), 0, k, i, parent)
            else:
                add(np.concatenate([prompt, response]), len(prompt) - 1, k, i)
            if route_shape is not None:
                routes.append(experts(i, len(prompt) - 1 if shared else 0, len(prompt) + len(response)))
            k += 1
    if not indices:  # dummy: FSDP needs every rank in every forward; this one has no loss tokens
        ids = [torch.zeros(min_tokens, dtype=torch.long)]
        tgt = [torch.full((min_tokens,), IGNORE, dtype=torch.long)]
        mask = adv = rlp = olp = ref_lp = [torch.zeros(min_tokens)]
        seq = [torch.zeros(min_tokens, dtype=torch.long)]
        cu.append(min_tokens)
    routed = torch.from_numpy(np.concatenate(routes)) if routes else None
    return MicroBatch(torch.cat(ids), torch.cat(tgt), torch.tensor(cu, dtype=torch.int32), torch.cat(mask),
                      torch.cat(adv), torch.cat(rlp), has_rlp, torch.cat(olp) if old is not None else None,
                      torch.cat(ref_lp) if ref is not None else None, torch.cat(seq), list(indices), starts,
                      torch.tensor(prefix_of, dtype=torch.int32) if any(p >= 0 for p in prefix_of) else None,
                      routed)


def split_mini_batches(rollouts: Sequence[Rollout], prompts_per_mini_batch: int) -> list[list[int]]:
    """Rollout indices grouped by prompt, `prompts_per_mini_batch` prompts per mini-batch."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(rollouts):
        groups[r.group].append(i)
    order = list(groups)
    return [[i for g in order[s:s + prompts_per_mini_batch] for i in groups[g]]
            for s in range(0, len(order), prompts_per_mini_batch)]


def _fmt(v: Any) -> str:
    """A hyperparameter for the resume log (6 significant digits: a float read back equals its config value)."""
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, kind: str = "constant",
                   min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:  # step = trainer steps (updates) taken so far, as verl counts them
        if step < warmup:  # (step + 1): the first update already moves (verl's step / warmup spends it at lr 0)
            return (step + 1) / (warmup + 1)
        if kind == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Actor:
    """The policy under training: FSDP-sharded model, optimizer, LR schedule, and the update.

    `update(rollouts)` runs the PPO-style epochs over mini-batches and returns metrics that are
    already reduced over all ranks. All ranks must call it with the same (gathered) rollouts.
    """

    def __init__(self, model: nn.Module, dims: ParallelDims, cfg: RunConfig, reference: nn.Module | None = None
                 ) -> None:
        """reference: the frozen reference policy of the KL term (build_model(reference=True)); None: no KL."""
        self.model, self.dims, self.cfg, self.reference = model, dims, cfg, reference
        self.device = compute_device()  # not the parameters' device: with CPU offload they live on the host
        self.optimizer = self._make_optimizer(cfg.optim.lr)
        self.scheduler = make_scheduler(self.optimizer, cfg.optim.warmup_steps, cfg.trainer.total_steps,
                                        cfg.optim.lr_schedule, cfg.optim.min_lr_ratio)
        self.temperature = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0

    def _make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        # weight decay on every parameter, norm gains included, as verl's FSDP actor and torchtitan do (the
        # recipe's Megatron exempts 1-D parameters: at lr 2e-6, decay 0.1, 450 steps, a 9e-5 relative difference)
        o = self.cfg.optim
        return torch.optim.AdamW(self.model.parameters(), lr=lr, betas=tuple(o.betas), eps=o.adam_eps,
                                 weight_decay=o.weight_decay, foreach=o.impl == "foreach",
                                 fused=True if o.impl == "fused" else None)

    def reset_optimizer(self, lr: float | None = None, warmup: int | None = None, total: int | None = None) -> None:
        """Fresh optimizer state and schedule (the SFT warm-up's, then RL's). The schedule counts updates
        (trainer steps): a step whose batch dynamic sampling could not fill does not shift it."""
        o = self.cfg.optim
        self.optimizer = self._make_optimizer(o.lr if lr is None else lr)
        self.scheduler = make_scheduler(self.optimizer, o.warmup_steps if warmup is None else warmup,
                                        self.cfg.trainer.total_steps if total is None else total, o.lr_schedule,
                                        o.min_lr_ratio)

    def apply_config_hyperparameters(self, lr: float | None = None, lr_key: str = "optim.lr") -> list[str]:
        """After a resume: the config's optimizer settings (lr, weight decay, betas, eps, impl) replace the
        checkpoint's, which loading its param groups brought back (the schedule keeps its position). `lr`,
        `lr_key`: the SFT warm-up's (trainer.sft_lr) instead of optim.lr. Returns what changed, for the log."""
        o = self.cfg.optim
        lr = o.lr if lr is None else lr
        g = self.optimizer.param_groups[0]
        impl = "fused" if g.get("fused") else "foreach" if g.get("foreach") else "for-loop"
        saved = {lr_key: self.scheduler.base_lrs[0], "optim.weight_decay": g["weight_decay"],
                 "optim.betas": list(g["betas"]), "optim.adam_eps": g["eps"], "optim.impl": impl}
        wanted = {lr_key: lr, "optim.weight_decay": o.weight_decay, "optim.betas": list(o.betas),
                  "optim.adam_eps": o.adam_eps, "optim.impl": o.impl}
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            # the constructor's defaults are the config's: loading a state dict replaces the groups, not them
            group.update({k: v for k, v in self.optimizer.defaults.items() if k != "lr"})
            group["initial_lr"], group["lr"] = lr, lr * factor
            # fused / capturable Adam keeps its step counts by the parameters, the others on the host (as
            # torch's loader does): a count left on the GPU costs a .item() host sync per parameter and step
            on_device = group["fused"] or group["capturable"]
            for p in group["params"]:
                state = self.optimizer.state.get(p, {})
                if "step" in state:
                    state["step"] = state["step"].to(device=p.device if on_device else "cpu", dtype=torch.float32)
        self.scheduler.base_lrs = [lr] * len(self.optimizer.param_groups)
        return [f"{k} {_fmt(saved[k])} -> {_fmt(wanted[k])}" for k in saved if _fmt(saved[k]) != _fmt(wanted[k])]

    # ------------------------------------------------------------------- forward on a micro-batch
    def _shard(self, mb: MicroBatch, x: torch.Tensor) -> torch.Tensor:
        return cp_shard(x, mb.cu_seqlens, self.dims.cp_rank, self.dims.cp_size).to(self.device)

    def forward(self, mb: MicroBatch, model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprob, entropy) [T_local] fp32 at this rank's (cp-sharded) positions, of `model` (default: the
        policy, which replays the micro-batch's recorded experts; the reference routes by its own router)."""
        cu = mb.cu_seqlens.to(self.device)
        prefix_of = mb.prefix_of.to(self.device) if mb.prefix_of is not None else None
        routed = None
        if mb.routed_experts is not None and model is None:
            routed = self._shard(mb, mb.routed_experts)
        with nvtx_range("forward"):
            model = self.model if model is None else model
            return model(self._shard(mb, mb.input_ids), cu, targets=self._shard(mb, mb.targets),
                         temperature=self.temperature, prefix_of=prefix_of, routed_experts=routed)

    def _micro_batch(self, rollouts: Sequence[Rollout], members: Sequence[int],
                     old: dict[int, torch.Tensor] | None = None, ref: dict[int, torch.Tensor] | None = None
                     ) -> MicroBatch:
        return build_micro_batch(rollouts, members, old, self._min_tokens(), ref, self.cfg.trainer.share_prompts)

    def check_routing(self, rollouts: Sequence[Rollout], minis: Sequence[Sequence[int]]) -> None:
        """Routing replay: every replayed rollout this rank trains holds its record (a rollout the exchange left out
        would route by the trainer's router). Checked on every rank together: one rank raising alone would leave the
        others waiting in FSDP's collectives."""
        lacking = next((f"routing replay: rollout {i} is in a micro-batch of dp rank {self.dims.dp_rank} but holds no "
                        f"record of its experts on rank {self.dims.rank} (golong.replay.exchange sends them to the "
                        "ranks Actor.owners names)"
                        for mini in minis for members in self._plan(rollouts, mini) for i in members
                        if rollouts[i].route_key is not None and rollouts[i].prompt_experts is None), None)
        if bad := next((m for m in all_gather_objects(lacking) if m), None):
            raise RuntimeError(bad)

    def owners(self, rollouts: Sequence[Rollout]) -> list[int]:
        """The dp rank whose micro-batches hold each rollout in the update (the same in every pass and epoch)."""
        out = [-1] * len(rollouts)
        for mini in split_mini_batches(rollouts, self.cfg.trainer.mini_batch_prompts):
            for dp_rank, plan in enumerate(self._plans(rollouts, mini)):
                for members in plan:
                    for i in members:
                        out[i] = dp_rank
        return out

    def _plan(self, rollouts: Sequence[Rollout], indices: Sequence[int]) -> list[list[int]]:
        """This dp rank's micro-batches (see _plans)."""
        return self._plans(rollouts, indices)[self.dims.dp_rank]

    def _plans(self, rollouts: Sequence[Rollout], indices: Sequence[int]) -> list[list[list[int]]]:
        """Every dp rank's micro-batches. Each rollout is a unit; with trainer.share_prompts a run of one prompt's
        rollouts that can share it is instead split into parts of near-equal response counts (_split_run: as many
        as keep the busiest dp rank least loaded), each cut again, evenly, where its packed rows (the prompt once)
        would pass the budget."""
        budget, dp = self.cfg.trainer.micro_batch_tokens, self.dims.dp_size
        if not self.cfg.trainer.share_prompts:
            units = [[i] for i in indices]
        else:
            runs = prompt_runs(rollouts, indices)
            total = sum(packed_rows(rollouts, run, True) for run in runs)
            units = []
            for run in runs:
                if not shares_prompt(rollouts, run):
                    units += [[i] for i in run]
                    continue
                for part in _split_run(rollouts, run, total, dp):
                    pieces = _cut_runs(rollouts, [part], budget)
                    if len(pieces) > 1:  # as many pieces, of near-equal counts (no one-response tail)
                        pieces = _cut_runs(rollouts, _even(part, len(pieces)), budget)
                    units += pieces
        sizes = [packed_rows(rollouts, u, self.cfg.trainer.share_prompts) for u in units]
        return [[[i for u in m for i in units[u]] for m in plan] for plan in plan_all_micro_batches(sizes, dp, budget)]

    def _min_tokens(self) -> int:
        return 2 * self.dims.cp_size * 2

    @torch.no_grad()
    def compute_logprobs(self, rollouts: Sequence[Rollout], indices: Sequence[int], model: nn.Module | None = None
                         ) -> dict[int, torch.Tensor]:
        """Response-token logprobs of `model` (default: the current policy) for this rank's share of `indices`
        (whole sequences: gathered over the cp group). {rollout index: [R] fp32 cpu}."""
        out: dict[int, torch.Tensor] = {}
        for members in self._plan(rollouts, indices):
            mb = self._micro_batch(rollouts, members)
            logprob, _ = self.forward(mb, model)
            full = cp_gather(logprob.float(), mb.cu_seqlens.to(self.device), self.dims.cp_group).cpu()
            for i, start in zip(members, mb.starts):
                out[i] = full[start:start + len(rollouts[i].response_ids)].clone()
        return out

    # ---------------------------------------------------------------------------------- update
    def update(self, rollouts: Sequence[Rollout], loss: str = "pg", fault_nan: bool = False) -> dict[str, float]:
        """PPO epochs over mini-batches of prompts; loss "pg" (policy gradient, clipped) or
        "sft" (token-mean NLL of the responses). Returns metrics reduced over ranks."""
        cfg = self.cfg
        if loss == "pg" and cfg.algo.kl_coef and self.reference is None:
            raise ValueError("algo.kl_coef > 0 needs the reference policy: Actor(model, dims, cfg, "
                             "reference=build_model(cfg, dims, reference=True))")
        minis = split_mini_batches(rollouts, cfg.trainer.mini_batch_prompts)
        epochs = cfg.algo.ppo_epochs if loss == "pg" else 1
        on_policy = epochs == 1 and len(minis) == 1
        if loss == "pg" and cfg.rollout.router_replay:
            self.check_routing(rollouts, minis)
        need_is = loss == "pg" and cfg.algo.rollout_is != "none" and all(
            r.rollout_logprobs is not None for r in rollouts)
        old: dict[int, torch.Tensor] | None = None
        timings = {}
        # on-policy the old logprobs are the update's own (detached): no pass of their own, cp > 1 included (the
        # IS weights all-gather them over the cp group in the update's forward)
        if loss == "pg" and not on_policy:
            t0 = time.perf_counter()
            with nvtx_range("old_logprob"):
                old = {}
                for mini in minis:
                    old.update(self.compute_logprobs(rollouts, mini))
            timings["time/old_logprob_s"] = time.perf_counter() - t0
        ref: dict[int, torch.Tensor] | None = None
        if loss == "pg" and self.reference is not None:  # once per update, whatever the epochs (verl's ref pass)
            t0 = time.perf_counter()
            with nvtx_range("ref_logprob"):
                ref = {}
                for mini in minis:
                    ref.update(self.compute_logprobs(rollouts, mini, self.reference))
            timings["time/ref_logprob_s"] = time.perf_counter() - t0
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
        # maxima over micro-batches and ranks; a key starting with "-" holds a negated minimum
        maxes: dict[str, torch.Tensor] = defaultdict(lambda: torch.tensor(float("-inf"), dtype=torch.float64))
        norms, skipped, steps = [], 0, 0
        lr = self.optimizer.param_groups[0]["lr"]  # this update's learning rate (logged)
        for _ in range(epochs):
            for mini in minis:
                gnorm, ok = self._optimizer_step(rollouts, mini, loss, old, ref, need_is, sums, maxes, fault_nan)
                norms.append(gnorm)
                skipped += int(not ok)
                steps += 1
        self.scheduler.step()
        return self._reduce_metrics(sums, maxes, norms, skipped, steps, loss, lr) | timings

    def _optimizer_step(self, rollouts: Sequence[Rollout], mini: list[int], loss_kind: str,
                        old: dict[int, torch.Tensor] | None, ref: dict[int, torch.Tensor] | None, need_is: bool,
                        sums: dict[str, torch.Tensor],
                        maxes: dict[str, torch.Tensor], fault_nan: bool) -> tuple[float, bool]:
        from golong.algo import aggregation_weights, policy_loss, rollout_is_weights

        algo = self.cfg.algo
        n_tokens = sum(len(rollouts[i].response_ids) for i in mini)  # global: every rank has the batch
        # FSDP averages gradients over its world; each rank's loss is its share of a global token
        # mean, so scaling by the world size turns that average into the sum we want.
        scale = float(self.dims.world_size)
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0  # this rank's part of this optimizer step's loss
        for members in self._plan(rollouts, mini):
            mb = self._micro_batch(rollouts, members, old, ref)
            replay = mb.routed_experts is not None
            with self.model.count_replay_agreement(self.device) if replay else nullcontext() as agreement:
                logprob, entropy = self.forward(mb)
            mask = self._shard(mb, mb.mask)
            if loss_kind == "sft":
                loss = -(logprob * mask).sum() / n_tokens
                metrics: dict[str, Any] = {}
            else:
                adv = self._shard(mb, mb.advantages)
                if mb.old_logprobs is not None:
                    old_lp = self._shard(mb, mb.old_logprobs)
                else:
                    old_lp = logprob.detach()
                is_w = None
                if need_is and mb.indices:
                    # weights need whole sequences (the veto): the old logprobs of the whole micro-batch, from
                    # the old-logprob pass or, on-policy, this forward's own gathered over the cp group (an
                    # all-gather of [T] floats; cp = 1: the local tensor itself); computed globally, then sharded
                    cu = mb.cu_seqlens.to(self.device)
                    old_full = mb.old_logprobs.to(self.device) if mb.old_logprobs is not None else \
                        cp_gather(old_lp.detach().float(), cu, self.dims.cp_group)
                    w, is_metrics = rollout_is_weights(
                        old_full, mb.rollout_logprobs.to(self.device), mb.mask.to(self.device), cu_seqlens=cu,
                        mode=algo.rollout_is, lower=algo.rollout_is_lower, upper=algo.rollout_is_upper,
                        veto=algo.rollout_is_veto, level=algo.rollout_is_level)
                    is_w = self._shard(mb, w)
                    _accumulate_is_metrics(is_metrics, mb.mask, mb.cu_seqlens, self.dims.cp_size, sums, maxes)
                agg = None  # token-mean: policy_loss divides by the global token count
                if algo.loss_agg_mode != "token-mean":
                    # response lengths of this micro-batch's rollouts (a dummy: one placeholder; its mask is all 0)
                    lengths = torch.tensor([len(rollouts[i].response_ids) for i in mb.indices] or [1])
                    agg = aggregation_weights(algo.loss_agg_mode, lengths, mb.seq_index, len(mini),
                                              self.cfg.rollout.max_response_tokens)
                gspo = algo.policy_loss == "gspo"
                loss, metrics = policy_loss(
                    logprob, old_lp, adv, mask, global_token_count=n_tokens, clip_low=algo.clip_low,
                    clip_high=algo.clip_high, dual_clip=None if gspo else algo.dual_clip, is_weights=is_w,
                    seq_log_ratio=self._sequence_log_ratio(mb, logprob, old_lp, mask) if gspo else None,
                    ref_logprob=self._shard(mb, mb.ref_logprobs) if mb.ref_logprobs is not None else None,
                    kl_coef=algo.kl_coef, entropy=entropy if algo.entropy_coef else None,
                    entropy_coef=algo.entropy_coef, token_weights=None if agg is None else self._shard(mb, agg))
            if fault_nan:
                loss = loss * float("nan")
            with nvtx_range("backward"):
                (loss * scale).backward()
            local_tokens = float(mask.sum())
            if replay:  # routes replayed in the forward, and how many the trainer's router would have chosen too
                agree, routes = agreement.tolist()
                sums["replay_agree"] += agree
                sums["replay_routes"] += routes
            if members:  # rows run vs rows of the sequences whole (each rank of the cp group adds its share)
                sums["packed_rows"] += len(mb.input_ids) / self.dims.cp_size
                sums["sequence_rows"] += sum(rollouts[i].length for i in members) / self.dims.cp_size
            step_loss += float(loss.detach())
            sums["loss"] += float(loss.detach())
            sums["tokens"] += local_tokens
            sums["entropy"] += float((entropy.detach() * mask).sum())
            sums["logprob"] += float((logprob.detach() * mask).sum())
            for k, v in metrics.items():  # policy_loss metrics are sums / global count: just add up
                sums[f"s:{k}"] += float(v)
            if mb.has_rollout_logprobs:
                rlp = self._shard(mb, mb.rollout_logprobs)
                # the policy the trainer holds vs the one that sampled: with synced weights these
                # differ only by numerics (kernels, dtypes); stale weights show up here first
                trainer_lp = (old_lp if loss_kind == "pg" else logprob).detach()
                d = ((trainer_lp - rlp) * mask).double()  # fp64: exp(d) - 1 - d cancels badly for tiny d
                sums["mismatch_k3"] += float(((torch.exp(d) - 1 - d) * mask).sum())
                sums["mismatch_abs"] += float(d.abs().sum())
                sums["mismatch_k1"] += float((-d).sum())
                sums["mismatch_tokens"] += local_tokens
                if d.numel():  # documents shorter than 2 * cp can leave a cp rank without rows
                    maxes["mismatch/max_abs"] = torch.maximum(maxes["mismatch/max_abs"], d.abs().max().double().cpu())
        grad_norm = self._clip_grad_norm()
        loss_total = self._all_reduce(torch.tensor([step_loss], dtype=torch.float64))  # all ranks agree on skipping
        ok = math.isfinite(grad_norm) and bool(torch.isfinite(loss_total).all())
        if ok:
            with nvtx_range("optimizer"):
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, ok

    def _sequence_log_ratio(self, mb: MicroBatch, logprob: torch.Tensor, old_lp: torch.Tensor, mask: torch.Tensor
                            ) -> torch.Tensor:
        """[T_local] fp32, detached: each token's response mean of logpi - logpi_old (GSPO's log s_i), over the
        response's tokens on every rank of the cp group (an all-reduce of two [S] fp64 vectors)."""
        seq = self._shard(mb, mb.seq_index)
        sums = torch.zeros(2, max(1, len(mb.indices)), dtype=torch.float64, device=logprob.device)
        valid = mask.to(torch.bool)
        d = torch.where(valid, logprob.detach().double() - old_lp.detach().double(), 0.0)
        sums[0].index_add_(0, seq, d)
        sums[1].index_add_(0, seq, valid.double())
        if self.dims.cp_size > 1:
            dist.all_reduce(sums, group=self.dims.cp_group)
        return (sums[0] / sums[1].clamp_min(1))[seq].float()

    def _clip_grad_norm(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0, foreach=False)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        if self.cfg.optim.grad_clip > 0 and torch.isfinite(norm):
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.optim.grad_clip, norm, foreach=False)
        return float(norm)

    def _all_reduce(self, host: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """All-reduce a small host tensor through the compute device (NCCL reduces CUDA tensors only)."""
        if not dist.is_initialized():
            return host
        t = host.to(self.device)
        dist.all_reduce(t, op=op)
        return t.cpu()

    def _reduce_metrics(self, sums: dict[str, torch.Tensor], maxes: dict[str, torch.Tensor], norms: list[float],
                        skipped: int, steps: int, loss_kind: str, lr: float) -> dict[str, float]:
        # a rank whose micro-batches were all dummies (fewer sequences than dp ranks) or empty cp shards saw
        # fewer keys: reduce the union (the defaults fill the gaps), or the all-reduces would not match
        names = all_gather_objects((list(sums), list(maxes)))
        keys = sorted({k for ks, _ in names for k in ks})
        vec = torch.stack([sums[k] for k in keys]) if keys else torch.zeros(0, dtype=torch.float64)
        mkeys = sorted({k for _, ks in names for k in ks})
        mvec = torch.stack([maxes[k] for k in mkeys]) if mkeys else torch.zeros(0, dtype=torch.float64)
        vec, mvec = self._all_reduce(vec), self._all_reduce(mvec, dist.ReduceOp.MAX)
        s = dict(zip(keys, vec.tolist()))
        tokens = max(s.get("tokens", 0.0), 1.0)
        prefix = "sft" if loss_kind == "sft" else "actor"
        out = {
            f"{prefix}/loss": s.get("loss", 0.0) / max(steps, 1),
            f"{prefix}/entropy": s.get("entropy", 0.0) / tokens,
            f"{prefix}/logprob": s.get("logprob", 0.0) / tokens,
            f"{prefix}/grad_norm": sum(norms) / max(len(norms), 1),
            f"{prefix}/grad_norm_max": max(norms) if norms else 0.0,
            f"{prefix}/lr": lr,
            f"{prefix}/optimizer_steps": steps - skipped,
            f"{prefix}/skipped_steps": skipped,
            f"{prefix}/tokens": s.get("tokens", 0.0),
        }
        if s.get("replay_routes", 0) > 0:  # routing replay: the share of token x layer routes the engine chose as the
            out["routing/replay_agreement"] = s["replay_agree"] / s["replay_routes"]  # trainer's router would
        if s.get("sequence_rows", 0) > 0:  # < 1 where responses shared their prompt's rows (trainer.share_prompts)
            out[f"{prefix}/packed_rows_fraction"] = s["packed_rows"] / s["sequence_rows"]
        for k in keys:
            if k.startswith("s:"):  # global token means per optimizer step: average over steps
                # (not over the token mean of the whole update above: actor/entropy keeps one definition
                # whether or not the loss has an entropy term)
                out.setdefault(f"{prefix}/{k[2:]}", s[k] / max(steps, 1))
            elif k.startswith("m:"):  # token-weighted means
                out[k[2:]] = s[k] / max(s[f"w:{k[2:]}"], 1e-12)
        if s.get("mismatch_tokens", 0) > 0:
            mt = s["mismatch_tokens"]
            out["mismatch/kl"] = s["mismatch_k3"] / mt  # k3 estimator of KL(rollout || trainer)
            out["mismatch/kl_k1"] = s["mismatch_k1"] / mt
            out["mismatch/mean_abs"] = s["mismatch_abs"] / mt
        for k, v in zip(mkeys, mvec.tolist()):
            if v != float("-inf"):  # -inf: no micro-batch had data for it
                out[k[1:] if k.startswith("-") else k] = -v if k.startswith("-") else v
        return out

    def full_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) per parameter, gathered one at a time (collective on all ranks)."""
        return full_parameters(self.model)


# Rollout-IS metrics (rollout_is_weights' names) that are means over sequences, not tokens
_IS_SEQUENCE_MEANS = ("rollout_is/veto_frac", "mismatch/trainer_ppl", "mismatch/rollout_ppl", "mismatch/ppl_ratio")


def _accumulate_is_metrics(metrics: dict[str, torch.Tensor], mask: torch.Tensor, cu_seqlens: torch.Tensor,
                           cp_size: int, sums: dict[str, torch.Tensor], maxes: dict[str, torch.Tensor]) -> None:
    """Fold one micro-batch's rollout_is_weights metrics into the step's accumulators so that the reduced
    values are those of the whole mini-batch: token means weighted by valid tokens, sequence means by valid
    sequences, ratio_max / ratio_min as maxima / minima. mask [T] and cu_seqlens [S+1] cover the whole
    micro-batch (every cp rank computed the metrics on all of it, hence the 1 / cp_size weights)."""
    per_seq = torch.nn.functional.pad(mask.reshape(-1).double().cumsum(0), (1, 0))
    cu = cu_seqlens.long().cpu()
    per_seq = per_seq[cu[1:]] - per_seq[cu[:-1]]
    tokens, sequences = float(per_seq.sum()) / cp_size, float((per_seq > 0).sum()) / cp_size
    if tokens == 0:
        return
    host = torch.stack([v.detach().double() for v in metrics.values()]).cpu()  # one device-to-host copy
    for k, v in zip(metrics, host):
        if k == "rollout_is/ratio_max":
            maxes[k] = torch.maximum(maxes[k], v)
        elif k == "rollout_is/ratio_min":
            maxes["-" + k] = torch.maximum(maxes["-" + k], -v)
        elif k in _IS_SEQUENCE_MEANS or k.startswith("rollout_is/"):
            weight = sequences if k in _IS_SEQUENCE_MEANS else tokens
            sums[f"m:{k}"] += float(v) * weight
            sums[f"w:{k}"] += weight
