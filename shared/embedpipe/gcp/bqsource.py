"""BigQuery as a dataset source: ``datasets/<dataset>/source.json`` names tables (or SQL) for parts of the dataset.

::

    {"corpus":  {"table": "PROJECT.DATASET.TABLE",
                 "columns": {"id": "doc_id", "title": "title", "text": "body"},   # defaults: id, title, text
                 "metadata": ["lang", "url"]},                                     # optional extra columns
     "queries": {"table": "PROJECT.DATASET.QUERIES"},                               # columns id, text
     "qrels":   {"test":  {"table": "PROJECT.DATASET.QRELS_TEST"},                  # query_id, corpus_id, score
                 "train": {"query": "SELECT q AS query_id, d AS corpus_id, 1 AS score FROM ..."}}}

Every part is optional; a part the bucket also holds as files is read from both, like two corpus files (ids must not
repeat across them). A column that ``columns`` does not rename keeps its default name; ``title`` may be ``null`` (no
title column). Rows become the same records a BEIR file's lines become and pass the same checks
(``datasets.corpus_records`` and friends), so a bad row is an error naming the table, the row and the reason, and
content hashes (and with them incremental runs) are the same as for files.

Reading is the jobs' work, never a function's: jobs read with the BigQuery Storage Read API (Arrow, streamed batch by
batch, every stream of the session), as of the run's creation time (``as_of``: time travel pins the table, so every
replica and every retry of a run reads the same rows). A ``query`` part runs as a query job whose result table is
then read the same way; it is not pinned (write ``FOR SYSTEM_TIME AS OF`` into the SQL to pin it), but it runs once
per run: its job id is derived from the part and the run's seal (``query_job_id``), so every other replica and
attempt reads that job's result instead of running (and paying for) the query again. Every embedder
replica reads every stream: each needs every document's content hash for the incremental plan and the replicas'
agreement digest (``incremental``); the embedding work is then split by id as for files.

Functions only parse ``source.json`` (one small object): at upload and at launch (``intake``).
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import json
import re
from dataclasses import dataclass, field

from embedpipe.contracts.datasets import MAX_JSON_DEPTH, SOURCE_FILE, DatasetError, _too_deep

MAX_SOURCE_BYTES = 64 << 10

# project (may be domain-scoped, "example.com:proj"), dataset, table: what BigQuery allows in each
TABLE_RE = re.compile(r"^(?:[a-z][a-z0-9.-]*:)?[a-z][a-z0-9-]{4,61}[a-z0-9]\.[A-Za-z0-9_]{1,1024}\.[\w$-]{1,1024}$")
COLUMN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,299}$")
SPLITS = ("train", "dev", "test")
COLUMNS = {  # part -> its columns and their default names
    "corpus": {"id": "id", "title": "title", "text": "text"},
    "queries": {"id": "id", "text": "text"},
    "qrels": {"query_id": "query_id", "corpus_id": "corpus_id", "score": "score"},
}
OPTIONAL = {("corpus", "title")}  # a default column that may be absent from the table, or set to null


@dataclass(frozen=True, eq=False)  # hashed by identity: a load maps each part to its rows
class Part:
    """One part of a dataset read from BigQuery: ``kind`` corpus | queries | qrels (with ``split``)."""

    kind: str
    table: str = ""  # PROJECT.DATASET.TABLE
    query: str = ""  # or GoogleSQL whose result is the part
    columns: dict = field(default_factory=dict)  # our name -> the table's column (None: not present)
    metadata: tuple[str, ...] = ()
    split: str = ""

    @property
    def rel(self) -> str:
        """The part's name in a dataset load and in errors (``source.json#corpus``, ``source.json#qrels/test``)."""
        return f"{SOURCE_FILE}#{self.kind}" + (f"/{self.split}" if self.split else "")

    @property
    def where(self) -> str:
        return f"bq://{self.table}" if self.table else f"the {self.rel} query"


def as_of(text: str) -> dt.datetime | None:
    """A job's ``--as-of`` (the run's ``sealed_at``, ISO 8601) as the snapshot time to read tables at."""
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def bq_uri_table(uri: str) -> str:
    """``bq://PROJECT.DATASET.TABLE`` -> ``PROJECT.DATASET.TABLE`` (ValueError when it is not one)."""
    table = uri[len("bq://") :] if uri.startswith("bq://") else ""
    if not TABLE_RE.fullmatch(table):
        raise ValueError(f"{uri!r} is not bq://PROJECT.DATASET.TABLE")
    return table


