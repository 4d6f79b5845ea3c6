"""embedpipe.control.incremental: which runs are incremental, and the content-hash diff against the live index."""

from __future__ import annotations

import random

import pytest

from embedpipe.control.incremental import FULL, INCREMENTAL, diff, digest, kind_for, plan

PROMOTED = {
    "collection": "demo__20260101t000000_abcdef",
    "model_uri": "gs://a/runs/r/model/",
    "schema": 2,
    "hashes": "gs://a/runs/r/embeddings/1/hashes.parquet",
    "rows": 10,
}


def obj(rel: str, part: str | None) -> dict:
    return {"object": f"datasets/demo/{rel}", "generation": 1, "part": part}


@pytest.mark.parametrize(
    "record, promoted, kind",
    [
        ({"trigger_objects": [obj("corpus.jsonl", "corpus")]}, None, FULL),  # nothing promoted yet
        ({"trigger_objects": [obj("corpus.jsonl", "corpus")]}, PROMOTED, INCREMENTAL),
        (
            {"trigger_objects": [obj("corpus/part-1.jsonl", "corpus"), obj("queries.jsonl", "queries")]},
            PROMOTED,
            INCREMENTAL,
        ),
        ({"trigger_objects": [obj("qrels/test.tsv", "qrels")]}, PROMOTED, INCREMENTAL),  # eval labels only
        ({"trigger_objects": [obj("corpus.jsonl", "corpus"), obj("qrels/train.tsv", "qrels")]}, PROMOTED, FULL),
        ({"trigger_objects": [obj("pairs/p.jsonl", "pairs")]}, PROMOTED, FULL),
        ({"force_full": True, "trigger_objects": []}, PROMOTED, FULL),  # a retrain message
        ({"trigger_objects": []}, PROMOTED, INCREMENTAL),  # a refresh message (a BigQuery table changed)
        ({"trigger_objects": [obj("source.json", "source")]}, PROMOTED, FULL),  # which tables train: unknown
        # promoted before the id -> hash tables existed: nothing to diff against without scanning Milvus
        ({"trigger_objects": [obj("corpus.jsonl", "corpus")]}, {**PROMOTED, "hashes": None}, FULL),
    ],
)
def test_kind_for(record, promoted, kind):
    assert kind_for(record, promoted)[0] == kind


def test_unchanged_corpus_embeds_nothing():
    corpus = {f"d{i}": f"h{i}" for i in range(100)}
    d = diff(corpus, dict(corpus))
    assert d.changed == [] and d.deleted == [] and d.unchanged == 100


def test_one_percent_change_is_exactly_those_documents():
    rng = random.Random(7)
    live = {f"d{i:04d}": f"h{i}" for i in range(1000)}
    corpus = dict(live)
    changed = sorted(rng.sample(sorted(live), 10))
    for i in changed:
        corpus[i] = "new-" + corpus[i]
    d = diff(corpus, live)
    assert d.changed == changed and d.deleted == [] and d.unchanged == 990


def test_new_changed_and_removed_documents():
    live = {"a": "1", "b": "2", "c": "3"}
    corpus = {"a": "1", "b": "2x", "d": "4"}  # b changed, c removed, d new
    d = diff(corpus, live)
    assert d.changed == ["b", "d"]
    assert d.deleted == ["c"]
    assert d.unchanged == 1


def test_plan_in_place_deletes_what_the_corpus_lost():
    live = {"a": "1", "b": "2", "c": "3", "d": "4", "e": "5"}
    corpus = {"a": "1", "b": "2x", "d": "4", "e": "5"}
    p = plan(corpus, live, max_inplace_share=0.5)
    assert (p.mode, p.embed, p.delete, p.unchanged, p.table) == ("incremental", ["b"], ["c"], 3, corpus)


def test_plan_rebuilds_a_large_change():
    live = {f"d{i}": "h" for i in range(10)}
    corpus = {f"d{i}": "new" for i in range(10)}
    p = plan(corpus, live, max_inplace_share=0.2)
    assert (p.mode, p.embed, p.delete, p.table) == ("rebuild", list(corpus), [], corpus)
    part = plan({"d0": "h"}, live, max_inplace_share=0.2)  # a corpus uploaded in part: the guard must see the loss
    assert part.mode == "rebuild" and part.delete == [f"d{i}" for i in range(1, 10)]


def test_plan_with_a_left_out_corpus_file_deletes_nothing_never_rebuilds_and_keeps_its_rows():
    live = {f"d{i}": "h" for i in range(10)}
    corpus = {f"d{i}": "new" for i in range(5)}  # d5..d9 were in a file left out; d0..d4 all changed
    p = plan(corpus, live, max_inplace_share=0.2, keep_absent=True)
    assert p.mode == "incremental" and p.delete == [] and p.embed == [f"d{i}" for i in range(5)]
    assert p.table == {**{f"d{i}": "h" for i in range(5, 10)}, **corpus}  # the next run neither deletes nor re-embeds
    assert p.kept == [f"d{i}" for i in range(5, 10)] and plan(corpus, live, 0.2).kept == []


