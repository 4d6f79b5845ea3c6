"""The deploy plan: ``plan(cfg)`` turns the topology (``embedpipe.topology``, the same definition ``embedpipe up``
applies locally) into an ordered list of ``Step``s: APIs, Artifact Registry, service accounts, buckets, topics, the
Milvus token secret, the container images (Cloud Build), the staged functions (gen2) and Cloud Run services, push
subscriptions, the data bucket's notification, the job-state log sink and the reconcile scheduler job. Each step names
its resource, its settings and the IAM bindings it grants. ``render`` prints the plan (``--dry-run``), touching nothing.

Each step's settings are hashed into a fingerprint stored on the resource (a label, or the description where there
are no labels), which its check reads back. Values known only once things exist (project number, the sink's writer
identity, service URLs) are placeholders ``<<...>>`` resolved when the step runs (``embedpipe.deploy.apply``).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from embedpipe import topology
from embedpipe.contracts.events import TICK
from embedpipe.deploy.config import (
    PYTHON_RUNTIME,
    REPOSITORY,
    SIZING,
    DeployConfig,
    bigquery_datasets,
    runtime_env,
    sa_id,
)
from embedpipe.deploy.staging import component_dir, is_service, source_fingerprint, stage_for_deploy

APIS = (
    "aiplatform.googleapis.com",
    "artifactregistry.googleapis.com",
    "cloudbuild.googleapis.com",
    "cloudfunctions.googleapis.com",
    "cloudscheduler.googleapis.com",
    "iam.googleapis.com",
    "logging.googleapis.com",
    "pubsub.googleapis.com",
    "run.googleapis.com",
    "secretmanager.googleapis.com",
    "storage.googleapis.com",
)
MILVUS_SECRET = "embedpipe-milvus-token"
FINGERPRINT_LABEL = "embedpipe-fingerprint"


class Mode(Enum):
    """How ``apply`` decides what to run for a step; each step builder picks one."""

    # No check: the commands are idempotent in gcloud itself (enable APIs, a GRANT) and run on every apply.
    ENSURE = "ensure"
    # The check prints ``expect`` (the fingerprint, or a description holding it): create when missing, run the
    # ``update`` commands when it differs, nothing when it matches.
    CREATE_OR_UPDATE = "create-or-update"
    # Like CREATE_OR_UPDATE, but one command creates or updates (``gcloud functions deploy``, ``gcloud run deploy``):
    # ``create`` runs when missing or different; there are no separate update commands.
    DEPLOY = "deploy"
    # The check succeeds once the resource exists, and existing is done: it is immutable (an image tag).
    CREATE_ONLY = "create-only"
    # The check lists words; present when ``expect`` is one of them, created otherwise, never updated (a bucket
    # notification: the list of the bucket's notification topics).
    MEMBER = "member"


@dataclass
class Step:
    """One resource: how ``apply`` treats it (``mode``), how to read its state back, create it, update it, and the IAM
    bindings it grants."""

    kind: str
    name: str
    settings: dict
    mode: Mode
    check: list[str] | None = None  # prints the resource's state (exit != 0: missing); None exactly for ENSURE
    create: list[list[str]] = field(default_factory=list)
    update: list[list[str]] = field(default_factory=list)  # CREATE_OR_UPDATE only
    iam: list[list[str]] = field(default_factory=list)
    stdin_env: str = ""  # an env var whose value is fed to the create command (a secret: never printed)
    expect: str = ""  # what ``check`` prints when up to date (CREATE_OR_UPDATE, DEPLOY), or lists (MEMBER)
    local: Callable[[], None] | None = None  # work done on this machine before the commands (staging)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> Step:
        """The fields its mode uses, and only those, are set: a builder that picks a mode and forgets a part fails
        when the plan is made, not when it is applied."""
        m, problems = self.mode, []
        if (self.check is None) != (m is Mode.ENSURE):
            problems.append("a check (and only ENSURE has none)")
        if bool(self.update) != (m is Mode.CREATE_OR_UPDATE):
            problems.append("update commands (and only CREATE_OR_UPDATE has them)")
        if m in (Mode.CREATE_OR_UPDATE, Mode.DEPLOY) and self.fingerprint not in self.expect:
            problems.append("the fingerprint in expect")
        if bool(self.expect) != (m in (Mode.CREATE_OR_UPDATE, Mode.DEPLOY, Mode.MEMBER)):
            problems.append("expect (only CREATE_OR_UPDATE, DEPLOY and MEMBER compare)")
        if not self.create:
            problems.append("create commands")
        if problems:
            raise ValueError(f"{self.kind} {self.name} ({m.name}) needs " + "; ".join(problems))
        return self

    def action(self, returncode: int | None = None, printed: str = "") -> str:
        """What ``apply`` does, given the check's exit status and output: ensure, create, update or unchanged."""
        if self.mode is Mode.ENSURE:
            return "ensure"
        if returncode != 0:
            return "create"
        stored = printed.strip()
        if self.mode is Mode.CREATE_ONLY:
            return "unchanged"
        if self.mode is Mode.MEMBER:
            return "unchanged" if self.expect in stored.split() else "create"
        return "unchanged" if stored == self.expect else "update"  # CREATE_OR_UPDATE, DEPLOY

    def commands(self, action: str) -> list[list[str]]:
        """The commands ``apply`` runs for ``action`` (IAM bindings come after them, whatever the action)."""
        if action in ("ensure", "create"):
            return self.create
        if action == "update":
            return self.create if self.mode is Mode.DEPLOY else self.update
        return []

    def lines(self, n: int, shared_env: dict | None = None) -> list[str]:
        out = [f"[{n:02d}] {self.kind} {self.name}  (fingerprint {self.fingerprint})"]
        for k, v in self.settings.items():
            if k == "env" and shared_env is not None:
                extra = {kk: vv for kk, vv in v.items() if shared_env.get(kk) != vv}
                missing = sorted(set(shared_env) - set(v))
                out.append(
                    f"       env: the runtime env above, plus {extra or 'nothing'}, minus {missing or 'nothing'}"
                )
            elif isinstance(v, dict) and v:
                out.append(f"       {k}:")
                out += [f"         {kk}: {vv}" for kk, vv in v.items()]
            else:
                out.append(f"       {k}: {v}")
        if self.check:
            out.append(f"       check : {fmt(self.check)}")
        verb = "apply " if self.mode in (Mode.ENSURE, Mode.DEPLOY) else "create"  # apply: runs to create and update
        out += [f"       {verb}: {fmt(c)}" for c in self.create]
        out += [f"       update: {fmt(c)}" for c in self.update]
        out += [f"       iam   : {fmt(c)}" for c in self.iam]
        return out


