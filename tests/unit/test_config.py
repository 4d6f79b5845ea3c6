"""embedpipe.config: Settings from EMBEDPIPE_* env vars."""

from __future__ import annotations

import dataclasses
import os

import pytest

from embedpipe.config import Settings, SettingsError


def test_defaults_are_local_first():
    s = Settings.from_env({})
    assert s == Settings()
    assert s.mode == "local"
    assert s.project == "embedpipe-local"
    assert (s.data_bucket, s.artifacts_bucket) == ("embedpipe-data", "embedpipe-artifacts")
    assert s.milvus_uri == "http://127.0.0.1:19530"
    assert s.debounce_s == 0.3 and s.launch_wait_s == 10.0
    assert s.max_job_attempts == 2
    assert s.trainer_image == "" and s.embedder_image == ""


def test_settings_are_frozen():
    s = Settings.from_env({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.mode = "gcp"  # type: ignore[misc]


def test_values_are_coerced_to_the_field_type():
    s = Settings.from_env(
        {
            "EMBEDPIPE_MAX_JOB_ATTEMPTS": "5",
            "EMBEDPIPE_PUBSUB_PORT": "18085",
            "EMBEDPIPE_LEARNING_RATE": "3e-5",
            "EMBEDPIPE_DEBOUNCE_S": "0",
            "EMBEDPIPE_DATA_BUCKET": "my-data",
        }
    )
    assert s.max_job_attempts == 5 and type(s.max_job_attempts) is int
    assert s.pubsub_port == 18085 and type(s.pubsub_port) is int
    assert s.learning_rate == 3e-5 and type(s.learning_rate) is float
    assert s.debounce_s == 0.0 and type(s.debounce_s) is float
    assert s.data_bucket == "my-data"


def test_empty_values_and_unrelated_vars_are_ignored():
    s = Settings.from_env({"EMBEDPIPE_MAX_JOB_ATTEMPTS": "", "MAX_JOB_ATTEMPTS": "9", "embedpipe_mode": "gcp"})
    assert s == Settings()


def test_reads_os_environ_by_default(monkeypatch):
    for key in [k for k in os.environ if k.startswith("EMBEDPIPE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("EMBEDPIPE_SEED", "7")
    assert Settings.from_env().seed == 7


@pytest.mark.parametrize(
    ("var", "raw", "kind"),
    [
        ("EMBEDPIPE_MAX_JOB_ATTEMPTS", "two", "int"),
        ("EMBEDPIPE_SEED", "4.5", "int"),
        ("EMBEDPIPE_TICK_S", "1s", "float"),
    ],
)
def test_malformed_number_names_the_env_var(var, raw, kind):
    with pytest.raises(SettingsError) as err:
        Settings.from_env({var: raw})
    assert str(err.value).startswith(f"{var}={raw!r} is not a valid {kind}")


def test_gcp_mode_requires_images():
    with pytest.raises(SettingsError, match="EMBEDPIPE_TRAINER_IMAGE is required in gcp mode"):
        Settings.from_env({"EMBEDPIPE_MODE": "gcp"})
    with pytest.raises(SettingsError, match="EMBEDPIPE_EMBEDDER_IMAGE is required in gcp mode"):
        Settings.from_env({"EMBEDPIPE_MODE": "gcp", "EMBEDPIPE_TRAINER_IMAGE": "us-docker.pkg.dev/p/r/trainer:1"})
    s = Settings.from_env(
        {
            "EMBEDPIPE_MODE": "gcp",
            "EMBEDPIPE_TRAINER_IMAGE": "us-docker.pkg.dev/p/r/trainer:1",
            "EMBEDPIPE_EMBEDDER_IMAGE": "us-docker.pkg.dev/p/r/embedder:1",
        }
    )
    assert s.mode == "gcp"
    assert s.emulator_env() == {}


def test_unknown_mode_is_rejected():
    with pytest.raises(SettingsError, match="EMBEDPIPE_MODE must be 'local' or 'gcp', not 'cloud'"):
        Settings.from_env({"EMBEDPIPE_MODE": "cloud"})


@pytest.mark.parametrize("value", ["-1", "31"])
def test_launch_wait_stays_within_the_tick_ack_deadline(value):
    with pytest.raises(SettingsError, match="EMBEDPIPE_LAUNCH_WAIT_S must be within"):
        Settings.from_env({"EMBEDPIPE_LAUNCH_WAIT_S": value})


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_gate_tolerance_must_be_a_fraction(value):
    with pytest.raises(SettingsError, match="EMBEDPIPE_GATE_TOLERANCE must be within"):
        Settings.from_env({"EMBEDPIPE_GATE_TOLERANCE": value})


def test_to_env_round_trip():
    s = dataclasses.replace(
        Settings.from_env({}),
        project="p1",
        data_bucket="d",
        debounce_s=0.25,
        learning_rate=3e-5,
        max_job_attempts=4,
        milvus_token="secret",
        base_model="/models/minilm",
    )
    env = s.to_env()
    assert all(k.startswith("EMBEDPIPE_") for k in env)
    assert env["EMBEDPIPE_MAX_JOB_ATTEMPTS"] == "4"
    assert Settings.from_env(env) == s


def test_to_env_drops_empty_values():
    env = Settings.from_env({}).to_env()
    assert "EMBEDPIPE_TRAINER_IMAGE" not in env
    assert "EMBEDPIPE_MILVUS_TOKEN" not in env
    assert Settings.from_env(env) == Settings.from_env({})


def test_milvus_token_is_not_in_repr():
    assert "secret" not in repr(dataclasses.replace(Settings(), milvus_token="secret"))


def test_emulator_env_points_at_local_ports():
    s = Settings.from_env({"EMBEDPIPE_PUBSUB_PORT": "18085", "EMBEDPIPE_GCS_PORT": "14443"})
    assert s.emulator_env() == {
        "PUBSUB_EMULATOR_HOST": "127.0.0.1:18085",
        "STORAGE_EMULATOR_HOST": "http://127.0.0.1:14443",
        "BIGQUERY_EMULATOR_HOST": "http://127.0.0.1:9050",
        "GOOGLE_CLOUD_PROJECT": "embedpipe-local",
    }


def test_each_training_knob_has_one_definition_and_one_env_name():
    """TrainKnobs defines each knob; Settings names it (TRAIN_SETTING) with the same default and type; the
    retrain overrides and the trainer's parameters are derived from the same fields."""
    from embedpipe.config import TRAIN_OVERRIDES, TRAIN_SETTING, TrainKnobs, TrainParams, field_types

    settings_fields = {f.name: f for f in dataclasses.fields(Settings)}
    assert set(TRAIN_SETTING) == set(field_types(TrainKnobs)) == set(TRAIN_OVERRIDES)
    for knob, kind in field_types(TrainKnobs).items():
        f = settings_fields[TRAIN_SETTING[knob]]
        assert (type(f.default), f.default) == (kind, getattr(TrainKnobs, knob)), knob
    assert Settings().train_knobs == TrainKnobs()
    assert set(field_types(TrainParams)) >= set(TRAIN_OVERRIDES)
    env = {"EMBEDPIPE_TRAIN_BATCH_SIZE": "8", "EMBEDPIPE_LEARNING_RATE": "0.001"}
    knobs = Settings.from_env(env).train_knobs
    assert (knobs.batch_size, knobs.learning_rate) == (8, 0.001)


# ---------------------------------------------------------------- retrain overrides: one check, CLI and handler


def test_check_overrides_types_and_bounds_each_knob():
    from embedpipe.config import check_overrides

    assert check_overrides({"learning_rate": "3e-5", "epochs": 2, "batch_size": 16.0}) == {
        "learning_rate": 3e-5,
        "epochs": 2,
        "batch_size": 16,
    }
    for bad, why in [
        ({"lr": 3e-5}, r"unknown override\(s\) \['lr'\]; allowed: \[.*'learning_rate'"),
        ({"learning_rate": "fast"}, "learning_rate='fast' is not a valid float"),
        ({"epochs": 2.5}, "epochs=2.5 is not a valid int"),  # not silently truncated to 2
        ({"epochs": True}, "is not a valid int"),
        ({"epochs": 0}, r"epochs=0 is outside \[1, no limit\]"),
        ({"batch_size": 1}, "batch_size=1 is outside"),  # in-batch negatives need two
        ({"learning_rate": -1}, "learning_rate=-1 is outside"),
        ({"warmup_ratio": 1.5}, "warmup_ratio=1.5 is outside"),
        ({"base_model": "bundled:nope"}, "override base_model: .*unknown bundled model"),
    ]:
        with pytest.raises(ValueError, match=why):
            check_overrides(bad)
