"""embedpipe.control.pipeline: what each trigger does to the ledger and which jobs it launches (fakes for store and
jobs)."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import shutil
import threading
import types
from pathlib import Path

import pytest
import typer
from google.api_core import exceptions as gexc
from typer.testing import CliRunner

from embedpipe import cli, topology
from embedpipe.config import Settings
from embedpipe.contracts import datasets, events
from embedpipe.contracts.datasets import Notice
from embedpipe.contracts.events import (
    INDEX_REQUESTED,
    RUN_FAILED,
    RUN_STAGE,
    Event,
    JobStateHint,
    ObjectChange,
    RetrainRequest,
)
from embedpipe.control import intake, pipeline
from embedpipe.control.pipeline import Pipeline
from embedpipe.gcp import storage
from embedpipe.jobs.spec import JobSpec
from embedpipe.ledger import lifecycle, runs
from embedpipe.ledger.runs import EMBEDDING, FAILED, INDEXING, PENDING, SUCCEEDED, TRAINING, Ledger
from embedpipe.retrieval import vectorstore
from tests.unit.fakes import Clock, FakeLauncher, FakeStore, load_event

DATA = "embedpipe-data"


class Harness:
    """A Pipeline wired to fakes, plus the shortcuts the tests below share."""

    def __init__(self, settings: Settings, store: FakeStore, launcher: FakeLauncher, clock: Clock):
        self.settings, self.store, self.launcher, self.clock = settings, store, launcher, clock
        self.ledger = Ledger(settings.artifacts_bucket, store=store, clock=clock)
        self.published: list[tuple[str, Event]] = []
        self.pipe = Pipeline(
            settings,
            ledger=self.ledger,
            launcher=launcher,
            publish=lambda t, e: self.published.append((t, e)),
            sleep=clock.advance,
            clock=clock,
            read_uploads=False,  # the in-memory store backs no bucket
            live_check=lambda promoted: None,  # nor a Milvus
        )

    # ------------------------------------------------------------ triggers
    def upload(self, name: str = "datasets/demo/corpus.jsonl", generation: int = 1, **kw) -> str:
        change = ObjectChange(kw.pop("bucket", DATA), name, generation, kw.pop("event_type", "OBJECT_FINALIZE"))
        return self.pipe.on_object_change(change)

    def started_run(self, dataset: str = "demo") -> str:
        """An upload, the debounce passed, launched: a run in TRAINING with one train job."""
        self.upload(f"datasets/{dataset}/corpus.jsonl")
        self.clock.advance(self.settings.debounce_s + 1)
        (run_id,) = self.pipe.launch_due(dataset)
        return run_id

    def job_event(self, spec: JobSpec, state: str, error: str = "") -> str:
        """The job ends and its ml_job LogEntry arrives (on_job_event confirms the state through the launcher)."""
        self.launcher.finish(self.launcher.name_for(spec.job_id), state, error)
        return self.redeliver(spec, state)

    def redeliver(self, spec: JobSpec, state: str) -> str:
        return self.pipe.on_job_event(JobStateHint(spec.job_id, state, "Job completed."))

    # ------------------------------------------------------------ reading
    def run(self, run_id: str) -> dict:
        return self.ledger.view(run_id)

    def runs(self) -> list[dict]:
        return self.ledger.list_runs()

    def events(self, event_type: str, topic: str | None = None) -> list[Event]:
        return [e for t, e in self.published if e.type == event_type and (topic is None or t == topic)]


@pytest.fixture
def make(store, launcher, clock):
    def make(**tweaks) -> Harness:
        # launches happen where each test says (launch_due, reconcile) unless it turns handler launches on
        settings = dataclasses.replace(Settings.from_env({}), **{"debounce_s": 0.0, "launch_wait_s": 0.0, **tweaks})
        return Harness(settings, store, launcher, clock)

    return make


@pytest.fixture
def h(make) -> Harness:
    return make()


# ---------------------------------------------------------------- object changes


def test_gcs_event_delivered_three_times_gives_one_claim_one_run(make):
    h = make(debounce_s=30)
    change = events.parse_object_change(load_event("gcs_notification_push.json"))
    outcomes = [h.pipe.on_object_change(change) for _ in range(3)]

    assert len(h.store.uris("/ledger/claims/")) == 1
    (run,) = h.runs()
    assert len(set(outcomes)) == 1 and run["run_id"] in outcomes[0]
    assert run["state"] == PENDING
    assert run["triggers"] == ["gcs/embedpipe-data/datasets/demo/corpus.jsonl#1732611845123456"]
    assert run["trigger_objects"] == [
        {"object": "datasets/demo/corpus.jsonl", "generation": 1732611845123456, "part": "corpus"}
    ]
    assert h.ledger.get_dataset("demo")["pending"] == run["run_id"]
    assert h.launcher.submits == []  # not due yet


def test_eventarc_and_pubsub_deliveries_of_one_object_version_are_one_trigger(make):
    h = make(debounce_s=30)
    h.pipe.on_object_change(events.parse_object_change(load_event("gcs_notification_push.json")))
    h.pipe.on_object_change(events.parse_object_change(load_event("gcs_finalized_eventarc.json")))
    (run,) = h.runs()
    assert len(run["triggers"]) == 1


def test_a_new_generation_is_a_new_trigger_of_the_same_pending_run(make):
    h = make(debounce_s=30)
    h.upload(generation=1)
    h.upload(generation=2)
    (run,) = h.runs()
    assert run["triggers"] == [
        "gcs/embedpipe-data/datasets/demo/corpus.jsonl#1",
        "gcs/embedpipe-data/datasets/demo/corpus.jsonl#2",
    ]


def test_a_burst_of_uploads_coalesces_into_one_run(make):
    h = make(debounce_s=5)
    for name in ("corpus/part-1.jsonl", "corpus/part-2.jsonl", "queries.jsonl", "qrels/test.tsv"):
        h.upload(f"datasets/demo/{name}")
        h.clock.advance(1)
    (run,) = h.runs()
    assert [o["part"] for o in run["trigger_objects"]] == ["corpus", "corpus", "queries", "qrels"]
    h.clock.advance(5)
    assert h.pipe.launch_due() == [run["run_id"]]
    assert len(h.launcher.submits) == 1


@pytest.mark.parametrize(
    "change",
    [
        ObjectChange(DATA, "datasets/demo/corpus.jsonl", 3, "OBJECT_DELETE"),
        ObjectChange(DATA, "datasets/demo/corpus.jsonl", 3, "OBJECT_METADATA_UPDATE"),
        ObjectChange("someone-elses-bucket", "datasets/demo/corpus.jsonl", 3, "OBJECT_FINALIZE"),
        ObjectChange(DATA, "uploads/demo/corpus.jsonl", 3, "OBJECT_FINALIZE"),
        ObjectChange(DATA, "datasets/demo/README.md", 3, "OBJECT_FINALIZE"),
    ],
    ids=["delete", "metadata-update", "other-bucket", "not-datasets", "not-beir-file"],
)
def test_irrelevant_object_changes_are_ignored(h, change):
    assert h.pipe.on_object_change(change).startswith("ignored")
    assert h.store.objects == {}
    assert h.launcher.submits == [] and h.published == []


@pytest.mark.parametrize(
    "name",
    [
        "datasets/Bad Name/corpus.jsonl",
        "datasets/demo/../x/corpus.jsonl",
        "datasets/demo/corpus\x01.jsonl",
        "datasets/demo/" + "c" * 201 + ".jsonl",
    ],
)
def test_badly_named_objects_are_rejected_without_a_run(h, name):
    outcome = h.pipe.on_object_change(ObjectChange(DATA, name, 3, "OBJECT_FINALIZE"))
    assert outcome.startswith("rejected") and name in outcome
    # no run, no dataset state: only the refusal, where `upload --wait` finds it instead of waiting forever
    assert [u for u in h.store.objects if "/ledger/rejected/" not in u] == []
    assert name in h.ledger.get_rejection(events.object_key(DATA, name, 3))["reason"]
    assert h.launcher.submits == []


def test_redelivery_finishes_a_trigger_whose_first_delivery_died_after_claiming(make):
    h = make(debounce_s=30)
    key = "gcs/embedpipe-data/datasets/demo/corpus.jsonl#1"
    run_id = h.ledger.pending_run("demo", {"type": "upload"}, 30)
    h.ledger.claim(key, run_id)  # ... and the instance died before recording the trigger on the run
    h.upload(generation=1)
    assert h.run(run_id)["triggers"] == [key]
    assert len(h.runs()) == 1


# ---------------------------------------------------------------- intake: verdicts, notices, quarantine

QUIRKS = Path(__file__).resolve().parents[1] / "fixtures" / "beir_quirks"
HEADER = b"query-id\tcorpus-id\tscore\n"
SKIPPED_Q04 = Notice("corpus.jsonl", 4, "q-04", "document 'q-04' has neither title nor text: skipped")


class FakeGCS:
    """Enough of ``google.cloud.storage.Client`` for intake and ``datasource.load_gcs``: objects with generations,
    generation-pinned reads, ``if_generation_match`` deletes, copies, listing."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], tuple[bytes, int]] = {}
        self.encodings: dict[tuple[str, str], str] = {}  # Content-Encoding, where set
        self._generation = 100

    def put(self, bucket: str, name: str, data: bytes, encoding: str | None = None) -> int:
        self._generation += 1
        self.objects[(bucket, name)] = (data, self._generation)
        if encoding:
            self.encodings[(bucket, name)] = encoding
        return self._generation

    def names(self, bucket: str = DATA) -> list[str]:
        return sorted(n for b, n in self.objects if b == bucket)

    def bucket(self, name: str) -> _FakeBucket:
        return _FakeBucket(self, name)

    def list_blobs(self, bucket: str, prefix: str = ""):
        for name in self.names(bucket):
            if name.startswith(prefix):
                data, generation = self.objects[(bucket, name)]
                encoding = self.encodings.get((bucket, name))
                yield types.SimpleNamespace(name=name, generation=generation, size=len(data), content_encoding=encoding)


@dataclasses.dataclass
class _FakeBucket:
    gcs: FakeGCS
    name: str

    def blob(self, name: str, generation: int | None = None) -> _FakeBlob:
        return _FakeBlob(self.gcs, self.name, name, generation)

    def get_blob(self, name: str):
        found = self.gcs.objects.get((self.name, name))
        return types.SimpleNamespace(name=name, generation=found[1], size=len(found[0])) if found else None

    def copy_blob(self, src: _FakeBlob, dest: _FakeBucket, name: str, source_generation: int | None = None):
        self.gcs.put(dest.name, name, _FakeBlob(self.gcs, src.bucket, src.name, source_generation).download_as_bytes())


