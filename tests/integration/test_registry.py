"""embedpipe.index.registry: the requests VertexRegistry sends through the real gapic ModelServiceClient (REST
transport) to a local HTTP server that records them and answers like the Vertex AI Model Registry; rollback moving the
registry alias; aiplatform staying unimported until the Vertex backend is used (a fresh interpreter). No credentials,
no network beyond 127.0.0.1. The pure parts are in tests/unit/test_registry.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from google.cloud import aiplatform_v1

from embedpipe.index import registry, rollback
from embedpipe.index.registry import ALIAS, VertexRegistry
from embedpipe.ledger.runs import Ledger
from embedpipe.ml import serving
from embedpipe.retrieval import vectorstore
from tests.fake_vertex import PARENT, FakeVertexServer, error
from tests.unit.fakes import FakeMilvus, FakeStore
from tests.unit.test_registry import DS, INFO, METRICS, RUN_A, RUN_B, entry, uri
from tests.unit.test_vertex import settings

MODEL = f"{PARENT}/models/embedpipe-{DS}"


class FakeModelRegistry(FakeVertexServer):
    """Enough of the Vertex AI Model Registry REST API, kept in memory: upload (a long-running operation), list
    versions (label filter), merge version aliases, delete a version, get an operation."""

    def __init__(self, moves_aliases: bool = True) -> None:
        self.models: dict[str, list[dict]] = {}  # model name -> versions (Model JSON), oldest first
        self.operations: dict[str, dict] = {}
        self.moves_aliases = moves_aliases  # Vertex documents it; False: a registry that leaves the old holder
        self.finish_uploads = True  # False: uploads stay running until finish() is called
        self.hide_from_list = 0  # the next N label-filtered list calls see nothing (a racing registration)
        self.unseen = 0  # the next N list calls answer as if the Model did not exist (a racing first upload)
        self.refuse_uploads = False  # True: uploads answer 403
        self.next_op = 0
        super().__init__()

    def add_version(self, model: str, body: dict, aliases: list[str]) -> dict:
        versions = self.models.setdefault(model, [])
        version = {**body, "name": model, "versionId": str(len(versions) + 1), "versionAliases": aliases}
        versions.append(version)
        return version

    def upload(self, model: str, body: dict) -> dict:
        self.next_op += 1
        name = f"{model}/operations/{self.next_op}"
        op = {"name": name, "done": False, "pending": (model, body)}
        self.operations[name] = op
        if self.finish_uploads:
            self.finish(name)
        return op

    def finish(self, name: str) -> None:
        op = self.operations[name]
        model, body = op.pop("pending")
        first = model not in self.models
        version = self.add_version(model, body, ["default"] if first else [])
        op |= {
            "done": True,
            "response": {
                "@type": "type.googleapis.com/google.cloud.aiplatform.v1.UploadModelResponse",
                "model": model,
                "modelVersionId": version["versionId"],
            },
        }

    def holders(self, alias: str) -> list[str]:
        return [f"{v['name']}@{v['versionId']}" for v in self.models.get(MODEL, []) if alias in v["versionAliases"]]

    def _version(self, name: str) -> dict | None:
        model, _, vid = name.partition("@")
        return next((v for v in self.models.get(model, []) if v["versionId"] == vid), None)

    def route(self, method: str, path: str, query: dict, body: dict) -> tuple[int, dict]:
        code, doc = self._answer(method, path, query, body)
        return code, {k: v for k, v in doc.items() if k != "pending"}  # an operation's pending upload stays here

    def _answer(self, method: str, path: str, query: dict, body: dict) -> tuple[int, dict]:
        if method == "POST" and path == f"{PARENT}/models:upload":
            if self.refuse_uploads:
                return 403, error(403, "PERMISSION_DENIED", "aiplatform.models.upload denied")
            if body.get("parentModel"):
                if body["parentModel"] not in self.models:
                    return 404, error(404, "NOT_FOUND", f"{body['parentModel']} not found")
                return 200, self.upload(body["parentModel"], body["model"])
            model = f"{PARENT}/models/{body['modelId']}"
            if model in self.models:
                return 409, error(409, "ALREADY_EXISTS", f"{model} exists")
            return 200, self.upload(model, body["model"])
        if method == "GET" and path.endswith(":listVersions"):
            model = path.removesuffix(":listVersions")
            if model not in self.models or self.unseen:
                self.unseen = max(0, self.unseen - 1)
                return 404, error(404, "NOT_FOUND", f"{model} not found")
            want = re.fullmatch(r'labels\.(\w+)="(.*)"', query.get("filter", ""))
            found = self.models[model]
            if want and self.hide_from_list:
                self.hide_from_list -= 1
                found = []
            elif want:
                found = [v for v in found if v.get("labels", {}).get(want[1]) == want[2]]
            return 200, {"models": found}
        if method == "POST" and path.endswith(":mergeVersionAliases"):
            version = self._version(path.removesuffix(":mergeVersionAliases"))
            if version is None:
                return 404, error(404, "NOT_FOUND", f"{path} not found")
            for alias in body["versionAliases"]:
                if alias.startswith("-"):
                    version["versionAliases"].remove(alias[1:])
                    continue
                if self.moves_aliases or alias == "default":  # default is always on exactly one
                    for other in self.models[version["name"]]:
                        if alias in other["versionAliases"]:
                            other["versionAliases"].remove(alias)
                if alias not in version["versionAliases"]:
                    version["versionAliases"].append(alias)
            return 200, version
        if method == "DELETE" and path.endswith(":deleteVersion"):
            version = self._version(path.removesuffix(":deleteVersion"))
            self.models[version["name"]].remove(version)
            return 200, {"name": f"{version['name']}/operations/del", "done": True}
        if method == "GET" and path in self.operations:
            return 200, self.operations[path]
        return 404, error(404, "NOT_FOUND", f"{path} not found")


@pytest.fixture
def fake():
    f = FakeModelRegistry()
    yield f
    f.close()


def vertex(fake: FakeModelRegistry, **overrides) -> VertexRegistry:
    return VertexRegistry(settings(fake.endpoint, **overrides), info_reader=lambda model_uri: INFO)


def test_the_first_upload_creates_the_model_later_ones_are_its_versions(fake):
    reg = vertex(fake)
    first = reg.register(DS, RUN_A, uri(RUN_A), INFO, METRICS)
    assert first == f"{MODEL}@1"
    second = reg.register(DS, RUN_B, uri(RUN_B), INFO, METRICS)
    assert second == f"{MODEL}@2"
    created, versioned = fake.bodies("POST", r"models:upload$")
    assert created["modelId"] == f"embedpipe-{DS}" and "parentModel" not in created
    assert versioned["parentModel"] == MODEL and "modelId" not in versioned
    model = aiplatform_v1.Model.from_json(json.dumps(created["model"]))  # refuses fields Vertex does not know
    assert model.artifact_uri == f"gs://arts/runs/{RUN_A}/train/1/model"
    spec = model.container_spec
    assert spec.image_uri == "us-central1-docker.pkg.dev/demo-project/embedpipe/embedder:abc123"
    assert list(spec.args) == ["serve"] and not spec.command, "the image's own entrypoint: python -m task serve"
    assert [p.container_port for p in spec.ports] == [serving.PORT]
    assert (spec.predict_route, spec.health_route) == (serving.PREDICT_ROUTE, serving.HEALTH_ROUTE)
    assert dict(model.labels) == {
        "app": "embedpipe",
        "dataset": DS,
        "run_id": RUN_A.lower(),  # sanitized like job labels
        "fingerprint": "fp1",
        "base_model": "bundled-all-minilm-l6-v2",
        "dim": "384",
        "max_seq_length": "256",
        "pooling": "mean",
        "normalize": "true",
        "similarity": "cosine",
        "tuned": "true",
        "git_sha": "0123abcd",
        "data_fingerprint": "d1",
        "preprocessing_fingerprint": "p1",
    }
    described = json.loads(model.version_description)
    assert described["run_id"] == RUN_A and described["metrics"] == METRICS
    assert described["selection_metrics"] == INFO["metrics"] and described["query_prefix"] == "query: "
    assert not model.version_aliases, "registered without an alias: point_alias moves it once the version exists"


def test_a_retried_registration_returns_the_version_it_made(fake):
    first = vertex(fake).register(DS, RUN_A, uri(RUN_A), INFO, METRICS)
    again = vertex(fake).register(DS, RUN_A, uri(RUN_A), INFO, METRICS)  # a redelivered request, a new instance
    assert again == first
    assert len(fake.bodies("POST", r"models:upload$")) == 1
    lists = [q for m, p, q, _ in fake.requests if m == "GET" and p.endswith(":listVersions")]
    assert lists[-1]["filter"] == f'labels.run_id="{RUN_A.lower()}"'


def test_racing_registrations_keep_the_oldest_version(fake):
    reg = vertex(fake)
    reg.register(DS, RUN_B, uri(RUN_B), INFO, METRICS)  # the model exists
    # Another delivery uploaded RUN_A after our list call saw nothing.
    fake.hide_from_list = 1
    older = fake.add_version(MODEL, {"labels": {"run_id": RUN_A.lower()}}, [])
    kept = reg.register(DS, RUN_A, uri(RUN_A), INFO, METRICS)
    assert kept == f"{MODEL}@{older['versionId']}"
    deleted = [p for m, p, _, _ in fake.requests if m == "DELETE"]
    assert deleted == [f"{MODEL}@3:deleteVersion"], "our own duplicate goes, the older version stays"
    assert [v["versionId"] for v in fake.models[MODEL]] == ["1", "2"]


def test_a_first_upload_racing_another_becomes_a_version_of_its_model(fake):
    fake.add_version(MODEL, {"labels": {"run_id": "other"}}, ["default"])  # another delivery created the Model
    fake.unseen = 1  # after our list call found none
    assert vertex(fake).register(DS, RUN_A, uri(RUN_A), INFO, METRICS) == f"{MODEL}@2"
    created, versioned = fake.bodies("POST", r"models:upload$")
    assert created["modelId"] == f"embedpipe-{DS}", "refused: the Model exists"
    assert versioned["parentModel"] == MODEL and versioned["model"] == created["model"]


def test_point_alias_moves_promoted_and_default_in_one_call(fake):
    # Vertex: "applying an alias that another version uses removes it from that version"; no clean-up pass, which
    # could strip the alias off a version a concurrent rollback just gave it
    fake.moves_aliases = True
    reg = vertex(fake)
    a = reg.register(DS, RUN_A, uri(RUN_A), INFO, METRICS)
    b = reg.register(DS, RUN_B, uri(RUN_B), INFO, METRICS)
    reg.point_alias(DS, a)
    assert fake.holders(ALIAS) == [a] and fake.holders("default") == [a]
    reg.point_alias(DS, b)
    assert fake.holders(ALIAS) == [b] and fake.holders("default") == [b]
    merges = [
        (p.removesuffix(":mergeVersionAliases"), body["versionAliases"])
        for _, p, _, body in fake.requests
        if p.endswith(":mergeVersionAliases")
    ]
    assert merges == [(a, [ALIAS, "default"]), (b, [ALIAS, "default"])]
    reg.point_alias(DS, b)  # idempotent
    assert fake.holders(ALIAS) == [b]
    assert fake.holders(ALIAS) == [b]


def test_promote_registers_once_and_moves_the_alias(fake):
    reg = vertex(fake)
    out = registry.promote(reg, DS, RUN_A, uri(RUN_A), METRICS)
    assert out["state"] == "aliased" and out["version"] == f"{MODEL}@1" and out["alias"] == ALIAS
    assert out["registry"] == "vertex" and out["model"] == MODEL and out["run_id"] == RUN_A
    again = registry.promote(reg, DS, RUN_A, uri(RUN_A), METRICS)  # an incremental run keeping the model
    assert again["version"] == out["version"] and len(fake.bodies("POST", r"models:upload$")) == 1


def test_a_slow_upload_is_recorded_pending_and_found_by_the_next_call(fake):
    fake.finish_uploads = False
    reg = vertex(fake, registry_wait_s=0.3)
    out = registry.promote(reg, DS, RUN_A, uri(RUN_A), METRICS)
    assert out["state"] == "pending" and out["operation"] == f"{PARENT}/models/embedpipe-{DS}/operations/1"
    assert not fake.bodies("POST", r":mergeVersionAliases$"), "no alias before the version exists"
    fake.finish(out["operation"])  # Vertex finishes the upload on its own
    later = registry.promote(vertex(fake), DS, RUN_A, uri(RUN_A), METRICS)  # the next promotion or rollback
    assert later["state"] == "aliased" and fake.holders(ALIAS) == [later["version"]]
    assert len(fake.bodies("POST", r"models:upload$")) == 1, "the finished upload is found by its run label"


def test_a_failed_registration_is_recorded_not_raised(fake):
    reg = vertex(fake)
    a = reg.register(DS, RUN_A, uri(RUN_A), INFO, METRICS)
    reg.point_alias(DS, a)
    fake.refuse_uploads = True
    out = registry.promote(reg, DS, RUN_B, uri(RUN_B), METRICS)
    assert out["state"] == "failed" and out["error"].startswith("Forbidden: 403") and out["version"] is None
    # the previous model no longer serves the live index: it loses `promoted` (`default` must stay somewhere)
    assert fake.holders(ALIAS) == [] and fake.holders("default") == [a]


def test_a_registration_overtaken_by_a_rollback_leaves_the_alias_alone(fake):
    reg = vertex(fake)
    a = reg.register(DS, RUN_A, uri(RUN_A), INFO, METRICS)
    reg.point_alias(DS, a)  # what the rollback did while B's upload ran
    out = registry.promote(reg, DS, RUN_B, uri(RUN_B), METRICS, still_live=lambda: False)
    assert out["state"] == "superseded" and out["version"] and fake.holders(ALIAS) == [a]


def test_aiplatform_loads_only_when_the_vertex_backend_is_used():
    """In a fresh interpreter: naming a model imports no ``google.cloud.aiplatform`` (cold starts stay light)."""
    code = (
        "import sys; from embedpipe.config import Settings; from embedpipe.index import registry; "
        "registry.VertexRegistry(Settings()).model_name('d'); "
        "assert not [m for m in sys.modules if m.startswith('google.cloud.aiplatform')], 'imported aiplatform'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- rollback


def test_rollback_moves_the_registry_alias_to_the_targets_version(fake):
    s = settings(fake.endpoint)
    reg = VertexRegistry(s, info_reader=lambda model_uri: INFO)
    ledger, client = Ledger("a", FakeStore()), FakeMilvus()
    versions = {}
    for run_id in (RUN_A, RUN_B):  # what two promotions left: both registered, the alias on the newest
        e = entry(run_id)
        ledger.store.write_json(f"{e['model_uri'].rstrip('/')}/embedpipe.json", INFO)  # the model is still there
        client.add(e["collection"], e["fingerprint"], e["dim"])
        vectorstore.point_alias(client, DS, e["collection"])
        ledger.update_dataset(
            DS, lambda st, e=e: {**st, "promoted": e, "promoted_entries": rollback.remember(st, e, 3)}
        )
        versions[run_id] = registry.promote(reg, DS, run_id, e["model_uri"], METRICS)["version"]
    assert fake.holders(ALIAS) == [versions[RUN_B]]
    published = []
    rollback.rollback(s, ledger, client, lambda topic, event: published.append(event), DS, by="me")
    assert client.aliases[DS] == entry(RUN_A)["collection"]
    assert fake.holders(ALIAS) == [versions[RUN_A]], "the registry alias follows the Milvus alias"
    assert len(fake.bodies("POST", r"models:upload$")) == 2, "the target's version is reused, not uploaded again"
    (item,) = ledger.get_dataset(DS)["rollbacks"]
    assert item["registry"]["state"] == "aliased" and item["registry"]["version"] == versions[RUN_A]
