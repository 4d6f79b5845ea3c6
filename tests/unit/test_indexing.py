"""embedpipe.index.indexing.decide and score: the promotion gate against the live index and the baselines (BM25 alone,
the untuned base model), in both directions, with tolerance; served = the mode chosen at training time."""

from __future__ import annotations

import dataclasses

import pytest
from pymilvus.exceptions import MilvusException, ParamError

from embedpipe.config import Settings
from embedpipe.index.indexing import (
    OFF_THE_SHELF,
    agreement,
    check_deletes,
    decide,
    fallback_mode,
    load_manifests,
    off_the_shelf,
    permanent_milvus_error,
    score,
    shrink_refusal,
)

METRICS = ("ndcg@10", "recall@10")


def m(r10: float, ndcg: float | None = None) -> dict:
    return {"recall@10": r10, "ndcg@10": r10 if ndcg is None else ndcg, "mrr@10": 0.1}


def modes(served: dict, bm25: dict | None = None, base: dict | None = None) -> dict:
    out = {"served": served, "dense": served}
    if bm25:
        out["bm25"] = bm25
    if base:
        out["base"] = base
    return out


def test_first_index_is_gated_against_the_baselines():
    ok, reason = decide(modes(m(0.5), m(0.4), m(0.45)), None, METRICS, 0.0, had_previous=False)
    assert ok is True and reason.startswith("first index for this dataset; promoted")
    ok, reason = decide(modes(m(0.4), m(0.5), m(0.3)), None, METRICS, 0.0, had_previous=False)
    assert ok is False and "vs bm25 0.5000" in reason
    ok, reason = decide(modes(m(0.5, ndcg=0.3), m(0.4), m(0.45, ndcg=0.31)), None, METRICS, 0.0, False)
    assert ok is False and "ndcg@10 0.3000 vs base 0.3100" in reason  # every gate metric counts


def test_better_or_equal_than_the_live_index_is_promoted_worse_is_rejected():
    assert decide(modes(m(0.80)), m(0.70), METRICS, 0.0, True)[0] is True
    assert decide(modes(m(0.70)), m(0.70), METRICS, 0.0, True)[0] is True
    ok, reason = decide(modes(m(0.69)), m(0.70), METRICS, 0.0, True)
    assert ok is False and "rejected" in reason and "0.6900 vs live index 0.7000" in reason


def test_a_measured_live_index_is_not_replaced_by_an_unmeasured_run():
    # e.g. this run's test qrels (a file or a table) were left out: "not worse" cannot be shown
    ok, reason = decide({}, m(0.70), METRICS, 0.0, True)
    assert ok is False and "no eval qrels" in reason
    assert decide({}, None, METRICS, 0.0, True)[0] is True  # the live index was never measured either


def test_tolerance_and_metrics_are_configurable():
    assert decide(modes(m(0.69)), m(0.70), ("recall@10",), 0.02, True)[0] is True
    assert decide(modes(m(0.67)), m(0.70), ("recall@10",), 0.02, True)[0] is False
    assert decide({"served": {"mrr@10": 0.5}}, {"mrr@10": 0.6}, ("mrr@10",), 0.0, True)[0] is False


def test_no_qrels_promotes_unmeasured():
    assert decide({}, None, METRICS, 0.0, False) == (True, "no eval qrels: promoted unmeasured")


def test_served_is_the_mode_chosen_at_training_not_the_best_on_test():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}
    ranked = {"dense": {"q1": ["d1"], "q2": ["x"]}, "hybrid": {"q1": ["d1"], "q2": ["d2"]}}
    out = score(ranked, qrels, "dense")
    assert out["default_mode"] == "dense" and out["by_mode"]["served"] == out["by_mode"]["dense"]
    assert out["metrics"]["recall@10"] == 0.5 and out["by_mode"]["hybrid"]["recall@10"] == 1.0
    # a mode the collection cannot answer (an old collection without BM25) falls back to dense
    assert score({"dense": ranked["dense"]}, qrels, "hybrid")["default_mode"] == "dense"


