"""The ``embedpipe`` command line. Every flag has an ``EMBEDPIPE_*`` env twin; results go to stdout, logs to stderr."""

from __future__ import annotations

import atexit
import gc
import json
import os
import sys
import time
import uuid
from pathlib import Path

import typer

from embedpipe import logs, topology
from embedpipe.config import TRAIN_OVERRIDES, Settings, SettingsError, check_overrides, setdefault_env
from embedpipe.contracts import datasets
from embedpipe.contracts.events import Event, object_key, object_uri_key, request_key
from embedpipe.gcp import storage
from embedpipe.ledger import runs

# Imported by the commands that use them, not at start-up: ``upload`` (the e2e path: every second of its start-up is
# orchestration overhead) needs neither the stack's process control nor the Pub/Sub module nor urllib's HTTP client.

# The process ends right after its command: the interpreter's last collections would walk every object the imports
# made (typer, pydantic, the Google clients) only to free memory the OS takes back anyway. Measured: 0.07 -> 0.01 s
# of exit on an idle 2-core machine, 0.6 -> 0.07 s on a busy one (the end of every `upload --wait`).
atexit.register(gc.freeze)

app = typer.Typer(
    help="Keep a Milvus index fresh with a domain-tuned embedding model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def err(msg: str) -> None:
    typer.echo(msg, err=True)


def settings() -> Settings:
    try:
        s = Settings.from_env()
    except SettingsError as exc:
        err(f"error: {exc}")
        raise typer.Exit(2) from None
    # the entry point points this process' Google clients at the local emulators (they read these vars themselves)
    setdefault_env(**s.emulator_env())
    return s


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", envvar="EMBEDPIPE_VERBOSE")) -> None:
    try:
        fmt = Settings.from_env().log_format
    except SettingsError:  # reported by the command that needs the settings
        fmt = "text"
    logs.setup(10 if verbose else 20, fmt)


@app.command()
def up() -> None:
    """Start the local stack in the background; returns when every part answers."""
    from embedpipe.local import stack

    s = settings()
    try:
        stack.up(s, echo=err)
    except stack.StackError as exc:
        err(f"error: {exc}")
        raise typer.Exit(1) from None
    err(f"local stack is up (state in {s.state_path}); stop it with: embedpipe down")


@app.command()
def down() -> None:
    """Stop the local stack and any running local job, leaving no process behind."""
    from embedpipe.local import stack

    stack.down(settings(), echo=err)


@app.command()
def status(as_json: bool = typer.Option(False, "--json", envvar="EMBEDPIPE_JSON")) -> None:
    """Show each part of the local stack, its port and health."""
    from embedpipe.local import stack

    rows = stack.status(settings())
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        typer.echo(f"{r['part']:<22} {str(r['port'] or '-'):>6}  {r['health']:<14} pid {r['pid'] or '-'}")
    if any(r["health"] != "ok" for r in rows):
        raise typer.Exit(1)


POLL_S = 0.1  # how often ``--wait`` reads the run records
# ... and once a run is indexing: that stage takes seconds (the jobs before it minutes), and its end is what --wait
# reports, so it is noticed within a few hundredths rather than a tenth of a second
POLL_FINAL_S = 0.03
# A wait with no time limit still gives up on uploads or messages the pipeline never takes up (it is down, a bucket
# notification is missing): claims come within seconds when it runs. Runs themselves are waited for as long as they
# go on; the pipeline's own deadlines end a stuck one.
CLAIM_TIMEOUT_S = float(os.environ.get("EMBEDPIPE_CLAIM_TIMEOUT_S", "300"))


def _wait_for_runs(s: Settings, keys: list[str], timeout: float, ledger=None, sleep=time.sleep) -> dict:
    """Wait until every trigger key is claimed and its run has ended; returns the last run's record.

    Each poll reads the run records only (one object per run). The claims are read until every key has one, and
    again once every run has ended: an upload that arrived as its run launched moves, with its claim, to the next
    run, which is then waited for too. The claims are read side by side (one round trip, not one per uploaded file:
    that second reading is on the path from index-updated to the command's exit), and the ended run's record is
    the one this poll read."""
    from concurrent.futures import ThreadPoolExecutor

    ledger = ledger or runs.Ledger(s.artifacts_bucket)
    with ThreadPoolExecutor(max_workers=min(8, len(keys) or 1)) as pool:
        told: set[str] = set()
        first_poll = time.time()

        def claimed() -> list[str]:
            claims = list(pool.map(ledger.get_claim, keys))
            runs_of = sorted({c["run_id"] for c in claims if c})
            missing = [k for k, c in zip(keys, claims) if not c]
            if not missing:
                return runs_of
            refused = {k: r for k, r in zip(missing, pool.map(ledger.get_rejection, missing)) if r}
            for key in sorted(set(refused) - told):  # refused (a bad file name, a bad retrain): never claimed
                err(f"  refused: {refused[key]['reason']}")
                told.add(key)
            if len(refused) == len(missing):  # every key settled: follow what was claimed, if anything
                if not runs_of:
                    err("error: everything sent was refused (above)")
                    raise typer.Exit(2)
                return runs_of
            waited = time.time() - first_poll
            if waited > CLAIM_TIMEOUT_S:
                err(
                    f"error: {len(missing)} of {len(keys)} uploads or messages were not taken up by the pipeline "
                    f"within {CLAIM_TIMEOUT_S:.0f}s: is it running (`embedpipe status`)? See `embedpipe runs`."
                )
                raise typer.Exit(3)
            return []

        record = _poll_runs(ledger, claimed, timeout, sleep)
    return ledger.view(record["run_id"], record)  # with late verdicts


def _poll_runs(ledger, claimed, timeout: float, sleep) -> dict:
    """``_wait_for_runs``' loop: the newest of the runs the keys are claimed by, as read once they have all ended."""
    deadline = time.time() + timeout if timeout > 0 else float("inf")
    run_ids: list[str] = []
    try:
        return _poll_until(ledger, claimed, deadline, timeout, sleep, run_ids)
    except KeyboardInterrupt:
        err(f"\ninterrupted; the run goes on: follow it with {_follow(run_ids) or '`embedpipe runs`'}")
        raise typer.Exit(130) from None


def _follow(run_ids: list[str]) -> str:
    return " or ".join(f"`embedpipe wait {r}`" for r in run_ids)


def _poll_until(ledger, claimed, deadline: float, timeout: float, sleep, run_ids: list[str]) -> dict:
    last_state = None
    while time.time() < deadline:
        if not run_ids:
            run_ids[:] = claimed()
        records = [r for r in (ledger.get_run(r) for r in run_ids) if r]
        if run_ids:
            states = ", ".join(f"{r['run_id']}={r['state']}" for r in records)
            if states != last_state:
                err(f"  {time.strftime('%H:%M:%S')} {states}")
                last_state = states
            if records and all(r["state"] in runs.TERMINAL for r in records):
                moved = claimed()
                if moved == run_ids:
                    return max(records, key=lambda r: r["created_at"])
                run_ids[:] = moved
                continue
        sleep(POLL_FINAL_S if any(r["state"] in (runs.INDEXING, runs.PUBLISHING) for r in records) else POLL_S)
    if run_ids:
        err(
            f"error: stopped waiting after {timeout:.0f}s; the run goes on: follow it with {_follow(run_ids)} "
            "(or `embedpipe runs`)"
        )
    else:
        err(f"error: no run claimed what was sent within {timeout:.0f}s; see `embedpipe runs` and `embedpipe status`")
    raise typer.Exit(3)


def summary(record: dict) -> str:
    data = (record.get("final_event") or {}).get("data") or {}
    lines = [f"run {record['run_id']} ({record['dataset']}): {record['state']}"]
    if record["state"] == runs.FAILED:
        lines.append(f"  failed in {data.get('stage')}: {data.get('cause', '')[:500]}")
        return "\n".join(lines)
    c = data.get("counts", {})
    skipped = f", {c['skipped']} skipped (neither title nor text)" if "skipped" in c else ""
    lines.append(
        f"  documents: {c.get('total')} total, {c.get('upserted')} upserted, {c.get('deleted')} deleted, "
        f"{c.get('unchanged')} unchanged{skipped} -> {data.get('collection')}"
    )
    absent = (data.get("eval") or {}).get("qrels_absent")
    if absent:
        lines.append(f"  qrels rows naming documents not in the corpus: {absent} (scored as relevant, unretrievable)")
    for label, m in (("new", data.get("metrics")), ("previous", data.get("previous_metrics"))):
        if m:
            lines.append(f"  {label:<9} " + "  ".join(f"{k}={v:.3f}" for k, v in m.items()))
    by_mode = data.get("metrics_by_mode") or {}
    for mode, m in by_mode.items():
        lines.append(f"  {mode:<9} " + "  ".join(f"{k}={v:.3f}" for k, v in m.items()))
    lines.append(
        f"  promoted: {data.get('promoted')} ({(data.get('gate') or {}).get('reason')}); "
        f"default search mode: {data.get('default_search_mode')}"
    )
    by_rival: dict[str, list] = {}
    for c in (data.get("gate") or {}).get("comparisons") or []:
        by_rival.setdefault(c["rival"], []).append(c)
    for rival, cs in by_rival.items():  # deltas with their noise: a paired t-test over the eval queries
        said = [
            f"{c['metric']} {c['delta']:+.4f} (p={c['p']:.3f}{'' if c['significant'] else ', within noise'})"
            for c in cs
        ]
        lines.append(f"  vs {rival + ':':<12}" + "; ".join(said))
    if fb := data.get("fallback"):
        what = "the best of what it measured" if fb["mode"] == "served" else "the best baseline"
        lines.append(
            f"  served: {fb['served']} (first-run fallback: the gate rejected this run's own index on the eval "
            f"split, so {what} serves until a run passes the gate; index {fb['collection']})"
        )
    lines.append(
        "  seconds per stage: " + ", ".join(f"{k}={v:.1f}" for k, v in (data.get("stage_seconds") or {}).items())
    )
    return "\n".join(lines)


def report_location(s: Settings, report_uri: str | None) -> str | None:
    """Where a person opens a run's report: locally a copy under the state dir (``file://``, the bucket is fake
    GCS's), in the cloud the object's console page."""
    if not report_uri or not report_uri.startswith("gs://"):
        return None
    bucket, _, name = report_uri[5:].partition("/")
    if s.mode != "local":
        return f"https://console.cloud.google.com/storage/browser/_details/{bucket}/{name}"
    target = s.state_path / "reports" / f"{name.split('/')[1] if name.startswith('runs/') else 'report'}.html"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(report_uri))
    except Exception:  # noqa: BLE001 - a summary without the copy is still a summary
        return report_uri
    return target.resolve().as_uri()


