"""A fake of the Google Cloud REST APIs that the real ``gcloud`` CLI can run against, recording every request.

gcloud is pointed at it through its own settings (``gcloud_env``): every API we use gets an endpoint override
``http://<api>.gcloud.test/`` and all traffic goes through gcloud's proxy setting to ``FakeGcloudApis``, which
routes by host name. The names do not resolve, so nothing can reach the network behind our back: a request for a
host we did not override arrives here as ``CONNECT <host>:443``, is recorded as api ``<escaped>`` and refused. A
proxy (rather than one port per API) is also what lets Cloud Run's regional endpoints work: gcloud turns the
``run`` override into ``europe-west4-run.gcloud.test``, a host that only a proxy can route.

The server keeps a small in-memory store, so ``describe`` after ``create`` returns what gcloud sent, long-running
operations are returned done, IAM policies start empty and ``setIamPolicy`` echoes. Rules are generic REST
conventions (PUT or POST creates, PATCH applies the update mask, GET reads a resource or lists a collection,
``:getIamPolicy``/``:setIamPolicy``, operations) plus a short list of per-API facts (which APIs answer with
operations, what the server sets such as a Cloud Run URL, what every project has such as its number, the flows
gcloud drives such as a source upload or a build).
"""

from __future__ import annotations

import copy
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

DOMAIN = "gcloud.test"
# The api_endpoint_overrides names gcloud looks up for the commands of our deploy plan (found by running them:
# anything missing shows up as an <escaped> request).
APIS = (
    "artifactregistry",
    "cloudbuild",
    "cloudfunctions",
    "cloudresourcemanager",
    "cloudscheduler",
    "containeranalysis",  # artifacts docker images describe reads the image's occurrences
    "iam",
    "logging",
    "pubsub",
    "run",
    "secretmanager",
    "serviceusage",
    "storage",
)
UPLOAD = "upload"  # signed upload URLs we hand out (Cloud Functions source)
ESCAPED = "<escaped>"
DUMMY_TOKEN = "ya29.fake-token-for-tests"
# What the fake project reports about itself (a test substituting placeholders uses the same values).
PROJECT_NUMBER = "123456789012"
GCS_AGENT = f"service-{PROJECT_NUMBER}@gs-project-accounts.iam.gserviceaccount.com"
SINK_WRITER = f"serviceAccount:service-{PROJECT_NUMBER}@gcp-sa-logging.iam.gserviceaccount.com"
BUILD_ACCOUNT = f"{PROJECT_NUMBER}-compute@developer.gserviceaccount.com"


def run_url(name: str) -> str:
    """The URL the fake gives a Cloud Run service or a gen2 function."""
    return f"https://{name}-abc-ew.a.run.app"


# APIs whose mutations are long-running operations (answered already done, the resource in ``response``).
OPERATION_APIS = {"serviceusage", "artifactregistry", "cloudfunctions", "cloudbuild"}
# ... except these synchronous methods.
SYNC_METHODS = {("artifactregistry", "PATCH")}
# Operation metadata gcloud reads (Cloud Functions shows the deploy stages, all complete here).
OPERATION_METADATA = {
    "cloudfunctions": {
        "@type": "type.googleapis.com/google.cloud.functions.v2.OperationMetadata",
        "stages": [{"name": n, "state": "COMPLETE"} for n in ("BUILD", "SERVICE")],
    }
}


def gcloud_env(config_dir: Path, proxy_port: int, base: dict | None = None) -> dict[str, str]:
    """The environment for a gcloud that talks only to ``FakeGcloudApis`` on ``proxy_port``: a private config dir,
    a dummy access token, no prompts, no usage reporting, no update checks, no metadata-server probe."""
    config_dir.mkdir(parents=True, exist_ok=True)
    token = config_dir / "access-token"
    token.write_text(DUMMY_TOKEN)
    env = {
        k: v
        for k, v in (os.environ if base is None else base).items()
        if not k.startswith("CLOUDSDK_")
        and k.lower() not in ("http_proxy", "https_proxy", "no_proxy", "all_proxy")
        and k not in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT")
    }
    env.update(
        {
            "CLOUDSDK_CONFIG": str(config_dir),
            "CLOUDSDK_AUTH_ACCESS_TOKEN_FILE": str(token),
            "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
            "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "1",
            "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1",
            "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false",
            "CLOUDSDK_CORE_DISABLE_FILE_LOGGING": "1",
            "CLOUDSDK_SURVEY_DISABLE_PROMPTS": "1",
            # gcloud's own proxy settings (env proxies are ignored by some of its transports); rdns: the fake
            # host names are resolved by the proxy, never by DNS
            "CLOUDSDK_PROXY_TYPE": "http",
            "CLOUDSDK_PROXY_ADDRESS": "127.0.0.1",
            "CLOUDSDK_PROXY_PORT": str(proxy_port),
            "CLOUDSDK_PROXY_RDNS": "true",
        }
    )
    for api in APIS:
        env[f"CLOUDSDK_API_ENDPOINT_OVERRIDES_{api.upper()}"] = f"http://{api}.{DOMAIN}/"
    return env


