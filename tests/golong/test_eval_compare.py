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
    # an eval directory's eval.json names the eval too (was "not a golong eval response": eval.json's first line)
    (tmp_path / "b" / "eval.json").write_text(json.dumps({"reward_mean": 0.4}, indent=1))
    assert read_scores(tmp_path / "b" / "eval.json").scores == read_scores(tmp_path / "b").scores
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
    with pytest.raises(RecordError, match=r"hold different prompts \(1 only in the first, 2 only in the second, 1 in "
                                          r"both; the first such: task em, data_source src_em, record 1\).* or pass "
                                          r"--common to compare the prompts both hold$"):
        compare(read_scores(tmp_path / "a.jsonl"), read_scores(tmp_path / "b.jsonl"))
    # B holds A's prompts and more: also different sets
    _write(tmp_path / "c.jsonl", {("em", 0): [1.0], ("em", 1): [0.0], ("em", 2): [0.0]})
    with pytest.raises(RecordError, match=r"\(0 only in the first, 1 only in the second, 2 in both; the first such: "
                                          r"task em, data_source src_em, record 2\)"):
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
    """Settings that change the scores, where both eval.json files hold them: sampling, the response limit, the
    format gate, the reward function (its code's hash) and its keyword arguments, the judge model."""
    metrics = {"a": "em", "b": "compute_score() (golong: em)"}  # B scored by a reward function of the user's
    other = {"a": {"max_response_tokens": 64, "require_think": False, "reward_function": None, "reward_kwargs": {},
                   "judge": None},
             "b": {"max_response_tokens": 4, "require_think": True, "reward_function": "fn.py @ 0123456789ab",
                   "reward_kwargs": {"bonus": 0.5}, "judge": {"model": "deepseek-chat", "asked": 2}}}
    for name, temperature in (("a", 0.6), ("b", 1.0)):
        (tmp_path / name).mkdir()
        _write(tmp_path / name / "responses.jsonl", {("em", 0): [1.0], ("em", 1): [0.0]})
        (tmp_path / name / "eval.json").write_text(json.dumps({"checkpoint": f"ckpt/{name}", "temperature": temperature,
                                                               "top_p": 0.95, "responses_per_prompt": 1,
                                                               **other[name],
                                                               "tasks": {"em": {"metric": metrics[name]}}}))
    (tmp_path / "b" / "eval.partial.jsonl").write_text("{}\n")
    got = compare(read_scores(tmp_path / "a"), read_scores(tmp_path / "b"))
    assert (got["a_label"], got["b_label"]) == ("ckpt/a", "ckpt/b")
    assert got["warnings"] == [f"{tmp_path / 'b'} also holds eval.partial.jsonl: an eval there is under way or was "
                               "stopped, and responses.jsonl is an earlier eval's",
                               "eval settings differ: temperature 0.6 (A) vs 1.0 (B)",
                               "eval settings differ: max_response_tokens 64 (A) vs 4 (B)",
                               "eval settings differ: require_think False (A) vs True (B)",
                               "eval settings differ: reward_function None (A) vs fn.py @ 0123456789ab (B)",
                               "eval settings differ: reward_kwargs {} (A) vs {'bonus': 0.5} (B)",
                               "eval settings differ: judge None (A) vs deepseek-chat (B)",
                               "task em is scored differently: em (A) vs compute_score() (golong: em) (B)"]