def fmt(argv: list[str]) -> str:
    return shlex.join(argv)


def gcloud(cfg: DeployConfig, *args: str) -> list[str]:
    return ["gcloud", *args, f"--project={cfg.project}"]


def describe_function(cfg: DeployConfig, name: str, field: str) -> list[str]:
    """The command that prints one field of a deployed (gen2) function: the plan's check, apply's URL lookup."""
    return gcloud(cfg, "functions", "describe", name, "--gen2", f"--region={cfg.region}", f"--format=value({field})")


def _member(cfg: DeployConfig, identity: str) -> str:
    return f"serviceAccount:{cfg.sa(identity)}"


PUBSUB_AGENT = "serviceAccount:service-<<project_number>>@gcp-sa-pubsub.iam.gserviceaccount.com"
# Vertex AI's service agent: a Model Registry upload copies the model folder (artifact_uri) as this identity.
VERTEX_AGENT = "serviceAccount:service-<<project_number>>@gcp-sa-aiplatform.iam.gserviceaccount.com"
GCS_AGENT = "serviceAccount:<<gcs_service_agent>>"
SINK_WRITER = "<<sink_writer>>"


# BigQuery sources (only when EMBEDPIPE_BIGQUERY_DATASETS names datasets): the APIs, and for the job identity Storage
# Read sessions and query jobs (SQL parts) billed to this project; table data is granted per named dataset.
BIGQUERY_APIS = ("bigquery.googleapis.com", "bigquerystorage.googleapis.com")
BIGQUERY_JOB_ROLES = ("roles/bigquery.readSessionUser", "roles/bigquery.jobUser")


