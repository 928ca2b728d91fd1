"""Synthetic records of the nine capability tasks, at any context length, in the GoLongRL format.

Each record is a long filler context with a few "needle" facts scattered through it and a question
whose answer follows from those facts alone, so a small model can learn every task and the
rewards score a correct answer 1:

    precise_retrieval     "The code of <name> is <digits>."            -> the code          (em)
    comprehension         "<name> lives in <city>." + 4 options       -> (letter)          (choice)
    exhaustive_retrieval  "<name> belongs to the <color> team."        -> all members       (f1)
    numerical_reasoning   "<name> holds <n> coins."                    -> a sum, \\boxed{}  (math_verify)
    structured_extraction "Record: name=..; city=..; age=.."           -> JSON rows         (iou)
    structured_matching   "<name> owns a <tool>."                      -> that one's tools  (subem)
    graded_ranking        "<name> scored <n> points."                  -> names by score    (ndcg)
    sequence_ordering     "In <year>, <name> <event>."                 -> names by year     (pairwise)
    summarization         "Key fact: <sentence>."                      -> the key facts     (rouge_l)

`context_tokens` counts whitespace-separated words of the context (about one token each with the
demo tokenizer, which is trained on this vocabulary); needles and question come on top.

    golong data synth --out data/synth.jsonl --n 1000 --context-tokens 4096
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from golong.data.records import GroundTruth, Record, write_records
from golong.rewards.scoring import SCOPES
from golong.rewards.tasks import CAPABILITIES

TASKS = ("precise_retrieval", "comprehension", "exhaustive_retrieval", "numerical_reasoning",
         "structured_extraction", "structured_matching", "graded_ranking", "sequence_ordering",
         "summarization")

DATA_SOURCE = "synthetic"

# Tasks scored by a LongBench-Pro metric read the lines after the last [Answer] marker (as GoLongRL's
# reward does; without one the think block's lines count too): their questions ask for it.
MARKED_TASKS = frozenset(t for t in TASKS if SCOPES[CAPABILITIES[t]] == "marked")

_FILLER = (
    "the a an of in on under over near by with without from to across along river stone amber "
    "quiet lantern meadow harbor window garden silver morning evening winter summer autumn spring "
    "valley forest mountain village market bridge tower road path field cloud rain wind light "
    "shadow song story letter paper table chair door wall roof garden orchard bell clock candle "
    "old new small large bright dark warm cold slow quick gentle calm busy empty full distant "
    "walks rests waits drifts glows fades turns stays moves sleeps sings carries holds opens "
    "closes follows remembers watches listens and but so then while because after before"
).split()
_SYLLABLES = ("ka lo mi ren ta vo si ne ru pa de li mo sa te ko ri an el ur".split())
_CITIES = "oslo lima cairo quito hanoi dakar perth turin bergen kyoto nantes porto".split()
_COLORS = ("red", "blue", "green")
_TOOLS = "hammer chisel ladder compass kettle lantern anvil shovel needle rope saw trowel".split()
_EVENTS = ("founded a school", "crossed the sea", "built a bridge", "wrote a book", "planted an orchard",
           "opened a market", "mapped the coast", "found a comet")
_FACTS = ("the harbor opens at dawn", "the bridge was painted blue", "the market sells amber",
          "the tower bell rings twice", "the orchard grows pears", "the road follows the river",
          "the lantern burns all night", "the meadow floods in spring", "the village keeps bees")


def _name(rng: random.Random, taken: set[str]) -> str:
    while True:
        n = "".join(rng.choice(_SYLLABLES) for _ in range(2)) + "-" + "".join(rng.choice(_SYLLABLES) for _ in range(2))
        if n not in taken:
            taken.add(n)
            return n


def _names(rng: random.Random, k: int) -> list[str]:
    taken: set[str] = set()
    return [_name(rng, taken) for _ in range(k)]


def _context(rng: random.Random, needles: list[str], words: int) -> str:
    """~`words` filler words in sentences, the needle sentences at random positions, in order."""
    sentences = []
    count = 0
    while count < words:
        n = min(rng.randint(6, 12), max(1, words - count))
        sentences.append(" ".join(rng.choice(_FILLER) for _ in range(n)).capitalize() + ".")
        count += n
    slots = sorted(rng.randint(0, len(sentences)) for _ in needles)
    out, j = [], 0
    for i in range(len(sentences) + 1):
        while j < len(needles) and slots[j] == i:
            out.append(needles[j])
            j += 1
        if i < len(sentences):
            out.append(sentences[i])
    return " ".join(out)


# Each task builder returns (needles in context order, question, GroundTruth, answer text).
Built = tuple[list[str], str, GroundTruth, str]


def _precise_retrieval(rng: random.Random) -> Built:
    names = _names(rng, 4)
    codes = [str(rng.randint(10000, 99999)) for _ in names]
    q = rng.randrange(len(names))
    needles = [f"The code of {n} is {c}." for n, c in zip(names, codes)]
    question = f"What is the code of {names[q]}? Answer with the code only."
    return needles, question, GroundTruth([codes[q]], codes[q]), codes[q]


def _comprehension(rng: random.Random) -> Built:
    names = _names(rng, 4)
    cities = rng.sample(_CITIES, 4)
    q = rng.randrange(4)
    needles = [f"{n} lives in {c}." for n, c in zip(names, cities)]
    options = rng.sample(cities, 4)
    letter = "ABCD"[options.index(cities[q])]
    opts = "\n".join(f"({'ABCD'[i]}) {c}" for i, c in enumerate(options))
    question = (f"Where does {names[q]} live?\n{opts}\n"
                "End your answer with: The correct answer is (X).")
    return needles, question, GroundTruth([letter], letter), f"The correct answer is ({letter})"


def _exhaustive_retrieval(rng: random.Random) -> Built:
    names = _names(rng, 8)
    colors = [rng.choice(_COLORS) for _ in names]
    target = colors[rng.randrange(len(names))]
    needles = [f"{n} belongs to the {c} team." for n, c in zip(names, colors)]
    members = [n for n, c in zip(names, colors) if c == target]
    question = f"List every member of the {target} team, one per line."
    return needles, question, GroundTruth(members, "\n".join(members)), "\n".join(members)


def _numerical_reasoning(rng: random.Random) -> Built:
    names = _names(rng, 4)
    coins = [rng.randint(2, 99) for _ in names]
    a, b = rng.sample(range(4), 2)
    needles = [f"{n} holds {c} coins." for n, c in zip(names, coins)]
    total = str(coins[a] + coins[b])
    question = (f"How many coins do {names[a]} and {names[b]} hold together? "
                "Put the final number in \\boxed{}.")
    return needles, question, GroundTruth([total], total), f"\\boxed{{{total}}}"


def _structured_extraction(rng: random.Random) -> Built:
    names = _names(rng, 6)
    cities = rng.sample(_CITIES, 2)
    rows = [(n, rng.choice(cities), rng.randint(18, 90)) for n in names]
    target = rows[rng.randrange(len(rows))][1]
    needles = [f"Record: name={n}; city={c}; age={a}." for n, c, a in rows]
    table = json.dumps({"data": [[n, a] for n, c, a in rows if c == target]})
    question = (f"Extract every record whose city is {target} as rows [name, age], in the form "
                '<answer>{"data": [[name, age], ...]}</answer>.')
    return needles, question, GroundTruth([], table), f"<answer>{table}</answer>"


def _structured_matching(rng: random.Random) -> Built:
    names = _names(rng, 3)
    tools = rng.sample(_TOOLS, 9)
    owned = {n: tools[3 * i: 3 * i + 3] for i, n in enumerate(names)}
    needles = [f"{n} owns a {t}." for n in names for t in owned[n]]
    rng.shuffle(needles)
    who = rng.choice(names)
    gold = [t for t in tools if t in owned[who]]
    gold.sort(key=lambda t: next(i for i, s in enumerate(needles) if s == f"{who} owns a {t}."))
    question = f"Which tools does {who} own? Answer one tool per line."
    return needles, question, GroundTruth(gold, "\n".join(gold)), "\n".join(gold)


def _graded_ranking(rng: random.Random) -> Built:
    names = _names(rng, 5)
    scores = rng.sample(range(10, 100), 5)
    needles = [f"{n} scored {s} points." for n, s in zip(names, scores)]
    ranked = [n for _, n in sorted(zip(scores, names), reverse=True)]
    question = (f"Rank {', '.join(sorted(names))} from the highest to the lowest score, "
                "one name per line.")
    return needles, question, GroundTruth(ranked, "\n".join(ranked)), "\n".join(ranked)


def _sequence_ordering(rng: random.Random) -> Built:
    names = _names(rng, 5)
    years = rng.sample(range(1700, 2000), 5)
    events = rng.sample(_EVENTS, 5)
    needles = [f"In {y}, {n} {e}." for n, y, e in zip(names, years, events)]
    ordered = [n for _, n in sorted(zip(years, names))]
    question = "List the people above in chronological order of their deeds, one name per line."
    return needles, question, GroundTruth(ordered, "\n".join(ordered)), "\n".join(ordered)


def _summarization(rng: random.Random) -> Built:
    facts = rng.sample(_FACTS, 3)
    needles = [f"Key fact: {f}." for f in facts]
    summary = " ".join(f"{f[0].upper()}{f[1:]}." for f in facts)
    question = "Summarize the key facts in the order they appear, in one short paragraph."
    return needles, question, GroundTruth([summary], summary, summary), summary


BUILDERS: dict[str, Callable[[random.Random], Built]] = {
    "precise_retrieval": _precise_retrieval,
    "comprehension": _comprehension,
    "exhaustive_retrieval": _exhaustive_retrieval,
    "numerical_reasoning": _numerical_reasoning,
    "structured_extraction": _structured_extraction,
    "structured_matching": _structured_matching,
    "graded_ranking": _graded_ranking,
    "sequence_ordering": _sequence_ordering,
    "summarization": _summarization,
}


def make_record(task: str, context_tokens: int, rng: random.Random, index: int = 0) -> Record:
    if task not in BUILDERS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {', '.join(TASKS)}")
    needles, question, gt, answer = BUILDERS[task](rng)
    if task in MARKED_TASKS:
        question += " Write the line [Answer] first, then the answer."
        answer = f"[Answer]\n{answer}"
    context = _context(rng, needles, max(0, context_tokens))
    content = f"Read the text and answer the question.\n\n{context}\n\nQuestion: {question}"
    return Record(DATA_SOURCE, [{"role": "user", "content": content}], task, gt,
                  {"reward_mode": task, "index": index, "answer": answer, "context_tokens": context_tokens})


def generate(n: int, context_tokens: int, seed: int = 0, tasks: list[str] | None = None) -> list[Record]:
    """`n` records cycling through `tasks` (default: all nine); record i depends only on (seed, i)."""
    tasks = list(tasks) if tasks else list(TASKS)
    for t in tasks:
        if t not in BUILDERS:
            raise ValueError(f"unknown synthetic task {t!r}; known: {', '.join(TASKS)}")
    return [make_record(tasks[i % len(tasks)], context_tokens, random.Random(seed * 1_000_003 + i), i)
            for i in range(n)]


def reference_response(record: Record, thinking: str = "") -> str:
    """A response that scores 1 on `record`: an (empty) think block, then the stored answer."""
    return f"<think>\n{thinking}\n</think>\n\n{record.extra_info['answer']}"


def write_dataset(out: str | Path, n: int, context_tokens: int, seed: int = 0,
                  tasks: list[str] | None = None) -> Path:
    """Write `n` synthetic records to `out` (.jsonl or .parquet by suffix); returns the path."""
    return write_records(generate(n, context_tokens, seed=seed, tasks=tasks), out)
