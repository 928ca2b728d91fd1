"""The trainer end to end on CPU: kill and resume reproduce the uninterrupted run exactly (also
after a kill in the middle of a checkpoint write), non-finite steps are skipped and stop the run
after a checkpoint, validation and per-step metrics are logged, profiling writes a trace, and
`golong plot` draws the run."""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from golong.logger import read_metrics
from tests.golong.trainer_helpers import one_thread  # noqa: F401  (autouse fixture)

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
model:
  scratch: {{vocab_size: 1024, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2,
            num_key_value_heads: 1, head_dim: 32, intermediate_size: 48, num_experts: 4,
            num_experts_per_tok: 2, moe_intermediate_size: 24, tie_word_embeddings: false}}
  tokenizer: {tokenizer}
  dtype: float32
data: {{synthetic_n: 48, synthetic_val_n: 6, synthetic_context_tokens: 4, max_prompt_tokens: 256,
       synthetic_tasks: [summarization, sequence_ordering]}}
rollout: {{engine: torch, n: 4, max_response_tokens: 8, require_think: false, reward_workers: 0}}
algo: {{adv_estimator: tmn_grpo, difficulty_reweight: true, rollout_is: mask, max_num_gen_batches: 2}}
optim: {{lr: 1.0e-2, warmup_steps: 3, lr_schedule: cosine, min_lr_ratio: 0.1, weight_decay: 0.01}}
parallel: {{param_dtype: float32, activation_checkpointing: false, backend: gloo}}
trainer: {{total_steps: 4, prompts_per_step: 4, mini_batch_prompts: 2, micro_batch_tokens: 512,
          val_every: 2, sft_steps: 3, sft_prompts_per_step: 8, sft_lr: 2.0e-2, seed: 3}}
checkpoint: {{every: 2, keep_last: 2}}
logging: {{tensorboard: false, progress: false}}
profile: {{steps: [1], torch_trace: true}}
"""

COMPARED = ("actor/loss", "actor/grad_norm", "actor/entropy", "actor/pg_clipfrac", "reward/mean",
            "rollout_is/weight_mean", "val/reward/mean", "sft/loss")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    from golong.data.tokenizer import build_demo_tokenizer

    d = tmp_path_factory.mktemp("trainer")
    build_demo_tokenizer(1024).save_pretrained(str(d / "tok"))  # once, instead of in every run
    path = d / "tiny.yaml"
    path.write_text(CONFIG.format(tokenizer=d / "tok"))
    return path


def _command(config: Path, run_dir: Path, overrides: tuple[str, ...], ranks: int) -> list[str]:
    from tests.distributed import free_port

    launch = ["-m", "golong"] if ranks == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                                                  "--master_port", str(free_port()), "-m", "golong"]
    return [sys.executable, *launch, "train", str(config), f"logging.run_dir={run_dir}", *overrides]


def _env(fault: str) -> dict[str, str]:
    # unbuffered: a test that reads the log while the run goes on sees each line when it is written
    return dict(os.environ, OMP_NUM_THREADS="1", GOLONG_FAULT=fault, PYTHONPATH=str(ROOT), COLUMNS="400",
                PYTHONUNBUFFERED="1")


def _train(config: Path, run_dir: Path, fault: str = "", *overrides: str,
           ranks: int = 1) -> subprocess.CompletedProcess:
    out = subprocess.run(_command(config, run_dir, overrides, ranks), env=_env(fault), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    out.stderr = out.stdout + out.stderr  # the log (rich, rank 0) goes to stdout
    return out


def _signal_mid_step(config: Path, run_dir: Path, step: int | str, sig: signal.Signals,
                     ranks: int = 1) -> tuple[int, str]:
    """Start a run held in the middle of `step` (GOLONG_FAULT=pause@step, rank 0; "sft2": pause_sft@2, in SFT
    step 2), send `sig` to rank 0 alone once it says so, and let it finish. Returns its exit status and its
    whole output."""
    sft = str(step).startswith("sft")
    fault, where = (f"pause_sft@{step[3:]}", f"SFT step {step[3:]}") if sft else (f"pause@{step}", f"step {step}")
    proc = subprocess.Popen(_command(config, run_dir, (), ranks), env=_env(fault), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # ends early (EOF) if the run dies without pausing: the caller's checks then fail
        seen.append(line)
        paused = re.search(rf"rank 0 \(pid (\d+)\) paused in {where} ", line)
        if paused:
            os.kill(int(paused.group(1)), sig)
            break
    rest, _ = proc.communicate(timeout=600)
    return proc.returncode, "".join(seen) + rest


def _assert_same_run(want: dict[int, dict], got: dict[int, dict]) -> None:
    """Every step of `got` logged the same values as `want`'s, bitwise."""
    assert sorted(want) == sorted(got)
    compared = 0
    for step, row in want.items():
        for key in COMPARED:
            if key in row:
                assert got[step][key] == row[key], (step, key, row[key], got[step][key])
                compared += 1
    assert compared >= 20


def _by_step(run_dir: Path) -> dict[int, dict]:
    """The row logged for every step (the last one, should a step have two)."""
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl")}


def test_kill_and_resume_reproduce_the_uninterrupted_run(config_file, tmp_path):
    ref = _train(config_file, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "run"
    killed = _train(config_file, run, "kill@3")  # dies after step 3; the newest checkpoint is step 2
    assert killed.returncode == 17, killed.stderr[-3000:]
    assert max(_by_step(run)) == 3
    # resumes from step 2, replays step 3, then dies while writing the step-4 checkpoint
    torn = _train(config_file, run, "ckpt_write@4")
    assert torn.returncode == 17, torn.stderr[-3000:]
    assert "resumed from" in torn.stderr and "step_000002" in torn.stderr
    assert (run / "checkpoints" / ".tmp-step_000004").is_dir()
    assert not (run / "checkpoints" / "step_000004").exists()
    done = _train(config_file, run)  # the torn step-4 write is ignored: resumes from step 2 again
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step_000002" in done.stderr.split("resumed from")[1].split("\n")[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000004"]

    want, got = _by_step(tmp_path / "ref"), _by_step(run)
    assert sorted(want) == sorted(got) and max(want) == 4
    # one row per step, as in the uninterrupted run: each resume set the rows past its checkpoint aside (step 3 of
    # the killed run; steps 3 and 4 of the torn one) before logging those steps again
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(-3, 5))
    assert [r["step"] for r in read_metrics(run / "metrics.discarded.jsonl")] == [3, 3, 4]
    assert "3 metric rows logged after" not in done.stderr and "2 metric rows logged after" in done.stderr
    # the LR schedule counts trainer steps, and each row logs the rate its update used: RL warms up over 3
    # steps to 1e-2 (cosine after that); the SFT warm-up has its own 3-step cosine from 2e-2 down to 0.1x
    assert [want[s]["actor/lr"] for s in (1, 2, 3, 4)] == pytest.approx([0.25e-2, 0.5e-2, 0.75e-2, 1e-2])
    cos = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(3)]
    assert [want[s]["sft/lr"] for s in (-3, -2, -1)] == pytest.approx([2e-2 * c for c in cos])
    assert any(isinstance(want[s].get("actor/loss"), float) and want[s]["actor/loss"] != 0 for s in (1, 2, 3, 4))
    compared = 0
    for step, row in want.items():
        for key in COMPARED:
            if key in row:
                assert got[step][key] == row[key], (step, key, row[key], got[step][key])  # bitwise
                compared += 1
    assert compared >= 20

    # what else the run left behind: per-task validation, per-step metrics, the profiler trace
    last = want[4]
    assert any(k.startswith("val/reward/task/") for k in last) and "val/reward/mean" in want[2]
    for key in ("reward/pass_rate", "adv/mean", "actor/pg_clipfrac", "actor/grad_norm", "mismatch/kl",
                "mismatch/max_abs", "perf/tokens_per_s", "time/rollout_s", "time/update_s", "memory/peak_gib"):
        assert key in last, key
    # the old-logprob pass runs (and is timed) exactly when the kept prompts form more than one mini-batch
    # (mini_batch_prompts 2); one mini-batch is on-policy: its old logprobs are the update's own, detached
    updates = [s for s in want if "actor/loss" in want[s]]
    several = {s: want[s]["dynamic_sampling/kept_prompts"] > 2 for s in updates}
    assert any(several.values())
    assert all(("time/old_logprob_s" in want[s]) == several[s] for s in updates), several
    assert any(k.startswith("reward/task/") for k in last)
    assert abs(last["mismatch/kl"]) < 1e-5  # the torch engine holds the trainer's weights exactly
    assert list((tmp_path / "ref" / "profile").glob("trace_step000001_rank0.json"))
    from golong.plot import plot_run

    png = plot_run(run)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"

    # one more step with a new learning rate: the config's, not the checkpoint's, from the resumed step on
    more = _train(config_file, run, "", "optim.lr=5e-3", "trainer.total_steps=5")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resume: optim.lr 0.01 -> 0.005" in more.stderr
    factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (4 - 3) / (5 - 3)))  # step 5: cosine halfway
    assert _by_step(run)[5]["actor/lr"] == pytest.approx(5e-3 * factor)


def test_a_kl_run_resumes_exactly_with_its_reference_policy_rebuilt(config_file, tmp_path):
    """algo.kl_coef > 0: checkpoints do not hold the reference policy; a resume rebuilds it from the starting
    weights (here the scratch init of trainer.seed; model.path in a real run) and continues bitwise."""
    over = ("algo.kl_coef=0.5", "trainer.sft_steps=0", "trainer.val_every=0", "profile.steps=[]")
    ref = _train(config_file, tmp_path / "ref", "", *over)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "algo.kl_coef=0.5: a KL term to the reference policy, a frozen float32 copy of the initial weights" in \
        ref.stderr
    run = tmp_path / "run"
    killed = _train(config_file, run, "kill@3", *over)
    assert killed.returncode == 17, killed.stderr[-3000:]
    done = _train(config_file, run, "", *over)
    assert done.returncode == 0 and "step_000002" in done.stderr.split("resumed from")[1], done.stderr[-3000:]
    want, got = _by_step(tmp_path / "ref"), _by_step(run)
    updates = [s for s in want if "actor/loss" in want[s]]
    assert len(updates) >= 3 and all(want[s]["time/ref_logprob_s"] > 0 for s in updates)
    assert all(want[s]["actor/kl_loss"] > 0 for s in updates if s > updates[0])  # the policy left the reference
    for step, row in want.items():
        for key in (*COMPARED, "actor/kl_loss", "actor/pg_loss"):
            if key in row:
                assert got[step][key] == row[key], (step, key, row[key], got[step][key])
    # another seed would rebuild the reference from other initial weights than the run started from: said
    more = _train(config_file, run, "", *over, "trainer.total_steps=5", "trainer.seed=4")
    assert more.returncode == 0, more.stderr[-3000:]
    assert "the run started from scratch init, trainer.seed=3, the KL term's reference policy is built from scratch " \
           "init, trainer.seed=4" in " ".join(more.stderr.split())


