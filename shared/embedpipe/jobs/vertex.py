"""Vertex AI backend of the ``JobLauncher`` protocol: a ``JobSpec`` becomes a CustomJob, or a
HyperparameterTuningJob wrapping the same CustomJob spec when ``spec.hp_tuning`` is set.

Only the gapic ``aiplatform_v1.JobServiceClient`` is used (imported lazily, on first use: a function that never
launches a job does not pay for it), over its REST transport. ``EMBEDPIPE_VERTEX_ENDPOINT`` overrides the regional
endpoint; an ``http://`` endpoint (a local test server) is called with anonymous credentials.

Keyed submit (DESIGN.md §3.4): Vertex AI has no client-chosen job ids and no request id on ``CreateCustomJob``, so a
job carries the label ``embedpipe_key`` (a hash of ``JobSpec.key``) and a deterministic display name. ``submit``
first lists jobs with that label and returns the one it finds. Two submits racing past the list both create; each
then lists again and keeps the oldest job with the key (cancelling the others), so both return the same name and
at most one job runs to the end.

``hp_tuning`` (from a retrain message) looks like::

    {"metric": "recall@10", "goal": "maximize", "max_trials": 8, "parallel_trials": 2,
     "max_failed_trials": 0, "algorithm": "random",        # optional; default Vertex's Bayesian search
     "parameters": {"learning_rate": {"min": 1e-5, "max": 1e-4, "scale": "log"},   # double
                    "max_steps": {"type": "integer", "min": 20, "max": 200},       # integer
                    "batch_size": {"values": [16, 32, 64]},                        # discrete (numbers)
                    "base_model": {"values": ["a", "b"]}}}                         # categorical (strings)

Parameter ids are sent in the trainer's flag spelling (``learning-rate``): Vertex passes each trial's values as
``--learning-rate=...``; the base args that set the same flags are dropped from the trial spec so they cannot
shadow the trial's values. The metric must be what the trainer reports through cloudml-hypertune under that tag.
Trial outputs land in ``<base_output_dir>/<trial_id>/model/``; ``get`` of a finished tuning job returns the best
trial's model dir in ``JobStatus.model_dir``.
"""

from __future__ import annotations

import hashlib
import logging

from embedpipe.config import Settings
from embedpipe.gcp import vertexai
from embedpipe.gcp.vertexai import client_options, label_value
from embedpipe.jobs import hypertune
from embedpipe.jobs.spec import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobSpec, JobStatus

log = logging.getLogger(__name__)

CUSTOM_JOBS = "customJobs"
HP_JOBS = "hyperparameterTuningJobs"
KEY_LABEL = "embedpipe_key"

# Vertex JobState (without the JOB_STATE_ prefix) -> ours. PARTIALLY_SUCCEEDED is decided per job (see _status).
STATE_MAP = {
    "JOB_STATE_UNSPECIFIED": QUEUED,
    "JOB_STATE_QUEUED": QUEUED,
    "JOB_STATE_PENDING": QUEUED,
    "JOB_STATE_RUNNING": RUNNING,
    "JOB_STATE_PAUSED": RUNNING,
    "JOB_STATE_UPDATING": RUNNING,
    "JOB_STATE_CANCELLING": RUNNING,  # not over yet: the event for CANCELLED follows
    "JOB_STATE_SUCCEEDED": SUCCEEDED,
    "JOB_STATE_FAILED": FAILED,
    "JOB_STATE_EXPIRED": FAILED,
    "JOB_STATE_CANCELLED": CANCELLED,
}

_SCALES = {"linear": "UNIT_LINEAR_SCALE", "log": "UNIT_LOG_SCALE", "reverse_log": "UNIT_REVERSE_LOG_SCALE"}
_ALGORITHMS = {"": "ALGORITHM_UNSPECIFIED", "grid": "GRID_SEARCH", "random": "RANDOM_SEARCH"}


