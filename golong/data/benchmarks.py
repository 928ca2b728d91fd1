"""`golong data import`: the model card's long-context benchmarks as golong records, scored by their own metric.

    golong data import longbench-v2 data.json --out data/lbv2.jsonl
    golong data import mrcr mrcr/2needle/*.parquet mrcr/8needle/*.parquet --out data/mrcr.jsonl
    golong data import docmath $(find DocMath-Eval -name '*testmini*') --out data/docmath.jsonl
    golong data import frames frames/test.jsonl --out data/frames.jsonl
    golong data import lbv1qa LongBench/data/{narrativeqa,qasper,hotpotqa,2wikimqa,musique}.jsonl --out lbv1qa.jsonl
    golong data import corpusqa 128k_4domains.jsonl --out data/corpusqa.jsonl
    golong eval CONFIG data.val_files=[data/mrcr.jsonl] data.overflow=drop --by prompt_tokens

LongBench-v2 (THUDM/LongBench-v2's data.json; its fields _id, domain, sub_domain, difficulty, length, question,
choice_A..choice_D, answer, context): one user message holding the context, the question and the four choices, asking
for "The correct answer is (X)", which golong's `choice` metric reads after </think> as LongBench-v2's own scorer does.
Task "longbench_v2"; difficulty, length, domain and sub_domain go to extra_info (`golong eval --by difficulty`).

MRCR (openai/mrcr's parquet files, <n>needle/<n>needle_<i>.parquet; fields prompt (a JSON list of chat messages),
answer, random_string_to_prepend, n_needles, desired_msg_index, total_messages, n_chars): the conversation as it is,
scored by `mrcr` (OpenAI's grade: the answer must start with the random prefix, then difflib's ratio to the gold
message). Task "mrcr_<n>needle"; a column of the model card (<128K, 128K-512K, 512K-1M tokens) is the
prompts-weighted mean of its bins under `golong eval --by prompt_tokens`.

DocMath-Eval (yale-nlp/DocMath-Eval's testmini files, complong / compshort / simplong / simpshort; fields question,
paragraphs (the document's paragraphs and tables, joined by newlines), ground_truth (a number; the test split hides
it), question_id, source): one user message with the document and the question, asking for "Therefore, the answer is
N", scored by `docmath` (the rule score of GoLongRL's DocMath eval; with judge.model, the larger of it and a judge's
verdict, as that eval scores: golong.rewards.judge). Task "docmath"; the subset named in the file's path goes to
extra_info.subset (`golong eval --by subset`), the question to extra_info.question (shown to the judge).

Frames (google/frames-benchmark with its Wikipedia articles, as evalscope's frames reads it: ModelScope's iic/frames
test.jsonl; fields Prompt (the question), Answer, wiki_items (the articles, {title, text})): one user message with the
articles and the question, asking for "Therefore, the answer is X", scored by `frames` (the rule score of GoLongRL's
Frames eval, cover exact match; with judge.model, the larger of it and a judge's verdict). Task "frames";
reasoning_types and the question go to extra_info.

LongBench v1 QA (THUDM/LongBench's data/<subset>.jsonl; GoLongRL's eval takes narrativeqa, qasper, hotpotqa,
2wikimqa and musique; fields input (the question), context, answers, dataset): one user message with the context
and the question, asking for "Therefore, the answer is X", scored by `lbv1qa` (LongBench's QA F1 of the extracted
answer against the best reference; with judge.model, the judge's verdict alone, as GoLongRL's eval scores). Task
"lbv1qa"; the row's dataset (else the subset its file names) goes to extra_info.subset: the card's figure is the mean
of the per-subset means (`golong eval --by subset`).

CorpusQA (the 128K / 1M files of GoLongRL's eval, e.g. 128k_4domains.jsonl; fields id, prompt (chat messages),
question, answer): the conversation as it is, scored by `corpusqa` (exact match of the normalised extracted answer,
a lower bound; with judge.model, the judge's verdict alone). Task "corpusqa"; the domain its id starts with
(financial_zh, financial_en, education_en, real_estate_en) goes to extra_info.domain.

A source row missing a field, or holding a bad value, raises RecordError naming the file and the line (JSON Lines),
item (a JSON array, 0-based) or row (parquet, 0-based).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from golong.data.records import Record, RecordError, iter_rows, write_records

logger = logging.getLogger(__name__)

# golong's wording of a LongBench-v2 prompt; the placeholders are LongBench-v2's own, so that its prompt files
# (prompts/0shot.txt, ...) work as --template unchanged
LONGBENCH_V2_TEMPLATE = """Read the text below, then answer the multiple-choice question that follows it.

