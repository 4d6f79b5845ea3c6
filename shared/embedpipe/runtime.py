"""What every function and service process shares: settings, logging and one Pipeline, built once per instance."""

from __future__ import annotations

import functools
import logging

# Imported when the instance starts, not on its first delivery's clock: every function reads and writes the ledger
# (GCS) and publishes (Pub/Sub). Lazily, the first event each function handled paid ~0.3 s for them (more under load):
# on the path of every run, since each stage's first event reaches a different function.
import google.cloud.pubsub_v1  # noqa: F401
import google.cloud.storage  # noqa: F401

from embedpipe import logs
from embedpipe.config import Settings
from embedpipe.contracts.events import EventError
from embedpipe.control.pipeline import Pipeline
from embedpipe.gcp import auth

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def pipeline() -> Pipeline:
    logs.setup(fmt=Settings.from_env().log_format)
    return Pipeline(Settings.from_env())


def acked(handler):
    """Run a push handler: a malformed event is logged and acknowledged (redelivery cannot fix it); any other
    exception propagates, so functions-framework answers 500 and Pub/Sub redelivers with backoff."""

    @functools.wraps(handler)
    def wrapper(cloud_event):
        pipe = pipeline()
        auth.authorize_push(pipe.settings)  # before anything else: a refused push has no side effect
        try:
            outcome = handler(pipe, cloud_event)
        except EventError as exc:
            log.error("%s: dropped malformed event %s: %s", handler.__name__, cloud_event["id"], exc)
            return
        # Quiet when nothing happened (the reconcile tick fires every second locally). The delivery's id (for a push,
        # the Pub/Sub message id) ties the line to its message; written after the handler ran, before the ack.
        level = logging.INFO if outcome else logging.DEBUG
        log.log(level, "%s [%s]: %s", handler.__name__, cloud_event["id"], outcome or "nothing to do")

    return wrapper
