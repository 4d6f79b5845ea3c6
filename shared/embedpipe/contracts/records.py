"""Records: the JSON documents embedpipe stores (run record, dataset state, promoted entry, rollback) and the payloads
it publishes (index-updated, run.failed), typed, each with ONE constructor.

Why ``TypedDict`` and not dataclasses: a record lives as a JSON object in the artifacts bucket and changes by
compare-and-set with functions ``fn(record) -> record | None`` that edit a copy (``ledger.runs``). A TypedDict *is*
that dict, so every ledger already written reads as it is, the compare-and-set functions keep working, and the
type checker (and the reader) learns every key and its type. The JSON shapes are a contract with existing ledgers and
subscribers: a key is never renamed or removed; a new one is added here (to the part that is not required: records
written before it lack it, so readers ``.get`` it) and, for a payload, to its JSON Schema in ``schemas/``
(``tests/unit/test_records.py`` fails when a payload's keys and its schema's ``properties`` differ).

Each record is two classes: the keys its constructor always writes (``total=True``), and a subclass with the keys set
later or only in some cases (``total=False``). (Not ``NotRequired``: under ``from __future__ import annotations``
Python 3.11 cannot see it and would mark every key required.)

| record | where it lives | its constructor | used by |
|---|---|---|---|
| ``RunRecord`` | ``runs/<run_id>/run.json`` | ``new_run_record`` | ``Ledger.create_run`` |
| ``DatasetState`` | ``ledger/datasets/<dataset>.json`` | ``empty_dataset_state`` | ``Ledger`` (a new dataset) |
| ``PromotedEntry`` | the state's ``promoted`` and ``promoted_entries`` | ``promoted_entry`` | the indexer's promotion |
| ``RollbackItem`` | the state's ``rollbacks`` | ``rollback_item`` | ``index.rollback`` |
| ``IndexUpdated`` | data of ``io.embedpipe.index.updated.v1`` | ``index_updated_payload`` | indexer, rollback |
| ``RunFailed`` | data of ``io.embedpipe.run.failed.v1`` | ``run_failed_payload`` | ``Lifecycle.fail`` |
| ``RunStage`` | data of ``io.embedpipe.run.stage.v1`` | ``run_stage_payload`` | ``Pipeline`` |

What stays a plain ``dict`` and why: the ``trigger`` (a free-form description of what started the run, passed through
to subscribers as the schema's open ``trigger`` object), the retrain ``overrides`` and ``hp_tuning`` (user input,
checked where they are used), the structured CloudEvent kept as ``final_event``/``event`` (``events.Event`` is its
type), the per-key items (``notices``, ``file_errors``: ``intake``'s ``to_dict``), the registry's outcome
(``index.registry``) and the search settings (``search``: ``default_mode``, ``hybrid_weight``, ``rrf_k``, written by
the trainer). The ``io.embedpipe.file.rejected.v1`` payload is ``intake.Rejection.to_dict`` plus ``run_id``: that
dataclass is its type.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal, TypedDict

# ---------------------------------------------------------------- shared pieces

# A run's states (the record's ``state``); it moves only forward along STAGES, or ends FAILED (``ledger.runs``).
PENDING, TRAINING, EMBEDDING, INDEXING, PUBLISHING = "PENDING", "TRAINING", "EMBEDDING", "INDEXING", "PUBLISHING"
SUCCEEDED, FAILED = "SUCCEEDED", "FAILED"
STAGES = (PENDING, TRAINING, EMBEDDING, INDEXING, PUBLISHING, SUCCEEDED)
TERMINAL = (SUCCEEDED, FAILED)

Kind = Literal["full", "incremental"]
FULL: Kind = "full"  # train -> embed all -> new collection -> gate -> alias swap (DESIGN.md §3.2)
INCREMENTAL: Kind = "incremental"  # embed what changed with the promoted model, into the live collection or a rebuild

Metrics = dict[str, float]  # evaluation's flat metric dict: recall@1..100, mrr@10, ndcg@10
MetricsByMode = dict[str, Metrics]  # bm25, base, dense, hybrid, served -> metrics


def iso(ts: float) -> str:
    """A timestamp as the records write it: UTC, milliseconds, ``Z``."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class StageTime(TypedDict, total=False):
    start: float  # epoch seconds
    end: float


