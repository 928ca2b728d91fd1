"""Data: record I/O and validation, chat templating with truncation, sampler, packing, synthetic
tasks scored by the real rewards, demo tokenizer."""

from __future__ import annotations

import json
import logging
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from golong.data import (
    PromptSampler,
    Record,
    RecordError,
    build_prompts,
    load_records,
    pack,
    write_records,
)
from golong.data.synthetic import TASKS, generate, reference_response, write_dataset
from golong.data.tokenizer import build_demo_tokenizer
from golong.rewards import RewardConfig, score_record, score_records


@pytest.fixture(scope="module")
def tok():
    return build_demo_tokenizer()


def _row(i: int) -> dict:
    return {"data_source": "longbench_pro", "prompt": [{"role": "user", "content": f"question {i}"}],
            "ability": "long_context",
            "reward_model": {"style": "rule", "ground_truth": {"doc_ids": [f"a{i}", "b"], "golden_label": "",
                                                               "summary": ""}},
            "extra_info": {"reward_mode": "T1.2 Key-Snippet Retrieval", "index": i}}


# ------------------------------------------------------------------ records


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_records_roundtrip(tmp_path, suffix):
    recs = generate(12, 30, seed=1)
    path = write_records(recs, tmp_path / f"d{suffix}")
    back = load_records(path)
    assert [r.to_dict() for r in back] == [r.to_dict() for r in recs]
    assert load_records([path, path], limit=15)[14].to_dict() == recs[2].to_dict()


def test_goLongRL_dict_layout_parses():
    rec = Record.from_dict(_row(3))
    assert rec.ground_truth.doc_ids == ["a3", "b"]
    assert rec.metric == "ndcg" and rec.task == "T1.2 Key-Snippet Retrieval"
    # a bare golden_label string and a list of ground-truth dicts are both accepted
    d = _row(0)
    d["data_source"], d["reward_model"]["ground_truth"] = "EM", "42"
    d["extra_info"] = {}
    assert Record.from_dict(d).ground_truth.golden_label == "42"
    d["reward_model"]["ground_truth"] = [{"golden_label": "1"}, {"golden_label": "2"}]
    assert Record.from_dict(d).ground_truth.golden_label == "2"


@pytest.mark.parametrize("breaker, message", [
    (lambda d: d.pop("prompt"), "missing field"),
    (lambda d: d.update(prompt=[{"role": "robot", "content": "x"}]), "prompt\\[0\\].role"),
    (lambda d: d.update(prompt=[]), "non-empty list"),
    (lambda d: d["reward_model"]["ground_truth"].update(doc_ids="abc"), "doc_ids must be a list"),
    (lambda d: d["reward_model"]["ground_truth"].update(doc_ids=[]), "empty ground truth"),
    (lambda d: d.update(extra_info={"reward_mode": "T99 Nothing"}, data_source="nowhere", ability=""),
     "cannot route"),
])
def test_bad_jsonl_record_names_file_and_line(tmp_path, breaker, message):
    rows = [_row(i) for i in range(4)]
    breaker(rows[2])
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(RecordError, match=rf"bad.jsonl: line 3: .*{message}"):
        load_records(path)


def test_invalid_json_line_and_parquet_row(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(_row(0)) + "\n\n" + '{"data_source": \n')
    with pytest.raises(RecordError, match="broken.jsonl: line 3: invalid JSON"):
        load_records(path)
    rows = [_row(i) for i in range(5)]
    rows[3]["data_source"] = ""
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    with pytest.raises(RecordError, match="t.parquet: row 3: data_source"):
        load_records(tmp_path / "t.parquet")
    with pytest.raises(RecordError, match="unsupported dataset format"):
        (tmp_path / "x.csv").write_text("a")
        load_records(tmp_path / "x.csv")


# ------------------------------------------------------------------ prompts


