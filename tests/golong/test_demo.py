"""`golong demo`, shrunk to a smoke run: 2 gloo ranks, a few SFT steps, one GRPO step. The full
demo (minutes) is `golong demo`; this checks that every artifact it promises is produced."""

from __future__ import annotations

import json

import pytest

from golong.logger import read_metrics
from tests.golong.trainer_helpers import one_thread  # noqa: F401  (autouse fixture)


@pytest.mark.distributed
def test_demo_smoke_writes_every_artifact(tmp_path, capsys):
    from golong.data.tokenizer import build_demo_tokenizer
    from golong.demo import run_demo

    build_demo_tokenizer(1024).save_pretrained(str(tmp_path / "tok"))
    out = tmp_path / "demo"
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

    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps.count(-1) == 1 and steps.count(-3) == 1 and 0 in steps and 1 in steps  # SFT, SFT val, RL
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "tokenizer.json").is_file()
    printed = capsys.readouterr().out
    assert "held-out reward" in printed and "summarization" in printed and "after RL" in printed