def test_an_eval_json_of_another_shape_is_warned_of_and_its_settings_not_compared(tmp_path):
    """eval.json that is not JSON, or JSON of another shape than golong eval's (a list, null, a task row or judge
    that is no object): a warning, and the responses are compared without its settings (was a traceback)."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        _write(tmp_path / name / "responses.jsonl", {("em", 0): [1.0], ("em", 1): [0.0]})
    (tmp_path / "a" / "eval.json").write_text(json.dumps({"temperature": 0.6, "tasks": {"em": {"metric": "em"}}}))
    for text in ("[]", "null", '"x"', '{"tasks": {"em": null}}', '{"temperature": 1.0, "judge": "deepseek-chat"}',
                 '{"by": [1]}', "{not json"):
        (tmp_path / "b" / "eval.json").write_text(text)
        b = read_scores(tmp_path / "b")
        assert b.info == {} and len(b.warnings) == 1, text
        assert b.warnings[0].startswith(f"{tmp_path / 'b' / 'eval.json'} is not "), text
        got = compare(read_scores(tmp_path / "a"), b, by=["prompt_tokens"])
        assert got["diff"] == 0 and got["warnings"] == b.warnings, text
        assert got["b_label"] == str(tmp_path / "b" / "responses.jsonl")


def test_common_compares_only_the_prompts_both_hold(tmp_path):
    """--common (evals at two context lengths with data.overflow=drop, say): the prompts both hold, by hand; the
    others counted in a warning. Prompts that differ in content are still refused, and so is nothing in common."""
    _write(tmp_path / "a.jsonl", {("em", 0): [1.0, 0.0], ("em", 1): [0.0, 0.0], ("em", 2): [1.0, 1.0]})
    _write(tmp_path / "b.jsonl", {("em", 1): [1.0, 1.0], ("em", 2): [0.0, 1.0], ("em", 9): [1.0, 1.0],
                                  ("f1", 3): [0.5, 0.5]})
    a, b = read_scores(tmp_path / "a.jsonl"), read_scores(tmp_path / "b.jsonl")
    got = compare(a, b, common=True)
    # records 1 and 2: d = 1 - 0 = 1 and 0.5 - 1 = -0.5
    assert (got["prompts"], got["reward_a"], got["reward_b"]) == (2, 0.5, 0.75)
    assert got["diff"] == pytest.approx(0.25) and got["diff_stderr"] == pytest.approx(0.75)
    assert list(got["tasks"]) == ["em"] and [p["record"] for p in got["per_prompt"]] == [1, 2]
    assert got["warnings"] == ["--common: 2 prompts both evals hold are compared; 1 only in A and 2 only in B are "
                               "left out"]
    _write(tmp_path / "c.jsonl", {("em", 1): [1.0], ("em", 2): [0.0]}, text="other")
    with pytest.raises(RecordError, match="name the same records but 2 of their 2 prompts differ"):
        compare(a, read_scores(tmp_path / "c.jsonl"), common=True)
    _write(tmp_path / "d.jsonl", {("em", 5): [1.0]})
    with pytest.raises(RecordError, match=r"\(3 only in the first, 1 only in the second, 0 in both; .*data.overflow$"):
        compare(a, read_scores(tmp_path / "d.jsonl"), common=True)
    with pytest.raises(RecordError, match=r"0 in both; .*data.overflow$"):  # no --common hint: it would not help
        compare(a, read_scores(tmp_path / "d.jsonl"))
    # with --by: a group whose prompts were all left out is named (record 0's "long", only in A; record 9's, in B)
    for name, labels in (("a", {("em", 0): "long", ("em", 1): "short", ("em", 2): "short"}),
                         ("b", {("em", 1): "short", ("em", 2): "short", ("em", 9): "mid", ("f1", 3): "short"})):
        _with_groups(tmp_path / f"{name}.jsonl", {k: {"length": v} for k, v in labels.items()}, {})
    got = compare(read_scores(tmp_path / "a.jsonl"), read_scores(tmp_path / "b.jsonl"), by=["length"], common=True)
    assert list(got["by"]["length"]) == ["short"] and got["by"]["length"]["short"]["prompts"] == 2
    assert got["warnings"][-1] == "--by length: no prompt both evals hold in group(s) long, mid"


def _with_groups(path, labels: dict[tuple[str, int], dict[str, str]], tokens: dict[tuple[str, int], int]) -> None:
    """Give an eval file's rows the groups golong eval --by writes and other prompt token counts."""
    rows = [json.loads(line) for line in path.open()]
    for row in rows:
        key = (row["task"], row["record"])
        row.update({"groups": labels[key]} if key in labels else {})
        row["prompt_tokens"] = tokens.get(key, row["prompt_tokens"])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_by_compares_each_group_of_prompts(tmp_path):
    """--by KEY: per group of prompts under a record key the rows carry (golong eval --by KEY), or prompt_tokens
    (bins of the rows' token counts), each group's paired numbers by hand, in breakdown's order (numbers by value,
    then text, then (none)); a prompt without a label, or labelled otherwise in the other eval, is named."""
    a = {("em", 0): [0.0], ("em", 1): [1.0], ("em", 2): [0.0], ("f1", 3): [0.5], ("f1", 4): [0.0]}
    b = {("em", 0): [1.0], ("em", 1): [1.0], ("em", 2): [0.5], ("f1", 3): [0.0], ("f1", 4): [0.0]}
    labels = {("em", 0): {"level": "10"}, ("em", 1): {"level": "2"}, ("em", 2): {"level": "10"},
              ("f1", 3): {"level": "(none)"}, ("f1", 4): {"level": "hard"}}
    tokens = {("em", 0): 4096, ("em", 1): 4095, ("em", 2): 3000_000, ("f1", 3): 9000}
    for name, scores in (("a", a), ("b", b)):
        _write(tmp_path / f"{name}.jsonl", scores)
        _with_groups(tmp_path / f"{name}.jsonl", labels, tokens)
    got = compare(read_scores(tmp_path / "a.jsonl"), read_scores(tmp_path / "b.jsonl"), by=["level", "prompt_tokens"])
    level = got["by"]["level"]
    assert list(level) == ["2", "10", "hard", "(none)"]  # numbers by value, then text, then (none)
    assert (level["10"]["prompts"], level["10"]["diff"], level["10"]["b_higher"]) == (2, 0.75, 2)
    assert level["10"]["diff_stderr"] == pytest.approx(0.25)  # d = 1, 0.5: std 0.354 / sqrt 2
    assert (level["2"]["diff"], level["2"]["equal"]) == (0, 1)
    assert (level["(none)"]["diff"], level["(none)"]["b_lower"]) == (-0.5, 1)
    # prompt_tokens: 4095 and record 4's 104 -> <4K; 4096 -> 4K-8K (lower edge in), 9000 -> 8K-16K, 3M -> >=1M
    bins = got["by"]["prompt_tokens"]
    assert list(bins) == ["<4K", "4K-8K", "8K-16K", ">=1M"] and [r["prompts"] for r in bins.values()] == [2, 1, 1, 1]
    assert bins["4K-8K"]["diff"] == 1.0 and bins[">=1M"]["diff"] == 0.5
    # the overall and per-task numbers do not change with --by
    assert {k: v for k, v in got.items() if k != "by"} == compare(read_scores(tmp_path / "a.jsonl"),
                                                                  read_scores(tmp_path / "b.jsonl"))
    # a key no row carries: the file, the prompt and what writes it
    with pytest.raises(RecordError, match=r"a.jsonl: task em, data_source src_em, record 0 has no group under "
                                          r"'domain' \(rows carry their records' extra_info keys holding numbers or "
                                          r"short text, and `golong eval --by domain` labels them with domain whatever "
                                          r"it holds, generating the responses again\); groups its rows hold: level, "
                                          r"prompt_tokens"):
        compare(read_scores(tmp_path / "a.jsonl"), read_scores(tmp_path / "b.jsonl"), by=["domain"])
    # B without the labels A has: B is named; an eval.json that reports the key is an eval from before the labels
    (tmp_path / "c").mkdir()
    _write(tmp_path / "c" / "responses.jsonl", b)
    _with_groups(tmp_path / "c" / "responses.jsonl", {}, tokens)
    (tmp_path / "c" / "eval.json").write_text(json.dumps({"by": {"level": {}}}))
    with pytest.raises(RecordError, match=r"c/responses.jsonl: task em, .* record 0 has no group under 'level' \(its "
                                          r"eval.json has by.level, but golong did not yet label the rows then"):
        compare(read_scores(tmp_path / "a.jsonl"), read_scores(tmp_path / "c"), by=["level"])
    (tmp_path / "c" / "eval.json").write_text("{}")  # rows of a golong before labels, without that hint
    with pytest.raises(RecordError, match=r"c/responses.jsonl: .* no group under 'level' \(its rows carry no record "
                                          r"labels: golong wrote them before rows carried labels"):
        compare(read_scores(tmp_path / "a.jsonl"), read_scores(tmp_path / "c"), by=["level"])
    # one prompt labelled otherwise in B: their records differ
    _with_groups(tmp_path / "b.jsonl", {("em", 1): {"level": "3"}}, {})
    with pytest.raises(RecordError, match=r"record 1 is in group '2' under 'level' in .*a.jsonl but '3' in"):
        compare(read_scores(tmp_path / "a.jsonl"), read_scores(tmp_path / "b.jsonl"), by=["level"])
    # a file of golong before prompt_tokens: no bins
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").open()]
    (tmp_path / "old.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "prompt_tokens"})
                                                + "\n" for r in rows))
    with pytest.raises(RecordError, match=r"old.jsonl: .* has no group under 'prompt_tokens' \(its rows hold no "
                                          r"prompt_tokens"):
        compare(read_scores(tmp_path / "old.jsonl"), read_scores(tmp_path / "a.jsonl"), by=["prompt_tokens"])
    # a prompt's rows must agree; groups must map keys to labels
    rows[1]["groups"] = {"level": "3"}
    rows.insert(2, {**rows[1], "sample": 1, "groups": {"level": "2"}})
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match=r"bad.jsonl:3: the groups of task em, data_source src_em, record 1 differ"):
        read_scores(tmp_path / "bad.jsonl")
    rows[2]["groups"] = {"level": 3}
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match=r"bad.jsonl:3: not a golong eval response \(TypeError: groups"):
        read_scores(tmp_path / "bad.jsonl")


