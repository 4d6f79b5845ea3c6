"""Machine learning: the model artifact and its one loader (``model``), the training loop (``training``,
``checkpoints``, ``distributed``, ``scalars``), batch embedding (``embedding``, ``prefetch``), choices made on
non-test data (``selection``) and the embedder image's predict route (``serving``). The only layer that imports torch
and sentence-transformers; the jobs' containers and the indexer and search services use it, the functions never do
(import-linter: ``.importlinter``)."""
