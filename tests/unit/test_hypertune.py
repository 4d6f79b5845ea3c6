"""The cloudml-hypertune metric file format and the local trial search."""

from __future__ import annotations

import json

import pytest

from embedpipe.jobs import hypertune


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


# ---------------------------------------------------------------- check_spec: a retrain message's hp_tuning

GOOD = {  # every key and parameter form the format has (vertex.py's docstring example)
    "metric": "recall@10",
    "goal": "maximize",
    "max_trials": 8,
    "parallel_trials": 2,
    "max_failed_trials": 1,
    "algorithm": "random",
    "seed": 3,
    "parameters": {
        "learning_rate": {"min": 1e-5, "max": 1e-4, "scale": "log"},
        "max_steps": {"type": "integer", "min": 20, "max": 200},
        "warmup_ratio": {"type": "double", "min": 0.0, "max": 0.2},
        "batch_size": {"values": [16, 32, 64]},
        "base_model": {"values": ["a", "b"]},
    },
}


def with_(**changes) -> dict:
    return {**GOOD, **changes}


def param(**p) -> dict:
    return with_(parameters={**GOOD["parameters"], **p})


def test_check_spec_accepts_the_documented_format():
    assert hypertune.check_spec(GOOD) == GOOD
    minimal = {"metric": "ndcg@10", "parameters": {"learning_rate": {"min": 1e-5, "max": 1e-3}}}
    assert hypertune.check_spec(minimal) == minimal
    assert hypertune.suggest(GOOD)  # and what it accepts, the local runner can run


@pytest.mark.parametrize(
    "bad,match",
    [
        (["metric"], "must be a JSON object, got list"),
        (with_(max_trial=3), r"unknown key\(s\) \['max_trial'\]"),
        ({k: v for k, v in GOOD.items() if k != "metric"}, "metric must be one the trainer reports"),
        (with_(metric="accuracy"), "metric must be one the trainer reports.*'accuracy'"),
        (with_(goal="up"), "goal must be 'maximize' or 'minimize'"),
        (with_(goal=1), "goal must be"),
        (with_(algorithm="bayes"), "algorithm must be one of"),
        ({k: v for k, v in GOOD.items() if k != "parameters"}, "parameters must map"),
        (with_(parameters={}), "parameters must map"),
        (with_(parameters=[{"learning_rate": {}}]), "parameters must map"),
        (param(dropout={"min": 0.0, "max": 0.5}), r"unknown parameter\(s\) \['dropout'\]"),
        (param(learning_rate=0.001), "parameter 'learning_rate' must be an object"),
        (param(learning_rate={"min": 1e-5, "max": 1e-3, "step": 2}), r"unknown key\(s\) \['step'\]"),
        (param(learning_rate={"type": "float", "min": 1e-5, "max": 1e-3}), "unknown type 'float'"),
        (param(learning_rate={"min": 1e-3, "max": 1e-5}), "min 0.001 > max 1e-05"),
        (param(learning_rate={"min": 1e-3}), "needs min and max"),
        (param(learning_rate={"min": "0.1", "max": 1.0}), "min must be a finite number"),
        (param(learning_rate={"min": 0.0, "max": float("inf")}), "max must be a finite number"),
        (param(learning_rate={"min": 0.0, "max": 1e-3, "scale": "log"}), "log scale needs values > 0"),
        (param(learning_rate={"min": 1e-5, "max": 1e-3, "scale": "exp"}), "scale must be one of"),
        (param(learning_rate={"min": 1e-5, "max": 1e-3, "values": [1e-4]}), "either values"),
        (param(batch_size={"values": []}), "values must be a list of 1 to 100 items"),
        (param(batch_size={"values": list(range(1, 102))}), "values must be a list of 1 to 100 items"),
        (param(batch_size={"values": ["16", "32"]}), "each value must be a finite integer"),
        (param(batch_size={"values": [16, 16.5]}), "each value must be a finite integer"),
        (param(batch_size={"values": [16, 16]}), "values repeat"),
        (param(batch_size={"min": 8.0, "max": 64.5}), "min must be a finite integer"),
        (param(batch_size={"type": "double", "min": 8, "max": 64}), "type is integer, not double"),
        (param(batch_size={"type": "categorical", "values": [8, 16]}), "discrete, not categorical"),
        (param(base_model={"values": [1, 2]}), "non-empty strings"),
        (param(base_model={"min": 1, "max": 2}), "give its values"),
        (param(base_model={"values": ["a"], "scale": "log"}), "no scale"),
        (with_(max_trials=0), r"max_trials must be an integer in \[1, 100\], got 0"),
        (with_(max_trials=1000), r"max_trials must be an integer in \[1, 100\]"),
        (with_(max_trials="8"), "max_trials must be an integer"),
        (with_(max_trials=True), "max_trials must be an integer"),
        (with_(parallel_trials=None), "parallel_trials must be an integer"),
        (with_(parallel_trials=-1), r"parallel_trials must be an integer in \[1, 10\]"),
        (with_(parallel_trials=50), r"parallel_trials must be an integer in \[1, 10\]"),
        (with_(max_trials=2, parallel_trials=3), r"parallel_trials \(3\) must not exceed max_trials \(2\)"),
        (with_(max_failed_trials=9), r"max_failed_trials must be an integer in \[0, 8\]"),
        (with_(seed=-1), "seed must be an integer"),
    ],
)
def test_check_spec_names_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        hypertune.check_spec(bad)


