"""Embedder entrypoint: one replica of the batch-embedding job (Vertex CustomJob, or a local process).

Each replica takes its deterministic share of the corpus (sorted ids, every n-th from its replica index in
``CLUSTER_SPEC``), embeds it, and writes a Parquet shard and a manifest (count, dim, fingerprint) to the run's
``embeddings/`` folder. Replica 0 also embeds the evaluation queries, with the previous promoted model too when
there is one, so the indexer can compare both indexes on the same qrels in the same run.

Full runs also embed with the untuned base model (``base_vector`` columns) when the shipped model is a fine-tune, so
the indexer can score the base-model baseline on the same queries in the same run; every shard carries
``bm25_text``, the document analyzed for BM25 (``embedpipe.retrieval.lexical``). Non-finite vectors fail the job.

Incremental mode (``--live-hashes``, DESIGN.md §3.2): the model is the promoted one; only documents whose content hash
differs from the live index's table are embedded (sharded across replicas), and the ids the corpus snapshot no longer
has go to ``deleted-*.parquet`` for the indexer to delete. GCS reads and writes run in a thread pool, overlapping the
model load and the query embedding.

Replica 0 writes ``intake.json`` (files its load left out for breaking cross-file rules; a left-out corpus file means
no deletions) and ``hashes.parquet``, the id -> content-hash table of the index this run leaves, which the indexer
records on the promoted entry and the next incremental run diffs against (no scan of Milvus). The table also holds
each document's line digest (``datasets.line_digest``): the next incremental run's load takes a corpus line with a
known digest as that row's document without decoding, parsing or hashing it again (``datasets.parse_corpus``), and
parses it only if it has to embed it (a rebuild). The log line at the end gives the seconds of each phase.

``python -m task serve`` runs the image as a Vertex AI serving container instead (``embedpipe.ml.serving``): the Model
Registry's versions name this image with the argument ``serve``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from embedpipe import logs
from embedpipe.config import Settings
from embedpipe.contracts import datasets
from embedpipe.control import incremental, intake
from embedpipe.gcp import bqsource, storage
from embedpipe.ml import distributed
from embedpipe.ml.embedding import encode, encode_each, shard
from embedpipe.ml.model import INFO_FILE, base_artifact, load_model
from embedpipe.retrieval import lexical

log = logging.getLogger("embedder")


def replica() -> tuple[int, int]:
    """(index, count) of this replica: its rank and world size from CLUSTER_SPEC (pool 0 is replica 0, pool 1 holds
    the rest) or torchrun env, parsed by the same code the trainer uses."""
    info = distributed.from_env()
    return info.rank, info.world_size


def write_parquet(uri: str, columns: dict) -> None:
    """Columns to Parquet in GCS; a column of numpy rows becomes a fixed-size float32 list (the vectors)."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(_table(columns), buf)
    storage.write_bytes(uri, buf.getvalue())


STRING_COLUMNS = ("id", "content_hash", "title", "text", "bm25_text", "metadata")
ROW_GROUP = 8192  # documents embedded and written per Parquet row group: the job holds one group's vectors


class ShardWriter:
    """A corpus shard written row group by row group to a local file, uploaded once complete: memory holds one
    group's vectors and columns, not the shard's."""

    def __init__(self, name: str):
        self._dir = Path(tempfile.mkdtemp(prefix="shard-"))
        self.path, self._writer = self._dir / name, None

    def write(self, columns: dict) -> None:
        import pyarrow.parquet as pq

        table = _table(columns)
        if self._writer is None:
            self._writer = pq.ParquetWriter(str(self.path), table.schema)
        self._writer.write_table(table)

    def close(self, uri: str, empty_columns: dict) -> None:
        try:
            if self._writer is None:  # no document in this shard: an empty file with the columns' names
                self.write(empty_columns)
            self._writer.close()
            storage.upload_file(self.path, uri)
        finally:  # the folder too: a job's many runs on one host (local stack, bench) must not fill /tmp
            shutil.rmtree(self._dir, ignore_errors=True)


