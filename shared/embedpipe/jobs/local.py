"""Jobs: one ``JobSpec`` and a ``JobLauncher`` protocol with a local backend (Vertex AI comes in ``vertex.py``).

``LocalJobLauncher`` runs the same container entrypoint (``containers/<container>/task.py``) as a detached process
with the Vertex container contract (``AIP_MODEL_DIR``, ``AIP_CHECKPOINT_DIR``, ``AIP_TENSORBOARD_LOG_DIR``,
``CLUSTER_SPEC``, ``CLOUD_ML_TRIAL_ID``), keeps job state under ``<state_dir>/jobs/<job_id>/`` where ``get()`` reads
it, and on exit publishes to ``job-events`` the LogEntry a Cloud Logging sink would (see ``embedpipe.jobs.runner``).
Submitting is keyed: the same ``JobSpec.key`` always maps to the same job, so a retried launch never runs twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from embedpipe.config import Settings, repo_root

log = logging.getLogger(__name__)

NEVER_STARTED_S = 60.0  # a QUEUED local job with no runner after this long lost its launcher
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)

# Environment of embedding jobs (JobSpec env: the local runner's replicas and Vertex containers alike). glibc serves
# each activation-sized tensor with a fresh mmap and unmaps it when freed, so every batch page-faults its buffers in
# again; keeping such blocks on the heap made CPU embedding ~10% faster here (4.25 -> 3.85 s for the demo corpus).
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


@dataclass(frozen=True)
class JobSpec:
    key: str  # idempotency key, e.g. "<run_id>/train/1"
    container: str  # trainer | embedder
    args: list[str]
    base_output_dir: str  # gs://ARTIFACTS/runs/<run_id>/...
    labels: dict[str, str]  # at least run_id and stage, so any job event finds its run
    env: dict[str, str] = field(default_factory=dict)
    image: str = ""
    machine_type: str = "n1-standard-8"
    accelerator_type: str = ""
    accelerator_count: int = 0
    replica_count: int = 1
    hp_tuning: dict | None = None

    @property
    def job_id(self) -> str:
        """Numeric like Vertex job ids, and derived from the key so a retried submit finds the same job."""
        return str(int(hashlib.sha256(self.key.encode()).hexdigest()[:15], 16))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class JobStatus:
    name: str
    state: str  # QUEUED | RUNNING | SUCCEEDED | FAILED | CANCELLED
    labels: dict[str, str]
    error: str = ""
    model_dir: str = ""  # a finished HP-tuning job: the best trial's model dir (else the stage's default)
    tuning: dict | None = None  # an HP-tuning job: metric, goal, trials (id, params, state, metric), best_trial

    @property
    def done(self) -> bool:
        return self.state in TERMINAL


class JobLauncher(Protocol):
    def submit(self, spec: JobSpec) -> str: ...
    def get(self, name: str) -> JobStatus: ...
    def cancel(self, name: str) -> None: ...
    def name_for(self, job_id: str) -> str: ...


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
        _write_state(tmp, QUEUED, queued=time.time())
        try:
            os.rename(tmp, job_dir)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("job %s already submitted for key %s", name, spec.key)
            return name
        env = {**os.environ, **self.settings.to_env(), **self.settings.emulator_env()}
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
            _write_state(job_dir, CANCELLED, "cancelled")

    def running_pids(self) -> list[int]:
        pids = []
        for pid_file in self.root.glob("*/runner.pid") if self.root.exists() else []:
            pid = int(pid_file.read_text())
            if pid_alive(pid):
                pids.append(pid)
        return pids


def _write_state(job_dir: Path, state: str, error: str = "", **extra) -> None:
    tmp = job_dir / "state.json.tmp"
    tmp.write_text(json.dumps({"state": state, "error": error, **extra}))
    tmp.replace(job_dir / "state.json")  # atomic: get() never reads half a file


def launcher(settings: Settings) -> JobLauncher:
    if settings.mode == "local":
        return LocalJobLauncher(settings)
    from embedpipe.jobs.vertex import VertexJobLauncher

    return VertexJobLauncher(settings)