class JobNotFound(LookupError):
    """No Vertex job has this name (the pipeline treats it as an unknown job)."""


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def flag_name(parameter: str) -> str:
    return parameter.replace("_", "-")


def console_url(name: str) -> str:
    """Where to watch a job: its page under Training in the Cloud console. Custom and tuning jobs share the page
    pattern (as the aiplatform SDK's own dashboard links do); the ``/cpu`` suffix is the custom job's CPU tab only."""
    parts = name.split("/")  # projects/P/locations/R/<kind>/ID
    project, region, job_id = parts[1], parts[3], parts[5]
    return f"https://console.cloud.google.com/agent-platform/locations/{region}/training/{job_id}?project={project}"


class VertexJobLauncher:
    def __init__(self, settings: Settings, credentials=None):
        self.settings = settings
        self._credentials = credentials
        self._client = None

    # ---------------------------------------------------------------- client
    @property
    def parent(self) -> str:
        return vertexai.parent(self.settings)

    @property
    def client(self):
        if self._client is None:
            from google.cloud import aiplatform_v1

            self._client = aiplatform_v1.JobServiceClient(**client_options(self.settings, self._credentials))
        return self._client

    def name_for(self, job_id: str) -> str:
        """The resource name for a numeric job id from a log entry (``resource.labels.job_id`` has no region: ours).
        ``get`` also finds a tuning job under this name."""
        return f"{self.parent}/{CUSTOM_JOBS}/{job_id}"

    # ---------------------------------------------------------------- requests
    def _labels(self, spec: JobSpec) -> dict[str, str]:
        labels = {label_value(k)[:63]: label_value(v) for k, v in spec.labels.items()}
        labels.setdefault("app", "embedpipe")
        labels[KEY_LABEL] = key_hash(spec.key)
        return labels

    def display_name(self, spec: JobSpec) -> str:
        stage = spec.labels.get("stage", spec.container)
        run_id = spec.labels.get("run_id", "")
        return f"embedpipe-{stage}-{run_id}-{key_hash(spec.key)[:8]}"[:128]

    def custom_job_spec(self, spec: JobSpec, drop_flags: tuple[str, ...] = ()) -> dict:
        if not spec.image:
            raise ValueError(f"JobSpec {spec.key} has no image: set EMBEDPIPE_{spec.container.upper()}_IMAGE")
        s = self.settings
        args = [a for a in spec.args if a.split("=", 1)[0] not in {f"--{f}" for f in drop_flags}]
        env = {**spec.env, "EMBEDPIPE_GIT_SHA": s.git_sha, "EMBEDPIPE_JOB_KEY": spec.key}
        machine = {"machine_type": spec.machine_type}
        if spec.accelerator_type and spec.accelerator_count:
            machine |= {"accelerator_type": spec.accelerator_type, "accelerator_count": spec.accelerator_count}

        def pool(replicas: int) -> dict:
            return {
                "machine_spec": dict(machine),
                "replica_count": replicas,
                "container_spec": {
                    "image_uri": spec.image,
                    "args": list(args),
                    "env": [{"name": k, "value": str(v)} for k, v in sorted(env.items()) if v != ""],
                },
            }

        pools = [pool(1)]  # pool 0: the primary replica (exactly one)
        if spec.replica_count > 1:
            pools.append(pool(spec.replica_count - 1))  # pool 1: the other DDP workers
        scheduling = {
            "restart_job_on_worker_restart": s.job_restart_on_worker_restart,
            "strategy": "SPOT" if s.job_scheduling == "spot" else "STANDARD",
        }
        if s.job_timeout_s:
            scheduling["timeout"] = {"seconds": s.job_timeout_s}
        out = {
            "worker_pool_specs": pools,
            "base_output_directory": {"output_uri_prefix": spec.base_output_dir},
            "scheduling": scheduling,
        }
        if s.service_account:
            out["service_account"] = s.service_account
        if s.job_network:
            out["network"] = s.job_network
        if s.tensorboard and spec.container == "trainer":  # Vertex uploads AIP_TENSORBOARD_LOG_DIR to it
            out["tensorboard"] = s.tensorboard
        return out

    def custom_job(self, spec: JobSpec) -> dict:
        return {
            "display_name": self.display_name(spec),
            "job_spec": self.custom_job_spec(spec),
            "labels": self._labels(spec),
        }

    def hp_tuning_job(self, spec: JobSpec) -> dict:
        hp = spec.hp_tuning or {}
        for required in ("metric", "parameters"):
            if not hp.get(required):
                raise ValueError(f"hp_tuning needs {required!r}: {hp}")
        params = [_parameter_spec(name, p) for name, p in hp["parameters"].items()]
        goal = str(hp.get("goal", "maximize")).upper()
        if goal not in ("MAXIMIZE", "MINIMIZE"):
            raise ValueError(f"hp_tuning goal must be maximize or minimize, not {hp.get('goal')!r}")
        study = {"metrics": [{"metric_id": hypertune.metric_tag(hp["metric"]), "goal": goal}], "parameters": params}
        algorithm = _ALGORITHMS.get(str(hp.get("algorithm", "")).lower())
        if algorithm is None:
            raise ValueError(f"hp_tuning algorithm must be one of {sorted(_ALGORITHMS)}, not {hp.get('algorithm')!r}")
        study["algorithm"] = algorithm
        drop = tuple(p["parameter_id"] for p in params)
        return {
            "display_name": self.display_name(spec),
            "study_spec": study,
            "max_trial_count": int(hp.get("max_trials", 8)),
            "parallel_trial_count": int(hp.get("parallel_trials", 2)),
            "max_failed_trial_count": int(hp.get("max_failed_trials", 0)),
            "trial_job_spec": self.custom_job_spec(spec, drop_flags=drop),
            "labels": self._labels(spec),
        }

    # ---------------------------------------------------------------- protocol
    def submit(self, spec: JobSpec) -> str:
        kind = HP_JOBS if spec.hp_tuning else CUSTOM_JOBS
        existing = self._with_key(kind, spec.key)
        if existing:
            name = existing[0]
            log.info("job %s already submitted for key %s; console: %s", name, spec.key, console_url(name))
            return name
        if kind == HP_JOBS:
            created = self.client.create_hyperparameter_tuning_job(
                parent=self.parent, hyperparameter_tuning_job=self.hp_tuning_job(spec)
            ).name
        else:
            created = self.client.create_custom_job(parent=self.parent, custom_job=self.custom_job(spec)).name
        keeper = created
        same_key = self._with_key(kind, spec.key)
        if same_key and same_key[0] != created:  # lost a race with another submit of the same key
            keeper = same_key[0]
        for duplicate in same_key[1:]:
            log.warning("cancelling duplicate job %s for key %s (keeping %s)", duplicate, spec.key, keeper)
            self.cancel(duplicate)
        if keeper != created and created not in same_key:
            self.cancel(created)
        log.info(
            "submitted Vertex AI %s %s (%s) for %s; console: %s",
            "hyperparameter tuning job" if kind == HP_JOBS else "custom job",
            keeper,
            spec.container,
            spec.key,
            console_url(keeper),
        )
        return keeper

    def _with_key(self, kind: str, key: str) -> list[str]:
        """Names of the jobs labelled with this key, oldest first."""
        request = {"parent": self.parent, "filter": f'labels.{KEY_LABEL}="{key_hash(key)}"'}
        if kind == HP_JOBS:
            jobs = list(self.client.list_hyperparameter_tuning_jobs(request=request))
        else:
            jobs = list(self.client.list_custom_jobs(request=request))
        jobs.sort(key=lambda j: (j.create_time.timestamp() if j.create_time else 0.0, j.name))
        return [j.name for j in jobs]

    def get(self, name: str) -> JobStatus:
        from google.api_core import exceptions as gexc

        job_id = name.rsplit("/", 1)[-1]
        kinds = [HP_JOBS, CUSTOM_JOBS] if f"/{HP_JOBS}/" in name else [CUSTOM_JOBS, HP_JOBS]
        for kind in kinds:  # a log entry only gives the numeric id: try the other kind too
            try:
                if kind == HP_JOBS:
                    return _hp_status(self.client.get_hyperparameter_tuning_job(name=f"{self.parent}/{kind}/{job_id}"))
                return _status(self.client.get_custom_job(name=f"{self.parent}/{kind}/{job_id}"))
            except gexc.NotFound:
                continue
        raise JobNotFound(name)

    def cancel(self, name: str) -> None:
        from google.api_core import exceptions as gexc

        try:
            if f"/{HP_JOBS}/" in name:
                self.client.cancel_hyperparameter_tuning_job(name=name)
            else:
                self.client.cancel_custom_job(name=name)
        except gexc.FailedPrecondition:
            log.info("job %s already ended: nothing to cancel", name)


