"""Training checkpoints in ``AIP_CHECKPOINT_DIR`` (a ``gs://`` URI, or a local folder): save every N steps, resume.

Layout::

    <dir>/step-00000040.pt     torch.save of {"step", "model", "optimizer", "scheduler", "rng", ...}
    <dir>/latest.json          {"step": 40, "file": "step-00000040.pt"}   written after the checkpoint itself

``latest.json`` is written last, so a process killed while writing a checkpoint leaves the previous one in force.
The last ``keep`` checkpoints are kept. Only the primary rank saves; every rank loads.

Loading is weights-only: whoever can write the checkpoint folder must not be able to run code in the trainer through
a pickle. Besides tensors and plain Python values, only numpy arrays of numeric dtypes (numpy's RNG state) are let
through.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
from pathlib import Path

log = logging.getLogger(__name__)

LATEST = "latest.json"


def _is_gcs(uri: str) -> bool:
    return uri.startswith("gs://")


def _write(uri: str, data: bytes) -> None:
    if _is_gcs(uri):
        from embedpipe.gcp import storage

        storage.write_bytes(uri, data)
    else:
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)


def _read(uri: str) -> bytes | None:
    if _is_gcs(uri):
        from google.api_core import exceptions as gexc

        from embedpipe.gcp import storage

        try:
            return storage.read_bytes(uri)
        except gexc.NotFound:
            return None
    path = Path(uri)
    return path.read_bytes() if path.exists() else None


def _delete(uri: str) -> None:
    if _is_gcs(uri):
        from embedpipe.gcp import storage

        storage.delete(uri)
    else:
        Path(uri).unlink(missing_ok=True)


class UnsafeCheckpoint(pickle.UnpicklingError):
    """The checkpoint holds objects a weights-only load refuses (it could run code): it is not loaded."""


def _numpy_globals() -> list:
    """What unpickling a numeric numpy array needs: the array, its dtype and dtype class, the reconstructor. None of
    them runs code; an object array's items still go through the weights-only unpickler."""
    import numpy as np

    return [
        np.ndarray,
        np.dtype,
        np.ndarray.__reduce__(np.zeros(1))[0],  # numpy.(_)core.multiarray._reconstruct, wherever this numpy has it
        *(type(np.dtype(c)) for c in "?bBhHiIlLqQefd"),
    ]


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


class Checkpoints:
    def __init__(self, uri: str, keep: int = 2):
        self.uri = uri
        self.keep = keep
        self._saved: list[str] = []

    def latest_step(self) -> int | None:
        raw = _read(_join(self.uri, LATEST))
        return json.loads(raw)["step"] if raw else None

    def save(self, step: int, state: dict) -> str:
        import torch

        buf = io.BytesIO()
        torch.save({"step": step, **state}, buf)
        name = f"step-{step:08d}.pt"
        _write(_join(self.uri, name), buf.getvalue())
        _write(_join(self.uri, LATEST), json.dumps({"step": step, "file": name}).encode())
        self._saved.append(name)
        while len(self._saved) > self.keep:
            _delete(_join(self.uri, self._saved.pop(0)))
        return _join(self.uri, name)

    def load_latest(self) -> dict | None:
        """The latest checkpoint's state dict (tensors on CPU), or None when there is none."""
        import torch

        raw = _read(_join(self.uri, LATEST))
        if not raw:
            return None
        name = json.loads(raw)["file"]
        if not isinstance(name, str) or not re.fullmatch(r"step-\d{8}\.pt", name):
            # it is read and later deleted under this folder: a "../" name would reach outside it
            raise UnsafeCheckpoint(f"{_join(self.uri, LATEST)} names {name!r}, not a step-NNNNNNNN.pt checkpoint")
        data = _read(_join(self.uri, name))
        if data is None:
            log.warning("checkpoint %s named by %s is missing: starting from scratch", name, LATEST)
            return None
        self._saved = [name]
        # scoped, not add_safe_globals: the allowlist should not widen every other torch.load in the process
        with torch.serialization.safe_globals(_numpy_globals()):
            try:
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                # torch's message is a page of advice to load it unsafely; keep only the line naming the culprit
                why = next((ln.strip() for ln in str(exc).splitlines() if "WeightsUnpickler" in ln), str(exc)[:300])
                raise UnsafeCheckpoint(f"refusing checkpoint {_join(self.uri, name)}: {why}") from exc
