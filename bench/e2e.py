"""Orchestration overhead for the demo dataset on a local stack (free ports, own state dir): wall time from
``embedpipe upload --wait`` to index-updated, minus the time inside the jobs (the job runner's started..finished of
each job) and inside the indexer's Milvus calls (``milvus_seconds`` of the event). Training is cut to a few steps
(EMBEDPIPE_TRAIN_MAX_STEPS, default 10 here): the overhead does not depend on it."""

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

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)

    ok = False
    try:
        up = cli("up")
        if up.returncode:  # e.g. a component's port was taken meanwhile; down still stops what did start
            raise RuntimeError(up.stderr[-2000:])
        t0 = time.time()
        res = cli("upload", "examples/demo/data", "--dataset", "demo", "--wait", "--timeout", "1500")
        total = time.time() - t0
        if res.returncode:
            raise RuntimeError(res.stderr[-3000:])
        data = json.loads(res.stdout)["data"]
        in_jobs = 0.0
        for st in (state / "jobs").glob("*/state.json"):
            s = json.loads(st.read_text())
            if s.get("started") and s.get("finished"):
                in_jobs += s["finished"] - s["started"]
        overhead = total - in_jobs - data["milvus_seconds"]
        print(
            f"demo: total {total:.1f}s, jobs {in_jobs:.1f}s, milvus {data['milvus_seconds']:.1f}s; "
            f"dense {data['metrics_by_mode'].get('dense')} hybrid {data['metrics_by_mode'].get('hybrid')}",
            file=sys.stderr,
        )
        ok = True
        return {"overhead_s": round(overhead, 2), "total_s": round(total, 2)}
    finally:
        cli("down")
        if ok:  # a failed run's state folder is kept for its logs, as bench/scale.py does
            shutil.rmtree(state, ignore_errors=True)
        else:
            print(f"e2e: state and logs kept in {state}", file=sys.stderr)
