"""The indexer's work for one run: load embedding shards into Milvus, evaluate, gate, swap the alias, publish.

Resumable: rows are upserted by primary key, so a redelivered request rewrites the same rows; the run record moves
INDEXING -> PUBLISHING (with the event stored) -> SUCCEEDED, so a redelivery after a crash republishes the stored
event with the same ``ce-id`` instead of computing a different one.
"""

from __future__ import annotations

import io
import json
import logging
import time

from embedpipe import evaluation, runs, storage, topology, vectorstore
from embedpipe.events import INDEX_UPDATED, Event, validate
from embedpipe.pipeline import Pipeline
from embedpipe.runs import INDEXING, PUBLISHING, SUCCEEDED

log = logging.getLogger(__name__)

UPSERT_BATCH = 1000


def read_parquet(uri: str):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def load_manifests(embed_uri: str) -> list[dict]:
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
    if len({(m["fingerprint"], m["dim"]) for m in manifests}) != 1:
        raise vectorstore.FingerprintMismatch(f"{embed_uri}: shards disagree on model fingerprint or dim")
    return sorted(manifests, key=lambda m: m["replica"])


def rank(client, collection: str, queries, k: int = 100) -> dict[str, dict[str, list[str]]]:
    ids = queries.column("id").to_pylist()
    vectors = queries.column("vector").to_pylist()
    texts = queries.column("text").to_pylist()
    dense = vectorstore.search_dense(client, collection, vectors, k)
    hybrid = vectorstore.search_hybrid(client, collection, vectors, texts, k)
    return {
        "dense": {q: [d for d, _ in hits] for q, hits in zip(ids, dense)},
        "hybrid": {q: [d for d, _ in hits] for q, hits in zip(ids, hybrid)},
    }


def score(ranked: dict, qrels: dict, metric: str) -> dict:
    """Metrics for dense and hybrid; the better of the two (on ``metric``) is the default search mode."""
    by_mode = {mode: evaluation.evaluate(r, qrels) for mode, r in ranked.items()}
    best = max(by_mode, key=lambda m: (by_mode[m].get(metric, 0.0), m == "dense"))
    return {"by_mode": by_mode, "default_mode": best, "metrics": by_mode[best]}


def index_run(pipe: Pipeline, run_id: str) -> str:
    record = pipe.ledger.get_run(run_id)
    if record is None:
        return f"unknown run {run_id}: ignored"
    if record["state"] in runs.TERMINAL:
        return f"run {run_id} already {record['state']}: duplicate request ignored"
    if record["state"] == PUBLISHING:
        return finish(pipe, record)
    if record["state"] != INDEXING:
        return f"run {run_id} is {record['state']}, not ready to index: ignored"
    try:
        return _index(pipe, record)
    except (vectorstore.FingerprintMismatch, FileNotFoundError, ValueError) as exc:
        pipe.fail(run_id, "index", str(exc))  # permanent: retrying the same shards cannot help
        return f"run {run_id}: FAILED in index: {exc}"


