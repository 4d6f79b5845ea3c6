"""Scale: generated corpora (``bench/corpus_gen.py``) of ``EMBEDPIPE_BENCH_SCALE`` documents each (comma-separated,
default ``10000,100000``; the issue's goal includes 1000000, set it to run that) through the real local stack:
upload -> train (``EMBEDPIPE_TRAIN_MAX_STEPS`` steps, 10 here) -> embed -> index -> eval -> index-updated, with the
tiny random BERT the tests use (2 layers, 32 wide: the pipeline's cost, not a model's). Then an incremental run: the
corpus rewritten with 1% of its documents' text changed (``corpus_gen.mutate``) and only ``corpus.jsonl`` uploaded,
started as soon as the full run has published. Then a second one (another 1% changed), started once the Milvus server
has gone idle (``settle``: Milvus Lite compacts the full load's segments and builds their HNSW indexes in a
background thread for minutes after the load, on the same 2 cores: the first incremental run shares the CPU with
that, the second one measures an update to a settled index, which is what a later incremental update meets; a
managed Milvus does that work on its own nodes). The wait is reported (``settle_s``).

Memory is capped by the OS, with memory cgroups (``RLIMIT_AS`` would kill torch for its virtual reservations). The
bench makes a child of its own memory cgroup (v1 ``memory.limit_in_bytes``, or v2 ``memory.max``) and in it one group
per component, capped at its deployed size (``deploy.config.SIZING``), and one per job (runner and replicas), capped at
``JOB_CAP_MB`` per replica. A poller thread (every ``POLL_S``, ~0.7 ms of CPU each) moves each component's process as
its pid file appears during ``embedpipe up`` (functions-framework's workers, forked later, inherit the group) and each
job's runner as its ``runner.pid`` appears (a local job starts as a child of the function that launched it; its
replicas inherit the job's group). What a process allocated before it was moved stays charged where it was, about one
``POLL_S`` of start-up: cgroup v2 never moves charges and recent v1 kernels refuse ``move_charge_at_immigrate``
(``move_charge`` in the output). The emulators (Pub/Sub, GCS, Milvus, ticker) stay uncapped: they stand in for
managed services. ``EMBEDPIPE_BENCH_CAPS=name=MB,...`` overrides caps (e.g. ``indexer=100`` or ``job=256``, to see a
cap bite); after an OOM kill the bench waits ``EMBEDPIPE_BENCH_OOM_GRACE_S`` (120) for the run to end, then stops
waiting and reports it. Where no memory cgroup can be made, memory is only measured (``VmHWM`` of each component's
processes since start, the job runner's ``max_rss_mb``), ``capped`` says why and a part over its size shows NO.

Reported per size and run (full, incremental, incremental_settled): outcome, kind, counts, stage seconds (the run
record's), documents per second, and per component and job: ``peak_mb`` (the group's peak usage: what the cap limits,
page cache included, which the kernel reclaims before it OOM-kills), ``rss_mb`` (its largest anonymous memory, sampled
each ``POLL_S``), ``cap_mb`` and ``oom_kills``. A file page is charged to the group that first read it, so libraries
already cached (torch) are not charged again: a job's peak is below its runner's ``max_rss_mb``, which counts mapped
library pages. Also per-document embed + index time growth between the two largest sizes
(``growth_embed_index_per_doc``, goal <= 1.3) and each incremental run's embed + index seconds over the full run's
(``N_inc_ratio`` and ``N_inc_settled_ratio``, goal <= 0.03). The table shows flat keys (a part's cap as its peak's
ceiling); the full record goes
to ``bench-scale.json``. A size's state folder (logs) is kept when one of its runs did not succeed (``state_dir``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.corpus_gen import generate, mutate
from bench.e2e import stack_env
from bench.run import ROOT

JOB_CAP_MB = 16 * 1024  # the stated cap for a job replica (an n1-standard-4 has 15 GiB; GPU machines have more)
PHASES = ("full", "incremental", "incremental_settled")
POLL_S = 0.05  # how often new processes are moved into their group and memory is sampled
INC_SHARE = 0.01
SETTLE_IDLE_CPU = 0.05  # the Milvus server is idle once it uses less than this share of a core ...
SETTLE_WINDOW_S = 5.0  # ... over this long
SETTLE_MAX_S = 3600.0


def _mb(size: str) -> float:
    m = re.fullmatch(r"(\d+)(Mi|Gi)", size)
    return float(m[1]) * (1024 if m[2] == "Gi" else 1)


def caps() -> dict[str, float]:
    """MB per component (as deployed) and per job replica, with ``EMBEDPIPE_BENCH_CAPS`` overrides."""
    from embedpipe.deploy.config import SIZING

    out = {name: _mb(size["memory"]) for name, size in SIZING.items()}
    out["job"] = float(JOB_CAP_MB)
    for item in filter(None, os.environ.get("EMBEDPIPE_BENCH_CAPS", "").split(",")):
        name, _, mb = item.partition("=")
        if name.strip() not in out:
            raise ValueError(f"EMBEDPIPE_BENCH_CAPS: unknown part {name!r} (known: {', '.join(out)})")
        out[name.strip()] = float(mb)
    return out


# ---------------------------------------------------------------- cgroups


def _own_memory_groups() -> list[tuple[str, Path]]:
    """(version, folder) of this process's memory cgroup in each mounted hierarchy that has one, v1 first."""
    mounts = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, fs = left.split(), right.split()
        if fs[0] == "cgroup" and "memory" in fs[2].split(","):
            mounts["v1"] = (fields[3], fields[4])
        elif fs[0] == "cgroup2":
            mounts.setdefault("v2", (fields[3], fields[4]))
    found = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        version = "v2" if hid == "0" else "v1" if "memory" in controllers.split(",") else None
        if version in mounts:
            root, mountpoint = mounts[version]
            if path == root or path.startswith(root.rstrip("/") + "/"):
                found.append((version, Path(mountpoint) / os.path.relpath(path, root)))
    return sorted(found)


