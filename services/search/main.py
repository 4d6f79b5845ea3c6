"""Cloud Run service: GET /search?dataset=&q=&k=&mode=dense|bm25|hybrid (default: the promoted run's mode),
GET /healthz, and POST of index-updated events.

index-updated reaches this service by push subscription (``topology``: component ``search`` on topic
``index-updated``); a promoted update starts a background reload while requests keep using the loaded model.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging

import functions_framework

from embedpipe import logs
from embedpipe.config import Settings
from embedpipe.contracts.events import INDEX_UPDATED
from embedpipe.gcp import auth
from embedpipe.index.search import NotIndexed, Searcher

logs.setup(fmt=Settings.from_env().log_format)
log = logging.getLogger("search")
_settings = Settings.from_env()
searcher = Searcher(_settings)


def on_push(request):
    """A Pub/Sub push (JSON wrapper ``{"message": {...}}``) of an index-updated CloudEvent: reload, never fail."""
    auth.authorize_push(_settings)  # gcp mode: only the push service account may trigger a reload
    try:
        body = request.get_json(silent=True) or {}
    except RecursionError:  # JSON nested past the parser's stack (silent= covers ValueError only)
        body = {}
    msg = body.get("message") if isinstance(body, dict) else None
    if not isinstance(msg, dict):
        return {"error": "expected a Pub/Sub push body {'message': {...}}"}, 400
    attrs = msg.get("attributes") or {}
    if attrs.get("ce-type") != INDEX_UPDATED:
        return {"ignored": attrs.get("ce-type")}, 200  # ack: not ours to handle
    try:
        data = json.loads(base64.b64decode(msg.get("data") or "", validate=True))
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    except (binascii.Error, ValueError, RecursionError) as exc:
        log.error("dropped malformed index-updated message %s: %s", msg.get("messageId"), type(exc).__name__)
        return {"error": "malformed"}, 200  # ack: redelivery cannot fix it
    started = searcher.on_index_updated(data)
    log.info(
        "index-updated for %s (promoted=%s): reload %s",
        data.get("dataset"),
        data.get("promoted"),
        "started" if started else "not needed",
    )
    return {"reloading": bool(started)}, 200


PARAMETERS = ("dataset", "q", "k", "mode")  # GET /search: anything else is refused, not ignored


@functions_framework.http
def search(request):
    if request.method == "POST":
        return on_push(request)
    if request.path.rstrip("/") == "/healthz":
        return {
            "status": "ok",
            "serving": {ds: s.promoted.get("collection") for ds, s in searcher.snapshot().items()},
        }
    args = request.args
    if unknown := sorted(set(args) - set(PARAMETERS)):
        return {"error": f"unknown query parameter(s) {unknown}; allowed: {', '.join(PARAMETERS)}"}, 400
    if repeated := sorted(p for p in args if len(args.getlist(p)) > 1):
        return {"error": f"query parameter(s) {repeated} given more than once"}, 400
    if not args.get("dataset") or not args.get("q"):
        return {"error": "query parameters 'dataset' and 'q' are required"}, 400
    k = args.get("k", "10")
    # ASCII digits only: int() would also take " 7", "+7", "1_0" or "٣", and answer bad ones with Python's error text
    if not (k.isascii() and k.isdigit() and len(k) <= 4):
        return {"error": f"k must be a whole number within 1..1000, not {k!r}"}, 400
    try:
        return searcher.search(args["dataset"], args["q"], int(k), args.get("mode") or None)
    except NotIndexed as exc:
        return {"error": str(exc)}, 404
    except ValueError as exc:  # a bad k, mode, dataset name, or a query too long or empty
        return {"error": str(exc)}, 400
