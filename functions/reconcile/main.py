"""Cloud Function on a schedule (Cloud Scheduler -> reconcile-ticks; locally the stack's ticker): launch due
coalesced runs and advance runs whose job-state event was lost."""

from __future__ import annotations

import functions_framework

from embedpipe.runtime import acked


@functions_framework.cloud_event
@acked
def reconcile(pipe, cloud_event):
    return "; ".join(pipe.reconcile())
