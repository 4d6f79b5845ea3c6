"""The run ledger in the artifacts bucket (``runs``: run records and dataset states changed by compare-and-set,
trigger claims made by create-only writes) and a run's endings (``lifecycle``: fail, finish, release the dataset).
Below both the orchestration (``control``) and the indexer (``index``), which share it and never import each other:
ending a run never launches one."""
