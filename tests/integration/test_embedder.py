"""The embedder as a 3-replica local job (real processes with CLUSTER_SPEC each, fake GCS): the shards are disjoint,
cover the corpus exactly, carry manifests the indexer checks, and every vector is its own document's embedding."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from embedpipe.contracts import datasets
from embedpipe.gcp import storage
from embedpipe.jobs.local import LocalJobLauncher
from embedpipe.jobs.spec import JobSpec
from embedpipe.ml.embedding import encode
from embedpipe.ml.model import ModelInfo, base_artifact, load_model, save_model
from embedpipe.retrieval import lexical
from tests.helpers import FIXTURES, upload_folder


def test_three_replicas_embed_every_document_once(services, tiny_model, tmp_path):
    s = services
    upload_folder(s, FIXTURES / "tiny_beir", "shards")
    model, base = load_model(tiny_model)
    info = save_model(model, tmp_path / "model", ModelInfo(base_model=tiny_model, dim=base.dim, max_seq_length=32))
    run_dir = f"gs://{s.artifacts_bucket}/runs/shard-test"
    storage.upload_dir(tmp_path / "model", f"{run_dir}/model")
    # the untuned model the trainer keeps beside a fine-tune (model.base_artifact): the base vectors come from it
    untuned = ModelInfo(base_model=tiny_model, dim=base.dim, max_seq_length=32, tuned=False)
    kept = save_model(load_model(tiny_model)[0], tmp_path / "base-model", untuned)
    storage.upload_dir(tmp_path / "base-model", base_artifact(f"{run_dir}/model/"))
    spec = JobSpec(
        key="shard-test/embed/1",
        container="embedder",
        replica_count=3,
        base_output_dir=f"{run_dir}/embed",
        args=[
            "--dataset=shards",
            "--run-id=shard-test",
            f"--model-uri={run_dir}/model/",
            f"--output-dir={run_dir}/embeddings",
        ],
        labels={"run_id": "shard-test", "stage": "embed"},
        env={"EMBEDPIPE_DATA_BUCKET": s.data_bucket},
    )
    launcher = LocalJobLauncher(s)
    name = launcher.submit(spec)
    assert launcher.submit(spec) == name  # keyed: a retried submit is the same job
    deadline = time.time() + 180
    while not (status := launcher.get(name)).done and time.time() < deadline:
        time.sleep(0.5)
    assert status.state == "SUCCEEDED", status.error

    manifests = [storage.read_json(u) for u, _ in storage.list_uris(f"{run_dir}/embeddings/manifest-")]
    assert sorted(m["replica"] for m in manifests) == [0, 1, 2] and {m["replicas"] for m in manifests} == {3}
    assert {(m["dim"], m["fingerprint"]) for m in manifests} == {(info.dim, info.fingerprint)}
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(f"{run_dir}/embeddings/{m['file']}"))) for m in manifests]
    shard_ids = [t.column("id").to_pylist() for t in tables]
    assert [len(ids) for ids in shard_ids] == [m["count"] for m in manifests]
    all_ids = [i for ids in shard_ids for i in ids]
    corpus = datasets.load_dir(FIXTURES / "tiny_beir").corpus
    assert sorted(all_ids) == sorted(corpus), "every document exactly once"

    reference, _ = load_model(str(Path(tmp_path / "model")))
    for table in tables:
        ids = table.column("id").to_pylist()
        got = np.array(table.column("vector").to_pylist(), dtype=np.float32)
        want = encode(reference, [corpus[i].full_text for i in ids])
        cos = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        assert cos.min() > 0.999, "each row's vector is its own document's embedding"
    # a fine-tune's full run also carries the base model's vectors (for the base-model baseline) and BM25 stems
    base_model, _ = load_model(tiny_model)
    base_model.max_seq_length = 32
    for table in tables:
        ids = table.column("id").to_pylist()
        assert table.column("bm25_text").to_pylist() == lexical.analyzed([corpus[i].full_text for i in ids])
        got = np.array(table.column("base_vector").to_pylist(), dtype=np.float32)
        want = encode(base_model, [corpus[i].full_text for i in ids])
        assert ((got * want).sum(axis=1)).min() > 0.999
    assert all(m["has_base"] and m["skipped"] == 0 for m in manifests)
    # named in every manifest: a first run whose fine-tune loses can serve an index of these vectors with this model
    assert {(m["base_model_uri"], m["base_fingerprint"]) for m in manifests} == {
        (f"{run_dir}/base-model", kept.fingerprint)
    }
    queries = pq.read_table(io.BytesIO(storage.read_bytes(f"{run_dir}/embeddings/queries.parquet")))
    assert {"id", "text", "bm25_text", "vector", "base_vector"} <= set(queries.column_names)


def test_eval_queries_are_embedded_as_the_search_service_embeds_them(services, tmp_path):
    """Batched queries share a padded width and bf16 kernels round differently (MiniLM: up to 0.002 per component
    against the query alone), which moved the event's nDCG@10 away from what the service serves: the embedder
    encodes each eval query alone, as ``index.search`` does."""
    s = services
    upload_folder(s, FIXTURES / "tiny_beir", "queries-alone")
    model, base = load_model("bundled:all-MiniLM-L6-v2")
    save_model(
        model, tmp_path / "model", ModelInfo(base_model="bundled:all-MiniLM-L6-v2", dim=base.dim, max_seq_length=128)
    )
    run_dir = f"gs://{s.artifacts_bucket}/runs/queries-alone"
    storage.upload_dir(tmp_path / "model", f"{run_dir}/model")
    spec = JobSpec(
        key="queries-alone/embed/1",
        container="embedder",
        replica_count=1,
        base_output_dir=f"{run_dir}/embed",
        args=["--dataset=queries-alone", "--run-id=queries-alone", f"--model-uri={run_dir}/model/",
              f"--output-dir={run_dir}/embeddings"],
        labels={"run_id": "queries-alone", "stage": "embed"},
        env={"EMBEDPIPE_DATA_BUCKET": s.data_bucket},
    )  # fmt: skip
    launcher = LocalJobLauncher(s)
    name = launcher.submit(spec)
    deadline = time.time() + 300
    while not (status := launcher.get(name)).done and time.time() < deadline:
        time.sleep(0.5)
    assert status.state == "SUCCEEDED", status.error
    queries = pq.read_table(io.BytesIO(storage.read_bytes(f"{run_dir}/embeddings/queries.parquet")))
    served, info = load_model(f"{run_dir}/model/", inference=True)
    assert queries.num_rows > 1
    for qid, text, vector in zip(*(queries.column(c).to_pylist() for c in ("id", "text", "vector"))):
        alone = encode(served, [info.query_prefix + text])[0]  # index.search's one-query call
        assert np.array_equal(np.asarray(vector, dtype=np.float32), alone), qid
