"""Intake: check each uploaded file before a run uses it; move a bad one under ``quarantine/``.

A bad file never reaches training or the index: its error (object, line, reason) goes into the run record and a
``io.embedpipe.file.rejected.v1`` event on ``run-events``, and the object is moved to
``gs://DATA/quarantine/<dataset>/<path>`` (the copy keeps the bytes for inspection; the original is deleted only if it
is still the generation we checked, so a corrected re-upload is never removed). Valid files beside it go on.

What published BEIR folders legitimately hold is accepted with ``datasets.Notice``s, not rejected: a corpus document
with neither title nor text is skipped and its notice travels in the ``Accepted`` verdict into the run record
(``record["notices"]``, see ``Pipeline.on_object_change``). A qrels row naming a document the corpus lacks cannot be
seen in one file on its own; the launch-time load counts it (``Dataset.qrels_absent``) and keeps the file. The same
parsers serve ``embedpipe upload``'s local pre-check, so both sides give the same verdict on the same bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from google.api_core import exceptions as gexc

from embedpipe import datasets, storage

log = logging.getLogger(__name__)

MAX_SEGMENT_CHARS = 200
MAX_NOTICES = 100  # notice items kept per object in the run record (the count is always exact)
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


@dataclass(frozen=True)
class Accepted:
    """The object is a usable dataset file; ``notices`` are what its parse accepted with a warning."""

    object: str  # gs:// URI of the uploaded object
    generation: int
    notices: tuple[datasets.Notice, ...] = ()

    def to_dict(self, limit: int = MAX_NOTICES) -> dict:
        """The run record's entry: exact count, the first ``limit`` notices (a million skipped documents must not
        make a million-entry record)."""
        return {
            "object": self.object,
            "generation": self.generation,
            "count": len(self.notices),
            "items": [n.to_dict() for n in self.notices[:limit]],
        }


# What ``check_object`` answers: rejected (and quarantined), accepted (maybe with notices), or None when the object
# is gone (replaced or deleted since the event: the newer generation has its own event).
Verdict = Rejection | Accepted | None


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


class _IdsOnly(dict):
    """The duplicate-id check needs the ids seen so far, not the documents: checking a corpus file keeps only ids."""

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, None)


def check_file(rel: str, data: datasets.Source) -> list[datasets.Notice]:
    """Parse one BEIR file (bytes, or a binary stream read line by line) on its own: raises DatasetError (file, line,
    reason) for a broken file, else returns its notices (corpus documents skipped for having neither title nor
    text). Cross-file checks (duplicate ids across corpus files, qrels naming unknown queries; qrels naming absent
    documents are counted) happen at launch."""
    notices: list[datasets.Notice] = []
    kind = datasets.classify(rel)
    if kind == "corpus":
        datasets.parse_corpus(data, rel, into=_IdsOnly(), notices=notices)
    elif kind == "queries":
        datasets.parse_queries(data, rel)
    elif kind == "qrels":
        datasets.parse_qrels(data, rel)
    elif kind == "pairs":
        datasets.parse_pairs(data, rel)
    return notices


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


def _max_bytes(max_bytes: int | None) -> int:
    from embedpipe.config import Settings

    return Settings.from_env().max_object_bytes if max_bytes is None else max_bytes


def check_object(bucket: str, name: str, generation: int, max_bytes: int | None = None) -> Verdict:
    """``Accepted`` (with its notices) when the object is a usable dataset file; a ``Rejection`` (and the object is
    quarantined) when it is not; None when that generation is gone.

    An object over ``max_bytes`` (default: ``Settings.max_object_bytes``) is rejected from its metadata, unread;
    the rest is parsed from a stream, so memory follows the longest line and the ids, not the file."""
    uri = f"gs://{bucket}/{name}"
    problem = name_problem(name)
    line = None
    if problem is None:
        rel = name.split("/", 2)[2]
        blob = storage.client().bucket(bucket).blob(name, generation=generation)
        try:
            blob.reload()  # that generation's metadata: its size
            problem = datasets.size_problem(int(blob.size), _max_bytes(max_bytes))
            if problem is None:
                with blob.open("rb", chunk_size=datasets.READ_CHUNK) as stream:
                    # the pipeline records and logs the notices
                    return Accepted(uri, generation, tuple(check_file(rel, stream)))
        except gexc.NotFound:
            return None  # replaced or deleted since: the newer generation has its own event
        except datasets.DatasetError as exc:
            problem, line = exc.reason, exc.line
    where = f"{uri}:{line}" if line else uri
    log.warning("rejected %s: %s", where, problem)
    return Rejection(uri, generation, line, problem, quarantine(bucket, name, generation))


def load_valid(bucket: str, dataset: str, max_rejections: int = 100, max_bytes: int | None = None):
    """Load the whole dataset, quarantining each file a cross-file check rejects (duplicate ids across corpus files,
    qrels naming unknown query ids) or that is over ``max_bytes`` (default: ``Settings.max_object_bytes``), until the
    rest is valid. Returns (Dataset or None, rejections, why None).

    What ``datasets.load_files`` accepts with a notice is not a rejection here: a qrels file naming documents the
    corpus lacks stays (``Dataset.qrels_absent`` counts the rows; evaluation treats them the trec_eval way), so a
    corpus file quarantined for a real error does not take the qrels that cite it along."""
    rejections: list[Rejection] = []
    cap = _max_bytes(max_bytes)
    for _ in range(max_rejections):
        try:
            return datasets.load_gcs(bucket, dataset, max_bytes=cap), rejections, None
        except datasets.NoCorpus as exc:
            return None, rejections, str(exc)
        except gexc.NotFound:
            continue  # listed, then gone before it was read: a concurrent delivery moved it; load again without it
        except datasets.DatasetError as exc:
            name = f"datasets/{dataset}/{exc.file}"
            blob = storage.client().bucket(bucket).get_blob(name)
            if blob is None:
                continue  # gone since it was read (another delivery quarantined it): load again without it
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
