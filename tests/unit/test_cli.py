"""embedpipe.cli: behaviour that needs no stack (the e2e tests drive the rest through the real CLI)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from embedpipe import cli, topology
from embedpipe.gcp import bus


def test_events_leaves_cloud_dead_letters_in_their_subscription_and_shows_each_once(monkeypatch, tmp_path):
    """In the cloud the <dlq>-log subscription is the only copy of a dead letter: reading it must not delete it for
    the next reader, and a message that comes back after its ack deadline is not shown twice."""
    monkeypatch.setenv("EMBEDPIPE_MODE", "gcp")
    monkeypatch.setenv("EMBEDPIPE_PROJECT", "demo-project")
    for image in ("TRAINER", "EMBEDDER"):
        monkeypatch.setenv(f"EMBEDPIPE_{image}_IMAGE", f"r-docker.pkg.dev/demo-project/embedpipe/{image.lower()}:x")
    monkeypatch.setenv("EMBEDPIPE_STATE_DIR", str(tmp_path))
    dlq = topology.log_subscription(topology.dead_letter_topics()[0])
    pulls = []

    def pull(subscription, timeout=5.0, ack=True, max_messages=100):
        pulls.append((subscription.rsplit("/", 1)[1], ack))
        return [(b"not a cloudevent", {}, "m-1")] if subscription.endswith("/" + dlq) else []

    monkeypatch.setattr(bus, "pull", pull)
    first = CliRunner().invoke(cli.app, ["events"])
    second = CliRunner().invoke(cli.app, ["events"])
    assert first.exit_code == second.exit_code == 0, first.output
    acks = dict(pulls)
    assert acks[dlq] is False, "a dead letter was acknowledged (deleted) in the cloud"
    assert acks[topology.log_subscription(topology.INDEX_UPDATED)] is True
    shown = [json.loads(line) for line in second.output.splitlines()]
    assert [d["message_id"] for d in shown] == ["m-1"], "shown once, though pulled twice"


def test_wait_polls_run_records_and_follows_an_upload_moved_to_the_next_run():
    """``--wait`` reads the claims until every upload has one, then only the run records each poll; once the runs
    have ended it reads the claims again and waits for the run an upload moved to (it arrived as its run launched)."""
    from embedpipe.config import Settings
    from embedpipe.ledger import runs
    from tests.unit.fakes import Clock, FakeStore

    store, clock = FakeStore(), Clock()
    ledger = runs.Ledger("embedpipe-artifacts", store=store, clock=clock)
    first = ledger.pending_run("d", {"type": "upload"}, 0)
    ledger.update_dataset("d", lambda st: {**st, "active": st["pending"], "pending": None})  # launched
    clock.advance(60)
    second = ledger.pending_run("d", {"type": "upload"}, 0)  # the next run of the dataset
    keys = ["b/datasets/d/corpus.jsonl#1", "b/datasets/d/queries.jsonl#2"]
    for key in keys:
        ledger.claim(key, first)
    reads = []
    read = store.read_json_gen
    store.read_json_gen = lambda uri: reads.append(uri) or read(uri)
    polls = []

    def end(run_id):
        ledger.update_run(run_id, lambda r: {**r, "state": runs.SUCCEEDED})

    naps = []

    def sleep(seconds):  # what the pipeline does between two polls
        naps.append(seconds)
        polls.append(["claims" if "/claims/" in u else "runs" for u in reads])
        if len(polls) == 2:  # the first run ends; the queries upload had been moved to the next one
            end(first)
            ledger.move_claim(keys[1], first, second)
        if len(polls) == 3:
            end(second)
        reads.clear()

    record = cli._wait_for_runs(Settings.from_env({}), keys, 10, ledger=ledger, sleep=sleep)
    assert record["run_id"] == second and record["state"] == runs.SUCCEEDED
    assert polls[0] == ["claims", "claims", "runs"]  # the claims, once, then the run record
    assert polls[1] == ["runs"]  # only the run record while it runs
    assert polls[2] == ["runs", "claims", "claims", "runs", "runs"]  # ended: claims again, the next run followed
    assert naps == [cli.POLL_S] * 3


def test_wait_polls_faster_once_the_run_is_indexing():
    """The index stage takes seconds and its end is what ``--wait`` reports: it is polled more often."""
    from embedpipe.config import Settings
    from embedpipe.ledger import runs
    from tests.unit.fakes import FakeStore

    ledger = runs.Ledger("embedpipe-artifacts", store=FakeStore())
    run_id = ledger.pending_run("d", {"type": "upload"}, 0)
    ledger.claim("k", run_id)
    naps = []
    states = iter([runs.TRAINING, runs.INDEXING, runs.SUCCEEDED])

    def sleep(seconds):
        naps.append(seconds)
        state = next(states)
        ledger.update_run(run_id, lambda r: {**r, "state": state})

    assert cli._wait_for_runs(Settings.from_env({}), ["k"], 10, ledger=ledger, sleep=sleep)["state"] == runs.SUCCEEDED
    assert naps == [cli.POLL_S, cli.POLL_S, cli.POLL_FINAL_S]  # PENDING, TRAINING, INDEXING


def test_retrain_refuses_a_wrong_override_before_publishing(monkeypatch, tmp_path):
    """A mistyped key or value exits 2 with the allowed keys, and nothing is published (it used to be dropped
    silently by the function, with --wait sitting out its whole timeout)."""
    monkeypatch.setenv("EMBEDPIPE_STATE_DIR", str(tmp_path))
    published = []
    monkeypatch.setattr(bus, "publish_raw", lambda *a, **k: published.append(a) or "m-1")
    monkeypatch.setattr(cli, "dataset_problem", lambda s, name: None)  # the dataset exists
    for bad, why in [("lr=3e-5", "unknown override(s) ['lr']; allowed: "), ("learning_rate=fast", "not a valid float")]:
        result = CliRunner().invoke(cli.app, ["retrain", "--dataset", "demo", "--set", bad])
        assert result.exit_code == 2 and why in result.output, result.output
    assert published == []
    helped = CliRunner().invoke(cli.app, ["retrain", "--help"], env={"COLUMNS": "300"})
    assert "learning_rate" in helped.output and "epochs" in helped.output  # --set lists its keys


def test_wait_reports_a_refused_trigger_at_once():
    """A retrain message the function refused (from any publisher) is never claimed: --wait says why and exits 2
    on its first poll instead of waiting out its timeout."""
    import typer

    from embedpipe.config import Settings
    from embedpipe.ledger import runs
    from tests.unit.fakes import Clock, FakeStore

    ledger = runs.Ledger("embedpipe-artifacts", store=FakeStore(), clock=Clock())
    ledger.reject("retrain/m-9", "retrain retrain/m-9: unknown override(s) ['lr']")
    naps = []
    with pytest.raises(typer.Exit) as exc:
        cli._wait_for_runs(Settings.from_env({}), ["retrain/m-9"], 0, ledger=ledger, sleep=naps.append)
    assert exc.value.exit_code == 2 and naps == []


def test_a_timed_out_wait_says_the_run_goes_on_and_how_to_follow_it(capsys):
    import typer

    from embedpipe.ledger import runs
    from tests.unit.fakes import Clock, FakeStore

    ledger = runs.Ledger("embedpipe-artifacts", store=FakeStore(), clock=Clock())
    run_id = ledger.pending_run("d", {"type": "upload"}, 0)
    with pytest.raises(typer.Exit) as exc:
        cli._poll_runs(ledger, lambda: [run_id], 0.01, lambda s: None)
    assert exc.value.exit_code == 3
    assert f"the run goes on: follow it with `embedpipe wait {run_id}`" in capsys.readouterr().err


def test_next_steps_name_the_report_where_a_person_opens_it(monkeypatch, tmp_path):
    from embedpipe.config import Settings
    from embedpipe.gcp import storage
    from embedpipe.ledger import runs

    monkeypatch.setattr(storage, "read_bytes", lambda uri: b"<html>report</html>")
    record = {
        "run_id": "r1",
        "dataset": "demo",
        "state": runs.SUCCEEDED,
        "final_event": {
            "data": {
                "report_uri": "gs://embedpipe-artifacts/runs/r1/report.html",
                "promoted": True,
                "previous_collection": "demo__r0",
            }
        },
    }
    local = cli.next_steps(Settings.from_env({"EMBEDPIPE_STATE_DIR": str(tmp_path)}), record)
    copy = tmp_path / "reports" / "r1.html"
    assert local[0] == f"  report:   {copy.resolve().as_uri()}" and copy.read_bytes() == b"<html>report</html>"
    assert 'embedpipe search --dataset demo "your query"' in local[1]
    assert "embedpipe rollback --dataset demo" in local[2] and "demo__r0" in local[2]
    import dataclasses

    cloud = cli.next_steps(dataclasses.replace(Settings.from_env({}), mode="gcp"), record)
    assert cloud[0].endswith(
        "console.cloud.google.com/storage/browser/_details/embedpipe-artifacts/runs/r1/report.html"
    )


def _ledger():
    from embedpipe.ledger import runs
    from tests.unit.fakes import Clock, FakeStore

    return runs.Ledger("embedpipe-artifacts", store=FakeStore(), clock=Clock())


def test_a_refused_file_among_accepted_ones_is_reported_and_the_run_followed(capsys):
    from embedpipe.config import Settings
    from embedpipe.ledger import runs

    ledger = _ledger()
    run_id = ledger.pending_run("d", {"type": "upload"}, 0)
    ledger.claim("gcs/b/datasets/d/corpus.jsonl#1", run_id)
    ledger.reject("gcs/b/datasets/d/bad\x7f.jsonl#2", "bad\x7f.jsonl: object name contains control characters")
    ledger.update_run(run_id, lambda r: {**r, "state": runs.SUCCEEDED})
    keys = ["gcs/b/datasets/d/corpus.jsonl#1", "gcs/b/datasets/d/bad\x7f.jsonl#2"]
    record = cli._wait_for_runs(Settings.from_env({}), keys, 0, ledger=ledger, sleep=lambda s: None)
    assert record["run_id"] == run_id
    assert "refused: bad\x7f.jsonl: object name contains control characters" in capsys.readouterr().err


def test_a_wait_without_limit_gives_up_on_what_the_pipeline_never_takes_up(monkeypatch, capsys):
    import typer

    from embedpipe.config import Settings

    monkeypatch.setattr(cli, "CLAIM_TIMEOUT_S", 0.0)
    with pytest.raises(typer.Exit) as exc:
        cli._wait_for_runs(Settings.from_env({}), ["gcs/b/x#1"], 0, ledger=_ledger(), sleep=lambda s: None)
    assert exc.value.exit_code == 3 and "not taken up by the pipeline" in capsys.readouterr().err


def test_ctrl_c_while_waiting_says_the_run_goes_on(capsys):
    import typer

    ledger = _ledger()
    run_id = ledger.pending_run("d", {"type": "upload"}, 0)

    def interrupt(seconds):
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as exc:
        cli._poll_runs(ledger, lambda: [run_id], 0, interrupt)
    assert exc.value.exit_code == 130
    assert f"the run goes on: follow it with `embedpipe wait {run_id}`" in capsys.readouterr().err


def test_upload_refuses_a_file_name_the_intake_would_refuse_before_uploading(monkeypatch, tmp_path):
    from tests.helpers import FIXTURES

    folder = tmp_path / "d"
    import shutil

    shutil.copytree(FIXTURES / "tiny_beir", folder)
    (folder / "corpus").mkdir()
    (folder / "corpus" / ("c" * 201 + ".jsonl")).write_text((folder / "corpus.jsonl").read_text())
    (folder / "corpus.jsonl").unlink()
    uploaded = []
    monkeypatch.setattr(cli.storage, "upload_file", lambda *a, **k: uploaded.append(a) or 1)
    result = CliRunner().invoke(
        cli.app, ["upload", str(folder), "--dataset", "d"], env={"EMBEDPIPE_STATE_DIR": str(tmp_path)}
    )
    assert result.exit_code == 2 and "segment longer than 200 characters" in result.output and uploaded == []


def test_no_rollback_hint_after_an_in_place_update(monkeypatch, tmp_path):
    from embedpipe.config import Settings
    from embedpipe.ledger import runs

    monkeypatch.setattr(cli.storage, "read_bytes", lambda uri: b"x")
    data = {"report_uri": None, "promoted": True, "collection": "demo__r1", "previous_collection": "demo__r1"}
    record = {"run_id": "r2", "dataset": "demo", "state": runs.SUCCEEDED, "final_event": {"data": data}}
    steps = cli.next_steps(Settings.from_env({"EMBEDPIPE_STATE_DIR": str(tmp_path)}), record)
    assert not any("rollback" in line for line in steps) and any("search" in line for line in steps)


def test_retrain_of_a_dataset_that_does_not_exist_is_refused_with_the_closest_names(monkeypatch, tmp_path):
    """Issue 26.7: `retrain --dataset dmeo` published, and left a FAILED run in the ledger."""
    from embedpipe.config import Settings
    from embedpipe.gcp import storage
    from embedpipe.ledger import runs
    from tests.unit.fakes import Clock, FakeStore

    ledger = runs.Ledger("embedpipe-artifacts", store=FakeStore(), clock=Clock())
    for name in ("demo", "cisi", "nfcorpus"):
        ledger.update_dataset(name, lambda st: st)
    uploaded = {"gs://embedpipe-data/datasets/fresh/"}  # uploaded, no run yet: not in the ledger
    monkeypatch.setattr(storage, "has_objects", lambda uri: uri in uploaded)
    s = Settings.from_env({})
    assert cli.dataset_problem(s, "demo", ledger) is None and cli.dataset_problem(s, "fresh", ledger) is None
    assert cli.dataset_problem(s, "dmeo", ledger).endswith("did you mean demo?")
    assert "known: cisi, demo, nfcorpus" in cli.dataset_problem(s, "zzz", ledger)
    assert "must match" in cli.dataset_problem(s, "Demo!", ledger)
    monkeypatch.setenv("EMBEDPIPE_STATE_DIR", str(tmp_path))
    published = []
    monkeypatch.setattr(bus, "publish_raw", lambda *a, **k: published.append(a) or "m-1")
    monkeypatch.setattr(runs, "Ledger", lambda bucket, **kw: ledger)
    result = CliRunner().invoke(cli.app, ["retrain", "--dataset", "dmeo"])
    assert result.exit_code == 2 and "no dataset 'dmeo'" in result.output and published == []


def test_the_summary_shows_each_gate_difference_with_its_noise():
    from embedpipe.ledger import runs

    comparisons = [
        {"rival": "live index", "metric": "ndcg@10", "delta": 0.0002, "p": 0.93, "queries": 76, "significant": False},
        {"rival": "bm25", "metric": "ndcg@10", "delta": 0.0731, "p": 0.0004, "queries": 76, "significant": True},
    ]
    record = {
        "run_id": "r1",
        "dataset": "cisi",
        "state": runs.SUCCEEDED,
        "final_event": {"data": {"promoted": True, "gate": {"reason": "promoted", "comparisons": comparisons}}},
    }
    text = cli.summary(record)
    assert "  vs live index: ndcg@10 +0.0002 (p=0.930, within noise)" in text
    assert "  vs bm25:       ndcg@10 +0.0731 (p=0.000)" in text
