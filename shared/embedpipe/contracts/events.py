"""Event contracts: what we publish (CloudEvents over Pub/Sub) and how we parse what we receive.

Outgoing: CloudEvents Pub/Sub binding, attributes ``ce-specversion``, ``ce-type``, ``ce-source``, ``ce-id``,
``ce-time`` and a JSON body. Payload JSON Schemas ship in ``embedpipe/contracts/schemas/`` for subscribers.
Incoming: functions-framework hands every push delivery to us as a ``messagePublished`` CloudEvent; GCS changes
may also arrive straight from Eventarc as ``google.cloud.storage.object.v1.finalized``. Numbers may be strings.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
import uuid
from dataclasses import dataclass, field
from functools import cache
from typing import Any

SPECVERSION = "1.0"
SOURCE = "//embedpipe"

INDEX_UPDATED = "io.embedpipe.index.updated.v1"
RUN_FAILED = "io.embedpipe.run.failed.v1"
RUN_STAGE = "io.embedpipe.run.stage.v1"
INDEX_REQUESTED = "io.embedpipe.index.requested.v1"
RETRAIN_REQUESTED = "io.embedpipe.retrain.requested.v1"
TICK = "io.embedpipe.tick.v1"

PUBSUB_PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"
GCS_FINALIZED = "google.cloud.storage.object.v1.finalized"

_SCHEMAS = {INDEX_UPDATED: "index_updated.v1.json", RUN_FAILED: "run_failed.v1.json"}


class EventError(ValueError):
    """An incoming event that can never be processed (retrying will not help)."""


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- outgoing


@dataclass(frozen=True)
class Event:
    """One CloudEvent we publish. ``id`` is deterministic where a retry must not look like a new event."""

    type: str
    data: dict
    source: str = SOURCE
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    time: str = field(default_factory=now_iso)
    subject: str | None = None

    def to_pubsub(self) -> tuple[bytes, dict[str, str]]:
        attrs = {
            "ce-specversion": SPECVERSION,
            "ce-type": self.type,
            "ce-source": self.source,
            "ce-id": self.id,
            "ce-time": self.time,
            "content-type": "application/json",
        }
        if self.subject:
            attrs["ce-subject"] = self.subject
        return json.dumps(self.data, sort_keys=True).encode(), attrs

    def to_structured(self) -> dict:
        """The CloudEvents JSON format: attributes at the top, the payload under ``data``."""
        out = {
            "specversion": SPECVERSION,
            "type": self.type,
            "source": self.source,
            "id": self.id,
            "time": self.time,
            "datacontenttype": "application/json",
            "data": self.data,
        }
        if self.subject:
            out["subject"] = self.subject
        return out

    @classmethod
    def from_structured(cls, doc: dict) -> Event:
        return cls(
            type=doc["type"],
            data=doc.get("data") or {},
            source=doc["source"],
            id=doc["id"],
            time=doc.get("time") or now_iso(),
            subject=doc.get("subject"),
        )

    @classmethod
    def from_pubsub(cls, data: bytes, attrs: dict[str, str]) -> Event:
        if "ce-type" not in attrs:
            raise EventError(f"message has no ce-type attribute: {sorted(attrs)}")
        try:
            body = json.loads(data or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # nested past the parser's stack
            raise EventError(f"{attrs['ce-type']} message body is not usable JSON: {str(exc)[:200]}") from None
        return cls(
            type=attrs["ce-type"],
            data=body,
            source=attrs.get("ce-source", ""),
            id=attrs.get("ce-id", ""),
            time=attrs.get("ce-time", ""),
            subject=attrs.get("ce-subject"),
        )


@cache
def schema(event_type: str) -> dict:
    from importlib import resources  # ~20 ms, for the few processes that validate (not every importer)

    name = _SCHEMAS[event_type]
    return json.loads(resources.files("embedpipe.contracts.schemas").joinpath(name).read_text())


@cache
def _validator(event_type: str):
    """The schema's validator, the schema itself checked once (``jsonschema.validate`` re-checks it on every call)."""
    import jsonschema

    found = schema(event_type)
    cls = jsonschema.validators.validator_for(found)
    cls.check_schema(found)
    return cls(found)


