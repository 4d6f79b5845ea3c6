"""The indexer's load path (``indexing.upsert_tables``: batched upserts with retries) vs raw ``MilvusClient.insert``
at its best batch size, each into a fresh collection (same schema, BM25 function included) on one Milvus Lite server
that this bench starts on a free port. No flush in either (both measure the load calls)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N, DIM = 20_000, 384


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard_table():
    import pyarrow as pa

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(N, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = [f"doc{i:06d}" for i in range(N)]
    return pa.table(
        {
            "id": ids,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), DIM),
            "content_hash": [f"{i:032x}" for i in range(N)],
            "title": [f"title {i}" for i in range(N)],
            "text": [f"document {i} about topic {i % 97} and subject {i % 13}" for i in range(N)],
            "metadata": [json.dumps({"n": i % 5}) for i in range(N)],
        }
    )


def run() -> dict:
    from embedpipe import indexing, vectorstore

    port = free_port()
    data_dir = tempfile.mkdtemp(prefix="bench-milvus-")
    exe = Path(sys.executable).parent / "milvus-lite"
    server = subprocess.Popen(
        [str(exe), "server", "--data-dir", data_dir, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                client = vectorstore.connect(uri)
                client.list_collections()
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        table = shard_table()
        cols = {c: table.column(c).to_pylist() for c in ("id", "vector", "text", "title", "content_hash", "metadata")}
        cols["metadata"] = [json.loads(x) for x in cols["metadata"]]
        rows = vectorstore.rows_from(*(cols[c] for c in ("id", "vector", "text", "title", "content_hash", "metadata")))

        best = 0.0
        for batch in (500, 1000, 2000, 5000):
            name = f"baseline_{batch}"
            vectorstore.create_collection(client, name, DIM, "fp", "bench")
            t = time.perf_counter()
            for start in range(0, N, batch):
                client.insert(collection_name=name, data=rows[start : start + batch])
            best = max(best, N / (time.perf_counter() - t))
            client.drop_collection(name)

        vectorstore.create_collection(client, "ours", DIM, "fp", "bench")
        t = time.perf_counter()
        n = indexing.upsert_tables(client, "ours", [table], indexing.Stopwatch())
        ours = n / (time.perf_counter() - t)
        return {
            "baseline_vectors_per_s": round(best, 1),
            "vectors_per_s": round(ours, 1),
            "ratio": round(ours / best, 3),
        }
    finally:
        server.terminate()
        server.wait(30)
