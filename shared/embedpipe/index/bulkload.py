"""Milvus bulk import: the scale path for large full loads (real Milvus; Milvus Lite answers UNIMPLEMENTED).

Above ``Settings.bulk_import_min_rows`` rows, and when ``Settings.bulk_import_bucket`` names the object-storage
bucket the Milvus server reads from, the indexer writes the shards as import-ready Parquet (the collection's field
names, JSON as strings: the layout pymilvus' BulkWriter writes) into that bucket and starts an import job through
Milvus' REST API (``/v2/vectordb/jobs/import/create``), then polls ``get_progress``. Any refusal (Milvus Lite, an
older server) falls back to row upserts, which is also what smaller loads use. The import runs on a fresh collection
only (a full run): import does not upsert, so incremental updates always use upserts.

Exactly once across Pub/Sub redeliveries: ``run_import`` hands the new job id to ``on_started`` before polling (the
caller records it), a delivery that has a recorded id only polls that job again, polling stops with ImportPending at
its deadline (inside the ack deadline), and a new job is refused (ImportConflict) when the collection already holds
rows or a live import job. Staged file paths depend only on the collection and shard order, so staging again
overwrites the same files.
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from embedpipe.config import Settings
from embedpipe.gcp import storage

log = logging.getLogger(__name__)


# Default bound on one wait_import call (a push handler passes less: what its ack deadline leaves).
DEFAULT_DEADLINE_S = 3000.0


class ImportUnsupported(RuntimeError):
    """The server cannot bulk import (e.g. Milvus Lite): load with upserts instead."""


class ImportPending(TimeoutError):
    """The job is still running at the polling deadline: resume later with ``run_import(..., job_id=job_id)``."""

    def __init__(self, job_id: str, state: str = "", progress: object = None) -> None:
        super().__init__(f"bulk import {job_id} still {state or 'running'} ({progress}%): resume it by job id")
        self.job_id, self.state, self.progress = job_id, state, progress


class ImportFailed(RuntimeError):
    """The import job ended Failed (it committed no rows: a fresh job may be started once its id is cleared)."""

    def __init__(self, job_id: str, reason: str = "") -> None:
        super().__init__(f"bulk import {job_id} failed: {reason or 'no reason given'}")
        self.job_id, self.reason = job_id, reason


class ImportConflict(RuntimeError):
    """A new import was refused: the collection already has rows or a live import job (a previous delivery's, whose
    job id was not recorded). Importing again would duplicate rows; resume one of ``job_ids`` or rebuild the
    collection. Not an ImportUnsupported: falling back to upserts would race that job."""

    def __init__(self, collection: str, job_ids: list[str], rows: int) -> None:
        super().__init__(
            f"refusing a new bulk import into {collection}: it already has {rows} row(s)"
            + (f" and import job(s) {', '.join(job_ids)} not failed" if job_ids else "")
        )
        self.collection, self.job_ids, self.rows = collection, job_ids, rows


def wanted(settings: Settings, rows: int) -> bool:
    return (
        bool(settings.bulk_import_bucket)
        and settings.bulk_import_min_rows > 0
        and rows >= settings.bulk_import_min_rows
    )


IMPORT_COLUMNS = ("id", "vector", "text", "bm25_text", "title", "content_hash", "metadata")  # what import_table reads


def import_table(table):
    """An embedder shard (id, vector, text, title, content_hash, metadata) as import-ready Parquet columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from embedpipe.retrieval.vectorstore import MAX_TEXT_CHARS

    return pa.table(
        {
            "id": table.column("id"),
            "dense": table.column("vector").cast(pa.list_(pa.float32())),
            "text": _nonempty(pc.utf8_slice_codeunits(table.column("text"), 0, MAX_TEXT_CHARS)),
            # BM25's input: without it an imported collection has no sparse vectors (the upsert rows carry it too)
            "bm25_text": _nonempty(pc.utf8_slice_codeunits(table.column("bm25_text"), 0, MAX_TEXT_CHARS)),
            "title": pc.utf8_slice_codeunits(table.column("title"), 0, 500),
            "content_hash": table.column("content_hash"),
            "metadata": table.column("metadata"),  # JSON text: Milvus parses it into the JSON field
        }
    )


