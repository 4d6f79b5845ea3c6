"""Milvus: one collection per full run (``<dataset>__<run_id>``), the alias ``<dataset>`` on the promoted one.

Fields (DESIGN.md §3.7): ``id`` VARCHAR primary key (the document's stable id), ``dense`` (COSINE), ``text`` (what
was embedded), ``bm25_text`` (the text analyzed by ``embedpipe.retrieval.lexical``: stop words out, Snowball stems)
with an analyzer feeding a BM25 function into ``sparse``, ``title``, ``content_hash``, ``metadata`` JSON. The
collection's properties record the model fingerprint, dim and BM25 analyzer; loading vectors of another model is
refused.

Search modes: ``dense``, ``bm25`` (sparse alone) and ``hybrid``: both searched ``DEPTH`` deep and fused here
(``evaluation.fuse``: the family and weight the model's selection chose), the same function selection scored them
with. Searches go in batches of at most ``MAX_NQ`` queries (Milvus caps one call at 16,384).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tenacity import retry, retry_if_exception, stop_after_attempt, wait_random_exponential

from embedpipe.retrieval import evaluation, lexical

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 16000  # VARCHAR max_length is in bytes (65535); 4 bytes per char worst case
GRPC_OPTIONS = {"grpc.keepalive_time_ms": 330_000, "grpc.keepalive_permit_without_calls": False}
SCHEMA_VERSION = 2  # 2: BM25 over the analyzed ``bm25_text`` field (1: over raw ``text``)
# What a row's text and BM25 terms were made with: the document text rule and the analyzer. Recorded in each
# collection and promoted entry; an incremental run over an index built with another representation rebuilds it.
TEXT_RULE = 1  # the version of ``datasets.Doc.body`` / ``full_text`` (what is embedded and BM25-indexed)
REPRESENTATION = f"text-{TEXT_RULE}+{lexical.ANALYZER}"
MODES = ("dense", "bm25", "hybrid")
DEPTH = 100  # candidates per side that hybrid fusion sees
MAX_NQ = 1000
PROP = "embedpipe."  # collection properties: the model fingerprint, dim and URI (descriptions are not kept by Lite)


class FingerprintMismatch(ValueError):
    """Vectors from a different model (fingerprint or dim) than the collection was built for."""


def _transient(exc: BaseException) -> bool:
    from pymilvus.exceptions import MilvusException

    text = str(exc).lower()
    return isinstance(exc, MilvusException) and any(
        s in text for s in ("unavailable", "deadline", "connect", "timeout", "temporarily")
    )


def loaded(fn):
    """After a Milvus restart collections come back released; load on demand and try once more."""

    @functools.wraps(fn)
    def wrapper(client, name, *args, **kwargs):
        from pymilvus.exceptions import MilvusException

        try:
            return fn(client, name, *args, **kwargs)
        except MilvusException as exc:
            text = str(exc).lower()
            if "released" not in text and "not loaded" not in text:
                raise
            client.load_collection(name)
            return fn(client, name, *args, **kwargs)

    return wrapper


milvus_retry = retry(
    retry=retry_if_exception(_transient),
    stop=stop_after_attempt(6),
    wait=wait_random_exponential(multiplier=0.5, max=10),
    reraise=True,
)


def safe_name(name: str) -> str:
    """Milvus names allow letters, digits and underscores only."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def collection_name(dataset: str, run_id: str) -> str:
    return safe_name(f"{dataset}__{run_id}")


BASE_SUFFIX = "__base"


def base_collection_name(dataset: str, run_id: str) -> str:
    """A first run's fallback index of untuned base-model vectors (``indexing._fallback``), beside the run's own."""
    return collection_name(dataset, run_id) + BASE_SUFFIX


def alias_name(dataset: str) -> str:
    return safe_name(dataset)


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    fingerprint: str
    dim: int
    model_uri: str


def connect(uri: str, token: str = ""):
    from pymilvus import MilvusClient

    # pymilvus pings every 10 s even when idle; servers that keep gRPC's default ping policy (Milvus Lite) answer
    # that with GOAWAY "too many pings" and the connection dies. Ping no more often than the default allows.
    return MilvusClient(uri=uri, token=token or "", grpc_options=GRPC_OPTIONS)