def validate(event: Event) -> None:
    """Check a payload against its shipped JSON Schema (only types that have one); raises
    ``jsonschema.ValidationError`` (the most relevant error, as ``jsonschema.validate`` does)."""
    if event.type in _SCHEMAS:
        import jsonschema

        error = jsonschema.exceptions.best_match(_validator(event.type).iter_errors(event.data))
        if error is not None:
            raise error


# ---------------------------------------------------------------- incoming


@dataclass(frozen=True)
class PushMessage:
    """A Pub/Sub message as a push subscription delivers it."""

    data: bytes
    attributes: dict[str, str]
    message_id: str
    publish_time: str
    topic: str | None  # from the push URL path /projects/P/topics/T, when the subscription set it

    def json(self) -> Any:
        try:
            return json.loads(self.data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # nested past the parser's stack
            raise EventError(f"message {self.message_id}: body is not JSON: {exc}") from None


def parse_push(cloud_event) -> PushMessage:
    """A functions-framework CloudEvent of type messagePublished -> PushMessage."""
    ce_type = cloud_event["type"]
    if ce_type != PUBSUB_PUBLISHED:
        raise EventError(f"expected {PUBSUB_PUBLISHED}, got {ce_type}")
    msg = (cloud_event.data or {}).get("message")
    if not isinstance(msg, dict):
        raise EventError("messagePublished event without data.message")
    try:
        data = base64.b64decode(msg.get("data") or "", validate=True)
    except binascii.Error as exc:
        raise EventError(f"message {msg.get('messageId')}: data is not base64: {exc}") from None
    source = cloud_event["source"] or ""
    topic = source.rsplit("/topics/", 1)[1] if "/topics/" in source else None
    return PushMessage(
        data=data,
        attributes=dict(msg.get("attributes") or {}),
        message_id=str(msg.get("messageId") or msg.get("message_id") or ""),
        publish_time=str(msg.get("publishTime") or msg.get("publish_time") or ""),
        topic=topic,
    )


def object_key(bucket: str, name: str, generation: int) -> str:
    """The trigger key of one object version (``gs://bucket/name`` at ``generation``): what an upload claims."""
    return f"gcs/{bucket}/{name}#{generation}"


def object_uri_key(uri: str, generation: int) -> str:
    """``object_key`` of a ``gs://bucket/name`` URI."""
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    return object_key(bucket, name, generation)


def retrain_key(message_id: str) -> str:
    """The trigger key of a retrain message: one per Pub/Sub message id (a redelivery finds its claim)."""
    return f"pubsub/retrain/{message_id}"


REQUEST_ID = re.compile(r"[A-Za-z0-9_.-]{8,128}")


def request_key(request_id: str) -> str:
    """The trigger key of a retrain message that names its own ``request_id`` (the CLI sends a UUID): message ids
    alone repeat where the publisher's counter restarts (the local emulator numbers from 1 in each process, while the
    ledger outlives it), and a publisher that resends a request on purpose wants it done once."""
    return f"pubsub/retrain/request/{request_id}"


@dataclass(frozen=True)
class ObjectChange:
    bucket: str
    name: str
    generation: int
    event_type: str  # OBJECT_FINALIZE, OBJECT_DELETE, ...
    size: int | None = None

    @property
    def key(self) -> str:
        """The trigger key the ledger claims: one per object version."""
        return object_key(self.bucket, self.name, self.generation)


def _int(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise EventError(f"{what} is not an integer: {value!r}") from None


def parse_object_change(cloud_event) -> ObjectChange:
    """GCS change from a Pub/Sub notification (push) or straight from Eventarc."""
    if cloud_event["type"] == GCS_FINALIZED:
        obj = cloud_event.data or {}
        return ObjectChange(
            bucket=obj["bucket"],
            name=obj["name"],
            generation=_int(obj.get("generation"), "generation"),
            event_type="OBJECT_FINALIZE",
            size=_int(obj["size"], "size") if obj.get("size") is not None else None,
        )
    msg = parse_push(cloud_event)
    a = msg.attributes
    if "bucketId" not in a or "objectId" not in a:
        raise EventError(f"message {msg.message_id} is not a GCS notification: attributes {sorted(a)}")
    size = None
    if msg.data:
        try:
            body = json.loads(msg.data)
            size = _int(body["size"], "size") if body.get("size") is not None else None
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            size = None
    return ObjectChange(
        bucket=a["bucketId"],
        name=a["objectId"],
        generation=_int(a.get("objectGeneration"), "objectGeneration"),
        event_type=a.get("eventType", "OBJECT_FINALIZE"),
        size=size,
    )


@dataclass(frozen=True)
class RetrainRequest:
    dataset: str
    overrides: dict
    hp_tuning: dict | None
    reason: str
    key: str
    refresh: bool = False  # the data changed (a BigQuery table): re-read it; no new training when an index is live
    allow_shrink: bool = False  # the user confirms the new index may serve fewer documents than the live one


def parse_retrain(msg: PushMessage) -> RetrainRequest:
    body = msg.json()
    if not isinstance(body, dict) or not isinstance(body.get("dataset"), str) or not body["dataset"]:
        raise EventError(f"retrain message {msg.message_id}: needs a JSON object with a 'dataset' string")
    overrides = body.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise EventError(f"retrain message {msg.message_id}: 'overrides' must be an object")
    refresh = body.get("refresh", False)
    if not isinstance(refresh, bool):
        raise EventError(f"retrain message {msg.message_id}: 'refresh' must be true or false")
    if refresh and (overrides or body.get("hp_tuning")):
        raise EventError(f"retrain message {msg.message_id}: a refresh does not train: no overrides or hp_tuning")
    allow_shrink = body.get("allow_shrink", False)
    if not isinstance(allow_shrink, bool):
        raise EventError(f"retrain message {msg.message_id}: 'allow_shrink' must be true or false")
    if refresh and allow_shrink:
        raise EventError(f"retrain message {msg.message_id}: 'allow_shrink' goes with a retrain, not a refresh")
    request_id = body.get("request_id")
    if request_id is not None and not (isinstance(request_id, str) and REQUEST_ID.fullmatch(request_id)):
        raise EventError(f"retrain message {msg.message_id}: 'request_id' must be 8-128 of [A-Za-z0-9_.-]")
    return RetrainRequest(
        dataset=body["dataset"],
        overrides=overrides,
        hp_tuning=body.get("hp_tuning"),
        reason=str(body.get("reason") or ("data changed" if refresh else "retrain requested")),
        key=request_key(request_id) if request_id else retrain_key(msg.message_id),
        refresh=refresh,
        allow_shrink=allow_shrink,
    )


TERMINAL_JOB_STATES = ("SUCCEEDED", "FAILED", "CANCELLED", "PARTIALLY_SUCCEEDED", "EXPIRED")
JOB_STATE_LABEL = "ml.googleapis.com/job_state"


@dataclass(frozen=True)
class JobStateHint:
    """What an ml_job LogEntry says about a job. A hint only: confirm with JobLauncher.get."""

    job_id: str
    state: str | None
    message: str


def parse_job_log_entry(msg: PushMessage) -> JobStateHint:
    """One parser for Cloud Logging sink entries and the local job runner's (same LogEntry shape)."""
    entry = msg.json()
    if not isinstance(entry, dict):
        raise EventError(f"message {msg.message_id}: a LogEntry must be a JSON object, got {type(entry).__name__}")
    resource = entry.get("resource") or {}
    if resource.get("type") != "ml_job":
        raise EventError(f"message {msg.message_id}: not an ml_job LogEntry (resource.type={resource.get('type')!r})")
    job_id = str((resource.get("labels") or {}).get("job_id") or "")
    if not job_id:
        raise EventError(f"message {msg.message_id}: ml_job LogEntry without resource.labels.job_id")
    labels = entry.get("labels") or {}
    text = entry.get("textPayload") or (entry.get("jsonPayload") or {}).get("message") or ""
    state = labels.get(JOB_STATE_LABEL)
    return JobStateHint(job_id=job_id, state=state.upper() if state else None, message=text)


def job_log_entry(job_id: str, state: str, message: str, project: str) -> dict:
    """The LogEntry a Cloud Logging sink would route for a job that reached ``state`` (used by the local runner)."""
    return {
        "logName": f"projects/{project}/logs/ml.googleapis.com%2F{job_id}",
        "resource": {"type": "ml_job", "labels": {"job_id": job_id, "project_id": project, "task_name": "service"}},
        "labels": {JOB_STATE_LABEL: state},
        "textPayload": message,
        "severity": "INFO" if state == "SUCCEEDED" else "ERROR",
        "timestamp": now_iso(),
        "insertId": uuid.uuid4().hex[:16],
    }
