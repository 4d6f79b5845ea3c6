"""The run ledger on fake-gcs-server under real concurrency: a burst of uploads handled at once, as Cloud Functions
instances would, records every trigger (one create-only object each) without giving up on contention."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor

from embedpipe.contracts.events import ObjectChange
from embedpipe.control.pipeline import Pipeline
from embedpipe.gcp import storage
from embedpipe.ledger.runs import PENDING, Ledger

N_UPLOADS = 200


def test_200_concurrent_uploads_are_all_recorded(services):
    s = dataclasses.replace(services, debounce_s=60.0)  # nothing launches during the burst
    dataset = "burst200"
    changes = []
    for i in range(N_UPLOADS):
        name = f"datasets/{dataset}/corpus/part-{i:03d}.jsonl"
        body = json.dumps({"_id": f"d{i}", "title": f"t{i}", "text": f"document {i}"}).encode() + b"\n"
        generation = storage.write_bytes(f"gs://{s.data_bucket}/{name}", body)
        changes.append(ObjectChange(s.data_bucket, name, generation, "OBJECT_FINALIZE"))
    ledger = Ledger(s.artifacts_bucket)
    pipe = Pipeline(s, ledger, publish=lambda topic, event: None)  # the real intake reads each object

    with ThreadPoolExecutor(32) as pool:  # 32 handler instances at once, each delivery handled once
        outcomes = list(pool.map(pipe.on_object_change, changes))

    assert all("-> run" in o for o in outcomes), [o for o in outcomes if "-> run" not in o][:3]
    claims = {c.key: ledger.get_claim(c.key)["run_id"] for c in changes}
    (run_id,) = set(claims.values())  # one burst, one run
    record = ledger.view(run_id)
    assert record["state"] == PENDING
    assert sorted(record["triggers"]) == sorted(claims)
    assert ledger.get_dataset(dataset)["pending"] == run_id