def test_deletes_over_the_configured_share_of_the_live_rows_are_refused():
    s = dataclasses.replace(Settings.from_env({}), max_delete_share=0.05)
    record = {"dataset": "demo", "live": {"collection": "demo__x", "rows": 1000}}
    assert check_deletes(s, record, [{"deleted": 30}, {"deleted": 20}]) == 50  # 5%: allowed
    with pytest.raises(ValueError, match=r"refusing to delete 51 of the 1000 live documents \(5.1% > .*retrain"):
        check_deletes(s, record, [{"deleted": 31}, {"deleted": 20}])
    assert check_deletes(s, record, [{"deleted": 0}]) == 0
    # a run that rejected a corpus file deletes nothing (its documents are absent, not gone): no refusal either
    assert check_deletes(s, {**record, "skip_deletes": True}, [{"deleted": 500}]) == 0
    # a part quarantined after the run's jobs listed the bucket: its deletions may be that part's documents
    with pytest.raises(ValueError, match="quarantined while this run was under way: it deletes nothing"):
        check_deletes(s, record, [{"deleted": 3}], absent=["datasets/demo/corpus/p1.jsonl"])


def test_permanent_milvus_errors_are_told_from_transient_ones():
    assert permanent_milvus_error(ParamError(message="length of varchar field id exceeds max length"))
    assert permanent_milvus_error(MilvusException(message="nq (number of search vectors per search request) ..."))
    assert permanent_milvus_error(MilvusException(message="the length (600) of varchar field exceeds max length"))
    # two deliveries creating one collection at once (Milvus Lite): the retry finds it created
    assert not permanent_milvus_error(MilvusException(message="[Errno 17] File exists: '/m/collections/a__r'"))
    assert not permanent_milvus_error(MilvusException(message="<_InactiveRpcError: StatusCode.UNAVAILABLE>"))
    assert not permanent_milvus_error(MilvusException(message="deadline exceeded"))
    assert not permanent_milvus_error(ConnectionError("refused"))


def test_shards_of_another_embed_attempt_are_refused(monkeypatch):
    from embedpipe.gcp import storage

    manifests = {
        "gs://a/runs/r/embeddings/2/manifest-00000.json": {"replica": 0, "replicas": 2, "job_key": "r/embed/2"},
        "gs://a/runs/r/embeddings/2/manifest-00001.json": {"replica": 1, "replicas": 2, "job_key": "r/embed/1"},
    }
    for m in manifests.values():
        m.update(fingerprint="fp", dim=4)
    monkeypatch.setattr(storage, "list_uris", lambda prefix: [(u, 1) for u in manifests if u.startswith(prefix)])
    monkeypatch.setattr(storage, "read_json", lambda uri: manifests[uri])
    with pytest.raises(ValueError, match=r"replica\(s\) \[1\] were not written by job r/embed/2"):
        load_manifests("gs://a/runs/r/embeddings/2", "r/embed/2")
    manifests["gs://a/runs/r/embeddings/2/manifest-00001.json"]["job_key"] = "r/embed/2"
    assert len(load_manifests("gs://a/runs/r/embeddings/2", "r/embed/2")) == 2
    manifests["gs://a/runs/r/embeddings/2/manifest-00001.json"]["mode"] = "rebuild"  # read a newer corpus
    with pytest.raises(ValueError, match="disagree on mode"):
        load_manifests("gs://a/runs/r/embeddings/2", "r/embed/2")
    # same mode and size, other contents (a re-upload edited documents between the replicas' loads)
    for i, m in enumerate(manifests.values()):
        m.update(mode="incremental", corpus_total=100, corpus_digest=f"digest-{i}")
    with pytest.raises(ValueError, match="disagree on mode or corpus"):
        load_manifests("gs://a/runs/r/embeddings/2", "r/embed/2")
    for m in manifests.values():
        m["corpus_digest"] = "same"
    assert len(load_manifests("gs://a/runs/r/embeddings/2", "r/embed/2")) == 2


# ---------------------------------------------------------------- a first run's fallback and the off-the-shelf hybrid

ALL = ("base", "bm25", OFF_THE_SHELF, "served")


