"""The deployment topology, defined once: topics, the push-fed components and their subscriptions.

``embedpipe up`` applies it to the Pub/Sub emulator and starts each component as a functions-framework process;
a GCP deploy applies the same list to a project (see ``deploy/``).
"""

from __future__ import annotations

from dataclasses import dataclass

DATA_EVENTS = "data-events"
RETRAIN_REQUESTS = "retrain-requests"
JOB_EVENTS = "job-events"
INDEX_REQUESTS = "index-requests"
INDEX_UPDATED = "index-updated"
RUN_EVENTS = "run-events"
RECONCILE_TICKS = "reconcile-ticks"

TOPICS = (DATA_EVENTS, RETRAIN_REQUESTS, JOB_EVENTS, INDEX_REQUESTS, INDEX_UPDATED, RUN_EVENTS, RECONCILE_TICKS)


@dataclass(frozen=True)
class Component:
    """One functions-framework target: a Cloud Function or a Cloud Run service."""

    name: str
    path: str  # relative to the repo root
    target: str
    signature: str  # cloudevent | http
    topic: str | None  # push-fed from this topic, or None for plain HTTP
    ack_deadline_s: int = 60
    max_delivery_attempts: int = 5

    @property
    def subscription(self) -> str:
        return f"{self.name}-push"

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.name}-dlq"


COMPONENTS = (
    Component("on-data-uploaded", "functions/on_data_uploaded/main.py", "on_data_uploaded", "cloudevent", DATA_EVENTS),
    Component(
        "on-retrain-requested",
        "functions/on_retrain_requested/main.py",
        "on_retrain_requested",
        "cloudevent",
        RETRAIN_REQUESTS,
    ),
    Component("on-job-event", "functions/on_job_event/main.py", "on_job_event", "cloudevent", JOB_EVENTS),
    Component("reconcile", "functions/reconcile/main.py", "reconcile", "cloudevent", RECONCILE_TICKS),
    # Long upserts and evaluation: a Cloud Run service, so the push ack deadline is the maximum.
    Component("indexer", "services/indexer/main.py", "index", "cloudevent", INDEX_REQUESTS, ack_deadline_s=600),
    # Query API; index-updated is pushed to it so it reloads the promoted model (in the background).
    Component("search", "services/search/main.py", "search", "http", INDEX_UPDATED),
)

# Retry policy for push subscriptions: without one the emulator redelivers a failing message every second forever.
RETRY_MIN_BACKOFF_S = 1
RETRY_MAX_BACKOFF_S = 30


def dead_letter_topics() -> list[str]:
    return [c.dead_letter_topic for c in COMPONENTS if c.topic]


def event_log_topics() -> list[str]:
    """Topics ``embedpipe events`` shows: results, run changes and dead letters. Each gets a pull subscription
    ``<topic>-log`` (locally and in the cloud): Pub/Sub keeps nothing for a topic without subscriptions, so without
    one a dead-lettered message would be dropped."""
    return [INDEX_UPDATED, RUN_EVENTS, *dead_letter_topics()]


def log_subscription(topic: str) -> str:
    return f"{topic}-log"


# How long the log subscriptions keep what nobody pulled (Pub/Sub's maximum is 7 days).
LOG_RETENTION = "7d"


def component(name: str) -> Component:
    for c in COMPONENTS:
        if c.name == name:
            return c
    raise KeyError(name)


# ---------------------------------------------------------------- beyond Pub/Sub: the rest of the topology
# Each entry below is applied by the GCP deploy (``embedpipe.deploy``) and has a named local stand-in in
# ``embedpipe up`` (``stack.py``), so the two never drift apart.

