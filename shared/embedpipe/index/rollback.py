"""Rollback: point a dataset's alias back at a kept collection an earlier run promoted (``embedpipe rollback``).

The dataset state keeps ``promoted_entries``: the ``promoted`` entries of the indexes live most recently, the live
one first, at most ``KEEP_COLLECTIONS + 1`` (``remember``, called at each promotion). Retention never drops a
collection they name (``kept``), so the default target is always there unless someone dropped it by hand.

Which index (``choose``): ``--to RUN_ID`` picks the kept entry whose collection that run built or last updated in
place; by default, the newest kept entry that is not live and was not itself rolled back from, i.e. a rollback
undoes the newest promotion. When the live index is there because of the last rollback, a plain rollback is a no-op
(running the command twice does not roll back twice); ``--to`` goes further.

How (``rollback``): refused (``RollbackRefused``) when no kept entry matches, when its collection is gone from
Milvus or records another model fingerprint or dim than the entry, when its model artifact is gone, or when a run is
active on the dataset (its promotion could overtake the rollback; one compare-and-set checks this and records the
rollback). That write sets ``promoted`` to the target entry (its own ``hashes`` table and ``dirty`` mark, never the
replaced entry's), marks the replaced entry ``rolled_back`` and appends the rollback, with its ``index-updated``
event, to ``rollbacks``. Then the alias is swapped, the event published (id ``<dataset>/rollback/<n>``) and the
rollback marked done. A command cut short is finished by the next ``rollback`` of the dataset, which republishes the
stored event under the same id; if a run promoted in between, the rollback is superseded and the alias left alone.

The model registry's alias follows the Milvus alias (``point_registry_alias``, injectable as ``registry_alias``):
in the cloud ``promoted`` moves to the Vertex version of the target's model, locally the no-op; what it did is kept
on the rollback as ``registry``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from embedpipe import topology
from embedpipe.config import Settings
from embedpipe.contracts.events import INDEX_UPDATED, Event, validate
from embedpipe.contracts.records import (
    FULL,
    DatasetState,
    PromotedEntry,
    RollbackItem,
    RunSummary,
    index_updated_payload,
    rollback_item,
)
from embedpipe.index import registry
from embedpipe.ledger import runs
from embedpipe.ml import model
from embedpipe.retrieval import vectorstore

log = logging.getLogger(__name__)

MAX_ROLLBACKS = 50  # rollbacks listed on the dataset state (ids keep counting: ``rollback_seq``)


class RollbackRefused(Exception):
    """A rollback that must not happen; the message names the dataset, the target and the reason."""


@dataclass(frozen=True)
class Outcome:
    message: str
    event: dict | None  # the index-updated event published (structured CloudEvent), None for a no-op


def remember(state: DatasetState, entry: PromotedEntry, limit: int) -> list[PromotedEntry]:
    """``promoted_entries`` after ``entry`` became live: it first (replacing an entry of the same collection: an
    in-place update), then the others, the previous live one as ``promoted`` has it (with any ``dirty`` mark). Past
    ``limit``, entries rolled back from go first, then the oldest."""
    entries = [entry] + [e for e in _synced(state) if e["collection"] != entry["collection"]]
    while len(entries) > limit:
        gone = next((i for i in range(len(entries) - 1, 0, -1) if entries[i].get("rolled_back")), len(entries) - 1)
        entries.pop(gone)
    return entries


def kept(state: DatasetState) -> set[str]:
    """Collections retention must keep for rollbacks: every kept entry's."""
    return {e["collection"] for e in _synced(state)}


def _synced(state: DatasetState) -> list[PromotedEntry]:
    """The kept entries with the live one as ``promoted`` has it now (an in-place update may have marked it dirty);
    a state from before ``promoted_entries`` existed has only its live entry."""
    live = state.get("promoted")
    entries = state.get("promoted_entries") or []
    if not live:
        return list(entries)
    return [live] + [e for e in entries if e["collection"] != live["collection"]]


def built_by(entry: PromotedEntry, dataset: str, run_id: str) -> bool:
    """Whether ``run_id`` built the entry's collection (its own, or its first-run fallback's), or last updated it in
    place."""
    built = (vectorstore.collection_name(dataset, run_id), vectorstore.base_collection_name(dataset, run_id))
    return entry["collection"] in built or entry.get("updated_by") == run_id