def test_rollout_dump_holds_every_generated_response_and_what_training_made_of_it(config_file, tmp_path):
    """logging.dump_rollouts: one JSONL per step with every generated response (all generation batches), kept or
    not; its scores average to reward/mean; the kept ones carry the advantages the estimator gives their rewards
    (score + overlong penalty) and average to score/mean; `record` is the position among the data's records (some
    dropped here, so not the prompt's position); one file per validation, averaging to val/reward/mean."""
    import json

    from golong.algo import compute_advantages, overlong_penalty
    from golong.config import load_config
    from golong.data import build_prompts
    from golong.data.check import run_records
    from golong.data.tokenizer import build_demo_tokenizer

    over = ("logging.dump_rollouts=true", "trainer.total_steps=2", "profile.steps=[]", "data.overflow=drop",
            "data.max_prompt_tokens=150", "algo.overlong_buffer_tokens=4")
    run = tmp_path / "run"
    done = _train(config_file, run, "", *over)
    assert done.returncode == 0, done.stderr[-3000:]
    train, val = run_records(load_config(config_file, list(over)))
    tok = build_demo_tokenizer(1024)
    kept_records = {p.index for p in build_prompts(train, tok, 150, "drop")}
    dropped = set(range(len(train))) - kept_records  # prompts over 150 tokens: the later positions shift
    assert dropped and min(dropped) < max(kept_records)
    metrics = _by_step(run)
    files = sorted(p.name for p in (run / "rollouts").iterdir())
    assert files == ["step_000001.jsonl", "step_000002.jsonl", "val_step_000000.jsonl", "val_step_000002.jsonl"]
    for step in (1, 2):
        m = metrics[step]
        rows = [json.loads(line) for line in (run / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()]
        assert len(rows) == m["dynamic_sampling/gen_batches"] * 4 * 4  # generation batches x prompts x rollout.n
        assert m["time/dump_s"] > 0
        assert sum(r["score"] for r in rows) / len(rows) == pytest.approx(m["reward/mean"], abs=1e-12)
        for r in rows:
            assert r["step"] == step and r["record"] in kept_records and isinstance(r["response"], str)
            assert r["task"] == train[r["record"]].task
            assert r["prompt_tokens"] == len(build_prompts([train[r["record"]]], tok, 150, "drop")[0].input_ids)
            pen = float(overlong_penalty(torch.tensor([r["response_tokens"]]), 8, 4, 1.0)[0])
            assert r["reward"] == pytest.approx(r["score"] + pen, abs=1e-12)
        kept = [r for r in rows if r["kept"]]
        assert len(kept) == 4 * m["dynamic_sampling/kept_prompts"]
        assert all((r["advantage"] is None) != r["kept"] for r in rows)
        if kept:
            assert sum(r["reward"] for r in kept) / len(kept) == pytest.approx(m["score/mean"], abs=1e-12)
            adv, _ = compute_advantages("tmn_grpo", torch.tensor([r["reward"] for r in kept], dtype=torch.float64),
                                        [r["group"] for r in kept], [r["task"] for r in kept],
                                        difficulty_reweight=True)
            assert [r["advantage"] for r in kept] == pytest.approx(adv.tolist(), abs=1e-6)
    for step in (0, 2):
        rows = [json.loads(line) for line in (run / "rollouts" / f"val_step_{step:06d}.jsonl").read_text().splitlines()]
        val_kept = [p.index for p in build_prompts(val, tok, 150, "drop")]
        assert [r["record"] for r in rows] == val_kept and len(val_kept) < len(val)  # one response per prompt
        assert sum(r["score"] for r in rows) / len(rows) == pytest.approx(metrics[step]["val/reward/mean"])
        assert all(r["task"] == val[r["record"]].task for r in rows)
    assert any(any(r["kept"] for r in map(json.loads, (run / "rollouts" / f"step_{s:06d}.jsonl").read_text()
                                              .splitlines())) for s in (1, 2))


def test_rollout_dump_of_a_step_that_kept_nothing_and_of_a_failed_write(tmp_path, capsys):
    """A step whose groups all had equal rewards is dumped too (nothing kept, no advantages); a dump that cannot be
    written is a warning, and the responses it held are released either way."""
    import json
    import types

    import numpy as np

    from golong.actor import Rollout
    from golong.config import RunConfig
    from golong.data import build_prompts
    from golong.data.synthetic import generate
    from golong.data.tokenizer import build_demo_tokenizer
    from golong.trainer import Trainer

    tok = build_demo_tokenizer()
    prompts = build_prompts(generate(3, 8, seed=2), tok, 256)
    stub = types.SimpleNamespace(cfg=RunConfig(), tokenizer=tok, train_prompts=prompts, stop_ids={tok.eos_token_id},
                                 run_dir=tmp_path / "run")
    stub._overlong_penalty = types.MethodType(Trainer._overlong_penalty, stub)

    def generated():
        return [Rollout(prompts[k].input_ids, np.array(tok.encode("an answer") + [tok.eos_token_id], dtype=np.int32),
                        None, group=k, task=prompts[k].record.task, score=0.0, finish_reason="stop", prompt_index=k,
                        text="an answer")
                for k in (2, 0)]

    stub.generated = generated()
    assert Trainer._dump_rollouts(stub, 7, []) >= 0 and stub.generated == []
    rows = [json.loads(line) for line in (tmp_path / "run" / "rollouts" / "step_000007.jsonl").read_text().splitlines()]
    assert [(r["record"], r["kept"], r["advantage"], r["response"]) for r in rows] == \
        [(2, False, None, "an answer"), (0, False, None, "an answer")]
    stub.run_dir = tmp_path / "a_file"
    stub.run_dir.write_text("not a directory")
    stub.generated = generated()
    Trainer._dump_rollouts(stub, 8, [])  # the log goes to stdout
    assert "WARNING step 8: could not write the rollout dump" in capsys.readouterr().out and stub.generated == []


def test_a_kl_term_is_refused_on_a_run_that_warmed_up_with_sft(config_file, tmp_path):
    """The config check sees only this config's trainer.sft_steps: resuming a run whose checkpoint already did the
    warm-up with sft_steps=0 and a KL term would anchor the policy to the weights before the warm-up."""
    run = tmp_path / "run"
    first = _train(config_file, run, "", "trainer.total_steps=2", "trainer.val_every=0", "profile.steps=[]")
    assert first.returncode == 0, first.stderr[-3000:]
    again = _train(config_file, run, "", "trainer.total_steps=3", "trainer.sft_steps=0", "algo.kl_coef=0.5",
                   "trainer.val_every=0", "profile.steps=[]")
    said = " ".join(again.stderr.split())
    assert again.returncode == 2 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert "with algo.kl_coef > 0: that run warmed up with 3 SFT steps, away from the starting weights" in said, said
    assert max(_by_step(run)) == 2  # nothing trained


def test_overlong_shaping_reaches_the_advantages_and_leaves_the_task_score(config_file, tmp_path):
    """algo.overlong_buffer_tokens: without dynamic sampling every response trains, so the shaped mean the advantages
    saw (score/mean) is the task score's mean (reward/mean) plus the mean penalty, and responses near the 8-token
    budget were penalised."""
    run = tmp_path / "run"
    done = _train(config_file, run, "", "algo.overlong_buffer_tokens=4", "algo.overlong_penalty_factor=0.5",
                  "algo.dynamic_sampling=false", "trainer.sft_steps=0", "trainer.val_every=0", "profile.steps=[]",
                  "trainer.total_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [r for r in _by_step(run).values() if "score/mean" in r]
    assert len(rows) == 2 and any(r["score/overlong_frac"] > 0 for r in rows)
    for r in rows:
        assert -0.5 <= r["score/overlong_penalty_mean"] <= 0 and r["actor/loss"] != 0
        assert r["score/mean"] == pytest.approx(r["reward/mean"] + r["score/overlong_penalty_mean"], abs=1e-9)


def test_ctrl_c_is_one_line_naming_the_checkpoint_a_rerun_continues_from(config_file, tmp_path):
    """Ctrl-C (SIGINT) mid-run printed a KeyboardInterrupt traceback. Now: one line naming the newest checkpoint
    (step 2 here, checkpoint.every=2; step 3 under way is not saved), status 130; the rerun continues from it."""
    run = tmp_path / "run"
    status, out = _signal_mid_step(config_file, run, 3, signal.SIGINT)
    said = " ".join(out.split())  # rich may wrap lines
    assert status == 130 and "Traceback" not in out, out[-3000:]
    assert f"interrupted: the newest checkpoint is {run / 'checkpoints' / 'step_000002'} (later steps are not " \
           "saved). Run the same command again to continue (checkpoint.resume=auto)" in said, said[-3000:]
    resumed = _train(config_file, run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_000002" in resumed.stderr.split("resumed from")[1].split("\n")[0]
    assert max(_by_step(run)) == 4


def test_stop_advice_names_resume_auto_where_the_same_command_would_not_continue(tmp_path, monkeypatch):
    """"Run the same command again" after Ctrl-C (or a preemption) continues only under checkpoint.resume=auto: with
    resume=none the rerun is refused (the run directory holds checkpoints now), with a checkpoint path it starts from
    that one again. Without a checkpoint there is nothing to continue from."""
    import golong.trainer as trainer_mod
    from golong.config import load_config

    class Interrupted:  # Ctrl-C arrives during fit
        def __init__(self, cfg, **kwargs):
            pass

        def fit(self):
            raise KeyboardInterrupt

        def close(self):
            pass

    def interrupt(run, resume):
        said.clear()
        cfg = load_config(ROOT / "configs/demo-cpu.yaml", [f"logging.run_dir={run}", f"checkpoint.resume={resume}"])
        with pytest.raises(SystemExit) as e:
            trainer_mod.train(cfg)
        assert e.value.code == 130 and len(said) == 1, said
        return said[0]

    said = []
    monkeypatch.setattr(trainer_mod, "Trainer", Interrupted)
    monkeypatch.setattr(trainer_mod.log, "warning", lambda msg, **kwargs: said.append(msg))
    assert "interrupted: no checkpoint of this run saved yet; SIGTERM" in interrupt(tmp_path / "empty", "auto")
    newest = tmp_path / "run" / "checkpoints" / "step_000002"
    newest.mkdir(parents=True)
    (newest / "COMPLETE").write_text("2\n")
    kept = f"interrupted: the newest checkpoint is {newest} (later steps are not saved). "
    assert kept + "Run the same command again to continue (checkpoint.resume=auto)" in interrupt(newest.parents[1],
                                                                                                "auto")
    assert kept + "Run the command again with checkpoint.resume=auto (not none) to continue" in interrupt(
        newest.parents[1], "none")
    older = tmp_path / "other" / "step_000001"
    assert kept + f"Run the command again with checkpoint.resume=auto (not {older}) to continue" in interrupt(
        newest.parents[1], str(older))


def test_sigterm_checkpoints_the_step_under_way_and_resume_continues_identically(config_file, tmp_path):
    """SIGTERM (what Slurm, Kubernetes and torchrun send before they kill a job) ended the process at once: all
    since the last checkpoint was lost. Now the step under way finishes, is checkpointed (here step 3, which
    checkpoint.every=2 would not save), the run says so and exits 143; resume=auto continues from that step
    exactly as the uninterrupted run went on."""
    ref = _train(config_file, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "run"
    status, out = _signal_mid_step(config_file, run, 3, signal.SIGTERM)
    said = " ".join(out.split())  # rich may wrap lines
    assert status == 143, out[-3000:]
    assert "SIGTERM received: step 3 is done; checkpointing it, then exiting" in said, said[-3000:]
    assert f"preempted: SIGTERM received: step 3 finished and checkpointed to {run / 'checkpoints' / 'step_000003'}" \
           f"; exiting with status 143" in said, said[-3000:]
    assert (run / "checkpoints" / "step_000003" / "COMPLETE").is_file()
    assert max(_by_step(run)) == 3  # step 3 was finished and logged; step 4 never began

    resumed = _train(config_file, run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_000003" in resumed.stderr.split("resumed from")[1].split("\n")[0]
    _assert_same_run(_by_step(tmp_path / "ref"), _by_step(run))


def test_a_resume_at_step_0_after_the_warm_up_does_not_validate_again(config_file, tmp_path):
    """With trainer.val_before_train the run resumed from the checkpoint after its SFT warm-up (step_000000) ran
    step 0's validation again: a second step-0 row and a whole validation pass more."""
    over = ("trainer.val_before_train=true", "trainer.total_steps=2", "trainer.val_every=0")
    killed = _train(config_file, tmp_path, "kill@1", *over)  # after step 1; the newest checkpoint: step_000000
    assert killed.returncode == 17, killed.stderr[-3000:]
    done = _train(config_file, tmp_path, "", *over)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and "validation before training" not in done.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [-3, -2, -1, 0, 1, 2]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.discarded.jsonl")] == [1]


def test_a_stop_signal_during_the_sft_warm_up_checkpoints_it_and_resume_continues_it(config_file, tmp_path):
    """A stop signal in the SFT warm-up waited for the whole warm-up (long past a scheduler's grace period),
    then checkpointed. Now SFT step 2 of 3 finishes, is checkpointed with the warm-up's optimizer, schedule and
    prompt order (step_000000), the run exits 143, and the resumed run continues the warm-up at SFT step 3
    exactly as the uninterrupted run went on (SFT rows, then every RL step, bitwise)."""
    ref = _train(config_file, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "run"
    status, out = _signal_mid_step(config_file, run, "sft2", signal.SIGTERM)
    said = " ".join(out.split())
    assert status == 143, said[-3000:]
    assert "SIGTERM received: SFT step 2 of 3 is done; checkpointing it, then exiting" in said, said[-3000:]
    assert f"preempted: SIGTERM received: SFT step 2 of 3 finished and checkpointed to " \
           f"{run / 'checkpoints' / 'step_000000'}; exiting with status 143" in said, said[-3000:]
    assert sorted(_by_step(run)) == [-3, -2]  # SFT steps 1 and 2 (logged at steps <= 0); step 3 never began

    # the resumed warm-up dies after logging SFT step 3, before its end's checkpoint: the next resume sets that
    # row aside (SFT step s is logged at s - sft_steps - 1) and logs the step again
    killed = _train(config_file, run, "kill_sft@3")
    assert killed.returncode == 17 and sorted(_by_step(run)) == [-3, -2, -1], killed.stderr[-3000:]
    resumed = _train(config_file, run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"resumed from \S*step_000000 at SFT step 2", " ".join(resumed.stderr.split()))
    assert [r["step"] for r in read_metrics(run / "metrics.discarded.jsonl")] == [-1]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [-3, -2, -1, 0, 1, 2, 3, 4]
    want, got = _by_step(tmp_path / "ref"), _by_step(run)
    assert [s for s in want if s < 0] == [-3, -2, -1]
    _assert_same_run(want, got)


def test_a_stop_signal_before_the_first_rl_step_begins_none(config_file, tmp_path):
    """A signal during the validation before training (or during the resume) was acted on only after step 1 had
    run whole (a long-context rollout and update: far past a scheduler's grace period). Now no step begins: the
    validation is kept in a step-0 checkpoint; a signal during a resume exits on the checkpoint resumed from."""
    import torch.distributed as dist

    from golong.config import load_config
    from golong.trainer import Preempted, Trainer

    run = tmp_path / "run"
    over = [f"logging.run_dir={run}", "trainer.sft_steps=0", "trainer.val_before_train=true", "profile.steps=[]"]

    def fit_with_signal(when: str) -> str:
        trainer = Trainer(load_config(config_file, over))
        hook = trainer.validate if when == "validate" else trainer.maybe_resume

        def signalled(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)  # recorded by the trainer's handler while fit runs
            return hook(*args, **kwargs)

        setattr(trainer, "validate" if when == "validate" else "maybe_resume", signalled)
        try:
            with pytest.raises(Preempted) as e:
                trainer.fit()
            assert trainer.step == 0
        finally:
            dist.destroy_process_group()
        return str(e.value)

    said = fit_with_signal("validate")
    ckpt = run / "checkpoints" / "step_000000"
    assert f"SIGTERM received: step 0 finished and checkpointed to {ckpt}; exiting with status 143" in said
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0]  # the validation, no RL step
    assert f"checkpointed to {ckpt};" in fit_with_signal("resume")  # resumed from it: nothing new to save
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000000"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0]


@pytest.mark.distributed
def test_a_stop_signal_to_one_rank_stops_every_rank_after_the_same_step(config_file, tmp_path):
    """2 ranks under torchrun; SIGUSR1 (Slurm's --signal=USR1@SECONDS) reaches rank 0 alone, in the middle of
    step 3: the ranks agree through an all-reduce, both finish step 3, write its checkpoint together and exit
    143; the resumed run reproduces the uninterrupted one."""
    ref = _train(config_file, tmp_path / "ref", ranks=2)
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = tmp_path / "run"
    status, out = _signal_mid_step(config_file, run, 3, signal.SIGUSR1, ranks=2)
    said = " ".join(out.split())
    assert status != 0, said[-3000:]
    # both ranks stopped after step 3 (each rank says why it exits) on their way to status 143, which torchrun
    # reports (for the rank it saw end first; the other may still be ending when it stops looking)
    assert said.count("preempted: SIGUSR1 received: step 3 finished and checkpointed to") == 2, said[-5000:]
    assert "exitcode : 143" in said, said[-5000:]
    ckpt = run / "checkpoints" / "step_000003"
    assert (ckpt / "COMPLETE").is_file() and (ckpt / "rng_rank1.pt").is_file()
    assert max(_by_step(run)) == 3

    resumed = _train(config_file, run, ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_run(_by_step(tmp_path / "ref"), _by_step(run))


def test_eval_scores_a_checkpoint_and_its_export_exactly_as_training_validated_them(config_file, tmp_path):
    """`golong eval` runs training's validation (same prompts, sampling and seeds) on a checkpoint's weights, or
    on the Hugging Face export of that checkpoint (model.path): the per-task rewards equal those the training run
    logged at that step, and every response lands in responses.jsonl with its score."""
    import json

    # responses long enough to earn some reward from this tiny model (8 tokens earn none); at the fixture's lr 1e-2
    # the first two full Adam steps after the warm-up take every reward to 0
    longer = ("rollout.max_response_tokens=24", "data.synthetic_val_n=8", "rollout.val_n=2", "trainer.sft_steps=6",
              "trainer.total_steps=2", "optim.lr=3e-3")
    run = tmp_path / "run"
    trained = _train(config_file, run, "", *longer)
    assert trained.returncode == 0
    logged = _by_step(run)[2]
    assert logged["val/reward/mean"] > 0
    # step 0's validation (after the SFT warm-up) is on the console too, task by task
    before = _by_step(run)[0]
    assert (f"validation before training: reward {before['val/reward/mean']:.3f} (sequence_ordering "
            f"{before['val/reward/task/sequence_ordering']:.3f}, summarization "
            f"{before['val/reward/task/summarization']:.3f})") in trained.stderr, trained.stderr[-3000:]

    def evaluate(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "golong", "eval", str(config_file), *longer,
                               f"logging.run_dir={run}", *args], env=_env(""), cwd=ROOT, capture_output=True,
                              text=True, timeout=600)

    ckpt = run / "checkpoints" / "step_000002"
    hf = tmp_path / "hf"
    export = subprocess.run([sys.executable, "-m", "golong", "export", str(ckpt), str(hf)], env=_env(""),
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr[-3000:]
    for args, out in (((f"--checkpoint={ckpt}",), run / "eval" / "step_000002"),  # the default directory
                      ((f"model.path={hf}", f"--out={tmp_path / 'hf_eval'}"), tmp_path / "hf_eval")):
        done = evaluate(*args)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        result = json.loads((out / "eval.json").read_text())
        assert result["reward_mean"] == logged["val/reward/mean"], args
        # golong's metrics: no reward function, so no kwargs it is called with (eval-compare compares them)
        assert result["reward_function"] is None and result["reward_kwargs"] is None
        assert result["scoring_failures"] == 0
        tasks = {k.split("/")[-1]: v for k, v in logged.items() if k.startswith("val/reward/task/")}
        assert {t: r["reward_mean"] for t, r in result["tasks"].items()} == tasks
        assert {t: r["metric"] for t, r in result["tasks"].items()} == {"sequence_ordering": "pairwise",
                                                                          "summarization": "rouge_l"}
        rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
        assert len(rows) == 16 and {(r["prompt"], r["sample"]) for r in rows} == {(p, k) for p in range(8)
                                                                                   for k in range(2)}
        for t, mean in tasks.items():
            mine = [r["score"] for r in rows if r["task"] == t]
            assert len(mine) == result["tasks"][t]["responses"] and sum(mine) / len(mine) == pytest.approx(mean)
        assert all(isinstance(r["response"], str) for r in rows)

    # on 2 ranks, 3 prompts at a time: killed after its second batch was saved, the rerun generates the third
    # alone and ends with the same scores as training's validation and the 1-rank eval's responses
    from tests.distributed import free_port

    two = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "golong", "eval", str(config_file), *longer, f"logging.run_dir={run}",
               f"--checkpoint={ckpt}", f"--out={two}", "--save-every=3"]
    killed = subprocess.run(command, env=_env("eval_kill@1"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0 and not (two / "eval.json").exists()
    saved = [json.loads(line) for line in (two / "eval.partial.jsonl").read_text().splitlines()]
    assert [b["first"] for b in saved[1:]] == [0, 3] and [len(b["results"]) for b in saved[1:]] == [6, 6]
    command[command.index("--master_port") + 1] = str(free_port())
    done = subprocess.run(command, env=_env(""), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert f"eval: 6 of 8 prompts' responses read from {two / 'eval.partial.jsonl'}" in done.stdout + done.stderr
    assert json.loads((two / "eval.json").read_text())["reward_mean"] == logged["val/reward/mean"]
    one = run / "eval" / "step_000002" / "responses.jsonl"
    assert (two / "responses.jsonl").read_text() == one.read_text() and not (two / "eval.partial.jsonl").exists()

    nothing = evaluate("data.synthetic_val_n=0")
    assert nothing.returncode == 2 and "golong: error: nothing to evaluate: set data.val_files" in nothing.stderr
    wrong = evaluate(f"--checkpoint={run}")
    assert wrong.returncode == 2 and (f"--checkpoint {run} is not a complete checkpoint (no COMPLETE marker); the "
                                      f"newest one in it is {run}/checkpoints/step_") in wrong.stderr


def test_eval_names_the_metric_each_task_was_scored_by(config_file, tmp_path):
    """eval.json's per-task metric is the one the records were scored by, which a data source can decide whatever
    the task name (reward_mode, else ability) says: a judge source's math_verify records score by model_verify,
    an "EM" record of ability long_context by em, a "selection" record of a LongBench-Pro reward_mode by choice
    (the task name's own metric was reported: math_verify, "-", ndcg)."""
    import json

    from golong.config import load_config
    from golong.data.synthetic import generate
    from golong.evaluate import evaluate

    recs = [r.to_dict() for r in generate(4, 4, seed=1, tasks=["summarization"])]
    recs[0].update(data_source="frames_model_verify", extra_info={"reward_mode": "math_verify"},
                   reward_model={"ground_truth": {"golden_label": "42"}})
    recs[1].update(data_source="EM", ability="long_context", extra_info={},
                   reward_model={"ground_truth": {"golden_label": "Ada"}})
    recs[2].update(data_source="selection", extra_info={"reward_mode": "T1.2 Key-Snippet Retrieval"},
                   reward_model={"ground_truth": {"golden_label": "B"}})
    val = tmp_path / "val.jsonl"
    with open(val, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    cfg = load_config(config_file, [f"logging.run_dir={tmp_path / 'run'}", f"data.val_files=[{val}]",
                                    "rollout.max_response_tokens=4"])
    result = evaluate(cfg, None, tmp_path / "out")
    assert {t: r["metric"] for t, r in result["tasks"].items()} == {
        "math_verify": "model_verify", "long_context": "em", "T1.2 Key-Snippet Retrieval": "choice",
        "summarization": "rouge_l"}
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["tasks"] == result["tasks"]


def test_nonfinite_steps_are_skipped_then_stop_after_a_checkpoint(config_file, tmp_path, monkeypatch, caplog):
    import torch.distributed as dist

    from golong.config import load_config
    from golong.trainer import Trainer, TrainingStopped

    monkeypatch.setenv("GOLONG_FAULT", "nan@2,nan@3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    over = [f"logging.run_dir={tmp_path}", "trainer.max_consecutive_nonfinite=2", "trainer.val_every=0",
            "profile.steps=[]",
            # every step updates, whatever the sampled rewards (a step whose groups all tie would otherwise make no
            # update to skip or to count)
            "algo.dynamic_sampling=false", "trainer.total_steps=6"]
    cfg = load_config(config_file, over)
    logging.getLogger("golong").addHandler(caplog.handler)  # it does not propagate to the root logger
    try:
        trainer = Trainer(cfg)
        before = {n: t.clone() for n, t in trainer.actor.full_state()}
        with pytest.raises(TrainingStopped, match="2 consecutive non-finite"):
            trainer.fit()
        after = {n: t.clone() for n, t in trainer.actor.full_state()}
        # the step-2 checkpoint holds the weights after step 1 (step 2 was skipped) ...
        trainer.ckpt.load(tmp_path / "checkpoints" / "step_000002", trainer.model, trainer.actor.optimizer)
        at_step_2 = dict(trainer.actor.full_state())
    finally:
        logging.getLogger("golong").removeHandler(caplog.handler)
        if dist.is_initialized():
            dist.destroy_process_group()
    rows = _by_step(tmp_path)
    assert sorted(rows) == [-3, -2, -1, 0, 1, 2, 3]  # 3 SFT steps, the SFT validation, 3 RL steps
    assert rows[1]["actor/skipped_steps"] == 0 and rows[1]["actor/optimizer_steps"] == 2
    assert rows[2]["actor/skipped_steps"] == 2 and rows[3]["actor/skipped_steps"] == 2
    assert (tmp_path / "checkpoints" / "step_000003" / "COMPLETE").is_file()  # written before stopping
    assert "step 3: non-finite loss or grad norm; skipped the update (2 in a row)" in caplog.text
    assert any(not torch.equal(before[n], after[n]) for n in before)  # step 1 trained
    assert all(torch.equal(at_step_2[n], after[n]) for n in after)  # ... and step 3 changed nothing
    # a resume goes on counting the streak its checkpoint was in (step 2 skipped: one more stops the run)
    resume = tmp_path / "checkpoints" / "step_000002"
    try:
        trainer = Trainer(load_config(config_file, [*over, f"checkpoint.resume={resume}"]))
        assert trainer.maybe_resume() == resume and (trainer.step, trainer.nonfinite_streak) == (2, 1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _scripted_train_step(cfg, monkeypatch, scripted, prepare=None) -> tuple[dict, list]:
    """Trainer.train_step(1) with `scripted` in place of generation and scoring (None: generated and scored for
    real) and the update replaced by a recorder: (the step's metrics, the rollouts the update received).
    `prepare(trainer)` runs first."""
    import torch.distributed as dist

    from golong.trainer import Trainer

    seen = {}
    try:
        trainer = Trainer(cfg)
        if prepare is not None:
            prepare(trainer)
        if scripted is not None:
            monkeypatch.setattr(trainer, "_generate_and_score", scripted)
        monkeypatch.setattr(trainer.actor, "update", lambda rollouts, loss, fault_nan=False: seen.update(
            rollouts=list(rollouts)) or {})
        m = trainer.train_step(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return m, seen["rollouts"]


def test_train_step_filters_groups_and_hands_the_estimators_advantages_to_the_update(config_file, tmp_path,
                                                                                      monkeypatch):
    """Scripted scores through Trainer.train_step: dynamic sampling drops the tied groups of the first generation
    batch and tops the batch up from the second; the update receives exactly the kept groups, with the
    advantages of TMN-GRPO + difficulty reweighting (the per-response loop oracle of test_algo)."""
    from golong.config import load_config
    from tests.golong.test_algo import _loop_oracle

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config(config_file, [f"logging.run_dir={tmp_path}", "trainer.sft_steps=0", "trainer.val_every=0",
                                    "profile.steps=[]", "algo.max_num_gen_batches=3"])
    # 4 prompts x 4 responses per generation batch; batch 0: groups 0 and 2 tie, batch 1: group 1 ties
    script = [[[1.0, 1.0, 1.0, 1.0], [0.0, 0.5, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.25, 0.0, 1.0, 0.75]],
              [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 1.0, 0.0], [0.3, 0.9, 0.9, 0.2]],
              [[0.0, 1.0, 0.0, 1.0]] * 4]
    calls = []

    def scripted(prompts, n, params, seed_key, label, texts=False, routing=None):
        from golong.trainer import Generated

        scores = script[len(calls)]
        calls.append(seed_key)
        return [Generated([5, 6, 7][: 1 + (j % 3)], [-1.0] * (1 + (j % 3)), "stop", scores[j // n][j % n], None)
                for j in range(len(prompts) * n)], {}

    m, got = _scripted_train_step(cfg, monkeypatch, scripted)
    assert len(calls) == 2 and m["dynamic_sampling/gen_batches"] == 2  # full after the second batch
    # kept in generation order: batch 0's groups 1, 3, then batch 1's groups 0 (= 4) and 2 (= 6)
    assert [r.group for r in got] == [g for g in (1, 3, 4, 6) for _ in range(4)]
    flat = [s for b, p in ((0, 1), (0, 3), (1, 0), (1, 2)) for s in script[b][p]]
    assert [r.score for r in got] == flat
    want = _loop_oracle("tmn_grpo", flat, [r.group for r in got], [r.task for r in got], reweight=True)
    assert [r.advantage for r in got] == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert any(a != 0 for a in want)
    assert m["dynamic_sampling/kept_prompts"] == 4 and m["dynamic_sampling/kept_fraction"] == pytest.approx(4 / 8)
    # the reward metrics cover every generated response, the tied groups included
    every = [s for b in script[:2] for p in b for s in p]
    assert m["reward/mean"] == pytest.approx(sum(every) / len(every))
    assert m["reward/pass_rate"] == pytest.approx(sum(s >= 1.0 for s in every) / len(every))


@pytest.mark.parametrize("grouped", [True, False])
def test_train_step_groups_longbench_pro_subtasks_by_metric(config_file, tmp_path, monkeypatch, grouped):
    """With LongBench-Pro reward modes the estimator's task ids are the metric groups GoLongRL normalises by
    (T1.1 and T1.2 -> one "NDCG" task scale), or the raw subtasks with algo.group_lbp_by_metric=false."""
    from golong.config import load_config
    from tests.golong.test_algo import _loop_oracle

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config(config_file, [f"logging.run_dir={tmp_path}", "trainer.sft_steps=0", "trainer.val_every=0",
                                    "profile.steps=[]", "algo.adv_estimator=tmn_grpo", "algo.difficulty_reweight=false",
                                    f"algo.group_lbp_by_metric={str(grouped).lower()}"])
    scores = [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.5, 0.0], [0.25, 0.0, 1.0, 0.75], [0.0, 1.0, 1.0, 0.0]]
    modes = ["T1.1 Global Cohesive Retrieval", "T1.2 Key-Snippet Retrieval"]

    def name_subtasks(trainer):
        for i, p in enumerate(trainer.train_prompts):
            p.record.extra_info["reward_mode"] = modes[i % 2]

    def scripted(prompts, n, params, seed_key, label, texts=False, routing=None):
        from golong.trainer import Generated

        return [Generated([5, 6], [-1.0, -1.0], "stop", scores[j // n][j % n], None)
                for j in range(len(prompts) * n)], {}

    m, got = _scripted_train_step(cfg, monkeypatch, scripted, prepare=name_subtasks)
    assert {r.task for r in got} == set(modes)  # the records' own task names are untouched
    tasks = ["NDCG" if grouped else r.task for r in got]
    want = _loop_oracle("tmn_grpo", [r.score for r in got], [r.group for r in got], tasks)
    assert [r.advantage for r in got] == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert ("task/NDCG/num_prompts" in m) == grouped
    if grouped:
        assert m["task/NDCG/num_prompts"] == 4


def test_format_errors_become_a_share_of_every_generated_response_and_one_warning(config_file, tmp_path, monkeypatch,
                                                                                    capsys):
    """response/format_error_frac: the responses of all generation batches that failed the format gate over all
    responses generated; the first step where most fail warns once, naming rollout.require_think."""
    from golong.config import load_config

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config(config_file, [f"logging.run_dir={tmp_path}", "trainer.sft_steps=0", "trainer.val_every=0",
                                    "profile.steps=[]", "rollout.require_think=true", "algo.max_num_gen_batches=2"])
    calls = []

    # batch 0: all tied (dropped), 10 errors; then 3
    def scripted(prompts, n, params, seed_key, label, texts=False, routing=None):
        from golong.trainer import Generated

        calls.append(seed_key)
        tied = len(calls) == 1
        out = [Generated([5, 6], [-1.0, -1.0], "stop", 0.0 if tied else float(j % 2), None)
               for j in range(len(prompts) * n)]
        return out, {"time/rollout_s": 1.0, "response/format_errors": 10.0 if tied else 3.0}

    m, _ = _scripted_train_step(cfg, monkeypatch, scripted)  # the log goes to stdout
    assert len(calls) == 2 and m["dynamic_sampling/gen_batches"] == 2
    assert m["response/format_error_frac"] == pytest.approx(13 / 32) and "response/format_errors" not in m
    assert "format gate" not in capsys.readouterr().out  # 41%: no warning

    def most_fail(prompts, n, params, seed_key, label, texts=False, routing=None):
        from golong.trainer import Generated

        return [Generated([5, 6], [-1.0, -1.0], "length" if j % 4 == 0 else "stop", float(j % 2), None)
                for j in range(len(prompts) * n)], {"response/format_errors": 12.0}

    m, _ = _scripted_train_step(cfg, monkeypatch, most_fail)
    assert m["response/format_error_frac"] == pytest.approx(12 / 16)
    assert m["response/clip_ratio"] == pytest.approx(4 / 16)  # the responses cut at rollout.max_response_tokens
    warned = [line for line in capsys.readouterr().out.splitlines() if "format gate" in line]
    assert len(warned) == 1 and "WARNING step 1: 75%" in warned[0] and "rollout.require_think=false" in warned[0]


def test_validation_reports_its_format_error_share_apart_from_its_time(config_file, tmp_path, monkeypatch):
    import torch.distributed as dist

    from golong.config import load_config
    from golong.trainer import Generated, Trainer

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config(config_file, [f"logging.run_dir={tmp_path}", "trainer.sft_steps=0", "profile.steps=[]",
                                    "rollout.require_think=true", "data.synthetic_val_n=5", "rollout.val_n=2"])

    def scripted(prompts, n, params, seed_key, label, texts=False, **kwargs):
        return [Generated([5, 6], [-1.0, -1.0], "stop", 0.5, None) for _ in range(len(prompts) * n)], {
            "time/rollout_s": 2.0, "time/reward_s": 1.0, "response/format_errors": 4.0}

    try:
        trainer = Trainer(cfg)
        monkeypatch.setattr(trainer, "_generate_and_score", scripted)
        m = trainer.validate(0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert m["val/format_error_frac"] == pytest.approx(4 / 10) and m["val/reward/mean"] == 0.5
    assert 3.0 <= m["val/time_s"] < 3.5  # seconds only, not the count


def test_resume_onto_data_of_another_size_is_one_line(config_file, tmp_path):
    """A checkpoint's sampler position is over its own prompt count: resuming onto more (or fewer) prompts
    stops with one line naming the checkpoint, both counts and the way on (was a ValueError traceback)."""
    quick = ("trainer.sft_steps=0", "trainer.total_steps=1", "trainer.val_every=0", "profile.steps=[]")
    first = _train(config_file, tmp_path, "", *quick)
    assert first.returncode == 0, first.stderr[-3000:]
    written = (tmp_path / "config.yaml").read_text()
    more = _train(config_file, tmp_path, "", *quick, "trainer.total_steps=2", "data.synthetic_n=50")
    assert more.returncode == 2 and "Traceback" not in more.stderr, more.stderr[-3000:]
    line = more.stderr.strip().splitlines()[-1]
    assert line.startswith("golong: error: resume from ") and "step_000001" in line, line
    assert "over 48 training prompts, this config gives 50" in line and "golong export" in line, line
    assert max(_by_step(tmp_path)) == 1  # nothing trained on the mismatched data
    # the run directory still says what produced its checkpoints (the refused settings had replaced it)
    assert (tmp_path / "config.yaml").read_text() == written and not list(tmp_path.glob("config-*.yaml"))


def test_resuming_a_finished_run_says_there_is_nothing_left_to_train(config_file, tmp_path):
    """A run already at trainer.total_steps printed only "resumed ... at step N" and exited 0, as if it had
    trained: it now says that nothing is left and how to train further (still exit 0: a requeued finished job
    is no failure)."""
    quick = ("trainer.sft_steps=0", "trainer.total_steps=1", "trainer.val_every=0", "profile.steps=[]")
    first = _train(config_file, tmp_path, "", *quick)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "nothing left to train" not in first.stderr
    again = _train(config_file, tmp_path, "", *quick)
    assert again.returncode == 0, again.stderr[-3000:]
    said = " ".join(again.stderr.split())  # rich may wrap the line
    assert "nothing left to train: " in said and "step_000001 is at step 1 and trainer.total_steps=1" in said, said
    assert "raise trainer.total_steps above 1" in said and "trainer.total_steps=2" in said, said
    assert max(_by_step(tmp_path)) == 1 and "step 2/" not in said  # and it trained nothing


def test_resume_applies_the_configs_optimizer_settings(config_file, tmp_path, caplog):
    """Loading a checkpoint brings back its param groups; every optimizer setting of the config must win over
    them, not only lr / weight decay (betas, eps and impl were silently the checkpoint's: switching a run that
    ran out of memory with impl=foreach to another impl did nothing)."""
    import torch.distributed as dist

    from golong.config import load_config
    from golong.trainer import Trainer

    base = [f"logging.run_dir={tmp_path}", "trainer.sft_steps=0", "trainer.val_every=0", "profile.steps=[]",
            "trainer.total_steps=1", "optim.impl=foreach"]
    logging.getLogger("golong").addHandler(caplog.handler)  # it does not propagate to the root logger
    try:
        for overrides in ([], ["trainer.total_steps=2", "optim.impl=fused", "optim.betas=[0.8,0.95]",
                               "optim.adam_eps=1e-6", "optim.weight_decay=0.05", "optim.lr=5e-3"]):
            trainer = Trainer(load_config(config_file, base + overrides))
            try:
                trainer.fit()
            finally:
                dist.destroy_process_group()
    finally:
        logging.getLogger("golong").removeHandler(caplog.handler)
    for g in trainer.actor.optimizer.param_groups:
        assert (g["foreach"], g["fused"], g["betas"], g["eps"], g["weight_decay"]) == (False, True, (0.8, 0.95),
                                                                                       1e-6, 0.05)
        assert g["initial_lr"] == 5e-3
    for change in ("optim.lr 0.01 -> 0.005", "optim.weight_decay 0.01 -> 0.05", "optim.betas [0.9, 0.999] -> "
                   "[0.8, 0.95]", "optim.adam_eps 1e-08 -> 1e-06", "optim.impl foreach -> fused"):
        assert f"resume: {change} (the config's value from here on)" in caplog.text
    assert _by_step(tmp_path)[2]["actor/lr"] == pytest.approx(5e-3 * 2 / 4)  # warm-up 3 steps, at step 2


def test_metric_scoring_that_runs_out_of_time_is_counted_and_warned_of(config_file, tmp_path, monkeypatch, caplog):
    """A response whose golong metric ran out of time or memory (math-verify on a tower of powers, an OOM-killed
    worker) scored 0 without a trace: it is counted in reward/scoring_failures (val/: in validation; eval.json:
    scoring_failures) and the first is warned of once a run."""
    import torch.distributed as dist

    import golong.rewards.scoring as scoring
    from golong.config import load_config
    from golong.trainer import Trainer

    real = scoring.score_records

    def losing_one(records, responses, *, config=None, report=None):
        out = real(records, responses, config=config, report=report)
        report.lost.append((0, "metric em ran past the 9 s time limit (rollout.reward_timeout_s)"))
        out[0] = 0.0
        return out

    monkeypatch.setattr(scoring, "score_records", losing_one)
    logging.getLogger("golong").addHandler(caplog.handler)  # it does not propagate to the root logger
    trainer = Trainer(load_config(config_file, [f"logging.run_dir={tmp_path}", "trainer.sft_steps=0",
                                                "trainer.total_steps=2", "trainer.val_every=1", "profile.steps=[]",
                                                "algo.dynamic_sampling=false", "checkpoint.every=0"]))
    try:
        trainer.fit()
    finally:
        logging.getLogger("golong").removeHandler(caplog.handler)
        dist.destroy_process_group()
    rows = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert [rows[s]["reward/scoring_failures"] for s in (1, 2)] == [1, 1]  # one generation batch a step
    assert [rows[s]["val/reward/scoring_failures"] for s in (1, 2)] == [1, 1]
    warned = [r.getMessage() for r in caplog.records if "scoring" in r.getMessage() and r.levelname == "WARNING"]
    assert warned == ["rollout step 1: scoring 1 of 16 responses failed: they score 0 (reward/scoring_failures counts "
                      "them every step, val/reward/scoring_failures in validation). The first: metric em ran past the "
                      "9 s time limit (rollout.reward_timeout_s)"]


def test_a_stop_signal_during_a_checkpoint_write_exits_on_that_checkpoint(config_file, tmp_path):
    """A signal that lands while a scheduled checkpoint is written (seconds to minutes at scale) was acted on only
    after the next step had run whole and been checkpointed again: the run now exits on the checkpoint written."""
    import torch.distributed as dist

    from golong.checkpoint import Checkpointer
    from golong.config import load_config
    from golong.trainer import Preempted, Trainer

    run = tmp_path / "run"
    trainer = Trainer(load_config(config_file, [f"logging.run_dir={run}", "trainer.sft_steps=0", "trainer.val_every=0",
                                                "profile.steps=[]", "checkpoint.every=2"]))
    save = trainer.ckpt.save

    def save_and_signal(*args, **kwargs):
        out = save(*args, **kwargs)
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # recorded by the trainer's handler while fit runs
        return out

    assert isinstance(trainer.ckpt, Checkpointer)
    trainer.ckpt.save = save_and_signal
    try:
        with pytest.raises(Preempted, match=f"SIGTERM received: step 2 finished and checkpointed to "
                                            f"{run / 'checkpoints' / 'step_000002'}; exiting with status 143"):
            trainer.fit()
        assert trainer.step == 2
    finally:
        dist.destroy_process_group()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]


def test_a_stop_signal_during_the_setup_is_a_preemption(config_file, tmp_path, monkeypatch):
    """SIGTERM / SIGUSR1 while golong train reads its prompts, builds the model or starts the engine (tens of
    minutes for GoLongRL's data) killed the process with the signal's default action (status 138 for SIGUSR1, no
    "preempted" line, so no requeue): it is now recorded from the start, and the run exits 143 before any step."""
    from golong.config import load_config
    from golong.trainer import Trainer, train

    run = tmp_path / "run"
    load = Trainer._load_prompts

    def load_and_signal(self):
        os.kill(os.getpid(), signal.SIGUSR1)
        return load(self)

    monkeypatch.setattr(Trainer, "_load_prompts", load_and_signal)
    # without golong's handler installed yet, SIGUSR1 would end pytest: record it here instead (what the trainer
    # installs during train() replaces this one, and restores it afterwards)
    seen = []

    def handler(*_):
        seen.append(1)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        for sft_steps in (0, 3):  # before the RL loop, and before the SFT warm-up
            with pytest.raises(SystemExit) as e:
                train(load_config(config_file, [f"logging.run_dir={run}", f"trainer.sft_steps={sft_steps}",
                                                "trainer.val_before_train=false", "profile.steps=[]"]))
            assert e.value.code == 143 and not seen
            assert not (run / "metrics.jsonl").exists() or not read_metrics(run / "metrics.jsonl")
            assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())
        assert signal.getsignal(signal.SIGUSR1) is handler  # restored when train() returns
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_resume_part_way_through_the_sft_warm_up_applies_the_configs_optimizer_settings(config_file, tmp_path,
                                                                                         caplog, monkeypatch):
    """A checkpoint from part way through the SFT warm-up holds the warm-up's optimizer: resumed with other optimizer
    settings (optim.impl after an out-of-memory, trainer.sft_lr, weight decay ...), the config's win there too, as
    on an RL resume; they were silently the checkpoint's for the rest of the warm-up."""
    import torch.distributed as dist

    from golong.config import ConfigError, load_config
    from golong.trainer import Preempted, Trainer

    base = [f"logging.run_dir={tmp_path}", "trainer.val_every=0", "profile.steps=[]", "trainer.total_steps=1",
            "optim.impl=foreach"]
    stop_at = iter([0, 0, signal.SIGTERM])  # none before the warm-up and after SFT step 1; one after step 2 of 3
    monkeypatch.setattr(Trainer, "_agree_on_stop_signal", lambda self: next(stop_at, 0))
    trainer = Trainer(load_config(config_file, base))
    try:
        with pytest.raises(Preempted, match="SFT step 2 of 3 finished and checkpointed"):
            trainer.fit()
    finally:
        dist.destroy_process_group()
    # another warm-up length part way through it: its steps' metric rows are numbered by it (were relabelled);
    # refused from the checkpoint's trainer state, before a model is built
    import golong.trainer as trainer_module

    with monkeypatch.context() as m:
        m.setattr(trainer_module, "build_model", lambda *a, **k: pytest.fail("a model was built"))
        try:
            with pytest.raises(ConfigError, match=r"part way through an SFT warm-up of 3 steps \(at step 2\), this "
                                                  r"config sets trainer.sft_steps=5; resume with trainer.sft_steps=3"):
                Trainer(load_config(config_file, base + ["trainer.sft_steps=5"]))
        finally:
            dist.destroy_process_group()
    logging.getLogger("golong").addHandler(caplog.handler)  # it does not propagate to the root logger
    # other training data of the same size: its position in the data order goes on over other prompts, warned of
    trainer = Trainer(load_config(config_file, base + ["data.synthetic_tasks=[comprehension,precise_retrieval]"]))
    try:
        assert trainer.maybe_resume() is not None and trainer.sft_step == 2
    finally:
        dist.destroy_process_group()
    assert "the training prompts differ from the checkpoint's (as many, 48, but other data" in caplog.text
    caplog.clear()
    trainer = Trainer(load_config(config_file, base + ["optim.impl=fused", "optim.betas=[0.8,0.95]",
                                                      "optim.adam_eps=1e-6", "optim.weight_decay=0.05",
                                                      "trainer.sft_lr=5e-3"]))
    try:
        assert trainer.maybe_resume() is not None and trainer.sft_step == 2 and not trainer.sft_done
        groups = trainer.actor.optimizer.param_groups
    finally:
        logging.getLogger("golong").removeHandler(caplog.handler)
        dist.destroy_process_group()
    for g in groups:
        assert (g["foreach"], g["fused"], g["betas"], g["eps"], g["weight_decay"]) == (False, True, (0.8, 0.95),
                                                                                       1e-6, 0.05)
        # the warm-up's schedule keeps its place: cosine over 3 SFT steps to 0.1, 2 taken
        assert g["initial_lr"] == 5e-3 and g["lr"] == pytest.approx(5e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(
            math.pi * 2 / 3))))
    assert "the training prompts differ" not in caplog.text  # the same data: no warning
    for change in ("trainer.sft_lr 0.02 -> 0.005", "optim.weight_decay 0.01 -> 0.05", "optim.impl foreach -> fused"):
        assert f"resume: {change} (the config's value from here on)" in caplog.text


def test_the_rollout_engine_sleeps_through_the_sft_warm_up(config_file, tmp_path, monkeypatch):
    """The SFT warm-up is the trainer's turn as much as an RL update: the engine sleeps before its first step (a
    colocated vLLM engine kept its rollout.gpu_memory_utilization share of the GPU, KV cache and weights, through
    every SFT step, which golong.plan's fit check assumes released), and the weights are pushed after it."""
    import torch.distributed as dist

    from golong.config import load_config
    from golong.trainer import Trainer

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config(config_file, [f"logging.run_dir={tmp_path}", "trainer.sft_steps=2", "trainer.val_every=0",
                                    "profile.steps=[]"])
    events = []

    class Recorder:  # the trainer's engine interface, calls recorded in order
        def sleep(self):
            events.append("sleep")

        def sync_weights(self, model):
            events.append("sync")

        def generate(self, *args, **kwargs):
            raise AssertionError("no rollouts during the SFT warm-up")

    try:
        trainer = Trainer(cfg)
        trainer.engine = Recorder()
        batches = []
        monkeypatch.setattr(trainer.actor, "update", lambda batch, loss, fault_nan=False: events.append(loss) or
                            batches.append(batch) or {"sft/loss": 0.0, "sft/grad_norm": 0.0})
        trainer.sft()
        eos = trainer.tokenizer.eos_token_id
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert events == ["sleep", "sft", "sft", "sync"]
    # each SFT target is the reference answer and then EOS: a warm-up without it never teaches the model to stop
    for r in (r for batch in batches for r in batch):
        assert len(r.response_ids) > 1 and int(r.response_ids[-1]) == eos and eos not in r.response_ids[:-1]


def test_sampling_settings_and_decoding_reach_the_engine_and_the_rewards(config_file):
    """rollout.temperature / top_p / top_k / max_response_tokens reach the training requests and the val_* ones the
    validation's; a response is decoded whole, its stop token stripped only where it ends in one (a response cut
    at the length limit keeps its last token)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from golong.config import load_config
    from golong.trainer import Trainer

    cfg = load_config(config_file, ["rollout.temperature=0.8", "rollout.top_p=0.9", "rollout.top_k=20",
                                    "rollout.max_response_tokens=7", "rollout.val_temperature=0.6",
                                    "rollout.val_top_p=0.95"])
    t = SimpleNamespace(cfg=cfg)
    train, val = Trainer._sampling(t), Trainer._sampling(t, val=True)
    assert (train.temperature, train.top_p, train.top_k, train.max_tokens) == (0.8, 0.9, 20, 7)
    assert (val.temperature, val.top_p, val.max_tokens) == (0.6, 0.95, 7)
    tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    t = SimpleNamespace(tokenizer=tok, stop_ids={tok.eos_token_id})
    t._strip_stop = lambda ids: Trainer._strip_stop(t, ids)
    ids = tok("the answer is 42", add_special_tokens=False)["input_ids"]
    text = tok.decode(ids)
    assert Trainer._decode_responses(t, [[*ids, tok.eos_token_id], ids, []]) == [text, text, ""]


def test_a_generation_batch_larger_than_the_step_fills_it_in_one_round(config_file, tmp_path, monkeypatch):
    """trainer.gen_batch_prompts (GoLongRL: 512 prompts generated for 128 trained): one generation batch of 8 prompts
    for a 4-prompt step; the first 4 groups with unequal scores are kept in order, the rest are discarded, and the
    sampler moves on by all 8 prompts."""
    import torch.distributed as dist

    from golong.config import load_config
    from golong.trainer import Generated, Trainer

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config(config_file, [f"logging.run_dir={tmp_path}", "trainer.sft_steps=0", "trainer.val_every=0",
                                    "profile.steps=[]", "algo.max_num_gen_batches=3", "trainer.gen_batch_prompts=8"])
    tied, varied = [0.0] * 4, [0.0, 1.0, 0.5, 0.0]
    script = [tied, varied, tied, tied, varied, varied, varied, varied]  # groups 1, 4, 5, 6, 7 carry signal
    sizes = []
    try:
        trainer = Trainer(cfg)
        start = trainer.sampler.position

        def scripted(prompts, n, params, seed_key, label, texts=False, routing=None):
            sizes.append(len(prompts))
            return [Generated([5, 6], [-1.0, -1.0], "stop", script[j // n][j % n], None)
                    for j in range(len(prompts) * n)], {}

        monkeypatch.setattr(trainer, "_generate_and_score", scripted)
        got, m = trainer.collect_rollouts(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert sizes == [8] and m["dynamic_sampling/gen_batches"] == 1
    assert [r.group for r in got] == [g for g in (1, 4, 5, 6) for _ in range(4)]
    assert m["dynamic_sampling/kept_prompts"] == 4 and m["dynamic_sampling/kept_fraction"] == pytest.approx(4 / 8)
    assert trainer.sampler.position == start + 8


def test_dynamic_sampling_filters_on_the_metric_it_is_told(config_file, tmp_path, monkeypatch, capsys):
    """algo.filter_metric (DAPO's filter_groups.metric): with "acc", a key of the reward function's dict results,
    groups whose scores differ but whose acc is tied are dropped and the others kept, a result without it (a
    failed call, a plain number) counting its score as DAPO does; with "reward" the overlong penalty separates
    responses of equal score; another key counts 0 where a result lacks it; a key no result has held in the run
    stops it naming the keys they do hold, one held before but missing from a whole batch is warned about once; a
    key under which the results hold text stops it saying so (the real reward function's results, not scripted)."""
    import torch.distributed as dist

    from golong.config import ConfigError, config_warnings, load_config
    from golong.rewards.function import RewardFunctionError
    from golong.trainer import Generated, Trainer

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "reward.py").write_text("def compute_score(data_source, solution_str, ground_truth, extra_info):\n"
                                        "    return {'score': 1.0, 'acc': 1.0, 'pred': 'the answer'}\n")
    overrides = [f"logging.run_dir={tmp_path}", "trainer.sft_steps=0", "trainer.val_every=0", "profile.steps=[]",
                 "algo.max_num_gen_batches=1", "trainer.gen_batch_prompts=6", "trainer.prompts_per_step=6",
                 "rollout.max_response_tokens=8", "algo.filter_metric=acc"]
    with pytest.raises(ConfigError, match="algo.filter_metric='acc': valid names score, reward, or with "
                                          "rollout.reward_function"):
        load_config(config_file, overrides)
    cfg = load_config(config_file, [*overrides, f"rollout.reward_function={tmp_path / 'reward.py'}"])
    assert config_warnings(cfg) == []
    off = load_config(config_file, [*overrides, f"rollout.reward_function={tmp_path / 'reward.py'}",
                                    "algo.dynamic_sampling=false"])
    assert config_warnings(off) == ["algo.filter_metric=acc is not read: dynamic sampling filters nothing "
                                    "(algo.dynamic_sampling=False, rollout.n=4)"]
    ok, wrong, failed = {"acc": 1.0, "pass": 1.0}, {"acc": 0.0}, "failed"
    # per group (4 responses each): scores, the numbers of the function's results, response lengths
    script = [([0.0, 1.0, 0.5, 0.2], [ok] * 4, [2] * 4),  # scores differ, acc tied: dropped under acc
              ([0.5] * 4, [ok, wrong, ok, ok], [2] * 4),  # scores tied, acc differs: kept under acc
              ([0.0, 0.3, 0.3, 0.3], [failed, ok, ok, ok], [2] * 4),  # the failed call's acc is its score 0: kept
              ([0.0, 0.0, 0.0, 0.0], [failed, wrong, wrong, wrong], [2] * 4),  # 0 like the others: dropped
              ([1.0] * 4, [ok] * 4, [2, 8, 2, 2]),  # an overlong response: kept under "reward" only
              ([1.0, 0.0, 1.0, 1.0], [None] * 4, [2] * 4)]  # plain numbers: acc is the score, kept
    try:
        trainer = Trainer(cfg)

        def response(score, numbers, length):
            return Generated(list(range(5, 5 + length)), [-1.0] * length, "stop", score, None,
                             None if numbers == failed else numbers, numbers == failed)

        def scripted(prompts, n, params, seed_key, label, texts=False, routing=None):
            assert n == 4
            return [response(*(x[j % n] for x in script[j // n])) for j in range(len(prompts) * n)], {}

        generate_and_score = trainer._generate_and_score
        monkeypatch.setattr(trainer, "_generate_and_score", scripted)
        got, _ = trainer.collect_rollouts(1)
        assert sorted({r.group for r in got}) == [1, 2, 5]
        assert [r.reward_numbers for r in got if r.group == 1] == [ok, wrong, ok, ok]
        trainer.cfg.algo.filter_metric = "reward"
        trainer.cfg.algo.overlong_buffer_tokens = 4
        assert sorted({r.group for r in trainer.collect_rollouts(2)[0]}) == [0, 2, 4, 5]
        trainer.cfg.algo.filter_metric = "score"
        assert sorted({r.group for r in trainer.collect_rollouts(3)[0]}) == [0, 2, 5]
        trainer.cfg.algo.filter_metric = "pass"  # held by some results: the others count 0
        assert sorted({r.group for r in trainer.collect_rollouts(4)[0]}) == [1, 2]
        # a key no result has held in the run: stopped (a misspelt key would drop every group, every step)
        trainer.cfg.algo.filter_metric = "accuracy"
        with pytest.raises(RewardFunctionError, match=r"algo.filter_metric=accuracy: no result .* held a number "
                                                      r"under 'accuracy' in this run \(the numbers they held: acc, "
                                                      r"pass; or score"):
            trainer.collect_rollouts(5)
        # held before, missing from a whole batch: every response counts 0 there, warned once
        trainer.cfg.algo.filter_metric = "pass"
        script[:] = [([1.0, 0.0, 1.0, 1.0], [None] * 4, [2] * 4)] * 6
        capsys.readouterr()
        assert trainer.collect_rollouts(6)[0] == [] and trainer.collect_rollouts(7)[0] == []
        warned = [line for line in capsys.readouterr().out.splitlines() if "no result in this generation" in line]
        assert len(warned) == 1 and "algo.filter_metric=pass" in warned[0]
        # text under the key: said so, with one value (it was "no number", the text only in the rollout dump)
        monkeypatch.setattr(trainer, "_generate_and_score", generate_and_score)
        trainer.cfg.algo.filter_metric = "pred"
        with pytest.raises(RewardFunctionError, match=r"algo.filter_metric=pred: the reward function's results hold "
                                                      r"text under 'pred' \(such as 'the answer'\), not a number; .* "
                                                      r"\(the numbers they held: acc; or score, reward\)"):
            trainer.collect_rollouts(8)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_rollout_rate_is_over_every_generation_batch(config_file, tmp_path, monkeypatch):
    """perf/rollout_tokens_per_s of a step that generated twice is all generated tokens over all rollout time
    (it was the sum of the two batches' rates: twice the real rate)."""
    import torch.distributed as dist

    from golong.config import load_config
    from golong.trainer import Generated, Trainer

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config(config_file, [f"logging.run_dir={tmp_path}", "trainer.sft_steps=0", "trainer.val_every=0",
                                    "profile.steps=[]", "algo.max_num_gen_batches=2"])
    batches = []
    try:
        trainer = Trainer(cfg)

        # every group tied: both batches are generated
        def scripted(prompts, n, params, seed_key, label, texts=False, routing=None):
            out = [Generated([5, 6, 7][: 1 + (j % 3)], [-1.0] * (1 + (j % 3)), "stop", 0.0, None)
                   for j in range(len(prompts) * n)]
            tokens = sum(len(o[0]) for o in out)
            batches.append(tokens)
            seconds = 2.0 * len(batches)  # 2 s, then 4 s
            return out, {"time/rollout_s": seconds, "time/reward_s": 0.5}

        monkeypatch.setattr(trainer, "_generate_and_score", scripted)
        _, m = trainer.collect_rollouts(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert len(batches) == 2 and m["time/rollout_s"] == 6.0 and m["time/reward_s"] == 1.0
    assert m["perf/rollout_tokens_per_s"] == pytest.approx(sum(batches) / 6.0)


def test_resume_says_the_data_order_stays_the_checkpoints(config_file, tmp_path, caplog):
    """The sampler state of a checkpoint carries its data.seed and data.shuffle: on resume the config's were
    dropped without a word. A changed trainer.seed does reseed the rollouts from there on: said too."""
    import torch.distributed as dist

    from golong.config import load_config
    from golong.trainer import Trainer

    base = [f"logging.run_dir={tmp_path}", "trainer.sft_steps=0", "trainer.val_every=0", "profile.steps=[]",
            "trainer.total_steps=1"]
    logging.getLogger("golong").addHandler(caplog.handler)  # it does not propagate to the root logger
    try:
        for overrides in ([], ["data.seed=5", "data.shuffle=false", "trainer.seed=7"]):
            trainer = Trainer(load_config(config_file, base + overrides))
            try:
                trainer.maybe_resume() if overrides else trainer.fit()
            finally:
                dist.destroy_process_group()
    finally:
        logging.getLogger("golong").removeHandler(caplog.handler)
    assert (trainer.sampler.seed, trainer.sampler.shuffle) == (0, True)  # the order of the run continues
    # the accepted resume's settings are the run's config.yaml from here on, the first start's kept beside it
    (kept,) = tmp_path.glob("config-*.yaml")
    assert load_config(kept).trainer.seed != 7 and load_config(tmp_path / "config.yaml").trainer.seed == 7
    for saved, wanted in (("data.seed=0", "data.seed=5"), ("data.shuffle=True", "data.shuffle=False")):
        assert f"resume: the checkpoint's data order continues ({saved}); the config's {wanted} does not change it" \
            in caplog.text
    assert re.search(r"resume: the checkpoint's run sampled its rollouts with trainer\.seed=\d+; the config's "
                     r"trainer\.seed=7 seeds them from here on", caplog.text)


def test_rollout_progress_in_a_log_file_is_a_line_every_interval(monkeypatch, caplog):
    """Off a terminal (a cluster's log file) the rollout progress bar was switched off and nothing else said how
    far a rollout of many minutes had got; it now logs a line every log_every_s seconds."""
    from golong.trainer import _Progress

    monkeypatch.delenv("FORCE_COLOR", raising=False)  # pytest captures stdout: not a terminal
    logging.getLogger("golong").addHandler(caplog.handler)  # it does not propagate to the root logger
    try:
        with caplog.at_level(logging.INFO, logger="golong"):
            with _Progress(True, "rollout step 3", 5, log_every_s=0) as bar:
                bar(2)
                bar(3)
            with _Progress(True, "validation", 4) as bar:  # at the default interval quick work says nothing
                bar(4)
            with _Progress(False, "off (not rank 0)", 4, log_every_s=0) as bar:
                bar(4)
    finally:
        logging.getLogger("golong").removeHandler(caplog.handler)
    lines = [r.getMessage().split(" (")[0] for r in caplog.records if "responses" in r.getMessage()]
    assert lines == ["rollout step 3: 2/5 responses", "rollout step 3: 5/5 responses"]


def test_validation_without_validation_prompts_is_warned(config_file, tmp_path, caplog):
    """trainer.val_every with no validation prompts (none given, or all dropped as too long) validated nothing
    and said nothing: the val/ curves were just missing."""
    import torch.distributed as dist

    from golong.config import load_config
    from golong.data import write_records
    from golong.data.synthetic import generate
    from golong.trainer import Trainer

    write_records(generate(2, 400, seed=1), tmp_path / "long.jsonl")  # over max_prompt_tokens=256
    cases = {"given": ["data.synthetic_val_n=6"], "none": ["data.synthetic_val_n=0"],
             "all too long": [f"data.val_files=[{tmp_path / 'long.jsonl'}]", "data.overflow=drop"]}
    logging.getLogger("golong").addHandler(caplog.handler)  # it does not propagate to the root logger
    try:
        for case, overrides in cases.items():
            caplog.clear()
            Trainer(load_config(config_file, [f"logging.run_dir={tmp_path}", "trainer.val_every=2", *overrides]))
            dist.destroy_process_group()
            assert ("there are no validation prompts" in caplog.text) == (case != "given"), case
    finally:
        logging.getLogger("golong").removeHandler(caplog.handler)


@pytest.mark.parametrize("data_source, reward_mode, gt", [
    ("longbench_pro", "T5.1 Full-Sentence Citation Alignment", {"doc_ids": ["[3]", "[7]"]}),  # f1: after [Answer]
    ("longbench_pro", "T2.1 Global Timeline Reconstruction", {"doc_ids": ["e1", "e2", "e3"]}),  # pairwise
    ("EM", None, {"golden_label": "42"}),
    ("math_longcot_math_verify", None, {"golden_label": "\\frac{3}{4}"}),
])
def test_sft_target_scores_full_reward_under_its_records_metric(data_source, reward_mode, gt):
    """The SFT warm-up teaches the format the reward reads: for LongBench-Pro metrics the recipe reads the
    whole response after [Answer] (without one, the think-block lines count as predicted items)."""
    from golong.data.records import Record, sft_target
    from golong.rewards.scoring import score_record

    rec = Record.from_dict({"data_source": data_source, "prompt": "q", "ability": "long_context",
                            "reward_model": {"ground_truth": gt},
                            "extra_info": {"reward_mode": reward_mode} if reward_mode else {}})
    assert score_record(rec, sft_target(rec), timeout=None) == 1.0


def test_stop_ids_include_the_checkpoints_own_eos_ids_as_vllm_adds_them(tmp_path):
    """vLLM stops every request at the checkpoint's EOS ids as well (generation_config.json, else config.json;
    a real engine with eos_token_ids=[] stopped at a generation_config EOS its torch twin sampled past): the
    trainer's stop ids, given to both engines and used to strip the stop token, include them."""
    import json

    from golong.build import stop_token_ids
    from golong.data.tokenizer import build_demo_tokenizer

    tok = build_demo_tokenizer(vocab_size=1024)
    base = stop_token_ids(tok)
    assert tok.eos_token_id in base and stop_token_ids(tok, str(tmp_path)) == base  # no config files: nothing added
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 900}))
    assert stop_token_ids(tok, str(tmp_path)) == sorted({*base, 900})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [901, 902]}))
    assert stop_token_ids(tok, str(tmp_path)) == sorted({*base, 901, 902})  # generation_config wins, as in vLLM


def test_stop_ids_are_im_end_and_endoftext_whichever_the_tokenizer_names_eos():
    """A base model's tokenizer names <|endoftext|> its EOS, while its chat-templated responses end at <|im_end|>:
    both stop a response. A name the vocabulary lacks is no stop id, even where the tokenizer maps it to its unknown
    token."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from golong.build import stop_token_ids
    from golong.data.tokenizer import build_demo_tokenizer

    chat = build_demo_tokenizer(vocab_size=1024)
    ids = {name: chat.convert_tokens_to_ids(name) for name in ("<|im_end|>", "<|endoftext|>")}
    assert stop_token_ids(chat) == sorted(ids.values())
    base = PreTrainedTokenizerFast(tokenizer_object=chat.backend_tokenizer, eos_token="<|endoftext|>")
    assert base.eos_token_id == ids["<|endoftext|>"] and stop_token_ids(base) == sorted(ids.values())
    # a vocabulary without <|endoftext|> but with an unknown token: that name converts to the unknown id
    vocab = {"<unk>": 0, "<|im_end|>": 1, "a": 2}
    small = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                    unk_token="<unk>", eos_token="<|im_end|>")
    assert small.convert_tokens_to_ids("<|endoftext|>") == 0
    assert stop_token_ids(small) == [1]


def test_stop_ids_from_a_generation_config_without_eos_are_none_of_config_jsons(tmp_path):
    """vLLM reads the checkpoint's EOS ids from generation_config.json where there is one (config.json only where
    there is none): one without eos_token_id adds nothing, and config.json's must not be added either, or the torch
    engine stops where vLLM samples on. The ids are sorted whatever their set's order."""
    import json

    from golong.build import stop_token_ids
    from golong.data.tokenizer import build_demo_tokenizer

    tok = build_demo_tokenizer(vocab_size=1024)
    base = stop_token_ids(tok)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 900}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95}))
    assert stop_token_ids(tok, str(tmp_path)) == base
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [32, 16, 8]}))  # a set of these
    assert stop_token_ids(tok, str(tmp_path)) == sorted({*base, 8, 16, 32})  # iterates unsorted


def test_a_sequence_longer_than_the_models_positions_is_refused_for_either_engine(config_file, tmp_path, monkeypatch):
    """vLLM refuses a max_model_len (data.max_prompt_tokens + rollout.max_response_tokens) over the model's
    max_position_embeddings at start-up; the torch engine ran past the positions the model has. Both now stop
    with one line, before any process group or data."""
    import torch.distributed as dist

    from golong.config import ConfigError, load_config
    from golong.trainer import Trainer

    for engine in ("torch", "vllm"):
        cfg = load_config(config_file, [f"logging.run_dir={tmp_path}", f"rollout.engine={engine}",
                                        "model.scratch.max_position_embeddings=263"])  # 256 + 8 = 264
        with pytest.raises(ConfigError, match="= 264 is over the model's max_position_embeddings 263"):
            Trainer(cfg)
    Trainer(load_config(config_file, [f"logging.run_dir={tmp_path}", "model.scratch.max_position_embeddings=264"]))
    dist.destroy_process_group()  # the bound itself is accepted
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # vLLM's own switch lets both engines go past it
    Trainer(load_config(config_file, [f"logging.run_dir={tmp_path}", "model.scratch.max_position_embeddings=263"]))
    dist.destroy_process_group()


def test_parallel_timeout_s_sets_the_collectives_time_limit(config_file, tmp_path):
    """Ranks that finish their rollouts first wait for the slowest at the gather: parallel.timeout_s is how long,
    on the default process group (the one the gather uses)."""
    import torch.distributed as dist

    from golong.config import load_config
    from golong.trainer import Trainer

    Trainer(load_config(config_file, [f"logging.run_dir={tmp_path}", "parallel.timeout_s=4321"]))
    try:
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        assert backend.options._timeout.total_seconds() == 4321
    finally:
        dist.destroy_process_group()


def test_rollouts_share_their_prompts_ids_and_hold_arrays(config_file, tmp_path):
    """A step's rollouts reference their prompt's int32 array instead of copying it as a list per response: at the
    recipe's scale (512 prompts of up to 160K tokens x 16 responses a generation batch, gathered on every rank)
    the copies took tens of GB per rank."""
    import numpy as np
    import torch.distributed as dist

    from golong.config import load_config
    from golong.trainer import Trainer

    trainer = Trainer(load_config(config_file, [f"logging.run_dir={tmp_path}", "algo.dynamic_sampling=false"]))
    try:
        rollouts, _ = trainer.collect_rollouts(1)
        assert rollouts
        for r in rollouts:
            assert isinstance(r.prompt_ids, np.ndarray) and r.prompt_ids.dtype == np.int32
            assert r.response_ids.dtype == np.int32 and r.rollout_logprobs.dtype == np.float32
            assert len(r.rollout_logprobs) == len(r.response_ids) > 0
        assert all(p.record.prompt == [] for p in trainer.train_prompts)  # their text went with tokenizing
        prompts = {id(p.input_ids) for p in trainer.train_prompts}
        assert all(id(r.prompt_ids) in prompts for r in rollouts)  # the prompt table's own arrays, no copies
        assert len({id(r.prompt_ids) for r in rollouts}) == len({r.group for r in rollouts})
        # what the ranks gather is arrays too (lists of Python numbers: ~1.6x the pickled bytes, ~25x the unpickling)
        results, _ = trainer._generate_and_score(trainer.train_prompts[:2], 2, trainer._sampling(), (0,), "t")
        assert len(results) == 4 and all(g.tokens.dtype == np.int32 and g.logprobs.dtype == np.float32
                                        for g in results)
        responses: list = []
        trainer.validate(0, responses)  # decodes the gathered arrays
        assert responses and all(isinstance(r["response"], str) for r in responses)
    finally:
        dist.destroy_process_group()


def test_a_second_start_reads_its_prompts_from_the_prompt_cache(config_file, tmp_path, monkeypatch):
    """The first start tokenizes and writes <run_dir>/prompt_cache; the next one (a resume, a rerun) maps it and
    tokenizes nothing, and removes what a killed writer left; data.prompt_cache=none tokenizes again."""
    import os
    import time

    import torch.distributed as dist

    import golong.data.prompts as prompts_module
    from golong.config import load_config
    from golong.trainer import Trainer

    cfg = load_config(config_file, [f"logging.run_dir={tmp_path}"])
    first = Trainer(cfg)
    dist.destroy_process_group()
    assert load_config(tmp_path / "config.yaml") == cfg  # the run directory says what produced it
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "prompt_cache").iterdir()) == ["train", "val"]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized although the prompt cache holds these prompts")

    monkeypatch.setattr(prompts_module, "build_prompts", no_tokenizing)
    train_cache = next((tmp_path / "prompt_cache").glob("train-*"))
    killed = train_cache.with_name(f"{train_cache.name}.tmp-killed")  # a writer killed a day ago
    killed.mkdir()
    (killed / "ids.npy").write_bytes(b"partial")
    for p in (killed / "ids.npy", killed):
        os.utime(p, (time.time() - 86400,) * 2)
    second = Trainer(cfg)
    dist.destroy_process_group()
    assert not killed.exists()
    for a, b in ((first.train_prompts, second.train_prompts), (first.val_prompts, second.val_prompts)):
        assert [(p.input_ids.tolist(), p.index) for p in a] == [(p.input_ids.tolist(), p.index) for p in b]
    with pytest.raises(AssertionError, match="tokenized although"):
        Trainer(load_config(config_file, [f"logging.run_dir={tmp_path}", "data.prompt_cache=none"]))
    dist.destroy_process_group()


