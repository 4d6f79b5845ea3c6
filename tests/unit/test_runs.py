"""embedpipe.ledger.runs: the run ledger (claims, coalescing pending runs, monotonic compare-and-set transitions)."""

from __future__ import annotations

import pytest

from embedpipe.gcp.storage import PreconditionFailed
from embedpipe.ledger import runs
from embedpipe.ledger.runs import EMBEDDING, FAILED, INDEXING, PENDING, PUBLISHING, SUCCEEDED, TRAINING, Ledger, is_past

BUCKET = "embedpipe-artifacts"


@pytest.fixture
def ledger(store, clock) -> Ledger:
    return Ledger(BUCKET, store=store, clock=clock)


def test_addresses(ledger):
    assert ledger.run_uri("r1") == "gs://embedpipe-artifacts/runs/r1/run.json"
    assert ledger.run_dir("r1") == "gs://embedpipe-artifacts/runs/r1"


# ---------------------------------------------------------------- claims


def test_claim_is_create_once(ledger, store):
    assert ledger.claim("gcs/b/datasets/demo/corpus.jsonl#1", "run-a") == ("run-a", True)
    assert ledger.claim("gcs/b/datasets/demo/corpus.jsonl#1", "run-b") == ("run-a", False)
    assert ledger.get_claim("gcs/b/datasets/demo/corpus.jsonl#1")["run_id"] == "run-a"
    assert len(store.uris("/ledger/claims/")) == 1


def test_claims_are_per_key(ledger):
    assert ledger.claim("gcs/b/datasets/demo/corpus.jsonl#1", "run-a") == ("run-a", True)
    assert ledger.claim("gcs/b/datasets/demo/corpus.jsonl#2", "run-b") == ("run-b", True)
    assert ledger.get_claim("pubsub/retrain/never") is None


def test_claim_object_name_is_safe_for_any_key(ledger, store):
    ledger.claim("gcs/b/datasets/demo/../weird name?#1", "r")
    (uri,) = store.uris("/ledger/claims/")
    name = uri.rsplit("/", 1)[1]
    assert len(name) == 64 + len(".json") and name[:64].isalnum()


# ---------------------------------------------------------------- run records


def test_create_run_is_create_only(ledger):
    record = ledger.create_run("r1", "demo", {"type": "upload"})
    assert record["state"] == PENDING and record["triggers"] == [] and record["jobs"] == {}
    assert ledger.get_run("r1") == record
    with pytest.raises(PreconditionFailed):
        ledger.create_run("r1", "demo", {"type": "retrain"})
    assert ledger.get_run("r1")["trigger"] == {"type": "upload"}


def test_update_run_of_a_missing_run_raises(ledger):
    with pytest.raises(KeyError):
        ledger.update_run("nope", lambda r: r)


def test_update_run_returning_none_writes_nothing(ledger, store):
    ledger.create_run("r1", "demo", {})
    before = dict(store.objects)
    assert ledger.update_run("r1", lambda r: None)["state"] == PENDING
    assert store.objects == before


def test_add_trigger_is_idempotent(ledger):
    ledger.create_run("r1", "demo", {})
    ledger.add_trigger("r1", "k1", {"object": "datasets/demo/corpus.jsonl"})
    ledger.add_trigger("r1", "k1", {"object": "datasets/demo/corpus.jsonl"})
    ledger.add_trigger("r1", "k2")
    record = ledger.view("r1")
    assert record["triggers"] == ["k1", "k2"]
    assert record["trigger_objects"] == [{"object": "datasets/demo/corpus.jsonl"}]
    assert ledger.get_run("r1")["triggers"] == []  # the record itself is not contended: one object per trigger


def test_triggers_never_write_the_run_record(ledger, store):
    """Concurrent uploads each create their own object: none of them compare-and-sets the run record."""
    ledger.create_run("r1", "demo", {})
    before = store.objects[ledger.run_uri("r1")]
    for i in range(200):
        assert ledger.add_trigger("r1", f"k{i}", {"object": f"datasets/demo/corpus/p{i}.jsonl"})
    assert store.objects[ledger.run_uri("r1")] == before and store.conflicts == 0
    assert len(ledger.view("r1")["triggers"]) == 200


