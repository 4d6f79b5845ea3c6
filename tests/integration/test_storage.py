"""storage's streams against fake-gcs-server: a Parquet object read in byte ranges (only what the reader asks for),
an upload committed whole when its block ends and not at all on an error; and which writes the local stack's
fake-gcs-server notifies (the data bucket's only, as the cloud's notification)."""

from __future__ import annotations

import gc
import io
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.cloud.storage import Blob

from embedpipe import topology
from embedpipe.gcp import bus, storage


def test_a_parquet_object_is_read_in_ranges(services, monkeypatch):
    n = 20_000
    table = pa.table({"id": [f"d{i:05d}" for i in range(n)], "text": [f"{i} " * 50 for i in range(n)]})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=4096, compression="none")
    uri = f"gs://{services.artifacts_bucket}/streams/shard.parquet"
    storage.write_bytes(uri, buf.getvalue())

    fetched = []  # bytes per download request
    real = Blob.download_as_bytes

    def counted(self, **kwargs):
        data = real(self, **kwargs)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(Blob, "download_as_bytes", counted)
    with storage.open_read(uri, chunk_size=256 * 1024) as f:
        shard = pq.ParquetFile(f)
        assert shard.metadata.num_rows == n and shard.metadata.num_row_groups == 5
        ids = [i for b in shard.iter_batches(batch_size=1000, columns=["id"]) for i in b.column("id").to_pylist()]
    assert ids == table.column("id").to_pylist()
    assert len(fetched) > 1 and sum(fetched) < len(buf.getvalue()) / 2, "the text column stays unread"


def test_an_upload_is_committed_when_its_block_ends_and_not_on_an_error(services):
    done, failed = (f"gs://{services.artifacts_bucket}/streams/{name}" for name in ("done.bin", "failed.bin"))
    with storage.open_write(done, chunk_size=256 * 1024) as f:
        f.write(b"x" * (600 * 1024))  # more than two chunks: sent while writing
        assert not storage.exists(done), "nothing to read before the block ends"
    assert storage.read_bytes(done) == b"x" * (600 * 1024)

    with pytest.raises(RuntimeError), storage.open_write(failed, chunk_size=256 * 1024) as f:
        f.write(b"y" * (600 * 1024))
        raise RuntimeError("the writer failed half-way")
    del f
    gc.collect()  # a file object's finalizer closes it: that must not commit the half either
    assert not storage.exists(failed)


def test_only_the_data_bucket_notifies_data_events(services):
    """Ledger and artifact writes are not OBJECT_FINALIZE events for on-data-uploaded (the cloud's notification is on
    the data bucket alone); an upload to the data bucket is."""
    sub = bus.ensure_pull_subscription(services.project, topology.DATA_EVENTS, "data-events-buckets-itest")
    storage.write_json(f"gs://{services.artifacts_bucket}/ledger/notify-probe.json", {"probe": 1})
    storage.write_bytes(f"gs://{services.data_bucket}/notify-probe.txt", b"probe")
    seen, deadline = [], time.time() + 60
    while time.time() < deadline and "notify-probe.txt" not in [a.get("objectId") for a in seen]:
        seen += [attrs for _, attrs, _ in bus.pull(sub, timeout=2)]
    time.sleep(1)  # a notification of the earlier artifacts write would have arrived by now
    seen += [attrs for _, attrs, _ in bus.pull(sub, timeout=2)]
    assert [(a["bucketId"], a["objectId"]) for a in seen] == [(services.data_bucket, "notify-probe.txt")], json.dumps(
        seen
    )