def test_data_check_fills_the_prompt_cache_training_reads(config_file, tmp_path, monkeypatch):
    """`golong data check CONFIG` before a run tokenizes once for both: the run (and a second check) map its
    cache instead of tokenizing again (GoLongRL's 1.4B prompt tokens: tens of minutes)."""
    import torch.distributed as dist

    import golong.data.prompts as prompts_module
    from golong.config import load_config
    from golong.data.check import check_data
    from golong.trainer import Trainer

    cfg = load_config(config_file, [f"logging.run_dir={tmp_path}"])
    rows = check_data(cfg)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "prompt_cache").iterdir()) == ["train", "val"]

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized although the prompt cache holds these prompts")

    monkeypatch.setattr(prompts_module, "build_prompts", no_tokenizing)
    assert check_data(cfg) == rows
    trainer = Trainer(cfg)
    dist.destroy_process_group()
    assert sum(r["kept"] for r in rows if r["split"] == "train") == len(trainer.train_prompts)


def test_eval_uses_the_training_runs_prompt_cache(config_file, tmp_path):
    """`golong eval` writes to RUN_DIR/eval/<checkpoint>, but its prompts go through RUN_DIR/prompt_cache, which
    training filled: not a fresh cache in every eval directory, tokenized again for each checkpoint."""
    from golong.config import load_config
    from golong.evaluate import evaluate

    cfg = load_config(config_file, [f"logging.run_dir={tmp_path}", "rollout.val_n=1"])
    evaluate(cfg, out_dir=tmp_path / "eval" / "a")
    assert not (tmp_path / "eval" / "a" / "prompt_cache").exists()
    assert [p.name.split("-")[0] for p in (tmp_path / "prompt_cache").iterdir()] == ["val"]


