"""embedpipe.ml.selection: the selection split (dev qrels, else held-out training pairs) and the choice of the default
search mode and hybrid weight."""

from __future__ import annotations

import pytest

from embedpipe.contracts.datasets import Dataset, Doc
from embedpipe.ml import selection
from embedpipe.ml.selection import HELDOUT_MIN, HELDOUT_SHARE, Task, choose_search, split_pairs, task_for


def make_pairs(anchors: int, multi_every: int = 3) -> list[tuple[str, str, str | None]]:
    """``anchors`` distinct anchors; every ``multi_every``-th one has a second positive."""
    out = []
    for i in range(anchors):
        out.append((f"anchor {i}", f"positive {i}", None))
        if i % multi_every == 0:
            out.append((f"anchor {i}", f"second positive {i}", f"negative {i}"))
    return out


ENOUGH = int(HELDOUT_MIN / HELDOUT_SHARE)  # the fewest anchors that hold any out


def test_split_pairs_holds_out_whole_anchors():
    pairs = make_pairs(ENOUGH + 50)
    train, held = split_pairs(pairs, seed=7)
    assert sorted(train + held) == sorted(pairs)
    train_anchors, held_anchors = {p[0] for p in train}, {p[0] for p in held}
    assert not train_anchors & held_anchors
    assert len(held_anchors) == int((ENOUGH + 50) * HELDOUT_SHARE)
    # an anchor with two positives went out with both of them
    for a in held_anchors:
        assert len([p for p in held if p[0] == a]) == len([p for p in pairs if p[0] == a])


def test_split_pairs_is_deterministic_for_a_seed():
    pairs = make_pairs(ENOUGH)
    assert split_pairs(pairs, seed=1) == split_pairs(list(pairs), seed=1)
    assert {p[0] for p in split_pairs(pairs, 1)[1]} != {p[0] for p in split_pairs(pairs, 2)[1]}


def test_split_pairs_holds_none_out_below_the_minimum():
    pairs = make_pairs(ENOUGH - 1)
    train, held = split_pairs(pairs, seed=0)
    assert held == [] and train == pairs
    assert len(split_pairs(make_pairs(ENOUGH), seed=0)[1]) > 0


def doc(i: int) -> Doc:
    return Doc(id=f"d{i}", title=f"Title {i}", text=f"Body of document {i}.")


def dataset(qrels: dict, pairs: list | None = None) -> Dataset:
    return Dataset(
        name="t",
        corpus={f"d{i}": doc(i) for i in range(6)},
        queries={"q1": "first question", "q2": "second question", "q3": "third question"},
        qrels=qrels,
        pairs=pairs or [],
    )


def test_task_for_uses_dev_qrels_when_present():
    ds = dataset(
        {
            "dev": {"q1": {"d1": 1, "d2": 0}, "q2": {"d3": 0}, "qX": {"d4": 1}},  # q2 no positive, qX unknown
            "train": {"q3": {"d5": 1}},
            "test": {"q3": {"d0": 1}},
        }
    )
    pairs = make_pairs(ENOUGH)  # enough to hold out: dev still wins, nothing is held out
    train, task = task_for(ds, pairs)
    assert train == pairs
    assert task.split == "dev"
    assert task.queries == {"q1": "first question"}
    assert task.qrels == {"q1": {"d1": 1, "d2": 0}}
    assert task.corpus == {d.id: d.full_text for d in ds.corpus.values()}
    assert task.corpus["d1"] == "Title 1. Body of document 1."
    assert task.describe() == {"split": "dev", "queries": 1, "documents": 6, "metric": selection.METRIC}


def test_task_for_holds_out_training_pairs_without_dev():
    ds = dataset({"test": {"q1": {"d1": 1}}})
    pairs = make_pairs(ENOUGH + 20)
    train, task = task_for(ds, pairs, seed=3)
    assert task.split == "heldout"
    held_anchors = set(task.queries.values())
    assert len(held_anchors) == len(task.queries) == int((ENOUGH + 20) * HELDOUT_SHARE)
    assert not held_anchors & {p[0] for p in train}
    assert len(train) + sum(1 for p in pairs if p[0] in held_anchors) == len(pairs)
    # each held-out anchor's relevant documents are exactly its positives, among the positives of all pairs
    assert set(task.corpus.values()) == {p[1] for p in pairs}
    for qid, anchor in task.queries.items():
        assert {task.corpus[d] for d in task.qrels[qid]} == {p[1] for p in pairs if p[0] == anchor}
        assert set(task.qrels[qid].values()) == {1}
    # the test split never becomes the selection split
    assert "first question" not in task.queries.values()
    assert doc(1).full_text not in task.corpus.values()


