"""Orchestration: what each trigger does to the run ledger and which job it launches. Handlers call only this.

Every entry point is idempotent. A trigger is claimed once; a redelivery finds its claim and finishes what the first
delivery may have left undone. Job launches are keyed by ``<run_id>/<stage>/<attempt>``. Stage transitions are
compare-and-set from an expected state, so a duplicate or late event for a stage already passed does nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable

from embedpipe import topology
from embedpipe.config import TRAIN_OVERRIDES, Settings, check_overrides
from embedpipe.contracts import datasets
from embedpipe.contracts.events import (
    RUN_STAGE,
    Event,
    EventError,
    JobStateHint,
    ObjectChange,
    RetrainRequest,
    object_uri_key,
)
from embedpipe.contracts.records import PromotedEntry, RunRecord, run_stage_payload, without_absent
from embedpipe.control import incremental, intake
from embedpipe.gcp import storage
from embedpipe.gcp.retries import transient
from embedpipe.jobs import launchers
from embedpipe.jobs.spec import ALLOCATOR_ENV, SUCCEEDED, JobLauncher, JobSpec
from embedpipe.ledger import runs
from embedpipe.ledger.lifecycle import Lifecycle, embeddings_uri, publish_stalled
from embedpipe.ledger.runs import EMBEDDING, INDEXING, PENDING, PUBLISHING, TRAINING, Ledger

log = logging.getLogger(__name__)

STAGE_STATE = {"train": TRAINING, "embed": EMBEDDING}
LAUNCH_RETRY_WINDOW_S = 300.0  # a launch keeps being retried at least this long before its run fails
REPUBLISH_AFTER_S = 30.0  # an index request not recorded as sent this long after the move to INDEXING was lost


def checked_overrides(req: RetrainRequest, cloud: bool = False) -> dict:
    """Validate a retrain message before anything is stored: a bad one can never succeed, so it is acked, not
    retried (EventError). ``cloud``: the jobs run on Vertex AI, where only gs:// and bundled models load."""
    try:
        datasets.check_name(req.dataset)
    except ValueError as exc:
        raise EventError(f"retrain {req.key}: {exc}") from None
    if req.hp_tuning is not None:
        from embedpipe.jobs import hypertune

        try:
            hypertune.check_spec(req.hp_tuning)
        except ValueError as exc:
            raise EventError(f"retrain {req.key}: hp_tuning: {exc}") from None
    try:
        return check_overrides(req.overrides, cloud)
    except ValueError as exc:
        raise EventError(f"retrain {req.key}: {exc}") from None


def job_output_uri(run_dir: str, stage: str, attempt: int) -> str:
    """A job's ``base_output_directory``, one per attempt: a retry (a new Vertex job, or a tuning job whose trial
    ids restart at 1) must not resume the checkpoints or read the model another attempt left there."""
    return f"{run_dir}/{stage}/{attempt}"


