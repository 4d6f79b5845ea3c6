"""The training loop on the tiny model: seeded runs repeat exactly, a resumed run continues where it stopped,
length grouping, the in-process exact evaluation, the corpus' sequence length, divergence, and keeping the best
epoch (early stopping on a selection score)."""

from __future__ import annotations

import random

import pytest

from embedpipe.contracts import datasets
from embedpipe.ml.checkpoints import Checkpoints
from embedpipe.ml.model import load_model
from embedpipe.ml.scalars import ScalarLog
from embedpipe.ml.training import (
    NonFiniteLoss,
    TrainParams,
    distinct,
    evaluate_exact,
    length_grouped_batches,
    seq_length_for,
    train,
)
from tests.helpers import FIXTURES


def pairs():
    return datasets.load_dir(FIXTURES / "tiny_beir").training_pairs()


def params(**kw) -> TrainParams:
    return TrainParams(**{"batch_size": 4, "max_steps": 6, "epochs": 10, "max_seq_length": 32, **kw})


def test_same_seed_same_loss_curve(tiny_model):
    curves = [train(load_model(tiny_model)[0], pairs(), params())["loss_curve"] for _ in range(2)]
    assert curves[0] == curves[1]
    assert len(curves[0]) == 6


def test_resume_continues_from_the_latest_checkpoint(tiny_model, tmp_path):
    straight = train(load_model(tiny_model)[0], pairs(), params())
    ckpt = Checkpoints(str(tmp_path / "ckpt"))
    first = train(load_model(tiny_model)[0], pairs(), params(max_steps=6, checkpoint_every=2), checkpoints=ckpt)
    assert ckpt.latest_step() == 4  # every 2 steps, none at the final step
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.pt")) == ["step-00000002.pt", "step-00000004.pt"]
    assert first["loss_curve"] == straight["loss_curve"]
    scalars = ScalarLog(str(tmp_path / "tb"))
    resumed = train(
        load_model(tiny_model)[0],
        pairs(),
        params(checkpoint_every=2),
        checkpoints=Checkpoints(ckpt.uri),
        scalars=scalars,
    )
    scalars.close()
    assert resumed["resumed_from_step"] == 4
    assert resumed["steps"] == 6
    assert resumed["pairs_seen"] == straight["pairs_seen"]
    assert 0 < resumed["pairs_seen_this_run"] <= 8  # only the last two steps ran again
    # The resumed run ends exactly where the uninterrupted one did.
    assert resumed["loss_curve"] == straight["loss_curve"]
    steps = [line for line in (tmp_path / "tb" / "scalars.jsonl").read_text().splitlines() if "train/loss" in line]
    assert len(steps) == 2


def test_cached_loss_trains(tiny_model):
    out = train(load_model(tiny_model)[0], pairs(), params(batch_size=8, mini_batch_size=2, max_steps=2))
    assert out["steps"] == 2 and all(p["loss"] > 0 for p in out["loss_curve"])


def test_length_grouped_batches_cover_every_pair_once():
    data = [(f"a{i}" * (i % 7 + 1), f"p{i}", None) for i in range(103)]
    batches = length_grouped_batches(data, 8, random.Random(0))
    flat = [p for b in batches for p in b]
    assert sorted(flat) == sorted(data)
    assert all(2 <= len(b) <= 8 for b in batches)


def qrels_pairs(queries: int, per_query: int, docs: int) -> list:
    """qrels/train-style pairs: each query has several relevant documents, documents are relevant to several."""
    return [(f"query {q}", f"doc {(q * 7 + j * 3) % docs}", None) for q in range(queries) for j in range(per_query)]


