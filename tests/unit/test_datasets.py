"""embedpipe.contracts.datasets: strict BEIR parsing with precise errors, training pairs, object paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedpipe.contracts import datasets
from embedpipe.contracts.datasets import (
    MAX_ID_BYTES,
    MAX_LINE_BYTES,
    DatasetError,
    Doc,
    Notice,
    dataset_of,
    derive_pairs,
    load_dir,
    load_files,
    parse_corpus,
    parse_pairs,
    parse_qrels,
    parse_queries,
)

ROOT = Path(__file__).resolve().parents[2]
QUIRKS = ROOT / "tests" / "fixtures" / "beir_quirks"
HEADER = b"query-id\tcorpus-id\tscore\n"


def jl(*objs) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def corpus_error(data: bytes, file: str = "corpus.jsonl") -> DatasetError:
    with pytest.raises(DatasetError) as err:
        parse_corpus(data, file)
    return err.value


def assert_error(err: DatasetError, file: str, line: int | None, reason: str) -> None:
    assert (err.file, err.line) == (file, line)
    assert reason in err.reason, err.reason
    where = f"{file}:{line}" if line else file
    assert str(err).startswith(f"{where}: ")


# ---------------------------------------------------------------- corpus errors


def test_invalid_utf8():
    data = jl({"_id": "a", "text": "ok"}) + b'{"_id": "b", "text": "caf\xe9"}\n'
    assert_error(corpus_error(data), "corpus.jsonl", 2, "invalid UTF-8 at byte 25")


def test_invalid_json_line():
    data = jl({"_id": "a", "text": "ok"}, {"_id": "b", "text": "ok"}) + b'{"_id": "c", "text": "no end}\n'
    assert_error(corpus_error(data), "corpus.jsonl", 3, "invalid JSON: Unterminated string")


@pytest.mark.parametrize(
    "line",
    [
        rb'{"_id": "x\ud800", "text": "t"}',  # in an id: check_id used to raise UnicodeEncodeError (a 500 loop)
        rb'{"_id": "b", "text": "half \udfff"}',  # in a text: every later job's content hash used to raise
        rb'{"_id": "b", "text": "t", "metadata": {"k": ["\uDBFF"]}}',
    ],
    ids=["id", "text", "metadata"],
)
def test_an_escaped_lone_surrogate_is_a_bad_line(line):
    data = jl({"_id": "a", "text": "ok"}) + line + b"\n"
    assert_error(corpus_error(data), "corpus.jsonl", 2, "unpaired UTF-16 surrogate")


def test_the_surrogate_check_walks_any_depth():
    # a line the parser still takes can sit deeper than a recursive walk (json.dumps) goes: the check must not give
    # up there and let the surrogate reach the content hash
    deep: list = []
    inner = deep
    for _ in range(100_000):
        inner.append([])
        inner = inner[0]
    inner.append("bad \udfff")
    assert datasets._unpaired_surrogate({"_id": "d", "x": deep})
    assert not datasets._unpaired_surrogate({"_id": "d", "x": [[["fine \U0001f600"]]]})


def test_escaped_surrogate_pairs_are_text():
    docs = parse_corpus(b'{"_id": "e", "text": "smile \\ud83d\\ude00"}\n', "corpus.jsonl")
    assert docs["e"].text == "smile \U0001f600" and docs["e"].content_hash


@pytest.mark.parametrize("parse", [parse_queries, parse_pairs])
def test_lone_surrogates_are_refused_in_every_jsonl_kind(parse):
    data = b'{"_id": "q\\ud800", "text": "t", "anchor": "a\\ud800", "positive": "p"}\n'
    with pytest.raises(DatasetError, match="unpaired UTF-16 surrogate"):
        parse(data, "x.jsonl")


def test_line_that_is_not_an_object():
    data = jl({"_id": "a", "text": "ok"}, ["b", "text"])
    assert_error(corpus_error(data), "corpus.jsonl", 2, "expected a JSON object, got list")


def test_missing_id():
    assert_error(corpus_error(jl({"text": "no id"})), "corpus.jsonl", 1, "missing required field '_id'")


def test_title_only_documents_are_documents():
    # published BEIR corpora hold documents with a title and an empty (or no) text: they are documents
    data = jl({"_id": "a", "text": "ok"}, {"_id": "b", "title": "only a title"}, {"_id": "c", "title": "T", "text": ""})
    notices: list[Notice] = []
    docs = parse_corpus(data, "corpus.jsonl", notices=notices)
    assert docs["b"] == Doc("b", "", "only a title") and docs["b"].full_text == "only a title"
    assert docs["c"].full_text == "T"
    assert notices == []


@pytest.mark.parametrize(("value", "kind"), [(5, "int"), (["t"], "list"), ({"t": 1}, "dict"), (True, "bool")])
def test_text_of_the_wrong_type(value, kind):
    err = corpus_error(jl({"_id": "a", "text": value}))
    assert_error(err, "corpus.jsonl", 1, f"field 'text' must be a string, got {kind}")


@pytest.mark.parametrize(
    "doc",
    [{"_id": "b", "text": "  "}, {"_id": "b", "title": "", "text": ""}, {"_id": "b", "title": " \n"}, {"_id": "b"}],
    ids=["blank-text", "both-empty", "blank-title-no-text", "no-fields"],
)
def test_document_with_neither_title_nor_text_is_skipped_with_a_notice(doc):
    notices: list[Notice] = []
    docs = parse_corpus(
        jl({"_id": "a", "text": "ok"}, doc, {"_id": "c", "text": "ok"}), "corpus.jsonl", notices=notices
    )
    assert list(docs) == ["a", "c"]
    assert notices == [Notice("corpus.jsonl", 2, "b", "document 'b' has neither title nor text: skipped")]
    assert str(notices[0]) == "corpus.jsonl:2: document 'b' has neither title nor text: skipped"
    assert notices[0].to_dict() == {"file": "corpus.jsonl", "line": 2, "id": "b", "reason": notices[0].reason}


def test_a_corpus_of_only_skipped_documents_is_no_corpus():
    with pytest.raises(DatasetError) as err:
        load_files("demo", {"corpus.jsonl": jl({"_id": "a", "text": ""}, {"_id": "b", "title": " "})})
    assert_error(err.value, "datasets/demo/corpus.jsonl", None, "dataset has no corpus")


def test_null_title_is_no_title():
    assert parse_corpus(jl({"_id": "a", "title": None, "text": "t"}), "corpus.jsonl")["a"].title == ""


@pytest.mark.parametrize(("value", "kind"), [(5, "int"), (["t"], "list")])
def test_title_of_the_wrong_type(value, kind):
    err = corpus_error(jl({"_id": "a", "title": value, "text": "t"}))
    assert_error(err, "corpus.jsonl", 1, f"field 'title' must be a string, got {kind}")


def test_metadata_must_be_an_object():
    err = corpus_error(jl({"_id": "a", "text": "t", "metadata": ["x"]}))
    assert_error(err, "corpus.jsonl", 1, "field 'metadata' must be an object, got list")


def nested(depth: int):
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_metadata_nesting_is_capped():
    ok = {"_id": "a", "text": "t", "metadata": {"m": nested(datasets.MAX_JSON_DEPTH - 1)}}
    assert parse_corpus(jl(ok), "corpus.jsonl")["a"].metadata == ok["metadata"]
    deep = {"_id": "b", "text": "t", "metadata": {"m": nested(datasets.MAX_JSON_DEPTH)}}
    err = corpus_error(jl(ok, deep))
    assert_error(err, "corpus.jsonl", 2, f"field 'metadata' nests deeper than {datasets.MAX_JSON_DEPTH} levels")


@pytest.mark.parametrize("parse", [parse_corpus, parse_queries, parse_pairs])
def test_json_nested_past_the_parser_stack_is_a_dataset_error(parse):
    data = b"\n" + b"[" * 100_000 + b"]" * 100_000 + b"\n"  # json recurses per level: RecursionError
    with pytest.raises(DatasetError) as err:
        parse(data, "f.jsonl")
    assert_error(err.value, "f.jsonl", 2, "invalid JSON: nested too deeply")


def test_boolean_id_is_rejected():
    assert_error(corpus_error(jl({"_id": True, "text": "t"})), "corpus.jsonl", 1, "field '_id' must be a string")


def test_numeric_ids_are_read_as_strings():
    docs = parse_corpus(jl({"_id": 7, "text": "seven"}), "corpus.jsonl")
    assert list(docs) == ["7"]


def test_duplicate_id_within_a_file():
    data = jl({"_id": "a", "text": "1"}, {"_id": "b", "text": "2"}, {"_id": "a", "text": "3"})
    err = corpus_error(data)
    assert_error(err, "corpus.jsonl", 3, "duplicate _id 'a' (first seen in corpus.jsonl:1)")


def test_duplicate_of_a_skipped_document_is_still_a_duplicate():
    data = jl({"_id": "a", "text": ""}, {"_id": "b", "text": "2"}, {"_id": "a", "text": "now with text"})
    assert_error(corpus_error(data), "corpus.jsonl", 3, "duplicate _id 'a' (first seen in corpus.jsonl:1)")
    files = {
        "corpus/part-1.jsonl": jl({"_id": "a", "title": "", "text": ""}, {"_id": "b", "text": "2"}),
        "corpus/part-2.jsonl": jl({"_id": "a", "text": "again"}),
    }
    with pytest.raises(DatasetError) as err:
        load_files("demo", files)
    assert_error(err.value, "corpus/part-2.jsonl", 1, "duplicate _id 'a' (first seen in corpus/part-1.jsonl:1)")


def test_id_over_the_milvus_key_limit():
    ok = "é" * (MAX_ID_BYTES // 2)  # 512 bytes in UTF-8
    assert list(parse_corpus(jl({"_id": ok, "text": "t"}), "corpus.jsonl")) == [ok]
    long_id = "é" * (MAX_ID_BYTES // 2) + "x"
    err = corpus_error(jl({"_id": "a", "text": "t"}, {"_id": long_id, "text": "t"}))
    assert_error(err, "corpus.jsonl", 2, f"_id is 513 bytes, over the {MAX_ID_BYTES}-byte limit")


def test_id_over_the_limit_is_an_error_even_for_a_document_that_would_be_skipped():
    err = corpus_error(jl({"_id": "x" * (MAX_ID_BYTES + 1), "text": ""}))
    assert_error(err, "corpus.jsonl", 1, "over the 512-byte limit")


@pytest.mark.parametrize("doc_id", ["a\tb", "a\nb", "nul\x00", "del\x7f"], ids=repr)
def test_id_with_control_characters(doc_id):
    err = corpus_error(jl({"_id": "ok", "text": "t"}, {"_id": doc_id, "text": "t"}))
    assert_error(err, "corpus.jsonl", 2, "contains control characters")


def test_duplicate_id_across_corpus_files():
    files = {
        "corpus/part-1.jsonl": jl({"_id": "a", "text": "1"}, {"_id": "b", "text": "2"}),
        "corpus/part-2.jsonl": jl({"_id": "c", "text": "3"}, {"_id": "b", "text": "again"}),
    }
    with pytest.raises(DatasetError) as err:
        load_files("demo", files)
    assert_error(err.value, "corpus/part-2.jsonl", 2, "duplicate _id 'b' (first seen in corpus/part-1.jsonl:2)")


@pytest.mark.parametrize("data", [b"", b"\n", b"  \n\r\n"], ids=["zero-bytes", "newline", "blank-lines"])
def test_empty_file(data):
    assert_error(corpus_error(data), "corpus.jsonl", None, "file is empty")


def test_binary_file():
    data = b"PK\x03\x04\x00\x00\x08\x00" + bytes(range(256))
    assert_error(corpus_error(data, "corpus/part.jsonl"), "corpus/part.jsonl", None, "binary file (NUL bytes)")


def test_line_over_the_size_limit():
    long_text = "x" * MAX_LINE_BYTES
    data = jl({"_id": "a", "text": "ok"}, {"_id": "b", "text": long_text})
    size = len(json.dumps({"_id": "b", "text": long_text}).encode())
    err = corpus_error(data)
    assert_error(err, "corpus.jsonl", 2, f"line is {size} bytes, over the {MAX_LINE_BYTES}-byte limit")


def test_line_at_the_size_limit_is_accepted():
    filler = "x" * (MAX_LINE_BYTES - len(json.dumps({"_id": "a", "text": ""}).encode()))
    data = jl({"_id": "a", "text": filler})
    assert len(data) == MAX_LINE_BYTES + 1  # the line plus its newline
    assert parse_corpus(data, "corpus.jsonl")["a"].text == filler


def test_crlf_and_blank_lines_are_fine():
    data = b'{"_id": "a", "text": "one"}\r\n\r\n{"_id": "b", "text": "two", "title": "T"}\r\n'
    docs = parse_corpus(data, "corpus.jsonl")
    assert docs == {"a": Doc("a", "one"), "b": Doc("b", "two", "T")}


def test_queries_errors_name_the_file():
    data = jl({"_id": "q1", "text": "a"}, {"_id": "q1", "text": "b"})
    with pytest.raises(DatasetError) as err:
        parse_queries(data, "queries.jsonl")
    assert_error(err.value, "queries.jsonl", 2, "duplicate query _id 'q1'")


def test_pairs_need_anchor_and_positive():
    assert parse_pairs(jl({"anchor": "a", "positive": "p"}), "pairs/x.jsonl") == [("a", "p", None)]
    assert parse_pairs(jl({"anchor": "a", "positive": "p", "negative": "n"}), "pairs/x.jsonl") == [("a", "p", "n")]
    with pytest.raises(DatasetError) as err:
        parse_pairs(jl({"anchor": "a", "positive": "p"}, {"anchor": "a"}), "pairs/x.jsonl")
    assert_error(err.value, "pairs/x.jsonl", 2, "missing required field 'positive'")


# ---------------------------------------------------------------- qrels errors


def qrels_error(data: bytes, file: str = "qrels/test.tsv") -> DatasetError:
    with pytest.raises(DatasetError) as err:
        parse_qrels(data, file)
    return err.value


def test_qrels_parse():
    data = HEADER + b"q1\td1\t1\nq1\td2\t2\r\nq2\td1\t0\n"
    assert parse_qrels(data, "qrels/test.tsv") == {"q1": {"d1": 1, "d2": 2}, "q2": {"d1": 0}}


@pytest.mark.parametrize(
    "header", [b"query_id\tcorpus_id\tscore\n", b"query-id corpus-id score\n", b"q1\td1\t1\n"], ids=str
)
def test_qrels_bad_header(header):
    err = qrels_error(header + b"q1\td1\t1\n")
    assert_error(err, "qrels/test.tsv", 1, "header must be 'query-id\\tcorpus-id\\tscore'")


def test_qrels_wrong_column_count():
    err = qrels_error(HEADER + b"q1\td1\t1\nq2 d2 1\n")
    assert_error(err, "qrels/test.tsv", 3, "expected 3 tab-separated columns, got 1")
    err = qrels_error(HEADER + b"q1\td1\t1\tx\n")
    assert_error(err, "qrels/test.tsv", 2, "expected 3 tab-separated columns, got 4")


def test_qrels_non_numeric_score():
    err = qrels_error(HEADER + b"q1\td1\thigh\n", "qrels/dev.tsv")
    assert_error(err, "qrels/dev.tsv", 2, "score 'high' is not a number")


def test_qrels_infinite_score():
    err = qrels_error(HEADER + b"q1\td1\tinf\n")
    assert_error(err, "qrels/test.tsv", 2, "score 'inf' is not a number")


def beir_files(**extra: bytes) -> dict[str, bytes]:
    files = {
        "corpus.jsonl": jl({"_id": "d1", "text": "one"}, {"_id": "d2", "text": "two"}),
        "queries.jsonl": jl({"_id": "q1", "text": "first?"}, {"_id": "q2", "text": "second?"}),
    }
    files.update(extra)
    return files


def test_qrels_with_absent_corpus_id_are_kept_and_counted():
    # published BEIR qrels name documents the corpus lacks; trec_eval counts them relevant and unretrievable
    files = beir_files(**{"qrels/test.tsv": HEADER + b"q1\td1\t1\nq2\tzzz\t1\nq2\tyyy\t2\n"})
    ds = load_files("demo", files)
    assert ds.qrels["test"] == {"q1": {"d1": 1}, "q2": {"zzz": 1, "yyy": 2}}
    assert ds.qrels_absent == {"test": 2}
    assert ds.eval_qrels() == ds.qrels["test"]


def test_qrels_naming_a_skipped_document_count_as_absent():
    corpus = jl({"_id": "d1", "text": "one"}, {"_id": "d2", "title": "", "text": ""})
    files = beir_files(**{"corpus.jsonl": corpus, "qrels/dev.tsv": HEADER + b"q1\td2\t1\n"})
    ds = load_files("demo", files)
    assert [n.id for n in ds.skipped] == ["d2"]
    assert ds.qrels_absent == {"dev": 1} and ds.qrels["dev"] == {"q1": {"d2": 1}}


def test_train_qrels_naming_absent_documents_stay_out_of_training():
    files = beir_files(**{"qrels/train.tsv": HEADER + b"q1\tgone\t1\nq2\td2\t1\n"})
    ds = load_files("demo", files)
    assert ds.qrels_absent == {"train": 1}
    assert ds.training_pairs() == [("second?", "two", None)]


def test_qrels_with_unknown_query_id():
    files = beir_files(**{"qrels/train.tsv": HEADER + b"q1\td1\t1\nq9\td2\t1\n"})
    with pytest.raises(DatasetError) as err:
        load_files("demo", files)
    assert_error(
        err.value, "qrels/train.tsv", 3, "query-id 'q9' is not in queries (queries.jsonl and any queries table)"
    )


def test_qrels_absent_document_notice_names_the_line():
    notices: list[Notice] = []
    data = HEADER + b"q1\td1\t1\nq2\tzzz\t1\n"
    parse_qrels(data, "qrels/test.tsv", {"q1", "q2"}, {"d1"}, notices)
    assert notices == [Notice("qrels/test.tsv", 3, "zzz", "corpus-id 'zzz' (query 'q2') is not in the corpus")]
    # one file on its own (upload intake) cannot know the corpus: no notice, no error
    assert parse_qrels(data, "qrels/test.tsv") == {"q1": {"d1": 1}, "q2": {"zzz": 1}}


def test_dataset_without_corpus():
    with pytest.raises(DatasetError) as err:
        load_files("demo", {"queries.jsonl": jl({"_id": "q1", "text": "x"})})
    assert_error(err.value, "datasets/demo/corpus.jsonl", None, "dataset has no corpus")


# ---------------------------------------------------------------- valid datasets


def test_load_dir_tiny_beir():
    ds = load_dir(ROOT / "tests" / "fixtures" / "tiny_beir")
    assert ds.name == "tiny_beir"
    assert len(ds.corpus) == 24 and len(ds.queries) == 8
    assert sum(len(r) for r in ds.qrels["test"].values()) == 6
    assert sum(len(r) for r in ds.qrels["train"].values()) == 3
    assert ds.eval_split() == "test"
    assert ds.eval_qrels() is ds.qrels["test"]
    assert ds.corpus["g01"].title == "Watering schedule"
    assert ds.corpus["g01"].metadata == {"category": "care"}
    # no pairs/: training comes from qrels/train.tsv (one pair per relevant row)
    assert len(ds.training_pairs()) == 3


def test_load_dir_beir_quirks():
    """A BEIR folder as published (tests/fixtures/beir_quirks/README.md): accepted, with counted notices."""
    ds = load_dir(QUIRKS)
    assert ds.name == "beir_quirks"
    assert sorted(ds.corpus) == ["7", "q-01", "q-02", "q-03", "q-05", "q-06"]
    assert ds.skipped == [Notice("corpus.jsonl", 4, "q-04", "document 'q-04' has neither title nor text: skipped")]
    assert ds.qrels_absent == {"test": 1}
    assert ds.qrels["test"]["k3"] == {"q-06": 1, "q-99": 1}  # evaluated: relevant, unretrievable
    assert ds.qrels["dev"] == {"k4": {"q-05": 1}}
    assert ds.eval_split() == "test"
    # title-only documents: the title is the text
    assert ds.corpus["q-02"].full_text == "Seed library opening hours"
    assert ds.corpus["q-03"].full_text == "Volunteer rota"
    # a text that repeats its title: the title once
    rain = ds.corpus["q-01"]
    assert rain.body == "The four barrels behind the potting shed feed the drip lines from May to September."
    assert rain.full_text == "Rain barrels. " + rain.body
    assert rain.metadata == {"category": "water"}
    # no pairs/, no qrels/train.tsv: derived pairs, none from title-only documents, positives without the title
    pairs = ds.training_pairs()
    assert [a for a, _, _ in pairs] == [
        "Bee hotel",
        "Rain barrels",
        "Frost cloth",
        "The pond pump runs on a timer from dawn to dusk.",
    ]
    assert ("Rain barrels", rain.body, None) in pairs
    assert all(not p.startswith(a) for a, p, _ in pairs)


def test_load_dir_demo_example():
    ds = load_dir(ROOT / "examples" / "demo" / "data", name="demo")
    assert ds.name == "demo"
    assert len(ds.corpus) == 1220 and len(ds.queries) == 600
    assert sum(len(r) for r in ds.qrels["test"].values()) == 215
    assert sum(len(r) for r in ds.qrels["train"].values()) == 434
    assert set(ds.qrels) == {"test", "train"}


def test_load_dir_ignores_files_outside_the_layout(tmp_path):
    (tmp_path / "corpus.jsonl").write_bytes(jl({"_id": "a", "text": "t"}))
    (tmp_path / "README.md").write_text("not data\0")
    (tmp_path / "qrels" / "old").mkdir(parents=True)
    (tmp_path / "qrels" / "old" / "x.tsv").write_text("garbage")
    ds = load_dir(tmp_path, name="x")
    assert list(ds.corpus) == ["a"] and ds.qrels == {} and ds.eval_split() is None and ds.eval_qrels() == {}


def test_eval_split_is_test_only():
    # dev is the selection split: every choice is made on it, so it never stands in for test in reports or the gate
    ds = load_files("demo", beir_files(**{"qrels/dev.tsv": HEADER + b"q1\td1\t1\n"}))
    assert ds.qrels.get("test") is None and ds.eval_split() is None and ds.eval_qrels() == {}


# ---------------------------------------------------------------- training pairs


def test_training_pairs_prefer_pairs_folder():
    files = beir_files(
        **{
            "pairs/extra.jsonl": jl({"anchor": "A", "positive": "P", "negative": "N"}),
            "qrels/train.tsv": HEADER + b"q1\td1\t1\n",
        }
    )
    assert load_files("demo", files).training_pairs() == [("A", "P", "N")]


def test_training_pairs_from_qrels_train():
    corpus = jl({"_id": "d1", "text": "one", "title": "One"}, {"_id": "d2", "text": "two"})
    files = beir_files(**{"corpus.jsonl": corpus, "qrels/train.tsv": HEADER + b"q2\td2\t1\nq1\td1\t2\nq1\td2\t0\n"})
    # sorted by query id; score 0 rows are not positives; the document side is title + text
    assert load_files("demo", files).training_pairs() == [("first?", "One. one", None), ("second?", "two", None)]


def test_training_pairs_derived_from_a_bare_corpus():
    corpus = jl(
        {"_id": "b", "text": "The heater starts at five degrees. It runs on propane."},
        {"_id": "a", "title": "Compost", "text": "Bins rotate monthly."},
    )
    ds = load_files("demo", {"corpus.jsonl": corpus})
    assert ds.training_pairs() == [
        ("Compost", "Bins rotate monthly.", None),
        ("The heater starts at five degrees.", "It runs on propane.", None),
    ]


def test_derive_pairs_skips_docs_without_a_usable_first_sentence():
    docs = [
        Doc("a", "Too short. The rest of the text follows here."),  # first sentence under 3 words
        Doc("b", "One long sentence without any break at all"),
        Doc("c", "This sentence ends the text. "),  # nothing after it
        Doc("d", "Three words here. And the rest."),
    ]
    assert derive_pairs(docs) == [("Three words here.", "And the rest.", None)]


# ---------------------------------------------------------------- object paths and names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("datasets/demo/corpus.jsonl", ("demo", "corpus.jsonl")),
        ("datasets/demo/corpus/part-1.jsonl", ("demo", "corpus/part-1.jsonl")),
        ("datasets/demo/qrels/test.tsv", ("demo", "qrels/test.tsv")),
        ("datasets/demo/queries.jsonl", ("demo", "queries.jsonl")),
        ("datasets/demo/pairs/a.jsonl", ("demo", "pairs/a.jsonl")),
        ("datasets/my_data-2/corpus.jsonl", ("my_data-2", "corpus.jsonl")),
    ],
)
def test_dataset_of_accepts_beir_files(name, expected):
    assert dataset_of(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "datasets/demo/../other/corpus.jsonl",
        "datasets/demo/corpus/../corpus.jsonl",
        "datasets/demo/corpus/\x07part.jsonl",
        "datasets/demo/qrels/test\n.tsv",
        "datasets/Demo/corpus.jsonl",
        "datasets/-demo/corpus.jsonl",
        "datasets/de mo/corpus.jsonl",
        "datasets/../corpus.jsonl",
        "datasets/" + "a" * 64 + "/corpus.jsonl",
        "uploads/demo/corpus.jsonl",
        "corpus.jsonl",
        "datasets/demo",
        "datasets/demo/README.md",
        "datasets/demo/qrels/old/test.tsv",
        "datasets/demo/corpus.json",
    ],
)
def test_dataset_of_rejects(name):
    assert dataset_of(name) is None


def test_dataset_name_with_trailing_newline_is_rejected():
    assert dataset_of("datasets/demo\n/corpus.jsonl") is None


@pytest.mark.parametrize("name", ["demo", "a", "beir-scifact_2"])
def test_check_name_accepts(name):
    assert datasets.check_name(name) == name


@pytest.mark.parametrize("name", ["", "Demo", "_demo", "de/mo", "a" * 64])
def test_check_name_rejects(name):
    with pytest.raises(ValueError, match="dataset name"):
        datasets.check_name(name)


# ---------------------------------------------------------------- documents


def test_content_hash_is_stable():
    a = Doc("1", "Some text.", "Title", {"k": 1, "j": [1, 2]})
    b = Doc("1", "Some text.", "Title", {"j": [1, 2], "k": 1})
    assert a.content_hash == b.content_hash
    assert len(a.content_hash) == 32 and int(a.content_hash, 16) >= 0
    # pinned: a change to the hash recipe re-embeds every document of every live index
    assert Doc("x", "hello").content_hash == "7c76198e673b617bcf219982c51ae56e"


def test_content_hash_changes_with_content():
    base = Doc("1", "Some text.", "Title", {"k": 1})
    assert Doc("1", "Some text!", "Title", {"k": 1}).content_hash != base.content_hash
    assert Doc("1", "Some text.", "Other", {"k": 1}).content_hash != base.content_hash
    assert Doc("1", "Some text.", "Title", {"k": 2}).content_hash != base.content_hash
    # the id is not content: the same document under another id hashes the same
    assert Doc("2", "Some text.", "Title", {"k": 1}).content_hash == base.content_hash


def test_full_text_joins_title_and_text():
    assert Doc("1", "Body.", "Head").full_text == "Head. Body."
    assert Doc("1", "Body.").full_text == "Body."
    assert Doc("1", "", "Head").full_text == "Head"


@pytest.mark.parametrize(
    "text", ["Head. Body.", "Head\nBody.", "Head: Body.", "Head - Body.", "  Head.  Body."], ids=repr
)
def test_full_text_uses_a_repeated_title_once(text):
    doc = Doc("1", text, "Head")
    assert doc.body == "Body."
    assert doc.full_text == "Head. Body."


def test_text_that_is_only_its_title():
    assert Doc("1", "Head", "Head").full_text == "Head"
    assert derive_pairs([Doc("1", "Head", "Head")]) == []


def test_derive_pairs_strip_the_title_and_skip_title_only_documents():
    docs = [Doc("a", "", "Only a title"), Doc("b", "Compost. Bins rotate monthly.", "Compost")]
    assert derive_pairs(docs) == [("Compost", "Bins rotate monthly.", None)]


def test_fingerprint_follows_content_not_file_order():
    one = load_files("d", {"corpus.jsonl": jl({"_id": "a", "text": "x"}, {"_id": "b", "text": "y"})})
    two = load_files("d", {"corpus.jsonl": jl({"_id": "b", "text": "y"}, {"_id": "a", "text": "x"})})
    three = load_files("d", {"corpus.jsonl": jl({"_id": "a", "text": "x"}, {"_id": "b", "text": "z"})})
    assert one.fingerprint() == two.fingerprint() != three.fingerprint()


def test_the_content_hash_keeps_its_definition():
    """Stored in every index and id/hash table: the fast path must give json.dumps' exact bytes."""
    import hashlib
    import json

    from embedpipe.contracts.datasets import Doc

    texts = ["", "plain", 'quote " and \\ backslash', "caf\u00e9 \u2014 \U0001f600"]
    texts += ["tab\tnew\nline\r\x01\x1f", "\u2028"]
    for title in texts:
        for text in texts:
            for metadata in ({}, {"b": 1, "a": ["x", {"z": None}]}):
                payload = json.dumps([title, text, metadata], sort_keys=True, ensure_ascii=False)
                want = hashlib.sha256(payload.encode()).hexdigest()[:32]
                assert Doc("d", text, title, metadata).content_hash == want


