"""Trainer entrypoint: what a Vertex AI CustomJob runs (``python -m task``), and the local job runner too.

Reads the dataset from GCS, fine-tunes the base model contrastively, writes the model artifact to ``AIP_MODEL_DIR``
and ``metrics.json`` to the run folder (the parent of ``AIP_MODEL_DIR``: ``<base>/`` or ``<base>/<trial_id>/``).
Hyperparameters come as flags, ``--learning-rate=...`` or ``--learning_rate=...`` (what HP tuning passes).

- Checkpoints every ``--checkpoint-every`` steps to ``AIP_CHECKPOINT_DIR``; a restarted job resumes from the latest.
- Scalars to ``AIP_TENSORBOARD_LOG_DIR`` (TensorBoard files if ``tensorboard`` is installed, else ``scalars.jsonl``).
- Multi-worker DDP from torchrun env or ``CLUSTER_SPEC`` (``embedpipe.distributed``); only rank 0 writes outputs.
- After training, rank 0 evaluates the model on the test qrels (exact cosine top-100) and, in an HP-tuning trial
  (``CLOUD_ML_TRIAL_ID`` or ``CLOUD_ML_HP_METRIC_FILE`` set), reports every eval metric in the hypertune format
  (tags ``recall_at_10``, ``ndcg_at_10``, ...), so whichever one the study optimises is there.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from embedpipe import datasets, distributed, hypertune, logs, storage
from embedpipe.checkpoints import Checkpoints
from embedpipe.model import ModelInfo, git_sha, load_model, save_model
from embedpipe.scalars import ScalarLog
from embedpipe.training import TrainParams, evaluate_exact, train

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
        ("log_every", int),
        ("checkpoint_every", int),
        ("mini_batch_size", int),
    ):
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        p.add_argument(*flags, dest=name, type=kind, default=getattr(TrainParams, name))
    return p.parse_args(argv)


def versions() -> dict:
    import sentence_transformers
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "cuda": torch.version.cuda or "",
    }


def main(argv: list[str]) -> int:
    logs.setup()
    args = parse_args(argv)
    model_dir = os.environ["AIP_MODEL_DIR"]  # gs://.../runs/<run_id>/model/
    run_dir = model_dir.rstrip("/").rsplit("/", 1)[0]
    t0 = time.time()
    dist = distributed.from_env()
    if not dist.participates:
        log.info("this replica is not a training worker (CLUSTER_SPEC task outside pools 0/1): nothing to do")
        return 0
    device = distributed.init(dist)
    log.info("rank %d/%d (%s) on %s", dist.rank, dist.world_size, dist.source, device)
    ds = datasets.load_gcs(args.data_bucket, args.dataset)
    pairs = ds.training_pairs()
    source = "pairs/" if ds.pairs else ("qrels/train.tsv" if ds.qrels.get("train") else "derived from corpus")
    log.info("dataset %s: %d docs, %d training pairs (%s)", args.dataset, len(ds.corpus), len(pairs), source)
    model, base = load_model(args.base_model, device=device)
    params = TrainParams(**{k: getattr(args, k) for k in TrainParams.__dataclass_fields__ if hasattr(args, k)})
    ckpt_dir = os.environ.get("AIP_CHECKPOINT_DIR")
    scalars = ScalarLog(os.environ.get("AIP_TENSORBOARD_LOG_DIR")) if dist.is_primary else None
    stats = train(
        model,
        pairs,
        params,
        dist_info=dist,
        checkpoints=Checkpoints(ckpt_dir) if ckpt_dir else None,
        scalars=scalars,
    )
    log.info("rank %d/%d trained %d steps", dist.rank, dist.world_size, stats["steps"])
    distributed.shutdown()
    if not dist.is_primary:
        log.info("rank %d: done; rank 0 writes the model and metrics", dist.rank)
        return 0
    eval_metrics = evaluate_exact(model, ds, base.query_prefix, base.document_prefix)
    log.info("eval on %s qrels: %s", ds.eval_split(), eval_metrics)
    info = ModelInfo(
        base_model=args.base_model,
        dim=base.dim,
        max_seq_length=params.max_seq_length,
        query_prefix=base.query_prefix,
        document_prefix=base.document_prefix,
        git_sha=git_sha(),
        data_fingerprint=ds.fingerprint(),
        metrics=eval_metrics,
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
        "versions": versions(),
        "device": device,
        "rank_source": dist.source,
        "trial": os.environ.get("CLOUD_ML_TRIAL_ID", ""),
        "eval_split": ds.eval_split(),
        "eval": eval_metrics,
        "seconds": round(time.time() - t0, 3),
        **stats,
    }
    storage.write_json(f"{run_dir}/metrics.json", metrics)
    if scalars is not None:
        for key, value in eval_metrics.items():
            scalars.add(f"eval/{key}", value, stats["steps"])
        scalars.close()
    if os.environ.get("CLOUD_ML_TRIAL_ID") or os.environ.get("CLOUD_ML_HP_METRIC_FILE"):
        for key, value in eval_metrics.items():
            hypertune.report(key, value, stats["steps"])
        log.info("hypertune: %d metrics reported to %s", len(eval_metrics), hypertune.metric_file())
    log.info("model %s written to %s (%.1f pairs/s)", info.fingerprint, model_dir, stats["pairs_per_s"] or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
