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

The table also keeps each document's line digest (``line``: ``datasets.line_digest`` of the corpus line it came
from; null for a BigQuery row). The next run's load takes a line whose digest the table has as that row's document
(``datasets.KnownLines``): the same bytes parse to the same document, so only new or changed lines are decoded,
parsed and hashed, and the content hash itself is never redefined. What needs the other lines still runs on all of
them (an id seen twice, across files too); ids the corpus lost are deleted as before.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
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
    deleted = sorted(live.keys() - corpus_hashes.keys())
    return Diff(changed, deleted, len(corpus_hashes) - len(changed))


@dataclass(frozen=True)
class Plan:
    """What an incremental embed job does: embed ``embed``, delete ``delete``, leave ``table`` for the next run."""

    mode: str  # "incremental" (in place) or "rebuild" (every document, into a new collection behind the gate)
    embed: list[str]
    delete: list[str]  # live ids the corpus lost (rebuild: the new collection lacks them)
    unchanged: int
    table: dict[str, str]  # the id -> content hash table of the index after this run
    kept: list[str]  # live rows the table keeps for documents absent, not deleted (``keep_absent``), sorted


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
        return Plan("rebuild", list(corpus), gone, 0, corpus, [])
    kept = d.deleted if keep_absent else []
    table = {**{i: live[i] for i in kept}, **corpus} if kept else corpus
    return Plan("incremental", d.changed, gone, d.unchanged, table, kept)


def table_lines(
    lines: Mapping[str, bytes] | None, known: datasets.KnownLines, kept: list[str]
) -> Mapping[str, bytes] | None:
    """The line digests of the table a run leaves: its corpus's (``lines``), and for each row it keeps from the live
    table (``Plan.kept``: a corpus file left out) that row's own: the row is carried whole (id, hash, line), so the
    file's lines are known again when it comes back unchanged. None when the corpus has none (a full parse)."""
    if lines is None or not kept:
        return lines
    return {**known.line_ids().digests_of(kept), **lines}  # disjoint: a kept id is not in the corpus


def write_table(uri: str, hashes: Mapping[str, str], lines: Mapping[str, bytes] | None = None) -> None:
    """The id -> content hash table (``TABLE_FILE``), sorted by id, with each document's line digest
    (``datasets.line_digest``; null for a document that came from no line of a file, e.g. a BigQuery row, or whose
    line this run did not read) when ``lines`` is given: the next incremental run skips the parse of those lines."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    columns = {
        "id": pa.array(list(hashes), pa.string()),
        "content_hash": pa.array(list(hashes.values()), pa.string()),
    }
    if lines is not None:
        columns["line"] = pa.array(list(map(lines.get, hashes)), pa.binary(datasets.LINE_DIGEST_BYTES))
    table = pa.table(columns)
    table = table.take(pc.sort_indices(table, [("id", "ascending")]))  # UTF-8 byte order: Python's str order
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(uri, buf.getvalue())


def read_known(uri: str) -> datasets.KnownLines:
    """A table as the incremental embed job uses it: its id -> content hash rows (the diff's base) and, from the
    rows that have one, line digest -> id (the corpus lines its load need not parse; none in a table written before
    the digests were), kept as the column's bytes (``datasets.LineIds``), not a dict of a million entries."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    ids = table.column("id").to_pylist()
    hashes = dict(zip(ids, table.column("content_hash").to_pylist()))
    lines = datasets.LineIds(b"", [])
    if "line" in table.column_names:
        with_line = table.filter(pc.is_valid(table.column("line"))) if table.column("line").null_count else table
        known_ids = ids if with_line is table else with_line.column("id").to_pylist()
        column = with_line.column("line").combine_chunks()  # fixed-size binary: its data buffer is the digests
        if len(column):
            size = datasets.LINE_DIGEST_BYTES
            digests = memoryview(column.buffers()[1])[column.offset * size : (column.offset + len(column)) * size]
            lines = datasets.LineIds(digests, known_ids)
    return datasets.KnownLines(lines, hashes)


DIGEST_CHUNK = 8192  # rows hashed per update: the text of a chunk, not of the whole table, is held at once


def digest(table: dict[str, str]) -> str:
    """A fingerprint of an id -> hash table, whatever order it was loaded in (a BigQuery read session's streams come
    in no fixed order): replicas that read the same documents agree on it. BLAKE2b-128 of the rows
    ``"{id}\\0{hash}\\n"`` in id order, fed a chunk of rows at a time (the same value as one update of their whole
    text, which at a million rows is ~100 MB)."""
    h = hashlib.blake2b(digest_size=16)
    rows = sorted(table.items())
    for start in range(0, len(rows), DIGEST_CHUNK):
        h.update("".join([f"{i}\0{content}\n" for i, content in rows[start : start + DIGEST_CHUNK]]).encode())
    return h.hexdigest()
