"""Selection: every choice the pipeline makes for a dataset, made on that dataset's non-test data (DESIGN.md §3.1).

The selection split is ``qrels/dev.tsv`` when the dataset has one (its queries against the whole corpus), else a
held-out slice of the training pairs posed as a small retrieval task: each held-out anchor is a query whose relevant
documents are its positives, searched among the positives of all pairs. Held-out pairs are never trained on. A
collection too small for a hold-out (fewer than ``HELDOUT_MIN / HELDOUT_SHARE`` anchors) is cross-validated instead
(``cross_validate``: ``KFOLDS`` folds of anchors, each scored by a model trained on the others, the scores pooled); one
too small even for that (fewer than ``KFOLD_MIN`` anchors) has nothing to check a fine-tune with, so the base model
ships untrained (``trainer choose_model``). On it
the trainer picks the epoch to keep, whether the fine-tune beats the base model at all, and how search answers by
default: dense, BM25, or the two fused (``evaluation.FUSIONS``: a convex combination of normalised scores, or
weighted reciprocal rank) with the family and weight that score best. Test queries and test qrels never reach this
module (the trainer does not even open ``qrels/test.tsv``).
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass

from embedpipe.retrieval import evaluation
from embedpipe.retrieval.lexical import BM25Index
from embedpipe.retrieval.vectorstore import DEPTH, MODES  # the same candidate depth and modes as serving

log = logging.getLogger(__name__)

METRIC = "ndcg@10"  # what every choice maximises: BEIR's headline metric
HELDOUT_SHARE = 0.1
HELDOUT_MIN, HELDOUT_MAX = 20, 1000  # queries; fewer anchors than HELDOUT_MIN / HELDOUT_SHARE: no hold-out
KFOLDS = 5  # below the hold-out's minimum: cross-validation over this many folds of anchors (cheap at that size)
KFOLD_MIN = 10  # anchors: two held-out queries a fold at least; fewer and nothing can be checked
MAX_DOCS = 20_000  # selection corpus cap: the relevant documents plus a seeded sample of the others
WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))  # dense weight; 0 = BM25 alone, 1 = dense alone
# hybrid settings where nothing could be chosen (no selection split): an even RRF, the common default
UNCHOSEN = {"fusion": "rrf", "hybrid_weight": 0.5, "rrf_k": evaluation.RRF_K}


@dataclass
class Task:
    split: str  # "dev" | "heldout_queries" (of qrels/train) | "heldout" (pairs) | "kfold"
    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]

    def describe(self) -> dict:
        return {"split": self.split, "queries": len(self.queries), "documents": len(self.corpus), "metric": METRIC}


def _key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\0{text}".encode()).hexdigest()


def split_pairs(pairs: list, seed: int) -> tuple[list, list]:
    """(train, held-out): whole anchors held out (an anchor with several positives stays on one side), chosen by a
    seeded hash so the split is the same on every rank and every retry."""
    anchors = sorted({p[0] for p in pairs}, key=lambda a: _key(seed, a))
    n = min(HELDOUT_MAX, int(len(anchors) * HELDOUT_SHARE))
    if n < HELDOUT_MIN:
        return pairs, []
    held = set(anchors[:n])
    return [p for p in pairs if p[0] not in held], [p for p in pairs if p[0] in held]


def _capped(corpus: dict[str, str], keep: set[str], seed: int) -> dict[str, str]:
    if len(corpus) <= MAX_DOCS:
        return corpus
    others = sorted(set(corpus) - keep)
    random.Random(seed).shuffle(others)
    chosen = keep | set(others[: max(0, MAX_DOCS - len(keep))])
    return {d: corpus[d] for d in sorted(chosen)}


def task_for(ds, pairs: list, seed: int = 42) -> tuple[list, Task | None]:
    """(training pairs, selection task or None). Uses ``qrels/dev.tsv`` when present, else holds pairs out."""
    dev = {q: r for q, r in (ds.qrels.get("dev") or {}).items() if q in ds.queries and any(s > 0 for s in r.values())}
    if dev:
        keep = {d for r in dev.values() for d in r} & ds.corpus.keys()  # rows naming absent documents stay in qrels
        corpus = _capped({i: doc.full_text for i, doc in ds.corpus.items()}, keep, seed)
        return pairs, Task("dev", {q: ds.queries[q] for q in dev}, corpus, dev)
    supervised = _heldout_queries(ds, pairs, seed)
    if supervised:
        return supervised
    train, held = split_pairs(pairs, seed)
    if not held:
        log.warning(
            "%d training pairs: too few to hold any out (k-fold selection, if there are enough for it)", len(pairs)
        )
        return pairs, None
    return train, pairs_task("heldout", pairs, held, seed)


def _heldout_queries(ds, pairs: list, seed: int) -> tuple[list, Task] | None:
    """Where the pairs are ``qrels/train.tsv``'s (no ``pairs/``, no dev split): a seeded share of the training
    queries held out and searched against the whole corpus with their own graded judgements, so selection scores
    real queries the way the test split will (not the positives-only corpus of ``pairs_task``). None when there are
    too few queries to hold out (``split_pairs`` and k-fold then work on the pairs as usual)."""
    if ds.pairs:
        return None
    train = {
        q: r for q, r in (ds.qrels.get("train") or {}).items() if q in ds.queries and any(s > 0 for s in r.values())
    }
    qids = sorted(train, key=lambda q: _key(seed, q))
    n = min(HELDOUT_MAX, int(len(qids) * HELDOUT_SHARE))
    if n < HELDOUT_MIN:
        return None
    held = set(qids[:n])
    texts = {ds.queries[q] for q in held}  # a query text repeated under another id is held out too
    keep = {d for q in held for d in train[q]} & ds.corpus.keys()
    corpus = _capped({i: doc.full_text for i, doc in ds.corpus.items()}, keep, seed)
    task = Task("heldout_queries", {q: ds.queries[q] for q in sorted(held)}, corpus, {q: train[q] for q in held})
    return [p for p in pairs if p[0] not in texts], task


def pairs_task(split: str, pairs: list, held: list, seed: int) -> Task:
    """``held``'s anchors as queries, their positives as the relevant documents, among the positives of all
    ``pairs`` (ids ``p<n>`` in the order of ``pairs``, so every fold of one collection shares one corpus)."""
    ids: dict[str, str] = {}
    for p in pairs:
        ids.setdefault(p[1], f"p{len(ids)}")
    queries, qrels = {}, {}
    for a, pos, _ in held:
        q = queries.setdefault(a, f"q{len(queries)}")
        qrels.setdefault(q, {})[ids[pos]] = 1
    corpus = _capped({i: text for text, i in ids.items()}, {d for r in qrels.values() for d in r}, seed)
    return Task(split, {i: a for a, i in queries.items()}, corpus, qrels)


def folds(pairs: list, seed: int) -> list[tuple[list, set]]:
    """(training pairs, held-out anchors) of each of ``KFOLDS`` folds: whole anchors dealt round-robin in the
    seeded hash order of ``split_pairs``; empty below ``KFOLD_MIN`` anchors."""
    anchors = sorted({p[0] for p in pairs}, key=lambda a: _key(seed, a))
    if len(anchors) < KFOLD_MIN:
        return []
    out = []
    for f in range(KFOLDS):
        held = set(anchors[f::KFOLDS])
        out.append(([p for p in pairs if p[0] not in held], held))
    return out


@dataclass
class CrossValidation:
    """What ``cross_validate`` measured: every anchor a query once (``task``, split ``kfold``), ranked by the base
    model and, for each epoch, by the fold model that did not train on it."""

    task: Task
    base: dict  # query -> base model hits
    by_epoch: dict[int, dict]  # epoch -> query -> hits of the fold models after that many epochs
    scores: dict[int, float]  # epoch -> pooled METRIC
    base_score: float
    epochs: int  # the best epoch count (the fewest among ties): what the final model trains for
    folds: int

    @property
    def tuned_score(self) -> float:
        return self.scores[self.epochs]

    def history(self) -> list[dict]:
        return [{"epoch": e, "score": round(s, 6)} for e, s in sorted(self.scores.items())]


def cross_validate(
    fresh_model, train, pairs: list, params, seed: int, query_prefix: str = "", document_prefix: str = ""
) -> CrossValidation | None:
    """K-fold selection for collections too small for a hold-out (None below ``KFOLD_MIN`` anchors). Each fold
    trains a fresh copy of the base model (``fresh_model()``) with ``train`` (``training.train``: passed in, since
    training imports this module) on the other folds' pairs for every epoch (no early
    stop: epochs are compared across folds) and ranks its own anchors after each epoch; the rankings of all folds
    are pooled, so each score is over every anchor, each ranked by a model that never saw it. Costs ``KFOLDS``
    trainings on a collection of at most a few hundred anchors."""
    import dataclasses as dc

    split = folds(pairs, seed)
    if not split:
        return None
    task = pairs_task("kfold", pairs, pairs, seed)
    qid = {a: q for q, a in task.queries.items()}
    base = dense_hits(fresh_model(), task, query_prefix, document_prefix)
    by_epoch: dict[int, dict] = {}
    fold_params = dc.replace(params, patience=0)
    reached = []
    for n, (train_pairs, held) in enumerate(split, 1):
        qs = {qid[a] for a in held}
        sub = Task("kfold", {q: task.queries[q] for q in qs}, task.corpus, {q: task.qrels[q] for q in qs})
        seen: list[dict] = []

        def select(model, sub=sub, seen=seen) -> float:
            hits = dense_hits(model, sub, query_prefix, document_prefix)
            seen.append(hits)
            return evaluation.evaluate(evaluation.ids(hits), sub.qrels).get(METRIC, 0.0)

        train(fresh_model(), train_pairs, fold_params, select=select)
        for epoch, hits in enumerate(seen, 1):
            by_epoch.setdefault(epoch, {}).update(hits)
        reached.append(len(seen))
        log.info(
            "kfold: fold %d/%d trained on %d pairs, scored on %d anchors", n, len(split), len(train_pairs), len(qs)
        )
    common = min(reached)  # a max_steps cap can end a larger fold's training an epoch earlier
    base_score = evaluation.evaluate(evaluation.ids(base), task.qrels).get(METRIC, 0.0)
    scores = {
        e: evaluation.evaluate(evaluation.ids(by_epoch[e]), task.qrels).get(METRIC, 0.0) for e in range(1, common + 1)
    }
    if not scores:  # no epoch trained (epochs=0): zero epochs is the untuned model
        scores, by_epoch = {0: base_score}, {0: base}
    best = max(scores, key=lambda e: (scores[e], -e))
    log.info("kfold selection: base %.4f, fine-tune by epoch %s", base_score, scores)
    return CrossValidation(task, base, by_epoch, scores, base_score, best, len(split))


def dense_hits(model, task: Task, query_prefix: str = "", document_prefix: str = "", k: int = DEPTH) -> dict:
    """Exact cosine top-``k`` (id, score) per query, the corpus embedded and searched block by block."""
    from embedpipe.ml.embedding import encode

    doc_ids = list(task.corpus)
    qids = list(task.queries)
    top = evaluation.TopK(encode(model, [task.queries[q] for q in qids], prefix=query_prefix), k)
    for start in range(0, len(doc_ids), 4096):
        block = doc_ids[start : start + 4096]
        top.add(block, encode(model, [task.corpus[d] for d in block], prefix=document_prefix))
    return top.hits(qids)


def metric_of(task: Task, hits: dict) -> float:
    """``METRIC`` of rankings (query -> [(id, score)]) on the task."""
    return evaluation.evaluate(evaluation.ids(hits), task.qrels).get(METRIC, 0.0)


def bm25_hits(task: Task, k: int = DEPTH) -> dict:
    qids = list(task.queries)
    index = BM25Index(list(task.corpus), list(task.corpus.values()))
    return dict(zip(qids, index.search([task.queries[q] for q in qids], k)))


def _fused(task: Task, dense: dict, bm25: dict, weight: float, method: str) -> dict[str, list[str]]:
    return {
        q: [d for d, _ in evaluation.fuse(dense.get(q, []), bm25.get(q, []), weight, method, limit=DEPTH)]
        for q in task.queries
    }


def choose_search(task: Task, dense: dict, bm25: dict) -> dict:
    """The default search mode, fusion family and hybrid weight, from the selection split (dense and BM25 hits with
    scores). Each (family, weight) is judged by the mean of its score and its neighbours' (a single lucky weight on
    a small split does not win); the hybrid is the best of those strictly between 0 and 1, and the mode the best of
    dense (weight 1), BM25 (weight 0) and that hybrid (a tie goes to hybrid, then to the simpler mode)."""
    raw: dict[str, dict[float, float]] = {}
    for method in evaluation.FUSIONS:
        raw[method] = {}
        for w in WEIGHTS:
            raw[method][w] = evaluation.evaluate(_fused(task, dense, bm25, w, method), task.qrels).get(METRIC, 0.0)

    def smooth(method: str, i: int) -> float:
        near = [raw[method][WEIGHTS[j]] for j in (i - 1, i, i + 1) if 0 <= j < len(WEIGHTS)]
        return sum(near) / len(near)

    inner = [(m, i) for m in evaluation.FUSIONS for i, w in enumerate(WEIGHTS) if 0 < w < 1]
    method, i = max(inner, key=lambda mi: (smooth(*mi), -abs(WEIGHTS[mi[1]] - 0.5)))
    weight = WEIGHTS[i]
    first = evaluation.FUSIONS[0]
    candidates = {"dense": raw[first][1.0], "bm25": raw[first][0.0], "hybrid": raw[method][weight]}
    mode = max(MODES, key=lambda m: (candidates[m], m == "hybrid", m == "dense"))
    return {
        "default_mode": mode,
        "fusion": method,
        "hybrid_weight": weight,
        "rrf_k": evaluation.RRF_K,
        "scores": {m: round(v, 6) for m, v in candidates.items()},
        "by_weight": {m: {str(w): round(v, 6) for w, v in raw[m].items()} for m in raw},
    }


def by_mode(task: Task, dense: dict, bm25: dict, search: dict) -> dict:
    """Full metric dicts of dense, BM25 and hybrid (with ``search``'s family and weight) on the selection split."""
    hybrid = _fused(task, dense, bm25, search["hybrid_weight"], search["fusion"])
    return {
        "dense": evaluation.evaluate(evaluation.ids(dense), task.qrels),
        "bm25": evaluation.evaluate(evaluation.ids(bm25), task.qrels),
        "hybrid": evaluation.evaluate(hybrid, task.qrels),
    }