def test_task_for_holds_out_training_queries_against_the_whole_corpus():
    # qrels/train.tsv, no pairs/, no dev: whole training queries are held out with their own graded judgements
    n = ENOUGH + 30
    corpus = {f"d{i}": doc(i) for i in range(n + 50)}  # 50 documents no training query judges
    queries = {f"q{i}": f"question {i}" for i in range(n)} | {"qt": "test question"}
    train = {f"q{i}": {f"d{i}": 2, f"d{(i + 1) % n}": 1, f"d{(i + 2) % n}": 0} for i in range(n)}
    ds = Dataset(name="t", corpus=corpus, queries=queries, qrels={"train": train, "test": {"qt": {"d0": 1}}}, pairs=[])
    pairs = ds.training_pairs()
    kept, task = task_for(ds, pairs, seed=5)
    assert task.split == "heldout_queries"
    assert len(task.queries) == int(n * HELDOUT_SHARE)
    assert task.corpus == {d.id: d.full_text for d in corpus.values()}  # unjudged documents compete too
    for q in task.queries:
        assert task.qrels[q] == train[q]  # grades kept (2 counts more than 1 in nDCG)
    held = {queries[q] for q in task.queries}
    assert not held & {p[0] for p in kept}
    assert len(kept) == sum(1 for p in pairs if p[0] not in held)
    assert "qt" not in task.queries
    assert task_for(ds, pairs, seed=5) == (kept, task)  # the same split on every rank and retry


def test_pairs_files_keep_the_pairs_hold_out():
    # pairs/ present: its anchors are what trains, so the hold-out is of pairs even when qrels/train exists
    train = {f"q{i}": {"d0": 1} for i in range(3)}
    ds = dataset({"train": train}, pairs=make_pairs(ENOUGH))
    assert task_for(ds, ds.training_pairs())[1].split == "heldout"


def test_task_for_without_enough_pairs_has_no_selection():
    pairs = make_pairs(ENOUGH - 1)
    train, task = task_for(dataset({}), pairs)
    assert task is None and train == pairs


# choose_search on synthetic rankings: 10 queries, filler documents behind the hits on both sides.

QIDS = [f"q{i}" for i in range(10)]


def filler(prefix: str, qid: str, n: int = 15) -> list[str]:
    return [f"{prefix}-{qid}-{j}" for j in range(n)]


def scored(ranking: dict[str, list[str]]) -> dict[str, list[tuple[str, float]]]:
    """Rankings as hits with descending scores (what dense and BM25 search return)."""
    return {q: [(d, 1.0 - 0.01 * i) for i, d in enumerate(ids)] for q, ids in ranking.items()}


def synthetic(qrels: dict) -> Task:
    return Task("heldout", {q: f"query {q}" for q in QIDS}, {}, qrels)


def test_choose_search_picks_bm25_when_bm25_is_perfect_and_dense_useless():
    qrels = {q: {f"rel-{q}": 1} for q in QIDS}
    # BM25: the relevant document first, then a near miss; dense: the near miss first, never the relevant one.
    bm25 = scored({q: [f"rel-{q}", f"miss-{q}", *filler("s", q)] for q in QIDS})
    dense = scored({q: [f"miss-{q}", *filler("d", q)] for q in QIDS})
    out = choose_search(synthetic(qrels), dense, bm25)
    assert out["default_mode"] == "bm25"
    assert out["scores"]["bm25"] == pytest.approx(1.0) and out["scores"]["dense"] == 0.0
    assert out["scores"]["hybrid"] < 1.0
    for method in selection.evaluation.FUSIONS:
        weights = out["by_weight"][method]
        assert weights["0.0"] == pytest.approx(1.0) and weights["1.0"] == 0.0


def test_choose_search_picks_dense_when_dense_is_perfect_and_bm25_useless():
    qrels = {q: {f"rel-{q}": 1} for q in QIDS}
    dense = scored({q: [f"rel-{q}", f"miss-{q}", *filler("d", q)] for q in QIDS})
    bm25 = scored({q: [f"miss-{q}", *filler("s", q)] for q in QIDS})
    out = choose_search(synthetic(qrels), dense, bm25)
    assert out["default_mode"] == "dense"
    assert out["scores"]["dense"] == pytest.approx(1.0) and out["scores"]["bm25"] == 0.0
    assert out["scores"]["hybrid"] < 1.0


