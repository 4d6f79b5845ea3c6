"""Issue 29 on the local stack with the real gate (tolerance 0, unlike the other e2e stacks): a user's first, small
upload whose own index loses on the eval split still leaves the dataset searchable, served by the best baseline the
run measured, with the reason in the CLI summary, the event and the report; search answers from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import cli, cli_stack, isolated_settings

pytestmark = pytest.mark.e2e

FILLER = [
    "The committee reviewed the quarterly figures and agreed to revisit the budget next spring.",
    "Volunteers repainted the fence along the north path after the storm damaged several boards.",
    "A new schedule for the reading room was posted on the notice board by the entrance.",
    "Members discussed the proposal at length before voting to adopt the revised guidelines.",
]


def code(i: int) -> str:
    return f"qz{i:02d}xv"  # one word that only document i holds: BM25 finds it at once, a random model does not


def small_collection(root):
    """80 short documents in four corpus files, 20 judged test queries, and five training pairs (fewer anchors than
    k-fold selection needs, so nothing can check a fine-tune: the base model ships, dense by default)."""
    (root / "corpus").mkdir(parents=True)
    (root / "qrels").mkdir()
    for part in range(4):
        with open(root / "corpus" / f"part-{part}.jsonl", "w") as f:
            for i in range(part * 20, part * 20 + 20):
                text = f"Record {code(i)}. {FILLER[i % 4]} {FILLER[(i + 1) % 4]}"
                f.write(json.dumps({"_id": f"doc{i}", "title": f"Minutes {i % 7}", "text": text}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for i in range(25):
            f.write(json.dumps({"_id": f"q{i}", "text": f"which record is {code(i)}"}) + "\n")
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\tdoc{i}\t1\n" for i in range(20))
    )
    (root / "qrels" / "train.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\tdoc{i}\t1\n" for i in range(20, 25))
    )
    return root


@pytest.fixture(scope="module")
def strict_stack(tmp_path_factory, tiny_model):
    settings = isolated_settings(tmp_path_factory.mktemp("first-upload-state"), tiny_model, gate_tolerance=0.0)
    with cli_stack(settings) as env:
        yield settings, env


def test_a_small_first_upload_that_loses_is_still_searchable_from_the_best_baseline(strict_stack, tmp_path):
    settings, env = strict_stack
    folder = small_collection(tmp_path / "small")
    result = cli(env, "upload", str(folder), "--dataset", "small", "--wait", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)["data"]
    # nothing could check a fine-tune: the base model shipped, untrained, and said why
    assert data["model"]["tuned"] is False and "too few training pairs" in data["model"]["shipped_reason"]
    by_mode = data["metrics_by_mode"]
    assert by_mode["bm25"]["ndcg@10"] == pytest.approx(1.0)  # each query's word is in its document alone
    assert by_mode["dense"]["ndcg@10"] < by_mode["bm25"]["ndcg@10"]  # the random model's dense ranking loses
    # the run's own index lost to BM25, but a first upload is promoted with the best baseline it measured
    fb = data["fallback"]
    assert data["promoted"] is True and fb["mode"] == "bm25" and fb["served"] == "BM25"  # perfect: nothing beats it
    assert "rejected" in fb["why"] and "falls back" in data["gate"]["reason"]
    assert data["metrics"] == by_mode["served"] and data["metrics"]["ndcg@10"] >= by_mode["dense"]["ndcg@10"]
    assert data["metrics"]["ndcg@10"] == pytest.approx(1.0) and data["default_search_mode"] == "bm25"
    assert fb["rejected_metrics_by_mode"]["served"]["ndcg@10"] < 1.0
    assert f"served: {fb['served']} (first-run fallback" in result.stderr  # the CLI summary says what serves
    # ...and ends with where the report opens (a local copy) and how to query the index
    report = next(line for line in result.stderr.splitlines() if line.startswith("  report:   file://"))
    page = Path(report.split("file://", 1)[1]).read_text()
    assert "served instead (first-run fallback)" in page and data["run_id"] in page
    assert 'search:   embedpipe search --dataset small "your query"' in result.stderr
    # search answers from it, in the fallback's mode, and finds the document
    found = cli(env, "search", "--dataset", "small", "--json", "which record is " + code(7))
    assert found.returncode == 0, found.stderr[-2000:]
    hits = json.loads(found.stdout)
    assert hits["mode"] == data["default_search_mode"] and hits["collection"] == fb["collection"]
    assert hits["hits"][0]["id"] == "doc7"
