"""One retry policy for transient errors of the services we call (GCS, Pub/Sub, the job launcher).

Bounded exponential backoff with jitter (tenacity). Only errors that a retry can fix are retried: unavailable,
internal, rate-limited, timed-out, a dropped connection. Permanent ones (not found, precondition failed, bad
request, permission denied) surface at once. Milvus has its own predicate in ``vectorstore.milvus_retry``.
"""

from __future__ import annotations

import logging

from tenacity import before_sleep_log, retry, retry_if_exception, stop_after_attempt, wait_random_exponential

log = logging.getLogger(__name__)


def is_transient(exc: BaseException) -> bool:
    from google.api_core import exceptions as gexc

    if isinstance(
        exc,
        (
            gexc.ServiceUnavailable,
            gexc.InternalServerError,
            gexc.TooManyRequests,
            gexc.GatewayTimeout,
            gexc.DeadlineExceeded,
            gexc.BadGateway,
        ),
    ):
        return True
    try:
        import requests

        if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
            return True
    except ImportError:  # pragma: no cover - requests comes with google-cloud-storage
        pass
    return isinstance(exc, (ConnectionError, TimeoutError))


transient = retry(
    retry=retry_if_exception(is_transient),
    stop=stop_after_attempt(5),
    wait=wait_random_exponential(multiplier=0.5, max=8),
    before_sleep=before_sleep_log(log, logging.WARNING),
    reraise=True,
)
