"""Contrastive fine-tuning with in-batch negatives (sentence-transformers' MultipleNegativesRankingLoss).

A small explicit loop rather than the generic Trainer: we control batching (length-grouped to cut padding),
bf16 autocast and the log cadence inside jobs, and it stays fast on a 2-core CPU.
"""

from __future__ import annotations

import logging
import random
import time

from embedpipe.config import TrainParams
from embedpipe.ml.checkpoints import Checkpoints
from embedpipe.ml.distributed import DistInfo
from embedpipe.ml.embedding import autocast
from embedpipe.ml.scalars import ScalarLog

log = logging.getLogger(__name__)


SEQ_QUANTILE = 0.95  # of document token lengths: longer documents are truncated, the rest fit whole
SEQ_MULTIPLE = 32


def seq_length_for(model, texts: list[str], cap: int, seed: int = 0, sample: int = 2000) -> int:
    """The sequence length a corpus needs: the 95th percentile of its documents' token lengths (a seeded sample),
    rounded up to a multiple of 32, within [32, ``cap``] (the base model's own limit). Real abstracts truncated at
    64 tokens lose a tenth of their recall; padding every batch to the model limit wastes time on short corpora."""
    import numpy as np

    texts = list(texts)
    if len(texts) > sample:
        texts = random.Random(seed).sample(texts, sample)
    if not texts:
        return cap
    lengths = [len(ids) for ids in model.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]
    need = int(np.quantile(lengths, SEQ_QUANTILE))
    return max(SEQ_MULTIPLE, min(cap, -(-need // SEQ_MULTIPLE) * SEQ_MULTIPLE))


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def length_grouped_batches(pairs: list, batch_size: int, rng: random.Random) -> list[list]:
    """Shuffle, then sort within windows of 50 batches by length so batches hold similar lengths (less padding),
    then shuffle the batch order so training still sees the data in random order. No batch holds one anchor or one
    positive twice (``distinct``). The number of batches depends on the number of pairs only, never on the shuffle:
    every epoch, every rank and every resumed run count the same steps."""
    pairs = pairs[:]
    rng.shuffle(pairs)
    window = batch_size * 50
    batches = []
    for start in range(0, len(pairs), window):
        chunk = sorted(pairs[start : start + window], key=lambda p: len(p[0]) + len(p[1]))
        slices = (chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
        # in-batch negatives need two pairs: a window's tail of one is left out (by size alone, never by content)
        batches.extend(distinct(b) for b in slices if len(b) > 1)
    rng.shuffle(batches)
    return batches


def distinct(batch: list) -> list:
    """``batch`` without the pairs that repeat an anchor or a positive of an earlier pair in it. With in-batch
    negatives every other pair's positive is a negative for an anchor: a query with several relevant documents
    (``qrels/train.tsv`` averages dozens in some collections), or a document relevant to several queries, would be
    trained as a negative of itself. A pair left out sits out this epoch only (the next shuffle places it elsewhere);
    a batch left with one pair trains nothing that step (its loss is 0), which keeps the step count fixed."""
    anchors, positives, out = set(), set(), []
    for p in batch:
        if p[0] in anchors or p[1] in positives:
            continue
        anchors.add(p[0])
        positives.add(p[1])
        out.append(p)
    return out


def _batch_for(pairs: list, params: TrainParams, epoch: int, cache: dict) -> list[list]:
    """The (global) batches of one epoch: a pure function of the seed and the epoch, so a resumed run and every
    rank of a distributed run see the same order without sharing state."""
    if epoch not in cache:
        cache.clear()
        cache[epoch] = length_grouped_batches(pairs, params.batch_size, random.Random(params.seed + epoch))
    return cache[epoch]


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class NonFiniteLoss(ArithmeticError):
    """The loss went NaN or infinite: the run fails rather than ship (or select from) a broken model."""


def make_loss(model, params: TrainParams):
    """In-batch negatives; the cached (GradCache) variant when ``mini_batch_size`` is smaller than the batch, so a
    large batch trains in the memory of a small one."""
    from sentence_transformers import losses

    if 0 < params.mini_batch_size < params.batch_size:
        return losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=params.mini_batch_size)
    return losses.MultipleNegativesRankingLoss(model)


def _fp32_loss_module(loss_fn, device: str):
    """In-batch negatives with the encoder under bf16 autocast but similarities, softmax and loss in fp32: bf16
    logits (scale 20, ~3 significant digits) round the small differences between candidates away and the loss reads
    0.0 long before the model has learnt anything."""
    import torch

    class FP32Loss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loss = loss_fn

        def forward(self, features, labels=None):
            with autocast(device):
                embeddings = [self.loss.model(f)["sentence_embedding"] for f in features]
            return self.loss.compute_loss_from_embeddings([e.float() for e in embeddings], labels)

    return FP32Loss()


def train(
    model,
    pairs: list[tuple[str, str, str | None]],
    params: TrainParams,
    *,
    dist_info: DistInfo | None = None,
    checkpoints: Checkpoints | None = None,
    scalars: ScalarLog | None = None,
    select=None,
) -> dict:
    """Fine-tune ``model`` in place; returns the loss curve and throughput.

    Distributed (``dist_info.world_size > 1``, process group already initialised): every rank builds the same global
    batch list and trains on batches ``rank, rank + world, ...``; gradients are averaged by DDP (or by an explicit
    all-reduce for the cached loss, whose two-pass backward DDP does not support). ``max_steps`` counts optimizer
    steps, each of which consumes ``world_size`` batches. With ``checkpoints``, the primary rank saves model,
    optimizer, scheduler, RNG states and step every ``checkpoint_every`` steps, and a restart resumes from the
    latest one (the data order is a function of seed and epoch, so the resumed run continues where it stopped).

    With ``select`` (model -> score on the selection split, higher is better; never test data), the model is scored
    at the end of every epoch; training stops early after ``params.patience`` epochs without improvement (0: never)
    and the model ends
    with the weights of its best-scoring epoch. A run resumed from a checkpoint keeps the scores of the epochs before
    the crash but not their weights: it keeps the best of the epochs it ran itself.
    """
    import torch
    from transformers import get_linear_schedule_with_warmup

    if len(pairs) < 2:
        raise ValueError(f"need at least 2 training pairs, got {len(pairs)}")
    dist_info = dist_info or DistInfo()
    rank, world = dist_info.rank, dist_info.world_size
    primary = rank == 0
    seed_everything(params.seed)
    if params.max_seq_length:  # 0: the model's own
        model.max_seq_length = params.max_seq_length
    model.train()
    loss_fn = make_loss(model, params)
    cached = not isinstance(loss_fn, _mnrl_class())
    batches_cache: dict = {}
    steps_per_epoch = len(_batch_for(pairs, params, 0, batches_cache)) // world
    if steps_per_epoch < 1:
        raise ValueError(f"{len(pairs)} pairs make fewer batches of {params.batch_size} than {world} ranks")
    total = steps_per_epoch * params.epochs
    if params.max_steps > 0:
        total = min(params.max_steps, total)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.learning_rate)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total * params.warmup_ratio), total)
    prep = getattr(model, "preprocess", None) or model.tokenize
    device = str(model.device)

    curve, seen, step, resumed_from = [], 0, 0, None
    selection: list[dict] = []
    best: dict | None = None  # {"score", "step", "state"}: the best epoch's weights, on the CPU
    state = checkpoints.load_latest() if checkpoints else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        step, seen, curve = state["step"], state["pairs_seen"], state["loss_curve"]
        selection = state.get("selection", [])
        resumed_from = step
        log.info("resumed from checkpoint step %d/%d (%s)", step, total, checkpoints.uri)

    forward = loss_fn if cached else _fp32_loss_module(loss_fn, device)
    if world > 1 and not cached:
        from torch.nn.parallel import DistributedDataParallel

        # The BERT pooler is unused by mean pooling: its parameters get no gradient.
        forward = DistributedDataParallel(
            forward,
            device_ids=[dist_info.local_rank] if device.startswith("cuda") else None,
            find_unused_parameters=True,
        )

    t0, seen_here, start_step = time.perf_counter(), 0, step
    while step < total:
        epoch, index = divmod(step, steps_per_epoch)
        epoch_batches = _batch_for(pairs, params, epoch, batches_cache)
        step_batches = epoch_batches[index * world : (index + 1) * world]
        batch = step_batches[rank]
        columns = [[p[0] for p in batch], [p[1] for p in batch]]
        if all(p[2] for p in batch):
            columns.append([p[2] for p in batch])  # hard negatives, when every pair has one
        features = [{k: (v.to(model.device) if hasattr(v, "to") else v) for k, v in prep(c).items()} for c in columns]
        if cached:
            with autocast(device):
                loss = forward(features, None)
        else:
            loss = forward(features, None)
        loss.backward()
        loss_value = loss.detach().float()
        if world > 1:
            import torch.distributed as dist

            if cached:
                for p in model.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            dist.all_reduce(loss_value)
            loss_value /= world
        # after the all-reduce: one rank's NaN reaches every rank, so all stop together (none waits in a collective)
        if not torch.isfinite(loss_value).all():
            raise NonFiniteLoss(f"loss is {float(loss_value)} at step {step + 1}: training diverged")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        n = sum(len(b) for b in step_batches)
        seen += n
        seen_here += n
        curve.append({"step": step, "loss": round(float(loss_value), 5)})
        if select is not None and (step % steps_per_epoch == 0 or step == total):
            score = _agreed(_score(model, select) if primary else 0.0, world, model.device)
            best, stop = _select_epoch(model, score, step, steps_per_epoch, selection, best, params.patience, scalars)
            if stop:
                log.info("early stop at step %d: no better selection score for %d epoch(s)", step, params.patience)
                total = step
        if not primary:
            continue
        if scalars is not None:
            scalars.add("train/loss", float(loss_value), step)
            scalars.add("train/learning_rate", scheduler.get_last_lr()[0], step)
        if step % params.log_every == 0 or step == total:
            elapsed = time.perf_counter() - t0
            rate = seen_here / elapsed if elapsed else 0.0
            eta = elapsed / (step - start_step) * (total - step)
            log.info("step %d/%d loss=%.4f pairs/s=%.1f eta=%.0fs", step, total, float(loss_value), rate, eta)
            if scalars is not None:
                scalars.add("train/pairs_per_s", rate, step)
        if checkpoints and params.checkpoint_every > 0 and step % params.checkpoint_every == 0 and step < total:
            if scalars is not None:  # first: a checkpoint that exists has its scalars stored (a kill can come next)
                scalars.flush()
            checkpoints.save(
                step,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(),
                    "pairs_seen": seen,
                    "loss_curve": curve,
                    "selection": selection,
                    "params": params.to_dict(),
                },
            )
            log.info("checkpoint at step %d written to %s", step, checkpoints.uri)
    elapsed = time.perf_counter() - t0
    if best is not None and best["step"] != step:
        model.load_state_dict(best["state"])
        log.info("kept the weights of step %d (selection score %.4f)", best["step"], best["score"])
    model.eval()
    return {
        "selection": selection,
        "best_step": best["step"] if best else step,
        # the score of the weights the model ends with (history may hold epochs from before a resume whose weights
        # are gone: they never count)
        "best_score": best["score"] if best else None,
        "steps": step,
        "total_steps": total,
        "resumed_from_step": resumed_from,
        "world_size": world,
        "pairs_seen": seen,
        "pairs_seen_this_run": seen_here,
        "seconds": round(elapsed, 3),
        "pairs_per_s": round(seen_here / elapsed, 2) if elapsed and seen_here else None,
        "loss_curve": curve,
        "params": params.to_dict(),
    }


