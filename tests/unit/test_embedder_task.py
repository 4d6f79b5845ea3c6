"""The embedder entrypoint's shard writer (containers/embedder/task.py): row group by row group, one schema."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedpipe.index import indexing
from tests.helpers import container_task


@pytest.fixture(scope="module")
def embedder_task():
    return container_task("embedder")


def group(ids: list[str], titles: list) -> dict:
    n = len(ids)
    return {
        "id": ids,
        "vector": list(np.full((n, 4), 0.5, dtype=np.float32)),
        "content_hash": [f"h{i}" for i in ids],
        "title": titles,  # a group of documents without titles (None) must not change the shard's schema
        "text": [f"text {i}" for i in ids],
        "bm25_text": [f"text {i}" for i in ids],
        "metadata": ["{}"] * n,
    }


def test_a_shard_is_written_group_by_group_and_read_back_in_batches(embedder_task, tmp_path, monkeypatch):
    uploaded = {}
    monkeypatch.setattr(
        embedder_task.storage, "upload_file", lambda path, uri: uploaded.setdefault(uri, path.read_bytes())
    )
    writer = embedder_task.ShardWriter("corpus.parquet")
    writer.write(group(["a", "b"], [None, None]))
    writer.write(group(["c", "d", "e"], ["C", "D", None]))
    writer.close("gs://arts/run/corpus.parquet", {})
    assert not writer.path.parent.exists(), "the local file and its folder are removed once uploaded"
    local = tmp_path / "back.parquet"
    local.write_bytes(uploaded["gs://arts/run/corpus.parquet"])
    f = pq.ParquetFile(local)
    assert f.metadata.num_row_groups == 2 and indexing.pq_rows(local) == 5
    assert f.read().column("title").to_pylist() == [None, None, "C", "D", None]

    rows = []

    class Client:  # the indexer's upsert path reads the file batch by batch
        pass

    monkeypatch.setattr(
        indexing.vectorstore, "upsert_batch", lambda client, name, batch: rows.append(batch) or len(batch)
    )
    assert indexing.upsert_tables(Client(), "c1", [local], indexing.Stopwatch(), batch=2) == 5
    assert [len(b) for b in rows] == [2, 2, 1]


def test_an_empty_shard_is_a_valid_file(embedder_task, tmp_path, monkeypatch):
    uploaded = {}
    monkeypatch.setattr(
        embedder_task.storage, "upload_file", lambda path, uri: uploaded.setdefault(uri, path.read_bytes())
    )
    writer = embedder_task.ShardWriter("corpus.parquet")
    writer.close("gs://arts/run/empty.parquet", {c: [] for c in embedder_task.STRING_COLUMNS})
    (tmp_path / "e.parquet").write_bytes(uploaded["gs://arts/run/empty.parquet"])
    assert indexing.pq_rows(tmp_path / "e.parquet") == 0


def test_a_failed_upload_still_removes_the_local_shard(embedder_task, monkeypatch):
    def fail(path, uri):
        raise OSError("bucket unreachable")

    monkeypatch.setattr(embedder_task.storage, "upload_file", fail)
    writer = embedder_task.ShardWriter("corpus.parquet")
    writer.write(group(["a"], [None]))
    with pytest.raises(OSError):
        writer.close("gs://arts/run/corpus.parquet", {})
    assert not writer.path.parent.exists()
