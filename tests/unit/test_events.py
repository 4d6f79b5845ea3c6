"""embedpipe.contracts.events: parsing what functions-framework delivers, and the CloudEvents we publish."""

from __future__ import annotations

import base64
import json

import jsonschema
import pytest
from cloudevents.http import CloudEvent

from embedpipe.contracts import events
from embedpipe.contracts.events import (
    INDEX_UPDATED,
    RUN_FAILED,
    Event,
    EventError,
    JobStateHint,
    parse_job_log_entry,
    parse_object_change,
    parse_push,
    parse_retrain,
)
from tests.unit.fakes import EVENTS_DIR, load_event, push_event

FIXTURES = sorted(p.name for p in EVENTS_DIR.glob("*.json"))


def test_every_fixture_is_a_valid_cloudevent():
    assert FIXTURES == [
        "gcs_finalized_eventarc.json",
        "gcs_notification_push.json",
        "ml_job_local_runner_push.json",
        "ml_job_sink_entry_push.json",
        "retrain_push.json",
    ]
    for name in FIXTURES:
        ce = load_event(name)
        assert ce["specversion"] == "1.0"
        assert ce["type"] in (events.PUBSUB_PUBLISHED, events.GCS_FINALIZED), name


# ---------------------------------------------------------------- parse_push


def test_parse_push_decodes_the_gcs_notification():
    msg = parse_push(load_event("gcs_notification_push.json"))
    assert msg.topic == "data-events"
    assert msg.message_id == "12924355861203021"
    assert msg.publish_time == "2024-11-26T09:04:05.412Z"
    assert msg.attributes["eventType"] == "OBJECT_FINALIZE"
    assert msg.attributes["payloadFormat"] == "JSON_API_V1"
    body = msg.json()
    assert body["kind"] == "storage#object"
    assert body["name"] == "datasets/demo/corpus.jsonl"


def test_parse_push_accepts_snake_case_message_fields():
    ce = push_event(b"{}", message_id="77")
    msg = ce.data["message"]
    msg["message_id"], msg["publish_time"] = msg.pop("messageId"), msg.pop("publishTime")
    parsed = parse_push(ce)
    assert (parsed.message_id, parsed.publish_time) == ("77", "2024-11-26T09:00:00.000Z")


def test_parse_push_without_topic_in_source_has_no_topic():
    ce = push_event(b"{}")
    ce["source"] = "//pubsub.googleapis.com/"
    assert parse_push(ce).topic is None


def test_parse_push_rejects_other_event_types():
    with pytest.raises(EventError, match="expected google.cloud.pubsub.topic.v1.messagePublished"):
        parse_push(load_event("gcs_finalized_eventarc.json"))


def test_parse_push_rejects_missing_message():
    ce = CloudEvent(
        {"type": events.PUBSUB_PUBLISHED, "source": "//pubsub.googleapis.com/projects/p/topics/t", "id": "1"},
        {"subscription": "projects/p/subscriptions/s"},
    )
    with pytest.raises(EventError, match="without data.message"):
        parse_push(ce)


def test_parse_push_rejects_data_that_is_not_base64():
    ce = push_event(b"{}", message_id="42")
    ce.data["message"]["data"] = "not base64 at all!"
    with pytest.raises(EventError, match="message 42: data is not base64"):
        parse_push(ce)


def test_push_message_json_rejects_non_json_body():
    msg = parse_push(push_event(b"\xff\xfe not json", message_id="9"))
    with pytest.raises(EventError, match="message 9: body is not JSON"):
        msg.json()


# ---------------------------------------------------------------- parse_object_change


def test_object_change_from_pubsub_notification_coerces_strings():
    change = parse_object_change(load_event("gcs_notification_push.json"))
    assert change.bucket == "embedpipe-data"
    assert change.name == "datasets/demo/corpus.jsonl"
    assert change.generation == 1732611845123456 and isinstance(change.generation, int)
    assert change.size == 482113 and isinstance(change.size, int)
    assert change.event_type == "OBJECT_FINALIZE"
    assert change.key == "gcs/embedpipe-data/datasets/demo/corpus.jsonl#1732611845123456"


def test_object_change_from_eventarc_finalized_coerces_strings():
    change = parse_object_change(load_event("gcs_finalized_eventarc.json"))
    assert change.bucket == "embedpipe-data"
    assert change.name == "datasets/demo/corpus.jsonl"
    assert change.generation == 1732611845123456 and isinstance(change.generation, int)
    assert change.size == 482113 and isinstance(change.size, int)
    assert change.event_type == "OBJECT_FINALIZE"
    assert change.key == "gcs/embedpipe-data/datasets/demo/corpus.jsonl#1732611845123456"