def next_steps(s: Settings, record: dict) -> list[str]:
    """Copy-pasteable commands after a run: open the report, query the index, roll back."""
    data = (record.get("final_event") or {}).get("data") or {}
    dataset = record["dataset"]
    lines = []
    if where := report_location(s, data.get("report_uri")):
        lines.append(f"  report:   {where}")
    if record["state"] == runs.SUCCEEDED and (data.get("promoted") or data.get("previous_collection")):
        lines.append(f'  search:   embedpipe search --dataset {dataset} "your query"')
    previous = data.get("previous_collection")
    if record["state"] == runs.SUCCEEDED and data.get("promoted") and previous and previous != data.get("collection"):
        lines.append(f"  rollback: embedpipe rollback --dataset {dataset}   (back to {data['previous_collection']})")
    if record["state"] == runs.FAILED:
        lines.append(f"  retry:    embedpipe retrain --dataset {dataset} --wait")
    return lines


def _finish(record: dict) -> None:
    err("\n".join([summary(record), *next_steps(settings(), record)]))
    typer.echo(json.dumps(record["final_event"], indent=2))
    raise typer.Exit(0 if record["state"] == runs.SUCCEEDED else 1)


@app.command("wait")
def wait_run(
    run_id: str = typer.Argument(..., help="a run id (embedpipe runs lists them)"),
    timeout: float = typer.Option(0.0, "--timeout", envvar="EMBEDPIPE_TIMEOUT", help="seconds (0: as long as it runs)"),
) -> None:
    """Follow a run until it ends (e.g. after an upload --wait gave up): its stages, then its summary and event."""
    s = settings()
    ledger = runs.Ledger(s.artifacts_bucket)
    if ledger.get_run(run_id) is None:
        err(f"error: no run {run_id!r} (embedpipe runs lists them)")
        raise typer.Exit(2)
    record = _poll_runs(ledger, lambda: [run_id], timeout, time.sleep)
    _finish(ledger.view(record["run_id"], record))


