"""Deploy configuration: what is deployed where (``DeployConfig``), the deployed settings built from the local ones
(``config_from_settings``: mode=gcp, cloud bucket names, images in our registry) and the runtime env the functions and
services get (``runtime_env``: the settings less ``LOCAL_ONLY``)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from dataclasses import dataclass

from embedpipe import topology
from embedpipe.config import Settings, model_uri_problem, repo_root

REPOSITORY = "embedpipe"
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


def git_tag(sha: str) -> str:
    """The image tag: ``sha`` (the deploying settings' ``git_sha``), else the checkout's HEAD, 12 characters."""
    if not sha:
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=repo_root())
            sha = out.stdout.strip() if out.returncode == 0 else ""
        except OSError:
            sha = ""
    return sha[:12] or "latest"


def config_from_settings(project: str, region: str, base: Settings, vpc_connector: str = "") -> DeployConfig:
    """The deployed settings: mode=gcp, cloud names for what still has a local default, images in our registry."""
    tag = git_tag(base.git_sha)
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


BQ_DATASET_RE = re.compile(r"^(?:[a-z][a-z0-9.-]*:)?[a-z][a-z0-9-]{4,61}[a-z0-9]\.[A-Za-z0-9_]{1,1024}$")


def bigquery_datasets(settings: Settings) -> list[str]:
    """``EMBEDPIPE_BIGQUERY_DATASETS`` as a list, each checked: the names go into a GRANT statement."""
    out = [d.strip() for d in settings.bigquery_datasets.split(",") if d.strip()]
    for d in out:
        if not BQ_DATASET_RE.fullmatch(d):
            raise DeployError(f"EMBEDPIPE_BIGQUERY_DATASETS: {d!r} is not PROJECT.DATASET")
    return out