@dataclasses.dataclass
class _FakeBlob:
    gcs: FakeGCS
    bucket: str
    name: str
    pinned: int | None = None

    def download_as_bytes(self) -> bytes:
        found = self.gcs.objects.get((self.bucket, self.name))
        if found is None or (self.pinned is not None and found[1] != self.pinned):
            raise gexc.NotFound(f"{self.bucket}/{self.name}#{self.pinned}")
        return found[0]

    def reload(self) -> None:
        self.download_as_bytes()  # NotFound when that generation is gone

    def exists(self) -> bool:
        found = self.gcs.objects.get((self.bucket, self.name))
        return found is not None and (self.pinned is None or found[1] == self.pinned)

    @property
    def size(self) -> int:
        return len(self.download_as_bytes())

    @property
    def content_encoding(self) -> str | None:
        return self.gcs.encodings.get((self.bucket, self.name))

    def open(self, mode: str = "rb", chunk_size: int | None = None) -> io.BytesIO:
        assert mode == "rb"
        return io.BytesIO(self.download_as_bytes())

    @property
    def generation(self) -> int:
        return self.gcs.objects[(self.bucket, self.name)][1]

    def delete(self, if_generation_match: int | None = None) -> None:
        found = self.gcs.objects.get((self.bucket, self.name))
        if found is None:
            raise gexc.NotFound(self.name)
        if if_generation_match is not None and found[1] != if_generation_match:
            raise gexc.PreconditionFailed(self.name)
        del self.gcs.objects[(self.bucket, self.name)]


@pytest.fixture
def gcs(monkeypatch) -> FakeGCS:
    fake = FakeGCS()
    monkeypatch.setattr(storage, "client", lambda: fake)
    return fake


@pytest.fixture
def intake_h(make, gcs) -> Harness:
    """The harness with the real intake (``intake.check_object``) reading uploads from the fake bucket."""
    h = make(debounce_s=30)
    h.pipe.check_object = functools.partial(intake.check_object, max_bytes=h.settings.max_object_bytes)
    return h


def jl(*objs) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def quirk_bytes(rel: str) -> bytes:
    return (QUIRKS / rel).read_bytes()


def test_check_file_returns_the_notices_of_a_published_beir_folder():
    assert intake.check_file("corpus.jsonl", quirk_bytes("corpus.jsonl")) == [SKIPPED_Q04]
    assert intake.check_file("queries.jsonl", quirk_bytes("queries.jsonl")) == []
    # one qrels file alone cannot know the corpus: the absent document is counted at launch, not here
    assert intake.check_file("qrels/test.tsv", quirk_bytes("qrels/test.tsv")) == []
    assert intake.check_file("qrels/dev.tsv", quirk_bytes("qrels/dev.tsv")) == []


BROKEN = {  # case -> (rel, bytes, line, reason words): truly broken files are still rejected, with file:line
    "bad-utf8": ("corpus.jsonl", b'{"_id": "a", "text": "ok"}\n{"_id": "b", "text": "caf\xe9"}\n', 2, "invalid UTF-8"),
    "bad-json": ("corpus/part.jsonl", b'{"_id": "a", "text": ""}\n{"_id": "b", "text": }\n', 2, "invalid JSON"),
    "dup-of-skipped": (
        "corpus.jsonl",
        b'{"_id": "a", "title": "", "text": ""}\n{"_id": "a", "text": "now"}\n',
        2,
        "duplicate _id 'a' (first seen in corpus.jsonl:1)",
    ),
    "long-id": ("corpus.jsonl", b'{"_id": "' + b"x" * 513 + b'", "text": "t"}\n', 1, "over the 512-byte limit"),
    "wrong-type": ("corpus.jsonl", b'{"_id": "a", "title": 3, "text": "t"}\n', 1, "must be a string, got int"),
    "qrels-header": ("qrels/test.tsv", b"qid\tdocid\tscore\nk1\tq-01\t1\n", 1, "header must be"),
    "queries-blank": ("queries.jsonl", b'{"_id": "k1", "text": " "}\n', 1, "field 'text' is empty"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_upload_precheck_and_intake_give_the_same_verdict_on_broken_files(case, tmp_path):
    rel, data, line, words = BROKEN[case]
    with pytest.raises(datasets.DatasetError) as err:
        intake.check_file(rel, data)
    assert (err.value.file, err.value.line) == (rel, line) and words in err.value.reason
    folder = tmp_path / "ds"
    shutil.copytree(QUIRKS, folder)
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    (folder / rel).write_bytes(data)
    lines: list[str] = []
    with pytest.raises(typer.Exit) as exit_:
        cli.precheck(folder, "quirks", echo=lines.append)
    assert exit_.value.exit_code == 2
    assert lines == [f"error: {err.value}"]


def test_upload_precheck_and_intake_give_the_same_notices(tmp_path):
    folder = tmp_path / "ds"
    shutil.copytree(QUIRKS, folder)
    part = jl({"_id": "p-1", "text": ""}, {"_id": "p-2", "text": "Pots are stacked by size."})
    (folder / "corpus").mkdir()
    (folder / "corpus" / "part-2.jsonl").write_bytes(part)
    ds = cli.precheck(folder, "quirks", echo=lambda _: None)
    from_intake = [
        n
        for rel in ("corpus.jsonl", "corpus/part-2.jsonl")
        for n in intake.check_file(rel, (folder / rel).read_bytes())
    ]
    part_2 = Notice("corpus/part-2.jsonl", 1, "p-1", "document 'p-1' has neither title nor text: skipped")
    assert ds.skipped == from_intake == [SKIPPED_Q04, part_2]


def test_upload_with_skipped_documents_records_its_notices_once(intake_h, gcs):
    h = intake_h
    name = "datasets/quirks/corpus.jsonl"
    gen = gcs.put(DATA, name, quirk_bytes("corpus.jsonl"))
    change = ObjectChange(DATA, name, gen, "OBJECT_FINALIZE")
    outcomes = [h.pipe.on_object_change(change) for _ in range(2)]  # at-least-once delivery
    (run,) = h.runs()
    assert outcomes[0] == outcomes[1] == f"{name}#{gen} -> run {run['run_id']}"
    assert run["triggers"] == [change.key] and "file_errors" not in run
    assert run["notices"] == {
        change.key: {"object": f"gs://{DATA}/{name}", "generation": gen, "count": 1, "items": [SKIPPED_Q04.to_dict()]}
    }
    assert gcs.names() == [name]  # accepted: nothing quarantined
    assert h.published == []


def dies_once(monkeypatch, obj, attr: str) -> None:
    """``obj.attr`` raises once (the instance died there), then is itself again: what a redelivery meets."""
    real = getattr(obj, attr)

    def died(*a, **kw):
        monkeypatch.setattr(obj, attr, real)
        raise RuntimeError("instance died")

    monkeypatch.setattr(obj, attr, died)


def test_redelivery_after_a_crash_between_notices_and_trigger_records_them_once(intake_h, gcs, monkeypatch):
    h = intake_h
    name = "datasets/quirks/corpus.jsonl"
    change = ObjectChange(DATA, name, gcs.put(DATA, name, quirk_bytes("corpus.jsonl")), "OBJECT_FINALIZE")
    dies_once(monkeypatch, h.ledger, "add_trigger")
    with pytest.raises(RuntimeError):
        h.pipe.on_object_change(change)
    h.pipe.on_object_change(change)
    (run,) = h.runs()
    assert run["triggers"] == [change.key]
    assert list(run["notices"]) == [change.key] and run["notices"][change.key]["count"] == 1


def test_notices_in_the_run_record_are_capped(intake_h, gcs):
    h = intake_h
    name = "datasets/big/corpus.jsonl"
    data = jl(*({"_id": f"e{i:04d}", "text": ""} for i in range(250)), {"_id": "ok", "text": "kept"})
    change = ObjectChange(DATA, name, gcs.put(DATA, name, data), "OBJECT_FINALIZE")
    h.pipe.on_object_change(change)
    entry = h.runs()[0]["notices"][change.key]
    assert entry["count"] == 250 and len(entry["items"]) == intake.MAX_NOTICES
    reason = "document 'e0000' has neither title nor text: skipped"
    assert entry["items"][0] == {"file": "corpus.jsonl", "line": 1, "id": "e0000", "reason": reason}


def test_a_clean_upload_records_no_notices(intake_h, gcs):
    name = "datasets/quirks/qrels/test.tsv"  # names an absent document: not knowable from this file alone
    change = ObjectChange(DATA, name, gcs.put(DATA, name, quirk_bytes("qrels/test.tsv")), "OBJECT_FINALIZE")
    intake_h.pipe.on_object_change(change)
    (run,) = intake_h.runs()
    assert run["triggers"] == [change.key] and "notices" not in run and "file_errors" not in run


def test_a_broken_upload_is_still_rejected_and_quarantined(intake_h, gcs):
    h = intake_h
    name = "datasets/quirks/corpus/bad.jsonl"
    rel, data, line, words = BROKEN["dup-of-skipped"]
    gen = gcs.put(DATA, name, data)
    outcome = h.pipe.on_object_change(ObjectChange(DATA, name, gen, "OBJECT_FINALIZE"))
    assert outcome.startswith(f"rejected {name}#{gen}")
    (run,) = h.runs()
    key = events.object_key(DATA, name, gen)
    assert run["triggers"] == [] and "notices" not in run
    error = run["file_errors"][key]
    assert (error["line"], error["quarantined_to"]) == (line, f"gs://{DATA}/quarantine/quirks/corpus/bad.jsonl")
    assert "duplicate _id 'a'" in error["reason"]
    assert gcs.names() == ["quarantine/quirks/corpus/bad.jsonl"]
    (event,) = h.events(intake.FILE_REJECTED, topology.RUN_EVENTS)
    assert event.data["line"] == line and event.data["run_id"] == run["run_id"]


def test_a_gzip_encoded_upload_is_refused_unread_at_upload_and_at_launch(intake_h, gcs):
    """Issue 25.10: the size cap checked the stored (compressed) size, and GCS decompresses a gzip-encoded object on
    every read: 603 KB became 46 MB in intake and in every job. Such objects are refused from their metadata."""
    import gzip

    h = intake_h
    name = "datasets/quirks/corpus.jsonl"
    gen = gcs.put(DATA, name, gzip.compress(jl(*({"_id": f"z{i}", "text": "x" * 100} for i in range(100)))), "gzip")
    outcome = h.pipe.on_object_change(ObjectChange(DATA, name, gen, "OBJECT_FINALIZE"))
    assert outcome.startswith(f"rejected {name}#{gen}") and "Content-Encoding: gzip" in outcome
    assert gcs.names() == ["quarantine/quirks/corpus.jsonl"]
    # one that reached the bucket another way (a lowered cap, a missed event) is refused by the launch's listing
    gen = gcs.put(DATA, name, gzip.compress(b"{}"), "gzip")
    rejections, problem = intake.check_listing(DATA, "quirks", max_bytes=h.settings.max_object_bytes)
    assert [r.object for r in rejections] == [f"gs://{DATA}/{name}"] and "Content-Encoding" in rejections[0].reason


def test_a_badly_named_upload_is_quarantined_by_the_real_intake(intake_h, gcs):
    name = "datasets/quirks/corpus/ctl\x07.jsonl"
    gen = gcs.put(DATA, name, quirk_bytes("corpus.jsonl"))
    assert intake_h.pipe.on_object_change(ObjectChange(DATA, name, gen, "OBJECT_FINALIZE")).startswith("rejected")
    assert intake_h.runs() == [] and gcs.names() == ["quarantine/quirks/corpus/ctl_.jsonl"]
    (event,) = intake_h.events(intake.FILE_REJECTED, topology.RUN_EVENTS)
    assert event.data["run_id"] is None and "control characters" in event.data["reason"]


def test_the_jobs_load_keeps_qrels_naming_absent_documents(gcs):
    """Cross-file errors leave the file out (a duplicate id across corpus files, qrels naming an unknown query);
    qrels naming documents the corpus lacks, including those of a left-out corpus file, stay and are counted. The
    job's load only reads: moving the files is the pipeline's, when the job ends."""
    root = "datasets/quirks/"
    for rel in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "qrels/dev.tsv"):
        gcs.put(DATA, root + rel, quirk_bytes(rel))
    dup_gen = gcs.put(DATA, root + "corpus/zz-dup.jsonl", jl({"_id": "new", "text": "n"}, {"_id": "q-01", "text": "x"}))
    gcs.put(DATA, root + "qrels/train.tsv", HEADER + b"k1\tq-01\t1\nk9\tq-05\t1\n")
    ds, rejections, problem = intake.load_checked(DATA, "quirks", Settings())
    assert problem is None
    assert [(r.object, r.generation, r.line) for r in rejections] == [
        (f"gs://{DATA}/{root}corpus/zz-dup.jsonl", dup_gen, 2),
        (f"gs://{DATA}/{root}qrels/train.tsv", rejections[1].generation, 3),
    ]
    assert "duplicate _id 'q-01'" in rejections[0].reason and "query-id 'k9'" in rejections[1].reason
    assert "new" not in ds.corpus and [n.id for n in ds.skipped] == ["q-04"]
    assert ds.qrels_absent == {"test": 1} and set(ds.qrels) == {"test", "dev"}
    assert gcs.names() == sorted(
        root + r
        for r in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "qrels/dev.tsv", "corpus/zz-dup.jsonl")
        + ("qrels/train.tsv",)
    )


