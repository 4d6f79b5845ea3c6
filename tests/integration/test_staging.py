"""Function staging: every function and service is staged to build/functions/<dir>/ and loaded with
functions_framework.create_app from that folder in a fresh interpreter whose sys.path is only the staged folder and
site-packages (``python -S``: not even the editable install of shared/), then a fixture event is posted to it against
the real emulators. A module missing from the staged folder, or a third-party module that the staged
requirements.txt would not install, fails here instead of in production."""

from __future__ import annotations

import ast
import base64
import json
import subprocess
import sys
import sysconfig

import pytest

from embedpipe import topology
from embedpipe.deploy import staging
from embedpipe.gcp import bus, storage
from tests.helpers import FIXTURES, ROOT

PROJECT = "embedpipe-staging"  # own project and buckets on the shared emulators: no crosstalk with other tests
DATA, ARTIFACTS = "staging-data", "staging-artifacts"

# Imported by third-party code only when installed (``try: import ... except ImportError``): xxhash by pymilvus's
# bloom filter, cloudpickle by pyarrow.
OPTIONAL = {"grpc_status", "pip", "setuptools", "_distutils_hack", "xxhash", "cloudpickle"}

CHILD = r"""
import json, sys
args = json.loads(sys.argv[1])
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent
import functions_framework

app = functions_framework.create_app(target=args["target"], source=args["source"], signature_type=args["signature"])
client = app.test_client()
if args["event"] is None:
    status = client.get("/healthz").status_code
else:
    doc = args["event"]
    event = CloudEvent({k: v for k, v in doc.items() if k != "data"}, doc["data"])
    headers, body = to_binary(event)
    status = client.post("/projects/p/topics/t", headers=headers, data=body).status_code
import embedpipe
files = {name: getattr(m, "__file__", None) or "" for name, m in list(sys.modules.items())}
print(json.dumps({"status": status, "embedpipe": embedpipe.__file__, "modules": files}))
"""


def fixture_event(name: str) -> dict:
    return json.loads((FIXTURES / "events" / name).read_text())


def message_event(data: dict, attributes: dict | None = None) -> dict:
    doc = fixture_event("retrain_push.json")
    doc["data"]["message"]["data"] = base64.b64encode(json.dumps(data).encode()).decode()
    doc["data"]["message"]["attributes"] = attributes or {}
    return doc


def events() -> dict[str, dict | None]:
    upload = fixture_event("gcs_notification_push.json")
    upload["data"]["message"]["attributes"]["bucketId"] = DATA
    tick = message_event({}, {"ce-type": "io.embedpipe.tick.v1"})
    return {
        "on-data-uploaded": upload,
        "on-retrain-requested": message_event({"dataset": "staging-ds", "reason": "staging test"}),
        "on-job-event": fixture_event("ml_job_sink_entry_push.json"),
        "reconcile": tick,
        "indexer": message_event({"run_id": "no-such-run"}),
        "search": None,  # GET /healthz
    }


@pytest.fixture(scope="module")
def staged(services, tmp_path_factory):
    bus.apply_topology(PROJECT, None)
    for bucket in (DATA, ARTIFACTS):
        storage.ensure_bucket(bucket)
    root = tmp_path_factory.mktemp("build")
    return staging.stage_all(root / "functions"), root / "state"  # one state dir: jobs one function launches


@pytest.mark.parametrize("name", [c.name for c in topology.COMPONENTS])
def test_staged_component_runs_alone(services, staged, name, tmp_path):
    c = topology.component(name)
    folders, state = staged
    folder = folders[name]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["main.py", "embedpipe", "requirements.txt", *(["Procfile"] if staging.is_service(c) else [])]
    )
    assert (folder / "embedpipe" / "contracts" / "schemas" / "index_updated.v1.json").exists()
    env = {
        **{k: v for k, v in services.to_env().items()},
        **services.emulator_env(),
        "EMBEDPIPE_PROJECT": PROJECT,
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "EMBEDPIPE_DATA_BUCKET": DATA,
        "EMBEDPIPE_ARTIFACTS_BUCKET": ARTIFACTS,
        "EMBEDPIPE_STATE_DIR": str(state),
        "PYTHONPATH": f"{folder}:{sysconfig.get_paths()['purelib']}",
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
    }
    args = {"target": c.target, "source": str(folder / "main.py"), "signature": c.signature, "event": events()[name]}
    proc = subprocess.run(
        [sys.executable, "-S", "-c", CHILD, json.dumps(args)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == 200, proc.stderr[-3000:]
    assert result["embedpipe"].startswith(str(folder)), "embedpipe must come from the staged copy"
    leaked = [n for n, f in result["modules"].items() if f.startswith(str(ROOT / "shared"))]
    assert leaked == [], f"modules loaded from the repo instead of the staged folder: {leaked}"

    # Every third-party module the handler loaded is installed by the staged requirements (or their dependencies).
    lines = (folder / "requirements.txt").read_text().splitlines()
    pinned = {staging._norm(line.split("==")[0]) for line in lines if "==" in line}
    installable = staging.requires_closure(pinned)
    purelib = sysconfig.get_paths()["purelib"]
    tops = sorted({n.split(".")[0] for n, f in result["modules"].items() if f.startswith(purelib)})
    missing = {}
    for top in tops:
        dist = staging.distribution_of(top)
        if dist and dist not in installable and top not in OPTIONAL:
            missing[top] = dist
    assert missing == {}, f"{name} imports modules its requirements.txt does not install: {missing}"
    # The shape `gcloud functions deploy --gen2 --source=<folder> --entry-point=<target>` builds: the entry point is a
    # top-level function of main.py at the folder's root, and a function never loads torch (1 GiB instances, cold
    # starts; only the search service embeds queries).
    tree = ast.parse((folder / "main.py").read_text())
    assert c.target in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    if not staging.is_service(c):
        assert "torch" not in tops, f"{name} imported torch"
        assert not any(staging._norm(line.split("==")[0]) == "torch" for line in lines), f"{name} installs torch"
