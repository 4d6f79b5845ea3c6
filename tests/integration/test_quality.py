"""``make quality`` asking the search service for its default mode: over real HTTP, to a stand-in service on
127.0.0.1 (the rest of ``make quality``'s parts: tests/unit/test_quality.py)."""

from __future__ import annotations

import json

import pytest

from embedpipe.retrieval.evaluation import evaluate
from quality import run


def test_query_service_asks_for_the_default_mode_top_100():
    import threading
    import urllib.parse
    from http.server import BaseHTTPRequestHandler, HTTPServer

    asked = []

    class Search(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            args = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
            asked.append(args)
            hits = [{"id": "d1", "score": 0.9, "title": ""}] if args["q"] == "first" else []
            body = json.dumps({"mode": "hybrid", "collection": "c1", "hits": hits}).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Search)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judged = {"1": {"d1": 1}, "2": {"d2": 1}, "3": {"d3": 1}}
        ranked, seen = run.query_service(server.server_port, "ds", judged, {"1": "first", "2": "second"})
    finally:
        server.shutdown()
    assert asked == [{"dataset": "ds", "q": "first", "k": "100"}, {"dataset": "ds", "q": "second", "k": "100"}]
    assert ranked == {"1": ["d1"], "2": []} and seen == {"modes": ["hybrid"], "collections": ["c1"]}
    assert evaluate(ranked, judged)["recall@1"] == pytest.approx(1 / 3)