class JobRef(TypedDict):
    """A job the run launched (``jobs[stage]``, stage ``train`` or ``embed``)."""

    name: str  # the launcher's name for it (Vertex resource name, local job id)
    attempt: int
    submitted_at: str  # iso
    output: str  # the job's base output dir


class RunError(TypedDict):
    stage: str  # train | embed | index | launch | intake
    cause: str


class LiveRef(TypedDict):
    """What an incremental run diffs against: the promoted entry when it launched."""

    collection: str
    rows: int | None
    hashes: str  # URI of the id -> content hash table


class LiveRefRebuild(LiveRef, total=False):
    rebuild: bool  # the live collection was left part-updated: rebuild instead of updating in place


class InplaceProgress(TypedDict):
    """An in-place update of the live collection, recorded before it starts (a crash part-way is finished later)."""

    collection: str
    upserts: int
    deletes: int
    started_at: str  # iso


class InplaceDone(InplaceProgress, total=False):
    done_at: str  # iso


class Counts(TypedDict):
    upserted: int
    deleted: int
    unchanged: int
    total: int


class CountsSkipped(Counts, total=False):
    skipped: int  # documents the corpus had with neither title nor text (index runs; not on a rollback)
    live_missing: int  # full and rebuilt runs replacing a live index: its documents the new collection lacks


# ---------------------------------------------------------------- run record


class RunRecordCreated(TypedDict):
    """The keys ``new_run_record`` writes."""

    run_id: str
    dataset: str
    state: str  # runs.STAGES or FAILED; moves only forward (Ledger.advance)
    kind: Kind | None  # decided once at launch (incremental.kind_for)
    created_at: str  # iso
    updated_at: str  # iso, every write (Ledger.update_run)
    triggers: list[str]  # trigger keys the run holds (fixed once sealed and merged)
    trigger: dict[str, Any]  # what started it: {"type": upload | retrain | refresh | ..., "dataset", "reason"?}
    overrides: dict[str, Any]  # retrain overrides (hyperparameters, base_model, ...)
    jobs: dict[str, JobRef]  # stage -> the job launched for it
    stage_times: dict[str, StageTime]  # state -> when the run entered and left it
    metrics: Metrics | None  # the new index's (set at PUBLISHING)
    previous_metrics: Metrics | None  # the index it replaces
    promoted: bool | None  # whether the gate promoted it (None until indexed)
    error: RunError | None  # why it FAILED
    final_event: dict[str, Any] | None  # the structured CloudEvent published at its end (index-updated or run.failed)


class RunRecord(RunRecordCreated, total=False):
    """The run record (``runs/<run_id>/run.json``; ``ledger.runs``). Keys below are set along the way."""

    # intake and sealing (Ledger.seal / view)
    sealed: bool  # no trigger joins after this
    sealed_at: str  # iso: the moment its data is read as of (BigQuery sources)
    merged: bool  # the per-key items were copied into the record
    trigger_objects: list[dict[str, Any]]  # {"object", "generation", "part"} of each upload trigger
    notices: dict[str, dict[str, Any]]  # key -> intake notice
    file_errors: dict[str, dict[str, Any]]  # key -> rejected file
    skip_deletes: bool  # a corpus file was rejected: its documents are absent, not deleted
    absent_parts: list[str]  # corpus parts quarantined and not back when the run launched, or left out by its jobs
    released_parts: list[str]  # absent parts an allow_shrink retrain lets go (cleared when it is promoted)
    allow_shrink: bool  # a retrain confirmed that its index may lack live documents (retrain --allow-shrink)
    # launching (Pipeline)
    force_full: bool  # a retrain asked for a full run
    hp_tuning: dict[str, Any]  # a tuning job's spec
    launch_errors: list[dict[str, str]]  # {"at", "error"} per failed launch attempt
    model: dict[str, str]  # {"uri": the model folder}
    tuning: dict[str, Any]  # every HP trial (a tuning job)
    live: LiveRefRebuild  # incremental runs: the promoted index it diffs against
    index_requested_at: str  # iso
    # indexing (index.indexing)
    inplace: InplaceDone
    bulk_import: dict[str, str]  # {"job_id", "at"}: a Milvus bulk import under way
    # "<collection>/<vector column>" -> {"stamp", "shards": {file: rows upserted}, "at"}: how far a load got
    loads: dict[str, dict[str, Any]]
    handovers: int  # how many times an indexer delivery handed the rest of its load to a new request
    collection: str
    counts: CountsSkipped
    registry: dict[str, Any]  # the model registry's outcome (index.registry)