def plan(cfg: DeployConfig) -> list[Step]:
    steps: list[Step] = []
    steps.append(_apis(cfg))
    steps.append(_registry(cfg))
    steps += [_custom_role(cfg, role) for role in topology.CUSTOM_ROLES]
    steps += [_service_account(cfg, i) for i in topology.identities()]
    steps += [_bucket(cfg, f) for f in topology.BUCKETS]
    steps += [_bigquery_read(cfg, d) for d in bigquery_datasets(cfg.settings)]
    steps += [_topic(cfg, t) for t in (*topology.TOPICS, *topology.dead_letter_topics())]
    if cfg.settings.milvus_token:
        steps.append(_secret(cfg))
    steps += [_image(cfg, name) for name in topology.IMAGES]
    steps += [_component(cfg, c) for c in topology.COMPONENTS]
    steps += [_subscription(cfg, c) for c in topology.COMPONENTS if c.topic]
    steps += [_log_subscription(cfg, t) for t in topology.event_log_topics()]
    steps.append(_notification(cfg))
    steps.append(_sink(cfg))
    steps.append(_scheduler(cfg))
    return [s.validate() for s in steps]


def _labelled(cfg: DeployConfig, step: Step, describe: list[str], label_path: str) -> Step:
    step.check = gcloud(cfg, *describe, f"--format=value({label_path}.{FINGERPRINT_LABEL})")
    step.expect = step.fingerprint
    return step


def _registry(cfg: DeployConfig) -> Step:
    s = Step("artifact-registry", REPOSITORY, {"format": "docker", "location": cfg.region}, Mode.CREATE_OR_UPDATE)
    fp = f"{FINGERPRINT_LABEL}={s.fingerprint}"
    where = [f"--location={cfg.region}"]
    s.create = [
        gcloud(
            cfg,
            "artifacts",
            "repositories",
            "create",
            REPOSITORY,
            "--repository-format=docker",
            *where,
            "--description=embedpipe container images",
            f"--labels={fp}",
        )
    ]
    s.update = [gcloud(cfg, "artifacts", "repositories", "update", REPOSITORY, *where, f"--update-labels={fp}")]
    return _labelled(cfg, s, ["artifacts", "repositories", "describe", REPOSITORY, *where], "labels")


def _apis(cfg: DeployConfig) -> Step:
    """The APIs, and the Vertex AI service agent: the Model Registry's uploads read the model folder as that agent,
    which Google creates lazily; made here so the artifacts bucket can grant it read access (``_bucket``)."""
    apis = tuple(sorted((*APIS, *BIGQUERY_APIS))) if bigquery_datasets(cfg.settings) else APIS
    s = Step(
        "apis", "enable", {"services": ", ".join(apis), "service_identities": "aiplatform.googleapis.com"}, Mode.ENSURE
    )
    s.create = [
        gcloud(cfg, "services", "enable", *apis),
        gcloud(cfg, "beta", "services", "identity", "create", "--service=aiplatform.googleapis.com"),
    ]
    return s


def _custom_role(cfg: DeployConfig, role: str) -> Step:
    title, what, permissions = topology.CUSTOM_ROLES[role]
    perms = ",".join(permissions)
    s = Step("custom-role", cfg.role(f"custom:{role}"), {"permissions": perms, "stage": "GA"}, Mode.CREATE_OR_UPDATE)
    desc = f"embedpipe: {what} [{s.fingerprint}]"
    common = [f"--permissions={perms}", "--stage=GA", f"--description={desc}"]
    s.check = gcloud(cfg, "iam", "roles", "describe", role, "--format=value(description)")
    s.expect = desc
    s.create = [gcloud(cfg, "iam", "roles", "create", role, f"--title={title}", *common)]
    s.update = [gcloud(cfg, "iam", "roles", "update", role, *common)]
    return s


def build_sources_condition(cfg: DeployConfig) -> str:
    """An IAM condition matching the buckets build sources are uploaded to (they are created on first deploy)."""
    # gcloud spells a domain-scoped project id (example.com:proj) as example_com_proj in bucket names
    bucket_project = cfg.project.replace(":", "_").replace(".", "_")
    prefixes = [p.format(project=bucket_project) for p in topology.BUILD_SOURCE_BUCKETS]
    expr = " || ".join(f'resource.name.startsWith("projects/_/buckets/{p}")' for p in prefixes)
    # gcloud splits --condition on commas; the expression has none, the description neither
    return f"expression={expr},title=embedpipe-build-sources,description=build source buckets only"