def _texts_worker(rank: int, world: int) -> None:
    """_generate_and_score on `world` gloo ranks with an engine that answers each request with its own words: rank 0
    receives every response's text, in (prompt, sample) order, as the rank that scored it decoded it; every rank
    learns how many responses of all ranks failed the format gate (a third of them think here). With a reward
    function: every rank gets each response's numbers and whether its call failed, rank 0 its dump fields too, each
    at its request's position."""
    import tempfile
    import types

    from golong.config import RunConfig
    from golong.data import build_prompts
    from golong.data.synthetic import generate
    from golong.data.tokenizer import build_demo_tokenizer
    from golong.rollout import GenerationResult, SamplingParams
    from golong.trainer import Trainer, request_seed

    tok = build_demo_tokenizer()
    prompts = build_prompts(generate(5, 8, seed=3), tok, 256)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]

    def text(s: int) -> str:
        return ("<think>\nhm\n</think>\n\n" if s % 3 == 0 else "") + f"{words[s % 8]} {words[s // 8 % 8]}"

    def fake_generate(lists, params, seeds, progress=None, routing=False):
        ids = [tok.encode(text(s)) + [tok.eos_token_id] for s in seeds]
        return GenerationResult(ids, [None] * len(ids), ["stop"] * len(ids))

    stub = types.SimpleNamespace(cfg=RunConfig(), rank=rank, world=world, tokenizer=tok, stop_ids={tok.eos_token_id},
                                 engine=types.SimpleNamespace(generate=fake_generate), reward_texts={},
                                 warned_scoring=False)
    for name in ("_decode_responses", "_strip_stop", "_check_scoring_failures"):
        setattr(stub, name, types.MethodType(getattr(Trainer, name), stub))
    # the seed of request j is request_seed(key, j): answers differ between requests and are known to every rank
    seeds = [request_seed(1, j) for j in range(len(prompts) * 3)]
    expect = [text(s) for s in seeds]
    assert len(set(expect)) > 8  # a permutation of the texts would show
    no_think = sum(s % 3 != 0 for s in seeds)
    assert 0 < no_think < len(seeds)
    results, timings = Trainer._generate_and_score(stub, prompts, 3, SamplingParams(max_tokens=8), (1,), "t",
                                                     texts=True)
    assert [tok.decode(r.tokens.tolist()[:-1], skip_special_tokens=True) for r in results] == expect
    assert timings["response/format_errors"] == no_think
    assert timings["reward/scoring_failures"] == 0  # golong's metrics, none out of time
    if rank == 0:
        assert [r.text for r in results] == expect and timings["time/dump_s"] >= 0
    else:
        assert all(r.text is None for r in results)
    results, timings = Trainer._generate_and_score(stub, prompts, 3, SamplingParams(max_tokens=8), (1,), "t")
    assert all(r.text is None for r in results) and "time/dump_s" not in timings
    stub.cfg.rollout.require_think = False  # no gate, no count
    _, timings = Trainer._generate_and_score(stub, prompts, 3, SamplingParams(max_tokens=8), (1,), "t")
    assert "response/format_errors" not in timings

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/reward.py"
        with open(path, "w") as f:
            f.write("def compute_score(data_source, solution_str, ground_truth, extra_info):\n"
                    "    if 'zeta' in solution_str:\n"
                    "        raise ValueError('zeta in %d characters' % len(solution_str))\n"
                    "    return {'score': 1.0, 'chars': len(solution_str), 'head': solution_str[:5]}\n")
        stub.cfg.rollout.reward_function, stub.cfg.rollout.reward_workers = path, 1
        stub.warned_function = False
        stub._check_function_errors = types.MethodType(Trainer._check_function_errors, stub)
        results, timings = Trainer._generate_and_score(stub, prompts, 3, SamplingParams(max_tokens=8), (1,), "t",
                                                         texts=True)
    zeta = ["zeta" in t for t in expect]
    assert 0 < sum(zeta) < len(zeta) and timings["reward/function_errors"] == sum(zeta)
    assert "reward/scoring_failures" not in timings  # the function's failures are reward/function_errors
    assert [r.reward_failed for r in results] == zeta
    assert [r.reward_numbers for r in results] == [None if z else {"chars": float(len(t))} for t, z in
                                                   zip(expect, zeta)]
    # the keys under which results held text, with one value, the same on every rank (algo.filter_metric's error)
    from golong.parallel import all_gather_objects

    heads = {t[:5] for t, z in zip(expect, zeta) if not z}
    assert list(stub.reward_texts) == ["head"] and stub.reward_texts["head"] in heads
    assert all(held == stub.reward_texts for held in all_gather_objects(stub.reward_texts))
    if rank == 0:
        assert [r.reward_info for r in results] == [
            {"reward_error": f"ValueError: zeta in {len(t)} characters"} if z else
            {"reward_extras": {"chars": float(len(t)), "head": t[:5]}} for t, z in zip(expect, zeta)]
    else:
        assert all(r.reward_info is None for r in results)


