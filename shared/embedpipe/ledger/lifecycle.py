"""A run's endings, shared by the orchestration (``control.pipeline``) and the indexer (``index.indexing``): ``fail``
(publish run.failed), ``finish`` (publish the stored index-updated event) and ``release`` (free the dataset for its
follow-up run). None of them launches a job: the follow-up run is launched by the launching functions (job events,
retrain) and the reconcile tick, through ``Pipeline``, which extends this class. The indexer holds only this, so it
cannot launch one (it has no right to: no embedpipeJobLauncher role, no actAs on the job account).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from embedpipe import topology
from embedpipe.config import Settings
from embedpipe.contracts.events import INDEX_REQUESTED, RUN_FAILED, Event
from embedpipe.contracts.records import RunRecord, run_failed_payload
from embedpipe.gcp import bus
from embedpipe.ledger import runs
from embedpipe.ledger.runs import INDEXING, PUBLISHING, Ledger

log = logging.getLogger(__name__)

# A run stuck in PUBLISHING this long (its indexer died between storing the event and publishing it) is finished by
# reconcile: index-updated published from the stored event.
STALLED_PUBLISH_S = 60.0


def publish_stalled(record: RunRecord, now: float) -> bool:
    """Whether ``record`` has been PUBLISHING for longer than STALLED_PUBLISH_S at ``now`` (epoch seconds)."""
    started = (record.get("stage_times") or {}).get(PUBLISHING, {}).get("start") or 0
    return record["state"] == PUBLISHING and now - started > STALLED_PUBLISH_S


def embeddings_uri(run_dir: str, attempt: int) -> str:
    """Each embed attempt writes its own folder: shards an earlier attempt left can never be mixed in."""
    return f"{run_dir}/embeddings/{attempt}"


class Lifecycle:
    def __init__(
        self,
        settings: Settings,
        ledger: Ledger | None = None,
        publish: Callable[[str, Event], None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.clock = clock  # wall time, epoch seconds: every stamp and age this object computes reads it
        self.ledger = ledger or Ledger(settings.artifacts_bucket, clock=clock)
        self._publish = publish

    def publish(self, topic: str, event: Event) -> None:
        if self._publish is not None:
            self._publish(topic, event)
        else:
            bus.publish(self.settings.project, topic, event)

    def request_index(self, record: RunRecord, part: int = 0) -> None:
        """Ask the indexer for the run, and record when. ``part`` > 0: an indexer delivery hands the rest of its load
        to the next one, for the ``part``-th time (``index.indexing.Handover``): its own event id, since it is no
        duplicate of the first request."""
        run_id = record["run_id"]
        suffix = f"/{part}" if part else ""
        event = Event(
            INDEX_REQUESTED,
            {"run_id": run_id, "dataset": record["dataset"]},
            id=f"{run_id}/index{suffix}",
            subject=run_id,
        )
        self.publish(topology.INDEX_REQUESTS, event)
        now = runs.iso(self.clock())
        self.ledger.update_run(run_id, lambda r: {**r, "index_requested_at": now} if r["state"] == INDEXING else None)

    # ------------------------------------------------------------------ endings
    def fail(self, run_id: str, stage: str, cause: str) -> None:
        record = self.ledger.get_run(run_id)
        if record is None or record["state"] in runs.TERMINAL:
            return
        data = run_failed_payload(
            run_id=run_id, dataset=record["dataset"], stage=stage, cause=cause, trigger=record.get("trigger")
        )
        event = Event(RUN_FAILED, dict(data), id=f"{run_id}/failed", subject=run_id)
        for _ in range(5):  # the run may move on between our read and our write: fail it from where it is now
            rec, moved = self.ledger.advance(
                run_id,
                record["state"],
                runs.FAILED,
                error={"stage": stage, "cause": cause},
                final_event=event.to_structured(),
            )
            if moved or rec["state"] in runs.TERMINAL:
                break
            record = rec
        if moved:
            self.publish(topology.RUN_EVENTS, event)
            log.error("run %s failed in %s: %s", run_id, stage, cause)
        if rec["state"] in runs.TERMINAL:  # never free the dataset of a run that is still active
            self.release(rec)

    def finish(self, record: RunRecord) -> str:
        """Publish a PUBLISHING run's stored index-updated event, then end it and free its dataset. The indexer calls
        this after promoting; reconcile calls it again for a run whose publish stalled (the event id is the run's, so
        a second publish is a duplicate subscribers drop)."""
        event = Event.from_structured(record["final_event"])
        self.publish(topology.INDEX_UPDATED, event)
        rec, _ = self.ledger.advance(record["run_id"], PUBLISHING, runs.SUCCEEDED)
        self.release(rec)
        return f"run {record['run_id']}: index-updated published (promoted={event.data['promoted']})"

    def release(self, record: RunRecord) -> None:
        """The run ended: free the dataset for its follow-up run (uploads that arrived meanwhile). Launching it is
        left to the launching functions (job events, retrain) and the reconcile tick: the indexer, which also ends
        runs, has no right to submit Vertex jobs (no embedpipeJobLauncher role, no actAs on the job account)."""

        def fn(st):
            if st["active"] != record["run_id"]:
                return None
            st["active"] = None
            return st

        self.ledger.update_dataset(record["dataset"], fn)
