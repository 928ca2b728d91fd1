"""Data: record I/O and validation, chat templating with truncation, sampler, synthetic
tasks scored by the real rewards, demo tokenizer."""

from __future__ import annotations

import json
import logging
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from golong.data import (
    GroundTruth,
    PromptSampler,
    Record,
    RecordError,
    build_prompts,
    load_records,
    write_records,
)
from golong.data.synthetic import MARKED_TASKS, TASKS, generate, reference_response, write_dataset
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
    # a bare prompt string is one user turn; a non-default reward style survives the round trip
    d["prompt"], d["reward_model"]["style"] = "what is 6*7?", "model"
    rec = Record.from_dict(d)
    assert rec.prompt == [{"role": "user", "content": "what is 6*7?"}]
    assert rec.style == "model" and rec.to_dict()["reward_model"]["style"] == "model"


@pytest.mark.parametrize("breaker, message", [
    (lambda d: d.pop("prompt"), "missing field"),
    (lambda d: d.update(prompt=[{"role": "robot", "content": "x"}]), "prompt\\[0\\].role"),
    (lambda d: d.update(prompt=[]), "non-empty list"),
    (lambda d: d["reward_model"]["ground_truth"].update(doc_ids="abc"), "doc_ids must be a list"),
    (lambda d: d["reward_model"]["ground_truth"].update(doc_ids=[]), "empty ground truth"),
    (lambda d: d["reward_model"]["ground_truth"].update(doc_ids=[], golden_label=" \n "), "empty ground truth"),
    (lambda d: d.update(ability=5), "ability must be a string"),
    (lambda d: d.update(extra_info=["T1.2"]), "extra_info must be an object"),
    (lambda d: d.update(extra_info={"reward_mode": "T99 Nothing"}, data_source="nowhere", ability=""),
     "cannot route"),
    (lambda d: d.update(data_source="retrieval_calculate"), "retrieval_calculate record needs both"),
    (lambda d: d.update(data_source="qa_model_judge", extra_info={"reward_mode": "model_judge"}),
     "scored by a judge model in GoLongRL, which golong does not run"),
    # a judge source's math_verify record reads golden_label / extra_info.ground_truth only: doc_ids do not do,
    # nor does a blank answer (every response would score 0)
    (lambda d: d.update(data_source="qa_model_verify", extra_info={"reward_mode": "math_verify"}),
     "judge-model data source needs a non-empty ground_truth.golden_label"),
    (lambda d: d.update(data_source="qa_model_verify", extra_info={"reward_mode": "math_verify", "ground_truth": ""}),
     "judge-model data source needs a non-empty ground_truth.golden_label"),
    (lambda d: d.update(data_source="qa_model_verify", extra_info={"reward_mode": "math_verify",
                                                                   "ground_truth": " \n"}),
     "judge-model data source needs a non-empty ground_truth.golden_label"),
])
def test_bad_jsonl_record_names_file_and_line(tmp_path, breaker, message):
    rows = [_row(i) for i in range(4)]
    breaker(rows[2])
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(RecordError, match=rf"bad.jsonl: line 3: .*{message}"):
        load_records(path)


def test_a_raw_control_character_in_a_string_reads_as_one_clause(tmp_path):
    """A string with a raw control character (a tab pasted into a prompt) read "Invalid control character at
    at column 19": json's message ends in "at" itself."""
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps(_row(0)) + "\n" + '{"data_source": "a\tb"}\n')
    with pytest.raises(RecordError) as e:
        load_records(path)
    assert str(e.value) == f"{path}: line 2: invalid JSON (Invalid control character at column 19)"


def test_a_json_document_is_told_apart_from_json_lines(tmp_path):
    """A pretty-printed JSON array (or object) of records fails on its first line: the error says the reader wants
    one record per line; a broken first record line gets no such hint."""
    for name, text in (("array.json", json.dumps([_row(0), _row(1)], indent=2)),
                       ("one.json", json.dumps(_row(0), indent=2)), ("flat.json", json.dumps([_row(0)]) + "x")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(RecordError, match=r"line 1: invalid JSON \(.*\); records are read one JSON object per "
                                              r"line \(JSON Lines\), and this file looks like one JSON document$"):
            load_records(path)
    path = tmp_path / "typo.jsonl"
    path.write_text('{"data_source": x}\n')
    with pytest.raises(RecordError, match=r"line 1: invalid JSON \(Expecting value at column 17\)$"):
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
    rows = [_row(i) for i in range(300)]  # the reader streams 256-row batches: rows count on across them
    rows[270]["prompt"] = []
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "long.parquet")
    with pytest.raises(RecordError, match="long.parquet: row 270: prompt must be a non-empty list"):
        load_records(tmp_path / "long.parquet")
    with pytest.raises(RecordError, match="unsupported dataset format"):
        (tmp_path / "x.csv").write_text("a")
        load_records(tmp_path / "x.csv")


def test_unreadable_files_name_file_and_line(tmp_path):
    good = json.dumps(_row(0)).encode()
    (tmp_path / "latin1.jsonl").write_bytes(good + b"\n" + good.replace(b"question", b"caf\xe9") + b"\n")
    with pytest.raises(RecordError, match="latin1.jsonl: line 2: not UTF-8"):
        load_records(tmp_path / "latin1.jsonl")
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b"\n")  # a UTF-8 byte-order mark is fine
    assert len(load_records(tmp_path / "bom.jsonl")) == 1
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(RecordError, match="garbage.parquet: not a readable parquet file"):
        load_records(tmp_path / "garbage.parquet")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(RecordError, match="empty.jsonl: the file holds no records"):
        load_records(tmp_path / "empty.jsonl")