def _service_account(cfg: DeployConfig, identity: str) -> Step:
    grants = topology.ACCESS[identity]
    project_roles = [cfg.role(role) for target, role in grants if target == "project"]
    if identity == "job" and bigquery_datasets(cfg.settings):
        project_roles += BIGQUERY_JOB_ROLES
    source_roles = [role for target, role in grants if target == "build-sources"]
    desc = {
        "job": "embedpipe: what Vertex AI training and embedding jobs run as",
        "push": "embedpipe: identity of Pub/Sub push subscriptions (OIDC tokens)",
        "build": "embedpipe: what Cloud Build runs as (images and function/service source builds)",
    }.get(identity, f"embedpipe: runtime identity of {identity}")
    settings = {"description": desc, "project_roles": project_roles}
    if source_roles:
        settings["build_source_bucket_roles"] = source_roles
    s = Step("service-account", cfg.sa(identity), settings, Mode.CREATE_OR_UPDATE)
    full = f"{desc} [{s.fingerprint}]"
    s.check = gcloud(cfg, "iam", "service-accounts", "describe", cfg.sa(identity), "--format=value(description)")
    s.create = [gcloud(cfg, "iam", "service-accounts", "create", sa_id(identity), f"--description={full}")]
    s.update = [gcloud(cfg, "iam", "service-accounts", "update", cfg.sa(identity), f"--description={full}")]
    bindings = [(role, "None") for role in project_roles]
    bindings += [(role, build_sources_condition(cfg)) for role in source_roles]
    s.iam = [
        gcloud(
            cfg,
            "projects",
            "add-iam-policy-binding",
            cfg.project,
            f"--member={_member(cfg, identity)}",
            f"--role={role}",
            f"--condition={condition}",
        )
        for role, condition in bindings
    ]
    for other, other_grants in topology.ACCESS.items():  # e.g. launching functions may act as the job identity
        for target, role in other_grants:
            if target == f"sa:{identity}":
                s.iam.append(_sa_binding(cfg, identity, _member(cfg, other), role))
    if identity == "push":  # Pub/Sub mints the push tokens as this account
        s.iam.append(_sa_binding(cfg, identity, PUBSUB_AGENT, "roles/iam.serviceAccountTokenCreator"))
    s.expect = full
    return s


def _sa_binding(cfg: DeployConfig, identity: str, member: str, role: str) -> list[str]:
    """``member`` gets ``role`` on the service account of ``identity`` (act as it, mint its tokens)."""
    return gcloud(
        cfg,
        "iam",
        "service-accounts",
        "add-iam-policy-binding",
        cfg.sa(identity),
        f"--member={member}",
        f"--role={role}",
    )


def _bucket(cfg: DeployConfig, settings_field: str) -> Step:
    name = cfg.bucket(settings_field)
    s = Step(
        "bucket",
        f"gs://{name}",
        {"location": cfg.region, "uniform_bucket_level_access": True, "public_access_prevention": "enforced"},
        Mode.CREATE_OR_UPDATE,
    )
    fp = f"{FINGERPRINT_LABEL}={s.fingerprint}"
    s.create = [
        gcloud(
            cfg,
            "storage",
            "buckets",
            "create",
            f"gs://{name}",
            f"--location={cfg.region}",
            "--uniform-bucket-level-access",
            "--public-access-prevention",
        )
    ]
    s.create.append(gcloud(cfg, "storage", "buckets", "update", f"gs://{name}", f"--update-labels={fp}"))
    s.update = [
        gcloud(
            cfg,
            "storage",
            "buckets",
            "update",
            f"gs://{name}",
            "--uniform-bucket-level-access",
            "--public-access-prevention",
            f"--update-labels={fp}",
        )
    ]
    for identity, grants in topology.ACCESS.items():
        for target, role in grants:
            field, _, prefix = target.removeprefix("bucket:").partition("/")
            if target.startswith("bucket:") and field == settings_field:
                condition = object_prefix_condition(name, prefix) if prefix else None
                s.iam.append(_bucket_binding(cfg, name, _member(cfg, identity), role, condition))
    if settings_field == "artifacts_bucket" and cfg.settings.model_registry != "local":
        # the Model Registry's uploads read runs/<run>/.../model/ as Vertex's agent (bucket-wide: copying a folder
        # lists it, and a list is checked on the bucket, where an object-name condition cannot apply)
        s.iam.append(_bucket_binding(cfg, name, VERTEX_AGENT, "roles/storage.objectViewer"))
    return _labelled(cfg, s, ["storage", "buckets", "describe", f"gs://{name}"], "labels")


