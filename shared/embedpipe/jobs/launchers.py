"""Which ``JobLauncher`` the settings ask for: the local job runner in local mode, Vertex AI in gcp mode. The one
module that knows both backends, so neither imports the other (Vertex AI's client is imported only when chosen)."""

from __future__ import annotations

from embedpipe.config import Settings
from embedpipe.jobs.local import LocalJobLauncher
from embedpipe.jobs.spec import JobLauncher


def for_settings(settings: Settings) -> JobLauncher:
    if settings.mode == "local":
        return LocalJobLauncher(settings)
    from embedpipe.jobs.vertex import VertexJobLauncher

    return VertexJobLauncher(settings)