# ---------------------------------------------------------------- known lines (the incremental embed job's load)


def known_from(data: bytes, file: str = "corpus.jsonl") -> datasets.KnownLines:
    """What an earlier load of ``data`` leaves in the id/hash table: each document's line digest, id and hash."""
    corpus = datasets.Corpus()
    parse_corpus(data, file, into=corpus, known=datasets.KnownLines())
    hashes = corpus.content_hashes()
    return datasets.KnownLines({d: i for i, d in corpus.digests.items()}, hashes)


def outcome(files: dict[str, bytes], known: datasets.KnownLines | None = None):
    """(ids, hashes, documents, skipped, qrels absent) of a load, or the error it raised as (file, line, reason)."""
    try:
        ds = load_files("d", files, known=known)
    except DatasetError as exc:
        return ("error", exc.file, exc.line, exc.reason)
    return (
        list(ds.corpus),
        datasets.content_hashes(ds.corpus),
        {i: ds.corpus[i] for i in ds.corpus},
        [n.to_dict() for n in ds.skipped],
        ds.qrels_absent,
    )


OLD = jl(
    {"_id": "a", "title": "Alpha", "text": "first"},
    {"_id": "b", "text": "second", "metadata": {"k": [1, 2]}},
    {"_id": 7, "title": "Seven", "text": ""},
    {"_id": "c", "text": "third"},
)


