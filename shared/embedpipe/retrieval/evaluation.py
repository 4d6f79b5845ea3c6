"""Retrieval metrics from ranked ids and BEIR qrels (a flat dict with stable keys), hybrid fusion, and exact top-k.

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

KS = (1, 5, 10, 100)
METRIC_KEYS = tuple(f"recall@{k}" for k in KS) + ("mrr@10", "ndcg@10")
RRF_K = 60  # the usual reciprocal-rank constant (Cormack et al.); the dense/BM25 weight is chosen per dataset
# How dense and BM25 hits are combined; the family and its weight are chosen per dataset on the selection split.
# convex: weight x min-max-normalised dense score + (1 - weight) x normalised BM25 score, over each side's
# candidates (a side that did not return a document adds 0); rrf: weighted reciprocal rank.
FUSIONS = ("convex", "rrf")


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
    return averaged(per_query(ranked, qrels))


def averaged(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    """The mean of ``per_query``'s rows ({} without any)."""
    if not rows:
        return {}
    return {k: round(sum(r[k] for r in rows.values()) / len(rows), 6) for k in METRIC_KEYS}


SIGNIFICANCE_ALPHA = 0.05  # a difference whose p-value is at least this is "within noise"
SIGNIFICANCE_MIN_QUERIES = 10  # fewer paired queries are never called significant, whatever the p-value


def paired(new: dict[str, dict[str, float]], old: dict[str, dict[str, float]], metric: str) -> dict:
    """How ``new`` differs from ``old`` on ``metric`` (``per_query`` rows of two rankings of the same queries): the
    mean difference over the queries both scored and a two-sided paired t-test's p-value (the "student" test of
    ranx and of IR papers), ``significant`` below ``SIGNIFICANCE_ALPHA`` (as reported, rounded) with at least
    ``SIGNIFICANCE_MIN_QUERIES`` queries. Identical scores, or fewer than two queries, are p = 1 (nothing to tell
    apart); every query moved by the same amount is p = 0."""
    import math

    from scipy import stats

    qs = sorted(set(new) & set(old))
    a, b = [new[q][metric] for q in qs], [old[q][metric] for q in qs]
    delta = (sum(a) - sum(b)) / len(qs) if qs else 0.0
    diffs = {round(x - y, 12) for x, y in zip(a, b)}
    p = 1.0
    if len(qs) > 1 and diffs != {0.0}:
        # every query moved by the same amount: no variance for the test, and no doubt either
        p = 0.0 if len(diffs) == 1 else float(stats.ttest_rel(a, b).pvalue)
        p = 1.0 if math.isnan(p) else p
    return {
        "metric": metric,
        "delta": round(delta, 6),
        "p": round(p, 4),
        "queries": len(qs),
        "significant": round(p, 4) < SIGNIFICANCE_ALPHA and len(qs) >= SIGNIFICANCE_MIN_QUERIES,
    }


Hits = list[tuple[str, float]]  # (id, score), best first


def _normalised(hits: Hits) -> dict[str, float]:
    """Scores mapped to [0, 1], 1 for the best hit. Hits come best first; the scale is oriented by that order, so a
    backend that reports "distances" (lower is better, e.g. negated BM25 scores) normalises the same way."""
    if not hits:
        return {}
    sign = 1.0 if hits[0][1] >= hits[-1][1] else -1.0
    scores = [sign * s for _, s in hits]
    lo, hi = min(scores), max(scores)
    return {d: (sign * s - lo) / (hi - lo) if hi > lo else 1.0 for d, s in hits}


def fuse(
    dense: Hits, sparse: Hits, weight: float, method: str = "rrf", k: int = RRF_K, limit: int | None = None
) -> Hits:
    """One query's hybrid ranking from its dense and BM25 hits: ``weight`` on dense, ``1 - weight`` on BM25 (weight
    1 is the dense ranking, 0 the BM25 one), combined by ``method`` (``FUSIONS``). Returns (id, fused score)."""
    if method not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, not {method!r}")
    scores: dict[str, float] = {}
    for w, hits in ((weight, dense), (1.0 - weight, sparse)):
        if w <= 0:
            continue
        if method == "rrf":
            parts = {d: 1.0 / (k + rank) for rank, (d, _) in enumerate(hits, start=1)}
        else:
            parts = _normalised(hits)
        for d, v in parts.items():
            scores[d] = scores.get(d, 0.0) + w * v
    order = sorted(scores, key=lambda d: -scores[d])
    return [(d, scores[d]) for d in (order[:limit] if limit else order)]


def ids(hits: dict[str, Hits]) -> dict[str, list[str]]:
    return {q: [d for d, _ in h] for q, h in hits.items()}


class TopK:
    """Exact cosine top-k for a fixed set of query vectors over documents streamed in blocks: memory is
    O(queries x (k + block)), never queries x corpus. Candidates are kept as int positions in the stream (numeric
    arrays are cheap to merge; object arrays of id strings cost more than the scoring at a million documents), and
    only the ids of positions some query still keeps are remembered."""

    def __init__(self, queries, k: int):
        import numpy as np

        self.queries = np.asarray(queries, dtype=np.float32)
        self.k = k
        self.scores = np.full((len(self.queries), 0), -np.inf, dtype=np.float32)
        self.pos = np.empty((len(self.queries), 0), dtype=np.int64)
        self.names: dict[int, str] = {}
        self.seen = 0

    def add(self, ids: list[str], vectors) -> None:
        import numpy as np

        if not len(ids):
            return
        block = self.queries @ np.asarray(vectors, dtype=np.float32).T
        scores = np.concatenate([self.scores, block], axis=1)
        first = self.seen
        pos = np.concatenate([self.pos, np.broadcast_to(np.arange(first, first + len(ids)), block.shape)], axis=1)
        self.seen += len(ids)
        keep = min(self.k, scores.shape[1])
        part = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        self.scores = np.take_along_axis(scores, part, axis=1)
        self.pos = np.take_along_axis(pos, part, axis=1)
        fresh = np.unique(self.pos[self.pos >= first])
        self.names.update((int(p), ids[int(p) - first]) for p in fresh)
        if len(self.names) > 2 * self.pos.size:  # forget ids no query keeps any more (now and then: it costs)
            self.names = {int(p): self.names[int(p)] for p in np.unique(self.pos)}

    def hits(self, qids: list[str]) -> dict[str, Hits]:
        import numpy as np

        order = np.argsort(-self.scores, axis=1, kind="stable")
        return {
            q: [
                (self.names[int(self.pos[i, j])], float(self.scores[i, j]))
                for j in order[i]
                if np.isfinite(self.scores[i, j])
            ]
            for i, q in enumerate(qids)
        }

    def ranked(self, qids: list[str]) -> dict[str, list[str]]:
        return ids(self.hits(qids))
