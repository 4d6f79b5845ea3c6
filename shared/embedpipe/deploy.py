"""The GCP deploy: ``embedpipe deploy gcp --project P --region R [--dry-run]``.

``plan(cfg)`` turns the topology (``embedpipe.topology``, the same definition ``embedpipe up`` applies locally) into an
ordered list of ``Step``s: APIs, Artifact Registry, service accounts, buckets, topics, the Milvus token secret, the
container images (Cloud Build), the staged functions (gen2) and Cloud Run services, push subscriptions, the data
bucket's notification, the job-state log sink and the reconcile scheduler job. Each step names its resource, its
settings and the IAM bindings it grants. ``--dry-run`` prints the plan and touches nothing.

``apply(steps)`` runs gcloud, idempotently: each step's settings are hashed into a fingerprint stored on the
resource (a label, or the description where there are no labels); a step first reads it back
("describe") and creates the resource when it is missing, updates it when the fingerprint differs, and leaves it
alone when it matches, so a second apply changes nothing. IAM bindings are added with ``add-iam-policy-binding``
(a no-op when present). Values known only once things exist (project number, the sink's writer identity, service
URLs) are placeholders ``<<...>>`` resolved when the step runs.

Function staging: ``build/functions/<dir>/`` gets ``main.py``, a copy of ``embedpipe`` and a ``requirements.txt``
pinned from the repo's, holding only what that entry point imports (its ``embedpipe`` import closure, lazy imports
included; imports guarded by ``except ImportError`` are optional and left out). Cloud Run services also get a
``Procfile`` that starts functions-framework. The folder is git-ignored and regenerated on every deploy.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.metadata as md
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from embedpipe import topology
from embedpipe.config import Settings, model_uri_problem, repo_root
from embedpipe.contracts.events import TICK

log = logging.getLogger(__name__)

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
REPOSITORY = "embedpipe"
MILVUS_SECRET = "embedpipe-milvus-token"
FINGERPRINT_LABEL = "embedpipe-fingerprint"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# The Python the functions (--runtime) and the Cloud Run services (--base-image, for source builds) run: the
# version the staged requirements are pinned and tested for.
PYTHON_RUNTIME = "python311"
# Runtime sizing per component (functions: gen2; services: Cloud Run).
SIZING = {
    "on-data-uploaded": {"memory": "512Mi", "max_instances": 10},
    "on-retrain-requested": {"memory": "1Gi", "max_instances": 5},
    "on-job-event": {"memory": "1Gi", "max_instances": 5},
    "reconcile": {"memory": "1Gi", "max_instances": 1},
    "indexer": {"memory": "8Gi", "cpu": "4", "max_instances": 3, "concurrency": 1},
    # CPU always allocated (instance-based billing while an instance lives; still scales to zero): the search
    # service reloads the promoted model in a background thread after answering the index-updated push, and with
    # request-based billing Cloud Run throttles the CPU of work done outside a request to almost nothing.
    "search": {"memory": "4Gi", "cpu": "2", "max_instances": 5, "concurrency": 16, "cpu_always_allocated": True},
}


class DeployError(RuntimeError):
    pass


# ---------------------------------------------------------------- config


@dataclass(frozen=True)
class DeployConfig:
    project: str
    region: str
    settings: Settings  # what the deployed functions, services and jobs run with (mode=gcp)
    tag: str  # image tag: the git SHA
    vpc_connector: str = ""
    schedule: str = topology.RECONCILE_SCHEDULE

    @property
    def registry(self) -> str:
        return f"{self.region}-docker.pkg.dev/{self.project}/{REPOSITORY}"

    def image(self, name: str) -> str:
        return f"{self.registry}/{name}:{self.tag}"

    def sa(self, identity: str) -> str:
        return f"{sa_id(identity)}@{self.project}.iam.gserviceaccount.com"

    def sa_resource(self, identity: str) -> str:
        """The ``projects/P/serviceAccounts/EMAIL`` form the build-account flags take."""
        return f"projects/{self.project}/serviceAccounts/{self.sa(identity)}"

    def role(self, role: str) -> str:
        """``custom:<id>`` (a role the plan creates) -> ``projects/P/roles/<id>``; predefined roles as they are."""
        return f"projects/{self.project}/roles/{role[7:]}" if role.startswith("custom:") else role

    def bucket(self, settings_field: str) -> str:
        return getattr(self.settings, settings_field)


def sa_id(identity: str) -> str:
    """Service account ids are 6-30 characters: ``ep-<identity>``."""
    return f"ep-{identity}"[:30]


def git_tag() -> str:
    sha = os.environ.get("EMBEDPIPE_GIT_SHA")
    if not sha:
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=repo_root())
            sha = out.stdout.strip() if out.returncode == 0 else ""
        except OSError:
            sha = ""
    return sha[:12] or "latest"


def config_from_settings(project: str, region: str, base: Settings, vpc_connector: str = "") -> DeployConfig:
    """The deployed settings: mode=gcp, cloud names for what still has a local default, images in our registry."""
    tag = git_tag()
    local = Settings()
    registry = f"{region}-docker.pkg.dev/{project}/{REPOSITORY}"
    changes: dict = {"mode": "gcp", "project": project, "region": region, "log_format": "json"}
    for f in topology.BUCKETS:  # bucket names are global: the local defaults get the project as prefix
        if getattr(base, f) == getattr(local, f):
            changes[f] = f"{project}-{getattr(base, f)}"
    for name in topology.IMAGES:
        if not getattr(base, f"{name}_image"):
            changes[f"{name}_image"] = f"{registry}/{name}:{tag}"
    if not base.service_account:
        changes["service_account"] = f"{sa_id('job')}@{project}.iam.gserviceaccount.com"
    if not base.push_service_account:
        changes["push_service_account"] = f"{sa_id('push')}@{project}.iam.gserviceaccount.com"
    problem = model_uri_problem(base.base_model, cloud=True)
    if problem:  # a local path or a Hub id means nothing to a Vertex job: the images hold only the bundled weights
        raise DeployError(
            f"EMBEDPIPE_BASE_MODEL: {problem} (upload a local model folder to gs:// and set EMBEDPIPE_BASE_MODEL to "
            "that URI, or leave it unset for the bundled all-MiniLM-L6-v2)"
        )
    return DeployConfig(project, region, dataclasses.replace(base, **changes), tag, vpc_connector)


# Settings that only make sense on a laptop: never shipped to the cloud.
LOCAL_ONLY = {
    "state_dir",
    "pubsub_port",
    "gcs_port",
    "milvus_port",
    "bigquery_port",
    "bigquery_grpc_port",
    "functions_port",
    "milvus_token",
    "tick_s",
}


def runtime_env(cfg: DeployConfig) -> dict[str, str]:
    env = {k: v for k, v in cfg.settings.to_env().items() if k.removeprefix("EMBEDPIPE_").lower() not in LOCAL_ONLY}
    env["EMBEDPIPE_GIT_SHA"] = cfg.tag
    return dict(sorted(env.items()))


# ---------------------------------------------------------------- steps


@dataclass
class Step:
    """One resource: how to read its fingerprint back, create it, update it, and the IAM bindings it grants."""

    kind: str
    name: str
    settings: dict
    check: list[str] | None = None  # prints the stored fingerprint (exit != 0: missing); None: always run create
    create: list[list[str]] = field(default_factory=list)
    update: list[list[str]] | None = None  # None: same as create
    iam: list[list[str]] = field(default_factory=list)
    stdin_env: str = ""  # an env var whose value is fed to the create command (a secret: never printed)
    expect: str = ""  # what ``check`` prints when up to date (default: the fingerprint label)
    contains: bool = False  # up to date when ``expect`` is one of the printed words (lists)
    local: Callable[[], None] | None = None  # work done on this machine before the commands (staging)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]

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
            out.append(f"       check : {_fmt(self.check)}")
        verb = "create" if self.update is not None else "apply "
        out += [f"       {verb}: {_fmt(c)}" for c in self.create]
        out += [f"       update: {_fmt(c)}" for c in self.update or []]
        out += [f"       iam   : {_fmt(c)}" for c in self.iam]
        return out


def _fmt(argv: list[str]) -> str:
    return shlex.join(argv)


def _g(cfg: DeployConfig, *args: str) -> list[str]:
    return ["gcloud", *args, f"--project={cfg.project}"]


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
    if cfg.settings.milvus_token or os.environ.get("EMBEDPIPE_MILVUS_TOKEN"):
        steps.append(_secret(cfg))
    steps += [_image(cfg, name) for name in topology.IMAGES]
    steps += [_component(cfg, c) for c in topology.COMPONENTS]
    steps += [_subscription(cfg, c) for c in topology.COMPONENTS if c.topic]
    steps += [_log_subscription(cfg, t) for t in topology.event_log_topics()]
    steps.append(_notification(cfg))
    steps.append(_sink(cfg))
    steps.append(_scheduler(cfg))
    return steps


def _labelled(cfg: DeployConfig, step: Step, describe: list[str], label_path: str) -> Step:
    step.check = _g(cfg, *describe, f"--format=value({label_path}.{FINGERPRINT_LABEL})")
    return step


def _registry(cfg: DeployConfig) -> Step:
    s = Step("artifact-registry", REPOSITORY, {"format": "docker", "location": cfg.region})
    fp = f"{FINGERPRINT_LABEL}={s.fingerprint}"
    where = [f"--location={cfg.region}"]
    s.create = [
        _g(
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
    s.update = [_g(cfg, "artifacts", "repositories", "update", REPOSITORY, *where, f"--update-labels={fp}")]
    return _labelled(cfg, s, ["artifacts", "repositories", "describe", REPOSITORY, *where], "labels")


def _apis(cfg: DeployConfig) -> Step:
    """The APIs, and the Vertex AI service agent: the Model Registry's uploads read the model folder as that agent,
    which Google creates lazily; made here so the artifacts bucket can grant it read access (``_bucket``)."""
    apis = tuple(sorted((*APIS, *BIGQUERY_APIS))) if bigquery_datasets(cfg.settings) else APIS
    s = Step("apis", "enable", {"services": ", ".join(apis), "service_identities": "aiplatform.googleapis.com"})
    s.create = [
        _g(cfg, "services", "enable", *apis),
        _g(cfg, "beta", "services", "identity", "create", "--service=aiplatform.googleapis.com"),
    ]
    return s


def _custom_role(cfg: DeployConfig, role: str) -> Step:
    title, what, permissions = topology.CUSTOM_ROLES[role]
    perms = ",".join(permissions)
    s = Step("custom-role", cfg.role(f"custom:{role}"), {"permissions": perms, "stage": "GA"})
    desc = f"embedpipe: {what} [{s.fingerprint}]"
    common = [f"--permissions={perms}", "--stage=GA", f"--description={desc}"]
    s.check = _g(cfg, "iam", "roles", "describe", role, "--format=value(description)")
    s.expect = desc
    s.create = [_g(cfg, "iam", "roles", "create", role, f"--title={title}", *common)]
    s.update = [_g(cfg, "iam", "roles", "update", role, *common)]
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
    s = Step("service-account", cfg.sa(identity), settings)
    full = f"{desc} [{s.fingerprint}]"
    s.check = _g(cfg, "iam", "service-accounts", "describe", cfg.sa(identity), "--format=value(description)")
    s.create = [_g(cfg, "iam", "service-accounts", "create", sa_id(identity), f"--description={full}")]
    s.update = [_g(cfg, "iam", "service-accounts", "update", cfg.sa(identity), f"--description={full}")]
    bindings = [(role, "None") for role in project_roles]
    bindings += [(role, build_sources_condition(cfg)) for role in source_roles]
    s.iam = [
        _g(
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
                s.iam.append(
                    _g(
                        cfg,
                        "iam",
                        "service-accounts",
                        "add-iam-policy-binding",
                        cfg.sa(identity),
                        f"--member={_member(cfg, other)}",
                        f"--role={role}",
                    )
                )
    if identity == "push":  # Pub/Sub mints the push tokens as this account
        s.iam.append(
            _g(
                cfg,
                "iam",
                "service-accounts",
                "add-iam-policy-binding",
                cfg.sa(identity),
                f"--member={PUBSUB_AGENT}",
                "--role=roles/iam.serviceAccountTokenCreator",
            )
        )
    s.expect = full
    return s


def _bucket(cfg: DeployConfig, settings_field: str) -> Step:
    name = cfg.bucket(settings_field)
    s = Step(
        "bucket",
        f"gs://{name}",
        {"location": cfg.region, "uniform_bucket_level_access": True, "public_access_prevention": "enforced"},
    )
    fp = f"{FINGERPRINT_LABEL}={s.fingerprint}"
    s.create = [
        _g(
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
    s.create.append(_g(cfg, "storage", "buckets", "update", f"gs://{name}", f"--update-labels={fp}"))
    s.update = [
        _g(
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
            if target == f"bucket:{settings_field}":
                s.iam.append(
                    _g(
                        cfg,
                        "storage",
                        "buckets",
                        "add-iam-policy-binding",
                        f"gs://{name}",
                        f"--member={_member(cfg, identity)}",
                        f"--role={role}",
                    )
                )
    if settings_field == "artifacts_bucket" and cfg.settings.model_registry != "local":
        # the Model Registry's uploads read runs/<run>/.../model/ as Vertex's agent (bucket-wide: copying a folder
        # lists it, and a list is checked on the bucket, where an object-name condition cannot apply)
        s.iam.append(
            _g(
                cfg,
                "storage",
                "buckets",
                "add-iam-policy-binding",
                f"gs://{name}",
                f"--member={VERTEX_AGENT}",
                "--role=roles/storage.objectViewer",
            )
        )
    return _labelled(cfg, s, ["storage", "buckets", "describe", f"gs://{name}"], "labels")


BQ_DATASET_RE = re.compile(r"^(?:[a-z][a-z0-9.-]*:)?[a-z][a-z0-9-]{4,61}[a-z0-9]\.[A-Za-z0-9_]{1,1024}$")


def bigquery_datasets(settings: Settings) -> list[str]:
    """``EMBEDPIPE_BIGQUERY_DATASETS`` as a list, each checked: the names go into a GRANT statement."""
    out = [d.strip() for d in settings.bigquery_datasets.split(",") if d.strip()]
    for d in out:
        if not BQ_DATASET_RE.fullmatch(d):
            raise DeployError(f"EMBEDPIPE_BIGQUERY_DATASETS: {d!r} is not PROJECT.DATASET")
    return out


def _bigquery_read(cfg: DeployConfig, dataset: str) -> Step:
    """The job identity reads this dataset's tables (and no other's: the grant is on the dataset). GRANT is
    idempotent, so the step runs every time (no check)."""
    member = _member(cfg, "job")
    s = Step("bigquery-dataset-read", dataset, {"role": "roles/bigquery.dataViewer", "member": member})
    project, name = dataset.rsplit(".", 1)
    grant = f'GRANT `roles/bigquery.dataViewer` ON SCHEMA `{project}`.`{name}` TO "{member}"'
    s.create = [["bq", "query", f"--project_id={cfg.project}", "--use_legacy_sql=false", grant]]
    return s


def _topic(cfg: DeployConfig, topic: str) -> Step:
    dlq = topic in topology.dead_letter_topics()
    s = Step("topic", topic, {"dead_letter_topic": dlq})
    fp = f"{FINGERPRINT_LABEL}={s.fingerprint}"
    s.create = [_g(cfg, "pubsub", "topics", "create", topic, f"--labels={fp}")]
    s.update = [_g(cfg, "pubsub", "topics", "update", topic, f"--update-labels={fp}")]
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
    return _g(cfg, "pubsub", "topics", "add-iam-policy-binding", topic, f"--member={member}", f"--role={role}")


def _secret(cfg: DeployConfig) -> Step:
    s = Step("secret", MILVUS_SECRET, {"replication": "automatic", "value_from": "EMBEDPIPE_MILVUS_TOKEN"})
    fp = f"{FINGERPRINT_LABEL}={s.fingerprint}"
    s.create = [
        _g(cfg, "secrets", "create", MILVUS_SECRET, "--replication-policy=automatic", "--data-file=-", f"--labels={fp}")
    ]
    s.update = [_g(cfg, "secrets", "update", MILVUS_SECRET, f"--update-labels={fp}")]
    s.stdin_env = "EMBEDPIPE_MILVUS_TOKEN"
    for c in topology.MILVUS_CLIENTS:
        s.iam.append(
            _g(
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
    )
    s.check = _g(cfg, "artifacts", "docker", "images", "describe", image, "--format=value(image_summary.digest)")
    s.create = [
        _g(
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
    s.update = []  # an image tag is immutable: present means built
    return s


def component_dir(c: topology.Component) -> str:
    return Path(c.path).parent.name


def is_service(c: topology.Component) -> bool:
    return c.path.startswith("services/")


def _component(cfg: DeployConfig, c: topology.Component) -> Step:
    staged = f"build/functions/{component_dir(c)}"
    size = SIZING.get(c.name, {"memory": "512Mi", "max_instances": 5})
    env = runtime_env(cfg)
    if c.name not in topology.MILVUS_CLIENTS:
        env = {k: v for k, v in env.items() if not k.startswith("EMBEDPIPE_MILVUS")}
    secrets = (
        f"EMBEDPIPE_MILVUS_TOKEN={MILVUS_SECRET}:latest"
        if c.name in topology.MILVUS_CLIENTS and (cfg.settings.milvus_token or os.environ.get("EMBEDPIPE_MILVUS_TOKEN"))
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
    s = Step("cloud-run-service" if is_service(c) else "function", c.name, settings)
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
        cmd = _g(
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
        s.check = _g(
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
        cmd = _g(
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
        s.check = _g(
            cfg,
            "functions",
            "describe",
            c.name,
            "--gen2",
            f"--region={cfg.region}",
            f"--format=value(labels.{FINGERPRINT_LABEL})",
        )
        invoker = ["functions", "add-invoker-policy-binding", c.name, "--gen2", f"--region={cfg.region}"]
    s.create = [cmd]
    s.update = None
    if c.topic:
        s.iam.append(
            _g(cfg, *invoker, f"--member={_member(cfg, 'push')}")
            + ([] if "functions" in invoker else ["--role=roles/run.invoker"])
        )
    s.local = lambda c=c, env=env, env_file=env_file: _stage_for_deploy(c, env, env_file)
    return s


def _stage_for_deploy(c: topology.Component, env: dict, env_file: str) -> None:
    stage(c, repo_root() / "build" / "functions")
    path = repo_root() / env_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in env.items()))


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
    s = Step("push-subscription", c.subscription, settings)
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
        _g(cfg, "pubsub", "subscriptions", "create", c.subscription, f"--topic={c.topic}", *flags, f"--labels={fp}")
    ]
    s.update = [_g(cfg, "pubsub", "subscriptions", "update", c.subscription, *flags, f"--update-labels={fp}")]
    s.iam = [
        _g(
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
    )
    fp = f"{FINGERPRINT_LABEL}={s.fingerprint}"
    flags = [f"--message-retention-duration={topology.LOG_RETENTION}", "--expiration-period=never"]
    s.create = [_g(cfg, "pubsub", "subscriptions", "create", name, f"--topic={topic}", *flags, f"--labels={fp}")]
    s.update = [_g(cfg, "pubsub", "subscriptions", "update", name, *flags, f"--update-labels={fp}")]
    return _labelled(cfg, s, ["pubsub", "subscriptions", "describe", name], "labels")


def _notification(cfg: DeployConfig) -> Step:
    bucket = cfg.bucket("data_bucket")
    topic = f"projects/{cfg.project}/topics/{topology.DATA_NOTIFICATION_TOPIC}"
    events = topology.DATA_NOTIFICATION_EVENTS
    s = Step(
        "gcs-notification",
        f"gs://{bucket} -> {topology.DATA_NOTIFICATION_TOPIC}",
        {"event_types": ", ".join(events), "payload_format": "json"},
    )
    # gcloud lists {"Bucket URL": ..., "Notification Configuration": {...}}: the topic is inside the second
    # (a plain value(topic) prints nothing, and apply would add one more notification on every deploy)
    s.check = _g(
        cfg,
        "storage",
        "buckets",
        "notifications",
        "list",
        f"gs://{bucket}",
        '--format=value("Notification Configuration".topic)',
    )
    s.expect, s.contains = f"//pubsub.googleapis.com/{topic}", True
    s.create = [
        _g(
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
    s.update = []  # a notification is immutable; present means done
    return s


def _sink(cfg: DeployConfig) -> Step:
    dest = f"pubsub.googleapis.com/projects/{cfg.project}/topics/{topology.JOB_EVENTS}"
    s = Step("log-sink", topology.JOB_LOG_SINK, {"destination": dest, "filter": topology.JOB_LOG_FILTER})
    desc = f"embedpipe: Vertex AI job-state entries to job-events [{s.fingerprint}]"
    flags = [f"--log-filter={topology.JOB_LOG_FILTER}", f"--description={desc}"]
    s.check = _g(cfg, "logging", "sinks", "describe", topology.JOB_LOG_SINK, "--format=value(description)")
    s.expect = desc
    s.create = [_g(cfg, "logging", "sinks", "create", topology.JOB_LOG_SINK, dest, *flags)]
    s.update = [_g(cfg, "logging", "sinks", "update", topology.JOB_LOG_SINK, dest, *flags)]
    s.iam = [_topic_binding(cfg, topology.JOB_EVENTS, SINK_WRITER, "roles/pubsub.publisher")]
    return s


def _scheduler(cfg: DeployConfig) -> Step:
    name = topology.RECONCILE_SCHEDULER_JOB
    attrs = f"ce-specversion=1.0,ce-type={TICK},ce-source=//cloudscheduler/{name},content-type=application/json"
    s = Step(
        "scheduler-job",
        name,
        {"schedule": cfg.schedule, "time_zone": "Etc/UTC", "topic": topology.RECONCILE_TICKS, "attributes": attrs},
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
    s.check = _g(cfg, "scheduler", "jobs", "describe", name, f"--location={cfg.region}", "--format=value(description)")
    s.expect = desc
    s.create = [_g(cfg, "scheduler", "jobs", "create", "pubsub", name, *flags, f"--attributes={attrs}")]
    s.update = [_g(cfg, "scheduler", "jobs", "update", "pubsub", name, *flags, f"--update-attributes={attrs}")]
    return s


# ---------------------------------------------------------------- printing and applying


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


Runner = Callable[[list[str], str | None], subprocess.CompletedProcess]


def run_gcloud(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, cwd=repo_root())


class Resolver:
    """Placeholders that only exist once resources do; each looked up once."""

    def __init__(self, cfg: DeployConfig, runner: Runner):
        self.cfg, self.runner, self.cache = cfg, runner, {}

    def _value(self, key: str) -> str:
        cfg = self.cfg
        if key == "project_number":
            argv = _g(cfg, "projects", "describe", cfg.project, "--format=value(projectNumber)")
        elif key == "gcs_service_agent":
            argv = _g(cfg, "storage", "service-agent")
        elif key == "sink_writer":
            argv = _g(cfg, "logging", "sinks", "describe", topology.JOB_LOG_SINK, "--format=value(writerIdentity)")
        elif key.startswith("url:"):
            c = topology.component(key[4:])
            if is_service(c):
                argv = _g(
                    cfg, "run", "services", "describe", c.name, f"--region={cfg.region}", "--format=value(status.url)"
                )
            else:
                argv = _g(
                    cfg,
                    "functions",
                    "describe",
                    c.name,
                    "--gen2",
                    f"--region={cfg.region}",
                    "--format=value(serviceConfig.uri)",
                )
        else:
            raise DeployError(f"unknown placeholder <<{key}>>")
        proc = self.runner(argv, None)
        if proc.returncode != 0 or not proc.stdout.strip():
            raise DeployError(f"could not look up {key}: {_fmt(argv)}: {proc.stderr.strip()[-500:]}")
        return proc.stdout.strip()

    def __call__(self, argv: list[str]) -> list[str]:
        def sub(m: re.Match) -> str:
            if m[1] not in self.cache:
                self.cache[m[1]] = self._value(m[1])
            return self.cache[m[1]]

        return [re.sub(r"<<([^>]+)>>", sub, a) for a in argv]


def apply(cfg: DeployConfig, steps: list[Step], runner: Runner = run_gcloud, echo=print) -> dict[str, int]:
    """Apply the plan in order; returns counts of created / updated / unchanged / ensured (always run) steps."""
    if cfg.settings.milvus_uri.startswith(("http://127.0.0.1", "http://localhost")):
        raise DeployError("EMBEDPIPE_MILVUS_URI points at localhost: set your Milvus/Zilliz URI (and token)")
    resolve = Resolver(cfg, runner)
    counts = {"created": 0, "updated": 0, "unchanged": 0, "ensured": 0}

    def run(argv: list[str], stdin: str | None = None) -> None:
        argv = resolve(argv)
        proc = runner(argv, stdin)
        if proc.returncode != 0:
            raise DeployError(f"failed ({proc.returncode}): {_fmt(argv)}\n{proc.stderr.strip()[-2000:]}")

    for n, step in enumerate(steps, 1):
        if step.local:
            step.local()
        action = "create" if step.check is not None else "ensure"  # no check: the command is idempotent itself
        if step.check is not None:
            proc = runner(resolve(step.check), None)
            stored = proc.stdout.strip()
            if proc.returncode == 0:
                if step.contains:
                    action = "unchanged" if step.expect in stored.split() else "create"
                elif step.update == [] or stored == (step.expect or step.fingerprint):
                    action = "unchanged"
                else:
                    action = "update"
        commands = {
            "create": step.create,
            "ensure": step.create,
            "update": step.create if step.update is None else step.update,
        }
        stdin = os.environ.get(step.stdin_env, "") if step.stdin_env and action == "create" else None
        for argv in commands.get(action, []):
            run(argv, stdin)
        for argv in step.iam:
            run(argv)
        counts[{"create": "created", "update": "updated", "ensure": "ensured"}.get(action, "unchanged")] += 1
        echo(f"[{n:02d}] {action:<9} {step.kind} {step.name}")
    return counts


# ---------------------------------------------------------------- function staging


def _pins() -> dict[str, str]:
    """Normalized distribution name -> the pinned line of the repo's requirements.txt."""
    out = {}
    for line in (repo_root() / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out[_norm(re.split(r"[=<>!~\[; ]", line, maxsplit=1)[0])] = line
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _optional(node: ast.AST, parents: dict) -> bool:
    """An import inside ``try: ... except ImportError``."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            return True
    return False


def import_closure(entry: Path, package_dir: Path) -> tuple[set[str], set[str]]:
    """(embedpipe modules, third-party dotted module names) that ``entry`` imports, transitively, lazily or not."""
    seen: set[str] = set()
    third: set[str] = set()
    queue = [("__entry__", entry)]
    while queue:
        mod, path = queue.pop()
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or _optional(node, parents):
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level or not node.module:
                    continue
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                names = [a.name for a in node.names]
            for name in names:
                top = name.split(".")[0]
                if top == "__future__" or top in sys.stdlib_module_names:
                    continue
                if top == "embedpipe":
                    rel = name.split(".")[1:]
                    for candidate in (
                        package_dir.joinpath(*rel).with_suffix(".py"),
                        package_dir.joinpath(*rel, "__init__.py"),
                    ):
                        if rel and candidate.exists() and name not in seen:
                            seen.add(name)
                            queue.append((name, candidate))
                    continue
                third.add(name)
    return seen, third


@cache
def _dist_files(dist_name: str) -> frozenset[str]:
    dist = md.distribution(dist_name)
    return frozenset(str(Path(dist.locate_file(f)).resolve()) for f in dist.files or [])


@cache
def _packages() -> dict[str, list[str]]:
    return md.packages_distributions()


def _owner(origin: str, top: str) -> str | None:
    path = str(Path(origin).resolve())
    for name in _packages().get(top, []):
        if path in _dist_files(name):
            return _norm(name)
    return None


def distribution_of(module: str) -> str | None:
    """The installed distribution that provides ``module``: the first prefix that is a real (non-namespace) package
    or module decides (``google.cloud.pubsub_v1`` -> google-cloud-pubsub); finding it imports only namespaces."""
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        try:
            spec = importlib.util.find_spec(".".join(parts[:i]))
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        if spec.origin not in (None, "namespace"):
            return _owner(spec.origin, parts[0])
    return None


def requires_closure(names: set[str]) -> set[str]:
    """Every distribution that installing ``names`` brings, following ``dist[extra]`` requirements too."""
    out: set[str] = set()
    queue: list[tuple[str, frozenset[str]]] = [(n, frozenset()) for n in names]
    done: set[tuple[str, frozenset[str]]] = set()
    while queue:
        name, extras = queue.pop()
        if (name, extras) in done:
            continue
        done.add((name, extras))
        out.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for r in reqs:
            spec, _, marker = r.partition(";")
            wanted = re.findall(r'extra\s*==\s*["\']([^"\']+)["\']', marker)
            if wanted and not set(wanted) & extras:
                continue
            m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", spec)
            sub = frozenset(e.strip() for e in (m[2] or "").split(",") if e.strip())
            queue.append((_norm(m[1]), sub))
    return out


@cache
def requirements_for(entry: Path, package_dir: Path) -> list[str]:
    """Pinned requirement lines for what ``entry`` needs: the pins of the distributions it imports from (and a pin
    at the installed version for any it imports that neither a pin nor a pin's dependencies bring)."""
    _, modules = import_closure(entry, package_dir)
    needed = {d for d in (distribution_of(m) for m in sorted(modules)) if d and d != "embedpipe"}
    needed.add("functions-framework")
    pins = _pins()
    chosen = {d for d in needed if d in pins}
    brought = requires_closure(chosen)
    lines = sorted(pins[d] for d in chosen)
    for d in sorted(needed - chosen - brought):
        lines.append(f"{d}=={md.version(d)}")
    if any(_norm(line.split("=")[0]) == "torch" for line in lines):
        lines.insert(0, f"--extra-index-url {TORCH_CPU_INDEX}")  # the CPU wheel: no multi-GB CUDA build
    return lines


def source_files(c: topology.Component) -> dict[str, bytes]:
    """What staging writes for a component, relative path -> content (also what its fingerprint hashes)."""
    root = repo_root()
    package = Path(__file__).resolve().parent
    files = {"main.py": (root / c.path).read_bytes()}
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".json", ".typed"):
            files[f"embedpipe/{path.relative_to(package).as_posix()}"] = path.read_bytes()
    reqs = requirements_for(root / c.path, package)
    files["requirements.txt"] = (
        "# generated by embedpipe.deploy from requirements.txt\n" + "\n".join(reqs) + "\n"
    ).encode()
    if is_service(c):
        files["Procfile"] = (
            f"web: functions-framework --target={c.target} --signature-type={c.signature} --port=$PORT\n"
        ).encode()
    return files


def source_fingerprint(c: topology.Component) -> str:
    h = hashlib.sha256()
    for name, data in sorted(source_files(c).items()):
        h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:16]


def stage(c: topology.Component, out_root: Path) -> Path:
    """Write ``out_root/<dir>/`` from scratch: main.py, embedpipe/, requirements.txt (and Procfile for services)."""
    out = out_root / component_dir(c)
    if out.exists():
        shutil.rmtree(out)
    for name, data in source_files(c).items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return out


def stage_all(out_root: Path) -> dict[str, Path]:
    return {c.name: stage(c, out_root) for c in topology.COMPONENTS}