<text>
$DOC$
</text>

Question: $Q$
Choices:
(A) $C_A$
(B) $C_B$
(C) $C_C$
(D) $C_D$

Give your answer as "The correct answer is (X)", X being the letter of the choice you pick."""
_LETTERS = "ABCD"
# golong's wording of a DocMath prompt; $DOC$ and $Q$ are the placeholders of QwenLong-L1's DocMath prompt, so that
# prompt works as --template unchanged
DOCMATH_TEMPLATE = """Read the document below, then answer the question that follows it.

<text>
$DOC$
</text>

Question: $Q$

Work it out step by step, then end with the sentence "Therefore, the answer is N", N being the final answer as \
a number."""
# golong's wording of a Frames prompt (the placeholders as DocMath's)
FRAMES_TEMPLATE = """Read the Wikipedia articles below, then answer the question that follows them.

<text>
$DOC$
</text>

Question: $Q$

End your response with the sentence "Therefore, the answer is X", X being your final answer."""
# golong's wording of a LongBench v1 QA prompt (the placeholders as DocMath's)
LBV1QA_TEMPLATE = """Read the text below, then answer the question that follows it.

<text>
$DOC$
</text>

Question: $Q$

End your response with the sentence "Therefore, the answer is X", X being your final answer."""
# benchmark -> (its placeholders, those a template must hold, what each holds), for --template
TEMPLATE_PLACEHOLDERS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "longbench-v2": (("DOC", "Q", *(f"C_{c}" for c in _LETTERS)), ("Q", *(f"C_{c}" for c in _LETTERS)),
                     "$DOC$ (the context), $Q$ (the question), $C_A$ ... $C_D$ (the choices)"),
    "docmath": (("DOC", "Q"), ("Q",), "$DOC$ (the document), $Q$ (the question)"),
    "frames": (("DOC", "Q"), ("Q",), "$DOC$ (the articles), $Q$ (the question)"),
    "lbv1qa": (("DOC", "Q"), ("Q",), "$DOC$ (the context), $Q$ (the question)"),
}


def _fill(template: str, values: dict[str, str]) -> str:
    """The template with each $NAME$ of `values` filled in, in one pass (a value that happens to contain "$Q$" is
    not filled in again)."""
    return re.sub(r"\$(" + "|".join(map(re.escape, values)) + r")\$", lambda m: values[m.group(1)], template)


def _text(row: dict[str, Any], key: str, where: str, *, empty_ok: bool = False) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not (empty_ok or value.strip()):
        got = "null" if value is None else type(value).__name__ if not isinstance(value, str) else "a blank one"
        raise RecordError(f"{where}: field {key!r} must be a {'' if empty_ok else 'non-empty '}string, got {got}")
    return value


def _answer_text(row: dict[str, Any], key: str, where: str) -> str:
    """A reference answer: non-empty text, or a number (a column of number-only answers is read as numbers)."""
    answer = row[key]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise RecordError(f"{where}: field {key!r} must be a non-empty string, got {answer!r}")
    return answer


def _chat_messages(row: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    """A row's conversation: a list of chat messages (or its JSON text, as MRCR's parquet holds it) ending in the
    user's request; each message's role and content are checked with the record (Record.from_dict)."""
    messages = row[key]
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise RecordError(f"{where}: field {key!r} is not a JSON list of chat messages ({e.msg} at character "
                              f"{e.pos})") from None
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)
            and messages[-1].get("role") == "user"):
        raise RecordError(f"{where}: field {key!r} must be a list of chat messages ending in the user's request")
    return messages


def _check_fields(row: Any, fields: tuple[str, ...], benchmark: str, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [f for f in fields if f not in row]
    if missing:
        raise RecordError(f"{where}: missing field(s) {', '.join(missing)} ({benchmark} rows need "
                          f"{', '.join(fields)}; this row has {', '.join(map(str, row)) or 'no field'})")
    return row


def check_template(template: str, benchmark: str = "longbench-v2") -> str:
    """A prompt template for `benchmark` (TEMPLATE_PLACEHOLDERS): it must hold the placeholders the benchmark needs
    ($Q$, and for LongBench-v2 the four choices); $DOC$ may be left out (LongBench's no-context baseline); any other
    $NAME$ is refused (it would reach the model as it is)."""
    if benchmark not in TEMPLATE_PLACEHOLDERS:
        *others, last = TEMPLATE_PLACEHOLDERS
        raise ValueError(f"--template applies to {', '.join(others)} and {last} only, not {benchmark}")
    known, required, names = TEMPLATE_PLACEHOLDERS[benchmark]
    missing = [f"${k}$" for k in required if f"${k}$" not in template]
    if missing:
        raise ValueError(f"the template holds no {', '.join(missing)}; its placeholders: {names}")
    unknown = sorted(set(re.findall(r"\$[A-Z][A-Z0-9_]*\$", template)) - {f"${k}$" for k in known})
    if unknown:
        hint = " (LongBench's $COT$ is its second, chain-of-thought stage)" if benchmark == "longbench-v2" else ""
        raise ValueError(f"the template holds {', '.join(unknown)}, which golong does not fill{hint}; its "
                         f"placeholders: {names}")
    return template


LONGBENCH_V2_FIELDS = ("question", "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context")


def longbench_v2_record(row: Any, where: str, index: int, template: str = LONGBENCH_V2_TEMPLATE) -> Record:
    row = _check_fields(row, LONGBENCH_V2_FIELDS, "LongBench-v2", where)
    answer = _text(row, "answer", where).strip().strip("()")
    if answer not in tuple(_LETTERS):
        raise RecordError(f"{where}: field 'answer' must be one of A, B, C, D, got {row['answer']!r}")
    # stripped, as LongBench-v2's pred.py fills its template
    values = {"DOC": _text(row, "context", where).strip(), "Q": _text(row, "question", where).strip(),
              **{f"C_{c}": _text(row, f"choice_{c}", where, empty_ok=True).strip() for c in _LETTERS}}
    content = _fill(template, values)
    # extra_info.answer: the reference response `golong data check --score-answers` scores (a bare letter scores 0)
    extra = {"index": index, "answer": f"The correct answer is ({answer})",
             **{k: row[k] for k in ("_id", "domain", "sub_domain", "difficulty", "length")
                if isinstance(row.get(k), str)}}
    d = {"data_source": "longbench_v2", "prompt": [{"role": "user", "content": content}], "ability": "longbench_v2",
         "reward_model": {"style": "rule", "ground_truth": {"golden_label": answer}}, "extra_info": extra}
    return Record.from_dict(d, where)


MRCR_FIELDS = ("prompt", "answer", "random_string_to_prepend")
_MRCR_INFO = ("n_needles", "desired_msg_index", "total_messages", "n_chars")


def mrcr_record(row: Any, where: str, index: int) -> Record:
    row = _check_fields(row, MRCR_FIELDS, "MRCR", where)
    messages = _chat_messages(row, "prompt", where)
    answer, prefix = _text(row, "answer", where), _text(row, "random_string_to_prepend", where)
    if not answer.startswith(prefix):  # no reply could score 1: a row of another dataset, or a broken one
        raise RecordError(f"{where}: field 'answer' does not start with random_string_to_prepend {prefix!r}")
    extra: dict[str, Any] = {"index": index, "random_string_to_prepend": prefix}
    for key in _MRCR_INFO:
        value = row.get(key)
        # a whole float too: pandas writes an int column holding a null as float64
        if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
            extra[key] = int(value)
    needles = extra.get("n_needles")
    d = {"data_source": "openai_mrcr", "prompt": messages, "ability": f"mrcr_{needles}needle" if needles else "mrcr",
         "reward_model": {"style": "rule", "ground_truth": {"golden_label": answer}}, "extra_info": extra}
    return Record.from_dict(d, where)  # the messages' roles and contents checked as any record's


DOCMATH_FIELDS = ("question", "paragraphs", "ground_truth")
DOCMATH_SUBSETS = ("complong", "compshort", "simplong", "simpshort")


def docmath_subset(path: str | Path) -> str | None:
    """The DocMath-Eval subset a source file holds, as its path names it ("complong_testmini.jsonl",
    "simpshort/testmini.json"), else None."""
    found = re.findall("|".join(DOCMATH_SUBSETS), str(path).lower())
    return found[-1] if found else None


def docmath_record(row: Any, where: str, index: int, template: str = DOCMATH_TEMPLATE,
                   subset: str | None = None) -> Record:
    row = _check_fields(row, DOCMATH_FIELDS, "DocMath-Eval", where)
    gt = row["ground_truth"]
    if gt is None:
        raise RecordError(f"{where}: field 'ground_truth' is null (DocMath-Eval's test split hides it: import the "
                          "testmini files)")
    # bool is an int to Python, and pandas reads a whole-number column holding a null as float64
    if isinstance(gt, bool) or not isinstance(gt, (int, float)) or not math.isfinite(gt):
        raise RecordError(f"{where}: field 'ground_truth' must be a finite number, got {gt!r}")
    paragraphs = row["paragraphs"]
    if not (isinstance(paragraphs, list) and paragraphs and all(isinstance(x, str) for x in paragraphs)):
        raise RecordError(f"{where}: field 'paragraphs' must be a non-empty list of strings")
    values = {"DOC": "\n".join(paragraphs).strip(), "Q": _text(row, "question", where).strip()}
    label = repr(float(gt)) if isinstance(gt, float) else str(gt)  # the shortest text that reads back as gt
    # the question alone too: a judge model (judge.model) is shown it, not the document
    extra: dict[str, Any] = {"index": index, "answer": f"Therefore, the answer is {label}.", "question": values["Q"],
                             **({"subset": subset} if subset else {}),
                             **{k: row[k] for k in ("question_id", "source") if isinstance(row.get(k), str)}}
    d = {"data_source": "docmath", "prompt": [{"role": "user", "content": _fill(template, values)}],
         "ability": "docmath", "reward_model": {"style": "rule", "ground_truth": {"golden_label": label}},
         "extra_info": extra}
    return Record.from_dict(d, where)


FRAMES_FIELDS = ("Prompt", "Answer", "wiki_items")


def frames_record(row: Any, where: str, index: int, template: str = FRAMES_TEMPLATE) -> Record:
    row = _check_fields(row, FRAMES_FIELDS, "Frames", where)
    items = row["wiki_items"]
    if not (isinstance(items, list) and items and all(isinstance(x, dict) and isinstance(x.get("title"), str)
                                                      and isinstance(x.get("text"), str) for x in items)):
        raise RecordError(f"{where}: field 'wiki_items' must be a non-empty list of {{title, text}} articles")
    answer = _answer_text(row, "Answer", where)
    # the articles as evalscope's frames joins them: each title on its own line before its text
    values = {"DOC": "\n".join(f"{x['title']}\n{x['text']}" for x in items), "Q": _text(row, "Prompt", where).strip()}
    # the question alone too: a judge model (judge.model) is shown it, not the articles
    extra: dict[str, Any] = {"index": index, "answer": f"Therefore, the answer is {answer.strip()}.",
                             "question": values["Q"],
                             **{k: row[k] for k in ("reasoning_types",) if isinstance(row.get(k), str)}}
    d = {"data_source": "frames", "prompt": [{"role": "user", "content": _fill(template, values)}],
         "ability": "frames", "reward_model": {"style": "rule", "ground_truth": {"golden_label": answer.strip()}},
         "extra_info": extra}
    return Record.from_dict(d, where)


LBV1QA_FIELDS = ("input", "context", "answers")


def lbv1qa_record(row: Any, where: str, index: int, template: str = LBV1QA_TEMPLATE,
                  subset: str | None = None) -> Record:
    row = _check_fields(row, LBV1QA_FIELDS, "LongBench v1 QA", where)
    answers = row["answers"]
    if not (isinstance(answers, list) and answers and all(isinstance(a, str) and a.strip() for a in answers)):
        raise RecordError(f"{where}: field 'answers' must be a non-empty list of non-empty strings")
    values = {"DOC": _text(row, "context", where).strip(), "Q": _text(row, "input", where).strip()}
    name = row.get("dataset") if isinstance(row.get("dataset"), str) and row["dataset"].strip() else subset
    # the question alone too: a judge model (judge.model) is shown it, not the context
    # the reference response on one line: the eval reads the answer from one line
    extra: dict[str, Any] = {"index": index, "answer": f"Therefore, the answer is {' '.join(answers[0].split())}.",
                             "question": values["Q"], **({"subset": name} if name else {}),
                             **{k: row[k] for k in ("_id", "language") if isinstance(row.get(k), str)}}
    d = {"data_source": "lbv1qa", "prompt": [{"role": "user", "content": _fill(template, values)}],
         "ability": "lbv1qa", "reward_model": {"style": "rule", "ground_truth": {"doc_ids": answers}},
         "extra_info": extra}
    return Record.from_dict(d, where)


CORPUSQA_FIELDS = ("id", "prompt", "question", "answer")
CORPUSQA_DOMAINS = ("financial_zh", "financial_en", "education_en", "real_estate_en")


def corpusqa_record(row: Any, where: str, index: int) -> Record:
    row = _check_fields(row, CORPUSQA_FIELDS, "CorpusQA", where)
    messages = _chat_messages(row, "prompt", where)
    answer = _answer_text(row, "answer", where)
    qid = str(row["id"])
    domain = next((d for d in CORPUSQA_DOMAINS if qid.startswith(d)), None)
    extra: dict[str, Any] = {"index": index, "id": qid, "answer": f"The answer is {' '.join(answer.split())}",
                             "question": _text(row, "question", where).strip(),
                             **({"domain": domain} if domain else {})}
    d = {"data_source": "corpusqa", "prompt": [{"role": m.get("role"), "content": m.get("content")} for m in messages],
         "ability": "corpusqa", "reward_model": {"style": "rule", "ground_truth": {"golden_label": answer.strip()}},
         "extra_info": extra}
    return Record.from_dict(d, where)  # the messages' roles and contents checked as any record's


# benchmark name -> its row converter, (row, where, index[, template][, subset]) -> Record
BENCHMARKS: dict[str, Callable[..., Record]] = {"longbench-v2": longbench_v2_record, "mrcr": mrcr_record,
                                                "docmath": docmath_record, "frames": frames_record,
                                                "lbv1qa": lbv1qa_record, "corpusqa": corpusqa_record}


def source_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, row) of a benchmark file: a JSON array (.json, read whole), JSON Lines, or parquet (streamed)."""
    p = Path(path)
    if p.suffix.lower() == ".json" and p.is_file():
        with p.open("rb") as f:
            head = b""
            while (chunk := f.read(4096)) and not (head := chunk.lstrip(b"\xef\xbb\xbf \t\r\n")):
                pass
        if head.startswith(b"["):
            try:
                items = json.loads(p.read_text(encoding="utf-8-sig"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RecordError(f"{p}: not a readable JSON array ({e})") from None
            for i, row in enumerate(items):
                yield f"{p}: item {i}", row
            return
    yield from iter_rows(p)


def import_benchmark(name: str, sources: list[str | Path], out: str | Path, *, limit: int | None = None,
                     template: str | None = None) -> list[Record]:
    """Convert benchmark `name`'s source files (in order; the first `limit` rows) into golong records written to
    `out` (.jsonl or .parquet, replaced whole only once every row converted). Returns the records."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    dest = Path(out)
    # before the rows are read, not after
    if dest.is_dir() or dest.suffix.lower() not in (".jsonl", ".json", ".parquet"):
        what = "is a directory" if dest.is_dir() else f"unsupported dataset format {dest.suffix!r}"
        raise ValueError(f"--out {dest}: {what}; name a .jsonl, .json (JSON Lines) or .parquet file")
    if any(Path(src).resolve() == dest.resolve() for src in sources):
        raise ValueError(f"--out {dest} is one of the source files; name another file")
    convert = BENCHMARKS[name]
    kwargs = {"template": check_template(template, name)} if template is not None else {}
    records: list[Record] = []
    for src in sources:
        before = len(records)
        if name == "docmath":
            kwargs["subset"] = docmath_subset(src)
        elif name == "lbv1qa":
            kwargs["subset"] = Path(src).stem
        for where, row in source_rows(src):
            if limit is not None and len(records) >= limit:
                break
            records.append(convert(row, where, len(records), **kwargs))
        logger.info(f"{name}: {len(records) - before} rows from {src}")
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise RecordError(f"{', '.join(map(str, sources))}: no {name} rows")
    tmp = dest.with_name(f".{dest.stem}.tmp{dest.suffix}")  # the suffix picks the format
    try:
        write_records(records, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return records
