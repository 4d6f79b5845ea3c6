"""Logging: readable lines locally, JSON lines with ``severity`` and labels in the cloud (Cloud Logging parses them)."""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"severity": record.levelname, "message": record.getMessage(), "logger": record.name}
        labels = getattr(record, "labels", None)
        if labels:
            out["logging.googleapis.com/labels"] = labels
        if record.exc_info:
            out["stack_trace"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup(level: int = logging.INFO, fmt: str = "text") -> None:
    """Configure the root logger once per process (stderr, so stdout stays for results); ``fmt`` is the settings'
    ``log_format`` (text | json), passed in by each entry point (this module sits below config)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "google", "httpx", "filelock", "sentence_transformers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Steps:
    """Seconds of each step of one piece of work since ``t0`` (each call closes the step named; a name called again
    adds up), for its log line: where the time goes besides the work itself."""

    def __init__(self, t0: float) -> None:
        self.last, self.seconds = t0, {}

    def __call__(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self.last, 2)
        self.last = now

    def __str__(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.seconds.items())
