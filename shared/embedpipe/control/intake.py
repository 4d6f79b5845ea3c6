"""Intake: check each uploaded file before a run uses it; move a bad one under ``quarantine/``.

A bad file never reaches training or the index: its error (object, line, reason) goes into the run record and a
``io.embedpipe.file.rejected.v1`` event on ``run-events``, and the object is moved to
``gs://DATA/quarantine/<dataset>/<path>`` (the copy keeps the bytes for inspection; the original is deleted only if it
is still the generation we checked, so a corrected re-upload is never removed). Valid files beside it go on.

What published BEIR folders legitimately hold is accepted with ``datasets.Notice``s, not rejected: a corpus document
with neither title nor text is skipped and its notice travels in the ``Accepted`` verdict into the run record
(``record["notices"]``, see ``Pipeline.on_object_change``). A qrels row naming a document the corpus lacks cannot be
seen in one file on its own; the jobs' load counts it (``Dataset.qrels_absent``) and keeps the file. The same
parsers serve ``embedpipe upload``'s local pre-check, so both sides give the same verdict on the same bytes.

Functions do O(files) work per event, never O(documents): at upload one file is parsed as a stream, at launch only
the listing is checked (``check_listing``); the checks that need every file together (duplicate ids across corpus
files, qrels naming unknown queries) run inside the jobs that load the dataset anyway (``load_checked``), which
write what they left out to ``intake.json``; the pipeline quarantines and reports those files when the job ends.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from google.api_core import exceptions as gexc

from embedpipe.config import Settings
from embedpipe.contracts import datasets
from embedpipe.gcp import datasource, storage

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
    notices: tuple[datasets.Notice, ...] = ()  # the first MAX_NOTICES of them
    total: int | None = field(default=None, compare=False)  # how many there were (None: len(notices))

    @property
    def count(self) -> int:
        return len(self.notices) if self.total is None else self.total

    def to_dict(self, limit: int = MAX_NOTICES) -> dict:
        """The run record's entry: exact count, the first ``limit`` notices (a million skipped documents must not
        make a million-entry record)."""
        return {
            "object": self.object,
            "generation": self.generation,
            "count": self.count,
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


class _Notices(list):
    """Keeps the first ``MAX_NOTICES`` notices and counts them all: a corpus of skipped documents must not grow the
    upload handler's memory."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def append(self, notice: datasets.Notice) -> None:
        self.total += 1
        if len(self) < MAX_NOTICES:
            super().append(notice)


class _Discard(dict):
    """``parse_corpus``'s document map when only the verdict matters: keeps nothing."""

    def __setitem__(self, doc_id: str, value) -> None:
        pass


class _NoRows(list):
    """What qrels and pairs parsers fill, when only the verdict matters: keeps nothing."""

    def append(self, row) -> None:
        pass

    def setdefault(self, key, default=None):
        return {}


class _Digests:
    """The ids seen so far as 8-byte digests, for a duplicate check in memory ~ 8 bytes per document. ``parse_corpus``
    asks ``id in docs`` / sets ``docs[id]`` / ``seen_in[id]``: this answers "not seen" and only records; duplicates
    are found by sorting the digests afterwards, and located (file:line) by a second pass over those ids only.
    Skipped documents (neither title nor text) count too: their ids are taken (``seen_in``)."""

    def __init__(self) -> None:
        self.digests = array("Q")

    def __contains__(self, doc_id) -> bool:
        return False

    def __setitem__(self, doc_id: str, value) -> None:
        self.digests.append(_digest(doc_id))

    def get(self, doc_id, default=None):
        return default

    def repeated(self) -> set[int]:
        import numpy as np

        ordered = np.sort(np.frombuffer(self.digests, dtype=np.uint64))
        return set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())


class _OnlyThese(dict):
    """Second pass: remembers only the ids whose digest repeated, so ``parse_corpus`` names the duplicate's line."""

    def __init__(self, digests: set[int]) -> None:
        super().__init__()
        self.wanted = digests

    def __setitem__(self, doc_id: str, value) -> None:
        if _digest(doc_id) in self.wanted:
            super().__setitem__(doc_id, value)


