"""The search front: inputs checked before any lookup, bounded per-dataset state, a model cache that releases what
nothing serves and loads each URI once, and the service's HTTP mapping (400 / 404)."""

from __future__ import annotations

import base64
import dataclasses
import gc
import os
import sys
import threading
import time
import weakref

import functions_framework
import pytest

from embedpipe.config import Settings
from embedpipe.contracts.events import INDEX_UPDATED
from embedpipe.index import search as search_mod
from embedpipe.ledger.runs import Ledger
from tests.helpers import ROOT
from tests.unit.fakes import FakeStore


class Model:
    """Stands in for a SentenceTransformer: weakly referenceable, so a test can see it released."""


@dataclasses.dataclass
class Info:
    query_prefix: str = ""
    search: dict = dataclasses.field(default_factory=dict)


class CountingStore(FakeStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def read_json_gen(self, uri: str):
        self.reads += 1
        return super().read_json_gen(uri)


class FakeClient:
    """Dense search answers one hit per collection; titles come from ``query`` (never the unescaped ``get(ids=)``)."""

    def __init__(self, hit_id: str) -> None:
        self.hit_id, self.filters = hit_id, []

    def search(self, **kwargs):
        return [[{"id": self.hit_id, "distance": 0.5}] for _ in kwargs["data"]]

    def query(self, collection_name: str, filter: str, output_fields: list[str]):
        self.filters.append(filter)
        return [{"id": self.hit_id, "title": "the title"}]


def make(max_datasets: int = 3, loader=None, promoted=("ds0", "ds1", "ds2", "ds3", "ds4"), clock=time.time):
    store = CountingStore()
    ledger = Ledger("bucket", store)
    for name in promoted:
        ledger.update_dataset(
            name, lambda st, n=name: {**st, "promoted": {"collection": f"{n}__c", "model_uri": f"gs://m/{n}"}}
        )
    store.reads = 0
    settings = dataclasses.replace(Settings.from_env({}), search_max_datasets=max_datasets, search_refresh_s=3600)
    loaded = []

    def fake_loader(uri):
        loaded.append(uri)
        return Model(), Info()

    return search_mod.Searcher(settings, ledger, loader or fake_loader, clock=clock), store, loaded


def sizes(s: search_mod.Searcher) -> tuple[int, int, int]:
    return len(s._serving), len(s._checked), len(s._reloading)


@pytest.mark.parametrize(
    ("dataset", "query", "match"),
    [
        ("../etc", "pumps", "dataset name"),
        ("Upper", "pumps", "dataset name"),
        ("x" * 64, "pumps", "dataset name"),
        ("ds0", "a" * 16001, "over the 16000 limit"),
        ("ds0", "  ", "empty"),
    ],
)
def test_bad_names_and_queries_are_refused_before_any_lookup(dataset, query, match):
    s, store, loaded = make()
    with pytest.raises(ValueError, match=match):
        s.search(dataset, query)
    assert store.reads == 0 and loaded == [] and sizes(s) == (0, 0, 0)


def test_an_unknown_dataset_is_told_from_one_without_an_index_with_the_closest_names():
    s, _, _ = make(promoted=("demo", "cisi"))
    s.ledger.update_dataset("fresh", lambda st: st)  # uploaded, nothing promoted yet
    with pytest.raises(search_mod.NotIndexed, match=r"no dataset 'dmeo'; did you mean 'demo'\?"):
        s.current("dmeo")
    with pytest.raises(search_mod.NotIndexed, match="'fresh' has no promoted index yet"):
        s.current("fresh")


def test_unknown_datasets_leave_no_state():
    s, store, _ = make()
    for i in range(200):
        with pytest.raises(search_mod.NotIndexed):
            s.current(f"nope-{i}")
    assert sizes(s) == (0, 0, 0)
    # two reads each (its state, then whether it exists, for the error), nothing cached: a dataset promoted later is
    # found on its next request
    assert store.reads == 400
    assert s.reload("nope-1") is None, "an event for a dataset nobody asked for loads nothing"


def test_served_datasets_are_bounded_least_recently_used_first():
    s, _, loaded = make(max_datasets=3)
    for name in ("ds0", "ds1", "ds2"):
        s.current(name)
    s.current("ds0")  # ds1 is now the least recently used
    s.current("ds3")
    assert list(s._serving) == ["ds2", "ds0", "ds3"] and sizes(s)[:2] == (3, 3)
    s.current("ds1")  # evicted: loads again, and ds2 goes
    assert list(s._serving) == ["ds0", "ds3", "ds1"] and loaded.count("gs://m/ds1") == 2


def test_a_served_dataset_is_checked_again_once_search_refresh_s_has_passed_on_the_clock(clock):
    s, store, loaded = make(clock=clock)  # search_refresh_s=3600
    s.current("ds0")
    clock.advance(3600)
    s.current("ds0")
    assert "ds0" not in s._reloading, "not past the refresh interval yet"
    clock.advance(1)
    s.current("ds0")
    s._reloading["ds0"].join(5)
    assert store.reads == 2, "the first load's read, then the refresh's"


def test_a_reload_finishing_after_eviction_does_not_bring_the_dataset_back():
    gate = threading.Event()
    s, _, _ = make(max_datasets=1)
    s.current("ds0")
    s.ledger.update_dataset("ds0", lambda st: {**st, "promoted": {**st["promoted"], "model_uri": "gs://m/new"}})
    real = s.loader

    def slow(uri):
        if uri == "gs://m/new":
            gate.wait(10)
        return real(uri)

    s.loader = slow
    thread = s.reload("ds0")
    s.current("ds1")  # evicts ds0 while its reload waits
    gate.set()
    thread.join(10)
    assert list(s._serving) == ["ds1"] and sizes(s) == (1, 1, 0)


def test_model_cache_loads_each_uri_once_and_releases_what_nothing_serves(monkeypatch):
    calls = []

    def slow_load(uri, inference=False):
        calls.append(uri)
        time.sleep(0.2)
        return Model(), Info()

    monkeypatch.setattr(search_mod, "load_model", slow_load)
    got = []
    threads = [threading.Thread(target=lambda: got.append(search_mod.model_for("gs://m/shared"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["gs://m/shared"] and all(g is got[0] for g in got)
    got.clear()
    gc.collect()
    assert "gs://m/shared" not in search_mod._models, "nothing holds it: released"

    s, _, _ = make(max_datasets=1, loader=search_mod.model_for)
    s.current("ds0")
    first = weakref.ref(s.serving("ds0").model)
    s.current("ds1")  # evicts ds0
    gc.collect()
    assert first() is None, "the evicted dataset's model is freed, not kept by a cache"


def test_search_fetches_titles_through_an_escaped_filter(monkeypatch):
    hostile = "x'] or id not in ['"
    s, _, _ = make()
    s._client = FakeClient(hostile)
    monkeypatch.setattr(search_mod, "encode", lambda model, texts: [[0.1, 0.2]] * len(texts))
    out = s.search("ds0", "pumps", k=1, mode="dense")
    assert out["hits"] == [{"id": hostile, "score": 0.5, "title": "the title"}]
    assert s._client.filters == ["id in [\"x'] or id not in ['\"]"]


def test_service_maps_bad_input_to_400_and_unknown_datasets_to_404(monkeypatch):
    for key in [k for k in os.environ if k.startswith("EMBEDPIPE_")]:
        monkeypatch.delenv(key)
    app = functions_framework.create_app(
        target="search", source=str(ROOT / "services/search/main.py"), signature_type="http"
    )
    module = sys.modules["main"]
    store = CountingStore()
    module.searcher.ledger = Ledger("bucket", store)
    c = app.test_client()
    r = c.get("/search", query_string={"dataset": "ds0", "q": "a" * 20000})
    assert r.status_code == 400 and "limit" in r.get_json()["error"]
    assert c.get("/search", query_string={"dataset": "../x", "q": "pumps"}).status_code == 400
    assert c.get("/search", query_string={"dataset": "ds0", "q": "pumps", "k": "many"}).status_code == 400
    assert store.reads == 0
    for k in ("abc", "²", "٣", " 7", "+7", "1_0", "", "0" * 5000):
        r = c.get("/search", query_string={"dataset": "ds0", "q": "pumps", "k": k})
        assert (r.status_code, r.get_json()["error"]) == (400, f"k must be a whole number within 1..1000, not {k!r}")
    r = c.get("/search?dataset=ds0&q=pumps&k=5&k=abc")
    assert r.status_code == 400 and "query parameter(s) ['k'] given more than once" in r.text
    r = c.get("/search", query_string={"dataset": "ds0", "q": "pumps", "top_k": "5"})  # used to be ignored
    assert r.status_code == 400 and "unknown query parameter(s) ['top_k']; allowed: dataset, q, k, mode" in r.text
    assert c.get("/search", query_string={"dataset": "unknown", "q": "pumps"}).status_code == 404
    assert module.searcher.snapshot() == {}
    # pushes that cannot be index-updated events are acked or refused, never a 500 (a redelivery loop)
    deep = "[" * 100_000 + "]" * 100_000
    r = c.post("/", data=deep, content_type="application/json")
    assert r.status_code == 400
    for data in (deep, "[1, 2]", "not json"):
        msg = {"message": {"data": base64.b64encode(data.encode()).decode(), "attributes": {"ce-type": INDEX_UPDATED}}}
        r = c.post("/", json=msg)
        assert (r.status_code, r.get_json()) == (200, {"error": "malformed"}), data[:20]
