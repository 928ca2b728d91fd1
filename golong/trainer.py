"""The GRPO trainer: the loop users launch with torchrun.

    torchrun --nproc_per_node 8 -m golong train configs/qwen3-4b-tmn.yaml parallel.cp=2

One step, every phase an NVTX range:

    prompts (resumable sampler) -> n rollouts per prompt (torch generator or vLLM; each rank
    generates a share, then all ranks gather the whole batch) -> rewards (process pool) ->
    dynamic sampling (drop all-equal groups, generate more up to algo.max_num_gen_batches) ->
    advantages (grpo / tmn_grpo / ...; of the scores plus any overlong penalty) -> [rollout dump] -> old
    logprobs (skipped when on-policy) -> [reference logprobs, with a KL term] -> update (mini-batches of prompts;
    each rank's sequences packed into micro-batches of trainer.micro_batch_tokens; loss aggregated over the global
    mini-batch, token-mean by default) -> weight sync into the rollout engine -> metrics (JSONL, TensorBoard,
    wandb) -> checkpoint every k steps.

A stop signal (SIGTERM, SIGUSR1: a scheduler about to kill the job) ends the run after the step under way,
with a checkpoint of it, on every rank at the same step, and exit status 143 (PREEMPTED_EXIT_CODE).

Every rank holds the whole gathered rollout batch, so the data-parallel split and micro-batch plan
are computed identically everywhere with no extra communication (golong.parallel.batching).
Rollout sampling is seeded per request from (trainer.seed, step, request), so a run reproduces
exactly after a resume and does not depend on how many ranks generated it.

The pieces: the update in golong.actor, the model and tokenizer in golong.build, the rollout engines in
golong.rollout.engines; `golong eval` (golong.evaluate) runs this trainer's validation alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import resource
import shutil
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from golong.actor import Actor, Rollout
from golong.build import build_model, load_tokenizer, model_config, reference_dtype, stop_token_ids
from golong.checkpoint import Checkpointer, latest_checkpoint, load_trainer_state
from golong.config import (
    ConfigError,
    RunConfig,
    checkpoint_dir,
    config_warnings,
    prompt_cache_dir,
    save_run_config,
    to_dict,
)
from golong.data.prompts import prompts_fingerprint
from golong.data.records import reference_answer, sft_target
from golong.eval_groups import check_group_keys, row_groups, short_keys
from golong.logger import MetricsWriter, ProgressLog, get_logger, write_jsonl
from golong.parallel import all_gather_objects, compute_device, gather_objects_to_rank0, init_parallel, rollout_share
from golong.profiling import CaptureWindow, TorchTrace, add_layer_nvtx, nvtx_range
from golong.replay import RouteKey, RoutingStore, exchange
from golong.rewards.function import RewardFunctionError
from golong.rewards.pass_at_k import PASS_SCORE, sample_metrics
from golong.rollout.engines import build_engine
from golong.rollout.torch_generator import SamplingParams

log = get_logger()


class TrainingStopped(RuntimeError):
    """Raised after too many consecutive non-finite steps (a checkpoint was written first)."""


class Preempted(RuntimeError):
    """Raised after a stop signal (STOP_SIGNALS): the step under way finished and was checkpointed first."""


# What schedulers send before they kill a job: SIGTERM (Kubernetes, Slurm at preemption or time limit, torchrun
# passing on its own), SIGUSR1 (Slurm's --signal=USR1@SECONDS, sent ahead of the time limit; torchrun passes it
# on with TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# The exit status after a stop signal: 128 + SIGTERM, what a shell or Kubernetes reports for a process that
# SIGTERM ended, so a wrapper that requeues such jobs treats this one alike; distinct from a crash (1), a bad
# config (2) and non-finite steps (3).
PREEMPTED_EXIT_CODE = 143
INTERRUPTED_EXIT_CODE = 130  # Ctrl-C (SIGINT): 128 + SIGINT, as a shell reports it


def _rerun_advice(resume: str) -> str:
    """How to continue after a stop: the same command only where it resumes the newest checkpoint. With
    checkpoint.resume=none the rerun is refused (golong.config: checkpoints are there now); with a checkpoint path
    it would start from that one again."""
    if resume == "auto":
        return "Run the same command again to continue (checkpoint.resume=auto)"
    return f"Run the command again with checkpoint.resume=auto (not {resume}) to continue"


def _fault(kind: str, step: int) -> bool:
    """Test hooks, off unless GOLONG_FAULT is set: "kill@3" ends the process after step 3,
    "nan@3" makes step 3's loss NaN, "pause@3" holds rank 0 in the middle of step 3 until a stop
    signal arrives from outside, "pause_sft@2" likewise in SFT step 2, "kill_sft@2" ends the process after SFT
    step 2, "eval_kill@1" ends every rank after golong eval saved its batch 1 (comma-separated list)."""
    return f"{kind}@{step}" in os.environ.get("GOLONG_FAULT", "").split(",")


class _StopSignals:
    """While entered, STOP_SIGNALS are recorded instead of ending the process: the loop then finishes its step,
    checkpoints and exits (Trainer.fit). The handler only records: it runs between any two bytecodes of the
    main thread, where logging or a collective could deadlock. A no-op off the main thread (Python installs
    signal handlers there only). Entered again while entered (train() around the trainer's setup, fit() around
    the loop), the outermost exit restores the handlers."""

    def __init__(self) -> None:
        self.received = 0  # the first stop signal's number; 0: none
        self._previous: dict[int, Any] = {}
        self._depth = 0

    def _record(self, signum: int, frame: Any) -> None:
        self.received = self.received or signum

    def __enter__(self) -> _StopSignals:
        self._depth += 1
        if self._depth == 1 and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
                # restart system calls the signal interrupts: C++ code under us (gloo, NCCL's bootstrap sockets)
                # may treat EINTR as an error; Python's own calls retry either way (PEP 475)
                signal.siginterrupt(sig, False)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        if self._depth:
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


def request_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts, stable across processes and Python versions."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


class Generated(NamedTuple):
    """One response as Trainer._generate_and_score returns it."""

    tokens: np.ndarray  # [R] int32
    logprobs: np.ndarray | None  # [R] fp32, the engine's sampled-token logprobs
    finish_reason: str
    score: float
    text: str | None  # the response as scored: on rank 0 where texts were asked for, else None
    # with rollout.reward_function, on every rank: the numbers its result held beside the score; whether it failed
    reward_numbers: dict[str, float] | None = None
    reward_failed: bool = False
    reward_info: dict[str, Any] | None = None  # the call's FunctionReport.infos entry: with the text, rank 0 only
    origin: int = 0  # the rank that generated it (routing replay: its record stays there, golong.replay)


# ---------------------------------------------------------------------------------- the trainer
class _Progress:
    """Rollout progress on rank 0 (a no-op elsewhere or when disabled): a rich bar on a terminal; in a log file,
    where a bar is noise, a line every `log_every_s` seconds (a long-context rollout runs for many minutes)."""

    def __init__(self, enabled: bool, label: str, total: int, log_every_s: float = 60.0) -> None:
        self.bar = self.lines = None
        if enabled:
            from rich.console import Console

            if not Console().is_terminal:
                self.lines = ProgressLog(label, total, "responses", every_s=log_every_s)
                enabled = False
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), transient=True)
            self.task = self.bar.add_task(label, total=total)

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __call__(self, k: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, k)
        elif self.lines is not None:
            self.lines.advance(items=k)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


class Trainer:
    """Owns the data, the actor, the rollout engine, checkpoints and logging. `fit()` runs."""

    def __init__(self, cfg: RunConfig, *, eval_only: bool = False, eval_by: Sequence[str] = (),
                 stop_signals: _StopSignals | None = None) -> None:
        """eval_only: the validation prompts alone (`golong eval`): no training data is read. eval_by: `golong eval
        --by` keys, checked against the validation records once they are read, before the model is built.
        stop_signals: the recorder fit() enters (train() enters it before building the trainer)."""
        from golong.data import PromptSampler

        self.cfg = cfg
        self.eval_only = eval_only
        t0 = time.perf_counter()
        if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
            # one process per core share: oversubscribed CPU threads slow small matmuls 10x
            local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
        arch = model_config(cfg)  # a model this trainer cannot build stops the run before the data
        longest, max_pos = cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens, arch.max_position_embeddings
        # vLLM refuses such a max_model_len (unless told otherwise by its own switch); the torch engine would run past
        # the positions the model was trained for. vLLM 0.32 takes a YaRN model's max_position_embeddings as already
        # scaled (config/model.py: no factor for "yarn"), so the bound is that field for every model
        if longest > max_pos and os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0").lower() not in ("1", "true"):
            raise ConfigError(f"data.max_prompt_tokens + rollout.max_response_tokens = {longest} is over the model's "
                              f"max_position_embeddings {max_pos} (the rollout engine's max_model_len; "
                              "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 allows it, in vLLM too)")
        if cfg.rollout.router_replay and not arch.is_moe:
            raise ConfigError("rollout.router_replay=true needs a MoE model (experts to replay); this one is dense")
        self.dims = init_parallel(cfg.parallel.dp_shard, cfg.parallel.cp, cfg.parallel.backend,
                                  cpu_offload=cfg.parallel.cpu_offload, timeout_s=cfg.parallel.timeout_s,
                                  rollout_tp=cfg.rollout.tensor_parallel_size if cfg.rollout.engine == "vllm" else 1)
        for line in [] if eval_only else config_warnings(cfg):  # training's settings
            log.warning(line)
        self.rank, self.world = self.dims.rank, self.dims.world_size
        vocab = arch.vocab_size
        torch.manual_seed(cfg.trainer.seed)
        self.run_dir = Path(cfg.logging.run_dir)
        self.tokenizer = load_tokenizer(cfg)
        n_tok = len(self.tokenizer)
        if n_tok > vocab:  # ids past the embedding: the first forward fails deep inside (a device assert on GPU)
            source = cfg.model.tokenizer or cfg.model.path
            what = f"the tokenizer of {source}" if source else "the demo tokenizer (bytes and special tokens)"
            how = "set model.tokenizer to the model's own" if cfg.model.path else \
                f"raise model.scratch.vocab_size to at least {n_tok}"  # a scratch model has no tokenizer of its own
            raise ConfigError(f"{what} has {n_tok} tokens, more than the model's vocabulary of {vocab}; {how}")
        self.stop_ids = set(stop_token_ids(self.tokenizer, cfg.model.path))
        # val_record_tasks: the validation records per task, which eval reports its prompts out of
        self.train_prompts, self.val_prompts, self.val_record_tasks = self._load_prompts()
        self.data_fingerprint = prompts_fingerprint(self.train_prompts)  # a resume checks it (maybe_resume)
        # a typo costs no model load, engine start or generation
        check_group_keys(eval_by, self.val_prompts, self.val_record_tasks.total() - len(self.val_prompts))
        self.eval_by = tuple(eval_by)  # each response row is labelled with these (golong.eval_groups.row_groups)
        self.row_keys = short_keys(self.val_prompts)  # and these where its record holds a short value or none
        self.judge = self._start_judge()
        self._start_reward_function()
        self.sampler = None if eval_only else PromptSampler(len(self.train_prompts), seed=cfg.data.seed,
                                                            shuffle=cfg.data.shuffle)
        self.ckpt = Checkpointer(checkpoint_dir(cfg), cfg.checkpoint.every, cfg.checkpoint.keep_last)
        # a resume its checkpoint's trainer state refuses (a small file) costs no model build or engine start
        self.checked_resume = resume = None if eval_only else self.ckpt.resolve(cfg.checkpoint.resume)
        if resume is not None:
            self._check_resume_state(resume, load_trainer_state(resume))
        reference = None
        if cfg.algo.kl_coef > 0 and not eval_only:
            reference = build_model(cfg, self.dims, reference=True)
            log.info(f"algo.kl_coef={cfg.algo.kl_coef:g}: a KL term to the reference policy, a frozen "
                     f"{str(reference_dtype(cfg)).removeprefix('torch.')} copy of "
                     f"{cfg.model.path or 'the initial weights (trainer.seed)'}")
        self.actor = Actor(build_model(cfg, self.dims), self.dims, cfg, reference)
        self.model = self.actor.model
        self.engine = build_engine(cfg, self.model, self.tokenizer, self.run_dir)
        self.engine.sync_weights(self.model)
        self.writer = MetricsWriter(self.run_dir, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                                    wandb_project=cfg.logging.wandb_project, config=to_dict(cfg))
        if self.writer.active and resume is None:  # a resume's, once its checkpoint is accepted (maybe_resume)
            save_run_config(cfg, self.run_dir)
        self.step = 0
        self.sft_done = cfg.trainer.sft_steps == 0
        self.sft_step = 0  # SFT warm-up steps done (a stop signal can end the warm-up part way)
        self.sft_sampler: Any = None  # the warm-up's prompt order, while it runs
        self.nonfinite_streak = 0
        self.history: list[dict[str, Any]] = []  # validation results, for the demo summary
        self.generated: list[Rollout] = []  # the last step's responses, kept or not (logging.dump_rollouts)
        self.warned_format = False  # _warn_format: once per run
        self.warned_function = False  # _check_function_errors: once per run
        self.warned_scoring = False  # _check_scoring_failures: once per run
        self.filter_keys_seen: set[str] = set()  # _filter_values: keys a result has held in this run
        self.warned_filter_key = False
        self.reward_texts: dict[str, str] = {}  # reward-function result keys that held text, one value each
        # routing replay: this rank's engine records of the step's responses
        c = self.model.config
        self.routing_store = RoutingStore((c.num_hidden_layers, c.num_experts_per_tok), c.num_experts)
        self.stop_signals = stop_signals or _StopSignals()
        if cfg.profile.nvtx:
            add_layer_nvtx(self.model)
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info(f"golong: world {self.world} (dp {self.dims.dp_size} x cp {self.dims.cp_size}), "
                 f"{n_params / 1e6:.2f}M parameters, {len(self.train_prompts)} train / {len(self.val_prompts)} "
                 f"val prompts, rollout engine {cfg.rollout.engine}; set up in {time.perf_counter() - t0:.1f}s")
        longest = cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens
        if longest > cfg.trainer.micro_batch_tokens:
            log.warning(f"trainer.micro_batch_tokens={cfg.trainer.micro_batch_tokens} is below the longest possible "
                        f"sequence ({longest} = data.max_prompt_tokens + rollout.max_response_tokens): such a "
                        "sequence runs as a micro-batch of its own, above the budget's memory")
        if (cfg.trainer.val_every or cfg.trainer.val_before_train) and not self.val_prompts:
            log.warning("validation is on (trainer.val_every / val_before_train) but there are no validation prompts "
                        "(data.val_files, data.synthetic_val_n, or every one over data.max_prompt_tokens): no run "
                        "will be validated")

    # ------------------------------------------------------------------------------- data
    def _load_prompts(self) -> tuple[list[Any], list[Any], Counter[str]]:
        from golong.data.check import no_prompt_fits, run_records

        d = self.cfg.data
        train, val = run_records(self.cfg, train=not self.eval_only)
        tp, vp = self._prompts(train, "train"), self._prompts(val, "val")
        # the messages live on as input_ids; their text (~4 bytes a token: GBs at GoLongRL's 23K long-context
        # records, on every rank) is read by nothing after this (rewards read the gold and extra_info)
        for p in (*tp, *vp):
            p.record = dataclasses.replace(p.record, prompt=[])
        if self.eval_only and not vp:
            raise ConfigError("nothing to evaluate: set data.val_files (or data.synthetic_val_n), with prompts "
                              f"within data.max_prompt_tokens={d.max_prompt_tokens}")
        if not tp and not self.eval_only:  # a config problem, named in one line (build_prompts logged the counts)
            raise ConfigError(no_prompt_fits(len(train), self.cfg))
        return tp, vp, Counter(r.task for r in val)

    def _start_judge(self) -> Any:
        """The judge of validation's judged metrics (judge.model; golong.rewards.judge), None without one. Every
        validation record of a judged metric must hold its question: the judge is shown it."""
        jc = self.cfg.judge
        if not jc.model:
            return None
        from golong.rewards.judge import JUDGED, Judge, judged_question
        from golong.rewards.scoring import record_target

        judged = [p.record for p in self.val_prompts if record_target(p.record)[0] in JUDGED]
        if not judged:
            log.warning(f"judge.model={jc.model}: no validation record is scored by a judged metric "
                        f"({', '.join(JUDGED)}), so the judge is never asked")
            return None
        if missing := sum(judged_question(r) is None for r in judged):
            raise ConfigError(f"judge.model={jc.model}: {missing} of the {len(judged)} validation records the judge "
                              "would see hold no extra_info.question (the judge is shown the question): import them "
                              "again with `golong data import`, which keeps it")
        if jc.api_key_env and not os.environ.get(jc.api_key_env):
            log.warning(f"judge.model={jc.model}: ${jc.api_key_env} is not set; requests to {jc.url} go without a "
                        "key (a local vLLM server takes that)")
        try:
            return Judge(jc)
        except ImportError as e:
            raise ConfigError(f"judge.model needs the openai package ({e}): pip install openai") from None

    def _start_reward_function(self) -> None:
        """With rollout.reward_function, start the scoring workers (each imports the function) on every rank now,
        not at the first score: a function that fails to import stops every rank together, before any rollout."""
        rc = self.cfg.rollout
        if not rc.reward_function:
            return
        from golong.rewards.pool import get_pool

        problem = None
        try:
            get_pool(max(1, rc.reward_workers), rc.reward_memory_mb, rc.reward_function,
                     tuple(sorted(rc.reward_kwargs))).start()
        except Exception as e:  # any: a rank that raised alone would leave the others waiting in the gather
            problem = f"rank {self.rank}: {e}"
        problems = [p for p in all_gather_objects(problem) if p]
        if problems:
            raise RewardFunctionError(problems[0])

    def _prompts(self, records: list[Any], split: str) -> list[Any]:
        """build_prompts of `records`, through the prompt cache (data.prompt_cache): read (memory-mapped) when it
        holds these records under this tokenizer and limit, else built by each node's local rank 0, written for
        the next start and read by the node's other ranks (build_prompts_shared)."""
        from golong.data.prompts import build_prompts_shared

        d = self.cfg.data
        return build_prompts_shared(records, self.tokenizer, d.max_prompt_tokens, d.overflow,
                                    prompt_cache_dir(self.cfg), split)

    # ---------------------------------------------------------------------------- rollouts
    def _sampling(self, val: bool = False) -> SamplingParams:
        r = self.cfg.rollout
        if val:
            return SamplingParams(temperature=r.val_temperature, top_p=r.val_top_p, max_tokens=r.max_response_tokens)
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_tokens=r.max_response_tokens)

    def _decode_responses(self, responses: Sequence[Sequence[int]]) -> list[str]:
        """The texts of the engine's responses (lists of token ids), stop token stripped. One decode call per
        response: transformers' batch_decode loops over them itself, with more overhead."""
        return [self.tokenizer.decode(self._strip_stop(ids), skip_special_tokens=True) for ids in responses]

    def _generate_and_score(self, prompts: list[Any], n: int, params: SamplingParams, seed_key: tuple,
                            label: str, texts: bool = False, first_request: int = 0, whole_set: bool = True,
                            routing: int | None = None, tokens: bool = True, judge: bool = False
                            ) -> tuple[list[Generated], dict[str, float]]:
        """n responses per prompt, generated and scored by this rank for its share, gathered on every rank.
        Returns them in (prompt, sample) order + timings (and with rollout.require_think and golong's metrics,
        "response/format_errors": how many responses failed the format gate; with rollout.reward_function,
        "reward/function_errors" and the sums and counts of its extra numbers). Their texts are gathered on rank 0
        only, where `texts` (from the ranks that decoded them to score them). first_request: the position of the
        first request among the whole set's, for its seed (a part of a set samples as it would in the whole);
        whole_set=False: a part, whose every reward-function call failing does not stop the run (its caller checks
        the set). routing (rollout.router_replay): the generation batch under which this rank's engine records of
        its responses' experts go to self.routing_store (request keys: their position in this set); None: none.
        tokens=False (validation, which reads scores and texts only): the responses' token ids and logprobs are not
        gathered (empty arrays): every rank would hold the whole eval's. judge (validation): with judge.model, the
        judged metrics' scores are raised where the judge says the answer is the reference's ("judge/*" counts in
        the timings, each judged response's verdict in its reward info)."""
        from golong.rewards.answer import checked_response
        from golong.rewards.function import FunctionReport
        from golong.rewards.scoring import reward_config, score_records

        requests = [(p, k) for p in range(len(prompts)) for k in range(n)]
        # each request's cost ~ the context its decoding reads: long prompts weigh more (an equal count of requests
        # per rank left the slowest engine 1.2-1.5x the mean at 128 prompts on 8 ranks, lognormal lengths)
        weights = [len(prompts[p].input_ids) + params.max_tokens for p, _ in requests]
        mine = list(rollout_share(weights, self.rank, self.world))
        # one list per prompt, shared by its samples (engines take lists; a 160K-token one is ~6 MB of int objects)
        lists = {p: prompts[p].input_ids.tolist() for p in dict.fromkeys(requests[j][0] for j in mine)}
        t0 = time.perf_counter()
        with nvtx_range("rollout"), _Progress(self.cfg.logging.progress and self.rank == 0, label, len(mine)) as bar:
            out = self.engine.generate([lists[requests[j][0]] for j in mine], params,
                                       [request_seed(*seed_key, first_request + j) for j in mine], progress=bar,
                                       routing=routing is not None)
        bad_routing = None  # a record the engine got wrong: every rank learns of it at the gather below
        if routing is not None:
            try:
                for k, j in enumerate(mine):
                    p = requests[j][0]
                    self.routing_store.add(routing, p, j, out.routed_experts[k], len(prompts[p].input_ids),
                                           len(out.token_ids[k]))
            except Exception as e:  # not raised here alone: the other ranks would wait at the gather
                bad_routing = f"rank {self.rank}: {type(e).__name__}: {e}"
        t1 = time.perf_counter()
        with nvtx_range("reward"):
            rc = self.cfg.rollout
            decoded = self._decode_responses(out.token_ids)
            # scored 0 whatever they answer: a model that never closes a think block learns nothing, so count them
            # (a reward function of the user's own sees every response: no gate)
            gated = rc.require_think and not rc.reward_function
            fails = sum(checked_response(t) is None for t in decoded) if gated else 0
            report = FunctionReport()  # the reward function's failures and extra numbers
            broken = None  # the scoring pool failed (a respawned worker could not import the function): every
            try:           # rank must learn it at the gather below, not wait there for this one
                scores = score_records([prompts[requests[j][0]].record for j in mine], decoded,
                                       config=reward_config(rc), report=report)
            except Exception as e:
                broken, scores = f"rank {self.rank}: {type(e).__name__}: {e}", [0.0] * len(mine)
            verdicts, judged = [None] * len(mine), None
            if judge and self.judge is not None and broken is None:
                from golong.rewards.judge import judge_records

                scores, verdicts, judged = judge_records(self.judge, [prompts[requests[j][0]].record for j in mine],
                                                         decoded, scores, require_think=rc.require_think)
        t2 = time.perf_counter()
        # int32 / fp32 arrays through the gather: lists of Python numbers pickle to ~1.6x the bytes and unpickle
        # ~40x slower (85 ms per 1M tokens; a generation batch at the recipe's scale: ~33M tokens on every rank)
        # of the reward function's results, every rank gets the numbers (bounded: MAX_EXTRAS) and whether it failed;
        # the failure's line and the text extras go to rank 0 with the response texts
        infos = [{**(info or {}), "judge": v} if v else info for info, v in zip(report.infos(len(mine)), verdicts)]
        numbers = [{key: v for key, v in report.extras.get(k, {}).items() if isinstance(v, float)} or None
                   for k in range(len(mine))]
        empty = np.zeros(0, dtype=np.int32)
        local = [(j, np.asarray(out.token_ids[k], dtype=np.int32) if tokens else empty,
                  None if out.logprobs[k] is None or not tokens else np.asarray(out.logprobs[k], dtype=np.float32),
                  out.finish_reasons[k], scores[k], numbers[k], "reward_error" in (infos[k] or {}))
                 for k, j in enumerate(mine)]
        # the count of calls that failed, the first one's traceback, how many responses the function was given, and
        # the (sum, count) of each extra number its results held
        errors = report.errors
        texts_held = {}  # key -> one value: the keys under which results held text (algo.filter_metric's error)
        for extras in report.extras.values():
            for key, v in extras.items():
                if isinstance(v, str):
                    texts_held.setdefault(key, v[:60])
        raised = (len(errors), errors[0][1] if errors else None, len(decoded) - fails,
                  {key: (sum(v), len(v)) for key, v in report.numbers().items()}, broken, texts_held, bad_routing,
                  judged, (len(report.lost), report.lost[0][1] if report.lost else None))
        parts = all_gather_objects((local, fails, raised))
        for _, _, r in parts:
            for key, v in r[5].items():
                self.reward_texts.setdefault(key, v)
        if failed := [r[4] for _, _, r in parts if r[4]]:
            raise RewardFunctionError(f"{label}: scoring failed: {failed[0]}")
        if bad := [r[6] for _, _, r in parts if r[6]]:
            raise RuntimeError(f"{label}: {bad[0]}")
        merged = sorted((x for part, _, _ in parts for x in part), key=lambda x: x[0])
        timings = {"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1}
        if judge and self.judge is not None:
            timings.update(self._judge_counts([r[7] for _, _, r in parts], label))
        if gated:
            timings["response/format_errors"] = float(sum(f for _, f, _ in parts))
        if not rc.reward_function:  # golong's metrics: those that ran out of time or memory
            timings["reward/scoring_failures"] = float(self._check_scoring_failures([r[8] for _, _, r in parts],
                                                                                    label, len(requests)))
        if rc.reward_function:
            timings["reward/function_errors"] = float(self._check_function_errors([r for _, _, r in parts], label,
                                                                                  whole_set))
            for _, _, r in parts:  # sums and counts: generation batches add up; means are taken by _extra_means
                for key, (total, count) in r[3].items():
                    timings[f"reward/extra_sum/{key}"] = timings.get(f"reward/extra_sum/{key}", 0.0) + total
                    timings[f"reward/extra_count/{key}"] = timings.get(f"reward/extra_count/{key}", 0.0) + count
        by_request: dict[int, tuple[str, dict[str, Any] | None]] = {}
        if texts:  # to rank 0 only: decoding them again there took ~4 ms per 16K-token response
            t3 = time.perf_counter()
            shares = gather_objects_to_rank0(list(zip(mine, decoded, infos)))
            by_request = {j: (text, info) for share in shares or [] for j, text, info in share}
            timings["time/dump_s"] = time.perf_counter() - t3
        origin = {x[0]: rank for rank, (part, _, _) in enumerate(parts) for x in part}  # parts: in rank order
        results = []
        for j, tokens, logprobs, finish, score, nums, failed_call in merged:
            text, info = by_request.get(j, (None, None))
            results.append(Generated(tokens, logprobs, finish, score, text, nums, failed_call, info, origin[j]))
        return results, timings

    @staticmethod
    def _extra_means(metrics: dict[str, float], prefix: str) -> dict[str, float]:
        """The mean of each extra number of the reward function's results (`prefix`/<key>), from the sums and counts
        _generate_and_score left in `metrics` (popped)."""
        sums = {k.removeprefix("reward/extra_sum/"): metrics.pop(k) for k in list(metrics)
                if k.startswith("reward/extra_sum/")}
        counts = {k.removeprefix("reward/extra_count/"): metrics.pop(k) for k in list(metrics)
                  if k.startswith("reward/extra_count/")}
        return {f"{prefix}/{key}": total / counts[key] for key, total in sorted(sums.items())}

    def _check_scoring_failures(self, lost: list[tuple[int, str | None]], label: str, responses: int) -> int:
        """How many responses' golong metric ran out of time (rollout.reward_timeout_s) or lost its worker (its
        memory cap, rollout.reward_memory_mb) and so scored 0, from every rank's (count, first failure); the first
        is logged once per run."""
        count = sum(c for c, _ in lost)
        if count and not self.warned_scoring:
            self.warned_scoring = True
            first = next(f for c, f in lost if c)
            log.warning(f"{label}: scoring {count} of {responses} responses failed: they score 0 "
                        "(reward/scoring_failures counts them every step, val/reward/scoring_failures in "
                        f"validation). The first: {first}")
        return count

    def _check_function_errors(self, raised: list[tuple[int, str | None, int, dict, str | None, dict]], label: str,
                               stop_if_all: bool = True) -> int:
        """How many calls of the user's reward function failed (raised, ran out of time, lost their worker: scored
        0), from every rank's (count, first traceback, calls, extras, pool failure). The first failure is logged
        once per run; a batch in which every call failed stops the run on every rank (a broken function, not an
        odd response), its traceback in the error (stop_if_all)."""
        count, calls = sum(r[0] for r in raised), sum(r[2] for r in raised)
        first = next((r[1] for r in raised if r[1] is not None), None)
        where = f"rollout.reward_function={self.cfg.rollout.reward_function}"
        if stop_if_all and count and count == calls:
            raise RewardFunctionError(f"{label}: the reward function failed on all {calls} responses it was given "
                                      f"({where}); the first failure, from its scoring worker:\n{first}")
        if count and not self.warned_function:
            self.warned_function = True
            log.warning(f"{label}: the reward function failed on {count} of {calls} responses ({where}); they "
                        "score 0 (reward/function_errors counts them every step, val/reward/function_errors in "
                        f"validation; each failure's last line is in the rollout dump, logging.dump_rollouts). The "
                        f"first failure:\n{first}")
        return count

    def _strip_stop(self, ids: Sequence[int]) -> Sequence[int]:
        return ids[:-1] if len(ids) and int(ids[-1]) in self.stop_ids else ids

    def collect_rollouts(self, step: int) -> tuple[list[Rollout], dict[str, float]]:
        """Generate, score and (dynamically) filter until the batch is full or the budget is spent."""
        from golong.algo import dynamic_sampling_filter

        cfg = self.cfg
        n, want = cfg.rollout.n, cfg.trainer.prompts_per_step
        per_gen = (cfg.trainer.gen_batch_prompts or want) if cfg.algo.dynamic_sampling else want
        kept: list[Rollout] = []
        every: list[Rollout] = []
        # kept for the rollout dump only where it is written: the rest of a generation batch is freed on return
        dump = cfg.logging.dump_rollouts
        self.generated = every if dump and self.rank == 0 else []
        self.routing_store.clear()  # an earlier step's records (one that kept nothing) go
        metrics: dict[str, float] = defaultdict(float)
        gen_batches = 0
        max_batches = cfg.algo.max_num_gen_batches if cfg.algo.dynamic_sampling else 1
        while gen_batches < max_batches:
            idx = self.sampler.take(per_gen)
            prompts = [self.train_prompts[i] for i in idx]
            results, timings = self._generate_and_score(prompts, n, self._sampling(), (cfg.trainer.seed, step,
                                                                                       gen_batches),
                                                        f"rollout step {step}", texts=dump,
                                                        routing=gen_batches if cfg.rollout.router_replay else None)
            for k, v in timings.items():  # times add up over generation batches (the rate is taken below)
                metrics[k] += v
            batch = [Rollout(prompts[j // n].input_ids, np.asarray(g.tokens, dtype=np.int32),
                             None if g.logprobs is None else np.asarray(g.logprobs, dtype=np.float32),
                             group=gen_batches * per_gen + j // n, task=prompts[j // n].record.task,
                             score=float(g.score), finish_reason=g.finish_reason, prompt_index=idx[j // n],
                             text=g.text, reward_numbers=g.reward_numbers, reward_info=g.reward_info,
                             route_key=RouteKey(g.origin, gen_batches, j // n, j) if cfg.rollout.router_replay
                             else None)
                     for j, g in enumerate(results)]
            every += batch
            gen_batches += 1
            if cfg.algo.dynamic_sampling and n > 1:
                keep, _ = dynamic_sampling_filter(self._filter_values(batch), [r.group for r in batch])
                batch = [r for r, k in zip(batch, keep.tolist()) if k]
            kept += batch
            self.routing_store.keep(r.route_key for r in kept if r.route_key is not None)
            if len({r.group for r in kept}) >= want:
                break
        groups = list(dict.fromkeys(r.group for r in kept))[:want]
        chosen = set(groups)
        kept = [r for r in kept if r.group in chosen]
        self.routing_store.keep(r.route_key for r in kept if r.route_key is not None)
        metrics.update(self._rollout_metrics(every))
        metrics.update(self._extra_means(metrics, "reward/extra"))
        if "response/format_errors" in metrics:
            metrics["response/format_error_frac"] = metrics.pop("response/format_errors") / len(every)
            self._warn_format(metrics["response/format_error_frac"], f"step {step}")
        metrics["perf/rollout_tokens_per_s"] = sum(len(r.response_ids) for r in every) / max(
            metrics["time/rollout_s"], 1e-9)
        metrics["dynamic_sampling/gen_batches"] = gen_batches
        metrics["dynamic_sampling/kept_prompts"] = len(groups)
        metrics["dynamic_sampling/kept_fraction"] = len({r.group for r in kept}) / max(1, len({r.group for r in every}))
        return kept, dict(metrics)

    def _filter_values(self, batch: Sequence[Rollout]) -> torch.Tensor:
        """[B] float64: what dynamic sampling finds equal or not within each prompt group (algo.filter_metric).
        A response whose result lacks the key counts 0 (a failed call, a data source the function answers with a
        plain number); "acc" falls back to the score there, as DAPO's reward manager records a plain number's. A key
        no result has held yet in the run stops it (a misspelt key would drop every group); the values are the
        same on every rank (gathered), so every rank stops together."""
        key = self.cfg.algo.filter_metric
        scores = torch.tensor([r.score for r in batch], dtype=torch.float64)  # fp32 would merge near-ties
        if key == "score":
            return scores
        if key == "reward":
            return scores + self._overlong_penalty(batch)
        values = [(r.reward_numbers or {}).get(key) for r in batch]
        if key == "acc":
            values = [r.score if v is None else v for r, v in zip(batch, values)]
        if any(v is not None for v in values):
            self.filter_keys_seen.add(key)
        elif key not in self.filter_keys_seen:
            held = sorted({k for r in batch for k in r.reward_numbers or {}})
            if key in self.reward_texts:  # dynamic sampling compares numbers (DAPO: the std of a group's values)
                raise RewardFunctionError(
                    f"algo.filter_metric={key}: the reward function's results hold text under {key!r} (such as "
                    f"{self.reward_texts[key]!r}), not a number; return a number under it (1.0 for a correct answer, "
                    f"say) or filter on another key (the numbers they held: {', '.join(held) or 'none'}; or score, "
                    "reward)")
            raise RewardFunctionError(
                f"algo.filter_metric={key}: no result of the reward function has held a number under {key!r} in "
                f"this run (the numbers they held: {', '.join(held) or 'none'}; or score, reward)")
        elif not self.warned_filter_key:
            self.warned_filter_key = True
            log.warning(f"algo.filter_metric={key}: no result in this generation batch held a number under {key!r}; "
                        "its responses count 0 there, so dynamic sampling drops every group (warned once)")
        return torch.tensor([0.0 if v is None else v for v in values], dtype=torch.float64)

    def _warn_format(self, frac: float, where: str) -> None:
        """Once per run: most responses failing the format gate usually means a model that does not think."""
        if frac >= 0.5 and not self.warned_format:
            self.warned_format = True
            log.warning(f"{where}: {frac:.0%} of the responses failed the format gate (rollout.require_think: "
                        "exactly one </think>, at most one <think>) and scored 0; a model that does not think needs "
                        "rollout.require_think=false (response/format_error_frac follows the share)")

    def _judge_counts(self, reports: list[Any], label: str) -> dict[str, float]:
        """The ranks' judge reports added up as "judge/*" counts. A judge that answered none of its requests stops
        `golong eval` (a wrong judge.url or model would pass rule scores off as judged); in a training run's
        validation it is a warning (the run goes on, that validation's scores the rule scores)."""
        from golong.rewards.judge import JudgeError

        asked, yes, failed, raised, lowered = (sum(getattr(r, k) for r in reports if r is not None)
                                               for k in ("asked", "yes", "failed", "raised", "lowered"))
        first = next((r.first_error for r in reports if r is not None and r.first_error), "")
        jc = self.cfg.judge
        if failed and failed == asked and self.eval_only:
            raise JudgeError(f"{label}: the judge (judge.model={jc.model} at judge.url={jc.url}) judged none of "
                             f"its {asked} answers; the first failure: {first}")
        if failed:
            log.warning(f"{label}: the judge failed on {failed} of {asked} answers, whose rule scores stand; the "
                        f"first failure: {first}")
        return {"judge/asked": float(asked), "judge/yes": float(yes), "judge/failed": float(failed),
                "judge/raised": float(raised), "judge/lowered": float(lowered)}

    def _rollout_metrics(self, rollouts: list[Rollout]) -> dict[str, float]:
        scores = torch.tensor([r.score for r in rollouts], dtype=torch.float64)
        out = {"reward/mean": float(scores.mean()), "reward/std": float(scores.std()) if len(scores) > 1 else 0.0,
               "reward/pass_rate": float((scores >= PASS_SCORE).double().mean()),
               "response/length_mean": sum(len(r.response_ids) for r in rollouts) / len(rollouts),
               "response/length_max": max(len(r.response_ids) for r in rollouts),
               "response/clip_ratio": sum(r.finish_reason == "length" for r in rollouts) / len(rollouts),
               "prompt/length_mean": sum(len(r.prompt_ids) for r in rollouts) / len(rollouts)}
        by_task: dict[str, list[float]] = defaultdict(list)
        for r in rollouts:
            by_task[r.task].append(r.score)
        for task, s in sorted(by_task.items()):
            t = torch.tensor(s, dtype=torch.float64)
            out[f"reward/task/{task}"] = float(t.mean())
            out[f"reward/task_std/{task}"] = float(t.std()) if len(t) > 1 else 0.0
        return out

    # ----------------------------------------------------------------------------- one step
    def _overlong_penalty(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        """[B] float64: DAPO's overlong penalty of each response (algo.overlong_buffer_tokens; 0: all 0)."""
        from golong.algo import overlong_penalty

        a, lengths = self.cfg.algo, torch.tensor([len(r.response_ids) for r in rollouts])
        return overlong_penalty(lengths, self.cfg.rollout.max_response_tokens, a.overlong_buffer_tokens,
                                a.overlong_penalty_factor)

    def _dump_rollouts(self, step: int, trained: Sequence[Rollout]) -> float:
        """RUN_DIR/rollouts/step_<N>.jsonl (rank 0): every response the step generated (self.generated), with
        whether dynamic sampling kept it for training and then its advantage. `record`: its prompt's position in
        the training records; `reward`: the score plus any overlong penalty, what the advantages were computed
        from. A failed write is a warning, not the end of the run. Returns the seconds it took (the other ranks
        wait for them at the next collective)."""
        t0 = time.perf_counter()
        kept = {id(r) for r in trained}
        penalty = self._overlong_penalty(self.generated).tolist()
        rows = ({"step": step, "group": r.group, "record": self.train_prompts[r.prompt_index].index,
                 "data_source": self.train_prompts[r.prompt_index].record.data_source, "task": r.task,
                 "score": r.score, "reward": r.score + p, "kept": id(r) in kept,
                 "advantage": r.advantage if id(r) in kept else None, "finish_reason": r.finish_reason,
                 "prompt_tokens": len(r.prompt_ids), "response_tokens": len(r.response_ids), **(r.reward_info or {}),
                 "response": r.text}
                for r, p in zip(self.generated, penalty))
        path = self.run_dir / "rollouts" / f"step_{step:06d}.jsonl"
        try:
            write_jsonl(path, rows)
        except OSError as e:
            log.warning(f"step {step}: could not write the rollout dump {path}: {e}")
        self.generated = []
        return time.perf_counter() - t0

    def train_step(self, step: int) -> dict[str, float]:
        from golong.algo import compute_advantages
        from golong.rewards import task_group

        cfg = self.cfg
        t_step = time.perf_counter()
        rollouts, metrics = self.collect_rollouts(step)
        if _fault("pause", step) and self.rank == 0:
            self._pause_for_stop_signal(f"step {step}")
        if not rollouts:
            log.warning(f"step {step}: every prompt group had equal rewards in {cfg.algo.max_num_gen_batches} "
                        "generation batches; no update")
            if cfg.logging.dump_rollouts and self.rank == 0:
                metrics["time/dump_s"] = metrics.get("time/dump_s", 0.0) + self._dump_rollouts(step, [])
            metrics["time/step_s"] = time.perf_counter() - t_step
            return metrics
        t0 = time.perf_counter()
        with nvtx_range("advantage"):
            scores = torch.tensor([r.score for r in rollouts], dtype=torch.float64)  # fp32 would merge near-ties
            if cfg.algo.overlong_buffer_tokens:  # DAPO: the advantages see the shaped reward (score/mean includes it)
                penalty = self._overlong_penalty(rollouts)
                scores = scores + penalty
                metrics["score/overlong_penalty_mean"] = float(penalty.mean())
                metrics["score/overlong_frac"] = float((penalty < 0).double().mean())
            tasks = [task_group(r.task) if cfg.algo.group_lbp_by_metric else r.task for r in rollouts]
            adv, adv_metrics = compute_advantages(
                cfg.algo.adv_estimator, scores, [r.group for r in rollouts], tasks, eps=cfg.algo.eps,
                norm_by_task_scale=cfg.algo.norm_by_task_scale, difficulty_reweight=cfg.algo.difficulty_reweight,
                gamma=cfg.algo.gamma, alpha=cfg.algo.alpha)
        for r, a in zip(rollouts, adv.tolist()):
            r.advantage = a
        metrics.update({k if "/" in k else f"adv/{k}": v for k, v in adv_metrics.items()})
        metrics["time/advantage_s"] = time.perf_counter() - t0
        if cfg.logging.dump_rollouts and self.rank == 0:
            # + gathering the texts to rank 0 in collect_rollouts
            metrics["time/dump_s"] = metrics.get("time/dump_s", 0.0) + self._dump_rollouts(step, rollouts)
        self.engine.sleep()  # the trainer's turn: vLLM releases its KV cache (and weights) on GPU
        if cfg.rollout.router_replay:
            t0 = time.perf_counter()
            metrics["routing/received_mib"] = self._exchange_routing(rollouts) / 2**20
            metrics["time/routing_exchange_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with nvtx_range("update"):
            upd = self.actor.update(rollouts, "pg", fault_nan=_fault("nan", step))
        t_update = time.perf_counter() - t0 - upd.get("time/old_logprob_s", 0.0) - upd.get("time/ref_logprob_s", 0.0)
        metrics.update(upd)
        metrics["time/update_s"] = t_update
        metrics["perf/update_tokens_per_s"] = sum(r.length for r in rollouts) * cfg.algo.ppo_epochs / max(t_update,
                                                                                                          1e-9)
        t0 = time.perf_counter()
        with nvtx_range("weight_sync"):
            self.engine.sync_weights(self.model)
        metrics["time/weight_sync_s"] = time.perf_counter() - t0
        metrics["time/step_s"] = time.perf_counter() - t_step
        metrics["perf/tokens_per_s"] = sum(r.length for r in rollouts) / metrics["time/step_s"]
        metrics["memory/peak_gib"] = peak_memory_gib()
        return metrics

    def _exchange_routing(self, rollouts: Sequence[Rollout]) -> int:
        """Routing replay: each rollout's record from the rank that generated it to the ranks that train on it (see
        golong.replay); the store is emptied. Returns the bytes this rank received."""
        received = exchange(rollouts, self.actor.owners(rollouts), self.routing_store, self.rank, self.world,
                            self.dims.cp_size, compute_device())
        self.routing_store.clear()
        return received

    # --------------------------------------------------------------------------- validation
    def validate(self, step: int, responses: list[dict[str, Any]] | None = None, *, starts: Sequence[int] = (0,),
                 saved: Path | None = None, fingerprint: str = "") -> dict[str, float]:
        """rollout.val_n responses per held-out prompt at the validation sampling settings; per-task means.
        `responses`, when given (on every rank: a collective gathers the texts), receives on rank 0 one row per
        response (prompt index, task, score, finish, text); the other ranks' lists stay empty. starts: the first
        prompt of each batch the prompts are generated and scored in, each sampled as in the whole set; with
        `saved` (golong eval, every rank), each batch is appended to that file on rank 0 and the batches it holds
        under `fingerprint` (rank 0's) are read back instead of generated (golong.eval_saved)."""
        if not self.val_prompts:
            return {}
        dump = self.cfg.logging.dump_rollouts and not self.eval_only
        n = self.cfg.rollout.val_n
        results, timings = self._validation_results(starts, saved, fingerprint, texts=dump or responses is not None)
        t0 = time.perf_counter()
        groups: dict[str, list[list[float]]] = defaultdict(list)  # per task, each prompt's n scores
        failed: dict[str, int] = defaultdict(int)  # reward-function failures per task
        dump = dump and self.rank == 0
        rows = None  # rank 0 holds the texts
        if self.rank == 0 and (responses is not None or dump):
            rows = responses if responses is not None else []
        for j, g in enumerate(results):
            record = self.val_prompts[j // n].record
            if j % n == 0:  # results are prompt-major: the prompt's first response
                groups[record.task].append([])
            groups[record.task][-1].append(g.score)
            failed[record.task] += g.reward_failed
            if rows is not None:  # prompt: position among the validation prompts; record: among its records
                prompt = self.val_prompts[j // n]
                if j % n == 0:  # what golong eval-compare checks two evals' prompts by
                    sha = hashlib.sha1(np.asarray(prompt.input_ids, dtype=np.int32).tobytes()).hexdigest()[:16]
                rows.append({"prompt": j // n, "record": prompt.index, "sample": j % n,
                             "prompt_tokens": len(prompt.input_ids), "prompt_sha1": sha, "truncated": prompt.truncated,
                             "data_source": record.data_source, "task": record.task,
                             "groups": row_groups(prompt, self.eval_by, self.row_keys),
                             "score": g.score, "finish_reason": g.finish_reason, **(g.reward_info or {}),
                             "response": g.text})
        if dump:
            path = self.run_dir / "rollouts" / f"val_step_{step:06d}.jsonl"
            try:
                write_jsonl(path, rows)
            except OSError as e:
                log.warning(f"validation at step {step}: could not write the rollout dump {path}: {e}")
        by_task = {t: [s for g in gs for s in g] for t, gs in groups.items()}
        scores = [s for v in by_task.values() for s in v]
        out = {"val/reward/mean": sum(scores) / len(scores),
               "val/time_s": sum(v for k, v in timings.items() if k.startswith("time/")) + time.perf_counter() - t0}
        if "response/format_errors" in timings:
            out["val/format_error_frac"] = timings["response/format_errors"] / len(results)
            self._warn_format(out["val/format_error_frac"], f"validation at step {step}")
        if "reward/scoring_failures" in timings:
            out["val/reward/scoring_failures"] = timings["reward/scoring_failures"]
        if "reward/function_errors" in timings:
            out["val/reward/function_errors"] = timings["reward/function_errors"]
            out.update({f"val/reward/function_errors/task/{t}": float(c) for t, c in sorted(failed.items()) if c})
            out.update(self._extra_means(timings, "val/reward/extra"))
        out.update({f"val/{k}": v for k, v in timings.items() if k.startswith("judge/")})
        out.update({f"val/reward/task/{t}": sum(v) / len(v) for t, v in sorted(by_task.items())})
        out.update({f"val/{k}": v for k, v in sample_metrics([g for gs in groups.values() for g in gs]).items()})
        for t, gs in sorted(groups.items()):
            out.update({f"val/{k}/task/{t}": v for k, v in sample_metrics(gs).items()})
        self.history.append({"step": step, **out})
        return out

    def _validation_results(self, starts: Sequence[int], saved: Path | None, fingerprint: str, texts: bool
                            ) -> tuple[list[Generated], dict[str, float]]:
        """The validation prompts' val_n responses each, prompt-major, generated and scored in batches from `starts`
        (golong eval: the batches `saved` holds under `fingerprint` read back, each new one appended there on rank 0),
        and the batches' timings, counts and sums added up. texts: keep the response texts (rank 0 gets them)."""
        n, total = self.cfg.rollout.val_n, len(self.val_prompts)
        batches = self._restore_batches(saved, fingerprint) if saved is not None else []
        done = batches[-1][1] if batches else 0  # the saved batches' prompts; the plan's batches after them
        starts = [done, *(s for s in starts if s > done)] if done else list(starts)
        whole = len(starts) == 1 and not batches
        for b, (first, end) in enumerate(zip(starts, [*starts[1:], total])):
            if first >= total:
                break
            label = "validation" if whole else f"validation, prompts {first + 1}-{end} of {total}"
            part, took = self._generate_and_score(self.val_prompts[first:end], n, self._sampling(val=True),
                                                  (self.cfg.trainer.seed, "val"), label, texts=texts,
                                                  first_request=first * n, whole_set=whole, tokens=False,
                                                  judge=True)
            if saved is not None and self.rank == 0:
                from golong.eval_saved import append_batch

                append_batch(saved, first, end, [(g.score, g.finish_reason, g.reward_failed, g.reward_numbers,
                                                  g.reward_info, g.text) for g in part], took)
            if saved is not None and _fault("eval_kill", b):
                if dist.is_initialized():
                    dist.barrier()  # rank 0 has written the batch
                os._exit(17)
            batches.append((first, end, part, took))
        results: list[Generated] = [g for _, _, part, _ in batches for g in part]
        timings: dict[str, float] = {}
        for *_, took in batches:  # times, counts and sums: they add up over batches
            for key, value in took.items():
                timings[key] = timings.get(key, 0.0) + value
        failures = timings.get("reward/function_errors", 0)
        if not whole and self.cfg.rollout.reward_function and failures == len(results):  # checked per batch if whole
            raise RewardFunctionError(f"validation: the reward function failed on all {len(results)} responses "
                                      f"(rollout.reward_function={self.cfg.rollout.reward_function}); the first "
                                      "failure is logged above")
        return results, timings

    def _restore_batches(self, saved: Path, fp: str) -> list[tuple[int, int, list[Generated], dict[str, float]]]:
        """The validation batches `saved` holds under fingerprint `fp` (read on rank 0, sent to every rank without
        their texts): (first prompt, end, results as _generate_and_score returned them, timings). A collective."""
        from golong.eval_saved import read_batches

        batches = None
        if self.rank == 0:
            batches = read_batches(saved, fp, len(self.val_prompts), self.cfg.rollout.val_n)
            if batches:
                log.info(f"eval: {batches[-1]['end']} of {len(self.val_prompts)} prompts' responses read from "
                         f"{saved}; generating the rest")
        slim = [(b["first"], b["end"], [r[:4] for r in b["results"]], b["timings"]) for b in batches or []]
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [slim]
            dist.broadcast_object_list(box, src=0)
            slim = box[0]
        empty = np.zeros(0, dtype=np.int32)
        out = []
        for k, (first, end, rows, took) in enumerate(slim):
            full = batches[k]["results"] if batches else [[None] * 6] * len(rows)  # texts and infos: rank 0's
            out.append((first, end, [Generated(empty, None, finish, score, full[j][5], numbers, failed, full[j][4])
                                     for j, (score, finish, failed, numbers) in enumerate(rows)], took))
        return out

    # ------------------------------------------------------------------------------ SFT
    def _start_sft(self) -> None:
        """The warm-up's own optimizer, schedule and prompt order (a resume part way through loads their state
        into these)."""
        from golong.data import PromptSampler

        cfg = self.cfg
        missing = [p for p in self.train_prompts if not reference_answer(p.record).strip()]
        if missing:  # it would train on an empty answer
            r = missing[0].record
            raise ConfigError(f"trainer.sft_steps={cfg.trainer.sft_steps}: {len(missing)} of {len(self.train_prompts)} "
                              "training records have no reference answer to warm up on (extra_info.answer, or "
                              "reward_model.ground_truth as a string or number, its golden_label or doc_ids; the "
                              f"first: record {missing[0].index}, data_source {r.data_source!r}); give them one or "
                              "set trainer.sft_steps=0")
        self.sft_sampler = PromptSampler(len(self.train_prompts), seed=cfg.data.seed + 1)
        self.actor.reset_optimizer(lr=cfg.trainer.sft_lr or cfg.optim.lr, warmup=0, total=cfg.trainer.sft_steps)

    def sft(self) -> None:
        """Supervised warm-up on the records' reference answers (trainer.sft_steps steps). A stop signal ends it
        after the step under way, checkpointed (step_000000); the resumed run continues it from there."""
        cfg = self.cfg
        if self.sft_sampler is None:  # not resumed part way
            self._start_sft()
        # the trainer's turn, as in an RL update: vLLM releases its KV cache (and weights) until the push after SFT
        self.engine.sleep()
        eos = self.tokenizer.eos_token_id
        for s in range(self.sft_step + 1, cfg.trainer.sft_steps + 1):
            t0 = time.perf_counter()
            if _fault("pause_sft", s) and self.rank == 0:
                self._pause_for_stop_signal(f"SFT step {s}")
            prompts = [self.train_prompts[i] for i in self.sft_sampler.take(cfg.trainer.sft_prompts_per_step)]
            batch = [Rollout(p.input_ids, self.tokenizer(sft_target(p.record), add_special_tokens=False)["input_ids"]
                             + [eos], None, group=j, task=p.record.task) for j, p in enumerate(prompts)]
            m = self.actor.update(batch, "sft")
            m["time/step_s"] = time.perf_counter() - t0
            self.writer.log(s - cfg.trainer.sft_steps - 1, m)  # SFT steps are logged at steps <= 0
            if _fault("kill_sft", s):
                os._exit(17)
            if s % max(1, cfg.trainer.sft_steps // 10) == 0 or s == cfg.trainer.sft_steps:
                log.info(f"sft {s}/{cfg.trainer.sft_steps}: loss {m['sft/loss']:.3f} "
                         f"grad_norm {m['sft/grad_norm']:.2f} ({m['time/step_s']:.1f}s)")
            self.sft_step = s
            signum = self._agree_on_stop_signal()
            if signum and s < cfg.trainer.sft_steps:
                log.warning(f"{signal.Signals(signum).name} received: SFT step {s} of {cfg.trainer.sft_steps} is "
                            "done; checkpointing it, then exiting")
                path = self.save_checkpoint()
                self.writer.close()
                raise Preempted(f"{signal.Signals(signum).name} received: SFT step {s} of {cfg.trainer.sft_steps} "
                                f"finished and checkpointed to {path}; exiting with status {PREEMPTED_EXIT_CODE}. "
                                f"{_rerun_advice(cfg.checkpoint.resume)}")
        self.engine.sync_weights(self.model)
        self.actor.reset_optimizer()
        self.sft_done, self.sft_sampler = True, None

    # ----------------------------------------------------------------------------- checkpoint
    def _start_weights(self) -> str:
        """The weights the run started from, which a KL term's reference policy is rebuilt from on a resume."""
        return self.cfg.model.path or f"scratch init, trainer.seed={self.cfg.trainer.seed}"

    def _trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "scheduler": self.actor.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(), "nonfinite_streak": self.nonfinite_streak,
                "sft_done": self.sft_done, "history": self.history, "sft_step": self.sft_step,
                "sft_sampler": None if self.sft_sampler is None else self.sft_sampler.state_dict(),
                "start_weights": self._start_weights(), "seed": self.cfg.trainer.seed,
                "sft_steps": self.cfg.trainer.sft_steps, "data_fingerprint": self.data_fingerprint}

    def save_checkpoint(self) -> Path:
        t0 = time.perf_counter()
        with nvtx_range("checkpoint"):
            path = self.ckpt.save(self.step, self.model, self.actor.optimizer, self._trainer_state(),
                                  hf_config=self.model.config.to_hf(dtype=self.cfg.model.dtype),
                                  extra_files=self._write_tokenizer)
        log.info(f"checkpoint {path} ({time.perf_counter() - t0:.1f}s)")
        return path

    def _write_tokenizer(self, d: Path) -> None:
        self.tokenizer.save_pretrained(str(d / "tokenizer"))
        # and the model's generation defaults (eos ids, sampling), which `golong export` copies from there too
        if self.cfg.model.path and (gen := Path(self.cfg.model.path) / "generation_config.json").is_file():
            shutil.copy2(gen, d / "tokenizer" / gen.name)

    def _check_resume_state(self, path: Path, saved: dict[str, Any]) -> None:
        """Refuse a resume from `path` whose trainer state `saved` does not fit this config: another SFT warm-up
        length part way through it, another number of training prompts, a KL term after a warm-up."""
        sft_steps = self.cfg.trainer.sft_steps
        if saved.get("sft_sampler") is not None and saved.get("sft_steps", sft_steps) != sft_steps:
            # SFT step s is logged at s - sft_steps - 1: the warm-up's metric rows would be relabelled
            raise ConfigError(f"resume from {path}: it is part way through an SFT warm-up of {saved['sft_steps']} "
                              f"steps (at step {saved.get('sft_step')}), this config sets trainer.sft_steps="
                              f"{sft_steps}; resume with trainer.sft_steps={saved['sft_steps']} (the warm-up's steps "
                              "and their metric rows are numbered by it)")
        saved_n = int(saved["sampler"]["n"])
        if saved_n != len(self.train_prompts):  # its position in the data order means nothing for other data
            raise ConfigError(f"resume from {path}: its data order is over {saved_n} training prompts, this config "
                              f"gives {len(self.train_prompts)} (data.train_files, data.synthetic_n, "
                              "data.max_prompt_tokens or data.overflow changed); resume with the same data, or start "
                              f"a new run from its weights: golong export {path} DIR, then model.path=DIR and a new "
                              "logging.run_dir")
        if self.cfg.algo.kl_coef > 0:
            self._check_reference_start(path, saved)

    def _check_reference_start(self, path: Path, saved: dict[str, Any]) -> None:
        """A KL term's reference policy is rebuilt from the starting weights: refuse a run whose checkpoint left
        them through an SFT warm-up (config validation sees only this config's trainer.sft_steps); warn when the
        run started from other weights than this config names."""
        if saved.get("sft_step", 0) > 0:
            raise ConfigError(f"resume from {path} with algo.kl_coef > 0: that run warmed up with {saved['sft_step']} "
                              "SFT steps, away from the starting weights the KL term's reference policy is rebuilt "
                              f"from; start a new run from its weights instead: golong export {path} DIR, then "
                              "model.path=DIR and a new logging.run_dir")
        started = saved.get("start_weights")
        if started is not None and started != self._start_weights():
            log.warning(f"resume from {path}: the run started from {started}, the KL term's reference policy is "
                        f"built from {self._start_weights()}")

    def maybe_resume(self) -> Path | None:
        """Restore the checkpoint checkpoint.resume names (auto: the newest); returns its path (None: none)."""
        path = self.ckpt.resolve(self.cfg.checkpoint.resume)
        if path is None:
            return None
        # a checkpoint from part way through the SFT warm-up holds the warm-up's optimizer and schedule: load
        # them into the warm-up's (its trainer state is a small file, read ahead of the collective load)
        saved = load_trainer_state(path)
        if path != self.checked_resume:  # __init__ checked the one it resolved
            self._check_resume_state(path, saved)
        sft_part_way = saved.get("sft_sampler") is not None
        if sft_part_way:
            self._start_sft()
        state = self.ckpt.load(path, self.model, self.actor.optimizer)
        self.actor.scheduler.load_state_dict(state["scheduler"])
        if sft_part_way:
            self.sft_sampler.load_state_dict(state["sft_sampler"])
        # the config's optimizer settings from here on (the warm-up's learning rate: trainer.sft_lr)
        lr, lr_key = (self.cfg.trainer.sft_lr or self.cfg.optim.lr, "trainer.sft_lr") if sft_part_way else \
            (None, "optim.lr")
        for change in self.actor.apply_config_hyperparameters(lr, lr_key):
            log.warning(f"resume: {change} (the config's value from here on)")
        self.sampler.load_state_dict(state["sampler"])
        if state.get("data_fingerprint", self.data_fingerprint) != self.data_fingerprint:
            log.warning(f"resume from {path}: the training prompts differ from the checkpoint's (as many, "
                        f"{len(self.train_prompts)}, but other data or another tokenization); its position in the "
                        "data order continues over these")
        d = self.cfg.data  # the checkpoint's data order continues (a new order mid-epoch would repeat prompts)
        for key, saved, wanted in (("data.seed", self.sampler.seed, d.seed), ("data.shuffle", self.sampler.shuffle,
                                                                             d.shuffle)):
            if saved != wanted:
                log.warning(f"resume: the checkpoint's data order continues ({key}={saved}); the config's {key}="
                            f"{wanted} does not change it")
        if state.get("seed", self.cfg.trainer.seed) != self.cfg.trainer.seed:  # it seeds each request's sampling
            log.warning(f"resume: the checkpoint's run sampled its rollouts with trainer.seed={state['seed']}; the "
                        f"config's trainer.seed={self.cfg.trainer.seed} seeds them from here on, so the run will not "
                        "repeat what an uninterrupted one would have sampled")
        self.step, self.nonfinite_streak = state["step"], state["nonfinite_streak"]
        self.sft_done, self.history = state["sft_done"], state.get("history", [])
        self.sft_step = state.get("sft_step", self.cfg.trainer.sft_steps if self.sft_done else 0)
        self.engine.sync_weights(self.model)
        log.info(f"resumed from {path} at " + (f"SFT step {self.sft_step}" if sft_part_way else f"step {self.step}"))
        if self.writer.active:  # accepted: these settings produce the run from here on
            save_run_config(self.cfg, self.run_dir)
        return path

    # --------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Resume (checkpoint.resume), SFT warm-up if due, then RL steps up to trainer.total_steps. A stop signal
        (STOP_SIGNALS) ends it after the step under way and its checkpoint, raising Preempted."""
        with self.stop_signals:
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        resumed = self.maybe_resume()
        # the rows an interruption left past the checkpoint (or, on a fresh start, all of them) are set aside
        if resumed is None:
            next_step = None
        elif not self.sft_done:  # part way through the warm-up: SFT step s is logged at step s - sft_steps - 1
            next_step = self.sft_step - cfg.trainer.sft_steps
        else:
            next_step = self.step + 1
        if moved := self.writer.rewind(next_step):
            since = f"after {resumed}" if resumed else "by an earlier start that left no checkpoint"
            log.info(f"{moved} metric rows logged {since} moved to metrics.discarded.jsonl (their steps run again)")
        if resumed is not None and self.step >= cfg.trainer.total_steps:
            # a finished run started again (a requeued job, or a rerun meant to train longer) trains nothing and
            # exits 0: say so, and how to go on, rather than leave only the "resumed ... at step N" line
            log.warning(f"nothing left to train: {resumed} is at step {self.step} and trainer.total_steps="
                        f"{cfg.trainer.total_steps}; to train further, raise trainer.total_steps above {self.step} "
                        f"(e.g. the override trainer.total_steps={self.step + max(1, cfg.trainer.total_steps)})")
        if not self.sft_done:
            signum = self._agree_on_stop_signal()  # a signal during the setup or the resume: no SFT step begins
            if signum:
                self._preempted(signum, resumed)
            self.sft()
            self._validate_before_training()
            path = self.save_checkpoint()
            signum = self._agree_on_stop_signal()
            if signum and self.step < cfg.trainer.total_steps:
                self._preempted(signum, path)
        else:
            validated = cfg.trainer.val_before_train and self.step == 0 and not any(h["step"] == 0
                                                                                    for h in self.history)
            if validated:
                self._validate_before_training()  # (resumed at step 0 after an SFT warm-up: validated then)
            # a signal during the start, the resume or that validation: no RL step is begun (it would run far past a
            # scheduler's grace period); the validation is kept in a step-0 checkpoint
            signum = self._agree_on_stop_signal()
            if signum and self.step < cfg.trainer.total_steps:
                self._preempted(signum, self.save_checkpoint() if validated else resumed)
        capture = CaptureWindow(cfg.profile.steps, cfg.trainer.total_steps)  # nsys --capture-range=cudaProfilerApi
        while self.step < cfg.trainer.total_steps:
            self.step += 1
            step = self.step
            profiling = step in cfg.profile.steps
            with capture.step(step), self._torch_profiler(profiling, step):
                metrics = self.train_step(step)
            last = step == cfg.trainer.total_steps
            if cfg.trainer.val_every and (step % cfg.trainer.val_every == 0 or last):
                metrics.update(self.validate(step))
            skipped = metrics.get("actor/skipped_steps", 0) > 0
            self.nonfinite_streak = self.nonfinite_streak + 1 if skipped else 0
            self.writer.log(step, metrics)
            self._log_step(step, metrics)
            if skipped:
                log.warning(f"step {step}: non-finite loss or grad norm; skipped the update "
                            f"({self.nonfinite_streak} in a row)")
            if _fault("kill", step):
                os._exit(17)
            stop = self.nonfinite_streak >= cfg.trainer.max_consecutive_nonfinite
            signum = self._agree_on_stop_signal()
            if signum and not last:
                log.warning(f"{signal.Signals(signum).name} received: step {step} is done; checkpointing it, "
                            "then exiting")
            if stop or signum or self.ckpt.should_save(step, last_step=last):
                path = self.save_checkpoint()
                if not signum and not last:  # one during the write (seconds to minutes): exit on what it saved
                    signum = self._agree_on_stop_signal()
            if stop:
                self.writer.close()
                raise TrainingStopped(f"{self.nonfinite_streak} consecutive non-finite steps (up to step {step}); "
                                      f"stopped after checkpointing")
            if signum and not last:  # on the last step the run is complete: it ends as usual
                self._preempted(signum, path)
        self.writer.close()
        return {"step": self.step, "history": self.history}

    def _agree_on_stop_signal(self) -> int:
        """The stop signal any rank has received (0: none), the same on every rank: a signal reaches the ranks
        at different moments (or only some of them), and all must checkpoint the same step. One all-reduce of
        one number per step; at the step's end the device has no work left that the next step would not wait
        for first, so reading the result costs no extra wait."""
        flag = torch.tensor([self.stop_signals.received], dtype=torch.int64)
        return int(self.actor._all_reduce(flag, dist.ReduceOp.MAX)[0])

    def _preempted(self, signum: int, path: Path | None) -> None:
        """Stop with Preempted after step self.step, checkpointed to `path` (None: before any step, nothing to keep)."""
        self.writer.close()
        kept = f"step {self.step} finished and checkpointed to {path}" if path is not None else \
            "before the first step, nothing to checkpoint"
        raise Preempted(f"{signal.Signals(signum).name} received: {kept}; exiting with status {PREEMPTED_EXIT_CODE}. "
                        f"{_rerun_advice(self.cfg.checkpoint.resume)}")

    def _pause_for_stop_signal(self, where: str) -> None:
        """Test hook (GOLONG_FAULT="pause@N"): rank 0 waits in the middle of step N until a stop signal arrives
        from outside (the other ranks wait in the step's next collective), so that a test's signal lands inside
        a step, at a step it knows."""
        log.warning(f"fault: rank 0 (pid {os.getpid()}) paused in {where} until a stop signal")
        deadline = time.monotonic() + 300
        while not self.stop_signals.received:
            if time.monotonic() > deadline:
                raise RuntimeError(f"GOLONG_FAULT: paused in {where}, no stop signal within 300 s")
            time.sleep(0.02)

    def _validate_before_training(self) -> None:
        """Step 0's validation, logged and shown (a later step's is on that step's console line)."""
        m = self.validate(0)
        self.writer.log(0, m)
        if m:
            tasks = ", ".join(f"{k.rsplit('/', 1)[-1]} {v:.3f}" for k, v in m.items()
                              if k.startswith("val/reward/task/"))
            log.info(f"validation before training: reward {m['val/reward/mean']:.3f} ({tasks}) | "
                     f"{m['val/time_s']:.1f}s")

    def _log_step(self, step: int, m: dict[str, float]) -> None:
        parts = [f"step {step}/{self.cfg.trainer.total_steps}", f"reward {m.get('reward/mean', float('nan')):.3f}"]
        if "actor/loss" in m:
            parts += [f"loss {m['actor/loss']:+.4f}", f"entropy {m['actor/entropy']:.3f}",
                      f"grad_norm {m['actor/grad_norm']:.3f}"]
        if "mismatch/kl" in m:
            parts.append(f"mismatch_kl {m['mismatch/kl']:.2e}")
        kept, want = m.get("dynamic_sampling/kept_prompts"), self.cfg.trainer.prompts_per_step
        if kept is not None and kept < want:  # dynamic sampling ran out of generation batches: a partial batch
            parts.append(f"kept {kept:.0f}/{want} prompts")
        if "val/reward/mean" in m:
            parts.append(f"val {m['val/reward/mean']:.3f}")
        parts.append(f"{m.get('time/step_s', 0):.1f}s")
        log.info(" | ".join(parts))

    def _torch_profiler(self, active: bool, step: int) -> Any:
        if not (active and self.cfg.profile.torch_trace):
            return nullcontext()
        return TorchTrace(self.run_dir / "profile" / f"trace_step{step:06d}_rank{self.rank}.json")

    def close(self) -> None:
        self.writer.close()


def train(cfg: RunConfig) -> dict[str, Any]:
    """Entry point of `golong train`: build, auto-resume, run to trainer.total_steps."""
    trainer = None
    signals = _StopSignals()  # recorded from here: a signal during the setup (prompts, model, engine) too
    try:
        with signals:
            # inside: a setup error (a config that does not fit the launch) leaves no group
            trainer = Trainer(cfg, stop_signals=signals)
            return trainer.fit()
    except TrainingStopped as e:
        log.error(f"training stopped: {e}")
        raise SystemExit(3) from None
    except Preempted as e:  # a non-zero status, so that the scheduler requeues the job
        log.warning(f"preempted: {e}", extra={"every_rank": True})  # why this process exits 143 (torchrun lists each)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    except KeyboardInterrupt:  # Ctrl-C: not a traceback, but what is kept and how to go on
        newest = latest_checkpoint(checkpoint_dir(cfg))
        kept = "no checkpoint of this run saved yet" if newest is None else \
            f"the newest checkpoint is {newest} (later steps are not saved). {_rerun_advice(cfg.checkpoint.resume)}"
        log.warning(f"interrupted: {kept}; SIGTERM instead finishes and checkpoints the step under way",
                    extra={"every_rank": True})
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
    finally:
        if trainer is not None:
            trainer.close()
        # vLLM tears down its own groups (children of the default one) at exit: leave that to it
        if dist.is_initialized() and cfg.rollout.engine != "vllm":
            dist.destroy_process_group()