# ---------------------------------------------------------------- embedpipe upload (pre-check, no stack)


@pytest.fixture
def cli_upload(monkeypatch):
    """``embedpipe upload`` through typer with default settings, no logging setup, uploads recorded."""
    uploaded: list[str] = []
    monkeypatch.setattr(cli, "settings", lambda: Settings.from_env({}))
    monkeypatch.setattr(cli.logs, "setup", lambda *a, **k: None)
    monkeypatch.setattr(storage, "upload_file", lambda path, uri: uploaded.append(uri) or 7)

    def run(folder: Path, dataset: str = "quirks"):
        return CliRunner().invoke(cli.app, ["upload", str(folder), "--dataset", dataset]), uploaded

    return run


def test_cli_upload_warns_about_skipped_documents_and_absent_qrels(cli_upload):
    result, uploaded = cli_upload(QUIRKS)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: corpus.jsonl:4: document 'q-04' has neither title nor text: skipped",
        "warning: 1 document skipped (neither title nor text); 6 kept",
        "warning: qrels/test.tsv: 1 row names a document not in the corpus "
        "(kept for evaluation as relevant and unretrievable, left out of training)",
    ]
    assert result.stdout == ""
    assert [u.rsplit("/quirks/", 1)[1] for u in uploaded] == [
        "corpus.jsonl",
        "qrels/dev.tsv",
        "qrels/test.tsv",
        "queries.jsonl",
    ]


def test_cli_upload_caps_warning_lines(cli_upload, tmp_path):
    skipped = ({"_id": f"e{i}", "text": ""} for i in range(25))
    (tmp_path / "corpus.jsonl").write_bytes(jl(*skipped, {"_id": "k", "text": "t"}))
    result, _ = cli_upload(tmp_path)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == cli.MAX_WARNINGS + 2
    last = warnings[cli.MAX_WARNINGS - 1]
    assert last == f"warning: corpus.jsonl:{cli.MAX_WARNINGS}: document 'e19' has neither title nor text: skipped"
    assert warnings[-2:] == [
        "warning: ... and 5 more",
        "warning: 25 documents skipped (neither title nor text); 1 kept",
    ]


def test_cli_upload_of_a_broken_folder_uploads_nothing(cli_upload, tmp_path):
    shutil.copytree(QUIRKS, tmp_path / "ds")
    (tmp_path / "ds" / "corpus.jsonl").write_bytes(BROKEN["bad-utf8"][1])
    result, uploaded = cli_upload(tmp_path / "ds")
    assert result.exit_code == 2
    assert "error: corpus.jsonl:2: invalid UTF-8 at byte 25" in result.stderr
    assert uploaded == []


def test_summary_shows_skipped_documents_and_absent_qrels():
    record = {
        "run_id": "r1",
        "dataset": "quirks",
        "state": SUCCEEDED,
        "final_event": {
            "data": {
                "counts": {"total": 6, "upserted": 6, "deleted": 0, "unchanged": 0, "skipped": 1},
                "collection": "quirks__r1",
                "eval": {"split": "test", "queries": 3, "qrels_absent": 1},  # as index-updated carries it
                "metrics": {"recall@10": 0.5},
            }
        },
    }
    text = cli.summary(record)
    counts = "documents: 6 total, 6 upserted, 0 deleted, 0 unchanged, 1 skipped (neither title nor text) -> quirks__r1"
    assert counts in text
    assert "qrels rows naming documents not in the corpus: 1 (scored as relevant, unretrievable)" in text
    del record["final_event"]["data"]["counts"]["skipped"], record["final_event"]["data"]["eval"]
    assert "skipped" not in cli.summary(record) and "qrels rows" not in cli.summary(record)


# ---------------------------------------------------------------- launching


def test_launch_due_waits_for_due_at_then_starts_exactly_once(make):
    h = make(debounce_s=30)
    h.upload()
    (run,) = h.runs()
    run_id = run["run_id"]

    h.clock.advance(29)
    assert h.pipe.launch_due() == [] and h.pipe.launch_due("demo") == []
    assert h.launcher.submits == [] and h.run(run_id)["state"] == PENDING

    h.clock.advance(2)
    assert h.pipe.launch_due() == [run_id]
    (spec,) = h.launcher.submits
    assert spec.container == "trainer"
    assert spec.key == f"{run_id}/train/1"
    assert spec.labels == {"run_id": run_id, "stage": "train"}
    assert "--dataset=demo" in spec.args and f"--run-id={run_id}" in spec.args
    assert spec.base_output_dir == f"gs://embedpipe-artifacts/runs/{run_id}/train/1"
    record = h.run(run_id)
    assert record["state"] == TRAINING
    assert record["jobs"]["train"]["name"] == h.launcher.name_for(spec.job_id)
    assert record["jobs"]["train"]["attempt"] == 1
    state = h.ledger.get_dataset("demo")
    assert (state["active"], state["pending"]) == (run_id, None)
    (stage,) = h.events(RUN_STAGE, topology.RUN_EVENTS)
    assert stage.data == {
        "run_id": run_id,
        "dataset": "demo",
        "state": TRAINING,
        "job": record["jobs"]["train"]["name"],
    }

    # ticks and redeliveries after the launch start nothing
    assert h.pipe.launch_due() == [] and h.pipe.launch_due("demo") == []
    h.upload()
    assert len(h.launcher.submits) == 1 and len(h.runs()) == 1


def test_tick_waits_out_a_short_quiet_period_and_launches_on_time(make):
    h = make(debounce_s=5, launch_wait_s=10)
    t0 = h.clock.now
    h.upload()
    assert h.launcher.submits == [] and h.clock.now == t0  # the upload handler never waits
    h.clock.advance(2)
    assert h.pipe.reconcile() == [f"launched {h.runs()[0]['run_id']}"]
    assert h.clock.now == t0 + 5  # slept exactly until due_at, not until the next tick
    assert h.runs()[0]["state"] == TRAINING and len(h.launcher.submits) == 1


def test_tick_follows_a_quiet_period_pushed_back_while_it_waits(make):
    h = make(debounce_s=5, launch_wait_s=10)
    h.upload()
    naps = []

    def newer_upload_meanwhile(seconds):
        naps.append(seconds)
        h.clock.advance(seconds)
        if len(naps) == 1:  # another upload lands just before the quiet period ends
            h.upload(generation=2)

    h.pipe.sleep = newer_upload_meanwhile
    (run_id,) = [r["run_id"] for r in h.runs()]
    assert h.pipe.reconcile() == [f"launched {run_id}"]
    assert naps == [5, 5] and len(h.launcher.submits) == 1
    assert len(h.run(run_id)["triggers"]) == 2  # both uploads in the one run


def test_quiet_periods_beyond_launch_wait_are_left_to_a_later_tick(make):
    h = make(debounce_s=30, launch_wait_s=10)
    t0 = h.clock.now
    h.upload()
    assert h.pipe.reconcile() == [] and h.clock.now == t0 and h.launcher.submits == []
    h.clock.advance(25)
    assert len(h.pipe.reconcile()) == 1 and h.clock.now == t0 + 30