def test_choose_search_picks_hybrid_when_each_side_finds_half():
    qrels = {q: {f"a-{q}": 1, f"b-{q}": 1} for q in QIDS}
    dense = scored({q: [f"a-{q}", *filler("d", q)] for q in QIDS})  # finds a, never b
    bm25 = scored({q: [f"b-{q}", *filler("s", q)] for q in QIDS})  # finds b, never a
    out = choose_search(synthetic(qrels), dense, bm25)
    assert out["default_mode"] == "hybrid"
    assert 0.0 < out["hybrid_weight"] < 1.0
    assert out["scores"]["hybrid"] == pytest.approx(1.0)
    assert out["scores"]["hybrid"] > max(out["scores"]["dense"], out["scores"]["bm25"])
    assert out["rrf_k"] == selection.evaluation.RRF_K
    assert out["fusion"] in selection.evaluation.FUSIONS
    assert set(out["by_weight"]) == set(selection.evaluation.FUSIONS)
    assert all(set(v) == {str(w) for w in selection.WEIGHTS} for v in out["by_weight"].values())


def test_bm25_hits_on_a_task():
    task = Task(
        "dev",
        {"q1": "pruning tomato plants", "q2": "the of"},
        {"g": "Tomato pruning: pinch out side shoots", "c": "Compost bins rotate monthly", "w": "Water the beds"},
        {"q1": {"g": 1}},
    )
    found = selection.bm25_hits(task)
    assert found["q1"][0][0] == "g" and found["q1"][0][1] > 0 and found["q2"] == []


# ---------------------------------------------------------------- k-fold selection for collections too small to split


def test_folds_hold_each_whole_anchor_out_exactly_once():
    pairs = make_pairs(selection.KFOLD_MIN + 3)
    out = selection.folds(pairs, seed=3)
    assert len(out) == selection.KFOLDS
    held = [a for _, h in out for a in h]
    assert sorted(held) == sorted({p[0] for p in pairs})  # a partition of the anchors
    for train, h in out:
        assert not {p[0] for p in train} & h  # an anchor with two positives leaves with both
        assert sorted(train + [p for p in pairs if p[0] in h]) == sorted(pairs)
    assert selection.folds(pairs, seed=3) == out
    assert selection.folds(make_pairs(selection.KFOLD_MIN - 1), seed=3) == []


def test_cross_validate_scores_every_anchor_with_a_model_that_never_trained_on_it(tiny_model):
    from embedpipe.config import TrainParams
    from embedpipe.ml import training
    from embedpipe.ml.model import load_model

    trained_on: list[set] = []

    def spy(model, pairs, params, **kw):
        trained_on.append({p[0] for p in pairs})
        assert params.patience == 0  # every fold runs every epoch: epochs are compared across folds
        return training.train(model, pairs, params, **kw)

    pairs = [(f"question on topic {i}", f"an answer about topic {i}, detail {i * 7}", None) for i in range(12)]
    params = TrainParams(batch_size=4, epochs=2, max_seq_length=32, learning_rate=1e-3, checkpoint_every=0)
    cv = selection.cross_validate(lambda: load_model(tiny_model)[0], spy, pairs, params, seed=1)
    anchors = {p[0] for p in pairs}
    assert cv.folds == selection.KFOLDS == len(trained_on)
    held = [anchors - t for t in trained_on]  # what each fold model never saw
    assert all(held) and sorted(a for h in held for a in h) == sorted(anchors)
    assert sorted(cv.task.queries.values()) == sorted(anchors) and cv.task.split == "kfold"
    # every epoch's pooled rankings cover every anchor once; the base model ranks them all too
    assert set(cv.by_epoch) == {1, 2} and all(set(h) == set(cv.task.queries) for h in cv.by_epoch.values())
    assert set(cv.base) == set(cv.task.queries)
    assert cv.epochs in (1, 2) and cv.tuned_score == cv.scores[cv.epochs] == max(cv.scores.values())
    assert 0.0 <= cv.base_score <= 1.0 and [h["epoch"] for h in cv.history()] == [1, 2]
    assert selection.cross_validate(lambda: load_model(tiny_model)[0], spy, pairs[:9], params, seed=1) is None
