"""The indexer against the real Milvus Lite server and fake-gcs-server, on synthetic embedding shards (so the test
decides which index is better): the gate in both directions, alias swap, retention, fingerprint refusal, report.html,
and the search service reloading (in the background) when index-updated arrives."""

from __future__ import annotations

import base64
import dataclasses
import io
import json

import functions_framework
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedpipe.contracts.events import INDEX_REQUESTED, Event
from embedpipe.control.pipeline import Pipeline
from embedpipe.gcp import storage
from embedpipe.index import bulkload, indexing
from embedpipe.index.indexing import index_run
from embedpipe.ledger import runs
from embedpipe.ledger.runs import Ledger
from embedpipe.retrieval import lexical, vectorstore
from tests.helpers import ROOT

DIM, N_DOCS, N_QUERIES = 32, 60, 20
DATASET = "gated"


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


RNG = np.random.default_rng(0)
DOC_VECTORS = unit(RNG.normal(size=(N_DOCS, DIM)))
QRELS = {f"q{i}": {f"d{i:03d}": 1} for i in range(N_QUERIES)}  # query i is about document i


def parquet(uri: str, columns: dict) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    storage.write_bytes(uri, buf.getvalue())


def query_vectors(good: int) -> list:
    """The first ``good`` queries point at their document; the rest point away (random)."""
    noise = unit(np.random.default_rng(good).normal(size=(N_QUERIES, DIM)))
    return [DOC_VECTORS[i] if i < good else noise[i] for i in range(N_QUERIES)]


def prepared_run(
    pipe: Pipeline,
    good: int,
    previous_good: int | None,
    fingerprint: str = "fp-a",
    mode: str = "dense",
    base_good: int | None = None,
    dataset: str = DATASET,
    base_artifact: bool = False,
) -> str:
    """A run in INDEXING with embedding shards whose query vectors find ``good`` of 20 relevant documents; the
    trainer chose ``mode``; with ``base_good`` the shards also hold base-model vectors that find that many."""
    ledger = pipe.ledger
    run_id = runs.new_run_id(ledger.clock())
    trained = f"{ledger.run_dir(run_id)}/train/1"  # the training job's output directory
    ledger.create_run(run_id, dataset, {"type": "test"}, kind="full", model={"uri": f"{trained}/model/"})
    ledger.advance(run_id, runs.PENDING, runs.INDEXING)
    out = f"{ledger.run_dir(run_id)}/embeddings/1"
    ids = [f"d{i:03d}" for i in range(N_DOCS)]
    texts = [f"text of {i}" for i in ids]
    base = {"base_vector": [v.tolist() for v in DOC_VECTORS]} if base_good is not None else {}
    parquet(
        f"{out}/corpus-00000-of-00001.parquet",
        {
            "id": ids,
            "vector": [v.tolist() for v in DOC_VECTORS],
            "content_hash": [f"h{i}" for i in ids],
            "title": [f"title {i}" for i in ids],
            "text": texts,
            "bm25_text": lexical.analyzed(texts),
            "metadata": ["{}"] * N_DOCS,
            **base,
        },
    )
    storage.write_json(f"{out}/qrels.json", QRELS)
    qids, texts = list(QRELS), [f"query {q}" for q in QRELS]
    analyzed = lexical.analyzed(texts)
    qbase = {"base_vector": [v.tolist() for v in query_vectors(base_good)]} if base_good is not None else {}
    vecs = [v.tolist() for v in query_vectors(good)]
    parquet(f"{out}/queries.parquet", {"id": qids, "text": texts, "bm25_text": analyzed, "vector": vecs, **qbase})
    if previous_good is not None:
        vecs = [v.tolist() for v in query_vectors(previous_good)]
        parquet(f"{out}/queries-previous.parquet", {"id": qids, "text": texts, "bm25_text": analyzed, "vector": vecs})
    manifest = {"file": "corpus-00000-of-00001.parquet", "replica": 0, "replicas": 1, "count": N_DOCS}
    search = {"default_mode": mode, "hybrid_weight": 0.7, "rrf_k": 60}
    manifest.update(dim=DIM, fingerprint=fingerprint, search=search, has_base=base_good is not None, tuned=True)
    if base_artifact:  # the trainer kept the untuned model beside the fine-tune (what a first run can fall back to)
        manifest.update(base_model_uri=f"{trained}/base-model", base_fingerprint=f"base-{fingerprint}")
    storage.write_json(f"{out}/manifest-00000.json", manifest)
    # the trainer writes metrics.json beside its model folder (its attempt's or trial's output directory)
    curve = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    storage.write_json(f"{trained}/metrics.json", {"loss_curve": curve, "model_version": f"v-{run_id}"})
    return run_id


