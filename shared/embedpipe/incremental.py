"""Incremental updates (DESIGN.md §3.2): which kind of run a change needs, the live index's id -> hash table, the diff.

A run is decided at launch (``Pipeline.start_training``), once, and the decision is stored in the run record:

- ``full`` (train -> embed all -> new collection -> gate -> alias swap) when the dataset has no promoted index, when
  a retrain message asked for it (``record["force_full"]``), or when training data changed (``pairs/*`` or
  ``qrels/train.tsv``): a new model is due.
- ``incremental`` otherwise (corpus, queries or eval-qrels changes): no training. The pipeline snapshots the live
  collection's id -> content-hash table into ``<run>/live-hashes.parquet``; the embedder, with the promoted model,
  embeds only documents whose hash differs (new or changed) and lists the ids the corpus snapshot no longer has; the
  indexer upserts into the LIVE collection and deletes those ids. The corpus in the bucket is the full snapshot: a
  document missing from it is deleted from the index.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

from embedpipe import datasets, storage

log = logging.getLogger(__name__)

FULL, INCREMENTAL = "full", "incremental"
SNAPSHOT_FILE = "live-hashes.parquet"


def kind_for(record: dict, promoted: dict | None) -> tuple[str, str]:
    """(kind, reason) for a PENDING run, given the dataset's promoted index (or None)."""
    if not promoted:
        return FULL, "no promoted index for this dataset"
    if record.get("force_full"):
        return FULL, "retrain requested"
    from embedpipe.vectorstore import SCHEMA_VERSION

    if promoted.get("schema") != SCHEMA_VERSION:
        return FULL, f"the live collection has an older schema ({promoted.get('schema', 1)}): rebuilt"
    for obj in record.get("trigger_objects") or []:
        found = datasets.dataset_of(obj.get("object", ""))
        rel = found[1] if found else ""
        if obj.get("part") == "pairs" or rel in ("qrels/train.tsv", "qrels/dev.tsv"):
            return FULL, f"training data changed ({rel})"
    return INCREMENTAL, f"corpus change with promoted index {promoted['collection']}"


@dataclass(frozen=True)
class Diff:
    changed: list[str]  # new or changed ids (content hash differs from the live one), sorted
    deleted: list[str]  # ids the live index has and the corpus no longer has, sorted
    unchanged: int


def diff(corpus_hashes: dict[str, str], live: dict[str, str]) -> Diff:
    """Compare the corpus snapshot (id -> content hash) with the live index's table."""
    changed = sorted(i for i, h in corpus_hashes.items() if live.get(i) != h)
    deleted = sorted(set(live) - set(corpus_hashes))
    return Diff(changed, deleted, len(corpus_hashes) - len(changed))


def snapshot_uri(run_dir: str) -> str:
    return f"{run_dir}/{SNAPSHOT_FILE}"


def write_snapshot(uri: str, hashes: dict[str, str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = sorted(hashes)
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": ids, "content_hash": [hashes[i] for i in ids]}), buf)
    storage.write_bytes(uri, buf.getvalue())


def read_snapshot(uri: str) -> dict[str, str]:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    return dict(zip(table.column("id").to_pylist(), table.column("content_hash").to_pylist()))


def snapshot_live(milvus_uri: str, milvus_token: str, collection: str, uri: str) -> int | None:
    """Write the live collection's id -> hash table to ``uri``; its row count, or None when the collection is gone
    (then the run falls back to full)."""
    from embedpipe import vectorstore

    client = vectorstore.connect(milvus_uri, milvus_token)
    if not client.has_collection(collection):
        log.warning("promoted collection %s is missing from Milvus: a full run is needed", collection)
        return None
    hashes = vectorstore.ids_and_hashes(client, collection)
    write_snapshot(uri, hashes)
    log.info("snapshot of %s: %d ids -> %s", collection, len(hashes), uri)
    return len(hashes)
