"""Trainer entrypoint: what a Vertex AI CustomJob runs (``python -m task``), and the local job runner too.

Reads the dataset from GCS, fine-tunes the base model contrastively, writes the model artifact to ``AIP_MODEL_DIR``
and ``metrics.json`` beside it (the parent of ``AIP_MODEL_DIR``: the attempt's ``<base>/`` or a trial's
``<base>/<trial_id>/``; the indexer reads it from there), and ``intake.json`` there too: the files its load left out
for breaking cross-file rules (``intake.load_checked``), which the pipeline quarantines and reports.
Hyperparameters come as flags, ``--learning-rate=...`` or ``--learning_rate=...`` (what HP tuning passes).

- Checkpoints every ``--checkpoint-every`` steps to ``AIP_CHECKPOINT_DIR``; a restarted job resumes from the latest.
- Scalars to ``AIP_TENSORBOARD_LOG_DIR`` (TensorBoard files if ``tensorboard`` is installed, else ``scalars.jsonl``).
- Multi-worker DDP from torchrun env or ``CLUSTER_SPEC`` (``embedpipe.ml.distributed``); only rank 0 writes outputs.
- Every choice is made on the selection split (``embedpipe.ml.selection``: ``qrels/dev.tsv``, else held-out training
  pairs); ``qrels/test.tsv`` is never opened here. The sequence length comes from the corpus when not pinned
  (``--max-seq-length=0``); the best epoch is kept (early stopping); the base model ships instead when the fine-tune
  does not beat it (``tuned: false`` and the reason in ``embedpipe.json``); the default search mode and hybrid
  weight are chosen with the shipped model. In an HP-tuning trial (``CLOUD_ML_TRIAL_ID`` or
  ``CLOUD_ML_HP_METRIC_FILE`` set) the selection metrics are reported in the hypertune format (tags
  ``recall_at_10``, ``ndcg_at_10``, ...), so trials are compared on non-test data too.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

from embedpipe import logs
from embedpipe.config import Platform, Settings, TrainParams, field_types
from embedpipe.control import intake
from embedpipe.gcp import bqsource, storage
from embedpipe.jobs import hypertune
from embedpipe.ml import distributed, selection
from embedpipe.ml.checkpoints import Checkpoints
from embedpipe.ml.model import ModelInfo, base_artifact, git_sha, load_model, save_model
from embedpipe.ml.scalars import ScalarLog
from embedpipe.ml.training import seq_length_for, train

log = logging.getLogger("trainer")


def whole(raw: str) -> int:
    """An integer flag as Vertex AI hyperparameter tuning sends it: trial values are doubles, so an INTEGER or
    DISCRETE parameter arrives as ``--batch-size=32.0``; a fractional value is still an error."""
    try:
        return int(raw)  # exact, however large (a seed)
    except ValueError:
        value = float(raw)
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {raw!r}")
    return int(value)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--data-bucket", default=Settings.from_env().data_bucket)
    p.add_argument("--as-of", default="", help="read BigQuery parts of the dataset as of this time (ISO 8601)")
    # every TrainParams field is a flag, in both spellings; the job always names its base model
    for name, kind in field_types(TrainParams).items():
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        kw = {"required": True} if name == "base_model" else {"default": getattr(TrainParams, name)}
        p.add_argument(*flags, dest=name, type=whole if kind is int else kind, **kw)
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


def choose_model(base_score: float | None, tuned_score: float | None) -> tuple[bool, str]:
    """Ship the fine-tune only when it beats the base model on the selection split; with nothing to check it on,
    the base model ships (a fine-tune nobody could check must not be served: small collections lost with it)."""
    if base_score is None or tuned_score is None:
        return False, (
            f"too few training pairs to check a fine-tune (no dev qrels, fewer than {selection.KFOLD_MIN} "
            "anchors for k-fold selection): the base model ships"
        )
    if tuned_score > base_score:
        return True, f"fine-tune {selection.METRIC} {tuned_score:.4f} > base {base_score:.4f} on the selection split"
    return False, (
        f"fine-tune {selection.METRIC} {tuned_score:.4f} did not beat the base model's {base_score:.4f} on the "
        "selection split: the base model ships"
    )


def agree(values: list[int], dist, device: str) -> list[int]:
    """Rank 0's ``values`` on every rank (a decision only rank 0 computed)."""
    if dist.world_size <= 1:
        return values
    import torch
    import torch.distributed as td

    t = torch.tensor(values, dtype=torch.int64, device=device)
    td.broadcast(t, src=0)
    return [int(v) for v in t.tolist()]


def untrained(params: TrainParams, world_size: int = 1) -> dict:
    """``train``'s result for a model shipped without a final training (the base model, chosen before it)."""
    return {
        "selection": [],
        "best_step": 0,
        "best_score": None,
        "steps": 0,
        "total_steps": 0,
        "resumed_from_step": None,
        "world_size": world_size,
        "pairs_seen": 0,
        "pairs_seen_this_run": 0,
        "seconds": 0.0,
        "pairs_per_s": None,
        "loss_curve": [],
        "params": params.to_dict(),
    }