def parse(data: bytes, file: str = SOURCE_FILE) -> list[Part]:
    """Validate a ``source.json``; every problem is a DatasetError naming the file, the line when JSON is broken,
    and the key."""
    if len(data) > MAX_SOURCE_BYTES:
        raise DatasetError(file, None, f"source file is {len(data)} bytes, over the {MAX_SOURCE_BYTES}-byte cap")
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DatasetError(file, None, f"invalid UTF-8 at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(file, exc.lineno, f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(doc, dict) or not doc:
        raise DatasetError(file, None, "expected a JSON object with corpus, queries and/or qrels")
    if unknown := sorted(set(doc) - {"corpus", "queries", "qrels"}):
        raise DatasetError(file, None, f"unknown key(s) {unknown}; expected corpus, queries, qrels")
    parts = []
    for kind in ("corpus", "queries"):
        if kind in doc:
            parts.append(_part(doc[kind], kind, "", file))
    if "qrels" in doc:
        qrels = doc["qrels"]
        if not isinstance(qrels, dict) or not qrels or set(qrels) - set(SPLITS):
            raise DatasetError(file, None, f"'qrels' must map splits {list(SPLITS)} to table or query specs")
        parts += [_part(qrels[s], "qrels", s, file) for s in SPLITS if s in qrels]
    return parts


def _part(spec, kind: str, split: str, file: str) -> Part:
    key = f"qrels.{split}" if split else kind
    if not isinstance(spec, dict):
        raise DatasetError(file, None, f"'{key}' must be an object")
    if unknown := sorted(set(spec) - {"table", "query", "columns", "metadata"}):
        raise DatasetError(file, None, f"'{key}': unknown key(s) {unknown}")
    table, query = spec.get("table"), spec.get("query")
    if (table is None) == (query is None):
        raise DatasetError(file, None, f"'{key}' needs exactly one of 'table' or 'query'")
    if table is not None and not (isinstance(table, str) and TABLE_RE.fullmatch(table)):
        raise DatasetError(file, None, f"'{key}.table' {table!r} is not PROJECT.DATASET.TABLE")
    if query is not None and not (isinstance(query, str) and query.strip()):
        raise DatasetError(file, None, f"'{key}.query' must be a non-empty SQL string")
    given = spec.get("columns", {})
    if not isinstance(given, dict) or (unknown := sorted(set(given) - set(COLUMNS[kind]))):
        raise DatasetError(file, None, f"'{key}.columns' may rename only {sorted(COLUMNS[kind])}")
    columns = {}
    for name, default in COLUMNS[kind].items():
        col = given.get(name, default)
        if col is None and (kind, name) in OPTIONAL:
            columns[name] = None
            continue
        if not (isinstance(col, str) and COLUMN_RE.fullmatch(col)):
            raise DatasetError(file, None, f"'{key}.columns.{name}' {col!r} is not a column name")
        columns[name] = col
    metadata = spec.get("metadata", [])
    if kind != "corpus" and metadata:
        raise DatasetError(file, None, f"'{key}.metadata': only the corpus has metadata columns")
    if not isinstance(metadata, list) or not all(isinstance(m, str) and COLUMN_RE.fullmatch(m) for m in metadata):
        raise DatasetError(file, None, f"'{key}.metadata' must be a list of column names")
    return Part(kind, table or "", query or "", columns, tuple(metadata), split)


# ------------------------------------------------------------------ reading (jobs only)
def _clients(settings):
    """(BigQuery REST client, Storage Read client): Google's endpoints, or the emulator that
    ``BIGQUERY_EMULATOR_HOST`` names (set by the local stack, never on Vertex; its Storage Read API listens on
    ``EMBEDPIPE_BIGQUERY_GRPC_PORT``)."""
    from google.cloud import bigquery, bigquery_storage_v1

    if not settings.bigquery_emulator:
        return bigquery.Client(project=settings.project), bigquery_storage_v1.BigQueryReadClient()
    import grpc
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud.bigquery_storage_v1.services.big_query_read.transports import BigQueryReadGrpcTransport

    rest = bigquery.Client(
        project=settings.project,
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=settings.bigquery_emulator),
    )
    channel = grpc.insecure_channel(settings.bigquery_grpc_address)
    return rest, bigquery_storage_v1.BigQueryReadClient(transport=BigQueryReadGrpcTransport(channel=channel))


def _fail(part: Part, row: int | None, reason: str) -> DatasetError:
    return DatasetError(part.rel, row, f"{part.where}: {reason}")


