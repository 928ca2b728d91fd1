"""A reward function of the user's own (rollout.reward_function): checked without being run, called with verl's
arguments in the timed scoring workers, its results and failures handled, golong's scoring under it as fallback."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from golong.config import RunConfig, run_problems
from golong.data.check import run_records, task_metrics
from golong.data.records import Record, RecordError, load_records
from golong.rewards import compute_score, score_record
from golong.rewards.function import FunctionReport, RewardFunctionError, check_function, parse_spec
from golong.rewards.scoring import RewardConfig, score_records

USER_REWARD = '''
import json
import re
import time

from golong.rewards import default_compute_score

LOADED_AT = time.time()
KEPT = []  # what "leak" keeps between calls


def compute_score(solution_str, ground_truth, data_source=None, extra_info=None):  # verl calls by keyword
    if data_source == "count":  # a task golong has no metric for: the last integer of the answer
        numbers = re.findall(r"-?\\d+", solution_str.split("</think>")[-1])
        return {"score": float(bool(numbers) and int(numbers[-1]) == ground_truth["n"]), "parsed": numbers}
    if data_source == "echo":  # what the function was given, as a score: 1 where it is as the file has it
        return float(json.dumps([ground_truth, extra_info], sort_keys=True) == solution_str.split("</think>")[-1])
    if data_source == "boom":
        raise KeyError("no field " + solution_str[-3:])
    if data_source == "slow":
        time.sleep(60)
    if data_source == "text":
        return "high"
    if data_source == "nan":
        return float("nan")
    if data_source == "numpy":
        import numpy as np

        return {"score": np.float32(0.5), "acc": True}
    if data_source == "bool":
        return True
    if data_source == "exit":
        import sys

        sys.exit(3)
    if data_source == "leak":  # 150 MiB more kept on every call
        KEPT.append(bytearray(150 << 20))
        return len(KEPT)
    if data_source == "die":
        import os

        os._exit(9)
    return default_compute_score(data_source, solution_str, ground_truth, extra_info)


def other(**kwargs):
    return 0.25 * kwargs.get("scale", 1)


async def later(*, data_source, solution_str, ground_truth, extra_info):
    return 0.75


if True:
    try:
        nested = other
    except ImportError:
        pass
first, second = other, other
'''


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reward") / "my_reward.py"
    path.write_text(USER_REWARD)
    return path


def _record(data_source: str, ground_truth, **extra) -> Record:
    return Record.from_dict({"data_source": data_source, "prompt": "q", "ability": "long_context",
                             "reward_model": {"ground_truth": ground_truth}, "extra_info": extra}, routed=False)


def _scores(spec: str, pairs, timeout: float = 10.0, require_think: bool = True, workers: int = 2,
            kwargs: dict | None = None, extras: dict | None = None, memory_mb: int = 2048):
    report = FunctionReport()
    scores = score_records([r for r, _ in pairs], [resp for _, resp in pairs], report=report,
                           config=RewardConfig(function=spec, timeout=timeout, num_workers=workers,
                                               require_think=require_think, function_kwargs=kwargs or {},
                                               memory_mb=memory_mb))
    if extras is not None:
        extras.update(report.extras)
    return scores, report.errors


def test_spec_names_the_file_and_function(tmp_path):
    assert parse_spec("r.py") == (Path("r.py").resolve(), "compute_score")
    assert parse_spec("sub/r.py:score_fn") == (Path("sub/r.py").resolve(), "score_fn")
    assert parse_spec("~/r.py:f")[0] == Path.home() / "r.py"


def test_check_function_reads_the_file_without_running_it(tmp_path, reward_file):
    for name in ("compute_score", "other", "later", "nested", "second"):
        assert check_function(f"{reward_file}:{name}") is None, name
    star = tmp_path / "star.py"
    star.write_text("from my_helpers import *\n")  # may define it: the worker will say
    assert check_function(str(star)) is None
    assert "defines no 'missing'" in check_function(f"{reward_file}:missing") and "compute_score, other, later" in \
        check_function(f"{reward_file}:missing")
    assert "does not exist" in check_function(str(tmp_path / "nope.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("def compute_score(:\n")
    assert f"{bad}:1:" in check_function(str(bad))
    marker = tmp_path / "ran"
    side = tmp_path / "side.py"  # module-level code that would leave a file if the check executed it
    side.write_text(f"open({str(marker)!r}, 'w').close()\nfrom os.path import join as compute_score\n")
    assert check_function(str(side)) is None and not marker.exists()
    cfg = RunConfig()
    cfg.data.synthetic_n = 4
    cfg.rollout.engine = "torch"
    cfg.rollout.reward_function = f"{reward_file}:missing"
    problems = run_problems(cfg, for_eval=True)
    assert len(problems) == 1 and problems[0].startswith(f"rollout.reward_function={reward_file}:missing: ")


def test_the_function_scores_with_verls_arguments(reward_file):
    """Called by keyword (the function's parameters in another order), with the raw ground truth (an int, a dict of
    the file's own keys), extra_info with the ability added, the whole response, with or without a think block
    (no format gate: the function decides): the "echo" source scores 1 only where the function saw exactly what
    the file holds. Numpy scalars, bools, keyword-only and async functions score as verl takes them."""
    gt, extra = {"n": 7, "unit": "apples"}, {"index": 3, "split": "train"}
    seen = json.dumps([gt, {**extra, "ability": "long_context"}], sort_keys=True)
    pairs = [(_record("count", {"n": 42}), "<think>maybe 41</think> it is 42"),
             (_record("count", {"n": 42}), "<think>42</think> it is 41"),
             (_record("echo", gt, **extra), f"<think></think>{seen}"),
             (_record("echo", gt, **extra), "<think></think>" + json.dumps([gt, extra], sort_keys=True)),
             (_record("echo", None), "<think></think>" + json.dumps([None, {"ability": "long_context"}])),
             (_record("count", {"n": 42}), "it is 42"),  # no </think>: the function still scores it
             (_record("numpy", "a"), "a"), (_record("bool", "a"), "a"),
             # a record's own extra_info["ability"] is what the function sees, not the record's ability
             (_record("echo", gt, ability="own"), "<think></think>" + json.dumps([gt, {"ability": "own"}],
                                                                                 sort_keys=True))]
    extras = {}
    scores, errors = _scores(str(reward_file), pairs, extras=extras)
    assert scores == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.5, 1.0, 1.0] and errors == []
    # what else a dict result held comes back per response (verl's extra reward info): "acc" True as 1.0, "parsed"
    # (a list) as JSON text; only the numbers are averaged
    assert extras == {0: {"parsed": '["42"]'}, 1: {"parsed": '["41"]'}, 5: {"parsed": '["42"]'},
                      6: {"acc": 1.0}}
    assert _scores(f"{reward_file}:other", pairs[:2]) == ([0.25, 0.25], [])
    assert _scores(f"{reward_file}:other", pairs[:2], kwargs={"scale": 3}) == ([0.75, 0.75], [])  # reward_kwargs
    assert _scores(f"{reward_file}:later", pairs[:2]) == ([0.75, 0.75], [])


def test_default_compute_score_is_golongs_own_scoring(reward_file):
    """The fallback routes and scores as golong does without a function: the same score for routable records,
    a response passing through the user's function and the worker it runs in."""
    cases = [({"data_source": "EM", "prompt": "q", "reward_model": {"ground_truth": "Paris"}},
              ["<think>x</think>Paris", "<think>x</think>Lyon", "Paris"]),
             ({"data_source": "longbench_pro", "prompt": "q", "ability": "long_context",
               "reward_model": {"ground_truth": {"doc_ids": ["b", "a", "c"], "golden_label": ""}},
               "extra_info": {"reward_mode": "T2.1 Global Timeline Reconstruction"}},
              ["<think>x</think>[Answer]\nb\na\nc", "<think>x</think>[Answer]\nb\nc\na"]),
             ({"data_source": "synthetic", "prompt": "q", "ability": "graded_ranking",  # routed by its ability
               "reward_model": {"ground_truth": {"doc_ids": ["d1", "d2", "d3"]}}},
              ["<think>x</think>d2\nd1\nd3", "<think>x</think>d3"])]
    pairs, want = [], []
    for d, responses in cases:
        for resp in responses:
            pairs.append((Record.from_dict(d, routed=False), resp))
            want.append(score_record(Record.from_dict(d), resp, timeout=None))
    scores, errors = _scores(str(reward_file), pairs)
    assert errors == [] and scores == pytest.approx(want)
    assert len(set(want)) >= 4  # the cases tell right from wrong
    # a gold stored as a number (read as its text, as at data load); a ground truth without a gold answer raises
    # (it would score 0 unnoticed)
    scores, errors = _scores(str(reward_file), [(_record("my_math", 18), "<think>x</think>\\boxed{18}"),
                                                (_record("EM", {"x": 1}), "<think>x</think>1")])
    assert scores == [1.0, 0.0] and len(errors) == 1 and "no gold answer for metric em" in errors[0][1]
    # numpy's numbers too (a parquet column read with pandas): np.int64 raised "no gold answer"
    import numpy as np

    from golong.rewards import default_compute_score

    for gold in (np.int64(18), np.float64(18.0), np.int32(18)):
        assert default_compute_score("my_math", "<think>x</think>\\boxed{18}", gold) == 1.0
    # a run with rollout.require_think=false: the fallback's gate follows it
    scores, _ = _scores(str(reward_file), [pairs[2]], require_think=False)
    assert scores == [compute_score("em", "Paris", "Paris", timeout=None, require_think=False)] == [1.0]


def test_failures_score_zero_and_are_reported(reward_file):
    """An exception (its traceback, naming the user's file and line), a non-number, a NaN, sys.exit, a call over
    the time limit and one that kills its worker each score 0 and are reported, without holding up the rest."""
    pairs = [(_record("boom", "a"), "<think></think>xyz"), (_record("count", {"n": 1}), "<think></think>1"),
             (_record("text", "a"), "<think></think>a"), (_record("nan", "a"), "<think></think>a"),
             (_record("slow", "a"), "<think></think>a"), (_record("count", {"n": 2}), "<think></think>2"),
             (_record("exit", "a"), "a"), (_record("die", "a"), "a"), (_record("count", {"n": 3}), "3")]
    t0 = time.perf_counter()
    scores, errors = _scores(str(reward_file), pairs, timeout=3.0)
    assert time.perf_counter() - t0 < 30
    assert scores == [0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    by_index = dict(errors)
    assert sorted(by_index) == [0, 2, 3, 4, 6, 7]
    assert "KeyError: 'no field xyz'" in by_index[0] and f'File "{reward_file}", line ' in by_index[0]
    assert "must return a number or a dict with 'score'; got str 'high'" in by_index[2]
    assert "returned nan" in by_index[3]
    assert "past the 3 s time limit" in by_index[4]
    assert "SystemExit: 3" in by_index[6] and "worker died (exit code 9)" in by_index[7]


def test_each_response_reports_its_failure_and_extras():
    """FunctionReport.infos: each response's fields in the rollout dump -- its failure as one line (a traceback's
    exception, a multi-line message joined, cut to 500 characters), what its dict result held (string keys only,
    at most MAX_EXTRAS, text cut); numbers(): the numeric extras by key in job order (text and non-finite ones are
    not averaged); an int past a float's range is text, not a failed call."""
    from golong.rewards.function import EXTRA_TEXT_CHARS, MAX_EXTRAS, call_function, error_line

    def fn(data_source, solution_str, ground_truth, extra_info):
        if data_source == "many":
            return {"score": 1, **{f"k{i}": i for i in range(100)}}
        return {"score": 0.5, "acc": True, "pred": solution_str * 400, "gap": float("inf"), "n": 3, 1: 2.0,
                None: 1.0, "huge": 10 ** 600, "nested": {"a": [1, "b"]}, "odd": {(1, 2): 3},
                "nan": [float("nan"), 1]}

    score, extras = call_function(fn, "s", "ab", None, {})
    assert score == 0.5 and extras["acc"] == 1.0 and extras["gap"] is None and extras["n"] == 3.0
    assert extras["pred"] == "ab" * 250 + "..."  # cut to EXTRA_TEXT_CHARS
    assert extras["huge"] == "1" + "0" * (EXTRA_TEXT_CHARS - 1) + "..."
    # JSON where strict JSON can hold it, else repr
    assert extras["nested"] == '{"a": [1, "b"]}' and extras["odd"] == "{(1, 2): 3}" and extras["nan"] == "[nan, 1]"
    assert set(extras) == {"acc", "pred", "gap", "n", "huge", "nested", "odd", "nan"}  # 1, None: not names
    assert len(call_function(fn, "many", "", None, {})[1]) == MAX_EXTRAS
    tb = 'Traceback (most recent call last):\n  File "r.py", line 3, in f\n    raise ValueError(x)\n'
    report = FunctionReport(errors=[(1, tb + "ValueError: cannot score\nthe second line\n"),
                                    (3, "the reward function ran past the 3 s time limit (rollout.reward_timeout_s)"),
                                    (4, tb + "ValueError: " + "x" * 100_000)],
                            extras={0: extras, 2: {"acc": 0.0, "pred": "x"}})
    assert report.infos(6) == [{"reward_extras": extras}, {"reward_error": "ValueError: cannot score the second line"},
                               {"reward_extras": {"acc": 0.0, "pred": "x"}},
                               {"reward_error": "the reward function ran past the 3 s time limit "
                                                "(rollout.reward_timeout_s)"},
                               {"reward_error": "ValueError: " + "x" * (EXTRA_TEXT_CHARS - 12) + "..."}, None]
    assert report.numbers() == {"acc": [1.0, 0.0], "n": [3.0]}
    assert error_line(tb + "MemoryError\n(the scoring worker reached rollout.reward_memory_mb; a fresh one takes "
                      "the next calls)") == ("MemoryError (the scoring worker reached rollout.reward_memory_mb; a "
                                             "fresh one takes the next calls)")


def test_a_function_at_its_memory_cap_gets_a_fresh_worker(reward_file):
    """rollout.reward_memory_mb caps each worker; a call that hits it (MemoryError) scores 0 and is reported, and
    the worker is replaced, so what the function kept does not fail its later calls too: one worker, 400 MiB, 150
    MiB kept per call -> 1, 2, MemoryError, then 1 again in the fresh worker (without the restart: 0)."""
    pairs = [(_record("leak", "a"), "a")] * 4
    scores, errors = _scores(str(reward_file), pairs, workers=1, memory_mb=400)
    assert scores == [1.0, 2.0, 0.0, 1.0]
    assert [i for i, _ in errors] == [2] and "MemoryError" in errors[0][1]


def test_a_function_that_fails_to_load_names_its_error(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import json\nSETTINGS = json.loads('{not json')\n\ndef compute_score(*a):\n    return 1.0\n")
    with pytest.raises(RuntimeError, match=r"(?s)failed to load in a scoring worker.*broken.py\", line 2.*"
                                           "JSONDecodeError"):
        _scores(str(path), [(_record("x", "a"), "<think></think>a")], workers=1)
    from golong.rewards.pool import ScoringPool

    pool = ScoringPool(2, function=str(path))  # what the trainer starts before its first rollout
    with pytest.raises(RuntimeError, match=r"(?s)reward function .*broken.py failed to load.*JSONDecodeError"):
        pool.start()
    assert pool.workers == []  # closed: none left running
    not_a_function = ScoringPool(2, function=f"{Path(__file__)}:__name__")  # fails at load too
    with pytest.raises(RuntimeError, match="not a function"):
        not_a_function.start()
    # a signature verl's keyword call (and rollout.reward_kwargs) cannot bind: found at load, not at the first call
    positional = tmp_path / "positional.py"
    positional.write_text("def compute_score(source, response, answer, info):\n    return 1.0\n\n"
                          "def plain(data_source, solution_str, ground_truth, extra_info=None):\n    return 1.0\n")
    with pytest.raises(RewardFunctionError, match=r"compute_score\(source, response, answer, info\) cannot be "
                                                  "called as verl calls a reward function, by keyword"):
        ScoringPool(1, function=str(positional)).start()
    ScoringPool(1, function=f"{positional}:plain").start()
    with pytest.raises(RewardFunctionError, match="and rollout.reward_kwargs scale"):
        ScoringPool(1, function=f"{positional}:plain", kwarg_names=("scale",)).start()


def test_records_a_function_scores_need_no_route(tmp_path, reward_file):
    """With a reward function, records of any data_source and ground truth load (kept as stored, a number's text
    for the SFT warm-up); without one the same file is refused naming its line."""
    path = tmp_path / "custom.jsonl"
    rows = [{"data_source": "count", "prompt": "how many?", "reward_model": {"ground_truth": 42}},
            {"data_source": "count", "prompt": "how many?", "reward_model": {"ground_truth": {"n": 3, "unit": "x"}}},
            {"data_source": "count", "prompt": "how many?", "reward_model": {"ground_truth": [1, 2]}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match=rf"{path}: line 1: reward_model.ground_truth must be an object"):
        load_records(path)
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({**rows[0], "reward_model": {"ground_truth": "42"}}) + "\n")
    with pytest.raises(RecordError, match=rf"{text}: line 1: cannot route record .* rollout.reward_function="):
        load_records(text)
    records = load_records(path, routed=False)
    assert [r.raw_ground_truth for r in records] == [(42,), ({"n": 3, "unit": "x"},), ([1, 2],)]
    assert load_records(path.with_name("text.jsonl"), routed=False)[0].raw_ground_truth == ("42",)
    assert records[0].ground_truth.golden_label == "42"
    assert [r.to_dict()["reward_model"]["ground_truth"] for r in records] == [42, {"n": 3, "unit": "x"}, [1, 2]]
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "structs.parquet"  # one struct column: each row holds the union of the keys
    pq.write_table(pa.Table.from_pylist([{**rows[0], "reward_model": {"ground_truth": {"n": 2, "alias": "two"}}},
                                         {**rows[0], "reward_model": {"ground_truth": {"n": 3, "items": ["a"]}}}]),
                   table)
    assert [r.raw_ground_truth for r in load_records(table, routed=False)] == [
        ({"n": 2, "alias": "two"},), ({"n": 3, "items": ["a"]},)]  # as the .jsonl of the same rows reads
    with pytest.raises(RecordError, match="line 1: missing field"):  # the layout is still checked
        path.write_text(json.dumps({"data_source": "count", "prompt": "q"}) + "\n")
        load_records(path, routed=False)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig()
    cfg.data.train_files = [str(path)]
    cfg.rollout.reward_function = f"{reward_file}:other"
    train, _ = run_records(cfg)
    assert len(train) == 3
    assert task_metrics(train, cfg.rollout.reward_function) == {"count": "other() (golong: none)"}
    routable = Record.from_dict({"data_source": "EM", "prompt": "q", "ability": "count",
                                 "reward_model": {"ground_truth": "7"}}, routed=False)
    assert task_metrics([*train, routable], "r.py") == {"count": "compute_score() (golong: em)/compute_score() "
                                                                 "(golong: none)"}
    from golong.data.records import sft_target

    assert sft_target(train[0]) == "<think>\n\n</think>\n\n42"


DATA_CHECK_REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    if data_source == "boom":
        raise ValueError("cannot score " + str(ground_truth))
    answer = solution_str.split("</think>")[-1].strip()
    return float(answer == str(ground_truth)) if data_source == "exact" else 0.5
'''


def test_data_check_scores_the_reference_answers(tmp_path, capsys):
    """`golong data check --score-answers`: each record's reference answer scored as training would score it. With
    golong's metrics, the synthetic tasks' answers score 1 (ROUGE-L excepted: GoLongRL's summary reward reads the
    whole response, the think tags too); with a reward function, per task the mean, the answers below 1 (the first
    named with its position and score) and the calls that failed (with the error), records without a reference
    answer left out."""
    from golong.cli import main
    from golong.config import load_config
    from golong.data.check import score_answers
    from golong.data.synthetic import generate

    cfg = load_config(None, ["model.scratch.vocab_size=1024", "data.synthetic_n=0", "rollout.reward_workers=2"])
    rows = {r["task"]: r for r in score_answers(cfg, [("val", generate(18, 64, seed=5))])}
    assert len(rows) == 9 and sum(r["records"] for r in rows.values()) == 18
    for task, row in rows.items():
        assert row["scored"] == row["records"] and row["failed"] == 0
        if task == "summarization":
            assert 0.8 < row["mean"] < 1 and row["below_1"] == row["scored"]
        else:
            assert row["mean"] == 1.0 and row["below_1"] == 0, task

    (tmp_path / "reward.py").write_text(DATA_CHECK_REWARD)
    rows = [{"data_source": s, "prompt": "q", "ability": task, "reward_model": {"ground_truth": gt}}
            for s, task, gt in [("exact", "a", "42"), ("half", "a", "7"), ("exact", "a", "x"), ("boom", "b", "9"),
                                ("exact", "b", {"w": 1}), ("exact", "b", 3)]]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{scratch: {{vocab_size: 1024}}}}\ndata: {{train_files: [{data}], synthetic_val_n: 0}}\n"
                      f"rollout: {{reward_function: {tmp_path / 'reward.py'}, reward_workers: 2}}\n"
                      f"logging: {{run_dir: {tmp_path / 'run'}}}\n")
    cfg = load_config(config)
    got = {r["task"]: r for r in score_answers(cfg, [("train", load_records([data], routed=False))])}
    assert got["a"] == {"split": "train", "task": "a", "records": 3, "scored": 3, "mean": pytest.approx(2.5 / 3),
                        "below_1": 1, "failed": 0}
    assert got["b"] == {"split": "train", "task": "b", "records": 3, "scored": 2, "mean": 0.5, "below_1": 1,
                        "failed": 1}  # {"w": 1}: no reference answer
    out = capsys.readouterr().out
    assert "train a: 1 of 3 reference answers score below 1; the first: record 1 (data_source 'half') scores 0.5" \
        in out
    assert "train b: 1 of 2 reference answers score below 1; the first: record 3 (data_source 'boom') scores 0: " \
           "the reward function failed: ValueError: cannot score 9" in out
    assert main(["data", "check", str(config), "--score-answers"]) == 0
    out = capsys.readouterr().out
    assert "reference answers scored by compute_score()" in out and "function errors" in out
    # a function that fails on every answer stops the check, as training stops, with its traceback
    (tmp_path / "always.py").write_text(DATA_CHECK_REWARD.replace('if data_source == "boom":', "if True:"))
    assert main(["data", "check", str(config), "--score-answers",
                 f"rollout.reward_function={tmp_path / 'always.py'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("golong: error: train: the reward function failed on all 5 reference answers it was given")
    assert 'always.py", line 4, in compute_score' in err and "ValueError: cannot score 42" in err


def test_a_call_killed_at_its_time_limit_takes_what_it_started_with_it(tmp_path):
    """A reward function that starts a process (a sandbox, a subprocess) and overruns its time limit: killing the
    worker alone left that process running under init, one more at every timeout of a run."""
    import os

    marker = f"{os.getpid()}.{time.monotonic_ns() % 10**6}"  # this test's sleep, told apart from any other
    path = tmp_path / "spawner.py"
    path.write_text("import subprocess, time\n\n"
                    "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                    f"    subprocess.Popen(['sleep', '{marker}'])\n"
                    "    time.sleep(60)\n")

    def sleepers() -> list[int]:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", marker.encode()]:
                    found.append(int(pid))
            except OSError:
                pass
        return found

    scores, errors = _scores(str(path), [(_record("x", "a"), "<think></think>a")], timeout=2.0, workers=1)
    assert scores == [0.0] and "past the 2 s time limit" in errors[0][1]
    deadline = time.monotonic() + 10
    while sleepers() and time.monotonic() < deadline:  # SIGKILL is delivered, not awaited
        time.sleep(0.1)
    assert sleepers() == []
