"""Replay a Vertex AI image's Dockerfile without Docker, then check the result: ``python -m containers.replay
[trainer|embedder ...]`` (default: both).

Neither a Docker daemon nor the base image's registry is reachable here, so the image is approximated: a fresh venv
stands in for the base image (``torch==2.13.0``, the local CPU build, in place of its CUDA torch; built once and
kept, like a pulled base image), COPY sources come from the repo (through the Dockerfile's ``.dockerignore``) into a
scratch root whose paths the RUN steps are rebased onto, ENV and ARG apply as in a build, and only PyPI is needed.
Then, inside that venv:

(a) the Dockerfile's own ``python -c`` import checks, which are RUN steps, pass;
(b) ``load_model(Settings().base_model)`` loads and encodes offline (``HF_HUB_OFFLINE=1``, an empty ``HF_HOME``);
(c) ``python -m task --help`` (the ENTRYPOINT) runs; the trainer parses a Vertex HP-tuning argv, whose integer
    flags arrive as ``--batch-size=32.0``, and its ``ScalarLog`` writes TensorBoard event files that read back;
(d) what is installed is what the task's import closure needs (``containers.images.check_installed``);
(e) the work itself: two training steps (trainer), encoding and a Parquet write (embedder), offline.

Every RUN step runs each time (nothing like Docker's layer cache); pip keeps its cache between replays (the image
turns it off to keep its layers small), which saves downloads where the index sends caching headers.
Exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the local CPU wheel; any other pin makes pip fetch a multi-GB CUDA build
IMAGES = ("trainer", "embedder")
# Outer variables a replay keeps: reaching PyPI and the machine's pip set-up. Nothing else leaks in (the image
# starts with its own ENV only, e.g. no EMBEDPIPE_BASE_MODEL from a developer's shell).
PASSTHROUGH = re.compile(r"(PATH|HOME|LANG|LC_\w+|TMPDIR|SSL_CERT_\w+|REQUESTS_CA_BUNDLE|PIP_\w+|\w+_PROXY)$", re.I)


# ---------------------------------------------------------------- Dockerfile


@dataclass
class Instruction:
    op: str  # upper case: RUN, COPY, ...
    args: str
    line: int


def parse(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined; comments (hadolint pragmas too) dropped."""
    out: list[Instruction] = []
    pending, start = "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):  # comments may sit between continuation lines
            continue
        if not pending:
            start = n
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        op, _, args = (pending + stripped).partition(" ")
        out.append(Instruction(op.upper(), args.strip(), start))
        pending = ""
    return out


def substitute(text: str, env: dict[str, str]) -> str:
    """Docker's build-time ``$VAR``, ``${VAR}`` and ``${VAR:-default}`` in ENV, ARG, COPY and WORKDIR."""

    def value(m: re.Match) -> str:
        name = m["braced"] or m["bare"]
        if name in env and env[name] != "":
            return env[name]
        return m["default"] or ""

    return re.sub(r"\$(?:\{(?P<braced>\w+)(?::-(?P<default>[^}]*))?\}|(?P<bare>\w+))", value, text)


def pairs(args: str) -> list[tuple[str, str]]:
    """ENV/ARG ``k=v k2="v 2"`` (or the legacy ``ENV k v``)."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    return [tuple(w.split("=", 1)) if "=" in w else (w, "") for w in words]


def exec_form(args: str) -> list[str] | None:
    return json.loads(args) if args.startswith("[") else None


def dockerignore(dockerfile: Path) -> list[str]:
    """BuildKit reads ``<Dockerfile>.dockerignore`` beside the Dockerfile before the context's ``.dockerignore``."""
    for path in (dockerfile.with_name(dockerfile.name + ".dockerignore"), ROOT / ".dockerignore"):
        if path.exists():
            lines = (line.strip() for line in path.read_text().splitlines())
            return [line for line in lines if line and not line.startswith("#")]
    return []