def test_response_texts_are_gathered_to_rank_0_in_request_order():
    """The rollout dump's texts are the ones the ranks decoded to score their shares (rank 0 no longer decodes the
    whole batch again): on 3 ranks, each response's text reaches rank 0 at its request's position."""
    from tests.distributed import run_distributed

    run_distributed(_texts_worker, 3)


REWARD_FUNCTION = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, bonus=0.0):
    if data_source == "boom" or extra_info.get("always_raise"):
        raise ValueError("cannot score " + data_source)
    return {"score": ground_truth["w"] * (extra_info["ability"] == "counting") + bonus, "w10": 10 * ground_truth["w"]}
'''


def _custom_run(tmp_path: Path, config_file: Path, always_raise: bool = False):
    """A config whose data golong cannot route (data_source "count" / "boom", ground truth {"w": ...}), scored by
    REWARD_FUNCTION; the even records are "boom", ability "exploding" (any 4 of the 6 prompts hold one)."""
    import json

    from golong.config import load_config

    (tmp_path / "reward.py").write_text(REWARD_FUNCTION)
    weights = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    rows = [{"data_source": "boom" if i % 2 == 0 else "count", "prompt": f"count the words {'w ' * i}",
             "ability": "exploding" if i % 2 == 0 else "counting", "reward_model": {"ground_truth": {"w": w}},
             "extra_info": {"index": i, **({"always_raise": True} if always_raise else {})}}
            for i, w in enumerate(weights)]
    data = tmp_path / "count.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_config(config_file, [f"logging.run_dir={tmp_path / 'run'}", f"data.train_files=[{data}]",
                                     f"data.val_files=[{data}]", "trainer.sft_steps=0", "trainer.val_every=0",
                                     "profile.steps=[]", "algo.dynamic_sampling=false", "rollout.n=2",
                                     "rollout.max_response_tokens=4", f"rollout.reward_function={tmp_path}/reward.py",
                                     "rollout.reward_timeout_s=30", "rollout.reward_kwargs.bonus=0.5",
                                     "logging.dump_rollouts=true"]), weights


SAMPLED_REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    return {"score": 1.0 if len(solution_str) % 2 else 0.25 * (len(solution_str) % 4), "rec": extra_info["index"]}
'''


