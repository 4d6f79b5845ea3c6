"""embedpipe.cli: behaviour that needs no stack (the e2e tests drive the rest through the real CLI)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from embedpipe import cli, topology
from embedpipe.gcp import bus


def test_events_leaves_cloud_dead_letters_in_their_subscription_and_shows_each_once(monkeypatch, tmp_path):
    """In the cloud the <dlq>-log subscription is the only copy of a dead letter: reading it must not delete it for
    the next reader, and a message that comes back after its ack deadline is not shown twice."""
    monkeypatch.setenv("EMBEDPIPE_MODE", "gcp")
    monkeypatch.setenv("EMBEDPIPE_PROJECT", "demo-project")
    for image in ("TRAINER", "EMBEDDER"):
        monkeypatch.setenv(f"EMBEDPIPE_{image}_IMAGE", f"r-docker.pkg.dev/demo-project/embedpipe/{image.lower()}:x")
    monkeypatch.setenv("EMBEDPIPE_STATE_DIR", str(tmp_path))
    dlq = topology.log_subscription(topology.dead_letter_topics()[0])
    pulls = []

    def pull(subscription, timeout=5.0, ack=True, max_messages=100):
        pulls.append((subscription.rsplit("/", 1)[1], ack))
        return [(b"not a cloudevent", {}, "m-1")] if subscription.endswith("/" + dlq) else []

    monkeypatch.setattr(bus, "pull", pull)
    first = CliRunner().invoke(cli.app, ["events"])
    second = CliRunner().invoke(cli.app, ["events"])
    assert first.exit_code == second.exit_code == 0, first.output
    acks = dict(pulls)
    assert acks[dlq] is False, "a dead letter was acknowledged (deleted) in the cloud"
    assert acks[topology.log_subscription(topology.INDEX_UPDATED)] is True
    shown = [json.loads(line) for line in second.output.splitlines()]
    assert [d["message_id"] for d in shown] == ["m-1"], "shown once, though pulled twice"