@pytest.fixture(scope="module")
def pipe(services):
    published: list[Event] = []
    # the real gate here; no grace period, so retention acts on collections made seconds ago
    settings = dataclasses.replace(services, keep_collections=1, gate_tolerance=0.0, retention_grace_s=0.0)
    p = Pipeline(settings, Ledger(settings.artifacts_bucket), publish=lambda topic, e: published.append(e))
    p.published = published
    return p


def test_gate_both_directions_alias_swap_retention_and_report(pipe):
    client = vectorstore.connect(pipe.settings.milvus_uri)
    first = prepared_run(pipe, good=10, previous_good=None)
    index_run(pipe, first)
    event = pipe.published[-1].data
    assert event["promoted"] is True and event["gate"]["reason"].startswith("first index for this dataset; promoted")
    assert vectorstore.alias_target(client, DATASET) == event["collection"]
    assert event["metrics"]["recall@1"] == pytest.approx(0.5)  # 10 of 20 queries point straight at their doc
    # every mode is scored; served is the trainer's choice (dense here); the base model is the shipped one
    assert set(event["metrics_by_mode"]) == {"bm25", "base", "bm25+base", "dense", "hybrid", "served"}
    assert event["metrics_by_mode"]["served"] == event["metrics_by_mode"]["dense"] == event["metrics"]
    assert event["metrics_by_mode"]["base"] == event["metrics_by_mode"]["dense"]
    assert event["metrics_by_mode"]["bm25"]["recall@100"] == 0.0  # "queri q0" shares no stem with "text of d000"
    # Locally the model registry is a no-op, recorded in the run record (the cloud's version would be keyed so).
    registered = pipe.ledger.get_run(first)["registry"]
    assert (registered["registry"], registered["state"], registered["alias"]) == ("local", "noop", "promoted")
    assert registered["version"] == f"embedpipe-{DATASET}@{first}" and registered["run_id"] == first

    # Better than the live index: promoted, alias swapped, previous metrics measured in the same run.
    better = prepared_run(pipe, good=16, previous_good=10)
    index_run(pipe, better)
    event = pipe.published[-1].data
    assert event["promoted"] is True and event["previous_collection"] == vectorstore.collection_name(DATASET, first)
    assert event["metrics"]["recall@10"] > event["previous_metrics"]["recall@10"]
    assert vectorstore.alias_target(client, DATASET) == vectorstore.collection_name(DATASET, better)
    assert pipe.ledger.get_dataset(DATASET)["promoted"]["run_id"] == better

    # Worse: rejected, alias untouched, the rejected collection kept for inspection, promoted=false published.
    worse = prepared_run(pipe, good=4, previous_good=16)
    index_run(pipe, worse)
    event = pipe.published[-1].data
    assert event["promoted"] is False and "rejected" in event["gate"]["reason"]
    assert vectorstore.alias_target(client, DATASET) == vectorstore.collection_name(DATASET, better)
    assert pipe.ledger.get_run(worse)["state"] == runs.SUCCEEDED
    assert pipe.ledger.get_run(worse)["registry"]["state"] == "not registered", "rejected models are not registered"
    names = vectorstore.dataset_collections(client, DATASET)
    # keep_collections=1 would keep the live one + the newest other (the rejected run), but the first one is the
    # previously promoted index (what a rollback needs): retention never drops it.
    assert names == [vectorstore.collection_name(DATASET, r) for r in (first, better, worse)]
    assert event["dropped_collections"] == []

    # Within tolerance: a slightly worse run passes when the tolerance allows it.
    pipe.settings = dataclasses.replace(pipe.settings, gate_tolerance=0.5)
    tolerated = prepared_run(pipe, good=12, previous_good=16)
    index_run(pipe, tolerated)
    tolerated_event = pipe.published[-1].data
    assert tolerated_event["promoted"] is True
    pipe.settings = dataclasses.replace(pipe.settings, gate_tolerance=0.0)
    (live,) = [
        c for c in tolerated_event["gate"]["comparisons"] if c["rival"] == "live index" and c["metric"] == "ndcg@10"
    ]
    assert live["delta"] < 0 and live["queries"] == N_QUERIES  # each gate comparison carries its paired test
    # Not worse, but no better than noise: promoted by default, refused when a significant gain is required.
    pipe.settings = dataclasses.replace(pipe.settings, gate_require_significant_gain=True)
    same = prepared_run(pipe, good=12, previous_good=12)
    index_run(pipe, same)
    same_event = pipe.published[-1].data
    pipe.settings = dataclasses.replace(pipe.settings, gate_require_significant_gain=False)
    assert same_event["promoted"] is False and "no significant gain over the live index" in same_event["gate"]["reason"]
    assert vectorstore.alias_target(client, DATASET) == vectorstore.collection_name(DATASET, tolerated)
    # The collection it replaced (search may still be serving it) stays; the oldest one, promoted two swaps ago, goes.
    assert tolerated_event["dropped_collections"] == [vectorstore.collection_name(DATASET, first)]
    assert vectorstore.collection_name(DATASET, better) in vectorstore.dataset_collections(client, DATASET)

    page = storage.read_bytes(event["report_uri"]).decode()
    assert event["report_uri"] == f"{pipe.ledger.run_dir(worse)}/report.html"
    for plot in ("plot-loss", "plot-recall", "plot-stages", "plot-modes"):
        assert f'<svg id="{plot}"' in page
    assert "no training loss recorded" not in page, "the report found the trainer's metrics.json"
    assert event["model"]["version"] == f"v-{worse}"


