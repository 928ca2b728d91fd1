"""Where the answer is in a response, and how answers are cut into comparable items.

    response -> answer region -> items (one per line, lower-cased, whitespace folded)

The answer region is the text after the single `</think>` (a response with zero or several scores 0:
`answer_region` returns None), then after the last `[Answer]` / `[答案]` marker when one is present.
With `require_think=False` (non-thinking models) the whole response is used, minus anything up to a
last `</think>` if the model still emitted one.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_MARKERS = ("[Answer]", "[答案]")


def answer_region(response: str, *, require_think: bool = True, cut_marker: bool = True) -> str | None:
    """The stripped answer text of `response`, or None when its think block is malformed.
    cut_marker=False keeps the text before a last [Answer] marker."""
    if require_think:
        # exactly one </think> and at most one <think>: several blocks mean the model lost its format
        if response.count(THINK_CLOSE) != 1 or response.count(THINK_OPEN) > 1:
            return None
        text = response.split(THINK_CLOSE, 1)[1]
    else:
        text = response.rsplit(THINK_CLOSE, 1)[-1]
    # the last marker of either language wins: the model's final answer comes last
    best, cut = -1, 0
    for marker in ANSWER_MARKERS if cut_marker else ():
        pos = text.rfind(marker)
        if pos > best:
            best, cut = pos, pos + len(marker)
    if best >= 0:
        text = text[cut:]
    return text.strip()


def fold(text: str) -> str:
    """Lower-case, strip, and fold inner whitespace runs to one space ("1 11" stays != "11 1")."""
    return " ".join(text.lower().split())


def items(text: str) -> list[str]:
    """One normalised item per non-empty line of `text`, in order (duplicates kept)."""
    out = []
    for line in text.split("\n"):
        f = fold(line)
        if f:
            out.append(f)
    return out


def gold_items(ground_truth: str | list[str]) -> list[str]:
    """Gold items: the lines of a gold string, or the elements of a gold list, normalised.

    Empty items are dropped and duplicates removed (first occurrence kept), so metrics that count
    pairs or positions (pairwise, ndcg) cannot score above 1 on a repetitive gold list.
    """
    raw = ground_truth.split("\n") if isinstance(ground_truth, str) else [str(g) for g in ground_truth]
    seen: dict[str, None] = {}
    for g in raw:
        f = fold(g)
        if f and f not in seen:
            seen[f] = None
    return list(seen)


def first_occurrence(seq: list[str]) -> dict[str, int]:
    """item -> index of its first occurrence (a prediction's ranking position)."""
    pos: dict[str, int] = {}
    for i, s in enumerate(seq):
        pos.setdefault(s, i)
    return pos
