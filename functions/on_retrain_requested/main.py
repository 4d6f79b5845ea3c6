"""Cloud Function: a retrain message on the retrain-requests topic."""

from __future__ import annotations

import functions_framework

from embedpipe.contracts.events import parse_push, parse_retrain
from embedpipe.runtime import acked


@functions_framework.cloud_event
@acked
def on_retrain_requested(pipe, cloud_event):
    return pipe.on_retrain(parse_retrain(parse_push(cloud_event)))
