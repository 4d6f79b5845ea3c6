"""embedpipe.retrieval.lexical: Lucene stop words + Snowball stems, and the in-memory BM25 index used by selection."""

from __future__ import annotations

from embedpipe.retrieval.lexical import BM25Index, analyzed, tokens


def test_inflections_share_stems():
    engines, engine = tokens(["Engines were running", "engine runs"])
    assert engines[0] == engine[0] == "engin"  # Snowball: engines / engine -> engin
    assert engines[-1] == engine[-1] == "run"  # running / runs -> run
    assert set(engine) <= set(engines)


def test_lowercases_and_drops_stop_words():
    (toks,) = tokens(["The Cat and THE hat"])
    assert "the" not in toks and "and" not in toks
    assert toks == ["cat", "hat"]


def test_analyzed_joins_stems_with_spaces():
    assert analyzed(["Engines were running", "The running dogs"]) == [
        " ".join(tokens(["Engines were running"])[0]),
        "run dog",
    ]
    assert analyzed(["engine runs"]) == ["engin run"]


def test_all_stop_word_text_analyzes_to_empty():
    assert analyzed(["the", "The and of a", ""]) == ["", "", ""]
    assert tokens([]) == [] and analyzed([]) == []


CORPUS = {
    "garden": "Tomato plants need pruning and watering in the garden",
    "engine": "The diesel engines were running hot during the test",
    "music": "A violin concerto played by the orchestra",
}


def test_bm25_ranks_the_matching_document_first():
    index = BM25Index(list(CORPUS), list(CORPUS.values()))
    engine, music = index.search(["why is the engine running so hot", "orchestra violins"], k=3)
    assert engine[0][0] == "engine"
    assert music[0][0] == "music"
    # only documents sharing a term score above zero; scores come best first
    assert [d for d, _ in engine] == ["engine"]
    assert all(s > 0 for _, s in engine + music)
    assert [s for _, s in music] == sorted((s for _, s in music), reverse=True)


def test_bm25_query_without_terms_returns_nothing():
    index = BM25Index(list(CORPUS), list(CORPUS.values()))
    assert index.search(["the of and", ""], k=3) == [[], []]


def test_bm25_k_is_capped_by_the_corpus():
    index = BM25Index(["a", "b"], ["red apple", "red car"])
    (hits,) = index.search(["red"], k=10)
    assert sorted(d for d, _ in hits) == ["a", "b"]