MAX_WARNINGS = 20  # notice lines ``upload`` prints before summing up the rest


def precheck(directory: Path, dataset: str, echo=err) -> datasets.Dataset:
    """``upload``'s local pre-check, the same verdicts as the cloud-side intake (the same parsers): a broken file
    exits 2 with file:line before anything is uploaded; what a published BEIR folder legitimately holds is accepted
    with warnings on stderr (each skipped document, up to ``MAX_WARNINGS``, then counts)."""
    from embedpipe.gcp import bqsource

    source = Path(directory) / datasets.SOURCE_FILE
    try:
        datasets.check_name(dataset)
        parts = bqsource.parse(source.read_bytes()) if source.is_file() else []
        try:
            ds = datasets.load_dir(directory, dataset, queries_elsewhere=any(p.kind == "queries" for p in parts))
        except datasets.NoCorpus:
            if not any(p.kind == "corpus" for p in parts):
                raise
            ds = datasets.Dataset(dataset, {}, {}, {}, [])
    except (ValueError, datasets.DatasetError) as exc:
        echo(f"error: {exc}")
        raise typer.Exit(2) from None
    if parts:  # the tables are read and checked by the jobs, against the same rules
        echo(f"note: {datasets.SOURCE_FILE} reads {', '.join(p.where for p in parts)}: checked by the jobs")
    for notice in ds.skipped[:MAX_WARNINGS]:
        echo(f"warning: {notice}")
    if len(ds.skipped) > MAX_WARNINGS:
        echo(f"warning: ... and {len(ds.skipped) - MAX_WARNINGS} more")
    if ds.skipped:
        n = len(ds.skipped)
        echo(f"warning: {n} document{'s' * (n != 1)} skipped (neither title nor text); {len(ds.corpus)} kept")
    for split, n in sorted(ds.qrels_absent.items()):
        echo(
            f"warning: qrels/{split}.tsv: {n} row{'s' * (n != 1)} name{'s' * (n == 1)} a document not in the corpus "
            "(kept for evaluation as relevant and unretrievable, left out of training)"
        )
    return ds