def test_known_lines_are_not_parsed_and_give_the_full_parse_s_documents():
    new = OLD.replace(b'"third"', b'"third, edited"') + jl({"_id": "d", "text": "new"})
    corpus = datasets.Corpus()
    parse_corpus(new, "corpus.jsonl", into=corpus, known=known_from(OLD))
    assert corpus.parsed == 2  # c (edited) and d (new); a, b and 7 came from the table
    full = parse_corpus(new, "corpus.jsonl")
    assert corpus.content_hashes() == {i: d.content_hash for i, d in full.items()}
    assert list(corpus) == list(full) and corpus.parsed == 2  # hashes and ids without parsing
    assert {i: corpus[i] for i in corpus} == full  # a known line is parsed when asked for, as the full parse does
    assert corpus.parsed == 5 and corpus.content_hashes() == {i: d.content_hash for i, d in full.items()}
    assert set(corpus.digests) == set(full) and len(set(corpus.digests.values())) == 5


def test_a_known_line_s_hash_is_its_table_s_and_a_corpus_takes_one_table():
    known = known_from(OLD)
    corpus = datasets.Corpus()
    parse_corpus(OLD, "corpus.jsonl", into=corpus, known=known)
    assert corpus.known_lines == 4 and corpus.content_hashes() == known.hashes
    with pytest.raises(ValueError, match="one KnownLines"):
        parse_corpus(jl({"_id": "z", "text": "z"}), "corpus/more.jsonl", into=corpus, known=known_from(OLD))
    partial = datasets.KnownLines(known.ids, {i: h for i, h in known.hashes.items() if i != "b"})
    corpus = datasets.Corpus()
    parse_corpus(OLD, "corpus.jsonl", into=corpus, known=partial)
    with pytest.raises(KeyError, match="'b'"):  # not a table's: a known line's id without a hash
        corpus.content_hashes()


