"""Reconcile recovers a run whose job-state event was lost, on the real local stack (Pub/Sub emulator, fake GCS, a
real local training job). The job runner publishes the ml_job LogEntry to job-events; the test takes it off the
topic through its own pull subscription so on-job-event never sees it (a dropped event). The run stays in
TRAINING until a reconcile tick asks the launcher, finds the job SUCCEEDED and launches embedding."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time

import functions_framework
import pytest

from embedpipe import topology
from embedpipe.contracts import events
from embedpipe.gcp import bus, storage
from embedpipe.jobs.local import LocalJobLauncher
from embedpipe.ledger import runs
from embedpipe.ledger.runs import Ledger
from tests.helpers import FIXTURES, ROOT, apply_env, post, push_event


def client_for(name: str):
    c = topology.component(name)
    return functions_framework.create_app(
        target=c.target, source=str(ROOT / c.path), signature_type=c.signature
    ).test_client()


@pytest.fixture
def isolated(services, tmp_path):
    """Own buckets and state dir on the shared emulators, so other tests' runs are not reconciled here."""
    s = dataclasses.replace(
        services, data_bucket="recon-data", artifacts_bucket="recon-artifacts", state_dir=str(tmp_path / "state")
    )
    apply_env(s)
    for bucket in (s.data_bucket, s.artifacts_bucket):
        storage.ensure_bucket(bucket)
    yield s
    for pid in LocalJobLauncher(s).running_pids():
        os.killpg(pid, signal.SIGTERM)
    apply_env(services)


def test_a_lost_job_event_is_recovered_by_the_reconcile_tick(isolated):
    s, ledger = isolated, Ledger(isolated.artifacts_bucket)
    for path in sorted((FIXTURES / "tiny_beir").rglob("*")):
        if path.is_file() and path.suffix in (".jsonl", ".tsv"):
            rel = path.relative_to(FIXTURES / "tiny_beir").as_posix()
            storage.upload_file(path, f"gs://{s.data_bucket}/datasets/recon/{rel}")
    dropped = bus.ensure_pull_subscription(s.project, topology.JOB_EVENTS, "job-events-dropped")
    bus.pull(dropped, timeout=1)  # start clean

    body = json.dumps({"dataset": "recon", "reason": "reconcile test"}).encode()
    event = push_event(body, {}, topology.RETRAIN_REQUESTS, message_id="70707")
    assert post(client_for("on-retrain-requested"), event) == 200
    run_id = ledger.get_claim(events.retrain_key("70707"))["run_id"]
    record = ledger.get_run(run_id)
    assert record["state"] == runs.TRAINING
    train_job = record["jobs"]["train"]["name"]

    # The training job ends and its runner publishes the LogEntry; we take it so no push ever delivers it.
    lost, deadline = [], time.time() + 240
    while not lost and time.time() < deadline:
        lost = [m for m in bus.pull(dropped, timeout=2) if json.loads(m[0])["resource"]["labels"]["job_id"]
                == train_job.rsplit("/", 1)[1]]  # fmt: skip
    assert lost, f"the training job never ended: {LocalJobLauncher(s).get(train_job)}"
    assert json.loads(lost[0][0])["labels"]["ml.googleapis.com/job_state"] == "SUCCEEDED", (
        LocalJobLauncher(s).get(train_job).error
    )
    assert ledger.get_run(run_id)["state"] == runs.TRAINING, "without the event nothing advanced the run"

    # The scheduled tick (Cloud Scheduler on GCP, the ticker locally) finds the ended job and finishes the step.
    tick = push_event(b"{}", {"ce-type": "io.embedpipe.tick.v1"}, topology.RECONCILE_TICKS)
    assert post(client_for("reconcile"), tick) == 200
    record = ledger.get_run(run_id)
    assert record["state"] == runs.EMBEDDING
    assert record["model"]["uri"] == f"{ledger.run_dir(run_id)}/train/1/model/"
    embed_job = record["jobs"]["embed"]["name"]
    assert LocalJobLauncher(s).get(embed_job).labels == {"run_id": run_id, "stage": "embed"}

    # A second tick (or the late event, had it arrived) changes nothing: one embedding job.
    assert post(client_for("reconcile"), tick) == 200
    assert ledger.get_run(run_id)["jobs"]["embed"]["name"] == embed_job
    assert len(list((s.state_path / "jobs").iterdir())) == 2
    LocalJobLauncher(s).cancel(embed_job)
