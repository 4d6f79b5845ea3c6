"""The deployment topology, defined once: topics, the push-fed components and their subscriptions.

``embedpipe up`` applies it to the Pub/Sub emulator and starts each component as a functions-framework process;
a GCP deploy applies the same list to a project (see ``deploy/``).
"""

from __future__ import annotations

from dataclasses import dataclass

DATA_EVENTS = "data-events"
RETRAIN_REQUESTS = "retrain-requests"
JOB_EVENTS = "job-events"
INDEX_REQUESTS = "index-requests"
INDEX_UPDATED = "index-updated"
RUN_EVENTS = "run-events"
RECONCILE_TICKS = "reconcile-ticks"

TOPICS = (DATA_EVENTS, RETRAIN_REQUESTS, JOB_EVENTS, INDEX_REQUESTS, INDEX_UPDATED, RUN_EVENTS, RECONCILE_TICKS)


@dataclass(frozen=True)
class Component:
    """One functions-framework target: a Cloud Function or a Cloud Run service."""

    name: str
    path: str  # relative to the repo root
    target: str
    signature: str  # cloudevent | http
    topic: str | None  # push-fed from this topic, or None for plain HTTP
    ack_deadline_s: int = 60
    max_delivery_attempts: int = 5

    @property
    def subscription(self) -> str:
        return f"{self.name}-push"

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.name}-dlq"


COMPONENTS = (
    Component("on-data-uploaded", "functions/on_data_uploaded/main.py", "on_data_uploaded", "cloudevent", DATA_EVENTS),
    Component(
        "on-retrain-requested",
        "functions/on_retrain_requested/main.py",
        "on_retrain_requested",
        "cloudevent",
        RETRAIN_REQUESTS,
    ),
    Component("on-job-event", "functions/on_job_event/main.py", "on_job_event", "cloudevent", JOB_EVENTS),
    Component("reconcile", "functions/reconcile/main.py", "reconcile", "cloudevent", RECONCILE_TICKS),
    # Long upserts and evaluation: a Cloud Run service, so the push ack deadline is the maximum.
    Component("indexer", "services/indexer/main.py", "index", "cloudevent", INDEX_REQUESTS, ack_deadline_s=600),
    Component("search", "services/search/main.py", "search", "http", None),
)

# Retry policy for push subscriptions: without one the emulator redelivers a failing message every second forever.
RETRY_MIN_BACKOFF_S = 1
RETRY_MAX_BACKOFF_S = 30


def dead_letter_topics() -> list[str]:
    return [c.dead_letter_topic for c in COMPONENTS if c.topic]


def component(name: str) -> Component:
    for c in COMPONENTS:
        if c.name == name:
            return c
    raise KeyError(name)