def test_limit_reads_no_further(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(_row(0)) + "\n" + json.dumps(_row(1)) + "\n{broken\n")
    assert [r.extra_info["index"] for r in load_records(path, limit=2)] == [0, 1]  # line 3 never parsed
    assert len(load_records([path, tmp_path / "missing.jsonl"], limit=1)) == 1
    with pytest.raises(RecordError, match="line 3"):
        load_records(path)


def test_reward_mode_type_and_unknown_names(tmp_path, caplog):
    d = _row(0)
    d["extra_info"]["reward_mode"] = 7
    with pytest.raises(RecordError, match="reward_mode must be a string"):
        Record.from_dict(d, "f.jsonl: line 1")
    d = _row(0)
    d["data_source"], d["extra_info"]["reward_mode"] = "EM", "T2.1 Global Timline Reconstruction"  # a typo
    with caplog.at_level(logging.WARNING, logger="golong.data.records"):
        rec = Record.from_dict(d, "f.jsonl: line 1")
        Record.from_dict(d, "f.jsonl: line 2")
    assert rec.metric == "em"  # routed by data_source, and said so once
    warnings = [r for r in caplog.records if "Timline" in r.getMessage()]
    assert len(warnings) == 1 and "f.jsonl: line 1" in warnings[0].getMessage()
    assert "T2.1 Global Timeline Reconstruction" in warnings[0].getMessage()  # the known names


def test_parquet_roundtrip_with_empty_and_varying_extra_info(tmp_path):
    recs = generate(4, 20, seed=5)
    for r in recs:
        r.extra_info = {}
    back = load_records(write_records(recs, tmp_path / "none.parquet"))
    assert [r.to_dict() for r in back] == [r.to_dict() for r in recs]
    recs[0].extra_info, recs[1].extra_info = {"a": 1}, {"b": "x"}
    back = load_records(write_records(recs, tmp_path / "mixed.parquet"))
    assert [r.extra_info for r in back] == [{"a": 1}, {"b": "x"}, {}, {}]
    recs[2].extra_info = {"a": "not an int"}
    with pytest.raises(ValueError, match="mixed.parquet: records do not fit one parquet schema"):
        write_records(recs, tmp_path / "mixed.parquet")


# ------------------------------------------------------------------ prompts


