"""Query-time search over a dataset's alias, with the model that built the promoted collection.

The promoted index is read from the ledger on each request (one small object read), so a new promotion is picked up
by the next request; models are cached per URI, so a reload never drops requests in flight: old requests finish on
the old model, new ones load the new one once.
"""

from __future__ import annotations

import functools
import threading

from embedpipe import vectorstore
from embedpipe.config import Settings
from embedpipe.embedding import encode
from embedpipe.model import load_model
from embedpipe.runs import Ledger

_lock = threading.Lock()


class NotIndexed(LookupError):
    pass


@functools.lru_cache(maxsize=4)
def _model(uri: str):
    return load_model(uri)


def model_for(uri: str):
    with _lock:  # one load per URI even under concurrent first requests
        return _model(uri)


def search(settings: Settings, dataset: str, query: str, k: int = 10, mode: str = "dense") -> dict:
    if mode not in ("dense", "hybrid"):
        raise ValueError(f"mode must be dense or hybrid, not {mode!r}")
    promoted = Ledger(settings.artifacts_bucket).get_dataset(dataset).get("promoted")
    if not promoted:
        raise NotIndexed(f"dataset {dataset!r} has no promoted index yet")
    model, info = model_for(promoted["model_uri"])
    vector = encode(model, [info.query_prefix + query])[0]
    client = vectorstore.connect(settings.milvus_uri, settings.milvus_token)
    alias = vectorstore.alias_name(dataset)
    if mode == "dense":
        hits = vectorstore.search_dense(client, alias, [vector], k)[0]
    else:
        hits = vectorstore.search_hybrid(client, alias, [vector], [query], k)[0]
    titles = {}
    if hits:
        rows = client.get(collection_name=alias, ids=[h[0] for h in hits], output_fields=["id", "title"])
        titles = {r["id"]: r.get("title", "") for r in rows}
    return {
        "dataset": dataset,
        "query": query,
        "mode": mode,
        "collection": promoted["collection"],
        "model_version": promoted.get("fingerprint"),
        "hits": [{"id": i, "score": round(s, 6), "title": titles.get(i, "")} for i, s in hits],
    }
