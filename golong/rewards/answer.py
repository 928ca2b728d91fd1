"""Where the answer is in a response, and how answers are cut into comparable items.

    response -> format gate -> the text a metric reads -> items (one per line, lower-cased, whitespace folded)

The format gate (GoLongRL's): a response needs exactly one `</think>` and at most one `<think>`, else it
scores 0. Which text a metric then reads follows GoLongRL's reward code, per metric (scoring.SCOPES):
`answer_region`, the text after the `</think>` (EM, multiple choice, retrieval_calculate), or
`checked_response`, the whole response, think block included (LongBench-Pro metrics, which then take
`marked_answer`; table IoU; math-verify; summaries). With `require_think=False` (non-thinking models)
there is no gate: `answer_region` drops anything up to a last `</think>` the model still emitted.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_MARKERS = ("[Answer]", "[答案]")


def think_ok(response: str) -> bool:
    """GoLongRL's format gate: exactly one </think> and at most one <think>."""
    return response.count(THINK_CLOSE) == 1 and response.count(THINK_OPEN) <= 1


def checked_response(response: str, *, require_think: bool = True) -> str | None:
    """The whole response (think block included) when it passes the format gate, else None."""
    if not isinstance(response, str):
        raise TypeError("response must be a str")
    if require_think and not think_ok(response):
        return None
    return response


def marked_answer(text: str) -> str:
    """The LongBench-Pro answer area, as GoLongRL's reward cuts it: the text after the last "[Answer]"
    when the text has one (anywhere, the think block included), else after the last "[答案]", else
    the whole text; stripped. "[Answer]" wins over a later "[答案]"."""
    for marker in ANSWER_MARKERS:
        pos = text.rfind(marker)
        if pos >= 0:
            return text[pos + len(marker):].strip()
    return text.strip()


def answer_region(response: str, *, require_think: bool = True) -> str | None:
    """The stripped text after the single </think>, or None when the response fails the format gate.
    With require_think=False: the text after a last </think>, else the whole response."""
    if require_think:
        # exactly one </think> and at most one <think>: several blocks mean the model lost its format
        if not think_ok(response):
            return None
        return response.split(THINK_CLOSE, 1)[1].strip()
    return response.rsplit(THINK_CLOSE, 1)[-1].strip()


def fold(text: str) -> str:
    """Lower-case, strip, and fold inner whitespace runs to one space ("1 11" stays != "11 1")."""
    return " ".join(text.lower().split())


def lines(text: str) -> list[str]:
    """Every line of `text`, normalised, blank ones included (as ""), in order: GoLongRL's LongBench-Pro
    prediction, where a blank line is an item too (it costs F1 precision, a pairwise pair, an NDCG rank)."""
    return [fold(line) for line in text.split("\n")]


def last_occurrence(seq: list[str]) -> dict[str, int]:
    """item -> index of its last occurrence (GoLongRL builds {item: index} over the prediction, so a
    repeated line keeps the position of its last copy)."""
    return {s: i for i, s in enumerate(seq)}


def gold_items(ground_truth: str | list[str]) -> list[str]:
    """Gold items, normalised: the elements of a gold list, every one (GoLongRL's normalize_answers: a repeated
    item counts again in SubEM and NDCG, a blank one is an item too), or the non-blank lines of a gold string."""
    if isinstance(ground_truth, str):
        return [f for f in map(fold, ground_truth.split("\n")) if f]
    return [fold(str(g)) for g in ground_truth]
