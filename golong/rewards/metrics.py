"""The eighteen reward metrics. Each maps (region, ground truth) -> float in [0, 1].

`region` is the part of the response the metric reads, cut by scoring.SCOPES (the text after </think>, the
LongBench-Pro answer area, or the whole response); `gold` is a string or a list of gold strings (gold items in
order), or for `retrieval_calculate` the record's {"doc_ids", "golden_label"} and for `model_verify` {"answer",
"golden_label"} and for `mrcr` {"answer", "prefix"}; for `docmath` the reference number as text, for `frames` and
`corpusqa` the reference answer, for `lbv1qa` the list of reference answers. These functions may raise on garbage;
`score_region` is the safe entry point that turns any exception into 0.0. Nothing here evaluates model output as
code: JSON is read with `json.loads`, maths with math-verify's parser, DocMath's arithmetic from a syntax tree
(numbers and operators, no names or calls of the response's own).

All metrics except `math_verify` (and `retrieval_calculate` / `model_verify`, which call it), `mrcr` and `docmath`
(its unit patterns backtrack on long runs of digits) run in time linear (or near-linear) in the response length:
ROUGE-L (the `rouge` package's summary-level union-LCS) uses a bit-parallel LCS and backtrack, so a 1 MB response
against a 300-word summary scores in about 0.1 s.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import operator
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable
from difflib import SequenceMatcher
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
    rel = {g: k - i for i, g in enumerate(ref)}  # a repeated gold item: its last copy's relevance, as the qrels
    dcg = sum(rel.get(p, 0) / math.log2(r + 2) for r, p in enumerate(ranking[:k]))
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(rel.values(), reverse=True)[:k]))
    return dcg / idcg


def pairwise(region: str, gold: Gold) -> float:
    """Gold-ordered pairs found in the answer's order / C(n, 2), n = the answer's line count.

    As in GoLongRL's Pairwise_Accuracy: 0 when either side has fewer than 2 items; every line counts in
    the denominator, blank and repeated ones included (a padded answer is penalised), and a repeated
    line is ordered by its last copy. Gold items missing from the prediction cost nothing: two items in
    the right order score 1.0 -- watch the answers' item counts in the logs.
    """
    # each gold pair once (GoLongRL counts a repeated item's pairs again, which can score above 1)
    pred, ref = lines(region), list(dict.fromkeys(gold_items(gold)))
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
# parenthesised form anywhere wins over the bare one. golong requires the bare letter not to start a Latin word
# ("The correct answer is Definitely" names no option; GoLongRL reads a D there), and only a Latin one: "A项" (option
# A in Chinese) and "A." still read A.
_CHOICE_PAREN = re.compile(r"The correct answer is \(([A-D])\)")
_CHOICE_BARE = re.compile(r"The correct answer is ([A-D])(?![A-Za-z])")


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
#
# GoLongRL's LongBench-Pro Summary reward is the `rouge` package's (pltrdy/rouge 1.0.1) "rouge-l" F score,
# maxed over the references, of the folded (lower-cased, whitespace-folded) whole response. That package's
# ROUGE-L is the summary-level union-LCS, counted over distinct words, which is not rouge-score's ROUGE-L:
#
#   sentences  the text cut at every "." (no other punctuation); empty pieces are dropped, and a piece of
#              only spaces (". ." in the text) is kept as a sentence of one empty word;
#   words      each sentence split at whitespace: punctuation other than "." stays on its word ("mat,");
#   hits       for each reference sentence r and each response sentence c, ONE longest common subsequence
#              of r and c, the one a backtrack through the prefix table from its last cell picks (take a
#              match, else step back in r only when that keeps a longer LCS than stepping back in c); the
#              hits are the number of distinct words in the union of all those subsequences;
#   P, R       hits / distinct response words, hits / distinct reference words (so a repeated word costs
#              or earns nothing after its first occurrence);
#   F          2 P R / (P + R + 1e-8).
#
# The package computes each LCS with an O(|r| |c|) Python table and a recursive backtrack. Here one
# bit-parallel LCS (Hyyro) runs over all response sentences at once, laid side by side in one integer with
# a zero guard bit after each to stop carries, one update per reference word; the backtrack then walks all
# response sentences together, one reference word per step, with a few integer operations on the stored rows
# (bit-reversed, so that "the nearest candidate cell to the left" is a lowest-set-bit search, which
# subtraction does for every sentence in parallel). Cost: O(|reference| |response| / 64) word operations.

ROUGE_LANGUAGES = ("Chinese", "English")  # the values GoLongRL's LongBench-Pro records give ground_truth["summary"]
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
ROUGE_ROW_BUDGET_BITS = 1 << 29  # DP rows kept at once (64 MB); longer inputs recompute rows from checkpoints
_REVERSED_BYTE = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def rouge_sentences(text: str, chinese: bool = False) -> list[list[str]]:
    """The sentences (lists of words) the `rouge` package reads in an already folded text.

    With `chinese`, the text is first cut into jieba words joined by spaces, as the recipe does.
    """
    if chinese:
        import jieba

        jieba.setLogLevel(logging.WARNING)
        text = " ".join(jieba.lcut(text))
    return [piece.split() or [""] for piece in text.split(".") if piece]


def _reverse_bits(x: int, nbits: int) -> int:
    """Bit p of `x` (p < nbits) moved to bit nbits - 1 - p."""
    nbytes = (nbits + 7) // 8
    return int.from_bytes(x.to_bytes(nbytes, "little").translate(_REVERSED_BYTE), "big") >> (8 * nbytes - nbits)


def _bits(positions: list[int], nbits: int) -> int:
    buf = bytearray((nbits + 7) // 8)
    for p in positions:
        buf[p >> 3] |= 1 << (p & 7)
    return int.from_bytes(buf, "little")


class _Response:
    """The response sentences side by side: sentence s takes bits base_s .. base_s + len_s - 1, then one guard
    bit. Match masks exist only for the words of `vocabulary` (the reference's): no other word is looked up."""

    def __init__(self, sentences: list[list[str]], vocabulary: set[str]):
        where: dict[str, list[int]] = {w: [] for w in vocabulary}
        guards, starts, pos = [], [], 0
        for sentence in sentences:
            starts.append(pos)
            for w in sentence:
                if w in where:
                    where[w].append(pos)
                pos += 1
            guards.append(pos)
            pos += 1
        self.nbits = n = pos
        guard = _bits(guards, n)
        self.tokens = (1 << n) - 1 ^ guard
        self.match = {w: _bits(ps, n) for w, ps in where.items() if ps}
        self.match_rev = {w: _reverse_bits(m, n) for w, m in self.match.items()}
        self.tokens_rev = _reverse_bits(self.tokens, n)
        self.guard_rev = _reverse_bits(guard, n)
        self.sentinel_rev = self.guard_rev | 1 << n  # a stop above every sentence, the first one included
        self.done_rev = _reverse_bits(_bits(starts, n), n)  # every sentence's backtrack has reached column 0

    def _row(self, v: int, word: str) -> int:
        m = self.match.get(word)
        if m is None:
            return v
        u = v & m
        return ((v + u) | (v - u)) & self.tokens  # the guard bit takes a sentence's carry; then cleared

    def lcs_words(self, ref: list[str]) -> set[str]:
        """The words of the backtracked LCS of `ref` with each response sentence, all sentences together.

        Row i of the table (after ref[:i]) as bits: bit p is 0 where LCS(ref[:i], c[:j+1]) exceeds
        LCS(ref[:i], c[:j]) for the column j of p in its sentence c. From cell (i, j) the backtrack moves left
        until column j-1 holds ref[i-1] (a match: take it, go to (i-1, j-1)) or a 0 bit (the LCS would shrink:
        go up to (i-1, j)); past column 0 the sentence is done. In bit-reversed rows the cells to the left
        are the higher bits, so with one marker bit per sentence the nearest candidate is found for every
        sentence at once: clear each sentence's bits up to its marker, subtract the markers shifted by one,
        and the bits that went from 1 to 0 are the candidates (or the next guard: nothing left).
        """
        n, step = self.nbits, max(1, ROUGE_ROW_BUDGET_BITS // self.nbits)
        checkpoints, rows, v = [], [], self.tokens
        for i, w in enumerate(ref):
            if i % step == 0:
                checkpoints.append(v)
                rows = []
            v = self._row(v, w)
            rows.append(v)
        found: set[str] = set()
        marker, done = self.guard_rev, self.done_rev  # every sentence starts at its last column
        for b in range(len(checkpoints) - 1, -1, -1):
            start = b * step
            if b < len(checkpoints) - 1:  # rows of this block again, from its checkpoint
                rows, v = [], checkpoints[b]
                for w in ref[start:start + step]:
                    v = self._row(v, w)
                    rows.append(v)
            for i in range(len(rows) - 1, -1, -1):
                word = ref[start + i]
                here = self.match_rev.get(word, 0)
                candidates = (self.tokens_rev ^ _reverse_bits(rows[i], n)) | here | self.sentinel_rev
                candidates &= ~((marker - self.guard_rev) << 1)
                nearest = candidates & ~(candidates - (marker << 1))
                taken = nearest & here
                if taken:
                    found.add(word)
                marker = taken | (nearest ^ taken) >> 1
                if marker == done:
                    return found
        return found


def rouge_l_summary(response: list[list[str]], reference: list[list[str]]) -> float:
    """The `rouge` package's rouge-l F of `response` against `reference` (both from `rouge_sentences`).

    The package raises ValueError when either side has no sentence (the recipe then scores 0; so does this).
    Its recursive backtrack also raises RecursionError (and the recipe scores 0) once a sentence pair needs
    some 1,000 steps, e.g. a 1,000-word run without a "." -- every long Chinese response, whose full stop is
    "。". That is an artefact of Python's recursion limit, not of the metric: golong scores such pairs.
    """
    if not response or not reference:
        return 0.0
    ref_words = {w for s in reference for w in s}
    resp = _Response(response, ref_words)
    hits: set[str] = set()
    for sentence in reference:
        hits |= resp.lcs_words(sentence)
    if not hits:
        return 0.0
    p = len(hits) / len({w for s in response for w in s})
    r = len(hits) / len(ref_words)
    return 2.0 * ((p * r) / (p + r + 1e-8))


def rouge_l(region: str, gold: Gold) -> float:
    """GoLongRL's LongBench-Pro Summary: max over the gold references of the `rouge` package's rouge-l F.

    `region` is the whole response, think block included: the recipe scores the unsplit response (no
    </think> split, no [Answer] cut), folded like each reference (lower-cased, whitespace runs to one space).
    A reference with no sentence makes the package raise for the whole call, so the recipe scores 0: so does
    golong. `gold`: the references, or {"references": ..., "language": "Chinese" | "English"}. Chinese: the
    recipe cuts both sides into jieba words when its `language` argument is "Chinese" (ground_truth["summary"]
    of its LongBench-Pro records); so does golong where the gold names a language, and where it names none (other
    data) cuts them when the reference has CJK characters (per reference).
    """
    language = gold.get("language") if isinstance(gold, dict) else None
    refs = [fold(g) for g in _gold_strings(gold["references"] if isinstance(gold, dict) else gold)]
    pred = fold(region)
    if not pred or not refs:
        return 0.0
    sentences: dict[bool, list[list[str]]] = {}
    best = 0.0
    for ref in refs:
        zh = language == "Chinese" if language in ROUGE_LANGUAGES else bool(_CJK.search(ref))
        if zh not in sentences:
            sentences[zh] = rouge_sentences(pred, zh)
        reference = rouge_sentences(ref, zh)
        if not reference:
            return 0.0
        best = max(best, rouge_l_summary(sentences[zh], reference))
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
    for g in golds:  # wrapped as the recipe does, whatever the gold holds ("\\$1,200" parses only inside a box)
        ref = parse(f"\\boxed{{{g}}}", parsing_timeout=None)
        if ref and verify(ref, pred, timeout_seconds=None):
            return 1.0
    return 0.0


# verl's math_dapo grader without math-verify (the Minerva / lm-evaluation-harness rule), which GoLongRL's reward code
# gives the data sources math_dapo, math, math_dapo_reasoning and math_longcot: the last "Answer: ..." line of the
# last MATH_TAIL_CHARS characters, normalised, equal as text to the normalised gold. The rewrites, in their order:
_MINERVA_ANSWER = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
_MINERVA_REPLACED = (("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
                     (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"))
_MINERVA_DROPPED = ("square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots", "sue",
                    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
                    "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
                    "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}",
                    "\\;", ",\\!", "{,}", '"', "\\dots")
_MINERVA_PATTERNS = ((re.compile(r"(.*?)(\$)(.*?)(\$)(.*)"), "$\\3$"), (re.compile(r"(\\text\{)(.*?)(\})"), "\\2"),
                     (re.compile(r"(\\textbf\{)(.*?)(\})"), "\\2"), (re.compile(r"(\\overline\{)(.*?)(\})"), "\\2"),
                     (re.compile(r"(\\boxed\{)(.*)(\})"), "\\2"),
                     (re.compile(r"(frac)([^{])(.)"), "frac{\\2}{\\3}"),  # \fracab -> \frac{a}{b}
                     (re.compile(r"(sqrt)([^{])"), "sqrt{\\2}"))  # \sqrta -> \sqrt{a}


def minerva_normal(answer: str) -> str:
    """A final answer as the Minerva rule compares it: the part after the last "=", spaces, articles, units and
    text markup dropped, the first $...$ kept, shorthand \\frac / \\sqrt braced, thousands commas of a whole
    number dropped."""
    s = answer.split("=")[-1]
    for before, after in _MINERVA_REPLACED:
        s = s.replace(before, after)
    for dropped in _MINERVA_DROPPED:
        s = s.replace(dropped, "")
    for pattern, repl in _MINERVA_PATTERNS:
        s = pattern.sub(repl, s)
    s = s.replace("$", "")
    if s.replace(",", "").isdigit():
        s = s.replace(",", "")
    return s.strip()


def minerva(region: str, gold: Gold) -> float:
    """1 when the last "Answer: X" line of the last MATH_TAIL_CHARS characters of `region` (the whole response)
    normalises (minerva_normal) to a gold answer's normal form, as verl's math_dapo grades without math-verify."""
    found = _MINERVA_ANSWER.findall(region[-MATH_TAIL_CHARS:])
    pred = minerva_normal(found[-1] if found else "[INVALID]")
    return float(any(pred == minerva_normal(g) for g in _gold_strings(gold)))


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


def model_verify(region: str, gold: Gold) -> float:
    """GoLongRL's reward for its judge-model data sources in reward_mode "math_verify": 1 when the answer
    (the text after </think>) is exactly the record's extra_info.ground_truth, else math-verify of it against
    golden_label (which also catches answers that are not maths, e.g. a name). gold = {"answer",
    "golden_label"}; both sides are compared stripped (the recipe compares the raw text after </think>,
    which with Qwen3's "</think>\n\n" rarely equals an answer)."""
    if not isinstance(gold, dict):
        return 0.0
    answer = gold.get("answer")
    if isinstance(answer, str) and answer.strip() and region.strip() == answer.strip():
        return 1.0
    return math_verify(region, str(gold.get("golden_label") or ""))


def mrcr(region: str, gold: Gold) -> float:
    """OpenAI MRCR's grade: 0 unless the answer starts with the record's random prefix, else difflib's
    SequenceMatcher ratio of the answer and the gold message, the prefix taken off both. gold = {"answer",
    "prefix"} (golong.rewards.scoring.record_target reads the prefix from extra_info.random_string_to_prepend);
    a plain gold string is compared with no prefix rule. The region comes stripped (answer_region), the gold as
    stored, as GoLongRL's MRCR eval compares them (its strip_thinking strips the reply): the chat template's
    newlines after </think> are not the model's answer. Quadratic in the worst case: the metric runs in
    a timed worker (scoring.SANDBOXED)."""
    answer = region
    if isinstance(gold, dict):
        ref, prefix = str(gold.get("answer") or ""), str(gold.get("prefix") or "")
        if not answer.startswith(prefix):
            return 0.0
        answer, ref = answer.removeprefix(prefix), ref.removeprefix(prefix)
        return SequenceMatcher(None, answer, ref).ratio()
    return max((SequenceMatcher(None, answer, g).ratio() for g in _gold_strings(gold)), default=0.0)


# ---------------------------------------------------------------- DocMath (the model card's DocMath column)

# The sentence DocMath's prompt asks for and the symbols its scorer lets stand before the number, in that order (the
# DocMath scorer of GoLongRL's eval, evalscope's docmath: the first match after </think>, asterisks and parentheses
# taken out first)
_DOCMATH_ANSWER = re.compile(r"the answer is (=?≈?`?%?\$?°?£?€?¥?-?[0-9.,]+)", re.IGNORECASE)
_DOCMATH_DROPPED = ("£", "€", "¥", "million", "billion", "thousand", "US", "USD", "RMB")  # in this order
_DOCMATH_NUMBER = r"(?:[\d,]*\.*\d+)"
_DOCMATH_UNITS = (  # a unit word after or before the number, one or two symbols after or before it
    re.compile(rf"([-+]?{_DOCMATH_NUMBER}) [^0-9 ]+$"),
    re.compile(rf"[^0-9 ]+ ([-+]?{_DOCMATH_NUMBER})$"),
    re.compile(rf"([-+]?{_DOCMATH_NUMBER})[^\d]{{1,2}}$"),
    re.compile(rf"[^-+\d]{{1,2}}({_DOCMATH_NUMBER})$"),
)
_DOCMATH_GROUPED = re.compile(r"[-+]?(\d{1,3}(,\d{3})*|(\d+))(\.\d+)?")


class _NotANumber(Exception):
    """The answer reads as text, a tuple or another container: it matches no number."""


# the operators of an answer's expression, as Python's eval applies them
_DOCMATH_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
                   ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
                   ast.BitXor: operator.xor, ast.BitAnd: operator.and_, ast.BitOr: operator.or_,
                   ast.LShift: operator.lshift, ast.RShift: operator.rshift}
_DOCMATH_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_, ast.Invert: operator.invert}
_DOCMATH_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
                    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Is: operator.is_, ast.IsNot: operator.is_not}


def _docmath_operands(node: Any) -> list[Any]:
    """The sub-expressions an operator node combines, all of them evaluated first; raises for what is no arithmetic
    (if-else and and/or, which evaluate only what they need, are walked by _docmath_value itself)."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (int, float, complex)):
            return []
        raise _NotANumber  # text, None, ...: the scorer's comparison takes no such value
    if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict, ast.JoinedStr)):
        raise _NotANumber
    if isinstance(node, ast.BinOp):
        return [node.left, node.right]
    if isinstance(node, ast.UnaryOp):
        return [node.operand]
    if isinstance(node, ast.Compare) and all(type(o) in _DOCMATH_COMPARE for o in node.ops):
        return [node.left, *node.comparators]
    if _docmath_math_name(node) is not None:
        return []
    if isinstance(node, ast.Call) and not node.keywords and callable(_docmath_math_name(node.func)):
        return list(node.args)
    raise ValueError("not arithmetic")  # a name or call of the response's own: never looked up, never called


def _docmath_math_name(node: Any) -> Any:
    """The value of `math.NAME` (any of the math module's) or `np.NAME` (a numpy constant: pi, e, inf, nan), the
    modules the scorer's eval sees; None for anything else."""
    if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
        return None
    if node.value.id == "math" and not node.attr.startswith("_"):
        return getattr(math, node.attr, None)
    if node.value.id == "np" and node.attr in ("pi", "e", "inf", "nan"):
        return getattr(math, node.attr)
    return None


def _docmath_value(tree: Any) -> Any:
    """The value of an expression tree of numbers combined by Python's operators, comparisons, and/or, if-else and
    the math module's constants and functions, walked without recursion (an answer may be a long sum), each part
    evaluated only where Python's eval evaluates it (an if-else's untaken branch, and/or's operands past the one
    that decides, are not). Raises _NotANumber for text or a container, ValueError for anything else (a name or
    call of the response's own)."""
    # (node, stage): stage None: not started; "args": its operands are on `values`; an int i: an and/or whose
    # operand i is on `values`; "test": an if-else whose test is on `values`
    stack: list[tuple[Any, Any]] = [(tree.body if isinstance(tree, ast.Expression) else tree, None)]
    values: list[Any] = []
    while stack:
        node, stage = stack.pop()
        if isinstance(node, ast.IfExp):
            if stage is None:
                stack += [(node, "test"), (node.test, None)]
            else:
                stack.append((node.body if values.pop() else node.orelse, None))  # its value is the branch's
            continue
        if isinstance(node, ast.BoolOp):
            if stage is None:
                stack += [(node, 0), (node.values[0], None)]
            elif stage + 1 < len(node.values) and bool(values[-1]) == isinstance(node.op, ast.And):
                values.pop()  # and: a truthy operand, or: a falsy one, decides nothing: on to the next
                stack += [(node, stage + 1), (node.values[stage + 1], None)]
            continue  # else the deciding (or last) operand's value, on `values`, is the and/or's
        operands = _docmath_operands(node)
        if stage is None:
            stack.append((node, "args"))
            stack.extend((o, None) for o in reversed(operands))
            continue
        args = values[len(values) - len(operands):]
        del values[len(values) - len(operands):]
        if isinstance(node, ast.Constant):
            v = node.value
        elif isinstance(node, ast.BinOp):
            v = _DOCMATH_BINARY[type(node.op)](*args)
        elif isinstance(node, ast.UnaryOp):
            v = _DOCMATH_UNARY[type(node.op)](args[0])
        elif isinstance(node, ast.Compare):
            v = all(_DOCMATH_COMPARE[type(o)](a, b) for o, a, b in zip(node.ops, args, args[1:]))
        elif isinstance(node, ast.Call):
            v = _docmath_math_name(node.func)(*args)
        else:
            v = _docmath_math_name(node)
        values.append(v)
    return values[0]


def docmath_number(text: str) -> float | int | None:
    """DocMath's reading of an answer as a number (its scorer's normalisation): currency signs and scale words
    dropped, the part after the last "=" or "≈", "%", "$" and "°" dropped, "yes" / "true" read as 1 and "no" /
    "false" as 0 (Python's bools compare as numbers in its scorer), "approximately" and a second "or" alternative
    dropped, a unit word or one or two symbols beside the number dropped, "10^n" and " x " / " × " products read,
    thousands commas dropped; "" reads as 0. None where the result is not a number. The scorer hands the rest to
    Python's eval; golong walks its syntax tree (_docmath_value): numbers, Python's operators and the math module,
    nothing of the response's own is looked up or called, and what eval would raise on reads as 0."""
    s = text.strip().rstrip(".")
    for word in _DOCMATH_DROPPED:
        s = s.replace(word, "")
    for sep in ("=", "≈"):
        if sep in s:
            s = s.split(sep)[-1].strip()
    for sym in ("`", "%", "$", "°"):
        s = s.replace(sym, "")
    if s in ("true", "yes", "false", "no"):
        s = "True" if s in ("true", "yes") else "False"
    if "True" in s or "False" in s:
        return 1 if "True" in s else 0
    if "approximately" in s:
        s = s.replace("approximately", "").strip()
    if " or " in s:
        s = s.split(" or ")[0]
    for unit in _DOCMATH_UNITS:
        if m := unit.match(s):
            s = m.group(1)
    if "10^" in s:
        s = re.sub(r"10\^(-?\d+)", r"math.pow(10, \1)", s)
    s = s.replace(" x ", "*").replace(" × ", "*")
    if _DOCMATH_GROUPED.fullmatch(s):
        s = s.replace(",", "")
    if re.search(r"\([a-d]\)", s):  # an option letter: not a number
        return None
    if not s:
        return 0
    try:
        value = _docmath_value(ast.parse(s, mode="eval"))
    except _NotANumber:
        return None
    except Exception:  # SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError, ...
        return 0  # the scorer reads what its eval raises on as 0
    if isinstance(value, complex):
        return value.real  # as the scorer takes a complex result's real part
    return value if isinstance(value, (int, float)) else None


def docmath_match(pred: float, gold: float) -> bool:
    """DocMath's comparison of a predicted number with the reference: equal up to a power of ten (a percentage
    against a fraction), up to a factor of 100, 1000 or 100000 within 0.15%, equal when both are rounded up to two
    decimals, or within 0.15% of the reference. Signs are compared only by the last rule, as the scorer does."""
    def within(p: float, g: float) -> bool:
        eps = abs(g) * 0.0015
        return g - eps <= p <= g + eps

    big, small = max(abs(gold), abs(pred)), min(abs(gold), abs(pred))
    if big and small and (r := math.log10(big / small)) == int(r):
        return True
    if any(small <= big / limit and within(small * scale, big)
           for scale, limit in ((100, 50), (1000, 500), (100000, 50000))):
        return True
    if math.ceil(big * 100) / 100 == math.ceil(small * 100) / 100:
        return True
    return within(pred, gold)


def docmath(region: str, gold: Gold) -> float:
    """The DocMath score of GoLongRL's eval, its rule score (that eval also asks a judge model and reports the larger
    of the two): the number in the first "the answer is N" of `region` (the text after </think>), else the whole
    region read as a number, matched against the reference number (docmath_match). gold: the reference as text."""
    ref = float(_gold_strings(gold)[0])
    pred = docmath_number(docmath_answer(region))
    return float(pred is not None and docmath_match(pred, ref))


def docmath_answer(region: str) -> str:
    """The answer DocMath's scorer takes from `region` (the text after </think>), and shows its judge: asterisks and
    parentheses taken out, then the number of the first "the answer is N" without its commas, else all of it."""
    text = region.replace("*", "").replace("(", "").replace(")", "")
    m = _DOCMATH_ANSWER.search(text)
    return m.group(1).replace(",", "").rstrip(".") if m else text


# ---------------------------------------------------------------- Frames (the model card's Frames column)

_FRAMES_ARTICLES = re.compile(r"\b(a|an|the)\b")
_FRAMES_DIGIT_COMMA = re.compile(r"(\d),(\d)")
_FRAMES_PUNCT = str.maketrans("", "", string.punctuation)


def frames_normalize(text: str) -> str:
    """Frames' answer normalisation in GoLongRL's Frames scorer (score_frame.py): NFKD, lower case, articles out,
    commas inside numbers out, ASCII punctuation out, whitespace runs folded."""
    text = _FRAMES_ARTICLES.sub(" ", unicodedata.normalize("NFKD", text).lower())
    return " ".join(_FRAMES_DIGIT_COMMA.sub(r"\1\2", text).translate(_FRAMES_PUNCT).split())


def frames(region: str, gold: Gold) -> float:
    """The rule score of GoLongRL's Frames eval, cover exact match: 1 when the normalised reference answer occurs in
    the normalised `region` (the text after </think>) between word boundaries ("2" does not match "2019"). That
    eval also asks a judge model and reports the larger of the two (golong.rewards.judge)."""
    target = frames_normalize(_gold_strings(gold)[0])
    return float(bool(target) and re.search(rf"\b{re.escape(target)}\b", frames_normalize(region)) is not None)


def frames_answer(region: str) -> str:
    """The answer Frames' judge is shown (evalscope's frames): asterisks out, then what follows the last "the answer
    is" (case as written), stripped of spaces and periods; "" where the phrase is missing."""
    text = region.replace("*", "")
    return text.rsplit("the answer is", 1)[-1].strip().strip(".").strip() if "the answer is" in text else ""


# ---------------------------------------------------------------- LongBench v1 QA and CorpusQA (judge-scored columns)

# GoLongRL's LongBench v1 QA scorer (its lbv1qa_eval.py): the last line holding "Therefore, the answer is", any case
_LBV1_ANSWER = re.compile(r"[Tt]herefore,?\s*the answer is:?\s*(.+)", re.IGNORECASE)


def _lbv1_clean(text: str) -> str:
    text = text.strip().strip('"').strip("'").rstrip(".")
    return text[1:-1].strip() if text.startswith("(") and text.endswith(")") else text


def lbv1qa_answer(region: str) -> str:
    """The answer GoLongRL's LongBench v1 QA eval takes from `region` (the text after </think>): what follows
    "Therefore, the answer is" on the last line holding it, else the last non-empty line, without surrounding
    quotes, a final period or enclosing parentheses."""
    found = None
    for line in region.splitlines():
        found = _LBV1_ANSWER.search(line) or found
    if found is not None:
        return _lbv1_clean(found.group(1))
    rows = [line.strip() for line in region.splitlines() if line.strip()]
    return _lbv1_clean(rows[-1]) if rows else region.strip()


def _lbv1_tokens(text: str) -> list[str]:
    """The eval's F1 tokens: text with a CJK ideograph -> its NFKC, lower-cased characters (its punctuation filter
    compares one-letter categories with two-letter ones and so keeps every character); else lower-cased words
    without ASCII punctuation and articles."""
    if any("\u4e00" <= ch <= "\u9fff" for ch in text):
        return list(unicodedata.normalize("NFKC", text).lower())
    return _FRAMES_ARTICLES.sub(" ", text.lower().translate(_FRAMES_PUNCT)).split()


def _lbv1_f1(pred: str, gold: str) -> float:
    p, g = _lbv1_tokens(pred), _lbv1_tokens(gold)
    if not p or not g:
        return float(p == g)
    same = sum((Counter(p) & Counter(g)).values())
    return 0.0 if same == 0 else 2 * same / (len(p) + len(g))


def lbv1qa(region: str, gold: Gold) -> float:
    """LongBench's QA F1 of the extracted answer (lbv1qa_answer) against the best of the reference answers: the
    rule score golong reports without a judge. GoLongRL's eval reports the judge's verdict alone (judge.model: it
    replaces this score)."""
    answer = lbv1qa_answer(region)
    return max((_lbv1_f1(answer, g) for g in _gold_strings(gold)), default=0.0)


_CORPUSQA_ANSWER = re.compile(r"[Tt]he answer is:?\s*(.*)")


def corpusqa_answer(region: str) -> str:
    """The answer GoLongRL's CorpusQA scorer (its corpusqa_eval.py) takes from `region`: the rest of the line after its
    first "the answer is" (a capital T too), else all of it; stripped."""
    m = _CORPUSQA_ANSWER.search(region)
    return m.group(1).strip() if m else region.strip()


def corpusqa(region: str, gold: Gold) -> float:
    """1 when the extracted answer (corpusqa_answer) equals the reference once both are normalised as Frames' are:
    the rule score golong reports without a judge, a lower bound. GoLongRL's eval reports the judge's verdict alone
    (judge.model: it replaces this score)."""
    target = frames_normalize(_gold_strings(gold)[0])
    return float(bool(target) and frames_normalize(corpusqa_answer(region)) == target)


METRICS: dict[str, Callable[[str, Gold], float]] = {
    "em": em,
    "accuracy": accuracy,
    "choice": choice,
    "f1": f1,
    "math_verify": math_verify,
    "minerva": minerva,
    "iou": iou,
    "subem": subem,
    "ndcg": ndcg,
    "pairwise": pairwise,
    "rouge_l": rouge_l,
    "retrieval_calculate": retrieval_calculate,
    "model_verify": model_verify,
    "mrcr": mrcr,
    "docmath": docmath,
    "frames": frames,
    "lbv1qa": lbv1qa,
    "corpusqa": corpusqa,
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
