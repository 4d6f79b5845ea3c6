"""embedpipe.retrieval.evaluation: recall@k, MRR@10 and nDCG@10 against hand-computed values, rank fusion, exact
top-k."""

from __future__ import annotations

import math

import numpy as np
import pytest

from embedpipe.retrieval.evaluation import FUSIONS, METRIC_KEYS, TopK, evaluate, fuse, per_query


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


def test_relevant_document_no_ranking_holds_counts_the_trec_eval_way():
    # "ghost" is relevant but no ranking holds it (e.g. a qrels row naming a document the corpus lacks)
    m = evaluate({"q1": ["d1", "x"]}, {"q1": {"d1": 1, "ghost": 1}})
    assert m["recall@1"] == m["recall@100"] == approx(0.5)  # 1 of 2 relevant documents
    assert m["mrr@10"] == approx(1.0)
    # DCG 1 (d1 at rank 1); ideal DCG 1 + 1/log2(3) (both relevant documents at the top)
    assert m["ndcg@10"] == approx(1 / (1 + 1 / math.log2(3)))
    assert m["ndcg@10"] == approx(0.613147)


def test_missing_and_empty_rankings_score_zero_and_are_averaged_in():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}, "q3": {"d3": 1}}
    m = evaluate({"q1": ["d1"], "q2": []}, qrels)  # q2 ranked nothing, q3 has no ranking at all
    assert m == {k: approx(1 / 3) for k in METRIC_KEYS}
    rows = per_query({"q1": ["d1"], "q2": []}, qrels)
    assert set(rows) == {"q1", "q2", "q3"}
    assert rows["q2"] == rows["q3"] == {k: 0.0 for k in METRIC_KEYS}


@pytest.mark.parametrize("ranking,relevant", [(["b", "a"], "a"), (["a", "b"], "b")])
def test_rank_order_counts_not_document_ids(ranking, relevant):
    # trec_eval breaks score ties by document id; the ranking given must be scored as given, in both directions
    m = evaluate({"q1": ranking}, {"q1": {relevant: 1}})
    assert m["recall@1"] == approx(0.0)
    assert m["mrr@10"] == approx(0.5)
    assert m["ndcg@10"] == approx(1 / math.log2(3))


def test_longer_rankings_keep_their_order():
    ids = ["z", "m", "a", "q", "b"]
    for i, doc in enumerate(ids, start=1):
        assert evaluate({"q1": ids}, {"q1": {doc: 1}})["mrr@10"] == approx(1 / i)


def hits(ids: list[str], top: float = 1.0, step: float = 0.1) -> list[tuple[str, float]]:
    return [(d, top - i * step) for i, d in enumerate(ids)]


def order(fused) -> list[str]:
    return [d for d, _ in fused]


@pytest.mark.parametrize("method", FUSIONS)
def test_fuse_weight_one_is_dense_zero_is_sparse(method):
    dense, sparse = hits(["a", "b", "c"]), hits(["c", "d", "a"], 12.0, 3.0)
    assert order(fuse(dense, sparse, 1.0, method)) == ["a", "b", "c"]
    assert order(fuse(dense, sparse, 0.0, method)) == ["c", "d", "a"]


@pytest.mark.parametrize("method", FUSIONS)
def test_fuse_half_merges_and_agreement_wins(method):
    dense, sparse = hits(["a", "b", "c", "d"]), hits(["d", "b", "c", "a"], 20.0, 2.0)
    fused = order(fuse(dense, sparse, 0.5, method))
    assert fused[0] == "b"  # second in both beats first in one and last in the other
    assert sorted(fused) == ["a", "b", "c", "d"]
    # a document only one side found still appears, after those both sides ranked as high
    fused = order(fuse(hits(["x", "shared", "u"]), hits(["shared", "y", "v"]), 0.5, method))
    assert fused[0] == "shared" and set(fused) == {"x", "shared", "y", "u", "v"}


@pytest.mark.parametrize("method", FUSIONS)
def test_fuse_weight_tilts_towards_one_side(method):
    dense, sparse = hits(["a", "b"]), hits(["b", "a"], 9.0, 4.0)
    assert fuse(dense, sparse, 0.8, method)[0][0] == "a"
    assert fuse(dense, sparse, 0.2, method)[0][0] == "b"