def test_first_runs_are_gated_against_the_base_model_and_served_follows_the_chosen_mode(pipe):
    client = vectorstore.connect(pipe.settings.milvus_uri)
    # The fine-tune finds 10 of 20; the untuned base model's own vectors find all 20: rejected. These shards have no
    # base index to serve (no base artifact), and BM25 finds nothing: the run's own index is the best that can serve.
    run_id = prepared_run(pipe, good=10, previous_good=None, mode="hybrid", base_good=20, dataset="firstgate")
    index_run(pipe, run_id)
    event = pipe.published[-1].data
    assert "vs base 1.0000" in event["gate"]["reason"]
    assert event["gate"]["reason"].startswith("first index for this dataset; rejected")
    assert event["metrics_by_mode"]["base"]["recall@1"] == pytest.approx(1.0)  # exact search over base vectors
    assert event["default_search_mode"] == "hybrid" and event["search"]["hybrid_weight"] == 0.7
    assert event["metrics"] == event["metrics_by_mode"]["served"] == event["metrics_by_mode"]["hybrid"]
    assert event["promoted"] is True and event["fallback"]["mode"] == "served"
    assert "falls back: served: this run's own index" in event["gate"]["reason"]
    assert vectorstore.alias_target(client, "firstgate") == vectorstore.collection_name("firstgate", run_id)