def test_build_prompts_template_and_truncation(tok, caplog):
    recs = generate(6, 20, seed=2) + generate(3, 900, seed=3)
    limit = 400
    full = [tok(tok.apply_chat_template(r.prompt, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"] for r in recs]
    assert sum(len(f) > limit for f in full) == 3 and all(len(f) <= limit for f in full[:6])
    with caplog.at_level(logging.INFO, logger="golong.data.prompts"):
        out = build_prompts(recs, tok, limit, split="train")  # the split names its lines (data check logs two)
    assert "build_prompts (train): 9 records -> 9 prompts (3 left-truncated, 0 dropped" in caplog.text
    assert [p.index for p in out] == list(range(9))
    for p, f in zip(out[:6], full[:6]):  # short prompts: exactly the chat-templated ids
        assert p.input_ids.tolist() == f and not p.truncated
    for p, r in zip(out[6:], recs[6:]):
        assert p.truncated and limit - 8 <= len(p.input_ids) <= limit
        text = tok.decode(p.input_ids)
        # template intact, the question (end of the user turn) kept, the start of the context cut
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        question = r.prompt[0]["content"].rsplit("Question:", 1)[1]
        assert question in text
        assert "Read the text and answer the question." not in text
    with caplog.at_level(logging.INFO, logger="golong.data.prompts"):
        dropped = build_prompts(recs, tok, limit, overflow="drop")
    assert "build_prompts: 9 records -> 6 prompts (3 dropped; limit 400 tokens)" in caplog.text
    assert [p.index for p in dropped] == list(range(6))
    # `index` is the position in `records`, also after a dropped record in the middle
    mixed = [recs[0], recs[6], recs[1], recs[7], recs[2]]
    assert [p.index for p in build_prompts(mixed, tok, limit, overflow="drop")] == [0, 2, 4]
    assert [p.record for p in build_prompts(mixed, tok, limit, overflow="drop")] == [recs[0], recs[1], recs[2]]
    # a prompt of exactly the limit fits: kept whole, not truncated nor dropped
    (exact,) = build_prompts(recs[:1], tok, len(full[0]), overflow="drop")
    assert exact.input_ids.tolist() == full[0] and not exact.truncated
    (exact,) = build_prompts(recs[:1], tok, len(full[0]))
    assert exact.input_ids.tolist() == full[0] and not exact.truncated
    assert build_prompts(recs[:1], tok, 5) == []  # template overhead alone exceeds the limit
    with pytest.raises(ValueError, match="overflow"):
        build_prompts(recs, tok, limit, overflow="right")


def test_chat_template_kwargs_reach_every_encoding(tok):
    """enable_thinking=False pre-fills an empty think block, in short prompts and in truncated ones alike
    (the truncation re-applies the template with the same kwargs and counts its tokens)."""
    rec = generate(1, 20, seed=6)[0]
    long_rec = generate(1, 900, seed=7)[0]
    kw = {"enable_thinking": False}
    want = tok(tok.apply_chat_template(rec.prompt, tokenize=False, add_generation_prompt=True, **kw),
               add_special_tokens=False)["input_ids"]
    short, cut = build_prompts([rec, long_rec], tok, 300, chat_template_kwargs=kw)
    assert short.input_ids.tolist() == want and not short.truncated
    assert cut.truncated and len(cut.input_ids) <= 300
    assert tok.decode(cut.input_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_truncation_cuts_further_messages_and_whole_characters(tok):
    system = "alpha " * 300
    user = "beta " * 250 + "QUESTION?"
    rec = Record("EM", [{"role": "system", "content": system}, {"role": "user", "content": user}], "",
                 GroundTruth(["x"], "x"))
    (p,) = build_prompts([rec], tok, 300)  # more to cut than the longest message holds
    text = tok.decode(p.input_ids)
    assert p.truncated and len(p.input_ids) <= 300 and text.count("<|im_start|>") == 3
    assert "alpha" not in text and text.rstrip().endswith("QUESTION?<|im_end|>\n<|im_start|>assistant")
    # several messages used up in turn (longest first), and the cut is minimal: with one token per
    # word the truncated prompt is exactly `limit` tokens, its kept text a suffix of the original
    msgs = [{"role": "system", "content": "alpha " * 200}, {"role": "user", "content": "gamma " * 150},
            {"role": "assistant", "content": "delta " * 120}, {"role": "user", "content": "beta " * 100 + "QUESTION?"}]
    rec = Record("EM", msgs, "", GroundTruth(["x"], "x"))
    for limit in (60, 80, 150):
        (p,) = build_prompts([rec], tok, limit)
        text = tok.decode(p.input_ids)
        assert p.truncated and len(p.input_ids) == limit, limit
        head, last = text.rsplit("<|im_start|>user\n", 1)
        assert head == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|im_end|>\n"
                        "<|im_start|>assistant\n<|im_end|>\n")
        kept = last.removesuffix("<|im_end|>\n<|im_start|>assistant\n")
        assert msgs[3]["content"].endswith(kept) and kept.endswith("beta QUESTION?"), limit
    # room for less than the system message and the question: cutting the longest message (the question) would
    # empty it, so the system message is emptied instead and the question keeps its end; a prompt is dropped only
    # where it would fit only without its question (here: no room left for any of it)
    rec = Record("EM", [{"role": "system", "content": "alpha " * 60}, {"role": "user", "content": user}], "",
                 GroundTruth(["x"], "x"))
    (p,) = build_prompts([rec], tok, 100)
    text = tok.decode(p.input_ids)
    assert p.truncated and len(p.input_ids) <= 100 and text.startswith("<|im_start|>system\n<|im_end|>")
    assert text.rstrip().endswith("beta QUESTION?<|im_end|>\n<|im_start|>assistant")
    bare = tok.apply_chat_template([{"role": "system", "content": ""}, {"role": "user", "content": ""}],
                                   tokenize=False, add_generation_prompt=True)
    bare = len(tok(bare, add_special_tokens=False)["input_ids"])  # the template alone: no room for a question
    assert bare > 5 and build_prompts([rec], tok, bare) == [] and len(build_prompts([rec], tok, bare + 3)) == 1
    (p,) = build_prompts([rec], tok, 400)  # room for the question's end: the user message is cut, then fits
    text = tok.decode(p.input_ids)
    assert p.truncated and text.startswith("<|im_start|>system\nalpha alpha")
    assert text.rstrip().endswith("beta QUESTION?<|im_end|>\n<|im_start|>assistant")
    cjk = Record("EM", [{"role": "user", "content": "漢字テキスト" * 200 + " END"}], "", GroundTruth(["x"], "x"))
    for limit in range(90, 100):  # cut points inside multi-byte characters
        (p,) = build_prompts([cjk], tok, limit)
        text = tok.decode(p.input_ids)
        assert "\ufffd" not in text and text.endswith("END<|im_end|>\n<|im_start|>assistant\n"), limit


def test_middle_truncation_keeps_the_start_and_end_of_the_longest_message(tok, caplog):
    """overflow=truncate_middle (LongBench's truncation): the longest message loses its middle, keeping its first
    and last halves; the instructions at the start of a single-message prompt survive with the question at its
    end; whole characters; a prompt that would keep no question is still dropped."""
    numbered = " ".join(f"w{i}" for i in range(600))  # each word its own tokens: where a cut fell is readable
    user = "INSTRUCTIONS: read the text. " + numbered + " QUESTION?"
    rec = Record("EM", [{"role": "user", "content": user}], "", GroundTruth(["x"], "x"))
    full = len(tok(tok.apply_chat_template(rec.prompt, tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"])
    for limit in (101, 200, 451):
        with caplog.at_level(logging.INFO, logger="golong.data.prompts"):
            (p,) = build_prompts([rec], tok, limit, overflow="truncate_middle")
        assert "(1 middle-truncated, 0 dropped" in caplog.text
        text = tok.decode(p.input_ids)
        assert p.truncated and limit - 8 <= len(p.input_ids) <= limit < full, limit
        body = text.removeprefix("<|im_start|>user\n").removesuffix("<|im_end|>\n<|im_start|>assistant\n")
        assert body.startswith("INSTRUCTIONS: read the text. w0 w1") and body.endswith("w598 w599 QUESTION?")
        assert "w300 " not in body  # the middle went
        # what is left is a prefix and a suffix of the message (the cut may fall inside a word), about half each
        i = next(k for k, (a, b) in enumerate(zip(body, user)) if a != b)
        assert user.endswith(body[i:])
        assert abs(len(tok(body[:i])["input_ids"]) - len(tok(body[i:])["input_ids"])) <= 4, limit
    # the left mode, for contrast, loses the instructions
    (p,) = build_prompts([rec], tok, 200)
    assert "INSTRUCTIONS" not in tok.decode(p.input_ids)
    # several messages: the longest (the system one) is cut in its middle, the question's message kept whole
    msgs = [{"role": "system", "content": "SYS " + "alpha " * 300 + "SYS-END"}, {"role": "user", "content": "Q?"}]
    (p,) = build_prompts([Record("EM", msgs, "", GroundTruth(["x"], "x"))], tok, 120, overflow="truncate_middle")
    text = tok.decode(p.input_ids)
    assert text.startswith("<|im_start|>system\nSYS alpha") and "alpha SYS-END<|im_end|>" in text
    assert text.endswith("<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n") and len(p.input_ids) <= 120
    cjk = Record("EM", [{"role": "user", "content": "BEGIN " + "漢字テキスト" * 200 + " END"}], "",
                 GroundTruth(["x"], "x"))
    for limit in range(90, 100):  # cut points inside multi-byte characters, at both ends of the cut
        (p,) = build_prompts([cjk], tok, limit, overflow="truncate_middle")
        text = tok.decode(p.input_ids)
        assert "\ufffd" not in text and text.startswith("<|im_start|>user\nBEGIN ") and \
            text.endswith("END<|im_end|>\n<|im_start|>assistant\n") and len(p.input_ids) <= limit, limit
    assert build_prompts([rec], tok, 5, overflow="truncate_middle") == []  # the template alone is over the limit


def test_build_prompts_reports_progress_on_long_work(tok, caplog):
    """Tokenizing a long-context dataset takes minutes before the first step: it says how far it got (it was
    silent until done)."""
    recs = generate(3, 20, seed=2)
    log = logging.getLogger("golong.data.prompts")
    log.addHandler(caplog.handler)  # "golong" may not propagate to the root logger
    try:
        with caplog.at_level(logging.INFO, logger="golong.data.prompts"):
            build_prompts(recs, tok, 400)  # quick: no progress lines at the default interval
            assert "tokenized" not in caplog.text
            build_prompts(recs, tok, 400, progress_every_s=0)
    finally:
        log.removeHandler(caplog.handler)
    # once each (a record can reach the handler twice: directly and through the root logger)
    lines = dict.fromkeys(r.getMessage().split(" (")[0] for r in caplog.records if "tokenized" in r.getMessage())
    assert list(lines) == [f"build_prompts: {i}/3 records tokenized" for i in (1, 2, 3)]


def test_prompt_cache_round_trip_and_key(tok, tmp_path):
    import numpy as np

    from golong.data.prompts import load_prompts, prompt_cache_key, save_prompts

    recs = generate(5, 20, seed=4) + generate(2, 900, seed=5)
    built = build_prompts(recs, tok, 400)  # the last two left-truncated, with a record index each
    key = prompt_cache_key(recs, tok, 400, "truncate_left")
    assert load_prompts(tmp_path / key, recs) is None  # nothing there yet
    save_prompts(built, tmp_path / key)
    assert sorted(x.name for x in tmp_path.iterdir()) == [key]  # no temporary directory left
    got = load_prompts(tmp_path / key, recs)
    assert [(p.input_ids.tolist(), p.index, p.truncated, p.record) for p in got] == \
        [(p.input_ids.tolist(), p.index, p.truncated, p.record) for p in built]
    assert sum(p.truncated for p in got) == 2
    assert load_prompts(tmp_path / key, recs[:6]) is None  # a cache of records past the ones given: none
    assert all(isinstance(p.input_ids, np.memmap) and p.input_ids.dtype == np.int32 for p in got)  # shared, mapped
    # the same inputs name the same cache; any change of what build_prompts reads names another
    assert prompt_cache_key(generate(5, 20, seed=4) + generate(2, 900, seed=5), tok, 400, "truncate_left") == key
    changed = [r for r in recs]
    changed[3] = generate(1, 20, seed=99)[0]
    others = [prompt_cache_key(changed, tok, 400, "truncate_left"), prompt_cache_key(recs, tok, 401, "truncate_left"),
              prompt_cache_key(recs, tok, 400, "drop"), prompt_cache_key(recs[:-1], tok, 400, "truncate_left"),
              prompt_cache_key(recs, build_demo_tokenizer(vocab_size=600), 400, "truncate_left")]
    assert len({key, *others}) == 6
    # what else the template and the truncation read: the special tokens' names, decode's clean-up
    other = build_demo_tokenizer()
    assert prompt_cache_key(recs, other, 400, "truncate_left") == key
    other.clean_up_tokenization_spaces = not other.clean_up_tokenization_spaces
    assert prompt_cache_key(recs, other, 400, "truncate_left") != key
    other = build_demo_tokenizer()
    other.bos_token = other.eos_token
    assert prompt_cache_key(recs, other, 400, "truncate_left") != key
    # a damaged cache reads as none
    ids = tmp_path / key / "ids.npy"
    ids.write_bytes(ids.read_bytes()[:-8])
    assert load_prompts(tmp_path / key, recs) is None


def test_prompt_cache_writers_never_share_a_temporary_directory(tok, tmp_path):
    # the ranks of two nodes on a shared file system may have the same pid: a writer must not take over another
    # one's half-written temporary directory (renaming it into place, or truncating its files under a reader)
    import os

    from golong.data.prompts import load_prompts, save_prompts

    recs = generate(3, 20, seed=4)
    built = build_prompts(recs, tok, 400)
    where = tmp_path / "train-key"
    other = tmp_path / f"{where.name}.tmp-{os.getpid()}"  # another node's writer, part way through
    other.mkdir()
    (other / "ids.npy").write_bytes(b"partial")
    save_prompts(built, where)
    assert (other / "ids.npy").read_bytes() == b"partial"  # left alone
    assert sorted(p.name for p in where.iterdir()) == ["ids.npy", "meta.npy"]
    assert [p.input_ids.tolist() for p in load_prompts(where, recs)] == [p.input_ids.tolist() for p in built]


def test_a_killed_prompt_cache_writers_directory_is_removed_and_a_live_ones_kept(tok, tmp_path):
    import os
    import time

    from golong.data.prompts import STALE_WRITE_S, remove_stale_writes, save_prompts

    where = tmp_path / "train-key"
    dead, live = tmp_path / f"{where.name}.tmp-dead", tmp_path / f"{where.name}.tmp-live"
    for d in (dead, live):
        d.mkdir()
        (d / "ids.npy").write_bytes(b"partial")
    old = time.time() - STALE_WRITE_S - 60
    for p in (dead / "ids.npy", dead):
        os.utime(p, (old, old))
    os.utime(live, (old, old))  # a live writer's directory is old, its file is being written now
    other = tmp_path / "val-key.tmp-dead"  # another split's cache: not this one's to judge
    other.mkdir()
    os.utime(other, (old, old))
    assert remove_stale_writes(where) == 1
    assert not dead.exists() and (live / "ids.npy").read_bytes() == b"partial" and other.exists()
    assert remove_stale_writes(where) == 0
    save_prompts(build_prompts(generate(2, 20, seed=4), tok, 400), where)  # unaffected by the leftovers
    assert sorted(p.name for p in where.iterdir()) == ["ids.npy", "meta.npy"]


def test_a_tokenizer_without_a_serialised_form_gets_no_cache(tok, tmp_path):
    # no key (a slow tokenizer): build, never write or read a shared "train-None" that other data would hit
    from golong.data.prompts import build_prompts_cached, prompt_cache_key

    class Slow:  # the demo tokenizer without its backend_tokenizer, as a slow one is
        def __getattr__(self, name):
            if name == "backend_tokenizer":
                raise AttributeError(name)
            return getattr(tok, name)

        def __call__(self, *args, **kwargs):
            return tok(*args, **kwargs)

    recs = generate(3, 20, seed=4)
    assert prompt_cache_key(recs, Slow(), 400, "truncate_left") is None
    got = build_prompts_cached(recs, Slow(), 400, "truncate_left", tmp_path, "train")
    assert [p.input_ids.tolist() for p in got] == [p.input_ids.tolist() for p in build_prompts(recs, tok, 400)]
    assert list(tmp_path.iterdir()) == []


def _shared_build(rank: int, world: int, cache: str, out: str, case: str) -> None:
    from pathlib import Path

    import numpy as np
    import torch

    import golong.data.prompts as P

    recs = generate(6, 40, seed=7)
    calls, real = [], P.build_prompts

    def counted(*args, **kwargs):
        calls.append(rank)
        if rank == 0 and case == "slow":  # still busy when the others have given up waiting
            deadline = time.monotonic() + 60
            while not all(Path(f"{out}.gave_up.{r}").exists() for r in range(1, world)):
                assert time.monotonic() < deadline, "the other ranks never gave up waiting"
                time.sleep(0.05)
        elif rank == 0:
            time.sleep(1.0)  # the node's other ranks start first: they must wait for it, not tokenize themselves
        return real(*args, **kwargs)

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    P.build_prompts = counted
    if case == "fail_write":
        P.save_prompts = full_disk
    result, tok = {}, build_demo_tokenizer()
    for call in range(2):  # the same split twice: the second reads the cache the first wrote, on every rank
        t0 = time.monotonic()
        try:
            got = P.build_prompts_shared(recs, tok, 400, "truncate_left", Path(cache), "train",
                                         wait_s=1.0 if case == "slow" and rank > 0 else 60.0)
        except RuntimeError as e:
            result["error"] = str(e)
            Path(f"{out}.gave_up.{rank}").touch()
            break
        result[call] = {"elapsed": time.monotonic() - t0, "ids": [p.input_ids.tolist() for p in got],
                        "mapped": isinstance(got[0].input_ids, np.memmap)}
    result["calls"] = calls
    torch.save(result, f"{out}.{rank}")


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["writes", "fail_write", "slow"])
def test_a_first_start_tokenizes_once_per_node(tmp_path, case):
    """Three ranks of one node, no cache yet: local rank 0 tokenizes and writes the cache while the others wait, then
    map it (they tokenized everything themselves before: 8 ranks of a node each tokenizing the whole dataset at once);
    its signal ends their wait at once (not their 60 s limit). Where its write fails, they tokenize for themselves;
    where it takes longer than they wait, they stop with a clear error (tokenizing late would leave them behind at
    the next collective, past its timeout)."""
    import torch

    from tests.distributed import run_distributed

    run_distributed(_shared_build, 3, str(tmp_path / "cache"), str(tmp_path / "out"), case)
    ranks = [torch.load(tmp_path / f"out.{r}") for r in range(3)]
    first = ranks[0][0]
    if case == "slow":
        assert ranks[0]["calls"] == [0] and first["ids"] and ranks[0][1]["ids"] == first["ids"]
        assert all("this node's local rank 0 has not built them in 1 s" in r["error"] for r in ranks[1:])
        assert [r["calls"] for r in ranks[1:]] == [[], []]
        return
    for r in ranks:
        assert r[0]["ids"] == r[1]["ids"] == first["ids"] and first["ids"]
        assert r[0]["elapsed"] < 30 and r[1]["elapsed"] < 30  # woken by rank 0's signal, not by the 60 s limit
    if case == "fail_write":  # nothing cached: every rank tokenizes each time
        assert [r["calls"] for r in ranks] == [[0, 0], [1, 1], [2, 2]] and not any(r[1]["mapped"] for r in ranks)
    else:
        assert [r["calls"] for r in ranks] == [[0], [], []] and all(r[c]["mapped"] for r in ranks[1:] for c in (0, 1))


def test_prompt_cache_key_tells_message_boundaries_from_content(tok):
    # JSON text may hold any character: one turn whose content holds the key's separators is not two turns
    import dataclasses

    from golong.data.prompts import prompt_cache_key

    (rec,) = generate(1, 20, seed=4)
    one = dataclasses.replace(rec, prompt=[{"role": "user", "content": "a\x00user\x01b"}])
    two = dataclasses.replace(rec, prompt=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert prompt_cache_key([one], tok, 400, "drop") != prompt_cache_key([two], tok, 400, "drop")
    # nor is a lone surrogate (JSON "\ud800") a "?"
    odd = [dataclasses.replace(rec, prompt=[{"role": "user", "content": c}]) for c in ("\ud800", "?")]
    assert prompt_cache_key(odd[:1], tok, 400, "drop") != prompt_cache_key(odd[1:], tok, 400, "drop")
    # nor one message's role another's: the chat template renders them differently
    roles = [dataclasses.replace(rec, prompt=[{"role": r, "content": "be brief"}, {"role": "user", "content": "q"}])
             for r in ("system", "user")]
    assert prompt_cache_key(roles[:1], tok, 400, "drop") != prompt_cache_key(roles[1:], tok, 400, "drop")


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
    # the saved order (shuffled or not, and its seed) wins over the new sampler's own settings
    plain = PromptSampler(10, shuffle=False)
    plain.take(4)
    r = PromptSampler(10, seed=5, shuffle=True)
    r.load_state_dict(plain.state_dict())
    assert r.take(8) == [4, 5, 6, 7, 8, 9, 0, 1]


# ------------------------------------------------------------------ synthetic tasks


def test_synthetic_all_tasks_scored_by_rewards():
    recs = generate(27, 60, seed=4)
    assert [r.ability for r in recs[:9]] == list(TASKS)
    for r in recs:
        assert r.data_source == "synthetic" and r.extra_info["reward_mode"] == r.ability
        if r.ability == "summarization":  # GoLongRL's Summary scores the whole response: the think tags
            assert 0.9 < score_record(r, reference_response(r), timeout=30.0) < 1.0  # are predicted words
        else:
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


_NAME = r"([a-z]+-[a-z]+)"


def _solve_from_prompt(task: str, content: str) -> tuple[list[str], str]:
    """The gold (doc_ids, golden_label) of a synthetic record, worked out from its prompt text alone."""
    context, question = content.split("\n\nQuestion: ", 1)
    if task == "precise_retrieval":
        codes = dict(re.findall(rf"The code of {_NAME} is (\d+)\.", context))
        code = codes[re.search(rf"code of {_NAME}\?", question)[1]]
        return [code], code
    if task == "comprehension":
        city = dict(re.findall(rf"{_NAME} lives in (\w+)\.", context))[re.search(rf"does {_NAME} live", question)[1]]
        letter = {c: x for x, c in re.findall(r"\(([ABCD])\) (\w+)", question)}[city]
        return [letter], letter
    if task == "exhaustive_retrieval":
        team = re.search(r"member of the (\w+) team", question)[1]
        members = [n for n, c in re.findall(rf"{_NAME} belongs to the (\w+) team\.", context) if c == team]
        return members, "\n".join(members)
    if task == "numerical_reasoning":
        coins = {n: int(c) for n, c in re.findall(rf"{_NAME} holds (\d+) coins\.", context)}
        a, b = re.search(rf"do {_NAME} and {_NAME} hold", question).groups()
        return [str(coins[a] + coins[b])], str(coins[a] + coins[b])
    if task == "structured_extraction":
        city = re.search(r"city is (\w+) as rows", question)[1]
        rows = [[n, int(a)] for n, c, a in re.findall(rf"Record: name={_NAME}; city=(\w+); age=(\d+)\.", context)
                if c == city]
        return [], json.dumps({"data": rows})
    if task == "structured_matching":
        who = re.search(rf"does {_NAME} own", question)[1]
        tools = [t for n, t in re.findall(rf"{_NAME} owns a (\w+)\.", context) if n == who]
        return tools, "\n".join(tools)
    if task == "graded_ranking":
        scored = [(int(s), n) for n, s in re.findall(rf"{_NAME} scored (\d+) points\.", context)]
        ranked = [n for _, n in sorted(scored, reverse=True)]
        return ranked, "\n".join(ranked)
    if task == "sequence_ordering":
        dated = [(int(y), n) for y, n in re.findall(rf"In (\d{{4}}), {_NAME} ", context)]
        ordered = [n for _, n in sorted(dated)]
        return ordered, "\n".join(ordered)
    assert task == "summarization"
    summary = " ".join(f[0].upper() + f[1:] + "." for f in re.findall(r"Key fact: ([^.]+)\.", context))
    return [summary], summary


def test_synthetic_gold_follows_from_prompt_facts():
    """Every task's gold answer, recomputed from the facts and question in the prompt (not from the
    generator): a wrong sum, letter, sort direction, filter or fact order in a builder fails here."""
    for r in generate(45, 40, seed=11):
        gt = r.ground_truth
        doc_ids, label = _solve_from_prompt(r.ability, r.prompt[0]["content"])
        assert (gt.doc_ids, gt.golden_label) == (doc_ids, label), r.ability
        if r.ability == "numerical_reasoning":
            assert r.extra_info["answer"] == f"\\boxed{{{label}}}"
        elif r.ability == "comprehension":
            assert r.extra_info["answer"] == f"The correct answer is ({label})"
        elif r.ability == "structured_extraction":
            assert r.extra_info["answer"] == f"<answer>{label}</answer>" and json.loads(label)["data"]
        elif r.ability in MARKED_TASKS:  # GoLongRL's LongBench-Pro reward reads the lines after [Answer]
            assert r.extra_info["answer"] == f"[Answer]\n{label}" and label
        else:
            assert r.extra_info["answer"] == label and label
        if r.ability == "summarization":
            assert gt.summary == label
    # record i depends on (seed, i): two records of one task in one call differ
    recs = generate(18, 40, seed=11)
    assert all(recs[i].prompt != recs[i + 9].prompt for i in range(9))


def test_synthetic_context_length_and_determinism(tmp_path):
    for L in (0, 500, 3000):
        r = generate(1, L, seed=9, tasks=["summarization"])[0]
        words = len(r.prompt[0]["content"].split())
        assert L <= words <= L + 80
        # the filler alone (the context without its three key-fact needles) is exactly L words
        context = r.prompt[0]["content"].split("\n\n")[1] if L else ""
        assert len(re.sub(r"Key fact: [^.]+\.", "", context).split()) == L
    assert [r.to_dict() for r in generate(9, 100, seed=1)] == [r.to_dict() for r in generate(9, 100, seed=1)]
    assert generate(9, 100, seed=1)[0].to_dict() != generate(9, 100, seed=2)[0].to_dict()
    p = write_dataset(tmp_path / "s.parquet", 18, 50, seed=0, tasks=["graded_ranking", "comprehension"])
    back = load_records(p)
    assert len(back) == 18 and {r.ability for r in back} == {"graded_ranking", "comprehension"}
    with pytest.raises(ValueError, match="unknown synthetic task"):
        generate(1, 10, tasks=["poetry"])


def test_data_synth_prints_the_records_per_task(tmp_path, capsys):
    """`golong data synth` printed only the output path; now the count per task (and the path, last)."""
    from golong.cli import main

    out = tmp_path / "s.jsonl"
    assert main(["data", "synth", "--out", str(out), "--n", "5", "--tasks", "graded_ranking,comprehension"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == str(out) and "golong data synth: 5 records" in lines[0]
    rows = [re.split(r"\s*│\s*", line.strip("│ ")) for line in lines if line.startswith("│")]
    assert rows == [["comprehension", "choice", "2"], ["graded_ranking", "ndcg", "3"], ["all", "", "5"]]


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
    mixed = a.convert_ids_to_tokens(a("page12 x7y Q2024:", add_special_tokens=False)["input_ids"])
    assert [t for t in mixed if any(c.isdigit() for c in t)] == list("1272024"), mixed  # also next to letters
    weird = "naïve 漢字 \x00 tab\tend 🎉"
    assert a.decode(a(weird, add_special_tokens=False)["input_ids"]) == weird  # byte-level round trip


def test_data_check_reports_what_training_would_see_per_task(tmp_path, capsys):
    """`golong data check CONFIG`: per (split, task) the records, the prompts kept / truncated / dropped at
    data.max_prompt_tokens and the kept prompts' lengths, counted here independently from the chat template;
    a task with every record over the limit is warned about; no training prompt at all, or a bad record (named by
    file and line), stops it."""
    from golong.build import load_tokenizer
    from golong.cli import main
    from golong.config import load_config
    from golong.data.check import check_data

    data = tmp_path / "train.jsonl"
    write_dataset(data, 24, 200, seed=1, tasks=["summarization", "graded_ranking"])
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {scratch: {vocab_size: 1024, hidden_size: 32, num_hidden_layers: 1, "
                        "num_attention_heads: 2, num_key_value_heads: 1, head_dim: 16, intermediate_size: 32}}\n"
                        f"data: {{train_files: [{data}], synthetic_val_n: 4, synthetic_context_tokens: 4, "
                        "synthetic_tasks: [sequence_ordering]}\n"
                        f"logging: {{run_dir: {tmp_path / 'run'}}}\n")  # its prompt cache: not in the repository
    records = load_records(data)
    tok = load_tokenizer(load_config(cfg_file))
    lengths = {}
    for r in records:
        text = tok.apply_chat_template(r.prompt, tokenize=False, add_generation_prompt=True)
        lengths.setdefault(r.task, []).append(len(tok(text, add_special_tokens=False)["input_ids"]))
    limit = sorted(lengths["summarization"])[len(lengths["summarization"]) // 2]  # about half of them over
    assert max(lengths["graded_ranking"]) > limit
    for overflow in ("drop", "truncate_left", "truncate_middle"):
        cfg = load_config(cfg_file, [f"data.max_prompt_tokens={limit}", f"data.overflow={overflow}"])
        rows = {(r["split"], r["task"]): r for r in check_data(cfg)}
        assert set(rows) == {("train", "summarization"), ("train", "graded_ranking"), ("val", "sequence_ordering")}
        for task, lens in lengths.items():
            row, over = rows[("train", task)], sum(n > limit for n in lens)
            assert (row["records"], row["metric"]) == (len(lens), {"summarization": "rouge_l",
                                                                   "graded_ranking": "ndcg"}[task])
            if overflow == "drop":
                under = sorted(n for n in lens if n <= limit)
                assert (row["kept"], row["truncated"], row["dropped"]) == (len(under), 0, over)
                assert (row["tokens_min"], row["tokens_max"]) == ((under[0], under[-1]) if under else (None, None))
            else:
                assert (row["kept"], row["truncated"], row["dropped"]) == (len(lens), over, 0)
                assert row["tokens_max"] <= limit
        assert rows[("val", "sequence_ordering")]["records"] == 4
    out = capsys.readouterr().out
    assert "graded_ranking" in out and "rouge_l" in out

    # through the command: the warning for a task with no prompt left, then a bad record named by file and line
    assert main(["data", "check", str(cfg_file), f"data.max_prompt_tokens={min(lengths['summarization'])}",
                 "data.overflow=drop"]) == 0
    out = capsys.readouterr().out
    assert "every train record of task 'graded_ranking' is over data.max_prompt_tokens" in out
    no_lengths = r"graded_ranking +│ +ndcg +│ +\d+ +│ +0 +│ +0 +│ +\d+ +│ +- +│ +- +│ +- +│"  # no prompt: "-", not 0
    assert re.search(no_lengths, out), out
    # no training prompt at all: the start-up error training would stop with, and a failing status
    assert main(["data", "check", str(cfg_file), "data.max_prompt_tokens=5", "data.overflow=drop"]) == 2
    assert capsys.readouterr().err.strip() == ("golong: error: none of the 24 training records fits "
                                               "data.max_prompt_tokens=5 (data.overflow=drop); raise "
                                               "data.max_prompt_tokens")
    lines = data.read_text().splitlines()
    lines[4] = lines[4].replace('"prompt"', '"prompts"')
    data.write_text("\n".join(lines) + "\n")
    assert main(["data", "check", str(cfg_file)]) == 2
    assert re.search(r"golong: error: .*train.jsonl: line 5: .*prompt", capsys.readouterr().err)


def test_data_check_of_a_directory_says_a_data_file_is_expected(tmp_path, capsys):
    """A directory in data.train_files was "dataset file not found" although it exists."""
    from golong.cli import main

    data = tmp_path / "shards"
    write_dataset(data / "part-0.jsonl", 2, 10)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {scratch: {vocab_size: 1024}}\n"
                        f"data: {{train_files: [{data}], synthetic_val_n: 0}}\n"
                        f"logging: {{run_dir: {tmp_path / 'run'}}}\n")
    assert main(["data", "check", str(cfg_file)]) == 2
    assert capsys.readouterr().err == (f"golong: error: {data}: is a directory; a data file (.parquet / .jsonl / "
                                       ".json) is expected: list its files\n")


def test_an_unreadable_prompt_cache_is_replaced_and_only_a_real_write_is_logged(tok, tmp_path, caplog):
    """A cache directory whose file was cut (a crash before the page cache reached the disk) read as none, and the
    rebuilt prompts' rename over it failed silently: every later start tokenized again, each logging "written"."""
    import logging

    from golong.data.prompts import build_prompts_cached, load_prompts, prompt_cache_key, save_prompts

    recs = generate(4, 20, seed=5)
    key = prompt_cache_key(recs, tok, 400, "truncate_left")
    where = tmp_path / f"train-{key}"
    built = build_prompts_cached(recs, tok, 400, "truncate_left", tmp_path, "train")
    ids = where / "ids.npy"
    ids.write_bytes(ids.read_bytes()[:-8])
    assert load_prompts(where, recs) is None
    with caplog.at_level(logging.INFO, logger="golong"):
        logging.getLogger("golong").addHandler(caplog.handler)
        try:
            again = build_prompts_cached(recs, tok, 400, "truncate_left", tmp_path, "train")
        finally:
            logging.getLogger("golong").removeHandler(caplog.handler)
    assert f"the prompt cache {where} was unreadable; it is rebuilt" in caplog.text
    assert f"written to the prompt cache {where}" in caplog.text
    assert [p.input_ids.tolist() for p in load_prompts(where, recs)] == [p.input_ids.tolist() for p in built] == \
           [p.input_ids.tolist() for p in again]
    assert save_prompts(built, where) is False  # a copy in place already: nothing written, and it says so


def test_a_prompt_no_tokenizer_takes_is_refused_with_its_file_and_line(tmp_path):
    """A lone UTF-16 surrogate ("\\ud800" in JSON, which json.loads lets through) or a conversation without a user
    turn (Qwen3's template raises "No user query found") passed validation and ended the tokenizing in a traceback
    naming no record."""
    path = tmp_path / "bad.jsonl"
    good = {"data_source": "EM", "prompt": [{"role": "user", "content": "q"}],
            "reward_model": {"ground_truth": "x"}}
    lines = [json.dumps(good), '{"data_source": "EM", "prompt": [{"role": "user", "content": "abc \\ud800 def"}], '
                               '"reward_model": {"ground_truth": "x"}}']
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError, match=rf"^{path}: line 2: prompt\[0\]\.content holds '\\ud800' at character 4, "
                                          r"which is not text \(a lone UTF-16 surrogate\)"):
        load_records(path)
    no_user = dict(good, prompt=[{"role": "system", "content": "be brief"}])
    path.write_text(json.dumps(good) + "\n" + json.dumps(no_user) + "\n")
    with pytest.raises(RecordError, match=rf"^{path}: line 2: prompt has no user message"):
        load_records(path)
