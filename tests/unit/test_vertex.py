"""embedpipe.jobs.vertex without a server: request building that fails before any request, label values, console
URLs; and the spec and settings builders the integration tier's Vertex tests share
(tests/integration/test_vertex.py sends the requests to a local HTTP server that answers like Vertex AI)."""

from __future__ import annotations

import pytest

from embedpipe.config import Settings
from embedpipe.gcp.vertexai import label_value
from embedpipe.jobs.spec import JobSpec
from embedpipe.jobs.vertex import VertexJobLauncher, console_url

# Nothing listens there; the unit tier's guard fails a test that tries to connect anyway.
NO_SERVER = "http://127.0.0.1:9"


def settings(endpoint: str, **overrides) -> Settings:
    env = {
        "EMBEDPIPE_MODE": "gcp",
        "EMBEDPIPE_PROJECT": "demo-project",
        "EMBEDPIPE_REGION": "us-central1",
        "EMBEDPIPE_TRAINER_IMAGE": "us-central1-docker.pkg.dev/demo-project/embedpipe/trainer:abc123",
        "EMBEDPIPE_EMBEDDER_IMAGE": "us-central1-docker.pkg.dev/demo-project/embedpipe/embedder:abc123",
        "EMBEDPIPE_SERVICE_ACCOUNT": "embedpipe-job@demo-project.iam.gserviceaccount.com",
        "EMBEDPIPE_VERTEX_ENDPOINT": endpoint,
        **{f"EMBEDPIPE_{k.upper()}": str(v) for k, v in overrides.items()},
    }
    return Settings.from_env(env)


def embed_spec(**overrides) -> JobSpec:
    fields = dict(
        key="20260101t000000-abc123/embed/1",
        container="embedder",
        args=["--dataset=demo", "--run-id=20260101t000000-abc123"],
        base_output_dir="gs://arts/runs/20260101t000000-abc123/embed",
        labels={"run_id": "20260101t000000-ABC123", "stage": "embed"},
        env={"EMBEDPIPE_DATA_BUCKET": "data"},
        image="us-central1-docker.pkg.dev/demo-project/embedpipe/embedder:abc123",
        machine_type="g2-standard-8",
        accelerator_type="NVIDIA_L4",
        accelerator_count=1,
        replica_count=3,
    )
    return JobSpec(**{**fields, **overrides})


HP = {
    "metric": "recall@10",
    "goal": "maximize",
    "max_trials": 6,
    "parallel_trials": 3,
    "parameters": {
        "learning_rate": {"min": 1e-5, "max": 1e-4, "scale": "log"},
        "max_steps": {"min": 20, "max": 200},
        "batch_size": {"values": [16, 32]},
        "base_model": {"values": ["a", "b"]},
    },
}


def train_spec() -> JobSpec:
    return JobSpec(
        key="r9/train/1",
        container="trainer",
        args=["--learning-rate=5e-05", "--batch-size=32", "--seed=42", "--dataset=demo", "--run-id=r9"],
        base_output_dir="gs://arts/runs/r9",
        labels={"run_id": "r9", "stage": "train"},
        image="us-central1-docker.pkg.dev/demo-project/embedpipe/trainer:abc123",
        accelerator_type="NVIDIA_TESLA_T4",
        accelerator_count=1,
        hp_tuning=HP,
    )


def test_label_values_are_sanitized():
    assert label_value("Run/ID 2026.01") == "run-id-2026-01"
    assert len(label_value("x" * 100)) == 63


def test_bad_hp_tuning_specs_fail_before_any_request():
    launcher = VertexJobLauncher(settings(NO_SERVER))
    for bad in ({"parameters": HP["parameters"]}, {**HP, "goal": "up"}, {**HP, "algorithm": "magic"}):
        with pytest.raises(ValueError):
            launcher.hp_tuning_job(JobSpec(**{**train_spec().to_dict(), "hp_tuning": bad}))


def test_missing_image_says_which_setting():
    with pytest.raises(ValueError, match="EMBEDPIPE_EMBEDDER_IMAGE"):
        VertexJobLauncher(settings(NO_SERVER)).custom_job(embed_spec(image=""))


@pytest.mark.parametrize("kind", ["customJobs", "hyperparameterTuningJobs"])
def test_console_url_is_the_jobs_training_page_for_both_kinds(kind):
    url = console_url(f"projects/p1/locations/europe-west4/{kind}/42")
    assert url == "https://console.cloud.google.com/agent-platform/locations/europe-west4/training/42?project=p1"
