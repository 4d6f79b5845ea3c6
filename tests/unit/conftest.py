"""Unit-tier fixtures: fakes only (no network, no services, no subprocesses), and a guard that holds the tier to it."""

from __future__ import annotations

import socket
import subprocess
import traceback

import pytest
import urllib3.util.connection  # noqa: F401 - probes IPv6 with a bind when imported: done here, before any guard

from tests.unit.fakes import Clock, FakeLauncher, FakeStore

TIER_RULE = (
    "the unit tier runs on fakes only: no sockets, no subprocesses. Use a fake (tests/unit/fakes.py, a stub "
    "client, a monkeypatched transport), or move the test to tests/integration/ (see pytest.ini)"
)


class UnitTierViolation(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def no_sockets_or_subprocesses(monkeypatch) -> None:
    """Make ``socket.connect``/``connect_ex``/``bind`` and ``subprocess.Popen`` raise in every unit test. Code under
    test may catch the error (a health check, a retry loop), so each attempt is also recorded and fails the test at
    teardown: a new offender fails loudly either way."""
    attempts: list[tuple[str, str]] = []  # what, where (the call stack)

    def refuse(what: str):
        def guard(*args, **kwargs):
            attempts.append((what, "".join(traceback.format_stack(limit=12)[:-1])))
            raise UnitTierViolation(f"{what} in a unit test: {TIER_RULE}")

        return guard

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
    monkeypatch.setattr(socket.socket, "bind", refuse("socket.bind"))
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("subprocess.Popen"))
    yield
    if attempts:
        what, where = attempts[0]
        more = f" (and {len(attempts) - 1} more)" if len(attempts) > 1 else ""
        pytest.fail(f"{what} attempted in a unit test{more}: {TIER_RULE}\nfirst attempt from:\n{where}", pytrace=False)


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def launcher() -> FakeLauncher:
    return FakeLauncher()


@pytest.fixture
def clock() -> Clock:
    """A frozen, settable wall clock: pass it as the ``clock`` of what the test builds (Ledger, Pipeline, ...)."""
    return Clock()
