"""BEIR-format datasets: layout, strict parsing with precise errors, and training pairs.

Layout under ``gs://DATA/datasets/<dataset>/`` (DESIGN.md §3.1)::

    corpus.jsonl | corpus/*.jsonl   {"_id", "title"?, "text", "metadata"?}
    queries.jsonl                   {"_id", "text"}
    qrels/<split>.tsv               header "query-id\tcorpus-id\tscore"
    pairs/*.jsonl                   {"anchor", "positive", "negative"?}   (optional)

Every error names the file, the line and the reason; a bad line fails its file, never silently skipped. What
published BEIR folders legitimately hold is accepted the way BEIR's loader and trec_eval accept it, with a
``Notice`` (file, line, reason) instead of an error: a document with a title and no text is a title-only document;
a document with neither is skipped (``Dataset.skipped``); a qrels row naming a document the corpus does not have is
kept for evaluation (a relevant document no ranking can hold) and out of training (``Dataset.qrels_absent``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 1 << 20
DATASET_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
QRELS_HEADER = ["query-id", "corpus-id", "score"]
HEADER_LINE = "\t".join(QRELS_HEADER)


class DatasetError(ValueError):
    def __init__(self, file: str, line: int | None, reason: str):
        self.file, self.line, self.reason = file, line, reason
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {reason}")


class NoCorpus(DatasetError):
    """The dataset as a whole has no document: no single file to leave out."""


TITLE_COPY_END = re.compile(r"\s*(?:$|\n|[.:;!?](?:\s|$)|[-\u2013\u2014]\s)\s*")
SENTENCE_END = ".:;!?"


@dataclass(frozen=True)
class Notice:
    """Something accepted with a warning: the file, line, document or query id, and why."""

    file: str
    line: int | None
    id: str
    reason: str

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "id": self.id, "reason": self.reason}

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


_json_str = json.encoder.encode_basestring  # what json.dumps(..., ensure_ascii=False) writes for a str


@dataclass(frozen=True)
class Doc:
    id: str
    text: str
    title: str = ""
    metadata: dict = field(default_factory=dict)

    @property
    def body(self) -> str:
        """The text without a leading copy of the title: some collections repeat the title as the text's first line
        (``"<title>\n<abstract>"`` or ``"<title>. <abstract>"``). Only a title followed by a line break or
        sentence-ending punctuation is a copy; a title that merely begins the first sentence stays."""
        title, text = self.title.strip(), self.text.strip()
        if not title or not text.startswith(title):
            return text
        rest = text[len(title) :]
        if TITLE_COPY_END.match(rest):
            return TITLE_COPY_END.sub("", rest, count=1).strip()
        if title[-1] in SENTENCE_END and (not rest or rest[0].isspace()):  # the title's own full stop ends it
            return rest.strip()
        return text

    @property
    def full_text(self) -> str:
        """What gets embedded and BM25-indexed: the title (when there is one) and the text, the title once. Any
        change to it (or to ``body``) comes with a new ``vectorstore.TEXT_RULE``, so live indexes are rebuilt."""
        title, body = self.title.strip(), self.body
        if not title:
            return body
        if not body or body == title:
            return title
        return f"{title} {body}" if title[-1] in SENTENCE_END else f"{title}. {body}"

    @property
    def content_hash(self) -> str:
        """sha256 of ``json.dumps([title, text, metadata], sort_keys=True, ensure_ascii=False)``, first 32 hex
        digits (stored in every index and id/hash table: the definition cannot change). Without metadata the same
        text is built from json's own string encoder. Computed once (a job reads it twice per document; not
        ``functools.cached_property``, whose per-call lock costs more than the hash here)."""
        cached = self.__dict__.get("_content_hash")
        if cached is not None:
            return cached
        if self.metadata:
            payload = json.dumps([self.title, self.text, self.metadata], sort_keys=True, ensure_ascii=False)
        else:
            payload = f"[{_json_str(self.title)}, {_json_str(self.text)}, {{}}]"
        digest = hashlib.sha256(payload.encode()).hexdigest()[:32]
        object.__setattr__(self, "_content_hash", digest)  # frozen: not a field, so equality is unchanged
        return digest


@dataclass
class Dataset:
    name: str
    corpus: Mapping[str, Doc]  # a dict, or a ``Corpus`` (loaded with ``KnownLines``)
    queries: dict[str, str]
    qrels: dict[str, dict[str, dict[str, int]]]  # split -> query id -> doc id -> score
    pairs: list[tuple[str, str, str | None]]
    skipped: list[Notice] = field(default_factory=list)  # documents with neither title nor text
    qrels_absent: dict[str, int] = field(default_factory=dict)  # split -> rows naming a document not in the corpus

    def eval_split(self) -> str | None:
        """The split reported metrics and the gate use: test only. ``dev`` is the selection split; reporting or
        gating on it after every choice was made on it would flatter the run."""
        return "test" if self.qrels.get("test") else None

    def eval_qrels(self) -> dict[str, dict[str, int]]:
        split = self.eval_split()
        return self.qrels[split] if split else {}

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for doc_id in sorted(self.corpus):
            h.update(f"{doc_id}\0{self.corpus[doc_id].content_hash}\n".encode())
        for a, p, n in self.training_pairs():
            h.update(f"{a}\0{p}\0{n}\n".encode())
        return h.hexdigest()[:16]

    def training_pairs(self) -> list[tuple[str, str, str | None]]:
        """Pairs from ``pairs/``, else queries -> relevant docs of ``qrels/train.tsv``, else derived from the corpus."""
        if self.pairs:
            return self.pairs
        train = self.qrels.get("train") or {}
        out = []
        for qid in sorted(train):
            if qid not in self.queries:
                continue
            for doc_id, score in sorted(train[qid].items()):
                if score > 0 and doc_id in self.corpus:
                    out.append((self.queries[qid], self.corpus[doc_id].full_text, None))
        if out:
            return out
        return derive_pairs(self.corpus.values())


def derive_pairs(docs) -> list[tuple[str, str, str | None]]:
    """A bare corpus still trains: title -> text without the title (a positive that repeats its anchor teaches
    nothing: the loss is ~0 from the first step), or first sentence -> the rest. Title-only documents give none."""
    out = []
    for doc in sorted(docs, key=lambda d: d.id):
        body = doc.body
        if doc.title.strip():
            if body and body != doc.title.strip():
                out.append((doc.title.strip(), body, None))
            continue
        first, sep, rest = body.partition(". ")
        if sep and rest.strip() and len(first.split()) >= 3:
            out.append((first + ".", rest.strip(), None))
    return out


MAX_ID_BYTES = 512  # Milvus VARCHAR primary key limit
ID_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f]")


def check_id(doc_id: str, file: str, number: int) -> None:
    """Document ids become Milvus primary keys: at most 512 UTF-8 bytes, no control characters."""
    if len(doc_id.encode()) > MAX_ID_BYTES:
        raise DatasetError(file, number, f"_id is {len(doc_id.encode())} bytes, over the {MAX_ID_BYTES}-byte limit")
    if ID_FORBIDDEN.search(doc_id):
        raise DatasetError(file, number, f"_id {doc_id!r} contains control characters")


def check_name(name: str) -> str:
    if not DATASET_RE.fullmatch(name):
        raise ValueError(f"dataset name {name!r} must match {DATASET_RE.pattern}")
    return name


Source = bytes | BinaryIO  # a file's bytes, or a binary stream of them (read line by line, memory ~ one line)
READ_CHUNK = 8 << 20
NUL_SNIFF = 8192
MAX_JSON_DEPTH = 64  # nesting kept in a document's metadata (serialised again for its hash and the index)


def _chunks(data: Source):
    if isinstance(data, (bytes, bytearray)):
        yield bytes(data)
        return
    while chunk := data.read(READ_CHUNK):
        yield chunk


def _raw_lines(data: Source, file: str):
    """(line number, raw bytes) for each line (blank ones too), before decoding: the NUL sniff and the length cap of
    an unfinished streamed line apply here, everything else to the decoded line (``_lines``)."""
    number, rest, sniffed = 0, b"", 0
    for chunk in _chunks(data):
        if sniffed < NUL_SNIFF:
            if b"\0" in chunk[: NUL_SNIFF - sniffed]:
                raise DatasetError(file, None, "binary file (NUL bytes), expected UTF-8 text")
            sniffed += len(chunk)
        *complete, rest = (rest + chunk).split(b"\n")
        for raw in complete:
            number += 1
            yield number, raw
        if len(rest) > MAX_LINE_BYTES and not isinstance(data, (bytes, bytearray)):
            # a stream's unfinished line: stop before it grows further (its full length is unknown)
            raise DatasetError(file, number + 1, f"line is over the {MAX_LINE_BYTES}-byte limit")
    yield number + 1, rest


def _lines(data: Source, file: str):
    """(line number, decoded line) for each non-blank line; ``data`` is bytes or a stream, parsed the same way."""
    any_text = False
    for number, raw in _raw_lines(data, file):
        if (line := _decode(raw, file, number)).strip():
            any_text = True
            yield number, line
    if not any_text:
        raise DatasetError(file, None, "file is empty")


def _decode(raw: bytes, file: str, number: int) -> str:
    if len(raw) > MAX_LINE_BYTES:
        raise DatasetError(file, number, f"line is {len(raw)} bytes, over the {MAX_LINE_BYTES}-byte limit")
    try:
        return raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as exc:
        raise DatasetError(file, number, f"invalid UTF-8 at byte {exc.start}") from None


def _too_deep(value, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` nests lists/objects deeper than ``limit`` (iterative: the check must not recurse itself)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False


def _json_lines(data: Source, file: str):
    for number, line in _lines(data, file):
        yield number, _json_object(line, file, number)


def _json_object(line: str, file: str, number: int) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(file, number, f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:  # json's C parser recurses per nesting level: [[[[...]]]] exhausts the stack
        raise DatasetError(file, number, "invalid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise DatasetError(file, number, f"expected a JSON object, got {type(obj).__name__}")
    if "\\u" in line and _unpaired_surrogate(obj):
        # only an escape can make one (UTF-8 decoding refuses encoded surrogates); an id holding one used to crash
        # check_id, a text the content hash of every later job
        raise DatasetError(file, number, "an escaped unpaired UTF-16 surrogate (such as \\ud800) is not text")
    return obj


def _unpaired_surrogate(obj) -> bool:
    """Whether any string (key or value) anywhere in ``obj`` holds an unpaired surrogate. Walked with a stack, not
    recursion: a line nested past the interpreter's stack must not hide one."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