class Cgroups:
    """A child of the bench's own memory cgroup holding one capped group per component or job; ``version`` is None
    (and ``reason`` says why) where none could be made."""

    def __init__(self, tag: str):
        self.version: str | None = None
        self.base: Path | None = None
        self.parent: Path | None = None
        self.move_charge = False
        self.reason = ""
        problems = []
        for version, parent in _own_memory_groups():
            base = parent / tag
            try:
                if version == "v2" and "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                    # enabling it would need the parent emptied of its processes (v2: no internal processes)
                    raise OSError(f"memory controller not enabled in {parent}/cgroup.subtree_control")
                base.mkdir()
                if version == "v2":  # the groups below need it; base itself holds no process
                    (base / "cgroup.subtree_control").write_text("+memory")
            except OSError as exc:
                problems.append(f"{version} {parent}: {exc}")
                try:
                    base.rmdir()
                except OSError:
                    pass
                continue
            self.version, self.base, self.parent = version, base, parent
            return
        self.reason = "; ".join(problems) or "no memory cgroup (v1 or v2) mounted"

    def group(self, name: str, cap_mb: float) -> Path:
        g = self.base / name
        g.mkdir()
        limit = str(int(cap_mb * 2**20))
        if self.version == "v1":
            (g / "memory.limit_in_bytes").write_text(limit)
            _try_write(g / "memory.memsw.limit_in_bytes", limit)  # where there is swap: no escape into it
            self.move_charge = _try_write(g / "memory.move_charge_at_immigrate", "1")
        else:
            (g / "memory.max").write_text(limit)
            _try_write(g / "memory.swap.max", "0")
        return g

    def stats(self, g: Path) -> dict:
        """peak_mb (usage incl. page cache), rss_mb (anonymous memory now), oom_kills."""
        if self.version == "v1":
            peak = _read_int(g / "memory.max_usage_in_bytes")
            rss = _keyed(g / "memory.stat").get("total_rss")
            oom = _keyed(g / "memory.oom_control").get("oom_kill", 0)
        else:
            peak = _read_int(g / "memory.peak")  # kernel >= 5.19
            rss = _keyed(g / "memory.stat").get("anon")
            oom = _keyed(g / "memory.events").get("oom_kill", 0)
        return {"peak_mb": _to_mb(peak), "rss_mb": _to_mb(rss), "oom_kills": oom}

    def reset_peak(self, g: Path) -> bool:
        """Start the group's peak afresh (v1 only: a v2 memory.peak reset holds only for the writer's open file)."""
        return self.version == "v1" and _try_write(g / "memory.max_usage_in_bytes", "0")

    def cleanup(self) -> None:
        """Move what is left back to the bench's own group, remove the groups."""
        if not self.base:
            return
        for g in [p for p in self.base.iterdir() if p.is_dir()] + [self.base]:
            for pid in (g / "cgroup.procs").read_text().split():
                _try_write(self.parent / "cgroup.procs", pid)
            try:
                g.rmdir()
            except OSError as exc:
                print(f"scale: could not remove cgroup {g}: {exc}", file=sys.stderr)