def _parameter_spec(name: str, p: dict) -> dict:
    out: dict = {"parameter_id": flag_name(name)}
    kind, values = hypertune.parameter_kind(p, name), p.get("values")
    if kind == "double":
        out["double_value_spec"] = {"min_value": float(p["min"]), "max_value": float(p["max"])}
    elif kind == "integer":
        out["integer_value_spec"] = {"min_value": int(p["min"]), "max_value": int(p["max"])}
    elif kind == "discrete":
        out["discrete_value_spec"] = {"values": [float(v) for v in values]}
    elif kind == "categorical":
        out["categorical_value_spec"] = {"values": [str(v) for v in values]}
    else:
        raise ValueError(f"hp_tuning parameter {name}: unknown type {kind!r}")
    if kind != "categorical":
        scale = p.get("scale", "linear")
        if scale not in _SCALES:
            raise ValueError(f"hp_tuning parameter {name}: scale must be one of {sorted(_SCALES)}")
        out["scale_type"] = _SCALES[scale]
    return out


def _state(job) -> str:
    return job.state.name if hasattr(job.state, "name") else str(job.state)


def _error(job) -> str:
    return job.error.message if job.error and job.error.message else ""


def _status(job) -> JobStatus:
    state = _state(job)
    ours = STATE_MAP.get(state, FAILED if state == "JOB_STATE_PARTIALLY_SUCCEEDED" else RUNNING)
    error = _error(job)
    if state in ("JOB_STATE_EXPIRED", "JOB_STATE_PARTIALLY_SUCCEEDED"):
        error = f"{state.removeprefix('JOB_STATE_').lower()}: {error}".rstrip(": ")
    return JobStatus(job.name, ours, dict(job.labels), error)


