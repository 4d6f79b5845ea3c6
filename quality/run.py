"""``make quality``: what the pipeline's search serves, measured on a real public BEIR collection (default: CISI).

Starts a local stack in its own state dir (``.embedpipe/quality``, wiped first) on free ports, uploads the collection
with ``embedpipe upload --wait`` (train, embed, index, evaluate, gate) and reads the final index-updated event. Then
every query of ``qrels/test.tsv`` with a judged-relevant document is sent to the search service as it answers by
default (``GET /search?dataset=&q=&k=100``, no ``mode``), and the hits are scored with trec_eval (``pytrec_eval``):
recall@1/5/10/100, mrr@10 (recip_rank of the ranking cut at 10) and ndcg@10, averaged over those queries (a query
with no hits scores 0). Next to that: the event's own metrics per mode (bm25, base, dense, hybrid, served).
Writes ``quality-results.json`` at the repo root and prints a table; exits non-zero when the run failed or the service
could not be measured (e.g. the gate rejected the run, so nothing is served).

    python -m quality.run            # its checks: tests/unit/test_quality.py

Env: ``EMBEDPIPE_QUALITY_DATA`` (a BEIR folder; default ``../shared/data/cisi`` beside the repo),
``EMBEDPIPE_QUALITY_DATASET`` (dataset name; default the folder name). Other ``EMBEDPIPE_*`` settings (e.g.
``EMBEDPIPE_TRAIN_MAX_STEPS``) pass through to the stack; its state dir, project and ports are set here.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from embedpipe.local.stack import isolated_ports
from embedpipe.retrieval.evaluation import evaluate  # trec_eval through pytrec_eval, the pipeline's own definitions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "quality-results.json"
STATE = ROOT / ".embedpipe" / "quality"
MODES = ("bm25", "base", "bm25+base", "dense", "hybrid", "served")  # bm25+base: the off-the-shelf RRF of both
COLUMNS = ("recall@10", "ndcg@10", "mrr@10", "recall@100")
UP_ATTEMPTS = 3


class QualityError(RuntimeError):
    pass


def locate() -> tuple[Path, str]:
    """The BEIR folder and dataset name (env overrides; the default path is resolved against the repo root)."""
    raw = os.environ.get("EMBEDPIPE_QUALITY_DATA")
    path = Path(raw).resolve() if raw else (ROOT / ".." / "shared" / "data" / "cisi").resolve()
    if not (path / "corpus.jsonl").is_file() or not (path / "qrels" / "test.tsv").is_file():
        raise QualityError(
            f"no BEIR collection at {path} (corpus.jsonl, queries.jsonl, qrels/test.tsv): set "
            "EMBEDPIPE_QUALITY_DATA to a BEIR folder (and EMBEDPIPE_QUALITY_DATASET to its dataset name)"
        )
    return path, os.environ.get("EMBEDPIPE_QUALITY_DATASET") or path.name.lower()


def load_judged(path: Path) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """qrels/test.tsv of the queries with at least one relevant document, and the query texts."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path / "qrels" / "test.tsv", newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(float(row["score"]))
    judged = {q: rels for q, rels in qrels.items() if any(s > 0 for s in rels.values())}
    with open(path / "queries.jsonl") as fh:
        texts = {str(d["_id"]): d["text"] for d in map(json.loads, filter(str.strip, fh))}
    return judged, texts


def cpu_info() -> dict:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    amx = sorted(f for f in flags if f.startswith("amx"))
    bf16 = "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "none"
    return {"model": fields.get("model name", "unknown"), "cores": os.cpu_count(), "bf16": bf16, "amx_flags": amx}


