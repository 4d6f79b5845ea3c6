"""The whole loop on a local stack the test starts and stops itself, driven through the embedpipe CLI exactly as a
user would: up -> upload --wait -> retrain --wait -> upload of a second dataset -> search -> down."""

from __future__ import annotations

import json
import os

import pytest

from embedpipe.contracts import datasets
from embedpipe.local import stack
from embedpipe.retrieval import vectorstore
from tests.helpers import FIXTURES, ROOT, cli, isolated_settings

pytestmark = pytest.mark.e2e
METRIC_KEYS = {"recall@1", "recall@5", "recall@10", "recall@100", "mrr@10", "ndcg@10"}


@pytest.fixture(scope="module")
def local_stack(tmp_path_factory, tiny_model):
    settings = isolated_settings(tmp_path_factory.mktemp("e2e-state"), tiny_model)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDPIPE_") and "EMULATOR_HOST" not in k}
    env.update(settings.to_env())
    result = cli(env, "up")
    assert result.returncode == 0, result.stderr
    yield settings, env
    cli(env, "down")


def test_upload_wait_prints_index_updated(local_stack):
    settings, env = local_stack
    result = cli(env, "upload", str(FIXTURES / "tiny_beir"), "--dataset", "tiny", "--wait", "--timeout", "300")
    assert result.returncode == 0, result.stderr[-3000:]
    event = json.loads(result.stdout)  # stdout holds exactly one JSON document; logs went to stderr
    assert {"specversion", "type", "source", "id", "time", "data"} <= set(event)
    assert event["type"] == "io.embedpipe.index.updated.v1"
    data = event["data"]
    assert data["dataset"] == "tiny" and data["kind"] == "full" and data["promoted"] is True
    assert set(data["metrics"]) == METRIC_KEYS
    assert data["previous_metrics"] is None
    assert data["trigger"]["type"] == "upload"
    assert {"training", "embedding", "index"} <= set(data["stage_seconds"])
    corpus_ids = set(datasets.load_dir(FIXTURES / "tiny_beir").corpus)
    assert data["counts"] == {
        "upserted": len(corpus_ids),
        "deleted": 0,
        "unchanged": 0,
        "total": len(corpus_ids),
        "skipped": 0,
    }

    client = vectorstore.connect(settings.milvus_uri)
    assert vectorstore.alias_target(client, "tiny") == data["collection"]
    assert set(vectorstore.ids_and_hashes(client, data["collection"])) == corpus_ids
    assert "summary" not in result.stdout and "run " in result.stderr  # the human summary is on stderr


def test_retrain_compares_with_the_live_index(local_stack):
    settings, env = local_stack
    result = cli(
        env,
        "retrain",
        "--dataset",
        "tiny",
        "--set",
        "max_steps=2",
        "--set",
        "learning_rate=1e-4",
        "--wait",
        "--timeout",
        "300",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)["data"]
    assert data["trigger"]["type"] == "retrain"
    assert set(data["previous_metrics"]) == METRIC_KEYS  # measured on the same qrels in the same run
    gate = data["gate"]
    rivals = [data["previous_metrics"], data["metrics_by_mode"]["bm25"], data["metrics_by_mode"]["base"]]
    served = data["metrics_by_mode"]["served"]
    assert served == data["metrics"]
    ok = all(served[m] >= r[m] - gate["tolerance"] for m in gate["metrics"] for r in rivals)
    assert data["promoted"] is ok
    client = vectorstore.connect(settings.milvus_uri)
    live = vectorstore.alias_target(client, "tiny")
    assert live == (data["collection"] if data["promoted"] else data["previous_collection"])

    runs = json.loads(cli(env, "runs", "--json").stdout)
    assert [r["state"] for r in runs if r["dataset"] == "tiny"] == ["SUCCEEDED", "SUCCEEDED"]


def test_any_beir_folder_and_search(local_stack):
    settings, env = local_stack
    folder = ROOT / "examples" / "other" / "data"
    result = cli(env, "upload", str(folder), "--dataset", "other", "--wait", "--timeout", "400")
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)["data"]
    assert data["dataset"] == "other" and data["counts"]["total"] == len(datasets.load_dir(folder).corpus)
    assert set(data["metrics"]) == METRIC_KEYS

    found = cli(env, "search", "bike rules on trains", "--dataset", "other", "-k", "3", "--json")
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)["hits"]
    assert len(hits) == 3 and all(h["id"].startswith("t") for h in hits)

    events = cli(env, "events")
    types = [json.loads(line)["type"] for line in events.stdout.splitlines() if line.strip()]
    assert types.count("io.embedpipe.index.updated.v1") == 3


def test_a_beir_folder_as_published_uploads_and_indexes(local_stack):
    """Title-only documents, a document with neither title nor text, a text repeating its title, a numeric id, a qrels
    row naming an absent document: accepted with warnings, indexed, counted, and served in the promoted mode."""
    settings, env = local_stack
    folder = FIXTURES / "beir_quirks"
    result = cli(env, "upload", str(folder), "--dataset", "quirks", "--wait", "--timeout", "400")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: corpus.jsonl:4: document 'q-04' has neither title nor text: skipped" in result.stderr
    data = json.loads(result.stdout)["data"]
    assert data["counts"]["skipped"] == 1 and data["counts"]["total"] == 6
    assert data["eval"] == {"split": "test", "queries": 3, "qrels_absent": 1}
    assert set(data["metrics_by_mode"]) == {"bm25", "base", "bm25+base", "dense", "hybrid", "served"}
    assert data["metrics_by_mode"]["served"] == data["metrics_by_mode"][data["default_search_mode"]]
    client = vectorstore.connect(settings.milvus_uri)
    rows = {r["id"]: r for r in client.query(data["collection"], filter="", output_fields=["id", "text"], limit=100)}
    assert set(rows) == {"q-01", "q-02", "q-03", "q-05", "q-06", "7"}
    assert rows["q-02"]["text"] == "Seed library opening hours"  # title-only: embedded and indexed from its title
    assert rows["q-01"]["text"].count("Rain barrels") == 1  # the text repeated its title: used once
    found = cli(env, "search", "seed library hours", "--dataset", "quirks", "-k", "2", "--json")
    assert found.returncode == 0, found.stderr
    answer = json.loads(found.stdout)
    assert answer["mode"] == data["default_search_mode"] and answer["hits"]


def test_bad_folder_is_refused_before_upload(local_stack, tmp_path):
    _, env = local_stack
    (tmp_path / "corpus.jsonl").write_text('{"_id": "a", "text": "fine"}\n{"_id": "b", "text": }\n')
    result = cli(env, "upload", str(tmp_path), "--dataset", "broken")
    assert result.returncode == 2
    assert "corpus.jsonl:2: invalid JSON" in result.stderr


def test_down_leaves_no_process(local_stack):
    settings, env = local_stack
    pids = [p["pid"] for p in stack.status(settings) if p["pid"]]
    assert len(pids) == len(stack.parts(settings))
    result = cli(env, "down")
    assert result.returncode == 0, result.stderr
    for pid in pids:
        assert not stack.pid_alive(pid), f"process {pid} still running after down"
    assert all(p["health"] == "stopped" for p in stack.status(settings))