def test_the_fallback_is_the_best_baseline_on_the_gate_metrics_in_order():
    by_mode = {"served": m(0.3), "dense": m(0.3), "base": m(0.6), "bm25": m(0.4), OFF_THE_SHELF: m(0.55)}
    assert fallback_mode(by_mode, METRICS, ALL) == "base"
    assert fallback_mode({**by_mode, "bm25": m(0.7)}, METRICS, ALL) == "bm25"
    # the first gate metric decides, the next breaks a tie; a full tie goes to the simpler (base before the rest)
    assert fallback_mode({**by_mode, OFF_THE_SHELF: m(0.6, ndcg=0.61)}, ("ndcg@10", "recall@10"), ALL) == OFF_THE_SHELF
    assert fallback_mode({**by_mode, OFF_THE_SHELF: m(0.6)}, METRICS, ALL) == "base"


def test_without_a_base_index_the_runs_own_index_competes_with_bm25_only():
    by_mode = {"served": m(0.5), "base": m(0.9), "bm25": m(0.1), OFF_THE_SHELF: m(0.8)}
    assert fallback_mode(by_mode, METRICS, ("bm25", "served")) == "served"  # never BM25 at 0.1 over the run's 0.5
    assert fallback_mode({**by_mode, "bm25": m(0.6)}, METRICS, ("bm25", "served")) == "bm25"
    assert fallback_mode({}, METRICS, ALL) is None  # nothing measured: nothing to fall back on


def test_off_the_shelf_is_an_even_rrf_of_the_two_rankings():
    base = {"q": ["a", "b", "c"]}
    bm25 = {"q": ["c", "d", "a"]}
    # a: 1/61 + 1/63, c: 1/63 + 1/61 (tie, base's first), b: 1/62, d: 1/62
    assert off_the_shelf(base, bm25) == {"q": ["a", "c", "b", "d"]}
    assert off_the_shelf({"q": ["a"]}, {}) == {"q": ["a"]}  # a query BM25 found nothing for keeps the base ranking


def shrinking(missing: int, live: int = 1000, **record) -> str | None:
    import types

    s = dataclasses.replace(Settings.from_env({}), max_delete_share=0.05)
    absent_in_state = record.pop("state_absent", {})
    ledger = types.SimpleNamespace(get_dataset=lambda ds: {"absent_parts": absent_in_state})
    x = types.SimpleNamespace(
        settings=s, record={"dataset": "demo", **record}, promoted_before={"rows": live}, dataset="demo", ledger=ledger
    )
    return shrink_refusal(x, missing)


def test_a_new_index_lacking_live_documents_needs_the_retrain_confirmation():
    """Issue 25.2: full and rebuilt runs had no shrink guard, and the gate rewards a smaller corpus (dropping a third
    of a corpus, all unjudged, raised recall@10 from 0.28 to 0.61 and was promoted)."""
    assert shrinking(0) is None and shrinking(50) is None  # within EMBEDPIPE_MAX_DELETE_SHARE
    why = shrinking(334)
    assert why.startswith("rejected: the new index lacks 334 of the 1000 live documents (33.4% > ")
    assert "embedpipe retrain --dataset demo --allow-shrink" in why
    assert shrinking(334, allow_shrink=True) is None
    # a quarantined part's documents are absent, never deleted: however few, only the confirmation lets them go
    part = "datasets/demo/corpus/part-1.jsonl"
    assert part in shrinking(3, absent_parts=[part]) and shrinking(3, absent_parts=[part], allow_shrink=True) is None
    # quarantined after the run launched (its jobs listed the bucket without it): the dataset state says so
    assert part in shrinking(3, state_absent={part: {"generation": 9}})
    assert shrinking(3, state_absent={part: {}}, released_parts=[part]) is None  # an allow_shrink retrain's


def test_agreement_reports_how_selection_ranked_the_modes_against_test():
    sel = {"by_mode": {"dense": m(0.1, 0.70), "bm25": m(0.1, 0.60), "hybrid": m(0.1, 0.68)}}
    test = {"dense": m(0.1, 0.43), "bm25": m(0.1, 0.49), "hybrid": m(0.1, 0.47), "served": m(0.1, 0.43)}
    got = agreement(sel, test)
    assert got["selection_order"] == ["dense", "hybrid", "bm25"] and got["test_order"] == ["bm25", "hybrid", "dense"]
    assert got["pairs"] == "0/3" and got["test_loss"] == pytest.approx(0.06)
    assert agreement(None, test) is None and agreement({"by_mode": {"dense": m(0.1, 0.5)}}, test) is None


# ---------------------------------------------------------------- resumable loads (issue 25.7)


