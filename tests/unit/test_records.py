"""contracts.records: every constructor's output validates against the shipped JSON Schema (full, incremental,
rejected and rollback index-updated payloads, run.failed), each TypedDict's keys are its schema's properties (so the
two cannot drift), and each ledger record's constructor writes exactly the keys its type says it always has."""

from __future__ import annotations

import jsonschema
import pytest

from embedpipe.contracts import events, records
from embedpipe.contracts.events import INDEX_UPDATED, RUN_FAILED, Event
from embedpipe.index import indexing, rollback
from embedpipe.ledger.runs import Ledger
from tests.unit.fakes import FakeStore

METRICS = {"recall@1": 0.5, "recall@5": 0.7, "recall@10": 0.8, "recall@100": 0.9, "mrr@10": 0.6, "ndcg@10": 0.65}
WORSE = {k: v - 0.1 for k, v in METRICS.items()}
MANIFEST = {"fingerprint": "fp1", "dim": 8, "tuned": True, "eval_split": "test", "qrels_absent": 0}


def keys(td) -> set[str]:
    return set(td.__required_keys__) | set(td.__optional_keys__)


def payload(kind: records.Kind, promoted: bool, old: dict | None, trainer: dict) -> records.IndexUpdated:
    """An index run's payload, built as ``indexing._index`` builds it."""
    record = records.new_run_record("r2", "demo", {"type": "upload", "dataset": "demo"}, now=100.0)
    record["stage_times"]["PENDING"]["end"] = 101.5
    return records.index_updated_payload(
        run_id="r2",
        dataset="demo",
        kind=kind,
        promoted=promoted,
        gate={"metric": "ndcg@10", "metrics": ["ndcg@10"], "tolerance": 0.0, "reason": "why"},
        search={"default_mode": "hybrid", "hybrid_weight": 0.5, "rrf_k": 60},
        alias="demo",
        collection="demo__r2",
        previous_collection="demo__r1" if old else None,
        model=indexing.model_info("gs://a/runs/r2/train/1/model/", MANIFEST, trainer),
        counts={"upserted": 10, "deleted": 1, "unchanged": 5, "total": 15, "skipped": 0},
        metrics=METRICS,
        previous_metrics=old,
        metrics_by_mode={"dense": METRICS, "served": METRICS},
        previous_metrics_by_mode={"served": old} if old else None,
        default_search_mode="hybrid",
        stage_seconds=indexing.stage_seconds(record, t0=0.0),
        report_uri="gs://a/runs/r2/report.html",
        trigger=record["trigger"],
        indexed={
            "selection": trainer.get("selection") if kind == records.FULL else None,
            "selection_agreement": None,
            "eval": {"split": "test", "queries": 3, "qrels_absent": 0},
            "milvus_seconds": 0.25,
            "dropped_collections": ["demo__r0"],
        },
    )


def rollback_payload() -> dict:
    live = records.promoted_entry(
        run_id="r2",
        collection="demo__r2",
        model_uri="gs://a/runs/r2/train/1/model/",
        fingerprint="fp2",
        dim=8,
        metrics=WORSE,
        metrics_by_mode={"served": WORSE},
        search={"default_mode": "dense"},
        schema=2,
        updated_by="r2",
        hashes="gs://a/runs/r2/embeddings/1/hashes.parquet",
        rows=15,
        representation="text-1+lucene-en-stop+snowball-en",
    )
    target = {**live, "run_id": "r1", "collection": "demo__r1", "updated_by": "r1", "metrics": METRICS}
    ledger = Ledger("a", store=FakeStore())
    why = {"by": "me", "reason": "worse answers"}
    return rollback.event_for(None, ledger, "demo", "demo/rollback/1", live, target, why).data


