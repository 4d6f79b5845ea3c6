"""embedpipe.indexing.decide: the promotion gate in both directions, with tolerance."""

from __future__ import annotations

from embedpipe.indexing import decide, score


def m(r10: float) -> dict:
    return {"recall@10": r10, "mrr@10": 0.1}


def test_first_index_is_promoted():
    assert decide(m(0.1), None, "recall@10", 0.0, had_previous=False) == (True, "first index for this dataset")


def test_better_or_equal_is_promoted_worse_is_rejected():
    assert decide(m(0.80), m(0.70), "recall@10", 0.0, True)[0] is True
    assert decide(m(0.70), m(0.70), "recall@10", 0.0, True)[0] is True
    ok, reason = decide(m(0.69), m(0.70), "recall@10", 0.0, True)
    assert ok is False and "rejected" in reason and "0.6900 vs 0.7000" in reason


def test_tolerance_and_metric_are_configurable():
    assert decide(m(0.69), m(0.70), "recall@10", 0.02, True)[0] is True
    assert decide(m(0.67), m(0.70), "recall@10", 0.02, True)[0] is False
    assert decide({"mrr@10": 0.5}, {"mrr@10": 0.6}, "mrr@10", 0.0, True)[0] is False


def test_score_picks_the_better_mode_on_the_gate_metric():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}
    ranked = {"dense": {"q1": ["d1"], "q2": ["x"]}, "hybrid": {"q1": ["d1"], "q2": ["d2"]}}
    out = score(ranked, qrels, "recall@10")
    assert out["default_mode"] == "hybrid" and out["metrics"]["recall@10"] == 1.0
    assert out["by_mode"]["dense"]["recall@10"] == 0.5