# Settings fields naming the buckets (local: fake-gcs-server buckets).
BUCKETS = ("data_bucket", "artifacts_bucket")
# GCS -> Pub/Sub notification on the data bucket (local: fake-gcs-server's -event.* flags).
DATA_NOTIFICATION_TOPIC = DATA_EVENTS
DATA_NOTIFICATION_EVENTS = ("OBJECT_FINALIZE",)
# Cloud Logging sink that turns Vertex AI job log entries into job-events messages (local: the job runner publishes
# the same LogEntry). It selects the entries Vertex AI writes itself about a job (task_name "service": "Job is
# running.", "Job completed successfully.", "Job failed."...), not the container's own output. Every entry is only a
# hint: on-job-event asks the Vertex API for the job's state, and reconcile asks it every minute for each active
# job, which is the guarantee (a silent or mis-filtered sink delays a run by at most a tick). Google documents no
# job-state label, so the filter does not rely on one.
JOB_LOG_SINK = "embedpipe-job-events"
JOB_LOG_FILTER = 'resource.type="ml_job" AND resource.labels.task_name="service"'
# Cloud Scheduler job publishing to reconcile-ticks (local: the ticker, every EMBEDPIPE_TICK_S seconds).
RECONCILE_SCHEDULER_JOB = "embedpipe-reconcile-tick"
# Every minute (Cloud Scheduler's finest): uploads launch when their quiet period ends at a tick, so this bounds the
# cloud's upload-to-training latency; a tick costs a few ledger reads.
RECONCILE_SCHEDULE = "* * * * *"
# Vertex AI custom containers built from containers/<name>/Dockerfile (local: task.py run as a process).
IMAGES = ("trainer", "embedder")

