"""Cloud Function: a file landed in the data bucket (GCS notification via Pub/Sub push, or Eventarc)."""

from __future__ import annotations

import functions_framework

from embedpipe.contracts.events import parse_object_change
from embedpipe.runtime import acked


@functions_framework.cloud_event
@acked
def on_data_uploaded(pipe, cloud_event):
    return pipe.on_object_change(parse_object_change(cloud_event))
