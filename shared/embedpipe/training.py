"""Contrastive fine-tuning with in-batch negatives (sentence-transformers' MultipleNegativesRankingLoss).

A small explicit loop rather than the generic Trainer: we control batching (length-grouped to cut padding),
bf16 autocast and the log cadence inside jobs, and it stays fast on a 2-core CPU.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass

from embedpipe.embedding import autocast

log = logging.getLogger(__name__)


@dataclass
class TrainParams:
    learning_rate: float = 5e-5
    batch_size: int = 32
    max_steps: int = 40
    epochs: int = 1
    max_seq_length: int = 64
    warmup_ratio: float = 0.1
    seed: int = 42
    log_every: int = 10

    def to_dict(self) -> dict:
        return asdict(self)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def length_grouped_batches(pairs: list, batch_size: int, rng: random.Random) -> list[list]:
    """Shuffle, then sort within windows of 50 batches by length so batches hold similar lengths (less padding),
    then shuffle the batch order so training still sees the data in random order."""
    pairs = pairs[:]
    rng.shuffle(pairs)
    window = batch_size * 50
    batches = []
    for start in range(0, len(pairs), window):
        chunk = sorted(pairs[start : start + window], key=lambda p: len(p[0]) + len(p[1]))
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    # In-batch negatives need at least two pairs per batch.
    batches = [b for b in batches if len(b) > 1]
    rng.shuffle(batches)
    return batches


def train(model, pairs: list[tuple[str, str, str | None]], params: TrainParams) -> dict:
    """Fine-tune ``model`` in place; returns the loss curve and throughput."""
    import torch
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from transformers import get_linear_schedule_with_warmup

    if len(pairs) < 2:
        raise ValueError(f"need at least 2 training pairs, got {len(pairs)}")
    seed_everything(params.seed)
    rng = random.Random(params.seed)
    model.max_seq_length = params.max_seq_length
    model.train()
    loss_fn = MultipleNegativesRankingLoss(model)
    steps_per_epoch = math.ceil(len(pairs) / params.batch_size)
    total = (
        min(params.max_steps, steps_per_epoch * params.epochs)
        if params.max_steps > 0
        else (steps_per_epoch * params.epochs)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total * params.warmup_ratio), total)
    prep = getattr(model, "preprocess", None) or model.tokenize
    device = str(model.device)

    curve, seen, step, t0 = [], 0, 0, time.perf_counter()
    while step < total:
        for batch in length_grouped_batches(pairs, params.batch_size, rng):
            if step >= total:
                break
            columns = [[p[0] for p in batch], [p[1] for p in batch]]
            if all(p[2] for p in batch):
                columns.append([p[2] for p in batch])  # hard negatives, when every pair has one
            features = [
                {k: (v.to(model.device) if hasattr(v, "to") else v) for k, v in prep(c).items()} for c in columns
            ]
            with autocast(device):
                loss = loss_fn(features, None)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seen += len(batch)
            curve.append({"step": step, "loss": round(float(loss), 5)})
            if step % params.log_every == 0 or step == total:
                elapsed = time.perf_counter() - t0
                eta = elapsed / step * (total - step)
                log.info("step %d/%d loss=%.4f pairs/s=%.1f eta=%.0fs", step, total, float(loss), seen / elapsed, eta)
    elapsed = time.perf_counter() - t0
    model.eval()
    return {
        "steps": step,
        "pairs_seen": seen,
        "seconds": round(elapsed, 3),
        "pairs_per_s": round(seen / elapsed, 2) if elapsed else None,
        "loss_curve": curve,
        "params": params.to_dict(),
    }
