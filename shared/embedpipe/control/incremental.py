"""Incremental updates (DESIGN.md §3.2): which kind of run a change needs, the id -> hash tables, the diff.

A run is decided at launch (``Pipeline.start_training``), once, and the decision is stored in the run record:

The kinds are ``contracts.records.FULL`` and ``INCREMENTAL`` (one definition: the indexer, below this layer, reads
them too):

- ``full`` (train -> embed all -> new collection -> gate -> alias swap) when the dataset has no promoted index, when
  a retrain message asked for it (``record["force_full"]``), when training data changed (``pairs/*`` or
  ``qrels/train.tsv``): a new model is due; or when the promoted entry has no id -> hash table (promoted before
  the tables existed).
- ``incremental`` otherwise (corpus, queries or eval-qrels changes): no training. Every embed job leaves
  ``hashes.parquet`` (id, content_hash) beside its shards, the table of the index that run leaves; the indexer
  records its URI on the promoted entry. The next incremental run hands that table to the embedder, which, with the
  promoted model, embeds only documents whose hash differs (new or changed) and lists the ids the corpus snapshot no
  longer has; the indexer upserts into the LIVE collection and deletes those ids. The corpus in the bucket is the
  full snapshot: a document missing from it is deleted from the index.

The table, not a scan of Milvus, is the diff's base so that launching costs O(1) in the functions whatever the
corpus size. It can only lag the collection (an in-place update that failed part-way leaves the previous table on
the promoted entry): the next diff then redoes those upserts and deletes, which are idempotent.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from embedpipe.contracts import datasets
from embedpipe.contracts.records import FULL, INCREMENTAL, Kind, PromotedEntry, RunRecord
from embedpipe.gcp import storage

TABLE_FILE = "hashes.parquet"


def kind_for(record: RunRecord, promoted: PromotedEntry | None) -> tuple[Kind, str]:
    """(kind, reason) for a PENDING run, given the dataset's promoted index (or None)."""
    if not promoted:
        return FULL, "no promoted index for this dataset"
    if record.get("force_full"):
        return FULL, "retrain requested"
    from embedpipe.retrieval.vectorstore import SCHEMA_VERSION

    if promoted.get("schema") != SCHEMA_VERSION:
        return FULL, f"the live collection has an older schema ({promoted.get('schema', 1)}): rebuilt"
    if not promoted.get("hashes"):
        return FULL, "the live index has no id -> hash table to diff against (promoted by an older version): rebuilt"
    for obj in record.get("trigger_objects") or []:
        found = datasets.dataset_of(obj.get("object", ""))
        rel = found[1] if found else ""
        if obj.get("part") == "pairs" or rel in ("qrels/train.tsv", "qrels/dev.tsv"):
            return FULL, f"training data changed ({rel})"
        if obj.get("part") == "source":  # which tables it now names for training is unknown here: train again
            return FULL, f"the dataset's BigQuery sources changed ({rel})"
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


@dataclass(frozen=True)
class Plan:
    """What an incremental embed job does: embed ``embed``, delete ``delete``, leave ``table`` for the next run."""

    mode: str  # "incremental" (in place) or "rebuild" (every document, into a new collection behind the gate)
    embed: list[str]
    delete: list[str]  # live ids the corpus lost (rebuild: the new collection lacks them)
    unchanged: int
    table: dict[str, str]  # the id -> content hash table of the index after this run


def plan(
    corpus: dict[str, str], live: dict[str, str], max_inplace_share: float, keep_absent: bool = False, rebuild=False
) -> Plan:
    """The decision every replica takes alike from the same corpus and live table.

    ``keep_absent`` (a corpus file was left out): its documents are absent, not deleted, so nothing is deleted, the
    table keeps their live rows, and the change is never rebuilt (a new collection would lose them) however large.
    ``rebuild`` (the live collection was part-edited by a run that never promoted): every document, whatever else."""
    d = diff(corpus, live)
    gone = [] if keep_absent else d.deleted
    large = len(d.changed) + len(gone) > max_inplace_share * len(live)
    if rebuild or (large and not keep_absent):
        # ``delete`` lists what the new collection will lack, so the indexer's delete-share guard still refuses a
        # corpus uploaded in part (nothing is deleted from the live collection: it is replaced behind the gate)
        return Plan("rebuild", list(corpus), gone, 0, corpus)
    table = {**{i: live[i] for i in d.deleted}, **corpus} if keep_absent else corpus
    return Plan("incremental", d.changed, gone, d.unchanged, table)


def write_table(uri: str, hashes: dict[str, str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = sorted(hashes)
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": ids, "content_hash": [hashes[i] for i in ids]}), buf)
    storage.write_bytes(uri, buf.getvalue())


def read_table(uri: str) -> dict[str, str]:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    return dict(zip(table.column("id").to_pylist(), table.column("content_hash").to_pylist()))


def digest(table: dict[str, str]) -> str:
    """A fingerprint of an id -> hash table, whatever order it was loaded in (a BigQuery read session's streams come
    in no fixed order): replicas that read the same documents agree on it."""
    h = hashlib.blake2b(digest_size=16)
    for i, content in sorted(table.items()):
        h.update(f"{i}\0{content}\n".encode())
    return h.hexdigest()