def test_eval_reports_pass_at_k_and_best_of_n_over_each_prompts_samples(config_file, tmp_path, monkeypatch, capsys):
    """With rollout.val_n = 4, eval.json holds pass@1, 2, 4 (a response passes at score >= 1), best@4, worst@4 and
    std@4, overall and per task, each the mean over prompts of the share of k-subsets of the prompt's responses
    holding a pass / of its highest score / lowest / population std, and reward_stderr (the sample std of the
    prompts' mean scores over sqrt(prompts)): recomputed here from responses.jsonl; the table shows reward ± stderr,
    pass@1, pass@4 and best@4."""
    import itertools
    import json

    from golong.evaluate import evaluate

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg, _ = _custom_run(tmp_path, config_file)
    (tmp_path / "sampled.py").write_text(SAMPLED_REWARD)  # a score that varies with the sampled text
    cfg.rollout.reward_function = str(tmp_path / "sampled.py")
    cfg.rollout.val_n = 4
    # record keys some records hold a short value under, others none, None or a longer text
    data = tmp_path / "count.jsonl"
    records = [json.loads(line) for line in data.open()]
    for i, extra in enumerate([{"level": "hard"}, {"level": 2}, {"level": None}, {}, {"note": "x" * 65},
                               {"note": "ok"}]):
        records[i]["extra_info"].update(extra)
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = evaluate(cfg, None, tmp_path / "eval", by=["prompt_tokens", "index", "level"])
    rows = [json.loads(line) for line in (tmp_path / "eval" / "responses.jsonl").open()]
    # each response was scored against the record its row names (the function's own view of it): the rows group
    # by prompt as the responses were asked for
    assert all(row["reward_extras"] == {"rec": row["record"]} for row in rows)
    # each row names its prompt's group under the record keys of --by (prompt_tokens: from its token count) and
    # under the keys any record holds a short value under (a record without one, or None: "(none)", as --by labels
    # it; a longer text: not labelled), which golong eval-compare --by reads back
    want = [{"level": "hard", "note": "(none)"}, {"level": "2", "note": "(none)"},
            {"level": "(none)", "note": "(none)"}, {"level": "(none)", "note": "(none)"}, {"level": "(none)"},
            {"level": "(none)", "note": "ok"}]
    assert all(row["groups"] == {"index": str(row["prompt"]), **want[row["prompt"]]} for row in rows)
    # by_mean: each key's unweighted mean over its groups (here one group a prompt, one bin)
    by_prompt = [sum(r["score"] for r in rows if r["prompt"] == p) / 4 for p in range(6)]
    assert result["by_mean"]["index"] == pytest.approx(sum(by_prompt) / 6)
    assert result["by_mean"]["prompt_tokens"] == pytest.approx(result["by"]["prompt_tokens"]["<4K"]["reward_mean"])
    # ... unweighted by the groups' sizes (level: groups of 1, 1 and 4 prompts), as the card's LBV1-QA column
    level = result["by"]["level"]
    assert [g["prompts"] for g in level.values()] == [1, 1, 4]
    unweighted = sum(g["reward_mean"] for g in level.values()) / 3
    weighted = sum(g["reward_mean"] * g["prompts"] for g in level.values()) / 6
    assert result["by_mean"]["level"] == pytest.approx(unweighted) and unweighted != pytest.approx(weighted)
    assert result["reward_kwargs"] == {"bonus": 0.5}  # eval-compare warns where two evals differ in them
    from golong.eval_compare import compare, read_scores

    same = compare(read_scores(tmp_path / "eval"), read_scores(tmp_path / "eval"),
                   by=["index", "prompt_tokens", "level"])
    assert [(label, g["prompts"]) for label, g in same["by"]["level"].items()] == [("2", 1), ("hard", 1), ("(none)", 4)]
    assert list(same["by"]["index"]) == [str(i) for i in range(6)] and list(same["by"]["prompt_tokens"]) == ["<4K"]
    assert same["by"]["prompt_tokens"]["<4K"]["prompts"] == 6 and same["by"]["prompt_tokens"]["<4K"]["equal"] == 6
    groups: dict[str, dict[int, list[float]]] = {}
    for row in sorted(rows, key=lambda r: (r["prompt"], r["sample"])):
        groups.setdefault(row["task"], {}).setdefault(row["prompt"], []).append(row["score"])

    def brute(gs: list[list[float]]) -> dict:
        share = {k: sum(sum(any(s >= 1.0 for s in sub) for sub in itertools.combinations(g, k)) /
                        math.comb(4, k) for g in gs) / len(gs) for k in (1, 2, 4)}
        means = [sum(g) / 4 for g in gs]
        spread = math.sqrt(sum((m - sum(means) / len(gs)) ** 2 for m in means) / (len(gs) - 1)) if len(gs) > 1 else 0
        return {"pass_at_k": {str(k): pytest.approx(v, rel=1e-12) for k, v in share.items()},
                "best_of_n": pytest.approx(sum(max(g) for g in gs) / len(gs), rel=1e-12),
                "worst_of_n": pytest.approx(sum(min(g) for g in gs) / len(gs), rel=1e-12),
                "std_of_n": pytest.approx(sum(math.sqrt(sum((s - sum(g) / 4) ** 2 for s in g) / 4) for g in gs) /
                                          len(gs), rel=1e-12),
                # the standard error of the mean reward over prompts: none for one prompt
                "reward_stderr": pytest.approx(spread / math.sqrt(len(gs)), rel=1e-12) if len(gs) > 1 else None}

    everything = [g for per_task in groups.values() for g in per_task.values()]
    assert len(everything) == 6 and all(len(g) == 4 for g in everything)
    fields = ("pass_at_k", "best_of_n", "worst_of_n", "std_of_n", "reward_stderr")
    assert {k: result[k] for k in fields} == brute(everything)
    for task, per_task in groups.items():
        assert {k: result["tasks"][task][k] for k in fields} == brute(list(per_task.values()))
    # the texts vary: some prompts' responses pass only sometimes, so the k differ
    assert 0 < result["pass_at_k"]["1"] < result["pass_at_k"]["2"] < result["pass_at_k"]["4"] <= 1
    assert result["worst_of_n"] < result["reward_mean"] < result["best_of_n"] and result["std_of_n"] > 0
    # --by: every prompt's prompt is short (one bin: the whole set); by extra_info.index, one prompt a group, in
    # numeric order
    assert list(result["by"]) == ["prompt_tokens", "index", "level"]
    assert result["by"]["prompt_tokens"] == {"<4K": {"prompts": 6, "responses": 24,
                                                     "reward_mean": pytest.approx(result["reward_mean"], rel=1e-12),
                                                     **brute(everything)}}
    per_prompt = {p: g for per_task in groups.values() for p, g in per_task.items()}
    assert list(result["by"]["index"]) == [str(i) for i in range(6)]
    for i, row in result["by"]["index"].items():
        g = per_prompt[int(i)]  # the config's records are its prompts, in order
        assert row == {"prompts": 1, "responses": 4, "reward_mean": pytest.approx(sum(g) / 4, rel=1e-12),
                       **brute([g])}
    table = capsys.readouterr().out
    assert all(col in table for col in ("pass@1", "pass@4", "best@4")) and "pass@2" not in table
    assert f"{result['reward_mean']:.3f} ± {result['reward_stderr']:.3f}" in table
    assert "pass@k for k = 1, 2, 4: pass_at_k in eval.json" in table
    assert "by prompt_tokens" in table and "by index" in table
    # every record became a prompt: nothing dropped or cut; each row names its prompt's length
    assert (result["records"], result["dropped"], result["truncated"], result["tasks_dropped"]) == (6, 0, 0, {})
    assert all((v["records"], v["dropped"], v["truncated"]) == (3, 0, 0) for v in result["tasks"].values())
    assert all(row["truncated"] is False and row["prompt_tokens"] > 0 for row in rows)
    # each prompt's token hash, the same on its 4 rows, is what golong eval-compare matches two evals' prompts by
    sha = {(row["prompt"], row["prompt_sha1"]) for row in rows}
    assert len(sha) == 6 and len({s for _, s in sha}) == 6
    from golong.eval_compare import compare, read_scores

    same = compare(read_scores(tmp_path / "eval"), read_scores(tmp_path / "eval"))
    assert (same["prompts"], same["equal"], same["diff"], same["warnings"]) == (6, 6, 0.0, [])
    # the records data.max_prompt_tokens leaves out or cuts: counted overall and per task (2 responses a prompt),
    # flagged in responses.jsonl, named in the footer
    lengths = {row["prompt"]: row["prompt_tokens"] for row in rows}
    task_of = {row["prompt"]: row["task"] for row in rows}
    limit = sorted(lengths.values())[3]  # 2 or 3 prompts over it, at least one of each task
    over = Counter(task_of[p] for p, t in lengths.items() if t > limit)
    cfg.rollout.val_n = 2
    for overflow, key in (("drop", "dropped"), ("truncate_left", "truncated")):
        cfg.data.max_prompt_tokens, cfg.data.overflow = limit, overflow
        cut = evaluate(cfg, None, tmp_path / f"eval-{overflow}", by=["index"])
        assert (cut["records"], cut[key], cut["overflow"]) == (6, sum(over.values()), overflow)
        assert {t: v[key] for t, v in cut["tasks"].items()} == {t: over[t] for t in cut["tasks"]}
        assert all(v["records"] == 3 and v["responses"] == 2 * (3 - v["dropped"]) for v in cut["tasks"].values())
        assert cut["prompts"] == 6 - (key == "dropped") * sum(over.values()) and cut["tasks_dropped"] == {}
        footer = f"from 6 records: {sum(over.values())} {key} at data.max_prompt_tokens={limit}"
        assert footer in capsys.readouterr().out
    cut_rows = [json.loads(line) for line in (tmp_path / "eval-truncate_left" / "responses.jsonl").open()]
    assert {r["prompt"] for r in cut_rows if r["truncated"]} == {p for p, t in lengths.items() if t > limit}
    assert all(r["prompt_tokens"] <= limit for r in cut_rows)
    # a task none of whose records fit: no row in tasks, its record count in tasks_dropped and the footer
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"data_source": "boom" if i < 2 else "count", "ability": "long" if i < 2 else
                                        "short", "prompt": "w " * (400 if i < 2 else 2),
                                        "reward_model": {"ground_truth": {"w": 0.5}}, "extra_info": {"index": i}})
                            + "\n" for i in range(4)))
    cfg.data.val_files, cfg.data.max_prompt_tokens, cfg.data.overflow = [str(long)], 100, "drop"
    cut = evaluate(cfg, None, tmp_path / "eval-long")
    assert (cut["records"], cut["dropped"], cut["tasks_dropped"], list(cut["tasks"])) == (4, 2, {"long": 2}, ["short"])
    assert "no prompt left of task(s) long (2 records)" in capsys.readouterr().out
    # a key no record holds: refused once the records are read, before the model is built (nothing written)
    from golong.config import ConfigError

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr("golong.trainer.build_model", no_model)
    with pytest.raises(ConfigError, match=r"--by lenght: no validation record has extra_info key 'lenght' \(2 "
                                         r"records dropped at data.max_prompt_tokens are not read\); keys they have: "
                                         r"index; or --by prompt_tokens"):
        evaluate(cfg, None, tmp_path / "eval2", by=["lenght"])
    assert not (tmp_path / "eval2").exists()


