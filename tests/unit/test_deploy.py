"""embedpipe.deploy: the dry-run plan through the CLI, idempotent apply against a stateful fake gcloud, and the
requirements derived for each staged function."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

import embedpipe
from embedpipe import topology
from embedpipe.cli import app
from embedpipe.config import Settings
from embedpipe.deploy import staging
from embedpipe.deploy.apply import apply
from embedpipe.deploy.config import DeployConfig, DeployError, bigquery_datasets, config_from_settings, runtime_env
from embedpipe.deploy.plan import Mode, plan, render

# the deploying settings' git SHA names the images (without one, git_tag asks git for HEAD)
SHA = {"EMBEDPIPE_GIT_SHA": "0123456789abcdef"}


@pytest.fixture
def cfg() -> DeployConfig:
    base = Settings.from_env({**SHA, "EMBEDPIPE_MILVUS_URI": "https://milvus.example.com:19530"})
    return config_from_settings("demo-project", "us-central1", base)


def test_dry_run_prints_the_whole_plan_and_touches_nothing(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a) or pytest.fail(f"ran {a}"))
    monkeypatch.setenv("EMBEDPIPE_GIT_SHA", "0123456789abcdef")
    monkeypatch.delenv("EMBEDPIPE_BASE_MODEL", raising=False)  # the tests' tiny local model: a deploy refuses paths
    monkeypatch.setattr(staging, "stage", lambda *a: pytest.fail("staged during a dry run"))
    result = CliRunner().invoke(
        app, ["deploy", "gcp", "--project", "demo-project", "--region", "us-central1", "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert calls == []
    assert out.startswith("embedpipe deploy plan: project demo-project, region us-central1, image tag 0123456789ab")
    kinds = re.findall(r"^\[\d\d\] (\S+) (\S+)", out, flags=re.M)
    order = [k for k, _ in kinds]
    # Dependencies come first: identities before grants on buckets/topics, images and functions before the
    # subscriptions that push to them, the topic before the sink and the scheduler that publish to it.
    first = {k: order.index(k) for k in dict.fromkeys(order)}
    assert first["apis"] < first["artifact-registry"] < first["service-account"] < first["bucket"] < first["topic"]
    assert first["topic"] < first["image"] < first["function"] < first["push-subscription"] < first["gcs-notification"]
    assert first["gcs-notification"] < first["log-sink"] < first["scheduler-job"]
    names = {n for _, n in kinds}
    for t in (*topology.TOPICS, *topology.dead_letter_topics()):
        assert t in names
    for c in topology.COMPONENTS:
        assert c.name in names
        if c.topic:
            assert c.subscription in names
    for identity in topology.identities():
        assert f"ep-{identity}@demo-project.iam.gserviceaccount.com" in names
    assert "gs://demo-project-embedpipe-data" in names and "gs://demo-project-embedpipe-artifacts" in names
    # The settings a reviewer signs off on.
    assert topology.JOB_LOG_FILTER in out
    assert "--schedule=* * * * *" in out
    assert "--dead-letter-topic=on-job-event-dlq --max-delivery-attempts=5" in out
    assert "--min-retry-delay=1s --max-retry-delay=30s" in out
    assert "--push-auth-service-account=ep-push@demo-project.iam.gserviceaccount.com" in out
    assert "'--member=<<sink_writer>>' --role=roles/pubsub.publisher" in out
    assert "gcloud functions deploy on-job-event --gen2 --runtime=python311" in out
    assert "--no-allow-unauthenticated" in out
    assert "gcloud run deploy indexer --source=build/functions/indexer" in out
    # the search service reloads models in a background thread: its CPU must not be throttled between requests
    search = re.search(r"^       apply : gcloud run deploy search .*$", out, flags=re.M)[0]
    assert "--no-cpu-throttling" in search and "cpu_always_allocated: True" in out
    assert "--cpu-throttling" in re.search(r"^       apply : gcloud run deploy indexer .*$", out, flags=re.M)[0]
    assert "--config=deploy/cloudbuild.yaml" in out and "_DOCKERFILE=containers/trainer/Dockerfile" in out
    assert "EMBEDPIPE_MODE=gcp" in out and "EMBEDPIPE_PUSH_SERVICE_ACCOUNT=ep-push@" in out


def test_least_privilege_bindings(cfg):
    steps = {s.name: s for s in plan(cfg)}
    bucket_iam = " ".join(" ".join(a) for a in steps["gs://demo-project-embedpipe-data"].iam)
    # intake reads each upload and moves a bad one under quarantine/: objectUser on the data bucket, nothing more
    upload_fn = "ep-on-data-uploaded@demo-project.iam.gserviceaccount.com --role=roles/storage.objectUser"
    assert upload_fn in bucket_iam
    assert [
        a
        for s in steps.values()
        for a in s.iam
        if a[1:3] == ["projects", "add-iam-policy-binding"] and "ep-on-data-uploaded@" in " ".join(a)
    ] == [], "the upload function launches nothing"
    assert "ep-job@demo-project.iam.gserviceaccount.com --role=roles/storage.objectViewer" in bucket_iam
    search_roles = [a for s in steps.values() for a in s.iam if "--member=serviceAccount:ep-search@" in " ".join(a)]
    assert [r[-3] for r in search_roles] == ["--role=roles/storage.objectViewer"]
    project_roles = [a for s in steps.values() for a in s.iam if a[1:3] == ["projects", "add-iam-policy-binding"]]
    by_member: dict[str, set[str]] = {}
    for a in project_roles:
        by_member.setdefault(a[4].split(":")[1].split("@")[0], set()).add(a[5].removeprefix("--role="))
    launcher = {"projects/demo-project/roles/embedpipeJobLauncher"}  # not roles/aiplatform.user
    assert by_member == {
        "ep-on-retrain-requested": launcher,
        "ep-on-job-event": launcher,
        "ep-reconcile": launcher,
        # the Model Registry: upload promoted models and move their alias, nothing else of Vertex AI
        "ep-indexer": {"projects/demo-project/roles/embedpipeModelRegistrar"},
        "ep-build": {"roles/logging.logWriter", "roles/artifactregistry.writer", "roles/storage.objectAdmin"},
    }, "no project-wide editor roles; only the launching functions may submit jobs"
    (source_grant,) = [a for a in project_roles if "--role=roles/storage.objectAdmin" in a]
    condition = next(a for a in source_grant if a.startswith("--condition="))
    # object admin only on the buckets gcloud uploads build sources to, never on the data or artifacts buckets
    assert 'resource.name.startsWith("projects/_/buckets/gcf-v2-sources-")' in condition
    assert 'startsWith("projects/_/buckets/demo-project_cloudbuild")' in condition and "embedpipe-data" not in condition
    role = steps["projects/demo-project/roles/embedpipeJobLauncher"]
    assert role.settings["permissions"].split(",") == list(topology.JOB_LAUNCHER_PERMISSIONS)
    registrar = steps["projects/demo-project/roles/embedpipeModelRegistrar"].settings["permissions"].split(",")
    assert registrar == [f"aiplatform.models.{v}" for v in ("upload", "get", "list", "update", "delete")]
    # Vertex's service agent copies the model folder at upload: read on the artifacts bucket, nothing on the data one
    agent = "serviceAccount:service-<<project_number>>@gcp-sa-aiplatform.iam.gserviceaccount.com"
    artifacts_iam = " ".join(" ".join(a) for a in steps["gs://demo-project-embedpipe-artifacts"].iam)
    assert f"--member={agent} --role=roles/storage.objectViewer" in artifacts_iam and agent not in bucket_iam
    # jobs read the artifacts bucket and write only under runs/: never ledger/, the control plane
    job = [
        a
        for a in steps["gs://demo-project-embedpipe-artifacts"].iam
        if "--member=serviceAccount:ep-job@" in " ".join(a)
    ]
    assert [(a[-3], a[-2]) for a in job] == [
        ("--role=roles/storage.objectViewer", "--condition=None"),
        (
            "--role=roles/storage.objectUser",
            '--condition=expression=resource.name.startsWith("projects/_/buckets/demo-project-embedpipe-artifacts/'
            'objects/runs/"),title=embedpipe-runs,description=objects under runs/ only',
        ),
    ]
    apis = steps["enable"].create
    assert apis[1][1:] == ["beta", "services", "identity", "create", "--service=aiplatform.googleapis.com"] + [
        "--project=demo-project"
    ], "the agent exists before a bucket grants it anything"
    build = "projects/demo-project/serviceAccounts/ep-build@demo-project.iam.gserviceaccount.com"
    for step in steps.values():  # every build runs as ep-build, not the project's default build account
        for argv in step.create:
            if argv[1:3] in (["builds", "submit"], ["functions", "deploy"], ["run", "deploy"]):
                assert f"--service-account={build}" in argv or f"--build-service-account={build}" in argv, argv


class FakeGcloud:
    """A project in memory: describe/list answer from it, create/update/deploy change it, lookups answer canned."""

    def __init__(self) -> None:
        self.state: dict[tuple, str] = {}
        self.calls: list[list[str]] = []

    @staticmethod
    def key(argv: list[str]) -> tuple:
        args = [a for a in argv[1:] if not a.startswith("--")]
        if args[:2] == ["builds", "submit"]:
            image = re.search(r"_IMAGE=([^,]+)", " ".join(argv))[1]
            return ("artifacts", "docker", "images", image)
        verbs = ("describe", "create", "update", "deploy", "list")
        i = next(i for i, a in enumerate(args) if a in verbs)
        group = tuple(a for a in args[:i] if a not in ("services",)) or ("run",)
        rest = [a for a in args[i + 1 :] if a != "pubsub"]
        name = rest[0].split("@")[0] if rest else ""
        return (*group, name)

    def __call__(self, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
        self.calls.append(argv)
        joined = " ".join(argv)
        out, rc = "", 0
        if "value(projectNumber)" in joined:
            out = "123456789"
        elif argv[1:3] == ["storage", "service-agent"]:
            out = "service-123456789@gs-project-accounts.iam.gserviceaccount.com"
        elif "value(writerIdentity)" in joined:
            out = "serviceAccount:service-123456789@gcp-sa-logging.iam.gserviceaccount.com"
        elif "serviceConfig.uri" in joined or "status.url" in joined:
            out = f"https://{argv[3]}-abc-uc.a.run.app"
        elif "add-iam-policy-binding" in joined or "add-invoker-policy-binding" in joined or "enable" in argv:
            pass
        elif {"describe", "list"} & {a for a in argv[1:] if not a.startswith("-")}:
            key = self.key(argv)
            if key in self.state:
                out = self.state[key]
            else:
                rc = 1
        else:  # create / update / deploy / builds submit
            key = self.key(argv)
            m = re.search(r"(?:--labels|--update-labels)=embedpipe-fingerprint=(\w+)", joined)
            d = re.search(r"--description=(.*\])", joined)
            t = re.search(r"--topic=(projects/\S+)", joined)
            if m:
                self.state[key] = m[1]
            elif d:
                self.state[key] = d[1]
            elif t:
                self.state[key] = f"//pubsub.googleapis.com/{t[1]}"
            else:
                self.state.setdefault(key, "sha256:digest")
        assert "<<" not in joined, f"unresolved placeholder in {joined}"
        return subprocess.CompletedProcess(argv, rc, out + "\n", "" if rc == 0 else "NOT_FOUND")


def test_apply_creates_everything_then_a_second_apply_changes_nothing(cfg):
    steps = plan(cfg)
    for s in steps:
        s.local = None  # staging is covered by tests/integration/test_staging.py
    gcloud = FakeGcloud()
    first = apply(cfg, steps, runner=gcloud, echo=lambda *_: None)
    assert first == {"created": len(steps) - 1, "updated": 0, "unchanged": 0, "ensured": 1}  # 1: APIs enabled
    subs = [c for c in gcloud.calls if c[1:4] == ["pubsub", "subscriptions", "create"]]
    assert any("--push-endpoint=https://on-job-event-abc-uc.a.run.app/projects/demo-project/topics/job-events" in c
               for c in subs)  # fmt: skip
    sink_grant = [c for c in gcloud.calls if "gcp-sa-logging" in " ".join(c)]
    assert sink_grant and sink_grant[0][1:5] == ["pubsub", "topics", "add-iam-policy-binding", "job-events"]

    gcloud.calls.clear()
    second = apply(cfg, plan(cfg), runner=gcloud, echo=lambda *_: None)
    assert second == {"created": 0, "updated": 0, "unchanged": len(steps) - 1, "ensured": 1}
    # the ensured step runs again by design: enabling APIs and `services identity create` (which returns the
    # existing agent) are idempotent in gcloud itself
    ensured = {tuple(a) for s in steps if s.check is None for a in s.create}
    changing = [
        c for c in gcloud.calls if {"create", "update", "deploy", "submit"} & set(c) and tuple(c) not in ensured
    ]
    assert changing == [], "a second apply creates, updates and deploys nothing"


def test_a_changed_setting_updates_only_that_resource(cfg, monkeypatch):
    gcloud = FakeGcloud()
    steps = plan(cfg)
    for s in steps:
        s.local = None
    apply(cfg, steps, runner=gcloud, echo=lambda *_: None)
    import dataclasses

    # the schedule a deploy uses is DeployConfig.schedule (its default copies topology.RECONCILE_SCHEDULE once)
    changed = dataclasses.replace(cfg, schedule="*/10 * * * *")
    steps = plan(changed)
    (job,) = [s for s in steps if s.kind == "scheduler-job"]
    assert job.settings["schedule"] == "*/10 * * * *"
    for s in steps:
        s.local = None
    gcloud.calls.clear()
    counts = apply(changed, steps, runner=gcloud, echo=lambda *_: None)
    assert counts["updated"] == 1 and counts["created"] == 0
    (update,) = [c for c in gcloud.calls if "update" in c]
    assert update[1:4] == ["scheduler", "jobs", "update"] and "--schedule=*/10 * * * *" in update


def test_each_step_says_how_apply_treats_it(cfg):
    modes = {s.kind: s.mode for s in plan(cfg)}
    assert modes == {
        "apis": Mode.ENSURE,  # enabling APIs is idempotent in gcloud: runs every time
        "artifact-registry": Mode.CREATE_OR_UPDATE,
        "custom-role": Mode.CREATE_OR_UPDATE,
        "service-account": Mode.CREATE_OR_UPDATE,
        "bucket": Mode.CREATE_OR_UPDATE,
        "topic": Mode.CREATE_OR_UPDATE,
        "image": Mode.CREATE_ONLY,  # a tag is immutable
        "function": Mode.DEPLOY,  # `functions deploy` creates or updates
        "cloud-run-service": Mode.DEPLOY,
        "push-subscription": Mode.CREATE_OR_UPDATE,
        "pull-subscription": Mode.CREATE_OR_UPDATE,
        "gcs-notification": Mode.MEMBER,  # present when its topic is among the bucket's notifications
        "log-sink": Mode.CREATE_OR_UPDATE,
        "scheduler-job": Mode.CREATE_OR_UPDATE,
    }
    s = next(s for s in plan(cfg) if s.kind == "gcs-notification")
    other = "//pubsub.googleapis.com/projects/demo-project/topics/other"
    assert s.action(0, f"{other}\n{s.expect}\n") == "unchanged" and s.action(0, other) == "create"
    assert s.action(1, "") == "create" and s.commands("update") == []
    fn = next(s for s in plan(cfg) if s.kind == "function")
    assert fn.action(0, "0000000000000000") == "update" and fn.commands("update") == fn.create
    assert fn.action(0, fn.fingerprint) == "unchanged"


def test_a_step_without_what_its_mode_needs_is_refused(cfg):
    topic = next(s for s in plan(cfg) if s.kind == "topic")
    for change in ({"update": []}, {"check": None}, {"expect": "stale"}, {"mode": Mode.CREATE_ONLY}):
        with pytest.raises(ValueError, match="topic data-events"):
            dataclasses.replace(topic, **change).validate()


def test_apply_refuses_a_local_milvus():
    cfg = config_from_settings("demo-project", "us-central1", Settings.from_env(SHA))
    with pytest.raises(DeployError, match="EMBEDPIPE_MILVUS_URI points at localhost"):
        apply(cfg, [], runner=FakeGcloud())


def test_deployed_settings_are_cloud_settings(cfg):
    s = cfg.settings
    assert s.mode == "gcp" and s.push_auth_enabled
    assert s.trainer_image == "us-central1-docker.pkg.dev/demo-project/embedpipe/trainer:0123456789ab"
    assert s.service_account == "ep-job@demo-project.iam.gserviceaccount.com"
    assert s.base_model == "bundled:all-MiniLM-L6-v2", "the images ship the bundled weights under the same name"
    env = runtime_env(cfg)
    assert "EMBEDPIPE_STATE_DIR" not in env and "EMBEDPIPE_PUBSUB_PORT" not in env
    assert "EMBEDPIPE_MILVUS_TOKEN" not in env, "the token travels as a Secret Manager secret, never as plain env"


def test_a_local_base_model_path_is_refused_with_the_fix(tmp_path):
    for bad in (str(tmp_path), "BAAI/bge-small-en-v1.5", "bundled:nope", "gs://"):
        with pytest.raises(DeployError, match="EMBEDPIPE_BASE_MODEL: .*upload a local model folder to gs://"):
            config_from_settings("p", "r", Settings.from_env({**SHA, "EMBEDPIPE_BASE_MODEL": bad}))
    hub = Settings.from_env({**SHA, "EMBEDPIPE_BASE_MODEL": "sentence-transformers/all-MiniLM-L6-v2"})
    assert config_from_settings("p", "r", hub).settings.base_model.endswith("all-MiniLM-L6-v2")  # bundled
    gs = config_from_settings("p", "r", Settings.from_env({**SHA, "EMBEDPIPE_BASE_MODEL": "gs://b/models/mine"}))
    assert gs.settings.base_model == "gs://b/models/mine"


def test_function_requirements_are_pinned_and_lean():
    pins = staging._pins()
    for c in topology.COMPONENTS:
        reqs = staging.source_files(c)["requirements.txt"].decode().splitlines()[1:]
        lines = [r for r in reqs if not r.startswith("--")]
        assert all("==" in r for r in lines), reqs
        assert all(staging._norm(r.split("==")[0]) in pins or "==" in r for r in lines)
        assert any(r.startswith("functions-framework==") for r in lines)
        if not staging.is_service(c):
            assert not [r for r in lines if r.split("==")[0] in ("torch", "sentence-transformers", "pytest", "ruff")]
    launching = staging.source_files(topology.component("on-job-event"))["requirements.txt"].decode()
    assert "google-cloud-aiplatform==" in launching, "a function that launches Vertex jobs needs aiplatform"


def test_the_dry_run_is_the_same_whatever_is_installed_here(cfg, monkeypatch):
    """Two checkouts of one commit print the same plan: staging (the requirements it derives, hence the source
    hashes and fingerprints in the plan) reads the repo only, never the installed distributions."""
    normal = render(cfg, plan(cfg))

    class NoVenv:
        def __getattr__(self, name):
            raise AssertionError(f"the plan asked the local environment: {name}")

    staging.requirements_for.cache_clear()
    monkeypatch.setattr(staging, "md", NoVenv())  # importlib.metadata: versions, requires, packages
    monkeypatch.setattr(staging, "importlib", NoVenv())  # importlib.util.find_spec: what is importable here
    try:
        assert render(cfg, plan(cfg)) == normal
    finally:
        staging.requirements_for.cache_clear()


def test_the_import_table_matches_the_installed_distributions():
    """``staging.IMPORTS`` and ``BROUGHT`` say what the installed metadata says (here, where the tests' venv is
    installed from requirements.txt): the repo's table gives the requirements this environment would."""
    package = Path(embedpipe.__file__).parent
    for c in topology.COMPONENTS:
        _, third = staging.import_closure(staging.repo_root() / c.path, package)
        for module in third:
            assert staging.declared_distribution(module) == staging.distribution_of(module), (c.name, module)
    for module, dist in staging.IMPORTS.items():
        assert staging.distribution_of(module) == dist, module
    pins = staging._pins()
    for dist, bringers in staging.BROUGHT.items():
        assert dist not in pins
        assert set(bringers) == {p for p in pins if dist in staging.requires_closure({p})}, dist


