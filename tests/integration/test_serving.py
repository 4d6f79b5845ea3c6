"""The embedder image as a Vertex AI serving container: ``python -m task serve`` started as a real process with the
AIP_* contract on the tiny model; its vectors are the embedder's (same loader, same prefixes, same encode)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict

import numpy as np
import pytest

from embedpipe.contracts.datasets import Doc
from embedpipe.ml.embedding import encode
from embedpipe.ml.model import INFO_FILE, ModelInfo, load_model
from tests.helpers import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    """The tiny model with an embedpipe.json whose prefixes differ per kind."""
    out = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(tiny_model, out)
    info = ModelInfo("tiny", 32, 64, query_prefix="query: ", document_prefix="passage: ", fingerprint="fp-tiny")
    (out / INFO_FILE).write_text(json.dumps(asdict(info)))
    return out


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "shared"), str(ROOT)]),
        "AIP_HTTP_PORT": str(port),
        "AIP_STORAGE_URI": str(model_dir),
        "AIP_HEALTH_ROUTE": "/v1/endpoints/e/deployedModels/m",  # Vertex's own routes, not our defaults
        "AIP_PREDICT_ROUTE": "/v1/endpoints/e/deployedModels/m:predict",
        "EMBEDPIPE_STATE_DIR": str(tmp_path_factory.mktemp("serve-state")),
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "task", "serve", "--host", "127.0.0.1"],
        cwd=ROOT / "containers" / "embedder",
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, f"the server exited: {proc.stderr.read().decode()[-2000:]}"
            try:
                with urllib.request.urlopen(base + env["AIP_HEALTH_ROUTE"], timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):  # not listening yet, or 503 while the model loads
                pass
            assert time.time() < deadline, "the server never became healthy"
            time.sleep(0.5)
        yield base + env["AIP_PREDICT_ROUTE"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def post(url: str, body) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_predictions_are_the_embedders_vectors_with_each_kinds_prefix(server, model_dir):
    instances = [
        "coolant pump keeps tripping",  # a plain string: a query by default
        {"text": "Replace the seal first.", "title": "Pump repair", "kind": "document"},
        {"text": "coolant pump keeps tripping", "kind": "document"},
    ]
    status, body = post(server, {"instances": instances})
    assert status == 200
    got = np.asarray(body["predictions"], dtype=np.float32)
    model, info = load_model(str(model_dir), inference=True)
    document = Doc("", "Replace the seal first.", "Pump repair").full_text  # what the embedder embeds
    want = encode(
        model,
        [
            "query: coolant pump keeps tripping",
            f"passage: {document}",
            "passage: coolant pump keeps tripping",
        ],
    )
    assert got.shape == (3, 32)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert not np.allclose(got[0], got[2], atol=1e-3), "the same text as a document gets the document prefix"

    status, body = post(server, {"instances": ["coolant pump keeps tripping"], "parameters": {"kind": "document"}})
    np.testing.assert_allclose(np.asarray(body["predictions"][0]), got[2], atol=1e-5)


def test_bad_requests_are_refused_with_the_reason(server):
    status, body = post(server, {"instances": [{"text": "x", "kind": "image"}]})
    assert status == 400 and "kind must be one of" in body["error"]
    status, body = post(server, {"instances": "not a list"})
    assert status == 400 and "instances" in body["error"]


def raw(url: str, data: bytes, headers: dict) -> tuple[int, dict]:
    """A request as a hostile client sends it (http.client: any header, any body)."""
    import http.client
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.putrequest("POST", u.path)
    for k, v in headers.items():
        conn.putheader(k, v)
    conn.endheaders()
    conn.send(data)
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def test_hostile_requests_get_a_reply_never_a_dropped_connection(server):
    assert raw(server, b"\xff\xfe", {"Content-Length": "2"})[0] == 400  # not UTF-8
    status, body = raw(server, b"{}", {"Content-Length": "abc"})
    assert status == 400 and "Content-Length" in body["error"]
    status, body = raw(server, b"{}", {"Content-Length": str(10**13)})  # announced, never sent: refused unread
    assert status == 400 and "Content-Length" in body["error"]
    status, body = post(server, {"instances": ["x"], "parameters": "document"})
    assert status == 400 and "parameters" in body["error"]
    status, body = post(server, {"instances": ["x"] * 5000})
    assert status == 400 and "over the" in body["error"]
    status, _ = post(server, {"instances": ["still serving"]})
    assert status == 200