def test_seal_copies_the_triggers_into_the_record_and_refuses_later_ones(ledger, clock):
    ledger.create_run("r1", "demo", {})
    assert ledger.add_trigger("r1", "k1", {"object": "a"})
    clock.advance(1)
    ledger.put_item("r1", "file_errors", "k0", {"object": "bad", "line": 3, "reason": "x"})
    sealed = ledger.seal("r1")
    assert (
        sealed["sealed"]
        and sealed["triggers"] == ["k1"]
        and sealed["file_errors"] == {"k0": {"object": "bad", "line": 3, "reason": "x"}}
    )
    assert ledger.add_trigger("r1", "k2", {"object": "b"}) is False  # too late: the caller moves it to the next run
    assert ledger.seal("r1")["triggers"] == ["k1"]  # a second seal (a relaunch) decides on the same set
    assert ledger.view("r1")["triggers"] == ["k1"]


def test_a_trigger_written_before_the_seal_but_read_after_it_counts_once(ledger, store):
    """The item lands, the run is sealed and merged (its listing saw the item), then the writer reads the record:
    the trigger belongs to this run only, it is not moved to the next one as well."""
    ledger.create_run("r1", "demo", {})
    store.interleave("read", "/runs/r1/run.json", lambda: ledger.seal("r1"))
    assert ledger.add_trigger("r1", "k1", {"object": "a"}) is True
    assert ledger.get_run("r1")["triggers"] == ["k1"]


def test_a_sealed_run_whose_merge_never_came_is_not_guessed(ledger):
    ledger.create_run("r1", "demo", {})
    ledger.update_run("r1", lambda r: {**r, "sealed": True})  # the launch died between its two writes
    with pytest.raises(RuntimeError, match="not merged yet"):
        ledger.add_trigger("r1", "k1", wait_s=0)
    ledger.seal("r1")  # the next tick's launch finishes the seal: the item was written before, so it counts
    assert ledger.add_trigger("r1", "k1") is True and ledger.get_run("r1")["triggers"] == ["k1"]


def test_arriving_reads_only_the_unfinished_uploads_and_the_seal_reads_no_arriving_item(ledger, store, clock):
    """The launch asks, at every tick, which uploads of the run are still in intake: their items are named by their
    key's digest, so the finished ones (a trigger or a file error beside them) are not read, and neither the seal nor
    a view reads ``arriving`` items (never merged into a record)."""
    ledger.create_run("r1", "demo", {})
    for key in ("k1", "k2", "k3"):
        ledger.put_item("r1", "arriving", key, {"object": key})
    ledger.add_trigger("r1", "k1")
    ledger.put_item("r1", "file_errors", "k2", {"object": "k2", "line": 1, "reason": "x"})
    reads = []
    read = store.read_json_gen
    store.read_json_gen = lambda uri: reads.append(uri) or read(uri)
    assert ledger.arriving("r1") == ["k3"]
    assert reads == [ledger._item_uri("r1", "arriving", "k3")]
    clock.advance(runs.ARRIVING_MAX_S + 1)
    assert ledger.arriving("r1") == []  # an intake that died holds the run back for a bounded time
    reads.clear()
    assert ledger.seal("r1")["triggers"] == ["k1"] and ledger.view("r1")["file_errors"]
    assert not [u for u in reads if "/arriving/" in u]


def test_list_runs_and_datasets(ledger, clock):
    ledger.create_run("r-b", "demo", {})
    clock.advance(1)
    ledger.create_run("r-a", "other", {})
    ledger.update_dataset("demo", lambda st: st)
    ledger.update_dataset("other", lambda st: st)
    assert [r["run_id"] for r in ledger.list_runs()] == ["r-b", "r-a"]  # by creation time
    assert ledger.list_datasets() == ["demo", "other"]


def test_get_dataset_defaults_to_empty_state(ledger, store):
    assert ledger.get_dataset("demo") == runs.empty_dataset_state("demo")
    assert store.objects == {}


# ---------------------------------------------------------------- advance