_NORMALISED: dict[str, int] = {}  # file -> ids normalised so far in this process (the warnings are capped per file)
NORMALISED_WARNINGS = 5


def normal_id(value: str, file: str, number: int) -> str:
    """An id as it is compared everywhere: Unicode NFC, no surrounding whitespace. The same id written as NFC in one
    file and NFD in another (or with a trailing space) used to be two documents, and qrels in the other form counted
    as absent; normalised, they are one (two ids that become equal are a duplicate, with file:line). A changed id
    is logged with file:line (the first few per file)."""
    normal = value.strip()
    if not normal.isascii():
        normal = unicodedata.normalize("NFC", normal)
    if normal != value:
        seen = _NORMALISED[file] = _NORMALISED.get(file, 0) + 1
        if seen <= NORMALISED_WARNINGS:
            log.warning("%s:%s: id %r read as %r (Unicode NFC, no surrounding whitespace)", file, number, value, normal)
    return normal


def _str_field(obj: dict, key: str, file: str, number: int, required: bool = True) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise DatasetError(file, number, f"missing required field {key!r}")
        return ""
    if isinstance(value, (int, float)) and key == "_id" and not isinstance(value, bool):
        return str(value)  # BEIR files in the wild use numeric ids; they are ids, not numbers
    if not isinstance(value, str):
        raise DatasetError(file, number, f"field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DatasetError(file, number, f"field {key!r} is empty")
    return value


def parse_corpus(
    data: Source,
    file: str,
    into: dict[str, Doc] | None = None,
    seen_in: dict[str, str] | None = None,
    notices: list[Notice] | None = None,
    known: KnownLines | None = None,
) -> dict[str, Doc]:
    """Parse one corpus file; ids must be unique within it and across ``into`` (earlier files). A document with
    neither title nor text is skipped with a notice; one with only a title is a title-only document.

    With ``known`` (``into`` a ``Corpus``), a line whose raw bytes a previous load parsed (its digest is in
    ``known``) is not decoded nor parsed again: it is the same document, with the same id and content hash, so only
    the check that needs the other lines (its id is not seen twice) runs for it; ``into`` parses it if asked for
    it. Every error is the one the full parse gives, on the same line."""
    if known is None:
        return corpus_records(_json_lines(data, file), file, into, seen_in, notices)
    if not isinstance(into, Corpus):
        raise TypeError("parse_corpus(known=...) fills a datasets.Corpus")
    seen_in = {} if seen_in is None else seen_in
    return corpus_records(_unknown_lines(data, file, into, seen_in, known), file, into, seen_in, notices)


LINE_DIGEST_VERSION = (
    b"embedpipe-line-2"  # 16 bytes at most; a new one when what a line parses to would change (2: normal_id)
)
LINE_DIGEST_BYTES = 16


def line_digest(raw: bytes) -> bytes:
    """The identity of a corpus line: 128-bit BLAKE2b of its raw bytes (as split on ``\\n``, ``\\r`` included),
    personalised with ``LINE_DIGEST_VERSION``, which changes whenever a line could parse to another document or to
    an error (checks, ``Doc`` fields, the content hash): a digest from an older parser then matches nothing."""
    return hashlib.blake2b(raw, digest_size=LINE_DIGEST_BYTES, person=LINE_DIGEST_VERSION).digest()


@dataclass(frozen=True)
class KnownLines:
    """Corpus lines a previous load parsed and accepted: line digest -> document id, and id -> content hash (the
    incremental embed job's are the live index's id/hash table, ``control.incremental``). Empty: nothing is known,
    every line is parsed, and the ``Corpus`` still records each document's line digest. ``ids`` is any mapping; a
    load looks lines up through ``LineIds`` (``line_ids``), a file's lines at once."""

    ids: Mapping[bytes, str] = field(default_factory=dict)
    hashes: Mapping[str, str] = field(default_factory=dict)

    def line_ids(self) -> LineIds:
        found = self.ids if isinstance(self.ids, LineIds) else self.__dict__.get("_line_ids")
        if found is None:
            found = LineIds(b"".join(self.ids), list(self.ids.values()))
            object.__setattr__(self, "_line_ids", found)  # frozen: not a field, so equality is unchanged
        return found


class LineIds(Mapping[bytes, str]):
    """line digest -> document id, for many lines at a time (``rows``): the digests (``digests``, each
    ``LINE_DIGEST_BYTES`` long, concatenated; any buffer) are sorted once by their first 8 bytes as an integer, and a
    batch of lines is a ``searchsorted`` and a 16-byte comparison in numpy, not a dict lookup per line."""

    def __init__(self, digests, ids) -> None:
        import numpy as np

        self._keys = np.frombuffer(digests, dtype="<u8").reshape(-1, 2)  # each digest as two 64-bit integers
        self.ids = np.asarray(ids, dtype=object)  # row -> document id
        if len(self.ids) != len(self._keys):
            raise ValueError(f"{len(self._keys)} line digests for {len(self.ids)} ids")
        self._order = self._first = None

    def rows(self, digests: bytes):
        """The row (index into ``ids``) of each of ``digests`` (concatenated), -1 where the line is not known."""
        import numpy as np

        query = np.frombuffer(digests, dtype="<u8").reshape(-1, 2)
        if not len(self._keys) or not len(query):
            return np.full(len(query), -1, dtype=np.int64)
        if self._first is None:  # built once; both set before either is read, so a second thread sees a pair
            order = np.argsort(self._keys[:, 0], kind="stable")
            self._order, self._first = order, self._keys[order, 0]
        pos = np.minimum(np.searchsorted(self._first, query[:, 0]), len(self._first) - 1)
        candidate = self._order[pos]
        found = (self._keys[candidate] == query).all(axis=1)
        rows = np.where(found, candidate, -1)
        # two known digests that share their first 8 bytes (~n^2/2^65: never in practice): search the whole run
        for i in np.flatnonzero(~found & (self._first[pos] == query[:, 0])).tolist():
            j = int(pos[i])
            while j < len(self._first) and self._first[j] == query[i, 0]:
                if (self._keys[self._order[j]] == query[i]).all():
                    rows[i] = self._order[j]
                    break
                j += 1
        return rows

    def digests_of(self, ids) -> dict[str, bytes]:
        """id -> line digest for those of ``ids`` this table has a line for (one pass over the rows)."""
        wanted = set(ids)
        rows = [r for r, doc_id in enumerate(self.ids.tolist()) if doc_id in wanted] if wanted else []
        return {self.ids[r]: self._keys[r].tobytes() for r in rows}

    def __getitem__(self, digest: bytes) -> str:
        row = int(self.rows(digest)[0]) if len(digest) == LINE_DIGEST_BYTES else -1
        if row < 0:
            raise KeyError(digest)
        return self.ids[row]

    def __iter__(self):
        return (key.tobytes() for key in self._keys)

    def __len__(self) -> int:
        return len(self._keys)


KNOWN_BATCH_LINES = 1 << 16  # a stream's lines looked up at once (bytes are one batch)


def _raw_batches(data: Source, file: str):
    """``_raw_lines`` a batch at a time: (number of its first line, raw lines). Bytes are one batch, split at once;
    a stream's batches end where ``_raw_lines`` raises, and the error comes after the lines before it."""
    if isinstance(data, (bytes, bytearray)):
        if b"\0" in data[:NUL_SNIFF]:
            raise DatasetError(file, None, "binary file (NUL bytes), expected UTF-8 text")
        yield 1, bytes(data).split(b"\n")
        return
    first, batch, error = 1, [], None
    try:
        for number, raw in _raw_lines(data, file):
            if not batch:
                first = number
            batch.append(raw)
            if len(batch) == KNOWN_BATCH_LINES:
                yield first, batch
                batch = []
    except DatasetError as exc:
        error = exc
    if batch:
        yield first, batch
    if error is not None:
        raise error


def _unknown_lines(data: Source, file: str, into: Corpus, seen_in: dict[str, str], known: KnownLines):
    """``_json_lines`` for ``corpus_records``, with each known line taken into ``into`` here, unparsed, after the
    same duplicate check ``corpus_records`` runs (in line order: the first error is the full parse's). A known
    document's place (for a later duplicate's error) is its ``Corpus`` entry, not a ``seen_in`` string.

    This runs over every line of the corpus, so it works a batch of lines at a time: their digests, which of them
    are known (``LineIds.rows``), then each run of known lines between two unknown ones goes into ``into`` in a few
    C-level dict updates once its ids are checked new as a set; a run that fails that check (or holds an id twice)
    goes line by line, which raises the full parse's error at its line."""
    import numpy as np

    any_text = False
    line_ids = known.line_ids()
    docs, digests = into._docs, into.digests
    into.use(known)
    blake2b = hashlib.blake2b

    def one_by_one(start: int, end: int) -> None:  # lines [start, end) of the batch, all known
        for k in range(start, end):
            doc_id, number = ids[k - (start - known_before)], first + k
            if doc_id in docs or doc_id in seen_in:
                where = _first_seen(doc_id, seen_in, into, file)
                raise DatasetError(file, number, f"duplicate _id {doc_id!r} (first seen in {where})")
            docs[doc_id] = (raws[k], file, number)
            digests[doc_id] = line_digests[k]
            into.known_lines += 1

    for first, raws in _raw_batches(data, file):
        line_digests = [
            blake2b(raw, digest_size=LINE_DIGEST_BYTES, person=LINE_DIGEST_VERSION).digest() for raw in raws
        ]
        rows = line_ids.rows(b"".join(line_digests))
        hit = rows >= 0
        ids = line_ids.ids[rows[hit]].tolist()  # the known lines' document ids, in line order
        any_text = any_text or bool(ids)
        known_before = 0  # known lines of the batch before the current run
        unknown = np.flatnonzero(~hit).tolist()
        for start, end in zip([0, *(u + 1 for u in unknown)], [*unknown, len(raws)]):
            if end > start:  # lines [start, end) are known: take them
                run = ids[known_before : known_before + end - start]
                size = len(docs)
                if docs.keys().isdisjoint(run) and seen_in.keys().isdisjoint(run):
                    docs.update(zip(run, zip(raws[start:end], repeat(file), range(first + start, first + end))))
                if len(docs) == size + len(run):
                    digests.update(zip(run, line_digests[start:end]))
                    into.known_lines += len(run)
                else:  # an id seen before, or twice in the run: undo, then take the run line by line
                    if len(docs) != size:
                        for doc_id in run:  # all new to ``docs`` (checked above): the rest is as it was
                            docs.pop(doc_id, None)
                    one_by_one(start, end)  # raises the full parse's error at its line
                known_before += end - start
            if end < len(raws):  # line ``end`` is not known: decode and parse it
                number = first + end
                if (line := _decode(raws[end], file, number)).strip():
                    any_text = True
                    into.next_digest = line_digests[end]  # the document corpus_records stores from this line has it
                    yield number, _json_object(line, file, number)
                    into.next_digest = None
    if not any_text:
        raise DatasetError(file, None, "file is empty")


def _first_seen(doc_id: str, seen_in, docs, file: str) -> str:
    """Where a duplicate id was first seen: ``seen_in``'s note, else a known line's place in a ``Corpus``."""
    where = seen_in.get(doc_id)
    if where is None and isinstance(docs, Corpus):
        where = docs.location(doc_id)
    return where or file


class Corpus(Mapping[str, Doc]):
    """A corpus loaded with ``KnownLines``: id -> ``Doc`` like the plain dict of a full parse, in file order, where
    a known line is kept as its raw bytes and parsed on first access (so every reader sees the full parse's
    document), plus what the incremental embed job asks without parsing: ``content_hashes()`` and ``digests`` (id ->
    the digest of the line it came from; none for BigQuery rows)."""

    def __init__(self) -> None:
        self._docs: dict[str, Doc | tuple[bytes, str, int]] = {}  # a known line: (raw bytes, file, line number)
        self._known: Mapping[str, str] | None = None  # id -> content hash of the known lines (``KnownLines.hashes``)
        self.known_lines = 0  # lines taken as known
        self._parsed: list[str] = []
        self.digests: dict[str, bytes] = {}
        self.next_digest: bytes | None = None

    def __setitem__(self, doc_id: str, doc: Doc) -> None:
        self._docs[doc_id] = doc
        self._parsed.append(doc_id)
        if self.next_digest is not None:
            self.digests[doc_id] = self.next_digest
            self.next_digest = None

    def __getitem__(self, doc_id: str) -> Doc:
        doc = self._docs[doc_id]
        if type(doc) is tuple:
            doc = self._docs[doc_id] = _parse_known(doc_id, *doc)
            self._parsed.append(doc_id)
        return doc

    def __contains__(self, doc_id) -> bool:
        return doc_id in self._docs

    def __iter__(self):
        return iter(self._docs)

    def __len__(self) -> int:
        return len(self._docs)

    @property
    def parsed(self) -> int:
        """Documents parsed so far (the rest are known lines not asked for)."""
        return len(self._parsed)

    def location(self, doc_id: str) -> str | None:
        """``file:line`` of a known line not parsed yet (else None)."""
        entry = self._docs.get(doc_id)
        return f"{entry[1]}:{entry[2]}" if type(entry) is tuple else None

    def use(self, known: KnownLines) -> None:
        """Take known lines from ``known`` (one ``KnownLines`` per corpus: their hashes are its known documents')."""
        if self._known is None:
            self._known = known.hashes
        elif self._known is not known.hashes:
            raise ValueError("a Corpus takes its known lines from one KnownLines")

    def content_hashes(self) -> dict[str, str]:
        """id -> content hash of every document; known lines are not parsed for it: a known document's is the
        ``KnownLines``' own, so the table's dict is copied (C speed) and the rows this corpus lacks dropped."""
        docs, out = self._docs, {}
        if self.known_lines:
            out = dict(self._known)
            for doc_id in self._known.keys() - docs.keys():
                del out[doc_id]
        out.update((i, docs[i].content_hash) for i in self._parsed)
        if len(out) != len(docs):  # a known line's id without a hash: the KnownLines is not one table's
            raise KeyError(next(i for i in docs if i not in out))
        return out


def _parse_known(doc_id: str, raw: bytes, file: str, number: int) -> Doc:
    """The document of a known line, parsed as the full parse does."""
    docs = corpus_records([(number, _json_object(_decode(raw, file, number), file, number))], file)
    if list(docs) != [doc_id]:  # only a digest collision: the table's line was another one
        raise DatasetError(file, number, f"line digest names document {doc_id!r}, the line has {list(docs)}")
    return docs[doc_id]


def content_hashes(corpus: Mapping[str, Doc]) -> dict[str, str]:
    """id -> content hash of a corpus, a ``Corpus`` without parsing its known lines."""
    if isinstance(corpus, Corpus):
        return corpus.content_hashes()
    return {i: doc.content_hash for i, doc in corpus.items()}


def corpus_records(
    records,
    file: str,
    into: dict[str, Doc] | None = None,
    seen_in: dict[str, str] | None = None,
    notices: list[Notice] | None = None,
) -> dict[str, Doc]:
    """The checks of ``parse_corpus`` on ``(line or row number, object)`` pairs: one definition for a file's lines
    and a table's rows (``bqsource``)."""
    docs = {} if into is None else into
    seen_in = {} if seen_in is None else seen_in
    notices = [] if notices is None else notices
    for number, obj in records:
        doc_id = normal_id(_str_field(obj, "_id", file, number), file, number)
        check_id(doc_id, file, number)
        text = _str_field(obj, "text", file, number, required=False)
        title = _str_field(obj, "title", file, number, required=False)
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise DatasetError(file, number, f"field 'metadata' must be an object, got {type(metadata).__name__}")
        if metadata and _too_deep(metadata):
            raise DatasetError(file, number, f"field 'metadata' nests deeper than {MAX_JSON_DEPTH} levels")
        if doc_id in docs or doc_id in seen_in:
            where = _first_seen(doc_id, seen_in, docs, file)
            raise DatasetError(file, number, f"duplicate _id {doc_id!r} (first seen in {where})")
        seen_in[doc_id] = f"{file}:{number}"
        if not text.strip() and not title.strip():
            notices.append(Notice(file, number, doc_id, f"document {doc_id!r} has neither title nor text: skipped"))
            continue
        docs[doc_id] = Doc(doc_id, text, title, metadata)
    return docs


def parse_queries(data: Source, file: str, into: dict[str, str] | None = None) -> dict[str, str]:
    return query_records(_json_lines(data, file), file, into)


def query_records(records, file: str, into: dict[str, str] | None = None) -> dict[str, str]:
    out = {} if into is None else into
    for number, obj in records:
        qid = normal_id(_str_field(obj, "_id", file, number), file, number)
        if qid in out:
            raise DatasetError(file, number, f"duplicate query _id {qid!r}")
        out[qid] = _str_field(obj, "text", file, number)
    return out


def parse_qrels(
    data: Source, file: str, known_queries=None, known_docs=None, notices: list[Notice] | None = None, into=None
) -> dict[str, dict[str, int]]:
    """Parse one qrels file; with ``known_queries`` each row's query must exist (errors name the line); with
    ``known_docs`` a row naming an absent document is kept (trec_eval counts it as relevant and unretrievable) with
    a notice."""
    lines = iter(_lines(data, file))
    number, header = next(lines)
    if header.split("\t") != QRELS_HEADER:
        raise DatasetError(file, number, f"header must be {HEADER_LINE!r}, got {header!r}")

    def rows():
        for number, line in lines:
            cols = line.split("\t")
            if len(cols) != 3:
                raise DatasetError(file, number, f"expected 3 tab-separated columns, got {len(cols)}")
            yield number, tuple(cols)

    return qrels_rows(rows(), file, known_queries, known_docs, notices, into)


def qrels_rows(
    rows, file: str, known_queries=None, known_docs=None, notices: list[Notice] | None = None, into=None
) -> dict[str, dict[str, int]]:
    """The checks of ``parse_qrels`` on ``(line or row number, (query id, corpus id, score))``."""
    out: dict[str, dict[str, int]] = {} if into is None else into
    for number, (qid, doc_id, score) in rows:
        qid, doc_id = normal_id(qid, file, number), normal_id(doc_id, file, number)
        try:
            value = int(float(score))
        except (ValueError, OverflowError):
            raise DatasetError(file, number, f"score {score!r} is not a number") from None
        if known_queries is not None and qid not in known_queries:
            raise DatasetError(
                file, number, f"query-id {qid!r} is not in queries (queries.jsonl and any queries table)"
            )
        if known_docs is not None and doc_id not in known_docs and notices is not None:
            notices.append(Notice(file, number, doc_id, f"corpus-id {doc_id!r} (query {qid!r}) is not in the corpus"))
        out.setdefault(qid, {})[doc_id] = value
    return out


def parse_pairs(data: Source, file: str, into: list | None = None) -> list[tuple[str, str, str | None]]:
    out = [] if into is None else into
    for number, obj in _json_lines(data, file):
        anchor = _str_field(obj, "anchor", file, number)
        positive = _str_field(obj, "positive", file, number)
        negative = _str_field(obj, "negative", file, number, required=False) or None
        out.append((anchor, positive, negative))
    return out


SOURCE_FILE = "source.json"  # BigQuery tables for parts of the dataset (``bqsource``)


def classify(rel: str) -> str | None:
    """Which part of a BEIR folder a relative path is: corpus | queries | qrels | pairs | source, or None
    (ignored)."""
    if rel == "corpus.jsonl" or (rel.startswith("corpus/") and rel.endswith(".jsonl")):
        return "corpus"
    if rel == "queries.jsonl":
        return "queries"
    if rel.startswith("qrels/") and rel.endswith(".tsv") and rel.count("/") == 1:
        return "qrels"
    if rel.startswith("pairs/") and rel.endswith(".jsonl"):
        return "pairs"
    if rel == SOURCE_FILE:
        return "source"
    return None


TEST_QRELS = "qrels/test.tsv"


def load_files(
    name: str,
    files: dict[str, bytes],
    tables: dict | None = None,
    queries_elsewhere: bool = False,
    known: KnownLines | None = None,
) -> Dataset:
    """Build a Dataset from ``{relative path: bytes}`` and ``tables`` (``{bqsource.Part: its records}``, parts read
    from BigQuery, loaded beside the files as if they were more files); qrels must name known queries (absent
    documents are kept and counted, see the module docstring), unless ``queries_elsewhere`` (``upload``'s
    pre-check of a folder whose queries are a table it does not read). With ``known`` the corpus is a ``Corpus``
    whose known lines are not parsed (``parse_corpus``)."""
    corpus: dict[str, Doc] = {} if known is None else Corpus()
    seen: dict[str, str] = {}
    skipped: list[Notice] = []
    absent: dict[str, int] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, dict[str, int]]] = {}
    pairs: list = []
    tables = tables or {}
    for rel in sorted(files):
        kind = classify(rel)
        if kind == "corpus":
            parse_corpus(files[rel], rel, corpus, seen, skipped, known)
        elif kind == "queries":
            parse_queries(files[rel], rel, queries)
        elif kind == "pairs":
            pairs.extend(parse_pairs(files[rel], rel))
    for part, recs in tables.items():
        if part.kind == "corpus":
            _table(part, corpus_records, recs, part.rel, corpus, seen, skipped)
        elif part.kind == "queries":
            _table(part, query_records, recs, part.rel, queries)
    qrels_parts = [(Path(rel).stem, rel, None) for rel in sorted(files) if classify(rel) == "qrels"]
    qrels_parts += [(part.split, part.rel, (part, recs)) for part, recs in tables.items() if part.kind == "qrels"]
    for split, rel, table in qrels_parts:
        notices: list[Notice] = []
        into = qrels.setdefault(split, {})
        if table is None:
            known = None if queries_elsewhere else queries
            for qid, row in parse_qrels(files[rel], rel, known, corpus, notices).items():
                into.setdefault(qid, {}).update(row)
        else:
            _table(table[0], qrels_rows, table[1], rel, queries, corpus, notices, into)
        if notices:
            absent[split] = absent.get(split, 0) + len(notices)
    if not corpus:
        raise NoCorpus(f"datasets/{name}/corpus.jsonl", None, "dataset has no corpus")
    return Dataset(name, corpus, queries, qrels, pairs, skipped, absent)


