"""Milvus bulk import: the scale path for large full loads (real Milvus; Milvus Lite answers UNIMPLEMENTED).

Above ``Settings.bulk_import_min_rows`` rows, and when ``Settings.bulk_import_bucket`` names the object-storage
bucket the Milvus server reads from, the indexer writes the shards as import-ready Parquet (the collection's field
names, JSON as strings: the layout pymilvus' BulkWriter writes) into that bucket and starts an import job through
Milvus' REST API (``/v2/vectordb/jobs/import/create``), then polls ``get_progress``. Any refusal (Milvus Lite, an
older server) falls back to row upserts, which is also what smaller loads use. The import runs on a fresh collection
only (a full run): import does not upsert, so incremental updates always use upserts.
"""

from __future__ import annotations

import io
import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from embedpipe import storage
from embedpipe.config import Settings

log = logging.getLogger(__name__)


class ImportUnsupported(RuntimeError):
    """The server cannot bulk import (e.g. Milvus Lite): load with upserts instead."""


def wanted(settings: Settings, rows: int) -> bool:
    return (
        bool(settings.bulk_import_bucket)
        and settings.bulk_import_min_rows > 0
        and rows >= settings.bulk_import_min_rows
    )


def import_table(table):
    """An embedder shard (id, vector, text, title, content_hash, metadata) as import-ready Parquet columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from embedpipe.vectorstore import MAX_TEXT_CHARS

    return pa.table(
        {
            "id": table.column("id"),
            "dense": table.column("vector").cast(pa.list_(pa.float32())),
            "text": pc.utf8_slice_codeunits(table.column("text"), 0, MAX_TEXT_CHARS),
            "title": pc.utf8_slice_codeunits(table.column("title"), 0, 500),
            "content_hash": table.column("content_hash"),
            "metadata": table.column("metadata"),  # JSON text: Milvus parses it into the JSON field
        }
    )


def stage_files(tables, bucket: str, prefix: str) -> list[list[str]]:
    """Write import Parquet files to ``gs://bucket/prefix/``; returns Milvus' ``files`` argument (one file per
    group, paths relative to the bucket)."""
    import pyarrow.parquet as pq

    files = []
    for i, table in enumerate(tables):
        path = f"{prefix.strip('/')}/part-{i:05d}.parquet"
        buf = io.BytesIO()
        pq.write_table(import_table(table), buf)
        storage.write_bytes(f"gs://{bucket}/{path}", buf.getvalue())
        files.append([path])
    return files


@dataclass(frozen=True)
class Request:
    url: str
    headers: dict
    body: dict

    def send(self, timeout: float = 60.0) -> dict:
        req = urllib.request.Request(self.url, data=json.dumps(self.body).encode(), headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                answer = json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 405, 501):
                raise ImportUnsupported(f"{self.url}: HTTP {exc.code}") from None
            raise
        except urllib.error.URLError as exc:
            raise ImportUnsupported(f"{self.url}: {exc.reason}") from None
        code = answer.get("code", 0)
        if code not in (0, 200):
            message = str(answer.get("message", answer))
            if "unimplemented" in message.lower() or "not support" in message.lower():
                raise ImportUnsupported(message)
            raise RuntimeError(f"{self.url}: {message}")
        return answer.get("data") or {}


def _base(milvus_uri: str, token: str) -> tuple[str, dict]:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return milvus_uri.rstrip("/"), headers


def create_request(milvus_uri: str, token: str, collection: str, files: list[list[str]]) -> Request:
    base, headers = _base(milvus_uri, token)
    return Request(f"{base}/v2/vectordb/jobs/import/create", headers, {"collectionName": collection, "files": files})


def progress_request(milvus_uri: str, token: str, job_id: str) -> Request:
    base, headers = _base(milvus_uri, token)
    return Request(f"{base}/v2/vectordb/jobs/import/get_progress", headers, {"jobId": job_id})


def run_import(
    settings: Settings, collection: str, files: list[list[str]], poll_s: float = 5.0, timeout_s: float = 3000
) -> int:
    """Start the import job and poll it to the end; returns the imported row count."""
    job = create_request(settings.milvus_uri, settings.milvus_token, collection, files).send()
    job_id = str(job["jobId"])
    log.info("bulk import %s into %s: %d file group(s)", job_id, collection, len(files))
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        p = progress_request(settings.milvus_uri, settings.milvus_token, job_id).send()
        state = p.get("state", "")
        if state == "Completed":
            return int(p.get("importedRows") or p.get("totalRows") or 0)
        if state == "Failed":
            raise RuntimeError(f"bulk import {job_id} into {collection} failed: {p.get('reason')}")
        log.info("bulk import %s: %s %s%%", job_id, state, p.get("progress"))
        time.sleep(poll_s)
    raise TimeoutError(f"bulk import {job_id} into {collection} still running after {timeout_s}s")
