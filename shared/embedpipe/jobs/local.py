"""The local backend of the ``JobLauncher`` protocol (``spec``; Vertex AI is ``vertex``).

``LocalJobLauncher`` runs the same container entrypoint (``containers/<container>/task.py``) as a detached process
with the Vertex container contract (``AIP_MODEL_DIR``, ``AIP_CHECKPOINT_DIR``, ``AIP_TENSORBOARD_LOG_DIR``,
``CLUSTER_SPEC``, ``CLOUD_ML_TRIAL_ID``), keeps job state under ``<state_dir>/jobs/<job_id>/`` where ``get()`` reads
it, and on exit publishes to ``job-events`` the LogEntry a Cloud Logging sink would (see ``embedpipe.jobs.runner``).
Submitting is keyed: the same ``JobSpec.key`` always maps to the same job, so a retried launch never runs twice.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from embedpipe.config import Settings, process_env, repo_root
from embedpipe.jobs.spec import CANCELLED, FAILED, QUEUED, TERMINAL, JobSpec, JobStatus

log = logging.getLogger(__name__)

NEVER_STARTED_S = 60.0  # a QUEUED local job with no runner after this long lost its launcher


def pid_alive(pid: int) -> bool:
    """Whether a process runs (a zombie, or one that vanished while we looked, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class LocalJobLauncher:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = settings.state_path / "jobs"

    def name_for(self, job_id: str) -> str:
        return f"projects/{self.settings.project}/locations/local/customJobs/{job_id}"

    def _dir(self, name: str) -> Path:
        return self.root / name.rsplit("/", 1)[-1]

    def submit(self, spec: JobSpec) -> str:
        name = self.name_for(spec.job_id)
        job_dir = self._dir(name)
        self.root.mkdir(parents=True, exist_ok=True)
        # The job folder appears whole (spec + state) by one rename, which fails if it exists: that rename is the
        # claim, so a retried or concurrent submit never starts a second runner nor sees a half-written job.
        tmp = Path(tempfile.mkdtemp(prefix=f".{job_dir.name}-", dir=self.root))
        (tmp / "spec.json").write_text(json.dumps({"name": name, **spec.to_dict()}, indent=1))
        write_state(tmp, QUEUED, queued=time.time())
        try:
            os.rename(tmp, job_dir)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("job %s already submitted for key %s", name, spec.key)
            return name
        env = process_env(**self.settings.to_env(), **self.settings.emulator_env())
        with open(job_dir / "runner.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "embedpipe.jobs.runner", str(job_dir)],
                cwd=repo_root(),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # outlives the function instance that launched it, like a cloud job
            )
        (job_dir / "runner.pid").write_text(str(proc.pid))
        log.info("submitted local job %s (%s) for %s; logs: %s", name, spec.container, spec.key, job_dir)
        return name

    def get(self, name: str) -> JobStatus:
        job_dir = self._dir(name)
        spec = json.loads((job_dir / "spec.json").read_text())

        def read() -> tuple[JobStatus, dict]:
            state = json.loads((job_dir / "state.json").read_text())
            status = JobStatus(
                name,
                state["state"],
                spec["labels"],
                state.get("error", ""),
                state.get("model_dir", ""),
                state.get("tuning"),
            )
            return status, state

        status, state = read()
        if status.done:
            return status
        pid_file = job_dir / "runner.pid"
        if pid_file.exists() and not pid_alive(int(pid_file.read_text())):
            status, _ = read()  # it may have just finished
            if not status.done:  # the runner died without recording an end (killed): the job failed
                return JobStatus(name, FAILED, spec["labels"], "job runner process died")
        elif not pid_file.exists() and time.time() - state.get("queued", time.time()) > NEVER_STARTED_S:
            return JobStatus(name, FAILED, spec["labels"], "job runner never started (its launcher died)")
        return status

    def cancel(self, name: str) -> None:
        job_dir = self._dir(name)
        pid_file = job_dir / "runner.pid"
        if pid_file.exists():
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        state = json.loads((job_dir / "state.json").read_text())
        if state["state"] not in TERMINAL:
            write_state(job_dir, CANCELLED, "cancelled")

    def running_pids(self) -> list[int]:
        pids = []
        for pid_file in self.root.glob("*/runner.pid") if self.root.exists() else []:
            pid = int(pid_file.read_text())
            if pid_alive(pid):
                pids.append(pid)
        return pids


def write_state(job_dir: Path, state: str, error: str = "", **extra) -> None:
    """Replace a local job's ``state.json`` (what ``LocalJobLauncher.get`` reads): the launcher writes QUEUED and
    CANCELLED, the job runner (``embedpipe.jobs.runner``) RUNNING and the end."""
    tmp = job_dir / "state.json.tmp"
    tmp.write_text(json.dumps({"state": state, "error": error, **extra}))
    tmp.replace(job_dir / "state.json")  # atomic: get() never reads half a file