def new_run_record(run_id: str, dataset: str, trigger: dict[str, Any], now: float, **fields: Any) -> RunRecord:
    """A PENDING run created at ``now`` (epoch seconds); ``fields`` set keys of ``RunRecord`` up front."""
    record: RunRecord = {
        "run_id": run_id,
        "dataset": dataset,
        "state": PENDING,
        "kind": None,
        "created_at": iso(now),
        "updated_at": iso(now),
        "triggers": [],
        "trigger": trigger,
        "overrides": {},
        "jobs": {},
        "stage_times": {PENDING: {"start": now}},
        "metrics": None,
        "previous_metrics": None,
        "promoted": None,
        "error": None,
        "final_event": None,
    }
    return {**record, **fields}  # type: ignore[typeddict-item]


# ---------------------------------------------------------------- promoted entry, dataset state, rollbacks


class PromotedEntryMade(TypedDict):
    """The keys ``promoted_entry`` writes. Entries promoted by older versions may lack some (``rows``, ``schema``,
    ``hashes``, ``representation``): readers ``.get`` those."""

    run_id: str  # the run that built the collection (an in-place update keeps it)
    collection: str
    model_uri: str
    fingerprint: str
    dim: int
    metrics: Metrics
    metrics_by_mode: MetricsByMode
    search: dict[str, Any]  # what search answers with: default_mode, hybrid_weight, rrf_k
    schema: int  # vectorstore.SCHEMA_VERSION of the collection
    updated_by: str  # the run that made it live last (itself, or an in-place update)
    hashes: str | None  # URI of the id -> content hash table: the next incremental run's diff base
    rows: int | None  # rows in that table
    representation: str  # vectorstore.REPRESENTATION its rows were made with (entries before issue 25 lack it)


class RolledBackMark(TypedDict):
    id: str  # the rollback that replaced this entry
    at: str  # iso


class PromotedEntry(PromotedEntryMade, total=False):
    """A promoted index (the dataset state's ``promoted``, and each of its ``promoted_entries``)."""

    dirty: str  # the run that edited the collection in place and has not promoted yet: the hashes are stale
    rolled_back: RolledBackMark


def promoted_entry(
    *,
    run_id: str,
    collection: str,
    model_uri: str,
    fingerprint: str,
    dim: int,
    metrics: Metrics,
    metrics_by_mode: MetricsByMode,
    search: dict[str, Any],
    schema: int,
    updated_by: str,
    hashes: str | None,
    rows: int | None,
    representation: str,
) -> PromotedEntry:
    return {
        "representation": representation,
        "run_id": run_id,
        "collection": collection,
        "model_uri": model_uri,
        "fingerprint": fingerprint,
        "dim": dim,
        "metrics": metrics,
        "metrics_by_mode": metrics_by_mode,
        "search": search,
        "schema": schema,
        "updated_by": updated_by,
        "hashes": hashes,
        "rows": rows,
    }


class RunSummary(TypedDict):
    collection: str
    run_id: str  # the run that built it or last updated it in place


_RollbackItemMade = TypedDict(  # functional form: ``from`` is a keyword
    "_RollbackItemMade",
    {
        "id": str,  # <dataset>/rollback/<n>, also the event's ce-id
        "at": str,  # iso
        "from": RunSummary,
        "to": RunSummary,
        "by": str,
        "reason": str,
        "event": dict[str, Any],  # the structured index-updated CloudEvent
        "done_at": str | None,  # iso, once the alias moved and the event was published
    },
)


class RollbackItem(_RollbackItemMade, total=False):
    """One rollback on the dataset state's ``rollbacks`` (``index.rollback``)."""

    superseded_at: str  # iso: a run promoted before the rollback was finished
    registry: dict[str, Any]  # the model registry's outcome


