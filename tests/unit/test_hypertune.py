"""The cloudml-hypertune metric file format and the local trial search."""

from __future__ import annotations

import json

import pytest

from embedpipe import hypertune


@pytest.mark.parametrize(
    "name,tag", [("recall@10", "recall_at_10"), ("ndcg@10", "ndcg_at_10"), ("mrr", "mrr"), ("1-x", "m_1_x")]
)
def test_metric_tag(name, tag):
    assert hypertune.metric_tag(name) == tag


def test_report_writes_a_hypertune_line(tmp_path, monkeypatch):
    path = tmp_path / "hypertune" / "output.metrics"
    monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(path))
    monkeypatch.setenv("CLOUD_ML_TRIAL_ID", "7")
    hypertune.report("recall@10", 0.5, 10)
    hypertune.report("recall@10", 0.75, 20)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert set(lines[1]) == {"global_step", "recall_at_10", "timestamp", "trial"}
    assert (lines[1]["global_step"], lines[1]["recall_at_10"], lines[1]["trial"]) == ("20", "0.75", "7")
    assert isinstance(lines[1]["timestamp"], float)
    assert hypertune.read_final(path, "recall@10") == 0.75


def test_default_metric_file(monkeypatch):
    monkeypatch.delenv("CLOUD_ML_HP_METRIC_FILE", raising=False)
    assert str(hypertune.metric_file()) == "/tmp/hypertune/output.metrics"


def test_read_final_without_file(tmp_path):
    assert hypertune.read_final(tmp_path / "missing", "recall@10") is None


SPEC = {
    "metric": "recall@10",
    "max_trials": 4,
    "parallel_trials": 2,
    "parameters": {
        "learning_rate": {"min": 1e-5, "max": 1e-3, "scale": "log"},
        "batch_size": {"values": [8, 16]},
        "warmup_steps": {"type": "integer", "min": 0, "max": 10},
        "max_steps": {"min": 2, "max": 9},  # integer bounds: an integer parameter
    },
}


def test_suggest_is_reproducible_and_in_range():
    trials = hypertune.suggest(SPEC)
    assert trials == hypertune.suggest(SPEC) and len(trials) == 4
    assert trials[0]["batch_size"] == 8  # first value of a list is tried first
    for t in trials:
        assert 1e-5 <= t["learning_rate"] <= 1e-3
        assert t["batch_size"] in (8, 16)
        assert isinstance(t["warmup_steps"], int) and 0 <= t["warmup_steps"] <= 10
        assert isinstance(t["max_steps"], int)
    assert hypertune.flag("learning_rate") == "--learning-rate"


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"parameters": {"x": {"values": [1]}}}, "metric"),
        ({"metric": "m", "goal": "UP", "parameters": {"x": {"values": [1]}}}, "goal"),
        ({"metric": "m", "parameters": {}}, "parameters"),
        ({"metric": "m", "parameters": {"x": {"min": 2, "max": 1}}}, "min <= max"),
        ({"metric": "m", "parameters": {"x": {"min": 0, "max": 1, "scale": "log"}}}, "log"),
        ({"metric": "m", "max_trials": 0, "parameters": {"x": {"values": [1]}}}, ">= 1"),
    ],
)
def test_validate_names_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        hypertune.validate(bad)


def test_best_by_goal():
    trials = [
        {"id": "1", "metric": 0.2},
        {"id": "2", "metric": 0.5},
        {"id": "3", "metric": None},
        {"id": "4", "metric": 0.5},
    ]
    assert hypertune.best(trials, "MAXIMIZE")["id"] == "2"
    assert hypertune.best(trials, "minimize")["id"] == "1"
    assert hypertune.best([{"id": "1", "metric": None}], "MAXIMIZE") is None
