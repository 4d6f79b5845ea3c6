"""Applying the plan: ``apply(cfg, steps)`` runs gcloud, idempotently. A step with a check first reads its
fingerprint back ("describe") and creates the resource when it is missing, updates it when the fingerprint differs,
and leaves it alone when it matches, so a second apply changes nothing; each step's ``Mode`` says which of these it
can do (``embedpipe.deploy.plan.Mode``). IAM bindings are added with
``add-iam-policy-binding`` (a no-op when present). ``Resolver`` looks up the ``<<...>>`` placeholders, each once.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable

from embedpipe import topology
from embedpipe.config import repo_root, secret_env
from embedpipe.deploy.config import DeployConfig, DeployError
from embedpipe.deploy.plan import Mode, Step, describe_function, fmt, gcloud
from embedpipe.deploy.staging import is_service

Runner = Callable[[list[str], str | None], subprocess.CompletedProcess]


def run_gcloud(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, cwd=repo_root())


class Resolver:
    """Placeholders that only exist once resources do; each looked up once."""

    def __init__(self, cfg: DeployConfig, runner: Runner):
        self.cfg, self.runner, self.cache = cfg, runner, {}

    def _value(self, key: str) -> str:
        cfg = self.cfg
        if key == "project_number":
            argv = gcloud(cfg, "projects", "describe", cfg.project, "--format=value(projectNumber)")
        elif key == "gcs_service_agent":
            argv = gcloud(cfg, "storage", "service-agent")
        elif key == "sink_writer":
            argv = gcloud(cfg, "logging", "sinks", "describe", topology.JOB_LOG_SINK, "--format=value(writerIdentity)")
        elif key.startswith("url:"):
            c = topology.component(key[4:])
            if is_service(c):
                argv = gcloud(
                    cfg, "run", "services", "describe", c.name, f"--region={cfg.region}", "--format=value(status.url)"
                )
            else:
                argv = describe_function(cfg, c.name, "serviceConfig.uri")
        else:
            raise DeployError(f"unknown placeholder <<{key}>>")
        proc = self.runner(argv, None)
        if proc.returncode != 0 or not proc.stdout.strip():
            raise DeployError(f"could not look up {key}: {fmt(argv)}: {proc.stderr.strip()[-500:]}")
        return proc.stdout.strip()

    def __call__(self, argv: list[str]) -> list[str]:
        def sub(m: re.Match) -> str:
            if m[1] not in self.cache:
                self.cache[m[1]] = self._value(m[1])
            return self.cache[m[1]]

        return [re.sub(r"<<([^>]+)>>", sub, a) for a in argv]


def apply(cfg: DeployConfig, steps: list[Step], runner: Runner = run_gcloud, echo=print) -> dict[str, int]:
    """Apply the plan in order; returns counts of created / updated / unchanged / ensured (always run) steps."""
    if cfg.settings.milvus_uri.startswith(("http://127.0.0.1", "http://localhost")):
        raise DeployError("EMBEDPIPE_MILVUS_URI points at localhost: set your Milvus/Zilliz URI (and token)")
    resolve = Resolver(cfg, runner)
    counts = {"created": 0, "updated": 0, "unchanged": 0, "ensured": 0}

    def run(argv: list[str], stdin: str | None = None) -> None:
        argv = resolve(argv)
        proc = runner(argv, stdin)
        if proc.returncode != 0:
            raise DeployError(f"failed ({proc.returncode}): {fmt(argv)}\n{proc.stderr.strip()[-2000:]}")

    for n, step in enumerate(steps, 1):
        if step.local:
            step.local()
        if step.mode is Mode.ENSURE:  # no check: the commands are idempotent themselves
            action = step.action()
        else:
            proc = runner(resolve(step.check), None)
            action = step.action(proc.returncode, proc.stdout)
        stdin = secret_env(step.stdin_env) if step.stdin_env and action == "create" else None
        for argv in step.commands(action):
            run(argv, stdin)
        for argv in step.iam:
            run(argv)
        counts[{"create": "created", "update": "updated", "ensure": "ensured"}.get(action, "unchanged")] += 1
        echo(f"[{n:02d}] {action:<9} {step.kind} {step.name}")
    return counts