def test_a_tick_leaves_a_run_another_delivery_of_the_instance_waits_for(make):
    """Ticks come every half second, each in its own thread of the instance: while one waits for a due run, the next
    does not wait for it too (they all woke together and launched the same run side by side); the first launches."""
    h = make(debounce_s=5, launch_wait_s=10)
    h.upload()
    asleep, wake, first = threading.Event(), threading.Event(), []

    def first_nap(seconds):
        asleep.set()
        wake.wait(5)
        h.clock.advance(seconds)

    h.pipe.sleep = first_nap
    waiting = threading.Thread(target=lambda: first.append(h.pipe.reconcile()))
    waiting.start()
    assert asleep.wait(5)
    naps = []
    h.pipe.sleep = naps.append  # the second tick's, if it waited
    assert h.pipe.reconcile() == [] and naps == []
    wake.set()
    waiting.join(5)
    assert first == [[f"launched {h.runs()[0]['run_id']}"]] and len(h.launcher.submits) == 1


def test_a_delivery_leaves_a_launch_under_way_in_the_instance_to_it(make):
    """A due run being launched by one delivery (here: inside its submit) is not launched again beside it by another
    delivery of the same instance: one seal, one submit."""
    h = make()
    h.upload()
    in_submit, release, first = threading.Event(), threading.Event(), []
    submit = h.launcher.submit

    def slow_submit(spec):
        in_submit.set()
        release.wait(5)
        return submit(spec)

    h.launcher.submit = slow_submit
    launching = threading.Thread(target=lambda: first.append(h.pipe.launch_due("demo")))
    launching.start()
    assert in_submit.wait(5)
    assert h.pipe.launch_due("demo") == [] and h.pipe.reconcile() == []
    release.set()
    launching.join(5)
    assert first == [[h.runs()[0]["run_id"]]] and len(h.launcher.submits) == 1


def test_launch_that_died_half_way_is_finished_by_the_next_tick(h):
    run_id = h.ledger.pending_run("demo", {"type": "upload"}, 0)

    def promoted_but_not_submitted(st):
        st["active"], st["pending"], st["pending_since"] = st["pending"], None, None
        return st

    h.ledger.update_dataset("demo", promoted_but_not_submitted)
    assert h.pipe.launch_due() == [run_id]
    assert [s.key for s in h.launcher.submits] == [f"{run_id}/train/1"]
    assert h.run(run_id)["state"] == TRAINING


def test_a_job_launched_before_the_per_attempt_layout_keeps_its_model_path(h):
    """A training job submitted by an older version wrote to the run folder itself; its record has no "output"."""
    run_id = h.started_run()

    def old_record(r):
        del r["jobs"]["train"]["output"]
        return r

    h.ledger.update_run(run_id, old_record)
    h.job_event(h.launcher.submits[0], "SUCCEEDED")
    assert h.run(run_id)["model"] == {"uri": f"gs://embedpipe-artifacts/runs/{run_id}/model/"}


def test_one_active_run_per_dataset_and_one_follow_up(make):
    h = make(debounce_s=5)
    first = h.started_run()

    # two uploads while the first run trains: they gather in exactly one follow-up run
    h.upload(generation=2)
    h.upload("datasets/demo/queries.jsonl", generation=3)
    runs = {r["run_id"]: r for r in h.runs()}
    assert len(runs) == 2
    (second,) = set(runs) - {first}
    assert len(runs[second]["triggers"]) == 2

    h.clock.advance(60)
    assert h.pipe.launch_due() == []
    assert h.run(second)["state"] == PENDING and len(h.launcher.submits) == 1

    # the first run ends: the dataset is free and the follow-up starts at the next launch (tick or handler)
    record, _ = h.ledger.advance(first, TRAINING, SUCCEEDED)
    h.pipe.release(record)
    assert h.pipe.launch_due() == [second]
    assert [s.labels["run_id"] for s in h.launcher.submits] == [first, second]
    state = h.ledger.get_dataset("demo")
    assert (state["active"], state["pending"]) == (second, None)


def test_datasets_do_not_wait_for_each_other(h):
    a = h.started_run("demo")
    b = h.started_run("other")
    assert a != b
    assert {s.labels["run_id"] for s in h.launcher.submits} == {a, b}


# ---------------------------------------------------------------- job events


