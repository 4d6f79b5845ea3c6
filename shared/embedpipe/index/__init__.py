"""The indexer service and search: loading a run's embeddings into Milvus (``indexing``, ``bulkload``),
evaluating and gating, the run report (``report``), the model registry (``registry``), rollback (``rollback``) and the
query-time ``search``. It ends runs through the ledger and never imports ``control``: the indexer releases a dataset,
it never launches a job."""
