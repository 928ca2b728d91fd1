"""golong eval-compare: the paired comparison of two evals' responses.jsonl, checked against sums written out here."""

from __future__ import annotations

import json
import math
import random

import pytest

from golong.data.records import RecordError
from golong.eval_compare import compare, read_scores
from golong.rewards.pass_at_k import sample_metrics


def _write(path, prompts: dict[tuple[str, int], list[float]], text: str = "", sha: bool = True) -> None:
    """responses.jsonl rows as golong eval writes them (the fields compare reads, and others it ignores); `text`
    changes every prompt's hash, sha=False leaves it out (files of golong before it)."""
    rows = [{"prompt": i, "record": rec, "sample": j, "prompt_tokens": 100 + rec,
             **({"prompt_sha1": f"{text}{task}{rec}"} if sha else {}), "truncated": False,
             "data_source": f"src_{task}", "task": task, "score": s, "finish_reason": "stop", "response": "..."}
            for i, ((task, rec), scores) in enumerate(prompts.items()) for j, s in enumerate(scores)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compare_is_the_paired_difference_of_prompt_means(tmp_path):
    # A: 2 responses a prompt, B: 3 (each prompt's mean is compared, its third response included); B's rows in
    # another order
    a = {("em", 0): [0.0, 1.0], ("em", 1): [1.0, 1.0], ("em", 2): [0.0, 0.0], ("f1", 5): [0.2, 0.4]}
    b = {("f1", 5): [0.3, 0.3, 0.3], ("em", 2): [0.0, 0.5, 1.0], ("em", 1): [1.0, 1.0, 1.0], ("em", 0): [0.0, 0.0, 0.0]}
    _write(tmp_path / "a.jsonl", a)
    (tmp_path / "b").mkdir()
    _write(tmp_path / "b" / "responses.jsonl", b)
    got = compare(read_scores(tmp_path / "a.jsonl"), read_scores(tmp_path / "b"))
    # em: prompt means A 0.5, 1, 0 and B 0, 1, 0.5: d = -0.5, 0, +0.5
    em = got["tasks"]["em"]
    assert (em["prompts"], em["b_higher"], em["equal"], em["b_lower"]) == (3, 1, 1, 1)
    assert em["reward_a"] == pytest.approx(0.5) and em["reward_b"] == pytest.approx(0.5)
    assert em["diff"] == pytest.approx(0.0, abs=1e-15)
    assert em["diff_stderr"] == pytest.approx(math.sqrt((0.25 + 0 + 0.25) / 2) / math.sqrt(3))
    # f1: one prompt, d = 0.3 - 0.3 = 0 up to rounding (-6e-17): equal, no standard error
    f1 = got["tasks"]["f1"]
    assert f1["prompts"] == 1 and f1["diff"] == pytest.approx(0.0, abs=1e-15) and f1["diff_stderr"] is None
    assert (f1["b_higher"], f1["equal"], f1["b_lower"]) == (0, 1, 0)
    # overall: the four prompts' d = -0.5, 0, 0.5, ~0
    d = [-0.5, 0.0, 0.5, 0.0]
    assert got["prompts"] == 4 and got["diff"] == pytest.approx(0.0, abs=1e-15)
    assert got["diff_stderr"] == pytest.approx(math.sqrt(sum(x * x for x in d) / 3) / 2)
    assert got["reward_a"] == pytest.approx((0.5 + 1 + 0 + 0.3) / 4)


def test_pairing_removes_the_noise_the_two_evals_share(tmp_path):
    """Prompts of very different difficulty, B a little better on each: each eval's own stderr (over prompts) is
    large, the paired one small, so the improvement shows."""
    rng = random.Random(3)
    difficulty = [rng.random() for _ in range(200)]
    a = {("em", i): [min(1.0, max(0.0, p + rng.gauss(0, 0.02))) for _ in range(4)] for i, p in enumerate(difficulty)}
    b = {k: [min(1.0, s + 0.05) for s in v] for k, v in a.items()}
    _write(tmp_path / "a.jsonl", a)
    _write(tmp_path / "b.jsonl", b)
    got = compare(read_scores(tmp_path / "a.jsonl"), read_scores(tmp_path / "b.jsonl"))
    own = sample_metrics(list(a.values()))["reward_stderr"]
    assert own > 0.015 and got["diff_stderr"] < own / 5
    assert 0.03 < got["diff"] < 0.05 and got["diff"] > 3 * got["diff_stderr"]
    assert got["b_lower"] == 0 and got["b_higher"] > 150


def test_different_prompts_or_bad_rows_are_named(tmp_path):
    _write(tmp_path / "a.jsonl", {("em", 0): [1.0], ("em", 1): [0.0]})
    _write(tmp_path / "b.jsonl", {("em", 0): [1.0], ("em", 7): [0.0], ("em", 8): [0.0]})
    with pytest.raises(RecordError, match=r"hold different prompts \(1 only in the first, 2 only in the second; the "
                                          r"first such: task em, data_source src_em, record 1\)"):
        compare(read_scores(tmp_path / "a.jsonl"), read_scores(tmp_path / "b.jsonl"))
    # B holds A's prompts and more: also different sets
    _write(tmp_path / "c.jsonl", {("em", 0): [1.0], ("em", 1): [0.0], ("em", 2): [0.0]})
    with pytest.raises(RecordError, match=r"\(0 only in the first, 1 only in the second; the first such: task em, "
                                          r"data_source src_em, record 2\)"):
        compare(read_scores(tmp_path / "a.jsonl"), read_scores(tmp_path / "c.jsonl"))
    # the same records, other prompt texts (another seed, context length, template): by the hash, or by the token
    # count in files without one
    _write(tmp_path / "d.jsonl", {("em", 0): [1.0], ("em", 1): [0.0]}, text="other")
    with pytest.raises(RecordError, match=r"name the same records but 2 of their 2 prompts differ \(the first: task "
                                          r"em, data_source src_em, record 0; its prompt_sha1, prompt_tokens, "
                                          r"truncated: \('em0', 100, False\) vs \('otherem0', 100, False\)\)"):
        compare(read_scores(tmp_path / "a.jsonl"), read_scores(tmp_path / "d.jsonl"))
    _write(tmp_path / "old.jsonl", {("em", 0): [1.0], ("em", 1): [0.0]}, sha=False)
    assert compare(read_scores(tmp_path / "old.jsonl"), read_scores(tmp_path / "a.jsonl"))["prompts"] == 2
    rows = [json.loads(line) for line in (tmp_path / "old.jsonl").open()]
    rows[1]["prompt_tokens"] = 5
    (tmp_path / "old.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match=r"1 of their 2 prompts differ .* \(None, 5, False\) vs \('em1', 101, "):
        compare(read_scores(tmp_path / "old.jsonl"), read_scores(tmp_path / "a.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "em", "data_source": "s", "record": 0, "score": 1.0}\n\n{"task": "em", "record": 1}\n')
    with pytest.raises(RecordError, match=r"bad.jsonl:3: not a golong eval response \(KeyError"):
        read_scores(bad)
    bad.write_text('{"task": "em", "data_source": "s", "record": 0, "score": NaN}\n')
    with pytest.raises(RecordError, match=r"bad.jsonl:1: score nan is not a finite number"):
        read_scores(bad)
    for score, record in (('"0.5"', "0"), ("true", "0"), ("1.0", "[1]")):
        bad.write_text(f'{{"task": "em", "data_source": "s", "record": {record}, "score": {score}}}\n')
        with pytest.raises(RecordError, match=r"bad.jsonl:1: not a golong eval response \(TypeError"):
            read_scores(bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_scores(tmp_path / "missing")


def test_other_settings_and_an_eval_under_way_are_warned_of(tmp_path):
    for name, temperature in (("a", 0.6), ("b", 1.0)):
        (tmp_path / name).mkdir()
        _write(tmp_path / name / "responses.jsonl", {("em", 0): [1.0], ("em", 1): [0.0]})
        (tmp_path / name / "eval.json").write_text(json.dumps({"checkpoint": f"ckpt/{name}", "temperature": temperature,
                                                               "top_p": 0.95, "responses_per_prompt": 1}))
    (tmp_path / "b" / "eval.partial.jsonl").write_text("{}\n")
    got = compare(read_scores(tmp_path / "a"), read_scores(tmp_path / "b"))
    assert (got["a_label"], got["b_label"]) == ("ckpt/a", "ckpt/b")
    assert got["warnings"] == [f"{tmp_path / 'b'} also holds eval.partial.jsonl: an eval there is under way or was "
                               "stopped, and responses.jsonl is an earlier eval's",
                               "eval settings differ: temperature 0.6 (A) vs 1.0 (B)"]


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    from golong.cli import main

    _write(tmp_path / "a.jsonl", {("em", 0): [0.0], ("em", 1): [1.0]})
    _write(tmp_path / "b.jsonl", {("em", 0): [1.0], ("em", 1): [1.0]})
    assert main(["eval-compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--json",
                 str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert "+0.500 ± 0.500" in out and "1 / 1 / 0" in out
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["diff"] == 0.5 and saved["tasks"]["em"]["b_higher"] == 1
    assert saved["per_prompt"] == [{"task": "em", "data_source": "src_em", "record": 0, "a": 0.0, "b": 1.0},
                                   {"task": "em", "data_source": "src_em", "record": 1, "a": 1.0, "b": 1.0}]
    assert main(["eval-compare", str(tmp_path / "a.jsonl"), str(tmp_path / "nothing")]) == 2
    assert "no such file" in capsys.readouterr().err
