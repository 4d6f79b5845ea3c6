"""vectorstore without a server: id filters that hostile ids cannot escape, retention that never drops what search
may still serve, and dataset names that would share a collection prefix."""

from __future__ import annotations

import datetime as dt

import pytest

from embedpipe.retrieval import vectorstore

HOSTILE = ["x'] or id not in ['", "a'b", "back\\slash", '"dq"', 'x" or "1', "ünï €😀", "tail\\"]


class FakeMilvus:
    """Collections with properties and aliases; records deletes and drops."""

    def __init__(self) -> None:
        self.props: dict[str, dict] = {}
        self.aliases: dict[str, str] = {}
        self.calls: list[tuple[str, dict]] = []

    def add(self, name: str, created_at: float | None = None) -> str:
        self.props[name] = {} if created_at is None else {vectorstore.PROP + "created_at": str(created_at)}
        return name

    def list_collections(self) -> list[str]:
        return sorted(self.props)

    def list_aliases(self, collection_name: str) -> dict:
        return {"aliases": [a for a, c in self.aliases.items() if c == collection_name]}

    def describe_collection(self, name: str) -> dict:
        return {"properties": self.props[name]}

    def drop_collection(self, name: str) -> None:
        del self.props[name]

    def delete(self, **kwargs) -> None:
        self.calls.append(("delete", kwargs))


def run_name(dataset: str, when: float) -> str:
    stamp = dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y%m%dt%H%M%S")
    return vectorstore.collection_name(dataset, f"{stamp}-ab12cd")


def test_id_filter_reads_back_as_exactly_the_ids():
    from milvus_lite.search.filter.tokens import TokenKind, tokenize

    tokens = tokenize(vectorstore.id_filter(["doc-1", *HOSTILE]))
    assert [t.value for t in tokens if t.kind == TokenKind.STRING] == ["doc-1", *HOSTILE]
    assert [t.kind for t in tokens[:3]] == [TokenKind.IDENT, TokenKind.IN, TokenKind.LBRACKET]
    with pytest.raises(ValueError, match="control"):
        vectorstore.id_filter(["a\nb"])


def test_delete_ids_sends_an_escaped_filter_never_raw_ids():
    client = FakeMilvus()
    vectorstore.delete_ids(client, "c", [HOSTILE[0]])
    ((op, kwargs),) = client.calls
    assert "ids" not in kwargs and kwargs["filter"] == vectorstore.id_filter([HOSTILE[0]])
    vectorstore.delete_ids(client, "c", [])
    assert len(client.calls) == 1, "nothing to delete: no call"


def test_retention_keeps_the_collection_just_replaced_after_keep_rejections(clock):
    """live L, rejected R1 R2 (keep=2), then C is promoted: L is the oldest 'other' but search may still serve it."""
    client, day = FakeMilvus(), 86400
    live = client.add(run_name("ds", clock.now - 5 * day), clock.now - 5 * day)
    rejected = [client.add(run_name("ds", clock.now - d * day), clock.now - d * day) for d in (4, 3)]
    new = client.add(run_name("ds", clock.now - 2 * day), clock.now - 2 * day)
    client.aliases["ds"] = new
    assert vectorstore.drop_old_collections(client, "ds", 2, protect={live}, grace_s=600, clock=clock) == []
    assert set(client.props) == {live, *rejected, new}
    # once no longer protected, the normal rule applies: the oldest beyond keep go, never the live one
    assert vectorstore.drop_old_collections(client, "ds", 1, grace_s=600, clock=clock) == [live, rejected[0]]
    assert set(client.props) == {rejected[1], new}


def test_retention_spares_collections_younger_than_the_grace_period(clock):
    client = FakeMilvus()
    old = client.add(run_name("ds", clock.now - 7200), clock.now - 3600)
    # started long ago (run id) but created a minute ago: the property, not the run id, gives its age
    young = client.add(run_name("ds", clock.now - 7000), clock.now - 60)
    newest = client.add(run_name("ds", clock.now - 30), clock.now - 30)
    client.aliases["ds"] = client.add(run_name("ds", clock.now - 10), clock.now - 10)
    assert vectorstore.drop_old_collections(client, "ds", 1, grace_s=600, clock=clock) == [old]
    assert young in client.props and newest in client.props
    clock.advance(600)
    assert vectorstore.drop_old_collections(client, "ds", 1, grace_s=600, clock=clock) == [young]


def test_created_at_falls_back_to_the_run_id(clock):
    client = FakeMilvus()
    legacy = client.add(run_name("ds", clock.now - 3600))  # made before the created_at property existed
    assert vectorstore.created_at(client, legacy) == pytest.approx(clock.now - 3600, abs=1)


def test_retention_leaves_other_datasets_alone(clock):
    client = FakeMilvus()
    mine = [client.add(run_name("ds", clock.now - d * 3600), 0) for d in (3, 2, 1)]
    theirs = client.add(run_name("ds2", clock.now - 5 * 3600), 0)
    assert vectorstore.drop_old_collections(client, "ds", 1, grace_s=0, clock=clock) == mine[:2]
    assert theirs in client.props


def test_collides_finds_the_dataset_with_the_same_alias():
    assert vectorstore.collides("a-b", ["x", "a_b"]) == "a_b"
    assert vectorstore.collides("a_b", ["a-b"]) == "a-b"
    assert vectorstore.collides("a-b", ["a-b", "ab", "a-bc"]) is None  # itself does not count
    assert vectorstore.collides("a-b", []) is None


class SearchRecorder(FakeMilvus):
    """Answers every search with one hit per query and records the calls' keyword arguments."""

    def describe_collection(self, name: str) -> dict:
        return {"properties": {}, "fields": [{"name": "bm25_text"}]}

    def search(self, **kwargs) -> list:
        self.calls.append(("search", kwargs))
        return [[{"id": "d1", "distance": 0.5}] for _ in kwargs["data"]]


def test_the_indexer_s_evaluation_reads_with_strong_consistency_the_search_service_with_the_collection_s():
    import pyarrow as pa

    from embedpipe.index import indexing

    client = SearchRecorder()
    queries = pa.table({"id": ["q1"], "vector": [[0.1, 0.2]], "bm25_text": ["term"]})
    ranked = indexing.rank(client, "c1", queries, None)
    assert set(ranked) == {"dense", "bm25", "hybrid"}
    assert [c[1].get("consistency_level") for c in client.calls] == [vectorstore.STRONG, vectorstore.STRONG]
    client.calls.clear()
    vectorstore.search(client, "c1", "hybrid", [[0.1, 0.2]], ["term"], 10)  # what search serves: no override
    assert [("consistency_level" in c[1]) for c in client.calls] == [False, False]