def test_a_first_run_that_loses_to_the_base_model_serves_the_base_model(pipe):
    """Issue 29: a rejected first run leaves the dataset searchable with the best baseline it measured, served from
    an index of the base model's vectors, measured through Milvus, flagged in the event, the entry and the report."""
    client = vectorstore.connect(pipe.settings.milvus_uri)
    run_id = prepared_run(
        pipe, good=10, previous_good=None, mode="dense", base_good=20, dataset="fallback", base_artifact=True
    )
    index_run(pipe, run_id)
    event = pipe.published[-1].data
    own = vectorstore.collection_name("fallback", run_id)
    fb = event["fallback"]
    assert event["promoted"] is True and fb["mode"] == "base" and fb["served"] == "base model"
    assert fb["collection"] == own + "__base" and fb["rejected_collection"] == own
    assert "rejected: served is worse" in fb["why"] and "falls back: served: base model" in event["gate"]["reason"]
    assert vectorstore.alias_target(client, "fallback") == own + "__base" == event["collection"]
    # served is measured on the new index through Milvus, the run's own figures stay beside it
    assert event["default_search_mode"] == "dense" and event["metrics"]["recall@1"] == pytest.approx(1.0)
    # the event's figures are the serving index's (dense = served); the rejected index's stay in the fallback
    assert event["metrics_by_mode"]["served"] == event["metrics"] == event["metrics_by_mode"]["dense"]
    assert fb["rejected_metrics_by_mode"]["dense"]["recall@1"] == pytest.approx(0.5)
    assert event["metrics_by_mode"]["base"]["recall@1"] == pytest.approx(1.0)  # the exact baseline, kept
    assert event["model"]["uri"].endswith("/base-model") and event["model"]["tuned"] is False
    assert (
        event["model"]["fingerprint"] == "base-fp-a"
        and "fallback: base model serves" in event["model"]["shipped_reason"]
    )
    entry = pipe.ledger.get_dataset("fallback")["promoted"]
    assert (entry["collection"], entry["model_uri"], entry["fingerprint"]) == (
        own + "__base",
        fb["model_uri"],
        "base-fp-a",
    )
    assert entry["search"]["default_mode"] == "dense"
    assert vectorstore.describe(client, own + "__base").fingerprint == "base-fp-a"
    assert pipe.ledger.get_run(run_id)["registry"]["state"] == "not registered"
    assert "served instead (first-run fallback)" in storage.read_bytes(event["report_uri"]).decode()

    # A delivery that died after promoting, before storing its event, is redelivered: it makes the same choice (the
    # promotion it finds is its own, so this is still the first index), not a rejection against itself.
    pipe.ledger.update_run(run_id, lambda r: {**r, "state": runs.INDEXING})
    index_run(pipe, run_id)
    again = pipe.published[-1].data
    assert again["promoted"] is True and again["fallback"]["mode"] == "base" and again["collection"] == own + "__base"
    assert again["previous_collection"] is None and again["metrics"] == event["metrics"]
    assert vectorstore.alias_target(client, "fallback") == own + "__base"

    # A later run is gated against what serves (the fallback), never falls back itself.
    later = prepared_run(pipe, good=12, previous_good=20, base_good=20, dataset="fallback", base_artifact=True)
    index_run(pipe, later)
    event = pipe.published[-1].data
    assert event["promoted"] is False and "fallback" not in event and "vs live index 1.0000" in event["gate"]["reason"]
    assert vectorstore.alias_target(client, "fallback") == own + "__base"


def test_vectors_of_another_model_are_refused(pipe):
    client = vectorstore.connect(pipe.settings.milvus_uri)
    run_id = prepared_run(pipe, good=10, previous_good=None, fingerprint="fp-a")
    index_run(pipe, run_id)
    live = pipe.ledger.get_dataset(DATASET)["promoted"]["collection"]
    # An incremental run whose shards come from a different model must not touch the live collection.
    other = prepared_run(pipe, good=10, previous_good=None, fingerprint="fp-OTHER")
    pipe.ledger.update_run(other, lambda r: {**r, "kind": "incremental", "live": {"collection": live}})
    before = client.query(live, filter="", output_fields=["count(*)"])
    assert "FAILED in index" in index_run(pipe, other)
    assert "fp-OTHER" in pipe.ledger.get_run(other)["error"]["cause"]
    assert client.query(live, filter="", output_fields=["count(*)"]) == before


