"""Push authentication: the OIDC token Pub/Sub push attaches as ``Authorization: Bearer`` (DESIGN.md §3.3).

In gcp mode (``EMBEDPIPE_PUSH_AUTH=auto``, the default, or ``on``) every push-fed handler checks, before it does
anything, that the token is signed by Google (``google.oauth2.id_token.verify_oauth2_token``: signature, expiry,
issuer; ``CLOCK_SKEW_S`` of clock skew allowed), that its audience is one we accept, and that it was minted for
``EMBEDPIPE_PUSH_SERVICE_ACCOUNT`` with a verified email. No token: 401; a bad or foreign token: 403. Locally
(``auto`` with mode=local, or ``off``) nothing is checked: the Pub/Sub emulator sends no tokens.

Audience: ``EMBEDPIPE_PUSH_AUDIENCE`` (comma-separated) when set; else the URL the request came to (``https://`` +
host, with or without the path). The deploy sets each push subscription's token audience to the function's or
service's own URL, so the function does not need to be told its URL.

Google's signing certificates are fetched once and cached for ``CERTS_TTL_S`` (they rotate daily, overlapping).
"""

from __future__ import annotations

import logging
import threading
import time

from embedpipe.config import Settings

log = logging.getLogger(__name__)

CERTS_TTL_S = 3600
# Clock skew allowed on iat/exp: google-auth allows none by default, so a token minted by a Pub/Sub host whose
# clock runs a second ahead of ours is "used too early" (intermittent 403s and redeliveries).
CLOCK_SKEW_S = 30


class AuthError(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _CachingRequest:
    """A ``google.auth.transport.Request`` that caches GET responses (the certificate document) for a while."""

    def __init__(self, inner=None, ttl_s: float = CERTS_TTL_S):
        self._inner = inner
        self._ttl = ttl_s
        self._cache: dict[str, tuple[float, object]] = {}
        self._lock = threading.Lock()

    def __call__(self, url, method="GET", body=None, headers=None, timeout=None, **kwargs):
        if method != "GET":
            return self._transport()(url, method=method, body=body, headers=headers, timeout=timeout, **kwargs)
        with self._lock:
            hit = self._cache.get(url)
            if hit and hit[0] > time.monotonic():
                return hit[1]
        response = self._transport()(url, method=method, headers=headers, timeout=timeout, **kwargs)
        if response.status == 200:
            with self._lock:
                self._cache[url] = (time.monotonic() + self._ttl, response)
        return response

    def _transport(self):
        if self._inner is None:
            import google.auth.transport.requests

            self._inner = google.auth.transport.requests.Request()
        return self._inner


_request = _CachingRequest()


def set_certificate_source(request) -> None:
    """Replace where Google's certificates come from (tests: a stub that serves a test key's certificate)."""
    global _request
    _request = request


def verify(token: str, audiences: list[str], email: str) -> dict:
    """The token's claims, or AuthError(403). ``audiences``: any of them is accepted."""
    from google.oauth2 import id_token

    if not email:
        raise AuthError(403, "EMBEDPIPE_PUSH_SERVICE_ACCOUNT is not set: refusing every push (fail closed)")
    try:
        claims = id_token.verify_oauth2_token(token, _request, audience=audiences, clock_skew_in_seconds=CLOCK_SKEW_S)
    except Exception as exc:  # noqa: BLE001 - google-auth raises ValueError, GoogleAuthError, TransportError...
        raise AuthError(403, f"invalid token: {exc}") from None
    if claims.get("email") != email or not claims.get("email_verified"):
        raise AuthError(403, f"token is for {claims.get('email')!r}, expected {email!r}")
    return claims


def audiences_for(settings: Settings, url: str, host: str, path: str) -> list[str]:
    if settings.push_audience:
        return [a.strip() for a in settings.push_audience.split(",") if a.strip()]
    base = f"https://{host}"
    return [base, base + "/", base + path, url.split("?", 1)[0]]


def check_request(settings: Settings, request) -> dict | None:
    """Check a flask request's bearer token when push auth is on; returns its claims (None when auth is off)."""
    if not settings.push_auth_enabled:
        return None
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(401, "missing Authorization: Bearer token")
    auds = audiences_for(settings, request.url, request.host, request.path)
    return verify(token.strip(), auds, settings.push_service_account)


def authorize_push(settings: Settings) -> None:
    """Inside a push handler: answer 401/403 (``flask.abort``) unless push auth is off or the token is valid.
    Every push-fed function and service calls this first (``runtime.acked`` does it for the cloudevent ones)."""
    if not settings.push_auth_enabled:
        return
    import flask

    if not flask.has_request_context():  # called directly in-process, not over HTTP: nothing to check
        return
    try:
        check_request(settings, flask.request)
    except AuthError as exc:
        log.warning("push refused (%d): %s", exc.status, exc.reason)
        flask.abort(exc.status, description=exc.reason)
