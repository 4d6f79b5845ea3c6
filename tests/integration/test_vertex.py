"""embedpipe.jobs.vertex: the requests VertexJobLauncher builds, sent through the real gapic client (REST transport) to
a local HTTP server that records them and answers like Vertex AI. No credentials, no network beyond 127.0.0.1.
Integration tier: the fake is a real server on a socket, and one test starts a fresh interpreter."""

from __future__ import annotations

import json
import re

import pytest
from google.cloud import aiplatform_v1

from embedpipe.jobs.spec import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED
from embedpipe.jobs.vertex import KEY_LABEL, JobNotFound, VertexJobLauncher, key_hash
from tests.fake_vertex import PARENT, FakeVertexServer, error
from tests.unit.test_vertex import embed_spec, settings, train_spec


class FakeVertex(FakeVertexServer):
    """Enough of the Vertex AI REST API: create/get/list/cancel for custom and tuning jobs, kept in memory."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}  # name -> job JSON
        self.next_id = 1000
        self.hide_from_list = 0  # the next N list calls see nothing (a racing submit)
        super().__init__()

    def add(self, kind: str, **job) -> str:
        self.next_id += 1
        name = f"{PARENT}/{kind}/{self.next_id}"
        self.jobs[name] = {"name": name, "createTime": f"2026-01-01T00:00:{self.next_id % 60:02d}Z", **job}
        return name

    def route(self, method: str, path: str, query: dict, body: dict) -> tuple[int, dict]:
        m = re.fullmatch(rf"{PARENT}/(customJobs|hyperparameterTuningJobs)", path)
        if m and method == "POST":
            return 200, self.jobs[self.add(m[1], **body, state="JOB_STATE_PENDING")]
        if m and method == "GET":
            found = []
            if self.hide_from_list:
                self.hide_from_list -= 1
            else:
                want = re.fullmatch(r'labels\.(\w+)="(.*)"', query.get("filter", ""))
                for name, job in self.jobs.items():
                    if f"/{m[1]}/" in name and (not want or job.get("labels", {}).get(want[1]) == want[2]):
                        found.append(job)
            return 200, {m[1]: found}
        if path.endswith(":cancel") and method == "POST":
            name = path.removesuffix(":cancel")
            if name not in self.jobs:
                return 404, error(404, "NOT_FOUND", "not found")
            self.jobs[name]["state"] = "JOB_STATE_CANCELLING"
            return 200, {}
        if method == "GET" and path in self.jobs:
            return 200, self.jobs[path]
        return 404, error(404, "NOT_FOUND", f"{path} not found")


@pytest.fixture
def vertex():
    fake = FakeVertex()
    yield fake
    fake.close()


def sent_custom_job(vertex: FakeVertex) -> aiplatform_v1.CustomJob:
    (body,) = vertex.bodies("POST", r"customJobs$")
    return aiplatform_v1.CustomJob.from_json(json.dumps(body))


def test_custom_job_request_carries_the_whole_spec(vertex):
    s = settings(
        vertex.endpoint,
        git_sha="0123abcd",  # the launching function's (the deploy sets it): the job's env carries it
        job_network="projects/123/global/networks/milvus",
        job_scheduling="spot",
        job_timeout_s=7200,
        job_restart_on_worker_restart="true",
    )
    name = VertexJobLauncher(s).submit(embed_spec())
    assert re.fullmatch(rf"{PARENT}/customJobs/\d+", name)
    job = sent_custom_job(vertex)
    spec = job.job_spec
    pool0, pool1 = spec.worker_pool_specs
    assert pool0.replica_count == 1, "pool 0 holds exactly the primary replica"
    assert pool1.replica_count == 2, "pool 1 holds the other DDP workers"
    for pool in (pool0, pool1):
        assert pool.machine_spec.machine_type == "g2-standard-8"
        assert pool.machine_spec.accelerator_type == aiplatform_v1.AcceleratorType.NVIDIA_L4
        assert pool.machine_spec.accelerator_count == 1
        assert pool.container_spec.image_uri.endswith("/embedder:abc123")
        assert list(pool.container_spec.args) == ["--dataset=demo", "--run-id=20260101t000000-abc123"]
        env = {e.name: e.value for e in pool.container_spec.env}
        assert env == {
            "EMBEDPIPE_DATA_BUCKET": "data",
            "EMBEDPIPE_GIT_SHA": "0123abcd",
            "EMBEDPIPE_JOB_KEY": "20260101t000000-abc123/embed/1",
        }
    assert spec.base_output_directory.output_uri_prefix == "gs://arts/runs/20260101t000000-abc123/embed"
    assert spec.service_account == "embedpipe-job@demo-project.iam.gserviceaccount.com"
    assert spec.network == "projects/123/global/networks/milvus"
    assert spec.scheduling.strategy == aiplatform_v1.Scheduling.Strategy.SPOT
    assert spec.scheduling.timeout.total_seconds() == 7200
    assert spec.scheduling.restart_job_on_worker_restart is True
    assert dict(job.labels) == {
        "run_id": "20260101t000000-abc123",  # lowercased: a valid label value
        "stage": "embed",
        "app": "embedpipe",
        KEY_LABEL: key_hash("20260101t000000-abc123/embed/1"),
    }
    assert job.display_name.startswith("embedpipe-embed-20260101t000000-ABC123-")


def test_single_replica_cpu_job_defaults(vertex):
    spec = embed_spec(replica_count=1, accelerator_type="", accelerator_count=0, machine_type="n1-standard-4")
    VertexJobLauncher(settings(vertex.endpoint)).submit(spec)
    job = sent_custom_job(vertex)
    (pool0,) = job.job_spec.worker_pool_specs
    assert pool0.replica_count == 1
    assert pool0.machine_spec.accelerator_count == 0
    assert pool0.machine_spec.accelerator_type == aiplatform_v1.AcceleratorType.ACCELERATOR_TYPE_UNSPECIFIED
    sched = job.job_spec.scheduling
    assert sched.strategy == aiplatform_v1.Scheduling.Strategy.STANDARD
    assert sched.timeout.total_seconds() == 86400 and sched.restart_job_on_worker_restart is False
    assert not job.job_spec.network


def test_submit_is_keyed_a_retry_returns_the_same_job(vertex):
    launcher = VertexJobLauncher(settings(vertex.endpoint))
    first = launcher.submit(embed_spec())
    again = VertexJobLauncher(settings(vertex.endpoint)).submit(embed_spec())  # a redelivered event, new instance
    assert again == first
    assert len(vertex.bodies("POST", r"customJobs$")) == 1
    (_, _, query, _) = next(r for r in vertex.requests if r[0] == "GET" and r[1].endswith("customJobs"))
    assert query["filter"] == f'labels.{KEY_LABEL}="{key_hash(embed_spec().key)}"'
    other = launcher.submit(embed_spec(key="20260101t000000-abc123/embed/2"))
    assert other != first


def test_racing_submits_converge_on_the_oldest_job(vertex):
    spec = embed_spec()
    # Another instance created a job for the same key after our list call saw nothing.
    vertex.hide_from_list = 1
    older = vertex.add("customJobs", labels={KEY_LABEL: key_hash(spec.key)}, state="JOB_STATE_RUNNING")
    name = VertexJobLauncher(settings(vertex.endpoint)).submit(spec)
    assert name == older
    cancelled = [p for m, p, _, _ in vertex.requests if m == "POST" and p.endswith(":cancel")]
    assert len(cancelled) == 1 and cancelled[0] != f"{older}:cancel", "our duplicate is cancelled, the keeper stays"


@pytest.mark.parametrize(
    ("vertex_state", "ours"),
    [
        ("JOB_STATE_QUEUED", QUEUED),
        ("JOB_STATE_PENDING", QUEUED),
        ("JOB_STATE_RUNNING", RUNNING),
        ("JOB_STATE_PAUSED", RUNNING),
        ("JOB_STATE_UPDATING", RUNNING),
        ("JOB_STATE_CANCELLING", RUNNING),
        ("JOB_STATE_SUCCEEDED", SUCCEEDED),
        ("JOB_STATE_FAILED", FAILED),
        ("JOB_STATE_EXPIRED", FAILED),
        ("JOB_STATE_PARTIALLY_SUCCEEDED", FAILED),
        ("JOB_STATE_CANCELLED", CANCELLED),
    ],
)
def test_get_maps_states_and_returns_labels(vertex, vertex_state, ours):
    name = vertex.add(
        "customJobs",
        state=vertex_state,
        labels={"run_id": "r1", "stage": "train"},
        error={"code": 9, "message": "replica 0 exited 1"} if ours == FAILED else {},
    )
    status = VertexJobLauncher(settings(vertex.endpoint)).get(name)
    assert (status.name, status.state, status.labels) == (name, ours, {"run_id": "r1", "stage": "train"})
    if vertex_state == "JOB_STATE_EXPIRED":
        assert status.error == "expired: replica 0 exited 1"
    elif ours == FAILED:
        assert "replica 0 exited 1" in status.error


def test_name_for_and_get_find_a_job_from_its_log_entry_id(vertex):
    launcher = VertexJobLauncher(settings(vertex.endpoint))
    name = vertex.add("customJobs", state="JOB_STATE_SUCCEEDED", labels={"run_id": "r", "stage": "embed"})
    job_id = name.rsplit("/", 1)[1]
    assert launcher.name_for(job_id) == f"{PARENT}/customJobs/{job_id}" == name
    assert launcher.get(launcher.name_for(job_id)).state == SUCCEEDED
    # A tuning job's log entries carry its id too: the same name_for finds it.
    hp = vertex.add("hyperparameterTuningJobs", state="JOB_STATE_RUNNING", labels={"run_id": "r", "stage": "train"})
    status = launcher.get(launcher.name_for(hp.rsplit("/", 1)[1]))
    assert (status.name, status.state) == (hp, RUNNING)
    with pytest.raises(JobNotFound):
        launcher.get(launcher.name_for("999"))
    assert isinstance(JobNotFound("x"), LookupError), "the pipeline treats LookupError as an unknown job"


def test_cancel_sends_cancel_for_each_kind(vertex):
    launcher = VertexJobLauncher(settings(vertex.endpoint))
    custom = vertex.add("customJobs", state="JOB_STATE_RUNNING")
    hp = vertex.add("hyperparameterTuningJobs", state="JOB_STATE_RUNNING")
    launcher.cancel(custom)
    launcher.cancel(hp)
    assert [p for m, p, _, _ in vertex.requests if m == "POST"] == [f"{custom}:cancel", f"{hp}:cancel"]


def test_hp_tuning_job_wraps_the_custom_job_spec(vertex):
    name = VertexJobLauncher(settings(vertex.endpoint)).submit(train_spec())
    assert "/hyperparameterTuningJobs/" in name
    assert not vertex.bodies("POST", r"customJobs$")
    (body,) = vertex.bodies("POST", r"hyperparameterTuningJobs$")
    job = aiplatform_v1.HyperparameterTuningJob.from_json(json.dumps(body))
    assert (job.max_trial_count, job.parallel_trial_count, job.max_failed_trial_count) == (6, 3, 0)
    (metric,) = job.study_spec.metrics
    assert (metric.metric_id, metric.goal) == ("recall_at_10", aiplatform_v1.StudySpec.MetricSpec.GoalType.MAXIMIZE)
    params = {p.parameter_id: p for p in job.study_spec.parameters}
    assert set(params) == {"learning-rate", "max-steps", "batch-size", "base-model"}, "the trainer's flag spelling"
    lr = params["learning-rate"]
    assert (lr.double_value_spec.min_value, lr.double_value_spec.max_value) == (1e-5, 1e-4)
    assert lr.scale_type == aiplatform_v1.StudySpec.ParameterSpec.ScaleType.UNIT_LOG_SCALE
    assert (params["max-steps"].integer_value_spec.min_value, params["max-steps"].integer_value_spec.max_value) == (
        20,
        200,
    )
    assert list(params["batch-size"].discrete_value_spec.values) == [16.0, 32.0]
    assert list(params["base-model"].categorical_value_spec.values) == ["a", "b"]
    trial = job.trial_job_spec
    assert trial.base_output_directory.output_uri_prefix == "gs://arts/runs/r9"
    (pool0,) = trial.worker_pool_specs
    # Flags the trial sets are dropped from the base args so they cannot shadow the trial's values.
    assert list(pool0.container_spec.args) == ["--seed=42", "--dataset=demo", "--run-id=r9"]
    assert pool0.machine_spec.accelerator_type == aiplatform_v1.AcceleratorType.NVIDIA_TESLA_T4
    assert dict(job.labels)["stage"] == "train"


def test_tuning_job_trials_carry_spot_scheduling_labels_and_the_job_identity(vertex):
    """Parsed with the aiplatform protos (``from_json`` refuses unknown fields): what each trial runs with."""
    board = "projects/demo-project/locations/us-central1/tensorboards/77"
    s = settings(vertex.endpoint, job_scheduling="spot", job_timeout_s=3600, tensorboard=board)
    VertexJobLauncher(s).submit(train_spec())
    (body,) = vertex.bodies("POST", r"hyperparameterTuningJobs$")
    job = aiplatform_v1.HyperparameterTuningJob.from_json(json.dumps(body))
    trial = job.trial_job_spec
    assert trial.scheduling.strategy == aiplatform_v1.Scheduling.Strategy.SPOT
    assert trial.scheduling.timeout.total_seconds() == 3600
    assert trial.service_account == "embedpipe-job@demo-project.iam.gserviceaccount.com"
    assert trial.tensorboard == board, "Vertex uploads each trial's AIP_TENSORBOARD_LOG_DIR there"
    assert {k: v for k, v in job.labels.items() if k != KEY_LABEL} == {
        "run_id": "r9",
        "stage": "train",
        "app": "embedpipe",
    }
    assert job.labels[KEY_LABEL] == key_hash("r9/train/1"), "a retried submit finds the tuning job by its key"


def test_finished_tuning_job_gives_the_best_trials_model_dir(vertex):
    def trial(tid: str, state: str, value: float) -> dict:
        return {
            "id": tid,
            "state": state,
            "finalMeasurement": {"metrics": [{"metricId": "recall_at_10", "value": value}]},
        }

    common = {
        "labels": {"run_id": "r9", "stage": "train"},
        "studySpec": {"metrics": [{"metricId": "recall_at_10", "goal": "MAXIMIZE"}]},
        "trialJobSpec": {"baseOutputDirectory": {"outputUriPrefix": "gs://arts/runs/r9/"}},
    }
    trials = [trial("1", "SUCCEEDED", 0.61), trial("2", "SUCCEEDED", 0.74), trial("3", "INFEASIBLE", 0.99)]
    name = vertex.add("hyperparameterTuningJobs", state="JOB_STATE_PARTIALLY_SUCCEEDED", trials=trials, **common)
    status = VertexJobLauncher(settings(vertex.endpoint)).get(name)
    assert (status.state, status.model_dir) == (SUCCEEDED, "gs://arts/runs/r9/2/model/")
    minimize = {**common, "studySpec": {"metrics": [{"metricId": "recall_at_10", "goal": "MINIMIZE"}]}}
    name = vertex.add("hyperparameterTuningJobs", state="JOB_STATE_SUCCEEDED", trials=trials, **minimize)
    assert VertexJobLauncher(settings(vertex.endpoint)).get(name).model_dir == "gs://arts/runs/r9/1/model/"
    name = vertex.add("hyperparameterTuningJobs", state="JOB_STATE_SUCCEEDED", trials=trials[2:], **common)
    assert VertexJobLauncher(settings(vertex.endpoint)).get(name).state == FAILED, "no succeeded trial: no model"


def test_the_launcher_does_not_import_aiplatform_until_used():
    import subprocess
    import sys

    code = (
        "import sys; from embedpipe.config import Settings; from embedpipe.jobs.vertex import VertexJobLauncher; "
        "VertexJobLauncher(Settings()).name_for('1'); "
        "assert not [m for m in sys.modules if m.startswith('google.cloud.aiplatform')], 'imported aiplatform'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
