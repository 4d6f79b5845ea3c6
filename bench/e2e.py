"""Orchestration overhead for the demo dataset on a local stack (free ports, own state dir): the wall time of
``embedpipe upload --wait`` (from starting the CLI until it exits with the index-updated event), minus the work of
the three stages: the time inside the jobs (the job runner's started..finished of each job) and the index stage's own
work (``stage_seconds["index"]`` of the event: the indexer's time from taking the request to building the event, i.e.
reading the shards, the Milvus load, evaluating every search mode and the baselines, gating, the alias swap and
retention). What is left is orchestration: the CLI's start-up, pre-check and uploads, the upload notifications and
handlers, the debounce, launching, each job runner's start-up, job-completion events, the index request, the
indexer's ledger moves and publishing, and the CLI noticing the end. Training is cut to a few steps
(EMBEDPIPE_TRAIN_MAX_STEPS, default 10 here): the overhead does not depend on it.

Until 2026-11-30 only the indexer's Milvus calls (``milvus_seconds``) were taken out, so its own evaluation work
(the base model's exact top-k over the shards, hybrid fusion, metrics; ~0.3-0.5 s for the demo here) and the reading of
the shards counted as orchestration, while the same kind of work inside a job (the trainer scores the base model on
the selection split) did not. ``overhead_with_index_work_s`` is that former figure, kept for comparison."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.run import ROOT
from embedpipe.local.stack import isolated_ports


def stack_env(state: Path, **extra: str) -> dict[str, str]:
    """The environment of an isolated local stack for a bench: own state dir and ports, nothing inherited that
    would point it at another stack, training cut to a few steps (the benches measure the loop, not a model)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPIPE_") and "EMULATOR_HOST" not in k}
    env.update(
        {
            "EMBEDPIPE_STATE_DIR": str(state),
            "EMBEDPIPE_PROJECT": "embedpipe-bench",
            **isolated_ports().env(),
            "EMBEDPIPE_TRAIN_MAX_STEPS": os.environ.get("EMBEDPIPE_TRAIN_MAX_STEPS", "10"),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            **extra,
        }
    )
    return env


def run() -> dict:
    state = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    env = stack_env(state)
    exe = str(Path(sys.executable).parent / "embedpipe")

    def cli(*args: str) -> subprocess.CompletedProcess:  # no time limit: a slow machine's run is waited for
        return subprocess.run([exe, *args], env=env, capture_output=True, text=True, cwd=ROOT)

    ok = False
    try:
        up = cli("up")
        if up.returncode:  # e.g. a component's port was taken meanwhile; down still stops what did start
            raise RuntimeError(up.stderr[-2000:])
        t0 = time.time()
        res = cli("upload", "examples/demo/data", "--dataset", "demo", "--wait", "--timeout", "0")
        total = time.time() - t0
        if res.returncode:
            raise RuntimeError(res.stderr[-3000:])
        data = json.loads(res.stdout)["data"]
        in_jobs = 0.0
        for st in (state / "jobs").glob("*/state.json"):
            s = json.loads(st.read_text())
            if s.get("started") and s.get("finished"):
                in_jobs += s["finished"] - s["started"]
        in_index = data["stage_seconds"]["index"]
        overhead = total - in_jobs - in_index
        print(
            f"demo: total {total:.2f}s, jobs {in_jobs:.2f}s, index stage {in_index:.2f}s (Milvus "
            f"{data['milvus_seconds']:.2f}s), overhead {overhead:.2f}s; "
            f"dense {data['metrics_by_mode'].get('dense')} hybrid {data['metrics_by_mode'].get('hybrid')}",
            file=sys.stderr,
        )
        ok = True
        return {
            "overhead_s": round(overhead, 2),
            "overhead_with_index_work_s": round(total - in_jobs - data["milvus_seconds"], 2),
            "total_s": round(total, 2),
        }
    finally:
        cli("down")
        if ok:  # a failed run's state folder is kept for its logs, as bench/scale.py does
            shutil.rmtree(state, ignore_errors=True)
        else:
            print(f"e2e: state and logs kept in {state}", file=sys.stderr)
