"""Pub/Sub: publishing our CloudEvents, and applying the topology's topics and push subscriptions."""

from __future__ import annotations

import functools
import logging

from google.api_core import exceptions as gexc

from embedpipe import topology
from embedpipe.config import Platform
from embedpipe.contracts.events import Event
from embedpipe.gcp.retries import transient

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=2)
def _publisher(emulator: str | None):
    from google.cloud import pubsub_v1

    # Every publish here is one message whose ack is waited for (``publish``, ``publish_raw``): nothing ever joins a
    # batch, so the client's default batching only held each message for its 10 ms ``max_latency`` before sending.
    # A batch of one is sent at once (measured on the emulator: 17 -> 5 ms a publish; four are on every run's path:
    # two job events, the index request, index-updated).
    return pubsub_v1.PublisherClient(batch_settings=pubsub_v1.types.BatchSettings(max_messages=1))


def publisher():
    return _publisher(Platform.from_env().pubsub_emulator_host or None)


def topic_path(project: str, topic: str) -> str:
    return f"projects/{project}/topics/{topic}"


@transient
def publish(project: str, topic: str, event: Event, timeout: float = 30.0) -> str:
    """Publish one CloudEvent and wait for the server's ack; returns the message id."""
    data, attrs = event.to_pubsub()
    future = publisher().publish(topic_path(project, topic), data, **attrs)
    message_id = future.result(timeout=timeout)
    log.debug("published %s id=%s to %s", event.type, event.id, topic)
    return message_id


@transient
def publish_raw(project: str, topic: str, data: bytes, timeout: float = 30.0, **attrs: str) -> str:
    return publisher().publish(topic_path(project, topic), data, **attrs).result(timeout=timeout)


def push_endpoint(base_url: str, project: str, topic: str) -> str:
    # The /projects/P/topics/T path makes functions-framework set the CloudEvent source to the topic.
    return f"{base_url.rstrip('/')}/projects/{project}/topics/{topic}"


def apply_topology(project: str, endpoints: dict[str, str] | None) -> None:
    """Create every topic, dead-letter topic and push subscription (idempotent). ``endpoints``: component -> URL;
    None creates the topics only (tests that drive functions directly)."""
    from google.cloud import pubsub_v1
    from google.protobuf import duration_pb2

    pub = publisher()
    for topic in (*topology.TOPICS, *topology.dead_letter_topics()):
        try:
            pub.create_topic(name=topic_path(project, topic))
        except gexc.AlreadyExists:
            pass
    sub = pubsub_v1.SubscriberClient()
    try:
        for c in topology.COMPONENTS:
            if not c.topic or endpoints is None:
                continue
            request = {
                "name": f"projects/{project}/subscriptions/{c.subscription}",
                "topic": topic_path(project, c.topic),
                "push_config": {"push_endpoint": push_endpoint(endpoints[c.name], project, c.topic)},
                "ack_deadline_seconds": c.ack_deadline_s,
                "retry_policy": {
                    "minimum_backoff": duration_pb2.Duration(seconds=topology.RETRY_MIN_BACKOFF_S),
                    "maximum_backoff": duration_pb2.Duration(seconds=topology.RETRY_MAX_BACKOFF_S),
                },
                "dead_letter_policy": {
                    "dead_letter_topic": topic_path(project, c.dead_letter_topic),
                    "max_delivery_attempts": c.max_delivery_attempts,
                },
            }
            try:
                sub.create_subscription(request=request)
            except gexc.AlreadyExists:
                pass
    finally:
        sub.close()


def ensure_pull_subscription(project: str, topic: str, name: str) -> str:
    from google.cloud import pubsub_v1

    path = f"projects/{project}/subscriptions/{name}"
    sub = pubsub_v1.SubscriberClient()
    try:
        sub.create_subscription(name=path, topic=topic_path(project, topic))
    except gexc.AlreadyExists:
        pass
    finally:
        sub.close()
    return path


def pull(
    subscription: str, max_messages: int = 100, timeout: float = 5.0, ack: bool = True
) -> list[tuple[bytes, dict, str]]:
    """Pull a batch, acked unless ``ack=False`` (the messages come back after their ack deadline):
    (data, attributes, message_id)."""
    from google.cloud import pubsub_v1

    sub = pubsub_v1.SubscriberClient()
    try:
        try:
            resp = sub.pull(subscription=subscription, max_messages=max_messages, timeout=timeout)
        except gexc.DeadlineExceeded:
            return []
        if ack and resp.received_messages:
            sub.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in resp.received_messages])
        return [(m.message.data, dict(m.message.attributes), m.message.message_id) for m in resp.received_messages]
    finally:
        sub.close()