def stack_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "EMULATOR_HOST" not in k}
    env.update(
        {
            "EMBEDPIPE_STATE_DIR": str(STATE),
            "EMBEDPIPE_PROJECT": "embedpipe-quality",
            **isolated_ports().env(),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    return env


def search_port(env: dict[str, str]) -> int:
    from embedpipe.config import Settings
    from embedpipe.local.stack import component_ports

    return component_ports(Settings.from_env(env))["search"]


def query_service(port: int, dataset: str, judged: dict, texts: dict) -> tuple[dict[str, list[str]], dict]:
    """The service's default top 100 for each judged query; also which modes and collections answered."""
    ranked, seen = {}, {"modes": set(), "collections": set()}
    for q in judged:
        if q not in texts:
            continue  # no text to send: scores 0
        qs = urllib.parse.urlencode({"dataset": dataset, "q": texts[q], "k": 100})
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/search?{qs}", timeout=120) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise QualityError(f"search {q}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}") from None
        ranked[q] = [str(h["id"]) for h in body.get("hits", [])]
        seen["modes"].add(body.get("mode"))
        seen["collections"].add(body.get("collection"))
    return ranked, {k: sorted(map(str, v)) for k, v in seen.items()}


def gate_reason(gate) -> str:
    return str(gate.get("reason", "-") if isinstance(gate, dict) else gate)


def measure(data_dir: Path, dataset: str, env: dict[str, str], result: dict) -> None:
    """Stack up, upload and wait, score the search service, stack down; fills ``result`` as it goes (so what was
    measured before a failure is kept) and raises QualityError on a failure."""
    exe = str(Path(sys.executable).parent / "embedpipe")

    def cli(*args: str, **kw) -> subprocess.CompletedProcess:  # stderr (progress) goes to ours
        return subprocess.run([exe, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True, **kw)

    cli("down", timeout=120)  # a stack left in our state dir by an interrupted run
    shutil.rmtree(STATE, ignore_errors=True)
    try:
        for attempt in range(UP_ATTEMPTS):
            if cli("up", timeout=600).returncode == 0:
                break
            # free ports come from the ephemeral range, where another process may take one of the consecutive
            # function ports before our processes bind it: stop what started and try fresh ports
            cli("down", timeout=120)
            if attempt == UP_ATTEMPTS - 1:
                raise QualityError(f"embedpipe up failed {UP_ATTEMPTS} times (see above)")
            env.update(stack_env())
        t0 = time.time()
        res = cli(
            "upload",
            str(data_dir),
            "--dataset",
            dataset,
            "--wait",
            "--timeout",
            "0",
        )  # fmt: skip  (no time limit: a slow machine's run that is still going is waited for)
        result["upload_wait_s"] = round(time.time() - t0, 1)
        try:
            event = json.loads(res.stdout)
        except json.JSONDecodeError:
            event = None
        if res.returncode or not isinstance(event, dict):
            raise QualityError(f"embedpipe upload exited {res.returncode}; event: {res.stdout.strip()[:2000] or '-'}")
        data = event.get("data") or {}
        result["metrics_by_mode"] = data.get("metrics_by_mode") or {}
        keys = ("default_search_mode", "promoted", "gate", "model", "stage_seconds", "run_id", "collection")
        for key in (*keys, "selection", "selection_agreement"):
            result[key] = data.get(key)
        judged, texts = load_judged(data_dir)
        try:
            ranked, seen = query_service(search_port(env), dataset, judged, texts)
        except QualityError as exc:
            if data.get("promoted") is False:  # e.g. the first index rejected by the gate: nothing is served
                reason = gate_reason(data.get("gate"))
                raise QualityError(f"the run was not promoted ({reason}), so nothing is served: {exc}") from None
            raise
        result["served_via_search_service"] = evaluate(ranked, judged)
        result["served_via_search_service_info"] = {**seen, "queries": len(judged), "queries_sent": len(ranked)}
    finally:
        cli("down", timeout=120)
    if data.get("promoted") and data.get("collection") and seen["collections"] != [data["collection"]]:
        print(f"warning: the service answered from {seen['collections']}, not {data['collection']}", file=sys.stderr)


def table(result: dict) -> str:
    rows = [(m, (result.get("metrics_by_mode") or {}).get(m)) for m in MODES]
    rows.append(("served (via search service)", result.get("served_via_search_service")))
    lines = [f"{'mode':<28}" + "".join(f"{c:>12}" for c in COLUMNS), "-" * (28 + 12 * len(COLUMNS))]
    for name, m in rows:
        m = m if isinstance(m, dict) else {}
        cells = (f"{m[c]:.3f}" if isinstance(m.get(c), int | float) else "-" for c in COLUMNS)
        lines.append(f"{name:<28}" + "".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def main() -> int:
    t0 = time.time()
    try:
        data_dir, dataset = locate()
    except QualityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = {
        "dataset": dataset,
        "data": str(data_dir),
        "cpu": cpu_info(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    status = 0
    try:
        measure(data_dir, dataset, stack_env(), result)
    except (QualityError, subprocess.TimeoutExpired) as exc:
        result["error"] = str(exc)
        status = 1
    result["wall_s"] = round(time.time() - t0, 1)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    if "metrics_by_mode" in result:  # the run ended: show what it measured, even if the service check failed
        print(table(result))
        modes = (result.get("served_via_search_service_info") or {}).get("modes") or ["-"]
        print(
            f"\n{dataset}: promoted={result.get('promoted')} ({gate_reason(result.get('gate'))}); "
            f"default search mode {result.get('default_search_mode')}; the service answered in mode "
            f"{', '.join(modes)}; wall {result['wall_s']:.0f}s"
        )
        if agree := result.get("selection_agreement"):  # after the fact: did the selection split order the modes well
            print(
                f"selection split ({(result.get('selection') or {}).get('split')}) ordered the modes "
                f"{' > '.join(agree['selection_order'])}, the test split {' > '.join(agree['test_order'])} "
                f"({agree['pairs']} pairs alike; {agree['metric']} lost to the choice: {agree['test_loss']:.4f})"
            )
    if status:
        print(f"error: {result['error']}", file=sys.stderr)
    print(f"written to {RESULTS}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