# Least-privilege access per identity. Identities: each component (its own service account), "job" (what Vertex AI
# jobs run as) and "push" (what push subscriptions sign their OIDC tokens as). Targets: "project", "bucket:<field>"
# ("bucket:<field>/<prefix>": objects under that prefix only, an IAM condition), "topic:<topic>", "sa:<identity>".
# Why each grant exists is in deploy/README.md.
_LEDGER = ("bucket:artifacts_bucket", "roles/storage.objectUser")  # run ledger, claims, run records
_INTAKE = ("bucket:data_bucket", "roles/storage.objectUser")  # reads uploads, moves bad ones under quarantine/
_RUN_EVENTS = ("topic:" + RUN_EVENTS, "roles/pubsub.publisher")  # stage changes, run.failed, file.rejected
# Vertex AI has no per-job IAM: launching is a project-wide grant, so instead of roles/aiplatform.user (hundreds of
# permissions: models, endpoints, datasets...) a custom role with exactly what ``embedpipe.jobs.vertex`` calls: create,
# get, list (the idempotency lookup by label) and cancel, for custom jobs and tuning jobs.
JOB_LAUNCHER_ROLE = "embedpipeJobLauncher"
JOB_LAUNCHER_PERMISSIONS = tuple(
    f"aiplatform.{kind}.{verb}"
    for kind in ("customJobs", "hyperparameterTuningJobs")
    for verb in ("create", "get", "list", "cancel")
)
# The Model Registry (embedpipe.index.registry): the indexer uploads each promoted model as a version of its dataset's
# Model and moves the `promoted` alias; `embedpipe rollback` moves it back (run by an operator: grant them the same
# role). Exactly those calls again, not roles/aiplatform.user: upload, list (the run-id lookup that keeps a
# registration idempotent, the alias holders), get (polling the upload's long-running operation), update
# (mergeVersionAliases) and delete (the newer of two versions a raced upload left).
MODEL_REGISTRAR_ROLE = "embedpipeModelRegistrar"
MODEL_REGISTRAR_PERMISSIONS = tuple(
    f"aiplatform.models.{verb}" for verb in ("upload", "get", "list", "update", "delete")
)
# Custom roles the deploy creates: id -> (title, what it allows, permissions).
CUSTOM_ROLES = {
    JOB_LAUNCHER_ROLE: (
        "embedpipe job launcher",
        "submit, read, list and cancel Vertex AI custom and tuning jobs",
        JOB_LAUNCHER_PERMISSIONS,
    ),
    MODEL_REGISTRAR_ROLE: (
        "embedpipe model registrar",
        "upload promoted models as Model Registry versions and move their alias",
        MODEL_REGISTRAR_PERMISSIONS,
    ),
}
# Whatever may launch a run: launch-time intake, submitting Vertex jobs as the job identity.
_LAUNCHER = (
    _LEDGER,
    _INTAKE,
    ("project", f"custom:{JOB_LAUNCHER_ROLE}"),
    ("sa:job", "roles/iam.serviceAccountUser"),
    _RUN_EVENTS,
)
ACCESS: dict[str, tuple[tuple[str, str], ...]] = {
    "on-data-uploaded": (_LEDGER, _INTAKE, _RUN_EVENTS),
    "on-retrain-requested": _LAUNCHER,
    "on-job-event": (*_LAUNCHER, ("topic:" + INDEX_REQUESTS, "roles/pubsub.publisher")),
    # + index-updated: it publishes the stored event of a run whose indexer died between promoting and publishing
    "reconcile": (
        *_LAUNCHER,
        ("topic:" + INDEX_REQUESTS, "roles/pubsub.publisher"),
        ("topic:" + INDEX_UPDATED, "roles/pubsub.publisher"),
    ),
    "indexer": (
        ("bucket:artifacts_bucket", "roles/storage.objectUser"),
        ("bucket:data_bucket", "roles/storage.objectViewer"),
        ("topic:" + INDEX_UPDATED, "roles/pubsub.publisher"),
        # a delivery that spends its time budget hands the rest of a load to a new index request (index.indexing)
        ("topic:" + INDEX_REQUESTS, "roles/pubsub.publisher"),
        ("topic:" + RUN_EVENTS, "roles/pubsub.publisher"),
        ("project", f"custom:{MODEL_REGISTRAR_ROLE}"),
    ),
    "search": (("bucket:artifacts_bucket", "roles/storage.objectViewer"),),
    # Jobs read both buckets (listing is checked on the bucket, so reads stay bucket-wide) and write only under runs/:
    # ledger/ (run records, dataset states, claims) is the control plane, which a job must not be able to rewrite.
    "job": (
        ("bucket:data_bucket", "roles/storage.objectViewer"),
        ("bucket:artifacts_bucket", "roles/storage.objectViewer"),
        ("bucket:artifacts_bucket/runs/", "roles/storage.objectUser"),
    ),  # + BigQuery roles when EMBEDPIPE_BIGQUERY_DATASETS names datasets (deploy.plan.BIGQUERY_JOB_ROLES)
    "push": (),  # gets roles/run.invoker on each push-fed component (granted with the component)
    # What Cloud Build runs as for our image builds and the functions' and services' source builds: new projects
    # (since mid-2024) give the default build account none of these. Build logs, images (ours, gcf-artifacts,
    # cloud-run-source-deploy), and the uploaded sources, which sit in buckets gcloud creates on first deploy (so
    # the grant is project-wide, narrowed by an IAM condition to those buckets' names: BUILD_SOURCE_BUCKETS).
    "build": (
        ("project", "roles/logging.logWriter"),
        ("project", "roles/artifactregistry.writer"),
        ("build-sources", "roles/storage.objectAdmin"),
    ),
}
# Name prefixes of the buckets build sources are uploaded to: ``gcloud builds submit`` (<project>_cloudbuild),
# functions gen2 (gcf-v2-sources-<number>-<region>) and ``gcloud run deploy --source`` (run-sources-<project>-<region>).
BUILD_SOURCE_BUCKETS = ("{project}_cloudbuild", "gcf-v2-sources-", "run-sources-{project}-")
# Components that talk to Milvus (get EMBEDPIPE_MILVUS_URI and the token secret).
MILVUS_CLIENTS = ("on-retrain-requested", "on-job-event", "reconcile", "indexer", "search")


def identities() -> list[str]:
    return list(ACCESS)