def test_both_gcs_shapes_give_the_same_trigger_key():
    push = parse_object_change(load_event("gcs_notification_push.json"))
    eventarc = parse_object_change(load_event("gcs_finalized_eventarc.json"))
    assert push == eventarc


def test_object_change_keeps_the_notification_event_type():
    attrs = {"bucketId": "b", "objectId": "datasets/demo/corpus.jsonl", "objectGeneration": "7"}
    change = parse_object_change(push_event(b"", {**attrs, "eventType": "OBJECT_DELETE"}))
    assert change.event_type == "OBJECT_DELETE"
    assert change.size is None  # no payload (payloadFormat NONE)
    assert change.key == "gcs/b/datasets/demo/corpus.jsonl#7"


def test_object_change_rejects_a_message_that_is_not_a_gcs_notification():
    with pytest.raises(EventError, match="not a GCS notification"):
        parse_object_change(push_event(b"{}", {"foo": "bar"}))


def test_object_change_rejects_a_generation_that_is_not_an_integer():
    attrs = {"bucketId": "b", "objectId": "datasets/demo/corpus.jsonl", "objectGeneration": "abc"}
    with pytest.raises(EventError, match="objectGeneration is not an integer: 'abc'"):
        parse_object_change(push_event(b"", attrs))


# ---------------------------------------------------------------- parse_retrain


def test_parse_retrain_fixture():
    req = parse_retrain(parse_push(load_event("retrain_push.json")))
    assert req.dataset == "demo"
    assert req.overrides == {"learning_rate": 3e-5}
    assert req.hp_tuning is None
    assert req.reason == "new labels from the support team"
    assert req.key == "pubsub/retrain/12924355861203100"


def retrain_body(body: bytes):
    return parse_retrain(parse_push(push_event(body, topic="retrain-requests", message_id="6")))


@pytest.mark.parametrize(
    "flag, refused",
    [
        (
            "refresh",
            (b'{"dataset": "demo", "refresh": "yes"}', b'{"dataset": "d", "refresh": true, "overrides": {"a": 1}}'),
        ),
        (
            "allow_shrink",
            (b'{"dataset": "d", "allow_shrink": 1}', b'{"dataset": "d", "allow_shrink": true, "refresh": true}'),
        ),
    ],
)
def test_parse_retrain_flags_are_bools_and_refresh_neither_trains_nor_shrinks(flag, refused):
    assert getattr(retrain_body(b'{"dataset": "demo", "%s": true}' % flag.encode()), flag) is True
    assert getattr(retrain_body(b'{"dataset": "demo"}'), flag) is False
    for body in refused:
        with pytest.raises(EventError):
            retrain_body(body)


def test_parse_retrain_defaults():
    req = parse_retrain(parse_push(push_event(b'{"dataset": "demo"}', topic="retrain-requests", message_id="5")))
    assert (req.dataset, req.overrides, req.hp_tuning, req.reason) == ("demo", {}, None, "retrain requested")


@pytest.mark.parametrize(
    "body",
    [b"{}", b'{"dataset": ""}', b'{"dataset": 3}', b'["demo"]', b'{"overrides": {"learning_rate": 1}}'],
    ids=["empty", "blank", "number", "array", "no-dataset"],
)
def test_parse_retrain_requires_a_dataset(body):
    with pytest.raises(EventError, match="needs a JSON object with a 'dataset' string"):
        parse_retrain(parse_push(push_event(body, topic="retrain-requests")))


def test_parse_retrain_rejects_non_json():
    with pytest.raises(EventError, match="body is not JSON"):
        parse_retrain(parse_push(push_event(b"retrain demo please", topic="retrain-requests")))


def test_parse_retrain_rejects_overrides_that_are_not_an_object():
    body = json.dumps({"dataset": "demo", "overrides": ["learning_rate"]}).encode()
    with pytest.raises(EventError, match="'overrides' must be an object"):
        parse_retrain(parse_push(push_event(body, topic="retrain-requests")))


# ---------------------------------------------------------------- parse_job_log_entry

EXPECTED_HINT = JobStateHint(job_id="1234567890123456789", state="SUCCEEDED", message="Job completed successfully.")


@pytest.mark.parametrize("fixture", ["ml_job_sink_entry_push.json", "ml_job_local_runner_push.json"])
def test_parse_job_log_entry_fixtures_give_the_same_hint(fixture):
    msg = parse_push(load_event(fixture))
    assert msg.topic == "job-events"
    assert parse_job_log_entry(msg) == EXPECTED_HINT


