"""Rewards: hand-computed cases per metric, NDCG vs pytrec_eval, ROUGE-L vs the `rouge` package, fuzzing,
time limits, task routing, record scoring."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from golong.rewards import (
    CAPABILITIES,
    LONGBENCH_PRO,
    METRIC_NAMES,
    answer_region,
    compute_score,
    metric_for,
    route,
    score_batch,
    score_record,
)
from golong.rewards import metrics as metrics_module
from golong.rewards.answer import marked_answer
from golong.rewards.function import FunctionReport
from golong.rewards.metrics import METRICS, rouge_l, rouge_l_summary, rouge_sentences
from golong.rewards.pool import get_pool
from golong.rewards.scoring import SANDBOXED, SCOPES


def R(answer: str) -> str:
    """A well-formed thinking response with `answer` after </think>."""
    return f"<think>\nsome reasoning\n</think>\n\n{answer}"


def score(metric: str, answer: str, gold) -> float:
    """`answer` scored as a well-formed response's answer. GoLongRL's LongBench-Pro reward reads the whole
    response after its last [Answer] marker (with no marker, the think block's lines count too), so the
    answer of the LongBench-Pro metrics goes after one, as LongBench-Pro's prompts ask."""
    marker = "[Answer]\n" if SCOPES[metric] == "marked" else ""
    if SCOPES[metric] == "whole":  # metrics that read the whole response: the answer alone, with no think block
        return compute_score(metric, answer, gold, timeout=None, require_think=False)
    return compute_score(metric, R(marker + answer), gold, timeout=None)


# ------------------------------------------------------------------ answer region


def test_answer_region_think_rules():
    assert answer_region("<think>a</think> x ") == "x"
    assert answer_region("no think block at all") is None
    assert answer_region("<think>a</think>b</think>c") is None  # two closes
    assert answer_region("<think>a<think>b</think>c") is None  # two opens
    assert answer_region("a</think>b") == "b"  # template-prefilled <think>: only the close is generated
    assert answer_region("plain answer", require_think=False) == "plain answer"
    assert answer_region("x</think>y</think> z", require_think=False) == "z"


def test_answer_markers_cut_only_the_longbench_pro_answer_area():
    # GoLongRL's get_answer_area: after the last [Answer] when there is one, else after the last [答案]
    assert marked_answer("draft [Answer] one\n[Answer] two ") == "two"
    assert marked_answer("[Answer] en [答案] 中文") == "en [答案] 中文"
    assert marked_answer("[答案] 中文 [Answer] en") == "en"
    assert marked_answer("[答案] 一 [答案] 二") == "二" and marked_answer(" no marker ") == "no marker"
    # the text after </think> (EM, choice, retrieval_calculate) keeps its markers, as in the recipe
    assert answer_region("<think>t</think>draft [Answer] two ") == "draft [Answer] two"
    # a response without exactly one </think> scores 0 for every metric
    for m in METRIC_NAMES:
        assert compute_score(m, "The correct answer is (A)\nx", "A", timeout=None) == 0.0


# ------------------------------------------------------------------ hand-computed metrics


def test_em():
    assert score("em", "  Paris \n", "Paris") == 1.0
    assert score("em", "paris", "Paris") == 0.0  # exact, case-sensitive
    assert score("em", "Paris, France", "Paris") == 0.0
    # GoLongRL's EM_judge compares the whole text after </think> with the label: no [Answer] marker is cut
    assert score("em", "[Answer] Paris", " Paris ") == 0.0
    assert score("em", "Paris [Answer]", "Paris [Answer]") == 1.0
    assert score("em", "Rome", ["Paris", "Rome"]) == 1.0


def test_accuracy():
    assert score("accuracy", "Blue   Whale\nsomething else", ["blue whale", "x"]) == 1.0
    assert score("accuracy", "orca\nblue whale", ["blue whale"]) == 0.0
    assert score("accuracy", "\n\n  Blue Whale", "blue whale\nignored") == 1.0  # leading blank lines skipped
    assert score("accuracy", "", ["x"]) == 0.0


def test_choice():
    assert score("choice", "The correct answer is (B)", "B") == 1.0
    assert score("choice", "The correct answer is (B)", "The correct answer is (B)") == 1.0
    assert score("choice", "The correct answer is (B)", "(C)") == 0.0
    assert score("choice", "**The correct answer is B**.", "B") == 1.0
    # GoLongRL's multi_choices takes the FIRST 'The correct answer is (X)' (re.search), not the last
    assert score("choice", "The correct answer is (A). Wait. The correct answer is (C)", "C") == 0.0
    assert score("choice", "The correct answer is (A). Wait. The correct answer is (C)", "A") == 1.0
    assert score("choice", "The correct answer is Definitely", "D") == 0.0  # 'D' of a word is no letter
    assert score("choice", "The correct answer is A项", "A") == 1.0  # option A, in Chinese
    assert score("choice", "The correct answer is C.", "C") == 1.0
    assert score("choice", "The correct answer is B1", "B") == 1.0  # as the recipe: only a Latin letter is a word
    assert score("choice", "B", "B") == 0.0  # the sentence is required
    assert score("choice", "The correct answer is **(B)**", "B") == 1.0  # Markdown bold around the letter
    assert score("choice", "The correct answer is (B)", "b") == 1.0  # a lower-case gold letter
    assert score("choice", "The correct answer is (B)", " (b) ") == 1.0


def test_choice_extraction_as_in_goLongRL():
    """GoLongRL's multi_choices: the sentence exactly as written (case, one space), options A-D, the
    parenthesised form anywhere before the bare one, the whole text after </think> (no [Answer] cut)."""
    assert score("choice", "the correct answer is (B)", "B") == 0.0
    assert score("choice", "The correct answer is  (B)", "B") == 0.0
    assert score("choice", "The correct answer is (E)", "E") == 0.0
    assert score("choice", "The correct answer is B, no: The correct answer is (C)", "C") == 1.0
    assert score("choice", "The correct answer is (A)\n[Answer] The correct answer is (B)", "A") == 1.0



def test_frames_scores_as_golongrls_frames_eval():
    """GoLongRL's Frames rule score (score_frame.py, cover exact match): the normalised reference (NFKD, lower case,
    articles, commas inside numbers and ASCII punctuation out, whitespace folded) between word boundaries of the
    normalised text after </think>; the judge's answer, what follows evalscope's last "the answer is". (A local
    differential run against that code, 2 x 30,000 generated cases, gave 0 mismatches.)"""
    from golong.rewards.metrics import frames_answer

    assert score("frames", "Therefore, the answer is Paris.", "paris") == 1.0
    assert score("frames", "It was THE Eiffel tower, built 1,889", "eiffel Tower built 1889") == 1.0
    assert score("frames", "It was THE Eiffel tower, built 1,889", "eiffel Tower 1889") == 0.0  # not contiguous
    assert score("frames", "in 2019", "2") == 0.0  # word boundaries: "2" is not in "2019"
    assert score("frames", "about 12.5 percent", "12,5") == 1.0  # as in the recipe: both read "125" at the end
    assert score("frames", "about 125 units", "12,5") == 1.0  # the comma rule joins the digits either side
    assert score("frames", "Café de Flore", "Cafe\u0301 de flore") == 1.0  # NFKD on both sides
    assert score("frames", "Smith's house", "smiths") == 1.0 and score("frames", "Smith", "Smiths") == 0.0
    assert score("frames", "anything", "the") == 0.0 and score("frames", "anything", "...") == 0.0  # empty target
    assert score("frames", "the answer is New York City", "York") == 1.0  # cover: contained, not equal
    assert compute_score("frames", "<think>Paris</think>Lyon", "Paris", timeout=None) == 0.0  # thinking not read
    assert frames_answer("**So** the answer is **Marie Curie**..") == "Marie Curie"
    assert frames_answer("the answer is 3. No wait, the answer is 4.") == "4"
    assert frames_answer("The answer is 4") == ""  # evalscope's test is case-sensitive: no answer for the judge


def test_lbv1qa_and_corpusqa_read_answers_as_golongrls_evals():
    """LongBench v1 QA (lbv1qa_eval.py): the answer after "Therefore, the answer is" on the last line holding it
    (any case), else the last non-empty line, cleaned of quotes, a final period and enclosing parentheses; scored by
    LongBench's QA F1 against the best reference. CorpusQA (corpusqa_eval.py): the rest of the line after the first
    "the answer is"; exact match of the normalised answer. (A local differential run against both scripts, 2 x
    30,000 generated cases, gave 0 mismatches in extraction and F1.)"""
    from golong.rewards.metrics import corpusqa_answer, lbv1qa_answer

    assert lbv1qa_answer("Therefore, the answer is (Paris).\nTHEREFORE the answer is: 'Lyon'") == "Lyon"
    assert lbv1qa_answer("I think.\n\n  \"Marseille\"  \n") == "Marseille"  # the last non-empty line
    assert lbv1qa_answer("Therefore the answer is \"Nice\".") == "Nice\""  # as the eval: quotes off, then the period
    assert score("lbv1qa", "Therefore, the answer is the Eiffel Tower.", ["Eiffel Tower"]) == 1.0
    # F1: 2 of 3 predicted words in a 2-word reference -> P 2/3, R 1, F1 0.8; the best reference counts
    assert score("lbv1qa", "Therefore, the answer is Eiffel Tower Paris", ["Eiffel Tower"]) == pytest.approx(0.8)
    assert score("lbv1qa", "Therefore, the answer is Paris", ["Lyon", "in Paris"]) == pytest.approx(2 / 3)
    assert score("lbv1qa", "Therefore, the answer is the", ["a"]) == 1.0  # both empty after articles: equal
    # text with a CJK ideograph: characters, punctuation kept (8 and 2)
    assert score("lbv1qa", "因此，答案是北京", ["北京"]) == pytest.approx(2 * 2 / (8 + 2))
    assert corpusqa_answer("So the answer is: 42 million\nThe answer is 7") == "42 million"
    assert corpusqa_answer("  no marker  ") == "no marker"
    assert score("corpusqa", "The answer is: $1,200.", "1200") == 1.0
    assert score("corpusqa", "The answer is 1,200 dollars", "1200") == 0.0  # exact, not contained
    assert compute_score("corpusqa", "<think>The answer is 5</think>6", "5", timeout=None) == 0.0


def test_docmath_scores_as_golongrls_docmath_eval(tmp_path):
    """GoLongRL's DocMath eval (evalscope's docmath rule score): the number of the first "the answer is N" after
    </think> (asterisks and parentheses ignored, currency and scale words dropped), else the whole answer read as a
    number, matched against the reference: equal up to a power of ten (12.5% against 0.125), within 0.15% after a
    factor of 100, equal when both are rounded up to two decimals, or within 0.15%. Signs count only in the last
    rule, as in the scorer. Checked against the scorer itself on 80,000 generated answers (the session's note)."""
    cases = [
        ("Therefore, the answer is 12.5.", "12.5", 1.0),
        ("Therefore, the answer is 12.5%.", "0.125", 1.0),  # a percentage against a fraction: a power of ten
        ("Therefore, the answer is 12.49%", "0.125", 1.0),  # x100 within 0.15%
        ("Therefore, the answer is 12.4%", "0.125", 0.0),
        ("Therefore, the answer is 1", "1000.5", 1.0),  # x1000 within 0.15%, tried after x100 fails
        ("Therefore, the answer is 100.1", "100", 1.0),  # within 0.15%
        ("Therefore, the answer is 100.2", "100", 0.0),
        ("Therefore, the answer is 1.231", "1.24", 1.0),  # both 1.24 rounded up to two decimals
        ("Therefore, the answer is 1.229", "1.24", 0.0),
        ("Therefore, the answer is -5", "5", 1.0),  # the power-of-ten rule compares magnitudes
        ("the answer is **$1,234.5** million", "1234.5", 1.0),
        ("Therefore, the answer is 2.5 million", "2500000", 1.0),
        ("the answer is 3, or rather... Therefore, the answer is 4", "4", 0.0),  # the first sentence counts
        ("42 dollars", "42", 1.0),  # no sentence: the whole answer, a unit word after the number dropped
        ("about 42 dollars", "42", 0.0),
        ("3 x 10^5", "300000", 1.0),
        ("x = 2/8", "0.25", 1.0),  # the part after "=", its arithmetic
        ("1, 2", "0", 0.0),  # a tuple is no number
        # what the scorer's eval computes: Python's operators (^ is xor), the math module's names (parentheses are
        # dropped before: no calls), sums of any length
        ("7//2", "3", 1.0), ("2^3", "1", 1.0), ("math.pi", "3.1416", 1.0), ("+".join(["1"] * 2000), "2000", 1.0),
        ("I could not find the figure in the document. " * 6, "0", 1.0),  # prose reads as 0, however long
        ("the answer is 0." + "3" * 250, "0.3333", 1.0),
        # only what eval evaluates: an if-else's untaken branch and and/or's undecisive operands are not
        ("2 if 1 else foo", "2", 1.0), ("5or 1/0", "5", 1.0), ("0 and 1/0", "0", 1.0),
        ("1 is 1", "1", 1.0),  # a comparison's bool, read as 1 as the scorer's comparison reads True
    ]
    for answer, gold, expect in cases:
        assert score("docmath", answer, gold) == expect, (answer, gold)
    # the answer after </think> only: a sentence in the think block is not read
    assert compute_score("docmath", "<think>Therefore, the answer is 7</think>\n\nnot sure", "7", timeout=None) == 0
    # the scorer hands the normalised answer to Python's eval; golong reads number literals and + - * / only
    marker = tmp_path / "ran"
    assert metrics_module.docmath_number(f"__import__('os').system('touch {marker}')") == 0
    assert metrics_module.docmath_number("1e5 * 2") == 200000.0 and metrics_module.docmath_number("(a)") is None
    assert not marker.exists()
    # its unit patterns backtrack quadratically on a long run of digits: it runs in the timed worker
    assert "docmath" in SANDBOXED
    start = time.monotonic()
    assert compute_score("docmath", R("1" * 200_000 + "x!"), "1", timeout=1.0) == 0.0
    assert time.monotonic() - start < 30
    assert compute_score("docmath", R("Therefore, the answer is 0.5"), "50", timeout=10.0) == 1.0  # the worker
    record = {"data_source": "docmath", "ability": "docmath",
              "reward_model": {"ground_truth": {"golden_label": "0.125"}}}
    assert route("docmath", "docmath") == "docmath"
    assert score_record(record, R("Therefore, the answer is 12.5%"), timeout=None) == 1.0


def test_minerva_grades_as_verls_math_dapo_without_math_verify():
    """GoLongRL's reward code grades data sources math_dapo, math, math_dapo_reasoning and math_longcot with verl's
    math_dapo.compute_score(is_use_math_verify=False): the last "Answer: X" line of the last 500 characters,
    normalised (after the last "=", units, articles, spaces and text markup dropped, shorthand frac / sqrt
    braced, thousands commas dropped), equal as text to the normalised gold. Checked against that code on 60,000
    generated answers (the session's note). math-verify scored a boxed answer there."""
    cases = [("Answer: 34", "34", 1.0), ("answer : 1,234", "1234", 1.0), ("ANSWER: \\frac12", "\\frac{1}{2}", 1.0),
             ("Answer: x = 5 dollars", "5", 1.0), ("Answer: $\\sqrt2$", "\\sqrt{2}", 1.0),
             ("Answer: 3\nAnswer: 4", "4", 1.0), ("Answer: 4\nAnswer: 3", "4", 0.0),  # the last line counts
             ("\\boxed{34}", "34", 0.0),  # no Answer line: math-verify would have read the box
             ("Answer: 0.5", "\\frac{1}{2}", 0.0),  # text, not value
             ("Answer: 34" + "x" * 500, "34", 0.0)]  # past the last 500 characters
    for answer, gold, expect in cases:
        assert score("minerva", answer, gold) == expect, (answer, gold)
    for source in ("math_dapo", "math", "math_dapo_reasoning", "math_longcot"):
        assert route(source) == "minerva"
        record = {"data_source": source, "reward_model": {"ground_truth": "34"}}
        assert score_record(record, "<think>x</think>Answer: 34", timeout=None) == 1.0
        assert score_record(record, "<think>x</think>\\boxed{34}", timeout=None) == 0.0
    assert route("math_dapo_math_verify") == route("math_longcot_math_verify") == "math_verify"

def test_mrcr_grades_as_openai_mrcr():
    """OpenAI MRCR's grade: 0 unless the reply starts with the random prefix; else difflib's ratio 2M / T of reply
    and gold message, the prefix taken off both (leading whitespace after </think> is not the reply's)."""
    gold = {"answer": "XYabce", "prefix": "XY"}
    assert score("mrcr", "XYabce", gold) == 1.0
    assert score("mrcr", "  XYabce", gold) == 1.0
    assert score("mrcr", "XYabcd", gold) == pytest.approx(0.75)  # M = 3 of T = 8 (with the prefix: 10 / 12)
    assert score("mrcr", "abce", gold) == 0.0  # no prefix
    assert score("mrcr", "ab XYabce", gold) == 0.0  # the prefix not first
    assert score("mrcr", "XYabce and more", gold) == pytest.approx(8 / 17)
    assert score("mrcr", "abce", "abcd") == pytest.approx(0.75)  # a plain gold string: no prefix rule
    # at 200+ characters difflib's autojunk makes the ratio depend on the order: reply first, gold second, as OpenAI
    from difflib import SequenceMatcher

    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789" + " " * 12
    gold_text = "".join(rng.choice(alphabet) for _ in range(300))
    reply = "".join(c if rng.random() > 0.2 else rng.choice(alphabet) for c in gold_text)  # 80% copied

    ordered, swapped = (SequenceMatcher(None, a, b).ratio() for a, b in ((reply, gold_text), (gold_text, reply)))
    assert ordered != swapped
    assert score("mrcr", "XY" + reply, {"answer": "XY" + gold_text, "prefix": "XY"}) == ordered
    assert "mrcr" in SANDBOXED  # quadratic in the worst case: graded under the reward time limit
    assert compute_score("mrcr", "XYabce", gold, timeout=None) == 0.0  # no </think>: the format gate
    assert compute_score("mrcr", R("XYabcd"), gold, timeout=10.0) == pytest.approx(0.75)  # the timed worker
    record = {"data_source": "openai_mrcr", "ability": "mrcr_2needle",
              "reward_model": {"ground_truth": {"golden_label": "XYabce"}},
              "extra_info": {"random_string_to_prepend": "XY"}}
    assert score_record(record, R("XYabcd"), timeout=None) == pytest.approx(0.75)
    assert score_record(record, R("abcd"), timeout=None) == 0.0


def test_f1_subem():
    # pred {a,b,c}, gold {a,b,d,e}: P = 2/3, R = 1/2, F1 = 2PR/(P+R) = 4/7
    assert score("f1", "A\nb\n c \nb", ["a", "b", "d", "e"]) == pytest.approx(4 / 7)
    assert score("f1", "x\ny", ["a"]) == 0.0
    assert score("f1", "a\nb", "a\nb") == 1.0
    # 2 of the 4 gold items present
    assert score("subem", "a\nc\nx", ["a", "b", "c", "d"]) == pytest.approx(0.5)
    assert score("subem", "", ["a"]) == 0.0


def test_longbench_pro_answer_area_as_in_goLongRL():
    """GoLongRL's LongBench-Pro reward (long_bench_pro.compute_score on the whole response): the answer
    is the text after the last "[Answer]" anywhere in the response (else after the last "[答案]"), and
    without a marker the whole response, think block included. Reference values worked out from it."""
    gold = ["a", "b"]
    # no marker: the first line of the response is "<think>", not the answer
    assert compute_score("accuracy", "<think>x</think>\na", gold, timeout=None) == 0.0
    assert compute_score("accuracy", "<think>x</think>\n[Answer]\na", gold, timeout=None) == 1.0
    # no marker: items listed while thinking count for SubEM (GoLongRL: 1.0) ...
    assert compute_score("subem", "<think>\na\nb\n</think>\nc", gold, timeout=None) == 1.0
    # ... and a marker inside the think block opens the answer there: lines "a", "</think>", "b"
    assert compute_score("subem", "<think>\n[Answer]\na\n</think>\nb", gold, timeout=None) == 1.0
    assert compute_score("f1", "<think>\n[Answer]\na\n</think>\nb", gold, timeout=None) == pytest.approx(0.8)
    # "[Answer]" wins over a later "[答案]": the answer is "a\n[答案] b" (F1 of {a, [答案] b}: 0.5)
    assert compute_score("f1", "<think>x</think>[Answer] a\n[答案] b", gold, timeout=None) == pytest.approx(0.5)
    assert compute_score("f1", "<think>x</think>[答案] a\n[Answer] b", gold, timeout=None) == pytest.approx(2 / 3)
    # the format gate still holds: two </think> score 0
    assert compute_score("subem", "<think>x</think></think>[Answer]\na\nb", gold, timeout=None) == 0.0


def test_longbench_pro_blank_and_repeated_lines_as_in_goLongRL():
    """GoLongRL splits the answer on every newline and keeps blank lines as items; {line: index} keeps a
    repeated line's last position. Reference values (NDCG from pytrec_eval, as GoLongRL computes it)."""
    gold = ["a", "b"]
    idcg = 2 + 1 / math.log2(3)
    # a blank line is a wrong item for F1 (P = 2/3), a pair for pairwise (1 of 3) and a rank for NDCG
    assert score("f1", "a\n\nb", gold) == pytest.approx(0.8)
    assert score("pairwise", "a\n\nb", gold) == pytest.approx(1 / 3)
    assert score("ndcg", "a\n\nb", gold) == pytest.approx(2 / idcg)  # b falls to rank 3, past k = 2
    assert score("subem", "a\n\nb", gold) == 1.0
    # a repeated line is ranked / ordered at its last copy: a, b, a ranks b, a
    assert score("ndcg", "a\nb\na", gold) == pytest.approx((1 + 2 / math.log2(3)) / idcg)
    assert score("pairwise", "a\nb\na", gold) == 0.0
    assert score("pairwise", "b\na\nb", gold) == pytest.approx(1 / 3)


def test_ndcg_hand():
    # gold a,b,c -> relevance 3,2,1; prediction b,a,d
    dcg = 2 / math.log2(2) + 3 / math.log2(3) + 0 / math.log2(4)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert score("ndcg", "b\na\nd", ["a", "b", "c"]) == pytest.approx(dcg / idcg)
    assert score("ndcg", "a\nb\nc\nz", ["a", "b", "c"]) == pytest.approx(1.0)
    # only the top k = 3 ranks count
    assert score("ndcg", "x\ny\nz\na", ["a", "b", "c"]) == 0.0
    # a repeated line keeps its first rank only: b, b, a ranks as b, a
    assert score("ndcg", "b\nb\na", ["a", "b", "c"]) == pytest.approx((2 + 3 / math.log2(3)) / idcg)
    # a repeated gold item takes its last copy's relevance and still counts in k, as in GoLongRL's qrels (a dict
    # over the items, k = len(answers)): gold a, b, a gives b relevance 2, a relevance 1
    assert score("ndcg", "b\na", ["a", "b", "a"]) == pytest.approx(1.0)
    assert score("ndcg", "a\nb", ["a", "b", "a"]) == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    # SubEM counts every gold item, repeated ones again (GoLongRL's normalize_answers keeps them all)
    assert score("subem", "3", ["3", "3", "5"]) == pytest.approx(2 / 3)
    assert score("subem", "5", ["3", "3", "5"]) == pytest.approx(1 / 3)
    # and a blank gold item is an item: a blank answer line matches it
    assert score("subem", "a\n\nz", ["a", "", "b"]) == pytest.approx(2 / 3)
    # pairwise counts each gold pair once (GoLongRL would count a, b twice in a, a, b and could score above 1)
    assert score("pairwise", "a\nb", ["a", "a", "b"]) == 1.0


def test_pairwise_hand():
    # gold a<b<c<d; prediction a,c,b,x: (a,b) ok, (a,c) ok, (b,c) wrong; 2 of C(4,2) = 6
    assert score("pairwise", "a\nc\nb\nx", ["a", "b", "c", "d"]) == pytest.approx(2 / 6)
    assert score("pairwise", "a\nb\nc", "a\nb\nc") == 1.0
    assert score("pairwise", "c\nb\na", ["a", "b", "c"]) == 0.0
    assert score("pairwise", "a", ["a", "b"]) == 0.0  # < 2 predicted items
    assert score("pairwise", "a\nb", ["a"]) == 0.0  # < 2 gold items
    # repeated gold items cannot push the score above 1
    assert score("pairwise", "a\nb", ["a", "b", "a", "b"]) == 1.0
    assert score("pairwise", "b\na", ["a", "b", "a", "b"]) == 0.0  # ... nor turn a wrong order into a right one
    # a repeated prediction line costs a pair in the denominator: a, a, b has C(3, 2) = 3 pairs, 1 right
    assert score("pairwise", "a\na\nb", ["a", "b"]) == pytest.approx(1 / 3)


def test_metric_edges_the_recipe_scores():
    """Edges no earlier case pinned down (a mutation audit changed each and every test still passed): blank lines
    in a gold list, a gold with surrounding whitespace, repeated table rows on both sides, Frames' leading word
    boundary, DocMath's inclusive 0.15%, the last 500 characters math-verify reads, LongBench v1 QA's answer without
    its parentheses, routing a MATH data source whatever its case."""
    from golong.rewards.metrics import MATH_TAIL_CHARS, docmath_match, frames, lbv1qa_answer
    from golong.rewards.tasks import route

    assert score("subem", "a\nb", "a\n\nb") == 1.0 and score("ndcg", "a\nb", "a\n\nb\n") == 1.0
    assert score("f1", "a\nb", "a\nb\n") == 1.0  # a blank gold line is no gold item
    assert compute_score("em", R("Paris"), "Paris\n") == 1.0
    rows = json.dumps({"data": [[1], [1]]})
    assert score("iou", f'<answer>{rows}</answer>', rows) == 1.0  # a multiset: both 1-rows match
    assert frames("Therefore, the answer is 1932", "32") == 0.0 and frames("the answer is 32 years", "32") == 1.0
    assert docmath_match(100.15, 100.0) and docmath_match(99.85, 100.0) and not docmath_match(100.16, 100.0)
    boxed = "\\boxed{7}"
    assert compute_score("math_verify", R(boxed + "x" * (MATH_TAIL_CHARS - len(boxed))), "7") == 1.0
    assert compute_score("math_verify", R(boxed + "x" * (MATH_TAIL_CHARS - len(boxed) + 1)), "7") == 0.0
    assert lbv1qa_answer("Therefore, the answer is (Paris).") == "Paris"
    assert route("MATH_lighteval") == route("math_lighteval") == "math_verify"


def test_iou_hand():
    gold = json.dumps({"data": [["y", 2], ["z", 3]]})
    # multisets P = {x, y, y}, G = {y, z}: |P & G| = 1, |P| + |G| - 1 = 4
    pred = '<answer>{"data": [["x", 1], ["y", 2], ["y", 2]]}</answer>'
    assert score("iou", pred, gold) == pytest.approx(0.25)
    # GoLongRL keys a list row by str() of its cells: "2" matches 2, but 3.0 does not match 3 (1 of 3)
    assert score("iou", '<answer>{"data": [["z", 3.0], ["y", "2"]]}</answer>', gold) == pytest.approx(1 / 3)
    # GoLongRL json.loads the <answer> text as it is: a Markdown fence does not parse (was 0.5)
    assert score("iou", '```json\n{"data": [["y", 2]]}\n```', gold) == 0.0
    assert score("iou", "<answer>{not json</answer>", gold) == 0.0
    assert score("iou", '<answer>{"rows": []}</answer>', gold) == 0.0
    # GoLongRL: matches / total only when total > 0, so two empty tables score 0 (was 1.0)
    assert score("iou", '<answer>{"data": []}</answer>', '{"data": []}') == 0.0
    # GoLongRL keys an object row by str(row): key order counts (was 1.0)
    assert score("iou", '<answer>{"data": [{"b": 1, "a": 2}]}</answer>', '{"data": [{"a": 2, "b": 1}]}') == 0.0
    assert score("iou", '<answer>{"data": [{"a": 2, "b": 1}]}</answer>', '{"data": [{"a": 2, "b": 1}]}') == 1.0
    # gold as a list of rows: one row alone is a row, not a table of its cells
    assert score("iou", '<answer>{"data": [["y", 2]]}</answer>', ['["y", 2]']) == 1.0
    assert score("iou", '<answer>{"data": [["y", 2]]}</answer>', ['["y", 2]', '["z", 3]']) == pytest.approx(0.5)
    assert score("iou", '<answer>{"data": [["y", 2], ["z", 3]]}</answer>', ['[["y", 2], ["z", 3]]']) == 1.0
    # GoLongRL's strip_answer takes the FIRST <answer> block (was: the last one, 1.0)
    assert score("iou", '<answer>{"data": []}</answer> no: <answer>{"data": [["y", 2], ["z", 3]]}</answer>',
                 gold) == 0.0
    # nested objects in cells are str()-ed as GoLongRL does: key order counts (was 1.0)
    assert score("iou", '<answer>{"data": [["k", {"b": 1, "a": [2]}]]}</answer>',
                 '{"data": [["k", {"a": [2], "b": 1}]]}') == 0.0


def test_iou_reads_the_whole_response_as_in_goLongRL():
    """GoLongRL's multitableqa reward gets the whole response (no </think> split): the first <answer> of
    it, else the whole text -- which holds the think block, so untagged JSON never parses."""
    table = '{"data": [["a", 1]]}'
    assert compute_score("iou", f"<think>x</think>\n<answer>{table}</answer>", table, timeout=None) == 1.0
    assert compute_score("iou", f"<think>x</think>\n{table}", table, timeout=None) == 0.0
    # an <answer> mentioned while thinking is the first one (GoLongRL: 0)
    assert compute_score("iou", f"<think>use <answer> tags</think><answer>{table}</answer>", table,
                         timeout=None) == 0.0
    assert compute_score("iou", '<think>x</think><answer>[["a", 1]]</answer>', table, timeout=None) == 0.0
    # the format gate still holds
    assert compute_score("iou", f"<answer>{table}</answer>", table, timeout=None) == 0.0


def test_math_verify_hand():
    assert compute_score("math_verify", R("so \\boxed{\\frac{1}{2}}"), "0.5") == 1.0
    assert compute_score("math_verify", R("\\boxed{3}"), "4") == 0.0
    assert compute_score("math_verify", R("The answer is 12."), "12") == 1.0
    assert compute_score("math_verify", R("\\boxed{2\\sqrt{2}}"), "\\sqrt{8}") == 1.0
    assert compute_score("math_verify", R("no number here"), "7") == 0.0
    # the gold is boxed whatever it holds, as the recipe boxes it ("\\$1,200" alone parses to nothing)
    assert compute_score("math_verify", R("\\boxed{1200}"), "\\$1,200") == 1.0
    assert compute_score("math_verify", R("\\boxed{\\frac{1}{2}}"), "$0.5$") == 1.0
    assert compute_score("math_verify", R("\\boxed{5}"), "\\boxed{5}") == 1.0
    # the final result is read from the end of a long answer
    long = "Step: 1 + 1 = 2. " * 200 + "\\boxed{41}"
    assert compute_score("math_verify", R(long), "41") == 1.0
    assert compute_score("math_verify", R(long), "2") == 0.0
    # GoLongRL's math_dapo (math_verify path) has no plain string match: what math-verify cannot parse
    # scores 0, even an answer identical to a non-mathematical gold string (was 1.0)
    assert compute_score("math_verify", R("Paris"), "Paris") == 0.0


def test_math_verify_reads_the_end_of_the_whole_response_as_in_goLongRL():
    """GoLongRL's math_longcot_math_verify scores the last 500 characters of the unsplit response."""
    pad = " and that is all there is to say about it" * 15  # 615 characters
    assert compute_score("math_verify", R("\\boxed{42}" + pad), "42") == 0.0  # the box is cut off
    assert compute_score("math_verify", R("\\boxed{42}" + pad[:400]), "42") == 1.0
    assert compute_score("math_verify", "<think>so \\boxed{42}</think>", "42") == 1.0  # boxed while thinking
    assert compute_score("math_verify", R("\\boxed{42}\n[Answer]"), "42") == 1.0  # no marker cut


def test_rouge_l_scores_the_whole_response_as_in_goLongRL():
    """GoLongRL's LongBench-Pro Summary normalises and scores the whole model output (no </think> split,
    no [Answer] cut): thinking words are prediction words, so a long think block lowers the score."""
    ref = "the cat sat on the mat"
    # the `rouge` package's words: "<think></think>the", cat, sat, on, the, mat (5 distinct reference words,
    # 6 distinct predicted); the LCS "cat sat on the mat" has 5 distinct words: P = 5/6, R = 1
    assert compute_score("rouge_l", "<think></think>the cat sat on the mat", ref, timeout=None) == pytest.approx(
        2 * (5 / 6) / (5 / 6 + 1), abs=1e-7)
    short = compute_score("rouge_l", "<think>ok</think>\nthe cat sat on the mat", ref, timeout=None)
    long = compute_score("rouge_l", "<think>" + "let me think " * 50 + "</think>\nthe cat sat on the mat", ref,
                         timeout=None)
    # distinct words count: 50 repetitions of "let me think" cost the precision of its 3 (+2 tag) words only
    assert long == pytest.approx(2 * (5 / 10) / (5 / 10 + 1), abs=1e-7)
    assert 0.0 < long < short < 1.0
    # a marker does not cut: "[answer]" is a predicted word too
    assert compute_score("rouge_l", "<think></think>\n[Answer] the cat sat on the mat", ref,
                         timeout=None) < compute_score("rouge_l", "<think></think>\nthe cat sat on the mat", ref,
                                                       timeout=None)


def test_rouge_l_hand():
    # the `rouge` package counts distinct words: {the, cat, lay, on, mat} vs {the, cat, sat, on, mat}; the
    # LCS "the cat on the mat" has 4 distinct words: P = R = 4/5, F = 2 P R / (P + R + 1e-8)
    p = 4 / 5
    assert score("rouge_l", "The cat lay on the mat.", "the cat sat on the mat") == 2 * (p * p) / (p + p + 1e-8)
    # max over references
    assert score("rouge_l", "a b c", ["x y z", "a b c"]) == 2 / (2 + 1e-8)
    assert score("rouge_l", "", ["a"]) == 0.0
    # sentences end at ".": the LCS is taken sentence by sentence, so order across sentences is free
    assert score("rouge_l", "c d. a b", "a b c d") == 2 / (2 + 1e-8)
    assert score("rouge_l", "c d a b", "a b c d") == 2 * 0.25 / (1 + 1e-8)
    # punctuation other than "." stays on its word
    assert score("rouge_l", "a, b", "a b") == 2 * 0.25 / (1 + 1e-8)
    # a reference with no sentence makes the package raise: the recipe (and golong) score 0
    assert score("rouge_l", "a summary", ["...", "a summary"]) == 0.0
    # Chinese is cut into jieba words: identical text scores 1, disjoint text 0
    assert score("rouge_l", "今天天气很好", "今天天气很好") == 2 / (2 + 1e-8)
    assert score("rouge_l", "苹果香蕉", "火车飞机") == 0.0


# ------------------------------------------------------------------ against the reference libraries


def test_ndcg_matches_pytrec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = random.Random(0)
    pool = [f"doc {i}" for i in range(12)]
    for case in range(300):
        k = rng.randint(1, 7)
        gold = rng.sample(pool, k)
        pred = rng.sample(pool, rng.randint(1, 10))
        qrels = {"q": {g: k - i for i, g in enumerate(gold)}}
        run = {"q": {p: float(len(pred) - i) for i, p in enumerate(pred)}}
        ev = pytrec_eval.RelevanceEvaluator(qrels, {f"ndcg_cut.{k}"})
        want = ev.evaluate(run)["q"][f"ndcg_cut_{k}"]
        got = score("ndcg", "\n".join(pred), gold)
        assert got == pytest.approx(want, abs=1e-9), (case, gold, pred)


# (response, references, the `rouge` package's score). The scores are GoLongRL's Summary reward as computed
# by rouge 1.0.1 (pltrdy/rouge, the recipe's package), run outside this repository: each text folded
# (lower-cased, whitespace runs to one space), max over the references of Rouge().get_scores(...)["rouge-l"]
# ["f"], 0 where it raised; for Chinese, jieba words joined by spaces first. Not a dependency of golong.
ROUGE_PACKAGE_CASES = [
    ("the cat sat on the mat, the dog lay on the rug. it rained.",
     ["The cat sat on the mat. The dog lay on the rug."], 0.7777777728395062),
    ("the cat sat on the mat, the dog lay on the rug. it rained.",
     ["The dog lay on the rug, and it rained. The cat sat."], 0.7999999950000002),
    ("The cat lay on the mat.", ["the cat sat on the mat"], 0.7999999950000002),
    ("<think>\nThe user wants a summary. Let me read the story again.\n</think>\n\nA storm hit the town on "
     "Monday. Schools closed, and the mayor asked people to stay home.",
     ["A storm hit the town on Monday. Schools closed and the mayor asked residents to stay home."],
     0.6666666619501135),
    ("the the the the cat cat. the mat mat mat", ["the cat on the mat"], 0.5714285665306124),
    ("Revenue grew 12% in 2023 (vs. 8% in 2022); costs fell.",
     ["Revenue grew 12% in 2023, vs 8% in 2022. Costs fell."], 0.699999995),
    ("wait . . . ok. so the answer is: yes", ["so . . the answer is yes"], 0.7142857093877552),
    ("a b c", ["x y z", "a b c d"], 0.8571428522448981),
    ("Alpha beta.\n\nGamma   delta.\tEpsilon", ["alpha BETA gamma. delta epsilon."], 0.999999995),
    ("...", ["a summary"], 0.0),  # ValueError: the response has no sentence
    ("a summary", ["...", "a summary"], 0.0),  # ValueError: a reference has no sentence
    ("x", ["x"], 0.999999995),
    ("no overlap at all here", ["completely different words"], 0.0),
    ("one two three four five six seven eight nine ten. " * 20,
     ["one three five seven nine. two four six eight ten."], 0.999999995),
    ("今天天气很好，我们去北京大学看看。", ["今天天气很好，我们去北京大学。"], 0.9411764656055364),
    ("<think>用户想要一个摘要。</think>公司今年的收入增长了百分之十二，成本下降。",
     ["公司收入增长百分之十二，成本下降了。"], 0.5714285670663266),
    ("苹果香蕉", ["火车飞机"], 0.0),
    ("模型在GPT-4.5上测试。结果很好", ["模型测试结果很好。"], 0.5555555511111112),
]


@pytest.mark.parametrize("response,refs,want", ROUGE_PACKAGE_CASES)
def test_rouge_l_matches_the_rouge_package(response, refs, want):
    """GoLongRL's Summary reward is the `rouge` package's summary-level rouge-l (sentences cut at ".",
    whitespace words, union-LCS over distinct words), not rouge-score's ROUGE-L: the same float, exactly."""
    assert rouge_l(response, refs) == want  # the metric itself: compute_score also wants one </think>


def test_rouge_l_matches_the_rouge_package_on_random_text():
    """Live against the package the recipe calls (a dev dependency), on the recipe's normalisation (lower case,
    whitespace folded): sentences cut at ".", punctuation on words, repeated words, several references."""
    from rouge import Rouge

    from golong.rewards.answer import fold

    rng = random.Random(11)
    words = ["the", "cat", "sat", "on", "mat", "a", "dog", "Ran", "far,", "away", "it", "rained", "x1", "and"]
    seps = [" ", " ", " ", ". ", ", ", ".", " . ", "\n"]
    text = lambda n: "".join(rng.choice(words) + rng.choice(seps) for _ in range(n))  # noqa: E731
    for _ in range(300):
        response, refs = text(rng.randint(1, 90)), [text(rng.randint(1, 40)) for _ in range(rng.randint(1, 3))]
        try:
            scores = Rouge().get_scores([fold(response)] * len(refs), [fold(r) for r in refs], avg=False)
            want = max(sc["rouge-l"]["f"] for sc in scores)
        except (ValueError, RecursionError):  # the recipe scores these 0 (an empty reference sentence list)
            want = 0.0
        assert rouge_l(response, refs) == pytest.approx(want, abs=1e-12), (response, refs)


def _rouge_l_by_table(response: list[list[str]], reference: list[list[str]]) -> float:
    """The definition, slowly: a full LCS table per (reference sentence, response sentence), walked back
    from its last cell (take a match; step back in the reference sentence only if that keeps a strictly
    longer LCS than stepping back in the response sentence), the distinct walked words pooled."""
    hits: set[str] = set()
    for x in reference:
        for y in response:
            t = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
            for i in range(1, len(x) + 1):
                for j in range(1, len(y) + 1):
                    t[i][j] = t[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(t[i - 1][j], t[i][j - 1])
            i, j = len(x), len(y)
            while i and j:
                if x[i - 1] == y[j - 1]:
                    hits.add(x[i - 1])
                    i, j = i - 1, j - 1
                elif t[i - 1][j] > t[i][j - 1]:
                    i -= 1
                else:
                    j -= 1
    if not hits:
        return 0.0
    p = len(hits) / len({w for s in response for w in s})
    r = len(hits) / len({w for s in reference for w in s})
    return 2.0 * ((p * r) / (p + r + 1e-8))


def test_rouge_l_bit_parallel_backtrack_matches_the_table(monkeypatch):
    rng = random.Random(3)
    for case in range(400):
        # a tiny row budget makes the backtrack recompute its rows from checkpoints
        monkeypatch.setattr(metrics_module, "ROUGE_ROW_BUDGET_BITS", rng.choice([1, 5, 64, 1 << 29]))
        vocab = [str(i) for i in range(rng.randint(1, 8))] + [".", ". .", "x,"]
        response = rouge_sentences(" ".join(rng.choices(vocab, k=rng.randint(1, 120))))
        reference = rouge_sentences(" ".join(rng.choices(vocab, k=rng.randint(1, 50))))
        if response and reference:
            assert rouge_l_summary(response, reference) == _rouge_l_by_table(response, reference), case


_sentence = st.lists(st.sampled_from("abcdef"), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(response=st.lists(_sentence, min_size=1, max_size=6), reference=st.lists(_sentence, min_size=1, max_size=4),
       seed=st.integers(0, 2**32))
def test_rouge_l_properties(response, reference, seed):
    text = ". ".join(" ".join(s) for s in response)
    ref = ". ".join(" ".join(s) for s in reference)
    f = rouge_l(text, ref)
    assert 0.0 <= f < 1.0
    assert f == _rouge_l_by_table(response, reference)
    # sentences are pooled as sets: their order on either side does not matter
    rng = random.Random(seed)
    shuffled = rng.sample(response, len(response))
    assert rouge_l(". ".join(" ".join(s) for s in shuffled), ref) == f
    assert rouge_l(text, ". ".join(" ".join(s) for s in rng.sample(reference, len(reference)))) == f
    # a text against itself: every distinct word is on some sentence's LCS
    assert rouge_l(text, text) == 2 / (2 + 1e-8)
    # one sentence each, no word repeated: the hits are the LCS length whichever LCS the walk picks, so the
    # score is symmetric and is the plain LCS F1 (the package is not symmetric in general: the walk's ties)
    x, y = list(dict.fromkeys(response[0])), list(dict.fromkeys(reference[0]))
    t = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if x[i - 1] == y[j - 1] else max(t[i - 1][j], t[i][j - 1])
    fx, fy = rouge_l(" ".join(x), " ".join(y)), rouge_l(" ".join(y), " ".join(x))
    assert fx == fy == pytest.approx(2 * t[-1][-1] / (len(x) + len(y)), abs=1e-7)


def test_rouge_l_is_not_symmetric_like_the_package():
    # rouge 1.0.1 gives 0.4999999950000001 one way and 0.749999995 the other (its backtrack's tie-break)
    a, b = "c b b . b c a d b a b b . b", "d c . . a"
    assert (rouge_l(a, b), rouge_l(b, a)) == (0.4999999950000001, 0.749999995)


def test_rouge_l_long_inputs_are_fast():
    """The package's O(|r| |c|) Python table takes ~0.25 s on a 2K-word response; its recursive backtrack
    raises RecursionError on a ~1,000-word sentence (the recipe then scores 0; golong scores it)."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(400)]
    ref = " ".join(rng.choice(words) + rng.choice(["", "", ".", ","]) for _ in range(300))
    resp = " ".join(rng.choice(words) + rng.choice(["", "", "", ".", ","]) for _ in range(2000))
    t = time.perf_counter()
    for _ in range(20):
        f = rouge_l(resp, ref)
    assert 0.0 < f < 1.0
    assert (time.perf_counter() - t) / 20 < 0.05
    one_sentence = resp.replace(".", "")  # 2,000 words and no "."
    assert 0.0 < rouge_l(one_sentence, ref.replace(".", "")) < 1.0
    t = time.perf_counter()
    for big in ("a. " * 350_000, " ".join(rng.choice(words) for _ in range(180_000))):  # ~1 MB each
        assert 0.0 <= rouge_l(big, ref) <= 1.0
    assert time.perf_counter() - t < 5.0


# ------------------------------------------------------------------ robustness

_adversarial = st.one_of(
    st.text(max_size=300),
    st.text(alphabet="{}[]\\$^_\"':,<>/ \n0123456789abc", max_size=300),
    st.builds(lambda n: "{" * n + "}" * (n // 2), st.integers(0, 5000)),
    st.builds(lambda n: '<answer>{"data": ' + "[" * n + "]" * n + "}</answer>", st.integers(0, 3000)),
    st.builds(lambda s, n: (s + "\n") * n, st.text(max_size=20), st.integers(0, 20000)),
    st.just("\x00" * 1000 + "The correct answer is (A)\x00"),
    st.just("\\boxed{" * 200),
    st.just("[Answer]" * 50 + "[答案]"),
)
_gold = st.one_of(st.text(max_size=60), st.lists(st.text(max_size=20), max_size=6),
                  st.just('{"data": [["a", 1]]}'), st.just(["doc 1", "doc 2"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=_adversarial, gold=_gold, think=st.sampled_from(["<think>x</think>", "", "</think></think>"]))
def test_fuzz_scores_in_unit_interval(body, gold, think):
    # every metric, through the timed pool, on random and adversarial text
    items = [(m, think + body, gold) for m in METRIC_NAMES]
    scores = score_batch(items, timeout=10.0, num_workers=2)
    for m, s in zip(METRIC_NAMES, scores):
        assert isinstance(s, float) and 0.0 <= s <= 1.0, (m, s)
    # the inline path of the linear-time metrics must not raise either
    for m in METRIC_NAMES:
        if m not in ("math_verify", "rouge_l"):
            s = compute_score(m, think + body, gold, timeout=None)
            assert 0.0 <= s <= 1.0


def test_huge_inputs_are_fast():
    big = R(("lorem ipsum dolor " * 60_000) + "\nthe cat sat")  # ~1 MB answer
    t = time.perf_counter()
    for m in METRIC_NAMES:
        if m != "math_verify":
            assert 0.0 <= compute_score(m, big, ["the cat sat", "dolor"], timeout=None) <= 1.0
    assert time.perf_counter() - t < 20.0


def test_blank_padded_answers_stay_linear():
    # 400 KB of blank padding: the fenced-JSON strip of `iou` was quadratic in whitespace runs (~2 min here)
    for pad in (" ", "\n", " \t\n"):
        answer = R('<answer>{"data": [' + pad * (400_000 // len(pad)) + '["a", 1]]}</answer>')
        t = time.perf_counter()
        for m in METRIC_NAMES:
            if m not in ("math_verify", "rouge_l"):
                compute_score(m, answer, '{"data": [["a", 1]]}', timeout=None)
        assert time.perf_counter() - t < 10.0, repr(pad)
        assert compute_score("iou", answer, '{"data": [["a", 1]]}', timeout=None) == 1.0
    # (a fenced table does not parse: GoLongRL json.loads the <answer> text as it is)
    assert compute_score("iou", R("<answer>```json\n" + "\n" * 100_000 + '{"data": [["a", 1]]}\n```</answer>'),
                         '{"data": [["a", 1]]}', timeout=None) == 0.0


def _score_in_daemon(queue) -> None:
    t = time.perf_counter()
    s = compute_score("math_verify", R("\\boxed{9^{9^{9^{9^{9}}}}}"), "3", timeout=1.0)
    queue.put((s, time.perf_counter() - t))


def _run_daemonic(target, timeout: float):
    """What `target(queue)` puts on its queue, run in a spawned daemonic process (killed afterwards): a hang
    there fails the test by the queue's timeout instead of stalling pytest."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(queue,), daemon=True)
    proc.start()
    try:
        return queue.get(timeout=timeout)
    finally:
        proc.kill()


def test_time_limit_holds_inside_a_daemonic_process():
    # DataLoader / Ray / multiprocessing workers are daemonic: the scoring pool must still time out there
    score, seconds = _run_daemonic(_score_in_daemon, timeout=120)
    assert score == 0.0 and seconds < 60.0


def _batch_inline(queue) -> None:
    t = time.perf_counter()
    items = [("math_verify", R("\\boxed{9^{9^{9^{9^{9}}}}}"), "3"), ("math_verify", R("\\boxed{7}"), "7"),
             # (LongBench-Pro F1 reads the lines after [Answer]; without it the think block's lines count too)
             ("f1", R("[Answer]\na\nb"), ["a"]), ("rouge_l", R("a b c"), "a b c")]
    queue.put((score_batch(items, timeout=1.0, num_workers=0), time.perf_counter() - t))


def test_inline_batch_keeps_the_time_limit_of_math_verify():
    # rollout.reward_workers=0 scores in the trainer: sympy parsing of model output must still run in a timed
    # worker (it used to run inline without a limit: one tower of powers hung the trainer)
    scores, seconds = _run_daemonic(_batch_inline, timeout=90)
    # (GoLongRL's Summary scores the whole response: think, some, reasoning, think, a, b, c -> P 3/7, R 1)
    assert scores == [0.0, 1.0, pytest.approx(2 / 3), pytest.approx(0.6)] and seconds < 60.0


def test_memory_limit_stops_a_runaway_job_before_its_time_limit():
    # 2^{2^{40}} has 2^40 bits: sympy / gmpy grow it without bound (1.4 GB after 20 s with no limit). Under a
    # 256 MiB limit it fails within seconds and scores 0, long before the 120 s time limit; the next job runs.
    from golong.rewards.pool import get_pool

    items = [("math_verify", R("\\boxed{2^{2^{40}}}"), "3"), ("math_verify", R("\\boxed{7}"), "7")]
    score_batch(items[1:], timeout=120.0, num_workers=1, memory_mb=256)  # start-up out of the timing
    t = time.perf_counter()
    scores = score_batch(items, timeout=120.0, num_workers=1, memory_mb=256)
    seconds = time.perf_counter() - t
    assert scores == [0.0, 1.0] and seconds < 60.0 and get_pool(1, 256).timeouts == 0
    for bad in (0, -5, 1.5, True, "2048"):
        with pytest.raises(ValueError, match="memory limit"):
            score_batch(items[1:], num_workers=1, memory_mb=bad)


_PARENT = r"""
import sys
from golong.rewards import compute_score
compute_score("math_verify", "<think>t</think>\\boxed{9^{9^{9^{9^{9}}}}}", "3", timeout=600)
"""


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"golong.rewards.worker" in cmd:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_worker_dies_with_a_killed_parent():
    # a trainer stopped by SIGKILL / SIGTERM runs no atexit hook, and a worker stuck in sympy never reads
    # its closed pipe: the kernel must take the worker down with its parent
    import subprocess
    import sys

    parent = subprocess.Popen([sys.executable, "-c", _PARENT], cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while time.monotonic() < deadline and not workers:
            workers = _children(parent.pid)
            time.sleep(0.2)
        assert workers, "no worker started"
        time.sleep(3.0)  # past start-up: the worker is inside the hanging job
        assert all(_alive(w) for w in workers)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)


def test_bad_timeouts_raise():
    for bad in (float("nan"), 0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="finite number of seconds > 0"):
            compute_score("math_verify", R("\\boxed{1}"), "1", timeout=bad)
        with pytest.raises(ValueError, match="finite number of seconds > 0"):
            score_batch([("em", R("x"), "x")], timeout=bad, num_workers=1)


def test_non_string_inputs_score_zero():
    assert compute_score("em", None, "x") == 0.0  # type: ignore[arg-type]
    assert score_batch([("f1", 123, ["x"])], num_workers=0) == [0.0]  # type: ignore[list-item]


def test_score_region_clamps_and_catches(monkeypatch):
    from golong.rewards.metrics import score_region

    # whatever a metric returns or raises, the reward is a float in [0, 1]
    for out, want in ((1.5, 1.0), (-0.25, 0.0), (float("nan"), 0.0), (float("inf"), 0.0), (0.375, 0.375)):
        monkeypatch.setitem(METRICS, "em", lambda region, gold, out=out: out)
        assert score_region("em", "x", "x") == want, out

    def boom(region, gold):
        raise RecursionError

    monkeypatch.setitem(METRICS, "em", boom)
    assert score_region("em", "x", "x") == 0.0


def test_unknown_metric_raises():
    with pytest.raises(ValueError, match="known metrics: em"):
        compute_score("bleu", R("x"), "x")
    # every metric says what it reads: one left out of SCOPES would score 0 on every response, silently
    from golong.rewards.scoring import SCOPES

    assert SCOPES.keys() == METRICS.keys() and set(SCOPES.values()) == {"after_think", "marked", "whole"}


def test_timeout_kills_hanging_math_verify():
    tower = R("\\boxed{9^{9^{9^{9^{9}}}}}")  # math-verify/sympy never finishes this one
    get_pool(1).map([("em", "x", "x")], 30.0)  # start the worker outside the timed region
    t = time.perf_counter()
    assert compute_score("math_verify", tower, "3", timeout=1.0) == 0.0
    assert time.perf_counter() - t < 8.0
    # in a batch, the hanging item scores 0 and its neighbours are still scored
    pool = get_pool(2)
    before = pool.timeouts
    items = [("math_verify", R("\\boxed{7}"), "7"), ("math_verify", tower, "3"), ("em", R("ok"), "ok"),
             ("math_verify", R("\\boxed{\\frac{6}{4}}"), "1.5")]
    report = FunctionReport()
    assert score_batch(items, timeout=1.5, num_workers=2, report=report) == [1.0, 0.0, 1.0, 1.0]
    assert pool.timeouts == before + 1
    # counted for the trainer's reward/scoring_failures (it was only the pool's counter, read by nothing)
    assert report.lost == [(1, "metric math_verify ran past the 1.5 s time limit (rollout.reward_timeout_s)")]
    assert not report.errors
    # the same inline (num_workers=0: math-verify alone goes to its timed worker): the item's own index
    report = FunctionReport()
    assert score_batch([("em", R("no"), "ok"), *items], timeout=1.5, num_workers=0, report=report) == [
        0.0, 1.0, 0.0, 1.0, 1.0]
    assert report.lost == [(2, "metric math_verify ran past the 1.5 s time limit (rollout.reward_timeout_s)")]
    # the pool recovered: a following batch is scored normally
    assert score_batch(items[:1] * 4, timeout=5.0, num_workers=2) == [1.0] * 4


def test_pool_survives_a_dying_worker():
    import threading

    from golong.rewards.pool import ScoringPool

    pool = ScoringPool(1)
    try:
        tower = answer_region(R("\\boxed{9^{9^{9^{9^{9}}}}}"))
        jobs = [("math_verify", tower, "3"), ("em", "ok", "ok"), ("f1", "a\nb", ["a"])]
        out: list = []
        report = FunctionReport()
        th = threading.Thread(target=lambda: out.append(pool.map(jobs, timeout=60.0, report=report)))
        th.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (pool.workers and pool.workers[0].ready and pool.workers[0].queue):
            time.sleep(0.05)
        time.sleep(0.3)  # the hanging job is running
        pool.workers[0].proc.kill()  # e.g. the OOM killer
        th.join(60)
        assert out == [[0.0, 1.0, pytest.approx(2 / 3)]]
        assert pool.restarts == 1 and pool.timeouts == 0
        assert report.lost == [(0, "the scoring worker died (exit code -9) while scoring metric math_verify")]
        pool.workers[0].proc.kill()  # dead between calls: replaced on the next call
        pool.workers[0].proc.wait()
        assert pool.map(jobs[1:], timeout=30.0) == [1.0, pytest.approx(2 / 3)]
    finally:
        pool.close()


def test_a_worker_that_dies_before_reading_its_chunk_costs_no_job():
    """A worker killed between two batches (still looking alive when the next one was sent) was charged the first
    job of the chunk it never read: that response scored 0 (a reward function's was reported as failed). Its
    chunk now goes back whole; a worker that dies after reading ("took") is charged its running job, as before."""
    import os
    import signal
    import threading

    from golong.rewards.pool import ScoringPool

    pool = ScoringPool(2)
    try:
        pool.start()
        for w in pool.workers:  # stopped: the chunks are written into their pipes and never read
            os.kill(w.proc.pid, signal.SIGSTOP)
        jobs = [("em", "ok", "ok")] * 6
        report, out = FunctionReport(), []
        th = threading.Thread(target=lambda: out.append(pool.map(jobs, timeout=60.0, report=report)))
        th.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(w.queue for w in pool.workers):
            time.sleep(0.05)
        first = list(pool.workers)
        for w in first:
            w.proc.kill()
        th.join(60)
        assert out == [[1.0] * 6] and report.lost == [] and report.errors == []
        assert pool.restarts == 2 and not any(w is v for w in pool.workers for v in first)
    finally:
        pool.close()


def test_pool_workers_leave_stop_signals_to_the_trainer():
    """Slurm signals every process of a job: a worker that SIGTERM / SIGUSR1 ended took its running job's
    score with it (0), so the step the trainer finishes before it checkpoints would score differently from the
    uninterrupted run's. Workers ignore them (they die with the trainer)."""
    import signal

    from golong.rewards.pool import ScoringPool

    pool = ScoringPool(1)
    try:
        assert pool.map([("em", "ok", "ok")], timeout=30.0) == [1.0]  # started and ready
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            pool.workers[0].proc.send_signal(sig)
        time.sleep(0.5)
        assert pool.workers[0].proc.poll() is None
        assert pool.map([("em", "ok", "ok"), ("f1", "a\nb", ["a"])], timeout=30.0) == [1.0, pytest.approx(2 / 3)]
        assert pool.restarts == 0
    finally:
        pool.close()


def test_batch_8192_responses_in_seconds():
    from golong.data.synthetic import generate, reference_response
    from golong.rewards import score_records

    recs = generate(64, 40, seed=5)
    recs = [recs[i % len(recs)] for i in range(8192)]
    rng = random.Random(0)
    good = [rng.random() < 0.5 for _ in recs]
    responses = [reference_response(r) if g else R("wrong\nanswer") for r, g in zip(recs, good)]
    get_pool(2).map([("em", "x", "x")], 30.0)  # exclude worker start-up from the timing
    t = time.perf_counter()
    from golong.rewards import RewardConfig

    scores = score_records(recs, responses, config=RewardConfig(timeout=10.0, num_workers=2))
    dt = time.perf_counter() - t
    # (GoLongRL's Summary scores the whole response: the think tags cost a summary a little precision)
    assert [s == 1.0 or (r.ability == "summarization" and s > 0.9) for r, s in zip(recs, scores)] == good
    assert dt < 30.0, f"8192 responses took {dt:.1f} s"


# ------------------------------------------------------------------ task routing and records


def test_metric_for_capabilities_and_longbench_pro():
    # accuracy: LongBench-Pro QA subtasks; retrieval_calculate / model_verify / minerva: data sources' own rewards;
    # mrcr, docmath, frames, lbv1qa, corpusqa: the model card's benchmarks' grades (golong data import)
    assert set(CAPABILITIES.values()) == set(METRIC_NAMES) - {"accuracy", "retrieval_calculate", "model_verify",
                                                              "mrcr", "docmath", "minerva", "frames", "lbv1qa",
                                                              "corpusqa"}
    assert CAPABILITIES == {  # DESIGN.md: each capability type with its natural metric
        "precise_retrieval": "em", "comprehension": "choice", "exhaustive_retrieval": "f1",
        "numerical_reasoning": "math_verify", "structured_extraction": "iou", "structured_matching": "subem",
        "graded_ranking": "ndcg", "sequence_ordering": "pairwise", "summarization": "rouge_l"}
    assert metric_for("ROUGE") == metric_for("rougeL") == metric_for("summary") == "rouge_l"
    assert metric_for("precise_retrieval") == "em"
    assert metric_for("Graded Ranking") == "ndcg"
    assert metric_for("sequence-ordering") == "pairwise"
    assert metric_for("comprehension") == "choice"
    assert len(LONGBENCH_PRO) == 25
    assert [n.split()[0] for n in LONGBENCH_PRO] == [
        "T1.1", "T1.2", "T2.1", "T2.2", "T3.1", "T3.2", "T4.1", "T4.2", "T5.1", "T5.2", "T6.1", "T6.2",
        "T6.3", "T7.1", "T7.2", "T7.3", "T8.1", "T8.2", "T8.3", "T9.1", "T9.2", "T10.1", "T10.2",
        "T11.1", "T11.2"]
    assert metric_for("T1.1 Global Cohesive Retrieval") == "ndcg"
    assert metric_for("T2.1 Global Timeline Reconstruction") == "pairwise"
    assert metric_for("T3.2 Single-Hop Fact QA") == "accuracy"
    assert metric_for("T4.2 Query-Focused Summary") == "rouge_l"
    assert metric_for("T6.3 Global Frequency Analysis") == "pairwise"
    assert metric_for("T8.3") == "subem"
    assert metric_for("t8.3 ") == "subem"
    assert metric_for(" T2.1 Global Timeline Reconstruction ") == "pairwise"  # spacing and case variants
    assert metric_for("t7.1 global conflict & inconsistency localization") == "f1"
    assert metric_for("T11.2 Short-Range Reference Resolution & State Query") == "accuracy"
    for m in METRIC_NAMES:
        assert metric_for(m) == m
    with pytest.raises(ValueError, match=r"precise_retrieval.*LongBench-Pro subtasks T1\.1 \.\.\. T11\.2"):
        metric_for("T12.1 Made Up")


def test_route_by_data_source():
    assert route("EM") == "em"
    assert route("selection") == "choice"
    assert route("multitableqa_pretraining") == "iou"
    assert route("math_longcot_math_verify") == "math_verify"
    assert route("longbench_pro", "long_context", "T5.1 Full-Sentence Citation Alignment") == "f1"
    assert route("whatever", "summarization", None) == "rouge_l"
    assert route("retrieval_calculate") == "retrieval_calculate"
    # the benchmarks of `golong data import`: the source's metric where reward_mode and ability name no task (the
    # importer's abilities name the task reported); a record naming one keeps it
    assert route("openai_mrcr", "mrcr_8needle") == "mrcr" and route("longbench_v2", "longbench_v2") == "choice"
    assert route("longbench_v2", "summarization") == "rouge_l" and route("longbench_v2", "x", "em") == "em"
    # as in GoLongRL's reward code: a data source it names decides, whatever reward_mode / ability say;
    # otherwise reward_mode wins over ability, ability over a data_source pattern
    assert route("EM", "summarization", "T1.1 Global Cohesive Retrieval") == "em"
    assert route("retrieval_calculate", "math", "math_verify") == "retrieval_calculate"
    assert route("longbench_pro", "summarization", "T1.1 Global Cohesive Retrieval") == "ndcg"
    assert route("longbench_pro", "summarization", None) == "rouge_l"
    assert route("my_math_set", "summarization", None) == "rouge_l"
    assert route("my_math_set", "long_context", None) == "math_verify"
    assert route("math_dapo", "summarization", None) == "minerva"  # a source the recipe names
    with pytest.raises(ValueError, match="data_source='mystery'"):
        route("mystery", "unknown ability", None)


def test_an_unknown_task_name_gets_the_closest_known_one_and_a_short_list():
    """A misspelt reward_mode / ability / task: the error suggests the nearest name and groups the known ones (the
    25 LongBench-Pro subtasks by number range, not 25 full names on one line)."""
    with pytest.raises(ValueError) as e:
        route("mystery", "long_context", "T2.1 Global Timeline Reconstructon")
    msg = str(e.value)
    assert "did you mean 'T2.1 Global Timeline Reconstruction'?" in msg and "T1.1 ... T11.2" in msg
    assert "capability types precise_retrieval" in msg and "T7.3" not in msg and len(msg) < 800
    with pytest.raises(ValueError, match="did you mean 'graded_ranking'"):
        metric_for("graded_rankng")
    with pytest.raises(ValueError) as e:
        metric_for("poetry")
    assert "did you mean" not in str(e.value) and "metric names em" in str(e.value)


def _verl(data_source, gt, reward_mode=None, ability="long_context"):
    return {"data_source": data_source, "prompt": [{"role": "user", "content": "q"}], "ability": ability,
            "reward_model": {"style": "rule", "ground_truth": gt},
            "extra_info": {"reward_mode": reward_mode} if reward_mode else {}}


def test_score_record_goLongRL_layouts():
    lbp = _verl("longbench_pro", {"doc_ids": ["e1", "e2", "e3"], "golden_label": "", "summary": ""},
                "T2.1 Global Timeline Reconstruction")
    # GoLongRL's LongBench-Pro reward reads the lines after the last [Answer] of the whole response ...
    assert score_record(lbp, R("[Answer]\ne1\ne3\ne2")) == pytest.approx(2 / 3)
    # ... and with no marker every line of it, think block and blank line included: 2 of C(7, 2) = 21 pairs
    assert score_record(lbp, R("e1\ne3\ne2")) == pytest.approx(2 / 21)
    em = _verl("EM", [{"doc_ids": [], "golden_label": "7", "summary": ""},
                      {"doc_ids": [], "golden_label": "42", "summary": ""}])  # list of dicts: last one
    assert score_record(em, R("42")) == 1.0 and score_record(em, R("7")) == 0.0
    # both fields filled: list metrics read doc_ids, the others golden_label
    both = {"doc_ids": ["d1", "d2"], "golden_label": "d2", "summary": ""}
    assert score_record(_verl("x", both, "subem"), R("d1\nd2")) == 1.0
    assert score_record(_verl("x", both, "subem"), R("d2")) == pytest.approx(0.5)
    assert score_record(_verl("x", both, "em"), R("d2")) == 1.0
    assert score_record(_verl("x", both, "em"), R("d1")) == 0.0
    sel = _verl("selection", {"golden_label": "The correct answer is (C)", "doc_ids": []})
    assert score_record(sel, R("The correct answer is (C)")) == 1.0
    tab = _verl("multitableqa_pretraining", {"golden_label": '{"data": [[1, 2]]}'})
    assert score_record(tab, R('<answer>{"data": [[1, 2]]}</answer>')) == 1.0
    math_rec = _verl("math_longcot_math_verify", {"golden_label": "\\frac{3}{4}"})
    assert score_record(math_rec, R("\\boxed{0.75}")) == 1.0
    assert score_record(math_rec, "\\boxed{0.75}") == 0.0  # no think block
    assert score_record(math_rec, "\\boxed{0.75}", require_think=False) == 1.0


def test_rouge_l_cuts_chinese_as_the_records_language_field_says():
    """GoLongRL's LongBench-Pro records name the references' language in ground_truth["summary"], and the recipe
    cuts both sides into jieba words iff it is "Chinese" (an English summary quoting a Chinese name is not cut);
    records without that field (other data) are cut where the reference has CJK characters."""
    import jieba
    from rouge import Rouge

    from golong.rewards.answer import fold

    def recipe(response: str, refs: list[str], zh: bool) -> float:  # its Summary_Max_Rouge_L on folded text
        response, refs = fold(response), [fold(r) for r in refs]
        if zh:
            response, refs = " ".join(jieba.lcut(response)), [" ".join(jieba.lcut(r)) for r in refs]
        return max(s["rouge-l"]["f"] for s in Rouge().get_scores([response] * len(refs), refs, avg=False))

    response = "<think>\nthe summary.\n</think>\n\nHuawei (华为公司) released a new phone. it sold well in China."
    refs = ["Huawei, known as 华为公司, released a phone. The phone sold well.", "A phone was released."]
    want = {zh: recipe(response, refs, zh) for zh in (False, True)}
    assert abs(want[False] - want[True]) > 0.05  # the cut matters here
    for language, zh in (("English", False), ("Chinese", True), ("", True), ("a summary text", True)):
        record = _verl("longbench_pro", {"doc_ids": refs, "golden_label": "", "summary": language},
                       "T4.2 Query-Focused Summary")
        assert score_record(record, response) == pytest.approx(want[zh], abs=1e-12), language


def test_score_record_takes_rows_read_with_pandas():
    """pandas reads parquet list columns as numpy arrays: doc_ids raised numpy's "truth value of an array is
    ambiguous", a list of ground-truth dicts was not taken for one."""
    np = pytest.importorskip("numpy")
    lbp = _verl("longbench_pro", {"doc_ids": np.array(["e1", "e2", "e3"], dtype=object), "golden_label": "",
                                  "summary": ""}, "T2.1 Global Timeline Reconstruction")
    assert score_record(lbp, R("[Answer]\ne1\ne3\ne2")) == pytest.approx(2 / 3)
    em = _verl("EM", np.array([{"doc_ids": np.array([]), "golden_label": "7"},
                               {"doc_ids": np.array([]), "golden_label": "42"}], dtype=object))
    assert score_record(em, R("42")) == 1.0 and score_record(em, R("7")) == 0.0


def test_judge_model_sources_score_their_math_verify_records_as_the_recipe_does():
    """GoLongRL scores records of its judge-model data sources (names containing model_verify, model_judge,
    retrieval_summary_calculate) in reward_mode math_verify without the judge: 1 when the text after </think> is
    the record's extra_info.ground_truth, else math-verify of that text (not of the whole response). golong
    scored them as plain math_verify records: a name was never right, a number boxed in the think block was."""
    assert route("docmath_model_verify", "long_context", "math_verify") == "model_verify"
    assert route("frames_retrieval_summary_calculate", None, "math_verify") == "model_verify"
    for mode in ("model_judge", "model_compare", None):  # the recipe needs its judge model for these
        with pytest.raises(ValueError, match="judge model in GoLongRL, which golong does not run.*only "
                                             "reward_mode 'math_verify'"):
            route("qa_retrieval_model_judge", "long_context", mode)

    def judged(label, answer):
        return {**_verl("frames_model_verify", {"doc_ids": [], "golden_label": label, "summary": ""}),
                "extra_info": {"reward_mode": "math_verify", "ground_truth": answer}}

    name = judged("Ada Lovelace", "Ada Lovelace")
    assert score_record(name, R("Ada Lovelace")) == 1.0
    # the exact answer is extra_info.ground_truth, not the label
    assert score_record(judged("Ada Lovelace", "Augusta Ada King"), R("Augusta Ada King")) == 1.0
    assert score_record(_verl("x", {"golden_label": "Ada Lovelace"}, "math_verify"), R("Ada Lovelace")) == 0.0
    assert score_record(name, R("Charles Babbage")) == 0.0
    assert score_record(name, "<think>Ada Lovelace</think>") == 0.0  # the answer is what follows </think>
    assert score_record(name, "Ada Lovelace") == 0.0  # no think block: the format gate
    num = judged("\\frac{3}{4}", "3/4")
    assert score_record(num, R("3/4")) == 1.0
    assert score_record(num, R("so it is \\boxed{0.75}")) == 1.0  # math-verify of the answer
    assert score_record(num, R("\\boxed{0.7}")) == 0.0
    think_only = "<think>\\boxed{0.75}</think>\n\nI am not sure."
    assert score_record(num, think_only) == 0.0
    assert score_record(_verl("math_longcot_math_verify", {"golden_label": "\\frac{3}{4}"}), think_only) == 1.0
    # no extra_info.ground_truth: the exact answer is the label
    bare = _verl("frames_model_verify", {"doc_ids": [], "golden_label": "Ada Lovelace", "summary": ""}, "math_verify")
    assert score_record(bare, R("Ada Lovelace")) == 1.0


def _retrieval_answer(ids: str, reasoning: str) -> str:
    """The answer part (after </think>) of GoLongRL's retrieval_calculate format."""
    return (f"<relevant_doc_ids>{ids}</relevant_doc_ids>\n<summary>s</summary>\n"
            f"<continue_reasoning>{reasoning}</continue_reasoning>")


def test_retrieval_calculate_needs_the_exact_documents_and_the_number():
    """GoLongRL's hard reward: the cited documents as a set equal to the gold ones AND the number."""
    gold = {"doc_ids": ["<|doc_3|>", "<|doc_14|>"], "golden_label": "\\frac{7}{18}"}
    right = "so the total is \\boxed{\\dfrac{7}{18}}"
    assert score("retrieval_calculate", _retrieval_answer("<|doc_14|>, <|doc_3|>", right), gold) == 1.0
    assert score("retrieval_calculate", _retrieval_answer("<|doc_3|> <|doc_14|> <|doc_3|>", right), gold) == 1.0
    for ids, reasoning in [("<|doc_3|>", right),  # a gold document missing
                           ("<|doc_3|>, <|doc_14|>, <|doc_15|>", right),  # one too many
                           ("doc_3, doc_14", right),  # not the document tokens
                           ("<|doc_3|>, <|doc_14|>", "\\boxed{7/19}"),  # the wrong number
                           ("<|doc_3|>, <|doc_14|>", "  ")]:  # no reasoning
        assert score("retrieval_calculate", _retrieval_answer(ids, reasoning), gold) == 0.0, (ids, reasoning)
    # a missing or unclosed block, or the blocks only in the think part, score 0
    assert score("retrieval_calculate", f"<relevant_doc_ids><|doc_3|>, <|doc_14|></relevant_doc_ids> {right}",
                 gold) == 0.0
    assert score("retrieval_calculate", _retrieval_answer("<|doc_3|>, <|doc_14|>", right)
                 .replace("</continue_reasoning>", ""), gold) == 0.0
    in_think = _retrieval_answer("<|doc_3|>, <|doc_14|>", right)
    assert compute_score("retrieval_calculate", f"<think>{in_think}</think> 7/18", gold, timeout=None) == 0.0
    # an [Answer] marker inside the reasoning does not cut the blocks away (GoLongRL reads the whole answer)
    marked = _retrieval_answer("<|doc_3|>, <|doc_14|>", "[Answer] " + right)
    assert score("retrieval_calculate", marked, gold) == 1.0
    # the LongBench-Pro metrics do cut there: what precedes the last [Answer] is not their answer
    assert compute_score("accuracy", R("7/18\n[Answer] 1/2"), ["7/18"], timeout=None) == 0.0
    assert compute_score("accuracy", R("1/2\n[Answer] 7/18"), ["7/18"], timeout=None) == 1.0
    # it runs math-verify on model output, so it runs under the time limit
    tower = _retrieval_answer("<|doc_3|>, <|doc_14|>", "\\boxed{9^{9^{9^{9^{9}}}}}")
    t = time.perf_counter()
    assert compute_score("retrieval_calculate", R(tower), gold, timeout=1.0) == 0.0
    assert time.perf_counter() - t < 30.0


def test_retrieval_calculate_records():
    gt = {"doc_ids": ["<|doc_1|>", "<|doc_2|>"], "golden_label": "12", "summary": ""}
    rec = _verl("retrieval_calculate", gt, reward_mode="math_verify")
    good = R(_retrieval_answer("<|doc_2|>, <|doc_1|>", "3 * 4 = \\boxed{12}"))
    assert score_record(rec, good, timeout=None) == 1.0
    assert score_record(rec, R("\\boxed{12}"), timeout=None) == 0.0  # the number alone is not enough
    assert score_batch([("retrieval_calculate", good, {"doc_ids": gt["doc_ids"], "golden_label": "12"})],
                       num_workers=1) == [1.0]


def test_reward_code_never_evals_model_output():
    import re

    src = "\n".join(p.read_text() for p in Path(__file__).parents[2].joinpath("golong", "rewards").glob("*.py"))
    # builtin eval/exec/compile/__import__ calls (re.compile and the like are attribute calls: allowed)
    assert not re.search(r"(?<![\w.])(eval|exec|compile|__import__)\s*\(", src)
    assert "literal_eval" not in src and "sympify" not in src
    assert METRICS.keys() == set(METRIC_NAMES)