@dataclass
class Request:
    api: str  # api_endpoint_overrides name, UPLOAD, or ESCAPED
    host: str  # as sent: shows regional endpoints (europe-west4-run...)
    method: str
    path: str
    query: dict[str, list[str]]
    body: object = None  # parsed JSON; {"<bytes>": n} for other payloads; multipart: [metadata, {"<bytes>": n}]
    status: int = 0

    def as_dict(self) -> dict:
        return {
            "api": self.api,
            "host": self.host,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "body": self.body,
            "status": self.status,
        }


@dataclass
class Reply:
    status: int
    body: object


def _not_found(what: str) -> Reply:
    return Reply(404, {"error": {"code": 404, "message": f"{what} not found", "status": "NOT_FOUND"}})


def _merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        elif v is None:
            dst.pop(k, None)  # JSON null removes (storage label removal)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def _patch(stored: dict, body: dict, mask: str) -> dict:
    """PATCH: with an update mask only the named fields change (taken from the body, removed when the body lacks
    them), as the real APIs do; without one (Cloud Storage) the body is merged in."""
    if not mask:
        return _merge(stored, body)
    for path in mask.split(","):
        keys = [_camel(k) for k in path.strip().split(".")]
        src, dst = body, stored
        for k in keys[:-1]:
            src = src.get(k, {}) if isinstance(src, dict) else {}
            dst = dst.setdefault(k, {})
        if isinstance(src, dict) and keys[-1] in src:
            dst[keys[-1]] = copy.deepcopy(src[keys[-1]])
        else:
            dst.pop(keys[-1], None)
    return stored


def _is_id(key: str, value) -> bool:
    return key.endswith("Id") and isinstance(value, str)


def _unwrap(body: dict) -> dict:
    """Create and update requests may wrap the resource: ``{"topic": {...}, "updateMask": "labels"}``,
    ``{"accountId": ..., "serviceAccount": {...}}``, ``{"roleId": ..., "role": {...}}``."""
    rest = {
        k: v for k, v in body.items() if k not in ("updateMask", "validateOnly", "allowMissing") and not _is_id(k, v)
    }
    if len(rest) == 1 and len(rest) != len(body):
        (only,) = rest.values()
        if isinstance(only, dict):
            return only
    return body


@dataclass
class Store:
    """Resources by key (the URL path after the API version): what the fake knows exists."""

    items: dict[str, dict] = field(default_factory=dict)
    policies: dict[str, dict] = field(default_factory=dict)
    counter: int = 0

    def next_id(self) -> str:
        self.counter += 1
        return f"{self.counter:04d}"


_VERSION = re.compile(r"^/(?:(?:storage|apis/[^/]+|upload/storage)/)?(v\d[\w]*)/(.*)$")


def resource_key(path: str) -> str:
    """``/v1/projects/p/topics/t`` -> ``projects/p/topics/t``; ``/storage/v1/b/x`` -> ``b/x``;
    ``/apis/serving.knative.dev/v1/namespaces/p/services/s`` -> ``namespaces/p/services/s``."""
    m = _VERSION.match(path)
    return m[2] if m else path.lstrip("/")


