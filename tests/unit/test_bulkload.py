"""embedpipe.bulkload: when the scale path is taken, and the import requests it sends (no server needed)."""

from __future__ import annotations

import dataclasses
import json

import pyarrow as pa

from embedpipe import bulkload
from embedpipe.config import Settings


def test_bulk_import_only_above_the_threshold_and_with_a_bucket():
    s = dataclasses.replace(Settings.from_env({}), bulk_import_min_rows=1000)
    assert not bulkload.wanted(s, 10_000), "no bucket Milvus reads from: upserts"
    s = dataclasses.replace(s, bulk_import_bucket="milvus-bucket")
    assert bulkload.wanted(s, 1000) and not bulkload.wanted(s, 999)


def test_create_and_progress_requests():
    req = bulkload.create_request(
        "https://milvus.example:19530/", "user:pass", "demo__r1", [["embedpipe-import/demo__r1/part-00000.parquet"]]
    )
    assert req.url == "https://milvus.example:19530/v2/vectordb/jobs/import/create"
    assert req.headers["Authorization"] == "Bearer user:pass"
    assert req.body == {"collectionName": "demo__r1", "files": [["embedpipe-import/demo__r1/part-00000.parquet"]]}
    json.dumps(req.body)  # what goes on the wire
    prog = bulkload.progress_request("http://127.0.0.1:19530", "", "449")
    assert prog.url.endswith("/v2/vectordb/jobs/import/get_progress") and prog.body == {"jobId": "449"}
    assert "Authorization" not in prog.headers


def test_import_table_uses_the_collection_field_names():
    shard = pa.table(
        {
            "id": ["a", "b"],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array([0.1, 0.2, 0.3, 0.4], pa.float32()), 2),
            "content_hash": ["h1", "h2"],
            "title": ["t", ""],
            "text": ["x" * 20000, "short"],
            "metadata": ['{"k": 1}', "{}"],
        }
    )
    out = bulkload.import_table(shard)
    assert out.column_names == ["id", "dense", "text", "title", "content_hash", "metadata"]
    assert out.column("dense").type == pa.list_(pa.float32())
    assert len(out.column("text")[0].as_py()) == 16000  # vectorstore.MAX_TEXT_CHARS, as upserts truncate
    assert out.column("metadata").to_pylist() == ['{"k": 1}', "{}"]


def test_unsupported_server_is_reported_as_such(monkeypatch):
    import urllib.error

    def refuse(*a, **k):
        raise urllib.error.HTTPError("u", 404, "Not Found", {}, None)

    monkeypatch.setattr(bulkload.urllib.request, "urlopen", refuse)
    req = bulkload.create_request("http://127.0.0.1:1", "", "c", [["f"]])
    try:
        req.send()
    except bulkload.ImportUnsupported:
        pass
    else:
        raise AssertionError("a 404 means: this server has no import API, fall back to upserts")
