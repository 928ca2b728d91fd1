"""The eleven reward metrics. Each maps (answer region, ground truth) -> float in [0, 1].

`region` is the already-extracted answer text (see answer.py); `gold` is a string or a list of gold
strings (gold items in order), or for `retrieval_calculate` the record's {"doc_ids", "golden_label"}.
These functions may raise on garbage; `score_region` is the safe entry point that turns any
exception into 0.0. Nothing here evaluates model output as code: JSON is read with `json.loads`,
maths with math-verify's parser.

All metrics except `math_verify` (and `retrieval_calculate`, which calls it) run in time linear (or
near-linear) in the response length: ROUGE-L uses a bit-parallel LCS, so a 1 MB response against a
1K-token summary scores in well under a second.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable
from itertools import combinations
from typing import Any

from golong.rewards.answer import fold, gold_items, last_occurrence, lines

Gold = str | list[str] | dict[str, Any]


def _gold_strings(gold: Gold) -> list[str]:
    return [gold] if isinstance(gold, str) else [str(g) for g in gold]


# ---------------------------------------------------------------- exact / set metrics


def em(region: str, gold: Gold) -> float:
    """1 if the answer region equals a gold string (both stripped, case-sensitive)."""
    return float(any(region.strip() == g.strip() for g in _gold_strings(gold)))


def accuracy(region: str, gold: Gold) -> float:
    """1 if the first line of the answer equals the first gold item."""
    pred, ref = lines(region), gold_items(gold)
    return float(bool(ref) and pred[0] == ref[0])


def f1(region: str, gold: Gold) -> float:
    """Set F1 between the answer's lines and the gold items. As in GoLongRL's LongBench-Pro F1_Score, a
    blank line inside the answer is a (wrong) predicted item: "a\n\nb" against {a, b} has P = 2/3."""
    pred, ref = set(lines(region)), set(gold_items(gold))
    common = len(pred & ref)
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def subem(region: str, gold: Gold) -> float:
    """Fraction of gold items that appear among the answer's lines."""
    pred, ref = set(lines(region)), gold_items(gold)
    if not ref:
        return 0.0
    return sum(g in pred for g in ref) / len(ref)


# ---------------------------------------------------------------- ranking / ordering


def ndcg(region: str, gold: Gold) -> float:
    """NDCG@k, k = number of gold items; gold item i (0-based) has relevance k - i, linear gain.

    As GoLongRL scores it (pytrec_eval `ndcg_cut.k` over the run {line: n - index}): every line of the
    answer is a ranked document, a blank line included (it takes a rank and gains nothing), and a
    repeated line is ranked where its last copy stands. Discount log2(rank + 2), 0-based rank.
    """
    ref = gold_items(gold)
    k = len(ref)
    if k == 0:
        return 0.0
    pos = last_occurrence(lines(region))
    ranking = sorted(pos, key=pos.__getitem__)
    rel = {g: k - i for i, g in enumerate(ref)}
    dcg = sum(rel.get(p, 0) / math.log2(r + 2) for r, p in enumerate(ranking[:k]))
    idcg = sum((k - i) / math.log2(i + 2) for i in range(k))
    return dcg / idcg


def pairwise(region: str, gold: Gold) -> float:
    """Gold-ordered pairs found in the answer's order / C(n, 2), n = the answer's line count.

    As in GoLongRL's Pairwise_Accuracy: 0 when either side has fewer than 2 items; every line counts in
    the denominator, blank and repeated ones included (a padded answer is penalised), and a repeated
    line is ordered by its last copy. Gold items missing from the prediction cost nothing: two items in
    the right order score 1.0 -- watch the answers' item counts in the logs.
    """
    pred, ref = lines(region), gold_items(gold)
    if len(pred) < 2 or len(ref) < 2:
        return 0.0
    pos = last_occurrence(pred)
    total = len(pred) * (len(pred) - 1) // 2
    # gold items absent from the prediction cannot form a correct pair: only walk the present ones
    present = [pos[g] for g in ref if g in pos]
    correct = sum(1 for a, b in combinations(present, 2) if a < b)
    return correct / total


# ---------------------------------------------------------------- multiple choice

# GoLongRL's multi_choices reward: the literal sentence, case as written, one space, options A-D; the
# parenthesised form anywhere wins over the bare one. golong adds a word boundary to the bare form
# ("The correct answer is Definitely" names no option; GoLongRL reads a D there).
_CHOICE_PAREN = re.compile(r"The correct answer is \(([A-D])\)")
_CHOICE_BARE = re.compile(r"The correct answer is ([A-D])\b")


