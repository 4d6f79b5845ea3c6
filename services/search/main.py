"""Cloud Run service: GET /search?dataset=&q=&k=&mode=dense|hybrid and GET /healthz."""

from __future__ import annotations

import functions_framework

from embedpipe.config import Settings
from embedpipe.search import NotIndexed
from embedpipe.search import search as run_search

_settings = Settings.from_env()


@functions_framework.http
def search(request):
    if request.path.rstrip("/") == "/healthz":
        return {"status": "ok"}
    args = request.args
    if not args.get("dataset") or not args.get("q"):
        return {"error": "query parameters 'dataset' and 'q' are required"}, 400
    try:
        k = int(args.get("k", 10))
        return run_search(_settings, args["dataset"], args["q"], k, args.get("mode", "dense"))
    except NotIndexed as exc:
        return {"error": str(exc)}, 404
    except ValueError as exc:
        return {"error": str(exc)}, 400