def _index(pipe: Pipeline, record: dict) -> str:
    s, ledger, run_id, dataset = pipe.settings, pipe.ledger, record["run_id"], record["dataset"]
    t0 = time.time()
    embed_uri = f"{ledger.run_dir(run_id)}/embeddings"
    manifests = load_manifests(embed_uri)
    fingerprint, dim = manifests[0]["fingerprint"], manifests[0]["dim"]
    client = vectorstore.connect(s.milvus_uri, s.milvus_token)
    collection = vectorstore.collection_name(dataset, run_id)
    vectorstore.create_collection(client, collection, dim, fingerprint, record["model"]["uri"])
    milvus_s, upserted = 0.0, 0
    for m in manifests:
        table = read_parquet(f"{embed_uri}/{m['file']}")
        if table.num_rows != m["count"]:
            raise ValueError(f"{m['file']}: {table.num_rows} rows, manifest says {m['count']}")
        cols = {c: table.column(c).to_pylist() for c in ("id", "vector", "text", "title", "content_hash", "metadata")}
        cols["metadata"] = [json.loads(x) for x in cols["metadata"]]
        for start in range(0, table.num_rows, UPSERT_BATCH):
            sl = slice(start, start + UPSERT_BATCH)
            rows = vectorstore.rows_from(
                *(cols[c][sl] for c in ("id", "vector", "text", "title", "content_hash", "metadata"))
            )
            t = time.time()
            upserted += vectorstore.upsert_batch(client, collection, rows)
            milvus_s += time.time() - t
    t = time.time()
    vectorstore.finish_load(client, collection)
    milvus_s += time.time() - t
    total = sum(m["count"] for m in manifests)

    qrels = storage.read_json(f"{embed_uri}/qrels.json") or {}
    alias = vectorstore.alias_name(dataset)
    t = time.time()
    new = (
        score(rank(client, collection, read_parquet(f"{embed_uri}/queries.parquet")), qrels, s.gate_metric)
        if qrels
        else {"by_mode": {}, "default_mode": "dense", "metrics": {}}
    )
    previous_collection = vectorstore.alias_target(client, alias)
    old = None
    if (
        previous_collection
        and previous_collection != collection
        and qrels
        and storage.exists(f"{embed_uri}/queries-previous.parquet")
    ):
        old = score(
            rank(client, previous_collection, read_parquet(f"{embed_uri}/queries-previous.parquet")),
            qrels,
            s.gate_metric,
        )
    eval_s = time.time() - t
    milvus_s += eval_s

    gate = s.gate_metric
    if old is None or not old["metrics"]:
        promoted, reason = True, "first index for this dataset" if not previous_collection else "no previous metrics"
    else:
        new_v, old_v = new["metrics"].get(gate, 0.0), old["metrics"].get(gate, 0.0)
        promoted = new_v >= old_v - s.gate_tolerance
        reason = f"{gate} {new_v:.4f} vs {old_v:.4f} (tolerance {s.gate_tolerance})"
    if promoted:
        vectorstore.point_alias(client, alias, collection)
        model = record["model"]
        ledger.update_dataset(
            dataset,
            lambda st: {
                **st,
                "promoted": {
                    "run_id": run_id,
                    "collection": collection,
                    "model_uri": model["uri"],
                    "fingerprint": fingerprint,
                    "dim": dim,
                    "metrics": new["metrics"],
                },
            },
        )
    log.info("run %s: %d rows in %s; %s; promoted=%s", run_id, total, collection, reason, promoted)

    times = record.get("stage_times", {})
    stage_seconds = {
        st.lower(): round(v["end"] - v["start"], 3) for st, v in times.items() if v.get("start") and v.get("end")
    }
    stage_seconds["index"] = round(time.time() - t0, 3)
    trainer_metrics = storage.read_json(f"{ledger.run_dir(run_id)}/metrics.json") or {}
    data = {
        "run_id": run_id,
        "dataset": dataset,
        "kind": record.get("kind") or "full",
        "promoted": promoted,
        "gate": {"metric": gate, "tolerance": s.gate_tolerance, "reason": reason},
        "alias": alias,
        "collection": collection,
        "model": {
            "uri": record["model"]["uri"],
            "version": trainer_metrics.get("model_version", fingerprint),
            "dim": dim,
            "fingerprint": fingerprint,
        },
        "counts": {"upserted": upserted, "deleted": 0, "unchanged": 0, "total": total},
        "metrics": new["metrics"] or None,
        "previous_metrics": old["metrics"] if old else None,
        "metrics_by_mode": new["by_mode"],
        "previous_metrics_by_mode": old["by_mode"] if old else None,
        "default_search_mode": new["default_mode"],
        "eval": {"split": "test" if qrels else None, "queries": len(qrels)},
        "stage_seconds": stage_seconds,
        "milvus_seconds": round(milvus_s, 3),
        "report_uri": None,
        "trigger": record.get("trigger"),
        "previous_collection": previous_collection,
    }
    event = Event(INDEX_UPDATED, data, id=f"{run_id}/index-updated", subject=run_id)
    validate(event)
    ledger.advance(
        run_id,
        INDEXING,
        PUBLISHING,
        final_event=event.to_structured(),
        metrics=data["metrics"],
        previous_metrics=data["previous_metrics"],
        promoted=promoted,
        collection=collection,
        counts=data["counts"],
    )
    return finish(pipe, ledger.get_run(run_id))


def finish(pipe: Pipeline, record: dict) -> str:
    event = Event.from_structured(record["final_event"])
    pipe.publish(topology.INDEX_UPDATED, event)
    rec, _ = pipe.ledger.advance(record["run_id"], PUBLISHING, SUCCEEDED)
    pipe.release(rec)
    return f"run {record['run_id']}: index-updated published (promoted={event.data['promoted']})"