def _choice_letter(text: str) -> str | None:
    """The letter of the FIRST 'The correct answer is (X)' in text (Markdown '*' removed), else of the
    first 'The correct answer is X', as GoLongRL extracts it."""
    text = text.replace("*", "")
    m = _CHOICE_PAREN.search(text) or _CHOICE_BARE.search(text)
    return m.group(1) if m else None


def _gold_letter(gold: str) -> str | None:
    letter = _choice_letter(gold)
    if letter is not None:
        return letter
    g = gold.strip().strip("()").strip()
    return g.upper() if len(g) == 1 and g.isalpha() else None


def choice(region: str, gold: Gold) -> float:
    """The first 'The correct answer is (X)' of the answer against a gold letter or the same sentence."""
    pred = _choice_letter(region)
    if pred is None:
        return 0.0
    return float(any(_gold_letter(g) == pred for g in _gold_strings(gold)))


# ---------------------------------------------------------------- structured extraction

def _table_rows(text: str) -> list[Any] | None:
    """Rows of a `{"data": [...]}` JSON object (or a bare JSON list); None when not a table."""
    obj = json.loads(text)
    rows = obj.get("data") if isinstance(obj, dict) else obj
    return rows if isinstance(rows, list) else None


def _gold_rows(gold: Gold) -> list[Any] | None:
    """Gold table rows: a table string, or a list of rows (each a JSON value). A one-item list is a whole
    table when it reads as one ({"data": ...}, or a list of lists / objects), else a single row."""
    if isinstance(gold, str):
        return _table_rows(gold)
    values = [json.loads(g) for g in gold]
    if len(values) == 1:
        v = values[0]
        if isinstance(v, dict) and "data" in v or isinstance(v, list) and v and all(
                isinstance(r, (list, dict)) for r in v):
            return _table_rows(gold[0])
    return values


def _row_key(row: Any) -> Any:
    """GoLongRL's row identity: a list row is the tuple of str() of its cells, any other row its str()
    (so 3 and "3" match, 3.0 and 3 do not, and an object's key order counts)."""
    return tuple(str(v) for v in row) if isinstance(row, list) else str(row)


def _answer_tag(text: str) -> str:
    """GoLongRL's strip_answer: the text from the FIRST <answer> to the next </answer> (to the end when
    unclosed), stripped; the whole text when there is no <answer>."""
    start = text.find("<answer>")
    if start < 0:
        return text.strip()
    body = text[start + len("<answer>"):]
    end = body.find("</answer>")
    return (body if end < 0 else body[:end]).strip()


def iou(region: str, gold: Gold) -> float:
    """Multiset Jaccard of rows, as GoLongRL's multitableqa reward: the `{"data": [...]}` object in the
    response's first <answer> block against the gold table.

    `region` is the whole response (think block included), so an answer without <answer> tags does not
    parse. An unparsable answer, or one that is not an object, has no rows; two empty tables score 0
    (GoLongRL: matches / total when total > 0, else 0); an unparsable gold scores 0.
    """
    ref = _gold_rows(gold)
    if ref is None:
        return 0.0
    try:
        obj = json.loads(_answer_tag(region))
        pred = obj.get("data", []) if isinstance(obj, dict) else []
    except (ValueError, RecursionError):
        pred = []
    if not isinstance(pred, list):
        return 0.0
    p, g = Counter(_row_key(r) for r in pred), Counter(_row_key(r) for r in ref)
    inter = sum((p & g).values())
    total = len(pred) + len(ref) - inter
    return inter / total if total > 0 else 0.0


# ---------------------------------------------------------------- summarisation