def test_an_import_the_table_does_not_name_fails_the_plan_with_the_fix(tmp_path):
    pkg = tmp_path / "embedpipe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    entry = tmp_path / "main.py"
    entry.write_text("import functions_framework\nimport yaml\n")
    with pytest.raises(LookupError, match="'yaml': add its import name to IMPORTS"):
        staging.requirements_for(entry, pkg)
    entry.write_text("import functions_framework\nimport flask\nimport grpc\n")
    with pytest.raises(LookupError, match=r"imports \['grpcio'\], which requirements.txt does not pin"):
        staging.requirements_for(entry, pkg)  # flask comes with functions-framework; grpcio with none chosen


def test_functions_never_reach_the_ml_layer():
    """The functions' main.py files are not a package import-linter sees (.importlinter guards runtime and control);
    the staging closure (lazy imports included) shows what each one loads: no ``embedpipe.ml``, no torch."""
    package = Path(embedpipe.__file__).parent
    for c in topology.COMPONENTS:
        if staging.is_service(c):
            continue
        modules, third = staging.import_closure(staging.repo_root() / c.path, package)
        assert "embedpipe.runtime" in modules, c.name  # the closure did follow main.py into the package
        assert not [m for m in modules if m == "embedpipe.ml" or m.startswith("embedpipe.ml.")], c.name
        heavy = {m.split(".")[0] for m in third} & {"torch", "sentence_transformers", "transformers"}
        assert not heavy, (c.name, heavy)


