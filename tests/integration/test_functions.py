"""Each function and the indexer through functions_framework.create_app(...).test_client(), against the real
Pub/Sub emulator, fake-gcs-server and Milvus Lite server. The messages posted are the ones those services really
produced (pulled from subscriptions), wrapped the way a push subscription delivers them."""

from __future__ import annotations

import json
import time

import functions_framework
import pytest

from embedpipe import topology
from embedpipe.contracts import datasets, events
from embedpipe.gcp import bus, storage
from embedpipe.jobs.local import LocalJobLauncher
from embedpipe.ledger import runs
from embedpipe.ledger.runs import Ledger
from embedpipe.retrieval import vectorstore
from tests.helpers import FIXTURES, ROOT, drain, job_specs, post, push_event, upload_folder


def client_for(name: str):
    c = topology.component(name)
    return functions_framework.create_app(
        target=c.target, source=str(ROOT / c.path), signature_type=c.signature
    ).test_client()


def wait_messages(sub: str, n: int = 1, timeout: float = 180.0) -> list[tuple[bytes, dict, str]]:
    got, deadline = [], time.time() + timeout
    while len(got) < n and time.time() < deadline:
        got += bus.pull(sub, timeout=2)
    assert len(got) >= n, f"expected {n} message(s) on {sub}, got {len(got)} within {timeout}s"
    return got


@pytest.fixture(scope="module")
def subs(services):
    """Pull subscriptions that let the test see what the services publish."""
    out = {}
    for topic in (
        topology.DATA_EVENTS,
        topology.JOB_EVENTS,
        topology.INDEX_REQUESTS,
        topology.INDEX_UPDATED,
        topology.RUN_EVENTS,
    ):
        out[topic] = bus.ensure_pull_subscription(services.project, topic, f"{topic}-itest")
    return out


def test_whole_loop_through_each_function(services, subs):
    s, ledger = services, Ledger(services.artifacts_bucket)
    corpus_ids = set(datasets.load_dir(FIXTURES / "tiny_beir").corpus)
    for path in sorted((FIXTURES / "tiny_beir").rglob("*")):
        if path.is_file() and path.suffix in (".jsonl", ".tsv"):
            rel = path.relative_to(FIXTURES / "tiny_beir").as_posix()
            storage.upload_file(path, f"gs://{s.data_bucket}/datasets/tiny/{rel}")

    # fake-gcs-server published one OBJECT_FINALIZE per file; deliver each three times.
    notes = wait_messages(subs[topology.DATA_EVENTS], 4)
    on_data = client_for("on-data-uploaded")
    for data, attrs, mid in notes:
        for _ in range(3):
            assert post(on_data, push_event(data, attrs, topology.DATA_EVENTS, message_id=mid)) == 200
    keys = [events.object_key(a["bucketId"], a["objectId"], a["objectGeneration"]) for _, a, _ in notes]
    run_ids = {ledger.get_claim(k)["run_id"] for k in keys}
    assert len(run_ids) == 1, "uploads that arrive together coalesce into one run"
    run_id = run_ids.pop()
    record = ledger.view(run_id)
    assert sorted(record["triggers"]) == sorted(keys)  # each trigger once despite 3 deliveries
    assert ledger.get_dataset("tiny")["pending"] == run_id

    # The scheduled tick launches the run once its debounce has passed; a second tick launches nothing more.
    time.sleep(s.debounce_s + 0.2)
    reconcile = client_for("reconcile")
    tick = push_event(b"{}", {"ce-type": "io.embedpipe.tick.v1"}, topology.RECONCILE_TICKS)
    assert post(reconcile, tick) == 200
    assert post(reconcile, tick) == 200
    record = ledger.get_run(run_id)
    assert record["state"] == runs.TRAINING
    assert len(job_specs(s, run_id)) == 1  # the session's other tests share this job folder
    status = LocalJobLauncher(s).get(record["jobs"]["train"]["name"])
    assert status.labels == {"run_id": run_id, "stage": "train"}

    # The job runner publishes the ml_job LogEntry when training ends; deliver it twice.
    on_job = client_for("on-job-event")
    data, attrs, mid = wait_messages(subs[topology.JOB_EVENTS])[0]
    entry = json.loads(data)
    assert entry["resource"]["type"] == "ml_job"
    assert entry["labels"]["ml.googleapis.com/job_state"] == "SUCCEEDED", (
        LocalJobLauncher(s).get(record["jobs"]["train"]["name"]).error
    )
    for _ in range(2):
        assert post(on_job, push_event(data, attrs, topology.JOB_EVENTS, message_id=mid)) == 200
    record = ledger.get_run(run_id)
    assert record["state"] == runs.EMBEDDING
    assert len(job_specs(s, run_id)) == 2

    data, attrs, mid = wait_messages(subs[topology.JOB_EVENTS])[0]
    assert json.loads(data)["labels"]["ml.googleapis.com/job_state"] == "SUCCEEDED"
    assert post(on_job, push_event(data, attrs, topology.JOB_EVENTS, message_id=mid)) == 200
    assert ledger.get_run(run_id)["state"] == runs.INDEXING

    # The index request goes to the indexer service; a redelivery must not duplicate rows or events.
    indexer = client_for("indexer")
    data, attrs, mid = wait_messages(subs[topology.INDEX_REQUESTS])[0]
    for _ in range(2):
        assert post(indexer, push_event(data, attrs, topology.INDEX_REQUESTS, message_id=mid)) == 200
    record = ledger.get_run(run_id)
    assert record["state"] == runs.SUCCEEDED

    # Both deliveries have returned, so whatever they published is on the subscription: count all it holds.
    updated = wait_messages(subs[topology.INDEX_UPDATED])
    updated += drain(subs[topology.INDEX_UPDATED])
    assert len(updated) == 1, "exactly one index-updated per run"
    data, attrs, _ = updated[0]
    assert attrs["ce-type"] == "io.embedpipe.index.updated.v1"
    assert attrs["ce-id"] == f"{run_id}/index-updated"
    event = json.loads(data)
    assert event["run_id"] == run_id and event["promoted"] is True and event["previous_metrics"] is None
    assert event["counts"]["total"] == len(corpus_ids) == event["counts"]["upserted"]
    assert set(event["metrics"]) == {"recall@1", "recall@5", "recall@10", "recall@100", "mrr@10", "ndcg@10"}

    client = vectorstore.connect(s.milvus_uri)
    assert vectorstore.alias_target(client, "tiny") == event["collection"]
    assert set(vectorstore.ids_and_hashes(client, "tiny")) == corpus_ids

    # A late job event for a stage the run has passed is a logged no-op.
    assert post(on_job, push_event(data=json.dumps(entry).encode(), attributes={}, topic=topology.JOB_EVENTS)) == 200
    assert ledger.get_run(run_id)["state"] == runs.SUCCEEDED
    assert len(job_specs(s, run_id)) == 2


