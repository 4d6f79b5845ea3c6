"""Intake: check each uploaded file before a run uses it; move a bad one under ``quarantine/``.

A bad file never reaches training or the index: its error (object, line, reason) goes into the run record and a
``io.embedpipe.file.rejected.v1`` event on ``run-events``, and the object is moved to
``gs://DATA/quarantine/<dataset>/<path>`` (the copy keeps the bytes for inspection; the original is deleted only if it
is still the generation we checked, so a corrected re-upload is never removed). Valid files beside it go on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from google.api_core import exceptions as gexc

from embedpipe import datasets, storage

log = logging.getLogger(__name__)

MAX_SEGMENT_CHARS = 200
FILE_REJECTED = "io.embedpipe.file.rejected.v1"


@dataclass(frozen=True)
class Rejection:
    object: str  # gs:// URI of the uploaded object
    generation: int
    line: int | None
    reason: str
    quarantined_to: str | None = None

    def to_dict(self) -> dict:
        return {
            "object": self.object,
            "generation": self.generation,
            "line": self.line,
            "reason": self.reason,
            "quarantined_to": self.quarantined_to,
        }


def name_problem(name: str) -> str | None:
    """Why an object name under ``datasets/`` cannot be a dataset file, or None when it is fine."""
    parts = name.split("/")
    if any(p == ".." for p in parts):
        return "object name contains a '..' segment"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "object name contains control characters"
    if any(len(p) > MAX_SEGMENT_CHARS for p in parts):
        return f"object name has a segment longer than {MAX_SEGMENT_CHARS} characters"
    if len(parts) < 3 or not datasets.DATASET_RE.fullmatch(parts[1]):
        return f"dataset name must match {datasets.DATASET_RE.pattern}"
    return None


def check_file(rel: str, data: bytes) -> None:
    """Parse one BEIR file on its own (raises DatasetError naming the line); cross-file checks happen at launch."""
    kind = datasets.classify(rel)
    if kind == "corpus":
        datasets.parse_corpus(data, rel)
    elif kind == "queries":
        datasets.parse_queries(data, rel)
    elif kind == "qrels":
        datasets.parse_qrels(data, rel)
    elif kind == "pairs":
        datasets.parse_pairs(data, rel)


def quarantine(bucket: str, name: str, generation: int) -> str:
    """Copy ``name`` (that generation) to ``quarantine/<rest of the path>`` and delete it if still unchanged."""
    rest = name.split("/", 1)[1] if name.startswith("datasets/") else name
    target = f"quarantine/{rest}".replace("..", "__")
    target = "".join(c if ord(c) >= 32 and ord(c) != 127 else "_" for c in target)[:1000]
    src_bucket = storage.client().bucket(bucket)
    src = src_bucket.blob(name, generation=generation)
    try:
        src_bucket.copy_blob(src, src_bucket, target, source_generation=generation)
        src_bucket.blob(name).delete(if_generation_match=generation)
    except gexc.NotFound:
        pass  # already moved by an earlier delivery
    except gexc.PreconditionFailed:
        pass  # a newer upload replaced it: keep that one
    return f"gs://{bucket}/{target}"


def check_object(bucket: str, name: str, generation: int) -> Rejection | None:
    """None when the object is a usable dataset file; else a Rejection (and the object is quarantined)."""
    uri = f"gs://{bucket}/{name}"
    problem = name_problem(name)
    line = None
    if problem is None:
        rel = name.split("/", 2)[2]
        try:
            data = storage.client().bucket(bucket).blob(name, generation=generation).download_as_bytes()
        except gexc.NotFound:
            return None  # replaced or deleted since: the newer generation has its own event
        try:
            check_file(rel, data)
            return None
        except datasets.DatasetError as exc:
            problem, line = exc.reason, exc.line
    where = f"{uri}:{line}" if line else uri
    log.warning("rejected %s: %s", where, problem)
    return Rejection(uri, generation, line, problem, quarantine(bucket, name, generation))


def load_valid(bucket: str, dataset: str, max_rejections: int = 100):
    """Load the whole dataset, quarantining each file a cross-file check rejects (duplicate ids across files, qrels
    naming unknown ids), until the rest is valid. Returns (Dataset or None, rejections, why None)."""
    rejections: list[Rejection] = []
    for _ in range(max_rejections):
        try:
            return datasets.load_gcs(bucket, dataset), rejections, None
        except datasets.DatasetError as exc:
            name = f"datasets/{dataset}/{exc.file}"
            blob = storage.client().bucket(bucket).get_blob(name)
            if blob is None:  # not a file (e.g. "dataset has no corpus"): nothing to quarantine
                return None, rejections, str(exc)
            log.warning("rejected gs://%s/%s:%s: %s", bucket, name, exc.line or "", exc.reason)
            rejections.append(
                Rejection(
                    f"gs://{bucket}/{name}",
                    int(blob.generation),
                    exc.line,
                    exc.reason,
                    quarantine(bucket, name, int(blob.generation)),
                )
            )
    return None, rejections, f"more than {max_rejections} bad files"
