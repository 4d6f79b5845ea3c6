"""The model registry: every promoted model is a version of one Vertex AI Model per dataset, and the version alias
``promoted`` follows the Milvus alias (issue 14).

One small protocol, ``ModelRegistry`` (``register`` a run's model, ``point_alias`` at a version), with two backends
picked from Settings the way ``jobs.launchers.for_settings`` picks the job launcher (``for_settings``):

- ``VertexRegistry``: the gapic ``aiplatform_v1.ModelServiceClient`` (imported lazily) over REST, with the endpoint and
  credentials of ``gcp.vertexai.client_options`` (``EMBEDPIPE_VERTEX_ENDPOINT``; ``http://`` = a local test server).
- ``LocalRegistry``: a no-op. Locally there is no registry; ``promote`` still returns what it would have done, and the
  indexer keeps that in the run record (``registry``), so the local loop shows the step.

What a version is: ``UploadModel`` of the run's model folder (``artifact_uri``, the ``gs://`` dir that loads with
``load_model``) into the Model ``embedpipe-<dataset>`` (the first upload creates it with that id; later ones name it
as ``parent_model``). Labels: ``run_id``, ``dataset`` and the scalar fields of the model's ``embedpipe.json``
(fingerprint, base model, dim, max_seq_length, pooling, normalize, similarity, tuned, git SHA, data and
preprocessing fingerprints), sanitized like job labels (``gcp.vertexai.label_value``); the version description is JSON
with the run id, the index's test metrics as promoted and the model's own selection metrics. The serving container
is the embedder image started as ``python -m task serve`` (``embedpipe.ml.serving``: Vertex's custom-container
contract), so a registered version also serves batch prediction and online endpoints.

Aliases: ``promoted`` (``ALIAS``) names the version whose index is live, and ``default`` is moved with it, so a
prediction that names the Model without a version gets the promoted one. ``default`` is Vertex's own alias (the first
version gets it; one version always holds it), hence not our alias's name. Vertex documents that an alias names one
version per Model and that applying it to a version takes it off the other; ``point_alias`` still clears
``promoted`` from any other holder it finds afterwards, so the move is right either way. Only promoted models are
registered: a model the gate rejected never becomes a version.

Idempotent under at-least-once delivery: the run id is a label, and ``register`` first lists the Model's versions
with that label and returns the one it finds. An upload is a long-running operation; ``register`` waits for it up to
``EMBEDPIPE_REGISTRY_WAIT_S`` and raises ``RegistrationPending`` (the operation's name) past that: the upload goes on
in Vertex, and whoever calls next for that run finds the finished version by its label. Two deliveries racing past
the list both upload; each lists again afterwards and keeps the oldest version with the run's label, deleting the
others (as ``vertex.py`` keeps the oldest job of a key).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Protocol

from embedpipe.config import Settings
from embedpipe.gcp import storage
from embedpipe.ledger import runs
from embedpipe.ml import model, serving

log = logging.getLogger(__name__)

ALIAS = "promoted"  # follows the Milvus alias; `default` is Vertex's reserved one (see the module doc)
DEFAULT_ALIAS = "default"
RUN_LABEL = "run_id"
# embedpipe.json fields that become labels (scalars; the rest goes into the version description)
INFO_LABELS = (
    "fingerprint",
    "base_model",
    "dim",
    "max_seq_length",
    "pooling",
    "normalize",
    "similarity",
    "tuned",
    "git_sha",
    "data_fingerprint",
    "preprocessing_fingerprint",
)


class RegistrationPending(Exception):
    """The upload did not finish within ``registry_wait_s``; it goes on in Vertex (``operation``)."""

    def __init__(self, operation: str):
        super().__init__(f"model upload {operation} still running")
        self.operation = operation


class ModelRegistry(Protocol):
    name: str  # local | vertex: what the run record says

    def model_name(self, dataset: str) -> str: ...
    def register(
        self, dataset: str, run_id: str, model_uri: str, info: dict | None = None, metrics: dict | None = None
    ) -> str: ...
    def point_alias(self, dataset: str, version: str) -> None: ...
    def clear_alias(self, dataset: str) -> None: ...


def model_id(dataset: str) -> str:
    """The Model's id: ``embedpipe-<dataset>`` (dataset names are ``[a-z0-9][a-z0-9_-]{0,62}``, valid id characters);
    past Vertex's 63 characters, a prefix and a hash of the whole name, so two long names never share a Model."""
    full = f"embedpipe-{dataset}"
    if len(full) <= 63:
        return full
    return f"{full[:54]}-{hashlib.sha256(dataset.encode()).hexdigest()[:8]}"


def label_value(value) -> str:
    from embedpipe.gcp.vertexai import label_value as sanitized

    return sanitized(str(value).lower() if isinstance(value, bool) else value)


def read_info(model_uri: str) -> dict:
    """The model's ``embedpipe.json`` ({} when it has none, e.g. a base model shipped without one)."""
    return storage.read_json(f"{model_uri.rstrip('/')}/{model.INFO_FILE}") or {}