def test_no_batch_repeats_an_anchor_or_a_positive_and_every_epoch_counts_the_same_steps():
    data = qrels_pairs(400, 6, 300)  # 2,400 pairs: three windows of 800
    counts = set()
    for epoch in range(4):
        batches = length_grouped_batches(data, 16, random.Random(epoch))
        counts.add(len(batches))
        for b in batches:
            assert len({p[0] for p in b}) == len(b) and len({p[1] for p in b}) == len(b)
        kept = [p for b in batches for p in b]
        assert len(kept) == len(set(kept)) and set(kept) <= set(data)
        assert len(kept) > 0.9 * len(data)  # a repeat sits out one epoch, not many pairs
    assert counts == {len(data) // 16}  # fixed by size: resumed runs and DDP ranks step alike


def test_a_dataset_whose_later_epochs_hold_more_repeats_trains_every_epoch(tiny_model):
    """The review's reproduction: 11 queries x 3 documents over 40 documents, batch 8, two epochs (a batching that
    depended on content made epoch 2 shorter than epoch 1 and raised IndexError)."""
    data = [(f"q{q}", f"d{(3 * q + j) % 40}", None) for q in range(11) for j in range(3)]
    out = train(load_model(tiny_model)[0], data, params(batch_size=8, epochs=2, max_steps=0))
    assert out["steps"] == out["total_steps"] == 2 * (len(data) // 8)


def test_distinct_drops_the_repeats_of_a_batch():
    batch = [("q", "d0", None), ("q", "d1", None), ("r", "d0", None), ("s", "d9", None)]
    assert distinct(batch) == [("q", "d0", None), ("s", "d9", None)]
    assert distinct([("q", f"d{i}", None) for i in range(5)]) == [("q", "d0", None)]  # one pair: loss 0 that step


def test_evaluate_exact_returns_the_metric_keys(tiny_model):
    model, info = load_model(tiny_model)
    metrics = evaluate_exact(model, datasets.load_dir(FIXTURES / "tiny_beir"))
    assert set(metrics) == {"recall@1", "recall@5", "recall@10", "recall@100", "mrr@10", "ndcg@10"}
    assert metrics["recall@100"] == 1.0  # 24 documents: top 100 holds them all


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(["garden", "tomato", "compost", "watering", "seedling", "greenhouse"]) for _ in range(n))


def test_seq_length_for_grows_with_the_documents_within_bounds(tiny_model):
    model, _ = load_model(tiny_model)
    lengths = {}
    for n in (1, 40, 90, 400):
        seq = seq_length_for(model, [words(n, i) for i in range(20)], cap=128)
        assert seq % 32 == 0 and 32 <= seq <= 128, (n, seq)
        lengths[n] = seq
    assert lengths[1] == 32  # a word and the special tokens: the floor
    assert lengths[1] < lengths[40] < lengths[90] <= lengths[400] == 128  # capped at the model's limit
    # the 95th percentile: a few long outliers do not set the length
    assert seq_length_for(model, [words(1, i) for i in range(99)] + [words(400, 0)], cap=128) == 32
    assert seq_length_for(model, [words(400, 0)] * 5, cap=64) == 64


def toy_pairs(n: int = 8) -> list[tuple[str, str, None]]:
    return [(f"question {i} about {words(3, i)}", f"answer {i}: {words(12, 100 + i)}", None) for i in range(n)]


def test_diverging_training_raises_non_finite_loss(tiny_model):
    model, _ = load_model(tiny_model)
    # verified: the tiny model's loss is NaN by step 2 at this rate (by step 6 at 1e3)
    p = params(learning_rate=1e6, warmup_ratio=0.0, max_steps=10)
    with pytest.raises(NonFiniteLoss, match="training diverged"):
        train(model, toy_pairs(), p)


def scripted(scores: list[float], snapshots: list[dict]):
    """A ``select`` that returns the scripted scores in turn and snapshots the weights it was shown."""
    it = iter(scores)

    def select(model) -> float:
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return next(it)

    return select


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_select_keeps_the_best_epoch_and_stops_after_patience(tiny_model):
    model, _ = load_model(tiny_model)
    snapshots: list[dict] = []
    p = params(max_steps=0, epochs=10)  # 8 pairs in batches of 4: 2 steps an epoch
    out = train(model, toy_pairs(), p, select=scripted([0.5, 0.1, 0.9], snapshots))
    assert [e["score"] for e in out["selection"]] == [0.5, 0.1]  # epoch 2 was worse: stopped there
    assert [e["epoch"] for e in out["selection"]] == [1, 2]
    assert out["steps"] == 4 and len(out["loss_curve"]) == 4
    assert out["best_step"] == 2 and out["best_score"] == 0.5  # the score of the weights it ends with
    assert len(snapshots) == 2 and not same_weights(snapshots[0], snapshots[1])
    assert same_weights({k: v.cpu() for k, v in model.state_dict().items()}, snapshots[0])


def test_select_patience_waits_for_a_later_improvement(tiny_model):
    model, _ = load_model(tiny_model)
    snapshots: list[dict] = []
    p = params(max_steps=0, epochs=10, patience=2)  # 4 pairs in batches of 4: 1 step an epoch
    scores = [0.5, 0.1, 0.9, 0.2, 0.3, 0.95]
    out = train(model, toy_pairs(4), p, select=scripted(scores, snapshots))
    # 0.1 is one bad epoch (patience 2 waits), 0.9 improves, 0.2 and 0.3 are two bad epochs: stop after epoch 5
    assert [e["score"] for e in out["selection"]] == scores[:5]
    assert out["steps"] == 5 and out["best_step"] == 3
    final = {k: v.cpu() for k, v in model.state_dict().items()}
    assert same_weights(final, snapshots[2])
    assert not same_weights(final, snapshots[4])


def test_select_on_the_last_epoch_keeps_the_last_weights(tiny_model):
    model, _ = load_model(tiny_model)
    snapshots: list[dict] = []
    out = train(model, toy_pairs(4), params(max_steps=0, epochs=2), select=scripted([0.1, 0.2], snapshots))
    assert out["steps"] == 2 and out["best_step"] == 2 and len(out["selection"]) == 2
    assert same_weights({k: v.cpu() for k, v in model.state_dict().items()}, snapshots[1])


def test_patience_zero_never_stops_early_but_keeps_the_best_epoch(tiny_model):
    model, _ = load_model(tiny_model)
    snapshots: list[dict] = []
    out = train(
        model, toy_pairs(4), params(max_steps=0, epochs=4, patience=0), select=scripted([0.9, 0.1, 0.2, 0.3], snapshots)
    )
    assert out["steps"] == 4 and out["best_step"] == 1
    assert same_weights({k: v.cpu() for k, v in model.state_dict().items()}, snapshots[0])
