"""embedpipe.ml.embedding.encode: bf16 autocast stays within cosine 0.999 of fp32; background tokenization keeps
order."""

from __future__ import annotations

import numpy as np
import pytest

from embedpipe.ml import embedding
from embedpipe.ml.model import load_model

TEXTS = [
    f"document {i}: " + " ".join(["river", "bank", "loan", "water", "rate"][: 1 + i % 5]) * (1 + i % 7)
    for i in range(60)
]


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_model(tiny_model)[0]


def encode_with(monkeypatch, model, bf16: str, **kw) -> np.ndarray:
    monkeypatch.setenv("EMBEDPIPE_BF16", bf16)
    embedding.bf16_supported.cache_clear()
    try:
        return embedding.encode(model, TEXTS, **kw)
    finally:
        embedding.bf16_supported.cache_clear()


def test_bf16_within_cosine_0999_of_fp32(monkeypatch, model):
    fp32 = encode_with(monkeypatch, model, "0")
    bf16 = encode_with(monkeypatch, model, "1")
    cos = (fp32 * bf16).sum(axis=1)  # both L2-normalised
    assert cos.min() >= 0.999, f"min cosine {cos.min():.5f}"


def test_token_budget_batches_and_prefetch_keep_input_order(monkeypatch, model):
    reference = model.encode(TEXTS, batch_size=8, normalize_embeddings=True, convert_to_numpy=True)
    # many small batches, and chunks of 7 texts through the tokenizer thread
    ours = encode_with(monkeypatch, model, "0", batch_tokens=256, chunk=7)
    assert np.allclose((reference * ours).sum(axis=1), 1.0, atol=1e-4)


def test_prefetch_reraises_producer_errors():
    def boom(x):
        if x == 3:
            raise RuntimeError("tokenizer failed")
        return x

    got = []
    with pytest.raises(RuntimeError, match="tokenizer failed"):
        for _item, value in embedding.prefetch(boom, range(10), depth=2):
            got.append(value)
    assert got == [0, 1, 2]
