"""The run ledger, kept in the artifacts bucket so every function instance sees the same truth.

Objects (all JSON):

- ``ledger/claims/<sha256(trigger key)>.json``: created once (``if_generation_match=0``); names the run a trigger
  (an object version or a message id) belongs to. A redelivery finds its claim and only finishes what is left.
- ``ledger/rejected/<sha256(trigger key)>.json``: a trigger refused before any claim (a bad retrain message), with
  the reason: what ``retrain --wait`` reports instead of waiting.
- ``ledger/datasets/<dataset>.json``: per-dataset state: the ``pending`` run collecting uploads (launched when
  ``due_at`` passes, which is how bursts coalesce), the ``active`` run, and the ``promoted`` index.
- ``runs/<run_id>/run.json``: the run record. Changed only by compare-and-set on the object generation.
- ``runs/<run_id>/{arriving,triggers,notices,file_errors}/<sha256(key)>.json``: one create-only object per upload
  claimed (``arriving``: its intake is under way; the launch waits for it), per trigger and per file verdict, so a
  burst of uploads never contends for the run record. ``view`` merges them into
  the record; the launch seals the run (``seal``: no trigger joins it after) and copies them into the record, so
  everything after the launch reads the record alone. A trigger recorded after the seal moves to the next run.

The documents are typed in ``contracts.records`` (``RunRecord``, ``DatasetState``: every key and its type) and made
by one constructor each (``new_run_record``, ``empty_dataset_state``); they stay plain JSON dicts, so the
compare-and-set functions (``fn(record) -> record | None``) edit them as before and old ledgers read unchanged.

Stages only move forward (``STAGES`` order); a duplicate or late event for a stage already passed is a no-op.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from embedpipe.contracts.records import (  # noqa: F401 - the states and ``iso`` are read as ``runs.X`` too
    EMBEDDING,
    FAILED,
    INDEXING,
    PENDING,
    PUBLISHING,
    STAGES,
    SUCCEEDED,
    TERMINAL,
    TRAINING,
    DatasetState,
    RunRecord,
    empty_dataset_state,
    iso,
    new_run_record,
)
from embedpipe.gcp import storage
from embedpipe.gcp.storage import PreconditionFailed

log = logging.getLogger(__name__)


class Store(Protocol):
    def read_json_gen(self, uri: str) -> tuple[Any, int]: ...
    def write_json(self, uri: str, obj: Any, if_generation_match: int | None = None) -> int: ...
    def delete(self, uri: str) -> None: ...
    def list_uris(self, prefix_uri: str): ...


def stage_index(state: str) -> int:
    return len(STAGES) if state == FAILED else STAGES.index(state)


def is_past(record: RunRecord, state: str) -> bool:
    """True when the run is already at or beyond ``state`` (so an event for it is late or a duplicate)."""
    return record["state"] in TERMINAL or stage_index(record["state"]) >= stage_index(state)


def parse_iso(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def new_run_id(now: float) -> str:
    """``<UTC stamp of now>-<6 random hex>``. Unique across processes by its random part, not by its time: two
    instances creating a run in the same second differ there (and ``create_run`` is create-only besides). The stamp
    orders runs and their collections and names the moment the run was created, so it is read from the ledger's
    clock like every other stamp of the run (``Ledger.pending_run``), not from the wall clock directly."""
    stamp = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y%m%dt%H%M%S")
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


class Ledger:
    def __init__(self, artifacts_bucket: str, store: Store = storage, clock: Callable[[], float] = time.time):
        self.bucket = artifacts_bucket
        self.store = store
        self.clock = clock  # wall time (seconds since the epoch) for every stamp the ledger writes and compares

    # ------------------------------------------------------------ addresses
    def run_uri(self, run_id: str) -> str:
        return f"gs://{self.bucket}/runs/{run_id}/run.json"

    def run_dir(self, run_id: str) -> str:
        return f"gs://{self.bucket}/runs/{run_id}"

    def _claim_uri(self, key: str) -> str:
        return f"gs://{self.bucket}/ledger/claims/{_digest(key)}.json"

    def _rejection_uri(self, key: str) -> str:
        return f"gs://{self.bucket}/ledger/rejected/{_digest(key)}.json"

    def _item_uri(self, run_id: str, field: str, key: str) -> str:
        return f"{self.run_dir(run_id)}/{field}/{_digest(key)}.json"

    def _dataset_uri(self, dataset: str) -> str:
        return f"gs://{self.bucket}/ledger/datasets/{dataset}.json"

    # ------------------------------------------------------------ compare-and-set
    def _update(
        self,
        uri: str,
        fn: Callable[[Any], Any],
        create: Callable[[], Any] | None = None,
        read: tuple[Any, int] | None = None,
    ) -> Any:
        """Read-modify-write with CAS. ``fn`` gets a copy and returns the new document, or None to leave it.
        ``read``: the (document, generation) the caller has just read, used for the first attempt instead of reading
        it again (a lost race reads afresh, as always)."""
        for attempt in range(50):
            doc, gen = read if read is not None and attempt == 0 else self.store.read_json_gen(uri)
            if doc is None:
                if create is None:
                    raise KeyError(uri)
                doc = create()
            new = fn(copy.deepcopy(doc))
            if new is None:
                return doc
            try:
                self.store.write_json(uri, new, if_generation_match=gen)
                return new
            except PreconditionFailed:
                time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
        raise RuntimeError(f"too much contention on {uri}")

    # ------------------------------------------------------------ claims
    def reject(self, key: str, reason: str) -> None:
        """Record that a trigger was refused before anything was claimed (a bad retrain message): create-only, so a
        redelivery writes nothing new. What ``embedpipe retrain --wait`` reads instead of waiting out its timeout."""
        try:
            self.store.write_json(
                self._rejection_uri(key), {"key": key, "reason": reason, "at": iso(self.clock())}, if_generation_match=0
            )
        except PreconditionFailed:
            pass

    def get_rejection(self, key: str) -> dict | None:
        return self.store.read_json_gen(self._rejection_uri(key))[0]

    def get_claim(self, key: str) -> dict | None:
        return self.store.read_json_gen(self._claim_uri(key))[0]

    def move_claim(self, key: str, from_run: str, to_run: str) -> str:
        """Point a claim at another run (its trigger arrived after ``from_run`` was sealed); the run it names now."""
        moved = self._update(
            self._claim_uri(key),
            lambda c: {**c, "run_id": to_run, "moved_from": from_run} if c["run_id"] == from_run else None,
        )
        return moved["run_id"]

    def claim(self, key: str, run_id: str) -> tuple[str, bool]:
        """Claim ``key`` for ``run_id``; returns (the run that owns the claim, whether we created it)."""
        try:
            self.store.write_json(
                self._claim_uri(key), {"key": key, "run_id": run_id, "at": iso(self.clock())}, if_generation_match=0
            )
            return run_id, True
        except PreconditionFailed:
            return self.get_claim(key)["run_id"], False

    # ------------------------------------------------------------ runs
    def get_run(self, run_id: str) -> RunRecord | None:
        return self.store.read_json_gen(self.run_uri(run_id))[0]

    def create_run(self, run_id: str, dataset: str, trigger: dict, **fields: Any) -> RunRecord:
        record = new_run_record(run_id, dataset, trigger, self.clock(), **fields)
        self.store.write_json(self.run_uri(run_id), record, if_generation_match=0)
        return record

    def update_run(self, run_id: str, fn: Callable[[RunRecord], RunRecord | None]) -> RunRecord:
        def wrapped(record):
            out = fn(record)
            if out is not None:
                out["updated_at"] = iso(self.clock())
            return out

        return self._update(self.run_uri(run_id), wrapped)

    def advance(self, run_id: str, from_state: str, to_state: str, **fields: Any) -> tuple[RunRecord, bool]:
        """Move ``from_state`` -> ``to_state`` once; (record, whether this call moved it)."""
        moved = False

        def fn(record):
            nonlocal moved
            moved = False  # a CAS retry re-runs this; only the attempt that writes may report a move
            if record["state"] != from_state:
                return None
            now = self.clock()
            times = record.setdefault("stage_times", {})
            times.setdefault(from_state, {"start": now})["end"] = now
            times.setdefault(to_state, {})["start"] = now
            if to_state in TERMINAL:
                times[to_state]["end"] = now
            record["state"] = to_state
            record.update(fields)
            moved = True
            return record

        return self.update_run(run_id, fn), moved

    def list_runs(self) -> list[RunRecord]:
        """Every run's ``view``, oldest first (one listing: the items sit beside each run record)."""
        records, items = [], {}
        for uri, _ in self.store.list_uris(f"gs://{self.bucket}/runs/"):
            if uri.endswith("/run.json"):
                if rec := self.store.read_json_gen(uri)[0]:
                    records.append(rec)
            elif (where := _item_of(uri)) and where[1] in MERGED_FIELDS and (doc := self.store.read_json_gen(uri)[0]):
                items.setdefault(where[0], {}).setdefault(where[1], []).append(doc)
        views = [_merged(r, items.get(r["run_id"], {}), _view_fields(r)) or r for r in records]
        return sorted(views, key=lambda r: r["created_at"])

    # ------------------------------------------------------------ datasets
    def get_dataset(self, dataset: str) -> DatasetState:
        return self.store.read_json_gen(self._dataset_uri(dataset))[0] or empty_dataset_state(dataset)

    def update_dataset(
        self, dataset: str, fn: Callable[[DatasetState], DatasetState | None], read: tuple[Any, int] | None = None
    ) -> DatasetState:
        """CAS on the dataset state; ``read``: its (document, generation) just read by the caller (see ``_update``)."""
        return self._update(self._dataset_uri(dataset), fn, create=lambda: empty_dataset_state(dataset), read=read)

    def has_dataset(self, dataset: str) -> bool:
        return self.store.read_json_gen(self._dataset_uri(dataset))[0] is not None

    def list_datasets(self) -> list[str]:
        prefix = f"gs://{self.bucket}/ledger/datasets/"
        return sorted(uri[len(prefix) : -5] for uri, _ in self.store.list_uris(prefix) if uri.endswith(".json"))

    def pending_run(self, dataset: str, trigger: dict, due_in_s: float, max_wait_s: float = 60.0) -> str:
        """The run that collects changes to ``dataset`` now: the pending one (its due time pushed back, bounded
        by ``max_wait_s`` after its first change), or a new one. Everything that arrives before ``due_at`` joins
        the same run, which is how bursts coalesce."""
        for _ in range(20):
            # read once: this read decides the run and is the compare-and-set's base (no second read of the same
            # generation on every upload's path)
            read = self.store.read_json_gen(self._dataset_uri(dataset))
            state = read[0] or empty_dataset_state(dataset)
            run_id = state["pending"]
            fresh = run_id is None
            if fresh:
                run_id = new_run_id(self.clock())
                self.create_run(run_id, dataset, trigger)

            def fn(st, run_id=run_id, fresh=fresh):
                now = self.clock()
                if st["pending"] is None:
                    if not fresh:
                        return None  # the run we read as pending was launched meanwhile: start over
                    st["pending"], st["pending_since"], st["due_at"] = run_id, now, now + due_in_s
                    return st
                if st["pending"] != run_id:
                    return None
                st["due_at"] = _pushed_due(st, now, due_in_s, max_wait_s)
                return st

            if self.update_dataset(dataset, fn, read=read)["pending"] == run_id:
                return run_id
            if fresh:
                self.store.delete(self.run_uri(run_id))  # lost the race; nobody refers to this record
        raise RuntimeError(f"could not find or create a pending run for {dataset}")

    def extend_due(self, dataset: str, run_id: str, due_in_s: float, max_wait_s: float = 60.0) -> None:
        """Push the pending run's due time back to ``due_in_s`` from now (bounded as in ``pending_run``); nothing
        when ``run_id`` is no longer the dataset's pending run (it launched: what arrived is counted or moves on)."""

        def fn(st):
            if st["pending"] != run_id:
                return None
            due = _pushed_due(st, self.clock(), due_in_s, max_wait_s)
            return {**st, "due_at": due} if due > st["due_at"] else None

        self.update_dataset(dataset, fn)

    # ------------------------------------------------------------ per-key items of a run
    def put_item(self, run_id: str, field: str, key: str, value: dict) -> bool:
        """``view[field][key] = value`` once (create-only: a redelivery writes nothing); whether this call wrote it."""
        try:
            self.store.write_json(
                self._item_uri(run_id, field, key),
                {"key": key, "at": self.clock(), "value": value},
                if_generation_match=0,
            )
            return True
        except PreconditionFailed:
            return False

    def has_item(self, run_id: str, field: str, key: str) -> bool:
        return self.store.read_json_gen(self._item_uri(run_id, field, key))[0] is not None

    def _item_uris(self, run_id: str) -> dict[str, list[str]]:
        """The URIs of the run's per-key items by field, from one listing (nothing read)."""
        out: dict[str, list[str]] = {f: [] for f in ITEM_FIELDS}
        for uri, _ in self.store.list_uris(f"{self.run_dir(run_id)}/"):
            if where := _item_of(uri):
                out[where[1]].append(uri)
        return out

    def _items(self, run_id: str, fields: tuple[str, ...] | None = None) -> dict[str, list[dict]]:
        """The run's per-key items of ``fields`` (default: those merged into a record), read: one listing, one read
        per item of those fields."""
        uris = self._item_uris(run_id)
        out: dict[str, list[dict]] = {f: [] for f in ITEM_FIELDS}
        wanted = [(field, uri) for field in fields or MERGED_FIELDS for uri in uris[field]]
        for (field, _), doc in zip(wanted, self._read_many([uri for _, uri in wanted])):
            if doc:
                out[field].append(doc)
        return out

    def _read_many(self, uris: list[str]) -> list[Any]:
        """The documents at ``uris``, in order, read side by side (up to ``READ_THREADS`` at a time): the seal reads
        one item per upload of the burst, on the launch's path, where one after another cost a round trip each."""
        if len(uris) < 2:
            return [self.store.read_json_gen(uri)[0] for uri in uris]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(uris))) as pool:
            return [doc for doc, _ in pool.map(self.store.read_json_gen, uris)]

    def arriving(self, run_id: str) -> list[str]:
        """Uploads claimed for this run whose intake has not ended yet (no trigger, no file error), younger than
        ``ARRIVING_MAX_S``: the launch waits for them, so a slow intake does not push its file into the next run.
        Items are named by their key's digest, so only the unfinished ones are read (for their age): usually none."""
        uris = self._item_uris(run_id)
        done = {_name(u) for f in ("triggers", "file_errors") for u in uris[f]}
        docs = [doc for u in uris["arriving"] if _name(u) not in done and (doc := self.store.read_json_gen(u)[0])]
        return [d["key"] for d in docs if self.clock() - d["at"] < ARRIVING_MAX_S]

    def add_trigger(self, run_id: str, key: str, info: dict | None = None, wait_s: float = 10.0) -> bool:
        """Record an upload's trigger in ``run_id``; whether the run counts it. Written first, read after: while the
        run is unsealed the seal's listing will see the item; once sealed, the merged record says whether it did
        (False: the caller moves the trigger to the next run). A seal whose merge is not written yet is waited for,
        ``wait_s`` at most, measured on the monotonic clock, not the ledger's (a wait, not a stamp: the ledger's
        clock may be a frozen test clock, and no stored time is compared)."""
        self.put_item(run_id, "triggers", key, info or {})
        deadline = time.monotonic() + wait_s
        while True:
            record = self.get_run(run_id)
            if record is None:
                return False
            if record["state"] == PENDING and not record.get("sealed"):
                return True
            if record.get("merged") or not record.get("sealed"):
                return key in record["triggers"]
            if time.monotonic() >= deadline:  # the sealing launch died before its merge: a redelivery retries
                raise RuntimeError(f"run {run_id} is sealed but its triggers are not merged yet")
            time.sleep(MERGE_POLL_S)

    def seal(self, run_id: str) -> RunRecord:
        """Close a PENDING run to new triggers, then copy its items into the record once (``merged``): the triggers
        a run holds never change after that. A trigger written before the seal is in the listing that follows it;
        one written after finds the run sealed and merged without it (``add_trigger``) and moves on. ``sealed_at``
        is the moment the run's data is read as of (BigQuery sources: every job and replica of the run, ``as_of``)."""
        now = iso(self.clock())
        self.update_run(
            run_id,
            lambda r: (
                {**r, "sealed": True, "sealed_at": now} if r["state"] == PENDING and not r.get("sealed") else None
            ),
        )
        items = self._items(run_id)

        def merge(r):
            if r.get("merged") or r["state"] != PENDING:
                return None
            return {**(_merged(r, items) or r), "merged": True}

        return self.update_run(run_id, merge)

    def merge_items(self, run_id: str, fields: tuple[str, ...] = ("notices", "file_errors")) -> RunRecord:
        """Copy file verdicts recorded after the seal (launch-time validation) into the record."""
        items = self._items(run_id, fields)
        return self.update_run(run_id, lambda r: _merged(r, items, fields))

    def view(self, run_id: str, record: RunRecord | None = None) -> RunRecord | None:
        """The run record with the per-key items not yet copied into it (what ``embedpipe status`` shows). Triggers
        are merged only into an unsealed run: a sealed one holds exactly the triggers it decided on. ``record``: the
        run record as the caller has just read it (not read again)."""
        record = record or self.get_run(run_id)
        if record is None:
            return None
        fields = _view_fields(record)
        return _merged(record, self._items(run_id, fields), fields) or record


