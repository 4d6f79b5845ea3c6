"""Orchestration: what each trigger does to the run ledger and which job it launches (``pipeline``), the checks
of uploaded files (``intake``) and the full-or-incremental decision with its id -> hash tables (``incremental``). The
launching functions and the reconcile tick call it; it launches jobs, never imports ``ml`` (functions stay free of
torch) and never imports ``index``."""
