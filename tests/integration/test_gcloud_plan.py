"""Every gcloud command of the deploy plan, run by the real gcloud CLI against a recording fake of the Google APIs
(``tests/gcloud_api.py``): each command must parse, finish, reach the API it is meant for, and send exactly the
requests stored in ``tests/fixtures/gcloud/plan_requests.json``.

Each step runs in its own fresh fake world (seeded with what earlier steps leave behind and gcloud reads): its create
commands; its check, which must print what ``apply`` takes for "unchanged" (else every deploy would recreate it);
with the stored fingerprint made stale, its update commands (and, for the first step of each kind, the check
again); its IAM commands; and the ``Resolver`` lookups of the placeholders the plan uses, which must print the
values substituted into the commands here. gcloud runs with a decoy default project (``core/project``): a flag
resolved against it instead of ``--project`` shows up as the decoy in a request.

After an intended change of the plan (or of gcloud), regenerate the fixture and review its diff:

    EMBEDPIPE_UPDATE_GCLOUD_FIXTURES=1 .venv/bin/pytest tests/integration/test_gcloud_plan.py
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from embedpipe.config import Settings
from embedpipe.deploy import staging
from embedpipe.deploy.apply import Resolver
from embedpipe.deploy.config import DeployConfig, config_from_settings
from embedpipe.deploy.plan import Mode, Step, plan
from tests import gcloud_api
from tests.gcloud_api import ESCAPED, FakeApis, FakeGcloudApis, Request
from tests.helpers import FIXTURES, ROOT

pytestmark = pytest.mark.skipif(shutil.which("gcloud") is None, reason="the gcloud CLI is not on PATH")

PROJECT, REGION = "demo-project", "europe-west4"
DECOY = "decoy-project"
FIXTURE = FIXTURES / "gcloud" / "plan_requests.json"
UPDATE_FIXTURE = os.environ.get("EMBEDPIPE_UPDATE_GCLOUD_FIXTURES") == "1"
WORKERS = 2
TIMEOUT_S = 60  # per gcloud run: an endpoint we failed to fake fails the command instead of hanging the test
STALE = "0000000000000000"  # what a stored fingerprint becomes before the update commands run
MILVUS_TOKEN = "test-milvus-token"

PLACEHOLDERS = {
    "project_number": gcloud_api.PROJECT_NUMBER,
    "gcs_service_agent": gcloud_api.GCS_AGENT,
    "sink_writer": gcloud_api.SINK_WRITER,
}

# Commands of the current plan that gcloud refuses, or that do something else than the plan means. The test passes
# while they stay broken and fails once one works (then delete its entry and regenerate the fixture).
KNOWN_BROKEN: dict[str, str] = {}

# What gcloud reads, per step kind, that the step does not create: left by earlier steps of the plan.
_REPO = f"projects/{PROJECT}/locations/{REGION}/repositories/embedpipe"
_BUILDER = f"projects/{PROJECT}/serviceAccounts/ep-build@{PROJECT}.iam.gserviceaccount.com"
SEEDS = {
    "image": {_REPO: {"name": _REPO, "format": "DOCKER"}},  # the describe check looks the repository up first
    "gcs-notification": {  # gcloud reads the bucket and the topic (and would create a missing topic)
        f"b/{PROJECT}-embedpipe-data": {"name": f"{PROJECT}-embedpipe-data", "location": "EUROPE-WEST4"},
        f"projects/{PROJECT}/topics/data-events": {"name": f"projects/{PROJECT}/topics/data-events"},
    },
    "cloud-run-service": {_BUILDER: {"name": _BUILDER, "email": _BUILDER.rsplit("/", 1)[1]}},  # --build-service-account
}

# The request each command exists for: command words -> (api, methods, path). The longest matching prefix applies;
# a command without an entry fails the test (say what it is meant to do).
_P, _L = f"/v1/projects/{PROJECT}", f"/v1/projects/{PROJECT}/locations/{REGION}"
_ID = r"[\w.@-]+"
EXPECTED = {
    "services enable": ("serviceusage", "POST", f"{_P}/services:batchEnable"),
    "beta services identity create": (
        "serviceusage",
        "POST",
        f"/v1beta1/projects/{PROJECT}/services/aiplatform.googleapis.com:generateServiceIdentity",
    ),
    "artifacts repositories create": ("artifactregistry", "POST", f"{_L}/repositories"),
    "artifacts repositories update": ("artifactregistry", "PATCH", f"{_L}/repositories/embedpipe"),
    "iam roles create": ("iam", "POST", f"{_P}/roles"),
    "iam roles update": ("iam", "PATCH", f"{_P}/roles/{_ID}"),
    "iam service-accounts create": ("iam", "POST", f"{_P}/serviceAccounts"),
    "iam service-accounts update": ("iam", "PATCH", f"{_P}/serviceAccounts/{_ID}"),
    "iam service-accounts add-iam-policy-binding": ("iam", "POST", f"{_P}/serviceAccounts/{_ID}:setIamPolicy"),
    "projects add-iam-policy-binding": ("cloudresourcemanager", "POST", f"{_P}:setIamPolicy"),
    "storage buckets create": ("storage", "POST", "/storage/v1/b"),
    "storage buckets update": ("storage", "PATCH", f"/storage/v1/b/{_ID}"),
    "storage buckets add-iam-policy-binding": ("storage", "PUT", f"/storage/v1/b/{_ID}/iam"),
    "storage buckets notifications create": ("storage", "POST", f"/storage/v1/b/{_ID}/notificationConfigs"),
    "pubsub topics create": ("pubsub", "PUT", f"{_P}/topics/{_ID}"),
    "pubsub topics update": ("pubsub", "PATCH", f"{_P}/topics/{_ID}"),
    "pubsub topics add-iam-policy-binding": ("pubsub", "POST", f"{_P}/topics/{_ID}:setIamPolicy"),
    "pubsub subscriptions create": ("pubsub", "PUT", f"{_P}/subscriptions/{_ID}"),
    "pubsub subscriptions update": ("pubsub", "PATCH", f"{_P}/subscriptions/{_ID}"),
    "pubsub subscriptions add-iam-policy-binding": ("pubsub", "POST", f"{_P}/subscriptions/{_ID}:setIamPolicy"),
    "secrets create": ("secretmanager", "POST", f"{_P}/secrets"),
    "secrets update": ("secretmanager", "PATCH", f"{_P}/secrets/{_ID}"),
    "secrets add-iam-policy-binding": ("secretmanager", "POST", f"{_P}/secrets/{_ID}:setIamPolicy"),
    "builds submit": ("cloudbuild", "POST", f"{_L}/builds"),
    "functions deploy": (
        "cloudfunctions",
        "POST PATCH",
        f"/v2/projects/{PROJECT}/locations/{REGION}/functions(/{_ID})?",
    ),
    # a gen2 function is a Cloud Run service: the invoker binding is set there
    "functions add-invoker-policy-binding": ("run", "POST", f"{_L}/services/{_ID}:setIamPolicy"),
    "run deploy": ("run", "POST PUT", f"/apis/serving.knative.dev/v1/namespaces/{PROJECT}/services(/{_ID})?"),
    "run services add-iam-policy-binding": ("run", "POST", f"{_L}/services/{_ID}:setIamPolicy"),
    "logging sinks create": ("logging", "POST", f"/v2/projects/{PROJECT}/sinks"),
    "logging sinks update": ("logging", "PATCH", f"/v2/projects/{PROJECT}/sinks/{_ID}"),
    "scheduler jobs create pubsub": ("cloudscheduler", "POST", f"{_L}/jobs"),
    "scheduler jobs update pubsub": ("cloudscheduler", "PATCH", f"{_L}/jobs/{_ID}"),
}
MUTATING_ROLES = ("create", "update", "iam")
# gcloud's argument errors: exit status 2 and one of these.
PARSE_ERROR = re.compile(
    r"unrecognized arguments|argument --?[\w-]+:|Invalid choice|expected one argument|"
    r"the following arguments are required|must be specified|Invalid value for \[--"
)


@dataclass
class Command:
    id: str
    step: Step
    role: str  # create, check, update, recheck, iam, resolve
    argv: list[str]
    stdin: str = ""
    stale_before: bool = False  # make the stored fingerprint stale first (the update path of apply)
    expect_stdout: str | None = None  # resolve: the value the plan was given for the placeholder


@dataclass
class Outcome:
    rc: int | None
    stdout: str
    stderr: str
    requests: list[Request] = field(default_factory=list)


@pytest.fixture
def cfg(monkeypatch) -> DeployConfig:
    monkeypatch.delenv("EMBEDPIPE_MILVUS_TOKEN", raising=False)
    # the token: the secret step; the SHA: the images' tag
    base = Settings(milvus_uri="https://milvus.example:19530", milvus_token=MILVUS_TOKEN, git_sha="0123456789abcdef")
    return config_from_settings(PROJECT, REGION, base, vpc_connector="embedpipe-connector")


def substitute(argv: list[str]) -> list[str]:
    def value(m: re.Match) -> str:
        key = m[1]
        return gcloud_api.run_url(key.removeprefix("url:")) if key.startswith("url:") else PLACEHOLDERS[key]

    return [re.sub(r"<<([^>]+)>>", value, a) for a in argv]


def lookup_argv(cfg: DeployConfig, key: str) -> list[str]:
    """The gcloud command ``Resolver`` runs for ``<<key>>``."""
    seen = []
    Resolver(cfg, lambda argv, _stdin: seen.append(argv) or subprocess.CompletedProcess(argv, 0, "x", ""))(
        [f"<<{key}>>"]
    )
    return seen[0]


def scripts(cfg: DeployConfig, steps: list[Step]) -> list[list[Command]]:
    """Per step, the commands in the order described above (each list runs in one fake world)."""
    keys = sorted({m for s in steps for a in _argvs(s) for arg in a for m in re.findall(r"<<([^>]+)>>", arg)})
    lookups = {k: lookup_argv(cfg, k) for k in keys}
    out = []
    for s in steps:
        name = f"{s.kind} {s.name}"
        cmds: list[Command] = []

        def add(role: str, argvs: list[list[str]], stale_first=False, step=s, name=name, cmds=cmds, **kw) -> None:
            for i, argv in enumerate(argvs):
                suffix = f"[{i}]" if len(argvs) > 1 else ""
                cid = f"{name} :: {role}{suffix}"
                cmds.append(Command(cid, step, role, substitute(argv), stale_before=stale_first and not i, **kw))

        add("create", s.create, stdin=MILVUS_TOKEN if s.stdin_env else "")
        if s.check:
            add("check", [s.check])
            # Steps of a kind differ only in names: the update path of DEPLOY steps (rerunning create) and the
            # check after an update run for the first step of each kind, every distinct command for all.
            first = s is next(x for x in steps if x.kind == s.kind)
            if s.mode is Mode.CREATE_OR_UPDATE or (s.mode is Mode.DEPLOY and first):
                add("update", s.commands("update"), stale_first=True)
                if first:
                    add("recheck", [s.check])
        add("iam", s.iam)
        for key, argv in lookups.items():
            if key == f"url:{s.name}" or (key == "sink_writer" and s.kind == "log-sink"):
                add(f"resolve {key}", [argv], expect_stdout=substitute([f"<<{key}>>"])[0])
        out.append(cmds)
    # facts of the project, looked up in a world of their own (the step is only a stand-in: these have no step)
    fixed = [k for k in lookups if not k.startswith("url:") and k != "sink_writer"]
    out.append(
        [
            Command(f"resolver :: resolve {k}", steps[0], f"resolve {k}", lookups[k], expect_stdout=PLACEHOLDERS[k])
            for k in fixed
        ]
    )
    return out


def _argvs(s: Step) -> list[list[str]]:
    return ([s.check] if s.check else []) + s.create + s.update + s.iam


def stage(steps: list[Step], root: Path, monkeypatch) -> None:
    """What ``apply`` stages before a step's commands (``step.local``), into ``root`` instead of the repo: staging
    reads the entry points and the pins from the repo root, so those are copied there; so is .gitignore, which
    gcloud applies to what ``builds submit .`` uploads."""
    for name in ("functions", "services"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("requirements.txt", ".gitignore"):
        shutil.copy(ROOT / name, root)
    (root / "deploy").mkdir()
    shutil.copy(ROOT / "deploy" / "cloudbuild.yaml", root / "deploy")
    monkeypatch.setattr(staging, "repo_root", lambda: root)
    for s in steps:
        if s.local:
            s.local()


def run(cmd: Command, fake: FakeGcloudApis, env: dict, cwd: Path) -> Outcome:
    if cmd.stale_before:
        fake.apis.rewrite(cmd.step.fingerprint, STALE)
    try:
        proc = subprocess.run(
            cmd.argv, input=cmd.stdin, capture_output=True, text=True, env=env, cwd=cwd, timeout=TIMEOUT_S
        )
        outcome = Outcome(proc.returncode, proc.stdout, proc.stderr)
    except subprocess.TimeoutExpired as e:
        outcome = Outcome(None, "", f"timed out after {TIMEOUT_S}s: {e.stderr}")
    outcome.requests = fake.take()
    return outcome


def run_all(script_list: list[list[Command]], cwd: Path, config_root: Path) -> dict[str, tuple[Command, Outcome]]:
    """Runs the scripts on ``WORKERS`` threads, each with its own fake (one step at a time on it). Each script gets
    a fresh gcloud config dir too: what gcloud caches there must not depend on which steps ran before."""
    with contextlib.ExitStack() as stack:
        pool: queue.Queue = queue.Queue()
        for _ in range(WORKERS):
            pool.put(stack.enter_context(FakeGcloudApis(FakeApis())))

        def work(n: int, script: list[Command]) -> list[tuple[Command, Outcome]]:
            if not script:
                return []
            fake = pool.get()
            try:
                fake.apis.reset(SEEDS.get(script[0].step.kind, {}))
                fake.take()
                env = {**fake.env(config_root / f"gcloud-{n}"), "CLOUDSDK_CORE_PROJECT": DECOY}
                return [(cmd, run(cmd, fake, env, cwd)) for cmd in script]
            finally:
                pool.put(fake)

        longest_first = sorted(script_list, key=lambda s: -sum(c.role != "check" for c in s))
        with ThreadPoolExecutor(WORKERS) as ex:
            results = [r for rs in ex.map(work, range(len(longest_first)), longest_first) for r in rs]
    return {cmd.id: (cmd, outcome) for cmd, outcome in results}


# ---------------------------------------------------------------------- what each command must have done


def up_to_date(cmd: Command, out: Outcome) -> bool:
    """``apply``'s verdict on a check's output: the step is unchanged."""
    return cmd.step.action(out.rc, out.stdout) == "unchanged"


def sent_env(requests: list[Request]) -> dict | None:
    """The runtime environment a deploy sent: a function's serviceConfig, a Cloud Run container's env."""
    for r in requests:
        body = r.body if isinstance(r.body, dict) else {}
        if "serviceConfig" in body:
            return body["serviceConfig"].get("environmentVariables", {})
        for c in body.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
    return None


def problems(cmd: Command, out: Outcome) -> list[str]:
    found = []
    if out.rc == 2 or PARSE_ERROR.search(out.stderr):
        found.append(f"gcloud refused the arguments: {out.stderr.strip()[-600:]}")
    elif out.rc != 0:
        found.append(f"exit {out.rc}: {out.stderr.strip()[-600:]}")
    escaped = sorted({r.host for r in out.requests if r.api == ESCAPED})
    if escaped:
        found.append(f"requests to hosts that are not faked (add an endpoint override): {escaped}")
    leaked = [f"{r.method} {r.path}" for r in out.requests if DECOY in json.dumps(r.as_dict())]
    if leaked:
        found.append(f"resolved against the default project instead of --project: {leaked}")
    if cmd.role in ("check", "recheck") and out.rc == 0 and not up_to_date(cmd, out):
        found.append(f"apply would not take the step for unchanged: check printed {out.stdout.strip()!r}")
    if cmd.role.startswith("resolve") and out.stdout.strip() != cmd.expect_stdout:
        found.append(f"prints {out.stdout.strip()!r}, the plan was given {cmd.expect_stdout!r}")
    if cmd.role in MUTATING_ROLES:
        words = " ".join(a for a in cmd.argv[1:] if not a.startswith("-"))
        key = max((k for k in EXPECTED if words.startswith(k + " ") or words == k), key=len, default=None)
        if key is None:
            found.append(f"no EXPECTED entry for `gcloud {words}`: say which request it exists for")
        else:
            api, methods, path = EXPECTED[key]
            if not any(
                r.api == api and r.method in methods.split() and re.fullmatch(path, r.path) for r in out.requests
            ):
                found.append(f"no {methods} {path} to {api}")
    if cmd.role in ("create", "update") and cmd.argv[1:3] in (["functions", "deploy"], ["run", "deploy"]):
        env = sent_env(out.requests)
        if env != cmd.step.settings["env"]:
            found.append(f"sent runtime env {env} instead of the step's {cmd.step.settings['env']}")
    return found


# ---------------------------------------------------------------------- the fixture


def normalize(value, fingerprints: set[str], envs: list[dict]):
    """Volatile parts out (gcloud's upload names, sizes, nonces and version; the fingerprints, which hash the staged
    source; the runtime env, asserted on its own), so the fixture changes only when the requests do."""
    if isinstance(value, dict):
        if set(value) == {"<bytes>"}:
            return {"<bytes>": "<n>"}
        out = {}
        for k, v in value.items():
            if k == "size" and isinstance(v, str) and v.isdigit():
                v = "<size>"
            elif k == "client.knative.dev/nonce":
                v = "<nonce>"
            elif k == "run.googleapis.com/client-version":
                v = "<gcloud version>"
            elif k == "environmentVariables" and v in envs:
                v = "<runtime env>"
            elif k == "env" and isinstance(v, list) and {e["name"]: e["value"] for e in v if "value" in e} in envs:
                v = ["<runtime env>", *[e for e in v if "value" not in e]]
            out[k] = normalize(v, fingerprints, envs)
        return out
    if isinstance(value, list):
        return [normalize(v, fingerprints, envs) for v in value]
    if isinstance(value, str):
        for fp in fingerprints:
            value = value.replace(fp, "<fingerprint>")
        return re.sub(r"\d+\.\d+-[0-9a-f]{32}", "<upload>", value)  # gcloud names uploads time.time()-uuid
    return value


def record(cmd: Command, out: Outcome, fingerprints: set[str], envs: list[dict]) -> dict:
    requests = [
        [r.method, r.host, r.path, {k: v for k, v in r.query.items() if k != "alt"}, r.body, r.status]
        for r in out.requests
    ]
    doc = {"argv": cmd.argv, "exit": out.rc, "requests": requests}
    if cmd.role in ("check", "recheck") or cmd.role.startswith("resolve"):
        doc["stdout"] = out.stdout.strip()
    return normalize(doc, fingerprints, envs)


def first_difference(got: dict, want: dict) -> str:
    for k in ("argv", "exit", "stdout"):
        if got.get(k) != want.get(k):
            return f"{k}: {want.get(k)!r} -> {got.get(k)!r}"
    for i, (g, w) in enumerate(zip(got["requests"], want["requests"])):
        if g != w:
            return f"request {i}: {json.dumps(w)[:800]}\n    -> {json.dumps(g)[:800]}"
    return f"{len(want['requests'])} requests -> {len(got['requests'])}"


# ---------------------------------------------------------------------- the test


def test_every_plan_command_runs_on_the_real_gcloud(cfg, tmp_path, monkeypatch):
    started = time.monotonic()
    steps = plan(cfg)
    cwd = tmp_path / "root"
    cwd.mkdir()
    stage(steps, cwd, monkeypatch)
    results = run_all(scripts(cfg, steps), cwd, tmp_path)

    failures = []
    for cid, (cmd, out) in results.items():
        found = problems(cmd, out)
        if cid in KNOWN_BROKEN and not found:
            failures.append(f"{cid}: works now: delete its KNOWN_BROKEN entry")
        elif found and cid not in KNOWN_BROKEN:
            failures += [f"{cid}: {p}\n    $ {' '.join(cmd.argv)}" for p in found]
    failures += [
        f"{cid}: KNOWN_BROKEN entry for a command the plan no longer has"
        for cid in KNOWN_BROKEN.keys() - results.keys()
    ]

    fingerprints = {s.fingerprint for s in steps}
    envs = [s.settings["env"] for s in steps if "env" in s.settings]
    recorded = {cid: record(cmd, out, fingerprints, envs) for cid, (cmd, out) in results.items()}
    if UPDATE_FIXTURE:
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    else:
        want = json.loads(FIXTURE.read_text())
        for cid in sorted(recorded.keys() | want.keys()):
            if cid not in want:
                failures.append(f"{cid}: not in the fixture")
            elif cid not in recorded:
                failures.append(f"{cid}: in the fixture, not in the plan")
            elif recorded[cid] != want[cid]:
                failures.append(
                    f"{cid}: requests differ from the fixture: {first_difference(recorded[cid], want[cid])}"
                )
    print(f"{len(results)} gcloud runs in {time.monotonic() - started:.0f}s")
    assert not failures, (
        f"{len(failures)} problems (fixture: EMBEDPIPE_UPDATE_GCLOUD_FIXTURES=1 regenerates it):\n"
        + "\n".join(failures)
    )