def create_collection(
    client,
    name: str,
    dim: int,
    fingerprint: str,
    model_uri: str,
    clock: Callable[[], float] = time.time,
    exact: bool = False,
) -> None:
    """Create (idempotently) the collection with dense + BM25 sparse fields and their indexes. ``clock``: wall time,
    epoch seconds, for its ``created_at`` (what ``drop_old_collections`` compares with its own ``clock``). ``exact``:
    a FLAT dense index (exact search: what selection and evaluation compute, to the ranking), else AUTOINDEX."""
    from pymilvus import DataType, Function, FunctionType

    if client.has_collection(name):
        check_fingerprint(client, name, fingerprint, dim)
        return
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
    schema.add_field("dense", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("text", DataType.VARCHAR, max_length=65535)
    schema.add_field("bm25_text", DataType.VARCHAR, max_length=65535, enable_analyzer=True)
    schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
    schema.add_field("title", DataType.VARCHAR, max_length=2048)
    schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
    schema.add_field("metadata", DataType.JSON)
    schema.add_function(
        Function(
            name="bm25", function_type=FunctionType.BM25, input_field_names=["bm25_text"], output_field_names=["sparse"]
        )
    )
    index = client.prepare_index_params()
    index.add_index(field_name="dense", index_type="FLAT" if exact else "AUTOINDEX", metric_type="COSINE")
    index.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
    try:
        client.create_collection(
            collection_name=name,
            schema=schema,
            index_params=index,
            properties={
                PROP + "fingerprint": fingerprint,
                PROP + "dim": str(dim),
                PROP + "model_uri": model_uri,
                PROP + "analyzer": lexical.ANALYZER,
                PROP + "representation": REPRESENTATION,
                PROP + "created_at": str(clock()),  # retention's grace period (Lite reports no creation time)
            },
        )
    except Exception:
        # Two deliveries of one index request can create it at once (Milvus Lite: "File exists"): the loser
        # checks that the winner's collection is the one it wanted.
        if not client.has_collection(name):
            raise
        check_fingerprint(client, name, fingerprint, dim)
        return
    log.info("created collection %s (dim=%d, model fingerprint %s)", name, dim, fingerprint)


def describe(client, name: str) -> CollectionInfo:
    props = client.describe_collection(name).get("properties") or {}
    return CollectionInfo(
        name, props.get(PROP + "fingerprint", ""), int(props.get(PROP + "dim", 0)), props.get(PROP + "model_uri", "")
    )


def check_fingerprint(client, name: str, fingerprint: str, dim: int) -> None:
    info = describe(client, name)
    if info.fingerprint != fingerprint or info.dim != dim:
        raise FingerprintMismatch(
            f"collection {name} holds vectors of model {info.fingerprint} (dim {info.dim}); refusing vectors of "
            f"model {fingerprint} (dim {dim})"
        )


def rows_from(ids, vectors, texts, bm25_texts, titles, hashes, metadatas) -> list[dict]:
    return [
        {
            "id": i,
            "dense": v,
            "text": (t or " ")[:MAX_TEXT_CHARS],
            "bm25_text": (b or " ")[:MAX_TEXT_CHARS],
            "title": (ti or "")[:500],
            "content_hash": h,
            "metadata": m,
        }
        for i, v, t, b, ti, h, m in zip(ids, vectors, texts, bm25_texts, titles, hashes, metadatas)
    ]


@milvus_retry
def upsert_batch(client, name: str, rows: list[dict]) -> int:
    # Upsert by primary key: a redelivered request rewrites the same rows, never duplicates them.
    client.upsert(collection_name=name, data=rows)
    return len(rows)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def id_filter(ids: list[str]) -> str:
    """``id in [...]`` with each id an escaped string literal. pymilvus' ``ids=`` quotes ids without escaping (the id
    ``x'] or id not in ['`` matches every row) and Milvus Lite 3.2 rejects filter templates (``filter_params``), so
    quote here: backslash and double quote escaped, which Lite's tokenizer and Milvus' grammar both read back.
    Control characters (barred at intake, ``datasets.check_id``) are refused rather than escaped."""
    bad = [i for i in ids if _CONTROL.search(i)]
    if bad:
        raise ValueError(f"document id {bad[0]!r} contains control characters")
    quoted = ('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in ids)
    return f"id in [{', '.join(quoted)}]"


@milvus_retry
def delete_ids(client, name: str, ids: list[str]) -> None:
    if ids:
        client.delete(collection_name=name, filter=id_filter(ids))


@milvus_retry
@loaded
def get_titles(client, name: str, ids: list[str]) -> dict[str, str]:
    """id -> title for those of ``ids`` the collection holds."""
    if not ids:
        return {}
    rows = client.query(collection_name=name, filter=id_filter(ids), output_fields=["id", "title"])
    return {r["id"]: r.get("title", "") for r in rows}


class IndexBuilding(Exception):
    """The dense index is still being built when the caller's time is up (``wait_indexed``'s ``until``)."""


@milvus_retry
def finish_load(client, name: str, until: float | None = None) -> None:
    """After a collection's load: seal what was written and load it for search. Only for a fresh collection: an
    in-place update of a loaded one is searchable as written (read with ``STRONG``), and a flush per small update
    only makes small segments (Milvus advises against it; Milvus Lite compacts and re-indexes them in a background
    thread of the server, on the CPUs the evaluation that follows needs)."""
    client.flush(name)  # search on unflushed data is very slow on Milvus Lite
    client.load_collection(name)
    wait_indexed(client, name, until=until)


def wait_indexed(
    client, name: str, poll_s: float = 0.5, clock: Callable[[], float] = time.monotonic, until: float | None = None
) -> None:
    """Until the dense index covers every row: rows not yet indexed are searched exactly, so scores measured before
    the index is built are not the ones the index serves afterwards. No limit of its own (the stage deadline ends a
    stuck load); says every 30 s how far it is. A server that reports no progress is not waited for. Past ``until``
    (``clock``'s time), raises ``IndexBuilding``: the caller's request ends and a later one waits on."""
    start, said = clock(), clock()
    while True:
        info = client.describe_index(name, "dense") or {}
        pending, total, done = info.get("pending_index_rows"), info.get("total_rows"), info.get("indexed_rows")
        if pending is None and (total is None or done is None):
            return
        if not pending and (total is None or done is None or done >= total):
            return
        if until is not None and clock() >= until:
            raise IndexBuilding(f"{name}: dense index built for {done} of {total} rows so far")
        if clock() - said >= 30:
            log.info("%s: dense index built for %s of %s rows (%.0fs)", name, done, total, clock() - start)
            said = clock()
        time.sleep(poll_s)


@loaded
def count_rows(client, name: str) -> int:
    """Rows in the collection, as of every write acknowledged so far (``Strong``)."""
    res = client.query(collection_name=name, filter="", output_fields=["count(*)"], consistency_level="Strong")
    return int(res[0]["count(*)"])


@loaded
def ids_and_hashes(client, name: str) -> dict[str, str]:
    """id -> content hash for every row (iterates, so it works past the query limit)."""
    out = {}
    it = client.query_iterator(collection_name=name, filter="", output_fields=["id", "content_hash"], batch_size=1000)
    try:
        while True:
            batch = it.next()
            if not batch:
                break
            out.update({r["id"]: r["content_hash"] for r in batch})
    finally:
        it.close()
    return out


def _batches(items, size: int = MAX_NQ):
    for start in range(0, len(items), size):
        yield items[start : start + size]


@milvus_retry
@loaded
def search_dense(client, name: str, vectors, k: int, consistency: str | None = None) -> list[list[tuple[str, float]]]:
    """Dense search; ``consistency`` (e.g. ``STRONG``) overrides the collection's level for this call."""
    out = []
    for part in _batches([list(map(float, v)) for v in vectors]):
        res = client.search(
            collection_name=name,
            data=part,
            anns_field="dense",
            limit=k,
            output_fields=["id"],
            search_params={"metric_type": "COSINE"},
            **_consistency(consistency),
        )
        out += [[(h["id"], float(h["distance"])) for h in hits] for hits in res]
    return out


@milvus_retry
@loaded
def search_sparse(
    client, name: str, bm25_texts: list[str], k: int, consistency: str | None = None
) -> list[list[tuple[str, float]]]:
    """BM25 over ``bm25_text``; queries already analyzed (``lexical.analyzed``). A query with no terms left (only
    stop words) matches nothing. ``consistency`` as in ``search_dense``."""
    out: list[list[tuple[str, float]]] = [[] for _ in bm25_texts]
    asked = [i for i, t in enumerate(bm25_texts) if t.strip()]
    for part in _batches(asked):
        res = client.search(
            collection_name=name,
            data=[bm25_texts[i] for i in part],
            anns_field="sparse",
            limit=k,
            output_fields=["id"],
            search_params={"metric_type": "BM25"},
            **_consistency(consistency),
        )
        for i, hits in zip(part, res):
            # Milvus Lite reports BM25 as negative distances (best first, most negative), a server as scores:
            # BM25 scores are never negative, so the magnitude is the score either way
            out[i] = [(h["id"], abs(float(h["distance"]))) for h in hits]
    return out


STRONG = "Strong"  # a search that sees every write acknowledged before it (collections default to Bounded)


def _consistency(level: str | None) -> dict:
    return {"consistency_level": level} if level else {}


def search(client, name: str, mode: str, vectors, bm25_texts, k: int, search: dict | None = None):
    """Rankings of ``mode`` (dense | bm25 | hybrid) for a batch of queries, as ``[(id, score), ...]`` per query.
    ``search`` is the model's search settings (``ModelInfo.search``: hybrid weight, RRF constant)."""
    if mode not in MODES:
        raise ValueError(f"search mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "dense":
        return search_dense(client, name, vectors, k)
    if mode == "bm25":
        return search_sparse(client, name, bm25_texts, k)
    depth = max(k, DEPTH)
    dense = search_dense(client, name, vectors, depth)
    sparse = search_sparse(client, name, bm25_texts, depth)
    return [fused(d, sp, k, search) for d, sp in zip(dense, sparse)]


def fused(dense: list[tuple[str, float]], sparse: list[tuple[str, float]], k: int, search: dict | None = None):
    """One query's hybrid ranking from its dense and BM25 hits, with the fused score, as the model's search settings
    (``ModelInfo.search``: fusion family, dense weight, RRF constant) say; the function selection scored them with."""
    search = search or {}
    return evaluation.fuse(
        dense,
        sparse,
        float(search.get("hybrid_weight", 0.5)),
        search.get("fusion", "rrf"),
        int(search.get("rrf_k", evaluation.RRF_K)),
        limit=k,
    )


def has_field(client, name: str, field_name: str) -> bool:
    return any(f.get("name") == field_name for f in client.describe_collection(name).get("fields", []))


def alias_target(client, alias: str) -> str | None:
    # list_aliases per collection instead of describe_alias, which logs an RPC error for a missing alias.
    for name in client.list_collections():
        if alias in client.list_aliases(collection_name=name).get("aliases", []):
            return name
    return None


def point_alias(client, alias: str, collection: str) -> None:
    if alias_target(client, alias) is None:
        client.create_alias(collection_name=collection, alias=alias)
    else:
        client.alter_alias(collection_name=collection, alias=alias)
    log.info("alias %s -> %s", alias, collection)


# collection_name(): "<dataset>__<run_id>", run ids sort by time; base_collection_name() adds BASE_SUFFIX, listed,
# kept and dropped like the run's own
RUN_SUFFIX = re.compile(r"__\d{8}t\d{6}_[0-9a-f]{6}(" + BASE_SUFFIX + ")?$")


def collides(dataset: str, others: Iterable[str]) -> str | None:
    """The dataset among ``others`` that would share this one's alias and collection prefix (``a-b`` and ``a_b``
    both map to ``a_b``), or None. A colliding dataset must be refused: its runs would swap the other's alias and
    its retention would drop the other's collections."""
    alias = alias_name(dataset)
    return next((o for o in others if o != dataset and alias_name(o) == alias), None)


def dataset_collections(client, dataset: str) -> list[str]:
    """The dataset's per-run collections, oldest first."""
    prefix = alias_name(dataset)
    return sorted(
        n for n in client.list_collections() if RUN_SUFFIX.search(n) and n[: RUN_SUFFIX.search(n).start()] == prefix
    )


def created_at(client, name: str) -> float:
    """When the collection was created: its ``created_at`` property; for collections made before that property
    existed, the time in its run id (the run's start, so earlier than the creation)."""
    props = client.describe_collection(name).get("properties") or {}
    if props.get(PROP + "created_at"):
        return float(props[PROP + "created_at"])
    stamp = RUN_SUFFIX.search(name).group()[2:17]
    return dt.datetime.strptime(stamp, "%Y%m%dt%H%M%S").replace(tzinfo=dt.UTC).timestamp()


def drop_old_collections(
    client,
    dataset: str,
    keep: int,
    protect: Iterable[str] = (),
    grace_s: float = 600.0,
    clock: Callable[[], float] = time.time,
) -> list[str]:
    """Retention: keep the live (aliased) collection and the newest ``keep`` others (rejected runs, replaced
    indexes: for inspection and rollback); drop the older ones, except any named in ``protect`` (the collection the
    alias pointed to before this run's swap, which a search may still be serving by name; the ledger's promoted
    ones) and any created less than ``grace_s`` ago (by a concurrent run, or a search that resolved it just before
    a swap). Those are left to a later run's retention. ``clock``: wall time, epoch seconds. Returns the dropped
    names."""
    live = alias_target(client, alias_name(dataset))
    others = [n for n in dataset_collections(client, dataset) if n != live]
    spared = set(protect)
    dropped = []
    for name in others[: max(0, len(others) - keep)]:
        if name in spared or clock() - created_at(client, name) < grace_s:
            continue
        client.drop_collection(name)
        dropped.append(name)
        log.info("retention: dropped collection %s (keeping %d besides the live %s)", name, keep, live)
    return dropped
