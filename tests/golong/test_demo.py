"""`golong demo`, shrunk to a smoke run: 2 gloo ranks, a few SFT steps, one GRPO step. The full
demo (minutes) is `golong demo`; this checks that every artifact it promises is produced."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from golong.logger import read_metrics
from tests.golong.trainer_helpers import one_thread  # noqa: F401  (autouse fixture)


@pytest.mark.distributed
def test_demo_smoke_writes_every_artifact(tmp_path, capsys):
    from golong.data.tokenizer import build_demo_tokenizer
    from golong.demo import run_demo

    build_demo_tokenizer(1024).save_pretrained(str(tmp_path / "tok"))
    out = tmp_path / "demo"
    # an earlier demo's outputs are replaced, anything else in the directory is left alone
    (out / "hf").mkdir(parents=True)
    (out / "summary.json").write_text("{}")  # an earlier demo's (finished; a killed one leaves .golong-demo)
    (out / "hf" / "model-00009-of-00009.safetensors").write_text("stale")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 99, "val/reward/mean": 0.5}) + "\n")
    (out / "notes.txt").write_text("mine")
    summary = run_demo(out, overrides=[
        f"model.tokenizer={tmp_path / 'tok'}", "model.scratch.hidden_size=32", "model.scratch.num_experts=4",
        "model.scratch.moe_intermediate_size=32", "model.scratch.intermediate_size=64",
        "data.synthetic_n=64", "data.synthetic_val_n=9", "data.synthetic_context_tokens=4",
        "rollout.n=4", "rollout.max_response_tokens=12", "trainer.prompts_per_step=4",
        "trainer.mini_batch_prompts=4", "trainer.sft_steps=3", "trainer.sft_prompts_per_step=8",
        "trainer.total_steps=1", "trainer.val_every=1", "checkpoint.every=1"])

    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert 0.0 <= saved["reward_after_sft"] <= 1.0 and 0.0 <= saved["reward_after_rl"] <= 1.0
    assert len(saved["per_task"]) == 9  # every synthetic task is scored on held-out prompts
    assert {r["task"] for r in saved["per_task"]} >= {"precise_retrieval", "summarization", "graded_ranking"}
    assert saved["world_size"] == 2 and saved["rl_steps"] == 1
    assert saved["hf_export"]["transformers_max_abs_logit_diff"] < 1e-4

    rows = read_metrics(out / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert steps.count(-1) == 1 and steps.count(-3) == 1 and 0 in steps and 1 in steps  # SFT, SFT val, RL
    assert 99 not in steps and not (out / "hf" / "model-00009-of-00009.safetensors").exists()
    assert (out / "notes.txt").read_text() == "mine"
    # the summary reports the validations logged after SFT (step 0) and after the last RL step, task by task
    val = {r["step"]: r for r in rows if "val/reward/mean" in r}
    assert sorted(val) == [0, 1]
    assert saved["reward_after_sft"] == val[0]["val/reward/mean"]
    assert saved["reward_after_rl"] == val[1]["val/reward/mean"]
    assert saved["rl_improved"] == (val[1]["val/reward/mean"] > val[0]["val/reward/mean"])
    # the two validations' dumps paired prompt by prompt: the same 9 prompts, one response each
    paired = saved["rl_minus_sft"]
    assert paired["prompts"] == 9 and paired["b_higher"] + paired["equal"] + paired["b_lower"] == 9
    assert paired["diff"] == pytest.approx(saved["reward_after_rl"] - saved["reward_after_sft"], abs=1e-12)
    assert (out / "rollouts" / "val_step_000000.jsonl").is_file() and (out / "rollouts" / "step_000001.jsonl").is_file()
    metric = {"precise_retrieval": "em", "comprehension": "choice", "exhaustive_retrieval": "f1",
              "numerical_reasoning": "math_verify", "structured_extraction": "iou", "structured_matching": "subem",
              "graded_ranking": "ndcg", "sequence_ordering": "pairwise", "summarization": "rouge_l"}
    for r in saved["per_task"]:
        key = "val/reward/task/" + r["task"]
        assert (r["after_sft"], r["after_rl"], r["metric"]) == (val[0][key], val[1][key], metric[r["task"]])
    assert (saved["held_out_prompts"], saved["sft_steps"]) == (9, 3)
    assert saved["validation"] == {"temperature": 0.6, "top_p": 0.95, "responses_per_prompt": 1}
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "tokenizer.json").is_file()
    printed = capsys.readouterr().out
    assert "held-out reward" in printed and "summarization" in printed and "after RL" in printed


def test_demo_refuses_a_config_without_sft_or_validation(tmp_path):
    from golong.demo import run_demo

    for override in ("trainer.sft_steps=0", "trainer.val_every=0"):
        with pytest.raises(ValueError, match="the demo needs trainer.sft_steps > 0 and trainer.val_every > 0"):
            run_demo(tmp_path / "d", overrides=[override])
    assert not (tmp_path / "d").exists()


def test_demo_refuses_an_out_dir_holding_another_run(tmp_path, monkeypatch, capsys):
    """`golong demo --out runs/my-run` deleted that training run's checkpoints and metrics.jsonl before training."""
    import golong.demo as demo
    from golong.cli import main

    run = tmp_path / "my-run"
    (run / "checkpoints" / "step_000100").mkdir(parents=True)
    (run / "checkpoints" / "step_000100" / "COMPLETE").write_text("100\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 100, "reward/mean": 0.5}) + "\n")
    monkeypatch.setattr(demo, "_launch", lambda cfg, world: pytest.fail("the demo trained"))
    assert main(["demo", "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"golong: error: --out {run} holds metrics.jsonl, checkpoints that golong demo did not write (a "
                   "training run's outputs?); the demo replaces these: choose another --out, or remove them"), err
    assert (run / "checkpoints" / "step_000100" / "COMPLETE").is_file() and (run / "metrics.jsonl").is_file()
    assert not (run / ".golong-demo").exists()


def test_demo_names_the_earlier_outputs_it_replaces_and_removes_a_stale_eval(tmp_path, monkeypatch, capsys):
    """A new demo replaced the last one's checkpoints, hf/ and metrics without a word, and kept its eval/ (scores
    of checkpoints no longer there)."""
    import golong.demo as demo

    out = tmp_path / "demo"
    (out / "checkpoints" / "step_000001").mkdir(parents=True)
    (out / "eval" / "step_000001").mkdir(parents=True)
    (out / "eval" / "step_000001" / "eval.json").write_text("{}")
    for name in ("summary.json", "metrics.jsonl", "notes.txt"):
        (out / name).write_text("{}")

    class Stop(Exception):
        pass

    def launch(cfg, world):
        raise Stop

    monkeypatch.setattr(demo, "_launch", launch)
    with pytest.raises(Stop):
        demo.run_demo(out)
    printed = capsys.readouterr().out
    assert f"golong demo: replacing the earlier demo's outputs in {out}: metrics.jsonl, summary.json, " \
           "checkpoints/, eval/\n" in printed, printed
    assert sorted(p.name for p in out.iterdir()) == [".golong-demo", "notes.txt"]
    with pytest.raises(Stop):  # nothing of a demo's left: nothing to name
        demo.run_demo(out)
    assert "replacing" not in capsys.readouterr().out


def test_demo_summary_reports_the_validations_task_by_task(tmp_path, monkeypatch, capsys):
    """Summary and table come from the trainer's validation history: the one after SFT (step 0) and the one
    after the last RL step, task by task. The smoke run's tiny model scores 0 everywhere, so here the
    trainer is played by a stand-in that leaves a real checkpoint and metrics and returns distinct rewards."""
    import torch

    import golong.demo as demo
    from golong.build import scratch_hf_config
    from golong.checkpoint import Checkpointer
    from golong.data.tokenizer import build_demo_tokenizer
    from golong.logger import MetricsWriter
    from golong.models import from_config
    from tests.golong.trainer_helpers import tiny_config

    tasks = ["summarization", "graded_ranking", "precise_retrieval"]

    def val(step: int, base: float) -> dict:
        per_task = {f"val/reward/task/{t}": base + 0.125 * i for i, t in enumerate(tasks)}
        return {"step": step, "val/reward/mean": base + 0.125, **per_task}

    history = [val(0, 0.25), val(4, 0.5), val(2, 0.0625)]  # the last RL step is not the list's last entry
    # each task's two held-out prompts, after SFT and after RL (their means are the history's): summarization's
    # prompts change by +0.5 and 0 (+0.25 +- 0.25), the others' by +0.25 each (+- 0)
    scores = {0: {"summarization": [0.0, 0.5], "graded_ranking": [0.375, 0.375], "precise_retrieval": [0.5, 0.5]},
              4: {"summarization": [0.5, 0.5], "graded_ranking": [0.625, 0.625], "precise_retrieval": [0.75, 0.75]}}

    def fake_launch(cfg, world):
        out = Path(cfg.logging.run_dir)
        tok = build_demo_tokenizer(1024)
        torch.manual_seed(0)
        model = from_config(scratch_hf_config(tiny_config()), dtype=torch.float32)
        Checkpointer(out / "checkpoints").save(4, model, None, {"step": 4}, hf_config=model.config.to_hf(
            dtype="float32"), extra_files=lambda d: tok.save_pretrained(str(d / "tokenizer")))
        w = MetricsWriter(out, tensorboard=False)
        for h in history:
            w.log(h["step"], {k: v for k, v in h.items() if k != "step"})
        w.close()
        (out / "rollouts").mkdir()
        for step, per_task in scores.items():
            rows = [{"prompt": 2 * i + j, "record": 2 * i + j, "sample": 0, "prompt_tokens": 30,
                     "prompt_sha1": f"p{i}{j}", "truncated": False, "data_source": "synthetic", "task": t, "score": x}
                    for i, (t, xs) in enumerate(per_task.items()) for j, x in enumerate(xs)]
            (out / "rollouts" / f"val_step_{step:06d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return history

    monkeypatch.setattr(demo, "_launch", fake_launch)
    summary = demo.run_demo(tmp_path / "demo", overrides=["data.synthetic_context_tokens=20",
                                                          "rollout.val_temperature=0.7", "data.synthetic_val_n=6"])
    assert (summary["reward_after_sft"], summary["reward_after_rl"], summary["rl_steps"]) == (0.375, 0.625, 4)
    assert summary["held_out_prompts"] == 6  # the validation set's size (data.synthetic_val_n), not the training set's
    assert summary["rl_improved"] and summary["validation"]["temperature"] == 0.7
    assert summary["per_task"] == [
        {"task": "graded_ranking", "metric": "ndcg", "after_sft": 0.375, "after_rl": 0.625, "change_stderr": 0.0},
        {"task": "precise_retrieval", "metric": "em", "after_sft": 0.5, "after_rl": 0.75, "change_stderr": 0.0},
        {"task": "summarization", "metric": "rouge_l", "after_sft": 0.25, "after_rl": 0.5,
         "change_stderr": pytest.approx(0.25)}]
    # overall: the six prompts' differences 0.25 x 4, 0.5, 0: mean 0.25, sample std sqrt(0.125 / 5)
    assert summary["rl_minus_sft"] == {"prompts": 6, "diff": pytest.approx(0.25),
                                       "diff_stderr": pytest.approx((0.125 / 5) ** 0.5 / 6 ** 0.5),
                                       "b_higher": 5, "equal": 1, "b_lower": 0}
    assert summary["hf_export"]["transformers_max_abs_logit_diff"] < 1e-4
    printed = capsys.readouterr().out
    assert printed.count("+0.250") == 4 and "0.375 after SFT -> 0.625 after RL" in printed  # 3 tasks + all
    assert "+0.250 ± 0.250" in printed and "+0.250 ± 0.065" in printed  # summarization; all
    assert "RL scored 5 held-out prompts higher than SFT, 1 equal, 0 lower" in printed
    # without the dumps (a config with logging.dump_rollouts off; here the stand-in writes none) nothing is paired
    scores.clear()
    summary = demo.run_demo(tmp_path / "demo")
    assert summary["rl_minus_sft"] is None and "change_stderr" not in summary["per_task"][0]
    assert "±" not in capsys.readouterr().out
    # an unchanged reward is no improvement
    history[:] = [val(0, 0.25), val(2, 0.25)]
    summary = demo.run_demo(tmp_path / "demo")
    assert summary["reward_after_sft"] == summary["reward_after_rl"] == 0.375 and summary["rl_improved"] is False


def _rank_exits_without_a_word(rank, world, port, cfg, results):
    """A stand-in for demo._rank_main (module level: spawned ranks import it): rank 0 reports success, rank 1 dies
    as a killed process does, leaving nothing on the queue."""
    import os

    if rank == 0:
        results.put((0, "ok", [{"step": 0}]))
    else:
        os._exit(3)


def test_demo_launch_fails_when_a_rank_dies_without_reporting(monkeypatch):
    # a rank killed from outside (the OOM killer) puts no error on the queue: its exit code alone says it failed
    import golong.demo as demo

    monkeypatch.setattr(demo, "_rank_main", _rank_exits_without_a_word)
    with pytest.raises(RuntimeError, match=r"demo training failed:\nexit codes \[0, 3\]"):
        demo._launch(None, 2)


@pytest.mark.parametrize("after_rl", [0.5, 0.5 - 1e-17, 0.4996])
def test_demo_table_does_not_call_an_unchanged_reward_a_regression(monkeypatch, capsys, after_rl):
    """The summary's "all" row was red for any change that was not > 0: an unchanged reward (+0.000) showed
    as a regression. A change that prints as 0.000 (float rounding included) is plain; only a drop is red."""
    from golong.demo import _table

    monkeypatch.setenv("FORCE_COLOR", "1")  # rich writes its colours to the captured (non-terminal) stdout
    monkeypatch.setenv("COLUMNS", "200")
    rows = [{"task": "up", "metric": "em", "after_sft": 0.25, "after_rl": 0.5},
            {"task": "down", "metric": "f1", "after_sft": 0.5, "after_rl": 0.25},
            {"task": "same", "metric": "iou", "after_sft": 0.5, "after_rl": 0.5}]
    _table(rows, 0.5, after_rl, "held-out reward")
    lines = {re.sub(r"\x1b\[[0-9;]*m", "", line).split("│")[1].strip(): line
             for line in capsys.readouterr().out.splitlines() if "│" in line}  # first cell -> row with colours
    red, green = "\x1b[31m", "\x1b[32m"
    assert green in lines["up"] and red not in lines["up"]
    assert red in lines["down"]
    assert red not in lines["same"] and green not in lines["same"] and "+0.000" in lines["same"]
    assert "\x1b[1;31m" not in lines["all"] and red not in lines["all"], repr(lines["all"])
    assert "+0.000" in lines["all"] and "-0.000" not in lines["all"]
