"""embedpipe.gcp.bqsource: source.json is validated with errors naming the key (and line for broken JSON); table rows
become the records a BEIR line parses to and pass the same checks as files, their errors naming the table and row;
the launch check counts a corpus table and quarantines a broken source.json; a rejected table is reported, not
moved. Rows come from a fake Storage Read (the real one is in tests/e2e/test_bigquery.py)."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import types

import pytest
from google.api_core import exceptions as gexc

from embedpipe.config import Settings
from embedpipe.contracts import datasets
from embedpipe.control import intake
from embedpipe.gcp import bqsource, datasource
from tests.unit.test_intake import CAP, DATA, FakeGCS, jl

T = "my-proj.shop.docs"


def parse(doc) -> list[bqsource.Part]:
    return bqsource.parse(json.dumps(doc).encode())


def test_a_full_source_file_parses_with_default_and_renamed_columns():
    corpus, queries, train, test = parse(
        {
            "corpus": {"table": T, "columns": {"id": "doc_id", "title": None}, "metadata": ["lang"]},
            "queries": {"table": "my-proj.shop.q"},
            "qrels": {"test": {"query": "SELECT 1"}, "train": {"table": "my-proj.shop.r"}},
        }
    )
    assert corpus.columns == {"id": "doc_id", "title": None, "text": "text"} and corpus.metadata == ("lang",)
    assert queries.columns == {"id": "id", "text": "text"}
    assert (train.split, test.split, test.query) == ("train", "test", "SELECT 1")
    assert corpus.rel == "source.json#corpus" and test.rel == "source.json#qrels/test" and corpus.where == f"bq://{T}"


@pytest.mark.parametrize(
    "doc, reason",
    [
        ({"corpus": {"table": T}, "extra": {}}, "unknown key(s) ['extra']"),
        ({"corpus": {"table": T, "query": "SELECT 1"}}, "'corpus' needs exactly one of 'table' or 'query'"),
        ({"corpus": {"table": "docs"}}, "'corpus.table' 'docs' is not PROJECT.DATASET.TABLE"),
        ({"corpus": {"table": "p.d.t; DROP TABLE x"}}, "is not PROJECT.DATASET.TABLE"),
        ({"corpus": {"table": T, "columns": {"id": "a b"}}}, "'corpus.columns.id' 'a b' is not a column name"),
        ({"corpus": {"table": T, "columns": {"body": "x"}}}, "'corpus.columns' may rename only"),
        ({"queries": {"table": T, "metadata": ["x"]}}, "only the corpus has metadata columns"),
        ({"qrels": {"holdout": {"table": T}}}, "'qrels' must map splits"),
        ({"queries": {"table": T, "columns": {"id": None}}}, "'queries.columns.id' None is not a column name"),
        ([], "expected a JSON object"),
    ],
)
def test_a_bad_source_file_names_the_key_and_why(doc, reason):
    with pytest.raises(datasets.DatasetError) as err:
        parse(doc)
    assert err.value.file == "source.json" and reason in err.value.reason


def test_broken_json_names_its_line():
    with pytest.raises(datasets.DatasetError) as err:
        bqsource.parse(b'{\n "corpus": {"table": "my-proj.shop.docs",}\n}')
    assert err.value.line == 2 and err.value.reason.startswith("invalid JSON")


def fake_rows(monkeypatch, rows_by_part):
    def rows(part, settings, as_of, max_bytes=None):
        yield from rows_by_part[part.kind + (f"/{part.split}" if part.split else "")]

    monkeypatch.setattr(bqsource, "_arrow_rows", rows)


def load(parts, files=None, **rows):
    return datasets.load_files("shop", files or {}, {p: bqsource.records(p, Settings(), None) for p in parts})


def test_rows_become_documents_queries_and_qrels_like_file_lines(monkeypatch):
    parts = parse(
        {
            "corpus": {"table": T, "columns": {"id": "doc_id", "title": "headline"}, "metadata": ["lang", "at", "n"]},
            "queries": {"table": "my-proj.shop.q"},
            "qrels": {"test": {"table": "my-proj.shop.r"}},
        }
    )
    when = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)
    fake_rows(
        monkeypatch,
        {
            "corpus": [
                {"doc_id": 7, "headline": None, "text": "seven", "lang": "en", "at": when, "n": decimal.Decimal("1.5")},
                {"doc_id": "b", "headline": "Bee", "text": None, "lang": None, "at": None, "n": None},
                {"doc_id": "c", "headline": None, "text": "  ", "lang": "en", "at": None, "n": None},
            ],
            "queries": [{"id": "q1", "text": "seven?"}],
            "qrels/test": [
                {"query_id": "q1", "corpus_id": "7", "score": 1},
                {"query_id": "q1", "corpus_id": "z", "score": 2},
            ],
        },
    )
    ds = load(parts)
    assert sorted(ds.corpus) == ["7", "b"]  # integer ids are ids; "c" has neither title nor text: skipped
    assert ds.corpus["7"].metadata == {"lang": "en", "at": "2026-11-30T12:00:00+00:00", "n": "1.5"}
    assert ds.corpus["b"].title == "Bee" and ds.corpus["b"].metadata == {"lang": None, "at": None, "n": None}
    assert [n.id for n in ds.skipped] == ["c"] and ds.skipped[0].file == "source.json#corpus"
    assert ds.qrels == {"test": {"q1": {"7": 1, "z": 2}}} and ds.qrels_absent == {"test": 1}
    # the same document in a file hashes the same: a table and a file are interchangeable for incremental runs
    meta = {"lang": None, "at": None, "n": None}  # NULL is null, as a file writes it
    same = datasets.load_files("f", {"corpus.jsonl": jl({"_id": "b", "title": "Bee", "metadata": meta})})
    assert same.corpus["b"].content_hash == ds.corpus["b"].content_hash


@pytest.mark.parametrize(
    "rows, reason",
    [
        ([{"id": "a", "title": "x", "text": "t"}, {"id": "a", "title": "y", "text": "u"}], "duplicate _id 'a'"),
        ([{"id": None, "title": "x", "text": "t"}], "missing required field '_id'"),
        ([{"id": "a", "title": 3, "text": "t"}], "column 'title' (title) must be STRING, got int"),
        ([{"id": "a\x00", "title": "", "text": "t"}], "contains control characters"),
    ],
)
def test_a_bad_row_is_an_error_naming_the_table_and_row(monkeypatch, rows, reason):
    [part] = parse({"corpus": {"table": T}})
    fake_rows(monkeypatch, {"corpus": rows})
    with pytest.raises(datasets.DatasetError) as err:
        load([part])
    assert err.value.file == "source.json#corpus" and err.value.line == len(rows)
    assert err.value.reason.startswith(f"bq://{T}: ") and reason in err.value.reason


def test_ids_must_not_repeat_across_a_table_and_a_corpus_file(monkeypatch):
    [part] = parse({"corpus": {"table": T}})
    fake_rows(monkeypatch, {"corpus": [{"id": "a", "title": "", "text": "from the table"}]})
    with pytest.raises(datasets.DatasetError) as err:
        load([part], {"corpus.jsonl": jl({"_id": "a", "text": "from the file"})})
    assert "duplicate _id 'a' (first seen in corpus.jsonl:1)" in err.value.reason


def test_a_qrels_row_naming_an_unknown_query_names_the_table(monkeypatch):
    corpus, qrels = parse({"corpus": {"table": T}, "qrels": {"train": {"table": "my-proj.shop.r"}}})
    fake_rows(
        monkeypatch,
        {
            "corpus": [{"id": "a", "title": "", "text": "t"}],
            "qrels/train": [{"query_id": "q9", "corpus_id": "a", "score": 1}],
        },
    )
    with pytest.raises(datasets.DatasetError) as err:
        load([corpus, qrels])
    assert err.value.file == "source.json#qrels/train" and "query-id 'q9' is not in queries" in err.value.reason


@pytest.fixture
def gcs(monkeypatch):
    from embedpipe.gcp import storage

    fake = FakeGCS()
    monkeypatch.setattr(storage, "client", lambda: fake)
    return fake


def test_the_launch_check_counts_a_corpus_table_and_quarantines_a_broken_source(gcs):
    root = "datasets/shop/"
    gcs.put(root + "queries.jsonl", jl({"_id": "q", "text": "alpha?"}))
    gcs.put(root + "source.json", json.dumps({"corpus": {"table": T}}).encode())
    assert intake.check_listing(DATA, "shop", CAP) == ([], None)

    bad = gcs.put(root + "source.json", b'{"corpus": {"table": "nope"}}')
    [r], problem = intake.check_listing(DATA, "shop", CAP)
    assert problem == "dataset has no corpus" and r.generation == bad and "is not PROJECT.DATASET.TABLE" in r.reason
    assert r.quarantined_to == f"gs://{DATA}/quarantine/shop/source.json"


def test_a_source_file_is_checked_at_upload():
    assert intake.check_file("source.json", json.dumps({"corpus": {"table": T}}).encode()) == []
    with pytest.raises(datasets.DatasetError):
        intake.check_file("source.json", b'{"corpus": {}}')


def test_a_rejected_table_is_a_corpus_rejection_that_is_never_moved():
    r = intake.Rejection(f"gs://{DATA}/datasets/shop/source.json#corpus", 3, 1, f"bq://{T}: duplicate _id 'a'")
    assert intake.is_corpus(r) and intake.is_table(r)
    q = intake.Rejection(f"gs://{DATA}/datasets/shop/source.json#queries", 3, 1, "x")
    assert not intake.is_corpus(q) and intake.is_table(q)
    assert not intake.is_table(intake.Rejection(f"gs://{DATA}/datasets/shop/corpus.jsonl", 3, 1, "x"))


def test_bq_uris_and_as_of():
    assert bqsource.bq_uri_table(f"bq://{T}") == T
    with pytest.raises(ValueError):
        bqsource.bq_uri_table("bq://shop.docs")
    assert bqsource.as_of("2026-11-30T12:00:00.000Z") == dt.datetime(2026, 11, 30, 12, tzinfo=dt.UTC)
    assert bqsource.as_of("") is None


def test_upload_precheck_validates_source_json_and_accepts_a_folder_whose_corpus_is_a_table(tmp_path):
    import typer

    from embedpipe import cli

    (tmp_path / "queries.jsonl").write_bytes(jl({"_id": "q", "text": "alpha?"}))
    (tmp_path / "source.json").write_text(json.dumps({"corpus": {"table": T}}))
    lines = []
    cli.precheck(tmp_path, "shop", echo=lines.append)
    assert lines == [f"note: source.json reads bq://{T}: checked by the jobs"]
    (tmp_path / "source.json").write_text(json.dumps({"corpus": {"table": "nope"}}))
    with pytest.raises(typer.Exit):
        cli.precheck(tmp_path, "shop", echo=lines.append)
    assert "is not PROJECT.DATASET.TABLE" in lines[-1]


class FakeRead:
    """The Storage Read client's surface bqsource uses: sessions with streams of Arrow pages."""

    def __init__(self, rows):
        self.rows, self.sessions = rows, []

    def create_read_session(self, parent, read_session):
        self.sessions.append((parent, read_session))
        return types.SimpleNamespace(streams=[types.SimpleNamespace(name="s0"), types.SimpleNamespace(name="s1")])

    def read_rows(self, name):
        import pyarrow as pa

        half = self.rows[: len(self.rows) // 2] if name == "s0" else self.rows[len(self.rows) // 2 :]
        page = types.SimpleNamespace(to_arrow=lambda: pa.Table.from_pylist(half))
        return types.SimpleNamespace(rows=lambda session: types.SimpleNamespace(pages=[page]))


class FakeRest:
    def __init__(self, error=None):
        self.error = error

    def get_table(self, ref):
        if self.error:
            raise self.error
        project, dataset, table = ref.rsplit(".", 2)
        schema = [types.SimpleNamespace(name=n) for n in ("id", "title", "text")]
        return types.SimpleNamespace(project=project, dataset_id=dataset, table_id=table, schema=schema, num_bytes=1000)


def fake_clients(monkeypatch, rest, read):
    monkeypatch.setattr(bqsource, "_clients", lambda settings: (rest, read))


def test_a_table_is_read_from_every_stream_as_of_the_runs_seal_with_only_its_columns(monkeypatch):
    rows = [{"id": f"d{i}", "title": "", "text": f"text {i}"} for i in range(6)]
    read = FakeRead(rows)
    fake_clients(monkeypatch, FakeRest(), read)
    [part] = parse({"corpus": {"table": "example.com:proj-x.shop.docs"}})
    seal = bqsource.as_of("2026-11-30T12:00:00.000Z")
    got = [rec["_id"] for _, rec in bqsource.records(part, Settings(project="billing-proj"), seal)]
    assert got == [f"d{i}" for i in range(6)]
    [(parent, session)] = read.sessions
    assert parent == "projects/billing-proj"
    assert session.table == "projects/example.com:proj-x/datasets/shop/tables/docs"
    assert list(session.read_options.selected_fields) == ["id", "title", "text"]
    assert session.table_modifiers.snapshot_time == seal, "every job and replica of a run reads one snapshot"


def test_a_table_over_the_object_cap_is_refused_unread(monkeypatch):
    read = FakeRead([])
    fake_clients(monkeypatch, FakeRest(), read)
    [part] = parse({"corpus": {"table": T}})
    with pytest.raises(datasets.DatasetError, match="table is 1000 bytes, over the 999-byte cap"):
        list(bqsource.records(part, Settings(), None, max_bytes=999))
    assert read.sessions == []


def test_only_a_missing_table_leaves_the_part_out_other_errors_fail_the_job_for_a_retry(monkeypatch):
    from google.api_core import exceptions as gexc

    [part] = parse({"corpus": {"table": T}})
    fake_clients(monkeypatch, FakeRest(gexc.NotFound("Not found: Table my-proj:shop.docs")), FakeRead([]))
    with pytest.raises(datasets.DatasetError, match=f"bq://{T}: cannot read: Not found"):
        list(bqsource.records(part, Settings(), None))
    for transient in (gexc.ServiceUnavailable("backend error"), gexc.Forbidden("no bigquery.tables.getData")):
        fake_clients(monkeypatch, FakeRest(transient), FakeRead([]))
        with pytest.raises(type(transient)):
            list(bqsource.records(part, Settings(), None))


def test_the_trainer_never_reads_a_test_qrels_table(gcs, monkeypatch):
    source = {
        "corpus": {"table": T},
        "queries": {"table": "my-proj.shop.q"},
        "qrels": {"train": {"table": "my-proj.shop.tr"}, "test": {"table": "my-proj.shop.te"}},
    }
    gcs.put("datasets/shop/source.json", json.dumps(source).encode())
    read = []

    def rows(part, settings, as_of, max_bytes=None):
        read.append(part.rel)
        yield from {
            "corpus": [{"id": "a", "title": "", "text": "alpha"}],
            "queries": [{"id": "q", "text": "alpha?"}],
            "qrels": [{"query_id": "q", "corpus_id": "a", "score": 1}],
        }[part.kind]

    monkeypatch.setattr(bqsource, "_arrow_rows", rows)
    ds = datasource.load_gcs(DATA, "shop", settings=Settings(), test=False)
    assert "source.json#qrels/test" not in read and set(ds.qrels) == {"train"}
    read.clear()
    assert (
        set(datasource.load_gcs(DATA, "shop", settings=Settings()).qrels) == {"train", "test"}
        and "source.json#qrels/test" in read
    )


def test_a_snapshot_outside_the_time_travel_window_fails_the_job_not_the_part(monkeypatch):
    """Issue 25.13: a 400 for a snapshot BigQuery no longer keeps was taken for the table's fault: the part was left
    out and the run went on (and could promote) with partial data."""
    from google.api_core import exceptions as gexc

    class OldSnapshot(FakeRead):
        def create_read_session(self, parent, read_session):
            raise gexc.BadRequest(
                "Invalid snapshot time 1764504000000 for table docs: cannot read before the time travel window"
            )

    fake_clients(monkeypatch, FakeRest(), OldSnapshot([]))
    [part] = parse({"corpus": {"table": T}})
    seal = bqsource.as_of("2026-11-30T12:00:00.000Z")
    with pytest.raises(bqsource.SnapshotUnavailable, match="outside BigQuery's time-travel window") as exc:
        list(bqsource.records(part, Settings(), seal))
    assert not isinstance(exc.value, datasets.DatasetError) and "retrain --refresh" in str(exc.value)


class QueryRest(FakeRest):
    """A dry run that says what the statement is and which tables it reads; records every query and its config."""

    def __init__(self, statement_type="SELECT", tables=("my-proj.shop.docs",)):
        super().__init__()
        self.statement_type, self.tables, self.queries, self.jobs = statement_type, tables, [], {}

    def query(self, sql, job_config=None, job_id=None, location=None, job_retry=None):
        if job_id in self.jobs:
            raise gexc.Conflict(f"Already Exists: Job my-proj:EU.{job_id}")
        self.queries.append((sql, job_config))
        if job_config is not None and job_config.dry_run:
            refs = [
                types.SimpleNamespace(project=t.rsplit(".", 2)[0], dataset_id=t.rsplit(".", 2)[1]) for t in self.tables
            ]
            return types.SimpleNamespace(statement_type=self.statement_type, referenced_tables=refs, location="EU")
        schema = [types.SimpleNamespace(name=n) for n in ("id", "title", "text")]
        import pyarrow as pa

        batch = pa.Table.from_pylist([{"id": "d1", "title": "", "text": "t"}])
        result = types.SimpleNamespace(schema=schema, to_arrow_iterable=lambda bqstorage_client=None: [batch])
        job = types.SimpleNamespace(result=lambda: result, location=location)
        if job_id:
            self.jobs[job_id] = job
        return job

    def get_job(self, job_id, location=None):
        if job_id not in self.jobs or self.jobs[job_id].location != location:
            raise gexc.NotFound(f"Not found: Job my-proj:{location}.{job_id}")
        return self.jobs[job_id]

    def runs(self) -> int:
        """Query jobs run (dry runs are free and not counted)."""
        return sum(1 for _, cfg in self.queries if not (cfg is not None and cfg.dry_run))


@pytest.mark.parametrize(
    "sql, words",
    [
        ("SELECT id, text FROM shop.docs; DROP TABLE shop.docs", "one SELECT statement, got 2"),
        ("DELETE FROM shop.docs WHERE TRUE", "only a SELECT can be a source, got a DELETE"),
    ],
    ids=["script", "delete"],
)
def test_a_query_part_that_is_not_one_select_is_refused_before_it_runs(monkeypatch, sql, words):
    """Issue 25.12: the SELECT-only guard was untested, and bqemulator runs a script even in a dry run: more than
    one statement is refused before any query is sent."""
    rest = QueryRest(statement_type="DELETE" if sql.startswith("DELETE") else "SELECT")
    fake_clients(monkeypatch, rest, FakeRead([]))
    [part] = parse({"corpus": {"query": sql}})
    with pytest.raises(datasets.DatasetError, match=words):
        list(bqsource.records(part, Settings(), None))
    assert all(cfg is not None and cfg.dry_run for _, cfg in rest.queries), "nothing but a dry run was sent"
    assert len(rest.queries) == (0 if "script" in words or ";" in sql else 1)


def test_a_query_part_reads_only_the_deployed_datasets_and_is_billed_within_the_cap(monkeypatch):
    rest = QueryRest(tables=("my-proj.shop.docs", "other-proj.hr.salaries"))
    fake_clients(monkeypatch, rest, FakeRead([]))
    [part] = parse({"corpus": {"query": "SELECT d.id, d.title, s.text FROM shop.docs d JOIN hr.salaries s USING (id)"}})
    settings = Settings(bigquery_datasets="my-proj.shop", bigquery_max_bytes_billed=10**9)
    with pytest.raises(datasets.DatasetError, match=r"reads dataset\(s\) \['other-proj.hr'\], not in"):
        list(bqsource.records(part, settings, None))
    assert len(rest.queries) == 1  # the dry run only
    rest.tables = ("my-proj.shop.docs",)
    assert [r["_id"] for _, r in bqsource.records(part, settings, None)] == ["d1"]
    (sql, cfg) = rest.queries[-1]
    assert cfg.maximum_bytes_billed == 10**9 and not cfg.dry_run


def test_a_query_part_runs_once_per_run_whoever_reads_it(monkeypatch):
    """Issue 25.12: every job, replica and attempt re-ran (and paid for) a query part. Its job id now comes from the
    part and the run's seal: the second reader of a run reads the first's result; another run runs it again; a job
    whose result BigQuery no longer keeps is run again."""
    rest = QueryRest()
    fake_clients(monkeypatch, rest, FakeRead([]))
    [part] = parse({"corpus": {"query": "SELECT id, title, text FROM shop.docs"}})
    seal = bqsource.as_of("2026-11-30T12:00:00.000Z")
    for _ in range(3):  # the trainer, then two embedder replicas
        assert [r["_id"] for _, r in bqsource.records(part, Settings(), seal)] == ["d1"]
    assert rest.runs() == 1 and list(rest.jobs) == [bqsource.query_job_id(part, seal)]
    later = bqsource.as_of("2026-12-01T12:00:00.000Z")
    assert [r["_id"] for _, r in bqsource.records(part, Settings(), later)] == ["d1"] and rest.runs() == 2

    def expired():
        raise gexc.NotFound("Not found: Table my-proj:_anon.anon123")

    rest.jobs[bqsource.query_job_id(part, later)].result = expired
    assert [r["_id"] for _, r in bqsource.records(part, Settings(), later)] == ["d1"] and rest.runs() == 3
    # A replica that looked before another inserted: its insert's Conflict is read as "already run"
    rest.jobs.clear()
    theirs, real_get = rest.query("SELECT id, title, text FROM shop.docs"), rest.get_job

    def raced_get(job_id, location=None):
        if job_id not in rest.jobs:  # nothing yet; the other replica inserts right after this look
            rest.jobs[job_id] = types.SimpleNamespace(result=theirs.result, location=location)
            raise gexc.NotFound("Not found: Job")
        return real_get(job_id, location)

    monkeypatch.setattr(rest, "get_job", raced_get)
    before = rest.runs()
    assert [r["_id"] for _, r in bqsource.records(part, Settings(), seal)] == ["d1"] and rest.runs() == before


def test_a_query_job_that_fails_on_bigquerys_side_is_run_again_not_the_attempt_failed(monkeypatch):
    """The run's own job id rules out the client's job retries: a backendError under it is run again as a plain
    job (with those retries) rather than failing the job attempt; the query's own fault still fails the part."""
    rest = QueryRest()
    fake_clients(monkeypatch, rest, FakeRead([]))
    [part] = parse({"corpus": {"query": "SELECT id, title, text FROM shop.docs"}})
    seal = bqsource.as_of("2026-11-30T12:00:00.000Z")
    real_query = rest.query

    def failing_once(sql, job_config=None, job_id=None, location=None, job_retry=None):
        job = real_query(sql, job_config, job_id, location, job_retry)
        if job_id:  # the run's job fails on BigQuery's side
            job.result = lambda: (_ for _ in ()).throw(gexc.InternalServerError("Backend error"))
        return job

    monkeypatch.setattr(rest, "query", failing_once)
    assert [r["_id"] for _, r in bqsource.records(part, Settings(), seal)] == ["d1"]
    assert rest.runs() == 2  # the run's job, then a plain one

    def bad_sql(sql, job_config=None, job_id=None, location=None, job_retry=None):
        job = real_query(sql, job_config, job_id, location, job_retry)
        if job_id:
            job.result = lambda: (_ for _ in ()).throw(gexc.BadRequest("Unrecognized name: txt"))
        return job

    rest.jobs.clear()
    monkeypatch.setattr(rest, "query", bad_sql)
    with pytest.raises(datasets.DatasetError, match="Unrecognized name"):
        list(bqsource.records(part, Settings(), seal))