class LocalRegistry:
    """No registry on a laptop: nothing is sent; the version name is what the cloud's would be keyed by."""

    name = "local"

    def __init__(self, settings: Settings):
        self.settings = settings

    def model_name(self, dataset: str) -> str:
        return model_id(dataset)

    def register(
        self, dataset: str, run_id: str, model_uri: str, info: dict | None = None, metrics: dict | None = None
    ) -> str:
        return f"{self.model_name(dataset)}@{run_id}"

    def point_alias(self, dataset: str, version: str) -> None:
        log.debug("local model registry: alias %s -> %s not sent anywhere", ALIAS, version)

    def clear_alias(self, dataset: str) -> None:
        pass


class VertexRegistry:
    name = "vertex"

    def __init__(self, settings: Settings, credentials=None, info_reader: Callable[[str], dict] | None = None):
        self.settings = settings
        self._credentials = credentials
        self._client = None
        self.read_info = info_reader or read_info  # a model URI -> its embedpipe.json (tests pass their own)

    @property
    def parent(self) -> str:
        from embedpipe.gcp.vertexai import parent

        return parent(self.settings)

    @property
    def client(self):
        if self._client is None:
            from google.cloud import aiplatform_v1

            from embedpipe.gcp.vertexai import client_options

            self._client = aiplatform_v1.ModelServiceClient(**client_options(self.settings, self._credentials))
        return self._client

    def model_name(self, dataset: str) -> str:
        return f"{self.parent}/models/{model_id(dataset)}"

    # ---------------------------------------------------------------- requests
    def model_request(self, dataset: str, run_id: str, model_uri: str, info: dict, metrics: dict) -> dict:
        if not self.settings.embedder_image:
            raise ValueError("the registry serves models from the embedder image: set EMBEDPIPE_EMBEDDER_IMAGE")
        labels = {"app": "embedpipe", "dataset": dataset, RUN_LABEL: run_id}
        labels |= {k: info[k] for k in INFO_LABELS if info.get(k) not in (None, "")}
        description = {
            "run_id": run_id,
            "metrics": metrics,  # the index's, on the test split, as promoted
            "selection_metrics": info.get("metrics") or {},  # the model's own, on the selection split
            "version": info.get("version", ""),
            "query_prefix": info.get("query_prefix", ""),
            "document_prefix": info.get("document_prefix", ""),
        }
        return {
            "display_name": model_id(dataset),
            "description": f"embedpipe: the embedding model of dataset {dataset}",
            "version_description": json.dumps(description, sort_keys=True),
            "artifact_uri": model_uri.rstrip("/"),
            "container_spec": {
                "image_uri": self.settings.embedder_image,
                "args": ["serve"],  # the image's entrypoint is `python -m task`
                "ports": [{"container_port": serving.PORT}],
                "predict_route": serving.PREDICT_ROUTE,
                "health_route": serving.HEALTH_ROUTE,
            },
            "labels": {label_value(k): label_value(v) for k, v in labels.items()},
        }

    # ---------------------------------------------------------------- protocol
    def register(
        self, dataset: str, run_id: str, model_uri: str, info: dict | None = None, metrics: dict | None = None
    ) -> str:
        exists, versions = self._versions(dataset, run_id)
        if versions:
            log.info("model of run %s already registered as %s", run_id, versions[0])
            return versions[0]
        info = self.read_info(model_uri) if info is None else info
        body = self.model_request(dataset, run_id, model_uri, info, metrics or {})
        created = self._upload(dataset, body, exists)
        _, same = self._versions(dataset, run_id)
        keeper = same[0] if same else created
        for duplicate in [v for v in same if v != keeper]:  # another delivery uploaded the same run meanwhile
            log.warning("deleting duplicate model version %s of run %s (keeping %s)", duplicate, run_id, keeper)
            self._delete(duplicate)
        log.info("registered the model of run %s as %s (%s)", run_id, keeper, model_uri)
        return keeper

    def point_alias(self, dataset: str, version: str) -> None:
        # Vertex moves an alias that another version holds (it names one version per Model): one call, no clean-up
        # pass, which could strip the alias off a version a concurrent move (a rollback) just gave it.
        self.client.merge_version_aliases(name=version, version_aliases=[ALIAS, DEFAULT_ALIAS])
        log.info("model alias %s -> %s", ALIAS, version)

    def clear_alias(self, dataset: str) -> None:
        for holder in self._holders(dataset, ALIAS):  # `default` stays: one version must always hold it
            log.info("taking alias %s off %s (its index is no longer live)", ALIAS, holder)
            self.client.merge_version_aliases(name=holder, version_aliases=[f"-{ALIAS}"])

    # ---------------------------------------------------------------- helpers
    def _list(self, dataset: str, label_filter: str = "") -> tuple[bool, list]:
        """(whether the Model exists, its versions [matching the filter], oldest first)."""
        from google.api_core import exceptions as gexc

        request = {"name": self.model_name(dataset)}
        if label_filter:
            request["filter"] = label_filter
        try:
            found = list(self.client.list_model_versions(request=request))
        except gexc.NotFound:
            return False, []
        found.sort(key=lambda m: int(m.version_id) if str(m.version_id).isdigit() else 0)
        return True, found

    def _versions(self, dataset: str, run_id: str) -> tuple[bool, list[str]]:
        exists, found = self._list(dataset, f'labels.{RUN_LABEL}="{label_value(run_id)}"')
        return exists, [_version_name(m) for m in found]

    def _holders(self, dataset: str, alias: str) -> list[str]:
        return [_version_name(m) for m in self._list(dataset)[1] if alias in m.version_aliases]

    def _upload(self, dataset: str, body: dict, exists: bool) -> str:
        from google.api_core import exceptions as gexc

        request = {"parent": self.parent, "model": body}
        try:
            if exists:
                op = self.client.upload_model(request={**request, "parent_model": self.model_name(dataset)})
            else:  # the first version creates the Model under our id
                op = self.client.upload_model(request={**request, "model_id": model_id(dataset)})
        except gexc.Conflict:  # another delivery created the Model first (409; REST names it Conflict): add a version
            op = self.client.upload_model(request={**request, "parent_model": self.model_name(dataset)})
        try:
            result = op.result(timeout=self.settings.registry_wait_s)
        except (concurrent.futures.TimeoutError, gexc.RetryError):
            raise RegistrationPending(op.operation.name) from None
        return f"{result.model.split('@')[0]}@{result.model_version_id}"

    def _delete(self, version: str) -> None:
        from google.api_core import exceptions as gexc

        try:
            self.client.delete_model_version(name=version)
        except gexc.GoogleAPICallError as exc:  # a leftover version is untidy, not wrong: the alias names one
            log.warning("could not delete duplicate model version %s: %s", version, exc)