def test_a_broken_trainer_metrics_file_fails_the_run_before_anything_is_promoted(pipe):
    """The trainer's metrics.json is read before the alias swap: a run that cannot report its model is failed with
    the live index, the dataset's promoted entry and the retained collections as they were."""
    client = vectorstore.connect(pipe.settings.milvus_uri)
    dataset = "brokenmetrics"
    live_run = prepared_run(pipe, good=10, previous_good=None, dataset=dataset)
    index_run(pipe, live_run)
    state = pipe.ledger.get_dataset(dataset)
    collections = set(client.list_collections())
    run_id = prepared_run(pipe, good=16, previous_good=10, dataset=dataset)  # better: it would be promoted
    trained = pipe.ledger.get_run(run_id)["model"]["uri"].rstrip("/").rsplit("/", 1)[0]
    storage.write_bytes(f"{trained}/metrics.json", b"{not json")
    assert "FAILED in index" in index_run(pipe, run_id)
    assert pipe.ledger.get_run(run_id)["state"] == runs.FAILED
    assert vectorstore.alias_target(client, dataset) == state["promoted"]["collection"]
    assert pipe.ledger.get_dataset(dataset)["promoted"] == state["promoted"]
    assert collections <= set(client.list_collections()), "nothing retained away"


def test_search_service_reloads_in_the_background(services, tiny_model, pipe):
    """The search service keeps answering with the loaded model while an index-updated event triggers a reload."""
    import sys
    import threading

    app = functions_framework.create_app(
        target="search", source=str(ROOT / "services/search/main.py"), signature_type="http"
    )
    # create_app imported services/search/main.py; its module-level Searcher is what requests use.
    module = next(m for n, m in sys.modules.items() if getattr(m, "searcher", None) and n.endswith("main"))
    searcher = module.searcher
    client = app.test_client()
    # Point the promoted entry at the tiny model (dim 32, like the synthetic vectors).
    pipe.ledger.update_dataset(DATASET, lambda st: {**st, "promoted": {**st["promoted"], "model_uri": tiny_model}})
    assert client.get("/healthz").status_code == 200
    r = client.get(f"/search?dataset={DATASET}&q=text&k=3&mode=hybrid")
    assert r.status_code == 200, r.get_data(as_text=True)
    first = r.get_json()
    assert len(first["hits"]) == 3 and first["collection"] == pipe.ledger.get_dataset(DATASET)["promoted"]["collection"]

    # Promote a better run; the new model loads slowly: requests meanwhile are served by the old one.
    gate = threading.Event()
    real_loader = searcher.loader

    def slow_loader(uri):
        gate.wait(30)
        return real_loader(uri)

    searcher.loader = slow_loader
    newer = prepared_run(pipe, good=20, previous_good=10)
    index_run(pipe, newer)
    pipe.ledger.update_dataset(DATASET, lambda st: {**st, "promoted": {**st["promoted"], "model_uri": tiny_model}})
    data = pipe.published[-1].data
    assert data["promoted"] is True
    message = {
        "data": base64.b64encode(json.dumps(data).encode()).decode(),
        "messageId": "1",
        "attributes": {"ce-type": "io.embedpipe.index.updated.v1"},
    }
    r = client.post(f"/projects/{services.project}/topics/index-updated", json={"message": message})
    assert r.status_code == 200 and r.get_json() == {"reloading": True}
    during = client.get(f"/search?dataset={DATASET}&q=text&k=3").get_json()
    assert during["mode"] == "dense"  # no mode asked: the promoted run's default_search_mode
    assert during["collection"] == first["collection"], "old model + its own collection while the new one loads"
    gate.set()
    searcher._reloading[DATASET].join(30)
    after = client.get(f"/search?dataset={DATASET}&q=text&k=3").get_json()
    assert after["collection"] == vectorstore.collection_name(DATASET, newer)
    # A promoted run that chose hybrid is answered with hybrid by default, and ?mode= still overrides.
    pipe.ledger.update_dataset(
        DATASET, lambda st: {**st, "promoted": {**st["promoted"], "search": {"default_mode": "hybrid"}}}
    )
    searcher._serving.pop(DATASET)
    assert client.get(f"/search?dataset={DATASET}&q=text&k=3").get_json()["mode"] == "hybrid"
    assert client.get(f"/search?dataset={DATASET}&q=text&k=3&mode=bm25").get_json()["mode"] == "bm25"
    assert client.get(f"/search?dataset={DATASET}&q=text&k=3&mode=nope").status_code == 400