def test_group_labels_and_their_order_are_one_rule():
    """eval.json's by.<key> (breakdown) and eval-compare's groups (read back as text) are labelled and ordered by
    one rule: str(value) (2, "2" and 2.0 one group: parquet reads a column mixing 2 and 0.5 as floats, so a whole
    float is labelled as the int; 2.5 stays 2.5), numbers by value (ties by text), then text (nan and inf are text),
    then (none) (a missing key, None, or the text "(none)")."""
    from types import SimpleNamespace

    from golong.eval_groups import breakdown, group_label, label_order

    values = ["hard", 10, "2", 2, 2.0, 0.5, True, None, [1, 2], "nan", float("inf"), "(none)", "-3"]
    prompts = [SimpleNamespace(input_ids=[0] * 5, record=SimpleNamespace(extra_info={"k": v})) for v in values]
    prompts.append(SimpleNamespace(input_ids=[0] * 5, record=SimpleNamespace(extra_info={})))
    rows = [{"prompt": i, "score": float(i % 2)} for i in range(len(prompts))]
    got = breakdown("k", prompts, rows, 1)
    assert list(got) == ["-3", "0.5", "2", "10", "True", "[1, 2]", "hard", "inf", "nan", "(none)"]
    assert got["2"]["prompts"] == 3 and got["(none)"]["prompts"] == 3
    assert list(got) == sorted(got, key=lambda x: label_order("k", x))  # what eval-compare sorts by
    assert [group_label(p, "k") for p in prompts[:3]] == ["hard", "10", "2"]