def test_advance_moves_once_and_records_stage_times(ledger, clock):
    ledger.create_run("r1", "demo", {})
    t0 = clock.now
    clock.advance(5)
    record, moved = ledger.advance("r1", PENDING, TRAINING, jobs={"train": {"name": "j1"}})
    assert moved and record["state"] == TRAINING
    assert record["jobs"] == {"train": {"name": "j1"}}
    assert record["stage_times"][PENDING] == {"start": t0, "end": t0 + 5}
    assert record["stage_times"][TRAINING] == {"start": t0 + 5}
    assert ledger.get_run("r1") == record

    clock.advance(5)
    again, moved = ledger.advance("r1", PENDING, TRAINING, jobs={"train": {"name": "j2"}})
    assert not moved
    assert again == record  # nothing changed, not even updated_at
    assert ledger.get_run("r1")["jobs"] == {"train": {"name": "j1"}}


def test_advance_from_the_wrong_state_is_a_no_op(ledger):
    ledger.create_run("r1", "demo", {})
    record, moved = ledger.advance("r1", TRAINING, EMBEDDING)
    assert not moved and record["state"] == PENDING


def test_advance_to_a_terminal_state_closes_it(ledger, clock):
    ledger.create_run("r1", "demo", {})
    ledger.advance("r1", PENDING, TRAINING)
    clock.advance(3)
    record, moved = ledger.advance("r1", TRAINING, FAILED, error={"stage": "train", "cause": "x"})
    assert moved and record["state"] == FAILED
    assert record["stage_times"][FAILED] == {"start": clock.now, "end": clock.now}
    assert record["stage_times"][TRAINING]["end"] == clock.now
    assert record["error"] == {"stage": "train", "cause": "x"}
    _, moved = ledger.advance("r1", TRAINING, EMBEDDING)
    assert not moved


def test_advance_retries_after_a_concurrent_write(ledger, store):
    """Another instance writes the record between our read and our compare-and-set: we re-read and keep both."""
    ledger.create_run("r1", "demo", {})

    def other_writer():
        doc, gen = store.read_json_gen(ledger.run_uri("r1"))
        doc["triggers"].append("from-elsewhere")
        store.write_json(ledger.run_uri("r1"), doc, if_generation_match=gen)

    store.interleave("write", "/runs/r1/", other_writer)
    record, moved = ledger.advance("r1", PENDING, TRAINING)
    assert moved
    assert store.conflicts == 1
    stored = ledger.get_run("r1")
    assert stored["state"] == TRAINING and stored["triggers"] == ["from-elsewhere"]
    assert record == stored


def race_two_advances(ledger, store) -> tuple[list[bool], dict, bool]:
    """Another instance advances PENDING -> TRAINING between our read and our compare-and-set."""
    ledger.create_run("r1", "demo", {})
    theirs = []
    store.interleave(
        "write", "/runs/r1/", lambda: theirs.append(ledger.advance("r1", PENDING, TRAINING, by="other")[1])
    )
    record, moved = ledger.advance("r1", PENDING, TRAINING, by="us")
    return theirs, record, moved


def test_racing_advances_keep_the_winners_write(ledger, store):
    theirs, record, _ = race_two_advances(ledger, store)
    assert theirs == [True]
    assert store.conflicts == 1
    assert record["state"] == TRAINING and record["by"] == "other"
    assert ledger.get_run("r1") == record


def test_racing_advances_move_exactly_once(ledger, store):
    theirs, _, moved = race_two_advances(ledger, store)
    assert theirs == [True] and moved is False


# ---------------------------------------------------------------- pending runs (coalescing)


def test_pending_run_coalesces_and_bounds_the_wait(ledger, clock, store):
    t0 = clock.now
    r1 = ledger.pending_run("demo", {"type": "upload"}, due_in_s=10, max_wait_s=25)
    state = ledger.get_dataset("demo")
    assert (state["pending"], state["pending_since"], state["due_at"]) == (r1, t0, t0 + 10)
    assert ledger.get_run(r1)["trigger"] == {"type": "upload"}

    clock.advance(5)
    assert ledger.pending_run("demo", {"type": "upload"}, due_in_s=10, max_wait_s=25) == r1
    assert ledger.get_dataset("demo")["due_at"] == t0 + 15  # pushed back

    clock.advance(15)
    assert ledger.pending_run("demo", {"type": "upload"}, due_in_s=10, max_wait_s=25) == r1
    assert ledger.get_dataset("demo")["due_at"] == t0 + 25  # but never past pending_since + max_wait_s

    clock.advance(4)
    assert ledger.pending_run("demo", {"type": "upload"}, due_in_s=0, max_wait_s=25) == r1
    assert ledger.get_dataset("demo")["due_at"] == t0 + 25  # never pulled forward either

    assert [r["run_id"] for r in ledger.list_runs()] == [r1]


