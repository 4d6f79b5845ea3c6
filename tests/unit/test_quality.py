"""``make quality``'s own parts without a stack: locating the data, judged queries, the table. (Asking the search
service for its default mode over HTTP: tests/integration/test_quality.py; scoring is
``embedpipe.retrieval.evaluation``, tested in test_evaluation.py.)"""

from __future__ import annotations

import json

import pytest

from embedpipe.retrieval.evaluation import METRIC_KEYS
from quality import run


def test_load_judged_keeps_queries_with_a_relevant_document(tmp_path):
    (tmp_path / "qrels").mkdir()
    (tmp_path / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\td1\t1\n1\td2\t0\n2\td3\t0\n")
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "1", "text": "what"}) + "\n\n")
    judged, texts = run.load_judged(tmp_path)
    assert judged == {"1": {"d1": 1, "d2": 0}} and texts == {"1": "what"}


def test_locate_says_which_env_var_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDPIPE_QUALITY_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(run.QualityError, match="EMBEDPIPE_QUALITY_DATA"):
        run.locate()
    (tmp_path / "MyData" / "qrels").mkdir(parents=True)
    for f in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        (tmp_path / "MyData" / f).write_text("x\n")
    monkeypatch.setenv("EMBEDPIPE_QUALITY_DATA", str(tmp_path / "MyData"))
    assert run.locate() == (tmp_path / "MyData", "mydata")
    monkeypatch.setenv("EMBEDPIPE_QUALITY_DATASET", "other")
    assert run.locate()[1] == "other"


def test_table_shows_missing_modes_as_dash():
    m = dict.fromkeys(METRIC_KEYS, 0.5)
    text = run.table({"metrics_by_mode": {"dense": m, "hybrid": {"recall@10": 0.25}}, "served_via_search_service": m})
    rows = {line[:28].strip(): line[28:].split() for line in text.splitlines()[2:]}
    assert rows["dense"] == ["0.500"] * 4 and rows["served (via search service)"] == ["0.500"] * 4
    assert rows["hybrid"] == ["0.250", "-", "-", "-"] and rows["bm25"] == ["-"] * 4 and rows["served"] == ["-"] * 4