WAIT_OPTION = typer.Option(False, "--wait", envvar="EMBEDPIPE_WAIT", help="block until the run ends")
TIMEOUT_OPTION = typer.Option(
    0.0,
    "--timeout",
    envvar="EMBEDPIPE_TIMEOUT",
    help="seconds to wait for the run (0: as long as it runs); a run outlives a timeout: `embedpipe wait RUN_ID`",
)


@app.command()
def upload(
    directory: Path = typer.Argument(..., exists=True, file_okay=False, help="a BEIR folder"),
    dataset: str = typer.Option(..., "--dataset", envvar="EMBEDPIPE_DATASET"),
    wait: bool = WAIT_OPTION,
    timeout: float = TIMEOUT_OPTION,
) -> None:
    """Upload a BEIR folder to gs://DATA/datasets/NAME/; with --wait print the run's final event (stdout)."""
    s = settings()
    precheck(directory, dataset)
    files = sorted(
        p for p in directory.rglob("*") if p.is_file() and datasets.classify(p.relative_to(directory).as_posix())
    )
    from embedpipe.control.intake import name_problem  # the intake's own verdict on object names

    for path in files:
        if problem := name_problem(f"datasets/{dataset}/{path.relative_to(directory).as_posix()}"):
            err(f"error: {path}: {problem}")
            raise typer.Exit(2)
    keys = []
    for path in files:
        rel = path.relative_to(directory).as_posix()
        name = f"datasets/{dataset}/{rel}"
        generation = storage.upload_file(path, f"gs://{s.data_bucket}/{name}")
        keys.append(object_key(s.data_bucket, name, generation))
        err(f"  uploaded {rel} -> gs://{s.data_bucket}/{name}#{generation}")
    if wait:
        _finish(_wait_for_runs(s, keys, timeout))


def _parse_set(values: list[str]) -> dict:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            err(f"error: --set expects key=value, got {item!r}")
            raise typer.Exit(2)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


