"""The local job runner: ``python -m embedpipe.jobrunner JOB_DIR``, started detached by LocalJobLauncher.

Runs ``containers/<container>/task.py`` once per replica with the Vertex container contract, records the job's
state, then publishes to ``job-events`` the same ml_job LogEntry a Cloud Logging sink routes on GCP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from embedpipe import bus, events, topology
from embedpipe.config import Settings, repo_root
from embedpipe.jobs import CANCELLED, FAILED, RUNNING, SUCCEEDED, _write_state


def replica_env(spec: dict, index: int, port: int) -> dict[str, str]:
    """Env of one replica: Vertex's AIP_* dirs and a CLUSTER_SPEC naming pool 0 (primary) and pool 1 (workers)."""
    base = spec["base_output_dir"].rstrip("/")
    n = spec["replica_count"]
    cluster = {"workerpool0": [f"127.0.0.1:{port}"]}
    if n > 1:
        cluster["workerpool1"] = [f"127.0.0.1:{port + i}" for i in range(1, n)]
    task = {"type": "workerpool0", "index": 0} if index == 0 else {"type": "workerpool1", "index": index - 1}
    return {
        "AIP_MODEL_DIR": f"{base}/model/",
        "AIP_CHECKPOINT_DIR": f"{base}/checkpoints/",
        "AIP_TENSORBOARD_LOG_DIR": f"{base}/logs/",
        "CLUSTER_SPEC": json.dumps({"cluster": cluster, "task": task, "environment": "cloud"}),
        "CLOUD_ML_JOB_ID": spec["name"].rsplit("/", 1)[-1],
        **spec.get("env", {}),
    }


def run(job_dir: Path) -> str:
    spec = json.loads((job_dir / "spec.json").read_text())
    settings = Settings.from_env()
    script = repo_root() / "containers" / spec["container"] / "task.py"
    port = 29500 + int(spec["name"].rsplit("/", 1)[-1]) % 1000
    _write_state(job_dir, RUNNING, started=time.time())
    procs = []
    for i in range(spec["replica_count"]):
        log_file = open(job_dir / f"replica-{i}.log", "ab")
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), *spec["args"]],
                env={**os.environ, **replica_env(spec, i, port)},
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=repo_root(),
            )
        )

    def on_term(signum, frame):
        for p in procs:
            p.terminate()
        _write_state(job_dir, CANCELLED, "cancelled")
        sys.exit(1)

    signal.signal(signal.SIGTERM, on_term)
    codes = [p.wait() for p in procs]
    if all(c == 0 for c in codes):
        state, error = SUCCEEDED, ""
    else:
        bad = next(i for i, c in enumerate(codes) if c != 0)
        tail = (job_dir / f"replica-{bad}.log").read_text(errors="replace").strip().splitlines()[-15:]
        state, error = FAILED, f"replica {bad} exited with code {codes[bad]}: " + "\n".join(tail)
    _write_state(job_dir, state, error, finished=time.time())
    message = "Job completed successfully." if state == SUCCEEDED else f"Job failed. {error[-500:]}"
    entry = events.job_log_entry(spec["name"].rsplit("/", 1)[-1], state, message, settings.project)
    bus.publish_raw(settings.project, topology.JOB_EVENTS, json.dumps(entry).encode())
    return state


if __name__ == "__main__":
    sys.exit(0 if run(Path(sys.argv[1])) == SUCCEEDED else 1)
