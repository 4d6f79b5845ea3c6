"""Milvus Lite server round trip: schema with BM25 over analyzed text, upsert by id, dense, stemmed BM25 and hybrid
search, alias, fingerprints."""

from __future__ import annotations

import numpy as np
import pytest

from embedpipe.retrieval import lexical, vectorstore


@pytest.fixture()
def client(services):
    return vectorstore.connect(services.milvus_uri)


def rows(n: int, dim: int, seed: int = 0, tag: str = "v1"):
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"doc-{i}" for i in range(n)]
    texts = [f"document {i} about {'pumps' if i % 2 else 'valves'} {tag}" for i in range(n)]
    return vectorstore.rows_from(
        ids,
        vecs.tolist(),
        texts,
        lexical.analyzed(texts),
        [f"title {i}" for i in range(n)],
        [f"{tag}-{i}" for i in range(n)],
        [{"i": i} for i in range(n)],
    ), vecs


def test_round_trip(client):
    name = vectorstore.collection_name("vs-test", "run-1")
    assert name == "vs_test__run_1"
    vectorstore.create_collection(client, name, 16, "fp-a", "gs://x/model/")
    data, vecs = rows(50, 16)
    assert vectorstore.upsert_batch(client, name, data) == 50
    again, _ = rows(50, 16, tag="v2")  # same ids, new content: upsert replaces, never duplicates
    vectorstore.upsert_batch(client, name, again)
    vectorstore.finish_load(client, name)
    hashes = vectorstore.ids_and_hashes(client, name)
    assert len(hashes) == 50 and hashes["doc-7"] == "v2-7"

    dense = vectorstore.search_dense(client, name, vecs[:3], 5)
    assert [hits[0][0] for hits in dense] == ["doc-0", "doc-1", "doc-2"]
    assert dense[0][0][1] == pytest.approx(1.0, abs=1e-3)
    # BM25 matches stems: "pumping" finds the documents about "pumps" (odd ids), stop words match nothing
    sparse = vectorstore.search_sparse(client, name, lexical.analyzed(["pumping", "the of"]), 10)
    assert sparse[0] and all(int(i.split("-")[1]) % 2 == 1 for i, _ in sparse[0]) and sparse[1] == []
    hybrid = vectorstore.search(client, name, "hybrid", vecs[:1], lexical.analyzed(["document 0 about valves"]), 5)
    assert hybrid[0][0][0] == "doc-0" and len(hybrid[0]) == 5
    assert vectorstore.search(client, name, "bm25", vecs[:1], lexical.analyzed(["pumps"]), 3)[0][0][0].endswith(
        ("1", "3", "5", "7", "9")
    )

    vectorstore.delete_ids(client, name, ["doc-0", "doc-1"])
    assert len(vectorstore.ids_and_hashes(client, name)) == 48


def test_alias_swap_and_fingerprint_refusal(client):
    a = vectorstore.collection_name("alias-test", "a")
    b = vectorstore.collection_name("alias-test", "b")
    for name in (a, b):
        vectorstore.create_collection(client, name, 8, "fp-" + name[-1], "gs://x/")
        vectorstore.upsert_batch(client, name, rows(4, 8)[0])
        vectorstore.finish_load(client, name)
    alias = vectorstore.alias_name("alias-test")
    assert vectorstore.alias_target(client, alias) is None
    vectorstore.point_alias(client, alias, a)
    assert vectorstore.alias_target(client, alias) == a
    vectorstore.point_alias(client, alias, b)
    assert vectorstore.alias_target(client, alias) == b

    vectorstore.create_collection(client, a, 8, "fp-a", "gs://x/")  # same model: idempotent
    with pytest.raises(vectorstore.FingerprintMismatch):
        vectorstore.create_collection(client, a, 8, "fp-other", "gs://x/")
    with pytest.raises(vectorstore.FingerprintMismatch):
        vectorstore.check_fingerprint(client, a, "fp-a", 16)


HOSTILE = ["x'] or id not in ['", "a'b", "back\\slash", '"dq"', 'x" or "1', "ünï €😀", "tail\\"]


def test_hostile_ids_delete_exactly_their_row_and_find_their_titles(client):
    """pymilvus' ``ids=`` quotes without escaping: ``x'] or id not in ['`` used to delete every row."""
    name = vectorstore.collection_name("vs-hostile", "run-1")
    vectorstore.create_collection(client, name, 16, "fp-a", "gs://x/")
    data, vecs = rows(10 + len(HOSTILE), 16)
    for row, doc_id in zip(data[10:], HOSTILE):
        row["id"], row["title"] = doc_id, f"title of {doc_id}"
    vectorstore.upsert_batch(client, name, data)
    vectorstore.finish_load(client, name)
    every = {r["id"] for r in data}

    vectorstore.delete_ids(client, name, [HOSTILE[0]])
    assert set(vectorstore.ids_and_hashes(client, name)) == every - {HOSTILE[0]}
    left = HOSTILE[1:]
    assert vectorstore.get_titles(client, name, [*left, "doc-1", HOSTILE[0]]) == {
        **{i: f"title of {i}" for i in left},
        "doc-1": "title 1",
    }
    hits = vectorstore.search_dense(client, name, vecs[11:], 1)
    assert [h[0][0] for h in hits] == left
    vectorstore.delete_ids(client, name, left[:3])
    assert set(vectorstore.ids_and_hashes(client, name)) == every - set(HOSTILE[:4])


def test_retention_spares_the_live_protected_and_young_collections(client):
    def made(run_id: str) -> str:
        name = vectorstore.collection_name("vs-retain", run_id)
        vectorstore.create_collection(client, name, 8, "fp", "gs://x/")
        return name

    replaced, rejected, live = (
        made("20200101t000000-aaaaaa"),
        made("20200102t000000-bbbbbb"),
        made("20200103t000000-cccccc"),
    )
    vectorstore.point_alias(client, vectorstore.alias_name("vs-retain"), live)
    assert vectorstore.drop_old_collections(client, "vs-retain", 1, protect={replaced}, grace_s=0) == []
    assert vectorstore.drop_old_collections(client, "vs-retain", 1, grace_s=600) == [], "created just now"
    assert vectorstore.drop_old_collections(client, "vs-retain", 1, grace_s=0) == [replaced]
    assert set(vectorstore.dataset_collections(client, "vs-retain")) == {rejected, live}


def test_an_exact_collection_ranks_as_exact_search_does(client):
    """A small collection's FLAT index: Milvus' top 100 is numpy's exact top 100 in order (the convex hybrid
    normalises over the whole candidate list, so one missed candidate moves fused ranks), and the index is built
    over every row once finish_load returns."""
    name = vectorstore.collection_name("vs-exact", "run-1")
    vectorstore.create_collection(client, name, 32, "fp-a", "gs://x/", exact=True)
    data, vecs = rows(3000, 32, seed=3)
    for start in range(0, len(data), 1000):
        vectorstore.upsert_batch(client, name, data[start : start + 1000])
    vectorstore.finish_load(client, name)
    index = client.describe_index(name, "dense")
    assert index["index_type"] == "FLAT" and index["pending_index_rows"] == 0
    queries = np.random.default_rng(9).normal(size=(20, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    hits = vectorstore.search_dense(client, name, queries, 100)
    exact = np.argsort(-(queries @ vecs.T), axis=1)[:, :100]
    assert [[d for d, _ in h] for h in hits] == [[f"doc-{j}" for j in row] for row in exact]
