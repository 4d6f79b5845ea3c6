"""HP-tuning metric reporting in the cloudml-hypertune format, and the local search over a JobSpec's ``hp_tuning``.

The trainer appends one JSON line per report to ``$CLOUD_ML_HP_METRIC_FILE`` (default
``/tmp/hypertune/output.metrics``), exactly what the ``cloudml-hypertune`` package writes and Vertex AI reads::

    {"global_step": "40", "recall_at_10": "0.91", "timestamp": 1700000000.0, "trial": "2"}

The tag must equal the metric id of the study spec, so metric names are turned into valid tags (``recall@10`` ->
``recall_at_10``) by ``metric_tag`` on both sides.

``hp_tuning`` in a JobSpec (and in a retrain message) is the format ``embedpipe.jobs.vertex`` sends to Vertex::

    {"metric": "recall@10", "goal": "maximize", "max_trials": 3, "parallel_trials": 2,
     "parameters": {"learning_rate": {"min": 1e-5, "max": 1e-3, "scale": "log"},     # double
                    "max_steps": {"type": "integer", "min": 20, "max": 200},         # integer
                    "batch_size": {"values": [8, 16, 32]}}}                          # discrete / categorical

Vertex searches with its own optimiser (``algorithm``); the local job runner draws trials by seeded random search
(``seed``, default 0; the first of every ``values`` list is tried first), which is reproducible. Trial values reach
the trainer as ``--learning-rate=...`` (flag spelling), like Vertex passes them.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from pathlib import Path

from embedpipe.config import Platform, TrainParams, field_types

DEFAULT_METRIC_FILE = "/tmp/hypertune/output.metrics"
GOALS = ("MAXIMIZE", "MINIMIZE")


def metric_tag(name: str) -> str:
    """A metric name as a hypertune tag: letters, digits and underscores (``recall@10`` -> ``recall_at_10``)."""
    tag = re.sub(r"[^0-9A-Za-z_]", "_", name.replace("@", "_at_"))
    return tag if not tag[:1].isdigit() else f"m_{tag}"


def metric_file() -> Path:
    return Path(Platform.from_env().cloud_ml_hp_metric_file or DEFAULT_METRIC_FILE)


def report(metric: str, value: float, global_step: int, path: Path | None = None) -> dict:
    """Append one hypertune line; returns it."""
    path = Path(path or metric_file())
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {
        "global_step": str(global_step),
        metric_tag(metric): str(value),
        "timestamp": time.time(),
        "trial": Platform.from_env().cloud_ml_trial_id,
    }
    with open(path, "a") as fh:
        fh.write(json.dumps(line) + "\n")
    return line


def read_final(path: Path, metric: str) -> float | None:
    """The last reported value of ``metric`` in a hypertune file (what Vertex takes as the trial's result)."""
    if not Path(path).exists():
        return None
    tag, value = metric_tag(metric), None
    for raw in Path(path).read_text().splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if tag in line:
            value = float(line[tag])
    return value


def validate(spec: dict) -> dict:
    """Check an ``hp_tuning`` dict; returns it with defaults filled in. Raises ValueError naming the problem."""
    out = {"goal": "MAXIMIZE", "max_trials": 3, "parallel_trials": 1, "seed": 0, **spec}
    if not out.get("metric"):
        raise ValueError("hp_tuning.metric is required (e.g. 'recall@10')")
    out["goal"] = str(out["goal"]).upper()
    if out["goal"] not in GOALS:
        raise ValueError(f"hp_tuning.goal must be one of {GOALS}, got {out['goal']!r}")
    out["max_trials"], out["parallel_trials"] = int(out["max_trials"]), int(out["parallel_trials"])
    if out["max_trials"] < 1 or out["parallel_trials"] < 1:
        raise ValueError("hp_tuning.max_trials and parallel_trials must be >= 1")
    params = out.get("parameters") or {}
    if not isinstance(params, dict) or not params:
        raise ValueError("hp_tuning.parameters must map at least one parameter name to its range or values")
    for name, p in params.items():
        if "values" in p:
            if not p["values"]:
                raise ValueError(f"hp_tuning parameter {name}: empty values")
        elif "min" not in p or "max" not in p or float(p["min"]) > float(p["max"]):
            raise ValueError(f"hp_tuning parameter {name}: needs values, or min <= max")
        elif p.get("scale", "linear") == "log" and float(p["min"]) <= 0:
            raise ValueError(f"hp_tuning parameter {name}: log scale needs min > 0")
    return out


# What a retrain message's ``hp_tuning`` may hold (``check_spec``). Parameters are the trainer's flags
# (containers/trainer/task.py) with their types: a name or value it cannot parse would fail every trial, after the
# trials were paid for.
TUNABLE = field_types(TrainParams)
SPEC_KEYS = ("metric", "goal", "parameters", "max_trials", "parallel_trials", "max_failed_trials", "algorithm", "seed")
PARAMETER_KEYS = ("type", "min", "max", "scale", "values")
TYPES = ("double", "integer", "discrete", "categorical")
SCALES = ("linear", "log", "reverse_log")  # embedpipe.jobs.vertex maps them to Vertex scale types
ALGORITHMS = ("", "grid", "random")  # "": Vertex's default (Bayesian) search
MAX_TRIALS = 100  # a message must not be able to order an unbounded number of training jobs
MAX_PARALLEL_TRIALS = 10
MAX_VALUES = 100


def _count(spec: dict, key: str, lo: int, hi: int) -> int | None:
    if key not in spec:
        return None
    value = spec[key]
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{key} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _number(value, what: str, integer: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool) or not -1e300 < value < 1e300:  # also NaN, inf and JSON's huge ints
        raise ValueError(f"{what} must be a finite {'integer' if integer else 'number'}, got {value!r}")
    return value


def _check_parameter(name: str, p) -> None:
    where = f"parameter {name!r}"
    if not isinstance(p, dict):
        raise ValueError(f"{where} must be an object with min/max or values, got {type(p).__name__}")
    unknown = sorted(set(p) - set(PARAMETER_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {list(PARAMETER_KEYS)}")
    kind = p.get("type")
    if kind is not None and kind not in TYPES:
        raise ValueError(f"{where}: unknown type {kind!r}; one of {list(TYPES)}")
    flag_kind = TUNABLE[name]
    if "values" in p:
        values = p["values"]
        if "min" in p or "max" in p or kind in ("double", "integer"):
            raise ValueError(f"{where}: give either values (discrete, categorical) or min and max (double, integer)")
        if not isinstance(values, list) or not 1 <= len(values) <= MAX_VALUES:
            raise ValueError(f"{where}: values must be a list of 1 to {MAX_VALUES} items, got {values!r}")
        if flag_kind is str:
            if kind == "discrete" or not all(isinstance(v, str) and v for v in values):
                raise ValueError(f"{where}: values must be non-empty strings (categorical)")
        else:
            if kind == "categorical":
                raise ValueError(f"{where}: takes numbers, so it is discrete, not categorical")
            for v in values:
                _number(v, f"{where}: each value", integer=flag_kind is int)
        if len(set(values)) != len(values):
            raise ValueError(f"{where}: values repeat")
    else:
        if "min" not in p or "max" not in p or kind in ("discrete", "categorical"):
            raise ValueError(f"{where}: needs min and max (double, integer) or values (discrete, categorical)")
        if flag_kind is str:
            raise ValueError(f"{where}: is a string: give its values (categorical)")
        integer = flag_kind is int or kind == "integer"
        if flag_kind is int and kind == "double":
            raise ValueError(f"{where}: takes integers, so its type is integer, not double")
        lo, hi = (_number(p[k], f"{where}: {k}", integer=integer) for k in ("min", "max"))
        if lo > hi:
            raise ValueError(f"{where}: min {lo} > max {hi}")
    scale = p.get("scale", "linear")
    if scale not in SCALES:
        raise ValueError(f"{where}: scale must be one of {list(SCALES)}, got {scale!r}")
    if scale != "linear":
        if flag_kind is str or kind == "categorical":
            raise ValueError(f"{where}: a categorical parameter has no scale")
        if min(p["values"] if "values" in p else [p["min"]]) <= 0:
            raise ValueError(f"{where}: {scale} scale needs values > 0")


def check_spec(spec) -> dict:
    """Check a retrain message's ``hp_tuning`` against the format above (what ``embedpipe.jobs.vertex`` and the local
    job runner consume); returns it unchanged. Raises ValueError naming the problem: unknown keys, a metric the
    trainer does not report, a bad goal, no parameters, a parameter the trainer has no flag for or whose range,
    values, type or scale it cannot take, trial counts that are not positive integers, over their bounds, or more
    parallel trials than trials."""
    from embedpipe.retrieval.evaluation import METRIC_KEYS

    if not isinstance(spec, dict):
        raise ValueError(f"must be a JSON object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; allowed: {list(SPEC_KEYS)}")
    if spec.get("metric") not in METRIC_KEYS:
        raise ValueError(
            f"metric must be one the trainer reports, one of {list(METRIC_KEYS)}; got {spec.get('metric')!r}"
        )
    goal = spec.get("goal", "maximize")
    if not isinstance(goal, str) or goal.upper() not in GOALS:
        raise ValueError(f"goal must be 'maximize' or 'minimize', got {goal!r}")
    algorithm = spec.get("algorithm", "")
    if not isinstance(algorithm, str) or algorithm.lower() not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {[a for a in ALGORITHMS if a]} (or absent), got {algorithm!r}")
    trials = _count(spec, "max_trials", 1, MAX_TRIALS)
    parallel = _count(spec, "parallel_trials", 1, MAX_PARALLEL_TRIALS)
    if trials is not None and parallel is not None and parallel > trials:
        raise ValueError(f"parallel_trials ({parallel}) must not exceed max_trials ({trials})")
    _count(spec, "max_failed_trials", 0, trials or MAX_TRIALS)
    _count(spec, "seed", 0, 2**32 - 1)
    params = spec.get("parameters")
    if not isinstance(params, dict) or not params:
        raise ValueError("parameters must map at least one parameter name to its range or values")
    unknown = sorted(set(params) - set(TUNABLE))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}: the trainer takes {sorted(TUNABLE)}")
    for name, p in params.items():
        _check_parameter(name, p)
    if algorithm.lower() == "grid" and (
        doubles := sorted(n for n, p in params.items() if parameter_kind(p, n) == "double")
    ):
        raise ValueError(
            f"grid search takes only integer, discrete or categorical parameters (Vertex AI refuses the job "
            f"otherwise); {doubles} are continuous (double): give their 'values' instead of min and max"
        )
    return spec


def parameter_kind(p: dict, name: str | None = None) -> str:
    """double | integer | discrete | categorical: the ``type`` given, else what the trainer's flag ``name`` takes
    (a float flag is double even between whole-number bounds, as JSON writers turn 1.0 into 1), else what the
    min/max or values say (ints on both ends: integer)."""
    if p.get("type"):
        return p["type"]
    if "values" in p:
        return "discrete" if all(isinstance(v, int | float) for v in p["values"]) else "categorical"
    if TUNABLE.get(name) is float:
        return "double"
    return "integer" if isinstance(p.get("min"), int) and isinstance(p.get("max"), int) else "double"


def _draw(p: dict, rng: random.Random, first: bool, name: str | None = None):
    if "values" in p:
        return p["values"][0] if first else rng.choice(p["values"])
    lo, hi = float(p["min"]), float(p["max"])
    if p.get("scale", "linear") == "log":
        x = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    else:
        x = rng.uniform(lo, hi)
    return int(round(x)) if parameter_kind(p, name) == "integer" else float(f"{x:.6g}")


def suggest(spec: dict) -> list[dict]:
    """Parameter sets for every trial, in trial order (trial ids are "1", "2", ... like Vertex)."""
    spec = validate(spec)
    rng = random.Random(spec["seed"])
    names = sorted(spec["parameters"])
    return [{n: _draw(spec["parameters"][n], rng, i == 0, n) for n in names} for i in range(spec["max_trials"])]


def flag(name: str) -> str:
    """A parameter as the trainer flag Vertex passes: ``learning_rate`` -> ``--learning-rate``."""
    return "--" + name.replace("_", "-")


def best(trials: list[dict], goal: str) -> dict | None:
    """The best finished trial (``metric`` not None), first on ties."""
    done = [t for t in trials if t.get("metric") is not None]
    if not done:
        return None
    sign = 1 if goal.upper() == "MAXIMIZE" else -1
    return max(done, key=lambda t: (sign * t["metric"], -int(t["id"])))
