"""What retrieval means here, one definition each for the pipeline, the trainer, the indexer and search: the
Milvus schema and client (``vectorstore``), BM25 text analysis (``lexical``) and trec_eval metrics, fusion and exact
top-k (``evaluation``). No torch: the functions may use it (names, schema version, metric keys)."""