def rollback_item(
    *, id: str, at: str, from_: RunSummary, to: RunSummary, by: str, reason: str, event: dict[str, Any]
) -> RollbackItem:
    return {
        "id": id,
        "at": at,
        "from": from_,
        "to": to,
        "by": by,
        "reason": reason,
        "event": event,
        "done_at": None,
    }


class DatasetStateMade(TypedDict):
    """The keys ``empty_dataset_state`` writes."""

    dataset: str
    pending: str | None  # the run collecting uploads, launched when due_at passes
    pending_since: float | None  # its first change (epoch seconds)
    due_at: float  # epoch seconds
    active: str | None  # the run under way (one per dataset)
    promoted: PromotedEntry | None  # the live index
    follow_up: bool  # written from the start, never read since pending runs replaced it


class DatasetState(DatasetStateMade, total=False):
    """Per-dataset state (``ledger/datasets/<dataset>.json``)."""

    promoted_history: list[str]  # collections promoted most recently, the live one first
    promoted_entries: list[PromotedEntry]  # their entries: what a rollback makes live again (rollback.remember)
    rollback_seq: int
    rollbacks: list[RollbackItem]


def without_absent(state: dict, names: set[str]) -> dict | None:
    """The dataset state with those corpus parts no longer absent (``absent_parts``), or None when none of them is."""
    have = state.get("absent_parts") or {}
    if not names & set(have):
        return None
    return {**state, "absent_parts": {n: v for n, v in have.items() if n not in names}}


def empty_dataset_state(dataset: str) -> DatasetState:
    """The state of a dataset nothing has happened to yet."""
    return {
        "dataset": dataset,
        "pending": None,
        "pending_since": None,
        "due_at": 0,
        "active": None,
        "promoted": None,
        "follow_up": False,
    }


# ---------------------------------------------------------------- event payloads (schemas/*.json)


class GateReason(TypedDict):
    reason: str  # why it was promoted or rejected (a rollback: not gated, and why it rolled back)


class Gate(GateReason, total=False):
    metric: str  # EMBEDPIPE_GATE_METRIC
    metrics: list[str]  # every metric the gate compares
    tolerance: float
    require_significant_gain: bool  # EMBEDPIPE_GATE_REQUIRE_SIGNIFICANT_GAIN (full runs replacing a live index)
    comparisons: list[dict[str, Any]]  # {"rival", "metric", "delta", "p", "queries", "significant"}: index.indexing


class ModelCore(TypedDict):
    uri: str
    version: str  # the trainer's model_version, else the fingerprint
    dim: int
    fingerprint: str


class ModelInfo(ModelCore, total=False):
    tuned: bool  # False: the fine-tune did not beat the base model, which was shipped
    shipped_reason: str
    max_seq_length: int | None


class EvalInfo(TypedDict):
    split: str | None  # the qrels split measured (test), None without qrels
    queries: int
    qrels_absent: int  # relevant documents the corpus does not have


class IndexedCore(TypedDict):
    selection: dict[str, Any] | None  # full runs: the trainer's choices on the selection split
    selection_agreement: dict[str, Any] | None  # full runs: selection's order of the modes vs the eval split's
    eval: EvalInfo
    milvus_seconds: float  # time inside Milvus calls
    dropped_collections: list[str]  # old collections retention dropped


class Fallback(TypedDict):
    """A first run whose own index the gate rejected, served by its best baseline instead (``indexing._fallback``)."""

    served: str  # what serves, in words: "base model", "BM25", "RRF of BM25 and the base model", or the run's own
    mode: str  # its key in metrics_by_mode: base | bm25 | bm25+base | served (own index: no base index to serve)
    why: str  # the gate's verdict on the run's own index
    collection: str  # the index that serves
    model_uri: str  # the model it holds (the untuned base model's artifact)
    fingerprint: str
    rejected_collection: str  # the run's own index, kept for inspection like any rejected one
    rejected_metrics_by_mode: MetricsByMode  # its figures (metrics_by_mode: the serving index's, and the baselines)


class Indexed(IndexedCore, total=False):
    """What only an index run's payload carries (a rollback's has ``rollback`` instead)."""

    fallback: Fallback  # only on a first run that fell back


class RollbackInfoCore(TypedDict):
    id: str
    from_collection: str
    from_run_id: str