def test_convex_fusion_uses_score_gaps_not_just_ranks():
    # dense barely prefers a over b and drops c far behind; BM25 has b, then c close behind, a far behind
    dense = [("a", 0.90), ("b", 0.89), ("c", 0.10)]
    sparse = [("b", 30.0), ("c", 29.0), ("a", 1.0)]
    fused = fuse(dense, sparse, 0.5, "convex")
    assert order(fused) == ["b", "a", "c"]  # c: 0 + 0.5 * 28/29 = 0.483 < a: 0.5 * 1 + 0
    assert order(fuse(dense, sparse, 0.4, "convex")) == ["b", "c", "a"]  # less dense weight: c overtakes a
    # scores: min-max normalised per side, weighted: b = 0.5 * 0.9875 + 0.5 * 1.0
    assert dict(fused)["b"] == approx(0.5 * (0.89 - 0.10) / 0.80 + 0.5)
    with pytest.raises(ValueError, match="fusion must be one of"):
        fuse(dense, sparse, 0.5, "max")


def test_fuse_limit_cuts():
    dense, sparse = hits(["a", "b", "c"]), hits(["d", "e", "f"])
    assert len(fuse(dense, sparse, 0.5)) == 6
    assert fuse(dense, sparse, 0.5, limit=2) == fuse(dense, sparse, 0.5)[:2]
    assert len(fuse(dense, sparse, 0.5, limit=2)) == 2


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize("k", [1, 7, 50])
def test_topk_streamed_in_blocks_equals_a_full_argsort(k):
    rng = np.random.default_rng(0)
    queries = _unit(rng.standard_normal((5, 16)).astype(np.float32))
    docs = _unit(rng.standard_normal((40, 16)).astype(np.float32))
    ids = [f"d{i:02d}" for i in range(len(docs))]
    top = TopK(queries, k)
    for start, stop in ((0, 3), (3, 3), (3, 20), (20, 21), (21, 40)):  # uneven blocks, one empty, one below k
        top.add(ids[start:stop], docs[start:stop])
    ranked = top.ranked(["q0", "q1", "q2", "q3", "q4"])
    full = np.argsort(-(queries @ docs.T), axis=1)[:, : min(k, len(docs))]
    assert ranked == {f"q{i}": [ids[j] for j in full[i]] for i in range(len(queries))}


def test_a_paired_difference_says_whether_it_is_more_than_noise():
    """Issue 26.5: a retrain was promoted on 0.9338 vs 0.9336 with no sense of noise."""
    from embedpipe.retrieval.evaluation import paired

    old = {f"q{i}": {"ndcg@10": 0.5 + 0.01 * (i % 7)} for i in range(60)}
    tiny = {q: {"ndcg@10": v["ndcg@10"] + (0.02 if i % 2 else -0.019)} for i, (q, v) in enumerate(old.items())}
    clear = {q: {"ndcg@10": v["ndcg@10"] + 0.05 + 0.01 * (i % 3)} for i, (q, v) in enumerate(old.items())}
    noise = paired(tiny, old, "ndcg@10")
    assert noise["delta"] == pytest.approx(0.0005) and noise["p"] > 0.5 and not noise["significant"]
    gain = paired(clear, old, "ndcg@10")
    assert gain["delta"] == pytest.approx(0.06) and gain["p"] < 0.001 and gain["significant"] and gain["queries"] == 60
    same = paired(old, old, "ndcg@10")
    assert (same["delta"], same["p"], same["significant"]) == (0.0, 1.0, False)
    only = paired({"q1": {"ndcg@10": 1.0}, "x": {"ndcg@10": 0.0}}, {"q1": {"ndcg@10": 0.0}}, "ndcg@10")
    assert only["queries"] == 1 and only["p"] == 1.0  # paired over the queries both scored
    two = paired(
        {"a": {"ndcg@10": 1.0}, "b": {"ndcg@10": 1.0}}, {"a": {"ndcg@10": 0.0}, "b": {"ndcg@10": 0.0}}, "ndcg@10"
    )
    assert two["p"] == 0.0 and not two["significant"], "two queries are never a significant gain"
