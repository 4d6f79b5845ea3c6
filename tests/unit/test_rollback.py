from __future__ import annotations

import pytest

from embedpipe.config import Settings
from embedpipe.contracts.events import Event, validate
from embedpipe.index import rollback
from embedpipe.ledger.runs import Ledger
from embedpipe.retrieval import vectorstore
from tests.unit.fakes import FakeMilvus, FakeStore

DS = "docs"
RUNS = ("20261130t100000-aaaaaa", "20261130t110000-bbbbbb", "20261130t120000-cccccc")
METRICS = {"recall@1": 0.5, "recall@5": 0.6, "recall@10": 0.7, "recall@100": 0.9, "mrr@10": 0.6, "ndcg@10": 0.6}


def entry(run_id: str, **extra) -> dict:
    return {
        "run_id": run_id,
        "collection": vectorstore.collection_name(DS, run_id),
        "model_uri": f"/models/{run_id}",
        "fingerprint": f"fp-{run_id[-6:]}",
        "dim": 8,
        "metrics": METRICS,
        "metrics_by_mode": {"dense": METRICS, "served": METRICS},
        "search": {"default_mode": "dense"},
        "schema": vectorstore.SCHEMA_VERSION,
        "updated_by": run_id,
        "hashes": f"gs://a/runs/{run_id}/hashes.parquet",
        "rows": 10,
        **extra,
    }


def promote_all(ledger: Ledger, client: FakeMilvus, *entries: dict, keep: int = 2) -> None:
    """What the indexer's promotion leaves: each entry live in turn, remembered, its collection aliased."""
    for e in entries:
        client.add(e["collection"], e["fingerprint"], e["dim"])
        vectorstore.point_alias(client, DS, e["collection"])
        ledger.update_dataset(
            DS, lambda st, e=e: {**st, "promoted": e, "promoted_entries": rollback.remember(st, e, keep + 1)}
        )


class World:
    def __init__(self) -> None:
        self.ledger = Ledger("a", FakeStore())
        self.client = FakeMilvus()
        self.published: list[tuple[str, Event]] = []
        self.a, self.b, self.c = (entry(r) for r in RUNS)

    def publish(self, topic: str, event: Event) -> None:
        self.published.append((topic, event))

    def rollback(self, **kw) -> rollback.Outcome:
        return rollback.rollback(Settings.from_env({}), self.ledger, self.client, self.publish, DS, by="me", **kw)

    def state(self) -> dict:
        return self.ledger.get_dataset(DS)


@pytest.fixture
def world() -> World:
    w = World()
    promote_all(w.ledger, w.client, w.a, w.b)
    return w


def test_the_default_target_is_the_index_the_newest_promotion_replaced(world):
    out = world.rollback(reason="bad answers")
    assert world.client.aliases[DS] == world.a["collection"]
    st = world.state()
    assert st["promoted"] == world.a
    assert [e["collection"] for e in st["promoted_entries"]] == [world.a["collection"], world.b["collection"]]
    assert st["promoted_entries"][1]["rolled_back"]["id"] == f"{DS}/rollback/1"
    (item,) = st["rollbacks"]
    assert item["from"] == {"collection": world.b["collection"], "run_id": RUNS[1]}
    assert item["to"] == {"collection": world.a["collection"], "run_id": RUNS[0]} and item["done_at"]
    ((topic, event),) = world.published
    assert topic == "index-updated" and event.id == f"{DS}/rollback/1" and out.event == event.to_structured()
    validate(event)
    d = event.data
    assert d["kind"] == "full" and d["promoted"] and d["collection"] == world.a["collection"]
    assert d["rollback"] == {
        "id": f"{DS}/rollback/1",
        "from_collection": world.b["collection"],
        "from_run_id": RUNS[1],
        "by": "me",
        "reason": "bad answers",
    }
    assert d["model"]["fingerprint"] == world.a["fingerprint"] and d["trigger"]["type"] == "rollback"


def test_a_second_rollback_is_a_no_op_and_publishes_nothing(world):
    world.rollback()
    out = world.rollback()
    assert out.event is None and "nothing to do" in out.message
    assert len(world.published) == 1 and len(world.state()["rollbacks"]) == 1
    assert world.client.aliases[DS] == world.a["collection"]


def test_to_picks_a_run_and_rolling_forward_clears_its_mark(world):
    world.rollback()
    out = world.rollback(to=RUNS[1])
    assert world.client.aliases[DS] == world.b["collection"] and out.event["id"] == f"{DS}/rollback/2"
    st = world.state()
    assert "rolled_back" not in st["promoted"] and st["promoted_entries"][1]["rolled_back"]["id"] == f"{DS}/rollback/2"
    assert "already live" in world.rollback(to=RUNS[1]).message