def test_local_runner_fixture_matches_what_job_log_entry_produces():
    fixture = parse_push(load_event("ml_job_local_runner_push.json")).json()
    live = events.job_log_entry("1234567890123456789", "SUCCEEDED", "Job completed successfully.", "embedpipe-local")
    assert sorted(fixture) == sorted(live)
    for key in ("logName", "resource", "labels", "textPayload", "severity"):
        assert fixture[key] == live[key], key


def test_job_log_entry_round_trips_through_the_parser():
    entry = events.job_log_entry("42", "failed", "boom", "p")
    msg = parse_push(push_event(json.dumps(entry).encode(), topic="job-events"))
    assert parse_job_log_entry(msg) == JobStateHint("42", "FAILED", "boom")
    assert entry["severity"] == "ERROR"


def test_parse_job_log_entry_reads_json_payload_message_and_missing_state():
    entry = {"resource": {"type": "ml_job", "labels": {"job_id": "7"}}, "jsonPayload": {"message": "Job is running."}}
    msg = parse_push(push_event(json.dumps(entry).encode(), topic="job-events"))
    assert parse_job_log_entry(msg) == JobStateHint("7", None, "Job is running.")


def test_parse_job_log_entry_rejects_other_resource_types():
    entry = {"resource": {"type": "gce_instance", "labels": {"instance_id": "1"}}, "textPayload": "hi"}
    msg = parse_push(push_event(json.dumps(entry).encode(), topic="job-events", message_id="3"))
    with pytest.raises(EventError, match="message 3: not an ml_job LogEntry"):
        parse_job_log_entry(msg)


def test_parse_job_log_entry_requires_a_job_id():
    entry = {"resource": {"type": "ml_job", "labels": {}}, "labels": {events.JOB_STATE_LABEL: "SUCCEEDED"}}
    msg = parse_push(push_event(json.dumps(entry).encode(), topic="job-events"))
    with pytest.raises(EventError, match="without resource.labels.job_id"):
        parse_job_log_entry(msg)


def test_parse_job_log_entry_rejects_a_body_that_is_not_an_object():
    msg = parse_push(push_event(b'["ml_job"]', topic="job-events"))
    with pytest.raises(EventError):
        parse_job_log_entry(msg)


# ---------------------------------------------------------------- outgoing events


def test_event_pubsub_round_trip_uses_ce_attributes():
    event = Event(RUN_FAILED, {"run_id": "r1", "dataset": "demo"}, id="r1/failed", subject="r1")
    data, attrs = event.to_pubsub()
    assert attrs == {
        "ce-specversion": "1.0",
        "ce-type": RUN_FAILED,
        "ce-source": "//embedpipe",
        "ce-id": "r1/failed",
        "ce-time": event.time,
        "ce-subject": "r1",
        "content-type": "application/json",
    }
    assert json.loads(data) == {"run_id": "r1", "dataset": "demo"}
    assert Event.from_pubsub(data, attrs) == event


def test_event_without_subject_has_no_subject_attribute():
    data, attrs = Event(RUN_FAILED, {"a": 1}).to_pubsub()
    assert "ce-subject" not in attrs
    assert Event.from_pubsub(data, attrs).subject is None


def test_event_defaults_are_unique_ids_and_utc_times():
    a, b = Event(RUN_FAILED, {}), Event(RUN_FAILED, {})
    assert a.id != b.id
    assert a.time.endswith("Z") and "T" in a.time


def test_from_pubsub_requires_ce_type():
    with pytest.raises(EventError, match="no ce-type attribute"):
        Event.from_pubsub(b"{}", {"ce-id": "1"})


def test_to_structured_keys_and_round_trip():
    event = Event(INDEX_UPDATED, {"x": 1}, id="i", time="2024-01-01T00:00:00.000Z", subject="r")
    doc = event.to_structured()
    assert doc == {
        "specversion": "1.0",
        "type": INDEX_UPDATED,
        "source": "//embedpipe",
        "id": "i",
        "time": "2024-01-01T00:00:00.000Z",
        "datacontenttype": "application/json",
        "subject": "r",
        "data": {"x": 1},
    }
    assert Event.from_structured(doc) == event
    assert "subject" not in Event(INDEX_UPDATED, {}).to_structured()


def test_structured_event_is_a_valid_cloudevent():
    doc = Event(INDEX_UPDATED, {"x": 1}, id="i").to_structured()
    data = doc.pop("data")
    ce = CloudEvent(doc, data)
    assert (ce["type"], ce["id"], ce.data) == (INDEX_UPDATED, "i", {"x": 1})


# ---------------------------------------------------------------- schemas


METRICS = {"recall@1": 0.5, "recall@5": 0.8, "recall@10": 0.9, "recall@100": 1.0, "mrr@10": 0.6, "ndcg@10": 0.7}


