"""Training scalars for ``AIP_TENSORBOARD_LOG_DIR``.

With the ``tensorboard`` package installed (the trainer image installs it: real event files in the attempt's
``logs/`` folder, which Vertex AI uploads to the TensorBoard instance named by ``EMBEDPIPE_TENSORBOARD``), scalars
go to TensorBoard event files (``torch.utils.tensorboard``); without it (the local environment and the tests: it is
a heavy dependency) they go to ``scalars.jsonl``, one JSON object per line:
``{"tag": "train/loss", "step": 10, "value": 0.53, "wall_time": 1700000000.0}``. Either way they are written to a
local folder and copied to the (``gs://``) log dir on ``flush()`` and ``close()``, since GCS objects cannot be
appended to. A resumed run starts from the ``scalars.jsonl`` already there; with TensorBoard it writes an event file
of its own next to the first attempt's.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path


class ScalarLog:
    def __init__(self, uri: str | None):
        self.uri = uri
        self._own = not uri or uri.startswith("gs://")  # a staging folder of ours, removed on close
        self.local = Path(tempfile.mkdtemp(prefix="tb-")) if self._own else Path(uri)
        self.local.mkdir(parents=True, exist_ok=True)
        self.format = "jsonl"
        self._writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.local))
            self.format = "tensorboard"
        except ImportError:
            if uri and uri.startswith("gs://"):
                self._fetch_previous()  # a resumed run appends to what the first attempt logged
            self._fh = open(self.local / "scalars.jsonl", "a")

    def _fetch_previous(self) -> None:
        from google.api_core import exceptions as gexc

        from embedpipe.gcp import storage

        try:
            (self.local / "scalars.jsonl").write_bytes(storage.read_bytes(storage.join(self.uri, "scalars.jsonl")))
        except gexc.NotFound:
            pass

    def add(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, value, step)
        else:
            line = {"tag": tag, "step": step, "value": float(value), "wall_time": time.time()}
            self._fh.write(json.dumps(line) + "\n")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()
        else:
            self._fh.flush()
        self._upload()

    def close(self) -> None:
        # Closed before the last upload, so the copy in the log dir is the finished file.
        if self._writer is not None:
            self._writer.close()
        else:
            self._fh.close()
        try:
            self._upload()
        finally:  # one staging folder per training run would otherwise pile up on a long-lived host
            if self._own:
                shutil.rmtree(self.local, ignore_errors=True)

    def _upload(self) -> None:
        if self.uri and self.uri.startswith("gs://"):
            from embedpipe.gcp import storage

            storage.upload_dir(self.local, self.uri)
