"""Push authentication: OIDC tokens signed by a test RSA key, Google's certificate endpoint stubbed, requests posted
through functions_framework.create_app(...).test_client() to the real functions and services."""

from __future__ import annotations

import json
import time

import functions_framework
import pytest
from cloudevents.conversion import to_binary
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt

from embedpipe import runtime, topology
from embedpipe.config import Settings
from embedpipe.control.pipeline import Pipeline
from embedpipe.gcp import auth
from embedpipe.ledger.runs import Ledger
from tests.helpers import ROOT
from tests.unit.fakes import FakeLauncher, FakeStore, load_event

PUSHER = "embedpipe-push@demo-project.iam.gserviceaccount.com"
AUDIENCE = "https://localhost"  # the test client's host: the default accepted audience


def _key_and_cert(cn: str) -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = time.time()
    import datetime as dt

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime.fromtimestamp(now - 3600, dt.UTC))
        .not_valid_after(dt.datetime.fromtimestamp(now + 86400, dt.UTC))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem, cert.public_bytes(serialization.Encoding.PEM)


GOOGLE_KEY, GOOGLE_CERT = _key_and_cert("google-test")
ROGUE_KEY, _ = _key_and_cert("rogue")


class CertSource:
    """Stands in for https://www.googleapis.com/oauth2/v1/certs: serves the test key's certificate."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, url, method="GET", **kwargs):
        self.calls += 1

        class Response:
            status = 200
            headers = {}
            data = json.dumps({"test-kid": GOOGLE_CERT.decode()}).encode()

        return Response()


def token(key: bytes = GOOGLE_KEY, **claims) -> str:
    now = int(time.time())
    payload = {
        "iss": "https://accounts.google.com",
        "aud": AUDIENCE,
        "email": PUSHER,
        "email_verified": True,
        "sub": "1234",
        "iat": now,
        "exp": now + 600,
        **claims,
    }
    return jwt.encode(crypt.RSASigner.from_string(key, "test-kid"), payload).decode()


@pytest.fixture
def certs(monkeypatch):
    source = CertSource()
    monkeypatch.setattr(auth, "_request", auth._CachingRequest(source))
    return source


GCP_ENV = {
    "EMBEDPIPE_MODE": "gcp",
    "EMBEDPIPE_PROJECT": "demo-project",
    "EMBEDPIPE_TRAINER_IMAGE": "r/trainer:1",
    "EMBEDPIPE_EMBEDDER_IMAGE": "r/embedder:1",
    "EMBEDPIPE_PUSH_SERVICE_ACCOUNT": PUSHER,
}


def install(monkeypatch, **env):
    """Every handler runs against an in-memory ledger; returns (store, launcher, published) to prove no side effect."""
    for k, v in {**GCP_ENV, **env}.items():
        monkeypatch.setenv(k, v)
    store, launcher, published = FakeStore(), FakeLauncher(), []
    settings = Settings.from_env()
    pipe = Pipeline(
        settings,
        Ledger(settings.artifacts_bucket, store),
        launcher,
        lambda t, e: published.append(e),
        read_uploads=False,
    )
    monkeypatch.setattr(runtime, "pipeline", lambda: pipe)
    return store, launcher, published


@pytest.fixture
def gcp(monkeypatch, certs):
    return install(monkeypatch)


def client(name: str):
    c = topology.component(name)
    return functions_framework.create_app(
        target=c.target, source=str(ROOT / c.path), signature_type=c.signature
    ).test_client()


def post(c, event, bearer: str | None) -> int:
    headers, body = to_binary(event)
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    return c.post("/projects/demo-project/topics/data-events", headers=headers, data=body).status_code


def test_settings_turn_push_auth_on_in_gcp_mode_only():
    assert Settings.from_env({}).push_auth_enabled is False
    assert Settings.from_env(GCP_ENV).push_auth_enabled is True
    assert Settings.from_env({**GCP_ENV, "EMBEDPIPE_PUSH_AUTH": "off"}).push_auth_enabled is False
    assert Settings.from_env({"EMBEDPIPE_PUSH_AUTH": "on"}).push_auth_enabled is True


def test_a_valid_token_from_the_push_account_is_processed(gcp, certs):
    store, _, _ = gcp
    c = client("on-data-uploaded")
    assert post(c, load_event("gcs_notification_push.json"), token()) == 200
    assert store.uris("claims/"), "the upload was claimed"
    assert post(c, load_event("gcs_notification_push.json"), token()) == 200
    assert certs.calls == 1, "Google's certificates are fetched once and cached"


@pytest.mark.parametrize(
    ("bearer", "status"),
    [
        (None, 401),
        ("", 401),
        ("not-a-jwt", 403),
        (token(key=ROGUE_KEY), 403),  # signed by someone else
        (token(aud="https://other-service.run.app"), 403),
        (token(email="attacker@evil-project.iam.gserviceaccount.com"), 403),
        (token(email_verified=False), 403),
        (token(iss="https://evil.example.com"), 403),
        (token(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600), 403),  # expired
        # issued in the future, far past the skew (built at collection: it must still be the future when it runs)
        (token(iat=int(time.time()) + 86400, exp=int(time.time()) + 90000), 403),
    ],
    ids=[
        "no-header",
        "empty",
        "garbage",
        "wrong-key",
        "wrong-audience",
        "wrong-email",
        "unverified",
        "issuer",
        "exp",
        "future",
    ],
)
def test_bad_or_missing_tokens_are_refused_with_no_side_effect(gcp, bearer, status):
    store, launcher, published = gcp
    assert post(client("on-data-uploaded"), load_event("gcs_notification_push.json"), bearer) == status
    assert store.objects == {} and launcher.jobs == {} and published == []


def test_a_token_from_a_clock_a_few_seconds_ahead_is_accepted(gcp):
    # google-auth's default (no skew) answers "Token used too early" for this one
    now = int(time.time())
    assert post(client("on-data-uploaded"), load_event("gcs_notification_push.json"), token(iat=now + 5)) == 200


def test_basic_scheme_is_not_a_bearer_token(gcp):
    store, _, _ = gcp
    headers, body = to_binary(load_event("gcs_notification_push.json"))
    headers["Authorization"] = f"Basic {token()}"
    assert client("on-data-uploaded").post("/", headers=headers, data=body).status_code == 401
    assert store.objects == {}


@pytest.mark.parametrize("name", [c.name for c in topology.COMPONENTS if c.topic])
def test_every_push_fed_function_and_service_refuses_unauthenticated_pushes(gcp, name):
    store, launcher, published = gcp
    c = client(name)
    event = load_event("retrain_push.json")
    assert post(c, event, None) == 401
    assert post(c, event, token(key=ROGUE_KEY)) == 403
    assert store.objects == {} and launcher.jobs == {} and published == []


def test_configured_audience_replaces_the_request_url(monkeypatch, certs):
    store, _, _ = install(monkeypatch, EMBEDPIPE_PUSH_AUDIENCE="aud-a,aud-b")
    c = client("on-data-uploaded")
    assert post(c, load_event("gcs_notification_push.json"), token()) == 403, "the URL is no longer accepted"
    assert store.objects == {}
    assert post(c, load_event("gcs_notification_push.json"), token(aud="aud-b")) == 200


def test_without_a_configured_push_account_every_push_is_refused(monkeypatch, certs):
    store, _, _ = install(monkeypatch, EMBEDPIPE_PUSH_SERVICE_ACCOUNT="")  # empty = unset
    assert post(client("on-data-uploaded"), load_event("gcs_notification_push.json"), token()) == 403
    assert store.objects == {}


def test_local_mode_needs_no_token(monkeypatch):
    monkeypatch.delenv("EMBEDPIPE_MODE", raising=False)
    store, published = FakeStore(), []
    settings = Settings.from_env({})
    pipe = Pipeline(
        settings,
        Ledger(settings.artifacts_bucket, store),
        FakeLauncher(),
        lambda t, e: published.append(e),
        read_uploads=False,
    )
    monkeypatch.setattr(runtime, "pipeline", lambda: pipe)
    assert post(client("on-data-uploaded"), load_event("gcs_notification_push.json"), None) == 200
    assert store.uris("claims/")