def test_a_changed_title_or_metadata_is_a_new_line_and_a_new_hash():
    new = OLD.replace(b'"Alpha"', b'"Alpha 2"').replace(b"[1, 2]", b"[1, 3]")
    corpus = datasets.Corpus()
    parse_corpus(new, "corpus.jsonl", into=corpus, known=known_from(OLD))
    old_hashes = known_from(OLD).hashes
    changed = {i for i, h in corpus.content_hashes().items() if old_hashes[i] != h}
    assert changed == {"a", "b"} and corpus.parsed == 2


@pytest.mark.parametrize(
    "files",
    [
        {"corpus.jsonl": OLD + OLD.splitlines(keepends=True)[0]},  # a known line twice
        {"corpus.jsonl": OLD + jl({"_id": "b", "text": "another b"})},  # a known id on a new line
        {"corpus.jsonl": jl({"_id": "b", "text": "another b"}) + OLD},  # ... before the known one
        {"corpus.jsonl": OLD, "corpus/more.jsonl": OLD.splitlines(keepends=True)[3]},  # across files
        {"corpus.jsonl": OLD + jl({"_id": "z", "text": ""}) + jl({"_id": "z", "text": "again"})},  # skipped id reused
        {"corpus.jsonl": OLD + b'{"_id": "e", "text": "caf\xe9"}\n'},  # bad UTF-8 after known lines
        {"corpus.jsonl": OLD + b"\n\n" + jl({"_id": "e", "text": "x"}) + b"\r\n"},  # blank lines, CRLF
        {"corpus.jsonl": OLD.replace(b"\n", b"\r\n")},  # CRLF: other bytes, parsed again, same documents
        {"corpus.jsonl": b"\n \n"},  # only blank lines
        {
            "corpus.jsonl": OLD,
            "qrels/test.tsv": HEADER + b"q1\ta\t1\nq1\tgone\t1\n",
            "queries.jsonl": b'{"_id": "q1", "text": "q"}\n',
        },
    ],
)
def test_a_load_with_known_lines_gives_the_full_load_s_result_or_error(files):
    assert outcome(files, known_from(OLD)) == outcome(files)


