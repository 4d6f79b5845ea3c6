"""embedpipe.ml.embedding.encode: bf16 autocast stays within cosine 0.999 of fp32; background tokenization keeps
order."""

from __future__ import annotations

import contextlib

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
    monkeypatch.setenv("EMBEDPIPE_BF16", bf16)  # read on each call: nothing cached to clear
    return embedding.encode(model, TEXTS, **kw)


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


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device as torch reports it; ``gpu(native_bf16=...)`` picks an Ampere-or-later or a T4-like one."""
    import torch

    def make(native_bf16: bool):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        # torch's default also answers yes where bf16 is only emulated (T4, V100)
        monkeypatch.setattr(
            torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16 or including_emulation
        )
        embedding.bf16_native.cache_clear()

    yield make
    embedding.bf16_native.cache_clear()


def test_a_gpu_without_native_bf16_runs_inference_in_fp16_and_training_in_fp32(monkeypatch, gpu):
    import torch

    monkeypatch.delenv("EMBEDPIPE_BF16", raising=False)
    gpu(native_bf16=False)
    assert not embedding.bf16_supported("cuda")
    assert embedding.inference_dtype("cuda") == torch.float16
    assert isinstance(embedding.autocast("cuda"), contextlib.nullcontext)  # training: no fp16 without a scaler


def test_a_gpu_with_native_bf16_runs_bf16_and_the_override_forces_fp32(monkeypatch, gpu):
    import torch

    monkeypatch.delenv("EMBEDPIPE_BF16", raising=False)
    gpu(native_bf16=True)
    assert embedding.inference_dtype("cuda:0") == torch.bfloat16
    monkeypatch.setenv("EMBEDPIPE_BF16", "0")
    assert embedding.inference_dtype("cuda:0") is None


def test_batch_budget_defaults_per_device():
    assert embedding.default_batch_tokens("cpu") == embedding.CPU_BATCH_TOKENS
    assert embedding.default_batch_tokens("cuda:0") == embedding.GPU_BATCH_TOKENS > embedding.CPU_BATCH_TOKENS