def _table(part, check, *args):
    """``check`` over a table's rows; its errors also name the table (their line is the row, in read order)."""
    try:
        return check(*args)
    except DatasetError as exc:
        if exc.file != part.rel or exc.reason.startswith(part.where):
            raise
        raise DatasetError(part.rel, exc.line, f"{part.where}: {exc.reason}") from None


def load_dir(path: Path, name: str | None = None, queries_elsewhere: bool = False) -> Dataset:
    path = Path(path)
    files = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    return load_files(name or path.name, {k: v for k, v in files.items() if classify(k)}, None, queries_elsewhere)


def prefix(data_bucket: str, dataset: str) -> str:
    return f"gs://{data_bucket}/datasets/{dataset}/"


def size_problem(size: int, cap: int, encoding: str | None = None) -> str | None:
    """Why an object of ``size`` stored bytes is not read at all (None when it is within the cap). An object stored
    with a ``Content-Encoding`` (gzip) is decompressed by GCS on every read: its stored size says nothing of what is
    read (603 KB expanded to 46 MB), so the cap could not hold: refused."""
    if encoding and encoding.strip().lower() not in ("identity", ""):
        return (
            f"object is stored with Content-Encoding: {encoding} (GCS decompresses it on every read, past the "
            "size cap): upload it uncompressed"
        )
    if size <= cap:
        return None
    return f"object is {size} bytes, over the {cap}-byte cap (EMBEDPIPE_MAX_OBJECT_BYTES)"


def dataset_of(object_name: str) -> tuple[str, str] | None:
    """``datasets/<dataset>/<rel>`` -> (dataset, rel) when it is a BEIR file we react to."""
    parts = object_name.split("/", 2)
    if len(parts) != 3 or parts[0] != "datasets" or not DATASET_RE.fullmatch(parts[1]):
        return None
    if ".." in parts[2].split("/") or any(ord(c) < 32 for c in parts[2]):
        return None
    return (parts[1], parts[2]) if classify(parts[2]) else None