def streamed(data: bytes, file: str, known: datasets.KnownLines | None):
    """(ids, hashes, documents, skipped) of one corpus file read as a stream, or its error as (file, line, reason)."""
    import io

    corpus, notices = (datasets.Corpus(), []) if known is not None else (None, [])
    try:
        docs = parse_corpus(io.BytesIO(data), file, into=corpus, notices=notices, known=known)
    except DatasetError as exc:
        return ("error", exc.file, exc.line, exc.reason)
    return list(docs), datasets.content_hashes(docs), {i: docs[i] for i in docs}, [n.to_dict() for n in notices]


@pytest.mark.parametrize(
    "data",
    [
        OLD + jl({"_id": "d", "text": "new"}) + OLD.splitlines(keepends=True)[1],  # a known line twice, in 2 batches
        OLD.splitlines(keepends=True)[2] + OLD,  # ... in one batch
        OLD + b"\n" + jl({"_id": "a", "text": "a known id on a new line"}),
        OLD + OLD.splitlines(keepends=True)[3] + b"x" * (datasets.MAX_LINE_BYTES + 10),  # duplicate before a long line
        OLD + b'{"_id": "e", "text": "' + b"x" * datasets.MAX_LINE_BYTES + b'"}\n',  # a streamed line over the cap
        OLD + b"\n\n" + jl({"_id": "e", "text": ""}, {"_id": "f", "text": "x"}),
    ],
)
def test_a_stream_with_known_lines_loads_batch_by_batch_as_the_full_parse_does(data, monkeypatch):
    monkeypatch.setattr(datasets, "KNOWN_BATCH_LINES", 2)  # batches end inside the runs of known lines
    assert streamed(data, "corpus.jsonl", known_from(OLD)) == streamed(data, "corpus.jsonl", None)