def test_a_saved_eval_batch_cut_before_its_newline_is_kept_and_the_next_appends_after_it(tmp_path):
    """A write stopped just before a batch's newline leaves a whole line: kept, and ended before the next batch is
    appended (glued to it, both were cut off by the resume after, with every batch past them)."""
    from golong.eval_saved import append_batch, read_batches

    path, row = tmp_path / "eval.partial.jsonl", [0.5, "stop", False, None, None, "an answer"]
    assert read_batches(path, "fp", 4, 1) == []
    append_batch(path, 0, 1, [row], {})
    append_batch(path, 1, 2, [row], {})
    path.write_bytes(path.read_bytes()[:-1])
    assert [(b["first"], b["end"]) for b in read_batches(path, "fp", 4, 1)] == [(0, 1), (1, 2)]
    append_batch(path, 2, 3, [row], {})
    assert [(b["first"], b["end"]) for b in read_batches(path, "fp", 4, 1)] == [(0, 1), (1, 2), (2, 3)]
    assert path.read_bytes().count(b"\n") == 4  # the header and three batches, a line each


def test_eval_saves_each_batch_and_resumes_after_a_stop(config_file, tmp_path, monkeypatch, capsys):
    """golong eval generates its prompts in batches, each sampled as in the whole set (the same responses and scores
    as one pass), and appends each to OUT/eval.partial.jsonl; a rerun after a stop generates only the prompts the
    file lacks, whatever its own batching (a torn last line cut off; a second stop after that loses nothing), and
    ends with the uninterrupted eval's responses.jsonl and eval.json, the file removed; a file of another eval
    (other sampling, other ground truth) is set aside as .stale and the eval starts over; a batch in which every call
    of the reward function failed does not stop the eval, a set in which every call failed does."""
    import json

    from golong.evaluate import evaluate
    from golong.rewards.function import RewardFunctionError
    from golong.trainer import Trainer

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg, _ = _custom_run(tmp_path, config_file)
    (tmp_path / "sampled.py").write_text(SAMPLED_REWARD)  # scores vary with the text; extras name the record
    cfg.rollout.reward_function = str(tmp_path / "sampled.py")
    cfg.rollout.val_n = 2
    whole = evaluate(cfg, None, tmp_path / "whole", save_every=0)
    whole_rows = (tmp_path / "whole" / "responses.jsonl").read_text()
    assert not (tmp_path / "whole" / "eval.partial.jsonl").exists()
    real = Trainer._generate_and_score
    calls: list[int] = []

    def generate(stop_at: int):
        def wrapped(self, prompts, *args, **kwargs):
            calls.append(len(prompts))
            if len(calls) == stop_at:
                raise KeyboardInterrupt
            return real(self, prompts, *args, **kwargs)
        return wrapped

    def run(stop_at: int, save_every: int | None, where=tmp_path / "eval"):
        calls.clear()
        monkeypatch.setattr(Trainer, "_generate_and_score", generate(stop_at))
        capsys.readouterr()
        if stop_at:
            with pytest.raises(KeyboardInterrupt):
                evaluate(cfg, None, where, save_every=save_every)
            return None
        return evaluate(cfg, None, where, save_every=save_every)

    out = tmp_path / "eval"
    partial = out / "eval.partial.jsonl"
    run(3, 1)  # stopped while generating prompt 3 (of 6), one a batch
    lines = partial.read_text().splitlines()
    assert [(json.loads(x)["first"], json.loads(x)["end"]) for x in lines[1:]] == [(0, 1), (1, 2)]
    good = partial.read_text()
    # a row it could not restore (here a score as text) ends the saved run there, as a torn line does
    broken = good.splitlines()
    broken[2] = broken[2].replace('"results": [[', '"results": [["0.5", ', 1)
    partial.write_text("\n".join(broken) + "\n")
    run(0, 1, tmp_path / "eval")
    assert calls == [1] * 5 and "eval: 1 of 6 prompts' responses read from" in capsys.readouterr().out
    run(3, 1)  # the same stop as before, then a stop while writing
    assert [json.loads(x)["results"] for x in partial.read_text().splitlines()[1:]] == \
           [json.loads(x)["results"] for x in good.splitlines()[1:]]
    partial.write_text(partial.read_text() + '{"first": 2, "end": 3, "timings": {}, "resu')
    run(2, 3)  # resumed in batches of 3: prompt 2 alone (up to the plan's next start, 3), then stopped again
    assert calls == [1, 3]
    assert [json.loads(x)["end"] for x in partial.read_text().splitlines()[1:]] == [1, 2, 3]  # the torn line cut
    resumed = run(0, 3)
    assert calls == [3]  # prompts 3-5 alone
    assert "eval: 3 of 6 prompts' responses read from" in capsys.readouterr().out
    assert resumed == whole and (out / "responses.jsonl").read_text() == whole_rows
    assert not partial.exists()
    # another eval's file (other sampling; then other ground truth, the same prompts) is set aside
    run(2, 2)
    temperature, cfg.rollout.val_temperature = cfg.rollout.val_temperature, 0.9
    run(0, 2)
    assert calls == [2, 2, 2] and "holds another eval's responses" in capsys.readouterr().out
    assert not partial.exists() and len(list(out.glob("eval.partial.jsonl.stale-*"))) == 1
    run(2, 2)  # that eval again, stopped: its file now sets the first one's aside too
    # each eval set aside is taken back by a rerun with its settings, the other's set aside in turn (a second mix-up
    # replaced the first one's file, and a rerun never looked for its own)
    cfg.rollout.val_temperature = temperature
    (first,) = [a for a in out.glob("eval.partial.jsonl.stale-*") if '"end": 2' in a.read_text()]
    run(0, 2)
    assert calls == [2, 2] and f"eval: {first} holds this eval's saved responses: resumed from it" in \
        capsys.readouterr().out
    run(2, 2)
    rows = [json.loads(line) for line in (tmp_path / "count.jsonl").read_text().splitlines()]
    for row in rows:
        row["reward_model"]["ground_truth"]["w"] *= 10
    (tmp_path / "count.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(0, 2)
    assert calls == [2, 2, 2] and "holds another eval's responses" in capsys.readouterr().out
    # the reward function's code, not only its path: an edit between the stop and the rerun would mix two scorers
    run(2, 2)
    (tmp_path / "sampled.py").write_text(SAMPLED_REWARD + "\n# edited\n")
    run(0, 2)
    assert calls == [2, 2, 2] and "holds another eval's responses" in capsys.readouterr().out
    # a reward function failing on every response of a batch: scored 0 there; on every response: stopped
    (tmp_path / "odd.py").write_text("def compute_score(data_source, solution_str, ground_truth, extra_info, **kw):\n"
                                     "    if extra_info['index'] < 2:\n        raise ValueError('early')\n"
                                     "    return 1.0\n")
    cfg.rollout.reward_function = str(tmp_path / "odd.py")
    odd = run(0, 2, tmp_path / "odd")
    assert odd["function_errors"] == 4 and odd["reward_mean"] == pytest.approx(8 / 12)
    (tmp_path / "broken.py").write_text("def compute_score(data_source, solution_str, ground_truth, extra_info, "
                                        "**kw):\n    raise ValueError('broken')\n")
    cfg.rollout.reward_function = str(tmp_path / "broken.py")
    with pytest.raises(RewardFunctionError, match="validation: the reward function failed on all 12 responses"):
        run(0, 2, tmp_path / "broken")


def test_eval_batches_hold_a_context_budget_or_save_every_prompts():
    """batch_starts: --save-every N prompts a batch (0: one batch); by default a new batch where the next prompt's
    context (prompt + max response tokens, n responses) would take it past EVAL_BATCH_TOKENS a rank."""
    from golong.eval_saved import EVAL_BATCH_TOKENS, batch_starts

    assert batch_starts([5] * 7, 10, 2, 4, save_every=3) == [0, 3, 6]
    assert batch_starts([5] * 7, 10, 2, 4, save_every=0) == [0]
    assert batch_starts([5] * 7, 10, 2, 4) == [0]  # short prompts: one batch
    mrcr = 131_072  # 8 ranks, 51,200 response tokens: 46 prompts of 128K a batch
    per = EVAL_BATCH_TOKENS * 8 // (mrcr + 51_200)
    assert per == 46 * 8 and batch_starts([mrcr] * 1000, 51_200, 1, 8) == [0, per, 2 * per]
    assert batch_starts([EVAL_BATCH_TOKENS * 2, 1, 1], 0, 1, 1) == [0, 1]  # one over the budget: a batch alone
    half = EVAL_BATCH_TOKENS // 2 - 10  # two prompts of + 10 response tokens fill the budget exactly: not past it
    assert batch_starts([half, half, half], 10, 1, 1) == [0, 2]
    # a resumed eval plans from its first unsaved prompt on, whatever the batching
    assert batch_starts([5] * 7, 10, 2, 4, save_every=0, first=3) == [3]
    assert batch_starts([5] * 7, 10, 2, 4, save_every=3, first=2) == [2, 5]
    assert batch_starts([half] * 5, 10, 1, 1, first=3) == [3]


def test_eval_fingerprint_follows_the_model_paths_weights(tmp_path):
    """A saved eval of other weights is not resumed: rewriting model.path's files (a new export in the same
    directory) changes the fingerprint, as a checkpoint's do."""
    from golong.eval_saved import fingerprint

    (tmp_path / "model.safetensors").write_bytes(b"a" * 10)
    config = {"model": {"path": str(tmp_path)}}
    before = fingerprint([], config, None)
    assert fingerprint([], config, None) == before
    (tmp_path / "model.safetensors").write_bytes(b"b" * 11)
    assert fingerprint([], config, None) != before


def test_eval_saved_batches_are_kept_up_to_the_first_one_that_does_not_fit(tmp_path):
    """read_batches keeps the run of saved batches from prompt 0 on and cuts the file at the first batch that is not
    one this eval can restore: rows for another rollout.val_n, prompts past the set's end, a row of another form."""
    import json

    from golong.eval_saved import VERSION, append_batch, read_batches

    def row(failed=False):
        return [0.5, "stop", failed, None, None, "text"]

    path = tmp_path / "eval.partial.jsonl"
    bad_batches = [(1, 2, [row()]),  # 1 row for a prompt of n=2 responses
                   (1, 5, [row()] * 8),  # prompts 1-4 of a 4-prompt set
                   (1, 2, [row(), row("no")])]  # the failed flag is a bool
    for first, end, rows in bad_batches:
        path.unlink(missing_ok=True)
        assert read_batches(path, "fp", total_prompts=4, n=2) == []  # a new file: its header only
        append_batch(path, 0, 1, [row(), row(True)], {})
        append_batch(path, first, end, rows, {})
        good = path.read_text().splitlines()[:2]
        assert [(b["first"], b["end"]) for b in read_batches(path, "fp", total_prompts=4, n=2)] == [(0, 1)], rows
        assert path.read_text().splitlines() == good  # the rest cut off: new batches append after the good one
    # two files of this eval set aside (by reruns with other settings): the one holding more is taken back
    path.unlink()
    for name, batches in (("eval.partial.jsonl.stale-1", 1), ("eval.partial.jsonl.stale-2", 2)):
        aside = tmp_path / name
        aside.write_text(json.dumps({"golong_eval_partial": VERSION, "fingerprint": "fp"}) + "\n")
        for i in range(batches):
            append_batch(aside, i, i + 1, [row(), row()], {})
    assert len(read_batches(path, "fp", total_prompts=4, n=2)) == 2


def test_eval_breakdown_groups_prompts_by_key_or_token_bin():
    """`breakdown`: prompts grouped by their records' extra_info value (numbers in numeric order, then text, then
    records without the key) or by MRCR's token bins; each group's pass@k / best@n from its prompts' scores."""
    from types import SimpleNamespace

    from golong.eval_groups import breakdown, token_bin

    edges = [(1, "<4K"), (4095, "<4K"), (4096, "4K-8K"), (8191, "4K-8K"), (8192, "8K-16K"), (16383, "8K-16K"),
             (131071, "64K-128K"), (131072, "128K-256K"), ((1 << 20) - 1, "512K-1M"), (1 << 20, ">=1M"),
             (3 << 20, ">=1M")]
    assert [token_bin(t) for t, _ in edges] == [label for _, label in edges]
    values = [10, 2, "b", None, "2", "a", 10]
    tokens = [100, 5000, 9000, 4096, 16383, 100, 4095]
    prompts = [SimpleNamespace(input_ids=[0] * t, record=SimpleNamespace(extra_info={} if v is None else {"k": v}))
               for v, t in zip(values, tokens)]
    scores = [[1, 0], [0, 0], [1, 1], [0.5, 0], [1, 0.25], [0, 0.5], [0, 1]]
    rows = [{"prompt": p, "score": s} for p, ss in enumerate(scores) for s in ss]
    by_k = breakdown("k", prompts, rows, 2)
    assert list(by_k) == ["2", "10", "a", "b", "(none)"]  # 2 and "2": one group
    # prompts 1 and 4: scores [0, 0] and [1, 0.25]; their means 0 and 0.625: stderr std([0, 0.625]) / sqrt(2)
    assert by_k["2"] == {"prompts": 2, "responses": 4, "reward_mean": 1.25 / 4, "reward_stderr": 0.3125,
                         "pass_at_k": {"1": 0.25, "2": 0.5}, "best_of_n": 0.5, "worst_of_n": 0.125,
                         "std_of_n": 0.1875}
    assert by_k["10"] == {"prompts": 2, "responses": 4, "reward_mean": 0.5, "reward_stderr": 0.0,
                          "pass_at_k": {"1": 0.5, "2": 1.0}, "best_of_n": 1.0, "worst_of_n": 0.0, "std_of_n": 0.5}
    assert by_k["b"]["reward_stderr"] is None  # one prompt
    assert by_k["(none)"]["pass_at_k"] == {"1": 0.0, "2": 0.0} and by_k["(none)"]["best_of_n"] == 0.5
    # a bin holds its lower edge, not its upper one: 4096 and 16383 tokens are in the bins of 5000 and 9000
    by_t = breakdown("prompt_tokens", prompts, rows, 2)
    assert list(by_t) == ["<4K", "4K-8K", "8K-16K"]
    assert [v["prompts"] for v in by_t.values()] == [3, 2, 2]
    assert by_t["<4K"]["reward_mean"] == pytest.approx((1 + 0.5 + 1) / 6)
    assert by_t["8K-16K"]["reward_mean"] == pytest.approx((2 + 1.25) / 4)


def test_a_reward_function_of_the_users_own_scores_training_and_eval(config_file, tmp_path, monkeypatch, capsys):
    """Records no golong metric fits train and evaluate under rollout.reward_function: each response's score is
    the function's (the ground truth and extra_info as the file stores them, the ability added, rollout.reward_kwargs;
    the other numbers of its dict result logged as reward/extra/<key>), a call that
    raised scores 0, is counted in reward/function_errors (eval.json: function_errors) and warned once with its
    traceback; a function that raises on every response stops the step, its traceback in the error; one that
    cannot be imported stops the trainer at start-up. The rollout dump and eval's responses.jsonl hold each
    response's failure or extras; eval.json counts the failures per task."""
    import json

    from golong.evaluate import evaluate

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg, weights = _custom_run(tmp_path, config_file)
    m, rollouts = _scripted_train_step(cfg, monkeypatch, None)
    scored = [r for r in rollouts if r.prompt_index % 2]  # the bonus is rollout.reward_kwargs'
    assert len(rollouts) == 8 and all(r.score == (weights[r.prompt_index] + 0.5 if r.prompt_index % 2 else 0.0)
                                      for r in rollouts)
    assert m["reward/function_errors"] == 8 - len(scored) > 0
    assert m["reward/extra/w10"] == pytest.approx(sum(10 * weights[r.prompt_index] for r in scored) / len(scored))
    warned = [line for line in capsys.readouterr().out.splitlines() if "reward function failed" in line]
    assert len(warned) == 1 and f"rollout.reward_function={tmp_path}/reward.py" in warned[0]
    # the rollout dump: each response's failure (its last line) or the rest of its result
    dumped = [json.loads(line) for line in (tmp_path / "run" / "rollouts" / "step_000001.jsonl").open()]
    assert len(dumped) == 8
    for row in dumped:
        if row["data_source"] == "boom":
            assert row["reward_error"] == "ValueError: cannot score boom" and "reward_extras" not in row
        else:
            assert row["reward_extras"] == {"w10": pytest.approx(10 * weights[row["record"]])}
            assert "reward_error" not in row

    result = evaluate(cfg, None, tmp_path / "eval")
    assert result["reward_mean"] == pytest.approx((sum(weights[1::2]) + 3 * 0.5) / len(weights))
    assert result["function_errors"] == 3 and result["format_error_frac"] is None  # no format gate
    assert result["reward_extras"] == {"w10": pytest.approx(10 * sum(weights[1::2]) / 3)}
    assert result["tasks"] == {  # the failures counted per task
        "counting": {"metric": "compute_score() (golong: none)", "records": 3, "dropped": 0, "truncated": 0,
                     "responses": 3, "reward_mean": pytest.approx(sum(weights[1::2]) / 3 + 0.5), "function_errors": 0,
                     "pass_at_k": {"1": pytest.approx(1 / 3)}, "best_of_n": None,  # 0.7, 0.9, 1.1: one passes
                     "worst_of_n": None, "std_of_n": None,  # one response a prompt
                     "reward_stderr": pytest.approx(statistics.stdev(weights[1::2]) / math.sqrt(3))},
        "exploding": {"metric": "compute_score() (golong: none)", "records": 3, "dropped": 0, "truncated": 0,
                      "responses": 3, "reward_mean": 0.0, "function_errors": 3, "pass_at_k": {"1": 0.0},
                      "best_of_n": None, "worst_of_n": None, "std_of_n": None, "reward_stderr": 0.0}}
    answered = [json.loads(line) for line in (tmp_path / "eval" / "responses.jsonl").open()]
    assert sorted(row["record"] for row in answered if "reward_error" in row) == [0, 2, 4]
    assert all(row["reward_extras"] == {"w10": pytest.approx(10 * weights[row["record"]])}
               for row in answered if row["record"] % 2)
    assert "function errors" in capsys.readouterr().out  # the eval table's column

    (tmp_path / "all").mkdir()
    cfg, _ = _custom_run(tmp_path / "all", config_file, always_raise=True)
    with pytest.raises(RuntimeError, match=r"(?s)failed on all 8 responses.*ValueError: cannot score"):
        _scripted_train_step(cfg, monkeypatch, None)

    # a function that fails to import stops the trainer as it starts, before any rollout
    (tmp_path / "broken.py").write_text("import no_such_module_anywhere\n" + REWARD_FUNCTION)
    cfg.rollout.reward_function = str(tmp_path / "broken.py")
    generated = []
    with pytest.raises(RuntimeError, match=r"(?s)rank 0: the reward function .*broken.py failed to load.*"
                                           "no_such_module_anywhere"):
        _scripted_train_step(cfg, monkeypatch, lambda *a, **k: generated.append(a))
    assert generated == []

    # the pool failing mid-run (a respawned worker that cannot import the function) stops the step on every rank
    # at the gather, not on this one alone
    import golong.rewards.scoring as scoring

    def pool_fails(*args, **kwargs):
        raise RuntimeError("the reward function broken.py failed to load in a scoring worker")

    monkeypatch.setattr(scoring, "score_records", pool_fails)
    cfg.rollout.reward_function = str(tmp_path / "reward.py")
    with pytest.raises(RuntimeError, match=r"rollout step 1: scoring failed: rank 0: RuntimeError: the reward "
                                           "function broken.py failed to load"):
        _scripted_train_step(cfg, monkeypatch, None)


def test_an_sft_warm_up_needs_a_reference_answer_for_every_record(config_file, tmp_path, monkeypatch):
    """Records whose ground truth only the run's reward function reads ({"w": ...}) have no answer to warm up on:
    the warm-up refuses them, naming the first, instead of training on empty answers."""
    import torch.distributed as dist

    from golong.config import ConfigError
    from golong.trainer import Trainer

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg, _ = _custom_run(tmp_path, config_file)
    cfg.trainer.sft_steps = 2
    try:
        trainer = Trainer(cfg)
        with pytest.raises(ConfigError, match=r"trainer.sft_steps=2: 6 of 6 training records have no reference "
                                              r"answer .* the first: record 0, data_source 'boom'"):
            trainer.sft()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_router_replay_records_each_rollouts_experts_and_the_update_routes_through_them(config_file, tmp_path,
                                                                                      monkeypatch):
    """rollout.router_replay: every rollout's record (the experts the engine routed its tokens to) stays on the rank
    that generated it until the update, which gets it by golong.replay's exchange: the prompt's rows (one array per
    prompt) and the response's, as the policy's own forward of the sequence routes them. The old-logprob pass and the
    update replay them; a dense model is refused."""
    import numpy as np
    import torch.distributed as dist

    import kernels
    from golong.config import ConfigError, load_config
    from golong.trainer import Trainer

    over = [f"logging.run_dir={tmp_path}", "algo.dynamic_sampling=false", "rollout.router_replay=true",
            "trainer.sft_steps=0", "trainer.val_every=0", "profile.steps=[]"]
    trainer = Trainer(load_config(config_file, over))
    try:
        rollouts, _ = trainer.collect_rollouts(1)
        assert all(r.route_key is not None and r.prompt_experts is None for r in rollouts)
        assert len(trainer.routing_store.responses) == len(rollouts)
        received = trainer._exchange_routing(rollouts)
        assert not trainer.routing_store.responses and not trainer.routing_store.prompts
        model, layers = trainer.model, trainer.model.config.num_hidden_layers
        for r in rollouts:
            P, R = len(r.prompt_ids), len(r.response_ids)
            assert r.prompt_experts.shape == (P, layers, 2) and r.response_experts.shape == (R - 1, layers, 2)
            seq = torch.from_numpy(np.concatenate([r.prompt_ids, r.response_ids[:-1]]).astype(np.int64))
            with model.record_routing() as rec, torch.no_grad():
                model(seq, torch.tensor([0, len(seq)], dtype=torch.int32))
            both = np.concatenate([r.prompt_experts, r.response_experts])
            for i in range(layers):
                assert np.array_equal(both[:, i], rec[i][0].numpy()), i
        groups = {r.group for r in rollouts}
        assert received == sum({id(r.prompt_experts): r.prompt_experts.nbytes for r in rollouts}.values()) + sum(
            r.response_experts.nbytes for r in rollouts)
        assert len({id(r.prompt_experts) for r in rollouts}) == len(groups)  # one array per prompt
        # the update: the policy's forwards (an old-logprob pass: two mini-batches) replay what the micro-batch holds
        seen = []
        real = kernels.moe_route

        def spy(logits, top_k, norm=True, backend="auto", expert_ids=None):
            seen.append(expert_ids is not None)
            return real(logits, top_k, norm, backend, expert_ids=expert_ids)

        monkeypatch.setattr(kernels, "moe_route", spy)
        for r in rollouts:
            r.advantage = 1.0
            if len(r.response_experts):  # the first response row of layer 0 to the two experts the router did not pick
                r.response_experts[0, 0] = sorted({0, 1, 2, 3} - set(r.response_experts[0, 0].tolist()))
        out = trainer.actor.update(rollouts)
        assert "time/old_logprob_s" in out and math.isfinite(out["actor/loss"])
        assert seen and all(seen)
        assert 0.5 < out["routing/replay_agreement"] < 1  # those rows alone disagree
        # an engine record of the wrong length stops the step on every rank (through the results' gather)
        real_generate = trainer.engine.generate

        def short(*args, **kwargs):
            res = real_generate(*args, **kwargs)
            res.routed_experts = [rows[:-1] for rows in res.routed_experts]
            return res

        monkeypatch.setattr(trainer.engine, "generate", short)
        with pytest.raises(RuntimeError, match=r"rollout step 2: rank 0: RuntimeError: the rollout engine returned "
                                               r"routed experts of shape \(\d+, 2, 2\) for a \d+-token prompt"):
            trainer.collect_rollouts(2)
    finally:
        dist.destroy_process_group()
    dense = load_config(config_file, over + ["model.scratch.num_experts=0"])
    with pytest.raises(ConfigError, match="router_replay=true needs a MoE model"):
        Trainer(dense)


@pytest.mark.parametrize("cp", [1, 2])
def test_router_replay_on_two_ranks_trains_as_the_engines_own_routing_does(config_file, tmp_path, cp):
    """Two ranks (dp 2, or cp 2: both ranks of the cp group receive the records and each shards them), dynamic sampling
    on: each rank's records reach the ranks whose micro-batches hold them (the bytes are logged), and since the torch
    engine routes as the trainer does, replaying its routing trains exactly as without replay."""
    common = ("trainer.total_steps=2", "trainer.sft_steps=0", "trainer.val_every=0", "profile.steps=[]",
              "checkpoint.every=0", f"parallel.cp={cp}")
    runs = {}
    for replay in (True, False) if cp == 2 else (True,):  # one baseline run: the agreement of 1 says the rest
        run_dir = tmp_path / f"replay_{replay}"
        out = _train(config_file, run_dir, "", f"rollout.router_replay={str(replay).lower()}", *common, ranks=2)
        assert out.returncode == 0, out.stderr[-4000:]
        runs[replay] = _by_step(run_dir)
    assert sorted(runs[True]) == [1, 2]
    for row in runs[True].values():  # the torch engine's routes are all the trainer's router's own choice
        assert row["routing/received_mib"] > 0 and row["routing/replay_agreement"] == 1.0
    for step, row in runs.get(False, {}).items():
        assert "routing/received_mib" not in row and "routing/replay_agreement" not in row
        for key in ("actor/loss", "actor/grad_norm", "actor/entropy", "reward/mean"):
            assert runs[True][step][key] == pytest.approx(row[key], rel=1e-6, abs=1e-9), (step, key)
