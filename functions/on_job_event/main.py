"""Cloud Function: an ml_job LogEntry (Cloud Logging sink, or the local job runner) says a job changed state."""

from __future__ import annotations

import functions_framework

from embedpipe.contracts.events import parse_job_log_entry, parse_push
from embedpipe.runtime import acked


@functions_framework.cloud_event
@acked
def on_job_event(pipe, cloud_event):
    return pipe.on_job_event(parse_job_log_entry(parse_push(cloud_event)))
