"""Incremental updates on the real stack: the pipeline decides at launch, snapshots the live id -> hash table, the
embedder job (a real process, through LocalJobLauncher) embeds only new/changed documents, and the indexer upserts
into the live collection and deletes removed ids."""

from __future__ import annotations

import dataclasses
import json
import time

import pyarrow.parquet as pq
import pytest

from embedpipe.contracts import events
from embedpipe.contracts.datasets import Doc
from embedpipe.contracts.events import Event
from embedpipe.control import incremental
from embedpipe.control.pipeline import Pipeline
from embedpipe.gcp import storage
from embedpipe.index.indexing import index_run
from embedpipe.jobs.local import LocalJobLauncher
from embedpipe.ledger import runs
from embedpipe.ledger.runs import Ledger
from embedpipe.retrieval import vectorstore

DATASET = "incr"
N = 200


def corpus_lines(changed: dict[int, str] | None = None, removed: set[int] = frozenset()) -> bytes:
    changed = changed or {}
    docs = [
        {
            "_id": f"doc{i:03d}",
            "title": f"Topic {i % 17}",
            "text": changed.get(i, f"Document {i} about topic {i % 17}."),
        }
        for i in range(N)
        if i not in removed
    ]
    return "".join(json.dumps(d) + "\n" for d in docs).encode()


def upload(settings, rel: str, data: bytes) -> int:
    return storage.write_bytes(f"gs://{settings.data_bucket}/datasets/{DATASET}/{rel}", data)