def main(argv: list[str]) -> int:
    settings = Settings.from_env()
    logs.setup(fmt=settings.log_format)
    args = parse_args(argv)
    env = Platform.from_env()  # what Vertex AI (or the local job runner) tells this job
    if not env.aip_model_dir:
        raise SystemExit("AIP_MODEL_DIR is not set: the trainer runs as a Vertex AI custom job or a local job")
    model_dir = env.aip_model_dir  # gs://.../runs/<run_id>/train/<attempt>/[<trial>/]model/
    run_dir = model_dir.rstrip("/").rsplit("/", 1)[0]
    t0 = time.time()
    dist = distributed.from_env()
    if not dist.participates:
        log.info("this replica is not a training worker (CLUSTER_SPEC task outside pools 0/1): nothing to do")
        return 0
    device = distributed.init(dist)
    log.info("rank %d/%d (%s) on %s", dist.rank, dist.world_size, dist.source, device)
    # test labels never reach training; files that break cross-file rules are left out and listed in intake.json
    ds, rejections, problem = intake.load_checked(
        args.data_bucket, args.dataset, settings, test=False, as_of=bqsource.as_of(args.as_of)
    )
    if dist.rank == 0:
        intake.write_report(f"{run_dir}/{intake.REPORT_FILE}", rejections, problem)
    if ds is None:  # nothing usable: the pipeline reads intake.json and fails the run in "intake" (no retry)
        log.error("dataset %s: %s", args.dataset, problem)
        distributed.shutdown()
        return 0  # a tuning trial reports no metric and fails: the pipeline reads the trials' intake.json then
    pairs = ds.training_pairs()
    source = "pairs/" if ds.pairs else ("qrels/train.tsv" if ds.qrels.get("train") else "derived from corpus")
    train_pairs, task = selection.task_for(ds, pairs, args.seed)
    log.info(
        "dataset %s: %d docs, %d training pairs (%s), %d trained on; selection: %s",
        args.dataset,
        len(ds.corpus),
        len(pairs),
        source,
        len(train_pairs),
        task.describe() if task else "none",
    )
    tuning = env.tuning
    if tuning and task is None:
        log.error("hyperparameter tuning needs a selection split: add qrels/dev.tsv or more training pairs")
        return 2  # trials could only be compared on test labels, which never reach training
    model, base = load_model(args.base_model, device=device)
    seq = args.max_seq_length or seq_length_for(
        model, [d.full_text for d in ds.corpus.values()], base.max_seq_length, args.seed
    )
    model.max_seq_length = seq
    log.info("max_seq_length %d (%s)", seq, "pinned" if args.max_seq_length else "from the corpus' token lengths")
    params = TrainParams(**{k: getattr(args, k) for k in TrainParams.__dataclass_fields__ if hasattr(args, k)})
    params.max_seq_length = seq

    scored: list[tuple[float, dict]] = []  # (score, hits) of each scoring, base model first: never ranked twice

    def score(m) -> float:
        hits = selection.dense_hits(m, task, base.query_prefix, base.document_prefix)
        scored.append((selection.metric_of(task, hits), hits))
        return scored[-1][0]

    def fresh():
        m, _ = load_model(args.base_model, device=device)
        m.max_seq_length = seq
        return m

    # too few pairs to hold any out: k-fold, on every rank alone (no collective inside: none waits out the process
    # group's timeout while another trains five folds); all then take rank 0's verdict and epoch count (a GPU's
    # last bits may differ), so a DDP job's final training starts in step on every rank
    cv = None
    if task is None:
        cv = selection.cross_validate(fresh, train, pairs, params, args.seed, base.query_prefix, base.document_prefix)
    base_score = score(model) if task else (cv.base_score if cv else None)
    if task:
        log.info("selection: base model %s %.4f", selection.METRIC, base_score)
    ckpt_dir = env.aip_checkpoint_dir
    scalars = ScalarLog(env.aip_tensorboard_log_dir or None) if dist.is_primary else None
    checked, epochs = task is not None, params.epochs
    if task is None:
        wins = cv is not None and cv.tuned_score > cv.base_score
        verdict, epochs = agree([int(wins), cv.epochs if cv else 0], dist, device)
        checked = bool(verdict)
    if checked:  # a fine-tune that can win: train it (on every pair after k-fold, for the epochs it chose)
        final = params if task else dataclasses.replace(params, epochs=epochs)
        stats = train(
            model,
            train_pairs,
            final,
            dist_info=dist,
            checkpoints=Checkpoints(ckpt_dir) if ckpt_dir else None,
            scalars=scalars,
            select=score if task else None,
        )
    else:  # nothing to check it on, or k-fold says it loses: no training at all
        stats = untrained(params, dist.world_size)
    if cv:
        stats.update(selection=cv.history(), best_score=cv.tuned_score)
    log.info("rank %d/%d trained %d steps", dist.rank, dist.world_size, stats["steps"])
    distributed.shutdown()
    if not dist.is_primary:
        log.info("rank %d: done; rank 0 writes the model and metrics", dist.rank)
        return 0
    tuned_score = stats["best_score"]
    tuned, reason = choose_model(base_score, tuned_score)
    if cv:
        reason = f"{reason} ({cv.folds}-fold cross-validation over {len(cv.task.queries)} anchors)"
    log.info("%s", reason)
    if not tuned and stats["steps"]:
        model, _ = load_model(args.base_model, device=device)
        model.max_seq_length = seq
    chosen: dict = {"default_mode": "dense", **selection.UNCHOSEN}
    by_mode: dict = {}
    sel_task = task or (cv.task if cv else None)
    if sel_task:
        if task:
            # the shipped weights were ranked already: the base model first, the kept epoch (the first to reach the
            # best score) during training; a resumed run's earlier epochs were not ranked here, so rank again then
            want = tuned_score if tuned else base_score
            dense = next((h for sc, h in scored if sc == want), None)
            if dense is None:
                dense = selection.dense_hits(model, task, base.query_prefix, base.document_prefix)
        else:  # the fold models' pooled rankings of the kept epoch (or the base model's): no final model is scored
            dense = cv.by_epoch[cv.epochs] if tuned else cv.base
        bm25 = selection.bm25_hits(sel_task)
        chosen = selection.choose_search(sel_task, dense, bm25)
        by_mode = selection.by_mode(sel_task, dense, bm25, chosen)
        log.info(
            "selection: search mode %s (hybrid: %s fusion, dense weight %s): %s",
            chosen["default_mode"],
            chosen["fusion"],
            chosen["hybrid_weight"],
            chosen["scores"],
        )
    eval_metrics = by_mode.get("dense", {})
    info = ModelInfo(
        base_model=args.base_model,
        dim=base.dim,
        max_seq_length=seq,
        query_prefix=base.query_prefix,
        document_prefix=base.document_prefix,
        git_sha=git_sha(),
        data_fingerprint=ds.fingerprint(),
        metrics=eval_metrics,
        tuned=tuned,
        shipped_reason=reason,
        selection={
            **(sel_task.describe() if sel_task else {"split": None}),
            **({"folds": cv.folds} if cv else {}),
            "base": base_score,
            "tuned": tuned_score,
            "epochs": stats["selection"],
            "best_step": stats["best_step"],
            "by_mode": by_mode,
            "by_weight": chosen.get("by_weight", {}),
        },
        search={k: chosen[k] for k in ("default_mode", "fusion", "hybrid_weight", "rrf_k")},
    )
    with tempfile.TemporaryDirectory() as tmp:
        info = save_model(model, Path(tmp), info)
        storage.upload_dir(Path(tmp), model_dir)
    # the untuned model at the same preprocessing: the embedder's base vectors, a first run's fallback index (not
    # per HP-tuning trial: a trial's run falls back to BM25 or its own index, see indexing._fallback)
    if tuned and not tuning:
        untuned, _ = load_model(args.base_model, device=device)
        untuned.max_seq_length = seq
        kept = dataclasses.replace(
            info, metrics={}, tuned=False, shipped_reason="the untuned base model", selection={}, search={}, version=""
        )
        with tempfile.TemporaryDirectory() as tmp:
            save_model(untuned, Path(tmp), kept)
            storage.upload_dir(Path(tmp), base_artifact(model_dir))
    metrics = {
        **stats,  # its per-epoch "selection" list lives on in selection["epochs"]
        "model_version": info.version,
        "fingerprint": info.fingerprint,
        "pairs": len(pairs),
        "pairs_trained": len(train_pairs) if stats["steps"] else 0,
        "pairs_source": source,
        "git_sha": info.git_sha,
        "versions": versions(),
        "device": device,
        "rank_source": dist.source,
        "trial": env.cloud_ml_trial_id,
        "max_seq_length": seq,
        "tuned": tuned,
        "shipped_reason": reason,
        "selection": info.selection,
        "search": info.search,
        "eval_split": sel_task.split if sel_task else None,
        "eval": eval_metrics,
        "train_seconds": stats["seconds"],
        "seconds": round(time.time() - t0, 3),  # the whole job: loading, selection, training, saving
    }
    storage.write_json(f"{run_dir}/metrics.json", metrics)
    if scalars is not None:
        for key, value in eval_metrics.items():
            scalars.add(f"selection/{key}", value, stats["steps"])
        scalars.close()
    if tuning:
        for key, value in eval_metrics.items():
            hypertune.report(key, value, stats["steps"])
        log.info("hypertune: %d selection metrics reported to %s", len(eval_metrics), hypertune.metric_file())
    log.info("model %s written to %s (%.1f pairs/s)", info.fingerprint, model_dir, stats["pairs_per_s"] or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
