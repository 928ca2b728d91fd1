"""A judge model for validation and `golong eval` (config section `judge`).

    JUDGE_API_KEY=... golong eval CONFIG judge.model=deepseek-chat judge.url=https://api.deepseek.com/v1

GoLongRL's DocMath and Frames evals (evalscope's docmath and frames, run by its Eval/QwenLong-Benchmarks) score a
response by the larger of its rule score and a judge model's verdict, its LongBench v1 QA and CorpusQA evals by the
verdict alone: the judge is shown the question, a reference answer and the answer extracted from the response, and
asked whether the two answers are the same. golong does the same for the metrics in JUDGED through any
OpenAI-compatible chat endpoint (vLLM's server, DeepSeek's API, OpenAI's), showing the question alone, never the
document (GoLongRL's Frames judge is shown the whole prompt, Wikipedia articles included); the wording of the request is
golong's own, so a judge's verdicts can differ a little from the card's.

The judge's reply is only searched for its verdict, `[[YES]]` or `[[NO]]` (the last one counts); nothing of it or
of the response is executed. A request that fails (an error, no whole reply within `judge.timeout_s`, no verdict in
the reply) is tried again up to `judge.retries` times, then counts as failed and leaves the rule score as it is: with
`judge.workers` requests in flight per rank, a rank's batch takes at most ceil(requests / workers) x (retries + 1) x
2 x timeout_s (a request per reference answer).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from golong.rewards.metrics import corpusqa_answer, docmath_answer, frames_answer, lbv1qa_answer


@dataclass(frozen=True)
class Judged:
    """How a benchmark's eval in GoLongRL uses its judge: the answer shown to it, taken from the text the metric
    reads (scoring.SCOPES) as that eval takes it; whether the verdict replaces the rule score (the eval reports the
    judge alone) or the larger of the two counts."""
    answer: Callable[[str], str]
    replaces: bool = False


JUDGED: dict[str, Judged] = {"docmath": Judged(docmath_answer), "frames": Judged(frames_answer),
                             "lbv1qa": Judged(lbv1qa_answer, replaces=True),
                             "corpusqa": Judged(corpusqa_answer, replaces=True)}

SYSTEM_PROMPT = """You compare two answers to the same problem and decide whether they are the same answer.
Do not solve the problem. Judge only whether Answer 1 and Answer 2 state the same value or meaning, allowing for \
different forms and notations (units, number formats, rounding that is shown, a percentage against a fraction).
First explain in a few sentences why they do or do not match. Then end with your verdict: [[YES]] if they are the \
same answer, [[NO]] if they are not."""
USER_TEMPLATE = "Problem: {question}\nAnswer 1: {reference}\nAnswer 2: {answer}"
_VERDICT = re.compile(r"\[\[\s*(YES|NO)\s*\]\]", re.IGNORECASE)


def verdict(reply: str) -> bool | None:
    """The judge's verdict in `reply`: its last [[YES]] / [[NO]] (any case), None where it holds neither."""
    found = _VERDICT.findall(reply or "")
    return None if not found else found[-1].upper() == "YES"


class JudgeError(RuntimeError):
    """The judge answered none of a batch's requests (a wrong judge.url or judge.model, a refused key)."""


@dataclass
class Question:
    """One judge request: the record's question, its reference answer, the answer extracted from the response."""
    question: str
    reference: str
    answer: str


