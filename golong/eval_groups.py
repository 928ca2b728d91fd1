"""`golong eval --by KEY`: the validation prompts grouped by a key of their records (extra_info[KEY]) or by their
token count in MRCR's power-of-two bins (KEY = prompt_tokens), each group with its prompts, responses, mean reward
and its standard error, pass@k, best@n, worst@n and std@n (eval.json's `by.<KEY>.<group>`)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from golong.config import ConfigError
from golong.rewards.pass_at_k import k_values, sample_metrics

if TYPE_CHECKING:
    from golong.data.prompts import EncodedPrompt

PROMPT_TOKENS = "prompt_tokens"  # `golong eval --by prompt_tokens`: the prompts' templated token counts, binned


def _bin_index(tokens: int) -> int:
    """0 below 4K tokens, 1 for [4K, 8K), ..., 8 for [512K, 1M), 9 from 1M on (K = 1024)."""
    return 0 if tokens < 4096 else min(tokens.bit_length() - 12, 9)


def token_bin(tokens: int) -> str:
    """MRCR's bins, by powers of two, as GoLongRL's eval scripts cut them (lower edge in, upper edge out): "<4K",
    "4K-8K", ..., "512K-1M", ">=1M" (K = 1024 tokens)."""
    def size(t: int) -> str:
        return f"{t >> 20}M" if t >= 1 << 20 else f"{t >> 10}K"

    i = _bin_index(tokens)
    return "<4K" if i == 0 else ">=1M" if i == 9 else f"{size(2048 << i)}-{size(4096 << i)}"


# every bin's label, smallest first
BIN_LABELS = tuple(token_bin(0 if i == 0 else 2048 << i) for i in range(10))
NONE_LABEL = "(none)"  # the group of the records without the key (or holding None there)


def group_label(prompt: EncodedPrompt, key: str) -> str:
    """The label of a prompt's group under `--by key`: its token bin, or str(extra_info[key]) (so a value 2 and a
    value "2" are one group; a whole float is labelled as the int: parquet reads a column mixing 8000 and 0.5 as
    floats, 8000.0), or NONE_LABEL."""
    if key == PROMPT_TOKENS:
        return token_bin(len(prompt.input_ids))
    value = prompt.record.extra_info.get(key)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return NONE_LABEL if value is None else str(value)


# extra_info values that label a response row without being asked (numbers, booleans, text up to this long), so
# that eval-compare can group an eval by them later without generating its responses again
ROW_LABEL_CHARS = 64


def _short(value: object) -> bool:
    return isinstance(value, (int, float, bool)) or (isinstance(value, str) and len(value) <= ROW_LABEL_CHARS)


def short_keys(prompts: Sequence[EncodedPrompt]) -> tuple[str, ...]:
    """The extra_info keys holding a number, a boolean or text of at most ROW_LABEL_CHARS characters in any of the
    prompts' records, in order of first appearance: what row_groups labels every row by."""
    return tuple(dict.fromkeys(k for p in prompts for k, v in p.record.extra_info.items() if _short(v)))


def row_groups(prompt: EncodedPrompt, keys: Sequence[str], known: Sequence[str] = ()) -> dict[str, str]:
    """A response row's `groups` in responses.jsonl: the prompt's label under each `--by` key of `keys` (not
    prompt_tokens: eval-compare bins the row's own count) and under every key of `known` (short_keys of the eval's
    prompts) its record holds a number, a boolean or short text under, or nothing (NONE_LABEL, as `--by` labels
    it), so that eval-compare can group an eval by them later. A record holding a longer value under a known key is
    not labelled by it."""
    extra = prompt.record.extra_info
    short = [k for k in dict.fromkeys([*known, *extra])
             if _short(extra.get(k)) or (k in known and extra.get(k) is None)]
    return {k: group_label(prompt, k) for k in dict.fromkeys([*keys, *short]) if k != PROMPT_TOKENS}


def label_order(key: str, label: str) -> tuple:
    """Where a group sorts among `key`'s groups (eval.json's `by.<key>` and eval-compare's): token bins by size;
    labels that read as finite numbers by value, then the other text, then NONE_LABEL."""
    if key == PROMPT_TOKENS:
        return (0, BIN_LABELS.index(label) if label in BIN_LABELS else len(BIN_LABELS), label)
    if label == NONE_LABEL:
        return (2, 0.0, "")
    try:
        x = float(label)
    except ValueError:
        x = math.nan
    return (0, x, label) if math.isfinite(x) else (1, 0.0, label)


def check_group_keys(keys: Sequence[str], prompts: Sequence[EncodedPrompt], dropped: int = 0) -> None:
    """ConfigError for a `--by` key no validation prompt's record holds in extra_info, naming the keys they hold
    (and the `dropped` records, left out at data.max_prompt_tokens, which may have held it)."""
    held = sorted({k for p in prompts for k in p.record.extra_info})
    for key in keys:
        if key != PROMPT_TOKENS and key not in held:
            lost = f" ({dropped} records dropped at data.max_prompt_tokens are not read)" if dropped else ""
            raise ConfigError(f"--by {key}: no validation record has extra_info key {key!r}{lost}; keys they have: "
                              f"{', '.join(held) or 'none'}; or --by {PROMPT_TOKENS} (the prompts' token counts)")


def breakdown(key: str, prompts: Sequence[EncodedPrompt], rows: Sequence[dict[str, Any]], n: int
              ) -> dict[str, dict[str, Any]]:
    """eval.json's `by.<key>`: per group of prompts (their token bin, or their records' extra_info[key]) the prompts,
    responses, mean reward and sample_fields. rows: the eval's responses (prompt-major, n per prompt)."""
    scores: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        scores[row["prompt"]].append(row["score"])
    groups: dict[str, list[list[float]]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[group_label(p, key)].append(scores[i])
    out = {}
    for label, gs in sorted(groups.items(), key=lambda kv: label_order(key, kv[0])):
        out[label] = {"prompts": len(gs), "responses": len(gs) * n,
                      "reward_mean": sum(map(sum, gs)) / (len(gs) * n), **sample_fields(sample_metrics(gs).get, n)}
    return out


def sample_fields(get: Callable[[str], float | None], n: int) -> dict[str, Any]:
    """eval.json's fields of sample_metrics' values, each looked up by its name (`get("pass@1")`; None where absent),
    for n responses a prompt: reward_stderr (None for one prompt), pass_at_k (keyed by k as a string), best_of_n,
    worst_of_n and std_of_n (None at n = 1)."""
    return {"reward_stderr": get("reward_stderr"), "pass_at_k": {str(k): get(f"pass@{k}") for k in k_values(n)},
            "best_of_n": get(f"best@{n}"), "worst_of_n": get(f"worst@{n}"), "std_of_n": get(f"std@{n}")}