def _bucket_binding(cfg: DeployConfig, bucket: str, member: str, role: str, condition: str | None = None) -> list[str]:
    cmd = ["storage", "buckets", "add-iam-policy-binding", f"gs://{bucket}", f"--member={member}", f"--role={role}"]
    # gcloud refuses a binding without a condition to a policy holding conditioned ones, unless told "None"
    return gcloud(cfg, *cmd, f"--condition={condition or 'None'}")


def object_prefix_condition(bucket: str, prefix: str) -> str:
    """An IAM condition matching the bucket's objects under ``prefix`` (buckets have uniform bucket-level access, which
    conditions need). Requests on the bucket itself, such as listing, do not match: grant those without one."""
    expr = f'resource.name.startsWith("projects/_/buckets/{bucket}/objects/{prefix}")'
    title = "embedpipe-" + re.sub(r"[^A-Za-z0-9-]", "-", prefix).strip("-")
    return f"expression={expr},title={title},description=objects under {prefix} only"


def _bigquery_read(cfg: DeployConfig, dataset: str) -> Step:
    """The job identity reads this dataset's tables (and no other's: the grant is on the dataset). GRANT is
    idempotent, so the step runs every time (no check)."""
    member = _member(cfg, "job")
    s = Step("bigquery-dataset-read", dataset, {"role": "roles/bigquery.dataViewer", "member": member}, Mode.ENSURE)
    project, name = dataset.rsplit(".", 1)
    grant = f'GRANT `roles/bigquery.dataViewer` ON SCHEMA `{project}`.`{name}` TO "{member}"'
    s.create = [["bq", "query", f"--project_id={cfg.project}", "--use_legacy_sql=false", grant]]
    return s


def _topic(cfg: DeployConfig, topic: str) -> Step:
    dlq = topic in topology.dead_letter_topics()
    s = Step("topic", topic, {"dead_letter_topic": dlq}, Mode.CREATE_OR_UPDATE)
    fp = f"{FINGERPRINT_LABEL}={s.fingerprint}"
    s.create = [gcloud(cfg, "pubsub", "topics", "create", topic, f"--labels={fp}")]
    s.update = [gcloud(cfg, "pubsub", "topics", "update", topic, f"--update-labels={fp}")]
    for identity, grants in topology.ACCESS.items():
        for target, role in grants:
            if target == f"topic:{topic}":
                s.iam.append(_topic_binding(cfg, topic, _member(cfg, identity), role))
    if dlq:  # Pub/Sub forwards undeliverable messages here as its service agent
        s.iam.append(_topic_binding(cfg, topic, PUBSUB_AGENT, "roles/pubsub.publisher"))
    if topic == topology.DATA_NOTIFICATION_TOPIC:
        s.iam.append(_topic_binding(cfg, topic, GCS_AGENT, "roles/pubsub.publisher"))
    return _labelled(cfg, s, ["pubsub", "topics", "describe", topic], "labels")


def _topic_binding(cfg: DeployConfig, topic: str, member: str, role: str) -> list[str]:
    return gcloud(cfg, "pubsub", "topics", "add-iam-policy-binding", topic, f"--member={member}", f"--role={role}")


def _secret(cfg: DeployConfig) -> Step:
    s = Step(
        "secret",
        MILVUS_SECRET,
        {"replication": "automatic", "value_from": "EMBEDPIPE_MILVUS_TOKEN"},
        Mode.CREATE_OR_UPDATE,
    )
    fp = f"{FINGERPRINT_LABEL}={s.fingerprint}"
    s.create = [
        gcloud(
            cfg, "secrets", "create", MILVUS_SECRET, "--replication-policy=automatic", "--data-file=-", f"--labels={fp}"
        )
    ]
    s.update = [gcloud(cfg, "secrets", "update", MILVUS_SECRET, f"--update-labels={fp}")]
    s.stdin_env = "EMBEDPIPE_MILVUS_TOKEN"
    for c in topology.MILVUS_CLIENTS:
        s.iam.append(
            gcloud(
                cfg,
                "secrets",
                "add-iam-policy-binding",
                MILVUS_SECRET,
                f"--member={_member(cfg, c)}",
                "--role=roles/secretmanager.secretAccessor",
            )
        )
    return _labelled(cfg, s, ["secrets", "describe", MILVUS_SECRET], "labels")