def _table(columns: dict):
    import numpy as np
    import pyarrow as pa

    arrays = {}
    for key, col in columns.items():
        if len(col) and isinstance(col[0], np.ndarray):
            flat = np.asarray(col, dtype=np.float32)
            arrays[key] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        elif key in STRING_COLUMNS:  # typed, not inferred: every row group of a shard must have one schema
            arrays[key] = pa.array(col, type=pa.string())
        else:
            arrays[key] = pa.array(col)
    return pa.table(arrays)


def checked(vectors, what: str):
    """Vectors that are NaN or infinite would poison the index and every metric after it."""
    import numpy as np

    bad = ~np.isfinite(vectors).all(axis=1) if len(vectors) else []
    if len(vectors) and bad.any():
        raise ValueError(f"{int(bad.sum())} of {len(vectors)} {what} vectors are not finite (NaN or inf)")
    return vectors


def base_model_for(info, mode: str, model_uri: str):
    """(the untuned base model, its URI and info) at the shipped model's sequence length, when a full run shipped a
    fine-tune; (None, None, None) otherwise. The trainer keeps that model beside the fine-tune
    (``model.base_artifact``), so the base vectors and a fallback index served from them have one artifact and one
    fingerprint; a run trained before it did gets the base model it names (no fallback index then)."""
    if mode != "full" or not info.tuned or not info.base_model:
        return None, None, None
    uri = base_artifact(model_uri)
    if storage.exists(f"{uri}/{INFO_FILE}"):
        base, base_info = load_model(uri, inference=True)
        return base, uri, base_info
    base, _ = load_model(info.base_model, inference=True)
    base.max_seq_length = info.max_seq_length
    return base, None, None


def load_dataset(args, settings, live):
    """``intake.load_checked`` for this job. Incremental (``live``: the future of the live table's
    ``datasets.KnownLines``): lines the table names are not parsed again; the files download while the table is
    read, only their parse waits for it. Either way the corpus keeps each document's line digest, which the table
    this job writes records."""
    t = time.time()
    waited = 0.0

    def known() -> datasets.KnownLines:
        nonlocal waited
        start = time.time()
        lines = live.result() if live is not None else datasets.KnownLines()
        waited += time.time() - start
        return lines

    as_of = bqsource.as_of(args.as_of)
    loaded = intake.load_checked(args.data_bucket, args.dataset, settings, as_of=as_of, known=known)
    log.info("corpus loaded in %.1fs (%.1fs of it waiting for the live table)", time.time() - t, waited)
    return loaded