def test_after_a_new_promotion_the_rolled_back_index_is_not_the_default(world):
    world.rollback()  # b -> a
    promote_all(world.ledger, world.client, world.c)  # c replaces a
    world.rollback()
    assert world.client.aliases[DS] == world.a["collection"]  # not b, which was rolled back from


def test_refusals_name_the_dataset_target_and_reason(world):
    with pytest.raises(rollback.RollbackRefused, match=f"'{DS}'.*run nope built no kept"):
        world.rollback(to="nope")
    world.client.collections[world.a["collection"]]["embedpipe.fingerprint"] = "other"
    with pytest.raises(rollback.RollbackRefused, match=f"{world.a['collection']}.*records model other"):
        world.rollback()
    world.client.drop_collection(world.a["collection"])
    with pytest.raises(rollback.RollbackRefused, match=f"{world.a['collection']}: the collection no longer exists"):
        world.rollback()
    assert world.client.aliases[DS] == world.b["collection"] and not world.published
    assert "rollbacks" not in world.state()


def test_a_dataset_with_an_active_run_or_one_index_is_refused(world):
    world.ledger.update_dataset(DS, lambda st: {**st, "active": "r1"})
    with pytest.raises(rollback.RollbackRefused, match="run r1 is active"):
        world.rollback()
    fresh = World()
    promote_all(fresh.ledger, fresh.client, fresh.a)
    with pytest.raises(rollback.RollbackRefused, match="no earlier promoted index"):
        fresh.rollback()
    with pytest.raises(rollback.RollbackRefused, match="no promoted index"):
        World().rollback()


def test_a_rollback_cut_short_is_finished_with_the_same_event_id(world):
    def crash(topic, event):
        raise ConnectionError("pubsub down")

    with pytest.raises(ConnectionError):
        rollback.rollback(Settings.from_env({}), world.ledger, world.client, crash, DS)
    assert not world.state()["rollbacks"][0]["done_at"]
    out = world.rollback(to=RUNS[1])  # whatever is asked, the rollback under way is finished first
    assert [e.id for _, e in world.published] == [f"{DS}/rollback/1"] and out.event["id"] == f"{DS}/rollback/1"
    assert world.client.aliases[DS] == world.a["collection"] and world.state()["rollbacks"][0]["done_at"]


def test_a_rollback_cut_short_and_overtaken_by_a_promotion_is_left_alone(world):
    def crash(topic, event):
        raise ConnectionError("pubsub down")

    with pytest.raises(ConnectionError):
        rollback.rollback(Settings.from_env({}), world.ledger, world.client, crash, DS)
    promote_all(world.ledger, world.client, world.c)
    out = world.rollback()
    assert "left as it is" in out.message and out.event is None and not world.published
    assert world.client.aliases[DS] == world.c["collection"] and world.state()["rollbacks"][0]["superseded_at"]


def test_the_target_keeps_its_own_table_and_the_replaced_entry_keeps_its_dirty_mark(world):
    world.ledger.update_dataset(DS, lambda st: {**st, "promoted": {**st["promoted"], "dirty": "r9"}})
    world.rollback()
    st = world.state()
    assert "dirty" not in st["promoted"] and st["promoted"]["hashes"] == world.a["hashes"]
    assert st["promoted_entries"][1]["dirty"] == "r9"  # rolling forward to it later rebuilds, as it should


def test_remembered_entries_are_bounded_rolled_back_ones_first_and_all_kept_by_retention(world):
    world.rollback()  # entries: a, b (rolled back)
    promote_all(world.ledger, world.client, world.c, keep=1)  # bound 2: c, a
    st = world.state()
    assert [e["collection"] for e in st["promoted_entries"]] == [world.c["collection"], world.a["collection"]]
    assert rollback.kept(st) == {world.c["collection"], world.a["collection"]}
    in_place = {**world.c, "updated_by": "r10", "hashes": "gs://a/runs/r10/hashes.parquet"}
    entries = rollback.remember(st, in_place, 2)
    assert entries == [in_place, st["promoted_entries"][1]]  # an in-place update replaces its collection's entry


def test_retention_spares_the_kept_entries():
    client = FakeMilvus()
    names = [vectorstore.collection_name(DS, r) for r in RUNS]
    for n in names:
        client.add(n, "fp", 8)
        client.collections[n]["embedpipe.created_at"] = "0"
    vectorstore.point_alias(client, DS, names[2])
    state = {"promoted": {"collection": names[2]}, "promoted_entries": [{"collection": names[0]}]}
    dropped = vectorstore.drop_old_collections(client, DS, 0, protect=rollback.kept(state), grace_s=0)
    assert dropped == [names[1]]