def _image(cfg: DeployConfig, name: str) -> Step:
    dockerfile = f"containers/{name}/Dockerfile"
    image = cfg.image(name)
    s = Step(
        "image",
        image,
        {"dockerfile": dockerfile, "context": ".", "build": "Cloud Build", "build_service_account": cfg.sa("build")},
        Mode.CREATE_ONLY,  # an image tag is immutable: present means built
    )
    s.check = gcloud(cfg, "artifacts", "docker", "images", "describe", image, "--format=value(image_summary.digest)")
    s.create = [
        gcloud(
            cfg,
            "builds",
            "submit",
            ".",
            "--config=deploy/cloudbuild.yaml",
            f"--region={cfg.region}",
            f"--service-account={cfg.sa_resource('build')}",
            f"--substitutions=_IMAGE={image},_DOCKERFILE={dockerfile},_GIT_SHA={cfg.tag}",
        )
    ]
    return s


def _component(cfg: DeployConfig, c: topology.Component) -> Step:
    staged = f"build/functions/{component_dir(c)}"
    size = SIZING.get(c.name, {"memory": "512Mi", "max_instances": 5})
    env = runtime_env(cfg)
    if c.name not in topology.MILVUS_CLIENTS:
        env = {k: v for k, v in env.items() if not k.startswith("EMBEDPIPE_MILVUS")}
    secrets = (
        f"EMBEDPIPE_MILVUS_TOKEN={MILVUS_SECRET}:latest"
        if c.name in topology.MILVUS_CLIENTS and cfg.settings.milvus_token
        else ""
    )
    timeout = max(c.ack_deadline_s, 60)
    settings = {
        "runtime": f"Cloud Run service ({PYTHON_RUNTIME})"
        if is_service(c)
        else f"Cloud Function gen2 ({PYTHON_RUNTIME}, HTTP, push-fed)",
        "build_service_account": cfg.sa("build"),
        "source": f"{staged} (staged: main.py + embedpipe/ + pinned requirements.txt)",
        "source_sha256": source_fingerprint(c),
        "entry_point": f"{c.target} ({c.signature})",
        "service_account": cfg.sa(c.name),
        "authentication": "required (IAM run.invoker; push subscriptions send OIDC tokens)",
        "timeout_s": timeout,
        **size,
        "vpc_connector": cfg.vpc_connector or "-",
        "secrets": secrets or "-",
        "env": env,
    }
    s = Step("cloud-run-service" if is_service(c) else "function", c.name, settings, Mode.DEPLOY)
    env_file = f"build/deploy/{c.name}.env.yaml"
    fp = f"{FINGERPRINT_LABEL}={s.fingerprint}"
    common = [
        f"--region={cfg.region}",
        f"--service-account={cfg.sa(c.name)}",
        f"--env-vars-file={env_file}",
        f"--memory={size['memory']}",
        f"--max-instances={size['max_instances']}",
        f"--build-service-account={cfg.sa_resource('build')}",
        f"--update-labels={fp}",
    ]
    if cfg.vpc_connector:
        common.append(f"--vpc-connector={cfg.vpc_connector}")
    if secrets:
        common.append(f"--set-secrets={secrets}")
    if is_service(c):
        cmd = gcloud(
            cfg,
            "run",
            "deploy",
            c.name,
            f"--source={staged}",
            f"--base-image={PYTHON_RUNTIME}",
            "--no-allow-unauthenticated",
            f"--timeout={timeout}",
            f"--cpu={size.get('cpu', '1')}",
            f"--concurrency={size.get('concurrency', 1)}",
            "--no-cpu-throttling" if size.get("cpu_always_allocated") else "--cpu-throttling",
            *common,
        )
        s.check = gcloud(
            cfg,
            "run",
            "services",
            "describe",
            c.name,
            f"--region={cfg.region}",
            f"--format=value(metadata.labels.{FINGERPRINT_LABEL})",
        )
        invoker = ["run", "services", "add-iam-policy-binding", c.name, f"--region={cfg.region}"]
    else:
        cmd = gcloud(
            cfg,
            "functions",
            "deploy",
            c.name,
            "--gen2",
            f"--runtime={PYTHON_RUNTIME}",
            f"--source={staged}",
            f"--entry-point={c.target}",
            "--trigger-http",
            "--no-allow-unauthenticated",
            f"--timeout={timeout}s",
            *common,
        )
        s.check = describe_function(cfg, c.name, f"labels.{FINGERPRINT_LABEL}")
        invoker = ["functions", "add-invoker-policy-binding", c.name, "--gen2", f"--region={cfg.region}"]
    s.create = [cmd]
    s.expect = s.fingerprint
    if c.topic:
        s.iam.append(
            gcloud(cfg, *invoker, f"--member={_member(cfg, 'push')}")
            + ([] if "functions" in invoker else ["--role=roles/run.invoker"])
        )
    s.local = lambda c=c, env=env, env_file=env_file: stage_for_deploy(c, env, env_file)
    return s