def best_trial(job) -> tuple[str, float] | None:
    """(trial id, metric value) of the best succeeded trial of a tuning job, or None."""
    metric = job.study_spec.metrics[0]
    maximize = metric.goal.name == "MAXIMIZE" if hasattr(metric.goal, "name") else str(metric.goal) == "MAXIMIZE"
    scored = []
    for trial in job.trials:
        if (trial.state.name if hasattr(trial.state, "name") else str(trial.state)) != "SUCCEEDED":
            continue
        for m in trial.final_measurement.metrics:
            if m.metric_id == metric.metric_id:
                scored.append((m.value, trial.id))
    if not scored:
        return None
    value, trial_id = (max if maximize else min)(scored)
    return trial_id, value


def _hp_status(job) -> JobStatus:
    """A tuning job that ended with a best trial succeeded (also PARTIALLY_SUCCEEDED: some trials failed)."""
    state = _state(job)
    status = _status(job)
    if state not in ("JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED"):
        return status
    best = best_trial(job)
    if best is None:
        return JobStatus(job.name, FAILED, status.labels, f"no succeeded trial reported the metric. {status.error}")
    base = job.trial_job_spec.base_output_directory.output_uri_prefix.rstrip("/")
    return JobStatus(job.name, SUCCEEDED, status.labels, status.error, model_dir=f"{base}/{best[0]}/model/")