def test_import_closure_follows_lazy_imports_and_skips_optional_ones(tmp_path):
    pkg = tmp_path / "embedpipe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    import yaml\n    from embedpipe import b\n")
    (pkg / "b.py").write_text(
        "try:\n    import tomli_w\nexcept ImportError:\n    pass\nimport json\nimport jsonschema\n"
    )
    entry = tmp_path / "main.py"
    entry.write_text("from embedpipe.a import f\n")
    modules, third = staging.import_closure(entry, pkg)
    assert modules == {"embedpipe.a", "embedpipe.b"}
    assert third == {"yaml", "jsonschema"}


@pytest.mark.parametrize("fixture", ["ml_job_sink_entry_push.json", "ml_job_local_runner_push.json"])
def test_the_log_sink_filter_selects_both_job_entries_and_they_parse_alike(fixture):
    """The real sink entry and the local runner's entry pass the sink's filter terms and give the same hint."""
    from embedpipe.contracts.events import parse_job_log_entry, parse_push
    from tests.unit.fakes import load_event

    msg = parse_push(load_event(fixture))
    entry = msg.json()
    terms = dict(re.findall(r'([\w.]+)="([^"]*)"', topology.JOB_LOG_FILTER))
    assert terms == {"resource.type": "ml_job", "resource.labels.task_name": "service"}
    assert entry["resource"]["type"] == "ml_job" and entry["resource"]["labels"]["task_name"] == "service"
    hint = parse_job_log_entry(msg)
    assert (hint.job_id, hint.state, hint.message) == (
        "1234567890123456789",
        "SUCCEEDED",
        "Job completed successfully.",
    )


