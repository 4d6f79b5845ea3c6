"""Vertex AI client settings shared by the job launcher (``jobs.vertex``) and the model registry
(``index.registry``): the gapic client's keyword arguments and the label-value rule. Here so that the indexer, which
registers models, never imports the module that launches jobs."""

from __future__ import annotations

import re

from embedpipe.config import Settings


def label_value(value: str) -> str:
    """A valid label value: lowercase letters, digits, ``_`` and ``-``, at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]", "-", str(value).lower())[:63]


def parent(settings: Settings) -> str:
    """The location every Vertex AI resource of ours lives under (jobs, models)."""
    return f"projects/{settings.project}/locations/{settings.region}"


def client_options(settings: Settings, credentials=None) -> dict:
    """Keyword arguments for any gapic ``aiplatform_v1`` service client (jobs, models): REST transport, the regional
    endpoint or ``EMBEDPIPE_VERTEX_ENDPOINT``, and anonymous credentials for an ``http://`` one (a local test
    server)."""
    endpoint = settings.vertex_endpoint or f"{settings.region}-aiplatform.googleapis.com"
    if credentials is None and endpoint.startswith("http://"):
        from google.auth.credentials import AnonymousCredentials

        credentials = AnonymousCredentials()
    return {"credentials": credentials, "transport": "rest", "client_options": {"api_endpoint": endpoint}}