def run_until_indexed(pipe: Pipeline, run_id: str, timeout: float = 240) -> dict:
    """Drive a launched run: wait for its job(s) like the job-event function would, then index it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        record = pipe.ledger.get_run(run_id)
        if record["state"] == runs.INDEXING:
            index_run(pipe, run_id)
            return pipe.ledger.get_run(run_id)
        stage = {runs.TRAINING: "train", runs.EMBEDDING: "embed"}.get(record["state"])
        status = pipe.launcher.get(record["jobs"][stage]["name"])
        if status.done:
            assert status.state == "SUCCEEDED", status.error[-2000:]
            pipe.on_job_status(status)
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} not indexed within {timeout}s: {pipe.ledger.get_run(run_id)['state']}")


def new_run(pipe: Pipeline, rel: str, generation: int, part: str = "corpus") -> str:
    ledger = pipe.ledger
    run_id = ledger.pending_run(DATASET, {"type": "upload", "dataset": DATASET}, 0.0)
    key = events.object_key(pipe.settings.data_bucket, f"datasets/{DATASET}/{rel}", generation)
    ledger.add_trigger(run_id, key, {"object": f"datasets/{DATASET}/{rel}", "generation": generation, "part": part})
    assert pipe.launch_due(DATASET) == [run_id]
    return run_id


@pytest.fixture(scope="module")
def pipe(services):
    published: list[Event] = []
    p = Pipeline(
        services, Ledger(services.artifacts_bucket), LocalJobLauncher(services), lambda t, e: published.append(e)
    )
    p.published = published
    upload(
        services,
        "queries.jsonl",
        "".join(json.dumps({"_id": f"q{i}", "text": f"topic {i}"}) + "\n" for i in range(17)).encode(),
    )
    upload(
        services,
        "qrels/test.tsv",
        ("query-id\tcorpus-id\tscore\n" + "".join(f"q{i % 17}\tdoc{i:03d}\t1\n" for i in range(0, N, 2))).encode(),
    )
    # The first (full) run: trains the tiny model, embeds everything, promotes.
    gen = upload(services, "corpus.jsonl", corpus_lines())
    run_id = new_run(p, "corpus.jsonl", gen)
    record = run_until_indexed(p, run_id)
    assert record["kind"] == "full" and record["promoted"] is True
    return p


def embedded_ids(pipe: Pipeline, run_id: str) -> list[str]:
    uri = f"{pipe.ledger.run_dir(run_id)}/embeddings/1/corpus-00000-of-00001.parquet"
    return pq.read_table(storage.blob(uri).open("rb")).column("id").to_pylist()


def manifest(pipe: Pipeline, run_id: str) -> dict:
    return storage.read_json(f"{pipe.ledger.run_dir(run_id)}/embeddings/1/manifest-00000.json")


def test_unchanged_corpus_reupload_embeds_nothing(pipe):
    before = pipe.ledger.get_dataset(DATASET)["promoted"]
    gen = upload(pipe.settings, "corpus.jsonl", corpus_lines())
    run_id = new_run(pipe, "corpus.jsonl", gen)
    record = pipe.ledger.get_run(run_id)
    assert record["kind"] == "incremental" and "train" not in record["jobs"], "no training for a corpus change"
    record = run_until_indexed(pipe, run_id)
    assert "TRAINING" not in record["stage_times"]
    event = pipe.published[-1].data
    assert event["kind"] == "incremental" and event["collection"] == before["collection"]
    assert event["counts"] == {"upserted": 0, "deleted": 0, "unchanged": N, "total": N, "skipped": 0}
    assert embedded_ids(pipe, run_id) == []
    assert event["model"]["uri"] == before["model_uri"]
    assert manifest(pipe, run_id)["parsed"] == 0, "every line is the table's: none parsed again"


def test_one_percent_change_embeds_exactly_those_and_deletes_removed(pipe, monkeypatch):
    live = pipe.ledger.get_dataset(DATASET)["promoted"]["collection"]
    changed = {7: "A rewritten document seven.", 150: "Document 150, now about bicycles."}
    gen = upload(pipe.settings, "corpus.jsonl", corpus_lines(changed, removed={43}))
    run_id = new_run(pipe, "corpus.jsonl", gen)
    flushed = []
    monkeypatch.setattr(vectorstore, "finish_load", lambda client, name: flushed.append(name))
    run_until_indexed(pipe, run_id)
    monkeypatch.undo()
    assert flushed == [], "an in-place update is evaluated as written, without a flush"
    event = pipe.published[-1].data
    assert event["kind"] == "incremental" and event["promoted"] is True
    assert event["counts"] == {"upserted": 2, "deleted": 1, "unchanged": N - 3, "total": N - 1, "skipped": 0}
    assert embedded_ids(pipe, run_id) == ["doc007", "doc150"]
    assert manifest(pipe, run_id)["parsed"] == 2, "only the changed lines are parsed"
    assert set(event["metrics"]) >= {"recall@10", "ndcg@10"} and event["previous_metrics"] is not None
    client = vectorstore.connect(pipe.settings.milvus_uri)
    table = vectorstore.ids_and_hashes(client, live)
    assert len(table) == N - 1 and "doc043" not in table
    assert table["doc007"] == Doc("doc007", changed[7], "Topic 7").content_hash  # the unflushed upsert is read
    assert vectorstore.alias_target(client, DATASET) == live


def test_a_partial_corpus_reupload_deletes_nothing_and_fails_the_run(pipe):
    """Only a quarter of the corpus uploaded again: an incremental run would delete the other 75% of the live index.
    Refused above EMBEDPIPE_MAX_DELETE_SHARE (5%): the run fails, the live collection keeps every row."""
    client = vectorstore.connect(pipe.settings.milvus_uri)
    live = pipe.ledger.get_dataset(DATASET)["promoted"]["collection"]
    before = vectorstore.ids_and_hashes(client, live)
    gen = upload(pipe.settings, "corpus.jsonl", corpus_lines(removed=set(range(50, N))))
    run_id = new_run(pipe, "corpus.jsonl", gen)
    record = run_until_indexed(pipe, run_id)
    assert record["state"] == runs.FAILED and record["error"]["stage"] == "index"
    assert "refusing to delete" in record["error"]["cause"] and "EMBEDPIPE_MAX_DELETE_SHARE" in record["error"]["cause"]
    assert vectorstore.ids_and_hashes(client, live) == before
    assert vectorstore.alias_target(client, DATASET) == live


def test_a_large_change_is_rebuilt_into_a_new_collection_behind_the_gate(pipe):
    """A third of the documents changed (over EMBEDPIPE_MAX_INPLACE_SHARE): the live collection is not edited in
    place; the promoted model embeds the whole corpus into a new collection, gated against the live one."""
    client = vectorstore.connect(pipe.settings.milvus_uri)
    live = pipe.ledger.get_dataset(DATASET)["promoted"]["collection"]
    before = vectorstore.ids_and_hashes(client, live)
    changed = {i: f"Document {i}, rewritten about topic {i % 17} and more." for i in range(0, N, 3)}
    gen = upload(pipe.settings, "corpus.jsonl", corpus_lines(changed))
    run_id = new_run(pipe, "corpus.jsonl", gen)
    record = run_until_indexed(pipe, run_id)
    event = pipe.published[-1].data
    assert record["state"] == runs.SUCCEEDED and event["kind"] == "incremental"
    assert "rebuilt" in event["gate"]["reason"] and event["collection"] != live
    assert len(embedded_ids(pipe, run_id)) == N  # every document, with the promoted model
    assert vectorstore.ids_and_hashes(client, live) == before  # the old collection was never edited
    if event["promoted"]:
        assert vectorstore.alias_target(client, DATASET) == event["collection"]
        assert len(vectorstore.ids_and_hashes(client, event["collection"])) == N


def test_an_in_place_update_that_failed_part_way_is_rebuilt_by_the_next_run(pipe, monkeypatch):
    """Upserts landed, then the deletes failed: the promoted table no longer describes the live collection, so the
    next run must not diff against it (a change reverted meanwhile would look unchanged): it rebuilds."""
    from embedpipe.index import indexing

    client = vectorstore.connect(pipe.settings.milvus_uri)
    live = pipe.ledger.get_dataset(DATASET)["promoted"]["collection"]

    def broken(*a, **k):
        raise ValueError("Milvus refused the delete (test)")

    monkeypatch.setattr(indexing, "delete_removed", broken)
    # in place whatever the earlier tests left live (their changes may be large against this corpus)
    monkeypatch.setattr(pipe, "settings", dataclasses.replace(pipe.settings, max_inplace_share=1.0))
    gen = upload(pipe.settings, "corpus.jsonl", corpus_lines({5: "Document five, edited."}, removed={6}))
    failed = run_until_indexed(pipe, new_run(pipe, "corpus.jsonl", gen))
    assert failed["state"] == runs.FAILED and failed["error"]["stage"] == "index"
    assert failed["inplace"]["collection"] == live
    assert pipe.ledger.get_dataset(DATASET)["promoted"]["dirty"] == failed["run_id"]
    assert "doc006" in vectorstore.ids_and_hashes(client, live)  # upserted, never deleted: a part-edited index
    monkeypatch.undo()

    gen = upload(pipe.settings, "corpus.jsonl", corpus_lines())  # the edit reverted: equal to the promoted table
    run_id = new_run(pipe, "corpus.jsonl", gen)
    assert pipe.ledger.get_run(run_id)["live"]["rebuild"] is True
    record = run_until_indexed(pipe, run_id)
    event = pipe.published[-1].data
    assert record["state"] == runs.SUCCEEDED and "rebuilt" in event["gate"]["reason"]
    assert len(embedded_ids(pipe, run_id)) == N and event["collection"] != live
    if event["promoted"]:
        promoted = pipe.ledger.get_dataset(DATASET)["promoted"]
        assert "dirty" not in promoted and promoted["hashes"].startswith(pipe.ledger.run_dir(run_id))
        table = vectorstore.ids_and_hashes(client, event["collection"])
        assert len(table) == N and table == incremental.read_known(promoted["hashes"]).hashes


def test_training_data_change_is_a_full_run(pipe):
    gen = upload(pipe.settings, "qrels/train.tsv", b"query-id\tcorpus-id\tscore\nq1\tdoc001\t1\n")
    run_id = new_run(pipe, "qrels/train.tsv", gen, part="qrels")
    record = pipe.ledger.get_run(run_id)
    assert record["kind"] == "full" and record["state"] == runs.TRAINING
    pipe.launcher.cancel(record["jobs"]["train"]["name"])