def _subscription(cfg: DeployConfig, c: topology.Component) -> Step:
    url = f"<<url:{c.name}>>"
    endpoint = f"{url}/projects/{cfg.project}/topics/{c.topic}"  # the path sets the CloudEvent source
    settings = {
        "topic": c.topic,
        "push_endpoint": endpoint,
        "oidc_service_account": cfg.sa("push"),
        "oidc_audience": url,
        "ack_deadline_s": c.ack_deadline_s,
        "retry_backoff_s": f"{topology.RETRY_MIN_BACKOFF_S}..{topology.RETRY_MAX_BACKOFF_S}",
        "dead_letter_topic": c.dead_letter_topic,
        "max_delivery_attempts": c.max_delivery_attempts,
    }
    s = Step("push-subscription", c.subscription, settings, Mode.CREATE_OR_UPDATE)
    fp = f"{FINGERPRINT_LABEL}={s.fingerprint}"
    flags = [
        f"--push-endpoint={endpoint}",
        f"--push-auth-service-account={cfg.sa('push')}",
        f"--push-auth-token-audience={url}",
        f"--ack-deadline={c.ack_deadline_s}",
        f"--min-retry-delay={topology.RETRY_MIN_BACKOFF_S}s",
        f"--max-retry-delay={topology.RETRY_MAX_BACKOFF_S}s",
        f"--dead-letter-topic={c.dead_letter_topic}",
        f"--max-delivery-attempts={c.max_delivery_attempts}",
    ]
    s.create = [
        gcloud(cfg, "pubsub", "subscriptions", "create", c.subscription, f"--topic={c.topic}", *flags, f"--labels={fp}")
    ]
    s.update = [gcloud(cfg, "pubsub", "subscriptions", "update", c.subscription, *flags, f"--update-labels={fp}")]
    s.iam = [
        gcloud(
            cfg,
            "pubsub",
            "subscriptions",
            "add-iam-policy-binding",
            c.subscription,
            f"--member={PUBSUB_AGENT}",
            "--role=roles/pubsub.subscriber",
        )
    ]
    return _labelled(cfg, s, ["pubsub", "subscriptions", "describe", c.subscription], "labels")


def _log_subscription(cfg: DeployConfig, topic: str) -> Step:
    """A pull subscription ``embedpipe events`` reads: for a dead-letter topic, the only place a dead-lettered
    message is kept (Pub/Sub drops messages of a topic without subscriptions)."""
    name = topology.log_subscription(topic)
    s = Step(
        "pull-subscription",
        name,
        {
            "topic": topic,
            "message_retention": topology.LOG_RETENTION,
            "expiration": "never",
            "read_by": "embedpipe events",
        },
        Mode.CREATE_OR_UPDATE,
    )
    fp = f"{FINGERPRINT_LABEL}={s.fingerprint}"
    flags = [f"--message-retention-duration={topology.LOG_RETENTION}", "--expiration-period=never"]
    s.create = [gcloud(cfg, "pubsub", "subscriptions", "create", name, f"--topic={topic}", *flags, f"--labels={fp}")]
    s.update = [gcloud(cfg, "pubsub", "subscriptions", "update", name, *flags, f"--update-labels={fp}")]
    return _labelled(cfg, s, ["pubsub", "subscriptions", "describe", name], "labels")