def test_line_ids_look_up_digests_that_share_their_first_8_bytes():
    digests = [bytes(8) + b"A" * 8, bytes(8) + b"B" * 8, b"\xff" * 16, bytes(8) + b"C" * 8]
    ids = datasets.LineIds(b"".join(digests), ["a", "b", "z", "c"])
    query = [bytes(8) + b"C" * 8, bytes(8) + b"D" * 8, b"\xff" * 16, bytes(8) + b"A" * 8, b"\x01" * 16]
    assert ids.rows(b"".join(query)).tolist() == [3, -1, 2, 0, -1]
    assert dict(ids) == dict(zip(digests, ["a", "b", "z", "c"])) and len(ids) == 4 and ids[digests[1]] == "b"
    assert datasets.LineIds(b"", []).rows(b"".join(query)).tolist() == [-1] * 5
    assert datasets.KnownLines(dict(zip(digests, "abzc"))).line_ids().rows(digests[2]).tolist() == [2]


def test_random_edits_load_the_same_with_and_without_known_lines():
    import random

    rng = random.Random(3)
    base = [
        {"_id": f"d{i}", "title": rng.choice(["", "T", f"t{i}"]), "text": rng.choice(["", "x", f"text {i}"])}
        for i in range(60)
    ]
    for trial in range(40):
        old = [dict(d) for d in base]
        known = known_from(jl(*old))
        new = [dict(d) for d in old if rng.random() > 0.1]  # some deleted
        for d in rng.sample(new, 5):
            d[rng.choice(["title", "text"])] = rng.choice(["", "edited", f"e{trial}"])
        new += [{"_id": rng.choice(["d1", "d2", f"n{trial}"]), "text": "added"} for _ in range(rng.randint(0, 2))]
        rng.shuffle(new)
        files = {"corpus.jsonl": jl(*new)}
        assert outcome(files, known) == outcome(files)


