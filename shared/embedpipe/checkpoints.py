"""Training checkpoints in ``AIP_CHECKPOINT_DIR`` (a ``gs://`` URI, or a local folder): save every N steps, resume.

Layout::

    <dir>/step-00000040.pt     torch.save of {"step", "model", "optimizer", "scheduler", "rng", ...}
    <dir>/latest.json          {"step": 40, "file": "step-00000040.pt"}   written after the checkpoint itself

``latest.json`` is written last, so a process killed while writing a checkpoint leaves the previous one in force.
The last ``keep`` checkpoints are kept. Only the primary rank saves; every rank loads.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

LATEST = "latest.json"


def _is_gcs(uri: str) -> bool:
    return uri.startswith("gs://")


def _write(uri: str, data: bytes) -> None:
    if _is_gcs(uri):
        from embedpipe import storage

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

        from embedpipe import storage

        try:
            return storage.read_bytes(uri)
        except gexc.NotFound:
            return None
    path = Path(uri)
    return path.read_bytes() if path.exists() else None


def _delete(uri: str) -> None:
    if _is_gcs(uri):
        from embedpipe import storage

        storage.delete(uri)
    else:
        Path(uri).unlink(missing_ok=True)


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
        data = _read(_join(self.uri, name))
        if data is None:
            log.warning("checkpoint %s named by %s is missing: starting from scratch", name, LATEST)
            return None
        self._saved = [name]
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