_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def rouge_tokens(text: str, chinese: bool = False) -> list[str]:
    """rouge-score's default tokenizer (no stemming); jieba words for Chinese text."""
    if chinese:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        return [t for t in (w.strip().lower() for w in jieba.lcut(text)) if t]
    return [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if t]


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison-Dix / Hyyro).

    One big-int update per token of `b` over a |a|-bit vector: O(|a| |b| / 64) word operations.
    """
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, t in enumerate(a):
        masks[t] = masks.get(t, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for t in b:
        m = masks.get(t)
        if m is not None:
            u = v & m
            v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l_f(reference: list[str], prediction: list[str]) -> float:
    lcs = lcs_length(reference, prediction)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(prediction), lcs / len(reference)
    return 2 * p * r / (p + r)


def rouge_l(region: str, gold: Gold) -> float:
    """Max ROUGE-L F1 of `region` over the gold references (jieba tokens for Chinese).

    `region` is the whole response, think block included: GoLongRL's LongBench-Pro Summary scores the
    unsplit response (no </think> split, no [Answer] cut), so every word of thinking costs precision.
    """
    refs = [fold(g) for g in _gold_strings(gold)]
    pred = fold(region)
    if not pred:
        return 0.0
    best = 0.0
    for ref in refs:
        zh = bool(_CJK.search(ref))
        best = max(best, rouge_l_f(rouge_tokens(ref, zh), rouge_tokens(pred, zh)))
    return best


# ---------------------------------------------------------------- numerical reasoning

MATH_TAIL_CHARS = 500  # GoLongRL's math_dapo reads the last 500 characters: the final result lives there


def math_verify(region: str, gold: Gold) -> float:
    """math-verify equivalence of the last MATH_TAIL_CHARS of `region` with the gold answer, as GoLongRL's
    math_dapo (is_use_math_verify): parse, a quick match of the parsed string, then verify against
    \\boxed{gold}. `region` is the whole response (math_longcot_math_verify gets it unsplit), so an
    answer boxed at the end of the think block counts when little follows it.

    No time limit of its own (math-verify's signal alarms are disabled): run it through
    `compute_score(..., timeout=...)` or `score_batch`, which enforce one per process.
    math-verify parses LaTeX with its own grammar; its plain-expression fallback hands sympy only
    strings its regex reduced to digits, dots, spaces and + - * / ^ ( ), never names or calls.
    """
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    text = region[-MATH_TAIL_CHARS:]
    golds = _gold_strings(gold)
    pred = parse(text, parsing_timeout=None)
    if not pred:
        return 0.0
    if len(pred) > 1 and any(str(pred[1]).strip() == g.strip() for g in golds):
        return 1.0
    for g in golds:
        wrapped = g if ("\\boxed" in g or "$" in g) else f"\\boxed{{{g}}}"
        ref = parse(wrapped, parsing_timeout=None)
        if ref and verify(ref, pred, timeout_seconds=None):
            return 1.0
    return 0.0


_DOC_ID = re.compile(r"<\|doc_\d+\|>")


def _tag_body(text: str, tag: str) -> str | None:
    """Text between the first <tag> and the next </tag> (str.find: linear, unlike a lazy regex
    retried from every unclosed opening)."""
    start = text.find(f"<{tag}>")
    if start < 0:
        return None
    start += len(tag) + 2
    end = text.find(f"</{tag}>", start)
    return None if end < 0 else text[start:end]


def retrieval_calculate(region: str, gold: Gold) -> float:
    """GoLongRL's retrieval-then-calculate reward, all or nothing: 1 when the <relevant_doc_ids> block
    names exactly the gold documents (as a set of <|doc_N|> tokens) and the <continue_reasoning> block
    reaches the gold number (math_verify); gold = {"doc_ids": [...], "golden_label": "..."}."""
    if not isinstance(gold, dict):
        return 0.0
    ids, reasoning = _tag_body(region, "relevant_doc_ids"), _tag_body(region, "continue_reasoning")
    if ids is None or reasoning is None or not reasoning.strip():
        return 0.0
    pred = set(_DOC_ID.findall(ids))
    if not pred or pred != {str(d).strip() for d in gold.get("doc_ids") or []}:
        return 0.0
    return math_verify(reasoning.strip(), str(gold.get("golden_label") or ""))


METRICS: dict[str, Callable[[str, Gold], float]] = {
    "em": em,
    "accuracy": accuracy,
    "choice": choice,
    "f1": f1,
    "math_verify": math_verify,
    "iou": iou,
    "subem": subem,
    "ndcg": ndcg,
    "pairwise": pairwise,
    "rouge_l": rouge_l,
    "retrieval_calculate": retrieval_calculate,
}


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known metrics: {', '.join(METRICS)}")


def score_region(metric: str, region: str | None, gold: Gold) -> float:
    """Safe scoring in this process: any exception, NaN or out-of-range value becomes 0 / clamped."""
    if region is None:
        return 0.0
    try:
        s = float(METRICS[metric](region, gold))
    except Exception:  # a reward never raises on model output
        return 0.0
    if not math.isfinite(s):
        return 0.0
    return min(1.0, max(0.0, s))
