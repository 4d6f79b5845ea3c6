"""Trainer entrypoint: what a Vertex AI CustomJob runs (``python -m task``), and the local job runner too.

Reads the dataset from GCS, fine-tunes the base model contrastively, writes the model artifact to ``AIP_MODEL_DIR``
and ``metrics.json`` to the run folder. Hyperparameters come as ``--name=value`` flags, as HP tuning passes them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from embedpipe import datasets, logs, storage
from embedpipe.model import ModelInfo, git_sha, load_model, save_model
from embedpipe.training import TrainParams, train

log = logging.getLogger("trainer")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--data-bucket", default=os.environ.get("EMBEDPIPE_DATA_BUCKET", "embedpipe-data"))
    p.add_argument("--base-model", required=True)
    for name, kind in (
        ("learning_rate", float),
        ("batch_size", int),
        ("max_steps", int),
        ("epochs", int),
        ("max_seq_length", int),
        ("warmup_ratio", float),
        ("seed", int),
    ):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=getattr(TrainParams, name))
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    logs.setup()
    args = parse_args(argv)
    model_dir = os.environ["AIP_MODEL_DIR"]  # gs://.../runs/<run_id>/model/
    run_dir = model_dir.rstrip("/").rsplit("/", 1)[0]
    t0 = time.time()
    ds = datasets.load_gcs(args.data_bucket, args.dataset)
    pairs = ds.training_pairs()
    source = "pairs/" if ds.pairs else ("qrels/train.tsv" if ds.qrels.get("train") else "derived from corpus")
    log.info("dataset %s: %d docs, %d training pairs (%s)", args.dataset, len(ds.corpus), len(pairs), source)
    model, base = load_model(args.base_model)
    params = TrainParams(**{k: getattr(args, k) for k in TrainParams.__dataclass_fields__ if hasattr(args, k)})
    stats = train(model, pairs, params)
    info = ModelInfo(
        base_model=args.base_model,
        dim=base.dim,
        max_seq_length=params.max_seq_length,
        query_prefix=base.query_prefix,
        document_prefix=base.document_prefix,
        git_sha=git_sha(),
        data_fingerprint=ds.fingerprint(),
    )
    with tempfile.TemporaryDirectory() as tmp:
        info = save_model(model, Path(tmp), info)
        storage.upload_dir(Path(tmp), model_dir)
    metrics = {
        "model_version": info.version,
        "fingerprint": info.fingerprint,
        "pairs": len(pairs),
        "pairs_source": source,
        "git_sha": info.git_sha,
        "seconds": round(time.time() - t0, 3),
        **stats,
    }
    storage.write_json(f"{run_dir}/metrics.json", metrics)
    log.info("model %s written to %s (%.1f pairs/s)", info.fingerprint, model_dir, stats["pairs_per_s"] or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
