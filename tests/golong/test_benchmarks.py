"""`golong data import`: LongBench-v2, MRCR and DocMath-Eval source files -> golong records, scored by the
benchmark's metric."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from golong.cli import main
from golong.data import RecordError, load_records
from golong.data.benchmarks import DOCMATH_TEMPLATE, LONGBENCH_V2_TEMPLATE, import_benchmark
from golong.data.records import reference_answer
from golong.rewards import score_record

ROOT = Path(__file__).resolve().parents[2]


def R(answer: str) -> str:
    return f"<think>\nreasoning\n</think>\n\n{answer}"


def _lbv2_row(i: int) -> dict:
    return {"_id": f"66f{i:04d}", "domain": "Single-Document QA", "sub_domain": "Legal",
            "difficulty": ("easy", "hard")[i % 2], "length": ("short", "medium", "long")[i % 3],
            "question": f"Which clause of contract {i} is void?", "choice_A": f"clause {i}.1",
            "choice_B": f"clause {i}.2", "choice_C": "", "choice_D": f"clause {i}.4", "answer": "ABCD"[i % 4],
            "context": f"Contract {i}. A price of $Q$ dollars. " + "Filler sentence. " * (i + 3)}


def _mrcr_row(i: int, needles: int) -> dict:
    prefix = f"h{i}Zq9"
    poem = f"tapirs wander number {i}, slow and grey"
    messages = [{"role": "user", "content": "write a poem about tapirs"}, {"role": "assistant", "content": poem},
                {"role": "user", "content": "write a poem about frogs"}, {"role": "assistant", "content": "frogs"},
                {"role": "user", "content": f"Prepend {prefix} to the 1st (1 indexed) poem about tapirs."}]
    return {"prompt": json.dumps(messages), "answer": prefix + poem, "random_string_to_prepend": prefix,
            "n_needles": needles, "desired_msg_index": 1, "total_messages": 5, "n_chars": 120 + i}


def test_longbench_v2_rows_become_choice_records_graded_by_their_letter(tmp_path):
    """Each row: one user message with its context, question and the four choices in order; gold = its letter,
    scored by 'The correct answer is (X)' after </think>; difficulty / length / domain kept for `eval --by`."""
    rows = [_lbv2_row(i) for i in range(7)]
    src = tmp_path / "data.json"
    src.write_text(json.dumps(rows, indent=2))  # LongBench-v2's data.json is one JSON array
    records = import_benchmark("longbench-v2", [src], tmp_path / "lb.jsonl")
    assert load_records(tmp_path / "lb.jsonl") == records and len(records) == 7
    for i, (row, rec) in enumerate(zip(rows, records)):
        content = rec.prompt[0]["content"]
        assert len(rec.prompt) == 1 and rec.prompt[0]["role"] == "user"
        # the context stripped, as LongBench's pred.py fills it ($Q$ in it not filled in), then the question, then
        # the choices in order
        assert content.index(row["context"].strip() + "\n") < content.index(row["question"]) < \
               content.index("(A) " + row["choice_A"])
        assert content.index("(A) ") < content.index("(B) ") < content.index("(C) ") < content.index("(D) ")
        assert "The correct answer is (X)" in content
        assert (rec.data_source, rec.task, rec.metric, rec.ground_truth.golden_label) == \
               ("longbench_v2", "longbench_v2", "choice", row["answer"])
        assert {k: rec.extra_info[k] for k in ("_id", "difficulty", "length", "domain", "sub_domain")} == \
               {k: row[k] for k in ("_id", "difficulty", "length", "domain", "sub_domain")}
        assert rec.extra_info["index"] == i
        # the reference response data check --score-answers scores (and the SFT warm-up would train on)
        assert score_record(rec, R(reference_answer(rec)), timeout=None) == 1.0
        for letter in "ABCD":
            expect = float(letter == row["answer"])
            assert score_record(rec, R(f"The correct answer is ({letter})"), timeout=None) == expect
        assert score_record(rec, R(row["answer"]), timeout=None) == 0.0  # the sentence is required


def test_longbench_v2_template_takes_longbench_placeholders_in_one_pass(tmp_path):
    """--template: LongBench-v2's placeholder names, filled in one pass (a context holding "$Q$" keeps it); a
    template without $Q$ or a choice, or with a placeholder golong does not fill, is refused; one without $DOC$ is
    LongBench's no-context baseline."""
    src = tmp_path / "data.jsonl"
    src.write_text(json.dumps(_lbv2_row(1)) + "\n")
    template = "<text>$DOC$</text> Q: $Q$ [$C_A$|$C_B$|$C_C$|$C_D$] answer: The correct answer is (X)"
    (rec,) = import_benchmark("longbench-v2", [src], tmp_path / "out.jsonl", template=template)
    row = _lbv2_row(1)
    assert rec.prompt[0]["content"] == (f"<text>{row['context'].strip()}</text> Q: {row['question']} [clause 1.1|"
                                        "clause 1.2||clause 1.4] answer: The correct answer is (X)")
    assert "$Q$" in row["context"] and "$DOC$" in LONGBENCH_V2_TEMPLATE
    with pytest.raises(ValueError, match=r"the template holds no \$C_A\$, \$C_B\$, \$C_C\$, \$C_D\$; its placeholders"):
        import_benchmark("longbench-v2", [src], tmp_path / "out.jsonl", template="$DOC$ Q: $Q$")
    with pytest.raises(ValueError, match=r"the template holds \$COT\$, which golong does not fill"):
        import_benchmark("longbench-v2", [src], tmp_path / "out.jsonl", template=template + " $COT$")
    (bare,) = import_benchmark("longbench-v2", [src], tmp_path / "out.jsonl", template=template.split("</text> ")[1])
    assert bare.prompt[0]["content"].startswith(f"Q: {row['question']} [clause 1.1|") and "Contract" not in \
        bare.prompt[0]["content"]
    with pytest.raises(ValueError, match="--template applies to longbench-v2, docmath, frames and lbv1qa only, not "
                                         "mrcr"):
        import_benchmark("mrcr", [src], tmp_path / "out.jsonl", template=template)


