"""The indexer's work for one run: load embedding shards into Milvus, evaluate, gate, swap the alias, register the
promoted model in the model registry (``embedpipe.index.registry``; the run record's ``registry``), publish.

Resumable: rows are upserted by primary key, so a redelivered request rewrites the same rows, and a load records
how far it got (``Progress``), so the next delivery upserts only the rest; a delivery that has run for
``index_delivery_budget_s`` hands over to a new index request (``Handover``), so a load of any size completes over
several deliveries, none past Pub/Sub's ack deadline. The run record moves INDEXING -> PUBLISHING (with the event
stored) -> SUCCEEDED, so a redelivery after a crash republishes the stored event with the same ``ce-id`` instead of
computing a different one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import time

import numpy as np

from embedpipe.config import Settings
from embedpipe.contracts.events import INDEX_UPDATED, Event, validate
from embedpipe.contracts.records import (
    FULL,
    CountsSkipped,
    DatasetState,
    IndexUpdated,
    Kind,
    ModelInfo,
    PromotedEntry,
    RunRecord,
    index_updated_payload,
    promoted_entry,
    without_absent,
)
from embedpipe.gcp import storage
from embedpipe.index import bulkload, registry, report, rollback
from embedpipe.ledger import runs
from embedpipe.ledger.lifecycle import Lifecycle, embeddings_uri, publish_stalled
from embedpipe.ledger.runs import INDEXING, PUBLISHING, Ledger
from embedpipe.logs import Steps
from embedpipe.retrieval import evaluation, vectorstore

log = logging.getLogger(__name__)

UPSERT_BATCH = 1000
# The off-the-shelf hybrid a user assembles by hand: RRF (k 60, equal weights) of stemmed BM25 and the untuned base
# model, scored beside the run's own modes in every full run (``metrics_by_mode``) and one of a first run's fallbacks.
OFF_THE_SHELF = "bm25+base"
OFF_THE_SHELF_SEARCH = {"fusion": "rrf", "hybrid_weight": 0.5, "rrf_k": evaluation.RRF_K}
# What a first run whose own index the gate rejects serves instead (``_fallback``): the measured mode, how search
# answers it on the base index, and how the event names it.
FALLBACKS = {
    "base": ("dense", "base model"),
    "bm25": ("bm25", "BM25"),
    OFF_THE_SHELF: ("hybrid", "RRF of BM25 and the base model"),
}
# What upserts read from a shard: the base model's vectors (only the eval baseline needs them) stay in the file.
UPSERT_COLUMNS = ("id", "vector", "text", "bm25_text", "title", "content_hash", "metadata")
# A delivery polls a bulk import at most this long (inside Pub/Sub's 600 s ack deadline); reconcile's re-request
# resumes the same import job later.
IMPORT_POLL_S = 420.0
# A load records how far it got at most this often (a ledger write; also at each shard's end and at a hand-over), so
# a delivery that dies redoes at most this much of the load.
LOAD_CHECKPOINT_S = 30.0


def embed_output(ledger, record: RunRecord) -> tuple[str, str | None]:
    """(the embed attempt's folder, the job key its manifests must carry; None for a record without an embed job)."""
    job = record["jobs"].get("embed")
    attempt = (job or {}).get("attempt", 1)
    key = f"{record['run_id']}/embed/{attempt}" if job else None
    return embeddings_uri(ledger.run_dir(record["run_id"]), attempt), key


def permanent_milvus_error(exc: BaseException) -> bool:
    """A Milvus refusal that a retry of the same shards cannot change: bad parameters or data (an over-long id, too
    many queries, a wrong dimension). Only these fail the run at once; anything else (unreachable, busy, a race
    between two deliveries creating one collection) is raised, so the delivery is retried and, past the retries,
    reconcile's re-request and deadline decide."""
    from pymilvus.exceptions import DataNotMatchException, MilvusException, ParamError

    if isinstance(exc, (ParamError, DataNotMatchException)):
        return True
    text = str(exc).lower()
    refusals = ("exceeds max length", "exceed max length", "number of search vectors", "out of range", "dimension")
    return isinstance(exc, MilvusException) and any(r in text for r in refusals)


def read_parquet(uri: str):
    """A small Parquet file (the eval queries) read whole; shards are streamed instead."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def load_manifests(embed_uri: str, job_key: str | None = None) -> list[dict]:
    manifests = [
        storage.read_json(u)
        for u, _ in storage.list_uris(f"{embed_uri}/")
        if u.rsplit("/", 1)[-1].startswith("manifest-")
    ]
    if not manifests:
        raise FileNotFoundError(f"no embedding manifests under {embed_uri}/")
    n = manifests[0]["replicas"]
    if len(manifests) != n:
        raise ValueError(f"{embed_uri}: {len(manifests)} shard manifests, expected {n}")
    # Replicas read the corpus at their own moments: an upload between them could split the rebuild decision.
    if len({(m.get("mode"), m.get("corpus_total"), m.get("corpus_digest")) for m in manifests}) != 1:
        raise ValueError(f"{embed_uri}: shards disagree on mode or corpus (the corpus changed while embedding)")
    stale = [m["replica"] for m in manifests if job_key and m.get("job_key") != job_key]
    if stale:
        raise ValueError(f"{embed_uri}: shard manifests of replica(s) {stale} were not written by job {job_key}")
    if len({(m["fingerprint"], m["dim"]) for m in manifests}) != 1:
        raise vectorstore.FingerprintMismatch(f"{embed_uri}: shards disagree on model fingerprint or dim")
    return sorted(manifests, key=lambda m: m["replica"])


def rank(client, collection: str, queries, search: dict | None, k: int = 100) -> dict[str, dict[str, list[str]]]:
    """Rankings of every search mode the collection has (dense, bm25, hybrid) for the eval queries: dense and BM25
    searched once each, hybrid fused from them with the model's weight, exactly as the search service does."""
    ids = queries.column("id").to_pylist()
    vectors = queries.column("vector").to_pylist()
    # STRONG: the rankings see every row this indexing wrote (a collection's default, Bounded, may lag them)
    dense = vectorstore.search_dense(client, collection, vectors, max(k, vectorstore.DEPTH), vectorstore.STRONG)
    out = {"dense": {q: [d for d, _ in hits[:k]] for q, hits in zip(ids, dense)}}
    if "bm25_text" in queries.column_names and vectorstore.has_field(client, collection, "bm25_text"):
        texts = queries.column("bm25_text").to_pylist()
        sparse = vectorstore.search_sparse(client, collection, texts, max(k, vectorstore.DEPTH), vectorstore.STRONG)
        out["bm25"] = {q: [d for d, _ in hits[:k]] for q, hits in zip(ids, sparse)}
        out["hybrid"] = {q: [d for d, _ in vectorstore.fused(a, b, k, search)] for q, a, b in zip(ids, dense, sparse)}
    return out


def rank_base(embed_uri: str, manifests: list[dict], queries, k: int = 100) -> dict[str, list[str]]:
    """The untuned base model's exact top-k for the eval queries, streamed from each shard ``UPSERT_BATCH`` rows
    at a time, ids and base vectors only (memory: queries x (k + batch); a whole shard as one block was
    queries x shard)."""
    top = evaluation.TopK(np.asarray(queries.column("base_vector").to_pylist(), dtype=np.float32), k)
    for m in manifests:
        with storage.open_read(f"{embed_uri}/{m['file']}") as f:
            for part in batches(f, ["id", "base_vector"]):
                if part.num_rows:
                    vectors = np.asarray(part.column("base_vector").flatten(), dtype=np.float32)
                    top.add(part.column("id").to_pylist(), vectors.reshape(part.num_rows, -1))
    return top.ranked(queries.column("id").to_pylist())


def off_the_shelf(base: dict[str, list[str]], bm25: dict[str, list[str]], k: int = 100) -> dict[str, list[str]]:
    """RRF of the base model's and BM25's rankings (``OFF_THE_SHELF_SEARCH``), computed in memory from ranks alone,
    as search's hybrid mode fuses them on a collection of base vectors."""
    s = OFF_THE_SHELF_SEARCH
    return {
        q: [
            d
            for d, _ in evaluation.fuse(
                [(d, 0.0) for d in base.get(q, [])],
                [(d, 0.0) for d in bm25.get(q, [])],
                s["hybrid_weight"],
                s["fusion"],
                s["rrf_k"],
                limit=k,
            )
        ]
        for q in base
    }


def agreement(selection: dict | None, test: dict, metric: str = "ndcg@10") -> dict | None:
    """After the fact, for the record only (nothing is chosen with it): how far the selection split's ranking of the
    search modes agreed with the eval split's. ``test_loss``: what the mode best on selection scores below the mode
    best on test (0 when they are the same); ``pairs``: mode pairs both splits order alike, of all pairs."""
    sel = (selection or {}).get("by_mode") or {}
    modes = [m for m in vectorstore.MODES if metric in (sel.get(m) or {}) and metric in (test.get(m) or {})]
    if len(modes) < 2:
        return None
    on_sel = sorted(modes, key=lambda m: -sel[m][metric])
    on_test = sorted(modes, key=lambda m: -test[m][metric])
    pairs = [(a, b) for i, a in enumerate(modes) for b in modes[i + 1 :]]
    alike = sum((sel[a][metric] - sel[b][metric]) * (test[a][metric] - test[b][metric]) > 0 for a, b in pairs)
    return {
        "metric": metric,
        "selection_order": on_sel,
        "test_order": on_test,
        "pairs": f"{alike}/{len(pairs)}",
        "test_loss": round(test[on_test[0]][metric] - test[on_sel[0]][metric], 6),
    }


def score(ranked: dict, qrels: dict, served_mode: str) -> dict:
    """Metrics of every mode on the eval qrels; ``served`` is the mode search answers with by default (chosen at
    training time on the selection split, never here on test)."""
    rows = {mode: evaluation.per_query(r, qrels) for mode, r in ranked.items()}
    by_mode = {mode: m for mode, r in rows.items() if (m := evaluation.averaged(r))}
    if not by_mode:  # no query with a relevant document: nothing measured
        return {"by_mode": {}, "default_mode": served_mode, "metrics": {}}
    mode = served_mode if served_mode in by_mode else "dense"
    by_mode["served"] = by_mode[mode]
    # per query, for the gate's paired comparisons (``compare``): what is served and what it is gated against
    per_query = {"served": rows[mode], **{m: rows[m] for m in ("bm25", "base") if m in by_mode}}
    return {"by_mode": by_mode, "default_mode": mode, "metrics": by_mode[mode], "per_query": per_query}


def compare(new: dict, old: dict | None, metrics: tuple[str, ...]) -> list[dict]:
    """The served ranking against each thing the gate compares it with (BM25 alone, the untuned base model, the
    live index), per gate metric: ``evaluation.paired``'s mean difference and p-value, so a summary can say
    whether a difference is more than noise. ``new``/``old``: ``score``'s results."""
    served = (new.get("per_query") or {}).get("served")
    if not served:
        return []
    rivals = {m: r for m in ("bm25", "base") if (r := new["per_query"].get(m))}
    if old and (live := (old.get("per_query") or {}).get("served")):
        rivals["live index"] = live
    return [{"rival": name, **evaluation.paired(served, rows, m)} for name, rows in rivals.items() for m in metrics]


def significant_gain(comparisons: list[dict]) -> str | None:
    """Why a run that passed the gate is refused when ``gate_require_significant_gain`` is set: it has a live index
    to replace and is not significantly better than it on any gate metric. None when it is, or when no live index
    was measured."""
    live = [c for c in comparisons if c["rival"] == "live index"]
    if not live or any(c["significant"] and c["delta"] > 0 for c in live):
        return None
    said = "; ".join(f"{c['metric']} {c['delta']:+.4f} (p={c['p']:.2f})" for c in live)
    return f"rejected: no significant gain over the live index ({said}; EMBEDPIPE_GATE_REQUIRE_SIGNIFICANT_GAIN)"


def index_run(pipe: Lifecycle, run_id: str, reg: registry.ModelRegistry | None = None) -> str:
    """Index a run (see the module doc); ``reg`` is where its model is registered if promoted (default: the
    settings' model registry). ``pipe`` gives the ledger and the run's endings (the services pass their ``Pipeline``;
    only its ``Lifecycle`` part is used: the indexer ends runs and frees datasets, it never launches a job)."""
    record = pipe.ledger.get_run(run_id)
    if record is None:
        return f"unknown run {run_id}: ignored"
    if record["state"] in runs.TERMINAL:
        return f"run {run_id} already {record['state']}: duplicate request ignored"
    if record["state"] == PUBLISHING:
        if not publish_stalled(record, pipe.clock()):
            return f"run {run_id} is being published by another delivery: ignored"
        return pipe.finish(record)  # the delivery that stored the event died before publishing it
    if record["state"] != INDEXING:
        return f"run {run_id} is {record['state']}, not ready to index: ignored"
    try:
        return _index(pipe, record, reg or registry.for_settings(pipe.settings))
    except (Handover, vectorstore.IndexBuilding) as exc:  # acked: a new request continues from what was recorded
        part = record.get("handovers", 0) + 1
        if not _claim_handover(pipe.ledger, run_id, part):  # a duplicate delivery of this step: one chain only
            return f"run {run_id}: {exc}; another delivery already handed over"
        pipe.request_index(record, part=part)
        return f"run {run_id}: {exc}; continued by a new index request"
    except RunLeft as exc:
        return f"run {run_id}: {exc}"
    except bulkload.ImportPending as exc:  # acked: reconcile re-requests the index and this job is polled again
        return f"run {run_id}: bulk import {exc.job_id} still running; resumed by the next index request"
    except (
        vectorstore.FingerprintMismatch,
        FileNotFoundError,
        ValueError,
        bulkload.ImportFailed,
        bulkload.ImportConflict,
    ) as exc:
        pipe.fail(run_id, "index", str(exc))  # permanent: retrying the same shards cannot help
        return f"run {run_id}: FAILED in index: {exc}"
    except Exception as exc:
        if not permanent_milvus_error(exc):
            raise  # transient: the delivery is retried
        pipe.fail(run_id, "index", f"Milvus refused the load: {exc}")
        return f"run {run_id}: FAILED in index (Milvus): {exc}"


def decide(
    new: dict, old: dict | None, metrics: tuple[str, ...], tolerance: float, had_previous: bool
) -> tuple[bool, str]:
    """The gate for a full run (test qrels; the only use of test labels besides reporting): the served mode must be
    at least as good as BM25 alone and the untuned base model (those ``new`` has), and as the live index it would
    replace, on every gate metric, within ``tolerance``. First runs are gated against the baselines too."""
    served = new.get("served") or {}
    if not served and old:  # e.g. the test qrels (file or table) were left out of this run: nothing to compare
        return False, "rejected: no eval qrels in this run, and the live index was measured on them"
    if not served:
        return True, "no eval qrels: promoted unmeasured" if not had_previous else "no eval qrels"
    rivals = {m: new[m] for m in ("bm25", "base") if new.get(m)}
    if old:
        rivals["live index"] = old
    failed, passed = [], []
    for name, other in rivals.items():
        for metric in metrics:
            a, b = served.get(metric, 0.0), other.get(metric, 0.0)
            (passed if a >= b - tolerance else failed).append(f"{metric} {a:.4f} vs {name} {b:.4f}")
    what = "first index for this dataset; " if not had_previous else ""
    if failed:
        return False, f"{what}rejected: served is worse on " + "; ".join(failed) + f" (tolerance {tolerance})"
    return True, f"{what}promoted: " + ("; ".join(passed) or "nothing to compare with")


class Handover(Exception):
    """This delivery has spent its time budget (``index_delivery_budget_s``) part-way through a load: how far it got
    is recorded (``Progress``) and a new index request continues from there."""


class RunLeft(Exception):
    """The run left INDEXING (failed past its deadline, or finished by another delivery) while this one loaded."""


def _claim_handover(ledger: Ledger, run_id: str, part: int) -> bool:
    """Whether this delivery is the one that hands over for the ``part``-th time: Pub/Sub duplicates and reconcile's
    re-requests run beside the chain, and each would otherwise start a chain of its own, for good."""
    won = False

    def fn(r):
        nonlocal won
        won = r["state"] == INDEXING and r.get("handovers", 0) == part - 1
        return {**r, "handovers": part} if won else None

    ledger.update_run(run_id, fn)
    return won


class Progress:
    """How far one load into one collection got, kept in the run record (``loads[key]``: rows loaded per shard file),
    so that the next delivery, after a crash or a hand-over, upserts only the rest. Stamped with the collection's
    creation time and the shards' folder: a recreated collection or another embed attempt starts again from row 0.
    Saved every ``LOAD_CHECKPOINT_S``, at each shard's end and at a hand-over, never on an error: what is recorded was
    upserted. ``until``: when (``clock``, monotonic) this delivery hands over."""

    def __init__(self, ledger: Ledger, run_id: str, key: str, stamp: str, until: float, clock=time.monotonic):
        self.ledger, self.run_id, self.key, self.stamp = ledger, run_id, key, stamp
        self.until, self.clock = until, clock
        entry = ((ledger.get_run(run_id) or {}).get("loads") or {}).get(key) or {}
        self.done: dict[str, int] = dict(entry.get("shards") or {}) if entry.get("stamp") == stamp else {}
        self.resumed = sum(self.done.values())  # rows an earlier delivery loaded
        self.saved_at = clock()

    def rows(self, file: str) -> int:
        return self.done.get(file, 0)

    def advance(self, file: str, rows: int, shard_done: bool = False) -> None:
        """The first ``rows`` rows of ``file`` are upserted. Past ``until`` (and rows still to load), hand over."""
        self.done[file] = rows
        now = self.clock()
        if shard_done or now >= self.until or now - self.saved_at >= LOAD_CHECKPOINT_S:
            self.save()
        if now >= self.until and not shard_done:
            rows, collection = sum(self.done.values()), self.key.split("/")[0]
            raise Handover(f"{rows} rows loaded into {collection} so far (this delivery's time is spent)")

    def save(self) -> None:
        """Record ``done`` (merged with another delivery's, which may be further along in some shard). Its ``at``
        moves only with rows: the index deadline counts from it, and deliveries that load nothing must not hold it
        off. Raises ``RunLeft`` once the run is no longer INDEXING: the load is nobody's business any more."""
        done, stamp, left = dict(self.done), self.stamp, None

        def fn(r):
            nonlocal left
            left = r["state"] if r["state"] != INDEXING else None
            if left:
                return None
            loads = dict(r.get("loads") or {})
            old = loads.get(self.key) or {}
            shards = dict(done)
            if old.get("stamp") == stamp:
                for f, n in (old.get("shards") or {}).items():
                    shards[f] = max(n, shards.get(f, 0))
                if sum(shards.values()) <= sum((old.get("shards") or {}).values()):
                    return None  # nothing new
            loads[self.key] = {"stamp": stamp, "shards": shards, "at": runs.iso(self.ledger.clock())}
            return {**r, "loads": loads}

        self.ledger.update_run(self.run_id, fn)
        if left:
            raise RunLeft(f"the run is {left}: its load stopped")
        self.saved_at = self.clock()


def load_progress(x: Indexing, collection: str, vector: str = "vector") -> Progress:
    """The progress of loading the run's shards' ``vector`` column into ``collection`` (created before)."""
    stamp = f"{x.watch(vectorstore.created_at, x.client, collection)}|{x.embed_uri}"
    return Progress(x.ledger, x.run_id, f"{collection}/{vector}", stamp, x.until)


class Stopwatch:
    """Seconds spent inside Milvus calls (reported as ``milvus_seconds``, so orchestration overhead is measurable)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, fn, *args, **kwargs):
        t = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds += time.time() - t


def load_shards(
    s,
    client,
    collection: str,
    embed_uri: str,
    manifests: list[dict],
    watch: Stopwatch,
    fresh: bool,
    bulk=None,
    vector: str = "vector",
    progress: Progress | None = None,
) -> int:
    """Upsert every shard (or bulk import, for a large fresh collection on a server that can); returns rows.
    ``progress``: where an earlier delivery's upserts stopped, and this delivery's record of its own (upserts only);
    the rows returned are then those of every delivery.
    ``bulk`` is (recorded import job id or None, a callable that records a new one before it is polled). ``vector``:
    the shards' column that fills the dense field (``base_vector`` for a first run's fallback index: always upserted,
    since a bulk import stages the shards as they are).

    Streamed: each shard is read from GCS through ranged reads (nothing is downloaded: Cloud Run's /tmp is memory)
    and upserted ``UPSERT_BATCH`` rows at a time, so the indexer holds a row group, not the corpus. Every shard's
    row count is checked against its manifest, from its Parquet footer, before anything is loaded; the versions
    checked are the ones loaded."""
    with contextlib.ExitStack() as opened:
        shards = [parquet(opened.enter_context(storage.open_read(f"{embed_uri}/{m['file']}"))) for m in manifests]
        for m, shard in zip(manifests, shards):
            if (rows := pq_rows(shard)) != m["count"]:
                raise ValueError(f"{m['file']}: {rows} rows, manifest says {m['count']}")
        total = sum(m["count"] for m in manifests)
        if fresh and vector == "vector" and bulkload.wanted(s, total):
            job_id, on_started = bulk or (None, None)
            try:  # a recorded job is only polled again: importing twice would duplicate rows (import does not upsert)
                files = (
                    []
                    if job_id
                    else bulkload.stage_files(shards, s.bulk_import_bucket, f"embedpipe-import/{collection}")
                )
                return watch(
                    bulkload.run_import,
                    s,
                    collection,
                    files,
                    job_id=job_id,
                    on_started=on_started,
                    deadline_s=IMPORT_POLL_S,
                )
            except bulkload.ImportUnsupported as exc:
                log.warning("bulk import unavailable (%s): loading %s with upserts", exc, collection)
        files = [m["file"] for m in manifests]
        return upsert_tables(client, collection, shards, watch, vector=vector, progress=progress, files=files)


def parquet(source):
    """A ``pq.ParquetFile`` over a local path or a seekable file (e.g. ``storage.open_read``); one passes through."""
    import pyarrow.parquet as pq

    return source if isinstance(source, pq.ParquetFile) else pq.ParquetFile(source)


def pq_rows(source) -> int:
    """Rows of a Parquet file, from its footer alone."""
    return parquet(source).metadata.num_rows


def batches(source, columns, batch: int = UPSERT_BATCH, skip: int = 0):
    """Record batches of at most ``batch`` rows of a Parquet file, ``columns`` only, read row group by row group,
    from the one holding row ``skip`` on (row groups wholly before it are not read; its own rows before ``skip`` are
    read and dropped). Measured (pyarrow 26): one ``iter_batches`` over a whole file grows the process with the rows
    read (about +130 MB for 400k rows), one per row group stays flat."""
    f = parquet(source)
    start = 0
    for i in range(f.num_row_groups):
        n = f.metadata.row_group(i).num_rows
        if start + n > skip:
            for b in f.iter_batches(batch_size=batch, row_groups=[i], columns=list(columns)):
                if start + b.num_rows > skip:
                    yield b.slice(max(0, skip - start))
                start += b.num_rows
        else:
            start += n


def upsert_tables(
    client,
    collection: str,
    shards,
    watch: Stopwatch,
    batch: int | None = None,
    vector: str = "vector",
    progress: Progress | None = None,
    files: list[str] | None = None,
) -> int:
    """Row upserts in batches (by primary key, so a redelivered request rewrites the same rows), read from each shard
    (a ``pq.ParquetFile``, a local Parquet path or an in-memory table) ``batch`` rows at a time. Vectors go over as
    numpy rows: turning them into Python lists first costs more than the rows' whole build. Rows are built in this
    thread: measured on Milvus Lite (2 cores, server-bound), building them in a background thread was no faster.
    With ``progress`` (``files`` name the shards), each shard starts where the recorded progress says, and the rows
    returned count those earlier deliveries loaded."""
    import pyarrow as pa

    batch = batch or UPSERT_BATCH
    files = files or [str(i) for i in range(len(shards))]

    def pieces():
        """(shard's file, rows of it loaded once this piece is, whether that is all of it, the piece)"""
        for file, shard in zip(files, shards):
            done = progress.rows(file) if progress else 0
            if isinstance(shard, pa.Table):
                total = shard.num_rows
                parts = (shard.slice(start, batch) for start in range(done, total, batch))
            else:
                total = pq_rows(shard)
                columns = [vector if c == "vector" else c for c in UPSERT_COLUMNS]
                parts = (pa.Table.from_batches([b]) for b in batches(shard, columns, batch, skip=done))
            for part in parts:
                done += part.num_rows
                yield file, done, done >= total, part

    def rows_of(part):
        vectors = np.asarray(part.column(vector).combine_chunks().flatten(), dtype=np.float32)
        cols = {c: part.column(c).to_pylist() for c in ("id", "text", "bm25_text", "title", "content_hash", "metadata")}
        return vectorstore.rows_from(
            cols["id"],
            list(vectors.reshape(part.num_rows, -1)),
            cols["text"],
            cols["bm25_text"],
            cols["title"],
            cols["content_hash"],
            [json.loads(x) for x in cols["metadata"]],
        )

    upserted = 0
    for file, done, last, part in pieces():
        if part.num_rows:
            upserted += watch(vectorstore.upsert_batch, client, collection, rows_of(part))
        if progress:
            progress.advance(file, done, shard_done=last)
    return progress.resumed + upserted if progress else upserted


def delete_removed(client, collection: str, embed_uri: str, manifests: list[dict], watch: Stopwatch) -> int:
    deleted = 0
    for m in manifests:
        if not m.get("deleted"):
            continue
        with storage.open_read(f"{embed_uri}/{m['deleted_file']}") as f:  # streamed: a mass delete can be large
            for part in batches(f, ["id"]):
                ids = part.column("id").to_pylist()
                watch(vectorstore.delete_ids, client, collection, ids)
                deleted += len(ids)
    return deleted


def absent_now(ledger, record: RunRecord) -> list[str]:
    """The corpus parts absent for this run: those it launched with or its jobs left out, and those quarantined
    since it launched (its jobs listed the bucket without them), less those an ``allow_shrink`` retrain releases."""
    parts = set(record.get("absent_parts") or []) | set(ledger.get_dataset(record["dataset"]).get("absent_parts") or {})
    return sorted(parts - set(record.get("released_parts") or []))


def check_deletes(s, record: RunRecord, manifests: list[dict], absent: list[str] = ()) -> int:
    """An incremental run deletes the live documents its corpus snapshot lacks. A corpus re-uploaded part by part
    would delete the rest, so more than ``max_delete_share`` of the live rows is refused (ValueError: the run fails,
    nothing indexed changes); a retrain rebuilds from the corpus instead, behind the gate."""
    removed = sum(m.get("deleted", 0) for m in manifests)
    # the promoted entry's count, else what the embedder read from the table (an entry promoted without one)
    live = (record.get("live") or {}).get("rows") or manifests[0].get("live_rows") or 0
    if record.get("skip_deletes"):  # a corpus file was rejected: its documents are absent, not deleted
        return 0
    if removed and absent:  # quarantined after this run's jobs listed the bucket: they took its documents as gone
        raise ValueError(
            f"corpus part(s) {', '.join(absent)} were quarantined while this run was under way: it deletes nothing "
            f"(its {removed} deletions may be their documents); the next run keeps them as absent"
        )
    if removed and removed > s.max_delete_share * live:
        raise ValueError(
            f"refusing to delete {removed} of the {live} live documents ({removed / max(live, 1):.1%} > "
            f"EMBEDPIPE_MAX_DELETE_SHARE={s.max_delete_share:.0%}): the corpus in the bucket is the full snapshot, so "
            f"documents missing from it would leave the index. Upload the whole corpus, or request a retrain "
            f"(embedpipe retrain --dataset {record['dataset']}), which rebuilds the index from the corpus and gates it"
        )
    return removed


def _record_fields(ledger, run_id: str, **fields) -> None:
    ledger.update_run(run_id, lambda r: {**r, **fields} if r["state"] == INDEXING else None)


def _bulk(ledger, record: RunRecord):
    """(recorded bulk-import job id, recorder) for this run: the id is stored before the job is polled."""

    def on_started(job_id: str) -> None:
        _record_fields(ledger, record["run_id"], bulk_import={"job_id": job_id, "at": runs.iso(ledger.clock())})

    return (record.get("bulk_import") or {}).get("job_id"), on_started


def stage_seconds(record: RunRecord, t0: float) -> dict[str, float]:
    """Seconds the run spent in each stage it finished (``train``, ``embed``, ...), and in this indexing (``index``,
    since ``t0``)."""
    times = record.get("stage_times", {})
    out = {st.lower(): round(v["end"] - v["start"], 3) for st, v in times.items() if v.get("start") and v.get("end")}
    out["index"] = round(time.time() - t0, 3)
    return out


def trainer_output(record: RunRecord) -> dict:
    """What the trainer wrote beside its model folder (``metrics.json``: model version, shipped reason, selection,
    loss curve); empty for a run without a trained model."""
    if not record.get("model", {}).get("uri"):
        return {}
    model_parent = record["model"]["uri"].rstrip("/").rsplit("/", 1)[0]
    return storage.read_json(f"{model_parent}/metrics.json") or {}


def model_info(uri: str, manifest: dict, trainer_metrics: dict) -> ModelInfo:
    """The index-updated ``model``: the embedder's fingerprint and dim, the trainer's version and choices."""
    return {
        "uri": uri,
        "version": trainer_metrics.get("model_version", manifest["fingerprint"]),
        "dim": manifest["dim"],
        "fingerprint": manifest["fingerprint"],
        "tuned": manifest.get("tuned", True),
        "shipped_reason": trainer_metrics.get("shipped_reason", ""),
        "max_seq_length": trainer_metrics.get("max_seq_length"),
    }


@dataclasses.dataclass
class Indexing:
    """One indexing of a run: what every kind reads. ``promoted_before``: the dataset's promoted entry as the
    indexing began (``{}`` when none), the index a full or rebuilt run is gated against and an in-place run edits."""

    pipe: Lifecycle
    record: RunRecord
    embed_uri: str
    manifests: list[dict]
    client: object
    watch: Stopwatch
    promoted_before: PromotedEntry | dict
    t0: float
    step: Steps  # seconds by step, for the log line (where an incremental run's index stage spends its time)
    until: float = float("inf")  # when (time.monotonic) this delivery hands a load over (``Handover``)

    @property
    def settings(self) -> Settings:
        return self.pipe.settings

    @property
    def ledger(self) -> Ledger:
        return self.pipe.ledger

    @property
    def run_id(self) -> str:
        return self.record["run_id"]

    @property
    def dataset(self) -> str:
        return self.record["dataset"]

    @property
    def kind(self) -> Kind:
        return self.record.get("kind") or FULL

    @property
    def first(self) -> dict:
        """The first shard's manifest: what every shard agrees on (``load_manifests`` checks it)."""
        return self.manifests[0]


@dataclasses.dataclass
class Evaluation:
    """A collection measured on the run's eval qrels (``_evaluate``)."""

    scores: dict  # ``score``'s by_mode, default_mode and metrics
    search: dict  # what search answers with, as measured (the embedder's settings, the measured default mode)
    qrels: dict
    queries: object  # the eval queries' table (ids, vectors), None without qrels


@dataclasses.dataclass
class Outcome:
    """What one kind's indexing did and decided, for the shared ending (``_conclude``)."""

    collection: str
    counts: CountsSkipped
    new: Evaluation  # the index this run built
    previous_collection: str | None  # the alias's target before this run
    old: dict | None  # the scores of the index it replaces, when measured
    promoted: bool
    reason: str
    model_run: str  # the run whose model the index holds: an incremental run keeps the promoted one's
    swap: bool  # True: a new collection goes behind the alias (full, rebuild); False: the live one was edited
    trainer_metrics: dict = dataclasses.field(default_factory=dict)  # the trainer's metrics.json (full runs)
    # a first run's fallback (``_fallback``): what serves instead of the run's own index, and the model it holds
    fallback: dict | None = None


def _index(pipe: Lifecycle, record: RunRecord, reg: registry.ModelRegistry) -> str:
    """Index the run the way its kind says (one function each), then the shared ending: promote or not, retention,
    the index-updated event, the model registry."""
    t0 = time.time()
    embed_uri, job_key = embed_output(pipe.ledger, record)
    manifests = load_manifests(embed_uri, job_key)
    s = pipe.settings
    x = Indexing(
        pipe=pipe,
        record=record,
        embed_uri=embed_uri,
        manifests=manifests,
        client=vectorstore.connect(s.milvus_uri, s.milvus_token),
        watch=Stopwatch(),
        promoted_before=pipe.ledger.get_dataset(record["dataset"]).get("promoted") or {},
        t0=t0,
        step=Steps(t0),
        until=time.monotonic() + s.index_delivery_budget_s,
    )
    x.step("prepare")
    if x.kind == FULL:
        out = _index_full(x)
    elif x.first.get("mode") == "rebuild":  # incremental, the diff too large to apply in place
        out = _index_rebuild(x)
    else:  # incremental
        out = _index_inplace(x)
    return _conclude(x, out, reg)


def _index_full(x: Indexing) -> Outcome:
    """A full run: its own model's vectors into a new collection, gated against the baselines and the live index."""
    out = _new_collection_gated(x, deleted=0, same_model=False)
    return dataclasses.replace(out, trainer_metrics=trainer_output(x.record))


def _index_rebuild(x: Indexing) -> Outcome:
    """An incremental diff too large to apply in place, rebuilt: the embedder embedded every document with the
    promoted model into a new collection, which must pass the gate against the live one, like a full run."""
    removed = check_deletes(x.settings, x.record, x.manifests, absent_now(x.ledger, x.record))
    out = _new_collection_gated(x, deleted=removed, same_model=True)  # the removed: absent from the new collection
    return dataclasses.replace(
        out,
        reason=f"incremental change too large to apply in place, rebuilt: {out.reason}",
        model_run=x.promoted_before.get("run_id", x.run_id),
    )


def _new_collection_gated(x: Indexing, deleted: int, same_model: bool) -> Outcome:
    """Full and rebuilt runs: a new collection loaded, measured with the baselines and against the live index,
    gated. ``same_model``: the live index holds vectors of this run's model, so this run's query vectors rank it when
    the embedder wrote none of its own."""
    collection, upserted = _load_new(x)
    x.step("load, flush")
    new = _evaluate(x, collection, baselines=True, search=x.promoted_before.get("search") if same_model else None)
    x.step("evaluate")
    previous, old = _measure_replaced(x, collection, new.qrels, same_model_queries=new.queries if same_model else None)
    x.step("evaluate the live index")
    first = _first_index(x, previous)
    if first:  # a redelivery finds what its first delivery promoted: still this dataset's first index
        previous, old = None, None
    promoted, reason = _gate(x, new.scores, old, previous)
    counts = _counts(x, upserted, deleted=deleted)
    if previous and not first:
        missing = live_missing(x, upserted)
        counts["live_missing"] = missing
        if promoted and (why := shrink_refusal(x, missing)):
            promoted, reason = False, why
    out = Outcome(
        collection=collection,
        counts=counts,
        new=new,
        previous_collection=previous,
        old=old,
        promoted=promoted,
        reason=reason,
        model_run=x.run_id,
        swap=True,
    )
    if not promoted and first and x.kind == FULL:
        return _fallback(x, out)
    return out


def _id_column(uri: str):
    with storage.open_read(uri) as f:
        return parquet(f).read(columns=["id"]).column("id")


def live_missing(x: Indexing, rows: int) -> int:
    """Live documents a new collection of ``rows`` rows lacks: the live index's id table less this run's (exact),
    else (an entry promoted without a table) how many rows fewer it has."""
    live = x.promoted_before
    mine = x.first.get("hashes_file")
    if live.get("hashes") and mine and storage.exists(live["hashes"]):
        import pyarrow.compute as pc

        # Arrow columns and Arrow's hash set: ~30 bytes an id at 10M ids (Python sets of str: ~100)
        before = _id_column(live["hashes"])
        kept = pc.is_in(before, value_set=_id_column(f"{x.embed_uri}/{mine}").combine_chunks())
        return len(before) - int(pc.sum(kept).as_py() or 0)
    return max(0, int(live.get("rows") or 0) - rows)


def shrink_refusal(x: Indexing, missing: int) -> str | None:
    """Why a new collection that lacks ``missing`` live documents must not replace the live index: more than
    ``max_delete_share`` of them, without the retrain's ``allow_shrink`` confirmation. A partial upload, a
    quarantined corpus part or a table left out would otherwise shrink the index, and the gate rewards a smaller
    corpus (fewer unjudged documents to outrank the judged ones)."""
    live = int(x.promoted_before.get("rows") or 0) or missing
    if not missing or x.record.get("allow_shrink"):
        return None
    if absent := absent_now(x.ledger, x.record):  # quarantined parts: absent, never deleted, however few
        return (
            f"rejected: the new index lacks {missing} of the {live} live documents while corpus part(s) "
            f"{', '.join(absent)} are quarantined (absent, not deleted); the live index stays. Upload a good "
            f"version of each, or confirm that their documents go: embedpipe retrain --dataset {x.dataset} "
            "--allow-shrink"
        )
    if missing <= x.settings.max_delete_share * live:
        return None
    return (
        f"rejected: the new index lacks {missing} of the {live} live documents ({missing / max(live, 1):.1%} > "
        f"EMBEDPIPE_MAX_DELETE_SHARE={x.settings.max_delete_share:.0%}); the live index stays. Upload the missing "
        f"corpus parts, or confirm that they go: embedpipe retrain --dataset {x.dataset} --allow-shrink"
    )


def _first_index(x: Indexing, previous: str | None) -> bool:
    """Whether this run builds its dataset's first index: nothing promoted, or only what an earlier delivery of this
    very run promoted (its own collection or its fallback's) before it died."""
    own = (vectorstore.collection_name(x.dataset, x.run_id), vectorstore.base_collection_name(x.dataset, x.run_id))
    return (previous is None or previous in own) and x.promoted_before.get("updated_by") in (None, x.run_id)


def fallback_mode(by_mode: dict, metrics: tuple[str, ...], available: tuple[str, ...]) -> str | None:
    """Of ``available`` (``FALLBACKS`` keys, and ``served``: the run's own index), the one measured highest on the
    gate metrics in order (the first decides, the next break ties); on a full tie the earlier in ``FALLBACKS``."""
    order = [*FALLBACKS, "served"]
    measured = [m for m in order if m in available and by_mode.get(m)]
    if not measured:
        return None
    return max(measured, key=lambda m: tuple(by_mode[m].get(k, 0.0) for k in metrics) + (-order.index(m),))


def _fallback(x: Indexing, out: Outcome) -> Outcome:
    """A first run whose own index the gate rejected still leaves the dataset searchable: of the baselines it
    measured (base model, BM25, the off-the-shelf RRF of both) and its own index, the best on the gate metrics
    (``fallback_mode``, on the gate's eval split: the gate's choice between indexes this run built, not a training
    choice) is promoted. BM25 and the run's own index serve from the run's collection; the base model and the RRF
    from an index of the untuned model's vectors: the run's collection when the base model shipped, else a second
    collection (``vectorstore.base_collection_name``) loaded from the shards' ``base_vector`` column, with the base
    artifact the trainer kept (``model.base_artifact``; without it those two cannot serve). The event's figures are
    the serving index's, measured through Milvus like any index's; the rejected index's stay in ``fallback``.
    Idempotent: a redelivery makes the same choice and rewrites the same rows. A later upload or retrain replaces
    what serves through the gate as usual; later runs never fall back (the live index stays)."""
    m = x.first
    by_mode = out.new.scores["by_mode"]
    base_uri, base_fp = m.get("base_model_uri"), m.get("base_fingerprint")
    tuned = m.get("tuned", True)  # False: the run's collection holds base-model vectors already
    base_index = not tuned or bool(base_uri and base_fp)
    available = tuple(FALLBACKS) + ("served",) if base_index else ("bm25", "served")
    mode = fallback_mode(by_mode, x.settings.gate_metrics, available)
    if mode is None:
        return out
    collection, model_uri, fingerprint = out.collection, x.record["model"]["uri"], m["fingerprint"]
    queries = out.new.queries
    if mode == "served":  # the run's own index: it lost to a baseline that cannot serve, or only on a later metric
        search_mode, label, search = out.new.scores["default_mode"], "this run's own index", out.new.search
    elif mode == "bm25":
        search_mode, label = FALLBACKS[mode]
        search = {**out.new.search, "default_mode": search_mode}
    else:
        search_mode, label = FALLBACKS[mode]
        search = {**OFF_THE_SHELF_SEARCH, "default_mode": search_mode}
        if tuned:
            collection, model_uri, fingerprint = (
                vectorstore.base_collection_name(x.dataset, x.run_id),
                base_uri,
                base_fp,
            )
            _load_base(x, collection, fingerprint, model_uri)
            queries = queries.set_column(queries.column_names.index("vector"), "vector", queries.column("base_vector"))
    x.step("fallback index")
    ranked = x.watch(rank, x.client, collection, queries, search)
    scores = score(ranked, out.new.qrels, search_mode)
    baselines = {k: v for k, v in by_mode.items() if k in FALLBACKS}  # base (exact), bm25, bm25+base
    scores["by_mode"] = {**baselines, **scores["by_mode"]}
    metric = x.settings.gate_metrics[0]
    why = f"served: {label} ({metric} {scores['metrics'].get(metric, 0.0):.4f} through the index)"
    log.info("run %s: %s; first index, so it falls back: %s", x.run_id, out.reason, why)
    return dataclasses.replace(
        out,
        collection=collection,
        new=dataclasses.replace(out.new, scores=scores, search={**search, "default_mode": scores["default_mode"]}),
        promoted=True,
        reason=f"{out.reason}; first index for this dataset, so it falls back: {why}",
        fallback={
            "served": label,
            "mode": mode,
            "why": out.reason,
            "collection": collection,
            "model_uri": model_uri,
            "fingerprint": fingerprint,
            "rejected_collection": out.collection,
            "rejected_metrics_by_mode": by_mode,
        },
    )


def _load_base(x: Indexing, collection: str, fingerprint: str, model_uri: str) -> None:
    """The fallback's index of base vectors, by upserts (keyed, so a redelivery rewrites the same rows). Not bulk
    imported: the shards' vector column is the fine-tune's; a first run over millions of documents that falls back
    to the base model loads at upsert speed (about 4-6k rows/s) within its delivery's deadline."""
    x.watch(
        vectorstore.create_collection,
        x.client,
        collection,
        x.first["dim"],
        fingerprint,
        model_uri,
        clock=x.ledger.clock,
        exact=_exact(x),
    )
    progress = load_progress(x, collection, "base_vector")
    load_shards(
        x.settings,
        x.client,
        collection,
        x.embed_uri,
        x.manifests,
        x.watch,
        fresh=True,
        vector="base_vector",
        progress=progress,
    )
    _finish_load(x, collection, progress)


def _index_inplace(x: Indexing) -> Outcome:
    """An incremental run applied to the live collection (upserts and deletes), which must hold vectors of this very
    model; not gated: the index it replaces is that collection as last measured."""
    removed = check_deletes(x.settings, x.record, x.manifests, absent_now(x.ledger, x.record))
    collection = x.record["live"]["collection"]
    x.watch(vectorstore.check_fingerprint, x.client, collection, x.first["fingerprint"], x.first["dim"])
    _begin_inplace(x, collection, removed)
    upserted = _load_shards(x, collection, fresh=False, progress=load_progress(x, collection))
    # A run that rejected a corpus file must not delete what that file's documents had put in the index: its
    # ``removed`` is 0 (check_deletes).
    deleted = delete_removed(x.client, collection, x.embed_uri, x.manifests, x.watch) if removed else 0
    # no finish_load: an in-place update is searchable as written (the evaluation reads with Strong consistency), and
    # a flush per small update makes small segments that Milvus then compacts and re-indexes during the evaluation
    x.step("load, delete")
    new = _evaluate(x, collection, baselines=False, search=x.promoted_before.get("search"))
    x.step("evaluate")
    previous = x.watch(vectorstore.alias_target, x.client, vectorstore.alias_name(x.dataset))
    before = x.promoted_before
    old = (
        {"by_mode": before.get("metrics_by_mode") or {}, "metrics": before["metrics"]}
        if before.get("metrics")
        else None
    )
    return Outcome(
        collection=collection,
        counts=_counts(x, upserted, deleted=deleted),
        new=new,
        previous_collection=previous,
        old=old,
        promoted=True,
        reason=f"incremental update of the live collection in place (not gated: {removed} deletes)",
        model_run=before.get("run_id", x.run_id),
        swap=False,
    )


def _load_new(x: Indexing) -> tuple[str, int]:
    """A new collection for this run (``<dataset>__<run_id>``), loaded with every shard: (its name, rows loaded)."""
    collection = vectorstore.collection_name(x.dataset, x.run_id)
    m = x.first
    model_uri, clock = x.record["model"]["uri"], x.ledger.clock
    x.watch(
        vectorstore.create_collection,
        x.client,
        collection,
        m["dim"],
        m["fingerprint"],
        model_uri,
        clock=clock,
        exact=_exact(x),
    )
    progress = load_progress(x, collection)
    upserted = _load_shards(x, collection, fresh=True, progress=progress)
    _finish_load(x, collection, progress)
    return collection, upserted


def _finish_load(x: Indexing, collection: str, progress: Progress) -> None:
    """Seal and index a fresh collection (``vectorstore.finish_load``, handed over past the delivery's budget). A load
    that resumed another delivery's must hold every row: rows a Milvus restart lost after they were recorded would
    otherwise go missing silently. On a short count the collection (this run's own, never live) is dropped: the
    redelivery makes it again, whose new creation time no recorded progress matches, and loads it from row 0."""
    x.watch(vectorstore.finish_load, x.client, collection, until=x.until)
    if not progress.resumed:
        return
    rows = x.watch(vectorstore.count_rows, x.client, collection)
    expected = sum(m["count"] for m in x.manifests)
    if rows < expected:
        x.watch(x.client.drop_collection, collection)
        raise RuntimeError(f"{collection}: {rows} rows after a resumed load of {expected}: dropped, loaded again")


def _exact(x: Indexing) -> bool:
    """An exact dense index for a collection of at most ``exact_search_max_docs`` documents (the run's rows)."""
    return sum(m["count"] for m in x.manifests) <= x.settings.exact_search_max_docs


def _load_shards(x: Indexing, collection: str, fresh: bool, progress: Progress) -> int:
    bulk = _bulk(x.ledger, x.record)
    return load_shards(
        x.settings, x.client, collection, x.embed_uri, x.manifests, x.watch, fresh=fresh, bulk=bulk, progress=progress
    )


def _begin_inplace(x: Indexing, collection: str, removed: int) -> None:
    """Recorded before the live collection changes: a crash part-way is finished by the next delivery (upserts and
    deletes are idempotent), which reconcile re-requests; ``embedpipe status`` shows what was under way."""
    inplace = {
        "collection": collection,
        "upserts": sum(m["count"] for m in x.manifests),
        "deletes": removed,
        "started_at": runs.iso(x.ledger.clock()),
    }
    _record_fields(x.ledger, x.run_id, inplace=inplace)
    # The promoted entry's id -> hash table stops describing the collection once it is edited; until this run
    # promotes (a new entry, new table), the next run must not diff against it: it rebuilds instead.
    x.ledger.update_dataset(
        x.dataset,
        lambda st: (
            {**st, "promoted": {**st["promoted"], "dirty": x.run_id}}
            if (st.get("promoted") or {}).get("collection") == collection and st["promoted"].get("dirty") != x.run_id
            else None
        ),
    )


def _counts(x: Indexing, upserted: int, deleted: int) -> CountsSkipped:
    return {
        "upserted": upserted,
        "deleted": deleted,
        "unchanged": sum(m.get("unchanged", 0) for m in x.manifests),
        "total": x.first.get("corpus_total", sum(m["count"] for m in x.manifests)),
        "skipped": x.first.get("skipped", 0),
    }


def _evaluate(x: Indexing, collection: str, baselines: bool, search: dict | None = None) -> Evaluation:
    """The collection's metrics on the eval qrels (none without qrels). ``baselines``: also rank the untuned base
    model (BM25 alone is one of ``rank``'s modes); a new model's index is gated against both. ``search``: how the
    index answers (default: the model's own settings; an incremental run keeps the promoted entry's, which a first
    run's fallback or a rollback may have set)."""
    qrels = storage.read_json(f"{x.embed_uri}/qrels.json") or {}
    search = search or x.first.get("search") or {}
    scores = {"by_mode": {}, "default_mode": search.get("default_mode", "dense"), "metrics": {}}
    queries = None
    if qrels:
        queries = read_parquet(f"{x.embed_uri}/queries.parquet")
        ranked = x.watch(rank, x.client, collection, queries, search)
        if baselines:
            has_base = x.first.get("has_base")
            ranked["base"] = rank_base(x.embed_uri, x.manifests, queries) if has_base else ranked["dense"]
            if "bm25" in ranked:
                ranked[OFF_THE_SHELF] = off_the_shelf(ranked["base"], ranked["bm25"])
        scores = score(ranked, qrels, scores["default_mode"])
    return Evaluation(scores, {**search, "default_mode": scores["default_mode"]}, qrels, queries)


def _measure_replaced(x: Indexing, collection: str, qrels: dict, same_model_queries) -> tuple[str | None, dict | None]:
    """(the live collection, its scores): the live index ranked with its own model's query vectors (the embedder
    wrote them beside this run's, ``queries-previous.parquet``), else with ``same_model_queries`` when the model is
    the same; scores None when there is no other live index, no qrels or no query vectors for it."""
    previous = x.watch(vectorstore.alias_target, x.client, vectorstore.alias_name(x.dataset))
    if not (previous and previous != collection and qrels):
        return previous, None
    prev_queries = f"{x.embed_uri}/queries-previous.parquet"
    queries = read_parquet(prev_queries) if storage.exists(prev_queries) else same_model_queries
    if queries is None:
        return previous, None
    prev_search = x.promoted_before.get("search") or {}
    ranked = x.watch(rank, x.client, previous, queries, prev_search)
    return previous, score(ranked, qrels, prev_search.get("default_mode", "dense"))


def _gate(x: Indexing, scores: dict, old: dict | None, previous: str | None) -> tuple[bool, str]:
    s = x.settings
    ok, why = decide(
        scores["by_mode"], old["metrics"] if old else None, s.gate_metrics, s.gate_tolerance, bool(previous)
    )
    # a new model only: a rebuild with the promoted one (a big diff, a new representation) ranks as the live index does
    required = s.gate_require_significant_gain and x.kind == FULL
    if ok and required and (refused := significant_gain(compare(scores, old, s.gate_metrics))):
        return False, refused
    return ok, why


def _promote(x: Indexing, out: Outcome) -> tuple[PromotedEntry, DatasetState]:
    """The promotion: the alias onto a new collection, the dataset's promoted entry (what search loads, what a
    rollback makes live again); returns (the entry, the dataset state after)."""
    s, m = x.settings, x.first
    if out.swap:
        x.watch(vectorstore.point_alias, x.client, vectorstore.alias_name(x.dataset), out.collection)
    fb = out.fallback or {}
    entry = promoted_entry(
        run_id=out.model_run,
        collection=out.collection,
        model_uri=fb.get("model_uri") or x.record["model"]["uri"],
        fingerprint=fb.get("fingerprint") or m["fingerprint"],
        dim=m["dim"],
        metrics=out.new.scores["metrics"],
        metrics_by_mode=out.new.scores["by_mode"],
        search=out.new.search,
        schema=vectorstore.SCHEMA_VERSION,
        updated_by=x.run_id,
        # the id -> hash table of what the collection now holds: the next incremental run's diff base
        hashes=f"{x.embed_uri}/{m['hashes_file']}" if m.get("hashes_file") else None,
        rows=m.get("hashes_rows"),
        # a swap's new collection, or an in-place update of one built with this very representation (a live index
        # built with another is rebuilt, never edited in place: Pipeline.start_training)
        representation=vectorstore.REPRESENTATION,
    )

    released = set(x.record.get("released_parts") or [])

    def promote(st):
        history = [out.collection] + [c for c in st.get("promoted_history", []) if c != out.collection]
        if released:  # the retrain said allow_shrink and is promoted: those parts' documents are let go
            st = without_absent(st, released) or st
        return {
            **st,
            "promoted": entry,
            "promoted_history": history[: s.keep_collections + 1],
            # whole entries (model, fingerprint, id/hash table): what a rollback makes live again
            "promoted_entries": rollback.remember(st, entry, s.keep_collections + 1),
        }

    return entry, x.ledger.update_dataset(x.dataset, promote)


def _retain(x: Indexing, out: Outcome, state: DatasetState) -> list[str]:
    """Old collections dropped after a swap. Retention never drops what search may still be serving (the pre-swap
    live collection), the recently promoted ones (rollback targets, the default one included), or anything younger
    than the grace period. An in-place run drops nothing: it records that its edit is complete instead."""
    if not out.swap:
        inplace = (x.ledger.get_run(x.run_id) or {}).get("inplace", {})
        _record_fields(x.ledger, x.run_id, inplace={**inplace, "done_at": runs.iso(x.ledger.clock())})
        return []
    s = x.settings
    protect = {c for c in [out.previous_collection, *state.get("promoted_history", []), *rollback.kept(state)] if c}
    return x.watch(
        vectorstore.drop_old_collections,
        x.client,
        x.dataset,
        s.keep_collections,
        protect=protect,
        grace_s=s.retention_grace_s,
        clock=x.ledger.clock,
    )


def _payload(x: Indexing, out: Outcome, dropped: list[str], report_uri: str) -> IndexUpdated:
    s, m, old = x.settings, x.first, out.old
    return index_updated_payload(
        run_id=x.run_id,
        dataset=x.dataset,
        kind=x.kind,
        promoted=out.promoted,
        gate={
            "metric": s.gate_metric,
            "metrics": list(s.gate_metrics),
            "tolerance": s.gate_tolerance,
            "reason": out.reason,
            "require_significant_gain": s.gate_require_significant_gain,
            # the served ranking against BM25, the base model and the live index, per gate metric (paired t-test)
            "comparisons": compare(out.new.scores, old, s.gate_metrics),
        },
        search=out.new.search,
        alias=vectorstore.alias_name(x.dataset),
        collection=out.collection,
        previous_collection=out.previous_collection,
        model=_served_model(x, out),
        counts=out.counts,
        metrics=out.new.scores["metrics"] or None,
        previous_metrics=(old["metrics"] or None) if old else None,
        metrics_by_mode=out.new.scores["by_mode"],
        previous_metrics_by_mode=old["by_mode"] if old else None,
        default_search_mode=out.new.scores["default_mode"],
        stage_seconds=stage_seconds(x.record, x.t0),
        report_uri=report_uri,
        trigger=x.record.get("trigger"),
        indexed={
            "selection": out.trainer_metrics.get("selection"),
            "selection_agreement": agreement(out.trainer_metrics.get("selection"), out.new.scores["by_mode"]),
            "eval": {
                "split": m.get("eval_split") if out.new.qrels else None,
                "queries": len(out.new.qrels),
                "qrels_absent": m.get("qrels_absent", 0),
            },
            "milvus_seconds": round(x.watch.seconds, 3),
            "dropped_collections": dropped,
            **({"fallback": out.fallback} if out.fallback else {}),
        },
    )


def _served_model(x: Indexing, out: Outcome) -> ModelInfo:
    """The event's ``model``: the model the promoted index holds (a first run's fallback: the untuned base model)."""
    info = model_info(x.record["model"]["uri"], x.first, out.trainer_metrics)
    fb = out.fallback
    if fb and fb["model_uri"] != info["uri"]:
        info.update(
            uri=fb["model_uri"],
            version=fb["fingerprint"],
            fingerprint=fb["fingerprint"],
            tuned=False,
            shipped_reason=f"fallback: {fb['served']} serves, the run's own index lost ({fb['why']})",
        )
    return info


def _conclude(x: Indexing, out: Outcome, reg: registry.ModelRegistry) -> str:
    """Every kind's ending: promote (or record the rejection), retention, the report and the index-updated event
    stored in the run record (INDEXING -> PUBLISHING) and published, then the model registry."""
    ledger, run_id, dataset = x.ledger, x.run_id, x.dataset
    current = ledger.get_run(run_id) or {}
    if current.get("state") != INDEXING:  # failed meanwhile (past its deadline): change nothing users see
        return f"run {run_id} is {current.get('state')} now: not promoting"
    if out.promoted:
        entry, state = _promote(x, out)
        registration = {"registry": reg.name, "state": "after publish"}  # see the end of this function
    else:
        state = ledger.get_dataset(dataset)
        registration = registry.not_registered(reg, "rejected by the gate: rejected models are not registered")
    dropped = _retain(x, out, state)
    x.step("promote, retention")
    log.info(
        "run %s (%s): %s into %s; %s; dropped %s; seconds by step: %s",
        run_id,
        x.kind,
        out.counts,
        out.collection,
        out.reason,
        dropped or "none",
        x.step,
    )
    report_uri = f"{ledger.run_dir(run_id)}/report.html"
    data = _payload(x, out, dropped, report_uri)
    storage.write_bytes(
        report_uri, report.render(data, out.trainer_metrics.get("loss_curve")).encode(), content_type="text/html"
    )
    event = Event(INDEX_UPDATED, dict(data), id=f"{run_id}/index-updated", subject=run_id)
    validate(event)
    rec, moved = ledger.advance(
        run_id,
        INDEXING,
        PUBLISHING,
        final_event=event.to_structured(),
        metrics=data["metrics"],
        previous_metrics=data["previous_metrics"],
        promoted=out.promoted,
        collection=out.collection,
        counts=out.counts,
        registry=registration,
    )
    if not moved:  # a concurrent delivery of the same request stored its event first; it publishes
        return f"run {run_id}: another delivery finished indexing first ({rec['state']})"
    finished = x.pipe.finish(rec)
    if out.promoted:
        # After the swap and after index-updated (an upload can take minutes; subscribers and search must not wait
        # for a side record): the registry follows Milvus. Keyed by the run whose model it is, so an incremental
        # run (same model) registers nothing new and only re-points the alias; skipped when a rollback or a newer
        # promotion took over meanwhile. Never raises: a failed or pending registration is recorded in the run
        # record and caught up by the dataset's next promotion or rollback (registry.promote).
        def still_live() -> bool:
            return (ledger.get_dataset(dataset).get("promoted") or {}).get("updated_by") == run_id

        model_uri = entry["model_uri"]  # a first run's fallback may serve the base model (registry.promote skips it)
        metrics = out.new.scores["metrics"]
        registration = registry.promote(reg, dataset, entry["run_id"], model_uri, metrics, still_live, ledger.clock)
        ledger.update_run(run_id, lambda r: {**r, "registry": registration})
    return finished