def main(argv: list[str]) -> int:
    settings = Settings.from_env()
    logs.setup(fmt=settings.log_format)
    if argv[:1] == ["serve"]:  # the same image as a Vertex AI serving container (the Model Registry's versions)
        from embedpipe.ml import serving

        return serving.main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--model-uri", required=True)
    p.add_argument("--previous-model-uri", default="")
    p.add_argument("--batch-tokens", type=int, default=0, help="0: per device (4096 CPU, 32768 GPU)")
    p.add_argument("--data-bucket", default=settings.data_bucket)
    p.add_argument("--as-of", default="", help="read BigQuery parts of the dataset as of this time (ISO 8601)")
    p.add_argument("--output-dir", default="", help="default: <run folder>/embeddings")
    p.add_argument(
        "--live-hashes",
        default="",
        help="incremental mode: Parquet (id, content_hash) of the live index; embed only new/changed documents",
    )
    p.add_argument("--job-key", default="", help="written into each manifest: the indexer takes only this job's shards")
    p.add_argument(
        "--max-inplace-share",
        type=float,
        default=1.0,
        help="incremental mode: a diff touching more of the live rows than this embeds every document (rebuild)",
    )
    p.add_argument(
        "--keep-absent",
        action="store_true",
        help="incremental mode: a corpus file was left out at launch: delete nothing, never rebuild",
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="incremental mode: embed every document into a new collection (the live one's contents are unknown)",
    )
    args = p.parse_args(argv)
    out = args.output_dir or args.model_uri.rstrip("/").rsplit("/", 1)[0] + "/embeddings"
    index, count = replica()
    t0 = time.time()
    phases = logs.Steps(t0)
    # GCS reads overlap: the live hash table and the corpus download while the model downloads and loads; the
    # corpus's parse waits for the table.
    with ThreadPoolExecutor(4) as writes:
        live = writes.submit(incremental.read_known, args.live_hashes) if args.live_hashes else None
        reading = writes.submit(load_dataset, args, settings, live)
        model, info = load_model(args.model_uri, inference=True)
        phases("model")
        ds, rejections, problem = reading.result()
        phases("corpus (beyond the model's load)")
        if index == 0:
            intake.write_report(f"{out}/{intake.REPORT_FILE}", rejections, problem)
        if ds is None:  # nothing usable: the pipeline reads intake.json and fails the run in "intake" (no retry)
            log.error("dataset %s: %s", args.dataset, problem)
            return 0
        # A corpus file left out (here, or at launch) is absent, not deleted (``incremental.plan``).
        keep_absent = args.keep_absent or any(intake.is_corpus(r) for r in rejections)
        corpus_hashes = datasets.content_hashes(ds.corpus)  # a known line's is the table's: not parsed for it
        mode, table, live_rows = ("incremental" if live else "full"), corpus_hashes, None
        kept: list[str] = []  # live rows the table keeps (a corpus file left out)
        if live:
            live_hashes = live.result().hashes
            live_rows = len(live_hashes)
            todo = incremental.plan(corpus_hashes, live_hashes, args.max_inplace_share, keep_absent, args.rebuild)
            mode, table, kept = todo.mode, todo.table, todo.kept
            ids, deleted = shard(todo.embed, index, count), shard(todo.delete, index, count)
            unchanged = todo.unchanged if index == 0 else 0  # counted once, by replica 0
        else:
            ids, deleted, unchanged = shard(list(ds.corpus), index, count), [], 0
        if index == 0:  # the id -> hash table of the index this run leaves: the next incremental run diffs against it
            # and skips parsing the lines it names: each document's, and a kept live row's own
            lines = getattr(ds.corpus, "digests", None)
            if kept:
                lines = incremental.table_lines(lines, live.result(), kept)
            pending_table = writes.submit(incremental.write_table, f"{out}/{incremental.TABLE_FILE}", table, lines)
        phases("diff")
        base, base_uri, base_info = base_model_for(info, mode, args.model_uri)
        name = f"corpus-{index:05d}-of-{count:05d}.parquet"
        deleted_name = f"deleted-{index:05d}-of-{count:05d}.parquet"
        # Row group by row group: embed ROW_GROUP documents, append them to the local shard file, drop them.
        shard_file = ShardWriter(name)
        dim = 0
        for start in range(0, len(ids), ROW_GROUP):
            part = ids[start : start + ROW_GROUP]
            docs = [ds.corpus[i] for i in part]
            texts = [d.full_text for d in docs]
            vectors = checked(encode(model, [info.document_prefix + t for t in texts], args.batch_tokens), "document")
            dim = vectors.shape[1]
            extra = {}
            if base is not None:
                based = encode(base, [info.document_prefix + t for t in texts], args.batch_tokens)
                extra["base_vector"] = list(checked(based, "base document"))
            shard_file.write(
                {
                    "id": part,
                    "vector": list(vectors),
                    "content_hash": [d.content_hash for d in docs],
                    "title": [d.title for d in docs],
                    "text": texts,
                    "bm25_text": lexical.analyzed(texts),
                    "metadata": [json.dumps(d.metadata) for d in docs],
                    **extra,
                }
            )
        phases("embed")
        empty = {c: [] for c in STRING_COLUMNS}
        # GCS writes overlap with the query embedding below; all finish before the manifest is written.
        pending = [
            writes.submit(shard_file.close, f"{out}/{name}", empty),
            writes.submit(write_parquet, f"{out}/{deleted_name}", {"id": deleted}),
        ]
        seconds = time.time() - t0
        if index == 0:
            qrels = ds.eval_qrels()
            qids = sorted(q for q in qrels if q in ds.queries)
            texts = [ds.queries[q] for q in qids]
            pending.append(writes.submit(storage.write_json, f"{out}/qrels.json", {q: qrels[q] for q in qids}))
            qv = checked(encode_each(model, texts, info.query_prefix), "query")  # as the search service encodes queries
            terms = lexical.analyzed(texts)  # the same analysis for both query tables
            qcols = {"id": qids, "text": texts, "bm25_text": terms, "vector": list(qv)}
            if base is not None:
                qb = encode_each(base, texts, info.query_prefix)
                qcols["base_vector"] = list(checked(qb, "base query"))
            pending.append(writes.submit(write_parquet, f"{out}/queries.parquet", qcols))
            if args.previous_model_uri:
                prev, prev_info = load_model(args.previous_model_uri, inference=True)
                pv = encode_each(prev, texts, prev_info.query_prefix)
                pending.append(
                    writes.submit(
                        write_parquet,
                        f"{out}/queries-previous.parquet",
                        {"id": qids, "text": texts, "bm25_text": terms, "vector": list(pv)},
                    )
                )
        if index == 0:
            pending.append(pending_table)
        phases("queries")
        for f in pending:
            f.result()
        phases("writes")
    # The manifest goes last: the indexer trusts a shard only once its manifest exists.
    storage.write_json(
        f"{out}/manifest-{index:05d}.json",
        {
            "file": name,
            "deleted_file": deleted_name,
            "mode": mode,
            "job_key": args.job_key,
            "replica": index,
            "replicas": count,
            "count": len(ids),
            "deleted": len(deleted),
            "unchanged": unchanged,
            "corpus_total": len(ds.corpus),
            # replicas load the corpus at their own moments: the indexer takes their shards only if all saw this
            "corpus_digest": incremental.digest(table),
            "live_rows": live_rows,
            # written by replica 0 only; every manifest names it so the indexer reads it from any
            "hashes_file": incremental.TABLE_FILE,
            "hashes_rows": len(table),
            "skipped": len(ds.skipped),  # documents with neither title nor text (the whole corpus' count)
            # documents this replica parsed: an incremental run's load takes a line the live table knows unparsed
            "parsed": getattr(ds.corpus, "parsed", len(ds.corpus)),
            "qrels_absent": ds.qrels_absent.get(ds.eval_split() or "", 0),
            "eval_split": ds.eval_split(),
            "tuned": info.tuned,
            "has_base": base is not None,
            # the base model's own artifact: what a first run whose fine-tune loses can serve (indexing's fallback)
            "base_model_uri": base_uri,
            "base_fingerprint": base_info.fingerprint if base_info else None,
            "search": info.search,
            "dim": int(info.dim or dim),
            "fingerprint": info.fingerprint,
            "model_uri": args.model_uri,
            "seconds": round(seconds, 3),
            "docs_per_s": round(len(ids) / seconds, 2) if seconds else None,
        },
    )
    phases("manifest")
    log.info(
        "replica %d/%d (%s): embedded %d docs in %.1fs; %d deleted, %d unchanged; %d of %d documents parsed; "
        "seconds by phase: %s",
        index,
        count,
        mode,
        len(ids),
        seconds,
        len(deleted),
        unchanged,
        getattr(ds.corpus, "parsed", len(ds.corpus)),
        len(ds.corpus),
        phases,
    )
    return 0


def exit_now(code: int) -> None:
    """End the process without tearing down its heap and libraries: measured ~1.5 s of interpreter shutdown after
    the last write (torch, transformers, the corpus), which the run waits for. Everything the job writes is written
    by now (GCS writes are synchronous); only the log handlers and stdio are flushed. A failure (an exception) exits
    the ordinary way."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
