"""A local HTTP server that stands in for a Vertex AI REST API and records every request: the base of the fakes the
integration tests point the real gapic clients at (``test_vertex.FakeVertex``: jobs; ``test_registry.
FakeModelRegistry``: the Model Registry). The base parses and records each request and sends the answer; a subclass
says what the API answers (``route``). No credentials, no network beyond 127.0.0.1."""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PARENT = "projects/demo-project/locations/us-central1"


def error(code: int, status: str, message: str) -> dict:
    """A Google API error body, as gapic reads it."""
    return {"error": {"code": code, "message": message, "status": status}}


class FakeVertexServer:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict, dict]] = []  # method, path (no /v1/ prefix), query, body
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def bodies(self, method: str, path_re: str) -> list[dict]:
        return [b for m, p, _, b in self.requests if m == method and re.search(path_re, p)]

    def route(self, method: str, path: str, query: dict, body: dict) -> tuple[int, dict]:
        """The answer to one request: (HTTP status, JSON body)."""
        raise NotImplementedError

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self, method: str) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else {}
                path = re.sub(r"^/(v1|ui)/", "", urllib.parse.unquote(url.path))
                fake.requests.append((method, path, query, body))
                code, doc = fake.route(method, path, query, body)
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_DELETE(self):
                self._handle("DELETE")

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