CASES = {
    "full": lambda: payload(records.FULL, True, None, {"model_version": "v1", "selection": {"mode": "hybrid"}}),
    "incremental": lambda: payload(records.INCREMENTAL, True, WORSE, {}),
    "rejected": lambda: payload(records.FULL, False, METRICS, {"shipped_reason": "base model kept"}),
    "no qrels": lambda: {**payload(records.FULL, True, None, {}), "metrics": None, "metrics_by_mode": {}},
    "rollback": rollback_payload,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_index_updated_payloads_validate_against_the_shipped_schema(case):
    data = CASES[case]()
    events.validate(Event(INDEX_UPDATED, dict(data)))
    assert set(data) <= keys(records.IndexUpdated)
    assert set(records.IndexUpdatedCore.__required_keys__) <= set(data)
    assert ("rollback" in data) == (case == "rollback")  # an index run's payload, or a rollback's
    assert ("eval" in data) == (case != "rollback")


def test_the_index_updated_payload_is_an_index_runs_or_a_rollbacks():
    full = dict(payload(records.FULL, True, None, {}))
    rb = rollback_payload()
    args = {k: full[k] for k in records.IndexUpdatedCore.__required_keys__}
    with pytest.raises(ValueError, match="index run's"):
        records.index_updated_payload(**args)
    with pytest.raises(ValueError, match="index run's"):
        records.index_updated_payload(
            **args, indexed={k: full[k] for k in records.Indexed.__required_keys__}, rollback=rb["rollback"]
        )


def test_run_failed_payload_validates_against_the_shipped_schema():
    for trigger in ({"type": "retrain", "dataset": "demo"}, None):
        data = records.run_failed_payload(run_id="r1", dataset="demo", stage="train", cause="oom", trigger=trigger)
        events.validate(Event(RUN_FAILED, dict(data)))
    with pytest.raises(jsonschema.ValidationError):  # the schema is really checked
        events.validate(Event(RUN_FAILED, {**data, "cause": 3}))


def test_payload_types_and_schemas_name_the_same_keys():
    """A key added to a payload type without its schema (or the other way round) fails here."""
    updated = events.schema(INDEX_UPDATED)
    props = updated["properties"]
    assert keys(records.IndexUpdated) == set(props)
    assert set(updated["required"]) <= set(records.IndexUpdated.__required_keys__)
    for td, name in [
        (records.ModelInfo, "model"),
        (records.CountsSkipped, "counts"),
        (records.RollbackInfo, "rollback"),
    ]:
        assert keys(td) == set(props[name]["properties"]), name
        assert set(props[name]["required"]) == set(td.__required_keys__), name
    failed = events.schema(RUN_FAILED)
    assert keys(records.RunFailed) == set(failed["properties"])
    assert set(failed["required"]) <= set(records.RunFailed.__required_keys__)


def test_ledger_constructors_write_the_keys_their_types_always_have():
    record = records.new_run_record("r1", "demo", {"type": "upload"}, now=0.0, kind=records.FULL)
    assert set(record) == set(records.RunRecordCreated.__required_keys__)
    assert record["kind"] == "full" and record["state"] == "PENDING" and record["created_at"] == records.iso(0.0)
    assert set(records.new_run_record("r1", "demo", {}, now=0.0, force_full=True)) <= keys(records.RunRecord)
    assert set(records.empty_dataset_state("demo")) == set(records.DatasetStateMade.__required_keys__)
    made = records.promoted_entry(
        **{k: None for k in records.PromotedEntryMade.__required_keys__}  # type: ignore[arg-type]
    )
    assert set(made) == set(records.PromotedEntryMade.__required_keys__)
    item = records.rollback_item(
        id="demo/rollback/1",
        at="t",
        from_={"collection": "demo__r2", "run_id": "r2"},
        to={"collection": "demo__r1", "run_id": "r1"},
        by="",
        reason="",
        event={},
    )
    assert set(item) == set(records._RollbackItemMade.__required_keys__) and item["done_at"] is None
    assert {"superseded_at", "registry"} == set(records.RollbackItem.__optional_keys__)


def test_the_kinds_have_one_definition():
    from embedpipe.control import incremental

    assert (incremental.FULL, incremental.INCREMENTAL) == (records.FULL, records.INCREMENTAL) == ("full", "incremental")
    assert incremental.FULL is records.FULL


def test_run_stage_payload_carries_the_job_only_when_one_was_launched():
    assert records.run_stage_payload(run_id="r1", dataset="demo", state="INDEXING") == {
        "run_id": "r1",
        "dataset": "demo",
        "state": "INDEXING",
    }
    launched = records.run_stage_payload(run_id="r1", dataset="demo", state="TRAINING", job="jobs/1")
    assert launched["job"] == "jobs/1" and set(launched) == keys(records.RunStage)