ITEM_FIELDS = ("triggers", "notices", "file_errors", "arriving")
MERGED_FIELDS = ("triggers", "notices", "file_errors")  # what ``_merged`` copies into a record (never ``arriving``)
# An upload whose intake is still running holds back its run's launch this long at most (its handler may have died).
ARRIVING_MAX_S = 120.0
# How often add_trigger reads a sealed run whose merge it waits for.
MERGE_POLL_S = 0.2
READ_THREADS = 8  # reads of a run's per-key items in flight at once (``Ledger._read_many``)


def _item_of(uri: str) -> tuple[str, str] | None:
    """(run id, field) of a per-key item's URI (``.../runs/<run_id>/<field>/<digest>.json``), else None."""
    run_id, field = uri.rsplit("/", 3)[-3:-1]
    return (run_id, field) if field in ITEM_FIELDS else None


def _pushed_due(state: DatasetState, now: float, due_in_s: float, max_wait_s: float) -> float:
    """The pending run's due time pushed back to ``now + due_in_s``, never past ``max_wait_s`` after its first
    change (a steady trickle of uploads cannot hold a run back for ever)."""
    return max(state["due_at"], min(now + due_in_s, (state["pending_since"] or now) + max_wait_s))


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _name(uri: str) -> str:
    """An item's object name (its key's digest), whatever its field."""
    return uri.rsplit("/", 1)[-1]