def test_build_prompts_template_and_truncation(tok, caplog):
    recs = generate(6, 20, seed=2) + generate(3, 900, seed=3)
    limit = 400
    full = [tok(tok.apply_chat_template(r.prompt, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"] for r in recs]
    assert sum(len(f) > limit for f in full) == 3 and all(len(f) <= limit for f in full[:6])
    with caplog.at_level(logging.INFO, logger="golong.data.prompts"):
        out = build_prompts(recs, tok, limit)
    assert "3 left-truncated, 0 dropped" in caplog.text
    assert [p.index for p in out] == list(range(9))
    for p, f in zip(out[:6], full[:6]):  # short prompts: exactly the chat-templated ids
        assert p.input_ids == f and not p.truncated
    for p, r in zip(out[6:], recs[6:]):
        assert p.truncated and limit - 8 <= len(p.input_ids) <= limit
        text = tok.decode(p.input_ids)
        # template intact, the question (end of the user turn) kept, the start of the context cut
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        question = r.prompt[0]["content"].rsplit("Question:", 1)[1]
        assert question in text
        assert "Read the text and answer the question." not in text
    dropped = build_prompts(recs, tok, limit, overflow="drop")
    assert [p.index for p in dropped] == list(range(6))
    assert build_prompts(recs[:1], tok, 5) == []  # template overhead alone exceeds the limit
    with pytest.raises(ValueError, match="overflow"):
        build_prompts(recs, tok, limit, overflow="right")


def test_prompt_sampler_deterministic_and_resumable():
    a = PromptSampler(10, seed=7)
    first = a.take(10)
    assert sorted(first) == list(range(10))  # an epoch is a permutation
    second = a.take(10)
    assert sorted(second) == list(range(10)) and second != first  # a new order each epoch
    assert PromptSampler(10, seed=7).take(20) == first + second
    assert PromptSampler(10, seed=8).take(10) != first
    assert PromptSampler(4, shuffle=False).take(6) == [0, 1, 2, 3, 0, 1]
    s = PromptSampler(10, seed=3)
    s.take(13)
    state = json.loads(json.dumps(s.state_dict()))  # survives a checkpoint round trip
    expect = s.take(17)
    r = PromptSampler(10, seed=0)
    r.load_state_dict(state)
    assert r.take(17) == expect
    with pytest.raises(ValueError, match="dataset has 11"):
        PromptSampler(11).load_state_dict(state)


# ------------------------------------------------------------------ packing


def test_pack_preserves_tokens_and_budget():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 97, (37,), generator=g).tolist()
    seqs = [torch.randint(0, 1000, (n,), generator=g) for n in lengths]
    budget = 200
    batches = pack(seqs, budget)
    assert len(batches) >= -(-sum(lengths) // budget)
    seen = []
    for b in batches:
        assert b.num_tokens <= budget
        assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens[0] == 0 and b.cu_seqlens[-1] == b.num_tokens
        for j, i in enumerate(b.indices):
            s, e = int(b.cu_seqlens[j]), int(b.cu_seqlens[j + 1])
            assert torch.equal(b.input_ids[s:e], seqs[i])
            assert torch.equal(b.position_ids[s:e], torch.arange(e - s))
        seen += b.indices
    assert sorted(seen) == list(range(37))
    again = pack([s.tolist() for s in seqs], budget)
    assert [b.indices for b in again] == [b.indices for b in batches]  # deterministic, lists work too
    assert len(pack(seqs[:5], 10_000, min_batches=4)) == 4
    assert len(pack(seqs[:3], 10_000, min_batches=8)) == 3
    with pytest.raises(ValueError, match="sequence 2 has 300 tokens"):
        pack([[1], [2], list(range(300))], 299)


# ------------------------------------------------------------------ synthetic tasks


def test_synthetic_all_tasks_scored_by_rewards():
    recs = generate(27, 60, seed=4)
    assert [r.ability for r in recs[:9]] == list(TASKS)
    for r in recs:
        assert r.data_source == "synthetic" and r.extra_info["reward_mode"] == r.ability
        assert score_record(r, reference_response(r), timeout=30.0) == 1.0, r.ability
        # the answer is in the prompt's facts, not only in the record's label
        content = r.prompt[0]["content"]
        for item in r.ground_truth.doc_ids:
            if r.ability in ("exhaustive_retrieval", "structured_matching", "graded_ranking",
                             "sequence_ordering", "precise_retrieval"):
                assert item in content
    wrong = [reference_response(r).replace(r.extra_info["answer"], "nothing useful") for r in recs]
    assert all(s < 1.0 for s in score_records(recs, wrong, config=RewardConfig(num_workers=2)))
    # partially right answers get partial credit on the graded metrics
    r = recs[6]  # graded_ranking
    half = reference_response(r).split("\n")
    assert 0.0 < score_record(r, "\n".join(half[:-2] + half[-1:-3:-1])) < 1.0


def test_synthetic_context_length_and_determinism(tmp_path):
    for L in (0, 500, 3000):
        r = generate(1, L, seed=9, tasks=["summarization"])[0]
        words = len(r.prompt[0]["content"].split())
        assert L <= words <= L + 80
    assert [r.to_dict() for r in generate(9, 100, seed=1)] == [r.to_dict() for r in generate(9, 100, seed=1)]
    assert generate(9, 100, seed=1)[0].to_dict() != generate(9, 100, seed=2)[0].to_dict()
    p = write_dataset(tmp_path / "s.parquet", 18, 50, seed=0, tasks=["graded_ranking", "comprehension"])
    back = load_records(p)
    assert len(back) == 18 and {r.ability for r in back} == {"graded_ranking", "comprehension"}
    with pytest.raises(ValueError, match="unknown synthetic task"):
        generate(1, 10, tasks=["poetry"])


# ------------------------------------------------------------------ tokenizer


def test_demo_tokenizer_fast_deterministic_qwen_style():
    t = time.perf_counter()
    a = build_demo_tokenizer(vocab_size=1024)
    assert time.perf_counter() - t < 5.0
    b = build_demo_tokenizer(vocab_size=1024)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) <= 1024
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert a.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert a.apply_chat_template(msgs[1:], tokenize=False, add_generation_prompt=True,
                                 enable_thinking=False).endswith("assistant\n<think>\n\n</think>\n\n")
    assert a.eos_token == "<|im_end|>" and a.pad_token == "<|endoftext|>"
    think = a.convert_tokens_to_ids(["<think>", "</think>"])
    ids = a("<think>x</think>42", add_special_tokens=False)["input_ids"]
    assert ids[0] == think[0] and think[1] in ids
    assert a.decode(ids, skip_special_tokens=True) == "<think>x</think>42"  # think tags survive
    assert len(a("12345", add_special_tokens=False)["input_ids"]) == 5  # digits split one by one
    weird = "naïve 漢字 \x00 tab\tend 🎉"
    assert a.decode(a(weird, add_special_tokens=False)["input_ids"]) == weird  # byte-level round trip