def _score(model, select) -> float:
    model.eval()  # no dropout while scoring
    try:
        return float(select(model))
    finally:
        model.train()


def _agreed(score: float, world: int, device) -> float:
    """Rank 0's selection score on every rank: all ranks must stop at the same step and keep the same epoch (scores
    computed on each rank could differ in the last bits on GPUs and leave one rank waiting in a collective)."""
    if world <= 1:
        return float(score)
    import torch
    import torch.distributed as dist

    value = torch.tensor([float(score)], dtype=torch.float64, device=device)
    dist.broadcast(value, src=0)
    return float(value.item())


def _select_epoch(model, score, step, steps_per_epoch, history, best, patience, scalars):
    """Record an epoch's selection score; keep the best weights. Returns (best, stop)."""
    epoch = -(-step // steps_per_epoch)
    history.append({"epoch": epoch, "step": step, "score": round(score, 6)})
    log.info("selection after epoch %d (step %d): %.4f", epoch, step, score)
    if scalars is not None:
        scalars.add("selection/score", score, step)
    if best is None or score > best["score"]:
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return {"score": score, "step": step, "state": state}, False
    since = step - best["step"]
    return best, patience > 0 and since >= patience * steps_per_epoch


def _mnrl_class():
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    return MultipleNegativesRankingLoss


def evaluate_exact(model, ds, query_prefix: str = "", document_prefix: str = "", k: int = 100) -> dict:
    """Retrieval metrics of ``model`` on the dataset's test qrels (``Dataset.eval_split``) by exact cosine top-``k``
    search in memory, streamed in blocks (``evaluation.TopK``: no queries x corpus matrix). For benchmarks and tests;
    the trainer itself never scores test qrels (``embedpipe.ml.selection``)."""
    from embedpipe.ml.selection import Task, dense_hits
    from embedpipe.retrieval.evaluation import evaluate, ids

    qrels = ds.eval_qrels()
    qids = [q for q in sorted(qrels) if q in ds.queries]
    if not qids:
        return {}
    task = Task("eval", {q: ds.queries[q] for q in qids}, {d: doc.full_text for d, doc in ds.corpus.items()}, {})
    ranked = ids(dense_hits(model, task, query_prefix, document_prefix, min(k, len(ds.corpus))))
    return evaluate(ranked, {q: qrels[q] for q in qids})