def choose(state: DatasetState, to: str | None = None) -> tuple[PromotedEntry, str | None]:
    """(target entry, why nothing needs doing or None) for a rollback of ``state``'s dataset; RollbackRefused when
    there is nothing to roll back to."""
    dataset, live = state["dataset"], state.get("promoted")
    if not live:
        raise RollbackRefused(f"dataset {dataset!r} has no promoted index: nothing to roll back")
    entries = _synced(state)
    if to:
        target = next((e for e in entries if built_by(e, dataset, to)), None)
        if target is None:
            runs_kept = ", ".join(e.get("updated_by") or e["run_id"] for e in entries)
            raise RollbackRefused(
                f"dataset {dataset!r}: run {to} built no kept promoted index (kept, newest first: {runs_kept})"
            )
        if target["collection"] == live["collection"]:
            return target, f"dataset {dataset!r}: {live['collection']} (run {to}) is already live: nothing to do"
        return target, None
    last = (state.get("rollbacks") or [None])[-1]
    if last and last["to"]["collection"] == live["collection"]:
        return live, (
            f"dataset {dataset!r}: {live['collection']} is live since rollback {last['id']} from "
            f"{last['from']['collection']}: nothing to do (--to RUN_ID picks another kept index)"
        )
    target = next((e for e in entries[1:] if not e.get("rolled_back")), None)
    if target is None:
        raise RollbackRefused(
            f"dataset {dataset!r}: no earlier promoted index is kept to roll back to (live: {live['collection']})"
        )
    return target, None


def check_target(client, store, dataset: str, target: PromotedEntry) -> None:
    """The target collection must still exist and hold vectors of the model its entry names; the model must still
    load (the search service reloads it)."""
    name = target["collection"]
    if not client.has_collection(name):
        raise RollbackRefused(f"dataset {dataset!r}: cannot roll back to {name}: the collection no longer exists")
    info = vectorstore.describe(client, name)
    if (info.fingerprint, info.dim) != (target["fingerprint"], target["dim"]):
        raise RollbackRefused(
            f"dataset {dataset!r}: cannot roll back to {name}: it records model {info.fingerprint} (dim {info.dim}), "
            f"its ledger entry says {target['fingerprint']} (dim {target['dim']})"
        )
    uri = target["model_uri"]
    if uri.startswith("gs://") and store.read_json_gen(f"{uri.rstrip('/')}/{model.INFO_FILE}")[0] is None:
        raise RollbackRefused(f"dataset {dataset!r}: cannot roll back to {name}: its model {uri} is gone")


def _summary(entry: PromotedEntry) -> RunSummary:
    return {"collection": entry["collection"], "run_id": entry.get("updated_by") or entry["run_id"]}


def event_for(
    settings: Settings, ledger, dataset: str, rid: str, live: PromotedEntry, target: PromotedEntry, why: dict
) -> Event:
    """The rollback's index-updated: the target index as promoted, marked ``rollback``. ``kind`` is ``full``: a whole
    collection became live, which is what subscribers do for a full run (a new kind would fail their validation)."""
    run_id = _summary(target)["run_id"]
    rows = target.get("rows") or 0
    search = target.get("search") or {}
    data = index_updated_payload(
        run_id=run_id,
        dataset=dataset,
        kind=FULL,
        promoted=True,
        gate={"reason": f"rollback from {live['collection']}: not gated ({why['reason'] or 'no reason given'})"},
        search=search,
        alias=vectorstore.alias_name(dataset),
        collection=target["collection"],
        previous_collection=live["collection"],
        model={
            "uri": target["model_uri"],
            "version": target["fingerprint"],
            "dim": target["dim"],
            "fingerprint": target["fingerprint"],
        },
        counts={"upserted": 0, "deleted": 0, "unchanged": rows, "total": rows},
        metrics=target.get("metrics") or None,
        previous_metrics=live.get("metrics") or None,
        metrics_by_mode=target.get("metrics_by_mode") or {},
        previous_metrics_by_mode=live.get("metrics_by_mode") or None,
        default_search_mode=search.get("default_mode", "dense"),
        stage_seconds={},
        report_uri=f"{ledger.run_dir(run_id)}/report.html",
        trigger={"type": "rollback", **why},
        rollback={
            "id": rid,
            "from_collection": live["collection"],
            "from_run_id": _summary(live)["run_id"],
            **why,
        },
    )
    event = Event(INDEX_UPDATED, dict(data), id=rid, subject=run_id)
    validate(event)
    return event


