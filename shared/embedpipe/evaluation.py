"""Retrieval metrics from ranked ids and BEIR qrels (a flat dict with stable keys), fusion, and exact top-k.

The same dict feeds selection, the gate, the index-updated event and the report. Metrics come from trec_eval
(``pytrec_eval``), averaged over the queries that have at least one relevant document:

- ``recall@k`` (trec_eval ``recall_k``): relevant documents in the top k / all relevant documents
- ``mrr@10``: trec_eval ``recip_rank`` of the ranking cut at 10
- ``ndcg@10`` (trec_eval ``ndcg_cut_10``): graded gains, ``1/log2(rank+1)`` discounts, over the ideal DCG

A qrels row naming a document the corpus does not have stays a relevant document that no ranking holds (the trec_eval
way): it counts in recall's denominator and in the ideal DCG. Rankings are scored in the order given (the scores
handed to trec_eval are derived from rank, so its tie-breaking by document id never reorders them).
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10, 100)
METRIC_KEYS = tuple(f"recall@{k}" for k in KS) + ("mrr@10", "ndcg@10")
RRF_K = 60  # the usual reciprocal-rank constant (Cormack et al.); the dense/BM25 weight is chosen per dataset


def _run(ranked: dict[str, list[str]], qids, cut: int | None = None) -> dict[str, dict[str, float]]:
    out = {}
    for q in qids:
        hits = list(dict.fromkeys(ranked.get(q) or []))[:cut]
        out[q] = {d: float(len(hits) - i) for i, d in enumerate(hits)}
    return out


def per_query(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """Metrics of each query that has a relevant document (queries with an empty ranking score 0)."""
    import pytrec_eval

    judged = {q: {d: int(s) for d, s in rels.items()} for q, rels in qrels.items() if any(s > 0 for s in rels.values())}
    if not judged:
        return {}
    measures = {"recall." + ",".join(map(str, KS)), "ndcg_cut.10"}
    full = pytrec_eval.RelevanceEvaluator(judged, measures).evaluate(_run(ranked, judged))
    top10 = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"}).evaluate(_run(ranked, judged, 10))
    out = {}
    for q in judged:
        m, r = full.get(q, {}), top10.get(q, {})
        row = {f"recall@{k}": m.get(f"recall_{k}", 0.0) for k in KS}
        row["mrr@10"] = r.get("recip_rank", 0.0)
        row["ndcg@10"] = m.get("ndcg_cut_10", 0.0)
        out[q] = row
    return out


def evaluate(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    rows = per_query(ranked, qrels)
    if not rows:
        return {}
    return {k: round(float(np.mean([r[k] for r in rows.values()])), 6) for k in METRIC_KEYS}


def fuse(dense: list[str], sparse: list[str], weight: float, k: int = RRF_K, limit: int | None = None) -> list[str]:
    """Weighted reciprocal-rank fusion of two rankings: ``weight`` on dense, ``1 - weight`` on BM25. Weight 1 is the
    dense ranking itself, 0 the BM25 one."""
    scores: dict[str, float] = {}
    for w, ranking in ((weight, dense), (1.0 - weight, sparse)):
        if w <= 0:
            continue
        for rank, doc in enumerate(ranking, start=1):
            scores[doc] = scores.get(doc, 0.0) + w / (k + rank)
    order = sorted(scores, key=lambda d: -scores[d])
    return order[:limit] if limit else order


class TopK:
    """Exact cosine top-k for a fixed set of query vectors over documents streamed in blocks: memory is
    O(queries x (k + block)), never queries x corpus."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries = np.asarray(queries, dtype=np.float32)
        self.k = k
        self.scores = np.full((len(self.queries), 0), -np.inf, dtype=np.float32)
        self.ids = np.empty((len(self.queries), 0), dtype=object)

    def add(self, ids: list[str], vectors: np.ndarray) -> None:
        if not len(ids):
            return
        block = self.queries @ np.asarray(vectors, dtype=np.float32).T
        scores = np.concatenate([self.scores, block], axis=1)
        ids = np.concatenate([self.ids, np.broadcast_to(np.array(ids, dtype=object), block.shape)], axis=1)
        keep = min(self.k, scores.shape[1])
        part = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        self.scores = np.take_along_axis(scores, part, axis=1)
        self.ids = np.take_along_axis(ids, part, axis=1)

    def ranked(self, qids: list[str]) -> dict[str, list[str]]:
        order = np.argsort(-self.scores, axis=1, kind="stable")
        return {q: list(self.ids[i, order[i]]) for i, q in enumerate(qids)}