def move(g: Path, pid: int) -> None:
    """Move ``pid`` and its descendants into ``g`` (those it forks from now on start there)."""
    _try_write(g / "cgroup.procs", str(pid))
    for child in _descendants(pid):  # forked before the move: a fork and a move never interleave
        _try_write(g / "cgroup.procs", str(child))


def _try_write(path: Path, text: str) -> bool:
    try:
        path.write_text(text)
        return True
    except OSError:  # a process gone, a file this kernel lacks, or a value it refuses
        return False


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _keyed(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}
    except (OSError, ValueError):
        return {}


def _to_mb(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def _descendants(root: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, grew = {root}, True
    while grew:
        more = {p for p, pp in parents.items() if pp in tree and p not in tree}
        tree |= more
        grew = bool(more)
    return tree - {root}


# ---------------------------------------------------------------- fallback: measured only


def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _tree_peak_mb(root: int) -> float | None:
    """The largest VmHWM among ``root`` and its descendants (functions-framework serves from a gunicorn worker)."""
    peaks = [v for v in map(_peak_rss_mb, {root} | _descendants(root)) if v is not None]
    return max(peaks) if peaks else None


# ---------------------------------------------------------------- the poller


class Watch(threading.Thread):
    """Puts each component and job of one stack into its capped group as it appears; samples each group's
    anonymous memory (its peak is kept per phase) and notes the first OOM kill."""

    def __init__(self, cg: Cgroups, state: Path, cap: dict[str, float]):
        super().__init__(daemon=True)
        self.cg, self.state, self.cap = cg, state, cap
        self.groups: dict[str, dict] = {}  # component name or job id -> path, cap, phase, labels, sampled rss peak
        self.phase = "up"
        self.first_oom: float | None = None
        self.error = ""
        self.done = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.done.wait(POLL_S):
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - reported by one(): a run without its caps is no result
                self.error = repr(exc)
                return

    def tick(self) -> None:
        with self.lock:
            for pid_file in (self.state / "pids").glob("*.pid"):
                name = pid_file.stem
                if name in self.cap and name not in self.groups and (pid := _pid(pid_file)):
                    g = self.cg.group(name, self.cap[name])
                    move(g, pid)
                    self.groups[name] = {"path": g, "cap_mb": self.cap[name], "kind": "component", "rss_peak": 0}
            for pid_file in (self.state / "jobs").glob("*/runner.pid"):
                job_id = pid_file.parent.name
                if job_id not in self.groups and (pid := _pid(pid_file)):
                    spec = json.loads((pid_file.parent / "spec.json").read_text())
                    cap = self.cap["job"] * spec.get("replica_count", 1)
                    g = self.cg.group(f"job-{spec['labels'].get('stage', 'job')}-{job_id}", cap)
                    move(g, pid)
                    self.groups[job_id] = {
                        "path": g,
                        "cap_mb": cap,
                        "kind": "job",
                        "phase": self.phase,
                        "stage": spec["labels"].get("stage", job_id),
                        "dir": pid_file.parent,
                        "rss_peak": 0,
                    }
            for info in self.groups.values():
                s = self.cg.stats(info["path"])
                info["rss_peak"] = max(info["rss_peak"], s["rss_mb"] or 0)
                if s["oom_kills"] > info.get("oom_base", 0) and self.first_oom is None:
                    self.first_oom = time.time()

    def start_phase(self, phase: str) -> None:
        """Peaks and OOM kills count afresh for this phase (a kill the run before survived does not stop this one's
        wait); jobs found from now on belong to it."""
        with self.lock:
            self.phase, self.first_oom = phase, None
            for info in self.groups.values():
                info["oom_base"] = self.cg.stats(info["path"])["oom_kills"]
                if info["kind"] == "component":
                    info["rss_peak"] = 0
                    info["peak_reset"] = self.cg.reset_peak(info["path"])

    def report(self, phase: str) -> tuple[dict, dict]:
        """(components, jobs) of a phase: peak, sampled rss, cap, OOM kills (components: during this phase)."""
        self.tick()
        components, jobs = {}, {}
        with self.lock:
            for name, info in sorted(self.groups.items()):
                if info["kind"] == "job" and info["phase"] != phase:
                    continue
                s = self.cg.stats(info["path"])
                rec = {
                    "peak_mb": s["peak_mb"],
                    "rss_mb": info["rss_peak"],
                    "cap_mb": info["cap_mb"],
                    "oom_kills": s["oom_kills"] - info.get("oom_base", 0),
                }
                if info["kind"] == "component":
                    if not info.get("peak_reset", True):
                        rec["peak_since"] = "up"  # v2: the peak covers every phase so far
                    components[name] = rec
                else:
                    key = info["stage"] if info["stage"] not in jobs else f"{info['stage']}-{name}"
                    jobs[key] = {**_job_seconds(info["dir"]), **rec}
        return components, jobs


def _pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text())
    except (OSError, ValueError):  # being written
        return None


def _job_seconds(job_dir: Path) -> dict:
    s = json.loads((job_dir / "state.json").read_text())
    out = {"state": s["state"]}
    if s.get("started") and s.get("finished"):
        out["seconds"] = round(s["finished"] - s["started"], 2)
    if s.get("max_rss_mb") is not None:
        out["runner_max_rss_mb"] = s["max_rss_mb"]
    return out


def _measured_only(state: Path, cap: dict[str, float], phase_jobs: set[str]) -> tuple[dict, dict]:
    """Without cgroups: VmHWM of each component's processes (since start) and each job's largest replica."""
    components, jobs = {}, {}
    for pid_file in sorted((state / "pids").glob("*.pid")):
        if pid_file.stem in cap and (pid := _pid(pid_file)):
            peak = _tree_peak_mb(pid)
            components[pid_file.stem] = {"rss_mb": peak, "cap_mb": cap[pid_file.stem], "peak_since": "up"}
    for st in sorted((state / "jobs").glob("*/state.json")):
        if st.parent.name in phase_jobs:
            stage = json.loads((st.parent / "spec.json").read_text())["labels"].get("stage", st.parent.name)
            rec = _job_seconds(st.parent)
            rec["rss_mb"] = rec.pop("runner_max_rss_mb", None)
            jobs[stage] = {**rec, "cap_mb": cap["job"]}
    for rec in [*components.values(), *jobs.values()]:
        rec["over_cap"] = bool(rec["rss_mb"] and rec["rss_mb"] > rec["cap_mb"])
    return components, jobs


# ---------------------------------------------------------------- one size


def _upload(exe: str, env: dict, folder: Path, watch: Watch | None) -> tuple[int | None, str, str]:
    """``embedpipe upload --wait``; after an OOM kill it is given OOM_GRACE_S to end (rc None: stopped waiting)."""
    grace = float(os.environ.get("EMBEDPIPE_BENCH_OOM_GRACE_S", "120"))
    proc = subprocess.Popen(
        [exe, "upload", str(folder), "--dataset", "scale", "--wait", "--timeout", "0"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while True:
        try:
            out, err = proc.communicate(timeout=1)
            return proc.returncode, out, err
        except subprocess.TimeoutExpired:
            if watch and watch.first_oom and time.time() - watch.first_oom > grace:
                proc.kill()
                out, err = proc.communicate()
                return None, out, err


def _outcome(rc: int | None, out: str, err: str) -> tuple[str, dict]:
    try:
        event = json.loads(out)
    except json.JSONDecodeError:
        event = {}
    data = event.get("data") or {}
    if rc == 0:
        return "succeeded", data
    if rc is None:
        return "stopped: OOM kill, run not ended within EMBEDPIPE_BENCH_OOM_GRACE_S", data
    if data.get("stage"):
        return f"failed in {data['stage']}: {str(data.get('cause'))[:300]}", data
    raise RuntimeError(err[-3000:])  # not a run that failed: the bench itself broke


def _phase(phase: str, n: int, folder: Path, exe: str, env: dict, state: Path, cap: dict, watch: Watch | None) -> dict:
    """One upload and its run: outcome, kind, counts, stage seconds, docs/s, memory of components and jobs."""
    if watch:
        watch.start_phase(phase)
    before = {p.parent.name for p in (state / "jobs").glob("*/spec.json")}
    t0 = time.time()
    rc, stdout, stderr = _upload(exe, env, folder, watch)
    run, event = _outcome(rc, stdout, stderr)
    rec = {"run": run, "kind": event.get("kind"), "total_s": round(time.time() - t0, 2)}
    rec["stages"] = dict(event.get("stage_seconds") or {})
    rec["counts"] = event.get("counts")
    docs = n if phase == "full" else (rec["counts"] or {}).get("upserted") or 0
    rec["docs_per_s"] = {k: round(docs / v, 1) for k, v in rec["stages"].items() if v and k in ("embedding", "index")}
    now = {p.parent.name for p in (state / "jobs").glob("*/spec.json")}
    if watch:
        rec["components"], rec["jobs"] = watch.report(phase)
    else:
        rec["components"], rec["jobs"] = _measured_only(state, cap, now - before)
    rec["seconds_by_phase"] = _logged(state, now - before)
    return rec


def _logged(state: Path, jobs: set[str]) -> dict:
    """Where the run's seconds went, as its embed job and the indexer logged them ("seconds by phase/step"): kept
    in ``bench-scale.json`` after the state folder is removed."""
    out = {}
    for job in sorted(jobs):
        for log in sorted((state / "jobs" / job).glob("replica-*.log")):
            text = log.read_text(errors="replace").splitlines()
            lines = [x.split(": ", 1)[-1] for x in text if "seconds by phase" in x or "corpus loaded in" in x]
            if lines:
                out[f"{job}/{log.stem}"] = " | ".join(lines)
    index_log = state / "logs" / "indexer.log"
    lines = (
        [x for x in index_log.read_text(errors="replace").splitlines() if "seconds by step" in x]
        if index_log.exists()
        else []
    )
    if lines:
        out["index"] = lines[-1].rsplit("seconds by step: ", 1)[-1]
    return out


def _process_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(state: Path) -> float:
    """Wait until the Milvus server has used under ``SETTLE_IDLE_CPU`` of a core for ``SETTLE_WINDOW_S`` (its
    background compaction and index builds after a load are done); returns the seconds waited."""
    pid, t0 = _pid(state / "pids" / "milvus.pid"), time.time()
    if pid is None:
        return 0.0
    while time.time() - t0 < SETTLE_MAX_S:
        before = _process_cpu_s(pid)
        time.sleep(SETTLE_WINDOW_S)
        after = _process_cpu_s(pid)
        if before is None or after is None or after - before < SETTLE_IDLE_CPU * SETTLE_WINDOW_S:
            break
    return round(time.time() - t0, 1)


def one(n: int, model: str, cap: dict[str, float]) -> dict:
    state = Path(tempfile.mkdtemp(prefix=f"bench-scale-{n}-"))
    data = generate(state / "data", n)
    env = stack_env(
        state,
        EMBEDPIPE_BASE_MODEL=model,
        EMBEDPIPE_MAX_SEQ_LENGTH="32",
        EMBEDPIPE_GATE_TOLERANCE="1.0",  # a random model: the loop's cost is measured, not its quality
    )
    exe = str(Path(sys.executable).parent / "embedpipe")
    cg = Cgroups(f"embedpipe-bench-{os.getpid()}-{n}")
    watch = Watch(cg, state, cap) if cg.version else None
    out: dict = {"documents": n}
    if watch:
        watch.start()  # before up: each component is moved as its pid file appears
    try:
        up = subprocess.run([exe, "up"], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        if up.returncode:
            raise RuntimeError(up.stderr[-2000:])
        out["full"] = _phase("full", n, data, exe, env, state, cap, watch)
        if out["full"]["run"] == "succeeded":
            inc = state / "inc"  # a folder holding only corpus.jsonl: what a user changing documents uploads
            inc.mkdir()
            os.link(data / "corpus.jsonl", inc / "corpus.jsonl")  # mutate writes a new file: data/ stays
            out["changed"] = mutate(inc, INC_SHARE, seed=1)
            out["incremental"] = _phase("incremental", n, inc, exe, env, state, cap, watch)
            if out["incremental"]["run"] == "succeeded":
                out["settle_s"] = settle(state)
                out["changed_settled"] = mutate(inc, INC_SHARE, seed=2)  # another 1%, of the corpus just indexed
                out["incremental_settled"] = _phase("incremental_settled", n, inc, exe, env, state, cap, watch)
    finally:
        subprocess.run([exe, "down"], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        if watch:
            watch.done.set()
            watch.join()
        cg.cleanup()
    if all(out.get(ph, {}).get("run") == "succeeded" for ph in PHASES):
        shutil.rmtree(state, ignore_errors=True)
    else:  # kept for its logs
        out["state_dir"] = str(state)
    if watch and watch.error:
        raise RuntimeError(f"the cgroup poller failed, caps may be missing: {watch.error}")
    out["capped"] = f"cgroup {cg.version}" if cg.version else False
    if not cg.version:
        out["not_capped_because"] = cg.reason
    out["move_charge"] = cg.move_charge
    full = out["full"]
    for inc in (out.get("incremental"), out.get("incremental_settled")):
        if inc and inc["run"] == "succeeded":
            work = {k: sum(r["stages"].get(s, 0) for s in ("embedding", "index")) for k, r in (("f", full), ("i", inc))}
            inc["ratio_embed_index"] = round(work["i"] / work["f"], 4) if work["f"] else None
    print(f"scale {n}: {json.dumps(out)}", file=sys.stderr)
    return out


def run() -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.helpers import build_tiny_model

    sizes = [int(x) for x in os.environ.get("EMBEDPIPE_BENCH_SCALE", "10000,100000").split(",") if x.strip()]
    cap = caps()
    model_dir = Path(tempfile.mkdtemp(prefix="bench-scale-model-"))
    try:
        model = str(build_tiny_model(model_dir))
        per = {n: one(n, model, cap) for n in sizes}
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    first = next(iter(per.values()))
    flat: dict = {"capped": first["capped"] or f"no: {first['not_capped_because'][:200]}"}
    for n, r in per.items():
        full = r["full"]
        flat[f"{n}_run"] = full["run"]
        flat[f"{n}_total_s"] = full["total_s"]
        for stage, secs in full["stages"].items():
            flat[f"{n}_{stage}_s"] = secs
        for stage, rate in full["docs_per_s"].items():
            flat[f"{n}_{stage}_docs_per_s"] = rate
        parts = [(f"job_{k}", x) for k, x in full["jobs"].items()] + list(full["components"].items())
        for name, x in parts:  # the cap as its ceiling; capped, a part never exceeds it but is OOM-killed instead
            peak = x.get("peak_mb", x["rss_mb"])
            flat[f"{n}_{name}_peak_mb"] = f"{peak} OOM-killed" if x.get("oom_kills") else peak
            flat[f"{n}_{name}_peak_mb_ceiling"] = x["cap_mb"]
        if r["capped"]:
            flat[f"{n}_oom_killed"] = _killed(r) or "none"
        if "settle_s" in r:
            flat[f"{n}_settle_s"] = r["settle_s"]
        for phase, key in (("incremental", "inc"), ("incremental_settled", "inc_settled")):
            inc = r.get(phase)
            if not inc:
                continue
            flat[f"{n}_{key}_run"] = f"{inc['run']} ({inc['kind']})"
            flat[f"{n}_{key}_upserted"] = (inc["counts"] or {}).get("upserted")
            for stage, secs in inc["stages"].items():  # pending too: outside the ratio, not outside the run
                flat[f"{n}_{key}_{stage}_s"] = secs
            if inc.get("ratio_embed_index") is not None:
                flat[f"{n}_{key}_ratio"] = inc["ratio_embed_index"]
                flat[f"{n}_{key}_ratio_ceiling"] = 0.03
    if len(sizes) >= 2:
        a, b = sorted(sizes)[-2:]
        st = {k: per[k]["full"]["stages"] for k in (a, b)}
        per_doc = {k: (st[k].get("embedding", 0) + st[k].get("index", 0)) / k for k in (a, b)}
        if per_doc[a]:
            flat["growth_embed_index_per_doc"] = round(per_doc[b] / per_doc[a], 3)
            flat["growth_embed_index_per_doc_ceiling"] = 1.3
    (ROOT / "bench-scale.json").write_text(json.dumps(per, indent=1) + "\n")
    return flat


def _killed(r: dict) -> str:
    """Parts with an OOM kill, as ``phase:name``."""
    return ",".join(
        f"{phase}:{name}"
        for phase in PHASES
        for part in ("components", "jobs")
        for name, x in (r.get(phase) or {}).get(part, {}).items()
        if x.get("oom_kills")
    )
