"""A dataset read from BigQuery, on a local stack the test starts and stops (``embedpipe up`` runs bqemulator):
tables created there, a retrain naming them in ``source.json`` gives an index-updated event whose index holds exactly
the table's ids; changing 1% of the rows and asking for a refresh gives an incremental run that upserts only those."""

from __future__ import annotations

import json

import pytest

from embedpipe.contracts.datasets import load_dir
from embedpipe.retrieval import vectorstore
from tests.helpers import FIXTURES, cli, cli_stack, isolated_settings

pytestmark = pytest.mark.e2e

EXTRA = 176  # the fixture's 24 documents + these = 200 rows: 2 changed rows are 1%


@pytest.fixture(scope="module")
def bq_stack(tmp_path_factory, tiny_model):
    settings = isolated_settings(tmp_path_factory.mktemp("bq-state"), tiny_model)
    with cli_stack(settings) as env:
        yield settings, env


def client(settings):
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    return bigquery.Client(
        project=settings.project,
        credentials=AnonymousCredentials(),
        client_options=ClientOptions(api_endpoint=settings.bigquery_endpoint),
    )


def make_tables(bq, project: str) -> list[str]:
    """corpus (custom column names + a metadata column), queries and qrels tables from the tiny fixture."""
    from google.cloud import bigquery

    ds = load_dir(FIXTURES / "tiny_beir", "tiny")
    bq.create_dataset(f"{project}.shop", exists_ok=True)
    S = bigquery.SchemaField
    corpus = [{"doc_id": d.id, "headline": d.title, "body": d.text, "lang": "en"} for d in ds.corpus.values()]
    corpus += [
        {"doc_id": f"x{i:03d}", "headline": None, "body": f"Filler note {i} about topic {i % 7}.", "lang": "de"}
        for i in range(EXTRA)
    ]
    tables = {
        "corpus": ([S("doc_id", "STRING"), S("headline", "STRING"), S("body", "STRING"), S("lang", "STRING")], corpus),
        "queries": ([S("id", "STRING"), S("text", "STRING")], [{"id": q, "text": t} for q, t in ds.queries.items()]),
    }
    for split in ("train", "test"):
        rows = [
            {"query_id": q, "corpus_id": d, "score": s} for q, docs in ds.qrels[split].items() for d, s in docs.items()
        ]
        tables[f"qrels_{split}"] = ([S("query_id", "STRING"), S("corpus_id", "STRING"), S("score", "INT64")], rows)
    for name, (schema, rows) in tables.items():
        table = bq.create_table(bigquery.Table(f"{project}.shop.{name}", schema=schema), exists_ok=True)
        assert not bq.insert_rows_json(table, rows)
    return [r["doc_id"] for r in corpus]


def milvus_rows(settings) -> dict[str, str]:
    client = vectorstore.connect(settings.milvus_uri)
    return vectorstore.ids_and_hashes(client, vectorstore.alias_target(client, "shop"))


def test_a_dataset_read_from_bigquery_is_indexed_then_refreshed_incrementally(bq_stack, tmp_path):
    settings, env = bq_stack
    bq = client(settings)
    ids = make_tables(bq, settings.project)
    t = f"{settings.project}.shop"
    source = {
        "corpus": {
            "table": f"{t}.corpus",
            "columns": {"id": "doc_id", "title": "headline", "text": "body"},
            "metadata": ["lang"],
        },
        "queries": {"table": f"{t}.queries"},
        "qrels": {"train": {"table": f"{t}.qrels_train"}, "test": {"query": f"SELECT * FROM `{t}.qrels_test`"}},
    }
    (tmp_path / "source.json").write_text(json.dumps(source))
    first = cli(env, "retrain", "--dataset", "shop", "--source", str(tmp_path / "source.json"), "--wait")
    assert first.returncode == 0, first.stderr[-3000:]
    a = json.loads(first.stdout)["data"]
    assert a["kind"] == "full" and a["promoted"] and a["counts"]["total"] == len(ids)
    assert a["eval"]["split"] == "test" and a["eval"]["queries"] > 0, "the test qrels came from the SQL part"
    live = milvus_rows(settings)
    assert sorted(live) == sorted(ids)

    # 1% of the rows change; a refresh (what a scheduled query or an audit-log trigger would publish) re-reads them
    bq.query(f"UPDATE `{t}.corpus` SET body = CONCAT(body, ' Revised.') WHERE doc_id IN ('x000', 'x001')").result()
    second = cli(env, "retrain", "--dataset", "shop", "--refresh", "--wait")
    assert second.returncode == 0, second.stderr[-3000:]
    b = json.loads(second.stdout)["data"]
    assert b["kind"] == "incremental" and b["trigger"]["type"] == "refresh"
    assert b["counts"]["upserted"] == 2 and b["counts"]["deleted"] == 0 and b["counts"]["unchanged"] == len(ids) - 2
    after = milvus_rows(settings)
    assert sorted(after) == sorted(ids)
    assert {i for i in ids if after[i] != live[i]} == {"x000", "x001"}


def test_a_table_that_is_not_there_fails_the_run_in_intake_naming_it(bq_stack, tmp_path):
    settings, env = bq_stack
    (tmp_path / "source.json").write_text(json.dumps({"corpus": {"table": f"{settings.project}.shop.nope"}}))
    result = cli(env, "retrain", "--dataset", "gone", "--source", str(tmp_path / "source.json"), "--wait")
    assert result.returncode != 0
    event = json.loads(result.stdout)
    assert event["data"]["stage"] == "intake"
    assert f"bq://{settings.project}.shop.nope" in event["data"]["cause"]