class RollbackInfo(RollbackInfoCore, total=False):
    reason: str
    by: str


class IndexUpdatedCore(TypedDict):
    """The keys every index-updated payload has."""

    run_id: str
    dataset: str
    kind: Kind  # a rollback says full: a whole collection became live
    promoted: bool
    gate: Gate
    search: dict[str, Any]  # default_mode, hybrid_weight, rrf_k: how search answers
    alias: str
    collection: str
    previous_collection: str | None  # what the alias pointed at before
    model: ModelInfo
    counts: CountsSkipped
    metrics: Metrics | None
    previous_metrics: Metrics | None
    metrics_by_mode: MetricsByMode
    previous_metrics_by_mode: MetricsByMode | None
    default_search_mode: str  # dense | bm25 | hybrid
    stage_seconds: dict[str, float]
    report_uri: str | None
    trigger: dict[str, Any] | None


class IndexUpdated(IndexUpdatedCore, total=False):
    """Data of ``io.embedpipe.index.updated.v1`` (``schemas/index_updated.v1.json``)."""

    selection: dict[str, Any] | None
    selection_agreement: dict[str, Any] | None
    eval: EvalInfo
    milvus_seconds: float
    dropped_collections: list[str]
    rollback: RollbackInfo
    fallback: Fallback


def index_updated_payload(
    *,
    run_id: str,
    dataset: str,
    kind: Kind,
    promoted: bool,
    gate: Gate,
    search: dict[str, Any],
    alias: str,
    collection: str,
    previous_collection: str | None,
    model: ModelInfo,
    counts: CountsSkipped,
    metrics: Metrics | None,
    previous_metrics: Metrics | None,
    metrics_by_mode: MetricsByMode,
    previous_metrics_by_mode: MetricsByMode | None,
    default_search_mode: str,
    stage_seconds: dict[str, float],
    report_uri: str | None,
    trigger: dict[str, Any] | None,
    indexed: Indexed | None = None,
    rollback: RollbackInfo | None = None,
) -> IndexUpdated:
    """The index-updated payload: an index run's (``indexed``: what it measured and did) or a rollback's
    (``rollback``), exactly one of them."""
    if (indexed is None) == (rollback is None):
        raise ValueError("an index-updated payload is an index run's (indexed=...) or a rollback's (rollback=...)")
    payload: IndexUpdated = {
        "run_id": run_id,
        "dataset": dataset,
        "kind": kind,
        "promoted": promoted,
        "gate": gate,
        "search": search,
        "alias": alias,
        "collection": collection,
        "previous_collection": previous_collection,
        "model": model,
        "counts": counts,
        "metrics": metrics,
        "previous_metrics": previous_metrics,
        "metrics_by_mode": metrics_by_mode,
        "previous_metrics_by_mode": previous_metrics_by_mode,
        "default_search_mode": default_search_mode,
        "stage_seconds": stage_seconds,
        "report_uri": report_uri,
        "trigger": trigger,
    }
    if indexed is not None:
        payload.update(indexed)
    if rollback is not None:
        payload["rollback"] = rollback
    return payload


class RunFailed(TypedDict):
    """Data of ``io.embedpipe.run.failed.v1`` (``schemas/run_failed.v1.json``)."""

    run_id: str
    dataset: str
    stage: str  # train | embed | index | launch | intake
    cause: str
    trigger: dict[str, Any] | None


def run_failed_payload(
    *, run_id: str, dataset: str, stage: str, cause: str, trigger: dict[str, Any] | None
) -> RunFailed:
    return {"run_id": run_id, "dataset": dataset, "stage": stage, "cause": cause, "trigger": trigger}


class RunStageCore(TypedDict):
    run_id: str
    dataset: str
    state: str  # the state the run entered


class RunStage(RunStageCore, total=False):
    """Data of ``io.embedpipe.run.stage.v1`` (no shipped schema: progress for people and dashboards)."""

    job: str  # the job launched for the stage (TRAINING, EMBEDDING)


def run_stage_payload(*, run_id: str, dataset: str, state: str, job: str | None = None) -> RunStage:
    data: RunStage = {"run_id": run_id, "dataset": dataset, "state": state}
    if job is not None:
        data["job"] = job
    return data
