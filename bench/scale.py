"""Scale: generated corpora (``bench/corpus_gen.py``) of ``EMBEDPIPE_BENCH_SCALE`` documents each (comma-separated,
default ``10000,100000``; the issue's goal includes 1000000, set it to run that) through the real local stack:
upload -> train (``EMBEDPIPE_TRAIN_MAX_STEPS`` steps, 10 here) -> embed -> index -> eval -> index-updated, with the
tiny random BERT the tests use (2 layers, 32 wide: the pipeline's cost, not a model's).

Reported per size and stage: seconds (the run record's stage times) and documents per second; peak resident memory
of each job (the job runner's ``max_rss_mb``: its largest replica) and of each long-running component (``VmHWM`` of
its process, functions-framework for functions and services) beside the size it is deployed with
(``deploy.SIZING``; jobs: ``JOB_CAP_MB``). Memory is measured, not capped: an OS cap (``RLIMIT_AS``) kills a torch
process for its virtual reservations long before its resident memory is near the cap, so over-size is reported
(``over_cap``) instead. Per-document time growth between the two largest sizes is reported as ``growth``
(goal <= 1.3).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.corpus_gen import generate
from bench.e2e import stack_env
from bench.run import ROOT

JOB_CAP_MB = 16 * 1024  # the stated cap for a job replica (an n1-standard-4 has 15 GiB; GPU machines have more)


def _mb(size: str) -> float:
    m = re.fullmatch(r"(\d+)(Mi|Gi)", size)
    return float(m[1]) * (1024 if m[2] == "Gi" else 1)


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _tree_peak_mb(root: int) -> float | None:
    """The largest VmHWM among ``root`` and its descendants (functions-framework serves from a gunicorn worker,
    a child of the process the stack started)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, grew = {root}, True
    while grew:
        more = {p for p, pp in parents.items() if pp in tree and p not in tree}
        tree |= more
        grew = bool(more)
    peaks = [v for v in map(_peak_rss_mb, tree) if v is not None]
    return max(peaks) if peaks else None


def one(n: int, model: str) -> dict:
    from embedpipe import deploy

    state = Path(tempfile.mkdtemp(prefix=f"bench-scale-{n}-"))
    data = generate(state / "data", n)
    env = stack_env(
        state,
        EMBEDPIPE_BASE_MODEL=model,
        EMBEDPIPE_MAX_SEQ_LENGTH="32",
        EMBEDPIPE_GATE_TOLERANCE="1.0",  # a random model: the loop's cost is measured, not its quality
    )
    exe = str(Path(sys.executable).parent / "embedpipe")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=7200, cwd=ROOT)

    try:
        up = cli("up")
        if up.returncode:
            raise RuntimeError(up.stderr[-2000:])
        t0 = time.time()
        res = cli("upload", str(data), "--dataset", "scale", "--wait", "--timeout", "7000")
        total = time.time() - t0
        if res.returncode:
            raise RuntimeError(res.stderr[-3000:])
        event = json.loads(res.stdout)["data"]
        components = {}
        for pid_file in sorted((state / "pids").glob("*.pid")):
            name = pid_file.stem
            if name in deploy.SIZING:
                peak = _tree_peak_mb(int(pid_file.read_text()))
                cap = _mb(deploy.SIZING[name]["memory"])
                components[name] = {"peak_rss_mb": peak, "cap_mb": cap, "over_cap": bool(peak and peak > cap)}
        jobs = {}
        for st in sorted((state / "jobs").glob("*/state.json")):
            s = json.loads(st.read_text())
            spec = json.loads((st.parent / "spec.json").read_text())
            stage = spec.get("labels", {}).get("stage", st.parent.name)
            jobs[stage] = {
                "seconds": round(s["finished"] - s["started"], 2),
                "peak_rss_mb": s.get("max_rss_mb"),
                "cap_mb": JOB_CAP_MB,
                "over_cap": bool(s.get("max_rss_mb") and s["max_rss_mb"] > JOB_CAP_MB),
            }
    finally:
        cli("down")
    stages = {k: v for k, v in (event.get("stage_seconds") or {}).items()}
    out = {"documents": n, "total_s": round(total, 2), "stages": stages, "jobs": jobs, "components": components}
    out["docs_per_s"] = {k: round(n / v, 1) for k, v in stages.items() if v and k in ("embedding", "index")}
    print(f"scale {n}: {json.dumps(out)}", file=sys.stderr)
    return out


def run() -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.helpers import build_tiny_model

    sizes = [int(x) for x in os.environ.get("EMBEDPIPE_BENCH_SCALE", "10000,100000").split(",") if x.strip()]
    model = str(build_tiny_model(Path(tempfile.mkdtemp(prefix="bench-scale-model-"))))
    per = {n: one(n, model) for n in sizes}
    flat: dict = {}
    for n, r in per.items():
        flat[f"{n}_total_s"] = r["total_s"]
        for stage, secs in r["stages"].items():
            flat[f"{n}_{stage}_s"] = secs
        for stage, rate in r["docs_per_s"].items():
            flat[f"{n}_{stage}_docs_per_s"] = rate
        for name, j in r["jobs"].items():
            flat[f"{n}_job_{name}_peak_mb"] = j["peak_rss_mb"]
        for name, c in r["components"].items():
            flat[f"{n}_{name}_peak_mb"] = c["peak_rss_mb"]
        over = [k for k, j in r["jobs"].items() if j["over_cap"]]
        over += [k for k, c in r["components"].items() if c["over_cap"]]
        flat[f"{n}_over_cap"] = ",".join(sorted(over)) or "none"
    if len(sizes) >= 2:
        a, b = sorted(sizes)[-2:]
        per_doc = {n: (per[n]["stages"].get("embedding", 0) + per[n]["stages"].get("index", 0)) / n for n in (a, b)}
        if per_doc[a]:
            flat["growth_embed_index_per_doc"] = round(per_doc[b] / per_doc[a], 3)
            flat["growth_goal"] = 1.3
    (ROOT / "bench-scale.json").write_text(json.dumps(per, indent=1) + "\n")
    return flat