def _version_name(m) -> str:
    return f"{m.name.split('@')[0]}@{m.version_id}"


def for_settings(settings: Settings) -> ModelRegistry:
    """Vertex in gcp mode (``EMBEDPIPE_MODEL_REGISTRY=auto``, the default) or when asked for, else the no-op."""
    if settings.model_registry == "vertex" or (settings.model_registry == "auto" and settings.mode == "gcp"):
        return VertexRegistry(settings)
    return LocalRegistry(settings)


def promote(
    reg: ModelRegistry,
    dataset: str,
    run_id: str,
    model_uri: str,
    metrics: dict | None = None,
    still_live: Callable[[], bool] | None = None,
    clock: Callable[[], float] = time.time,
) -> dict:
    """Register the model of ``run_id`` (once: a version already registered for that run is reused) and point the
    alias at it, unless ``still_live()`` says the index is no longer the live one by then (a rollback or another
    promotion overtook this one while the upload ran: it moves the alias itself). Returns what the run record
    keeps. Never raises: the index is promoted already and stays promoted. A failed or pending registration is
    recorded (``state`` failed | pending, with the error or the operation) and the alias is taken off the previous
    model (it no longer serves the live index; ``default`` stays, Vertex needs one holder); the dataset's next
    promotion or rollback runs this same step and catches up. ``clock``: wall time for the record's ``at`` (the
    caller's ledger clock)."""
    if model.is_base_artifact(model_uri):  # a first run's fallback: the untuned model is no run's model to version
        return not_registered(reg, "the untuned base model serves (a first run's fallback): not registered")
    out = {"registry": reg.name, "model": reg.model_name(dataset), "alias": ALIAS, "run_id": run_id}
    version = None
    try:
        version = reg.register(dataset, run_id, model_uri, metrics=metrics)
        if still_live is not None and not still_live():
            log.info("dataset %s: run %s is no longer live: alias left to what replaced it", dataset, run_id)
            return {**out, "version": version, "state": "superseded", "at": runs.iso(clock())}
        reg.point_alias(dataset, version)
    except Exception as exc:  # recorded, not raised: see the docstring
        pending = isinstance(exc, RegistrationPending)
        if pending:
            log.warning("dataset %s: %s; the alias moves at the next promotion or rollback", dataset, exc)
        else:
            log.exception("dataset %s: registering the model of run %s failed", dataset, run_id)
        try:
            reg.clear_alias(dataset)
        except Exception:  # noqa: BLE001 - best effort: recorded below either way
            log.exception("dataset %s: could not take alias %s off the previous model", dataset, ALIAS)
        detail = {"operation": exc.operation} if pending else {"error": f"{type(exc).__name__}: {exc}"[:1000]}
        state = "pending" if pending else "failed"
        return {**out, "version": version, "state": state, **detail, "at": runs.iso(clock())}
    state = "noop" if reg.name == "local" else "aliased"  # locally nothing was sent: the record shows the step
    return {**out, "version": version, "state": state, "at": runs.iso(clock())}


def not_registered(reg: ModelRegistry, reason: str) -> dict:
    """The run record's ``registry`` for a run whose model is not registered (rejected by the gate)."""
    return {"registry": reg.name, "state": "not registered", "reason": reason}