@app.command()
def retrain(
    dataset: str = typer.Option(..., "--dataset", envvar="EMBEDPIPE_DATASET"),
    set_: list[str] = typer.Option(
        [],
        "--set",
        envvar="EMBEDPIPE_SET",
        help=f"override, e.g. --set learning_rate=3e-5; keys: {', '.join(TRAIN_OVERRIDES)} (env: space-separated)",
    ),
    reason: str = typer.Option("requested from the CLI", "--reason", envvar="EMBEDPIPE_REASON"),
    source: str = typer.Option(
        "",
        "--source",
        envvar="EMBEDPIPE_SOURCE",
        help="read the corpus from BigQuery: bq://PROJECT.DATASET.TABLE (columns id, title, text), or a local "
        "source.json; stored as datasets/NAME/source.json",
    ),
    refresh: bool = typer.Option(
        False,
        "--refresh",
        envvar="EMBEDPIPE_REFRESH",
        help="the data changed (e.g. a BigQuery table): re-read it, update the live index incrementally, no training",
    ),
    allow_shrink: bool = typer.Option(  # no env twin: a confirmation is given per command, never left exported
        False,
        "--allow-shrink",
        help="confirm that the new index may lack live documents (corpus parts removed or quarantined); without "
        "it such an index is refused when it lacks more than EMBEDPIPE_MAX_DELETE_SHARE of them, or any of a "
        "quarantined part's",
    ),
    wait: bool = WAIT_OPTION,
    timeout: float = TIMEOUT_OPTION,
) -> None:
    """Publish a retrain message for a dataset (full run: train, embed, index, gate; --refresh: re-read the data)."""
    s = settings()
    try:  # the retrain handler's own check, before anything is published
        overrides = check_overrides(_parse_set(set_), cloud=s.mode == "gcp")
        if s.mode == "local" and "base_model" in overrides and Path(overrides["base_model"]).is_dir():
            overrides["base_model"] = str(Path(overrides["base_model"]).resolve())
    except ValueError as exc:
        err(f"error: --set: {exc}")
        raise typer.Exit(2) from None
    if refresh and (overrides or allow_shrink):
        err("error: --refresh does not train: drop --set and --allow-shrink")
        raise typer.Exit(2)
    if not source and (problem := dataset_problem(s, dataset)):
        err(f"error: {problem}")
        raise typer.Exit(2)
    if source and allow_shrink:  # the new source.json starts its own run, which a message could not confirm
        err("error: --allow-shrink confirms a retrain of the stored sources: write --source first, then retrain")
        raise typer.Exit(2)
    written = _store_source(s, dataset, source) if source else None
    if written and not overrides and not refresh:
        # the new source.json is itself a change that starts a full run: a retrain message too could start a second
        # one (the message can be handled before the bucket's notification arrives)
        err("  the new source.json starts the run")
        if wait:
            _finish(_wait_for_runs(s, [written], timeout))
        return
    request_id = uuid.uuid4().hex  # the trigger key (message ids repeat where the emulator restarts)
    body = {"dataset": dataset, "overrides": overrides, "reason": reason, "request_id": request_id}
    if refresh:
        body["refresh"] = True
    if allow_shrink:
        body["allow_shrink"] = True
    from embedpipe.gcp import bus

    message_id = bus.publish_raw(s.project, topology.RETRAIN_REQUESTS, json.dumps(body).encode())
    err(f"  published retrain request {message_id} (request {request_id})")
    if wait:
        _finish(_wait_for_runs(s, [request_key(request_id)], timeout))


def dataset_problem(s: Settings, dataset: str, ledger=None) -> str | None:
    """Why a retrain of ``dataset`` would find nothing to train on (a typo would otherwise leave a FAILED run in the
    ledger): a bad name, or a dataset no upload ever reached and of which the data bucket holds nothing. Names the
    known datasets closest to it."""
    try:
        datasets.check_name(dataset)
    except ValueError as exc:
        return str(exc)
    ledger = ledger or runs.Ledger(s.artifacts_bucket)
    if ledger.has_dataset(dataset) or storage.has_objects(datasets.prefix(s.data_bucket, dataset)):
        return None
    known = ledger.list_datasets()
    if close := runs.closest_names(dataset, known):
        hint = f"did you mean {' or '.join(close)}?"
    elif known:
        hint = f"known: {', '.join(known[:20])}"
    else:
        hint = "upload one first: embedpipe upload DIR --dataset NAME"
    return f"no dataset {dataset!r} (nothing uploaded under datasets/{dataset}/); {hint}"


