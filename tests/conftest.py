"""Shared fixtures: a tiny random BERT model (built once per session, no download), real local services, and
per-test isolation of ``os.environ``."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.helpers import apply_env, build_tiny_model, isolated_settings

# Read by huggingface_hub and tokenizers when they are imported, so they are set at collection, once, before any test
# module imports them; every test's environment snapshot (below) then starts from them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def restore_environ(saved: dict[str, str]) -> None:
    """Make ``os.environ`` equal ``saved`` again: drop added keys, put back removed or changed ones."""
    for key in [k for k in os.environ if k not in saved]:
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def isolated_environ() -> Iterator[None]:
    """Whatever a test (or its function-scoped fixtures) does to ``os.environ`` is undone after it, as in
    functions-framework's suite. The snapshot is taken after session- and module-scoped fixtures have run (pytest
    sets up wider scopes first), so a stack fixture's ``apply_env`` holds for every test of its scope."""
    saved = dict(os.environ)
    yield
    restore_environ(saved)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def services(tmp_path_factory, tiny_model):
    """Real Pub/Sub emulator, fake-gcs-server and Milvus Lite server (no function processes: tests load the
    functions in-process through functions_framework.create_app). Points this process at them for the session and
    gives the environment back afterwards."""
    from embedpipe.local import stack

    saved = dict(os.environ)
    settings = isolated_settings(tmp_path_factory.mktemp("services-state"), tiny_model)
    apply_env(settings)
    stack.up(settings, echo=lambda *_: None, components=False)
    yield settings
    stack.down(settings, echo=lambda *_: None)
    restore_environ(saved)