def _nonempty(column):
    """An empty string becomes one space, as ``vectorstore.rows_from`` writes it for upserts."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.if_else(pc.equal(column, ""), pa.scalar(" "), column)


def _row_groups(shard):
    """A table whole, or a Parquet shard (a ``pq.ParquetFile`` or a local path) one row group at a time, only the
    columns ``import_table`` reads; at least one table, so an empty shard still gives a file with the schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if isinstance(shard, pa.Table):
        yield shard
        return
    f = shard if isinstance(shard, pq.ParquetFile) else pq.ParquetFile(shard)
    if not f.num_row_groups:
        yield f.schema_arrow.empty_table().select(IMPORT_COLUMNS)
    for i in range(f.num_row_groups):
        yield f.read_row_group(i, columns=IMPORT_COLUMNS)


def stage_files(tables, bucket: str, prefix: str) -> list[list[str]]:
    """Write import Parquet files to ``gs://bucket/prefix/``; returns Milvus' ``files`` argument (one file per
    group, paths relative to the bucket). Paths depend only on ``prefix`` and the table order, so staging the same
    tables again (a redelivery) overwrites the same objects with the same bytes and returns the same list.
    ``tables``: pyarrow tables, or Parquet shards (``pq.ParquetFile``, e.g. over ``storage.open_read``, or local
    paths) converted and uploaded row group by row group: memory holds one row group and one upload chunk, never
    a shard."""
    import pyarrow.parquet as pq

    files = []
    for i, table in enumerate(tables):
        path = f"{prefix.strip('/')}/part-{i:05d}.parquet"
        parts = (import_table(part) for part in _row_groups(table))
        first = next(parts)
        # The writer closes (its footer) before the upload does; an error on the way commits no object.
        with storage.open_write(f"gs://{bucket}/{path}") as out, pq.ParquetWriter(out, first.schema) as writer:
            for part in itertools.chain([first], parts):
                writer.write_table(part)
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
        except http.client.BadStatusLine as exc:  # not an HTTP server at all (Milvus Lite speaks only gRPC)
            if isinstance(exc, ConnectionError):  # RemoteDisconnected: an HTTP server that dropped us, maybe after
                raise  # creating the job: falling back to upserts would race it (the redelivery meets ImportConflict)
            raise ImportUnsupported(f"{self.url}: not an HTTP answer ({type(exc).__name__})") from None
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


def list_request(milvus_uri: str, token: str, collection: str) -> Request:
    base, headers = _base(milvus_uri, token)
    return Request(f"{base}/v2/vectordb/jobs/import/list", headers, {"collectionName": collection})


def stats_request(milvus_uri: str, token: str, collection: str) -> Request:
    base, headers = _base(milvus_uri, token)
    return Request(f"{base}/v2/vectordb/collections/get_stats", headers, {"collectionName": collection})


# Polling clock and pause (module attributes, so tests replace them without touching the time module).
_now = time.monotonic
_sleep = time.sleep


def ensure_unimported(settings: Settings, collection: str, row_count: Callable[[str], int] | None = None) -> None:
    """Raise ImportConflict when ``collection`` already holds rows or has an import job that has not failed (a
    previous delivery's import whose job id was lost): importing again would duplicate every row. ``row_count``
    (collection -> rows, e.g. from the pymilvus client) replaces the REST ``get_stats`` call."""
    records = list_request(settings.milvus_uri, settings.milvus_token, collection).send().get("records") or []
    jobs = [
        str(r.get("jobId"))
        for r in records
        if r.get("collectionName", collection) == collection and r.get("state") != "Failed"
    ]
    if row_count is not None:
        rows = int(row_count(collection))
    else:
        stats = stats_request(settings.milvus_uri, settings.milvus_token, collection).send()
        rows = int(stats.get("rowCount") or 0)
    if jobs or rows:
        raise ImportConflict(collection, jobs, rows)


