"""embedpipe.index.registry without a server: model ids, which backend the settings choose, the local no-op and a
local rollback recording it; and the constants and entries the integration tier's registry tests share
(tests/integration/test_registry.py sends VertexRegistry's requests to a local HTTP server that answers like the
Vertex AI Model Registry)."""

from __future__ import annotations

import re

from embedpipe.config import Settings
from embedpipe.index import registry, rollback
from embedpipe.index.registry import ALIAS, LocalRegistry, VertexRegistry
from embedpipe.ledger import runs
from embedpipe.ledger.runs import Ledger
from embedpipe.retrieval import vectorstore
from tests.unit.fakes import FakeMilvus, FakeStore
from tests.unit.test_vertex import NO_SERVER, settings

DS = "docs"
RUN_A, RUN_B = "20261130t100000-AAAAAA", "20261130t110000-bbbbbb"
INFO = {
    "base_model": "bundled:all-MiniLM-L6-v2",
    "dim": 384,
    "max_seq_length": 256,
    "pooling": "mean",
    "normalize": True,
    "similarity": "cosine",
    "query_prefix": "query: ",
    "document_prefix": "",
    "git_sha": "0123abcd",
    "data_fingerprint": "d1",
    "preprocessing_fingerprint": "p1",
    "fingerprint": "fp1",
    "version": "fp1",
    "metrics": {"selection_ndcg@10": 0.5},
    "tuned": True,
}
METRICS = {"recall@1": 0.5, "recall@5": 0.6, "recall@10": 0.72, "recall@100": 0.9, "mrr@10": 0.6, "ndcg@10": 0.61}


def uri(run_id: str) -> str:
    return f"gs://arts/runs/{run_id}/train/1/model/"


def entry(run_id: str) -> dict:
    return {
        "run_id": run_id,
        "collection": vectorstore.collection_name(DS, run_id),
        "model_uri": uri(run_id),
        "fingerprint": f"fp-{run_id[-6:]}",
        "dim": 8,
        "metrics": METRICS,
        "updated_by": run_id,
    }


def test_the_model_id_is_valid_for_every_dataset_name():
    assert registry.model_id("demo") == "embedpipe-demo"
    long_a, long_b = "a" * 60 + "x", "a" * 60 + "y"
    assert len(registry.model_id(long_a)) == 63 and registry.model_id(long_a) != registry.model_id(long_b)
    assert re.fullmatch(r"[a-z][a-z0-9_-]{0,62}", registry.model_id("9" * 63))


def test_locally_the_registry_is_a_recorded_no_op(clock):
    reg = registry.for_settings(Settings.from_env({}))
    assert isinstance(reg, LocalRegistry)
    out = registry.promote(reg, DS, RUN_A, "/models/a", METRICS, clock=clock)
    assert out["registry"] == "local" and out["state"] == "noop" and out["at"] == runs.iso(clock())
    assert out["version"] == f"embedpipe-{DS}@{RUN_A}" and out["alias"] == ALIAS


def test_backends_follow_the_settings():
    """(That choosing the Vertex backend imports no aiplatform until it is used needs a fresh interpreter:
    tests/integration/test_registry.py.)"""
    gcp = settings(NO_SERVER)
    assert isinstance(registry.for_settings(gcp), VertexRegistry)
    opted_out = Settings.from_env(
        {
            **{f"EMBEDPIPE_{k.upper()}": str(v) for k, v in vars(gcp).items() if v != ""},
            "EMBEDPIPE_MODEL_REGISTRY": "local",
        }
    )
    assert isinstance(registry.for_settings(opted_out), LocalRegistry)


def test_a_local_rollback_records_the_registry_no_op():
    ledger, client = Ledger("a", FakeStore()), FakeMilvus()
    for run_id in (RUN_A, RUN_B):
        e = {**entry(run_id), "model_uri": f"/models/{run_id}"}
        client.add(e["collection"], e["fingerprint"], e["dim"])
        vectorstore.point_alias(client, DS, e["collection"])
        ledger.update_dataset(
            DS, lambda st, e=e: {**st, "promoted": e, "promoted_entries": rollback.remember(st, e, 3)}
        )
    called = []
    rollback.rollback(
        Settings.from_env({}),
        ledger,
        client,
        lambda topic, event: None,
        DS,
        registry_alias=lambda s, dataset, target, **_: called.append((dataset, target["run_id"])) or {"registry": "x"},
    )
    assert called == [(DS, RUN_A)], "the injected hook gets the target entry"
    assert ledger.get_dataset(DS)["rollbacks"][0]["registry"] == {"registry": "x"}
    rollback.rollback(Settings.from_env({}), ledger, client, lambda topic, event: None, DS, to=RUN_B)
    recorded = ledger.get_dataset(DS)["rollbacks"][1]["registry"]
    assert recorded["registry"] == "local" and recorded["state"] == "noop"
    assert recorded["version"] == f"embedpipe-{DS}@{RUN_B}"
