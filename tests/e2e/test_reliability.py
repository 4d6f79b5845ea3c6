"""At-least-once delivery, faults and bursts on a real local stack (issue: reliability).

Faults are injected through the stack's own process control (``stack.kill_part``, ``embedpipe up`` to restart) or by
killing a job's process, never by changing production code paths. Each test uses its own dataset, is bounded in
time, and checks the end state: the run completed (or failed with run.failed), the index holds exactly the corpus.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from embedpipe import topology
from embedpipe.contracts import datasets
from embedpipe.gcp import bus, storage
from embedpipe.ledger import runs
from embedpipe.ledger.runs import Ledger
from embedpipe.local import stack
from embedpipe.retrieval import vectorstore
from tests.helpers import (
    FIXTURES,
    cli,
    cli_stack,
    drain,
    isolated_settings,
    job_specs,
    upload_folder,
    wait_for,
    wait_runs_done,
)

pytestmark = pytest.mark.e2e
SECRET = "tok-3x4mpl3-s3cr3t-do-not-log"
TINY = FIXTURES / "tiny_beir"


@pytest.fixture(scope="module")
def env_stack(tmp_path_factory, tiny_model):
    settings = isolated_settings(tmp_path_factory.mktemp("chaos-state"), tiny_model, milvus_token=SECRET)
    with cli_stack(settings) as env:
        yield settings, env


def index_ids(settings, alias: str) -> set[str]:
    client = vectorstore.connect(settings.milvus_uri, settings.milvus_token)
    return set(vectorstore.ids_and_hashes(client, alias))


def assert_index_is_the_corpus(settings, record: dict, folder: Path = TINY) -> None:
    """The live collection holds exactly the corpus' ids, and each row's vector embeds its own document (with the
    run's model), so no row was lost, duplicated or mixed up by the fault."""
    from embedpipe.ml.embedding import encode
    from embedpipe.ml.model import load_model

    corpus = datasets.load_dir(folder).corpus
    alias = vectorstore.alias_name(record["dataset"])
    assert index_ids(settings, alias) == set(corpus)
    client = vectorstore.connect(settings.milvus_uri, settings.milvus_token)
    ids = sorted(corpus)
    rows = {r["id"]: r["dense"] for r in client.get(collection_name=alias, ids=ids, output_fields=["id", "dense"])}
    model, _ = load_model(record["model"]["uri"])
    want = encode(model, [corpus[i].full_text for i in ids])
    got = np.array([rows[i] for i in ids], dtype=np.float32)
    cos = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.999, f"row {ids[int(cos.argmin())]} does not hold its document's vector"


def subscribe(settings, topic: str, name: str) -> str:
    return bus.ensure_pull_subscription(settings.project, topic, name)


def handler_log(settings, topic: str) -> str:
    """The log of the component fed by ``topic``: ``runtime.acked`` names each delivery's message id in the line it
    writes after the handler ran (so whatever the delivery published is published) and before the ack."""
    (component,) = [c for c in topology.COMPONENTS if c.topic == topic]
    log_file = settings.state_path / "logs" / f"{component.name}.log"
    return log_file.read_text(errors="replace") if log_file.exists() else ""


def wait_settled(settings, taps: dict[str, str], seen: dict[str, set[str]], timeout: float = 180) -> None:
    """Wait until no delivery on the tapped topics can publish anything more: every message published there (each
    tap sees them all, ids kept in ``seen``) has been handled, and the taps then hold nothing newer. The handlers'
    logs are read before the taps are pulled: whatever a handled delivery published is in its tap by then."""

    def settled() -> bool:
        logs = {topic: handler_log(settings, topic) for topic in taps}
        done = all(f"[{mid}]" in logs[topic] for topic, ids in seen.items() for mid in ids)
        fresh = False
        for topic, sub in taps.items():
            for _, _, mid in bus.pull(sub, timeout=1):
                seen[topic].add(mid)
                fresh = True
        return done and not fresh

    wait_for(settled, timeout, f"every delivery on {', '.join(taps)} to be handled", interval=0.5)


def test_every_event_delivered_three_times(env_stack):
    """GCS notifications, job-state messages and index requests each arrive 3 times: one job per stage, one
    index-updated for the run."""
    settings, _ = env_stack
    ledger = Ledger(settings.artifacts_bucket)
    updated = subscribe(settings, topology.INDEX_UPDATED, "index-updated-dups")
    taps = {
        t: subscribe(settings, t, f"{t}-dups")
        for t in (topology.DATA_EVENTS, topology.JOB_EVENTS, topology.INDEX_REQUESTS)
    }
    stop = threading.Event()
    copies = {t: 0 for t in taps}
    seen: dict[str, set[str]] = {t: set() for t in taps}  # every message id published on a tapped topic

    def duplicate():
        while True:  # once stopped, until a pass finds nothing: every original published so far is copied
            pulled = False
            for topic, sub in taps.items():
                for data, attrs, message_id in bus.pull(sub, timeout=0.5):
                    pulled = True
                    seen[topic].add(message_id)
                    if attrs.get("x-copy"):
                        continue
                    for _ in range(2):
                        bus.publish_raw(settings.project, topic, data, **attrs, **{"x-copy": "1"})
                        copies[topic] += 1
            if stop.is_set() and not pulled:
                return

    thread = threading.Thread(target=duplicate, daemon=True)
    thread.start()
    try:
        keys = upload_folder(settings, TINY, "dups")
        (record,) = wait_runs_done(ledger, keys)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    # Counted once nothing can publish any more (no time window): every original and copy has been handled.
    wait_settled(settings, taps, seen)
    assert record["state"] == runs.SUCCEEDED, record.get("error")
    assert copies[topology.DATA_EVENTS] >= 2 * len(keys) and copies[topology.JOB_EVENTS] >= 4
    assert copies[topology.INDEX_REQUESTS] >= 2
    stages = sorted(s["labels"]["stage"] for s in job_specs(settings, record["run_id"]))
    assert stages == ["embed", "train"], "exactly one job per stage"
    assert sorted(record["triggers"]) == sorted(keys)
    events = [json.loads(d) for d, a, _ in drain(updated) if a.get("ce-subject") == record["run_id"]]
    assert len(events) == 1, "exactly one index-updated per run"
    assert_index_is_the_corpus(settings, record)


def _replica_pids(job_dir: Path) -> list[int]:
    runner = int((job_dir / "runner.pid").read_text())
    out = subprocess.run(["pgrep", "-P", str(runner)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.parametrize("stage", ["train", "embed"])
def test_killed_job_process_is_retried(env_stack, stage):
    settings, _ = env_stack
    ledger = Ledger(settings.artifacts_bucket)
    keys = upload_folder(settings, TINY, f"kill-{stage}")
    state = {"train": runs.TRAINING, "embed": runs.EMBEDDING}[stage]

    def replica_of_stage():
        claim = ledger.get_claim(keys[0])
        record = claim and ledger.get_run(claim["run_id"])
        if not record or record["state"] != state:
            return None
        job_dir = settings.state_path / "jobs" / record["jobs"][stage]["name"].rsplit("/", 1)[-1]
        return _replica_pids(job_dir) if (job_dir / "runner.pid").exists() else None

    for pid in wait_for(replica_of_stage, 120, f"the {stage} replica process", interval=0.1):
        os.kill(pid, signal.SIGKILL)
    (record,) = wait_runs_done(ledger, keys)
    assert record["state"] == runs.SUCCEEDED, record.get("error")
    assert record["jobs"][stage]["attempt"] == 2
    jobs = [s for s in job_specs(settings, record["run_id"]) if s["labels"]["stage"] == stage]
    assert sorted(s["status"]["state"] for s in jobs) == ["FAILED", "SUCCEEDED"]
    assert_index_is_the_corpus(settings, record)


def test_function_process_killed_then_restarted(env_stack):
    settings, env = env_stack
    ledger = Ledger(settings.artifacts_bucket)
    assert stack.kill_part(settings, "on-job-event")
    keys = upload_folder(settings, TINY, "killfn")

    def train_finished():
        claim = ledger.get_claim(keys[0])
        record = claim and ledger.get_run(claim["run_id"])
        return record and any(s["status"]["state"] == "SUCCEEDED" for s in job_specs(settings, record["run_id"]))

    wait_for(train_finished, 120, "the training job to finish while on-job-event is down")
    time.sleep(2)  # its job-state message is now being redelivered to a dead endpoint
    assert cli(env, "up").returncode == 0  # restarts what is not running
    (record,) = wait_runs_done(ledger, keys)
    assert record["state"] == runs.SUCCEEDED, record.get("error")
    assert_index_is_the_corpus(settings, record)


def test_milvus_restart_before_upserts(env_stack):
    settings, env = env_stack
    ledger = Ledger(settings.artifacts_bucket)
    client = vectorstore.connect(settings.milvus_uri, settings.milvus_token)
    before = {name: index_ids(settings, name) for name in client.list_collections()}
    keys = upload_folder(settings, TINY, "milvusdown")

    def embedding():
        claim = ledger.get_claim(keys[0])
        record = claim and ledger.get_run(claim["run_id"])
        return record if record and record["state"] in (runs.EMBEDDING, runs.INDEXING) else None

    wait_for(embedding, 120, "the run to reach EMBEDDING")
    assert stack.kill_part(settings, "milvus")
    wait_for(
        lambda: (r := ledger.get_run(embedding()["run_id"])) and r["state"] == runs.INDEXING,
        120,
        "the index request while Milvus is down",
    )
    time.sleep(3)  # the indexer is failing and being redelivered
    assert cli(env, "up").returncode == 0
    (record,) = wait_runs_done(ledger, keys)
    assert record["state"] == runs.SUCCEEDED, record.get("error")
    assert_index_is_the_corpus(settings, record)
    after = {name: index_ids(settings, name) for name in before}
    assert after == before, "what was indexed before survives the restart"


def test_pubsub_emulator_restart_mid_run(env_stack):
    settings, env = env_stack
    ledger = Ledger(settings.artifacts_bucket)
    keys = upload_folder(settings, TINY, "pubsubdown")
    wait_for(
        lambda: (c := ledger.get_claim(keys[-1])) and ledger.get_run(c["run_id"])["state"] == runs.TRAINING,
        120,
        "training to start",
    )
    assert stack.kill_part(settings, "pubsub")
    time.sleep(2)
    assert cli(env, "up").returncode == 0  # restarts the emulator and re-provisions the topology
    (record,) = wait_runs_done(ledger, keys)
    assert record["state"] == runs.SUCCEEDED, record.get("error")
    assert_index_is_the_corpus(settings, record)


def test_poison_message_ends_in_dead_letter_topic(env_stack):
    settings, env = env_stack
    assert stack.kill_part(settings, "indexer")
    try:
        bus.publish_raw(settings.project, topology.INDEX_REQUESTS, b'{"run_id": "no-such-run-poison"}')

        def dead_lettered():
            out = cli(env, "events")
            return [line for line in out.stdout.splitlines() if "no-such-run-poison" in line]

        lines = wait_for(dead_lettered, 150, "the message in the indexer's dead-letter topic", interval=2)
        assert json.loads(lines[0])["topic"] == topology.component("indexer").dead_letter_topic
    finally:
        assert cli(env, "up").returncode == 0


def test_burst_of_100_files_one_training_at_a_time(env_stack, tmp_path):
    settings, _ = env_stack
    ledger = Ledger(settings.artifacts_bucket)
    folder = tmp_path / "burst"
    (folder / "corpus").mkdir(parents=True)
    base = list(datasets.load_dir(TINY).corpus.values())
    ids = set()
    for f in range(100):
        lines = []
        for j in range(3):
            doc = base[(f * 3 + j) % len(base)]
            doc_id = f"b{f:03d}-{j}"
            ids.add(doc_id)
            lines.append(json.dumps({"_id": doc_id, "title": doc.title, "text": f"{doc.text} (copy {f}.{j})"}))
        (folder / "corpus" / f"part-{f:03d}.jsonl").write_text("\n".join(lines) + "\n")
    from concurrent.futures import ThreadPoolExecutor

    files = sorted((folder / "corpus").iterdir())
    with ThreadPoolExecutor(8) as pool:
        generations = list(
            pool.map(
                lambda p: storage.upload_file(p, f"gs://{settings.data_bucket}/datasets/burst/corpus/{p.name}"), files
            )
        )
    keys = [f"gcs/{settings.data_bucket}/datasets/burst/corpus/{p.name}#{g}" for p, g in zip(files, generations)]
    records = wait_runs_done(ledger, keys, timeout=400)
    wait_for(
        lambda: not ledger.get_dataset("burst")["pending"] and not ledger.get_dataset("burst")["active"],
        300,
        "follow-up runs to finish",
    )
    records = [r for r in ledger.list_runs() if r["dataset"] == "burst"]
    assert all(r["state"] == runs.SUCCEEDED for r in records), [r.get("error") for r in records]
    assert len(records) <= 3, "a burst coalesces into one run (plus at most a follow-up)"
    spans = sorted(
        (s["status"]["started"], s["status"]["finished"])
        for r in records
        for s in job_specs(settings, r["run_id"])
        if s["labels"]["stage"] == "train"
    )
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), "one training at a time"
    assert index_ids(settings, "burst") == ids


def test_bad_input_is_quarantined_and_nothing_indexed_is_lost(env_stack):
    settings, _ = env_stack
    ledger = Ledger(settings.artifacts_bucket)
    (first,) = wait_runs_done(ledger, upload_folder(settings, TINY, "badin"))
    assert first["state"] == runs.SUCCEEDED
    before = index_ids(settings, "badin")
    long_line = b'{"_id": "long", "text": "' + b"x" * (datasets.MAX_LINE_BYTES + 10) + b'"}\n'
    bad = {  # path -> (bytes, line the error must name, words the reason must contain)
        "corpus/bad-utf8.jsonl": (b'{"_id": "u1", "text": "ok"}\n{"_id": "u2", "text": "\xff\xfe"}\n', 2, "UTF-8"),
        "corpus/bad-json.jsonl": (
            b'{"_id": "j1", "text": "ok"}\n{"_id": "j2"}\n{"_id": "j3", "text": }\n',
            3,  # line 2 (neither title nor text) is a skipped document, not an error
            "invalid JSON",
        ),
        "corpus/dup.jsonl": (b'{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n', 2, "duplicate _id"),
        "corpus/empty.jsonl": (b"", None, "empty"),
        "corpus/binary.jsonl": (b"\x00\x01\x02binary", None, "binary"),
        "corpus/wrongtype.jsonl": (b'{"_id": "w1", "text": 42}\n', 1, "must be a string"),
        "corpus/longline.jsonl": (long_line, 1, "over the"),
        "corpus/zz-cross.jsonl": (b'{"_id": "g01", "text": "a second g01"}\n', 1, "duplicate _id 'g01'"),
        "qrels/dev.tsv": (b"query-id\tcorpus-id\tscore\nq99\tg01\t1\n", 2, "query-id 'q99' is not in queries"),
    }
    good = b'{"_id": "new-1", "text": "Seed trays are washed weekly."}\n{"_id": "new-2", "text": "Hoses coil."}\n'
    badly_named = [
        "datasets/badin/corpus/ctl\x07.jsonl",
        "datasets/badin/../escape/corpus.jsonl",
        "datasets/badin/corpus/" + "n" * 210 + ".jsonl",
    ]
    keys = []
    for rel, (data, _, _) in {**bad, "corpus/extra.jsonl": (good, None, "")}.items():
        gen = storage.write_bytes(f"gs://{settings.data_bucket}/datasets/badin/{rel}", data)
        keys.append(f"gcs/{settings.data_bucket}/datasets/badin/{rel}#{gen}")
    for name in badly_named:
        storage.write_bytes(f"gs://{settings.data_bucket}/{name}", good)
    # under load the uploads may be split over more than one run (the debounce bridges hand-overs, not a slow
    # uploader): each file is judged in whichever run took it, so the rejections of all of them count
    records = wait_runs_done(ledger, keys)
    assert all(r["state"] == runs.SUCCEEDED for r in records), [r.get("error") for r in records]
    errors = {
        e["object"].split("/datasets/badin/", 1)[1]: e for r in records for e in (r.get("file_errors") or {}).values()
    }
    for rel, (_, line, words) in bad.items():
        assert rel in errors, f"{rel} was not rejected"
        assert errors[rel]["line"] == line and words in errors[rel]["reason"], errors[rel]
        assert not storage.exists(f"gs://{settings.data_bucket}/datasets/badin/{rel}")
        assert storage.exists(errors[rel]["quarantined_to"])
    for name in badly_named:
        wait_for(lambda n=name: not storage.exists(f"gs://{settings.data_bucket}/{n}"), 30, f"{name!r} moved")
    assert index_ids(settings, "badin") == before | {"new-1", "new-2"}, "valid files indexed, nothing lost"


def test_secrets_never_leak(env_stack):
    """The Milvus token reached every process (EMBEDPIPE_MILVUS_TOKEN) but appears in no log, event, job spec,
    run record or report."""
    settings, env = env_stack
    cli(env, "events")
    scanned = 0
    for path in settings.state_path.rglob("*"):
        if path.is_file() and "milvus" not in path.relative_to(settings.state_path).parts[:1]:
            scanned += 1
            assert SECRET.encode() not in path.read_bytes(), f"secret leaked into {path}"
    assert scanned > 50
    runs_json = cli(env, "runs", "--json").stdout
    assert SECRET not in runs_json and json.loads(runs_json)


def test_a_quarantined_part_is_absent_not_deleted_and_shrinking_needs_confirmation(env_stack, tmp_path):
    """Issue 25.1/25.2 on the real stack: a corpus in 4 parts; one part re-uploaded with a bad line is quarantined
    and its documents stay live through the runs that follow; the fixed part updates them. A retrain after a part
    was removed is refused without --allow-shrink (the live index stays), and with it the event says how many live
    documents the new index lacks."""
    settings, env = env_stack
    ledger = Ledger(settings.artifacts_bucket)
    corpus_lines = [line for line in (TINY / "corpus.jsonl").read_text().splitlines() if line.strip()]
    docs = {json.loads(line)["_id"]: line for line in corpus_lines}
    judged = {
        row.split("\t")[1]
        for f in (TINY / "qrels").glob("*.tsv")
        for row in f.read_text().splitlines()[1:]
        if row.strip()
    }
    spare = sorted(set(docs) - judged)[:6]  # part 3: unjudged documents, so only the shrink guard can refuse
    rest = [i for i in sorted(docs) if i not in spare]
    parts = [rest[0:6], rest[6:12], rest[12:], spare]
    folder = tmp_path / "parts"
    shutil.copytree(TINY, folder)
    (folder / "corpus.jsonl").unlink()
    (folder / "corpus").mkdir()
    for n, ids in enumerate(parts):
        (folder / "corpus" / f"part-{n}.jsonl").write_text("".join(docs[i] + "\n" for i in ids))
    (first,) = wait_runs_done(ledger, upload_folder(settings, folder, "parts"))
    assert first["state"] == runs.SUCCEEDED and index_ids(settings, "parts") == set(docs)
    bucket = f"gs://{settings.data_bucket}/datasets/parts/corpus"

    def put(rel: str, data: str) -> list[dict]:
        gen = storage.write_bytes(f"{bucket}/{rel}", data.encode())
        return wait_runs_done(ledger, [f"gcs/{settings.data_bucket}/datasets/parts/corpus/{rel}#{gen}"])

    bad = "".join(docs[i] + "\n" for i in parts[1][:3]) + '{"_id": "broken", "text": }\n'
    runs_bad = put("part-1.jsonl", bad)
    assert all(r["state"] == runs.SUCCEEDED for r in runs_bad), [r.get("error") for r in runs_bad]
    assert index_ids(settings, "parts") == set(docs), "the quarantined part's documents stayed live"
    edited = json.loads(docs[parts[2][0]])
    edited["text"] += " Edited."
    (later,) = put("part-2.jsonl", "".join([json.dumps(edited) + "\n", *(docs[i] + "\n" for i in parts[2][1:])]))
    assert later["state"] == runs.SUCCEEDED and later["absent_parts"] == ["datasets/parts/corpus/part-1.jsonl"]
    assert index_ids(settings, "parts") == set(docs), "still absent, still live"

    fixed = put("part-1.jsonl", "".join(docs[i] + "\n" for i in parts[1]))
    assert fixed[-1]["state"] == runs.SUCCEEDED and not fixed[-1].get("absent_parts")
    assert not ledger.get_dataset("parts").get("absent_parts")
    assert index_ids(settings, "parts") == set(docs)

    # part 3 broken and quarantined: a retrain would build an index without its documents
    put("part-3.jsonl", '{"_id": "broken", "text": }\n')
    assert list(ledger.get_dataset("parts")["absent_parts"]) == ["datasets/parts/corpus/part-3.jsonl"]
    refused = cli(env, "retrain", "--dataset", "parts", "--wait", "--timeout", "600")
    data = json.loads(refused.stdout)["data"]
    assert not data["promoted"] and data["counts"]["live_missing"] == len(spare)
    assert f"lacks {len(spare)} of the {len(docs)} live documents" in data["gate"]["reason"]
    assert "--allow-shrink" in data["gate"]["reason"]
    assert index_ids(settings, "parts") == set(docs), "the live index stays"
    allowed = cli(env, "retrain", "--dataset", "parts", "--allow-shrink", "--wait", "--timeout", "600")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    data = json.loads(allowed.stdout)["data"]
    assert data["promoted"] and data["counts"]["live_missing"] == len(spare)
    assert index_ids(settings, "parts") == set(docs) - set(spare)
    assert not ledger.get_dataset("parts").get("absent_parts"), "released by the promotion"