def _columns_of(part: Part, schema) -> list[str]:
    """The columns to read; a missing one is an error listing what the table has."""
    have = [f.name for f in schema]
    wanted = []
    for name, col in part.columns.items():
        if col is None:
            continue
        if col not in have:
            if (part.kind, name) in OPTIONAL and col == COLUMNS[part.kind][name]:
                continue  # the default title column is optional
            raise _fail(part, None, f"no column {col!r} ({name}); the table has {have}")
        wanted.append(col)
    for col in part.metadata:
        if col not in have:
            raise _fail(part, None, f"no metadata column {col!r}; the table has {have}")
        wanted.append(col)
    return list(dict.fromkeys(wanted))


def statements(sql: str) -> int:
    """How many statements ``sql`` holds: semicolons outside string literals, quoted names and comments end one;
    text after the last one (beyond whitespace and comments) is one more."""
    count, pending, i, n = 0, False, 0, len(sql)
    while i < n:
        c = sql[i]
        if c in "'\"`":
            end = i + 1
            while end < n and sql[end] != c:
                end += 2 if sql[end] == "\\" else 1
            i, pending = end + 1, True
        elif sql.startswith("--", i) or c == "#":
            i = sql.find("\n", i)
            i = n if i < 0 else i
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif c == ";":
            count, pending, i = count + (1 if pending else 0), False, i + 1
        else:
            pending, i = pending or not c.isspace(), i + 1
    return count + (1 if pending else 0)


class SnapshotUnavailable(RuntimeError):
    """A table cannot be read as of the run's seal (outside the time-travel window): the read's fault, not the
    data's, so the job fails (the run with it) rather than leave the part out and go on with partial data."""


SNAPSHOT_REFUSED = re.compile(r"time.?travel|snapshot", re.IGNORECASE)


# What a part's read may raise as the data's fault (the part is left out and reported, like a bad file): a table or
# column that is not there, SQL that does not compile. Not a snapshot outside the time-travel window
# (SnapshotUnavailable), nor anything else (unavailable, quota, permission): those propagate, the job fails and is
# retried, the run fails after its attempts.
def _data_errors():
    from google.api_core import exceptions as gexc

    return (gexc.NotFound, gexc.BadRequest)


def _arrow_rows(part: Part, settings, as_of: dt.datetime | None, max_bytes: int | None = None):
    """Every row of the part as a dict, batch by batch: a table from every stream of one Storage Read session; a
    query's result through the client library's Arrow iterator (the Storage Read API in the cloud; REST pages
    against the emulator, which cannot open a read session on its anonymous result tables)."""
    import pyarrow  # noqa: F401 - the Storage Read client decodes Arrow with it, imported only when present
    from google.cloud import bigquery
    from google.cloud.bigquery_storage_v1 import types

    rest, read = _clients(settings)
    try:
        if part.query:
            # a source is read, never run for effect: one statement (an emulator runs a script even in a dry run),
            # and only a SELECT (a dry run says what the statement is), of the datasets the deploy names
            if (n := statements(part.query)) != 1:
                raise _fail(part, None, f"a source query is one SELECT statement, got {n} statements")
            dry = rest.query(part.query, job_config=bigquery.QueryJobConfig(dry_run=True, use_query_cache=False))
            if dry.statement_type != "SELECT":
                raise _fail(part, None, f"only a SELECT can be a source, got a {dry.statement_type} statement")
            allowed = {d.strip() for d in settings.bigquery_datasets.split(",") if d.strip()}
            read_from = {f"{t.project}.{t.dataset_id}" for t in (getattr(dry, "referenced_tables", None) or [])}
            if allowed and (others := sorted(read_from - allowed)):
                known = sorted(allowed)
                raise _fail(part, None, f"reads dataset(s) {others}, not in EMBEDPIPE_BIGQUERY_DATASETS {known}")
            cap = settings.bigquery_max_bytes_billed
            config = bigquery.QueryJobConfig(maximum_bytes_billed=cap) if cap > 0 else None
            result = _query_once(rest, part, as_of, config, getattr(dry, "location", None))
            columns = _columns_of(part, result.schema)
            storage_api = None if settings.bigquery_emulator else read
            for batch in result.to_arrow_iterable(bqstorage_client=storage_api):
                yield from batch.select(columns).to_pylist()
            return
        table = rest.get_table(part.table)
    except _data_errors() as exc:
        raise _fail(part, None, f"cannot read: {getattr(exc, 'message', exc)}") from None
    if max_bytes is not None and (table.num_bytes or 0) > max_bytes:
        raise _fail(part, None, f"table is {table.num_bytes} bytes, over the {max_bytes}-byte cap")
    columns = _columns_of(part, table.schema)
    session = types.ReadSession(
        table=f"projects/{table.project}/datasets/{table.dataset_id}/tables/{table.table_id}",
        data_format=types.DataFormat.ARROW,
        read_options=types.ReadSession.TableReadOptions(selected_fields=columns),
        table_modifiers=types.ReadSession.TableModifiers(snapshot_time=as_of) if as_of else None,
    )
    try:
        session = read.create_read_session(parent=f"projects/{settings.project}", read_session=session)
    except _data_errors() as exc:
        if as_of and SNAPSHOT_REFUSED.search(str(getattr(exc, "message", exc))):
            # not the table's fault: this read cannot be served (the run's seal is older than BigQuery keeps);
            # leaving the part out would run on partial data
            raise SnapshotUnavailable(
                f"{part.where}: cannot be read as of {as_of.isoformat()} (the run's seal), outside BigQuery's "
                f"time-travel window: start a new run (embedpipe retrain --refresh) to read it now ({exc.message})"
            ) from None
        raise _fail(part, None, f"cannot open a read session: {exc.message}") from None
    for stream in session.streams:
        for page in read.read_rows(stream.name).rows(session).pages:
            yield from page.to_arrow().to_pylist()


