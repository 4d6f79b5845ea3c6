"""Fast batch encoding: length-sorted batches sized by a token budget, bf16 autocast where the hardware has it."""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import numpy as np

from embedpipe.prefetch import prefetch

log = logging.getLogger(__name__)


@functools.cache
def bf16_supported(device: str = "cpu") -> bool:
    """bf16 only where it is fast: CUDA with bf16, or a CPU with AVX512-BF16 / AMX (else it is emulated, slower)."""
    if os.environ.get("EMBEDPIPE_BF16") in ("0", "1"):
        return os.environ["EMBEDPIPE_BF16"] == "1"
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(device: str = "cpu"):
    import torch

    if not bf16_supported(device):
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


def token_batches(lengths: list[int], batch_tokens: int, max_batch: int = 512) -> list[list[int]]:
    """Indices grouped longest-first so each batch's padded size (rows x longest row) stays within the budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current, longest = [], [], 0
    for i in order:
        longest_if_added = max(longest, lengths[i])
        if current and (longest_if_added * (len(current) + 1) > batch_tokens or len(current) >= max_batch):
            batches.append(current)
            current, longest_if_added = [], lengths[i]
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches


def _dim(model) -> int:
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return get()


def encode(model, texts: list[str], batch_tokens: int = 4096, prefix: str = "") -> np.ndarray:
    """Embed ``texts`` with a SentenceTransformer; float32, L2-normalised, in input order.

    Batches are length-sorted and sized by a padded-token budget; a background thread tokenizes the next batches
    while the model runs; bf16 autocast where the hardware is fast at it (``bf16_supported``)."""
    import torch

    if not texts:
        return np.zeros((0, _dim(model)), dtype=np.float32)
    texts = [prefix + t for t in texts] if prefix else list(texts)
    tok = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length, add_special_tokens=True)
    lengths = [len(ids) for ids in tok["input_ids"]]
    device = str(model.device)
    out = np.zeros((len(texts), _dim(model)), dtype=np.float32)
    prep = getattr(model, "preprocess", None) or model.tokenize

    def tokenize(batch: list[int]) -> dict:
        return prep([texts[i] for i in batch])

    # bf16 weights (load_model(inference=True)) need no autocast; fp32 weights get it where bf16 is fast.
    fp32 = next(model.parameters()).dtype == torch.float32
    with torch.inference_mode(), autocast(device) if fp32 else contextlib.nullcontext():
        for batch, features in prefetch(tokenize, token_batches(lengths, batch_tokens), name="tokenize"):
            features = {k: (v.to(model.device) if hasattr(v, "to") else v) for k, v in features.items()}
            emb = model(features)["sentence_embedding"].float()
            emb = torch.nn.functional.normalize(emb, dim=-1)
            out[batch] = emb.cpu().numpy()
    return out


def shard(ids, index: int, count: int) -> list[str]:
    """Replica ``index`` of ``count``'s share: every ``count``-th id in sorted order, so the replicas together
    embed every document exactly once, whatever order each of them listed the corpus in."""
    if not 0 <= index < count:
        raise ValueError(f"replica index {index} is not within 0..{count - 1}")
    return sorted(ids)[index::count]
