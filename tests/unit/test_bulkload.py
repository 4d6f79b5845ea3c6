"""embedpipe.index.bulkload: when the scale path is taken, and the import requests it sends (no server needed)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedpipe.config import Settings
from embedpipe.index import bulkload
from embedpipe.retrieval import vectorstore


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
            "bm25_text": ["x", ""],
            "metadata": ['{"k": 1}', "{}"],
        }
    )
    out = bulkload.import_table(shard)
    # an imported row has the fields an upserted one has (bm25_text feeds BM25: without it no sparse vectors)
    row = vectorstore.rows_from(["a"], [[0.1, 0.2]], ["x"], ["x"], ["t"], ["h1"], [{}])[0]
    assert sorted(out.column_names) == sorted(row)
    assert out.column("bm25_text").to_pylist() == ["x", " "]  # empty written as one space, as rows_from does
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


def test_a_server_that_does_not_speak_http_is_unsupported(monkeypatch):
    """A bulk bucket set against Milvus Lite: its port answers gRPC, which urllib reads as a bad status line."""
    import http.client

    def grpc_only(*a, **k):
        raise http.client.BadStatusLine("\x00\x00\x18\x04")

    monkeypatch.setattr(bulkload.urllib.request, "urlopen", grpc_only)
    with pytest.raises(bulkload.ImportUnsupported, match="not an HTTP answer"):
        bulkload.create_request("http://127.0.0.1:1", "", "c", [["f"]]).send()

    def dropped(*a, **k):  # an HTTP server that may have created the job before the connection went
        raise http.client.RemoteDisconnected("Remote end closed connection without response")

    monkeypatch.setattr(bulkload.urllib.request, "urlopen", dropped)
    with pytest.raises(http.client.RemoteDisconnected):
        bulkload.create_request("http://127.0.0.1:1", "", "c", [["f"]]).send()


class FakeMilvus:
    """Milvus' import REST API behind ``urllib.request.urlopen``: records each call; each job answers the states in
    its script one poll at a time (the last one repeats)."""

    def __init__(self, states=("Importing", "Completed"), rows: int = 0, reason: str = "disk full") -> None:
        self.calls: list[tuple[str, dict]] = []
        self.jobs: dict[str, list[str]] = {}
        self.polls: dict[str, int] = {}
        self.script, self.rows, self.reason = list(states), rows, reason
        self.collections: dict[str, str] = {}

    def urlopen(self, req, timeout=None):
        import io

        path, body = req.full_url.split("19530", 1)[1], json.loads(req.data)
        self.calls.append((path, body))
        if path.endswith("/jobs/import/create"):
            job_id = f"45{len(self.jobs)}"
            self.jobs[job_id], self.polls[job_id] = list(self.script), 0
            self.collections[job_id] = body["collectionName"]
            data = {"jobId": job_id}
        elif path.endswith("/jobs/import/get_progress"):
            job_id = body["jobId"]
            if job_id not in self.jobs:  # a restored or replaced server (datacoord's wording)
                answer = {"code": 2100, "message": f"import failed: import job does not exist, jobID={job_id}"}
                return io.BytesIO(json.dumps(answer).encode())
            script = self.jobs[job_id]
            state = script[min(self.polls[job_id], len(script) - 1)]
            self.polls[job_id] += 1
            data = {"jobId": job_id, "state": state, "progress": 100 if state == "Completed" else 40}
            if state == "Completed":
                data["importedRows"] = 1234
            if state == "Failed":
                data["reason"] = self.reason
        elif path.endswith("/jobs/import/list"):
            data = {
                "records": [
                    {"collectionName": c, "jobId": j, "state": self.jobs[j][min(self.polls[j], len(self.jobs[j]) - 1)]}
                    for j, c in self.collections.items()
                    if c == body["collectionName"]
                ]
            }
        elif path.endswith("/collections/get_stats"):
            data = {"rowCount": self.rows}
        else:
            raise AssertionError(path)
        return io.BytesIO(json.dumps({"code": 0, "data": data}).encode())

    def created(self) -> int:
        return sum(p.endswith("/create") for p, _ in self.calls)


@pytest.fixture
def milvus(monkeypatch):
    fake = FakeMilvus()
    monkeypatch.setattr(bulkload.urllib.request, "urlopen", fake.urlopen)
    now = [1000.0]
    monkeypatch.setattr(bulkload, "_now", lambda: now[0])
    monkeypatch.setattr(bulkload, "_sleep", lambda s: now.__setitem__(0, now[0] + s))
    return fake


def settings() -> Settings:
    return dataclasses.replace(Settings.from_env({}), milvus_uri="http://milvus.test:19530", milvus_token="")


FILES = [["embedpipe-import/demo__r1/part-00000.parquet"]]


def test_on_started_records_the_job_before_the_first_poll(milvus):
    seen = []

    def record(job_id):
        seen.append((job_id, [p for p, _ in milvus.calls]))

    assert bulkload.run_import(settings(), "demo__r1", FILES, on_started=record, poll_s=1) == 1234
    ((job_id, calls_then),) = seen
    assert job_id == "450" and calls_then[-1].endswith("/jobs/import/create")
    assert not any(p.endswith("/get_progress") for p in calls_then), "recorded before any poll"
    assert milvus.created() == 1


def test_the_deadline_raises_import_pending_and_a_redelivery_resumes_the_same_job(milvus):
    milvus.script = ["Pending", "Importing", "Importing", "Importing", "Completed"]
    recorded = []
    with pytest.raises(bulkload.ImportPending) as exc:
        bulkload.run_import(settings(), "demo__r1", FILES, on_started=recorded.append, deadline_s=10, poll_s=4)
    assert exc.value.job_id == recorded[0] == "450" and exc.value.state == "Importing"
    assert isinstance(exc.value, TimeoutError)
    assert milvus.polls["450"] == 4, "polls at 0, 4, 8 s and a last look at the 10 s deadline, then stops"
    # the redelivery carries the recorded id: it polls that job and never creates (or checks for) another
    started, before = [], len(milvus.calls)
    assert bulkload.run_import(settings(), "demo__r1", FILES, job_id="450", on_started=started.append) == 1234
    assert milvus.created() == 1 and started == []
    assert {(p.rsplit("/", 1)[1], b["jobId"]) for p, b in milvus.calls[before:]} == {("get_progress", "450")}


def test_resuming_a_completed_job_returns_its_rows_without_a_new_job(milvus):
    milvus.script = ["Completed"]
    job_id = bulkload.start_import(settings(), "demo__r1", FILES)
    assert bulkload.run_import(settings(), "demo__r1", FILES, job_id=job_id, deadline_s=0) == 1234
    assert bulkload.wait_import(settings(), job_id, deadline_s=0) == 1234
    assert milvus.created() == 1


def test_a_failed_job_raises_and_is_never_restarted(milvus):
    milvus.script = ["Importing", "Failed"]
    with pytest.raises(bulkload.ImportFailed, match="disk full") as exc:
        bulkload.run_import(settings(), "demo__r1", FILES, poll_s=1)
    assert exc.value.job_id == "450"
    with pytest.raises(bulkload.ImportFailed):
        bulkload.run_import(settings(), "demo__r1", FILES, job_id="450")
    assert milvus.created() == 1


def test_a_new_import_into_a_collection_with_a_live_job_or_rows_is_refused(milvus):
    milvus.script = ["Importing"]
    lost = bulkload.start_import(settings(), "demo__r1", FILES)  # its id never reached the run record
    with pytest.raises(bulkload.ImportConflict, match=lost) as exc:
        bulkload.run_import(settings(), "demo__r1", FILES, on_started=lambda j: pytest.fail("no second job"))
    assert exc.value.job_ids == [lost] and not isinstance(exc.value, bulkload.ImportUnsupported)
    assert milvus.created() == 1
    # rows already there (REST get_stats, or the caller's own count), no job listed: refused as well
    milvus.rows = 5
    with pytest.raises(bulkload.ImportConflict, match="5 row"):
        bulkload.run_import(settings(), "other__r1", FILES)
    with pytest.raises(bulkload.ImportConflict, match="7 row"):
        bulkload.run_import(settings(), "other__r1", FILES, row_count=lambda c: 7)
    assert milvus.created() == 1


def test_a_failed_job_does_not_block_a_fresh_import(milvus):
    milvus.script = ["Failed"]
    with pytest.raises(bulkload.ImportFailed):
        bulkload.run_import(settings(), "demo__r1", FILES)
    milvus.script = ["Completed"]
    assert bulkload.run_import(settings(), "demo__r1", FILES, row_count=lambda c: 0) == 1234
    assert milvus.created() == 2


@pytest.fixture
def written(monkeypatch) -> dict:
    """The import bucket: ``storage.open_write`` collects each object's bytes, committed when its block ends."""
    objects: dict[str, bytes] = {}

    @contextlib.contextmanager
    def open_write(uri, content_type="application/octet-stream"):
        buf = io.BytesIO()
        yield buf
        objects[uri] = buf.getvalue()

    monkeypatch.setattr(bulkload.storage, "open_write", open_write)
    return objects