def test_mrcr_rows_become_conversations_graded_by_prefix_and_ratio(tmp_path):
    """openai/mrcr parquet rows: the conversation as it is (its JSON string read), task per needle count, scored by
    OpenAI's grade against the gold message with the row's random prefix; several files read in order."""
    files = []
    for needles in (2, 8):
        path = tmp_path / f"{needles}needle.parquet"
        pq.write_table(pa.Table.from_pylist([_mrcr_row(i, needles) for i in range(3)]), path)
        files.append(path)
    out = tmp_path / "mrcr.parquet"
    records = import_benchmark("mrcr", files, out)
    assert load_records(out) == records and [r.task for r in records] == ["mrcr_2needle"] * 3 + ["mrcr_8needle"] * 3
    for k, rec in enumerate(records):
        row = _mrcr_row(k % 3, (2, 8)[k // 3])
        assert rec.prompt == json.loads(row["prompt"]) and rec.metric == "mrcr"
        assert rec.extra_info == {"index": k, **{key: row[key] for key in (
            "random_string_to_prepend", "n_needles", "desired_msg_index", "total_messages", "n_chars")}}
        prefix, poem = row["random_string_to_prepend"], row["answer"].removeprefix(row["random_string_to_prepend"])
        assert score_record(rec, R(row["answer"]), timeout=None) == 1.0
        assert score_record(rec, R(reference_answer(rec)), timeout=None) == 1.0
        assert score_record(rec, R(poem), timeout=None) == 0.0  # the prefix missing
        half = score_record(rec, R(prefix + poem[: len(poem) // 2]), timeout=None)
        assert half == pytest.approx(2 * (len(poem) // 2) / (len(poem) + len(poem) // 2))
    assert len(import_benchmark("mrcr", files, tmp_path / "two.jsonl", limit=4)) == 4  # --limit: the first rows
    # pandas writes an int column holding a null as float64: whole numbers still read as ints
    floats = tmp_path / "floats.parquet"
    pq.write_table(pa.Table.from_pylist([dict(_mrcr_row(0, 4), n_needles=4.0), dict(_mrcr_row(1, 4), n_needles=None)]),
                   floats)
    assert [(r.task, r.extra_info.get("n_needles")) for r in import_benchmark("mrcr", [floats], out)] == \
           [("mrcr_4needle", 4), ("mrcr", None)]



def _docmath_row(i: int, gt: float | int) -> dict:
    return {"question_id": f"complong-testmini-{i}", "source": "annual report",
            "question": f"By what share did revenue {i} grow?",
            "paragraphs": [f"Revenue {i} was 40 in 2020.", "| year | revenue |\n| 2021 | 45 |", f"Note {i}: $Q$."],
            "table_evidence": [1], "paragraph_evidence": [0], "python_solution": "def solution(): ...",
            "ground_truth": gt}


def test_docmath_rows_become_records_scored_by_the_number_they_state(tmp_path):
    """DocMath-Eval testmini rows: one user message with the document (paragraphs joined by newlines) and the
    question, asking for "Therefore, the answer is N"; gold = ground_truth, scored by `docmath`; the subset named by
    the file's path in extra_info; several files (JSON Lines, parquet) read in order; --template takes $DOC$ and
    $Q$."""
    (tmp_path / "complong_testmini.jsonl").write_text(
        "".join(json.dumps(_docmath_row(i, gt)) + "\n" for i, gt in enumerate((0.125, 12, -3.5))))
    pq.write_table(pa.Table.from_pylist([_docmath_row(7, 2.5e6)]), tmp_path / "simpshort_testmini.parquet")
    files = [tmp_path / "complong_testmini.jsonl", tmp_path / "simpshort_testmini.parquet"]
    records = import_benchmark("docmath", files, tmp_path / "dm.jsonl")
    assert load_records(tmp_path / "dm.jsonl") == records
    assert [(r.task, r.metric, r.data_source, r.ground_truth.golden_label, r.extra_info["subset"]) for r in records] \
        == [("docmath", "docmath", "docmath", label, subset) for label, subset in
            (("0.125", "complong"), ("12", "complong"), ("-3.5", "complong"), ("2500000.0", "simpshort"))]
    for k, rec in enumerate(records):
        row = _docmath_row((0, 1, 2, 7)[k], 0)
        content = rec.prompt[0]["content"]
        assert content.index("\n".join(row["paragraphs"])) < content.index(row["question"])  # $Q$ in it kept
        assert "Therefore, the answer is N" in content and content.startswith(DOCMATH_TEMPLATE.split("$DOC$")[0])
        assert {key: rec.extra_info[key] for key in ("index", "question_id", "source", "question")} == \
               {"index": k, "question_id": row["question_id"], "source": "annual report", "question": row["question"]}
        assert score_record(rec, R(reference_answer(rec)), timeout=None) == 1.0
        assert score_record(rec, R("Therefore, the answer is 9.87"), timeout=None) == 0.0
    assert score_record(records[0], R("Therefore, the answer is 12.5%."), timeout=None) == 1.0
    assert score_record(records[3], R("Therefore, the answer is 2.5 million"), timeout=None) == 1.0
    (rec,) = import_benchmark("docmath", files[:1], tmp_path / "t.jsonl", limit=1, template="Q: $Q$ D: $DOC$")
    assert rec.prompt[0]["content"] == "Q: By what share did revenue 0 grow? D: " + "\n".join(
        _docmath_row(0, 0)["paragraphs"])
    for bad, why in (("$DOC$", r"holds no \$Q\$"), ("$Q$ $C_A$", r"holds \$C_A\$, which golong does not fill;")):
        with pytest.raises(ValueError, match=why):
            import_benchmark("docmath", files, tmp_path / "t.jsonl", template=bad)
    # a bad row: named by file and line; the test split (no ground truth) said so
    src = tmp_path / "compshort_test.jsonl"
    for gt, why in ((None, r"field 'ground_truth' is null \(DocMath-Eval's test split hides it: import the testmini"),
                    (True, r"field 'ground_truth' must be a finite number, got True"),
                    ("12", r"field 'ground_truth' must be a finite number, got '12'")):
        src.write_text(json.dumps(_docmath_row(0, 1)) + "\n" + json.dumps(_docmath_row(1, gt)) + "\n")
        with pytest.raises(RecordError, match=rf"^{src}: line 2: {why}"):
            import_benchmark("docmath", [src], tmp_path / "t.jsonl")
    src.write_text(json.dumps(dict(_docmath_row(0, 1), paragraphs=[])) + "\n")
    with pytest.raises(RecordError, match=rf"^{src}: line 1: field 'paragraphs' must be a non-empty list of strings"):
        import_benchmark("docmath", [src], tmp_path / "t.jsonl")
    # a docmath record whose gold is no number is refused when loaded: every response would score 0
    (tmp_path / "r.jsonl").write_text(json.dumps({"data_source": "docmath", "prompt": "hi", "ability": "docmath",
                                                  "reward_model": {"ground_truth": {"golden_label": "n/a"}}}) + "\n")
    with pytest.raises(RecordError, match=r"line 1: a docmath record needs ground_truth\.golden_label to be the "
                                          r"reference number, got 'n/a'"):
        load_records(tmp_path / "r.jsonl")

def _frames_row(i: int, answer: str) -> dict:
    return {"Unnamed: 0": i, "Prompt": f"Which city hosted event {i} first?", "Answer": answer,
            "reasoning_types": "Multiple constraints | Temporal reasoning",
            "wiki_items": [{"title": f"Event {i}", "text": f"Event {i} began in 1896 in Athens."},
                           {"title": "Athens", "text": "Athens is the capital of Greece. $Q$"}]}


def test_frames_rows_become_records_scored_by_cover_exact_match(tmp_path):
    """Frames rows (iic/frames' test.jsonl as evalscope reads it): one user message with the articles (each title on
    its line before its text) and the question; gold = Answer, scored by `frames`; question and reasoning_types in
    extra_info; a bad row named by file and line."""
    from golong.data.benchmarks import FRAMES_TEMPLATE

    (tmp_path / "test.jsonl").write_text("".join(json.dumps(_frames_row(i, a)) + "\n"
                                                 for i, a in enumerate(("Athens", "1,896"))))
    pq.write_table(pa.Table.from_pylist([_frames_row(2, "The Eiffel Tower")]), tmp_path / "more.parquet")
    records = import_benchmark("frames", [tmp_path / "test.jsonl", tmp_path / "more.parquet"], tmp_path / "f.jsonl")
    assert load_records(tmp_path / "f.jsonl") == records
    assert [(r.task, r.metric, r.data_source, r.ground_truth.golden_label) for r in records] == [
        ("frames", "frames", "frames", a) for a in ("Athens", "1,896", "The Eiffel Tower")]
    for k, rec in enumerate(records):
        row = _frames_row(k, "")
        content = rec.prompt[0]["content"]
        articles = "\n".join(f"{x['title']}\n{x['text']}" for x in row["wiki_items"])
        assert content.startswith(FRAMES_TEMPLATE.split("$DOC$")[0] + articles)
        assert content.index(articles) < content.index(row["Prompt"]) and "Greece. $Q$" in content  # not filled again
        assert rec.extra_info["question"] == row["Prompt"] and rec.extra_info["index"] == k
        assert rec.extra_info["reasoning_types"] == row["reasoning_types"]
        assert score_record(rec, R(reference_answer(rec)), timeout=None) == 1.0
        assert score_record(rec, R("Therefore, the answer is Sparta."), timeout=None) == 0.0
    assert score_record(records[1], R("It began in 1896."), timeout=None) == 1.0
    assert score_record(records[2], R("the answer is eiffel tower"), timeout=None) == 1.0
    (rec,) = import_benchmark("frames", [tmp_path / "test.jsonl"], tmp_path / "t.jsonl", limit=1, template="$Q$")
    assert rec.prompt[0]["content"] == _frames_row(0, "")["Prompt"]
    src = tmp_path / "bad.jsonl"
    for row, why in ((dict(_frames_row(0, "x"), wiki_items=[]), "field 'wiki_items' must be a non-empty list of "
                      r"\{title, text\} articles"),
                     (dict(_frames_row(0, "x"), wiki_items=[{"title": "t"}]), "field 'wiki_items' must be"),
                     (dict(_frames_row(0, " ")), "field 'Answer' must be a non-empty string, got ' '"),
                     ({k: v for k, v in _frames_row(0, "x").items() if k != "Prompt"},
                      r"missing field\(s\) Prompt \(Frames rows need Prompt, Answer, wiki_items")):
        src.write_text(json.dumps(_frames_row(1, "y")) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(RecordError, match=rf"^{src}: line 2: {why}"):
            import_benchmark("frames", [src], tmp_path / "t.jsonl")


def _lbv1_row(i: int, answers: list, dataset: str | None = "hotpotqa") -> dict:
    row = {"input": f"Which team did player {i} join?", "context": f"Passage {i}: player {i} joined the Hawks.",
           "answers": answers, "length": 9, "language": "en", "all_classes": None, "_id": f"id{i}"}
    return row if dataset is None else {**row, "dataset": dataset}


def _corpusqa_row(i: int, answer, domain: str = "financial_en") -> dict:
    return {"id": f"{domain}_{i}", "question": f"What was the total revenue {i}?", "answer": answer,
            "prompt": [{"role": "system", "content": "Read the corpus."},
                       {"role": "user", "content": f"CORPUS ... What was the total revenue {i}?"}]}


def test_importers_read_a_subset_and_an_answer_as_their_sources_write_them(tmp_path):
    """A DocMath file's subset is the last subset name in its path; a LongBench row's own dataset wins over its
    file's name (a renamed copy); a LongBench-v2 answer written "(B)" is the letter B."""
    from golong.data.benchmarks import docmath_subset

    assert docmath_subset("data/simpshort/complong_testmini.jsonl") == "complong"
    (tmp_path / "hotpotqa_e.jsonl").write_text(json.dumps(_lbv1_row(0, ["Hawks"])) + "\n")
    (rec,) = import_benchmark("lbv1qa", [tmp_path / "hotpotqa_e.jsonl"], tmp_path / "l.jsonl")
    assert rec.extra_info["subset"] == "hotpotqa"
    (tmp_path / "data.json").write_text(json.dumps([{**_lbv2_row(0), "answer": "(B)"}]))
    (rec,) = import_benchmark("longbench-v2", [tmp_path / "data.json"], tmp_path / "lb.jsonl")
    assert rec.ground_truth.golden_label == "B"


def test_lbv1qa_and_corpusqa_rows_become_records(tmp_path):
    """LongBench v1 QA rows: the context and the question in one user message, every reference answer a gold item
    (lbv1qa: QA F1 against the best), the subset from the row's dataset, else the file's name. CorpusQA rows: the
    conversation as it is, the domain from the id. Both keep the question for a judge; bad rows named."""
    from golong.data.benchmarks import LBV1QA_TEMPLATE

    (tmp_path / "hotpotqa.jsonl").write_text(json.dumps(_lbv1_row(0, ["Hawks", "Atlanta Hawks"])) + "\n" +
                                             json.dumps(_lbv1_row(2, ["two\nlines"])) + "\n")
    (tmp_path / "musique.jsonl").write_text(json.dumps(_lbv1_row(1, ["the Bulls"], dataset=None)) + "\n")
    recs = import_benchmark("lbv1qa", [tmp_path / "hotpotqa.jsonl", tmp_path / "musique.jsonl"], tmp_path / "l.jsonl")
    assert load_records(tmp_path / "l.jsonl") == recs
    assert [(r.task, r.metric, r.ground_truth.doc_ids, r.extra_info["subset"]) for r in recs] == [
        ("lbv1qa", "lbv1qa", ["Hawks", "Atlanta Hawks"], "hotpotqa"), ("lbv1qa", "lbv1qa", ["two\nlines"], "hotpotqa"),
        ("lbv1qa", "lbv1qa", ["the Bulls"], "musique")]  # the reference responses (below) on one line
    content = recs[0].prompt[0]["content"]
    assert content.startswith(LBV1QA_TEMPLATE.split("$DOC$")[0] + "Passage 0: player 0 joined the Hawks.")
    assert recs[0].extra_info["question"] == "Which team did player 0 join?" in content
    for rec in recs:
        assert score_record(rec, R(reference_answer(rec)), timeout=None) == 1.0
    assert score_record(recs[0], R("Therefore, the answer is the Atlanta Hawks."), timeout=None) == 1.0
    assert score_record(recs[0], R("Therefore, the answer is Atlanta"), timeout=None) == pytest.approx(2 / 3)
    src = tmp_path / "bad.jsonl"
    for row, why in ((_lbv1_row(0, []), "field 'answers' must be a non-empty list of non-empty strings"),
                     (_lbv1_row(0, ["x", " "]), "field 'answers' must be"),
                     ({k: v for k, v in _lbv1_row(0, ["x"]).items() if k != "context"}, r"missing field\(s\) context")):
        src.write_text(json.dumps(row) + "\n")
        with pytest.raises(RecordError, match=rf"^{src}: line 1: {why}"):
            import_benchmark("lbv1qa", [src], tmp_path / "t.jsonl")

    rows = [_corpusqa_row(0, "1200"), _corpusqa_row(1, 7.5, domain="education_en"), _corpusqa_row(2, "A; B\nC", "x")]
    (tmp_path / "128k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = import_benchmark("corpusqa", [tmp_path / "128k.jsonl"], tmp_path / "c.jsonl")
    assert [(r.task, r.metric, r.ground_truth.golden_label, r.extra_info.get("domain")) for r in recs] == [
        ("corpusqa", "corpusqa", "1200", "financial_en"), ("corpusqa", "corpusqa", "7.5", "education_en"),
        ("corpusqa", "corpusqa", "A; B\nC", None)]
    assert recs[0].prompt == rows[0]["prompt"] and recs[0].extra_info["question"] == rows[0]["question"]
    for rec in recs:
        assert score_record(rec, R(reference_answer(rec)), timeout=None) == 1.0
    for row, why in ((dict(rows[0], answer=" "), "field 'answer' must be a non-empty string, got ' '"),
                     (dict(rows[0], prompt=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
                      "field 'prompt' must be a list of chat messages ending in the user's request")):
        src.write_text(json.dumps(rows[1]) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(RecordError, match=rf"^{src}: line 2: {why}"):
            import_benchmark("corpusqa", [src], tmp_path / "t.jsonl")


def test_a_bad_benchmark_row_is_named_by_file_and_line_and_leaves_no_output(tmp_path):
    """A missing field, a bad letter or an unreadable prompt is named by the file and its line / item / row; the
    output is written only once every row converted: an existing file is left as it was."""
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    src = tmp_path / "lb.jsonl"
    for bad_letter in ("E", "AB"):
        bad = dict(_lbv2_row(1), answer=bad_letter)
        src.write_text(json.dumps(_lbv2_row(0)) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(RecordError, match=rf"^{src}: line 2: field 'answer' must be one of A, B, C, D, got "
                                              rf"'{bad_letter}'$"):
            import_benchmark("longbench-v2", [src], out)
    with pytest.raises(ValueError, match=r"--out .*out\.txt: unsupported dataset format '\.txt'"):
        import_benchmark("longbench-v2", [tmp_path / "not-read.json"], tmp_path / "out.txt")  # before any row
    arr = tmp_path / "lb.json"
    arr.write_text(json.dumps([_lbv2_row(0), {k: v for k, v in _lbv2_row(1).items() if k != "context"}]))
    with pytest.raises(RecordError, match=rf"^{arr}: item 1: missing field\(s\) context \(LongBench-v2 rows need "):
        import_benchmark("longbench-v2", [arr], out)
    pqf = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([_mrcr_row(0, 2), dict(_mrcr_row(1, 2), prompt="[{oops")]), pqf)
    with pytest.raises(RecordError, match=rf"^{pqf}: row 1: field 'prompt' is not a JSON list of chat messages"):
        import_benchmark("mrcr", [pqf], out)
    pq.write_table(pa.Table.from_pylist([dict(_mrcr_row(0, 2), random_string_to_prepend="")]), pqf)
    with pytest.raises(RecordError, match=rf"^{pqf}: row 0: field 'random_string_to_prepend' must be a non-empty "):
        import_benchmark("mrcr", [pqf], out)
    assert out.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == \
           ["lb.json", "lb.jsonl", "m.parquet", "out.jsonl"]  # no temporary file left either
    with pytest.raises(ValueError, match="unknown benchmark 'longbench'; known: longbench-v2, mrcr, docmath, frames, "
                                         "lbv1qa, corpusqa"):
        import_benchmark("longbench", [src], out)
    # an MRCR row no reply could score 1 on, or whose conversation asks nothing
    pq.write_table(pa.Table.from_pylist([dict(_mrcr_row(0, 2), answer="the poem without its prefix")]), pqf)
    with pytest.raises(RecordError, match=rf"^{pqf}: row 0: field 'answer' does not start with "
                                          r"random_string_to_prepend 'h0Zq9'$"):
        import_benchmark("mrcr", [pqf], out)
    row = _mrcr_row(0, 2)
    pq.write_table(pa.Table.from_pylist([dict(row, prompt=json.dumps(json.loads(row["prompt"])[:-1]))]), pqf)
    with pytest.raises(RecordError, match=rf"^{pqf}: row 0: field 'prompt' must be a list of chat messages ending "
                                          "in the user's request$"):
        import_benchmark("mrcr", [pqf], out)
    # --out: a directory, or a source file (the download overwritten by its own import)
    with pytest.raises(ValueError, match=rf"^--out {tmp_path}: is a directory; name a \.jsonl, \.json"):
        import_benchmark("mrcr", [pqf], tmp_path)
    with pytest.raises(ValueError, match=r"out\.jsonl is one of the source files"):
        import_benchmark("longbench-v2", [src, tmp_path / "." / "out.jsonl"], out)
    assert out.read_text() == "previous\n"


def test_an_mrcr_record_needs_its_prefix(tmp_path):
    """A record routed to the mrcr metric without extra_info.random_string_to_prepend is refused when loaded: every
    reply would be graded without MRCR's prefix rule."""
    row = {"data_source": "openai_mrcr", "prompt": "hi", "reward_model": {"ground_truth": {"golden_label": "x"}}}
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(RecordError, match=r"line 1: an MRCR record needs .*extra_info\.random_string_to_prepend"):
        load_records(path)


def test_data_import_command(tmp_path, capsys):
    """`golong data import BENCHMARK FILES --out OUT`: the records per task, then OUT; a bad row: exit 2 (bad input),
    the file and line in one error line; --template read from a file."""
    src = tmp_path / "data.json"
    src.write_text(json.dumps([_lbv2_row(i) for i in range(4)]))
    (tmp_path / "t.txt").write_text("$DOC$ $Q$ (B) $C_B$ (C) $C_C$ (D) $C_D$ (A) $C_A$")
    out = tmp_path / "lb.jsonl"
    assert main(["data", "import", "longbench-v2", str(src), "--out", str(out), "--template",
                 str(tmp_path / "t.txt")]) == 0
    printed = capsys.readouterr().out
    assert "longbench_v2" in printed and "choice" in printed and printed.rstrip().endswith(str(out))
    assert [r.prompt[0]["content"].endswith(f"(A) clause {i}.1") for i, r in enumerate(load_records(out))] == \
           [True] * 4
    src.write_text(json.dumps([{"question": "q"}]))
    assert main(["data", "import", "mrcr", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"golong: error: {src}: item 0: missing field(s) prompt, answer, random_string_to_prepend")


def test_data_check_val_only_checks_an_imported_benchmark_without_training_data(tmp_path, capsys):
    """`golong data check --val-only`: the validation records alone (a benchmark for eval, no training data in the
    config): per task the prompts, and with --score-answers the reference answers, which score 1 on all three
    benchmarks; with no validation records, or none that fits, it says so and fails."""
    src = tmp_path / "data.json"
    src.write_text(json.dumps([_lbv2_row(i) for i in range(3)]))
    pqf = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([_mrcr_row(i, 4) for i in range(2)]), pqf)
    import_benchmark("longbench-v2", [src], tmp_path / "lb.jsonl")
    import_benchmark("mrcr", [pqf], tmp_path / "mrcr.jsonl")
    (tmp_path / "simplong_testmini.jsonl").write_text(
        "".join(json.dumps(_docmath_row(i, gt)) + "\n" for i, gt in enumerate((0.3, 41))))
    import_benchmark("docmath", [tmp_path / "simplong_testmini.jsonl"], tmp_path / "dm.jsonl")
    config = [str(ROOT / "configs" / "demo-cpu.yaml"), "data.train_files=[]", "data.synthetic_n=0",
              f"logging.run_dir={tmp_path / 'run'}"]
    files = f"data.val_files=[{tmp_path / 'lb.jsonl'},{tmp_path / 'mrcr.jsonl'},{tmp_path / 'dm.jsonl'}]"
    assert main(["data", "check", *config, files, "--val-only", "--score-answers"]) == 0
    out = capsys.readouterr().out
    assert "train" not in out
    assert re.search(r"val\s+│\s+longbench_v2\s+│\s+3\s+│\s+3\s+│\s+1\.000\s+│\s+0", out)
    assert re.search(r"val\s+│\s+mrcr_4needle\s+│\s+2\s+│\s+2\s+│\s+1\.000\s+│\s+0", out)
    assert re.search(r"val\s+│\s+docmath\s+│\s+2\s+│\s+2\s+│\s+1\.000\s+│\s+0", out)
    assert main(["data", "check", *config, "data.synthetic_val_n=0", "--val-only"]) == 2
    assert "nothing to check: --val-only reads data.val_files" in capsys.readouterr().err
    # no prompt fits: golong eval would stop on it, so the check does
    assert main(["data", "check", *config, files, "data.max_prompt_tokens=20", "data.overflow=drop", "--val-only"]) == 2
    assert "no validation prompt fits data.max_prompt_tokens=20 (data.overflow=drop)" in capsys.readouterr().err


def test_eval_command_passes_every_by_key(tmp_path, monkeypatch):
    """`golong eval CONFIG --by a --by b`: both keys reach evaluate, in order."""
    seen = {}
    monkeypatch.setattr("golong.evaluate.evaluate", lambda cfg, checkpoint, out, **kw: seen.update(kw))
    assert main(["eval", str(ROOT / "configs" / "demo-cpu.yaml"), f"logging.run_dir={tmp_path}", "--by", "length",
                 "--by", "prompt_tokens"]) == 0
    assert seen == {"by": ["length", "prompt_tokens"], "save_every": None}
