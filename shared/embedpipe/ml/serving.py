"""Serving a registered model: the embedder image doubles as a Vertex AI custom serving container
(``python -m task serve``; the registry's ``container_spec`` says so), so a Model Registry version serves batch
prediction and online endpoints with the code that embedded its index.

Vertex's container contract: listen on ``AIP_HTTP_PORT``, answer ``AIP_HEALTH_ROUTE`` (200 once the model is
loaded, 503 before) and ``AIP_PREDICT_ROUTE``; the model folder is ``AIP_STORAGE_URI`` (Vertex's copy of the
version's ``artifact_uri``), loaded only through ``embedpipe.ml.model.load_model``.

Request ``{"instances": [...], "parameters": {"kind": "query" | "document"}}``, response
``{"predictions": [[float, ...], ...]}``: one L2-normalised vector per instance, in order. An instance is a string or
``{"text": str, "title"?: str, "kind"?: "query" | "document"}``; its kind (the instance's, else the request's, else
``query``) picks the model's ``query_prefix`` or ``document_prefix``, and a document's title joins its text as the
embedder joins them (``datasets.Doc.full_text``), so a document vector equals the one in the index. Queries are the
default: an online endpoint mostly embeds queries; a batch prediction of a corpus sets ``kind`` to ``document`` in
its model parameters.

The server is the standard library's (``http.server``; nothing new in the image): a thread per request, one encode
at a time (the model is shared and the machine's cores are already used by one encode).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from embedpipe.config import Platform

log = logging.getLogger(__name__)

PORT = 8080  # the container port the registry declares; Vertex passes it back as AIP_HTTP_PORT
PREDICT_ROUTE = "/predict"
HEALTH_ROUTE = "/health"
KINDS = ("query", "document")
MAX_BODY_BYTES = 2 << 20  # Vertex online prediction caps a request at 1.5 MB; a little over it for batch lines
MAX_INSTANCES = 1024  # per request: one request must not hold the encode lock for minutes
READ_TIMEOUT_S = 30  # a client that announces more bytes than it sends must not hold a thread forever


class BadRequest(ValueError):
    pass


def texts(instances, parameters: dict | None, info) -> list[str]:
    """The strings to encode for ``instances``, each with its kind's prefix (see the module doc)."""
    from embedpipe.contracts.datasets import Doc

    if not isinstance(instances, list):
        raise BadRequest('"instances" must be a list')
    if len(instances) > MAX_INSTANCES:
        raise BadRequest(f"{len(instances)} instances, over the {MAX_INSTANCES} a request may hold")
    if parameters is not None and not isinstance(parameters, dict):
        raise BadRequest('"parameters" must be an object')
    default = (parameters or {}).get("kind") or "query"
    out = []
    for n, item in enumerate(instances):
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict) or not isinstance(item.get("text", ""), str):
            raise BadRequest(f'instance {n}: a string or {{"text": str, "title"?: str, "kind"?: str}}')
        kind = item.get("kind") or default
        if kind not in KINDS:
            raise BadRequest(f"instance {n}: kind must be one of {KINDS}, not {kind!r}")
        if kind == "document":
            out.append(info.document_prefix + Doc("", item.get("text", ""), str(item.get("title") or "")).full_text)
        else:
            out.append(info.query_prefix + item.get("text", ""))
    return out


class Server:
    """The model, loaded in the background so health checks are answered (503) while it loads."""

    def __init__(self, model_uri: str):
        self.model_uri = model_uri
        self.model = self.info = None
        self.lock = threading.Lock()
        self.loaded = threading.Event()

    def load(self) -> None:
        from embedpipe.ml.model import load_model

        try:
            self.model, self.info = load_model(self.model_uri, inference=True)
        except Exception:
            log.exception("cannot load the model at %s", self.model_uri)
            os._exit(1)  # Vertex reports the container as failed instead of waiting on health checks forever
        self.loaded.set()
        log.info("serving %s (dim %d, fingerprint %s)", self.model_uri, self.info.dim, self.info.fingerprint)

    def predict(self, body: dict) -> list[list[float]]:
        from embedpipe.ml.embedding import encode

        batch = texts(body.get("instances"), body.get("parameters"), self.info)
        with self.lock:
            vectors = encode(self.model, batch)
        return vectors.tolist()


def handler(server: Server, health_route: str, predict_route: str):
    class Handler(BaseHTTPRequestHandler):
        timeout = READ_TIMEOUT_S

        def log_message(self, fmt, *args):
            log.debug(fmt, *args)

        def _send(self, code: int, doc: dict) -> None:
            data = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.split("?")[0] != health_route:
                return self._send(404, {"error": f"no route {self.path}"})
            if not server.loaded.is_set():
                return self._send(503, {"status": "loading"})
            return self._send(200, {"status": "ok"})

        def do_POST(self):
            if self.path.split("?")[0] != predict_route:
                return self._send(404, {"error": f"no route {self.path}"})
            if not server.loaded.is_set():
                return self._send(503, {"error": "the model is still loading"})
            try:
                length = self.headers.get("Content-Length") or "0"
                if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                    raise BadRequest(f"Content-Length must be a number of bytes up to {MAX_BODY_BYTES}")
                data = self.rfile.read(int(length))
                if len(data) < int(length):
                    raise BadRequest("the body is shorter than its Content-Length")
                body = json.loads(data.decode("utf-8") or "{}")
                if not isinstance(body, dict):
                    raise BadRequest('the body must be {"instances": [...]}')
                return self._send(200, {"predictions": server.predict(body)})
            except (BadRequest, ValueError) as exc:  # JSON and UTF-8 errors are ValueErrors
                return self._send(400, {"error": str(exc)})
            except Exception as exc:  # noqa: BLE001 - a reply, never a dropped connection
                log.exception("predict failed")
                return self._send(500, {"error": f"{type(exc).__name__}: {exc}"[:500]})

    return Handler


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="task serve", description="Serve the model at AIP_STORAGE_URI (Vertex AI).")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (a container: every interface)")
    args = p.parse_args(argv)
    env = Platform.from_env()  # what Vertex AI tells a prediction container
    uri = env.aip_storage_uri
    if not uri:
        print("AIP_STORAGE_URI is not set: Vertex AI sets it to the model version's folder", file=sys.stderr)
        return 2
    port = int(env.aip_http_port or PORT)
    server = Server(uri)
    httpd = ThreadingHTTPServer(
        (args.host, port),
        handler(
            server,
            env.aip_health_route or HEALTH_ROUTE,
            env.aip_predict_route or PREDICT_ROUTE,
        ),
    )
    threading.Thread(target=server.load, name="load-model", daemon=True).start()
    log.info("listening on %s:%d", args.host, port)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0