class Pipeline(Lifecycle):
    """Every trigger's handling, on top of a run's endings (``Lifecycle``): what launches jobs lives here only."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger | None = None,
        launcher: JobLauncher | None = None,
        publish: Callable[[str, Event], None] | None = None,
        check_object: Callable[[str, str, int], intake.Verdict] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        read_uploads: bool = True,
        live_check: Callable[[dict], str | None] | None = None,
    ):
        """``read_uploads``: intake reads the uploaded objects and lists the data bucket (GCS); False where no bucket
        backs the ledger (an in-memory store): no intake checks, unless ``check_object`` is given. ``live_check``:
        why the promoted index cannot be the base of an incremental run (default: ask Milvus and GCS,
        ``live_missing``); a ledger on an in-memory store has neither, so its tests pass ``lambda promoted: None``."""
        super().__init__(settings, ledger, publish, clock)
        self.sleep = sleep
        self._launcher = launcher
        if check_object is None and read_uploads:
            check_object = functools.partial(intake.check_object, max_bytes=settings.max_object_bytes)
        self.check_object = check_object or (lambda bucket, name, generation: None)
        self.validate = self._check_listing if read_uploads else (lambda record: None)
        self.live_check = live_check or self.live_missing
        self._launch_locks: dict[str, threading.RLock] = {}
        self._launch_locks_guard = threading.Lock()

    def _launching(self, dataset: str) -> threading.RLock:
        """Held while a delivery in this instance waits for a dataset's due run or launches it. Deliveries run in
        threads of one instance (ticks every half second locally, each waiting up to ``launch_wait_s``): without it
        they all woke at the due time and launched the same run side by side (keyed and compare-and-set, so once, but
        each one sealing, listing and submitting again on a busy CPU). Another instance, or a later tick after this
        one died, still finishes a launch cut short (``_launch_dataset``)."""
        with self._launch_locks_guard:
            return self._launch_locks.setdefault(dataset, threading.RLock())

    @property
    def launcher(self) -> JobLauncher:
        if self._launcher is None:
            self._launcher = launchers.for_settings(self.settings)
        return self._launcher

    # ------------------------------------------------------------------ triggers
    def on_object_change(self, change: ObjectChange) -> str:
        if change.event_type != "OBJECT_FINALIZE":
            return f"ignored {change.event_type} for {change.name}"
        if change.bucket != self.settings.data_bucket:
            return f"ignored object in bucket {change.bucket} (data bucket is {self.settings.data_bucket})"
        if not change.name.startswith("datasets/"):
            return f"ignored {change.name}: not under datasets/"
        if intake.name_problem(change.name):  # belongs to no dataset we could name: quarantine, report, done
            verdict = self.check_object(change.bucket, change.name, change.generation)
            if isinstance(verdict, intake.Rejection):
                self._report_rejection(None, change.key, verdict)
            else:  # that version is gone already: nothing to quarantine, but a waiter must still hear why
                self.ledger.reject(change.key, f"{change.name}: {intake.name_problem(change.name)}")
            return f"rejected {change.name}: {intake.name_problem(change.name)}"
        found = datasets.dataset_of(change.name)
        if found is None:
            return f"ignored {change.name}: not a BEIR file (corpus, queries, qrels, pairs)"
        dataset, rel = found
        clash = self._name_clash(dataset)
        if clash:  # not quarantined: the file is fine, its folder name is not; renaming the folder fixes it
            uri = f"gs://{change.bucket}/{change.name}"
            self._report_rejection(None, change.key, intake.Rejection(uri, change.generation, None, clash))
            return f"rejected {change.name}: {clash}"
        info = {"object": change.name, "generation": change.generation, "part": datasets.classify(rel)}
        trigger = {"type": "upload", "dataset": dataset}
        run_id, fresh = self._claim(change.key, dataset, trigger, self.settings.debounce_s)
        if not fresh and self._counted(run_id, change.key):
            return f"{change.name}#{change.generation} -> run {run_id}"
        self.ledger.put_item(run_id, "arriving", change.key, info)  # the launch waits for this intake to end
        verdict = self.check_object(change.bucket, change.name, change.generation)
        # The quiet period runs from the end of this intake, not from the claim: uploads delivered behind this one
        # (a push subscription delivers a few at a time) are claimed only once it is done.
        self.ledger.extend_due(dataset, run_id, self.settings.debounce_s)
        if isinstance(verdict, intake.Rejection):
            self._mark_absent([verdict])  # before the report ends this intake: the launch waits for it
            self._report_rejection(run_id, change.key, verdict)
            return f"rejected {change.name}#{change.generation} (run {run_id}): {verdict.reason}"
        for _ in range(10):
            if isinstance(verdict, intake.Accepted) and verdict.notices:  # before the trigger: a redelivery redoes it
                self._record_notices(run_id, change.key, verdict)
            if self.ledger.add_trigger(run_id, change.key, info):
                return f"{change.name}#{change.generation} -> run {run_id}"
            run_id = self._move_late(change.key, run_id, dataset, trigger, self.settings.debounce_s)
        raise RuntimeError(f"{change.key}: every run it was given launched before it could join")

    def _counted(self, run_id: str, key: str) -> bool:
        """Whether a redelivered upload's trigger is already counted in its run, or its file already rejected (a
        sealed run without it: the move to the next run was cut short). Only a delivery that found its claim asks:
        one that created the claim is the first past it, so nothing of its trigger can be recorded yet."""
        record = self.ledger.get_run(run_id) or {}
        open_run = record.get("state") == PENDING and not record.get("sealed")
        return (
            key in record.get("triggers", [])
            or (open_run and self.ledger.has_item(run_id, "triggers", key))
            or self.ledger.has_item(run_id, "file_errors", key)
        )

    def _name_clash(self, dataset: str) -> str | None:
        """Datasets whose names differ only where Milvus names cannot (``a-b``, ``a_b``) would share an alias and
        collections: a new one that clashes with a known one is refused. Checked only for a dataset the ledger does
        not know yet (one read per upload)."""
        if self.ledger.has_dataset(dataset):
            return None
        from embedpipe.retrieval.vectorstore import collides  # names only: no Milvus client is created

        other = collides(dataset, self.ledger.list_datasets())
        return (
            f"dataset {dataset!r} would share its Milvus alias and collections with dataset {other!r}; use another name"
            if other
            else None
        )

    def _move_late(self, key: str, run_id: str, dataset: str, trigger: dict, due_in_s: float) -> str:
        """A trigger that arrived as its run launched (sealed) belongs to the next run: never to none."""
        new = self.ledger.move_claim(key, run_id, self.ledger.pending_run(dataset, trigger, due_in_s))
        log.info("%s arrived after run %s was launched: it joins run %s", key, run_id, new)
        return new

    def _record_notices(self, run_id: str, key: str, accepted: intake.Accepted) -> None:
        """Record what a file was accepted with (documents skipped for having neither title nor text) in its run:
        ``record["notices"][key] = {object, generation, count, items}``, the items capped at ``intake.MAX_NOTICES``.
        Keyed by trigger key, so a redelivery writes nothing new."""
        log.warning(
            "run %s: %s accepted with %d notice(s): %s%s",
            run_id,
            accepted.object,
            accepted.count,
            "; ".join(str(n) for n in accepted.notices[:5]),
            " ..." if accepted.count > 5 else "",
        )

        self.ledger.put_item(run_id, "notices", key, accepted.to_dict())

    def _report_rejection(self, run_id: str | None, key: str, rejection: intake.Rejection) -> None:
        """Record a bad file in its run (per-file errors; the run goes on with the valid files) and tell
        run-events subscribers which object, line and reason."""
        if run_id:
            self.ledger.put_item(run_id, "file_errors", key, rejection.to_dict())
        else:  # claimed by no run (a bad dataset name, a clash): `upload --wait` reads this instead of waiting
            self.ledger.reject(key, f"{rejection.object}: {rejection.reason}")
        self.publish(
            topology.RUN_EVENTS,
            Event(
                intake.FILE_REJECTED, {"run_id": run_id, **rejection.to_dict()}, id=f"{key}/rejected", subject=run_id
            ),
        )

    def on_retrain(self, req: RetrainRequest) -> str:
        try:
            overrides = checked_overrides(req, cloud=self.settings.mode == "gcp")
            clash = self._name_clash(req.dataset)
            if clash:
                raise EventError(f"retrain {req.key}: {clash}")
        except EventError as exc:  # acked, never retried: recorded so that `retrain --wait` says so at once
            self.ledger.reject(req.key, str(exc))
            raise
        # A refresh is a data change (a BigQuery table changed): it runs like an upload, incremental when an index
        # is live; a retrain always trains.
        trigger = {"type": "refresh" if req.refresh else "retrain", "dataset": req.dataset, "reason": req.reason}
        # refreshes come in bursts (one per table write from an audit-log trigger): they coalesce like uploads
        run_id, _ = self._claim(req.key, req.dataset, trigger, self.settings.debounce_s if req.refresh else 0.0)

        for _ in range(10):
            taken = True

            def fn(record):
                nonlocal taken
                taken = record["state"] == PENDING and not record.get("sealed")
                if req.key in record["triggers"] or not taken:
                    return None
                record["triggers"].append(req.key)
                record["overrides"].update(overrides)
                if not req.refresh:
                    record["force_full"] = True
                    record["trigger"] = trigger
                else:
                    record.setdefault("trigger", trigger)
                if req.hp_tuning:  # a tuning job: on Vertex, or the local job runner's trials
                    record["hp_tuning"] = req.hp_tuning
                if req.allow_shrink:  # confirmed: the new index may lack live documents (indexing's shrink guard)
                    record["allow_shrink"] = True
                return record

            record = self.ledger.update_run(run_id, fn)
            if taken or req.key in record["triggers"]:
                break
            run_id = self._move_late(req.key, run_id, req.dataset, trigger, 0.0)  # its run launched without it
        self.launch_due(req.dataset)
        return f"retrain {req.key} -> run {run_id}"

    def _claim(self, key: str, dataset: str, trigger: dict, due_in_s: float) -> tuple[str, bool]:
        """(the run the trigger belongs to, whether this delivery created its claim)."""
        claim = self.ledger.get_claim(key)
        if claim:
            log.info("duplicate delivery of %s (run %s): finishing its step only", key, claim["run_id"])
            return claim["run_id"], False
        run_id = self.ledger.pending_run(dataset, trigger, due_in_s)
        return self.ledger.claim(key, run_id)

    # ------------------------------------------------------------------ launching
    def launch_due(self, dataset: str | None = None) -> list[str]:
        """Promote due pending runs to active (one active run per dataset) and start them. Datasets are independent:
        one that cannot launch is logged (and its run failed after ``launch_max_attempts``), the others go on."""
        started = []
        for ds in [dataset] if dataset else self.ledger.list_datasets():
            try:
                started += self._launch_dataset(ds)
            except Exception:  # noqa: BLE001 - isolate datasets; the next tick retries
                log.exception("dataset %s: launching failed; the next tick retries", ds)
        return started

    def _launch_dataset(self, ds: str) -> list[str]:
        lock = self._launching(ds)
        if not lock.acquire(blocking=False):  # another delivery in this instance is launching it now
            return []
        try:
            return self._launch_held(ds)
        finally:
            lock.release()

    def _launch_held(self, ds: str) -> list[str]:
        pending = self.ledger.get_dataset(ds)["pending"]
        if pending and self.ledger.arriving(pending):  # an upload's intake is still running: launch at a later tick
            return []

        def fn(st):
            if st["pending"] and st["active"] is None and st["due_at"] <= self.clock():
                st["active"], st["pending"], st["pending_since"] = st["pending"], None, None
                return st
            return None

        state = self.ledger.update_dataset(ds, fn)
        record = self.ledger.get_run(state["active"]) if state["active"] else None
        if not record or record["state"] != PENDING:
            return []
        try:  # also finishes a launch that died half-way
            self.start_training(record)
        except Exception as exc:  # noqa: BLE001 - counted; a run that can never launch must not hold the dataset
            self._launch_failed(record["run_id"], exc)
            return []
        return [record["run_id"]]

    def _launch_failed(self, run_id: str, exc: Exception) -> None:
        cause = f"{type(exc).__name__}: {exc}"[-1000:]
        record = self.ledger.update_run(
            run_id,
            lambda r: (
                {**r, "launch_errors": [*r.get("launch_errors", []), {"at": runs.iso(self.clock()), "error": cause}]}
                if r["state"] == PENDING
                else None
            ),
        )
        errors = record.get("launch_errors", [])
        tries = len(errors)
        log.error("run %s: launch attempt %d failed: %s", run_id, tries, cause, exc_info=exc)
        # Attempts at local ticks come every half second: a blip must also have lasted LAUNCH_RETRY_WINDOW_S.
        lasted = self.clock() - runs.parse_iso(errors[0]["at"]) if errors else 0.0
        if tries >= self.settings.launch_max_attempts and lasted >= LAUNCH_RETRY_WINDOW_S:
            self.fail(run_id, "launch", f"could not launch after {tries} attempts; last: {cause}")

    @staticmethod
    def _as_of(record: RunRecord) -> list[str]:
        """BigQuery parts are read as of the run's seal: every job, replica and retry of the run sees one table."""
        return [f"--as-of={record['sealed_at']}"] if record.get("sealed_at") else []

    def _job_env(self) -> dict[str, str]:
        return {
            "EMBEDPIPE_DATA_BUCKET": self.settings.data_bucket,
            "EMBEDPIPE_ARTIFACTS_BUCKET": self.settings.artifacts_bucket,
            "EMBEDPIPE_PROJECT": self.settings.project,  # BigQuery read sessions and query jobs are billed here
        }

    def train_spec(self, record: RunRecord, attempt: int) -> JobSpec:
        s, o = self.settings, record.get("overrides") or {}
        knobs = dataclasses.asdict(s.train_knobs)
        run_id = record["run_id"]
        params = {k: o.get(k, knobs[k]) for k in TRAIN_OVERRIDES}
        args = [f"--{k.replace('_', '-')}={v}" for k, v in params.items()]
        args += [f"--dataset={record['dataset']}", f"--run-id={run_id}", *self._as_of(record)]
        return self._job_spec(run_id, "train", attempt, args, self._job_env(), hp_tuning=record.get("hp_tuning"))

    def embed_spec(self, record: RunRecord, attempt: int) -> JobSpec:
        s, run_id = self.settings, record["run_id"]
        args = [
            f"--dataset={record['dataset']}",
            f"--run-id={run_id}",
            f"--model-uri={record['model']['uri']}",
            # only when set: 0 (per device) is the embedder's own default, and an image older than that default
            # would read 0 as one row per batch
            *([f"--batch-tokens={s.embed_batch_tokens}"] if s.embed_batch_tokens else []),
            f"--output-dir={embeddings_uri(self.ledger.run_dir(run_id), attempt)}",
            f"--job-key={run_id}/embed/{attempt}",
            f"--max-inplace-share={s.max_inplace_share}",
            *self._as_of(record),
        ]
        if record.get("kind") == incremental.INCREMENTAL:  # the promoted model, only new/changed documents
            live = record["live"]
            # a run recorded before the tables existed snapshotted the live index into its own folder
            args.append(f"--live-hashes={live.get('hashes') or self.ledger.run_dir(run_id) + '/live-hashes.parquet'}")
            if record.get("skip_deletes"):  # a corpus file was left out: its documents are absent, not deleted
                args.append("--keep-absent")
            if live.get("rebuild"):
                args.append("--rebuild")
        else:
            previous = self.ledger.get_dataset(record["dataset"]).get("promoted")
            if previous:
                args.append(f"--previous-model-uri={previous['model_uri']}")
        return self._job_spec(run_id, "embed", attempt, args, {**self._job_env(), **ALLOCATOR_ENV})

    def _job_spec(self, run_id: str, stage: str, attempt: int, args: list[str], env: dict, **extra) -> JobSpec:
        """One attempt of ``stage`` (train | embed): its key, output folder and labels, and the container, image and
        machine the settings give that stage; ``extra``: the rest of the JobSpec (``hp_tuning``)."""
        s = self.settings
        container, image, machine, accelerator, replicas = {
            "train": ("trainer", s.trainer_image, s.train_machine_type, s.train_accelerator, s.train_replicas),
            "embed": ("embedder", s.embedder_image, s.embed_machine_type, s.embed_accelerator, s.embed_replicas),
        }[stage]
        return JobSpec(
            key=f"{run_id}/{stage}/{attempt}",
            container=container,
            args=args,
            base_output_dir=job_output_uri(self.ledger.run_dir(run_id), stage, attempt),
            env=env,
            labels={"run_id": run_id, "stage": stage},
            image=image,
            machine_type=machine,
            accelerator_type=accelerator,
            accelerator_count=1 if accelerator else 0,
            replica_count=replicas,
            **extra,
        )

    def _submit(self, record: RunRecord, stage: str, attempt: int, from_state: str) -> None:
        spec = self.train_spec(record, attempt) if stage == "train" else self.embed_spec(record, attempt)
        name = transient(self.launcher.submit)(spec)  # keyed, so a retried submit is the same job
        job = {"name": name, "attempt": attempt, "submitted_at": runs.iso(self.clock()), "output": spec.base_output_dir}

        def fn(rec):
            if rec["state"] != from_state:
                return None
            rec["jobs"][stage] = job
            return rec

        if from_state == STAGE_STATE[stage]:  # a retry within the stage
            self.ledger.update_run(record["run_id"], fn)
        else:
            self.ledger.advance(record["run_id"], from_state, STAGE_STATE[stage], jobs={**record["jobs"], stage: job})
        self._stage_event(record, STAGE_STATE[stage], job=name)

    def start_training(self, record: RunRecord) -> None:
        """Launch a PENDING run. The kind is decided here once (``incremental.kind_for``) and stored: a full run
        trains first; an incremental one skips TRAINING and embeds with the promoted model (DESIGN.md §3.2). The run
        is sealed first: the kind is decided on exactly the triggers it holds; later ones join the next run."""
        record = self.ledger.seal(record["run_id"])
        problem = self.validate(record)
        if problem:
            self.fail(record["run_id"], "intake", problem)
            return
        self._absent_at_launch(record)
        record = self.ledger.get_run(record["run_id"]) or record
        kind = record.get("kind")
        promoted = self.ledger.get_dataset(record["dataset"]).get("promoted")
        if kind is None:
            kind, why = incremental.kind_for(record, promoted)
            log.info("run %s: %s run (%s)", record["run_id"], kind, why)
        if kind == incremental.INCREMENTAL and (missing := self.live_check(promoted)):
            log.warning("run %s: %s: a full run", record["run_id"], missing)
            kind = incremental.FULL
        if kind == incremental.INCREMENTAL:
            # the promoted entry's id -> hash table is the diff's base: nothing here reads the documents
            live = {"collection": promoted["collection"], "rows": promoted.get("rows"), "hashes": promoted["hashes"]}
            if promoted.get("dirty"):  # an in-place update edited it and never promoted: its contents are unknown
                log.warning("run %s: run %s left %s part-updated: rebuilt", record["run_id"], promoted["dirty"], live)
                live["rebuild"] = True
            from embedpipe.retrieval.vectorstore import REPRESENTATION  # names only: no Milvus client is created

            if promoted.get("representation") != REPRESENTATION:  # edited in place, old and new texts would mix
                log.warning(
                    "run %s: the live index was built with representation %s, this version makes %s: rebuilt",
                    record["run_id"],
                    promoted.get("representation", "(unrecorded)"),
                    REPRESENTATION,
                )
                live["rebuild"] = True
            fields = {"kind": kind, "model": {"uri": promoted["model_uri"]}, "live": live}
            self.ledger.update_run(record["run_id"], lambda r: {**r, **fields} if r["state"] == PENDING else None)
            self._submit({**record, **fields}, "embed", 1, PENDING)
            return
        kind = incremental.FULL
        if record.get("kind") != kind:
            self.ledger.update_run(record["run_id"], lambda r: {**r, "kind": kind} if r["state"] == PENDING else None)
        self._submit({**record, "kind": kind}, "train", 1, PENDING)

    def _check_listing(self, record: RunRecord) -> str | None:
        """Launch-time intake, O(files): the listing must hold a corpus file; files over the size cap are
        quarantined. The checks that need the documents run in the jobs (``intake.load_checked``) and come back
        through ``_apply_intake`` when each job ends."""
        if record.get("state") != PENDING:
            return None
        s = self.settings
        rejections, problem = intake.check_listing(s.data_bucket, record["dataset"], max_bytes=s.max_object_bytes)
        return self._settle_intake(record["run_id"], rejections, problem)

    def _apply_intake(self, record: RunRecord, report_uri: str) -> str | None:
        """What a job's load left out (its ``intake.json``): quarantine and report each file; a left-out corpus
        file turns deletions off for the run. Returns why the run cannot go on (nothing usable), else None.
        Idempotent: a file already moved is not moved again, its error and event are keyed by object#generation."""
        rejections, problem = intake.parse_report(self.ledger.store.read_json_gen(report_uri)[0])
        bucket = self.settings.data_bucket
        moved = []
        for r in rejections:
            name = r.object[len(f"gs://{bucket}/") :]
            if not r.object.startswith(f"gs://{bucket}/datasets/"):
                continue  # not ours to move: a report names only the data bucket's dataset files
            if intake.is_table(r):  # a BigQuery part: reported, not moved
                moved.append(r)
                continue
            where = intake.quarantine(bucket, name, r.generation)
            moved.append(intake.Rejection(r.object, r.generation, r.line, r.reason, where))
        return self._settle_intake(record["run_id"], moved, problem)

    def _settle_intake(self, run_id: str, rejections: list, problem: str | None) -> str | None:
        self._mark_absent(rejections, run_id)
        for r in rejections:
            key = object_uri_key(r.object, r.generation)
            # a bad table stays where it is and can fail many runs: its report is per run (a file is moved at once)
            self._report_rejection(run_id, f"{key}@{run_id}" if intake.is_table(r) else key, r)
        if any(intake.is_corpus(r) for r in rejections):  # its documents are absent, not deleted
            self.ledger.update_run(run_id, lambda r: {**r, "skip_deletes": True} if not r.get("skip_deletes") else None)
        if problem:
            errors = self.ledger.merge_items(run_id).get("file_errors") or {}
            rejected = "; ".join(f"{e['object']}:{e['line'] or ''} {e['reason']}" for e in errors.values())
            return problem + (f" (rejected: {rejected})" if rejected else "")
        return None

    def _mark_absent(self, rejections: list, run_id: str | None = None) -> None:
        """Corpus files quarantined (moved out of the dataset) become the dataset's ``absent_parts``: their
        documents are absent, never deleted, in every run until a file arrives at that name again, the user deletes
        the quarantined copy, or a retrain that said ``allow_shrink`` is promoted (``_absent_at_launch``,
        ``indexing._promote``). ``run_id``: a job's rejections, whose run holds them as absent too. Idempotent."""
        prefix = f"gs://{self.settings.data_bucket}/"
        by_dataset: dict[str, dict] = {}
        for r in rejections:
            if not intake.is_corpus(r) or intake.is_table(r) or not r.object.startswith(prefix):
                continue  # a table part is re-read (and re-judged) by every run: not absent for long
            name = r.object[len(prefix) :]
            found = datasets.dataset_of(name)
            if found:
                entry = {"generation": r.generation, "reason": r.reason, "quarantined_to": r.quarantined_to}
                by_dataset.setdefault(found[0], {})[name] = entry
        for dataset, parts in by_dataset.items():

            def fn(st, parts=parts):
                have = st.get("absent_parts") or {}
                if all(have.get(n, {}).get("generation") == v["generation"] for n, v in parts.items()):
                    return None
                return {**st, "absent_parts": {**have, **parts}}

            self.ledger.update_dataset(dataset, fn)
            log.warning("dataset %s: corpus part(s) %s quarantined: absent, not deleted", dataset, sorted(parts))
            if run_id:
                names = set(parts)

                def mine(r, names=names):
                    have = set(r.get("absent_parts") or [])
                    return None if names <= have else {**r, "absent_parts": sorted(have | names)}

                self.ledger.update_run(run_id, mine)

    def _absent_at_launch(self, record: RunRecord) -> list[str]:
        """The dataset's absent corpus parts as this run launches. A part is back when a file holds its name again
        (whatever order the uploads' handlers ran in), and let go when the user deleted its quarantined copy. The
        run keeps the rest as ``absent_parts``, with ``skip_deletes``: nothing of theirs is deleted in place, and a
        new collection that lacks their documents is refused (indexing.shrink_refusal); a retrain with
        ``allow_shrink`` keeps them as ``released_parts`` instead, cleared from the dataset when it is promoted."""
        parts = self.ledger.get_dataset(record["dataset"]).get("absent_parts") or {}
        if not parts:
            return []
        bucket = self.settings.data_bucket

        def settled(name: str, entry: dict) -> bool:
            copy = entry.get("quarantined_to")
            return storage.exists(f"gs://{bucket}/{name}") or bool(copy and not storage.exists(copy))

        gone = {n for n, v in parts.items() if settled(n, v)}
        if gone:
            self.ledger.update_dataset(record["dataset"], lambda st: without_absent(st, gone))
        still = sorted(set(parts) - gone)
        if still:
            if record.get("allow_shrink"):
                fields: dict = {"released_parts": still}
            else:
                fields = {"skip_deletes": True, "absent_parts": still}
            self.ledger.update_run(record["run_id"], lambda r: {**r, **fields} if r["state"] == PENDING else None)
            log.warning("run %s: corpus part(s) %s absent (%s)", record["run_id"], still, ", ".join(fields))
        return still

    def live_missing(self, promoted: PromotedEntry) -> str | None:
        """Why an incremental run cannot use the promoted index (its collection or its id -> hash table is gone),
        else None. Two calls, whatever the corpus size."""
        from embedpipe.retrieval import vectorstore

        client = vectorstore.connect(self.settings.milvus_uri, self.settings.milvus_token)
        if not client.has_collection(promoted["collection"]):
            return f"promoted collection {promoted['collection']} is missing from Milvus"
        if not storage.exists(promoted["hashes"]):
            return f"the promoted index's id -> hash table {promoted['hashes']} is missing"
        return None

    def _stage_event(self, record: RunRecord, state: str, job: str | None = None) -> None:
        data = run_stage_payload(run_id=record["run_id"], dataset=record["dataset"], state=state, job=job)
        self.publish(
            topology.RUN_EVENTS,
            Event(RUN_STAGE, dict(data), id=f"{record['run_id']}/{state}", subject=record["run_id"]),
        )

    # ------------------------------------------------------------------ job completion
    def on_job_event(self, hint: JobStateHint) -> str:
        name = self.launcher.name_for(hint.job_id)
        try:
            status = transient(self.launcher.get)(name)
        except (FileNotFoundError, KeyError, LookupError):
            return f"unknown job {name}: ignored"
        return self.on_job_status(status)

    def on_job_status(self, status) -> str:
        if not status.done:
            return f"job {status.name} is {status.state}: nothing to do yet"
        run_id, stage = status.labels.get("run_id"), status.labels.get("stage")
        record = self.ledger.get_run(run_id) if run_id else None
        if record is None or stage not in STAGE_STATE:
            return f"job {status.name} has no run (labels {status.labels}): ignored"
        job = record["jobs"].get(stage) or {}
        if (
            stage == "embed"
            and record["state"] == INDEXING
            and job.get("name") == status.name
            and not record.get("index_requested_at")
            and self.clock() - (record["stage_times"].get(INDEXING, {}).get("start") or 0) > REPUBLISH_AFTER_S
        ):  # the first delivery moved the run on and died before the request was out (not: it is publishing now)
            self.request_index(record)
            return f"run {run_id}: index requested again (the first request was never published)"
        if record["state"] != STAGE_STATE[stage] or job.get("name") != status.name:
            return f"late or duplicate event for {stage} job {status.name} of run {run_id} ({record['state']})"
        if status.state == SUCCEEDED:
            if stage == "train":
                # the best HP trial's; a custom job's AIP_MODEL_DIR under the output directory it was submitted with
                # (recorded: a job launched before the per-attempt layout wrote to the run folder itself)
                out = job.get("output") or self.ledger.run_dir(run_id)
                model = {"uri": status.model_dir or f"{out.rstrip('/')}/model/"}
                report = f"{model['uri'].rstrip('/').rsplit('/', 1)[0]}/{intake.REPORT_FILE}"  # beside metrics.json
                if problem := self._apply_intake(record, report):
                    return self._fail_and_follow(record, "intake", problem)
                done = {"model": model, **({"tuning": status.tuning} if status.tuning else {})}  # every trial
                record.update(done)
                self.ledger.update_run(run_id, lambda r: {**r, **done} if r["state"] == TRAINING else None)
                self._submit(record, "embed", 1, TRAINING)
                return f"run {run_id}: training succeeded, embedding launched"
            report = f"{embeddings_uri(self.ledger.run_dir(run_id), job.get('attempt', 1))}/{intake.REPORT_FILE}"
            if problem := self._apply_intake(record, report):
                return self._fail_and_follow(record, "intake", problem)
            rec, moved = self.ledger.advance(run_id, EMBEDDING, INDEXING)
            if moved or rec["state"] == INDEXING:
                self.request_index(rec)
            return f"run {run_id}: embedding succeeded, index requested"
        if stage == "train" and (problem := self._trial_intake(record, job)):
            return self._fail_and_follow(record, "intake", problem)
        attempt = job.get("attempt", 1)
        if attempt < self.settings.max_job_attempts:
            log.warning(
                "run %s: %s job %s ended %s (%s); retrying",
                run_id,
                stage,
                status.name,
                status.state,
                status.error[-300:],
            )
            self._submit(record, stage, attempt + 1, STAGE_STATE[stage])
            return f"run {run_id}: {stage} job {status.state}, retry {attempt + 1} launched"
        return self._fail_and_follow(
            record, stage, f"{stage} job {status.name} ended {status.state}: {status.error[-1000:]}"
        )

    def _trial_intake(self, record: RunRecord, job: dict) -> str | None:
        """A tuning job whose trials found nothing usable fails (no trial reports a metric): their ``intake.json``
        files, one per trial folder, say so. A retry could not change it: the run fails in intake."""
        out = (job.get("output") or "").rstrip("/")
        if not out:
            return None
        for uri, _ in self.ledger.store.list_uris(f"{out}/"):
            if uri.endswith(f"/{intake.REPORT_FILE}") and (problem := self._apply_intake(record, uri)):
                return problem
        return None

    def _fail_and_follow(self, record: RunRecord, stage: str, cause: str) -> str:
        """End the run as failed where no retry can help, then launch the dataset's follow-up run: the dataset is
        free, and a job event is a launching function."""
        self.fail(record["run_id"], stage, cause)
        self.launch_due(record["dataset"])
        return f"run {record['run_id']}: FAILED in {stage}"

    def request_index(self, record: RunRecord, part: int = 0) -> None:
        super().request_index(record, part)
        self._stage_event(record, INDEXING)

    # ------------------------------------------------------------------ reconcile
    def launch_soon(self) -> list[str]:
        """Launch due runs, and wait for those due within ``launch_wait_s`` to launch them on time: a run starts when
        its quiet period ends, not at the tick after. The waiting is done here, in the tick's handler, because upload
        handlers that waited would hold back the delivery of the very uploads that extend the quiet period."""
        started = self.launch_due()
        if self.settings.launch_wait_s <= 0:
            return started
        elsewhere: set[str] = set()  # datasets another delivery in this instance waits for (or cannot be read)
        while True:
            due = []
            for ds in self.ledger.list_datasets():
                if ds in elsewhere:
                    continue
                try:
                    st = self.ledger.get_dataset(ds)
                    soon = (
                        st["pending"]
                        and not st["active"]
                        and st["due_at"] - self.clock() <= self.settings.launch_wait_s
                    )
                except Exception:  # noqa: BLE001 - isolate datasets: one unreadable state must not stop the tick
                    log.exception("dataset %s: its state cannot be read; the other datasets go on", ds)
                    elsewhere.add(ds)
                    continue
                if soon:
                    due.append((st["due_at"], ds))
            if not due:
                return started
            due_at, dataset = min(due)
            lock = self._launching(dataset)
            if not lock.acquire(blocking=False):
                elsewhere.add(dataset)
                continue
            try:
                if due_at > self.clock():
                    self.sleep(due_at - self.clock())
                launched = self.launch_due(dataset)
            finally:
                lock.release()
            if not launched and self.ledger.get_dataset(dataset)["due_at"] <= due_at:
                return started  # someone else launched it, or it cannot start: leave it to the next tick
            started += launched

    def reconcile(self) -> list[str]:
        """The scheduled safety net: launch due runs (on time, see ``launch_soon``), advance runs whose job ended
        without an event, re-request an index whose request was lost, and fail stages past their deadline. Each
        dataset is handled on its own: one that errors is logged and retried at the next tick."""
        notes = [f"launched {r}" for r in self.launch_soon()]
        for ds in self.ledger.list_datasets():
            try:
                done = self._reconcile_dataset(ds)
                if done:  # something ended or moved: the follow-up run may launch now rather than at the next tick
                    done += [f"launched {r}" for r in self.launch_due(ds)]
                notes += done
            except Exception as exc:  # noqa: BLE001 - isolate datasets
                log.exception("reconcile %s failed; the next tick retries", ds)
                notes.append(f"error in {ds}: {type(exc).__name__}: {exc}")
        return notes

    def _reconcile_dataset(self, ds: str) -> list[str]:
        active = self.ledger.get_dataset(ds)["active"]
        record = self.ledger.get_run(active) if active else None
        if record is None:
            return []
        run_id, state = record["run_id"], record["state"]
        if state in runs.TERMINAL:
            self.release(record)
            return [f"released {run_id}"]
        if state == PUBLISHING:
            return [self.finish(record)] if publish_stalled(record, self.clock()) else []
        in_stage = self.clock() - ((record.get("stage_times") or {}).get(state, {}).get("start") or self.clock())
        if state == INDEXING:
            return self._reconcile_indexing(record, in_stage)
        stage = {TRAINING: "train", EMBEDDING: "embed"}.get(state)
        job = record["jobs"].get(stage) if stage else None
        if not job:
            return []
        status = transient(self.launcher.get)(job["name"])
        if status.done:
            return [self.on_job_status(status)]
        deadline = self.settings.train_deadline_s if stage == "train" else self.settings.embed_deadline_s
        in_attempt = self.clock() - runs.parse_iso(job["submitted_at"]) if job.get("submitted_at") else in_stage
        if in_attempt > deadline:  # per attempt: a retry started late in the stage gets its full time
            transient(self.launcher.cancel)(job["name"])
            self.fail(
                run_id,
                stage,
                f"{stage} job {job['name']} still {status.state} after {in_attempt:.0f}s "
                f"(deadline {deadline:.0f}s, EMBEDPIPE_{stage.upper()}_DEADLINE_S): cancelled",
            )
            return [f"run {run_id}: {stage} past its deadline, cancelled and failed"]
        return []

    def _reconcile_indexing(self, record: RunRecord, in_stage: float) -> list[str]:
        """An index request can be lost (publish failed after the run moved on) or dead-lettered (the indexer failed
        5 times): re-request it every ``index_retry_s``, and fail the run past ``index_deadline_s``."""
        s, run_id = self.settings, record["run_id"]
        # A recorded bulk import may run for hours past the index deadline, but not for ever: a restored or
        # unreachable Milvus, or an import that never ends, would hold the dataset in INDEXING for good.
        job = (record.get("bulk_import") or {}).get("job_id")
        deadline, knob = (
            (s.bulk_import_deadline_s, "EMBEDPIPE_BULK_IMPORT_DEADLINE_S")
            if job
            else (s.index_deadline_s, "EMBEDPIPE_INDEX_DEADLINE_S")
        )
        # a load that goes on over several deliveries (index.indexing.Progress) is timed from its last progress
        if (moved := runs.last_load_progress(record)) is not None:
            in_stage = min(in_stage, self.clock() - moved)
        if in_stage > deadline:
            what = f"bulk import {job} unfinished" if job else "no index result"
            self.fail(
                run_id,
                "index",
                f"{what} {in_stage:.0f}s after the request (deadline {deadline:.0f}s, {knob}); see the index-requests "
                "dead letters",
            )
            return [f"run {run_id}: indexing past its deadline, failed"]
        requested = record.get("index_requested_at")
        age = self.clock() - runs.parse_iso(requested) if requested else in_stage
        # never published: the run moved to INDEXING and the publish after it failed (a minute covers a slow one)
        if age > s.index_retry_s or (not requested and in_stage > max(REPUBLISH_AFTER_S, min(60.0, s.index_retry_s))):
            self.request_index(record)
            return [f"run {run_id}: index requested again ({'last ' + requested if requested else 'never published'})"]
        return []
