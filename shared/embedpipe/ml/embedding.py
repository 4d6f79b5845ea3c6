"""Fast batch encoding: length-sorted batches sized by a token budget, bf16 autocast where the hardware has it."""

from __future__ import annotations

import contextlib
import functools
import logging

import numpy as np

from embedpipe.config import Settings
from embedpipe.ml.prefetch import prefetch

log = logging.getLogger(__name__)


CPU_BATCH_TOKENS = 4096  # measured best on a 2-core CPU (make bench)
GPU_BATCH_TOKENS = 32768  # measured on an H200 (bench/gpu.py); a few hundred MB of activations for a MiniLM


def bf16_supported(device: str = "cpu") -> bool:
    """bf16 only where it is native, unless ``EMBEDPIPE_BF16`` forces it on or off."""
    forced = Settings.from_env().bf16
    if forced in ("0", "1"):
        return forced == "1"
    return bf16_native(device)


@functools.cache  # the hardware does not change under a process; the override above is read each call
def bf16_native(device: str = "cpu") -> bool:
    """CUDA GPUs from Ampere on, or a CPU with AVX512-BF16 / AMX. Elsewhere bf16 is emulated and slower than fp32
    (torch's default ``is_bf16_supported()`` also says yes to emulation, e.g. on the T4, hence
    ``including_emulation=False``)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def inference_dtype(device: str = "cpu"):
    """The reduced precision inference runs in on ``device``, or None for fp32: bf16 where native, fp16 on CUDA GPUs
    without it (T4, V100: fp16 tensor cores). Training keeps to bf16 or fp32 (fp16 would need a gradient scaler).
    ``EMBEDPIPE_BF16=0`` forces fp32 everywhere, ``=1`` bf16."""
    import torch

    forced = Settings.from_env().bf16
    if forced == "0":
        return None
    if forced == "1" or bf16_native(device):
        return torch.bfloat16
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.float16
    return None


def default_device() -> str:
    """Where models run when the caller names no device: the GPU of a job's accelerator, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_batch_tokens(device: str) -> int:
    return GPU_BATCH_TOKENS if device.startswith("cuda") else CPU_BATCH_TOKENS


def autocast(device: str = "cpu", dtype=None):
    """bf16 autocast where bf16 is native (training), or ``dtype`` when given (inference: ``inference_dtype``)."""
    import torch

    if dtype is None and bf16_supported(device):
        dtype = torch.bfloat16
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def padded(length: int, multiple: int, cap: int | None = None) -> int:
    """``length`` rounded up to ``multiple`` (never past ``cap``): few distinct batch shapes, since CPU (oneDNN)
    and GPU kernels are built or tuned per shape and tensor cores want multiples of 8/16."""
    rounded = -(-length // multiple) * multiple
    return max(length, min(rounded, cap)) if cap else rounded


def token_batches(
    lengths: list[int], batch_tokens: int, max_batch: int = 512, multiple: int = 1, cap: int | None = None
) -> list[list[int]]:
    """Indices grouped longest-first so each batch's padded size (rows x longest row, rounded up to ``multiple``)
    stays within the budget. Batches headed by the same rounded length get the same shape."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    rows = 0
    for i in order:
        if not batches or len(batches[-1]) >= rows:
            batches.append([])
            rows = min(max_batch, max(1, batch_tokens // padded(lengths[i], multiple, cap)))
        batches[-1].append(i)
    return batches


def _dim(model) -> int:
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return get()


def encode(
    model,
    texts: list[str],
    batch_tokens: int = 0,
    prefix: str = "",
    chunk: int = 4096,
    multiple: int = 16,
    max_rows: int = 512,
) -> np.ndarray:
    """Embed ``texts`` with a SentenceTransformer; float32, L2-normalised, in input order.

    Texts are tokenized once, ``chunk`` at a time, in a background thread (the Rust tokenizer releases the GIL) while
    the model runs on the previous chunk; within a chunk, rows are length-sorted into batches sized by a padded-token
    budget (0: ``default_batch_tokens`` of the model's device), at most ``max_rows`` rows. Half-precision weights
    (``load_model(inference=True)``) run as they are; fp32 weights get autocast in ``inference_dtype``."""
    import torch

    if not texts:
        return np.zeros((0, _dim(model)), dtype=np.float32)
    texts = [prefix + t for t in texts] if prefix else list(texts)
    out = np.zeros((len(texts), _dim(model)), dtype=np.float32)
    prep = getattr(model, "preprocess", None) or model.tokenize
    left = getattr(model.tokenizer, "padding_side", "right") == "left"

    def tokenize(start: int) -> dict:
        # the model's own preprocessing (lower-casing, prompts, truncation at max_seq_length), padded per chunk
        return prep(texts[start : start + chunk])

    device = str(model.device)
    batch_tokens = batch_tokens or default_batch_tokens(device)
    fp32 = next(model.parameters()).dtype == torch.float32
    cast = autocast(device, inference_dtype(device)) if fp32 else contextlib.nullcontext()
    with torch.inference_mode(), cast:
        for start, features in prefetch(tokenize, range(0, len(texts), chunk), depth=2, name="tokenize"):
            mask = features["attention_mask"]
            lengths = mask.sum(dim=1).tolist()
            width = mask.shape[1]
            for batch in token_batches(lengths, batch_tokens, max_rows, multiple=multiple, cap=width):
                cols = padded(max(lengths[i] for i in batch), multiple, width)
                span = slice(width - cols, width) if left else slice(0, cols)
                rows = torch.tensor(batch)
                part = {k: _rows(v, rows, span, mask.shape, model.device) for k, v in features.items()}
                emb = model(part)["sentence_embedding"].float()
                out[[start + i for i in batch]] = torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()
    return out


def encode_each(model, texts: list[str], prefix: str = "") -> np.ndarray:
    """``encode``, one text per call: how the search service encodes a query. Batches pad rows to a shared width, and
    half-precision kernels then round differently (cosine 0.99996 to the same query alone), which moved a measured
    nDCG@10 by 0.0014; eval queries encoded this way are the vectors users' queries get, to the bit on the same
    hardware."""
    if not texts:
        return encode(model, [], prefix=prefix)
    return np.stack([encode(model, [t], prefix=prefix)[0] for t in texts])


def _rows(value, rows, span: slice, shape, device):
    """One batch's slice of a chunk's feature on ``device``: its rows, and only as many (padded) columns as it
    needs. Values that are not per-row tensors (e.g. the modality name) pass through."""
    if not hasattr(value, "index_select") or value.dim() == 0 or value.shape[0] != shape[0]:
        return value
    value = value.index_select(0, rows)
    if value.dim() >= 2 and value.shape[1] == shape[1]:
        value = value[:, span]
    return value.to(device)


def shard(ids, index: int, count: int) -> list[str]:
    """Replica ``index`` of ``count``'s share: every ``count``-th id in sorted order, so the replicas together
    embed every document exactly once, whatever order each of them listed the corpus in."""
    if not 0 <= index < count:
        raise ValueError(f"replica index {index} is not within 0..{count - 1}")
    return sorted(ids)[index::count]