def _store_source(s, dataset: str, source: str) -> str | None:
    """Write ``datasets/NAME/source.json``: a local file as it is, or ``bq://P.D.T`` as the corpus part of the
    stored one (its other parts kept; the corpus part replaced whole). Validated first; not rewritten when unchanged.
    Returns the upload's trigger key when it was written (the write is an upload event that starts a run)."""
    from google.api_core import exceptions as gexc

    from embedpipe.gcp import bqsource

    datasets.check_name(dataset)
    uri = f"gs://{s.data_bucket}/datasets/{dataset}/{datasets.SOURCE_FILE}"
    try:
        stored = storage.read_bytes(uri)
    except gexc.NotFound:
        stored = None
    try:
        if source.startswith("bq://"):
            doc = json.loads(stored) if stored else {}
            doc = doc if isinstance(doc, dict) else {}
            doc["corpus"] = {"table": bqsource.bq_uri_table(source)}
            data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
        else:
            data = Path(source).read_bytes()
        bqsource.parse(data, source if not source.startswith("bq://") else datasets.SOURCE_FILE)
    except (ValueError, OSError) as exc:  # DatasetError is a ValueError: file, line, reason
        err(f"error: {exc}")
        raise typer.Exit(2) from None
    if data == stored:
        err(f"  {uri} unchanged")
        return None
    generation = storage.write_bytes(uri, data, content_type="application/json")
    err(f"  wrote {uri}#{generation}")
    return object_uri_key(uri, generation)


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user with no name: the rollback is still recorded
        return ""


@app.command()
def rollback(
    dataset: str = typer.Option(..., "--dataset", envvar="EMBEDPIPE_DATASET"),
    to: str = typer.Option(
        "",
        "--to",
        envvar="EMBEDPIPE_TO",
        help="run id of a kept promoted index (default: the one the newest promotion replaced)",
    ),
    reason: str = typer.Option("requested from the CLI", "--reason", envvar="EMBEDPIPE_REASON"),
) -> None:
    """Point the dataset's alias back at a kept, earlier promoted index; print its index-updated event (stdout)."""
    from embedpipe.gcp import bus
    from embedpipe.index import rollback as rb
    from embedpipe.retrieval import vectorstore

    s = settings()
    try:
        datasets.check_name(dataset)
    except ValueError as exc:
        err(f"error: {exc}")
        raise typer.Exit(2) from None
    try:
        outcome = rb.rollback(
            s,
            runs.Ledger(s.artifacts_bucket),
            vectorstore.connect(s.milvus_uri, s.milvus_token),
            lambda topic, event: bus.publish(s.project, topic, event),
            dataset,
            to=to or None,
            by=_user(),
            reason=reason,
        )
    except rb.RollbackRefused as exc:
        err(f"error: {exc}")
        raise typer.Exit(1) from None
    err(outcome.message)
    if outcome.event:
        typer.echo(json.dumps(outcome.event, indent=2))


@app.command("runs")
def list_runs(as_json: bool = typer.Option(False, "--json", envvar="EMBEDPIPE_JSON")) -> None:
    """List runs from the ledger."""
    records = runs.Ledger(settings().artifacts_bucket).list_runs()
    if as_json:
        typer.echo(json.dumps(records, indent=1))
        return

    def cell(m: dict | None, key: str) -> str:
        return f"{m[key]:.3f}" if m and isinstance(m.get(key), (int, float)) else "-"

    typer.echo(
        f"{'run':<24} {'dataset':<16} {'state':<11} {'promoted':<8} {'mode':<6} "
        + " ".join(f"{m + ' nDCG@10':>14}" for m in ("served", "base", "bm25"))
        + f" {'served R@10':>11}  created"
    )
    for r in records:
        data = (r.get("final_event") or {}).get("data") or {}
        by_mode = data.get("metrics_by_mode") or {}
        served = by_mode.get("served") or r.get("metrics")
        typer.echo(
            f"{r['run_id']:<24} {r['dataset']:<16} {r['state']:<11} {r.get('promoted')!s:<8} "
            f"{data.get('default_search_mode') or '-':<6} "
            + " ".join(f"{cell(m, 'ndcg@10'):>14}" for m in (served, by_mode.get("base"), by_mode.get("bm25")))
            + f" {cell(served, 'recall@10'):>11}  {r['created_at']}"
        )