def test_response_rows_carry_the_short_record_keys_and_the_by_keys():
    """responses.jsonl's groups: every --by key (whatever its value holds) and, unasked, every extra_info key holding
    a number, a boolean or text up to 64 characters, so that eval-compare can group by those later."""
    from types import SimpleNamespace

    from golong.eval_groups import row_groups

    info = {"index": 3, "difficulty": "hard", "ratio": 0.5, "flag": True, "long": "x" * 65, "edge": "y" * 64,
            "nested": {"a": 1}, "none": None}
    prompt = SimpleNamespace(input_ids=[0] * 5, record=SimpleNamespace(extra_info=info))
    assert row_groups(prompt, ("nested", "prompt_tokens", "missing")) == {
        "nested": "{'a': 1}", "missing": "(none)", "index": "3", "difficulty": "hard", "ratio": "0.5", "flag": "True",
        "edge": "y" * 64}
    # keys other records hold short values under (short_keys): "(none)" where this one lacks them or holds null, as
    # --by labels it; a longer value there is not a label
    assert row_groups(prompt, (), known=("domain", "none", "long", "index")) == {
        "domain": "(none)", "none": "(none)", "index": "3", "difficulty": "hard", "ratio": "0.5", "flag": "True",
        "edge": "y" * 64}


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
    # --by and --common reach compare: a table per key, the prompts B lacks left out with a warning
    _write(tmp_path / "b.jsonl", {("em", 0): [1.0]})
    assert main(["eval-compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--by", "prompt_tokens",
                 "--common"]) == 0
    out = capsys.readouterr().out
    assert "B - A by prompt_tokens" in out and "<4K" in out and "1 only in A and 0 only in B are left out" in out
    assert main(["eval-compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) == 2
    assert "or pass --common" in capsys.readouterr().err
    # labels and task names are printed as text, not read as rich markup ("[/x]" raised MarkupError)
    _write(tmp_path / "b.jsonl", {("em", 0): [1.0], ("em", 1): [1.0]})
    for name in ("a", "b"):
        _with_groups(tmp_path / f"{name}.jsonl", {("em", 0): {"tag": "[/x]"}, ("em", 1): {"tag": "[bold]y"}}, {})
    assert main(["eval-compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--by", "[b]tag"]) == 2
    assert main(["eval-compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--by", "tag"]) == 0
    out = capsys.readouterr().out
    assert "[/x]" in out and "[bold]y" in out


def test_cli_json_onto_a_directory_is_one_line(tmp_path, capsys):
    # writing --json is the user's file: an OSError there (here: it names a directory) is one line and status 2
    from golong.cli import main

    _write(tmp_path / "a.jsonl", {("em", 0): [0.0]})
    _write(tmp_path / "b.jsonl", {("em", 0): [1.0]})
    (tmp_path / "out").mkdir()
    assert main(["eval-compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--json",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("golong: error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_eval_table_prints_names_from_the_data_as_text(tmp_path, capsys):
    """golong eval's table: a task name or --by label holding rich markup ("[/x]") is printed as it is (it raised
    MarkupError after eval.json was written)."""
    from golong.evaluate import _print_eval

    row = {"metric": "em", "responses": 2, "reward_mean": 0.5, "reward_stderr": None, "pass_at_k": {"1": 0.5},
           "best_of_n": None}
    result = {"checkpoint": str(tmp_path / "[ckpt]"), "model": None, "prompts": 2, "responses_per_prompt": 1,
              "temperature": 0.6, "top_p": 0.95, "reward_mean": 0.5, "reward_stderr": 0.5, "pass_at_k": {"1": 0.5},
              "best_of_n": None, "function_errors": None, "tasks": {"[/x]": row},
              "by": {"[b]key": {"[/y]": {**row, "prompts": 2}}}}
    _print_eval(result, tmp_path)
    out = capsys.readouterr().out
    assert "[/x]" in out and "[/y]" in out and "[b]key" in out and "[ckpt]" in out
    assert "mean of groups" not in out  # one group: its own mean
    # several groups: their unweighted mean (eval.json's by_mean) closes the table
    result["by"]["[b]key"]["z"] = {**row, "prompts": 1, "reward_mean": 0.125}
    result["by_mean"] = {"[b]key": 0.3125}
    _print_eval(result, tmp_path)
    out = capsys.readouterr().out
    assert "(mean of groups)" in out and "0.312" in out


def test_data_check_tables_print_task_names_as_text(capsys):
    """golong data check's tables: a task named like rich markup is printed as it is (it raised MarkupError)."""
    from pathlib import Path
    from types import SimpleNamespace

    from golong.config import load_config
    from golong.data.check import _print, _print_answers, print_task_counts

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo-cpu.yaml")
    row = {"split": "val", "task": "[/x]", "metric": "em", "records": 3, "kept": 3, "truncated": 0, "dropped": 0,
           "tokens_min": 5, "tokens_median": 6, "tokens_max": 7}
    _print([row], cfg)
    _print_answers([{"split": "val", "task": "[/y]", "records": 3, "scored": 3, "mean": 1.0, "below_1": 0}], cfg)
    print_task_counts([SimpleNamespace(task="[/z]", metric="em")], "records")
    out = capsys.readouterr().out
    assert "[/x]" in out and "[/y]" in out and "[/z]" in out