def test_plan_rebuilds_a_part_edited_collection_whatever_the_change():
    live = {"a": "1", "b": "2"}
    p = plan(dict(live), live, max_inplace_share=0.2, keep_absent=True, rebuild=True)
    assert (p.mode, p.embed, p.table) == ("rebuild", ["a", "b"], live)


def test_the_table_digest_is_content_sensitive_and_order_blind():
    a = {"x": "1", "y": "2"}
    assert digest(a) == digest(dict(a)) and digest(a) != digest({"x": "1", "y": "3"}) != digest({})
    # replicas reading a BigQuery table get its streams' rows in different orders: they must still agree
    assert digest({"y": "2", "x": "1"}) == digest(a)


def test_the_table_digest_is_the_hash_of_the_rows_text_whatever_the_chunks(monkeypatch):
    import hashlib

    from embedpipe.control import incremental

    table = {f"d{i}\u00e9": f"h{i}" for i in range(25)}
    text = "".join(f"{i}\0{h}\n" for i, h in sorted(table.items()))
    want = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()  # the value manifests have always carried
    for chunk in (1, 7, 25, 1000):
        monkeypatch.setattr(incremental, "DIGEST_CHUNK", chunk)
        assert digest(table) == want
    assert digest({}) == hashlib.blake2b(b"", digest_size=16).hexdigest()


@pytest.fixture
def bucket(monkeypatch):
    from embedpipe.control import incremental

    objects: dict[str, bytes] = {}
    monkeypatch.setattr(incremental.storage, "write_bytes", lambda uri, data, **kw: objects.__setitem__(uri, data))
    monkeypatch.setattr(incremental.storage, "read_bytes", lambda uri, *a, **kw: objects[uri])
    return objects


def test_the_table_keeps_each_document_s_line_digest_and_reads_back_what_a_load_skips(bucket):
    from embedpipe.contracts import datasets
    from embedpipe.control.incremental import read_known, write_table

    hashes = {"b": "hb", "a": "ha", "\u00e9": "he", "z": "hz"}
    lines = {"a": b"A" * 16, "b": b"B" * 16, "\u00e9": b"E" * 16}  # z: a BigQuery row, no line
    write_table("gs://x/t.parquet", hashes, lines)
    known = read_known("gs://x/t.parquet")
    assert known == datasets.KnownLines({b"A" * 16: "a", b"B" * 16: "b", b"E" * 16: "\u00e9"}, hashes)
    assert list(known.hashes) == sorted(hashes)  # sorted by id, as before
    assert read_known("gs://x/t.parquet").hashes == hashes


def test_a_table_without_digests_knows_no_line(bucket):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from embedpipe.control.incremental import read_known, write_table

    buf = io.BytesIO()  # written before the digests were
    pq.write_table(pa.table({"id": ["a"], "content_hash": ["h"]}), buf)
    bucket["gs://x/old.parquet"] = buf.getvalue()
    assert read_known("gs://x/old.parquet").ids == {} and read_known("gs://x/old.parquet").hashes == {"a": "h"}
    write_table("gs://x/new.parquet", {"a": "h"})  # no lines given: none stored
    assert read_known("gs://x/new.parquet").ids == {}


def test_rows_kept_for_a_left_out_file_keep_their_line_digests(bucket):
    """A corpus file left out of a run keeps its documents' rows, lines included: when it comes back unchanged, its
    lines are known again, not parsed."""
    import json

    from embedpipe.contracts import datasets
    from embedpipe.control.incremental import read_known, table_lines, write_table

    def jl(*ids):
        return b"".join(json.dumps({"_id": i, "text": f"text of {i}"}).encode() + b"\n" for i in ids)

    files = {"corpus.jsonl": jl("a", "b"), "corpus/more.jsonl": jl("c", "d")}
    first = datasets.load_files("d", files, known=datasets.KnownLines()).corpus
    write_table("gs://x/1.parquet", first.content_hashes(), first.digests)
    live = read_known("gs://x/1.parquet")

    left_out = datasets.load_files("d", {"corpus.jsonl": files["corpus.jsonl"]}, known=live).corpus
    p = plan(left_out.content_hashes(), live.hashes, 0.2, keep_absent=True)
    assert p.kept == ["c", "d"] and p.embed == [] and left_out.parsed == 0
    lines = table_lines(left_out.digests, live, p.kept)
    assert lines == first.digests and table_lines(left_out.digests, live, []) is left_out.digests
    write_table("gs://x/2.parquet", p.table, lines)

    back = datasets.load_files("d", files, known=read_known("gs://x/2.parquet")).corpus
    assert back.parsed == 0 and back.content_hashes() == first.content_hashes()
