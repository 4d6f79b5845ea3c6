"""The training loop on the tiny model: seeded runs repeat exactly, a resumed run continues where it stopped,
length grouping, and the in-process exact evaluation."""

from __future__ import annotations

import random

from embedpipe import datasets
from embedpipe.checkpoints import Checkpoints
from embedpipe.model import load_model
from embedpipe.scalars import ScalarLog
from embedpipe.training import TrainParams, evaluate_exact, length_grouped_batches, train
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


def test_evaluate_exact_returns_the_metric_keys(tiny_model):
    model, info = load_model(tiny_model)
    metrics = evaluate_exact(model, datasets.load_dir(FIXTURES / "tiny_beir"))
    assert set(metrics) == {"recall@1", "recall@5", "recall@10", "recall@100", "mrr@10", "ndcg@10"}
    assert metrics["recall@100"] == 1.0  # 24 documents: top 100 holds them all
