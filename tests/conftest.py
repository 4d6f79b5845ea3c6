"""Shared fixtures: a tiny random BERT model (built once per session, no download) and real local services."""

from __future__ import annotations

import os

import pytest

from tests.helpers import apply_env, build_tiny_model, isolated_settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def services(tmp_path_factory, tiny_model):
    """Real Pub/Sub emulator, fake-gcs-server and Milvus Lite server (no function processes: tests load the
    functions in-process through functions_framework.create_app)."""
    from embedpipe.local import stack

    settings = isolated_settings(tmp_path_factory.mktemp("services-state"), tiny_model)
    apply_env(settings)
    stack.up(settings, echo=lambda *_: None, components=False)
    yield settings
    stack.down(settings, echo=lambda *_: None)