def _digest(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")


def check_file(rel: str, data: datasets.Source) -> list[datasets.Notice]:
    """Parse one BEIR file (bytes, or a seekable binary stream read line by line) on its own: raises DatasetError
    (file, line, reason) for a broken file, else returns its notices (corpus documents skipped for having neither
    title nor text; the first ``MAX_NOTICES``, with ``.total`` the count). Cross-file checks (duplicate ids across
    corpus files, qrels naming unknown queries; qrels naming absent documents are counted) happen in the jobs.

    Memory for a corpus or queries file is one line plus 8 bytes per id (16 while they are sorted): ids are kept as
    digests, and a file whose digests repeat is read a second time to name the duplicate's line (a digest collision
    between distinct ids passes that pass). Qrels and pairs files keep nothing but the line being checked (a 3M-line
    qrels file held whole peaked at 541 MB in a 512 MiB function)."""
    notices = _Notices()
    kind = datasets.classify(rel)
    if kind == "corpus":
        seen = _Digests()
        datasets.parse_corpus(data, rel, into=_Discard(), seen_in=seen, notices=notices)
        repeated = seen.repeated()
        if repeated:
            if not isinstance(data, (bytes, bytearray)):
                data.seek(0)
            datasets.parse_corpus(data, rel, into=_Discard(), seen_in=_OnlyThese(repeated), notices=_Notices())
    elif kind == "queries":
        seen = _Digests()
        datasets.parse_queries(data, rel, into=seen)
        if repeated := seen.repeated():  # name the repeat's line: a second pass over those ids only
            if not isinstance(data, (bytes, bytearray)):
                data.seek(0)
            datasets.parse_queries(data, rel, into=_OnlyThese(repeated))
    elif kind == "qrels":
        datasets.parse_qrels(data, rel, into=_NoRows())
    elif kind == "pairs":
        datasets.parse_pairs(data, rel, into=_NoRows())
    elif kind == "source":
        _source_parts(data, rel)
    return notices


def _source_parts(data: datasets.Source, rel: str) -> list:
    """A ``source.json``'s BigQuery parts (``bqsource.parse``); a function reads this one small object, no rows."""
    from embedpipe.gcp import bqsource

    if not isinstance(data, (bytes, bytearray)):
        data = data.read(bqsource.MAX_SOURCE_BYTES + 1)
    return bqsource.parse(bytes(data), rel)


def quarantine_name(name: str) -> str:
    """Where ``quarantine`` moves ``name``: ``quarantine/<the path below datasets/>``, made a safe object name."""
    rest = name.split("/", 1)[1] if name.startswith("datasets/") else name
    target = f"quarantine/{rest}".replace("..", "__")
    return "".join(c if ord(c) >= 32 and ord(c) != 127 else "_" for c in target)[:1000]


def quarantine(bucket: str, name: str, generation: int) -> str:
    """Copy ``name`` (that generation) to ``quarantine_name(name)`` and delete it if still unchanged."""
    target = quarantine_name(name)
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


def check_object(bucket: str, name: str, generation: int, max_bytes: int) -> Verdict:
    """``Accepted`` (with its notices) when the object is a usable dataset file; a ``Rejection`` (and the object is
    quarantined) when it is not; None when that generation is gone (replaced or deleted; one an earlier delivery
    quarantined is that ``Rejection`` again).

    An object over ``max_bytes`` (the pipeline's ``Settings.max_object_bytes``) is rejected from its metadata, unread;
    the rest is parsed from a stream, so memory follows the longest line and the ids, not the file."""
    uri = f"gs://{bucket}/{name}"
    problem = name_problem(name)
    line = None
    if problem is None:
        rel = name.split("/", 2)[2]
        blob = storage.client().bucket(bucket).blob(name, generation=generation)
        try:
            blob.reload()  # that generation's metadata: its size
            problem = datasets.size_problem(int(blob.size), max_bytes, blob.content_encoding)
            if problem is None:
                with blob.open("rb", chunk_size=datasets.READ_CHUNK) as stream:
                    # the pipeline records and logs the notices
                    notices = check_file(rel, stream)
                    return Accepted(uri, generation, tuple(notices), getattr(notices, "total", len(notices)))
        except gexc.NotFound:  # replaced or deleted since (the newer generation has its own event), or moved
            return _quarantined_before(bucket, name, generation)
        except datasets.DatasetError as exc:
            problem, line = exc.reason, exc.line
    where = f"{uri}:{line}" if line else uri
    log.warning("rejected %s: %s", where, problem)
    return Rejection(uri, generation, line, problem, quarantine(bucket, name, generation))


def _quarantined_before(bucket: str, name: str, generation: int) -> Rejection | None:
    """An upload whose generation is gone because an earlier delivery quarantined it and died before recording the
    rejection (nothing at its name now, a copy in quarantine): the rejection again, so a corpus part is absent, not
    deleted, and the waiter hears of it. None when the object was replaced or deleted."""
    copy = f"gs://{bucket}/{quarantine_name(name)}"
    if storage.exists(f"gs://{bucket}/{name}") or not storage.exists(copy):
        return None
    reason = "quarantined by an earlier delivery of this upload (its reason is in that delivery's log)"
    return Rejection(f"gs://{bucket}/{name}", generation, None, reason, copy)


def load_checked(
    bucket: str,
    dataset: str,
    settings: Settings,
    test: bool = True,
    max_rejections: int = 100,
    max_bytes: int | None = None,
    as_of=None,
    known: datasets.KnownLines | Callable[[], datasets.KnownLines] | None = None,
):
    """The jobs' load (DESIGN.md §3.1): the whole dataset, leaving out each file a cross-file check rejects
    (duplicate ids across corpus files, qrels naming unknown query ids) or that is over ``max_bytes`` (default:
    ``settings.max_object_bytes``), until the rest is valid. Returns (Dataset or None, rejections, why None).
    ``settings``: the job's, from its entry point (the cap; how a ``source.json``'s BigQuery tables are read).

    It only reads: the rejections go into the job's ``intake.json`` (``write_report``) and the pipeline, which may
    write the data bucket, quarantines and reports them when the job ends. A function never parses documents.

    What ``datasets.load_files`` accepts with a notice is not a rejection here: a qrels file naming documents the
    corpus lacks stays (``Dataset.qrels_absent`` counts the rows; evaluation treats them the trec_eval way), so a
    corpus file left out for a real error does not take the qrels that cite it along. ``known``: corpus lines a
    previous load accepted, not parsed again (the incremental embed job's; ``datasets.parse_corpus``), or a function
    returning them, called after the files are read (``datasource.load_gcs``)."""
    rejections: list[Rejection] = []
    cap = settings.max_object_bytes if max_bytes is None else max_bytes
    exclude: set[str] = set()
    for _ in range(max_rejections + 10):
        generations: dict[str, int] = {}
        try:
            ds = datasource.load_gcs(
                bucket,
                dataset,
                test=test,
                max_bytes=cap,
                settings=settings,
                exclude=frozenset(exclude),
                generations=generations,
                as_of=as_of,
                known=known,
            )
            return ds, rejections, None
        except datasets.NoCorpus as exc:
            return None, rejections, str(exc)
        except gexc.NotFound:
            continue  # listed, then replaced or gone before it was read: list and load again
        except datasets.DatasetError as exc:
            if len(rejections) >= max_rejections:
                break
            name = f"datasets/{dataset}/{exc.file}"
            log.warning("rejected gs://%s/%s:%s: %s", bucket, name, exc.line or "", exc.reason)
            generation = generations.get(exc.file.split("#")[0], 0)  # a BigQuery part: its source.json's
            rejections.append(Rejection(f"gs://{bucket}/{name}", generation, exc.line, exc.reason))
            exclude.add(exc.file)
    return None, rejections, f"more than {max_rejections} bad files"


def check_listing(bucket: str, dataset: str, max_bytes: int) -> tuple[list[Rejection], str | None]:
    """The launch-time check a function can afford: O(files), from the listing alone (and ``source.json``, one
    small object). Files over ``max_bytes`` and a broken ``source.json`` are quarantined (they were rejected at
    upload too; a cap lowered since catches them here); a dataset with no corpus file and no corpus table left
    cannot run. Everything that needs the documents happens in the jobs (``load_checked``)."""
    cap = max_bytes
    root = datasets.prefix(bucket, dataset)
    rejections, corpus = [], 0
    for uri, generation, size, encoding in storage.list_objects(root):
        rel = uri[len(root) :]
        kind = datasets.classify(rel)
        if not kind:
            continue
        name = uri[len(f"gs://{bucket}/") :]
        if problem := datasets.size_problem(size, cap, encoding):
            rejections.append(Rejection(uri, generation, None, problem, quarantine(bucket, name, generation)))
        elif kind == "corpus":
            corpus += 1
        elif kind == "source":
            from embedpipe.gcp import bqsource

            try:
                if size > bqsource.MAX_SOURCE_BYTES:  # read nothing of it
                    raise datasets.DatasetError(
                        rel, None, f"{size} bytes, over the {bqsource.MAX_SOURCE_BYTES}-byte cap"
                    )
                parts = _source_parts(storage.read_bytes(uri, generation), rel)
            except gexc.NotFound:
                continue  # replaced since: the newer generation has its own event and launch
            except datasets.DatasetError as exc:
                where = quarantine(bucket, name, generation)
                rejections.append(Rejection(uri, generation, exc.line, exc.reason, where))
                continue
            corpus += any(p.kind == "corpus" for p in parts)
    return rejections, None if corpus else "dataset has no corpus"


REPORT_FILE = "intake.json"


def write_report(uri: str, rejections: list[Rejection], problem: str | None) -> None:
    """A job's intake verdict, beside its outputs: what it left out and why, and whether anything was left."""
    storage.write_json(uri, {"rejections": [r.to_dict() for r in rejections], "problem": problem})


def parse_report(doc: dict | None) -> tuple[list[Rejection], str | None]:
    if not doc:
        return [], None
    rejections = [
        Rejection(r["object"], int(r["generation"]), r.get("line"), r["reason"]) for r in doc.get("rejections") or []
    ]
    return rejections, doc.get("problem")


def is_corpus(rejection: Rejection) -> bool:
    """A rejected corpus file or table: its documents are absent from this load, not deleted (no deletions
    follow)."""
    if rejection.object.endswith(f"{datasets.SOURCE_FILE}#corpus"):
        return True
    found = datasets.dataset_of(rejection.object.split("/", 3)[3]) if rejection.object.count("/") >= 3 else None
    return bool(found) and datasets.classify(found[1]) == "corpus"


def is_table(rejection: Rejection) -> bool:
    """A rejected BigQuery part (``gs://.../source.json#corpus``): reported, never moved (the table is the user's,
    and ``source.json`` still names the other parts)."""
    return "#" in rejection.object