def test_shards_are_streamed_and_every_count_is_checked_before_any_row_is_loaded(pipe, monkeypatch):
    whole, upserts = [], []
    read_bytes, upsert_batch = storage.read_bytes, vectorstore.upsert_batch
    monkeypatch.setattr(storage, "read_bytes", lambda uri, *a, **k: whole.append(uri) or read_bytes(uri, *a, **k))
    monkeypatch.setattr(vectorstore, "upsert_batch", lambda *a: upserts.append(a[2]) or upsert_batch(*a))
    run_id = prepared_run(pipe, good=10, previous_good=None, base_good=20, dataset="streamed")
    index_run(pipe, run_id)
    event = pipe.published[-1].data
    assert event["counts"]["upserted"] == N_DOCS and event["metrics_by_mode"]["base"]["recall@1"] == pytest.approx(1.0)
    assert not [u for u in whole if "/corpus-" in u], "shards are read in ranges (upserts, base ranking), never whole"

    # Two shards, the second's manifest disagreeing with its footer: refused before the first one is loaded.
    bad = prepared_run(pipe, good=10, previous_good=None, dataset="streamed")
    out = f"{pipe.ledger.run_dir(bad)}/embeddings/1"
    storage.write_bytes(f"{out}/corpus-00001-of-00002.parquet", read_bytes(f"{out}/corpus-00000-of-00001.parquet"))
    first = storage.read_json(f"{out}/manifest-00000.json")
    storage.write_json(f"{out}/manifest-00000.json", {**first, "replicas": 2})
    second = {**first, "replicas": 2, "replica": 1, "file": "corpus-00001-of-00002.parquet", "count": N_DOCS + 1}
    storage.write_json(f"{out}/manifest-00001.json", second)
    upserts.clear()
    assert "FAILED in index" in index_run(pipe, bad)
    assert pipe.ledger.get_run(bad)["error"]["cause"] == (
        f"corpus-00001-of-00002.parquet: {N_DOCS} rows, manifest says {N_DOCS + 1}"
    )
    assert upserts == []


def test_a_bulk_load_stages_each_shard_from_gcs_and_falls_back_to_upserts_where_import_is_missing(pipe, monkeypatch):
    def refused(self, timeout=60.0):
        raise bulkload.ImportUnsupported(f"{self.url}: HTTP 404")  # a server without the import API

    monkeypatch.setattr(bulkload.Request, "send", refused)
    s = dataclasses.replace(pipe.settings, bulk_import_bucket=pipe.settings.artifacts_bucket, bulk_import_min_rows=1)
    run_id = prepared_run(pipe, good=10, previous_good=None, dataset="bulk")
    out = f"{pipe.ledger.run_dir(run_id)}/embeddings/1"
    client, collection = vectorstore.connect(s.milvus_uri), vectorstore.collection_name("bulk", run_id)
    vectorstore.create_collection(client, collection, DIM, "fp-a", "gs://model")
    manifests = indexing.load_manifests(out)
    # The shards are staged (streamed from their GCS objects) before the import is refused; then upserted.
    assert indexing.load_shards(s, client, collection, out, manifests, indexing.Stopwatch(), fresh=True) == N_DOCS
    staged = indexing.read_parquet(f"gs://{s.bulk_import_bucket}/embedpipe-import/{collection}/part-00000.parquet")
    assert staged.equals(bulkload.import_table(indexing.read_parquet(f"{out}/{manifests[0]['file']}")))


