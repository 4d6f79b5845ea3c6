"""Cloud Run service: load a run's embeddings into Milvus, evaluate, gate, swap the alias, publish index-updated."""

from __future__ import annotations

import functions_framework
import jsonschema  # noqa: F401 - index-updated is validated before it is stored
import pyarrow.parquet  # noqa: F401 - imported at start-up rather than on the first request's clock (~0.8 s)
import pymilvus  # noqa: F401

from embedpipe.contracts.events import parse_push
from embedpipe.index.indexing import index_run
from embedpipe.runtime import acked


@functions_framework.cloud_event
@acked
def index(pipe, cloud_event):
    return index_run(pipe, parse_push(cloud_event).json()["run_id"])
