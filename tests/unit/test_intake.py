"""Intake's limits: an object over the size cap is rejected from its metadata, unread (on upload and at launch); the
rest is parsed from a stream, the same way as bytes; a JSON line nested too deeply rejects its file."""

from __future__ import annotations

import io
import json

import pytest
from google.api_core import exceptions as gexc

from embedpipe.config import Settings
from embedpipe.contracts import datasets
from embedpipe.control import intake
from embedpipe.control.pipeline import Pipeline
from embedpipe.gcp import datasource, storage
from embedpipe.ledger.runs import Ledger
from tests.unit.fakes import FakeStore

DATA = "data"
CAP = Settings().max_object_bytes  # the default EMBEDPIPE_MAX_OBJECT_BYTES
NESTED = b'{"_id": "a", "text": "x", "metadata": {"m": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}\n"


class FakeGCS:
    """Enough of the storage client for intake: generations, pinned reads, metadata, streams, copies, deletes.
    A read of an object named in ``unreadable`` fails the test: it must be judged from its metadata alone."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, int]] = {}
        self.unreadable: set[str] = set()
        self.downloaded: list[str] = []  # whole-object reads
        self._generation = 0

    def put(self, name: str, data: bytes) -> int:
        self._generation += 1
        self.objects[name] = (data, self._generation)
        return self._generation

    def bucket(self, name: str):
        return self

    def blob(self, name: str, generation: int | None = None):
        return _Blob(self, name, generation)

    def get_blob(self, name: str):
        return self.blob(name, self.objects[name][1]) if name in self.objects else None

    def list_blobs(self, bucket: str, prefix: str = ""):
        for name in sorted(self.objects):
            if name.startswith(prefix):
                yield self.blob(name, self.objects[name][1])

    def copy_blob(self, src, dest, name: str, source_generation: int | None = None):
        self.put(name, self.objects[src.name][0])


class _Blob:
    def __init__(self, gcs: FakeGCS, name: str, pinned: int | None):
        self.gcs, self.name, self.pinned = gcs, name, pinned

    def _found(self) -> tuple[bytes, int]:
        found = self.gcs.objects.get(self.name)
        if found is None or (self.pinned is not None and found[1] != self.pinned):
            raise gexc.NotFound(self.name)
        return found

    def reload(self) -> None:
        self._found()

    def exists(self) -> bool:
        try:
            self._found()
        except gexc.NotFound:
            return False
        return True

    @property
    def size(self) -> int:
        return len(self._found()[0])

    content_encoding = None  # stored as uploaded (no gzip transcoding)

    @property
    def generation(self) -> int:
        return self._found()[1]

    def download_as_bytes(self) -> bytes:
        assert self.name not in self.gcs.unreadable, f"{self.name} was read"
        self.gcs.downloaded.append(self.name)
        return self._found()[0]

    def open(self, mode: str = "rb", chunk_size: int | None = None):
        assert self.name not in self.gcs.unreadable, f"{self.name} was read"
        return io.BytesIO(self._found()[0])

    def delete(self, if_generation_match: int | None = None) -> None:
        if if_generation_match is not None and self._found()[1] != if_generation_match:
            raise gexc.PreconditionFailed(self.name)
        del self.gcs.objects[self.name]


@pytest.fixture
def gcs(monkeypatch) -> FakeGCS:
    fake = FakeGCS()
    monkeypatch.setattr(storage, "client", lambda: fake)
    return fake


def jl(*objs) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def test_an_object_over_the_cap_is_rejected_unread(gcs):
    name = "datasets/demo/corpus.jsonl"
    gen = gcs.put(name, jl({"_id": "a", "text": "x" * 100}))
    gcs.unreadable.add(name)
    verdict = intake.check_object(DATA, name, gen, max_bytes=50)
    assert isinstance(verdict, intake.Rejection) and verdict.line is None
    assert (
        verdict.reason == f"object is {len(gcs.objects['quarantine/demo/corpus.jsonl'][0])} bytes, over the "
        "50-byte cap (EMBEDPIPE_MAX_OBJECT_BYTES)"
    )
    assert verdict.quarantined_to == f"gs://{DATA}/quarantine/demo/corpus.jsonl" and name not in gcs.objects


def test_the_pipeline_checks_uploads_against_the_cap_of_its_settings(gcs):
    def pipe(env: dict) -> Pipeline:
        return Pipeline(Settings.from_env(env), ledger=Ledger("artifacts", store=FakeStore()))

    name = "datasets/demo/queries.jsonl"
    gen = gcs.put(name, jl({"_id": "q", "text": "question"}))
    gcs.unreadable.add(name)
    assert "over the 10-byte cap" in pipe({"EMBEDPIPE_MAX_OBJECT_BYTES": "10"}).check_object(DATA, name, gen).reason
    gcs.unreadable.clear()
    gen = gcs.put(name, jl({"_id": "q", "text": "question"}))  # the first was quarantined
    assert pipe({}).check_object(DATA, name, gen) == intake.Accepted(f"gs://{DATA}/{name}", gen)


def test_an_object_within_the_cap_is_parsed_from_a_stream(gcs):
    name = "datasets/demo/corpus.jsonl"
    data = jl({"_id": "a", "text": "x"}, {"_id": "b", "text": ""})
    gen = gcs.put(name, data)
    verdict = intake.check_object(DATA, name, gen, max_bytes=len(data))
    assert isinstance(verdict, intake.Accepted) and [n.id for n in verdict.notices] == ["b"]
    assert gcs.downloaded == []  # read through open(), never whole


def test_an_object_gone_before_its_size_is_read_has_no_verdict(gcs):
    gen = gcs.put("datasets/demo/corpus.jsonl", jl({"_id": "a", "text": "x"}))
    gcs.put("datasets/demo/corpus.jsonl", jl({"_id": "a", "text": "y"}))
    assert intake.check_object(DATA, "datasets/demo/corpus.jsonl", gen, CAP) is None


@pytest.mark.parametrize(
    "rel,data",
    [
        ("corpus.jsonl", jl({"_id": "a", "text": "x"}) + NESTED),
        ("queries.jsonl", jl({"_id": "q", "text": "x"}) + b"[" * 100_000 + b"]" * 100_000 + b"\n"),
        ("pairs/p.jsonl", jl({"anchor": "a", "positive": "p"}) + b'{"anchor": ' + b"[" * 100_000 + b"\n"),
    ],
    ids=["corpus-metadata", "queries-array", "pairs-unclosed"],
)
def test_a_deeply_nested_json_line_rejects_its_file(gcs, rel, data):
    name = f"datasets/demo/{rel}"
    verdict = intake.check_object(DATA, name, gcs.put(name, data), CAP)
    assert isinstance(verdict, intake.Rejection)
    assert (verdict.line, verdict.reason) == (2, "invalid JSON: nested too deeply")


def test_an_endless_line_stops_the_stream_near_the_line_limit():
    class Endless(io.RawIOBase):
        read_total = 0

        def read(self, n: int = -1) -> bytes:
            self.read_total += n
            return b"x" * n

    stream = Endless()
    with pytest.raises(datasets.DatasetError) as err:
        intake.check_file("corpus.jsonl", stream)
    assert (err.value.line, err.value.reason) == (1, f"line is over the {datasets.MAX_LINE_BYTES}-byte limit")
    assert stream.read_total <= datasets.MAX_LINE_BYTES + datasets.READ_CHUNK


def test_a_file_over_the_cap_is_left_out_by_the_jobs_load_and_quarantined_at_launch(gcs):
    root = "datasets/demo/"
    gcs.put(root + "corpus.jsonl", jl({"_id": "a", "text": "alpha"}, {"_id": "b", "text": "beta"}))
    gcs.put(root + "queries.jsonl", jl({"_id": "q", "text": "alpha?"}))
    big = gcs.put(root + "corpus/big.jsonl", jl(*({"_id": f"x{i}", "text": "filler"} for i in range(20))))
    gcs.unreadable.add(root + "corpus/big.jsonl")
    ds, rejections, problem = intake.load_checked(DATA, "demo", Settings(), max_bytes=200)  # a job: reads, never moves
    assert problem is None and sorted(ds.corpus) == ["a", "b"]
    [r] = rejections
    assert (r.object, r.generation, r.line, r.quarantined_to) == (
        f"gs://{DATA}/{root}corpus/big.jsonl",
        big,
        None,
        None,
    )
    assert "over the 200-byte cap (EMBEDPIPE_MAX_OBJECT_BYTES)" in r.reason
    assert root + "corpus/big.jsonl" in gcs.objects and intake.is_corpus(r)

    gcs.downloaded.clear()
    [moved], problem = intake.check_listing(DATA, "demo", max_bytes=200)  # a function: the listing only
    assert problem is None and gcs.downloaded == []
    assert moved.quarantined_to == f"gs://{DATA}/quarantine/demo/corpus/big.jsonl" and moved.generation == big
    assert "quarantine/demo/corpus/big.jsonl" in gcs.objects and root + "corpus/big.jsonl" not in gcs.objects


def test_the_jobs_load_reads_the_files_before_it_asks_for_the_known_lines(gcs):
    """The incremental embed job reads the live table while the corpus downloads: only the parse waits for it."""
    root = "datasets/demo/"
    gcs.put(root + "corpus.jsonl", jl({"_id": "a", "text": "alpha"}, {"_id": "b", "text": "beta"}))
    gcs.put(root + "queries.jsonl", jl({"_id": "q", "text": "alpha?"}))
    asked = []

    def known() -> datasets.KnownLines:
        asked.append(sorted(gcs.downloaded))
        return datasets.KnownLines()

    ds, _, problem = intake.load_checked(DATA, "demo", Settings(), known=known)
    assert problem is None and sorted(ds.corpus) == ["a", "b"] and isinstance(ds.corpus, datasets.Corpus)
    assert asked == [[root + "corpus.jsonl", root + "queries.jsonl"]]


def test_a_live_table_that_cannot_be_read_fails_the_load_once_and_names_it(gcs):
    """A NotFound for the live table is not a dataset file replaced mid-read: no re-listing, no rejection."""
    gcs.put("datasets/demo/corpus.jsonl", jl({"_id": "a", "text": "alpha"}))
    calls = []

    def known() -> datasets.KnownLines:
        calls.append(1)
        raise gexc.NotFound("gs://bucket/runs/r0/live-hashes.parquet")

    with pytest.raises(datasource.KnownLinesUnreadable, match="live-hashes.parquet"):
        intake.load_checked(DATA, "demo", Settings(), known=known)
    assert len(calls) == 1 and gcs.downloaded == ["datasets/demo/corpus.jsonl"]


def test_launch_check_needs_a_corpus_file_and_reads_nothing(gcs):
    gcs.put("datasets/demo/queries.jsonl", jl({"_id": "q", "text": "alpha?"}))
    assert intake.check_listing(DATA, "demo", CAP) == ([], "dataset has no corpus")
    assert gcs.downloaded == []


def test_a_job_report_round_trips():
    r = intake.Rejection(f"gs://{DATA}/datasets/demo/qrels/dev.tsv", 7, 3, "query-id 'q9' is not in queries")
    doc = {"rejections": [r.to_dict()], "problem": None}
    assert intake.parse_report(doc) == ([r], None) and intake.parse_report(None) == ([], None)
    assert not intake.is_corpus(r)


def test_streamed_and_whole_files_parse_alike(monkeypatch):
    """Chunk boundaries fall anywhere (mid-line, mid-CRLF, mid-UTF-8): a stream gives what the bytes give."""
    data = jl({"_id": "a", "text": "caf\u00e9"}, {"_id": "b", "text": ""}).replace(b"\n", b"\r\n") + b"\n\n"
    data += b'{"_id": "c", "text": "no newline at the end"}'
    monkeypatch.setattr(datasets, "READ_CHUNK", 3)
    notices: list = []
    assert datasets.parse_corpus(io.BytesIO(data), "c.jsonl", notices=notices) == datasets.parse_corpus(data, "c.jsonl")
    assert [(n.line, n.id) for n in notices] == [(2, "b")]
    bad = data + b'\n{"_id": "d", "text": "caf\xe9"}\n'
    for source in (bad, io.BytesIO(bad)):
        with pytest.raises(datasets.DatasetError, match=r"c.jsonl:6: invalid UTF-8 at byte 25"):
            datasets.parse_corpus(source, "c.jsonl")
    for empty in (b"", b" \n\r\n"):
        with pytest.raises(datasets.DatasetError, match="file is empty"):
            datasets.parse_queries(io.BytesIO(empty), "queries.jsonl")
    with pytest.raises(datasets.DatasetError, match="binary file"):
        datasets.parse_queries(io.BytesIO(b'{"_id": "q"}\n\0\0'), "queries.jsonl")


def test_the_upload_check_keeps_digests_not_ids_and_still_names_the_duplicate_line():
    docs = [{"_id": f"doc-{i}", "text": "t"} for i in range(20_000)]
    data = jl(*docs, {"_id": "doc-7", "text": "again"}, {"_id": "empty"}, {"_id": "tail", "text": "t"})
    for source in (data, io.BytesIO(data)):  # bytes, or a stream read twice (the second pass seeks back)
        with pytest.raises(datasets.DatasetError) as err:
            intake.check_file("corpus.jsonl", source)
        assert (err.value.line, err.value.reason) == (20_001, "duplicate _id 'doc-7' (first seen in corpus.jsonl:8)")
    notices = intake.check_file("corpus.jsonl", jl(*docs, *({"_id": f"e{i}"} for i in range(300))))
    assert notices.total == 300 and len(notices) == intake.MAX_NOTICES  # counted, not all kept


@pytest.mark.parametrize("kind", ["qrels", "queries", "pairs"])
def test_queries_qrels_and_pairs_are_checked_in_bounded_memory(kind, monkeypatch):
    """Issue 25.9: the upload function held queries, qrels and pairs files whole (a 3M-line qrels file peaked at
    541 MB in a 512 MiB function). Checked from a stream now: memory is a read chunk (64 KiB here), plus 8 bytes
    per query id (16 while they are sorted)."""
    import io
    import tracemalloc

    import numpy  # noqa: F401 - imported before measuring: the duplicate-id check sorts digests with it

    monkeypatch.setattr(datasets, "READ_CHUNK", 1 << 16)

    n = 200_000
    if kind == "qrels":
        rel, body = (
            "qrels/train.tsv",
            b"query-id\tcorpus-id\tscore\n"
            + b"".join(b"query-%07d\tdocument-%07d\t1\n" % (i // 40, i) for i in range(n)),
        )
    elif kind == "queries":
        rel, body = "queries.jsonl", b"".join(b'{"_id": "q%07d", "text": "a question"}\n' % i for i in range(n))
    else:
        rel, body = "pairs/p.jsonl", b"".join(b'{"anchor": "a%07d", "positive": "a positive"}\n' % i for i in range(n))
    tracemalloc.start()
    try:
        intake.check_file(rel, io.BytesIO(body))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    limit = 2**20 + (16 * n if kind == "queries" else 0)
    assert peak < limit, f"{kind}: {peak / 2**20:.1f} MiB for a {len(body) / 2**20:.1f} MiB file"


def test_a_repeated_query_id_is_named_with_its_line_from_a_stream():
    import io

    body = b'{"_id": "q1", "text": "a"}\n{"_id": "q2", "text": "b"}\n{"_id": "q1", "text": "c"}\n'
    with pytest.raises(datasets.DatasetError) as err:
        intake.check_file("queries.jsonl", io.BytesIO(body))
    assert (err.value.line, err.value.reason) == (3, "duplicate query _id 'q1'")