def test_staging_again_rewrites_the_same_paths(written):
    shard = pa.table(
        {
            "id": ["a"],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array([0.1, 0.2], pa.float32()), 2),
            "content_hash": ["h"],
            "title": ["t"],
            "text": ["x"],
            "bm25_text": ["x"],
            "metadata": ["{}"],
        }
    )
    first = bulkload.stage_files([shard, shard], "bkt", "embedpipe-import/demo__r1/")
    before = dict(written)
    again = bulkload.stage_files([shard, shard], "bkt", "embedpipe-import/demo__r1")
    assert (
        first
        == again
        == [["embedpipe-import/demo__r1/part-00000.parquet"], ["embedpipe-import/demo__r1/part-00001.parquet"]]
    )
    assert written == before, "same objects, same bytes: a redelivery's staging is harmless"


def test_a_parquet_shard_is_staged_row_group_by_row_group(written, tmp_path):
    n = 5
    shard = pa.table(
        {
            "id": [f"d{i}" for i in range(n)],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.arange(2 * n), pa.float32()), 2),
            "content_hash": ["h"] * n,
            "title": ["t"] * n,
            "text": ["x"] * n,
            "bm25_text": ["x"] * n,
            "metadata": ["{}"] * n,
            "base_vector": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(2 * n), pa.float32()), 2),
        }
    )
    pq.write_table(shard, tmp_path / "shard.parquet", row_group_size=2)
    pq.write_table(shard.slice(0, 0), tmp_path / "empty.parquet")
    sources = [pq.ParquetFile(tmp_path / "shard.parquet"), tmp_path / "empty.parquet"]
    files = bulkload.stage_files(sources, "bkt", "embedpipe-import/demo__r1")
    staged = pq.ParquetFile(io.BytesIO(written[f"gs://bkt/{files[0][0]}"]))
    assert staged.metadata.num_row_groups == 3, "converted and written one source row group at a time"
    assert staged.read().equals(bulkload.import_table(shard)), "the same rows as the shard staged whole"
    empty = pq.read_table(io.BytesIO(written[f"gs://bkt/{files[1][0]}"]))
    assert empty.num_rows == 0 and empty.schema == staged.schema_arrow, "an empty shard: a file with the schema"


def test_a_job_the_server_does_not_know_fails_instead_of_being_polled_for_ever(milvus):
    """Issue 25.5: a recorded job id that a restored or replaced Milvus no longer knows was an error every delivery
    met again (the run stayed INDEXING); it is a failed import now, which fails the run with the reason."""
    with pytest.raises(bulkload.ImportFailed, match="does not know this job") as exc:
        bulkload.run_import(settings(), "demo__r1", FILES, job_id="999")
    assert exc.value.job_id == "999" and milvus.created() == 0
