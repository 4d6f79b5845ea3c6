"""Retrieval metrics from ranked ids and BEIR qrels: a flat dict with stable keys.

The same dict feeds the gate, the index-updated event and the report. Definitions (per query, then averaged over
queries that have at least one relevant document):

- ``recall@k``: relevant documents in the top k / all relevant documents (relevant = score > 0)
- ``mrr@10``: 1 / rank of the first relevant document within the top 10, else 0
- ``ndcg@10``: DCG with graded gains ``score`` and ``1/log2(rank+1)`` discounts, over the ideal DCG
"""

from __future__ import annotations

import math

KS = (1, 5, 10, 100)
METRIC_KEYS = tuple(f"recall@{k}" for k in KS) + ("mrr@10", "ndcg@10")


def evaluate(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    totals = dict.fromkeys(METRIC_KEYS, 0.0)
    n = 0
    for qid, rels in qrels.items():
        relevant = {d: s for d, s in rels.items() if s > 0}
        if not relevant:
            continue
        n += 1
        hits = ranked.get(qid, [])
        for k in KS:
            totals[f"recall@{k}"] += len(set(hits[:k]) & relevant.keys()) / len(relevant)
        rr = next((1.0 / (i + 1) for i, d in enumerate(hits[:10]) if d in relevant), 0.0)
        totals["mrr@10"] += rr
        dcg = sum(relevant.get(d, 0) / math.log2(i + 2) for i, d in enumerate(hits[:10]))
        ideal = sum(s / math.log2(i + 2) for i, s in enumerate(sorted(relevant.values(), reverse=True)[:10]))
        totals["ndcg@10"] += dcg / ideal if ideal else 0.0
    if n == 0:
        return {}
    return {k: round(v / n, 6) for k, v in totals.items()}
