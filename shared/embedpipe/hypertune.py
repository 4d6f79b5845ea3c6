"""HP-tuning metric reporting in the cloudml-hypertune format, and the local search over a JobSpec's ``hp_tuning``.

The trainer appends one JSON line per report to ``$CLOUD_ML_HP_METRIC_FILE`` (default
``/tmp/hypertune/output.metrics``), exactly what the ``cloudml-hypertune`` package writes and Vertex AI reads::

    {"global_step": "40", "recall_at_10": "0.91", "timestamp": 1700000000.0, "trial": "2"}

The tag must equal the metric id of the study spec, so metric names are turned into valid tags (``recall@10`` ->
``recall_at_10``) by ``metric_tag`` on both sides.

``hp_tuning`` in a JobSpec (and in a retrain message) is the format ``embedpipe.vertex`` sends to Vertex::

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
import os
import random
import re
import time
from pathlib import Path

DEFAULT_METRIC_FILE = "/tmp/hypertune/output.metrics"
GOALS = ("MAXIMIZE", "MINIMIZE")


def metric_tag(name: str) -> str:
    """A metric name as a hypertune tag: letters, digits and underscores (``recall@10`` -> ``recall_at_10``)."""
    tag = re.sub(r"[^0-9A-Za-z_]", "_", name.replace("@", "_at_"))
    return tag if not tag[:1].isdigit() else f"m_{tag}"


def metric_file() -> Path:
    return Path(os.environ.get("CLOUD_ML_HP_METRIC_FILE") or DEFAULT_METRIC_FILE)


def report(metric: str, value: float, global_step: int, path: Path | None = None) -> dict:
    """Append one hypertune line; returns it."""
    path = Path(path or metric_file())
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {
        "global_step": str(global_step),
        metric_tag(metric): str(value),
        "timestamp": time.time(),
        "trial": os.environ.get("CLOUD_ML_TRIAL_ID", ""),
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


def _draw(p: dict, rng: random.Random, first: bool):
    if "values" in p:
        return p["values"][0] if first else rng.choice(p["values"])
    lo, hi = float(p["min"]), float(p["max"])
    if p.get("scale", "linear") == "log":
        x = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    else:
        x = rng.uniform(lo, hi)
    integer = p.get("type") == "integer" or (
        p.get("type") is None and isinstance(p["min"], int) and isinstance(p["max"], int)
    )
    return int(round(x)) if integer else float(f"{x:.6g}")


def suggest(spec: dict) -> list[dict]:
    """Parameter sets for every trial, in trial order (trial ids are "1", "2", ... like Vertex)."""
    spec = validate(spec)
    rng = random.Random(spec["seed"])
    names = sorted(spec["parameters"])
    return [{n: _draw(spec["parameters"][n], rng, i == 0) for n in names} for i in range(spec["max_trials"])]


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
