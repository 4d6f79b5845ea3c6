"""The transient-error policy: what is retried (bounded), what surfaces at once."""

from __future__ import annotations

import pytest
import requests
from google.api_core import exceptions as gexc
from tenacity import wait_none

from embedpipe.gcp.retries import is_transient, transient


@pytest.mark.parametrize(
    "exc",
    [
        gexc.ServiceUnavailable("x"),
        gexc.InternalServerError("x"),
        gexc.TooManyRequests("x"),
        gexc.DeadlineExceeded("x"),
        requests.ConnectionError("reset"),
        ConnectionRefusedError(),
        TimeoutError(),
    ],
)
def test_transient_errors(exc):
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        gexc.NotFound("x"),
        gexc.PreconditionFailed("x"),
        gexc.BadRequest("x"),
        gexc.Forbidden("x"),
        ValueError("bad input"),
        KeyError("k"),
    ],
)
def test_permanent_errors(exc):
    assert not is_transient(exc)


def flaky(errors: list[BaseException]):
    calls = []

    @transient
    def call():
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return "ok"

    return call.retry_with(wait=wait_none()), calls


def test_transient_failures_are_retried_until_success():
    call, calls = flaky([gexc.ServiceUnavailable("down"), gexc.TooManyRequests("slow down")])
    assert call() == "ok" and len(calls) == 3


def test_retries_are_bounded():
    call, calls = flaky([gexc.ServiceUnavailable("down")] * 10)
    with pytest.raises(gexc.ServiceUnavailable):
        call()
    assert len(calls) == 5


def test_permanent_failures_are_not_retried():
    call, calls = flaky([gexc.NotFound("gone")])
    with pytest.raises(gexc.NotFound):
        call()
    assert len(calls) == 1
