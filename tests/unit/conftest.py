"""Unit-tier fixtures: fakes only (no network, no services, no subprocesses)."""

from __future__ import annotations

import time

import pytest

from tests.unit.fakes import Clock, FakeLauncher, FakeStore


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def launcher() -> FakeLauncher:
    return FakeLauncher()


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """Freeze wall time (``time.time``) at a settable value for the duration of one test."""
    c = Clock()
    monkeypatch.setattr(time, "time", c)
    return c
