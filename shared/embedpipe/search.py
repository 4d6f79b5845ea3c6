"""Query-time search over a dataset's promoted index, with the model that built it.

A ``Searcher`` serves each dataset from what it has loaded: (promoted entry, model). A reload is explicit and
non-blocking: ``reload(dataset)`` (called for each index-updated event the service receives by push, and at most
every ``Settings.search_refresh_s`` from a request, in case an event was missed) loads the new model in a background
thread while requests keep being answered with the old one; the swap is one assignment. Queries go to the collection
by name (not the alias), so the old model is never used against the new collection in the moment between the alias
swap and the end of the reload (retention keeps the replaced collection, ``Settings.keep_collections`` >= 1).
The first request for a dataset loads synchronously: there is nothing older to serve.

Without a ``mode`` a query is answered the way the promoted run chose on its selection split (``default_mode``:
dense, bm25 or hybrid, with its hybrid weight), the mode its ``served`` metrics measured; a ``mode`` overrides it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass

from embedpipe import lexical, vectorstore
from embedpipe.config import Settings
from embedpipe.embedding import encode
from embedpipe.model import load_model
from embedpipe.runs import Ledger

log = logging.getLogger(__name__)
_lock = threading.Lock()


class NotIndexed(LookupError):
    pass


@functools.lru_cache(maxsize=4)
def _model(uri: str):
    return load_model(uri, inference=True)


def model_for(uri: str):
    with _lock:  # one load per URI even under concurrent first requests
        return _model(uri)


@dataclass(frozen=True)
class Serving:
    promoted: dict  # the ledger's promoted entry: collection, model_uri, fingerprint, updated_by, ...
    model: object
    info: object

    @property
    def version(self) -> tuple:
        return (self.promoted.get("collection"), self.promoted.get("model_uri"), self.promoted.get("updated_by"))


class Searcher:
    def __init__(self, settings: Settings, ledger: Ledger | None = None, loader=model_for):
        self.settings = settings
        self.ledger = ledger or Ledger(settings.artifacts_bucket)
        self.loader = loader
        self._serving: dict[str, Serving] = {}
        self._checked: dict[str, float] = {}
        self._reloading: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._first = threading.Lock()
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = vectorstore.connect(self.settings.milvus_uri, self.settings.milvus_token)
        return self._client

    def serving(self, dataset: str) -> Serving | None:
        return self._serving.get(dataset)

    def _promoted(self, dataset: str) -> dict | None:
        self._checked[dataset] = time.time()
        return self.ledger.get_dataset(dataset).get("promoted")

    def _load(self, promoted: dict) -> Serving:
        model, info = self.loader(promoted["model_uri"])
        return Serving(promoted, model, info)

    def current(self, dataset: str) -> Serving:
        cur = self._serving.get(dataset)
        if cur is None:
            with self._first:  # first request: load now, once
                cur = self._serving.get(dataset)
                if cur is None:
                    promoted = self._promoted(dataset)
                    if not promoted:
                        raise NotIndexed(f"dataset {dataset!r} has no promoted index yet")
                    cur = self._serving[dataset] = self._load(promoted)
            return cur
        if time.time() - self._checked.get(dataset, 0) > self.settings.search_refresh_s:
            self.reload(dataset)
        return cur

    def reload(self, dataset: str) -> threading.Thread | None:
        """Start loading the dataset's promoted model in the background (no-op when one is under way); requests
        are answered with the current one until the new one is ready. Returns the thread."""
        with self._lock:
            running = self._reloading.get(dataset)
            if running is not None and running.is_alive():
                return running
            thread = threading.Thread(target=self._reload, args=(dataset,), name=f"reload-{dataset}", daemon=True)
            self._reloading[dataset] = thread
            self._checked[dataset] = time.time()
        thread.start()
        return thread

    def _reload(self, dataset: str) -> None:
        try:
            promoted = self._promoted(dataset)
            cur = self._serving.get(dataset)
            if not promoted or (cur and Serving(promoted, None, None).version == cur.version):
                return
            t = time.time()
            new = self._load(promoted)
            self._serving[dataset] = new  # the swap: requests from now on use the new model
            log.info(
                "search %s: now serving %s (model %s), loaded in %.1fs",
                dataset,
                promoted["collection"],
                promoted.get("fingerprint"),
                time.time() - t,
            )
        except Exception:  # noqa: BLE001 - keep serving the old model; the next event or refresh retries
            log.exception("search %s: reload failed; still serving the previous model", dataset)

    def on_index_updated(self, data: dict) -> threading.Thread | None:
        """An index-updated event: reload when it promoted something (a rejected run changes nothing)."""
        if data.get("promoted") and data.get("dataset"):
            return self.reload(data["dataset"])
        return None

    def search(self, dataset: str, query: str, k: int = 10, mode: str | None = None) -> dict:
        if mode and mode not in vectorstore.MODES:
            raise ValueError(f"mode must be one of {', '.join(vectorstore.MODES)}, not {mode!r}")
        if not 1 <= k <= 1000:
            raise ValueError(f"k must be within 1..1000, not {k}")
        cur = self.current(dataset)
        settings = cur.promoted.get("search") or getattr(cur.info, "search", None) or {}
        mode = mode or settings.get("default_mode") or "dense"
        vector = encode(cur.model, [cur.info.query_prefix + query])[0] if mode != "bm25" else None
        collection = cur.promoted["collection"]
        terms = lexical.analyzed([query]) if mode != "dense" else [""]
        hits = vectorstore.search(self.client, collection, mode, [vector], terms, k, settings)[0]
        titles = {}
        if hits:
            rows = self.client.get(collection_name=collection, ids=[h[0] for h in hits], output_fields=["id", "title"])
            titles = {r["id"]: r.get("title", "") for r in rows}
        return {
            "dataset": dataset,
            "query": query,
            "mode": mode,
            "collection": collection,
            "model_version": cur.promoted.get("fingerprint"),
            "hits": [{"id": i, "score": round(sc, 6), "title": titles.get(i, "")} for i, sc in hits],
        }


def search(settings: Settings, dataset: str, query: str, k: int = 10, mode: str | None = None) -> dict:
    """One-off search (no long-lived Searcher): reads the promoted index from the ledger now."""
    return Searcher(settings).search(dataset, query, k, mode)
