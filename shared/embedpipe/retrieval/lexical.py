"""BM25's text analysis, one definition for the index, the search service and selection.

Milvus Lite's analyzers lowercase but do not stem (``{"type": "english"}`` is refused there), and a Milvus server's
English analyzer would stem differently from anything we could reproduce offline. So text is analyzed here, the
Lucene way (lowercase, ``\\w\\w+`` tokens, Lucene's 33 English stop words, Snowball English stemmer, through
``bm25s`` and PyStemmer), and the stems go into the ``bm25_text`` field whose standard analyzer only splits them
again; queries are analyzed by the same function before a sparse search. In-memory BM25 for selection
(``BM25Index``) uses the same tokens with Milvus' default parameters (k1 1.2, b 0.75).
"""

from __future__ import annotations

import functools

K1, B = 1.2, 0.75
ANALYZER = "lucene-en-stop+snowball-en"  # recorded with each collection: queries must be analyzed the same way


@functools.cache
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


def tokens(texts: list[str]) -> list[list[str]]:
    import bm25s

    if not texts:
        return []
    out = bm25s.tokenize(
        list(texts), lower=True, stopwords="en", stemmer=_stemmer(), return_ids=False, show_progress=False
    )
    return [list(t) for t in out]


def analyzed(texts: list[str]) -> list[str]:
    """Each text as its space-separated stems (what ``bm25_text`` holds and what sparse queries send)."""
    return [" ".join(t) for t in tokens(texts)]


class BM25Index:
    """Exact in-memory BM25 over a small corpus (the selection split's), same analysis as the Milvus field."""

    def __init__(self, ids: list[str], texts: list[str]):
        import bm25s

        self.ids = list(ids)
        self.model = bm25s.BM25(k1=K1, b=B)
        corpus = tokens(texts)
        self.empty = not any(corpus)  # every text was stop words only: nothing can match (bm25s cannot index it)
        if not self.empty:
            self.model.index(corpus, show_progress=False)

    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]:
        k = min(k, len(self.ids))
        out = []
        for toks in tokens(queries):
            if not toks or self.empty:
                out.append([])
                continue
            docs, scores = self.model.retrieve([toks], k=k, show_progress=False, n_threads=1)
            out.append([(self.ids[int(d)], float(s)) for d, s in zip(docs[0], scores[0]) if s > 0])
        return out