def start_import(
    settings: Settings, collection: str, files: list[list[str]], row_count: Callable[[str], int] | None = None
) -> str:
    """Create the import job (after ``ensure_unimported``); returns its job id. Never polls."""
    ensure_unimported(settings, collection, row_count)
    job = create_request(settings.milvus_uri, settings.milvus_token, collection, files).send()
    job_id = str(job["jobId"])
    log.info("bulk import %s into %s started: %d file group(s)", job_id, collection, len(files))
    return job_id


UNKNOWN_JOB = re.compile(r"not (?:be )?found|not exist|no such job", re.IGNORECASE)


def wait_import(
    settings: Settings, job_id: str, deadline_s: float | None = DEFAULT_DEADLINE_S, poll_s: float = 5.0
) -> int:
    """Poll an import job; returns its imported row count once Completed. Raises ImportFailed when it failed, and
    ImportPending once ``deadline_s`` (from now; None: no bound) has passed with the job still running, so a push
    handler can return inside its ack deadline and let a later delivery resume with the same job id. The job is
    polled at least once (``deadline_s=0``: a single look)."""
    end = None if deadline_s is None else _now() + deadline_s
    while True:
        left = None if end is None else max(0.0, end - _now())
        timeout = 60.0 if left is None else max(1.0, min(60.0, left))
        try:
            p = progress_request(settings.milvus_uri, settings.milvus_token, job_id).send(timeout=timeout)
        except ImportUnsupported as exc:  # the job exists: an unreachable server is a later look, never upserts
            raise ImportPending(job_id, f"unreachable ({exc})", None) from None
        except RuntimeError as exc:
            if UNKNOWN_JOB.search(str(exc)):  # a restored or replaced server: no later look can find it
                raise ImportFailed(job_id, f"the Milvus server does not know this job ({exc})") from None
            raise
        state = p.get("state", "")
        if state == "Completed":
            rows = int(p.get("importedRows") or p.get("totalRows") or 0)
            log.info("bulk import %s completed: %d rows", job_id, rows)
            return rows
        if state == "Failed":
            raise ImportFailed(job_id, str(p.get("reason") or ""))
        left = None if end is None else end - _now()
        if left is not None and left <= 0:
            raise ImportPending(job_id, state, p.get("progress"))
        log.info("bulk import %s: %s %s%%", job_id, state, p.get("progress"))
        _sleep(poll_s if left is None else min(poll_s, left))


def run_import(
    settings: Settings,
    collection: str,
    files: list[list[str]],
    job_id: str | None = None,
    on_started: Callable[[str], object] | None = None,
    deadline_s: float | None = DEFAULT_DEADLINE_S,
    poll_s: float = 5.0,
    row_count: Callable[[str], int] | None = None,
) -> int:
    """Import ``files`` into ``collection`` exactly once; returns the imported row count.

    With ``job_id`` (recorded by an earlier delivery) no job is created: that job is only polled again (rows when it
    completed, ImportFailed when it failed). Without one, the job is created (refused with ImportConflict when the
    collection already has rows or a live import) and ``on_started(job_id)`` runs before the first poll, so the
    caller records the id first; if it raises, nothing is polled and the exception propagates. Polling stops with
    ImportPending after ``deadline_s``."""
    if job_id:
        log.info("bulk import %s into %s: resuming (no new job)", job_id, collection)
    else:
        job_id = start_import(settings, collection, files, row_count)
        if on_started is not None:
            on_started(job_id)
    return wait_import(settings, job_id, deadline_s, poll_s)