def test_a_line_digest_names_its_bytes_and_the_parser_version():
    line = b'{"_id": "a", "text": "x"}'
    assert datasets.line_digest(line) == datasets.line_digest(bytes(line))
    assert datasets.line_digest(line) != datasets.line_digest(line + b"\r") != datasets.line_digest(b"")
    import hashlib

    assert datasets.line_digest(line) != hashlib.blake2b(line, digest_size=16).digest()  # personalised
    assert len(datasets.line_digest(line)) == datasets.LINE_DIGEST_BYTES


def test_without_known_lines_the_corpus_is_a_plain_dict():
    ds = load_files("d", {"corpus.jsonl": OLD})
    assert type(ds.corpus) is dict and datasets.content_hashes(ds.corpus) == {
        i: d.content_hash for i, d in ds.corpus.items()
    }


# ---------------------------------------------------------------- the parser behind LINE_DIGEST_VERSION

# Lines whose parse a table's line digests stand for: a known line is taken as the document (id, title, text,
# metadata, content hash) an earlier parser made of it, so what each of these parses to is recorded below.
GOLDEN_LINES = [
    b'{"_id": "t", "title": "Only a title"}',
    b'{"_id": "e", "title": "A title", "text": ""}',
    b'{"_id": "n", "title": " ", "text": ""}',  # neither: skipped
    '{"_id": "\u00fc", "title": "Caf\u00e9 \u2014 \u2615", "text": "na\u00efve \u2028 \U0001f600"}'.encode(),
    b'{"_id": "esc", "title": "\\u00e9\\ud83d\\ude00", "text": "tab\\tnew\\nline \\"q\\" \\\\"}',
    b'{"_id": "crlf", "text": "a line ending in CR LF"}\r',
    b'  {"_id": "ws", "title": " padded ", "text": " spaced  "}  ',
    b'{"_id": "x", "text": "extra fields", "score": 1, "url": "http://e", "title": null}',
    b'{"_id": "m", "text": "t", "metadata": {"b": [1, 2.5, null, true], "a": {"z": "\\u00fc"}, "c": ""}}',
    b'{"_id": "m0", "text": "t", "metadata": null}',
    b'{"_id": "m1", "text": "t", "metadata": {}}',
    b'{"_id": 42, "text": "numeric id"}',
    b'{"_id": 4.0, "text": "float id"}',
    b'{"_id": "d", "text": "first", "text": "second"}',  # a repeated key: the last one
    b'{"_id": "tc", "title": "Hello.", "text": "Hello. World"}',
    b'{"_id": "big", "text": "1e400 and -0", "metadata": {"n": 1e400, "m": -0.0, "i": 12345678901234567890}}',
    b'{"_id": "e\\u0301 ", "text": "an NFD id with a trailing space"}',  # read as the NFC id "\u00e9"
    b'{"_id": true, "text": "a bool id"}',  # errors from here on: never a known line, but never accepted either
    b'{"_id": "lone\\ud800", "text": "an unpaired surrogate"}',
    b'{"_id": "", "text": "empty id"}',
    b'{"_id": "ctl\\u0001", "text": "control character"}',
    b'{"_id": "bad", "title": 5, "text": "t"}',
    b'{"_id": "bad", "text": "t", "metadata": [1]}',
    b'\xef\xbb\xbf{"_id": "bom", "text": "t"}',
    b'["_id", "not an object"]',
    b'{"_id": "nan", "text": NaN}',
]
# (LINE_DIGEST_VERSION, the fingerprint of what GOLDEN_LINES parse to) — see the test for when to change it.
GOLDEN = (b"embedpipe-line-2", "c9fb6884ad13144220b500e736b6b795")