class Judge:
    """An OpenAI-compatible judge model (cfg: golong.config.JudgeConfig), asked `cfg.workers` requests at a time."""

    def __init__(self, cfg: Any) -> None:
        import openai

        self.cfg = cfg
        key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
        # a local server (vLLM's) takes any key; the client refuses to start without one
        self.client = openai.OpenAI(base_url=cfg.url, api_key=key or "EMPTY", timeout=cfg.timeout_s, max_retries=0)

    def ask(self, q: Question) -> tuple[bool | None, str]:
        """(verdict, "") for one question, or (None, what went wrong) after judge.retries further tries."""
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": USER_TEMPLATE.format(question=q.question, reference=q.reference,
                                                                     answer=q.answer)}]
        problem = ""
        for _ in range(self.cfg.retries + 1):
            text, problem = self._request(messages)
            if text is None:
                continue
            if (v := verdict(text)) is not None:
                return v, ""
            problem = f"no [[YES]] / [[NO]] in the reply: {text[-200:]!r}"
        return None, problem

    def _request(self, messages: list[dict[str, str]]) -> tuple[str | None, str]:
        """(the reply's text, "") or (None, what went wrong). The client's timeout bounds each read, which a server
        sending keep-alive bytes (DeepSeek's under load) renews: the reply is read as it arrives and dropped (its
        connection closed) once judge.timeout_s has passed, so a request takes at most twice that."""
        t0 = time.monotonic()
        try:
            with self.client.chat.completions.with_streaming_response.create(
                    model=self.cfg.model, messages=messages, temperature=0.0) as reply:
                body = bytearray()
                for chunk in reply.iter_bytes():
                    body += chunk
                    if time.monotonic() - t0 > self.cfg.timeout_s:
                        return None, f"no reply within judge.timeout_s={self.cfg.timeout_s:g} s"
            return json.loads(body)["choices"][0]["message"]["content"] or "", ""
        except Exception as e:  # the endpoint's errors, timeouts, a malformed reply
            return None, f"{type(e).__name__}: {e}"

    def ask_all(self, questions: Sequence[Question]) -> list[tuple[bool | None, str]]:
        """ask() of each question, in order, cfg.workers at a time."""
        if not questions:
            return []
        with ThreadPoolExecutor(max_workers=min(self.cfg.workers, len(questions))) as pool:
            return list(pool.map(self.ask, questions))


@dataclass
class JudgeReport:
    """What a batch's judging did: answers judged, those judged the reference's ([[YES]] to any of its references),
    those whose verdict failed (their rule scores stand), the scores a verdict raised and lowered, the first
    failure."""
    asked: int = 0
    yes: int = 0
    failed: int = 0
    raised: int = 0
    lowered: int = 0
    first_error: str = ""


def judged_question(record: Any) -> str | None:
    """The question a judge is shown for a record whose metric is in JUDGED: its extra_info["question"] (`golong data
    import docmath` keeps it there), None where it has none."""
    extra = getattr(record, "extra_info", None) or {}
    q = extra.get("question") if isinstance(extra, dict) else None
    return q if isinstance(q, str) and q.strip() else None


def judge_records(judge: Judge, records: Sequence[Any], responses: Sequence[str], scores: Sequence[float], *,
                  require_think: bool = True) -> tuple[list[float], list[str | None], JudgeReport]:
    """The responses' rule `scores` with the judge's verdicts applied (JUDGED): for records whose metric is judged
    and which hold a question (judged_question), where the response passes the format gate, the judge is asked
    whether the answer is each of the record's references; a [[YES]] to any is a verdict of 1, else 0, which the
    score becomes (a judged-only benchmark) or raises it to (max(rule score, verdict)). Returns the scores, each
    response's verdict ("yes", "no", "failed": a request failed and none said yes, the rule score stands; None: not
    judged) and the report."""
    from golong.rewards.scoring import metric_text, record_target

    owners, questions = [], []  # a request per (response, reference)
    for i, (record, response) in enumerate(zip(records, responses, strict=True)):
        metric, gold = record_target(record)
        if metric not in JUDGED or (question := judged_question(record)) is None:
            continue
        if (region := metric_text(metric, response, require_think=require_think)) is None:
            continue
        answer = JUDGED[metric].answer(region)
        for reference in gold if isinstance(gold, list) else [gold]:
            owners.append(i)
            questions.append(Question(question=question, reference=str(reference), answer=answer))
    answers: dict[int, list[tuple[bool | None, str]]] = {}
    for i, reply in zip(owners, judge.ask_all(questions)):
        answers.setdefault(i, []).append(reply)
    out, verdicts, report = list(scores), [None] * len(records), JudgeReport(asked=len(answers))
    for i, replies in answers.items():
        problems = [problem for v, problem in replies if v is None]
        if not any(v for v, _ in replies) and problems:
            verdicts[i] = "failed"
            report.failed += 1
            report.first_error = report.first_error or problems[0]
            continue
        yes = any(v for v, _ in replies)
        verdicts[i] = "yes" if yes else "no"
        report.yes += yes
        replaces = JUDGED[record_target(records[i])[0]].replaces
        new = float(yes) if replaces else max(out[i], float(yes))
        report.raised += new > out[i]
        report.lowered += new < out[i]
        out[i] = new
    return out, verdicts, report