def rollback(
    settings: Settings,
    ledger: runs.Ledger,
    client,  # a pymilvus MilvusClient
    publish: Callable[[str, Event], None],
    dataset: str,
    to: str | None = None,
    by: str = "",
    reason: str = "",
    registry_alias: Callable[..., dict | None] | None = None,
) -> Outcome:
    """Roll ``dataset`` back (see the module doc). Finishes an earlier rollback of the dataset cut short first."""
    registry_alias = registry_alias or point_registry_alias
    state = ledger.get_dataset(dataset)
    if (open_ := _unfinished(state)) is not None:
        done = _complete(settings, ledger, client, publish, dataset, open_, registry_alias)
        note = f" (rollback {open_['id']} was cut short and is finished now; run again for another rollback)"
        return Outcome(done.message + note, done.event)
    target, noop = choose(state, to)
    if noop:
        return Outcome(noop, None)
    check_target(client, ledger.store, dataset, target)
    live = state["promoted"]
    target = {k: v for k, v in target.items() if k != "rolled_back"}  # rolling forward again clears the mark
    why = {"by": by, "reason": reason}

    def record(st):
        if st.get("active"):
            raise RollbackRefused(
                f"dataset {dataset!r}: run {st['active']} is active and could promote over the rollback to "
                f"{target['collection']}; run the rollback again when it has ended (embedpipe runs)"
            )
        if _unfinished(st) is not None or (st.get("promoted") or {}).get("collection") != live["collection"]:
            raise RollbackRefused(f"dataset {dataset!r}: the live index changed meanwhile; run the rollback again")
        seq = st.get("rollback_seq", 0) + 1
        rid = f"{dataset}/rollback/{seq}"
        at = runs.iso(ledger.clock())
        live_now, *others = _synced(st)
        entries = [
            target,
            {**live_now, "rolled_back": {"id": rid, "at": at}},
            *(e for e in others if e["collection"] != target["collection"]),
        ]
        item = rollback_item(
            id=rid,
            at=at,
            from_=_summary(live_now),
            to=_summary(target),
            by=by,
            reason=reason,
            event=event_for(settings, ledger, dataset, rid, live_now, target, why).to_structured(),
        )
        return {
            **st,
            "promoted": target,
            "promoted_entries": entries,
            "rollback_seq": seq,
            "rollbacks": [*st.get("rollbacks", []), item][-MAX_ROLLBACKS:],
        }

    state = ledger.update_dataset(dataset, record)
    return _complete(settings, ledger, client, publish, dataset, state["rollbacks"][-1], registry_alias)


def _unfinished(state: DatasetState) -> RollbackItem | None:
    last = (state.get("rollbacks") or [None])[-1]
    return last if last and not last.get("done_at") and not last.get("superseded_at") else None


def _complete(settings, ledger, client, publish, dataset: str, item: RollbackItem, registry_alias) -> Outcome:
    """Swap the alias, point the registry alias, publish the stored event, mark the rollback done. Repeatable: each
    step is idempotent and the event keeps its id."""
    st = ledger.get_dataset(dataset)
    if (st.get("promoted") or {}).get("collection") != item["to"]["collection"]:  # a run promoted since
        _mark(ledger, dataset, item["id"], "superseded_at")
        return Outcome(
            f"dataset {dataset!r}: rollback {item['id']} to {item['to']['collection']} was cut short and a run has "
            f"promoted {(st.get('promoted') or {}).get('collection')} since: left as it is",
            None,
        )
    vectorstore.point_alias(client, vectorstore.alias_name(dataset), item["to"]["collection"])
    registration = registry_alias(settings, dataset, st["promoted"], ledger=ledger)
    publish(topology.INDEX_UPDATED, Event.from_structured(item["event"]))
    _mark(ledger, dataset, item["id"], "done_at", registry=registration)
    log.info("rollback %s: %s -> %s", item["id"], item["from"]["collection"], item["to"]["collection"])
    return Outcome(
        f"dataset {dataset!r}: rolled back from {item['from']['collection']} to {item['to']['collection']} "
        f"(run {item['to']['run_id']}); index-updated {item['id']} published",
        item["event"],
    )


def _mark(ledger, dataset: str, rid: str, field: str, **extra) -> None:
    def fn(st):
        items = st.get("rollbacks") or []
        if not any(i["id"] == rid and not i.get(field) for i in items):
            return None
        at = runs.iso(ledger.clock())
        return {**st, "rollbacks": [{**i, field: at, **extra} if i["id"] == rid else i for i in items]}

    ledger.update_dataset(dataset, fn)


def point_registry_alias(settings: Settings, dataset: str, entry: PromotedEntry, ledger=None) -> dict:
    """Point the model registry's alias at the version of the entry's model (``registry.promote``: in the cloud the
    Vertex version registered for the entry's run, registered now if its promotion could not; locally the no-op).
    Returns what the rollback records as its ``registry``; never raises (the Milvus alias has moved already)."""

    ledger = ledger or runs.Ledger(settings.artifacts_bucket)

    def still_live() -> bool:  # a promotion that overtook the rollback moves the alias itself
        live = ledger.get_dataset(dataset).get("promoted") or {}
        return live.get("collection") == entry["collection"]

    reg = registry.for_settings(settings)
    metrics = entry.get("metrics")
    return registry.promote(reg, dataset, entry["run_id"], entry["model_uri"], metrics, still_live, ledger.clock)
