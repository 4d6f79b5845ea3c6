"""In-memory stand-ins for the unit tier: a GCS-like JSON store with generations, a job launcher, a clock."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloudevents.http import CloudEvent

from embedpipe.gcp.storage import PreconditionFailed
from embedpipe.jobs.spec import JobSpec, JobStatus

EVENTS_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "events"


class FakeStore:
    """The ``runs.Store`` protocol over a dict, with GCS semantics for generations.

    Every write gives the object a new, higher generation; ``if_generation_match=0`` means "must not exist" and any
    other number must equal the current generation, else ``PreconditionFailed``. Documents are kept as JSON text, so
    a caller can never mutate stored state through a reference (as with the real bucket).

    ``interleave(op, uri_part, fn)`` runs ``fn`` once, just before the next ``op`` ("read" | "write") on a URI that
    contains ``uri_part``: the way a test injects a concurrent writer between a read and its compare-and-set.
    """

    def __init__(self) -> None:
        self.objects: dict[str, tuple[str, int]] = {}
        self._generation = 1000
        self.conflicts = 0  # writes refused with PreconditionFailed
        self._hooks: list[tuple[str, str, Callable[[], None]]] = []

    # ---------------------------------------------------------------- hooks
    def interleave(self, op: str, uri_part: str, fn: Callable[[], None]) -> None:
        self._hooks.append((op, uri_part, fn))

    def _fire(self, op: str, uri: str) -> None:
        for hook in list(self._hooks):
            if hook[0] == op and hook[1] in uri:
                self._hooks.remove(hook)
                hook[2]()

    # ---------------------------------------------------------------- Store protocol
    def read_json_gen(self, uri: str) -> tuple[Any, int]:
        self._fire("read", uri)
        if uri not in self.objects:
            return None, 0
        text, generation = self.objects[uri]
        return json.loads(text), generation

    def write_json(self, uri: str, obj: Any, if_generation_match: int | None = None) -> int:
        self._fire("write", uri)
        current = self.objects.get(uri, (None, 0))[1]
        if if_generation_match is not None and if_generation_match != current:
            self.conflicts += 1
            raise PreconditionFailed(uri)
        self._generation += 1
        self.objects[uri] = (json.dumps(obj, sort_keys=True), self._generation)
        return self._generation

    def delete(self, uri: str) -> None:
        self.objects.pop(uri, None)

    def list_uris(self, prefix_uri: str):
        for uri in sorted(self.objects):
            if uri.startswith(prefix_uri):
                yield uri, self.objects[uri][1]

    # ---------------------------------------------------------------- test helpers
    def uris(self, part: str = "") -> list[str]:
        return sorted(u for u in self.objects if part in u)

    def doc(self, uri: str) -> Any:
        return json.loads(self.objects[uri][0])


class FakeLauncher:
    """``JobLauncher`` that records submits; a test ends jobs with ``finish``. Keyed like the real ones: the same
    ``JobSpec.key`` maps to the same job name."""

    def __init__(self, project: str = "embedpipe-local"):
        self.project = project
        self.submits: list[JobSpec] = []
        self.jobs: dict[str, JobStatus] = {}

    def name_for(self, job_id: str) -> str:
        return f"projects/{self.project}/locations/us-central1/customJobs/{job_id}"

    def submit(self, spec: JobSpec) -> str:
        self.submits.append(spec)
        name = self.name_for(spec.job_id)
        self.jobs.setdefault(name, JobStatus(name, "QUEUED", dict(spec.labels)))
        return name

    def get(self, name: str) -> JobStatus:
        return self.jobs[name]  # KeyError for a job we never submitted, like a 404

    def cancel(self, name: str) -> None:
        self.finish(name, "CANCELLED", "cancelled")

    def finish(self, name: str, state: str, error: str = "") -> JobStatus:
        self.jobs[name] = dataclasses.replace(self.jobs[name], state=state, error=error)
        return self.jobs[name]

    def stage_submits(self, stage: str) -> list[JobSpec]:
        return [s for s in self.submits if s.labels.get("stage") == stage]


class Clock:
    """A settable wall clock, a stand-in for ``time.time`` passed as ``clock=`` (Ledger, Lifecycle, Pipeline)."""

    def __init__(self, start: float = 1_750_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def load_event(name: str) -> CloudEvent:
    """A fixture from ``tests/fixtures/events/`` (CloudEvents structured JSON) as functions-framework hands it over."""
    doc = json.loads((EVENTS_DIR / name).read_text())
    data = doc.pop("data")
    return CloudEvent(doc, data)


def push_event(body: bytes, attributes: dict | None = None, topic: str = "data-events", message_id: str = "1"):
    """A messagePublished CloudEvent as functions-framework builds it from a push to .../projects/P/topics/T."""
    return CloudEvent(
        {
            "type": "google.cloud.pubsub.topic.v1.messagePublished",
            "source": f"//pubsub.googleapis.com/projects/embedpipe-local/topics/{topic}",
            "id": message_id,
            "specversion": "1.0",
        },
        {
            "message": {
                "data": base64.b64encode(body).decode(),
                "attributes": attributes or {},
                "messageId": message_id,
                "publishTime": "2024-11-26T09:00:00.000Z",
            },
            "subscription": f"projects/embedpipe-local/subscriptions/{topic}-push",
        },
    )


class FakeMilvus:
    """The few ``MilvusClient`` calls aliases and collection properties need: collections with properties, one
    alias each at most. ``vectorstore``'s functions run on it unchanged."""

    def __init__(self) -> None:
        self.collections: dict[str, dict] = {}
        self.aliases: dict[str, str] = {}  # alias -> collection

    def add(self, name: str, fingerprint: str, dim: int) -> None:
        self.collections[name] = {"embedpipe.fingerprint": fingerprint, "embedpipe.dim": str(dim)}

    def has_collection(self, name: str) -> bool:
        return name in self.collections

    def describe_collection(self, name: str) -> dict:
        return {"properties": dict(self.collections[name])}

    def list_collections(self) -> list[str]:
        return sorted(self.collections)

    def list_aliases(self, collection_name: str) -> dict:
        return {"aliases": [a for a, c in self.aliases.items() if c == collection_name]}

    def create_alias(self, collection_name: str, alias: str) -> None:
        assert alias not in self.aliases
        self.aliases[alias] = collection_name

    def alter_alias(self, collection_name: str, alias: str) -> None:
        assert alias in self.aliases
        self.aliases[alias] = collection_name

    def drop_collection(self, name: str) -> None:
        self.collections.pop(name)