def test_pending_run_per_dataset(ledger, clock):
    a = ledger.pending_run("demo", {}, due_in_s=1)
    b = ledger.pending_run("other", {}, due_in_s=1)
    assert a != b
    assert ledger.get_dataset("demo")["pending"] == a and ledger.get_dataset("other")["pending"] == b


def test_pending_run_after_launch_is_a_new_run(ledger, clock):
    r1 = ledger.pending_run("demo", {}, due_in_s=1)

    def launch(st):
        st["active"], st["pending"], st["pending_since"] = st["pending"], None, None
        return st

    ledger.update_dataset("demo", launch)
    r2 = ledger.pending_run("demo", {}, due_in_s=1)
    assert r2 != r1
    state = ledger.get_dataset("demo")
    assert (state["active"], state["pending"]) == (r1, r2)


def test_pending_run_lost_creation_race_joins_the_winner_and_cleans_up(ledger, store, clock):
    """Two first uploads at once: both create a run record; the loser of the dataset CAS deletes its record."""
    winner = []

    def other_instance():
        winner.append(ledger.pending_run("demo", {"by": "other"}, due_in_s=5))

    store.interleave("read", "/ledger/datasets/demo.json", lambda: store.interleave("write", "/runs/", other_instance))
    ours = ledger.pending_run("demo", {"by": "us"}, due_in_s=5)
    assert ours == winner[0]
    assert ledger.get_dataset("demo")["pending"] == ours
    assert [r["run_id"] for r in ledger.list_runs()] == [ours]  # the losing record was deleted


def test_pending_run_does_not_rejoin_a_run_launched_meanwhile(ledger, store, clock):
    r1 = ledger.pending_run("demo", {}, due_in_s=0)

    def launcher_takes_r1():
        def launch(st):
            st["active"], st["pending"], st["pending_since"] = st["pending"], None, None
            return st

        ledger.update_dataset("demo", launch)
        ledger.advance(r1, PENDING, TRAINING)

    # pending_run reads the dataset once and writes it by compare-and-set; the launcher runs in between
    store.interleave("write", "/ledger/datasets/demo.json", launcher_takes_r1)
    r2 = ledger.pending_run("demo", {}, due_in_s=0)
    state = ledger.get_dataset("demo")
    assert state["active"] == r1
    assert r2 != r1 and state["pending"] == r2


# ---------------------------------------------------------------- is_past


@pytest.mark.parametrize(
    ("state", "target", "expected"),
    [
        (PENDING, TRAINING, False),
        (TRAINING, TRAINING, True),
        (TRAINING, EMBEDDING, False),
        (EMBEDDING, TRAINING, True),
        (INDEXING, EMBEDDING, True),
        (PUBLISHING, INDEXING, True),
        (SUCCEEDED, PUBLISHING, True),
        (FAILED, TRAINING, True),
        (FAILED, SUCCEEDED, True),
        (SUCCEEDED, SUCCEEDED, True),
    ],
)
def test_is_past(state, target, expected):
    assert is_past({"state": state}, target) is expected


def test_stage_order():
    assert runs.STAGES == (PENDING, TRAINING, EMBEDDING, INDEXING, PUBLISHING, SUCCEEDED)
    assert runs.stage_index(FAILED) > runs.stage_index(SUCCEEDED)


def test_run_ids_are_unique_and_start_with_a_utc_stamp():
    ids = {runs.new_run_id(1732611845.9) for _ in range(50)}  # one second: unique by the random part
    assert len(ids) == 50
    assert all(i.split("-")[0] == "20241126t090405" for i in ids)


def test_a_new_run_is_named_by_the_ledgers_clock(ledger, clock):
    run_id = ledger.pending_run("demo", {"type": "upload"}, due_in_s=5)
    assert clock() == 1_750_000_000.0 and run_id.startswith("20250615t150640-")
    assert ledger.get_run(run_id)["created_at"] == runs.iso(clock())


def test_iso_is_utc_milliseconds():
    assert runs.iso(0) == "1970-01-01T00:00:00.000Z"
    assert runs.iso(1.5) == "1970-01-01T00:00:01.500Z"