class FakeApis:
    """The request -> reply logic, independent of the HTTP plumbing (so it can be read as a table of rules)."""

    def __init__(self, seed: dict[str, dict] | None = None):
        self.lock = threading.Lock()
        self.store = Store()
        self.seed = seed or {}
        self.reset()

    def reset(self, seed: dict[str, dict] | None = None) -> None:
        with self.lock:
            self.store = Store(items=copy.deepcopy(self.seed if seed is None else seed))

    def rewrite(self, old: str, new: str) -> None:
        """Replace ``old`` inside every stored string (e.g. make a stored fingerprint stale before an update)."""

        def sub(v):
            if isinstance(v, str):
                return v.replace(old, new)
            if isinstance(v, dict):
                return {k: sub(x) for k, x in v.items()}
            if isinstance(v, list):
                return [sub(x) for x in v]
            return v

        with self.lock:
            self.store.items = sub(self.store.items)

    # ------------------------------------------------------------------ dispatch

    def answer(self, req: Request) -> Reply:
        with self.lock:
            return self._answer(req)

    def _answer(self, req: Request) -> Reply:
        api, method, path = req.api, req.method, req.path
        key = resource_key(path)
        if api == UPLOAD:
            return Reply(200, {})
        if api == "storage" and path.startswith("/upload/"):
            return self._storage_upload(req, key)
        if re.search(r"(:getIamPolicy|/iam)$", path) and method in ("GET", "POST"):
            return Reply(200, self.store.policies.get(key.rsplit(":", 1)[0].removesuffix("/iam"), _empty_policy()))
        if re.search(r"(:setIamPolicy|/iam)$", path) and method in ("POST", "PUT"):
            policy = req.body.get("policy", req.body) if isinstance(req.body, dict) else {}
            policy = {**policy, "etag": "BwY="}
            self.store.policies[key.rsplit(":", 1)[0].removesuffix("/iam")] = policy
            return Reply(200, policy)
        if re.search(r"/operations/[^/]+$", key) and method == "GET":
            return Reply(200, self.store.items.get(key, {"name": key, "done": True}))
        special = getattr(self, f"_{api}", None)
        if special:
            reply = special(req, key)
            if reply is not None:
                return reply
        if method == "GET":
            found = self._lookup(key)
            if found is not None:
                return Reply(200, found)
            children = self._children(key)
            if children is not None:
                return Reply(200, {_list_field(api, key): children})
            return _not_found(key)
        if method == "DELETE":
            self.store.items.pop(key, None)
            return self._done(req, key, {})
        if method == "PUT":
            return self._create(req, key, _unwrap(req.body or {}))
        if method == "PATCH":
            if key not in self.store.items:
                return _not_found(key)
            body = req.body or {}
            mask = req.query.get("updateMask", [body.get("updateMask", "")])[0]
            resource = _patch(self.store.items[key], _unwrap(body), mask)
            self._decorate(api, key, resource)
            return self._done(req, key, resource)
        if method == "POST":
            if ":" in key.rsplit("/", 1)[-1]:  # a custom method we do not model: accept it
                return self._done(req, key, {})
            return self._create(req, self._new_key(req, key), _unwrap(req.body or {}))
        return Reply(405, {"error": {"code": 405, "message": f"{method} not modelled"}})

    def _lookup(self, key: str) -> dict | None:
        if key in self.store.items:
            return self.store.items[key]
        if key.startswith("projects/-/"):  # "any project" (IAM addresses accounts by email this way)
            pattern = re.compile("projects/[^/]+/" + re.escape(key.removeprefix("projects/-/")))
            return next((v for k, v in self.store.items.items() if pattern.fullmatch(k)), None)
        return None

    def _children(self, collection: str) -> list | None:
        """A GET of a collection lists what is under it. Names alternate collection/id (``projects/p/topics``,
        ``b/bucket/o``): an odd number of segments names a collection."""
        if collection.count("/") % 2:
            return None
        prefix = collection + "/"
        return [v for k, v in self.store.items.items() if k.startswith(prefix) and "/" not in k[len(prefix) :]]

    def _new_key(self, req: Request, collection: str) -> str:
        body = req.body if isinstance(req.body, dict) else {}
        if "accountId" in body:  # IAM: the account is addressed by its email
            project = collection.split("/")[1]
            return f"{collection}/{body['accountId']}@{project}.iam.gserviceaccount.com"
        ids = [v[0] for k, v in req.query.items() if k.endswith("Id") and v] + [
            v for k, v in body.items() if _is_id(k, v)
        ]
        if ids:  # ?topicId=..., {"roleId": ...}
            return f"{collection}/{ids[0]}"
        name = body.get("name") or body.get("metadata", {}).get("name")
        if name:
            return name if "/" in name else f"{collection}/{name}"
        return f"{collection}/{self.store.next_id()}"

    def _create(self, req: Request, key: str, resource: dict) -> Reply:
        if key in self.store.items and req.method == "POST":
            return Reply(409, {"error": {"code": 409, "message": f"{key} already exists", "status": "ALREADY_EXISTS"}})
        resource = copy.deepcopy(resource)
        self._decorate(req.api, key, resource)
        self.store.items[key] = resource
        return self._done(req, key, resource)

    def _done(self, req: Request, key: str, resource: dict) -> Reply:
        if req.api in OPERATION_APIS and (req.api, req.method) not in SYNC_METHODS:
            parent = re.match(r"(projects/[^/]+(?:/locations/[^/]+)?)", key)
            name = f"{parent[1] if parent else 'operations'}/operations/op-{self.store.next_id()}"
            op = {"name": name, "done": True, "response": resource}
            if req.api in OPERATION_METADATA:
                op["metadata"] = OPERATION_METADATA[req.api]
            self.store.items[name] = op
            return Reply(200, self.store.items[name])
        return Reply(200, resource)

    # ------------------------------------------------------------------ what the server sets

    def _decorate(self, api: str, key: str, r: dict) -> None:
        short = key.rsplit("/", 1)[-1]
        if api == "storage" and key.startswith("b/") and key.count("/") == 1:
            r.setdefault("id", short)
            r.setdefault("kind", "storage#bucket")
        elif api == "storage" and "/notificationConfigs/" in key:
            r.setdefault("id", short)
            r.setdefault("kind", "storage#notification")
            if not r.get("topic", "//").startswith("//"):  # the API answers with the full resource name
                r["topic"] = f"//pubsub.googleapis.com/{r['topic']}"
        elif api == "iam" and "/serviceAccounts/" in key:
            project = key.split("/")[1]
            r.update(name=f"projects/{project}/serviceAccounts/{short}", email=short, uniqueId="100000000000000000001")
        elif api == "logging" and "/sinks/" in key:
            r.setdefault("writerIdentity", SINK_WRITER)
        elif api == "cloudfunctions" and "/functions/" in key:
            project, region = key.split("/")[1], key.split("/")[3]
            r.update(name=key, state="ACTIVE", environment="GEN_2", url=run_url(short))
            r.setdefault("serviceConfig", {}).update(
                uri=run_url(short), service=f"projects/{project}/locations/{region}/services/{short}"
            )
        elif api == "run" and key.startswith("namespaces/"):
            _ready_run_service(r, short)
        elif api == "iam" and "/roles/" in key:
            r.update(name=key, etag="BwY=")
        elif api in ("pubsub", "secretmanager", "artifactregistry", "cloudscheduler"):
            r.setdefault("name", key)

    # ------------------------------------------------------------------ per-API facts

    def _serviceusage(self, req: Request, key: str) -> Reply | None:
        if req.method == "GET" and re.fullmatch(r"projects/[^/]+/services/[^/]+", key):
            return Reply(200, {"name": key, "state": "ENABLED"})  # every API is on
        return None

    def _cloudresourcemanager(self, req: Request, key: str) -> Reply | None:
        if req.method == "GET" and re.fullmatch(r"projects/[^/]+", key):
            return Reply(200, {"projectId": key.split("/")[1], "projectNumber": PROJECT_NUMBER, "name": key})
        return None

    def _iam(self, req: Request, key: str) -> Reply | None:
        # the default compute account (Cloud Build's default identity) exists in every project
        m = re.fullmatch(r"projects/[^/]+/serviceAccounts/((\d+)-compute@developer\.gserviceaccount\.com)", key)
        if req.method == "GET" and m:
            return Reply(200, {"name": f"projects/{m[2]}/serviceAccounts/{m[1]}", "email": m[1]})
        return None

    def _secretmanager(self, req: Request, key: str) -> Reply | None:
        if key.endswith(":addVersion"):
            return Reply(200, {"name": f"{key.removesuffix(':addVersion')}/versions/1", "state": "ENABLED"})
        return None

    def _cloudfunctions(self, req: Request, key: str) -> Reply | None:
        if req.method == "GET" and key.endswith("/runtimes"):
            return Reply(200, {"runtimes": [{"name": "python311", "stage": "GA", "environment": "GEN_2"}]})
        if key.endswith(":generateUploadUrl"):
            n = self.store.next_id()
            return Reply(
                200,
                {
                    "uploadUrl": f"http://{UPLOAD}.{DOMAIN}/gcf-v2-uploads/{n}.zip?signature=x",
                    "storageSource": {"bucket": f"gcf-v2-uploads-{PROJECT_NUMBER}", "object": f"{n}.zip"},
                },
            )
        return None

    def _cloudbuild(self, req: Request, key: str) -> Reply | None:
        if req.method == "GET" and key.endswith("/defaultServiceAccount"):
            sa = f"projects/-/serviceAccounts/{BUILD_ACCOUNT}"
            return Reply(200, {"name": key, "serviceAccountEmail": sa})
        if req.method == "POST" and key.endswith("/builds"):  # builds.create (gcloud builds submit)
            return Reply(200, self._build(key.removesuffix("/builds"), req.body or {}))
        return None

    def _run(self, req: Request, key: str) -> Reply | None:
        if req.method == "POST" and key.endswith("/builds:submit"):  # source deploys build through Cloud Run v2
            body = req.body or {}
            op = self._build(key.removesuffix("/builds:submit"), {"images": [body.get("imageUri", "")]})
            return Reply(200, {"buildOperation": op, "baseImageUri": body.get("buildpackBuild", {}).get("baseImage")})
        return None

    def _build(self, parent: str, build: dict) -> dict:
        """A Cloud Build build that already succeeded, and its operation (both readable later)."""
        project = parent.split("/")[1]
        region = parent.split("/")[3] if "/locations/" in parent else "global"
        build_id = f"build-{self.store.next_id()}"
        subs = build.get("substitutions", {})
        images = [re.sub(r"\$\{(\w+)\}", lambda m: subs.get(m[1], m[0]), i) for i in build.get("images", []) if i]
        build = {
            **copy.deepcopy(build),
            "id": build_id,
            "name": f"projects/{project}/locations/{region}/builds/{build_id}",
            "projectId": project,
            "status": "SUCCESS",
            "logUrl": f"https://console.cloud.google.com/cloud-build/builds;region={region}/{build_id}",
            "results": {"images": [{"name": i, "digest": "sha256:" + "0" * 64} for i in images]},
        }
        self.store.items[f"projects/{project}/locations/{region}/builds/{build_id}"] = build
        for image in images:
            self._push(image)
        op = {
            "name": f"projects/{project}/locations/{region}/operations/{build_id}",
            "done": True,
            "metadata": {
                "@type": "type.googleapis.com/google.devtools.cloudbuild.v1.BuildOperationMetadata",
                "build": build,
            },
            "response": {"@type": "type.googleapis.com/google.devtools.cloudbuild.v1.Build", **build},
        }
        self.store.items[op["name"]] = op
        return op

    def _push(self, image: str) -> None:
        """What a successful build leaves in Artifact Registry: the tag and the image it points at."""
        m = re.fullmatch(r"([\w-]+)-docker\.pkg\.dev/([^/]+)/([^/]+)/([^:@]+):([\w.-]+)", image)
        if not m:
            return
        region, project, repo, package, tag = m.groups()
        digest = "sha256:" + "0" * 64
        base = f"projects/{project}/locations/{region}/repositories/{repo}"
        version = f"{base}/packages/{package}/versions/{digest}"
        self.store.items[f"{base}/packages/{package}/tags/{tag}"] = {
            "name": f"{base}/packages/{package}/tags/{tag}",
            "version": version,
        }
        self.store.items[version] = {"name": version}
        self.store.items[f"{base}/dockerImages/{package}@{digest}"] = {
            "name": f"{base}/dockerImages/{package}@{digest}",
            "uri": f"{region}-docker.pkg.dev/{project}/{repo}/{package}@{digest}",
            "tags": [tag],
        }

    def _storage(self, req: Request, key: str) -> Reply | None:
        if req.method == "GET" and re.fullmatch(r"projects/[^/]+/serviceAccount", key):  # the GCS service agent
            return Reply(200, {"email_address": GCS_AGENT, "kind": "storage#serviceAccount"})
        return None

    def _storage_upload(self, req: Request, key: str) -> Reply:
        meta = req.body[0] if isinstance(req.body, list) and req.body and isinstance(req.body[0], dict) else {}
        bucket = key.split("/")[1]
        name = meta.get("name") or req.query.get("name", [""])[0]
        obj = {**meta, "bucket": bucket, "name": name, "kind": "storage#object", "generation": "1"}
        self.store.items[f"b/{bucket}/o/{name}"] = obj
        return Reply(200, obj)


