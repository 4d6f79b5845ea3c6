"""Query-time search over a dataset's promoted index, with the model that built it.

A ``Searcher`` serves each dataset from what it has loaded: (promoted entry, model). A reload is explicit and
non-blocking: ``reload(dataset)`` (called for each index-updated event the service receives by push, and at most
every ``Settings.search_refresh_s`` from a request, in case an event was missed) loads the new model in a background
thread while requests keep being answered with the old one; the swap is one assignment. Queries go to the collection
by name (not the alias), so the old model is never used against the new collection in the moment between the alias
swap and the end of the reload (retention never drops the replaced collection during its swap, nor any collection
younger than ``Settings.retention_grace_s``). The first request for a dataset loads synchronously: there is nothing
older to serve. An instance serves at most ``Settings.search_max_datasets`` datasets (least recently used unloaded);
names are checked (``datasets.check_name``) and queries bounded (``Settings.search_max_query_chars``) up front.

Without a ``mode`` a query is answered the way the promoted run chose on its selection split (``default_mode``:
dense, bm25 or hybrid, with its hybrid weight), the mode its ``served`` metrics measured; a ``mode`` overrides it.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from embedpipe.config import Settings
from embedpipe.contracts.datasets import check_name
from embedpipe.contracts.records import PromotedEntry
from embedpipe.ledger.runs import Ledger, closest_names
from embedpipe.ml.embedding import encode
from embedpipe.ml.model import load_model
from embedpipe.retrieval import lexical, vectorstore

log = logging.getLogger(__name__)
_lock = threading.Lock()


class NotIndexed(LookupError):
    pass


class Loaded:
    """A loaded (model, info); unpacks like the tuple ``load_model`` returns."""

    __slots__ = ("model", "info", "__weakref__")

    def __init__(self, model, info) -> None:
        self.model, self.info = model, info

    def __iter__(self):
        return iter((self.model, self.info))


# Weak values: a model stays cached exactly as long as something serves it, so evicting a dataset releases its model
# (a strong LRU would keep evicted models alive, and forget models still served, loading a second copy).
_models: weakref.WeakValueDictionary[str, Loaded] = weakref.WeakValueDictionary()
_loading: dict[str, Future] = {}


def model_for(uri: str) -> Loaded:
    """The model at ``uri``, loaded once per URI even under concurrent first requests (they wait for that load);
    loads of different URIs do not wait for each other."""
    with _lock:
        hit = _models.get(uri)
        if hit is not None:
            return hit
        pending, mine = _loading.get(uri), False
        if pending is None:
            pending, mine = _loading.setdefault(uri, Future()), True
    if not mine:
        return pending.result()
    try:
        hit = Loaded(*load_model(uri, inference=True))
        with _lock:
            _models[uri] = hit
        pending.set_result(hit)
        return hit
    except BaseException as exc:
        pending.set_exception(exc)
        raise
    finally:
        with _lock:
            _loading.pop(uri, None)


@dataclass(frozen=True)
class Serving:
    promoted: PromotedEntry  # the ledger's promoted entry: collection, model_uri, fingerprint, updated_by, ...
    model: object
    info: object
    handle: object = None  # what the loader returned: holding it keeps model_for's weak cache entry alive

    @property
    def version(self) -> tuple:
        return (self.promoted.get("collection"), self.promoted.get("model_uri"), self.promoted.get("updated_by"))


class Searcher:
    def __init__(
        self,
        settings: Settings,
        ledger: Ledger | None = None,
        loader=model_for,
        clock: Callable[[], float] = time.time,
    ):
        self.settings = settings
        self.clock = clock  # wall time, epoch seconds: when each dataset was last checked (search_refresh_s)
        self.ledger = ledger or Ledger(settings.artifacts_bucket, clock=clock)
        self.loader = loader
        # At most settings.search_max_datasets datasets, least recently used first; _checked and _reloading only
        # ever hold datasets in _serving, so all three stay bounded.
        self._serving: OrderedDict[str, Serving] = OrderedDict()
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

    def snapshot(self) -> dict[str, Serving]:
        with self._lock:
            return dict(self._serving)

    def _load(self, promoted: dict) -> Serving:
        loaded = self.loader(promoted["model_uri"])
        model, info = loaded
        return Serving(promoted, model, info, loaded)

    def _keep(self, dataset: str, serving: Serving, replace: bool = False) -> bool:
        """Serve ``serving`` for ``dataset``; past ``search_max_datasets`` the least recently used dataset (and so
        its model) goes. ``replace``: only if the dataset is still served (it may have been evicted during a
        reload) and without counting as a use."""
        with self._lock:
            if replace and dataset not in self._serving:
                return False
            self._serving[dataset] = serving
            if not replace:
                self._serving.move_to_end(dataset)
                self._checked[dataset] = self.clock()
            while len(self._serving) > self.settings.search_max_datasets:
                old, _ = self._serving.popitem(last=False)
                self._checked.pop(old, None)
                self._reloading.pop(old, None)
                log.info("search: unloaded %s (least recently used)", old)
            return True

    def current(self, dataset: str) -> Serving:
        with self._lock:
            cur = self._serving.get(dataset)
            if cur is not None:
                self._serving.move_to_end(dataset)
        if cur is None:
            # Read before taking any lock and remember nothing when there is no index: a made-up name costs two
            # ledger reads and a listing (for the error's suggestions) and leaves no state, and cannot hold up other
            # datasets' first requests.
            promoted = self.ledger.get_dataset(dataset).get("promoted")
            if not promoted:
                raise NotIndexed(not_indexed(self.ledger, dataset))
            with self._first:  # first request: load now, once per dataset, one at a time (peak memory)
                cur = self._serving.get(dataset)
                if cur is None:
                    cur = self._load(promoted)
                    self._keep(dataset, cur)
            return cur
        if self.clock() - self._checked.get(dataset, 0) > self.settings.search_refresh_s:
            self.reload(dataset)
        return cur

    def reload(self, dataset: str) -> threading.Thread | None:
        """Start loading the dataset's promoted model in the background (no-op when one is under way); requests
        are answered with the current one until the new one is ready. Returns the thread, or None for a dataset
        not served here (its first request loads it: an event must not load models nobody asked for)."""
        with self._lock:
            if dataset not in self._serving:
                return None
            running = self._reloading.get(dataset)
            if running is not None and running.is_alive():
                return running
            thread = threading.Thread(target=self._reload, args=(dataset,), name=f"reload-{dataset}", daemon=True)
            self._reloading[dataset] = thread
            self._checked[dataset] = self.clock()
        thread.start()
        return thread

    def _reload(self, dataset: str) -> None:
        try:
            promoted = self.ledger.get_dataset(dataset).get("promoted")
            cur = self._serving.get(dataset)
            if not promoted or cur is None or Serving(promoted, None, None).version == cur.version:
                return
            t = time.time()
            new = self._load(promoted)
            if self._keep(dataset, new, replace=True):  # the swap: requests from now on use the new model
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
        check_name(dataset)  # before any lookup: only well-formed names reach the ledger
        if not query.strip():
            raise ValueError("q must not be empty")
        if len(query) > self.settings.search_max_query_chars:
            raise ValueError(f"q is {len(query)} characters, over the {self.settings.search_max_query_chars} limit")
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
        titles = vectorstore.get_titles(self.client, collection, [h[0] for h in hits])
        return {
            "dataset": dataset,
            "query": query,
            "mode": mode,
            "collection": collection,
            "model_version": cur.promoted.get("fingerprint"),
            "hits": [{"id": i, "score": round(sc, 6), "title": titles.get(i, "")} for i, sc in hits],
        }


def not_indexed(ledger: Ledger, dataset: str) -> str:
    """Why ``dataset`` cannot be searched: no index yet, or no such dataset (with the known names closest to it)."""
    if ledger.has_dataset(dataset):
        return f"dataset {dataset!r} has no promoted index yet (see `embedpipe runs`)"
    close = closest_names(dataset, ledger.list_datasets())
    return f"no dataset {dataset!r}" + (f"; did you mean {' or '.join(map(repr, close))}?" if close else "")


def search(settings: Settings, dataset: str, query: str, k: int = 10, mode: str | None = None) -> dict:
    """One-off search (no long-lived Searcher): reads the promoted index from the ledger now."""
    return Searcher(settings).search(dataset, query, k, mode)