def excluded(rel: str, patterns: list[str]) -> bool:
    """The subset of .dockerignore these images use: the last matching pattern decides, ``!`` re-includes, a
    pattern matches a path or any of its parents, and ``**/`` matches at any depth (the top level too)."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    out = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        options = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(p, o) for p in prefixes for o in options):
            out = not keep
    return out


# ---------------------------------------------------------------- replay


@dataclass
class Result:
    name: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Replay:
    image: str
    tmp: Path
    results: list[Result] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    workdir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # the image's environment: ENV on top of the passthrough
    requirements_copied: bool = False
    cache: Path = Path()
    seconds: float = 0.0
    on: Replay | None = None  # a kept replay whose venv and root this one continues in (``replay(on=...)``)

    @property
    def venv(self) -> Path:
        return (self.on or self).tmp / "venv"

    @property
    def root(self) -> Path:
        """Where the image's file system paths land (``/app`` -> ``<tmp>/root/app``)."""
        return (self.on or self).tmp / "root"

    @property
    def python(self) -> str:
        return str(self.venv / "bin" / "python")

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def host(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")

    def record(self, name: str, ok: bool, detail: str = "", seconds: float = 0.0) -> bool:
        self.results.append(Result(name, ok, detail, seconds))
        return ok


def base_env(tmp: Path, venv: Path, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if PASSTHROUGH.match(k)}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    constraint = tmp / "constraints.txt"
    constraint.write_text(TORCH + "\n")  # a RUN step that wants another torch fails instead of downloading one
    env["PIP_CONSTRAINT"] = str(constraint)
    env["PIP_CACHE_DIR"] = str(cache / "pip")
    return env


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "embedpipe-replay"


def base_layer(cache: Path, env: dict) -> tuple[Path, bool]:
    """(a venv holding only torch, whether it was cached): the base image's stand-in, built once per Python and
    torch version and kept like a pulled base image. Unpacking torch is most of a fresh venv's cost."""
    key = f"base-py{sys.version_info[0]}.{sys.version_info[1]}-{TORCH.replace('==', '-')}"
    layer = cache / key
    if (layer / ".complete").exists():
        return layer, True
    building = cache / f"{key}.tmp{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
    pip = [str(building / "bin" / "python"), "-m", "pip", "install", TORCH]
    proc = subprocess.run(pip, env={**env, "VIRTUAL_ENV": str(building)}, capture_output=True, text=True)
    if proc.returncode:
        shutil.rmtree(building, ignore_errors=True)
        raise RuntimeError(tail(proc.stdout + proc.stderr))
    (building / ".complete").touch()
    try:
        building.rename(layer)
    except OSError:  # another replay finished one first
        shutil.rmtree(building, ignore_errors=True)
    return layer, False


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def clone(layer: Path, venv: Path) -> None:
    """A fresh venv holding the layer's packages: its files hard-linked (pip replaces files, it never edits them in
    place, so the layer stays intact), its scripts copied with this venv's interpreter in their shebang."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    for top in layer.iterdir():
        if top.is_dir() and not top.is_symlink() and top.name != "bin":
            shutil.copytree(top, venv / top.name, symlinks=True, copy_function=_link, dirs_exist_ok=True)
    for script in (layer / "bin").iterdir():
        dest = venv / "bin" / script.name
        if dest.exists() or script.is_symlink() or not script.is_file():
            continue  # the interpreter links and activate scripts: the fresh venv's own
        head, _, rest = script.read_bytes().partition(b"\n")
        if head.startswith(b"#!") and b"python" in head:
            head = f"#!{venv / 'bin' / 'python'}".encode()
        dest.write_bytes(head + b"\n" + rest)
        dest.chmod(script.stat().st_mode)


def run_logged(rp: Replay, argv: list[str], cwd: Path, env: dict, log_name: str) -> tuple[int, str, str, float]:
    """(exit code, stdout, stdout + stderr, seconds); both streams also go to ``<tmp>/logs/``."""
    t0 = time.time()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    (rp.tmp / "logs").mkdir(exist_ok=True)
    (rp.tmp / "logs" / log_name).write_text(proc.stdout + proc.stderr)
    return proc.returncode, proc.stdout.strip(), (proc.stdout + proc.stderr).strip(), time.time() - t0


def tail(text: str, n: int = 15) -> str:
    return "\n".join(text.splitlines()[-n:])


def copy(rp: Replay, args: str, workdir: str, ignore: list[str], scope: dict[str, str]) -> None:
    """COPY from the repo (the build context) into the scratch root, through the .dockerignore."""
    words = exec_form(args) or [w for w in shlex.split(args) if not w.startswith("--")]
    *sources, dest = (substitute(w, scope) for w in words)
    dest_path = dest if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}"
    target = rp.host(dest_path)
    into = dest.endswith("/") or len(sources) > 1
    for src in sources:
        matches = sorted(ROOT.glob(src)) or [ROOT / src]
        for path in matches:
            rel = path.relative_to(ROOT).as_posix()
            if not path.exists():
                raise FileNotFoundError(f"COPY {rel}: not in the repo")
            if path.is_file():
                if excluded(rel, ignore):
                    raise FileNotFoundError(f"COPY {rel}: excluded from the build context by the .dockerignore")
                out = target / path.name if into or target.is_dir() else target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)
                rp.requirements_copied |= rel == f"containers/{rp.image}/requirements.txt"
                continue
            files = [f for f in sorted(path.rglob("*")) if f.is_file()]
            kept = [f for f in files if not excluded(f.relative_to(ROOT).as_posix(), ignore)]
            if not kept:
                raise FileNotFoundError(f"COPY {rel}/: everything in it is excluded by the .dockerignore")
            for f in kept:
                out = target / f.relative_to(path)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out)


def rebase(command: str, image_paths: set[str], rp: Replay) -> str:
    """Image paths that COPY or WORKDIR made, as the scratch root's paths (longest first: /opt/x/y before /opt/x)."""
    for p in sorted(image_paths, key=len, reverse=True):
        command = re.sub(rf"(?<![\w./-]){re.escape(p)}(?=[/\s\"';:)]|$)", str(rp.host(p)), command)
    return command


def build(rp: Replay, dockerfile: Path) -> bool:
    """Replay the Dockerfile's instructions; False (and a failed result) at the first step that fails."""
    ignore = dockerignore(dockerfile)
    rp.root.mkdir(parents=True, exist_ok=rp.on is not None)
    workdir, image_paths, build_args = "/", set(), {}
    rp.env = base_env(rp.tmp, rp.venv, rp.cache)
    t0 = time.time()
    if rp.on is not None:
        rp.record(f"base: the {rp.on.image} replay's venv, as it left it", True)
    else:
        try:
            layer, cached = base_layer(rp.cache, rp.env)
        except RuntimeError as exc:
            return rp.record(f"base: a venv with {TORCH}", False, str(exc))
        clone(layer, rp.venv)
        how = "its cached layer linked" if cached else "layer built and cached"
        rp.record(f"base: fresh venv + {TORCH} ({how})", True, "", time.time() - t0)
    for n, ins in enumerate(parse(dockerfile), 1):
        label = f"{ins.op} {ins.args}" if len(ins.args) < 90 else f"{ins.op} {ins.args[:87]}..."
        scope = {**build_args, **rp.env}  # what $VAR means in this instruction (ENV wins over ARG)
        if ins.op == "ARG":  # build-time only: RUN steps see it, the image's environment does not
            build_args.update((k, substitute(v, scope)) for k, v in pairs(ins.args))
        elif ins.op == "ENV":
            for key, value in pairs(ins.args):
                # pip's cache stays on here: the image turns it off to keep its layers small
                if key != "PIP_NO_CACHE_DIR":
                    rp.env[key] = substitute(value, {**build_args, **rp.env})
        elif ins.op == "WORKDIR":
            workdir = substitute(ins.args, scope)
            image_paths.add(workdir)
            rp.host(workdir).mkdir(parents=True, exist_ok=True)
        elif ins.op == "COPY":
            try:
                copy(rp, ins.args, workdir, ignore, scope)
            except FileNotFoundError as exc:
                return rp.record(f"line {ins.line}: {label}", False, str(exc))
            dest = substitute((exec_form(ins.args) or shlex.split(ins.args))[-1], scope)
            image_paths.add(dest.rstrip("/") if dest.startswith("/") else f"{workdir.rstrip('/')}/{dest}")
        elif ins.op == "RUN":
            argv = exec_form(ins.args) or ["/bin/sh", "-c", rebase(ins.args, image_paths, rp)]
            code, _, out, secs = run_logged(rp, argv, rp.host(workdir), scope, f"{n:02d}-run.log")
            what = "(a) import check" if re.search(r"\bpython3? -c\b", ins.args) else "RUN"
            name = f"line {ins.line}: {what}: {ins.args}" if what != "RUN" else f"line {ins.line}: {label}"
            if not rp.record(name, code == 0, tail(out) if code else "", secs):
                return False
        elif ins.op in ("ENTRYPOINT", "CMD"):
            rp.entrypoint = exec_form(ins.args) or ["/bin/sh", "-c", ins.args]
        elif ins.op != "FROM":  # FROM: the base venv stands in for it
            rp.record(f"line {ins.line}: {ins.op}", True, "not replayed (no effect on these checks)")
    rp.workdir = rp.host(workdir)
    return True


# ---------------------------------------------------------------- checks (run inside the replayed venv)

MODEL_CHECK = """
import json, numpy as np
from embedpipe.config import Settings
from embedpipe.ml.model import load_model
uri = Settings().base_model  # the image's default, whatever it is: no EMBEDPIPE_BASE_MODEL reaches the replay
model, info = load_model(uri)
vec = model.encode(["The trainer and the embedder load this model offline."])
assert vec.shape == (1, info.dim) and np.isfinite(vec).all(), (vec.shape, info.dim)
print(json.dumps({"base_model": uri, "dim": info.dim, "fingerprint": info.fingerprint}))
"""

# The trainer's HP-tuning flags as Vertex passes them: every integer parameter as a float literal.
ARGV_CHECK = """
import json, sys
import task
from embedpipe.jobs.hypertune import TUNABLE
argv = ["--dataset=d", "--run-id=r", "--base-model=m"]
want = {}
for name, kind in TUNABLE.items():
    if kind is int:
        value = 32 if name == "batch_size" else 3
        argv.append(f"--{name.replace('_', '-')}={value}.0")
        want[name] = value
    elif kind is float:
        argv.append(f"--{name.replace('_', '-')}=0.25")
        want[name] = 0.25
try:
    args = task.parse_args(argv)
except SystemExit:
    print(json.dumps({"refused": " ".join(argv)}))
    sys.exit(1)
got = {k: getattr(args, k, None) for k in want}
wrong = {k: v for k, v in got.items() if v != want[k] or type(v) is not type(want[k])}
print(json.dumps({"argv": " ".join(argv), "wrong": wrong}))
sys.exit(1 if wrong else 0)
"""

SCALARS_CHECK = """
import json, sys, tempfile
from pathlib import Path
from embedpipe.ml.scalars import ScalarLog
out = Path(tempfile.mkdtemp())
log = ScalarLog(str(out))
for step, loss in ((1, 0.5), (2, 0.25)):
    log.add("train/loss", loss, step)
log.close()
files = sorted(p.name for p in out.glob("events.out.tfevents.*"))
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(str(out))
acc.Reload()
values = [(e.step, e.value) for e in acc.Scalars("train/loss")] if "train/loss" in acc.Tags()["scalars"] else []
print(json.dumps({"format": log.format, "files": files, "read_back": values}))
sys.exit(0 if log.format == "tensorboard" and files and values == [(1, 0.5), (2, 0.25)] else 1)
"""

# The work itself, not only imports: two optimizer steps of the trainer's loop on the default base model (a
# package the loop needs at run time but never imports at start-up, accelerate say, fails here), and the
# embedder's encode + Parquet write.
TRAIN_CHECK = """
import json, sys
import numpy as np
from embedpipe.config import Settings
from embedpipe.ml.model import load_model
from embedpipe.ml.training import TrainParams, train
model, info = load_model(Settings().base_model)
pairs = [(f"what is topic {i}?", f"topic {i} is the subject of passage number {i}.", None) for i in range(8)]
stats = train(model, pairs, TrainParams(batch_size=4, max_steps=2, epochs=1, max_seq_length=32, mini_batch_size=4))
loss = [p["loss"] for p in stats["loss_curve"]]
print(json.dumps({"steps": stats["steps"], "loss": loss}))
sys.exit(0 if stats["steps"] == 2 and loss and np.isfinite(loss).all() else 1)
"""

EMBED_CHECK = """
import io, json, sys
import numpy as np
import pyarrow as pa, pyarrow.parquet as pq
from embedpipe.config import Settings
from embedpipe.ml.embedding import encode
from embedpipe.ml.model import load_model
model, info = load_model(Settings().base_model, inference=True)
vectors = encode(model, [f"document {i} of the replay" for i in range(20)])
buf = io.BytesIO()
pq.write_table(pa.table({"id": [str(i) for i in range(20)], "vector": vectors.tolist()}), buf)
back = pq.read_table(io.BytesIO(buf.getvalue()))
norms = np.linalg.norm(vectors, axis=1)
print(json.dumps({"rows": back.num_rows, "dim": vectors.shape[1]}))
sys.exit(0 if back.num_rows == 20 and np.allclose(norms, 1, atol=1e-3) else 1)
"""

INSTALLED_CHECK = """
import sys
from pathlib import Path
sys.path.append({root!r})  # after the image's own paths: containers.images only, the rest stays the image's
from containers.images import IMAGES, check_installed
import torch
problems = check_installed(IMAGES[{image!r}], Path("task.py").resolve(), Path({requirements!r}), {unused!r})
if not torch.__version__.startswith({torch!r}):
    problems.append(f"torch is {{torch.__version__}}: a RUN step replaced the base image's torch")
ok = "every needed distribution is installed" + ("; every installed one is needed" if {unused!r} else "")
print("\\n".join(problems) or ok)
sys.exit(1 if problems else 0)
"""


def check(rp: Replay, name: str, argv: list[str], env: dict | None = None, line: int = -1) -> bool:
    """Run one check in the replayed image; its detail is one stdout line (the last: the check's verdict), or
    the output's tail when it failed."""
    code, stdout, out, secs = run_logged(rp, argv, rp.workdir, env or rp.env, re.sub(r"\W+", "-", name) + ".log")
    lines = stdout.splitlines() or [""]
    return rp.record(name, code == 0, lines[line] if code == 0 else tail(out, 12), secs)


def checks(rp: Replay) -> None:
    py = rp.python
    hf_home = rp.tmp / "hf-home"  # empty: nothing may come from a Hugging Face cache or the Hub
    hf_home.mkdir()
    offline = {**rp.env, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    if rp.on is None:
        check(rp, "(b) load_model(Settings().base_model) offline, encode", [py, "-c", MODEL_CHECK], offline)
        if any(hf_home.iterdir()):
            rp.record("(b) nothing written to HF_HOME", False, ", ".join(p.name for p in hf_home.iterdir()))
    else:
        rp.record("(b) load_model offline", True, f"not repeated: the {rp.on.image} replay ran it in this venv")
    check(rp, "(c) ENTRYPOINT --help", [*rp.entrypoint, "--help"], line=0)
    if rp.image == "trainer":
        check(rp, "(c) HP-tuning argv (--batch-size=32.0)", [py, "-c", ARGV_CHECK])
        check(rp, "(c) ScalarLog writes TensorBoard event files", [py, "-c", SCALARS_CHECK])
        check(rp, "(e) two training steps on the default base model, offline", [py, "-c", TRAIN_CHECK], offline)
    if rp.image == "embedder":
        check(rp, "(e) encode and write Parquet with the default base model, offline", [py, "-c", EMBED_CHECK], offline)
    requirements = ROOT / "containers" / rp.image / "requirements.txt"
    if not rp.requirements_copied:
        rp.record(f"(d) the Dockerfile installs {requirements.relative_to(ROOT)}", False, "no COPY of it")
    # Continuing another image's venv, that image's extra installs are expected: only what is missing counts.
    code = INSTALLED_CHECK.format(
        root=str(ROOT), image=rp.image, requirements=str(requirements), torch=TORCH[7:], unused=rp.on is None
    )
    what = "installed == what the import closure needs" if rp.on is None else "what the import closure needs is in"
    check(rp, f"(d) {what}", [py, "-c", code])


def replay(image: str, cache: Path | None = None, keep: bool = False, on: Replay | None = None) -> Replay:
    """Replay ``image`` in a fresh venv; with ``on`` (a kept replay), in that one's venv instead: its RUN steps then
    add only what differs, and the checks skip what the other replay already showed (a quicker test)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"embedpipe-replay-{image}-"))
    rp = Replay(image, tmp, cache=cache or default_cache(), on=on)
    rp.cache.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        if build(rp, ROOT / "containers" / image / "Dockerfile"):
            checks(rp)
    finally:
        rp.seconds = time.time() - t0
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return rp


def report(rp: Replay) -> str:
    lines = [f"{rp.image}: {'ok' if rp.ok else 'FAILED'} in {rp.seconds:.0f}s"]
    for r in rp.results:
        mark = "ok  " if r.ok else "FAIL"
        secs = f"{r.seconds:6.1f}s" if r.seconds else " " * 7
        lines.append(f"  {mark} {secs} {r.name}")
        if r.detail:
            lines.append(textwrap.indent(r.detail, " " * 16))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="*", metavar="IMAGE", help=f"any of {', '.join(IMAGES)} (default: all)")
    p.add_argument("--cache-dir", type=Path, default=None, help=f"pip's cache and the torch layer ({default_cache()})")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (venv, logs) and print its path")
    args = p.parse_args(argv)
    unknown = set(args.images) - set(IMAGES)
    if unknown:
        p.error(f"unknown image(s) {sorted(unknown)}: choose from {', '.join(IMAGES)}")
    failed = False
    for image in args.images or IMAGES:
        rp = replay(image, args.cache_dir, args.keep)
        print(report(rp) + (f"\n  kept: {rp.tmp}" if args.keep else ""), flush=True)
        failed |= not rp.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
