"""The judge model of validation and `golong eval` (golong.rewards.judge), against a local OpenAI-compatible server
whose verdicts the tests script: what it is shown, how its replies are read, its failures and time limit, and
eval.json / responses.jsonl of an eval that uses it."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from golong.data.records import Record
from golong.rewards.judge import SYSTEM_PROMPT, Judge, JudgeError, Question, judge_records, verdict
from tests.golong.trainer_helpers import one_thread  # noqa: F401  (autouse fixture)


def completion(text: str) -> dict:
    """A chat.completion reply holding `text`."""
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "judge",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}


class FakeJudge:
    """A chat-completions endpoint on 127.0.0.1: the reply to a request is `script(reference, answer, attempt)`
    (attempt: how many requests with this reference came before), a string (the reply's text), an int (that HTTP
    status, no reply), a float (seconds to sleep, then "[[YES]]") or ("dribble", seconds) (a keep-alive newline every
    0.2 s for that long, then "[[YES]]"). Every request's JSON body and headers are kept."""

    def __init__(self, script):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        self.inflight = 0  # requests being answered now
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                with fake.lock:
                    fake.inflight += 1
                try:
                    self.reply()
                except (BrokenPipeError, ConnectionResetError):  # a client that gave up waiting (the time limit)
                    pass
                finally:
                    with fake.lock:
                        fake.inflight -= 1

            def reply(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                user = body["messages"][-1]["content"]
                ref = user.split("Answer 1: ", 1)[1].split("\nAnswer 2: ", 1)[0]
                answer = user.split("\nAnswer 2: ", 1)[1]
                with fake.lock:
                    attempt = sum(r["ref"] == ref for r in fake.requests)
                    fake.requests.append({"ref": ref, "answer": answer, "body": body, "path": self.path})
                    fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                reply = script(ref, answer, attempt)
                if isinstance(reply, tuple):  # ("dribble", seconds): a newline every 0.2 s, then the reply
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    end = time.monotonic() + reply[1]
                    while time.monotonic() < end:
                        self.wfile.write(b"\n")
                        self.wfile.flush()
                        time.sleep(0.2)
                    reply = "[[YES]]"
                    self.wfile.write(json.dumps(completion(reply)).encode())
                    return
                if isinstance(reply, float):
                    time.sleep(reply)
                    reply = "[[YES]]"
                if isinstance(reply, int):
                    self.send_response(reply)
                    self.send_header("Content-Type", "application/json")
                    data = json.dumps({"error": {"message": "scripted failure"}}).encode()
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                data = json.dumps(completion(reply)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_judge():
    servers = []

    def start(script):
        servers.append(FakeJudge(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def judge_cfg(url: str, **over) -> SimpleNamespace:
    from golong.config import JudgeConfig

    cfg = JudgeConfig(model="judge-7b", url=url, timeout_s=5.0, retries=2, workers=4)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def docmath_record(gold: str, question: str | None = "How much did revenue grow?") -> Record:
    extra = {"question": question} if question is not None else {}
    return Record.from_dict({"data_source": "docmath", "ability": "docmath",
                             "prompt": [{"role": "user", "content": "DOCUMENT TEXT " * 50 + "question"}],
                             "reward_model": {"ground_truth": {"golden_label": gold}}, "extra_info": extra})


def test_verdict_is_the_last_bracketed_yes_or_no():
    assert verdict("They differ... [[NO]]") is False
    assert verdict("At first [[NO]], but on reflection [[ yes ]]") is True
    assert verdict("Answer 1 is 4 and Answer 2 is 4. [[YES]]. Final: [[NO]]") is False
    for reply in ("YES", "[YES]", "[[MAYBE]]", "", None):
        assert verdict(reply) is None


def test_a_record_without_a_question_is_not_judged():
    """The judge is shown the question: a record without one, or with a blank one, is not judged (and a run with
    such records in a judged benchmark is refused at start)."""
    from golong.rewards.judge import judged_question

    for info in ({}, {"question": ""}, {"question": "   \n"}, {"question": 7}, None):
        assert judged_question(SimpleNamespace(extra_info=info)) is None, info
    assert judged_question(SimpleNamespace(extra_info={"question": "How many?"})) == "How many?"


def test_the_judge_sees_question_reference_and_extracted_answer_and_raises_scores(fake_judge, monkeypatch):
    """The request: the system prompt, then "Problem / Answer 1 (the reference) / Answer 2 (the answer DocMath's
    scorer extracts)" (never the document), temperature 0, the model named, the key from judge.api_key_env. A
    [[YES]] raises a score to 1 (max(rule, verdict)); [[NO]] leaves it; a response failing the format gate and a
    record of a metric not judged are not sent."""
    server = fake_judge(lambda ref, answer, attempt: "Same value. [[YES]]" if ref == "42" else "Different. [[NO]]")
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-123")
    judge = Judge(judge_cfg(server.url, api_key_env="MY_JUDGE_KEY"))
    other = Record.from_dict({"data_source": "EM", "ability": "long_context", "prompt": [{"role": "user",
                              "content": "q"}], "reward_model": {"ground_truth": {"golden_label": "42"}}})
    records = [docmath_record("42"), docmath_record("7"), docmath_record("42"), other, docmath_record("42")]
    responses = ["<think>x</think>So **(forty-two)**. Therefore, the answer is 4,2.00.", "<think>y</think>It is 8.",
                 "<think>z</think>Therefore, the answer is 42", "<think>a</think>42", "no think block"]
    rule = [0.0, 0.0, 1.0, 0.0, 0.0]
    scores, verdicts, report = judge_records(judge, records, responses, rule)
    assert scores == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert verdicts == ["yes", "no", "yes", None, None]
    assert (report.asked, report.yes, report.failed, report.raised, report.lowered) == (3, 2, 0, 1, 0)
    sent = sorted((r["ref"], r["answer"]) for r in server.requests)
    # asterisks and parentheses out, the first "the answer is N" without its commas and final period
    assert sent == [("42", "42"), ("42", "42.00"), ("7", "It is 8.")]
    body = server.requests[0]["body"]
    assert body["model"] == "judge-7b" and body["temperature"] == 0.0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][0]["content"] == SYSTEM_PROMPT
    user = body["messages"][1]["content"]
    assert user.startswith("Problem: How much did revenue grow?\nAnswer 1: ") and "DOCUMENT" not in user
    assert server.requests[0]["path"] == "/v1/chat/completions"
    assert all(h.get("authorization") == "Bearer sk-test-123" for h in server.headers)
    # require_think=false: the text after a last </think>, else the whole response, is read
    scores, verdicts, _ = judge_records(judge, records[4:], responses[4:], [0.0], require_think=False)
    assert verdicts == ["yes"] and scores == [1.0]


def test_frames_answers_are_judged_as_evalscopes_frames_takes_them(fake_judge):
    """Frames: the judge sees what follows the last "the answer is" (asterisks out), and max(cover exact match,
    verdict) is the score."""
    from golong.rewards import score_records

    server = fake_judge(lambda ref, answer, attempt: "[[YES]]" if answer == "Marie Curie" else "[[NO]]")
    record = Record.from_dict({"data_source": "frames", "ability": "frames",
                               "prompt": [{"role": "user", "content": "ARTICLES ... Who?"}],
                               "reward_model": {"ground_truth": {"golden_label": "Maria Skłodowska-Curie"}},
                               "extra_info": {"question": "Who won two Nobel prizes in two sciences?"}})
    responses = ["<think>t</think>So, **the answer is Marie Curie**.", "<think>t</think>It was Maria Skłodowska-Curie",
                 "<think>t</think>The answer is Marie Curie"]  # evalscope's test is case-sensitive: "" is sent
    rule = score_records([record] * 3, responses)
    assert rule == [0.0, 1.0, 0.0]
    scores, verdicts, _ = judge_records(Judge(judge_cfg(server.url)), [record] * 3, responses, rule)
    assert scores == [1.0, 1.0, 0.0] and verdicts == ["yes", "no", "no"]
    # no "the answer is" (the second), or not in that case (the third): an empty answer, as evalscope sends
    assert sorted(r["answer"] for r in server.requests) == ["", "", "Marie Curie"]
    assert all(r["ref"] == "Maria Skłodowska-Curie" for r in server.requests)


def test_judge_only_benchmarks_take_the_verdict_over_each_reference(fake_judge):
    """LongBench v1 QA and CorpusQA: GoLongRL reports the judge alone, so the verdict replaces the rule score (QA
    F1 / exact match), up or down; a LongBench answer is asked against each reference and a [[YES]] to any counts;
    a failed request with no [[YES]] leaves the rule score."""
    from golong.rewards import score_records

    def script(ref, answer, attempt):
        return 500 if ref == "Boom" else "[[YES]]" if (ref, answer) in {("Atlanta Hawks", "ATL"), ("7", "seven")} \
            else "[[NO]]"

    server = fake_judge(script)
    lb = Record.from_dict({"data_source": "lbv1qa", "ability": "lbv1qa",
                           "prompt": [{"role": "user", "content": "CONTEXT ... Which team?"}],
                           "reward_model": {"ground_truth": {"doc_ids": ["Hawks", "Atlanta Hawks"]}},
                           "extra_info": {"question": "Which team did he join?"}})
    boom = Record.from_dict({**lb.to_dict(), "reward_model": {"ground_truth": {"doc_ids": ["Hawks", "Boom"]}}})
    # a [[YES]] to one reference wins over a failed request for another
    boom_yes = Record.from_dict({**lb.to_dict(),
                                 "reward_model": {"ground_truth": {"doc_ids": ["Boom", "Atlanta Hawks"]}}})
    cq = Record.from_dict({"data_source": "corpusqa", "ability": "corpusqa",
                           "prompt": [{"role": "user", "content": "CORPUS ... How many?"}],
                           "reward_model": {"ground_truth": {"golden_label": "7"}},
                           "extra_info": {"question": "How many funds?"}})
    records = [lb, lb, cq, cq, boom, boom_yes]
    responses = ["<think>t</think>Therefore, the answer is ATL.", "<think>t</think>Therefore, the answer is Hawks fan",
                 "<think>t</think>The answer is seven", "<think>t</think>The answer is 7", "<think>t</think>Therefore, "
                 "the answer is Hawks", "<think>t</think>Therefore, the answer is ATL."]
    rule = score_records(records, responses)
    assert rule == [0.0, pytest.approx(2 / 3), 0.0, 1.0, 1.0, 0.0]
    scores, verdicts, report = judge_records(Judge(judge_cfg(server.url, retries=0)), records, responses, rule)
    assert verdicts == ["yes", "no", "yes", "no", "failed", "yes"]
    assert scores == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]  # the verdict, both ways; a failed one keeps its rule score
    assert (report.asked, report.yes, report.failed, report.raised, report.lowered) == (6, 3, 1, 3, 2)
    asked = sorted((r["ref"], r["answer"]) for r in server.requests)
    assert asked == sorted([("Hawks", "ATL"), ("Atlanta Hawks", "ATL"), ("Hawks", "Hawks fan"),
                            ("Atlanta Hawks", "Hawks fan"), ("7", "seven"), ("7", "7"), ("Hawks", "Hawks"),
                            ("Boom", "Hawks"), ("Boom", "ATL"), ("Atlanta Hawks", "ATL")])


def test_failed_requests_are_retried_then_leave_the_rule_score(fake_judge):
    """An HTTP error or a reply without a verdict is asked again, up to judge.retries more times; a request still
    failing is "failed" and keeps its rule score; a request over judge.timeout_s is abandoned in time."""
    def script(ref, answer, attempt):
        # references: 500 -> HTTP 500; 11 -> a verdict on the third try; 12 -> never a verdict; 13 -> too slow
        return {"500": 500, "11": "[[YES]]" if attempt == 2 else "I think they match.",
                "12": "Probably equal.", "13": 3.0}.get(ref, "[[NO]]")

    server = fake_judge(script)
    judge = Judge(judge_cfg(server.url, retries=2, timeout_s=0.5))
    records = [docmath_record(g) for g in ("500", "11", "12", "13", "1")]
    responses = ["<think>t</think>Therefore, the answer is 3."] * 5
    t0 = time.perf_counter()
    scores, verdicts, report = judge_records(judge, records, responses, [0.25, 0.0, 0.0, 1.0, 0.0])
    took = time.perf_counter() - t0
    assert verdicts == ["failed", "yes", "failed", "failed", "no"]
    assert scores == [0.25, 1.0, 0.0, 1.0, 0.0]
    assert (report.asked, report.yes, report.failed, report.raised) == (5, 1, 3, 1)
    assert "InternalServerError" in report.first_error or "no [[YES]]" in report.first_error
    counts = {g: sum(r["ref"] == g for r in server.requests) for g in ("500", "11", "12", "13", "1")}
    assert counts == {"500": 3, "11": 3, "12": 3, "13": 3, "1": 1}
    assert took < 3 * 3.0  # the slow request's three tries were cut at 0.5 s each, not waited for


def test_a_request_gets_timeout_s_of_wall_time_whatever_the_server_sends(fake_judge):
    """A server sending keep-alive bytes (DeepSeek's under load) renewed the client's read timeout: a request took
    as long as the server liked. Now judge.timeout_s bounds its wall time."""
    server = fake_judge(lambda ref, answer, attempt: ("dribble", 6.0))
    judge = Judge(judge_cfg(server.url, timeout_s=1.0, retries=1, workers=2))
    threads = threading.active_count()
    t0 = time.perf_counter()
    replies = judge.ask_all([Question("q", str(i), "1") for i in range(4)])
    took = time.perf_counter() - t0
    assert replies == [(None, "no reply within judge.timeout_s=1 s")] * 4
    # 4 questions x 2 tries of 1 s each, 2 at a time: about 4 s, not 6 s a try
    assert 4.0 <= took < 6.0 and len(server.requests) == 8
    # a request given up is closed, not left running (the server would dribble on for 5 s more): its handler finds
    # the connection gone at its next write; no thread of the client's is left either
    time.sleep(1.0)
    assert server.inflight == 0 and threading.active_count() <= threads


def test_an_eval_with_a_judge_reports_its_verdicts(fake_judge, tmp_path):
    """golong eval with judge.model: DocMath records judged (the scratch model's answers are noise: the fake judge
    says [[YES]] to the records whose reference is 42), scores raised, eval.json's judge counts, each response's
    verdict in responses.jsonl; records without their question refused at start; a judge that answers nothing stops
    the eval with one error naming it."""
    import torch.distributed as dist

    from golong.config import ConfigError, load_config
    from golong.data.tokenizer import build_demo_tokenizer
    from golong.evaluate import evaluate
    from tests.golong.test_trainer import CONFIG

    build_demo_tokenizer(1024).save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "tiny.yaml").write_text(CONFIG.format(tokenizer=tmp_path / "tok"))
    server = fake_judge(lambda ref, answer, attempt: "[[YES]]" if ref == "42" else "[[NO]]")
    val = tmp_path / "dm.jsonl"
    val.write_text("".join(json.dumps(docmath_record(g).to_dict()) + "\n" for g in ("42", "7", "42", "3.5")))

    def run(*over):
        cfg = load_config(tmp_path / "tiny.yaml", [f"logging.run_dir={tmp_path / 'run'}", f"data.val_files=[{val}]",
                                                   "data.synthetic_n=0", "rollout.val_n=2", "judge.model=fake-judge",
                                                   f"judge.url={server.url}", "judge.retries=0", *over])
        try:
            return evaluate(cfg, None, tmp_path / "out", save_every=0)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    result = run()
    assert result["judge"] == {"model": "fake-judge", "url": server.url, "asked": 8, "yes": 4, "failed": 0,
                               "raised": 4, "lowered": 0}
    assert result["tasks"]["docmath"]["reward_mean"] == pytest.approx(0.5)
    # the other settings the scores depend on, for eval-compare
    assert (result["max_response_tokens"], result["require_think"], result["reward_function"]) == (8, False, None)
    rows = [json.loads(line) for line in (tmp_path / "out" / "responses.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["judge"], r["score"]) for r in rows] == [
        (0, "yes", 1.0), (0, "yes", 1.0), (1, "no", 0.0), (1, "no", 0.0),
        (2, "yes", 1.0), (2, "yes", 1.0), (3, "no", 0.0), (3, "no", 0.0)]
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["judge"] == result["judge"]
    # without the judge: the rule score alone, no judge entry
    assert run("judge.model=''")["judge"] is None
    # a judge that fails every request: one error naming it (the eval does not pass rule scores off as judged)
    broken = fake_judge(lambda ref, answer, attempt: 503)
    with pytest.raises(JudgeError, match=rf"judge.model=fake-judge at judge.url={broken.url}\) judged none of its "
                                         r"8 answers; the first failure: InternalServerError"):
        run(f"judge.url={broken.url}")
    # records imported before golong kept the question: refused before any model is built
    val.write_text(json.dumps(docmath_record("42", question=None).to_dict()) + "\n")
    with pytest.raises(ConfigError, match=r"1 of the 1 validation records the judge would see hold no "
                                          r"extra_info.question"):
        run()


def test_a_judge_failing_in_a_training_runs_validation_is_a_warning(caplog):
    """In training's validation a judge that answers nothing leaves that validation's rule scores with a warning
    (a multi-day run does not stop for an endpoint); golong eval stops (above). The ranks' counts add up."""
    from golong.config import RunConfig
    from golong.rewards.judge import JudgeReport
    from golong.trainer import Trainer

    cfg = RunConfig()
    cfg.judge.model = "j"
    reports = [JudgeReport(asked=3, failed=3, first_error="APIConnectionError: refused"), None,
               JudgeReport(asked=2, failed=2)]
    fake = SimpleNamespace(cfg=cfg, eval_only=False)
    logger = logging.getLogger("golong")
    logger.addHandler(caplog.handler)  # it does not propagate to the root logger
    try:
        counts = Trainer._judge_counts(fake, reports, "validation at step 4")
    finally:
        logger.removeHandler(caplog.handler)
    assert counts == {"judge/asked": 5.0, "judge/yes": 0.0, "judge/failed": 5.0, "judge/raised": 0.0,
                      "judge/lowered": 0.0}
    assert "validation at step 4: the judge failed on 5 of 5 answers, whose rule scores stand; the first failure: " \
           "APIConnectionError: refused" in caplog.text
    fake.eval_only = True
    with pytest.raises(JudgeError, match="judged none of its 5 answers"):
        Trainer._judge_counts(fake, reports, "validation")
    ok = [JudgeReport(asked=4, yes=3, raised=1), JudgeReport(asked=1, yes=1, failed=0, lowered=1)]
    assert Trainer._judge_counts(fake, ok, "validation") == {"judge/asked": 5.0, "judge/yes": 4.0,
                                                             "judge/failed": 0.0, "judge/raised": 1.0,
                                                             "judge/lowered": 1.0}