def query_job_id(part: Part, as_of: dt.datetime) -> str:
    """The id of the one query job a run runs for ``part`` (``as_of``: the run's seal, which tells runs apart)."""
    key = f"{part.rel}\n{part.query}\n{as_of.isoformat()}"
    return "embedpipe_source_" + hashlib.sha256(key.encode()).hexdigest()[:40]


def _query_once(rest, part: Part, as_of: dt.datetime | None, config, location: str | None):
    """The result of the part's query job for this run: an existing job's (another replica or attempt ran it), else
    a new job under ``query_job_id``. BigQuery keeps a result table about a day: a job whose result is gone is run
    again, under a new id. Without ``as_of`` (no run), a new job."""
    from google.api_core import exceptions as gexc

    if as_of is None:
        return rest.query(part.query, job_config=config).result()
    job_id = query_job_id(part, as_of)
    try:
        job = rest.get_job(job_id, location=location)
    except gexc.NotFound:
        try:  # job_retry=None: a job with a given id cannot be retried under that id
            job = rest.query(part.query, job_config=config, job_id=job_id, location=location, job_retry=None)
        except gexc.Conflict:  # a replica created it between our look and our insert
            job = rest.get_job(job_id, location=location)
    try:
        return job.result()
    except gexc.BadRequest:
        raise  # the query's own fault (bad SQL, over the byte cap): running it again cannot help
    except gexc.GoogleAPICallError:
        # its result expired (NotFound) or it failed on BigQuery's side (backendError, rateLimitExceeded): run it
        # again with the client's own job retries (each replica that meets the failed job pays for its own run)
        return rest.query(part.query, job_config=config).result()


def _text(value, part: Part, row: int, name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (int,)) and not isinstance(value, bool) and name in ("id", "query_id", "corpus_id"):
        return str(value)  # integer ids are ids, as in BEIR files
    if not isinstance(value, str):
        raise _fail(part, row, f"column {part.columns[name]!r} ({name}) must be STRING, got {type(value).__name__}")
    return value


def _jsonable(value):
    """A metadata value as JSON holds it (the content hash serialises metadata)."""
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        import base64

        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)  # Decimal, and anything else BigQuery adds


def records(part: Part, settings, as_of: dt.datetime | None = None, max_bytes: int | None = None):
    """``(row number, record)`` in the shape a BEIR line parses to: corpus ``{"_id", "title", "text",
    "metadata"}``, queries ``{"_id", "text"}``, qrels ``(query id, corpus id, score)``."""
    c = part.columns
    for number, row in enumerate(_arrow_rows(part, settings, as_of, max_bytes), start=1):
        if part.kind == "qrels":
            score = row.get(c["score"])
            if isinstance(score, decimal.Decimal):  # NUMERIC
                score = float(score)
            if not isinstance(score, (int, float)) or isinstance(score, bool):
                raise _fail(part, number, f"score {score!r} is not a number")
            yield (
                number,
                (
                    _text(row[c["query_id"]], part, number, "query_id"),
                    _text(row[c["corpus_id"]], part, number, "corpus_id"),
                    score,
                ),
            )
            continue
        rec = {
            "_id": _text(row[c["id"]], part, number, "id") or None,
            "text": _text(row[c["text"]], part, number, "text"),
        }
        if part.kind == "corpus":
            if c.get("title") and c["title"] in row:
                rec["title"] = _text(row[c["title"]], part, number, "title")
            meta = {m: _jsonable(row[m]) for m in part.metadata}  # NULL is null, as in a file's metadata
            if meta and _too_deep(meta, MAX_JSON_DEPTH):
                raise _fail(part, number, f"metadata nests deeper than {MAX_JSON_DEPTH} levels")
            rec["metadata"] = meta
        yield number, rec