def test_training_succeeded_launches_embedding(h):
    run_id = h.started_run()
    (train,) = h.launcher.submits
    outcome = h.job_event(train, "SUCCEEDED")
    assert outcome == f"run {run_id}: training succeeded, embedding launched"

    record = h.run(run_id)
    assert record["state"] == EMBEDDING
    assert record["model"] == {"uri": f"gs://embedpipe-artifacts/runs/{run_id}/train/1/model/"}
    (embed,) = h.launcher.stage_submits("embed")
    assert embed.container == "embedder"
    assert embed.key == f"{run_id}/embed/1"
    assert embed.labels == {"run_id": run_id, "stage": "embed"}
    assert f"--model-uri=gs://embedpipe-artifacts/runs/{run_id}/train/1/model/" in embed.args
    assert embed.env["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20)  # the embedder's allocator settings travel with it
    # the token budget is left to the embedder (per device) unless set: an older image would read 0 as 1 row a batch
    assert not any(a.startswith("--batch-tokens") for a in embed.args)
    h.pipe.settings = dataclasses.replace(h.pipe.settings, embed_batch_tokens=8192)
    assert "--batch-tokens=8192" in h.pipe.embed_spec(record, 2).args
    assert record["jobs"]["train"]["name"] == h.launcher.name_for(train.job_id)
    assert record["jobs"]["embed"]["name"] == h.launcher.name_for(embed.job_id)
    assert [e.data["state"] for e in h.events(RUN_STAGE)] == [TRAINING, EMBEDDING]


def test_embedding_succeeded_requests_the_index(h):
    run_id = h.started_run()
    h.job_event(h.launcher.submits[0], "SUCCEEDED")
    h.job_event(h.launcher.stage_submits("embed")[0], "SUCCEEDED")
    assert h.run(run_id)["state"] == INDEXING
    (request,) = h.events(INDEX_REQUESTED, topology.INDEX_REQUESTS)
    assert request.data == {"run_id": run_id, "dataset": "demo"}
    assert request.id == f"{run_id}/index"


def test_duplicate_and_late_job_events_are_no_ops(h):
    run_id = h.started_run()
    train = h.launcher.submits[0]
    h.job_event(train, "SUCCEEDED")
    assert "late or duplicate" in h.redeliver(train, "SUCCEEDED")
    assert len(h.launcher.submits) == 2  # train + embed, no second embed

    embed = h.launcher.stage_submits("embed")[0]
    h.job_event(embed, "SUCCEEDED")
    published = len(h.published)
    for spec in (embed, train, embed):  # redelivered and late (the run is past both stages)
        assert "late or duplicate" in h.redeliver(spec, "SUCCEEDED")
    assert len(h.launcher.submits) == 2
    assert len(h.published) == published
    assert len(h.events(INDEX_REQUESTED)) == 1
    assert h.run(run_id)["state"] == INDEXING


def test_job_events_that_are_not_ours_or_not_final_are_ignored(h):
    run_id = h.started_run()
    train = h.launcher.submits[0]
    # still running: a hint only, the launcher has the truth
    assert "nothing to do yet" in h.pipe.on_job_event(JobStateHint(train.job_id, "SUCCEEDED", ""))
    # a job we never launched
    assert "unknown job" in h.pipe.on_job_event(JobStateHint("999", "SUCCEEDED", ""))
    # a job without our labels
    stray = JobSpec(key="x", container="trainer", args=[], base_output_dir="gs://b", labels={"team": "search"})
    h.launcher.submit(stray)
    assert "has no run" in h.job_event(stray, "SUCCEEDED")
    assert h.run(run_id)["state"] == TRAINING
    assert len(h.launcher.stage_submits("embed")) == 0


def test_failed_job_is_retried_then_the_run_fails(make):
    h = make(max_job_attempts=3)
    run_id = h.started_run()
    for attempt in (1, 2):
        spec = h.launcher.submits[-1]
        assert spec.key == f"{run_id}/train/{attempt}"
        assert "retry" in h.job_event(spec, "FAILED", "CUDA error: out of memory")
        record = h.run(run_id)
        assert record["state"] == TRAINING
        assert record["jobs"]["train"]["attempt"] == attempt + 1
        # the failed attempt's event again: no second retry
        assert "late or duplicate" in h.redeliver(spec, "FAILED")
        assert len(h.launcher.submits) == attempt + 1
    assert h.events(RUN_FAILED) == []

    last = h.launcher.submits[-1]
    assert h.job_event(last, "FAILED", "CUDA error: out of memory") == f"run {run_id}: FAILED in train"
    assert [s.key for s in h.launcher.submits] == [f"{run_id}/train/{n}" for n in (1, 2, 3)]
    # each attempt its own output directory: a retry never resumes another attempt's (or trial's) checkpoints
    outputs = [s.base_output_dir for s in h.launcher.submits]
    assert outputs == [f"gs://embedpipe-artifacts/runs/{run_id}/train/{n}" for n in (1, 2, 3)]
    record = h.run(run_id)
    assert record["state"] == FAILED
    assert record["error"]["stage"] == "train"

    (failed,) = h.events(RUN_FAILED, topology.RUN_EVENTS)
    events.validate(failed)
    assert failed.id == f"{run_id}/failed" and failed.subject == run_id
    assert failed.data["run_id"] == run_id and failed.data["dataset"] == "demo"
    assert failed.data["stage"] == "train"
    assert "ended FAILED" in failed.data["cause"] and "out of memory" in failed.data["cause"]
    assert failed.data["trigger"] == {"type": "upload", "dataset": "demo"}
    assert record["final_event"] == failed.to_structured()
    assert h.ledger.get_dataset("demo")["active"] is None

    # the last failure redelivered: the run stays failed, nothing more is published
    h.redeliver(last, "FAILED")
    assert len(h.events(RUN_FAILED)) == 1 and len(h.launcher.submits) == 3


def test_embed_failure_names_the_embed_stage(make):
    h = make(max_job_attempts=1)
    run_id = h.started_run()
    h.job_event(h.launcher.submits[0], "SUCCEEDED")
    h.job_event(h.launcher.stage_submits("embed")[0], "CANCELLED")
    assert len(h.launcher.stage_submits("embed")) == 1  # max_job_attempts=1: no retry
    (failed,) = h.events(RUN_FAILED, topology.RUN_EVENTS)
    assert failed.data["stage"] == "embed" and "ended CANCELLED" in failed.data["cause"]
    assert h.run(run_id)["state"] == FAILED


def test_a_failed_run_releases_the_dataset_for_its_follow_up(make):
    h = make(max_job_attempts=1, debounce_s=5)
    first = h.started_run()
    h.upload(generation=2)
    h.clock.advance(10)
    h.job_event(h.launcher.submits[0], "FAILED")
    assert h.run(first)["state"] == FAILED
    (second,) = [r["run_id"] for r in h.runs() if r["run_id"] != first]
    assert h.run(second)["state"] == TRAINING
    assert h.ledger.get_dataset("demo")["active"] == second


def test_fail_is_idempotent(h):
    run_id = h.started_run()
    h.pipe.fail(run_id, "index", "milvus unreachable")
    h.pipe.fail(run_id, "index", "milvus unreachable")
    (failed,) = h.events(RUN_FAILED)
    assert failed.data["stage"] == "index"


# ---------------------------------------------------------------- reconcile


def test_reconcile_finishes_a_stage_whose_job_event_was_lost(h):
    run_id = h.started_run()
    h.launcher.finish(h.launcher.name_for(h.launcher.submits[0].job_id), "SUCCEEDED")  # no event arrives
    h.pipe.reconcile()
    assert h.run(run_id)["state"] == EMBEDDING
    assert [s.labels["run_id"] for s in h.launcher.stage_submits("embed")] == [run_id]
    assert h.pipe.reconcile() == []  # the embed job is still running
    assert len(h.launcher.submits) == 2


# ---------------------------------------------------------------- retrain


def test_retrain_starts_a_full_run_with_overrides(h):
    req = events.parse_retrain(events.parse_push(load_event("retrain_push.json")))
    h.pipe.on_retrain(req)
    (run,) = h.runs()
    assert run["state"] == TRAINING
    assert run["overrides"] == {"learning_rate": 3e-5}
    assert run["force_full"] is True
    assert run["triggers"] == [req.key]
    assert run["trigger"] == {"type": "retrain", "dataset": "demo", "reason": "new labels from the support team"}
    (spec,) = h.launcher.submits
    assert "--learning-rate=3e-05" in spec.args
    assert f"--max-steps={h.settings.train_max_steps}" in spec.args  # not overridden: the settings' default

    h.pipe.on_retrain(req)  # redelivered
    assert len(h.runs()) == 1 and len(h.launcher.submits) == 1
    assert h.run(run["run_id"])["triggers"] == [req.key]


def test_a_refresh_runs_like_an_upload_and_jobs_read_as_of_the_seal(h):
    from tests.unit.fakes import push_event

    body = b'{"dataset": "demo", "refresh": true}'
    req = events.parse_retrain(events.parse_push(push_event(body, topic="retrain-requests", message_id="77")))
    assert req.refresh and req.reason == "data changed"
    h.pipe.on_retrain(req)
    (run,) = h.runs()
    assert not run.get("force_full") and run["trigger"]["type"] == "refresh"
    (spec,) = h.launcher.submits  # no promoted index yet: a full run, and it trains
    assert spec.container == "trainer" and f"--as-of={run['sealed_at']}" in spec.args


def test_retrain_redelivery_finishes_what_a_crashed_first_delivery_left(h):
    req = events.parse_retrain(events.parse_push(load_event("retrain_push.json")))
    run_id = h.ledger.pending_run("demo", {"type": "retrain"}, 0)
    h.ledger.claim(req.key, run_id)  # first delivery died here
    h.pipe.on_retrain(req)
    record = h.run(run_id)
    assert record["overrides"] == {"learning_rate": 3e-5}
    assert record["state"] == TRAINING
    assert len(h.launcher.submits) == 1


def test_retrain_with_an_unknown_override_is_rejected(h):
    req = events.RetrainRequest("demo", {"learning_rate": 1e-5, "dropout": 0.2}, None, "r", events.retrain_key("1"))
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['dropout'\]"):
        h.pipe.on_retrain(req)
    assert h.launcher.submits == []
    # nothing stored but the refusal itself, which `retrain --wait` reads instead of waiting out its timeout
    assert [k for k in h.store.objects if "/ledger/rejected/" not in str(k)] == []
    assert "unknown override(s) ['dropout']" in h.pipe.ledger.get_rejection(req.key)["reason"]
    h.pipe.ledger.reject(req.key, "again")  # a redelivery: create-only, the first reason stays
    assert "dropout" in h.pipe.ledger.get_rejection(req.key)["reason"]


@pytest.mark.parametrize(
    ("mode", "base_model", "ok"),
    [
        ("gcp", "gs://models/mine/", True),
        ("gcp", "bundled:all-MiniLM-L6-v2", True),
        ("gcp", "bundled:nope", False),
        ("gcp", "BAAI/bge-small-en-v1.5", False),  # a Hub id: the jobs run offline
        ("gcp", "/etc", False),  # a path of some machine: means nothing to a Vertex job
        ("local", "/etc", True),  # locally an existing path is a model folder candidate
        ("local", "/no/such/folder", False),
    ],
)
def test_retrain_base_model_override_must_be_loadable_where_the_jobs_run(mode, base_model, ok):
    """Refused at once (acked) instead of failing three GPU attempts later."""
    req = RetrainRequest("demo", {"base_model": base_model}, None, "", "k1")
    if ok:
        assert pipeline.checked_overrides(req, cloud=mode == "gcp") == {"base_model": base_model}
    else:
        with pytest.raises(events.EventError, match="override base_model: .*cannot be loaded|unknown bundled"):
            pipeline.checked_overrides(req, cloud=mode == "gcp")


def test_retrain_with_a_bad_dataset_name_is_rejected(h):
    req = events.RetrainRequest("../demo", {}, None, "r", events.retrain_key("1"))
    with pytest.raises(ValueError, match="dataset name"):
        h.pipe.on_retrain(req)
    assert h.launcher.submits == [] and "dataset name" in h.pipe.ledger.get_rejection(req.key)["reason"]
    assert [k for k in h.store.objects if "/ledger/rejected/" not in str(k)] == []


def test_retrain_rejection_is_a_malformed_event(h):
    req = events.RetrainRequest("demo", {"dropout": 0.2}, None, "r", events.retrain_key("1"))
    with pytest.raises(events.EventError):
        h.pipe.on_retrain(req)


def test_retrain_with_a_mistyped_override_is_rejected(h):
    req = events.RetrainRequest("demo", {"learning_rate": "fast"}, None, "r", events.retrain_key("1"))
    with pytest.raises(ValueError):
        h.pipe.on_retrain(req)
    assert h.launcher.submits == []


def report_at_job_end(h, stage: str, rejections: list, problem: str | None = None) -> JobSpec:
    """What a job leaves beside its outputs: ``intake.json`` (the files its load left out), written where the
    pipeline reads it when the job ends."""
    spec = h.launcher.stage_submits(stage)[-1]
    uri = f"{spec.base_output_dir.rstrip('/')}/{intake.REPORT_FILE}"
    if stage == "embed":
        uri = next(a.split("=", 1)[1] for a in spec.args if a.startswith("--output-dir=")) + "/" + intake.REPORT_FILE
    h.store.write_json(uri, {"rejections": [r.to_dict() for r in rejections], "problem": problem})
    return spec


def test_files_a_job_left_out_are_quarantined_and_reported_when_it_ends(h, gcs):
    run_id = h.started_run()
    name = "datasets/demo/corpus/zz-dup.jsonl"
    gen = gcs.put(DATA, name, jl({"_id": "a", "text": "again"}))
    bad = intake.Rejection(f"gs://{DATA}/{name}", gen, 1, "duplicate _id 'a' (first in corpus.jsonl)")
    spec = report_at_job_end(h, "train", [bad])
    for _ in range(2):  # a redelivery moves nothing twice and reports nothing twice
        h.job_event(spec, "SUCCEEDED")
    run = h.run(run_id)
    assert run["state"] == EMBEDDING and run["skip_deletes"] is True  # its documents are absent, not deleted
    key = events.object_key(DATA, name, gen)
    assert run["file_errors"][key]["quarantined_to"] == f"gs://{DATA}/quarantine/demo/corpus/zz-dup.jsonl"
    assert gcs.names() == ["quarantine/demo/corpus/zz-dup.jsonl"]
    assert len({e.id for e in h.events(intake.FILE_REJECTED, topology.RUN_EVENTS)}) == 1


def test_a_job_that_found_nothing_usable_fails_the_run_in_intake_without_a_retry(h, gcs):
    run_id = h.started_run()
    h.job_event(h.launcher.submits[0], "SUCCEEDED")
    spec = report_at_job_end(h, "embed", [], "dataset has no corpus")
    h.job_event(spec, "SUCCEEDED")
    run = h.run(run_id)
    assert run["state"] == FAILED and run["error"]["stage"] == "intake" and "no corpus" in run["error"]["cause"]
    assert len(h.launcher.stage_submits("embed")) == 1 and h.events(INDEX_REQUESTED) == []


# ---------------------------------------------------------------- reliability II: stuck, late and lost


def indexing_run(h) -> str:
    run_id = h.started_run()
    h.job_event(h.launcher.submits[0], "SUCCEEDED")
    h.job_event(h.launcher.stage_submits("embed")[0], "SUCCEEDED")
    return run_id


def test_index_request_lost_after_the_move_to_indexing_is_sent_by_the_redelivery(h):
    """The run moved EMBEDDING -> INDEXING and the publish of the index request failed: the job event's redelivery
    must send it (it used to return early as 'late or duplicate' and the run stayed in INDEXING forever)."""
    run_id = h.started_run()
    h.job_event(h.launcher.submits[0], "SUCCEEDED")
    embed = h.launcher.stage_submits("embed")[0]
    sent = h.pipe._publish

    def flaky(topic, event):
        if topic == topology.INDEX_REQUESTS:
            h.pipe._publish = sent
            raise gexc.ServiceUnavailable("pubsub down")
        sent(topic, event)

    h.pipe._publish = flaky
    with pytest.raises(gexc.ServiceUnavailable):
        h.job_event(embed, "SUCCEEDED")
    assert h.run(run_id)["state"] == INDEXING and not h.events(INDEX_REQUESTED)
    # within 30 s it may be the first delivery still publishing: a duplicate must not send a second request
    h.redeliver(embed, "SUCCEEDED")
    assert not h.events(INDEX_REQUESTED)
    h.clock.advance(31)
    h.redeliver(embed, "SUCCEEDED")  # past 30 s: the first delivery's publish was lost, request again
    assert len(h.events(INDEX_REQUESTED)) == 1
    h.redeliver(embed, "SUCCEEDED")  # once it is out, duplicates are no-ops
    assert len(h.events(INDEX_REQUESTED)) == 1
    assert h.run(run_id)["state"] == INDEXING


def test_reconcile_re_requests_a_lost_index_then_fails_it_past_the_deadline(make):
    h = make(index_retry_s=600, index_deadline_s=3600)
    run_id = indexing_run(h)
    requested = len(h.events(INDEX_REQUESTED))
    h.pipe.reconcile()
    assert len(h.events(INDEX_REQUESTED)) == requested  # just requested: nothing sent again yet
    h.clock.advance(601)  # the request was dead-lettered or lost: no result
    h.pipe.reconcile()
    assert len(h.events(INDEX_REQUESTED)) == requested + 1
    assert h.run(run_id)["state"] == INDEXING
    h.upload("datasets/demo/queries.jsonl")  # a follow-up waits behind the stuck run
    h.clock.advance(3000)
    h.pipe.reconcile()
    record = h.run(run_id)
    assert record["state"] == FAILED and record["error"]["stage"] == "index"
    (failed,) = h.events(RUN_FAILED)
    assert "EMBEDPIPE_INDEX_DEADLINE_S" in failed.data["cause"]
    follow_up = h.ledger.get_dataset("demo")["active"]
    assert follow_up != run_id and h.run(follow_up)["state"] == TRAINING  # the dataset runs again


def test_a_load_that_goes_on_over_several_deliveries_is_timed_from_its_last_progress(make):
    """Issue 25.7: a load too large for one delivery continues over several (index.indexing.Progress); the index
    deadline must not fail one that is still loading, and must still end one whose progress stopped."""
    h = make(index_retry_s=600, index_deadline_s=3600)
    run_id = indexing_run(h)

    def progress(n=iter(range(1, 100))):  # what an indexer delivery records as it loads, then its hand-over
        at = runs.iso(h.clock())
        h.ledger.update_run(run_id, lambda r: {**r, "loads": {"c/vector": {"stamp": "s", "shards": {}, "at": at}}})
        publish, h.pipe.publish = h.pipe.publish, granted_publisher(h, "indexer")  # with the indexer's grants
        h.pipe.request_index(h.run(run_id), part=next(n))
        h.pipe.publish = publish

    for _ in range(6):  # 6 x 1000 s: past the deadline from the stage's start, progressing all along
        h.clock.advance(1000)
        progress()
        h.pipe.reconcile()
        assert h.run(run_id)["state"] == INDEXING
    h.clock.advance(3601)  # then no progress for longer than the deadline
    h.pipe.reconcile()
    record = h.run(run_id)
    assert record["state"] == FAILED and "EMBEDPIPE_INDEX_DEADLINE_S" in record["error"]["cause"]
    ids = [e.id for e in h.events(INDEX_REQUESTED)]
    assert len(ids) == len(set(ids)) >= 7, "each hand-over is a new request, not a duplicate of the first"


def test_a_recorded_bulk_import_is_bounded_by_its_own_deadline(make):
    """Issue 25.5: a recorded bulk import exempted the run from every deadline: with a restored or unreachable
    Milvus, 30 days later the run was still INDEXING and the dataset never ran again."""
    h = make(index_retry_s=600, index_deadline_s=3600, bulk_import_deadline_s=86400)
    run_id = indexing_run(h)
    h.ledger.update_run(run_id, lambda r: {**r, "bulk_import": {"job_id": "450", "at": "t"}})
    h.clock.advance(7200)  # past the index deadline: a bulk import may take hours, it is polled again
    h.pipe.reconcile()
    assert h.run(run_id)["state"] == INDEXING
    h.clock.advance(86400)
    h.pipe.reconcile()
    record = h.run(run_id)
    assert record["state"] == FAILED and "bulk import 450 unfinished" in record["error"]["cause"]
    assert "EMBEDPIPE_BULK_IMPORT_DEADLINE_S" in record["error"]["cause"]
    assert h.ledger.get_dataset("demo")["active"] is None


def granted_publisher(h, identity: str):
    """A publisher that refuses topics the deploy does not grant ``identity`` (topology.ACCESS), as Pub/Sub would."""
    granted = {t.removeprefix("topic:") for t, role in topology.ACCESS[identity] if role == "roles/pubsub.publisher"}

    def publish(topic, event):
        if topic not in granted:
            raise gexc.PermissionDenied(f"{identity} may not publish to {topic}")
        h.published.append((topic, event))

    return publish


def publishing_run(h) -> str:
    """A run the indexer promoted (its index-updated event stored, state PUBLISHING) whose publish never happened."""
    run_id = indexing_run(h)
    event = Event(events.INDEX_UPDATED, {"run_id": run_id, "promoted": True}, id=f"{run_id}/index-updated")
    h.ledger.advance(run_id, INDEXING, runs.PUBLISHING, final_event=event.to_structured())
    return run_id


def test_the_indexer_ends_runs_but_launches_nothing_and_reconcile_launches_the_follow_up(make):
    """The indexer has no right to submit Vertex jobs: finishing (or failing) a run only frees the dataset; the
    reconcile tick (or a launching function) starts the follow-up run."""
    h = make()
    run_id = publishing_run(h)
    h.upload("datasets/demo/queries.jsonl")  # a follow-up waits behind the run being indexed
    h.clock.advance(1)
    submitted = len(h.launcher.submits)
    h.pipe.publish = granted_publisher(h, "indexer")
    h.pipe.finish(h.ledger.get_run(run_id))
    assert [e.data["run_id"] for e in h.events(events.INDEX_UPDATED)] == [run_id]
    assert h.run(run_id)["state"] == SUCCEEDED and h.ledger.get_dataset("demo")["active"] is None
    assert len(h.launcher.submits) == submitted, "the indexer submitted a job"
    h.pipe.publish = granted_publisher(h, "reconcile")
    h.pipe.reconcile()
    assert len(h.launcher.submits) == submitted + 1
    follow_up = h.ledger.get_dataset("demo")["active"]
    assert follow_up != run_id and h.run(follow_up)["state"] == TRAINING


def test_reconcile_publishes_a_stalled_index_updated_with_its_own_grants(make):
    h = make()
    run_id = publishing_run(h)
    h.pipe.publish = granted_publisher(h, "reconcile")
    assert h.pipe.reconcile() == []  # not stalled yet: the indexer may be publishing right now
    h.clock.advance(lifecycle.STALLED_PUBLISH_S + 1)
    h.pipe.reconcile()
    assert [t for t, e in h.published if e.type == events.INDEX_UPDATED] == [topology.INDEX_UPDATED]
    assert [(e.data["run_id"], e.data["promoted"]) for e in h.events(events.INDEX_UPDATED)] == [(run_id, True)]
    assert h.run(run_id)["state"] == SUCCEEDED


def test_a_job_log_entry_is_only_a_hint_the_vertex_state_decides(h):
    """The sink routes every service entry of a job ("Job is running.", ...), with no state label Google documents:
    the handler asks the launcher, so an entry for a running job does nothing and any entry of an ended job advances."""
    run_id = h.started_run()
    (train,) = h.launcher.submits
    running = JobStateHint(train.job_id, None, "Job is running.")
    assert "nothing to do yet" in h.pipe.on_job_event(running)
    assert h.run(run_id)["state"] == TRAINING
    h.launcher.finish(h.launcher.name_for(train.job_id), "SUCCEEDED")
    assert "training succeeded" in h.pipe.on_job_event(running)  # a stale hint, a fresh state
    assert h.run(run_id)["state"] == EMBEDDING


def test_reconcile_cancels_and_fails_a_job_past_its_stage_deadline(make):
    h = make(train_deadline_s=3600)
    run_id = h.started_run()
    train = h.launcher.submits[0]
    h.clock.advance(1800)
    assert h.pipe.reconcile() == []  # QUEUED, within its deadline
    h.clock.advance(1801)
    assert any("past its deadline" in n for n in h.pipe.reconcile())
    assert h.launcher.get(h.launcher.name_for(train.job_id)).state == "CANCELLED"
    record = h.run(run_id)
    assert record["state"] == FAILED and record["error"]["stage"] == "train"
    assert "EMBEDPIPE_TRAIN_DEADLINE_S" in h.events(RUN_FAILED)[0].data["cause"]
    assert h.ledger.get_dataset("demo")["active"] is None


def test_one_dataset_that_cannot_launch_does_not_stop_the_others_and_fails_after_k_attempts(make):
    h = make(launch_max_attempts=3)
    submit = h.launcher.submit

    def broken_for_bad(spec):
        if "--dataset=bad" in spec.args:
            raise RuntimeError("quota exceeded for bad's project")
        return submit(spec)

    h.launcher.submit = broken_for_bad
    h.upload("datasets/bad/corpus.jsonl")
    h.upload("datasets/good/corpus.jsonl")
    h.clock.advance(1)
    h.pipe.reconcile()
    good = h.ledger.get_dataset("good")["active"]
    assert h.run(good)["state"] == TRAINING  # launched although "bad" (listed first) raised
    bad = h.ledger.get_dataset("bad")["active"]
    assert h.run(bad)["state"] == PENDING and len(h.run(bad)["launch_errors"]) == 1
    h.pipe.reconcile()
    h.pipe.reconcile()
    assert h.run(bad)["state"] == PENDING  # three quick failures are a blip, not yet a verdict
    h.clock.advance(300)
    h.pipe.reconcile()
    record = h.run(bad)
    assert record["state"] == FAILED and record["error"]["stage"] == "launch"
    assert "quota exceeded" in h.events(RUN_FAILED)[0].data["cause"]
    assert h.ledger.get_dataset("bad")["active"] is None


def test_one_unreadable_dataset_state_does_not_stop_the_tick_with_the_default_launch_wait(make):
    """Issue 25.6: ``launch_soon`` read every dataset's state outside the per-dataset isolation, so one unreadable
    state raised out of every reconcile tick (the isolation test above runs with launch_wait_s=0)."""
    h = make(launch_wait_s=Settings.from_env({}).launch_wait_s)
    assert h.settings.launch_wait_s > 0
    h.upload("datasets/bad/corpus.jsonl")
    h.upload("datasets/good/corpus.jsonl")
    h.clock.advance(1)
    get = h.ledger.get_dataset
    h.ledger.get_dataset = lambda ds: (_ for _ in ()).throw(ValueError("corrupt state")) if ds == "bad" else get(ds)
    notes = h.pipe.reconcile()  # does not raise
    assert h.run(get("good")["active"])["state"] == TRAINING
    assert any(n.startswith("error in bad") for n in notes)


def test_reconcile_isolates_a_dataset_whose_job_lookup_fails(make):
    h = make()
    a, b = h.started_run("a"), h.started_run("b")
    for spec in h.launcher.submits:
        h.launcher.finish(h.launcher.name_for(spec.job_id), "SUCCEEDED")
    get, a_job = h.launcher.get, h.launcher.name_for(h.launcher.submits[0].job_id)
    h.launcher.get = lambda name: (_ for _ in ()).throw(PermissionError("403")) if name == a_job else get(name)
    h.pipe.reconcile()  # a's lookup error is reported, not raised
    assert h.run(b)["state"] == EMBEDDING and h.run(a)["state"] == TRAINING
    h.launcher.get = get  # the lookup works again: the next tick catches a up
    h.pipe.reconcile()
    assert h.run(a)["state"] == EMBEDDING


def test_an_upload_recorded_as_its_run_launches_joins_the_next_run(make):
    """The run becomes due and launches between the upload's claim and the recording of its intake (so the launch
    could not wait for it): the trigger (here training pairs, which decide the run's kind) must not be lost in a run
    that already decided without it."""
    h = make(debounce_s=1)
    h.upload("datasets/demo/corpus.jsonl")
    first = h.ledger.get_dataset("demo")["pending"]

    def launch_meanwhile():
        h.clock.advance(2)
        assert h.pipe.launch_due("demo") == [first]

    h.store.interleave("write", "/arriving/", launch_meanwhile)
    outcome = h.upload("datasets/demo/pairs/p.jsonl")
    second = h.ledger.get_dataset("demo")["pending"]
    assert second and second != first and outcome.endswith(f"-> run {second}")
    key = "gcs/embedpipe-data/datasets/demo/pairs/p.jsonl#1"
    assert h.ledger.get_claim(key)["run_id"] == second
    assert key in h.run(second)["triggers"]
    assert [o["part"] for o in h.ledger.get_run(first)["trigger_objects"]] == ["corpus"]  # decided without it


def test_a_retrain_arriving_as_its_run_launches_starts_the_next_run(make):
    h = make(debounce_s=1)
    h.upload("datasets/demo/corpus.jsonl")
    first = h.ledger.get_dataset("demo")["pending"]

    def launch_meanwhile():
        h.clock.advance(2)
        h.pipe.launch_due("demo")

    h.store.interleave("read", f"/runs/{first}/run.json", launch_meanwhile)
    req = events.RetrainRequest("demo", {"epochs": 1}, None, "new pairs", events.retrain_key("77"))
    outcome = h.pipe.on_retrain(req)
    second = h.ledger.get_claim(req.key)["run_id"]
    assert second != first and outcome.endswith(f"-> run {second}")
    assert "force_full" not in h.ledger.get_run(first) and h.ledger.get_run(first)["overrides"] == {}
    record = h.run(second)
    assert record["force_full"] and record["overrides"] == {"epochs": 1}


def test_each_embed_attempt_writes_its_own_folder_and_names_its_job(make):
    """Attempt 2 must never pick up shards attempt 1 left behind: its own folder, its job key in every manifest."""
    h = make(max_job_attempts=2)
    run_id = h.started_run()
    h.job_event(h.launcher.submits[0], "SUCCEEDED")
    h.job_event(h.launcher.stage_submits("embed")[0], "FAILED", "preempted")
    first, second = h.launcher.stage_submits("embed")
    run_dir = h.ledger.run_dir(run_id)
    assert f"--output-dir={run_dir}/embeddings/1" in first.args and f"--job-key={run_id}/embed/1" in first.args
    assert f"--output-dir={run_dir}/embeddings/2" in second.args and f"--job-key={run_id}/embed/2" in second.args


def test_a_dataset_whose_milvus_name_clashes_with_another_is_refused(make):
    """``a-b`` and ``a_b`` would share one alias and one set of collections: the second one is refused."""
    h = make(debounce_s=30)
    h.upload("datasets/a-b/corpus.jsonl")
    outcome = h.upload("datasets/a_b/corpus.jsonl")
    assert outcome.startswith("rejected") and "'a-b'" in outcome
    (rejected,) = h.events(intake.FILE_REJECTED)
    assert rejected.data["object"] == "gs://embedpipe-data/datasets/a_b/corpus.jsonl"
    assert "share its Milvus alias" in rejected.data["reason"]
    assert h.ledger.list_datasets() == ["a-b"] and len(h.runs()) == 1
    # claimed by no run: recorded as refused, so `upload --wait` ends at once with the reason
    key = events.object_key(DATA, "datasets/a_b/corpus.jsonl", 1)
    assert "share its Milvus alias" in h.ledger.get_rejection(key)["reason"]
    with pytest.raises(events.EventError, match="share its Milvus alias"):
        h.pipe.on_retrain(events.RetrainRequest("a_b", {}, None, "r", events.retrain_key("9")))
    h.upload("datasets/a-b/queries.jsonl")  # the first one goes on as before
    assert len(h.runs()[0]["triggers"]) == 2


@pytest.mark.parametrize(
    "spec",
    ["all of them", {"metric": "ndcg@10", "goal": "MAXIMIZE", "parameters": []}, {"max_trials": -1}],
)
def test_retrain_with_a_bad_hp_tuning_spec_is_rejected_before_anything_is_stored(h, spec):
    req = events.RetrainRequest("demo", {}, spec, "tune", events.retrain_key("5"))
    with pytest.raises(events.EventError, match="hp_tuning"):
        h.pipe.on_retrain(req)
    assert h.runs() == [] and h.launcher.submits == []


def test_a_redelivered_upload_whose_move_was_cut_short_still_reaches_a_run(make):
    """The trigger was written into a run that launched meanwhile, and the handler died before moving it: the
    redelivery must move it (the run's record does not hold it), not return early because its item exists."""
    h = make(debounce_s=1)
    h.upload("datasets/demo/corpus.jsonl")
    first = h.ledger.get_dataset("demo")["pending"]
    move = h.pipe._move_late

    def launch_meanwhile():
        h.clock.advance(2)
        h.pipe.launch_due("demo")

    def dies(*args):
        raise TimeoutError("instance killed")

    h.store.interleave("write", "/arriving/", launch_meanwhile)
    h.pipe._move_late = dies
    with pytest.raises(TimeoutError):
        h.upload("datasets/demo/pairs/p.jsonl")
    h.pipe._move_late = move
    outcome = h.upload("datasets/demo/pairs/p.jsonl")  # the redelivery
    second = h.ledger.get_dataset("demo")["pending"]
    assert second and second != first and outcome.endswith(f"-> run {second}")
    assert "gcs/embedpipe-data/datasets/demo/pairs/p.jsonl#1" in h.run(second)["triggers"]


def test_a_run_waits_for_an_upload_whose_intake_is_still_running(make):
    """A slow intake (a large file, a busy CPU) outlasts the quiet period: the run does not launch without it (it
    would push the file into a second run); it launches a quiet period after the intake ended (uploads delivered
    behind it are claimed only then), with that file's trigger."""
    h = make(debounce_s=1)
    h.upload("datasets/demo/corpus.jsonl")
    first = h.ledger.get_dataset("demo")["pending"]
    tried = []

    def slow_intake(bucket, name, generation):
        h.clock.advance(2)
        tried.append(h.pipe.launch_due("demo"))

    h.pipe.check_object = slow_intake
    h.upload("datasets/demo/queries.jsonl")
    assert tried == [[]]  # held back while the intake ran
    assert h.pipe.launch_due("demo") == []  # the quiet period starts again when the intake ends
    h.clock.advance(1)
    assert h.pipe.launch_due("demo") == [first]
    assert len(h.ledger.get_run(first)["triggers"]) == 2 and h.ledger.get_dataset("demo")["pending"] is None


def test_the_quiet_period_runs_from_the_end_of_each_intake(make):
    """Uploads are delivered a few at a time: the next one is claimed only after the intakes before it ended. The
    quiet period counts from the end of an intake (a rejected file's too), so a burst whose intakes outlast the quiet
    period still coalesces into one run."""
    h = make(debounce_s=1)
    t0 = h.clock.now

    def intake_of(seconds, verdict=None):
        def check(bucket, name, generation):
            h.clock.advance(seconds)
            return verdict

        return check

    h.pipe.check_object = intake_of(3)
    h.upload("datasets/demo/corpus.jsonl")
    assert h.ledger.get_dataset("demo")["due_at"] == t0 + 3 + 1  # not t0 + 1, from the claim
    h.clock.advance(0.9)  # the next delivery, behind it
    bad = intake.Rejection("gs://embedpipe-data/datasets/demo/queries.jsonl", 2, 1, "not JSON")
    h.pipe.check_object = intake_of(2, bad)
    h.upload("datasets/demo/queries.jsonl", generation=2)
    assert h.ledger.get_dataset("demo")["due_at"] == t0 + 3 + 0.9 + 2 + 1
    h.clock.advance(0.9)
    assert h.pipe.launch_due("demo") == []
    h.clock.advance(0.1)
    (run_id,) = h.pipe.launch_due("demo")
    record = h.run(run_id)
    assert len(record["triggers"]) == 1 and len(record["file_errors"]) == 1


def test_an_intake_that_died_holds_back_its_run_for_a_bounded_time(make):
    h = make(debounce_s=1)
    h.upload("datasets/demo/corpus.jsonl")
    first = h.ledger.get_dataset("demo")["pending"]
    h.pipe.check_object = lambda *a: (_ for _ in ()).throw(TimeoutError("instance killed"))
    with pytest.raises(TimeoutError):
        h.upload("datasets/demo/queries.jsonl")
    h.clock.advance(2)
    assert h.pipe.launch_due("demo") == []
    h.clock.advance(runs.ARRIVING_MAX_S)
    assert h.pipe.launch_due("demo") == [first]


def test_replica_counts_are_settings_only(make):
    """Scaling a job out is configuration: DDP workers for training, shard writers for embedding."""
    h = make(train_replicas=3, embed_replicas=2)
    h.started_run()
    (train,) = h.launcher.stage_submits("train")
    assert train.replica_count == 3
    h.job_event(train, "SUCCEEDED")
    (embed,) = h.launcher.stage_submits("embed")
    assert embed.replica_count == 2


PROMOTED = {
    "run_id": "r0",
    "collection": "demo__r0",
    "model_uri": "gs://arts/runs/r0/train/1/model/",
    "schema": 2,
    "hashes": "gs://arts/runs/r0/embeddings/1/hashes.parquet",
    "rows": 100,
    "representation": vectorstore.REPRESENTATION,
}


def incremental_embed(h, promoted: dict, **record_fields) -> JobSpec:
    h.ledger.update_dataset("demo", lambda st: {**st, "promoted": promoted})
    h.upload("datasets/demo/corpus.jsonl")
    (run,) = [r for r in h.runs() if r["state"] == PENDING]
    if record_fields:
        h.ledger.update_run(run["run_id"], lambda r: {**r, **record_fields})
    h.clock.advance(h.settings.debounce_s + 1)
    h.pipe.launch_due("demo")
    (spec,) = h.launcher.stage_submits("embed")
    assert h.launcher.stage_submits("train") == []
    return spec


def test_an_incremental_run_diffs_against_the_promoted_table(h):
    spec = incremental_embed(h, PROMOTED)
    assert f"--live-hashes={PROMOTED['hashes']}" in spec.args
    assert "--rebuild" not in spec.args and "--keep-absent" not in spec.args


def test_a_live_collection_a_failed_in_place_update_edited_is_rebuilt(h):
    spec = incremental_embed(h, {**PROMOTED, "dirty": "r1"})  # its table no longer describes it
    assert "--rebuild" in spec.args


@pytest.mark.parametrize("recorded", [None, "text-0+raw"], ids=["unrecorded", "another"])
def test_a_live_index_built_with_another_representation_is_rebuilt_not_edited(h, recorded):
    """Issue 25.3: incremental runs re-embed only documents whose content hash changed, so a change to the text rule
    or the BM25 analyzer left old and new texts mixed in one collection. A live index made with another (or an
    unrecorded) representation is rebuilt with the promoted model, behind the gate."""
    entry = {k: v for k, v in PROMOTED.items() if k != "representation"}
    spec = incremental_embed(h, {**entry, **({"representation": recorded} if recorded else {})})
    assert "--rebuild" in spec.args


def test_a_corpus_file_left_out_at_launch_reaches_the_embedder(h):
    spec = incremental_embed(h, PROMOTED, skip_deletes=True)
    assert "--keep-absent" in spec.args


def test_an_entry_promoted_without_a_table_makes_a_full_run(h):
    h.ledger.update_dataset("demo", lambda st: {**st, "promoted": {**PROMOTED, "hashes": None}})
    h.started_run()
    assert len(h.launcher.stage_submits("train")) == 1 and h.launcher.stage_submits("embed") == []


def test_a_tuning_job_whose_trials_found_nothing_usable_fails_the_run_in_intake(h, gcs):
    run_id = h.started_run()
    (train,) = h.launcher.stage_submits("train")
    for trial in ("1", "2"):  # each trial's trainer wrote its report, reported no metric, and failed
        h.store.write_json(
            f"{train.base_output_dir.rstrip('/')}/{trial}/{intake.REPORT_FILE}", {"problem": "no corpus"}
        )
    h.job_event(train, "FAILED", "all trials failed")
    run = h.run(run_id)
    assert run["state"] == FAILED and run["error"]["stage"] == "intake"
    assert len(h.launcher.stage_submits("train")) == 1, "not retried: a retry cannot change the data"


# ---------------------------------------------------------------- reliability III: a quarantined part is absent


def absent_done(h, run_id: str) -> None:
    """The run's embed job succeeded and its indexer promoted and published: the dataset is free again."""
    h.job_event(h.launcher.stage_submits("embed")[-1], "SUCCEEDED")
    event = Event(events.INDEX_UPDATED, {"run_id": run_id, "promoted": True}, id=f"{run_id}/index-updated")
    h.ledger.advance(run_id, INDEXING, runs.PUBLISHING, final_event=event.to_structured())
    h.pipe.finish(h.ledger.get_run(run_id))


def absent_launch(h) -> dict:
    """The pending run launched; its record."""
    (run,) = [r for r in h.runs() if r["state"] == PENDING]
    h.clock.advance(h.settings.debounce_s + 1)
    h.pipe.launch_due("demo")
    return h.run(run["run_id"])


def test_a_part_quarantined_at_upload_stays_absent_until_a_good_one_arrives(intake_h, gcs):
    """Issue 25.1: a re-uploaded corpus part with one bad line was quarantined and the incremental run that followed
    deleted its live documents (they were missing from the listing). The part is now absent in every run until a
    good file arrives at its name: no run deletes anything meanwhile."""
    h = intake_h
    h.ledger.update_dataset("demo", lambda st: {**st, "promoted": PROMOTED})
    part = "datasets/demo/corpus/part-1.jsonl"
    bad = gcs.put(DATA, part, jl({"_id": "a", "text": "ok"}) + b'{"_id": "b", "text": }\n')
    assert h.pipe.on_object_change(ObjectChange(DATA, part, bad, "OBJECT_FINALIZE")).startswith("rejected")
    assert h.ledger.get_dataset("demo")["absent_parts"][part]["generation"] == bad
    run = absent_launch(h)
    assert run["skip_deletes"] is True and run["absent_parts"] == [part]
    assert "--keep-absent" in h.launcher.stage_submits("embed")[-1].args
    absent_done(h, run["run_id"])

    # a later upload of another part: the quarantined one is still absent, its documents still kept
    other = "datasets/demo/corpus/part-2.jsonl"
    h.pipe.on_object_change(
        ObjectChange(DATA, other, gcs.put(DATA, other, jl({"_id": "c", "text": "c"})), "OBJECT_FINALIZE")
    )
    run = absent_launch(h)
    assert run["absent_parts"] == [part] and "--keep-absent" in h.launcher.stage_submits("embed")[-1].args
    absent_done(h, run["run_id"])

    # the good version arrives: the part is back, deletions are the corpus' own again
    good = gcs.put(DATA, part, jl({"_id": "a", "text": "ok"}, {"_id": "b", "text": "fixed"}))
    h.pipe.on_object_change(ObjectChange(DATA, part, good, "OBJECT_FINALIZE"))
    run = absent_launch(h)
    assert "absent_parts" not in run and not run.get("skip_deletes")
    assert "--keep-absent" not in h.launcher.stage_submits("embed")[-1].args
    assert h.ledger.get_dataset("demo")["absent_parts"] == {}


def test_a_part_a_job_quarantined_is_absent_in_later_runs_too(h, gcs):
    run_id = h.started_run()
    name = "datasets/demo/corpus/zz-dup.jsonl"
    gen = gcs.put(DATA, name, jl({"_id": "a", "text": "again"}))
    bad = intake.Rejection(f"gs://{DATA}/{name}", gen, 1, "duplicate _id 'a' (first in corpus.jsonl)")
    h.job_event(report_at_job_end(h, "train", [bad]), "SUCCEEDED")
    run = h.run(run_id)
    assert run["skip_deletes"] is True and run["absent_parts"] == [name]  # this run's index may not lack it either
    assert list(h.ledger.get_dataset("demo")["absent_parts"]) == [name]
    absent_done(h, run_id)
    h.ledger.update_dataset("demo", lambda st: {**st, "promoted": PROMOTED})  # what the indexer would have written
    h.upload("datasets/demo/queries.jsonl")
    assert absent_launch(h)["absent_parts"] == [name]  # nor may any later run's

    # the user deletes the quarantined copy: its documents may go now
    gcs.objects.pop((DATA, "quarantine/demo/corpus/zz-dup.jsonl"))
    absent_done(h, h.ledger.get_dataset("demo")["active"])
    h.upload("datasets/demo/queries.jsonl", generation=2)
    run = absent_launch(h)
    assert "absent_parts" not in run and not run.get("skip_deletes")
    assert h.ledger.get_dataset("demo")["absent_parts"] == {}


def test_a_retrain_that_allows_shrinking_lets_absent_parts_go(h, gcs):
    part = "datasets/demo/corpus/part-1.jsonl"
    h.ledger.update_dataset(
        "demo", lambda st: {**st, "promoted": PROMOTED, "absent_parts": {part: {"generation": 7, "reason": "x"}}}
    )
    h.pipe.on_retrain(RetrainRequest("demo", {}, None, "cleanup", "pubsub/retrain/1", allow_shrink=True))
    (run,) = h.runs()
    assert run["allow_shrink"] is True and run["released_parts"] == [part]
    assert "absent_parts" not in run and not run.get("skip_deletes")
    assert len(h.launcher.stage_submits("train")) == 1
    # released only by the promotion (indexing._promote): a run that fails or is rejected keeps them absent
    assert list(h.ledger.get_dataset("demo")["absent_parts"]) == [part]


def test_without_the_confirmation_a_retrain_keeps_the_absent_parts(h, gcs):
    part = "datasets/demo/corpus/part-1.jsonl"
    h.ledger.update_dataset(
        "demo", lambda st: {**st, "promoted": PROMOTED, "absent_parts": {part: {"generation": 7, "reason": "x"}}}
    )
    h.pipe.on_retrain(RetrainRequest("demo", {}, None, "again", "pubsub/retrain/2"))
    (run,) = h.runs()
    assert run["absent_parts"] == [part] and run["skip_deletes"] is True and not run.get("allow_shrink")


def test_a_delivery_that_died_after_quarantining_a_part_leaves_it_absent(intake_h, gcs, monkeypatch):
    """The review's case: the file was quarantined, then the handler died before recording the part absent; the
    redelivery finds that generation gone. It must not count as an accepted upload (the next run would take the
    part's documents as deleted)."""
    h = intake_h
    h.ledger.update_dataset("demo", lambda st: {**st, "promoted": PROMOTED})
    part = "datasets/demo/corpus/part-1.jsonl"
    change = ObjectChange(DATA, part, gcs.put(DATA, part, b'{"_id": "b", "text": }\n'), "OBJECT_FINALIZE")
    dies_once(monkeypatch, h.pipe, "_mark_absent")
    with pytest.raises(RuntimeError):
        h.pipe.on_object_change(change)
    assert gcs.names() == ["quarantine/demo/corpus/part-1.jsonl"]
    assert h.pipe.on_object_change(change).startswith(f"rejected {part}")
    assert list(h.ledger.get_dataset("demo")["absent_parts"]) == [part]
    (run,) = [r for r in h.runs() if r["state"] == PENDING]
    assert run["triggers"] == [] and events.object_key(DATA, part, change.generation) in run["file_errors"]
