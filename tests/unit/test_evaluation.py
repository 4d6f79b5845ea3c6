"""embedpipe.evaluation: recall@k, MRR@10 and nDCG@10 against hand-computed values."""

from __future__ import annotations

import math

import pytest

from embedpipe.evaluation import METRIC_KEYS, evaluate


def approx(value: float) -> object:
    return pytest.approx(value, abs=1e-6)  # evaluate() rounds to 6 decimals


def test_metric_keys():
    assert METRIC_KEYS == ("recall@1", "recall@5", "recall@10", "recall@100", "mrr@10", "ndcg@10")


def test_hand_computed_metrics_with_graded_gains():
    qrels = {
        "q1": {"d1": 1},  # one relevant doc, found at rank 2
        "q2": {"d2": 2, "d3": 1},  # graded: d2 is the better answer, but d3 comes first and d2 third
        "q3": {"d9": 0},  # no relevant document: skipped, does not dilute the averages
    }
    ranked = {"q1": ["d5", "d1", "d7"], "q2": ["d3", "x", "d2"], "q3": ["d9"]}
    m = evaluate(ranked, qrels)
    assert set(m) == set(METRIC_KEYS)
    # recall@1: q1 0/1, q2 1/2 -> 0.25; from @5 on both queries have everything
    assert m["recall@1"] == approx(0.25)
    assert m["recall@5"] == m["recall@10"] == m["recall@100"] == approx(1.0)
    # mrr@10: q1 1/2, q2 1/1
    assert m["mrr@10"] == approx(0.75)
    # ndcg@10: q1 (1/log2 3) / 1; q2 (1/log2 2 + 2/log2 4) / (2/log2 2 + 1/log2 3) = 2 / (2 + 1/log2 3)
    q1 = 1 / math.log2(3)
    q2 = 2 / (2 + 1 / math.log2(3))
    assert m["ndcg@10"] == approx((q1 + q2) / 2)
    assert m["ndcg@10"] == approx(0.695559)


def test_cutoffs():
    ranked = {"q1": [f"x{i}" for i in range(10)] + ["d1"] + [f"y{i}" for i in range(100)] + ["d2"]}
    m = evaluate(ranked, {"q1": {"d1": 1, "d2": 1}})
    # d1 at rank 11, d2 at rank 112: outside every window except recall@100 (for d1)
    assert m == {"recall@1": 0.0, "recall@5": 0.0, "recall@10": 0.0, "recall@100": 0.5, "mrr@10": 0.0, "ndcg@10": 0.0}


def test_perfect_ranking_scores_one():
    qrels = {"q1": {"a": 3, "b": 2, "c": 1}}
    m = evaluate({"q1": ["a", "b", "c"]}, qrels)
    assert m["ndcg@10"] == approx(1.0) and m["mrr@10"] == approx(1.0) and m["recall@5"] == approx(1.0)
    assert m["recall@1"] == approx(1 / 3)
    # the same documents in reverse order lose on nDCG only
    rev = evaluate({"q1": ["c", "b", "a"]}, qrels)
    ideal = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    assert rev["ndcg@10"] == approx((1 + 2 / math.log2(3) + 3 / math.log2(4)) / ideal)
    assert rev["recall@5"] == approx(1.0) and rev["mrr@10"] == approx(1.0)


def test_query_without_results_counts_as_zero():
    m = evaluate({"q1": ["d1"]}, {"q1": {"d1": 1}, "q2": {"d2": 1}})
    assert m["recall@10"] == approx(0.5) and m["mrr@10"] == approx(0.5) and m["ndcg@10"] == approx(0.5)


def test_ranked_queries_without_qrels_are_ignored():
    assert evaluate({"q1": ["d1"], "extra": ["zzz"]}, {"q1": {"d1": 1}})["recall@1"] == approx(1.0)


@pytest.mark.parametrize("qrels", [{}, {"q1": {"d1": 0}}, {"q1": {}}], ids=["empty", "zero-scores", "no-docs"])
def test_no_judged_queries_gives_an_empty_dict(qrels):
    assert evaluate({"q1": ["d1"]}, qrels) == {}