def _empty_policy() -> dict:
    return {"bindings": [], "etag": "BwY=", "version": 1}


def _list_field(api: str, key: str) -> str:
    if api == "storage":
        return "items"
    return key.rsplit("/", 1)[-1]  # topics, subscriptions, sinks, ...


def _ready_run_service(r: dict, name: str) -> None:
    """Cloud Run (v1, Knative) answers create/replace with the service; gcloud then polls until it is Ready."""
    meta = r.setdefault("metadata", {})
    meta["generation"] = meta.get("generation", 0) + 1
    revision = f"{name}-{meta['generation']:05d}-abc"
    r["status"] = {
        "observedGeneration": meta["generation"],
        "conditions": [{"type": t, "status": "True"} for t in ("Ready", "ConfigurationsReady", "RoutesReady")],
        "latestCreatedRevisionName": revision,
        "latestReadyRevisionName": revision,
        "url": run_url(name),
        "address": {"url": run_url(name)},
        "traffic": [{"revisionName": revision, "percent": 100, "latestRevision": True}],
    }


# ---------------------------------------------------------------------- HTTP plumbing


def _multipart(content_type: str, raw: bytes) -> list:
    """apitools writes ``boundary='...'`` (single quotes), which the email package does not accept: split by hand.
    JSON parts are parsed; others become their size."""
    m = re.search(r"boundary=(?:\"([^\"]+)\"|'([^']+)'|([^;\s]+))", content_type)
    boundary = ("--" + next(g for g in m.groups() if g)).encode()
    parts = []
    for chunk in raw.split(boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk.lstrip(b"\r\n")
        ends = [(i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (i := chunk.find(sep)) >= 0]
        at, n = min(ends)
        head, data = chunk[:at], chunk[at + n :].removesuffix(b"\n").removesuffix(b"\r")
        if b"application/json" in head.lower():
            parts.append(json.loads(data))
        else:
            parts.append({"<bytes>": len(data)})
    return parts


def _parse_body(content_type: str, raw: bytes) -> object:
    if not raw:
        return None
    if content_type.startswith("application/json"):
        try:
            return json.loads(raw)
        except ValueError:
            return {"<bytes>": len(raw)}
    if content_type.startswith("multipart/"):
        return _multipart(content_type, raw)
    return {"<bytes>": len(raw)}


class FakeGcloudApis:
    """An HTTP proxy on 127.0.0.1 that serves ``FakeApis`` for ``<api>.gcloud.test`` hosts and records requests."""

    def __init__(self, apis: FakeApis | None = None):
        self.apis = apis or FakeApis()
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeGcloudApis:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def env(self, config_dir: Path, base: dict | None = None) -> dict[str, str]:
        return gcloud_env(config_dir, self.port, base)

    def take(self) -> list[Request]:
        """The requests recorded since the last call (gcloud has exited: each was recorded before its reply)."""
        with self._lock:
            out, self.requests = self.requests, []
        return out

    def _record(self, req: Request) -> None:
        with self._lock:
            self.requests.append(req)

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            tunnel_host = ""

            def log_message(self, *args) -> None:
                pass

            def do_CONNECT(self) -> None:
                host, _, port = self.path.rpartition(":")
                if host.endswith(f".{DOMAIN}") and port == "80":  # a client that tunnels plain HTTP too
                    self.tunnel_host = host
                    self.send_response(200, "Connection established")
                    self.end_headers()
                    return
                fake._record(Request(ESCAPED, self.path, "CONNECT", "", {}, status=403))
                self.send_error(403, f"{self.path} is not faked: add an endpoint override")
                self.close_connection = True

            def _serve(self) -> None:
                url = urlsplit(self.path)
                host = (url.hostname or self.tunnel_host or self.headers.get("Host", "")).split(":")[0]
                raw = self._read_body()
                query = {k: v for k, v in sorted(parse_qs(url.query, keep_blank_values=True).items())}
                body = _parse_body(self.headers.get("Content-Type", ""), raw)
                api = host.removesuffix(f".{DOMAIN}").rsplit("-", 1)[-1] if host.endswith(f".{DOMAIN}") else ""
                req = Request(api or ESCAPED, host, self.command, url.path, query, body)
                if not api:
                    reply = Reply(403, {"error": {"code": 403, "message": f"{host} is not faked"}})
                else:
                    try:
                        reply = fake.apis.answer(req)
                    except Exception as e:  # a bug in the fake must show up as an error, not a hang
                        reply = Reply(500, {"error": {"code": 500, "message": f"fake: {type(e).__name__}: {e}"}})
                req.status = reply.status
                fake._record(req)
                data = json.dumps(reply.body).encode()
                self.send_response(reply.status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if not size:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve

        return Handler