def test_every_tunable_parameter_is_a_trainer_flag_of_its_type():
    """check_spec's parameter list is the trainer's: each name parses as the flag a trial passes, to its type."""
    from tests.helpers import container_task

    task = container_task("trainer")
    sample = {int: 7, float: 0.5, str: "some/model"}
    base = ["--dataset=d", "--run-id=r", "--base-model=m"]
    args = task.parse_args(base + [f"{hypertune.flag(n)}={sample[k]}" for n, k in hypertune.TUNABLE.items()])
    assert {n: getattr(args, n) for n in hypertune.TUNABLE} == {n: sample[k] for n, k in hypertune.TUNABLE.items()}


def test_the_trainer_parses_the_argv_vertex_sends_for_a_trial():
    """Vertex AI appends ``--<parameter_id>=<value>`` per trial, and sends INTEGER and DISCRETE values as doubles
    (``32.0``): an int-typed flag must take them (argparse's ``type=int`` exits with status 2 on every trial)."""
    from tests.helpers import container_task

    task = container_task("trainer")
    argv = ["--dataset=d", "--run-id=r", "--base-model=m", "--batch-size=32.0", "--max-steps=200.0"]
    args = task.parse_args(argv + ["--learning-rate=3.0e-05", "--warmup-ratio=0.1"])
    assert (args.batch_size, args.max_steps, args.learning_rate) == (32, 200, 3e-05)
    assert isinstance(args.batch_size, int)
    with pytest.raises(SystemExit):  # a fractional value for an integer parameter is still refused
        task.parse_args(argv[:3] + ["--batch-size=32.5"])
    assert task.parse_args(argv[:3] + ["--seed=9223372036854775809"]).seed == 9223372036854775809  # exact


def test_grid_search_over_a_continuous_parameter_is_refused_before_vertex_refuses_it():
    """Issue 27.2: Vertex AI refuses a grid search with a DOUBLE parameter at launch ("all parameters must be
    INTEGER, CATEGORICAL, or DISCRETE"); the retrain request is refused with that reason instead."""
    with pytest.raises(
        ValueError, match=r"grid search takes only .*\['learning_rate', 'warmup_ratio'\] are continuous"
    ):
        hypertune.check_spec(with_(algorithm="grid"))
    grid = param(learning_rate={"values": [1e-5, 3e-5]}, warmup_ratio={"values": [0.0, 0.1]})
    assert hypertune.check_spec({**grid, "algorithm": "GRID"})["algorithm"] == "GRID"
    assert hypertune.parameter_kind({"min": 20, "max": 200}) == "integer"  # what the Vertex spec sends too
    assert hypertune.parameter_kind({"min": 0, "max": 1.5}) == "double"
    # a float flag stays continuous between whole-number bounds (JSON writers turn 1.0 into 1)
    assert hypertune.parameter_kind({"min": 0, "max": 1}, "warmup_ratio") == "double"
    with pytest.raises(ValueError, match=r"\['warmup_ratio'\] are continuous"):
        hypertune.check_spec(
            {"metric": "ndcg@10", "algorithm": "grid", "parameters": {"warmup_ratio": {"min": 0, "max": 1}}}
        )