def test_retrain_message_launches_one_run(services):
    s, ledger = services, Ledger(services.artifacts_bucket)
    upload_folder(s, FIXTURES / "tiny_beir", "retrain-ds")  # no push subscriptions here: only the files land
    fn = client_for("on-retrain-requested")
    body = json.dumps({"dataset": "retrain-ds", "overrides": {"max_steps": 2}, "reason": "test"}).encode()
    event = push_event(body, {}, topology.RETRAIN_REQUESTS, message_id="4242")
    for _ in range(3):
        assert post(fn, event) == 200
    run_id = ledger.get_claim(events.retrain_key("4242"))["run_id"]
    record = ledger.get_run(run_id)
    assert record["state"] == runs.TRAINING
    assert record["overrides"] == {"max_steps": 2}
    assert record["trigger"]["type"] == "retrain"
    assert len(job_specs(s, run_id)) == 1
    LocalJobLauncher(s).cancel(record["jobs"]["train"]["name"])


def test_retrain_of_a_dataset_without_data_fails_with_run_failed(services, subs):
    ledger = Ledger(services.artifacts_bucket)
    fn = client_for("on-retrain-requested")
    event = push_event(b'{"dataset": "never-uploaded"}', {}, topology.RETRAIN_REQUESTS, message_id="4343")
    assert post(fn, event) == 200
    record = ledger.get_run(ledger.get_claim(events.retrain_key("4343"))["run_id"])
    assert record["state"] == runs.FAILED and record["error"]["stage"] == "intake"
    assert "no corpus" in record["error"]["cause"]
    deadline, failed = time.time() + 30, []
    while not failed and time.time() < deadline:  # the subscription also holds earlier tests' stage events
        failed = [
            json.loads(d)
            for d, a, _ in bus.pull(subs[topology.RUN_EVENTS], timeout=2)
            if a.get("ce-type") == "io.embedpipe.run.failed.v1" and a.get("ce-subject") == record["run_id"]
        ]
    assert failed and failed[0]["stage"] == "intake"
    assert ledger.get_dataset("never-uploaded")["active"] is None  # released: the next upload can start a run


def test_malformed_and_unknown_events_are_acknowledged(services):
    on_job = client_for("on-job-event")
    ledger = Ledger(services.artifacts_bucket)
    before = ledger.list_runs()
    bogus = {
        "resource": {"type": "ml_job", "labels": {"job_id": "999"}},
        "labels": {"ml.googleapis.com/job_state": "SUCCEEDED"},
    }
    assert post(on_job, push_event(json.dumps(bogus).encode(), {}, topology.JOB_EVENTS)) == 200
    assert post(on_job, push_event(b"not json", {}, topology.JOB_EVENTS)) == 200
    retrain = client_for("on-retrain-requested")
    assert post(retrain, push_event(b'{"no": "dataset"}', {}, topology.RETRAIN_REQUESTS)) == 200
    assert ledger.list_runs() == before