def _view_fields(record: RunRecord) -> tuple[str, ...]:
    return MERGED_FIELDS if not record.get("sealed") else ("notices", "file_errors")


def _merged(record: RunRecord, items: dict[str, list[dict]], fields: tuple[str, ...] = ITEM_FIELDS) -> RunRecord | None:
    """``record`` with ``items`` (per-key objects, in the order they were written) merged in; None if nothing new."""
    record = copy.deepcopy(record)
    changed = False
    for doc in sorted(items.get("triggers", []) if "triggers" in fields else [], key=lambda d: (d["at"], d["key"])):
        if doc["key"] not in record["triggers"]:
            record["triggers"].append(doc["key"])
            if doc["value"]:
                record.setdefault("trigger_objects", []).append(doc["value"])
            changed = True
    for field in [f for f in ("notices", "file_errors") if f in fields]:
        for doc in sorted(items.get(field, []), key=lambda d: (d["at"], d["key"])):
            if doc["key"] not in record.get(field, {}):
                record.setdefault(field, {})[doc["key"]] = doc["value"]
                changed = True
    return record if changed else None


def last_load_progress(record: RunRecord) -> float | None:
    """When an index load of this run last recorded progress (``index.indexing.Progress``), epoch seconds; None if
    none did."""
    stamps = [parse_iso(e["at"]) for e in (record.get("loads") or {}).values() if e.get("at")]
    return max(stamps, default=None)


def closest_names(name: str, known: list[str]) -> list[str]:
    """The ``known`` dataset names closest to ``name`` (up to 3, closest first): a typo's suggestions."""
    import difflib

    return difflib.get_close_matches(name, known, n=3)