def index_updated_payload() -> dict:
    return {
        "run_id": "20241126t090405-abc123",
        "dataset": "demo",
        "kind": "full",
        "promoted": True,
        "alias": "demo",
        "collection": "demo__20241126t090405_abc123",
        "model": {"uri": "gs://embedpipe-artifacts/runs/r/model/", "version": "r", "dim": 384, "fingerprint": "f"},
        "counts": {"upserted": 1220, "deleted": 0, "unchanged": 0, "total": 1220},
        "metrics": METRICS,
        "previous_metrics": None,
        "stage_seconds": {"train": 12.5, "embed": 3.0, "index": 1.25},
        "report_uri": "gs://embedpipe-artifacts/runs/r/report.html",
        "trigger": {"type": "upload", "dataset": "demo"},
    }


def test_valid_index_updated_payload_passes():
    events.validate(Event(INDEX_UPDATED, index_updated_payload()))


def test_index_updated_payload_without_metrics_fails():
    payload = index_updated_payload()
    del payload["metrics"]
    with pytest.raises(jsonschema.ValidationError, match="'metrics' is a required property"):
        events.validate(Event(INDEX_UPDATED, payload))


def test_index_updated_metrics_need_every_metric_key():
    payload = index_updated_payload()
    payload["metrics"] = {k: v for k, v in METRICS.items() if k != "ndcg@10"}
    with pytest.raises(jsonschema.ValidationError):
        events.validate(Event(INDEX_UPDATED, payload))


def test_run_failed_schema():
    events.validate(Event(RUN_FAILED, {"run_id": "r", "dataset": "d", "stage": "train", "cause": "x"}))
    with pytest.raises(jsonschema.ValidationError, match="'cause' is a required property"):
        events.validate(Event(RUN_FAILED, {"run_id": "r", "dataset": "d", "stage": "train"}))


def test_types_without_a_schema_are_not_validated():
    events.validate(Event(events.RUN_STAGE, {"anything": object.__name__}))


def test_shipped_schemas_are_valid_json_schemas():
    for event_type in (INDEX_UPDATED, RUN_FAILED):
        schema = events.schema(event_type)
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$id"] == event_type


def test_fixture_payloads_are_base64_of_json():
    # A guard on the fixtures themselves: push payloads carry base64-encoded JSON, as Pub/Sub delivers them.
    for name in FIXTURES:
        ce = load_event(name)
        if ce["type"] == events.PUBSUB_PUBLISHED:
            json.loads(base64.b64decode(ce.data["message"]["data"], validate=True))


@pytest.mark.parametrize(
    "body", [b"[" * 200_000 + b"]" * 200_000, b'{"dataset": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"]
)
def test_a_message_nested_past_the_parser_stack_is_a_malformed_event_not_a_crash(body):
    """A RecursionError escaping the handler is a 500 (redelivered until dead-lettered); it is a bad message."""
    with pytest.raises(events.EventError, match="not JSON"):
        events.parse_retrain(events.parse_push(push_event(body, topic="retrain-requests")))
    with pytest.raises(events.EventError, match="not usable JSON"):
        events.Event.from_pubsub(body, {"ce-type": "io.embedpipe.index.updated.v1"})


def test_trigger_keys_have_one_constructor_each():
    change = events.ObjectChange("b", "datasets/demo/corpus.jsonl", 7, "OBJECT_FINALIZE")
    assert change.key == events.object_key("b", "datasets/demo/corpus.jsonl", 7) == "gcs/b/datasets/demo/corpus.jsonl#7"
    assert events.object_uri_key("gs://b/datasets/demo/corpus.jsonl", 7) == change.key
    assert events.retrain_key("42") == "pubsub/retrain/42"


def test_a_retrain_request_id_keys_the_request_instead_of_the_message_id():
    """Message ids repeat where the publisher's counter restarts (the local emulator's, while the ledger lives on):
    the CLI's request id is the key; a malformed one is refused."""

    def message(body: dict, mid: str = "1") -> events.PushMessage:
        return events.PushMessage(json.dumps(body).encode(), {}, mid, "2026-12-07T00:00:00Z", None)

    keyed = events.parse_retrain(message({"dataset": "d", "request_id": "0123456789abcdef"}))
    assert keyed.key == events.request_key("0123456789abcdef") != events.retrain_key("1")
    assert events.parse_retrain(message({"dataset": "d"})).key == events.retrain_key("1")
    for bad in ("short", "x" * 129, "has space in it", 12345678):
        with pytest.raises(events.EventError, match="request_id"):
            events.parse_retrain(message({"dataset": "d", "request_id": bad}))