def test_a_load_killed_part_way_resumes_and_one_larger_than_a_delivery_completes_over_several(pipe, monkeypatch):
    """Issue 25.7: each delivery used to restart the upserts from row 0 inside the push deadline, so a load larger
    than one delivery never finished. Here the first delivery dies in its second batch of 16 rows, and every later
    delivery's budget is spent after one batch: the load completes over several deliveries, each upserting only the
    rest."""
    monkeypatch.setattr(indexing, "UPSERT_BATCH", 16)  # 60 rows: 4 batches
    monkeypatch.setattr(indexing, "LOAD_CHECKPOINT_S", 0.0)
    batches, real = [], vectorstore.upsert_batch

    def upsert_batch(client, name, rows):
        if len(batches) == 1 and not getattr(upsert_batch, "died", False):
            upsert_batch.died = True
            raise ConnectionError("the indexer's instance was killed")
        batches.append([r["id"] for r in rows])
        return real(client, name, rows)

    monkeypatch.setattr(vectorstore, "upsert_batch", upsert_batch)
    requests = []
    budget = dataclasses.replace(pipe.settings, index_delivery_budget_s=0.0)
    short = Pipeline(
        budget,
        pipe.ledger,
        publish=lambda topic, e: (requests if e.type == INDEX_REQUESTED else pipe.published).append(e),
    )
    run_id = prepared_run(pipe, good=10, previous_good=None, dataset="resumed")
    with pytest.raises(ConnectionError):
        index_run(pipe, run_id)  # a crash: Pub/Sub redelivers the request
    outcomes = []
    while pipe.ledger.get_run(run_id)["state"] == runs.INDEXING and len(outcomes) < 20:
        outcomes.append(index_run(short, run_id))  # the redelivery, then each hand-over's new request
    # rows 17-32 and 33-48 each hand over, the last batch completes (more hand-overs only if the index build lags)
    assert all("continued by a new index request" in o for o in outcomes[:-1]) and len(outcomes) >= 3, outcomes
    assert "index-updated published (promoted=True)" in outcomes[-1]
    assert len(requests) == len(outcomes) - 1 and len({e.id for e in requests}) == len(requests)
    assert [len(b) for b in batches] == [16, 16, 16, 12], "each row upserted once over all deliveries"
    assert sorted(i for b in batches for i in b) == [f"d{i:03d}" for i in range(N_DOCS)]
    record = pipe.ledger.get_run(run_id)
    assert record["state"] == runs.SUCCEEDED and record["counts"]["upserted"] == N_DOCS
    client = vectorstore.connect(pipe.settings.milvus_uri)
    assert vectorstore.count_rows(client, vectorstore.collection_name("resumed", run_id)) == N_DOCS


def test_rows_lost_after_a_resumed_load_recorded_them_are_loaded_again(pipe, monkeypatch):
    """A resumed fresh load is counted before it is measured: rows a Milvus restart lost after a delivery recorded
    them would go missing silently. The short collection (this run's own) is dropped and the redelivery loads it from
    row 0; the review's first version reset the progress in a way that never took, looping for ever."""
    monkeypatch.setattr(indexing, "UPSERT_BATCH", 16)
    monkeypatch.setattr(indexing, "LOAD_CHECKPOINT_S", 0.0)
    budget = dataclasses.replace(pipe.settings, index_delivery_budget_s=0.0)
    short = Pipeline(budget, pipe.ledger, publish=lambda topic, e: pipe.published.append(e))
    run_id = prepared_run(pipe, good=10, previous_good=None, dataset="lost")
    assert "continued by a new index request" in index_run(short, run_id)  # 16 rows, then a hand-over
    client, collection = vectorstore.connect(pipe.settings.milvus_uri), vectorstore.collection_name("lost", run_id)
    client.delete(collection_name=collection, filter='id in ["d000", "d001", "d002"]')  # lost after being recorded
    with pytest.raises(RuntimeError, match="57 rows after a resumed load of 60: dropped, loaded again"):
        index_run(pipe, run_id)
    assert "index-updated published (promoted=True)" in index_run(pipe, run_id)  # the redelivery
    assert vectorstore.count_rows(client, collection) == N_DOCS
