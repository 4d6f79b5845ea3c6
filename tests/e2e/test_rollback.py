"""``embedpipe rollback`` on a local stack the test starts and stops: two promoted runs of a tiny dataset, then the
alias, the ledger, the published index-updated and the search service all go back to the first; a second rollback
is a no-op; a rollback to a collection that was dropped is refused."""

from __future__ import annotations

import json

import pytest

from embedpipe.contracts.events import Event, validate
from embedpipe.ledger.runs import Ledger
from embedpipe.retrieval import vectorstore
from tests.helpers import FIXTURES, cli, cli_stack, isolated_settings, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def rollback_stack(tmp_path_factory, tiny_model):
    settings = isolated_settings(tmp_path_factory.mktemp("rollback-state"), tiny_model)  # gate open: both promote
    with cli_stack(settings) as env:
        yield settings, env


def served_collection(env: dict) -> str:
    found = cli(env, "search", "rain", "--dataset", "tiny", "-k", "1", "--json")
    assert found.returncode == 0, found.stderr
    return json.loads(found.stdout)["collection"]


def test_rollback_goes_back_to_the_previous_index_once_and_refuses_a_dropped_one(rollback_stack):
    settings, env = rollback_stack
    first = cli(env, "upload", str(FIXTURES / "tiny_beir"), "--dataset", "tiny", "--wait", "--timeout", "300")
    assert first.returncode == 0, first.stderr[-3000:]
    a = json.loads(first.stdout)["data"]
    second = cli(env, "retrain", "--dataset", "tiny", "--set", "max_steps=2", "--wait", "--timeout", "300")
    assert second.returncode == 0, second.stderr[-3000:]
    b = json.loads(second.stdout)["data"]
    assert a["promoted"] and b["promoted"] and a["collection"] != b["collection"]
    assert served_collection(env) == b["collection"]  # the search service has B loaded and must follow

    result = cli(env, "rollback", "--dataset", "tiny", "--reason", "e2e")
    assert result.returncode == 0, result.stderr[-3000:]
    event = json.loads(result.stdout)
    validate(Event.from_structured(event))
    data = event["data"]
    assert event["id"] == "tiny/rollback/1" and data["collection"] == a["collection"] and data["promoted"]
    assert data["rollback"]["from_collection"] == b["collection"] and data["rollback"]["reason"] == "e2e"
    assert data["model"]["fingerprint"] == a["model"]["fingerprint"]
    client = vectorstore.connect(settings.milvus_uri)
    assert vectorstore.alias_target(client, "tiny") == a["collection"]
    state = Ledger(settings.artifacts_bucket).get_dataset("tiny")
    assert state["promoted"]["collection"] == a["collection"] and state["promoted"]["updated_by"] == a["run_id"]
    assert [r["id"] for r in state["rollbacks"]] == ["tiny/rollback/1"] and state["rollbacks"][0]["done_at"]

    published = [json.loads(line) for line in cli(env, "events").stdout.splitlines() if line.strip()]
    assert [e["id"] for e in published if (e.get("data") or {}).get("rollback")] == ["tiny/rollback/1"]
    wait_for(lambda: served_collection(env) == a["collection"], 60, "search to follow the rollback")

    again = cli(env, "rollback", "--dataset", "tiny")
    assert again.returncode == 0 and not again.stdout.strip() and "nothing to do" in again.stderr
    assert len(Ledger(settings.artifacts_bucket).get_dataset("tiny")["rollbacks"]) == 1

    client.drop_collection(b["collection"])
    refused = cli(env, "rollback", "--dataset", "tiny", "--to", b["run_id"])
    assert refused.returncode == 1
    assert f"cannot roll back to {b['collection']}: the collection no longer exists" in refused.stderr
    assert vectorstore.alias_target(client, "tiny") == a["collection"]