def test_bigquery_sources_get_read_sessions_and_read_on_the_named_datasets_only():
    base = Settings.from_env(
        {
            **SHA,
            "EMBEDPIPE_MILVUS_URI": "https://milvus.example.com:19530",
            "EMBEDPIPE_BIGQUERY_DATASETS": "shop-data.catalog, other-proj.logs",
        }
    )
    c = config_from_settings("demo-project", "us-central1", base)
    steps = plan(c)
    job = next(s for s in steps if s.name == "ep-job@demo-project.iam.gserviceaccount.com")
    assert {"roles/bigquery.readSessionUser", "roles/bigquery.jobUser"} <= set(job.settings["project_roles"])
    assert "roles/bigquery.dataViewer" not in " ".join(" ".join(a) for a in job.iam), "no project-wide data read"
    reads = [s for s in steps if s.kind == "bigquery-dataset-read"]
    assert [s.name for s in reads] == ["shop-data.catalog", "other-proj.logs"]
    assert reads[0].create == [
        [
            "bq",
            "query",
            "--project_id=demo-project",
            "--use_legacy_sql=false",
            "GRANT `roles/bigquery.dataViewer` ON SCHEMA `shop-data`.`catalog` "
            'TO "serviceAccount:ep-job@demo-project.iam.gserviceaccount.com"',
        ]
    ]
    assert "bigquerystorage.googleapis.com" in steps[0].settings["services"]
    assert "EMBEDPIPE_BIGQUERY_PORT" not in runtime_env(c)
    # without named datasets: no BigQuery API, role or grant at all
    plain = plan(config_from_settings("demo-project", "us-central1", Settings.from_env(SHA)))
    assert "bigquery" not in " ".join(" ".join(" ".join(a) for a in [*s.create, *s.iam]) for s in plain)


@pytest.mark.parametrize("bad", ["catalog", "shop-data.catalog`; DROP SCHEMA x; --", "p.d.t"])
def test_a_bigquery_dataset_name_that_is_not_one_is_refused(bad):
    with pytest.raises(DeployError, match="is not PROJECT.DATASET"):
        bigquery_datasets(Settings(bigquery_datasets=bad))