class Killed(Exception):
    """The indexer's process dying part-way through a load (nothing after it runs: no ``finally`` saves progress)."""


class Upserts:
    """A Milvus client's ``upsert`` that records each id it receives, and dies at the ``die_at``-th call."""

    def __init__(self, die_at: int | None = None):
        self.ids: list[str] = []
        self.calls, self.die_at = 0, die_at

    def upsert(self, collection_name, data):
        self.calls += 1
        if self.calls == self.die_at:
            raise Killed
        self.ids += [r["id"] for r in data]


def shard_file(n: int, start: int, row_group: int):
    """A ``pq.ParquetFile`` of ``n`` rows (ids d<start>...) in row groups of ``row_group`` rows."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [f"d{i:05d}" for i in range(start, start + n)]
    table = pa.table(
        {
            "id": ids,
            "vector": [[1.0, 0.0]] * n,
            "text": ids,
            "bm25_text": ids,
            "title": ids,
            "content_hash": ids,
            "metadata": ["{}"] * n,
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group)
    buf.seek(0)
    return pq.ParquetFile(buf)


@pytest.fixture
def load(store, clock):
    """(ledger, run id of a run in INDEXING, a function that loads 2 shards of 1,000 and 700 rows once)"""
    from embedpipe.index.indexing import Progress, Stopwatch, upsert_tables
    from embedpipe.ledger import runs
    from embedpipe.ledger.runs import Ledger

    ledger = Ledger("artifacts", store=store, clock=clock)
    run_id = runs.new_run_id(clock())
    ledger.create_run(run_id, "demo", {"type": "test"}, kind="full")
    ledger.advance(run_id, runs.PENDING, runs.INDEXING)

    def once(client, stamp="c1|emb/1", until=float("inf"), monotonic=lambda: 0.0):
        shards = [shard_file(1000, 0, 300), shard_file(700, 1000, 300)]
        progress = Progress(ledger, run_id, "c/vector", stamp, until, clock=monotonic)
        files = ["a.parquet", "b.parquet"]
        return upsert_tables(client, "c", shards, Stopwatch(), batch=128, progress=progress, files=files)

    return ledger, run_id, once


def test_a_load_killed_part_way_is_continued_by_the_next_delivery_from_its_last_checkpoint(load, monkeypatch):
    from embedpipe.index import indexing

    ledger, run_id, once = load
    monkeypatch.setattr(indexing, "LOAD_CHECKPOINT_S", 0.0)  # a checkpoint after every batch
    # Row groups of 300 read 128 rows at a time: batches of 128, 128, 44 each. It dies in the second shard's second
    # row group: the first shard's 10 batches and the second's first 4 (428 rows) went in.
    first = Upserts(die_at=15)
    with pytest.raises(Killed):
        once(first)
    assert ledger.get_run(run_id)["loads"]["c/vector"]["shards"] == {"a.parquet": 1000, "b.parquet": 428}
    second = Upserts()
    assert once(second) == 1700  # every row of the load, counting the first delivery's
    assert second.ids[0] == "d01428" and len(second.ids) == 700 - 428
    assert sorted(first.ids + second.ids) == [f"d{i:05d}" for i in range(1700)], "each row upserted exactly once"


def test_a_crash_between_checkpoints_redoes_only_what_followed_the_last_one(load):
    ledger, run_id, once = load
    first = Upserts(die_at=12)
    with pytest.raises(Killed):
        once(first)  # a frozen clock: the only checkpoint is the first shard's end
    assert ledger.get_run(run_id)["loads"]["c/vector"]["shards"] == {"a.parquet": 1000}
    second = Upserts()
    assert once(second) == 1700 and second.ids == [f"d{i:05d}" for i in range(1000, 1700)]


def test_a_delivery_past_its_budget_hands_over_and_the_load_completes_over_several(load):
    from embedpipe.index.indexing import Handover

    ledger, run_id, once = load
    loaded, deliveries = [], 0
    while True:
        ticks = iter(range(10**6)).__next__  # each delivery's clock: one tick a batch, the budget 5 ticks
        client = Upserts()
        deliveries += 1
        try:
            total = once(client, until=5, monotonic=ticks)
            loaded += client.ids
            break
        except Handover as exc:
            loaded += client.ids
            assert "rows loaded into c so far" in str(exc)
    assert total == 1700 and deliveries == 4  # 17 batches, 5 a delivery
    assert sorted(loaded) == [f"d{i:05d}" for i in range(1700)], "nothing loaded twice, nothing left out"


def test_progress_of_another_collection_or_embed_attempt_is_not_resumed(load, monkeypatch):
    from embedpipe.index import indexing

    ledger, run_id, once = load
    monkeypatch.setattr(indexing, "LOAD_CHECKPOINT_S", 0.0)
    with pytest.raises(Killed):
        once(Upserts(die_at=5))
    recreated = Upserts()  # the collection was dropped and made again: another creation time in the stamp
    assert once(recreated, stamp="c2|emb/1") == 1700 and len(recreated.ids) == 1700


def test_one_delivery_hands_over_each_time_and_none_after_the_run_left_indexing(load):
    """Duplicates of a request (Pub/Sub's, reconcile's) each used to start a hand-over chain of their own, for good;
    a delivery kept loading (and handing over) after the run had failed; a delivery that loaded nothing moved the
    progress stamp the index deadline counts from."""
    from embedpipe.index.indexing import Progress, RunLeft, _claim_handover
    from embedpipe.ledger import runs

    ledger, run_id, once = load
    assert _claim_handover(ledger, run_id, 1) and not _claim_handover(ledger, run_id, 1)  # the duplicate: none
    assert _claim_handover(ledger, run_id, 2)
    with pytest.raises(Killed):
        once(Upserts(die_at=11))  # the first shard is recorded at its end
    at = ledger.get_run(run_id)["loads"]["c/vector"]["at"]
    ledger.clock.advance(60)
    Progress(ledger, run_id, "c/vector", "c1|emb/1", float("inf")).save()  # nothing new: the stamp stays
    assert ledger.get_run(run_id)["loads"]["c/vector"]["at"] == at
    ledger.advance(run_id, runs.INDEXING, runs.FAILED)
    with pytest.raises(RunLeft, match="the run is FAILED"):
        once(Upserts())
    assert not _claim_handover(ledger, run_id, 3)


def test_the_gate_reports_each_comparison_with_its_noise_and_can_require_a_significant_gain():
    from embedpipe.index.indexing import compare, score, significant_gain

    qrels = {f"q{i}": {f"d{i}": 1} for i in range(40)}
    hit = {q: [f"d{i}"] for i, q in enumerate(qrels)}  # every query's document first
    miss = {q: ["x"] for q in qrels}
    half = {q: ([f"d{i}"] if i % 2 else ["x"]) for i, q in enumerate(qrels)}
    new = score({"dense": hit, "bm25": half, "base": hit}, qrels, "dense")
    live_same = score({"dense": hit}, qrels, "dense")
    rows = {(c["rival"], c["metric"]): c for c in compare(new, live_same, ("ndcg@10",))}
    assert set(rows) == {("bm25", "ndcg@10"), ("base", "ndcg@10"), ("live index", "ndcg@10")}
    assert rows[("bm25", "ndcg@10")]["significant"] and rows[("bm25", "ndcg@10")]["delta"] == pytest.approx(0.5)
    assert not rows[("live index", "ndcg@10")]["significant"]
    assert "no significant gain over the live index (ndcg@10 +0.0000 (p=1.00)" in significant_gain(
        compare(new, live_same, ("ndcg@10",))
    )
    live_worse = score({"dense": miss}, qrels, "dense")
    assert significant_gain(compare(new, live_worse, ("ndcg@10",))) is None
    assert significant_gain(compare(new, None, ("ndcg@10",))) is None  # a first index: nothing to beat
    # Only a new model must beat the live index: a rebuild with the promoted one ranks as it does, and refusing it
    # would refuse every later run's rebuild too (a big diff, a new representation, a part-edited index).
    from types import SimpleNamespace

    from embedpipe.index.indexing import _gate

    settings = dataclasses.replace(Settings.from_env({}), gate_metric="ndcg@10", gate_require_significant_gain=True)
    assert _gate(SimpleNamespace(settings=settings, kind="full"), new, live_same, "live")[0] is False
    assert _gate(SimpleNamespace(settings=settings, kind="incremental"), new, live_same, "live")[0] is True
