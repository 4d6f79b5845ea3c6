"""embedpipe.indexing.decide and score: the promotion gate against the live index and the baselines (BM25 alone,
the untuned base model), in both directions, with tolerance; served = the mode chosen at training time."""

from __future__ import annotations

from embedpipe.indexing import decide, score

METRICS = ("ndcg@10", "recall@10")


def m(r10: float, ndcg: float | None = None) -> dict:
    return {"recall@10": r10, "ndcg@10": r10 if ndcg is None else ndcg, "mrr@10": 0.1}


def modes(served: dict, bm25: dict | None = None, base: dict | None = None) -> dict:
    out = {"served": served, "dense": served}
    if bm25:
        out["bm25"] = bm25
    if base:
        out["base"] = base
    return out


def test_first_index_is_gated_against_the_baselines():
    ok, reason = decide(modes(m(0.5), m(0.4), m(0.45)), None, METRICS, 0.0, had_previous=False)
    assert ok is True and reason.startswith("first index for this dataset; promoted")
    ok, reason = decide(modes(m(0.4), m(0.5), m(0.3)), None, METRICS, 0.0, had_previous=False)
    assert ok is False and "vs bm25 0.5000" in reason
    ok, reason = decide(modes(m(0.5, ndcg=0.3), m(0.4), m(0.45, ndcg=0.31)), None, METRICS, 0.0, False)
    assert ok is False and "ndcg@10 0.3000 vs base 0.3100" in reason  # every gate metric counts


def test_better_or_equal_than_the_live_index_is_promoted_worse_is_rejected():
    assert decide(modes(m(0.80)), m(0.70), METRICS, 0.0, True)[0] is True
    assert decide(modes(m(0.70)), m(0.70), METRICS, 0.0, True)[0] is True
    ok, reason = decide(modes(m(0.69)), m(0.70), METRICS, 0.0, True)
    assert ok is False and "rejected" in reason and "0.6900 vs live index 0.7000" in reason


def test_tolerance_and_metrics_are_configurable():
    assert decide(modes(m(0.69)), m(0.70), ("recall@10",), 0.02, True)[0] is True
    assert decide(modes(m(0.67)), m(0.70), ("recall@10",), 0.02, True)[0] is False
    assert decide({"served": {"mrr@10": 0.5}}, {"mrr@10": 0.6}, ("mrr@10",), 0.0, True)[0] is False


def test_no_qrels_promotes_unmeasured():
    assert decide({}, None, METRICS, 0.0, False) == (True, "no eval qrels: promoted unmeasured")


def test_served_is_the_mode_chosen_at_training_not_the_best_on_test():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}
    ranked = {"dense": {"q1": ["d1"], "q2": ["x"]}, "hybrid": {"q1": ["d1"], "q2": ["d2"]}}
    out = score(ranked, qrels, "dense")
    assert out["default_mode"] == "dense" and out["by_mode"]["served"] == out["by_mode"]["dense"]
    assert out["metrics"]["recall@10"] == 0.5 and out["by_mode"]["hybrid"]["recall@10"] == 1.0
    # a mode the collection cannot answer (an old collection without BM25) falls back to dense
    assert score({"dense": ranked["dense"]}, qrels, "hybrid")["default_mode"] == "dense"