def golden_fingerprint() -> str:
    """What each golden line parses to on its own: the document and its content hash, skipped, or an error (not
    the reason's wording: a line that errors is never known, only whether it does). The parser's limits are part of
    it: a known line skips the checks they drive, so a tighter limit must also come with a new version."""
    import hashlib

    limits = [datasets.MAX_LINE_BYTES, datasets.MAX_ID_BYTES, datasets.ID_FORBIDDEN.pattern, datasets.MAX_JSON_DEPTH]
    outcomes: list = [limits]
    for raw in GOLDEN_LINES:
        notices: list = []
        try:
            docs = parse_corpus(raw + b"\n", "corpus.jsonl", notices=notices)
        except DatasetError:
            outcomes.append("error")
            continue
        outcomes.append([[d.id, d.title, d.text, d.metadata, d.content_hash] for d in docs.values()] or "skipped")
    text = json.dumps(outcomes, ensure_ascii=True, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def test_what_a_line_parses_to_changes_only_with_the_line_digest_version():
    """A table's line digests are taken as the documents an earlier parser made of those lines: a parser that makes
    another document (or an error, or a skip) of a line must come with a new ``LINE_DIGEST_VERSION``, so that old
    digests match nothing. This fails when what the golden lines parse to changes under the same version."""
    version, recorded = GOLDEN
    now = golden_fingerprint()
    if datasets.LINE_DIGEST_VERSION == version:
        assert now == recorded, (
            f"what a corpus line parses to changed ({now} != {recorded}) under LINE_DIGEST_VERSION {version!r}: "
            "tables written before would pass stale documents and hashes off as known lines. Bump "
            "datasets.LINE_DIGEST_VERSION, then record the new version and this fingerprint in GOLDEN."
        )
    else:
        pytest.fail(
            f"LINE_DIGEST_VERSION is {datasets.LINE_DIGEST_VERSION!r}, GOLDEN records {version!r}: record "
            f"GOLDEN = ({datasets.LINE_DIGEST_VERSION!r}, {now!r})"
        )


def test_ids_are_read_as_nfc_without_surrounding_whitespace_in_every_file():
    """Issue 25.4: the same id in NFD in the corpus and NFC in the qrels (or with a trailing space) was two ids, and
    the judgement counted as absent. Ids are normalised where they are read; two that become equal are a
    duplicate, named with file:line."""
    nfd, nfc = "cafe\u0301", "caf\u00e9"
    ds = datasets.load_files(
        "norm",
        {
            "corpus.jsonl": jl({"_id": nfd, "text": "espresso"}, {"_id": "plain ", "text": "tea"}),
            "queries.jsonl": jl({"_id": " q1", "text": "coffee"}),
            "qrels/test.tsv": f"query-id\tcorpus-id\tscore\nq1\t{nfc}\t1\nq1 \tplain\t1\n".encode(),
        },
    )
    assert set(ds.corpus) == {nfc, "plain"} and set(ds.queries) == {"q1"}
    assert ds.qrels["test"] == {"q1": {nfc: 1, "plain": 1}} and not ds.qrels_absent
    err = corpus_error(jl({"_id": nfc, "text": "a"}, {"_id": nfd, "text": "b"}))
    assert_error(err, "corpus.jsonl", 2, "duplicate _id")