def _notification(cfg: DeployConfig) -> Step:
    bucket = cfg.bucket("data_bucket")
    topic = f"projects/{cfg.project}/topics/{topology.DATA_NOTIFICATION_TOPIC}"
    events = topology.DATA_NOTIFICATION_EVENTS
    s = Step(
        "gcs-notification",
        f"gs://{bucket} -> {topology.DATA_NOTIFICATION_TOPIC}",
        {"event_types": ", ".join(events), "payload_format": "json"},
        Mode.MEMBER,  # a notification is immutable: present means done
    )
    # gcloud lists {"Bucket URL": ..., "Notification Configuration": {...}}: the topic is inside the second
    # (a plain value(topic) prints nothing, and apply would add one more notification on every deploy)
    s.check = gcloud(
        cfg,
        "storage",
        "buckets",
        "notifications",
        "list",
        f"gs://{bucket}",
        '--format=value("Notification Configuration".topic)',
    )
    s.expect = f"//pubsub.googleapis.com/{topic}"
    s.create = [
        gcloud(
            cfg,
            "storage",
            "buckets",
            "notifications",
            "create",
            f"gs://{bucket}",
            f"--topic={topic}",
            *[f"--event-types={e}" for e in events],
            "--payload-format=json",
        )
    ]
    return s


def _sink(cfg: DeployConfig) -> Step:
    dest = f"pubsub.googleapis.com/projects/{cfg.project}/topics/{topology.JOB_EVENTS}"
    s = Step(
        "log-sink",
        topology.JOB_LOG_SINK,
        {"destination": dest, "filter": topology.JOB_LOG_FILTER},
        Mode.CREATE_OR_UPDATE,
    )
    desc = f"embedpipe: Vertex AI job-state entries to job-events [{s.fingerprint}]"
    flags = [f"--log-filter={topology.JOB_LOG_FILTER}", f"--description={desc}"]
    s.check = gcloud(cfg, "logging", "sinks", "describe", topology.JOB_LOG_SINK, "--format=value(description)")
    s.expect = desc
    s.create = [gcloud(cfg, "logging", "sinks", "create", topology.JOB_LOG_SINK, dest, *flags)]
    s.update = [gcloud(cfg, "logging", "sinks", "update", topology.JOB_LOG_SINK, dest, *flags)]
    s.iam = [_topic_binding(cfg, topology.JOB_EVENTS, SINK_WRITER, "roles/pubsub.publisher")]
    return s


def _scheduler(cfg: DeployConfig) -> Step:
    name = topology.RECONCILE_SCHEDULER_JOB
    attrs = f"ce-specversion=1.0,ce-type={TICK},ce-source=//cloudscheduler/{name},content-type=application/json"
    s = Step(
        "scheduler-job",
        name,
        {"schedule": cfg.schedule, "time_zone": "Etc/UTC", "topic": topology.RECONCILE_TICKS, "attributes": attrs},
        Mode.CREATE_OR_UPDATE,
    )
    desc = f"embedpipe: reconcile tick [{s.fingerprint}]"
    flags = [
        f"--location={cfg.region}",
        f"--schedule={cfg.schedule}",
        "--time-zone=Etc/UTC",
        # the full name: gcloud resolves a short topic name in core/project, not in --project
        f"--topic=projects/{cfg.project}/topics/{topology.RECONCILE_TICKS}",
        "--message-body={}",
        f"--description={desc}",
    ]
    s.check = gcloud(
        cfg, "scheduler", "jobs", "describe", name, f"--location={cfg.region}", "--format=value(description)"
    )
    s.expect = desc
    s.create = [gcloud(cfg, "scheduler", "jobs", "create", "pubsub", name, *flags, f"--attributes={attrs}")]
    s.update = [gcloud(cfg, "scheduler", "jobs", "update", "pubsub", name, *flags, f"--update-attributes={attrs}")]
    return s


def render(cfg: DeployConfig, steps: list[Step]) -> str:
    out = [
        f"embedpipe deploy plan: project {cfg.project}, region {cfg.region}, image tag {cfg.tag}",
        f"{len(steps)} steps, applied in this order; each is created if missing, updated if its fingerprint differs,",
        "left alone otherwise. <<...>> values are looked up when the step runs.",
    ]
    if cfg.settings.milvus_uri.startswith(("http://127.0.0.1", "http://localhost")):
        out.append(
            "WARNING: EMBEDPIPE_MILVUS_URI points at localhost; set it to your Milvus/Zilliz URI before applying"
        )
    shared = {k: v for k, v in runtime_env(cfg).items() if not k.startswith("EMBEDPIPE_MILVUS")}
    out.append("runtime env of every function and service (file build/deploy/<name>.env.yaml):")
    out += [f"  {k}={v}" for k, v in shared.items()]
    out.append("")
    for n, step in enumerate(steps, 1):
        out += step.lines(n, shared)
    return "\n".join(out)