@app.command()
def events(follow: bool = typer.Option(False, "--follow", "-f", envvar="EMBEDPIPE_FOLLOW")) -> None:
    """Show index-updated, run events and dead letters (CloudEvents JSON, one per line). In the cloud, dead letters
    are left unacknowledged, so they stay in their subscription (7 days) for the next reader too; this machine
    keeps a copy in events.jsonl and shows each message once."""
    from embedpipe.gcp import bus

    s = settings()
    log_file, ids_file = s.state_path / "events.jsonl", s.state_path / "events.ids"  # ids: Pub/Sub message ids shown
    seen = set(ids_file.read_text().split()) if ids_file.exists() else set()
    dead_letters = set(topology.dead_letter_topics())
    shown = 0
    while True:
        for topic in topology.event_log_topics():
            sub = f"projects/{s.project}/subscriptions/{topology.log_subscription(topic)}"
            keep = s.mode == "gcp" and topic in dead_letters
            for data, attrs, message_id in bus.pull(sub, timeout=2, ack=not keep):
                if message_id in seen:
                    continue
                seen.add(message_id)
                try:
                    doc = Event.from_pubsub(data, attrs).to_structured()
                except Exception:  # noqa: BLE001 - dead letters may be anything: show them raw
                    doc = {
                        "topic": topic,
                        "message_id": message_id,
                        "attributes": attrs,
                        "data": data.decode(errors="replace"),
                    }
                with open(log_file, "a") as fh:
                    fh.write(json.dumps(doc) + "\n")
                with open(ids_file, "a") as fh:
                    fh.write(message_id + "\n")
        lines = log_file.read_text().splitlines() if log_file.exists() else []
        for line in lines[shown:]:
            typer.echo(line)
        shown = len(lines)
        if not follow:
            return
        time.sleep(1)


@app.command()
def search(
    query: str = typer.Argument(...),
    dataset: str = typer.Option(..., "--dataset", envvar="EMBEDPIPE_DATASET"),
    k: int = typer.Option(10, "-k", "--k", envvar="EMBEDPIPE_K"),
    mode: str = typer.Option(
        "",
        "--search-mode",
        envvar="EMBEDPIPE_SEARCH_MODE",
        help="dense | bm25 | hybrid (default: the mode the promoted run chose)",
    ),
    as_json: bool = typer.Option(False, "--json", envvar="EMBEDPIPE_JSON"),
) -> None:
    """Query the search service over the dataset's promoted index."""
    s = settings()
    import urllib.parse
    import urllib.request

    from embedpipe.local import stack

    port = stack.component_ports(s)["search"]
    qs = urllib.parse.urlencode({"dataset": dataset, "q": query, "k": k, **({"mode": mode} if mode else {})})
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/search?{qs}", timeout=120) as resp:
            result = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        err(f"error: {exc.code}: {exc.read().decode(errors='replace')}")
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    for i, h in enumerate(result["hits"], 1):
        typer.echo(f"{i:>3}. {h['score']:.4f}  {h['id']:<12} {h['title']}")


deploy_app = typer.Typer(help="Deploy the topology (the same one `embedpipe up` runs locally) to a cloud.")
app.add_typer(deploy_app, name="deploy")


@deploy_app.command("gcp")
def deploy_gcp(
    project: str = typer.Option(..., "--project", envvar="EMBEDPIPE_PROJECT", help="GCP project id"),
    region: str = typer.Option("us-central1", "--region", envvar="EMBEDPIPE_REGION"),
    dry_run: bool = typer.Option(False, "--dry-run", envvar="EMBEDPIPE_DRY_RUN", help="print the plan, touch nothing"),
    vpc_connector: str = typer.Option(
        "", "--vpc-connector", envvar="EMBEDPIPE_VPC_CONNECTOR", help="Serverless VPC connector (private Milvus)"
    ),
) -> None:
    """Create or update everything on GCP, idempotently (see deploy/README.md); --dry-run prints the plan."""
    from embedpipe.deploy.apply import apply
    from embedpipe.deploy.config import DeployError, config_from_settings
    from embedpipe.deploy.plan import plan, render

    try:
        base = Settings.from_env()
    except SettingsError as exc:
        err(f"error: {exc}")
        raise typer.Exit(2) from None
    cfg = config_from_settings(project, region, base, vpc_connector)
    steps = plan(cfg)
    if dry_run:
        typer.echo(render(cfg, steps))
        return
    try:
        counts = apply(cfg, steps, echo=err)
    except DeployError as exc:
        err(f"error: {exc}")
        raise typer.Exit(1) from None
    err(f"deployed to {project}/{region}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


if __name__ == "__main__":
    app(sys.argv[1:])
